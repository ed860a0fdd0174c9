"""The image index: format and checksums, incremental updates, atomic writes, bad and unusual images."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import oxford_ir.extraction.embedding as extraction_module
import oxford_ir.images as images_module
import oxford_ir.retrieval.index_build as index_build_module
import oxford_ir.retrieval.index_format as index_format_module
from oxford_ir.errors import CheckpointError, ConfigError, DataError, IndexFormatError
from oxford_ir.extraction.embedding import extract_embeddings
from oxford_ir.images import decode_image, load_image
from oxford_ir.retrieval.image_sources import resolve_images
from oxford_ir.retrieval.index_build import build_index
from oxford_ir.retrieval.index_format import (
    CURRENT_FILE,
    EMBEDDINGS_FILE,
    ENTRIES_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    REPORT_FILE,
    RetrievalIndex,
    index_fingerprint,
)
from oxford_ir.retrieval.model_spec import ModelSpec
from tests.reliability.processes import lock_held_elsewhere

TINY = {
    "_target_": "oxford_ir.models.embedder.Embedder",
    "backbone": {"_target_": "oxford_ir.models.backbones.ScratchCNN", "channels": [8, 16]},
    "pooling": {"_target_": "oxford_ir.models.pooling.GeM"},
}
FAST = {"image_size": 32, "batch_size": 4, "num_workers": 0, "progress": False}


def tiny_spec(**pooling) -> ModelSpec:
    return ModelSpec(embedder={**TINY, "pooling": {**TINY["pooling"], **pooling}})


def write_photo(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    """A small image with structure (smooth blobs) that differs per seed; format from the suffix."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_folder(root: Path, n: int = 10) -> list[str]:
    """``n`` images, every third in a sub-folder, of a few sizes; returns their relative paths, sorted."""
    names = []
    for i in range(n):
        rel = f"{'sub/' if i % 3 == 0 else ''}img_{i:02d}.{'png' if i % 2 else 'jpg'}"
        write_photo(root / rel, seed=i, size=(40 + 4 * (i % 3), 30))
        names.append(rel)
    return sorted(names)


def rows_by_path(index: RetrievalIndex) -> dict[str, np.ndarray]:
    return {e.path: index.embeddings[i] for i, e in enumerate(index.entries)}


@pytest.fixture
def count_embedded(monkeypatch):
    """Counts the images that go through the model (every forward pass of the index goes via embed_batch)."""
    seen = {"images": 0, "calls": 0}
    real = extraction_module.embed_batch

    def counting(model, batch, scales=(1.0,), **kwargs):
        seen["images"] += int(batch.shape[0])
        seen["calls"] += 1
        return real(model, batch, scales, **kwargs)

    monkeypatch.setattr(extraction_module, "embed_batch", counting)
    return seen


