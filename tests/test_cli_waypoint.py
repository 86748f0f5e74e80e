"""``ambientctl waypoint``: pure parts, the local mesh's file edits, and the Kubernetes API.

Layers: the Gateway and the rows are pure functions of flags and objects (istioctl's output
format, every validation error naming its flag); the text edits of a mesh file keep comments and
order (property-tested: split/join is lossless, a label set reads back); the local backend on a
run directory under a temporary root (the file replaced atomically, bad input leaving it byte
for byte as it was); the Kubernetes backend against the strict fake API server, including
``apply --wait`` while the control plane's real waypoint controller writes the status. The
local mesh with a real supervisor is tests/demo/test_cli_waypoint_local.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from hypothesis import given
from hypothesis import strategies as st

from ambientctl import waypoint as wp
from ambientctl import waypoint_local as local
from ambientctl import waypoint_yaml as docs
from ambientctl.localmesh.state import RunState
from ambientctl.main import main
from mesh import log as meshlog
from tests.k8s.fakeapi import FakeApiServer
from tests.k8s.helpers import namespace

REPO = Path(__file__).resolve().parents[1]

# --- pure: flags -> Gateway -> rows ------------------------------------------------------------

ISTIOCTL_GENERATE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  labels:
    istio.io/waypoint-for: service
  name: waypoint
  namespace: default
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``ambientctl waypoint ARGV`` in-process; the logging set-up ``main`` makes is put back."""
    config = structlog.get_config()
    handlers = logging.getLogger().handlers[:]
    level = meshlog._threshold
    try:
        rc = main(["waypoint", *argv])
    finally:
        structlog.configure(**config)
        logging.getLogger().handlers[:] = handlers
        meshlog._threshold = level
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_prints_what_istioctl_prints(capsys: pytest.CaptureFixture[str]) -> None:
    # `istioctl waypoint generate -n default --for service`, byte for byte.
    assert run(capsys, "generate", "-n", "default", "--for", "service") == (0, ISTIOCTL_GENERATE, "")
    # Without -n the namespace is left out (the Gateway lands where it is applied), as istioctl.
    rc, out, _ = run(capsys, "generate")
    assert rc == 0 and yaml.safe_load(out)["metadata"] == {"name": "waypoint"}
    rc, out, _ = run(
        capsys, "-n", "shop", "--name", "web-wp", "generate", "--service-account", "web", "-o", "json"
    )
    assert rc == 0
    assert json.loads(out) == {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": "web-wp",
            "namespace": "shop",
            "annotations": {"ambient-mesh.io/for-service-account": "web"},
        },
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--for", "pods"], "--for 'pods'"),
        (["--name", "none"], "--name none"),
        (["--name", "Web_WP"], "--name 'Web_WP'"),
        (["-n", "Shop"], "-n/--namespace 'Shop'"),
        (["--service-account", "a b"], "--service-account 'a b'"),
    ],
)
def test_generate_errors_name_the_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str], names: str
) -> None:
    rc, out, err = run(capsys, "generate", *argv)
    assert rc == 1 and out == ""
    assert err.startswith("ambientctl waypoint generate: error: " + names), err
    if argv[0] == "--for":
        assert "service|workload|all|none" in err


def test_parse_duration() -> None:
    assert wp.parse_duration("90s") == 90
    assert wp.parse_duration("1m30s") == 90
    assert wp.parse_duration("500ms") == 0.5
    assert wp.parse_duration("2") == 2
    for bad in ("", "0s", "-1", "soon", "10x", "1m x"):
        with pytest.raises(wp.WaypointError, match="--waypoint-timeout"):
            wp.parse_duration(bad)


def programmed_gw(
    ns: str, name: str, status: str | None, *, cls: str = "istio-waypoint", **labels: str
) -> Any:
    gw: dict[str, Any] = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"gatewayClassName": cls},
    }
    if status is not None:
        gw["status"] = {
            "conditions": [
                {"type": "Accepted", "status": "True", "reason": "Accepted", "message": ""},
                {"type": "Programmed", "status": status, "reason": "Pending" if status == "False" else "Programmed",
                 "message": "0/1 replicas\n of Deployment ready" if status == "False" else "1/1 ready"},
            ]
        }  # fmt: skip
    return gw


