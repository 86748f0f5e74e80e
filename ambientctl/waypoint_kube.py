"""``ambientctl waypoint`` against a Kubernetes API server (``--kubeconfig``).

The Gateway is the object: ``apply`` creates it, or merges its labels and annotations into the
one there and replaces it with the resourceVersion read (a concurrent writer makes that a 409,
and the read-merge-replace is done again) — what istioctl's server-side apply amounts to for
the fields it sets. ``--enroll-namespace`` merge-patches the namespace's label, conditional on
the resourceVersion read. The status is the control plane's waypoint controller's
(``controlplane/waypoint_controller.py``): ``Accepted`` and ``Programmed``.

Every API refusal becomes a :class:`~ambientctl.waypoint.WaypointError` naming the object and
saying what the server said.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import urllib3

from ambientctl.waypoint import DEFAULT_NAMESPACE, GATEWAY_API_VERSION, JSON, WaypointError, merged

GROUP, _, VERSION = GATEWAY_API_VERSION.partition("/")
PLURAL = "gateways"
TIMEOUT = (5.0, 30.0)  # connect, read (seconds)
CONFLICT_RETRIES = 5
T = TypeVar("T")


class KubeBackend:
    def __init__(self, kubeconfig: str) -> None:
        from kubernetes import client, config

        cfg: Any = config  # the kubernetes package is untyped
        try:
            self.api: Any = cfg.new_client_from_config(config_file=kubeconfig)
            _, active = cfg.list_kube_config_contexts(config_file=kubeconfig)
        except (cfg.ConfigException, OSError, ValueError, TypeError) as e:
            raise WaypointError(f"--kubeconfig {kubeconfig}: {e}") from None
        self.host = str(self.api.configuration.host)
        self.description = f"Kubernetes API at {self.host}"
        self.default_namespace = str(
            ((active or {}).get("context") or {}).get("namespace") or DEFAULT_NAMESPACE
        )
        c: Any = client
        self.custom = c.CustomObjectsApi(self.api)
        self.core = c.CoreV1Api(self.api)
        self._api_exception = c.ApiException

    def close(self) -> None:
        self.api.close()

    def _call(self, what: str, fn: Callable[[], T], *, missing_ok: bool = False) -> T | None:
        """``fn()``; None for a 404 when ``missing_ok``; every failure as a WaypointError."""
        try:
            return fn()
        except self._api_exception as e:
            if e.status == 404 and missing_ok:
                return None
            raise ApiRefusal(what, int(e.status or 0), _message(e)) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:  # connection refused, TLS, timeouts
            raise WaypointError(
                f"{what}: cannot reach the {self.description}: {type(e).__name__}: {e}"
            ) from None

    # -- reading --

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        ns = self._call(
            f"get namespace {namespace}", lambda: self.core.read_namespace(namespace, _request_timeout=TIMEOUT),
            missing_ok=True,
        )  # fmt: skip
        if ns is None:
            raise WaypointError(f"namespace: {namespace} not found")
        return dict(ns.metadata.labels or {})

    def gateways(self, namespace: str | None) -> list[JSON]:
        if namespace is None:
            got = self._call(
                "list gateways (all namespaces)",
                lambda: self.custom.list_cluster_custom_object(
                    GROUP, VERSION, PLURAL, _request_timeout=TIMEOUT
                ),
            )
        else:
            got = self._call(
                f"list gateways in {namespace}",
                lambda: self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, _request_timeout=TIMEOUT
                ),
            )
        items = (got or {}).get("items") or []
        return [dict(i) for i in items if isinstance(i, Mapping)]

    def gateway(self, namespace: str, name: str) -> JSON | None:
        got = self._call(
            f"get Gateway {namespace}/{name}",
            lambda: self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=TIMEOUT
            ),
            missing_ok=True,
        )
        return dict(got) if got is not None else None

    # -- writing --

    def apply(self, gateway: Mapping[str, Any]) -> str:
        md = gateway["metadata"]
        ns, name = md["namespace"], md["name"]
        what = f"apply Gateway {ns}/{name}"
        for _ in range(CONFLICT_RETRIES):
            existing = self.gateway(ns, name)
            try:
                if existing is None:
                    self._call(
                        what,
                        lambda: self.custom.create_namespaced_custom_object(
                            GROUP, VERSION, ns, PLURAL, dict(gateway), _request_timeout=TIMEOUT
                        ),
                    )
                    return "created"
                want = merged(existing, gateway)
                if want == existing:
                    return "unchanged"
                want.pop("status", None)
                self._call(
                    what,
                    functools.partial(
                        self.custom.replace_namespaced_custom_object,
                        GROUP,
                        VERSION,
                        ns,
                        PLURAL,
                        name,
                        want,
                        _request_timeout=TIMEOUT,
                    ),
                )
                return "configured"
            except ApiRefusal as e:
                if e.status == 409:
                    continue  # created or changed since we read it: read again
                if e.status == 404 and existing is None:
                    if "namespace" in e.message:
                        raise WaypointError(f"{what}: namespace {ns} not found") from None
                    raise WaypointError(
                        f"{what}: missing Kubernetes Gateway CRDs need to be installed before applying a waypoint: "
                        f"{e.message}"
                    ) from None
                raise
        raise WaypointError(f"{what}: changed by someone else {CONFLICT_RETRIES} times in a row; try again")

    def label_namespace(self, namespace: str, key: str, value: str) -> None:
        what = f"label namespace {namespace}"
        for _ in range(CONFLICT_RETRIES):
            ns = self._call(
                what, lambda: self.core.read_namespace(namespace, _request_timeout=TIMEOUT), missing_ok=True
            )
            if ns is None:
                raise WaypointError(f"namespace: {namespace} not found")
            if (ns.metadata.labels or {}).get(key) == value:
                return
            body = {"metadata": {"resourceVersion": ns.metadata.resource_version, "labels": {key: value}}}
            try:
                self._call(
                    what,
                    functools.partial(self.core.patch_namespace, namespace, body, _request_timeout=TIMEOUT),
                )
                return
            except ApiRefusal as e:
                if e.status != 409:
                    raise
        raise WaypointError(f"{what}: changed by someone else {CONFLICT_RETRIES} times in a row; try again")

    def delete(self, namespace: str, names: Sequence[str]) -> list[str]:
        gone: list[str] = []
        for name in names:
            done = self._call(
                f"delete Gateway {namespace}/{name}",
                functools.partial(
                    self.custom.delete_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    name,
                    _request_timeout=TIMEOUT,
                ),
                missing_ok=True,
            )
            if done is None:
                gone.append(name)
        return gone


class ApiRefusal(WaypointError):
    def __init__(self, what: str, status: int, message: str) -> None:
        super().__init__(f"{what}: the API server answered {status}: {message}")
        self.status = status
        self.message = message


def _message(e: Any) -> str:
    """The ``message`` of the Status the server sent, else its reason."""
    try:
        body = json.loads(e.body or "")
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except (ValueError, TypeError):
        pass
    return str(e.reason or "")
