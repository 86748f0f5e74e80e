"""helm lint / helm template of every chart, rendered objects validated against the Kubernetes
OpenAPI schemas (offline, kubernetes-validate), and the security-relevant fields asserted."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.identity import Identity
from mesh.pki import CertificateAuthority, make_csr
from tests.charts.helm import (
    CHART_NAMES,
    KUBE_VERSIONS,
    Doc,
    Helm,
    HelmError,
    container,
    env_of,
    find,
    find_tool,
    kinds,
    pem_certs,
    pod_spec,
    rbac_rules,
    validate_k8s,
    walk,
)

# Non-default values for every chart: everything a user is likely to turn, at once.
CUSTOM: dict[str, dict[str, Any]] = {
    "base": {"crds": {"wafPolicy": False, "keepOnUninstall": False}, "labels": {"team": "mesh"}},
    "controlplane": {
        "global": {
            "hub": "registry.example.com/mesh",
            "tag": "1.2.3",
            "trustDomain": "example.org",
            "imagePullSecrets": ["regcred"],
        },
        "replicaCount": 3,
        "logLevel": "debug",
        "waypointController": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
        "ca": {"source": "cacerts", "secretName": "my-ca", "rootCertPem": "ROOT"},
        "env": {"EXTRA": "1"},
        "nodeSelector": {"pool": "system"},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
    },
    "cni": {
        "cniBinDir": "/home/kubernetes/bin",
        "cniConfDir": "/etc/cni/conf.d",
        "repair": {"enabled": False},
        "logLevel": "warning",
        "image": "registry.example.com/custom/agent:dev",
    },
    "ztunnel": {
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "terminationGracePeriodSeconds": 60,
        "caAddress": "ca.example:15012",
        "xdsAddress": "xds.example:15012",
        "podAnnotations": {"team": "mesh"},
        "env": {"EXTRA": "x"},
    },
    "ambient": {
        "global": {"tag": "9.9.9", "trustDomain": "corp.example"},
        "cni": {"enabled": False},
        "base": {"crds": {"istioSecurity": False}},
        "ztunnel": {"logLevel": "debug"},
    },
}
# The cacerts test value is not a certificate: give it one that parses where it matters.
VARIANTS = [(c, None) for c in CHART_NAMES] + [(c, CUSTOM[c]) for c in CHART_NAMES]
IDS = [f"{c}-default" for c in CHART_NAMES] + [f"{c}-custom" for c in CHART_NAMES]


@pytest.mark.parametrize(("chart", "values"), VARIANTS, ids=IDS)
def test_lint(helm: Helm, chart: str, values: dict[str, Any] | None) -> None:
    out = helm.lint(chart, values)
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize(("chart", "values"), VARIANTS, ids=IDS)
def test_rendered_objects_are_valid_kubernetes(helm: Helm, chart: str, values: dict[str, Any] | None) -> None:
    docs = helm.template(chart, values)
    assert docs
    for doc in docs:
        assert doc["metadata"]["name"]
        for version in KUBE_VERSIONS:
            validate_k8s(doc, version)


def test_umbrella_renders_the_four_charts(helm: Helm) -> None:
    umbrella = kinds(helm.template("ambient"))
    parts = sorted(k for c in ("base", "controlplane", "cni", "ztunnel") for k in kinds(helm.template(c)))
    assert umbrella == parts


def test_umbrella_passes_global_values_down(helm: Helm) -> None:
    docs = helm.template("ambient", CUSTOM["ambient"])
    assert not [
        d for d in docs if d["kind"] == "CustomResourceDefinition" and "istio.io" in d["metadata"]["name"]
    ]
    assert not [d for d in docs if d["metadata"]["name"].startswith("ambient-cni")]
    cp = container(find(docs, "Deployment", "controlplane"))
    zt = container(find(docs, "DaemonSet", "ztunnel"))
    assert cp["image"].endswith(":9.9.9") and zt["image"].endswith(":9.9.9")
    assert "--trust-domain=corp.example" in cp["args"]
    assert env_of(zt)["TRUST_DOMAIN"] == "corp.example"
    assert env_of(zt)["LOG_LEVEL"] == "debug"


@pytest.mark.parametrize("chart", ["controlplane", "ztunnel"])
def test_refuses_a_namespace_other_than_istio_system(helm: Helm, chart: str) -> None:
    with pytest.raises(HelmError, match="istio-system"):
        helm.template(chart, namespace="mesh")


@pytest.mark.parametrize(
    ("chart", "values", "complaint"),
    [
        ("ztunnel", {"logLevel": "trace"}, "logLevel"),
        ("controlplane", {"ca": {"source": "vault"}}, "source"),
        ("cni", {"cniBinDir": "opt/cni/bin"}, "cniBinDir"),
        ("ztunnel", {"terminationGracePeriodSeconds": 0}, "terminationGracePeriodSeconds"),
    ],
)
def test_values_schema_refuses_bad_values(
    helm: Helm, chart: str, values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(HelmError, match=complaint):
        helm.template(chart, values)


# --- ztunnel --------------------------------------------------------------------------------


def test_ztunnel_daemonset_is_shaped_like_istios(helm: Helm) -> None:
    ds = find(helm.template("ztunnel"), "DaemonSet", "ztunnel")
    spec = pod_spec(ds)
    c = container(ds)
    assert not spec.get("hostNetwork", False)
    assert not spec.get("hostPID", False)
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["serviceAccountName"] == "ztunnel"
    assert spec["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]}
    assert sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert c["resources"]["requests"] == {"cpu": "200m", "memory": "512Mi"}
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "15020"
    assert {"containerPort": 15020, "name": "ztunnel-stats", "protocol": "TCP"} in c["ports"]
    assert ds["spec"]["template"]["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"

    volumes = {v["name"]: v for v in spec["volumes"]}
    host_paths = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert host_paths == {"/var/run/ztunnel"}
    [token] = volumes["istio-token"]["projected"]["sources"]
    assert token["serviceAccountToken"]["audience"] == "istio-ca"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/var/run/ztunnel"]["name"] == "cni-ztunnel-sock-dir"
    assert volumes["istiod-ca-cert"]["configMap"]["name"] == "istio-ca-root-cert"

    env = env_of(c)
    # The paths ztunnel/main.py reads, under the mounts above.
    assert env["CA_ROOT_CERT"] == "/var/run/secrets/istio/root-cert.pem"
    assert env["TOKEN_FILE"] == "/var/run/secrets/tokens/istio-token"
    assert "/var/run/secrets/istio" in mounts and "/var/run/secrets/tokens" in mounts
    assert env["CA_ADDRESS"] == env["XDS_ADDRESS"] == "controlplane.istio-system.svc:15012"
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert c["command"] == ["ztunnel"]
    assert c["args"] == ["--drain-seconds=29"]


def test_ztunnel_values_are_honoured(helm: Helm) -> None:
    ds = find(helm.template("ztunnel", CUSTOM["ztunnel"]), "DaemonSet", "ztunnel")
    c = container(ds)
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    assert pod_spec(ds)["terminationGracePeriodSeconds"] == 60
    assert c["args"] == ["--drain-seconds=59"]
    env = env_of(c)
    assert (env["CA_ADDRESS"], env["XDS_ADDRESS"], env["EXTRA"]) == (
        "ca.example:15012",
        "xds.example:15012",
        "x",
    )
    # Helm merges maps: user annotations come in addition to the Prometheus ones (null removes one).
    assert ds["spec"]["template"]["metadata"]["annotations"] == {
        "sidecar.istio.io/inject": "false",
        "prometheus.io/port": "15020",
        "prometheus.io/scrape": "true",
        "team": "mesh",
    }


def test_ztunnel_config_is_accepted_by_ztunnel(helm: Helm) -> None:
    """The env the chart sets is what ztunnel's own config loader accepts."""
    from ztunnel.config import load

    c = container(find(helm.template("ztunnel"), "DaemonSet", "ztunnel"))
    env = {k: v for k, v in env_of(c).items() if isinstance(v, str)}
    cfg = load(c["args"], {**env, "NODE_NAME": "node-1"})
    assert (cfg.node_name, cfg.trust_domain, cfg.drain_seconds) == ("node-1", "cluster.local", 29.0)
    assert (cfg.readiness_port, cfg.stats_port, cfg.zds_socket) == (
        15021,
        15020,
        "/var/run/ztunnel/ztunnel.sock",
    )


