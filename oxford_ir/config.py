"""Where the Hydra configs live, and the one way a config node becomes an object.

``CONFIG_DIR`` is ``conf/`` at the repository root (``OXFORD_IR_CONFIG_DIR`` overrides). Entry points pass this
absolute path to ``hydra.main``: a relative ``config_path`` would make Hydra look for an importable ``conf``
package when the code runs as a console script.

:func:`instantiate` builds a node with ``_target_`` (Hydra's ``instantiate``) after checking its values against the
target's signature, and :func:`call` completes a ``_partial_: true`` node (an optimizer with its parameters, a
scheduler with its optimizer). A value of the wrong type (``optimizer.lr=abc``) or out of range
(``optimizer.lr=1e300``, ``inf``, ``embedder.projection_dim=-4``), a key the target does not take
(``+optimizer.foo=1``), or a value the target refuses while it is built (``optimizer.lr=-1``: torch raises
``ValueError``) is one :class:`~oxford_ir.errors.ConfigError` naming the key as it is written on the command
line and what to give instead; errors of the project (a missing weights file, ...) pass through unchanged.

:func:`to_plain` turns a config (node or dict) into plain containers, e.g. to store it as hyperparameters.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from oxford_ir.errors import ConfigError, OxfordIRError

CONFIG_DIR = Path(os.environ.get("OXFORD_IR_CONFIG_DIR") or Path(__file__).resolve().parents[1] / "conf")

#: Hydra's own keys of a node (not arguments of the target)
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``, with the node's values checked first (:func:`check_node`) and
    the errors of building it turned into a :class:`ConfigError` that names ``key`` (the node's key as a user
    overrides it, e.g. ``optimizer`` or ``scheduler.scheduler``).

    ``kwargs`` are arguments given by the code (e.g. the shared distance), not checked as config values.
    """
    import hydra
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    check_node(node, key)
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except MissingMandatoryValue as error:  # a ??? left in the composed config (e.g. data=base)
        full_key = getattr(error, "full_key", None) or key
        raise ConfigError(
            f"{full_key} has no value (??? in its config): give one, e.g. {full_key}=<value>, or choose a config "
            f"that sets it (conf/{key.split('.')[0]}/)"
        ) from None
    except InstantiationException as error:
        cause = _innermost(error)
        if isinstance(cause, OxfordIRError):
            raise cause from None
        target = _failed_target(error) or str(_get(node, "_target_"))
        with contextlib.suppress(Exception):
            target = _module_name(_locate(target, key), target)
        if cause is not error and _is_construction_error(cause):
            raise _refused(key, target, _arguments(node), cause) from cause
        raise ConfigError(f"{key}: cannot build {target}: {_one_line(cause)}") from error


def call(factory: Callable[..., Any], key: str, *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)`` for a ``_partial_: true`` object built from the node ``key``; a TypeError or
    ValueError (what torch raises for ``lr=-1`` or ``betas=[0.9, 2]``) becomes a :class:`ConfigError` naming the
    key and the values it was given."""
    try:
        return factory(*args, **kwargs)
    except OxfordIRError:
        raise
    except Exception as error:
        if not _is_construction_error(error):
            raise
        given = dict(getattr(factory, "keywords", None) or {})
        target = getattr(getattr(factory, "func", factory), "__qualname__", repr(factory))
        raise _refused(key, _module_name(getattr(factory, "func", factory), target), given, error) from error


def check_node(node: Any, key: str) -> None:
    """Check every value of ``node`` (and of the nodes nested in it) against the signature of its ``_target_``.

    Refused: a key the target does not take (unless it takes ``**kwargs``), and a value whose type does not fit
    the parameter: a number where its annotation or default is a number (``float``, ``int``: a whole number),
    true/false for a bool, a list of n numbers for a tuple of n numbers; and a number out of range
    (:func:`_out_of_range`: not finite, beyond float32, a learning rate above 10, a size below 1). Anything the
    signature does not say (no annotation, a complex one) is left to the target.
    """
    values = _plain(node)
    if not isinstance(values, Mapping) or "_target_" not in values:
        return
    target = _locate(values["_target_"], key)
    parameters, takes_kwargs, hints = _signature(target)
    name = _module_name(target, str(values["_target_"]))
    for arg, value in values.items():
        arg = str(arg)
        if arg in HYDRA_KEYS:
            continue
        if isinstance(value, Mapping) and "_target_" in value:
            check_node(value, f"{key}.{arg}")
            continue
        parameter = parameters.get(arg)
        if parameter is None:
            if takes_kwargs:
                continue
            known = [p for p in parameters if p not in ("self", "params", "optimizer")]
            raise ConfigError(
                f"{key}.{arg}: {name} has no parameter {arg!r}; it takes {', '.join(known) or 'no settings'} "
                f"(remove {key}.{arg} or correct its spelling)"
            )
        expected = _expected(hints.get(arg, inspect.Parameter.empty), parameter.default)
        if expected is None:
            continue
        example = "" if parameter.default is inspect.Parameter.empty else f"; default {parameter.default!r}"
        if not _fits(value, expected):
            raise ConfigError(f"{key}.{arg}={value!r}: expected {_describe(expected)} ({name}'s {arg}{example})")
        reason = _out_of_range(arg, value, expected)
        if reason is not None:
            raise ConfigError(f"{key}.{arg}={value!r}: {reason} ({name}'s {arg}{example})")


def to_plain(value: Any) -> Any:
    """``value`` as dicts (with str keys), lists and scalars only, config nodes resolved: what a checkpoint's
    hyperparameters can hold without pickling classes."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


