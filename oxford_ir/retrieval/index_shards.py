"""Indexes built by many processes or machines: ``index.shard=i/N`` builds one share, ``index.merge=true`` joins them.

``oxford-ir-index images=<images> out=indexes/photos index.shard=1/4`` lists the images as a whole build does and
embeds the second of four contiguous runs of that listing (``[i*n//N, (i+1)*n//N)``) into its own, ordinary index
folder ``indexes/photos.shards/1-of-4/`` (incremental, atomic, checkpointed: each shard restarts on its own), with
``shard.json`` recording the shard and a sha256 of the whole listing. ``index.shard=auto`` takes ``i/N`` from a
SLURM job array (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``) or torchrun
(``RANK`` of ``WORLD_SIZE``; each process then embeds on its own GPU, ``LOCAL_RANK``, without a process group).

``oxford-ir-index out=indexes/photos index.merge=true`` (:func:`merge_shards`) checks that the shards ``0..N-1``
are all there, complete, of the same listing, and built with the same model, extraction settings, dtype and image
folder (else it names two shards that differ and how), then writes their rows, in shard order, as a new version of
``indexes/photos`` (atomically, as every build): the listing's order, so the rows, and hence any top-k, are those of
one index built at once (bucket batching: the shards' bucket tables may differ, which changes embeddings at the
float-rounding level only; ``extraction.batching=shape`` is bit-exact). The merged index updates as any other.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oxford_ir.errors import ConfigError, IndexFormatError
from oxford_ir.extraction.planning import union_buckets
from oxford_ir.fs import exclusive_lock, replace_file
from oxford_ir.retrieval.budgeted_index import SEARCH_INDEX_FILE, BudgetOptions, build_budgeted_index
from oxford_ir.retrieval.image_sources import ImageSource
from oxford_ir.retrieval.index_build import _busy, _prepare_out
from oxford_ir.retrieval.index_format import (
    LOCK_FILE,
    RetrievalIndex,
    remove_unreferenced,
    write_version,
)
from oxford_ir.retrieval.index_report import IndexReport, write_report

log = logging.getLogger(__name__)

SHARD_FILE = "shard.json"
_SHARD_DIR = re.compile(r"^(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``; ``local_rank`` when started by torchrun (its GPU)."""

    index: int
    count: int
    local_rank: int | None = None

    def device(self, asked: str) -> torch.device | None:
        """Under torchrun with CUDA and ``extraction.device`` auto or cuda: this process's GPU; else None."""
        if self.local_rank is None or asked not in ("auto", "cuda") or not torch.cuda.is_available():
            return None
        return torch.device("cuda", self.local_rank % torch.cuda.device_count())

    def folder(self, out: str | os.PathLike) -> Path:
        """``<out>.shards/<index>-of-<count>``."""
        return shards_dir(out) / f"{self.index}-of-{self.count}"

    def select(self, source: ImageSource, out: str | os.PathLike) -> tuple[ImageSource, Path]:
        """This shard's contiguous run of the listing, and its folder."""
        n = len(source.paths)
        part = source.paths[self.index * n // self.count : (self.index + 1) * n // self.count]
        log.info("shard %d of %d: images %d of %d", self.index, self.count, len(part), n)
        return ImageSource(source.root, part, source.spec, source.queries), self.folder(out)

    def record(self, source: ImageSource, folder: Path) -> None:
        """``shard.json``: which share of which listing the folder holds (written after each build)."""
        data = {
            "index": self.index,
            "count": self.count,
            "listed": len(source.paths),
            "listing": listing_sha256(source),
        }
        replace_file(folder / SHARD_FILE, (json.dumps(data, indent=2) + "\n").encode())


def shards_dir(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser()
    return out.with_name(out.name + ".shards")


def listing_sha256(source: ImageSource) -> str:
    return hashlib.sha256("\n".join([str(source.root), *source.paths]).encode()).hexdigest()


def parse_shard(value: Any, environ: dict[str, str] | None = None) -> Shard:
    """``"1/4"`` -> shard 1 of 4; ``"auto"``: from a SLURM job array or torchrun (module docstring)."""
    env = os.environ if environ is None else environ
    text = str(value).strip()
    if text == "auto":
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            return _checked(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]), text)
        if int(env.get("WORLD_SIZE", "1") or 1) > 1:
            shard = _checked(int(env["RANK"]), int(env["WORLD_SIZE"]), text)
            return Shard(shard.index, shard.count, int(env.get("LOCAL_RANK", "0") or 0))
        raise ConfigError(
            "index.shard=auto: neither a SLURM job array (SLURM_ARRAY_TASK_ID) nor torchrun (WORLD_SIZE > 1) started "
            "this process; give the shard as index.shard=<i>/<N>, e.g. index.shard=0/4"
        )
    match = re.fullmatch(r"(\d+)\s*/\s*(\d+)", text)
    if match is None:
        raise ConfigError(f"index.shard={text!r}: give <i>/<N> with 0 <= i < N (e.g. index.shard=0/4), or auto")
    return _checked(int(match[1]), int(match[2]), text)


def _checked(index: int, count: int, text: str) -> Shard:
    if not 0 <= index < count:
        raise ConfigError(f"index.shard={text!r}: shard {index} of {count} does not exist; give 0 <= i < N")
    return Shard(index, count)


