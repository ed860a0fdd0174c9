"""Runs side by side without a dashboard: one table (settings that differ, best ``val/mAP``, final mAP, time,
checkpoint) and one plot of ``val/mAP`` per epoch, drawn with PIL (no matplotlib)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oxford_ir.errors import ConfigError, DataError
from oxford_ir.fs import replace_file
from oxford_ir.run_history import RunHistory

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
    """Where the axes are in the image (pixels)."""

    left: int
    top: int
    right: int
    bottom: int


def plot_val_map(
    runs: Sequence[RunHistory], keys: Sequence[str], path: Path, size: tuple[int, int] = PLOT_SIZE
) -> PlotBox:
    """Write a PNG of ``val/mAP`` (%) per epoch: one line per run (colours from :data:`PALETTE` in the runs'
    order), the legend naming each run by its job and the settings that differ. Returns the axes' box."""
    from PIL import Image, ImageDraw

    font = _font(13)
    width, height = size
    legend_width = min(320, width // 3)
    box = PlotBox(left=64, top=36, right=width - legend_width - 16, bottom=height - 48)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    series = [run.val_map for run in runs]
    epochs = [e for s in series for e in s]
    values = [100 * v for s in series for v in s.values()]
    x_low, x_high = (min(epochs), max(epochs)) if epochs else (0, 1)
    x_high = max(x_high, x_low + 1)
    y_ticks = _ticks(min(values, default=0.0), max(values, default=100.0))
    y_low, y_high = y_ticks[0], y_ticks[-1]

    def x_at(epoch: float) -> int:
        return round(box.left + (epoch - x_low) / (x_high - x_low) * (box.right - box.left))

    def y_at(value: float) -> int:
        return round(box.bottom - (value - y_low) / (y_high - y_low) * (box.bottom - box.top))

    grid, ink = (225, 225, 225), (0, 0, 0)
    for tick in y_ticks:
        y = y_at(tick)
        draw.line([(box.left, y), (box.right, y)], fill=grid)
        label = f"{tick:g}"
        draw.text((box.left - 6 - draw.textlength(label, font=font), y - 7), label, fill=ink, font=font)
    x_step = max(1, (x_high - x_low + 9) // 10)
    for epoch in range(x_low, x_high + 1, x_step):
        x = x_at(epoch)
        draw.line([(x, box.top), (x, box.bottom)], fill=grid)
        draw.text((x - draw.textlength(str(epoch), font=font) / 2, box.bottom + 6), str(epoch), fill=ink, font=font)
    draw.rectangle([box.left, box.top, box.right, box.bottom], outline=ink)
    draw.text((box.left, 10), "val/mAP (%) per epoch", fill=ink, font=font)
    draw.text(((box.left + box.right) / 2 - 20, height - 22), "epoch", fill=ink, font=font)

    labels = job_labels(runs)
    legend_x, legend_y = box.right + 24, box.top
    for index, run in enumerate(runs):
        colour = PALETTE[index % len(PALETTE)]
        points = [(x_at(e), y_at(100 * v)) for e, v in run.val_map.items()]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3, joint="curve")
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        words = [labels[run.folder], *(f"{key}={show_value(run.setting(key))}" for key in keys)]
        lines = _wrap(words, lambda text: draw.textlength(text, font=font), width - legend_x - 34)
        if legend_y + 18 * len(lines) > height - 10:
            continue  # more runs than the legend holds: the table names them all
        draw.line([(legend_x, legend_y + 8), (legend_x + 22, legend_y + 8)], fill=colour, width=3)
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
    import math

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
