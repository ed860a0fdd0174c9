"""Load test of the real web server: ``oxford-ir-serve`` on 127.0.0.1 under concurrent clients.

By default it builds a tiny synthetic index itself (JPEGs in a temporary folder, a small random CNN with
saved weights, indexed with ``oxford-ir-index``), starts ``oxford-ir-serve`` on a free port and runs:

- ``get``: ``--get-clients`` (16) clients searching by a random indexed id (``GET /api/search?id=&k=``);
- ``upload``: ``--upload-clients`` (8) clients uploading a phone-sized JPEG (``POST /api/search``);
- ``big-png``: ``--big-clients`` (8) clients uploading at once a 61 KB grayscale PNG of 7000 x 7000 =
  49 megapixels (inside the default 50-megapixel and 20 MB limits): the memory test. ``--big-clients 0`` skips it.

Every client keeps one HTTP/1.1 connection (``http.client``, one thread per client). It prints a Markdown
table with one row per scenario (requests, errors, throughput, p50/p95/max latency, the server's resident
memory at its peak during the scenario, sampled every 20 ms, and after it), the server's memory at the start,
at its peak (VmHWM) and at the end, checks that a last search still answers, and exits 1 on any error (a
status other than 200 with results, a refused or broken connection, a server that died). The index and the
server run as ``python -m`` with this checkout first on the path; trailing ``key=value`` arguments are
``oxford-ir-serve`` overrides.

    .venv/bin/python experiments/load_test.py                       # about 1 min on 2 cores
    .venv/bin/python experiments/load_test.py --only big-png max_parallel_decodes=2
    .venv/bin/python experiments/load_test.py --requests 20 --get-clients 2 --upload-clients 2 --big-clients 0
    .venv/bin/python experiments/load_test.py --index indexes/paris6k --upload path/to/photo.jpg --seconds 30
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path[0] = str(REPO)
BOUNDARY = "oxfordirloadtest"


def entry_point(module: str) -> list[str]:
    """``oxford-ir-index`` / ``oxford-ir-serve`` as ``python -m``: the code of this script's checkout."""
    return [sys.executable, "-m", module]


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }


