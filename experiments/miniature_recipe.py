"""The quickstart recipe shrunk to a miniature collection, shared by the CPU recipes of the collection readers
(``collection_recipe.py``, ``sfm120k_miniature.py``, ``gldv2_miniature.py``): the same network, loss, miner and
logging, each script adding its data and sizes; and one composed, timed training run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[1]

#: what every miniature recipe trains: the quickstart's network, loss and miner on the CPU, logged to CSV
QUICKSTART_ON_CPU = [
    "backbone=scratch",
    "pooling=gem",
    "loss=triplet",
    "miner=triplet_semihard",
    "optimizer=adam",
    "trainer.accelerator=cpu",
    "validate_before_training=true",
    "data.num_workers=0",
    "logger=csv",
    "trainer.log_every_n_steps=5",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def train_run(out: Path, data: Path, name: str, recipe: Sequence[str], *overrides: str) -> tuple[dict, dict, float]:
    """``train(cfg)`` of ``recipe`` + ``overrides`` with data in ``data``, written to ``out/name``: (metrics, objects,
    wall seconds)."""
    from oxford_ir.cli.train import train

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"paths.data_dir={data}", f"paths.log_dir={out / 'logs'}", *recipe, *overrides]
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(out / name)
    start = time.perf_counter()
    metrics, objects = train(cfg)
    return metrics, objects, time.perf_counter() - start
