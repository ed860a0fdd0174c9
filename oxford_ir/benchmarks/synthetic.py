"""The synthetic landmark benchmark: the offline default, in the on-disk format of Oxford5k.

No real dataset can be downloaded everywhere, so the quickstart trains and evaluates on
procedurally drawn "landmarks": facades whose identity is their structure (silhouette,
towers, roof, window grid and window shape, wall texture and its period, ornaments). Each
is photographed through a camera homography (yaw, pitch, roll, distance), at a random
scale and crop, under random lighting and colour temperature, behind random people, trees,
cars and lamp posts, in front of a random sky, skyline and ground. Backgrounds, clutter and
colour palettes come from one distribution shared by every landmark and distractor, so
colour or background alone does not identify a landmark and raw pixels retrieve poorly,
while the structure survives every change for a learned embedding to find.

As in Oxford5k, each landmark has queries (clear views with a box around the building),
easy positives ("good"), hard positives ("ok": small, oblique, occluded or badly lit) and
junk views (under 25% of the landmark visible); distractors are other buildings, each seen
once, and street scenes with no building. Ground truth is written in every published form:
``gt_files_170407/`` text files, ``gnd_synthetic.pkl`` (original protocol: queries are
database images and positives of themselves), ``gnd_rsynthetic.pkl`` (revisited protocol:
queries left out of the database, positives split into easy and hard), the per-landmark
``groundtruth.json`` and ``imlist.txt``. ``views.json`` records how each image was made
(role, visible fraction, viewpoint, box). The output is a pure function of the seed and the
parameters: the same arguments give byte-identical files (with the same numpy and Pillow).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import multiprocessing
import os
import pickle
import re
import secrets
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from oxford_ir.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: parameters of the default benchmark (the quickstart's); ``images_per_landmark`` counts database
#: photos per landmark besides its queries, junk and hard views included
SYNTHETIC_DEFAULTS: dict[str, int] = {
    "n_landmarks": 8,
    "images_per_landmark": 14,
    "queries_per_landmark": 3,
    "hard_per_landmark": 4,
    "junk_per_landmark": 2,
    "n_distractors": 40,
    "photo_long_side": 160,
    "jpeg_quality": 90,
}
#: a benchmark small enough for unit tests (well under a second to write)
SYNTHETIC_TINY: dict[str, int] = {
    "n_landmarks": 3,
    "images_per_landmark": 5,
    "queries_per_landmark": 2,
    "hard_per_landmark": 1,
    "junk_per_landmark": 1,
    "n_distractors": 6,
    "photo_long_side": 80,
    "jpeg_quality": 90,
}
SYNTHETIC_PRESETS: dict[str, dict[str, int]] = {"default": SYNTHETIC_DEFAULTS, "tiny": SYNTHETIC_TINY}
#: renamed parameters, old name -> new name: the old name works for one more release, with a logged warning
DEPRECATED_PARAMS = {"image_size": "photo_long_side"}
#: names the completion marker keeps from before a rename, so that a folder written then still counts as complete
_MARKER_NAMES = {"photo_long_side": "image_size"}

#: bumped whenever the drawing changes, so that an old folder is regenerated instead of reused
FORMAT_VERSION = 1
DATASET_NAME = "synthetic"
COMPLETE_MARKER = ".complete.json"
IMAGE_FOLDER = "jpg"
GT_FOLDER = "gt_files_170407"
IMLIST_NAME = "imlist.txt"
GT_JSON_NAME = "groundtruth.json"
VIEWS_NAME = "views.json"
PICKLE_ORIGINAL = "gnd_synthetic.pkl"
PICKLE_REVISITED = "gnd_rsynthetic.pkl"
#: everything a synthetic benchmark folder may hold; a folder with anything else is never replaced
_OWN_ENTRIES = frozenset(
    {IMAGE_FOLDER, GT_FOLDER, IMLIST_NAME, GT_JSON_NAME, VIEWS_NAME, PICKLE_ORIGINAL, PICKLE_REVISITED, COMPLETE_MARKER}
)

#: Oxford's definition of junk: less than a quarter of the landmark visible
JUNK_MAX_VISIBLE = 0.25
#: visible fraction that every hard positive, easy positive and query keeps at least
HARD_MIN_VISIBLE = 0.35
EASY_MIN_VISIBLE = 0.6
QUERY_MIN_VISIBLE = 0.85

#: scenes are drawn at this multiple of the output size and box-filtered down (anti-aliasing)
_SUPERSAMPLE = 2
#: canonical facade canvas, in multiples of the output image's long side
_CANVAS = (2.0, 1.6)
#: about this many facade points estimate the visible fraction
_VISIBILITY_POINTS = 4000

# Streams of the seed: every image draws from its own generator, so images do not depend on each other.
_STREAM_DESIGN, _STREAM_PHOTO, _STREAM_DISTRACTOR, _STREAM_DISTRACTOR_DESIGN, _STREAM_ORDER = range(5)

#: image names end in a number of six digits or more, as in Oxford5k and Paris6k
_NAME = re.compile(r"^(?P<group>.+)_(?P<number>\d{6,})$")

# Palettes shared by landmarks, distractors and background clutter: colour alone identifies nothing.
_STONE = [(201, 174, 124), (170, 168, 160), (150, 84, 64), (226, 220, 204), (206, 160, 92), (114, 104, 94)]
_ROOF = [(70, 78, 90), (94, 142, 122), (152, 72, 52), (122, 122, 128), (58, 58, 64), (176, 150, 96)]
_GLASS = [(40, 48, 62), (24, 24, 30), (150, 170, 186), (70, 92, 122), (96, 70, 50)]
_ACCENT = [(182, 32, 42), (34, 62, 150), (222, 182, 44), (34, 112, 62), (240, 240, 234), (122, 44, 122)]
_SKIES = [
    ((92, 142, 212), (178, 208, 236)),
    ((150, 182, 220), (222, 232, 240)),
    ((140, 144, 150), (198, 200, 204)),
    ((102, 92, 150), (240, 170, 120)),
    ((200, 210, 220), (236, 236, 230)),
]
_GROUND = [(98, 128, 62), (92, 92, 96), (170, 156, 130), (128, 120, 110), (74, 104, 52)]
_GREENS = [(46, 92, 40), (64, 112, 48), (34, 70, 36), (90, 120, 56), (52, 80, 30)]
_SKIN = [(236, 196, 164), (196, 140, 100), (140, 92, 62), (92, 60, 40)]
_CLOTHES = [*_ACCENT, (30, 30, 36), (80, 80, 86), (200, 200, 196), (110, 84, 60)]


# -- public API --------------------------------------------------------------------------------------


def landmark_of(name: str) -> str:
    """Landmark of an image name: ``landmark_03_000012`` -> ``landmark_03``, ``distractor_000004`` -> ``distractor``.

    Accepts a bare name, a file name or a path (``jpg/landmark_03_000012.jpg``). Works for the
    real datasets' names too (``all_souls_000013`` -> ``all_souls``).
    """
    stem = PurePath(str(name)).name
    if stem.lower().endswith((".jpg", ".jpeg", ".png")):
        stem = stem.rsplit(".", 1)[0]
    match = _NAME.match(stem)
    if match is None:
        raise DataError(f"image name {name!r} is not '<landmark>_<6-digit number>' (e.g. landmark_03_000012)")
    return match["group"]


def synthetic_params(seed: int = 0, **overrides: int) -> dict[str, int]:
    """The validated parameters of a benchmark: :data:`SYNTHETIC_DEFAULTS` with ``overrides`` applied.

    A deprecated name (:data:`DEPRECATED_PARAMS`: ``image_size``, now ``photo_long_side``) is accepted with a logged
    warning naming the new one, and wins over the new name when both are given, as it did before the rename (a
    preset's ``photo_long_side`` overridden by a caller's ``image_size``).
    """
    overrides = _renamed(overrides)
    unknown = sorted(set(overrides) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown synthetic benchmark parameter(s) {unknown}; known: {sorted(SYNTHETIC_DEFAULTS)}")
    params = {**SYNTHETIC_DEFAULTS, **overrides}
    for key, value in {"seed": seed, **params}.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"synthetic benchmark: {key}={value!r} must be an integer")
    limits = {
        "n_landmarks": (1, 100),
        "images_per_landmark": (1, 100_000),
        "queries_per_landmark": (1, 1000),
        "hard_per_landmark": (0, 100_000),
        "junk_per_landmark": (0, 100_000),
        "n_distractors": (0, 1_000_000),
        "photo_long_side": (48, 2048),
        "jpeg_quality": (1, 95),
    }
    for key, (low, high) in limits.items():
        if not low <= params[key] <= high:
            raise ConfigError(f"synthetic benchmark: {key}={params[key]} must lie in [{low}, {high}]")
    if seed < 0:
        raise ConfigError(f"synthetic benchmark: seed={seed} must be >= 0")
    if params["hard_per_landmark"] + params["junk_per_landmark"] > params["images_per_landmark"]:
        raise ConfigError(
            f"synthetic benchmark: hard_per_landmark={params['hard_per_landmark']} + junk_per_landmark="
            f"{params['junk_per_landmark']} exceed images_per_landmark={params['images_per_landmark']}"
        )
    if params["junk_per_landmark"] >= params["images_per_landmark"]:
        raise ConfigError(
            f"synthetic benchmark: images_per_landmark={params['images_per_landmark']} with "
            f"junk_per_landmark={params['junk_per_landmark']} leaves no positive besides the queries; "
            "every landmark needs one in the revisited protocol, whose database excludes the queries"
        )
    return {key: int(value) for key, value in params.items()}


def _renamed(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with each deprecated name replaced by its new one, logging a warning that names the new one."""
    params = dict(params)
    for old, new in DEPRECATED_PARAMS.items():
        if old in params:
            log.warning(
                "synthetic benchmark: %s is deprecated and will be removed in the next release; use %s instead",
                old,
                new,
            )
            params[new] = params.pop(old)
    return params


