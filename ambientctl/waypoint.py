"""``ambientctl waypoint generate|apply|list|delete|status``: waypoints, the way ``istioctl waypoint`` manages them.

Istio users add an L7 waypoint with ``istioctl waypoint apply -n shop --enroll-namespace --wait``
and look at it with ``istioctl waypoint list|status``; the same verbs, flags, columns and
messages work here (modelled on istioctl's ``pkg/waypoint/waypoint.go``), against two places:

- ``--kubeconfig FILE``: a Kubernetes cluster's API (the Gateway objects; the control plane's
  waypoint controller reports ``Accepted``/``Programmed`` in their status);
- nothing: the running local mesh (``ambientctl mesh up`` or ``demo --keep``), found as ``ambientctl
  ztunnel-config`` finds it (``--run ID`` picks one of several). Its YAML file is the source of
  truth: ``apply``/``delete`` edit it atomically, keeping comments and document order, and the
  control plane and the waypoint supervisor pick the edit up; ``Programmed`` is whether the
  supervisor runs the waypoint's pod and it answers ready.

Where this differs from istioctl, on purpose: ``--service-account SA`` (our annotation
``ambient-mesh.io/for-service-account``: a waypoint for one service account's workloads);
TRAFFIC TYPE shows ``service`` for a Gateway without ``istio.io/waypoint-for`` (what the mesh
does with it; istioctl prints ``none``); ``apply --enroll-namespace`` on a namespace that uses
another waypoint, without ``--overwrite``, and ``delete`` of a name that does not exist are
errors that change nothing (istioctl warns and exits 0); ``status`` is one look (istioctl keeps
polling); ``list``/``status`` take ``-o json|yaml``.

Exit status: 0 done, 1 an error (the message names the flag or object). Decide-then-do: the
Gateway a command writes and every row it prints are pure functions of its flags and the
objects read (tested without I/O); the backends (:mod:`ambientctl.waypoint_kube`,
:mod:`ambientctl.waypoint_local`) only read and write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TextIO

import yaml

from mesh.enrollment import DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL
from mesh.model.objects import (
    ANNOTATION_FOR_SERVICE_ACCOUNT,
    LABEL_USE_WAYPOINT,
    LABEL_WAYPOINT_FOR,
    WAYPOINT_GATEWAY_CLASS,
)

PROG = "ambientctl waypoint"
EXIT_OK, EXIT_ERROR = 0, 1
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
DEFAULT_NAME = "waypoint"
DEFAULT_NAMESPACE = "default"
TRAFFIC_TYPES = ("service", "workload", "all", "none")
DEFAULT_TRAFFIC = "service"  # what the control plane does without istio.io/waypoint-for
LABEL_REVISION = "istio.io/rev"
DEFAULT_TIMEOUT = 90.0
MESH_PORT = 15008
PROGRAMMED, ACCEPTED = "Programmed", "Accepted"
OUTPUTS = ("table", "json", "yaml")

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

JSON = dict[str, Any]


class WaypointError(Exception):
    """A command failed (exit 1); the message names the flag or the object."""


# --- what a command asks for (pure) ------------------------------------------------------------


@dataclass(frozen=True)
class WaypointSpec:
    """The waypoint ``generate``/``apply`` describe, validated."""

    namespace: str | None  # None: generate without -n (no namespace in the YAML, as istioctl)
    name: str
    traffic: str | None = None  # --for; None: no istio.io/waypoint-for label
    service_account: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def check_namespace(namespace: str) -> str:
    if not _DNS1123_LABEL.match(namespace) or len(namespace) > 63:
        raise WaypointError(
            f"-n/--namespace {namespace!r}: not a valid namespace name (lowercase letters, digits and '-', "
            "at most 63 characters)"
        )
    return namespace


def check_name(name: str, flag: str = "--name") -> str:
    if name == "none":
        raise WaypointError(f"{flag} none: invalid name provided for waypoint, 'none' is a reserved value")
    if not _DNS1123_LABEL.match(name) or len(name) > 63:
        raise WaypointError(
            f"{flag} {name!r}: not a valid waypoint name (lowercase letters, digits and '-', at most 63 "
            "characters; it names the waypoint's Service and ServiceAccount too)"
        )
    return name


def make_spec(
    namespace: str | None, name: str | None, traffic: str | None, service_account: str | None
) -> WaypointSpec:
    """Validate the flags of ``generate``/``apply`` (raises :class:`WaypointError`)."""
    if traffic is not None and traffic not in TRAFFIC_TYPES:
        raise WaypointError(
            f"--for {traffic!r}: invalid traffic type, must be one of {'|'.join(TRAFFIC_TYPES)}"
        )
    if service_account is not None and (
        not _DNS1123_SUBDOMAIN.match(service_account) or len(service_account) > 253
    ):
        raise WaypointError(f"--service-account {service_account!r}: not a valid service account name")
    return WaypointSpec(
        namespace=check_namespace(namespace) if namespace is not None else None,
        name=check_name(name or DEFAULT_NAME),
        traffic=traffic,
        service_account=service_account,
    )


def make_gateway(spec: WaypointSpec) -> JSON:
    """The Gateway ``generate`` prints and ``apply`` writes (istioctl's ``makeGateway``)."""
    metadata: JSON = {"name": spec.name}
    if spec.namespace is not None:
        metadata["namespace"] = spec.namespace
    if spec.traffic is not None:
        metadata["labels"] = {LABEL_WAYPOINT_FOR: spec.traffic}
    if spec.service_account is not None:
        metadata["annotations"] = {ANNOTATION_FOR_SERVICE_ACCOUNT: spec.service_account}
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "Gateway",
        "metadata": metadata,
        "spec": {
            "gatewayClassName": WAYPOINT_GATEWAY_CLASS,
            "listeners": [{"name": "mesh", "port": MESH_PORT, "protocol": "HBONE"}],
        },
    }


