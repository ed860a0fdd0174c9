"""A CSV manifest that lists a collection, one image per row, read into a :class:`Collection`; parses are cached.

Columns (header row required, names case-insensitive, in any order; unknown columns are ignored)::

    path        required  image path relative to the manifest's folder (or the ``root`` given)
    label       required  class name (any text but empty; the same text = the same class)
    split       optional  train | val | test (Open Metric Learning's ``validation`` = val); default train
    is_query    optional  0/1, true/false, yes/no (any case); empty or absent = 1
    is_gallery  optional  same; empty or absent = 1
    x1 y1 x2 y2 optional  query box in pixels (OML's x_1 y_1 x_2 y_2 too); all four or none per row
    ignore      optional  images this row's query is not scored on (junk): paths of the same manifest, separated
                          by ``;`` (not spaces: file names may hold spaces)

A Parquet file (``.parquet``/``.pq``) with the same columns is read the same way when pyarrow is installed (the
``parquet`` extra; without it, one line says so); its "line" in messages is the 1-based row number + 1 (the header
being line 1), cells are read as text (booleans as true/false, missing values as empty). An Open Metric Learning
dataset CSV (``label, path, split, is_query, is_gallery``, optional ``x_1, x_2, y_1, y_2`` and ``category``) is read
unchanged. A UTF-8 byte order mark is accepted; quoted
fields (commas, line breaks) follow Python's csv module. Paths: a backslash is read as a folder separator
(``a\\b.jpg`` = ``a/b.jpg``: manifests written on Windows work everywhere; a posix file name holding a backslash
cannot be listed), ``./`` and doubled slashes are dropped; an absolute path is accepted only inside the root (then
made relative); ``..`` or any other way out of the root is refused (text only: ``oxford-ir-data check`` also follows
symbolic links).

Bad input is one :class:`DataError` naming the manifest and line (1-based, as an editor shows it): a missing
required column (with the accepted names), a row with the wrong number of fields, an empty label, a bad boolean,
split or box, a path leaving the root, the same path on two rows (naming both lines, and both labels when they
differ), an ``ignore`` entry the manifest does not list. ``strict=False`` (what ``check`` uses) collects every such
row problem instead, leaves those rows out and reads the rest. A class with a single image in the train split is a
warning naming it (the P x K sampler finds no positive for it), not an error.

Cache: a parse is saved as ``.<manifest name>.parsed.npz`` beside the manifest (or, where that folder cannot be
written, under ``cache_dir``, default ``$XDG_CACHE_HOME/oxford-ir/manifests``), keyed by the manifest's size,
mtime, the sha256 of its first and last MiB, the root and :data:`CACHE_VERSION`. It is written atomically and only
after a parse without a single problem; a stale or damaged cache is parsed again and replaced. Paths and label names
are stored as UTF-8 bytes (a quarter of numpy's in-memory size). Measured on the 2-core test machine under load: a
1.6M-row, 81k-class CSV parses in about 14 s (peak RSS 0.8 GB) and loads from its cache in under 1 s (0.3 GB).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import logging
import os
import posixpath
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from oxford_ir.benchmarks.collection import Collection
from oxford_ir.errors import DataError
from oxford_ir.fs import path_escape, replace_file

log = logging.getLogger(__name__)

#: bump when what a parse produces changes: older caches are then parsed again
CACHE_VERSION = 1
#: accepted names of each column (ours first, then Open Metric Learning's)
COLUMNS = {
    "path": ("path",),
    "label": ("label",),
    "split": ("split",),
    "is_query": ("is_query",),
    "is_gallery": ("is_gallery",),
    "x1": ("x1", "x_1"),
    "y1": ("y1", "y_1"),
    "x2": ("x2", "x_2"),
    "y2": ("y2", "y_2"),
    "ignore": ("ignore",),
}
BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
SPLIT_VALUES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
#: separator of the paths of an ``ignore`` cell
IGNORE_SEPARATOR = ";"
#: suffixes of Parquet files (read with pyarrow, the ``parquet`` extra)
PARQUET_SUFFIXES = (".parquet", ".pq")
#: bytes hashed at each end of the manifest for the cache key
KEY_BYTES = 1 << 20
_BOX = ("x1", "y1", "x2", "y2")
_NO_BOX = (float("nan"),) * 4


class ParsedManifest(NamedTuple):
    """A manifest read by :func:`load_manifest`: its collection, the line of each row, and (``strict=False``) the
    row problems found, each one line, whose rows were left out."""

    collection: Collection
    lines: np.ndarray
    problems: list[str]


class _Rows:
    """Columns being filled by :func:`_parse`; a row problem raises (strict) or is kept and the row dropped."""

    def __init__(self, manifest: Path, strict: bool) -> None:
        self.manifest, self.strict = manifest, strict
        self.paths: list[str] = []
        self.labels: list[str] = []
        self.splits: list[str] = []
        self.is_query: list[bool] = []
        self.is_gallery: list[bool] = []
        self.boxes: list[tuple[float, ...]] = []
        self.ignore: list[tuple[int, int, str]] = []  # (row, line, cell)
        self.lines: list[int] = []
        self.problems: list[str] = []

    def problem(self, line: int, what: str) -> None:
        message = f"{self.manifest} line {line}: {what}"
        if self.strict:
            raise DataError(message)
        self.problems.append(message)


def _header(manifest: Path, names: list[str]) -> dict[str, int]:
    """Column key -> field position, from the header row."""
    seen: dict[str, int] = {}
    for position, raw in enumerate(names):
        text = raw.strip().lower()
        if text in seen:
            raise DataError(f"{manifest} line 1: the column {raw.strip()!r} appears twice; keep one")
        seen[text] = position
    found: dict[str, int] = {}
    for key, aliases in COLUMNS.items():
        given = [a for a in aliases if a in seen]
        if len(given) > 1:
            raise DataError(f"{manifest} line 1: columns {' and '.join(given)} mean the same; keep one")
        if given:
            found[key] = seen[given[0]]
    missing = [key for key in ("path", "label") if key not in found]
    if missing:
        raise DataError(
            f"{manifest} line 1: no {' and no '.join(repr(k) for k in missing)} column; the header must name path "
            "and label (optional: split, is_query, is_gallery, x1 y1 x2 y2 or OML's x_1 y_1 x_2 y_2, ignore)"
        )
    boxes = [key for key in _BOX if key in found]
    if boxes and len(boxes) != 4:
        absent = [key for key in _BOX if key not in found]
        raise DataError(f"{manifest} line 1: a box needs x1, y1, x2, y2 (or x_1 ...); {', '.join(absent)} missing")
    return found


def _normal_path(text: str, root_prefixes: tuple[str, ...]) -> tuple[str, str | None]:
    """``(path relative to the root, why it is refused or None)``."""
    path = text.replace("\\", "/") if "\\" in text else text
    if path.startswith("/") or path[1:3] == ":/":
        inside = next((p for p in root_prefixes if path.startswith(p)), None)
        if inside is None:
            return path, "is an absolute path outside the root; give it relative to the manifest's folder"
        path = path[len(inside) :]
    why = path_escape(path)
    if why is None and ("//" in path or path.startswith("./") or "/./" in path or path.endswith("/.")):
        path = posixpath.normpath(path)
    return path, why


def _needs_care(path: str) -> bool:
    """Whether ``path`` needs :func:`_normal_path` (the common plain relative path does not)."""
    return (
        not path
        or path[0] in "/\\."
        or "\\" in path
        or ".." in path
        or "\0" in path
        or "//" in path
        or "/." in path
        or path[1:2] == ":"
    )


class _ParquetRows:
    """The rows of a Parquet table as the csv reader gives them (lists of text, header first, ``line_num``)."""

    def __init__(self, manifest: Path) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"{manifest}: reading a Parquet manifest needs pyarrow (pip install 'oxford-ir[parquet]'), or write "
                "the table as CSV"
            ) from None
        try:
            table = pq.read_table(manifest)
        except Exception as error:  # pyarrow's errors name no common base class
            raise DataError(f"{manifest}: not a readable Parquet file ({error}); write it again or as CSV") from None
        self.columns = [[_cell(v) for v in column.to_pylist()] for column in table.columns]
        self.names = [str(name) for name in table.column_names]
        self.num_rows = table.num_rows
        self.line_num = 0

    def __iter__(self) -> Iterator[list[str]]:
        return self

    def __next__(self) -> list[str]:
        if self.line_num > self.num_rows:
            raise StopIteration
        self.line_num += 1
        if self.line_num == 1:
            return self.names
        return [column[self.line_num - 2] for column in self.columns]


def _cell(value: Any) -> str:
    """A Parquet value as the text a CSV would hold."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse(manifest: Path, root: Path, strict: bool) -> tuple[_Rows, dict[int, np.ndarray]]:
    """Every row of ``manifest`` into columns, and the ignored rows of each query row."""
    if manifest.suffix.lower() in PARQUET_SUFFIXES:
        table = _ParquetRows(manifest)
        return _parse_rows(manifest, table, root, strict)
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            try:
                return _parse_rows(manifest, reader, root, strict)
            except csv.Error as error:
                raise DataError(f"{manifest} line {reader.line_num}: {error}; fix the CSV quoting") from None
    except UnicodeDecodeError:
        raise DataError(f"{manifest}: not UTF-8 text; save the manifest as UTF-8") from None
    except OSError as error:
        raise DataError(f"{manifest}: cannot read the manifest ({error.strerror})") from None


