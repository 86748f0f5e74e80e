"""``ambientctl mesh``: a user's own YAML as a local mesh — real processes in network namespaces.

One mesh per module (it takes seconds to build): two nodes, an HTTP server pod (``python3 -m
http.server``) and a client pod, traffic through the production wiring (file → control plane →
xDS → ztunnel). Tests run in file order; the last one takes the mesh down and checks that
nothing is left. Two more build their own: a bad file (nothing is built) and ``mesh up`` killed
half way (``mesh down`` removes what it left).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("ip", "nft", "nsenter")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in TOOLS), reason="needs root, ip, nft, nsenter"
)

USER_FILE = """\
# a user's own manifests: two nodes, a web server, a client
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers:
  - name: http
    command: [python3, -m, http.server, "8080"]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  nodeName: node-a
  serviceAccountName: client
  containers:
  - name: sleep
    command: [sleep, infinity]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""

DENY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-deny-client, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]
"""

ROOT_POD = """\
apiVersion: v1
kind: Pod
metadata: {name: admin, namespace: shop}
spec:
  nodeName: node-b
  securityContext: {runAsUser: 0}
  containers:
  - name: main
    command: [sh, -c]
    args: ["echo started as $(id -u); exec sleep infinity"]
"""

GET = "import sys, urllib.request as u; r = u.urlopen(sys.argv[1], timeout=10); print(r.status)"


def ctl(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ambientctl.main", "mesh", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )  # fmt: skip


def sh(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout


def netns() -> set[str]:
    return {line.split(" ", 1)[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()}


def root_nft() -> list[str]:
    return sorted(sh("nft", "list", "tables").splitlines())


def wait_until(what: str, probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        select.select([], [], [], 0.2)


def state_of(root: Path) -> tuple[Path, dict[str, Any]]:
    [run] = [p for p in root.iterdir() if (p / "state.json").is_file()]
    return run, json.loads((run / "state.json").read_text())


def alive(pids: list[int]) -> list[int]:
    """Those still running (an exited process its new parent has not reaped yet is not)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            out.append(pid)
    return out


def _cmdline(d: Path) -> bytes:
    try:
        return d.joinpath("cmdline").read_bytes()
    except OSError:
        return b""