# -- the server -------------------------------------------------------------------------------------------------
def synthetic_collection(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` JPEGs of 640 x 480 or 480 x 640: gradients with random shapes (distinct, cheap to make)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        width, height = (640, 480) if i % 3 else (480, 640)
        top, bottom = rng.integers(20, 235, size=(2, 3))
        ramp = np.linspace(0.0, 1.0, height)[:, None, None]
        image = Image.fromarray((top * (1 - ramp) + bottom * ramp).repeat(width, axis=1).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = int(rng.integers(0, width - 120)), int(rng.integers(0, height - 120))
            w, h = (int(v) for v in rng.integers(30, 120, size=2))
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
        image.save(folder / f"img_{i:03d}.jpg", quality=90)


def build_index(workdir: Path, n_images: int, image_size: int) -> Path:
    """A synthetic collection indexed by the real ``oxford-ir-index`` with a small ScratchCNN whose random
    weights are saved (so the server's model is the index's)."""
    import torch

    from oxford_ir.models.backbones import ScratchCNN

    channels = [16, 32, 64]
    images, out, weights = workdir / "images", workdir / "index", workdir / "scratch_cnn.pth"
    synthetic_collection(images, n_images)
    torch.manual_seed(0)
    torch.save(ScratchCNN(channels=channels).state_dict(), weights)
    command = [
        *entry_point("oxford_ir.cli.index"),
        f"images={images}",
        f"out={out}",
        "backbone=scratch",
        f"backbone.channels=[{','.join(map(str, channels))}]",
        f"backbone.weights={weights}",
        f"extraction.image_size={image_size}",
        "extraction.num_workers=0",
        "extraction.device=cpu",
        f"hydra.run.dir={workdir / 'index-run'}",
    ]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"oxford-ir-index failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return out


def phone_jpeg(width: int = 2000, height: int = 1500) -> bytes:
    """A 2000 x 1500 JPEG of a phone photo's proportions with some texture (844 KB)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def big_png(side: int = 7000) -> bytes:
    """A flat grayscale PNG of ``side`` x ``side`` pixels: 49 megapixels in 61 KB."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


class Server:
    """``oxford-ir-serve`` in a subprocess on a free port of 127.0.0.1; its URL from the line it prints."""

    def __init__(self, index: Path, run_dir: Path, overrides: list[str]) -> None:
        self.process = subprocess.Popen(
            [*entry_point("oxford_ir.cli.serve"), f"index={index}", "port=0", "extraction.device=cpu"]
            + [f"hydra.run.dir={run_dir}", *overrides],
            cwd=REPO,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.output: list[str] = []
        self.host, self.port = "", 0
        deadline = time.monotonic() + 120
        while not self.port:
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise SystemExit("oxford-ir-serve did not start:\n" + "".join(self.output))
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.output.append(line)
            if line.startswith("oxford-ir-serve: http://"):
                address = line.split()[1].removeprefix("http://").rstrip("/")
                self.host, port = address.rsplit(":", 1)
                self.port = int(port)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def memory_mb(self) -> dict[str, float]:
        """VmRSS (resident now) and VmHWM (resident peak) of the server process, in MiB."""
        values = {}
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024
        return values

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return self.process.returncode


# -- the clients ------------------------------------------------------------------------------------------------
def multipart(name: str, content_type: str, data: bytes, fields: dict[str, str]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, value in fields.items()
    ]
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return b"".join(parts) + head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


@dataclass
class Request:
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client(
    server: Server, make: Callable[[random.Random], Request], budget: Callable[[], bool], seed: int, out: Outcome
) -> None:
    """One client: requests over one keep-alive connection while ``budget()`` grants them."""
    rng = random.Random(seed)
    connection = http.client.HTTPConnection(server.host, server.port, timeout=300)
    try:
        while budget():
            request = make(rng)
            start = time.perf_counter()
            try:
                connection.request(request.method, request.path, body=request.body, headers=request.headers)
                response = connection.getresponse()
                payload = response.read()
                ok = response.status == 200 and bool(json.loads(payload).get("results"))
                error = None if ok else f"{response.status}: {payload[:200]!r}"
            except (OSError, http.client.HTTPException, ValueError) as problem:
                error = f"{type(problem).__name__}: {problem}"
                connection.close()
                connection = http.client.HTTPConnection(server.host, server.port, timeout=300)
            took = time.perf_counter() - start
            with out.lock:
                out.latencies.append(took)
                if error:
                    out.errors.append(error)
    finally:
        connection.close()


def run_scenario(
    server: Server, clients: int, make: Callable[[random.Random], Request], requests: int, seconds: float | None
) -> dict:
    """``clients`` threads sharing ``requests`` requests (or running for ``seconds``); latency and memory."""
    out = Outcome()
    issued = 0
    issue_lock = threading.Lock()
    stop_at = time.monotonic() + seconds if seconds else None

    def budget() -> bool:
        nonlocal issued
        with issue_lock:
            if stop_at is not None:
                return time.monotonic() < stop_at
            if issued >= requests:
                return False
            issued += 1
            return True

    peak = {"rss": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            if server.alive():
                peak["rss"] = max(peak["rss"], server.memory_mb()["VmRSS"])
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [
        threading.Thread(target=client, args=(server, make, budget, seed, out), daemon=True) for seed in range(clients)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    latencies = sorted(out.latencies)
    n = len(latencies)
    return {
        "clients": clients,
        "requests": n,
        "errors": len(out.errors),
        "first_errors": out.errors[:3],
        "req_per_s": n / wall if wall else 0.0,
        "p50_ms": 1000 * statistics.median(latencies) if n else float("nan"),
        "p95_ms": 1000 * latencies[min(n - 1, round(0.95 * (n - 1)))] if n else float("nan"),
        "max_ms": 1000 * latencies[-1] if n else float("nan"),
        "rss_peak_mb": peak["rss"],
        "rss_after_mb": server.memory_mb()["VmRSS"] if server.alive() else float("nan"),
    }


def table(rows: dict[str, dict]) -> str:
    head = ["scenario", "clients", "requests", "errors", "req/s", "p50 ms", "p95 ms", "max ms", "RSS peak MiB"]
    head.append("RSS after MiB")
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"
    lines = ["| " + " | ".join(head) + " |", rule]
    for name, r in rows.items():
        cells = [name, str(r["clients"]), str(r["requests"]), str(r["errors"]), f"{r['req_per_s']:.1f}"]
        cells += [f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}", f"{r['max_ms']:.0f}"]
        cells += [f"{r['rss_peak_mb']:,.0f}", f"{r['rss_after_mb']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, help="an index folder (default: build a synthetic one)")
    parser.add_argument("--images", type=int, default=48, help="synthetic collection size (default 48)")
    parser.add_argument("--image-size", type=int, default=512, help="synthetic index: long side (default 512)")
    parser.add_argument("--get-clients", type=int, default=16)
    parser.add_argument("--upload-clients", type=int, default=8)
    parser.add_argument("--big-clients", type=int, default=8, help="concurrent 49-megapixel PNG uploads (0: skip)")
    parser.add_argument("--requests", type=int, default=400, help="per scenario, uploads: a quarter (default 400)")
    parser.add_argument("--seconds", type=float, help="run each scenario this long instead of --requests")
    parser.add_argument("--upload", type=Path, help="the image to upload (default: a synthetic 2000 x 1500 JPEG)")
    parser.add_argument("--only", help="comma-separated scenarios to run (default: get,upload,big-png)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="oxford-ir-serve overrides, e.g. max_parallel_decodes=1")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="oxford-ir-load-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        index = args.index or build_index(workdir, args.images, args.image_size)
        print(f"index: {index} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
        server = Server(index, workdir / "serve-run", args.overrides)
        try:
            return drive(server, args)
        finally:
            code = server.stop()
            if code not in (0, None):
                print(f"oxford-ir-serve exited with {code}:\n" + "".join(server.output[-20:]), file=sys.stderr)


def drive(server: Server, args: argparse.Namespace) -> int:
    base = f"http://{server.host}:{server.port}"
    with contextlib.closing(http.client.HTTPConnection(server.host, server.port, timeout=60)) as connection:
        connection.request("GET", "/api/info")
        info = json.loads(connection.getresponse().read())
    n_images = int(info["images"])
    k = min(args.k, int(info["max_k"]))
    upload = args.upload.read_bytes() if args.upload else phone_jpeg()
    upload_body = multipart(args.upload.name if args.upload else "phone.jpg", "image/jpeg", upload, {"k": str(k)})
    form = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    memory = {"start": server.memory_mb()}
    print(f"server {base}: {n_images} images, RSS {memory['start']['VmRSS']:.0f} MiB", file=sys.stderr)

    only = set((args.only or "get,upload,big-png").split(","))
    rows: dict[str, dict] = {}
    scenarios = {
        "get": (args.get_clients, lambda rng: Request("GET", f"/api/search?id={rng.randrange(n_images)}&k={k}")),
        "upload": (args.upload_clients, lambda rng: Request("POST", "/api/search", upload_body, form)),
    }
    if args.big_clients:
        big = multipart("big.png", "image/png", big_png(), {"k": str(k)})
        scenarios["big-png"] = (args.big_clients, lambda rng: Request("POST", "/api/search", big, form))
    counts = {"get": args.requests, "upload": max(1, args.requests // 4), "big-png": args.big_clients}
    for name, (clients, make) in scenarios.items():
        if name in only and clients:
            # big-png: each client uploads once, all at the same moment
            seconds = None if name == "big-png" else args.seconds
            rows[name] = run_scenario(server, clients, make, counts[name], seconds)
    time.sleep(1.0)  # let the last responses' memory go back
    # healthy afterwards: one more search by id answers
    try:
        with contextlib.closing(http.client.HTTPConnection(server.host, server.port, timeout=60)) as connection:
            connection.request("GET", f"/api/search?id=0&k={k}")
            response = connection.getresponse()
            final_ok = response.status == 200 and bool(json.loads(response.read())["results"])
    except (OSError, http.client.HTTPException, ValueError):
        final_ok = False
    memory["end"] = server.memory_mb() if server.alive() else {"VmRSS": float("nan"), "VmHWM": float("nan")}

    print(table(rows))
    print(
        f"\nserver RSS: start {memory['start']['VmRSS']:,.0f} MiB, peak (VmHWM) {memory['end']['VmHWM']:,.0f} MiB, "
        f"end {memory['end']['VmRSS']:,.0f} MiB; final search {'answered' if final_ok else 'FAILED'}"
    )
    errors = sum(r["errors"] for r in rows.values())
    for name, row in rows.items():
        for error in row["first_errors"]:
            print(f"{name}: {error}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "memory": memory, "final_ok": final_ok}, indent=2))
    if errors or not final_ok:
        print(f"FAILED: {errors} errors" + ("" if final_ok else ", the final search did not answer"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