def _parse_rows(manifest: Path, reader: Iterator[list[str]], root: Path, strict: bool) -> tuple[_Rows, dict]:
    rows = _Rows(manifest, strict)
    names = next((fields for fields in reader if fields), None)
    if names is None:
        raise DataError(f"{manifest}: empty; the first line must name the columns (path, label, ...)")
    columns = _header(manifest, names)
    width = len(names)
    at = columns.get
    path_at, label_at, split_at = columns["path"], columns["label"], at("split")
    query_at, gallery_at, ignore_at = at("is_query"), at("is_gallery"), at("ignore")
    box_at = [columns[key] for key in _BOX] if "x1" in columns else None
    base = os.path.abspath(root)
    prefixes = tuple(dict.fromkeys(p.rstrip("/") + "/" for p in (base, os.path.realpath(base))))
    flag_columns = [(i, key, p) for i, (key, p) in enumerate((("is_query", query_at), ("is_gallery", gallery_at)))]
    flag_columns = [column for column in flag_columns if column[2] is not None]
    row_of: dict[str, int] = {}  # path -> row
    paths, labels, lines, splits = rows.paths, rows.labels, rows.lines, rows.splits
    last = reader.line_num  # type: ignore[attr-defined]
    for fields in reader:
        line, last = last + 1, reader.line_num  # type: ignore[attr-defined]
        if not fields:
            continue
        if len(fields) != width:
            rows.problem(line, f"{len(fields)} fields for the {width} columns of the header; quote fields with commas")
            continue
        path = fields[path_at]
        if _needs_care(path):
            path, why = _normal_path(path, prefixes)
            if why is not None:
                rows.problem(line, f"path {fields[path_at]!r} {why}")
                continue
        label = fields[label_at].strip()
        if not label:
            rows.problem(line, f"empty label for {path}; give every image its class")
            continue
        if split_at is not None:
            split = SPLIT_VALUES.get(fields[split_at].strip().lower())
            if split is None:
                rows.problem(line, f"split {fields[split_at]!r} is not train, val, validation or test")
                continue
        flags = [True, True]
        for i, key, position in flag_columns:
            cell = fields[position].strip().lower()
            if cell:
                flags[i] = BOOLEANS.get(cell)  # type: ignore[assignment]
                if flags[i] is None:
                    rows.problem(line, f"{key} {fields[position]!r} is not 0/1, true/false or yes/no")
                    break
        if None in flags:
            continue
        if box_at is not None:
            box = _box([fields[p].strip() for p in box_at])
            if box is None:
                cells = ", ".join(fields[p].strip() for p in box_at)
                rows.problem(line, f"box {cells} is not x1, y1, x2, y2 with 0 <= x1 < x2, 0 <= y1 < y2")
                continue
        other = row_of.setdefault(path, len(paths))
        if other != len(paths):
            if labels[other] != label:
                what = f"{path} is listed under two labels: {labels[other]!r} (line {lines[other]}) and {label!r}"
                rows.problem(line, what)
            else:
                rows.problem(line, f"{path} is listed twice (lines {lines[other]} and {line}); keep one row")
            continue
        if ignore_at is not None and fields[ignore_at].strip():
            rows.ignore.append((len(paths), line, fields[ignore_at]))
        paths.append(path)
        labels.append(label)
        lines.append(line)
        if split_at is not None:
            splits.append(split)
        if flag_columns:
            rows.is_query.append(flags[0])
            rows.is_gallery.append(flags[1])
        if box_at is not None:
            rows.boxes.append(box)
    ignore: dict[int, np.ndarray] = {}
    for row, line, cell in rows.ignore:
        ignored = []
        for name in filter(None, (n.strip() for n in cell.split(IGNORE_SEPARATOR))):
            path = _normal_path(name, prefixes)[0]
            if path not in row_of:
                rows.problem(line, f"ignore lists {name!r}, which no row of the manifest lists")
                continue
            ignored.append(row_of[path])
        ignore[row] = np.asarray(sorted(set(ignored)), dtype=np.int64)
    if not paths:
        raise DataError(f"{manifest}: no images listed (every row was refused or there are none)")
    return rows, ignore


