"""``oxford-ir-search``: search an index with images (table or JSON lines, and a PNG grid), or evaluate it.

The logic is :func:`search` (a composed config in, the results out); see conf/search.yaml for the options.
Query images are embedded by the index's own model (or ``onnx=`` / ``ckpt_path=``: the same model from another
file) with its extraction settings, all in one batched pass. PyTorch and the rest of the search stack are imported
inside the functions that use them, so ``--help`` and refused inputs answer without them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from oxford_ir.cli.hydra_typos import refuse_typos
from oxford_ir.cli.quick_help import quick_help
from oxford_ir.config import CONFIG_DIR, to_plain
from oxford_ir.errors import ConfigError, DataError, IndexFormatError, exit_on_user_error
from oxford_ir.fs import replace_file
from oxford_ir.images import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from oxford_ir.benchmarks.boxes import BBox
    from oxford_ir.retrieval.index_format import RetrievalIndex
    from oxford_ir.retrieval.search import Searcher

log = logging.getLogger(__name__)

OUTPUTS = ("table", "json")
#: a query list line: a path, optionally followed by whitespace and a box x1,y1,x2,y2
_LIST_LINE = re.compile(r"^(?P<path>.*?)(?:\s+(?P<bbox>[-+0-9.eE]+,[-+0-9.eE]+,[-+0-9.eE]+,[-+0-9.eE]+))?$")


def resolve_queries(query: Any, bbox: Any = None) -> list[tuple[Path, BBox | None]]:
    """``query=`` as ``(image path, box or None)`` pairs: one image, a folder (recursive, sorted), or a text
    file listing images (one per line, relative to the file, ``#`` comments, an optional box after the path)."""
    from oxford_ir.benchmarks.boxes import parse_bbox

    if query is None or str(query).strip() == "":
        raise ConfigError("query= is required: an image, a folder of images or a text file listing image paths")
    box = parse_bbox(bbox)
    path = Path(str(query)).expanduser()
    if path.is_dir():
        images = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not images:
            raise DataError(f"query={query}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        queries: list[tuple[Path, BBox | None]] = [(p, None) for p in images]
    elif path.is_file():
        queries = _read_list(path) if path.suffix.lower() not in IMAGE_EXTENSIONS else None
        if queries is None:  # an image (or a file that is neither image nor text: decoding it will say so)
            queries = [(path, None)]
    else:
        raise DataError(f"query={query}: no such file or folder")
    if box is not None:
        if len(queries) != 1:
            raise ConfigError(
                f"bbox= applies to a single query image, but query={query} gives {len(queries)}; "
                "put a box after each path in a query list instead"
            )
        queries = [(queries[0][0], box)]
    return queries


def _read_list(path: Path) -> list[tuple[Path, BBox | None]] | None:
    """The queries of a list file; None when the file is not text (then it may be an image)."""
    from oxford_ir.benchmarks.boxes import parse_bbox

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
    queries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LIST_LINE.match(line)
        assert match is not None  # the pattern matches any line
        image = Path(match["path"]).expanduser()
        image = Path(os.path.normpath(image if image.is_absolute() else path.parent / image))
        if not image.is_file():
            raise DataError(f"{path}:{number}: query image {image} not found")
        box = parse_bbox(match["bbox"], key=f"{path}:{number}: bbox") if match["bbox"] else None
        queries.append((image, box))
    if not queries:
        raise DataError(f"query={path}: the list names no images (one path per line, optionally a box after it)")
    return queries


def make_searcher(index: Any, cfg: DictConfig) -> Searcher:
    """A :class:`Searcher` over ``index`` with the backend, re-ranking and extraction settings of ``cfg``."""
    from oxford_ir.extraction.options import resolve_device
    from oxford_ir.retrieval.search import Searcher

    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    ex = container.get("extraction") or {}
    return Searcher(
        index,
        backend=str(container.get("backend", "exact")),
        faiss=container.get("faiss"),
        query_expansion=container.get("query_expansion"),
        database_augmentation=container.get("database_augmentation"),
        device=resolve_device(str(ex.get("device", "auto"))),
        batch_size=ex.get("batch_size", 8),
        num_workers=ex.get("num_workers", 0),
    )


def search(cfg: DictConfig) -> tuple[list[dict[str, Any]] | dict[str, float], dict[str, Any]]:
    """Search ``cfg.index`` with ``cfg.query`` (or evaluate it on ``cfg.benchmark``); prints the results.

    Returns one record per query (as printed with ``output=json``), or the benchmark's metrics, and the
    objects used (``index``, ``searcher``, ``grids`` or ``table``).
    """
    from oxford_ir.retrieval.index_format import RetrievalIndex
    from oxford_ir.retrieval.onnx_queries import RERANKINGS, search_onnx, torch_free_search_applies
    from oxford_ir.retrieval.top_k import check_k

    if cfg.get("index") in (None, ""):
        raise ConfigError(
            "index= is required: the folder written by oxford-ir-index (oxford-ir-search index=<dir> ...)"
        )
    if cfg.get("info"):
        index = RetrievalIndex.load(Path(str(cfg.index)), mmap=True)
        info = index_info(index)
        print(format_info(info))
        return info, {"index": index}
    output = str(cfg.output)
    if output not in OUTPUTS:
        raise ConfigError(f"output={output}: choose table or json")
    benchmark_name = cfg.get("benchmark")
    if benchmark_name and cfg.get("query") is not None:
        raise ConfigError("give either query= (search) or benchmark= (evaluate the index), not both")
    if not benchmark_name:
        k = check_k(cfg.k)
        queries = resolve_queries(cfg.get("query"), cfg.get("bbox"))
    mmap = str(cfg.get("backend", "exact")) != "exact"  # a stored index re-ranks from a memory map of the rows
    index = with_model(RetrievalIndex.load(Path(str(cfg.index)), mmap=mmap), cfg)
    if cfg.get("whitening") is not None:
        from oxford_ir.retrieval.model_whitening import check_requested_whitening

        check_requested_whitening(cfg.get("whitening"), index.model, str(index.path))
    output_dir = Path(cfg.paths.output_dir)
    if benchmark_name:
        return _evaluate(cfg, str(benchmark_name), index, make_searcher(index, cfg), output_dir)

    log.info(
        "searching %s (%d images) with %d quer%s",
        index.path,
        len(index),
        len(queries),
        "y" if len(queries) == 1 else "ies",
    )
    images, boxes = [q for q, _ in queries], [b for _, b in queries]
    reranking = [to_plain(cfg.get(key)) for key in RERANKINGS]
    searcher = None
    if torch_free_search_applies(
        index, backend=str(cfg.get("backend", "exact")), reranking=reranking, extraction=to_plain(cfg.extraction)
    ):
        result = search_onnx(index, images, boxes, k=k)  # onnxruntime and NumPy: PyTorch is never imported
    else:
        searcher = make_searcher(index, cfg)
        result = searcher.search_images(images, boxes, k=k)
    records = []
    for row, (query, box) in enumerate(queries):
        hits = [
            {
                "rank": rank,
                "score": score,
                "path": index.entries[i].path,
                "file": str(index.image_path(i)),
                "index": i,
            }
            for rank, (i, score) in enumerate(result.hits(row), start=1)
        ]
        records.append({"query": str(query), "bbox": None if box is None else list(box), "results": hits})
    if output == "json":
        for record in records:
            print(json.dumps(record))
    else:
        print(format_results(records))
    grids = _write_grids(cfg, records, output_dir) if cfg.grid.enabled else []
    for grid in grids:
        print(f"grid: {grid}", file=sys.stderr)
    return records, {"index": index, "searcher": searcher, "result": result, "grids": grids}


def with_model(index: RetrievalIndex, cfg: DictConfig) -> RetrievalIndex:
    """``index`` searched with ``cfg.onnx`` or ``cfg.ckpt_path`` instead of its own model file: accepted when it is
    the model the index was built with (the same fingerprint; a checkpoint takes the index's whitening), else an
    IndexFormatError naming both."""
    from oxford_ir.retrieval.model_spec import ModelSpec

    onnx, ckpt = cfg.get("onnx"), cfg.get("ckpt_path")
    if not onnx and not ckpt:
        return index
    spec = ModelSpec.from_config({"onnx": onnx, "ckpt_path": ckpt}, whitening=False)
    if spec.checkpoint is not None:
        spec = dataclasses.replace(spec, whitening=_whitening_of(index.model))
    if spec.fingerprint() != index.model_fingerprint:
        key = f"onnx={onnx}" if onnx else f"ckpt_path={ckpt}"
        raise IndexFormatError(
            f"{key} is another model ({spec.describe()}) than the one index {index.path} was built with "
            f"({index.model.describe()}): its query embeddings would not match the index's. Search with that model "
            "(or leave the key unset), or rebuild the index with this one"
        )
    return dataclasses.replace(index, model=spec)


def _whitening_of(model: Any) -> str | None:
    """The whitening file of an index's model; for an ONNX file, the one it was exported with (if still there)."""
    if model.onnx is None:
        return model.whitening
    from oxford_ir.models.onnx_file import open_onnx

    recorded = open_onnx(model.onnx)[1].model_spec.get("whitening")
    return str(recorded) if recorded and Path(str(recorded)).is_file() else None


def index_info(index: Any) -> dict[str, Any]:
    """What ``--info`` prints: the index's size, model and settings, and its stored search index (the recall@10
    and queries/s measured when it was built) or None."""
    from oxford_ir.retrieval.budgeted_index import describe_stored_index

    return {
        "index": str(index.path),
        "version": index.version,
        "built": index.manifest.get("created"),
        "images": len(index),
        "embedding_dim": int(index.embedding_dim),
        "dtype": str(index.dtype),
        "model": index.model.describe(),
        "image_size": index.image_size,
        "scales": list(index.scales),
        "complete": bool(index.complete),
        "search_index": describe_stored_index(index.manifest),
    }


def format_info(info: dict[str, Any]) -> str:
    """``--info`` for people: one line per fact."""
    from oxford_ir.retrieval.budgeted_index import format_bytes

    lines = [f"{key}: {value}" for key, value in info.items() if key != "search_index"]
    stored = info["search_index"]
    if stored is None:
        lines.append("search index: none (exact search; oxford-ir-index ... index.memory=<bytes> builds one)")
        return "\n".join(lines)
    parameter = ", ".join(f"{k}={v}" for k, v in stored["search_parameter"].items()) or "exhaustive"
    lines += [
        f"search index: {stored['index']} ({stored['kind']}; {parameter}; {stored['candidates']} candidates "
        "re-ranked exactly)",
        f"  memory: {format_bytes(stored['bytes'])} of index.memory={format_bytes(stored['memory_budget'])}",
        f"  recall@10: {stored['recall_at_10']:.4f} (target {stored['recall_target']:g}; measured at build on "
        f"{stored['tune_queries']} held-out rows against exact search)",
        f"  queries/s: {stored['queries_per_s']:.1f} (exact search: {stored['exact_queries_per_s']:.1f})",
    ]
    return "\n".join(lines)


def format_results(records: list[dict[str, Any]]) -> str:
    """A plain-text table per query: rank, score, path relative to the index root."""
    blocks = []
    for number, record in enumerate(records, start=1):
        box = "" if record["bbox"] is None else f"  bbox {','.join(f'{v:g}' for v in record['bbox'])}"
        lines = [f"query {number}/{len(records)}: {record['query']}{box}", f"{'rank':>4}  {'score':>7}  path"]
        lines += [f"{hit['rank']:>4}  {hit['score']:7.4f}  {hit['path']}" for hit in record["results"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _write_grids(cfg: DictConfig, records: list[dict[str, Any]], output_dir: Path) -> list[Path]:
    """``results.png`` (then ``results_002.png``, ...): each query and its results, written atomically."""
    from oxford_ir.retrieval.visualize import render_result_grid

    per_image = max(1, int(cfg.grid.rows_per_image))
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for page, start in enumerate(range(0, len(records), per_image), start=1):
        chunk = records[start : start + per_image]
        grid = render_result_grid(
            [Path(r["query"]) for r in chunk],
            [[(h["file"], h["score"]) for h in r["results"]] for r in chunk],
            bboxes=[r["bbox"] for r in chunk],
            thumbnail_size=int(cfg.grid.thumbnail_size),
        )
        path = output_dir / ("results.png" if page == 1 else f"results_{page:03d}.png")
        encoded = io.BytesIO()
        grid.save(encoded, format="PNG")
        replace_file(path, encoded.getvalue(), temp=path.with_name(f".{path.name}.tmp"))
        paths.append(path)
    return paths


def _evaluate(cfg: DictConfig, name: str, index: Any, searcher: Searcher, output_dir: Path):
    from oxford_ir.benchmarks.registry import load_benchmark
    from oxford_ir.retrieval.model_whitening import check_whitening_disjoint
    from oxford_ir.retrieval.report import format_table
    from oxford_ir.retrieval.search import evaluate_benchmark

    benchmark = load_benchmark(name, Path(cfg.paths.data_dir), allow_missing_images=bool(cfg.allow_missing_images))
    check_whitening_disjoint(index.model, benchmark)
    kappas = tuple(int(k) for k in cfg.kappas)
    metrics = evaluate_benchmark(index, benchmark, searcher, kappas=kappas)
    log.info("%s evaluated through %s", name, searcher)
    table = format_table({name: metrics}, {name: benchmark.subset_note}, kappas)
    print(table)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {"metrics": {f"{name}/{k}": v for k, v in metrics.items()}, "index": str(index.path)}
    replace_file(output_dir / "metrics.json", json.dumps(results).encode(), temp=output_dir / ".metrics.json.tmp")
    return metrics, {"index": index, "searcher": searcher, "table": table}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="search")
@exit_on_user_error
def _main(cfg: DictConfig) -> None:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    search(cfg)


def main() -> None:
    """Console entry point: Hydra with ``bbox=x1,y1,x2,y2`` accepted as written.

    Hydra reads an unquoted ``a,b,c,d`` as a sweep over four values (an error without --multirun); the box
    is quoted here so that ``bbox=10,20,200,180`` works as the usage says.
    """
    sys.argv = [sys.argv[0], *(_argument(arg) for arg in sys.argv[1:])]
    refuse_typos("search")  # a mistyped key or option is answered with its close match
    quick_help()
    _main()


def _argument(arg: str) -> str:
    """``--info`` as ``info=true`` (Hydra's own --info describes its config search path, not the index), and the
    box quoted (:func:`_quote_bbox`)."""
    return "info=true" if arg == "--info" else _quote_bbox(arg)


def _quote_bbox(arg: str) -> str:
    match = re.fullmatch(r"(\+{0,2}bbox)=([^'\"\[\]]*,[^'\"\[\]]*)", arg)
    return f"{match[1]}='{match[2]}'" if match else arg


if __name__ == "__main__":
    main()
