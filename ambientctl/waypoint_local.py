"""``ambientctl waypoint`` against the running local mesh: its YAML file is the API.

The control plane and the waypoint supervisor (:mod:`ambientctl.localmesh.supervisor`) both
poll the mesh's file, so writing a Gateway there is what ``kubectl apply`` is in a cluster. The
file belongs to the user, who edits it by hand too, so every change is a text edit of whole
documents (:mod:`ambientctl.waypoint_yaml`), checked with the very parser the control plane
uses (an edit that would make one of the objects it touches invalid is refused), and written
atomically: a temporary file in the same directory, then a rename, so the pollers see the old
file or the new one, never half. Two ``ambientctl`` edits at once are serialised by an
exclusive ``flock`` on the file, re-taken when the file was replaced while waiting.

A local mesh has no API server to keep a Gateway's status, so the status is made up when read,
from what decides it: the file (is the Gateway valid, can it be placed on a node:
:func:`sources.waypoints.waypoint_deployments`, the function the control plane and the
supervisor use) and the supervisor's ``status.json`` (is its pod running and ready).
``Programmed`` is True once the supervisor reports the waypoint ``ready`` where the file places
it — the moment its readiness endpoint answers, as a Deployment's ready replica makes it True
in Kubernetes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ambientctl import waypoint_yaml as docs_
from ambientctl.localmesh import supervisor
from ambientctl.localmesh.state import RUNS_ROOT, RunState, proc_starttime
from ambientctl.waypoint import JSON, PROGRAMMED, WaypointError, is_waypoint, merged
from ambientctl.ztunnel_config import LocalMesh, local_meshes
from mesh.model import Gateway
from sources.convert import DEFAULT_NAMESPACE
from sources.local import read_manifest
from sources.waypoints import Placed, Unplaced, waypoint_deployments

MAX_ATTEMPTS = 20  # the file replaced while we waited for its lock, again and again
RUN_LOCK = "lock"  # <run>/lock: see run_lock


def _ns(doc: docs_.Document) -> str:
    return doc.namespace or DEFAULT_NAMESPACE


def is_gateway(doc: docs_.Document) -> bool:
    return doc.kind == "Gateway" and doc.api_version.startswith("gateway.networking.k8s.io/")


def is_namespace(doc: docs_.Document) -> bool:
    return doc.kind == "Namespace" and doc.api_version == "v1"


def find(documents: Sequence[docs_.Document], match: Callable[[docs_.Document], bool]) -> list[int]:
    return [i for i, d in enumerate(documents) if isinstance(d.data, dict) and match(d)]


def gateway_docs(documents: Sequence[docs_.Document], namespace: str, name: str) -> list[int]:
    return find(documents, lambda d: is_gateway(d) and _ns(d) == namespace and d.name == name)


# --- edits (pure: documents in, documents out) ---------------------------------------------------


def apply_gateway(
    documents: Sequence[docs_.Document], gateway: Mapping[str, Any]
) -> tuple[list[docs_.Document], str]:
    """The file with ``gateway`` appended, or its labels and annotations set in the Gateway
    document already there: (documents, ``created``|``configured``|``unchanged``)."""
    md = gateway["metadata"]
    at = gateway_docs(documents, md["namespace"], md["name"])
    if len(at) > 1:
        raise WaypointError(
            f"the file declares Gateway {md['namespace']}/{md['name']} {len(at)} times (documents "
            f"{', '.join(str(i) for i in at)}): fix that first"
        )
    if not at:
        return docs_.append(documents, gateway), "created"
    doc = documents[at[0]]
    want = merged(doc.data, gateway)
    new = doc
    for field in ("labels", "annotations"):
        entries = (want.get("metadata") or {}).get(field) or {}
        if entries != ((doc.data.get("metadata") or {}).get(field) or {}):
            new = docs_.set_entries(new, ("metadata", field), entries)
    if new is doc:
        return list(documents), "unchanged"
    out = list(documents)
    out[at[0]] = new
    return out, "configured"


def label_namespace(
    documents: Sequence[docs_.Document], namespace: str, key: str, value: str
) -> list[docs_.Document]:
    """The Namespace document labelled (one is added when the file has none)."""
    at = find(documents, lambda d: is_namespace(d) and d.name == namespace)
    if not at:
        return docs_.append(
            documents,
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": namespace, "labels": {key: value}},
            },
        )
    out = list(documents)
    for i in at:
        out[i] = docs_.set_entries(out[i], ("metadata", "labels"), {key: value})
    return out


def delete_gateways(
    documents: Sequence[docs_.Document], namespace: str, names: Sequence[str]
) -> list[docs_.Document]:
    drop = {i for n in names for i in gateway_docs(documents, namespace, n)}
    return [d for i, d in enumerate(documents) if i not in drop]


def check_edit(before: str, after: str, touched: Sequence[tuple[str, str]], source: str) -> None:
    """Refuse an edit that makes an object it touches invalid, or breaks a document that was not
    broken (what the control plane would reject)."""
    old, new = read_manifest(before, source=source), read_manifest(after, source=source)
    for r in new.rejected:
        if r.object in touched:
            raise WaypointError(
                f"the edit would not be accepted by the control plane: {r.error}; nothing was changed"
            )
    unreadable_before = sum(1 for r in old.rejected if r.object is None)
    if sum(1 for r in new.rejected if r.object is None) > unreadable_before:
        first = next(r for r in new.rejected if r.object is None)
        raise WaypointError(f"the edit would break the file: {first.error}; nothing was changed")


# --- status (pure) ------------------------------------------------------------------------------


def _condition(type_: str, ok: bool, reason: str, message: str) -> JSON:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason, "message": message}


@dataclass(frozen=True)
class MeshFacts:
    """What decides a local waypoint's status, read once per command."""

    text: str
    source: str
    supervisor_running: bool
    supervisor_status: Mapping[str, Any]
    nodes: frozenset[str]  # the mesh's nodes (where a waypoint can run); empty: not known


