"""Soak benchmark: mixed traffic for a long time while ztunnels, cni agents and the control plane are killed.

    sudo .venv/bin/python benchmarks/soak.py [--duration 1800] [--kill-interval 120] [--quick]
                                             [--output FILE.md] [--json FILE.json] [--keep]

Not a test: it measures what a user of ``ambientctl mesh up`` would live through. It writes its
own mesh file (2 nodes; on each a server pod serving HTTP and TCP echo, and a client pod),
starts the mesh exactly as a user does (``ambientctl mesh up -f FILE``, whose supervisor restarts
a dead control plane, cni agent or ztunnel with backoff) under a temporary
``AMBIENT_DEMO_RUN_ROOT``, then for ``--duration`` seconds

* drives mixed traffic from both client pods to both servers (same node and other node):
  short HTTP requests and new TCP connections at a steady rate, and long-lived streams
  (``benchmarks/soak_client.py``, started with ``ambientctl mesh exec``: in the pod's netns, as
  the pod's user; the servers are ``benchmarks/soak_server.py``, the pods' own command);
* every ``--kill-interval`` seconds SIGKILLs, in rotation, a ztunnel, a cni agent and the control
  plane (pids from the run's ``state.json``), and times how long until the component is serving
  again and until new requests succeed again on every flow that failed;
* samples RSS and open fds of every ztunnel, cni agent, control plane and the supervisor from
  ``/proc``, and the sockets in each pod's netns.

At the end: a markdown report (kills, errors over time, processes, pod sockets) on stdout or
``--output``, and every figure as JSON (``--json``). ``ambientctl mesh down`` runs in a
``finally``, also on Ctrl-C and SIGTERM. Needs root. Numbers on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ambientctl.localmesh.state import ProcRecord, RunState, proc_starttime  # noqa: E402

NAMESPACE = "soak"
NODES = ("node-a", "node-b")
SERVERS = {"srv-a": ("node-a", "10.96.0.10"), "srv-b": ("node-b", "10.96.0.11")}  # pod: node, Service IP
CLIENTS = {"cli-a": "node-a", "cli-b": "node-b"}
HTTP_PORT, HTTP_TARGET, ECHO_PORT = 80, 8080, 7007
# Each kill takes the next of these; the control plane comes round twice as often as each node daemon.
ROTATION = ("ztunnel-node-a", "cni-node-a", "controlplane", "ztunnel-node-b", "cni-node-b", "controlplane")
SAMPLED = ("controlplane", "ztunnel-node-a", "ztunnel-node-b", "cni-node-a", "cni-node-b", "supervisor")
KINDS = ("connect_fail", "reset", "eof", "timeout", "http_fail", "mismatch")
TRAFFIC = ("http", "conn", "stream")
PROBE_EVERY = 0.25
END_GRACE = 60.0  # after --duration, how long a kill's probes may still run (traffic goes on)
KIB = 1024


class Interrupted(Exception):
    pass


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the mesh file ---------------------------------------------------------------------------------


def mesh_yaml(work: Path) -> str:
    """Two nodes; a server and a client pod on each; a Service per server."""
    server = ["python3", str(work / "soak_server.py"), "--http-port", str(HTTP_TARGET),
              "--echo-port", str(ECHO_PORT)]  # fmt: skip
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}} for n in NODES
    ]
    docs.append({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": NAMESPACE, "labels": {"istio.io/dataplane-mode": "ambient"}}})  # fmt: skip
    for name, (node, vip) in SERVERS.items():
        docs.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": name,
                     "containers": [{"name": "server", "command": server}]},
        })  # fmt: skip
        docs.append({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"clusterIP": vip, "selector": {"app": name}, "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": HTTP_TARGET},
                {"name": "tcp-echo", "port": ECHO_PORT, "targetPort": ECHO_PORT}]},
        })  # fmt: skip
    for name, node in CLIENTS.items():
        docs.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": name,
                     "containers": [{"name": "sleep", "command": ["sleep", "infinity"]}]},
        })  # fmt: skip
    return "".join("---\n" + json.dumps(d) + "\n" for d in docs)  # JSON is YAML


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class Kill:
    n: int
    component: str
    at: float  # wall clock
    pid: int
    until: float  # the next kill (or the end): the window its errors are counted in
    new_pid: int | None = None
    restarted_at: float | None = None
    back_at: float | None = None
    log_offset: int = 0  # cni: where the node's ztunnel log stood at the kill

    @property
    def node(self) -> str:
        return self.component.split("-", 1)[1] if "-" in self.component else ""


@dataclass
class Sample:
    t: float
    process: str
    pid: int
    rss_kib: int
    fds: int


@dataclass
class PodSockets:
    t: float
    pod: str
    open: int  # every state but TIME_WAIT
    established: int
    close_wait: int
    time_wait: int


@dataclass
class Run:
    work: Path
    env: dict[str, str]
    state_dir: Path | None = None
    clients: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    sockets: list[PodSockets] = field(default_factory=list)
    t0: float = 0.0
    t_end: float = 0.0
    runs_before: set[Path] = field(default_factory=set)

    @property
    def root(self) -> Path:
        return Path(self.env["AMBIENT_DEMO_RUN_ROOT"])

    def find_state_dir(self) -> None:
        """The run ``mesh up`` made: the one run directory under the root that was not there before."""
        new = sorted(set(self.root.glob("*/state.json")) - self.runs_before)
        if new and self.state_dir is None:
            self.state_dir = new[0].parent

    def ambientctl(self, *args: str, timeout: float = 300.0, log: str | None = None) -> int:
        out = open(self.work / log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            return subprocess.run(
                [sys.executable, "-m", "ambientctl", *args], cwd=ROOT, env=self.env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout,
            ).returncode  # fmt: skip
        finally:
            if log:
                out.close()  # type: ignore[union-attr]

    # -- state.json ------------------------------------------------------------------------------

    def state(self) -> RunState:
        assert self.state_dir is not None
        return RunState.load(self.state_dir)

    def info(self) -> dict[str, Any]:
        return dict(self.state().info)

    def current(self, name: str) -> ProcRecord | None:
        """The live process recorded as ``name`` (the last record: a restart appends one)."""
        try:
            recs = [r for r in self.state().procs if r.name == name]
        except (OSError, ValueError, TypeError):
            return None  # being replaced right now
        if recs and recs[-1].starttime and proc_starttime(recs[-1].pid) == recs[-1].starttime:
            return recs[-1]
        return None


def start_mesh(run: Run) -> None:
    for script in ("soak_server.py", "soak_client.py"):
        shutil.copy(HERE / script, run.work / script)
        (run.work / script).chmod(0o644)
    mesh_file = run.work / "soak-mesh.yaml"
    mesh_file.write_text(mesh_yaml(run.work))
    say(f"mesh up -f {mesh_file} (log {run.work / 'mesh-up.log'})")
    run.runs_before = set(run.root.glob("*/state.json"))
    rc = run.ambientctl("mesh", "up", "-f", str(mesh_file), log="mesh-up.log")
    run.find_state_dir()
    if rc != 0:
        tail = (run.work / "mesh-up.log").read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError("ambientctl mesh up failed:\n" + "\n".join(tail))
    assert run.state_dir is not None


def start_clients(run: Run, args: argparse.Namespace) -> None:
    assert run.state_dir is not None
    for client in CLIENTS:
        targets = [f"--target={srv}={vip}" for srv, (_, vip) in SERVERS.items()]
        load = ["python3", str(run.work / "soak_client.py"), *targets, "--http-rate", str(args.http_rate),
                "--conn-rate", str(args.conn_rate), "--streams", str(args.streams),
                "--stream-rate", str(args.stream_rate)]  # fmt: skip
        with (
            open(run.work / f"client-{client}.jsonl", "wb") as out,
            open(run.work / f"client-{client}.err", "wb") as err,
        ):
            run.clients[client] = subprocess.Popen(
                [sys.executable, "-m", "ambientctl", "mesh", "exec", "--run", run.state_dir.name,
                 f"{NAMESPACE}/{client}", "--", *load],
                cwd=ROOT, env=run.env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
    deadline = time.monotonic() + 60
    for client, p in run.clients.items():
        path = run.work / f"client-{client}.jsonl"
        while b'"started"' not in path.read_bytes():
            if p.poll() is not None or time.monotonic() > deadline:
                why = (run.work / f"client-{client}.err").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"load generator in {client} did not start (exit {p.poll()}): {why}")
            time.sleep(0.1)


def stop_clients(run: Run) -> None:
    for p in run.clients.values():
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in run.clients.values():
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


# -- sampling ---------------------------------------------------------------------------------------


def proc_figures(pid: int) -> tuple[int, int] | None:
    """(RSS KiB, open fds) of ``pid`` from /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return rss, fds


