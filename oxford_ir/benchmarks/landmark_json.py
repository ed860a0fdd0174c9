"""The per-landmark JSON of the original project, ``{landmark: {"good": [...], "ok": [...], "junk": [...],
"query": [...]}}`` (``groundtruth.json``). Errors name the file, the landmark, the key and the position
(``landmark 'tower' 'good'[2]``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oxford_ir.benchmarks.gt_record import (
    GroundTruth,
    checked_box,
    checked_name,
    lookup_names,
    name_index,
    read_text,
)
from oxford_ir.errors import GroundTruthError

#: the per-landmark JSON of the original project
GT_JSON_NAME = "groundtruth.json"


def read_landmark_json(
    path: str | Path, imlist: Sequence[str], imlist_source: str | Path = "the image list"
) -> GroundTruth:
    """Read the per-landmark JSON ``{landmark: {"good", "ok", "junk", "query"}}`` against ``imlist``.

    Names may carry an extension (``all_souls_000013.jpg``). Each landmark contributes
    one query per ``query`` entry, all sharing that landmark's positives (good + ok)
    and junk. Landmarks are taken in sorted order, queries in listed order, which
    reproduces the order of the text files and pickles.

    A query entry is an image name, ``"<image> x1 y1 x2 y2"``, or
    ``{"name": <image>, "bbx": [x1, y1, x2, y2]}``. The published ``groundtruth.json``
    lists bare names: its queries then have ``bbx = None`` and are used whole, which
    is not the published protocol (queries cropped to their boxes); prefer the text
    files or the pickle when present.
    """
    path = Path(path)
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise GroundTruthError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    if not isinstance(data, dict) or not data:
        raise GroundTruthError(
            f"{path}: expected an object {{landmark: {{'good', 'ok', 'junk', 'query'}}}}, got "
            f"{'an empty object' if isinstance(data, dict) else type(data).__name__}"
        )
    index = name_index(imlist)
    qimlist, gnd, landmarks = [], [], []
    for landmark in sorted(data):
        lists = data[landmark]
        where = f"landmark {landmark!r}"
        if not isinstance(lists, dict):
            raise GroundTruthError(
                f"{path}: {where} is a {type(lists).__name__}, expected an object with 'good', 'ok', 'junk' and "
                "'query' lists; is this a per-landmark ground-truth file?"
            )
        for key in ("good", "ok", "junk", "query"):
            if not isinstance(lists.get(key), list):
                problem = "has no" if key not in lists else "has a non-list"
                raise GroundTruthError(f"{path}: {where} {problem} {key!r} list (keys: {sorted(lists)})")
        names = {}
        for key in ("good", "ok", "junk"):
            names[key] = []
            for i, value in enumerate(lists[key]):
                at = f"{path}: {where} {key!r}[{i}]"
                if not isinstance(value, str):
                    raise GroundTruthError(f"{at} is {value!r}; {key!r} must list image names (strings)")
                names[key].append((f"{where} {key!r}[{i}]", checked_name(value, f"{at} {value!r}")))
        ok = lookup_names(names["good"] + names["ok"], index, path, imlist_source)
        junk = lookup_names(names["junk"], index, path, imlist_source)
        if not lists["query"]:
            raise GroundTruthError(f"{path}: {where} has an empty 'query' list")
        for i, entry in enumerate(lists["query"]):
            name, bbx = _json_query(entry, path, f"{where} 'query'[{i}]")
            if name not in index:
                raise GroundTruthError(
                    f"{path}: {where} 'query'[{i}] names image {name!r}, which is not in {imlist_source} "
                    f"({len(index)} names): a query must be one of the dataset's images; this is not a missing "
                    "download"
                )
            qimlist.append(name)
            landmarks.append(landmark)
            gnd.append({"bbx": bbx, "ok": ok.copy(), "junk": junk.copy()})
    return GroundTruth("original", list(imlist), qimlist, gnd, landmarks, path)


def _json_query(entry: Any, path: Path, where: str) -> tuple[str, list[float] | None]:
    if isinstance(entry, str):
        fields = entry.split()
        if len(fields) == 1:
            return checked_name(fields[0], f"{path}: {where} {entry!r}"), None
        if len(fields) == 5:
            name = checked_name(fields[0], f"{path}: {where} {entry!r}")
            return name, checked_box(fields[1:], path, f"{where} query {fields[0]!r}")
    elif isinstance(entry, dict):
        name = entry.get("name", entry.get("image"))
        if isinstance(name, str):
            box = entry.get("bbx", entry.get("bbox"))
            return checked_name(name, f"{path}: {where} {name!r}"), checked_box(box, path, f"{where} query {name!r}")
    raise GroundTruthError(
        f"{path}: {where} query entry {entry!r} is not '<image>', '<image> x1 y1 x2 y2' or "
        "{'name': <image>, 'bbx': [x1, y1, x2, y2]}"
    )
