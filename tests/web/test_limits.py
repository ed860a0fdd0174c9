"""Faults, hostile input and load against the web server: every bad request is one 4xx JSON sentence (never a
500, never a traceback, never a server path), slow and stalled bodies are cut off (408), uploads are decoded a
bounded number at a time (503 + Retry-After after the wait), large uploads use the index's own test-time pixels,
and the server answers a normal search after each of these. Most run against uvicorn on 127.0.0.1, configured
as ``oxford-ir-serve`` configures it (:func:`oxford_ir.cli.serve.server_config`)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from oxford_ir.retrieval.index_format import RetrievalIndex  # noqa: E402
from oxford_ir.retrieval.search import Searcher  # noqa: E402
from oxford_ir.web.app import ServeSettings, create_app  # noqa: E402
from oxford_ir.web.limits import DecodeSlots  # noqa: E402
from tests.web.test_app import (  # noqa: E402
    brute_force,
    embed_file,
    error_of,
    multipart_body,
    running,
)
from tests.web.tiny_index import N_IMAGES  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BOUNDARY = "oxfordirlimits"
FORM = f"multipart/form-data; boundary={BOUNDARY}"
#: the settings of the live server here: small limits (cheap to exceed), a 1 s body deadline
SETTINGS = ServeSettings(k=5, max_k=10, max_upload_mb=0.5, max_image_megapixels=2.0, upload_timeout_s=1.0)


@pytest.fixture(scope="module")
def app(index: RetrievalIndex, searcher: Searcher):
    return create_app(searcher, index, SETTINGS)


@pytest.fixture(scope="module")
def live(app) -> Iterator[tuple[str, int]]:
    with running(app) as address:
        yield address


def exchange(address: tuple[str, int], data: bytes, *, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw ``data``, read one response (status, lower-case headers, body by its Content-Length)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" not in headers:  # delimited by the end of the connection
        while chunk := sock.recv(65536):
            body += chunk
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the response"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def post(body: bytes, content_type: str = FORM, extra: str = "") -> bytes:
    return (
        f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def assert_json_error(status: int, headers: dict[str, str], body: bytes) -> str:
    """The body is ``{"error": "<one line>"}`` as JSON: no traceback, no path of the server's file system."""
    assert headers.get("content-type") == "application/json", (status, headers, body[:200])
    payload = json.loads(body)
    assert set(payload) == {"error"} and isinstance(payload["error"], str) and payload["error"], payload
    message = payload["error"]
    assert "\n" not in message and "Traceback" not in message and "/tmp" not in message, message
    return message


def assert_healthy(address: tuple[str, int]) -> None:
    status, _, body = exchange(address, get("/api/search?id=3&k=2"))
    assert status == 200 and json.loads(body)["results"][0]["id"] == 3


@pytest.fixture(scope="module")
def a_jpeg(index: RetrievalIndex) -> bytes:
    return index.image_path(0).read_bytes()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- hostile requests over a real socket ---------------------------------------------------------------------