def _box(cells: list[str]) -> tuple[float, ...] | None:
    """A box from its four cells (all empty: no box, NaN), None when it is not a box."""
    if not any(cells):
        return _NO_BOX
    try:
        x1, y1, x2, y2 = (float(c) for c in cells)
    except ValueError:
        return None
    return (x1, y1, x2, y2) if 0 <= x1 < x2 < np.inf and 0 <= y1 < y2 < np.inf else None


# -- cache -----------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Where parses go when the manifest's own folder cannot be written."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "oxford-ir" / "manifests"


def cache_key(manifest: Path, root: Path) -> str:
    """Size, mtime, sha256 of the first and last MiB of ``manifest``, the root, :data:`CACHE_VERSION`."""
    stat = manifest.stat()
    digest = hashlib.sha256()
    with open(manifest, "rb") as handle:
        digest.update(handle.read(KEY_BYTES))
        if stat.st_size > KEY_BYTES:
            handle.seek(max(KEY_BYTES, stat.st_size - KEY_BYTES))
            digest.update(handle.read(KEY_BYTES))
    return f"v{CACHE_VERSION}|{stat.st_size}|{stat.st_mtime_ns}|{digest.hexdigest()}|{os.path.abspath(root)}"


def cache_paths(manifest: Path, cache_dir: Path | None = None) -> tuple[Path, Path]:
    """``(beside the manifest, under the cache folder)``: where the parse of ``manifest`` is looked for."""
    beside = manifest.with_name(f".{manifest.name}.parsed.npz")
    tag = hashlib.sha256(os.path.abspath(manifest).encode()).hexdigest()[:16]
    return beside, (cache_dir or default_cache_dir()) / f"{tag}-{manifest.name}.parsed.npz"


