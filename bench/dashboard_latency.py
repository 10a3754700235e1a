"""Append → visible latency of the live dashboard: ``python bench/dashboard_latency.py [--events 240] [--hz 20]``.

Starts ``lightning_app.py`` on a temporary runs root, opens the run page in headless Chromium (Debian's
``/usr/bin/chromium`` driven by Playwright), then appends ``train/loss`` events through ``src.telemetry`` at
``--hz``. The page records, after every redraw of the loss chart, the newest step drawn and the wall-clock time
(``performance.timeOrigin + performance.now()``, same clock as ``time.time()`` here); an event's latency is the first
redraw showing its step minus the time its write was flushed. Prints p50/p95/max and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src.telemetry import TelemetryWriter  # noqa: E402

CHROMIUM = os.environ.get("ENGRAM_CHROMIUM", "/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dashboard(root: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "lightning_app.py", "--runs", str(root), "--port", str(port), "--no-browser"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("error: the dashboard did not start within 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=240)
    parser.add_argument("--hz", type=float, default=20.0)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("PLAYWRIGHT_BROWSERS_PATH", "/nonexistent")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        run_dir = root / "bench" / "v0"
        run_dir.mkdir(parents=True)
        writer = TelemetryWriter(run_dir / "telemetry.jsonl", run_id="bench/v0", family="causal_lm")
        for step in range(1, 101):
            writer.emit("train/loss", 5.0 / step, step=step, tokens=step * 1024)
        port = free_port()
        proc = start_dashboard(root, port)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1300, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/#/run/bench/v0")
                page.wait_for_function("() => window.__engram.loaded", timeout=30000)
                time.sleep(0.5)  # let the stream connect
                written: dict[int, float] = {}
                period = 1.0 / args.hz
                start = time.perf_counter()
                for i in range(args.events):
                    step = 101 + i
                    target = start + i * period
                    time.sleep(max(0.0, target - time.perf_counter()))
                    writer.emit("train/loss", 5.0 / step, step=step, tokens=step * 1024)  # flushed on return
                    written[step] = time.time() * 1000
                time.sleep(1.0)
                draws = page.evaluate("() => window.__engram.draws.filter(d => d[0] === 'loss')")
                browser.close()
        finally:
            proc.terminate()
            proc.wait()
            writer.close()
    load_after = os.getloadavg()
    drawn = sorted((int(x), t) for _, x, t in draws)
    latencies, missing = [], 0
    for step, t_write in written.items():
        seen = [t for x, t in drawn if x >= step and t >= t_write - 1]
        if seen:
            latencies.append(min(seen) - t_write)
        else:
            missing += 1
    lat = np.array(latencies)
    print(f"events: {len(written)} at {args.hz:g} Hz; visible: {len(lat)}, never drawn: {missing}")
    print(
        f"append -> visible latency: p50 {np.percentile(lat, 50):.1f} ms, p95 {np.percentile(lat, 95):.1f} ms, "
        f"max {lat.max():.1f} ms"
    )
    print(
        f"machine: {os.cpu_count()} cores, load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )


if __name__ == "__main__":
    main()