def merged(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> JSON:
    """``existing`` with the labels and annotations ``wanted`` sets (what a server-side apply of
    ``wanted`` changes on a waypoint Gateway; other labels, annotations and the spec stay)."""
    out: JSON = json.loads(json.dumps(existing))
    md = out.setdefault("metadata", {})
    for field in ("labels", "annotations"):
        add = (wanted.get("metadata") or {}).get(field) or {}
        if add:
            md[field] = {**(md.get(field) or {}), **add}
    return out


def parse_duration(text: str, flag: str = "--waypoint-timeout") -> float:
    """Seconds from a Go duration (``90s``, ``1m30s``, ``500ms``) or a plain number of seconds."""
    t = text.strip()
    try:
        value = float(t)
    except ValueError:
        pos, value = 0, 0.0
        for m in _DURATION.finditer(t):
            if m.start() != pos:
                break
            value += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise WaypointError(f"{flag} {text!r}: not a duration (e.g. 90s, 2m, 1m30s)") from None
    if not value > 0 or value == float("inf"):
        raise WaypointError(f"{flag} {text!r}: must be positive")
    return value


# --- what is printed (pure) --------------------------------------------------------------------


def is_waypoint(gw: Mapping[str, Any]) -> bool:
    return (gw.get("spec") or {}).get("gatewayClassName") == WAYPOINT_GATEWAY_CLASS


def _md(gw: Mapping[str, Any]) -> Mapping[str, Any]:
    md = gw.get("metadata")
    return md if isinstance(md, Mapping) else {}


def ref(gw: Mapping[str, Any]) -> str:
    md = _md(gw)
    return f"{md.get('namespace', '')}/{md.get('name', '')}"


def condition(gw: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    conds = (gw.get("status") or {}).get("conditions") or []
    return next((c for c in conds if isinstance(c, Mapping) and c.get("type") == type_), None)


def programmed(gw: Mapping[str, Any]) -> bool:
    c = condition(gw, PROGRAMMED)
    return c is not None and c.get("status") == "True"


def sort_waypoints(gws: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(
        (g for g in gws if is_waypoint(g)),
        key=lambda g: (str(_md(g).get("namespace", "")), str(_md(g).get("name", ""))),
    )


@dataclass(frozen=True)
class ListRow:
    namespace: str
    name: str
    revision: str
    trafficType: str  # the JSON field names are camelCase, as Kubernetes'
    programmed: str
    serviceAccount: str | None


def list_row(gw: Mapping[str, Any]) -> ListRow:
    md = _md(gw)
    labels = md.get("labels") or {}
    annotations = md.get("annotations") or {}
    c = condition(gw, PROGRAMMED)
    return ListRow(
        namespace=str(md.get("namespace", "")),
        name=str(md.get("name", "")),
        revision=str(labels.get(LABEL_REVISION) or "default"),
        trafficType=str(labels.get(LABEL_WAYPOINT_FOR) or DEFAULT_TRAFFIC),
        programmed=str(c.get("status")) if c is not None else "False",
        serviceAccount=annotations.get(ANNOTATION_FOR_SERVICE_ACCOUNT) or None,
    )


@dataclass(frozen=True)
class StatusRow:
    namespace: str
    name: str
    status: str
    type: str
    reason: str
    message: str


def status_row(gw: Mapping[str, Any]) -> StatusRow:
    """The condition that says most: ``Accepted`` when it is not True (``Programmed`` cannot be
    either then, and Accepted says why), else ``Programmed``."""
    md = _md(gw)
    accepted = condition(gw, ACCEPTED)
    c = accepted if accepted is not None and accepted.get("status") != "True" else condition(gw, PROGRAMMED)
    if c is None:
        return StatusRow(
            str(md.get("namespace", "")), str(md.get("name", "")), "Unknown", PROGRAMMED, "NoStatus",
            "no status yet: is the control plane's waypoint controller running?",
        )  # fmt: skip
    return StatusRow(
        str(md.get("namespace", "")),
        str(md.get("name", "")),
        str(c.get("status", "")),
        str(c.get("type", "")),
        str(c.get("reason", "")),
        " ".join(str(c.get("message", "")).split()),
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], padding: int = 5) -> str:
    """Columns as istioctl's tabwriter lays them out (cells padded to the widest plus 5)."""
    body = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in body) for i in range(len(headers) - 1)]
    lines = []
    for r in body:
        cells = [c.ljust(widths[i] + padding) for i, c in enumerate(r[:-1])] + [r[-1]]
        lines.append("".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def render_list(gws: Iterable[Mapping[str, Any]], all_namespaces: bool, output: str) -> str:
    rows = [list_row(g) for g in sort_waypoints(gws)]
    if output != "table":
        return _dump([asdict(r) for r in rows], output)
    if not rows:
        return "No waypoints found.\n"
    head = ["NAME", "REVISION", "TRAFFIC TYPE", "PROGRAMMED"]
    cells = [[r.name, r.revision, r.trafficType, r.programmed] for r in rows]
    if all_namespaces:
        head = ["NAMESPACE", *head]
        cells = [[r.namespace, *c] for r, c in zip(rows, cells, strict=True)]
    return table(head, cells)


def render_status(gws: Iterable[Mapping[str, Any]], output: str) -> str:
    rows = [status_row(g) for g in sort_waypoints(gws)]
    if output != "table":
        return _dump([asdict(r) for r in rows], output)
    if not rows:
        return "No waypoints found.\n"
    return table(
        ["NAMESPACE", "NAME", "STATUS", "TYPE", "REASON", "MESSAGE"],
        [[r.namespace, r.name, r.status, r.type, r.reason, r.message] for r in rows],
    )


def _dump(data: Any, output: str) -> str:
    if output == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=False)


