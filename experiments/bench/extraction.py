"""Extraction images/s: ``oxford_ir.extraction.embedding.extract_embeddings`` on the benchmark's database
against the same network on random tensors of the same shapes, already on the device, in full batches.

The database list is repeated ``extraction_repeats`` times so that a run lasts long enough to time (each
image is still read and decoded every time: nothing is cached between repeats). Both sides run a warm-up
first (cuDNN autotuning, allocator, worker start-up of the warm-up call). Options of ``extract_embeddings``
that the profile asks for (autocast, channels_last) are passed only when its signature has them; the
ceiling then uses the same ones, and the result says which were used.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from experiments.bench import common
from oxford_ir.data.loading import load_benchmark
from oxford_ir.extraction.embedding import extract_embeddings


def accepted_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The options ``extract_embeddings`` accepts, and the names of those it does not (yet)."""
    parameters = inspect.signature(extract_embeddings).parameters
    used = {k: v for k, v in options.items() if k in parameters}
    return used, sorted(set(options) - set(used))


def effective_settings(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(keyword arguments for extract_embeddings, {"precision", "channels_last", "missing_options"})``."""
    used, missing = accepted_options(settings.get("extraction_options", {}))
    precision = "32-true"
    for key in ("precision", "autocast", "amp"):
        if key in used and used[key] not in (None, False, "32-true", "32"):
            precision = "bf16-mixed" if used[key] in (True, "bf16", "bf16-mixed", torch.bfloat16) else str(used[key])
    effective = {
        "precision": precision,
        "channels_last": bool(used.get("channels_last", False)),
        "missing_options": missing,
    }
    return used, effective


def benchmark_and_model(settings: Mapping[str, Any]) -> tuple[Any, torch.nn.Module]:
    """The synthetic benchmark the runner wrote and the profile's embedding network (eval mode, on the device)."""
    cfg = common.compose_train(settings["overrides"], settings["output_dir"])
    torch.manual_seed(int(cfg.seed))
    benchmark = load_benchmark(str(cfg.data.benchmark), Path(settings["data_dir"]))
    model = common.instantiate_module(cfg).embedder.to(settings["device"]).eval()
    return benchmark, model


def measure_ours(settings: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(settings)
    benchmark, model = benchmark_and_model(settings)
    device = torch.device(settings["device"])
    options, effective = effective_settings(settings)
    size, batch, workers = int(settings["eval_image_size"]), int(settings["batch_size"]), int(settings["num_workers"])
    paths = list(benchmark.db_paths) * int(settings["repeats"])
    call = functools.partial(
        extract_embeddings, model, image_size=size, batch_size=batch, num_workers=workers, device=device, **options
    )
    call(paths[: 2 * batch])  # warm-up
    start = common.now(device)
    embeddings = call(paths)
    elapsed = common.now(device) - start
    return {
        "value": len(paths) / elapsed,
        "images": len(paths),
        "seconds": elapsed,
        "database_images": benchmark.n_db,
        "repeats": int(settings["repeats"]),
        "batch_size": batch,
        "num_workers": workers,
        "embedding_dim": int(embeddings.shape[1]),
        "options_used": {k: str(v) for k, v in options.items()},
        **effective,
    }


@functools.cache
def _resized(width: int, height: int, size: int) -> tuple[int, int]:
    """(height, width) of a ``width`` x ``height`` image after ``resize_long_side(image, size)``, computed by
    the same Pillow call on a blank image (exact to the pixel)."""
    from oxford_ir.data.transforms import resize_long_side

    resized = resize_long_side(Image.new("L", (width, height)), size)
    return resized.height, resized.width


def input_shapes(paths: Sequence[Path], size: int) -> list[tuple[int, int]]:
    """(height, width) of each image as the extraction feeds it to the network (headers only, no decoding)."""
    shapes = []
    for path in paths:
        with Image.open(path) as image:
            shapes.append(_resized(image.width, image.height, size))
    return shapes


def measure_ceiling(settings: dict[str, Any]) -> dict[str, Any]:
    common.set_threads(settings)
    benchmark, model = benchmark_and_model(settings)
    device = torch.device(settings["device"])
    _, effective = effective_settings(settings)
    fmt = common.memory_format(effective["channels_last"])
    model = model.to(memory_format=fmt)
    size, batch = int(settings["eval_image_size"]), int(settings["batch_size"])
    repeats = int(settings["repeats"])
    counts = Counter(input_shapes(benchmark.db_paths, size) * repeats)
    # full batches of each shape, then one partial batch per shape: the best grouping of these images
    plan = []
    for shape, count in counts.items():
        plan += [(shape, batch)] * (count // batch) + ([(shape, count % batch)] if count % batch else [])
    inputs = {
        (shape, n): torch.randn(n, 3, *shape, device=device).contiguous(memory_format=fmt) for shape, n in set(plan)
    }
    autocast = functools.partial(common.autocast, device, effective["precision"])
    with torch.inference_mode():
        for tensor in inputs.values():  # warm-up: every shape once
            with autocast():
                model(tensor)
        start = common.now(device)
        for key in plan:
            with autocast():
                model(inputs[key]).float()
        elapsed = common.now(device) - start
    images = sum(n for _, n in plan)
    return {
        "value": images / elapsed,
        "images": images,
        "seconds": elapsed,
        "batches": len(plan),
        "shapes": {f"{h}x{w}": c for (h, w), c in counts.items()},
        "batch_size": batch,
        **effective,
    }
