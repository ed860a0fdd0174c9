"""Users' own collections: a folder per class (with and without train/ val/ test/) and CSV manifests (ours and Open
Metric Learning's), every bad input as one line naming the manifest line, and the parse cache."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from oxford_ir.benchmarks import collection_manifest
from oxford_ir.benchmarks.collection_folder import read_folder, scan_folder
from oxford_ir.benchmarks.collection_manifest import cache_paths, load_manifest, read_manifest
from oxford_ir.errors import DataError

NAN = np.nan


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


# -- a folder per class --------------------------------------------------------------------------------------------
def test_folder_without_splits_every_image_is_train_query_and_gallery(tmp_path: Path) -> None:
    touch(tmp_path, "dog/c.JPG", "cat/sub/b.png", "cat/a.jpg", "cat/notes.txt", "cat/.hidden.jpg", "loose.jpg", "x.md")
    scan = scan_folder(tmp_path)
    c = scan.collection
    assert c.paths.tolist() == ["cat/a.jpg", "cat/sub/b.png", "dog/c.JPG"]
    assert c.label_names.tolist() == ["cat", "dog"]
    assert c.labels.tolist() == [0, 0, 1]
    assert c.split.tolist() == [0, 0, 0]
    assert c.is_query.all() and c.is_gallery.all() and np.isnan(c.boxes).all()
    assert c.root == tmp_path and c.source == tmp_path
    assert scan.ignored == ["cat/notes.txt", "x.md"]
    assert scan.unlabelled == ["loose.jpg"]


def test_folder_with_split_folders(tmp_path: Path) -> None:
    touch(tmp_path, "train/cat/a.jpg", "train/cat/b.jpg", "val/dog/c.jpg", "test/eel/deep/d.webp", "README.txt")
    c = read_folder(tmp_path)
    assert c.paths.tolist() == ["test/eel/deep/d.webp", "train/cat/a.jpg", "train/cat/b.jpg", "val/dog/c.jpg"]
    assert [c.label_names[i] for i in c.labels] == ["eel", "cat", "cat", "dog"]
    assert c.split.tolist() == [2, 0, 0, 1]
    assert scan_folder(tmp_path).ignored == ["README.txt"]


def test_folder_mixing_split_and_class_folders_is_one_line(tmp_path: Path) -> None:
    touch(tmp_path, "train/cat/a.jpg", "dog/b.jpg")
    with pytest.raises(DataError) as caught:
        read_folder(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path}: holds split folders (train) and the class folder 'dog'; move every class folder under "
        "train/, val/ or test/, or rename the split folders"
    )


def test_folder_without_class_folders_is_refused(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg")
    with pytest.raises(DataError, match="no images in class folders"):
        read_folder(tmp_path)


# -- CSV manifests -------------------------------------------------------------------------------------------------
FULL = (
    "path,label,split,is_query,is_gallery,x1,y1,x2,y2,ignore,notes\n"
    "a.jpg, cat ,train,1,yes,,,,,,first\n"
    "sub\\b.jpg,cat,validation,0,TRUE,1,2,30.5,40,a.jpg;./c d.jpg,\n"
    "\n"
    '"./c d.jpg",dog,test,no,false,0,0,5,5,,"quoted, with a comma"\n'
    "e.jpg,dog,val,,,,,,,,\n"
)


def test_manifest_with_every_optional_column(tmp_path: Path) -> None:
    parsed = load_manifest(write(tmp_path / "m.csv", FULL, bom=True), cache=False)
    c = parsed.collection
    assert c.paths.tolist() == ["a.jpg", "sub/b.jpg", "c d.jpg", "e.jpg"]
    assert c.label_names.tolist() == ["cat", "dog"]
    assert c.labels.tolist() == [0, 0, 1, 1]
    assert c.split.tolist() == [0, 1, 2, 1]
    assert c.is_query.tolist() == [True, False, False, True]
    assert c.is_gallery.tolist() == [True, True, False, True]
    np.testing.assert_array_equal(c.boxes, np.array([[NAN] * 4, [1, 2, 30.5, 40], [0, 0, 5, 5], [NAN] * 4], np.float32))
    assert list(c.ignore) == [1] and c.ignore[1].tolist() == [0, 2]
    assert parsed.lines.tolist() == [2, 3, 5, 6]  # the blank line 4 counts, as in an editor
    assert c.root == tmp_path and c.name == "m"


def test_open_metric_learning_csv_reads_unchanged(tmp_path: Path) -> None:
    # OML's column order and names: boxes as x_1, x_2, y_1, y_2; train rows leave is_query / is_gallery empty
    oml = (
        "label,path,split,is_query,is_gallery,x_1,x_2,y_1,y_2,category\n"
        "0,images/a.jpg,train,,,,,,,shoes\n"
        "0,images/b.jpg,train,,,,,,,shoes\n"
        "1,images/c.jpg,validation,True,False,10,20,30,40,bags\n"
        "1,images/d.jpg,validation,False,True,,,,,bags\n"
    )
    c = read_manifest(write(tmp_path / "df.csv", oml), cache=False)
    assert c.paths.tolist() == ["images/a.jpg", "images/b.jpg", "images/c.jpg", "images/d.jpg"]
    assert c.labels.tolist() == [0, 0, 1, 1] and c.label_names.tolist() == ["0", "1"]
    assert c.split.tolist() == [0, 0, 1, 1]
    assert c.is_query.tolist() == [True, True, True, False]
    assert c.is_gallery.tolist() == [True, True, False, True]
    np.testing.assert_array_equal(c.boxes[2], [10, 30, 20, 40])  # x1, y1, x2, y2
    assert np.isnan(c.boxes[[0, 1, 3]]).all()


def test_absolute_path_inside_the_root_is_made_relative(tmp_path: Path) -> None:
    images = tmp_path / "images"
    manifest = write(tmp_path / "m.csv", f"path,label\n{images}/x/a.jpg,cat\nb.jpg,cat\n")
    c = read_manifest(manifest, root=images, cache=False)
    assert c.paths.tolist() == ["x/a.jpg", "b.jpg"] and c.root == images


BAD = {
    "no label column": (
        "path,class\na.jpg,cat\n",
        "line 1: no 'label' column; the header must name path and label (optional: split, is_query, is_gallery, "
        "x1 y1 x2 y2 or OML's x_1 y_1 x_2 y_2, ignore)",
    ),
    "empty label": ("path,label\na.jpg,cat\nb.jpg, \n", "line 3: empty label for b.jpg; give every image its class"),
    "escaping path": (
        "path,label\nx/../../a.jpg,cat\n",
        "line 2: path 'x/../../a.jpg' climbs out of its folder with '..'",
    ),
    "absolute outside": (
        "path,label\n/etc/passwd,cat\n",
        "line 2: path '/etc/passwd' is an absolute path outside the root; give it relative to the manifest's folder",
    ),
    "duplicate row": (
        "path,label\na.jpg,cat\nb.jpg,cat\n./a.jpg,cat\n",
        "line 4: a.jpg is listed twice (lines 2 and 4); keep one row",
    ),
    "path under two labels": (
        "path,label\na.jpg,cat\na.jpg,dog\n",
        "line 3: a.jpg is listed under two labels: 'cat' (line 2) and 'dog'",
    ),
    "bad boolean": (
        "path,label,is_query\na.jpg,cat,maybe\n",
        "line 2: is_query 'maybe' is not 0/1, true/false or yes/no",
    ),
    "bad split": ("path,label,split\na.jpg,cat,dev\n", "line 2: split 'dev' is not train, val, validation or test"),
    "partial box": (
        "path,label,x1,y1,x2,y2\na.jpg,cat,1,2,,\n",
        "line 2: box 1, 2, ,  is not x1, y1, x2, y2 with 0 <= x1 < x2, 0 <= y1 < y2",
    ),
    "unknown ignore": (
        "path,label,ignore\na.jpg,cat,z.jpg\n",
        "line 2: ignore lists 'z.jpg', which no row of the manifest lists",
    ),
    "field count": (
        "path,label\na.jpg,cat\nb,c.jpg,dog\n",
        "line 3: 3 fields for the 2 columns of the header; quote fields with commas",
    ),
    "box columns incomplete": (
        "path,label,x1,y1\na.jpg,cat,1,2\n",
        "line 1: a box needs x1, y1, x2, y2 (or x_1 ...); x2, y2 missing",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_manifest_is_one_line_naming_the_line(tmp_path: Path, case: str) -> None:
    text, message = BAD[case]
    manifest = write(tmp_path / "m.csv", text)
    with pytest.raises(DataError) as caught:
        read_manifest(manifest)
    assert str(caught.value) == f"{manifest} {message}"
    assert not cache_paths(manifest, tmp_path / "cache")[0].exists()  # nothing half-parsed is cached


def test_lenient_parse_collects_every_row_problem_and_keeps_the_rest(tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.csv", "path,label\na.jpg,cat\nb.jpg,\na.jpg,dog\nc.jpg,dog\n")
    parsed = load_manifest(manifest, strict=False)
    assert parsed.collection.paths.tolist() == ["a.jpg", "c.jpg"]
    assert parsed.problems == [
        f"{manifest} line 3: empty label for b.jpg; give every image its class",
        f"{manifest} line 4: a.jpg is listed under two labels: 'cat' (line 2) and 'dog'",
    ]
    assert not cache_paths(manifest)[0].exists()


def test_single_image_class_in_train_is_a_warning_naming_it(tmp_path: Path, caplog) -> None:
    manifest = write(tmp_path / "m.csv", "path,label,split\na.jpg,cat,train\nb.jpg,cat,train\nc.jpg,solo,train\n"
                     "d.jpg,lone,test\n")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        read_manifest(manifest, cache=False)
    assert [r.getMessage() for r in caplog.records] == [
        f"{manifest}: 1 class(es) have a single image in the train split: 'solo' (line 4); training draws no "
        "positive for them: add images or move them to val/test"
    ]


# -- the parse cache -----------------------------------------------------------------------------------------------
def test_cache_is_reused_and_refreshed_when_the_manifest_changes(tmp_path: Path, monkeypatch) -> None:
    manifest = write(tmp_path / "m.csv", FULL)
    first = read_manifest(manifest)
    assert (tmp_path / ".m.csv.parsed.npz").is_file()

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed again although the cache is up to date")

    real_parse = collection_manifest.parse_manifest
    monkeypatch.setattr(collection_manifest, "parse_manifest", no_parse)
    again = read_manifest(manifest)
    for column in ("paths", "labels", "label_names", "split", "is_query", "is_gallery", "boxes"):
        np.testing.assert_array_equal(getattr(again, column), getattr(first, column))
    assert again.paths.dtype.kind == "U" and {k: v.tolist() for k, v in again.ignore.items()} == {1: [0, 2]}

    calls = []
    monkeypatch.setattr(collection_manifest, "parse_manifest", lambda *a, **k: calls.append(1) or real_parse(*a, **k))
    write(manifest, FULL + "f.jpg,eel,test,,,,,,,,\n")
    os.utime(manifest, ns=(1, 1))  # a different mtime whatever the clock's resolution
    changed = read_manifest(manifest)
    assert calls == [1] and changed.paths.tolist()[-1] == "f.jpg"
    assert read_manifest(manifest).paths.tolist()[-1] == "f.jpg" and calls == [1]  # the new parse was cached


def test_cache_of_non_ascii_paths_round_trips(tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.csv", "path,label\nkölner_dom/1.jpg,köln\n東京/2.jpg,東京\n")
    read_manifest(manifest)
    c = read_manifest(manifest)
    assert c.paths.tolist() == ["kölner_dom/1.jpg", "東京/2.jpg"] and c.label_names.tolist() == ["köln", "東京"]


def test_damaged_cache_is_parsed_again(tmp_path: Path) -> None:
    manifest = write(tmp_path / "m.csv", "path,label\na.jpg,cat\n")
    read_manifest(manifest)
    (tmp_path / ".m.csv.parsed.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert read_manifest(manifest).paths.tolist() == ["a.jpg"]
    assert np.load(tmp_path / ".m.csv.parsed.npz")["paths"].tolist() == [b"a.jpg"]  # replaced by a good one


def test_cache_goes_to_the_cache_dir_when_the_folder_is_read_only(tmp_path: Path, monkeypatch) -> None:
    manifest = write(tmp_path / "m.csv", "path,label\na.jpg,cat\n")
    real_replace = collection_manifest.replace_file

    def read_only_beside(path: Path, data: bytes, temp: Path) -> None:
        if path.parent == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_replace(path, data, temp=temp)

    monkeypatch.setattr(collection_manifest, "replace_file", read_only_beside)
    read_manifest(manifest, cache_dir=tmp_path / "cache")
    beside, elsewhere = cache_paths(manifest, tmp_path / "cache")
    assert not beside.exists() and elsewhere.is_file()
    monkeypatch.setattr(collection_manifest, "parse_manifest", None)  # would fail if called
    assert read_manifest(manifest, cache_dir=tmp_path / "cache").paths.tolist() == ["a.jpg"]


def test_manifest_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("path,label\nk\xf6ln.jpg,k\xf6ln\n".encode("latin-1"))
    with pytest.raises(DataError) as caught:
        read_manifest(manifest)
    assert str(caught.value) == f"{manifest}: not UTF-8 text; save the manifest as UTF-8"


def test_parquet_manifest_reads_as_its_csv(tmp_path: Path) -> None:
    """OML's table as Parquet with its native types (integer labels, booleans, float boxes, nulls) gives the same
    collection as the CSV; a bad row names its line (row + 1); the parse is cached like a CSV's."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from oxford_ir.benchmarks.collection_manifest import load_manifest

    table = {
        "label": [0, 0, 1, 1],
        "path": ["images/a.jpg", "images/b.jpg", "images/c.jpg", "images/d.jpg"],
        "split": ["train", "train", "validation", "validation"],
        "is_query": [None, None, True, False],
        "is_gallery": [None, None, False, True],
        "x_1": [None, None, 10.0, None], "x_2": [None, None, 20.0, None],
        "y_1": [None, None, 30.0, None], "y_2": [None, None, 40.0, None],
    }  # fmt: skip
    pq.write_table(pa.table(table), tmp_path / "df.parquet")
    csv_text = "label,path,split,is_query,is_gallery,x_1,x_2,y_1,y_2\n" + "".join(
        ",".join("" if table[k][i] is None else str(table[k][i]) for k in table) + "\n" for i in range(4)
    )
    expected = read_manifest(write(tmp_path / "df.csv", csv_text), cache=False)
    parsed = load_manifest(tmp_path / "df.parquet")
    got = parsed.collection
    for key in ("paths", "labels", "label_names", "split", "is_query", "is_gallery"):
        assert getattr(got, key).tolist() == getattr(expected, key).tolist(), key
    np.testing.assert_array_equal(got.boxes, expected.boxes)
    assert parsed.lines.tolist() == [2, 3, 4, 5] and (tmp_path / ".df.parquet.parsed.npz").is_file()
    assert load_manifest(tmp_path / "df.parquet").collection.paths.tolist() == got.paths.tolist()  # from the cache
    table["path"][2] = "../outside.jpg"
    pq.write_table(pa.table(table), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet line 4: path '../outside.jpg'"):
        read_manifest(tmp_path / "bad.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1....PAR1")
    with pytest.raises(DataError, match=r"broken.parquet: not a readable Parquet file"):
        read_manifest(tmp_path / "broken.parquet")
