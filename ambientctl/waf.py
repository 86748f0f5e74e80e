"""``ambientctl waf test``: what would the waypoint's WAF do with this request, and which rules match?

For tuning a ``WafPolicy`` offline: the policy is read from a YAML file as the control plane reads
it (:func:`sources.local.parse_manifest`: the same validation and messages), lowered to the
engine's configuration as the waypoint lowers it (:func:`waypoint.waf.policies.to_config`), and
the request is evaluated by the same engine (libmodsecurity with the Debian OWASP Core Rule Set).
A rule ModSecurity refuses is reported with ModSecurity's own message, as the waypoint logs it.

    ambientctl waf test --config waf.yaml --request "GET /products?id=1' OR '1'='1"
    ambientctl waf test --config waf.yaml --request "POST /login" --body 'user=a&pass=b' -o json

Exit status: 0 the request passes (DetectOnly findings included), 1 it is blocked, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from mesh.model.waf import WafConfigError, WafPolicy
from sources.convert import ConfigError, ConvertOptions
from sources.local import parse_manifest
from waypoint.waf import RuleLoadError, WafEngine, WafRequest, WafVerdict
from waypoint.waf.policies import to_config

EXIT_PASS, EXIT_BLOCK, EXIT_INPUT = 0, 1, 2
PROG = "ambientctl waf test"
_VERSION = re.compile(r"\s+HTTP/(1\.0|1\.1|2)$")


class InputError(Exception):
    """The command cannot answer: a bad argument, file or policy; the message says which."""


@dataclass(frozen=True, slots=True)
class Result:
    policy: WafPolicy
    rule_count: int
    request: WafRequest
    verdict: WafVerdict


def parse_request(line: str, headers: list[str], body: str | None) -> WafRequest:
    """``"METHOD TARGET [HTTP/x]"`` plus ``Name: value`` headers and a body, as a client sends them.

    Characters a request target cannot hold (whitespace, non-ASCII) are percent-encoded, as a
    browser or ``curl --url-query`` would; the rest is sent as typed. A body without a
    Content-Type is a form (``application/x-www-form-urlencoded``), as ``curl -d`` sends it.
    """
    line = line.strip()
    version = "1.1"
    m = _VERSION.search(line)
    if m:
        version, line = m.group(1), line[: m.start()]
    method, _, target = line.partition(" ")
    target = target.strip()
    if not method.isalpha() or not target.startswith("/"):
        raise InputError(f'--request: expected "METHOD /path?query", got {line!r}')
    target = "".join(c if 0x20 < ord(c) < 0x7F else "".join(f"%{b:02X}" for b in c.encode()) for c in target)
    parsed: list[tuple[str, str]] = []
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise InputError(f'-H: expected "Name: value", got {h!r}')
        parsed.append((name.strip().lower(), value.strip()))
    names = {n for n, _ in parsed}
    if "host" not in names:
        parsed.insert(0, ("host", "localhost"))
    if "user-agent" not in names:
        parsed.append(("user-agent", "ambientctl"))
    if "accept" not in names:
        parsed.append(("accept", "*/*"))
    data = body.encode() if body is not None else None
    if data:
        if "content-type" not in names:
            parsed.append(("content-type", "application/x-www-form-urlencoded"))
        if "content-length" not in names:
            parsed.append(("content-length", str(len(data))))
    return WafRequest(
        method=method.upper(), uri=target, headers=tuple(parsed), body=data or None, http_version=version
    )


def load_policy(path: str, name: str | None) -> WafPolicy:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InputError(f"--config {path}: {e.strerror}") from None
    try:
        objects = parse_manifest(text, source=path, options=ConvertOptions(reject_unknown_fields=True))
    except ConfigError as e:
        raise InputError(str(e)) from None
    policies = [o for o in objects if isinstance(o, WafPolicy)]
    if name is not None:
        policies = [p for p in policies if name in (p.key, p.name)]
    if len(policies) != 1:
        found = ", ".join(sorted(p.key for p in policies)) or "none"
        which = f" named {name!r}" if name else ""
        raise InputError(
            f"--config {path}: need exactly one WafPolicy{which} (found {found}); name it with --policy"
        )
    return policies[0]


def evaluate(policy: WafPolicy, request: WafRequest) -> Result:
    """The verdict of ``policy``'s rules on ``request`` (blocking: loads the Core Rule Set)."""
    try:
        config = to_config(policy)
    except WafConfigError as e:
        raise InputError(f"WafPolicy {policy.key}: {e}") from None
    with WafEngine(max_workers=1) as engine:
        try:
            count = engine.load(config)
        except RuleLoadError as e:
            raise InputError(f"WafPolicy {policy.key}: ModSecurity refused the rules: {e}") from None
        return Result(policy, count, request, engine.inspect_sync(request))


