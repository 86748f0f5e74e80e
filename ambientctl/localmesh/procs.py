"""Starting the mesh's processes and waiting for them, always with a deadline."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ambientctl.localmesh.state import RunState, proc_starttime

T = TypeVar("T")
POLL = 0.05


class ProcError(RuntimeError):
    pass


def python_main(module: str) -> list[str]:
    """argv running ``module.main()`` with this interpreter (console scripts need not be on PATH)."""
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def pause(seconds: float) -> None:
    """Block up to ``seconds`` without busy-waiting (between polls of a condition)."""
    select.select([], [], [], max(0.0, seconds))


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Procs:
    def __init__(self, state: RunState) -> None:
        self.state = state
        self.running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        # How each was started (argv, the environment it adds, log): to start it again.
        self.specs: dict[str, tuple[list[str], dict[str, str], Path]] = {}

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        append: bool = False,
        log: Path | None = None,
        cwd: str | None = None,
    ) -> Path:
        """Start ``name`` in its own session, output to ``log`` (default ``logs/<name>.log``;
        ``append``: a restart keeps the previous process's lines before its own)."""
        log = log or self.state.path / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "ab" if append else "wb") as out:
            p = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None, start_new_session=True, cwd=cwd,
            )  # fmt: skip
        self.state.add_proc(name, p.pid)
        self.running[name] = (p, log)
        extra = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}
        self.specs[name] = (list(argv), extra, log)
        return log

    def pid(self, name: str) -> int:
        """The pid of the running process ``name`` (e.g. ``ztunnel-node-a``)."""
        return self.running[name][0].pid

    def log_tail(self, name: str, lines: int = 15) -> str:
        log = self.running[name][1] if name in self.running else self.state.path / "logs" / f"{name}.log"
        try:
            text = log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])

    def check_alive(self, name: str) -> None:
        if name not in self.running:  # started by another command of this run: its record says
            rec = next((r for r in reversed(self.state.procs) if r.name == name), None)
            if rec is None or proc_starttime(rec.pid) != rec.starttime:
                raise ProcError(
                    f"{name} is not running; its log: {self.state.path / 'logs' / (name + '.log')}"
                )
            return
        p, _ = self.running[name]
        if p.poll() is not None:
            raise ProcError(f"{name} exited with status {p.returncode}; its log:\n{self.log_tail(name)}")

    def stop(self, name: str, sig: signal.Signals = signal.SIGKILL, timeout: float = 15.0) -> int:
        """Send ``sig`` to the process group of ``name`` and wait for it to exit; its exit status."""
        p, _ = self.running[name]
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                raise ProcError(f"{name} did not exit within {timeout:.0f} s of {sig.name}") from None
        return p.returncode

    def wait_for(self, name: str, what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
        """Poll ``probe`` until it returns a value; fail early if process ``name`` died."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive(name)
            got = probe()
            if got is not None:
                return got
            if time.monotonic() > deadline:
                raise ProcError(f"{name}: {what} not within {timeout:.0f} s; its log:\n{self.log_tail(name)}")
            pause(POLL)

    def wait_file(self, name: str, path: Path, timeout: float = 30.0) -> str:
        def probe() -> str | None:
            try:
                text = path.read_text()
            except FileNotFoundError:
                return None
            return text or None

        return self.wait_for(name, f"ready file {path}", probe, timeout)


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        e.close()
        return e.code, body
    except OSError as e:
        return 0, str(e)


def http_json(url: str) -> Any:
    status, body = http_get(url)
    if status != 200:
        return None
    return json.loads(body)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out
