"""The speed options of training through the real entry point: GPU-path JPEG decoding (run on the CPU here),
channels_last, the batched augmentation and prefetching loader of both decode paths, and the checks that keep
incompatible options apart."""

from __future__ import annotations

import math

import pytest

from oxford_ir.cli.train import train
from oxford_ir.data.prefetch import DevicePrefetchLoader
from oxford_ir.errors import ConfigError
from tests.test_train import TINY, TINY_SCRATCH, compose_train


def test_training_with_the_gpu_decode_path_and_channels_last_runs_and_evaluates(tmp_path):
    """data.decode=gpu: workers read bytes, on_after_batch_transfer decodes (on the CPU here), the module trains
    and validates on what it decoded; model.channels_last=true on top."""
    cfg = compose_train(
        tmp_path,
        *TINY,
        *TINY_SCRATCH,
        "data.decode=gpu",
        "model.channels_last=true",
        "logger=none",
        "callbacks=none",
        "trainer.max_epochs=1",
        "test=false",
    )
    metrics, objects = train(cfg)
    module = objects["model"]
    assert module.hparams.channels_last is True
    assert math.isfinite(float(metrics["train/loss"])) and 0.0 < float(metrics["val/mAP"]) <= 1.0
    batch = next(iter(objects["datamodule"].train_dataloader()))
    images, labels = objects["datamodule"].on_after_batch_transfer(batch, 0)
    assert images.shape == (len(labels), 3, 32, 32)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_fast_dev_run_trains_with_either_decode_path(tmp_path, decode):
    """debug=fast_dev_run through train(cfg): the workers crop (decode=cpu) or read bytes (decode=gpu), colour
    jitter and normalisation run on whole batches; on the CPU the loader does not prefetch (no side stream)."""
    cfg = compose_train(
        tmp_path, *TINY, *TINY_SCRATCH, f"data.decode={decode}", "debug=fast_dev_run", "logger=none", "callbacks=none"
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1 and math.isfinite(float(metrics["train/loss"]))
    loader = objects["trainer"].train_dataloader
    assert isinstance(loader, DevicePrefetchLoader) and loader.prefetches == (loader.device.type == "cuda")


def config_error(excinfo) -> str:
    """The ConfigError behind Hydra's InstantiationException (what the CLI prints as one line)."""
    error = excinfo.value
    while error is not None and not isinstance(error, ConfigError):
        error = error.__cause__
    assert error is not None, f"no ConfigError behind {excinfo.value!r}"
    return str(error)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.decode=gpu", "data.cache.enabled=true"], "data.decode=gpu and data.cache.enabled=true exclude"),
        (["data.decode=nvjpeg"], "data.decode='nvjpeg' is unknown"),
        (["data.decode=gpu", "+data.augmentation.interpolation=lanczos"], "augmentation.interpolation=lanczos has no"),
    ],
)
def test_bad_pipeline_options_are_config_errors_naming_the_key(tmp_path, overrides, message):
    cfg = compose_train(tmp_path, *TINY, *TINY_SCRATCH, *overrides, "logger=none")
    with pytest.raises(Exception) as excinfo:
        train(cfg)
    assert message in config_error(excinfo)