def test_ztunnel_has_no_api_access(helm: Helm) -> None:
    docs = helm.template("ztunnel")
    assert kinds(docs) == [("DaemonSet", "ztunnel"), ("ServiceAccount", "ztunnel")]
    assert find(docs, "ServiceAccount")["automountServiceAccountToken"] is False


# --- cni ------------------------------------------------------------------------------------


def test_cni_rbac_is_exactly_what_the_agent_calls(helm: Helm) -> None:
    docs = helm.template("cni")
    role = find(docs, "ClusterRole", "ambient-cni")
    assert rbac_rules(role) == {
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
        ("", "pods", "patch"),  # the ambient.istio.io/redirection annotation
    }
    binding = find(docs, "ClusterRoleBinding", "ambient-cni")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ambient-cni", "namespace": "istio-system"}
    ]
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


def test_cni_daemonset_mounts_what_it_needs_and_no_more(helm: Helm) -> None:
    ds = find(helm.template("cni"), "DaemonSet", "ambient-cni-node")
    spec = pod_spec(ds)
    c = container(ds)
    assert not spec.get("hostNetwork", False) and not spec.get("hostPID", False)
    assert spec["priorityClassName"] == "system-node-critical"
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]}
    assert sc["readOnlyRootFilesystem"] is True
    host = {v["hostPath"]["path"]: v["name"] for v in spec["volumes"] if "hostPath" in v}
    assert set(host) == {
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/var/run/netns",
        "/proc",
        "/var/run/ztunnel",
        "/var/run/ambient",  # the agent socket the plugin dials
        "/var/lib/ambient-cni",  # enrolled pods' netns, kept across agent restarts
    }
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts[host["/var/run/netns"]]["mountPropagation"] == "HostToContainer"
    assert mounts[host["/proc"]]["readOnly"] is True
    assert mounts[host["/proc"]]["mountPath"] == "/host/proc"
    # Paths the kubelet-run plugin and ztunnel use on the host are the same inside.
    for path in ("/var/run/netns", "/var/run/ztunnel", "/var/run/ambient", "/var/lib/ambient-cni"):
        assert mounts[host[path]]["mountPath"] == path
    args = c["args"]
    assert "--kubernetes" in args and "--install-plugin" in args and "--node=$(NODE_NAME)" in args
    assert "--cni-bin-dir=/host/opt/cni/bin" in args and "--cni-conf-dir=/host/etc/cni/net.d" in args
    assert "--zds-socket=/var/run/ztunnel/ztunnel.sock" in args
    probe = " ".join(c["livenessProbe"]["exec"]["command"])
    assert "ambient-cni-plugin" in probe and "/host/etc/cni/net.d/*.conflist" in probe


