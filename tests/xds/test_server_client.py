"""The discovery server and client over real gRPC on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from google.protobuf import any_pb2
from structlog.testing import capture_logs

from controlplane.xds import AuthenticationFailed, DiscoveryServicer, Metadata, register
from mesh.model import (
    AuthorizationAction,
    AuthorizationPolicy,
    MeshObject,
    MtlsMode,
    Operation,
    PeerAuthentication,
    Rule,
    RuleTo,
    Store,
    Workload,
    WorkloadSelector,
)
from mesh.pki import CertificateAuthority, cert_to_pem, generate_key, key_to_pem
from mesh.proto import discovery_pb2, discovery_pb2_grpc, status_pb2, workload_pb2
from mesh.xds.authorization import Action
from mesh.xds.client import AppliedUpdate, Backoff, XdsClient, insecure_channel_factory
from mesh.xds.convert import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from mesh.xds.state import ProxySnapshot, ProxyState
from tests.xds.helpers import pod, service

TIMEOUT = 5.0
FAST = Backoff(initial=0.01, maximum=0.1)
WEB_HOST = "shop/web.shop.svc.cluster.local"
STATIC_STRICT = "istio-system/istio_converted_static_strict"


def endpoint_names(snap: ProxySnapshot, service_key: str) -> list[str]:
    return sorted(e.workload.name for e in snap.endpoints(service_key))


class Server:
    """A discovery server on 127.0.0.1 that can be stopped and restarted on the same port."""

    def __init__(self, store: Store, **kw: Any) -> None:
        self.store = store
        self.port = 0
        self._kw = kw
        self._server: grpc.aio.Server | None = None
        self.servicer: DiscoveryServicer | None = None

    async def start(self, store: Store | None = None) -> None:
        if store is not None:
            self.store = store
        self._server = grpc.aio.server()
        self.servicer = register(self._server, self.store, **self._kw)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
        if self.servicer is not None:
            self.servicer.close()
            self.servicer = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def initial_objects() -> list[MeshObject]:
    return [
        pod("web-1", "10.0.1.1", labels={"app": "web"}),
        pod("web-2", "10.0.1.2", labels={"app": "web"}),
        pod("db-1", "10.0.1.3", labels={"app": "db"}),
        service("web", "10.96.0.10", selector={"app": "web"}),
        AuthorizationPolicy(
            namespace="shop", name="web-allow", selector=WorkloadSelector({"app": "web"}), rules=(Rule(),)
        ),
    ]


def make_store(objects: Iterable[MeshObject]) -> Store:
    store = Store()
    store.replace_all(objects)
    return store


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server(make_store(initial_objects()))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


class Running:
    """A client running in a task the test owns, with its applied updates in a queue."""

    def __init__(self, address: str, **kw: Any) -> None:
        self.updates: asyncio.Queue[AppliedUpdate] = asyncio.Queue()
        self.client = XdsClient(
            ProxyState(),
            node_id="ztunnel~node-a",
            node_name="node-a",
            channel_factory=insecure_channel_factory(address),
            backoff=FAST,
            on_update=self._collect,
            **kw,
        )
        self.task: asyncio.Task[None] | None = None
        self._held: list[AppliedUpdate] = []

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.client.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, TIMEOUT)

    def _collect(self, update: AppliedUpdate) -> None:
        self.updates.put_nowait(update)

    def forget(self) -> None:
        """Drop what arrived so far: the test looks only at what comes next."""
        self.updates = asyncio.Queue()
        self._held = []

    async def next(self, type_url: str = ADDRESS_TYPE_URL) -> AppliedUpdate:
        """The next update of ``type_url``; updates of the other type are kept for later."""
        held = self._held
        for update in held:
            if update.type_url == type_url:
                held.remove(update)
                return update
        while True:
            update = await asyncio.wait_for(self.updates.get(), TIMEOUT)
            if update.type_url == type_url:
                return update
            held.append(update)


async def test_initial_state(server: Server) -> None:
    async with Running(server.address) as r:
        await asyncio.wait_for(r.client.synced.wait(), TIMEOUT)
        snap = r.client.state.snapshot()
        assert set(snap.workloads) == {"uid-shop-web-1", "uid-shop-web-2", "uid-shop-db-1"}
        assert sorted(w.name for w in snap.workloads.values()) == ["db-1", "web-1", "web-2"]
        assert set(snap.services) == {WEB_HOST}
        svc = snap.service_by_address("10.96.0.10", 80)
        assert svc is not None and svc.key == WEB_HOST and svc.hostname == "web.shop.svc.cluster.local"
        assert endpoint_names(snap, WEB_HOST) == ["web-1", "web-2"]
        web1 = snap.workload_by_ip("10.0.1.1")
        assert web1 is not None and web1.uid == "uid-shop-web-1"
        assert web1.services[WEB_HOST][0].service_port == 80 and web1.target_port(svc, 80) == 8080
        # Istio's static STRICT policy is always served, for workloads that list it.
        assert sorted(snap.authorizations) == [STATIC_STRICT, "shop/web-allow"]
        assert web1.authorization_policies == ("shop/web-allow",)
        assert [a.key for a in snap.policies_for(web1)] == ["shop/web-allow"]
        assert snap.policies_for(snap.workloads["uid-shop-db-1"]) == ()
        assert set(r.client.versions[ADDRESS_TYPE_URL]) == {
            "uid-shop-web-1",
            "uid-shop-web-2",
            "uid-shop-db-1",
            "shop/web.shop.svc.cluster.local",
        }


async def test_pod_added_changed_removed_arrive_as_deltas(server: Server) -> None:
    async with Running(server.address) as r:
        await asyncio.wait_for(r.client.synced.wait(), TIMEOUT)
        r.forget()

        version = r.client.state.version
        server.store.upsert(pod("web-3", "10.0.1.4", labels={"app": "web"}))
        update = await r.next()
        assert r.client.state.version == version + 1  # one response, one step
        assert (update.upserted, update.removed) == (frozenset({"uid-shop-web-3"}), frozenset())
        added = r.client.state.snapshot().workload_by_ip("10.0.1.4")
        assert added is not None and added.uid == "uid-shop-web-3"
        assert endpoint_names(r.client.state.snapshot(), WEB_HOST) == ["web-1", "web-2", "web-3"]

        moved = dataclasses.replace(server.store.snapshot().workloads["uid-shop-web-3"], ips=("10.0.1.9",))
        server.store.upsert(moved)
        update = await r.next()
        assert update.upserted == {"uid-shop-web-3"}
        snap = r.client.state.snapshot()
        assert snap.workload_by_ip("10.0.1.4") is None and snap.workload_by_ip("10.0.1.9") is not None
        assert snap.workloads["uid-shop-web-3"].addresses == ("10.0.1.9",)

        server.store.delete(moved.KIND, moved.key)
        update = await r.next()
        assert (update.upserted, update.removed) == (frozenset(), frozenset({"uid-shop-web-3"}))
        snap = r.client.state.snapshot()
        assert "uid-shop-web-3" not in snap.workloads and snap.workload_by_ip("10.0.1.9") is None
        assert endpoint_names(snap, WEB_HOST) == ["web-1", "web-2"]

        # A policy change re-lists the policy on the workloads it selects.
        server.store.upsert(
            AuthorizationPolicy(
                namespace="shop",
                name="db-deny",
                action=AuthorizationAction.DENY,
                selector=WorkloadSelector({"app": "db"}),
                rules=(Rule(to=(RuleTo(Operation(ports=(5432,))),)),),
            )
        )
        both = {u.type_url: u for u in [await r.next(t) for t in (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)]}
        assert both[AUTHORIZATION_TYPE_URL].upserted == {"shop/db-deny"}
        assert both[ADDRESS_TYPE_URL].upserted == {"uid-shop-db-1"}
        snap = r.client.state.snapshot()
        db = snap.workloads["uid-shop-db-1"]
        assert db.authorization_policies == ("shop/db-deny",)
        (deny,) = snap.policies_for(db)
        assert deny.key == "shop/db-deny" and deny.action is Action.DENY
        assert deny.rules[0].clauses[0].matches[0].destination_ports == (5432,)


async def test_mesh_wide_strict_reaches_every_workload(server: Server) -> None:
    async with Running(server.address) as r:
        await asyncio.wait_for(r.client.synced.wait(), TIMEOUT)
        r.forget()
        server.store.upsert(
            PeerAuthentication(namespace="istio-system", name="default", mtls_mode=MtlsMode.STRICT)
        )
        update = await r.next()
        assert update.upserted == {"uid-shop-web-1", "uid-shop-web-2", "uid-shop-db-1"}
        snap = r.client.state.snapshot()
        for w in snap.workloads.values():
            assert STATIC_STRICT in w.authorization_policies, w.uid
            assert STATIC_STRICT in [a.key for a in snap.policies_for(w)], w.uid
        assert snap.missing_policies(snap.workloads["uid-shop-web-1"]) == ()
        assert server.servicer is not None
        res = server.servicer.cache.current().by_type[ADDRESS_TYPE_URL]["uid-shop-db-1"].resource
        address = workload_pb2.Address()
        assert res.resource.Unpack(address)
        assert list(address.workload.authorization_policies) == ["istio-system/istio_converted_static_strict"]


async def test_reconnect_with_versions_gets_only_the_difference() -> None:
    srv = Server(make_store(initial_objects()))
    await srv.start()
    try:
        async with Running(srv.address) as r:
            await asyncio.wait_for(r.client.synced.wait(), TIMEOUT)
            await srv.stop()
            # Meanwhile the last state stays in force.
            assert len(r.client.state.snapshot().workloads) == 3

            objects = initial_objects()
            objects = [o for o in objects if getattr(o, "name", "") != "web-2"]  # removed
            objects = [
                dataclasses.replace(o, ips=("10.0.1.33",))
                if isinstance(o, Workload) and o.name == "db-1"
                else o
                for o in objects
            ]  # changed
            objects.append(pod("web-4", "10.0.1.44", labels={"app": "web"}))  # added
            r.forget()
            await srv.start(make_store(objects))

            update = await r.next()
            assert update.upserted == {"uid-shop-db-1", "uid-shop-web-4"}
            assert update.removed == {"uid-shop-web-2"}
            authz = await r.next(AUTHORIZATION_TYPE_URL)
            assert (authz.upserted, authz.removed) == (frozenset(), frozenset())  # unchanged
            snap = r.client.state.snapshot()
            assert sorted(w.name for w in snap.workloads.values()) == ["db-1", "web-1", "web-4"]
            assert snap.workload_by_ip("10.0.1.33") is not None and snap.workload_by_ip("10.0.1.3") is None
            assert snap.workload_by_ip("10.0.1.2") is None
            svc = snap.service_by_address("10.96.0.10", 80)
            assert svc is not None
            assert endpoint_names(snap, svc.key) == ["web-1", "web-4"]
            assert sorted(snap.authorizations) == [STATIC_STRICT, "shop/web-allow"]
    finally:
        await srv.stop()


async def test_client_survives_restart_and_keeps_state(server: Server) -> None:
    async with Running(server.address) as r:
        await asyncio.wait_for(r.client.synced.wait(), TIMEOUT)
        before = r.client.state.snapshot()
        await server.stop()
        await server.start()
        # The server state did not change: the reconnect sends nothing new.
        r.forget()
        update = await r.next()
        assert (update.upserted, update.removed) == (frozenset(), frozenset())
        assert r.client.state.snapshot() is before
        server.store.upsert(pod("web-5", "10.0.1.5", labels={"app": "web"}))
        update = await r.next()
        assert update.upserted == {"uid-shop-web-5"}


# --- speaking the protocol by hand -------------------------------------------------------------


async def open_stream(address: str, metadata: Metadata = ()) -> tuple[grpc.aio.Channel, Any]:
    channel = grpc.aio.insecure_channel(address)
    stub = discovery_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    return channel, stub.DeltaAggregatedResources(metadata=metadata)


async def read(call: Any) -> discovery_pb2.DeltaDiscoveryResponse:
    resp = await asyncio.wait_for(call.read(), TIMEOUT)
    assert isinstance(resp, discovery_pb2.DeltaDiscoveryResponse)
    return resp


async def test_nack_is_logged_and_not_resent(server: Server) -> None:
    channel, call = await open_stream(server.address)
    try:
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL))
        first = await read(call)
        assert len(first.resources) == 4 and first.nonce
        with capture_logs() as logs:
            nack = discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL, response_nonce=first.nonce)
            nack.error_detail.CopyFrom(status_pb2.Status(code=3, message="cannot apply web-1"))
            await call.write(nack)
            server.store.upsert(pod("web-9", "10.0.1.99"))
            second = await read(call)
        # Only the change; the refused resources are not sent again.
        assert [r.name for r in second.resources] == ["uid-shop-web-9"]
        assert second.nonce != first.nonce
        assert any(e["event"].startswith("xds NACK") and e["reason"] == "cannot apply web-1" for e in logs)
    finally:
        call.cancel()
        await channel.close()


async def test_initial_versions_and_explicit_subscriptions(server: Server) -> None:
    channel, call = await open_stream(server.address)
    try:
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL))
        full = await read(call)
        versions = {r.name: r.version for r in full.resources}
        # Same content, same version: versions are content hashes.
        assert len(set(versions.values())) == 4
    finally:
        call.cancel()
        await channel.close()

    channel, call = await open_stream(server.address)
    try:
        held = dict(versions)
        held["uid-shop-web-1"] = "stale"
        held["uid-gone"] = "x"
        await call.write(
            discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL, initial_resource_versions=held)
        )
        resp = await read(call)
        assert [r.name for r in resp.resources] == ["uid-shop-web-1"]
        assert list(resp.removed_resources) == ["uid-gone"]

        await call.write(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=AUTHORIZATION_TYPE_URL, resource_names_subscribe=["shop/web-allow", "shop/none"]
            )
        )
        resp = await read(call)
        assert resp.type_url == AUTHORIZATION_TYPE_URL
        assert [r.name for r in resp.resources] == ["shop/web-allow"]
        assert list(resp.removed_resources) == ["shop/none"]
    finally:
        call.cancel()
        await channel.close()


async def test_authenticate_hook_refuses() -> None:
    async def authenticate(metadata: Metadata) -> None:
        if ("authorization", "Bearer good") not in metadata:
            raise AuthenticationFailed("no valid token")

    srv = Server(make_store(initial_objects()), authenticate=authenticate)
    await srv.start()
    try:
        channel, call = await open_stream(srv.address, metadata=(("authorization", "Bearer bad"),))
        try:
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read(call)
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        finally:
            await channel.close()
        channel, call = await open_stream(srv.address, metadata=(("authorization", "Bearer good"),))
        try:
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL))
            assert len((await read(call)).resources) == 4
        finally:
            call.cancel()
            await channel.close()
    finally:
        await srv.stop()


# --- a server that sends garbage ---------------------------------------------------------------


def packed(message: workload_pb2.Address) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


class BadServer:
    """Sends one response the client must refuse, then records what comes back."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest] = asyncio.Queue()

    async def DeltaAggregatedResources(self, request_iterator: Any, context: Any) -> None:
        sent = False
        async for req in request_iterator:
            if req.response_nonce:
                self.replies.put_nowait(req)
            elif req.type_url == ADDRESS_TYPE_URL and not sent:
                sent = True
                bad = workload_pb2.Address(workload=workload_pb2.Workload(uid="u1", name="p", namespace="ns"))
                bad.workload.addresses.append(b"\x0a\x00\x00")  # 3 bytes: not an IP
                await context.write(
                    discovery_pb2.DeltaDiscoveryResponse(
                        type_url=ADDRESS_TYPE_URL,
                        nonce="n1",
                        resources=[discovery_pb2.Resource(name="u1", version="v1", resource=packed(bad))],
                    )
                )