# -- format --------------------------------------------------------------------------------------
def test_index_holds_every_image_with_its_metadata_and_checksummed_files(tmp_path):
    names = make_folder(tmp_path / "photos")
    report = build_index(tiny_spec(), tmp_path / "photos", tmp_path / "index", **FAST)
    assert (report.count, len(report.added), report.kept, report.skipped) == (10, 10, 0, [])

    index = RetrievalIndex.load(tmp_path / "index")
    assert [e.path for e in index.entries] == names and len(index) == 10
    assert index.root == (tmp_path / "photos").resolve() and index.image_path(0) == index.root / names[0]
    assert index.embeddings.dtype == np.float16 and index.dtype == "float16"
    assert index.embeddings.shape == (10, 16) and index.embedding_dim == 16
    np.testing.assert_allclose(np.linalg.norm(index.vectors(), axis=1), 1.0, atol=2e-3)
    first = index.entries[0]
    stat = os.stat(tmp_path / "photos" / first.path)
    assert (first.size, first.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert (first.width, first.height) == Image.open(tmp_path / "photos" / first.path).size

    folder = tmp_path / "index" / (tmp_path / "index" / CURRENT_FILE).read_text().strip()
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["complete"] is True
    assert manifest["count"] == 10 and manifest["embedding_dim"] == 16 and manifest["dtype"] == "float16"
    assert manifest["extraction"]["image_size"] == 32 and manifest["extraction"]["scales"] == [1.0]
    assert manifest["extraction"]["pooling_power"] == pytest.approx(3.0)
    assert manifest["images"]["root"] == str(index.root)
    assert manifest["model"] == {"checkpoint": None, "embedder": TINY}
    assert manifest["fingerprint"] == index_fingerprint(tiny_spec().fingerprint(), 32, [1.0]) == index.fingerprint
    for name in (EMBEDDINGS_FILE, ENTRIES_FILE):
        data = (folder / name).read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    mapped = RetrievalIndex.load(tmp_path / "index", mmap=True)
    assert isinstance(mapped.embeddings, np.memmap) and np.array_equal(mapped.embeddings, index.embeddings)
    saved = json.loads((tmp_path / "index" / REPORT_FILE).read_text())
    assert saved["added"] == 10 and saved["count"] == 10 and saved["skipped_files"] == []


@pytest.mark.parametrize("scales", [[1.0], [1.0, 0.5]])
def test_float32_rows_equal_the_extraction_of_oxford_ir_eval(tmp_path, scales):
    """The index embeds exactly as extract_embeddings (the oxford-ir-eval path), multi-scale included."""
    names = make_folder(tmp_path / "photos", n=7)
    spec = tiny_spec()
    build_index(spec, tmp_path / "photos", tmp_path / "index", dtype="float32", scales=scales, **FAST)
    index = RetrievalIndex.load(tmp_path / "index")
    expected = extract_embeddings(spec.build(), [tmp_path / "photos" / n for n in names], 32, scales=scales)
    assert index.embeddings.dtype == np.float32
    np.testing.assert_allclose(index.embeddings, expected.numpy(), atol=1e-6)
    # float16 storage: the same rows re-normalised and rounded
    build_index(spec, tmp_path / "photos", tmp_path / "half", scales=scales, **FAST)
    half = RetrievalIndex.load(tmp_path / "half").embeddings
    np.testing.assert_allclose(half.astype(np.float32), expected.numpy(), atol=1e-3)


def test_worker_processes_give_the_same_index(tmp_path):
    make_folder(tmp_path / "photos", n=6)
    build_index(tiny_spec(), tmp_path / "photos", tmp_path / "a", **{**FAST, "num_workers": 0})
    build_index(tiny_spec(), tmp_path / "photos", tmp_path / "b", **{**FAST, "num_workers": 2})
    a, b = RetrievalIndex.load(tmp_path / "a"), RetrievalIndex.load(tmp_path / "b")
    assert a.entries == b.entries
    np.testing.assert_allclose(a.vectors(), b.vectors(), atol=1e-3)


def test_positions_map_paths_to_rows(tmp_path):
    names = make_folder(tmp_path / "photos", n=4)
    build_index(tiny_spec(), tmp_path / "photos", tmp_path / "index", **FAST)
    index = RetrievalIndex.load(tmp_path / "index")
    assert index.positions([names[2], names[0]]).tolist() == [2, 0]
    with pytest.raises(IndexFormatError, match="no row for 1 image"):
        index.positions(["nope.jpg"])


# -- incremental ---------------------------------------------------------------------------------
def test_rerun_embeds_only_new_and_changed_files_and_drops_deleted_ones(tmp_path, count_embedded):
    photos, out = tmp_path / "photos", tmp_path / "index"
    names = make_folder(photos)
    build_index(tiny_spec(), photos, out, **FAST)
    assert count_embedded["images"] == 10
    before = rows_by_path(RetrievalIndex.load(out))

    count_embedded["images"] = 0
    again = build_index(tiny_spec(), photos, out, **FAST)
    assert count_embedded["images"] == 0 and again.attempted == 0
    assert (again.kept, again.embedded, again.wrote) == (10, 0, False)

    write_photo(photos / "new_a.jpg", seed=100)
    write_photo(photos / "sub" / "new_b.png", seed=101)
    write_photo(photos / names[1], seed=102, size=(36, 36))  # changed content (and size)
    stat = os.stat(photos / names[4])
    os.utime(photos / names[4], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # only touched
    os.remove(photos / names[7])
    report = build_index(tiny_spec(), photos, out, **FAST)

    assert count_embedded["images"] == 4
    assert sorted(report.added) == ["new_a.jpg", "sub/new_b.png"]
    assert sorted(report.updated) == sorted([names[1], names[4]])
    assert report.removed == [names[7]]
    assert report.kept == 7 and report.count == 11 == report.kept + report.embedded
    after = RetrievalIndex.load(out)
    rows = rows_by_path(after)
    for name in set(names) - {names[1], names[4], names[7]}:
        assert np.array_equal(rows[name], before[name]), name  # reused bit for bit
    assert not np.array_equal(rows[names[1]], before[names[1]])
    assert [e.path for e in after.entries] == sorted([*(set(names) - {names[7]}), "new_a.jpg", "sub/new_b.png"])

    build_index(tiny_spec(), photos, tmp_path / "scratch", **FAST)
    scratch = RetrievalIndex.load(tmp_path / "scratch")
    assert scratch.entries == after.entries
    np.testing.assert_allclose(scratch.vectors(), after.vectors(), atol=1e-3)
    assert os.listdir(out / "v000002") and not (out / "v000001").exists()  # the old version was removed


def assert_entries_describe_their_files(index: RetrievalIndex, photos: Path) -> None:
    for entry in index.entries:
        info = os.stat(photos / entry.path)
        with Image.open(photos / entry.path) as image:
            actual = (info.st_size, info.st_mtime_ns, *image.size)
        assert (entry.size, entry.mtime_ns, entry.width, entry.height) == actual, entry


def test_an_update_records_the_size_dimensions_and_mtime_of_every_re_embedded_file(tmp_path, monkeypatch):
    """Issue 21 item 7: files replaced by others of another size, between runs (mtime kept, or files swapped) and
    while the update runs (after the files were listed and their headers read, before they are decoded)."""
    photos, out = tmp_path / "photos", tmp_path / "index"
    names = make_folder(photos, n=6)
    build_index(tiny_spec(), photos, out, **FAST)
    before = {e.path: e for e in RetrievalIndex.load(out).entries}
    write_photo(tmp_path / "other.png", seed=50, size=(64, 20))
    stat = os.stat(photos / names[0])
    (photos / names[0]).write_bytes((tmp_path / "other.png").read_bytes())  # another image, the old mtime
    os.utime(photos / names[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(photos / names[1], tmp_path / "swap")  # two files swap names
    os.replace(photos / names[2], photos / names[1])
    os.replace(tmp_path / "swap", photos / names[2])
    write_photo(photos / names[3], seed=52, size=(30, 60))  # changed, then changed again while the update runs:
    real_plan = index_build_module.plan_for_model

    def replaced_while_running(*args, **kwargs):
        plan = real_plan(*args, **kwargs)  # listed, stat'ed, headers read: now the file changes
        write_photo(photos / names[3], seed=51, size=(70, 50))
        return plan

    monkeypatch.setattr(index_build_module, "plan_for_model", replaced_while_running)
    report = build_index(tiny_spec(), photos, out, **FAST)
    updated = RetrievalIndex.load(out)
    assert_entries_describe_their_files(updated, photos)  # before: names[3] kept its old size and dimensions
    assert sorted(report.updated) == sorted(names[:3]) and report.removed == [names[3]]
    assert {e.path for e in updated.entries} == set(names) - {names[3]}
    assert [(s.path, s.reason) for s in report.skipped] == [
        (names[3], "changed while it was being indexed: run oxford-ir-index again to index it")
    ]
    assert (before[names[1]].width, before[names[2]].width) == (
        updated.entries[updated.positions([names[2]])[0]].width,
        updated.entries[updated.positions([names[1]])[0]].width,
    )

    monkeypatch.setattr(index_build_module, "plan_for_model", real_plan)
    again = build_index(tiny_spec(), photos, out, **FAST)
    assert again.added == [names[3]] and again.kept == 5
    final = RetrievalIndex.load(out)
    assert_entries_describe_their_files(final, photos)
    build_index(tiny_spec(), photos, tmp_path / "scratch", **FAST)
    scratch = RetrievalIndex.load(tmp_path / "scratch")
    assert final.entries == scratch.entries
    np.testing.assert_allclose(final.vectors(), scratch.vectors(), atol=1e-3)


def test_other_model_or_settings_re_embed_everything_or_refuse_when_strict(tmp_path, count_embedded, caplog):
    photos, out = tmp_path / "photos", tmp_path / "index"
    make_folder(photos, n=5)
    build_index(tiny_spec(), photos, out, **FAST)
    first = RetrievalIndex.load(out)
    snapshot = (first.version, first.embeddings.copy())

    with pytest.raises(IndexFormatError, match="another model or extraction settings") as error:
        build_index(tiny_spec(p=2.0), photos, out, incremental="strict", **FAST)
    assert "incremental=auto" in str(error.value)
    kept = RetrievalIndex.load(out)
    assert kept.version == snapshot[0] and np.array_equal(kept.embeddings, snapshot[1])

    count_embedded["images"] = 0
    with caplog.at_level(logging.WARNING):
        report = build_index(tiny_spec(), photos, out, **{**FAST, "image_size": 24})
    assert count_embedded["images"] == 5 and report.kept == 0 and len(report.updated) == 5
    assert "another model or extraction settings" in report.rebuilt and "re-embedding every image" in caplog.text
    assert RetrievalIndex.load(out).image_size == 24

    count_embedded["images"] = 0
    report = build_index(tiny_spec(), photos, out, **{**FAST, "image_size": 24}, dtype="float32")
    assert count_embedded["images"] == 5 and "dtype float16" in report.rebuilt
    count_embedded["images"] = 0
    build_index(tiny_spec(), photos, out, **{**FAST, "image_size": 24}, dtype="float32", incremental="off")
    assert count_embedded["images"] == 5


# -- atomic writes -------------------------------------------------------------------------------
def test_a_crash_while_writing_leaves_the_previous_index_loadable_and_unchanged(tmp_path, monkeypatch):
    photos, out = tmp_path / "photos", tmp_path / "index"
    names = make_folder(photos, n=6)
    build_index(tiny_spec(), photos, out, **FAST)
    before = RetrievalIndex.load(out)
    write_photo(photos / "new.jpg", seed=50)
    os.remove(photos / names[0])

    def crash(folder, entries):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(index_format_module, "_write_entries", crash)
    with pytest.raises(OSError, match="simulated"):
        build_index(tiny_spec(), photos, out, **FAST)
    assert not (out / "v000002").exists()  # it died after writing the embeddings; the half-written folder is gone
    after = RetrievalIndex.load(out)
    assert after.version == before.version == "v000001"
    assert after.entries == before.entries and np.array_equal(after.embeddings, before.embeddings)

    monkeypatch.undo()
    report = build_index(tiny_spec(), photos, out, **FAST)
    assert report.version == "v000002" and sorted(os.listdir(out)) == [".lock", "CURRENT", "report.json", "v000002"]
    assert "new.jpg" in [e.path for e in RetrievalIndex.load(out).entries]


def test_an_interrupted_run_keeps_its_finished_rows_and_the_next_run_finishes_it(tmp_path, monkeypatch, caplog):
    photos, out = tmp_path / "photos", tmp_path / "index"
    make_folder(photos, n=12)
    real = extraction_module.embed_batch
    calls = {"n": 0}

    def interrupted(model, batch, scales=(1.0,), **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(model, batch, scales, **kwargs)

    monkeypatch.setattr(extraction_module, "embed_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(tiny_spec(), photos, out, **{**FAST, "batch_size": 2}, checkpoint_every=None)
    with caplog.at_level(logging.WARNING):
        partial = RetrievalIndex.load(out)
    assert not partial.complete and len(partial) == 4 and "interrupted build" in caplog.text

    monkeypatch.setattr(extraction_module, "embed_batch", real)
    calls["n"] = 0
    report = build_index(tiny_spec(), photos, out, **{**FAST, "batch_size": 2})
    assert report.kept == 4 and len(report.added) == 8
    finished = RetrievalIndex.load(out)
    build_index(tiny_spec(), photos, tmp_path / "scratch", **FAST)
    scratch = RetrievalIndex.load(tmp_path / "scratch")
    assert finished.complete and finished.entries == scratch.entries
    np.testing.assert_allclose(finished.vectors(), scratch.vectors(), atol=1e-3)


def test_checkpoints_of_a_long_run_are_valid_indexes_that_keep_stale_rows_marked_changed(tmp_path, monkeypatch):
    photos, out = tmp_path / "photos", tmp_path / "index"
    names = make_folder(photos, n=8)
    build_index(tiny_spec(), photos, out, **FAST)
    for i, name in enumerate(names):  # every file changes; the run dies after two batches, checkpointed
        write_photo(photos / name, seed=100 + i, size=(33, 33))
    real = extraction_module.embed_batch
    calls = {"n": 0}

    def failing(model, batch, scales=(1.0,), **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(model, batch, scales, **kwargs)

    monkeypatch.setattr(extraction_module, "embed_batch", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        build_index(tiny_spec(), photos, out, **{**FAST, "batch_size": 2}, checkpoint_every=0)
    partial = RetrievalIndex.load(out, warn_incomplete=False)
    assert not partial.complete and len(partial) == 8  # 4 re-embedded rows and 4 stale ones
    fresh = sum((e.size, e.mtime_ns) == (os.stat(photos / e.path).st_size, os.stat(photos / e.path).st_mtime_ns)
                for e in partial.entries)  # fmt: skip
    assert fresh == 4

    monkeypatch.setattr(extraction_module, "embed_batch", real)
    report = build_index(tiny_spec(), photos, out, **FAST)
    assert report.kept == 4 and len(report.updated) == 4


def test_a_second_build_of_the_same_index_is_refused_while_one_runs(tmp_path):
    make_folder(tmp_path / "photos", n=2)
    out = tmp_path / "index"
    out.mkdir()
    with lock_held_elsewhere(out / ".lock") as holder:  # noqa: SIM117 - the match needs the pid
        with pytest.raises(IndexFormatError, match=rf"being updated by another .*\(pid {holder.pid}\)"):
            build_index(tiny_spec(), tmp_path / "photos", out, **FAST)
    assert not (out / CURRENT_FILE).exists()


# -- loading errors --------------------------------------------------------------------------------
@pytest.fixture
def built(tmp_path) -> Path:
    make_folder(tmp_path / "photos", n=4)
    build_index(tiny_spec(), tmp_path / "photos", tmp_path / "index", **FAST)
    return tmp_path / "index"


def test_a_corrupt_byte_is_caught_by_the_checksum(built):
    data = built / "v000001" / EMBEDDINGS_FILE
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError) as error:
        RetrievalIndex.load(built)
    message = str(error.value)
    assert str(built) in message and "embeddings.npy does not match the sha256" in message
    assert "rebuild it with `oxford-ir-index images=" in message and f"out={built}" in message


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "v000001" / ENTRIES_FILE).write_text("[]"), "entries.json does not match the sha256"),
        (lambda d: (d / "v000001" / MANIFEST_FILE).write_text("{not json"), "manifest.json is unreadable"),
        (lambda d: (d / CURRENT_FILE).write_text("../../etc\n"), "not a version name"),
        (lambda d: (d / CURRENT_FILE).unlink(), "is not an index"),
        (lambda d: (d / "v000001" / EMBEDDINGS_FILE).unlink(), "embeddings.npy of version v000001 is missing"),
    ],
)
def test_damaged_indexes_are_clear_errors(built, damage, match):
    damage(built)
    with pytest.raises(IndexFormatError, match=match):
        RetrievalIndex.load(built)


def test_an_index_from_a_newer_format_asks_for_an_upgrade(built):
    manifest_path = built / "v000001" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="upgrade oxford-ir"):
        RetrievalIndex.load(built)


def test_no_index_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(IndexFormatError, match="no such folder"):
        RetrievalIndex.load(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(IndexFormatError, match="is a file"):
        RetrievalIndex.load(tmp_path / "file")


def test_the_caller_s_model_must_match_the_index(built):
    index = RetrievalIndex.load(built, expected_fingerprint=index_fingerprint(tiny_spec().fingerprint(), 32, [1.0]))
    assert len(index) == 4
    other = index_fingerprint(tiny_spec(p=2.0).fingerprint(), 32, [1.0])
    with pytest.raises(IndexFormatError, match="built with another model or extraction settings") as error:
        RetrievalIndex.load(built, expected_fingerprint=other)
    assert "rebuild it with" in str(error.value)
    with pytest.raises(IndexFormatError, match="holds 16-dimensional embeddings, but the model asked for gives 512"):
        RetrievalIndex.load(built, expected_dim=512)


def tamper_entry(index: Path, row: int, path: str) -> None:
    """Rewrite row ``row``'s path in entries.json and the checksums in the manifest, as a forger would."""
    folder = index / "v000001"
    entries = json.loads((folder / ENTRIES_FILE).read_text())
    entries[row]["path"] = path
    data = json.dumps(entries).encode()
    (folder / ENTRIES_FILE).write_bytes(data)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"][ENTRIES_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def _outside_link(built: Path) -> str:
    (built.parent / "secret.png").write_bytes((built.parent / "photos" / "img_01.png").read_bytes())
    (built.parent / "photos" / "link.png").symlink_to(built.parent / "secret.png")
    return "link.png"


def _outside_folder(built: Path) -> str:
    (built.parent / "elsewhere").mkdir()
    (built.parent / "elsewhere" / "x.png").write_bytes(b"x")
    (built.parent / "photos" / "sub" / "away").symlink_to(built.parent / "elsewhere")
    return "sub/away/x.png"


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda built: "../../../../../etc/passwd", "climbs out of its folder with '..'"),
        (lambda built: "sub/../../secret.png", "climbs out of its folder with '..'"),
        (lambda built: "/etc/passwd", "is an absolute path"),
        (lambda built: "", "is empty"),
        (_outside_link, "is a symbolic link to"),
        (_outside_folder, "is a symbolic link to"),
    ],
    ids=["dotdot", "inner-dotdot", "absolute", "empty", "file-link", "folder-link"],
)
def test_an_entry_leading_outside_the_image_folder_is_refused_at_load(built, make, why):
    name = make(built)
    tamper_entry(built, 1, name)
    with pytest.raises(IndexFormatError) as error:
        RetrievalIndex.load(built)
    message = str(error.value)
    assert f"v000001/{ENTRIES_FILE} entry 1 {name!r} {why}" in message, message
    assert f"outside the image folder {built.parent / 'photos'}" in message and "\n" not in message


