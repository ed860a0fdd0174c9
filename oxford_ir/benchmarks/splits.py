"""Which database images a model trains on, with which landmark label, and what it is evaluated on.

Training classes are landmarks. The class of landmark ``L`` holds the union of the positives (``ok``, or
``easy`` + ``hard``) of ``L``'s queries, with three kinds of images left out:

- **junk** of any query, of any landmark, never enters training: the annotators could not say whether it
  shows the landmark, so it can be neither a positive (that teaches matching views the evaluation
  ignores) nor a negative of another landmark (it may well show that landmark). Dropping it only from
  its own landmark's class would still leave it as a negative for every other class in a batch. In
  Revisited Oxford/Paris, per-query junk is common inside a landmark (a photo of one facade is junk for
  a query of another facade of the same building), so revisited classes shrink noticeably;
- **ambiguous** images, positives of two landmarks (both buildings in view), are dropped with a warning:
  they cannot carry one label;
- images the split must keep away from training (the evaluated queries, held-out landmarks).

**Distractors** (``use_distractors``): database images that are no query's positive or junk. Each gets
its own label, so a loss never treats two of them as a positive pair; they serve as extra negatives.
A P x K sampler cannot draw K images from such a singleton class, so the sampler draws classes only from
the landmark classes and adds distractors to each batch separately (``data.sampler.ClassBalancedSampler``).

Splits (``kind``):

- ``seed``: the original project's protocol. Train on the positives of *all* landmarks except the
  query images themselves; evaluate every query against the full database. It **leaks landmark
  identity**: the network has been trained to recognise exactly the landmarks it is then asked to
  retrieve, from the very database images that are the queries' positives. Its numbers are far higher
  than a real retrieval setting would give and are not comparable with published ones.
- ``landmarks``: landmark-disjoint. Some landmarks are held out (by name, or ``n_held_out`` chosen with
  ``seed``); training never sees any positive or junk image of a held-out landmark nor its query
  images, and only the held-out landmarks' queries are evaluated, against the full database.
- ``cross``: train on every landmark of one dataset, evaluate on another, full (Paris6k -> Oxford5k,
  the standard transfer setting of the retrieval literature). The two must share no image.

Everything here works on ground truth only (no file is opened), so a split can be checked by brute
force; :meth:`TrainSplit.restrict_to_available` deals with images missing from disk.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.ground_truth import read_ground_truth
from oxford_ir.benchmarks.path_array import PathArray
from oxford_ir.errors import ConfigError, DataError, GroundTruthError

SPLIT_KINDS = ("seed", "landmarks", "cross")
_SHOWN = 5


@dataclass(frozen=True)
class TrainSplit:
    """Training images with their labels, and the benchmark evaluated during validation.

    ``paths[i]`` has label ``labels[i]``. ``paths`` is given as any sequence of paths and held as a
    :class:`~oxford_ir.benchmarks.path_array.PathArray` (a root and a numpy array of names: 1.6M images cost tens
    of MB, not hundreds, and no per-image object); it reads like a list of ``Path``. Labels
    ``0 .. num_landmark_classes - 1`` are the landmarks ``label_names[:num_landmark_classes]`` (sorted by name);
    every label from ``num_landmark_classes`` on is one distractor image (its name in ``label_names``). Landmark
    images come first, grouped by label.
    """

    kind: str
    paths: PathArray
    labels: np.ndarray
    label_names: list[str]
    num_landmark_classes: int
    eval_benchmark: Benchmark
    train_benchmark: str
    held_out_landmarks: tuple[str, ...] = ()
    description: str = ""
    #: images left out of training, by reason (junk, ambiguous, evaluated_query, held_out, missing)
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", PathArray.of(self.paths))
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of distinct labels: landmark classes plus one per distractor."""
        return len(self.label_names)

    @property
    def landmark_names(self) -> list[str]:
        return self.label_names[: self.num_landmark_classes]

    @property
    def is_distractor(self) -> np.ndarray:
        """Boolean mask over ``paths``: the image is a distractor (a singleton class)."""
        return self.labels >= self.num_landmark_classes

    @property
    def num_distractors(self) -> int:
        return int(self.is_distractor.sum())

    def class_sizes(self) -> np.ndarray:
        """Number of training images of each landmark class (index = label)."""
        return np.bincount(self.labels[~self.is_distractor], minlength=self.num_landmark_classes)

    def classes_for_batches(self, classes_per_batch: int, images_per_class: int) -> np.ndarray:
        """Landmark labels a P x K sampler can draw from: those with at least K images.

        Smaller classes are dropped with a warning naming them, as long as at least P classes remain
        (real benchmarks have tiny landmarks: Revisited Oxford's keble has 2 positives, and refusing to
        train because of it would help no one). Fewer than P classes is a :class:`ConfigError` listing
        every class with its size and the values that would work.
        """
        if images_per_class < 2:
            raise ConfigError(
                f"images_per_class must be at least 2 (a class needs a positive pair), got {images_per_class}"
            )
        if classes_per_batch < 2:
            raise ConfigError(
                f"classes_per_batch must be at least 2 (a batch needs negatives from another class), "
                f"got {classes_per_batch}"
            )
        sizes = self.class_sizes()
        names = self.landmark_names
        eligible = np.flatnonzero(sizes >= images_per_class)
        small = [f"{names[c]} ({sizes[c]})" for c in np.flatnonzero(sizes < images_per_class)]
        if len(eligible) < classes_per_batch:
            counts = ", ".join(f"{n}: {s}" for n, s in zip(names, sizes, strict=True))
            k_fit = int(np.sort(sizes)[::-1][classes_per_batch - 1]) if len(sizes) >= classes_per_batch else 0
            fixes = [f"lower classes_per_batch to at most {len(eligible)}"] if len(eligible) >= 2 else []
            if k_fit >= 2:
                fixes.append(f"lower images_per_class to at most {k_fit}")
            fixes.append("or train on a benchmark/split with more landmarks")
            raise ConfigError(
                f"{self.train_benchmark} ({self.kind} split): classes_per_batch={classes_per_batch} with "
                f"images_per_class={images_per_class} needs {classes_per_batch} landmark classes of at least "
                f"{images_per_class} training images, but only {len(eligible)} have that many "
                f"(images per class: {counts}); " + ", ".join(fixes)
            )
        if small:
            warnings.warn(
                f"{self.train_benchmark} ({self.kind} split): {len(small)} landmark class(es) have fewer than "
                f"images_per_class={images_per_class} training images and are left out of training: "
                f"{', '.join(small)}. Lower images_per_class to keep them.",
                stacklevel=2,
            )
        return eligible

    def missing_images(self) -> list[Path]:
        """Training images that do not exist on disk."""
        return [p for p in self.paths if not p.is_file()]

    def restrict_to_available(self) -> TrainSplit:
        """The split without its images missing on disk (warned; labels keep their meaning)."""
        present = np.array([p.is_file() for p in self.paths], dtype=bool)
        if present.all():
            return self
        n_missing = int((~present).sum())
        if not present[: np.count_nonzero(~self.is_distractor)].any():
            raise DataError(
                f"{self.train_benchmark}: none of the {np.count_nonzero(~self.is_distractor)} landmark training "
                f"images is on disk (e.g. {self.paths[0]}); download the dataset or check data_dir"
            )
        warnings.warn(
            f"{self.train_benchmark}: {n_missing} of {len(self.paths)} training images are missing on disk and "
            "are left out of training (allow_missing_images)",
            stacklevel=2,
        )
        return self.without(~present, "missing", f"{n_missing} training images missing on disk left out")

    def without(self, drop: np.ndarray, reason: str, note: str) -> TrainSplit:
        """The split without the images of the boolean mask ``drop`` (labels keep their meaning), counted under
        ``reason`` in ``dropped`` and said by ``note`` in the description."""
        drop = np.asarray(drop, dtype=bool)
        if drop.shape != (len(self),):
            raise ValueError(f"a mask of {drop.shape} for {len(self)} training images")
        keep = np.flatnonzero(~drop)
        return replace(
            self,
            paths=self.paths[keep],
            labels=self.labels[keep],
            dropped={**self.dropped, reason: self.dropped.get(reason, 0) + int(drop.sum())},
            description=f"{self.description}; {note}",
        )


