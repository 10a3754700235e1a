"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright): the run list loads,
a chart gains points while events are appended, the Cap-Gauge alert appears when bits per parameter cross the
threshold, two runs share a chart, a screenshot is written, and no request leaves 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.dashboard_helpers import ServerThread, make_run

CHROMIUM = os.environ.get("ENGRAM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: .ci/run installs it with apt-get (needs root and apt); or set ENGRAM_CHROMIUM",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser():
    os.environ.setdefault("PLAYWRIGHT_BROWSERS_PATH", "/nonexistent")  # never look for (or fetch) its own browsers
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def test_dashboard_in_a_real_browser(browser, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    writer = make_run(root, "demo/v0", steps=50)
    make_run(root, "other/v1", steps=5, family="ttt").close()
    with ServerThread(root) as srv:
        context = browser.new_context(viewport={"width": 1300, "height": 900})
        requests: list[str] = []
        foreign: list[str] = []

        def check(route, request) -> None:  # every request the page makes, EventSource included
            requests.append(request.url)
            if urlsplit(request.url).hostname != "127.0.0.1":
                foreign.append(request.url)
                route.abort()
            else:
                route.continue_()

        context.route("**/*", check)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))

        # The run list.
        page.goto(srv.url + "/")
        page.wait_for_selector('tr[data-run="demo/v0"]', timeout=15000)
        assert page.locator('tr[data-run="other/v1"] td').nth(1).inner_text() == "ttt"

        # A run page; its loss chart gains points as events are appended.
        page.click('tr[data-run="demo/v0"]')
        page.wait_for_function("() => window.__engram.loaded", timeout=20000)  # functions: the CSP forbids eval
        assert page.locator("#chart-loss").is_visible()
        assert not page.locator("#capgauge-alert").is_visible()
        newest = "() => Math.max(...window.__engram.draws.filter(d => d[0] === 'loss').map(d => d[1]))"
        assert page.evaluate(newest) == 50
        for step in range(51, 61):
            writer.emit("train/loss", 5.0 / step, step=step, tokens=step * 64)
            time.sleep(0.02)
        page.wait_for_function(f"() => ({newest})() === 60", timeout=10000)
        points = page.evaluate("() => window.__engram.draws.filter(d => d[0] === 'loss').length")
        assert points >= 2

        # Bits per parameter cross the threshold: the alert shows.
        writer.emit_many(
            [("capgauge/bpp_seen", 3.7, None, None, None), ("capgauge/alert", 3.7, None, None, None)],
            step=61,
            tokens=61 * 64,
        )
        page.wait_for_selector("#capgauge-alert", state="visible", timeout=10000)
        assert "3.7" in page.inner_text("#capgauge-alert")

        # Two runs on one chart: the other run's loss is drawn beside this one's.
        page.goto(srv.url + "/#/run/demo/v0?vs=other/v1")
        page.wait_for_function("() => window.__engram.loaded", timeout=20000)
        assert "train/loss · other/v1" in page.inner_text("#chart-loss")

        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        writer.close()
        context.close()
    assert not errors, errors
    assert requests and not foreign, foreign
    assert any("/api/stream" in url for url in requests)  # the live updates came over the stream
