"""Local mode's source of truth: a multi-document YAML file of plain Kubernetes objects.

The file is the whole state: loading it replaces everything in the :class:`Store`, so an
object removed from the file is deleted from the mesh. But one bad object must not freeze every
other change, nor delete what it replaces: an object that fails validation is rejected alone
(the error names the document, the object and the field), **its last good version stays in
force** — a typo never deletes a DENY policy — and the rest of the file applies. A new object
that is bad is simply not added. Beyond what :mod:`sources.convert` checks per object, this
checks what the API server would have guaranteed across objects (no duplicates, no IP used
twice, pods on known nodes); there the newer of two conflicting objects is the one rejected.

Some failures leave no object to attribute them to: a YAML syntax error in one document, a
document that is not a mapping, an object whose kind or name cannot be read. The other
documents still apply, but nothing is removed in that load (the broken document may be the
only place an object in force is still declared). A file nothing can be read from (not UTF-8,
too large, unreadable, or every object in it rejected) is refused whole: the last good state
stays in force.

Reading is bounded, since the file may come from anywhere: at most :data:`MAX_FILE_BYTES`, and
at most :data:`sources.boundedyaml.MAX_DOCUMENT_NODES` YAML nodes per document once aliases are expanded (a
"billion laughs" document is refused before it is built); a key given twice in one mapping is
an error (YAML would silently keep the last), and no message renders an unbounded value.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
import yaml

from mesh.enrollment import decide
from mesh.model import Delta, Kind, MeshObject, Namespace, Service, Store, TunnelProtocol, Workload
from sources import WorkloadSource
from sources.boundedyaml import Loader, inspect_node, yaml_error
from sources.convert import ConfigError, ConvertOptions, convert, describe, identify, object_id, type_of
from sources.validation import clip, show
from sources.waypoints import Unplaced, waypoint_deployments

log = structlog.get_logger(__name__)

DEFAULT_POLL_INTERVAL = 1.0
# A file modified this soon before we read it may change again without its mtime moving
# (coarse filesystem timestamps), so until it is older than this we compare contents even
# when stat() looks the same. The "racy clean" problem, as git calls it.
_RACY_WINDOW_NS = 2_000_000_000
# A local file describes one host's mesh: far below these. Kubernetes itself caps a request
# at 3 MiB and an object at 1.5 MiB.
MAX_FILE_BYTES = 16 * 1024 * 1024

# Where a document starts: "---" at column 0, with the directives ("%YAML", "%TAG") before it.
# YAML forbids a line that starts so inside any value, so this is where the parser splits too.
_DOCUMENT_START = re.compile(r"^(?:%[^\n]*\n)*---(?=[ \t\r\n]|$)", re.MULTILINE)
_CONTENT_LINE = re.compile(r"^[ \t]*[^\s#%]", re.MULTILINE)

ObjectId = tuple[str, str]  # (Kubernetes kind, "namespace/name" or "name"), see convert.identify


@dataclass(frozen=True, slots=True)
class Rejected:
    """One object (or document) of the file that is not in force as written."""

    error: ConfigError
    # The object it meant to be, when that can be told; None (a syntax error, no readable kind
    # or name) holds back every removal of that load.
    object: ObjectId | None
    kept: bool = False  # its last good version stays in force


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a file means: the objects to put in force, and what was rejected."""

    objects: tuple[MeshObject, ...]
    rejected: tuple[Rejected, ...] = ()
    removals_held: bool = False  # something unidentifiable was rejected: nothing was removed
    accepted: int = 0  # objects of the file in force as written (the rest of objects: carried)


# --- reading YAML, bounded ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Document:
    index: int
    data: Any = None
    error: ConfigError | None = None
    # With an error: apiVersion, kind and metadata name/namespace, when readable without
    # building the document (to name the object, and keep its last good version).
    head: Mapping[str, Any] | None = None
    # Keys given twice: (field path, reason). The object is refused with the first.
    duplicates: tuple[tuple[str, str], ...] = ()