def test_symbolic_links_inside_the_image_folder_are_indexed_and_those_leading_out_skipped(tmp_path):
    photos = tmp_path / "photos"
    make_folder(photos, n=3)
    (photos / "again.png").symlink_to(photos / "img_01.png")  # stays inside: indexed
    write_photo(tmp_path / "secret.png", seed=7)
    (photos / "leak.png").symlink_to(tmp_path / "secret.png")
    report = build_index(tiny_spec(), photos, tmp_path / "index", **FAST)
    assert [s.path for s in report.skipped] == ["leak.png"]
    assert (
        report.skipped[0].reason
        == f"is a symbolic link to {tmp_path / 'secret.png'}, outside the image folder: not read"
    )
    assert [e.path for e in RetrievalIndex.load(tmp_path / "index").entries] == [
        "again.png", "img_01.png", "img_02.jpg", "sub/img_00.jpg"
    ]  # fmt: skip


def test_a_corrupt_index_is_replaced_by_the_next_build_but_strict_refuses(built, count_embedded):
    (built / "v000001" / EMBEDDINGS_FILE).write_bytes(b"garbage")
    photos = built.parent / "photos"
    count_embedded["images"] = 0
    with pytest.raises(IndexFormatError, match="corrupt"):
        build_index(tiny_spec(), photos, built, incremental="strict", **FAST)
    report = build_index(tiny_spec(), photos, built, **FAST)
    assert count_embedded["images"] == 4 and "could not be read" in report.rebuilt
    assert len(RetrievalIndex.load(built)) == 4


