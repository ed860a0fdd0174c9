"""What a config read back from a file may build.

Hydra builds whatever a ``_target_`` names, so a config in a file is code: an index manifest whose embedder names
``pathlib.Path.write_text`` writes a file on the machine that searches the index. The configs a user composes in
this run (``conf/`` and the command line) are theirs to trust; a config the program reads back from a file (an
index manifest, a checkpoint's hyperparameters, a whitening file's info, a run folder's saved overrides) may come
from anyone who could write that file, so every ``_target_`` in it must name a class of the parts this project
builds: its own models, data module and callbacks, and the classes of the libraries it composes (torch
optimizers and schedulers, pytorch-metric-learning, Lightning's callbacks and loggers).

The check reads the name before it imports anything (importing a module runs it), then imports only modules under
those packages and requires a class defined there: ``torch.optim.Adam`` passes; ``os.system``,
``builtins.exec``, ``pathlib.Path.write_text``, ``shutil.rmtree``, ``importlib.import_module``, a function of the
project's own (``oxford_ir.fs...``) or a class merely imported into a trusted module do not.

A user who builds their own parts (``_target_: mylab.models.Backbone``) and reloads what they wrote adds the module
to ``OXFORD_IR_TRUSTED_TARGETS`` (comma-separated module or package names).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from oxford_ir.errors import UntrustedConfigError

#: environment variable naming more trusted modules or packages, comma-separated
TRUST_VARIABLE = "OXFORD_IR_TRUSTED_TARGETS"

#: packages whose classes a file may name (a class must be defined in one of them, not only imported there)
TRUSTED_PACKAGES = (
    "oxford_ir.models",
    "oxford_ir.data.datamodule",
    "oxford_ir.callbacks",
    "torch.optim",
    "pytorch_metric_learning.losses",
    "pytorch_metric_learning.miners",
    "pytorch_metric_learning.distances",
    "pytorch_metric_learning.reducers",
    "pytorch_metric_learning.regularizers",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "pytorch_lightning.callbacks",
    "pytorch_lightning.loggers",
)
#: single classes outside those packages, by the name a config uses -> the module that must define them
TRUSTED_CLASSES = {
    "lightning.pytorch.Trainer": "lightning.pytorch.trainer.trainer",
    "pytorch_lightning.Trainer": "pytorch_lightning.trainer.trainer",
}

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def check_trusted(config: Any, source: str, key: str = "") -> None:
    """Refuse ``config`` (a mapping or list, nested; a DictConfig is read as plain data) when any ``_target_`` in
    it names something other than a trusted class: one :class:`UntrustedConfigError` naming ``source`` (the file),
    the key and the target. Nothing is built, and nothing but trusted modules is imported."""
    for where, target in _targets(_plain(config), key):
        if not is_trusted(target):
            shown = f"{where}._target_" if where else "_target_"
            raise UntrustedConfigError(
                f"{source}: {shown}={str(target)[:120]!r} is refused: a config read back from a file may only build "
                "the project's own models, data module and callbacks and the torch.optim, pytorch-metric-learning "
                "and Lightning classes it composes, and nothing was built. If you wrote this file yourself and "
                f"trust it, name the module in {TRUST_VARIABLE}=<module>[,<module>...]"
            )


def check_saved_overrides(overrides: Sequence[str], source: str, decided: Sequence[str] = ()) -> None:
    """Refuse Hydra overrides read back from ``source`` (a run's ``.hydra/overrides.yaml``) that set an untrusted
    ``_target_`` (as the key's last part, or inside a dict or list value) or touch Hydra's own settings (``hydra.*``,
    which a run never saves there and which could set the job's environment or callbacks). Overrides of a key that
    this run's own command line sets or deletes (``decided``, or a key under one) are the user's to decide."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def user_decides(key: str) -> bool:
        return any(key == d or key.startswith(d + ".") for d in decided)

    for text in overrides:
        try:
            (override,) = OverridesParser.create().parse_overrides([text])
        except Exception as error:
            raise UntrustedConfigError(f"{source}: cannot read the saved override {text!r}: {error}") from None
        key = override.key_or_group
        if user_decides(key):
            continue
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            raise UntrustedConfigError(
                f"{source}: the saved override {text!r} sets Hydra's own settings, which a run never saves there; "
                "the file was edited: remove the line, or start a new run"
            )
        value = None if override.is_delete() else override.value()
        if key.rsplit(".", 1)[-1] == "_target_":
            value = {"_target_": value}
            key = key.rsplit(".", 1)[0]
        check_trusted(value, source, key)


def is_trusted(target: Any) -> bool:
    """Whether ``target`` (a dotted name) is a class of a trusted package, checked by name before importing."""
    if not isinstance(target, str) or not _NAME.match(target):
        return False
    module_name, _, name = target.rpartition(".")
    packages = (*TRUSTED_PACKAGES, *_user_packages())
    if target in TRUSTED_CLASSES:
        defined_in = (TRUSTED_CLASSES[target],)
    elif _under(module_name, packages):
        defined_in = packages
    else:
        return False
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return True  # nothing was imported, nothing runs: the builder reports the missing module
    if not hasattr(module, name):
        return True  # nothing to run: the builder says there is no such class
    value = getattr(module, name)
    return inspect.isclass(value) and _under(getattr(value, "__module__", "") or "", defined_in)


def _user_packages() -> tuple[str, ...]:
    return tuple(p.strip() for p in os.environ.get(TRUST_VARIABLE, "").split(",") if p.strip())


def _under(module: str, packages: Sequence[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _targets(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    """``(key, target)`` of every ``_target_`` in a nested structure, outermost first."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            yield key, value["_target_"]
        for k, v in value.items():
            yield from _targets(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _targets(v, f"{key}[{i}]")


def _plain(config: Any) -> Any:
    """A DictConfig/ListConfig as plain containers, interpolations unresolved (resolving could read the
    environment on behalf of the file); anything else as it is."""
    with contextlib.suppress(ImportError):
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(config, (DictConfig, ListConfig)):
            return OmegaConf.to_container(config, resolve=False)
    return config
