"""αQE and DBA against literal numpy implementations of their definitions (Radenović et al., TPAMI 2018)."""

from __future__ import annotations

import numpy as np
import pytest

from oxford_ir.errors import ConfigError
from oxford_ir.retrieval.exact_search import ExactSearch
from oxford_ir.retrieval.reranking import ReRanking, augment, drop_self
from oxford_ir.retrieval.search import Searcher, database_side_augmentation
from tests.retrieval.test_search import VectorIndex, clustered_vectors


def brute_force_expansion(queries: np.ndarray, db: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """q' = normalise(q + sum over the top-n database vectors of max(sim, 0) ** alpha * x), one query at a time."""
    db = db.astype(np.float64)
    out = []
    for q in queries.astype(np.float64):
        sims = db @ q
        v = q.copy()
        for j in np.argsort(-sims, kind="stable")[:n]:
            v += max(sims[j], 0.0) ** alpha * db[j]
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def brute_force_dba(db: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Each database vector: itself plus its top-n *other* database vectors, weighted as in αQE."""
    db64 = db.astype(np.float64)
    out = []
    for j, x in enumerate(db64):
        sims = db64 @ x
        others = [i for i in np.argsort(-sims, kind="stable") if i != j][:n]
        v = x.copy()
        for i in others:
            v += max(sims[i], 0.0) ** alpha * db64[i]
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def brute_force_top_k(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries.astype(np.float64) @ db.astype(np.float64).T), axis=1, kind="stable")[:, :k]


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    db, queries = clustered_vectors(n=300, dim=16, clusters=12, n_queries=9, seed=3)
    return db, queries


@pytest.mark.parametrize("n, alpha", [(1, 3.0), (3, 3.0), (5, 1.0), (4, 0.0), (10, 2.5)])
def test_query_expansion_matches_the_definition(data, n, alpha):
    db, queries = data
    searcher = Searcher(VectorIndex(db), query_expansion={"n": n, "alpha": alpha})
    result = searcher.search_vectors(queries, k=20)
    expanded = brute_force_expansion(queries, db, n, alpha)
    assert np.array_equal(result.indices, brute_force_top_k(db, expanded, 20))
    np.testing.assert_allclose(result.scores, np.take_along_axis(expanded @ db.T, result.indices, 1), atol=1e-5)
    # the whole ranking used for evaluation is expanded the same way
    ranks = searcher.rank_all(queries)
    assert np.array_equal(ranks.T, np.argsort(-(expanded @ db.T), axis=1, kind="stable"))


@pytest.mark.parametrize("n, alpha", [(1, 3.0), (3, 3.0), (6, 0.5)])
def test_database_augmentation_matches_the_definition(data, n, alpha):
    db, queries = data
    searcher = Searcher(VectorIndex(db), database_augmentation={"n": n, "alpha": alpha})
    expected_db = brute_force_dba(db, n, alpha)
    np.testing.assert_allclose(searcher.database, expected_db, atol=1e-6)
    result = searcher.search_vectors(queries, k=15)
    assert np.array_equal(result.indices, brute_force_top_k(expected_db, queries, 15))


def test_both_together_expand_with_the_augmented_database(data):
    db, queries = data
    searcher = Searcher(
        VectorIndex(db), query_expansion={"n": 3, "alpha": 3}, database_augmentation={"n": 4, "alpha": 3}
    )
    augmented = brute_force_dba(db, 4, 3.0)
    expanded = brute_force_expansion(queries, augmented, 3, 3.0)
    assert np.array_equal(searcher.search_vectors(queries, k=25).indices, brute_force_top_k(augmented, expanded, 25))


def test_dba_in_blocks_and_from_float16_equals_the_definition(data):
    db, _ = data
    db16 = db.astype(np.float16)
    augmented = database_side_augmentation(db16, ExactSearch(db16, block_rows=37), ReRanking(n=3), block_rows=11)
    assert augmented.dtype == np.float32
    np.testing.assert_allclose(augmented, brute_force_dba(db16.astype(np.float32), 3, 3.0), atol=1e-6)


def test_n_zero_is_the_identity(data):
    db, queries = data
    plain = Searcher(VectorIndex(db)).search_vectors(queries, k=30)
    off = Searcher(VectorIndex(db), query_expansion={"n": 0, "alpha": 3}, database_augmentation={"n": 0, "alpha": 3})
    result = off.search_vectors(queries, k=30)
    assert np.array_equal(result.indices, plain.indices) and np.array_equal(result.scores, plain.scores)
    assert off.database is off.index.embeddings  # DBA with n = 0 leaves the stored vectors untouched
    unchanged = augment(queries, db, np.zeros((len(queries), 0), dtype=np.int64), alpha=3.0)
    assert np.array_equal(unchanged, queries)


def test_weights_by_hand():
    """2-d vectors: weights max(sim, 0) ** alpha; a negative similarity and a missing (-1) neighbour add nothing."""
    c, s = np.cos(np.pi / 3), np.sin(np.pi / 3)
    db = np.array([[1.0, 0.0], [c, s], [-1.0, 0.0]], dtype=np.float32)
    q = np.array([[0.0, 1.0]], dtype=np.float32)
    # sims: 0, s, 0 -> neighbours [1, 0] with alpha 2: v = q + s^2 * db[1] + 0 * db[0]
    out = augment(q, db, np.array([[1, 0]]), alpha=2.0)
    v = q[0] + s**2 * db[1]
    np.testing.assert_allclose(out[0], v / np.linalg.norm(v), atol=1e-7)
    # the opposite vector (similarity -1) and a missing slot contribute nothing
    assert np.allclose(augment(db[:1], db, np.array([[2, -1]]), alpha=3.0), db[:1])
    # alpha 0: average query expansion, every neighbour with a positive similarity counts fully
    out = augment(q, db, np.array([[1, 0]]), alpha=0.0)
    v = q[0] + db[1] + db[0]
    np.testing.assert_allclose(out[0], v / np.linalg.norm(v), atol=1e-7)


def test_drop_self():
    indices = np.array([[4, 2, 7], [1, 5, 3], [9, 8, 6]])
    # row 0 drops 4 (itself), row 1 drops 5 (itself, not first), row 2 lacks itself (0): drops its last column
    assert drop_self(indices, np.array([4, 5, 0])).tolist() == [[2, 7], [1, 3], [9, 8]]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n": -1}, "query_expansion.n=-1"),
        ({"n": 2.5}, "query_expansion.n=2.5"),
        ({"n": True}, "query_expansion.n=True"),
        ({"n": 2, "alpha": -1}, "query_expansion.alpha=-1"),
        ({"n": 2, "alpha": "big"}, "query_expansion.alpha='big'"),
        ({"k": 2}, "unknown option(s) ['k']"),
        (3, "query_expansion=3: a group of settings, not a value; set query_expansion.n"),
    ],
)
def test_bad_parameters_are_config_errors(options, message):
    with pytest.raises(ConfigError) as error:
        ReRanking.from_config(options, "query_expansion")
    assert message in str(error.value)


def test_defaults():
    assert ReRanking.from_config(None, "query_expansion") == ReRanking(n=0, alpha=3.0)
    assert ReRanking.from_config({"n": 5}, "database_augmentation") == ReRanking(n=5, alpha=3.0)
    assert not ReRanking().enabled and ReRanking(n=1).enabled