def write_synthetic_benchmark(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    n_landmarks: int = SYNTHETIC_DEFAULTS["n_landmarks"],
    images_per_landmark: int = SYNTHETIC_DEFAULTS["images_per_landmark"],
    queries_per_landmark: int = SYNTHETIC_DEFAULTS["queries_per_landmark"],
    hard_per_landmark: int = SYNTHETIC_DEFAULTS["hard_per_landmark"],
    junk_per_landmark: int = SYNTHETIC_DEFAULTS["junk_per_landmark"],
    n_distractors: int = SYNTHETIC_DEFAULTS["n_distractors"],
    photo_long_side: int = SYNTHETIC_DEFAULTS["photo_long_side"],
    jpeg_quality: int = SYNTHETIC_DEFAULTS["jpeg_quality"],
    workers: int = 1,
    image_size: int | None = None,
) -> Path:
    """Write the synthetic benchmark into ``root`` (the dataset folder) and return it.

    ``n_landmarks`` landmarks each get ``queries_per_landmark`` query photos (also database
    images, as in Oxford5k) and ``images_per_landmark`` database photos, of which
    ``hard_per_landmark`` are hard and ``junk_per_landmark`` junk; ``n_distractors`` photos
    show other buildings or no building. Images are JPEGs of long side ``photo_long_side`` pixels
    (``image_size``: its deprecated name, accepted with a warning for one more release).

    A folder already complete for the same seed and parameters is returned as is. Otherwise
    the benchmark is written into a hidden sibling folder and swapped into place, so a
    half-written folder never appears at ``root``; a synthetic folder with other parameters
    is replaced. A folder holding anything else raises :class:`ConfigError`. Hidden folders left by a run that
    was killed (SIGKILL, power cut) are removed, or, when one holds the finished benchmark and was about to be
    swapped in, moved into place; a write that fails (a full disk, a file-size limit) removes what it wrote.

    ``workers`` > 1 draws the photographs in that many forked processes. Every photograph has its own random
    stream, so the files are byte-identical whatever the number of workers.
    """
    params = synthetic_params(
        seed,
        n_landmarks=n_landmarks,
        images_per_landmark=images_per_landmark,
        queries_per_landmark=queries_per_landmark,
        hard_per_landmark=hard_per_landmark,
        junk_per_landmark=junk_per_landmark,
        n_distractors=n_distractors,
        photo_long_side=photo_long_side,
        jpeg_quality=jpeg_quality,
        **({} if image_size is None else {"image_size": image_size}),
    )
    # resolved: the swap below must move the real folder, never a symlink or "."
    root = Path(root).expanduser().resolve()
    marker = _expected_marker(seed, params)
    if is_synthetic_complete(root, seed, params):
        log.info("%s already holds the synthetic benchmark (seed %d)", root, seed)
        return root
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    if _recover_stale(root, seed, params):
        log.info("%s: moved the benchmark finished by an interrupted run into place", root)
        return root
    # os.mkdir, not mkdtemp: the folder keeps the permissions of the user's umask, not 0700
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        start = time.perf_counter()
        _generate(staging, seed, params, marker, workers=int(workers))
        log.info("wrote the synthetic benchmark (seed %d) in %.1f s", seed, time.perf_counter() - start)
        _swap_into_place(staging, root, seed, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def is_synthetic_complete(root: str | os.PathLike, seed: int, params: dict[str, int]) -> bool:
    """True when ``root`` holds a finished benchmark written with exactly this seed and these parameters."""
    root = Path(root)
    try:
        marker = json.loads((root / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker != _expected_marker(seed, params):
        return False
    files = [root / IMLIST_NAME, root / PICKLE_ORIGINAL, root / PICKLE_REVISITED, root / GT_JSON_NAME]
    if not all(path.is_file() for path in files) or not (root / GT_FOLDER).is_dir():
        return False
    try:
        n_images = sum(1 for entry in os.scandir(root / IMAGE_FOLDER) if entry.name.endswith(".jpg"))
    except OSError:
        return False
    return n_images == marker["counts"]["images"]


# -- folder handling ----------------------------------------------------------------------------------


def _expected_marker(seed: int, params: dict[str, int]) -> dict[str, Any]:
    """The completion marker: deterministic (no time stamp), so it is byte-identical for the same arguments."""
    per_landmark = params["queries_per_landmark"] + params["images_per_landmark"]
    return {
        "dataset": DATASET_NAME,
        "seed": int(seed),
        "params": {**{_MARKER_NAMES.get(k, k): v for k, v in params.items()}, "format_version": FORMAT_VERSION},
        "counts": {
            "landmarks": params["n_landmarks"],
            "distractors": params["n_distractors"],
            "queries": params["n_landmarks"] * params["queries_per_landmark"],
            # the original protocol's database holds the queries, the revisited one does not
            "images": params["n_landmarks"] * per_landmark + params["n_distractors"],
            "revisited_database": params["n_landmarks"] * params["images_per_landmark"] + params["n_distractors"],
        },
    }


def _check_replaceable(root: Path) -> None:
    """Refuse to replace a folder that is not a (possibly unfinished or outdated) synthetic benchmark."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ConfigError(f"{root} is a file, not a folder; pick another root for the synthetic benchmark")
    try:
        marker = json.loads((root / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and marker.get("dataset") != DATASET_NAME:
        raise ConfigError(
            f"{root} holds the {marker.get('dataset')!r} dataset, not the synthetic benchmark; "
            "pick another root or delete that folder"
        )
    foreign = sorted(set(os.listdir(root)) - _OWN_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ConfigError(
            f"{root} holds files that are not part of a synthetic benchmark ({shown}); "
            "pick another root or delete that folder"
        )
    log.info("%s holds an unfinished or outdated synthetic benchmark; replacing it", root)


def _stale_folders(root: Path) -> list[Path]:
    """Staging folders (and replaced benchmarks) beside ``root`` whose writing process is gone."""
    pattern = re.compile(rf"^\.{re.escape(root.name)}\.tmp-(\d+)-[0-9a-f]+(\.old)?$")
    stale = []
    for entry in root.parent.iterdir() if root.parent.is_dir() else ():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match[1])):
            stale.append(entry)
    return sorted(stale)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _recover_stale(root: Path, seed: int, params: dict[str, int]) -> bool:
    """Remove what killed runs left beside ``root``; True when one of them had finished this very benchmark and
    was killed while swapping it in (``root`` then missing): it is moved into place instead of drawn again."""
    recovered = False
    for folder in _stale_folders(root):
        if (
            not recovered
            and not root.exists()
            and not folder.name.endswith(".old")
            and is_synthetic_complete(folder, seed, params)
        ):
            try:
                os.replace(folder, root)
                recovered = True
                continue
            except OSError:
                pass
        shutil.rmtree(folder, ignore_errors=True)
    return recovered


def _swap_into_place(staging: Path, root: Path, seed: int, params: dict[str, int]) -> None:
    """Move the finished ``staging`` folder to ``root``, replacing an outdated benchmark there."""
    if is_synthetic_complete(root, seed, params):
        return  # another process wrote the same benchmark meanwhile
    old = root.parent / f"{staging.name}.old"
    moved_old = False
    if root.exists():
        os.replace(root, old)
        moved_old = True
    try:
        os.replace(staging, root)
    except OSError as error:
        if moved_old:
            os.replace(old, root)
        elif is_synthetic_complete(root, seed, params):
            return  # another process wrote the same benchmark meanwhile
        raise DataError(f"cannot move the synthetic benchmark into {root}: {error}") from None
    if moved_old:
        shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one (and files get the umask's permissions)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None and error.errno is not None:
            # name the file: a full disk or a file-size limit then reads as one line naming it
            raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(path)) from None
        raise


def _json_bytes(data: Any, indent: int = 1) -> bytes:
    return json.dumps(data, indent=indent).encode("utf-8")


# -- generation ---------------------------------------------------------------------------------------


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(int(k) for k in key)))


def _generate(folder: Path, seed: int, params: dict[str, int], marker: dict[str, Any], workers: int = 1) -> None:
    """Draw every image (in ``workers`` processes) and write the ground truth into ``folder``; the marker last."""
    image_dir = folder / IMAGE_FOLDER
    image_dir.mkdir()
    landmarks = [f"landmark_{i:02d}" for i in range(params["n_landmarks"])]
    draw = functools.partial(_write_photo, str(image_dir), seed, params["photo_long_side"], params["jpeg_quality"])
    tasks = _photo_tasks(seed, params)
    if workers > 1 and len(tasks) > 1 and "fork" in multiprocessing.get_all_start_methods():
        # forked: the workers inherit the imports; consecutive photographs of a landmark share its facade drawing
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            views = list(pool.map(draw, tasks, chunksize=max(1, len(tasks) // (4 * workers))))
    else:
        views = [draw(task) for task in tasks]
    _write_ground_truth(folder, seed, landmarks, views)
    views.sort(key=lambda v: v["name"])
    _write_atomic(folder / VIEWS_NAME, _json_bytes({"images": views}))
    _write_atomic(folder / COMPLETE_MARKER, _json_bytes(marker, indent=2))


def _photo_tasks(seed: int, params: dict[str, int]) -> list[tuple[str, int, int, str]]:
    """``(kind, landmark or distractor number, photo number, role)`` of every photograph, landmarks first."""
    per_landmark = params["queries_per_landmark"] + params["images_per_landmark"]
    n_easy = params["images_per_landmark"] - params["hard_per_landmark"] - params["junk_per_landmark"]
    tasks = []
    for i in range(params["n_landmarks"]):
        roles = (
            ["query"] * params["queries_per_landmark"]
            + ["easy"] * n_easy
            + ["hard"] * params["hard_per_landmark"]
            + ["junk"] * params["junk_per_landmark"]
        )
        roles = [roles[j] for j in _rng(seed, _STREAM_ORDER, 1, i).permutation(per_landmark)]
        tasks += [("landmark", i, k, role) for k, role in enumerate(roles)]
    return tasks + [("distractor", j, 0, "") for j in range(params["n_distractors"])]


def _write_photo(image_dir: str, seed: int, size: int, quality: int, task: tuple[str, int, int, str]) -> dict:
    """Draw one photograph from its own random stream, write its JPEG; its view record."""
    kind, i, k, role = task
    if kind == "landmark":
        name, landmark = f"landmark_{i:02d}_{k:06d}", f"landmark_{i:02d}"
        image, view = _photograph(_rng(seed, _STREAM_PHOTO, i, k), _facade(seed, _STREAM_DESIGN, i, size), role, size)
        record = {"name": name, "landmark": landmark, "role": role, **view}
    else:
        name = f"distractor_{i:06d}"
        rng = _rng(seed, _STREAM_DISTRACTOR, i)
        facade = None
        if rng.random() < 0.6:  # another building, seen once; else a street scene without one
            facade = _facade(seed, _STREAM_DISTRACTOR_DESIGN, i, size)
        image, view = _photograph(rng, facade, "hard" if rng.random() < 0.3 else "easy", size)
        record = {"name": name, "landmark": None, "role": "distractor", **view}
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    _write_atomic(Path(image_dir) / f"{name}.jpg", buffer.getvalue())
    return record


@functools.lru_cache(maxsize=2)
def _facade(seed: int, stream: int, i: int, size: int) -> _Facade:
    """The facade drawing of landmark (or distractor) ``i``: drawn once per process for its photographs."""
    return _Facade(_draw_facade(_rng(seed, stream, i), (round(_CANVAS[0] * size), round(_CANVAS[1] * size))))


def _write_ground_truth(folder: Path, seed: int, landmarks: list[str], views: list[dict[str, Any]]) -> None:
    """imlist.txt, gt text files, both gnd pickles and groundtruth.json, mutually consistent."""
    by_name = {v["name"]: v for v in views}
    names = sorted(by_name)
    imlist = [names[j] for j in _rng(seed, _STREAM_ORDER, 0).permutation(len(names))]
    index = {name: i for i, name in enumerate(imlist)}
    groups: dict[str, dict[str, list[str]]] = {}
    for landmark in landmarks:
        mine = [n for n in names if by_name[n]["landmark"] == landmark]
        roles = {r: [n for n in mine if by_name[n]["role"] == r] for r in ("query", "easy", "hard", "junk")}
        # as in Oxford5k, the query photos are good images of their landmark
        groups[landmark] = {
            "query": roles["query"],
            "good": sorted(roles["query"] + roles["easy"]),
            "ok": roles["hard"],
            "junk": roles["junk"],
        }
    qimlist = [q for landmark in landmarks for q in groups[landmark]["query"]]
    query_set = set(qimlist)
    r_imlist = [n for n in imlist if n not in query_set]
    r_index = {name: i for i, name in enumerate(r_imlist)}

    gt_dir = folder / GT_FOLDER
    gt_dir.mkdir()
    gnd, r_gnd, landmark_json = [], [], {}
    for landmark in landmarks:
        group = groups[landmark]
        for n, query in enumerate(group["query"], start=1):
            bbx = [round(float(v), 1) for v in by_name[query]["bbx"]]
            line = f"oxc1_{query} " + " ".join(_format_coordinate(v) for v in bbx) + "\n"
            _write_atomic(gt_dir / f"{landmark}_{n}_query.txt", line.encode())
            for kind in ("good", "ok", "junk"):
                _write_atomic(gt_dir / f"{landmark}_{n}_{kind}.txt", "".join(f"{m}\n" for m in group[kind]).encode())
            gnd.append(
                {
                    "bbx": bbx,
                    "ok": sorted(index[m] for m in group["good"] + group["ok"]),
                    "junk": sorted(index[m] for m in group["junk"]),
                }
            )
            r_gnd.append(
                {
                    "bbx": list(bbx),
                    "easy": sorted(r_index[m] for m in group["good"] if m not in query_set),
                    "hard": sorted(r_index[m] for m in group["ok"]),
                    "junk": sorted(r_index[m] for m in group["junk"]),
                }
            )
        landmark_json[landmark] = {key: [f"{m}.jpg" for m in group[key]] for key in ("good", "ok", "junk", "query")}

    original = {"qidx": [index[q] for q in qimlist], "gnd": gnd, "imlist": imlist, "qimlist": qimlist}
    revisited = {"gnd": r_gnd, "imlist": r_imlist, "qimlist": list(qimlist)}
    _write_atomic(folder / IMLIST_NAME, "".join(f"{n}\n" for n in imlist).encode())
    _write_atomic(folder / PICKLE_ORIGINAL, pickle.dumps(original, protocol=2))
    _write_atomic(folder / PICKLE_REVISITED, pickle.dumps(revisited, protocol=2))
    _write_atomic(folder / GT_JSON_NAME, _json_bytes(landmark_json))


def _format_coordinate(value: float) -> str:
    """``136.5`` or ``78``, as the published query files write them."""
    return f"{value:.1f}".removesuffix(".0")


# -- landmarks ----------------------------------------------------------------------------------------


class _Facade:
    """A landmark's canonical drawing, its silhouette box and points sampling its area."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        alpha = np.asarray(image.getchannel("A"))
        x0, y0, x1, y1 = image.getchannel("A").getbbox()
        self.corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
        ys, xs = np.nonzero(alpha > 127)
        stride = max(1, int(math.sqrt(len(xs) / _VISIBILITY_POINTS)))
        keep = (xs % stride == 0) & (ys % stride == 0)
        self.points = np.stack([xs[keep] + 0.5, ys[keep] + 0.5], axis=1).astype(np.float64)
        self.bottom_centre = np.array([(x0 + x1) / 2.0, float(y1)])


def _pick(rng: np.random.Generator, palette: list) -> tuple[int, int, int]:
    return tuple(palette[int(rng.integers(len(palette)))])


def _shade(colour: tuple[int, ...], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(round(c * factor), 0, 255)) for c in colour[:3])


def _mix(a: tuple[int, ...], b: tuple[int, ...], t: float) -> tuple[int, int, int]:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a[:3], b[:3], strict=True))