# -- signatures ---------------------------------------------------------------------------------------


def _locate(target: Any, key: str) -> Any:
    if callable(target):
        return target
    from hydra.utils import get_object

    try:
        return get_object(str(target))
    except Exception as error:
        raise ConfigError(
            f"{key}: cannot build {target!r}: no such class or function ({_one_line(error)}); check the spelling "
            f"of {key}._target_, or install the package that provides it"
        ) from None


def _signature(target: Any) -> tuple[dict[str, inspect.Parameter], bool, dict[str, Any]]:
    """``(named parameters, whether it takes **kwargs, resolved annotations)``; empty when unknown."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return {}, True, {}
    parameters = {
        name: p
        for name, p in signature.parameters.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    function = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # annotations naming what this environment cannot import: use the defaults only
        hints = {}
    return parameters, takes_kwargs, hints


#: what a parameter takes, as far as the checks go: ("number" | "int" | "bool", none allowed) or
#: ("numbers", none allowed, length)
Expected = tuple


def _expected(annotation: Any, default: Any) -> Expected | None:
    """What the annotation (else the default's type) says a parameter takes; None when it says nothing checkable."""
    if annotation is not inspect.Parameter.empty:  # an annotation it cannot read (Union[int, bool]) says nothing
        kind = _kind(annotation)
        return None if kind is None else (kind[0], kind[1] or default is None, *kind[2:])
    if isinstance(default, bool):
        return ("bool", False)
    if isinstance(default, (int, float)):  # an int default (margin=0) still takes 0.5
        return ("number", False)
    if isinstance(default, tuple) and default and all(_is_number(v) for v in default):
        return ("numbers", False, None)  # a default says nothing about the length
    return None


def _kind(annotation: Any) -> Expected | None:
    """``(kind, none allowed, ...)`` of a type annotation; None when it is not one of the simple cases."""
    if annotation is bool:
        return ("bool", False)
    if annotation is int:
        return ("int", False)
    if annotation is float:
        return ("number", False)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        none_ok = type(None) in args
        rest = [a for a in args if a is not type(None)]
        kinds = {_kind(a) for a in rest if not _is_tensor(a)}
        if len(rest) > len([a for a in rest if not _is_tensor(a)]):
            kinds = {k if k is None or k[0] != "int" else ("number", False) for k in kinds}  # a tensor or a number
        if len(kinds) == 1 and None not in kinds:
            (kind,) = kinds
            return (kind[0], none_ok, *kind[2:])
        if kinds <= {("number", False), ("int", False)} and kinds:
            return ("number", none_ok)
        return None
    if origin is tuple and args and Ellipsis not in args:
        inner = [_kind(a) for a in args]
        if all(k is not None and k[0] in ("number", "int") for k in inner):
            return ("numbers", False, len(args))
    return None


def _is_tensor(annotation: Any) -> bool:
    return getattr(annotation, "__name__", "") == "Tensor"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(value: Any, expected: Expected) -> bool:
    kind, none_ok = expected[0], expected[1]
    if value is None:
        return none_ok
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return _is_number(value)  # NaN and infinities: _out_of_range says why they are refused
    if kind == "numbers":
        return (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and (expected[2] is None or len(value) == expected[2])
            and all(_fits(v, ("number", False)) for v in value)
        )
    return True


#: the largest float32: a larger number overflows the float32 tensors it multiplies (``optimizer.lr=1e300`` raised
#: "value cannot be converted to type float without overflow" deep inside the first optimizer step)
FLOAT32_MAX = 3.4028234663852886e38
#: a learning rate above this makes the weights overflow to inf/NaN within a few steps, whatever the model
MAX_LEARNING_RATE = 10.0
_LEARNING_RATE = re.compile(r"(^|_)lr$")  # lr, backbone_lr, max_lr, base_lr, ...
_SIZE = re.compile(r"(^|_)(size|dim)$")  # batch_size, image_size, projection_dim, ...


def _out_of_range(name: str, value: Any, expected: Expected) -> str | None:
    """Why a value of the right type still cannot be used, or None: rules by kind and parameter name, not a list
    of keys. Every number is finite and within float32's range (the tensors it meets are float32); a learning
    rate (``lr``, ``*_lr``) is at most :data:`MAX_LEARNING_RATE`; a size (``*_size``, ``*_dim``) is at least 1."""
    if value is None or expected[0] == "bool":
        return None
    values = list(value) if expected[0] == "numbers" else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        return "expected a finite number"
    if _LEARNING_RATE.search(name) and any(v > MAX_LEARNING_RATE for v in values):
        return (
            f"expected a learning rate of at most {MAX_LEARNING_RATE:g}: a larger one sends the weights to inf/NaN "
            "within a few steps (typical: 1e-4 to 1e-1)"
        )
    if _SIZE.search(name) and any(v < 1 for v in values):
        return "expected a size of at least 1"
    if any(abs(v) > FLOAT32_MAX for v in values):
        return f"expected a number within float32's range (at most {FLOAT32_MAX:.3g} in size): it would overflow"
    return None


def _describe(expected: Expected) -> str:
    kind, none_ok = expected[0], expected[1]
    if kind == "numbers":
        text = f"a list of {expected[2] or 'one or more'} numbers"
    else:
        text = {"bool": "true or false", "int": "a whole number", "number": "a number"}[kind]
    return f"{text} or null" if none_ok else text


# -- errors -------------------------------------------------------------------------------------------


def _is_construction_error(error: BaseException) -> bool:
    """A constructor refusing its arguments: TypeError, ValueError, Lightning's MisconfigurationException."""
    return isinstance(error, (TypeError, ValueError)) or type(error).__name__ == "MisconfigurationException"


def _refused(key: str, target: str, given: Mapping[str, Any], error: BaseException) -> ConfigError:
    """The error for a target that refused its values: those the message names (else all of them) and the key."""
    given = {str(k): v for k, v in given.items() if not str(k).startswith("_") and not _is_node(v)}
    text = str(error).lower()
    named = {k: v for k, v in given.items() if re.search(rf"(?<![a-z0-9_]){re.escape(k.lower())}(?![a-z0-9_])", text)}
    shown = ", ".join(f"{k}={v!r}" for k, v in (named or given).items())
    return ConfigError(
        f"{key}: {target} refuses {shown or 'its settings'} ({_one_line(error)}); correct the value with "
        f"{key}.<name>=<value> (see conf/{key.split('.')[0]}/)"
    )


def _innermost(error: BaseException) -> BaseException:
    """The exception an InstantiationException (possibly nested, one per level of nodes) was raised for."""
    from hydra.errors import InstantiationException

    seen = set()
    while isinstance(error, InstantiationException) and error.__cause__ is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__
    return error


def _failed_target(error: BaseException) -> str | None:
    found = re.findall(r"Error in call to target '([^']+)'", str(error))
    return found[-1] if found else None


def _arguments(node: Any) -> dict[str, Any]:
    values = _plain(node)
    return {k: v for k, v in values.items() if k not in HYDRA_KEYS} if isinstance(values, Mapping) else {}


def _is_node(value: Any) -> bool:
    return isinstance(value, Mapping) and "_target_" in value


def _module_name(target: Any, fallback: str) -> str:
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if not module or not name:
        return fallback
    # torch.optim.adam.Adam reads better as torch.optim.Adam when the package exports it
    package = module.rsplit(".", 1)[0]
    with contextlib.suppress(Exception):
        if getattr(importlib.import_module(package), name, None) is target:
            return f"{package}.{name}"
    return f"{module}.{name}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _get(node: Any, key: str) -> Any:
    try:
        return node.get(key)
    except Exception:
        return None


def _plain(node: Any) -> Any:
    """A node as plain, resolved Python containers; the node itself when it cannot be resolved (Hydra reports)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception:
            return {}
    return node
