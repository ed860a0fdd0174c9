"""The ``gnd_<name>.pkl`` pickles of the Revisited Oxford/Paris code, for both the original (``ok``/``junk``) and the
revisited (``easy``/``hard``/``junk``) protocol, and the restricted unpickler that opens them.

Pickles are opened with :class:`RestrictedUnpickler`, which builds plain containers, numbers, strings and numpy
arrays only: a downloaded ``.pkl`` is otherwise a program. A pickle does not store the landmark of each query:
:func:`derive_query_landmarks` finds them from the positives.
"""

from __future__ import annotations

import importlib
import io
import pickle
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oxford_ir.benchmarks.gt_record import (
    POSITIVE_KEYS,
    PROTOCOL_KEYS,
    GroundTruth,
    checked_box,
    checked_name,
    index_array,
    read_bytes,
)
from oxford_ir.errors import GroundTruthError, UnsafePickleError

#: stems of the datasets' catch-all photo names (oxford_002985, paris_general_002985): they name no landmark
GENERIC_STEMS = frozenset({"oxford", "general"})
#: queries whose positive sets have at least this Jaccard overlap belong to one landmark (see derive_query_landmarks)
LANDMARK_MIN_JACCARD = 0.25


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
    raw = read_bytes(path)
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
        new = {"bbx": checked_box(entry.get("bbx"), path, where)}
        for key in PROTOCOL_KEYS[protocol]:
            if key not in entry and key != "junk":
                raise GroundTruthError(f"{path}: {where} has no {key!r} list; {protocol} ground truth needs it")
            new[key] = index_array(entry.get(key, ()), len(imlist), path, f"{where} {key!r}")
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
        names.append(checked_name(value, f"{path}: {key!r}[{i}] {value!r}"))
    return names


def _first_repeat(names: Sequence[str]) -> tuple[int, int] | None:
    """``(first, second)`` positions of the first name listed twice, or None."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            return seen[name], i
        seen[name] = i
    return None
