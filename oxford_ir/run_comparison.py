"""Runs side by side without a dashboard: one table (settings that differ, best ``val/mAP``, final mAP, time,
checkpoint) and one plot of any logged metric (``val/mAP`` by default) per epoch, drawn with PIL (no matplotlib).
Runs whose curves are identical are named in a note (the setting they differ in changed nothing) and drawn with
their own marker and dash, so that none hides another."""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oxford_ir.errors import ConfigError, DataError
from oxford_ir.fs import replace_file
from oxford_ir.run_history import VAL_METRIC, RunHistory

#: the final-evaluation columns: Revisited Easy / Medium / Hard mAP, or the original protocol's mAP
FINAL_COLUMNS = {"E": "E/mAP", "M": "M/mAP", "H": "H/mAP", "mAP": "mAP"}
#: --sort keys besides the setting columns; True: largest first
SORT_KEYS = {"val": True, "E": True, "M": True, "H": True, "mAP": True, "epoch": False, "wall": False, "job": False,
             "status": False}  # fmt: skip
WALL_HEADER = "wall (files)"


def differing_keys(runs: Sequence[RunHistory]) -> list[str]:
    """The settings overridden in any run whose value is not the same in every run, in first-seen order."""
    keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    return [key for key in keys if len({show_value(run.setting(key)) for run in runs}) > 1]


def show_value(value: Any) -> str:
    """A setting as the table shows it (YAML-like: ``true``, ``null``, ``[8,16]``)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def job_labels(runs: Sequence[RunHistory]) -> dict[Path, str]:
    """A short unique name per run: its folder relative to the folder all runs share (``0``, ``sweepA/1``)."""
    folders = [run.folder.resolve() for run in runs]
    if len(folders) == 1:
        return {runs[0].folder: folders[0].name}
    common = Path(os.path.commonpath(folders))
    return {run.folder: str(folder.relative_to(common)) for run, folder in zip(runs, folders, strict=True)}


def status_text(run: RunHistory) -> str:
    if run.status == "done":
        return "done"
    total = "?" if run.max_epochs is None else run.max_epochs
    return f"{run.status} ({run.epochs_logged}/{total} epochs)"


def sort_runs(runs: Sequence[RunHistory], key: str, keys: Sequence[str], reverse: bool = False) -> list[RunHistory]:
    """``runs`` ordered by ``key`` (a :data:`SORT_KEYS` name or a setting column); runs without a value last."""
    labels = job_labels(runs)
    values: dict[str, Callable[[RunHistory], Any]] = {
        "val": lambda r: r.best[1] if r.best else None,
        "epoch": lambda r: r.best[0] if r.best else None,
        "wall": lambda r: r.wall_s,
        "job": lambda r: _natural(labels[r.folder]),
        "status": lambda r: r.status,
        **{name: (lambda r, metric=metric: r.final.get(metric)) for name, metric in FINAL_COLUMNS.items()},
    }
    if key in values:
        get, descending = values[key], SORT_KEYS[key]
    elif key in keys:
        get, descending = (lambda r: _natural(show_value(r.setting(key)))), False
    else:
        columns = ", ".join([*SORT_KEYS, *keys])
        raise ConfigError(f"--sort {key}: sort by one of {columns}")
    present = [r for r in runs if get(r) is not None]
    absent = [r for r in runs if get(r) is None]
    return sorted(present, key=get, reverse=descending != reverse) + absent


def _natural(text: str) -> tuple:
    """Numbers by value, then text: 2 before 10, 0.05 before 0.1."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def format_comparison(runs: Sequence[RunHistory], keys: Sequence[str]) -> str:
    """The table: one row per run in the given order, mAP values in percent as in the literature."""
    labels = job_labels(runs)
    finals = [name for name, metric in FINAL_COLUMNS.items() if any(metric in run.final for run in runs)]
    finals = finals or ["E", "M", "H"]
    header = ["job", *keys, "status", "best val/mAP", "epoch", *[f"final {f}" for f in finals], WALL_HEADER,
              "best checkpoint"]  # fmt: skip
    rows = []
    for run in runs:
        best = run.best
        rows.append([
            labels[run.folder],
            *[_cut(show_value(run.setting(key)), SETTING_WIDTH) for key in keys],
            status_text(run),
            _percent(best[1] if best else None),
            str(best[0]) if best else "-",
            *[_percent(run.final.get(FINAL_COLUMNS[f])) for f in finals],
            _duration(run.wall_s),
            _shown_path(run.checkpoint),
        ])  # fmt: skip
    numeric = {header.index("best val/mAP"), header.index("epoch"), header.index(WALL_HEADER)}
    numeric |= {header.index(f"final {f}") for f in finals}
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        text = "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return text.rstrip()

    lines = [line(header), "-" * len(line(header)), *(line(row) for row in rows)]
    benchmarks = sorted({run.benchmark for run in runs if run.benchmark})
    protocol = " (E/M/H: Revisited Easy/Medium/Hard)" if "E" in finals else ""
    on = f" on {', '.join(benchmarks)}" if benchmarks else ""
    lines.append(f"mAP in %; epoch: 0-based, as in checkpoint names; final: the best checkpoint's mAP{protocol}{on}")
    lines.append(f"{WALL_HEADER}: from the run's first file to the last it wrote (a resumed run: pauses included)")
    return "\n".join(lines)


