"""The web app: a page to search an index by example, and the JSON API behind it (FastAPI).

Routes
  ``GET /``                    the page (templates/index.html, static/app.js, static/app.css)
  ``GET /api/info``            index size, model, extraction settings, limits
  ``GET /api/examples?n=``     ``n`` random indexed images (the page's strip of examples)
  ``GET /api/images?q=``       indexed images whose relative path contains ``q`` (case-insensitive)
  ``GET /api/search?id=&k=&bbox=``   search with indexed image ``id`` (its stored embedding, or its box)
  ``POST /api/search``         search with an uploaded image: multipart ``file``, optional ``bbox``, ``k``
  ``GET /thumb/<id>?size=``    a JPEG thumbnail of indexed image ``id``

Errors are JSON ``{"error": "<one sentence>"}`` with the status that fits: 404 unknown id, 413 upload too
large, 415 not an image, 400 undecodable image, 422 bad ``k``/``bbox``/parameter. Files are only ever
reached through integer ids into the index, never through a path from the request.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oxford_ir.errors import ConfigError, DataError, OxfordIRError
from oxford_ir.web.queries import ApiError, check_bbox, check_content_type, check_k, decode_upload, parse_bbox
from oxford_ir.web.thumbnails import ThumbnailCache, contained_path, make_thumbnail

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent
#: what a multipart body may carry besides the file itself (boundaries, part headers, k and bbox)
MULTIPART_OVERHEAD = 64 * 1024
MIN_THUMB_SIZE = 16
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


@dataclass(frozen=True)
class ServeSettings:
    """What the app allows and shows; ``conf/serve.yaml`` documents each value."""

    k: int = 12
    max_k: int = 100
    max_upload_mb: float = 20.0
    max_image_megapixels: float = 50.0
    thumb_size: int = 256
    max_thumb_size: int = 1024
    thumb_cache_mb: float = 64.0
    examples: int = 12
    #: Host headers accepted (None: any); a server on 127.0.0.1 accepts only loopback names, which stops
    #: DNS-rebinding pages from reading the index through the visitor's browser
    allowed_hosts: tuple[str, ...] | None = None
    #: a line for the page and /api/info, e.g. the search backend
    backend: str = "exact"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_pixels(self) -> int:
        return int(self.max_image_megapixels * 1_000_000)

    def validate(self) -> None:
        """:class:`ConfigError` naming the first setting that cannot work."""
        checks = [
            ("k", self.k >= 1, "at least 1"),
            ("max_k", self.max_k >= self.k, f"at least k={self.k}"),
            ("max_upload_mb", self.max_upload_mb > 0, "positive"),
            ("max_image_megapixels", self.max_image_megapixels > 0, "positive"),
            (
                "thumb_size",
                MIN_THUMB_SIZE <= self.thumb_size <= self.max_thumb_size,
                f"between {MIN_THUMB_SIZE} and max_thumb_size={self.max_thumb_size}",
            ),
            ("thumb_cache_mb", self.thumb_cache_mb >= 0, "0 (no cache) or more"),
            ("examples", self.examples >= 0, "0 or more"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r} must be {expected} (see conf/serve.yaml)")


class PayloadTooLarge(HTTPException):
    """Raised from inside the body stream once it passes the limit; FastAPI re-raises HTTPExceptions."""

    def __init__(self, limit_mb: float) -> None:
        super().__init__(413, f"the upload is larger than the limit of {limit_mb:.3g} MB: send a smaller image")


class GuardMiddleware:
    """Pure ASGI: refuse bodies over ``max_body`` (by Content-Length, else while streaming) and add
    :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp, max_body: int, limit_mb: float) -> None:
        self.app = app
        self.max_body = max_body
        self.limit_mb = limit_mb

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
                message = "the Content-Length header is not a number"
            await JSONResponse({"error": message}, status_code=status, headers={"connection": "close"})(
                scope, receive, send_with_headers
            )
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise PayloadTooLarge(self.limit_mb)
            return message

        await self.app(scope, limited_receive, send_with_headers)


