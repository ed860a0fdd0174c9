"""Google Landmarks v2: the reader against hand-written rows and the miniature's own lists, the subset rule against a
brute-force selection, bad rows one line each, and the download of the miniature over 127.0.0.1 (a subset of parts,
a resume after a cut, a bad md5)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from oxford_ir.benchmarks.collection import Collection
from oxford_ir.benchmarks.gldv2 import (
    COMPLETE_MARKER,
    STATE_FILE,
    _full_csv_fast,
    _full_csv_lines,
    image_paths,
    load_gldv2,
    read_clean_csv,
    read_full_csv,
    select_landmarks,
)
from oxford_ir.benchmarks.gldv2_download import download_gldv2, format_parts, parse_parts
from oxford_ir.benchmarks.miniature_gldv2 import MiniatureGldv2, write_miniature_gldv2
from oxford_ir.cli.data import main as data_main
from oxford_ir.errors import ConfigError, DataError, DownloadError
from tests.benchmarks.http_server import FileServer

FAST = {"progress": False, "backoff": 0.0, "timeout": 5.0}
A, B, C, D, E = "0123456789abcdef", "fedcba9876543210", "00000000000000ff", "abcabcabcabcabc1", "1111222233334444"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def miniature(tmp_path_factory: pytest.TempPathFactory) -> MiniatureGldv2:
    return write_miniature_gldv2(tmp_path_factory.mktemp("gldv2_server"))


def serve(server: FileServer, mini: MiniatureGldv2) -> None:
    for path in mini.folder.rglob("*"):
        if path.is_file():
            server.files[path.relative_to(mini.folder).as_posix()] = path.read_bytes()


# -- the reader -----------------------------------------------------------------------------------------


def test_clean_csv_reads_into_the_hand_built_collection(tmp_path: Path) -> None:
    write(tmp_path / "train_clean.csv", f"landmark_id,images\n7,{A} {B}\n\n12,{C}\r\n3,{D} {E}\n")
    c = load_gldv2(tmp_path)
    assert c.paths.tolist() == [
        "train/0/1/2/0123456789abcdef.jpg",
        "train/f/e/d/fedcba9876543210.jpg",
        "train/0/0/0/00000000000000ff.jpg",
        "train/a/b/c/abcabcabcabcabc1.jpg",
        "train/1/1/1/1111222233334444.jpg",
    ]
    assert c.label_names.tolist() == ["12", "3", "7"]  # sorted as names, as every collection
    assert c.labels.tolist() == [2, 2, 0, 1, 1]
    assert (c.split == 0).all() and c.is_query.all() and c.is_gallery.all() and np.isnan(c.boxes).all()
    assert c.root == tmp_path and c.source == tmp_path / "train_clean.csv" and c.name == "gldv2"
    ids, landmarks, lines = read_clean_csv(tmp_path / "train_clean.csv")
    assert lines.tolist() == [2, 2, 4, 5, 5] and landmarks.tolist() == [7, 7, 12, 3, 3]
    assert [f"{i:016x}" for i in ids.tolist()] == [A, B, C, D, E]


def test_full_csv_takes_the_id_and_the_last_field(tmp_path: Path) -> None:
    write(
        tmp_path / "gldv2" / "train.csv",
        f'id,url,landmark_id\n{A},http://x/a.jpg,5\n{B},"http://x/b,c.jpg",5\n{C},http://x/c.jpg,40\n',
    )
    c = load_gldv2(tmp_path, clean=False)  # the data folder holding gldv2/
    assert c.name == "gldv2-full" and c.root == tmp_path / "gldv2"
    assert [p.split("/")[-1] for p in c.paths.tolist()] == [f"{A}.jpg", f"{B}.jpg", f"{C}.jpg"]
    assert c.label_names[c.labels].tolist() == ["5", "5", "40"]


def test_the_fast_full_csv_path_equals_the_line_by_line_one(miniature: MiniatureGldv2, tmp_path: Path) -> None:
    body = f"id,url,landmark_id\r\n{A},http://x/a.jpg,5\n\n{B},http://x/b,c.jpg,42\r\n{C},u,7".encode()
    for data in (body, (miniature.folder / "metadata" / "train.csv").read_bytes(), b"id,url,landmark_id\n"):
        fast = _full_csv_fast(data)
        slow = _full_csv_lines(write(tmp_path / "train.csv", data.decode()))
        assert fast is not None and all(a.tolist() == b.tolist() for a, b in zip(fast, slow, strict=True))
    assert _full_csv_fast(body.replace(b"5\n", b'"5"\n')) is None  # a quoted field: the line reader takes it


def test_the_miniature_reads_as_its_own_lists(miniature: MiniatureGldv2, tmp_path: Path) -> None:
    shutil.copy(miniature.folder / "metadata" / "train_clean.csv", tmp_path)
    shutil.copy(miniature.folder / "metadata" / "train.csv", tmp_path)
    for clean, lists in ((True, [miniature.clean]), (False, [miniature.clean, miniature.extra])):
        c = load_gldv2(tmp_path, clean=clean)
        got = Counter((p.split("/")[-1][:-4], c.label_names[k]) for p, k in zip(c.paths, c.labels, strict=True))
        expected = Counter((i, str(lm)) for d in lists for lm, ids in d.items() for i in ids)
        assert got == expected and len(c) == sum(expected.values())
        assert all(p == f"train/{p[-20]}/{p[-19]}/{p[-18]}/{p[-20:]}" for p in c.paths.tolist())
    assert len(miniature.clean) == 12 and all(2 <= len(v) <= 8 for v in miniature.clean.values())


def test_paths_are_built_from_the_integer_ids() -> None:
    ids = np.array([0, 2**64 - 1, 0x0123456789ABCDEF], np.uint64)
    assert image_paths(ids).tolist() == [
        "train/0/0/0/0000000000000000.jpg",
        "train/f/f/f/ffffffffffffffff.jpg",
        "train/0/1/2/0123456789abcdef.jpg",
    ]


def test_integer_labels_give_the_names_and_indices_of_their_text() -> None:
    labels = np.random.default_rng(0).integers(0, 3000, 500)
    paths = [f"{i}.jpg" for i in range(500)]
    by_int = Collection.from_rows("x", "/r", "/r/s", paths, labels)
    by_text = Collection.from_rows("x", "/r", "/r/s", paths, [str(v) for v in labels.tolist()])
    assert by_int.label_names.tolist() == by_text.label_names.tolist()
    assert by_int.labels.tolist() == by_text.labels.tolist()


@pytest.mark.parametrize(
    ("body", "line", "complaint"),
    [
        (f"1,{A} 0123456789abcdeg\n", 2, "'0123456789abcdeg' is not 16 hex digits"),
        (f"1,{A}\n2,{B} ../../etc/passwd\n", 3, "'../../etc/passwd' is not 16 hex digits"),
        (f"1,{A}\n2,{B} {A[:15]}\n", 3, f"'{A[:15]}' is not 16 hex digits"),
        (f"1,{A}\n2,{B}  {C}\n", 3, "separated by one space"),
        (f"1,{A}\n2,\n", 3, "landmark 2 has no images"),
        (f"1,{A}\n2\n", 3, "landmark 2 has no images"),
        (f"1,{A} {B}\n2,{C}\n3,{D} {B}\n", 4, f"image id {B} is listed again (first on line 2)"),
        (f"1,{A}\n1,{B}\n", 3, "landmark 1 appears again (first on line 2)"),
        (f"x1,{A}\n", 2, "landmark_id 'x1' is not a whole number"),
        (f"1,{A.upper()}\n", 2, "is not 16 hex digits"),
    ],
)
def test_bad_clean_rows_are_one_line_naming_file_and_line(tmp_path: Path, body: str, line: int, complaint: str) -> None:
    path = write(tmp_path / "train_clean.csv", "landmark_id,images\n" + body)
    with pytest.raises(DataError) as error:
        load_gldv2(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: ") and complaint in message and "\n" not in message


@pytest.mark.parametrize(
    ("body", "line", "complaint"),
    [
        (f"{A},u,1\n{B[:-1]}g,u,2\n", 3, "is not 16 hex digits"),
        (f"{A},u,1\n../../../etc/x.jpg,u,2\n", 3, "is not 16 hex digits"),
        (f"{A},u,1\n{B},u,2\n{A},u,3\n", 4, f"image id {A} is listed again (first on line 2)"),
        (f"{A},u,one\n", 2, "landmark_id 'one' is not a whole number"),
        (f"{A}\n", 2, "expected id,url,landmark_id"),
    ],
)
def test_bad_full_rows_are_one_line_naming_file_and_line(tmp_path: Path, body: str, line: int, complaint: str) -> None:
    path = write(tmp_path / "train.csv", "id,url,landmark_id\n" + body)
    with pytest.raises(DataError) as error:
        read_full_csv(path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: ") and complaint in message and "\n" not in message


def test_wrong_header_and_missing_file_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train_clean.csv not found; download it with `oxford-ir-data download gldv2"):
        load_gldv2(tmp_path)
    write(tmp_path / "train_clean.csv", f"id,images\n1,{A}\n")
    with pytest.raises(DataError, match=r"train_clean.csv:1: expected the header 'landmark_id,images'"):
        load_gldv2(tmp_path)


# -- the subset rule ------------------------------------------------------------------------------------


def brute_force_selection(landmarks: list[int], min_images: int, max_landmarks: int | None, val: int, seed: int):
    """The documented rule, written out with a Counter and Python lists."""
    counts = Counter(landmarks)
    eligible = sorted(lm for lm, n in counts.items() if n >= min_images)
    rng = np.random.default_rng(seed)
    chosen = eligible
    if max_landmarks is not None and len(eligible) > max_landmarks:
        chosen = sorted(int(x) for x in rng.choice(np.array(eligible), max_landmarks, replace=False))
    held = sorted(int(x) for x in rng.choice(np.array(chosen), val, replace=False)) if val else []
    return chosen, held


@pytest.mark.parametrize(
    ("min_images", "max_landmarks", "val", "seed"),
    [(1, None, 0, 0), (3, None, 2, 0), (3, 10, 2, 0), (3, 10, 2, 1), (5, 4, 3, 7), (2, 1000, 5, 3)],
)
def test_subset_rule_equals_a_brute_force_selection(min_images, max_landmarks, val, seed) -> None:
    rng = np.random.default_rng(42)
    landmarks = rng.choice(rng.choice(10**6, 60, replace=False), 400, p=rng.dirichlet(np.ones(60) * 0.5)).tolist()
    chosen, held = select_landmarks(
        np.array(landmarks), min_images=min_images, max_landmarks=max_landmarks, val_landmarks=val, seed=seed
    )
    expected_chosen, expected_held = brute_force_selection(landmarks, min_images, max_landmarks, val, seed)
    assert chosen.tolist() == expected_chosen and held.tolist() == expected_held
    counts = Counter(landmarks)
    assert all(counts[lm] >= min_images for lm in chosen.tolist()) and set(held.tolist()) <= set(chosen.tolist())
    if max_landmarks is not None:
        assert len(chosen) == min(max_landmarks, sum(n >= min_images for n in counts.values()))


def test_the_seed_changes_the_draw_and_val_landmarks_become_queries_among_themselves(tmp_path: Path) -> None:
    lines = [f"{lm},{' '.join(f'{lm:08x}{k:08x}' for k in range(lm % 5 + 1))}" for lm in range(1, 41)]
    write(tmp_path / "train_clean.csv", "landmark_id,images\n" + "\n".join(lines) + "\n")
    draws = {tuple(select_landmarks(np.repeat(np.arange(1, 41), 2), max_landmarks=5, seed=s)[0]) for s in range(4)}
    assert len(draws) > 1
    c = load_gldv2(tmp_path, min_images=3, max_landmarks=10, val_landmarks=3, seed=1)
    sizes = Counter(c.label_names[c.labels].tolist())
    assert len(sizes) == 10 and min(sizes.values()) >= 3
    val = np.flatnonzero(c.split == 1)
    assert len(set(c.labels[val].tolist())) == 3 and c.is_query[val].all() and c.is_gallery[val].all()
    assert not set(c.labels[val].tolist()) & set(c.labels[c.split == 0].tolist())
    with pytest.raises(ConfigError, match="val_landmarks=10 leaves no landmark to train on"):
        load_gldv2(tmp_path, min_images=3, max_landmarks=10, val_landmarks=10)


# -- the download ---------------------------------------------------------------------------------------


def test_parts_lists() -> None:
    assert parse_parts("0-3,7") == [0, 1, 2, 3, 7] and parse_parts(" 7 , 2-3") == [2, 3, 7]
    assert len(parse_parts("all")) == 500 and format_parts([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    for bad in ("", "3-1", "500", "0-500", "a", "1,,2"):
        with pytest.raises(ConfigError, match="expected numbers and ranges from 0 to 499"):
            parse_parts(bad)


def test_download_a_subset_of_parts_then_more(server: FileServer, miniature: MiniatureGldv2, tmp_path: Path) -> None:
    serve(server, miniature)
    folder = download_gldv2(tmp_path, [0, 2], base_url=server.url, **FAST)
    assert folder == tmp_path / "gldv2" and server.count("train/images_001.tar") == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [".complete.json", ".download.lock", ".parts", "md5.images_000.txt", "md5.images_002.txt"]
        + ["train", "train.csv", "train_clean.csv"]
    )
    assert json.loads((folder / COMPLETE_MARKER).read_text())["parts"] == [0, 2]
    on_disk = sorted(p.relative_to(folder).as_posix() for p in (folder / "train").rglob("*.jpg"))
    in_parts = sorted(f"train/{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i, p in miniature.part_of.items() if p in (0, 2))
    assert on_disk == in_parts
    c = load_gldv2(tmp_path)  # only the images of parts 0 and 2
    expected = {f"{i}.jpg" for ids in miniature.clean.values() for i in ids if miniature.part_of[i] != 1}
    assert {p.split("/")[-1] for p in c.paths.tolist()} == expected
    assert all((folder / p).is_file() for p in c.paths.tolist())
    # a rerun fetches no TAR again; asking for part 1 too fetches only it
    requests = len(server.requests)
    download_gldv2(tmp_path, [2], base_url=server.url, **FAST)
    assert len(server.requests) == requests
    download_gldv2(tmp_path, [1], base_url=server.url, **FAST)
    assert server.count("train/images_000.tar") == 1 and server.count("train/images_001.tar") == 1
    assert json.loads((folder / COMPLETE_MARKER).read_text())["parts"] == [0, 1, 2]
    assert len(load_gldv2(tmp_path)) == sum(len(v) for v in miniature.clean.values())


def test_download_resumes_a_cut_tar_with_a_range_request(
    server: FileServer, miniature: MiniatureGldv2, tmp_path: Path
) -> None:
    serve(server, miniature)
    server.behaviour["train/images_001.tar"] = "truncate_once"
    download_gldv2(tmp_path, [1], base_url=server.url, **FAST)
    ranges = server.ranges("train/images_001.tar")
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    files = sorted(p.name for p in (tmp_path / "gldv2" / "train").rglob("*.jpg"))
    assert files == sorted(f"{i}.jpg" for i, p in miniature.part_of.items() if p == 1)


def test_a_part_killed_before_it_was_recorded_is_done_again(
    server: FileServer, miniature: MiniatureGldv2, tmp_path: Path
) -> None:
    serve(server, miniature)
    server.files["train/images_001.tar"] = b"not a tar"
    server.files["md5sum/train/md5.images_001.txt"] = f"{hashlib.md5(b'not a tar').hexdigest()}  x\n".encode()
    with pytest.raises(DownloadError, match="gldv2 part 1: cannot read .*images_001.tar"):
        download_gldv2(tmp_path, [0, 1], base_url=server.url, **FAST)
    folder = tmp_path / "gldv2"
    assert (folder / STATE_FILE).exists() and not (folder / COMPLETE_MARKER).exists()
    with pytest.raises(DataError, match="unfinished download"):
        load_gldv2(tmp_path)
    serve(server, miniature)
    download_gldv2(tmp_path, [0, 1], base_url=server.url, **FAST)
    assert server.count("train/images_000.tar") == 1 and server.count("train/images_001.tar") == 2
    assert not (folder / STATE_FILE).exists()


def test_a_bad_md5_is_refused_in_one_line_naming_the_part(
    server: FileServer, miniature: MiniatureGldv2, tmp_path: Path
) -> None:
    serve(server, miniature)
    server.files["md5sum/train/md5.images_002.txt"] = b"0" * 32 + b"  images_002.tar\n"
    with pytest.raises(DownloadError) as error:
        download_gldv2(tmp_path, [2], base_url=server.url, **FAST)
    message = str(error.value)
    assert message.startswith("gldv2 part 2 (images_002.tar): md5 ") and f"does not match {'0' * 32}" in message
    assert "md5.images_002.txt" in message and "\n" not in message
    folder = tmp_path / "gldv2"
    assert not (folder / "images_002.tar").exists() and not (folder / "train").exists()
    assert not (folder / COMPLETE_MARKER).exists()


def test_cli_requires_parts_and_says_how_big(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_status:
        data_main(["download", "gldv2", "--root", str(tmp_path)])
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert "500 training TARs of about 1 GB each (about 500 GB in all): choose them with --parts" in err
    assert err.count("\n") == 1 and not (tmp_path / "gldv2").exists()
    with pytest.raises(SystemExit):
        data_main(["download", "oxford5k", "--root", str(tmp_path), "--parts", "1"])
    assert "--parts is for gldv2 and r1m only" in capsys.readouterr().err


def test_cli_downloads_the_parts_named(
    server: FileServer, miniature: MiniatureGldv2, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    serve(server, miniature)
    argv = ["download", "gldv2", "--root", str(tmp_path), "--base-url", server.url, "--parts", "0-1", "--no-progress"]
    assert data_main(argv) == 0
    assert "gldv2: parts 0-1 complete in" in capsys.readouterr().out
    assert json.loads((tmp_path / "gldv2" / COMPLETE_MARKER).read_text())["parts"] == [0, 1]


@pytest.mark.slow
def test_a_clean_csv_of_the_real_size_parses_in_seconds(tmp_path: Path) -> None:
    """81,313 landmarks, 1,580,470 images (the real train_clean.csv's counts): measured 1.4 s to arrays and 2.4 s
    to a Collection on the 2-core test machine; the bound leaves room for a loaded machine."""
    import time

    rng = np.random.default_rng(0)
    counts = rng.multinomial(1_580_470 - 81_313, np.ones(81_313) / 81_313) + 1
    ids = np.unique(rng.integers(0, 2**63 - 1, 1_600_000, dtype=np.int64)).astype(np.uint64)[: counts.sum()]
    text = np.array([f"{i:016x}" for i in rng.permutation(ids).tolist()])
    bounds = np.concatenate([[0], np.cumsum(counts)])
    lines = [f"{k + 1},{' '.join(text[bounds[k] : bounds[k + 1]].tolist())}" for k in range(len(counts))]
    write(tmp_path / "train_clean.csv", "landmark_id,images\n" + "\n".join(lines) + "\n")
    start = time.perf_counter()
    c = load_gldv2(tmp_path)
    assert time.perf_counter() - start < 15
    assert len(c) == 1_580_470 and c.num_classes == 81_313


# -- training through the real reader -------------------------------------------------------------------


def compose_gldv2_training(data: Path, tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    repo = Path(__file__).resolve().parents[2]
    with initialize_config_dir(str(repo / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.data_dir={data}", f"paths.log_dir={tmp_path / 'logs'}", "data=gldv2",
                "data.benchmark=gldv2:min3:val3:seed1", "backbone=scratch",
                "backbone.channels=[8,16]", "data.image_size=32", "data.eval_image_size=64",
                "data.classes_per_batch=3", "data.images_per_class=2", "data.batches_per_epoch=2",
                "data.num_workers=0", "data.eval_batch_size=8", "trainer.max_epochs=1", "logger=csv",
                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *overrides,
            ],
        )  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def test_data_gldv2_splits_the_downloaded_miniature_by_its_name(
    miniature: MiniatureGldv2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data=gldv2 data.download=true fetches the TARs of data.download_parts with the real downloader (from the
    miniature's file:// mirror) and builds the datamodule on the real reader: the landmarks of split train train,
    the val landmarks are the benchmark (each image a query against the others); load_benchmark reads the same
    name."""
    from hydra.utils import instantiate

    from oxford_ir.benchmarks import gldv2_download
    from oxford_ir.benchmarks.registry import load_benchmark

    data = tmp_path / "data"
    monkeypatch.setattr(gldv2_download, "BASE_URL", miniature.folder.as_uri())
    cfg = compose_gldv2_training(data, tmp_path, "data.download=true", "data.download_parts=0-1")
    module = instantiate(cfg.data)
    module.prepare_data()  # parts 0-1; then part 2 as a user adds it, the parts there kept
    assert json.loads((data / "gldv2" / COMPLETE_MARKER).read_text())["parts"] == [0, 1]
    download_gldv2(data, [0, 1, 2], base_url=miniature.folder.as_uri(), **FAST)
    module = instantiate(cfg.data)
    module.setup("fit")
    split = module._split
    collection = load_gldv2(data, min_images=3, val_landmarks=3, seed=1)
    val_names = set(collection.label_names[collection.labels[collection.split == 1]].tolist())
    assert set(split.label_names).isdisjoint(val_names) and len(split.label_names) == collection.num_classes - 3
    assert sorted(str(p) for p in split.paths) == sorted(
        str(p) for p in collection.image_paths(collection.rows("train"))
    )
    assert split.eval_benchmark.n_queries == int((collection.split == 1).sum()) == split.eval_benchmark.n_db
    benchmark = load_benchmark("gldv2:min3:val3:seed1", data)
    assert benchmark.n_queries == split.eval_benchmark.n_queries
    with pytest.raises(ConfigError, match="'val' is not an option"):
        load_benchmark("gldv2:val", data)


@pytest.mark.slow  # 20 s on the shared 2-core machine; the split is covered by the test above
def test_training_on_the_downloaded_miniature_through_data_gldv2(miniature: MiniatureGldv2, tmp_path: Path) -> None:
    """oxford-ir-train's train() on data=gldv2 over the miniature downloaded by the real downloader (file:// mirror)."""
    from oxford_ir.cli.train import train

    data = tmp_path / "data"
    download_gldv2(data, [0, 1, 2], base_url=miniature.folder.as_uri(), **FAST)
    metrics, objects = train(compose_gldv2_training(data, tmp_path))
    split = objects["datamodule"]._split
    collection = load_gldv2(data, min_images=3, val_landmarks=3, seed=1)
    val_names = set(collection.label_names[collection.labels[collection.split == 1]].tolist())
    assert set(split.label_names).isdisjoint(val_names) and len(split.label_names) == collection.num_classes - 3
    assert split.eval_benchmark.n_queries == int((collection.split == 1).sum())
    assert 0.0 <= metrics["final/val/mAP"] <= 1.0
