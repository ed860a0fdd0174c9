"""``oxford-ir-eval``: embed each benchmark's database and queries, rank, print the protocol's table.

Every setting is checked and the model built before any data is read or written, so a bad value fails at once
with one line naming it. The run folder gets ``table.txt``, ``per_query_ap/<benchmark>.csv`` (the AP of each query,
to see which ones fail) and then ``metrics.json``, each written whole or not at all; ``metrics.json`` marks a
finished evaluation (see :func:`write_results`). The folder is printed last, so that a newcomer finds them.

``<benchmark>+r1m`` or ``<benchmark>+folder:<path>`` adds distractors to the database
(:mod:`~oxford_ir.retrieval.distractors`: embedded once per model and settings into an index, reused later).

``landmarks=`` evaluates the queries of some landmarks only (the database stays whole), e.g. the landmarks a
whitening's training split held out: a whitening learned on a dataset may then be evaluated on that dataset.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.prepare import prepare_benchmark
from oxford_ir.benchmarks.ranking import rank_database
from oxford_ir.benchmarks.registry import BENCHMARKS, is_collection, load_benchmark
from oxford_ir.benchmarks.splits import _restrict_to_landmarks, landmark_of_queries
from oxford_ir.callbacks.per_query_table import per_query_rows
from oxford_ir.cli.hydra_typos import refuse_typos
from oxford_ir.config import CONFIG_DIR, instantiate, to_plain
from oxford_ir.errors import ConfigError, exit_on_user_error
from oxford_ir.extraction.benchmark import benchmark_cache, extract_benchmark, plan_benchmark, plans_summary
from oxford_ir.extraction.distributed import barrier, init_from_environment, rank_and_world
from oxford_ir.extraction.embedding import resolve_decode
from oxford_ir.extraction.options import extraction_options, resolve_device
from oxford_ir.extraction.planning import ExtractionPlan
from oxford_ir.extraction.whitening_source import WhiteningSettings
from oxford_ir.fs import replace_file
from oxford_ir.retrieval.distractors import DistractorSet, check_distractors, distractor_sets, split_name
from oxford_ir.retrieval.model_whitening import evaluation_whitening, source_split
from oxford_ir.retrieval.overlap_check import check_overlap
from oxford_ir.retrieval.report import format_table

log = logging.getLogger(__name__)


def _cache_dir(ex: DictConfig, data_dir: Path) -> Path | None:
    """``extraction.cache``: the folder of the image caches (``<data_dir>/cache`` by default), or None."""
    enabled = ex.get("cache", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"extraction.cache={enabled!r}: true or false")
    if not enabled:
        return None
    return Path(str(ex.get("cache_dir") or data_dir / "cache")).expanduser()


def evaluate_model(
    model: torch.nn.Module,
    benchmarks: Sequence[str | Benchmark],
    data_dir: Path,
    *,
    image_size: int,
    scales: list[float],
    allow_missing_images: bool = False,
    kappas: tuple[int, ...] = (1, 5, 10),
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    batching: str = "bucket",
    max_shapes: int = 16,
    aspect_tolerance: float = 0.1,
    per_query: dict[str, tuple[Benchmark, dict[str, Any]]] | None = None,
    distractors: Sequence[DistractorSet | None] | None = None,
    **extract_kwargs: Any,
) -> tuple[dict[str, dict[str, float]], dict[str, str], dict[str, tuple[ExtractionPlan, ExtractionPlan]]]:
    """Evaluate ``model`` on each benchmark (a name, loaded from ``data_dir``, or a loaded one); returns
    ``{name: metrics}``, ``{name: subset note}`` and
    ``{name: (database plan, query plan)}`` (what the network was fed: see :func:`extraction_report`).

    ``cache_dir``: read the images from the evaluation image cache there (built on first use), which gives
    the same tensors as decoding them. ``per_query``: a dict that gets ``{name: (benchmark, per-query AP arrays)}``.
    ``distractors``: for each benchmark, the distractors added to its database (None: none), named
    ``<benchmark>+<label>`` in the results.
    """
    results, notes, extraction = {}, {}, {}
    for position, benchmark in enumerate(benchmarks):
        if not isinstance(benchmark, Benchmark):
            benchmark = load_benchmark(benchmark, data_dir, allow_missing_images=allow_missing_images)
        extra = distractors[position] if distractors else None
        name = benchmark.name if extra is None else f"{benchmark.name}+{extra.label}"
        cache = None
        if cache_dir is not None:
            cache = benchmark_cache(
                benchmark, image_size, cache_dir, num_workers=int(extract_kwargs.get("num_workers", 0))
            )
        plans = plan_benchmark(
            model,
            benchmark,
            image_size,
            batch_size,
            batching=batching,
            max_shapes=max_shapes,
            aspect_tolerance=aspect_tolerance,
        )
        db, queries = extract_benchmark(
            model,
            benchmark,
            image_size,
            scales=scales,
            cache=cache,
            plans=plans,
            batch_size=batch_size,
            **extract_kwargs,
        )
        above = extra.above(db, queries) if extra is not None else None
        results[name], aps = benchmark.evaluate_detailed(rank_database(db, queries), kappas, above)
        if per_query is not None:
            per_query[name] = (benchmark, aps)
        notes[name] = "; ".join(
            n for n in (benchmark.subset_note, extra and f"+ {extra.note}, {extra.search_note}") if n
        )
        extraction[name] = plans
        log.info(
            "%s: %d database images, %d queries, %d input shapes",
            name,
            benchmark.n_db,
            benchmark.n_queries,
            plans_summary(plans)["distinct_input_shapes"],
        )
    return results, notes, extraction


def extraction_report(
    plans: dict[str, tuple[ExtractionPlan, ExtractionPlan]],
    options: dict[str, Any],
    scales: list[float],
    device: torch.device,
) -> dict[str, Any]:
    """The ``extraction`` object of ``metrics.json``: how the images reached the network.

    ``distinct_input_shapes`` counts the distinct ``(height, width)`` the network received at scale 1 over all
    benchmarks (each further scale adds as many); ``padded_over_valid_pixels`` is the padding's share; each
    benchmark's own numbers and bucket shapes are under ``benchmarks``.
    """
    every = [plan for pair in plans.values() for plan in pair]
    overall = plans_summary(every) if every else {"mode": options["batching"], "distinct_input_shapes": 0}
    overall.pop("buckets", None)
    return {
        **overall,
        "max_shapes": options["max_shapes"] if overall["mode"] == "bucket" else None,
        "scales": scales,
        "decode": "gpu" if resolve_decode(options["decode"], device) else "cpu",
        "precision": options["precision"],
        "channels_last": options["channels_last"],
        "device": str(device),
        "benchmarks": {name: plans_summary(pair) for name, pair in plans.items()},
    }


def _benchmark_names(value: Any) -> list[str]:
    """``benchmarks=``: a list of names, or one name (``benchmarks=roxford5k``)."""
    names = [value] if isinstance(value, str) else list(value) if OmegaConf.is_list(value) else None
    unknown = [n for n in names if not _known(split_name(str(n))[0])] if names is not None else [value]
    if not names or unknown:
        raise ConfigError(
            f"benchmarks={OmegaConf.to_container(value) if OmegaConf.is_config(value) else value!r}: unknown "
            f"{unknown}; give one or a list of {sorted(BENCHMARKS)} or collection:<folder or manifest>, each with "
            "+r1m or +folder:<path> for distractors, e.g. benchmarks=[roxford5k,rparis6k+r1m]"
        )
    return [str(n) for n in names]


def _known(name: str) -> bool:
    return name in BENCHMARKS or is_collection(name)


def _whole_numbers(value: Any, key: str, *, least: int, single: bool = False) -> list[int]:
    """Whole numbers >= ``least`` (one when ``single``), or a ConfigError naming ``key``."""
    values = [value] if single else OmegaConf.to_container(value) if OmegaConf.is_list(value) else None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < least for v in values):
        what = "a whole number" if single else "a list of whole numbers"
        raise ConfigError(f"{key}={_shown(value)}: expected {what} >= {least}")
    return [int(v) for v in values]


def _positive_numbers(value: Any, key: str) -> list[float]:
    values = OmegaConf.to_container(value) if OmegaConf.is_list(value) else None
    if not values or any(isinstance(v, bool) or not isinstance(v, int | float) or not v > 0 for v in values):
        raise ConfigError(f"{key}={_shown(value)}: expected a list of positive numbers, e.g. {key}=[1.0,0.7071]")
    return [float(v) for v in values]


def _shown(value: Any) -> str:
    return repr(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def _build_model(cfg: DictConfig) -> torch.nn.Module:
    """The network to evaluate: a checkpoint's embedder, or the configured embedder."""
    if cfg.get("ckpt_path"):
        from oxford_ir.models.checkpoint import load_retrieval_checkpoint

        return load_retrieval_checkpoint(cfg.ckpt_path).embedder
    # randomly initialised parts (a baseline without weights) are the same in every run and process
    torch.manual_seed(int(cfg.get("seed", 0)))
    return instantiate(cfg.embedder, "embedder")


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate the configured model on ``cfg.benchmarks``; returns flat metrics and the objects used.

    Every value is checked and the model built (or its checkpoint read) before any data is written or read, so a
    bad setting fails at once. ``metrics.json`` is written last, whole or not at all: a run folder with it holds
    finished results.
    """
    names = _benchmark_names(cfg.benchmarks)
    check_distractors(cfg, names)
    data_dir = Path(cfg.paths.data_dir)
    ex = cfg.extraction
    options = extraction_options(ex)
    image_size = _whole_numbers(ex.image_size, "extraction.image_size", least=1, single=True)[0]
    scales = _positive_numbers(ex.scales, "extraction.scales")
    batch_size = _whole_numbers(ex.batch_size, "extraction.batch_size", least=1, single=True)[0]
    num_workers = _whole_numbers(ex.num_workers, "extraction.num_workers", least=0, single=True)[0]
    kappas = tuple(_whole_numbers(cfg.kappas, "kappas", least=1))
    cache_dir = _cache_dir(ex, data_dir)
    WhiteningSettings.from_config(cfg.get("whitening"))  # checked before anything is read
    device = init_from_environment() or resolve_device(str(ex.device))  # torchrun: one process per device
    model = _build_model(cfg)
    rank, _ = rank_and_world()
    if rank == 0:
        synthetic = OmegaConf.to_container(cfg.get("synthetic") or {})
        for name in dict.fromkeys(split_name(n)[0] for n in names):
            prepare_benchmark(name, data_dir, download=bool(cfg.download), synthetic=synthetic)
    barrier()
    allow_missing = bool(cfg.allow_missing_images)
    benchmarks = [load_benchmark(split_name(n)[0], data_dir, allow_missing_images=allow_missing) for n in names]
    landmarks = evaluated_landmarks(cfg, data_dir)
    if landmarks is not None:
        benchmarks = [restrict_to_landmarks(benchmark, landmarks) for benchmark in benchmarks]
    extract_kwargs = {"batch_size": batch_size, "num_workers": num_workers, "device": device, **options}
    overlap, overlap_report = (
        check_overlap(to_plain(cfg.get("overlap")), benchmarks, data_dir) if rank == 0 else ({}, None)
    )
    model, whitening = evaluation_whitening(
        cfg,
        model,
        benchmarks,
        image_size=image_size,
        scales=scales,
        progress=True,
        **extract_kwargs,
    )
    extras = distractor_sets(cfg, names, model, image_size=image_size, scales=scales, progress=True, **extract_kwargs)
    per_query: dict[str, tuple[Benchmark, dict[str, Any]]] = {}
    results, notes, extraction = evaluate_model(
        model,
        benchmarks,
        data_dir,
        image_size=image_size,
        scales=scales,
        allow_missing_images=allow_missing,
        kappas=kappas,
        cache_dir=cache_dir,
        per_query=per_query,
        distractors=extras,
        progress=True,
        **extract_kwargs,
    )
    table = format_table(results, notes, kappas)
    if whitening:
        table = f"{whitening['kind']} whitening ({whitening['status']}): {whitening['file']}\n{table}"
    flat = {f"{name}/{key}": value for name, metrics in results.items() for key, value in metrics.items()}
    flat.update(overlap)
    if rank != 0:  # every process holds the same results; the first one reports them
        return flat, {"model": model, "results": results, "table": table}
    print(table)
    summary = extraction_report(extraction, options, scales, device)
    results_json = {"metrics": flat, "notes": notes, "extraction": summary, "whitening": whitening or None}
    if overlap_report is not None:
        results_json["overlap"] = overlap_report
    if any(extras):
        named = zip(benchmarks, extras, strict=True)
        results_json["distractors"] = {f"{b.name}+{d.label}": d.summary() for b, d in named if d is not None}
    output_dir = Path(cfg.paths.output_dir)
    csvs = {name: per_query_csv(benchmark, aps) for name, (benchmark, aps) in per_query.items()}
    write_results(output_dir, results_json, table, csvs)
    print(f"results: {output_dir.resolve()} (table.txt, metrics.json, {PER_QUERY_DIR}/<benchmark>.csv)")
    return flat, {"model": model, "results": results, "table": table}


#: the folder of the per-query AP files in the run folder (as training's per-query table callback)
PER_QUERY_DIR = "per_query_ap"
#: ``landmarks=`` value: the landmarks held out of the whitening's (or the checkpoint's) training split
HELD_OUT = "held_out"


def per_query_csv(benchmark: Benchmark, aps: dict[str, Any]) -> bytes:
    """``index, query, landmark, positives`` and the AP of each protocol (``AP``, or ``E/AP``, ``M/AP``,
    ``H/AP``; empty where a query has no positive in that protocol), one row per evaluated query: the mean of a
    column is the benchmark's mAP."""
    columns, rows = per_query_rows(SimpleNamespace(benchmark=benchmark, per_query=aps))
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["index", *columns])
    writer.writerows([index, *row] for index, row in enumerate(rows))
    return text.getvalue().encode()


