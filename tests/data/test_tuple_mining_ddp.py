"""Pool mining under DDP: every process embeds its share of the epoch's queries and pool through the one extraction
path (gathered), mines the same tuples, and trains its own batches of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oxford_ir.data.tuple_batches import TupleSampler
from oxford_ir.data.tuple_mining import PoolSettings, epoch_tuples
from oxford_ir.data.tuple_pairs import label_pairs
from oxford_ir.extraction.embedding import extract_embeddings
from oxford_ir.models.backbones import ScratchCNN
from oxford_ir.models.embedder import Embedder
from oxford_ir.models.pooling import GeM

SETTINGS = PoolSettings(qsize=12, poolsize=30, nnum=3, tuples_per_batch=2)
CLUSTERS = np.arange(36) // 4  # 9 classes of 4 images


def _images(folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i, label in enumerate(CLUSTERS):
        colour = (label * 28) % 255  # a grey level per class
        pixels = np.clip(colour + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
        paths.append(str(folder / f"im{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _sampler(paths: list[str], rank: int | None = None, world: int | None = None) -> TupleSampler:
    torch.manual_seed(0)
    model = Embedder(ScratchCNN(channels=(4, 8)), GeM())
    queries, positives = label_pairs(CLUSTERS, 9, seed=1)

    def make(epoch: int) -> np.ndarray:
        def embed(indices: np.ndarray) -> torch.Tensor:
            return extract_embeddings(model, [paths[i] for i in indices], 40, batch_size=4)

        return epoch_tuples(queries, positives, CLUSTERS, SETTINGS, 1, epoch, embed)

    return TupleSampler(make, SETTINGS.qsize, SETTINGS.tuple_size, 2, seed=1, num_replicas=world, rank=rank)


def _mine_in_process_group(rank: int, world: int, init_file: str, paths: list[str], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        sampler = _sampler(paths)  # rank and world from the process group
        sampler.set_epoch(2)
        drawn = [index for index, _ in sampler]
        torch.save({"tuples": sampler.tuples[1], "drawn": drawn}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: 60 s on the loaded 2-core machine; the sharding: test_tuple_mining.py
def test_every_process_mines_the_same_tuples_and_draws_its_own_batches(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    paths = _images(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker process
    try:
        single = _sampler(paths)
        single.set_epoch(2)
        alone = [index for index, _ in single]
    finally:
        torch.set_num_threads(threads)
    out = str(tmp_path / "mined")
    mp.spawn(_mine_in_process_group, args=(2, str(tmp_path / "init"), paths, out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]
    for result in results:
        assert np.array_equal(result["tuples"], single.tuples[1])
    batch = single.batch_size
    assert len(alone) == 6 * batch and all(len(r["drawn"]) == 3 * batch for r in results)
    # the six batches of the epoch, dealt out: rank 0 the even ones, rank 1 the odd ones
    batches = [alone[b * batch : (b + 1) * batch] for b in range(6)]
    assert results[0]["drawn"] == sum(batches[0::2], []) and results[1]["drawn"] == sum(batches[1::2], [])
