"""load_benchmark: registry, folder and ground-truth discovery, missing images, evaluation on real ground truth."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import oxford_ir.benchmarks as benchmarks_package
from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.gnd_pickle import read_gnd_pickle
from oxford_ir.benchmarks.registry import BENCHMARKS, available_benchmarks, load_benchmark
from oxford_ir.errors import ConfigError, DataError, GroundTruthError

# a tiny dataset in the published layout: two landmarks, two queries each
TOWER = [f"tower_{i:06d}" for i in range(4)]
BRIDGE = [f"bridge_{i:06d}" for i in range(4)]
IMLIST = TOWER + BRIDGE + ["oxford_000001"]
QUERIES = {
    ("tower", 1): "tower_000000",
    ("tower", 2): "tower_000001",
    ("bridge", 1): "bridge_000000",
    ("bridge", 2): "bridge_000003",
}
POSITIVES = {"tower": TOWER[:3], "bridge": BRIDGE[:2]}
JUNK = {"tower": ["oxford_000001"], "bridge": []}


def _make_dataset(folder: Path, *, images: list[str] | None = None) -> Path:
    """``folder`` with jpg/, imlist.txt, gt_files_170407/, groundtruth.json and both gnd pickles."""
    (folder / "jpg").mkdir(parents=True)
    for name in IMLIST if images is None else images:
        Image.new("RGB", (8, 6), (len(name) * 9 % 255, 80, 160)).save(folder / "jpg" / f"{name}.jpg")
    (folder / "imlist.txt").write_text("\n".join(IMLIST) + "\n")
    gt = folder / "gt_files_170407"
    gt.mkdir()
    by_landmark: dict[str, dict[str, list[str]]] = {}
    for (landmark, n), query in QUERIES.items():
        (gt / f"{landmark}_{n}_query.txt").write_text(f"oxc1_{query} 1.0 1.0 7.0 5.0\n")
        (gt / f"{landmark}_{n}_good.txt").write_text("\n".join(POSITIVES[landmark][:1]) + "\n")
        (gt / f"{landmark}_{n}_ok.txt").write_text("\n".join(POSITIVES[landmark][1:]) + "\n")
        (gt / f"{landmark}_{n}_junk.txt").write_text("".join(f"{j}\n" for j in JUNK[landmark]))
        entry = by_landmark.setdefault(
            landmark,
            {"good": POSITIVES[landmark][:1], "ok": POSITIVES[landmark][1:], "junk": JUNK[landmark], "query": []},
        )
        entry["query"].append(f"{query}.jpg")
    (folder / "groundtruth.json").write_text(json.dumps(by_landmark))
    order = sorted(QUERIES)  # (landmark, n)
    index = {name: i for i, name in enumerate(IMLIST)}
    original = [
        {"bbx": [1.0, 1.0, 7.0, 5.0], "ok": [index[p] for p in POSITIVES[lm]], "junk": [index[j] for j in JUNK[lm]]}
        for lm, _ in order
    ]
    revisited = [
        {"bbx": e["bbx"], "easy": e["ok"][:1], "hard": e["ok"][1:], "junk": e["junk"]} for e in original
    ]  # fmt: skip
    qimlist = [QUERIES[k] for k in order]
    for prefix, gnd in (("gnd_", original), ("gnd_r", revisited)):
        payload = {"imlist": IMLIST, "qimlist": qimlist, "gnd": gnd}
        (folder / f"{prefix}{folder.name}.pkl").write_bytes(pickle.dumps(payload))
    return folder


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A data folder holding oxford5k/ (a tiny stand-in in the real layout)."""
    _make_dataset(tmp_path / "data" / "oxford5k")
    return tmp_path / "data"


# -- registry ---------------------------------------------------------------------------------------


def test_registry_and_package_exports(tiny_root: Path) -> None:
    assert set(BENCHMARKS) == {"oxford5k", "roxford5k", "paris6k", "rparis6k", "synthetic", "rsynthetic"}
    assert BENCHMARKS["roxford5k"] == ("oxford5k", "revisited", "gnd_roxford5k")
    assert BENCHMARKS["paris6k"].folder == BENCHMARKS["rparis6k"].folder == "paris6k"
    assert BENCHMARKS["rsynthetic"] == ("synthetic", "revisited", "gnd_rsynthetic")
    assert available_benchmarks() == list(BENCHMARKS)
    assert available_benchmarks(tiny_root) == ["oxford5k", "roxford5k"]
    assert benchmarks_package.load_benchmark is load_benchmark and benchmarks_package.BENCHMARKS is BENCHMARKS
    assert benchmarks_package.Benchmark is Benchmark


