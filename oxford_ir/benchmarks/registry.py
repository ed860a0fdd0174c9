"""``load_benchmark``: a benchmark name and a data folder in, a validated :class:`Benchmark` out.

Oxford5k and Revisited Oxford share one folder (``oxford5k/``), Paris6k and Revisited
Paris another (``paris6k/``), the offline synthetic benchmark a third; the name picks
the protocol and which ground truth to read. Missing images are an error unless the
caller asks for the subset on disk, because a silently smaller benchmark gives numbers
that look comparable with published ones and are not. For the same reason a dataset folder that
``oxford-ir-data download`` has not finished (its state file, no completion marker) is refused: a run
interrupted while it placed the files would otherwise read as a dataset with fewer queries or images. A query box
that leaves no usable crop of its image (the image replaced by another) is refused at load, from the image headers.

Any labelled image collection is a benchmark too, named ``collection:<folder or CSV manifest>`` (a folder with a
sub-folder per class, :mod:`~oxford_ir.benchmarks.collection_folder`, or a manifest,
:mod:`~oxford_ir.benchmarks.collection_manifest`; a relative path is relative to the current directory): its test
split, else val, else all of it, each query against the gallery of its split
(:mod:`~oxford_ir.benchmarks.collection_benchmark`). The same name works wherever a benchmark is named:
``oxford-ir-eval benchmarks=[collection:/photos]``, ``oxford-ir-index images=benchmark:collection:/photos``,
``oxford-ir-train data=collection data.benchmark=collection:/photos``.

Google Landmarks v2 is the collection named ``gldv2`` (read from ``<data folder>/gldv2/`` by
:func:`~oxford_ir.benchmarks.gldv2.load_gldv2`), with its subset in the name:
``gldv2:min4:max1000:val50`` (at least 4 images a landmark, at most 1000 landmarks, 50 of them held
out for validation; ``data=gldv2``).

retrieval-SfM-120k is the collection named ``sfm120k`` (read from ``<data folder>/retrieval-SfM-120k/`` by
:func:`~oxford_ir.benchmarks.sfm120k.read_sfm120k`; its val part is the one evaluated; ``data=sfm120k``).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.boxes import check_query_crop
from oxford_ir.benchmarks.collection import Collection
from oxford_ir.benchmarks.collection_benchmark import collection_benchmark, collection_dataset, evaluated_split
from oxford_ir.benchmarks.collection_folder import read_folder
from oxford_ir.benchmarks.collection_manifest import read_manifest
from oxford_ir.benchmarks.download import COMPLETE_MARKER, STATE_FILE, is_complete
from oxford_ir.benchmarks.gldv2 import GLDV2_FOLDER, gldv2_options, is_gldv2_name, load_gldv2
from oxford_ir.benchmarks.ground_truth import IMAGE_FOLDER, read_ground_truth
from oxford_ir.benchmarks.gt_record import GroundTruth
from oxford_ir.benchmarks.gt_text_files import GT_TEXT_FOLDERS
from oxford_ir.benchmarks.landmark_json import GT_JSON_NAME
from oxford_ir.benchmarks.sfm120k import FOLDER as SFM120K_FOLDER
from oxford_ir.benchmarks.sfm120k import NAME as SFM120K
from oxford_ir.benchmarks.sfm120k import read_sfm120k
from oxford_ir.errors import ConfigError, DataError, GroundTruthError
from oxford_ir.images import upright_size


class BenchmarkSpec(NamedTuple):
    """Where a benchmark lives and how it is evaluated."""

    folder: str
    protocol: str
    pickle_stem: str


#: benchmark name -> (dataset folder, protocol, stem of its gnd pickle)
BENCHMARKS: dict[str, BenchmarkSpec] = {
    "oxford5k": BenchmarkSpec("oxford5k", "original", "gnd_oxford5k"),
    "roxford5k": BenchmarkSpec("oxford5k", "revisited", "gnd_roxford5k"),
    "paris6k": BenchmarkSpec("paris6k", "original", "gnd_paris6k"),
    "rparis6k": BenchmarkSpec("paris6k", "revisited", "gnd_rparis6k"),
    "synthetic": BenchmarkSpec("synthetic", "original", "gnd_synthetic"),
    "rsynthetic": BenchmarkSpec("synthetic", "revisited", "gnd_rsynthetic"),
}

_MISSING_NAMES_SHOWN = 5
#: the prefix of a collection's benchmark name: ``collection:<folder or CSV manifest>``
COLLECTION_PREFIX = "collection:"


def is_collection(name: object) -> bool:
    """Whether ``name`` names a collection (``collection:<path>``, ``gldv2[:options]`` or ``sfm120k``) rather than a
    registered benchmark."""
    return (isinstance(name, str) and name.startswith(COLLECTION_PREFIX)) or is_gldv2_name(name) or name == SFM120K


def collection_location(name: str) -> Path:
    """The folder or manifest of ``collection:<path>`` (``~`` expanded; relative to the current directory); for
    ``gldv2[:options]`` (checked), its folder's name under the data folder."""
    if is_gldv2_name(name):
        gldv2_options(name)
        return Path(GLDV2_FOLDER)
    if name == SFM120K:
        return Path(SFM120K_FOLDER)
    text = name[len(COLLECTION_PREFIX) :]
    if not text.strip():
        raise ConfigError(f"{name!r}: give the collection's folder or CSV manifest, e.g. collection:/data/photos")
    return Path(text).expanduser()


