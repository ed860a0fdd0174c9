"""The settings of :class:`~oxford_ir.models.module.RetrievalModule`, checked before anything is built.

Each part of the model arrives as a config with ``_target_``; :func:`part_config` turns it into the plain dict
that the checkpoint stores, :func:`require_target` and :func:`check_parts` refuse configs the module cannot build,
:func:`check_values` the numbers it cannot use, :func:`scheduler_parts` splits a scheduler config into the
scheduler and Lightning's settings (refusing unknown ones), :func:`check_loss_margins` a contrastive loss whose
margins point the wrong way for the distance, :func:`check_training_length` a trainer that never ends, and
:func:`check_optimizer_groups` an optimizer state of other parameter groups than the module trains. Every
refusal is one :class:`~oxford_ir.errors.ConfigError` naming the key (``model.<name>``) and the fix.
:func:`describe_config` summarises an embedder config for messages (also those about checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_metric_learning.losses import ContrastiveLoss

from oxford_ir.config import MAX_LEARNING_RATE, to_plain
from oxford_ir.errors import CheckpointError, ConfigError

#: Lightning's keys of an ``lr_scheduler`` dict that a scheduler config may set next to ``scheduler``
SCHEDULER_SETTINGS = ("interval", "frequency", "monitor", "strict", "name")


def part_config(value: Any, name: str, *, required: bool = True) -> dict | None:
    """The config of the part ``name`` (DictConfig or dict with ``_target_``) as a plain, resolved dict; refuses
    built objects."""
    if value is None:
        if required:
            raise ConfigError(f"model.{name} is required: give a config with _target_")
        return None
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"model.{name} must be a config with _target_, got a {type(value).__name__}; the module builds its "
            "parts itself (instantiate the model node with _recursive_: false)"
        )
    return to_plain(value)


def require_target(cfg: Mapping, name: str, *, partial: bool = False) -> None:
    """``cfg`` names the class to build (and, when ``partial``, is completed when training starts)."""
    if "_target_" not in cfg:
        raise ConfigError(f"model.{name} has no _target_ (keys: {sorted(cfg)}); it must name the class to build")
    if partial and cfg.get("_partial_") is not True:
        raise ConfigError(
            f"model.{name} ({cfg['_target_']}) needs _partial_: true: it is completed with the model's parameters "
            "(or the optimizer) when training starts"
        )


def check_parts(embedder: Mapping, loss: Mapping, distance: Mapping, optimizer: Mapping, miner: Mapping | None) -> None:
    """Every part names its class, the optimizer is partial, and neither the loss nor the miner sets its own
    distance (the one distance object is shared by both)."""
    for name, cfg in (("embedder", embedder), ("loss", loss), ("distance", distance)):
        require_target(cfg, name)
    require_target(optimizer, "optimizer", partial=True)
    for name, cfg in (("loss", loss), ("miner", miner)):
        if cfg is not None:
            require_target(cfg, name)
            if "distance" in cfg:
                raise ConfigError(
                    f"model.{name} sets its own distance; remove it and choose the one distance shared by the "
                    f"miner and the loss with distance=cosine|euclidean"
                )


def check_values(
    eval_scales: Sequence[float],
    kappas: Sequence[int],
    backbone_lr: float | None,
    freeze_backbone_epochs: int,
    **learning_rates: float | None,
) -> None:
    """Scales and k of P@k are positive, the learning rates of parameter groups (``backbone_lr`` and the
    ``learning_rates`` given by name, e.g. ``loss_lr``) too, the warm-up freeze is not negative."""
    if not eval_scales or min(eval_scales) <= 0:
        raise ConfigError(f"model.eval_scales={eval_scales}: give one or more positive scale factors, e.g. [1.0]")
    if not kappas or min(kappas) < 1:
        raise ConfigError(f"model.kappas={kappas}: give positive k for P@k, e.g. [1, 5, 10]")
    for name, lr in {"backbone_lr": backbone_lr, **learning_rates}.items():
        if lr is not None and not 0 < lr <= MAX_LEARNING_RATE:  # NaN fails both
            raise ConfigError(
                f"model.{name}={lr}: must be a positive learning rate of at most {MAX_LEARNING_RATE:g} "
                "(typical: 1e-5 to 1e-2), or null for the optimizer's lr"
            )
    if freeze_backbone_epochs < 0:
        raise ConfigError(f"model.freeze_backbone_epochs={freeze_backbone_epochs}: must be >= 0 (0 = never)")


def scheduler_parts(cfg: dict | None) -> tuple[dict | None, dict]:
    """Split a scheduler config into the scheduler's own config and Lightning's settings (interval, ...)."""
    if cfg is None:
        return None, {}
    if "_target_" in cfg:
        inner, settings = cfg, {}
    else:
        inner = cfg.get("scheduler")
        settings = {k: v for k, v in cfg.items() if k != "scheduler"}
        if not isinstance(inner, Mapping):
            raise ConfigError(
                f"model.scheduler must be a scheduler config with _target_ or {{scheduler: {{_target_: ...}}, "
                f"interval: epoch|step, ...}}; got keys {sorted(cfg)}"
            )
        unknown = sorted(set(settings) - set(SCHEDULER_SETTINGS))
        if unknown:
            raise ConfigError(
                f"model.scheduler: unknown settings {unknown}; allowed next to 'scheduler': {list(SCHEDULER_SETTINGS)}"
            )
    require_target(inner, "scheduler", partial=True)
    interval = settings.get("interval", "epoch")
    if interval not in ("epoch", "step"):
        raise ConfigError(f"model.scheduler.interval={interval!r}: use 'epoch' or 'step'")
    return dict(inner), settings


def probe_parameters() -> list[torch.nn.Parameter]:
    """A stand-in parameter to build the optimizer on before the model's parameters are trained."""
    return [torch.nn.Parameter(torch.zeros(1))]


