"""A thread-safe set of change callbacks, copied on write so that notifying takes no lock."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Subscribers(Generic[T]):
    """Callbacks taking one argument. ``add`` returns the function that removes the callback;
    ``snapshot`` is the tuple to call, unaffected by later adds and removes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.snapshot: tuple[Callable[[T], None], ...] = ()

    def add(self, callback: Callable[[T], None]) -> Callable[[], None]:
        with self._lock:
            self.snapshot = (*self.snapshot, callback)

        def remove() -> None:
            with self._lock:
                self.snapshot = tuple(s for s in self.snapshot if s is not callback)

        return remove