class Mesh:
    def __init__(self, env: dict[str, str], root: Path, tmp: Path) -> None:
        self.env, self.root, self.tmp = env, root, tmp

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return ctl(*args, env=self.env, timeout=timeout)

    def file(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def get(self, url: str, src: str = "shop/client") -> subprocess.CompletedProcess[str]:
        return self("exec", src, "--", "python3", "-c", GET, url, timeout=120)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("mesh")
    root = tmp / "runs"
    env = dict(os.environ, AMBIENT_DEMO_RUN_ROOT=str(root))
    m = Mesh(env, root, tmp)
    m.nft_before = root_nft()  # type: ignore[attr-defined]
    r = m("up", "-f", m.file("shop.yaml", USER_FILE))
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        m.up_output = r.stdout  # type: ignore[attr-defined]
        yield m
    finally:
        m("down", "--all")  # a failed test must not leave a mesh running


def test_up_reports_each_step_and_runs_pod_commands_as_nobody(mesh: Mesh) -> None:
    out: str = mesh.up_output  # type: ignore[attr-defined]
    assert [int(n) for n in re.findall(r"^\[(\d)/7\]", out, re.M)] == list(range(1, 8)), out
    assert "shop/web [http]: python3 -m http.server 8080  (as uid 65534" in out
    _, st = state_of(mesh.root)
    names = {p["name"] for p in st["procs"]}
    assert {"controlplane", "supervisor", "ztunnel-node-a", "ztunnel-node-b", "cni-node-a", "cni-node-b",
            "pod-shop-web", "pod-shop-client"} <= names  # fmt: skip
    web = next(p["pid"] for p in st["procs"] if p["name"] == "pod-shop-web")
    uid = next(
        line.split()[1]
        for line in Path(f"/proc/{web}/status").read_text().splitlines()
        if line.startswith("Uid:")
    )
    assert uid == "65534"
    assert os.readlink(f"/proc/{web}/ns/net") != os.readlink("/proc/self/ns/net")  # in its pod netns


def test_exec_client_reaches_server_over_mtls(mesh: Mesh) -> None:
    for url in ("http://10.96.0.20/", "http://10.0.2.2:8080/"):
        r = mesh.get(url)
        assert r.returncode == 0 and r.stdout.strip() == "200", r.stdout + r.stderr

    # The production path: ztunnel on node-b saw it over HBONE, with the client's identity.
    def inbound() -> list[dict[str, Any]]:
        lines = mesh("logs", "ztunnel/node-b").stdout.splitlines()
        recs = [json.loads(x) for x in lines if x.startswith("{")]
        return [
            x for x in recs if x.get("event") == "connection complete" and x.get("direction") == "inbound"
        ]

    recs = wait_until("node-b ztunnel's access log of the request", inbound)
    assert recs[0]["security"] == "mutual_tls"
    assert recs[0]["src_identity"] == "spiffe://cluster.local/ns/shop/sa/client"
    assert recs[0]["dst_workload"] == "web"


def test_exec_runs_as_the_pod_user_and_passes_the_exit_status(mesh: Mesh) -> None:
    r = mesh("exec", "shop/client", "--", "id", "-u")
    assert (r.returncode, r.stdout.strip()) == (0, "65534")
    r = mesh("exec", "shop/client", "--", "sh", "-c", "ip -4 -o addr show eth0; exit 7")
    assert r.returncode == 7
    assert "10.0.1.2/24" in r.stdout
    r = mesh("exec", "shop/nope", "--", "true")
    assert r.returncode == 2 and "shop/nope: no such pod" in r.stderr


def test_get_pods_columns_and_json(mesh: Mesh) -> None:
    r = mesh("get", "pods")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "READY", "STATUS", "IP", "NODE", "MESH"]
    rows = {tuple(x.split()[:2]): x.split() for x in lines[1:]}
    assert rows[("shop", "web")] == ["shop", "web", "1/1", "Running", "10.0.2.2", "node-b", "ambient"]
    assert rows[("shop", "client")] == ["shop", "client", "1/1", "Running", "10.0.1.2", "node-a", "ambient"]
    doc = json.loads(mesh("get", "pods", "-o", "json").stdout)
    assert doc["kind"] == "List" and doc["apiVersion"] == "v1"
    web = next(i for i in doc["items"] if i["metadata"]["name"] == "web")
    assert web["kind"] == "Pod" and web["spec"]["nodeName"] == "node-b"
    assert web["status"]["podIP"] == "10.0.2.2" and web["status"]["phase"] == "Running"
    r = mesh("get", "services")
    assert r.stdout.splitlines()[0].split() == ["NAMESPACE", "NAME", "CLUSTER-IP", "PORT(S)", "WAYPOINT"]
    assert r.stdout.splitlines()[1].split() == ["shop", "web", "10.96.0.20", "80/TCP", "-"]
    assert mesh("get", "policies").stdout.strip() == "No policies found."
    assert mesh("get", "nodes").returncode == 2


def test_logs_of_pod_and_controlplane(mesh: Mesh) -> None:
    assert mesh.get("http://10.96.0.20/logs-probe").returncode == 1  # a 404, logged by the server
    wait_until("the web pod's log line", lambda: "GET /logs-probe" in mesh("logs", "shop/web").stdout)
    cp = mesh("logs", "controlplane")
    assert cp.returncode == 0 and "certificate issued" in cp.stdout
    assert mesh("logs", "ztunnel/node-z").returncode == 2


