"""L4 authorization benchmark: decisions per second for one destination in a mesh of N policies.

    .venv/bin/python benchmarks/authz.py [--quick] [--sizes 10,1000,10000] [--seconds S]

Builds a deterministic mesh of N authorizations (two mesh-wide, one per namespace, the rest
workload-selector policies listed by the workloads of many namespaces), selects those that
apply to one destination (``shop/web``) the way the node proxy does -- global, its namespace's,
and the keys the workload lists -- and times :func:`mesh.authz.evaluate` on typical
connections: an allowed mTLS peer, a plaintext peer refused by the STRICT conversion (DENY),
and an mTLS peer no ALLOW policy matches. Two paths per case:

- ``select+evaluate``: the selection and ``evaluate(list_of_authorizations, conn)`` on every
  decision (compiled policies come from the identity cache; the PolicySet is rebuilt).
- ``PolicySet``: the set built once (what a state keeping one per workload and snapshot
  version would do), ``PolicySet.evaluate(conn)`` per decision.

The connection is built once per case (it is per connection, not per decision); its cost is
reported on its own line. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
if str(ROOT) not in sys.path:  # run as a script: import the tree this file is in
    sys.path.insert(0, str(ROOT))

from mesh.authz import Connection, PolicySet, evaluate  # noqa: E402
from mesh.identity import Identity  # noqa: E402
from mesh.xds.authorization import (  # noqa: E402
    Action,
    Authorization,
    Clause,
    Match,
    MatchKind,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)

TD = "cluster.local"
ROOT_NS = "istio-system"
TARGET_NS, TARGET = "shop", "web"


def _rule(**fields: object) -> Rule:
    return Rule((Clause((Match(**fields),)),))  # type: ignore[arg-type]


def _parse(*patterns: str) -> tuple[StringMatch, ...]:
    return tuple(map(StringMatch.parse, patterns))


@dataclass(frozen=True)
class Mesh:
    by_key: Mapping[str, Authorization]
    global_keys: tuple[str, ...]
    by_namespace: Mapping[str, tuple[str, ...]]
    listed: Mapping[str, tuple[str, ...]]  # "ns/workload" -> keys it lists


def build_mesh(n: int, seed: int = 1) -> Mesh:
    """N authorizations; the target workload gets a few, every other one is for someone else."""
    rng = random.Random(seed)
    policies: list[Authorization] = [
        Authorization(  # mesh-wide STRICT, as istiod converts it
            "istio_converted_static_strict",
            ROOT_NS,
            Scope.GLOBAL,
            Action.DENY,
            (_rule(not_principals=(StringMatch(MatchKind.PRESENCE),)),),
        ),
        Authorization(
            "deny-untrusted", ROOT_NS, Scope.GLOBAL, Action.DENY, (_rule(namespaces=_parse("untrusted-*")),)
        ),
        Authorization(  # the namespace's own baseline
            "allow-same-namespace",
            TARGET_NS,
            Scope.NAMESPACE,
            Action.ALLOW,
            (_rule(namespaces=_parse(TARGET_NS, "monitoring")),),
        ),
        Authorization(  # listed by shop/web
            "web-from-frontend",
            TARGET_NS,
            Scope.WORKLOAD_SELECTOR,
            Action.ALLOW,
            (
                Rule(
                    (
                        Clause(
                            (
                                Match(service_accounts=(ServiceAccountMatch("frontend", "gateway"),)),
                                Match(principals=_parse("cluster.local/ns/frontend/sa/web-*")),
                            )
                        ),
                        Clause((Match(destination_ports=(8080, 8443)),)),
                    )
                ),
            ),
        ),
        Authorization(  # listed by shop/web
            "web-no-ssh",
            TARGET_NS,
            Scope.WORKLOAD_SELECTOR,
            Action.DENY,
            (_rule(destination_ports=(22,), not_source_ips=(ipaddress.ip_network("10.99.0.0/16"),)),),
        ),
    ]
    listed: dict[str, tuple[str, ...]] = {
        f"{TARGET_NS}/{TARGET}": ("shop/web-from-frontend", "shop/web-no-ssh")
    }
    namespaces = [f"ns-{i}" for i in range(max(1, n // 20))]
    i = 0
    while len(policies) < n:
        ns = namespaces[i % len(namespaces)]
        if i < len(namespaces):
            policies.append(
                Authorization(
                    f"ns-allow-{i}", ns, Scope.NAMESPACE, Action.ALLOW, (_rule(namespaces=_parse(ns)),)
                )
            )
        else:
            workload = f"wl-{i}"
            action = Action.DENY if rng.random() < 0.2 else Action.ALLOW
            peer = rng.choice(namespaces)
            policies.append(
                Authorization(
                    f"{workload}-policy",
                    ns,
                    Scope.WORKLOAD_SELECTOR,
                    action,
                    (
                        _rule(
                            principals=_parse(f"{TD}/ns/{peer}/sa/*"),
                            destination_ports=(rng.choice((80, 8080)),),
                        ),
                    ),
                )
            )
            listed[f"{ns}/{workload}"] = (f"{ns}/{workload}-policy",)
        i += 1
    by_key = {p.key: p for p in policies[:n]}
    global_keys = tuple(sorted(k for k, p in by_key.items() if p.scope is Scope.GLOBAL))
    by_namespace: dict[str, list[str]] = {}
    for k, p in sorted(by_key.items()):
        if p.scope is Scope.NAMESPACE:
            by_namespace.setdefault(p.namespace, []).append(k)
    return Mesh(by_key, global_keys, {k: tuple(v) for k, v in by_namespace.items()}, listed)


def select(mesh: Mesh, namespace: str, workload: str) -> list[Authorization]:
    """What the node proxy will do: global + the namespace's + those the workload lists."""
    by_key = mesh.by_key
    keys: Iterable[str] = (
        *mesh.global_keys,
        *mesh.by_namespace.get(namespace, ()),
        *mesh.listed.get(f"{namespace}/{workload}", ()),
    )
    return [by_key[k] for k in keys if k in by_key]


