"""``ambientctl mesh``: local mode for your own Kubernetes YAML (docs/local-mode.md).

``mesh up -f FILE``            build the file's Nodes and Pods as network namespaces, start the
                               control plane, a cni agent and ztunnel per node, the waypoint
                               supervisor and the pods' commands; return once ready, leave it up
``mesh apply -f FILE``         add or replace objects (pods built, rebuilt or torn down to match)
``mesh get pods|services|policies|waypoints [-o json|yaml]``
``mesh exec NS/POD -- CMD``    CMD in the pod's netns as the pod's user; its exit status
``mesh logs NS/POD|ztunnel/NODE|cni/NODE|controlplane|supervisor [-f]``
``mesh down``                  remove everything the mesh made

Every command but ``up`` finds the running mesh itself (``--run ID`` when several run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
REQUIRED_TOOLS = {"ip": "iproute2", "nft": "nftables", "nsenter": "util-linux"}
KINDS = ("pods", "services", "policies", "waypoints")
ALIASES = {"pod": "pods", "po": "pods", "service": "services", "svc": "services", "policy": "policies",
           "waypoint": "waypoints", "wp": "waypoints"}  # fmt: skip
POLICY_KINDS = ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication")


class UsageError(Exception):
    pass


def say(msg: str) -> None:
    print(msg, flush=True)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "mesh", help="a local mesh from your own Kubernetes YAML (up, apply, get, exec, logs, down)"
    )
    ms = p.add_subparsers(dest="mesh_command", required=True, metavar="SUBCOMMAND")

    def sp(name: str, help: str) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = ms.add_parser(name, help=help)
        if name != "up":
            q.add_argument("--run", metavar="ID", help="which local mesh, when several run")
        return q

    q = sp("up", "build and start a local mesh from FILE; returns when it is ready, leaves it running")
    q.add_argument("-f", "--filename", required=True, type=Path, help="multi-document Kubernetes YAML")
    q.set_defaults(func=cmd_up)
    q = sp("apply", "add or replace the objects of FILE in the running mesh")
    q.add_argument("-f", "--filename", required=True, type=Path)
    q.add_argument("--prune", action="store_true",
                   help="FILE is the whole mesh: objects not in it are deleted (their pods torn down)")  # fmt: skip
    q.set_defaults(func=cmd_apply, delete=False)
    q = sp("delete", "delete the objects of FILE from the running mesh (their pods torn down)")
    q.add_argument("-f", "--filename", required=True, type=Path)
    q.set_defaults(func=cmd_apply, delete=True, prune=False)
    q = sp("get", "list pods, services, policies or waypoints")
    q.add_argument("kind", help="pods | services | policies | waypoints")
    q.add_argument("-o", "--output", choices=("json", "yaml"), default=None)
    q.set_defaults(func=cmd_get)
    q = sp("exec", "run a command in a pod's network namespace as the pod's user (like kubectl exec)")
    q.add_argument("pod", metavar="NS/POD")
    q.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command and its arguments")
    q.set_defaults(func=cmd_exec)
    q = sp("logs", "print a log: NS/POD, ztunnel/NODE, cni/NODE, controlplane, supervisor, waypoint/NS/NAME")
    q.add_argument("target")
    q.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended")
    q.add_argument("--tail", type=int, default=-1, help="only the last N lines")
    q.set_defaults(func=cmd_logs)
    q = sp(
        "down", "remove the mesh: processes, network namespaces (with their links and nft tables), run dir"
    )
    q.add_argument("--all", action="store_true", help="every local mesh `mesh up` made")
    q.set_defaults(func=cmd_down)


def preflight() -> str | None:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        pkgs = " ".join(sorted({REQUIRED_TOOLS[t] for t in missing}))
        return f"missing tool(s): {', '.join(missing)} (apt-get install -y {pkgs})"
    if os.geteuid() != 0:
        return "a local mesh builds network namespaces, links and nftables rules: run it as root"
    return None


def _run(args: argparse.Namespace, body: Any) -> int:
    from sources.convert import ConfigError

    try:
        rc: int = body(args)
        return rc
    except UsageError as e:
        print(f"ambientctl mesh {args.mesh_command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as e:
        print(f"ambientctl mesh {args.mesh_command}: {e}", file=sys.stderr)
        return EXIT_FAIL


def cmd_up(args: argparse.Namespace) -> int:
    return _run(args, _up)


def cmd_apply(args: argparse.Namespace) -> int:
    return _run(args, _apply)


def cmd_get(args: argparse.Namespace) -> int:
    return _run(args, _get)


def cmd_exec(args: argparse.Namespace) -> int:
    return _run(args, _exec)


def cmd_logs(args: argparse.Namespace) -> int:
    return _run(args, _logs)


def cmd_down(args: argparse.Namespace) -> int:
    return _run(args, _down)


# -- finding the mesh ------------------------------------------------------------------------------


def _runs() -> list[Any]:
    from ambientctl.localmesh.state import RunState, list_runs
    from ambientctl.localmesh.usermesh import KIND

    out = []
    for path in list_runs():
        try:
            st = RunState.load(path)
        except (OSError, ValueError, TypeError):
            continue
        if st.info.get("kind") == KIND:
            out.append(st)
    return out


def _live(st: Any) -> bool:
    from ambientctl.localmesh.state import proc_starttime

    return any(proc_starttime(r.pid) == r.starttime and r.starttime for r in st.procs)


def find_run(run: str | None) -> Any:
    """The one running mesh (or run ``run``): its RunState."""
    from ambientctl.localmesh.state import RUNS_ROOT

    runs = _runs()
    if run is not None:
        for st in runs:
            if st.run_id == run:
                return st
        raise UsageError(
            f"--run {run}: no such local mesh under {RUNS_ROOT} (runs: {', '.join(s.run_id for s in runs) or 'none'})"
        )
    live = [st for st in runs if _live(st)]
    if len(live) == 1:
        return live[0]
    if not live:
        raise UsageError(
            f"no local mesh is running under {RUNS_ROOT} (start one with `ambientctl mesh up -f FILE`)"
        )
    raise UsageError(
        f"{len(live)} local meshes are running; pick one with --run ID: "
        + ", ".join(st.run_id for st in live)
    )


def _load(args: argparse.Namespace) -> Any:
    from ambientctl.localmesh.usermesh import UserMesh

    return UserMesh.load(find_run(args.run), lambda _m: None)


# -- up / apply / down -----------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"-f {path}: {getattr(e, 'strerror', None) or e}") from None


def _up(args: argparse.Namespace) -> int:
    from ambientctl.demo import _teardown
    from ambientctl.localmesh.mesh import DemoError
    from ambientctl.localmesh.procs import ProcError
    from ambientctl.localmesh.state import RunState
    from ambientctl.localmesh.topology import TopologyError
    from ambientctl.localmesh.userfile import plan
    from ambientctl.localmesh.usermesh import KIND, UserMesh, locked

    problem = preflight()
    if problem:
        raise UsageError(problem)
    source = str(args.filename)
    p = plan(_read(args.filename), source)  # nothing is built for a bad file
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    st = RunState.create()
    st.info["kind"] = KIND
    st.save()
    say(f"== local mesh {st.run_id}: {len(p.nodes)} node(s), {len(p.pods)} pod(s) from {source} ==")
    ok = False
    try:
        with locked(st.path):
            mesh = UserMesh(st, say, p)
            mesh.up(str(args.filename.resolve()))
        ok = True
    except Interrupted as e:
        say(f"\ninterrupted ({e}): tearing down")
        rc = 130
    except (DemoError, ProcError, TopologyError, OSError) as e:
        say(f"\nFAILED: {e}")
        rc = EXIT_FAIL
    finally:
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        try:
            if not ok:
                say("tearing down what was made")
                for err in _teardown(st):
                    say(f"  warning: {err}")
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    if not ok:
        return rc
    say("")
    say(f"local mesh {st.run_id} is up (state in {st.run_dir}). Next:")
    say("  ambientctl mesh get pods            ambientctl mesh exec NS/POD -- CMD")
    say("  ambientctl mesh apply -f FILE       ambientctl mesh logs NS/POD|ztunnel/NODE|controlplane")
    say("  ambientctl mesh down")
    return EXIT_OK


def _remap(e: Any, origin: Sequence[tuple[str, int]]) -> Any:
    """A ConfigError about the merged file, told about the document it came from."""
    from sources.convert import ConfigError

    if not isinstance(e, ConfigError) or e.document_index is None or e.document_index >= len(origin):
        return e
    source, index = origin[e.document_index]
    return ConfigError(e.reason, field=e.field, kind=e.kind, name=e.name, document_index=index, source=source)


def _apply(args: argparse.Namespace) -> int:
    from ambientctl.localmesh.procs import ProcError
    from ambientctl.localmesh.topology import TopologyError
    from ambientctl.localmesh.userfile import doc_key, load_documents, merge, plan, render
    from ambientctl.localmesh.usermesh import locked
    from sources.convert import ConfigError

    source = str(args.filename)
    text = _read(args.filename)
    new_docs = load_documents(text, source)
    st = find_run(args.run)
    with locked(st.path):
        mesh = _load(args)
        mesh.say = say
        current = [dict(d) for d in mesh.plan.documents]
        if args.delete:
            named = {doc_key(d) for d in new_docs}
            merged = [d for d in current if doc_key(d) not in named]
            for k in sorted(named - {doc_key(d) for d in current}):
                say(f"{k[0].lower()}/{k[2]}{' -n ' + k[1] if k[1] else ''}: not in the mesh")
        else:
            merged = merge([] if args.prune else current, new_docs)
        mine = {doc_key(d): i for i, d in enumerate(new_docs)}
        origin = [
            (source, mine[doc_key(d)]) if doc_key(d) in mine else (mesh.config.name, i)
            for i, d in enumerate(merged)
        ]
        try:  # the mesh's file with FILE's objects in, checked whole; errors name FILE's documents
            new = plan(render(merged), f"{mesh.config.name} + {source}", previous=mesh.plan)
        except ConfigError as e:
            raise _remap(e, origin) from None
        before, after = {doc_key(c) for c in current}, {doc_key(d) for d in merged}
        for kind, ns, name in [*map(doc_key, [] if args.delete else new_docs), *sorted(before - after)]:
            verb = (
                "deleted"
                if (kind, ns, name) not in after
                else "configured"
                if (kind, ns, name) in before
                else "created"
            )
            say(f"{kind.lower()}/{name}{' -n ' + ns if ns else ''} {verb}")
        try:
            what = mesh.apply(new)
        except (ProcError, TopologyError, OSError) as e:
            say(f"FAILED: {e}")
            return EXIT_FAIL
    for verb in ("created", "replaced", "deleted"):
        for key in what[verb]:
            say(f"pod {key}: {verb}")
    return EXIT_OK


def _down(args: argparse.Namespace) -> int:
    from ambientctl.demo import _teardown

    if preflight():
        raise UsageError(str(preflight()))
    if args.all:
        runs = _runs()
    elif args.run is not None:
        runs = [find_run(args.run)]
    else:
        runs = _runs()
        if len(runs) > 1:
            live = [st for st in runs if _live(st)]
            if len(live) > 1:
                raise UsageError(
                    "several local meshes: pick one with --run ID, or --all: "
                    + ", ".join(s.run_id for s in runs)
                )
            runs = live or runs  # the live one; without one, every leftover
    if not runs:
        say("no local mesh is running")
        return EXIT_OK
    rc = EXIT_OK
    for st in runs:
        say(f"removing local mesh {st.run_id} ({len(st.procs)} processes, {len(st.netns)} netns)")
        for err in _teardown(st):
            say(f"  warning: {err}")
            rc = EXIT_FAIL
    say("done: nothing of it is left")
    return rc


# -- exec / logs -----------------------------------------------------------------------------------


def _exec(args: argparse.Namespace) -> int:
    from ambientctl.localmesh.userfile import environment
    from ambientctl.localmesh.usermesh import user_argv

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command: ambientctl mesh exec NS/POD -- CMD [ARGS...]")
    mesh = _load(args)
    pod = mesh.plan.pod(args.pod)
    if pod is None or args.pod not in mesh.pods:
        raise UsageError(
            f"{args.pod}: no such pod (pods: {', '.join(p.key for p in mesh.plan.pods) or 'none'})"
        )
    uid, gid = pod.user
    c = pod.containers[0] if pod.containers else None
    env = environment(pod, c) if c is not None else {"PATH": os.environ.get("PATH", ""), "HOME": "/"}
    argv = user_argv(mesh.pods[args.pod].netns_path, uid, gid, cmd)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)


def log_path(run_dir: Path, target: str, nodes: Sequence[str]) -> Path:
    from ambientctl.localmesh.usermesh import pod_log

    logs = run_dir / "logs"
    if target in ("controlplane", "supervisor"):
        return logs / f"{target}.log"
    head, _, rest = target.partition("/")
    if head in ("ztunnel", "cni") and rest:
        if rest not in nodes:
            raise UsageError(f"{target}: no node {rest!r} (nodes: {', '.join(nodes)})")
        return logs / f"{head}-{rest}.log"
    if head == "waypoint" and rest.count("/") == 1:
        return logs / f"waypoint-{rest.replace('/', '-')}.log"
    if rest and "/" not in rest:
        return pod_log(run_dir, target)
    raise UsageError(
        f"{target}: want NS/POD, ztunnel/NODE, cni/NODE, controlplane, supervisor or waypoint/NS/NAME"
    )


def _logs(args: argparse.Namespace) -> int:
    from ambientctl.localmesh.procs import pause

    mesh = _load(args)
    head = args.target.partition("/")[0]
    if (
        head not in ("ztunnel", "cni", "waypoint", "controlplane", "supervisor")
        and mesh.plan.pod(args.target) is None
    ):
        raise UsageError(
            f"{args.target}: no such pod (pods: {', '.join(p.key for p in mesh.plan.pods) or 'none'})"
        )
    path = log_path(mesh.state.path, args.target, list(mesh.nodes))
    if not path.is_file():
        raise UsageError(f"{args.target}: no log yet ({path})")
    with open(path, "rb") as f:
        data = f.read()
        if args.tail >= 0:
            data = b"".join(data.splitlines(keepends=True)[-args.tail :]) if args.tail else b""
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        if not args.follow:
            return EXIT_OK
        try:
            while mesh.state.path.is_dir():
                chunk = f.read()
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                else:
                    pause(0.2)
        except KeyboardInterrupt:
            pass
    return EXIT_OK


# -- get -------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        say("   ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip())


def _meta(d: dict[str, Any]) -> tuple[str, str]:
    m = d.get("metadata") or {}
    return str(m.get("namespace") or "default"), str(m.get("name", ""))


def _targets(d: dict[str, Any]) -> str:
    spec = d.get("spec") or {}
    refs = spec.get("targetRefs") or ([spec["targetRef"]] if spec.get("targetRef") else [])
    if refs:
        return ",".join(f"{r.get('kind')}/{r.get('name')}" for r in refs if isinstance(r, dict))
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    if labels:
        return ",".join(f"{k}={v}" for k, v in labels.items())
    return "(namespace)"


def _get(args: argparse.Namespace) -> int:
    from ambientctl.localmesh import supervisor

    kind = ALIASES.get(args.kind, args.kind)
    if kind not in KINDS:
        raise UsageError(f"{args.kind}: unknown kind (want {', '.join(KINDS)})")
    mesh = _load(args)
    docs = [dict(d) for d in mesh.plan.documents]
    items: list[dict[str, Any]] = []
    rows: list[list[str]] = []
    if kind == "pods":
        header = ["NAMESPACE", "NAME", "READY", "STATUS", "IP", "NODE", "MESH"]
        for p in mesh.plan.pods:
            alive, want = mesh.pod_running(p)
            if not mesh.netns_exists(p.key):
                status = "Missing"
            elif not want:
                status = "Sandbox"
            else:
                status = "Running" if alive == want else "Exited"
            enrolled = "ambient" if p.enrolled else "-"
            rows.append([p.namespace, p.name, f"{alive}/{want}", status, p.ip, p.node, enrolled])
            doc = next(d for d in docs if d.get("kind") == "Pod" and _meta(d) == (p.namespace, p.name))
            doc["status"] = {**(doc.get("status") or {}), "phase": status, "podIP": p.ip,
                             "containersReady": f"{alive}/{want}", "ambient": p.enrolled,
                             "netns": mesh.pods[p.key].netns if p.key in mesh.pods else None}  # fmt: skip
            items.append(doc)
    elif kind == "services":
        header = ["NAMESPACE", "NAME", "CLUSTER-IP", "PORT(S)", "WAYPOINT"]
        for d in docs:
            if d.get("kind") != "Service":
                continue
            ns, name = _meta(d)
            spec = d.get("spec") or {}
            ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or [])
            labels = (d.get("metadata") or {}).get("labels") or {}
            rows.append([ns, name, str(spec.get("clusterIP") or "None"), ports or "<none>",
                         str(labels.get("istio.io/use-waypoint", "-"))])  # fmt: skip
            items.append(d)
    elif kind == "policies":
        header = ["NAMESPACE", "NAME", "KIND", "ACTION", "TARGETS"]
        for d in docs:
            if d.get("kind") not in POLICY_KINDS:
                continue
            ns, name = _meta(d)
            spec = d.get("spec") or {}
            if d["kind"] == "AuthorizationPolicy":
                action = str(spec.get("action", "ALLOW"))
            elif d["kind"] == "PeerAuthentication":
                action = f"mtls {(spec.get('mtls') or {}).get('mode', 'UNSET')}"
            else:
                action = "-"
            rows.append([ns, name, str(d["kind"]), action, _targets(d)])
            items.append(d)
    else:
        header = ["NAMESPACE", "NAME", "NODE", "IP", "STATUS", "RESTARTS"]
        running = supervisor.read_status(mesh.state.path).get("waypoints") or {}
        for d in docs:
            if (
                d.get("kind") != "Gateway"
                or (d.get("spec") or {}).get("gatewayClassName") != "istio-waypoint"
            ):
                continue
            ns, name = _meta(d)
            wp = running.get(f"{ns}/{name}") or {}
            rows.append([ns, name, str(wp.get("node", "-")), str(wp.get("ip", "-")),
                         str(wp.get("phase", "not running")), str(wp.get("restarts", 0))])  # fmt: skip
            items.append({**d, "status": {"local": wp}})
    if args.output in ("json", "yaml"):
        doc = {"apiVersion": "v1", "kind": "List", "items": items}
        say(
            json.dumps(doc, indent=2)
            if args.output == "json"
            else yaml.safe_dump(doc, sort_keys=False).rstrip()
        )
    elif not rows:
        say(f"No {kind} found.")
    else:
        _table(header, rows)
    return EXIT_OK