#: the widest a setting's cell gets (a whole config group set to null would fill the screen)
SETTING_WIDTH = 40


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _shown_path(path: Path | None) -> str:
    """Relative to the working folder when it is below it, else absolute."""
    if path is None:
        return "-"
    absolute = path.resolve()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


# -- the plot --------------------------------------------------------------------------------------------------
#: line colours, one per run in table order (matplotlib's tab10 without its grey, which text shades could match)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (188, 189, 34), (23, 190, 207)]  # fmt: skip
PLOT_SIZE = (960, 540)


@dataclass
class PlotBox:
    """Where the axes are in the image (pixels), and the title drawn above them."""

    left: int
    top: int
    right: int
    bottom: int
    title: str = ""


def plot_name(metric: str) -> str:
    """The plot's file name: the metric's name with ``/`` and other characters a file name should not hold as
    ``_`` (``val/mAP`` -> ``val_mAP.png``, ``train/loss_epoch`` -> ``train_loss_epoch.png``)."""
    return re.sub(r"[^\w.-]", "_", metric).strip("._") + ".png"


def is_percent(metric: str) -> bool:
    """mAP and precision values are fractions shown in % (as in the table); a loss is shown as it is."""
    return bool(re.search(r"mAP|mP@|P@|recall", metric))


def identical_curves(runs: Sequence[RunHistory], metric: str) -> list[list[RunHistory]]:
    """Groups (two or more, in the runs' order) of runs whose ``metric`` has the same value at every epoch/step."""
    groups: dict[tuple, list[RunHistory]] = {}
    for run in runs:
        axis, values = run.curve(metric)
        if values:
            groups.setdefault((axis, tuple(values.items())), []).append(run)
    return [group for group in groups.values() if len(group) > 1]


def identical_notes(runs: Sequence[RunHistory], metric: str, keys: Sequence[str]) -> list[str]:
    """One line per group of identical curves: which jobs, and which of the differing settings had no effect."""
    labels = job_labels(runs)
    notes = []
    for group in identical_curves(runs, metric):
        names = [labels[run.folder] for run in group]
        jobs = ", ".join(names[:-1]) + f" and {names[-1]}"
        differ = [key for key in keys if len({show_value(run.setting(key)) for run in group}) > 1]
        effect = (
            f"the setting{'s' if len(differ) > 1 else ''} they differ in ({', '.join(differ)}) "
            f"{'have' if len(differ) > 1 else 'has'} no effect on it"
            if differ
            else "they ran the same settings"
        )
        notes.append(f"jobs {jobs} have identical {metric} curves: {effect}")
    return notes