def _chunks(text: str) -> Iterator[tuple[int, int, str]]:
    """(document index, first line, text) per document, split where the YAML parser splits.

    Parsing each document alone lets the others be read when one has a syntax error.
    """
    starts = [m.start() for m in _DOCUMENT_START.finditer(text)]
    bounds = [0, *starts] if not starts or starts[0] != 0 else starts
    index = 0
    line = 0
    for i, begin in enumerate(bounds):
        end = bounds[i + 1] if i + 1 < len(bounds) else len(text)
        chunk = text[begin:end]
        explicit = i > 0 or (starts and starts[0] == 0)
        if explicit or _CONTENT_LINE.search(chunk):
            yield index, line, chunk
            index += 1
        line += chunk.count("\n")


def _scalars(node: yaml.Node, keys: tuple[str, ...]) -> dict[str, Any]:
    """The plain string values of ``keys`` in a mapping node (no alias followed, nothing built)."""
    out: dict[str, Any] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value in keys:
                if isinstance(v, yaml.ScalarNode) and v.tag == "tag:yaml.org,2002:str":
                    out[k.value] = v.value
                elif isinstance(v, yaml.MappingNode):
                    out[k.value] = v
    return out


def _head(root: yaml.Node) -> dict[str, Any] | None:
    """What says which object a document is, read from its nodes: for one too big to build."""
    head = _scalars(root, ("apiVersion", "kind", "metadata"))
    md = head.get("metadata")
    if isinstance(md, yaml.Node):
        head["metadata"] = {
            k: v for k, v in _scalars(md, ("name", "namespace")).items() if isinstance(v, str)
        }
    else:
        head.pop("metadata", None)
    return head if isinstance(head.get("kind"), str) else None


def _documents(text: str, source: str) -> Iterator[_Document]:
    """Each YAML document, built only once it is known to be bounded; errors stay per document."""
    for index, line0, chunk in _chunks(text):
        loader = Loader(chunk)
        try:
            while loader.check_node():
                node = loader.get_node()
                if node is None:
                    continue
                too_big, duplicates = inspect_node(node, line0)
                if too_big is not None:
                    error = ConfigError(too_big, document_index=index, source=source)
                    yield _Document(index, error=error, head=_head(node))
                    break
                yield _Document(index, loader.construct_document(node), duplicates=tuple(duplicates))
        except yaml.YAMLError as e:
            yield _Document(
                index, error=ConfigError(yaml_error(e, line0), document_index=index, source=source)
            )
        except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as e:
            # PyYAML's own constructors: "2001-02-30", "!!int x", deep nesting without libyaml.
            reason = f"invalid YAML value: {type(e).__name__}: {clip(str(e), 200)}"
            yield _Document(index, error=ConfigError(reason, document_index=index, source=source))
        finally:
            loader.dispose()


def _items(doc: Any) -> Iterator[tuple[str, Any]]:
    """The objects of one document: itself, or the items of a ``kind: List``."""
    if isinstance(doc, Mapping) and doc.get("kind") == "List" and doc.get("apiVersion") == "v1":
        items = doc.get("items")
        if items is None:
            return
        if not isinstance(items, list):
            raise ConfigError("must be a list", field="items", kind="List")
        for i, item in enumerate(items):
            yield f"items[{i}]", item
    else:
        yield "", doc


@dataclass(frozen=True, slots=True)
class _Entry:
    """An object on its way into force, and where it came from."""

    obj: MeshObject
    id: ObjectId
    seq: int  # file order; carried objects come after the file's
    document_index: int | None = None  # None: its last good version, carried over
    field_prefix: str = ""  # "items[3]" inside a List document, else ""
    in_force: bool = False  # exactly what is in force now


