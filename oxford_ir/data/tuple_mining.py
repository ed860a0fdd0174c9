"""cnnimageretrieval-pytorch's per-epoch tuple mining (``TuplesDataset.create_epoch_tuples``) as pure functions.

Every epoch, before training on it, cirtorch draws ``qsize`` of the dataset's query/positive pairs and a pool of
``poolsize`` images (a random subset of *all* training images, queries included), embeds the queries and the pool
with the current network (eval mode, no gradient), and gives each query the ``nnum`` pool images most similar to
it (descending dot product of L2-normalised embeddings) that are not of the query's cluster, taking at most one
image per cluster (the first, i.e. the most similar, of each). A tuple is ``(q, p, n1, ..., nN)``.

Here the draw is a function of ``(seed, epoch)`` only (:func:`draw_epoch`, its own numpy generator; cirtorch
reseeds torch's global one with the epoch), so re-mining after a resume from an epoch's end gives the tuples of an
uninterrupted run (the embeddings are those of the restored weights). :func:`mine_negatives` works on blocks of
queries with tensor operations (no loop over queries or pool images); :func:`epoch_tuples` composes the two with
an ``embed(image indices) -> N x D`` function that the caller supplies (the data layer does not know the network).

One difference in the limit: cirtorch's loop runs past the end of the pool (an IndexError) when a query's pool
holds fewer than ``nnum`` clusters other than its own; here that is a :class:`~oxford_ir.errors.DataError`
naming the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from oxford_ir.errors import ConfigError, DataError

#: stream tag of the epoch draw (the samplers' own draws use other tags of the same seed)
_DRAW_TAG = 0x7C1E
#: query x pool scores held at once while mining (the block of queries is sized to it)
_BLOCK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class PoolSettings:
    """``data.pool``: cirtorch's ``--query-size``, ``--pool-size``, ``--neg-num`` and ``--batch-size``."""

    #: query/positive pairs drawn per epoch (the epoch's tuples; cirtorch 2000)
    qsize: int = 2000
    #: images drawn per epoch as candidate negatives (cirtorch 20000)
    poolsize: int = 20000
    #: negatives per tuple (cirtorch 5)
    nnum: int = 5
    #: tuples per training batch (cirtorch 5)
    tuples_per_batch: int = 5

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> PoolSettings:
        """The settings of ``data.pool`` (missing keys take the published values), each checked."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"data.pool.{unknown[0]}: unknown key; data.pool takes {', '.join(cls.__dataclass_fields__)}"
            )
        values = {}
        for key, field in cls.__dataclass_fields__.items():
            value = config.get(key, field.default)
            least = 0 if key == "nnum" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"data.pool.{key}={value!r}: expected a whole number >= {least}")
            values[key] = value
        if values["tuples_per_batch"] == 1 and values["nnum"] <= 1:
            # pytorch-metric-learning's pair losses return zero for a batch of at most one pair of each kind
            raise ConfigError(
                f"data.pool.tuples_per_batch=1 with data.pool.nnum={values['nnum']}: a batch of one pair of each kind "
                "trains nothing (pytorch-metric-learning returns a zero loss); use 2 tuples a batch or nnum >= 2"
            )
        return cls(**values)

    @property
    def tuple_size(self) -> int:
        """Images per tuple: query, positive and ``nnum`` negatives."""
        return 2 + self.nnum


def draw_epoch(
    n_pairs: int, n_images: int, qsize: int, poolsize: int, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(pair rows, pool)`` of ``epoch``: ``min(qsize, n_pairs)`` distinct rows of the pair list and
    ``min(poolsize, n_images)`` distinct image indices, both in random order, from ``(seed, epoch)`` alone."""
    rng = np.random.default_rng([int(seed), int(epoch), _DRAW_TAG])
    rows = rng.permutation(n_pairs)[: min(qsize, n_pairs)]
    pool = rng.permutation(n_images)[: min(poolsize, n_images)]
    return rows.astype(np.int64), pool.astype(np.int64)