def test_cni_flags_are_accepted_by_the_agent(helm: Helm) -> None:
    from cni.main import build_parser

    c = container(find(helm.template("cni"), "DaemonSet", "ambient-cni-node"))
    args = build_parser().parse_args([a.replace("$(NODE_NAME)", "node-1") for a in c["args"]])
    assert (args.node, args.kubernetes, args.install_plugin) == ("node-1", True, True)
    assert args.plugin_socket == "/var/run/ambient/cni-agent.sock"


def test_cni_custom_dirs_and_no_repair(helm: Helm) -> None:
    ds = find(helm.template("cni", CUSTOM["cni"]), "DaemonSet", "ambient-cni-node")
    c = container(ds)
    host = {v["hostPath"]["path"] for v in pod_spec(ds)["volumes"] if "hostPath" in v}
    assert {"/home/kubernetes/bin", "/etc/cni/conf.d"} <= host
    assert "--cni-bin-dir=/host/home/kubernetes/bin" in c["args"]
    assert "livenessProbe" not in c
    assert c["image"] == "registry.example.com/custom/agent:dev"


# --- controlplane ---------------------------------------------------------------------------

CONTROLPLANE_RULES = {
    *{("", r, v) for r in ("namespaces", "nodes", "pods", "services") for v in ("list", "watch")},
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    *{
        ("security.istio.io", r, v)
        for r in ("authorizationpolicies", "peerauthentications", "requestauthentications")
        for v in ("list", "watch")
    },
    ("security.istio.io", "authorizationpolicies/status", "patch"),
    ("gateway.networking.k8s.io", "gateways", "list"),
    ("gateway.networking.k8s.io", "gateways", "watch"),
    ("extensions.ambient-mesh.io", "wafpolicies", "list"),
    ("extensions.ambient-mesh.io", "wafpolicies", "watch"),
    ("authentication.k8s.io", "tokenreviews", "create"),
}
WAYPOINT_RULES = {
    ("gateway.networking.k8s.io", "gateways/status", "update"),
    ("gateway.networking.k8s.io", "gateways/status", "patch"),
    *{
        (g, r, v)
        for g, r in (
            ("", "serviceaccounts"),
            ("", "services"),
            ("apps", "deployments"),
            ("policy", "poddisruptionbudgets"),
        )
        for v in ("get", "create", "update", "delete")
    },
    ("", "configmaps", "get"),  # a Gateway's parametersRef
}


