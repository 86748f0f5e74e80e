"""Kubernetes object dicts -> model objects, and the errors for bad ones."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from mesh.model import (
    AuthorizationAction,
    AuthorizationPolicy,
    Gateway,
    MtlsMode,
    Namespace,
    Node,
    PeerAuthentication,
    PolicyTargetRef,
    RequestAuthentication,
    Service,
    ServiceAccount,
    TunnelProtocol,
    WaypointRef,
    Workload,
    WorkloadSelector,
    WorkloadStatus,
)
from sources.convert import ConfigError, ConvertOptions, convert, is_supported, pod_uid


def obj(text: str) -> dict[str, Any]:
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def conv(text: str, options: ConvertOptions | None = None) -> Any:
    return convert(obj(text), options)


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        conv(text)
    return info.value


POD = """
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.0.1.2}
"""


def test_pod_minimal_defaults() -> None:
    w = conv("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
    assert isinstance(w, Workload)
    assert (w.namespace, w.name, w.node, w.service_account) == ("default", "p", "", "default")
    assert w.ips == ()  # podIP may be absent
    assert w.uid == pod_uid("default", "p")
    assert w.tunnel_protocol is TunnelProtocol.NONE
    assert w.status is WorkloadStatus.HEALTHY
    assert w.waypoint is None and not w.host_network


def test_pod_full() -> None:
    w = conv(POD)
    assert isinstance(w, Workload)
    assert (w.namespace, w.name, w.node, w.service_account) == ("shop", "web-1", "node-a", "web")
    assert w.ips == ("10.0.1.2",)
    assert w.labels == {"app": "web"}
    assert w.trust_domain == "cluster.local"
    w = conv(
        """
        apiVersion: v1
        kind: Pod
        metadata:
          name: p
          namespace: ns
          uid: 2b7d7a0e-1111-2222-3333-444455556666
          creationTimestamp: 2024-05-01T12:00:00Z
          labels:
            istio.io/use-waypoint: wp
            istio.io/use-waypoint-namespace: infra
          annotations: {ambient.istio.io/redirection: enabled}
        spec:
          hostNetwork: true
          serviceAccount: legacy
          containers:
          - name: app
            ports: [{name: http, containerPort: 8080}, {containerPort: 9090}]
        status:
          phase: Running
          podIP: "fd00::0001"
          podIPs: [{ip: "fd00::1"}, {ip: 10.0.0.7}]
          conditions: [{type: Ready, status: "False"}]
        """,
        ConvertOptions(trust_domain="example.org", network="net1"),
    )
    assert w.uid == "2b7d7a0e-1111-2222-3333-444455556666"
    assert w.creation_timestamp == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert w.waypoint == WaypointRef(name="wp", namespace="infra")
    assert w.tunnel_protocol is TunnelProtocol.HBONE
    assert w.host_network
    assert w.service_account == "legacy"
    assert w.named_ports == {"http": 8080}
    assert w.ips == ("fd00::1", "10.0.0.7")  # canonical, deduplicated
    assert w.status is WorkloadStatus.UNHEALTHY
    assert (w.trust_domain, w.network) == ("example.org", "net1")


def test_pod_uid_is_stable_and_distinct() -> None:
    assert pod_uid("a", "b") == pod_uid("a", "b")
    assert pod_uid("a", "b") != pod_uid("b", "a")
    assert pod_uid("a-b", "c") != pod_uid("a", "b-c")


@pytest.mark.parametrize("phase", ["Failed", "Succeeded"])
def test_finished_pods_are_unhealthy(phase: str) -> None:
    w = conv(f"apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nstatus: {{phase: {phase}}}\n")
    assert w.status is WorkloadStatus.UNHEALTHY


def test_timestamps_as_strings_too() -> None:
    w = convert(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "creationTimestamp": "2024-05-01T12:00:00Z"},
        }
    )
    assert isinstance(w, Workload)
    assert w.creation_timestamp == datetime(2024, 5, 1, 12, tzinfo=UTC)
    naive = convert(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "creationTimestamp": "2024-05-01T12:00:00"},
        }
    )
    assert isinstance(naive, Workload) and naive.creation_timestamp is not None
    assert naive.creation_timestamp.tzinfo is UTC


def test_node_namespace_serviceaccount() -> None:
    # The API server ignores metadata.namespace on cluster-scoped kinds, and so do we.
    assert conv("apiVersion: v1\nkind: Node\nmetadata: {name: n, namespace: x}") == Node(name="n")
    assert conv("apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {x: y}}") == Node(
        name="node-a", labels={"x": "y"}
    )
    ns = conv(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: "
        "{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}"
    )
    assert isinstance(ns, Namespace)
    assert ns.labels["istio.io/dataplane-mode"] == "ambient"
    assert ns.waypoint == WaypointRef(name="wp", namespace="shop")
    sa = conv("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}")
    assert sa == ServiceAccount(namespace="shop", name="web")


def test_service() -> None:
    s = conv(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: wp}}
        spec:
          clusterIP: 10.96.0.20
          clusterIPs: [10.96.0.20, "fd00:96::20"]
          selector: {app: web}
          ports:
          - {name: http, port: 80, targetPort: 8080, appProtocol: http}
          - {name: grpc, port: 9000, targetPort: grpc}
          - {name: dns, port: 53, protocol: UDP}
        """
    )
    assert isinstance(s, Service)
    assert s.hostname == "web.shop.svc.cluster.local"
    assert s.vips == ("10.96.0.20", "fd00:96::20")
    assert s.selector == {"app": "web"}
    assert s.waypoint == WaypointRef(name="wp", namespace="shop")
    assert [(p.port, p.target_port, p.name, p.app_protocol, p.protocol) for p in s.ports] == [
        (80, 8080, "http", "http", "TCP"),
        (9000, "grpc", "grpc", None, "TCP"),
        (53, 53, "dns", None, "UDP"),
    ]


