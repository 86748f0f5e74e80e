"""The Kubernetes REST calls of the control plane's controllers (the waypoint controller, the
root certificate publisher): plain JSON over the ``kubernetes`` client's ApiClient, so the
request is exactly what the code says (no model classes dropping fields they do not know), and
every refusal is one :class:`ApiError` naming the object.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ObjectKind:
    """A namespaced kind a controller writes, and where it lives in the API."""

    api_version: str
    kind: str
    plural: str

    def path(self, namespace: str, name: str = "") -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{path}/{name}" if name else path


class ApiError(Exception):
    """The API server refused a request (or could not be reached: ``status`` 0)."""

    def __init__(
        self, method: str, what: str, status: int, reason: str, message: str, causes: tuple[str, ...] = ()
    ) -> None:
        super().__init__(
            f"{method} {what}: HTTP {status} {reason}: {message}" if status else f"{method} {what}: {message}"
        )
        self.method = method
        self.what = what
        self.status = status
        self.reason = reason
        self.message = message
        self.causes = causes  # the Status's details.causes[].type (e.g. NamespaceTerminating)


class KubeApi:
    """The few REST calls the control plane's controllers make, with JSON in and out, over the
    ``kubernetes`` client's ApiClient (its configuration, auth and connection pool). Blocking:
    call it from a worker thread."""

    def __init__(self, api_client: Any, *, timeout: tuple[float, float] = (10.0, 30.0)) -> None:
        self._api = api_client
        self._timeout = timeout

    def _call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            request = self._api.param_serialize(
                method=method,
                resource_path=path,
                query_params=query or [],
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            resp = self._api.call_api(*request, _request_timeout=self._timeout)
            data = resp.read()
        except Exception as e:  # connection refused, timeout, TLS: a failure like any other
            raise ApiError(method, what, 0, "", f"{type(e).__name__}: {e}") from None
        try:
            payload = json.loads(data) if data else None
        except ValueError:
            payload = None
        if not 200 <= resp.status <= 299:
            if isinstance(payload, Mapping):
                details = payload.get("details")
                causes = (details.get("causes") if isinstance(details, Mapping) else None) or []
                raise ApiError(
                    method,
                    what,
                    resp.status,
                    str(payload.get("reason", "")),
                    str(payload.get("message", "")),
                    tuple(str(c.get("type", "")) for c in causes if isinstance(c, Mapping)),
                )
            raise ApiError(method, what, resp.status, "", (data or b"")[:200].decode(errors="replace"))
        return resp.status, payload

    def get(self, kind: ObjectKind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            _, obj = self._call("GET", kind.path(namespace, name), f"{kind.kind} {namespace}/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return dict(obj)

    def create(self, kind: ObjectKind, obj: Mapping[str, Any]) -> dict[str, Any]:
        md = obj["metadata"]
        _, out = self._call(
            "POST", kind.path(md["namespace"]), f"{kind.kind} {md['namespace']}/{md['name']}", body=obj
        )
        return dict(out)

    def replace(self, kind: ObjectKind, obj: Mapping[str, Any]) -> dict[str, Any]:
        md = obj["metadata"]
        _, out = self._call(
            "PUT",
            kind.path(md["namespace"], md["name"]),
            f"{kind.kind} {md['namespace']}/{md['name']}",
            body=obj,
        )
        return dict(out)

    def delete(self, kind: ObjectKind, namespace: str, name: str, uid: str) -> None:
        """Delete that very object (uid precondition); already gone is fine."""
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": uid},
            "propagationPolicy": "Background",
        }
        try:
            self._call("DELETE", kind.path(namespace, name), f"{kind.kind} {namespace}/{name}", body=body)
        except ApiError as e:
            if e.status != 404:
                raise
