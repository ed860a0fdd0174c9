"""``oxford-ir-compare``: training runs side by side from their folders, without a W&B dashboard.

oxford-ir-compare logs/train/multiruns/2026-11-26_12-00-00            # every job of a sweep, finished or not
oxford-ir-compare logs/train/multiruns/A logs/train/runs/B --sort M    # runs of different sweeps together
oxford-ir-compare logs/train/multiruns/A --plot margin.png --sort loss.margin
oxford-ir-compare logs/train/multiruns/A --metric train/loss_epoch     # any logged metric: train_loss_epoch.png

It reads run folders and writes only the plot: by default into the multirun folder its runs are the jobs of (a
run folder itself is never written to: its files' times are its wall time), elsewhere only where --plot says.
A damaged file is a ``warning:`` line on stderr and the rest is used.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from oxford_ir.errors import DataError, exit_on_user_error
from oxford_ir.run_comparison import (
    SORT_KEYS,
    differing_keys,
    format_comparison,
    identical_notes,
    plot_metric,
    plot_name,
    sort_runs,
)
from oxford_ir.run_history import VAL_METRIC, RunHistory, find_run_folders, is_multirun_folder, metric_names, read_run

PLOT_NAME = plot_name(VAL_METRIC)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oxford-ir-compare",
        description=(
            "Print one table of training runs (the overrides that differ between them, best val/mAP and its epoch, "
            "the final Easy/Medium/Hard mAP, wall time, best checkpoint) and plot a metric per epoch. Reads the run "
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
        "--metric", default=VAL_METRIC, metavar="NAME",
        help=f"the logged metric to plot, e.g. train/loss_epoch, val/loss, train/num_triplets (default: {VAL_METRIC})",
    )  # fmt: skip
    parser.add_argument(
        "--plot", type=Path, metavar="PNG",
        help="where to write the plot (default: <multirun folder>/<metric>.png, e.g. val_mAP.png, when the runs are "
        "jobs of one multirun folder; otherwise only with --plot)",
    )  # fmt: skip
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    return parser


def default_plot_path(runs: Sequence[RunHistory], metric: str) -> Path | None:
    """The multirun folder the runs are all jobs of, with the metric's file name; None when there is none: a run
    folder is never written to (its files' times are its wall time), nor any other folder unless --plot says so."""
    parents = {run.folder.resolve().parent for run in runs}
    if len(parents) == 1:
        (parent,) = parents
        if is_multirun_folder(parent):
            return parent / plot_name(metric)
    return None


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``oxford-ir-compare``; errors a user can fix are one line and exit 2, damaged files a
    ``warning:`` line each."""
    args = build_parser().parse_args(argv)
    runs = [read_run(folder) for folder in find_run_folders(args.folders)]
    for run in runs:
        for line in run.warnings:
            print(f"warning: {line}", file=sys.stderr)
    keys = differing_keys(runs)
    runs = sort_runs(runs, args.sort, keys, reverse=args.reverse)
    if not any(run.curve(args.metric)[1] for run in runs):
        logged = sorted({name for run in runs for name in metric_names(run.rows)})
        shown = ", ".join(logged[:30]) + (", ..." if len(logged) > 30 else "")
        raise DataError(f"--metric {args.metric}: no run logged it; logged: {shown or 'nothing yet'}")
    print(format_comparison(runs, keys))
    for note in identical_notes(runs, args.metric, keys):
        print(note)
    if not args.no_plot:
        path = args.plot or default_plot_path(runs, args.metric)
        if path is None:
            print(f"{args.metric} plot: not written (the runs are not the jobs of one multirun folder): pass --plot "
                  "<file>")  # fmt: skip
        else:
            box = plot_metric(runs, keys, path, args.metric)
            print(f"{box.title.split(':')[0].replace(' (%)', '')}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
