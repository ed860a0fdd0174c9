"""prepare_benchmark: the one preparation of evaluation and training (synthetic presets, missing real datasets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from oxford_ir.benchmarks.prepare import prepare_benchmark, synthetic_parameters
from oxford_ir.benchmarks.registry import load_benchmark
from oxford_ir.benchmarks.synthetic import SYNTHETIC_DEFAULTS, SYNTHETIC_TINY
from oxford_ir.errors import ConfigError, DataError, GroundTruthError


def test_synthetic_parameters_start_from_the_preset() -> None:
    assert synthetic_parameters(None) == SYNTHETIC_DEFAULTS
    assert synthetic_parameters({"seed": 3}) == {**SYNTHETIC_DEFAULTS, "seed": 3}
    assert synthetic_parameters({"preset": "tiny", "n_distractors": 2}) == {**SYNTHETIC_TINY, "n_distractors": 2}
    with pytest.raises(ConfigError, match=r"^data.synthetic.preset='huge': choose one of \['default', 'tiny'\]$"):
        synthetic_parameters({"preset": "huge"}, "data.synthetic")
    with pytest.raises(ConfigError, match=r"unknown synthetic parameter\(s\) \['landmarks'\]: .* takes preset, seed"):
        synthetic_parameters({"landmarks": 3})


def test_writes_the_synthetic_benchmark_where_it_is_loaded_from(tmp_path: Path) -> None:
    folder = prepare_benchmark("rsynthetic", tmp_path, synthetic={"preset": "tiny", "seed": 1})
    assert folder == tmp_path / "synthetic"
    assert load_benchmark("rsynthetic", tmp_path).root == folder
    before = (folder / "gnd_synthetic.pkl").stat().st_mtime_ns
    assert prepare_benchmark("synthetic", tmp_path, synthetic={"preset": "tiny", "seed": 1}) == folder
    assert (folder / "gnd_synthetic.pkl").stat().st_mtime_ns == before  # present: kept as is
    # a data folder named after the dataset is the dataset folder (as downloads and the loader take it)
    named = tmp_path / "other" / "synthetic"
    assert prepare_benchmark("synthetic", named, synthetic={"preset": "tiny"}) == named
    assert load_benchmark("synthetic", named).root == named


def test_a_missing_real_dataset_names_the_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"oxford-ir-data download paris6k --root {tmp_path / 'nowhere'}"):
        prepare_benchmark("rparis6k", tmp_path / "nowhere")
    with pytest.raises(GroundTruthError, match=f"oxford-ir-data download oxford5k --root {tmp_path}"):
        prepare_benchmark("roxford5k", tmp_path)
