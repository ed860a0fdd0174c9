"""``make bench``: training, data loading, extraction, evaluation and search throughput against the compute
ceiling and the original project's method, measured in the same run; prints a table and writes every raw
number as JSON.

    .venv/bin/python experiments/bench/run.py --profile cpu --out bench.json          # this machine, minutes
    .venv/bin/python experiments/bench/run.py --profile gpu --out bench_gpu.json      # a CUDA GPU (gpu.sh)
    .venv/bin/python experiments/bench/run.py --profile cpu --quick --out /tmp/b.json # seconds, for the tests

Each measurement runs in a process of its own (peak memory is its own: CUDA allocator peak on a GPU, peak
resident set size on the CPU; the extraction rows measure ours and the ceiling in one process). The images are
a synthetic benchmark written as JPEGs by a process pool over the cores (``images.py``) into a temporary
folder (``--keep`` keeps it) or into ``--images DIR``, where a later run reuses them; the data loading rows
use full-size (1024 px) JPEGs, written apart when the profile's are smaller; the extraction rows use JPEGs
with the size mix of Oxford/Paris cut from the synthetic ones. Each group of rows has a share of the
profile's time (``budgets``, and ``--budget`` for the whole run): a process still running when its group's
time is spent is stopped and its row reported over budget, and the run goes on. See the module docs of
``training``, ``loading``, ``extraction``, ``evaluation``, ``search`` and ``original`` for what each row
measures.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the package from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from experiments.bench import common, images, report  # noqa: E402

# Pipeline switches (Hydra overrides) turned on when the composed config has their key; one per line. A knob
# whose key the config lacks is skipped and listed under "knobs.missing" (JSON and below the table).
KNOBS = {
    "cpu": [
        "data.cache.enabled=true",  # preprocessed image cache (images resized once, stored compactly)
        "data.persistent_workers=true",
    ],
    "gpu": [
        "data.cache.enabled=true",  # preprocessed image cache
        "model.channels_last=true",
        "trainer.precision=bf16-mixed",
        "data.pin_memory=true",
        "data.persistent_workers=true",
    ],
}
#: the cache knob; the training rows "no cache" and "GPU decode" measure the pipeline without it
CACHE_KNOB = "data.cache.enabled=true"
#: whole training images on one padded canvas a batch, BatchNorm frozen (data.train_images=whole); its own row
WHOLE_IMAGES = ["data.train_images=whole", "model.freeze_batchnorm=true"]
#: JPEG decode on the GPU (torchvision.io.decode_jpeg on CUDA); excludes the cache, so it is its own row
GPU_DECODE_KNOB = "data.decode=gpu"
#: with --compile: torch.compile costs about a minute per process before the first step, which the few
#: minutes of gpu.sh cannot spare three times (ours, ceiling, original); the training rows only
COMPILE_KNOB = "model.compile=true"
#: options of extract_embeddings used by the extraction and evaluation rows when its signature has them (the
#: batching mode is the package's default, bucket, except in the exact extraction row); decode "auto" decodes on
#: the GPU on CUDA, and ``--profile gpu --device cpu`` turns it into "gpu" so that the CPU check runs that path
EXTRACTION_OPTIONS = {"cpu": {}, "gpu": {"precision": "bf16", "channels_last": True, "decode": "auto"}}

#: sizes of each profile (``quick`` replaces some of them)
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {
        "device": "cpu",
        # 11 landmarks x (5 queries + 16 photos) + 120 distractors = 351 JPEGs of 320 px
        "synthetic": {
            "n_landmarks": 11,
            "images_per_landmark": 16,
            "queries_per_landmark": 5,
            "hard_per_landmark": 3,
            "junk_per_landmark": 2,
            "n_distractors": 120,
            "photo_long_side": 320,
            "jpeg_quality": 90,
        },
        "model": ["backbone=mobilenetv2", "backbone.weights=none"],
        "image_size": 128,
        "eval_image_size": 224,
        "classes_per_batch": 8,
        "images_per_class": 4,
        "distractors_per_batch": 4,
        "num_workers": 2,
        # extraction and evaluation: on 2 cores, decoding workers fight the 2 compute threads (measured on the
        # mobilenetv2 extraction: 80 / 30 / 10 images/s with 0 / 1 / 2 workers)
        "eval_num_workers": 0,
        "warmup_steps": 3,
        "steps": 12,
        "eval_batch_size": 16,
        # extraction rows: 120 JPEGs with the size mix of Oxford/Paris at long side 320 + 8 query crops
        "size_mix": {"images": 120, "queries": 8, "long_side": 320, "noise": 10.0},
        "extraction_repeats": 1,
        "pair_warmup": 4,
        "pair_sample": 60,
        "pair_queries": 8,  # the pairwise sample draws from 8 random queries (their shapes are warmed up first)
        "search_rows": ["exact_cpu", "ivfpq"],
        # data loading (no network): full-size JPEGs as Oxford/Paris's, 362 px crops, the profile's batch and
        # workers; 8 landmarks x (1 query + 5 photos) + 8 distractors = 56 JPEGs of 1024 px (about 0.2 s each
        # to write on this machine). Warm-up: one batch per worker; timed: whole rounds of the workers.
        "loading": {
            "synthetic": {
                "n_landmarks": 8,
                "images_per_landmark": 5,
                "queries_per_landmark": 1,
                "hard_per_landmark": 1,
                "junk_per_landmark": 0,
                "n_distractors": 8,
                "photo_long_side": 1024,
                "jpeg_quality": 90,
            },
            "image_size": 362,
            "warmup_batches": 2,
            "batches": 16,
        },
        "search": {
            "n": 1_000_000,
            "dim": 2048,
            "queries": 64,
            "k": 10,
            "clusters": 1024,
            "rank": 16,
            "spread": 0.5,
            "noise": 0.25,
            "repeats": 3,
            "ivfpq_n": 100_000,
            "ivfpq": {"nlist": 256, "m": 128, "nbits": 8, "nprobe": 16, "train_size": 10_000},
        },
        "child_timeout_s": 1200,
        # seconds per group of rows (a process still running when its group's time is spent is stopped; time an
        # earlier group leaves unused goes to the next) and in all (None: unbounded); generous: a guard against a
        # hung process, not a target (2 min in all on an idle machine, 20 on one shared with other jobs)
        "budgets": {"training": 1800, "loading": 900, "extraction": 900, "evaluation": 900, "search": 1800},
        "total_budget_s": None,
    },
    "gpu": {
        "device": "cuda",
        # 11 landmarks x (5 queries + 10 photos) + 45 distractors = 210 JPEGs of 1024 px, as Oxford's
        "synthetic": {
            "n_landmarks": 11,
            "images_per_landmark": 10,
            "queries_per_landmark": 5,
            "hard_per_landmark": 2,
            "junk_per_landmark": 1,
            "n_distractors": 45,
            "photo_long_side": 1024,
            "jpeg_quality": 90,
        },
        "model": ["backbone=resnet50", "backbone.weights=none"],
        "image_size": 362,
        "eval_image_size": 1024,
        "classes_per_batch": 10,
        "images_per_class": 6,
        "distractors_per_batch": 4,
        "num_workers": 12,
        "eval_num_workers": 12,
        "warmup_steps": 10,
        "steps": 50,
        "eval_batch_size": 32,
        # extraction rows: 192 JPEGs with the size mix of Oxford/Paris at 1024 px + 6 query crops (8 image sizes
        # and 6 crops: about 14 buckets and 20 exact batch shapes, each a cuDNN plan to build in the warm-up),
        # written in about a second on 16 cores, run 4 times per pass (792 images)
        "size_mix": {"images": 192, "queries": 6, "long_side": 1024, "noise": 10.0},
        "extraction_repeats": 4,
        "pair_warmup": 12,
        "pair_sample": 150,
        # the pairwise sample draws from 3 random queries: their shapes are planned by cuDNN (about 1.5 s each in
        # bf16 + channels_last) before timing, and 55 of them would take the row's whole budget
        "pair_queries": 3,
        "search_rows": ["exact_cuda", "exact_cpu", "ivfpq"],
        # data loading: the profile's 1024 px JPEGs (synthetic None = the profile's), as the training row
        "loading": {"synthetic": None, "image_size": 362, "warmup_batches": 12, "batches": 36},
        "search": {
            "n": 1_000_000,
            "dim": 2048,
            "queries": 1024,
            "k": 10,
            "clusters": 1024,
            "rank": 16,
            "spread": 0.5,
            "noise": 0.25,
            "repeats": 3,
            "cpu_queries": 128,  # the exact search CPU row: about 0.5 s a repeat on 16 cores
            # IVF-PQ over 1M in well under a minute on 16 cores, drawing and exact search (for recall) included:
            # trained on 20,480 vectors (40 per cell; faiss wants 39), 64-byte codes. Measured single-threaded on
            # the 2-core machine: training 12 CPU-s, adding 6.4 CPU-s per 50k (nlist 1024: 32 and 9.4; m 128: 15.8)
            "ivfpq_n": 1_000_000,
            "ivfpq": {"nlist": 512, "m": 64, "nbits": 8, "nprobe": 16, "train_size": 20_480},
        },
        "child_timeout_s": 600,
        # gpu.sh in under 6 minutes: the groups of rows get these shares (320 s), the rest of the 340 s goes to
        # installing the wheels, starting Python, writing the JPEGs (about 8 s on 16 cores) and the forkserver's
        # imports (overlapping the JPEGs). training: 5 processes of Lightning start-up + 60 steps, and the whole
        # images row (a padded canvas, padding masks: not yet measured on a GPU, 40 s allowed for it); loading: 5
        # processes, no network; extraction: 2 processes, each ~12-17 cuDNN plans to build (~1.5 s each) in the
        # warm-up pass, then 2 timed passes of 792 images; evaluation: ~16 plans for ours, ~5 for the pairwise
        # sample; search: 1M x 2048 drawn per process, IVF-PQ trained and filled over 1M on the CPU (last: it
        # also gets whatever the earlier groups left)
        "budgets": {"training": 120, "loading": 35, "extraction": 65, "evaluation": 45, "search": 55},
        "total_budget_s": 330,
    },
}
#: --quick: tiny everything, for the tests (seconds)
QUICK: dict[str, Any] = {
    "synthetic": {
        "n_landmarks": 4,
        "images_per_landmark": 6,
        "queries_per_landmark": 2,
        "hard_per_landmark": 1,
        "junk_per_landmark": 1,
        "n_distractors": 8,
        "photo_long_side": 64,
        "jpeg_quality": 90,
    },
    "image_size": 32,
    "eval_image_size": 64,
    "classes_per_batch": 3,
    "images_per_class": 2,
    "distractors_per_batch": 2,
    "num_workers": 1,
    "eval_num_workers": 1,
    "warmup_steps": 1,
    "steps": 3,
    "eval_batch_size": 8,
    "size_mix": {"images": 16, "queries": 4, "long_side": 64, "noise": 10.0},
    "max_shapes": 2,  # below the size mix's own count of buckets, so that the bound is exercised
    "extraction_repeats": 1,
    "pair_warmup": 2,
    "pair_sample": 10,
    "loading": {"synthetic": None, "image_size": 32, "warmup_batches": 1, "batches": 3},
    "search": {
        "n": 20_000,
        "dim": 256,
        "queries": 16,
        "k": 10,
        "clusters": 64,
        "rank": 8,
        "spread": 0.5,
        "noise": 0.25,
        "repeats": 1,
        "ivfpq_n": 20_000,
        "ivfpq": {"nlist": 32, "m": 16, "nbits": 8, "nprobe": 8, "train_size": 10_000},
    },
    "child_timeout_s": 300,
    # tiny models on 2 shared cores: one intra-op thread each is several times faster than two fighting
    "threads": 1,
    "budgets": {"training": 300, "loading": 300, "extraction": 300, "evaluation": 300, "search": 300},
    "total_budget_s": None,
}
QUICK_MODELS = {
    "cpu": ["backbone=scratch", "backbone.channels=[8,16]"],
    "gpu": ["backbone=resnet50", "backbone.weights=none"],
}
ROWS = ("training", "loading", "extraction", "evaluation", "search")
#: the extraction rows: key -> (label, function of experiments/bench/extraction.py measuring ours and its ceiling)
EXTRACTION_ROWS = {
    "extraction": ("extraction, default (buckets)", "measure_bucket"),
    "extraction_exact": ("extraction, exact shapes", "measure_exact"),
}
#: the extra data loading rows and their measurement in experiments/bench/loading.py
LOADING_FUNCTIONS = {
    "loading_no_cache": "measure_no_cache",
    "loading_no_jitter": "measure_no_jitter",
    "loading_gpu_decode": "measure_gpu_decode",
}
#: the augmentation the original method does not do: without it, ours does the original's work per image
NO_JITTER = [f"data.augmentation.{name}=0" for name in ("brightness", "contrast", "saturation", "hue")]


def profile_settings(name: str, quick: bool) -> dict[str, Any]:
    profile = copy.deepcopy(PROFILES[name])
    if quick:
        profile.update(copy.deepcopy(QUICK))
        profile["model"] = list(QUICK_MODELS[name])
    return profile


def base_overrides(profile: dict[str, Any], data_root: Path, work: Path, trainer: str) -> list[str]:
    """The Hydra overrides of every measurement, before the knobs."""
    p = profile
    return [
        f"paths.data_dir={data_root}",
        f"paths.log_dir={work / 'logs'}",
        "data=synthetic",
        "data.benchmark=synthetic",
        "data.split=seed",
        *(f"data.synthetic.{k}={v}" for k, v in p["synthetic"].items()),
        f"data.image_size={p['image_size']}",
        f"data.eval_image_size={p['eval_image_size']}",
        f"data.classes_per_batch={p['classes_per_batch']}",
        f"data.images_per_class={p['images_per_class']}",
        "data.use_distractors=true",
        f"data.distractors_per_batch={p['distractors_per_batch']}",
        f"data.batches_per_epoch={p['warmup_steps'] + p['steps']}",
        f"data.num_workers={p['num_workers']}",
        f"data.eval_batch_size={p['eval_batch_size']}",
        *p["model"],
        f"trainer={trainer}",
        "logger=none",
        "callbacks=none",
    ]


def resolve_knobs(profile_name: str, overrides: list[str], work: Path, compile_: bool) -> dict[str, list[str]]:
    """``{"applied": knobs whose key the composed config has, "missing": the others}``; the GPU decode knob
    is listed under "rows" when present (it gets a training row of its own)."""
    from omegaconf import OmegaConf

    cfg = common.compose_train(overrides, work / "runs")
    absent = object()
    found: dict[str, list[str]] = {"applied": [], "missing": [], "rows": []}
    knobs = list(KNOBS[profile_name]) + ([COMPILE_KNOB] if compile_ else [])
    if profile_name == "gpu":
        knobs.append(GPU_DECODE_KNOB)
    for knob in knobs:
        key = knob.split("=", 1)[0]
        if OmegaConf.select(cfg, key, default=absent) is absent:
            found["missing"].append(knob)
        else:
            found["rows" if knob == GPU_DECODE_KNOB else "applied"].append(knob)
    return found


def plan(
    profile: dict[str, Any],
    only: list[str],
    training_rows: dict[str, str],
    loading_rows: dict[str, str] | None = None,
) -> list[tuple[str, str, str, dict[str, str]]]:
    """(row key, label, unit, {variant: "module:function"}) of each row to measure; ``training_rows``,
    ``loading_rows``: the extra rows (key -> label) whose references are those of the training, respectively
    data loading row."""
    m = "experiments.bench"
    s = profile["search"]
    size = f"{s['n']:,} x {s['dim']} fp16"
    rows = []
    if "training" in only:
        rows.append(
            (
                "training",
                "training",
                "images/s",
                {
                    "ours": f"{m}.training:measure_ours",
                    "ceiling": f"{m}.training:measure_ceiling",
                    "original": f"{m}.training:measure_original",
                },
            )
        )
        for key, label in training_rows.items():
            rows.append((key, label, "images/s", {"ours": f"{m}.training:measure_ours"}))
    if "loading" in only:
        rows.append(
            (
                "loading",
                f"data loading, {loading_synthetic(profile)['photo_long_side']} px JPEGs",
                "images/s",
                {"ours": f"{m}.loading:measure_ours", "original": f"{m}.loading:measure_original"},
            )
        )
        for key, label in (loading_rows or {}).items():
            rows.append((key, label, "images/s", {"ours": f"{m}.loading:{LOADING_FUNCTIONS[key]}"}))
    if "extraction" in only:  # ours and the ceiling in one process: the ceiling runs on cuDNN plans ours built
        for key, (label, function) in EXTRACTION_ROWS.items():
            target = f"{m}.extraction:{function}"
            rows.append((key, label, "images/s", {"ours": target, "ceiling": target}))
    if "evaluation" in only:
        rows.append(
            (
                "evaluation",
                "evaluation",
                "pairs/s",
                {"ours": f"{m}.evaluation:measure_ours", "original": f"{m}.evaluation:measure_original"},
            )
        )
    if "search" in only:
        search = {  # profile["search_rows"] name -> (key, label, measurements of experiments/bench/search.py)
            "exact_cpu": ("search_exact_cpu", f"exact search CPU {size}", ("ours", "ceiling")),
            "exact_cuda": ("search_exact_cuda", f"exact search GPU {size}", ("ours", "ceiling")),
            "ivfpq": ("search_ivfpq", f"faiss IVF-PQ CPU {s['ivfpq_n']:,} x {s['dim']}", ("ours",)),
        }
        for row in profile["search_rows"]:
            key, label, variants = search[row]
            # ours and the ceiling of an exact-search row in one process: one CUDA start, one data draw
            function = f"measure_{row}_row" if "ceiling" in variants else f"measure_{row}"
            rows.append((key, label, "queries/s", {v: f"{m}.search:{function}" for v in variants}))
    return rows


def loading_synthetic(profile: dict[str, Any]) -> dict[str, Any]:
    """Parameters of the JPEGs of the data loading rows (None in the profile: the profile's own)."""
    return profile["loading"]["synthetic"] or profile["synthetic"]


def notes_for(
    key: str,
    profile: dict[str, Any],
    results: dict[str, dict[str, Any] | None],
    training: dict[str, dict[str, Any] | None] | None = None,
) -> list[str]:
    """What a reader needs to interpret the row; ``training``: the training row's results of this run, if any
    (the data loading row compares itself with the training ceiling when both use the same crops)."""
    p = profile
    ours, ceiling, original = (results.get(v) or {} for v in report.VARIANTS)
    if key.startswith("loading") and "images" in ours:
        return loading_notes(key, profile, ours, original, (training or {}).get("ceiling") or {})
    if key == "training":
        batch = p["classes_per_batch"] * p["images_per_class"] + p["distractors_per_batch"]
        notes = [
            f"batch {batch} = {p['classes_per_batch']} landmarks x {p['images_per_class']} + "
            f"{p['distractors_per_batch']} distractors at {p['image_size']} px, {p['steps']} timed steps after "
            f"{p['warmup_steps']} warm-up; precision {ours.get('precision', '?')}"
        ]
        if "triplets_per_batch" in original:
            notes.append(
                f"original: {original['triplets_per_batch']} random triplets per step, 3 separate forward passes, "
                "PIL opening per item; every image counted (3 per triplet)"
            )
        return notes
    if key == "training_no_cache":
        return ["training without data.cache: workers decode the JPEGs (PIL); ceiling, original: the training row's"]
    if key == "training_gpu_decode":
        return [
            "training without data.cache, data.decode=gpu: workers read bytes, decode_jpeg and batched "
            "augmentation on the device, prefetched on a side stream; ceiling, original: the training row's"
        ]
    if key == "training_whole_images":
        return [
            "training without data.cache, data.train_images=whole and model.freeze_batchnorm=true (cirtorch): each "
            "image whole at long side image_size, the batch padded onto one square canvas with padding masks; "
            "ceiling, original: the training row's (the ceiling is one batch of square crops)"
        ]
    if key in EXTRACTION_ROWS and "images" in ours:
        return extraction_notes(key, profile, ours, ceiling)
    if key == "evaluation":
        notes = []
        if "first_run_seconds" in ours:
            notes.append(
                f"ours: {ours['batching']} batches ({ours['distinct_input_shapes']} input shapes, "
                f"{ours['distinct_batch_shapes']} batch shapes, padding {ours['padded_over_valid_pixels']:.0%} of "
                f"the pixels), decode {ours['options_used'].get('decode', 'cpu')}, precision {ours['precision']}; "
                f"timed warm: the second evaluation of the process (the first, which planned every shape, took "
                f"{ours['first_run_seconds']:.1f} s)"
            )
        if "extrapolated_seconds" in original:
            mean_ap = ours.get("metrics", {}).get("mAP", float("nan"))
            notes.append(
                f"original measured on {original['pairs_measured']} of {original['pairs_total']:,} pairs "
                f"({original['queries_sampled']} queries) after {original['warmup_pairs']} warm-up pairs passing "
                f"its {original['warmup_input_shapes']} input shapes, and extrapolated: "
                f"{original['extrapolated_seconds']:,.0f} s for the whole benchmark vs "
                f"{ours.get('seconds', float('nan')):.1f} s ({ours.get('queries', '?')} queries x "
                f"{ours.get('database_images', '?')} images); mAP {mean_ap:.3f}"
            )
        return notes
    if key == "search_ivfpq" and "recall_at_10" in ours:
        o = ours["options"]
        return [
            f"recall@10 vs exact {ours['recall_at_10']:.3f}; nlist {o['nlist']}, m {o['m']} x {o['nbits']} bits "
            f"({ours['bytes_per_vector']:.0f} bytes/vector), nprobe {o['nprobe']}, trained on "
            f"{min(o['train_size'], ours['n']):,}; build {ours['build_seconds']:.1f} s; exact search on the same "
            f"data {ours['exact_queries_per_s']:.1f} queries/s"
            + (f" ({ours['exact_device']})" if "exact_device" in ours else "")
            + (f"; {ours['total_seconds']:.0f} s in all" if "total_seconds" in ours else "")
        ]
    if key.startswith("search_exact") and "queries" in ours:
        if "note" in ours:
            return [ours["note"], *([ceiling["note"]] if "note" in ceiling else [])]
        return [f"{ours['queries']} queries, top {ours['k']}, blocks of {ours['block_rows']:,} rows"]
    return []


def extraction_notes(key: str, profile: dict[str, Any], ours: dict[str, Any], ceiling: dict[str, Any]) -> list[str]:
    """Notes of the extraction rows (see experiments/bench/extraction.py)."""
    sizes = ", ".join(f"{w}x{h} ({c})" for w, h, c in sorted(ours["image_sizes"], key=lambda s: -s[2]))
    notes = []
    if key == "extraction":
        notes.append(
            f"{ours['database_images']} JPEGs with the size mix of Oxford/Paris ({sizes}; "
            f"{ours['jpeg_kib_mean']:.0f} KiB on average) + {ours['query_crops']} query crops of random sizes, "
            f"x {ours['repeats']} = {ours['images']} images a pass at long side {profile['eval_image_size']}; batch "
            f"{ours['batch_size']}, {ours['num_workers']} workers, decode {ours['options_used'].get('decode', 'cpu')}, "
            f"precision {ours['precision']}, channels_last {ours['channels_last']}; timed: a second pass over the "
            "images (the first is the warm-up)"
        )
    mode = f"buckets (max_shapes {ours['max_shapes']})" if ours["batching"] == "bucket" else "exact shape batches"
    notes.append(
        f"{mode}: the network saw {ours['distinct_input_shapes']} input shapes in {ours['distinct_batch_shapes']} "
        f"batch shapes, padding {ours['padded_over_valid_pixels']:.1%} of the pixels; one-off warm-up (first "
        f"pass) {ours['warmup_seconds']:.1f} s vs {ours['seconds']:.1f} s warm"
        + (f"; {ours['plan_note']}" if ours.get("plan_note") else "")
    )
    if "same_batches_as_ours" in ceiling:
        same = "the same batches" if ceiling["same_batches_as_ours"] else "NOT the same batches (a bug)"
        filled = f", {ceiling['blank_images']} blank images filling bucket batches" if ceiling["blank_images"] else ""
        notes.append(
            f"ceiling: random tensors of the plan's {ceiling['forward_passes']} batches{filled} in the same process "
            f"after ours (warm), {same} as ours"
            + ("" if "peak_memory" in ceiling else "; its peak memory is not separable from ours' on the CPU")
        )
    return notes


def loading_notes(
    key: str, profile: dict[str, Any], ours: dict[str, Any], original: dict[str, Any], ceiling: dict[str, Any]
) -> list[str]:
    """Notes of the data loading rows (see experiments/bench/loading.py)."""
    source = loading_synthetic(profile)["photo_long_side"]
    workers = ours["num_workers"]
    if key == "loading_no_cache":
        draft = "decoded in draft mode" if source >= 2 * ours["train_long_side"] else "decoded in full"
        return [
            f"without data.cache: workers decode every JPEG with PIL ({source} px JPEGs are {draft}: draft mode "
            f"needs a long side of at least 2 x {ours['train_long_side']}); original: the data loading row's"
        ]
    if key == "loading_no_jitter":
        return [
            "the data loading row without colour jitter (crop, resize and flip only): per image the work of the "
            "original, which does not augment; original: the data loading row's"
        ]
    if key == "loading_gpu_decode":
        return [
            "data.decode=gpu, no cache: workers read the files; each batch is decoded on the device "
            "(one torchvision.io.decode_jpeg call) and cropped, resized, flipped and jittered there as a batch, "
            "prefetched on a side stream, synchronised; original: the data loading row's"
        ]
    notes = [
        f"input pipeline alone, no network: batches of {ours['batch_size']} drawn from {ours['training_images']} "
        f"training JPEGs of {source} px ({ours['jpeg_kib_mean']:.0f} KiB on average), {ours['image_size']} px "
        "crops (random resized crop and flip in the workers, colour jitter and normalisation of the whole batch "
        f"{ours.get('batch_finished', 'on the device')}), "
        f"{workers} DataLoader worker{'s' if workers != 1 else ''} on {common.cpu_count()} cores; "
        f"{ours['steps']} batches timed after {ours['warmup_steps']} (worker start-up)"
    ]
    if ours.get("cache"):
        notes.append(
            f"image cache built before timing: prepare_data + setup took {ours['cache_build_seconds']:.1f} s "
            f"(training pixels at long side {ours['train_long_side']}: {ours['train_cache_bytes'] / 2**20:.0f} MiB; "
            f"the evaluation cache at {profile['eval_image_size']} px is built in the same call)"
        )
    if "triplets_per_batch" in original:
        notes.append(
            f"original: {original['triplets_per_batch']} random triplets per batch, each image opened, decoded and "
            f"resized to {original['image_size']} x {original['image_size']} with PIL per item, no augmentation; "
            "3 images per triplet counted"
        )
    peaks = [
        f"{r['peak_memory']['workers_rss_mib']:,.0f} ({name})"
        for name, r in (("ours", ours), ("original", original))
        if "workers_rss_mib" in r.get("peak_memory", {})
    ]
    if workers and peaks:
        notes.append(
            "peak MiB: of the measuring process, which only receives the batches; its largest worker process "
            f"(DataLoader or cache building) peaked at {', '.join(peaks)} MiB"
        )
    if "value" in ceiling and profile["image_size"] == ours["image_size"]:
        notes.append(
            f"the training row's compute ceiling consumes {report.format_number(ceiling['value'])} images/s at the "
            "same crop size: "
            f"this pipeline delivers {ours['value'] / ceiling['value']:.2f} x that"
        )
    return notes


def prepare_loading(
    profile: dict[str, Any],
    data_root: Path,
    work: Path,
    trainer: str,
    knob_report: dict[str, list[str]],
    *,
    writer: images.JpegWriter | None = None,
    images_dir: Path | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, str]]:
    """The JPEGs of the data loading rows (written by ``writer``'s processes into ``images_dir`` unless the
    profile's own are the same, or a folder there already holds them), and ``(what was written, settings of
    each loading row, extra rows key -> label)``.

    The rows get a cache folder of their own, so that the cache is built (and its build timed) in the row
    whatever the training rows left in the data folder.
    """
    loading = profile["loading"]
    synthetic = loading_synthetic(profile)
    root, seconds = data_root, 0.0
    if synthetic != profile["synthetic"]:
        root = (images_dir or work) / "loading-data"
        seconds = images.write_synthetic(root / "synthetic", writer, seed=0, **synthetic)
    n_images = len(list((root / "synthetic" / "jpg").glob("*.jpg")))
    what = "wrote" if seconds else "reusing"
    log(
        f"data loading: {what} {n_images} synthetic JPEGs of {synthetic['photo_long_side']} px"
        + (f" in {seconds:.1f} s" if seconds else "")
    )
    sizes = {
        **profile,
        "synthetic": synthetic,
        "image_size": loading["image_size"],
        "warmup_steps": loading["warmup_batches"],
        "steps": loading["batches"],
    }
    overrides = base_overrides(sizes, root, work / "loading", trainer)
    knobs = [k for k in knob_report["applied"] if k != COMPILE_KNOB]
    cached = overrides + knobs
    if CACHE_KNOB in knobs:
        cached += [f"data.cache.dir={work / 'loading-cache'}", "data.cache.progress=false"]
    without_cache = overrides + [k for k in knobs if k != CACHE_KNOB]
    timing = {"warmup_batches": loading["warmup_batches"], "batches": loading["batches"]}
    settings = {"loading": {**timing, "overrides": cached, "data_dir": str(root)}}
    rows: dict[str, str] = {}
    if CACHE_KNOB in knobs:
        rows["loading_no_cache"] = "data loading, no cache (PIL in workers)"
        settings["loading_no_cache"] = {**timing, "overrides": without_cache, "data_dir": str(root)}
    rows["loading_no_jitter"] = "data loading, no colour jitter"
    settings["loading_no_jitter"] = {**timing, "overrides": cached + NO_JITTER, "data_dir": str(root)}
    if GPU_DECODE_KNOB in knob_report["rows"]:
        rows["loading_gpu_decode"] = "data loading, JPEG decode on GPU"
        settings["loading_gpu_decode"] = {
            **timing,
            "overrides": without_cache + [GPU_DECODE_KNOB],
            "data_dir": str(root),
        }
    written = {"images": n_images, "generation_seconds": seconds, "synthetic": synthetic, "folder": str(root)}
    return written, settings, rows


