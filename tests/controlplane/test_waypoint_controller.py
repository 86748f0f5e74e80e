"""The waypoint controller against the fake API server: a Gateway of class istio-waypoint
becomes a ServiceAccount, Deployment and Service (and a PDB when asked), kept in step with the
Gateway's annotations, removed with it, and reported in its status."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from controlplane.waypoint_controller import (
    ANNOTATION_CPU,
    ANNOTATION_HASH,
    ANNOTATION_MEMORY_LIMIT,
    ANNOTATION_PDB_MAX_UNAVAILABLE,
    ANNOTATION_PDB_MIN_AVAILABLE,
    ANNOTATION_REPLICAS,
    MANAGED_BY,
    Condition,
    ControllerTiming,
    InvalidParameters,
    KubeApi,
    Parameters,
    Reconciler,
    WaypointController,
    WaypointSettings,
    contains,
    deployment_condition,
    desired_status,
    parameters,
    render,
)
from mesh.model import Store
from sources.kubernetes import GATEWAYS, PODS, Backoff
from tests.charts.helm import KUBE_VERSIONS, validate_k8s
from tests.k8s.fakeapi import FakeApiServer
from tests.k8s.helpers import gateway, namespace, pod, running

SETTINGS = WaypointSettings(
    image="registry.example.com/mesh/ambient-mesh:1.2.3",
    ca_address="controlplane.istio-system.svc:15012",
    trust_domain="cluster.local",
)
FAST = ControllerTiming(resync=60.0, status_poll=0.05, backoff=Backoff(initial=0.01, maximum=0.1))
TIMEOUT = 20.0
KEY = "shop/waypoint"
KINDS = ("serviceaccounts", "deployments", "services")


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        server.add(namespace("shop"))
        yield server


@dataclass
class Harness:
    fake: FakeApiServer
    store: Store
    controller: WaypointController

    async def until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Wait (on the fake's condition variable, off the event loop) until ``predicate()``."""
        await asyncio.to_thread(self.fake.wait_for, predicate, timeout)

    async def settled(self) -> None:
        """Reconcile the waypoint once more now and wait until that pass is over."""
        self.controller.enqueue([KEY])
        await self.controller.wait_idle(TIMEOUT)

    def obj(self, plural: str, ref: str = KEY) -> dict[str, Any]:
        got = self.fake.get(plural, ref)
        assert got is not None, f"{plural} {ref} does not exist"
        return got

    def exists(self, plural: str, ref: str = KEY) -> bool:
        return self.fake.get(plural, ref) is not None

    def condition(self, type_: str) -> dict[str, Any] | None:
        gw = self.fake.get("gateways", KEY) or {}
        conds = (gw.get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == type_), None)

    def condition_is(self, type_: str, status: str, reason: str | None = None) -> bool:
        c = self.condition(type_)
        return c is not None and c["status"] == status and (reason is None or c["reason"] == reason)


@asynccontextmanager
async def controller(fake: FakeApiServer, timing: ControllerTiming = FAST) -> AsyncIterator[Harness]:
    store = Store()
    api = fake.api_client()
    c = WaypointController(store, Reconciler(KubeApi(api, timeout=(5.0, 10.0)), SETTINGS), timing=timing)
    with running(fake, store, resources=(GATEWAYS, PODS), on_event=c.on_watch_event):
        c.start()
        try:
            yield Harness(fake, store, c)
        finally:
            await c.aclose()
            api.close()


def waypoint_gateway(name: str = "waypoint", **annotations: str) -> dict[str, Any]:
    gw = gateway(name)
    gw["metadata"]["annotations"] = dict(annotations)
    return gw


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


# --- end to end against the fake --------------------------------------------------------------