def read_collection(name: str, root: str | Path | None = None) -> Collection:
    """The :class:`Collection` ``collection:<path>`` names: a folder with a sub-folder per class, or a CSV
    manifest; anything else is a :class:`DataError` naming the path. ``gldv2[:options]`` is read from the data
    folder ``root``."""
    if is_gldv2_name(name):
        if root is None:
            raise ConfigError(f"{name}: GLDv2 is read from the data folder; pass it (data.data_dir)")
        return load_gldv2(root, **gldv2_options(name))
    if name == SFM120K:
        if root is None:
            raise ConfigError(f"{name}: retrieval-SfM-120k is read from the data folder; pass it (data.data_dir)")
        return read_sfm120k(root)
    path = collection_location(name)
    if path.is_dir():
        return read_folder(path)
    if path.is_file():
        return read_manifest(path)
    raise DataError(
        f"{name}: {path} does not exist; give a folder with one sub-folder of images per class, or a CSV manifest "
        "(path,label[,split,is_query,is_gallery,...])"
    )


def check_benchmark_name(name: object) -> None:
    """A :class:`ConfigError` unless ``name`` is a registered benchmark or a ``collection:<path>`` name."""
    if is_collection(name):
        collection_location(str(name))
    else:
        benchmark_spec(name)


def dataset_folder(name: str) -> str:
    """The dataset folder name of benchmark ``name``, which its image caches are named after: the registry's
    folder, or a name made from a collection's path
    (:func:`~oxford_ir.benchmarks.collection_benchmark.collection_dataset`)."""
    if is_gldv2_name(name):
        return GLDV2_FOLDER
    if name == SFM120K:
        return SFM120K_FOLDER
    return collection_dataset(collection_location(name)) if is_collection(name) else benchmark_spec(name).folder