def _jitter(rng: np.random.Generator, colour: tuple[int, ...], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour[:3])


def _window(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, w: float, h: float, fill, trim) -> None:
    """One window of ``kind`` centred on (cx, cy) inside a w x h box."""
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    if kind == "rect":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif kind == "arch":
        arc = min(w, h)
        draw.rectangle([x0, y0 + arc / 2, x1, y1], fill=fill)
        draw.ellipse([x0, y0, x1, y0 + arc], fill=fill)
    elif kind == "round":
        r = min(w, h) / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        draw.line([cx - r, cy, cx + r, cy], fill=trim, width=max(1, int(r / 5)))
    elif kind == "pointed":
        arc = min(w * 0.7, h * 0.6)
        draw.rectangle([x0, y0 + arc, x1, y1], fill=fill)
        draw.polygon([(x0, y0 + arc), (cx, y0), (x1, y0 + arc)], fill=fill)
    elif kind == "double":
        gap = w * 0.16
        draw.rectangle([x0, y0, cx - gap / 2, y1], fill=fill)
        draw.rectangle([cx + gap / 2, y0, x1, y1], fill=fill)
    elif kind == "cross":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
        width = max(1, int(w / 7))
        draw.line([cx, y0, cx, y1], fill=trim, width=width)
        draw.line([x0, y0 + h * 0.38, x1, y0 + h * 0.38], fill=trim, width=width)
    else:  # slit
        draw.rectangle([cx - w * 0.18, y0, cx + w * 0.18, y1], fill=fill)


