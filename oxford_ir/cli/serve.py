"""``oxford-ir-serve``: a local web page to search an index by example (FastAPI app in :mod:`oxford_ir.web`).

``oxford-ir-serve index=<dir> [host=127.0.0.1] [port=8000] [k=12] [backend=exact] ...`` loads the index,
builds the model and the search backend once (so a broken checkpoint fails here, not at the first
query), binds the socket, prints the URL and serves until Ctrl-C. ``port=0`` picks a free port.

The server follows the index folder: when ``oxford-ir-index`` updates it, the new version is loaded beside the
old one and served from then on (:mod:`oxford_ir.web.served_index`); ``index_check_s`` (default 1) is how often
it looks. A new version that cannot be loaded is logged and the old one stays served.

uvicorn runs with the h11 protocol subclassed only so that a request too malformed to reach the app (a broken
request line or header, a Content-Length that is not a number, headers over ``max_header_kb``) is also answered
with the API's JSON error, not uvicorn's plain text (:func:`server_config`).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from oxford_ir.cli.hydra_typos import refuse_typos
from oxford_ir.config import CONFIG_DIR
from oxford_ir.errors import ConfigError, exit_on_user_error
from oxford_ir.web.app import ServeSettings, create_app

__all__ = ["ServeSettings", "bind_socket", "build_app", "create_app", "main", "serve", "server_config", "url_for"]

log = logging.getLogger(__name__)

#: Host headers a loopback-bound server accepts by default
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _allowed_hosts(value: Any, host: str) -> tuple[str, ...] | None:
    if value == "auto":
        return LOOPBACK_NAMES if host in ("localhost",) or host.startswith("127.") else None
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _plain(cfg: DictConfig, key: str) -> Any:
    """``cfg[key]`` as plain Python (lists, dicts), None when absent."""
    value = cfg.get(key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def settings_from_config(cfg: DictConfig) -> ServeSettings:
    """The app's limits and defaults from ``conf/serve.yaml``."""
    try:
        return ServeSettings(
            k=int(cfg.k),
            max_k=int(cfg.max_k),
            max_upload_mb=float(cfg.max_upload_mb),
            max_image_megapixels=float(cfg.max_image_megapixels),
            thumb_size=int(cfg.thumb_size),
            max_thumb_size=int(cfg.max_thumb_size),
            thumb_cache_mb=float(cfg.thumb_cache_mb),
            examples=int(cfg.examples),
            allowed_hosts=_allowed_hosts(_plain(cfg, "allowed_hosts"), str(cfg.host)),
            backend=str(cfg.backend),
            max_parallel_decodes=int(cfg.max_parallel_decodes),
            upload_wait_s=float(cfg.upload_wait_s),
            upload_timeout_s=float(cfg.upload_timeout_s),
            index_check_s=float(_or(_plain(cfg, "index_check_s"), ServeSettings.index_check_s)),
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"conf/serve.yaml: a limit is not a number ({error}); see the comments there") from None


def build_app(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """``(app, index, searcher)`` for ``cfg``; the model and the search backend are built here, once."""
    from oxford_ir.extraction.options import resolve_device
    from oxford_ir.retrieval.index_format import RetrievalIndex
    from oxford_ir.retrieval.search import Searcher

    if OmegaConf.is_missing(cfg, "index") or not cfg.index:
        raise ConfigError("index= is required: the folder written by oxford-ir-index (oxford-ir-serve index=<dir>)")
    settings = settings_from_config(cfg)
    settings.validate()
    index = RetrievalIndex.load(Path(str(cfg.index)), mmap=True)  # rows paged in from the file, not copied
    searcher = Searcher(
        index,
        backend=str(cfg.backend),
        faiss=_plain(cfg, "faiss") or None,
        query_expansion=_plain(cfg, "query_expansion"),
        database_augmentation=_plain(cfg, "database_augmentation"),
        device=resolve_device(str(cfg.extraction.device)),
    )
    searcher.model  # noqa: B018 - build now: a missing checkpoint or weights file fails at start, not on a query
    searcher.database  # noqa: B018 - and the backend (faiss training, DBA) before the first visitor waits for it
    return create_app(searcher, index, settings), index, searcher


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free one); a clear ConfigError if impossible."""
    if isinstance(port, bool) or not str(port).isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"port={port!r} must be a whole number from 0 (any free port) to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ConfigError(f"host={host!r} is not an address of this machine ({error}); use 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is in use: choose another port=, or port=0 for a free one"
            ) from None
        if error.errno == errno.EACCES:
            raise ConfigError(f"no permission to listen on {host}:{port}: use a port above 1023") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def _json_error_protocol(max_header_kb: float) -> Any:
    """uvicorn's h11 protocol answering requests it cannot parse with a JSON error (None: uvicorn lacks the hook)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if not callable(getattr(H11Protocol, "send_400_response", None)):
        return None
    body = json.dumps(  # ASCII: its length in bytes is its length in characters
        {
            "error": "the request is not valid HTTP/1.1: a malformed request line or header, a Content-Length that "
            f"is not a number, or headers over {max_header_kb:g} KB (max_header_kb); send a well-formed request"
        }
    )

    class JsonErrorH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            import h11

            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            try:
                for event in (
                    h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                    h11.Data(data=body.encode()),
                    h11.EndOfMessage(),
                ):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # a response had already begun: just close
                pass
            self.transport.close()

    return JsonErrorH11Protocol


def server_config(app: Any, cfg: DictConfig | None = None) -> Any:
    """The ``uvicorn.Config`` that :func:`serve` runs ``app`` with (``cfg``: ``conf/serve.yaml``; None: defaults)."""
    import uvicorn

    def value(key: str, default: Any) -> Any:
        return default if cfg is None or cfg.get(key) is None else cfg.get(key)

    max_header_kb = float(value("max_header_kb", 16))
    protocol = _json_error_protocol(max_header_kb)
    return uvicorn.Config(
        app,
        http=protocol or "auto",
        h11_max_incomplete_event_size=int(max_header_kb * 1024),
        log_config=None,  # keep Hydra's logging (console + the run's log file)
        log_level=str(value("log_level", "info")),
        access_log=bool(value("access_log", False)),
        server_header=False,
        timeout_graceful_shutdown=5,
    )


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(cfg: DictConfig) -> None:
    """Build the app, print its URL and serve it until interrupted (Ctrl-C)."""
    import uvicorn

    app, index, searcher = build_app(cfg)
    host = str(cfg.host)
    sock = bind_socket(host, cfg.port)
    url = url_for(sock)
    if not is_loopback(host):
        log.warning("serving on %s: anyone who can reach this machine can search and view the indexed images", host)
    try:  # a Ctrl-C right after the URL line, before uvicorn handles signals, is a normal stop too
        print(f"oxford-ir-serve: {url}  ({len(index)} images, {searcher.backend} search; Ctrl-C stops)", flush=True)
        uvicorn.Server(server_config(app, cfg)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then usually re-raises it: the normal way to stop
        pass
    finally:
        sock.close()
    # also when uvicorn returned without re-raising the signal it shut down on (seen on a fresh CI install)
    print("oxford-ir-serve: stopped", flush=True)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="serve")
@exit_on_user_error
def _main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    serve(cfg)


def main() -> None:
    """Console script: a mistyped key or option is answered with its close match (:mod:`.hydra_typos`)."""
    refuse_typos("serve")
    _main()


if __name__ == "__main__":
    main()
