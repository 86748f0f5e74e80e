"""WafPolicy delivery and the waypoint's policy engines.

* Discovery serves each WafPolicy only to the waypoints its targetRefs reach (a Gateway: that
  waypoint; a Service: the waypoints that serve it), as it does AuthorizationPolicies.
* :class:`waypoint.waf.policies.WafPolicies`: one engine per distinct config, Service before
  Gateway, a refused update keeps the previous rules (ModSecurity's message kept), removal.
  State arrives as the xDS client writes it (``ProxyState.apply``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio

from controlplane.xds import Metadata
from mesh.model import MeshObject, PolicyTargetRef, WaypointRef
from mesh.model.waf import WafMode, WafPolicy
from mesh.xds.client import WAYPOINT_TYPE_URLS
from mesh.xds.state import ProxyState
from mesh.xds.waf import WAF_POLICY_TYPE_URL
from tests.xds.helpers import namespace, pod, service, waypoint_gateway
from tests.xds.test_server_client import TIMEOUT, Running, Server, make_store
from waypoint.waf import WafRequest
from waypoint.waf.policies import WafPolicies, to_config

GATEWAY_GROUP = "gateway.networking.k8s.io"
SQLI = "/p?id=1%27%20OR%20%271%27%3D%271"
HOST = (("host", "web.shop"),)


def on(name: str, *refs: PolicyTargetRef, **fields: object) -> WafPolicy:
    return WafPolicy("shop", name, refs, **fields)  # type: ignore[arg-type]


def gw(name: str = "waypoint") -> PolicyTargetRef:
    return PolicyTargetRef("Gateway", name, GATEWAY_GROUP)


WEB = PolicyTargetRef("Service", "web")


async def test_each_waypoint_receives_only_its_waf_policies(tmp_path: Path) -> None:
    objects: list[MeshObject] = [
        namespace("shop", WaypointRef("waypoint", "shop")),
        waypoint_gateway(waypoint_for="all"),
        waypoint_gateway("other", waypoint_for="all"),
        pod("web-1", "10.0.1.1", sa="web", labels={"app": "web"}),
        service("web", "10.96.0.10"),
        on("on-gateway", gw()),
        on("on-web", WEB),
        on("on-other", gw("other")),
    ]
    callers = {
        "Bearer wp": "shop/waypoint",
        "Bearer other": "shop/other",
        "Bearer zt": "istio-system/ztunnel",
    }

    async def authenticate(metadata: Metadata) -> str:
        return callers[dict(metadata)["authorization"]]  # type: ignore[index]

    srv = Server(make_store(objects), authenticate=authenticate)
    await srv.start()
    try:
        got: dict[str, set[str]] = {}
        for token, caller in callers.items():
            token_file = tmp_path / "token"
            token_file.write_text(token.removeprefix("Bearer "))
            async with Running(srv.address, types=WAYPOINT_TYPE_URLS, token_file=token_file) as r:
                await asyncio.wait_for(r.client.synced.wait(), TIMEOUT)
                got[caller] = set(r.client.state.snapshot().waf_policies)
                if token == "Bearer wp":  # an edit reaches it, as the new version
                    r.forget()
                    srv.store.upsert(on("on-gateway", gw(), mode=WafMode.DETECT_ONLY))
                    update = await r.next(WAF_POLICY_TYPE_URL)
                    assert update.upserted == {"shop/on-gateway"}
                    assert (
                        r.client.state.snapshot().waf_policies["shop/on-gateway"].mode is WafMode.DETECT_ONLY
                    )
        assert got == {
            "shop/waypoint": {"shop/on-gateway", "shop/on-web"},
            "shop/other": {"shop/on-other"},
            "istio-system/ztunnel": set(),
        }
    finally:
        await srv.stop()


class Held:
    def __init__(self) -> None:
        self.state = ProxyState()
        self.loads: list[tuple[str, bool]] = []
        self.waf = WafPolicies(
            self.state, ("shop", "waypoint"), max_workers=2, on_load=lambda k, ok: self.loads.append((k, ok))
        )

    async def set(self, *policies: WafPolicy) -> None:
        """What the xDS client does with a response: replace the policies, then wait for the engines."""
        current = set(self.state.snapshot().waf_policies)
        self.state.apply(waf_policies=policies, removed_waf_policies=current - {p.key for p in policies})
        await self.waf.settled(TIMEOUT)

    async def verdict(self, service: tuple[str, str] | None, uri: str = SQLI) -> str | None:
        b = self.waf.for_request(service)
        if b is None:
            return None
        return (await b.engine.inspect(WafRequest("GET", uri, HOST))).action


@pytest_asyncio.fixture
async def held() -> AsyncIterator[Held]:
    h = Held()
    task = asyncio.create_task(h.waf.run())
    try:
        yield h
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await h.waf.aclose()


async def test_service_first_then_gateway_and_one_engine_per_config(held: Held) -> None:
    old = datetime(2020, 1, 1, tzinfo=UTC)
    await held.set(
        on("gateway", gw()),
        on("web", WEB, mode=WafMode.DETECT_ONLY),
        on("web-newer", WEB, creation_timestamp=datetime(2024, 1, 1, tzinfo=UTC)),
        on("web-older", WEB, mode=WafMode.DETECT_ONLY, creation_timestamp=old),
        on("other-gateway", gw("other")),
    )
    binding = held.waf.for_request(("shop", "web"))
    assert binding is not None and binding.policy.name == "web-older"  # oldest among Service targets
    assert await held.verdict(("shop", "web")) == "detect"
    assert await held.verdict(("shop", "cart")) == "block"  # the Gateway's
    assert await held.verdict(("other", "web")) == "block"  # another namespace's "web": the Gateway's
    assert await held.verdict(None) == "block"
    # Five policies, two distinct configs: two engines.
    assert held.waf.engine_count == 2
    await held.set(on("web", WEB, mode=WafMode.DISABLED))
    assert await held.verdict(("shop", "cart")) is None  # no Gateway policy any more
    assert held.waf.engine_count == 1


async def test_a_refused_update_keeps_the_previous_rules(held: Held) -> None:
    rule = 'SecRule ARGS:debug "@streq 1" "id:1000001,phase:1,deny,status:403"'
    good = on("gateway", gw(), extra_rules=(rule,))
    await held.set(good)
    assert await held.verdict(None, "/x?debug=1") == "block"
    bad = dataclasses.replace(good, extra_rules=(rule, 'SecRule ARGS "@rx x" "id:1000002,deny,nosuchaction"'))
    await held.set(bad)
    (entry,) = held.waf.dump()
    assert entry["in_force"] is True and entry["latest_in_force"] is False
    assert "Expecting an action, got:  nosuchaction" in str(entry["error"])
    assert await held.verdict(None, "/x?debug=1") == "block"  # still the good rules
    assert held.loads == [("shop/gateway", True), ("shop/gateway", False)]
    # A new policy that never loaded has nothing in force: the request goes on without it.
    await held.set(good, on("web", WEB, extra_rules=("SecRule ARGS x",)))
    assert held.waf.for_request(("shop", "web")) is not None
    assert held.waf.for_request(("shop", "web")).policy.name == "gateway"  # type: ignore[union-attr]
    assert [e["in_force"] for e in held.waf.dump()] == [True, False]


def test_policy_to_config() -> None:
    p = on(
        "w", WEB, paranoia_level=3, exclude_rule_ids=(942100,), inspect_content_types=("application/json",)
    )
    c = to_config(p)
    assert (c.paranoia_level, c.exclude_rule_ids, c.inspected_body_types) == (
        3,
        (942100,),
        ("application/json",),
    )
    assert c.body_inspected("application/json; charset=utf-8") and not c.body_inspected(
        "application/x-www-form-urlencoded"
    )
    assert to_config(on("w", WEB)).body_inspected("application/x-www-form-urlencoded")
    assert not to_config(on("w", WEB)).body_inspected("application/grpc")


@pytest.mark.parametrize("kind", ["Gateway", "Service"])
def test_targets_need_their_group(kind: str) -> None:
    # The waypoint trusts what discovery checked; the model check refuses the mismatched group.
    from mesh.model.waf import WafConfigError, check_policy

    group = "" if kind == "Gateway" else GATEWAY_GROUP
    with pytest.raises(WafConfigError, match=r"spec\.targetRefs\[0\]"):
        check_policy(on("w", PolicyTargetRef(kind, "x", group)))


async def test_without_the_core_rule_set_the_policy_is_refused_loudly(tmp_path: Path) -> None:
    state = ProxyState()
    waf = WafPolicies(state, ("shop", "waypoint"), max_workers=1, crs_rules_dir=str(tmp_path / "missing"))
    task = asyncio.create_task(waf.run())
    try:
        state.apply(waf_policies=[on("gateway", gw())])
        await waf.settled(TIMEOUT)
        (entry,) = waf.dump()
        assert entry["in_force"] is False
        assert "crs_rules_dir" in str(entry["error"]) and "apt-get install modsecurity-crs" in str(
            entry["error"]
        )
        assert waf.for_request(None) is None and waf.engine_count == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await waf.aclose()


def test_a_policy_that_reaches_no_waypoint_is_reported_once() -> None:
    from structlog.testing import capture_logs

    from controlplane.xds import ResourceCache

    store = make_store(
        [
            namespace("shop"),
            waypoint_gateway(waypoint_for="all"),
            pod("web-1", "10.0.1.1", sa="web", labels={"app": "web"}),
            service("web", "10.96.0.10"),
            on("on-web", WEB),
        ]
    )
    with capture_logs() as logs:
        cache = ResourceCache(store)
        store.upsert(on("on-web", WEB, paranoia_level=2))  # still nowhere: not said again
        cache.current()
    warned = [e for e in logs if e["event"] == "WafPolicy applies to no waypoint: it inspects nothing"]
    assert [(e["policy"], e["targets"]) for e in warned] == [("shop/on-web", "Service/web")]
    # The namespace gets the waypoint: the policy reaches it.
    store.upsert(namespace("shop", WaypointRef("waypoint", "shop")))
    assert cache.current().audiences[WAF_POLICY_TYPE_URL]["shop/on-web"] == {"shop/waypoint"}
    cache.close()