def _read(text: str, source: str, options: ConvertOptions) -> tuple[list[_Entry], list[Rejected]]:
    """Every object the file declares, converted and checked alone; what failed, rejected."""
    entries: list[_Entry] = []
    rejected: list[Rejected] = []
    for document in _documents(text, source):
        index = document.index
        if document.error is not None:
            if document.head is not None and document.head.get("kind") != "List":
                kind, name = describe(document.head)
                rejected.append(
                    Rejected(document.error.with_context(kind=kind, name=name), identify(document.head))
                )
            else:
                rejected.append(Rejected(document.error, None))
            continue
        if document.data is None:  # empty document, e.g. a trailing "---"
            continue
        try:
            items = list(_items(document.data))
            duplicates = list(document.duplicates)
            stray = next(
                ((f, r) for f, r in duplicates if not any(_under(f, p) for p, _ in items)),
                None,
            )
            if stray is not None:  # in a List document, outside its items
                raise ConfigError(stray[1], field=stray[0])
        except ConfigError as e:
            rejected.append(Rejected(e.with_context(document_index=index, source=source), None))
            continue
        for prefix, item in items:
            if not isinstance(item, Mapping):
                error = ConfigError(
                    f"must be a mapping (a Kubernetes object), not {type(item).__name__}",
                    field=prefix,
                    document_index=index,
                    source=source,
                )
                rejected.append(Rejected(error, None))
                continue
            kind, name = describe(item)
            ident = identify(item)
            try:
                dup = next(((f, r) for f, r in duplicates if _under(f, prefix)), None)
                if dup is not None:
                    field = dup[0][len(prefix) :].lstrip(".")
                    if field in ("apiVersion", "kind", "metadata", "metadata.name", "metadata.namespace"):
                        ident = None  # which object this is, is itself in doubt
                    raise ConfigError(dup[1], field=field)
                obj = convert(item, options)
            except ConfigError as e:
                error = e.with_context(
                    kind=kind, name=name, field_prefix=prefix, document_index=index, source=source
                )
                rejected.append(Rejected(error, ident))
                continue
            if obj is None:
                api_version, kind_ = type_of(item)
                log.warning(
                    "local config: ignored a ConfigMap (only istio-system/istio, the mesh config, is read)"
                    if kind_ == "ConfigMap"
                    else "local config: ignored an object of unknown kind",
                    source=source,
                    document=index,
                    api_version=clip(api_version, 100),
                    kind=clip(kind_, 100),
                    name=name,
                )
                continue
            entries.append(_Entry(obj, object_id(obj), len(entries), index, prefix))
    return entries, rejected


def _under(field: str, prefix: str) -> bool:
    return not prefix or field == prefix or field.startswith(prefix + ".")


def _where(e: _Entry) -> str:
    kind, name = e.id
    if e.document_index is None:
        return f"{kind} {name} (in force from an earlier version of the file)"
    item = f" {e.field_prefix}" if e.field_prefix else ""
    return f"{kind} {name} (document[{e.document_index}]{item})"


def _fail(e: _Entry, field: str, reason: str, source: str) -> Rejected:
    error = ConfigError(
        reason,
        field=f"{e.field_prefix}.{field}" if e.field_prefix else field,
        kind=e.id[0],
        name=e.id[1],
        document_index=e.document_index,
        source=source,
    )
    return Rejected(error, e.id)


