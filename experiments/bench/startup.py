"""Start-up of the search command: wall seconds (median of 3) of ``oxford-ir-search --help`` and of a one-image
search against a small index, with the index's checkpoint and with its ONNX export, until the output appears (the
help text, the results table: start-up as a user sees it) and until the process exits, the CPU seconds (user +
system, median of the same runs: what the command costs on an idle machine, less sensitive to a busy one than wall
time) and the heavy libraries each has imported when it exits (``sys.modules``).

The baseline is the same commands run from a ``git worktree`` of ``--baseline`` (a commit before the lazy
imports; default 393f64e, the last one before them), measured in the same run on the same machine: its rows
show what a command cost before. A baseline without ONNX support has n/a in its ONNX row.

    .venv/bin/python experiments/bench/startup.py [--baseline <commit>] [--repeats 3]

The last row is ``python -c 'import torch'`` alone, the floor of any command that runs a PyTorch model, measured
in the same run.

The fixture (built in a temporary folder): a random scratch CNN + GeM checkpoint, its ONNX export, 8 random
64 x 48 photos in an index built with the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "lightning", "pytorch_metric_learning", "wandb", "fastapi", "onnxruntime", "onnx")
TINY = {
    "_target_": "oxford_ir.models.embedder.Embedder",
    "backbone": {"_target_": "oxford_ir.models.backbones.ScratchCNN", "channels": [8, 16]},
    "pooling": {"_target_": "oxford_ir.models.pooling.GeM", "p": 3.0},
}


def make_fixture(root: Path) -> dict[str, Path]:
    """The checkpoint, its ONNX file, the photos and an index of them built with the checkpoint."""
    import numpy as np
    import torch
    from PIL import Image

    from oxford_ir.models.module import RetrievalModule
    from oxford_ir.retrieval.index_build import build_index
    from oxford_ir.retrieval.model_spec import ModelSpec
    from oxford_ir.retrieval.onnx_export import export_onnx

    torch.manual_seed(0)
    module = RetrievalModule(
        embedder=TINY,
        loss={"_target_": "pytorch_metric_learning.losses.TripletMarginLoss", "margin": 0.1},
        distance={"_target_": "pytorch_metric_learning.distances.CosineSimilarity"},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2},
    )
    ckpt = root / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    onnx_file = export_onnx(ModelSpec(checkpoint=str(ckpt)), root / "model.onnx").path
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    spec = ModelSpec(checkpoint=str(ckpt))
    build_index(spec, photos, root / "index", image_size=64, num_workers=0, progress=False)
    return {"ckpt": ckpt, "onnx": onnx_file, "photos": photos, "index": root / "index"}


def commands(fixture: dict[str, Path], run_dir: Path) -> dict[str, list[str]]:
    search = [
        f"index={fixture['index']}",
        f"query={fixture['photos'] / 'p1.png'}",
        "k=3",
        "grid.enabled=false",
        "extraction.device=cpu",
        f"hydra.run.dir={run_dir}",
    ]
    return {
        "oxford-ir-search --help": ["--help"],
        "one-image search, checkpoint": search,
        "one-image search, ONNX": [*search, f"onnx={fixture['onnx']}"],
    }


#: the floor of any command that runs a PyTorch model, measured in the same run
TORCH_ALONE = "import torch"


def run(
    code_root: Path, args: list[str], report_imports: bool = False, entry: str | None = None
) -> tuple[float, float, float, str, str]:
    """Wall seconds until the command's first line of output and until it exits, CPU seconds, stdout and stderr
    of the search command of the package in ``code_root`` (or of the Python code ``entry``);
    ``report_imports``: the last stderr line lists the heavy packages imported when it exits.

    Output is unbuffered (``PYTHONUNBUFFERED``), as a terminal shows it: a search prints its results when they
    are all computed, so the first line is when the user sees them; the exit comes later, after Python has torn
    down its modules (0.3-0.4 s once PyTorch is loaded)."""
    env = {**os.environ, "PYTHONPATH": str(code_root), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    entry = entry or "import sys; from oxford_ir.cli.search import main; sys.argv[0] = 'oxford-ir-search'; main()"
    if report_imports:
        entry = (
            "import atexit, sys; atexit.register(lambda: print('HEAVY', *[m for m in "
            f"{HEAVY!r} if m in sys.modules], file=sys.stderr)); {entry}"
        )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-c", entry, *args], cwd=code_root, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        shown = time.perf_counter() - started
        stdout = first + process.stdout.read()
        stderr = process.stderr.read()
        returncode = process.wait()
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if returncode != 0:
        raise RuntimeError(f"{code_root}: {' '.join(args)} failed:\n{stderr[-2000:]}")
    return shown if first else elapsed, elapsed, cpu, stdout, stderr


def medians(measured: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The median of each column: seconds to the first output, to the exit, CPU seconds."""
    return tuple(statistics.median(m[i] for m in measured) for i in range(3))  # type: ignore[return-value]


def heavy_imports(stderr: str) -> list[str]:
    """The heavy packages a ``report_imports`` run listed."""
    lines = [line for line in stderr.splitlines() if line.startswith("HEAVY")]
    return lines[-1].split()[1:] if lines else ["?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="393f64e", help="commit to compare with (a git worktree of it)")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(REPO))
        fixture = make_fixture(tmp)
        baseline = tmp / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(baseline), options.baseline],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        try:
            rows = []
            for label, root in ((f"before ({options.baseline})", baseline), ("now", REPO)):
                onnx_support = (root / "oxford_ir" / "models" / "onnx_embedder.py").is_file()
                for name, args in commands(fixture, tmp / "run").items():
                    if not onnx_support and "onnx=" in " ".join(args):
                        rows.append((name, label, None, None, None, "n/a: no ONNX support before"))
                        continue
                    run(root, args)  # warm the file cache
                    measured = [run(root, args)[:3] for _ in range(options.repeats)]
                    heavy = heavy_imports(run(root, args, report_imports=True)[4])
                    rows.append((name, label, *medians(measured), ", ".join(heavy) or "none"))
            run(REPO, [], entry=TORCH_ALONE)
            measured = [run(REPO, [], entry=TORCH_ALONE)[:3] for _ in range(options.repeats)]
            rows.append(("python -c 'import torch'", "floor", *medians(measured), "torch"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, capture_output=True)
    print(
        f"{'command':<30} {'code':<17} {'output s':>8} {'exit s':>7} {'CPU s':>6}  heavy imports "
        f"(median of {options.repeats} runs)"
    )
    for name, label, shown, wall, cpu, heavy in rows:
        numbers = ("n/a",) * 3 if wall is None else (f"{shown:.2f}", f"{wall:.2f}", f"{cpu:.2f}")
        print(f"{name:<30} {label:<17} {numbers[0]:>8} {numbers[1]:>7} {numbers[2]:>6}  {heavy}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
