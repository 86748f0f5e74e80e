"""One waypoint: terminate HBONE, apply L7 policy per request, re-originate HBONE to the endpoint.

Per inbound CONNECT (:meth:`Waypoint.handle`):

1. The CONNECT names the original destination (a service ``VIP:port`` or a pod ``IP:port``);
   :func:`waypoint.routing.resolve` says whether this waypoint serves it (else 400: a
   per-service-account waypoint never handles another account's traffic, whoever asks).
2. The original client is the TLS peer of the tunnel (its certificate, never a header) at the
   tunnel's TCP peer address.
3. The protocol is the port's declaration; an undeclared port is sniffed. HTTP/1.1 and HTTP/2
   (gRPC) go through the engines of :mod:`waypoint.http1` / :mod:`waypoint.http2`, which call
   back here per request: path normalization (``pathNormalization``), the AuthorizationPolicies
   bound to this waypoint (``targetRefs``) evaluated by :mod:`mesh.l7authz` (deny: 403
   ``RBAC: access denied`` or gRPC PERMISSION_DENIED), then a ready endpoint this waypoint
   serves, chosen per request. Anything else is relayed as TCP under the same policies as
   Istio's TCP filter reads them (:mod:`waypoint.tcp_policy`: fail closed).
4. Upstream: HBONE to the endpoint's node proxy with this waypoint's own certificate, from a
   pool, telling it the client's address (``forwarded``) and identity
   (``x-forwarded-client-cert``), which the destination believes from its own waypoint only.

Before authorization, the RequestAuthentications bound to the waypoint validate end-user JWTs
(:mod:`waypoint.jwt`: a bad token is 401, a valid one gives the request principal and claims).
Then, as Istio orders them, CUSTOM policies first: a request matching one is checked by the
external authorizer its ``provider`` names (:mod:`waypoint.extauthz`, reached through its
Service's endpoints, by HBONE with this waypoint's identity when they are in the mesh); its
denial is the answer, its header changes apply before DENY and ALLOW policies see the request.

After authorization, the web application firewall (:mod:`waypoint.waf`): the ``WafPolicy`` for
the destination (Service-targeted first, then this waypoint's Gateway) runs the OWASP Core Rule
Set on the request's URI and headers, and on its body when the body's type is inspected (read
up to the policy's limit through the engines' ``ReadBody``). Enforce blocks with 403 and a
request id (gRPC PERMISSION_DENIED); DetectOnly logs and passes. Every request with a match gets
one ``waf`` log line (rule ids, messages, anomaly score, source identity, destination service).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import random
from collections.abc import Awaitable, Hashable
from dataclasses import dataclass, field
from typing import Any

import structlog

from mesh.admin import HttpServer, start_proxy_servers
from mesh.caclient import CaClient
from mesh.certs import CertManager, Certs
from mesh.hbone.client import ClientProtocol, open_connection
from mesh.hbone.pool import HbonePool, PoolKey
from mesh.hbone.protocol import format_authority
from mesh.hbone.server import HboneServer, InboundStream
from mesh.identity import Identity
from mesh.l7authz import (
    Headers,
    L7Decision,
    Request,
    attaches,
    evaluate,
    first_matching_rule,
    select_policies,
)
from mesh.model import TunnelProtocol, WorkloadStatus
from mesh.model.meshconfig import ExtensionProvider
from mesh.model.policy import AuthorizationPolicy
from mesh.netaddr import forwarded_for
from mesh.netns import SocketFactory, family_of
from mesh.pathnorm import NormalizedPath, PathNormalization, normalize_path
from mesh.tasks import Supervisor
from mesh.xds.dump import to_json
from mesh.xds.state import (
    HBONE_PORT,
    AppProtocol,
    ProxySnapshot,
    ProxyState,
    Service,
    WaypointAuthentication,
    Workload,
)
from waypoint.bytestream import ByteStream, HboneByteStream, TcpByteStream
from waypoint.extauthz import Allowed, CheckFacts, Denied, ExtAuthz, HttpFacts, Peer, request_id
from waypoint.http1 import serve_http1
from waypoint.http2 import Http2UpstreamPool, serve_http2
from waypoint.jwt import Authenticated, Authenticator, Refused
from waypoint.metrics import Metrics, Peers
from waypoint.request import (
    GRPC_PERMISSION_DENIED,
    GRPC_UNAUTHENTICATED,
    Forward,
    ReadBody,
    RequestHead,
    RequestRecord,
    Respond,
    Verdict,
    deny,
)
from waypoint.request import resolve as resolve_verdict
from waypoint.routing import Me, Target, endpoints, resolve, service_of
from waypoint.sniff import sniff
from waypoint.tcp_policy import tcp_view
from waypoint.waf import WafMode, WafRequest, WafVerdict
from waypoint.waf.policies import Binding, WafPolicies

log = structlog.get_logger(__name__)

XFCC = "x-forwarded-client-cert"
CLOSE_WAIT = 5.0  # after the engine returns, how long the tunnel may take to finish


@dataclass(frozen=True, slots=True)
class Addresses:
    """Where the waypoint listens; port 0 picks a free one (tests)."""

    hbone: tuple[str, int] = ("0.0.0.0", HBONE_PORT)
    admin: tuple[str, int] = ("127.0.0.1", 15000)
    stats: tuple[str, int] = ("0.0.0.0", 15020)
    readiness: tuple[str, int] = ("0.0.0.0", 15021)


@dataclass(frozen=True, slots=True)
class Client:
    """The original client of one tunnel."""

    identity: Identity
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class Upstream:
    """An ``upstream_key``: requests share upstream connections only for the same client (the
    tunnel's headers speak for that client) and the same endpoint."""

    ip: str
    port: int
    identity: Identity
    client: Client
    workload: Workload | None = field(default=None, compare=False, hash=False)  # for telemetry


@dataclass(frozen=True, slots=True)
class AuthorizerEndpoint:
    """Where an external authorizer is dialled: through HBONE (``identity`` set: it is in the
    mesh) or plain TCP."""

    ip: str
    port: int
    identity: Identity | None


class Waypoint:
    def __init__(
        self,
        *,
        me: Me,
        trust_domain: str,
        state: ProxyState,
        ca: CaClient,
        factory: SocketFactory,
        addresses: Addresses | None = None,
        path_normalization: PathNormalization = PathNormalization.BASE,
        connect_timeout: float = 10.0,
        drain_seconds: float = 5.0,
        process_metrics: bool = False,
        certificate_timeout: float = 30.0,
    ) -> None:
        self.me = me
        self.trust_domain = trust_domain
        self.identity = Identity(trust_domain, me.namespace, me.name)  # its account: the Gateway's name
        self.state = state
        self.factory = factory
        self.addresses = addresses or Addresses()
        self.path_normalization = path_normalization
        self.connect_timeout = connect_timeout
        self.drain_seconds = drain_seconds
        self.certificate_timeout = certificate_timeout  # for the first certificate, at start
        self.certs = CertManager(ca)
        self.metrics = Metrics(process=process_metrics)
        self.pool = HbonePool(self._dial)
        self.h2_pool = Http2UpstreamPool()
        self.server: HboneServer | None = None
        self.bound: dict[str, tuple[str, int]] = {}
        self.stop = asyncio.Event()
        self.tasks = Supervisor(f"waypoint-{me.key}")
        self._servers: list[HttpServer] = []
        self._unsubscribe_certs: Any = None
        self._authenticators: dict[
            tuple[int, ...], tuple[tuple[WaypointAuthentication, ...], Authenticator]
        ] = {}
        self.ext_authz = ExtAuthz(self)
        self._hosts: tuple[int, dict[str, list[Service]]] = (-1, {})
        self.waf = WafPolicies(
            state, (me.namespace, me.name), on_load=lambda _key, loaded: self.metrics.waf_load(loaded)
        )

    # -- state ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state.version > 0 and self.certs.ready and self.server is not None

    def config_dump(self) -> dict[str, Any]:
        snap = self.state.snapshot()
        return {
            "waypoint": self.me.key,
            "identity": self.identity.uri,
            "version": snap.version,
            "ready": self.ready,
            "path_normalization": self.path_normalization.value,
            "policies": [_policy_json(p) for _, p in sorted(snap.waypoint_policies.items())],
            "authentications": [
                {
                    "name": a.policy.name,
                    "namespace": a.policy.namespace,
                    "issuers": [r.issuer for r in a.policy.jwt_rules],
                    "jwks_fetched": sorted(a.jwks_by_uri),
                    "jwks_missing": sorted(
                        r.jwks_uri
                        for r in a.policy.jwt_rules
                        if r.jwks_uri and not r.jwks and r.jwks_uri not in a.jwks_by_uri
                    ),
                }
                for _, a in sorted(snap.waypoint_authentications.items())
            ],
            "extension_providers": [
                {"name": p.name, "kind": p.kind, "service": p.ext_authz.service, "port": p.ext_authz.port}
                for _, p in sorted(snap.extension_providers.items())
                if p.ext_authz is not None
            ],
            "workloads": [to_json(w) for w in sorted(snap.workloads.values(), key=lambda w: w.uid)],
            "services": [to_json(s) for _, s in sorted(snap.services.items())],
            "certificates": self.certs.dump(),
            "waf": {"policies": self.waf.dump(), "engines": self.waf.engine_count},
        }

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.tasks.spawn(self.waf.run(), name="waf-policies")
        self.certs.track(self.identity)
        certs = await self.certs.get(self.identity, timeout=self.certificate_timeout)
        listener = await self.factory.tcp_listener(*self.addresses.hbone)
        self.server = HboneServer(
            self.handle, certs.server_ctx, self.trust_domain, name=f"waypoint-{self.me.key}"
        )
        await self.server.listen(sock=listener)
        self.bound["hbone"] = self.server.address
        self._unsubscribe_certs = self.certs.subscribe(self._rotated)

        started = await start_proxy_servers(
            addresses={name: getattr(self.addresses, name) for name in ("admin", "stats", "readiness")},
            config_dump=self.config_dump,
            registry=self.metrics.registry,
            ready=lambda: self.ready,
            stop=self.stop,
        )
        for name, (srv, bound) in started.items():
            self.bound[name] = bound
            self._servers.append(srv)
        log.info(
            "waypoint started",
            waypoint=self.me.key,
            identity=self.identity.uri,
            **{k: format_authority(*a) for k, a in self.bound.items()},
        )

    def _rotated(self, identity: Identity, certs: Certs) -> None:
        if identity == self.identity and self.server is not None:
            self.server.ssl_ctx = certs.server_ctx

    async def shutdown(self) -> None:
        log.info("waypoint draining", waypoint=self.me.key, deadline_s=self.drain_seconds)
        if self.server is not None:
            await self.server.stop_accepting()
            await self.server.close(drain_timeout=self.drain_seconds)
        await self.tasks.aclose()
        with contextlib.suppress(Exception):
            await self.waf.aclose()
        with contextlib.suppress(Exception):
            await self.h2_pool.aclose()
        with contextlib.suppress(Exception):
            await self.ext_authz.aclose()
        with contextlib.suppress(Exception):
            await self.pool.aclose()
        if self._unsubscribe_certs is not None:
            self._unsubscribe_certs()
        await self.certs.aclose()
        for srv in self._servers:
            with contextlib.suppress(OSError):
                await srv.close()
        log.info("waypoint stopped", waypoint=self.me.key)

    # -- one tunnel -------------------------------------------------------------------------------

    async def handle(self, inbound: InboundStream) -> None:
        req = inbound.request
        snapshot = self.state.snapshot()
        target = resolve(snapshot, self.me, req.host, req.port)
        peer_ip, peer_port = inbound._proto.peer_addr[:2]
        if isinstance(target, str):
            log.warning(
                "waypoint refused a tunnel", peer=str(inbound.peer), authority=req.authority, reason=target
            )
            inbound.refuse(400)
            return
        client = Client(inbound.peer, peer_ip, _forwarded_port(req.header("forwarded"), peer_ip) or peer_port)
        peers = Peers(
            inbound.peer,
            snapshot.workload_by_ip(peer_ip),
            target.workload,
            service_of(snapshot, target),
        )
        tunnel = _Tunnel(self, target, client, peers)
        down: ByteStream = HboneByteStream(inbound.accept())
        try:
            http = target.http
            kind = "tcp"
            if http is None:
                kind, down = await sniff(down)
            elif http:
                kind = "http1" if target.protocol is AppProtocol.HTTP11 else "h2"
            if kind == "http1":
                await serve_http1(
                    down,
                    on_request=tunnel.on_request,
                    open_upstream=tunnel.open_upstream,
                    on_done=tunnel.on_done,
                )
            elif kind == "h2":
                await serve_http2(
                    down,
                    on_request=tunnel.on_request,
                    open_upstream=tunnel.open_upstream,
                    on_done=tunnel.on_done,
                    pool=self.h2_pool,
                )
            else:
                await tunnel.relay_tcp(down)
        finally:
            stream = inbound.stream
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stream.done), CLOSE_WAIT)

    # -- upstream -----------------------------------------------------------------------------------

    async def _dial(self, key: PoolKey) -> ClientProtocol:
        certs = await self.certs.get(key.src_identity)
        sock = await self.factory.tcp_socket(family_of(key.dst_addr[0]))
        return await open_connection(
            key.dst_addr[0],
            key.dst_addr[1],
            certs.client_ctx,
            self.trust_domain,
            key.dst_identity,
            sock=sock,
            timeout=self.connect_timeout,
        )

    async def open_tunnel(self, up: Upstream) -> HboneByteStream:
        """A CONNECT to the endpoint, through its node proxy, speaking for ``up.client``."""
        key = PoolKey(self.identity, up.identity, None, (up.ip, HBONE_PORT))
        c = up.client
        headers = [
            ("forwarded", f'for="{format_authority(c.ip, c.port)}"'),
            (XFCC, f'By={self.identity.uri};URI="{c.identity.uri}"'),
        ]
        stream = await asyncio.wait_for(
            self.pool.open_stream(key, format_authority(up.ip, up.port), headers), self.connect_timeout
        )
        return HboneByteStream(stream)

    # -- external authorizers (CUSTOM policies) ---------------------------------------------------

    def _services_named(self, snapshot: ProxySnapshot, host: str) -> list[Service]:
        version, by_host = self._hosts
        if version != snapshot.version:
            by_host = {}
            for s in snapshot.services.values():
                by_host.setdefault(s.hostname, []).append(s)
            self._hosts = (snapshot.version, by_host)
        return by_host.get(host, [])

    def endpoint(self, provider: ExtensionProvider) -> AuthorizerEndpoint | str:
        """An endpoint of the provider's service (``[<namespace>/]<hostname>``), or why none."""
        a = provider.ext_authz
        assert a is not None
        snapshot = self.state.snapshot()
        namespace, _, host = a.service.rpartition("/")
        services = [
            s for s in self._services_named(snapshot, host) if not namespace or s.namespace == namespace
        ]
        if not services:
            return f"no service {a.service} in discovery"
        if len(services) > 1:
            return f"service host {host} is ambiguous: name its namespace ({', '.join(s.namespace for s in services)})"
        svc = services[0]
        ready: list[tuple[Workload, int]] = []
        others: list[tuple[Workload, int]] = []
        for e in snapshot.endpoints(svc.key):
            w = e.workload
            port = w.target_port(svc, a.port)
            if port is not None and w.addresses:
                (ready if w.status is WorkloadStatus.HEALTHY else others).append((w, port))
        if not ready and not others:
            return f"service {a.service} has no endpoint for port {a.port}"
        w, port = random.choice(ready or others)
        hbone = w.tunnel_protocol is TunnelProtocol.HBONE
        return AuthorizerEndpoint(w.addresses[0], port, w.identity if hbone else None)

    async def connect(self, endpoint: Hashable) -> ByteStream:
        """A stream to an external authorizer, speaking as this waypoint (no client to vouch for)."""
        assert isinstance(endpoint, AuthorizerEndpoint)
        if endpoint.identity is not None:
            key = PoolKey(self.identity, endpoint.identity, None, (endpoint.ip, HBONE_PORT))
            stream = await asyncio.wait_for(
                self.pool.open_stream(key, format_authority(endpoint.ip, endpoint.port), []),
                self.connect_timeout,
            )
            return HboneByteStream(stream)
        sock = await self.factory.tcp_socket(family_of(endpoint.ip))
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (endpoint.ip, endpoint.port)),
                self.connect_timeout,
            )
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        return TcpByteStream(reader, writer)

    def custom_provider(
        self, snapshot: ProxySnapshot, custom: tuple[AuthorizationPolicy, ...], request: Request
    ) -> tuple[ExtensionProvider | None, str]:
        """The provider to ask about ``request`` (None: no CUSTOM policy matches it, or the
        request must be denied: then the reason)."""
        matched = [p for p in custom if first_matching_rule(p, request) is not None]
        for p in matched:
            if p.dry_run:
                log.info("dry-run CUSTOM policy matched (not enforced)", waypoint=self.me.key, policy=p.key)
        matched = [p for p in matched if not p.dry_run]
        if not matched:
            return None, ""
        keys = ", ".join(p.key for p in matched)
        names = sorted({p.provider or "" for p in matched})
        if len(names) > 1:
            return (
                None,
                f"CUSTOM policies {keys} name different providers ({', '.join(names)}); one per workload",
            )
        provider = snapshot.extension_providers.get(names[0])
        if provider is None or provider.ext_authz is None:
            return None, f"CUSTOM policy {keys}: no ext_authz provider {names[0]!r} in the mesh config"
        return provider, keys

    def authenticator_for(self, snapshot: ProxySnapshot, target: Target) -> Authenticator:
        """The RequestAuthentications bound to requests for ``target``, ready to validate."""
        svc = service_of(snapshot, target)
        bound = tuple(
            a
            for _, a in sorted(snapshot.waypoint_authentications.items())
            if attaches(
                a.policy,
                waypoint=(self.me.namespace, self.me.name),
                service=(svc.namespace, svc.name) if svc is not None else None,
            )
        )
        key = tuple(id(a) for a in bound)
        found = self._authenticators.get(key)
        if found is None or found[0] != bound:
            if len(self._authenticators) > 256:
                self._authenticators.clear()
            found = self._authenticators[key] = (bound, Authenticator(bound))
        return found[1]

    def policies_for(self, snapshot: ProxySnapshot, target: Target) -> tuple[Any, Any]:
        svc = service_of(snapshot, target)
        chosen = select_policies(
            snapshot.waypoint_policies.values(),
            waypoint=(self.me.namespace, self.me.name),
            service=(svc.namespace, svc.name) if svc is not None else None,
        )
        return chosen.rbac, chosen.custom


