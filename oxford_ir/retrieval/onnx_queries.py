"""Searching an index with an exported ONNX model without PyTorch: onnxruntime embeds the queries, NumPy ranks.

Why a path without PyTorch: an ONNX file is how a model is deployed where PyTorch is not installed, and
``import torch`` alone costs 1.2-1.9 s of every command's start-up on this project's CPU machines (see
``experiments/bench/startup.py``). :func:`torch_free_search_applies` says when this path is taken by
``oxford-ir-search``: the model is an ONNX file, the search is exact on the CPU without query expansion or
database-side augmentation, and the index was embedded in float32. Anything else goes through
:class:`~oxford_ir.retrieval.search.Searcher`.

It is the extraction path (:mod:`oxford_ir.extraction.embedding` running
:func:`~oxford_ir.models.onnx_embedder.load_onnx_embedder`) step for step, as tests hold it (within 1e-5):

- the pixels: :func:`~oxford_ir.data.eval_pixels.eval_image` (the one "image (+ box) -> pixels" function: decoded,
  cropped to the box, long side downscaled) and :func:`~oxford_ir.data.eval_pixels.normalised_pixels`;
- each scale: the image resized by :func:`bilinear_rescale` (``F.interpolate(scale_factor=s, mode="bilinear",
  align_corners=False)``), run through the network; scales combined as ``normalize(mean_s(f_s ** p)) ** (1/p)``
  with GeM's power ``p`` from the file; one scale is the network's output itself;
- then the file's whitening (:class:`~oxford_ir.models.onnx_file.ArrayWhitening`).

An ONNX model cannot pool padded images, so the extraction path runs it on exact shape batches; here each image
runs alone (a batch of one), which gives the same vectors up to float rounding. Ranking is
:func:`~oxford_ir.retrieval.top_k.exact_top_k`, the order of the exact CPU search.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from oxford_ir.data.eval_pixels import eval_image, normalised_pixels
from oxford_ir.errors import ConfigError
from oxford_ir.models.onnx_file import INPUT, OUTPUT, open_onnx
from oxford_ir.retrieval.query_images import QueryImage, checked_queries
from oxford_ir.retrieval.reranking import ReRanking
from oxford_ir.retrieval.top_k import SearchResult, check_k, exact_top_k

if TYPE_CHECKING:
    from oxford_ir.retrieval.index_format import RetrievalIndex

#: the re-ranking settings of a search, in the order :func:`torch_free_search_applies` takes them
RERANKINGS = ("query_expansion", "database_augmentation")


def torch_free_search_applies(
    index: RetrievalIndex, *, backend: str, reranking: Sequence[Any], extraction: Mapping[str, Any]
) -> bool:
    """Whether a search of ``index`` (its model as searched) with these settings runs without PyTorch: an ONNX
    model, ``backend`` exact (or auto without a stored search index), ``reranking`` (the settings of query expansion
    and database-side augmentation, in that order) off, ``extraction.device`` cpu or auto (onnxruntime runs
    on the CPU; cuda sends exact search to the GPU through the PyTorch path) and a float32 index. A malformed
    setting also goes to :class:`~oxford_ir.retrieval.search.Searcher`, which says what is wrong with it."""
    if index.model.onnx is None or extraction.get("device", "auto") not in ("cpu", "auto"):
        return False
    if backend not in ("exact", "auto") or (backend == "auto" and index.manifest.get("search_index")):
        return False
    try:
        if any(ReRanking.from_config(option, key).enabled for option, key in zip(reranking, RERANKINGS, strict=True)):
            return False
    except ConfigError:
        return False
    batch_size, workers = extraction.get("batch_size", 8), extraction.get("num_workers", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (batch_size, workers)):
        return False
    if batch_size < 1 or workers < 0:
        return False
    return str(getattr(index, "precision", "32")) == "32"


def search_onnx(
    index: RetrievalIndex,
    images: Sequence[QueryImage],
    bboxes: Sequence[Sequence[float] | None] | None = None,
    k: int = 10,
) -> SearchResult:
    """Top-k of image files or PIL images (each cropped to its box) in ``index``, whose model is an ONNX file,
    by exact search of its stored rows; the queries are checked as :class:`~oxford_ir.retrieval.search.Searcher`
    checks them."""
    k = check_k(k)
    assert index.model.onnx is not None, "search_onnx needs an index whose model is an ONNX file"
    vectors = embed_onnx_queries(index.model.onnx, images, bboxes, index.image_size, index.scales)
    return exact_top_k(index.embeddings, vectors, k)


def embed_onnx_queries(
    onnx_path: str,
    images: Sequence[QueryImage],
    bboxes: Sequence[Sequence[float] | None] | None,
    image_size: int | None,
    scales: Sequence[float] = (1.0,),
) -> np.ndarray:
    """N x D float32 L2-normalised embeddings of ``images`` (boxes checked, then cropped) by the ONNX file."""
    images, boxes, labels = checked_queries(images, bboxes)
    session, info = open_onnx(onnx_path)
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive factors, got {list(scales)}")
    out = np.empty((len(images), info.embedding_dim), dtype=np.float32)
    for row, (image, box, label) in enumerate(zip(images, boxes, labels, strict=True)):
        pixels = normalised_pixels(eval_image(image, image_size, box, label))[None]
        per_scale = [session.run([OUTPUT], {INPUT: bilinear_rescale(pixels, s)})[0] for s in scales]
        vector = per_scale[0] if len(scales) == 1 else combine_scales(per_scale, info.pooling_power)
        out[row] = vector[0] if info.whitening is None else info.whitening.apply(vector)[0]
    return out


def combine_scales(vectors: Sequence[np.ndarray], power: float) -> np.ndarray:
    """``normalize(mean_s(v_s ** p) ** (1/p))``: cnnimageretrieval's ``extract_ms`` over per-scale vectors."""
    with np.errstate(invalid="ignore"):  # a negative value to a fractional power is NaN, as in PyTorch
        total = sum(np.asarray(v, dtype=np.float32) ** np.float32(power) for v in vectors)
        combined = (total / np.float32(len(vectors))) ** np.float32(1.0 / power)
    return combined / np.maximum(np.linalg.norm(combined, axis=1, keepdims=True), np.float32(1e-12))


def bilinear_rescale(batch: np.ndarray, scale: float) -> np.ndarray:
    """A B x C x H x W float32 batch resized by ``scale`` as ``F.interpolate(batch, scale_factor=scale,
    mode="bilinear", align_corners=False)``: ``floor(size * scale)`` pixels, each sampled at
    ``(i + 0.5) / scale - 0.5`` (at least 0) between its two nearest source pixels."""
    if scale == 1.0:
        return batch
    height, width = batch.shape[-2:]
    out_h, out_w = math.floor(height * scale), math.floor(width * scale)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"an image of {width} x {height} pixels at scale {scale} has no pixels left")
    top, bottom, down = _sampling(height, out_h, scale)
    left, right, across = _sampling(width, out_w, scale)
    rows = batch[..., top, :] * (1 - down)[:, None] + batch[..., bottom, :] * down[:, None]
    return np.ascontiguousarray(rows[..., left] * (1 - across) + rows[..., right] * across, dtype=np.float32)


def _sampling(size: int, out: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output pixel along one axis: the lower and upper source pixel and the weight of the upper one."""
    source = np.float32(1.0 / scale) * (np.arange(out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    source = np.maximum(source, np.float32(0))
    lower = np.minimum(source.astype(np.int64), size - 1)
    upper = np.minimum(lower + 1, size - 1)
    return lower, upper, (source - lower).astype(np.float32)
