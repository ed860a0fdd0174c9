"""Distractors (benchmark+r1m, benchmark+folder:<path>): the protocol equals the published code on the full ranking of
database + distractors, and the distractors are embedded once per model and settings."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from oxford_ir.benchmarks.metrics import evaluate_ranks
from oxford_ir.benchmarks.synthetic import SYNTHETIC_PRESETS, write_synthetic_benchmark
from oxford_ir.cli.evaluate import evaluate
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.extraction.whitening import whiten
from oxford_ir.retrieval.distractors import check_distractors, distractors_above, distractors_above_top, split_name
from oxford_ir.retrieval.index_format import RetrievalIndex
from tests.benchmarks import revisitop_reference as published
from tests.test_evaluate import compose_eval, raw_pixels_by_hand


def published_revisited(ranks: np.ndarray, gnd: list[dict]) -> dict[str, float]:
    """mAP of Easy / Medium / Hard as revisitop's example_evaluate.py sets them up, with its compute_map."""
    setups = {
        "E": lambda g: (g["easy"], np.concatenate([g["junk"], g["hard"]])),
        "M": lambda g: (np.concatenate([g["easy"], g["hard"]]), g["junk"]),
        "H": lambda g: (g["hard"], np.concatenate([g["junk"], g["easy"]])),
    }
    out = {}
    for protocol, setup in setups.items():
        gnd_t = [
            dict(zip(("ok", "junk"), setup({k: np.asarray(g[k], dtype=int) for k in g}), strict=True)) for g in gnd
        ]
        out[f"{protocol}/mAP"], _, mpr, _ = published.compute_map(ranks, gnd_t, [1, 5, 10])
        out[f"{protocol}/mP@5"] = mpr[1]
    return out