_WINDOW_KINDS = ("rect", "arch", "round", "pointed", "double", "cross", "slit")


def _draw_facade(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A building on a transparent canvas; every choice below is part of its identity."""
    W, H = size
    image = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    wall = _jitter(rng, _pick(rng, _STONE), 8)
    roof = _pick(rng, _ROOF)
    glass = _pick(rng, _GLASS)
    accent = _pick(rng, _ACCENT)
    trim = _shade(wall, float(rng.choice([0.7, 1.2])))
    stroke = max(1, round(W / 160))

    x0 = W * rng.uniform(0.05, 0.2)
    x1 = W * (1 - rng.uniform(0.05, 0.2))
    top = H * rng.uniform(0.4, 0.6)
    bottom = float(H)
    xm = (x0 + x1) / 2
    body_w = x1 - x0

    # towers: behind the roof line, in front of the sky; their number, place, height and cap are identity
    n_towers = int(rng.choice([0, 1, 2], p=[0.3, 0.35, 0.35]))
    tower_w = body_w * rng.uniform(0.1, 0.18)
    tower_top = H * rng.uniform(0.14, 0.3)
    cap = str(rng.choice(["spire", "crenel", "dome", "pyramid", "flat"]))
    if n_towers == 2:
        centres = [x0 + tower_w * 0.4, x1 - tower_w * 0.4]
    elif n_towers == 1:
        centres = [float(rng.choice([xm, x0 + tower_w * 0.5, x1 - tower_w * 0.5, x0 + body_w * 0.3]))]
    else:
        centres = []
    tower_wall = wall if rng.random() < 0.6 else trim
    tower_kind = str(rng.choice(_WINDOW_KINDS))
    for cx in centres:
        tx0, tx1 = cx - tower_w / 2, cx + tower_w / 2
        draw.rectangle([tx0, tower_top, tx1, bottom], fill=tower_wall)
        cap_h = H * 0.1
        if cap == "spire":
            draw.polygon(
                [(tx0 - stroke, tower_top), (cx, tower_top - cap_h * 1.2), (tx1 + stroke, tower_top)], fill=roof
            )
        elif cap == "pyramid":
            draw.polygon([(tx0, tower_top), (cx, tower_top - cap_h * 0.5), (tx1, tower_top)], fill=roof)
        elif cap == "dome":
            draw.ellipse([tx0, tower_top - tower_w * 0.5, tx1, tower_top + tower_w * 0.5], fill=roof)
        elif cap == "crenel":
            merlon = tower_w / 5
            for m in range(3):
                mx = tx0 + 2 * m * merlon
                draw.rectangle([mx, tower_top - merlon, mx + merlon, tower_top], fill=tower_wall)
        else:
            draw.rectangle([tx0 - stroke * 2, tower_top - stroke * 2, tx1 + stroke * 2, tower_top], fill=trim)
        n_win = int(rng.integers(1, 4))
        span = (top - tower_top) * 0.8
        for k in range(n_win):
            cy = tower_top + (top - tower_top) * 0.1 + span * (k + 0.5) / n_win
            _window(draw, tower_kind, cx, cy, tower_w * 0.4, span / n_win * 0.6, glass, trim)

    # body and roof line
    draw.rectangle([x0, top, x1, bottom], fill=wall)
    roof_kind = str(rng.choice(["flat", "gable", "dome", "crenel", "mansard", "sawtooth"]))
    rise = H * rng.uniform(0.07, 0.14)
    if roof_kind == "flat":
        draw.rectangle([x0 - stroke * 3, top - stroke * 3, x1 + stroke * 3, top + stroke * 2], fill=trim)
    elif roof_kind == "gable":
        draw.polygon([(x0 - stroke * 2, top), (xm, top - rise), (x1 + stroke * 2, top)], fill=roof)
    elif roof_kind == "dome":
        dw = body_w * rng.uniform(0.28, 0.45)
        drum = rise * 0.5
        draw.rectangle([xm - dw / 2, top - drum, xm + dw / 2, top], fill=trim)
        draw.ellipse([xm - dw / 2, top - drum - dw * 0.55, xm + dw / 2, top - drum + dw * 0.55], fill=roof)
        draw.rectangle([xm - dw * 0.06, top - drum - dw * 0.75, xm + dw * 0.06, top - drum - dw * 0.5], fill=trim)
    elif roof_kind == "crenel":
        merlon = body_w / (2 * int(rng.integers(6, 12)) + 1)
        m = x0
        while m + merlon <= x1 + 1e-6:
            draw.rectangle([m, top - merlon, m + merlon, top], fill=wall)
            m += 2 * merlon
    elif roof_kind == "mansard":
        inset = body_w * 0.06
        draw.polygon([(x0, top), (x0 + inset, top - rise), (x1 - inset, top - rise), (x1, top)], fill=roof)
        n_dormer = int(rng.integers(3, 7))
        for k in range(n_dormer):
            cx = x0 + inset + (body_w - 2 * inset) * (k + 0.5) / n_dormer
            _window(draw, "arch", cx, top - rise * 0.45, rise * 0.35, rise * 0.6, glass, trim)
    else:  # sawtooth: a row of small gables
        n_teeth = int(rng.integers(3, 7))
        step = body_w / n_teeth
        for k in range(n_teeth):
            draw.polygon(
                [(x0 + k * step, top), (x0 + (k + 0.5) * step, top - rise * 0.7), (x0 + (k + 1) * step, top)], fill=roof
            )

    # wall texture with its own period, drawn on a layer the size of the body so it stays inside it
    texture = str(rng.choice(["bands", "bricks", "stripes", "pilasters", "lattice", "plain"]))
    period = max(3.0, H * rng.uniform(0.025, 0.06))
    layer = Image.new("RGBA", (max(1, int(body_w)), max(1, int(bottom - top))), (0, 0, 0, 0))
    ldraw = ImageDraw.Draw(layer)
    lw, lh = layer.size
    dark = _shade(wall, 0.8)
    if texture in ("bands", "bricks"):
        for row, y in enumerate(np.arange(period, lh, period)):
            ldraw.line([0, y, lw, y], fill=dark, width=stroke)
            if texture == "bricks":
                offset = (row % 2) * period
                for x in np.arange(offset, lw, 2 * period):
                    ldraw.line([x, y - period, x, y], fill=dark, width=stroke)
    elif texture == "stripes":
        second = _pick(rng, _STONE)
        for y in np.arange(0, lh, 2 * period):
            ldraw.rectangle([0, y, lw, y + period], fill=second)
    elif texture == "lattice":
        for x in np.arange(-lh, lw, 2 * period):
            ldraw.line([x, 0, x + lh, lh], fill=dark, width=stroke)
            ldraw.line([x + lh, 0, x, lh], fill=dark, width=stroke)
    image.alpha_composite(layer, (int(x0), int(top)))

    # window grid: rows, columns, shape and size are identity; the ground floor may differ
    rows = int(rng.integers(2, 6))
    cols = int(rng.integers(3, 9))
    kind = str(rng.choice(_WINDOW_KINDS))
    ground_kind = kind if rng.random() < 0.5 else str(rng.choice(_WINDOW_KINDS))
    win_w = rng.uniform(0.35, 0.62)
    win_h = rng.uniform(0.45, 0.72)
    sills = rng.random() < 0.5
    cell_w = body_w / cols
    cell_h = (bottom - top - H * 0.03) / rows
    if texture == "pilasters":
        for c in range(cols + 1):
            px = x0 + c * cell_w
            draw.rectangle([px - cell_w * 0.08, top, px + cell_w * 0.08, bottom], fill=trim)
    feature = str(rng.choice(["rose", "clock", "portico", "arcade", "banners", "none"]))
    door_col = cols // 2 if cols % 2 else None
    for r in range(rows):
        for c in range(cols):
            if feature in ("portico", "arcade") and r == rows - 1:
                continue
            if r == rows - 1 and c == door_col:
                continue
            cx = x0 + (c + 0.5) * cell_w
            cy = top + H * 0.03 + (r + 0.5) * cell_h
            this = ground_kind if r == rows - 1 else kind
            _window(draw, this, cx, cy, cell_w * win_w, cell_h * win_h, glass, trim)
            if sills:
                sy = cy + cell_h * win_h / 2
                draw.rectangle([cx - cell_w * win_w * 0.6, sy, cx + cell_w * win_w * 0.6, sy + stroke * 2], fill=trim)

    # one ornament and a door
    door_w, door_h = cell_w * 0.8, cell_h * 0.9
    if feature == "rose":
        radius = body_w * rng.uniform(0.07, 0.11)
        cy = top + (bottom - top) * 0.32
        draw.ellipse([xm - radius * 1.2, cy - radius * 1.2, xm + radius * 1.2, cy + radius * 1.2], fill=trim)
        draw.ellipse([xm - radius, cy - radius, xm + radius, cy + radius], fill=accent)
        for k in range(int(rng.integers(6, 13))):
            angle = math.pi * k / 6
            draw.line([xm, cy, xm + radius * math.cos(angle), cy + radius * math.sin(angle)], fill=trim, width=stroke)
    elif feature == "clock":
        cx, cy = (centres[0], tower_top + (top - tower_top) * 0.18) if centres else (xm, top + cell_h * 0.5)
        radius = (tower_w if centres else cell_w) * 0.38
        draw.ellipse(
            [cx - radius, cy - radius, cx + radius, cy + radius],
            fill=(238, 236, 226),
            outline=(30, 30, 30),
            width=stroke,
        )
        draw.line([cx, cy, cx, cy - radius * 0.8], fill=(20, 20, 20), width=stroke)
        draw.line([cx, cy, cx + radius * 0.55, cy + radius * 0.2], fill=(20, 20, 20), width=stroke)
    elif feature == "portico":
        pw = body_w * rng.uniform(0.35, 0.55)
        ph = cell_h * 1.1
        py = bottom - ph
        draw.rectangle([xm - pw / 2, py, xm + pw / 2, bottom], fill=_shade(wall, 0.55))
        n_col = int(rng.choice([4, 6]))
        for k in range(n_col):
            cx = xm - pw / 2 + pw * (k + 0.5) / n_col
            draw.rectangle([cx - pw * 0.035, py, cx + pw * 0.035, bottom], fill=trim)
        draw.polygon([(xm - pw / 2 - stroke * 3, py), (xm, py - ph * 0.4), (xm + pw / 2 + stroke * 3, py)], fill=trim)
    elif feature == "arcade":
        for c in range(cols):
            cx = x0 + (c + 0.5) * cell_w
            _window(draw, "arch", cx, bottom - cell_h * 0.5, cell_w * 0.7, cell_h * 0.95, _shade(glass, 0.6), trim)
    elif feature == "banners":
        n_banner = int(rng.integers(2, 5))
        for k in range(n_banner):
            cx = x0 + body_w * (k + 1) / (n_banner + 1)
            draw.rectangle([cx - cell_w * 0.18, top + stroke * 3, cx + cell_w * 0.18, top + cell_h * 1.6], fill=accent)
    if door_col is not None and feature not in ("portico", "arcade"):
        _window(draw, "arch", xm, bottom - door_h / 2, door_w, door_h, _shade(glass, 0.7), trim)
    return image


# -- photographs --------------------------------------------------------------------------------------


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = (
        math.cos(yaw),
        math.sin(yaw),
        math.cos(pitch),
        math.sin(pitch),
        math.cos(roll),
        math.sin(roll),
    )
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    rz = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    return rz @ rx @ ry


def _camera(canvas: tuple[int, int], yaw: float, pitch: float, roll: float, distance: float) -> np.ndarray:
    """Homography from canvas pixels to an unscaled image plane: a pinhole camera facing the facade plane."""
    w, h = canvas
    to_plane = np.array([[1.0 / w, 0.0, -0.5], [0.0, 1.0 / w, -h / (2.0 * w)], [0.0, 0.0, 1.0]])
    r = _rotation(yaw, pitch, roll)
    extrinsic = np.column_stack([r[:, 0], r[:, 1], [0.0, 0.0, distance]])
    return extrinsic @ to_plane


def _apply(h: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates of ``points`` under ``h`` and their homogeneous depth."""
    hom = np.column_stack([points, np.ones(len(points))]) @ h.T
    return hom[:, :2] / hom[:, 2:3], hom[:, 2]


def _place(h0: np.ndarray, corners: np.ndarray, size: tuple[int, int], scale: float, centre: tuple[float, float]):
    """Scale and shift ``h0`` so the landmark's box is ``scale`` x (the largest box fitting the image) at ``centre``."""
    xy, _ = _apply(h0, corners)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    fit = min(size[0] / (hi[0] - lo[0]), size[1] / (hi[1] - lo[1]))
    k = scale * fit
    mid = (lo + hi) / 2
    a = np.array([[k, 0.0, centre[0] - k * mid[0]], [0.0, k, centre[1] - k * mid[1]], [0.0, 0.0, 1.0]])
    return a @ h0, (hi - lo) * k


def _visible_fraction(facade: _Facade, h: np.ndarray, size: tuple[int, int], occluded: np.ndarray | None) -> float:
    """Share of the landmark's projected area inside the frame and not hidden by an occluder.

    Facade points are weighted by the area the homography gives them (|det H| / w^3), so
    the fraction is of the landmark as it appears in this photograph, parts outside the
    frame included in the denominator.
    """
    xy, w = _apply(h, facade.points)
    weight = abs(np.linalg.det(h)) / np.abs(w) ** 3
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < size[0]) & (xy[:, 1] >= 0) & (xy[:, 1] < size[1]) & (w > 0)
    if occluded is not None:
        px = np.clip((xy[:, 0] * _SUPERSAMPLE).astype(np.int64), 0, occluded.shape[1] - 1)
        py = np.clip((xy[:, 1] * _SUPERSAMPLE).astype(np.int64), 0, occluded.shape[0] - 1)
        inside &= ~occluded[py, px]
    return float(weight[inside].sum() / weight.sum())


