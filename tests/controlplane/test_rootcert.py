"""The root certificate publisher (Kubernetes mode) against the strict fake API server: the
ConfigMap ``istio-ca-root-cert`` appears in every namespace the source lists, comes back when
deleted or edited, and is written only when it differs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from structlog.testing import capture_logs

from controlplane.rootcert import (
    CONFIG_LABEL,
    ROOT_CERT_CONFIGMAP,
    ROOT_CERT_KEY,
    RootCertController,
    replacement,
    up_to_date,
)
from mesh.model import Store
from sources.kubernetes import NAMESPACES, Backoff
from tests.k8s.fakeapi import FakeApiServer
from tests.k8s.helpers import namespace, running

ROOT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
TIMEOUT = 20.0
FAST = Backoff(initial=0.01, maximum=0.1)


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        for name in ("istio-system", "shop", "kube-system"):
            server.add(namespace(name))
        yield server


@dataclass
class Harness:
    fake: FakeApiServer
    controller: RootCertController

    async def until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        await asyncio.to_thread(self.fake.wait_for, predicate, timeout)

    def cm(self, ns: str) -> dict[str, Any] | None:
        return self.fake.get("configmaps", f"{ns}/{ROOT_CERT_CONFIGMAP}")

    def published(self, ns: str) -> bool:
        cm = self.cm(ns)
        return cm is not None and up_to_date(cm, ROOT)

    def configmap_writes(self) -> list[tuple[str, str, int]]:
        return [(w.method, w.ref, w.code) for w in self.fake.writes_of("configmaps")]

    async def settled(self) -> None:
        """Every namespace looked at once more, and that pass over."""
        self.controller.queue.enqueue(["istio-system", "shop", "kube-system"])
        await self.controller.queue.wait_idle(TIMEOUT)


@asynccontextmanager
async def publisher(fake: FakeApiServer, resync: float = 3600.0) -> AsyncIterator[Harness]:
    store = Store()
    api = fake.api_client()
    c = RootCertController(store, api, ROOT, resync=resync, backoff=FAST, timeout=(5.0, 10.0))
    with running(fake, store, resources=(NAMESPACES,)):
        c.start()
        try:
            yield Harness(fake, c)
        finally:
            await c.aclose()
            api.close()


async def test_published_in_every_namespace_but_the_system_ones(fake: FakeApiServer) -> None:
    async with publisher(fake) as h:
        await h.until(lambda: h.published("istio-system") and h.published("shop"))
        cm = h.cm("shop")
        assert cm is not None
        assert cm["data"] == {ROOT_CERT_KEY: ROOT}
        assert cm["metadata"]["labels"] == {CONFIG_LABEL: "true"}
        await h.settled()
        assert h.cm("kube-system") is None  # as istiod: never in the Kubernetes system namespaces
        # A namespace made later gets it too.
        fake.add(namespace("payments"))
        await h.until(lambda: h.published("payments"))


async def test_writes_only_when_different(fake: FakeApiServer) -> None:
    async with publisher(fake) as h:
        await h.until(lambda: h.published("istio-system") and h.published("shop"))
        await h.settled()
        before = h.configmap_writes()
        assert sorted(before) == [
            ("POST", f"istio-system/{ROOT_CERT_CONFIGMAP}", 201),
            ("POST", f"shop/{ROOT_CERT_CONFIGMAP}", 201),
        ]
        await h.settled()
        assert h.configmap_writes() == before


async def test_deleted_or_edited_configmap_is_put_back(fake: FakeApiServer) -> None:
    async with publisher(fake) as h:
        await h.until(lambda: h.published("shop"))
        # Deleted: created again.
        cm = h.cm("shop")
        assert cm is not None
        fake.delete(cm)
        await h.until(lambda: h.published("shop"))
        # Edited: the root is put back; a key, label and annotation someone else added stay.
        cm = h.cm("shop")
        assert cm is not None
        cm["data"] = {ROOT_CERT_KEY: "not a root", "extra.pem": "mine"}
        cm["metadata"]["labels"] = {"team": "a"}
        cm["metadata"]["annotations"] = {"note": "kept"}
        fake.modify(cm)
        await h.until(lambda: h.published("shop"))
        cm = h.cm("shop")
        assert cm is not None
        assert cm["data"] == {ROOT_CERT_KEY: ROOT, "extra.pem": "mine"}
        assert cm["metadata"]["labels"] == {"team": "a", CONFIG_LABEL: "true"}
        assert cm["metadata"]["annotations"] == {"note": "kept"}
        # The label alone removed: restored.
        cm["metadata"]["labels"] = {}
        fake.modify(cm)
        await h.until(lambda: h.published("shop"))


async def test_existing_configmap_is_adopted_with_its_other_keys(fake: FakeApiServer) -> None:
    fake.add(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": ROOT_CERT_CONFIGMAP, "namespace": "shop", "labels": {"by": "hand"}},
            "data": {ROOT_CERT_KEY: "old root", "other": "x"},
        }
    )
    async with publisher(fake) as h:
        await h.until(lambda: h.published("shop"))
        cm = h.cm("shop")
        assert cm is not None and cm["data"] == {ROOT_CERT_KEY: ROOT, "other": "x"}
        assert [(m, code) for m, ref, code in h.configmap_writes() if ref.startswith("shop/")] == [
            ("PUT", 200)
        ]


async def test_refusals_are_retried_and_logged(fake: FakeApiServer) -> None:
    fake.fail_writes["configmaps"] = [500, 500]
    with capture_logs() as logs:
        async with publisher(fake) as h:
            await h.until(lambda: h.published("istio-system") and h.published("shop"))
    failures = [e for e in logs if e["event"] == "root certificate reconcile failed, retrying"]
    assert len(failures) == 2
    assert {f["status"] for f in failures} == {500}
    assert all(f["controller"] == "root-cert-publisher" and f["namespace"] for f in failures)


async def test_terminating_namespace_is_skipped(fake: FakeApiServer) -> None:
    gone = namespace("leaving")
    gone["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    gone["status"] = {"phase": "Terminating"}
    fake.add(gone)
    with capture_logs() as logs:
        async with publisher(fake) as h:
            await h.until(lambda: h.published("shop"))
            await h.until(lambda: any(ref.startswith("leaving/") for _, ref, _ in h.configmap_writes()))
            await h.settled()
            assert [w for w in h.configmap_writes() if w[1].startswith("leaving/")] == [
                ("POST", f"leaving/{ROOT_CERT_CONFIGMAP}", 403)
            ]
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]


def test_up_to_date_and_replacement() -> None:
    live: dict[str, Any] = {
        "metadata": {"name": ROOT_CERT_CONFIGMAP, "namespace": "shop", "resourceVersion": "7"},
        "data": {"a": "b"},
        "binaryData": {ROOT_CERT_KEY: "AAAA"},
    }
    assert not up_to_date(live, ROOT)
    new = replacement(live, ROOT)
    assert up_to_date(new, ROOT)
    assert new["metadata"]["resourceVersion"] == "7"  # the write is conditional on what was read
    assert new["data"] == {"a": "b", ROOT_CERT_KEY: ROOT}
    assert "binaryData" not in new  # a key may not be in both
    assert live["data"] == {"a": "b"}  # not modified in place
    assert not up_to_date({**new, "metadata": {"labels": {CONFIG_LABEL: "false"}}}, ROOT)


async def test_resync_repairs_what_no_event_told(fake: FakeApiServer) -> None:
    """A deletion the watch never reported (history compacted across a relist) is repaired by
    the periodic resync."""
    async with publisher(fake, resync=0.2) as h:
        await h.until(lambda: h.published("shop"))
        cm = h.cm("shop")
        assert cm is not None
        fake.delete(cm, silent=True)
        await h.until(lambda: h.published("shop"))
        posts = [w for w in h.configmap_writes() if w[:2] == ("POST", f"shop/{ROOT_CERT_CONFIGMAP}")]
        assert len(posts) == 2
