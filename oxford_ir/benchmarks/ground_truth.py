"""Readers for every published form of the Oxford / Paris ground truth.

Three forms circulate, and all of them end up as the same :class:`GroundTruth`:

- the original text files (``gt_files_170407/``): ``<landmark>_<n>_query.txt`` holds
  ``oxc1_<image> x1 y1 x2 y2`` (Paris files have no ``oxc1_`` prefix), and
  ``_good.txt`` / ``_ok.txt`` / ``_junk.txt`` list one image name a line;
- the ``gnd_<name>.pkl`` pickles of the Revisited Oxford/Paris code, for both the
  original (``ok``/``junk``) and the revisited (``easy``/``hard``/``junk``) protocol;
- the per-landmark JSON of the original project,
  ``{landmark: {"good": [...], "ok": [...], "junk": [...], "query": [...]}}``.

Pickles are opened with :class:`RestrictedUnpickler`, which builds plain containers,
numbers, strings and numpy arrays only: a downloaded ``.pkl`` is otherwise a program.
Every problem with a file raises one :class:`GroundTruthError` naming the file and where in it: the line
(``all_souls_1_good.txt:3: 'x y': ...``) of a text file, the key and position (``landmark 'tower' 'good'[2]``,
``'qimlist'[4]``) of a JSON file or pickle, and what is expected there.

Every image the ground truth names (query or positive) must be in the dataset's image list (``imlist.txt``, the
``jpg/`` folder, or the pickle's own ``imlist``; a revisited pickle's queries are the exception: its database
leaves them out). A name outside that list is an error of the ground truth, not a missing download: it is never
reported as a file to download, nor dropped with the missing images of a subset. Names are file names without
extension; one with a path separator or ``..`` is refused, so no name can point outside the image folder.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import pickle
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oxford_ir.errors import DataError, GroundTruthError, UnsafePickleError
from oxford_ir.images import IMAGE_EXTENSIONS

#: the protocol's index keys, positives first (same as ``benchmark.INDEX_KEYS``)
PROTOCOL_KEYS = {"original": ("ok", "junk"), "revisited": ("easy", "hard", "junk")}
POSITIVE_KEYS = {"original": ("ok",), "revisited": ("easy", "hard")}

#: folder names under which the original text files are published
GT_TEXT_FOLDERS = ("gt_files_170407", "gt_files")
#: the per-landmark JSON of the original project
GT_JSON_NAME = "groundtruth.json"
IMLIST_NAME = "imlist.txt"
IMAGE_FOLDER = "jpg"

#: stems of the datasets' catch-all photo names (oxford_002985, paris_general_002985): they name no landmark
GENERIC_STEMS = frozenset({"oxford", "general"})
#: queries whose positive sets have at least this Jaccard overlap belong to one landmark (see derive_query_landmarks)
LANDMARK_MIN_JACCARD = 0.25

_QUERY_FILE = re.compile(r"^(?P<landmark>.+)_(?P<n>\d+)_query\.txt$")
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


# -- the restricted unpickler -------------------------------------------------------------------

#: globals a pickle of plain data may reference; numpy ones are resolved to the installed numpy's objects
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    # arrays (protocols 0-4) and numpy scalars; numpy < 2 wrote numpy.core, numpy >= 2 writes numpy._core
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("multiarray", "scalar"),
    # contiguous arrays pickled with protocol 5
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
}
#: plain-data builtins that pickles reference by name (protocols < 4 for sets, < 3 for bytes)
_BUILTIN_GLOBALS = {
    (module, name) for module in ("builtins", "__builtin__") for name in ("set", "frozenset", "complex", "bytearray")
} | {("_codecs", "encode")}


def _numpy_object(where: str, name: str) -> Any:
    if where == "numpy":
        return getattr(np, name)
    # numpy >= 2 keeps these in numpy._core (numpy.core is a deprecated alias); numpy < 2 in numpy.core
    packages = ("numpy._core", "numpy.core") if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else ("numpy.core",)
    for package in packages:
        try:
            return getattr(importlib.import_module(f"{package}.{where}"), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"numpy has no {where}.{name}")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds plain data only: containers, numbers, strings, bytes, numpy arrays and scalars.

    Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, a class of
    some package...) raises :class:`UnsafePickleError` when the pickle asks for it, before
    anything is called. Allowed: the numpy functions that rebuild ``ndarray``/``dtype``/scalars
    (``_reconstruct``, ``scalar``, ``_frombuffer``, under ``numpy.core`` or ``numpy._core``),
    ``set``/``frozenset``/``complex``/``bytearray``, and ``_codecs.encode``,
    which protocols 0-2 use for bytes.
    """

    def __init__(self, file: io.BufferedIOBase, source: Path | str, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.source = Path(source)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return _numpy_object(*_NUMPY_GLOBALS[module, name])
        if (module, name) in _BUILTIN_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source}: refused to load: the pickle asks for {module}.{name}, which is not plain data "
            "(only containers, numbers, strings and numpy arrays are allowed); nothing was executed. "
            "Ground truth must be a plain pickle; re-download the file from a trusted source"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refused to load: the pickle uses persistent id {pid!r}")


