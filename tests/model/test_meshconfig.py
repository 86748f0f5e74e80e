"""The mesh ConfigMap (``istio-system/istio``, key ``mesh``): extensionProviders as istio/api
spells them, validated at the edge with the field named, and their wire form for waypoints."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.model.meshconfig import (
    ExtAuthzGrpc,
    ExtAuthzHttp,
    ExtAuthzRequestBody,
    ExtensionProvider,
    MeshConfig,
)
from mesh.xds.convert import ConversionError
from mesh.xds.meshconfig import extension_provider_from_any, extension_provider_to_any
from sources.convert import ConfigError, ConvertOptions, convert, is_supported

STRICT = ConvertOptions(reject_unknown_fields=True)


def configmap(mesh: str, name: str = "istio", namespace: str = "istio-system") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": {"mesh": mesh},
    }


MESH = """\
accessLogFile: /dev/stdout     # other MeshConfig fields are left to Istio
extensionProviders:
- name: opa
  envoyExtAuthzGrpc:
    service: opa.authz.svc.cluster.local
    port: 9191
    timeout: 250ms
    failOpen: true
    statusOnError: "503"
    includeRequestBodyInCheck: {maxRequestBytes: 4096, allowPartialMessage: true, packAsBytes: true}
- name: sample
  envoyExtAuthzHttp:
    service: foo/ext-authz.foo.svc.cluster.local
    port: 8000
    pathPrefix: /check
    includeRequestHeadersInCheck: [X-Ext-Authz, "x-b3-*"]
    includeHeadersInCheck: [cookie]
    includeAdditionalHeadersInCheck: {X-Fixed: "1"}
    headersToUpstreamOnAllow: [x-ext-authz-check-result]
    headersToDownstreamOnDeny: [x-ext-authz-check-result]
    headersToDownstreamOnAllow: ["*-id"]
