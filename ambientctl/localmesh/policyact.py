"""The demo's policy act: from PERMISSIVE to STRICT, then who may call shop/web.

It runs on the mesh the traffic act left, and changes it only the way a user would: by adding
Istio ``security.istio.io/v1`` objects to the local-mode file (``mesh.yaml``), which the control
plane reloads and pushes to the ztunnels. Every claim printed is read back from where a user
would look: the apps' replies, ztunnel's JSON log (access-log lines, "connection closed by
policy"), its ``/metrics`` and its ``/config_dump``.

1. ``ambientctl policy mtls-report`` on the running ztunnels: what would STRICT break?
2. STRICT for namespace ``shop``: legacy/old's plaintext to shop/web is refused, named.
3. An ALLOW policy on shop/web for frontend's principal only: frontend works, cart is refused.
4. A DENY for frontend while frontend holds a connection open to web: ztunnel closes it.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ambientctl import mtls_report
from ambientctl.localmesh import spec
from ambientctl.localmesh.act import Act, Say
from ambientctl.localmesh.mesh import LocalMesh
from ambientctl.localmesh.procs import ProcError, http_get, http_json, pause, read_json_lines

WEB = spec.pod("shop/web")
WEB_NODE = WEB.node
POD_URL = f"http://{WEB.ip}:{spec.APP_PORT}/order"
VIP_URL = f"http://{spec.WEB_VIP}:80/order"
STREAM_URL = f"http://{WEB.ip}:{spec.APP_PORT}/stream"
APPLY_TIMEOUT = 20.0  # from the edit of mesh.yaml to the policy in ztunnel's config_dump
CLOSE_TIMEOUT = 10.0  # from the edit to the open connection closed
HOLD = "hold-frontend"


class PolicyAct(Act):
    NAME = "policy"
    STEPS = 4

    def __init__(self, mesh: LocalMesh, say: Say) -> None:
        super().__init__(say)
        self.mesh = mesh

    # -- the act ----------------------------------------------------------------------------------

    def run(self) -> list[str]:
        self.say("")
        self.say("=" * 100)
        self.say(
            "Policy act: from PERMISSIVE to STRICT, then who may call shop/web (Istio policies in mesh.yaml)"
        )
        self.say("=" * 100)
        self.what_strict_would_break()
        self.strict()
        self.allow_only_frontend()
        self.deny_closes_open_connection()
        return self.failures

    def what_strict_would_break(self) -> None:
        nodes = list(self.mesh.nodes.values())
        metrics = [f"http://127.0.0.1:{np.stats}/metrics" for np in nodes]
        admin = [f"127.0.0.1:{np.admin}" for np in nodes]
        logs = [str(self.mesh.ztunnel_log(np.node.name)) for np in nodes]
        self.step(
            "before STRICT: what would it break? (ambientctl policy mtls-report on the running ztunnels)",
            "shop/web still accepts plaintext from legacy/old (request 3 above): exactly what STRICT "
            "will refuse; the other pods received only mTLS or nothing",
        )
        cmd = " ".join(
            ["$ ambientctl policy mtls-report"]
            + [f"--metrics {m}" for m in metrics]
            + [f"--admin {a}" for a in admin]
            + [f"--access-log {f}" for f in logs]
        )
        self.out(cmd)
        try:
            report = mtls_report.load_inputs(metrics, admin, logs)
        except mtls_report.InputError as e:
            self.check(False, f"mtls-report: {e}")
            return
        for line in mtls_report.render_text(report):
            self.out(f"| {line}".rstrip())
        web = next((d for d in report.destinations if d.workload == WEB.key), None)
        legacy = [r for r in (web.plaintext if web else []) if r.source == "legacy/old" and r.accepted]
        self.check(
            web is not None and web.verdict == "plaintext" and bool(legacy),
            "=> shop/web accepts plaintext from legacy/old: STRICT would refuse it",
            "mtls-report did not list shop/web's plaintext from legacy/old",
        )

    def strict(self) -> None:
        self.step(
            f"STRICT mTLS for namespace shop: PeerAuthentication {spec.STRICT_SHOP.key} added to {self.mesh.config}",
            f"the control plane reloads the file; legacy/old -> shop/web (plaintext) is refused, web's "
            f"ztunnel naming {spec.STATIC_STRICT}; shop/frontend -> shop/web (mTLS) still works",
        )
        self.show_yaml(spec.STRICT_SHOP.yaml)
        mark = self._mark(WEB_NODE)
        if not self._apply(spec.STRICT_SHOP, spec.STATIC_STRICT):
            return
        reply = self.mesh.request("legacy/old", POD_URL)
        self._refused("legacy/old", POD_URL, reply)
        rec = self._wait_record(
            WEB_NODE,
            mark,
            lambda r: r.get("direction") == "inbound_passthrough" and _from_ip(r, "legacy/old"),
        )
        reason = str((rec or {}).get("reason"))
        self.check(
            rec is not None and rec.get("result") == "error" and spec.STATIC_STRICT in reason,
            f"web's ztunnel ({WEB_NODE}) access log: "
            + (
                f"{rec.get('direction')} from {rec.get('src_addr')}, security {rec.get('security')}, "
                f"result {rec.get('result')}: {reason!r}"
                if rec
                else "NO RECORD"
            ),
            f"no refusal naming {spec.STATIC_STRICT} in {WEB_NODE}'s access log",
        )
        self._metric_check(
            "istio_tcp_connections_closed_total",
            reporter="destination",
            source_workload="old",
            destination_workload="web",
            connection_security_policy="none",
            response_flags="DENY",
        )
        self._works("shop/frontend", POD_URL, "mTLS, unaffected")

    def allow_only_frontend(self) -> None:
        policy = spec.WEB_ALLOW_FRONTEND
        self.step(
            f"only shop/frontend may call shop/web: AuthorizationPolicy {policy.key} (ALLOW, selector app: web)",
            f"frontend -> web still works; cart -> web is refused by web's ztunnel (HBONE CONNECT "
            f"answered 401), its access log naming {policy.key}",
        )
        self.show_yaml(policy.yaml)
        web_mark, cart_mark = self._mark(WEB_NODE), self._mark(spec.pod("shop/cart").node)
        if not self._apply(policy, policy.key):
            return
        self._works("shop/frontend", VIP_URL)
        reply = self.mesh.request("shop/cart", VIP_URL)
        self._refused("shop/cart", VIP_URL, reply)
        cart_id = spec.pod("shop/cart").identity()
        rec = self._wait_record(
            WEB_NODE, web_mark, lambda r: r.get("direction") == "inbound" and r.get("src_identity") == cart_id
        )
        reason = str((rec or {}).get("reason"))
        self.check(
            rec is not None and rec.get("result") == "error" and policy.key in reason,
            f"web's ztunnel ({WEB_NODE}) access log: "
            + (f"inbound from {cart_id}, result {rec.get('result')}: {reason!r}" if rec else "NO RECORD"),
            f"no refusal naming {policy.key} in {WEB_NODE}'s access log",
        )
        out = self._wait_record(
            spec.pod("shop/cart").node,
            cart_mark,
            lambda r: r.get("direction") == "outbound" and r.get("src_identity") == cart_id,
        )
        if out is not None:
            self.out(
                f"cart's ztunnel ({spec.pod('shop/cart').node}) access log: outbound, result "
                f"{out.get('result')}: {out.get('reason')!r}"
            )
        self._metric_check(
            "istio_tcp_connections_closed_total",
            reporter="destination",
            source_workload="cart",
            destination_workload="web",
            connection_security_policy="mutual_tls",
            response_flags="DENY",
        )

    def deny_closes_open_connection(self) -> None:
        policy = spec.WEB_DENY_FRONTEND
        self.step(
            f"a policy change closes a live connection: frontend holds a connection to web open, then "
            f"AuthorizationPolicy {policy.key} (DENY frontend) is added",
            "ztunnel re-checks open connections when policies change: the open frontend -> web "
            "connection is closed within about a second of the edit (the control plane polls the file every "
            f'0.5 s), web\'s ztunnel logging "connection closed by policy" with {policy.key}; a new '
            "request from frontend is refused",
        )
        self.show_yaml(policy.yaml)
        mark = self._mark(WEB_NODE)
        hold_log = self.mesh.state.path / "logs" / f"{HOLD}.log"
        self.mesh.procs.start(
            HOLD,
            self.mesh.exec_argv(
                "shop/frontend", [sys.executable, "-m", "ambientctl.localmesh.app", "hold", STREAM_URL]
            ),
        )
        opened = self._wait_event(hold_log, "open", 15.0)
        # Let it stream for a moment, so that what is closed is visibly a working connection.
        streaming = self._wait_event(hold_log, "receiving", 15.0) if opened else None
        ok = (opened or {}).get("event") == "open" and (streaming or {}).get("event") == "receiving"
        if not self.check(
            ok,
            f"shop/frontend -> {STREAM_URL}: "
            + (
                f"open from {opened.get('local')}, web sends a line every 0.2 s "
                f"({(streaming or {}).get('lines', 0)} received so far)"
                if opened
                else "did not open"
            ),
        ):
            self._stop_hold()
            return
        edited = time.monotonic()
        self.mesh.apply_policy(policy)
        self.out(f"{policy.key} written to mesh.yaml; waiting for the open connection to end")
        closed = self._wait_event(hold_log, "closed", CLOSE_TIMEOUT)
        took = time.monotonic() - edited
        if closed is None:
            self._stop_hold()
            self.check(
                False,
                f"the open connection was NOT closed within {CLOSE_TIMEOUT:.0f} s of the edit",
                f"ztunnel did not close the open frontend -> web connection after {policy.key}",
            )
        else:
            self.check(
                True,
                f"the open connection was closed {took:.1f} s after the edit "
                f"(it had received {closed.get('lines')} lines)",
            )
        by_policy = self._wait_record(
            WEB_NODE, mark, lambda r: r.get("event") == "connection closed by policy", event=None
        )
        self.check(
            by_policy is not None and by_policy.get("policy") == policy.key,
            f"web's ztunnel ({WEB_NODE}) log: "
            + (
                f'"connection closed by policy" {by_policy.get("src")} -> {by_policy.get("dst")}, '
                f"policy {by_policy.get('policy')} rule {by_policy.get('rule')}"
                if by_policy
                else 'no "connection closed by policy" line'
            ),
        )
        frontend_id = spec.pod("shop/frontend").identity()
        rec = self._wait_record(
            WEB_NODE,
            mark,
            lambda r: (
                r.get("direction") == "inbound"
                and r.get("src_identity") == frontend_id
                and "closed by policy" in str(r.get("reason"))
            ),
        )
        self.check(
            rec is not None and policy.key in str(rec.get("reason")),
            f"web's ztunnel ({WEB_NODE}) access log: "
            + (
                f"inbound from {frontend_id}, {rec.get('bytes_recv')} B back, result "
                f"{rec.get('result')}: {rec.get('reason')!r}"
                if rec
                else "NO RECORD"
            ),
        )
        self._refused("shop/frontend", POD_URL, self.mesh.request("shop/frontend", POD_URL))

    # -- helpers ----------------------------------------------------------------------------------

    def _apply(self, policy: spec.Policy, listed: str) -> bool:
        """Write ``policy`` to mesh.yaml and wait until web's ztunnel applies ``listed`` to web."""
        start = time.monotonic()
        self.mesh.apply_policy(policy)
        np = self.mesh.nodes[WEB_NODE]
        deadline = start + APPLY_TIMEOUT
        while time.monotonic() < deadline:
            dump = http_json(np.admin_url("/config_dump")) or {}
            pod = next((p for p in dump.get("pods", []) if f"{p['namespace']}/{p['name']}" == WEB.key), None)
            if pod is not None and listed in pod.get("authorizations", []):
                took = time.monotonic() - start
                return self.check(
                    True,
                    f"{WEB_NODE}'s ztunnel applies {listed} to {WEB.key} "
                    f"(config_dump, {took:.1f} s after the edit)",
                )
            pause(0.05)
        return self.check(
            False, f"{WEB_NODE}'s ztunnel did not list {listed} for {WEB.key} within {APPLY_TIMEOUT:.0f} s"
        )

    def _works(self, src: str, url: str, note: str = "") -> None:
        reply = self.mesh.request(src, url)
        body = str(reply.get("body", reply.get("error", "")))
        ok = reply.get("status") == 200 and body.startswith(f"hello from {WEB.key}")
        self.check(
            ok,
            f"{src} -> {url}: HTTP {reply.get('status')} {body!r}" + (f" ({note})" if note else ""),
        )

    def _refused(self, src: str, url: str, reply: dict[str, Any]) -> None:
        status = reply.get("status")
        self.check(
            status != 200 and not str(reply.get("body", "")).startswith("hello"),
            f"{src} -> {url}: "
            + (f"refused ({reply.get('error')})" if status == 0 else f"HTTP {status} {reply.get('body')!r}"),
            f"{src} -> {url} was not refused (HTTP {status})",
        )

    def _mark(self, node: str) -> int:
        """How many JSON lines ``node``'s ztunnel log has now: later records are this step's."""
        return len(read_json_lines(self.mesh.ztunnel_log(node)))

    def _wait_record(
        self,
        node: str,
        mark: int,
        pred: Callable[[dict[str, Any]], bool],
        timeout: float = 10.0,
        event: str | None = "connection complete",
    ) -> dict[str, Any] | None:
        """The first log record of ``node`` after ``mark`` matching ``pred`` (access-log lines are
        written when a connection ends: wait for it)."""
        deadline = time.monotonic() + timeout
        while True:
            for r in read_json_lines(self.mesh.ztunnel_log(node))[mark:]:
                if (event is None or r.get("event") == event) and pred(r):
                    return r
            if time.monotonic() > deadline:
                return None
            pause(0.05)

    def _wait_event(self, path: Any, event: str, timeout: float) -> dict[str, Any] | None:
        """The ``hold`` client's first JSON line ``event``, or the one saying it ended before."""
        ends = {"open": ("failed",), "receiving": ("failed", "closed"), "closed": ("failed",)}[event]
        deadline = time.monotonic() + timeout
        while True:
            for r in read_json_lines(path):
                if r.get("event") == event or r.get("event") in ends:
                    return r
            if time.monotonic() > deadline:
                return None
            pause(0.05)

    def _stop_hold(self) -> None:
        try:
            self.mesh.procs.stop(HOLD, signal.SIGTERM, timeout=5)
        except ProcError as e:
            self.out(f"warning: {e}")

    def _metric_check(self, name: str, **labels: str) -> None:
        np = self.mesh.nodes[WEB_NODE]
        status, text = http_get(f"http://127.0.0.1:{np.stats}/metrics")
        total = _metric(text, name, labels) if status == 200 else 0.0
        shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
        self.check(total >= 1, f"web's ztunnel ({WEB_NODE}) metrics: {name}{{{shown}}} {total:g}")


def _from_ip(rec: dict[str, Any], pod_key: str) -> bool:
    return str(rec.get("src_addr", "")).split(":", 1)[0] == spec.pod(pod_key).ip


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