async def test_gateway_becomes_account_deployment_and_service(fake: FakeApiServer) -> None:
    gw = fake.add(waypoint_gateway())
    async with controller(fake) as h:
        await h.until(lambda: all(h.exists(k) for k in KINDS) and h.condition("Programmed") is not None)

        owner = {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "name": "waypoint",
            "uid": gw["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        for plural in KINDS:
            obj = h.obj(plural)
            assert obj["metadata"]["ownerReferences"] == [owner], plural
            assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == MANAGED_BY
            assert obj["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"
            for version in KUBE_VERSIONS:
                validate_k8s(obj, version)

        sa = h.obj("serviceaccounts")
        assert sa["automountServiceAccountToken"] is False

        dep = h.obj("deployments")
        template = dep["spec"]["template"]
        assert dep["spec"]["selector"] == {
            "matchLabels": {"gateway.networking.k8s.io/gateway-name": "waypoint"}
        }
        assert template["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"
        assert template["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
        spec = template["spec"]
        assert spec["serviceAccountName"] == "waypoint"
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        c = container(dep)
        assert c["image"] == SETTINGS.image
        assert c["command"] == ["waypoint"] and c["args"] == ["--gateway", "shop/waypoint"]
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "capabilities": {"drop": ["ALL"]},
        }
        env = env_of(c)
        assert env["CA_ADDRESS"] == env["XDS_ADDRESS"] == "controlplane.istio-system.svc:15012"
        assert env["TRUST_DOMAIN"] == "cluster.local"
        assert {(p["name"], p["containerPort"]) for p in c["ports"]} == {
            ("mesh", 15008),
            ("status-port", 15021),
            ("metrics", 15020),
        }
        assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"}
        assert c["resources"] == {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "2", "memory": "1Gi"},
        }
        # The credentials: a projected token for the CA's audience, the root from the ConfigMap,
        # mounted where the env says the process finds them.
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        token_source = volumes["istio-token"]["projected"]["sources"][0]["serviceAccountToken"]
        assert token_source["audience"] == "istio-ca"
        assert env["TOKEN_FILE"] == f"{mounts['istio-token']['mountPath']}/{token_source['path']}"
        assert volumes["istio-ca-root-cert"]["configMap"]["name"] == "istio-ca-root-cert"
        assert env["CA_ROOT_CERT"] == f"{mounts['istio-ca-root-cert']['mountPath']}/root-cert.pem"
        assert all(m.get("readOnly") for n, m in mounts.items() if n != "tmp")
        assert not any("hostPath" in v for v in volumes.values())

        svc = h.obj("services")
        assert svc["spec"]["type"] == "ClusterIP"
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
            ("mesh", 15008, 15008),
            ("status-port", 15021, 15021),
            ("metrics", 15020, 15020),
        ]
        assert not h.exists("poddisruptionbudgets")  # none unless asked for

        # Nothing is ready yet: Accepted, not Programmed; the Service's address is published.
        assert h.condition_is("Accepted", "True", "Accepted")
        assert h.condition_is("Programmed", "False", "Pending")
        status = h.obj("gateways")["status"]
        assert status["addresses"] == [{"type": "IPAddress", "value": svc["spec"]["clusterIP"]}]
        assert status["conditions"][0]["observedGeneration"] == gw["metadata"]["generation"]


async def test_programmed_once_the_deployment_has_a_ready_replica(fake: FakeApiServer) -> None:
    fake.add(waypoint_gateway())
    async with controller(fake) as h:
        await h.until(lambda: h.condition_is("Programmed", "False", "Pending"))
        pending = h.condition("Programmed")
        assert pending is not None and "0/1" in pending["message"]
        fake.set_status("deployments", KEY, {"replicas": 1, "readyReplicas": 1})
        await h.until(lambda: h.condition_is("Programmed", "True", "Programmed"))
        programmed = h.condition("Programmed")
        assert programmed is not None and "1/1 replicas" in programmed["message"]
        # The deployment loses its ready replica: back to False.
        fake.set_status("deployments", KEY, {"replicas": 1, "readyReplicas": 0})
        await h.settled()
        assert h.condition_is("Programmed", "False", "Pending")


async def test_reconcile_writes_nothing_when_nothing_changed(fake: FakeApiServer) -> None:
    fake.add(waypoint_gateway())
    async with controller(fake) as h:
        await h.until(lambda: h.exists("deployments"))
        fake.set_status("deployments", KEY, {"replicas": 1, "readyReplicas": 1})
        await h.until(lambda: h.condition_is("Programmed", "True"))
        await h.settled()
        before, passes = len(fake.writes_of()), h.controller.reconciles
        for _ in range(3):
            await h.settled()
        assert h.controller.reconciles >= passes + 3
        assert fake.writes_of()[before:] == []

        # What a real API server adds by defaulting is not a difference either.
        dep = h.obj("deployments")
        dep["spec"]["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%"}}
        dep["spec"]["template"]["spec"]["restartPolicy"] = "Always"
        container(dep)["terminationMessagePath"] = "/dev/termination-log"
        container(dep)["readinessProbe"]["timeoutSeconds"] = 1
        fake.modify(dep)
        before = len(fake.writes_of())
        await h.settled()
        assert fake.writes_of()[before:] == []


async def test_annotation_change_updates_the_deployment_only(fake: FakeApiServer) -> None:
    fake.add(waypoint_gateway())
    async with controller(fake) as h:
        await h.until(lambda: all(h.exists(k) for k in KINDS))
        await h.settled()
        before = len(fake.writes_of())
        first = h.obj("deployments")

        fake.modify(waypoint_gateway(**{ANNOTATION_REPLICAS: "3", ANNOTATION_CPU: "250m"}))
        await h.until(lambda: h.obj("deployments")["spec"].get("replicas") == 3)
        dep = h.obj("deployments")
        assert container(dep)["resources"]["requests"]["cpu"] == "250m"
        assert dep["metadata"]["uid"] == first["metadata"]["uid"]  # replaced in place
        assert (
            dep["metadata"]["annotations"][ANNOTATION_HASH]
            != first["metadata"]["annotations"][ANNOTATION_HASH]
        )
        await h.settled()
        writes = [(w.method, w.plural, w.subresource) for w in fake.writes_of()[before:]]
        # The Deployment is replaced; the account and the Service are left alone.
        assert ("PUT", "deployments", "") in writes
        assert not [w for w in writes if w[1] in ("serviceaccounts", "services")]


async def test_replicas_left_to_an_autoscaler_when_not_asked_for(fake: FakeApiServer) -> None:
    fake.add(waypoint_gateway())
    async with controller(fake) as h:
        await h.until(lambda: h.exists("deployments"))
        await h.settled()
        dep = h.obj("deployments")
        assert "replicas" not in dep["spec"]
        dep["spec"]["replicas"] = 4  # an HPA scaled it
        fake.modify(dep)
        fake.modify(waypoint_gateway(**{ANNOTATION_MEMORY_LIMIT: "2Gi"}))
        await h.until(lambda: container(h.obj("deployments"))["resources"]["limits"]["memory"] == "2Gi")
        assert h.obj("deployments")["spec"]["replicas"] == 4


async def test_hand_edit_of_an_owned_field_is_undone(fake: FakeApiServer) -> None:
    fake.add(waypoint_gateway())
    async with controller(fake) as h:
        await h.until(lambda: h.exists("deployments"))
        dep = h.obj("deployments")
        container(dep)["securityContext"]["readOnlyRootFilesystem"] = False
        dep["metadata"]["labels"]["team"] = "web"  # someone else's label: kept
        fake.modify(dep)
        await h.settled()
        dep = h.obj("deployments")
        assert container(dep)["securityContext"]["readOnlyRootFilesystem"] is True
        assert dep["metadata"]["labels"]["team"] == "web"


async def test_pod_disruption_budget_from_annotations(fake: FakeApiServer) -> None:
    fake.add(waypoint_gateway(**{ANNOTATION_REPLICAS: "2", ANNOTATION_PDB_MIN_AVAILABLE: "1"}))
    async with controller(fake) as h:
        await h.until(lambda: h.exists("poddisruptionbudgets"))
        pdb = h.obj("poddisruptionbudgets")
        assert pdb["spec"]["minAvailable"] == 1
        assert pdb["spec"]["selector"] == h.obj("deployments")["spec"]["selector"]
        for version in KUBE_VERSIONS:
            validate_k8s(pdb, version)
        fake.modify(waypoint_gateway(**{ANNOTATION_REPLICAS: "2", ANNOTATION_PDB_MAX_UNAVAILABLE: "50%"}))
        await h.until(lambda: h.obj("poddisruptionbudgets")["spec"].get("maxUnavailable") == "50%")
        assert "minAvailable" not in h.obj("poddisruptionbudgets")["spec"]
        fake.modify(waypoint_gateway(**{ANNOTATION_REPLICAS: "2"}))
        await h.until(lambda: not h.exists("poddisruptionbudgets"))
        assert h.exists("deployments")


async def test_gateway_deleted_removes_what_was_made(fake: FakeApiServer) -> None:
    fake.add(waypoint_gateway(**{ANNOTATION_PDB_MIN_AVAILABLE: "1"}))
    fake.add(waypoint_gateway("other"))
    async with controller(fake) as h:
        await h.until(lambda: all(h.exists(k) for k in (*KINDS, "poddisruptionbudgets")))
        await h.until(lambda: h.exists("deployments", "shop/other"))
        fake.delete(h.obj("gateways"))
        await h.until(lambda: not any(h.exists(k) for k in (*KINDS, "poddisruptionbudgets")))
        assert all(h.exists(k, "shop/other") for k in KINDS)  # another waypoint's are untouched
        # Deleted with the uid as a precondition: never a newer object of the same name.
        deletes = [w for w in fake.writes_of() if w.method == "DELETE"]
        assert {(w.plural, w.ref, w.code) for w in deletes} == {
            (k, KEY, 200) for k in (*KINDS, "poddisruptionbudgets")
        }


async def test_gateway_of_another_class_is_not_deployed_and_leaving_the_class_removes(
    fake: FakeApiServer,
) -> None:
    ingress = gateway("ingress")
    ingress["spec"]["gatewayClassName"] = "istio"
    fake.add(ingress)
    fake.add(waypoint_gateway())
    async with controller(fake) as h:
        await h.until(lambda: h.exists("deployments"))
        await h.settled()
        assert not h.exists("deployments", "shop/ingress")
        moved = h.obj("gateways")
        moved["spec"]["gatewayClassName"] = "istio"
        fake.modify(moved)
        await h.until(lambda: not any(h.exists(k) for k in KINDS))


async def test_objects_not_ours_are_never_taken_over(fake: FakeApiServer) -> None:
    theirs = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "waypoint", "namespace": "shop", "labels": {"app": "legacy"}},
        "spec": {"selector": {"app": "legacy"}, "ports": [{"port": 80}]},
    }
    fake.add(theirs)
    fake.add(waypoint_gateway())
    with capture_logs() as logs:
        async with controller(fake) as h:
            await h.until(lambda: h.condition_is("Programmed", "False", "Invalid"))
            cond = h.condition("Programmed")
            assert cond is not None and "Service shop/waypoint exists and is not managed" in cond["message"]
            assert h.obj("services")["spec"]["selector"] == {"app": "legacy"}
            fake.delete(theirs)  # the user removes it: the retry (with backoff) makes ours
            await h.until(
                lambda: h.exists("services") and h.obj("services")["spec"]["selector"] != {"app": "legacy"}
            )
            # Deleting the Gateway leaves a same-named object it did not make alone.
            fake.delete(h.obj("gateways"))
            await h.until(lambda: not h.exists("deployments"))
    assert any(e["event"] == "waypoint reconcile failed, retrying" and e["gateway"] == KEY for e in logs)


