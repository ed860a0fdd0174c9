"""The ``extraction`` settings shared by ``oxford-ir-eval``, ``oxford-ir-index``, search and the web page.

One place reads and checks them, so that every command embeds images the same way and refuses a bad value
with one message naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from oxford_ir.errors import ConfigError
from oxford_ir.extraction.buckets import MAX_SHAPES
from oxford_ir.extraction.embedding import DECODES, PRECISIONS
from oxford_ir.extraction.planning import check_batching
from oxford_ir.fs import WORKER_TIMEOUT


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"extraction.device={name!r} is not a device; use auto, cpu or cuda[:N]") from None


def extraction_options(ex: Mapping[str, Any]) -> dict[str, Any]:
    """The speed options of an ``extraction`` config node, checked: ``batching`` (bucket | shape | aspect),
    ``max_shapes``, ``aspect_tolerance``, ``precision`` (32 | bf16), ``channels_last``, ``decode``
    (cpu | gpu | auto), ``worker_timeout`` (seconds a DataLoader worker may take to deliver a batch, null: no
    limit), as keyword arguments of :func:`~oxford_ir.extraction.embedding.extract_embeddings`."""
    options = {
        "batching": str(ex.get("batching", "bucket")),
        "max_shapes": ex.get("max_shapes", MAX_SHAPES),
        "aspect_tolerance": ex.get("aspect_tolerance", 0.1),
        "precision": str(ex.get("precision", "32")),
        "channels_last": ex.get("channels_last", False),
        "decode": str(ex.get("decode", "cpu")),
        "worker_timeout": ex.get("worker_timeout", WORKER_TIMEOUT),
    }
    check_batching(options["batching"], options["max_shapes"], options["aspect_tolerance"])
    if options["precision"] not in PRECISIONS:
        raise ConfigError(f"extraction.precision={options['precision']!r}: choose one of {', '.join(PRECISIONS)}")
    if options["decode"] not in DECODES:
        raise ConfigError(f"extraction.decode={options['decode']!r}: choose one of {', '.join(DECODES)}")
    if not isinstance(options["channels_last"], bool):
        raise ConfigError(f"extraction.channels_last={options['channels_last']!r}: true or false")
    timeout = options["worker_timeout"]
    if timeout is not None:
        try:
            timeout = float(timeout)
        except (TypeError, ValueError):
            timeout = -1.0
        if not timeout > 0 or isinstance(options["worker_timeout"], bool):
            raise ConfigError(
                f"extraction.worker_timeout={options['worker_timeout']!r}: seconds a DataLoader worker may take to "
                "deliver a batch (e.g. 300), or null for no limit"
            )
    options["worker_timeout"] = timeout
    options["aspect_tolerance"] = float(options["aspect_tolerance"])
    options["max_shapes"] = int(options["max_shapes"])
    return options