def hostile_requests(jpeg: bytes) -> dict[str, tuple[bytes, int, str]]:
    """name -> (raw request, expected status, a part of the expected message)."""
    upload = multipart_body(BOUNDARY, "a.jpg", "image/jpeg", jpeg)
    return {
        "json body": (post(b'{"file": 1}', "application/json"), 422, "file: Field required: send the query image"),
        "text body": (post(b"hello", "text/plain"), 422, "as the multipart/form-data field 'file'"),
        "urlencoded file": (post(b"file=abc", "application/x-www-form-urlencoded"), 422, "file: not a file"),
        "file as a text field": (
            post(
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"\r\n\r\nhi\r\n--{BOUNDARY}--\r\n'.encode()
            ),
            422,
            "file: not a file: send the query image",
        ),
        "no boundary": (post(upload, "multipart/form-data"), 400, "not a valid multipart/form-data upload"),
        "wrong boundary": (post(upload, "multipart/form-data; boundary=zzz"), 400, "not a valid multipart"),
        "garbage body": (post(b"\x00\xff" * 100), 400, "not a valid multipart/form-data upload"),
        "truncated multipart": (post(upload[:-20]), 422, "file: Field required"),
        "empty body": (post(b""), 422, "file: Field required"),
        "empty file": (post(multipart_body(BOUNDARY, "e.jpg", "image/jpeg", b"")), 400, "'e.jpg' is empty"),
        "too many fields": (
            post(
                b"".join(
                    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n'.encode()
                    for i in range(1100)
                )
                + f"--{BOUNDARY}--\r\n".encode()
            ),
            400,
            "Too many fields",
        ),
        "content-length not a number": (
            b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
            400,
            "not valid HTTP/1.1",
        ),
        "negative content-length": (
            b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n",
            400,
            "not valid HTTP/1.1",
        ),
        "broken request line": (b"HELLO\r\n\r\n", 400, "not valid HTTP/1.1"),
        "no host header": (b"GET /api/info HTTP/1.1\r\n\r\n", 400, "not valid HTTP/1.1"),
        "header without a colon": (b"GET /api/info HTTP/1.1\r\nHost: x\r\nnonsense\r\n\r\n", 400, "not valid"),
        "k of 5000 digits": (get("/api/search?id=1&k=" + "9" * 5000), 422, "k: Unable to parse input string"),
        "k of 30 digits": (get("/api/search?id=1&k=" + "9" * 30), 422, "k=999999999999999999999999999999 is out"),
        "k float": (get("/api/search?id=1&k=2.5"), 422, "k: Input should be a valid integer"),
        "id of 30 digits": (get("/api/search?id=" + "9" * 30), 404, "no indexed image with id 999"),
        "id word": (get("/api/search?id=abc"), 422, "id: Input should be a valid integer, unable to parse string"),
        "thumb id of 30 digits": (get("/thumb/" + "9" * 30), 404, "no indexed image with id"),
        "bbox infinite": (get("/api/search?id=1&bbox=0,0,1e999,5"), 422, "is not a box: give four numbers"),
        "bbox too long": (get("/api/search?id=1&bbox=" + "1," * 200), 422, "bbox: String should have at most 200"),
        "q too long": (get("/api/images?q=" + "a" * 300), 422, "q: String should have at most 200 characters"),
        "examples n negative": (get("/api/examples?n=-1"), 422, "n: Input should be greater than or equal to 0"),
        "unknown page": (get("/etc/passwd"), 404, "no such page: /etc/passwd"),
        "wrong method": (b"DELETE /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405, "DELETE is not allowed"),
        "put info": (
            b"PUT /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
            405,
            "PUT is not allowed on /api/info: use GET",
        ),
        "declared body over the limit": (
            b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 900000000\r\n\r\n",
            413,
            "larger than the limit of 0.5 MB",
        ),
    }


HOSTILE = list(hostile_requests(b"x"))


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_request_is_one_json_error(live, a_jpeg: bytes, case: str) -> None:
    data, expected, fragment = hostile_requests(a_jpeg)[case]
    status, headers, body = exchange(live, data)
    assert status == expected, (case, status, body[:300])
    message = assert_json_error(status, headers, body)
    assert fragment in message, message
    assert len(message) < 400, message
    assert_healthy(live)


def test_huge_header_is_a_json_400_and_the_server_stays_healthy(live) -> None:
    """40 KB of headers (the limit is 16 KB): refused as soon as the limit is passed, JSON like every error."""
    head = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
        b"X-Pad-%d: %s\r\n" % (i, b"a" * 200) for i in range(200)
    )
    with socket.create_connection(live, timeout=10) as sock:
        sock.sendall(head)  # no blank line: the head never ends, the server must not wait for it
        status, headers, body = read_response(sock)
    assert status == 400 and "headers over 16 KB" in assert_json_error(status, headers, body)
    assert_healthy(live)


