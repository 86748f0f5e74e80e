"""KubernetesSource against the in-process fake API server, through the real client code."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from mesh.model import AuthorizationPolicy, Kind, MtlsMode, Snapshot, Store, WorkloadStatus
from sources.convert import ConvertOptions, authorization_policy_from_k8s
from sources.kubernetes import (
    CONDITION_ZTUNNEL_ACCEPTED,
    RESOURCES,
    Backoff,
    KubernetesSource,
    ztunnel_condition,
)
from tests.k8s.fakeapi import FakeApiServer
from tests.k8s.helpers import (
    FAST_BACKOFF,
    TIMING,
    authorization_policy,
    endpoint_slice,
    gateway,
    namespace,
    node,
    peer_authentication,
    pod,
    request_authentication,
    running,
    service,
    wait_store,
)

L7_RULES = [{"to": [{"operation": {"methods": ["GET"]}}]}]
L4_RULES = [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}]}]


def _pod_names(s: Snapshot) -> set[str]:
    return {w.name for w in s.workloads.values()}


def _fill(fake: FakeApiServer) -> None:
    fake.add(namespace("shop", **{"istio.io/dataplane-mode": "ambient"}))
    fake.add(node("node-a"))
    fake.add(pod("web-1", "10.0.1.2"))
    fake.add(service("web", "10.96.0.20"))
    fake.add(endpoint_slice("web-abc", "web", "10.0.1.2"))
    fake.add(authorization_policy("allow-frontend", rules=L4_RULES))
    fake.add(peer_authentication("strict"))
    fake.add(request_authentication("jwt"))
    fake.add(gateway("waypoint"))


# --- sync --------------------------------------------------------------------------------------


def test_initial_sync_of_every_kind(fake: FakeApiServer, store: Store) -> None:
    _fill(fake)
    list_rv = str(fake.resource_version)
    with running(fake, store) as source:
        s = store.snapshot()
        assert set(s.namespaces) == {"shop"}
        assert s.namespaces["shop"].labels == {"istio.io/dataplane-mode": "ambient"}
        assert set(s.nodes) == {"node-a"}
        w = s.workload_by_ip("10.0.1.2")
        assert w is not None
        assert (w.uid, w.node, w.service_account) == ("uid-shop-web-1", "node-a", "web")
        assert set(s.services) == {"shop/web"}
        assert s.endpoints("shop/web") == (w,)
        assert set(s.authorization_policies) == {"shop/allow-frontend"}
        assert s.peer_authentications["shop/strict"].mtls_mode is MtlsMode.STRICT
        assert s.request_authentications["shop/jwt"].jwt_rules[0].issuer == "https://issuer.example"
        assert s.gateways["shop/waypoint"].is_waypoint
        # EndpointSlices have no place in the model; the source keeps them.
        slices = source.endpoint_slices()
        assert set(slices) == {"shop/web-abc"}
        assert slices["shop/web-abc"]["endpoints"][0]["addresses"] == ["10.0.1.2"]

        # Every resource was listed, then watched from the list's resourceVersion with bookmarks.
        assert {plural for plural, _ in fake.list_requests} == {r.plural for r in RESOURCES}
        for r in RESOURCES:
            first = fake.wait_for_watches(r.plural, 1)[0]
            assert first.resource_version == list_rv, r.plural
            assert first.allow_bookmarks
            assert first.timeout_seconds == TIMING.watch_timeout


def test_initial_list_replaces_what_the_store_had(fake: FakeApiServer, store: Store) -> None:
    """Objects deleted while nobody watched disappear on the first list."""
    fake.add(pod("web-1", "10.0.1.2"))
    with running(fake, store) as source:
        wait_store(store, lambda s: _pod_names(s) == {"web-1"})
        source.stop()
    fake.delete(pod("web-1", "10.0.1.2"))
    fake.add(pod("web-2", "10.0.1.3"))
    with running(fake, store):
        assert _pod_names(store.snapshot()) == {"web-2"}


def test_list_is_paged(fake: FakeApiServer, store: Store) -> None:
    for i in range(5):
        fake.add(pod(f"web-{i}", f"10.0.1.{i + 2}"))
    with running(fake, store, timing=dataclasses.replace(TIMING, page_size=2)):
        assert len(store.snapshot().workloads) == 5
        pod_lists = [q for plural, q in fake.list_requests if plural == "pods"]
        assert [q.get("continue") for q in pod_lists] == [None, ["2"], ["4"]]
        assert all(q["limit"] == ["2"] for q in pod_lists)


async def test_wait_synced_from_asyncio(fake: FakeApiServer, store: Store) -> None:
    _fill(fake)
    api = fake.api_client()
    source = KubernetesSource(api, store, backoff=FAST_BACKOFF, timing=TIMING)
    try:
        source.start()
        assert await source.wait_synced(5)
        assert await source.wait_synced(0)  # already synced: returns at once
        assert store.snapshot().workloads
    finally:
        await source.astop()
        api.close()


async def test_wait_synced_times_out_while_api_fails(fake: FakeApiServer, store: Store) -> None:
    fake.fail_next["nodes"] = 10_000
    api = fake.api_client()
    source = KubernetesSource(api, store, backoff=FAST_BACKOFF, timing=TIMING)
    try:
        source.start()
        assert not await source.wait_synced(0.2)
    finally:
        await source.astop()
        api.close()
    assert not source.synced.is_set()


# --- watch -------------------------------------------------------------------------------------


def test_add_modify_delete_propagate(fake: FakeApiServer, store: Store) -> None:
    fake.add(node("node-a"))
    with running(fake, store):
        fake.add(pod("web-1", "10.0.1.2"))
        wait_store(store, lambda s: s.workload_by_ip("10.0.1.2") is not None)

        modified = pod("web-1", "10.0.1.2", labels={"app": "web", "version": "v2"})
        modified["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
        fake.modify(modified)
        s = wait_store(store, lambda s: s.workloads["uid-shop-web-1"].labels.get("version") == "v2")
        assert s.workloads["uid-shop-web-1"].status is WorkloadStatus.UNHEALTHY

        fake.delete(modified)
        wait_store(store, lambda s: not s.workloads)

        fake.add(authorization_policy("p", rules=L4_RULES))
        fake.add(gateway("wp"))
        fake.add(namespace("other"))
        wait_store(store, lambda s: "shop/p" in s.authorization_policies and "shop/wp" in s.gateways)
        wait_store(store, lambda s: "other" in s.namespaces)
        fake.delete(authorization_policy("p"))
        fake.delete(node("node-a"))
        wait_store(store, lambda s: not s.authorization_policies and not s.nodes)


def test_endpoint_slices_are_followed(fake: FakeApiServer, store: Store) -> None:
    seen = threading.Condition()
    events: list[tuple[str, str]] = []

    def on_event(plural: str, etype: str, obj: Any) -> None:
        with seen:
            events.append((plural, etype))
            seen.notify_all()

    with running(fake, store, on_event=on_event) as source:
        fake.add(endpoint_slice("web-abc", "web", "10.0.1.2"))
        with seen:
            assert seen.wait_for(lambda: ("endpointslices", "ADDED") in events, 5)
        assert set(source.endpoint_slices()) == {"shop/web-abc"}
        fake.delete(endpoint_slice("web-abc", "web", "10.0.1.2"))
        with seen:
            assert seen.wait_for(lambda: ("endpointslices", "DELETED") in events, 5)
        assert source.endpoint_slices() == {}


def test_pod_recreated_with_new_uid_replaces_the_old_workload(fake: FakeApiServer, store: Store) -> None:
    with running(fake, store):
        fake.add(pod("web-1", "10.0.1.2"))
        wait_store(store, lambda s: "uid-shop-web-1" in s.workloads)
        recreated = pod("web-1", "10.0.1.9")
        recreated["metadata"]["uid"] = "uid-new"
        fake.modify(recreated)  # an ADDED after a missed DELETED looks the same to us
        s = wait_store(store, lambda s: "uid-new" in s.workloads)
        assert set(s.workloads) == {"uid-new"}


def test_dropped_watch_resumes_from_last_resource_version(fake: FakeApiServer, store: Store) -> None:
    with running(fake, store):
        created = fake.add(pod("web-1", "10.0.1.2"))
        wait_store(store, lambda s: _pod_names(s) == {"web-1"})
        lists_before = sum(p == "pods" for p, _ in fake.list_requests)

        fake.drop_watches()
        fake.add(pod("web-2", "10.0.1.3"))  # while the watch is down (or just back)
        wait_store(store, lambda s: _pod_names(s) == {"web-1", "web-2"})

        resumed = fake.wait_for_watches("pods", 2)[1]
        assert resumed.resource_version == created["metadata"]["resourceVersion"]
        assert sum(p == "pods" for p, _ in fake.list_requests) == lists_before  # no relist


def test_bookmark_advances_resource_version(fake: FakeApiServer, store: Store) -> None:
    with running(fake, store) as source:
        rv = fake.bookmark("pods")
        fake.wait_for(lambda: fake.delivered["pods"] >= rv)
        fake.drop_watches()
        resumed = fake.wait_for_watches("pods", 2)[1]
        assert resumed.resource_version == str(rv)
        assert source.resource_versions()["pods"] == str(rv)


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
def test_gone_relists_and_applies_what_was_missed(gone_as_http: bool, store: Store) -> None:
    with FakeApiServer(gone_as_http=gone_as_http) as fake:
        fake.add(pod("web-1", "10.0.1.2"))
        fake.add(pod("web-2", "10.0.1.3"))
        with running(fake, store):
            wait_store(store, lambda s: _pod_names(s) == {"web-1", "web-2"})
            # Changes whose events were compacted away: only a relist can find them.
            fake.delete(pod("web-1", "10.0.1.2"), silent=True)
            fake.modify(pod("web-2", "10.0.1.3", labels={"app": "web", "v": "2"}), silent=True)
            fake.add(pod("web-3", "10.0.1.4"), silent=True)
            if gone_as_http:
                fake.expire("pods", notify=False)
                fake.drop_watches()  # the resumed watch is refused with HTTP 410
            else:
                fake.expire("pods")  # the open watch gets an ERROR event with code 410
            s = wait_store(store, lambda s: _pod_names(s) == {"web-2", "web-3"})
            assert s.workloads["uid-shop-web-2"].labels["v"] == "2"
            assert sum(p == "pods" for p, _ in fake.list_requests) == 2

            # And it keeps watching from the new list.
            fake.add(pod("web-4", "10.0.1.5"))
            wait_store(store, lambda s: "web-4" in _pod_names(s))


def test_malformed_object_is_logged_and_skipped(fake: FakeApiServer, store: Store) -> None:
    bad_service = service("broken", "10.96.0.30")
    bad_service["spec"]["ports"] = [{"port": 70000}]
    fake.add(bad_service)
    fake.add(service("web", "10.96.0.20"))
    with capture_logs() as logs, running(fake, store):
        assert set(store.snapshot().services) == {"shop/web"}

        bad_pod = pod("bad", "not-an-ip")
        fake.add(bad_pod)
        fake.add(pod("good", "10.0.1.7"))
        s = wait_store(store, lambda s: "good" in _pod_names(s))
        assert "bad" not in _pod_names(s)
        assert set(s.services) == {"shop/web"}

        # A valid object turned invalid: logged, its last valid version stays in force.
        broken_web = service("web", "10.96.0.20")
        broken_web["spec"]["clusterIP"] = "300.1.1.1"
        fake.modify(broken_web)
        fake.add(service("after", "10.96.0.21"))
        s = wait_store(store, lambda s: "shop/after" in s.services)
        assert s.services["shop/web"].vips == ("10.96.0.20",)

    rejected = [e for e in logs if e["event"] == "kubernetes object rejected"]
    by_name = {e["name"]: e for e in rejected}
    assert by_name["broken"]["kind"] == "Service"
    assert by_name["broken"]["namespace"] == "shop"
    assert by_name["broken"]["field"] == "spec.ports[0].port"
    assert "1-65535" in by_name["broken"]["reason"]
    assert by_name["broken"]["log_level"] == "error"
    assert by_name["bad"]["kind"] == "Pod"
    assert by_name["bad"]["field"] == "status.podIP"
    assert "not an IP address" in by_name["bad"]["reason"]
    assert by_name["web"]["kept_last_valid"] is True


def test_undecodable_watch_line_resumes_without_losing_events(fake: FakeApiServer, store: Store) -> None:
    with capture_logs() as logs, running(fake, store):
        first = fake.add(pod("web-1", "10.0.1.2"))
        wait_store(store, lambda s: _pod_names(s) == {"web-1"})
        fake.send_raw("pods", b"{not json")
        fake.add(pod("web-2", "10.0.1.3"))
        wait_store(store, lambda s: _pod_names(s) == {"web-1", "web-2"})
        resumed = fake.wait_for_watches("pods", 2)[1]
        assert resumed.resource_version == first["metadata"]["resourceVersion"]
    assert any(e["event"] == "kubernetes watch failed, retrying" for e in logs)


def test_errors_back_off_then_recover(fake: FakeApiServer, store: Store) -> None:
    fake.add(node("node-a"))
    fake.fail_next["nodes"] = 3
    with capture_logs() as logs, running(fake, store):
        assert set(store.snapshot().nodes) == {"node-a"}
    failures = [
        e for e in logs if e["event"] == "kubernetes watch failed, retrying" and e["resource"] == "nodes"
    ]
    assert [e["attempt"] for e in failures] == [1, 2, 3]
    assert all("HTTP 500" in e["error"] for e in failures)
    assert all(e["retry_in"] <= FAST_BACKOFF.maximum for e in failures)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    b = Backoff(initial=1.0, maximum=10.0, factor=2.0, jitter=0.5)
    assert b.delay(0, lambda: 0.5) == 1.0
    assert b.delay(2, lambda: 0.5) == 4.0
    assert b.delay(2, lambda: 0.0) == 2.0
    assert b.delay(2, lambda: 1.0) == 6.0
    assert b.delay(50, lambda: 1.0) == 10.0
    assert b.delay(10_000, lambda: 0.5) == 10.0


# --- stop --------------------------------------------------------------------------------------


def test_stop_is_prompt_and_leaves_no_threads(fake: FakeApiServer, store: Store) -> None:
    _fill(fake)
    api = fake.api_client()
    slow = dataclasses.replace(TIMING, watch_timeout=300)
    source = KubernetesSource(api, store, backoff=Backoff(initial=60, maximum=60), timing=slow)
    fake.fail_next["gateways"] = 1  # one watcher sits in a 60 s backoff when we stop
    source.start()
    fake.wait_for_watches("pods", 1)
    start = time.monotonic()
    source.stop()
    elapsed = time.monotonic() - start
    api.close()
    assert elapsed < 1.0
    assert not [t for t in threading.enumerate() if t.name.startswith("k8s-watch:")]


# --- AuthorizationPolicy status ----------------------------------------------------------------


def _ztunnel_condition(obj: dict[str, Any] | None) -> dict[str, Any]:
    assert obj is not None
    conds = [
        c for c in obj.get("status", {}).get("conditions", []) if c["type"] == CONDITION_ZTUNNEL_ACCEPTED
    ]
    assert len(conds) == 1
    return conds[0]


def test_status_written_once_for_policy_with_l7_rules(fake: FakeApiServer, store: Store) -> None:
    fake.add(authorization_policy("plain", rules=L4_RULES))
    l7 = authorization_policy("get-only", rules=L7_RULES)
    l7["status"] = {"conditions": [{"type": "SomethingElse", "status": "True", "reason": "Other"}]}
    fake.add(l7)
    with running(fake, store):
        patch = fake.wait_for_patches(1)[0]
        assert (
            patch.path == "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/get-only/status"
        )
        assert patch.content_type == "application/merge-patch+json"
        conds = patch.body["status"]["conditions"]
        assert [c["type"] for c in conds] == ["SomethingElse", CONDITION_ZTUNNEL_ACCEPTED]
        cond = _ztunnel_condition(fake.get("authorizationpolicies", "shop/get-only"))
        assert cond["status"] == "True"
        assert cond["reason"] == "UnsupportedValue"
        assert cond["message"].startswith("ztunnel does not support HTTP attributes (found: methods).")
        assert "Within an ALLOW policy" in cond["message"]
        assert cond["observedGeneration"] == 1
        assert cond["lastTransitionTime"].endswith("Z")

        # The MODIFIED our patch caused, then a marker: events are handled in order, so once
        # the marker is in the store the echo was seen, and it did not cause another write.
        fake.add(authorization_policy("marker-1", rules=L4_RULES))
        wait_store(store, lambda s: "shop/marker-1" in s.authorization_policies)
        assert len(fake.patches) == 1

        # A relist (status already right) writes nothing either.
        fake.expire("authorizationpolicies")
        fake.wait_for(lambda: sum(p == "authorizationpolicies" for p, _ in fake.list_requests) == 2)
        fake.add(authorization_policy("marker-2", rules=L4_RULES))
        wait_store(store, lambda s: "shop/marker-2" in s.authorization_policies)
        assert len(fake.patches) == 1

        # Fixed policy: the condition flips back to Accepted (one more write, then quiet).
        fake.modify(authorization_policy("get-only", rules=L4_RULES))
        fake.wait_for_patches(2)
        fake.add(authorization_policy("marker-3", rules=L4_RULES))
        wait_store(store, lambda s: "shop/marker-3" in s.authorization_policies)
        assert len(fake.patches) == 2
        cond = _ztunnel_condition(fake.get("authorizationpolicies", "shop/get-only"))
        assert (cond["status"], cond["reason"], cond["message"]) == (
            "True",
            "Accepted",
            "attached to ztunnel",
        )
        assert cond["observedGeneration"] == 2
    assert all("plain" not in p.path and "marker" not in p.path for p in fake.patches)


def test_status_not_written_when_disabled(fake: FakeApiServer, store: Store) -> None:
    fake.add(authorization_policy("get-only", rules=L7_RULES))
    with running(fake, store, write_status=False):
        fake.add(authorization_policy("marker", rules=L4_RULES))
        wait_store(store, lambda s: "shop/marker" in s.authorization_policies)
    assert fake.patches == []


def test_status_write_failure_is_retried_on_next_event(fake: FakeApiServer, store: Store) -> None:
    fake.fail_patches = 1
    fake.add(authorization_policy("get-only", rules=L7_RULES))
    with capture_logs() as logs, running(fake, store):
        fake.wait_for_patches(1)
        touched = authorization_policy("get-only", rules=L7_RULES)
        touched["metadata"]["labels"] = {"touched": "yes"}
        fake.modify(touched)
        fake.wait_for_patches(2)
        fake.add(authorization_policy("marker", rules=L4_RULES))
        wait_store(store, lambda s: "shop/marker" in s.authorization_policies)
        assert len(fake.patches) == 2
    assert (
        _ztunnel_condition(fake.get("authorizationpolicies", "shop/get-only"))["reason"] == "UnsupportedValue"
    )
    failed = [e for e in logs if e["event"] == "could not write authorization policy status"]
    assert [e["status"] for e in failed] == [500]


def _policy(spec: dict[str, Any], action: str = "ALLOW") -> AuthorizationPolicy:
    from sources.convert import _Fields

    obj = {"metadata": {"name": "p", "namespace": "shop"}, "spec": {"action": action, **spec}}
    return authorization_policy_from_k8s(_Fields(obj), ConvertOptions())


def test_ztunnel_condition_matches_istio() -> None:
    accepted = ztunnel_condition(_policy({"rules": L4_RULES}))
    assert accepted is not None
    assert (accepted.status, accepted.reason, accepted.message) == ("True", "Accepted", "attached to ztunnel")

    deny = ztunnel_condition(
        _policy(
            {
                "rules": [
                    {
                        "from": [{"source": {"requestPrincipals": ["*"], "namespaces": ["a"]}}],
                        "to": [{"operation": {"paths": ["/x"], "ports": ["80"]}}],
                        "when": [
                            {"key": "request.headers[x-id]", "values": ["1"]},
                            {"key": "source.ip", "values": ["10.0.0.1"]},
                        ],
                    }
                ]
            },
            action="DENY",
        )
    )
    assert deny is not None
    assert deny.reason == "UnsupportedValue"
    assert deny.message == (
        "ztunnel does not support HTTP attributes (found: paths, request.headers[x-id], requestPrincipals). "
        "In ambient mode you must use a waypoint proxy to enforce HTTP rules. "
        "DENY policy with HTTP attributes is enforced without the HTTP rules. "
        "This will be more restrictive than requested."
    )

    custom = ztunnel_condition(_policy({"provider": {"name": "ext"}, "rules": L4_RULES}, action="CUSTOM"))
    assert custom is not None
    assert (custom.status, custom.message) == ("False", "ztunnel does not support the CUSTOM action")

    waypoint_bound = _policy(
        {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}]}
    )
    assert ztunnel_condition(waypoint_bound) is None


def test_each_model_kind_comes_from_one_resource(fake: FakeApiServer, store: Store) -> None:
    api = fake.api_client()
    with pytest.raises(ValueError, match="exactly one resource"):
        KubernetesSource(api, store, resources=(RESOURCES[0], RESOURCES[0]))
    api.close()
    assert Kind.WORKLOAD in {r.model_kind for r in RESOURCES}


def test_status_condition_removed_when_policy_moves_to_a_waypoint(fake: FakeApiServer, store: Store) -> None:
    fake.add(authorization_policy("get-only", rules=L7_RULES))
    with running(fake, store):
        fake.wait_for_patches(1)
        moved = authorization_policy("get-only", rules=L7_RULES)
        del moved["spec"]["selector"]
        moved["spec"]["targetRefs"] = [
            {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}
        ]
        fake.modify(moved)
        patch = fake.wait_for_patches(2)[1]
        assert patch.body == {"status": {"conditions": []}}
        fake.add(authorization_policy("marker", rules=L4_RULES))
        wait_store(store, lambda s: "shop/marker" in s.authorization_policies)
        assert len(fake.patches) == 2


def test_error_event_other_than_gone_backs_off_and_resumes(fake: FakeApiServer, store: Store) -> None:
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": 500,
        "reason": "InternalError",
    }
    with capture_logs() as logs, running(fake, store):
        first = fake.add(pod("web-1", "10.0.1.2"))
        wait_store(store, lambda s: _pod_names(s) == {"web-1"})
        fake.send_raw("pods", json.dumps({"type": "ERROR", "object": status}).encode())
        fake.add(pod("web-2", "10.0.1.3"))
        wait_store(store, lambda s: _pod_names(s) == {"web-1", "web-2"})
        assert fake.wait_for_watches("pods", 2)[1].resource_version == first["metadata"]["resourceVersion"]
        assert sum(p == "pods" for p, _ in fake.list_requests) == 1
    failures = [e for e in logs if e["event"] == "kubernetes watch failed, retrying"]
    assert any("500" in e["error"] for e in failures)


# --- the mesh ConfigMap -------------------------------------------------------------------------


def _configmap(name: str, ns: str, mesh: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns},
        "data": {"mesh": mesh},
    }


def test_mesh_configmap_extension_providers(fake: FakeApiServer, store: Store) -> None:
    providers = "extensionProviders:\n- name: opa\n  envoyExtAuthzGrpc: {service: opa.authz.svc.cluster.local, port: 9191}\n"
    fake.add(_configmap("istio", "istio-system", providers))
    fake.add(_configmap("istio", "shop", providers.replace("opa", "other")))  # not the root namespace
    fake.add(_configmap("app-settings", "istio-system", "x: 1"))  # not the mesh's
    with running(fake, store):
        s = wait_store(store, lambda s: s.extension_provider("opa") is not None)
        assert list(s.mesh_configs) == ["istio-system/istio"]
        assert s.extension_provider("other") is None
        # Only the root namespace is watched (a Role there suffices), by name, as istiod does:
        # the ConfigMap "istio" of namespace shop above never arrives.
        assert fake.wait_for_watches("configmaps", 1)  # the list came first: wait for the watch

        # An edit that breaks it is refused and the last good providers stay (named in the log).
        with capture_logs() as logs:
            fake.modify(
                _configmap(
                    "istio",
                    "istio-system",
                    "extensionProviders:\n- name: opa\n  envoyExtAuthzGrpc: {port: 1}\n",
                )
            )
            deadline = time.monotonic() + 5
            while not any(e.get("field", "").endswith("envoyExtAuthzGrpc.service") for e in logs):
                assert time.monotonic() < deadline, logs
                time.sleep(0.02)
        assert store.snapshot().extension_provider("opa") is not None

        fake.modify(_configmap("istio", "istio-system", providers.replace("opa", "opa2")))
        wait_store(
            store, lambda s: s.extension_provider("opa2") is not None and s.extension_provider("opa") is None
        )
        fake.delete(_configmap("istio", "istio-system", ""))
        wait_store(store, lambda s: not s.mesh_configs)