def test_controlplane_rbac_is_exactly_what_it_calls(helm: Helm) -> None:
    from sources.kubernetes import RESOURCES

    docs = helm.template("controlplane")
    rules = rbac_rules(find(docs, "ClusterRole", "ambient-controlplane"))
    assert rules == CONTROLPLANE_RULES
    # Every resource the source watches is granted list+watch (and nothing watched is missing).
    for r in RESOURCES:
        if r.namespace:
            continue  # namespaced: a Role (below)
        assert {(r.group, r.plural, "list"), (r.group, r.plural, "watch")} <= rules, r.plural
    assert rbac_rules(find(docs, "ClusterRole", "ambient-controlplane-waypoints")) == WAYPOINT_RULES
    # The root certificate publisher (controlplane/rootcert.py): exactly the verbs it calls.
    rootcert = find(docs, "ClusterRole", "ambient-controlplane-rootcert")
    assert rbac_rules(rootcert) == {
        ("", "configmaps", v) for v in ("get", "list", "watch", "create", "update")
    }
    binding = find(docs, "ClusterRoleBinding", "ambient-controlplane-rootcert")
    assert binding["roleRef"]["name"] == "ambient-controlplane-rootcert"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "controlplane", "namespace": "istio-system"}
    ]
    # ConfigMaps: list+watch in the root namespace only (the mesh ConfigMap, by name).
    meshconfig = find(docs, "Role", "ambient-controlplane-meshconfig")
    assert meshconfig["metadata"]["namespace"] == "istio-system"
    assert rbac_rules(meshconfig) == {("", "configmaps", "list"), ("", "configmaps", "watch")}
    binding = find(docs, "RoleBinding", "ambient-controlplane-meshconfig")
    assert binding["roleRef"]["name"] == "ambient-controlplane-meshconfig"
    # No secrets, configmaps only for those two and the waypoints' parametersRef (get), no
    # wildcards anywhere.
    waypoints = find(docs, "ClusterRole", "ambient-controlplane-waypoints")
    for role in (d for d in docs if d["kind"] in ("ClusterRole", "Role")):
        for g, res, v in rbac_rules(role):
            assert "*" not in (g, res, v) and res != "secrets"
            assert (
                res != "configmaps"
                or role is meshconfig
                or role is rootcert
                or (role is waypoints and v == "get")
            )
    custom = helm.template("controlplane", CUSTOM["controlplane"])
    assert not [d for d in custom if d["metadata"]["name"] == "ambient-controlplane-waypoints"]


