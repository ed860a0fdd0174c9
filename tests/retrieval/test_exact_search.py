"""Exact search against a brute-force float64 reference: top-k order, ties to the lower row, NaN last, every
database type (float32, float16, bfloat16, memory-mapped), block, chunk and query-batch sizes; the CUDA
algorithm on CPU tensors, and on a GPU against the CPU path (skipped without CUDA)."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

from oxford_ir.retrieval import exact_search
from oxford_ir.retrieval.exact_search import (
    ExactSearch,
    _grouped_top_k,
    _top_k,
    exact_half_products,
    search_resident,
)
from oxford_ir.retrieval.search import Searcher

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def clustered(n: int, dim: int, n_queries: int, seed: int = 0, clusters: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 rows around a few centres, and queries from the same centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))

    def draw(count: int) -> np.ndarray:
        x = centres[rng.integers(0, clusters, count)] + 0.5 * rng.standard_normal((count, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(n), draw(n_queries)


def reference(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores, best first, equal scores by the lower row, NaN last."""
    with np.errstate(invalid="ignore"):
        scores = np.asarray(queries, np.float64) @ np.asarray(db, np.float64).T
    scores[np.isnan(scores)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def assert_reference(found: tuple[np.ndarray, np.ndarray], db: np.ndarray, queries: np.ndarray, k: int) -> None:
    scores, indices = found
    expected_scores, expected = reference(db, queries, k)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    assert indices.shape == expected.shape
    assert np.array_equal(indices, expected)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several query batches, blocks and upcast chunks on a few hundred rows (CPU and device paths)."""
    monkeypatch.setattr(exact_search, "_BLOCK_ELEMENTS", 256)  # CPU: 256 // block_rows queries per batch
    monkeypatch.setattr(exact_search, "_CHUNK_BYTES", 24 * 4 * 3)  # CPU: chunks of 3 rows of 24
    monkeypatch.setattr(exact_search, "_DEVICE_QUERY_BATCH", 4)


# -- CPU ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_rows", [None, 7, 50, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_top_k_equals_the_float64_reference(block_rows, dtype):
    db, queries = clustered(n=203, dim=24, n_queries=13, seed=1)
    db = db.astype(dtype)
    engine = ExactSearch(db, block_rows=block_rows)
    assert engine.streamed is (dtype == np.float16)
    assert_reference(engine.search(queries, k=17), db, queries, 17)


def test_several_query_batches_blocks_and_chunks(monkeypatch):
    small_batches(monkeypatch)
    db, queries = clustered(n=120, dim=24, n_queries=11, seed=2)
    for stored in (db, db.astype(np.float16)):
        engine = ExactSearch(stored, block_rows=40)  # 6 queries a batch, 3 blocks, chunks of 3 rows
        assert_reference(engine.search(queries, k=9), stored, queries, 9)
        assert_reference(ExactSearch(stored).search(queries, k=9), stored, queries, 9)  # default blocks: 10 rows


def test_grouped_selection_of_large_blocks():
    """Blocks of thousands of rows take the k best of the k best groups of 32; duplicates tie across groups."""
    db, queries = clustered(n=3000, dim=16, n_queries=9, seed=3)
    db[2500:2600] = db[100:200]  # equal scores in other groups and blocks: the lower row first
    for stored, block_rows in ((db.astype(np.float16), None), (db, 1111)):
        assert_reference(ExactSearch(stored, block_rows=block_rows).search(queries, k=10), stored, queries, 10)
    assert_reference(ExactSearch(db).search(db[150:153], k=3), db, db[150:153], 3)  # each finds itself, not its copy


def test_ties_go_to_the_lower_row_across_blocks():
    """Equal scores (duplicated rows) come out in increasing row order, also across block boundaries."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4, 8)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    db = base[[2, 0, 1, 0, 3, 0, 2, 0, 1, 0]]  # base 0 at rows 1, 3, 5, 7, 9; base 2 at rows 0 and 6
    for stored in (db, db.astype(np.float16)):
        for block_rows in (None, 1, 3, 4):
            search = ExactSearch(stored, block_rows=block_rows)
            _, indices = search.search(base[[0, 2]], k=6)
            assert indices[0, :5].tolist() == [1, 3, 5, 7, 9], block_rows
            assert indices[1, :2].tolist() == [0, 6], block_rows
            _, indices = search.search(np.zeros((1, 8), np.float32), k=4)  # every score 0: plain row order
            assert indices.tolist() == [[0, 1, 2, 3]], block_rows
            _, indices = search.search(-np.zeros((1, 8), np.float32), k=4)  # -0.0 and 0.0 are equal scores
            assert indices.tolist() == [[0, 1, 2, 3]], block_rows


def test_nan_rows_and_queries_never_outrank():
    db, queries = clustered(n=40, dim=8, n_queries=3, seed=4)
    db[[0, 5, 17]] = np.nan
    queries[2] = np.nan  # every score NaN: all rows tie, in row order
    for stored in (db, db.astype(np.float16)):
        for block_rows in (None, 4):
            scores, indices = ExactSearch(stored, block_rows=block_rows).search(queries, k=40)
            assert_reference((scores, indices), stored, queries, 40)
            assert set(indices[0, -3:].tolist()) == {0, 5, 17} and np.all(np.isneginf(scores[0, -3:]))
            assert indices[2].tolist() == list(range(40))


def test_k_beyond_the_database_empty_queries_and_empty_database():
    db, queries = clustered(n=5, dim=4, n_queries=2)
    scores, indices = ExactSearch(db).search(queries, k=50)
    assert indices.shape == (2, 5) and sorted(indices[0].tolist()) == [0, 1, 2, 3, 4]
    assert np.all(np.diff(scores, axis=1) <= 0)
    scores, indices = ExactSearch(db.astype(np.float16)).search(np.zeros((0, 4), np.float32), k=3)
    assert scores.shape == indices.shape == (0, 3) and scores.dtype == np.float32 and indices.dtype == np.int64
    scores, indices = ExactSearch(np.zeros((0, 4), np.float16)).search(queries, k=3)
    assert scores.shape == indices.shape == (2, 0)
    with pytest.raises(ValueError, match="nq x 4"):
        ExactSearch(db).search(np.ones((2, 5), np.float32), 1)
    with pytest.raises(ValueError, match="N x D"):
        ExactSearch(np.ones(4, np.float32))


def test_bfloat16_tensor_and_odd_layouts():
    db, queries = clustered(n=120, dim=16, n_queries=5, seed=5)
    bf16 = torch.from_numpy(db).bfloat16()
    engine = ExactSearch(bf16, block_rows=33)
    assert engine.streamed and "bfloat16" in repr(engine)
    assert_reference(engine.search(torch.from_numpy(queries), k=8), bf16.float().numpy(), queries, 8)
    half = db.astype(np.float16)
    for stored in (half[::-1], half.astype(">f2"), np.asfortranarray(half)):  # negative strides, big-endian, F
        assert_reference(ExactSearch(stored, block_rows=33).search(queries, k=8), stored.astype(np.float32), queries, 8)


def test_memory_mapped_float16_database(tmp_path):
    db, queries = clustered(n=250, dim=16, n_queries=6, seed=6)
    np.save(tmp_path / "db.npy", db.astype(np.float16))
    mapped = np.load(tmp_path / "db.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not writable" warning from torch
        engine = ExactSearch(mapped, block_rows=64)
        found = engine.search(np.load(tmp_path / "db.npy", mmap_mode="r")[:6].astype(np.float32), k=7)
    assert engine.streamed and isinstance(engine.database, np.memmap)
    assert_reference(found, mapped, mapped[:6].astype(np.float32), 7)
    assert np.array_equal(engine.rank_all(queries), ExactSearch(np.array(mapped)).rank_all(queries))


def test_threads_share_one_engine():
    db, queries = clustered(n=500, dim=32, n_queries=40, seed=7)
    engine = ExactSearch(db.astype(np.float16), block_rows=64)
    expected = engine.search(queries, k=5)[1]
    results: dict[int, np.ndarray] = {}

    def work(t: int) -> None:
        for _ in range(5):
            results[t] = engine.search(queries[t::4], k=5)[1]
            assert np.array_equal(results[t], expected[t::4])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(results[t], expected[t::4]) for t in range(4))


def test_searcher_builds_the_engine_on_its_device():
    class Vectors:  # the one attribute of an index that building the engine reads
        embeddings = clustered(n=30, dim=8, n_queries=1)[0]

        def __len__(self) -> int:
            return 30

    engine = Searcher(Vectors(), device="cpu")._ensure_engine()
    assert isinstance(engine, ExactSearch) and engine.device == torch.device("cpu")
    if torch.cuda.is_available():
        assert Searcher(Vectors(), device="cuda")._ensure_engine().device.type == "cuda"


# -- the ranking primitives ----------------------------------------------------------------------------------
def test_top_k_and_grouped_top_k_against_numpy():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (40, 1000), generator=generator).float()  # ties everywhere
    scores[0] = -np.inf
    scores[1, 500:] = -0.0
    scores[2, ::3] = np.nan
    plain = np.nan_to_num(scores.double().numpy(), nan=-np.inf, neginf=-np.inf)
    expected = np.argsort(-plain, axis=1, kind="stable")
    cleaned = scores.nan_to_num(nan=-np.inf, neginf=-np.inf)
    for k in (1, 5, 10, 1000):
        values, columns = _top_k(scores, k)
        assert np.array_equal(columns.numpy(), expected[:, :k]), k
        assert torch.equal(values, cleaned.gather(1, columns)) and not values.isnan().any()
        for group in (2, 7, 8, 32):  # 1000 is no multiple of 7 or 32: the last group is padded
            assert torch.equal(_grouped_top_k(cleaned, k, group)[1], columns), (k, group)
    named = torch.arange(999, -1, -1).expand(40, 1000)  # columns named in reverse: ties go the other way
    by_name = np.argsort(-plain[:, ::-1], axis=1, kind="stable")[:, :3]  # position in the reversed row = name
    assert np.array_equal(_top_k(scores, 3, columns=named)[1].numpy(), by_name)