def available_benchmarks(root: str | Path | None = None) -> list[str]:
    """Registered benchmark names; with ``root``, only those whose ground truth is found there."""
    if root is None:
        return list(BENCHMARKS)
    found = []
    for name in BENCHMARKS:
        try:
            find_ground_truth(name, dataset_dir(name, root))
        except (DataError, GroundTruthError):
            continue
        found.append(name)
    return found


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The registry entry of ``name``; an unknown name raises :class:`ConfigError` listing the known ones."""
    try:
        return BENCHMARKS[name]
    except (KeyError, TypeError):
        if isinstance(name, str) and ("/" in name or Path(name).expanduser().exists()):  # a folder or manifest
            raise ConfigError(f"unknown benchmark {name!r}; a folder or manifest is named collection:{name}") from None
        raise ConfigError(
            f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)} or collection:<folder or manifest>"
        ) from None


def dataset_dir(name: str, root: str | Path) -> Path:
    """The dataset folder of ``name``: ``root/<folder>`` when it is a directory, else ``root`` itself."""
    spec = benchmark_spec(name)
    root = Path(root).expanduser()
    nested = root / spec.folder
    if nested.is_dir():
        return nested
    if root.is_dir():
        return root
    raise DataError(f"{name}: dataset folder not found: neither {nested} nor {root} exists. {_fix(name, nested)}")


def find_ground_truth(name: str, folder: Path) -> Path:
    """The ground truth of ``name`` in its dataset folder, in order of preference.

    Original protocol: ``gnd_<name>.pkl``, else a gt text folder (``gt_files_170407/``,
    ``gt_files/``), else ``groundtruth.json``. Revisited: ``gnd_r<name>.pkl`` only.
    """
    spec = benchmark_spec(name)
    # (path, is a folder), in order of preference
    candidates = [(folder / f"{spec.pickle_stem}.pkl", False)]
    if spec.protocol == "original":
        candidates += [(folder / sub, True) for sub in GT_TEXT_FOLDERS] + [(folder / GT_JSON_NAME, False)]
    for path, is_folder in candidates:
        if path.is_dir() if is_folder else path.is_file():
            return path
    looked_for = ", ".join(path.name + ("/" if is_folder else "") for path, is_folder in candidates)
    raise GroundTruthError(
        f"{name}: no ground truth in {folder}: looked for {looked_for}. {_fix(name, folder)}, "
        "or pass gt_file=<path to a .pkl, .json or gt text folder>"
    )


def load_listed_benchmark(name: str, root: str | Path, gt_file: str | Path | None = None) -> Benchmark:
    """Benchmark ``name`` with every image its ground truth lists, on disk or not (validated indices).

    What :func:`load_benchmark` starts from; ``oxford-ir-data verify`` uses it to report what is missing.
    """
    spec = benchmark_spec(name)
    folder = dataset_dir(name, root)
    if (folder / STATE_FILE).exists() and not is_complete(folder):
        raise DataError(
            f"{name}: {folder} holds an unfinished download ({STATE_FILE}, no {COMPLETE_MARKER}: it was interrupted "
            f"or is still running); finish it with `oxford-ir-data download {spec.folder} --root {folder.parent}`, "
            "which resumes where it stopped"
        )
    source = Path(gt_file).expanduser() if gt_file is not None else find_ground_truth(name, folder)
    truth = read_ground_truth(source, dataset_dir=folder)
    if truth.protocol != spec.protocol:
        other = [n for n, s in BENCHMARKS.items() if s.folder == spec.folder and s.protocol == truth.protocol]
        raise GroundTruthError(
            f"{source}: holds {truth.protocol}-protocol ground truth, but {name} uses the {spec.protocol} protocol; "
            + (f"load it as {other[0]!r} or " if other else "")
            + f"give {name}'s own ground truth"
        )
    return _benchmark(name, folder, truth).validate()


def load_benchmark(
    name: str,
    root: str | Path,
    allow_missing_images: bool = False,
    gt_file: str | Path | None = None,
) -> Benchmark:
    """Load benchmark ``name`` (see :data:`BENCHMARKS`, or ``collection:<path>``: see the module docstring) from
    ``root``, validated.

    ``root`` is the dataset folder itself or a data folder holding ``<folder>/``.
    ``gt_file`` overrides the ground-truth discovery of :func:`find_ground_truth`; its
    protocol must be the benchmark's. When database or query images are missing from
    ``<folder>/jpg``, raises :class:`DataError`, or, with ``allow_missing_images``, returns
    the benchmark restricted to the images present (warned, ``is_subset`` set). A query box that does not overlap
    its image, or leaves fewer than 4 pixels of it in a direction, raises :class:`DataError` naming the benchmark,
    the query, the box and the image's size.
    """
    if is_collection(name):
        if gt_file is not None:
            raise ConfigError(f"gt_file does not apply to {name}: a collection's ground truth is its labels")
        collection = read_collection(name, root)
        benchmark = collection_benchmark(collection, evaluated_split(collection))
    else:
        benchmark = load_listed_benchmark(name, root, gt_file)
    return checked_images(name, benchmark, allow_missing_images)


def checked_images(name: str, benchmark: Benchmark, allow_missing_images: bool = False) -> Benchmark:
    """``benchmark`` (called ``name``) once its images are on disk and its query boxes fit them: missing images
    are a :class:`DataError`, or with ``allow_missing_images`` the benchmark is restricted to the images present."""
    missing = benchmark.missing_images()
    if not missing:
        return _check_query_boxes(benchmark)
    if allow_missing_images:
        return _check_query_boxes(benchmark.restrict_to_available())
    total = len(dict.fromkeys([*benchmark.imlist, *benchmark.qimlist]))
    shown = ", ".join(p.name for p in missing[:_MISSING_NAMES_SHOWN])
    more = ", ..." if len(missing) > _MISSING_NAMES_SHOWN else ""
    fix = f"Restore them or remove them from {benchmark.source}" if is_collection(name) else _fix(name, benchmark.root)
    raise DataError(
        f"{name}: {len(missing)} of {total} database and query images are missing from {benchmark.image_dir} "
        f"({shown}{more}). {fix}, or pass allow_missing_images=true to evaluate on the images "
        "present (a subset whose numbers are not comparable with published ones)"
    )


def _check_query_boxes(benchmark: Benchmark) -> Benchmark:
    """Every query box must cut a usable crop out of its image (:func:`~oxford_ir.benchmarks.boxes.check_query_crop`),
    read from the image headers before anything is extracted; an unreadable header is left to decoding to report."""
    for name, path, bbox in zip(benchmark.qimlist, benchmark.query_paths, benchmark.query_bboxes, strict=True):
        size = None if bbox is None else upright_size(path)
        if size is not None:
            check_query_crop(
                bbox,
                size,
                f"{benchmark.name}: query {name!r} ({path})",
                f"the image is not the one the ground truth ({benchmark.source}) was made for: restore it or "
                "download the dataset again",
            )
    return benchmark


def _benchmark(name: str, folder: Path, truth: GroundTruth) -> Benchmark:
    return Benchmark(
        name=name,
        root=folder,
        protocol=truth.protocol,
        imlist=truth.imlist,
        qimlist=truth.qimlist,
        gnd=truth.gnd,
        source=truth.source,
        image_dir=folder / IMAGE_FOLDER,
        query_landmarks=truth.query_landmarks,
    )


def _fix(name: str, folder: Path) -> str:
    """How to get the data of ``name`` into ``folder`` (a dataset folder, or the data folder meant to hold it)."""
    spec = BENCHMARKS[name]
    dataset = folder if folder.name == spec.folder else folder / spec.folder
    if spec.folder == "synthetic":
        return (
            "Write the synthetic benchmark with "
            f"oxford_ir.benchmarks.synthetic.write_synthetic_benchmark({str(dataset)!r}) "
            "(oxford-ir-eval writes it when absent)"
        )
    return f"Download it with `oxford-ir-data download {spec.folder} --root {dataset.parent}`"
