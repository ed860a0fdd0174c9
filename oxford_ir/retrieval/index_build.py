"""Building and updating a retrieval index (:func:`build_index`): embed what is new or changed, commit atomically.

The images come from :func:`~oxford_ir.retrieval.image_sources.resolve_images`; the format, and how a version is
committed atomically, are :mod:`oxford_ir.retrieval.index_format`; what a run did goes to ``report.json``
(:class:`~oxford_ir.retrieval.index_report.IndexReport`).

Checkpoints: a long build commits checkpoints (every ``checkpoint_every`` seconds, default 60, but never more
often than 20 times the time the last one took to write, so that they cost at most ~5% of the run; and when
interrupted or failing): valid indexes marked ``complete: false`` whose finished rows the next run reuses, so a
SIGKILL loses at most the last interval.

Concurrency: a build holds ``.lock`` (``flock``, released by the kernel when the process dies, also by
SIGKILL); a second build of the same folder is refused with a message naming the pid of the first.

Incremental updates: a file is unchanged when its relative path, size and mtime_ns equal those recorded;
only new and changed files are embedded, deleted ones dropped, the rows of the rest copied bit for bit. Every row
embedded records the size, mtime and pixel size of the file it embedded: a file whose size or mtime changes while
the run reads it is left out (skipped, with the reason) and embedded by the next run.
Rows are reused only when the existing index has the same fingerprint, images root and dtype;
``incremental="auto"`` (default) otherwise re-embeds everything with a warning, ``"strict"`` refuses
(:class:`~oxford_ir.errors.IndexFormatError`), ``"off"`` always re-embeds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from oxford_ir.errors import ConfigError, DataError, IndexFormatError
from oxford_ir.extraction.buckets import MAX_SHAPES
from oxford_ir.extraction.distributed import rank_and_world
from oxford_ir.extraction.embedding import embed_shard, gathered, plan_for_model, resolve_decode
from oxford_ir.extraction.planning import shard
from oxford_ir.fs import WORKER_TIMEOUT, escapes, exclusive_lock
from oxford_ir.images import upright_size
from oxford_ir.retrieval.budgeted_index import SEARCH_INDEX_FILE, BudgetOptions, build_budgeted_index
from oxford_ir.retrieval.image_sources import ImageSource, resolve_images
from oxford_ir.retrieval.index_format import (
    CURRENT_FILE,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE_NAMES,
    LOCK_FILE,
    PREPROCESSING,
    IndexEntry,
    RetrievalIndex,
    SkippedImage,
    index_fingerprint,
    remove_unreferenced,
    write_version,
)
from oxford_ir.retrieval.index_report import IndexReport, write_report
from oxford_ir.retrieval.model_spec import ModelSpec

log = logging.getLogger(__name__)

INCREMENTAL_MODES = ("auto", "strict", "off")
#: seconds between checkpoints of a long build (index.checkpoint_every)
CHECKPOINT_EVERY = 60.0
#: a checkpoint waits at least this many times as long as the last one took to write: <= ~5% of the run
_CHECKPOINT_SHARE = 20
#: why a file replaced during a run is not in the index it wrote (not kept in the manifest: the next run embeds it)
CHANGED_WHILE_INDEXED = "changed while it was being indexed: run oxford-ir-index again to index it"


@dataclass
class _Previous:
    """The rows of the existing index that may be reused, and its skipped files."""

    index: RetrievalIndex | None
    reusable: bool
    reason: str | None


def build_index(
    model: ModelSpec,
    images: ImageSource | str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_size: int | None = 1024,
    scales: Sequence[float] = (1.0,),
    dtype: str = "float16",
    batch_size: int = 16,
    num_workers: int = 2,
    device: str | torch.device = "cpu",
    progress: bool = True,
    incremental: str = "auto",
    checkpoint_every: float | None = CHECKPOINT_EVERY,
    batching: str = "bucket",
    max_shapes: int = MAX_SHAPES,
    aspect_tolerance: float = 0.1,
    precision: str = "32",
    channels_last: bool = False,
    decode: str = "cpu",
    worker_timeout: float | None = WORKER_TIMEOUT,
    budget: BudgetOptions | None = None,
) -> IndexReport:
    """Build or update the index of ``images`` in folder ``out`` with ``model``; returns what was done.

    ``batching``, ``max_shapes``, ``aspect_tolerance``, ``precision``, ``channels_last``, ``decode``: as
    :func:`~oxford_ir.extraction.embedding.extract_embeddings`. With bucket batching the buckets are chosen
    from the images embedded by the first build and kept in the manifest; updates reuse them. Inside a
    ``torch.distributed`` process group (``torchrun ... oxford-ir-index``) every process embeds its share of the
    planned batches and the first process writes the index, identical to one process's; intermediate commits
    are then skipped.

    Embeds only new and changed files (see the module docstring for ``incremental``); undecodable files are
    skipped and reported, never fatal (files that are not regular files, such as FIFOs, and symbolic links that
    lead outside the image folder, which the index's loader refuses, are skipped unread).
    ``checkpoint_every`` (seconds, None = never) commits the work done so far during a long run, so that a run
    killed without warning loses at most that much (checkpoints are spaced at least 20 times the time the last
    one took to write); an interruption (Ctrl-C or an error) also commits what was finished, then re-raises.
    ``worker_timeout``: seconds a DataLoader worker may take to deliver a batch (None: no limit); a worker that
    dies, hangs or fails raises :class:`~oxford_ir.errors.ResourceError`. A full disk or file-size limit raises
    the OSError (naming the file) after removing what was half-written. ``out/report.json`` records the run.
    ``budget`` (``index.memory``, ``index.recall``): a complete version also stores a search index chosen and tuned
    within it (:mod:`~oxford_ir.retrieval.budgeted_index`); when that fails, the rows are committed without it
    before the error is raised.
    """
    started = time.perf_counter()
    if dtype not in DTYPES:
        raise ConfigError(f"index.dtype={dtype!r}: choose float16 (half the disk and memory) or float32")
    if incremental not in INCREMENTAL_MODES:
        raise ConfigError(f"index.incremental={incremental!r}: choose one of {', '.join(INCREMENTAL_MODES)}")
    scales = [float(s) for s in scales]
    if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
        raise ConfigError(f"extraction.scales={scales}: give a non-empty list of positive factors, e.g. [1.0]")
    if image_size is not None and int(image_size) < 1:
        raise ConfigError(f"extraction.image_size={image_size}: a positive number of pixels (or null: full size)")
    image_size = None if image_size is None else int(image_size)
    if batch_size < 1 or num_workers < 0:
        raise ConfigError(f"batch_size={batch_size}, num_workers={num_workers}: need batch_size >= 1, workers >= 0")
    source = images if isinstance(images, ImageSource) else resolve_images(images)
    out = _prepare_out(Path(out).expanduser())
    device = torch.device(device)
    rank, world = rank_and_world()
    writer = rank == 0  # in a process group every process embeds its share; the first one writes

    lock = exclusive_lock(out / LOCK_FILE, wait=False, busy=lambda pid: _busy(out, pid))
    with lock if writer else contextlib.nullcontext():
        if writer:
            remove_unreferenced(out)
        model_fp = model.fingerprint()
        fingerprint = index_fingerprint(model_fp, image_size, scales, batching=batching, precision=precision)
        previous = _previous_index(out, fingerprint, source.root, dtype, incremental)
        old = previous.index if previous.reusable else None
        old_rows = {e.path: (i, e) for i, e in enumerate(old.entries)} if old is not None else {}
        old_skipped = {s.path: s for s in old.skipped} if old is not None else {}
        everything_before = {e.path for e in previous.index.entries} if previous.index is not None else set()

        # what changed: stat every file once
        current: dict[str, tuple[int, int]] = {}
        skipped: dict[str, SkippedImage] = {}
        todo: list[str] = []
        kept_rows: dict[str, IndexEntry] = {}
        outside = {name: why for _, name, why in escapes(source.root, source.paths)}  # what the loader refuses
        for rel in source.paths:
            if rel in outside:
                skipped[rel] = SkippedImage(rel, f"{outside[rel]}, outside the image folder: not read")
                continue
            try:
                info = os.stat(source.root / rel)
            except OSError as error:
                skipped[rel] = SkippedImage(rel, f"cannot read the file: {error.strerror or error}")
                continue
            if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block the reader
                skipped[rel] = SkippedImage(rel, "not a regular file (a FIFO, socket or device): not read")
                continue
            current[rel] = (info.st_size, info.st_mtime_ns)
            entry = old_rows.get(rel, (None, None))[1]
            bad = old_skipped.get(rel)
            if entry is not None and (entry.size, entry.mtime_ns) == current[rel]:
                kept_rows[rel] = entry
            elif bad is not None and (bad.size, bad.mtime_ns) == current[rel]:
                skipped[rel] = bad  # the same bad file as last time: not decoded again
            else:
                todo.append(rel)
        pending = set(todo)
        removed = sorted(p for p in everything_before if p not in kept_rows and p not in pending)

        state = _BuildState(
            out=out,
            source=source,
            model=model,
            model_fp=model_fp,
            fingerprint=fingerprint,
            image_size=image_size,
            scales=scales,
            dtype=dtype,
            old=old,
            old_rows=old_rows,
            kept=kept_rows,
            current=current,
            skipped=skipped,
            pooling_power=(old.manifest.get("extraction", {}).get("pooling_power") if old is not None else None),
            batching=batching,
            precision=precision,
            buckets=old.buckets if old is not None else (),
            budget=budget,
        )
        nothing_to_do = (
            not todo
            and not removed
            and old is not None
            and old.complete
            and {s.path for s in old.skipped} == {p for p, s in skipped.items() if s.size is not None}
            and (old.manifest.get("search_index") or {}).get("settings") == (budget and budget.settings())
        )
        embed_seconds = 0.0
        attempted = 0
        if todo:
            net = model.build(device)
            if channels_last:
                net.to(memory_format=torch.channels_last)
            state.pooling_power = float(getattr(net, "power", 1.0))
            embed_started = time.perf_counter()
            files = [source.root / p for p in todo]
            # a fresh bucket table covers the images to embed and, for a benchmark, its query crops (which
            # searches embed with this table), as oxford-ir-eval's does; an update keeps the index's table
            extra = [] if state.buckets else list(source.queries)
            plan = plan_for_model(
                net,
                files + [path for path, _ in extra],
                image_size,
                batch_size,
                bboxes=[None] * len(files) + [box for _, box in extra],
                batching=batching,
                max_shapes=max_shapes,
                buckets=state.buckets if state.buckets else None,
                aspect_tolerance=aspect_tolerance,
            ).part(0, len(files), batch_size, aspect_tolerance)
            state.batching = plan.mode
            state.buckets = plan.buckets  # the table it was given or chose, and any bucket a larger image added
            sizes = plan.sizes
            stream = gathered(  # in a process group: this process's share first, then everyone's rows
                embed_shard(
                    net,
                    files,
                    image_size,
                    plan,
                    shard(plan.batches, rank, world),
                    on_device=resolve_decode(decode, device),
                    scales=scales,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    device=device,
                    precision=precision,
                    channels_last=channels_last,
                    progress=progress and rank == 0,
                    desc="indexing",
                    worker_timeout=worker_timeout,
                ),
                len(todo),
                int(net.embedding_dim),
            )
            last_commit, commit_seconds = time.monotonic(), 0.0
            try:
                for positions, vectors, info in stream:
                    attempted += len(positions)
                    names = [todo[p] for p in positions]
                    if vectors is None:
                        for rel, reason in zip(names, info, strict=True):
                            size, mtime_ns = current[rel]
                            skipped[rel] = SkippedImage(rel, _short_reason(reason, source.root / rel), size, mtime_ns)
                        continue
                    fresh = _unchanged(source.root, names, current)  # else it changed while it was read
                    for rel in (rel for rel, ok in zip(names, fresh, strict=True) if not ok):
                        skipped[rel] = SkippedImage(rel, CHANGED_WHILE_INDEXED)
                    state.add(
                        [rel for rel, ok in zip(names, fresh, strict=True) if ok],
                        vectors.numpy()[fresh],
                        [
                            _upright(sizes, p, source.root / todo[p])
                            for p, ok in zip(positions, fresh, strict=True)
                            if ok
                        ],
                    )
                    if (
                        writer
                        and checkpoint_every is not None
                        and time.monotonic() - last_commit >= max(checkpoint_every, _CHECKPOINT_SHARE * commit_seconds)
                    ):
                        commit_started = time.monotonic()
                        state.commit(complete=False)
                        last_commit = time.monotonic()
                        commit_seconds = last_commit - commit_started
            except BaseException:
                if writer and state.uncommitted:
                    with contextlib.suppress(Exception):
                        state.commit(complete=False)
                        log.warning("interrupted: committed %d finished images to %s", len(state.new), out)
                raise
            finally:
                embed_seconds = time.perf_counter() - embed_started

        ordered = [p for p in source.paths if p in state.kept or p in state.new]
        final_skipped = [skipped[p] for p in source.paths if p in skipped]
        if not ordered:
            report = _report(state, previous, [], removed, final_skipped, attempted, started, embed_seconds, False)
            write_report(out, report)
            raise DataError(
                f"images={source.spec or source.root}: none of the {len(source.paths)} files could be read, so no "
                f"index was written (first: {final_skipped[0].path}: {final_skipped[0].reason})"
                if final_skipped
                else f"images={source.spec or source.root}: no images to index"
            )
        wrote = writer and not nothing_to_do
        if wrote:
            state.commit(complete=True)
        elif old is not None:
            state.version = old.version
        report = _report(state, previous, ordered, removed, final_skipped, attempted, started, embed_seconds, wrote)
        if writer:
            write_report(out, report)
        return report


def _unchanged(root: Path, names: Sequence[str], current: dict[str, tuple[int, int]]) -> np.ndarray:
    """Which files still have the size and mtime they had when listed: only then are the embedding, the pixel size
    read from the header before decoding and the recorded size and mtime all of the same file."""
    fresh = []
    for rel in names:
        try:
            info = os.stat(root / rel)
            fresh.append((info.st_size, info.st_mtime_ns) == current[rel])
        except OSError:
            fresh.append(False)
    return np.asarray(fresh, dtype=bool)


def _upright(sizes: Sequence[tuple[int, int] | None], position: int, path: Path) -> tuple[int, int]:
    """The (width, height) planning read from the header; decoded fine, so the header is readable."""
    size = sizes[position] or upright_size(path)
    if size is None:
        raise DataError(f"cannot read the size of {path} from its header although it decoded; re-run the index")
    return size


def _short_reason(message: str, path: Path) -> str:
    """A DataError message without the repeated file name."""
    for prefix in (f"cannot decode image {path}: ", f"image {path} is ", f"image not found: {path}"):
        if message.startswith(prefix):
            return message[len(prefix) :] or "the file disappeared"
    return message


def _report(
    state: _BuildState,
    previous: _Previous,
    ordered: list[str],
    removed: list[str],
    skipped: list[SkippedImage],
    attempted: int,
    started: float,
    embed_seconds: float,
    wrote: bool,
) -> IndexReport:
    before = {e.path for e in previous.index.entries} if previous.index is not None else set()
    new = [p for p in ordered if p in state.new]
    dropped = sorted(set(removed) | {p for p in before if p not in state.kept and p not in state.new})
    return IndexReport(
        out=state.out,
        version=state.version,
        count=len(ordered),
        embedding_dim=state.embedding_dim or 0,
        dtype=state.dtype,
        added=[p for p in new if p not in before],
        updated=[p for p in new if p in before],
        removed=dropped,
        kept=sum(p in state.kept for p in ordered),
        skipped=skipped,
        attempted=attempted,
        seconds=time.perf_counter() - started,
        embed_seconds=embed_seconds,
        wrote=wrote,
        rebuilt=None if previous.reusable else previous.reason,
    )


@dataclass
class _BuildState:
    """Rows of the index being built: reused ones (from the old index) and newly embedded ones."""

    out: Path
    source: ImageSource
    model: ModelSpec
    model_fp: str
    fingerprint: str
    image_size: int | None
    scales: list[float]
    dtype: str
    #: the existing index when its rows may be reused, else None
    old: RetrievalIndex | None
    #: path -> (row, entry) of ``old``
    old_rows: dict[str, tuple[int, IndexEntry]]
    #: unchanged files whose old rows are reused
    kept: dict[str, IndexEntry]
    #: path -> (size, mtime_ns) of every file that could be stat'ed
    current: dict[str, tuple[int, int]]
    skipped: dict[str, SkippedImage]
    pooling_power: float | None
    batching: str = "bucket"
    precision: str = "32"
    #: bucket batching: the input shapes of every row (the old index's, plus any a larger new image needed)
    buckets: tuple[tuple[int, int], ...] = ()
    #: index.memory / index.recall: a complete version stores a budgeted search index
    budget: BudgetOptions | None = None
    new: dict[str, tuple[np.ndarray, IndexEntry]] = field(default_factory=dict)
    uncommitted: int = 0
    version: str = ""
    embedding_dim: int | None = None

    def __post_init__(self) -> None:
        if self.old is not None:
            self.embedding_dim = self.old.embedding_dim

    def add(self, names: list[str], vectors: np.ndarray, sizes: list[tuple[int, int]]) -> None:
        finite = np.isfinite(vectors).all(axis=1)
        for rel, vector, size, ok in zip(names, vectors, sizes, finite, strict=True):
            file_size, mtime_ns = self.current[rel]
            if not ok:
                self.skipped[rel] = SkippedImage(rel, "the model gave a non-finite embedding", file_size, mtime_ns)
                continue
            if self.embedding_dim is not None and vector.shape[0] != self.embedding_dim:
                raise IndexFormatError(
                    f"index {self.out}: the model now gives {vector.shape[0]}-dimensional embeddings, the index holds "
                    f"{self.embedding_dim}, with the same fingerprint; rebuild it with incremental=off"
                )
            self.embedding_dim = int(vector.shape[0])
            self.new[rel] = (vector, IndexEntry(rel, file_size, mtime_ns, size[0], size[1]))
            self.skipped.pop(rel, None)
            self.uncommitted += 1

    def rows(self, complete: bool) -> tuple[list[IndexEntry], np.ndarray]:
        """Entries and stored-dtype embeddings in source order.

        A checkpoint (``complete=False``) also keeps the old rows of changed files not yet re-embedded, with
        their old size and mtime, so the next run still sees them as changed.
        """
        dtype = np.dtype(self.dtype)
        entries: list[IndexEntry] = []
        new_vectors, old_rows, is_new = [], [], []
        for rel in self.source.paths:
            if rel in self.new:
                vector, entry = self.new[rel]
                new_vectors.append(vector)
            elif rel in self.kept or (not complete and rel in self.old_rows and rel in self.current):
                row, entry = self.old_rows[rel]
                old_rows.append(row)
            else:
                continue
            is_new.append(rel in self.new)
            entries.append(entry)
        embeddings = np.zeros((len(entries), self.embedding_dim or 0), dtype)
        mask = np.asarray(is_new, dtype=bool)
        if new_vectors:  # rows normalised each on its own (bit-identical whatever else is in the commit)
            embeddings[mask] = _normalise(np.stack(new_vectors), dtype)
        if old_rows:  # copied bit for bit
            embeddings[~mask] = np.asarray(self.old.embeddings[np.asarray(old_rows, dtype=np.int64)])
        return entries, embeddings

    def commit(self, complete: bool) -> None:
        entries, embeddings = self.rows(complete)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "complete": complete,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": self.model.to_dict(),
            "model_description": self.model.describe(),
            "model_fingerprint": self.model_fp,
            "fingerprint": self.fingerprint,
            "extraction": {
                "image_size": self.image_size,
                "scales": self.scales,
                "pooling_power": self.pooling_power,
                "preprocessing": PREPROCESSING,
                "batching": self.batching,
                "precision": self.precision,
                **({"buckets": [list(b) for b in self.buckets]} if self.batching == "bucket" else {}),
            },
            "dtype": self.dtype,
            "count": len(entries),
            "embedding_dim": int(embeddings.shape[1]),
            "images": {"root": str(self.source.root), "source": self.source.spec or str(self.source.root)},
            "skipped": [asdict(s) for p, s in sorted(self.skipped.items()) if s.size is not None],
            "tool": _tool_versions(),
        }
        extra: dict[str, bytes] = {}
        if complete and self.budget is not None:
            try:
                built = build_budgeted_index(embeddings, self.budget)
            except ConfigError:  # the budget or the recall cannot be met: keep the rows, then say so
                self.version = write_version(self.out, entries, embeddings, manifest)
                self.uncommitted = 0
                raise
            manifest["search_index"] = built.info
            extra[SEARCH_INDEX_FILE] = built.serialize()
        self.version = write_version(self.out, entries, embeddings, manifest, extra)
        self.uncommitted = 0


def _normalise(vectors: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Rows at unit L2 norm in the stored dtype: each row re-normalised in float32 first when rounding would
    matter for it (always for float16)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    redo = np.ones(len(v), dtype=bool) if dtype == np.float16 else np.abs(norms[:, 0] - 1.0) > 1e-5
    return np.where(redo[:, None], v / np.maximum(norms, 1e-12), v).astype(dtype)


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"torch": torch.__version__, "numpy": np.__version__}
    with contextlib.suppress(PackageNotFoundError):
        versions["oxford-ir"] = version("oxford-ir")
    return versions


def _prepare_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a folder for the index (it is created when missing)")
    if out.is_dir() and not (out / CURRENT_FILE).exists():
        foreign = sorted(p.name for p in out.iterdir() if not INDEX_FILE_NAMES.match(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ConfigError(
                f"out={out} is a folder with other files ({shown}) "
                "and no index; give a new or empty folder so that nothing of yours is mixed with or replaced by "
                "index files"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"out={out}: cannot create the index folder ({error.strerror or error})") from None
    return out.resolve()


def _busy(out: Path, pid: int | None) -> IndexFormatError:
    who = f"another oxford-ir-index run (pid {pid})" if pid is not None else "another oxford-ir-index run"
    return IndexFormatError(
        f"index {out} is being updated by {who}; wait for it to finish, then run this command again (it embeds "
        "only what is still missing)"
    )


def _previous_index(out: Path, fingerprint: str, root: Path, dtype: str, incremental: str) -> _Previous:
    """The existing index in ``out`` and whether its rows can be reused."""
    if not (out / CURRENT_FILE).exists():
        return _Previous(None, False, None)
    try:
        index = RetrievalIndex.load(out, warn_incomplete=False)
    except IndexFormatError as error:
        if incremental == "strict":
            raise
        log.warning("%s; replacing it with a new index", error)
        return _Previous(None, False, f"the existing index could not be read ({error})")
    differences = []
    if index.fingerprint != fingerprint:
        differences.append(
            f"another model or extraction settings ({index.model.describe()}, image_size={index.image_size}, "
            f"scales={index.scales})"
        )
    if index.root != root:
        differences.append(f"another images root ({index.root})")
    if index.dtype != dtype:
        differences.append(f"dtype {index.dtype}")
    if incremental == "off":
        return _Previous(index, False, "incremental=off")
    if differences:
        reason = f"the existing index was built with {'; '.join(differences)}"
        if incremental == "strict":
            raise IndexFormatError(
                f"index {out}: {reason}; its rows cannot be reused. Use incremental=auto to re-embed every image "
                "into it, or another out= folder"
            )
        log.warning("%s: re-embedding every image", reason)
        return _Previous(index, False, reason)
    return _Previous(index, True, None)
