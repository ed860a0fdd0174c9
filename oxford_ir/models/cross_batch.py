"""Mining beyond the batch: pytorch-metric-learning's ``CrossBatchMemory`` (Wang et al., XBM, CVPR 2020) as an
option of the loss config, ``loss.cross_batch_memory: null | {memory_size: N}``.

The memory is a queue of the last ``memory_size`` embeddings (detached) and labels of the training batches.
Each step enqueues the batch, then the configured miner (the miner group, sharing the one distance) mines the
batch's anchors against everything in the queue, and the configured loss is applied to those tuples: with small
batches (4 landmarks x 2 images) the loss sees many more positives and negatives than the batch holds.

:class:`CrossBatchMining` wraps pml's object to keep what it mined, so that ``train/num_triplets`` counts the
tuples the loss actually consumed (anchors from the batch, positives and negatives from the memory, the anchor's
own copy removed), and to hand its state to the checkpoint.

DDP: each process's memory holds the embeddings its own batches produced; nothing is gathered across processes
(the simplest choice, and correct: every tuple is real data, a process just mines over its own recent past). The
memory is therefore deliberately *not* a registered buffer of the LightningModule: DDP broadcasts registered
buffers from rank 0 at every forward, which would replace every process's memory by rank 0's. The checkpoint
stores it through :meth:`CrossBatchMining.state` / :meth:`CrossBatchMining.load_state` (the LightningModule's
checkpoint hooks); since rank 0 writes the checkpoint, a resumed multi-process run starts every process from rank
0's memory; a single-process resume is exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory, TripletMarginLoss
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from oxford_ir.errors import ConfigError
from oxford_ir.models.tuple_stats import TupleStatistics, count_triplets

#: the key of the loss config that turns the memory on
CONFIG_KEY = "cross_batch_memory"
#: the checkpoint key holding the memory's state
CHECKPOINT_KEY = "cross_batch_memory"


class CrossBatchMining(CrossBatchMemory):
    """``CrossBatchMemory`` that keeps the indices tuple of its last call (``last_indices_tuple``, indices into
    the batch and into ``memory()``), and whose state is a plain dict for the checkpoint."""

    last_indices_tuple: tuple[torch.Tensor, ...] | None = None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(embeddings) > self.memory_size:
            raise ConfigError(
                f"loss.cross_batch_memory.memory_size={self.memory_size} is smaller than a training batch of "
                f"{len(embeddings)}: use at least the batch size (several batches' worth is the point)"
            )
        return super().forward(embeddings, labels, *args, **kwargs)

    def create_indices_tuple(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        self.last_indices_tuple = super().create_indices_tuple(*args, **kwargs)
        return self.last_indices_tuple

    def memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of the queue: ``(embeddings, labels)``, in slot order."""
        end = self.memory_size if self.has_been_filled else self.queue_idx
        return self.embedding_memory[:end], self.label_memory[:end]

    def state(self) -> dict[str, Any]:
        """What the checkpoint stores: the queue tensors (on the CPU) and its position."""
        return {
            "embedding_memory": self.embedding_memory.detach().cpu().clone(),
            "label_memory": self.label_memory.detach().cpu().clone(),
            "queue_idx": int(self.queue_idx),
            "has_been_filled": bool(self.has_been_filled),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        embeddings, labels = state["embedding_memory"], state["label_memory"]
        if tuple(embeddings.shape) != (self.memory_size, self.embedding_size):
            raise ConfigError(
                f"the checkpoint's cross-batch memory is {tuple(embeddings.shape)}, the configured one is "
                f"({self.memory_size}, {self.embedding_size}): resume with the loss.cross_batch_memory.memory_size "
                "and embedding size it was trained with"
            )
        device = self.embedding_memory.device
        self.embedding_memory = embeddings.to(device).clone()
        self.label_memory = labels.to(device).clone()
        self.queue_idx = int(state["queue_idx"])
        self.has_been_filled = bool(state["has_been_filled"])


def split_loss_config(loss: Mapping) -> tuple[dict, dict | None]:
    """``(loss config without the memory key, the memory's settings or None)``; refuses unknown settings."""
    loss = dict(loss)
    settings = loss.pop(CONFIG_KEY, None)
    if settings is None:
        return loss, None
    if not isinstance(settings, Mapping) or set(settings) - {"memory_size"}:
        raise ConfigError(
            f"loss.{CONFIG_KEY}={settings}: give null or {{memory_size: N}}, "
            f"e.g. loss.{CONFIG_KEY}={{memory_size:1024}}"
        )
    size = settings.get("memory_size", 1024)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"loss.{CONFIG_KEY}.memory_size={size!r}: must be a positive whole number, e.g. 1024")
    return loss, {"memory_size": size}


def build_cross_batch_memory(
    settings: Mapping, loss: BaseMetricLossFunction, miner: BaseMiner | None, embedding_size: int
) -> CrossBatchMining:
    """The memory around ``loss``, mining with ``miner`` (None: every pair with the memory)."""
    name = type(loss).__name__
    if name not in CrossBatchMemory.supported_losses():
        raise ConfigError(
            f"loss.{CONFIG_KEY}: {name} cannot use a cross-batch memory; set loss.{CONFIG_KEY}=null or use one of "
            f"{', '.join(CrossBatchMemory.supported_losses())}"
        )
    if not embedding_size:
        raise ConfigError(f"loss.{CONFIG_KEY}: the embedder does not report its embedding_dim")
    return CrossBatchMining(loss, int(embedding_size), memory_size=int(settings["memory_size"]), miner=miner)


@torch.no_grad()
def memory_statistics(memory: CrossBatchMining, embeddings: torch.Tensor, labels: torch.Tensor) -> TupleStatistics:
    """The statistics of the last call of ``memory`` (the batch ``embeddings``, ``labels`` against the queue).

    ``num_triplets`` and the pair counts count the tuples the loss consumed, as without memory (anchors are batch
    rows, so a pair miner's triplets through a shared anchor are counted the same way). ``active_fraction`` is
    computed for ``TripletMarginLoss`` (without ``swap``) against the memory, ``None`` otherwise.
    """
    indices = memory.last_indices_tuple
    pairs = indices is not None and len(indices) == 4
    stats = TupleStatistics(
        num_triplets=count_triplets(indices, labels),
        active_fraction=None,
        num_pos_pairs=len(indices[0]) if pairs else None,
        num_neg_pairs=len(indices[2]) if pairs else None,
    )
    loss = memory.loss
    if not isinstance(loss, TripletMarginLoss) or loss.swap or indices is None:
        return stats
    ref_emb, ref_labels = memory.memory()
    a, p, n = lmu.convert_to_triplets(indices, labels, ref_labels, t_per_anchor="all")
    if len(a) == 0:
        fraction = 0.0
    elif loss.smooth_loss:
        fraction = 1.0
    else:
        mat = loss.distance(embeddings.detach().to(ref_emb.dtype), ref_emb)
        violation = loss.distance.margin(mat[a, p], mat[a, n]) + loss.margin
        fraction = int((violation > 0).sum()) / len(a)
    return TupleStatistics(stats.num_triplets, fraction, stats.num_pos_pairs, stats.num_neg_pairs)