def full_ranking(db: np.ndarray, distractors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Database then distractors, ranked by one product and a stable sort: the brute-force reference."""
    everything = np.concatenate([db, distractors]).astype(np.float32)
    return np.argsort(-(everything @ queries.T.astype(np.float32)), axis=0, kind="stable")


def test_counting_distractors_above_equals_ranking_them_all() -> None:
    rng = np.random.default_rng(0)
    n_db, n_d, n_q, dim = 40, 300, 6, 8
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    db, queries = unit(rng.normal(size=(n_db, dim))), unit(rng.normal(size=(n_q, dim)))
    distractors = unit(rng.normal(size=(n_d, dim))).astype(np.float16)  # as a float16 index stores them
    distractors[7] = db[3]  # an equal score: the database image comes first
    gnd = []
    for _ in range(n_q):
        picked = rng.permutation(n_db)
        gnd.append({"easy": picked[:5], "hard": picked[5:9], "junk": picked[9:12]})
    above = distractors_above(db, queries, distractors, block=64)  # several blocks
    ours, _ = evaluate_ranks(
        np.argsort(-(db @ queries.T), axis=0, kind="stable"), gnd, "revisited", (1, 5, 10), (), above
    )
    reference = published_revisited(full_ranking(db, distractors.astype(np.float32), queries), gnd)
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=1e-12)
    without, _ = evaluate_ranks(np.argsort(-(db @ queries.T), axis=0, kind="stable"), gnd, "revisited")
    assert ours["M/mAP"] < without["M/mAP"]  # the distractors matter in this test
    # a whitening of the evaluated model is applied to the stored rows (as to the database and queries)
    mean, projection = torch.from_numpy(rng.normal(size=dim).astype(np.float32)), torch.eye(dim)[torch.randperm(dim)]
    whitened = whiten(torch.from_numpy(distractors.astype(np.float32)), mean, projection).numpy()
    scores, db_scores = (whitened @ queries.T).T, (db @ queries.T).T  # (n_q, n_d), (n_q, n_db)
    expected = (scores[:, None, :] > db_scores[:, :, None]).sum(axis=2).T  # (n_db, n_q), by brute force
    got = distractors_above(db, queries, distractors, transform=lambda r: whiten(r, mean, projection), block=64)
    np.testing.assert_array_equal(got, expected)
    # from each query's best k distractor scores only (what a budgeted search returns): exact down to the k-th
    scores = (distractors.astype(np.float32) @ queries.T).T
    for k in (n_d, 25):
        best = -np.sort(-scores, axis=1)[:, :k]
        np.testing.assert_array_equal(distractors_above_top(db, queries, best), np.minimum(above, k))


def test_names_with_distractors() -> None:
    assert split_name("roxford5k+r1m") == ("roxford5k", "r1m")
    assert split_name("collection:/a+b/c+folder:/d+e") == ("collection:/a+b/c", "folder:/d+e")
    assert split_name("rparis6k") == ("rparis6k", None)
    with pytest.raises(ConfigError, match="give the folder of distractor images after folder:"):
        split_name("rparis6k+folder:")


def test_evaluation_with_a_distractor_folder_equals_brute_force_and_embeds_once(tmp_path, capsys) -> None:
    other = write_synthetic_benchmark(tmp_path / "other", **{**SYNTHETIC_PRESETS["tiny"], "seed": 5, "n_landmarks": 2})
    folder = other / "jpg"
    cfg = compose_eval(tmp_path, "backbone=raw_pixels", "pooling=flatten", f"benchmarks=[rsynthetic+folder:{folder}]")
    flat, _ = evaluate(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    record = saved["distractors"]["rsynthetic+jpg"]
    n_distractors = len(list(folder.glob("*.jpg")))
    assert record["images"] == n_distractors and record["embedded"] == n_distractors and record["search"] == "exact"
    assert f"* rsynthetic+jpg: + {n_distractors} distractors from {folder}, exact search" in capsys.readouterr().out

    # the brute-force reference: the embeddings by hand, database + the index's distractor rows, ranked by numpy
    root = tmp_path / "data" / "synthetic"
    with open(root / "gnd_rsynthetic.pkl", "rb") as handle:
        gt = pickle.load(handle)
    db = np.stack([raw_pixels_by_hand(root / "jpg" / f"{n}.jpg") for n in gt["imlist"]])
    queries = np.stack(
        [raw_pixels_by_hand(root / "jpg" / f"{n}.jpg", g["bbx"]) for n, g in zip(gt["qimlist"], gt["gnd"], strict=True)]
    )
    index = RetrievalIndex.load(record["index"])
    by_hand = np.stack([raw_pixels_by_hand(index.image_path(i)) for i in range(len(index))])
    np.testing.assert_allclose(index.vectors(), by_hand, atol=2e-3)  # float16 rows of the same embeddings
    reference = published_revisited(full_ranking(db, index.vectors(), queries), gt["gnd"])
    for key, value in reference.items():
        assert flat[f"rsynthetic+jpg/{key}"] == pytest.approx(value, abs=1e-6)
    assert flat["rsynthetic+jpg/M/mAP"] < published_revisited(full_ranking(db, db[:0], queries), gt["gnd"])["M/mAP"]

    # a second evaluation with the same model and settings embeds no distractor again
    evaluate(cfg)
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())["distractors"]["rsynthetic+jpg"]
    assert again["embedded"] == 0 and again["kept"] == n_distractors and again["index"] == record["index"]
    # other settings: another index
    other_size = cfg.copy()
    other_size.extraction.image_size = 40
    evaluate(other_size)
    third = json.loads((tmp_path / "run" / "metrics.json").read_text())["distractors"]["rsynthetic+jpg"]
    assert third["embedded"] == n_distractors and third["index"] != record["index"]
    # through a budgeted index (here faiss Flat: under 1,000 rows), all distractors returned: the same numbers
    budgeted = cfg.copy()
    budgeted.distractors.memory = "1M"
    assert evaluate(budgeted)[0] == flat
    fourth = json.loads((tmp_path / "run" / "metrics.json").read_text())["distractors"]["rsynthetic+jpg"]
    assert fourth["embedded"] == 0 and fourth["index"] == record["index"] and fourth["search"] == "budgeted"
    assert fourth["recall"] == 1.0 and fourth["search_index"]["key"] == "Flat" and fourth["top"] == 1000
    assert "budgeted search (Flat, recall@10 1.000; top 1000 distractors per query)" in capsys.readouterr().out


def test_missing_distractors_are_one_line_before_anything_is_embedded(tmp_path) -> None:
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "distractors": {"dtype": "float16"}})
    with pytest.raises(DataError, match="no R1M distractors in .*oxford-ir-data download r1m --root"):
        check_distractors(cfg, ["rsynthetic", "roxford5k+r1m"])
    with pytest.raises(DataError, match=r"benchmarks: \+folder:/nowhere: no such folder; give a folder of distractor"):
        check_distractors(cfg, ["rsynthetic+folder:/nowhere"])
    cfg.distractors.dtype = "int8"
    with pytest.raises(ConfigError, match="distractors.dtype='int8': float16"):
        check_distractors(cfg, ["rsynthetic+folder:/nowhere"])
    check_distractors(cfg, ["rsynthetic"])  # none asked for: nothing checked
