"""Certificate manager: one certificate per identity of a pod on this node, kept fresh.

* An identity is tracked while at least one local pod has it (``track``/``untrack`` are
  reference counts); the last pod leaving drops the certificate and stops its refresher.
* Each identity has one refresher task: fetch through the ``CaClient`` (which impersonates the
  identity with the node credential), then sleep until half the certificate's lifetime and
  fetch again. Failures back off 500 ms, 1 s, 2 s … up to 150 s; a sign of life from the
  control plane (discovery reconnected: :meth:`CertManager.retry_failed`) retries at once and
  starts the backoff over. At most 8 fetches run at once.
* Not ready (:attr:`CertManager.ready`) while an identity has no certificate, or has one that
  expired or will expire before the next attempt to renew it (renewal failing).
* A rotation only builds new TLS contexts for *new* connections; established connections keep
  the SSL objects they were made with, so nothing in flight breaks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from mesh.caclient import CaClient, CaError
from mesh.identity import Identity
from mesh.pki import Credential
from mesh.tasks import Supervisor
from mesh.tls import client_context, server_context

log = structlog.get_logger(__name__)

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 150.0
MAX_CONCURRENT_FETCHES = 8


def backoff_delays(initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX) -> Callable[[int], float]:
    """Delay before retry ``n`` (0-based): doubling from ``initial``, capped at ``maximum``."""

    def delay(n: int) -> float:
        return float(min(maximum, initial * (2 ** min(n, 30))))

    return delay


@dataclass(frozen=True, slots=True)
class Certs:
    """A credential and the TLS contexts built from it (one per rotation)."""

    credential: Credential
    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext


def refresh_delay(cred: Credential, now: dt.datetime) -> float:
    """Seconds until half the certificate's lifetime has passed (0 if already past).

    The lifetime counts from when we got it, not from ``not_before``: CAs backdate that for clock
    skew, which would make a short-lived certificate look half-spent on arrival.
    """
    start = max(cred.not_before, min(now, cred.not_after))
    half = start + (cred.not_after - start) / 2
    return max(0.0, (half - now).total_seconds())


class _Entry:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.refs = 0
        self.certs: Certs | None = None
        self.first: asyncio.Future[Certs] = loop.create_future()
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()  # force an early refresh
        self.last_error = ""
        self.rotations = 0
        self.failures = 0  # fetches that failed, over the entry's life
        self.retry_at: dt.datetime | None = None  # next attempt, while renewal is failing

    async def sleep(self, delay: float) -> bool:
        """Wait ``delay`` seconds, or less if ``wake`` is set meanwhile (then True)."""
        self.wake.clear()
        try:
            async with asyncio.timeout(delay):
                await self.wake.wait()
        except TimeoutError:
            return False
        return True

    def healthy(self, now: dt.datetime) -> bool:
        """Has a certificate that is valid now and, if renewing fails, until the next attempt."""
        if self.certs is None:
            return False
        not_after = self.certs.credential.not_after
        if not_after <= now:
            return False
        return not (self.last_error and self.retry_at is not None and self.retry_at >= not_after)


class CertManager:
    def __init__(
        self,
        ca: CaClient,
        *,
        max_concurrent: int = MAX_CONCURRENT_FETCHES,
        backoff: Callable[[int], float] | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._ca = ca
        self._sem = asyncio.Semaphore(max_concurrent)
        self._backoff = backoff or backoff_delays()
        self._now = now
        self._entries: dict[Identity, _Entry] = {}
        self._tasks = Supervisor("certs")
        self.changed = asyncio.Event()  # pulsed on every fetch's outcome: a certificate or a failure
        self._subscribers: list[Callable[[Identity, Certs], None]] = []

    def subscribe(self, cb: Callable[[Identity, Certs], None]) -> Callable[[], None]:
        """Call ``cb`` on every new certificate; returns the unsubscribe function."""
        self._subscribers.append(cb)
        return lambda: self._subscribers.remove(cb) if cb in self._subscribers else None

    # -- tracking -------------------------------------------------------------------------------

    def track(self, identity: Identity) -> None:
        e = self._entries.get(identity)
        if e is None:
            e = self._entries[identity] = _Entry(asyncio.get_running_loop())
            e.task = self._tasks.spawn(self._refresher(identity, e), name=f"cert-{identity}")
            log.info("tracking identity", identity=str(identity))
        e.refs += 1

    def untrack(self, identity: Identity) -> None:
        e = self._entries.get(identity)
        if e is None:
            return
        e.refs -= 1
        if e.refs <= 0:
            del self._entries[identity]
            if e.task is not None:
                e.task.cancel()
            if not e.first.done():
                e.first.cancel()
            log.info("dropped certificate: last pod with this identity left", identity=str(identity))

    def identities(self) -> list[Identity]:
        return list(self._entries)

    def current(self, identity: Identity) -> Certs | None:
        e = self._entries.get(identity)
        return e.certs if e is not None else None

    async def get(self, identity: Identity, timeout: float = 10.0) -> Certs:
        """The identity's current certificate, waiting up to ``timeout`` for the first one."""
        e = self._entries.get(identity)
        if e is None:
            raise CaError(f"no certificate for {identity}: no pod with that identity on this node")
        if e.certs is not None:
            return e.certs
        async with asyncio.timeout(timeout):
            return await asyncio.shield(e.first)

    def retry_failed(self) -> None:
        """The control plane showed life (discovery reconnected): every identity whose fetch is
        failing retries now, its backoff started over, instead of sleeping up to 150 s."""
        for e in self._entries.values():
            if e.last_error:
                e.wake.set()

    def status(self) -> list[tuple[Identity, float | None, int]]:
        """(identity, seconds until its certificate expires or None, failed fetches) for metrics."""
        now = self._now()
        out = []
        for ident, e in self._entries.items():
            left = None
            if e.certs is not None:
                left = (e.certs.credential.not_after - now).total_seconds()
            out.append((ident, left, e.failures))
        return out

    def refresh_now(self, identity: Identity) -> None:
        """Rotate ``identity``'s certificate early (admin / tests)."""
        e = self._entries.get(identity)
        if e is not None:
            e.wake.set()

    @property
    def ready(self) -> bool:
        now = self._now()
        return all(e.healthy(now) for e in self._entries.values())

    # -- refreshing -----------------------------------------------------------------------------

    async def _fetch(self, identity: Identity, e: _Entry) -> Certs:
        attempt = 0
        while True:
            try:
                async with self._sem:
                    cred = await self._ca.fetch_certificate(identity)
                if cred.identity != identity:
                    raise CaError(f"CA returned a certificate for {cred.identity}", retryable=False)
                return Certs(cred, server_context(cred), client_context(cred))
            except (CaError, OSError, ssl.SSLError, ValueError) as err:
                delay = self._backoff(attempt)
                e.last_error = str(err)
                e.failures += 1
                e.retry_at = self._now() + dt.timedelta(seconds=delay)
                log.warning(
                    "certificate fetch failed", identity=str(identity), error=str(err), retry_in_s=delay
                )
                self.changed.set()
                self.changed.clear()
                attempt += 1
                if await e.sleep(delay):
                    attempt = 0  # woken: a sign of life, or an early refresh asked for

    async def _refresher(self, identity: Identity, e: _Entry) -> None:
        while True:
            certs = await self._fetch(identity, e)
            rotated = e.certs is not None
            e.certs = certs
            e.last_error = ""
            e.retry_at = None
            if rotated:
                e.rotations += 1
            if not e.first.done():
                e.first.set_result(certs)
            for cb in list(self._subscribers):
                cb(identity, certs)
            self.changed.set()
            self.changed.clear()
            cred = certs.credential
            delay = refresh_delay(cred, self._now())
            log.info(
                "certificate rotated" if rotated else "certificate issued",
                identity=str(identity),
                not_after=cred.not_after.isoformat(),
                refresh_in_s=round(delay, 1),
            )
            await e.sleep(delay)

    def dump(self) -> list[dict[str, Any]]:
        """For ``/config_dump``."""
        out: list[dict[str, Any]] = []
        for ident, e in sorted(self._entries.items(), key=lambda kv: str(kv[0])):
            item: dict[str, Any] = {"identity": str(ident), "pods": e.refs, "rotations": e.rotations}
            if e.certs is not None:
                c = e.certs.credential
                item.update(
                    state="available",
                    serial=format(c.leaf.serial_number, "x"),
                    not_before=c.not_before.isoformat(),
                    not_after=c.not_after.isoformat(),
                )
            else:
                item["state"] = "pending"
            if e.last_error:
                item["last_error"] = e.last_error
            out.append(item)
        return out

    async def aclose(self) -> None:
        for e in self._entries.values():
            if not e.first.done():
                e.first.cancel()
        self._entries.clear()
        await self._tasks.aclose()
