"""Helpers for the Kubernetes source tests: a running source, waiting on the store, objects."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mesh.model import Snapshot, Store
from sources.kubernetes import Backoff, KubernetesSource, WatchTiming
from tests.k8s.fakeapi import FakeApiServer

FAST_BACKOFF = Backoff(initial=0.005, maximum=0.05)
TIMING = WatchTiming(watch_timeout=30, read_grace=5, connect_timeout=2, list_timeout=5)


@contextmanager
def running(fake: FakeApiServer, store: Store, **kwargs: Any) -> Iterator[KubernetesSource]:
    """A started source against ``fake``, synced; stopped and its client closed on exit."""
    api = fake.api_client()
    kwargs.setdefault("backoff", FAST_BACKOFF)
    kwargs.setdefault("timing", TIMING)
    source = KubernetesSource(api, store, **kwargs)
    source.start()
    try:
        assert source.synced.wait(5), "source never synced"
        yield source
    finally:
        source.stop()
        api.close()


def wait_store(store: Store, predicate: Callable[[Snapshot], bool], timeout: float = 5.0) -> Snapshot:
    """Wait (on store deltas, not by polling) until ``predicate(snapshot)`` holds."""
    done = threading.Event()

    def check(snapshot: Snapshot) -> None:
        if predicate(snapshot):
            done.set()

    unsubscribe = store.subscribe(lambda delta: check(delta.snapshot))
    try:
        check(store.snapshot())
        if not done.wait(timeout):
            raise AssertionError(f"store never reached the expected state: {store.snapshot()!r}")
    finally:
        unsubscribe()
    return store.snapshot()


# --- object builders (the JSON shape the API server returns) -----------------------------------


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


def pod(
    name: str, ip: str, *, ns: str = "shop", node_name: str = "node-a", labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": f"uid-{ns}-{name}",
            "labels": labels or {"app": "web"},
        },
        "spec": {"nodeName": node_name, "serviceAccountName": "web", "containers": [{"name": "c"}]},
        "status": {"podIP": ip, "phase": "Running"},
    }


def service(name: str, vip: str, *, ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": vip, "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]},
    }


def endpoint_slice(name: str, service_name: str, ip: str, *, ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 8080}],
    }


def authorization_policy(
    name: str, *, ns: str = "shop", action: str = "ALLOW", rules: list[Any] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"matchLabels": {"app": "web"}}, "action": action}
    if rules is not None:
        spec["rules"] = rules
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def peer_authentication(name: str, *, ns: str = "shop", mode: str = "STRICT") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"mtls": {"mode": mode}},
    }


def request_authentication(name: str, *, ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "jwtRules": [{"issuer": "https://issuer.example", "jwksUri": "https://issuer.example/jwks"}]
        },
    }


def gateway(name: str, *, ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }
