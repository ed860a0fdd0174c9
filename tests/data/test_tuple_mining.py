"""Pool mining (``data.mining=pool``): the mined negatives against cnnimageretrieval-pytorch's loop run literally,
the per-epoch draw, the query/positive pairs, and the tuple sampler's batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oxford_ir.benchmarks.collection_split import collection_split
from oxford_ir.benchmarks.miniature_sfm120k import write_miniature_sfm120k
from oxford_ir.benchmarks.registry import read_collection
from oxford_ir.benchmarks.sfm120k import FOLDER, read_sfm120k_pickle
from oxford_ir.data.tuple_batches import TupleSampler
from oxford_ir.data.tuple_mining import PoolSettings, draw_epoch, epoch_tuples, mine_negatives
from oxford_ir.data.tuple_pairs import label_pairs, sfm120k_pairs
from oxford_ir.errors import ConfigError, DataError


def cirtorch_negatives(qvecs, poolvecs, qclusters, poolclusters, nnum):
    """``create_epoch_tuples``'s selection, as published (columns are vectors there; rows here)."""
    scores = torch.mm(poolvecs, qvecs.t())
    scores, ranks = torch.sort(scores, dim=0, descending=True)
    out = []
    for q in range(len(qvecs)):
        clusters, nidxs, r = [qclusters[q]], [], 0
        while len(nidxs) < nnum:
            potential = int(ranks[r, q])
            if poolclusters[potential] not in clusters:
                nidxs.append(potential)
                clusters.append(poolclusters[potential])
            r += 1
        out.append(nidxs)
    return np.array(out)


def unit(n, d, generator):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)


def test_mined_negatives_equal_cirtorchs_loop(monkeypatch):
    """Random embeddings and clusters (few clusters, so that one cluster often holds several of a query's nearest
    pool images); also with blocks of a few queries (the block size is a memory bound, not a result)."""
    generator = torch.Generator().manual_seed(0)
    for n_queries, n_pool, n_clusters, nnum in ((12, 120, 12, 5), (7, 50, 6, 5), (10, 150, 40, 1)):
        queries, pool = unit(n_queries, 8, generator), unit(n_pool, 8, generator)
        qclusters = torch.randint(0, n_clusters, (n_queries,), generator=generator).numpy()
        pclusters = torch.randint(0, n_clusters, (n_pool,), generator=generator).numpy()
        expected = cirtorch_negatives(queries, pool, qclusters.tolist(), pclusters.tolist(), nnum)
        assert np.array_equal(mine_negatives(queries, pool, qclusters, pclusters, nnum), expected)
        monkeypatch.setattr("oxford_ir.data.tuple_mining._BLOCK_ENTRIES", 3 * n_pool)
        assert np.array_equal(mine_negatives(queries, pool, qclusters, pclusters, nnum), expected)
        monkeypatch.undo()
        # the properties themselves: never the query's cluster, one image per cluster
        picked = pclusters[expected]
        assert (picked != qclusters[:, None]).all()
        assert all(len(set(row)) == nnum for row in picked.tolist())


def test_too_few_clusters_in_the_pool_is_one_clear_error():
    queries, pool = torch.eye(2, 4), torch.eye(4)
    with pytest.raises(DataError, match="query 0 has 2 pool clusters other than its own.*data.pool.poolsize"):
        mine_negatives(queries, pool, np.array([0, 0]), np.array([0, 1, 2, 0]), 3)


def test_the_epoch_draw_depends_on_seed_and_epoch_only():
    rows, pool = draw_epoch(100, 1000, 20, 300, seed=3, epoch=1)
    assert len(set(rows.tolist())) == 20 and len(set(pool.tolist())) == 300 and pool.max() < 1000
    again = draw_epoch(100, 1000, 20, 300, seed=3, epoch=1)
    assert np.array_equal(rows, again[0]) and np.array_equal(pool, again[1])
    assert not np.array_equal(rows, draw_epoch(100, 1000, 20, 300, seed=3, epoch=2)[0])
    small = draw_epoch(5, 8, 20, 300, seed=0, epoch=0)  # sizes are capped as cirtorch caps them
    assert sorted(small[0].tolist()) == list(range(5)) and sorted(small[1].tolist()) == list(range(8))


