"""experiments/bench: the quick CPU run end to end (table, JSON, ratios, the extraction rows' shapes against
their ceilings, time per row), the original project's method as reimplemented for it (three forward passes per
triplet batch; pairwise evaluation ranks as ours does), the data loading rows (every image of every pipeline
counted, the device decode path included), the JPEGs (parallel writing gives the package's files; the size mix)
and the time budgets (a row past its time is reported, the run goes on)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from experiments.bench import common, extraction, loading, original, report, run
from experiments.bench import images as bench_images
from experiments.bench import search as search_rows
from experiments.bench.evaluation import warmup_pairs
from experiments.bench.search import ClusterMixture, recall_at
from experiments.bench.training import throughput
from oxford_ir.benchmarks.ranking import rank_database
from oxford_ir.benchmarks.registry import load_benchmark
from oxford_ir.benchmarks.synthetic import SYNTHETIC_TINY, landmark_of, write_synthetic_benchmark
from oxford_ir.data.datasets import ImageListDataset
from oxford_ir.extraction.batches import PlannedBatches
from oxford_ir.extraction.benchmark import extract_benchmark
from oxford_ir.extraction.embedding import embed_planned, extract_embeddings, plan_for_model
from oxford_ir.models.backbones import ScratchCNN
from oxford_ir.models.embedder import Embedder
from oxford_ir.models.pooling import GeM
from oxford_ir.retrieval.exact_search import ExactSearch, search_resident

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "experiments" / "bench" / "run.py"


class CountingModel(nn.Module):
    """A tiny embedding network that records the batch of every forward call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = Embedder(ScratchCNN(channels=[4, 8]), GeM())
        self.embedding_dim = self.inner.embedding_dim
        self.calls: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.detach().clone())
        return self.inner(images)