def prepare_size_mix(
    profile: dict[str, Any], images_dir: Path, sources: Path, writer: images.JpegWriter | None = None
) -> dict[str, Any]:
    """The extraction rows' JPEGs with the size mix of Oxford/Paris, cut from the synthetic photographs in
    ``sources`` (reused when ``images_dir`` holds them already); what was written, for the JSON."""
    spec = profile["size_mix"]
    folder = images_dir / f"size-mix-{spec['long_side']}"
    manifest, seconds = images.write_size_mix(
        folder,
        sorted(sources.glob("*.jpg")),
        images=spec["images"],
        queries=spec["queries"],
        long_side=spec["long_side"],
        noise=spec.get("noise", 10.0),
        writer=writer,
    )
    kib = sum(i["bytes"] for i in manifest["images"]) / max(1, len(manifest["images"])) / 1024
    log(
        f"extraction: {'wrote' if seconds else 'reusing'} {len(manifest['images'])} JPEGs with the size mix of "
        f"Oxford/Paris at {spec['long_side']} px ({kib:.0f} KiB on average) + {len(manifest['queries'])} query boxes"
        + (f" in {seconds:.1f} s" if seconds else "")
    )
    return {"folder": str(folder), "generation_seconds": seconds, "jpeg_kib_mean": kib, **spec}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="sizes, model and knobs")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="the JSON file written")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the tests")
    parser.add_argument(
        "--device",
        default=None,
        help="cpu or cuda (default: the profile's); --profile gpu --device cpu runs the "
        "GPU profile's code paths on the CPU (checks, not numbers)",
    )
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows to measure ({', '.join(ROWS)})")
    parser.add_argument("--compile", action="store_true", help=f"also apply {COMPILE_KNOB} to the training rows")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder of JPEGs and runs")
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder for the JPEGs, reused by later runs when its contents match (default: the temporary folder)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run (default: the profile's; gpu: 290); rows past their share are stopped",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="processes writing the JPEGs (default: the cores available)"
    )
    args = parser.parse_args(argv)
    only = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = sorted(set(only) - set(ROWS))
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    args.only = only
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, clock = report.today(), time.perf_counter()
    profile = profile_settings(args.profile, args.quick)
    device = args.device or profile["device"]
    import torch

    if device not in ("cpu", "cuda"):
        print(f"--device {device}: use cpu or cuda", file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print(
            f"--profile {args.profile} measures on a CUDA GPU, but torch {torch.__version__} sees none "
            f"(CUDA build: {torch.version.cuda}). Run it on a GPU machine (experiments/bench/gpu.sh), "
            "use --profile cpu, or --device cpu to check the GPU profile's code paths on the CPU",
            file=sys.stderr,
        )
        return 2
    machine = report.machine_info()
    work = Path(tempfile.mkdtemp(prefix="oxford-ir-bench-"))
    try:
        return _run(args, profile, device, machine, work, started, clock)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    profile: dict[str, Any],
    device: str,
    machine: dict[str, Any],
    work: Path,
    started: str,
    clock: float,
) -> int:
    import torch

    images_dir = (args.images or work / "images").expanduser().resolve()
    data_root = work / "data"  # synthetic/ links to the JPEGs; the training cache is written beside it, in work
    trainer = "gpu" if device == "cuda" else "cpu"
    overrides = base_overrides(profile, data_root, work, trainer)
    os.environ[common.CONFIG_CACHE_ENV] = str(work / "configs")  # measurement processes compose each config once
    with images.JpegWriter(args.workers) as writer:
        writer.start()  # its processes fork now, before any thread exists in this process
        forkserver = common.start_forkserver()  # imports torch, Lightning, Hydra meanwhile
        generation = images.write_synthetic(images_dir / "data" / "synthetic", writer, seed=0, **profile["synthetic"])
        data_root.mkdir(parents=True, exist_ok=True)
        (data_root / "synthetic").symlink_to(images_dir / "data" / "synthetic", target_is_directory=True)
        n_images = len(list((data_root / "synthetic" / "jpg").glob("*.jpg")))
        written = f"{n_images} synthetic JPEGs of {profile['synthetic']['photo_long_side']} px in {images_dir}"
        log(f"wrote {written} ({generation:.1f} s)" if generation else f"reusing {written}")
        knob_report = resolve_knobs(args.profile, overrides, work, args.compile)
        loading_rows: dict[str, str] = {}
        loading_data: dict[str, Any] | None = None
        if "loading" in args.only:
            loading_data, loading_settings, loading_rows = prepare_loading(
                profile, data_root, work, trainer, knob_report, writer=writer, images_dir=images_dir
            )
        size_mix = None
        if "extraction" in args.only:
            size_mix = prepare_size_mix(profile, images_dir, data_root / "synthetic" / "jpg", writer)
    forkserver.join()
    machine["gpu"] = report.gpu_info(torch.device(device))  # after the forks; measurements use the forkserver
    setup_seconds = time.perf_counter() - clock
    knobs = knob_report["applied"]
    for knob in knob_report["missing"]:
        log(f"knob {knob}: the config has no such key yet; not applied")
    train_overrides = overrides + knobs
    eval_overrides = overrides + [k for k in knobs if k != COMPILE_KNOB]
    without_cache = overrides + [k for k in knobs if k != CACHE_KNOB]
    # extra training rows: what the cache buys, and the GPU decode path (which excludes the cache)
    training_rows: dict[str, tuple[str, list[str]]] = {}
    if CACHE_KNOB in knobs:
        training_rows["training_no_cache"] = ("training, no cache (PIL in workers)", without_cache)
    if GPU_DECODE_KNOB in knob_report["rows"]:
        training_rows["training_gpu_decode"] = ("training, JPEG decode on GPU", without_cache + [GPU_DECODE_KNOB])
    # cnnimageretrieval-pytorch's setting: whole images at their own aspect ratio, padded onto one canvas, frozen
    # BatchNorm (no cache: whole images are decoded in the workers); what the cirtorch recipes train with
    training_rows["training_whole_images"] = ("training, whole images (cirtorch)", without_cache + WHOLE_IMAGES)
    extraction_options = dict(EXTRACTION_OPTIONS[args.profile])
    if extraction_options.get("decode") == "auto" and device == "cpu":
        extraction_options["decode"] = "gpu"  # --profile gpu --device cpu: the GPU decode path, on the CPU
    base = {
        "device": device,
        "output_dir": str(work / "runs"),
        "data_dir": str(data_root),
        "threads": profile.get("threads"),
        "seed": 0,
    }
    settings = {
        "training": {
            **base,
            "overrides": train_overrides,
            "warmup_steps": profile["warmup_steps"],
            "steps": profile["steps"],
            "channels_last": "model.channels_last=true" in knobs,
        },
        "extraction": {
            **base,
            "overrides": eval_overrides,
            "eval_image_size": profile["eval_image_size"],
            "batch_size": profile["eval_batch_size"],
            "num_workers": profile["eval_num_workers"],
            "repeats": profile["extraction_repeats"],
            "extraction_options": extraction_options,
            "size_mix": None if size_mix is None else size_mix["folder"],
            "max_shapes": profile.get("max_shapes"),  # None: the package's default
            "pair_warmup": max(1, profile["pair_warmup"]),
            "pair_sample": profile["pair_sample"],
            "pair_queries": profile.get("pair_queries"),
        },
        "search": {**base, **profile["search"]},
    }
    settings["evaluation"] = settings["extraction"]
    for key, (_, row_overrides) in training_rows.items():
        settings[key] = {**settings["training"], "overrides": row_overrides}
    if "loading" in args.only:
        settings.update({key: {**base, **value} for key, value in loading_settings.items()})

    def document(partial: bool) -> dict[str, Any]:
        return {
            "schema": report.SCHEMA_VERSION,
            "profile": args.profile,
            "quick": bool(args.quick),
            "device": device,
            "command": shlex.join([sys.executable, *sys.argv]),
            "started": started,
            "finished": None if partial else report.today(),
            "partial": partial,
            "elapsed_seconds": time.perf_counter() - clock,
            "machine": machine,
            "data": {
                "images": n_images,
                "generation_seconds": generation,
                "synthetic": profile["synthetic"],
                "folder": str(images_dir),
            },
            "loading_data": loading_data,
            "size_mix": size_mix,
            "timing": budget.summary(setup_seconds),
            "settings": profile,
            "overrides": {"training": train_overrides, "evaluation": eval_overrides},
            "knobs": knob_report,
            "extraction_options": extraction_options,
            "rows": rows,
            "errors": [e for e in errors if e["kind"] == "error"],
            "over_budget": [e for e in errors if e["kind"] == "over_budget"],
        }

    rows, errors = [], []
    planned = plan(profile, args.only, {k: v[0] for k, v in training_rows.items()}, loading_rows)
    total = args.budget if args.budget is not None else profile.get("total_budget_s")
    budget = Budget(profile["budgets"], [row_group(key) for key, *_ in planned], total, clock)
    training_results: dict[str, dict[str, Any] | None] = {}
    loading_results: dict[str, dict[str, Any] | None] = {}
    for key, label, unit, variants in planned:
        group = row_group(key)
        settings_key = "search" if group == "search" else "extraction" if group == "extraction" else key
        before = budget.spent[group]
        results = measure_row(key, label, unit, variants, settings[settings_key], budget, profile, errors)
        log(
            f"{label}: {budget.spent[group] - before:.1f} s; {group} rows {budget.spent[group]:.0f} s of "
            f"{budget.shares[group]:.0f}, run {time.perf_counter() - clock:.0f} s"
            + (f" of {budget.total:.0f}" if budget.total is not None else "")
        )
        if key == "training":
            training_results = results
        elif key in training_rows:  # compared with the training row's references, measured in this run
            results.update({v: training_results.get(v) for v in ("ceiling", "original")})
        elif key == "loading":
            loading_results = results
        elif key in loading_rows:
            results["original"] = loading_results.get("original")
        notes = notes_for(key, profile, results, training_results)
        rows.append(report.make_row(key, label, unit, results, notes=notes))
        if key == "search_ivfpq" and results.get("ours") and "recall_at_10" in results["ours"]:
            rows.append(
                report.make_row(
                    "search_ivfpq_recall", "IVF-PQ recall@10 vs exact", "fraction", results, metric="recall_at_10"
                )
            )
        report.write_json(args.out, document(partial=True))  # what is measured so far, should the run be killed

    data = document(partial=False)
    report.write_json(args.out, data)
    table = report.format_table(rows) + "\n\n" + report.format_timing(data["timing"])
    if knob_report["missing"]:
        table += "\n\nknobs not in the config yet (not applied): " + ", ".join(knob_report["missing"])
    title = f"oxford-ir bench: profile {args.profile}{' (quick)' if args.quick else ''} on {device}"
    gpu = machine.get("gpu")
    where = f"{gpu['name']}, " if gpu else ""
    where += f"{machine['cpu_model']} ({machine['cpu_cores_usable']} cores), torch {machine['torch']}"
    print(f"\n{title}\n{where}, {started}\n\n{table}\n")
    print(f"wrote {args.out} ({data['elapsed_seconds']:.0f} s in all)")
    return 1 if errors else 0