- name: tracing
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
"""


def test_providers_as_istio_spells_them() -> None:
    mc = convert(configmap(MESH), STRICT)
    assert isinstance(mc, MeshConfig) and mc.key == "istio-system/istio"
    opa, sample, tracing = mc.extension_providers
    assert opa == ExtensionProvider(
        "opa",
        ExtAuthzGrpc(
            "opa.authz.svc.cluster.local", 9191, timeout=0.25, fail_open=True, status_on_error=503,
            include_request_body=ExtAuthzRequestBody(4096, True, True),
        ),
        "envoyExtAuthzGrpc",
    )  # fmt: skip
    assert sample.ext_authz == ExtAuthzHttp(
        "foo/ext-authz.foo.svc.cluster.local", 8000, path_prefix="/check",
        include_request_headers=("x-ext-authz", "x-b3-*", "cookie"),
        include_additional_headers=(("x-fixed", "1"),),
        headers_to_upstream_on_allow=("x-ext-authz-check-result",),
        headers_to_downstream_on_deny=("x-ext-authz-check-result",),
        headers_to_downstream_on_allow=("*-id",),
    )  # fmt: skip
    assert (tracing.ext_authz, tracing.kind) == (
        None,
        "zipkin",
    )  # kept by name: a CUSTOM policy is refused there


def test_only_the_mesh_configmap_is_read() -> None:
    for name, ns in (("istio", "shop"), ("other", "istio-system")):
        assert convert(configmap(MESH, name, ns), STRICT) is None
        assert not is_supported(configmap(MESH, name, ns))
    assert is_supported(configmap(MESH))
    assert convert(configmap(""), STRICT) == MeshConfig("istio-system", "istio")


@pytest.mark.parametrize(
    ("mesh", "field", "reason"),
    [
        ("extensionProviders:\n- name: a\n  envoyExtAuthzGrpc: {service: a.b, port: 1, failopen: true}",
         "extensionProviders[0].envoyExtAuthzGrpc.failopen", "did you mean 'failOpen'"),
        ("extensionProviders:\n- name: a\n  envoyExtAuthzGrpc: {service: a.b}",
         "extensionProviders[0].envoyExtAuthzGrpc.port", "required"),
        ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: a.b, port: 1, statusOnError: teapot}",
         "extensionProviders[0].envoyExtAuthzHttp.statusOnError", "not an HTTP status"),
        ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: 'a b', port: 1}",
         "extensionProviders[0].envoyExtAuthzHttp.service", "hostname"),
        ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: a.b, port: 1, pathPrefix: check}",
         "extensionProviders[0].envoyExtAuthzHttp.pathPrefix", "must start with /"),
        ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: a.b, port: 1, headersToUpstreamOnAllow: ['a*b']}",
         "extensionProviders[0].envoyExtAuthzHttp.headersToUpstreamOnAllow[0]", "not a header name"),
        ("extensionProviders:\n- name: a\n  envoyExtAuthzGrpc: {service: a.b, port: 1, timeout: soon}",
         "extensionProviders[0].envoyExtAuthzGrpc.timeout", "not a duration"),
        ("extensionProviders:\n- name: a\n  envoyExtAuthzGrpc: {service: a.b, port: 1}\n  envoyExtAuthzHttp: {}",
         "extensionProviders[0]", "exactly one provider kind"),
        ("extensionProviders:\n- name: a\n  magic: {}", "extensionProviders[0].magic", "unknown provider kind"),
        ("extensionProviders:\n- {name: a, zipkin: {}}\n- {name: a, zipkin: {}}",
         "extensionProviders[1].name", "used twice"),
        ("extensionProviders: [", "", "invalid YAML"),
        ("extensionProviders: []\nextensionProviders: []", "", "given twice"),
        ("- 1", "", "must be a YAML mapping"),
    ],
)  # fmt: skip
def test_bad_providers_name_the_field(mesh: str, field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        convert(configmap(mesh), STRICT)
    assert e.value.field == "data.mesh" + (f".{field}" if field else "")
    assert reason in str(e.value)


def test_an_alias_bomb_in_the_mesh_key_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    with pytest.raises(ConfigError, match="YAML nodes once aliases are expanded"):
        convert(configmap("\n".join(lines)), STRICT)


_names = st.text("abcdefghij-", min_size=1, max_size=10).filter(lambda s: s[0] != "-" and s[-1] != "-")
_providers = st.one_of(
    st.builds(
        ExtAuthzGrpc,
        service=_names.map(lambda n: f"{n}.ns.svc.cluster.local"),
        port=st.integers(1, 65535),
        timeout=st.sampled_from([0.001, 0.25, 1.0, 600.0]),
        fail_open=st.booleans(),
        status_on_error=st.integers(200, 599),
        include_request_body=st.none()
        | st.builds(ExtAuthzRequestBody, st.integers(1, 2**32 - 1), st.booleans(), st.booleans()),
    ),
    st.builds(
        ExtAuthzHttp,
        service=_names.map(lambda n: f"ns/{n}.ns.svc.cluster.local"),
        port=st.integers(1, 65535),
        path_prefix=st.sampled_from(["", "/check"]),
        include_request_headers=st.lists(_names, max_size=3).map(tuple),
        include_additional_headers=st.dictionaries(_names, _names, max_size=2).map(
            lambda d: tuple(sorted(d.items()))
        ),
        headers_to_upstream_on_allow=st.lists(_names, max_size=2).map(tuple),
        headers_to_downstream_on_deny=st.lists(_names, max_size=2).map(tuple),
        headers_to_downstream_on_allow=st.lists(_names, max_size=2).map(tuple),
    ),
)


@given(_names, _providers)
def test_wire_round_trip(name: str, ext: ExtAuthzGrpc | ExtAuthzHttp) -> None:
    kind = "envoyExtAuthzGrpc" if isinstance(ext, ExtAuthzGrpc) else "envoyExtAuthzHttp"
    p = ExtensionProvider(name, ext, kind)
    assert extension_provider_from_any(extension_provider_to_any(p), name) == p


def test_wire_refuses_what_it_cannot_use() -> None:
    p = ExtensionProvider("a", ExtAuthzGrpc("a.b", 1), "envoyExtAuthzGrpc")
    with pytest.raises(ConversionError, match="named b"):
        extension_provider_from_any(extension_provider_to_any(p), "b")
    with pytest.raises(ValueError, match="only ext_authz"):
        extension_provider_to_any(ExtensionProvider("z", None, "zipkin"))
