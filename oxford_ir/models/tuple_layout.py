"""The pairs or triplets of a batch of mined tuples (``data.mining=pool``): what the loss uses instead of a miner.

A batch of T tuples ``(q, p, n1, ..., nN)`` laid end to end (:mod:`oxford_ir.data.tuple_batches`) stands for
exactly the pairs cnnimageretrieval-pytorch's ``ContrastiveLoss`` sums over, ``(q, p)`` and ``(q, n_i)`` of each
tuple, or the triplets of its ``TripletLoss``, ``(q, p, n_i)``; no other pair of the batch (the negatives of one
tuple are not compared with another tuple's query, even where labels would allow it). :class:`TupleLayout` hands
them to the pytorch-metric-learning loss as its ``indices_tuple``: the 4-tuple of pairs for a pair loss
(``ContrastiveLoss``, :class:`~oxford_ir.models.squared_contrastive.SquaredContrastiveLoss`), the 3-tuple of
triplets for ``TripletMarginLoss`` (giving triplets to a pair loss would count the positive pair N times).

What remains different from cirtorch is the per-pair formula and the reduction, see
:mod:`oxford_ir.models.squared_contrastive`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pytorch_metric_learning.losses import GenericPairLoss, TripletMarginLoss

from oxford_ir.errors import ConfigError

#: the losses a tuple layout can feed, by how they take indices
PAIR_LOSSES, TRIPLET_LOSSES = (GenericPairLoss,), (TripletMarginLoss,)


@dataclass(frozen=True)
class TupleLayout:
    """T = ``tuples_per_batch`` tuples of ``2 + nnum`` images each, laid end to end in every batch."""

    tuples_per_batch: int
    nnum: int

    @property
    def tuple_size(self) -> int:
        return 2 + self.nnum

    def _starts(self, batch_size: int, device: Any) -> torch.Tensor:
        if batch_size % self.tuple_size:
            raise ValueError(f"a batch of {batch_size} images is not whole tuples of {self.tuple_size}")
        return torch.arange(0, batch_size, self.tuple_size, device=device)

    def pairs(self, batch_size: int, device: Any = None) -> tuple[torch.Tensor, ...]:
        """``(a1, p, a2, n)``: each tuple's query with its positive, and with each of its negatives."""
        starts = self._starts(batch_size, device)
        negatives = starts[:, None] + torch.arange(2, self.tuple_size, device=device)
        return starts, starts + 1, starts.repeat_interleave(self.nnum), negatives.reshape(-1)

    def triplets(self, batch_size: int, device: Any = None) -> tuple[torch.Tensor, ...]:
        """``(a, p, n)``: each tuple's query and positive with each of its negatives."""
        starts = self._starts(batch_size, device)
        negatives = starts[:, None] + torch.arange(2, self.tuple_size, device=device)
        anchors = starts.repeat_interleave(self.nnum)
        return anchors, anchors + 1, negatives.reshape(-1)

    def indices_tuple(self, loss_fn: Any, batch_size: int, device: Any = None) -> tuple[torch.Tensor, ...]:
        """What ``loss_fn`` takes: pairs for a pair loss, triplets for a triplet loss."""
        if isinstance(loss_fn, PAIR_LOSSES):
            return self.pairs(batch_size, device)
        if isinstance(loss_fn, TRIPLET_LOSSES):
            return self.triplets(batch_size, device)
        raise ConfigError(unsupported_loss(loss_fn))


def unsupported_loss(loss_fn: Any) -> str:
    return (
        f"data.mining=pool trains on the mined tuples' pairs or triplets; {type(loss_fn).__name__} takes neither: "
        "use loss=contrastive, loss=cirtorch_contrastive or loss=triplet"
    )
