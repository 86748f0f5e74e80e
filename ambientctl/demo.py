"""``ambientctl demo``: a whole mesh on this machine, in network namespaces (see docs/local-mode.md).

``ambientctl demo``            build, send traffic, report, tear down (exit 0 only if all holds)
``ambientctl demo --keep``     same, but leave the mesh running and say how to look at it
``ambientctl demo down``       remove every mesh a ``--keep`` run left
``ambientctl demo --loopback`` the small no-root variant: one HBONE tunnel on loopback
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from types import FrameType
from typing import Any

EXIT_USAGE = 2
REQUIRED_TOOLS = {"ip": "iproute2", "nft": "nftables", "tcpdump": "tcpdump", "nsenter": "util-linux"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a small mesh on this machine and show what happened")
    p.add_argument("action", nargs="?", choices=("up", "down"), default="up",
                   help="up (default): run the demo; down: remove meshes left by --keep")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="leave the mesh running afterwards")
    p.add_argument("--loopback", action="store_true", help="no root needed: one HBONE tunnel on loopback")
    p.add_argument(
        "--connections", type=int, default=5, help="--loopback: TCP connections to make (default 5)"
    )
    p.set_defaults(func=cmd_demo)


def say(msg: str) -> None:
    print(msg, flush=True)


def preflight() -> str | None:
    """Why the demo cannot run here, or None."""
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        pkgs = " ".join(sorted({REQUIRED_TOOLS[t] for t in missing}))
        return (
            f"missing tool(s): {', '.join(missing)}. Install them (apt-get install -y {pkgs}) "
            "or run `bash scripts/dev.sh demo`, which installs them."
        )
    if os.geteuid() != 0:
        return (
            "the demo builds network namespaces, links and nftables rules: run it as root "
            "(sudo .venv/bin/ambientctl demo), or try `ambientctl demo --loopback`, which needs no root."
        )
    return None


class Interrupted(Exception):
    pass


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.loopback:
        if args.connections < 1:
            print("ambientctl demo: --connections must be at least 1", file=sys.stderr)
            return EXIT_USAGE
        from ambientctl.localmesh.loopback import run_demo
        from mesh import runtime

        return runtime.run(lambda: run_demo(args.connections))
    problem = preflight()
    if problem:
        print(f"ambientctl demo: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "down":
        return down()
    return up(keep=args.keep)


def down() -> int:
    from ambientctl.localmesh.state import RunState, list_runs

    runs = list_runs()
    if not runs:
        say("no local mesh is running")
        return 0
    rc = 0
    for path in runs:
        st = RunState.load(path)
        say(f"removing local mesh {st.run_id} ({len(st.procs)} processes, {len(st.netns)} netns)")
        for err in _teardown(st):
            say(f"  warning: {err}")
            rc = 1
    say("done: nothing of the demo is left")
    return rc


def _teardown(st: Any) -> list[str]:
    """The waypoint supervisor first (it stops its waypoints and deletes their netns), then the rest."""
    from ambientctl.localmesh import supervisor
    from ambientctl.localmesh.state import teardown

    errors = supervisor.teardown(st)
    return errors + teardown(st)


def up(*, keep: bool) -> int:
    from ambientctl.localmesh import report
    from ambientctl.localmesh.mesh import DemoError, LocalMesh
    from ambientctl.localmesh.policyact import PolicyAct
    from ambientctl.localmesh.procs import ProcError
    from ambientctl.localmesh.state import RunState
    from ambientctl.localmesh.topology import TopologyError
    from ambientctl.localmesh.waypointact import WaypointAct

    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    st = RunState.create()
    say(f"== ambient mesh demo: 2 nodes, 2 namespaces, 4 pods in network namespaces (run {st.run_id}) ==")
    rc = 1
    kept = False
    try:
        mesh = LocalMesh(st, say)
        mesh.build()
        res = mesh.run_traffic()
        mesh.step("reading the capture, ztunnel access logs and config_dump")
        verdict = report.build(res)
        for line in verdict.lines:
            say(line)
        failures = list(verdict.failures)
        acts = {"traffic": "ok" if not failures else f"{len(failures)} failed"}
        if failures:
            say(
                "\n(the policy and waypoint acts are skipped: the mesh did not behave as expected without policies)"
            )
        else:
            for act in (PolicyAct(mesh, say), WaypointAct(mesh, say)):
                failed = act.run()
                acts[type(act).__name__.removesuffix("Act").lower()] = (
                    "ok" if not failed else f"{len(failed)} failed"
                )
                failures += failed
        say("")
        say("Acts: " + "; ".join(f"{name} act {how}" for name, how in acts.items()))
        for line in report.result(failures):
            say(line)
        rc = 0 if not failures else 1
        if keep:
            _print_keep(mesh)
            kept = True
    except Interrupted as e:
        say(f"\ninterrupted ({e}): tearing down")
        rc = 130
    except (DemoError, ProcError, TopologyError, OSError) as e:
        say(f"\nFAILED: {e}")
        rc = 1
    finally:
        # No second Ctrl-C may stop the teardown half way.
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        try:
            if kept:
                if "mesh" in locals() and mesh.capture is not None:
                    mesh.capture.stop()
            else:
                if "mesh" in locals() and mesh.capture is not None:
                    mesh.capture.stop()
                say("tearing down: processes, network namespaces (with their links, nft tables, ip rules)")
                errors = _teardown(st)
                for err in errors:
                    say(f"  warning: {err}")
                say("torn down: nothing left behind" if not errors else "teardown had problems (see above)")
                if errors and rc == 0:
                    rc = 1
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return rc


def _print_keep(mesh: Any) -> None:
    say("")
    say(f"The mesh keeps running (state in {mesh.state.run_dir}). To look around:")
    for key, net in mesh.pods.items():
        say(f"  enter pod {key:14} ip netns exec {net.netns} bash")
    some = mesh.pods["shop/frontend"]
    say(
        f"  a request:              ip netns exec {some.netns} curl -s http://10.96.0.20/  (or python -m ambientctl.localmesh.app get URL)"
    )
    for name, np in mesh.nodes.items():
        say(f"  {name} ztunnel config:   curl -s http://127.0.0.1:{np.admin}/config_dump")
        say(f"  {name} ztunnel metrics:  curl -s http://127.0.0.1:{np.stats}/metrics | grep istio_tcp")
    say(f"  logs:                   ls {mesh.state.run_dir}/logs/")
    if mesh.policies:
        say(f"  objects added:          {', '.join(p.key for p in mesh.policies)} (in {mesh.config})")
        if any(p.key == "shop/web-deny-post-admin" for p in mesh.policies):
            say(
                "                          shop/web: STRICT; at L4 only frontend and the waypoint may connect;"
            )
            say("                          its waypoint refuses POST /admin: edit the file")
        else:
            say(
                "                          shop/web now refuses frontend and cart, and plaintext: edit the file"
            )
        say(
            "                          (delete a policy's document) and the control plane applies it within a second"
        )
        args = " ".join(
            f"--metrics http://127.0.0.1:{np.stats}/metrics --admin 127.0.0.1:{np.admin} "
            f"--access-log {mesh.ztunnel_log(name)}"
            for name, np in mesh.nodes.items()
        )
        say(f"  mTLS report:            ambientctl policy mtls-report {args}")
    for key, wp in mesh.waypoints().items():
        say(
            f"  waypoint {key}: {wp.get('phase')} on {wp.get('node')} {wp.get('ip')} (netns {wp.get('netns')})"
        )
        say(f"    config:               curl -s http://127.0.0.1:{wp.get('admin_port')}/config_dump")
        say(
            f"    metrics:              curl -s http://127.0.0.1:{wp.get('stats_port')}/metrics | grep istio_requests"
        )
        say(f"    access log:           {wp.get('log')}")
    say(
        f"  waypoints:              the supervisor ({mesh.state.run_dir}/logs/supervisor.log) runs every waypoint "
        "Gateway in the file:"
    )
    say("                          add one and it starts within seconds, delete its document and it stops")
    say("Remove it with: ambientctl demo down")