def load_pickle_safely(path: str | Path) -> Any:
    """Load a pickle of plain data with :class:`RestrictedUnpickler`; Python 2 pickles decode as latin-1.

    A refused global raises :class:`UnsafePickleError`; a missing, truncated or corrupt
    file raises :class:`GroundTruthError`; both name the file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    try:
        # latin-1 maps Python 2 str (numpy array buffers included) byte for byte; Python 3 pickles ignore it
        return RestrictedUnpickler(io.BytesIO(raw), path, encoding="latin1").load()
    except UnsafePickleError:
        raise
    except EOFError:
        raise GroundTruthError(
            f"{path}: the pickle is truncated ({len(raw)} bytes); the download was probably interrupted, "
            "download it again"
        ) from None
    except Exception as error:  # anything else a malformed stream raises inside the unpickler
        raise GroundTruthError(
            f"{path}: not a readable pickle ({type(error).__name__}: {error}); the file is corrupt or not a "
            "ground-truth pickle, download it again"
        ) from None


# -- pickles --------------------------------------------------------------------------------------


def read_gnd_pickle(path: str | Path) -> GroundTruth:
    """Read a ``gnd_<name>.pkl`` (keys ``imlist``, ``qimlist``, ``gnd``) of either protocol.

    The protocol is told by the entries' keys (``easy``/``hard`` or ``ok``). Index lists
    become sorted unique ``np.int64`` arrays, ``bbx`` four floats (None where absent).
    Query landmarks are not stored in the pickle; they are derived with
    :func:`derive_query_landmarks`.
    """
    path = Path(path)
    data = load_pickle_safely(path)
    if not isinstance(data, dict):
        raise GroundTruthError(
            f"{path}: expected a dict with keys 'imlist', 'qimlist', 'gnd', got {type(data).__name__}"
        )
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in data]
    if missing:
        raise GroundTruthError(
            f"{path}: missing key(s) {missing}; a ground-truth pickle has 'imlist', 'qimlist' and 'gnd' "
            f"(found {sorted(map(str, data))})"
        )
    imlist = _name_list(data["imlist"], path, "imlist")
    qimlist = _name_list(data["qimlist"], path, "qimlist")
    repeated = _first_repeat(imlist)
    if repeated is not None:
        raise GroundTruthError(
            f"{path}: 'imlist'[{repeated[1]}] = {imlist[repeated[1]]!r} repeats 'imlist'[{repeated[0]}]; every "
            "database image is listed once (the file is corrupt or was edited)"
        )
    entries = data["gnd"]
    if not isinstance(entries, (list, tuple)) or not all(isinstance(e, dict) for e in entries):
        raise GroundTruthError(f"{path}: 'gnd' must be a list of dicts, one per query")
    if len(entries) != len(qimlist):
        raise GroundTruthError(f"{path}: {len(qimlist)} names in 'qimlist' but {len(entries)} entries in 'gnd'")
    if not entries:
        raise GroundTruthError(f"{path}: the ground truth has no queries")
    revisited = ["easy" in e or "hard" in e for e in entries]
    if all(revisited):
        protocol = "revisited"
    elif not any(revisited) and all("ok" in e for e in entries):
        protocol = "original"
    else:
        bad = next(q for q, e in enumerate(entries) if revisited[q] != revisited[0] or "ok" not in e)
        raise GroundTruthError(
            f"{path}: every 'gnd' entry needs either 'ok' (original protocol) or 'easy' and 'hard' "
            f"(revisited protocol), all entries the same; query {bad} ({qimlist[bad]!r}) has "
            f"{sorted(map(str, entries[bad]))}, query 0 has {sorted(map(str, entries[0]))}"
        )
    if protocol == "original":  # queries are database images (the revisited database leaves them out)
        known = set(imlist)
        for q, name in enumerate(qimlist):
            if name not in known:
                raise GroundTruthError(
                    f"{path}: 'qimlist'[{q}] = {name!r} is not in the pickle's 'imlist' ({len(imlist)} names); in the "
                    "original protocol every query is a database image: the file is corrupt or its lists do not "
                    "belong together"
                )
    gnd = []
    for q, entry in enumerate(entries):
        where = f"query {q} ({qimlist[q]!r})"
        new = {"bbx": _bbox(entry.get("bbx"), path, where)}
        for key in PROTOCOL_KEYS[protocol]:
            if key not in entry and key != "junk":
                raise GroundTruthError(f"{path}: {where} has no {key!r} list; {protocol} ground truth needs it")
            new[key] = _index_array(entry.get(key, ()), len(imlist), path, f"{where} {key!r}")
        gnd.append(new)
    return GroundTruth(
        protocol=protocol,
        imlist=imlist,
        qimlist=qimlist,
        gnd=gnd,
        query_landmarks=derive_query_landmarks(qimlist, gnd, protocol),
        source=path,
    )


def derive_query_landmarks(
    qimlist: Sequence[str], gnd: Sequence[dict], protocol: str, min_jaccard: float = LANDMARK_MIN_JACCARD
) -> list[str]:
    """Landmark of each query of a pickle, which does not store it.

    Queries of one landmark share (nearly) all their positives (``ok``, or ``easy`` +
    ``hard``), so two queries are linked when the Jaccard overlap of their positive sets
    is at least ``min_jaccard``, and landmarks are the connected components. Any shared
    positive is not enough: in Oxford5k, all_souls and radcliffe_camera share positives
    (Jaccard 0.003); across the four published pickles, different landmarks overlap by at
    most 0.045, while linked queries of one landmark overlap by 0.47 or more.
    Each component is named after the most common name stem of its query images
    (``all_souls_000013`` -> ``all_souls``, ``paris_defense_000605`` -> ``defense``),
    ignoring the catch-all stems ``oxford`` and ``general``; components with the same
    name are one landmark (Revisited Oxford's balliol_000187 shares no positive with
    the other balliol queries); a component with no landmark stem is named after its
    first query.
    """
    keys = POSITIVE_KEYS[protocol]
    n = len(qimlist)
    if n == 0:
        return []
    positives = [np.unique(np.concatenate([np.asarray(e.get(k, ()), dtype=np.int64) for k in keys])) for e in gnd]
    width = max((int(p.max()) + 1 for p in positives if p.size), default=0)
    members = np.zeros((n, width), dtype=np.float64)
    for q, p in enumerate(positives):
        members[q, p] = 1.0
    inter = members @ members.T
    sizes = members.sum(axis=1)
    union = sizes[:, None] + sizes[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        jaccard = np.where(union > 0, inter / union, 0.0)

    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(*np.nonzero(np.triu(jaccard >= min_jaccard, k=1)), strict=True):
        parent[root(int(a))] = root(int(b))
    components: dict[int, list[int]] = {}
    for q in range(n):
        components.setdefault(root(q), []).append(q)
    labels = [""] * n
    for queries in components.values():
        stems = Counter(s for s in (name_stem(qimlist[q]) for q in queries) if s not in GENERIC_STEMS)
        label = stems.most_common(1)[0][0] if stems else qimlist[queries[0]]
        for q in queries:
            labels[q] = label
    return labels


def name_stem(name: str) -> str:
    """Landmark part of an image name: ``all_souls_000013`` -> ``all_souls``, ``paris_eiffel_000266`` -> ``eiffel``."""
    stem = re.sub(r"_\d+$", "", name)
    return stem[len("paris_") :] if stem.startswith("paris_") and len(stem) > len("paris_") else stem


# -- text files -------------------------------------------------------------------------------------


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
    index = _name_index(imlist)
    qimlist, gnd, landmarks = [], [], []
    for landmark, _, n_text in queries:
        prefix = folder / f"{landmark}_{n_text}"
        query_file = Path(f"{prefix}_query.txt")
        name, bbx = _parse_query_file(query_file, index, imlist_source)
        lists = {}
        for kind in ("good", "ok", "junk"):
            list_file = Path(f"{prefix}_{kind}.txt")
            lists[kind] = _lookup_lines(_read_name_lines(list_file), index, list_file, imlist_source)
        qimlist.append(name)
        landmarks.append(landmark)
        gnd.append({"bbx": bbx, "ok": np.union1d(lists["good"], lists["ok"]), "junk": lists["junk"]})
    return GroundTruth("original", list(imlist), qimlist, gnd, landmarks, folder)


def _parse_query_file(path: Path, index: dict[str, int], imlist_source: str | Path) -> tuple[str, list[float]]:
    """The query image and box of a ``_query.txt``: one line ``<image> x1 y1 x2 y2``, the image in the list."""
    lines = _numbered_lines(path)
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
    name = _checked_name(fields[0], f"{path}:{number}: {line!r}")
    if name not in index:
        raise GroundTruthError(
            f"{path}:{number}: query image {name!r} is not in {imlist_source} ({len(index)} names): a query must be "
            "one of the dataset's images. The ground truth belongs to another dataset, or its line was edited; "
            "this is not a missing download"
        )
    return name, _bbox(fields[1:], path, f"line {number} {line!r}: query {fields[0]!r}")


def _read_name_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, image name)`` of a list file: one name per non-empty line."""
    names = []
    for number, line in _numbered_lines(path):
        if len(line.split()) != 1:
            raise GroundTruthError(
                f"{path}:{number}: {line!r} is not an image name; the file lists one name per line "
                "(e.g. all_souls_000013)"
            )
        names.append((number, _checked_name(line, f"{path}:{number}: {line!r}")))
    return names


