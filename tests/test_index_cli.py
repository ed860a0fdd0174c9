"""oxford-ir-index: Hydra config -> build_index -> summary; the console entry point once, for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from oxford_ir.cli.index import index
from oxford_ir.errors import CheckpointError, ConfigError, DataError
from oxford_ir.retrieval.index_format import RetrievalIndex

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["backbone=scratch", "backbone.channels=[8,16]"]


def compose_index(tmp_path: Path, *overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(
            "index",
            overrides=[
                f"paths.data_dir={tmp_path / 'data'}",
                f"paths.output_dir={tmp_path / 'run'}",
                "extraction.image_size=32",
                "extraction.num_workers=0",
                "extraction.device=cpu",
                "progress=false",
                *TINY_MODEL,
                *overrides,
            ],
        )


def write_photos(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(folder / f"p{i}.png")


def test_index_command_builds_updates_and_summarises(tmp_path, capsys):
    write_photos(tmp_path / "photos", 5)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = tmp_path / "index"
    report = index(compose_index(tmp_path, f"images={tmp_path / 'photos'}", f"out={out}", "index.dtype=float32"))
    printed = capsys.readouterr().out
    assert f"index: {out} (v000001: 5 images x 16 dims, float32)" in printed
    assert "added 5, updated 0, removed 0, kept 0, skipped 1 in" in printed and "images/s" in printed
    assert "  broken.jpg: " in printed and f"report: {out / 'report.json'}" in printed
    assert report.count == 5 and RetrievalIndex.load(out).dtype == "float32"

    (tmp_path / "photos" / "p0.png").unlink()
    index(compose_index(tmp_path, f"images={tmp_path / 'photos'}", f"out={out}", "index.dtype=float32"))
    assert "added 0, updated 0, removed 1, kept 4, skipped 1" in capsys.readouterr().out


def test_index_command_with_a_benchmark_and_multi_scale(tmp_path, capsys):
    from oxford_ir.benchmarks.registry import load_benchmark
    from oxford_ir.benchmarks.synthetic import SYNTHETIC_PRESETS, write_synthetic_benchmark

    write_synthetic_benchmark(tmp_path / "data" / "synthetic", **SYNTHETIC_PRESETS["tiny"])
    out = tmp_path / "index"
    index(compose_index(tmp_path, "images=benchmark:synthetic", f"out={out}", "extraction.scales=[1.0,0.707]"))
    loaded = RetrievalIndex.load(out)
    assert len(loaded) == load_benchmark("synthetic", tmp_path / "data").n_db
    assert loaded.scales == [1.0, 0.707] and loaded.manifest["images"]["source"] == "benchmark:synthetic"


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["out=x"], ConfigError, "images= is required"),
        (["images=photos"], ConfigError, "out= is required"),
        (["images={tmp}/nope", "out={tmp}/index"], DataError, "no such folder or file"),
        (["images={tmp}/photos", "out={tmp}/photos/p0.png"], ConfigError, "is a file"),
        (["images={tmp}/photos", "out={tmp}/index", "ckpt_path={tmp}/none.ckpt"], CheckpointError, "no such file"),
        (["images={tmp}/photos", "out={tmp}/index", "index.dtype=int8"], ConfigError, "float16"),
        (["images={tmp}/photos", "out={tmp}/index", "extraction.image_size=big"], ConfigError, "image_size"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, overrides, error, match):
    write_photos(tmp_path / "photos", 1)
    cfg = compose_index(tmp_path, *(o.format(tmp=tmp_path) for o in overrides))
    with pytest.raises(error, match=match):
        index(cfg)


def test_console_entry_point_indexes_and_reports_bad_input_in_one_line(tmp_path):
    write_photos(tmp_path / "photos", 3)
    common = [*TINY_MODEL, "extraction.image_size=32", "extraction.num_workers=0", "progress=false"]
    run = [sys.executable, "-m", "oxford_ir.cli.index", f"hydra.run.dir={tmp_path / 'run'}", *common]
    ok = subprocess.run(
        [*run, f"images={tmp_path / 'photos'}", f"out={tmp_path / 'index'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=180,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "added 3, updated 0, removed 0, kept 0, skipped 0" in ok.stdout
    assert len(RetrievalIndex.load(tmp_path / "index")) == 3

    bad = subprocess.run(
        [*run, f"images={tmp_path / 'missing'}", f"out={tmp_path / 'index'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=180,
    )  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"images={tmp_path / 'missing'}: no such folder or file" in errors[0]
    assert len(RetrievalIndex.load(tmp_path / "index")) == 3  # the existing index is untouched
