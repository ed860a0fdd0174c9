"""What online mining produced in a batch: how many tuples, and how many of them the loss still learns from.

A class-balanced batch that yields no triplets trains nothing, and a loss whose tuples are all satisfied has
stopped learning; both are invisible in ``train/loss`` alone (pytorch-metric-learning returns a zero loss
with a gradient graph in the first case). These plain functions compute the two numbers logged every step:

``num_triplets``
    the number of (anchor, positive, negative) triplets the mined tuple stands for:
    - a triplet miner (``BatchHardMiner``, ``TripletMarginMiner``): its triplets;
    - a pair miner (``MultiSimilarityMiner``; 4-tuple ``a1, p, a2, n``): the triplets its pairs form through a
      shared anchor, ``sum_a #pos(a) * #neg(a)`` (what pytorch-metric-learning's ``convert_to_triplets`` builds);
      the positive and negative pair counts are reported separately;
    - no miner: every valid triplet of the batch (``get_all_triplets_indices``).

``active_fraction``
    the fraction of the tuples the loss consumes whose loss is non-zero, under the loss's (shared) distance:
    - ``TripletMarginLoss``: triplets with ``d(a,p) - d(a,n) + margin > 0`` (similarities reversed when the
      distance is inverted, ``swap`` honoured; ``smooth_loss`` is never zero, so every triplet is active);
    - ``ContrastiveLoss``: positive pairs farther than ``pos_margin`` plus negative pairs closer than
      ``neg_margin``, over all pairs;
    - ``MultiSimilarityLoss`` is never exactly zero: a pair is active when it lies on the wrong side of the
      ``base`` similarity (positive below it, negative above it), the pairs that dominate its gradient.
    A batch with no tuples has an active fraction of 0 (nothing is learned). Other losses: ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pytorch_metric_learning.losses import (
    BaseMetricLossFunction,
    ContrastiveLoss,
    MultiSimilarityLoss,
    TripletMarginLoss,
)
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

#: a miner's output: (anchors, positives, negatives) or (anchors1, positives, anchors2, negatives)
IndicesTuple = tuple[torch.Tensor, ...]

#: losses whose active fraction :func:`active_fraction` knows how to compute
SUPPORTED_LOSSES = (TripletMarginLoss, ContrastiveLoss, MultiSimilarityLoss)


@dataclass(frozen=True)
class TupleStatistics:
    """The statistics of one batch (see the module docstring for the definitions)."""

    num_triplets: int
    #: ``None`` for a loss :func:`active_fraction` does not cover
    active_fraction: float | None
    #: pair counts, only for a pair miner's 4-tuple
    num_pos_pairs: int | None = None
    num_neg_pairs: int | None = None


def _check_tuple(indices_tuple: IndicesTuple | None) -> None:
    if indices_tuple is not None and len(indices_tuple) not in (3, 4):
        raise ValueError(f"a miner returns 3 (triplets) or 4 (pairs) index tensors, got {len(indices_tuple)}")


def _label_counts(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element: number of other elements with the same label, and with a different one."""
    same = labels.reshape(-1, 1) == labels.reshape(1, -1)
    n_pos = same.sum(dim=1) - 1
    n_neg = (~same).sum(dim=1)
    return n_pos, n_neg


def count_triplets(indices_tuple: IndicesTuple | None, labels: torch.Tensor) -> int:
    """Number of triplets the mined tuple stands for (all valid triplets of the batch when ``None``)."""
    _check_tuple(indices_tuple)
    if indices_tuple is None:
        n_pos, n_neg = _label_counts(labels)
        return int((n_pos * n_neg).sum())
    if len(indices_tuple) == 3:
        return len(indices_tuple[0])
    a1, _, a2, _ = indices_tuple
    if len(a1) == 0 or len(a2) == 0:
        return 0
    size = int(max(a1.max(), a2.max())) + 1
    return int((torch.bincount(a1, minlength=size) * torch.bincount(a2, minlength=size)).sum())


def triplets_of(indices_tuple: IndicesTuple | None, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The (a, p, n) index tensors a triplet loss consumes: pairs are joined by shared anchor, ``None`` is all."""
    _check_tuple(indices_tuple)
    if indices_tuple is None:
        return lmu.get_all_triplets_indices(labels)
    return lmu.convert_to_triplets(indices_tuple, labels, t_per_anchor="all")


def pairs_of(indices_tuple: IndicesTuple | None, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The (a1, p, a2, n) pairs a pair loss consumes: triplets split into pairs, ``None`` is all pairs."""
    _check_tuple(indices_tuple)
    return lmu.convert_to_pairs(indices_tuple, labels)


def _fraction(active: int, total: int) -> float:
    return active / total if total else 0.0


@torch.no_grad()
def active_fraction(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    indices_tuple: IndicesTuple | None,
    loss: BaseMetricLossFunction,
) -> float | None:
    """Fraction of the tuples ``loss`` consumes that have a non-zero loss; ``None`` for an unsupported loss."""
    if not isinstance(loss, SUPPORTED_LOSSES):
        return None
    distance = loss.distance
    embeddings = embeddings.detach()
    labels = labels.to(embeddings.device)
    if isinstance(loss, TripletMarginLoss):
        a, p, n = triplets_of(indices_tuple, labels)
        if len(a) == 0:
            return 0.0
        if loss.smooth_loss:  # softplus is positive everywhere
            return 1.0
        mat = distance(embeddings)
        ap, an = mat[a, p], mat[a, n]
        if loss.swap:
            an = distance.smallest_dist(an, mat[p, n])
        violation = distance.margin(ap, an) + loss.margin
        return _fraction(int((violation > 0).sum()), len(a))

    a1, p, a2, n = pairs_of(indices_tuple, labels)
    if all(len(x) <= 1 for x in (a1, p, a2, n)):
        return 0.0  # GenericPairLoss returns a zero loss for a single pair of each kind
    if isinstance(loss, MultiSimilarityLoss):
        # mask-based: a pair counted twice by the miner is one entry of the loss
        size = len(labels)
        pos = torch.unique(a1 * size + p)
        neg = torch.unique(a2 * size + n)
        a1, p, a2, n = pos // size, pos % size, neg // size, neg % size
        pos_threshold = neg_threshold = loss.base
    else:
        pos_threshold, neg_threshold = loss.pos_margin, loss.neg_margin
    mat = distance(embeddings)
    pos_active = distance.margin(mat[a1, p], pos_threshold) > 0
    neg_active = distance.margin(neg_threshold, mat[a2, n]) > 0
    return _fraction(int(pos_active.sum()) + int(neg_active.sum()), len(a1) + len(a2))


def tuple_statistics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    indices_tuple: IndicesTuple | None,
    loss: BaseMetricLossFunction,
) -> TupleStatistics:
    """``num_triplets``, ``active_fraction`` and, for a pair miner, the pair counts of one batch."""
    labels = labels.to(embeddings.device)
    pairs = indices_tuple is not None and len(indices_tuple) == 4
    return TupleStatistics(
        num_triplets=count_triplets(indices_tuple, labels),
        active_fraction=active_fraction(embeddings, labels, indices_tuple, loss),
        num_pos_pairs=len(indices_tuple[0]) if pairs else None,
        num_neg_pairs=len(indices_tuple[2]) if pairs else None,
    )
