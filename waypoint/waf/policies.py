"""The WafPolicies a waypoint holds, the engines that run them, and which applies to a request.

Discovery delivers the ``WafPolicy`` objects bound to this waypoint (:mod:`mesh.xds.waf`); this
module lowers each to a ``WafConfig`` and keeps **one ``WafEngine`` per distinct config** (two
policies saying the same thing share the rule set). Loading the CRS takes tens of milliseconds of
C time, so it runs on the engine's threads, never on the event loop, in one reconciling task that
catches up with the latest state (bursts of updates coalesce).

A policy's new config takes effect only if ModSecurity loads it: when it refuses (a bad extra
``SecRule``), the policy's previous config stays in force, ModSecurity's message is logged and
kept as the policy's ``error`` (``config_dump``), and the next change of the policy tries again.
A policy that never loaded has nothing in force: requests go on as if it did not exist (to the
Gateway's policy, if any), which is what "the previous rule set stays in force" means for a new
policy.

Precedence for a request (:meth:`WafPolicies.for_request`): a policy targeting the destination
Service, else one targeting this waypoint's Gateway; among several of one kind, the oldest (then
by namespace/name), as Istio orders equals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from mesh.model.policy import oldest_first
from mesh.model.waf import WafConfigError, WafPolicy
from mesh.xds.state import ProxyState
from waypoint.waf.capi import RuleLoadError, WafLibraryError
from waypoint.waf.config import CRS_RULES_DIR, WafConfig
from waypoint.waf.engine import WafEngine

log = structlog.get_logger(__name__)

_GATEWAY_GROUP = "gateway.networking.k8s.io"


def to_config(p: WafPolicy, crs_rules_dir: str = CRS_RULES_DIR) -> WafConfig:
    """The engine configuration a policy means; ``WafConfigError`` names a bad field."""
    return WafConfig(
        mode=p.mode,
        paranoia_level=p.paranoia_level,
        inbound_anomaly_threshold=p.inbound_anomaly_threshold,
        outbound_anomaly_threshold=p.outbound_anomaly_threshold,
        exclude_rule_ids=p.exclude_rule_ids,
        exclude_rule_tags=p.exclude_rule_tags,
        extra_rules=p.extra_rules,
        request_body_limit=p.request_body_limit,
        request_body_limit_action=p.request_body_limit_action,
        inspected_body_types=p.inspect_content_types,
        crs_rules_dir=crs_rules_dir,
    )


@dataclass(frozen=True, slots=True)
class Binding:
    """The policy in force for a request, and the engine running its config."""

    policy: WafPolicy
    engine: WafEngine


@dataclass(slots=True)
class _Record:
    """One policy: the version last seen, the version in force (None: nothing loaded yet)."""

    seen: WafPolicy
    in_force: WafPolicy | None = None
    config: WafConfig | None = None
    rule_count: int = 0
    error: str | None = None


LoadResult = Callable[[str, bool], None]  # (policy key, loaded) -> None: metrics


class WafPolicies:
    """Keeps the engines in step with the WafPolicies in ``state``; ``run()`` until cancelled."""

    def __init__(
        self,
        state: ProxyState,
        waypoint: tuple[str, str],
        *,
        max_workers: int | None = None,
        crs_rules_dir: str = CRS_RULES_DIR,
        on_load: LoadResult | None = None,
    ) -> None:
        self._state = state
        self.waypoint = waypoint
        self._max_workers = max_workers
        self._crs_rules_dir = crs_rules_dir
        self._on_load = on_load
        self._records: dict[str, _Record] = {}
        self._engines: dict[WafConfig, WafEngine] = {}
        self._bindings: tuple[Binding, ...] = ()  # in force, in precedence order within a kind
        self._wake = asyncio.Event()
        self._settled = asyncio.Condition()
        self._synced_version = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- reading ----------------------------------------------------------------------------------

    def for_request(self, service: tuple[str, str] | None) -> Binding | None:
        """The policy (and engine) for a request to ``service`` (``(namespace, name)``)."""
        gateway: Binding | None = None
        for b in self._bindings:
            p = b.policy
            for ref in p.target_refs:
                if ref.kind == "Service" and service is not None and (p.namespace, ref.name) == service:
                    return b
                if (
                    gateway is None
                    and ref.kind == "Gateway"
                    and ref.group == _GATEWAY_GROUP
                    and (p.namespace, ref.name) == self.waypoint
                ):
                    gateway = b
        return gateway

    def dump(self) -> list[dict[str, Any]]:
        """What ``config_dump`` shows: each policy, what is in force, the last load error."""
        out = []
        for key in sorted(self._records):
            r = self._records[key]
            p = r.in_force or r.seen
            out.append(
                {
                    "name": p.name,
                    "namespace": p.namespace,
                    "targets": [f"{t.kind}/{t.name}" for t in p.target_refs],
                    "mode": p.mode.value,
                    "paranoia_level": p.paranoia_level,
                    "in_force": r.in_force is not None,
                    "latest_in_force": r.in_force == r.seen,
                    "rule_count": r.rule_count,
                    "error": r.error,
                }
            )
        return out

    @property
    def engine_count(self) -> int:
        return len(self._engines)

    async def settled(self, timeout: float) -> None:
        """Wait until every WafPolicy of the current state has been loaded or refused."""
        async with asyncio.timeout(timeout), self._settled:
            await self._settled.wait_for(
                lambda: self._synced_version >= self._state.snapshot().version and not self._wake.is_set()
            )

    # -- the reconciling task ---------------------------------------------------------------------

    def _changed(self, _version: int) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        unsubscribe = self._state.subscribe(self._changed)
        self._wake.set()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                snapshot = self._state.snapshot()
                await self._reconcile(snapshot.waf_policies)
                async with self._settled:
                    self._synced_version = snapshot.version
                    self._settled.notify_all()
        finally:
            unsubscribe()

    async def _reconcile(self, policies: Mapping[str, WafPolicy]) -> None:
        for key in [k for k in self._records if k not in policies]:
            del self._records[key]
            log.info("WAF policy removed", policy=key)
        for key, p in sorted(policies.items()):
            r = self._records.get(key)
            if r is not None and r.seen == p:
                continue  # loaded, or refused and unchanged since
            if r is None:
                r = self._records[key] = _Record(p)
            r.seen = p
            await self._load(key, r, p)
        self._bind()
        for config in [c for c in self._engines if not any(r.config == c for r in self._records.values())]:
            engine = self._engines.pop(config)
            with contextlib.suppress(Exception):
                await engine.aclose()

    async def _load(self, key: str, r: _Record, p: WafPolicy) -> None:
        try:
            config = to_config(p, self._crs_rules_dir)
        except WafConfigError as e:
            self._refused(key, r, str(e))
            return
        engine = self._engines.get(config)
        if engine is None:
            try:
                engine = WafEngine(max_workers=self._max_workers)
            except (WafLibraryError, OSError) as e:  # libmodsecurity missing or broken
                self._refused(key, r, f"WAF engine unavailable: {e}")
                return
            try:
                count = await engine.reload(config)
            except (RuleLoadError, WafLibraryError) as e:
                await engine.aclose()
                self._refused(key, r, str(e))
                return
            except BaseException:
                await engine.aclose()
                raise
            self._engines[config] = engine
        else:
            count = engine.rule_count
        r.in_force, r.config, r.rule_count, r.error = p, config, count, None
        log.info(
            "WAF policy loaded",
            policy=key,
            mode=p.mode.value,
            paranoia_level=p.paranoia_level,
            rules=count,
        )
        if self._on_load is not None:
            self._on_load(key, True)

    def _refused(self, key: str, r: _Record, error: str) -> None:
        r.error = error
        log.error(
            "WAF policy refused, previous rules stay in force"
            if r.in_force is not None
            else "WAF policy refused, nothing of it in force",
            policy=key,
            error=error,
        )
        if self._on_load is not None:
            self._on_load(key, False)

    def _bind(self) -> None:
        bound = [
            Binding(r.in_force, self._engines[r.config])
            for r in self._records.values()
            if r.in_force is not None and r.config is not None
        ]
        bound.sort(key=lambda b: oldest_first(b.policy))
        self._bindings = tuple(bound)

    async def aclose(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        self._bindings = ()
        for engine in engines:
            with contextlib.suppress(Exception):
                await engine.aclose()
