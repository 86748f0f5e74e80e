"""What the demo builds: nodes, namespaces, pods, a Service, and the requests it sends."""

from __future__ import annotations

from dataclasses import dataclass

from ambientctl.localmesh.topology import node_cidr
from sources.convert import pod_uid

TRUST_DOMAIN = "cluster.local"
MARKER = "SECRET-ORDER-4242"
APP_PORT = 8080
NODES = ("node-a", "node-b")


def pod_cidr(node: str) -> str:
    """``spec.podCIDR`` of ``node``: the bridge's subnet the demo builds it with (topology.py);
    local mode gives waypoint pods an address from it."""
    return node_cidr(NODES.index(node) + 1)


@dataclass(frozen=True)
class PodSpec:
    namespace: str
    name: str
    node: str
    service_account: str
    app: str
    ip: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def uid(self) -> str:
        return pod_uid(self.namespace, self.name)

    def identity(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/ns/{self.namespace}/sa/{self.service_account}"


NAMESPACES = {"shop": True, "legacy": False}  # name -> enrolled (istio.io/dataplane-mode=ambient)

PODS = (
    PodSpec("shop", "frontend", "node-a", "frontend", "frontend", "10.0.1.2"),
    PodSpec("legacy", "old", "node-a", "default", "old", "10.0.1.3"),
    PodSpec("shop", "cart", "node-a", "cart", "cart", "10.0.1.4"),
    PodSpec("shop", "web", "node-b", "web", "web", "10.0.2.2"),
)

WEB_VIP = "10.96.0.20"


def pod(key: str) -> PodSpec:
    return next(p for p in PODS if p.key == key)


@dataclass(frozen=True)
class Request:
    src: str  # pod key
    dst: str  # pod key
    url: str
    via: str

    @property
    def src_pod(self) -> PodSpec:
        return pod(self.src)

    @property
    def dst_pod(self) -> PodSpec:
        return pod(self.dst)

    @property
    def mesh(self) -> bool:
        """Both ends enrolled: expected over HBONE mTLS."""
        return NAMESPACES[self.src_pod.namespace] and NAMESPACES[self.dst_pod.namespace]

    @property
    def cross_node(self) -> bool:
        return self.src_pod.node != self.dst_pod.node


REQUESTS = (
    Request("shop/frontend", "shop/web", f"http://10.0.2.2:{APP_PORT}/order", "pod IP 10.0.2.2:8080"),
    Request("shop/frontend", "shop/web", f"http://{WEB_VIP}:80/order", f"service VIP {WEB_VIP}:80"),
    Request("legacy/old", "shop/web", f"http://10.0.2.2:{APP_PORT}/order", "pod IP 10.0.2.2:8080"),
    Request("shop/frontend", "shop/cart", f"http://10.0.1.4:{APP_PORT}/cart", "pod IP 10.0.1.4:8080"),
)


REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"


def local_config(
    redirected: frozenset[str] = frozenset(),
    policies: tuple[str, ...] = (),
    *,
    web_waypoint: str | None = None,
) -> str:
    """The local-mode YAML (LOCAL_MODE.md): plain Kubernetes objects.

    ``redirected``: pod keys whose redirection the cni agent confirmed; they carry the annotation
    ``ambient.istio.io/redirection: enabled`` that the agent writes through the API server in
    Kubernetes mode, and that makes the control plane publish them as HBONE-capable.
    ``policies``: further documents (the acts' ``security.istio.io/v1`` objects, a waypoint's
    ``Gateway``), appended. ``web_waypoint``: the Service ``web`` gets the label
    ``istio.io/use-waypoint: <it>`` (the waypoint act).
    """
    docs = [
        f"apiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\nspec: {{podCIDR: {pod_cidr(n)}}}\n"
        for n in NODES
    ]
    for ns, enrolled in NAMESPACES.items():
        labels = "\n  labels: {istio.io/dataplane-mode: ambient}" if enrolled else ""
        docs.append(f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}{labels}\n")
    for p in PODS:
        docs.append(
            "apiVersion: v1\nkind: Pod\n"
            f"metadata: {{name: {p.name}, namespace: {p.namespace}, labels: {{app: {p.app}}}"
            + (f", annotations: {{{REDIRECTION_ANNOTATION}: enabled}}" if p.key in redirected else "")
            + "}\n"
            f"spec: {{nodeName: {p.node}, serviceAccountName: {p.service_account}}}\n"
            f"status: {{podIP: {p.ip}}}\n"
        )
    labels = f", labels: {{{USE_WAYPOINT_LABEL}: {web_waypoint}}}" if web_waypoint else ""
    docs.append(
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop{labels}}}\n"
        f"spec:\n  clusterIP: {WEB_VIP}\n  selector: {{app: web}}\n"
        f"  ports: [{{name: http, port: 80, targetPort: {APP_PORT}}}]\n"
    )
    docs.extend(policies)
    return "---\n".join(docs)