def test_logs_follow_prints_what_is_appended(mesh: Mesh) -> None:
    assert mesh.get("http://10.96.0.20/before").returncode == 1  # a 404 line already in the log
    f = subprocess.Popen(
        [sys.executable, "-m", "ambientctl.main", "mesh", "logs", "-f", "shop/web"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=mesh.env, cwd=REPO,
    )  # fmt: skip
    assert f.stdout is not None
    out = f.stdout
    seen = b""

    def until(text: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 120
        while text not in seen:
            assert time.monotonic() < deadline, seen[-2000:]
            ready, _, _ = select.select([out], [], [], 1.0)
            if ready:
                chunk = os.read(out.fileno(), 4096)
                assert chunk, f"logs -f exited with status {f.wait()}"
                seen += chunk

    try:
        until(b"GET /before")  # what was there
        assert mesh.get("http://10.96.0.20/followed").returncode == 1
        until(b"GET /followed")  # what came after
    finally:
        f.terminate()
        f.communicate(timeout=30)  # and closes the pipes


def test_apply_deny_then_client_is_refused_and_bad_file_changes_nothing(mesh: Mesh) -> None:
    run, _ = state_of(mesh.root)
    r = mesh("apply", "-f", mesh.file("deny.yaml", DENY))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "authorizationpolicy/web-deny-client -n shop created" in r.stdout
    # apply returns once every ztunnel holds the policy: the very next request is refused.
    r = mesh.get("http://10.96.0.20/")
    assert r.returncode != 0 and "200" not in r.stdout
    rows = mesh("get", "policies").stdout.splitlines()
    assert rows[1].split() == ["shop", "web-deny-client", "AuthorizationPolicy", "DENY", "app=web"]

    before = (run / "mesh.yaml").read_bytes()
    bad = DENY.replace("action: DENY", "action: DENIED")
    r = mesh("apply", "-f", mesh.file("bad.yaml", bad))
    assert r.returncode == 1
    assert "bad.yaml: document[0] (AuthorizationPolicy shop/web-deny-client): spec.action" in r.stderr
    assert (run / "mesh.yaml").read_bytes() == before

    r = mesh("delete", "-f", mesh.file("deny.yaml", DENY))
    assert r.returncode == 0, r.stdout + r.stderr
    r = mesh.get("http://10.96.0.20/")
    assert r.returncode == 0 and r.stdout.strip() == "200", r.stdout + r.stderr


def test_apply_builds_a_new_pod_and_delete_tears_it_down(mesh: Mesh) -> None:
    r = mesh("apply", "-f", mesh.file("admin.yaml", ROOT_POD))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pod shop/admin: created" in r.stdout
    assert mesh("exec", "shop/admin", "--", "id", "-u").stdout.strip() == "0"  # runAsUser: 0
    wait_until("the admin pod's output", lambda: "started as 0" in mesh("logs", "shop/admin").stdout)
    _, st = state_of(mesh.root)
    pid = next(p["pid"] for p in st["procs"] if p["name"] == "pod-shop-admin")
    ns = st["info"]["pods"]["shop/admin"]["netns"]
    assert ns in netns()
    r = mesh.get("http://10.96.0.20/", src="shop/admin")
    assert r.stdout.strip() == "200", r.stdout + r.stderr

    r = mesh("delete", "-f", mesh.file("admin.yaml", ROOT_POD))
    assert r.returncode == 0 and "pod shop/admin: deleted" in r.stdout, r.stdout + r.stderr
    assert ns not in netns()
    wait_until("the admin pod's process gone", lambda: not alive([pid]), 15)
    assert "admin" not in mesh("get", "pods").stdout


def test_dead_node_daemons_are_restarted_with_growing_backoff(mesh: Mesh) -> None:
    run, _ = state_of(mesh.root)
    sup_log = run / "logs" / "supervisor.log"

    def current(name: str) -> int:
        _, st = state_of(mesh.root)
        return int([p["pid"] for p in st["procs"] if p["name"] == name][-1])

    def replaced(name: str, old: int) -> bool:
        new = current(name)
        return new != old and bool(alive([new]))

    for restart, delay in ((1, 1), (2, 2)):  # killed again right away: the delay doubles
        old = current("ztunnel-node-b")
        os.kill(old, signal.SIGKILL)
        wait_until(f"ztunnel-node-b restarted ({restart})", partial(replaced, "ztunnel-node-b", old), 90)
        said = rf"ztunnel-node-b: not running( \(exit status -9\))?; restarting in {delay} s \(restart {restart}\)"
        assert re.search(said, sup_log.read_text()), sup_log.read_text()[-2000:]
    old_cp = current("controlplane")
    os.kill(old_cp, signal.SIGKILL)
    wait_until("the control plane restarted", lambda: replaced("controlplane", old_cp), 90)
    # The new processes serve again: the new ztunnel takes the pod back, with certificates from
    # the new control plane (same CA, same address).
    wait_until(
        "a request through the restarted ztunnel",
        lambda: mesh.get("http://10.96.0.20/").stdout.strip() == "200",
        120,
    )


def test_down_leaves_nothing(mesh: Mesh) -> None:
    run, st = state_of(mesh.root)
    pids = [p["pid"] for p in st["procs"]]
    prefix = f"ambd-{st['run_id']}-"
    assert alive(pids) and any(n.startswith(prefix) for n in netns())
    r = mesh("down")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [n for n in netns() if n.startswith(prefix)]
    assert not alive(pids)
    assert not run.exists()
    assert root_nft() == mesh.nft_before  # type: ignore[attr-defined]
    assert mesh("get", "pods").returncode == 2  # no mesh to talk to


@pytest.fixture
def own_root(tmp_path: Path) -> Iterator[Mesh]:
    root = tmp_path / "runs"
    m = Mesh(dict(os.environ, AMBIENT_DEMO_RUN_ROOT=str(root)), root, tmp_path)
    yield m
    m("down", "--all")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("command: [sleep, infinity]", "command: sleep infinity"),
         "document[4] (Pod shop/client): spec.containers[0].command: must be a list of strings"),
        (("nodeName: node-a", "nodeName: node-c"), "document[4] (Pod shop/client): spec.nodeName"),
        (("clusterIP: 10.96.0.20", "clusterIP: 10.96.0.999"), "document[5] (Service shop/web): spec.clusterIP"),
    ],
)  # fmt: skip
def test_bad_file_is_refused_naming_the_field_and_nothing_is_built(
    own_root: Mesh, change: tuple[str, str], message: str
) -> None:
    r = own_root("up", "-f", own_root.file("bad.yaml", USER_FILE.replace(*change)))
    assert r.returncode == 1
    assert message in r.stderr, r.stderr
    assert "bad.yaml" in r.stderr
    # No run directory, so no run id: no netns can have been named, no process started. (Other
    # meshes may come and go on this machine meanwhile: their netns are not looked at.)
    assert not own_root.root.exists() or not any(own_root.root.iterdir())
    assert not [
        d for d in Path("/proc").iterdir() if d.name.isdigit() and str(own_root.root).encode() in _cmdline(d)
    ]


