"""Extraction images/s on images of the sizes of Oxford/Paris photographs, in the default (bucket) and the exact
(shape) batching mode of ``extract_embeddings``, each against its ceiling.

The images (:func:`experiments.bench.images.write_size_mix`): database JPEGs with the size mix of Oxford5k /
Paris6k (4:3 landscape and portrait, 3:2, 16:9 and a few odd sizes) and query crops of random sizes (boxes
inside those images), as one extraction list (queries cropped to their boxes), repeated ``repeats`` times.
One process measures both variants of a row, ours first:

- ``ours``: ``extract_embeddings(list, batching=...)`` with the profile's options (precision, channels_last,
  decode) and ``max_shapes`` (the package's default unless the profile sets one: ``--quick`` sets 2, so that
  the bound is exercised). The whole list once as warm-up (cuDNN builds its plans for every
  new input shape, the allocator grows, workers start; its time is the row's one-off warm-up), then a second
  pass timed, synchronised before each clock reading. Planning from the image headers is part of each call. A
  forward pre-hook on the network records every batch it receives (images x height x width, and whether the
  images' own sizes came with it).
- ``ceiling``: afterwards, the same network on random tensors of exactly the batch shapes of the extraction's
  plan (on CUDA bucket batches are filled up to the batch size with blank images, as ``extract_embeddings``
  does; padded batches get the images' own sizes, as ours do), already on the device, same autocast and
  memory format; one warm pass (cuDNN's plans for these shapes exist by then), then one timed.
  ``same_batches_as_ours`` says whether the hook saw the same batches (shape and count) in both timed passes.

Peak memory: ours' is the process's at the end of its timed pass; the ceiling's the CUDA allocator's peak
of its own passes (statistics reset in between), and on the CPU none (one process: not separable from ours').
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.bench import common, images
from oxford_ir.benchmarks.registry import load_benchmark
from oxford_ir.extraction.buckets import MAX_SHAPES
from oxford_ir.extraction.embedding import extract_embeddings, plan_for_model
from oxford_ir.extraction.planning import ExtractionPlan

#: one forward pass as the network receives it: (images, height, width, whether the images' sizes came along)
Forward = tuple[int, int, int, bool]


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


def embedding_model(settings: Mapping[str, Any]) -> torch.nn.Module:
    """The profile's embedding network (eval mode, on the device), seeded by the config."""
    cfg = common.compose_train(settings["overrides"], settings["output_dir"])
    torch.manual_seed(int(cfg.seed))
    return common.instantiate_module(cfg).embedder.to(settings["device"]).eval()


def benchmark_and_model(settings: Mapping[str, Any]) -> tuple[Any, torch.nn.Module]:
    """The synthetic benchmark the runner wrote and the profile's embedding network (eval mode, on the device)."""
    cfg = common.compose_train(settings["overrides"], settings["output_dir"])
    benchmark = load_benchmark(str(cfg.data.benchmark), Path(settings["data_dir"]))
    return benchmark, embedding_model(settings)


@contextlib.contextmanager
def recorded_forwards(model: nn.Module) -> Iterator[list[Forward]]:
    """Every forward call of ``model`` while inside, as :data:`Forward` tuples."""
    calls: list[Forward] = []

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        n, _, h, w = args[0].shape
        calls.append((int(n), int(h), int(w), len(args) > 1 and args[1] is not None))

    handle = model.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def planned_forwards(plan: ExtractionPlan, batch_size: int, fill: bool) -> list[tuple[Forward, list | None]]:
    """The forward passes ``extract_embeddings`` makes of ``plan`` at scale 1, with each passed image's own
    ``(height, width)`` (None when the batch is not padded): bucket batches filled up to ``batch_size`` with
    blank full-size images when ``fill`` (CUDA), the sizes passed when an image is smaller than its batch."""
    out = []
    for batch in plan.batches:
        shape = plan.input_shape(batch)
        if shape is None:
            raise ValueError("the plan holds an image of unknown size: the ceiling cannot reproduce its batch")
        h, w = shape
        own = [plan.shapes[i] for i in batch.indices]
        padded = batch.pad_to is not None and any(s[0] < h or s[1] < w for s in own)  # type: ignore[index]
        n = max(len(own), batch_size) if fill and batch.pad_to is not None else len(own)
        sizes = [list(s) for s in own] + [[h, w]] * (n - len(own)) if padded else None  # type: ignore[arg-type]
        out.append(((n, h, w, padded), sizes))
    return out


def shapes_summary(forwards: Sequence[Forward]) -> dict[str, Any]:
    """Distinct input shapes (H x W) and batch shapes (N x H x W) of forward passes, and the images they carry."""
    return {
        "forward_passes": len(forwards),
        "network_images": sum(f[0] for f in forwards),
        "distinct_input_shapes": len({(f[1], f[2]) for f in forwards}),
        "distinct_batch_shapes": len({f[:3] for f in forwards}),
    }


def measure_bucket(settings: dict[str, Any]) -> dict[str, Any]:
    """The default mode: images padded to at most ``max_shapes`` bucket shapes."""
    return measure(settings, "bucket")