def sweep_name(runs: Sequence[RunHistory]) -> str:
    """The sweep(s) the runs belong to: their multirun folders' names (a lone run: its own folder's name)."""
    names = []
    for run in runs:
        parent = run.folder.resolve().parent
        name = parent.name if (parent / "multirun.yaml").is_file() or run.folder.name.isdigit() else run.folder.name
        if name not in names:
            names.append(name)
    return ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")


#: marker shapes, one per run in table order, so that runs drawn on top of one another stay visible
MARKERS = ("circle", "square", "triangle", "diamond", "cross")
#: dash patterns (pixels on, off) of the second, third... run of a group of identical curves
DASHES = ((10, 6), (4, 4), (14, 4, 4, 4))


def plot_metric(
    runs: Sequence[RunHistory], keys: Sequence[str], path: Path, metric: str = VAL_METRIC,
    size: tuple[int, int] = PLOT_SIZE,
) -> PlotBox:  # fmt: skip
    """Write a PNG of ``metric`` per epoch (or step): one line per run (colours from :data:`PALETTE` and markers from
    :data:`MARKERS` in the runs' order; dashed when it repeats another run's curve), titled with the metric and the
    sweep, the legend naming each run by its job and the settings that differ. Returns the axes' box."""
    from PIL import Image, ImageDraw

    font = _font(13)
    width, height = size
    legend_width = min(320, width // 3)
    box = PlotBox(left=64, top=36, right=width - legend_width - 16, bottom=height - 48)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    scale = 100.0 if is_percent(metric) else 1.0
    curves = [run.curve(metric) for run in runs]
    axis = "step" if any(a == "step" for a, values in curves if values) else "epoch"
    xs = [x for _, values in curves for x in values]
    values = [scale * v for _, series in curves for v in series.values() if math.isfinite(v)]
    x_low, x_high = (min(xs), max(xs)) if xs else (0, 1)
    x_high = max(x_high, x_low + 1)
    y_ticks = _ticks(min(values, default=0.0), max(values, default=100.0 if scale == 100 else 1.0))
    y_low, y_high = y_ticks[0], y_ticks[-1]

    def x_at(x: float) -> int:
        return round(box.left + (x - x_low) / (x_high - x_low) * (box.right - box.left))

    def y_at(value: float) -> int:
        return round(box.bottom - (value - y_low) / (y_high - y_low) * (box.bottom - box.top))

    grid, ink = (225, 225, 225), (0, 0, 0)
    for tick in y_ticks:
        y = y_at(tick)
        draw.line([(box.left, y), (box.right, y)], fill=grid)
        label = f"{tick:g}"
        draw.text((box.left - 6 - draw.textlength(label, font=font), y - 7), label, fill=ink, font=font)
    x_step = _ticks(x_low, x_high, 10)
    x_step = max(1, round(x_step[1] - x_step[0])) if len(x_step) > 1 else 1
    for tick in range(x_low - x_low % x_step, x_high + 1, x_step):
        if tick < x_low:
            continue
        x = x_at(tick)
        draw.line([(x, box.top), (x, box.bottom)], fill=grid)
        draw.text((x - draw.textlength(str(tick), font=font) / 2, box.bottom + 6), str(tick), fill=ink, font=font)
    draw.rectangle([box.left, box.top, box.right, box.bottom], outline=ink)
    unit = " (%)" if scale == 100 else ""
    box.title = title = f"{metric}{unit} per {axis}: {sweep_name(runs)}"
    draw.text((box.left, 10), _wrap([title], lambda t: draw.textlength(t, font=font), width - box.left - 8, 1)[0],
              fill=ink, font=font)  # fmt: skip
    draw.text(((box.left + box.right) / 2 - 20, height - 22), axis, fill=ink, font=font)

    labels = job_labels(runs)
    repeats = {}  # run folder -> (position in its group of identical curves, the group's first job)
    for group in identical_curves(runs, metric):
        for position, run in enumerate(group):
            repeats[run.folder] = (position, labels[group[0].folder])
    legend_x, legend_y = box.right + 24, box.top
    for index, run in enumerate(runs):
        colour = PALETTE[index % len(PALETTE)]
        marker = MARKERS[index % len(MARKERS)]
        position, first = repeats.get(run.folder, (0, ""))
        dash = DASHES[(position - 1) % len(DASHES)] if position else None
        points = [(x_at(x), y_at(scale * v)) for x, v in curves[index][1].items() if math.isfinite(v)]
        _polyline(draw, points, colour, 3 if dash is None else 2, dash)
        for x, y in points:
            _marker(draw, x, y, marker, colour, 4 if position == 0 else 3)
        words = [labels[run.folder], *(f"{key}={show_value(run.setting(key))}" for key in keys)]
        if position:
            words.append(f"(= job {first}, dashed)")
        lines = _wrap(words, lambda text: draw.textlength(text, font=font), width - legend_x - 34)
        if legend_y + 18 * len(lines) > height - 10:
            continue  # more runs than the legend holds: the table names them all
        _polyline(draw, [(legend_x, legend_y + 8), (legend_x + 22, legend_y + 8)], colour, 3, dash)
        _marker(draw, legend_x + 11, legend_y + 8, marker, colour, 4)
        for text in lines:
            draw.text((legend_x + 30, legend_y), text, fill=ink, font=font)
            legend_y += 16
        legend_y += 6

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    try:
        replace_file(path, buffer.getvalue())
    except (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
        raise DataError(f"cannot write the plot {path} ({error.strerror}): pass --plot <file> elsewhere") from None
    return box


def _polyline(draw: Any, points: Sequence[tuple[int, int]], colour: tuple, width: int, dash: tuple | None) -> None:
    """A line through ``points``; with ``dash`` (on, off, ... pixels) drawn in dashes along its whole length."""
    if len(points) < 2:
        return
    if dash is None:
        draw.line(list(points), fill=colour, width=width, joint="curve")
        return
    pattern, phase = list(dash), 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        length = math.hypot(x1 - x0, y1 - y0)
        done = 0.0
        while done < length:
            cycle = sum(pattern)
            at = phase % cycle
            edge, on = 0.0, True
            for part in pattern:
                if at < edge + part:
                    step = min(edge + part - at, length - done)
                    break
                edge, on = edge + part, not on
            if on:
                a, b = done / length, (done + step) / length
                draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                          fill=colour, width=width)  # fmt: skip
            done += step
            phase += step


def _marker(draw: Any, x: int, y: int, shape: str, colour: tuple, r: int) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=colour)
    else:
        draw.line([(x - r, y - r), (x + r, y + r)], fill=colour, width=2)
        draw.line([(x - r, y + r), (x + r, y - r)], fill=colour, width=2)


def _wrap(words: Sequence[str], measure: Callable[[str], float], width: float, max_lines: int = 3) -> list[str]:
    """``words`` as lines of at most ``width`` pixels (a word too long for a line is cut with "…")."""
    lines: list[str] = []
    for word in words:
        if lines and measure(f"{lines[-1]}  {word}") <= width:
            lines[-1] = f"{lines[-1]}  {word}"
            continue
        while len(word) > 2 and measure(word) > width:
            word = word[:-2] + "…"
        lines.append(word)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], lines[max_lines - 1][:-1] + "…"]
    return lines


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 x 10^k) covering ``low..high``."""
    if high - low < 1e-9:
        low, high = low - 1, high + 1
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    last = math.ceil(high / step) * step
    return [round(first + i * step, 10) for i in range(round((last - first) / step) + 1)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()