async def test_api_errors_are_logged_with_the_object_and_retried(fake: FakeApiServer) -> None:
    fake.fail_writes["deployments"] = [500, 503, 429]
    fake.fail_writes["gateways"] = [500]  # the first status write
    fake.add(waypoint_gateway())
    with capture_logs() as logs:
        async with controller(fake) as h:
            await h.until(lambda: h.exists("deployments") and h.condition_is("Programmed", "False"))
            # A refusal that is about the object itself (403, 422) is also put in the status.
            fake.fail_writes["deployments"] = [403]
            fake.modify(waypoint_gateway(**{ANNOTATION_REPLICAS: "2"}))
            await h.until(lambda: h.condition_is("Programmed", "False", "Invalid"))
            cond = h.condition("Programmed")
            assert (
                cond is not None
                and "Deployment shop/waypoint" in cond["message"]
                and "403" in cond["message"]
            )
            await h.until(lambda: h.obj("deployments")["spec"].get("replicas") == 2)
            await h.until(lambda: h.condition_is("Programmed", "False", "Pending"))
    failures = [e for e in logs if e["event"] == "waypoint reconcile failed, retrying"]
    assert [e["status"] for e in failures if e["object"] == "Deployment shop/waypoint"] == [
        500,
        503,
        429,
        403,
    ]
    assert any(e["object"] == "Gateway shop/waypoint status" and e["status"] == 500 for e in failures)
    assert all(e["gateway"] == KEY and e["retry_in"] > 0 for e in failures)
    assert [e["attempt"] for e in failures[:3]] == [1, 2, 3]