def _version_token(index: Any) -> str:
    """Changes whenever the index does: thumbnail URLs carry it so browsers may cache them for good."""
    digest = hashlib.sha256(str(index.fingerprint).encode())
    for entry in index.entries:
        digest.update(f"\0{entry.path}\0{entry.size}\0{entry.mtime_ns}".encode())
    return digest.hexdigest()[:12]


def create_app(searcher: Any, index: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app searching ``index`` with ``searcher`` (a :class:`~oxford_ir.retrieval.search.Searcher`).

    ``index`` is the loaded :class:`~oxford_ir.retrieval.index.RetrievalIndex`; only its entries, root,
    ``image_path`` and descriptive attributes are used here, the vectors stay behind ``searcher``.
    """
    settings = settings or ServeSettings()
    settings.validate()
    n_images = len(index)
    if n_images == 0:
        raise ConfigError(f"the index at {index.path} holds no images; index a folder with images first")
    root = Path(index.root)
    version = _version_token(index)
    lowered_paths = [entry.path.lower() for entry in index.entries]
    k_limit = min(settings.max_k, n_images)
    default_k = min(settings.k, n_images)
    thumbs = ThumbnailCache(int(settings.thumb_cache_mb * 1024 * 1024))
    # one search at a time: torch already spreads one query over every core, so a queue keeps latencies honest
    search_lock = threading.Lock()
    templates = Jinja2Templates(directory=str(WEB_DIR / "templates"))
    static_version = hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted((WEB_DIR / "static").iterdir()) if p.is_file())
    ).hexdigest()[:12]

    app = FastAPI(title="oxford-ir search", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.index = index
    app.state.searcher = searcher
    app.state.settings = settings
    app.state.thumbnails = thumbs
    app.mount("/static", StaticFiles(directory=str(WEB_DIR / "static")), name="static")

    info = {
        "images": n_images,
        "model": index.model.describe(),
        "fingerprint": str(index.fingerprint),
        "image_size": None if index.image_size is None else int(index.image_size),
        "scales": [float(s) for s in index.scales],
        "embedding_dim": int(index.embedding_dim),
        "dtype": str(index.dtype),
        "backend": settings.backend,
        "root_name": root.name,
        "complete": bool(getattr(index, "complete", True)),
        "k": default_k,
        "max_k": k_limit,
        "max_upload_mb": settings.max_upload_mb,
        "max_image_megapixels": settings.max_image_megapixels,
        "thumb_size": settings.thumb_size,
        "max_thumb_size": settings.max_thumb_size,
        "examples": settings.examples,
        "version": version,
    }

    def thumb_url(i: int, size: int | None = None) -> str:
        return f"/thumb/{i}?size={size or settings.thumb_size}&v={version}"

    def describe(i: int) -> dict[str, Any]:
        entry = index.entries[i]
        return {"id": i, "path": entry.path, "width": entry.width, "height": entry.height, "thumb": thumb_url(i)}

    def check_id(i: int) -> int:
        if not 0 <= i < n_images:
            raise ApiError(404, f"no indexed image with id {i}: ids run from 0 to {n_images - 1}")
        return i

    def run_search(query: dict[str, Any], k: int, search: Any) -> dict[str, Any]:
        start = time.perf_counter()
        with search_lock:
            try:
                result = search()
            except OxfordIRError as error:
                raise ApiError(422, str(error)) from None
        took_ms = (time.perf_counter() - start) * 1000.0
        scores, indices = result.scores[0], result.indices[0]
        found = [(float(s), int(i)) for s, i in zip(scores, indices, strict=True) if i >= 0 and math.isfinite(s)]
        results = [{"rank": rank, "score": score, **describe(i)} for rank, (score, i) in enumerate(found, 1)]
        log.info("search %s k=%d: %.0f ms", query.get("path") or query.get("name"), k, took_ms)
        return {"query": query, "k": k, "took_ms": round(took_ms, 1), "results": results}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404 and message == "Not Found":
            message = f"no such page: {request.url.path}"
        return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for problem in error.errors():
            where = ".".join(str(p) for p in problem.get("loc", ()) if p not in ("query", "path", "body"))
            problems.append(f"{where or 'request'}: {problem.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(problems)}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request) -> Response:
        return templates.TemplateResponse(request, "index.html", {"info": info, "static_version": static_version})

    @app.get("/api/info")
    def api_info() -> dict[str, Any]:
        return info

    @app.get("/api/examples")
    def api_examples(
        n: int = Query(default=settings.examples, ge=0, le=200), seed: int | None = Query(default=None)
    ) -> dict[str, Any]:
        ids = random.Random(seed).sample(range(n_images), min(n, n_images))
        return {"items": [describe(i) for i in ids]}

    @app.get("/api/images")
    def api_images(
        q: str = Query(default="", max_length=200), limit: int = Query(default=48, ge=1, le=500)
    ) -> dict[str, Any]:
        needle = q.strip().lower()
        matches = [i for i, p in enumerate(lowered_paths) if needle in p]
        return {"query": q, "total": len(matches), "items": [describe(i) for i in matches[:limit]]}

    @app.get("/api/search")
    def api_search_id(
        image_id: int = Query(alias="id", description="row of an indexed image"),
        k: int = Query(default=default_k),
        bbox: str | None = Query(default=None, max_length=200),
    ) -> dict[str, Any]:
        i = check_id(image_id)
        k = check_k(k, k_limit)
        box = parse_bbox(bbox)
        entry = index.entries[i]
        check_bbox(box, entry.width, entry.height)
        query = {
            "kind": "id",
            **describe(i),
            "image": thumb_url(i, settings.max_thumb_size),
            "bbox": list(box) if box else None,
        }
        if box is None:
            return run_search(query, k, lambda: searcher.search_ids([i], k=k))
        path = _indexed_path(i)
        return run_search(query, k, lambda: searcher.search_images([path], [box], k=k))

    @app.post("/api/search")
    def api_search_upload(
        file: UploadFile = File(description="the query image"),
        k: int = Form(default=default_k),
        bbox: str | None = Form(default=None, max_length=200),
    ) -> dict[str, Any]:
        name = Path(file.filename or "upload").name
        k = check_k(k, k_limit)
        box = parse_bbox(bbox)
        check_content_type(file.content_type, name)
        with tempfile.NamedTemporaryFile(prefix="oxford-ir-upload-") as spool:
            shutil.copyfileobj(file.file, spool)
            spool.flush()
            size = spool.tell()
            if size > settings.max_upload_bytes:
                raise ApiError(413, f"{name!r} is {size / 2**20:.3g} MB; the limit is {settings.max_upload_mb:.3g} MB")
            if size == 0:
                raise ApiError(400, f"{name!r} is empty: choose an image file")
            image = decode_upload(Path(spool.name), name, settings.max_pixels)
        check_bbox(box, image.width, image.height)
        query = {
            "kind": "upload",
            "name": name,
            "width": image.width,
            "height": image.height,
            "bbox": list(box) if box else None,
        }
        return run_search(query, k, lambda: searcher.search_images([image], [box], k=k))

    def _indexed_path(i: int) -> Path:
        try:
            return contained_path(root, Path(index.image_path(i)))
        except DataError as error:
            log.warning("refused: %s", error)
            raise ApiError(
                404, f"image {i} ({index.entries[i].path}) is not served: it lies outside the indexed folder"
            ) from None

    @app.get("/thumb/{image_id}")
    def thumbnail(
        image_id: int,
        size: int = Query(default=settings.thumb_size, ge=MIN_THUMB_SIZE, le=settings.max_thumb_size),
        v: str | None = Query(default=None, max_length=64),
    ) -> Response:
        i = check_id(image_id)
        key = (i, size)
        data = thumbs.get(key)
        if data is None:
            path = _indexed_path(i)
            try:
                data = make_thumbnail(path, size)
            except DataError as error:
                log.warning("thumbnail %d: %s", i, error)
                raise ApiError(404, f"image {i} ({index.entries[i].path}) cannot be read any more: {error}") from None
            thumbs.put(key, data)
        cache = "public, max-age=31536000, immutable" if v == version else "no-cache"
        return Response(data, media_type="image/jpeg", headers={"cache-control": cache})

    if settings.allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    app.add_middleware(
        GuardMiddleware, max_body=settings.max_upload_bytes + MULTIPART_OVERHEAD, limit_mb=settings.max_upload_mb
    )
    return app
