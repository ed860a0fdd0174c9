"""Retrieval grids and per-query tables: each result framed by its ground-truth label."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.callbacks.per_query_table import per_query_rows
from oxford_ir.models.validation import Evaluation
from oxford_ir.retrieval.visualize import COLOURS, fixed_query_indices, render_retrieval_grid, result_labels


def tiny_benchmark(tmp_path: Path, protocol: str = "revisited") -> Benchmark:
    (tmp_path / "jpg").mkdir()
    names = [f"img_{i}" for i in range(6)]
    for i, name in enumerate([*names, "query"]):
        Image.new("RGB", (40 + i, 30), (20 * i, 100, 200)).save(tmp_path / "jpg" / f"{name}.jpg")
    gnd = [{"bbx": [5.0, 5.0, 30.0, 25.0], "easy": np.array([0]), "hard": np.array([3]), "junk": np.array([2])}]
    return Benchmark(
        name="tiny", root=tmp_path, protocol=protocol, imlist=names, qimlist=["query"], gnd=gnd,
        source=tmp_path / "gnd.pkl", image_dir=tmp_path / "jpg", query_landmarks=["tower"],
    )  # fmt: skip


def test_labels_follow_the_protocol(tmp_path):
    benchmark = tiny_benchmark(tmp_path)
    assert result_labels(benchmark, 0, [3, 2, 5, 0]) == ["positive", "junk", "negative", "positive"]


def test_grid_frames_each_result_with_its_label(tmp_path):
    benchmark = tiny_benchmark(tmp_path)
    ranks = np.array([[3, 2, 5, 0, 1, 4]]).T
    grid = render_retrieval_grid(benchmark, ranks, [0], top_k=4, thumbnail_size=40, border=4)
    assert grid.size == (5 * 40, 40)
    expected = ["query", "positive", "junk", "negative", "positive"]
    for column, label in enumerate(expected):
        pixel = grid.getpixel((column * 40 + 1, 20))  # inside the left frame of the thumbnail
        assert pixel == COLOURS[label], (column, label, pixel)


def test_fixed_queries_are_spread_and_stable():
    assert fixed_query_indices(10, 4) == [0, 3, 6, 9]
    assert fixed_query_indices(2, 4) == [0, 1]
    assert fixed_query_indices(0, 4) == []


def test_per_query_rows(tmp_path):
    benchmark = tiny_benchmark(tmp_path)
    per_query = {"E/AP": np.array([0.5]), "H/AP": np.array([np.nan])}
    ranks, db, queries = np.arange(6).reshape(6, 1), torch.zeros(6, 2), torch.zeros(1, 2)
    evaluation = Evaluation(benchmark, ranks, {"E/mAP": 0.5}, per_query, db, queries)
    columns, rows = per_query_rows(evaluation)
    assert columns == ["query", "landmark", "positives", "E/AP", "H/AP"]
    assert rows == [["query", "tower", 2, 0.5, None]]
