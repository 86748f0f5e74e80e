"""Parse ModSecurity's text log messages into findings (pure: text in, values out).

A message looks like ``ModSecurity: Warning. Matched "..." [file "..."] [line "46"]
[id "942100"] [rev ""] [msg "SQL Injection Attack Detected via libinjection"] [data "..."]
[severity "2"] [ver "OWASP_CRS/3.3.4"] [tag "attack-sqli"] ... [unique_id "..."]``. Field values
are not escaped by ModSecurity, so a value ends at the first ``"]`` followed by `` [`` or the
end of the text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

_FIELD: Final = re.compile(r'\[(\w+) "(.*?)"\](?= \[|\s*$)', re.DOTALL)
_TOTAL_SCORE: Final = re.compile(r"Total Score: (\d+)")
_SCORE: Final = re.compile(r"score=(\d+)")


@dataclass(frozen=True)
class Finding:
    """One rule that matched, as ModSecurity reported it."""

    rule_id: int
    message: str
    data: str = ""
    severity: str = ""
    tags: tuple[str, ...] = ()
    disruptive: bool = False  # this rule's action blocked the request


def parse_message(text: str, *, disruptive: bool = False) -> Finding | None:
    """The finding in one log message, or None if it names no rule id."""
    rule_id: int | None = None
    msg = data = severity = ""
    tags: list[str] = []
    for name, value in _FIELD.findall(text):
        if name == "id" and rule_id is None:
            try:
                rule_id = int(value)
            except ValueError:
                return None
        elif name == "msg" and not msg:
            msg = value
        elif name == "data" and not data:
            data = value
        elif name == "severity" and not severity:
            severity = value
        elif name == "tag":
            tags.append(value)
    if rule_id is None:
        return None
    return Finding(rule_id, msg, data, severity, tuple(tags), disruptive)


def collect(
    messages: Iterable[str],
    intervention_log: str | None,
    *,
    score_rule_id: int,
    ignore_rule_ids: frozenset[int] = frozenset(),
) -> tuple[tuple[Finding, ...], int | None]:
    """Findings in log order (deduplicated by rule id and message) and the anomaly score.

    The score comes from our report rule ``score_rule_id`` (its data is ``score=N``; an
    unexpanded variable counts as 0), else from a blocking evaluation's "Total Score", else None:
    the phase that computes it did not run. Rules in ``ignore_rule_ids`` are not findings.
    """
    findings: list[Finding] = []
    seen: set[tuple[int, str]] = set()
    reported: int | None = None
    total: int | None = None
    texts: list[tuple[str, bool]] = [(m, False) for m in messages]
    if intervention_log:
        texts.append((intervention_log, True))
    for text, disruptive in texts:
        finding = parse_message(text, disruptive=disruptive)
        if finding is None:
            continue
        if finding.rule_id == score_rule_id:
            m = _SCORE.search(finding.data)
            reported = int(m.group(1)) if m else 0
            continue
        if finding.rule_id in ignore_rule_ids:
            continue
        m = _TOTAL_SCORE.search(finding.message)
        if m:
            total = int(m.group(1))
        key = (finding.rule_id, finding.message)
        if key in seen:
            if disruptive:  # the same match, now known to be the one that blocked
                findings = [
                    Finding(f.rule_id, f.message, f.data, f.severity, f.tags, True)
                    if (f.rule_id, f.message) == key
                    else f
                    for f in findings
                ]
            continue
        seen.add(key)
        findings.append(finding)
    return tuple(findings), reported if reported is not None else total