def full_ground_truth(loaded: Benchmark) -> Benchmark:
    """``loaded`` with every query and database image of its ground truth, even when images are missing.

    Training labels need the ground truth of every query: restricted to the images on disk, the positives of
    a query whose own image is missing would look like distractors and be trained on as negatives.
    """
    if not loaded.is_subset:
        return loaded
    truth = read_ground_truth(loaded.source, dataset_dir=loaded.root)
    return replace(
        loaded,
        imlist=truth.imlist,
        qimlist=truth.qimlist,
        gnd=truth.gnd,
        query_landmarks=truth.query_landmarks,
        is_subset=False,
        subset_note="",
    ).validate()


def landmark_of_queries(benchmark: Benchmark) -> list[str]:
    """``benchmark.query_landmarks``, checked: a training split needs the landmark of every query."""
    landmarks = list(benchmark.query_landmarks)
    if len(landmarks) != benchmark.n_queries or not all(landmarks):
        raise GroundTruthError(
            f"{benchmark.source}: {benchmark.name} does not name the landmark of each of its {benchmark.n_queries} "
            "queries, which training classes need; load it with oxford_ir.benchmarks.registry.load_benchmark"
        )
    return landmarks


def image_ownership(benchmark: Benchmark) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Which landmarks each database image is a positive of, and whether it is junk for any query.

    Returns ``(landmarks, is_positive, junk)``: the sorted landmark names, a boolean
    ``len(landmarks) x n_db`` matrix (image ``i`` is a positive of a query of landmark ``l``) and a
    boolean ``n_db`` mask (some query, of any landmark, lists the image as junk).
    """
    query_landmarks = landmark_of_queries(benchmark)
    landmarks = sorted(set(query_landmarks))
    index = {name: i for i, name in enumerate(landmarks)}
    is_positive = np.zeros((len(landmarks), benchmark.n_db), dtype=bool)
    junk = np.zeros(benchmark.n_db, dtype=bool)
    for q, landmark in enumerate(query_landmarks):
        is_positive[index[landmark], benchmark.positives(q)] = True
        junk[np.asarray(benchmark.gnd[q].get("junk", ()), dtype=np.int64)] = True
    return landmarks, is_positive, junk


def build_split(
    kind: str,
    train_benchmark: Benchmark,
    eval_benchmark: Benchmark | None = None,
    *,
    held_out_landmarks: Sequence[str] | None = None,
    n_held_out: int | None = None,
    seed: int = 0,
    use_distractors: bool = True,
) -> TrainSplit:
    """The training images and labels of split ``kind`` and the benchmark to evaluate (see module doc).

    ``eval_benchmark`` defaults to ``train_benchmark`` (``seed``, ``landmarks``) and is required for
    ``cross``. For ``landmarks``, give ``held_out_landmarks`` (names) or ``n_held_out`` (a number drawn with
    ``seed`` among the landmarks that have queries in the evaluation benchmark). Impossible settings raise
    :class:`ConfigError` naming the value and the fix.
    """
    if kind not in SPLIT_KINDS:
        raise ConfigError(f"unknown split {kind!r}; choose one of {', '.join(SPLIT_KINDS)}")
    if kind != "landmarks" and (held_out_landmarks or n_held_out is not None):
        raise ConfigError(
            f"held_out_landmarks / n_held_out only apply to split=landmarks, not split={kind}; "
            "remove them or use split=landmarks"
        )
    if eval_benchmark is None:
        if kind == "cross":
            raise ConfigError("split=cross needs an evaluation benchmark other than the training one (eval_benchmark)")
        eval_benchmark = train_benchmark
    train = train_benchmark
    landmarks, is_positive, junk = image_ownership(train)
    if kind in ("seed", "landmarks") and not set(train.imlist) & set(eval_benchmark.imlist):
        raise ConfigError(
            f"split={kind} evaluates on the training dataset, but {eval_benchmark.name} shares no image with "
            f"{train.name}; use split=cross to train on one dataset and evaluate on another"
        )

    excluded: set[str] = set()
    held_out: tuple[str, ...] = ()
    if kind == "seed":
        excluded = set(train.qimlist) | set(eval_benchmark.qimlist)
    elif kind == "landmarks":
        held_out = _resolve_held_out(train, eval_benchmark, landmarks, held_out_landmarks, n_held_out, seed)
        eval_benchmark = _restrict_to_landmarks(eval_benchmark, held_out)
        excluded = _held_out_names(train, held_out) | _held_out_names(eval_benchmark, held_out)
    trained = np.array([name not in held_out for name in landmarks], dtype=bool)
    train_landmarks = [name for name, t in zip(landmarks, trained, strict=True) if t]

    n_owners = is_positive.sum(axis=0)
    owner = np.argmax(is_positive, axis=0)  # the only owner where n_owners == 1
    ambiguous = n_owners >= 2
    name_excluded = np.array([name in excluded for name in train.imlist], dtype=bool)
    single_trained = (n_owners == 1) & trained[owner]
    in_class = single_trained & ~junk & ~name_excluded
    if ambiguous.any():
        examples = ", ".join(
            f"{train.imlist[i]} ({' + '.join(np.asarray(landmarks)[is_positive[:, i]])})"
            for i in np.flatnonzero(ambiguous)[:3]
        )
        warnings.warn(
            f"{train.name}: {int(ambiguous.sum())} database images are positives of two landmarks and are left "
            f"out of training as ambiguous (e.g. {examples})",
            stacklevel=2,
        )
    if not in_class.any():
        raise ConfigError(
            f"{train.name} ({kind} split): no training image is left (landmarks {train_landmarks}; junk, ambiguous "
            "and evaluated query images are never trained on); hold out fewer landmarks or choose another benchmark"
        )
    label_of_landmark = np.cumsum(trained) - 1  # landmark index -> training label
    class_images = np.flatnonzero(in_class)
    class_labels = label_of_landmark[owner[class_images]]
    order = np.argsort(class_labels, kind="stable")
    class_images, class_labels = class_images[order], class_labels[order]
    if use_distractors:
        distractors = np.flatnonzero((n_owners == 0) & ~junk & ~name_excluded)
    else:
        distractors = np.zeros(0, dtype=np.int64)

    indices = np.concatenate([class_images, distractors]).astype(np.int64)
    labels = np.concatenate([class_labels, len(train_landmarks) + np.arange(len(distractors))]).astype(np.int64)
    positive_of_trained = is_positive[trained].any(axis=0)
    dropped = {
        "junk": int((positive_of_trained & junk).sum()),
        "ambiguous": int((positive_of_trained & ambiguous & ~junk).sum()),
        "evaluated_query": int((single_trained & ~junk & name_excluded).sum()),
        "held_out": int(is_positive[~trained].any(axis=0).sum()),
    }
    if kind == "cross":
        overlap = sorted(
            {train.imlist[i] for i in indices} & (set(eval_benchmark.imlist) | set(eval_benchmark.qimlist))
        )
        if overlap:
            raise ConfigError(
                f"split=cross: {len(overlap)} training images of {train.name} are also images of the evaluation "
                f"benchmark {eval_benchmark.name} (e.g. {', '.join(overlap[:_SHOWN])}); cross-dataset evaluation "
                "needs two different datasets; for a disjoint split inside one dataset use split=landmarks"
            )
    split = TrainSplit(
        kind=kind,
        paths=[train.image_path(train.imlist[i]) for i in indices],
        labels=labels,
        label_names=train_landmarks + [train.imlist[i] for i in distractors],
        num_landmark_classes=len(train_landmarks),
        eval_benchmark=eval_benchmark,
        train_benchmark=train.name,
        held_out_landmarks=held_out,
        dropped=dropped,
    )
    return replace(split, description=_describe(split, train))


def _resolve_held_out(
    train: Benchmark,
    eval_benchmark: Benchmark,
    landmarks: list[str],
    names: Sequence[str] | None,
    count: int | None,
    seed: int,
) -> tuple[str, ...]:
    """Validated held-out landmark names, from a list or a seeded draw of ``count``."""
    evaluable = sorted(set(landmarks) & set(landmark_of_queries(eval_benchmark)))
    if names and count is not None:
        raise ConfigError(
            "give either held_out_landmarks (names) or n_held_out (a number drawn with the seed), not both"
        )
    if not names and count is None:
        raise ConfigError(
            "split=landmarks needs held_out_landmarks (a list of landmark names) or n_held_out (how many to "
            f"draw); landmarks of {train.name}: {', '.join(landmarks)}"
        )
    if names:
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in landmarks]
        if unknown:
            raise ConfigError(
                f"unknown landmark(s) {', '.join(map(repr, unknown))} in held_out_landmarks; "
                f"landmarks of {train.name}: {', '.join(landmarks)}"
            )
        held_out = tuple(sorted(set(names)))
        without_queries = [n for n in held_out if n not in evaluable]
        if len(without_queries) == len(held_out):
            raise ConfigError(
                f"none of the held-out landmarks ({', '.join(held_out)}) has a query in {eval_benchmark.name}, "
                f"so nothing would be evaluated; landmarks with queries there: {', '.join(evaluable) or 'none'}"
            )
        if without_queries:
            warnings.warn(
                f"held-out landmark(s) {', '.join(without_queries)} have no query in {eval_benchmark.name}: "
                "they are kept out of training but not evaluated",
                stacklevel=3,
            )
    else:
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError(f"n_held_out must be a positive integer, got {count!r}")
        if count >= len(landmarks) or count > len(evaluable):
            raise ConfigError(
                f"n_held_out={count} is too many: {train.name} has {len(landmarks)} landmarks "
                f"({len(evaluable)} with queries in {eval_benchmark.name}) and at least one must stay for "
                f"training; use at most {min(len(landmarks) - 1, len(evaluable))}"
            )
        rng = np.random.default_rng(seed)
        held_out = tuple(sorted(rng.choice(evaluable, size=count, replace=False).tolist()))
    if len(held_out) >= len(landmarks):
        raise ConfigError(
            f"held_out_landmarks holds every landmark of {train.name} ({', '.join(landmarks)}): none is left to "
            "train on; hold out fewer"
        )
    return held_out


def _held_out_names(benchmark: Benchmark, held_out: Sequence[str]) -> set[str]:
    """Query images of the held-out landmarks and every database image positive or junk for them."""
    names: set[str] = set()
    for q, landmark in enumerate(landmark_of_queries(benchmark)):
        if landmark in held_out:
            names.add(benchmark.qimlist[q])
            junk = np.asarray(benchmark.gnd[q].get("junk", ()), dtype=np.int64)
            names.update(benchmark.imlist[i] for i in np.concatenate([benchmark.positives(q), junk]))
    return names


def _restrict_to_landmarks(benchmark: Benchmark, landmarks: Sequence[str]) -> Benchmark:
    """``benchmark`` with only the queries of ``landmarks``; the database is kept whole."""
    query_landmarks = landmark_of_queries(benchmark)
    keep = [q for q, landmark in enumerate(query_landmarks) if landmark in landmarks]
    if not keep:
        raise ConfigError(f"{benchmark.name} has no query of the held-out landmarks {', '.join(landmarks)}")
    note = f"queries of the held-out landmarks {', '.join(landmarks)} only ({len(keep)}/{benchmark.n_queries})"
    return replace(
        benchmark,
        qimlist=[benchmark.qimlist[q] for q in keep],
        gnd=[benchmark.gnd[q] for q in keep],
        query_landmarks=[query_landmarks[q] for q in keep],
        is_subset=True,
        subset_note=f"{benchmark.subset_note}; {note}" if benchmark.subset_note else note,
    )


def _describe(split: TrainSplit, train: Benchmark) -> str:
    sizes = split.class_sizes()
    n_landmark_images = int(sizes.sum())
    ev = split.eval_benchmark
    head = {
        "seed": f"seed split of {train.name} (leaks landmark identity: training and evaluation share landmarks)",
        "landmarks": f"landmarks split of {train.name}, held out: {', '.join(split.held_out_landmarks)}",
        "cross": f"cross split: train on {train.name}, evaluate on {ev.name}",
    }[split.kind]
    dropped = ", ".join(f"{v} {k}" for k, v in split.dropped.items() if v)
    return (
        f"{head}; train on {split.num_landmark_classes} landmarks ({n_landmark_images} images, "
        f"{min(sizes)}-{max(sizes)} per class) + {split.num_distractors} distractors"
        + (f"; left out: {dropped}" if dropped else "")
        + f"; evaluate {ev.n_queries} queries of {ev.name} against {ev.n_db} database images"
    )
