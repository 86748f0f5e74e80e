"""The WAF engine: libmodsecurity through cffi, running the Debian OWASP CRS 3.3.4.

Real library, real rules: nothing here is mocked. Engines are shared per module (loading the CRS
costs tens of milliseconds each) and keyed by their config.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

from waypoint.waf import (
    BodyLimitAction,
    RuleLoadError,
    WafConfig,
    WafConfigError,
    WafEngine,
    WafMode,
    WafRequest,
    WafResponse,
    WafVerdict,
    capi,
    rules_text,
)
from waypoint.waf.engine import BODY_OVER_LIMIT_RULE_ID
from waypoint.waf.findings import collect, parse_message

HEADERS = (("host", "reviews.default.svc"), ("user-agent", "curl/8.1"), ("accept", "*/*"))
SQLI = "/products?id=" + quote("1' OR '1'='1")
XSS = "/search?q=" + quote("<script>alert(1)</script>")
TRAVERSAL = "/static/../../etc/passwd"
PL2_ONLY = "/comment?text=" + quote("<a href=x>")  # 941150 + 941320: paranoia level 2 rules only

EngineFactory = Callable[[WafConfig], WafEngine]


@pytest.fixture(scope="module")
def make_engine() -> Iterator[EngineFactory]:
    engines: dict[WafConfig, WafEngine] = {}

    def make(config: WafConfig) -> WafEngine:
        if config not in engines:
            engine = WafEngine()
            engine.load(config)
            engines[config] = engine
        return engines[config]

    yield make
    for engine in engines.values():
        engine.close()


@pytest.fixture(scope="module")
def engine(make_engine: EngineFactory) -> WafEngine:
    return make_engine(WafConfig())


def get(uri: str, headers: tuple[tuple[str, str], ...] = HEADERS) -> WafRequest:
    return WafRequest(
        "GET",
        uri,
        headers,
        client_addr="10.0.1.2",
        client_port=40000,
        server_addr="10.0.2.3",
        server_port=9080,
    )


def post(uri: str, content_type: str, body: bytes, http_version: str = "1.1") -> WafRequest:
    headers = (*HEADERS, ("content-type", content_type), ("content-length", str(len(body))))
    return WafRequest("POST", uri, headers, body=body, http_version=http_version)


# -- the binding ------------------------------------------------------------------------------


def test_binding_loads_the_crs_and_reports_parser_errors() -> None:
    with capi.ModSecurity() as modsec, capi.RuleSet() as rules:
        assert modsec.who_am_i().startswith("ModSecurity v3.")
        assert rules.add(rules_text(WafConfig())) > 900  # the whole CRS: 913 rules plus ours
        with pytest.raises(RuleLoadError, match=r"Expecting an action, got:\s+bogus"):
            rules.add('SecRule ARGS "@rx x" "id:1,phase:2,bogus"')


def test_binding_transaction_intervention_and_log_callback() -> None:
    rule = 'SecRule ARGS:q "@streq evil" "id:10,phase:1,deny,status:418,log,msg:\'teapot\'"'
    with capi.ModSecurity() as modsec, capi.RuleSet() as rules:
        rules.add("SecRuleEngine On\n" + rule)
        for query, expected in (("evil", 418), ("fine", None)):
            with capi.Transaction(modsec, rules, f"tx-{query}") as tx:
                tx.process_connection("10.0.0.1", 1234, "10.0.0.2", 80)
                tx.process_uri(f"/?q={query}", "GET", "1.1")
                tx.add_request_header("host", "x")
                tx.process_request_headers()
                it = tx.intervention()
                tx.process_logging()
                if expected is None:
                    assert it is None
                    assert tx.sink.messages == []
                else:
                    assert it is not None and it.status == expected and it.disruptive
                    assert it.log is not None and '[id "10"]' in it.log
                    assert tx.intervention() is None  # reported once, then cleared


def test_binding_request_body() -> None:
    rule = 'SecRule REQUEST_BODY "@contains needle" "id:11,phase:2,deny,status:403,log,msg:\'found\'"'
    with capi.ModSecurity() as modsec, capi.RuleSet() as rules:
        rules.add("SecRuleEngine On\nSecRequestBodyAccess On\n" + rule)
        with capi.Transaction(modsec, rules, "tx-body") as tx:
            tx.process_uri("/upload", "POST", "1.1")
            tx.add_request_header("content-type", "text/plain")
            tx.process_request_headers()
            tx.append_request_body(b"hay hay ")
            tx.append_request_body(b"needle hay")
            tx.process_request_body()
            it = tx.intervention()
            assert it is not None and it.status == 403


def test_closing_twice_frees_once() -> None:
    modsec, rules = capi.ModSecurity(), capi.RuleSet()
    tx = capi.Transaction(modsec, rules, "x")
    for obj in (tx, rules, modsec):
        obj.close()
        obj.close()
    with pytest.raises(ValueError, match="closed"):
        tx.process_request_headers()


# -- the log parser ------------------------------------------------------------------------------


def test_parse_message_fields() -> None:
    text = (
        'ModSecurity: Warning. Matched "Operator `Rx\'" [file "/x.conf"] [line "53"] [id "930110"] [rev ""] '
        '[msg "Path Traversal Attack (/../)"] [data "Matched Data: /../ found within REQUEST_URI: "/a/../b""] '
        '[severity "2"] [tag "attack-lfi"] [tag "paranoia-level/1"] [unique_id "u1"] [ref "o2,4"]'
    )
    f = parse_message(text)
    assert f is not None
    assert f.rule_id == 930110
    assert f.message == "Path Traversal Attack (/../)"
    assert f.data == 'Matched Data: /../ found within REQUEST_URI: "/a/../b"'
    assert f.tags == ("attack-lfi", "paranoia-level/1")
    assert parse_message("ModSecurity: no rule here") is None
    findings, score = collect(
        [text, '[id "99001"] [msg "inbound anomaly score"] [data "score=7"]'], None, score_rule_id=99001
    )
    assert [x.rule_id for x in findings] == [930110]
    assert score == 7
    blocked = '[id "949110"] [msg "Inbound Anomaly Score Exceeded (Total Score: 10)"] [data ""]'
    findings, score = collect([text], blocked, score_rule_id=99001)
    assert score == 10  # the report rule did not run: the blocking rule's total stands in
    assert [(x.rule_id, x.disruptive) for x in findings] == [(930110, False), (949110, True)]
    assert collect([text], None, score_rule_id=99001)[1] is None


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"paranoia_level": 5}, "paranoia_level"),
        ({"paranoia_level": 0}, "paranoia_level"),
        ({"inbound_anomaly_threshold": 0}, "inbound_anomaly_threshold"),
        ({"request_body_limit": 0}, "request_body_limit"),
        ({"exclude_rule_ids": (0,)}, "exclude_rule_ids"),
        ({"exclude_rule_tags": ('a"b',)}, "exclude_rule_tags"),
        ({"extra_rules": ("  ",)}, "extra_rules"),
        ({"uninspected_body_types": ("Application/GRPC",)}, "uninspected_body_types"),
        ({"mode": "On"}, "mode"),
        ({"crs_rules_dir": "/nonexistent"}, "crs_rules_dir"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(WafConfigError, match=f"^{field}:"):
        WafConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rule", "refused"),
    [
        ("Include /etc/modsecurity/crs/crs-setup.conf", "directive 'Include'"),
        ("SecDebugLog /tmp/waf.log", "directive 'SecDebugLog'"),
        ("SecRemoteRules key https://example.com/rules.conf", "directive 'SecRemoteRules'"),
        ('SecRule ARGS "@rx x" "id:1003,phase:2,deny"\nSecRuleEngine Off', "directive 'SecRuleEngine'"),
        ('SecRule FILES_TMPNAMES "@inspectFile /bin/sh" "id:1004,phase:2,deny"', "'@inspectFile'"),
        ('SecRule ARGS "@pmFromFile /etc/shadow" "id:1005,phase:2,deny"', "'@pmFromFile'"),
        ('SecAction "id:1006,phase:1,pass,exec:/tmp/x.lua"', "'exec:'"),
        ('SecAction "id:1007,phase:1,pass,setenv:LD_PRELOAD=/tmp/x.so"', "'setenv:'"),
        ("SecAction \"id:1008,phase:1,pass,setvar:'ip.blocked=1'\"", '"setvar:\'ip."'),
    ],
)
def test_extra_rules_cannot_reach_outside_the_waf(rule: str, refused: str) -> None:
    with pytest.raises(WafConfigError, match=r"^extra_rules: item 0: ") as exc:
        WafConfig(extra_rules=(rule,))
    assert refused in str(exc.value)


async def test_extra_rule_may_turn_the_engine_off_for_a_path(make_engine: EngineFactory) -> None:
    rule = (
        'SecRule REQUEST_URI "@beginsWith /legacy/" \\\n    "id:1009,phase:1,pass,nolog,ctl:ruleEngine=Off"'
    )
    engine = make_engine(WafConfig(extra_rules=(rule,)))
    assert (await engine.inspect(get("/legacy/?id=" + quote("1' OR '1'='1")))).action == "allow"
    assert (await engine.inspect(get(SQLI))).blocked


def test_rules_text_orders_setup_rules_then_exclusions() -> None:
    text = rules_text(
        WafConfig(
            mode=WafMode.DETECT_ONLY,
            paranoia_level=3,
            exclude_rule_ids=(942100,),
            exclude_rule_tags=("attack-xss",),
            extra_rules=('SecRule ARGS "@streq x" "id:500,phase:2,deny"',),
        )
    )
    assert "SecRuleEngine DetectionOnly" in text
    assert "setvar:tx.paranoia_level=3" in text
    order = [
        text.index("ctl:requestBodyProcessor=JSON"),
        text.index("tx.crs_setup_version=334"),
        text.index("REQUEST-901-INITIALIZATION.conf"),
        text.index("REQUEST-949-BLOCKING-EVALUATION.conf"),
        text.index("SecRuleRemoveById 942100"),
        text.index('SecRuleRemoveByTag "attack-xss"'),
        text.index("id:500"),
    ]
    assert order == sorted(order)


# -- the Core Rule Set, Enforce, paranoia level 1 -----------------------------------------------


@pytest.mark.parametrize(
    ("uri", "family"),
    [(SQLI, 942), (XSS, 941), (TRAVERSAL, 930)],
    ids=["sqli", "xss", "traversal"],
)
async def test_crs_blocks_attacks(engine: WafEngine, uri: str, family: int) -> None:
    verdict = await engine.inspect(get(uri))
    assert verdict.blocked and verdict.status == 403
    assert any(rid // 1000 == family for rid in verdict.rule_ids), verdict.rule_ids
    assert 949110 in verdict.rule_ids  # the anomaly-score evaluation is what blocked
    assert verdict.anomaly_score is not None and verdict.anomaly_score >= 5
    assert verdict.request_id


async def test_clean_request_passes(engine: WafEngine) -> None:
    verdict = await engine.inspect(get("/products?id=42&sort=price"))
    assert verdict.action == "allow" and verdict.status == 200
    assert verdict.findings == () and verdict.anomaly_score == 0


async def test_request_id_is_kept(engine: WafEngine) -> None:
    request = WafRequest("GET", SQLI, HEADERS, request_id="req-1234")
    verdict = await engine.inspect(request)
    assert verdict.request_id == "req-1234"


async def test_json_body_sqli_is_blocked(engine: WafEngine) -> None:
    verdict = await engine.inspect(post("/api/login", "application/json", b"{\"user\": \"1' OR '1'='1\"}"))
    assert verdict.blocked and verdict.body_inspected
    sqli = [f for f in verdict.findings if f.rule_id == 942100]
    assert sqli and "ARGS:json.user" in sqli[0].data
    clean = await engine.inspect(post("/api/login", "application/json", b'{"user": "alice"}'))
    assert clean.action == "allow" and clean.body_inspected


async def test_form_body_sqli_is_blocked(engine: WafEngine) -> None:
    verdict = await engine.inspect(
        post("/login", "application/x-www-form-urlencoded", b"user=1%27%20OR%20%271%27%3D%271")
    )
    assert verdict.blocked and 942100 in verdict.rule_ids


MULTIPART = (
    b'--XyZ\r\nContent-Disposition: form-data; name="user"\r\n\r\n{user}\r\n'
    b'--XyZ\r\nContent-Disposition: form-data; name="f"; filename="a.txt"\r\n'
    b"Content-Type: text/plain\r\n\r\nhello\r\n--XyZ--\r\n"
)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/xml", b"<?xml version='1.0'?><order><user>{user}</user></order>"),
        ("text/xml; charset=utf-8", b"<order><user>{user}</user></order>"),
        ("multipart/form-data; boundary=XyZ", MULTIPART),
        ("application/json; charset=utf-8", b'{"user": {"name": "{user}"}}'),
    ],
)
async def test_structured_bodies_are_parsed_and_inspected(
    engine: WafEngine, content_type: str, body: bytes
) -> None:
    attack = await engine.inspect(post("/order", content_type, body.replace(b"{user}", b"1' OR '1'='1")))
    assert attack.blocked and 942100 in attack.rule_ids and attack.body_inspected
    clean = await engine.inspect(post("/order", content_type, body.replace(b"{user}", b"alice")))
    assert clean.action == "allow", clean


async def test_malformed_body_is_refused_with_400(engine: WafEngine) -> None:
    verdict = await engine.inspect(post("/order", "application/xml", b"<order><user>alice</user>"))
    assert verdict.blocked and verdict.status == 400 and verdict.rule_ids == (200002,)
    assert "XML" in verdict.findings[0].data


async def test_grpc_body_is_not_fed_to_body_rules_but_uri_is_inspected(engine: WafEngine) -> None:
    body = b"\x00\x00\x00\x00\x1c" + b"1' OR '1'='1 union select * --"
    # The same bytes as a form body are an attack: the control that makes the next check mean something.
    assert (
        await engine.inspect(post("/pkg.Svc/Call", "application/x-www-form-urlencoded", b"q=" + body[5:]))
    ).blocked
    verdict = await engine.inspect(post("/pkg.Svc/Call", "application/grpc", body, http_version="2"))
    assert verdict.action == "allow" and not verdict.body_inspected
    attack_uri = await engine.inspect(
        post("/pkg.Svc/Call?x=" + quote("<script>alert(1)</script>"), "application/grpc", body, "2")
    )
    assert attack_uri.blocked and not attack_uri.body_inspected
    headers = (*HEADERS, ("content-type", "application/grpc"), ("cookie", "session=1' OR '1'='1"))
    attack_header = await engine.inspect(
        WafRequest("POST", "/pkg.Svc/Call", headers, body=body, http_version="2")
    )
    assert attack_header.blocked


async def test_grpc_body_inspection_is_configurable(make_engine: EngineFactory) -> None:
    body = b"\x00\x00\x00\x00\x1c" + b"1' OR '1'='1 union select * --"
    engine = make_engine(WafConfig(uninspected_body_types=()))
    assert engine.wants_body("application/grpc")
    verdict = await engine.inspect(post("/pkg.Svc/Call", "application/grpc", body, http_version="2"))
    assert verdict.body_inspected and verdict.blocked


# -- modes ------------------------------------------------------------------------------------------


async def test_detect_only_logs_but_passes(make_engine: EngineFactory) -> None:
    engine = make_engine(WafConfig(mode=WafMode.DETECT_ONLY))
    verdict = await engine.inspect(get(SQLI))
    assert verdict.allowed and verdict.action == "detect" and verdict.status == 200
    assert {942100, 949110} <= set(verdict.rule_ids)
    assert verdict.anomaly_score == 5
    assert (await engine.inspect(get("/products?id=42"))).action == "allow"


async def test_disabled_does_nothing(make_engine: EngineFactory) -> None:
    engine = make_engine(WafConfig(mode=WafMode.DISABLED))
    assert engine.rule_count == 0 and not engine.wants_body("application/json")
    for uri in (SQLI, XSS, TRAVERSAL):
        verdict = await engine.inspect(get(uri))
        assert verdict.action == "allow" and verdict.findings == () and verdict.anomaly_score is None


# -- tuning -----------------------------------------------------------------------------------------


async def test_exclusion_by_id_stops_a_block(make_engine: EngineFactory, engine: WafEngine) -> None:
    assert set((await engine.inspect(get(SQLI))).rule_ids) == {942100, 949110}
    tuned = make_engine(WafConfig(exclude_rule_ids=(942100,)))
    verdict = await tuned.inspect(get(SQLI))
    assert verdict.action == "allow" and verdict.anomaly_score == 0
    assert (await tuned.inspect(get(XSS))).blocked  # only that rule is gone


async def test_exclusion_by_tag_stops_a_block(make_engine: EngineFactory) -> None:
    tuned = make_engine(WafConfig(exclude_rule_tags=("attack-sqli",)))
    assert (await tuned.inspect(get(SQLI))).action == "allow"
    assert (await tuned.inspect(get(XSS))).blocked


async def test_paranoia_level_changes_the_outcome(engine: WafEngine, make_engine: EngineFactory) -> None:
    pl1 = await engine.inspect(get(PL2_ONLY))
    assert pl1.action == "allow"
    pl2 = await make_engine(WafConfig(paranoia_level=2)).inspect(get(PL2_ONLY))
    assert pl2.blocked and {941150, 941320} <= set(pl2.rule_ids)


async def test_anomaly_threshold_changes_the_outcome(make_engine: EngineFactory) -> None:
    lenient = make_engine(WafConfig(inbound_anomaly_threshold=10))
    verdict = await lenient.inspect(get(SQLI))  # score 5
    assert verdict.action == "detect" and verdict.anomaly_score == 5 and 942100 in verdict.rule_ids


async def test_extra_rule_is_applied(make_engine: EngineFactory) -> None:
    rule = 'SecRule REQUEST_HEADERS:x-canary "@streq 1" "id:1001,phase:1,deny,status:406,log,msg:\'canary\'"'
    engine = make_engine(WafConfig(extra_rules=(rule,)))
    verdict = await engine.inspect(get("/", (*HEADERS, ("x-canary", "1"))))
    assert verdict.blocked and verdict.status == 406 and verdict.rule_ids == (1001,)
    assert verdict.findings[0].message == "canary" and verdict.findings[0].disruptive


# -- bodies over the limit ------------------------------------------------------------------------


async def test_body_over_limit_rejected(make_engine: EngineFactory) -> None:
    engine = make_engine(WafConfig(request_body_limit=64))
    assert engine.body_buffer_limit == 65
    verdict = await engine.inspect(post("/upload", "application/x-www-form-urlencoded", b"a=" + b"x" * 100))
    assert verdict.blocked and verdict.status == 413 and verdict.body_over_limit
    assert verdict.rule_ids == (BODY_OVER_LIMIT_RULE_ID,)
    within = await engine.inspect(post("/upload", "application/x-www-form-urlencoded", b"a=" + b"x" * 62))
    assert within.action == "allow" and not within.body_over_limit
    # Not an inspected type: nothing is buffered for the WAF, so there is no limit to exceed.
    grpc = await engine.inspect(post("/pkg.Svc/Up", "application/grpc", b"\x00" * 100, http_version="2"))
    assert grpc.action == "allow" and not grpc.body_over_limit


async def test_body_over_limit_detect_only_passes(make_engine: EngineFactory) -> None:
    engine = make_engine(WafConfig(mode=WafMode.DETECT_ONLY, request_body_limit=64))
    verdict = await engine.inspect(post("/upload", "application/x-www-form-urlencoded", b"a=" + b"x" * 100))
    assert verdict.allowed and verdict.action == "detect" and verdict.body_over_limit


async def test_body_over_limit_process_partial(make_engine: EngineFactory) -> None:
    engine = make_engine(
        WafConfig(request_body_limit=64, request_body_limit_action=BodyLimitAction.PROCESS_PARTIAL)
    )
    attack = b"q=1%27%20OR%20%271%27%3D%271&"
    head = await engine.inspect(
        post("/f", "application/x-www-form-urlencoded", attack + b"pad=" + b"x" * 100)
    )
    assert head.blocked and head.status == 403 and head.body_over_limit and 942100 in head.rule_ids
    tail = await engine.inspect(
        post("/f", "application/x-www-form-urlencoded", b"pad=" + b"x" * 100 + b"&" + attack)
    )
    assert tail.action == "detect" and tail.body_over_limit  # the attack lies past the inspected part
    assert tail.rule_ids == (BODY_OVER_LIMIT_RULE_ID,)


# -- rule loading -----------------------------------------------------------------------------------


async def test_bad_rule_is_rejected_and_old_rules_stay() -> None:
    with WafEngine(max_workers=2) as engine:
        good = WafConfig()
        await engine.reload(good)
        bad = WafConfig(
            exclude_rule_ids=(942100,), extra_rules=('SecRule ARGS "@rx x" "id:1002,phase:2,bogus"',)
        )
        with pytest.raises(RuleLoadError, match=r"Rules error\..*Expecting an action, got:\s+bogus"):
            await engine.reload(bad)
        duplicate = WafConfig(extra_rules=('SecRule ARGS "@rx x" "id:942100,phase:2,pass"',))
        with pytest.raises(RuleLoadError, match="942100 is duplicated"):
            engine.load(duplicate)
        assert engine.config is good
        assert (await engine.inspect(get(SQLI))).blocked  # the old rules, 942100 included


async def test_reload_swaps_rules(make_engine: EngineFactory) -> None:
    with WafEngine(max_workers=1) as engine:
        assert (await engine.inspect(get(SQLI))).action == "allow"  # starts Disabled
        await engine.reload(WafConfig())
        assert (await engine.inspect(get(SQLI))).blocked
        await engine.reload(WafConfig(mode=WafMode.DISABLED))
        assert (await engine.inspect(get(SQLI))).action == "allow"
    with pytest.raises(RuntimeError, match="closed"):
        await engine.inspect(get("/"))


# -- concurrency ------------------------------------------------------------------------------------


def _case(i: int) -> tuple[WafRequest, str]:
    """Request ``i`` of the stress mix and what must happen to it; attacks carry a marker ``m<i>x``."""
    kind = ("sqli", "clean", "xss", "clean", "json", "traversal")[i % 6]
    marker = f"m{i}x"
    if kind == "sqli":
        return get(f"/p?id={marker}" + quote("' OR '1'='1")), kind
    if kind == "xss":
        return get("/s?q=" + quote(f"<script>alert('{marker}')</script>")), kind
    if kind == "json":
        return post("/api", "application/json", f"{{\"user\": \"{marker}' OR '1'='1\"}}".encode()), kind
    if kind == "traversal":
        return get(f"/{marker}/../../etc/passwd"), kind
    return get(f"/p?id={marker}&page=2"), kind


def _check(i: int, kind: str, verdict: WafVerdict) -> None:
    marker = f"m{i}x"
    if kind == "clean":
        assert verdict.action == "allow" and verdict.findings == (), (i, verdict)
        return
    assert verdict.blocked and verdict.status == 403, (i, verdict)
    family = {"sqli": 942, "json": 942, "xss": 941, "traversal": 930}[kind]
    attack = [f for f in verdict.findings if f.rule_id // 1000 == family]
    assert attack, (i, verdict)
    # Every finding the log callback delivered is about this request and no other one.
    for finding in attack:
        assert marker in finding.data, (i, finding)
    others = {f"m{j}x" for j in range(i - 12, i + 13) if j != i}
    for finding in verdict.findings:
        assert not any(o in finding.data for o in others), (i, finding)


def test_concurrent_transactions_share_one_rule_set() -> None:
    """Many threads, one rule set: each verdict and each finding belongs to its own request.

    A reload of the same config runs in the middle, so transactions in flight on the replaced
    rule set must keep it alive until they end.
    """
    n = 600
    errors: list[BaseException] = []
    with WafEngine(max_workers=4) as shared:
        shared.load(WafConfig())
        start = threading.Barrier(8)

        def worker(ids: range) -> int:
            start.wait()
            done = 0
            for i in ids:
                request, kind = _case(i)
                try:
                    _check(i, kind, shared.inspect_sync(request))
                except BaseException as exc:
                    errors.append(exc)
                done += 1
                if i == n // 2:
                    shared.load(WafConfig())
            return done

        with ThreadPoolExecutor(max_workers=8) as pool:
            counts = list(pool.map(worker, [range(k, n, 8) for k in range(8)]))
    assert not errors, errors[:3]
    assert sum(counts) == n


async def test_concurrent_inspections_from_the_event_loop(engine: WafEngine) -> None:
    n = 300
    cases = [_case(i) for i in range(n)]
    verdicts = await asyncio.gather(*(engine.inspect(request) for request, _ in cases))
    for i, ((_, kind), verdict) in enumerate(zip(cases, verdicts, strict=True)):
        _check(i, kind, verdict)
    assert len({v.request_id for v in verdicts}) == n


# -- responses --------------------------------------------------------------------------------------

SQL_ERROR_PAGE = (
    b"<html><body>You have an error in your SQL syntax; check the manual that corresponds to your "
    b"MySQL server version for the right syntax to use near '1'' at line 1</body></html>"
)
HTML = (("content-type", "text/html; charset=utf-8"),)


async def test_response_inspection_blocks_a_data_leak(make_engine: EngineFactory) -> None:
    engine = make_engine(WafConfig(inspect_response=True))
    exchange = await engine.begin(get("/products?id=42"))
    assert exchange.open and exchange.verdict.action == "allow"
    verdict = await exchange.inspect_response(WafResponse(500, HTML, SQL_ERROR_PAGE))
    assert not exchange.open
    assert verdict.blocked and verdict.status == 403 and verdict.request_id == exchange.verdict.request_id
    assert any(rid // 1000 == 951 for rid in verdict.rule_ids), verdict.rule_ids
    assert verdict.anomaly_score is not None and verdict.anomaly_score >= 4
    with pytest.raises(RuntimeError, match="closed"):
        await exchange.inspect_response(WafResponse(200, HTML, b"again"))

    exchange = await engine.begin(get("/products?id=42"))
    clean = await exchange.inspect_response(WafResponse(200, HTML, b"<html><body>42 apples</body></html>"))
    assert clean.action == "allow" and clean.findings == () and clean.anomaly_score == 0


async def test_no_response_inspection_unless_configured(
    engine: WafEngine, make_engine: EngineFactory
) -> None:
    exchange = await engine.begin(get("/products?id=42"))
    assert not exchange.open and exchange.verdict.action == "allow"
    blocked = await make_engine(WafConfig(inspect_response=True)).begin(get(SQLI))
    assert blocked.verdict.blocked and not blocked.open  # a blocked request has no response to inspect


async def test_open_exchange_outlives_reload_and_close() -> None:
    engine = WafEngine(max_workers=1)
    await engine.reload(WafConfig(inspect_response=True))
    exchange = await engine.begin(get("/products?id=42"))
    rules = engine._active.rules
    assert rules is not None
    await engine.reload(WafConfig(mode=WafMode.DISABLED))
    await engine.aclose()
    # The replaced rule set and the library instance are freed only when the exchange ends.
    assert rules._ptr is not None and engine._modsec._ptr is not None
    verdict = exchange.inspect_response_sync(WafResponse(500, HTML, SQL_ERROR_PAGE))
    assert verdict.blocked and verdict.mode is WafMode.ENFORCE
    assert rules._ptr is None and engine._modsec._ptr is None
    await exchange.aclose()  # idempotent
