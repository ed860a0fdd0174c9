"""oxford-ir-train with data.exclude_overlap: the planted copies of evaluated images are found, left out of training
and recorded in metrics.json (counts per evaluated landmark) and overlap.json (the pairs)."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from oxford_ir.cli.train import train
from tests.test_collection_training import photo_folder
from tests.test_train import TINY_SCRATCH, compose_train


@pytest.mark.slow  # a training run: 6 s on 2 loaded cores (the guard's parts are tested in tests/extraction/)
def test_training_leaves_out_the_copies_of_evaluated_images_and_records_them(tmp_path):
    photos = photo_folder(tmp_path / "photos")  # class_0 .. class_4, 4 photos each; class_3 and class_4 evaluated
    exact = photos / "class_0" / "copy.png"
    shutil.copyfile(photos / "class_3" / "1.png", exact)
    near = photos / "class_1" / "near.jpg"
    image = Image.open(photos / "class_4" / "2.png").convert("RGB")
    image.resize((44, 37), Image.Resampling.BICUBIC).save(near, quality=80)
    cfg = compose_train(
        tmp_path, "data=collection", f"data.benchmark=collection:{photos}", "data.n_held_out=null",
        "data.held_out_landmarks=[class_3,class_4]",
        "data.exclude_overlap=true", "data.image_size=32", "data.eval_image_size=48", "data.classes_per_batch=3",
        "data.images_per_class=2", "data.batches_per_epoch=1", "data.num_workers=0", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=none", "test=false",
        *TINY_SCRATCH,
    )  # fmt: skip
    metrics, objects = train(cfg)
    datamodule = objects["datamodule"]
    trained = set(datamodule.train_split.paths)
    assert exact in datamodule.split.paths and near in datamodule.split.paths  # found in the split, then left out
    assert exact not in trained and near not in trained and len(trained) == len(datamodule.split) - 2
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    for key, value in {"overlap/exact": 1, "overlap/near": 1, "overlap/dropped": 2, "overlap/threshold": 0.95,
                       "overlap/class_3/exact": 1, "overlap/class_4/near": 1}.items():  # fmt: skip
        assert saved[key] == metrics[key] == value, key
    pairs = json.loads((tmp_path / "run" / "overlap.json").read_text())["pairs"]
    assert [(p["train"], p["evaluated"].endswith("class_3/1.png"), p["exact"]) for p in pairs][0] == (
        str(exact),
        True,
        True,
    )
    assert pairs[1]["train"] == str(near) and pairs[1]["evaluated"].endswith("class_4/2.png") and not pairs[1]["exact"]
