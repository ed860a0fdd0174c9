"""The evaluation table: one row per benchmark and protocol, mAP and mP@k in percent (and recall@k, ``R@k``, when a
benchmark reports it: collections do, Oxford and Paris do not)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def protocol_rows(metrics: Mapping[str, float]) -> list[tuple[str, dict[str, float]]]:
    """Split a benchmark's flat metrics (``mAP``, ``E/mAP``, ...) into (protocol, values) rows."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        protocol, _, metric = key.rpartition("/")
        rows.setdefault(protocol or "-", {})[metric] = value
    order = {"-": 0, "E": 1, "M": 2, "H": 3}
    return sorted(rows.items(), key=lambda item: order.get(item[0], 9))


def format_table(
    results: Mapping[str, Mapping[str, float]],
    notes: Mapping[str, str] | None = None,
    kappas: Sequence[int] = (1, 5, 10),
) -> str:
    """Plain-text table of ``{benchmark: flat metrics}``; values shown in percent, as in the literature."""
    columns = ["mAP", *[f"mP@{k}" for k in kappas]]
    reported = {key.rpartition("/")[2] for metrics in results.values() for key in metrics}
    columns += [c for c in (f"R@{k}" for k in kappas) if c in reported]
    width = max([12, *(len(name) for name in results)])
    header = f"{'benchmark':<{width}} {'protocol':<8} " + " ".join(f"{c:>7}" for c in columns)
    lines = [header, "-" * len(header)]
    for name, metrics in results.items():
        for protocol, values in protocol_rows(metrics):
            cells = " ".join(f"{100 * values[c]:7.2f}" if c in values else f"{'':>7}" for c in columns)
            lines.append(f"{name:<{width}} {protocol:<8} {cells}")
    for name, note in (notes or {}).items():
        if note:
            lines.append(f"* {name}: {note}")
    return "\n".join(lines)
