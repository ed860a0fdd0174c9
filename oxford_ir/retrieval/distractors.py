"""Distractors added to a benchmark's database: ``roxford5k+r1m``, ``rparis6k+folder:/data/distractors``.

A name ``<benchmark>+r1m`` evaluates the benchmark's queries against its database plus revisitop's 1M distractors
(the images of the parts downloaded into ``<data_dir>/revisitop1m/jpg``, :mod:`~oxford_ir.benchmarks.r1m`);
``<benchmark>+folder:<path>`` adds the images of any folder (searched recursively, as ``oxford-ir-index images=``).

The distractors are embedded once per model and extraction settings into an ordinary index
(:func:`~oxford_ir.retrieval.index_build.build_index`: incremental, atomic, restartable) in
``<index_dir>/<label>-<key>``, ``key`` a hash of the index fingerprint (model by content, image size, scales,
batching, precision, preprocessing), the decoding, the dtype and the image folder; a later evaluation of the same
model and settings finds every row there and embeds nothing (images added to the folder since are embedded).

Ranking (:func:`distractors_above`): the database images are ranked exactly among themselves, as without
distractors; what the distractors change is how many of them each database image has above it, which is counted
exactly (every distractor score, by blocks: a binary search among the database's sorted scores) and handed to the
protocol (:mod:`~oxford_ir.benchmarks.metrics`), which then equals the published evaluation of the full ranking of
database + distractors (database first on equal scores).

Budgeted search (``distractors.memory``, as ``oxford-ir-index index.memory``): the distractor index also stores a
faiss index chosen within that memory and tuned to ``distractors.recall`` (recall@10 against exact search,
:mod:`~oxford_ir.retrieval.budgeted_index`); each query then scores only its ``distractors.top`` best distractors
by that index, re-scored exactly (:func:`distractors_above_top`). A database image below all of them counts
``top`` distractors above it, a lower bound: the ranking is exact down to the top-th distractor (up to the index's
recall), and positives further down rank higher than in the full ranking (mAP an upper bound there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oxford_ir.benchmarks.r1m import NUM_IMAGES, r1m_status
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.extraction.distributed import barrier
from oxford_ir.retrieval.budgeted_index import BudgetOptions, load_stored_index, parse_memory
from oxford_ir.retrieval.image_sources import ImageSource, resolve_images
from oxford_ir.retrieval.index_build import build_index
from oxford_ir.retrieval.index_format import DTYPES, RetrievalIndex, index_fingerprint
from oxford_ir.retrieval.model_spec import ModelSpec

log = logging.getLogger(__name__)

R1M = "r1m"
FOLDER_PREFIX = "folder:"
#: distractor rows scored at once (upcast to float32 into one buffer: 16k x 2048 = 128 MB; scores 16k x 70 queries)
BLOCK_ROWS = 1 << 14


def split_name(name: str) -> tuple[str, str | None]:
    """``"roxford5k+r1m"`` -> ``("roxford5k", "r1m")``; ``"x+folder:/d"`` -> ``("x", "folder:/d")``; no ``+``
    distractors -> ``(name, None)``."""
    if name.endswith("+" + R1M):
        return name[: -len(R1M) - 1], R1M
    base, plus, folder = name.partition("+" + FOLDER_PREFIX)
    if plus:
        if not folder.strip():
            raise ConfigError(f"benchmarks: {name!r}: give the folder of distractor images after folder:")
        return base, FOLDER_PREFIX + folder
    return name, None


def label(distractors: str) -> str:
    """What the table calls them: ``r1m``, or the folder's name."""
    return R1M if distractors == R1M else Path(distractors[len(FOLDER_PREFIX) :]).expanduser().name or "folder"


def distractor_images(distractors: str, data_dir: Path) -> tuple[ImageSource, str]:
    """The distractor images and a note for the table (a partial R1M is a subset)."""
    if distractors == R1M:
        folder, listed, parts = r1m_status(data_dir)
        if not folder.is_dir():
            raise DataError(
                f"no R1M distractors in {folder}: fetch them with `oxford-ir-data download r1m --root {data_dir}` "
                "(--parts 1-10 for a tenth of them)"
            )
        source = resolve_images(folder)
        source = ImageSource(source.root, source.paths, R1M)
        total = listed or NUM_IMAGES
        if len(source) < total:
            note = f"{len(source):,} of the {total:,} R1M distractors (a subset: not comparable with published +R1M)"
        else:
            note = f"{len(source):,} R1M distractors"
        return source, note
    source = resolve_images(Path(distractors[len(FOLDER_PREFIX) :]).expanduser())
    return source, f"{len(source):,} distractors from {source.root}"