# -- inputs ----------------------------------------------------------------------------------------
def test_folders_globs_and_single_files_resolve_to_sorted_relative_paths(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    for rel in ("b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.webp", ".hidden.jpg", ".cache/e.jpg", "notes.txt"):
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        (photos / rel).write_bytes(b"")
    source = resolve_images(photos)
    assert source.root == photos.resolve()
    assert source.paths == ["a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.webp"]
    root, paths = source
    assert (root, paths) == (source.root, source.paths)

    monkeypatch.chdir(tmp_path)
    globbed = resolve_images("photos/**/*.jp*g")
    assert globbed.root == photos.resolve() and globbed.paths == ["b.jpg", "sub/c.jpeg"]
    single = resolve_images(photos / "sub" / "c.jpeg")
    assert single.root == (photos / "sub").resolve() and single.paths == ["c.jpeg"]

    with pytest.raises(DataError, match="no such folder or file"):
        resolve_images(tmp_path / "nope")
    with pytest.raises(DataError, match="matches no image files"):
        resolve_images("photos/*.gif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files in"):
        resolve_images(tmp_path / "empty")


def test_a_benchmark_source_is_its_database_in_list_order_and_embeds_as_oxford_ir_eval(tmp_path):
    from oxford_ir.benchmarks.registry import load_benchmark
    from oxford_ir.benchmarks.synthetic import SYNTHETIC_PRESETS, write_synthetic_benchmark
    from oxford_ir.extraction.benchmark import extract_benchmark

    write_synthetic_benchmark(tmp_path / "data" / "synthetic", **SYNTHETIC_PRESETS["tiny"])
    benchmark = load_benchmark("synthetic", tmp_path / "data")
    source = resolve_images("benchmark:synthetic", tmp_path / "data")
    assert source.root == benchmark.image_dir.resolve()
    assert source.paths == [f"{n}.jpg" for n in benchmark.imlist]

    spec = tiny_spec()
    build_index(spec, source, tmp_path / "index", dtype="float32", **{**FAST, "image_size": 48})
    index = RetrievalIndex.load(tmp_path / "index")
    db, _ = extract_benchmark(spec.build(), benchmark, 48)
    np.testing.assert_allclose(index.vectors(), db.numpy(), atol=1e-6)

    with pytest.raises(ConfigError, match="needs paths.data_dir"):
        resolve_images("benchmark:synthetic")
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        resolve_images("benchmark:nope", tmp_path / "data")


def test_out_must_be_a_folder_that_is_new_empty_or_an_index(tmp_path):
    make_folder(tmp_path / "photos", n=2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        build_index(tiny_spec(), tmp_path / "photos", tmp_path / "file", **FAST)
    with pytest.raises(ConfigError, match="folder with other files"):
        build_index(tiny_spec(), tmp_path / "photos", tmp_path / "photos", **FAST)
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["img_01.png", "sub"]
    with pytest.raises(ConfigError, match="index.dtype='float64'"):
        build_index(tiny_spec(), tmp_path / "photos", tmp_path / "index", **{**FAST, "dtype": "float64"})
    with pytest.raises(ConfigError, match="scales"):
        build_index(tiny_spec(), tmp_path / "photos", tmp_path / "index", **{**FAST, "scales": [0.0]})


# -- bad and unusual images ------------------------------------------------------------------------
def test_undecodable_files_are_skipped_and_reported_and_not_retried_until_they_change(tmp_path, count_embedded, capsys):
    photos, out = tmp_path / "photos", tmp_path / "index"
    make_folder(photos, n=3)
    (photos / "garbage.jpg").write_bytes(os.urandom(300))
    (photos / "empty.png").write_bytes(b"")
    good = write_photo(tmp_path / "x.jpg", seed=9, size=(60, 60)).read_bytes()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 2])
    report = build_index(tiny_spec(), photos, out, **FAST)

    assert report.count == 3 and count_embedded["images"] == 3
    reasons = {s.path: s.reason for s in report.skipped}
    assert sorted(reasons) == ["empty.png", "garbage.jpg", "truncated.jpg"]
    assert "truncated" in reasons["truncated.jpg"].lower()
    assert all("corrupt or not an image" in r for r in reasons.values())
    saved = json.loads((out / REPORT_FILE).read_text())
    assert {s["path"] for s in saved["skipped_files"]} == set(reasons)
    summary = report.summary()
    assert "skipped 3 file(s) that could not be read:" in summary and "  garbage.jpg: " in summary

    again = build_index(tiny_spec(), photos, out, **FAST)
    assert again.attempted == 0 and not again.wrote and len(again.skipped) == 3

    (photos / "truncated.jpg").write_bytes(good)  # repaired
    fixed = build_index(tiny_spec(), photos, out, **FAST)
    assert fixed.added == ["truncated.jpg"] and fixed.attempted == 1 and len(fixed.skipped) == 2