# -- landmark JSON ----------------------------------------------------------------------------------


def read_landmark_json(
    path: str | Path, imlist: Sequence[str], imlist_source: str | Path = "the image list"
) -> GroundTruth:
    """Read the per-landmark JSON ``{landmark: {"good", "ok", "junk", "query"}}`` against ``imlist``.

    Names may carry an extension (``all_souls_000013.jpg``). Each landmark contributes
    one query per ``query`` entry, all sharing that landmark's positives (good + ok)
    and junk. Landmarks are taken in sorted order, queries in listed order, which
    reproduces the order of the text files and pickles.

    A query entry is an image name, ``"<image> x1 y1 x2 y2"``, or
    ``{"name": <image>, "bbx": [x1, y1, x2, y2]}``. The published ``groundtruth.json``
    lists bare names: its queries then have ``bbx = None`` and are used whole, which
    is not the published protocol (queries cropped to their boxes); prefer the text
    files or the pickle when present.
    """
    path = Path(path)
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise GroundTruthError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    if not isinstance(data, dict) or not data:
        raise GroundTruthError(
            f"{path}: expected an object {{landmark: {{'good', 'ok', 'junk', 'query'}}}}, got "
            f"{'an empty object' if isinstance(data, dict) else type(data).__name__}"
        )
    index = _name_index(imlist)
    qimlist, gnd, landmarks = [], [], []
    for landmark in sorted(data):
        lists = data[landmark]
        where = f"landmark {landmark!r}"
        if not isinstance(lists, dict):
            raise GroundTruthError(
                f"{path}: {where} is a {type(lists).__name__}, expected an object with 'good', 'ok', 'junk' and "
                "'query' lists; is this a per-landmark ground-truth file?"
            )
        for key in ("good", "ok", "junk", "query"):
            if not isinstance(lists.get(key), list):
                problem = "has no" if key not in lists else "has a non-list"
                raise GroundTruthError(f"{path}: {where} {problem} {key!r} list (keys: {sorted(lists)})")
        names = {}
        for key in ("good", "ok", "junk"):
            names[key] = []
            for i, value in enumerate(lists[key]):
                at = f"{path}: {where} {key!r}[{i}]"
                if not isinstance(value, str):
                    raise GroundTruthError(f"{at} is {value!r}; {key!r} must list image names (strings)")
                names[key].append((f"{where} {key!r}[{i}]", _checked_name(value, f"{at} {value!r}")))
        ok = _lookup_lines(names["good"] + names["ok"], index, path, imlist_source)
        junk = _lookup_lines(names["junk"], index, path, imlist_source)
        if not lists["query"]:
            raise GroundTruthError(f"{path}: {where} has an empty 'query' list")
        for i, entry in enumerate(lists["query"]):
            name, bbx = _json_query(entry, path, f"{where} 'query'[{i}]")
            if name not in index:
                raise GroundTruthError(
                    f"{path}: {where} 'query'[{i}] names image {name!r}, which is not in {imlist_source} "
                    f"({len(index)} names): a query must be one of the dataset's images; this is not a missing "
                    "download"
                )
            qimlist.append(name)
            landmarks.append(landmark)
            gnd.append({"bbx": bbx, "ok": ok.copy(), "junk": junk.copy()})
    return GroundTruth("original", list(imlist), qimlist, gnd, landmarks, path)