def with_status(documents: Sequence[docs_.Document], facts: MeshFacts) -> list[JSON]:
    """Every Gateway document of the file as an object with ``status.conditions``."""
    manifest = read_manifest(facts.text, source=facts.source)
    rejected = {r.object: r.error for r in manifest.rejected if r.object is not None}
    in_force = {g.key: g for g in manifest.objects if isinstance(g, Gateway)}
    placements: dict[str, Placed | Unplaced] = {
        p.gateway.key: p for p in waypoint_deployments(manifest.objects)[0]
    }
    running = facts.supervisor_status.get("waypoints") or {}
    config_error = facts.supervisor_status.get("config_error")
    out: list[JSON] = []
    for d in documents:
        if not (isinstance(d.data, dict) and is_gateway(d)):
            continue
        obj = json_copy(d.data)
        obj.setdefault("metadata", {})["namespace"] = _ns(d)
        key = f"{_ns(d)}/{d.name}"
        error = rejected.get(("Gateway", key))
        if error is not None or key not in in_force:
            why = str(error) if error is not None else "the control plane cannot read this Gateway"
            conds = [
                _condition("Accepted", False, "Invalid", why),
                _condition(PROGRAMMED, False, "Invalid", why),
            ]
        elif not is_waypoint(obj):
            conds = []
        else:
            conds = [
                _condition("Accepted", True, "Accepted", "read from the mesh file"),
                _programmed(key, placements.get(key), running.get(key), config_error, facts),
            ]
        if conds:
            obj["status"] = {"conditions": conds}
        out.append(obj)
    return out


def _programmed(
    key: str, placed: Placed | Unplaced | None, running: Any, config_error: Any, facts: MeshFacts
) -> JSON:
    if isinstance(placed, Unplaced):
        return _condition(PROGRAMMED, False, "NoResources", f"not placed: {placed.reason}")
    if placed is None:
        return _condition(PROGRAMMED, False, "Pending", "not placed yet")
    where = f"{placed.pod.namespace}/{placed.pod.name} on {placed.pod.node} {placed.ip}"
    if not facts.supervisor_running:
        return _condition(PROGRAMMED, False, "Pending", "the local mesh's waypoint supervisor is not running")
    if facts.nodes and placed.pod.node not in facts.nodes:
        return _condition(
            PROGRAMMED, False, "NoResources",
            f"pod {where}: node {placed.pod.node!r} is not one of this mesh's nodes ({', '.join(sorted(facts.nodes))})",
        )  # fmt: skip
    same_place = (
        isinstance(running, dict)
        and running.get("node") == placed.pod.node
        and running.get("ip") == placed.ip
    )
    if same_place and running.get("phase") == "ready":
        return _condition(PROGRAMMED, True, "Programmed", f"pod {where} is ready")
    if config_error:
        return _condition(
            PROGRAMMED, False, "Pending", f"the waypoint supervisor cannot use the file: {config_error}"
        )
    if same_place:
        return _condition(PROGRAMMED, False, "Pending", f"pod {where}: {running.get('phase')}")
    return _condition(PROGRAMMED, False, "Pending", f"pod {where}: not started yet")


def json_copy(data: Any) -> Any:
    import json

    return json.loads(json.dumps(data, default=str))


# --- the backend --------------------------------------------------------------------------------


