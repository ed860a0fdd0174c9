"""verify: missing and undecodable images of a benchmark, on gt files written here and on the real data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oxford_ir.benchmarks.registry import load_listed_benchmark
from oxford_ir.benchmarks.verify import VerifyReport, verify_benchmark
from oxford_ir.errors import ConfigError, GroundTruthError

#: database images of the miniature benchmark, in imlist order
DB = [
    "all_souls_000001",
    "all_souls_000002",
    "all_souls_000003",
    "radcliffe_camera_000001",
    "radcliffe_camera_000002",
    "oxford_000001",
]
MISSING = "all_souls_000003"  # a good image of query 1, not on disk
CORRUPT = "radcliffe_camera_000002"  # a truncated JPEG
GARBAGE = "oxford_000001"  # not an image at all


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_benchmark(folder: Path, *, missing: bool = True, corrupt: bool = True) -> Path:
    """A two-query Oxford-style benchmark in the gt text format, with ``imlist.txt`` and ``jpg/``."""
    gt = folder / "gt_files_170407"
    gt.mkdir(parents=True)
    files = {
        "all_souls_1_query.txt": "oxc1_all_souls_000001 2.0 3.0 20.0 25.0\n",
        "all_souls_1_good.txt": "all_souls_000002\nall_souls_000003\n",
        "all_souls_1_ok.txt": "",
        "all_souls_1_junk.txt": "oxford_000001\n",
        "radcliffe_camera_1_query.txt": "oxc1_radcliffe_camera_000001 0 0 31 31\n",
        "radcliffe_camera_1_good.txt": "",
        "radcliffe_camera_1_ok.txt": "radcliffe_camera_000002\n",
        "radcliffe_camera_1_junk.txt": "",
    }
    for name, text in files.items():
        (gt / name).write_text(text)
    (folder / "imlist.txt").write_text("\n".join(DB) + "\n")
    jpg = folder / "jpg"
    jpg.mkdir()
    for i, name in enumerate(DB):
        data = jpeg_bytes(i)
        if name == MISSING and missing:
            continue
        if name == CORRUPT and corrupt:
            data = data[: len(data) // 2]
        if name == GARBAGE and corrupt:
            data = b"this is not a JPEG"
        (jpg / f"{name}.jpg").write_bytes(data)
    return folder


def test_report_lists_missing_and_undecodable_images(tmp_path: Path) -> None:
    folder = write_benchmark(tmp_path / "oxford5k")
    benchmark = load_listed_benchmark("oxford5k", tmp_path)
    report = verify_benchmark(benchmark, workers=2)

    assert isinstance(report, VerifyReport)
    assert (report.n_db, report.n_queries, report.n_checked) == (6, 2, 5)
    assert report.missing_db == [folder / "jpg" / f"{MISSING}.jpg"]
    assert report.missing_queries == []
    assert report.missing == [folder / "jpg" / f"{MISSING}.jpg"]
    assert [path for path, _ in report.undecodable] == [
        folder / "jpg" / f"{CORRUPT}.jpg",
        folder / "jpg" / f"{GARBAGE}.jpg",
    ]
    assert "truncated" in report.undecodable[0][1]
    assert not report.ok and not report.passed() and not report.passed(allow_missing=True)

    text = report.format()
    assert "6 database images, 2 query images listed" in text
    assert "missing: 1 database, 0 query" in text and f"{MISSING}.jpg" in text
    assert "undecodable: 2 of 5 images on disk" in text and f"{CORRUPT}.jpg" in text
    assert text.splitlines()[-1].startswith("  FAILED")


def test_missing_query_image_counts_in_both_roles(tmp_path: Path) -> None:
    folder = write_benchmark(tmp_path / "oxford5k", missing=False, corrupt=False)
    (folder / "jpg" / "radcliffe_camera_000001.jpg").unlink()  # query 2, also a database image
    report = verify_benchmark(load_listed_benchmark("oxford5k", folder))
    path = folder / "jpg" / "radcliffe_camera_000001.jpg"
    assert report.missing_db == [path] and report.missing_queries == [path] and report.missing == [path]
    assert report.undecodable == [] and report.n_checked == 5
    assert report.passed(allow_missing=True) and not report.passed()
    assert "OK (subset)" in report.format(allow_missing=True)


def test_clean_benchmark_passes(tmp_path: Path) -> None:
    write_benchmark(tmp_path / "oxford5k", missing=False, corrupt=False)
    report = verify_benchmark(load_listed_benchmark("oxford5k", tmp_path / "oxford5k"), workers=1)
    assert report.ok and report.passed() and report.n_checked == 6
    assert report.format().splitlines()[-1] == "  OK: every listed image is present and decodable"


def test_long_lists_are_cut(tmp_path: Path) -> None:
    write_benchmark(tmp_path / "oxford5k", corrupt=False)
    for name in DB[:4]:
        (tmp_path / "oxford5k" / "jpg" / f"{name}.jpg").unlink(missing_ok=True)
    text = verify_benchmark(load_listed_benchmark("oxford5k", tmp_path)).format(max_listed=2)
    assert "missing: 4 database, 2 query (4 distinct files)" in text
    assert "... and 2 more" in text


def test_listed_benchmark_refuses_the_wrong_protocol_and_unknown_names(tmp_path: Path) -> None:
    folder = write_benchmark(tmp_path / "oxford5k")
    with pytest.raises(GroundTruthError, match="original-protocol ground truth, but roxford5k uses the revisited"):
        load_listed_benchmark("roxford5k", tmp_path, gt_file=folder / "gt_files_170407")
    with pytest.raises(ConfigError, match="unknown benchmark 'oxford105k'"):
        load_listed_benchmark("oxford105k", tmp_path)


@pytest.mark.shared_data
def test_real_oxford_subset(oxford_root: Path) -> None:
    """README of ../shared/oxford5k: 5063 listed images, 55 queries; 12 images on disk of which 11 are queries."""
    report = verify_benchmark(load_listed_benchmark("oxford5k", oxford_root))
    assert (report.n_db, report.n_queries, report.n_checked) == (5063, 55, 12)
    assert (len(report.missing_db), len(report.missing_queries)) == (5063 - 12, 55 - 11)
    assert report.undecodable == []
    assert report.passed(allow_missing=True) and not report.passed()
