"""A miniature Google Landmarks v2, in exactly the layout and formats of the official server, for tests and recipes.

:func:`write_miniature_gldv2` writes what ``https://s3.amazonaws.com/google-landmark`` serves, under the same
relative paths, so that ``oxford-ir-data download gldv2 --base-url file://<folder>`` (or an HTTP server on that
folder) runs the real downloader on it::

    metadata/train_clean.csv         landmark_id,images      (space-separated ids)
    metadata/train.csv               id,url,landmark_id      (the clean images, one more image per landmark that
                                                              the clean list left out, and two landmarks the clean
                                                              list dropped; one url holds a comma and is quoted)
    train/images_000.tar ...         members <a>/<b>/<c>/<id>.jpg, the first three characters of the id
    md5sum/train/md5.images_000.txt  "<md5>  images_000.tar"

The member layout is what the official ``download-dataset.sh`` implies: it runs ``tar -xf images_NNN.tar`` inside
``train/`` and the images then lie at ``train/<a>/<b>/<c>/<id>.jpg``. Each TAR holds a seeded share of every
landmark's images, as the real ones mix landmarks.

Each landmark is a distinct pattern (a background colour and a few coloured shapes, drawn per landmark from the
seed); each of its photos shifts, scales and relights it, so the task is learnable in a few CPU epochs and not by
colour alone. Deterministic for a seed; 12 landmarks of 2 to 8 photos take well under a second.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from oxford_ir.benchmarks.gldv2 import CLEAN_HEADER, FULL_HEADER, part_name


@dataclass(frozen=True)
class MiniatureGldv2:
    """What was written: ``clean[landmark] = ids`` (in the CSV's order), ``extra[landmark] = ids`` only in
    ``train.csv``, ``part_of[id]`` = the TAR holding it, and the folder."""

    folder: Path
    clean: dict[int, list[str]]
    extra: dict[int, list[str]]
    part_of: dict[str, int]
    parts: int


def write_miniature_gldv2(
    folder: str | Path,
    *,
    seed: int = 0,
    landmarks: int = 12,
    min_images: int = 2,
    max_images: int = 8,
    parts: int = 3,
    size: int = 64,
) -> MiniatureGldv2:
    """Write the miniature's server tree into ``folder`` (see the module docstring); return what it holds."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    landmark_ids = sorted(int(v) for v in rng.choice(200_000, landmarks + 2, replace=False))
    dropped = landmark_ids[-2:]  # in train.csv only
    landmark_ids = [int(v) for v in rng.permutation(landmark_ids[:-2])]
    used: set[str] = set()

    def new_id() -> str:
        while True:
            image = "".join("0123456789abcdef"[d] for d in rng.integers(0, 16, 16))
            if image not in used:
                used.add(image)
                return image

    clean = {lm: [new_id() for _ in range(int(rng.integers(min_images, max_images + 1)))] for lm in landmark_ids}
    extra = {lm: [new_id()] for lm in landmark_ids}
    extra.update({lm: [new_id() for _ in range(2)] for lm in dropped})
    members: list[dict[str, bytes]] = [{} for _ in range(parts)]
    part_of: dict[str, int] = {}
    for k, (landmark, ids) in enumerate([*clean.items(), *extra.items()]):
        pattern = _pattern(np.random.default_rng([seed, landmark]), size)
        for j, image in enumerate(ids):
            part = int(rng.integers(parts))
            photo = _photograph(pattern, np.random.default_rng([seed, landmark, j, k]))
            members[part][f"{image[0]}/{image[1]}/{image[2]}/{image}.jpg"] = photo
            part_of[image] = part

    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    (folder / "train").mkdir(exist_ok=True)
    (folder / "md5sum" / "train").mkdir(parents=True, exist_ok=True)
    clean_lines = [CLEAN_HEADER.decode()] + [f"{lm},{' '.join(ids)}" for lm, ids in clean.items()]
    (folder / "metadata" / "train_clean.csv").write_text("\n".join(clean_lines) + "\n")
    rows = [(image, lm) for lm, ids in clean.items() for image in ids]
    rows += [(image, lm) for lm, ids in extra.items() for image in ids]
    order = rng.permutation(len(rows))
    full_lines = [FULL_HEADER.decode()]
    for n, r in enumerate(order):
        image, landmark = rows[r]
        url = f"https://upload.wikimedia.org/wikipedia/commons/{image[0]}/{image[:2]}/{image}.jpg"
        if n == 0:
            url = f'"{url[:-4]},_view.jpg"'  # a url with a comma, quoted as CSV writers do
        full_lines.append(f"{image},{url},{landmark}")
    (folder / "metadata" / "train.csv").write_text("\n".join(full_lines) + "\n")
    for part in range(parts):
        name = part_name(part)
        data = _tar(members[part])
        (folder / "train" / f"{name}.tar").write_bytes(data)
        md5 = hashlib.md5(data).hexdigest()
        (folder / "md5sum" / "train" / f"md5.{name}.txt").write_text(f"{md5}  {name}.tar\n")
    return MiniatureGldv2(folder, clean, extra, part_of, parts)


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(members[name]), 1_577_836_800, 0o644
            tar.addfile(info, io.BytesIO(members[name]))
    return buffer.getvalue()


def _pattern(rng: np.random.Generator, size: int) -> Image.Image:
    """A landmark: a background colour and five shapes of its own colours and places, on a canvas twice ``size``."""
    side = 2 * size
    image = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(30, 226, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x0, y0 = rng.integers(0, side - side // 4, 2)
        w, h = rng.integers(side // 8, side // 2, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        if rng.random() < 0.5:
            draw.rectangle(box, fill=colour)
        else:
            draw.ellipse(box, fill=colour)
    return image


def _photograph(pattern: Image.Image, rng: np.random.Generator) -> bytes:
    """A view of ``pattern``: a random crop of 60-90% of it, resized to half the canvas, relit with a colour cast,
    with noise, as a JPEG."""
    side = pattern.width
    crop = int(side * rng.uniform(0.6, 0.9))
    x0, y0 = (int(v) for v in rng.integers(0, side - crop + 1, 2))
    view = pattern.crop((x0, y0, x0 + crop, y0 + crop)).resize((side // 2, side // 2), Image.BILINEAR)
    gain = rng.uniform(0.75, 1.25) * rng.uniform(0.8, 1.2, 3)  # brightness, and a colour cast per photo
    pixels = np.asarray(view, np.float32) * gain + rng.normal(0, 6, (side // 2, side // 2, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
