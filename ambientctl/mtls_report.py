"""``ambientctl policy mtls-report``: what would STRICT mTLS break? (PERMISSIVE → STRICT migration)

A STRICT PeerAuthentication makes ztunnel refuse every inbound connection without a peer
identity — the plaintext that reaches an enrolled pod on port 15006. Before switching, a user
wants to know which destinations still accept such connections, and from whom. Running ztunnels
already know: each counts the connections it delivered (``istio_tcp_connections_*_total`` with
``reporter="destination"`` and ``connection_security_policy="none"`` or ``"mutual_tls"``) and
logs one line per connection (``direction=inbound_passthrough`` / ``inbound``, ``src_addr``).

Inputs, any mix (``--metrics`` or ``--access-log`` is required):

- ``--metrics URL``: a node's ``http://host:15020/metrics``. Counts since that ztunnel started,
  with source workloads — but no source IP (a client outside discovery is just "unknown").
- ``--access-log FILE``: ztunnel's JSON log lines (``-`` = stdin); adds the client address.
- ``--admin ADDR``: a node's admin port (``/config_dump``): the pods it serves (so a destination
  without any traffic is listed too), whether each is already STRICT, and every workload's IPs,
  to name a source that a log line only knows by address.

The same connection is usually in a node's metrics and in its log: for one destination and one
source the larger of the two counts is taken, never their sum; a metrics "unknown" source is
reduced by what the log attributes to addresses. A connection refused or closed by a policy
(``response_flags="DENY"``, or a log reason naming the policy) counts as refused, not as
plaintext that STRICT would break.

Decide-then-do, as the rest of the code: the parsers (:func:`parse_metrics`,
:func:`parse_access_log`, :func:`parse_config_dump`) and :func:`build_report` are pure; only
:func:`load_inputs` does I/O.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

STATIC_STRICT = "istio-system/istio_converted_static_strict"
UNKNOWN = "unknown"
EXIT_INPUT = 1
EXIT_USAGE = 2

# Access-log reasons that mean "a policy refused (or closed) this connection" (mesh/authz.py,
# ztunnel/connection_manager.py).
_POLICY_REASONS = ("denied by ", "no ALLOW policy matched", "closed by policy")
_INBOUND_DIRECTIONS = {"inbound": True, "inbound_passthrough": False}  # direction -> mTLS


class InputError(Exception):
    """An input could not be read or understood; the message names it."""


# -- observations: one per (destination, source, security, origin) -------------------------------


@dataclass(frozen=True)
class Flow:
    """Connections one destination received from one source, as one input counted them."""

    destination: str  # "ns/name", or "unknown" when ztunnel did not know the pod
    source: str  # "ns/name", an IP address, or "unknown"
    mtls: bool
    origin: str  # "metrics" or "access_log"
    connections: int = 0
    refused: int = 0  # refused, or closed later, by a policy
    open: int = 0  # still open when the metrics were read (metrics only)
    principals: frozenset[str] = frozenset()
    reasons: Mapping[str, int] = field(default_factory=dict)  # refusal reason -> count (log only)


def _workload(namespace: str | None, name: str | None) -> str:
    if not name or name == UNKNOWN or not namespace or namespace == UNKNOWN:
        return UNKNOWN
    return f"{namespace}/{name}"


def _host_of(addr: str) -> str:
    """The IP of ``ip``, ``ip:port`` or ``[ipv6]:port`` (as ztunnel writes ``src_addr``)."""
    if addr.startswith("["):
        return addr[1:].split("]", 1)[0]
    if addr.count(":") == 1:
        return addr.split(":", 1)[0]
    return addr


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_metrics(text: str, origin: str) -> list[Flow]:
    """The destination-side connection counts of one ztunnel ``/metrics`` page.

    ``istio_tcp_connections_opened_total`` counts every connection (a live one too), labelled
    when it opened; ``..._closed_total`` carries the final ``response_flags``. Opened minus
    closed per source is what is still open.
    """
    opened: Counter[tuple[str, str, bool]] = Counter()
    closed: Counter[tuple[str, str, bool]] = Counter()
    refused: Counter[tuple[str, str, bool]] = Counter()
    principals: defaultdict[tuple[str, str, bool], set[str]] = defaultdict(set)
    seen_family = False
    try:
        for family in text_string_to_metric_families(text):
            if family.name not in ("istio_tcp_connections_opened", "istio_tcp_connections_closed"):
                continue
            seen_family = True
            for s in family.samples:
                if not s.name.endswith("_total") or s.labels.get("reporter") != "destination":
                    continue
                lb = s.labels
                security = lb.get("connection_security_policy", "")
                if security not in ("none", "mutual_tls"):
                    continue
                key = (
                    _workload(lb.get("destination_workload_namespace"), lb.get("destination_workload")),
                    _workload(lb.get("source_workload_namespace"), lb.get("source_workload")),
                    security == "mutual_tls",
                )
                n = int(s.value)
                if family.name == "istio_tcp_connections_opened":
                    opened[key] += n
                    principal = lb.get("source_principal", UNKNOWN)
                    if principal != UNKNOWN and n:
                        principals[key].add(principal)
                else:
                    closed[key] += n
                    if lb.get("response_flags") == "DENY":
                        refused[key] += n
    except ValueError as e:
        raise InputError(f"{origin}: not a Prometheus metrics page: {e}") from None
    if not seen_family:
        raise InputError(
            f"{origin}: no istio_tcp_connections_opened_total in it: is this a ztunnel's metrics "
            "port (15020, path /metrics)?"
        )
    return [
        Flow(
            dst,
            src,
            mtls,
            "metrics",
            connections=max(opened[k], closed[k]),
            refused=refused[k],
            open=max(0, opened[k] - closed[k]),
            principals=frozenset(principals[k]),
        )
        for k in sorted(opened.keys() | closed.keys())
        for dst, src, mtls in [k]
    ]


@dataclass
class LogParse:
    flows: list[Flow]
    records: int  # access-log records of inbound connections
    warnings: list[str]


def parse_access_log(
    lines: Iterable[str], origin: str, ip_names: Mapping[str, str] | None = None
) -> LogParse:
    """Inbound connections from ztunnel's JSON log lines (other log events are skipped).

    ``ip_names`` (from config dumps) names a source the line knows only by address.
    """
    names = ip_names or {}
    count: Counter[tuple[str, str, bool]] = Counter()
    refused: Counter[tuple[str, str, bool]] = Counter()
    principals: defaultdict[tuple[str, str, bool], set[str]] = defaultdict(set)
    reasons: defaultdict[tuple[str, str, bool], Counter[str]] = defaultdict(Counter)
    json_lines = records = 0
    bad: list[int] = []
    first_text = 0
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("{"):
            first_text = first_text or i
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad.append(i)
            continue
        if not isinstance(rec, dict):
            bad.append(i)
            continue
        json_lines += 1
        if rec.get("event") != "connection complete" or rec.get("direction") not in _INBOUND_DIRECTIONS:
            continue
        records += 1
        mtls = _INBOUND_DIRECTIONS[rec["direction"]]
        ip = _host_of(str(rec.get("src_addr", "")))
        src = _workload(rec.get("src_namespace"), rec.get("src_workload"))
        if src == UNKNOWN:
            src = names.get(ip) or ip or UNKNOWN
        key = (_workload(rec.get("dst_namespace"), rec.get("dst_workload")), src, mtls)
        count[key] += 1
        principal = rec.get("src_identity")
        if isinstance(principal, str) and principal not in ("", UNKNOWN):
            principals[key].add(principal)
        reason = rec.get("reason")
        if rec.get("result") == "error" and isinstance(reason, str) and reason.startswith(_POLICY_REASONS):
            refused[key] += 1
            reasons[key][reason] += 1
    if json_lines == 0 and (bad or first_text):
        line_no = first_text or bad[0]
        raise InputError(
            f"{origin}: not a JSON access log (line {line_no} is not a JSON object; ztunnel writes "
            "JSON lines when its stderr is not a terminal)"
        )
    warnings = []
    if bad:
        warnings.append(
            f"{origin}: skipped {len(bad)} line(s) that are not valid JSON (first: line {bad[0]})"
        )
    if records == 0:
        warnings.append(f"{origin}: no inbound connection records in it")
    flows = [
        Flow(
            dst,
            src,
            mtls,
            "access_log",
            connections=n,
            refused=refused[k],
            principals=frozenset(principals[k]),
            reasons=dict(reasons[k]),
        )
        for k, n in sorted(count.items())
        for dst, src, mtls in [k]
    ]
    return LogParse(flows, records, warnings)


@dataclass(frozen=True)
class PodInfo:
    """A pod a ztunnel serves (from its ``/config_dump``): a possible destination."""

    workload: str
    node: str
    strict: bool
    authorizations: tuple[str, ...]


@dataclass
class DumpInfo:
    pods: list[PodInfo]
    ip_names: dict[str, str]  # workload IP -> "ns/name"


def parse_config_dump(dump: object, origin: str) -> DumpInfo:
    if not isinstance(dump, dict) or not isinstance(dump.get("pods"), list):
        raise InputError(f'{origin}: not a ztunnel config_dump (no "pods" list)')
    node = str(dump.get("node") or UNKNOWN)
    pods = []
    for p in dump["pods"]:
        if not isinstance(p, dict):
            continue
        auths = tuple(str(a) for a in p.get("authorizations") or ())
        pods.append(
            PodInfo(_workload(p.get("namespace"), p.get("name")), node, STATIC_STRICT in auths, auths)
        )
    ip_names: dict[str, str] = {}
    for w in dump.get("workloads") or ():
        if isinstance(w, dict):
            name = _workload(w.get("namespace"), w.get("name"))
            for addr in w.get("addresses") or ():
                ip_names[str(addr)] = name
    return DumpInfo(pods, ip_names)


# -- the report -----------------------------------------------------------------------------------


@dataclass
class SourceRow:
    source: str
    kind: str  # "workload", "ip" or "unknown"
    connections: int
    refused: int
    open: int
    principals: list[str]
    seen_in: list[str]
    reasons: dict[str, int]

    @property
    def accepted(self) -> int:
        return self.connections - self.refused

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_kind": self.kind,
            "connections": self.connections,
            "accepted": self.accepted,
            "refused": self.refused,
            "open": self.open,
            "principals": self.principals,
            "seen_in": self.seen_in,
            "refused_reasons": self.reasons,
        }


@dataclass
class Destination:
    workload: str
    node: str | None = None
    strict: bool | None = None  # from a config_dump; None = not known
    plaintext: list[SourceRow] = field(default_factory=list)
    mtls: list[SourceRow] = field(default_factory=list)

    @property
    def plaintext_accepted(self) -> int:
        return sum(r.accepted for r in self.plaintext)

    @property
    def verdict(self) -> str:
        # Already STRICT (per its config_dump): what plaintext it accepted was before the switch.
        if self.plaintext_accepted > 0 and not self.strict:
            return "plaintext"
        if any(r.connections for r in [*self.plaintext, *self.mtls]):
            return "mtls_only"
        return "no_traffic"

    @property
    def mode(self) -> str | None:
        return None if self.strict is None else ("STRICT" if self.strict else "PERMISSIVE")

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "node": self.node,
            "mode": self.mode,
            "verdict": self.verdict,
            "plaintext_accepted": self.plaintext_accepted,
            "plaintext": [r.to_json() for r in self.plaintext],
            "mtls": [r.to_json() for r in self.mtls],
        }


@dataclass
class Report:
    destinations: list[Destination]
    inputs: dict[str, list[str]]
    warnings: list[str] = field(default_factory=list)

    def by_verdict(self, verdict: str) -> list[Destination]:
        return [d for d in self.destinations if d.verdict == verdict]

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "destinations": [d.to_json() for d in self.destinations],
            "summary": {
                v: [d.workload for d in self.by_verdict(v)] for v in ("plaintext", "mtls_only", "no_traffic")
            },
            "warnings": self.warnings,
        }


def _kind(source: str) -> str:
    if source == UNKNOWN:
        return "unknown"
    return "ip" if _is_ip(source) else "workload"


def _merge(flows: list[Flow]) -> list[SourceRow]:
    """One row per source, from one destination's flows of one security (module docstring)."""
    per: dict[str, dict[str, Flow]] = defaultdict(dict)
    for flow in flows:
        f = flow
        have = per[f.source].get(f.origin)
        if have is not None:  # two pages or two files of the same origin: different nodes, add up
            f = replace(
                f,
                connections=have.connections + f.connections,
                refused=have.refused + f.refused,
                open=have.open + f.open,
                principals=have.principals | f.principals,
                reasons=dict(Counter(have.reasons) + Counter(f.reasons)),
            )
        per[f.source][f.origin] = f
    metric_sources = {s for s, by in per.items() if "metrics" in by}
    # What metrics call "unknown", the log may know by address: take that share off "unknown".
    unknown = per.get(UNKNOWN, {}).get("metrics")
    if unknown is not None:
        logged = [by["access_log"] for s, by in per.items() if s not in metric_sources and "access_log" in by]
        left = max(0, unknown.connections - sum(f.connections for f in logged))
        per[UNKNOWN]["metrics"] = replace(
            unknown,
            connections=left,
            refused=min(left, max(0, unknown.refused - sum(f.refused for f in logged))),
            open=min(unknown.open, left),
        )
    rows = []
    for source, by in per.items():
        best = max(by.values(), key=lambda f: (f.connections, f.origin == "metrics"))
        refused = max(f.refused for f in by.values()) if best.connections else 0
        reasons: Counter[str] = Counter()
        for f in by.values():
            reasons |= Counter(f.reasons)
        rows.append(
            SourceRow(
                source,
                _kind(source),
                best.connections,
                min(refused, best.connections),
                max(f.open for f in by.values()),
                sorted(set().union(*(f.principals for f in by.values()))),
                sorted(o for o, f in by.items() if f.connections),
                dict(reasons),
            )
        )
    rows = [r for r in rows if r.connections > 0]
    rows.sort(key=lambda r: (-r.accepted, -r.connections, r.source))
    return rows


