"""The run folder, resuming, loggers and callbacks: what a training run needs besides the model.

A run is one Hydra output folder. It holds ``checkpoints/`` (``last.ckpt`` and the best),
``wandb/`` and ``wandb_run_id`` (so that a resumed run continues the same W&B run), and
``.hydra/overrides.yaml`` (so that ``resume=<folder>`` composes the same config again).
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from oxford_ir.errors import ConfigError

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
            raise ConfigError(
                f"resume={resume}: {ckpt_path} does not exist; the run saved no checkpoint yet "
                "(it stopped before its first epoch ended). Start a new run instead."
            )
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

    id_file = output_dir / WANDB_ID_FILE
    if resumed and id_file.is_file():
        wandb_id = id_file.read_text().strip()
    else:
        wandb_id = secrets.token_hex(4)  # W&B run ids: short, lowercase alphanumeric
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(wandb_id + "\n")
        os.replace(tmp, id_file)

    choices, group = _hydra_choices()
    tags = [str(t) for t in (cfg.get("tags") or [])]
    for key, value in (("experiment", choices.get("experiment")), ("backbone", choices.get("backbone"))):
        if value:
            tags.append(f"{key}:{value}")
    benchmark = OmegaConf.select(cfg, "data.benchmark")
    if benchmark:
        tags.append(f"dataset:{benchmark}")
    return RunInfo(output_dir, ckpt_path, resumed, wandb_id, group, list(dict.fromkeys(tags)))


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
    return [*kept, *given, f"hydra.run.dir={target.resolve()}"]


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
        callbacks.append(hydra.utils.instantiate(node))
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
            loggers.append(hydra.utils.instantiate(node, **extra))
        else:
            loggers.append(hydra.utils.instantiate(node))
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
