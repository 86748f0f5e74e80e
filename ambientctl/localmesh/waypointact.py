"""The demo's waypoint act: an L7 proxy for shop/web that refuses ``POST /admin``.

It runs on the mesh the policy act left, and changes it only the way a user would, by editing
the local-mode file (``mesh.yaml``): the control plane reloads it, and the local mesh's waypoint
supervisor (``supervisor.py``) starts the waypoint a new ``Gateway`` declares. Every claim printed
is read back from where a user would look: the supervisor's status and log, the waypoint's and
the ztunnels' ``/config_dump``, the apps' replies, the waypoint's access log and ``/metrics``, and
web's ztunnel's access log.

1. The policy act left L4 policies on shop/web that a waypoint changes the meaning of: by default
   (as in Istio) web's ztunnel sees the *waypoint's* identity on traffic the waypoint forwards.
   ``web-deny-frontend`` is removed, ``web-allow-frontend`` also allows the waypoint's account.
2. A ``Gateway`` ``shop/waypoint`` (class ``istio-waypoint``) and the label
   ``istio.io/use-waypoint: waypoint`` on Service ``web``: the supervisor runs the waypoint, the
   node proxies learn to send web's service traffic through it.
3. An AuthorizationPolicy bound to Service ``web`` with ``targetRefs``: DENY ``POST /admin``.
4. From shop/frontend through the service VIP: ``GET /order`` passes, ``POST /admin`` gets 403
   ``RBAC: access denied`` — from the waypoint, with the identities in its access log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ambientctl.localmesh import spec, supervisor
from ambientctl.localmesh.act import Act, Say
from ambientctl.localmesh.mesh import LocalMesh
from ambientctl.localmesh.procs import http_get, http_json, pause, read_json_lines

WEB = spec.pod("shop/web")
FRONTEND = spec.pod("shop/frontend")
GATEWAY = spec.WAYPOINT
WAYPOINT_ID = spec.waypoint_identity()
WEB_HOST = "web.shop.svc.cluster.local"
VIP = f"http://{spec.WEB_VIP}:80"
START_TIMEOUT = 30.0  # from the edit to the waypoint ready (the issue promises 10 s; CI boxes are slow)
APPLY_TIMEOUT = 20.0  # from an edit to its effect in a config_dump
LEFTOVER = spec.WEB_DENY_FRONTEND.key


class WaypointAct(Act):
    NAME = "waypoint"
    STEPS = 4

    def __init__(self, mesh: LocalMesh, say: Say) -> None:
        super().__init__(say)
        self.mesh = mesh
        # The waypoint's ports and log, from the supervisor's status once it runs.
        self.admin = self.stats = 0
        self.log = Path()

    # -- the act ----------------------------------------------------------------------------------

    def run(self) -> list[str]:
        self.say("")
        self.say("=" * 100)
        self.say("Waypoint act: an L7 proxy for shop/web (a Gateway in mesh.yaml), denying POST /admin")
        self.say("=" * 100)
        steps = (self.make_room, self.add_waypoint, self.deny_post_admin, self.traffic)
        for act in steps:
            if not act():
                self.out("(the rest of the waypoint act is skipped: this step did not hold)")
                break
        return self.failures

    def make_room(self) -> bool:
        self.step(
            "what the policy act left on shop/web, and what a waypoint changes about it",
            f"{LEFTOVER} (DENY frontend) is removed and shop/web-allow-frontend also allows the "
            f"waypoint's account: with a waypoint, web's ztunnel sees {WAYPOINT_ID} on service traffic, "
            "not frontend's identity (Istio's default; L4 policies must allow the waypoint)",
        )
        self.out(f"the policy act ended with {LEFTOVER}: frontend's own connections to web are refused at L4")
        removed = self.mesh.remove_policy(LEFTOVER)
        self.out(f"{LEFTOVER} {'deleted from' if removed else 'was not in'} mesh.yaml")
        self.out("shop/web-allow-frontend replaced by:")
        self.show_yaml(spec.WEB_ALLOW_FRONTEND_AND_WAYPOINT.yaml)
        self.mesh.apply_policy(spec.WEB_ALLOW_FRONTEND_AND_WAYPOINT)
        start = time.monotonic()
        np = self.mesh.nodes[WEB.node]

        def applied() -> list[str] | None:
            pod = _pod(http_json(np.admin_url("/config_dump")), WEB.key)
            auth = list((pod or {}).get("authorizations", []))
            return (
                auth
                if pod is not None and LEFTOVER not in auth and spec.WEB_ALLOW_FRONTEND.key in auth
                else None
            )

        auth = _poll(applied, APPLY_TIMEOUT)
        return self.check(
            auth is not None,
            f"{WEB.node}'s ztunnel applies {', '.join(auth or [])} to {WEB.key}, no longer {LEFTOVER} "
            f"(config_dump, {time.monotonic() - start:.1f} s after the edit)",
            f"{WEB.node}'s ztunnel still lists {LEFTOVER} for {WEB.key} after {APPLY_TIMEOUT:.0f} s",
        )

    def add_waypoint(self) -> bool:
        self.step(
            f"a waypoint for shop/web: Gateway {GATEWAY.key} added to {self.mesh.config}, Service web labelled "
            f"{spec.USE_WAYPOINT_LABEL}: waypoint",
            f"the waypoint supervisor builds the pod {GATEWAY.key}-0 (netns on {spec.WAYPOINT_NODE}'s bridge, "
            f"the highest free address of its podCIDR {spec.pod_cidr(spec.WAYPOINT_NODE)}) and runs the waypoint "
            f"as {WAYPOINT_ID}; the ztunnels send web's service traffic to it",
        )
        self.show_yaml(GATEWAY.yaml)
        self.out("| ---  (and on the Service:)")
        self.out("| apiVersion: v1")
        self.out("| kind: Service")
        self.out(
            f"| metadata: {{name: web, namespace: shop, labels: {{{spec.USE_WAYPOINT_LABEL}: waypoint}}}}"
        )
        start = time.monotonic()
        self.mesh.apply_policy(GATEWAY)
        self.mesh.use_waypoint("waypoint")
        status = _poll(self._ready_status, START_TIMEOUT)
        took = time.monotonic() - start
        line = self._supervisor_line(f"waypoint {GATEWAY.key}: started")
        if not self.check(
            status is not None,
            f"waypoint supervisor: {GATEWAY.key} "
            + (
                f"ready on {status['node']} {status['ip']} (netns {status['netns']}, pid {status['pid']}), "
                f"{took:.1f} s after the edit"
                if status
                else f"NOT ready within {START_TIMEOUT:.0f} s"
            ),
            f"the supervisor did not start {GATEWAY.key} within {START_TIMEOUT:.0f} s (see its log)",
        ):
            return False
        assert status is not None
        if line:
            self.out(f"supervisor log: {line!r}")
        self.admin = int(status["admin_port"])
        self.stats = int(status["stats_port"])
        self.log = Path(status["log"])

        def waypoint_knows_web() -> dict[str, Any] | None:
            dump = http_json(f"http://127.0.0.1:{self.admin}/config_dump") or {}
            services = {f"{s.get('namespace')}/{s.get('name')}" for s in dump.get("services", [])}
            return dump if dump.get("ready") and WEB.key in services else None

        dump = _poll(waypoint_knows_web, APPLY_TIMEOUT)
        certs = (dump or {}).get("certificates")
        self.check(
            dump is not None and dump.get("identity") == WAYPOINT_ID,
            f"the waypoint's config_dump: identity {(dump or {}).get('identity')}, knows service {WEB.key}"
            + (f", certificates {_cert_ids(certs)}" if certs else ""),
        )
        src_node = FRONTEND.node
        np = self.mesh.nodes[src_node]

        def ztunnel_binds() -> dict[str, Any] | None:
            dump = http_json(np.admin_url("/config_dump")) or {}
            svc = next(
                (s for s in dump.get("services", []) if f"{s.get('namespace')}/{s.get('name')}" == WEB.key),
                None,
            )
            return svc if svc is not None and svc.get("waypoint") else None

        svc = _poll(ztunnel_binds, APPLY_TIMEOUT)
        return self.check(
            svc is not None,
            f"frontend's ztunnel ({src_node}) config_dump: service {WEB.key} has waypoint {_waypoint_name(svc)}",
            f"{src_node}'s ztunnel did not bind {WEB.key} to a waypoint within {APPLY_TIMEOUT:.0f} s",
        )

    def deny_post_admin(self) -> bool:
        policy = spec.WEB_DENY_POST_ADMIN
        self.step(
            f"an L7 policy at the waypoint: AuthorizationPolicy {policy.key} (targetRefs Service web, DENY POST /admin)",
            "the control plane sends it to the waypoint only (a targetRefs policy is the waypoint's, not "
            "ztunnel's): the waypoint's config_dump lists it",
        )
        self.show_yaml(policy.yaml)
        start = time.monotonic()
        self.mesh.apply_policy(policy)

        def listed() -> list[str] | None:
            dump = http_json(f"http://127.0.0.1:{self.admin}/config_dump") or {}
            keys = [_policy_key(p) for p in dump.get("policies", [])]
            return keys if policy.key in keys else None

        keys = _poll(listed, APPLY_TIMEOUT)
        return self.check(
            keys is not None,
            f"the waypoint applies {policy.key} (config_dump, {time.monotonic() - start:.1f} s after the edit)",
            f"the waypoint did not list {policy.key} within {APPLY_TIMEOUT:.0f} s",
        )

    def traffic(self) -> bool:
        self.step(
            "shop/frontend -> shop/web through the service VIP, now through the waypoint",
            "GET /order and POST /order pass (200, from web); POST /admin is answered 403 'RBAC: access "
            f"denied' by the waypoint and never reaches web; the waypoint's access log names the source "
            f"{FRONTEND.identity()} (its TLS peer), the destination web and the policy; web's ztunnel sees "
            f"the waypoint's identity",
        )
        log_mark = len(read_json_lines(self.log))
        zt_mark = len(read_json_lines(self.mesh.ztunnel_log(WEB.node)))
        ok_get = self._request("GET", "/order", 200)
        ok_post = self._request("POST", "/order", 200)
        denied = self._request("POST", "/admin", 403)
        wanted = {("GET", "/order"), ("POST", "/order"), ("POST", "/admin")}

        def records() -> list[dict[str, Any]] | None:
            recs = [r for r in read_json_lines(self.log)[log_mark:] if r.get("event") == "request"]
            return recs if wanted <= {(r.get("method"), r.get("path")) for r in recs} else None

        recs = _poll(records, 10.0) or []
        self.out(f"the waypoint's access log ({self.log}):")
        for r in recs:
            self.out(
                f"| {r.get('method')} {r.get('path')} {r.get('status')} src={r.get('src')} "
                f"dst_service={r.get('dst_service')} dst_workload={r.get('dst_workload')} "
                f"upstream={r.get('upstream', '-')}"
                + (f" policy={r.get('policy')} reason={r.get('reason')!r}" if r.get("policy") else "")
            )
        by = {(r.get("method"), r.get("path")): r for r in recs}
        deny = by.get(("POST", "/admin"), {})
        get = by.get(("GET", "/order"), {})
        self.check(
            deny.get("status") == 403
            and deny.get("src") == FRONTEND.identity()
            and deny.get("dst_service") == WEB_HOST
            and deny.get("policy") == spec.WEB_DENY_POST_ADMIN.key,
            f"=> POST /admin from {deny.get('src')} to {deny.get('dst_service')}: 403 by "
            f"{deny.get('policy')}, decided at the waypoint ({WAYPOINT_ID})",
        )
        self.check(
            get.get("status") == 200
            and get.get("src") == FRONTEND.identity()
            and get.get("upstream") == WEB.identity(),
            f"=> GET /order from {get.get('src')}: 200, forwarded to {get.get('upstream')}",
        )
        rec = _poll(
            lambda: next(
                (
                    r
                    for r in read_json_lines(self.mesh.ztunnel_log(WEB.node))[zt_mark:]
                    if r.get("event") == "connection complete"
                    and r.get("direction") == "inbound"
                    and r.get("src_identity") == WAYPOINT_ID
                ),
                None,
            ),
            10.0,
        )
        self.check(
            rec is not None and rec.get("dst_identity") == WEB.identity(),
            f"web's ztunnel ({WEB.node}) access log: inbound from "
            + (
                f"{rec.get('src_identity')} to {rec.get('dst_identity')}, security {rec.get('security')} "
                f"(client address {rec.get('src_addr')}: the original source, which the waypoint passes on)"
                if rec
                else "the waypoint: NO RECORD"
            ),
        )
        labels = {
            "reporter": "waypoint",
            "source_principal": FRONTEND.identity(),
            "destination_service": WEB_HOST,
            "response_code": "403",
            "response_flags": "RBAC",
        }
        status, text = http_get(f"http://127.0.0.1:{self.stats}/metrics")
        total = _metric(text, "istio_requests_total", labels) if status == 200 else 0.0
        shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
        self.check(total >= 1, f"the waypoint's metrics: istio_requests_total{{{shown}}} {total:g}")
        return ok_get and ok_post and denied

    # -- helpers ----------------------------------------------------------------------------------

    def _request(self, method: str, path: str, want: int) -> bool:
        url = VIP + path
        reply = self.mesh.request(FRONTEND.key, url, method=method)
        status, body = reply.get("status"), str(reply.get("body", reply.get("error", "")))
        if want == 200:
            ok = status == 200 and body.startswith(f"hello from {WEB.key}")
        else:
            ok = status == want and body == "RBAC: access denied"
        return self.check(ok, f"{FRONTEND.key} -> {method} {url}: HTTP {status} {body!r}")

    def _ready_status(self) -> dict[str, Any] | None:
        self.mesh.procs.check_alive(supervisor.PROC_NAME)
        st = self.mesh.waypoints().get(GATEWAY.key)
        return st if isinstance(st, dict) and st.get("phase") == "ready" else None

    def _supervisor_line(self, prefix: str) -> str | None:
        path = self.mesh.state.path / "logs" / "supervisor.log"
        return next(
            (
                str(r["event"])
                for r in reversed(read_json_lines(path))
                if str(r.get("event", "")).startswith(prefix)
            ),
            None,
        )


def _poll(probe: Callable[[], Any], timeout: float) -> Any:
    """``probe()``'s first value that is not None, or None at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None or time.monotonic() > deadline:
            return got
        pause(0.05)


def _pod(dump: Any, key: str) -> dict[str, Any] | None:
    pods = (dump or {}).get("pods", []) if isinstance(dump, dict) else []
    return next((p for p in pods if f"{p.get('namespace')}/{p.get('name')}" == key), None)


def _policy_key(p: dict[str, Any]) -> str:
    return f"{p.get('namespace')}/{p.get('name')}"


def _waypoint_name(svc: dict[str, Any] | None) -> str:
    wp = (svc or {}).get("waypoint") or {}
    host = wp.get("hostname") or {}
    if host:
        return f"{host.get('hostname')} (HBONE :{wp.get('hbone_mtls_port')})"
    addr = wp.get("address") or {}
    return f"{addr.get('address')} (HBONE :{wp.get('hbone_mtls_port')})" if addr else "none"


def _cert_ids(certs: list[dict[str, Any]]) -> str:
    return ", ".join(sorted({str(c.get("identity")) for c in certs})) or "none"


def _metric(text: str, name: str, labels: dict[str, str]) -> float:
    """Sum of the samples ``name`` whose labels include ``labels``."""
    total = 0.0
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
    except ValueError:
        return 0.0
    return total
