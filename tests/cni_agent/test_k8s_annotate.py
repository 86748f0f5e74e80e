"""Kubernetes mode: the agent's redirection annotation goes to the pod through the real client."""

from __future__ import annotations

import pytest

from cni.main import kubernetes_annotator
from tests.k8s.fakeapi import FakeApiServer
from tests.k8s.helpers import pod

ANNOTATION = "ambient.istio.io/redirection"


def annotations(fake: FakeApiServer, ns: str, name: str) -> dict[str, str]:
    obj = fake.get("pods", f"{ns}/{name}")
    assert obj is not None
    return dict(obj["metadata"].get("annotations") or {})


async def test_annotation_set_and_removed() -> None:
    with FakeApiServer() as fake:
        fake.add(pod("web-1", "10.0.1.2"))
        annotate = kubernetes_annotator(fake.api_client())
        await annotate("shop", "web-1", True)
        assert annotations(fake, "shop", "web-1")[ANNOTATION] == "enabled"
        patch = fake.patches[-1]
        assert patch.path == "/api/v1/namespaces/shop/pods/web-1"
        await annotate("shop", "web-1", False)
        assert ANNOTATION not in annotations(fake, "shop", "web-1")


async def test_missing_pod() -> None:
    with FakeApiServer() as fake:
        annotate = kubernetes_annotator(fake.api_client())
        await annotate("shop", "gone", False)  # removing from a deleted pod: nothing to do
        with pytest.raises(OSError, match="annotating pod shop/gone: 404"):
            await annotate("shop", "gone", True)
