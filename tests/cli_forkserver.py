"""Runs ``python -m src.cli`` many times without paying its ~10 s of imports each time.

The server imports ``src.cli`` once, then for each request forks a child that runs the module exactly as
``python -m src.cli ARGS`` would (``runpy`` with ``run_name="__main__"``; an uncaught exception prints its traceback
and exits 1, like the interpreter), with its own stdout/stderr files, working directory and exit code. Every run is
a separate process, so exit codes, file descriptors and ``kill -9`` behave as for a fresh command; only the import
itself is shared, and the tests check that the import writes nothing to stderr.

Protocol (JSON lines): a request ``{"args": [...], "stdout": path, "stderr": path, "cwd": path}`` on stdin is answered
by ``{"pid": N}`` when the child starts and ``{"pid": N, "rc": code}`` when it ends (a negative code: killed by that
signal). Requests are served one at a time.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO


def _child(request: dict, reply_fd: int) -> int:
    os.close(reply_fd)
    os.chdir(request["cwd"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [os.path.join("src", "cli.py"), *request["args"]]
    # The module runs afresh as __main__ (its imports stay shared); runpy warns if it is also loaded as src.cli.
    sys.modules.pop("src.cli", None)
    try:
        runpy.run_module("src.cli", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    # Replies get a descriptor of their own; fd 1 is the children's (and /dev/null for the server itself).
    replies = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    import src.cli  # noqa: F401  (the import every child shares)

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        sys.stderr.flush()
        replies.flush()
        pid = os.fork()
        if pid == 0:
            os._exit(_child(request, replies.fileno()))
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        replies.write(json.dumps({"pid": pid, "rc": rc}) + "\n")
        replies.flush()


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str


class CLIServer:
    """The test side: starts the server and runs commands through it (one at a time)."""

    def __init__(self, repo: Path, workdir: Path) -> None:
        self.workdir = workdir
        self.import_stderr = workdir / "server.stderr"
        path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
        self._stderr = self.import_stderr.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_forkserver"],
            cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )  # fmt: skip
        self._count = 0
        self._cwd = repo

    def _reply(self) -> dict:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the CLI server died; its stderr: {self.import_stderr.read_text()[-2000:]}")
        return json.loads(line)

    def start(self, args: list[str]) -> int:
        """Start ``python -m src.cli ARGS``; returns the child's pid (then call :meth:`finish`)."""
        self._count += 1
        self._out = self.workdir / f"cmd{self._count}.stdout"
        self._err = self.workdir / f"cmd{self._count}.stderr"
        request = {"args": args, "stdout": str(self._out), "stderr": str(self._err), "cwd": str(self._cwd)}
        stdin: IO[str] | None = self.process.stdin
        assert stdin is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        return int(self._reply()["pid"])

    def finish(self) -> Result:
        rc = int(self._reply()["rc"])
        return Result(rc, self._out.read_text(errors="replace"), self._err.read_text(errors="replace"))

    def run(self, args: list[str]) -> Result:
        self.start(args)
        return self.finish()

    @staticmethod
    def kill(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        self._stderr.close()


if __name__ == "__main__":
    serve()