def evaluated_landmarks(cfg: DictConfig, data_dir: Path) -> list[str] | None:
    """``landmarks=``: None (every query), a list of names, or ``held_out``: the landmarks held out of the
    training split that the whitening is learned from (``whitening.source``, on top of the checkpoint's run's
    data), or of the checkpoint's own run."""
    value = cfg.get("landmarks")
    if value is None:
        return None
    if value == HELD_OUT:
        node = cfg.get("whitening")
        source = node.get("source") if WhiteningSettings.from_config(node) is not None else None
        if not cfg.get("ckpt_path") and not source:
            raise ConfigError(
                "landmarks=held_out: held out of which split? Give whitening.source={benchmark: ..., split: "
                "landmarks, held_out_landmarks: [...]} or ckpt_path= of a run trained with data.split=landmarks"
            )
        split = source_split(cfg.get("ckpt_path"), source, data_dir)
        if not split.held_out_landmarks:
            raise ConfigError(
                f"landmarks=held_out: the {split.kind} split of {split.train_benchmark} holds no landmark out; "
                "use split: landmarks with held_out_landmarks (or n_held_out), or name the landmarks: landmarks=[...]"
            )
        return list(split.held_out_landmarks)
    names = [value] if isinstance(value, str) else OmegaConf.to_container(value) if OmegaConf.is_list(value) else None
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(
            f"landmarks={_shown(value)}: null (every query), held_out, or a list of landmark names, e.g. "
            "landmarks=[louvre,moulinrouge]"
        )
    return [str(n) for n in names]


