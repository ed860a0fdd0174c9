"""The server follows its index folder: ``oxford-ir-index`` updates (build_index, in this process) while a real
server answers several clients, and every answer comes from exactly one committed version; a thumbnail is only
ever the picture that its version's embedding was computed from."""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from oxford_ir.retrieval.index_format import RetrievalIndex  # noqa: E402
from oxford_ir.retrieval.search import Searcher  # noqa: E402
from oxford_ir.web.app import ServeSettings, create_app  # noqa: E402
from oxford_ir.web.thumbnails import make_thumbnail  # noqa: E402
from tests.web.live_server import running  # noqa: E402
from tests.web.tiny_index import N_IMAGES, build_tiny_index, draw_picture, update_tiny_index  # noqa: E402

REPLACED = "a/scene_02.jpg"
DELETED = "b/scene_07.jpg"
THUMB = 32


@dataclass
class Version:
    """What the test knows of one committed version: its rows, vectors and thumbnails of the changing files."""

    index: RetrievalIndex
    thumbs: dict[str, bytes]


def snapshot(index_dir: Path, images: Path) -> Version:
    """The version ``CURRENT`` names now, and the thumbnails of the replaced and deleted files as they are now."""
    index = RetrievalIndex.load(index_dir)
    thumbs = {p: make_thumbnail(images / p, THUMB) for p in (REPLACED, DELETED) if (images / p).exists()}
    return Version(index, thumbs)


def replace_picture(path: Path, seed: int) -> None:
    """Another picture at ``path``, with a different mtime even on a coarse clock."""
    old = path.stat().st_mtime_ns
    draw_picture(path, seed)
    os.utime(path, ns=(old + 5_000_000_000, old + 5_000_000_000))


def point_current(index_dir: Path, version: str) -> None:
    """``CURRENT`` names ``version``, replaced at once as a build replaces it (the server polls the file: written in
    place, it could be read empty)."""
    (index_dir / "CURRENT.tmp").write_text(f"{version}\n")
    os.replace(index_dir / "CURRENT.tmp", index_dir / "CURRENT")


def get(connection: http.client.HTTPConnection, url: str) -> tuple[int, bytes]:
    connection.request("GET", url)
    response = connection.getresponse()
    return response.status, response.read()


