"""The local mesh's waypoint supervisor: Gateways in the file become running waypoints and go away.

Pure parts first (what the file asks for, what to stop and start), then on a real mesh left by
``ambientctl demo --keep`` — the supported way to get a running local mesh — the edits a user
makes to its ``mesh.yaml``: a Gateway added starts a waypoint in a netns of its own, removed it
stops and the netns goes; a malformed file changes nothing; the supervisor killed outright takes
its waypoints with it and ``ambientctl demo down`` leaves nothing. Every wait polls a condition
with a deadline; the module's mesh is removed, and checked gone, whatever happens.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ambientctl.localmesh import spec
from ambientctl.localmesh.procs import http_get, http_json, pause, read_json_lines
from ambientctl.localmesh.state import RunState, netns_names, proc_starttime
from ambientctl.localmesh.supervisor import PROC_NAME, Want, desired, read_status, reconcile
from sources.convert import ConfigError

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")

GATEWAY = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: {name}
  namespace: shop{annotations}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {{name: mesh, port: 15008, protocol: HBONE}}
"""


def gateway(name: str, node: str | None = None) -> str:
    ann = f"\n  annotations: {{ambient-mesh.io/node: {node}}}" if node else ""
    return GATEWAY.format(name=name, annotations=ann)


def base(*docs: str) -> str:
    return "---\n".join([spec.local_config(), *docs])


# -- pure: the file -> what should run -> what to do -------------------------------------------------


def test_desired_places_as_the_control_plane_does() -> None:
    wants, unplaced = desired(base(gateway("waypoint", "node-b"), gateway("extra")), "mesh.yaml")
    assert wants == {
        "shop/waypoint": Want("shop", "waypoint", "waypoint-0", "node-b", "10.0.2.254"),
        # No annotation: the first node by name with a podCIDR, its highest free address.
        "shop/extra": Want("shop", "extra", "extra-0", "node-a", "10.0.1.254"),
    }
    assert unplaced == []


def test_desired_reports_what_cannot_be_placed() -> None:
    wants, unplaced = desired(base(gateway("lost", "node-z")), "mesh.yaml")
    assert wants == {}
    assert [u.gateway.key for u in unplaced] == ["shop/lost"]
    assert "node-z" in unplaced[0].reason


def test_desired_refuses_a_malformed_file() -> None:
    with pytest.raises(ConfigError):
        desired(base(gateway("waypoint")) + "---\nkind: [\n", "mesh.yaml")


def test_reconcile() -> None:
    a = Want("shop", "a", "a-0", "node-a", "10.0.1.254")
    b = Want("shop", "b", "b-0", "node-a", "10.0.1.253")
    moved = Want("shop", "a", "a-0", "node-b", "10.0.2.254")
    assert reconcile({"shop/a": a}, {}) == ([], [a])
    assert reconcile({"shop/a": a}, {"shop/a": a}) == ([], [])
    assert reconcile({}, {"shop/a": a, "shop/b": b}) == (["shop/a", "shop/b"], [])
    # A placement change is a stop, then a start of the new pod.
    assert reconcile({"shop/a": moved, "shop/b": b}, {"shop/a": a}) == (["shop/a"], [moved, b])


# -- on a kept demo mesh ---------------------------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "tcpdump", "nsenter")),
    reason="needs root, ip, nft, tcpdump, nsenter",
)
START = 60.0  # generous: CI is a loaded 2-core box (by hand it takes 1-2 s)


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = START) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        pause(0.05)


def ctl(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ambientctl.main", "demo", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )  # fmt: skip


@dataclass
class Kept:
    rid: str
    run: Path
    env: dict[str, str]

    @property
    def mesh_file(self) -> Path:
        return self.run / "mesh.yaml"

    def edit(self, text: str) -> None:
        """Replace mesh.yaml as an editor does (write aside, rename)."""
        tmp = self.run / "mesh.yaml.edit"
        tmp.write_text(text)
        os.replace(tmp, self.mesh_file)

    def waypoints(self) -> dict[str, Any]:
        w = read_status(self.run).get("waypoints", {})
        return w if isinstance(w, dict) else {}

    def log(self) -> list[str]:
        return [str(r.get("event")) for r in read_json_lines(self.run / "logs" / "supervisor.log")]

    def wait_log(self, line: str, after: int) -> None:
        wait_until(f"supervisor log line {line!r}", lambda: True if line in self.log()[after:] else None)

    def netns(self) -> list[str]:
        return [n for n in netns_names() if n.startswith(f"ambd-{self.rid}-")]


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kept]:
    root = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, AMBIENT_DEMO_RUN_ROOT=str(root))
    p = ctl("--keep", env=env)
    m = re.search(r"\(run ([0-9a-f]+)\)", p.stdout)
    try:
        assert p.returncode == 0 and m, p.stdout + p.stderr
        yield Kept(m.group(1), root / m.group(1), env)
    finally:
        ctl("down", env=env)
        if m:
            left = [n for n in netns_names() if n.startswith(f"ambd-{m.group(1)}-")]
            assert not left, f"netns left behind: {left}"
        assert str(root) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def alive(pid: int) -> bool:
    st = proc_starttime(pid)
    return st is not None