def measure_exact(settings: dict[str, Any]) -> dict[str, Any]:
    """The exact mode: one batch per distinct preprocessed size."""
    return measure(settings, "shape")


def measure(settings: dict[str, Any], batching: str) -> dict[str, Any]:
    """``{"variants": {"ours": ..., "ceiling": ...}}`` of extraction in ``batching`` mode (module doc)."""
    common.set_threads(settings)
    device = torch.device(settings["device"])
    model = embedding_model(settings)
    options, effective = effective_settings(settings)
    size, batch = int(settings["eval_image_size"]), int(settings["batch_size"])
    workers, repeats = int(settings["num_workers"]), int(settings["repeats"])
    max_shapes = int(settings.get("max_shapes") or MAX_SHAPES)
    paths, boxes, n_db = images.size_mix_inputs(settings["size_mix"])
    paths, boxes = paths * repeats, boxes * repeats
    call = functools.partial(
        extract_embeddings,
        model,
        paths,
        size,
        bboxes=boxes,
        batch_size=batch,
        num_workers=workers,
        device=device,
        batching=batching,
        max_shapes=max_shapes,
        **options,
    )
    start = common.now(device)
    plan = plan_for_model(model, paths, size, batch, bboxes=boxes, batching=batching, max_shapes=max_shapes)
    planning = common.now(device) - start
    with recorded_forwards(model) as seen:
        start = common.now(device)
        call()  # warm-up: the whole list once
        warmup = common.now(device) - start
        seen.clear()
        start = common.now(device)
        embeddings = call()
        elapsed = common.now(device) - start
        ours_forwards = list(seen)
    ours_memory = common.peak_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    fill = plan.mode == "bucket" and device.type == "cuda"
    planned = planned_forwards(plan, batch, fill)
    ceiling_seconds, ceiling_forwards = time_forwards(model, planned, device, effective)
    manifest = images.read_size_mix(settings["size_mix"]) or {"images": []}
    summary = plan.summary()
    same = Counter(ours_forwards) == Counter(ceiling_forwards)
    ours = {
        "value": len(paths) / elapsed,
        "images": len(paths),
        "seconds": elapsed,
        "warmup_seconds": warmup,
        "planning_seconds": planning,
        "database_images": n_db,
        "query_crops": len(paths) // repeats - n_db,
        "repeats": repeats,
        "batch_size": batch,
        "num_workers": workers,
        "batching": plan.mode,
        "max_shapes": max_shapes,
        "padded_over_valid_pixels": summary["padded_over_valid_pixels"],
        "buckets": summary.get("buckets"),
        "plan_note": summary.get("note"),
        **shapes_summary(ours_forwards),
        "batch_shapes": sorted([*f, c] for f, c in Counter(ours_forwards).items()),
        "image_sizes": sorted(
            [w, h, c] for (w, h), c in Counter((i["width"], i["height"]) for i in manifest["images"]).items()
        ),
        "jpeg_kib_mean": sum(i["bytes"] for i in manifest["images"]) / max(1, len(manifest["images"])) / 1024,
        "embedding_dim": int(embeddings.shape[1]),
        "options_used": {k: str(v) for k, v in options.items()},
        "peak_memory": ours_memory,
        **effective,
    }
    ceiling = {
        "value": ours["images"] / ceiling_seconds,
        "images": ours["images"],
        "seconds": ceiling_seconds,
        **shapes_summary(ceiling_forwards),
        "blank_images": sum(f[0] for f, _ in planned) - len(paths),
        "same_batches_as_ours": same,
        "batch_size": batch,
        **effective,
    }
    if device.type == "cuda":
        ceiling["peak_memory"] = common.peak_memory(device)
    return {"variants": {"ours": ours, "ceiling": ceiling}}


def time_forwards(
    model: nn.Module, planned: Sequence[tuple[Forward, list | None]], device: torch.device, effective: Mapping[str, Any]
) -> tuple[float, list[Forward]]:
    """Seconds of one warm pass of ``planned`` on random inputs already on the device, and its forward passes
    as the network received them."""
    fmt = common.memory_format(effective["channels_last"])
    model = model.to(memory_format=fmt)
    inputs: dict[tuple[int, int, int], torch.Tensor] = {}
    calls = []
    for (n, h, w, _), sizes in planned:
        if (n, h, w) not in inputs:
            inputs[n, h, w] = torch.randn(n, 3, h, w, device=device).contiguous(memory_format=fmt)
        own = None if sizes is None else torch.tensor(sizes, dtype=torch.long, device=device)
        calls.append((inputs[n, h, w], own))
    autocast = functools.partial(common.autocast, device, effective["precision"])

    def run() -> None:
        for x, own in calls:
            (model(x) if own is None else model(x, own)).float()

    with torch.inference_mode(), autocast(), recorded_forwards(model) as seen:
        run()  # warm-up
        seen.clear()
        start = common.now(device)
        run()
        elapsed = common.now(device) - start
    return elapsed, list(seen)
