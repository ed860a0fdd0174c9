"""The run folder, resuming, loggers and callbacks: what a training run needs besides the model.

A run is one Hydra output folder. It holds ``checkpoints/`` (``last.ckpt`` and the best),
``wandb/`` and ``wandb_run_id`` (so that a resumed run continues the same W&B run), and
``.hydra/overrides.yaml`` (so that ``resume=<folder>`` composes the same config again).
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from oxford_ir.cli.library_notices import without_anonymous_setting
from oxford_ir.config import instantiate
from oxford_ir.errors import ConfigError
from oxford_ir.fs import exclusive_lock
from oxford_ir.trusted_targets import check_saved_overrides

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


@dataclass
class RunInfo:
    """Where a run writes, what it resumes from, and its W&B identity."""

    output_dir: Path
    ckpt_path: Path | None
    resumed: bool
    wandb_id: str
    wandb_group: str | None
    tags: list[str]
    #: the global step of the checkpoint a resumed run continues from (None: a new run)
    resume_step: int | None = None

    @property
    def wandb_dir(self) -> Path | None:
        return self.output_dir / "wandb"


def _hydra_choices() -> tuple[dict[str, str], str | None]:
    """Config-group choices of this run and, for a multirun job, the sweep folder's name."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}, None
    hydra_cfg = HydraConfig.get()
    choices = {k: str(v) for k, v in hydra_cfg.runtime.choices.items() if v is not None}
    group = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        group = Path(hydra_cfg.sweep.dir).name
    return choices, group


def _is_run_folder(path: Path) -> bool:
    return (path / ".hydra").is_dir() or (path / WANDB_ID_FILE).is_file()


def resolve_run(cfg: DictConfig) -> RunInfo:
    """Work out the run folder, the checkpoint to resume and the W&B id; validate them."""
    output_dir = Path(cfg.paths.output_dir).resolve()
    resume, ckpt = cfg.get("resume"), cfg.get("ckpt_path")
    if resume and ckpt:
        raise ConfigError("give either resume=<run folder> or ckpt_path=<file>, not both")
    ckpt_path: Path | None = None
    resumed = False
    if resume:
        folder = Path(resume).resolve()
        if not folder.is_dir():
            raise ConfigError(f"resume={resume}: no such run folder")
        ckpt_path = folder / LAST_CHECKPOINT
        if not ckpt_path.is_file():
            if not _is_run_folder(folder):
                raise ConfigError(
                    f"resume={resume}: {ckpt_path} does not exist and {folder} is not a run folder (no .hydra/); "
                    "pass the folder printed as 'run folder' by oxford-ir-train, or start a new run"
                )
            # stopped before its first checkpoint: start the run again from the beginning, in its own folder
            log.info("resume=%s: the run saved no checkpoint yet; it starts again from the beginning", resume)
            ckpt_path = None
        if folder != output_dir:
            raise ConfigError(
                f"resume={resume} but this run writes to {output_dir}; resume through `oxford-ir-train resume=...` "
                "(which reuses the folder) or set paths.output_dir to the run folder"
            )
        resumed = True
    elif ckpt:
        ckpt_path = Path(ckpt).resolve()
        if not ckpt_path.is_file():
            raise ConfigError(f"ckpt_path={ckpt}: no such checkpoint file")
        resumed = ckpt_path.parent.parent == output_dir
    output_dir.mkdir(parents=True, exist_ok=True)

    # written by save_wandb_id on global rank 0 only: every DDP process resolves the run, one owns the folder
    id_file = output_dir / WANDB_ID_FILE
    # W&B run ids: short, lowercase alphanumeric
    wandb_id = id_file.read_text().strip() if resumed and id_file.is_file() else secrets.token_hex(4)

    choices, group = _hydra_choices()
    tags = [str(t) for t in (cfg.get("tags") or [])]
    for key, value in (("experiment", choices.get("experiment")), ("backbone", choices.get("backbone"))):
        if value:
            tags.append(f"{key}:{value}")
    benchmark = OmegaConf.select(cfg, "data.benchmark")
    if benchmark:
        tags.append(f"dataset:{benchmark}")
    return RunInfo(output_dir, ckpt_path, resumed, wandb_id, group, list(dict.fromkeys(tags)))