def render_gateway(gw: Mapping[str, Any], output: str = "yaml") -> str:
    if output == "json":
        return json.dumps(gw, indent=2, sort_keys=True) + "\n"
    return yaml.safe_dump(dict(gw), default_flow_style=False, sort_keys=True)


def wait_state(gw: Mapping[str, Any] | None) -> str:
    """Where a waypoint is on its way to Programmed, in words: ``Programmed=False (Pending): …``."""
    if gw is None:
        return "the Gateway is gone"
    row = status_row(gw)
    return (
        f"{row.type}={row.status} ({row.reason}): {row.message}" if row.reason else f"{row.type}={row.status}"
    )


def wait_line(ns_name: str, gw: Mapping[str, Any] | None, elapsed: float, timeout: float) -> str:
    return f"⏳ waiting for waypoint {ns_name} to be Programmed ({elapsed:.0f}s of {timeout:g}s): {wait_state(gw)}"


# --- where waypoints live ----------------------------------------------------------------------


class Backend(Protocol):
    """A place Gateways are kept: the Kubernetes API or a local mesh's file."""

    description: str
    default_namespace: str

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        """The namespace's labels; WaypointError when it does not exist (a local file's
        namespaces exist without a Namespace document: ``{}``)."""
        ...

    def gateways(self, namespace: str | None) -> list[JSON]:
        """Every Gateway in ``namespace`` (None: all), with its status."""
        ...

    def gateway(self, namespace: str, name: str) -> JSON | None: ...

    def apply(self, gateway: Mapping[str, Any]) -> str:
        """Create the Gateway, or merge its labels and annotations into the one there:
        ``created``, ``configured`` or ``unchanged``."""
        ...

    def label_namespace(self, namespace: str, key: str, value: str) -> None: ...

    def delete(self, namespace: str, names: Sequence[str]) -> list[str]:
        """Delete those Gateways; returns the names that were already gone."""
        ...

    def close(self) -> None: ...


