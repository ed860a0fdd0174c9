"""The downloader end to end against a real HTTP server on 127.0.0.1 serving archives built here."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oxford_ir.benchmarks.archives import safe_extract
from oxford_ir.benchmarks.download import (
    COMPLETE_MARKER,
    STATE_FILE,
    Source,
    download_dataset,
    is_complete,
    load_sources,
)
from oxford_ir.benchmarks.http_fetch import fetch
from oxford_ir.errors import ConfigError, DownloadError
from tests.benchmarks.http_server import FileServer

REPO = Path(__file__).resolve().parents[2]
FAST = {"progress": False, "backoff": 0.0, "timeout": 5.0}


# -- tiny archives --------------------------------------------------------------------------------------


def jpeg_bytes(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def tgz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


IMAGES = {
    f"{landmark}_{i:06d}.jpg": jpeg_bytes(k)
    for k, (landmark, i) in enumerate([("all_souls", 1), ("all_souls", 2), ("radcliffe_camera", 7), ("oxford", 3)])
}
GT_TEXT = {
    "all_souls_1_query.txt": b"oxc1_all_souls_000001 10.0 12.0 20.0 22.0\n",
    "all_souls_1_good.txt": b"all_souls_000002\n",
    "all_souls_1_ok.txt": b"",
    "all_souls_1_junk.txt": b"oxford_000003\n",
}
GND = pickle.dumps({"imlist": [n[:-4] for n in IMAGES], "qimlist": ["all_souls_000001"], "gnd": []})


def fake_oxford(server: FileServer, tmp_path: Path, *, image_dirs: bool = True) -> Path:
    """Serve a miniature oxford5k (images nested in a folder, to exercise flattening) and write its sources file."""
    prefix = "oxbuild_images/" if image_dirs else ""
    server.files["images.tgz"] = tgz({prefix + name: data for name, data in IMAGES.items()})
    server.files["gt.tgz"] = tgz(GT_TEXT)
    server.files["gnd_oxford5k.pkl"] = GND
    sources = tmp_path / "sources.yaml"
    sources.write_text(
        "files:\n"
        f"  - {{url: {server.url}/images.tgz, filename: images.tgz, extract_to: jpg, flatten: true}}\n"
        f"  - {{url: {server.url}/gt.tgz, filename: gt.tgz, sha256: null, extract_to: gt_files_170407}}\n"
        f"  - {{url: {server.url}/gnd_oxford5k.pkl, filename: gnd_oxford5k.pkl}}\n"
    )
    return sources


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- whole datasets ---------------------------------------------------------------------------------


def test_download_builds_the_layout_and_marks_it_complete(server: FileServer, tmp_path: Path) -> None:
    sources = fake_oxford(server, tmp_path)
    folder = download_dataset("oxford5k", tmp_path / "data", sources, **FAST)

    assert folder == tmp_path / "data" / "oxford5k"
    assert tree(folder / "jpg") == IMAGES  # flattened out of oxbuild_images/, byte-identical
    assert tree(folder / "gt_files_170407") == GT_TEXT
    assert (folder / "gnd_oxford5k.pkl").read_bytes() == GND
    # archives are deleted after extraction; no partial or state file is left behind
    leftovers = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert leftovers == [COMPLETE_MARKER, ".download.lock", "gnd_oxford5k.pkl"]
    assert not list(folder.glob(".*extract-*"))

    assert is_complete(folder)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["dataset"] == "oxford5k"
    recorded = {f["filename"]: f for f in marker["files"]}
    for name in ("images.tgz", "gt.tgz", "gnd_oxford5k.pkl"):
        assert recorded[name]["sha256"] == hashlib.sha256(server.files[name]).hexdigest()
        assert recorded[name]["size"] == len(server.files[name])
        assert recorded[name]["url"] == f"{server.url}/{name}"
    assert recorded["images.tgz"]["extracted_files"] == len(IMAGES)

    # a complete dataset is left alone: no request at all, also when the root is the dataset folder itself
    before = len(server.requests)
    assert download_dataset("oxford5k", tmp_path / "data", sources, **FAST) == folder
    assert download_dataset("roxford5k", folder, sources, **FAST) == folder
    assert len(server.requests) == before


def test_interrupted_download_leaves_no_marker_and_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    sources = fake_oxford(server, tmp_path)
    archive = server.files["images.tgz"]
    server.behaviour["images.tgz"] = "truncate"
    with pytest.raises(DownloadError, match=re.escape(f"{server.url}/images.tgz")) as error:
        download_dataset("oxford5k", tmp_path, sources, retries=0, **FAST)
    assert "re-run" in str(error.value)

    folder = tmp_path / "oxford5k"
    assert not is_complete(folder)
    assert not (folder / COMPLETE_MARKER).exists()
    assert not (folder / "jpg").exists()
    part = folder / "images.tgz.part"
    assert part.read_bytes() == archive[: len(archive) // 2]

    del server.behaviour["images.tgz"]
    download_dataset("oxford5k", tmp_path, sources, keep_archives=True, **FAST)
    assert server.ranges("images.tgz") == [None, f"bytes={len(archive) // 2}-"]
    assert (folder / "images.tgz").read_bytes() == archive
    assert not part.exists()
    assert tree(folder / "jpg") == IMAGES
    assert is_complete(folder)


def test_rerun_skips_steps_finished_by_an_interrupted_run(server: FileServer, tmp_path: Path) -> None:
    sources = fake_oxford(server, tmp_path)
    server.behaviour["gnd_oxford5k.pkl"] = "truncate"  # the last file fails: the two archives are done
    with pytest.raises(DownloadError):
        download_dataset("oxford5k", tmp_path, sources, retries=0, **FAST)
    folder = tmp_path / "oxford5k"
    state = json.loads((folder / STATE_FILE).read_text())
    assert sorted(state) == ["gt.tgz", "images.tgz"]
    assert not is_complete(folder)

    del server.behaviour["gnd_oxford5k.pkl"]
    download_dataset("oxford5k", tmp_path, sources, **FAST)
    assert server.count("images.tgz") == 1 and server.count("gt.tgz") == 1
    assert server.ranges("gnd_oxford5k.pkl")[-1] == f"bytes={len(GND) // 2}-"
    assert (folder / "gnd_oxford5k.pkl").read_bytes() == GND
    assert is_complete(folder) and not (folder / STATE_FILE).exists()
    assert not (folder / "images.tgz").exists() and not (folder / "gt.tgz").exists()


def test_concurrent_runs_download_each_file_once(server: FileServer, tmp_path: Path) -> None:
    """Two processes (e.g. one per node) share the folder: the second waits for the lock, then finds it complete."""
    sources = fake_oxford(server, tmp_path)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(download_dataset("oxford5k", tmp_path, sources, **FAST))
        except Exception as error:  # reported below; a thread cannot fail the test itself
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and results == [tmp_path / "oxford5k"] * 2
    assert [server.count(name) for name in ("images.tgz", "gt.tgz", "gnd_oxford5k.pkl")] == [1, 1, 1]
    assert tree(tmp_path / "oxford5k" / "jpg") == IMAGES


def test_http_404_names_the_url_and_the_fix(server: FileServer, tmp_path: Path) -> None:
    sources = fake_oxford(server, tmp_path)
    del server.files["gt.tgz"]
    with pytest.raises(DownloadError) as error:
        download_dataset("oxford5k", tmp_path, sources, **FAST)
    message = str(error.value)
    assert "HTTP 404" in message and f"{server.url}/gt.tgz" in message
    assert str(sources) in message and "--base-url" in message
    assert server.count("gt.tgz") == 1  # a 404 is not retried
    assert not is_complete(tmp_path / "oxford5k")


def test_corrupt_archive_is_deleted_so_a_rerun_downloads_it_again(server: FileServer, tmp_path: Path) -> None:
    sources = fake_oxford(server, tmp_path)
    good = server.files["gt.tgz"]
    server.files["gt.tgz"] = b"<html>503 Service Unavailable</html>"
    with pytest.raises(DownloadError, match="not an archive") as error:
        download_dataset("oxford5k", tmp_path, sources, **FAST)
    assert "re-run" in str(error.value)
    folder = tmp_path / "oxford5k"
    assert not (folder / "gt.tgz").exists() and not (folder / "gt_files_170407").exists()

    server.files["gt.tgz"] = good
    download_dataset("oxford5k", tmp_path, sources, **FAST)
    assert tree(folder / "gt_files_170407") == GT_TEXT


def test_sha256_mismatch_in_a_dataset_leaves_no_marker(server: FileServer, tmp_path: Path) -> None:
    server.files["gnd.pkl"] = GND
    wrong = "0" * 64
    entries = [Source(url=f"{server.url}/gnd.pkl", filename="gnd.pkl", sha256=wrong)]
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_dataset("mydata", tmp_path, entries, **FAST)
    assert not is_complete(tmp_path / "mydata")
    assert not (tmp_path / "mydata" / "gnd.pkl").exists()


def test_base_url_fetches_the_same_names_from_a_mirror(server: FileServer, tmp_path: Path) -> None:
    server.files["gnd_oxford5k.pkl"] = GND
    entries = [Source(url="http://unreachable.invalid/x/gnd_oxford5k.pkl", filename="gnd_oxford5k.pkl")]
    folder = download_dataset("oxford5k", tmp_path, entries, base_url=server.url + "/", **FAST)
    assert (folder / "gnd_oxford5k.pkl").read_bytes() == GND
    assert json.loads((folder / COMPLETE_MARKER).read_text())["files"][0]["url"] == f"{server.url}/gnd_oxford5k.pkl"


def test_unknown_dataset_without_sources_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'oxford105k'"):
        download_dataset("oxford105k", tmp_path)
    assert not any(tmp_path.iterdir())


# -- single files -----------------------------------------------------------------------------------


def test_fetch_retries_a_broken_connection_and_resumes(server: FileServer, tmp_path: Path) -> None:
    data = bytes(range(256)) * 400
    server.files["blob.bin"] = data
    server.behaviour["blob.bin"] = "truncate_once"
    path = fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", retries=2, progress=False, backoff=0.0)
    assert path.read_bytes() == data
    assert server.ranges("blob.bin") == [None, f"bytes={len(data) // 2}-"]
    assert not (tmp_path / "blob.bin.part").exists()


def test_fetch_restarts_when_the_server_ignores_range(server: FileServer, tmp_path: Path) -> None:
    data = jpeg_bytes(7, size=64)
    server.files["a.jpg"] = data
    server.behaviour["a.jpg"] = "ignore_range"
    (tmp_path / "a.jpg.part").write_bytes(b"x" * 100)  # not a prefix of the file: appending would corrupt it
    fetch(f"{server.url}/a.jpg", tmp_path / "a.jpg", progress=False)
    assert server.ranges("a.jpg") == ["bytes=100-"]
    assert (tmp_path / "a.jpg").read_bytes() == data


def test_fetch_handles_416_for_a_finished_and_for_an_oversized_part(server: FileServer, tmp_path: Path) -> None:
    data = jpeg_bytes(3)
    server.files["a.jpg"] = data
    (tmp_path / "a.jpg.part").write_bytes(data)  # complete, but the run died before renaming it
    fetch(f"{server.url}/a.jpg", tmp_path / "a.jpg", progress=False)
    assert (tmp_path / "a.jpg").read_bytes() == data
    assert server.ranges("a.jpg") == [f"bytes={len(data)}-"]

    (tmp_path / "b.jpg.part").write_bytes(data + b"garbage")  # longer than the file: start over
    server.files["b.jpg"] = data
    fetch(f"{server.url}/b.jpg", tmp_path / "b.jpg", progress=False)
    assert (tmp_path / "b.jpg").read_bytes() == data
    assert server.ranges("b.jpg") == [f"bytes={len(data) + 7}-", None]


def test_fetch_checks_sha256(server: FileServer, tmp_path: Path) -> None:
    data = b"ground truth" * 100
    server.files["gnd.pkl"] = data
    actual = hashlib.sha256(data).hexdigest()
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DownloadError) as error:
        fetch(f"{server.url}/gnd.pkl", tmp_path / "gnd.pkl", sha256=wrong, progress=False)
    message = str(error.value)
    assert "gnd.pkl" in message and wrong in message and actual in message
    assert not (tmp_path / "gnd.pkl").exists() and not (tmp_path / "gnd.pkl.part").exists()

    assert fetch(f"{server.url}/gnd.pkl", tmp_path / "gnd.pkl", sha256=actual.upper(), progress=False).is_file()
    # an existing file that does not match is fetched again rather than trusted
    (tmp_path / "gnd.pkl").write_bytes(b"stale")
    fetch(f"{server.url}/gnd.pkl", tmp_path / "gnd.pkl", sha256=actual, progress=False)
    assert (tmp_path / "gnd.pkl").read_bytes() == data


def test_fetch_times_out_with_a_clear_error(server: FileServer, tmp_path: Path) -> None:
    server.behaviour["slow.bin"] = "stall"
    with pytest.raises(DownloadError) as error:
        fetch(f"{server.url}/slow.bin", tmp_path / "slow.bin", progress=False, retries=1, backoff=0.0, timeout=0.3)
    message = str(error.value)
    assert "timed out" in message and f"{server.url}/slow.bin" in message and "gave up after 2 attempts" in message
    assert server.count("slow.bin") == 2


def test_fetch_reports_an_unreachable_host(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=rf"cannot reach http://127\.0\.0\.1:{port}/x\.tgz.*connection"):
        fetch(f"http://127.0.0.1:{port}/x.tgz", tmp_path / "x.tgz", progress=False, retries=1, backoff=0.0)


def test_progress_bar_goes_to_stderr_with_the_total_size(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    server.files["big.bin"] = b"\0" * 300_000
    fetch(f"{server.url}/big.bin", tmp_path / "big.bin", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "big.bin" in captured.err and "100%" in captured.err and "293k/293k" in captured.err


# -- extraction -------------------------------------------------------------------------------------


def _tar_with(tmp_path: Path, evil: tarfile.TarInfo, payload: bytes = b"pwned") -> Path:
    """An archive whose first member is harmless and whose second is ``evil``."""
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        good = tarfile.TarInfo("good.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        if evil.isfile():
            evil.size = len(payload)
            tar.addfile(evil, io.BytesIO(payload))
        else:
            tar.addfile(evil)
    return path


def _symlink(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


@pytest.mark.parametrize(
    ("make_member", "member", "why"),
    [
        (lambda tmp: tarfile.TarInfo("../evil.txt"), "../evil.txt", "'..'"),
        (lambda tmp: tarfile.TarInfo("sub/../../evil.txt"), "sub/../../evil.txt", "'..'"),
        (lambda tmp: tarfile.TarInfo(str(tmp / "abs_evil.txt")), "abs_evil.txt", "absolute path"),
        (lambda tmp: _symlink("etc", "/etc"), "etc", "symbolic link"),
        (lambda tmp: _symlink("up", "../.."), "up", "symbolic link"),
        (lambda tmp: _symlink("hard", "../evil.txt", tarfile.LNKTYPE), "hard", "hard link"),
        (lambda tmp: _device("null"), "null", "device file"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-etc", "symlink-up", "hardlink", "device"],
)
def test_malicious_tar_is_refused_and_nothing_is_extracted(tmp_path: Path, make_member, member, why) -> None:
    archive = _tar_with(tmp_path, make_member(tmp_path))
    dest = tmp_path / "out" / "target"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DownloadError) as error:
        safe_extract(archive, dest)
    message = str(error.value)
    assert str(archive) in message and member in message and why in message and "nothing was extracted" in message
    # nothing written anywhere: not the harmless member, not the evil one, no temporary folder
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "abs_evil.txt").exists()


def test_link_chain_escaping_only_once_extracted_is_refused(tmp_path: Path) -> None:
    """Each link looks inside on its own; ``a/b/c`` escapes only through the link ``a/b``: caught while unpacking."""
    archive = tmp_path / "chain.tar"
    with tarfile.open(archive, "w") as tar:
        folder = tarfile.TarInfo("a")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        tar.addfile(_symlink("a/b", "../d"))
        tar.addfile(_symlink("a/b/c", "../../x"))
    with pytest.raises(DownloadError, match=r"member 'a/b/c' is unsafe.*outside the destination"):
        safe_extract(archive, tmp_path / "out" / "target")
    assert not (tmp_path / "out" / "target").exists()
    assert not (tmp_path / "out" / "x").exists() and not (tmp_path / "x").exists()
    assert list((tmp_path / "out").iterdir()) == []  # the temporary folder is gone


def test_symlink_is_refused_when_flattening(tmp_path: Path) -> None:
    archive = _tar_with(tmp_path, _symlink("inside", "good.txt"))
    with pytest.raises(DownloadError, match="cannot be flattened"):
        safe_extract(archive, tmp_path / "flat", flatten=True)
    assert not (tmp_path / "flat").exists()
    # without flattening, a link that stays inside the folder is fine
    safe_extract(archive, tmp_path / "tree")
    assert (tmp_path / "tree" / "inside").is_symlink() and (tmp_path / "tree" / "inside").read_text() == "ok"


def test_malicious_zip_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good.txt", "ok")
        zf.writestr("../evil.txt", "pwned")
    with pytest.raises(DownloadError, match=r"evil\.zip.*'\.\./evil\.txt'.*'\.\.'"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_zip_and_tar_extract_with_and_without_flattening(tmp_path: Path) -> None:
    members = {"paris/defense/paris_defense_000001.jpg": b"a", "paris/eiffel/paris_eiffel_000002.jpg": b"b"}
    zipped = tmp_path / "paris.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    placed = safe_extract(zipped, tmp_path / "flat", flatten=True)
    assert tree(tmp_path / "flat") == {"paris_defense_000001.jpg": b"a", "paris_eiffel_000002.jpg": b"b"}
    assert sorted(p.name for p in placed) == ["paris_defense_000001.jpg", "paris_eiffel_000002.jpg"]

    tarred = tmp_path / "paris.tgz"
    tarred.write_bytes(tgz(members))
    safe_extract(tarred, tmp_path / "nested")
    assert tree(tmp_path / "nested") == members
    # a second archive merges into the same folder (paris_1 and paris_2 both go to jpg/)
    (tmp_path / "more.tgz").write_bytes(tgz({"paris/louvre/paris_louvre_000003.jpg": b"c"}))
    safe_extract(tmp_path / "more.tgz", tmp_path / "flat", flatten=True)
    assert sorted(tree(tmp_path / "flat")) == [
        "paris_defense_000001.jpg",
        "paris_eiffel_000002.jpg",
        "paris_louvre_000003.jpg",
    ]


def test_flattening_refuses_two_different_files_with_one_name(tmp_path: Path) -> None:
    archive = tmp_path / "clash.tgz"
    archive.write_bytes(tgz({"a/x.jpg": b"one", "b/x.jpg": b"two", "c/x.jpg": b"one"}))
    with pytest.raises(DownloadError, match=r"'a/x\.jpg' and 'b/x\.jpg' are different files"):
        safe_extract(archive, tmp_path / "flat", flatten=True)
    assert not (tmp_path / "flat").exists()
    archive.write_bytes(tgz({"a/x.jpg": b"one", "c/x.jpg": b"one"}))  # identical copies are merged
    safe_extract(archive, tmp_path / "flat", flatten=True)
    assert tree(tmp_path / "flat") == {"x.jpg": b"one"}


# -- sources ----------------------------------------------------------------------------------------


def test_official_sources_are_the_published_urls() -> None:
    oxford = {s.filename: s for s in load_sources("oxford5k")}
    assert [s.url for s in oxford.values()] == [
        "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",
        "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/gt_files_170407.tgz",
        "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/oxford5k/gnd_oxford5k.pkl",
        "http://cmp.felk.cvut.cz/revisitop/data/datasets/roxford5k/gnd_roxford5k.pkl",
    ]
    assert oxford["oxbuild_images-v1.tgz"].extract_to == "jpg"
    assert oxford["gt_files_170407.tgz"].extract_to == "gt_files_170407"
    paris = {s.filename: s for s in load_sources("rparis6k")}  # the Revisited name fetches the same folder
    assert [s.url for s in paris.values()] == [
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz",
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_120310.tgz",
        "http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/paris6k/gnd_paris6k.pkl",
        "http://cmp.felk.cvut.cz/revisitop/data/datasets/rparis6k/gnd_rparis6k.pkl",
    ]
    assert paris["paris_1-v1.tgz"].flatten and paris["paris_1-v1.tgz"].extract_to == "jpg"
    assert paris["paris_120310.tgz"].extract_to == "gt_files"
    assert all(s.extract_to is None for name, s in paris.items() if name.endswith(".pkl"))


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("{url: http://h/a.tgz, filename: a.tgz, sha265: null}", "unknown keys ['sha265']"),
        ("{url: http://h/a.tgz, filename: a.tgz, sha256: abc}", "sha256 must be null or 64 hex digits"),
        ("{url: http://h/a.tgz, filename: ../a.tgz}", "filename must be a plain file name"),
        ("{url: ftp://h/a.tgz, filename: a.tgz}", "url must be an http(s) or file URL"),
        ("{url: http://h/a.tgz, filename: a.tgz, extract_to: ../up}", "extract_to must be a folder inside"),
        ("{url: http://h/a.tgz, filename: a.tgz, flatten: true}", "flatten needs extract_to"),
    ],
)
def test_malformed_sources_name_the_file_and_entry(tmp_path: Path, entry: str, complaint: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"files:\n  - {{url: http://h/ok.pkl, filename: ok.pkl}}\n  - {entry}\n")
    with pytest.raises(ConfigError) as error:
        load_sources(path)
    assert str(path) in str(error.value) and "files[1]" in str(error.value) and complaint in str(error.value)


def test_sources_file_may_be_a_bare_list_and_filename_defaults_to_the_url(tmp_path: Path) -> None:
    path = tmp_path / "list.yml"
    path.write_text("- url: http://h/data/gnd.pkl\n")
    assert load_sources(path) == [Source(url="http://h/data/gnd.pkl", filename="gnd.pkl")]
    with pytest.raises(ConfigError, match="sources file not found"):
        load_sources(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="no download sources for 'holidays'"):
        load_sources("holidays")