def test_a_collection_where_nothing_decodes_writes_no_index(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of the 1 files could be read"):
        build_index(tiny_spec(), tmp_path / "photos", tmp_path / "index", **FAST)
    assert not (tmp_path / "index" / CURRENT_FILE).exists()
    assert json.loads((tmp_path / "index" / REPORT_FILE).read_text())["skipped_files"][0]["path"] == "a.jpg"


def write_exif_jpeg(path: Path, pixels: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif)


@pytest.mark.parametrize("orientation, quarter_turns", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied_pixels_sizes_and_embeddings(tmp_path, orientation, quarter_turns):
    rng = np.random.default_rng(orientation)
    pixels = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((48, 36)))
    photos = tmp_path / "photos"
    photos.mkdir()
    write_exif_jpeg(photos / "tagged.jpg", pixels, orientation)
    with Image.open(photos / "tagged.jpg") as raw:  # as stored, before the orientation
        stored = np.asarray(raw.convert("RGB"))
    shown = np.rot90(stored, k=quarter_turns)  # orientation 6: turn clockwise to display
    assert np.array_equal(np.asarray(load_image(photos / "tagged.jpg")), shown)
    Image.fromarray(np.ascontiguousarray(shown)).save(photos / "rotated.png")  # lossless: the same pixels

    build_index(tiny_spec(), photos, tmp_path / "index", dtype="float32", **FAST)
    index = RetrievalIndex.load(tmp_path / "index")
    rows = rows_by_path(index)
    np.testing.assert_allclose(rows["tagged.jpg"], rows["rotated.png"], atol=1e-6)
    sizes = {e.path: (e.width, e.height) for e in index.entries}
    assert sizes["tagged.jpg"] == sizes["rotated.png"] == (shown.shape[1], shown.shape[0])
    assert decode_image(photos / "tagged.jpg").size == (shown.shape[1], shown.shape[0])


def test_grayscale_cmyk_palette_alpha_and_bilevel_images_become_the_right_rgb(tmp_path):
    gray = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "gray.png")), np.repeat(gray[..., None], 3, axis=2))

    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    r, g, b = np.asarray(load_image(tmp_path / "cmyk.jpg")).reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15

    palette = Image.new("P", (4, 2))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red (transparent), 1 blue
    palette.putdata([0, 1, 1, 0, 1, 0, 0, 1])
    palette.save(tmp_path / "palette.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "palette.png"))
    expected = np.where(np.array([0, 1, 1, 0, 1, 0, 0, 1]).reshape(2, 4, 1) == 1, [0, 0, 255], [255, 255, 255])
    assert np.array_equal(out, expected)  # transparent pixels show the white background, not the hidden red
    palette.save(tmp_path / "palette.gif", transparency=0)
    assert np.array_equal(np.asarray(load_image(tmp_path / "palette.gif")), expected)

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 255)
    rgba[0, 1] = (0, 0, 0, 0)
    rgba[1, 0] = (0, 0, 0, 128)
    rgba[1, 1] = (200, 100, 50, 255)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(load_image(tmp_path / "rgba.png")).astype(int)
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [200, 100, 50]
    assert np.all(np.abs(out[1, 0] - 127) <= 1)  # half transparent black over white

    bits = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1")
    bits.save(tmp_path / "bits.png")
    assert np.asarray(load_image(tmp_path / "bits.png"))[:, :, 0].tolist() == [[0, 255], [255, 0]]