def test_a_body_that_stalls_is_cut_off_with_408(live, a_jpeg: bytes) -> None:
    """Content-Length promises more than is sent, then the client goes quiet: 408 after upload_timeout_s."""
    body = multipart_body(BOUNDARY, "a.jpg", "image/jpeg", a_jpeg)
    start = time.monotonic()
    with socket.create_connection(live, timeout=10) as sock:
        sock.sendall(post(body)[: -len(body) // 2])
        status, headers, answer = read_response(sock)
        took = time.monotonic() - start
        assert sock.recv(10) == b""  # and the connection is closed
    assert status == 408 and "did not arrive within 1 s (upload_timeout_s)" in assert_json_error(
        status, headers, answer
    )
    assert 0.9 < took < 4, took
    assert_healthy(live)


def test_a_body_sent_a_few_bytes_at_a_time_is_cut_off_at_the_deadline(live, a_jpeg: bytes) -> None:
    """A slowloris client sends something every 0.1 s, so no gap is long: the deadline is for the whole body."""
    data = post(multipart_body(BOUNDARY, "a.jpg", "image/jpeg", a_jpeg))
    start = time.monotonic()
    with socket.create_connection(live, timeout=10) as sock:
        head_end = data.index(b"\r\n\r\n") + 4
        sock.sendall(data[:head_end])
        sent = head_end
        sock.setblocking(False)
        answer = b""
        while b"\r\n\r\n" not in answer and time.monotonic() - start < 8:
            with contextlib.suppress(BlockingIOError):
                answer += sock.recv(65536)
            if sent < len(data):
                with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                    sock.send(data[sent : sent + 16])
                    sent += 16
            time.sleep(0.1)
        took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 0.9 < took < 4 and sent < len(data), (took, sent, len(data))
    assert_healthy(live)


def test_concurrent_clients_all_answered(live, a_jpeg: bytes) -> None:
    """16 clients searching by id and 4 uploading at once, over real sockets: every request answered."""
    results: list[int] = []
    lock = threading.Lock()
    upload = post(multipart_body(BOUNDARY, "a.jpg", "image/jpeg", a_jpeg), extra="")

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(5 if seed < 16 else 2):
            data = get(f"/api/search?id={rng.randrange(N_IMAGES)}&k=3") if seed < 16 else upload
            status, _, _ = exchange(live, data, timeout=60)
            with lock:
                results.append(status)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * (16 * 5 + 4 * 2)


# -- corrupt images -----------------------------------------------------------------------------------------
def corrupt_variants(seed: int = 0, per_format: int = 12) -> list[tuple[str, bytes]]:
    """Real images of every upload format, each truncated or with random bytes overwritten."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    originals = {}
    for fmt, mode in [("JPEG", "RGB"), ("PNG", "RGBA"), ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB")]:
        buffer = io.BytesIO()
        image.convert(mode).save(buffer, format=fmt)
        originals[fmt] = buffer.getvalue()
    variants = []
    for fmt, data in originals.items():
        for i in range(per_format):
            damaged = bytearray(data)
            if i % 3 == 0:
                damaged = damaged[: int(rng.integers(8, len(data)))]
            else:
                for position in rng.integers(0, len(data), size=1 + i):
                    damaged[int(position)] = int(rng.integers(0, 256))
            variants.append((f"{fmt.lower()}-{i}", bytes(damaged)))
    # headers that lie: a PNG claiming 65000 x 65000 pixels, a GIF claiming 0 x 0
    png = bytearray(originals["PNG"])
    png[16:24] = (65000).to_bytes(4, "big") * 2
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")  # a valid IHDR chunk: only its size lies
    variants.append(("png-65000", bytes(png)))
    gif = bytearray(originals["GIF"])
    gif[6:10] = b"\0\0\0\0"
    variants.append(("gif-zero", bytes(gif)))
    return variants


@pytest.fixture(scope="module")
def client(app) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_corrupt_images_are_4xx_json_never_500(client: TestClient) -> None:
    statuses = {}
    for name, data in corrupt_variants():
        response = client.post("/api/search", files={"file": (name, data, "application/octet-stream")}, data={"k": "2"})
        statuses[name] = response.status_code
        assert response.status_code in (200, 400, 413, 415), (name, response.status_code, response.text)
        if response.status_code != 200:
            message = error_of(response)
            assert name in message and "/tmp" not in message and "Traceback" not in message, message
    assert statuses["png-65000"] == 413
    assert sum(s == 400 for s in statuses.values()) >= 10  # most damage is noticed, and said so
    assert client.get("/api/search", params={"id": 1, "k": 2}).status_code == 200


def test_an_unexpected_failure_is_a_json_500_without_traceback(index: RetrievalIndex, searcher: Searcher) -> None:
    class Broken:
        def __getattr__(self, name: str):
            return getattr(searcher, name)

        def search_ids(self, ids, k):
            raise RuntimeError("/secret/path exploded")

    with TestClient(create_app(Broken(), index, SETTINGS), raise_server_exceptions=False) as broken:
        response = broken.get("/api/search", params={"id": 1})
        assert response.status_code == 500
        message = error_of(response)
        assert message == "the server failed on this request (RuntimeError); its log has the details"
        assert broken.get("/api/info").status_code == 200


# -- bounded decoding ---------------------------------------------------------------------------------------
def test_decode_slots_are_first_come_first_served_and_give_up_in_time() -> None:
    async def scenario() -> list[str]:
        slots = DecodeSlots(1)
        order: list[str] = []
        assert await slots.acquire(0)

        async def waiter(name: str, timeout: float) -> None:
            if await slots.acquire(timeout):
                order.append(name)
                await asyncio.sleep(0.05)
                slots.release()
            else:
                order.append(f"{name} gave up")

        tasks = [asyncio.create_task(waiter(n, 5.0)) for n in ("a", "b", "c")]
        tasks.append(asyncio.create_task(waiter("impatient", 0.05)))
        await asyncio.sleep(0.2)
        assert slots.waiting == 3 and slots.busy == 1
        slots.release()
        await asyncio.gather(*tasks)
        assert slots.busy == 0 and slots.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["impatient gave up", "a", "b", "c"]
    with pytest.raises(RuntimeError, match="without a slot held"):
        DecodeSlots(1).release()


def test_an_upload_that_waits_too_long_for_a_decode_slot_gets_503(
    index: RetrievalIndex, searcher: Searcher, a_jpeg: bytes
) -> None:
    settings = ServeSettings(k=5, max_k=10, max_parallel_decodes=1, upload_wait_s=0.2)
    app = create_app(searcher, index, settings)
    slots = app.state.decode_slots
    with TestClient(app) as test_client:
        assert asyncio.run(slots.acquire(0))  # another upload is being decoded
        try:
            start = time.monotonic()
            response = test_client.post("/api/search", files={"file": ("q.jpg", a_jpeg, "image/jpeg")})
            assert 0.2 <= time.monotonic() - start < 3
            assert response.status_code == 503 and response.headers["retry-after"] == "5"
            assert error_of(response) == (
                "the server is busy decoding other uploads (1 at a time, 0 waiting): try again in 5 s"
            )
        finally:
            slots.release()
        response = test_client.post("/api/search", files={"file": ("q.jpg", a_jpeg, "image/jpeg")})
        assert response.status_code == 200 and slots.busy == 0


def big_jpeg(path: Path, width: int = 5000, height: int = 3400) -> bytes:
    """A 17-megapixel JPEG (above DRAFT_MIN_PIXELS: the index decodes such files at reduced size)."""
    rng = np.random.default_rng(5)
    small = Image.fromarray(rng.integers(0, 256, size=(height // 100, width // 100, 3), dtype=np.uint8))
    small.resize((width, height), Image.Resampling.BICUBIC).save(path, quality=85)
    return path.read_bytes()


def test_a_large_jpeg_upload_is_embedded_as_the_index_embeds_the_file(
    searcher: Searcher, index: RetrievalIndex, tmp_path: Path
) -> None:
    """The upload goes through the file path of eval_image: a JPEG above DRAFT_MIN_PIXELS is drafted without a box
    and decoded in full with one, exactly as extract_embeddings (the index, the benchmarks) treats the same file."""
    path = tmp_path / "large.jpg"
    data = big_jpeg(path)
    client = TestClient(create_app(searcher, index, ServeSettings(k=5, max_k=10)))  # 20 MB, 50 megapixels
    for box in (None, [100, 200, 2600, 1900]):
        fields = {"k": "6"} if box is None else {"k": "6", "bbox": ",".join(map(str, box))}
        response = client.post("/api/search", files={"file": ("large.jpg", data, "image/jpeg")}, data=fields)
        assert response.status_code == 200, response.text
        payload = response.json()
        assert (payload["query"]["width"], payload["query"]["height"]) == (5000, 3400)
        expected_ids, expected_scores = brute_force(index, embed_file(searcher, path, box), 6)
        assert [r["id"] for r in payload["results"]] == expected_ids
        assert [r["score"] for r in payload["results"]] == pytest.approx(expected_scores.tolist(), abs=1e-5)


def test_pixel_limit_is_named_in_the_413(client: TestClient) -> None:
    data = png_bytes(Image.new("L", (2000, 1500), 7))  # 3 megapixels in a few KB; the limit here is 2
    response = client.post("/api/search", files={"file": ("wide.png", data, "image/png")})
    assert response.status_code == 413
    assert error_of(response) == (
        "'wide.png' is 2000 x 1500 = 3.0 megapixels; the limit is 2 megapixels (max_image_megapixels): "
        "downscale it first"
    )


# -- the real entry point under load --------------------------------------------------------------------------
@pytest.mark.slow
def test_load_test_script_passes_and_memory_goes_back_down(tmp_path: Path) -> None:
    """experiments/load_test.py (real oxford-ir-serve, an index it builds) with 8 concurrent 49-megapixel PNGs:
    no error, the peak stays within ~1.2 GB of the start (1 decode at a time), the end within 300 MB."""
    out = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, "experiments/load_test.py", "--requests", "80", "--images", "16", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads(out.read_text())
    start, end = report["memory"]["start"], report["memory"]["end"]
    assert report["final_ok"] and all(row["errors"] == 0 for row in report["rows"].values())
    assert report["rows"]["big-png"]["requests"] == 8
    assert end["VmHWM"] - start["VmRSS"] < 1200, report["memory"]
    assert end["VmRSS"] - start["VmRSS"] < 300, report["memory"]
