"""``oxford-ir-train``: fit a retrieval network, evaluate it with the published protocol, log everything.

``train(cfg)`` holds the logic and is what tests call; ``main`` is the thin Hydra wrapper,
which also turns ``resume=<run folder>`` into "compose that run's config again and write
into that same folder" (Hydra would otherwise make a new folder).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from oxford_ir.config import CONFIG_DIR
from oxford_ir.errors import exit_on_user_error
from oxford_ir.models.module import load_retrieval_checkpoint
from oxford_ir.retrieval.report import format_table
from oxford_ir.run import (
    RunInfo,
    distributed_scope,
    finish_wandb,
    instantiate_callbacks,
    instantiate_loggers,
    log_config,
    prepare_distributed,
    resolve_run,
    resume_overrides,
    save_wandb_id,
)

log = logging.getLogger(__name__)

#: the evaluations of a run, as printed at its end and written to table.txt
TABLE_TITLES = {"untrained": "Before training (untrained network)", "final": "After training (best checkpoint)"}


def _evaluation_table(module: Any) -> str | None:
    """The table of the module's last full evaluation, or None when it skipped evaluating."""
    evaluation = getattr(module, "last_evaluation", None)
    if not evaluation:
        return None
    benchmark = evaluation["benchmark"]
    return format_table({benchmark.name: evaluation["metrics"]}, {benchmark.name: benchmark.subset_note})


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit ``cfg.model`` on ``cfg.data``; returns the final metrics and the objects built.

    Writes checkpoints (``last.ckpt`` and the best by ``val/mAP``), logs and W&B files
    under ``cfg.paths.output_dir``. ``cfg.resume`` / ``cfg.ckpt_path`` continue a run.
    """
    run: RunInfo = resolve_run(cfg)
    pl.seed_everything(int(cfg.seed), workers=True)

    log.info("data <%s>", cfg.data._target_)
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info("model <%s>", cfg.model._target_)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model, _recursive_=False)
    if run.ckpt_path is not None:
        # fail here, with the file named, rather than deep inside Trainer.fit
        load_retrieval_checkpoint(run.ckpt_path, expected=model)

    loggers = instantiate_loggers(cfg.get("logger"), run)
    callbacks = instantiate_callbacks(cfg.get("callbacks"), has_logger=bool(loggers))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    prepare_distributed(cfg, trainer, model)
    if trainer.is_global_zero:  # the run folder's files are written by one process of a DDP run
        save_wandb_id(run)

    metrics: dict[str, float] = {}
    tables: dict[str, str] = {}
    evaluations: dict[str, dict] = {}
    try:
        with distributed_scope():  # closes the process group this run opened
            log_config(cfg, loggers, model)
            if cfg.get("validate_before_training") and run.ckpt_path is None:
                trainer.validate(model, datamodule=datamodule, verbose=False)
                tables["untrained"] = _evaluation_table(model) or ""
                evaluations["untrained"] = _evaluation_metrics(model)
                metrics.update({f"untrained/{k}": float(v) for k, v in trainer.callback_metrics.items()})
            if cfg.get("train", True):
                trainer.fit(model, datamodule=datamodule, ckpt_path=str(run.ckpt_path) if run.ckpt_path else None)
                metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            if cfg.get("test", True) and not trainer.fast_dev_run:
                best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
                trainer.validate(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
                tables["final"] = _evaluation_table(model) or ""
                evaluations["final"] = _evaluation_metrics(model)
                metrics.update({f"final/{k}": float(v) for k, v in trainer.callback_metrics.items()})
    finally:
        finish_wandb()

    if trainer.is_global_zero:
        _write_results(run, metrics, evaluations, tables)
        _print_summary(tables, run, trainer)
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer, "run": run, "tables": tables}


def _evaluation_metrics(module: Any) -> dict[str, dict[str, float]]:
    """``{benchmark: metrics}`` of the module's last full evaluation, at full precision (not the logged float32)."""
    evaluation = getattr(module, "last_evaluation", None)
    if not evaluation:
        return {}
    return {evaluation["benchmark"].name: {k: float(v) for k, v in evaluation["metrics"].items()}}


def _write_results(
    run: RunInfo, metrics: dict[str, float], evaluations: dict[str, dict], tables: dict[str, str]
) -> None:
    """``metrics.json`` (logged metrics and the evaluation tables' values) and ``table.txt``, atomically."""
    results = {"metrics": metrics, "evaluations": {k: v for k, v in evaluations.items() if v}}
    target = run.output_dir / "metrics.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, target)
    text = "".join(f"{TABLE_TITLES[key]}\n{table}\n\n" for key, table in tables.items() if table)
    if text:
        target = run.output_dir / "table.txt"
        tmp = target.with_suffix(".txt.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


def _print_summary(tables: dict[str, str], run: RunInfo, trainer: pl.Trainer) -> None:
    """The evaluation tables and where the run's files are."""
    for key, table in tables.items():
        if table:
            print(f"\n{TABLE_TITLES[key]}\n{table}")
    checkpoint = trainer.checkpoint_callback
    print(f"\nrun folder:   {run.output_dir}")
    if checkpoint is not None and checkpoint.dirpath:
        print(f"checkpoints:  {checkpoint.dirpath} (best: {Path(checkpoint.best_model_path).name or '-'}, last.ckpt)")
    if run.wandb_dir is not None and run.wandb_dir.exists():
        print(f"W&B files:    {run.wandb_dir}  (upload with: wandb sync {run.wandb_dir}/offline-run-*)")
    print(f"resume with:  oxford-ir-train resume={run.output_dir}")


def _selection_metric(metrics: dict[str, float], cfg: DictConfig) -> float:
    """The value a sweeper maximises (``optimized_metric``, default ``val/mAP``)."""
    name = cfg.get("optimized_metric") or "val/mAP"
    if name not in metrics:
        if metrics:
            log.warning("optimized_metric %s was not logged (e.g. under fast_dev_run); returning 0", name)
        return 0.0
    return float(metrics[name])


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> float:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    metrics, _ = train(cfg)
    return _selection_metric(metrics, cfg)


@exit_on_user_error
def _rewrite_resume_argv(argv: list[str]) -> list[str]:
    return resume_overrides(argv)


def main() -> None:
    """Console script: ``resume=<run folder>`` re-runs that folder's overrides into the same folder."""
    sys.argv = [sys.argv[0], *_rewrite_resume_argv(sys.argv[1:])]
    if not any(a in ("-m", "--multirun") for a in sys.argv) and any(a.startswith("resume=") for a in sys.argv):
        log.info("resuming: %s", " ".join(sys.argv[1:]))
    _hydra_main()


if __name__ == "__main__":
    main()