def write_png16(path: Path, values: np.ndarray) -> None:
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit RGB): gray (H x W) or RGB (H x W x 3)."""
    height, width = values.shape[:2]
    colour_type = 2 if values.ndim == 3 else 0
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_16_bit_pngs_map_onto_the_8_bit_range(tmp_path):
    gray = np.array([[0, 257, 32896], [40000, 65280, 65535]], dtype=np.uint16)
    write_png16(tmp_path / "gray16.png", gray)
    with Image.open(tmp_path / "gray16.png") as raw:
        assert raw.mode == "I;16"
    out = np.asarray(load_image(tmp_path / "gray16.png"))
    expected = np.floor(gray.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)  # 0..65535 -> 0..255
    assert expected.tolist() == [[0, 1, 128], [156, 254, 255]]
    assert np.array_equal(out, np.repeat(expected[..., None], 3, axis=2))

    colour = np.array([[[0, 256, 65535], [1000, 40000, 65280]]], dtype=np.uint16)
    write_png16(tmp_path / "rgb16.png", colour)
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgb16.png")), (colour >> 8).astype(np.uint8))


def test_huge_jpegs_decode_at_reduced_size_past_pillow_s_bomb_limit(tmp_path, monkeypatch):
    """A 12000 x 9000 JPEG: Pillow would refuse it under a lower limit; with a target size it is decoded at
    1/8 size, its true size is still reported, and an index of it is built without decoding 108 Mpx."""
    path = tmp_path / "photos" / "huge.jpg"
    path.parent.mkdir()
    started = time.perf_counter()
    Image.linear_gradient("L").resize((12000, 9000), Image.Resampling.BILINEAR).save(path, quality=60)
    made = time.perf_counter() - started
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000_000)  # a stricter setting: 108 Mpx is a "bomb"
    with pytest.raises(Image.DecompressionBombError), Image.open(path):
        pass  # what load_image let escape before: not an OSError

    decoded = decode_image(path, draft_size=64)
    assert decoded.image.size == (1500, 1125) and decoded.image.mode == "RGB" and decoded.size == (12000, 9000)
    assert Image.MAX_IMAGE_PIXELS == 20_000_000  # the lifted limit was restored

    monkeypatch.setattr(images_module, "MAX_DECODED_PIXELS", 50_000_000)
    with pytest.raises(DataError, match=r"too large to decode: 12000 x 9000 pixels.*downscale it first"):
        load_image(path)  # no target size: a full decode would exceed the budget
    report = build_index(tiny_spec(), path.parent, tmp_path / "index", **FAST)
    assert report.count == 1
    entry = RetrievalIndex.load(tmp_path / "index").entries[0]
    assert (entry.width, entry.height) == (12000, 9000)
    assert made < 20  # the test stays cheap


def test_draft_decoding_matches_a_full_decode_after_downscaling(tmp_path):
    path = tmp_path / "big.jpg"
    Image.linear_gradient("L").resize((5200, 3400)).convert("RGB").save(path, quality=90)  # over 16.8 Mpx
    full = load_image(path)
    draft = load_image(path, draft_size=256)
    assert full.size == (5200, 3400) and draft.size == (650, 425)  # 1/8: both sides still >= 256
    small_full = ImageOps.contain(full, (256, 256), Image.Resampling.LANCZOS)
    small_draft = ImageOps.contain(draft, (256, 256), Image.Resampling.LANCZOS)
    assert small_full.size == small_draft.size
    difference = np.abs(np.asarray(small_full, dtype=int) - np.asarray(small_draft, dtype=int))
    assert difference.mean() < 1.5 and difference.max() < 12
    small = tmp_path / "small.jpg"
    Image.linear_gradient("L").resize((800, 600)).save(small)
    assert load_image(small, draft_size=64).size == (800, 600)  # below the threshold: decoded in full


def test_an_unknown_exif_orientation_leaves_the_image_as_stored(tmp_path):
    pixels = np.full((8, 10, 3), 90, dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 99  # not an orientation
    Image.fromarray(pixels).save(tmp_path / "odd.jpg", exif=exif)
    assert load_image(tmp_path / "odd.jpg").size == (10, 8)


# -- model spec ------------------------------------------------------------------------------------
def test_model_spec_from_an_embedder_config_is_portable_and_fingerprints_weights_by_content(tmp_path, monkeypatch):
    from oxford_ir.models.backbones import ScratchCNN

    weights = tmp_path / "w" / "scratch.pth"
    weights.parent.mkdir()
    torch.manual_seed(1)
    torch.save(ScratchCNN(channels=[8, 16]).state_dict(), weights)
    monkeypatch.chdir(tmp_path)
    cfg = {"embedder": {**TINY, "backbone": {**TINY["backbone"], "weights": "w/scratch.pth"}}}
    spec = ModelSpec.from_config(cfg)
    assert spec.embedder["backbone"]["weights"] == str(weights.resolve())  # absolute: builds from anywhere
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())), source="manifest.json") == spec
    assert "ScratchCNN(channels=[8, 16], weights=" in spec.describe() and "GeM()" in spec.describe()
    fingerprint = spec.fingerprint()

    moved = tmp_path / "elsewhere.pth"
    moved.write_bytes(weights.read_bytes())
    moved_spec = ModelSpec(embedder={**TINY, "backbone": {**TINY["backbone"], "weights": str(moved)}})
    assert moved_spec.fingerprint() == fingerprint  # same content, same model
    torch.manual_seed(2)
    torch.save(ScratchCNN(channels=[8, 16]).state_dict(), weights)
    assert spec.fingerprint() != fingerprint  # retrained into the same path: another model
    assert tiny_spec().fingerprint() != tiny_spec(p=2.0).fingerprint()

    a, b = tiny_spec().build(), tiny_spec().build()  # random initialisation is seeded: rebuildable
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert not a.training

    weights.unlink()
    with pytest.raises(ConfigError, match="weights file not found"):
        spec.fingerprint()
    with pytest.raises(ConfigError, match="exactly one"):
        ModelSpec()


def test_a_checkpoint_model_indexes_with_the_checkpoint_s_weights(tmp_path):
    from oxford_ir.models.module import RetrievalModule

    module = RetrievalModule(
        embedder={**TINY, "pooling": {**TINY["pooling"], "p": 3.0}},
        loss={"_target_": "pytorch_metric_learning.losses.TripletMarginLoss", "margin": 0.1},
        miner={"_target_": "pytorch_metric_learning.miners.BatchHardMiner"},
        distance={"_target_": "pytorch_metric_learning.distances.CosineSimilarity"},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2},
    )
    with torch.no_grad():
        module.embedder.backbone.blocks[0][0].weight.mul_(-1.5)  # not what a fresh config would build
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, checkpoint)

    with pytest.raises(CheckpointError, match="no such file"):
        ModelSpec.from_config({"ckpt_path": str(tmp_path / "missing.ckpt")})
    spec = ModelSpec.from_config({"ckpt_path": str(checkpoint), "embedder": TINY})
    assert spec.checkpoint == str(checkpoint.resolve()) and spec.describe() == f"checkpoint {checkpoint.resolve()}"
    names = make_folder(tmp_path / "photos", n=5)
    build_index(spec, tmp_path / "photos", tmp_path / "index", dtype="float32", **FAST)
    index = RetrievalIndex.load(tmp_path / "index")
    expected = extract_embeddings(module.embedder, [tmp_path / "photos" / n for n in names], 32)
    np.testing.assert_allclose(index.vectors(), expected.numpy(), atol=1e-6)
    rebuilt = index.build_model()  # the model the index names embeds as the index did
    np.testing.assert_allclose(
        extract_embeddings(rebuilt, [tmp_path / "photos" / n for n in names], 32).numpy(), index.vectors(), atol=1e-6
    )

    module.embedder.pooling.p.data.fill_(2.0)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, checkpoint)
    with pytest.raises(IndexFormatError, match="changed on disk since the index was built"):
        index.build_model()


# -- real images -----------------------------------------------------------------------------------
def index_paris(tmp_path: Path, images, mobilenet_weights: Path, image_size: int, count_embedded) -> None:
    """Index real Paris photos with the pretrained MobileNetV2 + GeM; a re-run embeds nothing."""
    spec = ModelSpec(
        embedder={
            "_target_": "oxford_ir.models.embedder.Embedder",
            "backbone": {"_target_": "oxford_ir.models.backbones.MobileNetV2", "weights": str(mobilenet_weights)},
            "pooling": {"_target_": "oxford_ir.models.pooling.GeM", "p": 3.0},
        }
    )
    source = resolve_images(images)
    settings = {"image_size": image_size, "batch_size": 16, "num_workers": 2, "progress": False}
    started = time.perf_counter()
    report = build_index(spec, source, tmp_path / "index", **settings)
    elapsed = time.perf_counter() - started
    assert report.count + len(report.skipped) == len(source.paths) == count_embedded["images"] + len(report.skipped)
    assert report.count >= 0.95 * len(source.paths) and report.embedding_dim == 1280
    index = RetrievalIndex.load(tmp_path / "index")
    assert len(index) == report.count and index.embeddings.dtype == np.float16
    assert all(max(e.width, e.height) == 1024 for e in index.entries)  # the originals, not the resized input
    np.testing.assert_allclose(np.linalg.norm(index.vectors(), axis=1), 1.0, atol=2e-3)

    count_embedded["images"] = 0
    again = build_index(spec, source, tmp_path / "index", **settings)
    assert count_embedded["images"] == 0 and again.embedded == 0 and not again.wrote and again.kept == report.count
    print(f"indexed {report.count} Paris images in {elapsed:.1f} s; re-run {again.seconds:.2f} s")


@pytest.mark.shared_data
def test_a_few_paris_images_with_pretrained_mobilenet(tmp_path, paris_root, mobilenet_weights, count_embedded):
    index_paris(tmp_path, f"{paris_root}/jpg/paris_*_00000*.jpg", mobilenet_weights, 128, count_embedded)


@pytest.mark.slow
@pytest.mark.shared_data
def test_all_paris_images_with_pretrained_mobilenet(tmp_path, paris_root, mobilenet_weights, count_embedded):
    index_paris(tmp_path, paris_root / "jpg", mobilenet_weights, 224, count_embedded)


# -- sharded across processes ------------------------------------------------------------------------
def _build_in_process_group(rank: int, world: int, init_file: str, photos: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        report = build_index(tiny_spec(), photos, out, **{**FAST, "batch_size": 2})
        assert report.wrote == (rank == 0) and report.count == 11
    finally:
        dist.destroy_process_group()


def test_an_index_built_by_two_processes_is_identical_to_one_process(tmp_path):
    """Two gloo processes embed every other planned batch; the first writes: same rows, bit for bit."""
    import torch.multiprocessing as mp

    photos = tmp_path / "photos"
    make_folder(photos, n=12)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # skipped and reported either way
    (photos / "img_05.png").unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker process
    try:
        build_index(tiny_spec(), photos, tmp_path / "single", **{**FAST, "batch_size": 2})
    finally:
        torch.set_num_threads(threads)
    mp.spawn(
        _build_in_process_group,
        args=(2, str(tmp_path / "init"), str(photos), str(tmp_path / "sharded")),
        nprocs=2,
        join=True,
    )
    single, sharded = RetrievalIndex.load(tmp_path / "single"), RetrievalIndex.load(tmp_path / "sharded")
    assert sharded.entries == single.entries and len(sharded) == 11
    assert np.array_equal(sharded.embeddings, single.embeddings)
    assert [s.path for s in sharded.skipped] == [s.path for s in single.skipped] == ["broken.jpg"]


# -- bucket shapes: chosen by the first build, kept by updates and searches ----------------------------------------
def test_the_bucket_table_is_kept_for_updates_and_queries(tmp_path):
    from oxford_ir.retrieval.search import Searcher

    photos = tmp_path / "photos"
    for i, size in enumerate([(40, 30), (30, 40), (44, 30), (36, 28), (40, 30)]):
        write_photo(photos / f"p{i}.png", seed=i, size=size)
    out = tmp_path / "index"
    options = {**FAST, "image_size": 64, "dtype": "float32", "max_shapes": 2}
    build_index(tiny_spec(), photos, out, **options)
    first = RetrievalIndex.load(out)
    assert first.batching == "bucket" and 1 <= len(first.buckets) <= 2
    assert first.manifest["extraction"]["buckets"] == [list(b) for b in first.buckets]
    # an update with an image no bucket holds: old rows and buckets kept, one bucket added for it
    write_photo(photos / "square.png", seed=9, size=(80, 80))  # 64 x 64: neither 32 x 64 nor 64 x 32 holds it
    build_index(tiny_spec(), photos, out, **options)
    updated = RetrievalIndex.load(out)
    assert set(first.buckets) < set(updated.buckets) and len(updated.buckets) == len(first.buckets) + 1
    for path, row in rows_by_path(first).items():
        assert np.array_equal(rows_by_path(updated)[path], row)
    # every row equals the image embedded alone, and a search embeds a query with the index's table
    model = tiny_spec().build()
    paths = [photos / e.path for e in updated.entries]
    exact = extract_embeddings(model, paths, 64, batching="shape").numpy()
    np.testing.assert_allclose(updated.embeddings, exact, atol=1e-5)
    queries = Searcher(updated, batch_size=3).embed_images(paths[:3])
    np.testing.assert_allclose(queries, updated.embeddings[:3], atol=1e-5)
