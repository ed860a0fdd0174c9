"""What a training run's folder says about it: its overrides, ``val/mAP`` per epoch, final evaluation, state, time.

A run folder (the Hydra output folder of ``oxford-ir-train``, see :mod:`oxford_ir.cli.run_folder`) holds ``.hydra/``
(config, choices, overrides), ``wandb_run_id``, ``checkpoints/``, ``metrics.json`` once the run has finished, and
the metrics logged per epoch: ``csv/metrics.csv`` (``logger=csv``) and/or W&B's transaction log
``wandb/offline-run-*/run-<id>.wandb`` (``logger=wandb``, offline by default). A multirun folder holds
``multirun.yaml`` and one folder per job (``0/``, ``1/``, ...). Everything is read from these files: no W&B
server, torch only to check that the best checkpoint loads; a run that is still being written reads as far as it
got. Nothing read is trusted: a damaged file gives a warning line and what it does not say is left out
(:mod:`oxford_ir.logged_metrics`), YAML is read as plain data (nothing instantiated or resolved), and a checkpoint
that would not load is never named as the best one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from oxford_ir.errors import DataError
from oxford_ir.logged_metrics import Row, Warnings, csv_rows, number, wandb_rows

#: files of :mod:`oxford_ir.cli.run_folder` (not imported from there: it imports Lightning, which takes seconds)
WANDB_ID_FILE = "wandb_run_id"
RUN_LOCK = ".lock"
UNTRAINED_FILE = "untrained.json"
CSV_METRICS = Path("csv") / "metrics.csv"
#: the metric that selects the best checkpoint, logged after every validation
VAL_METRIC = "val/mAP"
#: overrides that say how a run was started, not what it trains: never a column of the comparison
NOT_SETTINGS = ("resume",)

RUN_FOLDER_HELP = (
    "pass a run folder (the 'run folder' oxford-ir-train prints, e.g. logs/train/runs/<time>) or a multirun "
    "folder (logs/train/multiruns/<time>)"
)


@dataclass
class RunHistory:
    """One run as its folder tells it."""

    folder: Path
    #: ``key -> value`` of the overrides it was started with (``.hydra/overrides.yaml``), values parsed as Hydra does
    overrides: dict[str, Any]
    #: ``done`` (metrics.json written), ``running`` (a process holds the run folder) or ``unfinished``
    status: str
    #: epoch (0-based, as in checkpoint names) -> ``val/mAP`` of the validation after that epoch
    val_map: dict[int, float]
    #: where ``val_map`` was read: ``csv``, ``wandb`` or None (nothing logged yet)
    source: str | None
    max_epochs: int | None
    #: the evaluation of the best checkpoint after training (``E/mAP``, ``M/mAP``, ``H/mAP``, ... or ``mAP``)
    final: dict[str, float]
    benchmark: str | None
    #: seconds from the run's first file to its last (includes the pauses of a resumed run)
    wall_s: float | None
    checkpoint: Path | None
    choices: dict[str, str] = field(default_factory=dict)
    #: ``.hydra/config.yaml`` as plain data, unresolved
    config: dict | None = None
    #: every row logged after an epoch's training or validation (not the untrained or final evaluation)
    rows: list[Row] = field(default_factory=list)
    #: one line per damaged file, line or record, and per checkpoint that would not load
    warnings: list[str] = field(default_factory=list)

    @property
    def best(self) -> tuple[int, float] | None:
        """(epoch, value) of the best ``val/mAP``; the first of equal ones, as the checkpoint callback keeps it."""
        if not self.val_map:
            return None
        epoch = max(self.val_map, key=lambda e: (self.val_map[e], -e))
        return epoch, self.val_map[epoch]

    @property
    def epochs_logged(self) -> int:
        """How far it got: the epochs up to its last validation."""
        return max(self.val_map) + 1 if self.val_map else 0

    def setting(self, key: str) -> Any:
        """The value of ``key`` in this run: its override, else its config group choice, else its config value."""
        if key in self.overrides:
            return self.overrides[key]
        if key in self.choices:
            return self.choices[key]
        return select(self.config, key)

    def curve(self, metric: str) -> tuple[str, dict[int, float]]:
        """``(axis, x -> value)`` of ``metric`` per epoch (or per step, see :func:`curve`)."""
        return curve(self.rows, metric)


# -- finding runs ----------------------------------------------------------------------------------------------
#: what Hydra writes into a job's folder when the job starts: the files that make a folder a run folder
RUN_MARKERS = (Path(".hydra") / "config.yaml", Path(".hydra") / "overrides.yaml")
#: what Hydra writes into a sweep's folder when the sweep starts
MULTIRUN_MARKER = "multirun.yaml"


def is_run_folder(path: Path) -> bool:
    """A folder Hydra ran a job in: it holds ``.hydra/config.yaml`` and ``.hydra/overrides.yaml``."""
    return all((path / marker).is_file() for marker in RUN_MARKERS)


def job_folders(path: Path) -> list[Path]:
    """The run folders directly inside ``path`` (a multirun's jobs): numbered ones first, by number."""
    try:
        entries = [p for p in path.iterdir() if p.is_dir()]
    except OSError:
        return []
    jobs = [p for p in entries if is_run_folder(p)]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def is_multirun_folder(path: Path) -> bool:
    """A sweep's folder: it holds ``multirun.yaml`` (Hydra writes it when the sweep starts) or, copied without it,
    at least one run folder."""
    return path.is_dir() and not is_run_folder(path) and ((path / MULTIRUN_MARKER).is_file() or bool(job_folders(path)))


def find_run_folders(paths: Sequence[str | Path]) -> list[Path]:
    """The run folders named by ``paths`` (run folders, or multirun folders standing for all their jobs), each once."""
    found: dict[Path, Path] = {}
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise DataError(f"{given}: no such folder; {RUN_FOLDER_HELP}")
        if is_run_folder(path):
            runs = [path]
        elif is_multirun_folder(path):
            runs = job_folders(path)
            if not runs:
                raise DataError(f"{given}: no job of this multirun has started yet; run the command again later")
        else:
            raise DataError(
                f"{given} is neither a run folder (no .hydra/config.yaml and .hydra/overrides.yaml) nor a multirun "
                f"folder (no {MULTIRUN_MARKER}, no run folder inside); {RUN_FOLDER_HELP}"
            )
        for run in runs:
            found.setdefault(run.resolve(), run)
    return list(found.values())


# -- one run -----------------------------------------------------------------------------------------------------
def read_run(folder: Path) -> RunHistory:
    """Everything the comparison shows of the run in ``folder``, read from its files; what a damaged file does not
    say is left out with a line in ``warnings``."""
    warnings = Warnings()
    hydra_dir = folder / ".hydra"
    config = _load_mapping(hydra_dir / "config.yaml", warnings)
    hydra_cfg = _load_mapping(hydra_dir / "hydra.yaml", warnings)
    raw_choices = select(hydra_cfg, "hydra.runtime.choices")
    choices = {str(k): str(v) for k, v in raw_choices.items() if v is not None} if isinstance(raw_choices, dict) else {}
    value = select(config, "trainer.max_epochs")
    max_epochs = value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    results = _load_json(folder / "metrics.json", warnings)
    evaluations = results.get("evaluations") if isinstance(results, dict) else None
    final_evaluations = evaluations.get("final") if isinstance(evaluations, dict) else None
    final_evaluations = final_evaluations if isinstance(final_evaluations, dict) else {}
    benchmark, final = next(iter(final_evaluations.items()), (None, {}))
    final = {str(k): v for k, v in (final.items() if isinstance(final, dict) else []) if number(v) is not None}
    in_use = folder_in_use(folder)
    rows, source = logged_rows(folder, warnings, still_writing=bool(in_use))
    rows = epoch_rows(
        rows,
        untrained=(folder / UNTRAINED_FILE).is_file(),
        finished_with_evaluation=bool(final_evaluations),
        max_epochs=max_epochs,
    )
    status = "running" if in_use else "done" if (folder / "metrics.json").is_file() else "unfinished"
    history = RunHistory(
        folder=folder,
        overrides=read_overrides(hydra_dir / "overrides.yaml", warnings),
        status=status,
        val_map=curve(rows, VAL_METRIC)[1],
        source=source,
        max_epochs=max_epochs,
        final={k: float(v) for k, v in final.items()},
        benchmark=None if benchmark is None else str(benchmark),
        wall_s=wall_seconds(folder),
        checkpoint=None,
        choices=choices,
        config=config,
        rows=rows,
        warnings=warnings,
    )
    best = history.best
    history.checkpoint = best_checkpoint(folder, best[0] if best else None, warnings)
    warnings.close()
    return history


def read_overrides(path: Path, warnings: Warnings | None = None) -> dict[str, Any]:
    """``key -> value`` of a Hydra ``overrides.yaml`` (``+key`` and ``++key`` count as ``key``; ``~key``: None).
    Values are parsed as Hydra parses them, never resolved: an interpolation stays its text."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    warnings = Warnings() if warnings is None else warnings
    listed = _load(path, warnings)
    if not isinstance(listed, list):
        if listed is not None:
            warnings.add(path, f"{path}: not a list of overrides: its settings are not shown")
        return {}
    parser = OverridesParser.create()
    overrides = {}
    for position, text in enumerate(listed):
        try:
            (override,) = parser.parse_overrides([str(text)])
        except Exception as error:  # hydra's OverrideParseException: not what Hydra wrote
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            warnings.add(path, f"{path}: entry {position}, {str(text)[:40]!r}, is not a Hydra override ({first}): "
                               "left out")  # fmt: skip
            continue
        key = override.key_or_group + (f"@{override.package}" if override.package else "")
        if key not in NOT_SETTINGS:
            overrides[key] = None if override.is_delete() else override.value()
    return overrides


def select(tree: Any, key: str, depth: int = 0) -> Any:
    """The value at the dotted ``key`` of a plain (unresolved) config tree, None when absent. An interpolation of
    another node (``${loss.margin}``) is followed; any other (a resolver: ``${oc.env:X}``, ``${eval:...}``) is
    shown as its text and never run: a run folder is data, not code."""
    node = tree
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    target = re.fullmatch(r"\$\{([\w.\-]+)\}", node) if isinstance(node, str) else None
    if target is not None and depth < 8:  # a chain of interpolations, never a loop forever
        return select(tree, target.group(1), depth + 1)
    return node


def _load_mapping(path: Path, warnings: Warnings) -> dict | None:
    loaded = _load(path, warnings)
    if loaded is not None and not isinstance(loaded, dict):
        warnings.add(path, f"{path}: not a mapping of settings: left out")
        return None
    return loaded


def _load(path: Path, warnings: Warnings) -> Any:
    """A YAML file as plain data (dicts, lists, scalars), None when absent or damaged (with a warning). Loaded by
    OmegaConf (YAML's safe loader: no object is built) and turned into containers without resolving anything."""
    if not path.is_file():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as error:  # a file cut short by a killed process, not UTF-8, not YAML
        first = (str(error).splitlines() or [type(error).__name__])[0]
        warnings.add(path, f"{path}: not readable YAML ({first[:120]}): left out")
        return None


def _load_json(path: Path, warnings: Warnings) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_bytes())
    except (ValueError, OSError) as error:
        warnings.add(path, f"{path}: not readable JSON ({str(error)[:120]}): its final evaluation is not shown")
        return None


# -- what was logged, per epoch ------------------------------------------------------------------------------------
def logged_rows(folder: Path, warnings: Warnings, still_writing: bool = False) -> tuple[list[Row], str | None]:
    """Every row the run logged, in order, from ``csv/metrics.csv`` or else from its W&B files."""
    csv_file = folder / CSV_METRICS
    if csv_file.is_file():
        return csv_rows(csv_file, warnings, still_writing), "csv"
    files = wandb_run_files(folder)
    if files:
        last = len(files) - 1
        rows = [row for i, path in enumerate(files) for row in wandb_rows(path, warnings, still_writing and i == last)]
        return rows, "wandb"
    return [], None


def epoch_rows(
    rows: Sequence[Row], *, untrained: bool, finished_with_evaluation: bool, max_epochs: int | None
) -> list[Row]:
    """``rows`` without the evaluations that are not an epoch's validation: the untrained network's (the first
    row holding ``val/mAP``, when the run kept ``untrained.json``) and the best checkpoint's after training (the
    last such row of a run that finished with one, when it is past the epochs trained: logged with the epoch count,
    never with a trained epoch, so a log cut before it keeps its last epoch), and any row past ``max_epochs``."""
    rows = [row for row in rows if not (max_epochs is not None and row.get("epoch", 0) >= max_epochs)]
    validations = [i for i, row in enumerate(rows) if VAL_METRIC in row]
    dropped = set()
    if untrained and validations:
        dropped.add(validations.pop(0))
    if finished_with_evaluation and validations:
        last = rows[validations[-1]]
        trained = {row["epoch"] for row in rows if "epoch" in row and any(k.startswith("train/") for k in row)}
        if "epoch" not in last or not trained or last["epoch"] not in trained:
            dropped.add(validations[-1])
    return [row for i, row in enumerate(rows) if i not in dropped]


def curve(rows: Sequence[Row], metric: str) -> tuple[str, dict[int, float]]:
    """``(axis, x -> value)`` of ``metric``: per epoch (0-based, as in checkpoint names) when it was logged once an
    epoch, per step when several steps of an epoch logged it. A resumed run logs an epoch (or step) again: its
    later value counts."""
    found = [row for row in rows if metric in row]
    steps_per_epoch: dict[float, set[float]] = {}
    for row in found:
        if "epoch" in row and "step" in row:
            steps_per_epoch.setdefault(row["epoch"], set()).add(row["step"])
    axis = "step" if any(len(steps) > 1 for steps in steps_per_epoch.values()) else "epoch"
    values: dict[int, float] = {}
    for index, row in enumerate(found):
        x = row.get(axis)
        values[index if x is None else int(x)] = row[metric]
    return axis, dict(sorted(values.items()))


def metric_names(rows: Sequence[Row]) -> list[str]:
    """The metrics logged in ``rows`` (not ``epoch`` and ``step``), sorted."""
    return sorted({key for row in rows for key in row} - {"epoch", "step"})


def wandb_run_files(folder: Path) -> list[Path]:
    """The run's W&B transaction logs (one per session of a resumed run), oldest first."""
    id_file = folder / WANDB_ID_FILE
    try:
        run_id = id_file.read_text(errors="replace").strip() if id_file.is_file() else ""
    except OSError:
        run_id = ""
    run_id = run_id if re.fullmatch(r"[\w-]+", run_id) else ""
    pattern = f"*-{run_id}/run-{run_id}.wandb" if run_id else "*/run-*.wandb"
    files = [p for p in (folder / "wandb").glob(pattern) if not p.parent.is_symlink() and p.is_file()]
    # offline-run-20261126_120000-<id> (or run-... online): the time the session started
    return sorted(files, key=lambda p: (re.findall(r"\d{8}_\d{6}", p.parent.name) or [""])[0])


# -- state, time, checkpoint -------------------------------------------------------------------------------------
#: ``struct flock`` of the 64-bit platforms: its layout and where l_type sits in it
FLOCK_LAYOUTS = {"linux": ("hhqqi4x", 0), "darwin": ("qqihh", 3)}


def folder_in_use(folder: Path) -> bool | None:
    """Whether a process holds the run folder's lock (``oxford_ir.cli.run_folder.run_folder_lock``: a training run
    writes there now). Asked with ``F_GETLK``, which takes no lock: a run starting at this moment is never refused.
    None: cannot tell on this platform."""
    try:
        import fcntl
    except ImportError:
        return None
    platform = next((p for p in FLOCK_LAYOUTS if sys.platform.startswith(p)), None)
    if platform is None or struct.calcsize("P") != 8:
        return None
    layout, type_index = FLOCK_LAYOUTS[platform]
    fields = [0] * len(struct.unpack(layout, bytes(struct.calcsize(layout))))
    fields[type_index] = fcntl.F_WRLCK  # "could I take it for writing?" over the whole file (start 0, length 0)
    try:
        fd = os.open(folder / RUN_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, *fields))
    except OSError:
        return None
    finally:
        os.close(fd)
    return struct.unpack(layout, answer)[type_index] != fcntl.F_UNLCK


