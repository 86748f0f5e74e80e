"""JWKS for waypoints: the control plane fetches every ``jwksUri`` and ships the keys inline.

As istiod does, so a waypoint's request path never waits on the network: the control plane
follows the store's waypoint-bound RequestAuthentications, fetches each rule's ``jwksUri``
(HTTPS verified against the system roots, or a CA bundle given with ``--jwks-ca-file``; the
rule's ``timeout``, else 5 s), refreshes every ``refresh`` seconds (Istio's default: 20
minutes), and on a failure keeps the last good document and logs the failure (retrying sooner,
with backoff). A URI never fetched has no document: the waypoint then refuses a request that
carries a token for that issuer (fail closed). Subscribers are told when a document changes.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from types import MappingProxyType

import structlog

from mesh.model import Delta, Store
from mesh.subscribers import Subscribers

log = structlog.get_logger(__name__)

DEFAULT_REFRESH = 20 * 60.0
DEFAULT_TIMEOUT = 5.0
RETRY_INITIAL, RETRY_MAX = 1.0, 60.0
MAX_DOCUMENT = 1024 * 1024  # a JWKS bigger than this is not a key set


class JwksError(Exception):
    pass


def fetch_jwks(uri: str, timeout: float, ssl_context: ssl.SSLContext | None) -> str:
    """GET ``uri`` and return it if it is a JSON object with a ``keys`` list; else JwksError."""
    try:
        with urllib.request.urlopen(uri, timeout=timeout, context=ssl_context) as r:
            body = r.read(MAX_DOCUMENT + 1)
    except urllib.error.HTTPError as e:
        raise JwksError(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise JwksError(str(reason) or type(e).__name__) from None
    if len(body) > MAX_DOCUMENT:
        raise JwksError(f"document larger than {MAX_DOCUMENT} bytes")
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise JwksError(f"not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError('not a JWKS (want an object with a "keys" list)')
    return str(body.decode())


Fetch = Callable[[str, float, "ssl.SSLContext | None"], str]


class JwksCache:
    """Keeps the JWKS of every ``jwksUri`` the store's waypoint-bound policies name."""

    def __init__(
        self,
        store: Store,
        *,
        refresh: float = DEFAULT_REFRESH,
        ssl_context: ssl.SSLContext | None = None,
        fetch: Fetch = fetch_jwks,
        on_failure: Callable[[str, str], None] | None = None,
    ) -> None:
        self._store = store
        self._refresh = refresh
        self._ssl = ssl_context
        self._fetch = fetch
        self._on_failure = on_failure  # (uri, error), after each failed fetch (tests, metrics)
        self.failures = 0
        self._docs: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: Subscribers[int] = Subscribers()
        self.version = 0
        self._unsubscribe: Callable[[], None] | None = None

    def documents(self) -> Mapping[str, str]:
        return MappingProxyType(dict(self._docs))

    def subscribe(self, callback: Callable[[int], None]) -> Callable[[], None]:
        return self._subscribers.add(callback)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self._store.subscribe(self._on_delta)
        self._sync()

    async def aclose(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def _on_delta(self, _delta: Delta) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._sync)

    def _wanted(self) -> dict[str, float]:
        wanted: dict[str, float] = {}
        for ra in self._store.snapshot().request_authentications.values():
            if not ra.target_refs:
                continue
            for rule in ra.jwt_rules:
                if rule.jwks_uri and not rule.jwks:
                    wanted[rule.jwks_uri] = min(wanted.get(rule.jwks_uri, 1e9), rule.timeout or DEFAULT_TIMEOUT)
        return wanted

    def _sync(self) -> None:
        wanted = self._wanted()
        for uri in list(self._tasks):
            if uri not in wanted:
                self._tasks.pop(uri).cancel()
                self._docs.pop(uri, None)
        for uri, timeout in wanted.items():
            if uri not in self._tasks:
                self._tasks[uri] = asyncio.create_task(self._keep(uri, timeout), name=f"jwks {uri}")

    async def _keep(self, uri: str, timeout: float) -> None:
        delay = RETRY_INITIAL
        while True:
            try:
                doc = await asyncio.to_thread(self._fetch, uri, timeout, self._ssl)
            except JwksError as e:
                self.failures += 1
                if self._on_failure is not None:
                    self._on_failure(uri, str(e))
                log.warning(
                    "jwks fetch failed; keeping the last good keys" if uri in self._docs else "jwks fetch failed",
                    uri=uri,
                    error=str(e),
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            delay = RETRY_INITIAL
            if self._docs.get(uri) != doc:
                self._docs[uri] = doc
                self.version += 1
                log.info("jwks fetched", uri=uri, keys=len(json.loads(doc)["keys"]))
                for cb in self._subscribers.snapshot:
                    try:
                        cb(self.version)
                    except Exception:
                        log.exception("jwks subscriber failed")
            await asyncio.sleep(self._refresh)