async def test_conflicting_writer_is_retried_from_a_fresh_read(fake: FakeApiServer) -> None:
    fake.add(waypoint_gateway())
    async with controller(fake) as h:
        await h.until(lambda: h.exists("deployments"))
        await h.settled()
        fake.fail_writes["deployments"] = [409]
        fake.modify(waypoint_gateway(**{ANNOTATION_REPLICAS: "2"}))
        await h.until(lambda: h.obj("deployments")["spec"].get("replicas") == 2)
        codes = [w.code for w in fake.writes_of("deployments") if w.method == "PUT"]
        assert codes == [409, 200]


async def test_unreachable_api_server_never_crashes_the_controller(fake: FakeApiServer) -> None:
    store = Store()
    with running(fake, store, resources=(GATEWAYS,)):
        dead = FakeApiServer()
        dead_api = dead.api_client()
        dead.close()  # nothing listens there any more
        with capture_logs() as logs:
            c = WaypointController(
                store, Reconciler(KubeApi(dead_api, timeout=(1.0, 1.0)), SETTINGS), timing=FAST
            )
            c.start()
            try:
                fake.add(waypoint_gateway())
                await asyncio.to_thread(
                    lambda: _wait(
                        lambda: sum(e["event"] == "waypoint reconcile failed, retrying" for e in logs) >= 3
                    )
                )
            finally:
                await c.aclose()
        assert all(e["status"] == 0 for e in logs if e["event"] == "waypoint reconcile failed, retrying")