def netns_sockets(pid: int) -> tuple[int, int, int, int] | None:
    """TCP sockets in the network namespace of ``pid``: (open, ESTABLISHED, CLOSE_WAIT, TIME_WAIT),
    where open is every socket but those in TIME_WAIT (the kernel's, gone after 60 s)."""
    states: Counter[str] = Counter()
    try:
        for table in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 3:
                        states[parts[3]] += 1
    except OSError:
        return None
    return sum(states.values()) - states["06"], states["01"], states["08"], states["06"]


def sample(run: Run) -> None:
    now = time.time()
    for name in SAMPLED:
        rec = run.current(name)
        figs = proc_figures(rec.pid) if rec else None
        if rec and figs:
            run.samples.append(Sample(now, name, rec.pid, *figs))
    for pod in [*SERVERS, *CLIENTS]:
        rec = run.current(f"pod-{NAMESPACE}-{pod}")
        socks = netns_sockets(rec.pid) if rec else None
        if socks:
            run.sockets.append(PodSockets(now, pod, *socks))


# -- kills and their recovery -------------------------------------------------------------------------


def http_status(url: str, timeout: float = 1.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        e.close()
        return e.code, ""
    except (OSError, ValueError):
        return 0, ""


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            with contextlib.suppress(ValueError):
                return float(line.split()[1])
    return None


def kill(run: Run, n: int, component: str, until: float) -> Kill | None:
    rec = run.current(component)
    if rec is None:
        say(f"kill {n}: {component} is not running (still restarting?): skipped")
        return None
    k = Kill(n, component, time.time(), rec.pid, until)
    if component.startswith("cni-"):
        with contextlib.suppress(OSError):
            k.log_offset = (run.state_dir / "logs" / f"ztunnel-{k.node}.log").stat().st_size  # type: ignore[operator]
    os.kill(rec.pid, signal.SIGKILL)
    say(f"[{k.at - run.t0:7.1f} s] kill {n}: SIGKILL {component} (pid {rec.pid})")
    return k


def serving(run: Run, k: Kill) -> bool:
    """Is the killed component's replacement serving: ztunnel ready; the cni agent answering on
    its plugin socket with the node's ztunnel reconnected to it; the control plane feeding both
    ztunnels again (xDS connected, an update applied since the kill)."""
    assert run.state_dir is not None
    info = run.info()
    if k.component.startswith("ztunnel-"):
        port = info["ztunnels"][k.node]["readiness"]
        return http_status(f"http://127.0.0.1:{port}/healthz/ready")[0] == 200
    if k.component.startswith("cni-"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(run.state_dir / k.node / "cni.sock"))
            except OSError:
                return False
        try:
            with open(run.state_dir / "logs" / f"ztunnel-{k.node}.log", "rb") as f:
                f.seek(k.log_offset)
                return b"zds: connected to the agent" in f.read()
        except OSError:
            return False
    for z in info["ztunnels"].values():
        status, text = http_status(f"http://127.0.0.1:{z['stats']}/metrics")
        last = metric(text, "ambient_xds_last_update_timestamp_seconds") if status == 200 else None
        if metric(text, "ambient_xds_connected") != 1.0 or last is None or last <= k.at:
            return False
    return True


def watch(run: Run, k: Kill, now: float) -> None:
    if k.restarted_at is None:
        rec = run.current(k.component)
        if rec is not None and rec.pid != k.pid:
            k.restarted_at, k.new_pid = now, rec.pid
    if k.restarted_at is not None and k.back_at is None and serving(run, k):
        k.back_at = time.time()
        say(
            f"[{k.back_at - run.t0:7.1f} s]   {k.component} back after {k.back_at - k.at:.1f} s (pid {k.new_pid})"
        )


def soak(run: Run, args: argparse.Namespace) -> None:
    run.t0 = time.time()
    end = run.t0 + args.duration
    times = [run.t0 + i * args.kill_interval for i in range(1, int(args.duration // args.kill_interval) + 1)
             if i * args.kill_interval <= args.duration - args.kill_interval / 2]  # fmt: skip
    next_sample, pending = run.t0, []
    say(
        f"soak: {args.duration:g} s, {len(times)} kills every {args.kill_interval:g} s, samples every {args.sample_interval:g} s"
    )
    while True:
        now = time.time()
        if now >= next_sample:
            sample(run)
            next_sample += args.sample_interval
        if times and now >= times[0]:
            times.pop(0)
            k = kill(
                run, len(run.kills) + 1, ROTATION[len(run.kills) % len(ROTATION)], times[0] if times else end
            )
            if k is not None:
                run.kills.append(k)
                pending.append(k)
        for k in pending:
            watch(run, k, now)
        pending = [k for k in pending if k.back_at is None and now < max(k.until, end) + END_GRACE]
        for p in run.clients.values():
            if p.poll() is not None:
                raise RuntimeError(f"a load generator exited early (status {p.returncode}); see {run.work}")
        if now >= end and not pending:
            break
        time.sleep(PROBE_EVERY)
    sample(run)
    run.t_end = time.time()


# -- the report ---------------------------------------------------------------------------------------


@dataclass
class Events:
    failures: list[dict[str, Any]] = field(default_factory=list)  # each with "client"
    recovered: list[dict[str, Any]] = field(default_factory=list)
    ticks: list[tuple[float, str, dict[str, int]]] = field(default_factory=list)  # (t, client→flow, counts)
    streams: list[dict[str, Any]] = field(default_factory=list)


def read_events(run: Run) -> Events:
    ev = Events()
    for client in CLIENTS:
        path = run.work / f"client-{client}.jsonl"
        for line in path.read_text(errors="replace").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            e["client"] = client
            if "kind" in e:
                ev.failures.append(e)
            elif e.get("event") == "recovered":
                ev.recovered.append(e)
            elif e.get("event") == "stream_end":
                ev.streams.append(e)
            elif "tick" in e:
                for flow, counts in e["tick"].items():
                    ev.ticks.append((e["t"], f"{client}→{flow}", counts))
    return ev


def key(e: dict[str, Any]) -> tuple[str, str, str]:
    return e["client"], e["flow"], e["traffic"]


def kill_report(run: Run, k: Kill, ev: Events) -> dict[str, Any]:
    window = [f for f in ev.failures if k.at <= f["t"] < k.until]
    errors = {kind: sum(1 for f in window if f["kind"] == kind) for kind in KINDS}
    traffic_at = k.at
    last_fail: dict[tuple[str, str, str], float] = {}
    for f in window:
        last_fail[key(f)] = max(last_fail.get(key(f), 0.0), f["t"])
    unrecovered = []
    for kk, t in sorted(last_fail.items()):
        back = [r["t"] for r in ev.recovered if key(r) == kk and r["t"] >= t]
        if back:
            traffic_at = max(traffic_at, min(back))
        else:
            unrecovered.append("→".join(kk))
    back_s = None if k.back_at is None else k.back_at - k.at
    traffic_s = None if unrecovered else traffic_at - k.at
    recovery = None if back_s is None or traffic_s is None else max(back_s, traffic_s)
    return {
        "n": k.n, "component": k.component, "at_s": round(k.at - run.t0, 1), "pid": k.pid, "new_pid": k.new_pid,
        "restarted_s": None if k.restarted_at is None else round(k.restarted_at - k.at, 2),
        "back_s": None if back_s is None else round(back_s, 2),
        "traffic_s": None if traffic_s is None else round(traffic_s, 2),
        "recovery_s": None if recovery is None else round(recovery, 2),
        "recovered": recovery is not None, "errors": errors, "errors_total": sum(errors.values()),
        "flows_failed": sorted("→".join(kk) for kk in last_fail), "flows_not_recovered": unrecovered,
        "window_s": round(k.until - k.at, 1),
    }  # fmt: skip


def over_time(run: Run, ev: Events, bucket: float) -> list[dict[str, Any]]:
    n = max(1, int((run.t_end - run.t0) // bucket) + 1)
    rows: list[dict[str, Any]] = [{"from_s": round(i * bucket, 1), "to_s": round(min((i + 1) * bucket, run.t_end - run.t0), 1),
             "http_ok": 0, "conn_ok": 0, "stream_kib": 0.0, "kills": [], **dict.fromkeys(KINDS, 0)}
            for i in range(n)]  # fmt: skip

    def at(t: float) -> dict[str, Any] | None:
        i = int((t - run.t0) // bucket)
        return rows[i] if 0 <= i < n else None

    for t, _, counts in ev.ticks:
        if (r := at(t)) is not None:
            r["http_ok"] += counts.get("http_ok", 0)
            r["conn_ok"] += counts.get("conn_ok", 0)
            r["stream_kib"] += counts.get("stream_bytes", 0) / KIB
    for f in ev.failures:
        if (r := at(f["t"])) is not None:
            r[f["kind"]] += 1
    for k in run.kills:
        if (r := at(k.at)) is not None:
            r["kills"].append(k.component)
    for r in rows:
        r["stream_kib"] = round(r["stream_kib"], 1)
    return rows


def process_report(run: Run) -> list[dict[str, Any]]:
    by: dict[tuple[str, int], list[Sample]] = defaultdict(list)
    for s in run.samples:
        by[(s.process, s.pid)].append(s)
    out = []
    for (name, pid), ss in sorted(by.items(), key=lambda kv: (SAMPLED.index(kv[0][0]), kv[1][0].t)):
        out.append({
            "process": name, "pid": pid, "samples": len(ss),
            "from_s": round(ss[0].t - run.t0, 1), "to_s": round(ss[-1].t - run.t0, 1),
            "rss_mib": {"start": round(ss[0].rss_kib / KIB, 1), "max": round(max(s.rss_kib for s in ss) / KIB, 1),
                        "end": round(ss[-1].rss_kib / KIB, 1)},
            "fds": {"start": ss[0].fds, "max": max(s.fds for s in ss), "end": ss[-1].fds},
        })  # fmt: skip
    return out


def socket_report(run: Run) -> list[dict[str, Any]]:
    by: dict[str, list[PodSockets]] = defaultdict(list)
    for s in run.sockets:
        by[s.pod].append(s)
    return [{"pod": f"{NAMESPACE}/{pod}", "samples": len(ss),
             "open": {"start": ss[0].open, "max": max(s.open for s in ss), "end": ss[-1].open},
             "established": {"start": ss[0].established, "max": max(s.established for s in ss),
                             "end": ss[-1].established},
             "close_wait_max": max(s.close_wait for s in ss), "time_wait_max": max(s.time_wait for s in ss)}
            for pod, ss in by.items()]  # fmt: skip


def machine() -> dict[str, Any]:
    def git(*a: str) -> str:
        p = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True)
        return p.stdout.strip()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")  # fmt: skip
    return {"cores": os.cpu_count(), "cpu": cpu, "loadavg": os.getloadavg(), "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain"))}  # fmt: skip


def build_report(run: Run, args: argparse.Namespace, argv: list[str], host: dict[str, Any]) -> dict[str, Any]:
    ev = read_events(run)
    ok: Counter[str] = Counter()
    for _, _, counts in ev.ticks:
        ok.update(counts)
    before = [f for f in ev.failures if f["t"] < (run.kills[0].at if run.kills else run.t_end)]
    lived = [s["lived_s"] for s in ev.streams]
    return {
        "command": shlex.join(["python", "benchmarks/soak.py", *argv]),
        "run_id": run.state_dir.name if run.state_dir else None,
        "work_dir": str(run.work),
        "started": dt.datetime.fromtimestamp(run.t0, dt.UTC).isoformat(timespec="seconds"),
        "duration_s": round(run.t_end - run.t0, 1),
        "machine": {**host, "loadavg_end": os.getloadavg()},
        "config": {"duration": args.duration, "kill_interval": args.kill_interval,
                   "sample_interval": args.sample_interval, "http_rate": args.http_rate,
                   "conn_rate": args.conn_rate, "streams": args.streams, "stream_rate": args.stream_rate,
                   "clients": list(CLIENTS), "servers": list(SERVERS)},
        "ok_total": {"http": ok["http_ok"], "conn": ok["conn_ok"], "stream_mib": round(ok["stream_bytes"] / KIB / KIB, 1)},
        "errors_total": {kind: sum(1 for f in ev.failures if f["kind"] == kind) for kind in KINDS},
        "errors_before_first_kill": {kind: sum(1 for f in before if f["kind"] == kind) for kind in KINDS},
        "errors_by_traffic": {t: {kind: sum(1 for f in ev.failures if f["kind"] == kind and f["traffic"] == t)
                                  for kind in KINDS} for t in TRAFFIC},
        "kills": [kill_report(run, k, ev) for k in run.kills],
        "errors_over_time": over_time(run, ev, args.bucket),
        "processes": process_report(run),
        "pod_sockets": socket_report(run),
        "streams": {"ended": len(ev.streams), "ended_by": dict(Counter(s.get("end", "?") for s in ev.streams)),
                    "lived_s_median": round(statistics.median(lived), 1) if lived else None},
        "samples": [{**asdict(s), "t": round(s.t - run.t0, 1)} for s in run.samples],
        "socket_samples": [{**asdict(s), "t": round(s.t - run.t0, 1)} for s in run.sockets],
        "failures_sample": [dict(f) for f in ev.failures[:200]],
    }  # fmt: skip


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def paths(flows: list[str]) -> str:
    """client→server pairs of ``client→server→traffic`` flows."""
    return ", ".join(sorted({f.rsplit("→", 1)[0] for f in flows})) or "—"


def markdown(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["config"]
    out = [
        f"command: `{r['command']}` (as root) · commit {m['commit']}{' + uncommitted changes' if m['dirty'] else ''}",
        f"started {r['started']} · ran {r['duration_s']:.0f} s · {m['cores']} cores ({m['cpu']}), shared · load average "
        f"{m['loadavg'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end",
        f"traffic: {len(c['clients'])} client pods x {len(c['servers'])} servers, each client to the server on its "
        "node and on the other (cli-a, srv-a on node-a; cli-b, srv-b on node-b), per client and server: "
        f"HTTP {c['http_rate']:g}/s and new TCP connections {c['conn_rate']:g}/s (each a new connection), "
        f"{c['streams']} long-lived echo streams of {c['stream_rate'] * 4:g} KiB/s",
        f"succeeded: {r['ok_total']['http']:,} HTTP requests, {r['ok_total']['conn']:,} TCP connections, "
        f"{r['ok_total']['stream_mib']:,} MiB echoed on streams; streams ended: "
        + (", ".join(f"{n} by {why}" for why, n in sorted(r["streams"]["ended_by"].items())) or "none"),
        "",
        "Kills (SIGKILL; the supervisor restarts the process). *restarted*: a new process is recorded; "
        "*back*: it serves (ztunnel ready; cni agent answering with ztunnel reconnected to it; control plane "
        "feeding both ztunnels); *traffic*: new requests succeed again on every flow that failed; "
        "*recovery* = the later of the two. Errors: from the kill to the next one.",
        "",
        "| # | at s | killed | restarted s | back s | traffic s | recovery s | errors | by kind | paths that failed |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for k in r["kills"]:
        kinds = ", ".join(f"{n} {kind}" for kind, n in k["errors"].items() if n) or "—"
        rec = fmt(k["recovery_s"]) if k["recovered"] else "**not recovered**"
        out.append(f"| {k['n']} | {k['at_s']:.0f} | {k['component']} | {fmt(k['restarted_s'])} | {fmt(k['back_s'])} "
                   f"| {fmt(k['traffic_s'])} | {rec} | {k['errors_total']} | {kinds} | {paths(k['flows_failed'])} |")  # fmt: skip
    b = r["errors_before_first_kill"]
    out.append(f"\nErrors before the first kill: {sum(b.values())}. Totals: "
               + ", ".join(f"{kind} {n}" for kind, n in r["errors_total"].items()))  # fmt: skip
    out += ["", "Errors over time:", "",
            "| from s | kills | HTTP ok | conn ok | stream KiB | " + " | ".join(KINDS) + " |",
            "|---:|---|---:|---:|---:|" + "---:|" * len(KINDS)]  # fmt: skip
    for row in r["errors_over_time"]:
        out.append(f"| {row['from_s']:.0f} | {', '.join(row['kills']) or ''} | {row['http_ok']} | {row['conn_ok']} "
                   f"| {row['stream_kib']:.0f} | " + " | ".join(str(row[k]) for k in KINDS) + " |")  # fmt: skip
    out += ["", "Processes (RSS MiB and open fds from /proc; one row per process: a restart is a new row):", "",
            "| process | pid | sampled s | RSS start | RSS max | RSS end | fds start | fds max | fds end |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in r["processes"]:
        rss, fds = p["rss_mib"], p["fds"]
        out.append(f"| {p['process']} | {p['pid']} | {p['from_s']:.0f}-{p['to_s']:.0f} | {rss['start']} | {rss['max']} "
                   f"| {rss['end']} | {fds['start']} | {fds['max']} | {fds['end']} |")  # fmt: skip
    out += ["", "TCP sockets in each pod's netns, the app's and ztunnel's (open: all but TIME_WAIT):", "",
            "| pod | open start | max | end | ESTABLISHED start | max | end | CLOSE_WAIT max | TIME_WAIT max |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for s in r["pod_sockets"]:
        t, e = s["open"], s["established"]
        out.append(f"| {s['pod']} | {t['start']} | {t['max']} | {t['end']} | {e['start']} | {e['max']} | {e['end']} "
                   f"| {s['close_wait_max']} | {s['time_wait_max']} |")  # fmt: skip
    return "\n".join(out) + "\n"


# -- main ---------------------------------------------------------------------------------------------


def leftovers(run: Run) -> list[str]:
    """What of the run is still there after ``mesh down``: its netns and live processes."""
    if run.state_dir is None:
        return []
    prefix = f"ambd-{run.state_dir.name}-"
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    left = [line.split()[0] for line in p.stdout.splitlines() if line.startswith(prefix)]
    left += [f"client {c} pid {p.pid}" for c, p in run.clients.items() if p.poll() is None]
    return left


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of traffic (default 1800)")
    p.add_argument("--kill-interval", type=float, default=120.0, help="seconds between kills (default 120)")
    p.add_argument("--sample-interval", type=float, default=10.0, help="seconds between RSS/fd samples")
    p.add_argument("--bucket", type=float, default=60.0, help="seconds per row of the errors-over-time table")
    p.add_argument("--quick", action="store_true",
                   help="150 s, a kill every 30 s (4 kills: ztunnel, agent, control plane, ztunnel)")  # fmt: skip
    p.add_argument("--http-rate", type=float, default=5.0, help="HTTP requests/s per client and server")
    p.add_argument("--conn-rate", type=float, default=5.0, help="new TCP connections/s per client and server")
    p.add_argument("--streams", type=int, default=2, help="long-lived streams per client and server")
    p.add_argument("--stream-rate", type=float, default=8.0, help="4 KiB chunks/s per stream")
    p.add_argument("--output", type=Path, help="write the markdown report here (default: stdout)")
    p.add_argument("--json", type=Path, help="write every figure as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (client event logs)")
    p.add_argument(
        "--report-from", type=Path, metavar="JSON", help="only print the markdown of a --json file"
    )
    p.add_argument("--run-root", type=Path,
                   help="AMBIENT_DEMO_RUN_ROOT of the mesh (default: inside the work directory); "
                        "`ambientctl mesh down --all` with it set removes what a killed run left")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.kill_interval, args.sample_interval, args.bucket = 150.0, 30.0, 2.0, 15.0
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.report_from:
        sys.stdout.write(markdown(json.loads(args.report_from.read_text())))
        return 0
    if os.geteuid() != 0:
        say("soak: builds network namespaces and nftables rules through ambientctl mesh up: run it as root")
        return 2
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    work.chmod(0o755)  # the pods' commands (nobody) read the scripts
    env = dict(os.environ, AMBIENT_DEMO_RUN_ROOT=str((args.run_root or work / "runs").resolve()))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    run = Run(work, env)
    host = machine()
    rc = 0
    try:
        with signals_interrupt():
            try:
                start_mesh(run)
                start_clients(run, args)
                soak(run, args)
            finally:
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(s, signal.SIG_IGN)
                stop_clients(run)
                say("mesh down")
                run.find_state_dir()  # also when mesh up was interrupted
                if run.state_dir is not None and run.ambientctl(
                    "mesh", "down", "--run", run.state_dir.name, log="mesh-down.log", timeout=120
                ):
                    say(f"mesh down reported problems: {work / 'mesh-down.log'}")
                    rc = 1
                left = leftovers(run)
                if left:
                    say(f"left after mesh down: {', '.join(left)}")
                    rc = 1
        report = build_report(run, args, argv, host)
    except Interrupted as e:
        say(f"interrupted ({e}); the mesh is down")
        return 130
    except RuntimeError as e:
        say(f"soak failed: {e}")
        return 1
    finally:
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(report)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
