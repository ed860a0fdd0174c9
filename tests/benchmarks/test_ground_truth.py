"""Ground-truth readers: the published forms agree on real data, pickles cannot run code, bad files fail clearly."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import struct
import subprocess
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from oxford_ir.benchmarks.gnd_pickle import derive_query_landmarks, load_pickle_safely, name_stem, read_gnd_pickle
from oxford_ir.benchmarks.ground_truth import read_ground_truth, read_image_list
from oxford_ir.benchmarks.gt_record import GroundTruth
from oxford_ir.benchmarks.gt_text_files import read_gt_files
from oxford_ir.benchmarks.landmark_json import read_landmark_json
from oxford_ir.errors import DataError, GroundTruthError, UnsafePickleError


@cache
def _pickle(path: str) -> GroundTruth:
    return read_gnd_pickle(path)


@cache
def _oxford_text(root: str) -> GroundTruth:
    imlist, source = read_image_list(root)
    return read_gt_files(Path(root) / "gt_files_170407", imlist, source)


def _assert_same_queries(a: GroundTruth, b: GroundTruth, *, boxes: bool = True) -> None:
    assert a.imlist == b.imlist
    assert a.qimlist == b.qimlist
    for q, (ga, gb) in enumerate(zip(a.gnd, b.gnd, strict=True)):
        assert set(ga["ok"].tolist()) == set(gb["ok"].tolist()), a.qimlist[q]
        assert set(ga["junk"].tolist()) == set(gb["junk"].tolist()), a.qimlist[q]
        if boxes:
            assert ga["bbx"] == pytest.approx(gb["bbx"]), a.qimlist[q]


# -- real data ----------------------------------------------------------------------------------------


def test_gt_text_files_equal_the_oxford_pickle_query_by_query(oxford_root: Path) -> None:
    text = _oxford_text(str(oxford_root))
    pkl = _pickle(str(oxford_root / "gnd_oxford5k.pkl"))
    assert text.protocol == pkl.protocol == "original"
    assert len(text.qimlist) == 55 and len(text.imlist) == 5063
    _assert_same_queries(text, pkl)
    assert text.qimlist[:2] == ["all_souls_000013", "all_souls_000026"]  # oxc1_ prefix stripped
    assert text.gnd[0]["bbx"] == [136.5, 34.1, 648.5, 955.7]
    for entry in text.gnd + pkl.gnd:
        for key in ("ok", "junk"):
            assert entry[key].dtype == np.int64
            assert np.all(np.diff(entry[key]) > 0)  # sorted, no duplicates


def test_duplicate_line_in_published_good_file_is_harmless(oxford_root: Path) -> None:
    folder = oxford_root / "gt_files_170407"
    good = (folder / "all_souls_1_good.txt").read_text().split()
    ok = (folder / "all_souls_1_ok.txt").read_text().split()
    assert Counter(good)["all_souls_000091"] == 2
    text = _oxford_text(str(oxford_root))
    assert len(text.gnd[0]["ok"]) == len(set(good + ok)) == len(good) + len(ok) - 1
    assert sorted(text.imlist[i] for i in text.gnd[0]["ok"]) == sorted(set(good + ok))


def test_landmark_json_equals_gt_text_files(oxford_root: Path) -> None:
    imlist, source = read_image_list(oxford_root)
    from_json = read_landmark_json(oxford_root / "groundtruth.json", imlist, source)
    text = _oxford_text(str(oxford_root))
    _assert_same_queries(from_json, text, boxes=False)
    assert from_json.query_landmarks == text.query_landmarks
    assert all(entry["bbx"] is None for entry in from_json.gnd)  # the published JSON has no boxes


def test_landmarks_derived_from_oxford_pickle_match_the_text_files(oxford_root: Path) -> None:
    text = _oxford_text(str(oxford_root))
    pkl = _pickle(str(oxford_root / "gnd_oxford5k.pkl"))
    assert pkl.query_landmarks == text.query_landmarks
    assert Counter(pkl.query_landmarks) == {landmark: 5 for landmark in set(text.query_landmarks)}
    assert len(set(pkl.query_landmarks)) == 11


@pytest.mark.parametrize(
    ("dataset", "stem", "n_db", "n_queries"),
    [
        ("oxford5k", "gnd_roxford5k", 4993, 70),
        ("paris6k", "gnd_rparis6k", 6322, 70),
        ("paris6k", "gnd_paris6k", 6392, 55),
    ],
)
def test_real_pickle_shapes(
    oxford_root: Path, paris_root: Path, dataset: str, stem: str, n_db: int, n_queries: int
) -> None:
    root = oxford_root if dataset == "oxford5k" else paris_root
    truth = _pickle(str(root / f"{stem}.pkl"))
    assert (len(truth.imlist), len(truth.qimlist), len(truth.gnd)) == (n_db, n_queries, n_queries)
    keys = {"bbx", "easy", "hard", "junk"} if stem.startswith("gnd_r") else {"bbx", "ok", "junk"}
    assert truth.protocol == ("revisited" if stem.startswith("gnd_r") else "original")
    for entry in truth.gnd:
        assert set(entry) == keys
        assert len(entry["bbx"]) == 4 and all(isinstance(v, float) for v in entry["bbx"])
        for key in keys - {"bbx"}:
            assert entry[key].dtype == np.int64 and (entry[key].size == 0 or entry[key].max() < n_db)
    # 11 landmarks; the 15 queries Revisited added go to 5 of them (3 each)
    counts = sorted(Counter(truth.query_landmarks).values())
    assert len(counts) == 11
    assert counts == ([5] * 6 + [8] * 5 if n_queries == 70 else [5] * 11)


def test_paris_pickle_landmarks_use_landmark_stems_not_general(paris_root: Path) -> None:
    truth = _pickle(str(paris_root / "gnd_paris6k.pkl"))
    # the Eiffel queries are mostly named paris_general_*; the last triomphe query is paris_defense_000038
    assert truth.query_landmarks[5:10] == ["eiffel"] * 5
    assert truth.qimlist[54] == "paris_defense_000038" and truth.query_landmarks[54] == "triomphe"
    assert sorted(set(truth.query_landmarks)) == [
        "defense", "eiffel", "invalides", "louvre", "moulinrouge", "museedorsay",
        "notredame", "pantheon", "pompidou", "sacrecoeur", "triomphe",
    ]  # fmt: skip


# -- tiny self-contained ground truth -----------------------------------------------------------------

IMLIST = [f"tower_{i:06d}" for i in range(6)] + [f"bridge_{i:06d}" for i in range(6)]


def _write_gt(folder: Path, landmark: str, n: int, query: str, good=(), ok=(), junk=()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{landmark}_{n}_query.txt").write_text(query + "\n")
    for kind, names in (("good", good), ("ok", ok), ("junk", junk)):
        (folder / f"{landmark}_{n}_{kind}.txt").write_text("".join(f"{name}\n" for name in names))


def test_tiny_gt_files_order_dedup_and_prefix(tmp_path: Path) -> None:
    folder = tmp_path / "gt"
    # n=10 must come after n=2 (numeric, not lexicographic); the tower files repeat a name and overlap good/ok
    _write_gt(folder, "tower", 10, "oxc1_tower_000003 1 2 30 40", good=["tower_000000"], junk=["bridge_000005"])
    _write_gt(
        folder, "tower", 2, "tower_000001 0 0 5.5 6", ["tower_000000", "tower_000002", "tower_000000"], ["tower_000002"]
    )
    _write_gt(folder, "bridge", 1, "bridge_000001.jpg 1 1 2 2", good=["bridge_000000.jpg"], ok=["bridge_000002"])
    (folder / "README").write_text("not a gt file\n")
    truth = read_gt_files(folder, IMLIST)
    assert truth.qimlist == ["bridge_000001", "tower_000001", "tower_000003"]
    assert truth.query_landmarks == ["bridge", "tower", "tower"]
    assert truth.gnd[0]["ok"].tolist() == [6, 8]
    assert truth.gnd[1]["ok"].tolist() == [0, 2]
    assert truth.gnd[1]["junk"].tolist() == []
    assert truth.gnd[2]["junk"].tolist() == [11]
    assert truth.gnd[1]["bbx"] == [0.0, 0.0, 5.5, 6.0]
    assert all(e["ok"].dtype == np.int64 and e["junk"].dtype == np.int64 for e in truth.gnd)


def test_gt_name_outside_image_list_names_file_and_image(tmp_path: Path) -> None:
    folder = tmp_path / "gt"
    _write_gt(folder, "tower", 1, "tower_000001 0 0 5 5", good=["tower_000000"], ok=["castle_000001"])
    with pytest.raises(GroundTruthError) as error:
        read_gt_files(folder, IMLIST, "imlist.txt")
    message = str(error.value)
    assert "tower_1_ok.txt" in message and "castle_000001" in message and "imlist.txt" in message


@pytest.mark.parametrize(
    ("query_line", "expected"),
    [
        ("tower_000001 0 0 five 5", "not numeric"),
        ("tower_000001 0 0 5", "x1 y1 x2 y2"),
        ("tower_000001 5 0 1 5", "empty"),
    ],
)
def test_malformed_query_file(tmp_path: Path, query_line: str, expected: str) -> None:
    _write_gt(tmp_path, "tower", 1, query_line, good=["tower_000000"])
    with pytest.raises(GroundTruthError, match=expected) as error:
        read_gt_files(tmp_path, IMLIST)
    assert "tower_1_query.txt" in str(error.value)


def test_missing_or_unreadable_list_file(tmp_path: Path) -> None:
    _write_gt(tmp_path, "tower", 1, "tower_000001 0 0 5 5", good=["tower_000000"])
    (tmp_path / "tower_1_junk.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(GroundTruthError, match="tower_1_junk.txt.*not a UTF-8"):
        read_gt_files(tmp_path, IMLIST)
    (tmp_path / "tower_1_junk.txt").unlink()
    with pytest.raises(GroundTruthError, match="tower_1_junk.txt.*not found"):
        read_gt_files(tmp_path, IMLIST)


def test_folder_without_query_files(tmp_path: Path) -> None:
    with pytest.raises(GroundTruthError, match="no <landmark>_<n>_query.txt") as error:
        read_gt_files(tmp_path, IMLIST)
    assert str(tmp_path) in str(error.value)


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_landmark_json_query_forms_and_shared_positives(tmp_path: Path) -> None:
    data = {
        "tower": {
            "good": ["tower_000000.jpg", "tower_000000.jpg"],
            "ok": ["tower_000002.jpg"],
            "junk": ["tower_000005.jpg"],
            "query": ["tower_000001.jpg", "tower_000003.jpg 1 2 3 4"],
        },
        "bridge": {
            "good": ["bridge_000000"],
            "ok": [],
            "junk": [],
            "query": [{"name": "bridge_000001", "bbx": [0, 0, 9, 9]}],
        },
    }
    truth = read_landmark_json(_write_json(tmp_path / "gt.json", data), IMLIST)
    assert truth.qimlist == ["bridge_000001", "tower_000001", "tower_000003"]
    assert truth.query_landmarks == ["bridge", "tower", "tower"]
    assert [e["bbx"] for e in truth.gnd] == [[0.0, 0.0, 9.0, 9.0], None, [1.0, 2.0, 3.0, 4.0]]
    assert truth.gnd[1]["ok"].tolist() == truth.gnd[2]["ok"].tolist() == [0, 2]
    assert truth.gnd[2]["junk"].tolist() == [5]
    truth.gnd[1]["ok"][0] = 99  # entries do not share arrays
    assert truth.gnd[2]["ok"][0] == 0


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"tower": {"good": [', "invalid JSON at line 1"),
        ("[1, 2]", "expected an object"),
        ({"note": "coverage", "images": []}, "landmark 'images' is a list"),
        ({"tower": {"good": [], "ok": [], "query": ["tower_000001"]}}, "no 'junk' list"),
        (
            {"tower": {"good": [], "ok": [], "junk": [], "query": [{"name": "tower_000001", "bbx": ["a", 0, 1, 1]}]}},
            "not numeric",
        ),
        ({"tower": {"good": [], "ok": [], "junk": [], "query": [17]}}, "query entry 17"),
        ({"tower": {"good": ["nowhere_000001"], "ok": [], "junk": [], "query": ["tower_000001"]}}, "nowhere_000001"),
    ],
)
def test_malformed_json_names_the_file(tmp_path: Path, content, expected: str) -> None:
    path = _write_json(tmp_path / "broken.json", content)
    with pytest.raises(GroundTruthError, match=expected) as error:
        read_landmark_json(path, IMLIST)
    assert str(path) in str(error.value)


# -- pickles -----------------------------------------------------------------------------------------


def _gnd_dict(protocol: str = "original", index=list, bbx=lambda b: b) -> dict:
    keys = {"original": {"ok": [0, 2, 2], "junk": [5]}, "revisited": {"easy": [0], "hard": [2], "junk": [5]}}[protocol]
    second = {k: [7] for k in keys}
    return {
        "imlist": list(IMLIST),
        "qimlist": ["tower_000001", "bridge_000001"],
        "qidx": [1, 7],
        "gnd": [
            {"bbx": bbx([1, 2, 30.5, 40]), **{k: index(v) for k, v in keys.items()}},
            {**{k: index(v) for k, v in second.items()}},  # no bbx: whole image
        ],
    }


@pytest.mark.parametrize("protocol", ["original", "revisited"])
@pytest.mark.parametrize("pickle_protocol", [2, 3, 4, 5])
def test_pickle_with_numpy_arrays_loads(tmp_path: Path, protocol: str, pickle_protocol: int) -> None:
    data = _gnd_dict(protocol, index=lambda v: np.asarray(v, dtype=np.int32), bbx=lambda b: np.asarray(b, np.float32))
    data["gnd"][1]["junk"] = [np.int64(8)]  # a list of numpy scalars
    path = tmp_path / "gnd_tiny.pkl"
    path.write_bytes(pickle.dumps(data, protocol=pickle_protocol))
    truth = read_gnd_pickle(path)
    assert truth.protocol == protocol
    assert truth.qimlist == ["tower_000001", "bridge_000001"]
    assert truth.gnd[0]["bbx"] == [1.0, 2.0, 30.5, 40.0]
    assert truth.gnd[1]["bbx"] is None
    assert truth.gnd[1]["junk"].tolist() == [8]
    positives = (
        truth.gnd[0]["ok"] if protocol == "original" else np.concatenate([truth.gnd[0]["easy"], truth.gnd[0]["hard"]])
    )
    assert positives.tolist() == [0, 2]
    assert all(v.dtype == np.int64 for e in truth.gnd for k, v in e.items() if k != "bbx")
    assert truth.query_landmarks == ["tower", "bridge"]


def _py2_pickle(obj) -> bytes:
    """``obj`` as Python 2 wrote it (protocol 2): str as byte strings, arrays as numpy 1.x on Python 2 did."""
    out = bytearray(b"\x80\x02")

    def byte_string(raw: bytes) -> None:  # SHORT_BINSTRING / BINSTRING: a Python 2 str
        out.extend(b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<i", len(raw)) + raw)

    def emit(o) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for key, value in o.items():
                emit(key)
                emit(value)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for value in o:
                emit(value)
            out.extend(b"e")
        elif isinstance(o, str):
            byte_string(o.encode("latin-1"))
        elif isinstance(o, float):
            out.extend(b"G" + struct.pack(">d", o))
        elif isinstance(o, int):
            out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, np.ndarray):  # 1-D int64
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85")
            byte_string(b"b")
            out.extend(b"\x87R(K\x01J" + struct.pack("<i", len(o)) + b"\x85cnumpy\ndtype\n")
            byte_string(b"i8")
            out.extend(b"K\x00K\x01\x87R(K\x03")
            byte_string(b"<")
            out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            byte_string(o.astype("<i8").tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    emit(obj)
    return bytes(out + b".")


def test_python2_pickle_with_numpy_arrays(tmp_path: Path) -> None:
    data = _gnd_dict("original", index=lambda v: np.asarray(v, dtype=np.int64))
    data["imlist"][3] = "caf\xe9_000003"  # a non-ASCII byte in a Python 2 str
    path = tmp_path / "gnd_py2.pkl"
    path.write_bytes(_py2_pickle(data))
    with pytest.raises(UnicodeDecodeError):  # what a plain pickle.load does with it
        pickle.loads(path.read_bytes())
    truth = read_gnd_pickle(path)
    assert truth.imlist[3] == "caf\xe9_000003"
    assert truth.gnd[0]["ok"].tolist() == [0, 2] and truth.gnd[0]["junk"].tolist() == [5]
    assert truth.gnd[1]["ok"].tolist() == [7]
    assert truth.gnd[0]["bbx"] == [1.0, 2.0, 30.5, 40.0]


class _Exploit:
    def __init__(self, call, args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize(
    ("call", "refused"),
    [(os.system, "system"), (builtins.eval, "builtins.eval"), (subprocess.Popen, "subprocess.Popen")],
)
def test_unsafe_pickle_is_refused_without_running_code(tmp_path: Path, call, refused: str) -> None:
    marker = tmp_path / "pwned"
    args = {
        os.system: (f"touch {marker}",),
        builtins.eval: (f"__import__('pathlib').Path({str(marker)!r}).touch()",),
        subprocess.Popen: (["touch", str(marker)],),
    }[call]
    data = _gnd_dict()
    data["gnd"][1]["junk"] = [_Exploit(call, args)]  # hidden deep inside plain data
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(UnsafePickleError) as error:
        read_gnd_pickle(path)
    message = str(error.value)
    assert str(path) in message and refused in message and "nothing was executed" in message
    assert not marker.exists()
    # the exploit is real: an unrestricted load runs it
    if call is os.system:
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_unsafe_class_global_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gnd_class.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": Path("/etc")}))
    with pytest.raises(UnsafePickleError, match="pathlib"):
        load_pickle_safely(path)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda raw: raw[: len(raw) // 2], "truncated"),
        (lambda raw: b"\x00garbage" + raw, "not a readable pickle"),
        (lambda raw: pickle.dumps([1, 2, 3]), "expected a dict"),
        (lambda raw: pickle.dumps({"imlist": [], "gnd": []}), "missing key.*qimlist"),
    ],
)
def test_corrupt_pickle_names_the_file(tmp_path: Path, mutate, expected: str) -> None:
    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(mutate(pickle.dumps(_gnd_dict())))
    with pytest.raises(GroundTruthError, match=expected) as error:
        read_gnd_pickle(path)
    assert not isinstance(error.value, UnsafePickleError)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda d: d["gnd"][0].update(ok=[0, 12]),
            r"query 0 \('tower_000001'\) 'ok' index 12 is out of range.*12 names",
        ),
        (lambda d: d["gnd"][1].update(junk=[-1]), "index -1 is out of range"),
        (lambda d: d["gnd"][0].update(ok=["a"]), "integer indices"),
        (lambda d: d["gnd"][0].update(ok=[1.5]), "non-integer"),
        (lambda d: d["gnd"][0].update(bbx=[1, 2, "x", 4]), "not numeric"),
        (lambda d: d["gnd"][0].update(bbx=[1, 2, 3]), "four finite numbers"),
        (lambda d: d["gnd"].pop(), "2 names in 'qimlist' but 1 entries"),
        (lambda d: d["gnd"][1].pop("ok"), r"either 'ok'.*query 1 \('bridge_000001'\) has \['junk'\]"),
    ],
)
def test_inconsistent_pickle_contents(tmp_path: Path, edit, expected: str) -> None:
    data = _gnd_dict()
    edit(data)
    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(GroundTruthError, match=expected) as error:
        read_gnd_pickle(path)
    assert str(path) in str(error.value)


def test_missing_file_is_a_ground_truth_error(tmp_path: Path) -> None:
    for path in (tmp_path / "gnd_none.pkl", tmp_path / "none.json"):
        with pytest.raises(GroundTruthError, match="not found") as error:
            read_ground_truth(path)
        assert str(path) in str(error.value)
    with pytest.raises(GroundTruthError, match="unknown ground-truth form"):
        read_ground_truth(_write_json(tmp_path / "gt.csv", "a,b"))


def test_read_ground_truth_dispatches_on_form(tmp_path: Path) -> None:
    (tmp_path / "imlist.txt").write_text("\n".join(IMLIST) + "\n")
    _write_gt(tmp_path / "gt_files", "tower", 1, "tower_000001 0 0 5 5", good=["tower_000000"])
    _write_json(
        tmp_path / "gt.json", {"tower": {"good": ["tower_000000"], "ok": [], "junk": [], "query": ["tower_000001"]}}
    )
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(_gnd_dict()))
    text, from_json, pkl = (read_ground_truth(tmp_path / p) for p in ("gt_files", "gt.json", "gnd.pkl"))
    assert text.source == tmp_path / "gt_files" and from_json.source == tmp_path / "gt.json"
    assert text.imlist == from_json.imlist == pkl.imlist == IMLIST
    assert text.gnd[0]["ok"].tolist() == from_json.gnd[0]["ok"].tolist() == [0]


def test_image_list_falls_back_to_sorted_jpg_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no imlist.txt and no images"):
        read_image_list(tmp_path)
    (tmp_path / "jpg").mkdir()
    for name in ("b_000002.jpg", "a_000001.jpg", "notes.txt"):
        (tmp_path / "jpg" / name).write_bytes(b"")
    assert read_image_list(tmp_path) == (["a_000001", "b_000002"], tmp_path / "jpg")
    (tmp_path / "imlist.txt").write_text("z_000009\nb_000002.jpg\n\n")
    assert read_image_list(tmp_path) == (["z_000009", "b_000002"], tmp_path / "imlist.txt")


# -- landmark derivation ----------------------------------------------------------------------------


def test_derive_query_landmarks_components_and_names() -> None:
    qimlist = ["tower_000001", "oxford_000001", "bridge_000001", "tower_000050", "oxford_000009", "paris_arc_000003"]
    positives = [[0, 1, 2, 3], [0, 1, 2], [3, 4, 5, 6], [9], [7, 8], [10]]
    gnd = [{"ok": np.array(p)} for p in positives]
    # bridge shares image 3 with tower (Jaccard 1/7): not enough to merge two landmarks
    assert derive_query_landmarks(qimlist, gnd, "original") == [
        "tower",  # tower + oxford_000001 (Jaccard 3/4): the generic stem 'oxford' does not vote
        "tower",
        "bridge",
        "tower",  # disjoint positives but the same stem: one landmark
        "oxford_000009",  # no landmark stem at all: named after its query
        "arc",
    ]
    revisited = [{"easy": np.array(p[:1]), "hard": np.array(p[1:])} for p in positives]
    assert derive_query_landmarks(qimlist, revisited, "revisited") == derive_query_landmarks(qimlist, gnd, "original")
    assert name_stem("paris_defense_000605") == "defense" and name_stem("all_souls_000013") == "all_souls"


def test_every_real_oxford_and_paris_name_is_accepted(oxford_root: Path, paris_root: Path) -> None:
    """The containment rule refuses no published name (all_souls_000013, paris_defense_000605, ...): every form of
    the real ground truth reads in full."""
    for pickle_path in [*oxford_root.glob("gnd_*.pkl"), *paris_root.glob("gnd_*.pkl")]:
        truth = read_gnd_pickle(pickle_path)
        assert len(truth.imlist) > 4900 and len(truth.qimlist) in (55, 70), pickle_path
    text = _oxford_text(str(oxford_root))
    assert len(text.qimlist) == 55 and "all_souls_000013" in text.imlist


# -- hostile files: every error names the file, the line or position, and what is expected ------------------


@pytest.mark.parametrize(
    ("kind", "lines", "expected"),
    [
        ("good", ["tower_000000", "tower_000002 0 0 4 4"], r"tower_1_good.txt:2: 'tower_000002 0 0 4 4' is not an"),
        ("ok", ["", "tower_000000", "castle_000009"], r"tower_1_ok.txt:3: image 'castle_000009' is not in imlist.txt"),
        ("junk", ["../../etc/passwd"], r"tower_1_junk.txt:1: '../../etc/passwd': not an image name: it climbs out"),
        ("junk", ["/etc/passwd"], r"tower_1_junk.txt:1: '/etc/passwd': not an image name: it is an absolute path"),
        ("ok", ["oxc1_..\\..\\x"], r"tower_1_ok.txt:1: 'oxc1_..\\\\..\\\\x': not an image name: it climbs out"),
    ],
)
def test_garbage_line_in_a_list_file_names_its_line(tmp_path: Path, kind: str, lines, expected: str) -> None:
    _write_gt(tmp_path, "tower", 1, "tower_000001 0 0 5 5", good=["tower_000000"])
    (tmp_path / f"tower_1_{kind}.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(GroundTruthError, match=expected):
        read_gt_files(tmp_path, IMLIST, "imlist.txt")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tower_000001 0 0 5 5\ntower_000002 0 0 5 5\n", r"tower_1_query.txt:2: unexpected second line"),
        ("\n\ntower_000001 0 0 5\n", r"tower_1_query.txt:3: 'tower_000001 0 0 5' is not one line '<image> x1 y1"),
        ("tower_000001 0 0 five 5\n", r"tower_1_query.txt: line 1 'tower_000001 0 0 five 5'.*not numeric"),
    ],
)
def test_malformed_query_file_names_its_line(tmp_path: Path, text: str, expected: str) -> None:
    _write_gt(tmp_path, "tower", 1, "tower_000001 0 0 5 5", good=["tower_000000"])
    (tmp_path / "tower_1_query.txt").write_text(text)
    with pytest.raises(GroundTruthError, match=expected):
        read_gt_files(tmp_path, IMLIST)


def test_query_outside_the_image_list_is_a_ground_truth_error(tmp_path: Path) -> None:
    """Before: the unknown query was accepted here and later reported as an image to download."""
    _write_gt(tmp_path, "tower", 1, "oxc1_tower_000099 0 0 5 5", good=["tower_000000"])
    with pytest.raises(GroundTruthError) as error:
        read_gt_files(tmp_path, IMLIST, "imlist.txt")
    message = str(error.value)
    assert "tower_1_query.txt:1: query image 'tower_000099' is not in imlist.txt (12 names)" in message
    assert "not a missing download" in message


@pytest.mark.parametrize(
    ("lists", "expected"),
    [
        ({"good": ["tower_000000.jpg", 7]}, r"landmark 'tower' 'good'\[1\] is 7; 'good' must list image names"),
        ({"junk": ["nowhere_000001.jpg"]}, r"landmark 'tower' 'junk'\[0\]: image 'nowhere_000001' is not in"),
        (
            {"query": ["tower_000001.jpg", "tower_000099.jpg"]},
            r"landmark 'tower' 'query'\[1\] names image 'tower_00009",
        ),
        ({"ok": ["sub/tower_000002.jpg"]}, r"landmark 'tower' 'ok'\[0\] 'sub/tower_000002.jpg': not an image name"),
        ({"junk": ["../../../etc/passwd"]}, r"'junk'\[0\] '../../../etc/passwd': not an image name: it climbs out"),
        ({"query": ["/etc/passwd.jpg"]}, r"'query'\[0\] '/etc/passwd.jpg': not an image name: it is an absolute"),
    ],
)
def test_bad_json_entry_names_its_key_and_position(tmp_path: Path, lists, expected: str) -> None:
    entry = {"good": ["tower_000000.jpg"], "ok": [], "junk": [], "query": ["tower_000001.jpg"], **lists}
    path = _write_json(tmp_path / "gt.json", {"tower": entry})
    with pytest.raises(GroundTruthError, match=expected) as error:
        read_landmark_json(path, IMLIST)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["qimlist"].__setitem__(1, 5), r"'qimlist'\[1\] is 5; 'qimlist' must list image names"),
        (lambda d: d["imlist"].__setitem__(3, "../x"), r"'imlist'\[3\] '../x': not an image name: it climbs out"),
        (
            lambda d: d["qimlist"].__setitem__(0, "/etc/passwd"),
            r"'qimlist'\[0\] '/etc/passwd': not an image name: it is",
        ),
        (lambda d: d["imlist"].__setitem__(4, "tower_000000"), r"'imlist'\[4\] = 'tower_000000' repeats 'imlist'\[0\]"),
        (lambda d: d["qimlist"].__setitem__(0, "castle_000001"), r"'qimlist'\[0\] = 'castle_000001' is not in the"),
    ],
)
def test_bad_pickle_entry_names_its_key_and_position(tmp_path: Path, edit, expected: str) -> None:
    data = _gnd_dict()
    edit(data)
    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(GroundTruthError, match=expected) as error:
        read_gnd_pickle(path)
    assert str(path) in str(error.value)


def test_revisited_pickle_queries_stay_outside_its_database(tmp_path: Path) -> None:
    """The revisited database leaves its queries out: a query name outside 'imlist' is right there."""
    data = _gnd_dict("revisited")
    data["qimlist"] = ["castle_000001", "castle_000002"]
    path = tmp_path / "gnd_rbad.pkl"
    path.write_bytes(pickle.dumps(data))
    assert read_gnd_pickle(path).qimlist == ["castle_000001", "castle_000002"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tower_000000\ntower_000001 extra\n", r"imlist.txt:2: 'tower_000001 extra' is not an image name"),
        (
            "tower_000000\n\ntower_000001\ntower_000000\n",
            r"imlist.txt:4: 'tower_000000' is listed again \(first on line 1",
        ),
    ],
)
def test_bad_image_list_names_its_line(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "imlist.txt").write_text(text)
    with pytest.raises(GroundTruthError, match=expected):
        read_image_list(tmp_path)
