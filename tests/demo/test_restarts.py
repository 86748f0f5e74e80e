"""Restarts in the local mesh: ztunnel and the cni agent go away and come back with traffic flowing.

One mesh per module (``ambientctl.localmesh``: control plane, two nodes, pods enrolled through the
CNI plugin), the inter-node wire captured with tcpdump around each scenario. What must hold
(issue 6, "Fail closed"): while node-a's ztunnel is down an enrolled pod's TCP is refused inside
the pod and nothing of it reaches the wire; a new ztunnel process gets the pods from the agent's
ZDS snapshot and service resumes over HBONE (:15008, TLS only) without re-creating any pod; a cni
agent restart leaves the redirection rules byte-identical and open connections untouched.

Nothing here sleeps to wait: every wait is on a ready file, ``/healthz/ready`` and
``/config_dump``, a log record, a capture's content or a connection's result, with a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from ambientctl.localmesh import spec
from ambientctl.localmesh.capture import Capture, CaptureError, Flow, read_flows
from ambientctl.localmesh.mesh import LocalMesh
from ambientctl.localmesh.procs import pause, read_json_lines
from ambientctl.localmesh.state import RunState, netns_names, teardown
from ambientctl.localmesh.topology import WIRE

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "tcpdump", "nsenter")),
        reason="needs root, ip, nft, tcpdump, nsenter",
    ),
]

T = TypeVar("T")
NODE = "node-a"
SRC = "shop/frontend"  # enrolled, on node-a
SRC_IP = spec.pod(SRC).ip
DST = spec.pod("shop/web")  # enrolled, on node-b: its traffic crosses the wire
LEGACY = "legacy/old"  # not enrolled, on node-a: plaintext on the wire (the capture's control)
POD_URL = f"http://{DST.ip}:{spec.APP_PORT}/order"
VIP_URL = f"http://{spec.WEB_VIP}:80/order"
ECHO_PORT = 9000
HBONE = 15008


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        pause(0.05)


# -- the mesh ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    st = RunState.create(tmp_path_factory.mktemp("runs"))
    m = LocalMesh(st, lambda msg: print(msg, flush=True))
    try:
        m.build()
        yield m
    finally:
        if m.capture is not None:
            m.capture.stop()
        errors = teardown(st)
        for proc, _ in m.procs.running.values():
            proc.poll()  # reaped by teardown: let Popen know (ECHILD), or it warns it still runs
        left = [n for n in netns_names() if n.startswith(st.prefix)]
        assert not errors and not left, (errors, left)


@pytest.fixture(autouse=True)
def healthy(mesh: LocalMesh) -> None:
    """Each scenario starts from a serving mesh, even if an earlier one failed half way."""
    for node, np in mesh.nodes.items():
        if mesh.procs.running[np.agent][0].poll() is not None:
            mesh.start_agent(node)
        if mesh.procs.running[np.ztunnel][0].poll() is not None:
            mesh.start_ztunnel(node)


def get(mesh: LocalMesh, src: str, url: str, marker: str, timeout: float = 5.0) -> dict[str, Any]:
    """One HTTP request from inside pod ``src`` (the demo's client): its JSON outcome."""
    r = subprocess.run(
        mesh.exec_argv(src, [sys.executable, "-m", "ambientctl.localmesh.app", "get", url, "--marker", marker,
                             "--timeout", str(timeout)]),
        capture_output=True, text=True, timeout=timeout + 20,
    )  # fmt: skip
    lines = r.stdout.strip().splitlines()
    assert lines, f"client exit {r.returncode}: {r.stderr}"
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def log_records(mesh: LocalMesh, proc: str, event: str) -> list[dict[str, Any]]:
    return [r for r in read_json_lines(mesh.state.path / "logs" / f"{proc}.log") if r.get("event") == event]


def outbound_record(mesh: LocalMesh, local: str) -> dict[str, Any]:
    """node-a ztunnel's access-log record of the connection from ``local`` (written when it closes)."""

    def probe() -> dict[str, Any] | None:
        for r in log_records(mesh, f"ztunnel-{NODE}", "connection complete"):
            if r.get("direction") == "outbound" and r.get("src_addr") == local:
                return r
        return None

    return wait_until(f"outbound access-log record for {local}", probe)


def redirection(mesh: LocalMesh, pod: str) -> dict[str, str]:
    """The pod's redirection state as the kernel has it: nft table (with handles), ip rules, table 133."""
    out = {}
    for what, argv in {
        "nft": ["nft", "-j", "list", "table", "inet", "istio-ambient"],
        "rules": ["ip", "-j", "rule", "show"],
        "table 133": ["ip", "-j", "route", "show", "table", "133"],
    }.items():
        r = subprocess.run(mesh.exec_argv(pod, argv), capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        out[what] = r.stdout
    return out


ENROLLED_A = [p.key for p in spec.PODS if p.node == NODE and spec.NAMESPACES[p.namespace]]


# -- the wire ---------------------------------------------------------------------------------------


@dataclass
class Wire:
    pcap: Path

    def flows(self) -> list[Flow]:
        try:
            return read_flows(self.pcap)
        except (OSError, ValueError, IndexError, struct.error, CaptureError):  # a packet half written
            return []

    def wait(self, what: str, pred: Callable[[list[Flow]], bool], timeout: float = 10.0) -> list[Flow]:
        return wait_until(what, lambda: f if pred(f := self.flows()) else None, timeout)


@contextmanager
def wire_capture(mesh: LocalMesh, name: str) -> Iterator[Wire]:
    """tcpdump on the inter-node wire (in node-a's netns) for the duration of the block."""
    pcap = mesh.state.path / f"{name}.pcap"
    cap = Capture(mesh.topo.nodes[NODE].netns, WIRE, pcap)
    mesh.state.add_proc(f"tcpdump-{name}", cap.start())
    mesh.capture = cap
    try:
        yield Wire(pcap)
    finally:
        cap.stop()
        mesh.capture = None


def assert_no_plaintext(flows: list[Flow], marker: str) -> None:
    """The enrolled client's bytes crossed the wire only as TLS to :15008; the marker never did."""
    for f in flows:
        assert not f.contains(marker.encode()), f"marker {marker} on the wire in {f.client} -> {f.server}"
        if SRC_IP in (f.client[0], f.server[0]):
            assert HBONE in (f.client[1], f.server[1]), f"enrolled pod's {f.client} -> {f.server} not HBONE"
            _, tls_only = f.tls_records()
            assert tls_only, f"non-TLS bytes in {f.client} -> {f.server}"


def hbone_flow(f: Flow) -> bool:
    return f.client[0] == SRC_IP and f.server == (DST.ip, HBONE) and f.payload > 0


def control_flow(mesh: LocalMesh, wire: Wire, marker: str) -> None:
    """A plaintext request from the non-enrolled pod: proves the capture sees what crosses the wire."""
    out = get(mesh, LEGACY, POD_URL, marker)
    assert out.get("status") == 200, out
    wire.wait(
        f"the control marker {marker} in the capture", lambda fl: any(f.contains(marker.encode()) for f in fl)
    )


# -- clients that keep running inside a pod ---------------------------------------------------------


class PodProcess:
    """A python script inside a pod netns; its stdout lines arrive on a queue (read by a thread)."""

    def __init__(self, mesh: LocalMesh, pod: str, name: str, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            mesh.exec_argv(pod, [sys.executable, "-u", "-c", script, *args, str(mesh.state.path)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        mesh.state.add_proc(name, self.proc.pid)
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, out: IO[str]) -> None:
        with out:  # until EOF: the process exited
            for line in out:
                self.lines.put(line.rstrip("\n"))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def line(self, timeout: float = 10.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout:.0f} s (exit {self.proc.poll()})") from None

    def close(self, timeout: float = 15.0) -> int:
        """EOF on stdin (the scripts' signal to finish), then wait; killed if it does not exit."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("pod process did not finish on EOF") from None


ECHO_SERVER = """
import os, socket, sys, threading
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
def echo(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write("listening\\n")
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
while True:
    threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
"""

# One TCP connection held open: each stdin line is sent and its echo printed; EOF closes it.
HOLD_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected %s:%d" % s.getsockname()[:2], flush=True)
f = s.makefile("rb")
for line in sys.stdin:
    s.sendall(line.encode())
    print("echo " + f.readline().decode().strip(), flush=True)
s.close()
print("closed", flush=True)
"""

# New connections back to back (one request each) until stdin reaches EOF; a JSON line per attempt.
LOOP_CLIENT = """
import http.client, json, select, sys, time
url_host, url_port, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
while True:
    out = {"t": time.monotonic()}
    conn = http.client.HTTPConnection(url_host, url_port, timeout=3)
    try:
        conn.connect()
        out["local"] = "%s:%d" % conn.sock.getsockname()[:2]
        conn.request("GET", "/order", headers={"X-Order": marker})
        r = conn.getresponse()
        r.read()
        out["status"] = r.status
    except (OSError, http.client.HTTPException) as e:
        out.update(status=0, error="%s: %s" % (type(e).__name__, e))
    finally:
        conn.close()
    print(json.dumps(out), flush=True)
    # Pace the attempts (~50/s) and stop as soon as the test closes stdin.
    if select.select([sys.stdin], [], [], 0.02)[0]:
        break
"""


@dataclass
class Loop:
    proc: PodProcess
    results: list[dict[str, Any]] = field(default_factory=list)

    def drain(self) -> list[dict[str, Any]]:
        while True:
            try:
                line = self.proc.lines.get_nowait()
            except queue.Empty:
                return self.results
            if line.startswith("{"):
                self.results.append(json.loads(line))

    def wait(self, what: str, since: int, pred: Callable[[dict[str, Any]], bool], n: int = 3) -> int:
        """Until ``n`` results after index ``since`` satisfy ``pred``; the index after the n-th."""

        def probe() -> int | None:
            hits = [i for i, r in enumerate(self.drain()) if i >= since and pred(r)]
            return hits[n - 1] + 1 if len(hits) >= n else None

        return wait_until(f"{n} x {what} (results: {self.results[since:][-5:]})", probe, 30.0)


def ok(r: dict[str, Any]) -> bool:
    return r.get("status") == 200


def refused(r: dict[str, Any]) -> bool:
    return r.get("status") == 0


# -- the scenarios ----------------------------------------------------------------------------------


def test_ztunnel_down_fails_closed_then_a_new_ztunnel_restores_service(mesh: LocalMesh) -> None:
    agent, zt = mesh.nodes[NODE].agent, mesh.nodes[NODE].ztunnel
    pods_before = {k: os.stat(p.netns_path).st_ino for k, p in mesh.pods.items()}
    snapshots = len(log_records(mesh, agent, "zds: snapshot sent"))
    assert get(mesh, SRC, POD_URL, "warm-up").get("status") == 200

    mesh.stop(zt, signal.SIGKILL)
    leak, control = "LEAK-CHECK-ZTUNNEL-DOWN-7311", "CONTROL-ZTUNNEL-DOWN-7311"
    with wire_capture(mesh, "ztunnel-down") as wire:
        for url in (POD_URL, VIP_URL):
            out = get(mesh, SRC, url, leak, timeout=3)
            # Refused inside the pod: the connection was never established.
            assert out.get("status") == 0 and "local" not in out, out
            assert "Refused" in out.get("error", "") or "timed out" in out.get("error", ""), out
        control_flow(mesh, wire, control)
    flows = wire.flows()
    # Nothing of the refused attempts: at most the last packets (FIN/RST) of the killed ztunnel's
    # HBONE connection, if node-b's side closed it only once the capture was running.
    assert_no_plaintext(flows, leak)
    assert not [f for f in flows if SRC_IP in (f.client[0], f.server[0]) and f.payload], (
        "enrolled pod's bytes on the wire while ztunnel is down"
    )
    assert {f.client[0] for f in flows if f.server[1] == spec.APP_PORT} == {spec.pod(LEGACY).ip}

    # A new ztunnel process: the agent hands it every enrolled pod again (ZDS snapshot).
    mesh.start_ztunnel(NODE)  # returns once it serves both pods again (config_dump, /healthz/ready)
    sent = wait_until(
        "agent sent a new snapshot",
        lambda: log_records(mesh, agent, "zds: snapshot sent")[snapshots:] or None,
    )
    assert sent[-1]["pods"] == len(ENROLLED_A), sent
    marker = "SECRET-AFTER-RESTART-7311"
    with wire_capture(mesh, "ztunnel-back") as wire:
        out = get(mesh, SRC, POD_URL, marker)
        assert out.get("status") == 200 and f"hello from {DST.key}" in out.get("body", ""), out
        rec = outbound_record(mesh, out["local"])
        wire.wait("an HBONE flow from the enrolled pod", lambda fl: any(hbone_flow(f) for f in fl))
    flows = wire.flows()  # complete: tcpdump flushed on stop
    assert rec["security"] == "mutual_tls", rec
    assert rec["dst_identity"] == DST.identity() and rec["src_identity"] == spec.pod(SRC).identity(), rec
    assert_no_plaintext(flows, marker)
    # Not re-created: the same network namespace for every pod.
    assert {k: os.stat(p.netns_path).st_ino for k, p in mesh.pods.items()} == pods_before


def test_agent_restart_keeps_connections_and_rules(mesh: LocalMesh) -> None:
    agent = mesh.nodes[NODE].agent
    echo_ready = mesh.state.path / "echo.ready"
    mesh.procs.start(
        "echo-shop-web",
        mesh.exec_argv(DST.key, [sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT), str(echo_ready)]),
    )
    mesh.procs.wait_file("echo-shop-web", echo_ready)
    rules_before = {p: redirection(mesh, p) for p in ENROLLED_A}
    snapshots = len(log_records(mesh, agent, "zds: snapshot sent"))

    held = PodProcess(mesh, SRC, "hold-client", HOLD_CLIENT, DST.ip, str(ECHO_PORT))
    try:
        first = held.line()
        assert first.startswith("connected "), first
        local = first.split()[1]
        held.send("ping-1")
        assert held.line() == "echo ping-1"

        assert mesh.stop(agent, signal.SIGKILL) == -signal.SIGKILL
        held.send("ping-2")  # agent gone: the connection goes on, ztunnel still serves the pod
        assert held.line() == "echo ping-2"
        assert get(mesh, SRC, POD_URL, "agent-down").get("status") == 200

        mesh.start_agent(NODE)
        # The new agent reconciled (rules already right: untouched) and ztunnel got its snapshot.
        wait_until(
            "snapshot from the new agent",
            lambda: len(log_records(mesh, agent, "zds: snapshot sent")) > snapshots or None,
        )
        held.send("ping-3")
        assert held.line() == "echo ping-3"
        assert {p: redirection(mesh, p) for p in ENROLLED_A} == rules_before
        out = get(mesh, SRC, POD_URL, "after-agent-restart")
        assert out.get("status") == 200, out
        assert outbound_record(mesh, out["local"])["security"] == "mutual_tls"
    finally:
        held.close()
    # One connection from before the kill to after the restart, through ztunnel with mTLS.
    rec = outbound_record(mesh, local)
    assert rec["security"] == "mutual_tls" and rec["result"] == "ok", rec
    assert rec["bytes_sent"] == rec["bytes_recv"] == 3 * len("ping-1\n"), rec
    assert {p: redirection(mesh, p) for p in ENROLLED_A} == rules_before  # and still, later


def test_connections_during_a_ztunnel_restart_never_leak(mesh: LocalMesh) -> None:
    zt = mesh.nodes[NODE].ztunnel
    marker = "SECRET-DURING-RESTART-5150"
    with wire_capture(mesh, "restart") as wire:
        loop = Loop(PodProcess(mesh, SRC, "loop-client", LOOP_CLIENT, DST.ip, str(spec.APP_PORT), marker))
        try:
            up = loop.wait("request through the mesh", 0, ok)
            assert mesh.stop(zt, signal.SIGTERM) == 0  # graceful: drains, then exits 0
            down = loop.wait("refused while ztunnel is down", up, refused)
            mesh.start_ztunnel(NODE)
            back = loop.wait("request after the restart", down, ok)
        finally:
            assert loop.proc.close() == 0
        results = loop.drain()
        rec = outbound_record(mesh, results[back - 1]["local"])  # a request after the restart
    flows = wire.flows()
    assert rec["security"] == "mutual_tls", rec
    assert all(ok(r) or refused(r) for r in results), [r for r in results if not (ok(r) or refused(r))]
    assert any(ok(r) for r in results[down:]), results[down:]
    assert_no_plaintext(flows, marker)
    assert not [f for f in flows if f.server[1] == spec.APP_PORT], "plaintext to the app port on the wire"
    assert any(hbone_flow(f) for f in flows)