def build_report(
    flows: Sequence[Flow], dumps: Sequence[DumpInfo] = (), inputs: dict[str, list[str]] | None = None
) -> Report:
    dests: dict[str, Destination] = {}
    for dump in dumps:
        for p in dump.pods:
            dests.setdefault(p.workload, Destination(p.workload, p.node, p.strict))
    grouped: defaultdict[tuple[str, bool], list[Flow]] = defaultdict(list)
    for f in flows:
        grouped[(f.destination, f.mtls)].append(f)
    for (dst, mtls), fs in grouped.items():
        dest = dests.setdefault(dst, Destination(dst))
        if mtls:
            dest.mtls = _merge(fs)
        else:
            dest.plaintext = _merge(fs)
    order = {"plaintext": 0, "mtls_only": 1, "no_traffic": 2}
    ordered = sorted(dests.values(), key=lambda d: (order[d.verdict], d.workload == UNKNOWN, d.workload))
    return Report(ordered, inputs or {})


# -- rendering ------------------------------------------------------------------------------------


def _source_text(r: SourceRow) -> str:
    text = r.source
    if r.kind == "unknown":
        text = "an unknown source (metrics carry no client address: add --access-log for it)"
    elif r.kind == "ip":
        text = f"{r.source} (not a known workload)"
    return text