def _conflicts(entries: Sequence[_Entry], source: str) -> list[tuple[_Entry, Rejected]]:
    """One pass of what the API server guarantees across objects: the first of two wins."""
    out: list[tuple[_Entry, Rejected]] = []
    ids: dict[ObjectId, _Entry] = {}
    keys: dict[tuple[Kind, str], _Entry] = {}
    pod_ips: dict[str, _Entry] = {}
    vips: dict[str, _Entry] = {}
    for e in entries:
        obj = e.obj
        first = ids.get(e.id)
        if first is not None:
            out.append((e, _fail(e, "metadata.name", f"duplicate of {_where(first)}", source)))
            continue
        first = keys.get((obj.KIND, obj.key))
        if first is not None:  # two pods with one uid
            out.append((e, _fail(e, "metadata.uid", f"uid {obj.key} is also {_where(first)}", source)))
            continue
        ips = obj.ips if isinstance(obj, Workload) and not obj.host_network else ()
        clash = next((ip for ip in ips if ip in pod_ips), None)
        if clash is not None:
            out.append(
                (
                    e,
                    _fail(
                        e, "status.podIP", f"{clash} is already the IP of {_where(pod_ips[clash])}", source
                    ),
                )
            )
            continue
        own_vips = obj.vips if isinstance(obj, Service) else ()
        clash = next((vip for vip in own_vips if vip in vips), None)
        if clash is not None:
            out.append(
                (e, _fail(e, "spec.clusterIP", f"{clash} is already the IP of {_where(vips[clash])}", source))
            )
            continue
        ids[e.id] = keys[obj.KIND, obj.key] = e
        pod_ips.update(dict.fromkeys(ips, e))
        vips.update(dict.fromkeys(own_vips, e))
    return out


def _settle(
    entries: list[_Entry], rejected: list[Rejected], previous: Mapping[ObjectId, MeshObject], source: str
) -> Manifest:
    """Cross-object checks, and the last good version of whatever is rejected."""
    present = {e.id for e in entries}
    seq = len(entries)

    def carried(ident: ObjectId) -> _Entry:
        nonlocal seq
        seq += 1
        return _Entry(previous[ident], ident, seq, in_force=True)

    # What was rejected alone keeps its last good version; if something was rejected that we
    # cannot name, everything in force stays (it may be the only place an object is declared).
    removals_held = any(r.object is None for r in rejected)
    keep = {r.object for r in rejected if r.object is not None}
    if removals_held:
        keep |= set(previous)
    entries = [dataclasses.replace(e, in_force=previous.get(e.id) == e.obj) for e in entries]
    entries += [carried(i) for i in sorted(keep - present) if i in previous]

    def fallback(e: _Entry, remaining: list[_Entry]) -> list[_Entry]:
        """``e`` is rejected: its last good version instead, if it has one that is not ``e``."""
        if e.in_force or e.id not in previous or any(o.id == e.id for o in remaining):
            return []
        return [carried(e.id)]

    # Pods on nodes the file does not declare. The nodes themselves are only ever rejected as
    # duplicates, so the set of node names is known up front.
    nodes = {e.obj.name for e in entries if e.obj.KIND is Kind.NODE}
    problems: list[Rejected] = []
    settled: list[_Entry] = []
    for e in entries:
        if isinstance(e.obj, Workload) and e.obj.node and e.obj.node not in nodes:
            problems.append(
                _fail(e, "spec.nodeName", f"no Node named {show(e.obj.node)} in this file", source)
            )
            others = [o for o in entries if o is not e]
            settled += [
                c for c in fallback(e, others) if not isinstance(c.obj, Workload) or c.obj.node in nodes
            ]
        else:
            settled.append(e)
    entries = settled

    # Uniqueness: what is in force wins over what is new or changed, then file order decides.
    # A rejected object's last good version joins what is in force, and is checked in turn.
    while True:
        entries.sort(key=lambda e: (not e.in_force, e.seq))
        conflicts = _conflicts(entries, source)
        if not conflicts:
            break
        losers = {id(e) for e, _ in conflicts}
        remaining = [e for e in entries if id(e) not in losers]
        for e, problem in conflicts:
            problems.append(problem)
            remaining += fallback(e, remaining)
        entries = remaining

    entries.sort(key=lambda e: e.seq)
    from_previous = {e.id for e in entries if e.document_index is None}
    every = [*rejected, *problems]
    every = [dataclasses.replace(r, kept=r.object in from_previous) for r in every]
    every.sort(key=lambda r: -1 if r.error.document_index is None else r.error.document_index)
    accepted = sum(1 for e in entries if e.document_index is not None)
    return Manifest(tuple(e.obj for e in entries), tuple(every), removals_held, accepted)