def _json_query(entry: Any, path: Path, where: str) -> tuple[str, list[float] | None]:
    if isinstance(entry, str):
        fields = entry.split()
        if len(fields) == 1:
            return _checked_name(fields[0], f"{path}: {where} {entry!r}"), None
        if len(fields) == 5:
            name = _checked_name(fields[0], f"{path}: {where} {entry!r}")
            return name, _bbox(fields[1:], path, f"{where} query {fields[0]!r}")
    elif isinstance(entry, dict):
        name = entry.get("name", entry.get("image"))
        if isinstance(name, str):
            box = entry.get("bbx", entry.get("bbox"))
            return _checked_name(name, f"{path}: {where} {name!r}"), _bbox(box, path, f"{where} query {name!r}")
    raise GroundTruthError(
        f"{path}: {where} query entry {entry!r} is not '<image>', '<image> x1 y1 x2 y2' or "
        "{'name': <image>, 'bbx': [x1, y1, x2, y2]}"
    )


# -- image lists and dispatch -------------------------------------------------------------------------


def read_image_list(dataset_dir: str | Path) -> tuple[list[str], Path]:
    """Database image names of a dataset folder and where they came from.

    ``imlist.txt`` when present (the published order), else the sorted names of the
    images in ``jpg/``. Raises :class:`DataError` when there is neither.
    """
    dataset_dir = Path(dataset_dir)
    listing = dataset_dir / IMLIST_NAME
    if listing.is_file():
        lines = _read_name_lines(listing)
        if not lines:
            raise GroundTruthError(f"{listing}: the image list is empty; it lists one image name per line")
        first: dict[str, int] = {}
        for number, name in lines:
            if name in first:
                raise GroundTruthError(
                    f"{listing}:{number}: {name!r} is listed again (first on line {first[name]}); every image is "
                    "listed once"
                )
            first[name] = number
        return [name for _, name in lines], listing
    image_dir = dataset_dir / IMAGE_FOLDER
    names = (
        sorted({p.stem for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS})
        if image_dir.is_dir()
        else []
    )
    if not names:
        raise DataError(
            f"{dataset_dir}: no {IMLIST_NAME} and no images in {image_dir}; the text and JSON ground truth need "
            "the image list. Download the dataset (oxford-ir-data download <dataset> --root <data dir>)"
        )
    return names, image_dir