class _Tunnel:
    """The callbacks of one downstream connection (one CONNECT)."""

    def __init__(self, wp: Waypoint, target: Target, client: Client, peers: Peers) -> None:
        self.wp = wp
        self.target = target
        self.client = client
        self.peers = peers
        # per request: the RBAC decision, why it was answered locally, Envoy's response flag if set
        self._decisions: dict[int, tuple[L7Decision | None, str, str]] = {}
        self._waf: dict[int, str] = {}  # per request: the WAF's verdict, for the access log

    def _request(self, head: RequestHead | None, path: str, authn: Authenticated | None = None) -> Request:
        t = self.target
        return Request(
            request_principal=authn.principal if authn is not None else None,
            request_auth_claims=authn.claims if authn is not None and authn.principal else {},
            source_principal=self.client.identity,
            source_ip=ipaddress.ip_address(self.client.ip),
            destination_ip=ipaddress.ip_address(t.host),
            destination_port=t.port,
            host=head.authority if head is not None else "",
            method=head.method if head is not None else "",
            path=path,
            headers=Headers(head.headers) if head is not None else Headers(),
        )

    def _facts(self, snapshot: ProxySnapshot, head: RequestHead | None) -> CheckFacts:
        """What an external authorizer is told (Envoy's ``AttributeContext``): the original
        client, the original destination (principal: this waypoint's, the local certificate)."""
        c, t = self.client, self.target
        svc = service_of(snapshot, t)
        http = None
        if head is not None:
            http = HttpFacts(
                method=head.method,
                path=head.path,
                host=head.authority,
                scheme=head.scheme,
                headers=tuple(head.headers),
                protocol="HTTP/2" if head.http_version == "2" else f"HTTP/{head.http_version}",
                request_id=request_id(head.headers),
            )
        return CheckFacts(
            source=Peer(c.ip, c.port, c.identity.uri),
            destination=Peer(t.host, t.port, self.wp.identity.uri, svc.hostname if svc is not None else ""),
            http=http,
        )

    def on_request(self, head: RequestHead) -> Verdict | ReadBody | Awaitable[Verdict | ReadBody]:
        wp = self.wp
        snapshot = wp.state.snapshot()
        norm = normalize_path(head.path, wp.path_normalization)
        if not isinstance(norm, NormalizedPath):
            self._decisions[id(head)] = (None, norm.detail, "")
            return Respond(norm.status, f"{norm.reason}\n".encode(), (("content-type", "text/plain"),))
        authn = wp.authenticator_for(snapshot, self.target).authenticate(head.headers, norm.forward)
        if isinstance(authn, Refused):
            self._decisions[id(head)] = (None, f"{authn.message}: {authn.reason}", "")
            log.info("request refused: JWT", client=self.client.identity.uri, reason=authn.reason)
            return Respond(
                401,
                authn.message.encode(),
                (
                    ("content-type", "text/plain"),
                    ("www-authenticate", 'Bearer realm="", error="invalid_token"'),
                ),
                grpc_status=GRPC_UNAUTHENTICATED,
            )
        rbac, custom = wp.policies_for(snapshot, self.target)
        request = self._request(head, norm.path, authn)
        if custom:  # Istio's order: CUSTOM, then DENY, then ALLOW
            provider, why = wp.custom_provider(snapshot, custom, request)
            if provider is not None:
                assert provider.ext_authz is not None
                with_body = provider.ext_authz.include_request_body
                if with_body is not None:  # the engine reads the body, then the check goes on
                    return ReadBody(
                        with_body.max_request_bytes,
                        with_body.allow_partial_message,
                        lambda body, complete: self._checked_body(
                            snapshot, head, norm, authn, rbac, provider, why, body, complete
                        ),
                    )
                return self._checked(snapshot, head, norm, authn, rbac, provider, why)
            if why:
                self._decisions[id(head)] = (None, why, "RBAC")
                log.warning("request denied: CUSTOM policy", waypoint=wp.me.key, reason=why)
                return deny()
        authorized = self._authorized(snapshot, head, norm, authn, request, rbac, None)
        return self._firewall(head, authorized)

    async def _checked_body(
        self,
        snapshot: ProxySnapshot,
        head: RequestHead,
        norm: NormalizedPath,
        authn: Authenticated,
        rbac: tuple[AuthorizationPolicy, ...],
        provider: ExtensionProvider,
        policies: str,
        body: bytes,
        complete: bool,
    ) -> Verdict:
        """:meth:`_checked` once the body is read (the WAF then inspects that body)."""
        verdict = await self._checked(snapshot, head, norm, authn, rbac, provider, policies, body, complete)
        assert not isinstance(verdict, ReadBody)  # with a body read, the WAF never asks for it again
        return verdict

    async def _checked(
        self,
        snapshot: ProxySnapshot,
        head: RequestHead,
        norm: NormalizedPath,
        authn: Authenticated,
        rbac: tuple[AuthorizationPolicy, ...],
        provider: ExtensionProvider,
        policies: str,
        body: bytes | None = None,
        complete: bool = True,
    ) -> Verdict | ReadBody:
        """Ask ``provider`` (a CUSTOM policy matched; with the body read so far when it asks for
        it), then go on as :meth:`_authorized` and the WAF."""
        facts = self._facts(snapshot, head)
        if body is not None and facts.http is not None:
            facts = dataclasses.replace(
                facts, http=dataclasses.replace(facts.http, body=body, partial_body=not complete)
            )
        verdict = await self.wp.ext_authz.check(provider, facts)
        if isinstance(verdict, Denied):
            self._decisions[id(head)] = (None, verdict.reason, "UAEX")
            log.info("request denied by an external authorizer", waypoint=self.wp.me.key, policy=policies,
                     client=self.client.identity.uri, reason=verdict.reason)  # fmt: skip
            return Respond(verdict.status, verdict.body, verdict.headers)
        if verdict.failed_open:
            log.warning(
                "external authorizer failed, allowed (failOpen)",
                waypoint=self.wp.me.key,
                reason=verdict.reason,
            )
        edited = _edited(head.headers, verdict)
        request = self._request(
            dataclasses.replace(head, headers=edited) if edited is not None else head, norm.path, authn
        )
        authorized = self._authorized(snapshot, head, norm, authn, request, rbac, verdict)
        return await resolve_verdict(
            self._firewall(head, authorized, (body, complete) if body is not None else None)
        )

    # -- the web application firewall -------------------------------------------------------------

    def _firewall(
        self, head: RequestHead, verdict: Verdict, body: tuple[bytes, bool] | None = None
    ) -> Verdict | ReadBody | Awaitable[Verdict]:
        """The WAF stage: a request authorization let through is inspected by its WafPolicy (the
        body too when its type is inspected: read first, unless already read in ``body``)."""
        if not isinstance(verdict, Forward):
            return verdict
        svc = self.peers.dst_service
        binding = self.wp.waf.for_request((svc.namespace, svc.name) if svc is not None else None)
        if binding is None or binding.policy.mode is WafMode.DISABLED:
            return verdict
        engine = binding.engine
        if body is None and _may_have_body(head) and engine.wants_body(head.header("content-type")):
            return ReadBody(
                engine.body_buffer_limit,
                True,  # over the limit: the policy's onLimit decides (Reject: 413, or inspect a part)
                lambda data, complete: self._inspect(head, verdict, binding, data),
            )
        return self._inspect(head, verdict, binding, body[0] if body is not None else None)

    async def _inspect(
        self, head: RequestHead, verdict: Forward, binding: Binding, body: bytes | None
    ) -> Verdict:
        wp = self.wp
        headers = head.headers
        if head.header("host") is None and head.authority:
            headers = (("host", head.authority), *headers)
        rid = head.header("x-request-id") or None
        request = WafRequest(
            method=head.method,
            uri=head.path,
            headers=headers,
            body=body or None,
            http_version=head.http_version,
            client_addr=self.client.ip,
            client_port=self.client.port,
            server_addr=self.target.host,
            server_port=self.target.port,
            request_id=rid,
        )
        svc = self.peers.dst_service
        for _ in range(2):
            try:
                result = await binding.engine.inspect(request)
                break
            except RuntimeError:  # its engine was replaced while this request waited: the new one
                fresh = wp.waf.for_request((svc.namespace, svc.name) if svc is not None else None)
                if fresh is None or fresh.policy.mode is WafMode.DISABLED:
                    return verdict
                binding = fresh
        else:
            raise RuntimeError("no WAF engine for this request")
        dst = svc.hostname if svc is not None else "unknown"
        wp.metrics.waf(result.action, result.mode.value, dst, result.rule_ids)
        if result.findings:
            self._log_findings(head, binding, result, dst)
        self._waf[id(head)] = f"{result.action} {','.join(map(str, result.rule_ids)) or '-'}"
        if not result.blocked:
            return verdict
        decision = self._decisions.get(id(head), (None, "", ""))[0]
        self._decisions[id(head)] = (decision, f"WAF: blocked by {binding.policy.key}", "")
        message = f"Request blocked by the web application firewall (request id {result.request_id})"
        return Respond(
            result.status if 400 <= result.status <= 599 else 403,
            f"{message}\n".encode(),
            (("content-type", "text/plain"), ("x-request-id", result.request_id)),
            grpc_status=GRPC_PERMISSION_DENIED,
            grpc_message=message,
        )

    def _log_findings(self, head: RequestHead, binding: Binding, result: WafVerdict, dst: str) -> None:
        log.warning(
            "waf",
            action=result.action,
            mode=result.mode.value,
            policy=binding.policy.key,
            request_id=result.request_id,
            rule_ids=list(result.rule_ids),
            messages=[f.message for f in result.findings][:20],
            anomaly_score=result.anomaly_score,
            status=result.status if result.blocked else None,
            src=self.client.identity.uri,
            src_ip=self.client.ip,
            dst_service=dst,
            method=head.method,
            path=head.path[:512],
        )

    def _authorized(
        self,
        snapshot: ProxySnapshot,
        head: RequestHead,
        norm: NormalizedPath,
        authn: Authenticated,
        request: Request,
        rbac: tuple[AuthorizationPolicy, ...],
        allowed: Allowed | None,
    ) -> Verdict:
        """DENY and ALLOW policies, then an endpoint (with an authorizer's header changes)."""
        wp = self.wp
        decision = evaluate(rbac, request)
        for dry in decision.dry_run:
            log.info("dry-run authorization", waypoint=wp.me.key, result=str(dry))
        self._decisions[id(head)] = (decision, "", "")
        if not decision.allow:
            return deny()
        if norm.redirect:
            return Respond(307, b"", (("location", norm.forward),))
        eps = endpoints(snapshot, wp.me, self.target)
        if not eps:
            self._decisions[id(head)] = (decision, "no healthy upstream", "")
            return Respond(503, b"no healthy upstream\n", (("content-type", "text/plain"),))
        w, port = random.choice(eps)
        up = Upstream(_same_family(w, self.target.host), port, w.identity, self.client, w)
        path = authn.path if authn.path is not None else norm.forward
        add, remove = (
            authn.add_headers,
            frozenset({XFCC}) | authn.remove_headers,
        )  # no client speaks for another
        if allowed is None:
            return Forward(
                upstream_key=up,
                path=path if path != head.path else None,
                add_headers=add,
                remove_headers=remove,
            )
        return Forward(
            upstream_key=up,
            path=path if path != head.path else None,
            add_headers=(*add, *allowed.set_headers, *allowed.append_headers),
            remove_headers=remove | allowed.remove_headers | {k for k, _ in allowed.set_headers},
            response_set=allowed.response_set,
            response_append=allowed.response_append,
        )

    async def open_upstream(self, head: RequestHead, forward: Forward) -> ByteStream:
        key = forward.upstream_key
        assert isinstance(key, Upstream)
        return await self.wp.open_tunnel(key)

    def on_done(self, rec: RequestRecord) -> None:
        decision, why, flag = self._decisions.pop(id(rec.head), (None, "", ""))
        waf = self._waf.pop(id(rec.head), None)
        if rec.local and flag:
            flags = flag
        elif rec.local and decision is not None and not decision.allow:
            flags = "RBAC"  # Envoy's flag for a request denied by authorization
        elif rec.upstream_failure:
            flags = "UF" if rec.status in (None, 503) and rec.upstream_failure.startswith("connect") else "UR"
        elif rec.downstream_failure:
            flags = "DC"
        elif rec.local and why:
            flags = "NR" if why == "no healthy upstream" else "-"
        else:
            flags = "-"
        dst = rec.upstream_key.identity.uri if isinstance(rec.upstream_key, Upstream) else None
        extra: dict[str, object] = {"upstream": dst} if dst else {}
        if decision is not None and decision.policy is not None:
            extra["policy"] = decision.policy
            extra["rule"] = decision.rule
        if decision is not None and not decision.allow:
            extra["reason"] = decision.reason
        elif why:
            extra["reason"] = why
        if rec.upstream_failure:
            extra["upstream_failure"] = rec.upstream_failure
        for audit in decision.audit if decision is not None else ():
            extra.setdefault("audit", str(audit))
        if waf is not None:
            extra["waf"] = waf
        peers = self.peers
        if isinstance(rec.upstream_key, Upstream) and rec.upstream_key.workload is not None:
            peers = dataclasses.replace(peers, dst_workload=rec.upstream_key.workload)
        self.wp.metrics.request(peers, rec, flags, extra)

    async def relay_tcp(self, down: ByteStream) -> None:
        """Not HTTP: the policies as Istio's TCP filter reads them decide (:mod:`waypoint.tcp_policy`),
        then bytes are relayed."""
        wp = self.wp
        snapshot = wp.state.snapshot()
        rbac, custom = wp.policies_for(snapshot, self.target)
        request = self._request(None, "")
        decision = evaluate([tcp_view(p) for p in rbac], request)
        flags = "-"
        up: ByteStream | None = None
        try:
            provider, why = wp.custom_provider(snapshot, tuple(tcp_view(p) for p in custom), request)
            if provider is not None:
                verdict = await wp.ext_authz.check(provider, self._facts(snapshot, None))
                if isinstance(verdict, Denied):
                    flags = "UAEX"
                    log.info("tcp connection denied by an external authorizer", client=self.client.identity.uri,
                             reason=verdict.reason)  # fmt: skip
                    down.abort()
                    return
            if (provider is None and why) or not decision.allow:
                flags = "RBAC"
                reason = why if provider is None and why else decision.reason
                log.info(
                    "tcp connection denied at the waypoint", client=self.client.identity.uri, reason=reason
                )
                down.abort()
                return
            eps = endpoints(snapshot, wp.me, self.target)
            if not eps:
                flags = "NR"
                down.abort()
                return
            w, port = random.choice(eps)
            try:
                up = await wp.open_tunnel(
                    Upstream(_same_family(w, self.target.host), port, w.identity, self.client, w)
                )
            except Exception as e:  # refused, unreachable, no certificate: nothing to relay to
                flags = "UF"
                log.info("tcp upstream failed", endpoint=w.name, error=str(e) or type(e).__name__)
                down.abort()
                return
            await _pump_both(down, up)
        finally:
            wp.metrics.tcp(self.peers, flags, opened=True)
            wp.metrics.tcp(self.peers, flags, opened=False)


