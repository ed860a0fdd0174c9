"""cnnimageretrieval-pytorch's contrastive loss (Hadsell et al.'s squared form) as a pytorch-metric-learning loss.

cirtorch (``cirtorch.layers.functional.contrastive_loss``) sums, over the pairs of a tuple, ``0.5 * D^2`` for the
positive pair and ``0.5 * max(0, margin - D)^2`` for each negative pair, with ``D = ||x1 - x2 + 1e-6||``; its
``train`` calls the loss on one tuple at a time and lets ``backward`` add the tuples' gradients up. pytorch-metric-
learning's ``ContrastiveLoss`` takes ``D - pos_margin`` and ``neg_margin - D`` unsquared (hinges) and averages
the non-zero ones. :class:`SquaredContrastiveLoss` is that class with cirtorch's squares (and ``pos_margin`` kept:
0 gives cirtorch's positive term); give it ``reducer: SumReducer`` and the loss of a batch of tuples (pairs from
:class:`~oxford_ir.models.tuple_layout.TupleLayout`) is exactly cirtorch's summed over the batch's tuples, up to
cirtorch's ``1e-6`` added inside the norm (``conf/loss/cirtorch_contrastive.yaml``).

Being a ``ContrastiveLoss``, the margin checks and ``train/active_fraction`` apply unchanged (a pair is active
exactly when its hinge is non-zero, squared or not).
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import ContrastiveLoss


class SquaredContrastiveLoss(ContrastiveLoss):
    """``0.5 * max(0, d - pos_margin)^2`` per positive pair, ``0.5 * max(0, neg_margin - d)^2`` per negative pair
    (for a similarity, the differences are reversed, as in ``ContrastiveLoss``)."""

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 0.7, **kwargs) -> None:
        super().__init__(pos_margin=pos_margin, neg_margin=neg_margin, **kwargs)

    def pos_calc(self, pos_pair_dist: torch.Tensor, margin: float) -> torch.Tensor:
        return 0.5 * super().pos_calc(pos_pair_dist, margin) ** 2

    def neg_calc(self, neg_pair_dist: torch.Tensor, margin: float) -> torch.Tensor:
        return 0.5 * super().neg_calc(neg_pair_dist, margin) ** 2