#: how each kind of view is photographed: viewpoint, scale, allowed crop (share of the box), lighting
_VIEWS = {
    "query": {
        "yaw": (0, 20),
        "pitch": 7,
        "roll": 2,
        "distance": (2.2, 3.5),
        "scale": (0.75, 0.95),
        "crop": 0.0,
        "people": (0, 2),
        "trees": 0.15,
        "cars": 0.15,
        "lamps": 0.2,
        "light": 0.5,
        "min_visible": QUERY_MIN_VISIBLE,
    },
    "easy": {
        "yaw": (0, 30),
        "pitch": 10,
        "roll": 4,
        "distance": (1.8, 3.2),
        "scale": (0.55, 1.0),
        "crop": 0.12,
        "people": (0, 3),
        "trees": 0.35,
        "cars": 0.3,
        "lamps": 0.3,
        "light": 1.0,
        "min_visible": EASY_MIN_VISIBLE,
    },
    "hard": {
        "yaw": (0, 30),
        "pitch": 12,
        "roll": 5,
        "distance": (1.8, 3.2),
        "scale": (0.5, 0.9),
        "crop": 0.2,
        "people": (1, 5),
        "trees": 0.5,
        "cars": 0.4,
        "lamps": 0.3,
        "light": 1.0,
        "min_visible": HARD_MIN_VISIBLE,
    },
    "junk": {
        "yaw": (0, 30),
        "pitch": 10,
        "roll": 4,
        "distance": (1.8, 3.2),
        "scale": (0.6, 1.0),
        "crop": 0.0,
        "people": (0, 3),
        "trees": 0.3,
        "cars": 0.3,
        "lamps": 0.3,
        "light": 1.0,
        "min_visible": 0.0,
    },
}
_HARD_FACTORS = ("small", "oblique", "occluded", "lighting")


