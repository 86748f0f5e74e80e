"""``ambientctl ztunnel-config`` (alias ``zc``): what one ztunnel holds, as ``istioctl ztunnel-config``.

Istio users debug ambient with ``istioctl ztunnel-config workload|service|policy|certificate|
connections|log|all``; the same verbs, columns (``pkg/writer/ztunnel/configdump``), filters and
``-o short|json|yaml`` work here, read from a ztunnel's admin port (``/config_dump``,
``/logging``):

- ``--admin ADDR``: any ztunnel's admin address (``host:port`` or a URL), e.g. a port-forward;
- ``--node NAME``: that node's ztunnel in the running local mesh (``ambientctl mesh up`` or ``demo --keep``);
- ``-f FILE``: a saved config dump (``-`` = stdin);
- nothing: the running local mesh, found under ``/run/ambient-demo`` — any node's ztunnel for
  what every node holds alike (workloads, services, policies), the only node's for what is per
  node (certificates, connections), every node's for ``log``.

The JSON forms are our ``/config_dump``'s (field names of Istio's protos, :mod:`mesh.xds.dump`),
filtered; ``all -o json`` is the whole dump. Exit status: 0 done, 1 the ztunnel could not be read
(unreachable, not a config dump), 2 bad input (a flag, a node, no or several local meshes) — the
message names the flag or object.

Decide-then-do: finding ztunnels (:func:`local_meshes`) and fetching are the only I/O; every
``*_rows``/``render_*`` function is a pure function of a dump.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ambientctl.localmesh.state import RUNS_ROOT, RunState, list_runs, proc_starttime

PROG = "ambientctl ztunnel-config"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
OUTPUTS = ("short", "json", "yaml")
LEVELS = ("debug", "info", "warning", "error")
LEVEL_ALIASES = {"warn": "warning"}
ZTUNNEL_PROC_PREFIX = "ztunnel-"
CONTROLPLANE_PROC = "controlplane"

JSON = dict[str, Any]


class UsageError(Exception):
    """Bad input the user must fix (exit 2); the message names the flag or object."""


class FetchError(Exception):
    """A ztunnel could not be read (exit 1); the message names where from."""


# --- finding the running local mesh ------------------------------------------------------------


@dataclass(frozen=True)
class ZtunnelRef:
    """Where one ztunnel answers. ``node`` is None for an address given as is (``--admin``)."""

    admin: str  # host:port or a URL; "" when not known (its process is gone)
    node: str | None = None
    readiness: str | None = None  # host:port of /healthz/ready, when known
    pid: int | None = None
    running: bool | None = None  # its process is alive (local mesh); None: not known

    @property
    def label(self) -> str:
        return self.node or self.admin

    @property
    def origin(self) -> str:
        """How the user named it, for messages: ``--node node-a (admin http://…)``."""
        if self.node is None:
            return f"--admin {self.admin}"
        if not self.admin:
            return f"--node {self.node}"
        return f"--node {self.node} (ztunnel admin {admin_base(self.admin)})"


@dataclass(frozen=True)
class LocalMesh:
    """A local mesh run (``ambientctl mesh up`` or ``demo --keep``) as its run directory records it."""

    run_id: str
    run_dir: Path
    ztunnels: Mapping[str, ZtunnelRef]  # node -> its ztunnel
    controlplane: str | None = None  # host:port of CA + discovery
    controlplane_running: bool | None = None
    config: Path | None = None  # the local-mode YAML the control plane reads
    running: bool = False  # any of its processes alive

    def describe(self) -> str:
        nodes = ", ".join(sorted(self.ztunnels)) or "no ztunnel"
        return f"{self.run_id} ({self.run_dir}; nodes: {nodes})"


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _flag(argv: Sequence[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _addr(value: object) -> str | None:
    """``info`` may record a port (``40123``) or an address (``127.0.0.1:40123``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"127.0.0.1:{value}"
    if isinstance(value, str) and value:
        return value if ":" in value else f"127.0.0.1:{value}"
    return None


def load_local_mesh(st: RunState) -> LocalMesh:
    """What a run directory says about its ztunnels and control plane.

    A run records each process (name, pid, start time); a ztunnel process is ``ztunnel-<node>``
    and its ports are on its command line. A run may also say it outright in ``info``:
    ``{"ztunnels": {node: {"admin": port|addr, "readiness": port|addr}}, "controlplane": addr,
    "config": path}`` — that wins.
    """
    info = st.info if isinstance(st.info, dict) else {}
    alive: dict[str, tuple[int, bool]] = {}
    for rec in st.procs:  # the last record of a name is its current process (restarts append)
        alive[rec.name] = (rec.pid, proc_starttime(rec.pid) == rec.starttime and bool(rec.starttime))
    ztunnels: dict[str, ZtunnelRef] = {}
    for name, (pid, running) in alive.items():
        if not name.startswith(ZTUNNEL_PROC_PREFIX):
            continue
        argv = _cmdline(pid) if running else []
        node = _flag(argv, "--node-name") or name.removeprefix(ZTUNNEL_PROC_PREFIX)
        admin, ready = _flag(argv, "--admin-port"), _flag(argv, "--readiness-port")
        ztunnels[node] = ZtunnelRef(
            admin=f"127.0.0.1:{admin or 15000}" if running else "",
            node=node,
            readiness=f"127.0.0.1:{ready}" if ready else None,
            pid=pid,
            running=running,
        )
    recorded = info.get("ztunnels")
    if isinstance(recorded, dict):
        for node, where in recorded.items():
            if not isinstance(where, dict):
                continue
            admin = _addr(where.get("admin"))
            if admin is None:
                continue
            old = ztunnels.get(str(node))
            ztunnels[str(node)] = ZtunnelRef(
                admin=admin,
                node=str(node),
                readiness=_addr(where.get("readiness")) or (old.readiness if old else None),
                pid=old.pid if old else None,
                running=old.running if old else None,
            )
    cp_pid, cp_running = alive.get(CONTROLPLANE_PROC, (0, False))
    controlplane = _addr(info.get("controlplane"))
    if controlplane is None:
        try:
            controlplane = (st.path / "controlplane.ready").read_text().strip() or None
        except OSError:
            controlplane = None
    config: Path | None = None
    if isinstance(info.get("config"), str):
        config = Path(str(info["config"]))
    else:
        given = _flag(_cmdline(cp_pid), "--local-config") if cp_running else None
        if given:
            config = Path(given)
        elif (st.path / "mesh.yaml").is_file():
            config = st.path / "mesh.yaml"
    return LocalMesh(
        run_id=st.run_id,
        run_dir=st.path,
        ztunnels=dict(sorted(ztunnels.items())),
        controlplane=controlplane,
        controlplane_running=cp_running if CONTROLPLANE_PROC in alive else None,
        config=config,
        running=any(r for _, r in alive.values()),
    )


def local_meshes(root: Path = RUNS_ROOT) -> list[LocalMesh]:
    out = []
    for path in list_runs(root):
        try:
            st = RunState.load(path)
        except (OSError, ValueError, TypeError):
            continue  # half-written by a run starting now: not one to talk to yet
        out.append(load_local_mesh(st))
    return out


def find_local_mesh(run: str | None, root: Path = RUNS_ROOT) -> LocalMesh:
    """The one running local mesh (or run ``run``); UsageError listing the runs otherwise."""
    runs = local_meshes(root)
    if run is not None:
        for m in runs:
            if m.run_id == run:
                return m
        known = ", ".join(m.run_id for m in runs) or "none"
        raise UsageError(f"--run {run}: no such local mesh under {root} (runs: {known})")
    live = [m for m in runs if m.running]
    if len(live) == 1:
        return live[0]
    if not live:
        stale = "".join(
            f"\n  {m.describe()}: no process left (ambientctl demo down removes it)" for m in runs
        )
        raise UsageError(
            f"no local mesh is running under {root} (start one with `ambientctl mesh up -f FILE` or `ambientctl demo --keep`), "
            f"or give --admin ADDR{stale}"
        )
    listing = "".join(f"\n  {m.describe()}" for m in live)
    raise UsageError(f"{len(live)} local meshes are running; pick one with --run ID:{listing}")


def node_ztunnel(mesh: LocalMesh, node: str) -> ZtunnelRef:
    ref = mesh.ztunnels.get(node)
    if ref is None:
        nodes = ", ".join(mesh.ztunnels) or "none"
        raise UsageError(f"--node {node}: no such node in local mesh {mesh.run_id} (nodes: {nodes})")
    return ref


# --- fetching ----------------------------------------------------------------------------------


def admin_base(addr: str) -> str:
    url = addr if "://" in addr else f"http://{addr}"
    scheme_end = url.index("://") + 3
    slash = url.find("/", scheme_end)
    return url if slash < 0 else url[:slash]


def http(url: str, origin: str, timeout: float, method: str = "GET") -> bytes:
    """The body of ``url``; FetchError naming ``origin`` on any failure."""
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body: bytes = r.read()
            return body
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace").strip()
        e.close()
        raise FetchError(f"{origin}: {url}: HTTP {e.code} {e.reason}{': ' + text if text else ''}") from None
    except (OSError, ValueError) as e:
        raise FetchError(f"{origin}: {url}: cannot connect: {getattr(e, 'reason', e)}") from None


def parse_dump(body: bytes | str, origin: str) -> JSON:
    try:
        dump = json.loads(body)
    except ValueError:
        raise FetchError(f"{origin}: not JSON: is this a ztunnel admin port (15000)?") from None
    if not isinstance(dump, dict) or not isinstance(dump.get("workloads"), list):
        raise FetchError(f"{origin}: not a ztunnel config_dump (no workloads list)")
    return dump


def _alive(ref: ZtunnelRef) -> None:
    if ref.running is False or not ref.admin:
        raise FetchError(f"{ref.origin}: its ztunnel process (pid {ref.pid}) is not running")


def fetch_dump(ref: ZtunnelRef, timeout: float) -> JSON:
    _alive(ref)
    return parse_dump(http(admin_base(ref.admin) + "/config_dump", ref.origin, timeout), ref.origin)


def read_dump_file(path: str) -> JSON:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise UsageError(f"--file {path}: {e.strerror or e}") from None
    try:
        return parse_dump(text, f"--file {path}")
    except FetchError as e:
        raise UsageError(str(e)) from None


# --- tables ------------------------------------------------------------------------------------


def table(header: Sequence[str], rows: Iterable[Sequence[object]], padding: int = 1) -> list[str]:
    """Columns as Go's tabwriter lays them out for istioctl: each cell but the last padded to
    its column's widest cell plus ``padding`` spaces."""
    cells = [[str(c) for c in header], *([str(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) + padding for i in range(len(header) - 1)]
    return ["".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + r[-1] for r in cells]


def _dump_list(dump: Mapping[str, Any], key: str) -> list[JSON]:
    return [x for x in dump.get(key) or () if isinstance(x, dict)]


def _rfc3339(text: object) -> str:
    if not isinstance(text, str) or not text:
        return "NA"
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return text
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _gateway_matches(gw: Mapping[str, Any], svc: Mapping[str, Any]) -> bool:
    host = gw.get("hostname")
    if isinstance(host, dict):
        return (host.get("namespace"), host.get("hostname")) == (svc.get("namespace"), svc.get("hostname"))
    addr = gw.get("address")
    return isinstance(addr, dict) and addr.get("address") in (svc.get("addresses") or ())


def waypoint_name(obj: Mapping[str, Any], services: Sequence[Mapping[str, Any]]) -> str:
    """istioctl's WAYPOINT: None without one, the waypoint service's name, NA if not found."""
    gw = obj.get("waypoint")
    if not isinstance(gw, dict):
        return "None"
    for svc in services:
        if _gateway_matches(gw, svc):
            return str(svc.get("name"))
    return "NA"


# --- workload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadFilter:
    namespace: str = ""
    address: str = ""
    node: str = ""
    name: str = ""

    def verify(self, w: Mapping[str, Any]) -> bool:
        if self.name and str(w.get("name", "")).lower() != self.name.lower():
            return False
        if self.namespace and str(w.get("namespace", "")).lower() != self.namespace.lower():
            return False
        if self.address and self.address not in (w.get("addresses") or ()):
            return False
        return not (self.node and str(w.get("node", "")).lower() != self.node.lower())


WORKLOAD_HEADER = ("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL")


def workloads(dump: Mapping[str, Any], f: WorkloadFilter) -> list[JSON]:
    found = [w for w in _dump_list(dump, "workloads") if f.verify(w)]
    return sorted(found, key=lambda w: (f"{w.get('namespace')}.{w.get('name')}", str(w.get("node"))))


def workload_rows(dump: Mapping[str, Any], f: WorkloadFilter) -> list[list[str]]:
    services = _dump_list(dump, "services")
    return [
        [
            str(w.get("namespace")),
            str(w.get("name")),
            ",".join(w.get("addresses") or ()) or "None",
            str(w.get("node") or ""),
            waypoint_name(w, services),
            "HBONE" if w.get("tunnel_protocol") == "HBONE" else "TCP",
        ]
        for w in workloads(dump, f)
    ]


# --- service -----------------------------------------------------------------------------------

SERVICE_HEADER = ("NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS")


def services(dump: Mapping[str, Any], namespace: str = "") -> list[JSON]:
    found = [
        s
        for s in _dump_list(dump, "services")
        if not namespace or str(s.get("namespace")).lower() == namespace.lower()
    ]
    return sorted(found, key=lambda s: (str(s.get("namespace")), str(s.get("name")), str(s.get("hostname"))))


def service_rows(dump: Mapping[str, Any], namespace: str = "") -> list[list[str]]:
    all_services = _dump_list(dump, "services")
    rows = []
    for s in services(dump, namespace):
        key = f"{s.get('namespace')}/{s.get('hostname')}"
        endpoints = [w for w in _dump_list(dump, "workloads") if key in (w.get("services") or {})]
        healthy = sum(1 for w in endpoints if w.get("status", "HEALTHY") == "HEALTHY")
        rows.append(
            [
                str(s.get("namespace")),
                str(s.get("name")),
                ",".join(s.get("addresses") or ()),
                waypoint_name(s, all_services),
                f"{healthy}/{len(endpoints)}",
            ]
        )
    return rows


# --- policy ------------------------------------------------------------------------------------

POLICY_HEADER = ("NAMESPACE", "POLICY NAME", "ACTION", "SCOPE")


def _camel(name: object) -> str:
    """``WORKLOAD_SELECTOR`` -> ``WorkloadSelector`` (how istioctl prints the proto enums)."""
    return "".join(part.capitalize() for part in str(name).split("_"))


def policies(dump: Mapping[str, Any], namespace: str = "") -> list[JSON]:
    found = [
        p
        for p in _dump_list(dump, "authorizations")
        if not namespace or str(p.get("namespace")).lower() == namespace.lower()
    ]
    return sorted(found, key=lambda p: (str(p.get("namespace")), str(p.get("name"))))


def policy_rows(dump: Mapping[str, Any], namespace: str = "") -> list[list[str]]:
    return [
        [
            str(p.get("namespace")),
            str(p.get("name")),
            _camel(p.get("action")) + (" (dry-run)" if p.get("dry_run") else ""),
            _camel(p.get("scope")),
        ]
        for p in policies(dump, namespace)
    ]


# --- certificate -------------------------------------------------------------------------------

CERT_HEADER = ("CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE")


def cert_status(item: Mapping[str, Any]) -> str:
    """istioctl's STATUS: Available, Initializing (first fetch running) or Unavailable (failing)."""
    if item.get("state") == "available":
        return "Available"
    return "Unavailable" if item.get("last_error") else "Initializing"


def cert_valid(cert: Mapping[str, Any], now: dt.datetime) -> bool:
    try:
        start = dt.datetime.fromisoformat(str(cert.get("not_before")))
        end = dt.datetime.fromisoformat(str(cert.get("not_after")))
    except ValueError:
        return False
    return start <= now < end


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return (a.get("serial"), a.get("subject")) == (b.get("serial"), b.get("subject"))


def cert_entries(item: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(TYPE, certificate) of one identity: the leaf, intermediates, then the roots. A chain
    that ends in the root itself (a CA that signs with its root) lists it once, as Root."""
    roots = [c for c in item.get("root_certs") or () if isinstance(c, dict)]
    chain = [c for c in item.get("cert_chain") or () if isinstance(c, dict)]
    if not chain and item.get("state") == "available":  # an older dump: only the leaf's fields
        chain = [{k: item.get(k) for k in ("serial", "not_before", "not_after")}]
    out: list[tuple[str, Mapping[str, Any]]] = []
    for i, c in enumerate(chain):
        if i > 0 and any(_same(c, r) for r in roots):
            continue
        out.append(("Leaf" if i == 0 else "Intermediate", c))
    out.extend(("Root", r) for r in roots)
    return out


def certificate_rows(dump: Mapping[str, Any], now: dt.datetime) -> list[list[str]]:
    rows = []
    for item in _dump_list(dump, "certificates"):
        status = cert_status(item)
        entries = cert_entries(item)
        if not entries:
            rows.append([str(item.get("identity")), "NA", status, "false", "NA", "NA", "NA"])
        for kind, c in entries:
            rows.append(
                [
                    str(item.get("identity")),
                    kind,
                    status,
                    str(cert_valid(c, now)).lower(),
                    str(c.get("serial") or "NA"),
                    _rfc3339(c.get("not_after")),
                    _rfc3339(c.get("not_before")),
                ]
            )
    return rows


# --- connections -------------------------------------------------------------------------------

CONNECTION_HEADER = (
    "WORKLOAD",
    "DIRECTION",
    "LOCAL",
    "REMOTE",
    "REMOTE TARGET",
    "PROTOCOL",
    "PEER IDENTITY",
    "SENT",
    "RECEIVED",
    "AGE",
)
_INBOUND = ("inbound", "inbound_passthrough")


def _pod(c: Mapping[str, Any]) -> Mapping[str, Any]:
    pod = c.get("pod")
    return pod if isinstance(pod, dict) else {}


def is_inbound(c: Mapping[str, Any]) -> bool:
    return c.get("direction") in _INBOUND


@dataclass(frozen=True)
class ConnectionFilter:
    namespace: str = ""
    direction: str = ""  # "", inbound, outbound
    workload: str = ""
    raw: bool = False

    def verify(self, c: Mapping[str, Any]) -> bool:
        pod = _pod(c)
        if self.namespace and pod.get("namespace") != self.namespace:
            return False
        if self.workload and str(pod.get("name", "")).lower() != self.workload.lower():
            return False
        if self.direction == "inbound" and not is_inbound(c):
            return False
        return not (self.direction == "outbound" and is_inbound(c))


def connections(dump: Mapping[str, Any], f: ConnectionFilter) -> list[JSON]:
    def key(c: JSON) -> tuple[str, str, int, str]:
        pod = _pod(c)
        return (
            str(pod.get("namespace", "")),
            str(pod.get("name", "")),
            0 if is_inbound(c) else 1,
            str(c.get("started")),
        )

    return sorted((c for c in _dump_list(dump, "connections") if f.verify(c)), key=key)


def _split_host(addr: str) -> tuple[str, str | None]:
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if addr.count(":") == 1:
        host, port = addr.split(":")
        return host, port
    return addr, None


def name_lookup(dump: Mapping[str, Any], raw: bool) -> Callable[[str], str]:
    """istioctl's: an address shown by the service (hostname) or workload (name.namespace) it is."""
    names: dict[str, str] = {}
    for w in _dump_list(dump, "workloads"):
        for ip in (w.get("addresses") or ())[:1]:
            names[ip] = f"{w.get('name')}.{w.get('namespace')}"
    for s in _dump_list(dump, "services"):
        for ip in (s.get("addresses") or ())[:1]:
            names[ip] = str(s.get("hostname"))

    def lookup(addr: str) -> str:
        if raw or not addr:
            return addr
        host, port = _split_host(addr)
        name = names.get(host)
        if name is None:
            return addr
        return f"{name}:{port}" if port is not None else name

    return lookup


def human_bytes(n: object) -> str:
    if not isinstance(n, int):
        return "0B"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"


def human_duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def connection_rows(dump: Mapping[str, Any], f: ConnectionFilter) -> list[list[str]]:
    lookup = name_lookup(dump, f.raw)
    rows = []
    for c in connections(dump, f):
        pod = _pod(c)
        name = f"{pod.get('name')}.{pod.get('namespace')}" if pod else "unknown"
        src, actual, original = (
            str(c.get("src", "")),
            str(c.get("actual_dst", "")),
            str(c.get("original_dst", "")),
        )
        if is_inbound(c):
            direction, local, remote = "Inbound", lookup(actual), lookup(src)
            target = str(c.get("service") or "")
            peer = c.get("src_identity")
        else:
            direction, local, remote = "Outbound", lookup(src), lookup(actual)
            target = lookup(original)
            peer = c.get("dst_identity")
        rows.append(
            [
                name,
                direction,
                local,
                remote,
                target,
                str(c.get("protocol", "")),
                str(peer or "-"),
                human_bytes(c.get("bytes_sent")),
                human_bytes(c.get("bytes_received")),
                human_duration(c.get("duration_s")),
            ]
        )
    return rows


# --- the command -------------------------------------------------------------------------------


def _emit(data: object, output: str) -> None:
    if output == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    else:
        print(json.dumps(data, indent=2))


def _print_table(header: Sequence[str], rows: Sequence[Sequence[object]], padding: int = 1) -> None:
    print("\n".join(table(header, rows, padding)))


@dataclass
class Target:
    """What a subcommand reads: one dump (or, for ``log``, several ztunnels)."""

    refs: list[ZtunnelRef] = field(default_factory=list)
    dump: JSON | None = None


# Which subcommands need one node's ztunnel (what differs per node), as istioctl's
# enforceSinglePod: certificates and connections.
_PER_NODE = ("certificate", "connections")


def _one_source(args: argparse.Namespace) -> None:
    given = [flag for flag, v in (("--admin", args.admin), ("--node", args.node), ("--file", args.file)) if v]
    if len(given) > 1:
        raise UsageError(f"give at most one of --admin, --node, --file (got {' and '.join(given)})")


def resolve(args: argparse.Namespace, what: str) -> list[ZtunnelRef]:
    """The ztunnel(s) ``args`` name: ``--admin``, ``--node`` or the local mesh."""
    _one_source(args)
    if args.admin:
        return [ZtunnelRef(admin=args.admin)]
    mesh = find_local_mesh(args.run, args.runs_root)
    if args.node:
        return [node_ztunnel(mesh, args.node)]
    refs = list(mesh.ztunnels.values())
    if not refs:
        raise UsageError(f"local mesh {mesh.run_id} has no ztunnel recorded in {mesh.run_dir}")
    if what == "log":
        return refs
    if what in _PER_NODE and len(refs) > 1:
        nodes = ", ".join(mesh.ztunnels)
        raise UsageError(
            f"each node's ztunnel has its own {what.removesuffix('s')}s; give --node NAME (local mesh {mesh.run_id}: {nodes}) "
            "or --admin ADDR"
        )
    return refs[:1]


def _dump_for(args: argparse.Namespace, what: str) -> JSON:
    _one_source(args)
    if args.file:
        return read_dump_file(args.file)
    [ref] = resolve(args, what)
    return fetch_dump(ref, args.timeout)


def _address(text: str) -> str:
    if not text:
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise UsageError(f"--address {text!r}: not an IP address") from None


def cmd_workload(args: argparse.Namespace) -> int:
    f = WorkloadFilter(args.workload_namespace or "", _address(args.address or ""), args.workload_node or "")
    dump = _dump_for(args, "workload")
    if args.output == "short":
        _print_table(WORKLOAD_HEADER, workload_rows(dump, f))
    else:
        _emit(workloads(dump, f), args.output)
    return EXIT_OK


def cmd_service(args: argparse.Namespace) -> int:
    dump = _dump_for(args, "service")
    if args.output == "short":
        _print_table(SERVICE_HEADER, service_rows(dump, args.service_namespace or ""))
    else:
        _emit(services(dump, args.service_namespace or ""), args.output)
    return EXIT_OK


def cmd_policy(args: argparse.Namespace) -> int:
    dump = _dump_for(args, "policy")
    if args.output == "short":
        _print_table(POLICY_HEADER, policy_rows(dump, args.policy_namespace or ""))
    else:
        _emit(policies(dump, args.policy_namespace or ""), args.output)
    return EXIT_OK


def cmd_certificate(args: argparse.Namespace) -> int:
    dump = _dump_for(args, "certificate")
    if args.output == "short":
        _print_table(CERT_HEADER, certificate_rows(dump, dt.datetime.now(dt.UTC)), padding=5)
    else:
        _emit(_dump_list(dump, "certificates"), args.output)
    return EXIT_OK


def cmd_connections(args: argparse.Namespace) -> int:
    f = ConnectionFilter(args.workload_namespace or "", args.direction or "", raw=args.raw)
    dump = _dump_for(args, "connections")
    if args.output == "short":
        _print_table(CONNECTION_HEADER, connection_rows(dump, f))
    else:
        _emit(connections(dump, f), args.output)
    return EXIT_OK


def cmd_all(args: argparse.Namespace) -> int:
    dump = _dump_for(args, "all")
    if args.output != "short":
        _emit(dump, args.output)
        return EXIT_OK
    now = dt.datetime.now(dt.UTC)
    sections: list[tuple[str, Sequence[str], list[list[str]], int]] = [
        ("WORKLOAD INFO", WORKLOAD_HEADER, workload_rows(dump, WorkloadFilter()), 1),
        ("SERVICE INFO", SERVICE_HEADER, service_rows(dump), 1),
        ("POLICY INFO", POLICY_HEADER, policy_rows(dump), 1),
        ("SECRET INFO", CERT_HEADER, certificate_rows(dump, now), 5),
        ("CONNECTIONS INFO", CONNECTION_HEADER, connection_rows(dump, ConnectionFilter()), 1),
    ]
    for title, header, rows, padding in sections:
        print()
        if args.with_headers:
            print(f"------ {title} ------\n")
        _print_table(header, rows, padding)
    return EXIT_OK


def parse_level(text: str) -> str:
    if ":" in text or "=" in text or "," in text:
        raise UsageError(
            f"--level {text!r}: ztunnel has one level for all its loggers; give one of {', '.join(LEVELS)}"
        )
    level = LEVEL_ALIASES.get(text.lower(), text.lower())
    if level not in LEVELS:
        raise UsageError(f"--level {text!r}: unrecognized logging level (one of {', '.join(LEVELS)})")
    return level


def cmd_log(args: argparse.Namespace) -> int:
    if args.level is not None and args.reset:
        raise UsageError("--level cannot be combined with --reset")
    if args.file:
        raise UsageError("--file: log talks to a running ztunnel; give --admin or --node")
    query = ""
    if args.level is not None:
        query = f"?level={parse_level(args.level)}"
    elif args.reset:
        query = "?reset"
    method = "POST" if query else "GET"
    results = []
    for ref in resolve(args, "log"):
        _alive(ref)
        body = http(admin_base(ref.admin) + "/logging" + query, ref.origin, args.timeout, method)
        text = body.decode(errors="replace").strip()
        level = text.rsplit(" ", 1)[-1] if text.startswith("current log level is ") else None
        results.append({"node": ref.node, "admin": admin_base(ref.admin), "level": level, "response": text})
    if args.output == "short":
        for r in results:
            print(f"{r['node'] or r['admin']}:")
            print(r["response"])
    else:
        _emit(results, args.output)
    return EXIT_OK


# --- parser ------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, top: bool) -> None:
    """The flags every subcommand takes, before or after the subcommand's name: on the group
    they default; on a subcommand they only override (SUPPRESS) what was given before it."""

    def d(value: object) -> object:
        return value if top else argparse.SUPPRESS

    p.add_argument("--admin", metavar="ADDR", default=d(None),
                   help="a ztunnel's admin address (host:port or URL), anywhere")  # fmt: skip
    p.add_argument("--node", metavar="NAME", default=d(None),
                   help="the ztunnel of node NAME in the running local mesh")  # fmt: skip
    p.add_argument("--run", metavar="ID", default=d(None),
                   help="which local mesh, when several run (ambientctl mesh up, demo --keep)")  # fmt: skip
    p.add_argument("-f", "--file", metavar="FILE", default=d(None), help="a saved config dump (- for stdin)")
    p.add_argument("-o", "--output", choices=OUTPUTS, default=d("short"),
                   help="output format: short (tables, default), json or yaml")  # fmt: skip
    p.add_argument(
        "--timeout", type=float, metavar="S", default=d(5.0), help="seconds per request (default 5)"
    )
    if top:
        p.set_defaults(runs_root=RUNS_ROOT)


def add_parser(sub: Any) -> None:
    """Register ``ztunnel-config`` (alias ``zc``) under ``ambientctl``."""
    p = sub.add_parser(
        "ztunnel-config",
        aliases=["zc"],
        help="retrieve a ztunnel's configuration (workloads, services, policies, certificates, connections, log)",
        description="Retrieve what a ztunnel holds, as istioctl ztunnel-config: from --admin ADDR, "
        "--node NAME of the running local mesh, or a saved dump (-f). Exit status: 0 done, "
        "1 the ztunnel could not be read, 2 bad input.",
    )
    _common(p, top=True)
    zs = p.add_subparsers(dest="zc_command", required=True, metavar="SUBCOMMAND")

    def sp(name: str, aliases: list[str], help: str, func: Callable[[argparse.Namespace], int]) -> Any:
        c = zs.add_parser(name, aliases=aliases, help=help, description=help)
        _common(c, top=False)
        c.set_defaults(func=_run(func), zc_what=name)
        return c

    w = sp("workload", ["workloads", "w"], "workloads the ztunnel knows (every node's)", cmd_workload)
    w.add_argument("--workload-namespace", metavar="NS", help="only workloads of this namespace")
    w.add_argument("--address", metavar="IP", help="only the workload with this address")
    w.add_argument("--workload-node", metavar="NODE", help="only workloads on this node")

    s = sp("service", ["services", "s", "svc"], "services the ztunnel knows", cmd_service)
    s.add_argument("--service-namespace", metavar="NS", help="only services of this namespace")

    pol = sp("policy", ["policies", "p", "pol"], "authorization policies the ztunnel holds", cmd_policy)
    pol.add_argument("--policy-namespace", metavar="NS", help="only policies of this namespace")

    sp(
        "certificate",
        ["certificates", "certs", "cert"],
        "the certificates of the node's pod identities: status, validity, expiry",
        cmd_certificate,
    )

    c = sp(
        "connections",
        ["cons"],
        "live connections of the node's pods, with identities and bytes",
        cmd_connections,
    )
    c.add_argument(
        "--direction", choices=("inbound", "outbound"), help="only inbound or outbound connections"
    )
    c.add_argument("--workload-namespace", metavar="NS", help="only connections of pods in this namespace")
    c.add_argument("--raw", action="store_true", help="show IP addresses instead of names")

    lg = sp("log", [], "show a ztunnel's log level, or set it (--level) on every ztunnel given", cmd_log)
    lg.add_argument(
        "--level", metavar="LEVEL", help=f"set the level: one of {', '.join(LEVELS)} (warn = warning)"
    )
    lg.add_argument("-r", "--reset", action="store_true", help="reset the level to the default (info)")

    a = sp("all", [], "workloads, services, policies, certificates and connections", cmd_all)
    a.add_argument("--with-headers", action="store_true", help="a header line before each section")


def _run(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except UsageError as e:
            print(f"{PROG} {args.zc_what}: {e}", file=sys.stderr)
            return EXIT_USAGE
        except FetchError as e:
            print(f"{PROG} {args.zc_what}: {e}", file=sys.stderr)
            return EXIT_ERROR

    return run
