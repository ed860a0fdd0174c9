"""What a training run's folder says about it: its overrides, ``val/mAP`` per epoch, final evaluation, state, time.

A run folder (the Hydra output folder of ``oxford-ir-train``, see :mod:`oxford_ir.cli.run_folder`) holds ``.hydra/``
(config, choices, overrides), ``wandb_run_id``, ``checkpoints/``, ``metrics.json`` once the run has finished, and
the metrics logged per epoch: ``csv/metrics.csv`` (``logger=csv``) and/or W&B's transaction log
``wandb/offline-run-*/run-<id>.wandb`` (``logger=wandb``, offline by default). A multirun folder holds
``multirun.yaml`` and one folder per job (``0/``, ``1/``, ...). Everything is read from these files: no W&B
server, no torch; a run that is still being written reads as far as it got.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from oxford_ir.errors import DataError

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
    config: DictConfig | None = None

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
        if self.config is not None:
            missing = object()
            value = OmegaConf.select(self.config, key, default=missing, throw_on_resolution_failure=False)
            if value is not missing:
                return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
        return None


# -- finding runs ----------------------------------------------------------------------------------------------
def is_run_folder(path: Path) -> bool:
    return (path / ".hydra").is_dir()


def job_folders(path: Path) -> list[Path]:
    """The job folders of a multirun folder: numbered ones (started or not yet written) and any with ``.hydra/``."""
    jobs = [p for p in path.iterdir() if p.is_dir() and (p.name.isdigit() or is_run_folder(p))]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def find_run_folders(paths: Sequence[str | Path]) -> list[Path]:
    """The run folders named by ``paths`` (run folders, or multirun folders standing for all their jobs), each once."""
    found: dict[Path, Path] = {}
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise DataError(f"{given}: no such folder; {RUN_FOLDER_HELP}")
        if is_run_folder(path):
            runs = [path]
        elif path.is_dir() and ((path / "multirun.yaml").is_file() or job_folders(path)):
            runs = job_folders(path)
            if not runs:
                raise DataError(f"{given}: no job of this multirun has started yet; run the command again later")
        else:
            raise DataError(
                f"{given} is neither a run folder (no .hydra/) nor a multirun folder (no multirun.yaml, no job "
                f"folders 0/, 1/, ...); {RUN_FOLDER_HELP}"
            )
        for run in runs:
            found.setdefault(run.resolve(), run)
    return list(found.values())


# -- one run -----------------------------------------------------------------------------------------------------
def read_run(folder: Path) -> RunHistory:
    """Everything the comparison shows of the run in ``folder``, read from its files."""
    hydra_dir = folder / ".hydra"
    config = _load_yaml(hydra_dir / "config.yaml")
    hydra_cfg = _load_yaml(hydra_dir / "hydra.yaml")
    choices = {}
    if hydra_cfg is not None:
        raw = OmegaConf.select(hydra_cfg, "hydra.runtime.choices", default=None, throw_on_resolution_failure=False)
        choices = {str(k): str(v) for k, v in (raw or {}).items() if v is not None}
    max_epochs = None
    if config is not None:
        value = OmegaConf.select(config, "trainer.max_epochs", default=None, throw_on_resolution_failure=False)
        max_epochs = int(value) if isinstance(value, int) and value >= 0 else None

    results = _load_json(folder / "metrics.json")
    final_evaluations = (results or {}).get("evaluations", {}).get("final") or {}
    benchmark, final = next(iter(final_evaluations.items()), (None, {}))
    rows, source = logged_val_rows(folder)
    val_map = val_map_per_epoch(
        rows,
        untrained=(folder / UNTRAINED_FILE).is_file(),
        finished_with_evaluation=bool(final_evaluations),
        max_epochs=max_epochs,
    )
    in_use = folder_in_use(folder)
    status = "running" if in_use else "done" if results is not None else "unfinished"
    history = RunHistory(
        folder=folder,
        overrides=read_overrides(hydra_dir / "overrides.yaml"),
        status=status,
        val_map=val_map,
        source=source,
        max_epochs=max_epochs,
        final={k: float(v) for k, v in final.items()},
        benchmark=benchmark,
        wall_s=wall_seconds(folder),
        checkpoint=None,
        choices=choices,
        config=config,
    )
    best = history.best
    history.checkpoint = best_checkpoint(folder, best[0] if best else None)
    return history


def read_overrides(path: Path) -> dict[str, Any]:
    """``key -> value`` of a Hydra ``overrides.yaml`` (``+key`` and ``++key`` count as ``key``; ``~key``: None)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    listed = [str(o) for o in (_load_list(path) or [])]
    try:
        parsed = OverridesParser.create().parse_overrides(listed)
    except Exception as error:  # hydra's OverrideParseException: not what Hydra wrote
        raise DataError(f"{path}: not Hydra overrides ({error}); restore it or leave its run out") from None
    overrides = {}
    for override in parsed:
        key = override.key_or_group + (f"@{override.package}" if override.package else "")
        if key not in NOT_SETTINGS:
            overrides[key] = None if override.is_delete() else override.value()
    return overrides


def _load_yaml(path: Path) -> DictConfig | None:
    loaded = _load(path)
    return loaded if isinstance(loaded, DictConfig) else None


def _load_list(path: Path) -> ListConfig | None:
    loaded = _load(path)
    return loaded if isinstance(loaded, ListConfig) else None


