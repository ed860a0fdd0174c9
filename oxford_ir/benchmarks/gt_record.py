"""The record every form of the ground truth is read into (:class:`GroundTruth`), and the checks of its values that
all forms share: image names, index lists, query boxes, and reading a file as bytes or text.

Every problem with a file raises one :class:`GroundTruthError` naming the file and where in it: the line
(``all_souls_1_good.txt:3: 'x y': ...``) of a text file, the key and position (``landmark 'tower' 'good'[2]``,
``'qimlist'[4]``) of a JSON file or pickle, and what is expected there.

Every image the ground truth names (query or positive) must be in the dataset's image list (``imlist.txt``, the
``jpg/`` folder, or the pickle's own ``imlist``; a revisited pickle's queries are the exception: its database
leaves them out). A name outside that list is an error of the ground truth, not a missing download: it is never
reported as a file to download, nor dropped with the missing images of a subset. Names are file names without
extension; one that leads outside the image folder (``..``, absolute: :func:`oxford_ir.fs.path_escape`, the rule
index entries follow too) or holds a path separator is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oxford_ir.errors import GroundTruthError
from oxford_ir.fs import path_escape
from oxford_ir.images import IMAGE_EXTENSIONS

#: the protocol's index keys, positives first (same as ``benchmark.INDEX_KEYS``)
PROTOCOL_KEYS = {"original": ("ok", "junk"), "revisited": ("easy", "hard", "junk")}
POSITIVE_KEYS = {"original": ("ok",), "revisited": ("easy", "hard")}

_QUERY_PREFIX = "oxc1_"


@dataclass(frozen=True)
class GroundTruth:
    """What one ground-truth file says, before it is tied to an image folder.

    ``gnd[i]`` has ``bbx`` (four floats [x1, y1, x2, y2], or None for the whole image)
    and sorted, unique ``np.int64`` index arrays into ``imlist``: ``ok``/``junk``
    for the original protocol, ``easy``/``hard``/``junk`` for the revisited one.
    """

    protocol: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]
    query_landmarks: list[str]
    source: Path


# -- reading files ------------------------------------------------------------------------------------


def read_bytes(path: Path) -> bytes:
    """The bytes of a ground-truth file; a missing or unreadable one is a GroundTruthError naming it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GroundTruthError(f"{path}: ground-truth file not found") from None
    except OSError as error:
        raise GroundTruthError(f"{path}: cannot read the file ({error.strerror or error})") from None


def read_text(path: Path) -> str:
    """A ground-truth file as UTF-8 text (a byte-order mark is dropped)."""
    try:
        return read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise GroundTruthError(f"{path}: not a UTF-8 text file (byte {error.start}); the file is corrupt") from None


def numbered_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of every non-empty line."""
    lines = [(number, line.strip()) for number, line in enumerate(read_text(path).splitlines(), start=1)]
    return [(number, line) for number, line in lines if line]


# -- image names ----------------------------------------------------------------------------------------


def _clean_name(name: str) -> str:
    """Image name without the ``oxc1_`` prefix of the Oxford query files and without an image extension."""
    name = name.strip()
    if name.startswith(_QUERY_PREFIX):
        name = name[len(_QUERY_PREFIX) :]
    stem, dot, ext = name.rpartition(".")
    return stem if dot and f".{ext.lower()}" in IMAGE_EXTENSIONS else name


def checked_name(text: str, where: str) -> str:
    """``text`` as an image name (prefix and extension removed); ``where`` names the place for the error."""
    name = _clean_name(text)
    escape = path_escape(name)  # the project's one containment rule (oxford_ir.fs)
    if escape is not None:
        raise GroundTruthError(
            f"{where}: not an image name: it {escape}; expected a file name inside jpg/ (e.g. all_souls_000013)"
        )
    if name == "." or any(c in name for c in "/\\") or name != name.strip():
        raise GroundTruthError(
            f"{where}: not an image name; expected a file name without folders (e.g. all_souls_000013)"
        )
    return name


def name_index(imlist: Sequence[str]) -> dict[str, int]:
    """Position of each name of ``imlist`` (its first, should a name repeat)."""
    index: dict[str, int] = {}
    for i, name in enumerate(imlist):
        index.setdefault(name, i)
    return index


def lookup_names(
    names: Sequence[tuple[int | str, str]], index: dict[str, int], path: Path, imlist_source: str | Path
) -> np.ndarray:
    """Sorted unique indices of ``(where, name)`` pairs (``where``: a line number of ``path``, or a JSON position);
    a name outside the image list is an error naming the file, the place and the image."""
    unknown = [(where, name) for where, name in names if name not in index]
    if unknown:
        where, name = unknown[0]
        at = f"{path}:{where}" if isinstance(where, int) else f"{path}: {where}"
        more = len({n for _, n in unknown}) - 1
        raise GroundTruthError(
            f"{at}: image {name!r}" + (f" (and {more} more)" if more else "") + f" is not in {imlist_source} "
            f"({len(index)} names); the ground truth and the image list belong to different datasets or the image "
            "list is incomplete: this is not a missing download"
        )
    return np.unique(np.array([index[name] for _, name in names], dtype=np.int64))


# -- index lists and boxes ------------------------------------------------------------------------------


def index_array(values: Any, n_db: int, path: Path, where: str) -> np.ndarray:
    """Sorted unique int64 indices, checked against an image list of ``n_db`` names."""
    try:
        array = np.asarray(values)
        if array.dtype.kind not in "iuf":
            raise TypeError
    except (TypeError, ValueError):
        raise GroundTruthError(f"{path}: {where} must be a list of integer indices into 'imlist'") from None
    array = array.reshape(-1)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array) & (array == np.round(array))):
        raise GroundTruthError(f"{path}: {where} holds non-integer indices; expected indices into 'imlist'")
    array = np.unique(array.astype(np.int64))
    if array.size and (array[0] < 0 or array[-1] >= n_db):
        bad = int(array[0] if array[0] < 0 else array[-1])
        raise GroundTruthError(
            f"{path}: {where} index {bad} is out of range for 'imlist' of {n_db} names; the file is corrupt or "
            "its lists do not belong together"
        )
    return array


def checked_box(value: Any, path: Path, where: str) -> list[float] | None:
    """[x1, y1, x2, y2] as floats, None when absent; a malformed box names the file and query."""
    if value is None:
        return None
    try:
        box = [float(v) for v in np.asarray(value, dtype=object).reshape(-1)]
    except (TypeError, ValueError):
        raise GroundTruthError(
            f"{path}: {where} bounding box {value!r} is not numeric; expected [x1, y1, x2, y2]"
        ) from None
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise GroundTruthError(f"{path}: {where} bounding box {value!r} must be four finite numbers [x1, y1, x2, y2]")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise GroundTruthError(f"{path}: {where} bounding box {box} is empty; expected x1 < x2 and y1 < y2")
    return box