def _photograph(rng: np.random.Generator, facade: _Facade | None, role: str, size_long: int):
    """One photograph of ``facade`` (or of a street without it) as a ``role`` view; returns the image and its record."""
    portrait = rng.random() < 0.25
    short = round(size_long * 0.75)
    size = (short, size_long) if portrait else (size_long, short)
    ss = (size[0] * _SUPERSAMPLE, size[1] * _SUPERSAMPLE)
    spec = dict(_VIEWS[role])
    factors: list[str] = []
    if role == "hard":
        factors = sorted(str(f) for f in rng.choice(_HARD_FACTORS, size=2, replace=False))
        if "small" in factors:
            spec["scale"] = (0.3, 0.45)
        if "oblique" in factors:
            spec["yaw"], spec["distance"], spec["pitch"] = (38, 55), (1.3, 1.7), 16
    junk_mode = str(rng.choice(["crop", "occluded"])) if role == "junk" else ""
    if facade is None:  # a street scene: only the lighting of a hard view applies
        factors = [f for f in factors if f == "lighting"]
    record: dict[str, Any] = {"width": size[0], "height": size[1], "factors": factors, "building": facade is not None}

    if facade is not None:
        h, viewpoint = _viewpoint(rng, facade, spec, size, slide_out=junk_mode == "crop")
        record.update(viewpoint)
        bottom, _ = _apply(h, facade.bottom_centre[None, :])
        horizon = float(np.clip(bottom[0, 1], 0.35 * size[1], 0.98 * size[1]))
    else:
        horizon = rng.uniform(0.5, 0.8) * size[1]
    scene = _draw_background(rng, ss, horizon * _SUPERSAMPLE)
    clutter = _clutter(rng, spec if facade else {**_VIEWS["hard"], "people": (0, 6)}, ss, horizon * _SUPERSAMPLE)
    record["bbx"] = record["visible"] = None
    if facade is not None:
        hs = np.diag([_SUPERSAMPLE, _SUPERSAMPLE, 1.0]) @ h
        inverse = np.linalg.inv(hs)
        coeffs = tuple(float(v) for v in (inverse / inverse[2, 2]).ravel()[:8])
        scene.alpha_composite(
            facade.image.transform(ss, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR)
        )
        cover_target = None
        if "occluded" in factors:
            cover_target = rng.uniform(0.4, 0.55)
        elif junk_mode == "occluded":
            cover_target = rng.uniform(0.06, 0.2)
        clutter, visible = _occlude(rng, facade, h, size, clutter, spec["min_visible"], cover_target, role == "junk")
        corners, _ = _apply(h, facade.corners)
        lo, hi = np.clip(corners.min(axis=0), 0, size), np.clip(corners.max(axis=0), 0, size)
        record["bbx"] = [round(float(v), 1) for v in (*lo, *hi)]
        record["visible"] = round(float(visible), 4)
    _paint(ImageDraw.Draw(scene), [shape for thing in clutter for shape in thing])

    image = scene.convert("RGB").reduce(_SUPERSAMPLE)
    return _photometric(rng, image, spec["light"], strong="lighting" in factors), record


def _viewpoint(rng: np.random.Generator, facade: _Facade, spec: dict, size: tuple[int, int], slide_out: bool):
    """Camera homography (canvas -> image pixels) of one view, and its parameters for the record.

    The crop keeps at least the view's minimum visible share; with ``slide_out`` (a junk
    view) the landmark is then slid out of the frame until only 6-20% of it is left.
    """
    yaw = math.radians(rng.uniform(*spec["yaw"]) * rng.choice([-1.0, 1.0]))
    pitch = math.radians(rng.uniform(-spec["pitch"], spec["pitch"]))
    roll = math.radians(rng.uniform(-spec["roll"], spec["roll"]))
    distance = rng.uniform(*spec["distance"])
    scale = rng.uniform(*spec["scale"])
    h0 = _camera(facade.image.size, yaw, pitch, roll, distance)
    _, box = _place(h0, facade.corners, size, scale, (0.0, 0.0))
    slack = spec["crop"] * box
    for attempt in range(9):  # the last try is centred, which shows all of it
        centre = np.array(
            [
                rng.uniform(box[0] / 2 - slack[0], size[0] - box[0] / 2 + slack[0]),
                rng.uniform(box[1] / 2 - slack[1], size[1] - box[1] / 2 + slack[1]),
            ]
        )
        if attempt == 8:
            centre = np.array([size[0] / 2, size[1] / 2])
        h, _ = _place(h0, facade.corners, size, scale, tuple(centre))
        if _visible_fraction(facade, h, size, None) >= spec["min_visible"]:
            break
    if slide_out:  # bisect the distance along a direction (left, right or down) for the target share
        angle = float(rng.choice([0.0, math.pi, math.pi / 2], p=[0.4, 0.4, 0.2])) + rng.uniform(-0.3, 0.3)
        direction = np.array([math.cos(angle), math.sin(angle)])
        target = rng.uniform(0.06, 0.2)
        lo, hi = 0.0, float(size[0] + size[1] + box.max())  # at hi the landmark is wholly outside
        for _ in range(24):
            mid = (lo + hi) / 2
            trial, _ = _place(h0, facade.corners, size, scale, tuple(centre + mid * direction))
            lo, hi = (mid, hi) if _visible_fraction(facade, trial, size, None) > target else (lo, mid)
        h, _ = _place(h0, facade.corners, size, scale, tuple(centre + hi * direction))
    record = {
        "scale": round(float(scale), 4),
        "yaw": round(math.degrees(yaw), 2),
        "pitch": round(math.degrees(pitch), 2),
        "roll": round(math.degrees(roll), 2),
        "distance": round(float(distance), 3),
    }
    return h, record


