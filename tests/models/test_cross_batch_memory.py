"""The cross-batch memory (``loss.cross_batch_memory``): what the queue holds after training steps, the loss against
pytorch-metric-learning's own ``CrossBatchMemory``, ``num_triplets`` against a brute-force count, and a resume from
``last.ckpt`` that continues with the same memory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import CrossBatchMemory, TripletMarginLoss
from pytorch_metric_learning.miners import BatchHardMiner

from oxford_ir.cli.train import train
from oxford_ir.errors import ConfigError
from oxford_ir.models.cross_batch import CHECKPOINT_KEY
from oxford_ir.models.module import RetrievalModule
from tests.test_train import TINY, TINY_SCRATCH, compose_train, restored_process_state

MEMORY = 20  # not a multiple of the batch of 8: the queue wraps inside a batch
XBM = ["loss=triplet_xbm", f"loss.cross_batch_memory.memory_size={MEMORY}", "miner=batch_hard", "distance=cosine"]


def build_module(tmp_path: Path, *overrides: str) -> RetrievalModule:
    cfg = compose_train(tmp_path, *TINY, *TINY_SCRATCH, "logger=none", *overrides)
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    return RetrievalModule(**{key: value for key, value in settings.items() if not key.startswith("_")})


def batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random images, 4 labels x 2 per batch, labels drawn from 6 so that the memory holds other classes too."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        classes = torch.randperm(6, generator=generator)[:4]
        out.append((torch.randn(8, 3, 32, 32, generator=generator), classes.repeat_interleave(2)))
    return out


def train_steps(module: RetrievalModule, data: list) -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
    """Optimisation steps through ``compute_loss``; returns each step's embeddings (as the loss saw them),
    losses and statistics."""
    seen: list[torch.Tensor] = []
    hook = module.embedder.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    losses, stats = [], []
    module.train()
    try:
        for images, labels in data:
            loss, batch_stats = module.compute_loss(images, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            stats.append(batch_stats)
    finally:
        hook.remove()
    return seen, losses, stats


def test_training_steps_fill_the_queue_with_the_last_embeddings_in_order(tmp_path):
    module = build_module(tmp_path, *XBM)
    data = batches(4)
    embeddings, _, _ = train_steps(module, data)
    memory = module.cross_batch_memory
    # brute force: slot i holds the last row written at position i of the flattened stream (mod MEMORY)
    stream_e = torch.cat(embeddings)
    stream_l = torch.cat([labels for _, labels in data])
    expected_e = torch.zeros(MEMORY, stream_e.shape[1])
    expected_l = torch.zeros(MEMORY, dtype=torch.long)
    for position in range(len(stream_e)):
        expected_e[position % MEMORY] = stream_e[position]
        expected_l[position % MEMORY] = stream_l[position]
    assert torch.allclose(memory.embedding_memory, expected_e, atol=1e-6)
    assert torch.equal(memory.label_memory, expected_l)
    assert memory.queue_idx == len(stream_e) % MEMORY == 12 and memory.has_been_filled
    # the embeddings changed between steps (the network trained), so the queue holds several versions of it
    assert not torch.allclose(embeddings[0], embeddings[-1])
    # not a registered buffer: DDP would broadcast rank 0's queue over every process's own
    assert not any("memory" in key for key in module.state_dict())


def test_loss_and_num_triplets_equal_pml_cross_batch_memory(tmp_path):
    module = build_module(tmp_path, *XBM, "loss.margin=0.2")
    data = batches(4, seed=1)
    embeddings, losses, stats = train_steps(module, data)
    distance = CosineSimilarity()
    reference = CrossBatchMemory(
        TripletMarginLoss(margin=0.2, distance=distance),
        embeddings[0].shape[1],
        MEMORY,
        BatchHardMiner(distance=distance),
    )
    for step, ((_, labels), batch, loss, batch_stats) in enumerate(zip(data, embeddings, losses, stats, strict=True)):
        assert torch.allclose(loss, reference(batch, labels), atol=1e-6), step
        # brute force: batch-hard mines one triplet per anchor with a positive in another slot and a negative
        slots = reference.curr_batch_idx
        filled = MEMORY if reference.has_been_filled else reference.queue_idx
        memory_labels = reference.label_memory[:filled]
        expected = 0
        for row, label in enumerate(labels):
            other = torch.ones(filled, dtype=torch.bool)
            other[slots[row]] = False
            expected += bool(((memory_labels == label) & other).any() and (memory_labels != label).any())
        assert batch_stats.num_triplets == expected > 0, step
        assert 0.0 <= batch_stats.active_fraction <= 1.0
    assert torch.equal(module.cross_batch_memory.embedding_memory, reference.embedding_memory)


def test_memory_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="memory_size=0"):
        build_module(tmp_path, "loss=triplet_xbm", "loss.cross_batch_memory.memory_size=0")
    module = build_module(tmp_path, "loss=triplet_xbm", "loss.cross_batch_memory.memory_size=4")
    with pytest.raises(ConfigError, match="smaller than a training batch of 8"):
        train_steps(module, batches(1))
    assert build_module(tmp_path).cross_batch_memory is None  # off by default


RESUME = [*TINY, *TINY_SCRATCH, *XBM, "loss.cross_batch_memory.memory_size=40", "logger=csv",
          "trainer.deterministic=true", "test=false"]  # fmt: skip


def test_resume_from_last_ckpt_continues_with_the_same_memory(tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch + resume from last.ckpt (weights and memory); a resume that drops the memory
    trains differently. 48 rows go through a memory of 40: the end state still holds epoch-0 rows."""
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def run(name: str, epochs: int, ckpt: Path | None = None) -> dict:
        extra = [] if ckpt is None else [f"ckpt_path={ckpt}"]
        with restored_process_state():
            train(compose_train(tmp_path, *RESUME, f"trainer.max_epochs={epochs}", *extra, run=name))
        return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)

    straight = run("straight", 2)
    first = run("resumed", 1)
    assert first[CHECKPOINT_KEY]["queue_idx"] == 24 % 40 and first[CHECKPOINT_KEY]["embedding_memory"].abs().sum() > 0
    shutil.copytree(tmp_path / "resumed", tmp_path / "forgetful")
    resumed = run("resumed", 2, tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == resumed["global_step"] == 6
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    a, b = straight[CHECKPOINT_KEY], resumed[CHECKPOINT_KEY]
    assert a["queue_idx"] == b["queue_idx"] == 48 % 40 and a["has_been_filled"] and b["has_been_filled"]
    assert torch.equal(a["label_memory"], b["label_memory"])
    assert torch.equal(a["embedding_memory"], b["embedding_memory"]) and a["embedding_memory"].abs().sum() > 0

    # the same resume without restoring the memory: the second epoch mines against an empty queue
    monkeypatch.setattr(RetrievalModule, "on_load_checkpoint", lambda self, checkpoint: None)
    forgetful = run("forgetful", 2, tmp_path / "forgetful" / "checkpoints" / "last.ckpt")
    assert forgetful["global_step"] == 6
    assert not all(torch.equal(v, forgetful["state_dict"][k]) for k, v in straight["state_dict"].items())
    assert not torch.equal(a["embedding_memory"], forgetful[CHECKPOINT_KEY]["embedding_memory"])
