"""Extraction across several processes: who am I, start the process group torchrun describes, gather rows.

Lightning manages the process group of training; the stand-alone tools (``oxford-ir-eval``,
``oxford-ir-index``) join one when launched by ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT`` in the environment): each process embeds its share of the planned batches
(:func:`oxford_ir.extraction.planning.shard`) and :func:`gather_rows` gives every process all the rows.
"""

from __future__ import annotations

import atexit
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment() -> torch.device | None:
    """Join the process group described by torchrun's environment; returns this process's device.

    Returns None (and does nothing) when the environment describes no group of several processes or a group
    is already initialised. The backend is NCCL with one GPU per local rank when CUDA is available, else
    gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    atexit.register(_leave)  # a clean exit: torch warns about (and NCCL can hang on) groups left open
    log.info("process %d of %d on %s", dist.get_rank(), dist.get_world_size(), device)
    return device


def barrier() -> None:
    """Wait for every process of the group (nothing without one)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def all_failures(failures: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Every process's ``(index, message)`` failures, sorted by index (the same list on every process).

    Exchanged before the rows so that all processes agree on raising (or skipping): a process that raised
    alone would leave the others waiting in the next collective call.
    """
    _, world = rank_and_world()
    if world == 1:
        return sorted(failures)
    parts: list[list[tuple[int, str]] | None] = [None] * world
    dist.all_gather_object(parts, list(failures))
    return sorted(item for part in parts for item in (part or []))


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_rows(indices: torch.Tensor, rows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n x D float32 tensor, held)`` on every process: the ``rows`` each process holds, placed at their
    ``indices``, and a bool mask of the indices some process held (rows of the others are zero).

    Processes may hold different numbers of rows (their shards differ). Rows travel as float32 (bit-exact)
    through the group's backend device (CUDA for NCCL).
    """
    _, world = rank_and_world()
    dim = rows.shape[1]
    out = torch.zeros(n, dim, dtype=torch.float32)
    held = torch.zeros(n, dtype=torch.bool)
    if world == 1:
        out[indices.long()] = rows.float()
        held[indices.long()] = True
        return out, held
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    count = torch.tensor([indices.numel()], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = max(int(c) for c in counts)
    padded_idx = torch.full((longest,), -1, dtype=torch.long, device=device)
    padded_idx[: indices.numel()] = indices.to(device)
    padded_rows = torch.zeros(longest, dim, dtype=torch.float32, device=device)
    padded_rows[: indices.numel()] = rows.to(device, torch.float32)
    all_idx = [torch.empty_like(padded_idx) for _ in range(world)]
    all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    dist.all_gather(all_idx, padded_idx)
    dist.all_gather(all_rows, padded_rows)
    for c, idx, part in zip(counts, all_idx, all_rows, strict=True):
        k = int(c)
        out[idx[:k].cpu()] = part[:k].cpu()
        held[idx[:k].cpu()] = True
    return out, held