# -- the policy act: Istio security objects, as a user would write them ----------------------------

STATIC_STRICT = "istio-system/istio_converted_static_strict"  # what STRICT becomes for ztunnel


@dataclass(frozen=True)
class Document:
    """One object the acts add to mesh.yaml, as a user would write it."""

    key: str  # namespace/name
    yaml: str


Policy = Document


STRICT_SHOP = Policy(
    "shop/default",
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: default, namespace: shop}\n"
    "spec:\n  mtls: {mode: STRICT}\n",
)
WEB_ALLOW_FRONTEND = Policy(
    "shop/web-allow-frontend",
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: web-allow-frontend, namespace: shop}\n"
    "spec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n"
    f'  rules:\n  - from: [{{source: {{principals: ["{TRUST_DOMAIN}/ns/shop/sa/frontend"]}}}}]\n',
)
WEB_DENY_FRONTEND = Policy(
    "shop/web-deny-frontend",
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: web-deny-frontend, namespace: shop}\n"
    "spec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n"
    f'  rules:\n  - from: [{{source: {{principals: ["{TRUST_DOMAIN}/ns/shop/sa/frontend"]}}}}]\n',
)


# -- the waypoint act: an L7 proxy for shop/web -----------------------------------------------------

WAYPOINT_NODE = "node-b"  # the Gateway's ambient-mesh.io/node annotation: next to web
WAYPOINT = Document(
    "shop/waypoint",
    "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
    "metadata:\n  name: waypoint\n  namespace: shop\n"
    f"  annotations: {{ambient-mesh.io/node: {WAYPOINT_NODE}}}\n"
    "spec:\n  gatewayClassName: istio-waypoint\n"
    "  listeners:\n  - {name: mesh, port: 15008, protocol: HBONE}\n",
)


def waypoint_identity(gateway: Document = WAYPOINT) -> str:
    """The waypoint's own identity: the service account named after its Gateway (as in Istio)."""
    ns, name = gateway.key.split("/", 1)
    return f"spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{name}"


# With a waypoint, web's ztunnel sees the waypoint's identity on service traffic (Istio's default):
# the L4 ALLOW for frontend must also name the waypoint, as Istio's documentation says.
WEB_ALLOW_FRONTEND_AND_WAYPOINT = Document(
    "shop/web-allow-frontend",
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: web-allow-frontend, namespace: shop}\n"
    "spec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n"
    "  rules:\n  - from: [{source: {principals:\n"
    f'      ["{TRUST_DOMAIN}/ns/shop/sa/frontend", "{TRUST_DOMAIN}/ns/shop/sa/waypoint"]}}}}]\n',
)
WEB_DENY_POST_ADMIN = Document(
    "shop/web-deny-post-admin",
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: web-deny-post-admin, namespace: shop}\n"
    "spec:\n"
    '  targetRefs: [{kind: Service, group: "", name: web}]\n'
    "  action: DENY\n"
    '  rules:\n  - to: [{operation: {methods: ["POST"], paths: ["/admin"]}}]\n',
)