@dataclass
class DistractorSet:
    """Embedded distractors ready to be ranked against: the index's rows (memory-mapped), as the evaluated model
    sees them (whitened when it whitens)."""

    name: str
    label: str
    index: RetrievalIndex
    note: str
    report: dict[str, Any]
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: the budgeted index's search (None: exact) and how many distractors it returns per query
    searcher: Any = None
    top: int = 1000
    block_rows: int = BLOCK_ROWS

    @property
    def search(self) -> str:
        return "exact" if self.searcher is None else "budgeted"

    @property
    def recall(self) -> float:
        """1 for exact search; the budgeted index's recall@10 measured when it was built."""
        return 1.0 if self.searcher is None else float(self.index.manifest["search_index"].get("recall_at_10", 0.0))

    @property
    def search_note(self) -> str:
        """The table's words for how the distractors were searched."""
        if self.searcher is None:
            return "exact search"
        info = self.index.manifest["search_index"]
        return f"budgeted search ({info.get('key')}, recall@10 {self.recall:.3f}; top {self.top} distractors per query)"

    def above(self, db: torch.Tensor | np.ndarray, queries: torch.Tensor | np.ndarray) -> np.ndarray:
        """For each database image and query, how many distractors rank before it (:func:`distractors_above`, or
        :func:`distractors_above_top` through the budgeted index)."""
        if self.searcher is None:
            rows = self.index.embeddings
            return distractors_above(db, queries, rows, transform=self.transform, block=self.block_rows)
        scores, _ = self.searcher.search(torch.as_tensor(queries, dtype=torch.float32).cpu().numpy(), self.top)
        return distractors_above_top(db, queries, scores)

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` says of them."""
        budgeted = (
            {} if self.searcher is None else {"top": self.top, "search_index": self.index.manifest["search_index"]}
        )
        return {
            "distractors": self.name,
            "images": len(self.index),
            "index": str(self.index.path),
            "search": self.search,
            "recall": self.recall,
            **budgeted,
            **self.report,
        }


def distractors_above(
    db: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray,
    distractors: np.ndarray,
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    block: int = BLOCK_ROWS,
) -> np.ndarray:
    """``(n_db, n_queries)`` int64: for each database image and query, the number of distractors whose score is
    higher (strictly: on equal scores the database image comes first, as in the concatenated ranking).

    Scores are float32 products on the CPU, the database's exactly those of
    :func:`~oxford_ir.benchmarks.ranking.rank_database`. ``distractors`` may be float16 and memory-mapped: it is
    read by blocks of ``block`` rows (``transform`` applied to each, e.g. a whitening). About 40 s per million
    distractors of 2048 dimensions and 70 queries on this project's 2-core machine under a load of 12, 0.44 of the
    float32 products alone (``experiments/bench/distractors.py``).
    """
    q = torch.as_tensor(queries, dtype=torch.float32).cpu()
    db_scores = (torch.as_tensor(db, dtype=torch.float32).cpu() @ q.T).T.contiguous()  # (n_q, n_db)
    # each distractor is above the database images of lower score: a prefix of the database sorted by score, whose
    # length a binary search finds; counting the prefix lengths (hist) and summing them from the top gives the counts
    ascending, order = torch.sort(db_scores, dim=1)
    hist = torch.zeros((db_scores.shape[0], db_scores.shape[1] + 1), dtype=torch.int64)
    with warnings.catch_warnings():  # a read-only memory map is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(np.asarray(distractors))
    buffer = torch.empty((min(block, len(source)), q.shape[1]), dtype=torch.float32)
    for start in range(0, len(source), block):
        chunk = source[start : start + block]
        rows = buffer[: len(chunk)].copy_(chunk)  # upcast into one buffer (numpy's float16 cast is 3x slower)
        if transform is not None:
            rows = transform(rows)
        prefix = torch.searchsorted(ascending, q @ rows.T)  # (n_q, rows): database scores strictly below
        hist.scatter_add_(1, prefix, torch.ones_like(prefix))
    above_sorted = hist.sum(dim=1, keepdim=True) - hist.cumsum(dim=1)[:, :-1]  # distractors above sorted position j
    return torch.empty_like(above_sorted).scatter_(1, order, above_sorted).T.numpy()


def distractors_above_top(
    db: torch.Tensor | np.ndarray, queries: torch.Tensor | np.ndarray, top_scores: np.ndarray
) -> np.ndarray:
    """:func:`distractors_above` from each query's best distractor scores only (``top_scores``: n_queries x top,
    -inf for none): exact where a database image scores above the lowest of them, ``top`` (a lower bound) below."""
    q = torch.as_tensor(queries, dtype=torch.float32).cpu()
    db_scores = (torch.as_tensor(db, dtype=torch.float32).cpu() @ q.T).T.contiguous()  # (n_q, n_db)
    ascending = torch.sort(
        torch.as_tensor(np.ascontiguousarray(top_scores, dtype=np.float32)), dim=1
    ).values.contiguous()
    return (ascending.shape[1] - torch.searchsorted(ascending, db_scores, right=True)).T.numpy()


def index_key(fingerprint: str, dtype: str, root: Path, decode: bool) -> str:
    """The folder key of a distractor index: what its rows depend on."""
    text = json.dumps({"fingerprint": fingerprint, "dtype": dtype, "root": str(root), "gpu_decode": decode})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_distractors(
    name: str,
    distractors: str,
    spec: ModelSpec,
    data_dir: Path,
    index_dir: Path,
    *,
    image_size: int | None,
    scales: list[float],
    dtype: str,
    gpu_decode: bool,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    budget: BudgetOptions | None = None,
    top: int = 1000,
    **build_kwargs: Any,
) -> DistractorSet:
    """Embed (or reuse) the distractors ``distractors`` with ``spec`` into ``index_dir`` and load them.

    ``build_kwargs``: :func:`~oxford_ir.retrieval.index_build.build_index`'s extraction options (batching,
    precision, decode, batch_size, num_workers, device, ...); a second call with the same model and settings finds
    every image embedded and embeds none (``summary()["embedded"] == 0``). ``budget``: rank through a budgeted
    index stored with the rows (built, or rebuilt when its settings changed, without embedding again), each query's
    ``top`` best distractors.
    """
    source, note = distractor_images(distractors, data_dir)
    fingerprint = index_fingerprint(
        spec.fingerprint(),
        image_size,
        scales,
        batching=str(build_kwargs.get("batching", "bucket")),
        precision=str(build_kwargs.get("precision", "32")),
    )
    out = (
        Path(index_dir).expanduser() / f"{label(distractors)}-{index_key(fingerprint, dtype, source.root, gpu_decode)}"
    )
    log.info("%s: %d distractors of %s, index %s", name, len(source), source.root, out)
    report = build_index(
        spec,
        source,
        out,
        image_size=image_size,
        scales=scales,
        dtype=dtype,
        incremental="auto",
        budget=budget,
        **build_kwargs,
    )
    barrier()  # under torchrun the first process writes the index: the others read it once written
    index = RetrievalIndex.load(out, expected_fingerprint=fingerprint, mmap=True)
    built = {"embedded": report.attempted, "kept": report.kept, "skipped": len(report.skipped)}
    if report.skipped:
        note += f", {len(report.skipped)} unreadable left out (listed in {out / 'report.json'})"
    searcher = load_stored_index(index) if budget is not None else None
    return DistractorSet(name, label(distractors), index, note, built, transform, searcher, top)


def check_distractors(cfg: Any, names: list[str]) -> None:
    """Before anything is read or embedded: ``distractors.dtype`` and that each named distractor folder exists."""
    wanted = {extra for _, extra in map(split_name, names) if extra is not None}
    if not wanted:
        return
    node = cfg.get("distractors") or {}
    dtype = str(node.get("dtype", "float16"))
    if dtype not in DTYPES:
        raise ConfigError(f"distractors.dtype={dtype!r}: float16 (half the disk and memory) or float32")
    budget_options(node)
    data_dir = Path(str(cfg.paths.data_dir))
    for extra in sorted(wanted):
        if extra == R1M and not r1m_status(data_dir)[0].is_dir():
            distractor_images(extra, data_dir)  # raises the error that says how to fetch them
        folder = Path(extra[len(FOLDER_PREFIX) :]).expanduser()
        if extra != R1M and not folder.is_dir():
            raise DataError(f"benchmarks: +{extra}: no such folder; give a folder of distractor images")


def distractor_sets(
    cfg: Any,
    names: list[str],
    model: torch.nn.Module,
    *,
    image_size: int | None,
    scales: list[float],
    **extract_kwargs: Any,
) -> list[DistractorSet | None]:
    """For each benchmark name of ``oxford-ir-eval``, its embedded distractors (None without ``+``).

    ``model`` is the evaluated network (behind its whitening, if any): the distractor index holds the network's
    embeddings, whitened here as the queries and database are. Refused when the network cannot be rebuilt from the
    config alone (then its index could not be reused), e.g. a random-initialised part with another ``seed``.
    """
    wanted = [split_name(name) for name in names]
    if all(extra is None for _, extra in wanted):
        return [None] * len(names)
    from oxford_ir.extraction.embedding import resolve_decode
    from oxford_ir.extraction.whitening import Whitened

    network = model.network if isinstance(model, Whitened) else model
    transform = model.whiten if isinstance(model, Whitened) else None
    spec = ModelSpec.from_config(cfg, whitening=False)
    _check_same_network(spec, network)
    node = cfg.get("distractors") or {}
    index_dir = Path(str(node.get("index_dir") or Path(str(cfg.paths.data_dir)) / "indexes" / "distractors"))
    dtype = str(node.get("dtype", "float16"))
    budget, top = budget_options(node)
    if budget is not None and transform is not None:
        raise ConfigError(
            "distractors.memory with a whitening: the budgeted index holds the network's embeddings, not the whitened "
            "ones; search the distractors exactly (distractors.memory=null)"
        )
    device = extract_kwargs.get("device", "cpu")
    gpu_decode = bool(resolve_decode(str(extract_kwargs.get("decode", "cpu")), torch.device(device)))
    kwargs = {k: v for k, v in extract_kwargs.items() if k != "progress"}
    made: dict[str, DistractorSet] = {}
    sets: list[DistractorSet | None] = []
    for name, (_, extra) in zip(names, wanted, strict=True):
        if extra is not None and extra not in made:
            made[extra] = prepare_distractors(
                name,
                extra,
                spec,
                Path(str(cfg.paths.data_dir)),
                index_dir,
                image_size=image_size,
                scales=scales,
                dtype=dtype,
                gpu_decode=gpu_decode,
                transform=transform,
                budget=budget,
                top=top,
                progress=bool(extract_kwargs.get("progress", True)),
                **kwargs,
            )
        sets.append(None if extra is None else made[extra])
    return sets


def budget_options(node: Any) -> tuple[BudgetOptions | None, int]:
    """``distractors.memory`` / ``recall`` / ``top``, checked: the budgeted index's options (None: exact search)."""
    top = node.get("top", 1000)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"distractors.top={top!r}: how many distractors a query's budgeted search returns, >= 1")
    if node.get("memory") in (None, ""):
        return None, top
    memory = parse_memory(node.get("memory"), "distractors.memory")
    recall = node.get("recall", 0.95)
    if isinstance(recall, bool) or not isinstance(recall, int | float) or not 0 < recall <= 1:
        raise ConfigError(f"distractors.recall={recall!r}: a recall@10 target in (0, 1], e.g. 0.95")
    return BudgetOptions(memory=memory, recall=float(recall)), top


def _check_same_network(spec: ModelSpec, network: torch.nn.Module) -> None:
    """The network the spec rebuilds (what the index embeds with) must be the evaluated one, weight for weight."""
    rebuilt = spec.build("cpu").state_dict()
    evaluated = network.state_dict()
    same = rebuilt.keys() == evaluated.keys() and all(
        torch.equal(rebuilt[k].cpu(), evaluated[k].detach().cpu()) for k in rebuilt
    )
    if not same:
        raise ConfigError(
            f"distractors: the evaluated network differs from the one its configuration rebuilds ({spec.describe()}): "
            "randomly initialised parts with seed != 0? Evaluate with seed=0 or a checkpoint (ckpt_path=...)"
        )
