"""experiments/bench: the quick CPU run end to end (table, JSON, ratios), the original project's method as
reimplemented for it (three forward passes per triplet batch; pairwise evaluation ranks as ours does), and the
data loading rows (every image of every pipeline counted, the device decode path included)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from experiments.bench import common, loading, original, report, run
from experiments.bench.search import ClusterMixture, cuda_exact_search, recall_at
from experiments.bench.training import throughput
from oxford_ir.data.loading import load_benchmark
from oxford_ir.data.synthetic import SYNTHETIC_TINY, landmark_of, write_synthetic_benchmark
from oxford_ir.extraction.embedding import extract_benchmark
from oxford_ir.models.backbones import ScratchCNN
from oxford_ir.models.embedder import Embedder
from oxford_ir.models.pooling import GeM
from oxford_ir.retrieval.exact_search import ExactSearch
from oxford_ir.retrieval.ranking import rank_database

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


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "synthetic"
    write_synthetic_benchmark(root, **{k: v for k, v in SYNTHETIC_TINY.items() if k != "image_size"}, image_size=64)
    return root


# -- the whole quick run ------------------------------------------------------------------------------------------
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
    assert data["device"] == "cpu" and data["errors"] == []
    machine = data["machine"]
    assert machine["cpu_cores"] >= 1 and machine["torch"] == torch.__version__ and machine["gpu"] is None
    assert str(RUN) in data["command"] and "--quick" in data["command"]
    assert set(data["knobs"]) == {"applied", "missing", "rows"}

    rows = {row["key"]: row for row in data["rows"]}
    assert {"training", "extraction", "evaluation", "search_exact_cpu", "search_ivfpq"} <= set(rows)
    assert {"loading", "loading_no_cache"} <= set(rows) and "loading_gpu_decode" not in rows  # no GPU row on cpu
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
            assert measured["peak_memory"]["kind"] == "rss" and row["peak_memory_mib"][variant] > 50

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

    evaluation = rows["evaluation"]
    ours, pairwise = evaluation["measurements"]["ours"], evaluation["measurements"]["original"]
    assert ours["pairs"] == ours["queries"] * ours["database_images"] == pairwise["pairs_total"]
    assert pairwise["extrapolated"] is True and pairwise["pairs_measured"] == 10
    assert math.isclose(pairwise["extrapolated_seconds"], pairwise["pairs_total"] / pairwise["value"])
    assert "extrapolated" in done.stdout

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
    _, truth = ExactSearch(database.numpy()).search(queries.numpy(), 10)
    _, found = cuda_exact_search(database, queries, 10, block_rows=300)  # the GPU code, here on CPU tensors
    assert recall_at(found.numpy(), truth, 10) == 1.0
    assert recall_at(np.array([[1, 2, 3]]), np.array([[3, 4, 5]]), 3) == pytest.approx(1 / 3)
