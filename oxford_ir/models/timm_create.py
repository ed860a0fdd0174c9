"""Building a timm model by name, and its weights: ``pretrained`` (timm's download), ``none`` or a local file.

A name timm does not know is refused with the closest names (``difflib`` over ``timm.list_models()``). A local file is
read by timm as if downloaded (so the conversions timm applies to original checkpoints apply to it), and checked key
for key: timm loads a model without its classifier non-strictly and only logs what did not fit, and a half-loaded
backbone would only show up as poor mAP. timm is imported on first use: it costs seconds that a command not using
it should not pay.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from oxford_ir.errors import CheckpointError, ConfigError
from oxford_ir.models import timm_vit

#: ``timm.create_model`` arguments that ``backbone.model_args`` may not set
_RESERVED_ARGS = frozenset(
    {
        "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "num_classes",
        "features_only", "img_size", "dynamic_img_size", "dynamic_img_pad",
    }
)  # fmt: skip


def import_timm() -> Any:
    """timm, imported on first use (it costs seconds, which a command that does not use it should not pay)."""
    try:
        import timm
    except ImportError:
        raise ConfigError(
            "backbone=timm needs the timm package: pip install 'oxford-ir[timm]' (or pip install timm)"
        ) from None
    return timm


def check_name(name: str) -> str:
    """``name`` if timm knows it (``<architecture>`` or ``<architecture>.<pretrained tag>``), else one error
    listing the closest names."""
    timm = import_timm()
    name = str(name).strip()
    arch, _, tag = name.partition(".")
    known = timm.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "timm.list_models('<pattern>') lists the names"
        raise ConfigError(f"backbone.name={name!r}: timm has no such model; {hint}")
    if tag:
        tagged = timm.list_pretrained(f"{arch}.*")
        if name not in tagged:
            shown = ", ".join(tagged[:8]) or f"none (use backbone.name={arch} with backbone.weights=none)"
            raise ConfigError(f"backbone.name={name!r}: timm has no weights tagged {tag!r} for {arch}; it has {shown}")
    return name


def is_vit(name: str) -> bool:
    """Whether timm defines ``name`` in one of the ViT modules handled by :mod:`oxford_ir.models.timm_vit`."""
    models = import_timm().models
    return bool(models.is_model_in_modules(models.get_arch_name(name), list(timm_vit.VIT_MODULES)))


def create_model(name: str, weights: str | Path | None, kwargs: dict) -> nn.Module:
    """``timm.create_model(name)`` without classifier, with ``weights`` "pretrained", "none" or a local file."""
    try:
        return _create_model(name, weights, kwargs)
    except TypeError as error:  # an argument the model's constructor does not take
        raise ConfigError(f"backbone.model_args: timm's {name} refuses them ({_first_line(error)})") from None


def _create_model(name: str, weights: str | Path | None, kwargs: dict) -> nn.Module:
    timm = import_timm()
    choice = "none" if weights is None else str(weights).strip()
    if choice.lower() in ("none", "null", "random", ""):
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if choice.lower() == "pretrained":
        try:
            return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        except (OSError, RuntimeError, ValueError) as error:  # no internet, no weights for this name, bad hash
            raise ConfigError(
                f"the pretrained weights of timm {name} could not be loaded ({type(error).__name__}: "
                f"{_first_line(error)}); on a machine without internet give a local file with "
                "backbone.weights=/path/to/file (.pth or .safetensors, e.g. from timm's download on another machine), "
                "or use backbone.weights=none for random initialisation"
            ) from None
    path = Path(choice).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"backbone.weights={choice!r}: no such file {path}; give backbone.weights=pretrained, none, or "
            f"/path/to/file (the weights of timm's {name}, .pth or .safetensors)"
        )
    overlay = {"file": str(path.resolve())}
    try:
        with _load_reports() as reports:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs)
    except RuntimeError as error:
        text = str(error)
        if "state_dict" not in text:
            raise CheckpointError(f"{path}: cannot read the weights file ({_first_line(error)})") from None
        raise _not_weights_of(path, name, _load_problems(text)) from None
    except TypeError:
        raise
    except Exception as error:  # any failure to unpickle means the same thing to the user
        raise CheckpointError(
            f"{path}: cannot read the weights file ({type(error).__name__}: {_first_line(error)}); it is corrupt or "
            "not a state dict saved with torch.save or safetensors"
        ) from None
    if reports:  # timm loads without its classifier non-strictly and only logs what did not fit
        raise _not_weights_of(path, name, "; ".join(reports))
    return model


def _not_weights_of(path: Path, name: str, problems: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: these are not weights of timm {name}: {problems}. Give a state dict of that model "
        f"(torch.save(timm.create_model({name!r}, pretrained=True).state_dict(), path)), "
        "backbone.weights=pretrained or backbone.weights=none"
    )


@contextlib.contextmanager
def _load_reports() -> Iterator[list[str]]:
    """The keys timm's loader reports missing or unexpected (it loads non-strictly once the classifier is dropped,
    and logs them), as ``"3 missing (a, b, c)"`` lines."""
    reports: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.match(r"(Missing|Unexpected) keys \((.*)\) (?:discovered|found)", record.getMessage())
            if found:
                keys = found.group(2).split(", ")
                shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
                reports.append(f"{len(keys)} {found.group(1).lower()} ({shown})")

    logger = logging.getLogger("timm.models._builder")
    handler, level = Handler(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield reports
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _load_problems(text: str) -> str:
    """``load_state_dict``'s error summarised: how many keys are missing, unexpected or reshaped, a few named."""
    problems = []
    for label, pattern in (("missing", "Missing key"), ("unexpected", "Unexpected key")):
        for line in text.splitlines():
            if pattern in line:
                keys = re.findall(r'"([^"]+)"', line)
                problems.append(f"{len(keys)} {label} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})")
    reshaped = re.findall(r"size mismatch for ([\w.]+)", text)
    if reshaped:
        problems.append(f"{len(reshaped)} with another shape ({', '.join(reshaped[:5])})")
    return "; ".join(problems) or _first_line(RuntimeError(text))


def check_model_args(model_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """``backbone.model_args`` as keyword arguments, without those that say where weights come from or what the
    model outputs: ``backbone.weights`` is the one way to name weights, also in a config read back from an index
    manifest (which may only build what :mod:`oxford_ir.trusted_targets` allows, from files it names itself)."""
    args = {str(k): v for k, v in (model_args or {}).items()}
    taken = sorted(set(args) & _RESERVED_ARGS)
    if taken:
        raise ConfigError(
            f"backbone.model_args sets {', '.join(taken)}, which backbone=timm decides itself: name weights with "
            "backbone.weights= and a ViT's size with backbone.img_size="
        )
    return args
