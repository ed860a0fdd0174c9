"""A retrieval benchmark: database image list, queries with boxes, ground truth, evaluation.

One object for all published forms (gt text files, gnd pickles, landmark JSON) so
that extraction, training and evaluation never care where the ground truth came
from. Indices in ``gnd`` point into ``imlist``; names carry no extension.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from oxford_ir.benchmarks.metrics import DEFAULT_KAPPAS, evaluate_ranks
from oxford_ir.errors import DataError, GroundTruthError

PROTOCOLS = ("original", "revisited")
#: ground-truth keys holding database indices, per protocol
INDEX_KEYS = {"original": ("ok", "junk"), "revisited": ("easy", "hard", "junk")}
#: the keys that count as positives when deciding whether a query can be evaluated
POSITIVE_KEYS = {"original": ("ok",), "revisited": ("easy", "hard")}


@dataclass(frozen=True)
class Benchmark:
    """Image lists, per-query ground truth and the protocol to evaluate them with.

    ``gnd[i]`` has ``bbx`` ([x1, y1, x2, y2] in original-image pixels) and index
    arrays ``ok``/``junk`` (original protocol) or ``easy``/``hard``/``junk``
    (revisited protocol). ``is_subset`` is true when the benchmark was restricted
    to the images present on disk; its numbers are then not comparable with
    published ones.
    """

    name: str
    root: Path
    protocol: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]
    source: Path
    image_dir: Path
    extension: str = ".jpg"
    is_subset: bool = False
    subset_note: str = ""
    #: landmark of each query (parallel to ``qimlist``); used for landmark-disjoint splits
    query_landmarks: list[str] = field(default_factory=list)
    #: metrics reported besides the protocol's mAP and mP@k (:data:`~oxford_ir.benchmarks.metrics.EXTRA_METRICS`:
    #: ``("recall",)`` adds ``R@k``); none for Oxford and Paris, whose tables stay the published ones
    extra_metrics: tuple[str, ...] = ()
    #: the dataset folder name its image caches are kept under (benchmarks of one dataset share them); "" for
    #: the registry's folder of ``name``
    dataset: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise GroundTruthError(f"{self.source}: unknown protocol {self.protocol!r}; expected one of {PROTOCOLS}")

    # -- paths -------------------------------------------------------------------------------
    def image_path(self, name: str) -> Path:
        """Path of the image called ``name`` (no extension)."""
        return self.image_dir / f"{name}{self.extension}"

    @property
    def db_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.imlist]

    @property
    def query_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.qimlist]

    @property
    def query_bboxes(self) -> list[tuple[float, float, float, float] | None]:
        return [None if g.get("bbx") is None else tuple(float(v) for v in g["bbx"]) for g in self.gnd]

    @property
    def n_db(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    def positives(self, query: int) -> np.ndarray:
        """Database indices of every positive of ``query`` (ok, or easy + hard)."""
        entry = self.gnd[query]
        keys = POSITIVE_KEYS[self.protocol]
        return np.unique(np.concatenate([np.asarray(entry.get(k, ()), dtype=np.int64) for k in keys]))

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, ranks: np.ndarray, kappas: Sequence[int] = DEFAULT_KAPPAS) -> dict[str, float]:
        """Flat dict of metrics for ``ranks`` (n_db x n_queries, best first)."""
        return self.evaluate_detailed(ranks, kappas)[0]

    def evaluate_detailed(
        self,
        ranks: np.ndarray,
        kappas: Sequence[int] = DEFAULT_KAPPAS,
        distractors_above: np.ndarray | None = None,
    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Metrics (and :attr:`extra_metrics`) and per-query AP arrays (``AP`` or ``E/AP``, ``M/AP``, ``H/AP``);
        ``distractors_above`` (n_db x n_queries): distractors ranked before each database image
        (:mod:`~oxford_ir.benchmarks.metrics`)."""
        ranks = np.asarray(ranks)
        if ranks.ndim != 2 or ranks.shape[1] != self.n_queries:
            raise ValueError(
                f"{self.name}: ranks must have shape (n_db, {self.n_queries}) with one column per query, "
                f"got {ranks.shape}"
            )
        if ranks.size and (ranks.min() < 0 or ranks.max() >= self.n_db):
            raise ValueError(f"{self.name}: ranks hold indices outside the database of {self.n_db} images")
        if distractors_above is not None and np.shape(distractors_above) != (self.n_db, self.n_queries):
            raise ValueError(
                f"{self.name}: distractors_above must have shape ({self.n_db}, {self.n_queries}), "
                f"got {np.shape(distractors_above)}"
            )
        return evaluate_ranks(ranks, self.gnd, self.protocol, kappas, self.extra_metrics, distractors_above)

    # -- consistency -------------------------------------------------------------------------
    def validate(self) -> Benchmark:
        """Check that every ground-truth index lies inside ``imlist``; raise naming the file otherwise."""
        if len(self.gnd) != len(self.qimlist):
            raise GroundTruthError(
                f"{self.source}: {len(self.qimlist)} query names but {len(self.gnd)} ground-truth entries"
            )
        for q, entry in enumerate(self.gnd):
            for key in INDEX_KEYS[self.protocol]:
                if key not in entry and key != "junk":
                    raise GroundTruthError(
                        f"{self.source}: query {q} ({self.qimlist[q]!r}) has no {key!r} list; "
                        f"{self.protocol} ground truth needs {INDEX_KEYS[self.protocol]}"
                    )
                values = np.asarray(entry.get(key, ()), dtype=np.int64)
                if values.size and (values.min() < 0 or values.max() >= self.n_db):
                    bad = int(values[(values < 0) | (values >= self.n_db)][0])
                    raise GroundTruthError(
                        f"{self.source}: query {q} ({self.qimlist[q]!r}) {key!r} index {bad} is out of range "
                        f"for an image list of {self.n_db} images; the ground truth and image list do not match"
                    )
            bbx = entry.get("bbx")
            if bbx is not None and len(bbx) != 4:
                raise GroundTruthError(f"{self.source}: query {q} ({self.qimlist[q]!r}) bbx must be [x1, y1, x2, y2]")
        return self

    def missing_images(self) -> list[Path]:
        """Database and query images that do not exist on disk."""
        names = dict.fromkeys([*self.imlist, *self.qimlist])
        return [p for p in (self.image_path(n) for n in names) if not p.is_file()]

    def restrict_to_available(self) -> Benchmark:
        """The benchmark restricted to images on disk, with queries left without positives dropped.

        Warns how many images and queries were dropped and marks the result as a subset.
        """
        present = {n for n in dict.fromkeys([*self.imlist, *self.qimlist]) if self.image_path(n).is_file()}
        db_kept = np.array([n in present for n in self.imlist], dtype=bool)
        queries_kept = np.array([n in present for n in self.qimlist], dtype=bool)
        if db_kept.all() and queries_kept.all():
            return self
        restricted = self.restrict(db_kept, queries_kept, f"present in {self.image_dir}")
        if restricted is None:
            raise DataError(
                f"{self.name}: none of the {self.n_queries} queries of {self.source} has its image and a positive "
                f"in {self.image_dir}; download the images (oxford-ir-data download) or check the folder"
            )
        subset = restricted[0]
        warnings.warn(
            f"{self.name}: dropped {self.n_db - subset.n_db} missing database images and "
            f"{self.n_queries - subset.n_queries} queries (image missing or no positives left); evaluating a "
            f"{subset.subset_note}. Numbers are not comparable with published results.",
            stacklevel=2,
        )
        return subset

    def restrict(self, db_kept: np.ndarray, queries_kept: np.ndarray, how: str) -> tuple[Benchmark, np.ndarray] | None:
        """The benchmark restricted to the database images and queries of the two boolean masks, its ground truth
        renumbered, and the original indices of the queries it keeps; None when no query remains.

        Queries left without a positive are dropped. The result is marked as a subset; its note says how many
        images and queries it keeps and ``how`` they were chosen (e.g. ``present in <folder>``).
        """
        keep_db = np.flatnonzero(db_kept)
        remap = np.full(self.n_db, -1, dtype=np.int64)
        remap[keep_db] = np.arange(len(keep_db))
        qimlist, gnd, landmarks, kept_queries = [], [], [], []
        for q in np.flatnonzero(queries_kept):
            entry = dict(self.gnd[q])
            for key in INDEX_KEYS[self.protocol]:
                values = remap[np.asarray(self.gnd[q].get(key, ()), dtype=np.int64)]
                entry[key] = values[values >= 0]
            if sum(len(entry[k]) for k in POSITIVE_KEYS[self.protocol]) == 0:
                continue
            qimlist.append(self.qimlist[q])
            gnd.append(entry)
            kept_queries.append(int(q))
            if self.query_landmarks:
                landmarks.append(self.query_landmarks[q])
        if not qimlist:
            return None
        note = f"subset: {len(keep_db)}/{self.n_db} database images and {len(qimlist)}/{self.n_queries} queries {how}"
        restricted = replace(
            self,
            imlist=[self.imlist[i] for i in keep_db],
            qimlist=qimlist,
            gnd=gnd,
            query_landmarks=landmarks,
            is_subset=True,
            subset_note=note,
        )
        return restricted, np.asarray(kept_queries, dtype=np.int64)
