"""``oxford-ir-compare``: training runs side by side from their folders, without a W&B dashboard.

oxford-ir-compare logs/train/multiruns/2026-11-26_12-00-00            # every job of a sweep, finished or not
oxford-ir-compare logs/train/multiruns/A logs/train/runs/B --sort M    # runs of different sweeps together
oxford-ir-compare logs/train/multiruns/A --plot margin.png --sort loss.margin
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from oxford_ir.errors import exit_on_user_error
from oxford_ir.run_comparison import SORT_KEYS, differing_keys, format_comparison, plot_val_map, sort_runs
from oxford_ir.run_history import find_run_folders, is_run_folder, read_run

PLOT_NAME = "val_mAP.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oxford-ir-compare",
        description=(
            "Print one table of training runs (the overrides that differ between them, best val/mAP and its epoch, "
            "the final Easy/Medium/Hard mAP, wall time, best checkpoint) and plot val/mAP per epoch. Reads the run "
            "folders' files only (metrics.json, csv/metrics.csv or the W&B offline files, .hydra/overrides.yaml): "
            "works offline and on a sweep still running."
        ),
    )
    parser.add_argument(
        "folders", nargs="+", type=Path, metavar="FOLDER",
        help="a multirun folder (logs/train/multiruns/<time>: all its jobs) or run folders; several may be mixed",
    )  # fmt: skip
    parser.add_argument(
        "--sort", default="val", metavar="KEY",
        help=f"order of the rows: {', '.join(SORT_KEYS)} (metrics largest first) or an override column "
        "(default: val, the best val/mAP)",
    )  # fmt: skip
    parser.add_argument("--reverse", action="store_true", help="the other way round")
    parser.add_argument(
        "--plot", type=Path, metavar="PNG",
        help=f"where to write the plot (default: <multirun folder>/{PLOT_NAME} for one multirun folder, else "
        f"./{PLOT_NAME})",
    )  # fmt: skip
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    return parser


def default_plot_path(folders: Sequence[Path]) -> Path:
    """Beside the jobs when one multirun folder is compared (never inside a run folder), else here."""
    if len(folders) == 1 and not is_run_folder(folders[0]):
        return folders[0] / PLOT_NAME
    return Path(PLOT_NAME)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``oxford-ir-compare``; errors a user can fix are one line and exit 2."""
    args = build_parser().parse_args(argv)
    runs = [read_run(folder) for folder in find_run_folders(args.folders)]
    keys = differing_keys(runs)
    runs = sort_runs(runs, args.sort, keys, reverse=args.reverse)
    print(format_comparison(runs, keys))
    if not args.no_plot:
        path = args.plot or default_plot_path(args.folders)
        plot_val_map(runs, keys, path)
        print(f"val/mAP per epoch: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