async def _pump(src: ByteStream, dst: ByteStream) -> None:
    while True:
        data = await src.read()
        if not data:
            dst.write_eof()
            return
        dst.write(data)
        await dst.drain()


async def _pump_both(a: ByteStream, b: ByteStream) -> None:
    tasks = [asyncio.ensure_future(_pump(a, b)), asyncio.ensure_future(_pump(b, a))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                a.abort()
                b.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for t in tasks:
            t.cancel()
        a.close()
        b.close()


def _may_have_body(head: RequestHead) -> bool:
    """Whether a request may carry a body (HTTP/1.1 says so in its head; HTTP/2 is asked)."""
    if head.http_version == "2":
        return True
    length = head.header("content-length")
    return head.header("transfer-encoding") is not None or (length is not None and length.strip() != "0")


def _same_family(w: Workload, like: str) -> str:
    v6 = ":" in like
    return next((ip for ip in w.addresses if (":" in ip) == v6), w.addresses[0])


def _edited(headers: tuple[tuple[str, str], ...], allowed: Allowed) -> tuple[tuple[str, str], ...] | None:
    """The request headers after an authorizer's changes (for the policies evaluated after it);
    None when it changed nothing."""
    if not (allowed.set_headers or allowed.append_headers or allowed.remove_headers):
        return None
    drop = allowed.remove_headers | {k for k, _ in allowed.set_headers}
    return (*((k, v) for k, v in headers if k not in drop), *allowed.set_headers, *allowed.append_headers)


def _forwarded_port(header: str | None, ip: str) -> int | None:
    """The client port in the source proxy's ``forwarded: for="ip:port"`` when the IP matches."""
    found = forwarded_for(header)
    return found[1] if found is not None and found[0] == ip else None


def _policy_json(p: Any) -> dict[str, Any]:
    return {
        "name": p.name,
        "namespace": p.namespace,
        "action": p.action.value,
        "dry_run": p.dry_run,
        "target_refs": [{"kind": t.kind, "name": t.name, "namespace": t.namespace} for t in p.target_refs],
        "rules": len(p.rules),
    }
