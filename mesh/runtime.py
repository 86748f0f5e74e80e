"""Running a daemon's main coroutine: uvloop when available, signals turned into a stop event."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``main()`` on uvloop (or asyncio) and return its exit code."""
    if os.environ.get("MESH_NO_UVLOOP") != "1":
        return uvloop.run(main())
    return asyncio.run(main())


def stop_on_signals(*signals: signal.Signals) -> asyncio.Event:
    """An event set by SIGTERM/SIGINT (or the given signals): the daemon's cue to drain and exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals or (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def write_ready_file(path: str | None, text: str) -> None:
    """Atomically write ``text`` to ``path`` so a supervisor or test can wait for readiness."""
    if not path:
        return
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text)
    tmp.replace(p)