def check_loss_margins(loss_fn: Any, distance: Any) -> None:
    """A contrastive loss whose margins point the wrong way for the distance trains on nothing useful."""
    if not isinstance(loss_fn, ContrastiveLoss):
        return
    pos, neg = loss_fn.pos_margin, loss_fn.neg_margin
    inverted = distance.is_inverted
    if (inverted and not pos > neg) or (not inverted and not pos < neg):
        kind = "a similarity (higher = closer)" if inverted else "a distance (lower = closer)"
        want = "pos_margin > neg_margin, e.g. 1.0 and 0.5" if inverted else "pos_margin < neg_margin, e.g. 0 and 0.7"
        raise ConfigError(
            f"loss=contrastive with pos_margin={pos}, neg_margin={neg}: {type(distance).__name__} is "
            f"{kind}, so it needs {want}"
        )


def check_training_length(trainer: pl.Trainer) -> None:
    """The trainer's epoch limits are whole numbers, and training has an end.

    Lightning takes ``max_epochs='abc'`` and fails deep inside ``fit``; ``max_epochs=-1`` without ``max_steps`` or
    ``max_time`` is its endless mode, whose final evaluation and cosine schedule never come. Called when ``fit``
    starts, before any step.
    """
    from lightning.pytorch.callbacks import Timer

    for key in ("max_epochs", "min_epochs"):
        value = getattr(trainer, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < -1):
            raise ConfigError(
                f"trainer.{key}={value!r}: expected a whole number of epochs (0 or more), e.g. trainer.{key}=10"
            )
    endless = trainer.max_epochs == -1 and trainer.max_steps == -1
    if endless and not any(isinstance(callback, Timer) for callback in trainer.callbacks):
        raise ConfigError(
            "trainer.max_epochs=-1 with no trainer.max_steps or trainer.max_time trains forever and never reaches "
            "the final evaluation; give the number of epochs (e.g. trainer.max_epochs=10) or a trainer.max_steps"
        )


def describe_config(cfg: Any) -> str:
    """``ScratchCNN(channels=[8, 16]) + GeM(p=3.0)``-style summary of an embedder config, for messages."""
    if not isinstance(cfg, Mapping):
        return repr(cfg)
    target = str(cfg.get("_target_", "?")).rsplit(".", 1)[-1]
    args = []
    for key, value in cfg.items():
        if key.startswith("_"):
            continue
        args.append(f"{key}={describe_config(value)}" if isinstance(value, Mapping) else f"{key}={value!r}")
    return f"{target}({', '.join(args)})"


def check_optimizer_groups(checkpoint: Mapping[str, Any], groups: Sequence[Mapping[str, Any]]) -> None:
    """The checkpoint's optimizer state has the parameter groups ``groups`` (names and sizes) that resuming loads it
    into: one written before GeM's p and the loss's weights had groups of their own (``pooling``, ``loss``) has
    not, and torch would stop deep inside the resume."""
    states = checkpoint.get("optimizer_states") or []
    if not states or not isinstance(states[0], Mapping):
        return
    saved = [(g.get("name", "?"), len(g.get("params", []))) for g in states[0].get("param_groups", [])]
    wanted = [(g["name"], len(g["params"])) for g in groups]
    if [size for _, size in saved] != [size for _, size in wanted]:
        raise CheckpointError(
            f"the checkpoint's optimizer state has the parameter groups {saved} and this version trains {wanted} "
            "(GeM's p in group pooling, a loss's weights in group loss): it cannot resume that training; resume with "
            "the version that wrote it (its weights still load in oxford-ir-eval and oxford-ir-index)"
        )
