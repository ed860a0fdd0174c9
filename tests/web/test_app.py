"""The web app's HTTP API on a real tiny index: searches against brute force, every bad request's status and
message, thumbnails only by id (no path traversal, also over a real socket), and the CLI's error exit."""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from oxford_ir.cli.serve import bind_socket, build_app  # noqa: E402
from oxford_ir.errors import ConfigError, DataError  # noqa: E402
from oxford_ir.extraction.embedding import extract_embeddings  # noqa: E402
from oxford_ir.retrieval.index_format import RetrievalIndex  # noqa: E402
from oxford_ir.retrieval.search import Searcher  # noqa: E402
from oxford_ir.web.app import ServeSettings, create_app  # noqa: E402
from oxford_ir.web.thumbnails import ThumbnailCache  # noqa: E402
from tests.web.live_server import running  # noqa: E402
from tests.web.tiny_index import IMAGE_SIZE, N_IMAGES, ROTATED  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def jpeg_bytes(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture(scope="module")
def client(index: RetrievalIndex, searcher: Searcher) -> TestClient:
    with TestClient(create_app(searcher, index, ServeSettings(k=5, max_k=10))) as test_client:
        yield test_client


def upload(client: TestClient, data: bytes, name: str = "query.jpg", content_type: str = "image/jpeg", **fields):
    return client.post("/api/search", files={"file": (name, data, content_type)}, data=fields)


def brute_force(index: RetrievalIndex, query: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    scores = index.vectors(np.float32) @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return order.tolist(), scores[order]


def embed_file(searcher: Searcher, path: Path, bbox=None) -> np.ndarray:
    """The query vector computed by the benchmark extraction code, not by the searcher."""
    model = searcher.model
    return extract_embeddings(model, [path], IMAGE_SIZE, bboxes=[bbox], scales=[1.0]).numpy()[0]


def error_of(response) -> str:
    payload = response.json()
    assert set(payload) == {"error"}, payload
    assert isinstance(payload["error"], str) and payload["error"]
    return payload["error"]


# -- the page and the info ------------------------------------------------------------------------------------
def test_info_describes_the_index(client: TestClient, index: RetrievalIndex) -> None:
    info = client.get("/api/info").json()
    assert info["images"] == N_IMAGES == len(index)
    assert info["image_size"] == IMAGE_SIZE
    assert info["embedding_dim"] == index.embedding_dim == 16
    # the model as described, its weights file by name only: no path of the server's file system
    assert info["model"] == "ScratchCNN(channels=[8, 16], weights=scratch_cnn.pth) + GeM()"
    assert str(index.model.describe()).startswith("ScratchCNN") and "/" in index.model.describe()
    assert (info["k"], info["max_k"], info["backend"]) == (5, 10, "exact")
    text = client.get("/api/info").text + client.get("/").text
    assert str(Path(index.root).parent) not in text and "/tmp" not in text


def test_page_and_static_files_are_served_with_security_headers(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="file-input"', 'id="results"', 'id="bbox-input"', 'value="5"', f"<strong>{N_IMAGES}</strong>"):
        assert needle in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert client.get("/static/app.css").status_code == 200


def test_examples_and_file_name_search(client: TestClient, index: RetrievalIndex) -> None:
    examples = client.get("/api/examples", params={"n": 5, "seed": 3}).json()["items"]
    assert len(examples) == 5 and len({e["id"] for e in examples}) == 5
    assert examples == client.get("/api/examples", params={"n": 5, "seed": 3}).json()["items"]
    for item in examples:
        entry = index.entries[item["id"]]
        assert (item["path"], item["width"], item["height"]) == (entry.path, entry.width, entry.height)
    found = client.get("/api/images", params={"q": "B/"}).json()  # case-insensitive substring of the path
    assert found["total"] == 6 and all(item["path"].startswith("b/") for item in found["items"])
    assert client.get("/api/images", params={"q": "rotated"}).json()["items"][0]["path"] == ROTATED
    assert client.get("/api/images", params={"q": "scene", "limit": 2}).json()["total"] == N_IMAGES - 1


# -- searches against brute force ------------------------------------------------------------------------------
def test_upload_returns_k_results_sorted_with_thumbnails(
    client: TestClient, index: RetrievalIndex, searcher: Searcher
) -> None:
    query_id = 3
    path = index.image_path(query_id)
    response = upload(client, jpeg_bytes(path), name="holiday photo.jpg", k="4")
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["query"] == {
        "kind": "upload",
        "name": "holiday photo.jpg",
        "width": index.entries[query_id].width,
        "height": index.entries[query_id].height,
        "bbox": None,
    }
    results = payload["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    expected_ids, expected_scores = brute_force(index, embed_file(searcher, path), 4)
    assert [r["id"] for r in results] == expected_ids
    assert scores == pytest.approx(expected_scores.tolist(), abs=1e-5)
    assert results[0]["id"] == query_id and results[0]["score"] == pytest.approx(1.0, abs=2e-3)  # float16 index
    for r in results:
        assert r["path"] == index.entries[r["id"]].path
        thumb = client.get(r["thumb"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(thumb.content))
        entry = index.entries[r["id"]]
        assert image.format == "JPEG" and max(image.size) == max(entry.width, entry.height)  # small: never upscaled


def test_upload_with_a_box_searches_the_crop(client: TestClient, index: RetrievalIndex, searcher: Searcher) -> None:
    path = index.image_path(4)
    box = [10, 8, 60, 50]
    response = upload(client, jpeg_bytes(path), bbox=" 10, 8 ,60,50", k="6")
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["query"]["bbox"] == box
    expected_ids, expected_scores = brute_force(index, embed_file(searcher, path, box), 6)
    assert [r["id"] for r in payload["results"]] == expected_ids
    assert [r["score"] for r in payload["results"]] == pytest.approx(expected_scores.tolist(), abs=1e-5)
    assert payload["results"][0]["score"] < 0.999  # the crop is not the whole image


def test_search_by_id_puts_the_image_itself_first(client: TestClient, index: RetrievalIndex) -> None:
    response = client.get("/api/search", params={"id": 7, "k": 10})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["query"]["kind"] == "id" and payload["query"]["id"] == 7
    assert payload["query"]["path"] == index.entries[7].path
    expected_ids, expected_scores = brute_force(index, index.vectors(np.float32)[7], 10)
    assert [r["id"] for r in payload["results"]] == expected_ids
    assert payload["results"][0]["id"] == 7 and payload["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert [r["score"] for r in payload["results"]] == pytest.approx(expected_scores.tolist(), abs=1e-4)
    default = client.get("/api/search", params={"id": 7}).json()
    assert len(default["results"]) == 5  # ServeSettings.k


def test_search_by_id_with_a_box_on_an_exif_rotated_image(
    client: TestClient, index: RetrievalIndex, searcher: Searcher
) -> None:
    """Boxes are in pixels of the image as shown: the rotated photo is 60 wide and 90 high."""
    i = next(n for n, e in enumerate(index.entries) if e.path == ROTATED)
    assert (index.entries[i].width, index.entries[i].height) == (60, 90)
    box = [5, 40, 55, 88]  # reaches below y=60: only valid in the rotated frame
    response = client.get("/api/search", params={"id": i, "k": 3, "bbox": "5,40,55,88"})
    assert response.status_code == 200, response.text
    assert response.json()["query"]["bbox"] == box
    expected_ids, _ = brute_force(index, embed_file(searcher, index.image_path(i), box), 3)
    assert [r["id"] for r in response.json()["results"]] == expected_ids
    thumb = Image.open(io.BytesIO(client.get(f"/thumb/{i}", params={"size": 64}).content))
    assert thumb.size == (43, 64)  # 60 x 90 fitted into 64 x 64, upright


# -- bad requests ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_client(index: RetrievalIndex, searcher: Searcher) -> TestClient:
    """Limits small enough to test cheaply: 20 KB uploads, 0.01 megapixels."""
    settings = ServeSettings(k=3, max_k=10, max_upload_mb=20 / 1024, max_image_megapixels=0.01)
    with TestClient(create_app(searcher, index, settings)) as test_client:
        yield test_client


def noise_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_upload_too_large_by_content_length(small_client: TestClient) -> None:
    data = noise_png(200, 200)  # ~120 KB, beyond 20 KB + the multipart allowance of 64 KB
    assert len(data) > 100_000
    response = upload(small_client, data, name="big.png", content_type="image/png")
    assert response.status_code == 413
    assert "larger than the limit of 0.0195 MB" in error_of(response)


def test_upload_too_large_while_streaming(small_client: TestClient) -> None:
    """No Content-Length (chunked): the size is counted as the body arrives (see also the raw-socket test)."""
    data = noise_png(200, 200)
    boundary = "oxfordirboundary"
    body = multipart_body(boundary, "big.png", "image/png", data)
    response = small_client.post(
        "/api/search",
        content=(body[i : i + 8192] for i in range(0, len(body), 8192)),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert "larger than the limit" in error_of(response)


def multipart_body(boundary: str, name: str, content_type: str, data: bytes) -> bytes:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode()


def test_upload_over_the_file_limit_within_the_multipart_allowance(small_client: TestClient) -> None:
    data = noise_png(90, 90)  # ~24 KB: the body passes the early check, the file does not
    assert 20 * 1024 < len(data) < 60 * 1024
    response = upload(small_client, data, name="medium.png", content_type="image/png")
    assert response.status_code == 413
    assert "'medium.png' is 0.0" in error_of(response)


def test_upload_with_too_many_pixels(small_client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300), (9, 9, 9)).save(buffer, format="PNG")  # small file, 0.12 megapixels
    response = upload(small_client, buffer.getvalue(), name="wide.png", content_type="image/png")
    assert response.status_code == 413
    assert "400 x 300 = 0.1 megapixels; the limit is 0.01 megapixels" in error_of(response)


@pytest.fixture(scope="module")
def a_jpeg(index: RetrievalIndex) -> bytes:
    return jpeg_bytes(index.image_path(0))


BAD_UPLOADS = {
    "text file": ("notes.txt", b"just some text\n", "text/plain", 415, "'notes.txt' was sent as text/plain, not an"),
    "not an image": ("fake.jpg", b"GIF89 but not really" * 10, "image/jpeg", 415, "'fake.jpg' is not an image"),
    "svg": ("logo.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml", 415, "is not an image"),
    "empty": ("empty.jpg", b"", "image/jpeg", 400, "'empty.jpg' is empty"),
    "pdf": ("doc.pdf", b"%PDF-1.4\n", "application/pdf", 415, "sent as application/pdf"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_bad_upload_types(client: TestClient, case: str) -> None:
    name, data, content_type, status, message = BAD_UPLOADS[case]
    response = upload(client, data, name=name, content_type=content_type)
    assert response.status_code == status, response.text
    assert message in error_of(response)


def test_truncated_jpeg_is_a_clear_400(client: TestClient, a_jpeg: bytes) -> None:
    response = upload(client, a_jpeg[: len(a_jpeg) // 2], name="cut.jpg")
    assert response.status_code == 400, response.text
    message = error_of(response)
    assert "'cut.jpg'" in message and "truncated" in message
    assert "/tmp" not in message and "oxford-ir-upload" not in message  # the server's temp file is not shown


def test_octet_stream_uploads_are_judged_by_their_bytes(client: TestClient, a_jpeg: bytes) -> None:
    response = upload(client, a_jpeg, name="blob", content_type="application/octet-stream", k="2")
    assert response.status_code == 200 and response.json()["results"][0]["id"] == 0


BAD_FIELDS = {
    "three numbers": ({"bbox": "1,2,3"}, "bbox='1,2,3' is not a box: give four numbers x1,y1,x2,y2"),
    "words": ({"bbox": "a,b,c,d"}, "is not a box"),
    "nan": ({"bbox": "nan,0,5,5"}, "is not a box"),
    "empty box": ({"bbox": "10,10,5,20"}, "bbox=10,10,5,20 is empty"),
    "outside": ({"bbox": "0,0,9999,10"}, "bbox=0,0,9999,10 reaches outside the 96 x 72 image"),
    "negative": ({"bbox": "-3,0,10,10"}, "reaches outside"),
    "k zero": ({"k": "0"}, "k=0 is out of range: ask for 1 to 10 results"),
    "k too big": ({"k": "11"}, "k=11 is out of range"),
    "k not a number": ({"k": "many"}, "k: Input should be a valid integer"),
}


@pytest.mark.parametrize("case", BAD_FIELDS, ids=list(BAD_FIELDS))
def test_bad_box_or_k_on_upload_is_422(client: TestClient, a_jpeg: bytes, case: str) -> None:
    fields, message = BAD_FIELDS[case]
    response = upload(client, a_jpeg, **fields)
    assert response.status_code == 422, response.text
    assert message in error_of(response)


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        ({"id": 0, "bbox": "0,0,97,10"}, 422, "reaches outside the 96 x 72 image"),
        ({"id": 0, "k": 99}, 422, "k=99 is out of range"),
        ({"id": N_IMAGES}, 404, f"no indexed image with id {N_IMAGES}: ids run from 0 to {N_IMAGES - 1}"),
        ({"id": -1}, 404, "no indexed image with id -1"),
        ({"id": "x"}, 422, "id: Input should be a valid integer"),
        ({}, 422, "id: Field required"),
    ],
)
def test_bad_search_by_id(client: TestClient, params: dict, status: int, message: str) -> None:
    response = client.get("/api/search", params=params)
    assert response.status_code == status, response.text
    assert message in error_of(response)


def test_missing_file_field(client: TestClient) -> None:
    response = client.post("/api/search", data={"k": "3"})
    assert response.status_code == 422 and "file: Field required" in error_of(response)


# -- thumbnails: ids only ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "statuses"),
    [
        ("/thumb/-1", {404}),
        ("/thumb/999999", {404}),
        ("/thumb/12", {404}),
        ("/thumb/abc", {422}),
        ("/thumb/1.5", {422}),
        ("/thumb/%2e%2e", {404, 422}),
        ("/thumb/..%2f..%2fetc%2fpasswd", {404}),
        ("/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd", {404}),
        ("/thumb/0?size=8", {422}),
        ("/thumb/0?size=100000", {422}),
        ("/static/..%2fserve.py", {404}),
        ("/static/%2e%2e/app.py", {404}),
    ],
)
def test_thumbnail_urls_that_are_not_ids_are_refused(client: TestClient, url: str, statuses: set[int]) -> None:
    response = client.get(url)
    assert response.status_code in statuses, (url, response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    error_of(response)


def test_thumbnails_are_cached_and_immutable_under_the_version(client: TestClient) -> None:
    cache = client.app.state.thumbnails
    url = client.get("/api/search", params={"id": 2, "k": 1}).json()["results"][0]["thumb"]
    first = client.get(url)
    hits = cache.hits
    second = client.get(url)
    assert second.content == first.content and cache.hits == hits + 1
    assert "immutable" in second.headers["cache-control"]
    assert client.get("/thumb/2", params={"size": 256}).headers["cache-control"] == "no-cache"  # unversioned


def test_an_index_entry_pointing_outside_its_folder_is_not_served(
    index: RetrievalIndex, searcher: Searcher, index_dir: Path
) -> None:
    """Defence in depth: a tampered manifest (../../secret.jpg) cannot make the server read outside the root."""
    secret = index_dir.parent / "secret.jpg"
    Image.new("RGB", (40, 30), (250, 0, 0)).save(secret)
    tampered = dataclasses.replace(index.entries[0], path="../" + secret.name)
    assert (Path(index.root) / tampered.path).resolve() == secret.resolve()
    original = index.entries[0]
    index.entries[0] = tampered
    try:
        with TestClient(create_app(searcher, index, ServeSettings())) as test_client:
            response = test_client.get("/thumb/0")
            assert response.status_code == 404 and "outside the indexed folder" in error_of(response)
            response = test_client.get("/api/search", params={"id": 0, "bbox": "0,0,20,20"})
            assert response.status_code == 404 and "outside the indexed folder" in error_of(response)
    finally:
        index.entries[0] = original


def test_an_image_deleted_since_indexing_is_a_404_not_a_crash(client: TestClient, index: RetrievalIndex) -> None:
    path = index.image_path(6)
    moved = path.with_suffix(".moved")
    path.rename(moved)
    try:
        response = client.get("/thumb/6", params={"size": 77})  # a size nothing cached yet
        assert response.status_code == 404
        message = error_of(response)
        assert f"image 6 ({index.entries[6].path}) cannot be read any more: image not found" in message
        assert str(index.root) not in message and "/tmp" not in message  # no path of the server's file system
        assert client.get("/api/search", params={"id": 6, "k": 2}).status_code == 200  # stored vector: still works
    finally:
        moved.rename(path)
    assert client.get("/thumb/6", params={"size": 77}).status_code == 200


def test_thumbnail_cache_evicts_least_recently_used_by_bytes() -> None:
    cache = ThumbnailCache(max_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"5678")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"90")  # 10 bytes: fits
    cache.put("d", b"xy")  # 12 > 10: evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") == b"1234" and cache.get("d") == b"xy"
    assert cache.total_bytes == 8 and len(cache) == 3
    cache.put("huge", b"x" * 11)  # larger than the budget: not stored, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3


def test_unknown_host_header_is_refused(index: RetrievalIndex, searcher: Searcher) -> None:
    settings = ServeSettings(allowed_hosts=("127.0.0.1", "localhost"))
    with TestClient(create_app(searcher, index, settings), base_url="http://127.0.0.1") as test_client:
        assert test_client.get("/api/info").status_code == 200
        refused = test_client.get("/api/info", headers={"host": "attacker.example"})
        assert refused.status_code == 400
        assert error_of(refused) == (
            "this server does not answer to the Host 'attacker.example' (allowed_hosts: 127.0.0.1, localhost): "
            "use one of those"
        )
        assert test_client.get("/api/info", headers={"host": "localhost:8000"}).status_code == 200


# -- over a real socket: raw paths that an HTTP client library would normalise --------------------------------
@pytest.fixture(scope="module")
def live_server(client: TestClient) -> Iterator[tuple[str, int]]:
    with running(client.app) as address:
        yield address


@pytest.fixture(scope="module")
def small_live_server(small_client: TestClient) -> Iterator[tuple[str, int]]:
    with running(small_client.app) as address:
        yield address


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of the HTTP/1.1 response arriving on ``sock`` (the body by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int({k.lower(): v for k, v in headers.items()}[b"content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the response"
        body += chunk
    return int(head.split()[1]), body


def test_streamed_upload_is_cut_off_before_its_end(small_live_server) -> None:
    """A chunked upload of 300 KB against a 20 KB limit: after 96 KB the server answers 413 and closes,
    although the body is unfinished; it never waits for (or stores) the rest."""
    boundary = "oxfordirboundary"
    body = multipart_body(boundary, "big.png", "image/png", noise_png(300, 300))
    assert len(body) > 250_000
    with socket.create_connection(small_live_server, timeout=10) as sock:
        sock.sendall(
            b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
        )
        for start in range(0, 96 * 1024, 8192):
            sock.sendall(b"2000\r\n" + body[start : start + 8192] + b"\r\n")
        status, answer = read_response(sock)
    assert status == 413 and b"larger than the limit" in answer


def test_declared_oversize_upload_is_refused_before_any_body(small_live_server) -> None:
    with socket.create_connection(small_live_server, timeout=10) as sock:
        sock.sendall(
            b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50000000\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n\r\n"
        )
        status, answer = read_response(sock)
    assert status == 413 and b"larger than the limit of 0.0195 MB" in answer


@pytest.mark.parametrize(
    "path",
    [
        "/thumb/../../../../etc/passwd",
        "/thumb/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/thumb/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/thumb/0/../../../etc/passwd",
        "/static/../../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2fserve.py",
        "/../../../../etc/passwd",
    ],
)
def test_raw_traversal_paths_over_http(live_server, path: str) -> None:
    host, port = live_server
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", path)  # sent exactly as written
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status in (404, 422), (path, response.status)
    assert b"root:" not in body and b"import" not in body
    assert response.getheader("content-type") == "application/json"


def test_live_server_search_round_trip(live_server, index: RetrievalIndex) -> None:
    host, port = live_server
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", "/api/search?id=5&k=3")
    response = connection.getresponse()
    assert response.status == 200
    payload = json.loads(response.read())
    assert payload["results"][0]["id"] == 5
    connection.close()


# -- conf/serve.yaml ------------------------------------------------------------------------------------------
def compose_serve(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("serve", overrides=list(overrides))


def test_serve_config_builds_the_app(index_dir: Path) -> None:
    app, index, searcher = build_app(
        compose_serve(f"index={index_dir}", "k=4", "max_upload_mb=1", "extraction.device=cpu")
    )
    assert len(index) == N_IMAGES and searcher.backend == "exact"
    assert isinstance(index.embeddings, np.memmap)  # the rows are paged in from the file, not copied into memory
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        info = test_client.get("/api/info").json()
        assert (info["k"], info["max_upload_mb"], info["max_k"]) == (4, 1.0, N_IMAGES)  # max_k=100 capped at N
        assert len(test_client.get("/api/search", params={"id": 1}).json()["results"]) == 4
        # host=127.0.0.1 and allowed_hosts=auto: only loopback Host headers
        assert test_client.get("/api/info", headers={"host": "rebind.attacker.example"}).status_code == 400


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("k=0", "k=0 must be at least 1"),
        ("max_k=3", "max_k=3 must be at least k=12"),
        ("thumb_size=2000", "thumb_size=2000 must be between 16 and max_thumb_size=1024"),
        ("max_upload_mb=0", "max_upload_mb=0.0 must be positive"),
        ("backend=annoy", "backend='annoy': choose one of exact, faiss"),
        ("max_parallel_decodes=0", "max_parallel_decodes=0 must be at least 1"),
        ("upload_timeout_s=0", "upload_timeout_s=0.0 must be positive"),
        ("upload_wait_s=-1", "upload_wait_s=-1.0 must be 0 (refuse at once when busy) or more"),
        ("query_expansion.n=-1", "query_expansion.n=-1"),
    ],
)
def test_bad_serve_settings_are_config_errors(index_dir: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_app(compose_serve(f"index={index_dir}", override))


# -- the command line --------------------------------------------------------------------------------------------
def test_bind_socket_reports_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use: choose another port="):
            bind_socket("127.0.0.1", port)
    with pytest.raises(ConfigError, match="port=70000 must be a whole number from 0"):
        bind_socket("127.0.0.1", 70000)


def test_cli_fails_with_one_line_for_a_missing_index(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "oxford_ir.cli.serve",
            "index=/nonexistent/oxford-ir-index",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: no index at /nonexistent/oxford-ir-index") and "oxford-ir-index" in lines[0]
    assert "Traceback" not in result.stderr


def test_an_index_is_required() -> None:
    with pytest.raises(ConfigError, match="index= is required: the folder written by oxford-ir-index"):
        build_app(compose_serve())


def test_cli_refuses_a_corrupt_index(tmp_path: Path, index_dir: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(index_dir, broken)
    victim = max((p for p in broken.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = subprocess.run(
        [sys.executable, "-m", "oxford_ir.cli.serve", f"index={broken}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "oxford-ir-index" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("replaced", [True, False])
def test_a_file_rewritten_in_place_while_its_thumbnail_is_decoded_is_said_to_have_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replaced: bool
) -> None:
    """The stat checks before and after the decode leave a window: a file truncated and rewritten in place during
    the decode fails to decode. That is reported as the change it is (FileChanged: 409 for the page), and only a
    file that is still the indexed one is called unreadable (DataError: 404)."""
    from oxford_ir.web import thumbnails

    path = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    stat = path.stat()

    def decode_while_rewritten(handle, size, quality=85, *, name=None):
        if replaced:  # the writer truncates, then writes a new picture; the reader sees the half-written file
            path.write_bytes(b"\xff\xd8 half a JPEG")
        raise DataError(f"cannot decode image {name}: cannot identify image file")

    monkeypatch.setattr(thumbnails, "make_thumbnail", decode_while_rewritten)
    expected = thumbnails.FileChanged if replaced else DataError
    with pytest.raises(expected) as raised:
        thumbnails.entry_thumbnail(path, stat.st_size, stat.st_mtime_ns, 32)
    assert replaced == isinstance(raised.value, thumbnails.FileChanged)
    if replaced:
        assert not raised.value.deleted and "changed on disk since it was indexed" in str(raised.value)
