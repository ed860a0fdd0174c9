"""``oxford-ir-data``: download the benchmarks, verify their images, write the synthetic benchmark.

oxford-ir-data download oxford5k --root data          # -> data/oxford5k/{jpg,gt_files_170407,gnd_*.pkl}
oxford-ir-data download gldv2 --root data --parts 0-3,7  # -> data/gldv2/{train_clean.csv,train.csv,train/}
oxford-ir-data download r1m --root data --parts 1-10     # -> data/revisitop1m/{revisitop1m.txt,jpg/}: R1M distractors
oxford-ir-data verify roxford5k --root data           # exit 0 when every listed image decodes
oxford-ir-data synthetic --root data/synthetic --seed 0
oxford-ir-data cache roxford5k --root data --eval-size 1024 --train-long-side 724 --workers 8
oxford-ir-data check my_photos/                       # or a CSV manifest; exit 0 when it has no problem

A bad argument, like any error a user can fix, is one ``error:`` line on stderr naming the option and what it takes,
exit status 2 (argparse's usage block is left out: ``--help`` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from oxford_ir.errors import exit_on_user_error

log = logging.getLogger(__name__)

BENCHMARK_NAMES = ("oxford5k", "roxford5k", "paris6k", "rparis6k", "synthetic", "rsynthetic")


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one ``error:`` line naming the option and the fix, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _benchmark_arguments(parser: argparse.ArgumentParser, data_dir: Path) -> None:
    """The ``benchmark`` and ``--root`` arguments of the commands that read a benchmark's images."""
    parser.add_argument("benchmark", choices=BENCHMARK_NAMES, help="benchmark whose ground truth lists the images")
    parser.add_argument(
        "--root",
        type=Path,
        default=data_dir,
        help="data folder or the dataset folder itself (default: $OXFORD_IR_DATA or ./data)",
    )


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from oxford_ir.benchmarks.download import DATASET_FOLDERS

    data_dir = Path(os.environ.get("OXFORD_IR_DATA", "data"))  # the default of paths.data_dir
    parser = _Parser(
        prog="oxford-ir-data",
        description=(
            "Download the Oxford5k / Paris6k benchmarks, verify their images, write the synthetic benchmark, "
            "build the image cache."
        ),
        epilog="Run `oxford-ir-data <command> --help` for the options of each command.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    download = commands.add_parser(
        "download",
        help="fetch and unpack a dataset's official files (resumable)",
        description=(
            "Fetch a dataset's official images and ground truth into ROOT/<dataset>/ (jpg/, the gt text files and "
            "the gnd_*.pkl of both protocols). Interrupted runs resume; a complete dataset is left alone. "
            "The Revisited names fetch the same folder. gldv2 (Google Landmarks v2) fetches its CSVs and the "
            "training TARs named by --parts, each checked against its md5 file. r1m fetches revisitop's 1M distractors "
            "(100 archives, --parts 1-10 for some; all by default), recording each archive's sha256."
        ),
    )
    download.add_argument("dataset", choices=sorted([*DATASET_FOLDERS, "gldv2", "r1m"]), help="dataset to fetch")
    download.add_argument(
        "--root", type=Path, default=data_dir, help="data folder (default: $OXFORD_IR_DATA or ./data)"
    )
    download.add_argument(
        "--sources", type=Path, help="YAML list of {url, filename, sha256, extract_to, flatten} replacing conf/download"
    )
    download.add_argument("--base-url", help="fetch the same file names from this mirror instead")
    download.add_argument("--keep-archives", action="store_true", help="keep the .tgz files after extraction")
    download.add_argument("--retries", type=_non_negative_int, default=3, help="retries on connection errors")
    download.add_argument("--timeout", type=_positive_float, default=60.0, help="seconds without data before giving up")
    download.add_argument("--no-progress", action="store_true", help="no progress bars")
    download.add_argument(
        "--parts",
        help="gldv2: which of its 500 training TARs (about 1 GB each), e.g. 0-3,7 or all (about 500 GB); "
        "r1m: which of its 100 archives (1-100, default all), e.g. 1-10",
    )

    verify = commands.add_parser(
        "verify",
        help="report missing and undecodable images of a benchmark",
        description=(
            "Decode every database and query image of a benchmark and list the missing and undecodable ones. "
            "Exit status 0 when all are present and decodable, 1 otherwise."
        ),
    )
    _benchmark_arguments(verify, data_dir)
    verify.add_argument("--gt-file", type=Path, help="ground truth to use instead of the one found in the folder")
    verify.add_argument(
        "--allow-missing", action="store_true", help="exit 0 when images are missing (a subset); still fail on corrupt"
    )
    verify.add_argument("--workers", type=_positive_int, help="decoding threads (default: up to 8)")
    verify.add_argument("--max-listed", type=_non_negative_int, default=20, help="list at most this many per kind")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")

    synthetic = commands.add_parser(
        "synthetic",
        help="write the offline synthetic benchmark",
        description="Write a small synthetic benchmark (images, gt files and pickles of both protocols) to ROOT.",
    )
    synthetic.add_argument(
        "--root",
        type=Path,
        default=data_dir / "synthetic",
        help="benchmark folder to write (default: $OXFORD_IR_DATA/synthetic or ./data/synthetic)",
    )
    synthetic.add_argument(
        "--preset", help="start from a named parameter set (tiny: for tests; default: the quickstart's)"
    )
    synthetic.add_argument("--seed", type=_non_negative_int, help="random seed (default: 0)")
    synthetic.add_argument("--landmarks", type=_positive_int, help="number of landmarks")
    synthetic.add_argument(
        "--images-per-landmark", type=_positive_int, help="database images per landmark (hard and junk included)"
    )
    synthetic.add_argument("--queries-per-landmark", type=_positive_int, help="query images per landmark")
    synthetic.add_argument("--hard-per-landmark", type=_non_negative_int, help="hard views among a landmark's images")
    synthetic.add_argument("--junk-per-landmark", type=_non_negative_int, help="junk views among a landmark's images")
    synthetic.add_argument("--distractors", type=_non_negative_int, help="images of no landmark")
    synthetic.add_argument("--photo-long-side", type=_positive_int, help="long side of each JPEG in pixels")
    synthetic.add_argument(
        "--image-size", type=_positive_int, help="deprecated name of --photo-long-side (removed in the next release)"
    )
    synthetic.add_argument("--workers", type=_positive_int, help="processes drawing the photographs (same files)")

    cache = commands.add_parser(
        "cache",
        help="build the preprocessed image cache of a benchmark",
        description=(
            "Decode and resize a benchmark's images once into DIR (what data.cache.enabled=true reads): the "
            "evaluation images (database, and queries cropped to their boxes) at --eval-size, and with "
            "--train-long-side every database image for training (which covers any split of the dataset). "
            "Up-to-date entries are kept; changed images are decoded again."
        ),
    )
    _benchmark_arguments(cache, data_dir)
    cache.add_argument("--dir", type=Path, help="cache folder (default: ROOT/cache, as data.cache.dir=null)")
    cache.add_argument(
        "--eval-size", type=_positive_int, default=1024, help="long side of evaluation images (data.eval_image_size)"
    )
    cache.add_argument("--no-eval", action="store_true", help="do not build the evaluation cache")
    cache.add_argument(
        "--train-long-side", type=_positive_int, help="also cache training images at this long side (data.cache)"
    )
    cache.add_argument("--workers", type=_non_negative_int, default=0, help="decoding processes (default: 0)")
    cache.add_argument("--allow-missing", action="store_true", help="cache the images present (a subset)")
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")

    check = commands.add_parser(
        "check",
        help="summarise your own collection (a folder per class or a CSV manifest) and list its problems",
        description=(
            "Summarise a collection: images and classes, images per class, per-split counts, queries and gallery. "
            "Warn about classes with fewer than --images-per-class training images and files that are not images. "
            "List the problems, one line each naming the file or manifest line: unreadable manifest rows, the same "
            "path under two labels, missing files, files whose image header cannot be read, the same content "
            "twice (in two classes, or a duplicate in one). Exit status 0 when there is no problem, 1 otherwise "
            "(warnings do not count), 2 when the collection cannot be read at all."
        ),
    )
    check.add_argument(
        "collection", type=Path, help="a folder with a sub-folder per class (or train/ val/ test/), or a CSV manifest"
    )
    check.add_argument("--root", type=Path, help="folder the manifest's paths are relative to (default: its folder)")
    check.add_argument(
        "--images-per-class",
        type=_positive_int,
        default=4,
        help="K of the P x K sampler: warn about classes with fewer training images (default: 4)",
    )
    check.add_argument("--workers", type=_positive_int, help="threads reading the files (default: up to 8)")
    check.add_argument("--max-listed", type=_non_negative_int, default=20, help="list at most this many per kind")
    return parser