# -- the CUDA algorithm, here on CPU tensors ------------------------------------------------------------------
@pytest.mark.parametrize("finite", [True, False])
def test_resident_search_on_cpu_tensors(monkeypatch, finite):
    small_batches(monkeypatch)
    monkeypatch.setattr(exact_search, "_DEVICE_BLOCK_ELEMENTS", 4 * 512)  # default blocks: 512 rows of 4 queries
    db, queries = clustered(n=1200, dim=16, n_queries=11, seed=8)
    db[1100:1140] = db[10:50]
    rows, half = torch.from_numpy(db).half(), torch.from_numpy(queries).half()
    # grouped where k x group x 4 <= the block's rows (100 and 97 with k = 3; the default with 10), else plain
    for block_rows, group, k in ((None, None, 10), (100, 4, 3), (97, 8, 3), (100, 4, 12), (7, 32, 3)):
        scores, indices = search_resident(rows, half, k, block_rows=block_rows, finite=finite, group=group)
        assert_reference((scores.numpy(), indices.numpy()), rows.float().numpy(), half.float().numpy(), k)
    rows[[3, 9]] = float("nan")
    scores, indices = search_resident(rows, half, 1200, block_rows=256, group=4)
    assert_reference((scores.numpy(), indices.numpy()), rows.float().numpy(), half.float().numpy(), 1200)


