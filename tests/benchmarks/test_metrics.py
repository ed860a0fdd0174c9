"""The Oxford protocol against hand-computed rankings and the published reference code."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from oxford_ir.benchmarks import metrics
from oxford_ir.benchmarks.metrics import compute_ap, compute_map, evaluate_ranks, revisited_gnd
from tests.benchmarks import revisitop_reference as reference


def column(*order: int) -> np.ndarray:
    """A one-query ranks array (n_db x 1) from database indices best first."""
    return np.asarray(order, dtype=np.int64)[:, None]


def test_perfect_ranking_has_ap_one():
    m_ap, aps, mpr, _ = compute_map(column(2, 0, 1, 3), [{"ok": [2, 0], "junk": []}])
    assert m_ap == pytest.approx(1.0)
    assert aps[0] == pytest.approx(1.0)
    # P@1 = 1; P@5 is capped at the last positive's position (2): 2 / 2
    assert mpr.tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_single_positive_at_rank_three_hand_computed():
    # positive at 0-based position 2: precision goes 0/2 -> 1/3, AP = (0 + 1/3) / 2
    m_ap, _, mpr, prs = compute_map(column(5, 4, 7, 1), [{"ok": [7]}], kappas=(1, 5))
    assert m_ap == pytest.approx(1 / 6)
    # P@1 = 0 / 1; P@5 caps k at the positive's 1-based position 3: 1 / 3
    assert prs[0].tolist() == pytest.approx([0.0, 1 / 3])


def test_two_positives_hand_computed():
    # positives at positions 0 and 2 of 4: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2
    expected = 0.5 + (0.5 + 2 / 3) / 4
    m_ap, *_ = compute_map(column(3, 1, 0, 2), [{"ok": [3, 0]}])
    assert m_ap == pytest.approx(expected)


def test_junk_ahead_of_positives_does_not_lower_ap():
    clean, *_ = compute_map(column(0, 1, 2, 3, 4), [{"ok": [0, 1], "junk": []}])
    with_junk, *_ = compute_map(column(4, 3, 0, 1, 2), [{"ok": [0, 1], "junk": [4, 3]}])
    assert clean == pytest.approx(1.0)
    assert with_junk == pytest.approx(1.0)


def test_junk_between_positives_is_skipped():
    # ranking: pos, junk, pos -> after removing junk: pos, pos
    m_ap, *_ = compute_map(column(0, 9, 1, 5), [{"ok": [0, 1], "junk": [9]}])
    assert m_ap == pytest.approx(1.0)
    # same ranking, junk counted as a negative: AP < 1
    as_negative, *_ = compute_map(column(0, 9, 1, 5), [{"ok": [0, 1], "junk": []}])
    assert as_negative < 1.0


def test_reversed_order_is_worst():
    n = 10
    gnd = [{"ok": [0, 1, 2]}]
    best, *_ = compute_map(column(*range(n)), gnd)
    worst, *_ = compute_map(column(*reversed(range(n))), gnd)
    # positives at the last three positions 7, 8, 9
    hand = sum(((j / r) + (j + 1) / (r + 1)) / 2 / 3 for j, r in enumerate((7, 8, 9)))
    assert best == pytest.approx(1.0)
    assert worst == pytest.approx(hand)
    assert worst < best


def test_queries_without_positives_are_skipped():
    ranks = np.column_stack([np.arange(4), np.arange(4)])
    m_ap, aps, mpr, prs = compute_map(ranks, [{"ok": [0]}, {"ok": [], "junk": [1]}])
    assert m_ap == pytest.approx(1.0)
    assert np.isnan(aps[1]) and np.isnan(prs[1]).all()
    assert not np.isnan(mpr).any()


def test_positives_missing_from_a_truncated_ranking_count_as_not_retrieved():
    # only the top 2 of the database are ranked; the second positive never appears
    m_ap, *_ = compute_map(column(0, 5), [{"ok": [0, 7]}])
    assert m_ap == pytest.approx(0.5)


def test_duplicate_ground_truth_entries_are_harmless():
    dup, *_ = compute_map(column(0, 1, 2), [{"ok": [0, 0, 1], "junk": [2, 2]}])
    assert dup == pytest.approx(1.0)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="n_db, n_queries"):
        compute_map(np.zeros((5, 2), dtype=int), [{"ok": [0]}])


def test_compute_ap_requires_positives():
    with pytest.raises(ValueError):
        compute_ap(np.array([]), 0)


@pytest.mark.parametrize("seed", range(5))
def test_matches_published_code_on_random_rankings(seed: int):
    rng = np.random.default_rng(seed)
    n_db, n_q = 60, 12
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd = []
    for _ in range(n_q):
        chosen = rng.permutation(n_db)
        n_ok, n_junk = rng.integers(0, 8), rng.integers(0, 6)
        gnd.append({"ok": chosen[:n_ok], "junk": chosen[n_ok : n_ok + n_junk]})
    gnd[0]["ok"] = np.array([], dtype=int)  # one query without positives
    gnd[1]["ok"] = chosen[:1]  # at least one with exactly one positive
    ours = compute_map(ranks, gnd, (1, 5, 10))
    ref = reference.compute_map(ranks.copy(), gnd, [1, 5, 10])
    assert ours[0] == pytest.approx(ref[0])
    np.testing.assert_allclose(ours[1], ref[1], equal_nan=True)
    np.testing.assert_allclose(ours[2], ref[2])
    np.testing.assert_allclose(ours[3], ref[3], equal_nan=True)


def test_revisited_protocol_mapping():
    entry = {"easy": [1, 2], "hard": [3], "junk": [4]}
    easy, medium, hard = (revisited_gnd([entry], p)[0] for p in ("E", "M", "H"))
    assert sorted(easy["ok"]) == [1, 2] and sorted(easy["junk"]) == [3, 4]
    assert sorted(medium["ok"]) == [1, 2, 3] and sorted(medium["junk"]) == [4]
    assert sorted(hard["ok"]) == [3] and sorted(hard["junk"]) == [1, 2, 4]
    with pytest.raises(ValueError, match="E, M, H"):
        revisited_gnd([entry], "X")


def test_revisited_protocols_on_a_hand_ranking():
    # db: 0 easy, 1 hard, 2 junk, 3 negative; ranking: hard, negative, easy, junk
    ranks = column(1, 3, 0, 2)
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}]
    values, per_query = evaluate_ranks(ranks, gnd, "revisited", kappas=(1,))
    # Easy: hard is ignored -> ranking negative, easy: easy at position 1 -> (0/1 + 1/2) / 2
    assert values["E/mAP"] == pytest.approx(0.25)
    # Medium: hard at 0, easy at 2 -> (1 + 1)/2/2 + (1/2 + 2/3)/2/2
    assert values["M/mAP"] == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    # Hard: easy and junk ignored -> hard first
    assert values["H/mAP"] == pytest.approx(1.0)
    assert values["H/mP@1"] == pytest.approx(1.0) and values["E/mP@1"] == pytest.approx(0.0)
    assert set(per_query) == {"E/AP", "M/AP", "H/AP"}


def test_original_protocol_keys():
    values, per_query = evaluate_ranks(column(0, 1), [{"ok": [0], "junk": []}], "original")
    assert set(values) == {"mAP", "mP@1", "mP@5", "mP@10"}
    assert set(per_query) == {"AP"}
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_ranks(column(0, 1), [{"ok": [0]}], "other")


def _load_pickle(path):
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


@pytest.mark.parametrize("name", ["oxford5k", "roxford5k"])
def test_real_ground_truth_matches_published_code(oxford_root, name):
    """Real Oxford ground truth, random rankings: every protocol equals the published code's numbers."""
    cfg = _load_pickle(oxford_root / f"gnd_{name}.pkl")
    n_db, gnd = len(cfg["imlist"]), cfg["gnd"]
    rng = np.random.default_rng(0)
    # half-random: positives pushed up a little so APs are not all near zero
    scores = rng.random((n_db, len(gnd)))
    for q, entry in enumerate(gnd):
        pos = np.concatenate([np.asarray(entry.get(k, []), dtype=int) for k in ("ok", "easy", "hard")])
        scores[pos, q] += rng.random(len(pos))
    ranks = np.argsort(-scores, axis=0)
    settings = {"": gnd} if name == "oxford5k" else {f"{p}/": revisited_gnd(gnd, p) for p in "EMH"}
    ours, _ = evaluate_ranks(ranks, gnd, "original" if name == "oxford5k" else "revisited")
    for prefix, setting in settings.items():
        ref_map, _, ref_pr, _ = reference.compute_map(ranks.copy(), setting, [1, 5, 10])
        assert ours[f"{prefix}mAP"] == pytest.approx(ref_map)
        assert [ours[f"{prefix}mP@{k}"] for k in (1, 5, 10)] == pytest.approx(list(ref_pr))
        assert 0.0 < ours[f"{prefix}mAP"] < 1.0


def test_default_kappas():
    assert metrics.DEFAULT_KAPPAS == (1, 5, 10)
