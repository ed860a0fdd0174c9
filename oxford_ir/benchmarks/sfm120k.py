"""retrieval-SfM-120k (Radenovic et al., ECCV 2016): the training set of cnnimageretrieval-pytorch, as a
:class:`~oxford_ir.benchmarks.collection.Collection`.

117,369 Flickr images grouped by the 713 3D models (clusters) a structure-from-motion pipeline reconstructed from
them; 551 models train, 162 validate. The database is one pickle, ``retrieval-SfM-120k.pkl``, beside the image
folder ``ims/`` (the published layout, ``oxford-ir-data download sfm120k`` builds it)::

    data/retrieval-SfM-120k/          (or cnnimageretrieval-pytorch's <data_root>/train/retrieval-SfM-120k/)
      retrieval-SfM-120k.pkl          {'train': part, 'val': part}
      ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>      JPEGs, named by their cid, without an extension

Each part is a dict of four lists: ``cids`` (image ids; the published ones are 32 hex digits, e.g.
``29fdc243aeb939388cfdf2d081dc080e``), ``cluster`` (the 3D model of each image), ``qidxs`` (positions of the query
images in ``cids``) and ``pidxs`` (the positive of each query, parallel to ``qidxs``). An image's file is
:func:`cid2filename` under ``ims/``; a cid that is not a plain file name (a path separator, fewer than the 6
characters its folders are cut from, anything :func:`oxford_ir.fs.path_escape` refuses) is an error, so no row
leads outside ``ims/``. The check is on the text only: cnnimageretrieval-pytorch links ``retrieval-SfM-30k/ims`` to
this folder, and such a link is the user's own doing.

The collection (:func:`read_sfm120k`): the rows of ``train`` (split ``train``) then those of ``val`` (split
``val``), in the pickle's order; label = ``<part>/<cluster>`` (the two parts' cluster numbers never mix);
``is_query`` = the ``qidxs`` rows, every row in the gallery. Training therefore draws P clusters x K images, and
since every image of a cluster has the query's label, an image of the query's own 3D model is a positive of the
batch and never a negative: this is how the exclusion of the published tuple mining ("do not use the query's
cluster, those images are potentially positive") holds here. The ``qidxs``/``pidxs`` pairs are checked and kept
(:func:`read_sfm120k_pickle`) but P x K training does not need them: any two images of one 3D model are a positive
pair, a looser notion than the published pairs (chosen for their overlap in 3D), which is said where numbers are
compared. Evaluating the ``val`` part is what a collection benchmark does: each ``val`` query against every ``val``
image, positives = the images of its cluster, the query itself ignored.

cids are unique across the published parts (disjoint 3D models). A cid listed twice is kept as two rows (the query
indices point at positions), with a warning: twice in one part is one image counted twice, in both parts an image
trained on and evaluated on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from oxford_ir.benchmarks.collection import Collection
from oxford_ir.benchmarks.download import COMPLETE_MARKER, STATE_FILE, is_complete
from oxford_ir.benchmarks.gnd_pickle import load_pickle_safely
from oxford_ir.errors import DataError, GroundTruthError
from oxford_ir.fs import path_escape

log = logging.getLogger(__name__)

#: the dataset's name in the registry, the downloader and ``data=sfm120k``
NAME = "sfm120k"
#: its folder under the data folder, as published
FOLDER = "retrieval-SfM-120k"
PICKLE_NAME = "retrieval-SfM-120k.pkl"
IMAGE_FOLDER = "ims"
#: the pickle's parts, and the split each becomes
PARTS = {"train": "train", "val": "val"}
KEYS = ("cids", "cluster", "qidxs", "pidxs")
#: characters of a cid that :func:`cid2filename` cuts its three folders from
_CID_MIN_LENGTH = 6
_FIX = f"download it again with `oxford-ir-data download {NAME}`"


class SfmPart(NamedTuple):
    """One checked part of the pickle: ``cids`` and ``cluster`` (str arrays, one per image), ``qidxs`` and ``pidxs``
    (int64 positions into ``cids``, parallel)."""

    cids: np.ndarray
    cluster: np.ndarray
    qidxs: np.ndarray
    pidxs: np.ndarray


def cid2filename(cid: str) -> str:
    """The image file of ``cid`` relative to ``ims/``: ``<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``
    (cnnimageretrieval-pytorch's ``cid2filename``)."""
    return f"{cid[-2:]}/{cid[-4:-2]}/{cid[-6:-4]}/{cid}"


def sfm120k_dir(root: str | Path) -> Path:
    """The folder holding ``retrieval-SfM-120k.pkl``: ``root`` itself, ``root/retrieval-SfM-120k``, or
    cnnimageretrieval-pytorch's ``root/train/retrieval-SfM-120k``; a :class:`DataError` naming the fix otherwise."""
    root = Path(root).expanduser()
    candidates = [root, root / FOLDER, root / "train" / FOLDER]
    for folder in candidates:
        if (folder / PICKLE_NAME).is_file():
            return folder
    for folder in candidates:  # no pickle, but the folder of a started download: say so below
        if (folder / STATE_FILE).exists():
            return folder
    raise DataError(
        f"{NAME}: no {PICKLE_NAME} in {root}, {root / FOLDER} or {root / 'train' / FOLDER}; download it with "
        f"`oxford-ir-data download {NAME} --root {root}` (about 20 GB of images)"
    )


def read_sfm120k(root: str | Path) -> Collection:
    """retrieval-SfM-120k under ``root`` (see :func:`sfm120k_dir`) as a checked collection (module docstring).

    A folder the downloader has not finished is refused (as ``load_benchmark`` refuses one); a malformed pickle is
    a :class:`GroundTruthError` naming the file, the part and the key. Images are not opened here.
    """
    folder = sfm120k_dir(root)
    if (folder / STATE_FILE).exists() and not is_complete(folder):
        raise DataError(
            f"{NAME}: {folder} holds an unfinished download ({STATE_FILE}, no {COMPLETE_MARKER}: it was interrupted "
            f"or is still running); finish it with `oxford-ir-data download {NAME} --root {folder.parent}`, "
            "which resumes where it stopped"
        )
    path = folder / PICKLE_NAME
    parts = read_sfm120k_pickle(path)
    cids = np.concatenate([part.cids for part in parts.values()])
    _warn_repeats(path, parts)
    offsets = np.cumsum([0, *(len(part.cids) for part in parts.values())])
    is_query = np.zeros(len(cids), bool)
    for offset, part in zip(offsets, parts.values(), strict=False):
        is_query[offset + part.qidxs] = True
    return Collection.from_rows(
        NAME,
        folder / IMAGE_FOLDER,
        path,
        [cid2filename(cid) for cid in cids.tolist()],
        np.concatenate([np.char.add(f"{name}/", part.cluster) for name, part in parts.items()]),
        split=np.concatenate([np.full(len(part.cids), PARTS[name]) for name, part in parts.items()]),
        is_query=is_query,
    )


def read_sfm120k_pickle(path: str | Path) -> dict[str, SfmPart]:
    """The checked parts of ``retrieval-SfM-120k.pkl`` (read with the restricted unpickler: plain data only), in the
    order of :data:`PARTS`; every malformed thing is one :class:`GroundTruthError` naming the file, part and key."""
    path = Path(path)
    data = load_pickle_safely(path)
    if not isinstance(data, dict):
        raise GroundTruthError(
            f"{path}: expected a dict with parts {', '.join(map(repr, PARTS))}, got {type(data).__name__}; "
            f"this is not the retrieval-SfM-120k database, {_FIX}"
        )
    parts = {}
    for name in PARTS:
        if name not in data:
            raise GroundTruthError(f"{path}: no part {name!r} (the pickle has {sorted(map(str, data))}); {_FIX}")
        parts[name] = _part(data[name], path, name)
    return parts


def _part(part: Any, path: Path, name: str) -> SfmPart:
    where = f"{path}: part {name!r}"
    if not isinstance(part, dict):
        raise GroundTruthError(f"{where} must be a dict with keys {', '.join(KEYS)}, got {type(part).__name__}")
    missing = [key for key in KEYS if key not in part]
    if missing:
        raise GroundTruthError(f"{where} has no key {missing[0]!r} (it needs {', '.join(KEYS)}); {_FIX}")
    cids = _cids(part["cids"], where)
    cluster = _cluster(part["cluster"], where)
    if len(cluster) != len(cids):
        raise GroundTruthError(
            f"{where}: 'cluster' has {len(cluster)} entries for {len(cids)} 'cids' (one 3D model per image); {_FIX}"
        )
    qidxs = _indices(part["qidxs"], len(cids), f"{where} 'qidxs'")
    pidxs = _indices(part["pidxs"], len(cids), f"{where} 'pidxs'")
    if len(qidxs) != len(pidxs):
        raise GroundTruthError(
            f"{where}: 'qidxs' has {len(qidxs)} queries but 'pidxs' {len(pidxs)} positives (one per query); {_FIX}"
        )
    return SfmPart(cids, cluster, qidxs, pidxs)


def _sequence(values: Any, where: str, what: str) -> list:
    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise GroundTruthError(f"{where} must be a list of {what}, got {type(values).__name__}; {_FIX}")
    return list(values)


def _cids(values: Any, where: str) -> np.ndarray:
    cids = _sequence(values, f"{where} 'cids'", "image ids (strings)")
    for i, cid in enumerate(cids):
        if isinstance(cid, bytes):
            cid = cids[i] = cid.decode("latin-1")
        if not isinstance(cid, str):
            raise GroundTruthError(f"{where} 'cids'[{i}] is {cid!r}; 'cids' must list image ids (strings)")
        if len(cid) < _CID_MIN_LENGTH:
            why = f"has fewer than the {_CID_MIN_LENGTH} characters its folders are named from"
        elif any(c in cid for c in "/\\") or cid != cid.strip():
            why = "is not a plain file name (a path separator or surrounding spaces)"
        else:
            why = path_escape(cid2filename(cid))  # the project's one containment rule (a NUL byte, ...)
        if why is not None:
            raise GroundTruthError(
                f"{where} 'cids'[{i}] {cid!r} {why}; an image id names one file under {IMAGE_FOLDER}/ "
                "(e.g. 29fdc243aeb939388cfdf2d081dc080e)"
            )
    return np.asarray(cids, dtype=str) if cids else np.zeros(0, dtype="<U1")


def _cluster(values: Any, where: str) -> np.ndarray:
    clusters = _sequence(values, f"{where} 'cluster'", "3D model ids (one per image)")
    for i, value in enumerate(clusters):
        if isinstance(value, bool) or not isinstance(value, (int, str, np.integer, np.str_)):
            raise GroundTruthError(
                f"{where} 'cluster'[{i}] is {value!r}; 'cluster' must list the 3D model (an integer) of each image"
            )
    return np.asarray([str(value) for value in clusters], dtype=str) if clusters else np.zeros(0, dtype="<U1")


def _indices(values: Any, n: int, where: str) -> np.ndarray:
    items = _sequence(values, where, "positions in 'cids'")
    for i, value in enumerate(items):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise GroundTruthError(f"{where}[{i}] is {value!r}; expected integer positions in 'cids'")
    array = np.asarray(items, dtype=np.int64)
    bad = np.flatnonzero((array < 0) | (array >= n))
    if len(bad):
        raise GroundTruthError(
            f"{where}[{bad[0]}] = {array[bad[0]]} is out of range for the part's {n} 'cids'; the lists do not "
            f"belong together, {_FIX}"
        )
    return array


def _warn_repeats(path: Path, parts: dict[str, SfmPart]) -> None:
    """Warn about cids listed twice in a part, or in both (kept as rows: see the module docstring)."""
    for name, part in parts.items():
        unique, counts = np.unique(part.cids, return_counts=True)
        if (counts > 1).any():
            log.warning(
                "%s: %d image ids are listed more than once in part %r (e.g. %s); each listing is a row",
                path, int((counts > 1).sum()), name, unique[counts > 1][0],
            )  # fmt: skip
    shared = np.intersect1d(parts["train"].cids, parts["val"].cids)
    if len(shared):
        log.warning(
            "%s: %d images are in both 'train' and 'val' (e.g. %s): validation scores images trained on",
            path, len(shared), shared[0],
        )  # fmt: skip
