"""``oxford-ir-data check`` on small folders and manifests with planted problems: each named exactly once, exit 1;
a clean collection exits 0."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from oxford_ir.benchmarks.collection_check import check_collection
from oxford_ir.cli.data import main


def image(path: Path, shade: int) -> None:
    """A tiny PNG whose content differs with ``shade``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (shade, 0, 0)).save(path)


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    status = main(["check", *argv])
    return status, capsys.readouterr().out.splitlines()


def lines_with(output: list[str], text: str) -> list[str]:
    return [line for line in output if text in line]


def test_check_names_each_planted_problem_once(tmp_path: Path, capsys) -> None:
    root = tmp_path / "photos"
    for i, name in enumerate("abcd"):
        image(root / "cat" / f"{name}.png", 10 + i)
    image(root / "dog" / "e.png", 50)
    image(root / "dog" / "f.png", 51)
    (root / "dog" / "e_copy.png").write_bytes((root / "dog" / "e.png").read_bytes())  # a duplicate
    (root / "fish" / "a_again.png").parent.mkdir()
    (root / "fish" / "a_again.png").write_bytes((root / "cat" / "a.png").read_bytes())  # in two classes
    image(root / "fish" / "g.png", 90)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # undecodable
    (root / "cat" / "notes.txt").write_text("taken in 2019")
    status, out = run([str(root)], capsys)
    assert status == 1
    assert out[0] == f"{root}: 10 images, 3 classes (folder per class)"
    assert out[1] == "  images per class: min 2, median 3, max 5; smallest: 'fish' 2, 'dog' 3, 'cat' 5"
    assert out[2] == "  train: 10 images, 3 classes, 10 queries, 10 in the gallery"
    assert lines_with(out, "broken.jpg") == [
        f"  {root}/cat/broken.jpg: cannot read the image header; the file is corrupt or not an image"
    ]
    assert lines_with(out, "e_copy.png") == [
        f"  duplicate images of class 'dog': {root}/dog/e.png, {root}/dog/e_copy.png; keep one"
    ]
    assert lines_with(out, "a_again.png") == [
        f"  the same image is in two classes, 'cat' and 'fish': {root}/cat/a.png, {root}/fish/a_again.png; "
        "keep it in one class"
    ]
    assert lines_with(out, "notes.txt") == [f"  {root}/cat/notes.txt: not an image, ignored"]
    too_small = lines_with(out, "--images-per-class 4")
    end = "fewer than --images-per-class 4: the P x K sampler cannot draw 4 of it"
    assert too_small == [
        f"  class 'dog' has 3 training image(s), {end}",
        f"  class 'fish' has 2 training image(s), {end}",
    ]
    assert "problems (3):" in out and out[-1] == "3 problem(s): fix them (or drop those images) and check again"


def test_check_manifest_missing_file_and_path_under_two_labels(tmp_path: Path, capsys) -> None:
    for i, name in enumerate("abc"):
        image(tmp_path / f"{name}.png", i * 40)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\na.png,cat,train\nb.png,cat,train\ngone.png,cat,test\nc.png,dog,test\n"
                        "b.png,dog,test\n")  # fmt: skip
    status, out = run([str(manifest), "--images-per-class", "2"], capsys)
    assert status == 1
    assert out[0] == f"{manifest}: 4 images, 2 classes (manifest)"
    assert lines_with(out, "gone.png") == [f"  {manifest} line 4: gone.png: no such file ({tmp_path}/gone.png)"]
    assert lines_with(out, "two labels") == [
        f"  {manifest} line 6: b.png is listed under two labels: 'cat' (line 3) and 'dog'"
    ]
    assert lines_with(out, "--images-per-class") == []  # cat has 2 training images, K = 2
    assert "  test: 2 images, 2 classes, 2 queries, 2 in the gallery" in out


def test_check_clean_folder_exits_0(tmp_path: Path, capsys) -> None:
    for i in range(4):
        image(tmp_path / "train" / "cat" / f"{i}.png", i)
        image(tmp_path / "val" / "dog" / f"{i}.png", 100 + i)
    status, out = run([str(tmp_path)], capsys)
    assert status == 0, out
    assert out[-1] == "OK: no problems found" and not lines_with(out, "warnings")
    assert "  val: 4 images, 1 classes, 4 queries, 4 in the gallery" in out


def test_check_refuses_a_link_out_of_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    image(outside, 1)
    root = tmp_path / "photos"
    image(root / "cat" / "a.png", 2)
    os.symlink(outside, root / "cat" / "b.png")
    report = check_collection(root)
    assert report.problems == [f"{root}/cat/b.png: is a symbolic link to {outside}; the image must lie inside {root}"]


def test_check_of_an_unreadable_collection_is_one_error_line(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,class\na.png,cat\n")
    with pytest.raises(SystemExit) as caught:
        main(["check", str(manifest)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {manifest} line 1: no 'path' and no 'label' column")
