"""The network's side of pool mining (``data.mining=pool``): embedding the epoch's queries and pool, and checking
the loss and miner against the batches of tuples.

The datamodule draws and mines (:mod:`oxford_ir.data.tuple_mining`) but cannot run the network (the data layer
is below the extraction path); it asks the trainer's module for :meth:`RetrievalModule.embed_images`, which is
:func:`mining_embeddings`: whole images at a long side of the training ``image_size`` (cirtorch embeds its
tuples' images at its training ``--image-size``), through the one test-time path
(:func:`~oxford_ir.extraction.embedding.extract_embeddings`: eval mode, inference mode, training mode restored,
the module's device and ``channels_last``). Under DDP that path embeds every ``world``-th planned batch in each
process and gathers the rows, so every process gets the same embeddings and mines the same tuples. Torch's global
random state is restored afterwards (the extraction loader draws its base seed from it): mining changes nothing
that training draws later, so a resumed run stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from oxford_ir.errors import ConfigError
from oxford_ir.extraction.embedding import extract_embeddings
from oxford_ir.models.tuple_layout import PAIR_LOSSES, TRIPLET_LOSSES, TupleLayout, unsupported_loss


def mining_embeddings(module: Any, paths: Sequence[Path], *, image_size: int, **settings: Any) -> torch.Tensor:
    """N x D L2-normalised embeddings of ``paths`` by ``module.embedder`` as it is now (``settings``: batch_size,
    num_workers, batching, max_shapes, worker_timeout of :func:`extract_embeddings`)."""
    device = module.device
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        return extract_embeddings(
            module.embedder,
            paths,
            image_size,
            device=device,
            channels_last=bool(module.hparams.get("channels_last", False)),
            **settings,
        )


def tuple_layout_of(module: Any, datamodule: Any) -> TupleLayout | None:
    """The layout of ``datamodule``'s training batches when they are mined tuples (its ``tuple_layout``), checked
    against the module's loss; None for the ordinary batches."""
    layout = getattr(datamodule, "tuple_layout", None)
    if layout is None:
        return None
    if not isinstance(module.loss_fn, PAIR_LOSSES + TRIPLET_LOSSES):
        raise ConfigError(unsupported_loss(module.loss_fn))
    if module.cross_batch_memory is not None:
        raise ConfigError(
            "data.mining=pool trains on the mined tuples alone; loss.cross_batch_memory mines a queue instead: set "
            "loss.cross_batch_memory=null (or data.mining=batch)"
        )
    if module.miner is not None:
        rank_zero_warn(
            f"data.mining=pool: the miner ({type(module.miner).__name__}) is not used, the loss takes each tuple's "
            "pairs or triplets; set miner=none to silence this"
        )
    return TupleLayout(int(layout.tuples_per_batch), int(layout.nnum))
