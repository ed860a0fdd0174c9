"""retrieval-SfM-120k: the reader against hand-built expectations, malformed and unsafe pickles, the miniature, and
the download against the 127.0.0.1 server."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oxford_ir.benchmarks.download import STATE_FILE, download_dataset, load_sources
from oxford_ir.benchmarks.miniature_sfm120k import miniature_archive, miniature_sfm120k, write_miniature_sfm120k
from oxford_ir.benchmarks.sfm120k import PICKLE_NAME, read_sfm120k, read_sfm120k_pickle
from oxford_ir.errors import DataError, GroundTruthError, UnsafePickleError
from tests.benchmarks.http_server import FileServer

FAST = {"progress": False, "backoff": 0.0, "timeout": 5.0}
#: 32-hex-digit ids like the published ones (29fdc243aeb939388cfdf2d081dc080e)
A = "0123456789abcdef0123456789ab01ef"
B = "fedcba9876543210fedcba98765432a1"
C = "00112233445566778899aabbccddeeff"
D = "ffeeddccbbaa99887766554433221100"
E = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
F = "13572468135724681357246813572468"
G = "9999888877776666555544443333cafe"


def database() -> dict:
    """Two parts by hand: train = 4 images of clusters 7, 3, 7, 3 with pairs (0, 2) and (1, 3); val = 3 images
    of clusters 7, 7, 0 with the pair (1, 0)."""
    return {
        "train": {"cids": [A, B, C, D], "cluster": [7, 3, 7, 3], "qidxs": [0, 1], "pidxs": [2, 3]},
        "val": {"cids": [E, F, G], "cluster": [7, 7, 0], "qidxs": [1], "pidxs": [0]},
    }


def write(folder: Path, data: object, protocol: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PICKLE_NAME).write_bytes(pickle.dumps(data, protocol=protocol))
    return folder


def test_reader_builds_the_collection_by_hand(tmp_path: Path) -> None:
    folder = write(tmp_path / "retrieval-SfM-120k", database())
    for root in (tmp_path, folder):  # the data folder or the dataset folder
        collection = read_sfm120k(root)
        assert collection.name == "sfm120k"
        assert collection.root == folder / "ims"
        assert collection.source == folder / PICKLE_NAME
        assert collection.paths.tolist() == [
            "ef/01/ab/0123456789abcdef0123456789ab01ef",
            "a1/32/54/fedcba9876543210fedcba98765432a1",
            "ff/ee/dd/00112233445566778899aabbccddeeff",
            "00/11/22/ffeeddccbbaa99887766554433221100",
            "90/8f/7e/a1b2c3d4e5f60718293a4b5c6d7e8f90",
            "68/24/57/13572468135724681357246813572468",
            "fe/ca/33/9999888877776666555544443333cafe",
        ]
        # labels are per part: val's cluster 7 is not train's cluster 7
        assert collection.label_names.tolist() == ["train/3", "train/7", "val/0", "val/7"]
        assert collection.labels.tolist() == [1, 0, 1, 0, 3, 3, 2]
        assert collection.split.tolist() == [0, 0, 0, 0, 1, 1, 1]
        assert collection.rows("val").tolist() == [4, 5, 6]
        assert collection.is_query.tolist() == [True, True, False, False, False, True, False]
        assert collection.is_gallery.all()
        assert np.isnan(collection.boxes).all() and collection.ignore == {}
    parts = read_sfm120k_pickle(folder / PICKLE_NAME)
    assert parts["train"].qidxs.tolist() == [0, 1] and parts["train"].pidxs.tolist() == [2, 3]
    assert parts["val"].qidxs.tolist() == [1] and parts["val"].pidxs.tolist() == [0]


def test_cnnimageretrieval_layout_and_numpy_columns_are_read(tmp_path: Path) -> None:
    data = database()
    data["train"] = {key: np.asarray(value) for key, value in data["train"].items()}
    data["val"]["cids"] = [cid.encode() for cid in data["val"]["cids"]]  # bytes, as a Python 2 str may come back
    write(tmp_path / "train" / "retrieval-SfM-120k", data, protocol=4)
    collection = read_sfm120k(tmp_path)
    assert collection.root == tmp_path / "train" / "retrieval-SfM-120k" / "ims"
    assert collection.labels.tolist() == [1, 0, 1, 0, 3, 3, 2]
    assert collection.paths[5] == "68/24/57/13572468135724681357246813572468"


def _set(part: str, key: str, value: object):
    def mutate(data: dict) -> dict:
        data[part][key] = value
        return data

    return mutate


def _drop(part: str, key: str | None = None):
    def mutate(data: dict) -> dict:
        if key is None:
            del data[part]
        else:
            del data[part][key]
        return data

    return mutate


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda data: [data], "expected a dict with parts 'train', 'val', got list"),
        (_drop("val"), "no part 'val'"),
        (_set("val", "cids", "abc"), "part 'val' 'cids' must be a list of image ids"),
        (_drop("train", "pidxs"), "part 'train' has no key 'pidxs'"),
        (_drop("val", "cluster"), "part 'val' has no key 'cluster'"),
        (_set("train", "cluster", [7, 3, 7]), "part 'train': 'cluster' has 3 entries for 4 'cids'"),
        (_set("train", "cluster", [7, 3, None, 3]), r"part 'train' 'cluster'\[2\] is None"),
        (_set("train", "qidxs", [0, 4]), r"part 'train' 'qidxs'\[1\] = 4 is out of range for the part's 4 'cids'"),
        (_set("val", "pidxs", [-1]), r"part 'val' 'pidxs'\[0\] = -1 is out of range"),
        (_set("val", "qidxs", [1.0]), r"part 'val' 'qidxs'\[0\] is 1.0; expected integer positions"),
        (_set("train", "pidxs", [2]), "'qidxs' has 2 queries but 'pidxs' 1 positives"),
        (_set("train", "cids", [A, B, 17, D]), r"part 'train' 'cids'\[2\] is 17"),
        (_set("train", "cids", [A, B, "../../etc/passwd", D]), r"'cids'\[2\] '../../etc/passwd' is not a plain file"),
        (_set("val", "cids", [E, "abc", G]), r"'cids'\[1\] 'abc' has fewer than the 6 characters"),
        (_set("val", "cids", [E, F, "abcdef\0"]), r"'cids'\[2\] 'abcdef\\x00' holds a NUL byte"),
    ],
)
def test_malformed_pickle_is_one_line_naming_file_part_and_key(tmp_path: Path, mutate, expected: str) -> None:
    folder = write(tmp_path, mutate(database()))
    with pytest.raises(GroundTruthError, match=expected) as error:
        read_sfm120k(folder)
    message = str(error.value)
    assert message.startswith(f"{folder / PICKLE_NAME}: ") and "\n" not in message


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_holding_a_class_or_a_call_is_refused_without_running_it(tmp_path: Path) -> None:
    data = database()
    data["val"]["cluster"] = [7, 7, Path("/etc")]  # a class of some package, deep inside plain data
    folder = write(tmp_path / "a", data)
    with pytest.raises(UnsafePickleError, match=r"asks for pathlib\.\w*Path.*nothing was executed"):
        read_sfm120k(folder)

    marker = tmp_path / "pwned"
    data = database()
    data["train"]["qidxs"] = [0, _Exploit(marker)]
    folder = write(tmp_path / "b", data)
    with pytest.raises(UnsafePickleError, match="asks for posix.system"):
        read_sfm120k(folder)
    assert not marker.exists()
    pickle.loads((folder / PICKLE_NAME).read_bytes())  # the exploit is real: an unrestricted load runs it
    assert marker.exists()


def test_missing_or_unfinished_folder_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no retrieval-SfM-120k.pkl in .*oxford-ir-data download sfm120k"):
        read_sfm120k(tmp_path)
    folder = write(tmp_path / "retrieval-SfM-120k", database())
    (folder / STATE_FILE).write_text("{}")
    with pytest.raises(DataError, match="unfinished download .*oxford-ir-data download sfm120k"):
        read_sfm120k(tmp_path)


def test_repeated_ids_are_kept_as_rows_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = database()
    data["val"]["cids"] = [E, E, A]  # E twice in val, A in train and val
    with caplog.at_level(logging.WARNING, logger="oxford_ir.benchmarks.sfm120k"):
        collection = read_sfm120k(write(tmp_path, data))
    assert len(collection) == 7 and collection.paths[6] == collection.paths[0]
    assert "1 image ids are listed more than once in part 'val'" in caplog.text
    assert f"1 images are in both 'train' and 'val' (e.g. {A})" in caplog.text


# -- the miniature ----------------------------------------------------------------------------------


def test_miniature_is_the_published_layout_with_hand_counted_rows(tmp_path: Path) -> None:
    folder = write_miniature_sfm120k(tmp_path / "retrieval-SfM-120k", seed=3)
    raw = pickle.loads((folder / PICKLE_NAME).read_bytes())  # plain lists: the published pickle's types
    assert sorted(raw) == ["train", "val"] and all(sorted(raw[p]) == ["cids", "cluster", "pidxs", "qidxs"] for p in raw)
    collection = read_sfm120k(tmp_path)
    assert len(collection) == 6 * 8 + 3 * 6
    assert collection.rows("train").tolist() == list(range(48))
    assert collection.class_sizes().tolist() == [8] * 6 + [6] * 3
    assert collection.is_query.sum() == 2 * 9  # two pairs per cluster
    for offset, part in ((0, raw["train"]), (48, raw["val"])):
        assert all(re.fullmatch(r"[0-9a-f]{32}", cid) for cid in part["cids"])
        queries, positives = np.array(part["qidxs"]), np.array(part["pidxs"])
        assert np.flatnonzero(collection.is_query[offset : offset + len(part["cids"])]).tolist() == sorted(queries)
        cluster = np.array(part["cluster"])
        assert (cluster[queries] == cluster[positives]).all() and not np.intersect1d(queries, positives).size
    for path, relative in zip(collection.image_paths(), collection.paths.tolist(), strict=True):
        cid = relative.rsplit("/", 1)[1]
        assert relative == f"{cid[30:]}/{cid[28:30]}/{cid[26:28]}/{cid}" and path.suffix == ""
        with Image.open(path) as image:
            assert image.format == "JPEG" and sorted(image.size) == [48, 64]
    # deterministic for a seed, different for another
    assert miniature_sfm120k(seed=3).pickle_bytes == (folder / PICKLE_NAME).read_bytes()
    assert miniature_sfm120k(seed=4).pickle_bytes != (folder / PICKLE_NAME).read_bytes()


def test_miniature_clusters_look_alike_within_and_differ_across(tmp_path: Path) -> None:
    """Mean colours of the shape pixels are closer within a cluster than across (a network has something to learn)."""
    miniature = miniature_sfm120k(seed=0)
    part = miniature.database["train"]
    means = []
    for cid in part["cids"]:
        relative = f"{cid[-2:]}/{cid[-4:-2]}/{cid[-6:-4]}/{cid}"
        image = np.asarray(Image.open(io.BytesIO(miniature.images[relative])).convert("RGB"), dtype=float)
        h, w = image.shape[:2]
        means.append(image[h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4].reshape(-1, 3).mean(0))
    means, cluster = np.array(means), np.array(part["cluster"])
    distance = np.linalg.norm(means[:, None] - means[None], axis=-1)
    same = cluster[:, None] == cluster[None]
    assert distance[same].mean() * 2 < distance[~same].mean()


# -- the download -------------------------------------------------------------------------------


def test_sources_name_the_published_files() -> None:
    sources = {source.filename: source for source in load_sources("sfm120k")}
    assert sources["ims.tar.gz"].url == "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/ims/ims.tar.gz"
    assert sources["ims.tar.gz"].extract_to == "ims" and not sources["ims.tar.gz"].flatten
    pkl = sources["retrieval-SfM-120k.pkl"]
    assert pkl.url == "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/dbs/retrieval-SfM-120k.pkl"
    assert pkl.extract_to is None


def test_download_of_the_miniature_resumes_and_reads_back(server: FileServer, tmp_path: Path) -> None:
    miniature = miniature_sfm120k(seed=1)
    server.files["ims.tar.gz"] = archive = miniature_archive(miniature.images)
    server.files[PICKLE_NAME] = miniature.pickle_bytes
    server.behaviour["ims.tar.gz"] = "truncate_once"  # the connection drops halfway; the retry resumes
    sources = [  # the published entries, served here, with the served files' checksums
        dataclasses.replace(
            source,
            url=f"{server.url}/{source.filename}",
            sha256=hashlib.sha256(server.files[source.filename]).hexdigest(),
        )
        for source in load_sources("sfm120k")
    ]
    folder = download_dataset("sfm120k", tmp_path / "data", sources, retries=1, **FAST)

    assert folder == tmp_path / "data" / "retrieval-SfM-120k"
    assert server.ranges("ims.tar.gz") == [None, f"bytes={len(archive) // 2}-"]
    collection = read_sfm120k(tmp_path / "data")
    assert len(collection) == 66 and collection.is_query.sum() == 18
    files = {p.relative_to(collection.root).as_posix(): p.read_bytes() for p in collection.image_paths()}
    assert files == miniature.images


# -- training through the real reader --------------------------------------------------------------


def test_training_on_the_miniature_reads_it_through_the_registry(tmp_path: Path) -> None:
    """``data=sfm120k``: trains on the train part's 3D models, validates on the val part (6 queries, 18 photos)."""
    from oxford_ir.cli.train import train
    from tests.test_train import TINY_SCRATCH, compose_train, read_csv_metrics

    write_miniature_sfm120k(tmp_path / "data" / "retrieval-SfM-120k")
    cfg = compose_train(
        tmp_path, "data=sfm120k", "data.image_size=32", "data.eval_image_size=48", "data.classes_per_batch=3",
        "data.images_per_class=2", "data.batches_per_epoch=2", "data.num_workers=0", "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "logger=csv", "test=false", *TINY_SCRATCH,
    )  # fmt: skip
    metrics, objects = train(cfg)
    split = objects["datamodule"].split
    assert split.kind == "collection" and split.num_classes == 6 and len(split) == 48
    assert split.label_names == [f"train/{c}" for c in range(6)]
    evaluated = split.eval_benchmark
    assert (evaluated.n_queries, evaluated.n_db) == (6, 18)
    trained = {str(p) for p in split.paths}
    assert not trained & {str(p) for p in [*evaluated.db_paths, *evaluated.query_paths]}
    logged = {key for row in read_csv_metrics(tmp_path / "run") for key, value in row.items() if value}
    assert {"val/mAP", "val/sfm120k/mAP", "val/sfm120k/R@1"} <= logged
    assert 0.0 < metrics["val/mAP"] <= 1.0


