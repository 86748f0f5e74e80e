"""The WAF engine: one libmodsecurity instance, the active rule set, a bounded thread pool.

Why threads and not the event loop: a CRS transaction costs milliseconds of C time (see
docs/benchmarks.md). cffi releases the GIL for every library call, so ``inspect`` runs the
whole transaction in a ``ThreadPoolExecutor`` with one worker per usable core, and the loop only
awaits the result.

Why threads and not processes: libmodsecurity supports many threads evaluating transactions
against one shared ``RulesSet`` (only *loading* rules is unsafe, and ``capi`` serialises loads).
``tests/waypoint/test_waf.py::test_concurrent_transactions_share_one_rule_set`` hammers one rule
set from several threads with a mix of attacks and clean requests and checks every verdict and
every logged finding against its own request. The CRS features that write persistent
collections from several threads at once (IP reputation, DoS protection: upstream issue #3054)
are off by default, not exposed by ``WafConfig``, and refused in a policy's extra rules.

Rule sets are swapped, never mutated: ``load`` compiles the new configuration into a fresh
``RuleSet`` and makes it active only if ModSecurity accepted all of it, so a bad rule leaves the
previous rule set in force. Transactions in flight (and open ``WafExchange``-s) hold a lease on
the rule set they started with and on the library instance; a replaced rule set, or the instance
after ``close``, is freed when its last transaction ends: each C object exactly once.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, Literal

from waypoint.waf import capi
from waypoint.waf.config import (
    INBOUND_SCORE_RULE_ID,
    OUTBOUND_SCORE_RULE_ID,
    BodyLimitAction,
    WafConfig,
    WafMode,
    rules_text,
)
from waypoint.waf.findings import Finding, collect

WafAction = Literal["allow", "detect", "block"]

BODY_OVER_LIMIT_RULE_ID = 0  # the pseudo rule id of a finding made by the engine, not by a rule


@dataclass(frozen=True)
class WafRequest:
    """The request facts the WAF sees.

    ``uri`` is the raw request target (path and query, undecoded); ``http_version`` is "1.0",
    "1.1" or "2"; ``headers`` are in wire order and must include ``host`` (for HTTP/2, the
    ``:authority``: CRS flags requests without a Host header). ``body`` is what the caller
    buffered: at most ``WafEngine.body_buffer_limit`` bytes are needed to decide; None means no
    body. ``content_type`` defaults to the ``content-type`` header.
    """

    method: str
    uri: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    http_version: str = "1.1"
    client_addr: str = "0.0.0.0"
    client_port: int = 0
    server_addr: str = "0.0.0.0"
    server_port: int = 0
    content_type: str | None = None
    request_id: str | None = None

    def effective_content_type(self) -> str | None:
        if self.content_type is not None:
            return self.content_type
        for name, value in self.headers:
            if name.lower() == "content-type":
                return value
        return None


@dataclass(frozen=True)
class WafVerdict:
    """The outcome of one inspection.

    ``action``: ``allow`` (nothing matched), ``detect`` (rules matched but the request passes:
    DetectOnly, or a score under the threshold), ``block`` (answer ``status`` and do not
    forward). ``anomaly_score`` is the CRS anomaly score of the direction inspected (inbound for
    a request, outbound for a response); None when the WAF is Disabled or a rule blocked before
    the CRS scored.
    """

    request_id: str
    action: WafAction
    status: int
    mode: WafMode
    findings: tuple[Finding, ...] = ()
    anomaly_score: int | None = None
    body_inspected: bool = False
    body_over_limit: bool = False
    redirect_url: str | None = None  # a rule's ``redirect`` action (not used by the CRS)

    @property
    def allowed(self) -> bool:
        return self.action != "block"

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @property
    def rule_ids(self) -> tuple[int, ...]:
        return tuple(f.rule_id for f in self.findings)

    @property
    def messages(self) -> tuple[str, ...]:
        return tuple(f.message for f in self.findings)


class _Lease:
    """A C object shared by the engine and its transactions, freed after its last user.

    ``retire`` is the owner letting go; ``free`` runs once, when the owner has let go and no
    user holds it, on whichever thread releases last.
    """

    def __init__(self, free: Callable[[], None] | None) -> None:
        self._free = free
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            if self._retired and self._users == 0:
                raise RuntimeError("WAF engine is closed")
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            free = self._retired and self._users == 0
        if free:
            self._run_free()

    def retire(self) -> None:
        with self._lock:
            if self._retired:
                return
            self._retired = True
            free = self._users == 0
        if free:
            self._run_free()

    def _run_free(self) -> None:
        free, self._free = self._free, None
        if free is not None:
            free()


class _ActiveRules(_Lease):
    """A loaded rule set (None when Disabled) with the config it was built from."""

    def __init__(self, config: WafConfig, rules: capi.RuleSet | None) -> None:
        super().__init__(rules.close if rules is not None else None)
        self.config = config
        self.rules = rules


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def compile_rules(config: WafConfig) -> capi.RuleSet | None:
    """A new rule set for ``config`` (None when Disabled); raises ``capi.RuleLoadError``."""
    if config.mode is WafMode.DISABLED:
        return None
    rules = capi.RuleSet()
    try:
        rules.add(rules_text(config))
    except BaseException:
        rules.close()
        raise
    return rules


class WafExchange:
    """One request's transaction, kept open for its response when ``WafConfig.inspect_response``.

    ``verdict`` is the request's. While ``open``, call ``inspect_response`` once (it ends the
    exchange) or ``aclose`` to end it without a response; every exchange must be ended, or its
    transaction and rule set are held. Steps run one at a time, each on one of the engine's
    threads (a ModSecurity transaction may move between threads, not run on two at once).
    """

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        verdict: WafVerdict,
        tx: capi.Transaction | None = None,
        leases: tuple[_Lease, ...] = (),
        config: WafConfig | None = None,
    ) -> None:
        self.verdict = verdict
        self._executor = executor
        self._tx = tx
        self._leases = leases
        self._config = config
        self._consumed = len(tx.sink.messages) if tx is not None else 0
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        return self._tx is not None

    def inspect_response_sync(self, response: WafResponse) -> WafVerdict:
        """The response's verdict (phases 3 and 4); ends the exchange."""
        with self._lock:
            tx, config = self._tx, self._config
            if tx is None or config is None:
                raise RuntimeError("WAF exchange is closed (response inspection off, or request blocked)")
            try:
                tx.process_response_headers(response.status, f"HTTP/{response.http_version}")
                for name, value in response.headers:
                    tx.add_response_header(name, value)
                it = tx.intervention()
                if it is None:
                    if response.body:
                        tx.append_response_body(response.body)
                    tx.process_response_body()
                    it = tx.intervention()
                messages = tx.sink.messages[self._consumed :]
            finally:
                self._end()
        return _verdict(
            config,
            self.verdict.request_id,
            messages,
            it,
            OUTBOUND_SCORE_RULE_ID,
            body_inspected=bool(response.body),
        )

    async def inspect_response(self, response: WafResponse) -> WafVerdict:
        """``inspect_response_sync`` on the engine's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.inspect_response_sync, response)

    def close(self) -> None:
        """End the exchange without (more) response inspection. Idempotent."""
        with self._lock:
            self._end()

    async def aclose(self) -> None:
        if not self.open:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.close)
        except RuntimeError:  # the engine's pool is shut down: end it here
            self.close()

    def _end(self) -> None:
        tx, self._tx = self._tx, None
        if tx is None:
            return
        try:
            tx.process_logging()
        finally:
            tx.close()
            leases, self._leases = self._leases, ()
            for lease in reversed(leases):
                lease.release()


@dataclass(frozen=True)
class WafResponse:
    """The response facts the WAF sees (``WafConfig.inspect_response``); ``body`` as buffered."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    http_version: str = "1.1"