@pytest.fixture
def one_thread():
    """Tiny networks on shared cores: one intra-op thread is several times faster than two fighting (not for
    the search rows, whose block sizes follow the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "synthetic"
    write_synthetic_benchmark(root, **{**SYNTHETIC_TINY, "photo_long_side": 64})
    return root


# -- the whole quick run ------------------------------------------------------------------------------------------
@pytest.mark.slow  # 20 s: the whole quick benchmark run; its parts are tested above, the run in make test-full
def test_quick_cpu_run_prints_the_table_and_writes_consistent_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, str(RUN), "--profile", "cpu", "--quick", "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["schema"] == report.SCHEMA_VERSION and data["profile"] == "cpu" and data["quick"] is True
    assert data["device"] == "cpu" and data["errors"] == [] and data["over_budget"] == [] and not data["partial"]
    machine = data["machine"]
    assert machine["cpu_cores"] == os.cpu_count() and machine["torch"] == torch.__version__ and machine["gpu"] is None
    assert str(RUN) in data["command"] and "--quick" in data["command"]
    assert set(data["knobs"]) == {"applied", "missing", "rows"}

    rows = {row["key"]: row for row in data["rows"]}
    assert {"training", "extraction", "extraction_exact", "evaluation", "search_exact_cpu", "search_ivfpq"} <= set(rows)
    assert {"loading", "loading_no_cache"} <= set(rows) and "loading_gpu_decode" not in rows  # no GPU row on cpu
    assert rows["training_whole_images"]["ours"] > 0  # data.train_images=whole: a forward pass per shape
    for row in data["rows"]:
        assert row["label"] in done.stdout, f"{row['label']} missing from the printed table"
        # every ratio is exactly the quotient of the raw numbers beside it
        for name, reference in (("ours_over_ceiling", "ceiling"), ("ours_over_original", "original")):
            if row["ours"] is None or row[reference] is None:
                assert row[name] is None
            else:
                assert math.isclose(row[name], row["ours"] / row[reference], rel_tol=1e-12)
            memory, mine = row["peak_memory_mib"], row["peak_memory_mib"]["ours"]
            if mine is None or memory[reference] is None:
                assert row[f"memory_{name}"] is None
            else:
                assert math.isclose(row[f"memory_{name}"], mine / memory[reference], rel_tol=1e-12)
        for variant in report.VARIANTS:
            measured = row["measurements"].get(variant)
            if measured is None or "skipped" in measured:
                continue
            assert row[variant] > 0
            if "peak_memory" in measured:  # not the ceilings measured in ours' process on the CPU
                assert measured["peak_memory"]["kind"] == "rss" and row["peak_memory_mib"][variant] > 50
            else:
                assert row["key"].startswith(("extraction", "search_exact")) and variant == "ceiling"

    training = rows["training"]
    assert all(training[v] is not None for v in report.VARIANTS)
    batch = 3 * 2 + 2  # --quick: 3 landmarks x 2 images + 2 distractors
    assert training["measurements"]["ours"]["batch_size"] == batch
    assert training["measurements"]["ours"]["images"] == 3 * batch  # 3 timed steps after 1 warm-up
    assert training["measurements"]["original"]["images_per_step"] == 3 * (batch // 3)
    assert training["measurements"]["original"]["forward_passes_per_step"] == 3

    for key in ("loading", "loading_no_cache"):  # --quick: 3 timed batches of 8 after 1, one worker
        measured = rows[key]["measurements"]["ours"]
        assert rows[key]["ceiling"] is None and measured["images"] == 3 * batch and measured["batches"] == 4
        assert measured["batch_shapes"] == [[batch, 3, 32, 32]] and measured["num_workers"] == 1
        assert measured["cache"] is (key == "loading")
        assert rows[key]["original"] == rows["loading"]["original"]  # the extra row compares with the same original
    assert rows["loading"]["measurements"]["ours"]["cache_build_seconds"] > 0
    assert rows["loading"]["measurements"]["original"]["images"] == 3 * 3 * (batch // 3)
    assert data["loading_data"]["images"] == data["data"]["images"]  # --quick reuses the profile's JPEGs
    assert "no network" in done.stdout

    # extraction: the same images in both rows, the bucket row within max_shapes (2 in --quick) and the exact row
    # with one shape per preprocessed size; each ceiling ran exactly the batches its row's network received
    bucket, exact = (rows[k]["measurements"] for k in ("extraction", "extraction_exact"))
    mix = data["size_mix"]
    assert bucket["ours"]["images"] == exact["ours"]["images"] == mix["images"] + mix["queries"]  # 1 repeat
    assert bucket["ours"]["batching"] == "bucket" and exact["ours"]["batching"] == "shape"
    assert bucket["ours"]["distinct_input_shapes"] <= bucket["ours"]["max_shapes"] == 2
    assert exact["ours"]["distinct_input_shapes"] > bucket["ours"]["distinct_input_shapes"]
    assert exact["ours"]["padded_over_valid_pixels"] == 0 < bucket["ours"]["padded_over_valid_pixels"]
    for row in (bucket, exact):
        ours, ceiling = row["ours"], row["ceiling"]
        assert ceiling["same_batches_as_ours"] is True and ceiling["images"] == ours["images"]
        for key in ("forward_passes", "network_images", "distinct_input_shapes", "distinct_batch_shapes"):
            assert ceiling[key] == ours[key]
        assert ours["network_images"] == ours["images"] and ceiling["blank_images"] == 0  # no filling on the CPU
        assert ours["warmup_seconds"] > 0 and ours["seconds"] > 0 and ours["query_crops"] == mix["queries"]
        assert sum(c for *_, c in ours["image_sizes"]) == mix["images"] and len(ours["image_sizes"]) > 3
    assert "one-off warm-up" in done.stdout and "the same batches as ours" in done.stdout

    evaluation = rows["evaluation"]
    ours, pairwise = evaluation["measurements"]["ours"], evaluation["measurements"]["original"]
    assert ours["pairs"] == ours["queries"] * ours["database_images"] == pairwise["pairs_total"]
    assert ours["batching"] == "bucket" and ours["first_run_seconds"] > 0 and ours["forward_passes"] > 0
    assert pairwise["extrapolated"] is True and pairwise["pairs_measured"] == 10
    assert pairwise["warmup_pairs"] >= 2 and pairwise["warmup_input_shapes"] >= 2
    assert math.isclose(pairwise["extrapolated_seconds"], pairwise["pairs_total"] / pairwise["value"])
    assert "extrapolated" in done.stdout and "timed warm" in done.stdout

    timing = data["timing"]  # time per group of rows, within the (quick) shares
    assert set(timing["groups"]) == set(run.ROWS) and "time: setup" in done.stdout
    assert all(0 < g["seconds"] <= g["share"] for g in timing["groups"].values())
    assert timing["total_seconds"] >= timing["setup_seconds"] + sum(g["seconds"] for g in timing["groups"].values())

    ivfpq = rows["search_ivfpq"]
    if "skipped" not in ivfpq["measurements"]["ours"]:
        assert 0.0 <= rows["search_ivfpq_recall"]["ours"] <= 1.0
        assert rows["search_ivfpq_recall"]["ours"] == ivfpq["measurements"]["ours"]["recall_at_10"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_profile_without_cuda_says_how_to_run_it(tmp_path):
    out = tmp_path / "bench_gpu.json"
    done = subprocess.run(
        [sys.executable, str(RUN), "--profile", "gpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "CUDA" in done.stderr and "--device cpu" in done.stderr and "gpu.sh" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


# -- the original method ------------------------------------------------------------------------------------------
def training_images(root: Path) -> tuple[list[Path], np.ndarray]:
    paths = sorted((root / "jpg").glob("*.jpg"))
    names = [landmark_of(p.name) for p in paths]
    labels = {n: i for i, n in enumerate(sorted(set(names)))}
    distractor = iter(range(len(labels), len(labels) + len(paths)))  # each distractor its own label
    return paths, np.array([next(distractor) if n == "distractor" else labels[n] for n in names])


@pytest.mark.usefixtures("one_thread")
def test_original_training_makes_three_separate_forward_passes_per_triplet_batch(tiny_root):
    paths, labels = training_images(tiny_root)
    dataset = original.RandomTripletDataset(paths, labels, image_size=32, length=6, seed=3)
    for item in range(200):  # random triplets: anchor and positive share a landmark, the negative does not
        anchor, positive, negative = dataset.triplet(item)
        assert anchor != positive and labels[anchor] == labels[positive] != labels[negative]
    model = CountingModel()
    images_per_step: list[int] = []
    steps = original.train_triplets(
        model,
        DataLoader(dataset, batch_size=2),
        torch.optim.SGD(model.parameters(), lr=0.01),
        margin=0.1,
        device=torch.device("cpu"),
        on_step=lambda step, images: images_per_step.append(images),
    )
    assert steps == 3 and images_per_step == [6, 6, 6]
    assert len(model.calls) == 9 and all(c.shape == (2, 3, 32, 32) for c in model.calls)
    for step in range(3):  # anchors, then positives, then negatives: three passes of the same batch's triplets
        items = [dataset[2 * step + i] for i in range(2)]
        for role in range(3):
            expected = torch.stack([item[role] for item in items])
            assert torch.equal(model.calls[3 * step + role], expected)


@pytest.mark.usefixtures("one_thread")
def test_pairwise_evaluation_passes_every_pair_and_ranks_as_the_matrix_product(tiny_root):
    benchmark = load_benchmark("synthetic", tiny_root)
    model = CountingModel().eval()
    database, queries = extract_benchmark(model, benchmark, 64, batch_size=4)
    ours = benchmark.evaluate(rank_database(database, queries))
    batched_calls = len(model.calls)
    model.calls.clear()

    pairs = original.all_pairs(benchmark.n_queries, benchmark.n_db)
    distances = original.pairwise_distances(model, benchmark, 64, pairs)
    assert batched_calls < benchmark.n_queries + benchmark.n_db  # ours: each image once, in batches
    assert len(model.calls) == 2 * benchmark.n_queries * benchmark.n_db  # the original: both images of every pair
    assert all(c.shape[0] == 1 for c in model.calls)
    ranks = original.pairwise_ranks(distances.reshape(benchmark.n_queries, benchmark.n_db))
    assert np.array_equal(ranks, rank_database(database, queries))
    assert original.evaluate_pairwise(model, benchmark, 64) == ours
    assert ours["mAP"] > 0


# -- data loading -------------------------------------------------------------------------------------------------
def test_data_loading_counts_every_image_of_each_pipeline_including_the_device_decode_path(tmp_path):
    profile = run.profile_settings("cpu", quick=True)
    profile["num_workers"] = 0  # in this process: the counts, not the speed
    data_root = tmp_path / "data"
    write_synthetic_benchmark(data_root / "synthetic", seed=0, **profile["synthetic"])
    knobs = {"applied": [run.CACHE_KNOB], "missing": [], "rows": [run.GPU_DECODE_KNOB]}
    written, settings, rows = run.prepare_loading(profile, data_root, tmp_path, "cpu", knobs)
    assert written["folder"] == str(data_root) and written["generation_seconds"] == 0  # the profile's own JPEGs
    assert set(rows) == {"loading_no_cache", "loading_no_jitter", "loading_gpu_decode"}
    base = {"device": "cpu", "output_dir": str(tmp_path / "runs")}
    batch, warmup, timed = 3 * 2 + 2, profile["loading"]["warmup_batches"], profile["loading"]["batches"]

    cached = loading.measure_ours({**base, **settings["loading"]})
    assert cached["cache"] and cached["train_cache_bytes"] > 0 and cached["cache_build_seconds"] > 0
    assert (tmp_path / "loading-cache").is_dir() and not (data_root / "cache").exists()  # a cache of its own
    plain = loading.measure_no_cache({**base, **settings["loading_no_cache"]})
    assert not plain["cache"] and plain["decode"] == "cpu"
    assert all(f"data.augmentation.{k}=0" in settings["loading_no_jitter"]["overrides"] for k in ("hue", "contrast"))
    unjittered = loading.measure_no_jitter({**base, **settings["loading_no_jitter"]})
    assert unjittered["cache"]
    # data.decode=gpu: the same code as on a GPU (workers read bytes, on_after_batch_transfer decodes), on the CPU
    on_device = loading.measure_loader({**base, **settings["loading_gpu_decode"]}, decode_on_device=True)
    assert on_device["decode"] == "gpu" and not on_device["cache"]
    for result in (cached, plain, unjittered, on_device):
        assert result["batches"] == warmup + timed and result["images"] == timed * batch and result["value"] > 0
        assert result["batch_shapes"] == [(batch, 3, 32, 32)]
    with pytest.raises(common.Skipped, match="CUDA"):
        loading.measure_gpu_decode({**base, **settings["loading_gpu_decode"]})

    triplets = loading.measure_original({**base, **settings["loading"]})
    assert triplets["triplets_per_batch"] == batch // 3 and triplets["batch_shapes"] == [(batch // 3, 3, 32, 32)]
    assert triplets["images"] == timed * 3 * (batch // 3)


def test_time_batches_stops_at_the_limit_and_counts_the_batches_after_the_warm_up():
    drawn: list[int] = []

    def batches():
        for n in range(100):
            drawn.append(n)
            yield torch.zeros(n % 3 + 1)  # 1, 2, 3, 1, 2 images

    doubled = loading.time_batches(
        batches(), len, warmup=2, limit=5, device=torch.device("cpu"), handle=lambda b: torch.cat([b, b])
    )
    assert drawn == [0, 1, 2, 3, 4]  # nothing drawn past the limit
    assert doubled["batches"] == 5 and doubled["steps"] == 3 and doubled["images"] == 2 * (3 + 1 + 2)
    assert doubled["value"] == doubled["images"] / doubled["seconds"]


# -- pieces ----------------------------------------------------------------------------------------------------------
def test_rows_keep_raw_numbers_and_exact_ratios():
    memory = {"kind": "rss", "mib": 100.0}
    row = report.make_row(
        "training",
        "training",
        "images/s",
        {
            "ours": {"value": 30.0, "peak_memory": memory},
            "ceiling": {"value": 40.0, "peak_memory": memory},
            "original": {"skipped": "no reason"},
        },
    )
    assert (row["ours"], row["ceiling"], row["original"]) == (30.0, 40.0, None)
    assert row["ours_over_ceiling"] == 0.75 and row["ours_over_original"] is None
    assert row["status"] == {"original": "skipped: no reason"}
    table = report.format_table([row])
    assert "0.75" in table and "original: skipped: no reason" in table


def test_throughput_counts_the_images_after_the_warm_up():
    times = [10.0, 11.0, 11.5, 12.5]
    result = throughput(times, [8, 8, 8, 8], warmup=2)
    assert result["images"] == 16 and result["seconds"] == 1.5 and result["value"] == 16 / 1.5
    assert result["steps"] == 2 and result["median_step_s"] == 0.75


def test_cluster_mixture_gives_unit_rows_and_neighbours_within_clusters():
    mixture = ClusterMixture(dim=64, clusters=8, rank=4, spread=0.5, noise=0.25, seed=1)
    database = mixture.sample(2000, seed=1)
    assert database.dtype == torch.float16 and database.shape == (2000, 64)
    assert torch.allclose(database.float().norm(dim=1), torch.ones(2000), atol=2e-3)
    assert torch.equal(database, mixture.sample(2000, seed=1))
    queries = mixture.sample(20, seed=2).float()
    scores = queries @ database.float().T
    # a query's nearest rows are far closer than the average row (other clusters are near-orthogonal)
    assert bool((scores.topk(10, dim=1).values[:, -1] > scores.mean(dim=1) + 0.4).all())
    _, truth = ExactSearch(database.numpy()).search(queries.half().float().numpy(), 10)
    _, found = search_resident(database, queries.half(), 10, block_rows=300)  # the GPU code, here on CPU tensors
    assert recall_at(found.numpy(), truth, 10) == 1.0
    assert recall_at(np.array([[1, 2, 3]]), np.array([[3, 4, 5]]), 3) == pytest.approx(1 / 3)


def test_search_rows_run_their_gpu_measurements_on_the_cpu(monkeypatch):
    """The exact search GPU row and its ceiling (skipped without CUDA in the runs) on CPU tensors, tiny."""
    settings = {"device": "cpu", "n": 3000, "dim": 64, "queries": 40, "k": 10, "clusters": 16, "rank": 4}
    settings |= {"spread": 0.5, "noise": 0.25, "repeats": 2, "cpu_queries": 24}
    with pytest.raises(common.Skipped, match="CUDA"):
        search_rows.measure_exact_cuda(settings)
    monkeypatch.setattr(search_rows, "_require_cuda", lambda settings: torch.device("cpu"))
    row = search_rows.measure_exact_cuda_row(settings)  # both variants in one process, as run.py takes them
    ours, ceiling = row["variants"]["ours"], row["variants"]["ceiling"]
    assert ours["queries"] == ceiling["queries"] == 40 and ours["value"] == 40 / min(ours["all_seconds"])
    assert ours["same_top_k_as_cpu"] > 0.95 and "-bound" in ours["note"] and "ceiling" in ceiling["note"]
    assert set(ceiling["variants"]) == {"blocks", "one call", "one call, float16 scores"}
    assert ceiling["variant"] in ("blocks", "one call")
    r = ours["roofline"]
    assert r["flops"] == 2 * 40 * 3000 * 64 and r["bytes_read"] == 2 * (3000 + 40) * 64
    cpu, cpu_ceiling = (search_rows.measure_exact_cpu_row(settings)["variants"][v] for v in ("ours", "ceiling"))
    assert cpu["queries"] == cpu_ceiling["queries"] == 24 and cpu["streamed"] and len(cpu_ceiling["layouts"]) == 1


# -- extraction and evaluation rows, JPEGs, budgets ------------------------------------------------------------------
def test_parallel_synthetic_writer_gives_the_package_files_and_reuses_them(tmp_path):
    params = {**SYNTHETIC_TINY, "photo_long_side": 64}
    write_synthetic_benchmark(tmp_path / "serial", seed=2, **params)
    with bench_images.JpegWriter(2) as writer:
        assert bench_images.write_synthetic(tmp_path / "pool", writer, seed=2, **params) > 0
        assert bench_images.write_synthetic(tmp_path / "pool", writer, seed=2, **params) == 0  # complete: reused
    serial = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*") if p.is_file())
    pooled = sorted(p.relative_to(tmp_path / "pool") for p in (tmp_path / "pool").rglob("*") if p.is_file())
    assert serial == pooled and len(serial) > 30
    assert all((tmp_path / "serial" / p).read_bytes() == (tmp_path / "pool" / p).read_bytes() for p in serial)


def test_size_mix_has_the_proportions_of_oxford_and_is_reused_while_its_manifest_matches(tmp_path, tiny_root):
    counts = bench_images.size_counts(200, 1024)
    assert sum(counts.values()) == 200 and counts[1024, 768] == 90 and counts[768, 1024] == 50
    assert counts[1024, 683] == 24 and counts[1024, 576] == 8 and len(counts) == len(bench_images.SIZE_MIX)
    sources = sorted((tiny_root / "jpg").glob("*.jpg"))
    folder = tmp_path / "mix"
    kwargs = {"images": 20, "queries": 5, "long_side": 96}
    with bench_images.JpegWriter(2) as writer:
        manifest, seconds = bench_images.write_size_mix(folder, sources, writer=writer, **kwargs)
    assert seconds > 0 and len(manifest["images"]) == 20 and len(manifest["queries"]) == 5
    for image in manifest["images"]:
        with Image.open(folder / image["file"]) as opened:
            assert opened.size == (image["width"], image["height"]) and max(opened.size) == 96
    sizes = {(i["width"], i["height"]) for i in manifest["images"]}
    assert {(96, 72), (72, 96), (96, 64)} <= sizes  # landscape and portrait 4:3, landscape 3:2
    for query in manifest["queries"]:
        image = manifest["images"][query["image"]]
        x1, y1, x2, y2 = query["bbox"]
        assert 0 <= x1 < x2 <= image["width"] and 0 <= y1 < y2 <= image["height"]
    assert bench_images.write_size_mix(folder, sources, **kwargs) == (manifest, 0.0)  # reused
    paths, boxes, n_db = bench_images.size_mix_inputs(folder)
    assert n_db == 20 and len(paths) == len(boxes) == 25 and boxes[:20] == [None] * 20 and None not in boxes[20:]
    _, seconds = bench_images.write_size_mix(folder, sources, **{**kwargs, "queries": 4})  # another manifest
    assert seconds > 0 and len(bench_images.size_mix_inputs(folder)[0]) == 24


@pytest.mark.usefixtures("one_thread")
def test_the_ceiling_runs_the_batches_the_extraction_gives_the_network(tmp_path, tiny_root):
    """planned_forwards (what the ceiling runs) against the forward passes recorded during real extractions:
    bucket and exact batches, and bucket batches filled with blank images as on CUDA (fill_to)."""
    sources = sorted((tiny_root / "jpg").glob("*.jpg"))
    bench_images.write_size_mix(tmp_path / "mix", sources, images=24, queries=6, long_side=64)
    paths, boxes, _ = bench_images.size_mix_inputs(tmp_path / "mix")
    model = Embedder(ScratchCNN(channels=[4, 8]), GeM()).eval()
    for batching in ("bucket", "shape"):
        plan = plan_for_model(model, paths, 64, 4, bboxes=boxes, batching=batching, max_shapes=3)
        planned = extraction.planned_forwards(plan, 4, fill=False)
        with extraction.recorded_forwards(model) as seen:
            extract_embeddings(model, paths, 64, bboxes=boxes, batch_size=4, batching=batching, max_shapes=3)
        assert Counter(seen) == Counter(f for f, _ in planned)
        shapes = {f[1:3] for f in seen}
        assert len(shapes) <= 3 if batching == "bucket" else len(shapes) == len(set(plan.shapes)) > 3
        seconds, ran = extraction.time_forwards(
            model, planned, torch.device("cpu"), {"precision": "32-true", "channels_last": False}
        )
        assert seconds > 0 and Counter(ran) == Counter(seen)
    plan = plan_for_model(model, paths, 64, 4, bboxes=boxes, batching="bucket", max_shapes=3)
    filled = extraction.planned_forwards(plan, 4, fill=True)
    dataset = PlannedBatches(ImageListDataset(paths, 64, bboxes=boxes), plan.batches)
    with extraction.recorded_forwards(model) as seen:
        list(embed_planned(model, dataset, plan.batches, fill_to=4))
    assert Counter(seen) == Counter(f for f, _ in filled) and all(f[0] == 4 for f in seen)
    for batch, ((n, h, w, padded), sizes) in zip(plan.batches, filled, strict=True):
        own = [list(plan.shapes[i]) for i in batch.indices]  # then blank images of the full bucket size
        assert (
            n == 4 and (sizes is None) == (not padded) and (sizes is None or sizes == own + [[h, w]] * (n - len(own)))
        )


def test_warmup_pairs_pass_every_input_shape_of_the_pairwise_sample():
    query_shapes = [(10, 20), (10, 20), (30, 40), (50, 60)]
    db_shapes = [(1, 1), (2, 2), (1, 1), (3, 3), (2, 2)]
    sample = np.array([(0, 0), (1, 1), (2, 2), (2, 3), (0, 4)])
    warm = warmup_pairs(sample, query_shapes, db_shapes)
    assert {query_shapes[q] for q, _ in warm} == {(10, 20), (30, 40)}  # query 3 is not in the sample
    assert {db_shapes[d] for _, d in warm} == {(1, 1), (2, 2), (3, 3)} and len(warm) == 3


def test_a_row_past_its_time_is_reported_over_budget_and_the_run_goes_on(monkeypatch):
    calls = []  # a row of two variants measured by one process, then a row whose first process runs out of time

    def fake_run(target, settings, timeout):
        calls.append((target, timeout))
        if target == "slow":
            raise common.MeasurementTimeout("slow: no result")
        if target == "both":
            return {"variants": {"ours": {"value": 2.0}, "ceiling": {"value": 4.0}}}
        return {"value": 1.0}

    monkeypatch.setattr(common, "run_isolated", fake_run)
    profile = {"child_timeout_s": 50}
    budget = run.Budget({"extraction": 30, "evaluation": 20}, ["extraction", "evaluation"], None, 0.0)
    errors: list = []
    both = run.measure_row(
        "extraction", "x", "images/s", {"ours": "both", "ceiling": "both"}, {}, budget, profile, errors
    )
    assert calls == [("both", 30)] and both["ours"]["value"] == 2.0 and both["ceiling"]["value"] == 4.0
    slow = run.measure_row(
        "evaluation", "y", "pairs/s", {"ours": "slow", "original": "fast"}, {}, budget, profile, errors
    )
    assert "stopped after 50 s" in slow["ours"]["over_budget"]  # its 20 s and the 30 s extraction left
    assert [e["kind"] for e in errors] == ["over_budget"] and errors[0]["row"] == "evaluation"
    row = report.make_row("evaluation", "y", "pairs/s", slow)
    assert row["ours"] is None and row["status"]["ours"].startswith("over budget: stopped")
    budget.spend("evaluation", 50.0)  # the time of both groups is spent: the next process is not started
    spent = run.measure_row("evaluation", "z", "pairs/s", {"ours": "fast"}, {}, budget, profile, [])
    assert spent["ours"]["over_budget"].startswith("not run") and len(calls) == 3


def test_budget_gives_time_left_unused_to_later_groups_within_the_total():
    started = time.perf_counter() - 100  # the run started 100 s ago (setup, and training's 70 s)
    budget = run.Budget({"training": 90, "loading": 40, "search": 60}, ["training", "loading", "search"], 180, started)
    budget.spend("training", 70)
    assert budget.left("training") == 20 and budget.left("loading") == 60  # its 40 s + the 20 training left
    assert 79 < budget.left("search") <= 80  # 120 s of shares left, but only 80 s of the run's 180
    bounded = run.Budget({"training": 90}, ["training"], None, started)
    bounded.spend("training", 80)
    assert bounded.left("training") == 10
    summary = bounded.summary(5.0)
    assert summary["groups"]["training"] == {"seconds": 80, "share": 90} and summary["total_budget"] is None
    assert "training 80 s (share 90)" in report.format_timing(summary)
