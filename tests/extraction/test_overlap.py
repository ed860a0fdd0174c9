"""The train/test overlap guard against planted copies and brute force, and data.exclude_overlap on a split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import oxford_ir.extraction.overlap as overlap
from oxford_ir.benchmarks.registry import load_benchmark
from oxford_ir.benchmarks.splits import TrainSplit
from oxford_ir.benchmarks.synthetic import write_synthetic_benchmark
from oxford_ir.data.datamodule import RetrievalDataModule
from oxford_ir.data.overlap_exclusion import OverlapSettings, exclude_overlap
from oxford_ir.errors import ConfigError
from oxford_ir.extraction.overlap import EvaluatedImages, Thumbnail, find_overlap, similar_pairs
from tests.benchmarks.conftest import TINY


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny synthetic benchmark as the evaluated one; training images: every image of another synthetic
    benchmark (clean), 3 byte-identical copies and 3 near copies (re-encoded at JPEG quality 60, 90% size) of
    evaluated images, shuffled."""
    root = tmp_path_factory.mktemp("overlap")
    write_synthetic_benchmark(root / "synthetic", **TINY)
    write_synthetic_benchmark(root / "clean", **{**TINY, "seed": 1})
    evaluated = load_benchmark("synthetic", root)
    images = EvaluatedImages.of([evaluated])
    copies = root / "train"
    copies.mkdir()
    exact, near = {}, {}
    distractor = next(i for i, landmarks in enumerate(images.landmarks) if not landmarks)
    for k, e in enumerate([0, 17, distractor]):  # a landmark image, another, a distractor
        target = copies / f"copy_{k}.jpg"
        shutil.copyfile(images.paths[e], target)
        exact[target] = e
    for k, e in enumerate([3, 9, 30]):
        image = Image.open(images.paths[e]).convert("RGB")
        target = copies / f"near_{k}.jpg"
        image.resize((round(image.width * 0.9), round(image.height * 0.9)), Image.BICUBIC).save(target, quality=60)
        near[target] = e
    clean = sorted((root / "clean").rglob("*.jpg"))
    train = [*clean, *exact, *near]
    order = np.random.default_rng(0).permutation(len(train))
    return {"benchmark": evaluated, "images": images, "train": [train[i] for i in order], "exact": exact, "near": near}


def test_finds_exactly_the_planted_copies(planted: dict) -> None:
    train, images = planted["train"], planted["images"]
    report = find_overlap(train, [planted["benchmark"]], {"threshold": 0.95})
    found = {(train[t], int(e), bool(x)) for t, e, x in zip(report.train, report.evaluated, report.exact, strict=True)}
    expected = {(p, e, True) for p, e in planted["exact"].items()} | {(p, e, False) for p, e in planted["near"].items()}
    assert found == expected
    assert report.overlapping.sum() == 6 and all(report.overlapping[train.index(p)] for p, _, _ in expected)
    assert (report.similarity[report.exact] == 1).all() and (report.similarity[~report.exact] >= 0.95).all()
    # per evaluated landmark: the planted copies of its images (the distractor copy has no landmark)
    counts: dict[str, dict[str, int]] = {}
    for kind, copies in (("exact", planted["exact"]), ("near", planted["near"])):
        for e in copies.values():
            for landmark in images.landmarks[e] or (overlap.NO_LANDMARK,):
                counts.setdefault(landmark, {"exact": 0, "near": 0})[kind] += 1
    assert report.per_landmark() == counts and overlap.NO_LANDMARK in counts
    summary = json.loads(json.dumps(report.summary()))
    assert summary["exact"] == 3 and summary["near"] == 3 and summary["overlapping"] == 6
    assert summary["pairs"][0]["exact"] and summary["pairs"][0]["evaluated"].startswith("synthetic/")
    assert summary["settings"]["threshold"] == 0.95


def test_exact_copies_hash_only_files_of_an_evaluated_size(planted: dict, monkeypatch, tmp_path: Path) -> None:
    images = planted["images"]
    same_size = tmp_path / "same_size.jpg"  # the size of an evaluated file, other bytes: hashed, no copy
    data = bytearray(images.paths[5].read_bytes())
    data[-3] ^= 0xFF
    same_size.write_bytes(bytes(data))
    hashed: list[Path] = []
    real = overlap.file_sha256
    monkeypatch.setattr(overlap, "file_sha256", lambda p: hashed.append(Path(p)) or real(p))
    train = [*planted["train"], same_size, tmp_path / "missing.jpg"]
    ti, ej = overlap.exact_copies(train, images.paths)
    assert sorted(zip((train[t] for t in ti), ej.tolist(), strict=True)) == sorted(planted["exact"].items())
    sizes = {p.stat().st_size for p in images.paths}
    train_hashed = [p for p in hashed if p not in set(images.paths)]
    assert sorted(train_hashed) == sorted(p for p in train if p.is_file() and p.stat().st_size in sizes)
    assert same_size in train_hashed and len(train_hashed) < len(train) / 3