# Enough pods that building them (a CNI ADD each) takes a while: the signal lands half way.
MANY_PODS = USER_FILE + "".join(
    f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: extra-{i}, namespace: shop}}\nspec: {{nodeName: node-a}}\n"
    for i in range(12)
)


def start_up_and_stop_half_way(m: Mesh, sig: signal.Signals) -> tuple[dict[str, Any], int]:
    """``mesh up`` sent ``sig`` once its first pod netns exists; (its state then, its exit status)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "ambientctl.main", "mesh", "up", "-f", m.file("many.yaml", MANY_PODS)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=m.env, cwd=REPO,
    )  # fmt: skip

    def half_way() -> dict[str, Any] | None:
        try:
            _, st = state_of(m.root)
        except (ValueError, FileNotFoundError):
            return None
        return st if any("-shop-" in n for n in st["netns"]) else None

    try:
        st = wait_until("mesh up to build its first pod", half_way, 120)
    finally:
        p.send_signal(sig)
        rc = p.wait(120)
    return st, rc


def test_up_killed_half_way_then_down_removes_what_it_left(own_root: Mesh) -> None:
    start_up_and_stop_half_way(own_root, signal.SIGKILL)
    _, st = state_of(own_root.root)
    assert len([n for n in st["netns"] if "-shop-" in n]) < 14  # it was killed half way
    prefix = f"ambd-{st['run_id']}-"
    pids = [x["pid"] for x in st["procs"]]
    assert alive(pids) and any(n.startswith(prefix) for n in netns())  # it did leave things behind
    r = own_root("down")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [n for n in netns() if n.startswith(prefix)]
    assert not alive(pids)
    assert not any(own_root.root.iterdir())


def test_up_interrupted_half_way_tears_itself_down(own_root: Mesh) -> None:
    st, rc = start_up_and_stop_half_way(own_root, signal.SIGTERM)
    assert rc == 130
    assert not [n for n in netns() if n.startswith(f"ambd-{st['run_id']}-")]
    assert not alive([x["pid"] for x in st["procs"]])
    assert not any(own_root.root.iterdir())
