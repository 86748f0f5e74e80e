"""The fake API server refuses what kube-apiserver refuses, for the writes a controller makes:
otherwise a controller tested against it could pass here and fail on a cluster."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.k8s.fakeapi import FakeApiServer
from tests.k8s.helpers import gateway, namespace

DEPLOYMENTS = "/apis/apps/v1/namespaces/shop/deployments"
SERVICES = "/api/v1/namespaces/shop/services"
ACCOUNTS = "/api/v1/namespaces/shop/serviceaccounts"
PDBS = "/apis/policy/v1/namespaces/shop/poddisruptionbudgets"
GATEWAYS = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways"


def call(
    fake: FakeApiServer, method: str, path: str, body: Any = None, content_type: str = "application/json"
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(fake.url + path, data=data, method=method)
    req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def deployment(name: str = "wp", app: str = "wp", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "selector": {"matchLabels": {"app": app}},
            "template": {
                "metadata": {"labels": {"app": app}},
                "spec": {"containers": [{"name": "c", "image": "img:1"}]},
            },
            **spec,
        },
    }


def service(name: str = "wp", cluster_ip: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"app": "wp"}, "ports": [{"name": "mesh", "port": 15008}]}
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def shop(fake: FakeApiServer) -> FakeApiServer:
    fake.add(namespace("shop"))
    return fake


def test_create_sets_server_fields_and_refuses_a_second_create(shop: FakeApiServer) -> None:
    code, made = call(shop, "POST", DEPLOYMENTS, deployment())
    assert code == 201
    md = made["metadata"]
    assert md["namespace"] == "shop" and md["uid"] and md["resourceVersion"] and md["generation"] == 1
    assert "status" not in made
    code, again = call(shop, "POST", DEPLOYMENTS, deployment())
    assert (code, again["reason"]) == (409, "AlreadyExists")
    assert again["details"] == {"name": "wp", "group": "apps", "kind": "deployments"}
    code, got = call(shop, "GET", f"{DEPLOYMENTS}/wp")
    assert code == 200 and got["metadata"]["uid"] == md["uid"]
    assert [(w.method, w.code) for w in shop.writes_of("deployments")] == [("POST", 201), ("POST", 409)]


def test_create_refusals(shop: FakeApiServer) -> None:
    code, out = call(shop, "POST", "/apis/apps/v1/namespaces/nowhere/deployments", deployment())
    assert (code, out["reason"]) == (404, "NotFound") and "nowhere" in out["message"]
    with_rv = deployment()
    with_rv["metadata"]["resourceVersion"] = "7"
    code, out = call(shop, "POST", DEPLOYMENTS, with_rv)
    assert code == 500 and "resourceVersion should not be set" in out["message"]
    code, out = call(shop, "POST", DEPLOYMENTS, service())
    assert code == 400  # a Service posted to deployments
    other_ns = deployment()
    other_ns["metadata"]["namespace"] = "kube-system"
    code, out = call(shop, "POST", DEPLOYMENTS, other_ns)
    assert code == 400 and "does not match the namespace" in out["message"]
    code, out = call(shop, "POST", DEPLOYMENTS, deployment(name="Not_A_Name"))
    assert (code, out["reason"]) == (422, "Invalid")
    assert shop.objects("deployments") == {}


def test_schema_validation_of_builtin_kinds(shop: FakeApiServer) -> None:
    code, out = call(shop, "POST", DEPLOYMENTS, deployment(replicas="two"))
    assert (code, out["reason"]) == (422, "Invalid") and "replicas" in out["message"]
    code, out = call(shop, "POST", DEPLOYMENTS, deployment(replicaCount=2))  # unknown field
    assert code == 422 and "replicaCount" in out["message"]
    no_selector = deployment()
    del no_selector["spec"]["selector"]
    code, out = call(shop, "POST", DEPLOYMENTS, no_selector)
    assert code == 422 and "selector" in out["message"]
    bad_owner = deployment()
    bad_owner["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "X", "name": "x"}]  # no uid
    code, out = call(shop, "POST", DEPLOYMENTS, bad_owner)
    assert code == 422 and "uid" in out["message"]


def test_owner_references_are_kept_and_at_most_one_controller(shop: FakeApiServer) -> None:
    ref = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": "wp", "uid": "u1"}
    owned = deployment()
    owned["metadata"]["ownerReferences"] = [{**ref, "controller": True, "blockOwnerDeletion": True}]
    code, made = call(shop, "POST", DEPLOYMENTS, owned)
    assert code == 201
    assert made["metadata"]["ownerReferences"] == owned["metadata"]["ownerReferences"]
    assert (shop.get("deployments", "shop/wp") or {})["metadata"]["ownerReferences"] == owned["metadata"][
        "ownerReferences"
    ]
    two = deployment(name="wp2")
    two["metadata"]["ownerReferences"] = [
        {**ref, "controller": True},
        {**ref, "uid": "u2", "controller": True},
    ]
    code, out = call(shop, "POST", DEPLOYMENTS, two)
    assert code == 422 and "Controller" in out["message"]


def test_replace_is_optimistic_and_keeps_what_is_the_servers(shop: FakeApiServer) -> None:
    _, made = call(shop, "POST", DEPLOYMENTS, deployment())
    shop.set_status("deployments", "shop/wp", {"readyReplicas": 1})
    current = shop.get("deployments", "shop/wp")
    assert current is not None
    stale = json.loads(json.dumps(made))  # the resourceVersion of before the status write
    stale["spec"]["replicas"] = 3
    code, out = call(shop, "PUT", f"{DEPLOYMENTS}/wp", stale)
    assert (code, out["reason"]) == (409, "Conflict") and "latest version" in out["message"]

    fresh = json.loads(json.dumps(current))
    fresh["spec"]["replicas"] = 3
    fresh["status"] = {"readyReplicas": 99}  # ignored: the status subresource's
    fresh["metadata"]["uid"] = made["metadata"]["uid"]
    code, out = call(shop, "PUT", f"{DEPLOYMENTS}/wp", fresh)
    assert code == 200
    assert out["spec"]["replicas"] == 3 and out["status"] == {"readyReplicas": 1}
    assert out["metadata"]["generation"] == 2 and out["metadata"]["uid"] == made["metadata"]["uid"]
    assert int(out["metadata"]["resourceVersion"]) > int(current["metadata"]["resourceVersion"])

    unconditional = json.loads(json.dumps(out))
    del unconditional["metadata"]["resourceVersion"]
    unconditional["metadata"]["labels"]["x"] = "y"
    code, out2 = call(shop, "PUT", f"{DEPLOYMENTS}/wp", unconditional)
    assert code == 200 and out2["metadata"]["generation"] == 2  # metadata only: same generation

    wrong_uid = json.loads(json.dumps(out2))
    wrong_uid["metadata"]["uid"] = "someone-else"
    assert call(shop, "PUT", f"{DEPLOYMENTS}/wp", wrong_uid)[0] == 409


def test_replace_refusals(shop: FakeApiServer) -> None:
    code, out = call(shop, "PUT", f"{DEPLOYMENTS}/wp", deployment())
    assert (code, out["reason"]) == (404, "NotFound")
    _, made = call(shop, "POST", DEPLOYMENTS, deployment())
    moved = deployment(app="other")
    moved["metadata"]["resourceVersion"] = made["metadata"]["resourceVersion"]
    code, out = call(shop, "PUT", f"{DEPLOYMENTS}/wp", moved)
    assert code == 422 and "spec.selector" in out["message"] and "immutable" in out["message"]
    renamed = deployment(name="wp2")
    assert call(shop, "PUT", f"{DEPLOYMENTS}/wp", renamed)[0] == 400
    invalid = json.loads(json.dumps(made))
    invalid["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": "http"}]
    assert call(shop, "PUT", f"{DEPLOYMENTS}/wp", invalid)[0] == 422


def test_service_cluster_ip_is_allocated_and_immutable(shop: FakeApiServer) -> None:
    code, made = call(shop, "POST", SERVICES, service())
    assert code == 201
    ip = made["spec"]["clusterIP"]
    assert ip.startswith("10.96.") and made["spec"]["clusterIPs"] == [ip]
    _, other = call(shop, "POST", SERVICES, service("other"))
    assert other["spec"]["clusterIP"] != ip
    update = service()
    update["metadata"]["resourceVersion"] = made["metadata"]["resourceVersion"]
    code, out = call(shop, "PUT", f"{SERVICES}/wp", update)  # no clusterIP: the allocated one stays
    assert code == 200 and out["spec"]["clusterIP"] == ip
    moved = service(cluster_ip="10.96.9.9")
    code, out = call(shop, "PUT", f"{SERVICES}/wp", moved)
    assert code == 422 and "clusterIP" in out["message"]
    headless = service("headless", cluster_ip="None")
    assert call(shop, "POST", SERVICES, headless)[1]["spec"]["clusterIP"] == "None"


def test_delete_with_preconditions(shop: FakeApiServer) -> None:
    code, out = call(shop, "DELETE", f"{ACCOUNTS}/wp")
    assert (code, out["reason"]) == (404, "NotFound")
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "wp"}}
    _, made = call(shop, "POST", ACCOUNTS, account)
    code, out = call(shop, "DELETE", f"{ACCOUNTS}/wp", {"preconditions": {"uid": "not-it"}})
    assert code == 409 and "Precondition failed" in out["message"]
    code, out = call(shop, "DELETE", f"{ACCOUNTS}/wp", {"preconditions": {"resourceVersion": "1"}})
    assert code == 409
    code, out = call(shop, "DELETE", f"{ACCOUNTS}/wp", {"preconditions": {"uid": made["metadata"]["uid"]}})
    assert (code, out["status"]) == (200, "Success")
    assert shop.get("serviceaccounts", "shop/wp") is None
    _, again = call(shop, "POST", ACCOUNTS, account)
    assert again["metadata"]["uid"] != made["metadata"]["uid"]  # a new object, a new uid


def test_status_writes(shop: FakeApiServer) -> None:
    gw = shop.add({**gateway("wp"), "status": {"conditions": []}})
    rv = gw["metadata"]["resourceVersion"]
    patch: dict[str, Any] = {
        "metadata": {"resourceVersion": "1"},
        "status": {"conditions": [{"type": "Programmed"}]},
    }
    code, out = call(shop, "PATCH", f"{GATEWAYS}/wp/status", patch, "application/merge-patch+json")
    assert (code, out["reason"]) == (409, "Conflict")
    patch["metadata"]["resourceVersion"] = rv
    code, out = call(shop, "PATCH", f"{GATEWAYS}/wp/status", patch, "application/merge-patch+json")
    assert code == 200 and out["status"]["conditions"] == [{"type": "Programmed"}]
    assert out["spec"] == gw["spec"] and out["metadata"]["generation"] == gw["metadata"]["generation"]

    replaced = json.loads(json.dumps(out))
    replaced["status"] = {"conditions": [{"type": "Accepted"}]}
    replaced["spec"]["gatewayClassName"] = "ignored"  # a status write changes the status only
    code, out = call(shop, "PUT", f"{GATEWAYS}/wp/status", replaced)
    assert code == 200 and out["status"] == {"conditions": [{"type": "Accepted"}]}
    assert out["spec"]["gatewayClassName"] == "istio-waypoint"
    assert call(shop, "PUT", f"{GATEWAYS}/wp/status", replaced)[0] == 409  # stale now
    assert [w.subresource for w in shop.writes_of("gateways")] == ["status"] * 4


def test_namespaced_list_by_name_and_get(shop: FakeApiServer) -> None:
    shop.add(gateway("wp"))
    shop.add(gateway("other"))
    shop.add(gateway("wp", ns="elsewhere"))
    code, out = call(shop, "GET", f"{GATEWAYS}?fieldSelector=metadata.name%3Dwp")
    assert code == 200 and [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in out["items"]] == [
        ("shop", "wp")
    ]
    code, out = call(shop, "GET", GATEWAYS)
    assert sorted(i["metadata"]["name"] for i in out["items"]) == ["other", "wp"]
    assert call(shop, "GET", f"{GATEWAYS}?fieldSelector=spec.x%3Dy")[0] == 400
    code, out = call(shop, "GET", f"{DEPLOYMENTS}/missing")
    assert (code, out["kind"], out["reason"]) == (404, "Status", "NotFound")


def test_injected_write_failures_are_recorded(shop: FakeApiServer) -> None:
    shop.fail_writes["poddisruptionbudgets"] = [503, 403]
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "wp"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "wp"}}},
    }
    assert call(shop, "POST", PDBS, pdb)[0] == 503
    code, out = call(shop, "POST", PDBS, pdb)
    assert (code, out["reason"]) == (403, "Forbidden")
    assert call(shop, "POST", PDBS, pdb)[0] == 201
    assert [w.code for w in shop.writes_of("poddisruptionbudgets")] == [503, 403, 201]


CONFIGMAPS = "/api/v1/namespaces/shop/configmaps"


def configmap(name: str = "cm", **fields: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, **fields}


def test_configmap_validation_beyond_the_schema(shop: FakeApiServer) -> None:
    code, out = call(shop, "POST", CONFIGMAPS, configmap(data={"root cert": "x"}))
    assert (code, out["reason"]) == (422, "Invalid") and "config key" in out["message"]
    code, out = call(shop, "POST", CONFIGMAPS, configmap(data={"a": "x"}, binaryData={"a": "eA=="}))
    assert code == 422 and "duplicate of key present in binaryData" in out["message"]
    code, out = call(shop, "POST", CONFIGMAPS, configmap(data={"a": "x" * (1024 * 1024 + 1)}))
    assert code == 422 and "Too long" in out["message"]
    code, out = call(shop, "POST", CONFIGMAPS, configmap(data={"a": 1}))  # the schema: strings only
    assert code == 422
    assert shop.objects("configmaps") == {}
    code, _ = call(shop, "POST", CONFIGMAPS, configmap(data={"root-cert.pem": "x", "a.b_c-1": "y"}))
    assert code == 201


def test_immutable_configmap_keeps_its_data(shop: FakeApiServer) -> None:
    code, made = call(shop, "POST", CONFIGMAPS, configmap(data={"a": "1"}, immutable=True))
    assert code == 201
    changed = {**made, "data": {"a": "2"}}
    code, out = call(shop, "PUT", f"{CONFIGMAPS}/cm", changed)
    assert (code, out["reason"]) == (422, "Invalid") and "immutable" in out["message"]
    code, out = call(shop, "PUT", f"{CONFIGMAPS}/cm", {**made, "immutable": False})
    assert code == 422 and "immutable" in out["message"]
    relabelled = {**made, "metadata": {**made["metadata"], "labels": {"x": "y"}}}
    code, _ = call(shop, "PUT", f"{CONFIGMAPS}/cm", relabelled)
    assert code == 200  # metadata may still change


def test_no_new_objects_in_a_terminating_namespace(shop: FakeApiServer) -> None:
    leaving = namespace("leaving")
    leaving["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    leaving["status"] = {"phase": "Terminating"}
    shop.add(leaving)
    code, out = call(shop, "POST", "/api/v1/namespaces/leaving/configmaps", configmap())
    assert (code, out["reason"]) == (403, "Forbidden") and "being terminated" in out["message"]
    assert out["details"]["causes"][0]["type"] == "NamespaceTerminating"
    assert [(w.method, w.ref, w.code) for w in shop.writes_of("configmaps")] == [("POST", "leaving/cm", 403)]


def test_cluster_wide_list_by_name(shop: FakeApiServer) -> None:
    shop.add(namespace("web"))
    for ns in ("shop", "web"):
        for name in ("istio-ca-root-cert", "other"):
            assert call(shop, "POST", f"/api/v1/namespaces/{ns}/configmaps", configmap(name))[0] == 201
    code, out = call(shop, "GET", "/api/v1/configmaps?fieldSelector=metadata.name%3Distio-ca-root-cert")
    assert code == 200
    assert sorted((i["metadata"]["namespace"], i["metadata"]["name"]) for i in out["items"]) == [
        ("shop", "istio-ca-root-cert"),
        ("web", "istio-ca-root-cert"),
    ]
