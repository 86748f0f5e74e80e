"""The demo's verdict: who talked to whom, and what the wire showed. Plain stdout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ambientctl.localmesh import spec
from ambientctl.localmesh.mesh import Outcome, Results


@dataclass
class Verdict:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def out(self, line: str = "") -> None:
        self.lines.append(line)

    def expect(self, ok: bool, what: str) -> str:
        if not ok:
            self.failures.append(what)
        return "ok" if ok else "FAILED"


def _ip_owner() -> dict[str, spec.PodSpec]:
    return {p.ip: p for p in spec.PODS}


def _bytes(o: Outcome) -> str:
    rec = o.log or o.peer_log
    if not rec:
        return "-"
    return f"{rec.get('bytes_sent', '?')} B out / {rec.get('bytes_recv', '?')} B back"


def build(res: Results) -> Verdict:
    v = Verdict()
    v.out("")
    v.out("=" * 100)
    v.out("Who talked to whom (from ztunnel access logs and the apps' replies)")
    v.out("=" * 100)
    for i, o in enumerate(res.outcomes, 1):
        _outcome(v, i, o)
    _wire(v, res)
    _dumps(v, res.config_dumps)
    return v


def result(failures: list[str]) -> list[str]:
    """The demo's last lines: every expectation of every act held, or which did not."""
    if not failures:
        return ["", "RESULT: every expected result holds."]
    return ["", f"RESULT: {len(failures)} expectation(s) failed:", *(f"  - {f}" for f in failures)]


def _outcome(v: Verdict, i: int, o: Outcome) -> None:
    req = o.request
    src, dst = req.src_pod, req.dst_pod
    where = f"{src.node} -> {dst.node}" if req.cross_node else f"same node {src.node}"
    v.out(f"{i}. {req.src} -> {req.dst}  via {req.via}  ({where})")
    status = o.reply.get("status")
    body = str(o.reply.get("body", o.reply.get("error", "")))
    reply_ok = status == 200 and body.startswith(f"hello from {req.dst}")
    mark = v.expect(reply_ok, f"request {i} {req.src} -> {req.url}: got {status} {body!r}")
    v.out(f"   app reply: HTTP {status} {body!r}  [{mark}]")
    if req.mesh:
        rec, peer = o.log or {}, o.peer_log or {}
        sid, did = rec.get("src_identity", "?"), rec.get("dst_identity", "?")
        v.out(f"   identities: {sid}  ->  {did}")
        v.out(
            f"   source ztunnel ({src.node}): {rec.get('direction', 'NO RECORD')}, security "
            f"{rec.get('security', '?')}, service {rec.get('dst_service', '?')}, {_bytes(o)}, "
            f"result {rec.get('result', '?')}"
        )
        v.out(
            f"   dest ztunnel ({dst.node}): {peer.get('direction', 'NO RECORD')}, peer verified as "
            f"{peer.get('src_identity', '?')}, security {peer.get('security', '?')}"
        )
        ok = (
            sid == src.identity()
            and did == dst.identity()
            and rec.get("security") == "mutual_tls"
            and rec.get("result") == "ok"
            and peer.get("src_identity") == src.identity()
            and peer.get("security") == "mutual_tls"
        )
        v.out(
            f"   => mutual TLS (HBONE) between SPIFFE identities  [{v.expect(ok, f'request {i}: mTLS records')}]"
        )
    else:
        peer = o.peer_log or {}
        v.out(
            f"   dest ztunnel ({dst.node}): {peer.get('direction', 'NO RECORD')}, source identity "
            f"{peer.get('src_identity', '?')}, security {peer.get('security', '?')}, {_bytes(o)}"
        )
        ok = peer.get("security") == "none" and peer.get("result") == "ok"
        v.out(
            f"   => plaintext: {src.namespace} is not enrolled, so no identity and no TLS  "
            f"[{v.expect(ok, f'request {i}: plaintext inbound record')}]"
        )


def _wire(v: Verdict, res: Results) -> None:
    owner = _ip_owner()
    v.out("")
    v.out("=" * 100)
    v.out(f"What an attacker on the wire between {spec.NODES[0]} and {spec.NODES[1]} saw "
          f"(tcpdump, {res.packets} packets, {len(res.flows)} TCP connections)")  # fmt: skip
    v.out("=" * 100)
    marker = spec.MARKER.encode()
    mesh_tls = legacy_plain = 0
    for f in res.flows:
        c, s = owner.get(f.client[0]), owner.get(f.server[0])
        if c is None or s is None:
            continue
        label = f"{f.client[0]}:{f.client[1]} -> {f.server[0]}:{f.server[1]}"
        names = f"{c.key} -> {s.key}"
        records, well_formed = f.tls_records()
        leaked = f.contains(marker)
        if spec.NAMESPACES[c.namespace] and spec.NAMESPACES[s.namespace]:
            ok = f.server[1] == 15008 and records > 0 and well_formed and not leaked
            v.expect(ok, f"wire: {label} ({names}) is not clean TLS on :15008")
            mesh_tls += ok
            v.out(
                f"  {label:34} {names:28} {f.payload:6} B  TLS: {records} records on :15008, "
                f"{'marker VISIBLE (LEAK)' if leaked else 'marker not visible'}  [{'ok' if ok else 'FAILED'}]"
            )
        else:
            legacy_plain += leaked
            v.out(
                f"  {label:34} {names:28} {f.payload:6} B  PLAINTEXT: "
                f"{'marker ' + repr(spec.MARKER) + ' visible' if leaked else 'marker not seen'}"
                f"{'' if leaked else '  [FAILED]'}"
            )
            v.expect(leaked, f"wire: {label} ({names}) expected plaintext with the marker")
    v.expect(mesh_tls > 0, "wire: no HBONE (TLS on :15008) connection of namespace shop was captured")
    v.expect(legacy_plain > 0, "wire: no plaintext connection of namespace legacy was captured")
    crossing = sum(1 for o in res.outcomes if o.request.mesh and o.request.cross_node)
    if 0 < mesh_tls < crossing:
        v.out(f"  ({crossing} cross-node shop requests shared {mesh_tls} pooled HBONE connection(s))")
    v.out("")
    v.out(
        f"  shop (enrolled):       {'TLS only (HBONE on :15008), marker never visible' if mesh_tls else 'NOT PROVEN'}"
    )
    v.out(
        f"  legacy (not enrolled): {'plaintext, marker visible on the wire' if legacy_plain else 'NOT PROVEN'}"
    )


def _dumps(v: Verdict, dumps: dict[str, Any]) -> None:
    v.out("")
    v.out("ztunnel config_dump: pods each node's ztunnel serves")
    for node, dump in dumps.items():
        pods = (dump or {}).get("pods", [])
        listed = ", ".join(f"{p['namespace']}/{p['name']} ({p['identity']})" for p in pods) or "none"
        v.out(f"  {node}: {listed}")