def mine_negatives(
    queries: torch.Tensor, pool: torch.Tensor, query_clusters: np.ndarray, pool_clusters: np.ndarray, nnum: int
) -> np.ndarray:
    """``Q x nnum`` positions into ``pool``: for each query (row of ``queries``, Q x D), the ``nnum`` pool rows
    (P x D) of highest dot product whose cluster is not the query's, at most one per cluster (its most similar
    image), most similar first. Equal scores keep pool order (a stable sort)."""
    n_queries, n_pool = len(queries), len(pool)
    query_clusters = torch.as_tensor(np.asarray(query_clusters), dtype=torch.long)
    pool_clusters = torch.as_tensor(np.asarray(pool_clusters), dtype=torch.long)
    if len(query_clusters) != n_queries or len(pool_clusters) != n_pool:
        raise ValueError(
            f"{n_queries} queries, {n_pool} pool images: one cluster each, got "
            f"{len(query_clusters)} and {len(pool_clusters)}"
        )
    out = torch.empty(n_queries, nnum, dtype=torch.long)
    if nnum == 0 or n_queries == 0:
        return out.numpy()
    queries, pool = queries.float().cpu(), pool.float().cpu()
    block = max(1, _BLOCK_ENTRIES // max(1, n_pool))
    for start in range(0, n_queries, block):
        stop = min(n_queries, start + block)
        order = torch.argsort(queries[start:stop] @ pool.T, dim=1, descending=True, stable=True)
        ranked = pool_clusters[order]  # cluster of each pool image, most similar first
        # the first (most similar) image of each cluster in a row: a stable sort by cluster keeps rank order
        by_cluster = torch.argsort(ranked, dim=1, stable=True)
        grouped = torch.gather(ranked, 1, by_cluster)
        leads = torch.ones_like(grouped, dtype=torch.bool)
        leads[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
        first = torch.zeros_like(leads).scatter_(1, by_cluster, leads)
        eligible = first & (ranked != query_clusters[start:stop, None])
        taken = eligible & (torch.cumsum(eligible, dim=1) <= nnum)
        found = taken.sum(dim=1)
        if bool((found < nnum).any()):
            row = int(torch.nonzero(found < nnum)[0]) + start
            raise DataError(
                f"tuple mining: query {row} has {int(found[row - start])} pool clusters other than its own, fewer "
                f"than data.pool.nnum={nnum}; raise data.pool.poolsize (now {n_pool} images) or lower data.pool.nnum"
            )
        out[start:stop] = order[taken].view(stop - start, nnum)  # row-major: each row's picks in rank order
    return out.numpy()


def epoch_tuples(
    queries: np.ndarray,
    positives: np.ndarray,
    clusters: np.ndarray,
    settings: PoolSettings,
    seed: int,
    epoch: int,
    embed: Callable[[np.ndarray], torch.Tensor],
) -> np.ndarray:
    """The tuples of ``epoch``: ``n x (2 + nnum)`` image indices ``(q, p, n1, ..., nN)``, n = ``min(qsize, pairs)``.

    ``queries[i], positives[i]`` is pair i (image indices); ``clusters[j]`` the cluster of image j; ``embed``
    returns the L2-normalised embeddings (rows in the order given) of image indices with the current network.
    Queries and pool are embedded in one call.
    """
    queries, positives = np.asarray(queries, dtype=np.int64), np.asarray(positives, dtype=np.int64)
    clusters = np.asarray(clusters)
    rows, pool = draw_epoch(len(queries), len(clusters), settings.qsize, settings.poolsize, seed, epoch)
    q, p = queries[rows], positives[rows]
    if settings.nnum == 0:
        return np.stack([q, p], axis=1)
    vectors = embed(np.concatenate([q, pool]))
    if len(vectors) != len(q) + len(pool):
        raise ValueError(f"embed returned {len(vectors)} rows for {len(q) + len(pool)} images")
    picks = mine_negatives(vectors[: len(q)], vectors[len(q) :], clusters[q], clusters[pool], settings.nnum)
    return np.concatenate([q[:, None], p[:, None], pool[picks]], axis=1)
