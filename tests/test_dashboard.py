"""The dashboard's server (src/dashboard): run list, series and downsampling, the live stream, the plasticity panel,
the launcher's errors, and that nothing outside the runs root can be read (a traversal fuzz of 60+ paths)."""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from starlette.testclient import TestClient

from src.dashboard import server as server_module
from src.dashboard.lines import parse_block, parse_line
from src.dashboard.series import minmax_downsample
from src.dashboard.server import create_app
from tests.dashboard_helpers import ServerThread, make_run

REPO = Path(__file__).resolve().parents[1]
SECRET = "TOP-SECRET-7f3a9c"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    make_run(runs, "demo/v0").close()
    make_run(runs, "other/v1", steps=5, family="ttt").close()
    return runs


@pytest.fixture
def client(root: Path) -> TestClient:
    return TestClient(create_app(root), base_url="http://127.0.0.1")


def _series(client: TestClient, **params) -> dict:
    response = client.get("/api/series", params=params)
    assert response.status_code == 200, response.text
    return response.json()


# --- run list and series --------------------------------------------------------------------------------------
def test_run_list(client: TestClient, root: Path) -> None:
    runs = {r["run"]: r for r in client.get("/api/runs").json()["runs"]}
    assert set(runs) == {"demo/v0", "other/v1"}
    assert runs["demo/v0"]["family"] == "causal_lm" and runs["other/v1"]["family"] == "ttt"
    assert runs["demo/v0"]["step"] == 50 and runs["demo/v0"]["loss"] == pytest.approx(5.0 / 50)
    assert runs["demo/v0"]["status"] == "running"  # written just now
    # A run started later appears on the next poll; hidden folders and links are not runs.
    make_run(root, "late/v0", steps=2).close()
    (root / ".cache").mkdir()
    (root / ".cache" / "config.yaml").write_text("x: 1\n")
    (root / "linked").symlink_to(root / "demo")
    assert {r["run"] for r in client.get("/api/runs").json()["runs"]} == {"demo/v0", "other/v1", "late/v0"}


def test_series_exact_prefix_and_layers(client: TestClient) -> None:
    data = _series(client, run="demo/v0", m=["train/loss", "weight_delta/attention/rel_prev"], p=["lr-"])
    found = {(s["metric"], s["layer"]): s for s in data["series"]}
    assert set(found) == {
        ("train/loss", None),
        ("lr-AdamW/pg1", None),
        ("weight_delta/attention/rel_prev", 0),
        ("weight_delta/attention/rel_prev", 1),
    }
    assert found[("train/loss", None)]["step"] == list(range(1, 51))
    assert found[("weight_delta/attention/rel_prev", 1)]["value"] == pytest.approx([0.011] * 5)
    assert data["offset"] == (client.app.state.dashboard.root / "demo/v0/telemetry.jsonl").stat().st_size


def test_series_are_read_incrementally_and_partial_lines_wait(client: TestClient, root: Path) -> None:
    path = root / "demo/v0/telemetry.jsonl"
    first = _series(client, run="demo/v0", m="train/loss")
    line = json.dumps(
        {"run_id": "demo/v0", "step": 51, "tokens": 1, "family": "f", "metric": "train/loss", "value": 0.5}
    )
    with path.open("a") as handle:
        handle.write(line[:20])  # a line still being written
    second = _series(client, run="demo/v0", m="train/loss")
    assert second["series"][0]["n"] == 50 and second["offset"] == first["offset"]
    with path.open("a") as handle:
        handle.write(line[20:] + "\n" + '{"run_id":"demo/v0","step":52,"metric":"train/loss","value":"nan"}\n')
    third = _series(client, run="demo/v0", m="train/loss")
    assert third["series"][0]["n"] == 52 and third["series"][0]["step"][-2:] == [51, 52]
    assert third["series"][0]["value"][-1] is None  # NaN becomes a gap (JSON has no NaN)
    # A replaced file is read again from its start.
    path.unlink()
    make_run(root / "tmp", "x", steps=3).close()
    os.replace(root / "tmp/x/telemetry.jsonl", path)
    assert _series(client, run="demo/v0", m="train/loss")["series"][0]["n"] == 3


def test_downsampling_is_bounded_and_keeps_extremes(client: TestClient, root: Path) -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 999, 1000, 1001, 4097, 20000):
        for cap in (3, 4, 10, 500, 1000):
            x = np.arange(n)
            y = rng.normal(size=n)
            y[rng.integers(n)] = 50.0  # a spike
            y[rng.integers(n)] = -50.0
            xs, ys = minmax_downsample(x, y, cap)
            assert len(xs) <= cap
            assert len(xs) <= n and np.all(np.diff(xs) > 0) and xs[-1] == n - 1
            if n > 1:
                assert ys.max() == y.max() and ys.min() == y.min()
    writer = make_run(root, "long/v0", steps=1)
    for step in range(2, 20001):
        writer.emit("train/loss", math.sin(step / 100), step=step, tokens=step)
    writer.close()
    for cap in (50, 1000, 5000, 10**9):
        series = _series(client, run="long/v0", m="train/loss", max_points=cap)["series"][0]
        assert series["n"] == 20000 and len(series["step"]) <= min(cap, server_module.MAX_POINTS)
        assert series["step"][-1] == 20000