def _wait(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """For the one condition nothing signals (log lines): look every 10 ms."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


async def test_invalid_parameters_are_reported_and_the_waypoint_kept(fake: FakeApiServer) -> None:
    fake.add(waypoint_gateway())
    async with controller(fake) as h:
        await h.until(lambda: h.exists("deployments") and h.condition_is("Accepted", "True"))
        before = h.obj("deployments")
        fake.modify(waypoint_gateway(**{ANNOTATION_REPLICAS: "lots"}))
        await h.until(lambda: h.condition_is("Accepted", "False", "InvalidParameters"))
        cond = h.condition("Accepted")
        assert cond is not None and ANNOTATION_REPLICAS in cond["message"]
        assert h.condition_is("Programmed", "False", "Invalid")
        assert h.obj("deployments") == before  # a typo does not take the waypoint down

        with_ref = waypoint_gateway()
        with_ref["spec"]["infrastructure"] = {
            "parametersRef": {"group": "", "kind": "ConfigMap", "name": "x"}
        }
        fake.modify(with_ref)
        await h.until(lambda: "parametersRef" in (h.condition("Accepted") or {}).get("message", ""))

        fake.modify(waypoint_gateway())
        await h.until(lambda: h.condition_is("Accepted", "True"))


async def test_waypoint_pods_trigger_a_status_check(fake: FakeApiServer) -> None:
    """Readiness is seen through the pods the store watches, not only by polling."""
    fake.add(waypoint_gateway())
    slow = ControllerTiming(resync=3600.0, status_poll=3600.0, backoff=FAST.backoff)
    async with controller(fake, slow) as h:
        await h.until(lambda: h.condition_is("Programmed", "False", "Pending"))
        fake.set_status("deployments", KEY, {"replicas": 1, "readyReplicas": 1})
        labels = {"gateway.networking.k8s.io/gateway-name": "waypoint", "istio.io/dataplane-mode": "none"}
        fake.add(pod("waypoint-abc", "10.0.1.9", labels=labels))
        await h.until(lambda: h.condition_is("Programmed", "True"))


async def test_infrastructure_labels_and_annotations_are_copied(fake: FakeApiServer) -> None:
    gw = waypoint_gateway()
    gw["spec"]["infrastructure"] = {"labels": {"team": "web"}, "annotations": {"cost-center": "42"}}
    fake.add(gw)
    async with controller(fake) as h:
        await h.until(lambda: all(h.exists(k) for k in KINDS))
        for plural in KINDS:
            md = h.obj(plural)["metadata"]
            assert md["labels"]["team"] == "web" and md["annotations"]["cost-center"] == "42"
        template = h.obj("deployments")["spec"]["template"]["metadata"]
        assert template["labels"]["team"] == "web" and template["annotations"]["cost-center"] == "42"


# --- pure parts -------------------------------------------------------------------------------


def _gw(**annotations: str) -> dict[str, Any]:
    gw = waypoint_gateway(**annotations)
    gw["metadata"]["uid"] = "uid-1"
    return gw


def test_parameters_defaults() -> None:
    p = parameters(_gw())
    assert p == Parameters()
    assert p.replicas is None and not p.wants_pdb


@pytest.mark.parametrize(
    ("annotations", "complaint"),
    [
        ({ANNOTATION_REPLICAS: "-1"}, ANNOTATION_REPLICAS),
        ({ANNOTATION_REPLICAS: "1.5"}, ANNOTATION_REPLICAS),
        ({ANNOTATION_CPU: "lots"}, ANNOTATION_CPU),
        ({ANNOTATION_MEMORY_LIMIT: "1 Gi"}, ANNOTATION_MEMORY_LIMIT),
        ({ANNOTATION_PDB_MIN_AVAILABLE: "-1"}, ANNOTATION_PDB_MIN_AVAILABLE),
        ({ANNOTATION_PDB_MIN_AVAILABLE: "1", ANNOTATION_PDB_MAX_UNAVAILABLE: "1"}, "cannot both"),
    ],
)
def test_parameters_refused(annotations: dict[str, str], complaint: str) -> None:
    with pytest.raises(InvalidParameters, match=complaint):
        parameters(_gw(**annotations))


def test_rendered_objects_are_valid_kubernetes_with_every_parameter() -> None:
    gw = _gw(
        **{
            ANNOTATION_REPLICAS: "0",
            ANNOTATION_CPU: "1.5",
            ANNOTATION_MEMORY_LIMIT: "512Mi",
            ANNOTATION_PDB_MAX_UNAVAILABLE: "25%",
        }
    )
    gw["spec"]["infrastructure"] = {"labels": {"a": "b"}, "annotations": {"c": "d"}}
    objs = render(gw, parameters(gw), SETTINGS)
    assert [o["kind"] for o in objs.values()] == [
        "ServiceAccount",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ]
    for obj in objs.values():
        for version in KUBE_VERSIONS:
            validate_k8s(obj, version)
    # Rendering is deterministic: the same Gateway, the same hashes.
    again = render(copy.deepcopy(gw), parameters(gw), SETTINGS)
    assert [o["metadata"]["annotations"][ANNOTATION_HASH] for o in again.values()] == [
        o["metadata"]["annotations"][ANNOTATION_HASH] for o in objs.values()
    ]


def test_deployment_condition() -> None:
    def dep(replicas: int, ready: int | None) -> dict[str, Any]:
        status = {} if ready is None else {"readyReplicas": ready}
        return {
            "metadata": {"namespace": "shop", "name": "wp"},
            "spec": {"replicas": replicas},
            "status": status,
        }

    assert deployment_condition(None).reason == "Pending"
    assert deployment_condition(dep(2, None)) == Condition(
        "Programmed", False, "Pending", "0/2 replicas of Deployment shop/wp ready"
    )
    assert deployment_condition(dep(2, 1)).status is True
    assert deployment_condition(dep(0, None)).reason == "NoResources"


def test_desired_status_keeps_other_conditions_and_transition_times() -> None:
    gw = _gw()
    gw["metadata"]["generation"] = 3
    gw["status"] = {
        "conditions": [
            {"type": "Other", "status": "True", "reason": "X", "message": "theirs"},
            {
                "type": "Programmed",
                "status": "False",
                "reason": "Pending",
                "message": "0/1",
                "lastTransitionTime": "then",
                "observedGeneration": 3,
            },
        ]
    }
    same = Condition("Programmed", False, "Pending", "0/1")
    assert desired_status(gw, [same], None, now=lambda: "now") is None
    out = desired_status(gw, [Condition("Programmed", False, "Pending", "0/2")], None, now=lambda: "now")
    assert out is not None
    assert out["conditions"][0]["message"] == "theirs"
    assert out["conditions"][1]["lastTransitionTime"] == "then"  # same status: time kept
    out = desired_status(gw, [Condition("Programmed", True, "Programmed", "1/1")], None, now=lambda: "now")
    assert out is not None and out["conditions"][1]["lastTransitionTime"] == "now"
    assert desired_status(gw, [same], [{"type": "IPAddress", "value": "10.96.0.9"}]) is not None


def test_contains_ignores_what_defaulting_adds() -> None:
    assert contains({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": 2}})
    assert not contains({"a": [1, 2]}, {"a": [1]})  # lists: same length
    assert contains({"a": [{"x": 1, "y": 2}]}, {"a": [{"x": 1}]})
    assert not contains({"a": {"x": 1}}, {"a": {"x": 2}})
    assert not contains({}, {"a": None})


# --- wired into the control plane process --------------------------------------------------------


async def test_control_plane_runs_the_controller_with_waypoint_image(tmp_path: Path) -> None:
    """``ambient-controlplane --kubernetes --waypoint-image``: Gateways become waypoints, a
    change only the watch event carries (spec.infrastructure) reaches them, SIGTERM stops it."""
    from tests.controlplane.test_main import CMD, wait_ready

    with FakeApiServer() as fake:
        fake.add(namespace("shop"))
        fake.add(waypoint_gateway())
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters: [{{name: fake, cluster: {{server: '{fake.url}'}}}}]\n"
            "users: [{name: fake, user: {token: admin}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n"
        )
        state, ready, log = tmp_path / "state", tmp_path / "ready", tmp_path / "log"
        args = ["--kubernetes", "--kubeconfig", str(kubeconfig), "--state-dir", str(state)]
        args += ["--listen", "127.0.0.1:0", "--ready-file", str(ready), "--waypoint-image", "img:1"]
        env = {**os.environ, "POD_NAMESPACE": "mesh-system"}
        proc = _spawn([*CMD, *args], log, env)
        try:
            await wait_ready(proc, ready, log)
            await asyncio.to_thread(fake.wait_for, lambda: fake.get("deployments", KEY) is not None, TIMEOUT)
            dep = fake.get("deployments", KEY)
            assert dep is not None
            c = container(dep)
            assert c["image"] == "img:1"
            assert env_of(c)["CA_ADDRESS"] == "controlplane.mesh-system.svc:15012"

            gw = fake.get("gateways", KEY)
            assert gw is not None
            gw["spec"]["infrastructure"] = {"labels": {"team": "web"}}
            fake.modify(gw)

            def labelled() -> bool:
                d = fake.get("deployments", KEY) or {}
                return bool(d.get("metadata", {}).get("labels", {}).get("team") == "web")

            await asyncio.to_thread(fake.wait_for, labelled, TIMEOUT)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--local-config", "FILE", "--waypoint-image", "img:1"], "--waypoint-image only makes sense"),
        (["--kubernetes", "--waypoint-image", "img 1"], "not an image reference"),
        (["--kubernetes", "--waypoint-image", "img:1", "--waypoint-ca-address", "nohost"], "HOST:PORT"),
        (["--kubernetes", "--waypoint-image", "img:1", "--no-waypoint-controller"], "not allowed with"),
    ],
)
def test_waypoint_flags_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], complaint: str
) -> None:
    from controlplane.main import main

    config = tmp_path / "mesh.yaml"
    config.write_text("")
    argv = [a.replace("FILE", str(config)) for a in args] + ["--state-dir", str(tmp_path / "state")]
    with contextlib.suppress(SystemExit):
        assert main(argv) == 2
    assert complaint in capsys.readouterr().err


def test_waypoint_settings_from_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from controlplane.main import build_parser, waypoint_settings

    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    parse = build_parser().parse_args
    assert waypoint_settings(parse(["--kubernetes"])) is None
    assert waypoint_settings(parse(["--kubernetes", "--no-waypoint-controller"])) is None
    s = waypoint_settings(
        parse(["--kubernetes", "--waypoint-image", "img:1", "--trust-domain", "example.org"])
    )
    assert s == WaypointSettings(
        "img:1", "controlplane.istio-system.svc:15012", "example.org", "IfNotPresent"
    )
    s = waypoint_settings(
        parse(["--kubernetes", "--waypoint-image", "i", "--waypoint-ca-address", "cp.example:443"])
    )
    assert s is not None and s.ca_address == "cp.example:443"