_REPORT_RULE_IDS: Final = frozenset({INBOUND_SCORE_RULE_ID, OUTBOUND_SCORE_RULE_ID})


def _verdict(
    config: WafConfig,
    request_id: str,
    messages: list[str],
    it: capi.Intervention | None,
    score_rule_id: int,
    *,
    body_inspected: bool = False,
    over_limit: bool = False,
    engine_findings: tuple[Finding, ...] = (),
    blocked_by_limit: bool = False,
) -> WafVerdict:
    findings, score = collect(
        messages, it.log if it else None, score_rule_id=score_rule_id, ignore_rule_ids=_REPORT_RULE_IDS
    )
    findings = engine_findings + findings
    redirect = None
    if blocked_by_limit:
        action: WafAction = "block"
        status = 413
    elif it is not None and config.mode is WafMode.ENFORCE:
        action, status, redirect = "block", it.status, it.url
    else:
        action, status = ("detect" if findings else "allow"), 200
    return WafVerdict(
        request_id, action, status, config.mode, findings, score, body_inspected, over_limit, redirect
    )


class WafEngine:
    """Inspect requests against the active ``WafConfig``; starts Disabled until ``load``."""

    def __init__(self, *, max_workers: int | None = None) -> None:
        self.max_workers = max_workers or default_workers()
        modsec = capi.ModSecurity()
        self._modsec = modsec
        self._modsec_lease = _Lease(modsec.close)
        self._executor = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="waf")
        self._swap = threading.Lock()
        self._active = _ActiveRules(WafConfig(mode=WafMode.DISABLED), None)
        self._closed = False

    # -- configuration -------------------------------------------------------------------

    @property
    def config(self) -> WafConfig:
        return self._active.config

    @property
    def rule_count(self) -> int:
        rules = self._active.rules
        return rules.rule_count if rules is not None else 0

    @property
    def body_buffer_limit(self) -> int:
        """Bytes of body a caller must buffer to get a decision: one more than the limit."""
        return self.config.request_body_limit + 1

    def wants_body(self, content_type: str | None) -> bool:
        """Whether a body of this type is inspected (if not, do not buffer it for the WAF)."""
        return self.config.mode is not WafMode.DISABLED and self.config.body_inspected(content_type)

    def load(self, config: WafConfig) -> int:
        """Compile ``config`` and make it active; returns the number of rules loaded.

        Blocking (tens of ms for the CRS): from async code use ``reload``. On ``RuleLoadError``
        (carrying ModSecurity's message) the previous rule set stays active.
        """
        if self._closed:
            raise RuntimeError("WAF engine is closed")
        rules = compile_rules(config)
        new = _ActiveRules(config, rules)
        with self._swap:
            old, self._active = self._active, new
        old.retire()
        return rules.rule_count if rules is not None else 0

    async def reload(self, config: WafConfig) -> int:
        """``load`` on the engine's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.load, config)

    # -- inspection ----------------------------------------------------------------------

    async def inspect(self, request: WafRequest) -> WafVerdict:
        """The request's verdict, computed on the engine's threads; the transaction is ended."""
        if self._closed:
            raise RuntimeError("WAF engine is closed")
        if self._active.config.mode is WafMode.DISABLED:
            return self._disabled(request)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.inspect_sync, request)

    def inspect_sync(self, request: WafRequest) -> WafVerdict:
        """``inspect`` on the calling thread (CLI, benchmarks, worker threads)."""
        return self.begin_sync(request, keep_open=False).verdict

    async def begin(self, request: WafRequest) -> WafExchange:
        """The request's verdict in an exchange that stays open for the response when the config
        inspects responses (and the request was not blocked): see ``WafExchange``."""
        if self._closed:
            raise RuntimeError("WAF engine is closed")
        if self._active.config.mode is WafMode.DISABLED:
            return WafExchange(self._executor, self._disabled(request))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.begin_sync, request)

    def begin_sync(self, request: WafRequest, *, keep_open: bool | None = None) -> WafExchange:
        """``begin`` on the calling thread; ``keep_open`` overrides ``config.inspect_response``."""
        if self._closed:
            raise RuntimeError("WAF engine is closed")
        with self._swap:
            active = self._active
            active.acquire()
        if active.rules is None:
            active.release()
            return WafExchange(self._executor, self._disabled(request))
        try:
            self._modsec_lease.acquire()
        except BaseException:
            active.release()
            raise
        leases: tuple[_Lease, ...] = (active, self._modsec_lease)
        request_id = request.request_id or uuid.uuid4().hex
        try:
            tx = capi.Transaction(self._modsec, active.rules, request_id)
        except BaseException:
            for lease in leases:
                lease.release()
            raise
        exchange = WafExchange(self._executor, self._disabled(request), tx, leases, active.config)
        try:
            exchange.verdict = self._request_phases(active.config, tx, request, request_id)
        except BaseException:
            exchange.close()
            raise
        keep = active.config.inspect_response if keep_open is None else keep_open
        if keep and not exchange.verdict.blocked:
            exchange._consumed = len(tx.sink.messages)
        else:
            exchange.close()
        return exchange

    @staticmethod
    def _disabled(request: WafRequest) -> WafVerdict:
        return WafVerdict(request.request_id or uuid.uuid4().hex, "allow", 200, WafMode.DISABLED)

    @staticmethod
    def _request_phases(
        config: WafConfig, tx: capi.Transaction, request: WafRequest, request_id: str
    ) -> WafVerdict:
        body_inspected = over_limit = blocked_by_limit = False
        engine_findings: tuple[Finding, ...] = ()
        tx.process_connection(
            request.client_addr, request.client_port, request.server_addr, request.server_port
        )
        tx.process_uri(request.uri, request.method, request.http_version)
        for name, value in request.headers:
            tx.add_request_header(name, value)
        tx.process_request_headers()
        it = tx.intervention()
        if it is None:
            body = request.body
            if body and config.body_inspected(request.effective_content_type()):
                limit = config.request_body_limit
                if len(body) > limit:
                    over_limit = True
                    reject = config.request_body_limit_action is BodyLimitAction.REJECT
                    blocked_by_limit = reject and config.mode is WafMode.ENFORCE
                    message = f"Request body larger than the limit of {limit} bytes"
                    engine_findings = (
                        Finding(BODY_OVER_LIMIT_RULE_ID, message, disruptive=blocked_by_limit),
                    )
                    body = body[:limit]
                if not blocked_by_limit:
                    tx.append_request_body(body)
                    body_inspected = True
            if not blocked_by_limit:
                tx.process_request_body()
                it = tx.intervention()
        return _verdict(
            config,
            request_id,
            list(tx.sink.messages),
            it,
            INBOUND_SCORE_RULE_ID,
            body_inspected=body_inspected,
            over_limit=over_limit,
            engine_findings=engine_findings,
            blocked_by_limit=blocked_by_limit,
        )

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for running steps, then free the rule set and the library instance (each after
        the last open exchange using it has ended)."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._swap:
            active, self._active = self._active, _ActiveRules(WafConfig(mode=WafMode.DISABLED), None)
        active.retire()
        self._modsec_lease.retire()

    async def aclose(self) -> None:
        """``close`` without blocking the loop while running steps drain."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> WafEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