def _encode(strings: np.ndarray) -> tuple[np.ndarray, bool]:
    """UTF-8 bytes of a str array (4x smaller on disk than numpy's UCS-4) and whether it is plain ASCII."""
    try:
        return strings.astype(np.bytes_), True
    except UnicodeEncodeError:
        return np.char.encode(strings, "utf-8"), False


def _decode(data: np.ndarray, ascii_only: bool) -> np.ndarray:
    if not len(data):
        return np.asarray([], dtype=str)
    return data.astype(np.str_) if ascii_only else np.char.decode(data, "utf-8")


def _save(collection: Collection, lines: np.ndarray, key: str, targets: tuple[Path, Path]) -> None:
    paths, paths_ascii = _encode(collection.paths)
    names, names_ascii = _encode(collection.label_names)
    queries = np.asarray(sorted(collection.ignore), dtype=np.int64)
    sizes = [len(collection.ignore[q]) for q in queries.tolist()]
    values = [collection.ignore[q] for q in queries.tolist()]
    buffer = io.BytesIO()
    np.savez(
        buffer,
        key=np.asarray(key),
        paths=paths,
        label_names=names,
        ascii=np.asarray([paths_ascii, names_ascii]),
        labels=collection.labels,
        split=collection.split,
        is_query=collection.is_query,
        is_gallery=collection.is_gallery,
        boxes=collection.boxes,
        lines=lines.astype(np.int64),
        ignore_rows=queries,
        ignore_offsets=np.cumsum([0, *sizes], dtype=np.int64),
        ignore_values=np.concatenate(values) if values else np.zeros(0, np.int64),
    )
    data = buffer.getvalue()
    for target in targets:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # a temp file of its own: ranks of a distributed run may parse the same manifest at once
            replace_file(target, data, temp=target.with_name(f"{target.name}.{os.getpid()}.tmp"))
            return
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                log.warning("%s: could not save the parsed manifest (%s); the next start parses again", target, error)
                return
    log.warning("%s: no writable place for the parsed manifest; the next start parses it again", targets[-1])


