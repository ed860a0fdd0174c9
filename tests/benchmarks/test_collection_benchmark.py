"""A collection as a benchmark and as a training split; recall@k against a brute-force reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.collection import Collection
from oxford_ir.benchmarks.collection_benchmark import collection_benchmark, collection_dataset
from oxford_ir.benchmarks.collection_split import check_split_settings, collection_split, labelled_gallery
from oxford_ir.benchmarks.metrics import compute_recall, evaluate_ranks
from oxford_ir.benchmarks.registry import dataset_folder, load_benchmark
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.retrieval.image_sources import resolve_images
from oxford_ir.retrieval.report import format_table


def write_photo(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(path)


def recall_by_brute_force(ranks: np.ndarray, gnd: list[dict], k: int) -> float:
    """Mean over queries with positives of [a positive among the first k of the ranking with junk removed]."""
    hits = []
    for q, entry in enumerate(gnd):
        ok, junk = set(np.asarray(entry["ok"]).tolist()), set(np.asarray(entry.get("junk", [])).tolist())
        if not ok:
            continue
        kept = [i for i in ranks[:, q].tolist() if i not in junk]
        hits.append(float(any(i in ok for i in kept[:k])))
    return float(np.mean(hits))


def test_recall_at_k_equals_a_brute_force_reference():
    rng = np.random.default_rng(0)
    n_db, n_q = 30, 25
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd = []
    for q in range(n_q):
        chosen = rng.permutation(n_db)
        n_ok, n_junk = (0 if q % 7 == 3 else int(rng.integers(1, 4))), int(rng.integers(0, 6))
        gnd.append({"ok": chosen[:n_ok], "junk": chosen[n_ok : n_ok + n_junk]})
    kappas = (1, 2, 5, 10)
    means, per_query = compute_recall(ranks, gnd, kappas)
    for i, k in enumerate(kappas):
        assert means[i] == pytest.approx(recall_by_brute_force(ranks, gnd, k))
    assert np.isnan(per_query[3]).all() and not np.isnan(per_query[0]).any()  # no positive: left out
    # junk ranked above the only positive does not count: the positive is then first
    hand = [{"ok": [2], "junk": [0, 1]}]
    assert compute_recall(np.array([[0], [1], [2], [3]]), hand, (1,))[0][0] == 1.0
    assert compute_recall(np.array([[0], [3], [2], [1]]), hand, (1, 2))[0].tolist() == [0.0, 1.0]
    metrics, _ = evaluate_ranks(ranks, gnd, "original", kappas, extra_metrics=("recall",))
    assert [metrics[f"R@{k}"] for k in kappas] == pytest.approx(means)
    # Oxford and Paris report exactly what they did: no R@k unless a benchmark asks for it
    assert not any(key.startswith("R@") for key in evaluate_ranks(ranks, gnd, "original", kappas)[0])
    assert "R@1" not in format_table({"oxford5k": evaluate_ranks(ranks, gnd, "original")[0]})
    assert "R@1" in format_table({"photos": metrics}, kappas=kappas)


def small_collection(root: Path = Path("/photos"), **columns) -> Collection:
    """a: rows 0-2 train, 3-4 val; b: rows 5-7 train, 8 val (query only), 9 val (gallery only); c: row 10 val."""
    paths = [f"{label}/{i}.png" for i, label in enumerate("aaaaabbbbbc")]
    split = ["train"] * 3 + ["val"] * 2 + ["train"] * 3 + ["val"] * 3
    return Collection.from_rows("small", root, root / "list.csv", paths, list("aaaaabbbbbc"), split=split, **columns)


def on_disk(collection: Collection) -> Collection:
    """``collection`` with an (empty) file for each image: a split checks that its evaluated images exist."""
    for path in collection.image_paths():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return collection


def test_a_split_becomes_a_benchmark_with_the_query_itself_and_its_ignored_rows_as_junk():
    is_query = [True] * 9 + [False, True]
    is_gallery = [True] * 8 + [False, True, True]
    boxes = np.full((11, 4), np.nan, np.float32)
    boxes[8] = [1, 2, 30, 40]
    collection = small_collection(is_query=is_query, is_gallery=is_gallery, boxes=boxes, ignore={3: [4]})
    with pytest.warns(UserWarning, match="2 of the 4 queries of the val split have no other image"):
        benchmark = collection_benchmark(collection, "val")
    # gallery of val: rows 3, 4, 9, 10; queries: rows 3, 4, 8, 10
    assert benchmark.imlist == ["a/3.png", "a/4.png", "b/9.png", "c/10.png"]
    assert benchmark.qimlist == ["a/3.png", "a/4.png", "b/8.png", "c/10.png"]
    assert benchmark.query_landmarks == ["a", "a", "b", "c"]
    expected = [([], [0, 1]), ([0], [1]), ([2], []), ([], [3])]  # row 3 ignores row 4: no positive left
    for entry, (ok, junk) in zip(benchmark.gnd, expected, strict=True):
        assert entry["ok"].tolist() == ok and entry["junk"].tolist() == junk
    assert benchmark.query_bboxes == [None, None, (1.0, 2.0, 30.0, 40.0), None]
    assert benchmark.image_path("b/9.png") == collection.root / "b" / "9.png"  # names keep their folders
    assert benchmark.protocol == "original" and benchmark.extra_metrics == ("recall",)
    assert benchmark.dataset == collection_dataset("/photos/list.csv") == dataset_folder("collection:/photos/list.csv")
    ranks = np.array([[3, 1, 2, 0]] * 4).T  # every query ranks c, a/4, b/9, a/3
    metrics = benchmark.evaluate(ranks)
    # scored: query 1 (a/4: a/3 at rank 3, itself junk -> rank 2 -> R@1 0, AP 1/3), query 2 (b/8: b/9 at rank 2)
    assert metrics["R@1"] == 0.0 and metrics["R@5"] == 1.0
    assert metrics["mAP"] == pytest.approx(np.mean([(0 / 2 + 1 / 3) / 2, (0 / 2 + 1 / 3) / 2]))
    with pytest.raises(DataError, match="no query of the train split has another image"):
        only = [True] + [False] * 10  # the train split's one query is its one gallery image
        collection_benchmark(small_collection(is_query=only, is_gallery=only), "train")


def other_benchmark() -> Benchmark:
    return Benchmark("other", "/o", "original", ["x"], ["x"], [{"ok": [0]}], "/o/gt", "/o")


def test_training_split_uses_val_then_test_then_held_out_classes_and_never_an_evaluated_image(tmp_path):
    collection = on_disk(small_collection(tmp_path))
    with pytest.warns(UserWarning, match="1 of the 5 queries of the val split"):  # c has one image
        split = collection_split(collection)
    assert split.kind == "collection" and split.train_benchmark == f"collection:{tmp_path / 'list.csv'}"
    assert [p.name for p in split.paths] == ["0.png", "1.png", "2.png", "5.png", "6.png", "7.png"]
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 1] and split.label_names == ["a", "b"]
    assert split.num_distractors == 0 and split.eval_benchmark.n_queries == 5
    assert not {str(p) for p in split.paths} & {str(p) for p in split.eval_benchmark.db_paths}
    # val/loss draws from the evaluated images with their class: a/3, a/4 (a), b/8, b/9 (b); c/10 has no positive
    labelled = labelled_gallery(split.eval_benchmark)
    assert [(p.name, label) for p, label in zip(labelled.paths, labelled.labels, strict=True)] == [
        ("3.png", 0), ("4.png", 0), ("8.png", 1), ("9.png", 1)
    ]  # fmt: skip
    assert labelled.label_names == ["a", "b", "c"] and labelled_gallery(other_benchmark()) is None
    # test split when there is no val split
    as_test = Collection.from_rows(
        "t", tmp_path, tmp_path, collection.paths, collection.label_names[collection.labels],
        split=np.where(collection.split == 1, "test", "train"),
    )  # fmt: skip
    with pytest.warns(UserWarning, match="of the test split"):
        assert collection_split(as_test).eval_benchmark.qimlist == split.eval_benchmark.qimlist
    # all train: classes held out as the landmarks split holds out landmarks, evaluated among themselves
    everything = Collection.from_rows(
        "all", tmp_path, tmp_path, collection.paths, collection.label_names[collection.labels]
    )
    held = collection_split(everything, held_out_landmarks=["b"])
    assert held.held_out_landmarks == ("b",) and held.label_names == ["a", "c"]
    assert held.eval_benchmark.imlist == ["b/5.png", "b/6.png", "b/7.png", "b/8.png", "b/9.png"]
    assert held.dropped == {"held_out": 5} and len(held) == 6
    drawn = [collection_split(everything, n_held_out=1, seed=s).held_out_landmarks for s in range(6)]
    assert set(drawn) == {("a",), ("b",)}  # c has one image: it cannot be evaluated, so it is never drawn
    with pytest.raises(ConfigError, match="data.n_held_out"):
        collection_split(everything)
    with pytest.raises(ConfigError, match="unknown landmark"):
        collection_split(everything, held_out_landmarks=["zebra"])
    # another benchmark evaluated: every train row trains
    other = other_benchmark()
    assert len(collection_split(collection, other)) == 6 and collection_split(collection, other).eval_benchmark is other


def test_collection_names_load_from_a_folder_and_are_checked(tmp_path, monkeypatch):
    rows = [f"class_{c}/sub/{i}.png" for c in range(2) for i in range(2)]
    for i, row in enumerate(rows):
        write_photo(tmp_path / "photos" / row, seed=i)
    monkeypatch.chdir(tmp_path)  # a relative path is relative to the current folder
    benchmark = load_benchmark("collection:photos", tmp_path / "data")
    assert benchmark.n_db == benchmark.n_queries == 4 and benchmark.qimlist[0] == "class_0/sub/0.png"
    assert all(p.is_file() for p in benchmark.db_paths)
    # the index's benchmark: source reads the same images, names with their sub-folders
    source = resolve_images("benchmark:collection:photos", tmp_path / "data")
    assert source.paths == benchmark.imlist and source.root == (tmp_path / "photos").resolve()
    # a manifest lists images that may go missing: one line, or the images present when allowed
    manifest = tmp_path / "photos" / "list.csv"
    manifest.write_text("path,label\n" + "".join(f"{row},{row.split('/')[0]}\n" for row in rows))
    assert load_benchmark(f"collection:{manifest}", tmp_path).imlist == rows
    (tmp_path / "photos" / rows[-1]).unlink()
    with pytest.raises(DataError, match="1 of 4 database and query images are missing") as error:
        load_benchmark(f"collection:{manifest}", tmp_path)
    assert "\n" not in str(error.value) and "remove them from" in str(error.value)
    with pytest.warns(UserWarning, match="dropped 1 missing database images"):
        assert load_benchmark(f"collection:{manifest}", tmp_path, allow_missing_images=True).n_db == 3
    with pytest.raises(DataError, match="nowhere does not exist"):
        load_benchmark("collection:nowhere", tmp_path)
    with pytest.raises(ConfigError, match="give the collection's folder"):
        load_benchmark("collection:", tmp_path)


@pytest.mark.parametrize(
    ("split", "benchmark", "eval_benchmark", "message"),
    [
        ("landmarks", "collection:/p", None, "is a collection: its split is read from it"),
        ("collection", "oxford5k", None, "data.split=collection needs data.benchmark=collection:"),
        ("cross", "paris6k", None, "data.split=cross trains on paris6k"),
        ("random", "oxford5k", None, "data.split='random' is unknown"),
        ("collection", "collection:/p", "oxford105k", "unknown benchmark 'oxford105k'"),
        ("seed", "/data/photos", None, "a folder or manifest is named collection:/data/photos"),
    ],
)
def test_split_settings_are_checked_together(split, benchmark, eval_benchmark, message):
    with pytest.raises(ConfigError, match=message):
        check_split_settings(split, benchmark, eval_benchmark)
    check_split_settings("collection", "collection:/p", "roxford5k")  # a collection evaluated on Oxford