GWS = [
    programmed_gw("shop", "waypoint", "True", **{"istio.io/waypoint-for": "all"}),
    programmed_gw("bank", "wp", "False", **{"istio.io/rev": "canary"}),
    programmed_gw("shop", "a", None),
    programmed_gw("shop", "ingress", "True", cls="istio"),  # not a waypoint: never shown
]


def test_list_columns() -> None:
    assert wp.render_list(GWS, False, "table") == (
        "NAME         REVISION     TRAFFIC TYPE     PROGRAMMED\n"
        "wp           canary       service          False\n"
        "a            default      service          False\n"
        "waypoint     default      all              True\n"
    )
    assert wp.render_list(GWS, True, "table").splitlines()[0].split() == [
        "NAMESPACE", "NAME", "REVISION", "TRAFFIC", "TYPE", "PROGRAMMED",
    ]  # fmt: skip
    rows = json.loads(wp.render_list(GWS, True, "json"))
    assert [(r["namespace"], r["name"], r["programmed"]) for r in rows] == [
        ("bank", "wp", "False"),
        ("shop", "a", "False"),
        ("shop", "waypoint", "True"),
    ]
    assert set(rows[0]) == {"namespace", "name", "revision", "trafficType", "programmed", "serviceAccount"}
    assert yaml.safe_load(wp.render_list(GWS, True, "yaml")) == rows
    assert wp.render_list([], False, "table") == "No waypoints found.\n"
    assert wp.render_list([], False, "json") == "[]\n"


def test_status_columns_and_the_condition_that_explains() -> None:
    refused = programmed_gw("shop", "bad", "False")
    refused["status"]["conditions"][0] = {
        "type": "Accepted", "status": "False", "reason": "InvalidParameters", "message": "replicas: 'x'",
    }  # fmt: skip
    out = wp.render_status([*GWS, refused], "table").splitlines()
    assert out[0].split() == ["NAMESPACE", "NAME", "STATUS", "TYPE", "REASON", "MESSAGE"]
    assert [line.split(None, 5) for line in out[1:]] == [
        ["bank", "wp", "False", "Programmed", "Pending", "0/1 replicas of Deployment ready"],
        ["shop", "a", "Unknown", "Programmed", "NoStatus", "no status yet: is the control plane's waypoint controller running?"],
        ["shop", "bad", "False", "Accepted", "InvalidParameters", "replicas: 'x'"],
        ["shop", "waypoint", "True", "Programmed", "Programmed", "1/1 ready"],
    ]  # fmt: skip


class Script:
    """A backend whose Gateway goes through the given states, one per look; a clock that moves
    one second per look (no real waiting)."""

    def __init__(self, states: list[Any]) -> None:
        self.states = states
        self.looks = 0
        self.now = 0.0

    def gateway(self, namespace: str, name: str) -> Any:
        self.looks += 1
        return self.states[min(self.looks, len(self.states)) - 1]

    def sleep(self, seconds: float) -> None:
        self.now += 1.0


def test_wait_prints_a_line_per_change_and_stops_at_programmed(capsys: pytest.CaptureFixture[str]) -> None:
    pending = programmed_gw("shop", "waypoint", "False")
    s = Script([None, pending, pending, pending, programmed_gw("shop", "waypoint", "True")])
    wp.wait_programmed(s, "shop", "waypoint", 60, sys.stdout, clock=lambda: s.now, sleep=s.sleep)  # type: ignore[arg-type]
    assert s.looks == 5
    assert capsys.readouterr().out.splitlines() == [
        "⏳ waiting for waypoint shop/waypoint to be Programmed (0s of 60s): the Gateway is gone",
        "⏳ waiting for waypoint shop/waypoint to be Programmed (1s of 60s): "
        "Programmed=False (Pending): 0/1 replicas of Deployment ready",
    ]


