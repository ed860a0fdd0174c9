"""``make reproduce RECIPE=<name>`` (experiments/recipes.py): each published recipe's commands, its published numbers
in its config, the GPU estimate's arithmetic, and (slow) each dry run end to end on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))  # the scripts import each other as siblings

import recipes  # noqa: E402
from reproduce import H200  # noqa: E402


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_real_plan_downloads_trains_and_evaluates_both_revisited_benchmarks(name: str, tmp_path: Path) -> None:
    recipe = recipes.RECIPES[name]
    steps = recipes.plan(recipe, tmp_path / "out", tmp_path / "data", dry=False, gldv2_parts="0-9")
    by_name = {step.name: step for step in steps}
    for dataset in recipe.downloads:
        argv = by_name[f"download-{dataset}"].argv
        assert argv[:3] == ("oxford-ir-data", "download", dataset)
        assert ("--parts" in argv) == (dataset == "gldv2") and (dataset != "gldv2" or "0-9" in argv)
    evaluation = by_name["eval"].argv
    assert evaluation[0] == "oxford-ir-eval" and "benchmarks=[roxford5k,rparis6k]" in evaluation
    assert "extraction.image_size=1024" in evaluation and f"extraction.scales={recipes.MULTI_SCALE}" in evaluation
    if recipe.train is None:  # off the shelf: the model is named, nothing trains
        assert "train" not in by_name and "backbone=timm" in evaluation
        return
    train = by_name["train"]
    assert train.argv[:2] == ("oxford-ir-train", f"experiment={name}") and "trainer=gpu" in train.argv
    assert by_name["eval"].needs == ("train",) and f"ckpt_path={train.run_dir}/checkpoints/last.ckpt" in evaluation
    # the config carries the numbers the table prints beside the measured ones
    text = (REPO / "conf" / "experiment" / f"{name}.yaml").read_text()
    for benchmark, values in recipe.published.items():
        short = {"roxford5k": "ROxf", "rparis6k": "RPar"}[benchmark]
        assert f"{short} M {values['M']} / H {values['H']}" in text


def test_dry_plan_trains_on_the_miniature_of_its_format(tmp_path: Path) -> None:
    data = tmp_path / "out" / "data"
    steps = recipes.plan(recipes.RECIPES["gldv2_r50_arcface"], tmp_path / "out", data, dry=True, gldv2_parts="all")
    download = steps[0].argv
    assert download[:3] == ("oxford-ir-data", "download", "gldv2") and "--base-url" in download
    mirror = Path(download[download.index("--base-url") + 1].removeprefix("file://"))
    assert (mirror / "metadata" / "train_clean.csv").is_file() or any(mirror.rglob("train_clean.csv"))
    train = steps[1].argv
    assert "trainer.accelerator=cpu" in train and "data.eval_benchmark=null" in train
    assert steps[-1].argv[0] == "oxford-ir-eval" and "benchmarks=[rsynthetic]" in steps[-1].argv
    cirtorch = recipes.plan(recipes.RECIPES["cirtorch_sfm120k_r101"], tmp_path / "c", tmp_path / "c" / "data", True, "")
    assert [s.name for s in cirtorch] == ["train", "eval"]  # the miniature is written in its layout, not downloaded
    assert (tmp_path / "c" / "data" / "retrieval-SfM-120k" / "retrieval-SfM-120k.pkl").is_file()


def test_gpu_estimate_is_the_measured_throughput_scaled_by_hand() -> None:
    hours = recipes.gpu_hours(recipes.RECIPES["cirtorch_sfm120k_r50"])
    extract = H200["extract_images_per_s"]
    assert hours["training"] == pytest.approx(100 * 14_000 / H200["train_images_per_s"] / 3600)
    assert hours["mining"] == pytest.approx(100 * 24_000 / (extract * (1024 / 362) ** 2) / 3600)
    assert hours["validation"] == pytest.approx(100 * 5063 / extract / 3600)
    assert hours["evaluation"] == pytest.approx((5063 + 6392) * 3 / extract / 3600)
    r101 = recipes.gpu_hours(recipes.RECIPES["cirtorch_sfm120k_r101"])
    assert r101["total"] == pytest.approx(hours["total"] * 7.8 / 4.1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_dry_run_end_to_end(name: str, tmp_path: Path) -> None:
    """Each recipe's dry mode from the command line: every step runs, the table has measured numbers (1-2 min each
    on 2 cores)."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "recipes.py"), "--recipe", name, "--dry", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["steps"].values()) == {"ok"}
    measured = results["rows"]["rsynthetic"]["measured"]
    assert all(0.0 <= value <= 1.0 for value in measured.values())
    assert "| rsynthetic" in (out / "table.md").read_text()