def test_headless_and_selectorless_services() -> None:
    s = conv(
        "apiVersion: v1\nkind: Service\nmetadata: {name: h}\n"
        "spec: {clusterIP: None, selector: {}, ports: [{port: 80}]}"
    )
    assert isinstance(s, Service)
    assert s.vips == ()
    assert s.selector is None
    assert conv("apiVersion: v1\nkind: Service\nmetadata: {name: e}\n").vips == ()


def test_service_cluster_domain_option() -> None:
    s = conv(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: b}",
        ConvertOptions(cluster_domain="corp.example"),
    )
    assert s.hostname == "a.b.svc.corp.example"


def test_gateway() -> None:
    gw = conv(
        """
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: all}}
        spec:
          gatewayClassName: istio-waypoint
          listeners: [{name: mesh, port: 15008, protocol: HBONE}]
        """
    )
    assert isinstance(gw, Gateway)
    assert gw.is_waypoint and gw.waypoint_for == "all"
    assert gw.listeners[0].port == 15008


def test_peer_authentication() -> None:
    pa = conv(
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: strict, namespace: shop}
        spec:
          selector: {matchLabels: {app: web}}
          mtls: {mode: STRICT}
          portLevelMtls:
            8080: {mode: PERMISSIVE}
            "9090": {mode: DISABLE}
        """
    )
    assert isinstance(pa, PeerAuthentication)
    assert pa.selector == WorkloadSelector({"app": "web"})
    assert pa.mtls_mode is MtlsMode.STRICT
    assert pa.port_level_mtls == {8080: MtlsMode.PERMISSIVE, 9090: MtlsMode.DISABLE}
    mesh_wide = conv(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: istio-system}\n"
    )
    assert mesh_wide.mtls_mode is MtlsMode.UNSET and mesh_wide.selector is None


def test_authorization_policy() -> None:
    ap = conv(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: web, namespace: shop}
        spec:
          selector: {matchLabels: {app: web}}
          action: DENY
          rules:
          - from:
            - source:
                principals: [cluster.local/ns/shop/sa/frontend]
                notNamespaces: [evil]
                ipBlocks: [10.0.0.0/8, 192.168.1.7]
                remoteIpBlocks: [1.2.3.0/24]
                requestPrincipals: ["*"]
            to:
            - operation: {ports: ["8080", 9090], methods: [GET], paths: [/api/*], notHosts: [x]}
            when:
            - {key: source.ip, values: [10.0.0.1]}
            - {key: "request.headers[x-user]", notValues: [bob]}
        """
    )
    assert isinstance(ap, AuthorizationPolicy)
    assert ap.action is AuthorizationAction.DENY
    rule = ap.rules[0]
    src = rule.from_[0].source
    assert src.principals == ("cluster.local/ns/shop/sa/frontend",)
    assert src.not_namespaces == ("evil",)
    assert src.ip_blocks == ("10.0.0.0/8", "192.168.1.7/32")
    assert src.remote_ip_blocks == ("1.2.3.0/24",)
    assert src.request_principals == ("*",)
    op = rule.to[0].operation
    assert op.ports == (8080, 9090)
    assert (op.methods, op.paths, op.not_hosts) == (("GET",), ("/api/*",), ("x",))
    assert [(c.key, c.values, c.not_values) for c in rule.when] == [
        ("source.ip", ("10.0.0.1",), ()),
        ("request.headers[x-user]", (), ("bob",)),
    ]