def open_backend(args: argparse.Namespace) -> Backend:
    """``--kubeconfig``: that cluster; otherwise the running local mesh (``--run`` picks one)."""
    backend: Backend
    if args.kubeconfig:
        if args.run is not None:
            raise WaypointError("--run picks a local mesh; it cannot go with --kubeconfig")
        from ambientctl.waypoint_kube import KubeBackend

        backend = KubeBackend(args.kubeconfig)
    else:
        from ambientctl.waypoint_local import LocalBackend

        backend = LocalBackend.find(args.run)
    cleanup = getattr(args, "cleanup", None)
    if isinstance(cleanup, contextlib.ExitStack):
        cleanup.callback(backend.close)  # closed when the command is over (its API connections)
    return backend


# --- the commands ------------------------------------------------------------------------------


class Progress:
    """The ``--wait`` line: rewritten in place on a terminal, a new line per change otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last = ""

    def update(self, line: str, key: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
            self.last = key
        elif key != self.last:
            self.last = key
            print(line, file=self.out, flush=True)

    def done(self) -> None:
        if self.tty and self.last:
            self.out.write("\r\x1b[K")
            self.out.flush()


def wait_programmed(
    backend: Backend,
    namespace: str,
    name: str,
    timeout: float,
    out: TextIO,
    *,
    poll: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Until the Gateway is Programmed (raises :class:`WaypointError` after ``timeout``)."""
    start = clock()
    progress = Progress(out)
    key = f"{namespace}/{name}"
    try:
        while True:
            gw = backend.gateway(namespace, name)
            if gw is not None and programmed(gw):
                return
            elapsed = clock() - start
            progress.update(wait_line(key, gw, elapsed, timeout), wait_state(gw))
            if elapsed >= timeout:
                raise WaypointError(
                    f"timed out after {timeout:g}s while waiting for waypoint {key} to be Programmed; "
                    f"last status: {wait_state(gw)}"
                )
            sleep(min(poll, max(0.0, timeout - elapsed)))
    finally:
        progress.done()