def row_group(key: str) -> str:
    """The budget group of a row: training, loading, extraction, evaluation or search."""
    return next(group for group in ROWS if key.startswith(group))


class Budget:
    """Seconds per group of rows (``shares``) and for the whole run (``total``, from ``clock``; None: no bound).

    A group may run for its share plus what the groups before it left unused, and no process runs past the
    run's total: the run ends within it whatever each group does (a process past its time is stopped).
    """

    def __init__(self, shares: dict[str, float], groups: list[str], total: float | None, clock: float) -> None:
        self.shares = {g: float(shares[g]) for g in dict.fromkeys(groups)}
        self.order = list(self.shares)
        self.total, self.clock = total, clock
        self.spent = dict.fromkeys(self.order, 0.0)

    def left(self, group: str) -> float:
        """Seconds the next process of ``group`` may run."""
        upto = self.order[: self.order.index(group) + 1]
        left = sum(self.shares[g] - self.spent[g] for g in upto)
        if self.total is not None:
            left = min(left, self.total - (time.perf_counter() - self.clock))
        return left

    def describe(self, group: str) -> str:
        """What bounds ``group``'s time, for messages."""
        share = f"the {group} rows' share ({self.shares[group]:.0f} s, with what earlier rows left)"
        return share if self.total is None else f"{share} or the run's budget ({self.total:.0f} s)"

    def spend(self, group: str, seconds: float) -> None:
        self.spent[group] += seconds

    def summary(self, setup_seconds: float) -> dict[str, Any]:
        return {
            "setup_seconds": setup_seconds,
            "groups": {g: {"seconds": self.spent[g], "share": self.shares[g]} for g in self.order},
            "total_seconds": time.perf_counter() - self.clock,
            "total_budget": self.total,
        }