def test_authorization_policy_empty_forms_keep_their_meaning() -> None:
    head = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
    deny_all = conv(head + "spec: {}")
    assert deny_all.action is AuthorizationAction.ALLOW and deny_all.rules == ()
    allow_all = conv(head + "spec: {rules: [{}]}")
    assert len(allow_all.rules) == 1 and allow_all.rules[0].from_ == ()
    no_spec = conv(head)
    assert no_spec.rules == ()


def test_authorization_policy_custom_and_target_refs() -> None:
    ap = conv(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: ext, namespace: shop}
        spec:
          targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
          action: CUSTOM
          provider: {name: my-authz}
          rules: [{to: [{operation: {paths: [/admin]}}]}]
        """
    )
    assert ap.action is AuthorizationAction.CUSTOM
    assert ap.provider == "my-authz"
    assert ap.target_refs == (
        PolicyTargetRef(kind="Gateway", name="waypoint", group="gateway.networking.k8s.io"),
    )
    single = conv(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {targetRef: {kind: Service, name: web}}"
    )
    assert single.target_refs == (PolicyTargetRef(kind="Service", name="web"),)


def test_request_authentication() -> None:
    ra = conv(
        """
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: jwt, namespace: shop}
        spec:
          selector: {matchLabels: {app: web}}
          jwtRules:
          - issuer: https://issuer.example
            jwksUri: https://issuer.example/jwks
            audiences: [web]
            fromHeaders: [{name: x-jwt, prefix: "Bearer "}]
            fromParams: [token]
            forwardOriginalToken: true
            outputPayloadToHeader: x-payload
            outputClaimToHeaders: [{header: x-sub, claim: sub}]
          - {issuer: other, jwks: '{"keys": []}'}
        """
    )
    assert isinstance(ra, RequestAuthentication)
    r = ra.jwt_rules[0]
    assert (r.issuer, r.jwks_uri, r.audiences) == (
        "https://issuer.example",
        "https://issuer.example/jwks",
        ("web",),
    )
    assert (r.from_headers[0].name, r.from_headers[0].prefix) == ("x-jwt", "Bearer ")
    assert r.from_params == ("token",)
    assert r.forward_original_token
    assert r.output_payload_to_header == "x-payload"
    assert (r.output_claim_to_headers[0].header, r.output_claim_to_headers[0].claim) == ("x-sub", "sub")
    assert ra.jwt_rules[1].jwks == '{"keys": []}'


def test_unknown_kinds_convert_to_none() -> None:
    cm = obj("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}")
    assert convert(cm) is None
    assert not is_supported(cm)
    # Kinds of other groups, even of a name we read (Istio's own Gateway, a Knative Service).
    assert convert(obj("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}")) is None
    assert convert(obj("apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: s}")) is None
    assert (
        convert(obj("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}")) is None
    )
    assert is_supported(obj(POD))


@pytest.mark.parametrize(
    ("api_version", "kind", "field", "reason"),
    [
        # A kind we read at a version no API server serves: a mistake, never a silent skip.
        ("security.istio.io/v1alpha1", "PeerAuthentication", "apiVersion", "read as security.istio.io/v1 or"),
        ("v2", "Pod", "apiVersion", "Pod is read as v1, not 'v2'"),
        (
            "gateway.networking.k8s.io/v1alpha2",
            "Gateway",
            "apiVersion",
            "read as gateway.networking.k8s.io/v1",
        ),
        # A security policy in another group: a mistyped group must not skip (remove) it.
        ("security.istio.i/v1", "AuthorizationPolicy", "apiVersion", "read as security.istio.io/v1 or"),
        # security.istio.io has exactly three kinds: a typo in one must not drop a DENY quietly.
        ("security.istio.io/v1", "AuthorisationPolicy", "kind", "has no kind 'AuthorisationPolicy'"),
        # Garbled apiVersions, whatever the kind.
        ("v1 ", "ConfigMap", "apiVersion", "not an apiVersion"),
        ("/v1", "Pod", "apiVersion", "group must not be empty"),
        ("Security.Istio.io/v1", "AuthorizationPolicy", "apiVersion", "group must be a DNS-1123 subdomain"),
        ("security.istio.io/v1/x", "AuthorizationPolicy", "apiVersion", "group must be a DNS-1123"),
        ("security.istio.io/", "AuthorizationPolicy", "apiVersion", "version must not be empty"),
        ("x" * 100_000, "Pod", "apiVersion", "(100000 characters)"),
    ],
)
def test_bad_api_versions_and_kinds(api_version: str, kind: str, field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        convert({"apiVersion": api_version, "kind": kind, "metadata": {"name": "p"}})
    assert info.value.field == field
    assert reason in info.value.reason
    assert len(str(info.value)) < 400


ERRORS = [
    # (manifest, kind, name, field, reason fragment)
    ("kind: Pod\nmetadata: {name: p}", "Pod", "default/p", "apiVersion", "required"),
    ("apiVersion: v1\nmetadata: {name: p}", None, "default/p", "kind", "required"),
    ("apiVersion: 1\nkind: Pod", "Pod", None, "apiVersion", "must be a string"),
    ("apiVersion: v1\nkind: Pod", "Pod", None, "metadata", "required"),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: Web_1}",
        "Pod",
        "default/Web_1",
        "metadata.name",
        "DNS-1123",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a.b}",
        "Pod",
        "a.b/p",
        "metadata.namespace",
        "not a valid namespace",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {version: 1}}",
        "Pod",
        "default/p",
        "metadata.labels[version]",
        "must be a string",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.0.0.300}",
        "Pod",
        "default/p",
        "status.podIP",
        "not an IP address",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {hostNetwork: yes-please}",
        "Pod",
        "default/p",
        "spec.hostNetwork",
        "true or false",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {serviceAccountName: Bad_SA}",
        "Pod",
        "default/p",
        "spec.serviceAccountName",
        "not a valid service account",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{ports: [{containerPort: 0}]}]}",
        "Pod",
        "default/p",
        "spec.containers[0].ports[0].containerPort",
        "1-65535",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, creationTimestamp: yesterday}",
        "Pod",
        "default/p",
        "metadata.creationTimestamp",
        "RFC 3339",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: eighty}]}",
        "Service",
        "default/s",
        "spec.ports[0].port",
        "port number",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 70000}]}",
        "Service",
        "default/s",
        "spec.ports[0].port",
        "1-65535, got 70000",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{name: a}]}",
        "Service",
        "default/s",
        "spec.ports[0].port",
        "required",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: '8080'}]}",
        "Service",
        "default/s",
        "spec.ports[0].targetPort",
        "without quotes",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}, {port: 81}]}",
        "Service",
        "default/s",
        "spec.ports[0].name",
        "more than one port",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, name: a},"
        " {port: 80, name: b}]}",
        "Service",
        "default/s",
        "spec.ports[1].port",
        "already in",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, protocol: HTTP}]}",
        "Service",
        "default/s",
        "spec.ports[0].protocol",
        "one of TCP",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: ten}",
        "Service",
        "default/s",
        "spec.clusterIP",
        "not an IP",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: {port: 80}}",
        "Service",
        "default/s",
        "spec.ports",
        "must be a list",
    ),
    (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {listeners: []}",
        "Gateway",
        "default/g",
        "spec.gatewayClassName",
        "required",
    ),
    (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\n"
        "spec: {gatewayClassName: c, listeners: [{name: mesh, protocol: HBONE}]}",
        "Gateway",
        "default/g",
        "spec.listeners[0].port",
        "required",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n"
        "spec: {mtls: {mode: strict}}",
        "PeerAuthentication",
        "default/p",
        "spec.mtls.mode",
        "not one of UNSET, DISABLE, PERMISSIVE, STRICT",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n"
        "spec: {portLevelMtls: {80: {mode: STRICT}}}",
        "PeerAuthentication",
        "default/p",
        "spec.portLevelMtls",
        "requires a selector",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n"
        "spec: {selector: {matchLabels: {a: b}}, portLevelMtls: {http: {mode: STRICT}}}",
        "PeerAuthentication",
        "default/p",
        "spec.portLevelMtls.http",
        "port number",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {action: REJECT}",
        "AuthorizationPolicy",
        "default/p",
        "spec.action",
        "not one of ALLOW, DENY, AUDIT, CUSTOM",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {action: CUSTOM}",
        "AuthorizationPolicy",
        "default/p",
        "spec.provider",
        "required when action is CUSTOM",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {provider: {name: x}}",
        "AuthorizationPolicy",
        "default/p",
        "spec.provider",
        "only allowed with action CUSTOM",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {selector: {matchLabels: {a: b}}, targetRefs: [{kind: Service, name: s}]}",
        "AuthorizationPolicy",
        "default/p",
        "spec.selector",
        "not both",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {rules: [{from: [{}]}]}",
        "AuthorizationPolicy",
        "default/p",
        "spec.rules[0].from[0].source",
        "required",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {rules: [{from: [{source: {}}]}]}",
        "AuthorizationPolicy",
        "default/p",
        "spec.rules[0].from[0].source",
        "must not be empty",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {rules: [{}, {from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}",
        "AuthorizationPolicy",
        "default/p",
        "spec.rules[1].from[0].source.ipBlocks[0]",
        "not an IP address or CIDR",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {rules: [{from: [{source: {serviceAccounts: [shop/*]}}]}]}",
        "AuthorizationPolicy",
        "default/p",
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "no wildcard",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {rules: [{from: [{source: {serviceAccounts: [a], namespaces: [b]}}]}]}",
        "AuthorizationPolicy",
        "default/p",
        "spec.rules[0].from[0].source.serviceAccounts",
        "cannot be set with principals or namespaces",
    ),
    (
        "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCIDRs: [10.0.1.0/24, nope]}",
        "Node",
        "n",
        "spec.podCIDRs[1]",
        "not an IP address or CIDR",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {rules: [{from: [{source: {principals: [1]}}]}]}",
        "AuthorizationPolicy",
        "default/p",
        "spec.rules[0].from[0].source.principals[0]",
        "must be a string",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {rules: [{to: [{operation: {ports: [http]}}]}]}",
        "AuthorizationPolicy",
        "default/p",
        "spec.rules[0].to[0].operation.ports[0]",
        "port number",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec: {rules: [{when: [{key: source.ip}]}]}",
        "AuthorizationPolicy",
        "default/p",
        "spec.rules[0].when[0]",
        "needs values or notValues",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r}\n"
        "spec: {jwtRules: [{jwksUri: x}]}",
        "RequestAuthentication",
        "default/r",
        "spec.jwtRules[0].issuer",
        "required",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r}\n"
        "spec: {jwtRules: [{issuer: i, forwardOriginalToken: 'yes'}]}",
        "RequestAuthentication",
        "default/r",
        "spec.jwtRules[0].forwardOriginalToken",
        "true or false",
    ),
]


@pytest.mark.parametrize(("manifest", "kind", "name", "field", "reason"), ERRORS)
def test_errors_name_the_field_and_reason(
    manifest: str, kind: str | None, name: str | None, field: str, reason: str
) -> None:
    e = error(manifest)
    assert (e.kind, e.name, e.field) == (kind, name, field)
    assert reason in e.reason
    assert field in str(e) and e.reason in str(e)
    assert e.document_index is None


def test_non_mapping_object() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        convert(["not", "an", "object"])  # type: ignore[arg-type]


def test_error_message_layout() -> None:
    e = ConfigError("bad", field="spec.x", kind="Pod", name="ns/p", document_index=2, source="mesh.yaml")
    assert str(e) == "mesh.yaml: document[2] (Pod ns/p): spec.x: bad"
    assert str(ConfigError("bad")) == "bad"
    assert str(ConfigError("bad", document_index=0)) == "document[0]: bad"
    outer = ConfigError("r", field="port").with_context(
        kind="Service", name="a/b", document_index=1, field_prefix="items[0]"
    )
    assert (outer.field, outer.kind, outer.document_index) == ("items[0].port", "Service", 1)
    # inner context wins over outer
    assert ConfigError("r", kind="Pod").with_context(kind="List").kind == "Pod"


def test_authorization_policy_dry_run_annotation() -> None:
    head = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    on = conv(head + 'metadata: {name: p, annotations: {"istio.io/dry-run": "true"}}\nspec: {action: DENY}\n')
    assert isinstance(on, AuthorizationPolicy) and on.dry_run
    off = conv(head + 'metadata: {name: p, annotations: {"istio.io/dry-run": "false"}}\n')
    assert isinstance(off, AuthorizationPolicy) and not off.dry_run
    assert not conv(head + "metadata: {name: p}\n").dry_run
    e = error(head + 'metadata: {name: p, annotations: {"istio.io/dry-run": "yes"}}\n')
    assert 'metadata.annotations["istio.io/dry-run"]' in str(e) and "'yes'" in str(e)


def test_service_accounts_get_the_policys_namespace_and_nodes_their_pod_cidrs() -> None:
    p = convert(
        yaml.safe_load(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n"
            "spec: {rules: [{from: [{source: {serviceAccounts: [web, other/api], notServiceAccounts: [cart]}}]}]}"
        )
    )
    assert isinstance(p, AuthorizationPolicy)
    src = p.rules[0].from_[0].source
    assert (src.service_accounts, src.not_service_accounts) == (("shop/web", "other/api"), ("shop/cart",))
    node = convert(
        yaml.safe_load("apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCIDR: 10.0.1.7/24}")
    )
    assert isinstance(node, Node) and node.pod_cidrs == ("10.0.1.0/24",)
