"""A controller's work queue: keys (``namespace/name``, a namespace) to reconcile, one at a time
on a worker thread, each due at a time, with exponential backoff when a reconcile fails.

What client-go's rate-limited work queue gives a Kubernetes controller, for the blocking
reconcilers of this package: a key queued twice before it is worked on is worked on once; a key
is never worked on by two threads at once; a failing key is retried later without holding up
the others; stopping waits for the reconcile in flight (bounded by the API timeouts).

``work(key)`` returns when to look at the key again (seconds), or None for "only when queued
again". Keys may be handed over from any thread (:meth:`WorkQueue.hand_over`: store subscribers,
watch threads); everything else runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from sources.kubernetes import Backoff

log = structlog.get_logger(__name__)

# (key, error) -> log fields, and whether it is an expected failure (an API refusal: a warning)
# rather than a bug (logged with its traceback).
Describe = Callable[[str, Exception], tuple[dict[str, Any], bool]]


def _describe(key: str, e: Exception) -> tuple[dict[str, Any], bool]:
    return {"key": key, "error": f"{type(e).__name__}: {e}"}, False


class WorkQueue:
    """``start()`` in the event loop, ``enqueue``/``hand_over`` keys, ``aclose()`` to stop."""

    def __init__(
        self,
        name: str,
        work: Callable[[str], float | None],
        *,
        subject: str,
        backoff: Backoff,
        describe: Describe = _describe,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self._subject = subject  # what a key is, for the log: "waypoint" reconcile failed
        self._work = work
        self._backoff = backoff
        self._describe = describe
        self._rand = rand
        self._due: dict[str, float] = {}  # key -> loop time it is due
        self._attempts: dict[str, int] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self.processed = 0  # completed reconciles (successful or not), for tests and metrics

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.name} already started")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=self.name)
        self._task.add_done_callback(self._report_exit)

    async def aclose(self, timeout: float = 40.0) -> None:
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def enqueue(self, keys: Iterable[str], delay: float = 0.0) -> None:
        """Queue ``keys`` in ``delay`` seconds (sooner if already due sooner). Loop thread only."""
        if self._loop is None or self._stopping:
            return
        due = self._loop.time() + delay
        for key in keys:
            if key not in self._due or self._due[key] > due:
                self._due[key] = due
        if self._wake is not None:
            self._wake.set()

    def hand_over(self, keys: set[str]) -> None:
        """:meth:`enqueue` from any thread."""
        loop = self._loop
        if not keys or loop is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.enqueue(keys)
        else:
            with contextlib.suppress(RuntimeError):  # loop closed: we are stopping
                loop.call_soon_threadsafe(self.enqueue, keys)

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until nothing is due now (a reconcile pass has finished)."""
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._idle_waiters.append(fut)
        if self._wake is not None:
            self._wake.set()
        await asyncio.wait_for(fut, timeout)

    def _wake_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _run(self) -> None:
        assert self._loop is not None and self._wake is not None
        while not self._stopping:
            now = self._loop.time()
            ready = [k for k, t in self._due.items() if t <= now]
            if not ready:
                self._wake_idle()
                self._wake.clear()
                timeout = min(self._due.values()) - now if self._due else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            key = min(ready, key=lambda k: self._due[k])
            del self._due[key]
            await self._one(key)
        self._wake_idle()

    async def _one(self, key: str) -> None:
        try:
            again = await asyncio.to_thread(self._work, key)
        except Exception as e:
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            delay = self._backoff.delay(attempt, self._rand)
            fields, expected = self._describe(key, e)
            fields.update(attempt=attempt + 1, retry_in=round(delay, 3))
            if expected:
                log.warning(f"{self._subject} reconcile failed, retrying", controller=self.name, **fields)
            else:
                log.exception(
                    f"{self._subject} reconcile failed unexpectedly, retrying", controller=self.name, **fields
                )
            self.enqueue([key], delay)
        else:
            self._attempts.pop(key, None)
            if again is not None:
                self.enqueue([key], again)
        finally:
            self.processed += 1

    def _report_exit(self, task: asyncio.Task[None]) -> None:
        """A bug in the queue loop stops this controller, never the control plane: say so."""
        if not task.cancelled() and task.exception() is not None:
            log.error("controller stopped on an error", controller=self.name, exc_info=task.exception())
