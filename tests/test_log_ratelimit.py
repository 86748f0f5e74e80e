"""mesh.log.ThrottledLog: one line per key and interval, the rest counted into a summary line."""

from __future__ import annotations

from typing import Any

from mesh.log import ThrottledLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines:
    """A logger that keeps what it is asked to write."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append(("warning", event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append(("info", event, kw))


def make(**kw: Any) -> tuple[ThrottledLog, Lines, Clock]:
    lines, clock = Lines(), Clock()
    return ThrottledLog(lines, clock=clock, **kw), lines, clock


def test_first_line_written_repeats_counted_then_summarised_with_the_next() -> None:
    t, out, clock = make(interval=60)
    assert t.warning(("10.0.0.1", "timeout"), "refused", client="10.0.0.1:1")
    for port in range(2, 12):
        clock.now += 1
        assert not t.warning(("10.0.0.1", "timeout"), "refused", client=f"10.0.0.1:{port}")
    assert out.lines == [("warning", "refused", {"client": "10.0.0.1:1"})]
    clock.now += 60
    assert t.warning(("10.0.0.1", "timeout"), "refused", client="10.0.0.1:99")
    assert out.lines[1] == (
        "warning",
        "refused",
        {"client": "10.0.0.1:99", "suppressed": 10, "suppressed_for_s": 60},
    )
    assert (t.written, t.dropped) == (2, 10)


def test_keys_are_independent() -> None:
    t, out, _ = make(interval=60)
    assert t.warning(("a", "timeout"), "refused")
    assert t.warning(("a", "not_tls"), "refused")
    assert t.warning(("b", "timeout"), "refused")
    assert not t.warning(("a", "timeout"), "refused")
    assert len(out.lines) == 3


def test_flush_writes_the_summary_once_the_interval_is_over_and_forgets_quiet_keys() -> None:
    t, out, clock = make(interval=60)
    t.info("k", "rejected", peer="p")
    t.info("k", "rejected", peer="p", reason="last one")
    t.info("quiet", "rejected", peer="q")
    clock.now += 30
    assert t.flush() == 0  # too early
    clock.now += 30
    assert t.flush() == 1
    assert out.lines[-1] == (
        "info",
        "rejected",
        {"peer": "p", "reason": "last one", "suppressed": 1, "suppressed_for_s": 60},
    )
    assert t.flush() == 0  # counts are written once
    # Both keys were forgotten: their next line is a first line again, written at once.
    assert t.info("k", "rejected", peer="p") and t.info("quiet", "rejected", peer="q")


def test_a_flood_writes_a_bounded_number_of_lines() -> None:
    """100,000 refusals from 5 addresses with 2 reasons over 10 minutes: one line per key and
    interval, plus one summary each, whatever the rate."""
    t, out, clock = make(interval=60)
    for i in range(100_000):
        clock.now += 600 / 100_000
        t.warning((f"10.0.0.{i % 5}", ("timeout", "not_tls")[i % 2]), "refused")
    t.flush()
    assert len(out.lines) <= 10 * (600 // 60 + 1) + 10
    written = sum(1 for _ in out.lines)
    suppressed = sum(kw.get("suppressed", 0) for _, _, kw in out.lines)
    pending = sum(w.suppressed for w in t._windows.values())
    assert written + suppressed + pending == 100_000


def test_keys_are_bounded() -> None:
    t, out, _ = make(interval=60, max_keys=3, max_new_per_interval=1000)
    for i in range(3):
        t.warning(i, "refused")
        t.warning(i, "refused")  # one suppressed each
    t.warning(3, "refused")  # evicts key 0, writing its summary
    assert len(t._windows) == 3
    assert out.lines[-2] == ("warning", "refused", {"suppressed": 1, "suppressed_for_s": 60})
    assert out.lines[-1] == ("warning", "refused", {})


def test_many_new_keys_in_one_interval_share_one_overflow_line() -> None:
    t, out, clock = make(interval=60, max_new_per_interval=10)
    for i in range(1000):
        t.warning((f"10.0.{i // 256}.{i % 256}", "timeout"), "refused", client=str(i))
    assert len(out.lines) == 11  # ten first lines, one for the overflow key
    assert out.lines[-1][2] == {"client": "10", "overflow": True}
    clock.now += 60
    assert t.warning(("10.9.9.9", "timeout"), "refused")  # a new interval: new keys again
