"""The loss of a batch of mined tuples (``data.mining=pool``) against cnnimageretrieval-pytorch's formulas, computed
by hand on the same embeddings."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss, MultiSimilarityLoss, TripletMarginLoss
from pytorch_metric_learning.reducers import SumReducer

from oxford_ir.errors import ConfigError
from oxford_ir.models.squared_contrastive import SquaredContrastiveLoss
from oxford_ir.models.tuple_layout import TupleLayout

T, NNUM, DIM = 3, 4, 8


def cirtorch_contrastive(x, label, margin=0.7, eps=1e-6):
    """``cirtorch.layers.functional.contrastive_loss`` as published (x is D x N: tuples in columns)."""
    dim = x.size(0)
    nq = torch.sum(label.data == -1)
    S = x.size(1) // nq
    x1 = x[:, ::S].permute(1, 0).repeat(1, S - 1).view((S - 1) * nq, dim).permute(1, 0)
    idx = [i for i in range(len(label)) if label.data[i] != -1]
    x2 = x[:, idx]
    lbl = label[label != -1]
    dif = x1 - x2
    D = torch.pow(dif + eps, 2).sum(dim=0).sqrt()
    y = 0.5 * lbl * torch.pow(D, 2) + 0.5 * (1 - lbl) * torch.pow(torch.clamp(margin - D, min=0), 2)
    return torch.sum(y)


def cirtorch_triplet(x, label, margin=0.1):
    """``cirtorch.layers.functional.triplet_loss`` as published (squared Euclidean distances, summed)."""
    dim = x.size(0)
    nq = torch.sum(label.data == -1).item()
    S = x.size(1) // nq
    xa = x[:, label.data == -1].permute(1, 0).repeat(1, S - 2).view((S - 2) * nq, dim).permute(1, 0)
    xp = x[:, label.data == 1].permute(1, 0).repeat(1, S - 2).view((S - 2) * nq, dim).permute(1, 0)
    xn = x[:, label.data == 0]
    dist_pos = torch.sum(torch.pow(xa - xp, 2), dim=0)
    dist_neg = torch.sum(torch.pow(xa - xn, 2), dim=0)
    return torch.sum(torch.clamp(dist_pos - dist_neg + margin, min=0))


def tuples_batch(seed: int = 0):
    """T tuples laid end to end; labels that would make many more pairs than the tuples' (one label for all
    negatives), so that a loss reading the labels instead of the layout would differ."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(T * (2 + NNUM), DIM, generator=generator), dim=1)
    labels = torch.tensor(([0, 0] + [1] * NNUM) * T)
    target = torch.tensor([-1.0, 1.0] + [0.0] * NNUM)  # cirtorch's per tuple
    return x, labels, target


def test_pairs_and_triplets_are_those_of_each_tuple():
    a1, p, a2, n = TupleLayout(2, 3).pairs(10)
    assert a1.tolist() == [0, 5] and p.tolist() == [1, 6]
    assert a2.tolist() == [0, 0, 0, 5, 5, 5] and n.tolist() == [2, 3, 4, 7, 8, 9]
    a, p, n = TupleLayout(2, 3).triplets(10)
    assert a.tolist() == [0, 0, 0, 5, 5, 5] and p.tolist() == [1, 1, 1, 6, 6, 6] and n.tolist() == [2, 3, 4, 7, 8, 9]
    with pytest.raises(ValueError, match="not whole tuples of 5"):
        TupleLayout(2, 3).pairs(9)


def test_squared_contrastive_with_sum_equals_cirtorchs_loss_summed_over_tuples():
    raw, labels, target = tuples_batch()
    raw.requires_grad_(True)
    x = torch.nn.functional.normalize(raw, dim=1)  # the network's last step, as cirtorch's L2N
    loss_fn = SquaredContrastiveLoss(neg_margin=0.7, distance=LpDistance(), reducer=SumReducer())
    ours = loss_fn(x, labels, TupleLayout(T, NNUM).indices_tuple(loss_fn, len(x)))
    # cirtorch's train(): one loss per tuple, backward adds them up
    size = 2 + NNUM
    theirs = sum(cirtorch_contrastive(x[t * size : (t + 1) * size].T, target) for t in range(T))
    assert theirs > 0 and torch.allclose(ours, theirs, rtol=0, atol=1e-5)
    (grad_ours,) = torch.autograd.grad(ours, raw, retain_graph=True)
    (grad_theirs,) = torch.autograd.grad(theirs, raw, retain_graph=True)
    assert torch.allclose(grad_ours, grad_theirs, rtol=0, atol=1e-4)
    # pytorch-metric-learning's ContrastiveLoss on the same pairs: unsquared hinges (a different function)
    plain = ContrastiveLoss(neg_margin=0.7, distance=LpDistance(), reducer=SumReducer())
    assert not torch.allclose(plain(x, labels, TupleLayout(T, NNUM).pairs(len(x))), theirs, atol=1e-3)


def test_triplet_margin_loss_on_the_tuples_equals_cirtorchs_triplet_loss():
    x, labels, target = tuples_batch(1)
    loss_fn = TripletMarginLoss(margin=0.5, distance=LpDistance(power=2), reducer=SumReducer())
    ours = loss_fn(x, labels, TupleLayout(T, NNUM).indices_tuple(loss_fn, len(x)))
    size = 2 + NNUM
    theirs = sum(cirtorch_triplet(x[t * size : (t + 1) * size].T, target, margin=0.5) for t in range(T))
    assert theirs > 0 and torch.allclose(ours, theirs, rtol=0, atol=1e-5)


def test_a_loss_that_takes_neither_pairs_nor_triplets_is_refused():
    from pytorch_metric_learning.losses import ArcFaceLoss

    layout = TupleLayout(T, NNUM)
    assert len(layout.indices_tuple(MultiSimilarityLoss(), 18)) == 4  # a pair loss
    with pytest.raises(ConfigError, match="data.mining=pool.*ArcFaceLoss"):
        layout.indices_tuple(ArcFaceLoss(num_classes=3, embedding_size=DIM), 18)
