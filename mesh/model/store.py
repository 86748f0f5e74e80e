"""The one place mesh state changes; everybody else reads its snapshots (mesh.model.snapshot).

Sources (the local YAML file, the Kubernetes API) write; the CA, discovery server, node agent
and ztunnel read. Readers take a :class:`Snapshot` and may keep it as long as they like: it
never changes, so a decision made on it is made on one consistent state, without locks.
Each effective change makes a new snapshot (copy-on-write per kind, indexes rebuilt only for
the kinds that changed, or updated in place for a change to few workloads and services) and
a :class:`Delta` for subscribers, numbered by a version that only grows. Applying something already in force
changes nothing and notifies nobody, which makes sources idempotent for free.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import TypeAlias

import structlog

from mesh.model.frozen import FrozenMap
from mesh.model.indexes import mutable_copy
from mesh.model.objects import Kind
from mesh.model.snapshot import Delta, MeshObject, Snapshot
from mesh.subscribers import Subscribers

log = structlog.get_logger(__name__)

_NO_KEYS: frozenset[str] = frozenset()


Unsubscribe: TypeAlias = Callable[[], None]


class DeltaQueue:
    """An asyncio queue of deltas for one subscriber; close it (or use ``with``) when done.

    Bound to the event loop it was created on; deltas committed from another thread are
    handed over with ``call_soon_threadsafe`` so the store can be written from anywhere.
    """

    def __init__(self, store: Store) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._unsubscribe = store.subscribe(self._deliver)

    def _deliver(self, delta: Delta) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._queue.put_nowait(delta)
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    async def get(self) -> Delta:
        return await self._queue.get()

    def get_nowait(self) -> Delta:
        """Raises ``asyncio.QueueEmpty`` when nothing is pending."""
        return self._queue.get_nowait()

    def empty(self) -> bool:
        return self._queue.empty()

    def close(self) -> None:
        self._unsubscribe()

    def __enter__(self) -> DeltaQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self

    async def __anext__(self) -> Delta:
        return await self._queue.get()


class StoreError(ValueError):
    """A write the store refuses as a whole (nothing of it was applied)."""


class Store:
    """Holds the current :class:`Snapshot`; every write goes through here.

    Writes are atomic: a batch either commits as one new version or raises and changes
    nothing. Subscribers are called synchronously, in version order, after each commit and
    before the write returns; they must not write to the store themselves.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._snapshot = Snapshot()
        self._subscribers: Subscribers[Delta] = Subscribers()
        self._notifying = False

    @property
    def version(self) -> int:
        return self._snapshot.version

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # --- writes ----------------------------------------------------------------------------

    def replace_all(self, objects: Iterable[MeshObject]) -> Delta | None:
        """Make ``objects`` the whole state: anything not among them is deleted."""
        new: dict[Kind, dict[str, MeshObject]] = {k: {} for k in Kind}
        for obj in objects:
            bucket = new[obj.KIND]
            if obj.key in bucket:
                raise StoreError(f"duplicate {obj.KIND.value} {obj.key!r}")
            bucket[obj.key] = obj
        with self._write():
            current = self._snapshot
            changed: dict[Kind, dict[str, MeshObject]] = {}
            upserted: dict[Kind, frozenset[str]] = {}
            removed: dict[Kind, frozenset[str]] = {}
            for kind in Kind:
                old, want = current.objects(kind), new[kind]
                ups = frozenset(k for k, v in want.items() if old.get(k) != v)
                gone = frozenset(k for k in old if k not in want)
                if not ups and not gone:
                    continue
                # The previous snapshot's objects where they are equal, as ``apply`` keeps them:
                # then its indexes can be updated for the few keys a resync usually changes.
                d = mutable_copy(old)
                for k in gone:
                    del d[k]
                for k, v in want.items():
                    if k in ups:
                        d[k] = v
                changed[kind] = d
                if ups:
                    upserted[kind] = ups
                if gone:
                    removed[kind] = gone
            return self._commit(changed, upserted, removed)

    def upsert(self, *objects: MeshObject) -> Delta | None:
        return self.apply(upserts=objects)

    def delete(self, kind: Kind, *keys: str) -> Delta | None:
        """Delete by key; keys not present are ignored (deletes are idempotent)."""
        return self.apply(deletes=[(kind, k) for k in keys])

    def apply(
        self,
        upserts: Iterable[MeshObject] = (),
        deletes: Iterable[tuple[Kind, str]] = (),
    ) -> Delta | None:
        """Upsert and delete in one atomic step. Returns None when nothing changed."""
        ups: dict[Kind, dict[str, MeshObject]] = defaultdict(dict)
        for obj in upserts:
            if obj.key in ups[obj.KIND]:
                raise StoreError(f"{obj.KIND.value} {obj.key!r} upserted twice in one batch")
            ups[obj.KIND][obj.key] = obj
        dels: dict[Kind, set[str]] = defaultdict(set)
        for kind, key in deletes:
            if key in ups.get(kind, {}):
                raise StoreError(f"{kind.value} {key!r} both upserted and deleted in one batch")
            dels[kind].add(key)
        with self._write():
            current = self._snapshot
            changed: dict[Kind, dict[str, MeshObject]] = {}
            upserted: dict[Kind, frozenset[str]] = {}
            removed: dict[Kind, frozenset[str]] = {}
            for kind in set(ups) | set(dels):
                old = current.objects(kind)
                k_ups = frozenset(k for k, v in ups.get(kind, {}).items() if old.get(k) != v)
                k_dels = frozenset(k for k in dels.get(kind, ()) if k in old)
                if not k_ups and not k_dels:
                    continue
                d = mutable_copy(old)
                for k in k_ups:
                    d[k] = ups[kind][k]
                for k in k_dels:
                    del d[k]
                changed[kind] = d
                if k_ups:
                    upserted[kind] = k_ups
                if k_dels:
                    removed[kind] = k_dels
            return self._commit(changed, upserted, removed)

    def _write(self) -> _WriteGuard:
        return _WriteGuard(self)

    def _commit(
        self,
        changed: Mapping[Kind, dict[str, MeshObject]],
        upserted: dict[Kind, frozenset[str]],
        removed: dict[Kind, frozenset[str]],
    ) -> Delta | None:
        """Called with the lock held. The objects not among ``upserted`` and ``removed`` must
        be the previous snapshot's own, so that its indexes can be updated in place."""
        if not changed:
            return None
        previous = self._snapshot
        objects = {k: previous.objects(k) for k in Kind}
        for kind, d in changed.items():
            objects[kind] = MappingProxyType(d)  # a read-only view: Snapshot takes it as is, no copy
        touched = {k: upserted.get(k, _NO_KEYS) | removed.get(k, _NO_KEYS) for k in changed}
        snapshot = Snapshot(
            previous.version + 1, objects, _previous=previous, _changed=frozenset(changed), _touched=touched
        )
        self._snapshot = snapshot
        delta = Delta(
            version=snapshot.version,
            upserted=FrozenMap(upserted),
            removed=FrozenMap(removed),
            previous=previous,
            snapshot=snapshot,
        )
        self._notify(delta)
        return delta

    def _notify(self, delta: Delta) -> None:
        self._notifying = True
        try:
            for callback in self._subscribers.snapshot:
                try:
                    callback(delta)
                except Exception:
                    # One broken subscriber must not keep the others (or the writer) from
                    # seeing the change; it is its job to recover from the snapshot.
                    log.exception("store subscriber failed", version=delta.version)
        finally:
            self._notifying = False

    # --- subscriptions ---------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Delta], None]) -> Unsubscribe:
        """Call ``callback`` with every future delta; returns the function that stops it."""
        return self._subscribers.add(callback)

    def subscribe_queue(self) -> DeltaQueue:
        """An asyncio queue of future deltas (call from inside the event loop)."""
        return DeltaQueue(self)


class _WriteGuard:
    """Takes the store lock and refuses writes made from inside a subscriber callback,
    which would otherwise reorder the deltas other subscribers see."""

    __slots__ = ("_store",)

    def __init__(self, store: Store) -> None:
        self._store = store

    def __enter__(self) -> None:
        self._store._lock.acquire()
        if self._store._notifying:
            self._store._lock.release()
            raise RuntimeError("the store was written to from one of its subscribers")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._store._lock.release()
