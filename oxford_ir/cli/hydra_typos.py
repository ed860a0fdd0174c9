"""``did you mean ...?`` for a mistyped key or config option on a Hydra command line.

Hydra answers ``trainer.max_epoch=3`` with "To append to your config use +trainer.max_epoch=3", which adds a key
nothing reads, and ``backbone=resnet5`` with a list of options. A console script calls :func:`refuse_typos`
before its ``@hydra.main`` function; nothing is composed then (a composition costs 0.2-0.3 s of every command's
start-up). Only when Hydra itself refuses the command line (a composition error reaching Hydra's
``run_and_report``) are the overrides checked against the config: when a key or option has a close match
(:mod:`difflib`), the command stops with one line, ``error: trainer.max_epoch: no such key; did you mean
trainer.max_epochs?``, and exit status 1 (as Hydra's own refusals). Everything else (no close match, an error in
the task itself, ``--help``) is left to Hydra as it was.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from oxford_ir.config import CONFIG_DIR

#: Hydra's refusal of an override whose key does not exist
_NO_KEY = re.compile(r"Could not override '([^']+)'")
#: Hydra's flags that take no config overrides check (help, info, shell completion, another config)
_RUN_FLAGS = ("-m", "--multirun")


def refuse_typos(config_name: str, args: Sequence[str] | None = None) -> None:
    """From now on, a command line (``args``, default ``sys.argv[1:]`` when Hydra refuses it) that Hydra refuses
    for a mistyped key or option of the config ``config_name`` with a close match exits with one ``error:`` line
    (status 1) instead of Hydra's message. Installs the check on Hydra's error reporting once per process."""
    _watched["config_name"], _watched["args"] = config_name, None if args is None else list(args)
    from hydra._internal import utils

    original = utils.run_and_report
    if getattr(original, "answers_typos", False):
        return

    def run_and_report(func: Any) -> Any:
        return original(lambda: _answer_typos(func))

    run_and_report.answers_typos = True  # type: ignore[attr-defined]
    utils.run_and_report = run_and_report


#: the command whose refusals :func:`refuse_typos` answers: its config name and arguments (None: sys.argv[1:])
_watched: dict[str, Any] = {}


def _answer_typos(func: Any) -> Any:
    """``func()``; a composition error with a close match becomes the one ``error:`` line and exit status 1."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    try:
        return func()
    except (ConfigCompositionException, MissingConfigException):
        if "config_name" not in _watched:
            raise
        args = _watched["args"] if _watched["args"] is not None else sys.argv[1:]
        message = typo_message(_watched["config_name"], args, composer=_global_composer(_watched["config_name"]))
        if message is None:
            raise
        print(message, file=sys.stderr)
        raise SystemExit(1) from None


def _global_composer(config_name: str) -> Any:
    """Composition by the config loader of the running Hydra application (None when there is none)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    if not GlobalHydra.instance().is_initialized():
        return None
    loader = GlobalHydra.instance().config_loader()

    def compose(overrides: list[str]) -> DictConfig:
        return loader.load_configuration(config_name, list(overrides), run_mode=RunMode.RUN)

    compose.groups = lambda: loader.list_groups("")  # type: ignore[attr-defined]
    return compose


def typo_message(config_name: str, args: Sequence[str], composer: Any = None) -> str | None:
    """The ``error: ... did you mean ...?`` line for the first mistyped key or option of ``args``, or None.

    ``composer``: ``composer(overrides) -> config`` with ``composer.groups() -> group names`` (the running Hydra
    application's, :func:`_global_composer`); default: Hydra's compose API on this project's conf/.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if any(a.startswith("-") and a not in _RUN_FLAGS for a in args):
        return None  # --help, --cfg, -cn ...: Hydra's business
    overrides = _plain_overrides([a for a in args if a not in _RUN_FLAGS])
    if not overrides:
        return None
    if composer is not None:
        return _message(composer, composer.groups, overrides)
    if GlobalHydra.instance().is_initialized():
        return None  # a caller composing itself
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return _message(
            lambda o: compose(config_name, overrides=o),
            lambda: GlobalHydra.instance().config_loader().list_groups(""),
            overrides,
        )


def _message(compose: Any, groups: Any, overrides: list[str]) -> str | None:
    from hydra.errors import MissingConfigException

    try:
        compose(overrides)
        return None
    except MissingConfigException as error:
        return _option_message(error)
    except Exception as error:  # noqa: BLE001 - any other refusal is Hydra's to report
        found = _NO_KEY.match(str(error))
        if not found or not isinstance(error.__cause__, ConfigAttributeError | ConfigKeyError):
            return None
        key = found[1]
        try:
            base = compose([o for o in overrides if _key(o) != key])
        except Exception:  # noqa: BLE001 - another override fails too: Hydra reports it
            return None
        return _key_message(key, base, [g for g in groups() if g != "hydra"])


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