def test_live_update_under_load_answers_from_one_version(tmp_path: Path) -> None:
    """Clients search, ask for /api/info and for the thumbnails of the files that change, while the index is
    updated twice (5 images added; then one deleted and one replaced by another picture): no 5xx, every
    answer consistent with exactly one version, and the server ends on the last one."""
    index_dir = build_tiny_index(tmp_path)
    images = tmp_path / "images"
    first = snapshot(index_dir, images)
    versions = {first.index.version: first}
    settings = ServeSettings(k=5, max_k=30, thumb_cache_mb=0, index_check_s=0.0)  # no cache: every thumb reads
    app = create_app(Searcher(first.index), first.index, settings)
    records: list[tuple[str, str, int, bytes, object]] = []  # (kind, url, status, body, context)
    stop = threading.Event()
    errors: list[BaseException] = []

    def client(seed: int, address: tuple[str, int]) -> None:
        rng = random.Random(seed)
        connection = http.client.HTTPConnection(*address, timeout=30)
        try:
            while not stop.is_set():
                url = f"/api/search?id={rng.randrange(N_IMAGES - 1)}&k=5"
                records.append(("search", url, *get(connection, url), None))
                records.append(("info", "/api/info", *get(connection, "/api/info"), None))
                for path in (REPLACED, DELETED):  # the page's way: list it, then fetch its thumbnail URL
                    status, body = get(connection, f"/api/images?q={path}")
                    records.append(("images", path, status, body, None))
                    if status == 200 and json.loads(body)["items"]:
                        listing = json.loads(body)
                        url = listing["items"][0]["thumb"].replace("size=256", f"size={THUMB}")
                        records.append(("thumb", url, *get(connection, url), (path, listing["version"])))
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)
        finally:
            connection.close()

    with running(app) as address:
        threads = [threading.Thread(target=client, args=(seed, address)) for seed in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        for n in range(5):
            draw_picture(images / "c" / f"added_{n}.jpg", seed=n)
        update_tiny_index(tmp_path)
        second = snapshot(index_dir, images)
        versions[second.index.version] = second
        time.sleep(0.3)
        (images / DELETED).unlink()
        replace_picture(images / REPLACED, seed=99)
        time.sleep(0.3)  # the old version is served while its files have changed on disk
        update_tiny_index(tmp_path)
        last = snapshot(index_dir, images)
        versions[last.index.version] = last
        deadline = time.monotonic() + 15
        connection = http.client.HTTPConnection(*address, timeout=30)
        while json.loads(get(connection, "/api/info")[1])["version"] != last.index.version:
            assert time.monotonic() < deadline, "the server did not switch to the new version"
            time.sleep(0.05)
        connection.close()
        time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not errors, errors
    assert [v.index.version for v in versions.values()] == ["v000001", "v000002", "v000003"]
    assert len(last.index) == N_IMAGES + 5 - 1

    statuses = [status for _, _, status, _, _ in records]
    assert all(status < 500 for status in statuses), [r[:3] for r in records if r[2] >= 500]
    seen_versions = set()
    tokens: dict[str, str] = {}  # version -> the v token of its answers
    checked_thumbs = {"200": 0, "refused": 0}
    for kind, url, status, body, context in records:
        if kind == "search":
            assert status == 200, (url, body)
            payload = json.loads(body)
            version = versions[payload["version"]]
            seen_versions.add(payload["version"])
            assert tokens.setdefault(payload["version"], payload["v"]) == payload["v"]
            entries, vectors = version.index.entries, version.index.vectors(np.float32)
            query = payload["query"]
            assert query["path"] == entries[query["id"]].path
            scores = vectors @ vectors[query["id"]]
            expected = np.argsort(-scores, kind="stable")[:5]
            assert [r["id"] for r in payload["results"]] == expected.tolist(), (url, payload["version"])
            assert [r["path"] for r in payload["results"]] == [entries[i].path for i in expected]
            assert [r["score"] for r in payload["results"]] == pytest.approx(scores[expected].tolist(), abs=1e-4)
            assert all(f"v={payload['v']}" in r["thumb"] for r in payload["results"])
        elif kind == "info":
            assert status == 200
            info = json.loads(body)
            version = versions[info["version"]]
            assert info["images"] == len(version.index)
            assert tokens.setdefault(info["version"], info["v"]) == info["v"]
            assert info["built"] == version.index.manifest["created"]
        elif kind == "images":
            assert status == 200
            payload = json.loads(body)
            version = versions[payload["version"]]
            paths = [e.path for e in version.index.entries]
            assert [i["id"] for i in payload["items"]] == ([paths.index(url)] if url in paths else [])
        else:
            path, name = context
            version = versions[name]
            if status == 200:  # the picture of this version's embedding, never the file that replaced it
                assert body == version.thumbs[path], (url, name)
                checked_thumbs["200"] += 1
            else:
                message = json.loads(body)["error"]
                assert (status, path) in {(409, REPLACED), (404, DELETED)}, (url, status, message)
                assert name != last.index.version and str(tmp_path) not in message
                checked_thumbs["refused"] += 1
    assert seen_versions == set(versions), seen_versions  # the clients were served by every version
    assert checked_thumbs["200"] > 0 and checked_thumbs["refused"] > 0, checked_thumbs
    assert len(set(tokens.values())) == len(versions)  # one v token per version, another for each


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, TestClient]:
    """A fresh tiny index (this test changes it) and a client of a server that looks at CURRENT every request."""
    index_dir = build_tiny_index(tmp_path)
    index = RetrievalIndex.load(index_dir)
    app = create_app(Searcher(index), index, ServeSettings(k=3, index_check_s=0.0))
    with TestClient(app) as client:
        yield tmp_path, client


def listed(client: TestClient, path: str) -> dict:
    payload = client.get("/api/images", params={"q": path}).json()
    (item,) = payload["items"]
    return {**item, "v": payload["v"], "version": payload["version"]}


