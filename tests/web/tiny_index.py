"""A real tiny index for the web tests: 12 small, visibly different JPEGs (one EXIF-rotated) embedded by a tiny
random CNN whose weights are saved to a file, so that the server rebuilds exactly the indexing model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from oxford_ir.models.backbones import ScratchCNN
from oxford_ir.retrieval.index_build import build_index
from oxford_ir.retrieval.model_spec import ModelSpec


def tiny_embedder(weights: Path) -> dict:
    """A tiny ScratchCNN + GeM embedder config with fixed random weights saved to ``weights``.

    A config with ``weights: none`` would be re-initialised at random each time it is built: the server's
    model would then differ from the one that built the index, and every score would be noise.
    """
    torch.manual_seed(0)
    torch.save(ScratchCNN(channels=[8, 16]).state_dict(), weights)
    return embedder_config(weights)


def embedder_config(weights: Path) -> dict:
    """The config of :func:`tiny_embedder` around weights it saved already (an update must not rewrite them)."""
    return {
        "_target_": "oxford_ir.models.embedder.Embedder",
        "backbone": {"_target_": "oxford_ir.models.backbones.ScratchCNN", "channels": [8, 16], "weights": str(weights)},
        "pooling": {"_target_": "oxford_ir.models.pooling.GeM"},
    }


N_IMAGES = 12
IMAGE_SIZE = 96
#: the collection's one EXIF-rotated photo: stored 90 x 60, shown (and indexed) 60 x 90
ROTATED = "b/rotated_11.jpg"


def make_collection(folder: Path) -> list[Path]:
    """12 small, visibly different JPEGs in two sub-folders (coloured shapes on gradients); the last one
    carries EXIF orientation 6 (rotate 90 degrees clockwise when shown)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_IMAGES):
        width, height = [(96, 72), (72, 96), (120, 80)][i % 3]
        top, bottom = rng.integers(30, 230, size=(2, 3))
        ramp = np.linspace(0.0, 1.0, height)[:, None, None]
        pixels = (top * (1 - ramp) + bottom * ramp).repeat(width, axis=1).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(3 + i % 3):
            x1, y1 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
            x2, y2 = x1 + int(rng.integers(12, 40)), y1 + int(rng.integers(12, 40))
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x1, y1, x2, y2), fill=colour)
        path = folder / ("a" if i < 6 else "b") / f"{'rotated' if i == N_IMAGES - 1 else 'scene'}_{i:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i == N_IMAGES - 1:
            image = image.resize((90, 60))
            exif = Image.Exif()
            exif[0x0112] = 6
            image.save(path, quality=92, exif=exif.tobytes())
        else:
            image.save(path, quality=92)
        paths.append(path)
    return paths


def build_tiny_index(root: Path) -> Path:
    """A real index (oxford_ir.retrieval.index_build.build_index) of :func:`make_collection` with a tiny random CNN."""
    make_collection(root / "images")
    tiny_embedder(root / "scratch_cnn.pth")
    update_tiny_index(root)
    return root / "index"


def update_tiny_index(root: Path) -> str:
    """Update the index of :func:`build_tiny_index` to what ``root/images`` holds now, as ``oxford-ir-index`` does
    (the same build_index, in this process); the new version's name."""
    report = build_index(
        ModelSpec(embedder=embedder_config(root / "scratch_cnn.pth")),
        str(root / "images"),
        root / "index",
        image_size=IMAGE_SIZE,
        batch_size=4,
        num_workers=0,
        progress=False,
    )
    return report.version


def draw_picture(path: Path, seed: int, size: tuple[int, int] = (80, 64)) -> None:
    """A small JPEG at ``path`` unlike the collection's and unlike other seeds' (random blocks of colour)."""
    rng = np.random.default_rng(1000 + seed)
    blocks = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST).save(path, quality=90)
