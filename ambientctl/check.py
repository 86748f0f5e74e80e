"""``ambientctl check``: is this mesh healthy? One green/red table, exit 1 on red.

What a user asks first when something does not work, answered from what the processes say
about themselves rather than from what should be:

- **control plane**: its CA + discovery address accepts connections, and how many ztunnels
  hold discovery state from it;
- **ztunnel** of every node: its admin port answers and it reports ready (discovery state, its
  pods from the cni agent, their certificates);
- **certificate** of every pod identity on every node: issued, valid now, and when it expires
  (one past half its lifetime was not renewed on time: a warning);
- **enrollment** per node: every pod discovery says is in the mesh (HBONE) on that node is
  served by its ztunnel — "enrolled but not served" is the classic broken-redirection case;
- **policy**: AuthorizationPolicies with fields ztunnel ignores (L7 rules, CUSTOM/AUDIT …), from
  the control plane's own lowering (:func:`controlplane.lowering.lower_policies`) of the YAML.

Inputs: the running local mesh (found by itself; ``--run ID`` when several run), or
``--admin ADDR`` (repeatable) with ``--controlplane HOST:PORT`` and ``--config FILE``.
Status per row: OK, WARN (yellow: look at it), FAIL (red), SKIP (not checked: no input for it).
Exit status: 0 no FAIL, 1 any FAIL, 2 bad input.

Decide-then-do: :func:`gather` does all the I/O into :class:`Facts`; :func:`evaluate` is a pure
function of them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import enum
import json
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ambientctl.localmesh.state import RUNS_ROOT
from ambientctl.ztunnel_config import (
    FetchError,
    UsageError,
    ZtunnelRef,
    admin_base,
    fetch_dump,
    find_local_mesh,
    http,
    table,
)

PROG = "ambientctl check"
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
JSON = dict[str, Any]


class Status(enum.Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


_COLORS = {Status.OK: "32", Status.WARN: "33", Status.FAIL: "31", Status.SKIP: "2"}


@dataclass(frozen=True)
class Finding:
    check: str  # control plane, ztunnel, certificate, enrollment, policy
    target: str
    status: Status
    detail: str

    def to_json(self) -> JSON:
        return {
            "check": self.check,
            "target": self.target,
            "status": self.status.value,
            "detail": self.detail,
        }


# --- the facts ---------------------------------------------------------------------------------


@dataclass
class ZtunnelFacts:
    ref: ZtunnelRef
    dump: JSON | None = None
    error: str | None = None  # why there is no dump
    readiness: int | None = None  # HTTP status of /healthz/ready, when its address is known


@dataclass
class Facts:
    origin: str
    now: dt.datetime
    ztunnels: list[ZtunnelFacts] = field(default_factory=list)
    controlplane: str | None = None
    controlplane_error: str | None = None  # None: reachable (when controlplane is set)
    controlplane_running: bool | None = None
    config: str | None = None
    config_error: str | None = None
    policy_count: int = 0
    policy_warnings: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    expected_nodes: Sequence[str] = ()  # nodes with enrolled pods, per the config


# --- gathering (I/O) ---------------------------------------------------------------------------


def _tcp(addr: str, timeout: float) -> str | None:
    """None if ``host:port`` accepts a TCP connection, else why not."""
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except ValueError:
        return f"{addr!r} is not HOST:PORT"
    except OSError as e:
        return e.strerror or str(e)


def _load_config(facts: Facts, path: str) -> None:
    from ambientctl.policy import load_config_file
    from controlplane.lowering import lower_policies
    from mesh.model import TunnelProtocol
    from sources.convert import ConfigError

    facts.config = path
    try:
        snapshot = load_config_file(path)
    except ConfigError as e:
        facts.config_error = str(e)
        return
    lowered = lower_policies(snapshot)
    facts.policy_count = len(snapshot.authorization_policies)
    facts.policy_warnings = dict(lowered.warnings)
    facts.expected_nodes = sorted(
        {
            w.node
            for w in snapshot.workloads.values()
            if w.node and w.tunnel_protocol is TunnelProtocol.HBONE and not w.host_network
        }
    )


def gather(args: argparse.Namespace) -> Facts:
    """Everything the checks look at; UsageError for input the user must fix."""
    now = dt.datetime.now(dt.UTC)
    if args.admin:
        facts = Facts(origin=", ".join(f"--admin {a}" for a in args.admin), now=now)
        refs = [ZtunnelRef(admin=a) for a in args.admin]
        facts.controlplane = args.controlplane
        config = args.config
    else:
        mesh = find_local_mesh(args.run, args.runs_root)
        facts = Facts(origin=f"local mesh {mesh.run_id} ({mesh.run_dir})", now=now)
        refs = list(mesh.ztunnels.values())
        facts.controlplane = args.controlplane or mesh.controlplane
        facts.controlplane_running = mesh.controlplane_running
        config = args.config or (str(mesh.config) if mesh.config else None)
        if not refs:
            raise UsageError(f"local mesh {mesh.run_id} records no ztunnel in {mesh.run_dir}")
    if config is not None:
        if args.config is not None and not Path(config).is_file():
            raise UsageError(f"--config {config}: no such file")
        _load_config(facts, config)
    if facts.controlplane is not None:
        facts.controlplane_error = _tcp(facts.controlplane, args.timeout)
    for ref in refs:
        zf = ZtunnelFacts(ref)
        if ref.running is False:
            zf.error = f"its process (pid {ref.pid}) is not running"
        else:
            try:
                zf.dump = fetch_dump(ref, args.timeout)
            except FetchError as e:
                zf.error = str(e).removeprefix(ref.origin + ": ")
        if ref.readiness is not None and zf.dump is not None:
            try:
                http(f"http://{ref.readiness}/healthz/ready", ref.origin, args.timeout)
                zf.readiness = 200
            except FetchError as e:
                zf.readiness = 503 if "HTTP 503" in str(e) else 0
        facts.ztunnels.append(zf)
    return facts


# --- deciding (pure) ---------------------------------------------------------------------------


def _span(seconds: float) -> str:
    s = int(abs(seconds))
    if s < 3600:
        text = f"{s // 60}m{s % 60:02d}s"
    elif s < 86400 * 2:
        text = f"{s // 3600}h{s % 3600 // 60:02d}m"
    else:
        text = f"{s // 86400}d{s % 86400 // 3600}h"
    return text


def _time(text: object) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _zt_name(zf: ZtunnelFacts) -> str:
    node = zf.ref.node or (zf.dump or {}).get("node")
    return str(node) if node else zf.ref.admin


def _controlplane(facts: Facts) -> Finding:
    # Only the ztunnels that answered count: one that is down is its own red row.
    read = [z.dump for z in facts.ztunnels if z.dump is not None]
    with_state = sum(1 for d in read if int(d.get("version") or 0) > 0)
    held = f"{with_state}/{len(read)} ztunnels hold discovery state"
    all_hold = with_state == len(read)
    if facts.controlplane is None:
        status = Status.OK if read and all_hold else Status.SKIP
        return Finding(
            "control plane", "-", status, f"address not known (give --controlplane HOST:PORT); {held}"
        )
    if facts.controlplane_running is False:
        return Finding(
            "control plane", facts.controlplane, Status.FAIL, f"its process is not running; {held}"
        )
    if facts.controlplane_error is not None:
        return Finding(
            "control plane",
            facts.controlplane,
            Status.FAIL,
            f"unreachable: {facts.controlplane_error}; {held}",
        )
    return Finding(
        "control plane", facts.controlplane, Status.OK if all_hold else Status.FAIL, f"reachable; {held}"
    )


def _ztunnel(zf: ZtunnelFacts) -> Finding:
    name = _zt_name(zf)
    where = admin_base(zf.ref.admin) if zf.ref.admin else ""
    target = f"{name} ({where})" if where and name != zf.ref.admin else (where or name)
    d = zf.dump
    if d is None:
        return Finding("ztunnel", target, Status.FAIL, f"admin not readable: {zf.error}")
    pods = [p for p in d.get("pods") or () if isinstance(p, dict)]
    certs = [c for c in d.get("certificates") or () if isinstance(c, dict)]
    conns = len(d.get("connections") or ())
    facts = f"{len(pods)} pods, state version {d.get('version')}, {conns} open connections"
    if d.get("ready") and zf.readiness in (None, 200):
        return Finding("ztunnel", target, Status.OK, f"ready; {facts}")
    why = []
    if not d.get("version"):
        why.append("no discovery state yet")
    pending = [str(c.get("identity")) for c in certs if c.get("state") != "available"]
    if pending:
        why.append(f"certificates pending: {', '.join(pending)}")
    if zf.readiness not in (None, 200):
        why.append(f"/healthz/ready answers {zf.readiness or 'nothing'}")
    if not why:
        why.append("no pod snapshot from the cni agent yet")
    return Finding("ztunnel", target, Status.FAIL, f"not ready: {'; '.join(why)}; {facts}")


def _certificates(zf: ZtunnelFacts, now: dt.datetime) -> list[Finding]:
    out = []
    for c in (zf.dump or {}).get("certificates") or ():
        if not isinstance(c, dict):
            continue
        target = f"{c.get('identity')} ({_zt_name(zf)})"
        if c.get("state") != "available":
            why = c.get("last_error") or "waiting for the CA's first answer"
            out.append(Finding("certificate", target, Status.FAIL, f"not issued: {why}"))
            continue
        start, end = _time(c.get("not_before")), _time(c.get("not_after"))
        if start is None or end is None:
            out.append(Finding("certificate", target, Status.FAIL, "no validity in the dump"))
            continue
        stamp = end.strftime("%Y-%m-%dT%H:%M:%SZ")
        if now >= end:
            out.append(
                Finding(
                    "certificate",
                    target,
                    Status.FAIL,
                    f"expired {_span((now - end).total_seconds())} ago ({stamp})",
                )
            )
        elif now < start:
            out.append(Finding("certificate", target, Status.FAIL, f"not valid before {start.isoformat()}"))
        else:
            left = (end - now).total_seconds()
            detail = f"valid, expires {stamp} (in {_span(left)}), serial {c.get('serial')}"
            # Renewed at half-life: a certificate past it by more than a tenth was not renewed.
            life = (end - start).total_seconds()
            if life > 0 and left < life * 0.4:
                out.append(
                    Finding("certificate", target, Status.WARN, detail + ": past half-life, not renewed")
                )
            else:
                out.append(Finding("certificate", target, Status.OK, detail))
    return out


def _enrollment(zf: ZtunnelFacts) -> Finding | None:
    d = zf.dump
    if d is None:
        return None
    node = str(d.get("node") or _zt_name(zf))
    pods = [p for p in d.get("pods") or () if isinstance(p, dict)]
    served = {p.get("uid") for p in pods}
    enrolled = [
        w
        for w in d.get("workloads") or ()
        if isinstance(w, dict)
        and w.get("node") == node
        and w.get("tunnel_protocol") == "HBONE"
        and w.get("network_mode") != "HOST_NETWORK"
    ]
    missing = [w for w in enrolled if w.get("uid") not in served]
    unknown = [p for p in pods if not p.get("workload_known")]
    policies = sorted({a for p in pods for a in p.get("missing_authorizations") or ()})
    if missing:
        names = ", ".join(
            f"{w.get('namespace')}/{w.get('name')} ({','.join(w.get('addresses') or ())})" for w in missing
        )
        return Finding(
            "enrollment",
            node,
            Status.FAIL,
            f"enrolled but not served by this node's ztunnel: {names} (redirection or the cni agent: "
            "see the cni agent's log)",
        )
    notes = []
    if unknown:
        notes.append(
            "served but not in discovery yet: "
            + ", ".join(f"{p.get('namespace')}/{p.get('name')}" for p in unknown)
        )
    if policies:
        notes.append(f"pods list policies this node does not hold: {', '.join(policies)}")
    detail = f"{len(enrolled)} enrolled pods, all served"
    return Finding("enrollment", node, Status.WARN if notes else Status.OK, "; ".join([detail, *notes]))


def _policies(facts: Facts) -> list[Finding]:
    if facts.config is None:
        return [Finding("policy", "-", Status.SKIP, "no local-mode YAML to read (give --config FILE)")]
    if facts.config_error is not None:
        return [Finding("policy", facts.config, Status.FAIL, f"cannot read: {facts.config_error}")]
    out = [
        Finding("policy", key, Status.WARN, "; ".join(ws))
        for key, ws in sorted(facts.policy_warnings.items())
    ]
    if not out:
        out.append(
            Finding(
                "policy",
                facts.config,
                Status.OK,
                f"{facts.policy_count} AuthorizationPolicies, no field ignored",
            )
        )
    return out


def evaluate(facts: Facts) -> list[Finding]:
    out = [_controlplane(facts)]
    seen = set()
    for zf in facts.ztunnels:
        out.append(_ztunnel(zf))
        seen.add(_zt_name(zf))
    for node in facts.expected_nodes:
        if node not in seen:
            out.append(
                Finding(
                    "ztunnel",
                    node,
                    Status.FAIL,
                    "the config has enrolled pods on it, but no ztunnel was checked",
                )
            )
    for zf in facts.ztunnels:
        out.extend(_certificates(zf, facts.now))
    for zf in facts.ztunnels:
        f = _enrollment(zf)
        if f is not None:
            out.append(f)
    out.extend(_policies(facts))
    return out


@dataclass(frozen=True)
class Report:
    origin: str
    findings: tuple[Finding, ...]

    @property
    def failed(self) -> bool:
        return any(f.status is Status.FAIL for f in self.findings)

    def counts(self) -> dict[str, int]:
        return {s.value.lower(): sum(1 for f in self.findings if f.status is s) for s in Status}

    def to_json(self) -> JSON:
        worst = (
            "fail"
            if self.failed
            else ("warn" if any(f.status is Status.WARN for f in self.findings) else "ok")
        )
        return {
            "mesh": self.origin,
            "status": worst,
            "checks": [f.to_json() for f in self.findings],
            "summary": self.counts(),
        }

    def render(self, color: bool) -> list[str]:
        rows = [[f.check.upper(), f.target, f.status.value, f.detail] for f in self.findings]
        lines = table(("CHECK", "TARGET", "STATUS", "DETAIL"), rows, padding=2)
        if color:
            # Colour the STATUS cell only, after layout (escape codes have no width).
            start = lines[0].index("STATUS")
            for i, f in enumerate(self.findings, 1):
                line, width = lines[i], len(f.status.value)
                lines[i] = (
                    line[:start] + f"\x1b[{_COLORS[f.status]}m{f.status.value}\x1b[0m" + line[start + width :]
                )
        c = self.counts()
        lines.insert(0, f"mesh: {self.origin}")
        lines.append(
            f"{'FAILED' if self.failed else 'healthy'}: {c['ok']} ok, {c['warn']} warnings, {c['fail']} failed"
            + (f", {c['skip']} skipped" if c["skip"] else "")
        )
        return lines


# --- the command -------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="health summary of a mesh: control plane, ztunnels, certificates, enrollment, policies",
        description="Check a mesh's health: the control plane is reachable, every node's ztunnel is ready, "
        "certificates are valid (and when they expire), every enrolled pod is served, and which policies have "
        "fields ztunnel ignores. Reads the running local mesh, or --admin ztunnels. Exit status: 0 healthy "
        "(warnings allowed), 1 a check failed, 2 bad input.",
    )
    p.add_argument("--run", metavar="ID", help="which local mesh, when several run")
    p.add_argument("--admin", metavar="ADDR", action="append", default=[],
                   help="a ztunnel's admin address instead of the local mesh's (repeat for each node)")  # fmt: skip
    p.add_argument("--controlplane", metavar="HOST:PORT", help="the control plane's CA + discovery address")
    p.add_argument(
        "--config", metavar="FILE", help="the local-mode YAML (policies; default: the local mesh's)"
    )
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    p.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="colour the STATUS column"
    )
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds per request (default 5)")
    p.set_defaults(func=cmd_check, runs_root=RUNS_ROOT)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        facts = gather(args)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    report = Report(facts.origin, tuple(evaluate(facts)))
    if args.output == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        print("\n".join(report.render(color)))
    return EXIT_FAIL if report.failed else EXIT_OK
