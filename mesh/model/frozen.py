"""An immutable, hashable mapping for the fields of frozen model objects.

Model objects are compared (to compute deltas) and shared between tasks and threads without
copying, so their labels, selectors and annotations must not be mutable behind the store's
back, and equal objects must hash equal. ``types.MappingProxyType`` is read-only but neither
hashable nor a guarantee (whoever holds the dict can still change it); this copies once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """A read-only copy of a mapping; equal to any mapping with the same items."""

    __slots__ = ("_data", "_hash")

    _data: dict[K, V]
    _hash: int | None

    @overload
    def __init__(self) -> None: ...
    @overload
    def __init__(self, data: Mapping[K, V]) -> None: ...
    @overload
    def __init__(self, data: Iterable[tuple[K, V]]) -> None: ...

    def __init__(self, data: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data = dict(data)
        self._hash = None

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


def freeze_fields(obj: Any, *names: str) -> None:
    """Replace the named mapping attributes of a frozen dataclass by frozen copies.

    For ``__post_init__``: callers may pass plain dicts, the object must still end up
    immutable and hashable, and frozen dataclasses only allow this via object.__setattr__.
    """
    for name in names:
        value = getattr(obj, name)
        if value is not None and not isinstance(value, FrozenMap):
            object.__setattr__(obj, name, FrozenMap(value))


def tuple_fields(obj: Any, *names: str) -> None:
    """Like :func:`freeze_fields`, for sequence attributes (a list becomes a tuple)."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, tuple):
            object.__setattr__(obj, name, tuple(value))