def wall_seconds(folder: Path) -> float | None:
    """Seconds from the run's first file (``.hydra/``, ``wandb_run_id``: written when it started) to the last
    file it wrote; for a run still going, so far. File times: a folder copied without them reads wrong."""
    starts = [folder / WANDB_ID_FILE, *(folder / ".hydra").glob("*.yaml")]
    start = min((p.stat().st_mtime for p in starts if p.is_file()), default=None)
    if start is None:
        return None
    end = start
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):  # a file replaced while we look
                end = max(end, os.lstat(os.path.join(root, name)).st_mtime)
    return end - start


def best_checkpoint(folder: Path, epoch: int | None, warnings: Warnings | None = None) -> Path | None:
    """The run's best checkpoint: the one of ``checkpoints/`` (not ``last.ckpt``) whose name holds the best epoch,
    else the newest of them; None when there is none, or when it would not load (with a warning saying why)."""
    kept = [p for p in (folder / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt" and p.is_file()]
    chosen = None
    if epoch is not None:
        named = [p for p in kept if epoch in {int(n) for n in re.findall(r"\d+", p.stem)}]
        if len(named) == 1:
            chosen = named[0]
    if chosen is None:
        chosen = max(kept, key=lambda p: p.stat().st_mtime, default=None)
    problem = None if chosen is None else checkpoint_problem(chosen)
    if problem is not None:
        if warnings is not None:
            warnings.add(chosen, f"{chosen}: {problem}: not shown as the best checkpoint")
        return None
    return chosen


#: what a checkpoint of :class:`~oxford_ir.models.module.RetrievalModule` holds, as
#: :func:`oxford_ir.models.checkpoint.load_retrieval_checkpoint` checks it (not imported: it imports Lightning,
#: seconds for a table; tests/test_compare.py checks the two agree)
HYPER_PARAMS_KEY = "hyper_parameters"
REQUIRED_HPARAMS = ("embedder", "loss", "distance", "optimizer")


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` would not load as a checkpoint of this project, or None. Cheap: the zip archive's directory
    (a file cut short has none), then the pickled dict's keys, read as ``load_retrieval_checkpoint`` reads it
    (``weights_only``: nothing but tensors and plain data) with the tensors memory-mapped, not read."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "an empty file (0 bytes)"
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist()):
                return "not a PyTorch checkpoint (a zip archive without data.pkl)"
    except zipfile.BadZipFile:
        return "not a whole PyTorch checkpoint (cut short, or not a zip archive: an interrupted save or copy?)"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds on damaged files; each is "does not load"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"does not load ({first[:120]})"
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        return "not a Lightning checkpoint (no state_dict)"
    hparams = checkpoint.get(HYPER_PARAMS_KEY)
    missing = [k for k in REQUIRED_HPARAMS if not isinstance(hparams, dict) or k not in hparams]
    if missing:
        return f"not written by RetrievalModule (its hyper_parameters have no {', '.join(missing)})"
    return None