def test_controlplane_deployment(helm: Helm) -> None:
    docs = helm.template("controlplane")
    dep = find(docs, "Deployment", "controlplane")
    spec = pod_spec(dep)
    c = container(dep)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["command"] == ["ambient-controlplane"]
    assert {"--kubernetes", "--listen=0.0.0.0:15012", "--cacerts=/etc/cacerts"} <= set(c["args"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["cacerts"]["secret"]["secretName"] == "istio-ca-secret"
    assert not any("hostPath" in v for v in volumes.values())
    svc = find(docs, "Service", "controlplane")
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(15012, "grpc")]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    pdb = find(docs, "PodDisruptionBudget", "controlplane")
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    assert pdb["spec"]["minAvailable"] == 1 < dep["spec"]["replicas"]
    mesh = yaml.safe_load(find(docs, "ConfigMap", "istio")["data"]["mesh"])
    assert mesh["trustDomain"] == "cluster.local"
    assert mesh["defaultConfig"]["discoveryAddress"] == "controlplane.istio-system.svc:15012"


def test_controlplane_flags_are_accepted_by_the_control_plane(helm: Helm, tmp_path: Path) -> None:
    from controlplane.main import build_parser, validate

    c = container(find(helm.template("controlplane"), "Deployment", "controlplane"))
    args = build_parser().parse_args(c["args"])
    (tmp_path / "cacerts").mkdir()
    args.state_dir, args.cacerts = str(tmp_path / "state"), str(tmp_path / "cacerts")
    validate(args)  # raises StartupError naming the flag on anything wrong
    assert args.kubernetes and args.trust_domain == "cluster.local"


def test_generated_ca_is_usable_by_the_mesh_ca(helm: Helm, tmp_path: Path) -> None:
    """The root the chart generates loads as a cacerts directory and signs workload certs; the
    published istio-ca-root-cert is that same root."""
    docs = helm.template("controlplane")
    secret = find(docs, "Secret", "istio-ca-secret")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for name, b64 in secret["data"].items():
        (tmp_path / name).write_bytes(base64.b64decode(b64))
    ca = CertificateAuthority.load_cacerts(tmp_path, "cluster.local")
    _, csr = make_csr(Identity("cluster.local", "shop", "web"))
    chain = ca.sign(csr)
    assert len(chain) >= 2
    published = find(docs, "ConfigMap", "istio-ca-root-cert")["data"]["root-cert.pem"]
    assert pem_certs(published) == pem_certs((tmp_path / "root-cert.pem").read_text())
    assert pem_certs(chain[-1]) == pem_certs(published)


def test_plugged_in_ca(helm: Helm) -> None:
    docs = helm.template("controlplane", CUSTOM["controlplane"])
    assert not [d for d in docs if d["kind"] == "Secret"]
    dep = find(docs, "Deployment", "controlplane")
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    assert volumes["cacerts"]["secret"]["secretName"] == "my-ca"
    assert find(docs, "ConfigMap", "istio-ca-root-cert")["data"]["root-cert.pem"].strip() == "ROOT"
    assert "PodDisruptionBudget" not in {d["kind"] for d in docs}
    c = container(dep)
    assert c["image"] == "registry.example.com/mesh/ambient-mesh:1.2.3"
    assert "--trust-domain=example.org" in c["args"] and "--log-level=debug" in c["args"]
    # Without the root in values, helm template cannot look the Secret up: it says what to do.
    with pytest.raises(HelmError, match="create the Secret istio-system/cacerts"):
        helm.template("controlplane", {"ca": {"source": "cacerts"}})


# --- all charts -----------------------------------------------------------------------------


@pytest.mark.parametrize(("chart", "values"), VARIANTS, ids=IDS)
def test_no_privileged_or_host_namespaces(helm: Helm, chart: str, values: dict[str, Any] | None) -> None:
    for doc in helm.template(chart, values):
        for path, node in walk(doc):
            if path.endswith(".securityContext") and isinstance(node, dict):
                assert node.get("privileged", False) is False, (doc["metadata"]["name"], path)
            if path.endswith(".spec") and isinstance(node, dict):
                for key in ("hostNetwork", "hostPID", "hostIPC"):
                    assert not node.get(key, False), (doc["metadata"]["name"], path, key)


def test_every_workload_uses_a_console_script_of_the_package(helm: Helm) -> None:
    """The Dockerfile's image runs the console scripts pyproject.toml declares."""
    import tomllib

    from tests.charts.helm import REPO

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    docs: list[Doc] = []
    for chart in ("controlplane", "cni", "ztunnel"):
        docs += helm.template(chart)
    workloads = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    assert len(workloads) == 3
    for w in workloads:
        assert container(w)["command"][0] in scripts
    dockerfile = (REPO / "Dockerfile").read_text()
    for name in scripts:
        assert name in dockerfile, f"the Dockerfile does not mention the {name} entrypoint"


def test_kubectl_is_installed_next_to_helm() -> None:
    for tool in ("helm", "kubectl"):
        if find_tool(tool) is None:
            pytest.skip(
                f"{tool} is not installed: run `bash scripts/dev.sh test` (installs both into .venv/bin)"
            )


def test_mesh_configmap_carries_extension_providers(helm: Helm) -> None:
    """values meshConfig.extensionProviders land in the mesh ConfigMap as the control plane reads it."""
    from mesh.model.meshconfig import ExtAuthzGrpc, MeshConfig
    from sources.convert import ConvertOptions, convert

    providers = [
        {
            "name": "opa",
            "envoyExtAuthzGrpc": {"service": "opa.opa.svc.cluster.local", "port": 9191, "timeout": "1s"},
        }
    ]
    docs = helm.template("controlplane", {"meshConfig": {"extensionProviders": providers}})
    cm = find(docs, "ConfigMap", "istio")
    assert cm["metadata"]["namespace"] == "istio-system"
    mc = convert(cm, ConvertOptions(reject_unknown_fields=True))
    assert isinstance(mc, MeshConfig)
    (opa,) = mc.extension_providers
    assert opa.ext_authz == ExtAuthzGrpc("opa.opa.svc.cluster.local", 9191, timeout=1.0)
    plain = convert(find(helm.template("controlplane"), "ConfigMap", "istio"))
    assert isinstance(plain, MeshConfig) and plain.extension_providers == ()