def checkpoint_step(path: Path) -> int:
    """The global step stored in a (validated) Lightning checkpoint, read without loading its tensors."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))


RUN_LOCK = ".lock"


def run_folder_lock(run: RunInfo) -> AbstractContextManager[None]:
    """Hold ``<run>/.lock`` while the run writes its folder; a second process on the same folder is refused.

    Two processes resuming (or writing) one run folder would interleave checkpoints and logs. The lock dies with
    its process (:func:`oxford_ir.fs.exclusive_lock`), so a run killed with SIGKILL never leaves it stale. Take it
    on global rank 0 only (the other processes of a DDP run share the folder with it).
    """

    def busy(pid: int | None) -> ConfigError:
        holder = f"pid {pid}" if pid else "another process"
        return ConfigError(
            f"run folder {run.output_dir} is in use by {holder}: wait for that run to end (or stop it), "
            "then run the command again"
        )

    return exclusive_lock(run.output_dir / RUN_LOCK, wait=False, busy=busy)


def save_wandb_id(run: RunInfo) -> None:
    """Store the run's W&B id in its folder (atomically), so that ``resume=`` continues the same W&B run.

    Call it on global rank 0 only: the other processes of a DDP run draw ids of their own, which nothing uses.
    """
    id_file = run.output_dir / WANDB_ID_FILE
    if id_file.is_file() and id_file.read_text().strip() == run.wandb_id:
        return
    tmp = id_file.with_suffix(".tmp")
    tmp.write_text(run.wandb_id + "\n")
    os.replace(tmp, id_file)


#: Hydra overrides that configure the sweep, not the job: left out when a multirun job re-launches itself
SWEEP_OVERRIDES = (
    "hydra.mode",
    "hydra.sweep",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.run.dir",
    "hydra.job.num",
    "hydra.job.id",
)


def prepare_distributed(cfg: DictConfig, trainer: pl.Trainer, model: pl.LightningModule) -> None:
    """Checks and set-up for a distributed trainer, before ``fit`` starts any process.

    ``strategy=ddp`` starts the local ranks 1..N-1 by running the command line again (Lightning adds
    ``hydra.run.dir=<this run>``). In a single run that is right. In a multirun job the command line is the
    whole sweep (``-m``, comma lists) and ``hydra.run.dir`` is not the job's folder: each new process would run
    the sweep again. So a multirun job rewrites both into its own overrides and its own folder. Processes that
    SLURM starts (one task per device) are not re-launched and need nothing.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    from omegaconf import open_dict, read_write
    from torch import nn

    sync_batchnorm = bool(OmegaConf.select(cfg, "trainer.sync_batchnorm", default=False))
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if sync_batchnorm and has_batchnorm and isinstance(trainer.accelerator, CPUAccelerator):
        raise ConfigError(
            "trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm runs on CUDA only) and this run is on "
            "the CPU: use trainer=ddp_cpu, or add trainer.sync_batchnorm=false"
        )

    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _SubprocessScriptLauncher) or launcher.cluster_environment.creates_processes_externally:
        return
    if trainer.num_devices * trainer.num_nodes <= 1 or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    launcher_target = str(OmegaConf.select(hydra_cfg, "launcher._target_", default=""))
    if not launcher_target.endswith(".BasicLauncher"):
        raise ConfigError(
            f"trainer.strategy=ddp starts its other processes by running the command line again, and a job of "
            f"{launcher_target.rsplit('.', 1)[-1] or 'this launcher'} runs in a worker process without one: run DDP "
            "sweeps with the default launcher (jobs one after another) or on SLURM (hydra/launcher=slurm, "
            "one task per device)"
        )
    kept = [o for o in hydra_cfg.overrides.hydra if not o.lstrip("+~").startswith(SWEEP_OVERRIDES)]
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, *kept]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    log.info("ddp: the other processes of this job run: %s", " ".join(sys.argv[1:]))


#: environment variables that Lightning's ``strategy=ddp`` launcher sets in the process that starts the others
LAUNCHER_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


@contextmanager
def distributed_scope() -> Iterator[None]:
    """Leave the process as a distributed run found it, so that the next job of a multirun can start its own.

    Lightning leaves the process group open after ``fit`` and ``validate``, and its launcher leaves ``LOCAL_RANK``
    and friends in the environment (and fewer torch threads). The next job in the same process would then reuse
    a group whose peers have exited, and, seeing ``LOCAL_RANK``, believe its processes were started for it and
    wait for ones that never come. Processes that leave the group to interpreter shutdown also race on gloo's
    teardown. So a group this run opened is closed at its end (after a barrier when the run succeeded, so that
    every rank finishes first; without one after a failure, when peers may be gone) and the environment restored.
    A group opened outside the run (e.g. by torchrun) is left alone.
    """
    import torch
    import torch.distributed as dist

    own_group = not (dist.is_available() and dist.is_initialized())
    environment = {key: os.environ.get(key) for key in LAUNCHER_ENVIRONMENT}
    threads = torch.get_num_threads()
    clean = False
    try:
        yield
        clean = True
    finally:
        if own_group and dist.is_available() and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(threads)


