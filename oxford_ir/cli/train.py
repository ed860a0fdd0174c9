"""``oxford-ir-train``: fit a retrieval network, evaluate it with the published protocol, log everything.

``train(cfg)`` holds the logic and is what tests call; ``main`` is the thin Hydra wrapper,
which also turns ``resume=<run folder>`` into "compose that run's config again and write
into that same folder" (Hydra would otherwise make a new folder).

Ctrl-C (SIGINT) at any point stops the run without a traceback, prints the ``resume with:`` line and exits with
130, the shell's status for SIGINT. Nothing is saved at the stop (``RunCheckpoint.on_exception``): ``last.ckpt``
stays the end of the last whole epoch, so ``resume=`` gives exactly the uninterrupted run's results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from oxford_ir.cli.hydra_typos import refuse_typos
from oxford_ir.cli.run_folder import (
    LAST_CHECKPOINT,
    RunInfo,
    checkpoint_step,
    distributed_scope,
    finish_wandb,
    instantiate_callbacks,
    instantiate_loggers,
    log_config,
    prepare_distributed,
    resolve_run,
    resume_overrides,
    run_folder_lock,
    save_wandb_id,
)
from oxford_ir.config import CONFIG_DIR, instantiate
from oxford_ir.errors import exit_on_user_error
from oxford_ir.extraction.overlap import find_overlap
from oxford_ir.fs import replace_file
from oxford_ir.models.checkpoint import load_retrieval_checkpoint
from oxford_ir.models.class_losses import fill_num_classes, random_batches_warning, takes_classes
from oxford_ir.models.validation import Evaluation
from oxford_ir.retrieval.model_whitening import save_run_whitening
from oxford_ir.retrieval.report import format_table

log = logging.getLogger(__name__)

#: the evaluations of a run, as printed at its end and written to table.txt
TABLE_TITLES = {"untrained": "Before training (untrained network)", "final": "After training (best checkpoint)"}


def table_titles(run: RunInfo, trained: bool) -> dict[str, str]:
    """What each table shows: before/after training, or for a run that does not train (``train=false``) the
    network as configured or the checkpoint given as ``ckpt_path``, evaluated once."""
    if trained:
        return TABLE_TITLES
    what = "the checkpoint given as ckpt_path" if run.ckpt_path is not None else "the network as configured"
    title = f"Evaluation (train=false: {what}, not trained)"
    return {"untrained": title, "final": title}


def _module_evaluations(module: Any) -> list[Evaluation]:
    """The module's last full evaluation of each evaluated benchmark, the monitored one first (empty when it skipped
    evaluating)."""
    found = list(getattr(module, "last_evaluations", None) or [])
    if not found and getattr(module, "last_evaluation", None) is not None:
        found = [module.last_evaluation]
    return [evaluation for evaluation in found if evaluation is not None]


def _evaluation_table(module: Any) -> str | None:
    """The table of the module's last full evaluation (a row per evaluated benchmark), or None when it skipped."""
    found = _module_evaluations(module)
    if not found:
        return None
    rows: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}
    for evaluation in found:
        benchmark = evaluation.benchmark
        if evaluation.unwhitened is not None:  # the configured whitening's row first, then the network alone
            rows[f"{benchmark.name} + {module.hparams.whitening['kind']} whitening"] = evaluation.metrics
            rows[benchmark.name] = evaluation.unwhitened
        else:
            rows[benchmark.name] = evaluation.metrics
        notes[benchmark.name] = benchmark.subset_note
    return format_table(rows, notes)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit ``cfg.model`` on ``cfg.data``; returns the final metrics and the objects built.

    Writes checkpoints (``last.ckpt`` and the best by ``val/mAP``), logs and W&B files
    under ``cfg.paths.output_dir``. ``cfg.resume`` / ``cfg.ckpt_path`` continue a run.
    """
    run: RunInfo = resolve_run(cfg)
    try:
        return _train(cfg, run)
    except KeyboardInterrupt:
        _print_stopped(run)
        raise


def _train(cfg: DictConfig, run: RunInfo) -> tuple[dict[str, float], dict[str, Any]]:
    pl.seed_everything(int(cfg.seed), workers=True)

    log.info("data <%s>", cfg.data._target_)
    datamodule: pl.LightningDataModule = instantiate(cfg.data, "data")
    guard = getattr(datamodule, "overlap_guard", None)  # data.exclude_overlap: the data layer cannot embed images
    if guard is not None:
        guard.finder = find_overlap
    _fill_class_count(cfg, datamodule)
    log.info("model <%s>", cfg.model._target_)
    model: pl.LightningModule = hydra.utils.instantiate(cfg.model, _recursive_=False)
    warning = random_batches_warning(getattr(model, "loss_fn", None), OmegaConf.select(cfg, "data.sampler"))
    if warning is not None and rank_zero_only.rank == 0:
        log.warning(warning)
    if run.ckpt_path is not None:
        # fail here, with the file named, rather than deep inside Trainer.fit
        load_retrieval_checkpoint(run.ckpt_path, expected=model)
        if run.resumed:
            run.resume_step = checkpoint_step(run.ckpt_path)

    loggers = instantiate_loggers(cfg.get("logger"), run)
    callbacks = instantiate_callbacks(cfg.get("callbacks"), has_logger=bool(loggers))
    trainer: pl.Trainer = instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    prepare_distributed(cfg, trainer, model)
    # the run folder's files are written by one process of a DDP run, which holds its lock
    folder_lock = run_folder_lock(run) if trainer.is_global_zero else contextlib.nullcontext()

    metrics: dict[str, float] = {}
    tables: dict[str, str] = {}
    evaluations: dict[str, dict] = {}
    try:
        with folder_lock, distributed_scope(), _ctrl_c_raised(trainer):  # the scope closes the process group
            if trainer.is_global_zero:
                save_wandb_id(run)
            log_config(cfg, loggers, model)
            if cfg.get("validate_before_training") and run.ckpt_path is None:
                trainer.validate(model, datamodule=datamodule, verbose=False)
                tables["untrained"] = _evaluation_table(model) or ""
                evaluations["untrained"] = _evaluation_metrics(model)
                metrics.update({f"untrained/{k}": float(v) for k, v in trainer.callback_metrics.items()})
                if trainer.is_global_zero:
                    _write_json(run.output_dir / UNTRAINED_FILE, _untrained(metrics, evaluations, tables))
            elif cfg.get("validate_before_training") and run.resumed:
                _restore_untrained(run.output_dir / UNTRAINED_FILE, metrics, evaluations, tables)
            if cfg.get("train", True):
                trainer.fit(model, datamodule=datamodule, ckpt_path=str(run.ckpt_path) if run.ckpt_path else None)
                metrics.update(_fit_metrics(trainer))
                if guard is not None and guard.summary is not None:  # what the overlap guard found, and the pairs
                    metrics.update(guard.metrics())
                    if trainer.is_global_zero:
                        _write_json(run.output_dir / "overlap.json", guard.summary)
            trains = bool(cfg.get("train", True))
            # without training, the network evaluated before training is the final one: not evaluated twice
            if cfg.get("test", True) and not trainer.fast_dev_run and (trains or "untrained" not in tables):
                best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
                if not trains and run.ckpt_path is not None:
                    best = str(run.ckpt_path)  # evaluating a checkpoint: its weights, not the config's
                trainer.validate(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
                tables["final"] = _evaluation_table(model) or ""
                evaluations["final"] = _evaluation_metrics(model)
                metrics.update({f"final/{k}": float(v) for k, v in trainer.callback_metrics.items()})
                if trainer.is_global_zero:
                    whitening = save_run_whitening(getattr(model, "last_whitening", None), best, cfg.get("whitening"))
                    if whitening is not None:
                        log.info("whitening of the best checkpoint: %s", whitening)
            if trainer.is_global_zero:
                _write_results(run, metrics, evaluations, tables, trained=bool(cfg.get("train", True)))
    finally:
        finish_wandb()

    if trainer.is_global_zero:
        _print_summary(tables, run, trainer, trained=bool(cfg.get("train", True)))
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer, "run": run, "tables": tables}


def _fill_class_count(cfg: DictConfig, datamodule: Any) -> None:
    """A loss with a weight per class (``loss=arcface``, ...) is built with one for each training label: its
    ``num_classes`` is the datamodule's, read from the split (the benchmark prepared first: the synthetic one
    written, a real one checked), so the checkpoint's hyperparameters hold the number."""
    loss = OmegaConf.select(cfg, "model.loss")
    if loss is None or not takes_classes(loss):
        return
    datamodule.prepare_data()
    datamodule.setup("validate")  # the split's labels; the training images are checked when fitting starts
    with open_dict(cfg):
        fill_num_classes(cfg.model.loss, datamodule.split.num_classes)