def _n(count: int, what: str = "connection") -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


def _conns(count: int) -> str:
    """``count`` connections, in a fixed width so that rows line up."""
    return f"{count:>5} connection{' ' if count == 1 else 's'}"


def render_text(report: Report) -> list[str]:
    out: list[str] = []
    inp = report.inputs
    given = [
        _n(len(v), what)
        for what, v in (
            ("metrics page", inp.get("metrics", [])),
            ("access log", inp.get("access_log", [])),
            ("config dump", inp.get("admin", [])),
        )
        if v
    ]
    out.append("mTLS report" + (f" from {', '.join(given)}" if given else ""))

    def head(d: Destination) -> str:
        extra = [x for x in (f"node {d.node}" if d.node else "", d.mode or "") if x]
        return f"  {d.workload}" + (f"  ({', '.join(extra)})" if extra else "")

    def rows(d: Destination) -> None:
        if d.strict and d.plaintext_accepted:
            out.append(
                "      (STRICT now: the plaintext below was accepted before the switch; counters are "
                "cumulative since ztunnel started)"
            )
        for r in d.plaintext:
            if r.accepted:
                live = f", {r.open} open now" if r.open else ""
                out.append(f"      plaintext {_conns(r.accepted)} from {_source_text(r)}{live}")
        for r in d.mtls:
            who = f" ({', '.join(r.principals)})" if r.principals and r.principals != [r.source] else ""
            refused = f", {r.refused} refused by policy" if r.refused else ""
            out.append(f"      mTLS      {_conns(r.connections)} from {_source_text(r)}{who}{refused}")
        for r in d.plaintext:
            if r.refused:
                why = "; ".join(sorted(r.reasons)) or "response_flags DENY"
                out.append(f"      refused   {_conns(r.refused)} plaintext from {_source_text(r)}: {why}")

    sections = (
        ("plaintext", "Still receiving plaintext — STRICT would refuse these connections:"),
        (
            "mtls_only",
            "Accepting only mTLS (plaintext, if any, refused) — ready for STRICT, or already STRICT:",
        ),
        ("no_traffic", "No inbound connection seen (no evidence either way):"),
    )
    for verdict, title in sections:
        ds = report.by_verdict(verdict)
        if not ds:
            continue
        out.append("")
        out.append(title)
        for d in ds:
            out.append(head(d))
            rows(d)
    plain = report.by_verdict("plaintext")
    out.append("")
    if not report.destinations:
        out.append("Summary: no destination and no inbound connection in these inputs.")
    elif plain:
        sources = sorted({r.source for d in plain for r in d.plaintext if r.accepted})
        out.append(
            f"Summary: {len(plain)} destination(s) still accept plaintext ({', '.join(d.workload for d in plain)}), "
            f"from {', '.join(sources)}. Enroll those clients (or keep these destinations PERMISSIVE) "
            "before STRICT."
        )
    else:
        out.append("Summary: no destination accepts plaintext: STRICT would refuse nothing seen here.")
    return out