def _occlude(
    rng: np.random.Generator,
    facade: _Facade,
    h: np.ndarray,
    size: tuple[int, int],
    clutter: list[list[_Shape]],
    min_visible: float,
    cover_target: float | None,
    below: bool,
) -> tuple[list[list[_Shape]], float]:
    """Fit the foreground to the view (clutter, and a large occluder when asked); returns it and the visible share.

    Clutter objects are dropped (last first) while they hide more than ``min_visible``
    allows. A cover is then bisected to leave ``cover_target`` of the landmark visible,
    ending just ``below`` it (junk: under 25% guaranteed) or just above it (hard views).
    """
    ss = (size[0] * _SUPERSAMPLE, size[1] * _SUPERSAMPLE)
    clutter = list(clutter)
    while True:
        mask = _mask([shape for thing in clutter for shape in thing], ss)
        visible = _visible_fraction(facade, h, size, mask)
        if visible >= min_visible or not clutter:
            break
        clutter.pop()
    if cover_target is None or visible <= cover_target:
        return clutter, visible
    cover = _cover(rng, facade, h, ss)

    def share(amount: float) -> float:
        return _visible_fraction(facade, h, size, mask | _mask(cover(amount), ss))

    lo, hi = 0.0, 1.0
    while share(hi) > cover_target and hi < 64:  # a cover past the landmark's box hides all of it
        hi *= 2
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) > cover_target else (lo, mid)
    amount = hi if below else lo
    return [*clutter, cover(amount)], share(amount)