def test_block_similarities_equal_the_full_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(301, 8, generator=g), dim=1)
    evaluated = torch.nn.functional.normalize(torch.randn(57, 8, generator=g), dim=1)
    full = (train @ evaluated.T).numpy()
    expected_i, expected_j = np.nonzero(full >= 0.8)
    assert 20 < len(expected_i) < 2000
    for rows, block_bytes in ((301, 4 * 57 * 7), (40, 1), (301, 64 << 20)):  # 7 rows, 1 row (the floor), all rows
        i, j, s = similar_pairs(train[:rows], evaluated, 0.8, block_bytes=block_bytes)
        first = expected_i < rows
        assert np.array_equal(i, expected_i[first]) and np.array_equal(j, expected_j[first])
        np.testing.assert_allclose(s, full[expected_i[first], expected_j[first]], rtol=0, atol=1e-6)
    assert len(similar_pairs(train[:0], evaluated, 0.8)[0]) == 0


def test_thumbnail_pools_each_padded_image_over_its_own_region() -> None:
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 5, 6), size=(37, 50), mode="bilinear")  # a smooth image
    padded = torch.zeros(2, 3, 64, 64)
    padded[0, :, :37, :50] = image[0]
    padded[1] = torch.rand(3, 64, 64) * 5  # another image: must not change the first one's embedding
    model = Thumbnail(8)
    alone = model(image, torch.tensor([[37, 50]]))
    together = model(padded, torch.tensor([[37, 50], [64, 64]]))
    torch.testing.assert_close(together[:1], alone, rtol=0, atol=1e-5)
    assert together.shape == (2, 192) and torch.allclose(together.norm(dim=1), torch.ones(2))
    # close to plain cell means: the sampled pooling is an area average
    plain = model(image)
    assert float((plain * alone).sum()) > 0.97


def _split(paths: list[Path], labels: list[int], kind: str, benchmark) -> TrainSplit:
    n_landmarks = len(set(labels)) - sum(1 for x in labels if labels.count(x) == 1)
    return TrainSplit(kind, paths, np.array(labels), [str(x) for x in sorted(set(labels))], n_landmarks, benchmark, "t")


def test_exclude_overlap_drops_images_or_their_classes(planted: dict) -> None:
    benchmark, train = planted["benchmark"], planted["train"]
    labels = [i % 5 for i in range(len(train))]
    split = _split(train, labels, "cross", benchmark)
    copies = {*planted["exact"], *planted["near"]}
    report = find_overlap(train, [benchmark], {"threshold": 0.95})

    def find(paths, benchmarks, settings: OverlapSettings):  # the guard's answer, found once
        assert list(paths) == train and benchmarks == [benchmark] and settings.threshold == 0.95
        return report

    kept, summary = exclude_overlap(split, True, find, {"threshold": 0.95})
    assert set(kept.paths) == set(train) - copies and kept.dropped == {"overlap": 6}
    assert summary["dropped"] == 6 and summary["exclude_overlap"] is True
    classes = {labels[train.index(p)] for p in copies}
    kept, summary = exclude_overlap(split, "landmarks", find, None)
    assert set(kept.paths) == {p for p, label in zip(train, labels, strict=True) if label not in classes}
    kept, summary = exclude_overlap(split, "report", find, None)
    assert kept is split and summary["overlapping"] == 6 and summary["dropped"] == 0
    assert exclude_overlap(split, False, None, None) == (split, None)
    with pytest.raises(ConfigError, match="seed split trains on synthetic's own database"):
        exclude_overlap(_split(train, labels, "seed", benchmark), True, find_overlap, None)
    with pytest.raises(ConfigError, match="needs the overlap guard"):
        exclude_overlap(split, True, None, None)
    with pytest.raises(ConfigError, match="data.exclude_overlap='yes': choose false, report, true or landmarks"):
        exclude_overlap(split, "yes", find_overlap, None)
    with pytest.raises(ConfigError, match=r"data.overlap.treshold is not a setting"):
        OverlapSettings.from_config({"treshold": 0.9})
    with pytest.raises(ConfigError, match=r"data.overlap.threshold=1.5: a cosine similarity in \(0, 1\]"):
        OverlapSettings.from_config({"threshold": 1.5})


def test_the_data_module_drops_the_overlap_before_the_sampler(planted: dict, monkeypatch) -> None:
    train = planted["train"]
    labels = [i % 5 for i in range(len(train))]
    split = _split(train, labels, "cross", planted["benchmark"])
    monkeypatch.setattr(RetrievalDataModule, "_make_split", lambda self: split)
    data_dir = planted["benchmark"].root.parent
    dm = RetrievalDataModule(data_dir, classes_per_batch=2, images_per_class=2, distractors_per_batch=0,
                             exclude_overlap=True, overlap={"threshold": 0.95}, num_workers=0)  # fmt: skip
    with pytest.raises(ConfigError, match="needs the overlap guard"):
        dm.setup("fit")
    dm.overlap_guard.finder = find_overlap  # what oxford-ir-train attaches
    dm.setup("fit")
    copies = {*planted["exact"], *planted["near"]}
    assert len(dm.train_split) == len(train) - 6 and not copies & set(dm.train_split.paths)
    drawn = {dm.train_split.paths[i] for i in dm.train_sampler().batches(0).ravel().tolist()}
    assert drawn and not drawn & copies
    metrics = dm.overlap_guard.metrics()
    assert metrics["overlap/exact"] == 3 and metrics["overlap/near"] == 3 and metrics["overlap/dropped"] == 6
    assert metrics["overlap/threshold"] == 0.95 and metrics[f"overlap/{overlap.NO_LANDMARK}/exact"] == 1
    with pytest.raises(ConfigError, match="data.exclude_overlap='all': choose false, report, true or landmarks"):
        RetrievalDataModule(data_dir, exclude_overlap="all")