def cmd_generate(args: argparse.Namespace) -> int:
    spec = make_spec(args.namespace, args.name, args.traffic, args.service_account)
    sys.stdout.write(render_gateway(make_gateway(spec), args.output))
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    spec = make_spec(args.namespace, args.name, args.traffic, args.service_account)  # flags first
    timeout = parse_duration(args.waypoint_timeout)
    backend = open_backend(args)
    ns = check_namespace(args.namespace or backend.default_namespace)
    spec = WaypointSpec(ns, spec.name, spec.traffic, spec.service_account)
    if args.enroll_namespace:
        labels = backend.namespace_labels(ns)
        current = labels.get(LABEL_USE_WAYPOINT)
        if current and current != spec.name and not args.overwrite:
            raise WaypointError(
                f"namespace {ns} already uses waypoint {current!r} ({LABEL_USE_WAYPOINT}={current}): "
                "add --overwrite to make it use this one; nothing was changed"
            )
        if labels.get(DATAPLANE_MODE_LABEL) != DATAPLANE_MODE_AMBIENT:
            print(
                f"⚠️ Warning: namespace is not enrolled in ambient. Consider running\t"
                f"`kubectl label namespace {ns} {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}`"
                + (
                    ""
                    if args.kubeconfig
                    else f" (in a local mesh: add that label to the Namespace {ns} in its file)"
                )
            )
    existing = backend.gateway(ns, spec.name)
    if existing is not None and not is_waypoint(existing):
        cls = (existing.get("spec") or {}).get("gatewayClassName")
        raise WaypointError(
            f"Gateway {spec.ref} exists with gatewayClassName {cls!r}, not {WAYPOINT_GATEWAY_CLASS}: "
            "it is not a waypoint; pick another --name"
        )
    backend.apply(make_gateway(spec))
    print(f"✅ waypoint {spec.ref} applied", flush=True)
    if args.wait:
        wait_programmed(backend, ns, spec.name, timeout, sys.stdout)
        print(f"✅ waypoint {spec.ref} is ready!", flush=True)
    if args.enroll_namespace:
        backend.label_namespace(ns, LABEL_USE_WAYPOINT, spec.name)
        print(f'✅ namespace {ns} labeled with "{LABEL_USE_WAYPOINT}: {spec.name}"')
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    backend = open_backend(args)
    ns = None if args.all_namespaces else check_namespace(args.namespace or backend.default_namespace)
    sys.stdout.write(render_list(backend.gateways(ns), args.all_namespaces, args.output))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    backend = open_backend(args)
    ns = None if args.all_namespaces else check_namespace(args.namespace or backend.default_namespace)
    sys.stdout.write(render_status(backend.gateways(ns), args.output))
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    if args.all and args.names:
        raise WaypointError("cannot specify waypoint names when deleting all waypoints (--all)")
    if not args.all and not args.names:
        raise WaypointError("must specify a waypoint name or delete all using --all")
    for n in args.names:
        if not _DNS1123_LABEL.match(n):
            raise WaypointError(f"{n!r}: not a valid waypoint name")
    backend = open_backend(args)
    ns = check_namespace(args.namespace or backend.default_namespace)
    present = [str(_md(g).get("name")) for g in sort_waypoints(backend.gateways(ns))]
    if args.all:
        names = present
        if not names:
            print(f"No waypoints found in namespace {ns}.")
            return EXIT_OK
    else:
        names = list(dict.fromkeys(args.names))
        missing = [n for n in names if n not in present]
        if missing:
            known = ", ".join(present) or "none"
            raise WaypointError(
                f"waypoint {', '.join(f'{ns}/{n}' for n in missing)} not found (waypoints in {ns}: {known}); "
                "nothing was deleted"
            )
    gone = backend.delete(ns, names)
    for n in names:
        print(f"waypoint {ns}/{n} {'not found' if n in gone else 'deleted'}")
    try:
        used = backend.namespace_labels(ns).get(LABEL_USE_WAYPOINT)
    except WaypointError:
        used = None  # only a hint: not being allowed to read the namespace is no failure
    if used in names:
        print(
            f"⚠️ Warning: namespace {ns} still has {LABEL_USE_WAYPOINT}={used}: its traffic is sent to a waypoint "
            f"that no longer exists; apply it again, or remove the label"
        )
    return EXIT_OK