def _strict(options: ConvertOptions | None) -> ConvertOptions:
    return dataclasses.replace(options or ConvertOptions(), reject_unknown_fields=True)


def read_manifest(
    text: str,
    *,
    source: str = "<string>",
    options: ConvertOptions | None = None,
    previous: Mapping[ObjectId, MeshObject] | None = None,
) -> Manifest:
    """What a manifest means, object by object: never raises for what is in the text.

    ``previous`` is what is in force (by :func:`~sources.convert.object_id`): a rejected object
    keeps its version from there. Unknown fields are always refused here (a local file has no
    API server to prune them), whatever ``options`` says.
    """
    entries, rejected = _read(text, source, _strict(options))
    return _settle(entries, rejected, previous or {}, source)


def parse_manifest(
    text: str, *, source: str = "<string>", options: ConvertOptions | None = None
) -> list[MeshObject]:
    """Every mesh object a manifest describes, or ConfigError for the first problem.

    All or nothing, for callers that must not act on half a file (``ambientctl policy check``,
    the waypoint supervisor); :func:`read_manifest` and :class:`LocalSource` apply what is good.
    """
    manifest = read_manifest(text, source=source, options=options)
    if manifest.rejected:
        raise manifest.rejected[0].error
    return list(manifest.objects)


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The outcome of one (re)load attempt, for whoever wants to watch reloads happen."""

    path: str
    digest: str
    delta: Delta | None = None  # None when it failed, or when nothing changed
    error: ConfigError | None = None  # the file as a whole was refused: nothing of it applied
    rejected: tuple[Rejected, ...] = ()  # objects not in force as written (the rest applied)

    @property
    def ok(self) -> bool:
        """The file is in force exactly as written."""
        return self.error is None and not self.rejected

    @property
    def applied(self) -> bool:
        """The file is in force, but for the objects in :attr:`rejected`."""
        return self.error is None


def assume_local_redirection(objects: list[MeshObject]) -> list[MeshObject]:
    """Local mode: an enrolled pod is reached over HBONE, without the redirection annotation.

    In Kubernetes the cni agent annotates a pod ``ambient.istio.io/redirection=enabled`` once its
    traffic is captured, and that annotation is what makes discovery announce the pod as HBONE.
    A local file has no API server for the agent to write to, so here the enrollment labels
    decide directly (the same rules the agent applies, from ``mesh.enrollment``). Until the
    agent has set the pod up, peers' HBONE connections to it are refused: fail closed.
    """
    namespaces = {o.name: o for o in objects if isinstance(o, Namespace)}
    out: list[MeshObject] = []
    for obj in objects:
        if (
            isinstance(obj, Workload)
            and obj.tunnel_protocol is TunnelProtocol.NONE
            and obj.node
            and decide(namespaces.get(obj.namespace), obj, obj.node).enrolled
        ):
            out.append(dataclasses.replace(obj, tunnel_protocol=TunnelProtocol.HBONE))
        else:
            out.append(obj)
    return out


class LocalSource:
    """Keeps the store equal to the file: :meth:`load` once, then :meth:`start` to follow it.

    A :class:`~sources.WorkloadSource`: synced once a version of the file is in force.

    Changes are found by polling (stat, then a content hash), which works the same on every
    filesystem, inside containers and across editors' replace-by-rename saves, where inotify
    needs care. ``on_load`` is called after every attempt that read new contents.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        store: Store,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        options: ConvertOptions | None = None,
        on_load: Callable[[LoadResult], None] | None = None,
    ) -> None:
        self._path = Path(path)
        self._store = store
        self._poll_interval = poll_interval
        self._options = options or ConvertOptions()
        self._on_load = on_load
        self._task: asyncio.Task[None] | None = None
        self._stat_key: tuple[int, int, int, int] | None = None
        self._read_at_ns = 0
        self._digest: str | None = None  # of the contents last attempted
        self._last_error: ConfigError | None = None
        # What is in force, as the file declared it (before waypoints and redirection): where a
        # rejected object's last good version comes from.
        self._good: dict[ObjectId, MeshObject] = {}
        self._synced = False  # a version of the file is in force in the store
        # Set once synced, or once stopped: what wait_synced() waits for. Not bound to a loop
        # until awaited, so load() may run before the event loop does.
        self._settled = asyncio.Event()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def store(self) -> Store:
        return self._store

    @property
    def last_error(self) -> ConfigError | None:
        """Why the current file contents are not in force as written; None when they are.

        The file-level error when the file was refused whole, else the first rejected object's
        (:attr:`LoadResult.rejected` has them all).
        """
        return self._last_error

    # --- one load ----------------------------------------------------------------------------

    def _read(self) -> tuple[tuple[int, int, int, int] | None, int, bytes | None, str | None]:
        read_at = time.time_ns()
        try:
            with self._path.open("rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            return None, read_at, None, e.strerror or str(e)
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev), read_at, data, None

    def _parse(self, data: bytes | None, read_error: str | None) -> tuple[Manifest, list[MeshObject]]:
        """(what the file means, the objects for the store); ConfigError when it is refused whole."""
        source = str(self._path)
        if data is None:
            raise ConfigError(f"cannot read the file: {read_error}", source=source)
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError(f"larger than {MAX_FILE_BYTES} bytes", source=source)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start})", source=source) from None
        manifest = read_manifest(text, source=source, options=self._options, previous=self._good)
        objects = list(manifest.objects)
        placements, added = waypoint_deployments(objects)
        for p in placements:
            if isinstance(p, Unplaced):
                log.warning("waypoint not deployed", gateway=p.gateway.key, reason=p.reason)
        return manifest, assume_local_redirection([*objects, *added])

    def _apply(self, digest: str, parsed: tuple[Manifest, list[MeshObject]] | ConfigError) -> LoadResult:
        path = str(self._path)
        if isinstance(parsed, ConfigError):
            result = LoadResult(path, digest, error=parsed)
        elif parsed[0].rejected and not parsed[0].accepted:
            # Nothing of the file could be read: refused whole, as a file that is not YAML.
            manifest = parsed[0]
            result = LoadResult(path, digest, error=manifest.rejected[0].error, rejected=manifest.rejected)
        else:
            manifest, objects = parsed
            delta = self._store.replace_all(objects)
            self._good = {object_id(o): o for o in manifest.objects}
            result = LoadResult(path, digest, delta=delta, rejected=manifest.rejected)
            self._synced = True
            self._settled.set()
            if manifest.removals_held:
                log.warning(
                    "local config: nothing removed in this load: a rejected document or object "
                    "could not be told apart, so everything in force that the file no longer "
                    "declares is kept until it reads cleanly",
                    path=path,
                )
        self._last_error = result.error or (result.rejected[0].error if result.rejected else None)
        self._log(result)
        if self._on_load is not None:
            self._on_load(result)
        return result

    def _log(self, result: LoadResult) -> None:
        for r in result.rejected:
            e = r.error
            log.error(
                "local config rejected",
                path=str(self._path),
                error=str(e),
                document=e.document_index,
                kind=e.kind,
                name=e.name,
                field=e.field,
                reason=e.reason,
                whole_file=result.error is not None,
                kept_last_good=r.kept or result.error is not None,
                kept_version=self._store.version,
            )
        if result.error is not None:
            e = result.error
            if not result.rejected:
                log.error(
                    "local config rejected",
                    path=str(self._path),
                    error=str(e),
                    document=e.document_index,
                    kind=e.kind,
                    name=e.name,
                    field=e.field,
                    reason=e.reason,
                    whole_file=True,
                    kept_version=self._store.version,
                )
        elif result.delta is None:
            log.info("local config unchanged", path=str(self._path), version=self._store.version)
        else:
            d = result.delta
            log.info(
                "local config loaded",
                path=str(self._path),
                version=d.version,
                upserted={k.value: len(v) for k, v in d.upserted.items()},
                removed={k.value: len(v) for k, v in d.removed.items()},
                rejected=len(result.rejected),
            )

    def load(self) -> Delta | None:
        """Load the file now, as a reload would; ConfigError if it is not in force as written.

        Everything that is good applies (a rejected object keeps its last good version, if it
        had one) and then the first problem is raised, so a caller starting up can refuse to
        run on a file with a mistake in it. A file refused whole changes nothing. Returns the
        change it made, None if the store already matched the file.
        """
        stat_key, read_at, data, read_error = self._read()
        digest = hashlib.sha256(data).hexdigest() if data is not None else ""
        self._stat_key, self._read_at_ns, self._digest = stat_key, read_at, digest
        try:
            parsed: tuple[Manifest, list[MeshObject]] | ConfigError = self._parse(data, read_error)
        except ConfigError as e:
            parsed = e
        result = self._apply(digest, parsed)
        if self._last_error is not None:
            raise self._last_error
        return result.delta

    # --- following the file ----------------------------------------------------------------

    async def poll_once(self) -> LoadResult | None:
        """Reload if the file changed since the last attempt; None when it did not."""
        try:
            st = await asyncio.to_thread(os.stat, self._path)
            stat_key: tuple[int, int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        except OSError:
            stat_key = None
        racy = stat_key is not None and self._read_at_ns - stat_key[0] < _RACY_WINDOW_NS
        if stat_key == self._stat_key and not racy and self._digest is not None:
            return None
        stat_key, read_at, data, read_error = await asyncio.to_thread(self._read)
        self._stat_key, self._read_at_ns = stat_key, read_at
        digest = hashlib.sha256(data).hexdigest() if data is not None else ""
        if digest == self._digest:
            return None
        self._digest = digest
        try:
            parsed: tuple[Manifest, list[MeshObject]] | ConfigError = await asyncio.to_thread(
                self._parse, data, read_error
            )
        except ConfigError as e:
            parsed = e
        # Applied on the event loop thread: store subscribers expect to be called there.
        return self._apply(digest, parsed)

    async def run(self) -> None:
        """Follow the file until cancelled (for a caller that owns the task itself)."""
        while True:
            try:
                await self.poll_once()
            except Exception:
                # A subscriber blowing up must not stop us following the file.
                log.exception("local config poll failed", path=str(self._path))
            await asyncio.sleep(self._poll_interval)

    def start(self) -> None:
        """Start following the file in a task this object owns; :meth:`astop` ends it."""
        if self._task is not None:
            raise RuntimeError("LocalSource already started")
        if not self._synced:
            self._settled.clear()  # stopped before, never loaded: wait for this run
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"sources.local:{self._path}")

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until a version of the file is in force: at once after a successful :meth:`load`.

        While the file is refused (or missing) the store holds nothing of it, so this keeps
        waiting for a good version. False on timeout, or when stopped before that.
        """
        if not self._settled.is_set():
            try:
                await asyncio.wait_for(self._settled.wait(), timeout)
            except TimeoutError:
                return False
        return self._synced

    async def astop(self) -> None:
        """Stop following the file and wait for the task to end; idempotent."""
        self._settled.set()
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # Our own cancellation of the task; re-raise only if we are being cancelled too.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    async def __aenter__(self) -> LocalSource:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()


def _conforms(source: LocalSource) -> WorkloadSource:
    """Never called: where mypy checks that LocalSource satisfies the seam."""
    return source
