"""``oxford-ir-eval``: embed each benchmark's database and queries, rank, print the protocol's table."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from oxford_ir.benchmarks.ranking import rank_database
from oxford_ir.config import CONFIG_DIR
from oxford_ir.data.loading import BENCHMARKS, load_benchmark
from oxford_ir.errors import ConfigError, exit_on_user_error
from oxford_ir.extraction.benchmark import benchmark_cache, extract_benchmark, plan_benchmark, plans_summary
from oxford_ir.extraction.distributed import barrier, init_from_environment, rank_and_world
from oxford_ir.extraction.embedding import resolve_decode
from oxford_ir.extraction.options import extraction_options, resolve_device
from oxford_ir.extraction.planning import ExtractionPlan
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


def prepare_benchmark_data(name: str, data_dir: Path, download: bool, synthetic: dict | None = None) -> None:
    """Write the synthetic benchmark when absent; download a real one when asked to."""
    folder = BENCHMARKS[name][0]
    if folder == "synthetic":
        from oxford_ir.data.synthetic import SYNTHETIC_PRESETS, write_synthetic_benchmark

        settings = dict(synthetic or {})
        preset = settings.pop("preset", "default")
        if preset not in SYNTHETIC_PRESETS:
            raise ConfigError(f"synthetic.preset={preset!r}: choose one of {sorted(SYNTHETIC_PRESETS)}")
        write_synthetic_benchmark(data_dir / folder, **{**SYNTHETIC_PRESETS[preset], **settings})
    elif download:
        from oxford_ir.data.download import download_dataset

        download_dataset(folder, data_dir)


def evaluate_model(
    model: torch.nn.Module,
    benchmark_names: list[str],
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
    **extract_kwargs: Any,
) -> tuple[dict[str, dict[str, float]], dict[str, str], dict[str, tuple[ExtractionPlan, ExtractionPlan]]]:
    """Evaluate ``model`` on each benchmark; returns ``{name: metrics}``, ``{name: subset note}`` and
    ``{name: (database plan, query plan)}`` (what the network was fed: see :func:`extraction_report`).

    ``cache_dir``: read the images from the evaluation image cache there (built on first use), which gives
    the same tensors as decoding them.
    """
    results, notes, extraction = {}, {}, {}
    for name in benchmark_names:
        benchmark = load_benchmark(name, data_dir, allow_missing_images=allow_missing_images)
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
        results[name] = benchmark.evaluate(rank_database(db, queries), kappas=kappas)
        notes[name] = benchmark.subset_note
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


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate the configured model on ``cfg.benchmarks``; returns flat metrics and the objects used."""
    names = list(cfg.benchmarks)
    unknown = [n for n in names if n not in BENCHMARKS]
    if not names or unknown:
        raise ConfigError(f"benchmarks={names}: unknown {unknown}; choose from {sorted(BENCHMARKS)}")
    data_dir = Path(cfg.paths.data_dir)
    ex = cfg.extraction
    options = extraction_options(ex)
    device = init_from_environment() or resolve_device(str(ex.device))  # torchrun: one process per device
    rank, _ = rank_and_world()
    if rank == 0:
        for name in names:
            synthetic = OmegaConf.to_container(cfg.get("synthetic") or {})
            prepare_benchmark_data(name, data_dir, bool(cfg.download), synthetic)
    barrier()
    if cfg.get("ckpt_path"):
        from oxford_ir.models.module import load_retrieval_checkpoint

        model = load_retrieval_checkpoint(cfg.ckpt_path).embedder
    else:
        # randomly initialised parts (a baseline without weights) are the same in every run and process
        torch.manual_seed(int(cfg.get("seed", 0)))
        model = hydra.utils.instantiate(cfg.embedder)
    results, notes, extraction = evaluate_model(
        model,
        names,
        data_dir,
        image_size=int(ex.image_size),
        scales=[float(s) for s in ex.scales],
        allow_missing_images=bool(cfg.allow_missing_images),
        kappas=tuple(int(k) for k in cfg.kappas),
        cache_dir=_cache_dir(ex, data_dir),
        batch_size=int(ex.batch_size),
        num_workers=int(ex.num_workers),
        device=device,
        progress=True,
        **options,
    )
    table = format_table(results, notes, cfg.kappas)
    flat = {f"{name}/{key}": value for name, metrics in results.items() for key, value in metrics.items()}
    if rank != 0:  # every process holds the same results; the first one reports them
        return flat, {"model": model, "results": results, "table": table}
    print(table)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = extraction_report(extraction, options, [float(s) for s in ex.scales], device)
    tmp = output_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps({"metrics": flat, "notes": notes, "extraction": summary}, indent=2))
    os.replace(tmp, output_dir / "metrics.json")
    (output_dir / "table.txt").write_text(table + "\n")
    return flat, {"model": model, "results": results, "table": table}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the mean mAP over benchmarks and protocols (for sweepers)."""
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    flat, _ = evaluate(cfg)
    maps = [v for k, v in flat.items() if k.endswith("mAP")]
    return sum(maps) / len(maps)


if __name__ == "__main__":
    main()