def test_wait_gives_up_with_the_last_status(capsys: pytest.CaptureFixture[str]) -> None:
    s = Script([programmed_gw("shop", "waypoint", "False")])
    with pytest.raises(wp.WaypointError) as e:
        wp.wait_programmed(s, "shop", "waypoint", 3, sys.stdout, clock=lambda: s.now, sleep=s.sleep)  # type: ignore[arg-type]
    assert str(e.value) == (
        "timed out after 3s while waiting for waypoint shop/waypoint to be Programmed; last status: "
        "Programmed=False (Pending): 0/1 replicas of Deployment ready"
    )
    assert s.looks == 4  # at 0, 1, 2 and 3 s
    assert len(capsys.readouterr().out.splitlines()) == 1  # the state never changed


# --- pure: text edits of a mesh file -----------------------------------------------------------

MESH = """\
# my mesh: hand written
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.0.1.0/24}
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop   # the shop
  labels: {istio.io/dataplane-mode: ambient}
---
# legacy: not in the mesh
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.0.1.2}
# trailing comment
"""


def test_split_join_is_lossless_and_parses_each_document() -> None:
    d = docs.split(MESH)
    assert docs.join(d) == MESH
    assert [x.kind for x in d] == ["Node", "Namespace", "Namespace", "Pod"]
    assert d[1].name == "shop" and d[3].namespace == "shop"


@given(st.lists(st.text(alphabet="ab-: #\n{}", max_size=30), max_size=6))
def test_split_join_is_lossless_for_any_text(parts: list[str]) -> None:
    text = "---\n".join(parts)
    assert docs.join(docs.split(text)) == text


@pytest.mark.parametrize(
    "metadata",
    [
        "metadata:\n  name: x\n",
        "metadata:\n  name: x  # keep me\n  labels:\n    a: b   # and me\n",
        "metadata: {name: x}\n",
        "metadata: {name: x, labels: {a: b}}\n",
        "metadata: {name: x, labels: {}}\n",
        "metadata:\n  name: x\n  labels:\n",  # a null: rendered anew
        "metadata:\n  name: x\n  labels: {istio.io/use-waypoint: old}\n",
        "metadata:\n  name: x\n  labels:\n    istio.io/use-waypoint: 'old'  # quoted\n",
    ],
)
def test_set_entries_keeps_the_rest_of_the_text(metadata: str) -> None:
    text = "---\n# about x\napiVersion: v1\nkind: Namespace\n" + metadata
    [doc] = docs.split(text)
    new = docs.set_entries(doc, ("metadata", "labels"), {"istio.io/use-waypoint": "wp-1"})
    parsed = yaml.safe_load(new.text)
    assert parsed["metadata"]["labels"]["istio.io/use-waypoint"] == "wp-1"
    assert parsed["metadata"]["name"] == "x"
    assert new.data == parsed
    assert new.text.startswith("---\n# about x\n")
    for comment in re.findall(r"#[^\n]*", metadata):
        if "labels:\n" not in metadata or "a: b" in metadata:
            assert comment in new.text


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=20))
def test_set_entries_reads_back_any_value(value: str) -> None:
    [doc] = docs.split("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x  # c\n")
    new = docs.set_entries(doc, ("metadata", "labels"), {"k": value})
    assert yaml.safe_load(new.text)["metadata"]["labels"] == {"k": value}


def test_apply_appends_then_configures_then_leaves_alone() -> None:
    gw = wp.make_gateway(wp.make_spec("shop", None, None, None))
    d, result = local.apply_gateway(docs.split(MESH), gw)
    assert result == "created"
    text = docs.join(d)
    assert text.startswith(MESH) and text[len(MESH) :] == "---\n" + docs.render(gw)
    again, result = local.apply_gateway(d, gw)
    assert result == "unchanged" and docs.join(again) == text
    gw_all = wp.make_gateway(wp.make_spec("shop", None, "all", "web"))
    d2, result = local.apply_gateway(d, gw_all)
    assert result == "configured"
    assert yaml.safe_load(d2[-1].text)["metadata"]["labels"] == {"istio.io/waypoint-for": "all"}
    assert docs.join(d2[:-1]) == MESH


