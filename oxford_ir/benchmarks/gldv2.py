"""Google Landmarks v2 (Weyand et al., CVPR 2020) as a :class:`~oxford_ir.benchmarks.collection.Collection`.

The layout of ``<data>/gldv2/`` is the official one (github.com/cvdfoundation/google-landmark)::

    train_clean.csv    landmark_id,images      one line per landmark, images = its space-separated image ids
                                               (81,313 landmarks, 1,580,470 images: the "clean" subset)
    train.csv          id,url,landmark_id      one line per image (4,132,914 images, 203,094 landmarks)
    train/<a>/<b>/<c>/<id>.jpg                 an image, <a><b><c> = the first three characters of its id
                                               (what the 500 TARs images_000.tar ... images_499.tar unpack to)

An image id is 16 lowercase hex digits: it is read as a 64-bit integer, so 1.6 million ids are 13 MB, and the
paths are built from the integers, which also guarantees that no path leaves the folder. Parsing is vectorised:
no Python object per image is kept (a 1.6M-image clean CSV: see :func:`read_clean_csv`).

Every image is in split ``train`` and is both a query and in the gallery. :func:`load_gldv2` then picks a subset by
landmark: landmarks with at least ``min_images`` images, at most ``max_landmarks`` of them drawn with ``seed``, and
``val_landmarks`` of those moved to split ``val`` (their images are queries against each other), so that training on
GLDv2 validates on landmarks it never trained on. With only some TARs downloaded (``oxford-ir-data download gldv2
--parts 0-3``), only the images of those parts are taken: the downloader records the ids of each part it unpacked
(``.parts/images_NNN.ids``) and lists the parts in its ``.complete.json``.

A bad row is one :class:`~oxford_ir.errors.DataError` naming the file and line: an id that is not 16 hex digits, a
landmark id that is not a whole number, a landmark with no images, an id listed twice.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from oxford_ir.benchmarks.collection import Collection
from oxford_ir.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: folder of GLDv2 under the data folder
GLDV2_FOLDER = "gldv2"
CLEAN_CSV = "train_clean.csv"
FULL_CSV = "train.csv"
CLEAN_HEADER = b"landmark_id,images"
FULL_HEADER = b"id,url,landmark_id"
#: folder (under the dataset folder) the training TARs unpack into
IMAGE_FOLDER = "train"
#: number of training TARs, images_000.tar ... images_499.tar
NUM_PARTS = 500
#: the image ids of each unpacked TAR, one per line (written by the downloader)
PARTS_FOLDER = ".parts"
#: written by the downloader once the parts it was asked for are in place; lists them under "parts"
COMPLETE_MARKER = ".complete.json"
STATE_FILE = ".download-state.json"
ID_LENGTH = 16

_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
_NIBBLE = np.full(256, 255, np.uint8)  # byte -> value of the hex digit, 255 for anything else
_NIBBLE[_HEX_DIGITS] = np.arange(16, dtype=np.uint8)


def part_name(part: int) -> str:
    """``images_007`` for part 7 (the TAR is ``<name>.tar``, its md5 file ``md5.<name>.txt``)."""
    return f"images_{part:03d}"


# -- ids and paths ----------------------------------------------------------------------------------


def ids_to_int(text: np.ndarray) -> np.ndarray:
    """``(n, 16)`` uint8 ASCII hex digits -> ``n`` uint64 ids; bad digits must have been refused before."""
    values = _NIBBLE[text]
    packed = np.ascontiguousarray((values[:, 0::2] << 4) | values[:, 1::2])  # (n, 8) bytes, most significant first
    return packed.view(">u8").ravel().astype(np.uint64)


def ids_to_text(ids: np.ndarray) -> np.ndarray:
    """``n`` uint64 ids -> ``(n, 16)`` uint8 ASCII lowercase hex digits."""
    shifts = np.arange(ID_LENGTH - 1, -1, -1, dtype=np.uint64) * np.uint64(4)
    nibbles = (np.asarray(ids, np.uint64)[:, None] >> shifts) & np.uint64(15)
    return _HEX_DIGITS[nibbles.astype(np.intp)]


def image_paths(ids: np.ndarray) -> np.ndarray:
    """Relative paths ``train/<a>/<b>/<c>/<id>.jpg`` of ``ids`` (uint64), as a numpy str array, built without a
    Python string per image."""
    text = ids_to_text(ids)
    prefix = f"{IMAGE_FOLDER}/".encode()
    width = len(prefix) + 6 + ID_LENGTH + 4
    out = np.empty((len(text), width), np.uint8)
    out[:, : len(prefix)] = np.frombuffer(prefix, np.uint8)
    at = len(prefix)
    for k in range(3):  # <a>/<b>/<c>/
        out[:, at] = text[:, k]
        out[:, at + 1] = ord("/")
        at += 2
    out[:, at : at + ID_LENGTH] = text
    out[:, at + ID_LENGTH :] = np.frombuffer(b".jpg", np.uint8)
    return np.ascontiguousarray(out).view(f"S{width}").ravel().astype(f"U{width}")


def _check_ids(text: np.ndarray, lines: np.ndarray, path: Path) -> np.ndarray:
    """``(n, 16)`` ASCII ids -> uint64, or a DataError naming the line of the first bad or repeated id."""
    bad = (_NIBBLE[text] == 255).any(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        token = bytes(text[row]).decode("ascii", "replace")
        raise DataError(
            f"{path}:{lines[row]}: image id {token!r} is not {ID_LENGTH} hex digits (0-9, a-f); fix or delete the line"
        )
    ids = ids_to_int(text)
    order = np.argsort(ids, kind="stable")
    repeated = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(repeated):
        first, again = order[repeated], order[repeated + 1]
        k = int(np.argmin(lines[again]))
        token = bytes(text[again[k]]).decode()
        raise DataError(
            f"{path}:{lines[again[k]]}: image id {token} is listed again (first on line {lines[first[k]]}); "
            "an image belongs to one landmark: delete one of the two"
        )
    return ids


# -- the CSV files ----------------------------------------------------------------------------------


def _lines(path: Path, header: bytes) -> list[bytes]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    lines = data.split(b"\n")
    if lines[0].rstrip(b"\r").lstrip(b"\xef\xbb\xbf") != header:
        raise DataError(f"{path}:1: expected the header {header.decode()!r}; is this the official {path.name}?")
    return lines


def _landmark(text: bytes, path: Path, line: int) -> int:
    text = text.strip().strip(b'"')
    if not text.isdigit():
        raise DataError(f"{path}:{line}: landmark_id {text.decode(errors='replace')!r} is not a whole number")
    return int(text)


def read_clean_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids uint64, landmark ids int64, line numbers int32)``, one entry per image of ``train_clean.csv``.

    One Python step per landmark line, then numpy over one buffer holding every id: on the 2-core test machine a
    synthetic 81k-landmark, 1.6M-image file takes about a second (see the module tests).
    """
    path = Path(path)
    lines = _lines(path, CLEAN_HEADER)
    fields, landmarks, counts, numbers = [], [], [], []
    seen: dict[int, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        landmark_text, comma, images = line.partition(b",")
        landmark = _landmark(landmark_text, path, number)
        if landmark in seen:
            raise DataError(
                f"{path}:{number}: landmark {landmark} appears again (first on line {seen[landmark]}); "
                "merge its images into one line"
            )
        seen[landmark] = number
        images = images.strip().strip(b'"').strip()
        if not comma or not images:
            raise DataError(f"{path}:{number}: landmark {landmark} has no images; delete the line")
        if len(images) % (ID_LENGTH + 1) != ID_LENGTH:
            bad = next((t for t in images.split() if len(t) != ID_LENGTH), images.split()[0])
            raise DataError(
                f"{path}:{number}: image id {bad.decode(errors='replace')!r} is not {ID_LENGTH} hex digits "
                "(ids are separated by one space); fix or delete it"
            )
        fields.append(images)
        landmarks.append(landmark)
        counts.append((len(images) + 1) // (ID_LENGTH + 1))
        numbers.append(number)
    counts_array = np.asarray(counts, np.int64)
    lines_per_image = np.repeat(np.asarray(numbers, np.int32), counts_array)
    if not fields:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), lines_per_image
    buffer = np.frombuffer(b" ".join(fields) + b" ", np.uint8).reshape(-1, ID_LENGTH + 1)
    misplaced = buffer[:, ID_LENGTH] != ord(" ")
    if misplaced.any():
        row = int(np.argmax(misplaced))
        raise DataError(
            f"{path}:{lines_per_image[row]}: image ids must be {ID_LENGTH} hex digits separated by one space, "
            f"found {bytes(buffer[row]).decode(errors='replace')!r}; fix the line"
        )
    ids = _check_ids(buffer[:, :ID_LENGTH], lines_per_image, path)
    return ids, np.repeat(np.asarray(landmarks, np.int64), counts_array), lines_per_image


def read_full_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, landmark ids, line numbers)`` of ``train.csv`` (``id,url,landmark_id``; a url may hold commas).

    Vectorised over the file's bytes (4.1M rows: see the module tests); a file that the fast path cannot take whole
    (a quoted id or landmark, a bad row) is read line by line, which names the first bad line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from None
    fast = _full_csv_fast(data)
    return fast if fast is not None else _full_csv_lines(path)