def test_unknown_benchmark_name(tiny_root: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_benchmark("oxford105k", tiny_root)
    assert "'oxford105k'" in str(error.value) and "roxford5k" in str(error.value)


# -- folders and discovery ----------------------------------------------------------------------------


def test_root_may_be_the_data_folder_or_the_dataset_folder(tiny_root: Path) -> None:
    via_parent = load_benchmark("oxford5k", tiny_root)
    direct = load_benchmark("oxford5k", tiny_root / "oxford5k")
    folder = tiny_root / "oxford5k"
    for benchmark in (via_parent, direct):
        assert benchmark.root == folder and benchmark.image_dir == folder / "jpg"
        assert benchmark.source == folder / "gnd_oxford5k.pkl"
        assert benchmark.protocol == "original" and not benchmark.is_subset
    assert via_parent.qimlist == direct.qimlist == ["bridge_000000", "bridge_000003", "tower_000000", "tower_000001"]
    assert via_parent.query_landmarks == ["bridge", "bridge", "tower", "tower"]
    assert via_parent.gnd[2]["ok"].tolist() == [0, 1, 2] and via_parent.gnd[2]["junk"].tolist() == [8]
    assert via_parent.query_paths[0] == folder / "jpg" / "bridge_000000.jpg"


def test_revisited_reads_its_own_pickle(tiny_root: Path) -> None:
    benchmark = load_benchmark("roxford5k", tiny_root)
    assert benchmark.protocol == "revisited" and benchmark.source.name == "gnd_roxford5k.pkl"
    assert benchmark.gnd[2]["easy"].tolist() == [0] and benchmark.gnd[2]["hard"].tolist() == [1, 2]


def test_discovery_order_pickle_then_text_then_json(tiny_root: Path) -> None:
    folder = tiny_root / "oxford5k"
    from_pickle = load_benchmark("oxford5k", tiny_root)
    (folder / "gnd_oxford5k.pkl").unlink()
    from_text = load_benchmark("oxford5k", tiny_root)
    assert from_text.source == folder / "gt_files_170407"
    assert from_text.query_landmarks == from_pickle.query_landmarks
    shutil.rmtree(folder / "gt_files_170407")
    from_json = load_benchmark("oxford5k", tiny_root)
    assert from_json.source == folder / "groundtruth.json"
    assert all(g["bbx"] is None for g in from_json.gnd)
    for other in (from_text, from_json):
        assert other.qimlist == from_pickle.qimlist and other.imlist == from_pickle.imlist
        for a, b in zip(other.gnd, from_pickle.gnd, strict=True):
            assert a["ok"].tolist() == b["ok"].tolist() and a["junk"].tolist() == b["junk"].tolist()
    (folder / "groundtruth.json").unlink()
    with pytest.raises(GroundTruthError) as error:
        load_benchmark("oxford5k", tiny_root)
    message = str(error.value)
    for needle in (str(folder), "gnd_oxford5k.pkl", "gt_files_170407/", "gt_files/", "groundtruth.json"):
        assert needle in message
    assert f"oxford-ir-data download oxford5k --root {tiny_root}" in message


def test_revisited_needs_its_pickle(tiny_root: Path) -> None:
    (tiny_root / "oxford5k" / "gnd_roxford5k.pkl").unlink()
    with pytest.raises(GroundTruthError) as error:
        load_benchmark("roxford5k", tiny_root)
    message = str(error.value)
    assert "looked for gnd_roxford5k.pkl." in message and "gt_files" not in message
    assert "oxford-ir-data download oxford5k" in message


def test_missing_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_benchmark("paris6k", tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "paris6k") in message
    assert f"oxford-ir-data download paris6k --root {tmp_path / 'nowhere'}" in message


def test_synthetic_folder_and_fix(tmp_path: Path) -> None:
    _make_dataset(tmp_path / "synthetic")
    assert load_benchmark("rsynthetic", tmp_path).source == tmp_path / "synthetic" / "gnd_rsynthetic.pkl"
    (tmp_path / "synthetic" / "gnd_synthetic.pkl").unlink()
    assert load_benchmark("synthetic", tmp_path).source == tmp_path / "synthetic" / "gt_files_170407"
    (tmp_path / "synthetic" / "gnd_rsynthetic.pkl").unlink()
    with pytest.raises(GroundTruthError, match="write_synthetic_benchmark"):
        load_benchmark("rsynthetic", tmp_path)


# -- explicit gt_file -------------------------------------------------------------------------------


def test_explicit_gt_file(tiny_root: Path, tmp_path: Path) -> None:
    folder = tiny_root / "oxford5k"
    moved = tmp_path / "elsewhere.json"
    shutil.copy(folder / "groundtruth.json", moved)
    benchmark = load_benchmark("oxford5k", tiny_root, gt_file=moved)
    assert benchmark.source == moved and benchmark.imlist == IMLIST  # image list still from the dataset folder
    assert load_benchmark("oxford5k", tiny_root, gt_file=folder / "gt_files_170407").source.name == "gt_files_170407"
    with pytest.raises(GroundTruthError) as error:
        load_benchmark("oxford5k", tiny_root, gt_file=folder / "gnd_roxford5k.pkl")
    message = str(error.value)
    assert "gnd_roxford5k.pkl" in message and "revisited" in message and "'roxford5k'" in message
    with pytest.raises(GroundTruthError, match="original-protocol"):
        load_benchmark("roxford5k", tiny_root, gt_file=folder / "groundtruth.json")
    with pytest.raises(GroundTruthError, match="not found"):
        load_benchmark("oxford5k", tiny_root, gt_file=folder / "gnd_nothing.pkl")


def test_out_of_range_index_names_the_pickle(tiny_root: Path) -> None:
    path = tiny_root / "oxford5k" / "gnd_oxford5k.pkl"
    payload = pickle.loads(path.read_bytes())
    payload["gnd"][1]["junk"] = [len(IMLIST)]
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(GroundTruthError, match=f"index {len(IMLIST)} is out of range") as error:
        load_benchmark("oxford5k", tiny_root)
    assert str(path) in str(error.value)


# -- missing images -----------------------------------------------------------------------------------


def test_missing_images_raise_or_give_a_warned_subset(tmp_path: Path) -> None:
    present = [n for n in IMLIST if n not in ("tower_000002", "bridge_000003")]
    _make_dataset(tmp_path / "oxford5k", images=present)
    with pytest.raises(DataError) as error:
        load_benchmark("oxford5k", tmp_path)
    message = str(error.value)
    assert f"2 of {len(IMLIST)} database and query images are missing from {tmp_path / 'oxford5k' / 'jpg'}" in message
    assert "tower_000002.jpg" in message and "bridge_000003.jpg" in message
    assert "oxford-ir-data download oxford5k" in message and "allow_missing_images=true" in message
    with pytest.warns(UserWarning, match="dropped 2 missing database images and 1 queries"):
        subset = load_benchmark("oxford5k", tmp_path, allow_missing_images=True)
    assert subset.is_subset and subset.n_db == len(IMLIST) - 2
    assert subset.qimlist == ["bridge_000000", "tower_000000", "tower_000001"]
    assert subset.query_landmarks == ["bridge", "tower", "tower"]
    assert [subset.imlist[i] for i in subset.gnd[1]["ok"]] == ["tower_000000", "tower_000001"]


# -- query boxes against their images -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "problem"),
    [
        ((1, 5000), "box 1,1,7,5 does not overlap the 1 x 5000 image"),
        ((5000, 1), "box 1,1,7,5 does not overlap the 5000 x 1 image"),
        ((3, 5000), "box 1,1,7,5 holds only 2 x 4 pixels of (at least 4 x 4 make a query) the 3 x 5000 image"),
    ],
)
@pytest.mark.parametrize("name", ["oxford5k", "roxford5k"])
def test_a_query_image_replaced_so_its_box_leaves_no_usable_crop_is_refused(tiny_root, name, size, problem) -> None:
    """Before: the crop of a box outside its image (black padding only) was embedded and evaluated without a word."""
    query = tiny_root / "oxford5k" / "jpg" / "tower_000001.jpg"
    Image.new("RGB", size, (200, 10, 10)).save(query)
    with pytest.raises(DataError) as error:
        load_benchmark(name, tiny_root)
    message = str(error.value)
    assert message.startswith(f"{name}: query 'tower_000001' ({query}): {problem}; "), message
    assert "the image is not the one the ground truth" in message and "download the dataset again" in message


