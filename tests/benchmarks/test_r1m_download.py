"""oxford-ir-data download r1m: any parts of revisitop's 1M distractors from a local server serving a miniature in
the published layout (revisitop1m.txt, jpg/revisitop1m.<k>.tar.gz), resumed, and checked against the sha256
recorded when each archive was first fetched."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oxford_ir.benchmarks.r1m import PARTS_FILE, download_r1m, parse_r1m_parts, part_name
from oxford_ir.cli.data import main as data_main
from oxford_ir.cli.evaluate import evaluate
from oxford_ir.errors import ConfigError, DownloadError
from tests.benchmarks.http_server import FileServer
from tests.test_evaluate import compose_eval

FAST = {"progress": False, "backoff": 0.0, "timeout": 5.0}
#: image names of the miniature per part, paths relative to jpg/ as in revisitop1m.txt
NAMES = {part: [f"{part}/{i:02d}/{part:03d}{i:02d}ab.jpg" for i in range(3)] for part in (1, 2, 3)}


def miniature() -> dict[str, bytes]:
    """The served files: the list and three archives of tiny JPEGs."""
    rng = np.random.default_rng(0)
    files = {"revisitop1m.txt": "".join(f"{n}\n" for names in NAMES.values() for n in names).encode()}
    for part, names in NAMES.items():
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for name in names:
                image = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(image, "JPEG")
                info = tarfile.TarInfo(name)
                info.size = len(image.getvalue())
                tar.addfile(info, io.BytesIO(image.getvalue()))
        files[f"jpg/{part_name(part)}"] = buffer.getvalue()
    return files


def on_disk(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder / "jpg").as_posix() for p in (folder / "jpg").rglob("*.jpg"))


def test_parts_lists() -> None:
    assert parse_r1m_parts("1-3,7") == [1, 2, 3, 7] and parse_r1m_parts(None) == list(range(1, 101))
    for bad in ("0", "101", "3-1", "a", ""):
        with pytest.raises(ConfigError, match="expected numbers and ranges from 1 to 100"):
            parse_r1m_parts(bad)


def test_download_parts_then_more_records_and_checks_sha256(server: FileServer, tmp_path: Path) -> None:
    server.files.update(miniature())
    server.behaviour["jpg/revisitop1m.3.tar.gz"] = "truncate_once"
    folder = download_r1m(tmp_path, [1, 3], base_url=server.url, **FAST)
    assert folder == tmp_path / "revisitop1m" and server.count("jpg/revisitop1m.2.tar.gz") == 0
    assert on_disk(folder) == sorted(NAMES[1] + NAMES[3])
    ranges = server.ranges("jpg/revisitop1m.3.tar.gz")  # the cut transfer resumed where it stopped
    assert len(ranges) == 2 and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    record = json.loads((folder / PARTS_FILE).read_text())
    for part in (1, 3):
        served = server.files[f"jpg/{part_name(part)}"]
        entry = record["parts"][str(part)]
        assert entry["sha256"] == hashlib.sha256(served).hexdigest() and entry["state"] == "extracted"
        assert entry["size"] == len(served) and entry["extracted_files"] == 3 and entry["unlisted_files"] == 0
    assert record["list"]["sha256"] == hashlib.sha256(server.files["revisitop1m.txt"]).hexdigest()
    assert not list(folder.glob("*.tar.gz"))  # archives deleted once extracted

    requests = len(server.requests)
    download_r1m(tmp_path, [1, 3], base_url=server.url, **FAST)  # nothing to do
    assert len(server.requests) == requests
    download_r1m(tmp_path, [2], base_url=server.url, **FAST)
    assert on_disk(folder) == sorted(n for names in NAMES.values() for n in names)
    assert server.count("jpg/revisitop1m.1.tar.gz") == 1 and server.count("jpg/revisitop1m.2.tar.gz") == 1


def test_files_the_list_does_not_name_are_counted_and_said(server: FileServer, tmp_path: Path, caplog) -> None:
    server.files.update(miniature())
    server.files["revisitop1m.txt"] = "".join(f"{n}\n" for n in NAMES[1][:2]).encode()  # a list without 1/02/...
    download_r1m(tmp_path, [1], base_url=server.url, **FAST)
    assert json.loads((tmp_path / "revisitop1m" / PARTS_FILE).read_text())["parts"]["1"]["unlisted_files"] == 1
    assert (
        f"r1m part 1: 1 of its 3 files are not named in {tmp_path / 'revisitop1m' / 'revisitop1m.txt'}" in caplog.text
    )


def test_a_kept_archive_is_checked_against_its_recorded_sha256(server: FileServer, tmp_path: Path) -> None:
    server.files.update(miniature())
    folder = download_r1m(tmp_path, [2], base_url=server.url, keep_archives=True, **FAST)
    archive = folder / part_name(2)
    record = json.loads((folder / PARTS_FILE).read_text())
    # as if killed while extracting, and the archive damaged since: fetched again, equal to the record, extracted
    record["parts"]["2"]["state"] = "fetched"
    (folder / PARTS_FILE).write_text(json.dumps(record))
    archive.write_bytes(b"damaged")
    download_r1m(tmp_path, [2], base_url=server.url, keep_archives=True, **FAST)
    assert server.count("jpg/revisitop1m.2.tar.gz") == 2 and archive.read_bytes() == server.files[f"jpg/{archive.name}"]
    # the server now serves other bytes than those recorded: refused, naming the file
    record["parts"]["2"]["state"] = "fetched"
    (folder / PARTS_FILE).write_text(json.dumps(record))
    archive.unlink()
    server.files[f"jpg/{archive.name}"] = b"another file"
    with pytest.raises(DownloadError, match=r"checksum mismatch for revisitop1m.2.tar.gz from .*expected sha256"):
        download_r1m(tmp_path, [2], base_url=server.url, **FAST)


def test_cli_download_then_evaluate_with_the_parts_there(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    server.files.update(miniature())
    data = tmp_path / "data"
    argv = ["download", "r1m", "--root", str(data), "--base-url", server.url, "--parts", "1-2", "--no-progress"]
    assert data_main([*argv, "--timeout", "5"]) == 0
    assert f"r1m: parts 1-2 extracted in {data / 'revisitop1m'} (2 of 100 parts there)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_status:
        data_main(["download", "r1m", "--root", str(data), "--parts", "0-3"])
    assert exit_status.value.code == 2 and "r1m parts '0-3': expected numbers" in capsys.readouterr().err

    evaluate(compose_eval(tmp_path, "backbone=raw_pixels", "pooling=flatten", "benchmarks=[rsynthetic+r1m]"))
    out = capsys.readouterr().out
    assert "* rsynthetic+r1m: + 6 of the 9 R1M distractors (a subset: not comparable with published +R1M)" in out