def test_a_replaced_file_is_never_shown_as_the_old_versions_image(tiny: tuple[Path, TestClient]) -> None:
    root, client = tiny
    images = root / "images"
    before = listed(client, REPLACED)
    old_picture = make_thumbnail(images / REPLACED, 40)
    cached = client.get(before["thumb"])  # cached under the old file's entry
    assert cached.status_code == 200
    replace_picture(images / REPLACED, seed=7)
    new_picture = make_thumbnail(images / REPLACED, 40)
    assert new_picture != old_picture

    # the served version still holds the old embedding: the new picture must not appear beside it
    for url in (f"/thumb/{before['id']}?size=40&v={before['v']}", f"/thumb/{before['id']}?size=40"):
        refused = client.get(url)
        assert refused.status_code == 409, (url, refused.status_code)
        message = refused.json()["error"]
        assert f"({REPLACED}) was replaced on disk after index version v000001 was built" in message
        assert str(root) not in message
    assert client.get(before["thumb"]).content == cached.content  # the old picture, under the old version's URL
    boxed = client.get("/api/search", params={"id": before["id"], "bbox": "0,0,30,30", "v": before["v"]})
    assert boxed.status_code == 409  # nor is the new picture embedded as the old entry's query

    old_ids = {item["path"]: item["id"] for item in client.get("/api/images", params={"q": "scene"}).json()["items"]}
    draw_picture(images / "a" / "0_added.jpg", seed=5)  # sorts first: the rows of the other images move
    assert update_tiny_index(root) == "v000002"
    client.app.state.served.newest()  # the new version is loaded in the background: wait for it
    after = listed(client, REPLACED)
    assert (after["version"], after["v"] != before["v"]) == ("v000002", True)
    assert client.get(after["thumb"].replace("size=256", "size=40")).content == new_picture
    assert client.get(f"/thumb/{before['id']}?size=40&v={before['v']}").status_code == 409  # still not the new one
    assert client.get("/api/info").json()["version"] == "v000002"

    # an id listed by the old version: the same image in the new one if it did not change, else 409
    kept = listed(client, "b/scene_08.jpg")
    assert kept["id"] == old_ids["b/scene_08.jpg"] + 1
    answer = client.get("/api/search", params={"id": old_ids["b/scene_08.jpg"], "v": before["v"]})
    assert answer.status_code == 200 and answer.json()["query"] == {
        **answer.json()["query"],
        "id": kept["id"],
        "path": "b/scene_08.jpg",
    }
    stale = client.get("/api/search", params={"id": before["id"], "v": before["v"]})
    assert stale.status_code == 409 and "changed or removed by the index update to v000002" in stale.json()["error"]
    unknown = client.get("/thumb/0", params={"v": "0123456789ab"})
    assert unknown.status_code == 409 and "reload the page" in unknown.json()["error"]


def test_a_version_that_fails_to_load_leaves_the_old_one_served(
    tiny: tuple[Path, TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    root, client = tiny
    index_dir = root / "index"
    info = client.get("/api/info").json()
    manifest = json.loads((index_dir / "v000001" / "manifest.json").read_text())
    assert (info["version"], info["built"], info["built_source"]) == ("v000001", manifest["created"], "manifest")
    broken = index_dir / "v000002"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="oxford_ir.web.served_index"):
        (index_dir / "CURRENT").write_text("")  # another tool writing it in place, caught half-way: not an error
        assert client.get("/api/info").json()["version"] == "v000001"
        client.app.state.served.newest()
        assert not [r for r in caplog.records if r.name == "oxford_ir.web.served_index"]
        point_current(index_dir, "v000002")
        for _ in range(5):
            assert client.get("/api/info").json()["version"] == "v000001"
            assert client.get("/api/search", params={"id": 1}).status_code == 200
            client.app.state.served.newest()
    lines = [r.getMessage() for r in caplog.records if r.name == "oxford_ir.web.served_index"]
    assert len(lines) == 1 and "version v000002 cannot be served" in lines[0] and "still serving v000001" in lines[0]
    point_current(index_dir, "v000001")  # the next build reads the folder again
    draw_picture(root / "images" / "c" / "one_more.jpg", seed=3)
    version = update_tiny_index(root)
    client.app.state.served.newest()
    info = client.get("/api/info").json()
    assert (info["version"], info["images"]) == (version, N_IMAGES + 1)


def test_the_thumbnail_cache_never_answers_a_replaced_file_with_its_old_picture(tiny: tuple[Path, TestClient]) -> None:
    """Same id, same size, before and after: the cache is keyed by the file as indexed, not by the row."""
    root, client = tiny
    images = root / "images"
    before = listed(client, REPLACED)
    old_picture = client.get(before["thumb"]).content  # now cached
    assert old_picture == make_thumbnail(images / REPLACED, 256)
    replace_picture(images / REPLACED, seed=11)
    assert update_tiny_index(root) == "v000002"
    client.app.state.served.newest()
    after = listed(client, REPLACED)
    assert (after["id"], after["version"]) == (before["id"], "v000002")
    fresh = client.get(after["thumb"])
    assert fresh.status_code == 200 and fresh.content == make_thumbnail(images / REPLACED, 256) != old_picture
    assert client.get(before["thumb"]).content == old_picture  # the old version's URL: still its own picture
