"""A user's own images as a folder per class: ``<root>/<label>/<image>``, read into a :class:`Collection`.

Layouts::

    photos/                            every image is in the train split
      eiffel_tower/ 001.jpg 002.jpg    the folder name is the label; images are found recursively below it
      louvre/ day/a.jpg night/b.jpg    (sub-folders of a label folder are part of that label)
    photos/                            split folders: their label folders are the splits' images
      train/<label>/...  val/<label>/...  test/<label>/...

Every image is a query and in the gallery (an evaluation scores each image against the others of its split).
Images are files with one of :data:`~oxford_ir.images.IMAGE_EXTENSIONS` (any case); names starting with ``.`` are
skipped like hidden files; other files (``notes.txt``, ``Thumbs.db``) are ignored and listed in
:attr:`FolderScan.ignored`, which ``oxford-ir-data check`` prints. Images lying directly in the root or a split
folder have no label: :attr:`FolderScan.unlabelled` lists them, the reader warns about them and ``check`` reports
them as a problem. Symbolic links are not followed into folders. A root that mixes split folders with label folders
is refused (one line naming both), so a class called ``test`` cannot silently become a split.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

from oxford_ir.benchmarks.collection import SPLITS, Collection
from oxford_ir.errors import DataError
from oxford_ir.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


class FolderScan(NamedTuple):
    """What :func:`scan_folder` found: the collection, the files it ignored and the images without a class folder
    (paths relative to the root, posix)."""

    collection: Collection
    ignored: list[str]
    unlabelled: list[str]


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as found:
            return sorted((e for e in found if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as error:
        raise DataError(
            f"{folder}: cannot list the folder ({error.strerror}); check that it exists and is readable"
        ) from None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(root: Path, label_folder: Path) -> tuple[list[str], list[str]]:
    """Images and other files below ``label_folder``, as paths relative to ``root``, sorted."""
    images: list[str] = []
    others: list[str] = []
    for folder, dirs, files in os.walk(label_folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(folder).relative_to(root).as_posix()
        for name in sorted(files):
            if not name.startswith("."):
                (images if _is_image(name) else others).append(f"{base}/{name}")
    return images, others


def scan_folder(root: str | Path, *, name: str | None = None) -> FolderScan:
    """Read the folder ``root`` (layouts in the module docstring) into a :class:`FolderScan`.

    A :class:`DataError` when ``root`` is not a folder, holds no image in a class folder, or mixes split folders
    (``train``, ``val``, ``test``) with class folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give a folder with one sub-folder of images per class")
    top = _entries(root)
    folders = [e for e in top if e.is_dir(follow_symlinks=False)]
    split_folders = [e for e in folders if e.name in SPLITS]
    if split_folders and len(split_folders) != len(folders):
        other = next(e.name for e in folders if e.name not in SPLITS)
        raise DataError(
            f"{root}: holds split folders ({', '.join(e.name for e in split_folders)}) and the class folder "
            f"{other!r}; move every class folder under train/, val/ or test/, or rename the split folders"
        )
    # (split name, folder holding the class folders, its entries)
    parts = [(e.name, Path(e.path), _entries(Path(e.path))) for e in split_folders] or [("train", root, top)]
    paths: list[str] = []
    labels: list[str] = []
    splits: list[str] = []
    ignored: list[str] = []
    unlabelled: list[str] = []
    if split_folders:  # a README next to train/ val/ test/ is ignored; an image there has no class
        for entry in top:
            if not entry.is_dir(follow_symlinks=False):
                (unlabelled if _is_image(entry.name) else ignored).append(entry.name)
    for split, _folder, entries in parts:
        for entry in entries:
            relative = Path(entry.path).relative_to(root).as_posix()
            if entry.is_dir(follow_symlinks=False):
                images, others = _walk(root, Path(entry.path))
                paths += images
                labels += [entry.name] * len(images)
                splits += [split] * len(images)
                ignored += others
            elif _is_image(entry.name):
                unlabelled.append(relative)
            else:
                ignored.append(relative)
    if not paths:
        raise DataError(
            f"{root}: no images in class folders (looked for {', '.join(IMAGE_EXTENSIONS)} in <root>/<class>/ and "
            "<root>/{train,val,test}/<class>/); give a folder with one sub-folder of images per class"
        )
    if unlabelled:
        log.warning(
            "%s: %d image(s) lie outside any class folder and are left out (first: %s); move each into the folder "
            "of its class",
            root,
            len(unlabelled),
            unlabelled[0],
        )
    collection = Collection.from_rows(name or root.name, root, root, paths, labels, split=splits)
    return FolderScan(collection, ignored, unlabelled)


def read_folder(root: str | Path, *, name: str | None = None) -> Collection:
    """The :class:`Collection` of a folder with a sub-folder per class (:func:`scan_folder`)."""
    return scan_folder(root, name=name).collection
