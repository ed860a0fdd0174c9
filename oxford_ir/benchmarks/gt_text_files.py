"""The original Oxford / Paris ground-truth text files (``gt_files_170407/``).

``<landmark>_<n>_query.txt`` holds ``oxc1_<image> x1 y1 x2 y2`` (Paris files have no ``oxc1_`` prefix), and
``_good.txt`` / ``_ok.txt`` / ``_junk.txt`` list one image name a line (as ``imlist.txt`` does). Errors name the
file and line (``all_souls_1_good.txt:3: 'x y': ...``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from oxford_ir.benchmarks.gt_record import (
    GroundTruth,
    checked_box,
    checked_name,
    lookup_names,
    name_index,
    numbered_lines,
)
from oxford_ir.errors import GroundTruthError

#: folder names under which the original text files are published
GT_TEXT_FOLDERS = ("gt_files_170407", "gt_files")

_QUERY_FILE = re.compile(r"^(?P<landmark>.+)_(?P<n>\d+)_query\.txt$")


def read_gt_files(
    folder: str | Path, imlist: Sequence[str], imlist_source: str | Path = "the image list"
) -> GroundTruth:
    """Read a folder of original gt text files against the image list ``imlist``.

    Queries are ordered by (landmark, n), with n compared as a number; this is the
    order of ``gnd_oxford5k.pkl`` / ``gnd_paris6k.pkl``. Positives ``ok`` are good + ok,
    ``junk`` the junk file, both deduplicated (``all_souls_1_good.txt`` lists an image
    twice). A name missing from ``imlist`` is an error naming the gt file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GroundTruthError(f"{folder}: gt text folder not found")
    queries = []
    for path in folder.iterdir():
        match = _QUERY_FILE.match(path.name)
        if match:
            queries.append((match["landmark"], int(match["n"]), match["n"]))
    if not queries:
        raise GroundTruthError(
            f"{folder}: no <landmark>_<n>_query.txt files; this is not a folder of Oxford/Paris gt text files"
        )
    queries.sort()
    index = name_index(imlist)
    qimlist, gnd, landmarks = [], [], []
    for landmark, _, n_text in queries:
        prefix = folder / f"{landmark}_{n_text}"
        query_file = Path(f"{prefix}_query.txt")
        name, bbx = _parse_query_file(query_file, index, imlist_source)
        lists = {}
        for kind in ("good", "ok", "junk"):
            list_file = Path(f"{prefix}_{kind}.txt")
            lists[kind] = lookup_names(read_name_lines(list_file), index, list_file, imlist_source)
        qimlist.append(name)
        landmarks.append(landmark)
        gnd.append({"bbx": bbx, "ok": np.union1d(lists["good"], lists["ok"]), "junk": lists["junk"]})
    return GroundTruth("original", list(imlist), qimlist, gnd, landmarks, folder)


def _parse_query_file(path: Path, index: dict[str, int], imlist_source: str | Path) -> tuple[str, list[float]]:
    """The query image and box of a ``_query.txt``: one line ``<image> x1 y1 x2 y2``, the image in the list."""
    lines = numbered_lines(path)
    expected = "one line '<image> x1 y1 x2 y2', e.g. 'oxc1_all_souls_000013 136.5 34.1 648.5 955.4'"
    if not lines:
        raise GroundTruthError(f"{path}: empty query file; expected {expected}")
    number, line = lines[0]
    if len(lines) > 1:
        extra_number, extra = lines[1]
        raise GroundTruthError(
            f"{path}:{extra_number}: unexpected second line {extra!r}; a query file holds {expected}"
        )
    fields = line.split()
    if len(fields) != 5:
        raise GroundTruthError(f"{path}:{number}: {line!r} is not {expected}")
    name = checked_name(fields[0], f"{path}:{number}: {line!r}")
    if name not in index:
        raise GroundTruthError(
            f"{path}:{number}: query image {name!r} is not in {imlist_source} ({len(index)} names): a query must be "
            "one of the dataset's images. The ground truth belongs to another dataset, or its line was edited; "
            "this is not a missing download"
        )
    return name, checked_box(fields[1:], path, f"line {number} {line!r}: query {fields[0]!r}")


def read_name_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, image name)`` of a list file: one name per non-empty line."""
    names = []
    for number, line in numbered_lines(path):
        if len(line.split()) != 1:
            raise GroundTruthError(
                f"{path}:{number}: {line!r} is not an image name; the file lists one name per line "
                "(e.g. all_souls_000013)"
            )
        names.append((number, checked_name(line, f"{path}:{number}: {line!r}")))
    return names