def measure_row(
    key: str,
    label: str,
    unit: str,
    variants: dict[str, str],
    settings: dict[str, Any],
    budget: Budget,
    profile: dict[str, Any],
    errors: list[dict[str, Any]],
) -> dict[str, dict[str, Any] | None]:
    """Each variant of a row measured in a process of its own, or several variants in one when they name the
    same function (it returns ``{"variants": {variant: result}}``), within the row's budget; a process past its
    time is stopped and its variants are reported over budget, the run goes on."""
    group = row_group(key)
    targets: dict[str, list[str]] = {}
    for variant, target in variants.items():
        targets.setdefault(target, []).append(variant)
    results: dict[str, dict[str, Any] | None] = {}
    for target, names in targets.items():
        which = " + ".join(names)
        timeout = min(float(profile["child_timeout_s"]), budget.left(group))
        took = 0.0
        if timeout < 1:
            outcome: dict[str, Any] = {"over_budget": f"not run: {budget.describe(group)} is spent"}
        else:
            log(f"{label}: {which} ... (at most {timeout:.0f} s)")
            start = time.perf_counter()
            try:
                outcome = common.run_isolated(target, settings, timeout)
            except common.MeasurementTimeout:
                outcome = {"over_budget": f"stopped after {timeout:.0f} s: {budget.describe(group)} was spent"}
            except common.MeasurementError as error:
                outcome = {"error": str(error)}
            took = time.perf_counter() - start
            budget.spend(group, took)
        parts = outcome.pop("variants", None)
        for name in names:
            result = dict(parts[name]) if parts else dict(outcome)
            result["wall_seconds"] = took
            results[name] = result
            for kind in ("error", "over_budget"):
                if kind in result:
                    errors.append({"row": key, "variant": name, "kind": kind, "error": result[kind]})
            if "error" in result:
                log(f"{label}: {name}: {result['error']}")
            if "over_budget" in result:
                shown = f"over budget ({result['over_budget']})"
            elif "error" in result or "skipped" in result:
                shown = result.get("skipped") or "error"
            else:
                shown = f"{report.format_number(result.get('value'))} {unit}"
            log(f"{label}: {name} = {shown} ({took:.1f} s)")
    return results


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