async def test_client_nacks_what_it_cannot_apply() -> None:
    bad = BadServer()
    server = grpc.aio.server()
    discovery_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(bad, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with Running(f"127.0.0.1:{port}") as r:
            reply = await asyncio.wait_for(bad.replies.get(), TIMEOUT)
            assert reply.response_nonce == "n1"
            assert reply.HasField("error_detail") and "4 or 16 bytes" in reply.error_detail.message
            assert r.client.state.snapshot().workloads == {}
            assert r.client.state.version == 0
            assert r.client.versions[ADDRESS_TYPE_URL] == {}
            assert not r.client.synced.is_set()
    finally:
        await server.stop(grace=None)


# --- the production path: TLS and a token file -------------------------------------------------


def server_credential(ca: CertificateAuthority, dns_name: str) -> tuple[bytes, bytes]:
    """A serving certificate like the control plane's: DNS SAN, chained to the mesh root."""
    key = generate_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    return key_to_pem(key), cert_to_pem(cert).encode()


async def test_tls_with_token_file(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate()
    key_pem, cert_pem = server_credential(ca, "controlplane.istio-system.svc")
    token = tmp_path / "node-a.token"
    token.write_text("secret-token\n")
    seen: list[Metadata] = []

    async def authenticate(metadata: Metadata) -> None:
        seen.append(metadata)
        if ("authorization", "Bearer secret-token") not in metadata:
            raise AuthenticationFailed("bad token")

    server = grpc.aio.server()
    servicer = register(server, make_store(initial_objects()), authenticate=authenticate)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    await server.start()
    try:
        client = XdsClient(
            ProxyState(),
            node_id="ztunnel~node-a",
            address=f"127.0.0.1:{port}",
            root_cert_pem=ca.roots_pem.encode(),
            server_name="controlplane.istio-system.svc",
            token_file=token,
            backoff=FAST,
        )
        task = asyncio.create_task(client.run())
        try:
            await asyncio.wait_for(client.synced.wait(), TIMEOUT)
            snap = client.state.snapshot()
            assert len(snap.workloads) == 3 and set(snap.services) == {WEB_HOST}
            assert sorted(snap.authorizations) == [STATIC_STRICT, "shop/web-allow"]
        finally:
            client.stop()
            await asyncio.wait_for(task, TIMEOUT)
        assert seen
    finally:
        await server.stop(grace=None)
        servicer.close()


def test_backoff_is_jittered_exponential_and_capped() -> None:
    b = Backoff(initial=0.5, maximum=30.0)
    assert [b.delay(n, lambda: 0.0) for n in range(4)] == [0.25, 0.5, 1.0, 2.0]
    assert b.delay(3, lambda: 0.999999) == pytest.approx(4.0, rel=1e-5)
    assert b.delay(100, lambda: 0.0) == 15.0  # capped, and still jittered


async def test_a_nack_flood_logs_once_and_too_many_names_end_the_stream(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What one authenticated client cannot do: fill the log with NACKs, or make the server keep
    an unbounded set of subscribed names (issue 24)."""
    import controlplane.xds as xds_module

    channel, call = await open_stream(server.address)
    try:
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL))
        first = await read(call)
        with capture_logs() as logs:
            for i in range(200):
                nack = discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL, response_nonce=first.nonce)
                nack.error_detail.CopyFrom(status_pb2.Status(code=3, message=f"refused {i} " + "x" * 5000))
                await call.write(nack)
            # A subscription sent after the flood is answered after every NACK was handled
            # (one stream's requests are handled in order).
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=AUTHORIZATION_TYPE_URL))
            while (await read(call)).type_url != AUTHORIZATION_TYPE_URL:
                pass
        lines = [e for e in logs if e["event"].startswith("xds NACK")]
        assert len(lines) == 1 and len(lines[0]["reason"]) <= xds_module.MAX_NACK_REASON
    finally:
        call.cancel()
        await channel.close()

    monkeypatch.setattr(xds_module, "MAX_NAMES_PER_TYPE", 5)
    channel, call = await open_stream(server.address)
    try:
        names = [f"uid-{i}" for i in range(6)]
        await call.write(
            discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL, resource_names_subscribe=names)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read(call)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than 5 resource names" in (err.value.details() or "")
    finally:
        call.cancel()
        await channel.close()
