"""mesh.subscribers: add, remove, and a snapshot that later changes do not touch."""

from __future__ import annotations

from mesh.subscribers import Subscribers


def test_add_remove_and_snapshot() -> None:
    subs: Subscribers[int] = Subscribers()
    seen: list[tuple[str, int]] = []
    remove_a = subs.add(lambda v: seen.append(("a", v)))
    subs.add(lambda v: seen.append(("b", v)))
    before = subs.snapshot
    remove_a()
    remove_a()  # twice is harmless
    for cb in before:
        cb(1)
    for cb in subs.snapshot:
        cb(2)
    assert seen == [("a", 1), ("b", 1), ("b", 2)]

