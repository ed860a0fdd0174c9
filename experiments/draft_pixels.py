"""How far JPEG draft decoding moves test-time pixels: draft (libjpeg DCT scaling) then Lanczos, against a full
decode then Lanczos, on real photos. Why oxford-ir does not draft evaluation images (README, "Decoding").

    .venv/bin/python experiments/draft_pixels.py ../shared/paris6k/jpg --sizes 362 512 --limit 40
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from oxford_ir.data.transforms import resize_long_side  # noqa: E402
from oxford_ir.images import load_image  # noqa: E402


def compare(path: Path, size: int) -> tuple[float, float, float] | None:
    """(mean |difference| in grey levels, share of equal values, largest difference), or None when libjpeg
    cannot reduce this image for ``size`` (its long side is under twice the size)."""
    full = np.asarray(resize_long_side(load_image(path), size), dtype=np.int16)
    drafted_image = load_image(path, draft_size=size, always_draft=True)
    if max(drafted_image.size) == max(load_image(path).size):
        return None
    drafted = np.asarray(resize_long_side(drafted_image, size), dtype=np.int16)
    if drafted.shape != full.shape:  # the reduced image rounds its short side differently: crop to compare
        h, w = min(drafted.shape[0], full.shape[0]), min(drafted.shape[1], full.shape[1])
        drafted, full = drafted[:h, :w], full[:h, :w]
    difference = np.abs(drafted - full)
    return float(difference.mean()), float((difference == 0).mean()), float(difference.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[362, 512])
    parser.add_argument("--limit", type=int, default=40)
    args = parser.parse_args()
    paths = sorted(args.folder.glob("*.jpg"))[: args.limit]
    print(f"{len(paths)} JPEGs from {args.folder}")
    print(f"{'long side':>9}  {'images':>6}  {'mean |diff|':>11}  {'equal values':>12}  {'max |diff|':>10}")
    for size in args.sizes:
        rows = [r for r in (compare(p, size) for p in paths) if r is not None]
        if not rows:
            print(f"{size:>9}  {0:>6}  (no image is at least twice this size: draft mode would not apply)")
            continue
        mean, equal = (float(np.mean([r[i] for r in rows])) for i in range(2))
        worst = max(r[2] for r in rows)
        print(f"{size:>9}  {len(rows):>6}  {mean:>11.2f}  {equal:>12.1%}  {worst:>10.0f}")


if __name__ == "__main__":
    main()
