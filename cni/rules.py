"""The redirection rules inside an enrolled pod's network namespace.

What goes in (PROTOCOLS.md "Redirection inside the pod netns"):

* an nftables table of our own, ``inet istio-ambient``, replaced atomically in one ``nft -f``
  transaction (create-if-absent, delete, define), so applying it twice changes nothing and a
  half-written table can never exist;
* ``ip rule fwmark 0x111/0xfff lookup 133`` and ``local 0.0.0.0/0 dev lo table 133``, which send
  the app's replies to ztunnel's transparent inbound sockets (the proven recipe).

Why REDIRECT to local ports gives fail-closed for free: while nothing listens on 15001/15006 the
kernel answers the redirected SYN with a RST from inside the pod, so the app's TCP cannot reach
the wire in plaintext; nothing here depends on ztunnel being alive.

Every command runs inside the pod netns through ``nsenter --net=<path>``; a netns given as an
open fd is passed to nsenter as ``/proc/self/fd/N`` (the fd is inherited with ``pass_fds``). The
calling process never changes namespace. All functions are blocking: the agent runs them in a
worker thread.
"""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from mesh.netns import MARK_MASK, MARK_SKIP, MARK_TPROXY

log = structlog.get_logger(__name__)

TABLE_FAMILY = "inet"
TABLE_NAME = "istio-ambient"

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_HBONE_PORT = 15008
DNS_PORT = 15053

ROUTE_TABLE = 133
KUBELET_PROBE_SOURCE = "169.254.7.127"

NFT = "nft"
IP = "ip"
NSENTER = "nsenter"
UNSHARE = "unshare"
COMMAND_TIMEOUT = 15.0

NetnsRef = str | int  # a netns file path (/var/run/netns/x, /proc/<pid>/ns/net) or an open fd


class RulesError(RuntimeError):
    """A command inside the pod netns failed; the message carries its stderr."""


@dataclass(frozen=True, slots=True)
class RuleOptions:
    """Knobs of the ruleset. ``dns``: also capture udp/tcp port 53 to the DNS proxy."""

    dns: bool = False


def ruleset(options: RuleOptions = RuleOptions()) -> str:
    """The table definition alone, as ``nft -f`` reads it (shown in docs/cni.md)."""
    dns = (
        f"    udp dport 53 redirect to :{DNS_PORT}\n    tcp dport 53 redirect to :{DNS_PORT}\n"
        if options.dns
        else ""
    )
    return (
        f"table {TABLE_FAMILY} {TABLE_NAME} {{\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority -100; policy accept;\n"
        '    iifname "lo" return\n'
        f"    meta mark & {MARK_MASK:#x} == {MARK_SKIP:#x} return\n"
        f"    meta mark & {MARK_MASK:#x} == {MARK_TPROXY:#x} return\n"
        f"    ip saddr {KUBELET_PROBE_SOURCE} return\n"
        f"    tcp dport {INBOUND_HBONE_PORT} return\n"
        f"    meta l4proto tcp redirect to :{INBOUND_PLAINTEXT_PORT}\n"
        "  }\n"
        "  chain output {\n"
        "    type nat hook output priority -100; policy accept;\n"
        f"    meta mark & {MARK_MASK:#x} == {MARK_SKIP:#x} return\n"
        f"    meta mark & {MARK_MASK:#x} == {MARK_TPROXY:#x} return\n"
        '    oifname "lo" return\n'
        "    ip daddr 127.0.0.0/8 return\n"
        "    ip6 daddr ::1 return\n"
        f"{dns}"
        f"    meta l4proto tcp redirect to :{OUTBOUND_PORT}\n"
        "  }\n"
        "  chain transparent-return {\n"
        "    type route hook output priority -150; policy accept;\n"
        f"    meta mark & {MARK_MASK:#x} == {MARK_TPROXY:#x} ct mark set {MARK_TPROXY:#x}\n"
        f"    ct mark {MARK_TPROXY:#x} meta mark set {MARK_TPROXY:#x}\n"
        "  }\n"
        "}\n"
    )


def replace_script(options: RuleOptions = RuleOptions()) -> str:
    """One nft transaction that makes the table exactly :func:`ruleset`, whatever was there."""
    return _delete_script() + ruleset(options)


