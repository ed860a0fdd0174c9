"""oxford-ir-eval's ``extraction`` report: how many input shapes the network saw, the mode, the padding; and the
default (bucket) mode's numbers next to the exact mode's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oxford_ir.cli.evaluate import evaluate
from oxford_ir.errors import ConfigError
from tests.test_evaluate import compose_eval

TINY_NET = ["backbone=scratch", "backbone.channels=[8,16]", "extraction.image_size=64", "extraction.device=cpu"]


def test_metrics_json_reports_the_input_shapes_of_each_mode(tmp_path: Path) -> None:
    evaluate(compose_eval(tmp_path, *TINY_NET, "extraction.max_shapes=3"))
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())["extraction"]
    assert report["mode"] == "bucket" and report["max_shapes"] == 3 and report["decode"] == "cpu"
    assert isinstance(report["distinct_input_shapes"], int) and 1 <= report["distinct_input_shapes"] <= 3 * 2
    for name in ("synthetic", "rsynthetic"):
        own = report["benchmarks"][name]
        assert 1 <= own["distinct_input_shapes"] <= 3 and len(own["buckets"]) <= 3
        assert own["padded_over_valid_pixels"] >= 0
    assert report["images"] == sum(b["images"] for b in report["benchmarks"].values())

    evaluate(compose_eval(tmp_path, *TINY_NET, "extraction.batching=shape"))
    exact = json.loads((tmp_path / "run" / "metrics.json").read_text())["extraction"]
    assert exact["mode"] == "shape" and exact["max_shapes"] is None and exact["padded_over_valid_pixels"] == 0
    assert exact["distinct_input_shapes"] > report["distinct_input_shapes"]  # every query crop its own shape


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("extraction.batching=padded", "extraction.batching='padded'"),
        ("extraction.max_shapes=0", "extraction.max_shapes=0"),
        ("extraction.decode=fpga", "extraction.decode='fpga'"),
    ],
)
def test_bad_extraction_settings_name_the_key(tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        evaluate(compose_eval(tmp_path, *TINY_NET, override))


@pytest.mark.slow
@pytest.mark.shared_data
def test_default_mode_stays_within_half_a_point_of_exact_on_synthetic(mobilenet_weights, tmp_path: Path) -> None:
    """ImageNet MobileNetV2 + GeM on the default synthetic benchmark: bucket batching vs exact shape batching
    (measured: identical tables, 7 input shapes against 26; experiments/extraction_modes.sh)."""
    common = [f"backbone.weights={mobilenet_weights}", "synthetic.preset=default", "extraction.device=cpu"]
    bucket, _ = evaluate(compose_eval(tmp_path, *common))
    exact, _ = evaluate(compose_eval(tmp_path, *common, "extraction.batching=shape"))
    print(f"\nbucket {bucket}\nexact {exact}")
    for key in ("synthetic/mAP", "rsynthetic/E/mAP", "rsynthetic/M/mAP", "rsynthetic/H/mAP"):
        assert abs(bucket[key] - exact[key]) <= 0.005, key
