"""A real uvicorn server on 127.0.0.1 in a thread, configured as oxford-ir-serve configures it."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from omegaconf import OmegaConf

from oxford_ir.cli.serve import bind_socket, server_config


@contextlib.contextmanager
def running(app) -> Iterator[tuple[str, int]]:
    """``app`` served by uvicorn on 127.0.0.1 (a free port) in a thread; yields ``(host, port)``."""
    import uvicorn

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app, OmegaConf.create({"log_level": "warning"})))  # as oxford-ir-serve
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
