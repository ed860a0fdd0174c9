"""A small HTTP server on 127.0.0.1 for the downloader tests: Range support and scripted misbehaviour."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class FileServer:
    """Serves ``files`` (name -> bytes); ``behaviour[name]`` scripts a failure for that file.

    Behaviours: ``truncate`` (send half the body, then close), ``truncate_once`` (only the first
    request), ``ignore_range`` (always 200 with the whole file), ``stall`` (send nothing until
    the test ends). Every request's path and headers are recorded in ``requests``.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.behaviour: dict[str, str] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                owner.requests.append((name, dict(self.headers)))
                behaviour = owner.behaviour.get(name)
                if behaviour == "stall":
                    owner.release.wait(10)
                    return
                if name not in owner.files:
                    self.send_error(404, "Not Found")
                    return
                data = owner.files[name]
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                start = 0
                if match and behaviour != "ignore_range":
                    start = int(match[1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if behaviour == "truncate" or (behaviour == "truncate_once" and owner.count(name) == 1):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.requests if n == name)

    def ranges(self, name: str) -> list[str | None]:
        return [headers.get("Range") for n, headers in self.requests if n == name]


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.httpd.shutdown()
        srv.httpd.server_close()
