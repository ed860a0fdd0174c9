"""What one request may cost the server: body size and time, parallel image decodes, memory given back.

- :class:`GuardMiddleware` (pure ASGI) refuses a body over the limit (413, by Content-Length or while it
  streams in) and one that has not fully arrived ``body_timeout_s`` after the request started (408: a client
  that sends very slowly, or stops, cannot hold a request open), and adds the security headers.
- :class:`HostGuard` refuses a Host header the server does not answer to (DNS rebinding), as JSON.
- :class:`DecodeSlots`: at most ``n`` uploads are decoded at once (a 49-megapixel PNG needs about 400 MB while
  it is decoded and downscaled); the others wait in line, first come first served, without holding a thread,
  and give up with 503 + ``Retry-After`` after a bounded wait.
- :func:`release_memory` hands freed heap memory back to the operating system (glibc ``malloc_trim``) after a
  large decode, so that the server's resident memory goes back down instead of staying at its peak.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

#: the browser may only load scripts, styles and images from this server (and the page's own blob: previews)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        b"object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]
#: how often a waiting upload looks whether its turn has come
POLL_S = 0.02
#: ... and every this many looks whether its client is still there
GONE_EVERY = 25


class PayloadTooLarge(HTTPException):
    """Raised from inside the body stream once it passes the limit; FastAPI re-raises HTTPExceptions."""

    def __init__(self, limit_mb: float) -> None:
        super().__init__(
            413,
            f"the upload is larger than the limit of {limit_mb:.3g} MB: send a smaller image",
            headers={"connection": "close"},
        )


class BodyTimeout(HTTPException):
    """Raised from inside the body stream when the body has not arrived in time."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408,
            f"the upload did not arrive within {timeout_s:g} s (upload_timeout_s): send it again over a faster "
            "connection, or a smaller image",
            headers={"connection": "close"},
        )


class GuardMiddleware:
    """Pure ASGI: refuse bodies over ``max_body`` bytes (by Content-Length, else while streaming) or still
    incomplete ``body_timeout_s`` after the request began, and add :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp, max_body: int, limit_mb: float, body_timeout_s: float = 60.0) -> None:
        self.app = app
        self.max_body = max_body
        self.limit_mb = limit_mb
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            message = f"the upload is larger than the limit of {self.limit_mb:.3g} MB: send a smaller image"
            status = 413 if length.isdigit() else 400
            if status == 400:
                message = "the Content-Length header is not a number: send the body's size in bytes"
            await JSONResponse({"error": message}, status_code=status, headers={"connection": "close"})(
                scope, receive, send_with_headers
            )
            return

        received = 0
        body_done = False
        deadline = time.monotonic() + self.body_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body: a wait for the disconnect, which may last
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
                log.warning("%s %s: body incomplete after %g s", scope["method"], scope["path"], self.body_timeout_s)
                raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise PayloadTooLarge(self.limit_mb)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        await self.app(scope, limited_receive, send_with_headers)


class HostGuard:
    """Pure ASGI: answer requests whose Host header is not in ``allowed_hosts`` with a JSON 400 (what starlette's
    TrustedHostMiddleware does, in the API's error format). Exact names, or ``*.domain`` patterns."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed_hosts = [pattern.lower() for pattern in allowed_hosts]

    def allows(self, header: str | None) -> bool:
        if not header:
            return False
        host = header.lower()
        host = host[: host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        return any(
            host == pattern or pattern == "*" or (pattern.startswith("*.") and host.endswith(pattern[1:]))
            for pattern in self.allowed_hosts
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.allows(header):
                shown = header if len(header) <= 60 else header[:57] + "..."
                names = ", ".join(self.allowed_hosts)
                message = (
                    f"this server does not answer to the Host {shown!r} (allowed_hosts: {names}): use one of those"
                )
                await JSONResponse({"error": message}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class DecodeSlots:
    """At most ``n`` holders at once; waiters are served first come, first served.

    Loop-agnostic and thread-safe (one app may be served by several event loops, e.g. a test client and a
    uvicorn thread): a waiter polls every :data:`POLL_S` seconds with ``asyncio.sleep``, so waiting holds
    neither a thread nor the event loop.
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"need at least one slot, got {n}")
        self.n = n
        self._free = n
        self._line: deque[object] = deque()
        self._lock = threading.Lock()

    @property
    def busy(self) -> int:
        """Slots held now."""
        return self.n - self._free

    @property
    def waiting(self) -> int:
        """Requests in line for a slot."""
        return len(self._line)

    async def acquire(self, timeout_s: float, gone: Callable[[], Awaitable[bool]] | None = None) -> bool:
        """Take a slot within ``timeout_s`` seconds (True), or give up (False); also gives up when ``gone()``
        (asked about twice a second) says the client has left."""
        ticket = object()
        with self._lock:
            if self._free and not self._line:
                self._free -= 1
                return True
            self._line.append(ticket)
        deadline = time.monotonic() + timeout_s
        polls = 0
        try:
            while True:
                with self._lock:
                    if self._free and self._line[0] is ticket:
                        self._line.popleft()
                        self._free -= 1
                        return True
                if time.monotonic() >= deadline:
                    return False
                polls += 1
                if gone is not None and polls % GONE_EVERY == 0 and await gone():
                    return False
                await asyncio.sleep(POLL_S)
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._line.remove(ticket)

    def release(self) -> None:
        with self._lock:
            if self._free >= self.n:
                raise RuntimeError("DecodeSlots.release() without a slot held")
            self._free += 1

    @contextlib.asynccontextmanager
    async def hold(
        self, timeout_s: float, refused: Callable[[], Exception], gone: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[None]:
        """``async with slots.hold(...)``: a slot for the block, or ``refused()`` raised after the wait."""
        if not await self.acquire(timeout_s, gone):
            raise refused()
        try:
            yield
        finally:
            self.release()


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (musl, macOS, Windows: nothing to call)."""
    try:
        name = ctypes.util.find_library("c")
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_memory() -> bool:
    """Return freed heap memory to the operating system (glibc ``malloc_trim(0)``, well under a millisecond);
    False where there is no such call.

    A large image is decoded in a worker thread; glibc keeps what it freed in that thread's arena, so without
    this the server's resident memory stays at its peak after a burst of large uploads.
    """
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
