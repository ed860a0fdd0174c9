"""The benchmark's JPEGs, written by a process pool and reused between runs.

- :func:`write_synthetic`: the synthetic benchmark of :mod:`oxford_ir.benchmarks.synthetic` (training, data loading and
  evaluation rows), its photographs drawn in as many processes as the writer has
  (``write_synthetic_benchmark(..., workers=...)``: each photograph has its own random stream, so the files are
  the same whatever the number); a folder already complete for the same seed and parameters is reused as it is.
- :func:`write_size_mix`: the extraction rows' images, with the size mix of Oxford5k / Paris6k photographs
  (:data:`SIZE_MIX`: mostly 4:3 landscape and portrait, some 3:2, a few 16:9 and odd sizes), cut from the
  synthetic benchmark's photographs (rotated for portraits, cropped to the aspect ratio, resized) with mild
  sensor-like noise so that a JPEG weighs about what a photograph does (synthetic drawings are smoother), plus
  query boxes of random sizes inside them. ``manifest.json`` records the parameters, sizes and boxes; a folder
  whose manifest matches is reused.

The pool forks its processes once, before any other thread or CUDA context exists in the runner
(:class:`JpegWriter`); ``workers=1`` writes in this process.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: (width, height) at a long side of 1024 px and share of the database, after Oxford5k / Paris6k (Flickr
#: photographs downscaled to 1024 px: most 4:3 landscape or portrait, some 3:2, a few 16:9 and other sizes)
SIZE_MIX: tuple[tuple[tuple[int, int], float], ...] = (
    ((1024, 768), 0.45),
    ((768, 1024), 0.25),
    ((1024, 683), 0.12),
    ((683, 1024), 0.06),
    ((1024, 576), 0.04),
    ((1024, 680), 0.03),
    ((1024, 819), 0.03),
    ((765, 1024), 0.02),
)
#: bumped whenever the size-mix images change, so that an old folder is rewritten instead of reused
SIZE_MIX_VERSION = 1
MANIFEST = "manifest.json"


class JpegWriter:
    """A process pool for writing JPEGs (``workers`` processes, forked on first use), or this process alone."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, int(workers or _cores()))
        self._pool: ProcessPoolExecutor | None = None

    def map(self, function: Callable[[Any], Any], tasks: Sequence[Any], chunksize: int = 1) -> list[Any]:
        pool = self.start()
        if pool is None or len(tasks) < 2:
            return [function(task) for task in tasks]
        return list(pool.map(function, tasks, chunksize=max(1, chunksize)))

    def start(self) -> Executor | None:
        """The pool, its processes forked now (None with one worker: this process writes)."""
        if self.workers == 1:
            return None
        if self._pool is None:
            # fork: the workers start in milliseconds and inherit the imports; every worker is forked at the first
            # submission, before the pool starts its own thread (the runner forks before it starts any other)
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
            self._pool.submit(int).result()
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> JpegWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# -- the synthetic benchmark ---------------------------------------------------------------------------------
def write_synthetic(
    root: str | os.PathLike, writer: JpegWriter | None = None, *, seed: int = 0, **params: int
) -> float:
    """The synthetic benchmark in ``root``, drawn in as many processes as ``writer`` has (the package's
    ``write_synthetic_benchmark(..., workers=...)``: the same files); seconds spent writing (0 when ``root`` was
    already complete)."""
    from oxford_ir.benchmarks import synthetic as s

    params = s.synthetic_params(seed, **params)
    root = Path(root).expanduser().resolve()
    if s.is_synthetic_complete(root, seed, params):
        return 0.0
    start = time.perf_counter()
    s.write_synthetic_benchmark(root, seed=seed, **params, workers=writer.workers if writer is not None else 1)
    return time.perf_counter() - start


# -- the size mix of Oxford / Paris ---------------------------------------------------------------------------
def size_counts(
    n: int, long_side: int, mix: Iterable[tuple[tuple[int, int], float]] = SIZE_MIX
) -> dict[tuple[int, int], int]:
    """``{(width, height): count}`` of ``n`` images in the proportions of ``mix`` (largest remainders), the
    sizes scaled from 1024 px to ``long_side``."""
    mix = list(mix)
    total = sum(share for _, share in mix)
    exact = [n * share / total for _, share in mix]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(mix)), key=lambda i: (counts[i] - exact[i], i))[: n - sum(counts)]:
        counts[i] += 1
    out: dict[tuple[int, int], int] = {}
    for ((w, h), _), count in zip(mix, counts, strict=True):
        size = (max(1, round(w * long_side / 1024)), max(1, round(h * long_side / 1024)))
        if count:
            out[size] = out.get(size, 0) + count
    return out


