"""Structured logging for every process: JSON lines in production, readable on a terminal.

Logs always go to stderr so that tools which carry data on stdout (``ambientctl hbone connect``)
stay clean.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import logging
import sys
import time
from collections.abc import Callable, Hashable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error")

_threshold = logging.INFO  # the current level; read on every call, so it can change at run time


class MeshLogger(structlog.BoundLoggerBase):
    """A bound logger that checks the process-wide level on each call.

    ``set_level`` takes effect at once without reconfiguring structlog, and this plain class
    costs less per line than structlog's generated filtering loggers (an access-log line went
    from 36 to 25 µs). Loggers are not cached on first use: ``structlog.testing.capture_logs``
    must keep working in tests after a command configured logging in-process.
    """

    def debug(self, event: str, **kw: Any) -> Any:
        return self._proxy_to_logger("debug", event, **kw) if _threshold <= logging.DEBUG else None

    def info(self, event: str, **kw: Any) -> Any:
        return self._proxy_to_logger("info", event, **kw) if _threshold <= logging.INFO else None

    def warning(self, event: str, **kw: Any) -> Any:
        return self._proxy_to_logger("warning", event, **kw) if _threshold <= logging.WARNING else None

    def error(self, event: str, **kw: Any) -> Any:
        return self._proxy_to_logger("error", event, **kw)

    def exception(self, event: str, **kw: Any) -> Any:
        kw.setdefault("exc_info", True)
        return self._proxy_to_logger("error", event, **kw)


# Per-line costs matter: ztunnel and ``hbone serve`` write an access-log line per connection.
_ENCODER = jsonlib.JSONEncoder(default=repr)  # json.dumps(default=...) would build one per call


def _json_line(event: Any, **_: Any) -> str:
    return _ENCODER.encode(event)


_stamp: tuple[int, str] = (-1, "")  # (second, its formatted date and time), replaced as one


def _timestamp(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``timestamp``: ISO 8601 UTC with milliseconds; the date and time part is formatted once a second."""
    global _stamp
    now = time.time()
    second, prefix = _stamp
    if int(now) != second:
        second = int(now)
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp = (second, prefix)  # one assignment: a thread never sees a second with another's text
    event["timestamp"] = f"{prefix}.{int((now - second) * 1000):03d}Z"
    return event


def configure(level: str = "info", json: bool | None = None) -> None:
    """Set up structlog (and stdlib logging, for libraries) at ``level``."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_json_line) if json else structlog.dev.ConsoleRenderer()
    )
    printer = structlog.PrintLogger(file=sys.stderr)  # one for every logger: made per call otherwise
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=MeshLogger,
        logger_factory=lambda *args: printer,
        cache_logger_on_first_use=False,
    )
    set_level(level)
    logging.basicConfig(level=max(logging.WARNING, getattr(logging, level.upper())), stream=sys.stderr)


def set_level(level: str) -> None:
    """Change the level at run time (ztunnel's ``/logging?level=``)."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    global _threshold
    _threshold = getattr(logging, level.upper())


# -- rate-limited lines ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Window:
    opened: float  # when the line for this key was last written
    suppressed: int = 0  # lines dropped since then
    last: dict[str, Any] = field(default_factory=dict)  # fields of the last dropped line


class ThrottledLog:
    """One line per key and interval: for what a peer can make us log as often as it likes.

    The first line for a key (say a peer address and a refusal reason) is written at once;
    repeats within ``interval`` seconds are counted, not written. The count is written as one
    summary line (the event with ``suppressed=<n>`` and the last repeat's fields) when the key
    is next logged after its interval, or by :meth:`flush` — which runs by itself ``interval``
    seconds after the first dropped line when an event loop is running. So a flood costs at
    most one line per key per interval, plus the summaries.

    Keys are bounded: past ``max_keys`` the oldest key is summarised and forgotten, and past
    ``max_new_per_interval`` first lines in one interval, new keys are counted under one
    overflow key instead (a peer with many addresses gets no more lines than one with one).
    ``clock`` is injectable so tests need no sleeping.
    """

    OVERFLOW = ("*", "too many distinct keys")

    def __init__(
        self,
        logger: Any,
        *,
        interval: float = 60.0,
        max_keys: int = 1024,
        max_new_per_interval: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self.interval = interval
        self.max_keys = max_keys
        self.max_new = max_new_per_interval
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}
        self._new_since = clock()
        self._new_count = 0
        self._timer: asyncio.TimerHandle | None = None
        self.written = 0  # lines written, summaries included (tests, metrics)
        self.dropped = 0  # lines counted instead of written

    def warning(self, key: Hashable, event: str, **kw: Any) -> bool:
        return self.log("warning", key, event, **kw)

    def info(self, key: Hashable, event: str, **kw: Any) -> bool:
        return self.log("info", key, event, **kw)

    def log(self, level: str, key: Hashable, event: str, **kw: Any) -> bool:
        """Write ``event`` at ``level`` unless ``key`` was written within the interval; True if written."""
        now = self._clock()
        w = self._windows.get(key)
        if w is None:
            if now - self._new_since >= self.interval:
                self._new_since, self._new_count = now, 0
            if self._new_count >= self.max_new:
                key, w = self.OVERFLOW, self._windows.get(self.OVERFLOW)
                kw = {**kw, "overflow": True}
            if w is None:
                self._new_count += 1
                while len(self._windows) >= self.max_keys:
                    old_key = next(iter(self._windows))
                    self._summarise(old_key, self._windows.pop(old_key))
                self._windows[key] = _Window(now)
                self._write(level, key, event, kw, 0)
                return True
        if now - w.opened >= self.interval:
            suppressed, w.opened, w.suppressed, w.last = w.suppressed, now, 0, {}
            # Most recently written last: eviction takes the key that has been quiet longest.
            self._windows[key] = self._windows.pop(key)
            self._write(level, key, event, kw, suppressed)
            return True
        w.suppressed += 1
        w.last = {"_level": level, "_event": event, **kw}
        self.dropped += 1
        self._arm()
        return False

    def flush(self) -> int:
        """Write the summary of every key whose interval is over; returns how many were written."""
        self._timer = None
        now = self._clock()
        done = 0
        for key, w in list(self._windows.items()):
            if now - w.opened < self.interval:
                continue
            if w.suppressed:
                self._summarise(key, w)
                done += 1
            del self._windows[key]  # quiet for a whole interval: its next line is a first line
        if any(w.suppressed for w in self._windows.values()):
            self._arm()
        return done

    def _summarise(self, key: Hashable, w: _Window) -> None:
        if w.suppressed:
            last = dict(w.last)
            level, event = last.pop("_level", "warning"), last.pop("_event", "")
            self._write(level, key, event, last, w.suppressed)
            w.suppressed, w.last = 0, {}

    def _write(self, level: str, key: Hashable, event: str, kw: dict[str, Any], suppressed: int) -> None:
        self.written += 1
        if suppressed:
            kw = {**kw, "suppressed": suppressed, "suppressed_for_s": self.interval}
        getattr(self._log, level)(event, **kw)

    def _arm(self) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (tests, tools): summaries come with the next line or flush()
        self._timer = loop.call_later(self.interval, self.flush)

    def close(self) -> None:
        """Cancel the pending flush (the owner is shutting down); unwritten counts are dropped."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