@contextlib.contextmanager
def _ctrl_c_raised(trainer: pl.Trainer) -> Iterator[None]:
    """Ctrl-C as a KeyboardInterrupt: Lightning turns one in ``fit``/``validate`` into ``sys.exit(1)`` after its
    graceful shutdown (callbacks' ``on_exception``, loggers finalised, workers stopped)."""
    try:
        yield
    except SystemExit as stop:
        if stop.code == 1 and trainer.state.status == TrainerStatus.INTERRUPTED:
            raise KeyboardInterrupt from None
        raise


def _print_stopped(run: RunInfo) -> None:
    """What a Ctrl-C leaves and how to go on (stdout, as the summary of a finished run; global rank 0 only)."""
    if rank_zero_only.rank != 0:
        return
    last = run.output_dir / LAST_CHECKPOINT
    kept = f"{last} holds the last whole epoch" if last.is_file() else "no checkpoint was saved yet"
    print(f"\nstopped (Ctrl-C): {kept}; the interrupted epoch is trained again on resume", flush=True)
    print(f"run folder:   {run.output_dir}")
    print(f"resume with:  oxford-ir-train resume={run.output_dir}", flush=True)


def _fit_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """What training logged last; for a run resumed after its last epoch (nothing left to train), what it had
    logged by the time of that checkpoint, as the checkpoint callback stored it."""
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    restored = getattr(trainer.checkpoint_callback, "restored_metrics", None)
    return logged or dict(restored or {})


