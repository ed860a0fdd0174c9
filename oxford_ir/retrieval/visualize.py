"""Retrieval-result grids: a query and its top-k results, framed by their ground-truth label
(:func:`render_retrieval_grid`) or captioned with their scores (:func:`render_result_grid`, a search's)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.data.eval_pixels import ImageSource
from oxford_ir.errors import DataError
from oxford_ir.images import load_image, to_rgb

#: frame colours: positive, negative, junk (ignored by the protocol), and the query itself
COLOURS = {"positive": (40, 170, 60), "negative": (210, 40, 40), "junk": (150, 150, 150), "query": (40, 90, 220)}


def result_labels(benchmark: Benchmark, query: int, indices: Sequence[int]) -> list[str]:
    """``positive`` / ``negative`` / ``junk`` for each database index, under the benchmark's protocol."""
    positives = set(benchmark.positives(query).tolist())
    junk = set(np.asarray(benchmark.gnd[query].get("junk", ()), dtype=np.int64).tolist())
    return ["positive" if i in positives else "junk" if i in junk else "negative" for i in indices]


def _thumbnail(image: Image.Image, size: int, colour: tuple[int, int, int], border: int) -> Image.Image:
    inner = size - 2 * border
    image = ImageOps.pad(image, (inner, inner), color=(255, 255, 255))
    return ImageOps.expand(image, border=border, fill=colour)


def render_retrieval_grid(
    benchmark: Benchmark,
    ranks: np.ndarray,
    queries: Sequence[int],
    top_k: int = 8,
    thumbnail_size: int = 128,
    border: int = 6,
) -> Image.Image:
    """One row per query: the query (cropped to its box, blue frame), then its top-k results.

    Results are framed green (positive), red (negative) or grey (junk, ignored by the protocol).
    """
    top_k = min(top_k, ranks.shape[0])
    grid = Image.new("RGB", ((top_k + 1) * thumbnail_size, len(queries) * thumbnail_size), (255, 255, 255))
    for row, q in enumerate(queries):
        query_image = load_image(benchmark.image_path(benchmark.qimlist[q]))
        bbx = benchmark.query_bboxes[q]
        if bbx is not None:
            query_image = query_image.crop(tuple(int(round(v)) for v in bbx))
        grid.paste(_thumbnail(query_image, thumbnail_size, COLOURS["query"], border), (0, row * thumbnail_size))
        indices = [int(i) for i in ranks[:top_k, q]]
        for col, (index, label) in enumerate(zip(indices, result_labels(benchmark, q, indices), strict=True), start=1):
            image = load_image(benchmark.image_path(benchmark.imlist[index]))
            thumb = _thumbnail(image, thumbnail_size, COLOURS[label], border)
            ImageDraw.Draw(thumb).text((border + 2, border + 1), str(col), fill=(255, 255, 0))
            grid.paste(thumb, (col * thumbnail_size, row * thumbnail_size))
    return grid


def fixed_query_indices(n_queries: int, count: int) -> list[int]:
    """``count`` queries spread evenly over the list, the same every epoch."""
    if n_queries == 0 or count <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n_queries - 1, num=min(count, n_queries))})


# -- result grids -----------------------------------------------------------------------------------------------
#: frame of a result in a grid without ground truth
RESULT_COLOUR = (110, 110, 110)


def render_result_grid(
    queries: Sequence[ImageSource],
    results: Sequence[Sequence[tuple[str | Path, float]]],
    *,
    bboxes: Sequence[Sequence[float] | None] | None = None,
    thumbnail_size: int = 128,
    border: int = 4,
    caption_height: int = 14,
) -> Image.Image:
    """One row per query: the query (cropped to its box, blue frame), then its results captioned
    ``rank score``. A result that can no longer be read is drawn as a grey tile marked "unreadable"."""
    columns = 1 + max((len(r) for r in results), default=0)
    cell_h = thumbnail_size + caption_height
    grid = Image.new("RGB", (columns * thumbnail_size, max(1, len(queries)) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, query in enumerate(queries):
        y = row * cell_h
        image = _open_for_grid(query)
        bbox = None if bboxes is None else bboxes[row]
        if image is not None and bbox is not None:
            image = image.crop(tuple(float(v) for v in bbox))
        grid.paste(_tile(image, thumbnail_size, COLOURS["query"], border), (0, y))
        draw.text((border, y + thumbnail_size + 1), "query", fill=COLOURS["query"])
        for col, (path, score) in enumerate(results[row], start=1):
            x = col * thumbnail_size
            grid.paste(_tile(_open_for_grid(path), thumbnail_size, RESULT_COLOUR, border), (x, y))
            draw.text((x + border, y + thumbnail_size + 1), f"{col}  {score:.3f}", fill=(0, 0, 0))
    return grid


def _open_for_grid(image: ImageSource) -> Image.Image | None:
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    try:
        return load_image(image)
    except DataError:
        return None


def _tile(image: Image.Image | None, size: int, colour: tuple[int, int, int], border: int) -> Image.Image:
    if image is not None:
        return _thumbnail(image, size, colour, border)
    tile = _thumbnail(Image.new("RGB", (size, size), (200, 200, 200)), size, colour, border)
    ImageDraw.Draw(tile).text((border + 3, size // 2 - 6), "unreadable", fill=(0, 0, 0))
    return tile