def to_json(r: Result) -> dict[str, Any]:
    v = r.verdict
    return {
        "policy": r.policy.key,
        "mode": r.policy.mode.value,
        "paranoia_level": r.policy.paranoia_level,
        "rules": r.rule_count,
        "request": {"method": r.request.method, "uri": r.request.uri},
        "action": v.action,
        "status": v.status if v.blocked else None,
        "anomaly_score": v.anomaly_score,
        "body_inspected": v.body_inspected,
        "findings": [
            {
                "rule_id": f.rule_id,
                "message": f.message,
                "data": f.data,
                "severity": f.severity,
                "tags": list(f.tags),
                "disruptive": f.disruptive,
            }
            for f in v.findings
        ],
    }


def render(r: Result, out: TextIO) -> None:
    v = r.verdict
    p = r.policy
    out.write(f"policy {p.key}: {p.mode.value}, paranoia level {p.paranoia_level}, {r.rule_count} rules\n")
    outcome = {"allow": "PASS (no rule matched)", "detect": "PASS (matched, not blocked)"}.get(
        v.action, f"BLOCK {v.status}"
    )
    score = f", anomaly score {v.anomaly_score}" if v.anomaly_score is not None else ""
    out.write(f"{r.request.method} {r.request.uri} -> {outcome}{score}\n")
    for f in v.findings:
        mark = "*" if f.disruptive else " "
        out.write(f" {mark}{f.rule_id:>8}  {f.message}\n")
        if f.data:
            out.write(f"            {f.data[:200]}\n")
    if v.findings:
        ids = sorted({f.rule_id for f in v.findings if f.rule_id < 949000})  # not the score rules
        if ids:
            out.write(f"to exclude: ruleExclusions: [{', '.join(f'{{id: {i}}}' for i in ids)}]\n")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        policy = load_policy(args.config, args.policy)
        request = parse_request(args.request, args.header or [], args.body)
        result = evaluate(policy, request)
    except InputError as e:
        err.write(f"{PROG}: {e}\n")
        return EXIT_INPUT
    if args.output == "json":
        json.dump(to_json(result), out, indent=2)
        out.write("\n")
    else:
        render(result, out)
    return EXIT_BLOCK if result.verdict.blocked else EXIT_PASS


def add_parser(sub: Any) -> None:
    p = sub.add_parser("waf", help="web application firewall tools (test)")
    ws = p.add_subparsers(dest="waf_command", required=True, metavar="SUBCOMMAND")
    t = ws.add_parser(
        "test",
        help="evaluate a request against a WafPolicy offline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "--config",
        "-f",
        required=True,
        help="YAML file with the WafPolicy (other kinds are read and ignored)",
    )
    t.add_argument("--policy", help="which WafPolicy of the file (name or namespace/name)")
    t.add_argument("--request", "-r", required=True, help='the request line: "GET /path?query"')
    t.add_argument("-H", "--header", action="append", help='a request header "Name: value" (repeatable)')
    t.add_argument(
        "--body", "-d", help="the request body (a form unless -H 'content-type: ...' says otherwise)"
    )
    t.add_argument("-o", "--output", choices=("text", "json"), default="text")
    t.set_defaults(func=run)