def test_label_namespace_edits_or_adds_the_namespace_document() -> None:
    d = local.label_namespace(docs.split(MESH), "shop", "istio.io/use-waypoint", "waypoint")
    assert "  name: shop   # the shop\n" in d[1].text
    assert d[1].data["metadata"]["labels"] == {
        "istio.io/use-waypoint": "waypoint",
        "istio.io/dataplane-mode": "ambient",
    }
    assert [x.text for i, x in enumerate(d) if i != 1] == [
        x.text for i, x in enumerate(docs.split(MESH)) if i != 1
    ]
    added = local.label_namespace(docs.split(MESH), "bank", "istio.io/use-waypoint", "waypoint")
    assert added[-1].data == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"labels": {"istio.io/use-waypoint": "waypoint"}, "name": "bank"},
    }


def test_check_edit_refuses_what_the_control_plane_would_reject() -> None:
    bad = dict(wp.make_gateway(wp.make_spec("shop", "x", None, None)))
    bad["spec"] = {**bad["spec"], "bogusField": 1}  # unknown fields are errors in local mode
    d, _ = local.apply_gateway(docs.split(MESH), bad)
    with pytest.raises(wp.WaypointError, match="bogusField"):
        local.check_edit(MESH, docs.join(d), [("Gateway", "shop/x")], "mesh.yaml")


def facts(text: str, status: dict[str, Any], *, running: bool = True) -> local.MeshFacts:
    return local.MeshFacts(text, "mesh.yaml", running, status, frozenset({"node-a"}))


def test_local_status_from_the_supervisor() -> None:
    d, _ = local.apply_gateway(docs.split(MESH), wp.make_gateway(wp.make_spec("shop", None, None, None)))
    text = docs.join(d)

    def prog(status: dict[str, Any], running: bool = True) -> tuple[str, str, str]:
        [gw] = local.with_status(docs.split(text), facts(text, status, running=running))
        row = wp.status_row(gw)
        return row.status, row.reason, row.message

    assert prog({}) == ("False", "Pending", "pod shop/waypoint-0 on node-a 10.0.1.254: not started yet")
    assert prog({}, running=False)[2] == "the local mesh's waypoint supervisor is not running"
    where = {"node": "node-a", "ip": "10.0.1.254"}
    assert prog({"waypoints": {"shop/waypoint": {**where, "phase": "starting"}}})[:2] == ("False", "Pending")
    assert prog({"waypoints": {"shop/waypoint": {**where, "phase": "ready"}}}) == (
        "True", "Programmed", "pod shop/waypoint-0 on node-a 10.0.1.254 is ready",
    )  # fmt: skip
    # Ready, but where an older version of the file placed it: not this Gateway's pod yet.
    moved = {"node": "node-a", "ip": "10.0.1.9", "phase": "ready"}
    assert prog({"waypoints": {"shop/waypoint": moved}})[0] == "False"
    # A Gateway that cannot be placed says why.
    unplaced = text.replace("spec: {podCIDR: 10.0.1.0/24}\n", "")
    [gw] = local.with_status(docs.split(unplaced), facts(unplaced, {}))
    assert wp.status_row(gw).reason == "NoResources" and "podCIDR" in wp.status_row(gw).message


# --- the local backend on a run directory ------------------------------------------------------


@pytest.fixture
def mesh_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run directory as a local mesh leaves it: its state (this test process stands in for its
    control plane, so the run counts as running) and its mesh file. No supervisor runs."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setattr(local, "RUNS_ROOT", root)
    st = RunState.create(root)
    st.add_proc("controlplane", os.getpid())
    (st.path / "mesh.yaml").write_text(MESH)
    return st.path / "mesh.yaml"


