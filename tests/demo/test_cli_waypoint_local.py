"""``ambientctl waypoint`` against a real running local mesh (``ambientctl demo --keep``), no flags.

What is checked is the production path end to end: ``apply`` edits the mesh's file (a user's
comment in it survives, the file is replaced, not rewritten in place), the control plane and
the waypoint supervisor pick the edit up, the supervisor starts the waypoint in a netns of its
own, and ``apply --wait`` returns once it is ready — ``list``/``status`` then say Programmed.
``delete`` removes the document and the supervisor stops the waypoint and deletes its netns.
Every ``ambientctl`` runs as a user runs it (a subprocess), the mesh found under the module's
own run root. Every wait polls a condition with a generous deadline; the module's mesh is
removed, and checked gone, whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from ambientctl.localmesh.procs import pause
from ambientctl.localmesh.state import netns_names
from ambientctl.localmesh.supervisor import read_status

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")
START = 120.0  # generous: CI is a loaded 2-core box (by hand a waypoint is ready in 1-2 s)
COMMENT = "# hand-written note: keep me\n"

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "tcpdump", "nsenter")),
        reason="needs root, ip, nft, tcpdump, nsenter",
    ),
]


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = START) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        pause(0.05)


@dataclass
class Kept:
    rid: str
    run: Path
    env: dict[str, str]

    @property
    def mesh_file(self) -> Path:
        return self.run / "mesh.yaml"

    def ctl(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ambientctl.main", *args],
            capture_output=True, text=True, timeout=timeout, env=self.env, cwd=REPO,
        )  # fmt: skip

    def waypoints(self) -> dict[str, Any]:
        w = read_status(self.run).get("waypoints", {})
        return w if isinstance(w, dict) else {}

    def netns(self) -> list[str]:
        return [n for n in netns_names() if n.startswith(f"ambd-{self.rid}-")]


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kept]:
    root = tmp_path_factory.mktemp("runs")
    env = dict(os.environ, AMBIENT_DEMO_RUN_ROOT=str(root))
    k = Kept("", root, env)
    p = k.ctl("demo", "--keep")
    m = re.search(r"\(run ([0-9a-f]+)\)", p.stdout)
    try:
        assert p.returncode == 0 and m, p.stdout + p.stderr
        k = Kept(m.group(1), root / m.group(1), env)
        # The user annotates the file, as people do (an editor's write-aside-and-rename).
        tmp = k.run / "mesh.yaml.edit"
        tmp.write_text(COMMENT + k.mesh_file.read_text())
        os.replace(tmp, k.mesh_file)
        yield k
    finally:
        k.ctl("demo", "down")
        if m:
            left = [n for n in netns_names() if n.startswith(f"ambd-{m.group(1)}-")]
            assert not left, f"netns left behind: {left}"
        assert str(root) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_list_and_status_show_the_demos_waypoint_programmed(kept: Kept) -> None:
    wait_until(
        "shop/waypoint ready",
        lambda: True if kept.waypoints().get("shop/waypoint", {}).get("phase") == "ready" else None,
    )
    p = kept.ctl("waypoint", "list", "-n", "shop")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "NAME         REVISION     TRAFFIC TYPE     PROGRAMMED",
        "waypoint     default      service          True",
    ]
    p = kept.ctl("waypoint", "status", "-A", "-o", "json")
    assert p.returncode == 0, p.stderr
    [row] = json.loads(p.stdout)
    assert row == {
        "namespace": "shop", "name": "waypoint", "status": "True", "type": "Programmed", "reason": "Programmed",
        "message": "pod shop/waypoint-0 on node-b 10.0.2.254 is ready",
    }  # fmt: skip


def test_apply_wait_until_the_supervisor_runs_it_then_delete(kept: Kept) -> None:
    inode = kept.mesh_file.stat().st_ino
    before = kept.mesh_file.read_text()
    p = kept.ctl(
        "waypoint",
        "apply",
        "-n",
        "shop",
        "--name",
        "extra",
        "--for",
        "all",
        "-w",
        "--waypoint-timeout",
        "300s",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "✅ waypoint shop/extra applied"
    assert lines[-1] == "✅ waypoint shop/extra is ready!"
    assert all(line.startswith("⏳ waiting for waypoint shop/extra to be Programmed") for line in lines[1:-1])
    # The file: the user's text as it was, one document appended; replaced atomically.
    text = kept.mesh_file.read_text()
    assert text.startswith(before) and text.startswith(COMMENT)
    assert kept.mesh_file.stat().st_ino != inode
    added = yaml.safe_load(text[len(before) :])
    assert added["metadata"] == {
        "name": "extra",
        "namespace": "shop",
        "labels": {"istio.io/waypoint-for": "all"},
    }
    # What --wait waited for is real: the supervisor runs it, ready, in a netns of its own.
    st = kept.waypoints()["shop/extra"]
    assert st["phase"] == "ready" and st["netns"] in kept.netns()
    pid = int(st["pid"])
    assert b"shop/extra" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")

    p = kept.ctl("waypoint", "list", "-n", "shop")
    assert p.returncode == 0 and p.stdout.splitlines()[1:] == [
        "extra        default      all              True",
        "waypoint     default      service          True",
    ], p.stdout
    p = kept.ctl("waypoint", "status", "-n", "shop")
    assert p.returncode == 0
    assert p.stdout.splitlines()[1].split(None, 5) == [
        "shop", "extra", "True", "Programmed", "Programmed", f"pod shop/extra-0 on {st['node']} {st['ip']} is ready",
    ]  # fmt: skip

    # Bad input changes nothing.
    same = kept.mesh_file.read_bytes()
    p = kept.ctl("waypoint", "apply", "-n", "shop", "--name", "extra", "--for", "pods")
    assert p.returncode == 1 and "--for 'pods'" in p.stderr
    p = kept.ctl("waypoint", "delete", "-n", "shop", "extra", "nope")
    assert p.returncode == 1 and "waypoint shop/nope not found" in p.stderr
    assert kept.mesh_file.read_bytes() == same

    p = kept.ctl("waypoint", "delete", "-n", "shop", "extra")
    assert (p.returncode, p.stdout) == (0, "waypoint shop/extra deleted\n"), p.stderr
    assert kept.mesh_file.read_text() == before
    wait_until(
        "the supervisor stops shop/extra", lambda: True if "shop/extra" not in kept.waypoints() else None
    )
    wait_until("its process gone", lambda: True if not Path(f"/proc/{pid}").exists() else None)
    assert st["netns"] not in kept.netns()
    assert kept.waypoints()["shop/waypoint"]["phase"] == "ready"  # the demo's own one untouched


def zc_waypoint(kept: Kept, pod: str) -> str | None:
    """The WAYPOINT column of ``ambientctl zc workload`` for ``shop/<pod>``: what the control plane
    sent ztunnel."""
    p = kept.ctl("zc", "workload", "--workload-namespace", "shop")
    for line in p.stdout.splitlines()[1:]:
        cells = line.split()
        if cells[:2] == ["shop", pod]:
            return cells[4]
    return None


def test_enroll_namespace_reaches_the_control_plane(kept: Kept) -> None:
    before = kept.mesh_file.read_text()
    assert zc_waypoint(kept, "frontend") == "None"
    # shop's Namespace document has no use-waypoint label yet: enrolling writes it there, and a
    # waypoint for all traffic then serves shop's workloads too.
    p = kept.ctl(
        "waypoint", "apply", "-n", "shop", "--name", "everything", "--for", "all", "--enroll-namespace", "-w"
    )
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "✅ waypoint shop/everything applied"
    assert lines[-2:] == [
        "✅ waypoint shop/everything is ready!",
        '✅ namespace shop labeled with "istio.io/use-waypoint: everything"',
    ]
    after = kept.mesh_file.read_text()
    assert after.startswith(COMMENT)
    docs = [d for d in yaml.safe_load_all(after) if d]
    shop = next(d for d in docs if d["kind"] == "Namespace" and d["metadata"]["name"] == "shop")
    assert shop["metadata"]["labels"] == {
        "istio.io/dataplane-mode": "ambient",
        "istio.io/use-waypoint": "everything",
    }
    assert len(docs) == len([d for d in yaml.safe_load_all(before) if d]) + 1  # the Gateway; nothing lost
    # The control plane read the edited file: ztunnel now sends shop's workload traffic to it.
    wait_until(
        "frontend bound to waypoint everything",
        lambda: True if zc_waypoint(kept, "frontend") == "everything" else None,
    )
    p = kept.ctl("waypoint", "status", "-n", "shop", "-o", "json")
    assert p.returncode == 0
    assert {r["name"]: r["status"] for r in json.loads(p.stdout)} == {
        "everything": "True",
        "waypoint": "True",
    }