def read_ground_truth(path: str | Path, dataset_dir: str | Path | None = None) -> GroundTruth:
    """Read any form by its shape: a ``.pkl``, a ``.json``, or a folder of gt text files.

    Text and JSON ground truth index into the image list of ``dataset_dir`` (default:
    the folder holding ``path``), see :func:`read_image_list`.
    """
    path = Path(path)
    if not path.exists():
        raise GroundTruthError(f"{path}: ground-truth file not found")
    if path.is_file() and path.suffix.lower() == ".pkl":
        return read_gnd_pickle(path)
    if (path.is_file() and path.suffix.lower() == ".json") or path.is_dir():
        imlist, source = read_image_list(dataset_dir if dataset_dir is not None else path.parent)
        if path.is_dir():
            return read_gt_files(path, imlist, source)
        return read_landmark_json(path, imlist, source)
    raise GroundTruthError(
        f"{path}: unknown ground-truth form; give a gnd_<name>.pkl, a per-landmark .json or a folder of gt text files"
    )


# -- helpers ------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GroundTruthError(f"{path}: ground-truth file not found") from None
    except OSError as error:
        raise GroundTruthError(f"{path}: cannot read the file ({error.strerror or error})") from None


def _read_text(path: Path) -> str:
    try:
        return _read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise GroundTruthError(f"{path}: not a UTF-8 text file (byte {error.start}); the file is corrupt") from None


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of every non-empty line."""
    lines = [(number, line.strip()) for number, line in enumerate(_read_text(path).splitlines(), start=1)]
    return [(number, line) for number, line in lines if line]


def _clean_name(name: str) -> str:
    """Image name without the ``oxc1_`` prefix of the Oxford query files and without an image extension."""
    name = name.strip()
    if name.startswith(_QUERY_PREFIX):
        name = name[len(_QUERY_PREFIX) :]
    stem, dot, ext = name.rpartition(".")
    return stem if dot and f".{ext.lower()}" in IMAGE_EXTENSIONS else name


def _checked_name(text: str, where: str) -> str:
    """``text`` as an image name (prefix and extension removed); ``where`` names the place for the error."""
    name = _clean_name(text)
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise GroundTruthError(
            f"{where}: not an image name; expected a file name without folders (e.g. all_souls_000013)"
        )
    return name


def _name_list(values: Any, path: Path, key: str) -> list[str]:
    if isinstance(values, np.ndarray):
        values = values.reshape(-1).tolist()
    if not isinstance(values, (list, tuple)):
        raise GroundTruthError(f"{path}: {key!r} must be a list of image names, got {type(values).__name__}")
    names = []
    for i, value in enumerate(values):
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if not isinstance(value, str):
            raise GroundTruthError(f"{path}: {key!r}[{i}] is {value!r}; {key!r} must list image names (strings)")
        names.append(_checked_name(value, f"{path}: {key!r}[{i}] {value!r}"))
    return names


def _first_repeat(names: Sequence[str]) -> tuple[int, int] | None:
    """``(first, second)`` positions of the first name listed twice, or None."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            return seen[name], i
        seen[name] = i
    return None


def _name_index(imlist: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(imlist):
        index.setdefault(name, i)
    return index


def _lookup_lines(
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


def _index_array(values: Any, n_db: int, path: Path, where: str) -> np.ndarray:
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


def _bbox(value: Any, path: Path, where: str) -> list[float] | None:
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
