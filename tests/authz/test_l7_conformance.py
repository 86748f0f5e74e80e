"""The waypoint's L7 engine against Istio's documented examples.

Each case is an AuthorizationPolicy manifest as istio.io writes it (the AuthorizationPolicy
reference, the HTTP traffic, explicit deny, ingress, JWT, dry-run and audit tasks, the security
best practices), converted by the same code that loads users' manifests, a request, and what
Istio's waypoint decides: allow or deny, and the deciding policy. Policies without
``targetRefs`` get one naming the waypoint ``foo/waypoint`` (selector-bound policies are never
a waypoint's, so the docs' ``selector`` is replaced the way the ambient docs do it).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from mesh.identity import Identity
from mesh.l7authz import Request, evaluate, select_policies
from mesh.model.policy import AuthorizationPolicy
from mesh.pathnorm import NormalizedPath, PathNormalization, normalize_path
from sources.convert import convert

WAYPOINT = ("foo", "waypoint")
SERVICE = ("foo", "httpbin")


def policies(text: str) -> list[AuthorizationPolicy]:
    out = []
    for doc in yaml.safe_load_all(text):
        spec = doc.setdefault("spec", {}) or {}
        doc["spec"] = spec
        doc.setdefault("apiVersion", "security.istio.io/v1")
        doc.setdefault("kind", "AuthorizationPolicy")
        doc["metadata"].setdefault("namespace", "foo")
        if "targetRefs" not in spec and "targetRef" not in spec:
            spec.pop("selector", None)
            spec["targetRefs"] = [
                {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
            ]
        obj = convert(doc)
        assert isinstance(obj, AuthorizationPolicy)
        out.append(obj)
    return out


@dataclass(frozen=True)
class Req:
    """A request as a test writes it; ``path`` is raw (normalized with ``mode`` first)."""

    principal: str | None = "cluster.local/ns/default/sa/sleep"
    source_ip: str = "10.0.0.5"
    remote_ip: str | None = None
    host: str = "httpbin.foo"
    method: str = "GET"
    path: str = "/"
    port: int = 8000
    headers: dict[str, str] = field(default_factory=dict)
    jwt: dict[str, Any] | None = None
    mode: PathNormalization = PathNormalization.BASE

    def build(self) -> Request:
        normalized = normalize_path(self.path, self.mode)
        assert isinstance(normalized, NormalizedPath), normalized
        jwt = self.jwt or {}
        return Request(
            source_principal=None if self.principal is None else Identity.parse_principal(self.principal),
            source_ip=ipaddress.ip_address(self.source_ip),
            destination_ip=ipaddress.ip_address("10.96.0.10"),
            destination_port=self.port,
            host=self.host,
            method=self.method,
            path=normalized.path,
            headers=self.headers,
            remote_ip=None if self.remote_ip is None else ipaddress.ip_address(self.remote_ip),
            request_principal=f"{jwt['iss']}/{jwt['sub']}" if "iss" in jwt and "sub" in jwt else None,
            request_auth_claims=jwt,
        )


@dataclass(frozen=True)
class Case:
    id: str
    manifests: str
    request: Req
    allow: bool
    policy: str | None  # the deciding policy, "ns/name"; None: the default decided


# istio.io/latest/docs/reference/config/security/authorization-policy/ (the reference page)
REFERENCE = """
metadata: {name: httpbin}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["GET"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"""
GOOGLE = {"iss": "https://accounts.google.com", "sub": "user-1"}

REFERENCE_DENY = """
metadata: {name: httpbin}
spec:
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: ["foo"]
"""

ALLOW_NOTHING = """
metadata: {name: allow-nothing}
spec: {}
"""

DENY_ALL = """
metadata: {name: deny-all}
spec:
  action: DENY
  rules:
  - {}
"""

ALLOW_ALL = """
metadata: {name: allow-all}
spec:
  action: ALLOW
  rules:
  - {}
"""

OPERATIONS = """
metadata: {name: tester}
spec:
  rules:
  - to:
    - operation:
        methods: ["GET", "HEAD"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
"""

# tasks/security/authorization/authz-http (bookinfo)
BOOKINFO = """
metadata: {name: details-viewer}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]
    to:
    - operation:
        methods: ["GET"]
"""

# tasks/security/authorization/authz-deny
DENY_TOKEN = """
metadata: {name: deny-method-get}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        methods: ["GET"]
    when:
    - key: request.headers[x-token]
      notValues: ["admin"]
---
metadata: {name: allow-path-ip}
spec:
  action: ALLOW
  rules:
  - to:
    - operation:
        paths: ["/ip"]
"""

# tasks/security/authorization/authz-ingress
IP_BLOCKS = """
metadata: {name: ingress-policy}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        ipBlocks: ["1.2.3.4", "5.6.7.0/24"]
"""
REMOTE_IP_BLOCKS = """
metadata: {name: ingress-policy}
spec:
  action: DENY
  rules:
  - from:
    - source:
        remoteIpBlocks: ["1.2.3.4"]
"""

# tasks/security/authorization/authz-jwt
JWT = """
metadata: {name: require-jwt}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        requestPrincipals: ["testing@secure.istio.io/testing@secure.istio.io"]
    when:
    - key: request.auth.claims[groups]
      values: ["group1"]
"""
TESTING = {"iss": "testing@secure.istio.io", "sub": "testing@secure.istio.io", "groups": ["group1", "group2"]}

# ops/best-practices/security: "Use DENY on paths" traps, and hosts with ports
DENY_ADMIN = """
metadata: {name: deny-admin}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin"]
"""
DENY_HOST = """
metadata: {name: deny-host}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        hosts: ["httpbin.example.com"]
"""
DENY_HOST_AND_PORTS = """
metadata: {name: deny-host}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        hosts: ["httpbin.example.com", "httpbin.example.com:*"]
"""
ALLOW_NOT_HEALTHZ = """
metadata: {name: not-healthz}
spec:
  action: ALLOW
  rules:
  - to:
    - operation:
        notPaths: ["/healthz"]
        ports: ["8000"]
"""

# tasks/security/authorization/authz-dry-run
DRY_RUN = """
metadata:
  name: deny-path-headers
  annotations: {"istio.io/dry-run": "true"}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/headers"]
"""

# tasks/observability/logs/... AUDIT
AUDIT = """
metadata: {name: audit-headers}
spec:
  action: AUDIT
  rules:
  - to:
    - operation:
        paths: ["/headers"]
"""

# ambient/usage/l7-features: a policy on a Service served by the waypoint
SERVICE_BOUND = """
metadata: {name: productpage-viewer}
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: httpbin
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/curl"]
    to:
    - operation:
        methods: ["GET"]
"""
OTHER_SERVICE = SERVICE_BOUND.replace("name: httpbin", "name: reviews")

CASES = [
    Case("reference: sleep, GET, google JWT", REFERENCE, Req(method="GET", jwt=GOOGLE), True, "foo/httpbin"),
    Case(
        "reference: dev namespace",
        REFERENCE,
        Req(principal="cluster.local/ns/dev/sa/x", jwt=GOOGLE),
        True,
        "foo/httpbin",
    ),
    Case("reference: POST", REFERENCE, Req(method="POST", jwt=GOOGLE), False, None),
    Case("reference: no JWT", REFERENCE, Req(), False, None),
    Case(
        "reference: other issuer",
        REFERENCE,
        Req(jwt={"iss": "https://evil.example", "sub": "u"}),
        False,
        None,
    ),
    Case(
        "reference: other namespace",
        REFERENCE,
        Req(principal="cluster.local/ns/prod/sa/x", jwt=GOOGLE),
        False,
        None,
    ),
    Case("reference: plaintext", REFERENCE, Req(principal=None, jwt=GOOGLE), False, None),
    Case(
        "deny notNamespaces: other",
        REFERENCE_DENY,
        Req(principal="cluster.local/ns/bar/sa/x"),
        False,
        "foo/httpbin",
    ),
    Case("deny notNamespaces: foo", REFERENCE_DENY, Req(principal="cluster.local/ns/foo/sa/x"), True, None),
    Case("deny notNamespaces: plaintext", REFERENCE_DENY, Req(principal=None), False, "foo/httpbin"),
    Case("allow-nothing", ALLOW_NOTHING, Req(), False, None),
    Case("deny-all", DENY_ALL, Req(), False, "foo/deny-all"),
    Case("allow-all", ALLOW_ALL, Req(principal=None), True, "foo/allow-all"),
    Case("deny-all beats allow-all", DENY_ALL + "---" + ALLOW_ALL, Req(), False, "foo/deny-all"),
    Case("operations: GET /info", OPERATIONS, Req(method="GET", path="/info"), True, "foo/tester"),
    Case("operations: HEAD /info/x", OPERATIONS, Req(method="HEAD", path="/info/x"), True, "foo/tester"),
    Case("operations: POST /data", OPERATIONS, Req(method="POST", path="/data"), True, "foo/tester"),
    Case("operations: POST /info", OPERATIONS, Req(method="POST", path="/info"), False, None),
    Case("operations: GET /data", OPERATIONS, Req(method="GET", path="/data"), False, None),
    Case("operations: method case", OPERATIONS, Req(method="get", path="/info"), False, None),
    Case(
        "bookinfo: productpage GET",
        BOOKINFO,
        Req(principal="cluster.local/ns/default/sa/bookinfo-productpage"),
        True,
        "foo/details-viewer",
    ),
    Case(
        "bookinfo: productpage POST",
        BOOKINFO,
        Req(principal="cluster.local/ns/default/sa/bookinfo-productpage", method="POST"),
        False,
        None,
    ),
    Case(
        "bookinfo: reviews GET", BOOKINFO, Req(principal="cluster.local/ns/default/sa/reviews"), False, None
    ),
    Case("deny task: GET without token", DENY_TOKEN, Req(path="/ip"), False, "foo/deny-method-get"),
    Case(
        "deny task: GET, wrong token",
        DENY_TOKEN,
        Req(path="/ip", headers={"x-token": "guest"}),
        False,
        "foo/deny-method-get",
    ),
    Case(
        "deny task: GET /ip as admin",
        DENY_TOKEN,
        Req(path="/ip", headers={"X-Token": "admin"}),
        True,
        "foo/allow-path-ip",
    ),
    Case(
        "deny task: GET /headers as admin",
        DENY_TOKEN,
        Req(path="/headers", headers={"x-token": "admin"}),
        False,
        None,
    ),
    Case("deny task: POST /ip", DENY_TOKEN, Req(method="POST", path="/ip"), True, "foo/allow-path-ip"),
    Case("ingress: ipBlocks single", IP_BLOCKS, Req(source_ip="1.2.3.4"), True, "foo/ingress-policy"),
    Case("ingress: ipBlocks CIDR", IP_BLOCKS, Req(source_ip="5.6.7.200"), True, "foo/ingress-policy"),
    Case("ingress: ipBlocks other", IP_BLOCKS, Req(source_ip="1.2.3.5"), False, None),
    Case(
        "ingress: ipBlocks ignores XFF", IP_BLOCKS, Req(source_ip="9.9.9.9", remote_ip="1.2.3.4"), False, None
    ),
    Case(
        "ingress: remoteIpBlocks",
        REMOTE_IP_BLOCKS,
        Req(source_ip="10.0.0.1", remote_ip="1.2.3.4"),
        False,
        "foo/ingress-policy",
    ),
    Case(
        "ingress: remoteIpBlocks defaults to source",
        REMOTE_IP_BLOCKS,
        Req(source_ip="1.2.3.4"),
        False,
        "foo/ingress-policy",
    ),
    Case(
        "ingress: remoteIpBlocks other",
        REMOTE_IP_BLOCKS,
        Req(source_ip="1.2.3.4", remote_ip="8.8.8.8"),
        True,
        None,
    ),
    Case("jwt: principal and group", JWT, Req(jwt=TESTING), True, "foo/require-jwt"),
    Case("jwt: no token", JWT, Req(), False, None),
    Case("jwt: wrong group", JWT, Req(jwt={**TESTING, "groups": ["group2"]}), False, None),
    Case("jwt: group as a string", JWT, Req(jwt={**TESTING, "groups": "group1"}), True, "foo/require-jwt"),
    Case("jwt: other subject", JWT, Req(jwt={**TESTING, "sub": "someone"}), False, None),
    Case("paths: /admin", DENY_ADMIN, Req(path="/admin"), False, "foo/deny-admin"),
    Case("paths: /a/../admin", DENY_ADMIN, Req(path="/a/../admin"), False, "foo/deny-admin"),
    Case("paths: /%2e%2e/admin", DENY_ADMIN, Req(path="/%2e%2e/admin"), False, "foo/deny-admin"),
    Case("paths: /%61dmin", DENY_ADMIN, Req(path="/%61dmin"), False, "foo/deny-admin"),
    Case("paths: /admin?x", DENY_ADMIN, Req(path="/admin?x=1"), False, "foo/deny-admin"),
    Case("paths: /admin/ is not /admin", DENY_ADMIN, Req(path="/admin/"), True, None),
    Case("paths: /ADMIN is not /admin", DENY_ADMIN, Req(path="/ADMIN"), True, None),
    Case("paths: //admin passes under BASE", DENY_ADMIN, Req(path="//admin"), True, None),
    Case(
        "paths: //admin under MERGE_SLASHES",
        DENY_ADMIN,
        Req(path="//admin", mode=PathNormalization.MERGE_SLASHES),
        False,
        "foo/deny-admin",
    ),
    Case(
        "paths: /a/../admin under NONE",
        DENY_ADMIN,
        Req(path="/a/../admin", mode=PathNormalization.NONE),
        True,
        None,
    ),
    Case("paths: %2F under BASE", DENY_ADMIN, Req(path="/x%2F..%2Fadmin"), True, None),
    Case(
        "paths: %2F under DECODE_AND_MERGE_SLASHES",
        DENY_ADMIN,
        Req(path="/x%2F..%2Fadmin", mode=PathNormalization.DECODE_AND_MERGE_SLASHES),
        False,
        "foo/deny-admin",
    ),
    Case("paths: backslashes", DENY_ADMIN, Req(path="/x\\..\\admin"), False, "foo/deny-admin"),
    Case("hosts: exact", DENY_HOST, Req(host="httpbin.example.com"), False, "foo/deny-host"),
    Case("hosts: case-insensitive", DENY_HOST, Req(host="HttpBin.Example.COM"), False, "foo/deny-host"),
    Case("hosts: with a port is not matched", DENY_HOST, Req(host="httpbin.example.com:8000"), True, None),
    Case(
        "hosts: host:* catches the port",
        DENY_HOST_AND_PORTS,
        Req(host="httpbin.example.com:8000"),
        False,
        "foo/deny-host",
    ),
    Case("hosts: other host", DENY_HOST_AND_PORTS, Req(host="httpbin.example.org"), True, None),
    Case("notPaths + ports: /get", ALLOW_NOT_HEALTHZ, Req(path="/get"), True, "foo/not-healthz"),
    Case("notPaths + ports: /healthz", ALLOW_NOT_HEALTHZ, Req(path="/healthz"), False, None),
    Case("notPaths + ports: other port", ALLOW_NOT_HEALTHZ, Req(path="/get", port=9000), False, None),
    Case("dry-run DENY is not enforced", DRY_RUN, Req(path="/headers"), True, None),
    Case("audit never decides", AUDIT, Req(path="/headers"), True, None),
    Case(
        "service-bound: curl GET",
        SERVICE_BOUND,
        Req(principal="cluster.local/ns/default/sa/curl"),
        True,
        "foo/productpage-viewer",
    ),
    Case("service-bound: sleep GET", SERVICE_BOUND, Req(), False, None),
    Case("bound to another service: ignored", OTHER_SERVICE, Req(), True, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_istio_documented_behaviour(case: Case) -> None:
    selected = select_policies(policies(case.manifests), waypoint=WAYPOINT, service=SERVICE)
    decision = evaluate(selected.rbac, case.request.build())
    assert (decision.allow, decision.policy) == (case.allow, case.policy), decision.reason


def test_dry_run_reports_what_would_have_happened() -> None:
    selected = select_policies(policies(DRY_RUN), waypoint=WAYPOINT, service=SERVICE)
    hit = evaluate(selected.rbac, Req(path="/headers").build())
    assert hit.allow and hit.dry_run_allow is False
    assert [str(r) for r in hit.dry_run] == ["dry-run DENY policy foo/deny-path-headers: rule 0 matched"]
    miss = evaluate(selected.rbac, Req(path="/ip").build())
    assert miss.allow and miss.dry_run_allow is True and not miss.dry_run[0].matched


def test_audit_reports_the_matching_policy() -> None:
    selected = select_policies(policies(AUDIT + "---" + DENY_ALL), waypoint=WAYPOINT, service=SERVICE)
    decision = evaluate(selected.rbac, Req(path="/headers").build())
    assert (decision.allow, decision.policy) == (False, "foo/deny-all")
    assert [str(a) for a in decision.audit] == ["audited by AUDIT policy foo/audit-headers rule 0"]
    assert evaluate(selected.rbac, Req(path="/ip").build()).audit == ()


def test_custom_policies_are_selected_apart_and_not_evaluated() -> None:
    custom = policies(
        """
metadata: {name: ext-authz}
spec:
  action: CUSTOM
  provider: {name: my-ext-authz}
  rules:
  - to:
    - operation:
        paths: ["/admin"]
"""
    )
    selected = select_policies(custom, waypoint=WAYPOINT, service=SERVICE)
    assert selected.rbac == () and [p.key for p in selected.custom] == ["foo/ext-authz"]
    assert evaluate(custom, Req(path="/admin").build()).allow


def test_allow_denies_everything_not_matched_once_one_allow_applies() -> None:
    # istio.io: "If there are any ALLOW policies ..., deny the request" when none matches.
    both = policies(OPERATIONS + "---" + BOOKINFO)
    decision = evaluate(both, Req(method="DELETE").build())
    assert not decision.allow and decision.policy is None
    assert decision.reason == "denied: no ALLOW policy matched (foo/details-viewer, foo/tester)"