def _time_per_call(fn: Callable[[], object], seconds: float, repeats: int) -> float:
    """Median seconds per call over ``repeats`` batches sized to take about ``seconds`` in all."""
    batch = 1
    while True:  # size a batch to ~1/repeats of the budget
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / repeats / 4 or batch >= 1 << 24:
            break
        batch *= 4
    batch = max(1, int(batch * (seconds / repeats) / max(elapsed, 1e-9)))
    samples = []
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(batch):
                fn()
            samples.append((time.perf_counter() - start) / batch)
    finally:
        gc.enable()
    return statistics.median(samples)


CASES: tuple[tuple[str, Identity | None, str, int, bool], ...] = (
    ("allowed: frontend/gateway -> :8080", Identity(TD, "frontend", "gateway"), "10.1.0.5", 8080, True),
    ("denied by DENY: plaintext (STRICT)", None, "10.1.0.6", 8080, False),
    ("denied: no ALLOW matched", Identity(TD, "ns-3", "default"), "10.1.0.7", 8080, False),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--sizes", default="10,1000,10000", help="mesh sizes (authorizations), comma-separated")
    p.add_argument("--seconds", type=float, default=1.0, help="time budget per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny budgets: keeps the harness working")
    args = p.parse_args(argv)
    seconds, repeats = (0.02, 3) if args.quick else (args.seconds, args.repeats)
    sizes = [int(s) for s in args.sizes.split(",")]

    print(f"# L4 authorization: `{' '.join(['benchmarks/authz.py', *(argv or sys.argv[1:])])}`")
    print(f"\nPython {platform.python_version()} on {platform.machine()}; median of {repeats} batches.\n")
    print("| policies | applying | case | path | decisions/s | µs/decision |")
    print("|---:|---:|---|---|---:|---:|")
    conn_cost = 0.0
    for n in sizes:
        mesh = build_mesh(n)
        applying = select(mesh, TARGET_NS, TARGET)
        policy_set = PolicySet(applying)
        for label, identity, src, port, expect in CASES:
            conn = Connection.of(identity, src, "10.2.0.1", port)
            decision = evaluate(select(mesh, TARGET_NS, TARGET), conn)
            if decision.allow is not expect:  # the mesh is wrong, not the engine: say so and go on
                print(f"<!-- unexpected decision for {label!r}: {decision.reason} -->")

            def full(conn: Connection = conn, mesh: Mesh = mesh) -> object:
                return evaluate(select(mesh, TARGET_NS, TARGET), conn)

            def cached(conn: Connection = conn, ps: PolicySet = policy_set) -> object:
                return ps.evaluate(conn)

            for path, fn in (("select+evaluate", full), ("PolicySet", cached)):
                t = _time_per_call(fn, seconds, repeats)
                print(f"| {n:,} | {len(applying)} | {label} | {path} | {1 / t:,.0f} | {t * 1e6:.2f} |")
        conn_cost = _time_per_call(
            lambda: Connection.of(Identity(TD, "frontend", "gateway"), "10.1.0.5", "10.2.0.1", 8080),
            seconds,
            repeats,
        )
    print(f"\nBuilding a Connection from strings (once per connection): {conn_cost * 1e6:.2f} µs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