def test_local_apply_list_status_delete(capsys: pytest.CaptureFixture[str], mesh_run: Path) -> None:
    inode = mesh_run.stat().st_ino
    rc, out, err = run(capsys, "apply", "-n", "shop", "--for", "all")
    assert (rc, out, err) == (0, "✅ waypoint shop/waypoint applied\n", "")
    text = mesh_run.read_text()
    assert text.startswith(MESH) and mesh_run.stat().st_ino != inode  # replaced, not rewritten in place
    assert not [p for p in mesh_run.parent.iterdir() if p.name.startswith(".mesh.yaml.")]  # no temp left

    rc, out, _ = run(capsys, "list", "-n", "shop")
    assert rc == 0 and out.splitlines() == [
        "NAME         REVISION     TRAFFIC TYPE     PROGRAMMED",
        "waypoint     default      all              False",
    ]
    rc, out, _ = run(capsys, "status", "-A", "-o", "json")
    assert rc == 0 and json.loads(out) == [
        {"namespace": "shop", "name": "waypoint", "status": "False", "type": "Programmed", "reason": "Pending",
         "message": "the local mesh's waypoint supervisor is not running"},
    ]  # fmt: skip
    assert run(capsys, "list")[1] == "No waypoints found.\n"  # -n default

    rc, out, _ = run(capsys, "apply", "-n", "shop", "--name", "second", "--enroll-namespace")
    assert rc == 0
    assert out.splitlines() == [
        "✅ waypoint shop/second applied",
        '✅ namespace shop labeled with "istio.io/use-waypoint: second"',
    ]
    assert "  name: shop   # the shop\n" in mesh_run.read_text()
    # The namespace uses "second" now: enrolling another one needs --overwrite.
    before = mesh_run.read_bytes()
    rc, out, err = run(capsys, "apply", "-n", "shop", "--enroll-namespace")
    assert rc == 1 and "already uses waypoint 'second'" in err and "--overwrite" in err
    assert mesh_run.read_bytes() == before
    rc, out, _ = run(capsys, "apply", "-n", "shop", "--enroll-namespace", "--overwrite")
    assert rc == 0 and 'labeled with "istio.io/use-waypoint: waypoint"' in out

    # Enrolling a namespace the file does not declare adds it, and warns it is not ambient.
    rc, out, _ = run(capsys, "apply", "-n", "bank", "--enroll-namespace")
    assert rc == 0 and "⚠️ Warning: namespace is not enrolled in ambient" in out
    assert docs.split(mesh_run.read_text())[-1].data["metadata"] == {
        "labels": {"istio.io/use-waypoint": "waypoint"},
        "name": "bank",
    }

    before = mesh_run.read_bytes()
    rc, _, err = run(capsys, "delete", "-n", "shop", "second", "nope")
    assert rc == 1 and "waypoint shop/nope not found" in err and "second, waypoint" in err
    assert mesh_run.read_bytes() == before
    rc, out, _ = run(capsys, "delete", "-n", "shop", "--all")
    assert rc == 0 and out.splitlines() == [
        "waypoint shop/second deleted",
        "waypoint shop/waypoint deleted",
        "⚠️ Warning: namespace shop still has istio.io/use-waypoint=waypoint: its traffic is sent to a waypoint "
        "that no longer exists; apply it again, or remove the label",
    ]
    remaining = [d.kind for d in docs.split(mesh_run.read_text())]
    assert "Gateway" in remaining  # bank's
    rc, out, _ = run(capsys, "list", "-A")
    assert rc == 0 and out.splitlines()[1].split() == ["bank", "waypoint", "default", "service", "False"]


