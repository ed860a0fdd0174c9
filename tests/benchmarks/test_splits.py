"""Training splits against a brute-force recomputation from the ground truth, and their errors."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.registry import load_benchmark
from oxford_ir.benchmarks.splits import TrainSplit, build_split, full_ground_truth
from oxford_ir.errors import ConfigError, DataError, GroundTruthError


@pytest.fixture(scope="module", params=["synthetic", "rsynthetic"])
def bench(request: pytest.FixtureRequest, data_dir: Path) -> Benchmark:
    return load_benchmark(request.param, data_dir)


@pytest.fixture(scope="module")
def original(data_dir: Path) -> Benchmark:
    return load_benchmark("synthetic", data_dir)


# -- the reference: plain loops over the ground truth ------------------------------------------------


def reference(benchmark: Benchmark, evaluated_queries: set[str], held_out: set[str]) -> dict[str, str]:
    """Expected training images: name -> landmark, or "distractor", by the rules of the module doc."""
    positive_keys = ("ok",) if benchmark.protocol == "original" else ("easy", "hard")
    owners: dict[str, set[str]] = {name: set() for name in benchmark.imlist}
    junk: set[str] = set()
    touched_by_held_out: set[str] = set()
    for q, entry in enumerate(benchmark.gnd):
        landmark = benchmark.query_landmarks[q]
        for key in positive_keys:
            for i in entry[key]:
                owners[benchmark.imlist[i]].add(landmark)
        for i in entry["junk"]:
            junk.add(benchmark.imlist[i])
        if landmark in held_out:
            touched_by_held_out.add(benchmark.qimlist[q])
            for key in (*positive_keys, "junk"):
                touched_by_held_out.update(benchmark.imlist[i] for i in entry[key])
    expected = {}
    for name in benchmark.imlist:
        if name in junk or name in evaluated_queries or name in touched_by_held_out:
            continue
        if len(owners[name]) == 1:
            (landmark,) = owners[name]
            if landmark not in held_out:
                expected[name] = landmark
        elif not owners[name]:
            expected[name] = "distractor"
    return expected


def as_mapping(split: TrainSplit) -> dict[str, str]:
    names = [p.stem for p in split.paths]
    assert len(set(names)) == len(names), "a training image appears twice"
    return {
        name: "distractor" if label >= split.num_landmark_classes else split.label_names[label]
        for name, label in zip(names, split.labels, strict=True)
    }


# -- membership ---------------------------------------------------------------------------------------


def test_seed_split_matches_brute_force(bench: Benchmark) -> None:
    split = build_split("seed", bench)
    assert as_mapping(split) == reference(bench, set(bench.qimlist), set())
    assert not {p.stem for p in split.paths} & set(bench.qimlist)
    assert split.eval_benchmark is bench  # every query against the full database
    assert split.num_landmark_classes == len(set(bench.query_landmarks))
    assert "leaks landmark identity" in split.description


def test_labels_are_consistent(bench: Benchmark) -> None:
    split = build_split("seed", bench)
    landmark = ~split.is_distractor
    # landmark classes first, sorted by name, grouped; every distractor its own label after them
    assert split.label_names[: split.num_landmark_classes] == sorted(set(bench.query_landmarks))
    assert np.all(np.diff(split.labels[landmark]) >= 0)
    assert landmark[: landmark.sum()].all()
    distractor_labels = split.labels[split.is_distractor]
    assert len(np.unique(distractor_labels)) == len(distractor_labels) == split.num_distractors > 0
    assert split.num_classes == split.num_landmark_classes + split.num_distractors
    distractor_names = [p.stem for p, is_landmark in zip(split.paths, landmark, strict=True) if not is_landmark]
    assert [split.label_names[label] for label in distractor_labels] == distractor_names
    assert split.class_sizes().tolist() == [int((split.labels == c).sum()) for c in range(split.num_landmark_classes)]


def test_landmarks_split_by_name(bench: Benchmark) -> None:
    split = build_split("landmarks", bench, held_out_landmarks=["landmark_01", "landmark_03"])
    assert split.held_out_landmarks == ("landmark_01", "landmark_03")
    held_out_queries = {
        n for n, lm in zip(bench.qimlist, bench.query_landmarks, strict=True) if lm in split.held_out_landmarks
    }
    assert as_mapping(split) == reference(bench, held_out_queries, {"landmark_01", "landmark_03"})
    assert "landmark_01" not in split.label_names and "landmark_03" not in split.label_names
    # no positive or junk image of a held-out query is trained on, not even as a distractor
    training = {p.stem for p in split.paths}
    for q, landmark in enumerate(bench.query_landmarks):
        if landmark in split.held_out_landmarks:
            touched = np.concatenate([bench.positives(q), bench.gnd[q]["junk"]])
            assert not training & {bench.imlist[i] for i in touched}
            assert bench.qimlist[q] not in training
    # only the held-out queries are evaluated, against the whole database
    ev = split.eval_benchmark
    assert ev.qimlist == sorted(held_out_queries, key=bench.qimlist.index)
    assert set(ev.query_landmarks) == {"landmark_01", "landmark_03"}
    assert ev.imlist == bench.imlist and ev.is_subset and "held-out" in ev.subset_note
    for q, name in enumerate(ev.qimlist):
        assert np.array_equal(ev.positives(q), bench.positives(bench.qimlist.index(name)))


def test_landmarks_split_by_count_is_seeded(original: Benchmark) -> None:
    draws = {seed: build_split("landmarks", original, n_held_out=2, seed=seed).held_out_landmarks for seed in range(6)}
    assert all(len(h) == 2 and set(h) <= set(original.query_landmarks) for h in draws.values())
    assert build_split("landmarks", original, n_held_out=2, seed=3).held_out_landmarks == draws[3]
    assert len(set(draws.values())) > 1, "the seed does not change the held-out draw"


def test_without_distractors(original: Benchmark) -> None:
    split = build_split("seed", original, use_distractors=False)
    expected = {k: v for k, v in reference(original, set(original.qimlist), set()).items() if v != "distractor"}
    assert as_mapping(split) == expected
    assert split.num_distractors == 0 and split.num_classes == split.num_landmark_classes


def test_ambiguous_and_cross_landmark_junk_images_are_dropped(original: Benchmark) -> None:
    # make one image of landmark_00 also a positive of landmark_01 and another one junk for landmark_02
    members = build_split("seed", original).paths[:2]
    a, b = (original.imlist.index(p.stem) for p in members)
    gnd = [dict(entry) for entry in original.gnd]
    q1 = original.query_landmarks.index("landmark_01")
    q2 = original.query_landmarks.index("landmark_02")
    gnd[q1]["ok"] = np.union1d(gnd[q1]["ok"], [a])
    gnd[q2]["junk"] = np.union1d(gnd[q2]["junk"], [b])
    edited = replace(original, gnd=gnd)
    ambiguous = r"1 database images are positives of two landmarks.*landmark_00 \+ landmark_01"
    with pytest.warns(UserWarning, match=ambiguous):
        split = build_split("seed", edited)
    training = {p.stem for p in split.paths}
    assert original.imlist[a] not in training and original.imlist[b] not in training
    assert as_mapping(split) == reference(edited, set(edited.qimlist), set())


def test_cross_split(original: Benchmark, paris_root: Path) -> None:
    with pytest.warns(UserWarning):
        paris = load_benchmark("rparis6k", paris_root, allow_missing_images=True)
    split = build_split("cross", original, paris)
    assert split.eval_benchmark is paris
    assert as_mapping(split) == reference(original, set(), set())  # query images are trained on: not evaluated


def test_cross_split_refuses_shared_images(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"split=cross: \d+ training images of synthetic are also images of .*"):
        build_split("cross", load_benchmark("synthetic", data_dir), load_benchmark("rsynthetic", data_dir))


# -- errors ---------------------------------------------------------------------------------------------


def test_unknown_landmark_lists_the_valid_ones(original: Benchmark) -> None:
    with pytest.raises(ConfigError) as error:
        build_split("landmarks", original, held_out_landmarks=["landmark_07", "landmark_00"])
    message = str(error.value)
    assert "'landmark_07'" in message and "'landmark_00'" not in message
    assert "landmark_00, landmark_01, landmark_02, landmark_03, landmark_04" in message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "random"}, "unknown split 'random'; choose one of seed, landmarks, cross"),
        ({"kind": "landmarks"}, "needs held_out_landmarks .* or n_held_out"),
        ({"kind": "landmarks", "held_out_landmarks": ["landmark_00"], "n_held_out": 1}, "not both"),
        ({"kind": "landmarks", "n_held_out": 5}, "n_held_out=5 is too many: synthetic has 5 landmarks.*at most 4"),
        ({"kind": "landmarks", "n_held_out": 0}, "n_held_out must be a positive integer"),
        ({"kind": "seed", "n_held_out": 2}, "only apply to split=landmarks"),
        ({"kind": "cross"}, "split=cross needs an evaluation benchmark"),
    ],
)
def test_impossible_settings(original: Benchmark, kwargs: dict, match: str) -> None:
    kwargs = dict(kwargs)
    kind = kwargs.pop("kind")
    with pytest.raises(ConfigError, match=match):
        build_split(kind, original, **kwargs)


def test_holding_out_every_landmark(original: Benchmark) -> None:
    every = sorted(set(original.query_landmarks))
    with pytest.raises(ConfigError, match="none is left to train on"):
        build_split("landmarks", original, held_out_landmarks=every)


def test_empty_split(original: Benchmark) -> None:
    # every positive is also junk: nothing can be trained on
    gnd = [{**entry, "junk": np.union1d(entry["junk"], entry["ok"])} for entry in original.gnd]
    with pytest.raises(ConfigError, match=r"no training image is left"):
        build_split("seed", replace(original, gnd=gnd))


def test_queries_without_landmarks(original: Benchmark) -> None:
    with pytest.raises(GroundTruthError, match="does not name the landmark of each of its 10 queries"):
        build_split("seed", replace(original, query_landmarks=[]))


def test_evaluation_on_another_dataset_needs_cross(original: Benchmark, paris_root: Path) -> None:
    with pytest.warns(UserWarning):
        paris = load_benchmark("rparis6k", paris_root, allow_missing_images=True)
    with pytest.raises(ConfigError, match="shares no image .* use split=cross"):
        build_split("seed", original, paris)


# -- batch feasibility ----------------------------------------------------------------------------------


def test_classes_for_batches(original: Benchmark) -> None:
    split = build_split("seed", original)
    sizes = split.class_sizes()  # 6 photos - 1 junk = 5 per landmark (queries are left out)
    assert sizes.tolist() == [5] * 5
    assert split.classes_for_batches(5, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError) as error:
        split.classes_for_batches(3, 6)
    message = str(error.value)
    assert "images_per_class=6" in message and "only 0 have that many" in message
    assert "landmark_02: 5" in message and "lower images_per_class to at most 5" in message
    with pytest.raises(ConfigError, match="classes_per_batch=6 .* lower classes_per_batch to at most 5"):
        split.classes_for_batches(6, 4)
    with pytest.raises(ConfigError, match="images_per_class must be at least 2"):
        split.classes_for_batches(2, 1)


def test_small_classes_are_dropped_with_a_warning_when_enough_remain(original: Benchmark) -> None:
    split = build_split("seed", original)
    # shrink landmark_03 to 2 training images
    keep = np.flatnonzero(split.labels != 3)
    keep = np.sort(np.concatenate([keep, np.flatnonzero(split.labels == 3)[:2]]))
    small = replace(split, paths=[split.paths[i] for i in keep], labels=split.labels[keep])
    with pytest.warns(UserWarning, match=r"left out of training: landmark_03 \(2\)"):
        assert small.classes_for_batches(4, 3).tolist() == [0, 1, 2, 4]
    with pytest.raises(ConfigError, match=r"landmark_03: 2"):
        small.classes_for_batches(5, 3)


def test_restrict_to_available(original: Benchmark, tmp_path: Path) -> None:
    split = build_split("seed", original)
    assert split.restrict_to_available() is split and split.missing_images() == []
    gone = tmp_path / "gone.jpg"
    moved = replace(split, paths=[gone, *split.paths[1:]])
    assert moved.missing_images() == [gone]
    with pytest.warns(UserWarning, match="1 of .* training images are missing"):
        present = moved.restrict_to_available()
    assert present.paths == split.paths[1:] and np.array_equal(present.labels, split.labels[1:])
    assert present.dropped["missing"] == 1
    nowhere = replace(split, paths=[tmp_path / f"{i}.jpg" for i in range(len(split))])
    with pytest.raises(DataError, match="none of the .* landmark training images is on disk"):
        nowhere.restrict_to_available()


def test_real_revisited_paris_ground_truth(paris_root: Path) -> None:
    """The full Revisited Paris ground truth (6322 images): the same rules hold on the real thing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = full_ground_truth(load_benchmark("rparis6k", paris_root, allow_missing_images=True))
        split = build_split("landmarks", full, held_out_landmarks=["eiffel"])
    assert full.n_db == 6322 and full.n_queries == 70
    held_out_queries = {n for n, lm in zip(full.qimlist, full.query_landmarks, strict=True) if lm == "eiffel"}
    assert as_mapping(split) == reference(full, held_out_queries, {"eiffel"})
    assert split.num_landmark_classes == 10 and "eiffel" not in split.label_names
    assert set(split.eval_benchmark.query_landmarks) == {"eiffel"}