def _cache(args: argparse.Namespace) -> int:
    from oxford_ir.benchmarks.registry import benchmark_spec, load_benchmark
    from oxford_ir.data.cache import build_image_cache, cache_folder

    benchmark = load_benchmark(args.benchmark, args.root, allow_missing_images=args.allow_missing)
    dataset = benchmark_spec(args.benchmark).folder
    cache_dir = args.dir if args.dir is not None else args.root / "cache"
    jobs = []
    if not args.no_eval:
        paths = [*benchmark.db_paths, *benchmark.query_paths]
        boxes = [None] * benchmark.n_db + list(benchmark.query_bboxes)
        jobs.append(("eval", args.eval_size, paths, boxes))
    if args.train_long_side is not None:
        jobs.append(("train", args.train_long_side, benchmark.db_paths, None))
    for kind, size, paths, boxes in jobs:
        folder = cache_folder(cache_dir, kind, dataset, size)
        built = build_image_cache(
            folder,
            paths,
            boxes=boxes,
            kind=kind,
            long_side=size,
            num_workers=args.workers,
            progress=not args.no_progress,
        )
        print(f"{kind} cache: {len(built)} images at long side {size}, {built.pixel_bytes / 1e6:.1f} MB in {folder}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from oxford_ir.benchmarks.collection_check import check_collection

    report = check_collection(
        args.collection, root=args.root, images_per_class=args.images_per_class, workers=args.workers
    )
    print(report.format(max_listed=args.max_listed))
    return 0 if report.ok else 1


def _download(args: argparse.Namespace) -> int:
    from oxford_ir.benchmarks.download import download_dataset
    from oxford_ir.errors import ConfigError

    if args.dataset == "gldv2":
        return _download_gldv2(args)
    if args.dataset == "r1m":
        return _download_r1m(args)
    if args.parts is not None:
        raise ConfigError(f"--parts is for gldv2 and r1m only; {args.dataset} is fetched whole")
    folder = download_dataset(
        args.dataset,
        args.root,
        args.sources,
        progress=not args.no_progress,
        base_url=args.base_url,
        keep_archives=args.keep_archives,
        retries=args.retries,
        timeout=args.timeout,
    )
    print(f"{args.dataset}: complete in {folder}")
    return 0


def _archive_options(args: argparse.Namespace, dataset: str) -> dict:
    """The download options of a dataset fetched as numbered archives (gldv2, r1m): their URLs follow a pattern, so
    ``--sources`` does not apply."""
    from oxford_ir.errors import ConfigError

    if args.sources is not None:
        raise ConfigError(
            f"--sources does not apply to {dataset} (its URLs follow a pattern); use --base-url for a mirror"
        )
    keys = ("base_url", "keep_archives", "retries", "timeout")
    return {"progress": not args.no_progress, **{key: getattr(args, key) for key in keys}}


def _download_gldv2(args: argparse.Namespace) -> int:
    from oxford_ir.benchmarks.gldv2 import NUM_PARTS
    from oxford_ir.benchmarks.gldv2_download import PART_GB, download_gldv2, format_parts, parse_parts
    from oxford_ir.errors import ConfigError

    if args.parts is None:
        raise ConfigError(
            f"gldv2 has {NUM_PARTS} training TARs of about {PART_GB:g} GB each (about {NUM_PARTS * PART_GB:.0f} GB in "
            "all): choose them with --parts, e.g. --parts 0-3,7 (or --parts all)"
        )
    parts = parse_parts(args.parts)
    folder = download_gldv2(args.root, parts, **_archive_options(args, "gldv2"))
    print(f"gldv2: parts {format_parts(parts)} complete in {folder}")
    return 0


def _download_r1m(args: argparse.Namespace) -> int:
    from oxford_ir.benchmarks.part_lists import format_part_list as format_parts
    from oxford_ir.benchmarks.r1m import NUM_PARTS, download_r1m, parse_r1m_parts, r1m_status

    parts = parse_r1m_parts(args.parts)
    folder = download_r1m(args.root, parts, **_archive_options(args, "r1m"))
    done = r1m_status(folder)[2]
    print(f"r1m: parts {format_parts(parts)} extracted in {folder} ({len(done)} of {NUM_PARTS} parts there)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from oxford_ir.benchmarks.registry import load_listed_benchmark
    from oxford_ir.benchmarks.verify import verify_benchmark

    benchmark = load_listed_benchmark(args.benchmark, args.root, gt_file=args.gt_file)
    report = verify_benchmark(benchmark, workers=args.workers, progress=not args.no_progress)
    print(report.format(max_listed=args.max_listed, allow_missing=args.allow_missing))
    return 0 if report.passed(args.allow_missing) else 1


def _synthetic(args: argparse.Namespace) -> int:
    from oxford_ir.benchmarks.synthetic import SYNTHETIC_PRESETS, write_synthetic_benchmark
    from oxford_ir.errors import ConfigError

    photo_long_side = args.photo_long_side
    if args.image_size is not None:
        if photo_long_side is not None:
            raise ConfigError("give --photo-long-side only: --image-size is its deprecated name")
        log.warning("--image-size is deprecated and will be removed in the next release; use --photo-long-side")
        photo_long_side = args.image_size
    options: dict[str, int] = {}
    if args.preset is not None:
        if args.preset not in SYNTHETIC_PRESETS:
            raise ConfigError(f"unknown synthetic preset {args.preset!r}; choose one of {', '.join(SYNTHETIC_PRESETS)}")
        options.update(SYNTHETIC_PRESETS[args.preset])
    given = {
        "seed": args.seed,
        "n_landmarks": args.landmarks,
        "images_per_landmark": args.images_per_landmark,
        "queries_per_landmark": args.queries_per_landmark,
        "hard_per_landmark": args.hard_per_landmark,
        "junk_per_landmark": args.junk_per_landmark,
        "n_distractors": args.distractors,
        "photo_long_side": photo_long_side,
    }
    # only what the user gave: the generator's own defaults stay the single source of truth
    options.update({key: value for key, value in given.items() if value is not None})
    if args.workers is not None:
        options["workers"] = args.workers
    folder = write_synthetic_benchmark(args.root, **options)
    print(f"synthetic benchmark written to {folder}")
    return 0


@contextlib.contextmanager
def _log_to_stderr(level: int) -> Iterator[None]:
    """The package's messages to the current ``sys.stderr`` while a command runs, the handler removed after it: in
    one process (tests, notebooks) a later call never finds a handler writing to a stream that is closed by now."""
    logger = logging.getLogger("oxford_ir")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``oxford-ir-data``; returns the exit status (errors a user can fix exit 2)."""
    args = build_parser().parse_args(argv)
    commands = {"download": _download, "verify": _verify, "synthetic": _synthetic, "cache": _cache, "check": _check}
    with _log_to_stderr(logging.WARNING if args.quiet else logging.INFO):
        return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
