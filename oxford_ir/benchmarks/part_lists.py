"""Lists of archive parts as a command line gives them (``--parts 0-3,7``, ``all``): GLDv2's 500 TARs, R1M's 100."""

from __future__ import annotations

import re

from oxford_ir.errors import ConfigError


def parse_part_list(text: str, first: int, last: int, what: str, example: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``; ``"all"`` -> ``first..last``. A ConfigError naming ``what`` says what a
    part list looks like (``example``) when a number or range is malformed or outside ``first..last``."""
    text = str(text).strip()
    if text == "all":
        return list(range(first, last + 1))
    parts: set[int] = set()
    for piece in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", piece)
        low, high = (int(match[1]), int(match[2] or match[1])) if match else (first, first - 1)
        if not match or low > high or low < first or high > last:
            raise ConfigError(
                f"{what} parts {text!r}: expected numbers and ranges from {first} to {last} separated by commas "
                f"(e.g. {example}), or 'all'"
            )
        parts.update(range(low, high + 1))
    return sorted(parts)


def format_part_list(parts: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0-3,7"``."""
    out: list[str] = []
    for p in parts:
        if out and int(out[-1].split("-")[-1]) == p - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        else:
            out.append(str(p))
    return ",".join(out)
