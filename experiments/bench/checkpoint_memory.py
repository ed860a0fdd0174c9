"""Loading the embedder of a many-class checkpoint for indexing and search: peak memory and time, with the
checkpoint memory-mapped (now) against read whole (the baseline: what ``_read_checkpoint`` did before, forced in the
same run by treating the file as torch's legacy format, which is never mapped).

The checkpoint has GLDv2-clean's shapes by default: ArcFace class weights of 81,313 x 2048 float32 (666 MB) and
Adam's two moments for them (1.3 GB), beside a small embedder (scratch CNN + GeM + a 2048-d projection), as
``experiment=gldv2_r50_arcface`` writes them (with a ResNet-50 instead of the small CNN). Each load runs in a fresh
process; its peak resident memory (``VmHWM`` of /proc/self/status: ``ru_maxrss`` would count the parent's pages
from before the exec) less that of a process that only imports the same modules is what loading costs.

    .venv/bin/python experiments/bench/checkpoint_memory.py [--classes 81313] [--dim 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EMBEDDER = {
    "_target_": "oxford_ir.models.embedder.Embedder",
    "backbone": {"_target_": "oxford_ir.models.backbones.ScratchCNN", "channels": [8, 16]},
    "pooling": {"_target_": "oxford_ir.models.pooling.GeM", "p": 3.0},
}
#: a child process: import, optionally load, report its peak RSS (KiB) and the load's seconds as JSON
CHILD = """
import json, sys, time
import torch
import oxford_ir.models.checkpoint as checkpoint
mode, path = sys.argv[1], sys.argv[2]
seconds = 0.0
if mode != "imports":
    if mode == "whole":
        checkpoint.zipfile.is_zipfile = lambda _: False  # the baseline: the file read whole, as before
    started = time.perf_counter()
    embedder = checkpoint.load_checkpoint_embedder(path)
    seconds = time.perf_counter() - started
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_kib": peak, "seconds": seconds}))
"""


def write_checkpoint(path: Path, classes: int, dim: int) -> int:
    """A training-module-shaped checkpoint with ``classes`` x ``dim`` class weights and their Adam moments."""
    import torch

    from oxford_ir.config import instantiate
    from oxford_ir.models.embedder import Embedder  # noqa: F401 - the target must import

    embedder = instantiate({**EMBEDDER, "projection_dim": dim}, "embedder")
    state = {f"embedder.{k}": v for k, v in embedder.state_dict().items()}
    weights = torch.randn(dim, classes) * 0.01  # pytorch-metric-learning's ArcFaceLoss keeps W as D x classes
    state["loss.W"] = weights
    checkpoint = {
        "state_dict": state,
        "hyper_parameters": {
            "embedder": {**EMBEDDER, "projection_dim": dim},
            "loss": {"_target_": "pytorch_metric_learning.losses.ArcFaceLoss", "num_classes": classes},
            "distance": None,
            "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True},
        },
        "optimizer_states": [
            {"state": {0: {"exp_avg": torch.zeros_like(weights), "exp_avg_sq": torch.ones_like(weights)}}}
        ],
    }
    torch.save(checkpoint, path)
    return path.stat().st_size


def child(mode: str, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(path)], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=81313)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="ckpt-memory-") as tmp:
        path = Path(tmp) / "arcface.ckpt"
        size = write_checkpoint(path, options.classes, options.dim)
        rows = {}
        for mode in ("imports", "whole", "mapped"):
            runs = [child(mode, path) for _ in range(options.repeats)]
            rows[mode] = (
                statistics.median(r["peak_kib"] for r in runs) / 1024,
                statistics.median(r["seconds"] for r in runs),
            )
    base = rows["imports"][0]
    print(
        f"checkpoint: {options.classes} classes x {options.dim} (weights + Adam moments), {size / 2**20:.0f} MiB on "
        f"disk; median of {options.repeats} fresh processes"
    )
    print(f"{'load':<34} {'peak RSS MiB':>12} {'of it, the load':>15} {'seconds':>8}")
    labels = {"imports": "imports only (floor)", "whole": "read whole (before)", "mapped": "memory-mapped (now)"}
    for mode, (rss, seconds) in rows.items():
        print(f"{labels[mode]:<34} {rss:>12.0f} {rss - base:>15.0f} {seconds:>8.2f}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