def test_a_box_running_past_the_image_edge_is_kept_and_cropped_as_published(tiny_root: Path) -> None:
    """Only no overlap or a degenerate crop is refused: PIL pads the part outside the image, as the published code."""
    Image.new("RGB", (5, 5), (200, 10, 10)).save(tiny_root / "oxford5k" / "jpg" / "tower_000001.jpg")
    benchmark = load_benchmark("oxford5k", tiny_root)
    assert benchmark.query_bboxes[benchmark.qimlist.index("tower_000001")] == (1.0, 1.0, 7.0, 5.0)


# -- real data --------------------------------------------------------------------------------------


def test_real_oxford_without_images_is_a_clear_error(oxford_root: Path) -> None:
    with pytest.raises(DataError) as error:
        load_benchmark("oxford5k", oxford_root.parent)
    message = str(error.value)
    assert f"5051 of 5063 database and query images are missing from {oxford_root / 'jpg'}" in message
    assert f"oxford-ir-data download oxford5k --root {oxford_root.parent}" in message


def test_real_revisited_paris_subset(paris_root: Path) -> None:
    with pytest.warns(UserWarning, match="not comparable"):
        subset = load_benchmark("rparis6k", paris_root, allow_missing_images=True)
    assert subset.is_subset and subset.protocol == "revisited"
    assert subset.n_db == 238 and subset.n_queries == 12
    assert "238/6322 database images and 12/70 queries" in subset.subset_note
    assert all(p.is_file() for p in subset.db_paths + subset.query_paths)
    assert len(subset.query_landmarks) == 12 and all(subset.query_landmarks)
    assert all(len(subset.positives(q)) > 0 for q in range(subset.n_queries))
    with pytest.warns(UserWarning, match="238/6322"):
        same = load_benchmark("rparis6k", paris_root.parent, allow_missing_images=True)
    assert same.qimlist == subset.qimlist and same.imlist == subset.imlist


