"""``val/loss``: the training loss on batches of landmarks that training never sees, at every validation.

The batches are the datamodule's ``val_loss_dataloader`` (:mod:`oxford_ir.data.held_out`): P x K images of the
evaluated landmarks (the held-out ones of the ``landmarks`` split, the other dataset's of ``cross``), augmented as
training batches, the same ones at every validation. Each batch is embedded by the network in evaluation mode,
mined by the training miner and scored by the training loss (within the batch: a cross-batch memory is neither
read nor filled), without gradient; ``val/loss`` is the mean over the batches. So it is on the scale of
``train/loss`` and falls as the embedding generalises to new landmarks, and rises when it overfits.

A loss with a weight per class (``loss=arcface``, :mod:`oxford_ir.models.class_losses`) has no weights for landmarks
it never trained on: there is no ``val/loss`` then, and the log says why once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

from oxford_ir.models.class_losses import is_class_loss

log = logging.getLogger(__name__)
#: modules whose skipped val/loss was explained already
_EXPLAINED: weakref.WeakSet = weakref.WeakSet()


def batch_loss(
    loss_fn: Callable[..., torch.Tensor],
    miner: Callable[..., Any] | None,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """The loss of one batch as training computes it: ``miner`` picks the tuples (None: every valid tuple)."""
    indices = None if miner is None else miner(embeddings, labels)
    return loss_fn(embeddings, labels, indices)


def validation_loss(
    embed: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    miner: Callable[..., Any] | None,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor | None:
    """Mean over ``batches`` (``(images, labels)`` on the network's device) of :func:`batch_loss`, without
    gradient; None when there are no batches."""
    losses = []
    with torch.no_grad():
        for images, labels in batches:
            embeddings = embed(images)
            losses.append(batch_loss(loss_fn, miner, embeddings, labels.to(embeddings.device)).float())
    return torch.stack(losses).mean() if losses else None


def held_out_loss(module: Any, datamodule: Any) -> torch.Tensor | None:
    """:func:`validation_loss` of ``module`` (a ``RetrievalModule``: ``embed_batch``, ``loss_fn``, ``miner``) on
    ``datamodule.val_loss_dataloader`` batches, moved and finished as Lightning finishes training batches, under the
    trainer's precision; None without such batches (a datamodule without them, or a split that holds none) and for
    a loss with a weight per class."""
    if is_class_loss(module.loss_fn):
        if module not in _EXPLAINED:
            _EXPLAINED.add(module)
            log.info(
                "val/loss is not logged: %s has weights only for the training classes, and the held-out landmarks "
                "are other classes",
                type(module.loss_fn).__name__,
            )
        return None
    make = getattr(datamodule, "val_loss_dataloader", None)
    loader = make(module.device) if make is not None else None
    if loader is None:
        return None
    batches = (
        datamodule.on_after_batch_transfer(module.transfer_batch_to_device(batch, module.device, 0), 0)
        for batch in loader
    )
    with module.trainer.precision_plugin.val_step_context():
        return validation_loss(module.embed_batch, module.loss_fn, module.miner, batches)