class LocalBackend:
    def __init__(self, mesh: LocalMesh, path: Path) -> None:
        self.mesh = mesh
        self.path = path
        self.description = f"local mesh {mesh.run_id} ({path})"
        self.default_namespace = DEFAULT_NAMESPACE

    @classmethod
    def find(cls, run: str | None, root: Path | None = None) -> LocalBackend:
        """The one running local mesh (or run ``run``), as ``ambientctl ztunnel-config`` finds it."""
        root = root if root is not None else RUNS_ROOT
        runs = local_meshes(root)
        if run is not None:
            mesh = next((m for m in runs if m.run_id == run), None)
            if mesh is None:
                known = ", ".join(m.run_id for m in runs) or "none"
                raise WaypointError(f"--run {run}: no such local mesh under {root} (runs: {known})")
        else:
            live = [m for m in runs if m.running]
            if not live:
                raise WaypointError(
                    f"no local mesh is running under {root}: start one (ambientctl mesh up -f FILE, or ambientctl demo --keep), "
                    "or give --kubeconfig FILE to manage a cluster's waypoints"
                )
            if len(live) > 1:
                listing = "".join(f"\n  {m.describe()}" for m in live)
                raise WaypointError(f"{len(live)} local meshes are running; pick one with --run ID:{listing}")
            mesh = live[0]
        if mesh.config is None or not mesh.config.is_file():
            raise WaypointError(
                f"local mesh {mesh.run_id}: its mesh file is not known (looked in {mesh.run_dir})"
            )
        return cls(mesh, mesh.config)

    def close(self) -> None:
        pass  # nothing held between calls

    # -- reading --

    def _read(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise WaypointError(f"{self.path}: cannot read it: {e}") from None

    def _facts(self, text: str) -> MeshFacts:
        running = False
        with contextlib.suppress(OSError, ValueError, TypeError):
            st = RunState.load(self.mesh.run_dir)
            running = any(
                r.name == supervisor.PROC_NAME and r.starttime and proc_starttime(r.pid) == r.starttime
                for r in st.procs
            )
        return MeshFacts(
            text=text,
            source=str(self.path),
            supervisor_running=running,
            supervisor_status=supervisor.read_status(self.mesh.run_dir),
            nodes=frozenset(self.mesh.ztunnels),
        )

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        documents = docs_.split(self._read())
        labels: dict[str, str] = {}
        for i in find(documents, lambda d: is_namespace(d) and d.name == namespace):
            labels.update({str(k): str(v) for k, v in (documents[i].metadata.get("labels") or {}).items()})
        return labels

    def gateways(self, namespace: str | None) -> list[JSON]:
        text = self._read()
        every = with_status(docs_.split(text), self._facts(text))
        return [g for g in every if namespace is None or g["metadata"]["namespace"] == namespace]

    def gateway(self, namespace: str, name: str) -> JSON | None:
        return next((g for g in self.gateways(namespace) if g["metadata"].get("name") == name), None)

    # -- writing --

    def apply(self, gateway: Mapping[str, Any]) -> str:
        md = gateway["metadata"]
        result = ""

        def change(documents: list[docs_.Document]) -> list[docs_.Document] | None:
            nonlocal result
            out, result = apply_gateway(documents, gateway)
            return None if result == "unchanged" else out

        self.edit(change, [("Gateway", f"{md['namespace']}/{md['name']}")])
        return result

    def label_namespace(self, namespace: str, key: str, value: str) -> None:
        self.edit(lambda d: label_namespace(d, namespace, key, value), [("Namespace", namespace)])

    def delete(self, namespace: str, names: Sequence[str]) -> list[str]:
        gone: list[str] = []

        def change(documents: list[docs_.Document]) -> list[docs_.Document]:
            gone[:] = [n for n in names if not gateway_docs(documents, namespace, n)]
            return delete_gateways(documents, namespace, names)

        self.edit(change, [])
        return gone

    def edit(
        self,
        change: Callable[[list[docs_.Document]], list[docs_.Document] | None],
        touched: Sequence[tuple[str, str]],
    ) -> bool:
        """Read, change and replace the file under its lock; False when nothing changed."""
        with run_lock(self.mesh.run_dir):
            return self._edit(change, touched)

    def _edit(
        self,
        change: Callable[[list[docs_.Document]], list[docs_.Document] | None],
        touched: Sequence[tuple[str, str]],
    ) -> bool:
        for _ in range(MAX_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise WaypointError(f"{self.path}: cannot open it: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                held = os.fstat(fd)
                try:
                    now = os.stat(self.path)
                except FileNotFoundError:
                    continue
                if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                    continue  # replaced while we waited: lock the new one
                with open(fd, encoding="utf-8", closefd=False) as f:
                    text = f.read()
                new = change(docs_.split(text))
                if new is None:
                    return False
                new_text = docs_.join(new)
                if new_text == text:
                    return False
                check_edit(text, new_text, touched, str(self.path))
                replace_file(self.path, new_text.encode("utf-8"), held)
                return True
            except UnicodeDecodeError as e:
                raise WaypointError(f"{self.path}: not UTF-8 text: {e}") from None
            finally:
                os.close(fd)
        raise WaypointError(f"{self.path}: it keeps being replaced while we wait to edit it; try again")


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """The run's own writer lock (``<run>/lock``, which ``ambientctl mesh apply`` holds while it
    re-renders the same file): an edit here and one there never interleave."""
    try:
        f = open(Path(run_dir) / RUN_LOCK, "a")  # noqa: SIM115 (held across the yield)
    except OSError:
        yield  # a run directory we may not write to: the file's own lock still serialises us
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def replace_file(path: Path, data: bytes, like: os.stat_result) -> None:
    """Write ``data`` aside in the same directory (mode and owner of ``like``), fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, like.st_mode & 0o7777)
        if os.geteuid() == 0:
            os.fchown(fd, like.st_uid, like.st_gid)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
