"""Local mode's source of truth: a multi-document YAML file of plain Kubernetes objects.

The file is the whole state: loading it replaces everything in the :class:`Store`, so an
object removed from the file is deleted from the mesh. Loading is all or nothing: one bad
document refuses the whole file (a half-applied file could, say, drop a DENY policy while
keeping the workloads it protected), and on a reload the last good state stays in force.
Beyond what :mod:`sources.convert` checks per object, this checks what the API server
would have guaranteed across objects: no duplicates, no IP used twice, pods on known nodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
import yaml

from mesh.enrollment import decide
from mesh.model import Delta, Kind, MeshObject, Namespace, Service, Store, TunnelProtocol, Workload
from sources import WorkloadSource
from sources.convert import ConfigError, ConvertOptions, convert, describe, type_of
from sources.waypoints import Unplaced, waypoint_deployments

log = structlog.get_logger(__name__)

DEFAULT_POLL_INTERVAL = 1.0
# A file modified this soon before we read it may change again without its mtime moving
# (coarse filesystem timestamps), so until it is older than this we compare contents even
# when stat() looks the same. The "racy clean" problem, as git calls it.
_RACY_WINDOW_NS = 2_000_000_000

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class _Located:
    obj: MeshObject
    document_index: int
    field_prefix: str  # "items[3]" inside a List document, else ""


def _documents(text: str, source: str) -> Iterator[tuple[int, Any]]:
    """(index, data) per YAML document; a syntax error names the document it is in."""
    loader = _Loader(text)
    index = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            yield index, loader.construct_document(node)
            index += 1
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"invalid YAML{where}: {e.problem or e.context}",
            document_index=index,
            source=source,
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", document_index=index, source=source) from None
    finally:
        loader.dispose()


def _expand(doc: Any) -> Iterator[tuple[str, Any]]:
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


def parse_manifest(
    text: str, *, source: str = "<string>", options: ConvertOptions | None = None
) -> list[MeshObject]:
    """Every mesh object a manifest describes, or ConfigError for the first problem."""
    located: list[_Located] = []
    for index, doc in _documents(text, source):
        if doc is None:  # empty document, e.g. a trailing "---"
            continue
        try:
            for prefix, item in _expand(doc):
                kind, name = describe(item) if isinstance(item, Mapping) else (None, None)
                try:
                    if not isinstance(item, Mapping):
                        raise ConfigError(
                            f"must be a mapping (a Kubernetes object), not {type(item).__name__}"
                        )
                    obj = convert(item, options)
                    if obj is None:
                        api_version, kind = type_of(item)
                        log.warning(
                            "local config: ignored an object of unknown kind",
                            source=source,
                            document=index,
                            api_version=api_version,
                            kind=kind,
                            name=name,
                        )
                        continue
                except ConfigError as e:
                    raise e.with_context(kind=kind, name=name, field_prefix=prefix) from None
                located.append(_Located(obj, index, prefix))
        except ConfigError as e:
            raise e.with_context(document_index=index, source=source) from None
    _check_references(located, source)
    return [loc.obj for loc in located]


def _fail(loc: _Located, field: str, reason: str, source: str) -> ConfigError:
    return ConfigError(
        reason,
        field=f"{loc.field_prefix}.{field}" if loc.field_prefix else field,
        kind=loc.obj.KIND.value if loc.obj.KIND is not Kind.WORKLOAD else "Pod",
        name=_display_name(loc.obj),
        document_index=loc.document_index,
        source=source,
    )


def _display_name(obj: MeshObject) -> str:
    if isinstance(obj, Workload):
        return f"{obj.namespace}/{obj.name}"
    return obj.key


def _where(loc: _Located) -> str:
    item = f" {loc.field_prefix}" if loc.field_prefix else ""
    kind = "Pod" if loc.obj.KIND is Kind.WORKLOAD else loc.obj.KIND.value
    return f"{kind} {_display_name(loc.obj)} (document[{loc.document_index}]{item})"


def _check_references(located: list[_Located], source: str) -> None:
    """What the API server guarantees across objects, and a hand-written file may break."""
    seen: dict[tuple[Kind, str], _Located] = {}
    pod_names: dict[tuple[str, str], _Located] = {}
    pod_ips: dict[str, _Located] = {}
    vips: dict[str, _Located] = {}
    nodes = {loc.obj.name for loc in located if loc.obj.KIND is Kind.NODE}
    for loc in located:
        obj = loc.obj
        if isinstance(obj, Workload):
            first = pod_names.get((obj.namespace, obj.name))
            if first is not None:
                raise _fail(loc, "metadata.name", f"duplicate of {_where(first)}", source)
            pod_names[obj.namespace, obj.name] = loc
            first = seen.get((obj.KIND, obj.key))
            if first is not None:
                raise _fail(loc, "metadata.uid", f"uid {obj.uid} is also {_where(first)}", source)
            if obj.node and obj.node not in nodes:
                raise _fail(loc, "spec.nodeName", f"no Node named {obj.node!r} in this file", source)
            if not obj.host_network:
                for ip in obj.ips:
                    first = pod_ips.get(ip)
                    if first is not None:
                        raise _fail(loc, "status.podIP", f"{ip} is already the IP of {_where(first)}", source)
                    pod_ips[ip] = loc
        else:
            first = seen.get((obj.KIND, obj.key))
            if first is not None:
                raise _fail(loc, "metadata.name", f"duplicate of {_where(first)}", source)
        if isinstance(obj, Service):
            for vip in obj.vips:
                first = vips.get(vip)
                if first is not None:
                    raise _fail(loc, "spec.clusterIP", f"{vip} is already the IP of {_where(first)}", source)
                vips[vip] = loc
        seen[obj.KIND, obj.key] = loc


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The outcome of one (re)load attempt, for whoever wants to watch reloads happen."""

    path: str
    digest: str
    delta: Delta | None = None  # None when it failed, or when nothing changed
    error: ConfigError | None = None

    @property
    def ok(self) -> bool:
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
        """Why the current file contents are refused; None when they are in force."""
        return self._last_error

    # --- one load ----------------------------------------------------------------------------

    def _read(self) -> tuple[tuple[int, int, int, int] | None, int, bytes | None, str | None]:
        read_at = time.time_ns()
        try:
            with self._path.open("rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except OSError as e:
            return None, read_at, None, e.strerror or str(e)
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev), read_at, data, None

    def _parse(self, data: bytes | None, read_error: str | None) -> list[MeshObject]:
        if data is None:
            raise ConfigError(f"cannot read the file: {read_error}", source=str(self._path))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"not UTF-8 text ({e.reason} at byte {e.start})", source=str(self._path)
            ) from None
        objects = parse_manifest(text, source=str(self._path), options=self._options)
        placements, added = waypoint_deployments(objects)
        for p in placements:
            if isinstance(p, Unplaced):
                log.warning("waypoint not deployed", gateway=p.gateway.key, reason=p.reason)
        return assume_local_redirection([*objects, *added])

    def _apply(self, digest: str, parsed: list[MeshObject] | ConfigError) -> LoadResult:
        if isinstance(parsed, ConfigError):
            self._last_error = parsed
            result = LoadResult(str(self._path), digest, error=parsed)
        else:
            self._last_error = None
            delta = self._store.replace_all(parsed)
            result = LoadResult(str(self._path), digest, delta=delta)
            self._synced = True
            self._settled.set()
        self._log(result)
        if self._on_load is not None:
            self._on_load(result)
        return result

    def _log(self, result: LoadResult) -> None:
        if result.error is not None:
            e = result.error
            log.error(
                "local config rejected",
                path=str(self._path),
                error=str(e),
                document=e.document_index,
                kind=e.kind,
                name=e.name,
                field=e.field,
                reason=e.reason,
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
            )

    def load(self) -> Delta | None:
        """Load the file now; raises ConfigError (and changes nothing) if it is refused.

        Returns the change it made, None if the store already matched the file.
        """
        stat_key, read_at, data, read_error = self._read()
        digest = hashlib.sha256(data).hexdigest() if data is not None else ""
        self._stat_key, self._read_at_ns, self._digest = stat_key, read_at, digest
        try:
            parsed: list[MeshObject] | ConfigError = self._parse(data, read_error)
        except ConfigError as e:
            parsed = e
        result = self._apply(digest, parsed)
        if result.error is not None:
            raise result.error
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
            parsed: list[MeshObject] | ConfigError = await asyncio.to_thread(self._parse, data, read_error)
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
