"""A miniature retrieval-SfM-120k in exactly the published layout and formats, for tests and CPU recipes.

The same files as the real dataset (:mod:`oxford_ir.benchmarks.sfm120k`): ``retrieval-SfM-120k.pkl`` holding
``{'train': {cids, cluster, qidxs, pidxs}, 'val': {...}}`` (a protocol-2 pickle of lists of str and int, like a
Python 2 era file), and JPEGs without an extension at ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``; cids are
32 hex digits, as the published ones. :func:`miniature_archive` packs the images as the published ``ims.tar.gz``
does for the downloader tests (members relative to ``ims/``, which cnnimageretrieval-pytorch extracts it into).

Each "3D model" (cluster) is a coloured shape of its own (kind, colour, proportions) on a background drawn from
one distribution shared by all clusters; each photo of it moves, scales and turns the shape a little and adds
noise, so a small network can learn which photos belong together. Rows of a part are shuffled (clusters
interleaved, as nothing promises the published order), cluster numbers restart at 0 in ``val``, and each cluster
has ``queries_per_cluster`` query/positive pairs of distinct images of that cluster. Deterministic for a seed.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from oxford_ir.benchmarks.sfm120k import IMAGE_FOLDER, PICKLE_NAME, cid2filename
from oxford_ir.errors import ConfigError
from oxford_ir.fs import replace_file

#: shapes a cluster is drawn as (cluster index modulo their number)
_SHAPES = ("ellipse", "rectangle", "triangle", "cross", "diamond")


class Miniature(NamedTuple):
    """The miniature's files: the pickle's bytes and each image's bytes by its path relative to ``ims/``."""

    pickle_bytes: bytes
    images: dict[str, bytes]
    database: dict


def miniature_sfm120k(
    *,
    seed: int = 0,
    train_clusters: int = 6,
    train_images: int = 8,
    val_clusters: int = 3,
    val_images: int = 6,
    queries_per_cluster: int = 2,
    image_size: tuple[int, int] = (64, 48),
) -> Miniature:
    """Draw the miniature in memory: ``train_clusters`` x ``train_images`` photos in ``train``, ``val_clusters`` x
    ``val_images`` in ``val``, ``queries_per_cluster`` query/positive pairs per cluster; ``image_size`` is (width,
    height) of a landscape photo (every third photo is portrait)."""
    if min(train_clusters, val_clusters) < 1 or 2 * queries_per_cluster > min(train_images, val_images):
        raise ConfigError(
            "a miniature needs a cluster in each part and 2 x queries_per_cluster images per cluster; got "
            f"{train_clusters} x {train_images} (train), {val_clusters} x {val_images} (val), {queries_per_cluster}"
        )
    rng = np.random.default_rng(seed)
    looks = [_look(rng, k) for k in range(train_clusters + val_clusters)]
    database, images = {}, {}
    for name, clusters, per_cluster, first_look in (
        ("train", train_clusters, train_images, 0),
        ("val", val_clusters, val_images, train_clusters),
    ):
        cluster = np.repeat(np.arange(clusters), per_cluster)
        order = rng.permutation(len(cluster))
        cluster = cluster[order]
        cids = [rng.bytes(16).hex() for _ in cluster]
        qidxs, pidxs = [], []
        for c in range(clusters):
            rows = np.flatnonzero(cluster == c)[: 2 * queries_per_cluster].tolist()
            qidxs += rows[0::2]
            pidxs += rows[1::2]
        for i, (cid, c) in enumerate(zip(cids, cluster.tolist(), strict=True)):
            size = image_size if i % 3 else image_size[::-1]
            images[cid2filename(cid)] = _photo(rng, looks[first_look + c], size)
        database[name] = {"cids": cids, "cluster": cluster.tolist(), "qidxs": qidxs, "pidxs": pidxs}
    return Miniature(pickle.dumps(database, protocol=2), images, database)


def write_miniature_sfm120k(folder: str | Path, **kwargs) -> Path:
    """Write the miniature (:func:`miniature_sfm120k` with ``kwargs``) into the dataset folder ``folder``: images
    first, the pickle last and atomically, so a folder holding the pickle holds every image. Returns ``folder``."""
    folder = Path(folder)
    miniature = miniature_sfm120k(**kwargs)
    for relative, data in miniature.images.items():
        path = folder / IMAGE_FOLDER / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    replace_file(folder / PICKLE_NAME, miniature.pickle_bytes)
    return folder


def miniature_archive(images: dict[str, bytes]) -> bytes:
    """``images`` (paths relative to ``ims/``) as a ``.tar.gz``, members relative to ``ims/`` like ``ims.tar.gz``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in sorted(images.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _look(rng: np.random.Generator, k: int) -> dict:
    """What identifies one cluster: its shape, colour and proportions."""
    return {
        "shape": _SHAPES[k % len(_SHAPES)],
        "colour": tuple(int(v) for v in rng.integers(30, 226, 3)),
        "aspect": float(rng.uniform(0.5, 1.5)),
    }


def _photo(rng: np.random.Generator, look: dict, size: tuple[int, int]) -> bytes:
    width, height = size
    background = rng.integers(60, 196, 3)
    pixels = np.clip(background + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    side = min(width, height) * rng.uniform(0.45, 0.7)
    w, h = side * min(1.0, look["aspect"]), side * min(1.0, 1 / look["aspect"])
    cx, cy = width / 2 + rng.uniform(-0.15, 0.15) * width, height / 2 + rng.uniform(-0.15, 0.15) * height
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in look["colour"])
    shape = look["shape"]
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=colour)
    else:  # cross
        draw.rectangle([box[0], cy - h / 6, box[2], cy + h / 6], fill=colour)
        draw.rectangle([cx - w / 6, box[1], cx + w / 6, box[3]], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
