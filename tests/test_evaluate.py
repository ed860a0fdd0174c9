"""oxford-ir-eval end to end: Hydra config -> extraction -> ranking -> the protocol's table."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image

from oxford_ir.benchmarks.metrics import compute_map, revisited_gnd
from oxford_ir.cli.evaluate import evaluate
from oxford_ir.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oxford_ir.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EVAL_SCRIPT = Path(sys.executable).parent / "oxford-ir-eval"


def compose_eval(tmp_path: Path, *overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(
            "eval",
            overrides=[
                f"paths.data_dir={tmp_path / 'data'}",
                f"paths.output_dir={tmp_path / 'run'}",
                "synthetic.preset=tiny",
                "extraction.num_workers=0",
                *overrides,
            ],
        )


def raw_pixels_by_hand(path: Path, bbx=None, grid: int = 16) -> np.ndarray:
    """The raw-pixel embedding computed without the package's extraction code."""
    image = Image.open(path).convert("RGB")  # tiny synthetic images: no resize at 1024 px
    if bbx is not None:
        image = image.crop(tuple(bbx))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    v = F.adaptive_avg_pool2d(x[None], grid).flatten()
    return (v / v.norm()).numpy()


def test_raw_pixels_on_synthetic_match_a_hand_computation(tmp_path, capsys):
    cfg = compose_eval(tmp_path, "backbone=raw_pixels", "pooling=flatten", "benchmarks=[synthetic,rsynthetic]")
    flat, objects = evaluate(cfg)
    out = capsys.readouterr().out
    for row in ("synthetic    -", "rsynthetic   E", "rsynthetic   M", "rsynthetic   H"):
        assert row in out
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(flat)
    assert (tmp_path / "run" / "table.txt").read_text().strip() == objects["table"].strip()

    root = tmp_path / "data" / "synthetic"
    for name, prefixes in (("synthetic", [""]), ("rsynthetic", ["E/", "M/", "H/"])):
        with open(root / f"gnd_{name}.pkl", "rb") as handle:
            gt = pickle.load(handle)
        db = np.stack([raw_pixels_by_hand(root / "jpg" / f"{n}.jpg") for n in gt["imlist"]])
        queries = np.stack(
            [
                raw_pixels_by_hand(root / "jpg" / f"{n}.jpg", g["bbx"])
                for n, g in zip(gt["qimlist"], gt["gnd"], strict=True)
            ]
        )
        ranks = np.argsort(-(db @ queries.T), axis=0, kind="stable")
        for prefix in prefixes:
            gnd = gt["gnd"] if not prefix else revisited_gnd(gt["gnd"], prefix[0])
            expected, _, mpr, _ = compute_map(ranks, gnd, (1, 5, 10))
            assert flat[f"{name}/{prefix}mAP"] == pytest.approx(expected, abs=1e-6)
            assert flat[f"{name}/{prefix}mP@5"] == pytest.approx(mpr[1], abs=1e-6)
        assert 0.0 < flat[f"{name}/{prefixes[0]}mAP"] < 1.0


def test_unknown_benchmark_is_a_config_error(tmp_path):
    cfg = compose_eval(tmp_path, "benchmarks=[oxford105k]")
    with pytest.raises(ConfigError, match="oxford105k"):
        evaluate(cfg)