def resume_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides for ``resume=<folder>``: the folder's own overrides, then ours, same folder.

    ``ckpt_path=<run>/checkpoints/x.ckpt`` inside a run folder is treated the same way.
    """
    target = None
    for arg in argv:
        if arg.startswith("resume=") and arg.split("=", 1)[1] not in ("", "null"):
            target = Path(arg.split("=", 1)[1])
        elif arg.startswith("ckpt_path=") and arg.split("=", 1)[1] not in ("", "null"):
            candidate = Path(arg.split("=", 1)[1]).resolve().parent.parent
            if (candidate / ".hydra" / "overrides.yaml").is_file():
                target = candidate
    if target is None:
        return argv
    overrides_file = target / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        raise ConfigError(
            f"{target} is not a run folder of oxford-ir-train (no .hydra/overrides.yaml); "
            "pass the folder printed as 'run folder' at the end of a run"
        )
    saved = [str(o) for o in OmegaConf.load(overrides_file)]
    saved = [o for o in saved if not o.startswith(("resume=", "ckpt_path=", "hydra.run.dir="))]
    given = [a for a in argv if not a.startswith("hydra.run.dir=")]
    keys = {a.split("=", 1)[0].lstrip("+~") for a in given if "=" in a}
    kept = [o for o in saved if o.split("=", 1)[0].lstrip("+~") not in keys]
    check_saved_overrides(kept, str(overrides_file), decided=sorted(keys | _deleted(given)))
    return [*kept, *given, f"hydra.run.dir={target.resolve()}"]


def _deleted(argv: list[str]) -> set[str]:
    """Keys deleted by ``~key`` overrides (with or without ``=value``)."""
    return {a[1:].split("=", 1)[0] for a in argv if a.startswith("~")}


#: callbacks that only report to a logger; left out when the run has none (logger=none)
NEEDS_LOGGER = ("lightning.pytorch.callbacks.LearningRateMonitor",)


def instantiate_callbacks(cfg: DictConfig | None, has_logger: bool = True) -> list[pl.Callback]:
    """Every callback of the ``callbacks`` group (entries set to null are skipped)."""
    callbacks = []
    for name, node in (cfg or {}).items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"callbacks.{name} must be a config with _target_, got {node!r}")
        if not has_logger and node._target_ in NEEDS_LOGGER:
            log.info("callbacks.%s skipped: it reports to a logger and logger=none", name)
            continue
        callbacks.append(instantiate(node, f"callbacks.{name}"))
    return callbacks


def instantiate_loggers(cfg: DictConfig | None, run: RunInfo) -> list[pl.loggers.Logger]:
    """The configured loggers; the W&B one gets the run's id, group, tags and folder."""
    loggers = []
    for name, node in (cfg or {}).items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"logger.{name} must be a config with _target_, got {node!r}")
        if node._target_.endswith("WandbLogger"):
            mode = str(node.get("mode") or "offline")
            if mode not in ("online", "offline", "disabled", "shared"):
                raise ConfigError(f"logger.{name}.mode={mode!r}: use online, offline or disabled")
            run.wandb_dir.mkdir(parents=True, exist_ok=True)
            extra = {
                "id": node.get("id") or run.wandb_id,
                "group": node.get("group") or run.wandb_group,
                "tags": list(dict.fromkeys([*(node.get("tags") or []), *run.tags])),
                "resume": "allow",
            }
            loggers.append(without_anonymous_setting(instantiate(node, f"logger.{name}", **extra)))
        elif node._target_.endswith("RunCSVLogger"):
            loggers.append(instantiate(node, f"logger.{name}", keep_before_step=run.resume_step))
        else:
            loggers.append(instantiate(node, f"logger.{name}"))
    return loggers


def log_config(cfg: DictConfig, loggers: list[pl.loggers.Logger], model: pl.LightningModule) -> None:
    """Send the resolved config (and parameter counts) to every logger."""
    if not loggers:
        return
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    config["model/params/total"] = sum(p.numel() for p in model.parameters())
    config["model/params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for logger in loggers:
        logger.log_hyperparams(config)


def finish_wandb() -> None:
    """Close the current W&B run so the next multirun job starts its own (STYLE.md rule 8)."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return
    if wandb.run is not None:
        wandb.finish()
