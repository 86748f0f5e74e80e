"""``ambientctl policy check``: would ztunnel let this connection reach this pod, and why?

The answer comes from the code that enforces it, not from a second reading of the policies:

- ``--config FILE`` reads the local-mode YAML the control plane reads (``sources.local``: the
  same validation, the same error messages), lowers it with ``controlplane.lowering`` (what the
  discovery server sends), builds the destination's proxy-state workload and a
  :class:`~mesh.xds.state.ProxyState` holding it, its services and every authorization, and
  evaluates ``mesh.authz.evaluate(snapshot.policies_for(dst), connection)`` — what
  ``ztunnel/authorize.py`` does for an inbound connection.
- ``--admin ADDR`` reads a running ztunnel's ``/config_dump``, rebuilds its proxy state with
  :mod:`mesh.xds.dump` and evaluates exactly what that node holds.

Istio users are hurt by policies that silently do less than written, so the answer lists, next
to the verdict, every warning about the policies that apply (L7 rules dropped, DENY rules that
never fire or deny more widely) and about the policies of the destination's namespace and of
the root namespace that ztunnel never sees (``targetRefs``: the waypoint's; CUSTOM; AUDIT).

Decide-then-do: :func:`target_from_config`, :func:`target_from_dump` and :func:`check` are
pure; only :func:`load_config_file` and :func:`fetch_config_dump` do I/O.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane.lowering import (
    STATIC_STRICT_NAME,
    LoweredPolicies,
    lower_authorization_policy,
    lower_policies,
    service_state,
)
from mesh.authz import Connection, Decision, first_matching_rule
from mesh.authz import evaluate as evaluate_policies
from mesh.identity import Identity, IdentityError
from mesh.model import (
    DEFAULT_TRUST_DOMAIN,
    ROOT_NAMESPACE,
    AuthorizationAction,
    AuthorizationPolicy,
    Snapshot,
    Store,
    TunnelProtocol,
)
from mesh.model import Workload as ModelWorkload
from mesh.xds.authorization import Authorization, Scope
from mesh.xds.dump import DumpError, authorization_from_json, service_from_json, workload_from_json
from mesh.xds.state import ProxySnapshot, ProxyState, Service, Workload
from sources.convert import ConfigError, ConvertOptions
from sources.local import assume_local_redirection, parse_manifest

EXIT_ALLOW, EXIT_DENY, EXIT_INPUT = 0, 1, 2
CONVERTED_PREFIX = "converted_peer_authentication_"
_CONVERTED_NAMES = (CONVERTED_PREFIX, STATIC_STRICT_NAME)
PROG = "ambientctl policy check"


class InputError(Exception):
    """The command cannot answer: a bad argument, file, or admin address. The message says which."""


# --- the question --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """The connection to decide: who (None: plaintext), from where, to which pod and port."""

    principal: Identity | None
    src_ip: str
    namespace: str
    pod: str
    port: int


def parse_principal(text: str) -> Identity | None:
    """``cluster.local/ns/foo/sa/bar`` (as policies write it; ``spiffe://`` accepted) or ``none``."""
    if text == "none":
        return None
    try:
        return Identity.parse_principal(text.removeprefix("spiffe://"))
    except IdentityError as e:
        raise InputError(
            f"--from {text!r}: {e} (e.g. cluster.local/ns/shop/sa/web; none for a plaintext client)"
        ) from None


def parse_request(principal: str, src_ip: str, to: str, port: int) -> Request:
    identity = parse_principal(principal)
    try:
        ip = str(ipaddress.ip_address(src_ip))
    except ValueError:
        raise InputError(f"--from-ip {src_ip!r}: not an IP address") from None
    namespace, sep, pod = to.partition("/")
    if not sep or not namespace or not pod or "/" in pod:
        raise InputError(f"--to {to!r}: write NAMESPACE/POD (e.g. shop/web-1)")
    if not 1 <= port <= 65535:
        raise InputError(f"--port {port}: out of range (1-65535)")
    return Request(identity, ip, namespace, pod, port)


# --- what the destination's ztunnel holds --------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The destination pod and the proxy state its ztunnel decides from, plus what to warn about."""

    origin: str  # "config <file>" or "admin <url> (node <name>)"
    snapshot: ProxySnapshot
    workload: Workload
    # Warnings from lowering, per authorization key (applied only when that policy applies).
    policy_warnings: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Warnings about this destination that hold whatever applies.
    warnings: tuple[str, ...] = ()
    # AuthorizationPolicy key -> for each rule ztunnel holds, its index in the policy's
    # spec.rules (they differ once an ALLOW rule ztunnel cannot enforce was dropped).
    spec_rules: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    spec_known: bool = False  # from the policies as written (config), not a node's state (admin)


def _pod_list(names: Sequence[str], namespace: str, where: str, all_namespaces: Sequence[str]) -> str:
    if names:
        return f"pods in namespace {namespace} in {where}: {', '.join(sorted(names))}"
    others = ", ".join(sorted(set(all_namespaces))) or "none"
    return f"{where} has no pod in namespace {namespace} (namespaces with pods: {others})"


def load_config_file(path: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Snapshot:
    """The control plane's view of a local-mode file (raises ConfigError, naming file and field)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the file: {e.strerror or e}", source=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start})", source=path) from None
    objects = parse_manifest(text, source=path, options=ConvertOptions(trust_domain=trust_domain))
    store = Store()
    store.replace_all(assume_local_redirection(objects))
    return store.snapshot()


def _selects(policy: AuthorizationPolicy, pod: ModelWorkload) -> bool:
    return policy.selector is None or policy.selector.matches(pod.labels)


def _not_sent_warnings(snapshot: Snapshot, lowered: LoweredPolicies, pod: ModelWorkload) -> list[str]:
    """The policies of the pod's namespace and the root namespace that ztunnel never receives."""
    out: list[str] = []
    for key, p in sorted(snapshot.authorization_policies.items()):
        if p.namespace not in (pod.namespace, ROOT_NAMESPACE):
            continue
        where = f"AuthorizationPolicy {key}"
        if p.target_refs:
            targets = ", ".join(f"{r.kind} {r.namespace or p.namespace}/{r.name}" for r in p.target_refs)
            out.append(
                f"{where}: bound by targetRefs ({targets}): enforced by a waypoint, never by ztunnel; "
                "not sent to ztunnel and not part of this answer"
            )
        elif p.action in (AuthorizationAction.CUSTOM, AuthorizationAction.AUDIT):
            why = lowered.warnings.get(key) or (f"{where}: {p.action.value} is not sent to ztunnel",)
            if _selects(p, pod):
                tail = f" (it selects {pod.namespace}/{pod.name}: it enforces nothing for this pod)"
            else:
                tail = f" (it does not select {pod.namespace}/{pod.name})"
            out.extend(w + tail for w in why)
    for w in lowered.warnings.get("PeerAuthentication", ()):
        if w.startswith((f"PeerAuthentication {pod.namespace}/", f"PeerAuthentication {ROOT_NAMESPACE}/")):
            out.append(w)
    for key, ra in sorted(snapshot.request_authentications.items()):
        if ra.namespace in (pod.namespace, ROOT_NAMESPACE) and not ra.target_refs:
            out.append(
                f"RequestAuthentication {key}: bound by selector, which applies nowhere in ambient "
                "(ztunnel sees no requests); bind it to a waypoint with targetRefs"
            )
    return out


def _spec_rules(policy: AuthorizationPolicy) -> tuple[int, ...]:
    """For each rule of the lowered policy, its index in ``spec.rules``: lowering drops ALLOW
    rules that need L7 attributes, so the indices ztunnel reports shift past them."""
    kept = []
    for i, rule in enumerate(policy.rules):
        lowered = lower_authorization_policy(replace(policy, rules=(rule,))).authorization
        if lowered is not None and lowered.rules:
            kept.append(i)
    return tuple(kept)


def target_from_config(snapshot: Snapshot, namespace: str, pod: str, origin: str) -> Target:
    """The destination's ztunnel state, built the way the discovery server builds what it sends."""
    w = snapshot.workload_by_name(namespace, pod)
    if w is None:
        names = [x.name for x in snapshot.workloads.values() if x.namespace == namespace]
        all_ns = [x.namespace for x in snapshot.workloads.values()]
        raise InputError(
            f"--to {namespace}/{pod}: no such pod; {_pod_list(names, namespace, origin, all_ns)}"
        )
    lowered = lower_policies(snapshot)
    dst = lowered.workload(w, snapshot)
    services = [service_state(s, snapshot) for s in snapshot.services_for_workload(w.uid)]
    state = ProxyState()
    state.apply(
        addresses=[(dst.uid, dst), *((s.key, s) for s in services)], authorizations=lowered.authorizations
    )
    warnings = _not_sent_warnings(snapshot, lowered, w)
    if w.tunnel_protocol is not TunnelProtocol.HBONE or w.host_network:
        why = "uses the host network" if w.host_network else "is not enrolled (istio.io/dataplane-mode)"
        warnings.insert(
            0,
            f"{namespace}/{pod} {why}: no ztunnel sees its inbound traffic, so none of this is enforced",
        )
    spec_rules = {
        key: _spec_rules(p)
        for key, p in snapshot.authorization_policies.items()
        if key in lowered.warnings and p.action is AuthorizationAction.ALLOW
    }
    return Target(
        origin, state.snapshot(), dst, lowered.warnings, tuple(warnings), spec_rules, spec_known=True
    )


def target_from_dump(dump: object, namespace: str, pod: str, origin: str) -> Target:
    """A running ztunnel's state, rebuilt from its ``/config_dump`` (:mod:`mesh.xds.dump`)."""
    if not isinstance(dump, dict) or not all(
        isinstance(dump.get(k), list) for k in ("workloads", "authorizations")
    ):
        raise InputError(f"{origin}: not a ztunnel config_dump (no workloads and authorizations lists)")
    node = dump.get("node")
    if node:
        origin = f"{origin} (node {node})"
    try:
        workloads: list[Workload] = []
        for i, raw in enumerate(dump["workloads"]):
            fields = {k: v for k, v in raw.items() if k != "local"} if isinstance(raw, dict) else raw
            workloads.append(workload_from_json(fields, f"workloads[{i}]"))
        services = [service_from_json(s, f"services[{i}]") for i, s in enumerate(dump.get("services") or ())]
        auths = [
            authorization_from_json(a, f"authorizations[{i}]") for i, a in enumerate(dump["authorizations"])
        ]
    except DumpError as e:
        raise InputError(f"{origin}: bad config_dump: {e}") from None
    found = sorted((w for w in workloads if (w.namespace, w.name) == (namespace, pod)), key=lambda w: w.uid)
    if not found:
        names = [w.name for w in workloads if w.namespace == namespace]
        raise InputError(
            f"--to {namespace}/{pod}: no such pod; "
            f"{_pod_list(names, namespace, origin, [w.namespace for w in workloads])}"
        )
    dst = found[0]
    state = ProxyState()
    state.apply(
        addresses=[*((w.uid, w) for w in workloads), *((s.key, s) for s in services)], authorizations=auths
    )
    warnings = [
        "this answer is what the node holds, after lowering: policies it never received (targetRefs, "
        "CUSTOM, AUDIT) and the L7 parts dropped from the others are not in a config_dump; "
        "run with --config to see those warnings"
    ]
    local = {p.get("uid") for p in dump.get("pods") or () if isinstance(p, dict)}
    if dst.uid not in local:
        warnings.insert(
            0,
            f"{namespace}/{pod} is not a pod this ztunnel serves: its own node's ztunnel decides, "
            "from the same discovery state unless the two differ",
        )
    if dst.tunnel_protocol is not TunnelProtocol.HBONE or dst.host_network:
        warnings.insert(0, f"{namespace}/{pod} is not in the ambient mesh: no ztunnel enforces this for it")
    return Target(origin, state.snapshot(), dst, {}, tuple(warnings))


def admin_url(addr: str) -> str:
    url = addr if "://" in addr else f"http://{addr}"
    if "/" not in url[url.index("://") + 3 :]:
        url += "/config_dump"
    return url


def fetch_config_dump(addr: str, timeout: float) -> tuple[str, Any]:
    """(url, parsed JSON) of a ztunnel's ``/config_dump``; InputError naming the address."""
    url = admin_url(addr)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body: bytes = r.read()
    except urllib.error.HTTPError as e:
        e.close()
        raise InputError(f"--admin {url}: HTTP {e.code} {e.reason}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"--admin {url}: cannot connect: {getattr(e, 'reason', e)}") from None
    try:
        return url, json.loads(body)
    except ValueError:
        raise InputError(f"--admin {url}: not JSON: is this a ztunnel admin port (15000)?") from None


# --- the answer ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """One policy ztunnel evaluates for the destination, and whether it matched."""

    key: str
    action: str
    scope: str
    why: str  # why it applies to this pod
    dry_run: bool
    matched_rule: int | None


@dataclass(frozen=True)
class Result:
    request: Request
    target: Target
    decision: Decision
    applied: tuple[Applied, ...]
    missing: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def allow(self) -> bool:
        return self.decision.allow

    @property
    def verdict(self) -> str:
        return "ALLOW" if self.decision.allow else "DENY"

    @property
    def dst_ip(self) -> str:
        return self.target.workload.addresses[0]

    def spec_rule(self, key: str, rule: int | None) -> int | None:
        """The index in the policy's ``spec.rules`` of the rule ztunnel numbers ``rule``; None
        when unknown (from a node's state) or not a written policy (a converted PeerAuthentication)."""
        if rule is None or not self.target.spec_known or key.split("/", 1)[1].startswith(_CONVERTED_NAMES):
            return None
        written = self.target.spec_rules.get(key)
        return written[rule] if written is not None and rule < len(written) else rule

    def rule_text(self, key: str, rule: int, *, short: bool = False) -> str:
        written = self.spec_rule(key, rule)
        if written is None or written == rule:
            return f"rule {rule}"
        if short:
            return f"rule {rule} (spec.rules[{written}])"
        return f"rule {rule} (spec.rules[{written}] as written: ztunnel never got the L7 rules before it)"

    def decided_by(self) -> str:
        d = self.decision
        if d.policy is not None and d.rule is not None:
            action = next((a.action for a in self.applied if a.key == d.policy), self.verdict)
            return f"{action} policy {d.policy}, {self.rule_text(d.policy, d.rule)}"
        if not d.allow:
            return d.reason  # "no ALLOW policy matched (keys)"
        if not any(not a.dry_run for a in self.applied):
            return "no policy applies"
        return "no ALLOW policy applies and no DENY policy matched"

    def to_json(self) -> dict[str, Any]:
        d, r, w = self.decision, self.request, self.target.workload
        return {
            "decision": self.verdict,
            "allow": d.allow,
            "policy": d.policy,
            "rule": d.rule,
            "spec_rule": self.spec_rule(d.policy, d.rule) if d.policy else None,
            "decided_by": self.decided_by(),
            "reason": d.reason,
            "source": {"principal": r.principal.principal if r.principal else None, "ip": r.src_ip},
            "destination": {
                "namespace": w.namespace,
                "name": w.name,
                "uid": w.uid,
                "ip": self.dst_ip,
                "port": r.port,
                "node": w.node,
                "identity": w.identity.principal,
            },
            "evaluated": self.target.origin,
            "policies": [
                {
                    "key": a.key,
                    "action": a.action,
                    "scope": a.scope,
                    "applies_because": a.why,
                    "dry_run": a.dry_run,
                    "matched_rule": a.matched_rule,
                    "matched_spec_rule": self.spec_rule(a.key, a.matched_rule),
                }
                for a in self.applied
            ],
            "missing_policies": list(self.missing),
            "dry_run": [
                {"policy": x.policy, "action": x.action.value, "rule": x.rule, "matched": x.matched}
                for x in d.dry_run
            ],
            "dry_run_decision": None if d.dry_run_allow is None else ("ALLOW" if d.dry_run_allow else "DENY"),
            "warnings": list(self.warnings),
        }

    def render_text(self) -> list[str]:
        r, w = self.request, self.target.workload
        who = f"{r.principal.principal} (mTLS)" if r.principal else "plaintext (no identity)"
        lines = [
            self.verdict,
            f"  decided by:  {self.decided_by()}",
            f"  connection:  {who} from {r.src_ip} to {w.namespace}/{w.name} ({self.dst_ip}) port {r.port}",
            f"  evaluated:   {self.target.origin}",
        ]
        enforced = [a for a in self.applied if not a.dry_run]
        dry = [a for a in self.applied if a.dry_run]
        hits = {
            a.key: "no rule matched"
            if a.matched_rule is None
            else f"{self.rule_text(a.key, a.matched_rule, short=True)} matched"
            for a in self.applied
        }
        kw = max((len(a.key) for a in self.applied), default=0)
        hw = max((len(h) for h in hits.values()), default=0)

        def row(a: Applied) -> str:
            return f"  {a.action:<5}  {a.key:<{kw}}  {hits[a.key]:<{hw}}  {a.why}"

        lines.append(f"policies applied ({len(enforced)}):" if enforced else "policies applied: none")
        lines.extend(row(a) for a in enforced)
        if dry:
            lines.append(f"dry run, evaluated but not enforced ({len(dry)}):")
            lines.extend(row(a) for a in dry)
            would = "ALLOW" if self.decision.dry_run_allow else "DENY"
            lines.append(f"  with the dry-run policies enforced the answer would be: {would}")
        if self.warnings:
            lines.append(f"WARNINGS ({len(self.warnings)}):")
            lines.extend(f"  - {x}" for x in self.warnings)
        return lines


def _why(a: Authorization, dst: Workload) -> str:
    if a.key == f"{ROOT_NAMESPACE}/{STATIC_STRICT_NAME}":
        return "PeerAuthentication STRICT (refuses connections without identity)"
    if a.name.startswith(CONVERTED_PREFIX):
        return f"PeerAuthentication {a.namespace}/{a.name.removeprefix(CONVERTED_PREFIX)} (port-level mTLS)"
    if a.scope is Scope.GLOBAL:
        return f"mesh-wide ({ROOT_NAMESPACE}, no selector)"
    if a.scope is Scope.NAMESPACE:
        return f"namespace-wide ({a.namespace}, no selector)"
    return f"selector matches {dst.namespace}/{dst.name}"


def check(target: Target, request: Request) -> Result:
    """Decide ``request`` exactly as the destination's ztunnel would from ``target.snapshot``."""
    dst = target.workload
    if not dst.addresses:
        raise InputError(
            f"--to {dst.namespace}/{dst.name}: the pod has no IP (status.podIP) in {target.origin}"
        )
    conn = Connection.of(request.principal, request.src_ip, dst.addresses[0], request.port)
    snapshot = target.snapshot
    policies = snapshot.policies_for(dst)
    decision = evaluate_policies(policies, conn)
    applied = tuple(
        Applied(a.key, a.action.value, a.scope.value, _why(a, dst), a.dry_run, first_matching_rule(a, conn))
        for a in policies
    )
    missing = snapshot.missing_policies(dst)
    warnings = [
        f"{dst.namespace}/{dst.name} lists {key}, which this state does not hold: ztunnel skips it"
        for key in missing
    ]
    for a in policies:
        warnings.extend(target.policy_warnings.get(a.key, ()))
    warnings.extend(target.warnings)
    warnings.extend(_waypoint_warnings(snapshot, dst))
    return Result(request, target, decision, applied, missing, tuple(dict.fromkeys(warnings)))


def _waypoint_warnings(snapshot: ProxySnapshot, dst: Workload) -> list[str]:
    """Traffic through a waypoint reaches the pod from the waypoint: say what that changes."""
    via: list[str] = []
    if dst.waypoint is not None:
        via.append(f"{dst.waypoint} (the pod's)")
    for key in dst.services:
        svc: Service | None = snapshot.services.get(key)
        if svc is not None and svc.waypoint is not None:
            via.append(f"{svc.waypoint} (service {key})")
    if not via:
        return []
    return [
        f"{dst.namespace}/{dst.name} has a waypoint: {', '.join(via)}. Clients' traffic through it arrives "
        "from the waypoint, so ztunnel checks the waypoint's identity, not the client's (the waypoint "
        "enforces the targetRefs policies with the client's); this answer is for a connection made as given"
    ]


# --- the command ---------------------------------------------------------------------------


def add_check_parser(policy_subparsers: Any) -> None:
    """Register ``check`` under ``ambientctl policy``."""
    p = policy_subparsers.add_parser(
        "check",
        help="would ztunnel allow this connection to this pod? (from a local-mode file or a running ztunnel)",
        description="Decide one inbound connection as the destination's ztunnel would, naming the policy and "
        "rule that decide, every policy that applies, dry-run results, and warnings about what L4 cannot "
        "enforce. Exit status: 0 allow, 1 deny, 2 bad input.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="FILE", help="the local-mode YAML the control plane reads")
    src.add_argument(
        "--admin", metavar="ADDR", help="a ztunnel's admin address (host:port or URL): its /config_dump"
    )
    p.add_argument("--from", dest="principal", required=True, metavar="PRINCIPAL|none",
                   help="the client's identity as policies write it (cluster.local/ns/NS/sa/SA; spiffe:// "
                   "accepted), or none for a plaintext client")  # fmt: skip
    p.add_argument("--from-ip", required=True, metavar="IP", help="the client's IP address")
    p.add_argument("--to", required=True, metavar="NAMESPACE/POD", help="the destination pod")
    p.add_argument("--port", required=True, type=int, metavar="N", help="the pod's port (the target port)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    p.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN,
                   help=f"with --config: the mesh trust domain (default {DEFAULT_TRUST_DOMAIN})")  # fmt: skip
    p.add_argument("--timeout", type=float, default=5.0, help="with --admin: seconds to wait (default 5)")
    p.set_defaults(func=cmd_check)


def run_check(args: argparse.Namespace) -> Result:
    """Everything but printing; InputError for anything the user must fix."""
    request = parse_request(args.principal, args.from_ip, args.to, args.port)
    if args.config is not None:
        try:
            snapshot = load_config_file(args.config, args.trust_domain)
        except ConfigError as e:
            raise InputError(f"--config: {e}") from None
        target = target_from_config(snapshot, request.namespace, request.pod, f"config {args.config}")
    else:
        url, dump = fetch_config_dump(args.admin, args.timeout)
        target = target_from_dump(dump, request.namespace, request.pod, f"admin {url}")
    return check(target, request)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        result = run_check(args)
    except InputError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_INPUT
    if args.output == "json":
        print(json.dumps(result.to_json(), indent=2))
    else:
        print("\n".join(result.render_text()))
    return EXIT_ALLOW if result.allow else EXIT_DENY