def _load(path: Path) -> DictConfig | ListConfig | None:
    if not path.is_file():
        return None
    try:
        return OmegaConf.load(path)
    except Exception as error:  # a file cut short by a killed process, or not YAML
        raise DataError(f"{path} is not readable YAML ({error}); restore it or leave its run out") from None


def _load_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as error:
        raise DataError(f"{path} is not readable JSON ({error}); restore it or leave its run out") from None


# -- val/mAP per epoch -------------------------------------------------------------------------------------------
#: one logged validation: (epoch or None when not logged, val/mAP)
ValRow = tuple[int | None, float]


def logged_val_rows(folder: Path) -> tuple[list[ValRow], str | None]:
    """Every ``val/mAP`` the run logged, in order, from ``csv/metrics.csv`` or else from its W&B files."""
    csv_file = folder / CSV_METRICS
    if csv_file.is_file():
        return csv_val_rows(csv_file), "csv"
    files = wandb_run_files(folder)
    if files:
        return [row for path in files for row in wandb_val_rows(path)], "wandb"
    return [], None


def val_map_per_epoch(
    rows: Sequence[ValRow], *, untrained: bool, finished_with_evaluation: bool, max_epochs: int | None
) -> dict[int, float]:
    """``epoch -> val/mAP`` of the validations after each epoch, leaving out the other evaluations the loggers
    hold: the untrained network's (the first row, when the run kept ``untrained.json``) and the best checkpoint's
    after training (the last row of a run that finished with one, and any row past ``max_epochs``). A resumed run
    logs an epoch again: its later value counts."""
    rows = list(rows)
    if untrained and rows:
        rows = rows[1:]
    if finished_with_evaluation and rows:
        rows = rows[:-1]
    per_epoch: dict[int, float] = {}
    for index, (epoch, value) in enumerate(rows):
        epoch = index if epoch is None else epoch
        if max_epochs is not None and epoch >= max_epochs:
            continue
        per_epoch[epoch] = value
    return dict(sorted(per_epoch.items()))


def csv_val_rows(path: Path) -> list[ValRow]:
    """The rows of a Lightning ``metrics.csv`` that hold ``val/mAP``; a last line still being written is skipped."""
    text = path.read_text()
    text = text[: text.rfind("\n") + 1]
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        value = _number(row.get(VAL_METRIC))
        if value is not None:
            epoch = _number(row.get("epoch"))
            rows.append((None if epoch is None else int(epoch), value))
    return rows


def wandb_run_files(folder: Path) -> list[Path]:
    """The run's W&B transaction logs (one per session of a resumed run), oldest first."""
    id_file = folder / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    pattern = f"*-{run_id}/run-{run_id}.wandb" if run_id else "*/run-*.wandb"
    files = [p for p in (folder / "wandb").glob(pattern) if not p.parent.is_symlink()]
    # offline-run-20261126_120000-<id> (or run-... online): the time the session started
    return sorted(files, key=lambda p: (re.findall(r"\d{8}_\d{6}", p.parent.name) or [""])[0])


def wandb_val_rows(path: Path) -> list[ValRow]:
    """The history rows of a W&B run file that hold ``val/mAP``."""
    rows = []
    for record in wandb_records(path):
        if not record.HasField("history"):
            continue
        items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
        if VAL_METRIC in items:
            value = _number(json.loads(items[VAL_METRIC]))
            epoch = _number(json.loads(items["epoch"])) if "epoch" in items else None
            if value is not None:
                rows.append((None if epoch is None else int(epoch), value))
    return rows


#: the W&B transaction log (``run-<id>.wandb``, what ``wandb sync`` uploads): a 7-byte header, then LevelDB-style
#: 32 KiB blocks of chunks (crc32, length, type), each record a serialised ``wandb_internal_pb2.Record``
WANDB_MAGIC = b":W&B"
WANDB_BLOCK = 32768
WANDB_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file, without the W&B service; a record still being written ends the file."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if len(data) < WANDB_HEADER:  # a run that has just started
        return
    if data[:4] != WANDB_MAGIC:
        raise DataError(f"{path} is not a W&B run file (no {WANDB_MAGIC!r} header); move it out of the run folder")
    pos, pending = WANDB_HEADER, b""
    while pos + WANDB_HEADER <= len(data):
        space = WANDB_BLOCK - pos % WANDB_BLOCK
        if space < WANDB_HEADER:  # a block's tail too short for a chunk header is padding
            pos += space
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + WANDB_HEADER])
        pos += WANDB_HEADER
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += space - WANDB_HEADER
            continue
        if pos + length > len(data):
            return
        chunk, pos = data[pos : pos + length], pos + length
        if kind in (FIRST, MIDDLE):
            pending = chunk if kind == FIRST else pending + chunk
            continue
        raw, pending = (chunk if kind == FULL else pending + chunk), b""
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except DecodeError:
            return
        yield record


def _number(text: Any) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


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


def best_checkpoint(folder: Path, epoch: int | None) -> Path | None:
    """The run's best checkpoint: the one of ``checkpoints/`` (not ``last.ckpt``) whose name holds the best epoch,
    else the newest of them; None when there is none."""
    kept = [p for p in (folder / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    if epoch is not None:
        named = [p for p in kept if epoch in {int(n) for n in re.findall(r"\d+", p.stem)}]
        if len(named) == 1:
            return named[0]
    return max(kept, key=lambda p: p.stat().st_mtime, default=None)