def test_local_bad_input_changes_nothing(capsys: pytest.CaptureFixture[str], mesh_run: Path) -> None:
    before = mesh_run.read_bytes()
    for argv, names in [
        (["apply", "-n", "shop", "--for", "everything"], "--for 'everything'"),
        (["apply", "-n", "shop", "--waypoint-timeout", "soon"], "--waypoint-timeout 'soon'"),
        (["apply", "-n", "shop", "--name", "none"], "--name none"),
        (["delete", "-n", "shop"], "must specify a waypoint name"),
        (["delete", "-n", "shop", "--all", "x"], "cannot specify waypoint names"),
        (["list", "--run", "ffff"], "--run ffff: no such local mesh"),
    ]:
        rc, _, err = run(capsys, *argv)
        assert rc == 1, argv
        assert names in err, err
    assert mesh_run.read_bytes() == before
    # A Gateway of that name that is not a waypoint is not taken over.
    ingress = "---\n" + docs.render(programmed_gw("shop", "waypoint", None, cls="istio"))
    mesh_run.write_text(MESH + ingress)
    rc, _, err = run(capsys, "apply", "-n", "shop")
    assert rc == 1 and "exists with gatewayClassName 'istio'" in err
    assert mesh_run.read_text() == MESH + ingress


def test_no_local_mesh(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "RUNS_ROOT", tmp_path)
    rc, out, err = run(capsys, "list")
    assert rc == 1 and out == ""
    assert "no local mesh is running" in err and "--kubeconfig" in err


