"""The search of an exported ONNX model without PyTorch equals the extraction path's: its pixels, its bilinear
rescaling, its scale combination and whitening, and the ranking of exact search; and oxford-ir-search takes it
exactly when it applies."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oxford_ir.data.datasets import pixels_to_tensor
from oxford_ir.data.eval_pixels import normalised_pixels
from oxford_ir.errors import DataError
from oxford_ir.extraction.embedding import extract_embeddings
from oxford_ir.extraction.whitening import fit_pca
from oxford_ir.models.onnx_embedder import load_onnx_embedder
from oxford_ir.retrieval.exact_search import ExactSearch
from oxford_ir.retrieval.index_build import build_index
from oxford_ir.retrieval.index_format import RetrievalIndex
from oxford_ir.retrieval.model_spec import ModelSpec
from oxford_ir.retrieval.onnx_export import export_onnx
from oxford_ir.retrieval.onnx_queries import (
    bilinear_rescale,
    embed_onnx_queries,
    search_onnx,
    torch_free_search_applies,
)
from oxford_ir.retrieval.search import Searcher
from oxford_ir.retrieval.top_k import exact_top_k
from tests.test_export import write_checkpoint

SCALES = (1.0, 1 / math.sqrt(2), 0.5)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> dict:
    """A checkpoint, its ONNX export, an export with a PCA whitening, and photos of three sizes."""
    root = tmp_path_factory.mktemp("onnx_queries")
    write_checkpoint(root / "model.ckpt", seed=0)
    spec = ModelSpec(checkpoint=str(root / "model.ckpt"))
    sample = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    whitening = fit_pca(sample, shrinkage=0.1, dim=12).with_info(model_fingerprint=spec.fingerprint())
    whitened = ModelSpec(checkpoint=spec.checkpoint, whitening=str(whitening.save(root / "whitening-pca.pt")))
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate([(30, 40), (44, 28), (37, 53), (30, 40), (61, 47)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    return {
        "root": root,
        "spec": spec,
        "onnx": export_onnx(spec, root / "model.onnx").path,
        "whitened": export_onnx(whitened, root / "whitened.onnx").path,
        "photos": sorted(photos.iterdir()),
    }


@pytest.mark.parametrize("scale", [0.5, 1 / math.sqrt(2), 0.3, 1.5])
@pytest.mark.parametrize("size", [(7, 9), (30, 41), (1, 5)])
def test_bilinear_rescale_is_torch_interpolate(scale: float, size: tuple[int, int]) -> None:
    batch = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    if math.floor(size[0] * scale) < 1:
        with pytest.raises(ValueError, match="no pixels left"):
            bilinear_rescale(batch.numpy(), scale)
        return
    expected = torch.nn.functional.interpolate(batch, scale_factor=scale, mode="bilinear", align_corners=False)
    found = bilinear_rescale(batch.numpy(), scale)
    assert found.shape == tuple(expected.shape) and found.dtype == np.float32
    np.testing.assert_allclose(found, expected.numpy(), rtol=0, atol=2e-6)


def test_normalised_pixels_are_the_tensor_path_s() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    found = normalised_pixels(pixels)
    assert found.shape == (3, 13, 17) and found.dtype == np.float32
    np.testing.assert_allclose(found, pixels_to_tensor(pixels).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_top_k_ranks_as_exact_search(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    database = rng.standard_normal((300, 16)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    database[10] = database[200] = database[50]  # equal scores: the lower row first
    database[7] = np.nan  # NaN scores: last
    database = database.astype(dtype)
    queries = np.concatenate([database[[50, 3]].astype(np.float32), rng.standard_normal((4, 16)).astype(np.float32)])
    queries[2:] /= np.linalg.norm(queries[2:], axis=1, keepdims=True)
    monkeypatch.setattr("oxford_ir.retrieval.top_k._BLOCK_ELEMENTS", 6 * 64)  # several blocks to merge
    for k in (1, 3, 10, 300, 500):
        found = exact_top_k(database, queries, k)
        scores, indices = ExactSearch(database).search(queries, k)
        np.testing.assert_array_equal(found.indices, indices)
        np.testing.assert_allclose(found.scores, scores, rtol=0, atol=1e-6)
    top = exact_top_k(database, queries, 300)
    assert top.indices[0, :3].tolist() == [10, 50, 200] and top.indices[0, -1] == 7 and top.scores[0, -1] == -np.inf


@pytest.mark.parametrize(
    ("model", "scales", "boxes"),
    [
        ("onnx", (1.0,), False),
        ("onnx", SCALES, False),
        ("onnx", SCALES, True),
        ("whitened", (1.0, 0.7), True),
    ],
)
def test_query_embeddings_are_the_extraction_path_s(onnx_files: dict, model: str, scales, boxes: bool) -> None:
    photos = onnx_files["photos"]
    bboxes = [(2, 3, 25, 27), None, (0.4, 1.6, 30.2, 29.9), None, (5, 5, 40, 55)] if boxes else None
    found = embed_onnx_queries(str(onnx_files[model]), photos, bboxes, 36, scales)
    expected = extract_embeddings(load_onnx_embedder(onnx_files[model]), photos, 36, bboxes=bboxes, scales=scales)
    assert found.shape == tuple(expected.shape) and found.dtype == np.float32
    np.testing.assert_allclose(found, expected.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, atol=1e-5)


def test_a_search_equals_the_searcher_s_and_refuses_the_same_queries(onnx_files: dict, tmp_path: Path) -> None:
    spec = ModelSpec(onnx=str(onnx_files["onnx"]))
    photos = onnx_files["photos"]
    folder = photos[0].parent
    build_index(spec, folder, tmp_path / "index", image_size=36, scales=SCALES, num_workers=0, progress=False)
    index = RetrievalIndex.load(tmp_path / "index")
    found = search_onnx(index, photos, [None, (1, 1, 20, 30), None, None, None], k=4)
    expected = Searcher(index).search_images(photos, [None, (1, 1, 20, 30), None, None, None], k=4)
    np.testing.assert_array_equal(found.indices, expected.indices)
    np.testing.assert_allclose(found.scores, expected.scores, atol=1e-5)
    assert found.indices[[0, 2, 3, 4], 0].tolist() == [0, 2, 3, 4]  # an indexed image finds itself first
    with pytest.raises(DataError, match="outside"):
        search_onnx(index, photos[:1], [(0, 0, 400, 400)], k=2)
    with pytest.raises(DataError, match="not found"):
        search_onnx(index, [tmp_path / "nope.png"], None, k=2)


def test_the_path_is_taken_only_where_it_gives_the_same_results(onnx_files: dict, tmp_path: Path) -> None:
    build_index(
        ModelSpec(onnx=str(onnx_files["onnx"])), onnx_files["photos"][0].parent, tmp_path / "by_onnx",
        image_size=36, num_workers=0, progress=False,
    )  # fmt: skip
    by_onnx = RetrievalIndex.load(tmp_path / "by_onnx")
    off = [{"n": 0, "alpha": 3.0}, {"n": 0, "alpha": 3.0}]
    cpu, auto = {"device": "cpu", "batch_size": 8, "num_workers": 0}, {"device": "auto"}
    assert torch_free_search_applies(by_onnx, backend="auto", reranking=off, extraction=auto)
    assert torch_free_search_applies(by_onnx, backend="exact", reranking=off, extraction=cpu)
    assert not torch_free_search_applies(by_onnx, backend="faiss", reranking=off, extraction=cpu)
    assert not torch_free_search_applies(by_onnx, backend="exact", reranking=off, extraction={"device": "cuda"})
    assert not torch_free_search_applies(by_onnx, backend="exact", reranking=[{"n": 2}, off[1]], extraction=cpu)
    assert not torch_free_search_applies(by_onnx, backend="exact", reranking=[{"n": "x"}, off[1]], extraction=cpu)
    assert not torch_free_search_applies(by_onnx, backend="exact", reranking=[3, off[1]], extraction=cpu)
    for bad in ({"n": False}, {"n": 0, "alpha": "big"}, {"m": 1}):  # off, but malformed: the Searcher names it
        assert not torch_free_search_applies(by_onnx, backend="exact", reranking=[bad, off[1]], extraction=cpu)
    assert torch_free_search_applies(by_onnx, backend="exact", reranking=[None, {"n": 0}], extraction=cpu)
    for bad in ({"batch_size": 0}, {"num_workers": -1}, {"batch_size": "8"}):  # the Searcher says what is wrong
        assert not torch_free_search_applies(by_onnx, backend="exact", reranking=off, extraction={**cpu, **bad})
    build_index(
        onnx_files["spec"], onnx_files["photos"][0].parent, tmp_path / "by_ckpt", image_size=36, num_workers=0,
        progress=False,
    )  # fmt: skip
    assert not torch_free_search_applies(RetrievalIndex.load(tmp_path / "by_ckpt"), backend="exact", reranking=off,
                                         extraction=cpu)  # fmt: skip