def _load(cached: Path, key: str, name: str, root: Path, manifest: Path) -> ParsedManifest | None:
    """The cached parse at ``cached`` when it exists and was made with ``key``; None otherwise."""
    try:
        with np.load(cached, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            paths_ascii, names_ascii = (bool(x) for x in npz["ascii"])
            offsets, values = npz["ignore_offsets"], npz["ignore_values"]
            ignore = {int(q): values[offsets[i] : offsets[i + 1]] for i, q in enumerate(npz["ignore_rows"].tolist())}
            collection = Collection(
                name=name,
                root=root,
                paths=_decode(npz["paths"], paths_ascii),
                labels=npz["labels"],
                label_names=_decode(npz["label_names"], names_ascii),
                split=npz["split"],
                is_query=npz["is_query"],
                is_gallery=npz["is_gallery"],
                boxes=npz["boxes"],
                source=manifest,
                ignore=ignore,
            ).validate()
            return ParsedManifest(collection, npz["lines"], [])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError, zipfile.BadZipFile, DataError) as error:
        log.info("%s: unreadable parsed manifest (%s); parsing the manifest again", cached, error)
        return None


def parse_manifest(manifest: Path, root: Path, name: str, strict: bool = True) -> ParsedManifest:
    """Parse ``manifest`` (no cache): see the module docstring."""
    rows, ignore = _parse(manifest, root, strict)
    collection = Collection.from_rows(
        name,
        root,
        manifest,
        rows.paths,
        rows.labels,
        split=rows.splits or None,
        is_query=rows.is_query or None,
        is_gallery=rows.is_gallery or None,
        boxes=np.asarray(rows.boxes, dtype=np.float32).reshape(-1, 4) if rows.boxes else None,
        ignore=ignore,
    )
    return ParsedManifest(collection, np.asarray(rows.lines, dtype=np.int64), rows.problems)


def load_manifest(
    manifest: str | Path,
    *,
    root: str | Path | None = None,
    name: str | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    strict: bool = True,
    warn: bool = True,
) -> ParsedManifest:
    """Read ``manifest`` (module docstring) with its rows' lines; from the cache when it is up to date. ``warn``:
    log the classes of a single training image (``check`` lists them itself)."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DataError(f"{manifest}: no such manifest file; give a CSV with a path and a label column")
    root = manifest.parent if root is None else Path(root)
    name = name or manifest.stem
    targets = cache_paths(manifest, None if cache_dir is None else Path(cache_dir))
    key = cache_key(manifest, root) if cache else ""
    parsed = None
    for cached in targets if cache else ():
        parsed = _load(cached, key, name, root, manifest)
        if parsed is not None:
            break
    if parsed is None:
        parsed = parse_manifest(manifest, root, name, strict)
        if cache and not parsed.problems:
            _save(parsed.collection, parsed.lines, key, targets)
    if warn:
        _warn_single_images(parsed)
    return parsed


def read_manifest(
    manifest: str | Path,
    *,
    root: str | Path | None = None,
    name: str | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> Collection:
    """The :class:`Collection` a CSV manifest lists (module docstring); a :class:`DataError` on the first bad row."""
    return load_manifest(manifest, root=root, name=name, cache=cache, cache_dir=cache_dir).collection


def _warn_single_images(parsed: ParsedManifest, shown: int = 5) -> None:
    """One warning naming the classes that have a single image in the train split (first ``shown`` of them)."""
    collection = parsed.collection
    train = collection.rows("train")
    sizes = collection.class_sizes(train)
    single = np.flatnonzero(sizes == 1)
    if not len(single):
        return
    rows = train[np.isin(collection.labels[train], single[:shown])]
    named = "; ".join(
        f"{str(collection.label_names[collection.labels[r]])!r} (line {parsed.lines[r]})" for r in rows.tolist()
    )
    more = f" and {len(single) - shown} more" if len(single) > shown else ""
    log.warning(
        "%s: %d class(es) have a single image in the train split: %s%s; training draws no positive for them: "
        "add images or move them to val/test",
        collection.source,
        len(single),
        named,
        more,
    )