def test_epoch_tuples_compose_draw_embedding_and_mining():
    generator = torch.Generator().manual_seed(1)
    vectors = unit(60, 6, generator)
    clusters = np.arange(60) // 5  # 12 clusters of 5 images
    queries, positives = label_pairs(clusters, 12, seed=0)
    settings = PoolSettings(qsize=10, poolsize=40, nnum=3, tuples_per_batch=2)
    asked = []

    def embed(indices):
        asked.append(indices)
        return vectors[torch.as_tensor(indices)]

    tuples = epoch_tuples(queries, positives, clusters, settings, seed=7, epoch=2, embed=embed)
    rows, pool = draw_epoch(len(queries), 60, 10, 40, 7, 2)
    assert np.array_equal(asked[0], np.concatenate([queries[rows], pool]))
    assert np.array_equal(tuples[:, 0], queries[rows]) and np.array_equal(tuples[:, 1], positives[rows])
    expected = cirtorch_negatives(vectors[queries[rows]], vectors[pool], clusters[queries[rows]].tolist(),
                                  clusters[pool].tolist(), 3)  # fmt: skip
    assert np.array_equal(tuples[:, 2:], pool[expected])


def test_label_pairs_pair_each_landmark_image_with_another_of_its_class():
    labels = np.array([2, 0, 1, 0, 2, 2, 3, 0, 4])  # label 1 alone; 3 and 4 are distractors (num_landmarks=3)
    q, p = label_pairs(labels, 3, seed=5)
    assert q.tolist() == [0, 1, 3, 4, 5, 7]
    assert (labels[q] == labels[p]).all() and (q != p).all()
    assert np.array_equal(p, label_pairs(labels, 3, seed=5)[1])
    seen = {tuple(label_pairs(labels, 3, seed=s)[1].tolist()) for s in range(20)}
    assert len(seen) > 1  # drawn, not fixed


def test_sfm120k_pairs_are_the_published_ones(tmp_path):
    folder = tmp_path / FOLDER
    write_miniature_sfm120k(folder)
    split = collection_split(read_collection("sfm120k", tmp_path), name="sfm120k")
    q, p = sfm120k_pairs(split, tmp_path)
    part = read_sfm120k_pickle(folder / "retrieval-SfM-120k.pkl")["train"]
    names = [str(path) for path in split.paths]
    assert len(q) == len(part.qidxs) > 0
    for qi, pi, cq, cp in zip(q, p, part.cids[part.qidxs], part.cids[part.pidxs], strict=True):
        assert names[qi].endswith(cq) and names[pi].endswith(cp)
    assert (split.labels[q] == split.labels[p]).all()  # a pair is of one 3D model


def test_tuple_sampler_mines_lazily_and_shards_whole_tuples():
    calls = []

    def make(epoch):
        calls.append(epoch)
        return np.arange(7 * 4).reshape(7, 4) + 100 * epoch  # 7 tuples of 4 images

    sampler = TupleSampler(make, 7, 4, 2, seed=1)
    iterator = iter(sampler)
    assert calls == []  # nothing mined before the first index is drawn
    sampler.set_epoch(3)  # the iterator keeps the epoch it was made in
    first = list(iterator)
    assert calls == [0] and len(first) == len(sampler) == 3 * 8  # 3 whole batches of 2 tuples; tuple 7 dropped
    assert [i for i, _ in first] == list(range(24))
    assert [i for i, _ in iter(sampler)][:4] == [300, 301, 302, 303] and calls == [0, 3]
    list(iter(sampler))
    assert calls == [0, 3]  # an epoch is mined once
    shards = [TupleSampler(make, 7, 4, 2, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    got = [list(iter(s)) for s in shards]
    assert len(got[0]) == len(got[1]) == 8  # 3 batches: one each, the odd one dropped
    assert [i for i, _ in got[0]] == list(range(8)) and [i for i, _ in got[1]] == list(range(8, 16))
    assert [s for _, s in got[1]] == [s for _, s in first[8:16]]  # seeds follow the batch, whatever the rank
    with pytest.raises(ConfigError, match="tuples_per_batch=8"):
        TupleSampler(make, 7, 4, 8)


def test_pool_settings_are_checked():
    assert PoolSettings.from_config({"nnum": 0}) == PoolSettings(nnum=0)
    with pytest.raises(ConfigError, match="data.pool.qsize=0"):
        PoolSettings.from_config({"qsize": 0})
    with pytest.raises(ConfigError, match="data.pool.negatives: unknown key"):
        PoolSettings.from_config({"negatives": 5})
    with pytest.raises(ConfigError, match="tuples_per_batch=1 with data.pool.nnum=1"):
        PoolSettings.from_config({"tuples_per_batch": 1, "nnum": 1})
