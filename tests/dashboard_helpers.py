"""Shared by the dashboard tests: a runs root with telemetry, and the real server on a free loopback port."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn

from src.dashboard.server import create_app, listen
from src.telemetry import TelemetryWriter

CONFIG = "model:\n  class_path: src.lightning_modules.CausalLM\ntrainer:\n  max_steps: 100000\n"


def make_run(root: Path, name: str, steps: int = 50, family: str = "causal_lm") -> TelemetryWriter:
    """A run folder ``root/name`` with a config and ``steps`` steps of loss, LR and Cap-Gauge telemetry."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(CONFIG)
    writer = TelemetryWriter(run_dir / "telemetry.jsonl", run_id=name, family=family)
    for step in range(1, steps + 1):
        rows = [("train/loss", 5.0 / step, None, None, None), ("lr-AdamW/pg1", 1e-3, None, None, None)]
        if step % 10 == 0:
            rows += [("weight_delta/attention/rel_prev", 0.01 * layer + 1e-3, layer, None, None) for layer in range(2)]
            rows += [
                ("capgauge/bpp_seen", 0.01 * step, None, None, None),
                ("capgauge/alert_bpp", 3.6, None, None, None),
            ]
        writer.emit_many(rows, step=step, tokens=step * 64)
    return writer


class ServerThread:
    """The dashboard served by uvicorn in a thread, as ``lightning_app.py`` serves it."""

    def __init__(self, root: Path) -> None:
        self.app = create_app(root)
        sock = listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the dashboard server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
