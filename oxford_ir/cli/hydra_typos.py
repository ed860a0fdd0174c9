"""``did you mean ...?`` for a mistyped key or config option on a Hydra command line.

Hydra answers ``trainer.max_epoch=3`` with "To append to your config use +trainer.max_epoch=3", which adds a key
nothing reads, and ``backbone=resnet5`` with a list of options. Both come before the task function runs, so a
console script calls :func:`refuse_typos` before its ``@hydra.main`` function: the overrides are composed once with
Hydra's compose API and, when that fails on a key or option with a close match (:mod:`difflib`), the command stops
with one line, ``error: trainer.max_epoch: no such key; did you mean trainer.max_epochs?``, and exit status 1 (as
Hydra's own refusals). Everything else (no close match, a sweep, ``--help``) is left to Hydra as it was.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence

from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from oxford_ir.config import CONFIG_DIR

#: Hydra's refusal of an override whose key does not exist
_NO_KEY = re.compile(r"Could not override '([^']+)'")
#: Hydra's flags that take no config overrides check (help, info, shell completion, another config)
_RUN_FLAGS = ("-m", "--multirun")


def refuse_typos(config_name: str, args: Sequence[str] | None = None) -> None:
    """Exit with one ``error:`` line (status 1) when ``args`` (default ``sys.argv[1:]``) mistype a key or an
    option of the config ``config_name`` and a close match exists; return otherwise."""
    message = typo_message(config_name, sys.argv[1:] if args is None else args)
    if message is not None:
        print(message, file=sys.stderr)
        raise SystemExit(1)


def typo_message(config_name: str, args: Sequence[str]) -> str | None:
    """The ``error: ... did you mean ...?`` line for the first mistyped key or option of ``args``, or None."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    if any(a.startswith("-") and a not in _RUN_FLAGS for a in args) or GlobalHydra.instance().is_initialized():
        return None  # --help, --cfg, -cn ...: Hydra's business; an initialised Hydra: a caller composing itself
    overrides = _plain_overrides([a for a in args if a not in _RUN_FLAGS])
    if not overrides:
        return None
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        try:
            compose(config_name, overrides=overrides)
            return None
        except MissingConfigException as error:
            return _option_message(error)
        except Exception as error:  # noqa: BLE001 - any other refusal is Hydra's to report
            found = _NO_KEY.match(str(error))
            if not found or not isinstance(error.__cause__, ConfigAttributeError | ConfigKeyError):
                return None
            key = found[1]
            try:
                base = compose(config_name, overrides=[o for o in overrides if _key(o) != key])
            except Exception:  # noqa: BLE001 - another override fails too: Hydra reports it
                return None
            groups = GlobalHydra.instance().config_loader().list_groups("")
            return _key_message(key, base, [g for g in groups if g != "hydra"])


def _plain_overrides(args: list[str]) -> list[str]:
    """The overrides to compose: a sweep by its first value, ``hydra.*`` and ``hydra/*`` left out; none when they
    do not parse (Hydra reports that)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - a syntax error is Hydra's to report
        return []
    kept = []
    for override in parsed:
        if override.get_key_element().lstrip("+~").startswith("hydra"):
            continue
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()), None)
            if first is None:
                continue
            kept.append(f"{override.get_key_element()}={first}")
        else:
            kept.append(override.input_line or "")
    return kept


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _option_message(error: Exception) -> str | None:
    """``backbone=resnet5`` -> ``error: backbone=resnet5: no such backbone config; did you mean resnet50?``."""
    missing, options = getattr(error, "missing_cfg_file", None), getattr(error, "options", None)
    if not missing or not options or "/" not in missing:
        return None
    group, option = missing.rsplit("/", 1)
    match = difflib.get_close_matches(option, options, n=1)
    if not match:
        return None
    return (
        f"error: {group}={option}: no such {group} config; did you mean {group}={match[0]}? "
        f"(options: {', '.join(options)})"
    )


def _key_message(key: str, config: DictConfig, groups: Sequence[str]) -> str | None:
    """``trainer.max_epoch`` -> ``error: trainer.max_epoch: no such key; did you mean trainer.max_epochs?``: the
    first part of ``key`` missing from ``config`` matched against the keys beside it (config groups too at the
    top)."""
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
            continue
        if not isinstance(node, DictConfig):
            return None
        candidates = [str(k) for k in node] + (list(groups) if depth == 0 else [])
        match = difflib.get_close_matches(part, candidates, n=1)
        if not match:
            return None
        suggestion = ".".join([*parts[:depth], match[0], *parts[depth + 1 :]])
        return f"error: {key}: no such key; did you mean {suggestion}?"
    return None
