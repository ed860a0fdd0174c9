"""The Oxford / Paris evaluation protocol, reimplemented exactly.

Same inputs and outputs as ``compute_map`` of the public Revisited Oxford/Paris
evaluation code (Radenovic et al., CVPR 2018): ``ranks`` is an (n_db, n_queries)
integer array whose column ``q`` lists database indices best first; each ground
truth entry holds ``ok`` (positives) and optionally ``junk`` index lists.

- junk images are removed from the ranking before AP is computed (positions of
  positives are shifted down by the number of junk images ranked above them);
- AP integrates precision over recall with the trapezoid rule of that code;
- P@k caps k at the position of the last positive, as that code does;
- queries without positives get NaN and are left out of the means.

Recall@k (:func:`compute_recall`, the CMC curve of re-identification and metric learning: 1 when a positive is
among the first k after junk is removed) is not part of that code; benchmarks built from a collection report it
(``R@k``, :func:`evaluate_ranks` with ``extra_metrics=("recall",)``), Oxford and Paris do not.

The loops of the reference are vectorised per query; ``tests/retrieval`` checks
the result against a literal copy of the published code.

Distractors (Revisited Oxford/Paris + R1M): images that are never positive nor junk only move the database images
down. ``distractors_above`` (n_db x n_queries: how many distractors the full ranking puts before each database
image) gives each database image its position in the ranking of database + distractors (database rows first on
equal scores), so the metrics equal those of that full ranking without an (n_db + 1M) x n_queries array.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_KAPPAS: tuple[int, ...] = (1, 5, 10)
#: metrics a benchmark may report besides mAP and mP@k (:attr:`~oxford_ir.benchmarks.benchmark.Benchmark.extra_metrics`)
EXTRA_METRICS: tuple[str, ...] = ("recall",)

#: Revisited Oxford/Paris protocols: which ground-truth lists are positive and which are ignored.
REVISITED_PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "E": (("easy",), ("junk", "hard")),
    "M": (("easy", "hard"), ("junk",)),
    "H": (("hard",), ("junk", "easy")),
}


def compute_ap(positions: np.ndarray, n_positives: int) -> float:
    """AP of one query from the 0-based, junk-shifted, sorted positions of its retrieved positives.

    Trapezoid rule of the published code: at the j-th positive (rank r) precision
    goes from j / r (1 when r == 0) to (j + 1) / (r + 1), and recall rises by
    1 / n_positives. Positives that never appear in ``positions`` contribute 0.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if n_positives <= 0:
        raise ValueError("compute_ap needs at least one positive")
    j = np.arange(len(positions), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_0 = np.where(positions == 0, 1.0, j / np.where(positions == 0, 1.0, positions))
    precision_1 = (j + 1.0) / (positions + 1.0)
    return float(np.sum((precision_0 + precision_1) / 2.0) / n_positives)


def _positions(column: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Sorted 0-based positions in ``column`` of the database indices in ``indices``."""
    return np.flatnonzero(np.isin(column, indices))


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Sequence[int]]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    distractors_above: np.ndarray | None = None,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean average precision and mean precision at k, as the published ``compute_map``.

    Returns ``(mAP, aps, mpr, prs)``: the mean AP over queries that have positives,
    per-query AP (NaN where a query has none), mean P@k for each k in ``kappas``
    and per-query P@k (n_queries x len(kappas)). All values lie in [0, 1].
    ``distractors_above``: see the module docstring (None: no distractors).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be (n_db, n_queries), got shape {ranks.shape}")
    n_queries = len(gnd)
    if ranks.shape[1] != n_queries:
        raise ValueError(
            f"ranks has {ranks.shape[1]} query columns but the ground truth has {n_queries} queries; "
            "pass ranks of shape (n_db, n_queries)"
        )
    kappas = [int(k) for k in kappas]
    aps = np.full(n_queries, np.nan)
    prs = np.full((n_queries, len(kappas)), np.nan)
    for q, entry in enumerate(gnd):
        positives = np.unique(np.asarray(entry["ok"], dtype=np.int64))
        if positives.size == 0:
            continue
        junk = np.unique(np.asarray(entry.get("junk", ()), dtype=np.int64))
        column = ranks[:, q]
        pos = _shifted(column, _positions(column, positives), distractors_above, q)
        junk_pos = _shifted(column, _positions(column, junk), distractors_above, q)
        # shift each positive up by the number of junk images ranked before it
        pos = pos - np.searchsorted(junk_pos, pos)
        aps[q] = compute_ap(pos, positives.size)
        pos_1 = pos + 1
        for i, k in enumerate(kappas):
            kq = min(int(pos_1.max()), k) if pos_1.size else k
            prs[q, i] = np.count_nonzero(pos_1 <= kq) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def _shifted(column: np.ndarray, positions: np.ndarray, above: np.ndarray | None, q: int) -> np.ndarray:
    """Positions among the database images -> positions in the ranking with the distractors (still sorted: a
    better database image has no more distractors above it)."""
    return positions if above is None else positions + np.asarray(above[column[positions], q], dtype=np.int64)


def compute_recall(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Sequence[int]]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    distractors_above: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Recall@k (CMC): per query, 1 when one of its positives (``ok``) is among its first k database images
    once its ``junk`` is removed from the ranking, else 0.

    Returns ``(mean recall@k for each k over the queries that have positives, per-query values)`` (n_queries x
    len(kappas), NaN rows for queries without positives; NaN means when no query has one).
    """
    ranks = np.asarray(ranks)
    kappas = [int(k) for k in kappas]
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(f"ranks must be (n_db, {len(gnd)}) with one column per query, got shape {ranks.shape}")
    recalls = np.full((len(gnd), len(kappas)), np.nan)
    for q, entry in enumerate(gnd):
        positives = np.unique(np.asarray(entry["ok"], dtype=np.int64))
        if positives.size == 0:
            continue
        column = ranks[:, q]
        pos = _shifted(column, _positions(column, positives), distractors_above, q)
        if pos.size == 0:  # no positive ranked at all
            recalls[q] = 0.0
            continue
        junk = np.unique(np.asarray(entry.get("junk", ()), dtype=np.int64))
        junk_pos = _shifted(column, _positions(column, junk), distractors_above, q)
        first = pos[0] - np.searchsorted(junk_pos, pos[0])  # 0-based rank of the best positive without junk
        recalls[q] = [float(first < k) for k in kappas]
    valid = ~np.isnan(recalls[:, 0]) if kappas else np.zeros(len(gnd), bool)
    means = recalls[valid].mean(axis=0) if valid.any() else np.full(len(kappas), np.nan)
    return means, recalls


def revisited_gnd(gnd: Sequence[Mapping[str, Sequence[int]]], protocol: str) -> list[dict[str, np.ndarray]]:
    """Map Revisited ground truth (``easy``/``hard``/``junk``) to ``ok``/``junk`` for protocol E, M or H."""
    try:
        positive_keys, ignored_keys = REVISITED_PROTOCOLS[protocol]
    except KeyError:
        raise ValueError(f"unknown revisited protocol {protocol!r}; use one of E, M, H") from None

    def gather(entry: Mapping[str, Sequence[int]], keys: tuple[str, ...]) -> np.ndarray:
        return np.concatenate([np.asarray(entry.get(key, ()), dtype=np.int64) for key in keys])

    return [{"ok": gather(entry, positive_keys), "junk": gather(entry, ignored_keys)} for entry in gnd]


def evaluate_ranks(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Sequence[int]]],
    protocol: str,
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    extra_metrics: Sequence[str] = (),
    distractors_above: np.ndarray | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Evaluate a ranking under the ``original`` or ``revisited`` protocol (with distractors: see the module
    docstring).

    Returns a flat dict of metrics (``mAP``, ``mP@k`` for the original protocol;
    ``E/mAP``, ``M/mAP``, ``H/mAP``, ``E/mP@k``, ... for the revisited one) and
    the per-query AP arrays under the same prefixes (``AP`` or ``E/AP``, ...).
    ``extra_metrics`` (:data:`EXTRA_METRICS`) adds metrics after those: ``"recall"`` adds ``R@k`` for each k
    (``E/R@k``, ... for the revisited protocol).
    """
    unknown = [m for m in extra_metrics if m not in EXTRA_METRICS]
    if unknown:
        raise ValueError(f"unknown extra metric(s) {unknown}; known: {', '.join(EXTRA_METRICS)}")
    if protocol == "original":
        settings = {"": gnd}
    elif protocol == "revisited":
        settings = {f"{p}/": revisited_gnd(gnd, p) for p in REVISITED_PROTOCOLS}
    else:
        raise ValueError(f"unknown protocol {protocol!r}; use 'original' or 'revisited'")
    metrics: dict[str, float] = {}
    per_query: dict[str, np.ndarray] = {}
    for prefix, setting in settings.items():
        m_ap, aps, mpr, _ = compute_map(ranks, setting, kappas, distractors_above)
        metrics[f"{prefix}mAP"] = m_ap
        for k, value in zip(kappas, mpr, strict=True):
            metrics[f"{prefix}mP@{k}"] = float(value)
        per_query[f"{prefix}AP"] = aps
        if "recall" in extra_metrics:
            recall, _ = compute_recall(ranks, setting, kappas, distractors_above)
            metrics.update({f"{prefix}R@{k}": float(value) for k, value in zip(kappas, recall, strict=True)})
    return metrics, per_query
