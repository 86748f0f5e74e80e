"""The local mesh's kubelet and waypoint controller for waypoints: ``python -m ambientctl.localmesh.supervisor``.

In Kubernetes, a waypoint ``Gateway`` becomes a Deployment (the control plane's waypoint
controller), whose pod a scheduler places and a kubelet runs. A local mesh has neither, so this
small process, which the local mesh keeps running next to the control plane, does their work:

* it polls the mesh file (the same one the control plane reads) and computes, with the very
  functions the control plane uses (``sources.local.parse_manifest`` and
  ``sources.waypoints.waypoint_deployments``), which waypoint pods should run, on which node,
  with which address — so both always agree on the pod a waypoint is;
* for each such pod it builds the pod's network namespace on its node's bridge
  (``topology.Topology.add_pod``, recorded before it exists), waits for the credential the control
  plane writes for that waypoint (``controlplane.tokens.waypoint_token_path``), runs the
  ``waypoint`` process with ``--netns`` (data path in the pod, control connections and
  admin/metrics/readiness on free host ports) and waits until it reports ready;
* when the Gateway leaves the file, or its placement changes, it stops the process (SIGTERM, then
  SIGKILL after a deadline) and deletes the netns; a waypoint process that dies is restarted,
  with a growing delay, as a kubelet restarts a container.

A file that fails to parse changes nothing (the control plane keeps its last good version too).

Given ``--daemons FILE`` (an ``ambientctl mesh up`` mesh: the control plane, each node's cni agent
and ztunnel, with their command lines), it is their kubelet too: one that dies is started again
with the same command line, after a delay that doubles from 1 s up to 30 s with each restart
(back to 1 s once one has run a minute), logged ("ztunnel-node-a: not running; restarting in 2 s
(restart 2)"); the new process is appended to the run's ``state.json`` (under its lock), where
``mesh down`` and ``ztunnel-config`` find it.

What it makes is recorded in its own run state, ``<run>/supervisor/state.json`` (the demo's
``state.json`` belongs to the demo process, which rewrites it whole), with netns names under
``ambd-<run>-wp-``, so ``ambientctl demo down`` (see :func:`teardown`) removes exactly that. Its
log (``<run>/logs/supervisor.log``) says what happened in sentences ("waypoint shop/waypoint:
started on node-b 10.0.2.254, ready"); each waypoint's own log is ``<run>/logs/waypoint-<ns>-<name>.log``;
``<run>/supervisor/status.json`` holds what runs now (phase, pid, ports), for tools and tests.

SIGTERM/SIGINT stop every waypoint and delete their netns before it exits. If the supervisor is
killed outright, its waypoints get SIGTERM from the kernel (``PR_SET_PDEATHSIG``) and the netns
left are in its state file: a new supervisor for the same run, or :func:`teardown`, removes them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from ambientctl.localmesh.procs import free_ports, http_get, python_main
from ambientctl.localmesh.state import STATE_FILE, RunState, locked, proc_starttime
from ambientctl.localmesh.state import teardown as teardown_state
from ambientctl.localmesh.topology import NodeNet, PodNet, Topology, TopologyError
from controlplane.tokens import waypoint_token_path
from mesh import log as meshlog
from mesh.files import write_atomic
from sources.convert import ConfigError
from sources.local import parse_manifest
from sources.waypoints import Placed, Unplaced, waypoint_deployments

log = structlog.get_logger("supervisor")

SUBDIR = "supervisor"  # <run>/supervisor: its state, status and the waypoints' ready files
STATUS_FILE = "status.json"
PROC_NAME = "supervisor"  # the demo's record of this process
NETNS_TAG = "wp"  # its netns are ambd-<run>-wp-<namespace>-<pod>
HBONE_PORT = 15008
MAX_BACKOFF = 10.0
DAEMON_BACKOFF = (1.0, 30.0)  # first delay, cap: a node daemon's restarts (kubelet: 10 s .. 5 min)
DAEMON_STEADY = 60.0  # a daemon that ran this long starts its backoff again from the first delay


@dataclass(frozen=True)
class Want:
    """One waypoint pod the file asks for (a :class:`~sources.waypoints.Placed`)."""

    namespace: str
    gateway: str
    pod: str
    node: str
    ip: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.gateway}"


def desired(text: str, source: str) -> tuple[dict[str, Want], list[Unplaced]]:
    """What the file asks for: every placed waypoint pod, and the waypoints that cannot be placed.

    Raises ``ConfigError`` (from the parser) when the file is not valid: the caller changes nothing.
    """
    placements, _ = waypoint_deployments(parse_manifest(text, source=source))
    wants: dict[str, Want] = {}
    unplaced: list[Unplaced] = []
    for p in placements:
        if isinstance(p, Placed):
            w = Want(p.gateway.namespace, p.gateway.name, p.pod.name, p.pod.node or "", p.ip)
            wants[w.key] = w
        else:
            unplaced.append(p)
    return wants, unplaced


def reconcile(want: Mapping[str, Want], have: Mapping[str, Want]) -> tuple[list[str], list[Want]]:
    """(keys to stop, pods to start): a pod whose placement changed is stopped, then started anew."""
    stop = [k for k, w in sorted(have.items()) if want.get(k) != w]
    start = [w for k, w in sorted(want.items()) if have.get(k) != w]
    return stop, start


@dataclass
class Managed:
    """A waypoint pod this supervisor runs, and where it is in its life."""

    want: Want
    pod: PodNet
    token: Path
    ready_file: Path
    log: Path
    admin: int = 0
    stats: int = 0
    readiness: int = 0
    proc: subprocess.Popen[bytes] | None = None
    phase: str = "waiting for token"  # | "starting" | "ready" | "restarting"
    since: float = field(default_factory=time.monotonic)  # when this phase began
    restarts: int = 0
    not_before: float = 0.0  # "restarting": when to start again
    warned: bool = False  # slow start already logged

    def status(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "node": self.want.node,
            "ip": self.want.ip,
            "pod": f"{self.want.namespace}/{self.want.pod}",
            "netns": self.pod.netns,
            "pid": self.proc.pid if self.proc is not None and self.proc.poll() is None else None,
            "admin_port": self.admin,
            "stats_port": self.stats,
            "readiness_port": self.readiness,
            "restarts": self.restarts,
            "log": str(self.log),
        }


@dataclass
class Daemon:
    """A node daemon (or the control plane) this supervisor restarts when it dies."""

    name: str
    argv: list[str]
    env: dict[str, str]  # added to the supervisor's own environment
    log: Path
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)
    not_before: float | None = None  # dead: when to start it again
    proc: subprocess.Popen[bytes] | None = None  # when this supervisor started it

    def delay(self) -> float:
        first, cap = DAEMON_BACKOFF
        return float(min(cap, first * 2 ** min(self.restarts - 1, 10)))


def load_daemons(path: Path) -> dict[str, Daemon]:
    raw = json.loads(path.read_text())
    return {
        name: Daemon(name, [str(a) for a in d["argv"]], {str(k): str(v) for k, v in d.get("env", {}).items()},
                     Path(d["log"]))
        for name, d in raw.items()
    }  # fmt: skip


@dataclass(frozen=True)
class Config:
    run_dir: Path
    mesh_file: Path
    controlplane_dir: Path
    controlplane: str
    nodes: dict[str, str]  # node name -> its netns
    poll_interval: float = 0.5
    stop_timeout: float = 5.0
    ready_warn: float = 60.0
    ready_file: Path | None = None
    daemons_file: Path | None = None


def sub_state_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SUBDIR


def status_path(run_dir: Path) -> Path:
    return sub_state_dir(run_dir) / STATUS_FILE


def read_status(run_dir: Path) -> dict[str, Any]:
    """The supervisor's ``status.json`` (``{}`` when absent or being replaced)."""
    try:
        data = json.loads(status_path(run_dir).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        main = RunState.load(cfg.run_dir)
        self.state = RunState(f"{main.run_id}-{NETNS_TAG}", str(sub_state_dir(cfg.run_dir)))
        self.topo = Topology(self.state)
        self.nodes: dict[str, NodeNet] = {}
        self.managed: dict[str, Managed] = {}
        self.wants: dict[str, Want] = {}  # the last good file's
        self.config_error: str | None = None
        self._file_key: tuple[int, int, int] | None = None
        self._digest = ""
        self._said: set[tuple[str, str]] = set()  # (key, message) logged once
        self._status = ""
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        self.daemons = load_daemons(cfg.daemons_file) if cfg.daemons_file is not None else {}

    # -- lifecycle --------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True
        log.info("stopping: every waypoint goes", signal=signal.Signals(signum).name)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._clean_previous()
        for name, netns in sorted(self.cfg.nodes.items()):
            try:
                node = self.topo.adopt_node(name, netns)
            except TopologyError as e:
                log.error(f"node {name}: cannot use it for waypoints", error=str(e))
                continue
            self.nodes[name] = node
        log.info(
            f"supervisor started: watching {self.cfg.mesh_file} every {self.cfg.poll_interval:g} s",
            nodes={n: f"{x.netns} (bridge {x.gateway}/{x.prefixlen})" for n, x in self.nodes.items()},
        )
        self._write_status()
        if self.cfg.ready_file is not None:
            write_atomic(self.cfg.ready_file, b"started\n", mode=0o644)
        try:
            while not self._stopping:
                self.tick()
                self._wait(self.cfg.poll_interval)
        finally:
            self.shutdown()
        return 0

    def _wait(self, seconds: float) -> None:
        """Sleep until the next poll, or until a signal arrives (its wakeup byte ends the wait)."""
        if self._stopping:
            return
        with contextlib.suppress(InterruptedError):
            r, _, _ = select.select([self._wake_r], [], [], seconds)
            if r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)

    def _clean_previous(self) -> None:
        """A supervisor of this run that died left processes or netns: remove them first."""
        d = Path(self.state.run_dir)
        if (d / STATE_FILE).is_file():
            old = RunState.load(d)
            if old.procs or old.netns:
                log.warning(
                    "a previous supervisor of this run left waypoints: removing them",
                    procs=[p.name for p in old.procs],
                    netns=old.netns,
                )
            for err in teardown_state(old, grace=self.cfg.stop_timeout):
                log.warning("cleaning up the previous supervisor's waypoints", error=err)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state.save()

    def shutdown(self) -> None:
        managed = list(self.managed.values())
        for m in managed:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.terminate()
        for m in managed:
            self._stop(m, "the supervisor is stopping")
        self._write_status()

    # -- one poll ---------------------------------------------------------------------------------

    def tick(self) -> None:
        for d in self.daemons.values():
            if self._stopping:
                break
            self._watch(d)
        self._read_file()
        want = {k: w for k, w in self.wants.items() if self._runnable(w)}
        have = {k: m.want for k, m in self.managed.items()}
        stop, start = reconcile(want, have)
        for key in stop:
            m = self.managed[key]
            why = (
                "its Gateway is no longer in the file"
                if key not in want
                else f"placement changed to {want[key].node} {want[key].ip}"
            )
            self._stop(m, why)
        for w in start:
            if self._stopping:
                break
            self._create(w)
        for m in list(self.managed.values()):
            if self._stopping:
                break
            self._advance(m)
        self._write_status()

    def _read_file(self) -> None:
        path = self.cfg.mesh_file
        try:
            st = path.stat()
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if key == self._file_key:
                return
            data = path.read_bytes()
        except OSError as e:
            self._once("file", f"cannot read {path}: {e.strerror}; changing nothing")
            return
        self._file_key = key
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            return
        self._digest = digest
        try:
            wants, unplaced = desired(data.decode("utf-8"), str(path))
        except (ConfigError, UnicodeDecodeError) as e:
            self.config_error = str(e)
            log.warning(
                f"{path.name} not applied: {e}; the {len(self.managed)} waypoint(s) running stay as they are"
            )
            return
        if self.config_error is not None:
            log.info(f"{path.name} is valid again")
        self.config_error = None
        self.wants = wants
        for u in unplaced:
            self._once(u.gateway.key, f"waypoint {u.gateway.key}: not placed: {u.reason}")

    def _runnable(self, w: Want) -> bool:
        if w.node in self.nodes:
            return True
        self._once(w.key, f"waypoint {w.key}: node {w.node!r} is not one of this mesh's nodes: not started")
        return False

    def _once(self, key: str, message: str) -> None:
        if (key, message) not in self._said:
            self._said.add((key, message))
            log.warning(message)

    # -- node daemons -----------------------------------------------------------------------------

    def _watch(self, d: Daemon) -> None:
        now = time.monotonic()
        if d.proc is not None:
            running = d.proc.poll() is None
        else:
            try:
                recs = [r for r in RunState.load(self.cfg.run_dir).procs if r.name == d.name]
            except (OSError, ValueError, TypeError):
                return  # being replaced right now: next time
            running = bool(recs) and proc_starttime(recs[-1].pid) == recs[-1].starttime
        if running:
            return
        if d.not_before is None:
            if now - d.started > DAEMON_STEADY:
                d.restarts = 0
            d.restarts += 1
            d.not_before = now + d.delay()
            status = f" (exit status {d.proc.returncode})" if d.proc is not None else ""
            log.warning(
                f"{d.name}: not running{status}; restarting in {d.delay():g} s (restart {d.restarts})",
                log_file=str(d.log),
            )
            return
        if now < d.not_before:
            return
        env = dict(os.environ)
        env.update(d.env)
        with open(d.log, "ab") as out:
            d.proc = subprocess.Popen(
                d.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # outlives the supervisor: mesh down stops it
            )  # fmt: skip
        with locked(self.cfg.run_dir):
            st = RunState.load(self.cfg.run_dir)
            st.add_proc(d.name, d.proc.pid)
        d.started, d.not_before = time.monotonic(), None
        log.info(f"{d.name}: restarted (restart {d.restarts})", pid=d.proc.pid, log_file=str(d.log))

    # -- one waypoint -----------------------------------------------------------------------------

    def _create(self, w: Want) -> None:
        node = self.nodes[w.node]
        try:
            pod = self.topo.add_pod(w.namespace, w.pod, node, w.ip)  # recorded before it exists
        except TopologyError as e:
            log.error(f"waypoint {w.key}: cannot build its pod netns on {w.node}", error=str(e))
            self._forget_netns(f"{self.state.prefix}{w.namespace}-{w.pod}")
            return
        name = f"waypoint-{w.namespace}-{w.gateway}"
        m = Managed(
            w,
            pod,
            token=waypoint_token_path(self.cfg.controlplane_dir, w.namespace, w.gateway),
            ready_file=Path(self.state.run_dir) / f"{name}.ready",
            log=self.cfg.run_dir / "logs" / f"{name}.log",
        )
        self.managed[w.key] = m
        log.info(f"waypoint {w.key}: pod {w.namespace}/{w.pod} on {w.node} {w.ip}, netns {pod.netns}")

    def _advance(self, m: Managed) -> None:
        now = time.monotonic()
        key = m.want.key
        if m.phase == "waiting for token":
            if _nonempty(m.token):
                self._spawn(m)
            elif not m.warned and now - m.since > self.cfg.ready_warn:
                m.warned = True
                log.warning(f"waypoint {key}: no token from the control plane yet", token=str(m.token))
            return
        if m.phase == "restarting":
            if now >= m.not_before:
                self._spawn(m)
            return
        assert m.proc is not None
        code = m.proc.poll()
        if code is not None:
            m.restarts += 1
            delay = min(MAX_BACKOFF, 0.5 * 2 ** min(m.restarts - 1, 5))
            log.warning(
                f"waypoint {key}: process exited with status {code}; restarting in {delay:g} s",
                log_file=str(m.log),
            )
            self.state.procs = [p for p in self.state.procs if p.pid != m.proc.pid]
            self.state.save()
            m.proc = None
            m.phase, m.since, m.not_before, m.warned = "restarting", now, now + delay, False
            return
        if m.phase == "starting":
            status, _ = http_get(f"http://127.0.0.1:{m.readiness}/healthz/ready", timeout=1.0)
            if status == 200:
                took = now - m.since
                m.phase, m.since = "ready", now
                log.info(
                    f"waypoint {key}: started on {m.want.node} {m.want.ip}, ready",
                    took_s=round(took, 1),
                    pid=m.proc.pid,
                    admin=f"127.0.0.1:{m.admin}",
                    metrics=f"127.0.0.1:{m.stats}",
                    readiness=f"127.0.0.1:{m.readiness}",
                )
            elif not m.warned and now - m.since > self.cfg.ready_warn:
                m.warned = True
                log.warning(f"waypoint {key}: not ready after {self.cfg.ready_warn:g} s", log_file=str(m.log))

    def _spawn(self, m: Managed) -> None:
        w = m.want
        m.admin, m.stats, m.readiness = free_ports(3)
        m.ready_file.unlink(missing_ok=True)
        env = dict(os.environ)
        env.update(CA_ROOT_CERT=str(self.cfg.controlplane_dir / "root-cert.pem"), TOKEN_FILE=str(m.token))
        argv = [
            *python_main("waypoint.main"),
            "--gateway", w.key, "--netns", m.pod.netns_path,
            "--ca-address", self.cfg.controlplane, "--xds-address", self.cfg.controlplane,
            "--hbone-port", str(HBONE_PORT), "--admin-port", str(m.admin), "--stats-port", str(m.stats),
            "--readiness-port", str(m.readiness), "--drain-seconds", "1", "--ready-file", str(m.ready_file),
        ]  # fmt: skip
        m.log.parent.mkdir(exist_ok=True)
        with open(m.log, "ab") as out:
            m.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (the supervisor has one thread)
            )  # fmt: skip
        self.state.add_proc(f"waypoint-{w.namespace}-{w.gateway}", m.proc.pid)
        m.phase, m.since, m.warned = "starting", time.monotonic(), False
        log.info(
            f"waypoint {w.key}: process started"
            + (f" (restart {m.restarts})" if m.restarts else "")
            + ", waiting for it to be ready",
            pid=m.proc.pid,
            log_file=str(m.log),
        )

    def _stop(self, m: Managed, why: str) -> None:
        key = m.want.key
        log.info(f"waypoint {key}: stopping: {why}")
        code = None
        if m.proc is not None:
            p = m.proc
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(self.cfg.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning(f"waypoint {key}: no exit {self.cfg.stop_timeout:g} s after SIGTERM: killing")
                    p.kill()
                    p.wait()
            code = p.returncode
            self.state.procs = [r for r in self.state.procs if r.pid != p.pid]
            self.state.save()
        try:
            self.topo.remove_pod(m.pod)
            gone = f"netns {m.pod.netns} deleted"
        except TopologyError as e:
            gone = f"netns {m.pod.netns} NOT deleted: {e}"
        self.managed.pop(key, None)
        log.info(
            f"waypoint {key}: stopped" + (f" (exit status {code})" if code is not None else "") + f", {gone}"
        )

    def _forget_netns(self, netns: str) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        if netns in self.state.netns:
            self.state.netns.remove(netns)
            self.state.save()

    def _write_status(self) -> None:
        status = {
            "config_error": self.config_error,
            "waypoints": {k: m.status() for k, m in sorted(self.managed.items())},
        }
        text = json.dumps(status, indent=1, sort_keys=True)
        if text != self._status:
            self._status = text
            write_atomic(status_path(self.cfg.run_dir), text.encode(), mode=0o644)


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


# -- the demo's side --------------------------------------------------------------------------------


def argv(
    run_dir: Path,
    mesh_file: Path,
    controlplane_dir: Path,
    controlplane: str,
    nodes: Mapping[str, str],
    ready_file: Path,
    poll_interval: float = 0.5,
    *,
    daemons: Path | None = None,
) -> list[str]:
    """The command line that runs the supervisor of a local mesh."""
    out = [
        *python_main("ambientctl.localmesh.supervisor"),
        "--run-dir", str(run_dir), "--config", str(mesh_file), "--controlplane-dir", str(controlplane_dir),
        "--controlplane", controlplane, "--poll-interval", str(poll_interval), "--ready-file", str(ready_file),
    ]  # fmt: skip
    for name, netns in nodes.items():
        out += ["--node", f"{name}={netns}"]
    if daemons is not None:
        out += ["--daemons", str(daemons)]
    return out


def teardown(st: RunState, grace: float = 10.0) -> list[str]:
    """Stop the run's supervisor first (so it starts nothing new, and stops its waypoints and
    deletes their netns itself), then remove whatever its state file still lists. The demo's own
    teardown runs after this; the problems met are returned, and it never stops half way."""
    errors: list[str] = []
    for rec in st.procs:
        if rec.name != PROC_NAME or proc_starttime(rec.pid) != rec.starttime:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while proc_starttime(rec.pid) == rec.starttime and time.monotonic() < deadline:
            _wait_exit(rec.pid, deadline - time.monotonic())
        if proc_starttime(rec.pid) == rec.starttime:
            errors.append(f"{rec.name} (pid {rec.pid}) did not stop on SIGTERM within {grace:g} s; killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGKILL)
            _wait_exit(rec.pid, 2.0)
    d = sub_state_dir(st.path)
    if (d / STATE_FILE).is_file():
        try:
            sub = RunState.load(d)
        except (OSError, ValueError, TypeError) as e:
            errors.append(f"{d / STATE_FILE}: {e}")
        else:
            errors += teardown_state(sub, grace=5.0)
    return errors


def _wait_exit(pid: int, timeout: float) -> None:
    """Until ``pid`` exits (reaping it if it is our child) or ``timeout``: on its pidfd, no sleep."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        select.select([fd], [], [], max(0.0, timeout))
    finally:
        os.close(fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# -- the command ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ambientctl.localmesh.supervisor",
        description="Run the waypoints a local mesh's file declares (kubelet + waypoint controller).",
    )
    p.add_argument("--run-dir", required=True, type=Path, help="the local mesh's run directory")
    p.add_argument(
        "--config", required=True, type=Path, help="the mesh file (the control plane's --local-config)"
    )
    p.add_argument("--controlplane-dir", required=True, type=Path, help="the control plane's --state-dir")
    p.add_argument("--controlplane", required=True, help="HOST:PORT of the control plane (CA + discovery)")
    p.add_argument("--node", action="append", default=[], metavar="NAME=NETNS", help="a node and its netns")
    p.add_argument("--poll-interval", type=float, default=0.5)
    p.add_argument("--stop-timeout", type=float, default=5.0, help="SIGTERM to SIGKILL, seconds")
    p.add_argument("--ready-file", type=Path)
    p.add_argument(
        "--daemons", type=Path, help="JSON {name: {argv, env, log}}: processes to restart when they die"
    )
    p.add_argument("--log-level", default="info", choices=meshlog.LEVELS)
    return p


def main(args: list[str] | None = None) -> int:
    a = _parser().parse_args(args)
    nodes: dict[str, str] = {}
    for spec in a.node:
        name, sep, netns = spec.partition("=")
        if not sep or not name or not netns:
            print(f"supervisor: --node {spec!r}: want NAME=NETNS", file=sys.stderr)
            return 2
        nodes[name] = netns
    meshlog.configure(a.log_level)
    cfg = Config(
        run_dir=a.run_dir,
        mesh_file=a.config,
        controlplane_dir=a.controlplane_dir,
        controlplane=a.controlplane,
        nodes=nodes,
        poll_interval=a.poll_interval,
        stop_timeout=a.stop_timeout,
        ready_file=a.ready_file,
        daemons_file=a.daemons,
    )
    return Supervisor(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