def _delete_script() -> str:
    return f"table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n"


def _exec(netns: NetnsRef, argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    target = f"/proc/self/fd/{netns}" if isinstance(netns, int) else netns
    fds: tuple[int, ...] = (netns,) if isinstance(netns, int) else ()
    cmd = [NSENTER, f"--net={target}", "--", *argv]
    try:
        return subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, pass_fds=fds
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RulesError(f"{' '.join(argv)} in netns {target}: {e}") from e


def _run(netns: NetnsRef, argv: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    p = _exec(netns, argv, stdin)
    if check and p.returncode != 0:
        raise RulesError(f"{' '.join(argv)} in netns {netns}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


# --- ip rule / route -------------------------------------------------------------------------


def _has_ip_rule(netns: NetnsRef) -> bool:
    rules: list[dict[str, Any]] = json.loads(_run(netns, [IP, "-j", "-4", "rule", "show"]) or "[]")
    return any(_is_our_rule(r) for r in rules)


def _is_our_rule(r: dict[str, Any]) -> bool:
    return (
        _as_int(r.get("fwmark")) == MARK_TPROXY
        and _as_int(r.get("fwmask", "0xffffffff")) == MARK_MASK
        and str(r.get("table")) == str(ROUTE_TABLE)
    )


def _as_int(v: object) -> int | None:
    try:
        return int(str(v), 0)
    except ValueError:
        return None


def _has_local_route(netns: NetnsRef) -> bool:
    out = _run(netns, [IP, "-j", "-4", "route", "show", "table", str(ROUTE_TABLE)], check=False)
    try:
        routes: list[dict[str, Any]] = json.loads(out or "[]")
    except ValueError:  # "FIB table does not exist" leaves a truncated listing
        return False
    return any(
        r.get("type") == "local" and r.get("dst") in ("default", "0.0.0.0/0") and r.get("dev") == "lo"
        for r in routes
    )


_RULE_ARGS = ("fwmark", f"{MARK_TPROXY:#x}/{MARK_MASK:#x}", "lookup", str(ROUTE_TABLE))
_ROUTE_ARGS = ("local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE))


# --- public API ------------------------------------------------------------------------------


def apply(netns: NetnsRef, options: RuleOptions = RuleOptions()) -> None:
    """Install redirection in ``netns``: idempotent, and the table is replaced atomically.

    A table that is already exactly right is left alone, so a second call changes nothing at all
    (not even nft's object handles); a missing, stale or tampered one is replaced in one
    transaction, so the pod never sees a moment without redirection.
    """
    text = _list_table(netns)
    if text is None or _table_problems(parse_nft_json(text), options):
        _run(netns, [NFT, "-f", "-"], stdin=replace_script(options))
    if not _has_local_route(netns):
        _run(netns, [IP, "-4", "route", "replace", *_ROUTE_ARGS])
    if not _has_ip_rule(netns):
        _run(netns, [IP, "-4", "rule", "add", *_RULE_ARGS])
    log.info("redirection applied", netns=str(netns), dns=options.dns)


def remove(netns: NetnsRef) -> None:
    """Remove everything :func:`apply` added; removing what is absent is not an error."""
    _run(netns, [NFT, "-f", "-"], stdin=_delete_script())
    while _has_ip_rule(netns):
        _run(netns, [IP, "-4", "rule", "del", *_RULE_ARGS])
    if _has_local_route(netns):
        _run(netns, [IP, "-4", "route", "del", *_ROUTE_ARGS])
    log.info("redirection removed", netns=str(netns))


@dataclass(frozen=True, slots=True)
class Chain:
    """One chain of our table as nft reports it; rules are canonical JSON of their expressions."""

    name: str
    type: str | None
    hook: str | None
    prio: int | None
    policy: str | None
    rules: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RedirectionState:
    """What of ours is present in a pod netns. ``chains`` is None when the table is absent."""

    chains: tuple[Chain, ...] | None
    ip_rule: bool
    local_route: bool

    @property
    def empty(self) -> bool:
        return self.chains is None and not self.ip_rule and not self.local_route


def parse_nft_json(text: str) -> tuple[Chain, ...]:
    """Chains of our table from ``nft -j list table`` output, handles and positions dropped."""
    doc = json.loads(text)
    chains: dict[str, dict[str, Any]] = {}
    rules: dict[str, list[str]] = {}
    for item in doc.get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            chains[c["name"]] = c
            rules.setdefault(c["name"], [])
        elif "rule" in item:
            r = item["rule"]
            rules.setdefault(r["chain"], []).append(json.dumps(r.get("expr", []), sort_keys=True))
    return tuple(
        Chain(
            name=name,
            type=c.get("type"),
            hook=c.get("hook"),
            prio=c.get("prio"),
            policy=c.get("policy"),
            rules=tuple(rules.get(name, [])),
        )
        for name, c in sorted(chains.items())
    )


def _list_table(netns: NetnsRef) -> str | None:
    p = _exec(netns, [NFT, "-j", "list", "table", TABLE_FAMILY, TABLE_NAME])
    if p.returncode != 0:
        if "No such file or directory" in p.stderr:
            return None
        raise RulesError(f"nft list in netns {netns}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def read(netns: NetnsRef) -> RedirectionState:
    """What redirection state ``netns`` holds now (for reconcile and for tests)."""
    text = _list_table(netns)
    return RedirectionState(
        chains=None if text is None else parse_nft_json(text),
        ip_rule=_has_ip_rule(netns),
        local_route=_has_local_route(netns),
    )


@functools.lru_cache(maxsize=4)
def expected_chains(options: RuleOptions = RuleOptions()) -> tuple[Chain, ...]:
    """How nft itself reports our ruleset, learnt by loading it in a throwaway netns.

    Comparing nft's own rendering with nft's own rendering keeps :func:`verify` independent of
    how this nft version normalises expressions (mask widths, implicit protocol matches).
    """
    p = subprocess.run(
        [
            UNSHARE,
            "--net",
            "--",
            "sh",
            "-c",
            f"{NFT} -f - && {NFT} -j list table {TABLE_FAMILY} {TABLE_NAME}",
        ],
        input=replace_script(options),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    if p.returncode != 0:
        raise RulesError(f"cannot render the ruleset: {p.stderr.strip()}")
    return parse_nft_json(p.stdout)


def _table_problems(chains: tuple[Chain, ...] | None, options: RuleOptions) -> list[str]:
    if chains is None:
        return [f"table {TABLE_FAMILY} {TABLE_NAME} is missing"]
    problems: list[str] = []
    want = {c.name: c for c in expected_chains(options)}
    have = {c.name: c for c in chains}
    for name in sorted(want.keys() - have.keys()):
        problems.append(f"chain {name} is missing")
    for name in sorted(have.keys() - want.keys()):
        problems.append(f"unexpected chain {name}")
    for name in sorted(want.keys() & have.keys()):
        w, h = want[name], have[name]
        if (w.type, w.hook, w.prio, w.policy) != (h.type, h.hook, h.prio, h.policy):
            problems.append(
                f"chain {name}: base chain is {h.type} {h.hook} {h.prio} {h.policy}, "
                f"want {w.type} {w.hook} {w.prio} {w.policy}"
            )
        if w.rules != h.rules:
            problems.append(f"chain {name}: its {len(h.rules)} rules differ from the {len(w.rules)} wanted")
    return problems


def diff(state: RedirectionState, options: RuleOptions = RuleOptions()) -> list[str]:
    """Differences between ``state`` and a correct installation (empty: nothing to do)."""
    problems = _table_problems(state.chains, options)
    if not state.ip_rule:
        problems.append(f"ip rule fwmark {MARK_TPROXY:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE} is missing")
    if not state.local_route:
        problems.append(f"route local 0.0.0.0/0 dev lo table {ROUTE_TABLE} is missing")
    return problems


def verify(netns: NetnsRef, options: RuleOptions = RuleOptions()) -> list[str]:
    """Read ``netns`` and list what differs from a correct installation.

    For reconcile-on-start: empty → present and correct, nothing to do; otherwise re-apply
    (enrolled pod) or :func:`remove` (pod no longer enrolled).
    """
    return diff(read(netns), options)