def test_load_benchmark_of_sfm120k_is_the_val_part(tmp_path: Path) -> None:
    """``oxford-ir-eval benchmarks=[sfm120k]``: each val query against every val photo, positives = its cluster."""
    from oxford_ir.benchmarks.registry import dataset_folder, is_collection, load_benchmark

    write(tmp_path / "retrieval-SfM-120k", database())
    assert is_collection("sfm120k") and dataset_folder("sfm120k") == "retrieval-SfM-120k"
    with pytest.raises(DataError, match="3 of 3 database and query images are missing"):
        load_benchmark("sfm120k", tmp_path)
    for cid in (E, F, G):
        path = tmp_path / "retrieval-SfM-120k" / "ims" / f"{cid[-2:]}/{cid[-4:-2]}/{cid[-6:-4]}/{cid}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12)).save(path, format="JPEG")
    benchmark = load_benchmark("sfm120k", tmp_path)
    # val: E, F (cluster 7), G (cluster 0); the one query is F: positive E, itself junk
    assert [p.name for p in benchmark.db_paths] == [E, F, G] and [p.name for p in benchmark.query_paths] == [F]
    assert benchmark.gnd[0]["ok"].tolist() == [0] and benchmark.gnd[0]["junk"].tolist() == [1]


def test_data_download_true_fetches_sfm120k(tmp_path: Path, monkeypatch) -> None:
    """``data.download=true`` reaches the downloader for ``sfm120k`` (a collection read where it lies otherwise); the
    remote files cannot be reached here, so the call is recorded instead."""
    from oxford_ir.benchmarks import prepare

    calls = []
    monkeypatch.setattr(prepare, "download_dataset", lambda name, root: calls.append((name, root)) or root / name)
    prepare.prepare_benchmark("sfm120k", tmp_path / "data", download=True)
    assert calls == [("sfm120k", tmp_path / "data")]
    assert prepare.prepare_benchmark("sfm120k", tmp_path / "data") == Path("retrieval-SfM-120k")
    assert len(calls) == 1
