"""Input-shape buckets: a bounded set of padded shapes for test-time images of any sizes.

cuDNN builds an execution plan for every new input shape it sees (about 1.5 s per shape for a CNN in bf16 +
channels_last on an H200, against a few milliseconds for the forward pass itself), and real photographs and
query crops have almost as many sizes as images. So each test-time image is preprocessed exactly as before
(long side downscaled, query cropped to its box), then padded at the bottom and the right to the smallest
*bucket* that holds it. The network runs each padded image as if it were alone: every convolution and max-pool
sees zeros outside the image (:mod:`oxford_ir.models.valid_region`) and the pooling covers only the image's own
feature cells (masked GeM, MAC, average), so the embeddings equal the unpadded ones up to floating-point
rounding (about 1e-7) while the network sees a handful of shapes.

The buckets are chosen from the collection's own shapes, which the planner reads from the image headers
before anything is decoded (:func:`choose_buckets`): each shape is rounded up to a multiple of
:data:`ALIGN` pixels, then the two buckets whose union (the larger height and the larger width) adds the
fewest padded pixels are merged, again and again, until at most ``max_shapes`` remain. Every image then goes
to the smallest bucket that holds it (:func:`assign`). The same images always give the same buckets.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

#: buckets are multiples of this many pixels per side: the output stride of the ResNet and MobileNet
#: backbones (the scratch CNN's 16 divides it), so bucket shapes fall on whole feature cells
ALIGN = 32
#: default bound on the distinct input shapes per image size and scale
MAX_SHAPES = 16
#: above this many distinct aligned shapes the greedy merge first coarsens the grid (its cost is quadratic)
_MAX_CANDIDATES = 512

Shape = tuple[int, int]


def aligned(shape: Shape, align: int = ALIGN) -> Shape:
    """``(height, width)`` rounded up to multiples of ``align``."""
    return (-(-int(shape[0]) // align) * align, -(-int(shape[1]) // align) * align)


def choose_buckets(shapes: Iterable[Shape], max_shapes: int = MAX_SHAPES, align: int = ALIGN) -> tuple[Shape, ...]:
    """At most ``max_shapes`` bucket shapes that together hold every shape of ``shapes``, with little padding.

    Greedy agglomeration of the shapes rounded up to ``align``: at each step the pair of buckets whose merge
    adds the fewest padded pixels (counting every image they hold) becomes one bucket, the elementwise max.
    The largest height and the largest width always end in some bucket, so every shape fits one. Sorted by
    area, then height; deterministic.
    """
    if int(max_shapes) < 1:
        raise ValueError(f"max_shapes must be at least 1, got {max_shapes}")
    shapes = [(int(h), int(w)) for h, w in shapes]
    if not shapes:
        return ()
    step = int(align)
    counts = Counter(aligned(s, step) for s in shapes)
    while len(counts) > _MAX_CANDIDATES:  # coarser rounding first: the merge below is O(n^2) in memory
        step *= 2
        counts = Counter(aligned(s, step) for s in shapes)
    items = sorted(counts.items())
    heights = np.array([s[0] for s, _ in items], dtype=np.float64)
    widths = np.array([s[1] for s, _ in items], dtype=np.float64)
    n_images = np.array([c for _, c in items], dtype=np.float64)
    alive = np.ones(len(items), dtype=bool)
    while int(alive.sum()) > max_shapes:
        cost = _merge_costs(heights, widths, n_images, alive)
        i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
        heights[i], widths[i] = max(heights[i], heights[j]), max(widths[i], widths[j])
        n_images[i] += n_images[j]
        alive[j] = False
    buckets = {(int(h), int(w)) for h, w, a in zip(heights, widths, alive, strict=True) if a}
    return tuple(sorted(buckets, key=lambda s: (s[0] * s[1], s)))


def _merge_costs(heights: np.ndarray, widths: np.ndarray, n_images: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Padded pixels added by merging bucket i with bucket j (inf where i == j or either is merged away)."""
    area = heights * widths * n_images
    merged = np.maximum.outer(heights, heights) * np.maximum.outer(widths, widths)
    cost = merged * (n_images[:, None] + n_images[None, :]) - area[:, None] - area[None, :]
    usable = alive[:, None] & alive[None, :]
    np.fill_diagonal(usable, False)
    cost[~usable] = math.inf
    return cost


def assign(shape: Shape, buckets: Sequence[Shape]) -> Shape | None:
    """The smallest bucket (by area, then height) that holds ``shape``; None when none does."""
    h, w = int(shape[0]), int(shape[1])
    fitting = [b for b in buckets if b[0] >= h and b[1] >= w]
    return min(fitting, key=lambda b: (b[0] * b[1], b)) if fitting else None


def padding_ratio(shapes: Sequence[Shape], padded: Sequence[Shape]) -> float:
    """Padded pixels / valid pixels of images of ``shapes`` fed to the network at ``padded`` shapes."""
    valid = sum(int(h) * int(w) for h, w in shapes)
    total = sum(int(h) * int(w) for h, w in padded)
    return (total - valid) / valid if valid else 0.0