def _perfect_ranks(benchmark: Benchmark, first_keys: tuple[str, ...]) -> np.ndarray:
    """Per query: the listed keys' images in that order, then every other database image."""
    columns = []
    for entry in benchmark.gnd:
        head = np.concatenate([np.asarray(entry[k], dtype=np.int64) for k in first_keys])
        rest = np.setdiff1d(np.arange(benchmark.n_db), head)
        columns.append(np.concatenate([head, rest]))
    return np.stack(columns, axis=1)


def _full_benchmark(name: str, path: Path) -> Benchmark:
    truth = read_gnd_pickle(path)  # the full ground truth; its images are not on this machine
    return Benchmark(
        name, path.parent, truth.protocol, truth.imlist, truth.qimlist, truth.gnd, path, path.parent / "jpg"
    )


def test_evaluate_real_oxford_ground_truth(oxford_root: Path) -> None:
    benchmark = _full_benchmark("oxford5k", oxford_root / "gnd_oxford5k.pkl").validate()
    ranks = _perfect_ranks(benchmark, ("ok", "junk"))
    assert ranks.shape == (5063, 55)
    metrics = benchmark.evaluate(ranks)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["mP@1"] == pytest.approx(1.0)
    assert benchmark.evaluate(ranks[::-1])["mAP"] < 0.05
    # junk first, then positives: junk is removed before AP, so still perfect
    assert benchmark.evaluate(_perfect_ranks(benchmark, ("junk", "ok")))["mAP"] == pytest.approx(1.0)


def test_evaluate_real_revisited_oxford_ground_truth(oxford_root: Path) -> None:
    benchmark = _full_benchmark("roxford5k", oxford_root / "gnd_roxford5k.pkl").validate()
    metrics = benchmark.evaluate(_perfect_ranks(benchmark, ("easy", "hard", "junk")))
    for setting in ("E", "M", "H"):
        assert metrics[f"{setting}/mAP"] == pytest.approx(1.0)
    # hard images before easy ones: Easy (hard ignored) and Hard (easy ignored) stay perfect, Medium does too
    swapped = benchmark.evaluate(_perfect_ranks(benchmark, ("junk", "hard", "easy")))
    assert swapped["E/mAP"] == pytest.approx(1.0) and swapped["H/mAP"] == pytest.approx(1.0)
    reversed_metrics = benchmark.evaluate(_perfect_ranks(benchmark, ("easy", "hard", "junk"))[::-1])
    assert all(reversed_metrics[f"{s}/mAP"] < 0.1 for s in ("E", "M", "H"))


def test_a_query_outside_the_image_list_is_never_a_missing_download(tmp_path: Path) -> None:
    """A gt query naming no image of the dataset: an error of the ground truth (file and line), not an image to
    download, and not a query silently dropped from the subset with allow_missing_images=true."""
    folder = _make_dataset(tmp_path / "oxford5k")
    for pickle_file in folder.glob("gnd_*.pkl"):
        pickle_file.unlink()  # the text files are read
    (folder / "gt_files_170407" / "tower_2_query.txt").write_text("oxc1_tower_000077 1.0 1.0 7.0 5.0\n")
    for allow in (False, True):
        with pytest.raises(GroundTruthError) as error:
            load_benchmark("oxford5k", tmp_path, allow_missing_images=allow)
        message = str(error.value)
        assert "tower_2_query.txt:1: query image 'tower_000077' is not in" in message and "imlist.txt" in message
        assert "download" not in message.replace("not a missing download", "")