# -- I/O ------------------------------------------------------------------------------------------


def _url(arg: str, default_path: str) -> str:
    url = arg if "://" in arg else f"http://{arg}"
    scheme_end = url.index("://") + 3
    if "/" not in url[scheme_end:]:
        url += default_path
    return url


def _fetch(url: str, what: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body: bytes = r.read()
    except urllib.error.HTTPError as e:
        e.close()
        raise InputError(f"{what} {url}: HTTP {e.code} {e.reason}") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise InputError(f"{what} {url}: cannot connect: {reason}") from None
    return body.decode(errors="replace")


def _read_file(path: str, stdin: TextIO) -> list[str]:
    if path == "-":
        return stdin.read().splitlines()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError as e:
        raise InputError(f"access log {path}: {e.strerror or e}") from None


def load_inputs(
    metrics: Sequence[str],
    admin: Sequence[str],
    access_logs: Sequence[str],
    timeout: float = 5.0,
    stdin: TextIO | None = None,
) -> Report:
    """Read every input (raising :class:`InputError` on the first bad one) and build the report."""
    dumps = []
    for a in admin:
        url = _url(a, "/config_dump")
        body = _fetch(url, "admin", timeout)
        try:
            raw = json.loads(body)
        except ValueError:
            raise InputError(f"admin {url}: not JSON: is this a ztunnel admin port (15000)?") from None
        dumps.append(parse_config_dump(raw, f"admin {url}"))
    ip_names: dict[str, str] = {}
    for d in dumps:
        ip_names.update(d.ip_names)
    flows: list[Flow] = []
    warnings: list[str] = []
    metric_urls = []
    for m in metrics:
        url = _url(m, "/metrics")
        metric_urls.append(url)
        flows += parse_metrics(_fetch(url, "metrics", timeout), f"metrics {url}")
    for path in access_logs:
        parsed = parse_access_log(_read_file(path, stdin or sys.stdin), f"access log {path}", ip_names)
        flows += parsed.flows
        warnings += parsed.warnings
    report = build_report(
        flows, dumps, {"metrics": metric_urls, "admin": [_url(a, "/config_dump") for a in admin],
                       "access_log": list(access_logs)},
    )  # fmt: skip
    report.warnings = warnings
    return report


# -- the command ----------------------------------------------------------------------------------


def add_mtls_report_parser(policy_subparsers: Any) -> None:
    """Register ``mtls-report`` under ``ambientctl policy``."""
    p = policy_subparsers.add_parser(
        "mtls-report",
        help="which destinations still receive plaintext (what STRICT mTLS would refuse), from running ztunnels",
        description="Per destination workload: the plaintext connections it still accepts and from where "
        "(what a STRICT PeerAuthentication would refuse), and which destinations already receive only mTLS. "
        "Reads ztunnels' metrics, access logs and config dumps.",
    )
    p.add_argument("--metrics", action="append", default=[], metavar="URL",
                   help="a ztunnel's metrics, e.g. http://node-1:15020/metrics (repeat for each node)")  # fmt: skip
    p.add_argument("--admin", action="append", default=[], metavar="ADDR",
                   help="a ztunnel's admin address (host:port or URL; reads /config_dump): pods, modes, IPs")  # fmt: skip
    p.add_argument("--access-log", action="append", default=[], metavar="FILE",
                   help="ztunnel JSON log lines (repeatable; - for stdin)")  # fmt: skip
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per HTTP request (default 5)")
    p.set_defaults(func=cmd_mtls_report, parser=p)


def cmd_mtls_report(args: argparse.Namespace) -> int:
    if not args.metrics and not args.access_log:
        args.parser.print_usage(sys.stderr)
        print(
            "ambientctl policy mtls-report: give at least one --metrics URL or --access-log FILE "
            "(--admin only adds names and modes)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        report = load_inputs(args.metrics, args.admin, args.access_log, args.timeout)
    except InputError as e:
        print(f"ambientctl policy mtls-report: {e}", file=sys.stderr)
        return EXIT_INPUT
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(render_text(report)))
    return 0