def restrict_to_landmarks(benchmark: Benchmark, landmarks: Sequence[str]) -> Benchmark:
    """The queries of ``landmarks`` only, against the whole database (as validation on held-out landmarks)."""
    present = landmark_of_queries(benchmark)
    unknown = [name for name in landmarks if name not in present]
    if unknown:
        raise ConfigError(
            f"landmarks: {benchmark.name} has no query of {', '.join(unknown)}; its landmarks: "
            f"{', '.join(sorted(set(present)))}"
        )
    return _restrict_to_landmarks(benchmark, landmarks)


def write_results(
    output_dir: Path, results: dict[str, Any], table: str, per_query: dict[str, bytes] | None = None
) -> None:
    """``table.txt``, ``per_query_ap/<benchmark>.csv`` (``per_query``: the CSV of each benchmark), then
    ``metrics.json``, each whole or not at all (:func:`~oxford_ir.fs.replace_file`).

    ``metrics.json`` marks a finished evaluation: an older one in the folder is removed first and the new one is
    written last, so whenever it exists, it and ``table.txt`` are of the same run. A write that fails (a full
    disk, a file-size limit) or a process killed on the way leaves no temporary file and no ``metrics.json``;
    running the same command again writes both.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").unlink(missing_ok=True)
    replace_file(output_dir / "table.txt", (table + "\n").encode())
    if per_query:
        (output_dir / PER_QUERY_DIR).mkdir(exist_ok=True)
    for name, data in (per_query or {}).items():
        replace_file(output_dir / PER_QUERY_DIR / f"{name}.csv", data)
    replace_file(output_dir / "metrics.json", json.dumps(results, indent=2).encode())


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
@exit_on_user_error
def _main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the mean mAP over benchmarks and protocols (for sweepers)."""
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    flat, _ = evaluate(cfg)
    maps = [v for k, v in flat.items() if k.endswith("mAP")]
    return sum(maps) / len(maps)


def main() -> None:
    """Console script: a mistyped key or option is answered with its close match (:mod:`.hydra_typos`)."""
    refuse_typos("eval")
    _main()


if __name__ == "__main__":
    main()
