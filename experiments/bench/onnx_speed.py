"""The ONNX export against the PyTorch path on the CPU: model load time, images/s and the largest embedding difference.

Both run through the one extraction path (``extract_embeddings``: the same decoding, resizing, batching and
scale combination), on the same images, in this process, one after the other and then again (the better of the
two rounds is reported, to even out a shared machine): the PyTorch row is the baseline of the same run. A third row
runs the ONNX file through the search's query path without PyTorch (``embed_onnx_queries``: one image at a time,
NumPy around onnxruntime), the path of ``oxford-ir-search onnx=...``.

- ``load s``: from the file to a model ready to embed: ``ModelSpec(checkpoint=...).build()`` (read the checkpoint,
  rebuild the network, load the weights) vs ``ModelSpec(onnx=...).build()`` (onnxruntime session, metadata
  checked); a fresh process would add the imports (see experiments/bench/startup.py).
- ``images/s``: ``--images`` photos at ``--image-size`` (long side), ``batching=shape``, ``--batch-size`` images a
  batch, no worker processes, all cores for the network: the real photos of ../shared/paris6k/jpg (and
  ../shared/oxford5k/jpg) when present, else random photos of 4:3 and 3:4.
- ``max |diff|``: the largest absolute difference between the two paths' L2-normalised embeddings.

    .venv/bin/python experiments/bench/onnx_speed.py [--backbone mobilenetv2] [--image-size 224] [--images 32]

The network: MobileNetV2 + GeM (ImageNet weights from ../shared/weights when present, else random) in a
checkpoint of the training module, exported by ``oxford-ir-export``'s function.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oxford_ir.extraction.embedding import extract_embeddings
from oxford_ir.models import onnx_file
from oxford_ir.models.module import RetrievalModule
from oxford_ir.retrieval.model_spec import ModelSpec
from oxford_ir.retrieval.onnx_export import export_onnx
from oxford_ir.retrieval.onnx_queries import embed_onnx_queries

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet_features.pth"
REAL_PHOTOS = (REPO.parent / "shared" / "paris6k" / "jpg", REPO.parent / "shared" / "oxford5k" / "jpg")


def make_checkpoint(path: Path) -> str:
    weights = str(WEIGHTS) if WEIGHTS.is_file() else "none"
    embedder = {
        "_target_": "oxford_ir.models.embedder.Embedder",
        "backbone": {"_target_": "oxford_ir.models.backbones.MobileNetV2", "weights": weights},
        "pooling": {"_target_": "oxford_ir.models.pooling.GeM", "p": 3.0},
    }
    torch.manual_seed(0)
    module = RetrievalModule(
        embedder=embedder,
        loss={"_target_": "pytorch_metric_learning.losses.TripletMarginLoss", "margin": 0.1},
        distance={"_target_": "pytorch_metric_learning.distances.CosineSimilarity"},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2},
    )
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return "MobileNetV2 (ImageNet) + GeM" if weights != "none" else "MobileNetV2 (random) + GeM"


def make_photos(folder: Path, n: int, size: int) -> tuple[list[Path], str]:
    """``n`` real photos when ../shared has them, else random ones; and which."""
    real = sorted(p for root in REAL_PHOTOS if root.is_dir() for p in root.glob("*.jpg"))[:n]
    if len(real) == n:
        return real, "real photos (../shared)"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = (size * 3 // 4, size) if i % 2 else (size, size * 3 // 4)
        path = folder / f"p{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths, "random photos"


def measure(spec: ModelSpec, photos: list[Path], image_size: int, batch_size: int) -> tuple[float, float, torch.Tensor]:
    onnx_file._sessions.clear()  # a fresh onnxruntime session each time, as a new process opens one
    started = time.perf_counter()
    model = spec.build("cpu")
    loaded = time.perf_counter() - started
    extract_embeddings(model, photos[:batch_size], image_size, batch_size=batch_size, batching="shape")  # warm-up
    started = time.perf_counter()
    vectors = extract_embeddings(model, photos, image_size, batch_size=batch_size, batching="shape")
    return loaded, len(photos) / (time.perf_counter() - started), vectors


def measure_torch_free(onnx_path: Path, photos: list[Path], image_size: int) -> tuple[float, float, torch.Tensor]:
    """The same as :func:`measure` for the query path without PyTorch: load is opening the session."""
    onnx_file._sessions.clear()
    started = time.perf_counter()
    onnx_file.open_onnx(onnx_path)
    loaded = time.perf_counter() - started
    embed_onnx_queries(str(onnx_path), photos[:4], None, image_size)  # warm-up
    started = time.perf_counter()
    vectors = embed_onnx_queries(str(onnx_path), photos, None, image_size)
    return loaded, len(photos) / (time.perf_counter() - started), torch.from_numpy(vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
        tmp = Path(tmp)
        model_name = make_checkpoint(tmp / "model.ckpt")
        started = time.perf_counter()
        report = export_onnx(ModelSpec(checkpoint=str(tmp / "model.ckpt")), tmp / "model.onnx")
        export_seconds = time.perf_counter() - started
        photos, kind = make_photos(tmp / "photos", options.images, options.image_size)
        specs: dict[str, ModelSpec | None] = {
            "PyTorch (checkpoint)": ModelSpec(checkpoint=str(tmp / "model.ckpt")),
            "ONNX (onnxruntime)": ModelSpec(onnx=str(report.path)),
            "ONNX, no PyTorch": None,
        }
        best: dict[str, tuple[float, float]] = {}
        vectors: dict[str, torch.Tensor] = {}
        for _ in range(2):
            for name, spec in specs.items():
                if spec is None:
                    loaded, rate, vectors[name] = measure_torch_free(report.path, photos, options.image_size)
                else:
                    loaded, rate, vectors[name] = measure(spec, photos, options.image_size, options.batch_size)
                old = best.get(name, (float("inf"), 0.0))
                best[name] = (min(old[0], loaded), max(old[1], rate))
    reference = vectors["PyTorch (checkpoint)"]
    print(
        f"{model_name}, {options.images} {kind} at long side {options.image_size}, batch {options.batch_size}, "
        f"torch threads {torch.get_num_threads()}; export took {export_seconds:.1f} s "
        f"(check: {report.max_difference:.1e})"
    )
    print(f"{'path':<22} {'load s':>7} {'images/s':>9} {'vs PyTorch':>11} {'max |diff|':>11}")
    base_rate = best["PyTorch (checkpoint)"][1]
    for name in specs:
        loaded, rate = best[name]
        diff = float((vectors[name] - reference).abs().max())
        print(f"{name:<22} {loaded:>7.3f} {rate:>9.1f} {rate / base_rate:>10.2f}x {diff:>11.1e}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
