"""The web app: a page to search an index by example, and the JSON API behind it (FastAPI).

Routes
  ``GET /``                    the page (templates/index.html, static/app.js, static/app.css)
  ``GET /api/info``            index size, version and build time, model, extraction settings, limits
  ``GET /api/examples?n=``     ``n`` random indexed images (the page's strip of examples)
  ``GET /api/images?q=``       indexed images whose relative path contains ``q`` (case-insensitive)
  ``GET /api/search?id=&k=&bbox=&v=``   search with indexed image ``id`` (its stored embedding, or its box)
  ``POST /api/search``         search with an uploaded image: multipart ``file``, optional ``bbox``, ``k``
  ``GET /thumb/<id>?size=&v=`` a JPEG thumbnail of indexed image ``id``

The server follows the index folder (:mod:`oxford_ir.web.served_index`): when ``oxford-ir-index`` commits a new
version, the next requests are answered from it, each request from one version only. Every answer about the
index carries ``version`` (the version folder, e.g. ``v000003``) and ``v`` (a token of its rows); ids are rows
of that version, and thumbnail URLs carry ``v=``. An id sent with the ``v`` of a recently replaced version still
means the image that version listed (a search maps it to its row in the new version); a thumbnail is only ever
the picture the version's embedding was computed from: a file replaced or deleted since is refused (409 or 404)
rather than shown beside the old embedding.

Errors are JSON ``{"error": "<one sentence>"}`` with the status that fits: 404 unknown id or page, 409 an id or
file that changed since the version that listed it (reload the page), 405 wrong
method, 408 upload body too slow, 413 upload too large (bytes or pixels), 415 not an image, 400 undecodable
image or malformed body, 422 bad ``k``/``bbox``/parameter, 503 (with ``Retry-After``) when an upload waited
``upload_wait_s`` for a decode slot; an unexpected failure is a 500 with one line, its traceback only in the
server's log. Messages name the field and what to send instead, and never show a path of the server's file
system. Files are only ever reached through integer ids into the index, never through a path from the request.

What one request may cost is bounded (:mod:`oxford_ir.web.limits`): the body by size and time, decoding by
at most ``max_parallel_decodes`` uploads at once (the rest wait in line without holding a thread), and the
memory of a large decode is handed back to the operating system afterwards.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from oxford_ir.errors import ConfigError, DataError, IndexFormatError, OxfordIRError
from oxford_ir.retrieval.budgeted_index import describe_stored_index
from oxford_ir.web.limits import DecodeSlots, GuardMiddleware, HostGuard, release_memory
from oxford_ir.web.queries import (
    ApiError,
    check_bbox,
    check_content_type,
    check_k,
    echo,
    parse_bbox,
    probe_upload,
    scrub_paths,
    upload_pixels,
)
from oxford_ir.web.served_index import Listing, ServedIndex, ServedVersion, file_matches, searcher_like
from oxford_ir.web.thumbnails import FileChanged, ThumbnailCache, contained_path, entry_key, entry_thumbnail

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent
#: what a multipart body may carry besides the file itself (boundaries, part headers, k and bbox)
MULTIPART_OVERHEAD = 64 * 1024
MIN_THUMB_SIZE = 16
#: uploads of more pixels than this hand their freed memory back to the operating system once decoded
TRIM_PIXELS = 4_000_000
#: what a 503 for a busy server asks the client to wait, in seconds
RETRY_AFTER_S = 5
#: what to do about each request field, appended to its validation error
FIELD_HINTS = {
    "file": "send the query image as the multipart/form-data field 'file' (as the page and curl -F file=@photo.jpg do)",
    "id": "give the integer id of an indexed image (GET /api/images?q= lists them)",
    "image_id": "give the integer id of an indexed image (GET /api/images?q= lists them)",
    "k": "give a whole number of results",
    "bbox": "give four numbers x1,y1,x2,y2 in pixels of the query image",
    "size": "give a thumbnail size in pixels",
    "n": "give a whole number of examples",
    "limit": "give a whole number of results",
    "seed": "give a whole number",
    "q": "give a shorter part of a file name",
    "v": "use the thumbnail URL the API gave",
}


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
    #: uploads decoded at once (each needs 8.5 to 31 bytes per pixel while it is decoded); others wait in line
    max_parallel_decodes: int = 1
    #: how long an upload may wait in that line before it is refused with 503 and Retry-After
    upload_wait_s: float = 30.0
    #: how long the whole body of a request may take to arrive before it is refused with 408
    upload_timeout_s: float = 60.0
    #: at least this many seconds between two looks (one stat) at the index's CURRENT file for a new version
    index_check_s: float = 1.0

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
            ("max_parallel_decodes", self.max_parallel_decodes >= 1, "at least 1"),
            ("upload_wait_s", self.upload_wait_s >= 0, "0 (refuse at once when busy) or more"),
            ("upload_timeout_s", self.upload_timeout_s > 0, "positive"),
            ("index_check_s", self.index_check_s >= 0, "0 (look at every request) or more"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r} must be {expected} (see conf/serve.yaml)")


def create_app(
    searcher: Any,
    index: Any,
    settings: ServeSettings | None = None,
    *,
    make_searcher: Callable[[Any], Any] | None = None,
) -> FastAPI:
    """The FastAPI app searching ``index`` with ``searcher`` (a :class:`~oxford_ir.retrieval.search.Searcher`),
    then each newer version of the index folder that ``oxford-ir-index`` commits.

    ``index`` is the loaded :class:`~oxford_ir.retrieval.index_format.RetrievalIndex`; only its entries, root,
    ``image_path`` and descriptive attributes are used here, the vectors stay behind ``searcher``.
    ``make_searcher(index)`` builds the searcher of a newer version (default: ``searcher``'s settings).
    """
    settings = settings or ServeSettings()
    settings.validate()
    if len(index) == 0:
        raise ConfigError(f"the index at {index.path} holds no images; index a folder with images first")
    served = ServedIndex(
        ServedVersion.of(index, searcher), make_searcher or searcher_like(searcher), check_s=settings.index_check_s
    )
    thumbs = ThumbnailCache(int(settings.thumb_cache_mb * 1024 * 1024))
    # one search at a time: torch already spreads one query over every core, so a queue keeps latencies honest
    search_lock = threading.Lock()
    # uploads are decoded (the memory-hungry part) outside that lock, a bounded number at once
    slots = DecodeSlots(settings.max_parallel_decodes)
    templates = Jinja2Templates(directory=str(WEB_DIR / "templates"))
    static_version = hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted((WEB_DIR / "static").iterdir()) if p.is_file())
    ).hexdigest()[:12]

    app = FastAPI(title="oxford-ir search", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.served = served
    app.state.settings = settings
    app.state.thumbnails = thumbs
    app.state.decode_slots = slots
    app.mount("/static", StaticFiles(directory=str(WEB_DIR / "static")), name="static")

    def k_limit(sv: ServedVersion) -> int:
        return min(settings.max_k, len(sv))

    def default_k(sv: ServedVersion) -> int:
        return min(settings.k, len(sv))

    info_cache: list[tuple[ServedVersion, dict[str, Any]]] = []

    def info_of(sv: ServedVersion) -> dict[str, Any]:
        """What /api/info and the page show of version ``sv`` (made once per version)."""
        cached = info_cache[-1] if info_cache else None  # one (version, info) pair, replaced whole
        if cached is None or cached[0] is not sv:
            cached = (sv, describe_version(sv))
            info_cache[:] = [cached]
        return cached[1]

    def describe_version(sv: ServedVersion) -> dict[str, Any]:
        index = sv.index
        return {
            "images": len(sv),
            "version": sv.name,
            "v": sv.token,
            "built": sv.built,  # ISO 8601; from the manifest's "created", else its file's mtime (built_source)
            "built_source": sv.built_source,
            "model": scrub_paths(index.model.describe()),  # weights and checkpoints by file name only
            "fingerprint": str(index.fingerprint),
            "image_size": None if index.image_size is None else int(index.image_size),
            "scales": [float(s) for s in index.scales],
            "embedding_dim": int(index.embedding_dim),
            "dtype": str(index.dtype),
            "backend": getattr(sv.searcher, "backend", settings.backend),  # auto resolved to what it searches with
            # the stored search index (oxford-ir-index index.memory=...): its recall@10 and queries/s measured at build
            "search_index": describe_stored_index(getattr(index, "manifest", {}) or {}),
            "root_name": Path(index.root).name,
            "complete": bool(getattr(index, "complete", True)),
            "k": default_k(sv),
            "max_k": k_limit(sv),
            "max_upload_mb": settings.max_upload_mb,
            "max_image_megapixels": settings.max_image_megapixels,
            "max_parallel_decodes": settings.max_parallel_decodes,
            "upload_timeout_s": settings.upload_timeout_s,
            "thumb_size": settings.thumb_size,
            "max_thumb_size": settings.max_thumb_size,
            "examples": settings.examples,
        }

    def thumb_url(sv: ServedVersion, i: int, size: int | None = None) -> str:
        return f"/thumb/{i}?size={size or settings.thumb_size}&v={sv.token}"

    def describe(sv: ServedVersion, i: int) -> dict[str, Any]:
        entry = sv.entries[i]
        return {"id": i, "path": entry.path, "width": entry.width, "height": entry.height, "thumb": thumb_url(sv, i)}

    def stamp(sv: ServedVersion) -> dict[str, str]:
        """The version an answer was made from, for the answer."""
        return {"version": sv.name, "v": sv.token}

    def check_id(i: int, n_images: int) -> int:
        if not 0 <= i < n_images:
            raise ApiError(404, f"no indexed image with id {echo(i)}: ids run from 0 to {n_images - 1}")
        return i

    def retired(i: int) -> ApiError:
        return ApiError(
            409,
            f"image id {echo(i)} was listed from a version of the index that this server no longer holds "
            "(the index was updated since): reload the page",
        )

    def resolve_id(i: int, token: str | None) -> tuple[ServedVersion, int]:
        """The served version and the row in it of image ``i`` of the version with ``token`` (None: served)."""
        sv = served.current()
        if token is None or token == sv.token:
            return sv, check_id(i, len(sv))
        listed = served.listing(token)
        if listed is None:
            raise retired(i)
        entry = listed.entries[check_id(i, len(listed))]
        try:
            row = int(sv.index.positions([entry.path])[0])
        except IndexFormatError:
            row = -1
        if row < 0 or sv.entries[row] != entry:
            raise ApiError(
                409,
                f"image {i} ({entry.path}) was changed or removed by the index update to {sv.name}: reload the page",
            )
        return sv, row

    def changed(sv: Listing | ServedVersion, i: int, deleted: bool) -> ApiError:
        served.newest(timeout=0)  # let the next requests see the version that describes the file as it is now
        entry = sv.entries[i]
        if deleted:
            return ApiError(
                404,
                f"image {i} ({entry.path}) cannot be read any more: image not found (deleted or moved after index "
                f"version {sv.name or 'served'} was built)",
            )
        return ApiError(
            409,
            f"image {i} ({entry.path}) was replaced on disk after index version {sv.name or 'served'} was built: "
            "its picture no longer matches the indexed one; reload the page once the index is updated",
        )

    def run_search(
        sv: ServedVersion, query: dict[str, Any], k: int, search: Callable[[], Any], embeds: bool = False
    ) -> dict[str, Any]:
        """``search()`` under the search lock; ``embeds``: it runs the network (memory handed back after)."""
        start = time.perf_counter()
        try:
            with search_lock:
                result = search()
        except OxfordIRError as error:
            raise ApiError(422, scrub_paths(str(error), Path(sv.index.root))) from None
        finally:
            if embeds:  # the activations were freed in this worker thread's heap arena: give them back
                release_memory()
        took_ms = (time.perf_counter() - start) * 1000.0
        scores, indices = result.scores[0], result.indices[0]
        found = [(float(s), int(i)) for s, i in zip(scores, indices, strict=True) if i >= 0 and math.isfinite(s)]
        results = [{"rank": rank, "score": score, **describe(sv, i)} for rank, (score, i) in enumerate(found, 1)]
        log.info("search %s k=%d: %.0f ms", query.get("path") or query.get("name"), k, took_ms)
        return {"query": query, "k": k, "took_ms": round(took_ms, 1), **stamp(sv), "results": results}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        headers = dict(error.headers or {})
        if error.status_code == 404 and message == "Not Found":
            message = f"no such page: {echo(request.url.path)}"
        elif error.status_code == 405:
            allowed = headers.get("allow") or headers.get("Allow") or "GET"
            message = f"{request.method} is not allowed on {echo(request.url.path)}: use {allowed}"
        elif error.status_code == 400 and request.method == "POST":  # the multipart parser's own errors
            message = (
                f"{message.rstrip('.')}: the body is not a valid multipart/form-data upload; {FIELD_HINTS['file']}"
            )
        return JSONResponse({"error": message}, status_code=error.status_code, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for problem in error.errors():
            names = [str(p) for p in problem.get("loc", ()) if p not in ("query", "path", "body", "form")]
            where = ".".join(names)
            message = str(problem.get("msg", "invalid"))
            if problem.get("type") == "value_error" and where == "file":  # a text field named file
                message = "not a file"
            hint = FIELD_HINTS.get(names[-1] if names else "", "")
            problems.append(f"{where or 'request'}: {message}" + (f": {hint}" if hint else ""))
        return JSONResponse({"error": "; ".join(problems)}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(error).__name__, error)
        return JSONResponse(
            {"error": f"the server failed on this request ({type(error).__name__}); its log has the details"},
            status_code=500,
        )

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request) -> Response:
        info = info_of(served.current())
        return templates.TemplateResponse(request, "index.html", {"info": info, "static_version": static_version})

    @app.get("/api/info")
    def api_info() -> dict[str, Any]:
        return info_of(served.current())

    @app.get("/api/examples")
    def api_examples(
        n: int = Query(default=settings.examples, ge=0, le=200), seed: int | None = Query(default=None)
    ) -> dict[str, Any]:
        sv = served.current()
        ids = random.Random(seed).sample(range(len(sv)), min(n, len(sv)))
        return {**stamp(sv), "items": [describe(sv, i) for i in ids]}

    @app.get("/api/images")
    def api_images(
        q: str = Query(default="", max_length=200), limit: int = Query(default=48, ge=1, le=500)
    ) -> dict[str, Any]:
        sv = served.current()
        needle = q.strip().lower()
        matches = [i for i, p in enumerate(sv.lowered_paths) if needle in p]
        return {"query": q, "total": len(matches), **stamp(sv), "items": [describe(sv, i) for i in matches[:limit]]}

    @app.get("/api/search")
    def api_search_id(
        image_id: int = Query(alias="id", description="row of an indexed image"),
        k: int | None = Query(default=None),
        bbox: str | None = Query(default=None, max_length=200),
        v: str | None = Query(default=None, max_length=64),
    ) -> dict[str, Any]:
        sv, i = resolve_id(image_id, v)
        k = check_k(default_k(sv) if k is None else k, k_limit(sv))
        box = parse_bbox(bbox)
        entry = sv.entries[i]
        check_bbox(box, entry.width, entry.height)
        query = {
            "kind": "id",
            **describe(sv, i),
            "image": thumb_url(sv, i, settings.max_thumb_size),
            "bbox": list(box) if box else None,
        }
        searcher = sv.searcher
        if box is None:
            return run_search(sv, query, k, lambda: searcher.search_ids([i], k=k))
        path = _indexed_path(sv, i)
        if not file_matches(path, entry):  # the query embedding must come from the indexed picture
            raise changed(sv, i, deleted=not path.exists())
        answer = run_search(sv, query, k, lambda: searcher.search_images([path], [box], k=k), embeds=True)
        if not file_matches(path, entry):  # replaced while it was read
            raise changed(sv, i, deleted=not path.exists())
        return answer

    def busy() -> ApiError:
        return ApiError(
            503,
            f"the server is busy decoding other uploads ({slots.busy} at a time, {slots.waiting} waiting): "
            f"try again in {RETRY_AFTER_S} s",
            headers={"retry-after": str(RETRY_AFTER_S)},
        )

    def prepare_upload(file: UploadFile, name: str, box: Any, image_size: int | None) -> tuple[Any, int, int]:
        """The upload's test-time pixels and its size as shown; the big decode happens here, in a slot."""
        with tempfile.NamedTemporaryFile(prefix="oxford-ir-upload-") as spool:
            shutil.copyfileobj(file.file, spool)
            spool.flush()
            size = spool.tell()
            if size > settings.max_upload_bytes:
                raise ApiError(413, f"{name!r} is {size / 2**20:.3g} MB; the limit is {settings.max_upload_mb:.3g} MB")
            if size == 0:
                raise ApiError(400, f"{name!r} is empty: choose an image file")
            path = Path(spool.name)
            width, height = probe_upload(path, name, settings.max_pixels)
            check_bbox(box, width, height)
            try:
                pixels = upload_pixels(path, name, image_size, box)
            finally:
                if width * height > TRIM_PIXELS:
                    release_memory()
        return pixels, width, height

    @app.post("/api/search")
    async def api_search_upload(
        request: Request,
        file: UploadFile = File(description="the query image"),
        k: int | None = Form(default=None),
        bbox: str | None = Form(default=None, max_length=200),
    ) -> dict[str, Any]:
        sv = served.current()  # one version from the decode (its image size) to the results
        name = echo(Path(file.filename or "upload").name)
        k = check_k(default_k(sv) if k is None else k, k_limit(sv))
        box = parse_bbox(bbox)
        check_content_type(file.content_type, name)
        async with slots.hold(settings.upload_wait_s, busy, request.is_disconnected):
            pixels, width, height = await run_in_threadpool(prepare_upload, file, name, box, sv.index.image_size)
            query = {
                "kind": "upload",
                "name": name,
                "width": width,
                "height": height,
                "bbox": list(box) if box else None,
            }
            # the pixels are the test-time ones already (cropped, downscaled): the searcher's own eval_image leaves
            # them as they are, so no box here and no second resize
            search = lambda: sv.searcher.search_images([pixels], [None], k=k)  # noqa: E731
            if sv.index.image_size is None:  # a full-resolution index: the pixels stay large until embedded
                return await run_in_threadpool(run_search, sv, query, k, search, True)
        return await run_in_threadpool(run_search, sv, query, k, search, True)

    def _indexed_path(sv: Listing | ServedVersion, i: int) -> Path:
        try:
            return contained_path(sv.root, sv.root / sv.entries[i].path)
        except DataError as error:
            log.warning("refused: %s", error)
            raise ApiError(
                404, f"image {i} ({sv.entries[i].path}) is not served: it lies outside the indexed folder"
            ) from None

    def thumbnail_of(sv: Listing | ServedVersion, i: int, size: int) -> bytes:
        """The thumbnail of row ``i`` of ``sv``, only ever of the file its embedding was computed from."""
        entry = sv.entries[i]
        key = entry_key(entry.path, entry.size, entry.mtime_ns, size)
        data = thumbs.get(key)
        if data is None:
            path = _indexed_path(sv, i)
            try:
                data = entry_thumbnail(path, entry.size, entry.mtime_ns, size)
            except FileChanged as error:
                raise changed(sv, i, error.deleted) from None
            except DataError as error:
                log.warning("thumbnail %d: %s", i, error)
                reason = scrub_paths(str(error), sv.root)
                raise ApiError(404, f"image {i} ({entry.path}) cannot be read any more: {reason}") from None
            thumbs.put(key, data)
        return data

    @app.get("/thumb/{image_id}")
    def thumbnail(
        image_id: int,
        size: int = Query(default=settings.thumb_size, ge=MIN_THUMB_SIZE, le=settings.max_thumb_size),
        v: str | None = Query(default=None, max_length=64),
    ) -> Response:
        if v is None:  # an id of whichever version is served: after a file changed, of the newest one
            sv = served.current()
            check_id(image_id, len(sv))
            try:
                data = thumbnail_of(sv, image_id, size)
            except ApiError as error:
                newest = served.newest() if error.status in (404, 409) else sv
                if newest is sv or not 0 <= image_id < len(newest):
                    raise
                data = thumbnail_of(newest, image_id, size)
            return Response(data, media_type="image/jpeg", headers={"cache-control": "no-cache"})
        served.current()  # a look at CURRENT now and then, as for every request
        listed = served.listing(v)
        if listed is None:
            raise retired(image_id)
        check_id(image_id, len(listed))
        data = thumbnail_of(listed, image_id, size)  # the URL names one picture for good: the browser may keep it
        return Response(data, media_type="image/jpeg", headers={"cache-control": "public, max-age=31536000, immutable"})

    if settings.allowed_hosts is not None:
        app.add_middleware(HostGuard, allowed_hosts=list(settings.allowed_hosts))
    app.add_middleware(
        GuardMiddleware,
        max_body=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        limit_mb=settings.max_upload_mb,
        body_timeout_s=settings.upload_timeout_s,
    )
    return app
