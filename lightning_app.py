"""The live dashboard over a runs root: ``python lightning_app.py [--runs runs] [--port 8050] [--fit CONFIG ...]``.

A plain launcher (``lightning.app`` is gone since Lightning 2.4): it serves ``src/dashboard`` on 127.0.0.1 and, with
``--fit CONFIG``, starts ``python -m src.cli fit --config CONFIG --run.root RUNS`` (arguments after ``--`` go to the
fit) and prints the new run's page once its folder appears. Ctrl-C stops the dashboard (and a fit it started).
"""

from __future__ import annotations

import argparse
import errno
import subprocess
import sys
import threading
import time
import webbrowser
from pathlib import Path

DEFAULT_PORT = 8050


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="lightning_app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="the runs root to serve (default: runs)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--fit", metavar="CONFIG", help="also start a fit with this config and open its page")
    parser.add_argument("--no-browser", action="store_true", help="print the page's address, do not open a browser")
    if "--" in argv:
        cut = argv.index("--")
        return parser.parse_args(argv[:cut]), argv[cut + 1 :]
    return parser.parse_args(argv), []


def _watch_new_run(root: Path, before: set[str], url: str, proc: subprocess.Popen, browser: bool) -> None:
    """Print (and open) the page of the first run folder that was not there before the fit started."""
    from src.dashboard.runs_index import find_runs

    while proc.poll() is None:
        new = sorted(set(find_runs(root)) - before)
        if new:
            page = f"{url}#/run/{new[0]}"
            print(f"[dashboard] run {new[0]}: {page}", flush=True)
            if browser:
                webbrowser.open(page)
            return
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    args, fit_args = _parse(sys.argv[1:] if argv is None else argv)
    root = Path(args.runs).expanduser()
    if args.fit:
        if not Path(args.fit).is_file():
            _error(f"--fit {args.fit!r} is not a file. Give a config such as configs/ttt_quickstart.yaml.")
        root.mkdir(parents=True, exist_ok=True)  # the fit would create it anyway
    elif not root.is_dir():
        _error(f"--runs {args.runs!r} is not a folder. Give the runs root your fits write to (default: runs).")
    if not 0 < args.port < 65536:
        _error(f"--port {args.port} must be between 1 and 65535.")

    from src.dashboard.server import create_app, listen, serve  # after the checks: a bad flag answers at once

    try:
        sock = listen(args.host, args.port)
    except OSError as err:
        reason = "is in use" if err.errno == errno.EADDRINUSE else f"cannot be used ({err.strerror})"
        _error(f"port {args.port} on {args.host} {reason}. Pick another with --port, e.g. --port {args.port + 1}.")
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown_host}:{args.port}/"
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: the dashboard listens on {args.host}, not only on this machine: anyone who can reach "
            f"{args.host}:{args.port} can read every run under {root.resolve()}.",
            file=sys.stderr,
        )
    print(f"[dashboard] serving {root.resolve()} at {url} (Ctrl-C stops)", flush=True)
    proc = None
    if args.fit:
        from src.dashboard.runs_index import find_runs

        before = set(find_runs(root))
        command = [sys.executable, "-m", "src.cli", "fit", "--config", args.fit, "--run.root", str(root), *fit_args]
        print(f"[dashboard] starting: {' '.join(command)}", flush=True)
        proc = subprocess.Popen(command)
        threading.Thread(
            target=_watch_new_run, args=(root, before, url, proc, not args.no_browser), daemon=True
        ).start()
    try:
        serve(create_app(root, host=args.host), sock)
    except KeyboardInterrupt:
        pass
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