def test_concurrent_local_edits_are_all_kept(mesh_run: Path) -> None:
    """Each edit is read-change-replace under the file's lock: none is lost to another."""
    backend = local.LocalBackend.find(None)
    names = [f"wp-{i}" for i in range(8)]
    errors: list[BaseException] = []

    def apply(name: str) -> None:
        try:
            backend.apply(wp.make_gateway(wp.make_spec("shop", name, None, None)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=apply, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    got = sorted(d.name for d in docs.split(mesh_run.read_text()) if d.kind == "Gateway")
    assert got == names
    assert mesh_run.read_text().startswith(MESH)


# --- the Kubernetes API (the fake API server) --------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        server.add(namespace("shop", **{"istio.io/dataplane-mode": "ambient"}))
        server.add(namespace("bank"))
        yield server


def kubeconfig(tmp_path: Path, fake: FakeApiServer, namespace: str | None = None) -> str:
    ctx: dict[str, Any] = {"cluster": "fake", "user": "me"}
    if namespace:
        ctx["namespace"] = namespace
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "me", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": ctx}],
        "current-context": "fake",
    }
    path = tmp_path / f"kubeconfig-{namespace}"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_kube_apply_creates_the_generated_gateway(
    capsys: pytest.CaptureFixture[str], fake: FakeApiServer, tmp_path: Path
) -> None:
    kc = kubeconfig(tmp_path, fake)
    rc, generated, _ = run(capsys, "generate", "-n", "shop", "--for", "workload", "--service-account", "web")
    rc, out, err = run(
        capsys, "--kubeconfig", kc, "apply", "-n", "shop", "--for", "workload", "--service-account", "web"
    )
    assert (rc, out, err) == (0, "✅ waypoint shop/waypoint applied\n", "")
    got = fake.get("gateways", "shop/waypoint")
    assert got is not None
    assert {k: got[k] for k in ("apiVersion", "kind", "spec")} == {
        k: v for k, v in yaml.safe_load(generated).items() if k != "metadata"
    }
    assert got["metadata"]["labels"] == {"istio.io/waypoint-for": "workload"}
    assert got["metadata"]["annotations"] == {"ambient-mesh.io/for-service-account": "web"}
    # Applied again unchanged: no write. With --for all: the label changes, the rest stays.
    writes = len(fake.writes_of("gateways"))
    assert run(capsys, "--kubeconfig", kc, "apply", "-n", "shop", "--for", "workload")[0] == 0
    assert len(fake.writes_of("gateways")) == writes
    assert run(capsys, "--kubeconfig", kc, "apply", "-n", "shop", "--for", "all")[0] == 0
    got = fake.get("gateways", "shop/waypoint")
    assert got is not None and got["metadata"]["labels"] == {"istio.io/waypoint-for": "all"}
    assert got["metadata"]["annotations"] == {"ambient-mesh.io/for-service-account": "web"}
    assert [w.method for w in fake.writes_of("gateways")] == ["POST", "PUT"]


def test_kube_namespace_from_the_kubeconfig_and_errors(
    capsys: pytest.CaptureFixture[str], fake: FakeApiServer, tmp_path: Path
) -> None:
    kc = kubeconfig(tmp_path, fake, namespace="bank")
    assert run(capsys, "--kubeconfig", kc, "apply")[1] == "✅ waypoint bank/waypoint applied\n"
    rc, _, err = run(capsys, "--kubeconfig", kc, "apply", "-n", "nope")
    assert rc == 1 and "namespace nope not found" in err
    rc, _, err = run(capsys, "--kubeconfig", kc, "apply", "-n", "nope", "--enroll-namespace")
    assert rc == 1 and "namespace: nope not found" in err
    rc, _, err = run(capsys, "--kubeconfig", str(tmp_path / "missing"), "list")
    assert rc == 1 and "--kubeconfig" in err
    rc, _, err = run(capsys, "--kubeconfig", kc, "--run", "abcd", "list")
    assert rc == 1 and "--run" in err
    # One Gateway made; the one for the missing namespace refused by the server.
    assert [(w.method, w.ref, w.code) for w in fake.writes_of()] == [
        ("POST", "bank/waypoint", 201),
        ("POST", "nope/", 404),  # the fake records the URL: a collection
    ]


def test_kube_enroll_namespace(
    capsys: pytest.CaptureFixture[str], fake: FakeApiServer, tmp_path: Path
) -> None:
    kc = kubeconfig(tmp_path, fake)
    rc, out, _ = run(capsys, "--kubeconfig", kc, "apply", "-n", "shop", "--enroll-namespace")
    assert rc == 0 and out.splitlines() == [
        "✅ waypoint shop/waypoint applied",
        '✅ namespace shop labeled with "istio.io/use-waypoint: waypoint"',
    ]
    shop = fake.get("namespaces", "shop")
    assert shop is not None and shop["metadata"]["labels"] == {
        "istio.io/dataplane-mode": "ambient",
        "istio.io/use-waypoint": "waypoint",
    }
    # Another waypoint for the namespace: refused without --overwrite, before anything is written.
    writes = len(fake.writes_of())
    rc, out, err = run(
        capsys, "--kubeconfig", kc, "apply", "-n", "shop", "--name", "other", "--enroll-namespace"
    )
    assert rc == 1 and "namespace shop already uses waypoint 'waypoint'" in err and out == ""
    assert len(fake.writes_of()) == writes
    rc, out, _ = run(
        capsys,
        "--kubeconfig",
        kc,
        "apply",
        "-n",
        "shop",
        "--name",
        "other",
        "--enroll-namespace",
        "--overwrite",
    )
    assert rc == 0
    shop = fake.get("namespaces", "shop")
    assert shop is not None and shop["metadata"]["labels"]["istio.io/use-waypoint"] == "other"
    # bank is not ambient: a warning with the command to fix it, as istioctl prints.
    rc, out, _ = run(capsys, "--kubeconfig", kc, "apply", "-n", "bank", "--enroll-namespace")
    assert rc == 0
    assert "`kubectl label namespace bank istio.io/dataplane-mode=ambient`" in out


def test_kube_list_status_delete(
    capsys: pytest.CaptureFixture[str], fake: FakeApiServer, tmp_path: Path
) -> None:
    kc = kubeconfig(tmp_path, fake)
    fake.add(programmed_gw("shop", "waypoint", None, **{"istio.io/waypoint-for": "all"}))
    fake.set_status("gateways", "shop/waypoint", programmed_gw("shop", "waypoint", "True")["status"])
    fake.add(programmed_gw("bank", "wp", None))
    fake.add(programmed_gw("shop", "ingress", None, cls="istio"))
    rc, out, _ = run(capsys, "--kubeconfig", kc, "list", "-A")
    assert rc == 0 and out == (
        "NAMESPACE     NAME         REVISION     TRAFFIC TYPE     PROGRAMMED\n"
        "bank          wp           default      service          False\n"
        "shop          waypoint     default      all              True\n"
    )
    rc, out, _ = run(capsys, "--kubeconfig", kc, "status", "-n", "shop")
    assert rc == 0 and out.splitlines()[1].split(None, 5) == [
        "shop", "waypoint", "True", "Programmed", "Programmed", "1/1 ready",
    ]  # fmt: skip
    rc, _, err = run(capsys, "--kubeconfig", kc, "delete", "-n", "shop", "ingress")
    assert rc == 1 and "waypoint shop/ingress not found (waypoints in shop: waypoint)" in err
    assert not fake.writes_of("gateways")
    rc, out, _ = run(capsys, "--kubeconfig", kc, "delete", "-n", "shop", "--all")
    assert rc == 0 and out == "waypoint shop/waypoint deleted\n"
    assert fake.get("gateways", "shop/ingress") is not None and fake.get("gateways", "shop/waypoint") is None
    rc, out, _ = run(capsys, "--kubeconfig", kc, "delete", "-n", "bank", "wp")
    assert rc == 0 and out == "waypoint bank/wp deleted\n"


def test_kube_wait_times_out_with_the_last_status(
    capsys: pytest.CaptureFixture[str], fake: FakeApiServer, tmp_path: Path
) -> None:
    kc = kubeconfig(tmp_path, fake)
    rc, out, err = run(capsys, "--kubeconfig", kc, "apply", "-n", "shop", "-w", "--waypoint-timeout", "1s")
    assert rc == 1
    assert out.startswith(
        "✅ waypoint shop/waypoint applied\n⏳ waiting for waypoint shop/waypoint to be Programmed"
    )
    assert "timed out after 1s while waiting for waypoint shop/waypoint to be Programmed" in err
    assert "NoStatus" in err  # no controller runs here


def test_fake_refuses_a_bad_namespace_label(fake: FakeApiServer) -> None:
    import kubernetes.client

    core = kubernetes.client.CoreV1Api(fake.api_client())
    with pytest.raises(kubernetes.client.ApiException) as e:
        core.patch_namespace("shop", {"metadata": {"labels": {"istio.io/use-waypoint": "not valid!"}}})
    assert e.value.status == 422
    with pytest.raises(kubernetes.client.ApiException) as e:
        core.patch_namespace("shop", {"metadata": {"resourceVersion": "1", "labels": {"a": "b"}}})
    assert e.value.status == 409
    shop = fake.get("namespaces", "shop")
    assert shop is not None and shop["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}


async def test_kube_apply_wait_until_the_controller_says_programmed(
    fake: FakeApiServer, tmp_path: Path
) -> None:
    """The production path: the control plane's waypoint controller makes the Deployment and
    writes the status; the test plays the kubelet (a ready replica)."""
    from tests.controlplane.test_waypoint_controller import controller

    kc = kubeconfig(tmp_path, fake)
    async with controller(fake):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ambientctl.main", "waypoint", "--kubeconfig", kc, "apply", "-n", "shop", "-w",
            "--waypoint-timeout", "120s",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        try:
            await asyncio.to_thread(
                fake.wait_for, lambda: fake.get("deployments", "shop/waypoint") is not None, 60
            )
            fake.set_status("deployments", "shop/waypoint", {"replicas": 1, "readyReplicas": 1})
            out, err = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()
    lines = text.splitlines()
    assert lines[0] == "✅ waypoint shop/waypoint applied"
    assert lines[-1] == "✅ waypoint shop/waypoint is ready!"
    gw = fake.get("gateways", "shop/waypoint")
    assert gw is not None and wp.programmed(gw)
