"""PathArray: many paths as one root and a numpy array of names, read like a list of Path; TrainSplit holds one."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from oxford_ir.benchmarks.path_array import PathArray
from oxford_ir.benchmarks.splits import TrainSplit


def test_reads_like_the_list_it_was_made_from(tmp_path: Path) -> None:
    paths = [tmp_path / "a" / "x.jpg", tmp_path / "a" / "b" / "y.jpg", tmp_path / "c" / "z.jpg"]
    array = PathArray.of(paths)
    assert array.root == tmp_path and array.names.tolist() == ["a/x.jpg", "a/b/y.jpg", "c/z.jpg"]
    assert list(array) == paths and array == paths and len(array) == 3
    assert array[1] == paths[1] and array[np.int64(2)] == paths[2] and array[-1] == paths[-1]
    assert array[1:] == paths[1:] and array[np.array([2, 0])] == [paths[2], paths[0]]
    assert array[np.array([True, False, True])] == [paths[0], paths[2]]
    assert pickle.loads(pickle.dumps(array)) == array and PathArray.of(array) is array
    names = np.array(["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    rows = PathArray(tmp_path, names, np.array([3, 1, 2]))  # a selection of a collection's rows: names not copied
    d, b, c = (tmp_path / n for n in ("d.jpg", "b.jpg", "c.jpg"))
    assert rows == [d, b, c] and len(rows) == 3 and rows[-1] == c and rows[np.int32(0)] == d
    assert rows[1:] == [b, c] and rows[np.array([True, False, True])] == [d, c] and rows[np.array([2, 2])] == [c, c]
    assert rows[1:].names is names and rows[np.array([0])].names is names
    assert pickle.loads(pickle.dumps(rows)) == rows
    mixed = PathArray.of(["rel/a.jpg", "/abs/b.jpg"])
    assert list(mixed) == [Path("rel/a.jpg"), Path("/abs/b.jpg")]
    assert PathArray.of([]) == [] and PathArray.of(["one.jpg"]) == [Path("one.jpg")]


def test_names_cost_a_third_of_a_list_of_paths() -> None:
    import tracemalloc

    hashes = [f"{x:016x}" for x in np.random.default_rng(0).integers(0, 2**63, 5_000)]
    names = np.array([f"train/{h[0]}/{h[1]}/{h[2]}/{h}.jpg" for h in hashes])  # the layout of GLDv2
    array = PathArray("/data/gldv2", names)
    assert array.names is names  # a collection's array is kept, not copied
    assert array[4_999] == Path("/data/gldv2") / names[-1]
    tracemalloc.start()
    try:
        as_list = [Path("/data/gldv2") / n for n in names.tolist()]
        _ = [str(p) for p in as_list]  # a Path keeps its string once asked for it
        per_path = tracemalloc.get_traced_memory()[0] / len(as_list)
    finally:
        tracemalloc.stop()
    assert names.nbytes / len(names) < per_path / 2.5  # 128 bytes against ~400


def test_train_split_holds_a_path_array_and_drops_by_mask(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.jpg" for i in range(5)]
    split = TrainSplit(
        kind="seed", paths=paths, labels=np.array([0, 0, 1, 1, 2]), label_names=["a", "b", "d"],
        num_landmark_classes=2, eval_benchmark=None, train_benchmark="t",  # type: ignore[arg-type]
    )  # fmt: skip
    assert isinstance(split.paths, PathArray) and split.paths == paths
    fewer = split.without(np.array([False, True, False, False, True]), "overlap", "2 overlapping images left out")
    assert fewer.paths == [paths[0], paths[2], paths[3]] and fewer.labels.tolist() == [0, 1, 1]
    assert fewer.dropped == {"overlap": 2} and fewer.description.endswith("2 overlapping images left out")