def _draw_background(rng: np.random.Generator, size: tuple[int, int], horizon: float) -> Image.Image:
    """Sky, clouds, a distant skyline and the ground: one distribution for every photograph."""
    W, H = size
    top, low = _SKIES[int(rng.integers(len(_SKIES)))]
    t = np.linspace(0.0, 1.0, H)[:, None]
    gradient = (np.asarray(top, float) * (1 - t) + np.asarray(low, float) * t).astype(np.uint8)
    sky = np.broadcast_to(gradient[:, None, :], (H, W, 3))
    alpha = np.full((H, W, 1), 255, np.uint8)
    scene = Image.fromarray(np.concatenate([sky, alpha], axis=2), "RGBA")

    n_clouds = int(rng.integers(0, 5))
    if n_clouds:
        clouds = Image.new("RGBA", size, (0, 0, 0, 0))
        cdraw = ImageDraw.Draw(clouds)
        for _ in range(n_clouds):
            cx, cy = rng.uniform(0, W), rng.uniform(0, horizon * 0.7)
            shade = int(rng.integers(200, 256))
            for _ in range(int(rng.integers(3, 7))):
                rx, ry = W * rng.uniform(0.04, 0.12), H * rng.uniform(0.03, 0.07)
                ox, oy = rng.normal(0, W * 0.05), rng.normal(0, H * 0.02)
                cdraw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=(shade, shade, shade, 170))
        scene.alpha_composite(clouds.filter(ImageFilter.GaussianBlur(W / 120)))

    draw = ImageDraw.Draw(scene)
    haze = low
    for _ in range(int(rng.integers(1, 8))):  # distant buildings, in the landmarks' own palette
        bw, bh = W * rng.uniform(0.08, 0.3), H * rng.uniform(0.05, 0.35)
        bx = rng.uniform(-bw / 2, W - bw / 2)
        colour = _mix(_pick(rng, _STONE), haze, rng.uniform(0.2, 0.5))
        draw.rectangle([bx, horizon - bh, bx + bw, horizon], fill=colour)
        if rng.random() < 0.4:
            draw.polygon(
                [(bx, horizon - bh), (bx + bw / 2, horizon - bh - bw * 0.3), (bx + bw, horizon - bh)],
                fill=_mix(_pick(rng, _ROOF), haze, 0.3),
            )
        dot = max(2.0, W / 80)
        window = _shade(colour, 0.6)
        for y in np.arange(horizon - bh + dot * 1.5, horizon - dot, dot * 3):
            for x in np.arange(bx + dot, bx + bw - dot, dot * 2.5):
                draw.rectangle([x, y, x + dot, y + dot * 1.3], fill=window)
    for _ in range(int(rng.integers(0, 6))):  # distant trees
        r = H * rng.uniform(0.03, 0.09)
        cx = rng.uniform(0, W)
        draw.ellipse([cx - r, horizon - 1.6 * r, cx + r, horizon + 0.2 * r], fill=_mix(_pick(rng, _GREENS), haze, 0.25))

    ground = _jitter(rng, _pick(rng, _GROUND), 10)
    draw.rectangle([0, horizon, W, H], fill=ground)
    pattern = rng.random()
    line = _shade(ground, 0.82)
    if pattern < 0.35:  # paving lines converging to a vanishing point
        vx = rng.uniform(0.2, 0.8) * W
        for x in np.linspace(-W, 2 * W, int(rng.integers(8, 16))):
            draw.line([vx + (x - vx) * 0.05, horizon, x, H], fill=line, width=max(1, W // 200))
    elif pattern < 0.7:  # cobbles
        for _ in range(int(60 * W * (H - horizon) / (W * H) + 10)):
            x, y = rng.uniform(0, W), rng.uniform(horizon, H)
            r = (y - horizon) / max(H - horizon, 1) * W * 0.012 + 1
            draw.ellipse([x - r, y - r * 0.6, x + r, y + r * 0.6], fill=_jitter(rng, line, 12))
    if rng.random() < 0.3:  # a road across the ground
        y0 = rng.uniform(horizon, H)
        draw.rectangle([0, y0, W, y0 + (H - horizon) * 0.25], fill=(70, 70, 74))
    return scene


_Shape = tuple[str, Any, tuple[int, int, int]]


def _person(rng: np.random.Generator, x: float, feet: float, height: float) -> list[_Shape]:
    skin, shirt, legs = _pick(rng, _SKIN), _pick(rng, _CLOTHES), _pick(rng, _CLOTHES)
    w = height * 0.26
    return [
        ("rect", [x - w * 0.35, feet - height * 0.45, x - w * 0.05, feet], legs),
        ("rect", [x + w * 0.05, feet - height * 0.45, x + w * 0.35, feet], legs),
        ("rect", [x - w / 2, feet - height * 0.82, x + w / 2, feet - height * 0.42], shirt),
        ("ellipse", [x - w * 0.33, feet - height, x + w * 0.33, feet - height * 0.8], skin),
    ]


def _tree(rng: np.random.Generator, x: float, base: float, height: float) -> list[_Shape]:
    shapes: list[_Shape] = [("rect", [x - height * 0.035, base - height * 0.5, x + height * 0.035, base], (88, 64, 44))]
    for _ in range(int(rng.integers(4, 8))):
        r = height * rng.uniform(0.14, 0.26)
        cx, cy = x + rng.normal(0, height * 0.12), base - height * rng.uniform(0.55, 0.8)
        shapes.append(("ellipse", [cx - r, cy - r, cx + r, cy + r], _jitter(rng, _pick(rng, _GREENS), 12)))
    return shapes


def _car(rng: np.random.Generator, x: float, base: float, length: float) -> list[_Shape]:
    body = _pick(rng, _CLOTHES)
    h = length * 0.3
    wheel = length * 0.11
    return [
        (
            "polygon",
            [
                (x - length * 0.3, base - h * 0.55),
                (x - length * 0.18, base - h),
                (x + length * 0.2, base - h),
                (x + length * 0.32, base - h * 0.55),
            ],
            _shade(body, 0.9),
        ),
        ("rect", [x - length / 2, base - h * 0.6, x + length / 2, base - wheel], body),
        ("ellipse", [x - length * 0.32 - wheel, base - 2 * wheel, x - length * 0.32 + wheel, base], (25, 25, 25)),
        ("ellipse", [x + length * 0.32 - wheel, base - 2 * wheel, x + length * 0.32 + wheel, base], (25, 25, 25)),
    ]


def _lamp(x: float, base: float, height: float) -> list[_Shape]:
    pole = max(1.0, height * 0.012)
    return [
        ("rect", [x - pole, base - height, x + pole, base], (40, 42, 46)),
        ("ellipse", [x - pole * 4, base - height - pole * 6, x + pole * 4, base - height + pole], (230, 220, 170)),
    ]


def _clutter(rng: np.random.Generator, spec: dict, size: tuple[int, int], horizon: float) -> list[list[_Shape]]:
    """People, trees, cars and lamp posts standing on the ground, larger when nearer."""
    W, H = size
    depth = max(H - horizon, H * 0.05)
    things: list[list[_Shape]] = []

    def foot() -> tuple[float, float]:
        y = rng.uniform(horizon + depth * 0.1, H + depth * 0.15)
        return y, 0.25 + 0.75 * (y - horizon) / depth

    if rng.random() < spec["trees"]:
        y, near = foot()
        things.append(_tree(rng, rng.uniform(0, W), y, H * rng.uniform(0.35, 0.7) * near))
    if rng.random() < spec["lamps"]:
        y, near = foot()
        things.append(_lamp(rng.uniform(0, W), y, H * 0.5 * near))
    if rng.random() < spec["cars"]:
        y, near = foot()
        things.append(_car(rng, rng.uniform(0, W), y, W * 0.35 * near))
    for _ in range(int(rng.integers(spec["people"][0], spec["people"][1] + 1))):
        y, near = foot()
        things.append(_person(rng, rng.uniform(0, W), y, H * 0.32 * near))
    return things


def _cover(rng: np.random.Generator, facade: _Facade, h: np.ndarray, size: tuple[int, int]):
    """A large foreground occluder (hoarding, bus or foliage) over ``amount`` of the landmark's box, from one side.

    Its randomness is drawn once, so that ``amount`` alone moves its leading edge: the
    visible fraction falls monotonically with ``amount`` (to zero from about 1) and can
    be bisected.
    """
    corners, _ = _apply(h, facade.corners)
    lo = np.clip(corners.min(axis=0) * _SUPERSAMPLE, 0, size)
    hi = np.clip(corners.max(axis=0) * _SUPERSAMPLE, 0, size)
    kind = str(rng.choice(["hoarding", "bus", "foliage"]))
    side = str(rng.choice(["left", "right", "bottom"]))
    colour = _pick(rng, _STONE if kind == "hoarding" else _CLOTHES)
    posters = [(rng.uniform(0.05, 0.8), rng.uniform(0.1, 0.6), _pick(rng, _ACCENT)) for _ in range(3)]
    blobs = [(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.12, 0.22), _pick(rng, _GREENS)) for _ in range(40)]
    W, H = size

    def shapes(amount: float) -> list[_Shape]:
        if amount <= 0:
            return []
        span = hi - lo
        if side == "left":
            box = [-1.0, lo[1] - span[1] * 0.1, lo[0] + span[0] * amount * 1.05, H + 1.0]
        elif side == "right":
            box = [hi[0] - span[0] * amount * 1.05, lo[1] - span[1] * 0.1, W + 1.0, H + 1.0]
        else:
            box = [-1.0, hi[1] - span[1] * amount * 1.05, W + 1.0, H + 1.0]
        x0, y0, x1, y1 = box
        bw, bh = x1 - x0, y1 - y0
        if kind == "foliage":
            # a solid core behind the leaves, short of the leading edge so that the leaves make it ragged
            core = {"left": [x0, y0, x1 - bw * 0.04, y1], "right": [x0 + bw * 0.04, y0, x1, y1]}
            out: list[_Shape] = [("rect", core.get(side, [x0, y0 + bh * 0.04, x1, y1]), _GREENS[2])]
            for u, v, r, green in blobs:
                cx, cy = x0 + u * bw, y0 + v * bh
                rad = r * min(bw, bh)
                out.append(("ellipse", [cx - rad, cy - rad, cx + rad, cy + rad], green))
            return out
        out = [("rect", box, colour)]
        if kind == "bus":
            for k in np.arange(x0 + bw * 0.03, x1 - bh * 0.1, max(bh * 0.3, 2.0)):
                out.append(("rect", [k, y0 + bh * 0.1, k + max(bh * 0.22, 1.5), y0 + bh * 0.4], (60, 80, 100)))
        else:
            for u, v, accent in posters:
                px0 = x0 + u * bw
                out.append(("rect", [px0, y0 + v * bh, px0 + bw * 0.15, y0 + v * bh + bh * 0.25], accent))
        return out

    return shapes


def _paint(draw: ImageDraw.ImageDraw, shapes: list[_Shape], fill: int | None = None) -> None:
    for kind, xy, colour in shapes:
        colour = colour if fill is None else fill
        if kind == "ellipse":
            draw.ellipse(xy, fill=colour)
        elif kind == "rect":
            draw.rectangle(xy, fill=colour)
        else:
            draw.polygon(xy, fill=colour)


def _mask(shapes: list[_Shape], size: tuple[int, int]) -> np.ndarray:
    """Boolean occlusion map (supersampled) of ``shapes``."""
    mask = Image.new("L", size, 0)
    _paint(ImageDraw.Draw(mask), shapes, fill=255)
    return np.asarray(mask) > 127


def _photometric(rng: np.random.Generator, image: Image.Image, amount: float, strong: bool) -> Image.Image:
    """Exposure, contrast, saturation, colour temperature, a light gradient, blur and sensor noise."""
    if strong:
        brightness = float(rng.choice([rng.uniform(0.45, 0.62), rng.uniform(1.4, 1.65)]))
        contrast, temperature, blur = rng.uniform(0.5, 0.75), rng.uniform(0.15, 0.28) * rng.choice([-1, 1]), 1.0
    else:
        brightness = 1 + rng.uniform(-0.25, 0.25) * amount
        contrast = 1 + rng.uniform(-0.25, 0.2) * amount
        temperature = rng.uniform(-0.12, 0.12) * amount
        blur = 0.0
    image = ImageEnhance.Brightness(image).enhance(brightness)
    image = ImageEnhance.Contrast(image).enhance(contrast)
    image = ImageEnhance.Color(image).enhance(1 + rng.uniform(-0.35, 0.3) * amount)
    if blur or rng.random() < 0.15 * amount:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    pixels = np.asarray(image, dtype=np.float32)
    gains = np.array([1 + temperature, 1 + temperature * 0.2, 1 - temperature], dtype=np.float32)
    H, W = pixels.shape[:2]
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    ramp = ((xs / W - 0.5) * math.cos(angle) + (ys / H - 0.5) * math.sin(angle)) * 2 * rng.uniform(0, 0.2) * amount
    pixels = pixels * gains * (1 + ramp[..., None])
    pixels += rng.normal(0.0, rng.uniform(0.5, 3.0), pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
