"""``oxford-ir-eval overlap.train=<training data>``: the overlap guard on request, for a model trained elsewhere: the
training images that are copies of evaluated images are counted per evaluated landmark in metrics.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

from oxford_ir.benchmarks.prepare import prepare_benchmark
from oxford_ir.benchmarks.registry import load_benchmark
from oxford_ir.cli.evaluate import evaluate
from tests.test_evaluate import compose_eval


def test_eval_reports_the_planted_copies_of_evaluated_images_per_landmark(tmp_path: Path):
    data = tmp_path / "data"
    prepare_benchmark("synthetic", data, synthetic={"preset": "tiny"})
    benchmark = load_benchmark("synthetic", data)
    positives = benchmark.positives(0)
    landmark = benchmark.query_landmarks[0]
    exact = [benchmark.db_paths[i] for i in positives[:2]]
    # a training collection: two byte copies and one re-encoded, resized copy of evaluated images, among photos
    # of other landmarks' queries that are not in the database (rsynthetic-like: the tiny preset's queries are)
    train = tmp_path / "train"
    for i, path in enumerate(exact):
        (train / "copies").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, train / "copies" / f"exact{i}.jpg")
    with Image.open(benchmark.db_paths[positives[2]]) as image:
        near = image.convert("RGB").resize((int(image.width * 0.9), int(image.height * 0.9)))
        near.save(train / "copies" / "near.jpg", quality=80)
    unrelated = [p for i, p in enumerate(benchmark.db_paths) if i not in set(benchmark.positives(0).tolist())]
    for i, path in enumerate(unrelated[:3]):
        (train / "other").mkdir(exist_ok=True)
        with Image.open(path) as image:  # flipped upside down and darkened: no copy of anything evaluated
            image.convert("RGB").rotate(180).point(lambda v: v // 3).save(train / "other" / f"o{i}.jpg")

    cfg = compose_eval(tmp_path, "backbone=scratch", "benchmarks=[synthetic]", f"overlap.train=collection:{train}")
    flat, _ = evaluate(cfg)
    assert flat["overlap/exact"] == 2 and flat["overlap/near"] == 1
    assert flat[f"overlap/{landmark}/exact"] == 2
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())["overlap"]
    assert report["train"] == f"collection:{train}" and report["training_images"] == 6
    assert report["overlapping"] == 3


def test_no_overlap_check_unless_asked(tmp_path: Path):
    flat, _ = evaluate(compose_eval(tmp_path, "backbone=scratch", "benchmarks=[synthetic]"))
    assert not any(key.startswith("overlap/") for key in flat)
    assert "overlap" not in json.loads((tmp_path / "run" / "metrics.json").read_text())
