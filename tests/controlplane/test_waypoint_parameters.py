"""A waypoint Gateway's ``spec.infrastructure.parametersRef``: the ConfigMap Istio reads
(``deployment`` / ``podDisruptionBudget`` overlays), read by the waypoint controller for the
replicas, resources and disruption budget, anything else refused by name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from controlplane.waypoint_controller import (
    ANNOTATION_CPU,
    ANNOTATION_PDB_MAX_UNAVAILABLE,
    ANNOTATION_REPLICAS,
    DEFAULT_LIMITS,
    InvalidParameters,
    parameters,
    parameters_ref,
)
from tests.controlplane.test_waypoint_controller import controller, waypoint_gateway
from tests.k8s.fakeapi import FakeApiServer
from tests.k8s.helpers import namespace


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        server.add(namespace("shop"))
        yield server


def config_map(name: str = "waypoint-options", **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "shop"},
        "data": data,
    }


def with_ref(gw: dict[str, Any], name: str = "waypoint-options", **ref: str) -> dict[str, Any]:
    gw["spec"]["infrastructure"] = {"parametersRef": {"group": "", "kind": "ConfigMap", "name": name, **ref}}
    return gw


DEPLOYMENT = """
spec:
  replicas: 3
  template:
    spec:
      containers:
      - name: istio-proxy
        resources:
          requests: {cpu: 500m, memory: 256Mi}
          limits: {memory: 2Gi}
"""


def test_deployment_and_pdb_overlays_are_read_and_win_over_annotations() -> None:
    gw = with_ref(waypoint_gateway(**{ANNOTATION_REPLICAS: "1", ANNOTATION_CPU: "100m"}))
    cm = config_map(deployment=DEPLOYMENT, podDisruptionBudget="spec: {minAvailable: 50%}")
    p = parameters(gw, cm)
    assert p.replicas == 3
    assert dict(p.requests) == {"cpu": "500m", "memory": "256Mi"}
    assert dict(p.limits) == {"cpu": DEFAULT_LIMITS["cpu"], "memory": "2Gi"}
    assert (p.pdb_min_available, p.pdb_max_unavailable) == ("50%", None)
    # The ConfigMap's budget replaces the annotation's (not both at once).
    gw = with_ref(waypoint_gateway(**{ANNOTATION_PDB_MAX_UNAVAILABLE: "1"}))
    p = parameters(gw, config_map(podDisruptionBudget="spec: {minAvailable: 2}"))
    assert (p.pdb_min_available, p.pdb_max_unavailable) == (2, None)
    # Our own container name works too; an empty ConfigMap changes nothing.
    p = parameters(gw, config_map(deployment=DEPLOYMENT.replace("istio-proxy", "waypoint")))
    assert p.replicas == 3
    assert parameters(with_ref(waypoint_gateway()), config_map()) == parameters(waypoint_gateway())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"service": "spec: {type: LoadBalancer}"}, "data.service is not supported"),
        ({"deployment": "spec: {replicas: many}"}, "deployment.spec.replicas: 'many'"),
        ({"deployment": "spec: {replicas: 1001}"}, "from 0 to 1000"),
        ({"deployment": "metadata: {labels: {a: b}}"}, "deployment.metadata is not supported"),
        (
            {"deployment": "spec: {template: {spec: {nodeSelector: {a: b}}}}"},
            "deployment.spec.template.spec.nodeSelector is not supported",
        ),
        (
            {"deployment": "spec: {template: {spec: {containers: [{name: app}]}}}"},
            "containers[0].name: 'app' is not the waypoint container",
        ),
        (
            {"deployment": "spec: {template: {spec: {containers: [{name: waypoint, image: x}]}}}"},
            "containers[0].image is not supported",
        ),
        (
            {
                "deployment": "spec: {template: {spec: {containers: [{name: waypoint, resources: {requests: {cpu: lots}}}]}}}"
            },
            "resources.requests.cpu: 'lots' is not a Kubernetes quantity",
        ),
        ({"deployment": "spec: [1"}, "deployment: invalid YAML"),
        ({"podDisruptionBudget": "spec: {minAvailable: 1, maxUnavailable: 1}"}, "cannot both be set"),
        ({"podDisruptionBudget": "spec: {minAvailable: -1}"}, "podDisruptionBudget.spec.minAvailable"),
        (
            {"podDisruptionBudget": "spec: {selector: {}}"},
            "podDisruptionBudget.spec.selector is not supported",
        ),
    ],
)
def test_what_is_not_supported_is_refused_by_name(data: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidParameters, match="ConfigMap shop/waypoint-options") as e:
        parameters(with_ref(waypoint_gateway()), config_map(**data))
    assert message in str(e.value)


def test_references_to_anything_but_a_config_map_are_refused() -> None:
    assert parameters_ref(waypoint_gateway()) is None
    assert parameters_ref(with_ref(waypoint_gateway(), "opts")) == "opts"
    with pytest.raises(InvalidParameters, match="is not supported"):
        parameters_ref(with_ref(waypoint_gateway(), kind="Secret"))
    with pytest.raises(InvalidParameters, match="is not supported"):
        parameters_ref(with_ref(waypoint_gateway(), group="gateway.istio.io"))
    with pytest.raises(InvalidParameters, match="name is required"):
        parameters_ref(with_ref(waypoint_gateway(), ""))


async def test_controller_reads_the_config_map(fake: FakeApiServer) -> None:
    fake.add(with_ref(waypoint_gateway()))
    async with controller(fake) as h:
        # Missing: refused, saying which ConfigMap; nothing deployed.
        await h.until(lambda: h.condition_is("Accepted", "False", "InvalidParameters"))
        cond = h.condition("Accepted")
        assert cond is not None and "ConfigMap shop/waypoint-options does not exist" in cond["message"]
        assert not h.exists("deployments")
        # Created: deployed with its replicas, resources and budget.
        fake.add(config_map(deployment=DEPLOYMENT, podDisruptionBudget="spec: {maxUnavailable: 1}"))
        await h.settled()
        await h.until(lambda: h.condition_is("Accepted", "True") and h.exists("deployments"))
        dep = h.obj("deployments")
        assert dep["spec"]["replicas"] == 3
        resources = dep["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"] == {"cpu": "500m", "memory": "256Mi"}
        assert h.obj("poddisruptionbudgets")["spec"]["maxUnavailable"] == 1
        # Edited: the next reconcile applies it (the Deployment is replaced, the PDB removed).
        cm = fake.get("configmaps", "shop/waypoint-options")
        assert cm is not None
        cm["data"] = {"deployment": "spec: {replicas: 2}"}
        fake.modify(cm)
        await h.settled()
        assert h.obj("deployments")["spec"]["replicas"] == 2
        assert not h.exists("poddisruptionbudgets")
        assert [w.method for w in fake.writes_of("configmaps")] == []  # read, never written