def _full_csv_fast(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`read_full_csv` of well-formed ``data`` without a Python step per row; None when a row is not (plain
    ``<16 hex>,<url>,<digits>``, ids distinct) or the header is not the official one."""
    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == ord("\n"))
    if not len(ends) or ends[-1] != len(buf) - 1:
        ends = np.append(ends, len(buf))
    starts = np.concatenate([[0], ends[:-1] + 1])
    ends = ends - ((ends > starts) & (buf[np.maximum(ends - 1, 0)] == ord("\r")))
    if bytes(buf[starts[0] : ends[0]]) != FULL_HEADER:
        return None
    rows = np.flatnonzero(ends > starts)[1:]  # blank lines are skipped, as by the line reader
    starts, ends, numbers = starts[rows], ends[rows], (rows + 1).astype(np.int32)
    if not len(rows):
        return np.zeros(0, np.uint64), np.zeros(0, np.int64), numbers
    if (ends - starts <= ID_LENGTH + 2).any() or (buf[starts + ID_LENGTH] != ord(",")).any():
        return None
    commas = np.flatnonzero(buf == ord(","))
    last = commas[np.searchsorted(commas, ends) - 1]
    digits = ends - last - 1
    if (last <= starts + ID_LENGTH).any() or (digits < 1).any() or (digits > 18).any():
        return None
    landmarks = np.zeros(len(rows), np.int64)
    for k in range(int(digits.max())):
        inside = k < digits
        value = buf[np.where(inside, last + 1 + k, 0)].astype(np.int64) - ord("0")
        if ((value < 0) | (value > 9))[inside].any():
            return None
        landmarks = np.where(inside, landmarks * 10 + value, landmarks)
    text = buf[starts[:, None] + np.arange(ID_LENGTH)]
    if (_NIBBLE[text] == 255).any():
        return None
    ids = ids_to_int(text)
    ordered = np.sort(ids)  # np.unique of 4M uint64 takes 10 s with numpy 2.4 (hashing), a sort 0.5 s
    if (ordered[1:] == ordered[:-1]).any():
        return None
    return ids, landmarks, numbers


def _full_csv_lines(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`read_full_csv` one line at a time: quoted fields taken, the first bad line named."""
    lines = _lines(path, FULL_HEADER)
    text = bytearray()
    landmarks, numbers = [], []
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        image, comma, rest = line.partition(b",")
        _, comma2, landmark_text = rest.rpartition(b",")
        if not comma or not comma2:
            raise DataError(f"{path}:{number}: expected id,url,landmark_id; fix or delete the line")
        image = image.strip(b'"')
        if len(image) != ID_LENGTH:
            raise DataError(
                f"{path}:{number}: image id {image.decode(errors='replace')!r} is not {ID_LENGTH} hex digits "
                "(0-9, a-f); fix or delete the line"
            )
        text += image
        landmarks.append(_landmark(landmark_text, path, number))
        numbers.append(number)
    line_numbers = np.asarray(numbers, np.int32)
    ids = _check_ids(np.frombuffer(bytes(text), np.uint8).reshape(-1, ID_LENGTH), line_numbers, path)
    return ids, np.asarray(landmarks, np.int64), line_numbers


# -- downloaded parts -------------------------------------------------------------------------------


def write_part_ids(folder: Path, part: int, paths: list[str]) -> None:
    """Record the image ids of an unpacked TAR (the files it placed, ``.../<a>/<b>/<c>/<id>.jpg``), atomically."""
    from oxford_ir.fs import replace_file

    stems = (Path(p).stem for p in paths if p.endswith(".jpg"))
    ids = sorted(s for s in stems if len(s) == ID_LENGTH and not s.strip("0123456789abcdef"))
    (folder / PARTS_FOLDER).mkdir(exist_ok=True)
    replace_file(folder / PARTS_FOLDER / f"{part_name(part)}.ids", "".join(f"{i}\n" for i in ids).encode())


def downloaded_ids(folder: Path) -> np.ndarray | None:
    """The ids (uint64) of the parts a :func:`~oxford_ir.benchmarks.gldv2_download.download_gldv2` run unpacked
    into ``folder``; None when no such run did (the images were placed by hand: every listed image is taken)."""
    marker = folder / COMPLETE_MARKER
    if not marker.exists():
        if (folder / STATE_FILE).exists():
            raise DataError(
                f"gldv2: {folder} holds an unfinished download ({STATE_FILE}, no {COMPLETE_MARKER}); finish it with "
                f"`oxford-ir-data download gldv2 --root {folder.parent} --parts ...`, which resumes where it stopped"
            )
        return None
    try:
        parts = json.loads(marker.read_text())["parts"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{marker}: unreadable; run `oxford-ir-data download gldv2` again to rewrite it") from None
    if len(parts) == NUM_PARTS:
        return None
    chunks = []
    for part in parts:
        listing = folder / PARTS_FOLDER / f"{part_name(int(part))}.ids"
        try:
            raw = listing.read_bytes().replace(b"\n", b"")
        except OSError:
            raise DataError(
                f"{listing}: missing (the ids of a downloaded part); run `oxford-ir-data download gldv2` again"
            ) from None
        if len(raw) % ID_LENGTH:
            raise DataError(f"{listing}: damaged; delete it and {COMPLETE_MARKER}, then download the part again")
        chunks.append(np.frombuffer(raw, np.uint8).reshape(-1, ID_LENGTH))
    text = np.concatenate(chunks) if chunks else np.zeros((0, ID_LENGTH), np.uint8)
    if (_NIBBLE[text] == 255).any():
        raise DataError(f"{folder / PARTS_FOLDER}: damaged id lists; delete {COMPLETE_MARKER} and download again")
    return ids_to_int(text)


# -- the subset -------------------------------------------------------------------------------------


def select_landmarks(
    landmarks: np.ndarray,
    *,
    min_images: int = 1,
    max_landmarks: int | None = None,
    val_landmarks: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(chosen, val)``: sorted landmark ids. The rule: the landmarks with at least ``min_images`` of the images
    ``landmarks`` (one landmark id per image), in increasing id order; when more than ``max_landmarks``, that many
    drawn from them without replacement by ``numpy.random.default_rng(seed).choice``; then ``val_landmarks`` of
    the chosen drawn by the same generator. ``val`` is a subset of ``chosen``."""
    if min_images < 1:
        raise ConfigError(f"gldv2 min_images must be at least 1, got {min_images}")
    if max_landmarks is not None and max_landmarks < 1:
        raise ConfigError(f"gldv2 max_landmarks must be null or at least 1, got {max_landmarks}")
    if val_landmarks < 0:
        raise ConfigError(f"gldv2 val_landmarks must be 0 or more, got {val_landmarks}")
    names, counts = np.unique(landmarks, return_counts=True)
    eligible = names[counts >= min_images]
    rng = np.random.default_rng(seed)
    chosen = eligible
    if max_landmarks is not None and len(eligible) > max_landmarks:
        chosen = np.sort(rng.choice(eligible, max_landmarks, replace=False))
    if val_landmarks >= len(chosen) and val_landmarks:
        raise ConfigError(
            f"gldv2 val_landmarks={val_landmarks} leaves no landmark to train on: only {len(chosen)} landmarks have "
            f"at least {min_images} images; lower val_landmarks or min_images"
        )
    val = np.sort(rng.choice(chosen, val_landmarks, replace=False)) if val_landmarks else chosen[:0]
    return chosen, val


def load_gldv2(
    root: str | Path,
    *,
    clean: bool = True,
    min_images: int = 1,
    max_landmarks: int | None = None,
    val_landmarks: int = 0,
    seed: int = 0,
) -> Collection:
    """GLDv2's training images as a :class:`Collection` (see the module docstring).

    ``root``: the ``gldv2`` folder or a data folder holding it. ``clean``: read ``train_clean.csv`` (else
    ``train.csv``). Only the images of the downloaded parts are taken when ``oxford-ir-data download`` placed
    them; then the subset rule of :func:`select_landmarks` picks the landmarks. Labels are the landmark ids.
    """
    root = Path(root).expanduser()
    folder = root / GLDV2_FOLDER if (root / GLDV2_FOLDER).is_dir() else root
    source = folder / (CLEAN_CSV if clean else FULL_CSV)
    if not source.is_file():
        raise DataError(
            f"gldv2: {source} not found; download it with `oxford-ir-data download gldv2 --root {folder.parent} "
            "--parts 0` (the CSVs and the first of the 500 image TARs)"
        )
    ids, landmarks, _ = (read_clean_csv if clean else read_full_csv)(source)
    present = downloaded_ids(folder)
    if present is not None:
        keep = np.isin(ids, present)
        log.info("gldv2: %d of the %d images of %s are in the downloaded parts", keep.sum(), len(ids), source.name)
        ids, landmarks = ids[keep], landmarks[keep]
    chosen, val = select_landmarks(
        landmarks, min_images=min_images, max_landmarks=max_landmarks, val_landmarks=val_landmarks, seed=seed
    )
    if not len(chosen):
        raise DataError(
            f"gldv2: no landmark of {source} has {min_images} images"
            + (" among the downloaded parts: download more parts" if present is not None else "")
            + " or lower min_images"
        )
    keep = np.isin(landmarks, chosen)
    ids, landmarks = ids[keep], landmarks[keep]
    split = np.where(np.isin(landmarks, val), "val", "train")
    return Collection.from_rows(
        "gldv2" if clean else "gldv2-full", folder, source, image_paths(ids), landmarks, split=split
    )


# -- the benchmark name -----------------------------------------------------------------------------

#: the options of a ``gldv2:...`` name: tag -> the :func:`load_gldv2` argument it sets with the number after it
NAME_OPTIONS = {"min": "min_images", "max": "max_landmarks", "val": "val_landmarks", "seed": "seed"}


def is_gldv2_name(name: object) -> bool:
    """Whether ``name`` names GLDv2 as a collection: ``gldv2``, or ``gldv2:`` followed by options."""
    return isinstance(name, str) and (name == GLDV2_FOLDER or name.startswith(f"{GLDV2_FOLDER}:"))


def gldv2_options(name: str) -> dict:
    """The :func:`load_gldv2` arguments of a name such as ``gldv2:min4:max1000:val50:seed0`` (at least 4 images a
    landmark, at most 1000 landmarks, 50 of them val, drawn with seed 0), ``full`` reading ``train.csv``. The
    options are separated by ``:`` and hold no ``=`` or ``,``: a Hydra override takes the name unquoted."""
    options: dict = {}
    for item in name.split(":")[1:]:
        match = re.fullmatch(r"(min|max|val|seed)(\d+)|(full|clean)", item.strip())
        key = None if match is None else NAME_OPTIONS[match[1]] if match[1] else "clean"
        if key is None or key in options:
            raise ConfigError(
                f"{name!r}: {item!r} is not an option (or is repeated); the options are min<N> (images a landmark at "
                "least), max<N> (landmarks at most), val<N> (landmarks held out for validation), seed<N>, full "
                "(train.csv instead of train_clean.csv), e.g. gldv2:min4:max1000:val50"
            )
        options[key] = int(match[2]) if match[1] else match[3] == "clean"
    return options