# --- the parser --------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    """Flags accepted before and after the subcommand: the subcommand's copy has no default,
    so it does not undo what was given before it."""
    d: dict[str, Any] = {"default": None} if top else {"default": argparse.SUPPRESS}
    p.add_argument(
        "--kubeconfig", metavar="FILE", help="use this cluster's API (default: the running local mesh)", **d
    )
    p.add_argument("--run", metavar="ID", help="which local mesh, when several run", **d)
    p.add_argument("-n", "--namespace", help="the namespace (default: the kubeconfig's, else default)", **d)


def _name(p: argparse.ArgumentParser, top: bool) -> None:
    d: dict[str, Any] = {"default": DEFAULT_NAME} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--name", help=f"name of the waypoint (default: {DEFAULT_NAME})", **d)


def _gateway_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--for", dest="traffic", metavar="TYPE",
        help=f"the traffic type the waypoint handles: {'|'.join(TRAFFIC_TYPES)} (label {LABEL_WAYPOINT_FOR}; "
        f"none set: {DEFAULT_TRAFFIC})",
    )  # fmt: skip
    p.add_argument(
        "--service-account", metavar="SA",
        help=f"serve only the workloads running as this service account (annotation {ANNOTATION_FOR_SERVICE_ACCOUNT})",
    )  # fmt: skip


def add_parser(sub: Any) -> None:
    p = sub.add_parser("waypoint", help="manage waypoints (generate, apply, list, delete, status)")
    _common(p, top=True)
    _name(p, top=True)
    ps = p.add_subparsers(dest="waypoint_command", required=True, metavar="SUBCOMMAND")

    g = ps.add_parser("generate", help="print a waypoint Gateway as YAML")
    _common(g, top=False)
    _name(g, top=False)
    _gateway_flags(g)
    g.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    g.set_defaults(func=_run(cmd_generate))

    a = ps.add_parser("apply", help="create or update a waypoint")
    _common(a, top=False)
    _name(a, top=False)
    _gateway_flags(a)
    a.add_argument(
        "--enroll-namespace", action="store_true", help=f"label the namespace {LABEL_USE_WAYPOINT}=<name>"
    )
    a.add_argument("--overwrite", action="store_true", help="replace the waypoint the namespace already uses")
    a.add_argument("-w", "--wait", action="store_true", help="wait until the waypoint is Programmed")
    a.add_argument(
        "--waypoint-timeout", default=f"{DEFAULT_TIMEOUT:g}s", metavar="DURATION",
        help=f"how long --wait waits (default {DEFAULT_TIMEOUT:g}s)",
    )  # fmt: skip
    a.set_defaults(func=_run(cmd_apply))

    ls = ps.add_parser("list", help="list waypoints")
    _common(ls, top=False)
    ls.add_argument("-A", "--all-namespaces", action="store_true", help="in every namespace")
    ls.add_argument("-o", "--output", choices=OUTPUTS, default="table")
    ls.set_defaults(func=_run(cmd_list))

    d = ps.add_parser("delete", help="delete waypoints by name, or --all in the namespace")
    _common(d, top=False)
    d.add_argument("names", nargs="*", metavar="NAME")
    d.add_argument("--all", action="store_true", help="every waypoint of the namespace")
    d.set_defaults(func=_run(cmd_delete))

    s = ps.add_parser("status", help="show whether waypoints are Programmed, and why not")
    _common(s, top=False)
    s.add_argument("-A", "--all-namespaces", action="store_true", help="in every namespace")
    s.add_argument("-o", "--output", choices=OUTPUTS, default="table")
    s.set_defaults(func=_run(cmd_status))


def _run(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            with contextlib.ExitStack() as args.cleanup:
                return cmd(args)
        except WaypointError as e:
            sys.stdout.flush()
            print(f"{PROG} {args.waypoint_command}: error: {e}", file=sys.stderr)
            return EXIT_ERROR

    return run
