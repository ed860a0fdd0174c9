"""What to index: the images named by ``images=`` (a folder, a glob, one file or ``benchmark:<name>``).

:func:`resolve_images` lists them as an :class:`ImageSource`, an absolute root and sorted relative paths; hidden
files and folders and files without an image extension are skipped. Building the index from it is
:func:`~oxford_ir.retrieval.index_build.build_index`.
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oxford_ir.errors import ConfigError, DataError
from oxford_ir.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ImageSource:
    """The images to index: an absolute ``root`` and sorted ``paths`` relative to it (posix).

    Unpacks as ``root, paths = resolve_images(...)``; ``spec`` is what the user gave (for messages).
    """

    root: Path
    paths: list[str]
    spec: str = ""
    #: images whose shapes the bucket table also covers though they are not indexed: a benchmark's query crops
    #: ``(absolute path, box)``, so that its index embeds every image as ``oxford-ir-eval`` does
    queries: tuple[tuple[Path, tuple[float, ...] | None], ...] = ()

    def __iter__(self) -> Iterator[Any]:
        return iter((self.root, self.paths))

    def __len__(self) -> int:
        return len(self.paths)


def resolve_images(
    spec: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, allow_missing_images: bool = False
) -> ImageSource:
    """The images named by ``spec``: a folder (searched recursively), a single image file, a glob
    (``photos/**/*.jpg``; its root is the folder before the first wildcard), or ``benchmark:<name>``
    (that benchmark's database images, in its image-list order, read from ``data_dir``).

    Folders and globs keep files with an image extension (:data:`~oxford_ir.images.IMAGE_EXTENSIONS`,
    any case) and skip hidden files and folders; symbolic links to folders are not followed.
    """
    text = str(spec).strip()
    if not text:
        raise ConfigError("images= is empty: give a folder, a quoted glob ('photos/**/*.jpg') or benchmark:<name>")
    if text.startswith("benchmark:"):
        return _benchmark_images(text, data_dir, allow_missing_images)
    path = Path(text).expanduser()
    if path.is_dir():
        root = path.resolve()
        paths = sorted(_walk_images(root))
        if not paths:
            raise DataError(
                f"images={text}: no image files in {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        return ImageSource(root, paths, text)
    if path.is_file():
        return ImageSource(path.resolve().parent, [path.name], text)
    if any(c in text for c in "*?["):
        return _glob_images(text)
    raise DataError(
        f"images={text}: no such folder or file; give a folder of images, a quoted glob ('photos/**/*.jpg') "
        "or benchmark:<name>"
    )


def _walk_images(root: Path) -> Iterator[str]:
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        base = Path(folder)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                yield (base / name).relative_to(root).as_posix()


def _glob_images(pattern: str) -> ImageSource:
    parts = Path(pattern).expanduser().parts
    fixed = []
    for part in parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    root = Path(os.path.abspath(Path(*fixed))) if fixed else Path.cwd()
    matches = [Path(m) for m in _glob.glob(str(Path(pattern).expanduser()), recursive=True)]
    files = [m for m in matches if m.is_file() and m.name.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DataError(
            f"images={pattern}: the pattern matches no image files ({', '.join(IMAGE_EXTENSIONS)}); "
            "quote it so the shell does not expand it, and check the folder"
        )
    paths = sorted(dict.fromkeys(Path(os.path.abspath(m)).relative_to(root).as_posix() for m in files))
    return ImageSource(root, paths, pattern)


def _benchmark_images(text: str, data_dir: str | os.PathLike | None, allow_missing_images: bool) -> ImageSource:
    from oxford_ir.benchmarks.registry import load_benchmark

    name = text.split(":", 1)[1].strip()
    if data_dir is None:
        raise ConfigError(f"images={text}: a benchmark needs paths.data_dir, the folder holding its dataset")
    benchmark = load_benchmark(name, data_dir, allow_missing_images=allow_missing_images)
    paths = list(dict.fromkeys(f"{n}{benchmark.extension}" for n in benchmark.imlist))
    queries = tuple(
        (Path(p).resolve(), None if b is None else tuple(float(v) for v in b))
        for p, b in zip(benchmark.query_paths, benchmark.query_bboxes, strict=True)
    )
    return ImageSource(Path(benchmark.image_dir).resolve(), paths, text, queries)
