"""``make sweep`` (conf/hparams_search/grid.yaml): every job of the grid trains something different, and the miners
mine with the loss's margin unless told otherwise."""

from __future__ import annotations

import itertools
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


def composed(*overrides: str, hydra: bool = False, experiment: str | None = "quickstart"):
    chosen = [f"experiment={experiment}"] if experiment else []
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[*chosen, *overrides], return_hydra_config=hydra)


def test_the_triplet_miners_margin_follows_the_loss_unless_set():
    for miner in ("triplet_semihard", "triplet_hard", "triplet_all"):
        cfg = composed(f"miner={miner}", "loss.margin=0.3", experiment=None)
        assert cfg.miner.margin == 0.3, miner
        set_here = composed(f"miner={miner}", "loss.margin=0.3", "miner.margin=0.05", experiment=None)
        assert set_here.miner.margin == 0.05
        # a loss without a margin: the miner keeps its own
        assert composed(f"miner={miner}", "loss=multi_similarity", experiment=None).miner.margin == 0.1
    # the quickstart sets its miner's margin (0.1) below its loss's (0.2): its recipe, as measured
    quickstart = composed()
    assert (quickstart.miner.margin, quickstart.loss.margin) == (0.1, 0.2)


def test_the_grid_has_no_two_jobs_that_train_the_same():
    cfg = composed("hparams_search=grid", hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.optimized_metric == "val/mAP"
    params = {key: str(value).split(",") for key, value in cfg.hydra.sweeper.params.items()}
    assert set(params) == {"loss.margin", "miner"}
    trainings = []
    for values in itertools.product(*params.values()):
        job = composed("hparams_search=grid", *(f"{key}={value}" for key, value in zip(params, values, strict=True)))
        # a margin the miner does not share only shifts the loss of the triplets it mined: the same training
        assert job.miner.margin == job.loss.margin
        trainings.append(OmegaConf.to_yaml(OmegaConf.create({"loss": job.loss, "miner": job.miner}), resolve=True))
    assert len(trainings) == 4 and len(set(trainings)) == len(trainings)