def test_fast_parse_equals_json() -> None:
    import random

    random.seed(1)
    lines = []
    for i in range(3000):
        r = random.random()
        event = {
            "run_id": "a/v0",
            "step": i,
            "tokens": i * 7,
            "family": "ttt",
            "metric": random.choice(["train/loss", "ttt/update_norm", "lr-AdamW/pg1", "m\u00e9tric", 'q"uote']),
            "value": random.choice([random.random(), 1e-7, -3.0, 12, "nan", "inf", "-inf"]),
            "time": 1.7e9 + i * 0.1,
        }
        if r < 0.3:
            event["layer"] = random.randrange(4)
        if r < 0.15:
            event["head"] = random.randrange(4)
        if r < 0.05:
            event["position"] = random.randrange(300)
        if r > 0.98:
            event["run_id"] = "other"
        lines.append(json.dumps(event, separators=(",", ":")) if r < 0.97 else json.dumps(event))
    lines[500:500] = ['{"broken": ', "", "[1, 2]", '{"metric": "x"}']
    block = parse_block(("\n".join(lines) + "\n").encode())
    got = [
        (*block.keys[k], s, v, t)
        for k, s, v, t in zip(
            block.key.tolist(), block.step.tolist(), block.value.tolist(), block.time.tolist(), strict=True
        )
    ]
    expected = [e for e in (parse_line(line.encode()) for line in lines if line) if e is not None]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g[:5] == e[:5] and g[6] == e[6] and (g[5] == e[5] or (math.isnan(g[5]) and math.isnan(e[5])))
    # Exactly the lines not in the writer's layout (escapes, another run id, spaces, not events) took json.
    odd = [x for x in lines if x and ("\\" in x or '"other"' in x or ", " in x or not x.startswith('{"run_id"'))]
    assert block.slow_lines == len(odd)


# --- the live stream --------------------------------------------------------------------------------------------
def _stream_events(url: str, want: int, timeout: float = 15.0) -> tuple[list[list], list[str]]:
    events, kinds = [], []
    with httpx.stream("GET", url, timeout=timeout) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        deadline = time.monotonic() + timeout
        for line in response.iter_lines():
            if line.startswith("data: "):
                payload = json.loads(line[6:])
                events += payload.get("events", [])
            elif line.startswith("event: "):
                kinds.append(line[7:])
                break
            if len(events) >= want or time.monotonic() > deadline:
                break
    return events, kinds


def test_stream_sends_appended_events_and_waits_for_a_late_run(root: Path) -> None:
    offset = (root / "demo/v0/telemetry.jsonl").stat().st_size
    with ServerThread(root) as srv:

        def append() -> None:
            time.sleep(0.3)
            with (root / "demo/v0/telemetry.jsonl").open("a") as handle:
                for step in (51, 52, 53):
                    line = {"run_id": "demo/v0", "step": step, "tokens": 0, "family": "f", "metric": "train/loss"}
                    handle.write(json.dumps({**line, "value": step / 10}) + "\n")
                    handle.write(json.dumps({**line, "metric": "other/metric", "value": 1.0}) + "\n")  # not asked for
                    handle.flush()
                    time.sleep(0.05)
                handle.write('{"run_id":"demo/v0","step":54,"metric":"train/lo')  # partial: not sent

        writer = threading.Thread(target=append)
        writer.start()
        events, _ = _stream_events(f"{srv.url}/api/stream?run=demo/v0&m=train/loss&offset={offset}", want=3)
        writer.join()
        assert [(e[0], e[4], e[5]) for e in events] == [("train/loss", s, s / 10) for s in (51, 52, 53)]

        def start_late_run() -> None:
            time.sleep(0.3)
            make_run(root, "late/v0", steps=2).close()

        late = threading.Thread(target=start_late_run)
        late.start()
        events, _ = _stream_events(f"{srv.url}/api/stream?run=late/v0&p=train/&offset=0", want=2)
        late.join()
        assert [e[4] for e in events] == [1, 2]


