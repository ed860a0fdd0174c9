"""A folder of one's own photos through the same commands: oxford-ir-train with ``data=collection`` and
oxford-ir-eval with ``benchmarks=[collection:<folder>]`` (mAP and recall@k against a brute-force computation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from oxford_ir.cli.evaluate import evaluate
from oxford_ir.cli.train import train
from tests.retrieval.test_index import write_photo
from tests.test_evaluate import compose_eval, raw_pixels_by_hand
from tests.test_train import TINY_SCRATCH, compose_train, read_csv_metrics

CLASSES, PER_CLASS = 5, 4


def photo_folder(root: Path) -> Path:
    """``root/class_<c>/<i>.png``: CLASSES classes of PER_CLASS small photos, each with content of its own."""
    for c in range(CLASSES):
        for i in range(PER_CLASS):
            write_photo(root / f"class_{c}" / f"{i}.png", seed=100 * c + i, size=(48, 40))
    return root


def test_training_on_a_folder_logs_map_and_recall_and_never_trains_on_an_evaluated_image(tmp_path):
    """Validated on the folder's held-out classes (monitored) and on a second benchmark at the same passes
    (``data.extra_eval_benchmarks``), each with its own metrics, grid and per-query table."""
    photos = photo_folder(tmp_path / "photos")
    cfg = compose_train(
        tmp_path, "data=collection", f"data.benchmark=collection:{photos}", "data.n_held_out=2", "data.image_size=32",
        "data.extra_eval_benchmarks=[rsynthetic]", "+data.synthetic.preset=tiny",
        "data.eval_image_size=48", "data.classes_per_batch=3", "data.images_per_class=2", "data.batches_per_epoch=2",
        "data.num_workers=0", "trainer.max_epochs=1", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=csv", *TINY_SCRATCH,
    )  # fmt: skip
    metrics, objects = train(cfg)
    split = objects["datamodule"].split
    assert split.kind == "collection" and len(split.held_out_landmarks) == 2 and split.num_classes == CLASSES - 2
    evaluated = {str(p) for p in [*split.eval_benchmark.db_paths, *split.eval_benchmark.query_paths]}
    assert len(evaluated) == 2 * PER_CLASS and not evaluated & {str(p) for p in split.paths}
    logged = {key for row in read_csv_metrics(tmp_path / "run") for key, value in row.items() if value}
    for key in ("val/mAP", "val/photos/mAP", "val/photos/mP@1", "val/photos/R@1", "val/photos/R@5", "val/loss"):
        assert key in logged
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert 0.0 <= saved["final/val/photos/R@1"] <= 1.0 and saved["final/val/photos/mAP"] == metrics["final/val/mAP"]
    table = (tmp_path / "run" / "table.txt").read_text()
    assert " R@1 " in table
    # the extra benchmark: evaluated at each validation with its own protocol, not monitored
    extra = objects["model"].last_evaluations[1]
    assert extra.benchmark.name == "rsynthetic" and extra.benchmark.protocol == "revisited"
    assert saved["final/val/rsynthetic/M/mAP"] == pytest.approx(extra.metrics["M/mAP"], abs=1e-6)
    assert saved["final/val/mAP"] == saved["final/val/photos/mAP"]
    assert "val/rsynthetic/H/mAP" in logged and "rsynthetic" in table
    ranks = np.argsort(-(extra.db.numpy() @ extra.queries.numpy().T), axis=0, kind="stable")
    assert np.array_equal(ranks, extra.ranks)  # ranked on its own embeddings, not the monitored benchmark's
    assert list((tmp_path / "run" / "retrieval_grids" / "rsynthetic").glob("*.png"))
    assert list((tmp_path / "run" / "per_query_ap" / "rsynthetic").glob("*.csv"))
    assert list((tmp_path / "run" / "per_query_ap").glob("*.csv"))  # the monitored benchmark's, where it was


def test_an_extra_benchmark_that_shares_training_images_is_refused(tmp_path):
    from oxford_ir.data.datamodule import RetrievalDataModule
    from oxford_ir.errors import ConfigError, DataError

    data = tmp_path / "data"
    with pytest.raises(ConfigError, match=r"extra_eval_benchmarks lists rsynthetic twice or with"):
        RetrievalDataModule(data, "rsynthetic", split="landmarks", extra_eval_benchmarks=["rsynthetic"])
    with pytest.raises(ConfigError, match=r"extra_eval_benchmarks=.rsynthetic.: a list"):
        RetrievalDataModule(data, "synthetic", split="landmarks", extra_eval_benchmarks="rsynthetic")
    dm = RetrievalDataModule(
        data, "synthetic", split="landmarks", n_held_out=2, extra_eval_benchmarks=["rsynthetic"],
        synthetic={"preset": "tiny"},
    )  # fmt: skip
    dm.prepare_data()
    with pytest.raises(DataError, match=r"rsynthetic shares \d+ images with the training split of synthetic"):
        dm.setup("fit")


def brute_force(embeddings: np.ndarray, labels: list[str]) -> tuple[float, float]:
    """mAP (the published trapezoid rule) and recall@1 of every image against all the others."""
    aps, hits = [], []
    for q in range(len(labels)):
        order = [i for i in np.argsort(-(embeddings @ embeddings[q]), kind="stable").tolist() if i != q]
        ranks = [r for r, i in enumerate(order) if labels[i] == labels[q]]
        ap = sum(((j / r if r else 1.0) + (j + 1) / (r + 1)) / 2 for j, r in enumerate(ranks)) / len(ranks)
        aps.append(ap)
        hits.append(float(labels[order[0]] == labels[q]))
    return float(np.mean(aps)), float(np.mean(hits))


def test_evaluating_a_folder_equals_a_brute_force_computation(tmp_path, capsys):
    photos = photo_folder(tmp_path / "photos")
    cfg = compose_eval(tmp_path, "backbone=raw_pixels", "pooling=flatten", f"benchmarks=[collection:{photos}]")
    flat, _ = evaluate(cfg)
    names = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.png"))
    embeddings = np.stack([raw_pixels_by_hand(photos / name) for name in names])
    expected_map, expected_recall = brute_force(embeddings, [name.split("/")[0] for name in names])
    assert flat["photos/mAP"] == pytest.approx(expected_map, abs=1e-6)
    assert flat["photos/R@1"] == pytest.approx(expected_recall, abs=1e-6)
    assert 0.0 < expected_map < 1.0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert saved["photos/R@1"] == flat["photos/R@1"] and "R@10" in capsys.readouterr().out
    per_query = (tmp_path / "run" / "per_query_ap" / "photos.csv").read_text().splitlines()
    assert len(per_query) == 1 + CLASSES * PER_CLASS and per_query[1].split(",")[1] == "class_0/0.png"
