"""The run directory of one demo: what it created, recorded before it is created.

Every netns and process the demo makes is written to ``<run dir>/state.json`` *before* (netns)
or right after (process) it exists, so ``ambientctl demo down`` — or the teardown of a run that
failed half way — can remove exactly what this run made and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUNS_ROOT = Path(os.environ.get("AMBIENT_DEMO_RUN_ROOT", "/run/ambient-demo"))
NETNS_PREFIX = "ambd-"
STATE_FILE = "state.json"


@dataclass
class ProcRecord:
    name: str
    pid: int
    starttime: str  # /proc/<pid>/stat field 22: tells a reused pid from ours


@dataclass
class RunState:
    run_id: str
    run_dir: str
    netns: list[str] = field(default_factory=list)
    procs: list[ProcRecord] = field(default_factory=list)
    info: dict[str, object] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{NETNS_PREFIX}{self.run_id}-"

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    @classmethod
    def create(cls, root: Path = RUNS_ROOT) -> RunState:
        run_id = secrets.token_hex(2)
        d = root / run_id
        d.mkdir(parents=True, mode=0o700)
        st = cls(run_id, str(d))
        st.save()
        return st

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        raw = json.loads((run_dir / STATE_FILE).read_text())
        procs = [ProcRecord(**p) for p in raw.pop("procs", [])]
        return cls(**raw, procs=procs)

    def save(self) -> None:
        tmp = self.path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.path / STATE_FILE)

    def add_netns(self, name: str) -> None:
        self.netns.append(name)
        self.save()

    def add_proc(self, name: str, pid: int) -> None:
        self.procs.append(ProcRecord(name, pid, proc_starttime(pid) or ""))
        self.save()


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """One writer of a run's ``state.json`` at a time across processes (``mesh up`` while it
    builds, ``mesh apply``, the supervisor recording a restarted daemon): each loads, changes and
    saves it inside. (The demo's process is the only writer of its run's and does not lock.)"""
    with open(Path(run_dir) / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def proc_starttime(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _ours(rec: ProcRecord) -> bool:
    st = proc_starttime(rec.pid)
    return st is not None and st == rec.starttime


def list_runs(root: Path = RUNS_ROOT) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / STATE_FILE).is_file())


def netns_names() -> list[str]:
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split(" ", 1)[0] for line in p.stdout.splitlines() if line.strip()]


# What a process is given between SIGTERM and SIGKILL. The control plane alone may take 5 s
# (controlplane.server.DEFAULT_GRACE: calls still open, say from a ztunnel that is stuck, get
# that long to end), so this is more; a ztunnel drains in 1 s here (--drain-seconds).
STOP_GRACE = 10.0


def teardown(st: RunState, grace: float = STOP_GRACE) -> list[str]:
    """Stop our processes (SIGTERM, then SIGKILL after ``grace``), delete our netns, the run dir.

    Returns the problems met; it never stops half way.
    """
    errors: list[str] = []
    recorded = {r.pid for r in st.procs}
    # A process started just as a signal arrived may not be recorded yet: every process of ours
    # names the run directory in its arguments (config, sockets, ready file, capture file).
    strays = [ProcRecord("stray", pid, proc_starttime(pid) or "") for pid in _pids_naming(st.run_dir)]
    live = [r for r in [*reversed(st.procs), *(s for s in strays if s.pid not in recorded)] if _ours(r)]
    for r in live:
        _signal(r.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for r in live:
        while _ours(r) and time.monotonic() < deadline:
            _reap(r.pid, min(0.05, max(0.0, deadline - time.monotonic())))
        if _ours(r):
            _signal(r.pid, signal.SIGKILL)
            _reap(r.pid, 1.0)
            errors.append(f"{r.name} (pid {r.pid}) did not stop on SIGTERM within {grace:g} s; killed")
    existing = set(netns_names())
    names = list(dict.fromkeys([*reversed(st.netns), *(n for n in existing if n.startswith(st.prefix))]))
    for ns in names:
        if ns not in existing:
            continue
        p = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            errors.append(f"ip netns del {ns}: {p.stderr.strip()}")
    shutil.rmtree(st.path, ignore_errors=True)
    return errors


def _signal(pid: int, sig: signal.Signals) -> None:
    """The process's whole group when it leads one (ours do: own session), else the process."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _pids_naming(text: str) -> list[int]:
    me = os.getpid()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            args = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text + "/" in args:
            found.append(int(d.name))
    return found


def _reap(pid: int, timeout: float) -> None:
    """Collect our own child if it exited (else it stays a zombie and looks alive); wait a bit."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done = 0
    if done == 0 and timeout > 0:
        # Wait on the child's pidfd rather than a fixed sleep: returns as soon as it exits.
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            import select

            select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