def test_stream_far_behind_or_replaced_file_resets(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "STREAM_BEHIND_BYTES", 1000)
    with ServerThread(root) as srv:
        events, kinds = _stream_events(f"{srv.url}/api/stream?run=demo/v0&m=train/loss&offset=0", want=10**6)
        assert kinds == ["reset"] and events == []
        big = (root / "demo/v0/telemetry.jsonl").stat().st_size + 10
        _, kinds = _stream_events(f"{srv.url}/api/stream?run=demo/v0&m=train/loss&offset={big}", want=10**6)
        assert kinds == ["reset"]


# --- plasticity panel -------------------------------------------------------------------------------------------
def test_plasticity_panel(client: TestClient, root: Path) -> None:
    folder = root / "demo/v0/plasticity/train"
    folder.mkdir(parents=True)
    rows = [
        {
            "layer": la,
            "head": h,
            "position": p,
            "bucket": ["Syntax", "Novelty"][p % 2],
            "update_norm": float(la * 10 + p),
        }
        for la in range(3)
        for h in range(2)
        for p in range(700)
    ]
    pd.DataFrame(rows).to_parquet(folder / "step0000100_batch0000.parquet")
    pd.DataFrame(rows[:10]).to_parquet(folder / "step0000000_batch0000.parquet")
    (folder / "heatmap_update_norm.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    panel = client.get("/api/plasticity", params={"run": "demo/v0"}).json()
    assert panel["stages"] == ["train"] and panel["steps"] == [0, 100] and panel["step"] == 100
    assert panel["layers"] == 3 and panel["positions"] <= 512 and panel["position_bin"] == 2
    assert panel["heat"][2][0] == pytest.approx(20.5)  # layer 2, positions 0 and 1, over both heads
    assert [b["bucket"] for b in panel["buckets"]] == ["Syntax", "Novelty"]
    assert panel["images"] == ["plasticity/train/heatmap_update_norm.png"]
    assert client.get("/files/demo/v0/plasticity/train/heatmap_update_norm.png").headers["content-type"] == "image/png"
    assert client.get("/api/plasticity", params={"run": "demo/v0", "metric": "__class__"}).status_code == 400
    # the tables' own metrics are offered; one another family has (TTT's g_norm) falls back to update_norm
    assert panel["metrics"] == ["update_norm"] and panel["metric"] == "update_norm"
    other = client.get("/api/plasticity", params={"run": "demo/v0", "metric": "g_norm"}).json()
    assert other["metric"] == "update_norm" and other["heat"] == panel["heat"]


# --- safety -----------------------------------------------------------------------------------------------------
def test_only_get_routes_and_security_headers(client: TestClient) -> None:
    for route in client.app.routes:
        assert set(getattr(route, "methods", None) or {"GET"}) <= {"GET", "HEAD"}, route
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert client.request(method, "/api/runs").status_code == 405
        assert client.request(method, "/files/demo/v0/config.yaml").status_code == 405
    response = client.get("/")
    assert response.status_code == 200 and "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    # DNS rebinding: a page on another name that resolves to 127.0.0.1 gets nothing.
    assert client.get("/api/runs", headers={"host": "attacker.example"}).status_code == 400


def _outside(tmp_path: Path, root: Path) -> None:
    """Secrets beside and outside the root, and links inside the root that point at them."""
    (tmp_path / "secret.yaml").write_text(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text(SECRET)
    (tmp_path / "outside" / "config.yaml").write_text(SECRET)
    (tmp_path / "outside" / "telemetry.jsonl").write_text(
        json.dumps({"run_id": SECRET, "step": 1, "metric": "train/loss", "value": 1.0}) + "\n"
    )
    (root / "escape").symlink_to(tmp_path / "outside")
    (root / "demo/v0/link_out").symlink_to(tmp_path / "outside")
    (root / "demo/v0/secret_link.yaml").symlink_to(tmp_path / "secret.yaml")
    (root / "demo/v0/abs_link.txt").symlink_to("/etc/passwd")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.yaml").write_text(SECRET)


TRAVERSALS = [
    "/files/../secret.yaml",
    "/files/../outside/secret.txt",
    "/files/%2e%2e/secret.yaml",
    "/files/%2E%2E/secret.yaml",
    "/files/.%2e/secret.yaml",
    "/files/%2e./secret.yaml",
    "/files/%252e%252e/secret.yaml",
    "/files/%25252e%25252e/secret.yaml",
    "/files/..%2fsecret.yaml",
    "/files/..%2Fsecret.yaml",
    "/files/%2e%2e%2fsecret.yaml",
    "/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/files/..%5csecret.yaml",
    "/files/..%5c..%5csecret.yaml",
    "/files/%2e%2e%5csecret.yaml",
    "/files/..\\secret.yaml",
    "/files/demo/v0/../../../secret.yaml",
    "/files/demo/v0/%2e%2e/%2e%2e/%2e%2e/secret.yaml",
    "/files/demo/v0/telemetry.jsonl/../../../../secret.yaml",
    "/files/" + "../" * 40 + "etc/passwd",
    "/files/" + "%2e%2e/" * 40 + "etc/passwd",
    "/files//etc/passwd",
    "/files///etc/passwd",
    "/files/%2fetc%2fpasswd",
    "/files/%2Fetc/passwd",
    "/files/%252fetc%252fpasswd",
    "/files/" + str(Path("/etc/passwd")),
    "/files/C:/Windows/win.ini",
    "/files/C:%5cWindows%5cwin.ini",
    "/files/%5c%5cserver%5cshare%5csecret.yaml",
    "/files/demo/v0/config.yaml%00.png",
    "/files/demo%00/v0/config.yaml",
    "/files/%00../secret.yaml",
    "/files/%c0%ae%c0%ae/secret.yaml",
    "/files/%c0%ae%c0%ae%c0%afsecret.yaml",
    "/files/%u002e%u002e/secret.yaml",
    "/files/..%c0%afsecret.yaml",
    "/files/..%ef%bc%8fsecret.yaml",
    "/files/..;/secret.yaml",
    "/files/....//secret.yaml",
    "/files/..../secret.yaml",
    "/files/~/secret.yaml",
    "/files/escape/secret.txt",
    "/files/escape/config.yaml",
    "/files/demo/v0/link_out/secret.txt",
    "/files/demo/v0/link_out/../../secret.yaml",
    "/files/demo/v0/secret_link.yaml",
    "/files/demo/v0/abs_link.txt",
    "/files/.hidden/x.yaml",
    "/files/%2ehidden/x.yaml",
    "/static/../secret.yaml",
    "/static/%2e%2e/%2e%2e/%2e%2e/secret.yaml",
    "/static/..%2f..%2fserver.py",
    "/static/../server.py",
    "/api/series?run=..&m=train/loss",
    "/api/series?run=../outside&m=train/loss",
    "/api/series?run=%2e%2e%2foutside&m=train/loss",
    "/api/series?run=%252e%252e%252foutside&m=train/loss",
    "/api/series?run=/etc&m=train/loss",
    "/api/series?run=escape&m=train/loss",
    "/api/series?run=demo/v0/link_out&m=train/loss",
    "/api/series?run=demo/v0/../../../outside&m=train/loss",
    "/api/series?run=..%5coutside&m=train/loss",
    "/api/stream?run=escape&m=train/loss&offset=0",
    "/api/stream?run=../outside&p=train&offset=0",
    "/api/files?run=escape",
    "/api/files?run=..",
    "/api/files?run=%2e%2e",
    "/api/plasticity?run=escape",
    "/api/plasticity?run=../outside",
]


def test_traversal_fuzz_refuses_everything_outside_the_root(tmp_path: Path, root: Path) -> None:
    assert len(TRAVERSALS) >= 50
    _outside(tmp_path, root)
    passwd = Path("/etc/passwd").read_text()[:20] if Path("/etc/passwd").is_file() else "root:x:0:0"
    with ServerThread(root) as srv:
        for target in TRAVERSALS:
            # http.client sends the request target exactly as written (httpx would normalise dot segments).
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            conn.request("GET", target)
            response = conn.getresponse()
            body = response.read(1 << 20).decode("utf-8", "replace")
            conn.close()
            assert 400 <= response.status < 500, (target, response.status, body[:200])
            assert SECRET not in body and passwd not in body and "def create_app" not in body, target
        # The same server does serve what is inside the root.
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        conn.request("GET", "/files/demo/v0/config.yaml")
        assert conn.getresponse().status == 200
        conn.close()
        assert "escape" not in json.dumps(httpx.get(f"{srv.url}/api/runs").json())


# --- the launcher ---------------------------------------------------------------------------------------------
def _launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "lightning_app.py", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_launcher_bad_inputs_are_one_line(tmp_path: Path) -> None:
    missing = _launch("--runs", str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("error: --runs") and "Traceback" not in missing.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        taken = _launch("--runs", str(tmp_path), "--port", str(busy.getsockname()[1]))
    finally:
        busy.close()
    assert taken.returncode == 2 and "is in use" in taken.stderr and taken.stderr.count("\n") == 1
    no_config = _launch("--runs", str(tmp_path), "--fit", str(tmp_path / "missing.yaml"))
    assert no_config.returncode == 2 and no_config.stderr.startswith("error: --fit")


def test_launcher_warns_when_not_on_loopback(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "lightning_app.py", "--runs", str(tmp_path), "--host", "0.0.0.0", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        warning = proc.stderr.readline()
        assert warning.startswith("warning: the dashboard listens on 0.0.0.0")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=2).status_code == 200
                break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("the launched dashboard did not answer")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