def test_exact_half_products_restores_the_flags():
    matmul = torch.backends.cuda.matmul
    before = (matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)
    with exact_half_products():
        with exact_half_products():  # nested (another thread): still off
            assert not matmul.allow_fp16_reduced_precision_reduction
        assert not matmul.allow_fp16_reduced_precision_reduction
        assert not matmul.allow_bf16_reduced_precision_reduction
    assert (matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction) == before


# -- on a GPU ---------------------------------------------------------------------------------------------------
def assert_matches_cpu(found: tuple[np.ndarray, np.ndarray], db: np.ndarray, half_queries: np.ndarray, k: int):
    """Same rows as the CPU path fed the half-rounded queries, up to near-ties (float32 sums in another order)."""
    scores, indices = found
    expected_scores, expected = ExactSearch(db).search(half_queries, k)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    differ = indices != expected
    assert np.all(np.abs(scores[differ] - expected_scores[differ]) < 1e-5)
    assert np.mean(differ) < 0.01


@CUDA
def test_cuda_equals_the_cpu_path(tmp_path, monkeypatch):
    db, queries = clustered(n=5000, dim=64, n_queries=300, seed=9)  # (exact ties: the next test)
    half = db.astype(np.float16)
    rounded = queries.astype(np.float16).astype(np.float32)
    engine = ExactSearch(half, device="cuda")
    assert engine._rows is not None and engine._rows.is_cuda and engine._rows.dtype == torch.float16
    pointer = engine._rows.data_ptr()
    assert_matches_cpu(engine.search(queries, 10), half, rounded, 10)
    assert engine._rows.data_ptr() == pointer  # resident: nothing uploaded again
    monkeypatch.setattr(exact_search, "_DEVICE_QUERY_BATCH", 64)  # several query batches
    for block_rows in (None, 1000, 777):
        assert_matches_cpu(
            ExactSearch(half, device="cuda", block_rows=block_rows).search(queries, 10), half, rounded, 10
        )
    np.save(tmp_path / "db.npy", half)
    mapped = ExactSearch(np.load(tmp_path / "db.npy", mmap_mode="r"), device="cuda")
    assert_matches_cpu(mapped.search(queries, 10), half, rounded, 10)
    assert_matches_cpu(ExactSearch(db, device="cuda").search(queries, 10), half, rounded, 10)  # float32 -> float16


@CUDA
def test_cuda_bfloat16_ties_nan_and_flags():
    db, queries = clustered(n=3000, dim=32, n_queries=50, seed=10)
    bf16 = torch.from_numpy(db).bfloat16()
    engine = ExactSearch(bf16, device="cuda")
    assert engine._rows.dtype == torch.bfloat16
    rounded = torch.from_numpy(queries).bfloat16().float().numpy()
    assert_matches_cpu(engine.search(queries, 10), bf16.float().numpy(), rounded, 10)
    # exactly representable scores: ties are exact on every path, and go to the lower row
    ints = np.zeros((3000, 32), np.float32)
    ints[np.arange(3000), np.arange(3000) % 4] = 1.0
    ints[[5, 9]] = np.nan
    probe = np.zeros((2, 32), np.float32)
    probe[0, 1] = 1.0
    scores, indices = ExactSearch(ints.astype(np.float16), device="cuda").search(probe, 3000)
    assert np.array_equal(indices, reference(ints, probe, 3000)[1])
    assert np.all(np.isneginf(scores[:, -2:])) and set(indices[0, -2:].tolist()) == {5, 9}
    before = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    engine.search(queries, 3)
    assert torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction == before