def write_size_mix(
    folder: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    *,
    images: int,
    queries: int,
    long_side: int,
    writer: JpegWriter | None = None,
    seed: int = 0,
    quality: int = 90,
    noise: float = 10.0,
) -> tuple[dict[str, Any], float]:
    """``images`` JPEGs with the size mix of Oxford/Paris at ``long_side`` and ``queries`` random boxes inside
    them, in ``folder``; ``(manifest, seconds spent writing)`` (0 when a matching folder was reused).

    Image i is cut from ``sources[i % len(sources)]``: rotated a quarter turn when its orientation differs, the
    largest region of the target aspect ratio at a random position, resized, Gaussian noise of standard
    deviation ``noise`` (grey levels) added. Query q is a box of 30 to 90% of a random image's width and height
    at a random position (coordinates with one decimal, as Oxford's).
    """
    folder = Path(folder)
    sources = [Path(p) for p in sources]
    if not sources:
        raise ValueError("write_size_mix needs at least one source image")
    params = {
        "version": SIZE_MIX_VERSION,
        "images": int(images),
        "queries": int(queries),
        "long_side": int(long_side),
        "seed": int(seed),
        "quality": int(quality),
        "noise": float(noise),
        "mix": [[list(size), share] for size, share in SIZE_MIX],
        "sources": _fingerprint(sources),
    }
    existing = read_size_mix(folder)
    if existing is not None and existing["params"] == params:
        return existing, 0.0
    start = time.perf_counter()
    rng = np.random.default_rng([int(seed), 1])
    sizes = [size for size, count in size_counts(images, long_side).items() for _ in range(count)]
    sizes = [sizes[j] for j in rng.permutation(len(sizes))]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tasks = [
        (str(sources[i % len(sources)]), str(folder / f"mix_{i:06d}.jpg"), size, int(seed), i, int(quality), noise)
        for i, size in enumerate(sizes)
    ]
    writer = writer or JpegWriter(1)
    written = writer.map(_cut, tasks, chunksize=max(1, len(tasks) // (4 * writer.workers)))
    boxes = []
    for _ in range(int(queries)):
        image = int(rng.integers(len(sizes)))
        w, h = sizes[image]
        bw, bh = w * rng.uniform(0.3, 0.9), h * rng.uniform(0.3, 0.9)
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        boxes.append({"image": image, "bbox": [round(float(v), 1) for v in (x, y, x + bw, y + bh)]})
    manifest = {"params": params, "images": written, "queries": boxes}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest, time.perf_counter() - start


def read_size_mix(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a complete size-mix folder (every image present at its size), else None."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        for image in manifest["images"]:
            if (folder / image["file"]).stat().st_size != image["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest


def size_mix_inputs(folder: str | os.PathLike) -> tuple[list[Path], list[list[float] | None], int]:
    """``(paths, boxes, database images)`` of a size-mix folder: every image (box None), then each query (the
    path of its image and its box), as one extraction list."""
    folder = Path(folder)
    manifest = read_size_mix(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder} holds no complete size-mix image set (experiments/bench/images.py)")
    paths = [folder / image["file"] for image in manifest["images"]]
    queries = manifest["queries"]
    return (
        paths + [paths[q["image"]] for q in queries],
        [None] * len(paths) + [list(q["bbox"]) for q in queries],
        len(paths),
    )


def _fingerprint(paths: Sequence[Path]) -> str:
    """Names and byte sizes of the source images (a changed synthetic benchmark changes it)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def _cut(task: tuple[Any, ...]) -> dict[str, Any]:
    source, target, (width, height), seed, index, quality, noise = task
    rng = np.random.default_rng([int(seed), 2, int(index)])
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    if width != height and (width > height) != (image.width > image.height):
        image = image.transpose(Image.Transpose.ROTATE_90)
    scale = min(image.width / width, image.height / height)
    crop_w, crop_h = min(image.width, round(width * scale)), min(image.height, round(height * scale))
    x0, y0 = int(rng.integers(image.width - crop_w + 1)), int(rng.integers(image.height - crop_h + 1))
    image = image.crop((x0, y0, x0 + crop_w, y0 + crop_h))
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    if noise > 0:
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, noise, (height, width, 3)).astype(np.float32)
        image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    data = buffer.getvalue()
    Path(target).write_bytes(data)
    return {"file": Path(target).name, "width": width, "height": height, "bytes": len(data)}