def _evaluation_metrics(module: Any) -> dict[str, dict[str, float]]:
    """``{benchmark: metrics}`` of the module's last full evaluation, at full precision (not the logged float32)."""
    return {e.benchmark.name: {k: float(v) for k, v in e.metrics.items()} for e in _module_evaluations(module)}


#: the untrained network's evaluation, kept in the run folder so that a resumed run reports it too
UNTRAINED_FILE = "untrained.json"


def _untrained(metrics: dict[str, float], evaluations: dict[str, dict], tables: dict[str, str]) -> dict:
    return {
        "metrics": {k: v for k, v in metrics.items() if k.startswith("untrained/")},
        "evaluation": evaluations.get("untrained", {}),
        "table": tables.get("untrained", ""),
    }


def _restore_untrained(
    path: Path, metrics: dict[str, float], evaluations: dict[str, dict], tables: dict[str, str]
) -> None:
    """The interrupted run's evaluation of the untrained network (a resume does not evaluate it again)."""
    if not path.is_file():
        log.warning("%s is missing: the resumed run's table has no 'before training' row", path)
        return
    saved = json.loads(path.read_text())
    metrics.update(saved["metrics"])
    evaluations["untrained"] = saved["evaluation"]
    tables["untrained"] = saved["table"]


def _write_results(
    run: RunInfo, metrics: dict[str, float], evaluations: dict[str, dict], tables: dict[str, str], trained: bool
) -> None:
    """``metrics.json`` (logged metrics and the evaluation tables' values) and ``table.txt``, atomically."""
    results = {"metrics": metrics, "evaluations": {k: v for k, v in evaluations.items() if v}}
    _write_json(run.output_dir / "metrics.json", results)
    titles = table_titles(run, trained)
    text = "".join(f"{titles[key]}\n{table}\n\n" for key, table in tables.items() if table)
    if text:
        _write_text(run.output_dir / "table.txt", text)


def _write_json(path: Path, value: Any) -> None:
    _write_text(path, json.dumps(value, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temp file beside it, fsynced, renamed over it)."""
    replace_file(path, text.encode())


def _print_summary(tables: dict[str, str], run: RunInfo, trainer: pl.Trainer, *, trained: bool = True) -> None:
    """The evaluation tables and where the run's files are: only those that exist (a run that did not train has no
    checkpoints to name and nothing to resume)."""
    titles = table_titles(run, trained)
    for key, table in tables.items():
        if table:
            print(f"\n{titles[key]}\n{table}")
    checkpoint = trainer.checkpoint_callback
    print(f"\nrun folder:   {run.output_dir}")
    if checkpoint is not None and checkpoint.dirpath and Path(checkpoint.dirpath).is_dir():
        print(f"checkpoints:  {checkpoint.dirpath} (best: {Path(checkpoint.best_model_path).name or '-'}, last.ckpt)")
    if run.wandb_dir is not None and run.wandb_dir.exists():
        print(f"W&B files:    {run.wandb_dir}  (upload with: wandb sync {run.wandb_dir}/offline-run-*)")
    if trained and (run.output_dir / LAST_CHECKPOINT).is_file():
        print(f"resume with:  oxford-ir-train resume={run.output_dir}")


def _selection_metric(metrics: dict[str, float], cfg: DictConfig) -> float:
    """The value a sweeper maximises (``optimized_metric``, default ``val/mAP``)."""
    name = cfg.get("optimized_metric") or "val/mAP"
    if name not in metrics and not cfg.get("train", True):  # nothing trained: the evaluation is the result
        name = next((f"{when}/{name}" for when in ("final", "untrained") if f"{when}/{name}" in metrics), name)
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
    previous = _ctrl_c_in_this_process_only()
    try:
        refuse_typos("train")  # a mistyped key or option: one line with its close match
        _hydra_main()
    except KeyboardInterrupt:  # train() printed where the run stands and the resume command
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        if previous is not None:  # None: a handler not set from Python, left in place
            signal.signal(signal.SIGINT, previous)


def _ctrl_c_in_this_process_only() -> Any:
    """Ctrl-C raises KeyboardInterrupt in this process only. A terminal sends SIGINT to every process of the
    command, and a DataLoader worker forked with Python's handler that gets it before torch's worker loop catches
    it would print a traceback of its own; workers ignore it instead (this process stops them). Returns the handler
    it replaced."""
    main_pid = os.getpid()

    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt)
    return previous


#: the conventional exit status of a command stopped by SIGINT (128 + 2)
EXIT_INTERRUPTED = 130


if __name__ == "__main__":
    main()