def test_missing_real_dataset_is_one_clear_line(tmp_path):
    """oxford-ir-eval's main(), run from another folder: one line naming the download command, no traceback.

    (In this process; tests/test_train.py checks the one-line form on a console script's own stderr.)
    """
    from oxford_ir.cli.evaluate import main
    from tests.test_train import run_main

    result = run_main(
        "benchmarks=[roxford5k]", "backbone=raw_pixels", "pooling=flatten", f"paths.data_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, entry=main, prog=str(EVAL_SCRIPT),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr and "oxford-ir-data download" in result.stderr


def test_evaluates_a_training_checkpoint_like_the_training_run(tmp_path):
    """oxford-ir-eval ckpt_path=... gives the numbers the training run logged for that checkpoint."""
    from oxford_ir.cli.train import train
    from tests.test_train import TINY, TINY_SCRATCH, TINY_SYNTHETIC, compose_train

    cfg = compose_train(tmp_path, *TINY, *TINY_SCRATCH, "logger=none", "trainer.max_epochs=1", "test=false")
    metrics, _ = train(cfg)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    eval_cfg = compose_eval(
        tmp_path, f"ckpt_path={checkpoint}", "benchmarks=[synthetic]", "extraction.image_size=64",
        "synthetic.preset=default", *(f"+synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()),
    )  # fmt: skip
    flat, _ = evaluate(eval_cfg)
    assert flat["synthetic/mAP"] == pytest.approx(metrics["val/synthetic/mAP"], abs=1e-6)


# ~8 s: torchrun and its two processes import torch and Hydra
def test_torchrun_evaluation_with_two_processes_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m oxford_ir.cli.evaluate`: gloo on the CPU, each process embeds every other
    planned batch; the first writes metrics.json, equal to the single-process run's (in this process, one thread
    like each torchrun process)."""
    from tests.test_train import restored_process_state

    common = ["backbone=scratch", "backbone.channels=[4,8]", "synthetic.preset=tiny", "extraction.image_size=64",
              "extraction.batch_size=2", "extraction.num_workers=0"]  # fmt: skip
    with restored_process_state():
        torch.set_num_threads(1)
        evaluate(compose_eval(tmp_path, *common))  # writes <tmp_path>/run/metrics.json
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    sharded = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m",
         "oxford_ir.cli.evaluate", *common, f"paths.data_dir={tmp_path / 'data'}",
         f"hydra.run.dir={tmp_path / 'sharded'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=180, env=env,
    )  # fmt: skip
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "process 1 of 2" in sharded.stderr or "process 1 of 2" in sharded.stdout
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text())["metrics"] for run in ("run", "sharded")]
    assert metrics[0] == metrics[1] and len(metrics[0]) > 5


def test_evaluation_from_the_image_cache_equals_decoding(tmp_path):
    """extraction.cache=true: images read from the evaluation cache give exactly the uncached metrics; the
    cache is built once (under paths.data_dir/cache) and reused."""
    common = ["backbone=scratch", "backbone.channels=[4,8]", "extraction.image_size=64"]
    plain, _ = evaluate(compose_eval(tmp_path, *common))
    cached, _ = evaluate(compose_eval(tmp_path, *common, "extraction.cache=true"))
    assert cached == plain
    folders = sorted(p.name for p in (tmp_path / "data" / "cache").iterdir())
    assert folders == ["eval-synthetic-64"]  # synthetic and rsynthetic share their dataset folder's cache
    manifest = tmp_path / "data" / "cache" / "eval-synthetic-64" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again, _ = evaluate(compose_eval(tmp_path, *common, "extraction.cache=true"))
    assert again == plain and manifest.stat().st_mtime_ns == before  # fresh: opened, not rewritten
    with pytest.raises(ConfigError, match="extraction.cache='yes'"):
        evaluate(compose_eval(tmp_path, *common, "extraction.cache=yes"))


def test_per_query_files_have_one_row_per_query_and_average_to_the_map(tmp_path, capsys):
    """per_query_ap/<benchmark>.csv: one row per query (AP of each protocol, positives); its mean is the mAP; the
    run folder is printed last."""
    import csv

    cfg = compose_eval(tmp_path, "backbone=raw_pixels", "pooling=flatten", "benchmarks=[synthetic,rsynthetic]")
    flat, objects = evaluate(cfg)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"results: {(tmp_path / 'run').resolve()}")
    for name, protocols in (("synthetic", ("",)), ("rsynthetic", ("E/", "M/", "H/"))):
        with open(tmp_path / "run" / "per_query_ap" / f"{name}.csv", newline="") as file:
            rows = list(csv.DictReader(file))
        benchmark = objects["results"][name]
        assert [int(r["index"]) for r in rows] == list(range(len(rows)))
        assert len(rows) == len({r["query"] for r in rows}) > 0
        assert all(int(r["positives"]) > 0 for r in rows)
        for prefix in protocols:
            aps = [float(r[f"{prefix}AP"]) for r in rows if r[f"{prefix}AP"] != ""]
            assert np.mean(aps) == pytest.approx(flat[f"{name}/{prefix}mAP"], abs=1e-5)
            assert benchmark[f"{prefix}mAP"] == flat[f"{name}/{prefix}mAP"]


def test_landmarks_restricts_the_queries_and_keeps_the_database(tmp_path):
    cfg = compose_eval(tmp_path, "backbone=raw_pixels", "pooling=flatten", "benchmarks=[synthetic]",
                       "landmarks=[landmark_01]")  # fmt: skip
    evaluate(cfg)
    rows = (tmp_path / "run" / "per_query_ap" / "synthetic.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(",landmark_01," in row for row in rows)  # the tiny preset: 2 queries a landmark
    note = json.loads((tmp_path / "run" / "metrics.json").read_text())["notes"]["synthetic"]
    assert "landmark_01" in note
    with pytest.raises(ConfigError, match="synthetic has no query of landmark_99; its landmarks: landmark_00"):
        evaluate(compose_eval(tmp_path, "backbone=raw_pixels", "benchmarks=[synthetic]", "landmarks=[landmark_99]"))
    with pytest.raises(ConfigError, match="landmarks=held_out: held out of which split"):
        evaluate(compose_eval(tmp_path, "backbone=raw_pixels", "benchmarks=[synthetic]", "landmarks=held_out"))


def test_learned_whitening_without_a_checkpoint_on_the_held_out_landmarks(tmp_path):
    """The README's example of a whitening learned for a model without checkpoint, on the synthetic benchmark:
    learned from a landmarks split of the evaluated dataset, evaluated on the landmarks it held out."""
    source = "{benchmark: synthetic, split: landmarks, held_out_landmarks: [landmark_00], synthetic: {preset: tiny}}"
    overrides = ("backbone=scratch", "backbone.channels=[8,16]", "extraction.image_size=64", "extraction.device=cpu",
                 "benchmarks=[synthetic]", "whitening=learned", f"whitening.source={source}")  # fmt: skip
    with pytest.raises(ConfigError, match="images that synthetic evaluates"):
        evaluate(compose_eval(tmp_path, *overrides))  # every landmark evaluated: the whitening saw the test
    flat, _ = evaluate(compose_eval(tmp_path, *overrides, "landmarks=held_out"))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["whitening"]["kind"] == "learned" and saved["whitening"]["status"] == "learned"
    assert "landmark_00" in saved["notes"]["synthetic"] and 0.0 <= flat["synthetic/mAP"] <= 1.0
