"""The web page for real: ``python -m oxford_ir.cli.serve`` on a tiny real index, driven by Debian's Chromium
(headless, through Playwright with ``executable_path``; Playwright's own browser download is never used)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.web.tiny_index import N_IMAGES, build_tiny_index, draw_picture, update_tiny_index

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
K = 6
# Predicates are functions, never expression strings: Playwright evaluates those with eval() while polling,
# which the page's Content-Security-Policy (script-src 'self') rightly blocks.
#: every result has a thumbnail that the browser decoded (naturalWidth > 0)
ALL_LOADED = """(k) => {
  const items = document.querySelectorAll('#results li.result');
  const images = [...document.querySelectorAll('#results li.result img')];
  return items.length === k && images.length === k && images.every((img) => img.complete && img.naturalWidth > 0);
}"""


def chromium_path() -> str | None:
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium): run .ci/install-chromium or make install")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright Python package is not installed: pip install -e '.[dev]'")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[tuple[str, Path]]:
    """The real entry point on a free port; yields the URL it printed and the index folder."""
    root = tmp_path_factory.mktemp("browser")
    index_dir = build_tiny_index(root)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oxford_ir.cli.serve",
            f"index={index_dir}",
            "port=0",
            f"k={K}",
            "extraction.device=cpu",
            f"hydra.run.dir={root / 'run'}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    output, url, deadline = [], None, time.monotonic() + 90
    while url is None and time.monotonic() < deadline and process.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        output.append(line)
        if line.startswith("oxford-ir-serve: http://127.0.0.1:"):
            url = line.split()[1]
    try:
        assert url is not None, "the server printed no URL:\n" + "".join(output)
        yield url, index_dir
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        reader.join(timeout=5)
        output += list(lines.queue)
    text = "".join(output)
    assert code == 0 and "oxford-ir-serve: stopped" in text and "Traceback" not in text, text


def api(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def result_ids(page) -> list[int]:
    return page.eval_on_selector_all("#results li.result", "items => items.map((li) => Number(li.dataset.id))")


def test_upload_box_and_click_through_in_chromium(server: tuple[str, Path], chromium: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, index_dir = server
    images = index_dir.parent / "images"
    query_path = images / "a" / "scene_03.jpg"
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.goto(url)
            assert f"{N_IMAGES}" in page.inner_text("#index-info")
            assert "index v000001, built 20" in page.inner_text("#index-info")
            page.wait_for_function("() => document.querySelectorAll('#examples .card img').length > 0")

            # 1. upload through the file input: k thumbnails appear and load, the image itself first
            page.set_input_files("#file-input", str(query_path))
            page.wait_for_function(ALL_LOADED, arg=K, timeout=30_000)
            ids = result_ids(page)
            info = api(f"{url}api/images?q=a/scene_03.jpg")
            query_id = info["items"][0]["id"]
            assert ids[0] == query_id and len(set(ids)) == K
            assert ids == [r["id"] for r in api(f"{url}api/search?id={query_id}&k={K}")["results"]]
            scores = page.eval_on_selector_all("#results li.result", "lis => lis.map((li) => Number(li.dataset.score))")
            assert scores == sorted(scores, reverse=True) and abs(scores[0] - 1.0) < 2e-3
            assert "upload scene_03.jpg" in page.inner_text("#query-caption")

            # 2. click a result: a new result set with that image first
            clicked = ids[2]
            page.click(f"#results li.result[data-id='{clicked}'] button")
            page.wait_for_function("(id) => document.getElementById('results').dataset.query === id", arg=str(clicked))
            page.wait_for_function(ALL_LOADED, arg=K, timeout=30_000)
            assert result_ids(page)[0] == clicked
            page.wait_for_function("() => document.getElementById('query-image').naturalWidth > 0")

            # 3. draw a box with the mouse over the middle of the query image: searched in original pixels
            entry = next(item for item in api(f"{url}api/images?q=&limit=100")["items"] if item["id"] == clicked)
            frame = page.locator("#query-canvas").bounding_box()
            page.mouse.move(frame["x"] + 0.25 * frame["width"], frame["y"] + 0.25 * frame["height"])
            page.mouse.down()
            page.mouse.move(frame["x"] + 0.75 * frame["width"], frame["y"] + 0.75 * frame["height"], steps=8)
            page.mouse.up()
            page.wait_for_function("() => document.getElementById('query-caption').textContent.includes('box')")
            page.wait_for_function(ALL_LOADED, arg=K, timeout=30_000)
            box = [float(v) for v in page.input_value("#bbox-input").split(",")]
            expected = [0.25 * entry["width"], 0.25 * entry["height"], 0.75 * entry["width"], 0.75 * entry["height"]]
            assert box == pytest.approx(expected, abs=1.5)
            by_api = api(f"{url}api/search?id={clicked}&k={K}&bbox={','.join(str(int(v)) for v in box)}")
            page.wait_for_function(
                "(ids) => JSON.stringify([...document.querySelectorAll('#results li.result')]"
                ".map((li) => Number(li.dataset.id))) === JSON.stringify(ids)",
                arg=[r["id"] for r in by_api["results"]],
            )
            shot = tmp_path / "search-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            # 4. an error from the API is shown in the page
            page.fill("#bbox-input", "1,2,3")
            page.click("#search-button")
            page.wait_for_selector("#error:not([hidden])")
            assert "is not a box: give four numbers x1,y1,x2,y2" in page.inner_text("#error")
            page.screenshot(path=str(tmp_path / "search-page-error.png"), full_page=True)

            # 5. oxford-ir-index adds an image that moves every row, while the page is open: a click on a result
            # listed by the old version searches that same image, and the header shows the new version
            target = page.eval_on_selector_all(
                "#results li.result", "lis => lis.map((li) => li.querySelector('.path').textContent)"
            )[1]
            draw_picture(images / "a" / "0_added.jpg", seed=1)
            assert update_tiny_index(index_dir.parent) == "v000002"
            deadline = time.monotonic() + 20
            while api(f"{url}api/info")["version"] != "v000002":
                assert time.monotonic() < deadline, "the server did not switch to the new version"
                time.sleep(0.2)
            page.click("#results li.result:nth-child(2) button")
            page.wait_for_function(
                "() => document.getElementById('index-version').textContent === 'v000002'", timeout=30_000
            )
            page.wait_for_function(ALL_LOADED, arg=K, timeout=30_000)
            assert f"#{api(f'{url}api/images?q={target}')['items'][0]['id']} {target}" in page.inner_text(
                "#query-caption"
            )
            assert f"{N_IMAGES + 1} images" in page.inner_text("#index-info")
        finally:
            browser.close()
    # the page's only console error is the 422 of step 4 (Chromium logs failed requests)
    unexpected = [p for p in problems if "422" not in p]
    assert not unexpected, unexpected
