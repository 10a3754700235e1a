"""The dashboard on a long run: ``python bench/dashboard_scale.py [--events 1000000]``.

Writes a ``telemetry.jsonl`` of ``--events`` events in the writer's format (``src/telemetry.py``) with the mix of a
run that has every Chrono-MemBench callback on (``configs/gemma.yaml``-like, 12 layers): every 10 steps the step
scalars (loss, LR, throughput, MFU, tokens: 5 events), every 100 steps Weight-Δ (rel_prev, rel_init and
update_ratio per layer and group, per group and overall: 124 events), every 500 steps Cap-Gauge (10 events) and
Mem-Absorption (2). Then starts ``lightning_app.py`` over it, opens the run page in headless Chromium (cold: nothing
cached) and prints the time until the first chart (loss) is drawn, until every chart is, and the server's peak
resident memory (``VmHWM``), then the same for a second visit (warm cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.dashboard_latency import CHROMIUM, free_port, start_dashboard  # noqa: E402

LAYERS = 12
GROUPS = ("attention", "mlp", "norms")


def write_run(path: Path, events: int) -> int:
    """Write about ``events`` events; returns the number written."""
    run, family, written, step = "long/v0", "causal_lm", 0, 0
    head = '{"run_id":"%s","step":%d,"tokens":%d,"family":"%s","metric":"%s","value":%r,"time":%r'
    with path.open("w") as out:
        while written < events:
            step += 10
            t = 1.7e9 + step * 0.05
            lines = []
            rows = [
                ("train/loss", 2.0 + 8.0 / (1 + step / 1000)),
                ("lr-AdamW/pg1", 3e-4),
                ("perf/tokens_per_s", 9.1e4),
                ("perf/mfu", 0.41),
                ("train/tokens_seen", float(step * 4096)),
            ]
            lines += [(m, v, None) for m, v in rows]
            if step % 100 == 0:
                for metric in ("rel_prev", "rel_init", "update_ratio"):
                    scale = {"rel_prev": 1e-3, "rel_init": 1e-2, "update_ratio": 1e-4}[metric] * (
                        1 + (step % 700) / 700
                    )
                    lines += [
                        (f"weight_delta/{g}/{metric}", scale * (1 + layer / 10), layer)
                        for g in GROUPS
                        for layer in range(LAYERS)
                    ]
                    lines += [(f"weight_delta/{g}/{metric}", scale, None) for g in (*GROUPS, "embeddings", "all")]
                lines.append(("weight_delta/interval_steps", 100.0, None))
            if step % 500 == 0:
                bits = 1e5 * (1 - 1 / (1 + step / 1e5))
                params = 4e4  # bits per parameter approach 2.5, under the 3.6 threshold
                lines += [
                    (f"capgauge/{m}", v, None)
                    for m, v in (
                        ("bits_seen", bits),
                        ("bits_unseen", 0.1 * bits),
                        ("bits_diff", 0.9 * bits),
                        ("bpp_seen", bits / params),
                        ("bpp_unseen", 0.1 * bits / params),
                        ("bpp_diff", 0.9 * bits / params),
                        ("info_bits", 2e5),
                        ("params", params),
                        ("alert_bpp", 3.6),
                        ("weight_bits", 32.0),
                    )
                ]
                lines += [("mem_absorption/rate", 12.5, None), ("mem_absorption/spike", 0.0, None)]
            for metric, value, layer in lines:
                text = head % (run, step, step * 4096, family, metric, value, t)
                out.write(text + (f',"layer":{layer}}}\n' if layer is not None else "}\n"))
            written += len(lines)
    return written


def peak_rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def visit(browser, port: int) -> tuple[float, float]:
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.goto(f"http://127.0.0.1:{port}/#/run/long/v0")
    page.wait_for_function("() => window.__engram.firstChart !== null", timeout=120000, polling=20)
    first = page.evaluate("() => window.__engram.firstChart")
    page.wait_for_function("() => window.__engram.loaded", timeout=300000, polling=50)
    loaded = page.evaluate("() => performance.now()")
    errors = page.evaluate("() => window.__engram.errors")
    if errors:
        raise SystemExit(f"error: the page reported {errors}")
    page.close()
    return first / 1000, loaded / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("PLAYWRIGHT_BROWSERS_PATH", "/nonexistent")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        (root / "long" / "v0").mkdir(parents=True)
        path = root / "long" / "v0" / "telemetry.jsonl"
        t0 = time.perf_counter()
        n = write_run(path, args.events)
        print(f"wrote {n:,} events ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        port = free_port()
        proc = start_dashboard(root, port)
        try:
            base = peak_rss_mb(proc.pid)[1]
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
                load = os.getloadavg()[0]
                first, loaded = visit(browser, port)
                hwm, rss = peak_rss_mb(proc.pid)
                print(
                    f"cold visit: first chart {first:.2f} s, every chart {loaded:.2f} s after navigation "
                    f"(load average {load:.2f} on {os.cpu_count()} cores)"
                )
                print(f"server memory: {base:.0f} MB at start, peak {hwm:.0f} MB, {rss:.0f} MB after the visit")
                first, loaded = visit(browser, port)
                print(
                    f"warm visit: first chart {first:.2f} s, every chart {loaded:.2f} s; "
                    f"server peak {peak_rss_mb(proc.pid)[0]:.0f} MB"
                )
                browser.close()
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