# -- merging ---------------------------------------------------------------------------------------
def find_shards(out: str | os.PathLike) -> list[Path]:
    """The shard folders of ``out``, in shard order; refuses a mix of shard counts or a missing shard."""
    folder = shards_dir(out)
    found: dict[int, dict[int, Path]] = {}
    if folder.is_dir():
        for path in folder.iterdir():
            match = _SHARD_DIR.match(path.name)
            if match and path.is_dir():
                found.setdefault(int(match[2]), {})[int(match[1])] = path
    if not found:
        raise ConfigError(
            f"index.merge: no shards in {folder}; build them first with oxford-ir-index images=<images> out={out} "
            "index.shard=<i>/<N> (one run per shard)"
        )
    if len(found) > 1:
        sets = ", ".join(f"{len(v)} of {n} shards" for n, v in sorted(found.items()))
        raise ConfigError(
            f"index.merge: {folder} holds shards of {len(found)} different splits ({sets}); delete the folders of "
            "the split you no longer want, then merge again"
        )
    count, shards = next(iter(found.items()))
    missing = [i for i in range(count) if i not in shards]
    if missing:
        raise ConfigError(
            f"index.merge: shard(s) {', '.join(f'{i}/{count}' for i in missing)} of {count} missing in {folder}; "
            f"build them with oxford-ir-index ... out={out} index.shard={missing[0]}/{count}"
        )
    return [shards[i] for i in range(count)]


def _settings(index: RetrievalIndex) -> dict[str, Any]:
    """What must agree between shards, with a description for people."""
    return {
        "model and extraction settings": (
            index.fingerprint,
            f"{index.model.describe()}, image_size={index.image_size}, scales={index.scales}, "
            f"batching={index.batching}, precision={index.precision}",
        ),
        "dtype": (index.dtype, index.dtype),
        "embedding size": (index.embedding_dim, str(index.embedding_dim)),
        "image folder": (str(index.root), str(index.root)),
    }


def merge_shards(out: str | os.PathLike, *, progress: bool = True, budget: BudgetOptions | None = None) -> IndexReport:
    """Join the shards of ``out`` into the index ``out`` (module docstring); returns what was done.

    Needs the memory of the merged embeddings (the shards are memory-mapped). ``budget`` (``index.memory``): the
    merged index stores a search index chosen and tuned for all its rows (a shard's own is not carried over).
    """
    started = _dt.datetime.now(_dt.timezone.utc)
    folders = find_shards(out)
    shards, records = [], []
    for folder in folders:
        index = RetrievalIndex.load(folder, mmap=True, warn_incomplete=False)
        if not index.complete:
            raise IndexFormatError(
                f"shard {folder} is a checkpoint of an interrupted build; run its oxford-ir-index command "
                f"(index.shard={folder.name.replace('-of-', '/')}) again to finish it, then merge"
            )
        try:
            record = json.loads((folder / SHARD_FILE).read_text())
        except (OSError, ValueError):
            raise IndexFormatError(
                f"shard {folder} has no readable {SHARD_FILE}: it was not built with index.shard=; rebuild it with "
                f"index.shard={folder.name.replace('-of-', '/')}"
            ) from None
        shards.append(index)
        records.append(record)
    first, first_settings = shards[0], _settings(shards[0])
    for folder, index, record in zip(folders, shards, records, strict=True):
        for what, (value, described) in _settings(index).items():
            if value != first_settings[what][0]:
                raise IndexFormatError(
                    f"index.merge: shard {folders[0]} and shard {folder} were built with different {what} "
                    f"({first_settings[what][1]} / {described}); rebuild {folder} with the settings of the others"
                )
        if (record.get("listing"), record.get("listed")) != (records[0].get("listing"), records[0].get("listed")):
            raise IndexFormatError(
                f"index.merge: shard {folders[0]} and shard {folder} split different listings of the images "
                f"({records[0].get('listed')} / {record.get('listed')} files): images were added or removed "
                "between their runs; run every shard again (each embeds only what it lacks), then merge"
            )
    entries = [e for index in shards for e in index.entries]
    paths = [e.path for e in entries]
    if len(set(paths)) != len(paths):
        raise IndexFormatError(f"index.merge: the shards of {out} hold some images twice; run every shard again")
    embeddings = np.concatenate([np.asarray(index.embeddings) for index in shards])
    manifest = {k: v for k, v in first.manifest.items() if k not in ("files", "search_index")}  # a shard's own
    manifest.update(
        complete=True,
        created=started.isoformat(timespec="seconds"),
        count=len(entries),
        skipped=[asdict(s) for index in shards for s in index.skipped],
        shards={"count": len(folders), "folders": [str(f) for f in folders], "listing": records[0].get("listing")},
    )
    if first.batching == "bucket":
        manifest["extraction"] = {
            **manifest["extraction"],
            "buckets": [list(b) for b in union_buckets(*(index.buckets for index in shards))],
        }
    target = _prepare_out(Path(out).expanduser())
    with exclusive_lock(target / LOCK_FILE, wait=False, busy=lambda pid: _busy(target, pid)):
        remove_unreferenced(target)
        before = _previous_paths(target)
        extra = {}
        if budget is not None:
            built = build_budgeted_index(embeddings, budget)
            manifest["search_index"], extra = built.info, {SEARCH_INDEX_FILE: built.serialize()}
        version = write_version(target, entries, embeddings, manifest, extra)
        report = IndexReport(
            out=target,
            version=version,
            count=len(entries),
            embedding_dim=int(embeddings.shape[1]),
            dtype=first.dtype,
            added=[p for p in paths if p not in before],
            updated=[],
            removed=sorted(before - set(paths)),
            kept=sum(p in before for p in paths),
            skipped=[s for index in shards for s in index.skipped],
            attempted=0,
            seconds=(_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(),
            embed_seconds=0.0,
            wrote=True,
        )
        write_report(target, report)
    if progress:
        log.info("merged %d shards (%d images) into %s", len(folders), len(entries), target)
    return report


def _previous_paths(out: Path) -> set[str]:
    try:
        return {e.path for e in RetrievalIndex.load(out, mmap=True, warn_incomplete=False).entries}
    except IndexFormatError:
        return set()
