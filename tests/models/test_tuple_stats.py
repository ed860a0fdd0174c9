"""Mining statistics against brute-force loops over every (anchor, positive, negative) of a batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances, losses, miners

from oxford_ir.models.tuple_stats import count_triplets, tuple_statistics

MARGIN = 0.1


def make_batch(labels: list[int], seed: int = 0, dim: int = 8, spread: float = 1.2) -> tuple[torch.Tensor, ...]:
    """Embeddings clustered by class but overlapping, so every mining rule keeps some tuples and drops others."""
    gen = torch.Generator().manual_seed(seed)
    labels_t = torch.tensor(labels)
    centres = torch.randn(max(labels) + 1, dim, generator=gen)
    embeddings = centres[labels_t] + spread * torch.randn(len(labels), dim, generator=gen)
    return torch.nn.functional.normalize(embeddings, dim=1), labels_t


def make_distance(name: str):
    return distances.CosineSimilarity() if name == "cosine" else distances.LpDistance(normalize_embeddings=True, p=2)


def pairwise(embeddings: torch.Tensor, name: str) -> np.ndarray:
    """Similarity (cosine) or distance (euclidean) of every pair, one pair at a time, in float64."""
    x = embeddings.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = float(x[i] @ x[j]) if name == "cosine" else float(np.linalg.norm(x[i] - x[j]))
    return out


def all_triplets(labels: torch.Tensor) -> list[tuple[int, int, int]]:
    lab = labels.tolist()
    idx = range(len(lab))
    return [(a, p, n) for a, p, n in itertools.product(idx, idx, idx) if a != p and lab[a] == lab[p] != lab[n]]


def margin_of(mat: np.ndarray, a: int, p: int, n: int, inverted: bool) -> float:
    """How far the negative is beyond the positive: s(a,p) - s(a,n) or d(a,n) - d(a,p)."""
    return mat[a, p] - mat[a, n] if inverted else mat[a, n] - mat[a, p]


def brute_batch_hard(mat: np.ndarray, labels: torch.Tensor, inverted: bool) -> list[tuple[int, int, int]]:
    lab = labels.tolist()
    out = []
    for a in range(len(lab)):
        pos = [p for p in range(len(lab)) if p != a and lab[p] == lab[a]]
        neg = [n for n in range(len(lab)) if lab[n] != lab[a]]
        if not pos or not neg:
            continue
        hardest_pos = min(pos, key=lambda p: mat[a, p]) if inverted else max(pos, key=lambda p: mat[a, p])
        hardest_neg = max(neg, key=lambda n: mat[a, n]) if inverted else min(neg, key=lambda n: mat[a, n])
        out.append((a, hardest_pos, hardest_neg))
    return out


def brute_triplet_margin(mat, labels, inverted, margin, kind) -> list[tuple[int, int, int]]:
    out = []
    for a, p, n in all_triplets(labels):
        m = margin_of(mat, a, p, n, inverted)
        keep = {"all": m <= margin, "hard": m <= 0, "semihard": 0 < m <= margin}[kind]
        if keep:
            out.append((a, p, n))
    return out


def brute_multi_similarity(mat, labels, inverted, epsilon) -> tuple[list, list]:
    """Hard positive / negative pairs of the multi-similarity miner (Wang et al. 2019), anchor by anchor."""
    lab = labels.tolist()
    pos_pairs, neg_pairs = [], []
    for a in range(len(lab)):
        pos = [p for p in range(len(lab)) if p != a and lab[p] == lab[a]]
        neg = [n for n in range(len(lab)) if lab[n] != lab[a]]
        if not pos or not neg:
            continue
        if inverted:
            hardest_neg, hardest_pos = max(mat[a, n] for n in neg), min(mat[a, p] for p in pos)
            pos_pairs += [(a, p) for p in pos if mat[a, p] - epsilon < hardest_neg]
            neg_pairs += [(a, n) for n in neg if mat[a, n] + epsilon > hardest_pos]
        else:
            hardest_neg, hardest_pos = min(mat[a, n] for n in neg), max(mat[a, p] for p in pos)
            pos_pairs += [(a, p) for p in pos if mat[a, p] + epsilon > hardest_neg]
            neg_pairs += [(a, n) for n in neg if mat[a, n] - epsilon < hardest_pos]
    return pos_pairs, neg_pairs


def triplet_active(mat, triplets, inverted, margin) -> float:
    if not triplets:
        return 0.0
    active = [-margin_of(mat, a, p, n, inverted) + margin > 0 for a, p, n in triplets]
    return sum(active) / len(triplets)


def as_set(indices) -> set[tuple[int, ...]]:
    return set(zip(*(t.tolist() for t in indices), strict=True))


LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
#: class 4 is a singleton: an anchor without a positive, which every miner must skip
LABELS_WITH_SINGLETON = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4]


@pytest.mark.parametrize("distance_name", ["cosine", "euclidean"])
@pytest.mark.parametrize("labels", [LABELS, LABELS_WITH_SINGLETON])
@pytest.mark.parametrize("miner_name", ["batch_hard", "all", "hard", "semihard", "none"])
def test_triplet_miners_against_brute_force(distance_name, labels, miner_name):
    embeddings, labels_t = make_batch(labels, seed=len(labels) + len(miner_name))
    distance = make_distance(distance_name)
    inverted = distance.is_inverted
    mat = pairwise(embeddings, distance_name)
    miner_margin = 0.2
    if miner_name == "batch_hard":
        miner = miners.BatchHardMiner(distance=distance)
        expected = brute_batch_hard(mat, labels_t, inverted)
    elif miner_name == "none":
        miner = None
        expected = all_triplets(labels_t)
    else:
        miner = miners.TripletMarginMiner(margin=miner_margin, type_of_triplets=miner_name, distance=distance)
        expected = brute_triplet_margin(mat, labels_t, inverted, miner_margin, miner_name)
    loss = losses.TripletMarginLoss(margin=MARGIN, distance=distance)
    indices = miner(embeddings, labels_t) if miner is not None else None
    if indices is not None:
        assert as_set(indices) == set(expected), "the miner does not select what its definition says"
    stats = tuple_statistics(embeddings, labels_t, indices, loss)
    assert stats.num_triplets == len(expected)
    assert stats.active_fraction == pytest.approx(triplet_active(mat, expected, inverted, MARGIN), abs=1e-12)
    assert stats.num_pos_pairs is None and stats.num_neg_pairs is None
    # the statistics are informative: some tuples are active, and (with a margin) not always all of them
    assert len(expected) > 0 and 0.0 < stats.active_fraction <= 1.0


@pytest.mark.parametrize("distance_name", ["cosine", "euclidean"])
def test_multi_similarity_miner_against_brute_force(distance_name):
    embeddings, labels = make_batch(LABELS_WITH_SINGLETON, seed=3)
    distance = make_distance(distance_name)
    inverted = distance.is_inverted
    mat = pairwise(embeddings, distance_name)
    epsilon = 0.1
    miner = miners.MultiSimilarityMiner(epsilon=epsilon, distance=distance)
    a1, p, a2, n = miner(embeddings, labels)
    pos_pairs, neg_pairs = brute_multi_similarity(mat, labels, inverted, epsilon)
    assert as_set((a1, p)) == set(pos_pairs) and as_set((a2, n)) == set(neg_pairs)
    assert len(pos_pairs) > 0 and len(neg_pairs) > 0
    triplets = [(a, pp, nn) for (a, pp) in pos_pairs for (b, nn) in neg_pairs if a == b]

    # multi-similarity loss: a pair is active on the wrong side of the base similarity
    base = 0.5
    ms_loss = losses.MultiSimilarityLoss(alpha=2, beta=50, base=base, distance=distance)
    stats = tuple_statistics(embeddings, labels, (a1, p, a2, n), ms_loss)
    assert stats.num_triplets == len(triplets)
    assert (stats.num_pos_pairs, stats.num_neg_pairs) == (len(pos_pairs), len(neg_pairs))
    if inverted:
        active = sum(mat[a, q] < base for a, q in pos_pairs) + sum(mat[a, q] > base for a, q in neg_pairs)
    else:
        active = sum(mat[a, q] > base for a, q in pos_pairs) + sum(mat[a, q] < base for a, q in neg_pairs)
    assert stats.active_fraction == pytest.approx(active / (len(pos_pairs) + len(neg_pairs)), abs=1e-12)

    # a triplet loss after a pair miner learns from the triplets the pairs form
    triplet_loss = losses.TripletMarginLoss(margin=MARGIN, distance=distance)
    stats = tuple_statistics(embeddings, labels, (a1, p, a2, n), triplet_loss)
    assert stats.num_triplets == len(triplets)
    assert stats.active_fraction == pytest.approx(triplet_active(mat, triplets, inverted, MARGIN), abs=1e-12)


@pytest.mark.parametrize("distance_name", ["cosine", "euclidean"])
@pytest.mark.parametrize("mined", [True, False])
def test_contrastive_active_fraction_against_brute_force(distance_name, mined):
    embeddings, labels = make_batch(LABELS, seed=5)
    distance = make_distance(distance_name)
    inverted = distance.is_inverted
    mat = pairwise(embeddings, distance_name)
    pos_margin, neg_margin = (0.9, 0.3) if inverted else (0.3, 0.9)
    loss = losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin, distance=distance)
    lab = labels.tolist()
    if mined:
        indices = miners.BatchHardMiner(distance=distance)(embeddings, labels)
        triplets = brute_batch_hard(mat, labels, inverted)
        pos_pairs = [(a, p) for a, p, _ in triplets]
        neg_pairs = [(a, n) for a, _, n in triplets]
    else:
        indices = None
        triplets = all_triplets(labels)
        pos_pairs = [(a, p) for a in range(len(lab)) for p in range(len(lab)) if a != p and lab[a] == lab[p]]
        neg_pairs = [(a, n) for a in range(len(lab)) for n in range(len(lab)) if lab[a] != lab[n]]
    if inverted:
        active = sum(mat[a, q] < pos_margin for a, q in pos_pairs) + sum(mat[a, q] > neg_margin for a, q in neg_pairs)
    else:
        active = sum(mat[a, q] > pos_margin for a, q in pos_pairs) + sum(mat[a, q] < neg_margin for a, q in neg_pairs)
    stats = tuple_statistics(embeddings, labels, indices, loss)
    assert stats.num_triplets == len(triplets)
    assert stats.active_fraction == pytest.approx(active / (len(pos_pairs) + len(neg_pairs)), abs=1e-12)
    assert 0.0 < stats.active_fraction <= 1.0


def test_count_triplets_matches_pytorch_metric_learning_enumeration():
    from pytorch_metric_learning.utils.loss_and_miner_utils import get_all_triplets_indices

    for labels in (LABELS, LABELS_WITH_SINGLETON, [0, 1, 2, 3], [0, 0, 0, 0], [5, 5, 1, 7, 7, 7, 1, 2]):
        labels_t = torch.tensor(labels)
        assert (
            count_triplets(None, labels_t) == len(get_all_triplets_indices(labels_t)[0]) == len(all_triplets(labels_t))
        )


@pytest.mark.parametrize("distance_name", ["cosine", "euclidean"])
def test_batch_without_triplets_is_visible_and_trains_nothing(distance_name):
    """All labels distinct: no positive anywhere. num_triplets is 0 and the loss is 0 with a gradient graph."""
    embeddings, labels = make_batch([0, 1, 2, 3, 4, 5], seed=7)
    embeddings = embeddings.clone().requires_grad_(True)
    distance = make_distance(distance_name)
    for miner in (
        miners.BatchHardMiner(distance=distance),
        miners.TripletMarginMiner(margin=0.2, type_of_triplets="all", distance=distance),
        miners.MultiSimilarityMiner(epsilon=0.1, distance=distance),
        None,
    ):
        indices = miner(embeddings, labels) if miner is not None else None
        for loss in (
            losses.TripletMarginLoss(margin=MARGIN, distance=distance),
            losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5, distance=distance),
            losses.MultiSimilarityLoss(distance=distance),
        ):
            stats = tuple_statistics(embeddings, labels, indices, loss)
            assert stats.num_triplets == 0
            if miner is not None or isinstance(loss, losses.TripletMarginLoss):
                # without a miner a pair loss still learns from the negative pairs: that batch is not empty
                assert stats.active_fraction == 0.0
            if isinstance(loss, losses.TripletMarginLoss):
                value = loss(embeddings, labels, indices)
                assert value.item() == 0.0 and value.requires_grad
                value.backward()
                assert torch.count_nonzero(embeddings.grad) == 0
                embeddings.grad = None


def test_unsupported_loss_has_no_active_fraction():
    embeddings, labels = make_batch(LABELS, seed=1)
    stats = tuple_statistics(embeddings, labels, None, losses.NTXentLoss())
    assert stats.num_triplets == len(all_triplets(labels)) and stats.active_fraction is None


def test_malformed_indices_tuple_is_refused():
    with pytest.raises(ValueError, match="3 \\(triplets\\) or 4"):
        count_triplets((torch.tensor([0]), torch.tensor([1])), torch.tensor([0, 0]))