@pytest.mark.netns
@pytest.mark.slow
@needs_root
def test_added_gateway_starts_a_waypoint_removed_it_stops(kept: Kept) -> None:
    # The demo's own waypoint runs; a second Gateway is added to the file, as a user would.
    assert kept.waypoints()["shop/waypoint"]["phase"] == "ready"
    before = kept.mesh_file.read_text()
    mark = len(kept.log())
    edited = time.monotonic()
    kept.edit(before + "---\n" + gateway("extra", "node-a"))
    st = wait_until("shop/extra ready", lambda: _ready(kept, "shop/extra"))
    took = time.monotonic() - edited
    print(f"shop/extra ready {took:.1f} s after the edit")
    assert (st["node"], st["ip"], st["pod"]) == ("node-a", "10.0.1.254", "shop/extra-0")
    assert st["netns"] == f"ambd-{kept.rid}-wp-shop-extra-0" and st["netns"] in kept.netns()
    # Its pod netns is on node-a's bridge with the placed address.
    addr = subprocess.run(
        ["ip", "-n", st["netns"], "-4", "-o", "addr", "show", "eth0"], capture_output=True, text=True
    )
    assert "10.0.1.254/24" in addr.stdout
    pid = int(st["pid"])
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert (
        b"--gateway" in cmdline
        and b"shop/extra" in cmdline
        and b"/var/run/netns/" + st["netns"].encode() in cmdline
    )
    assert http_get(f"http://127.0.0.1:{st['readiness_port']}/healthz/ready")[0] == 200
    dump = http_json(f"http://127.0.0.1:{st['admin_port']}/config_dump")
    assert dump["identity"] == "spiffe://cluster.local/ns/shop/sa/extra"  # its own account, nothing else
    assert [c["identity"] for c in dump["certificates"]] == ["spiffe://cluster.local/ns/shop/sa/extra"]
    kept.wait_log("waypoint shop/extra: started on node-a 10.0.1.254, ready", mark)
    state = RunState.load(kept.run / "supervisor")
    assert st["netns"] in state.netns and pid in [r.pid for r in state.procs]  # recorded for `demo down`

    # Removed from the file: the process stops, the netns goes, the record too.
    mark = len(kept.log())
    kept.edit(before)
    wait_until("shop/extra gone", lambda: True if "shop/extra" not in kept.waypoints() else None)
    wait_until("its process gone", lambda: True if not alive(pid) else None)
    assert st["netns"] not in kept.netns()
    kept.wait_log(f"waypoint shop/extra: stopped (exit status 0), netns {st['netns']} deleted", mark)
    state = RunState.load(kept.run / "supervisor")
    assert st["netns"] not in state.netns and pid not in [r.pid for r in state.procs]
    # The demo's own waypoint was never touched.
    assert kept.waypoints()["shop/waypoint"]["phase"] == "ready"


@pytest.mark.netns
@pytest.mark.slow
@needs_root
def test_malformed_file_changes_nothing(kept: Kept) -> None:
    good = kept.mesh_file.read_text()
    st = wait_until("shop/waypoint ready", lambda: _ready(kept, "shop/waypoint"))
    # An edit that deletes the Gateway *and* breaks the file: none of it applies.
    without = "---\n".join(d for d in good.split("---\n") if "kind: Gateway" not in d)
    mark = len(kept.log())
    kept.edit(without + "---\nkind: [\n")
    wait_until(
        "the supervisor refusing the file",
        lambda: True if any(e.startswith("mesh.yaml not applied: ") for e in kept.log()[mark:]) else None,
    )
    # status.json is rewritten at the end of the poll that logged it.
    wait_until("status.json naming the error", lambda: read_status(kept.run).get("config_error") or None)
    now = kept.waypoints()["shop/waypoint"]
    assert now["phase"] == "ready" and now["pid"] == st["pid"] and st["netns"] in kept.netns()
    # Fixed again (the Gateway still there): the same process keeps running.
    mark = len(kept.log())
    kept.edit(good)
    kept.wait_log("mesh.yaml is valid again", mark)
    wait_until(
        "status.json without error",
        lambda: True if read_status(kept.run).get("config_error") is None else None,
    )
    now = kept.waypoints()["shop/waypoint"]
    assert now["phase"] == "ready" and now["pid"] == st["pid"]


@pytest.mark.netns
@pytest.mark.slow
@needs_root
def test_supervisor_killed_takes_its_waypoints_and_down_leaves_nothing(kept: Kept) -> None:
    # Last in this module: it ends the kept mesh.
    st = wait_until("shop/waypoint ready", lambda: _ready(kept, "shop/waypoint"))
    main = RunState.load(kept.run)
    sup = next(r for r in main.procs if r.name == PROC_NAME)
    wp_pid = int(st["pid"])
    os.kill(sup.pid, signal.SIGKILL)
    wait_until("the supervisor gone", lambda: True if proc_starttime(sup.pid) != sup.starttime else None)
    # The kernel sends its waypoint SIGTERM (PR_SET_PDEATHSIG): no orphan keeps running.
    wait_until("its waypoint gone", lambda: True if not alive(wp_pid) else None)
    assert st["netns"] in kept.netns()  # left, but recorded: `demo down` removes it
    d = ctl("down", env=kept.env)
    assert d.returncode == 0, d.stdout + d.stderr
    assert kept.netns() == []
    assert not kept.run.exists()


def _ready(kept: Kept, key: str) -> dict[str, Any] | None:
    st = kept.waypoints().get(key)
    return st if isinstance(st, dict) and st.get("phase") == "ready" else None
