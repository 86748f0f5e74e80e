"""The Core Rule Set's own regression cases (a vendored sample, ``crs_regression/``), as requests.

A case with ``log_contains: id "N"`` is an attack rule N must catch: at paranoia level 1 in
Enforce, the waypoint blocks it. A case with ``no_log_contains`` whose title is not marked ``FN``
(a known false negative: an attack the rule misses on purpose) is a benign request: it passes.
Cases given as raw or encoded bytes (``raw_request``, ``encoded_request``) test HTTP parsing the
waypoint's own parser does first, and are not used; nor are the ones in :data:`SKIPPED` (why is
said there). A case with data but no Content-Type is sent as a form
(``application/x-www-form-urlencoded``): its expectation (the rule matches an argument of the
body) assumes the body is parsed as one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DIR = Path(__file__).with_name("crs_regression")
_ID = re.compile(r'(?:id ")?(\d{6})"?')

# title -> why it is not sent through the waypoint
SKIPPED: dict[str, str] = {}


@dataclass(frozen=True)
class Case:
    title: str
    rule_id: int
    attack: bool  # True: the rule must match (blocked at PL1); False: benign, passes
    method: str
    uri: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


def _case(title: str, stage: dict[str, Any]) -> Case | None:
    inp, out = stage["input"], stage["output"]
    if "raw_request" in inp or "encoded_request" in inp:
        return None
    if "log_contains" in out:
        attack, expect = True, out["log_contains"]
    elif "no_log_contains" in out and "FN" not in title:
        attack, expect = False, out["no_log_contains"]
    else:
        return None
    m = _ID.search(str(expect))
    if m is None:
        return None
    data = inp.get("data", "")
    if isinstance(data, list):
        data = "\r\n".join(data)
    headers = tuple((str(k), _wire(str(v))) for k, v in (inp.get("headers") or {}).items())
    if data and not any(k.lower() == "content-type" for k, _ in headers):
        headers += (("Content-Type", "application/x-www-form-urlencoded"),)
    return Case(
        title=title,
        rule_id=int(m.group(1)),
        attack=attack,
        method=str(inp.get("method", "GET")),
        uri=_wire(str(inp.get("uri", "/"))),
        headers=headers,
        body=str(data).encode("utf-8"),
    )


def _wire(text: str) -> str:
    """Text as its UTF-8 bytes read as latin-1: what a byte-preserving HTTP parser hands on."""
    return text.encode("utf-8").decode("latin-1")


def load() -> list[Case]:
    cases: list[Case] = []
    for path in sorted(DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for test in (doc or {}).get("tests", []):
                for st in test.get("stages", []):
                    case = _case(str(test["test_title"]), st["stage"])
                    if case is not None and case.title not in SKIPPED:
                        cases.append(case)
    return cases
