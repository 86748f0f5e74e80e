"""docs/writing-policies.md says what ``ambientctl policy check`` answers: run every example.

The page's conventions, which this test enforces:

- the ```yaml block after ``<!-- policy-check: mesh -->`` is the example mesh (``mesh.yaml``);
- every other ```yaml block is an example: the mesh plus that block;
- each ```console block checks the example before it (or the bare mesh before the first
  example): every ``$ ambientctl policy check ...`` line is run with ``mesh.yaml`` holding that
  file, and the lines after it are the expected output: the first (``ALLOW``/``DENY``) exactly,
  the others in order among the output's lines (``...`` marks lines left out);
- every example is checked at least once, and a console block holds only such checks.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.test_cli_policy import call_main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "writing-policies.md"
_FENCE = re.compile(
    r"(?:<!--\s*policy-check:\s*(?P<marker>[\w-]+)\s*-->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S
)


@dataclass
class Check:
    command: list[str]
    expected: list[str]
    line: int


@dataclass
class Example:
    yaml: str
    line: int
    checks: list[Check] = field(default_factory=list)


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def parse_page(text: str) -> tuple[str, list[Example]]:
    mesh: str | None = None
    examples: list[Example] = []
    current: Example | None = None
    for m in _FENCE.finditer(text):
        lang, body, line = m["lang"], m["body"], _line_of(text, m.start("body"))
        if lang == "yaml":
            if m["marker"] == "mesh":
                assert mesh is None, f"line {line}: a second example mesh"
                mesh = body
                current = Example("", line)
            else:
                assert m["marker"] is None, f"line {line}: unknown marker {m['marker']!r}"
                current = Example(body, line)
            examples.append(current)
        elif lang == "console":
            assert current is not None, f"line {line}: a console block before the example mesh"
            check: Check | None = None
            for i, raw in enumerate(body.splitlines()):
                if raw.startswith("$ "):
                    argv = shlex.split(raw[2:])
                    assert argv[:3] == ["ambientctl", "policy", "check"], (
                        f"line {line + i}: not a policy check"
                    )
                    check = Check(argv[1:], [], line + i)
                    current.checks.append(check)
                else:
                    assert check is not None, f"line {line + i}: output before a command"
                    check.expected.append(raw.rstrip())
    assert mesh is not None, "the page has no <!-- policy-check: mesh --> block"
    return mesh, examples


MESH, EXAMPLES = parse_page(PAGE.read_text())


def test_every_example_is_checked() -> None:
    assert len(EXAMPLES) >= 12
    unchecked = [e.line for e in EXAMPLES if not e.checks]
    assert not unchecked, f"yaml blocks without an ambientctl policy check after them, at lines {unchecked}"
    for e in EXAMPLES:
        for c in e.checks:
            assert c.expected and c.expected[0] in ("ALLOW", "DENY"), f"line {c.line}: no ALLOW/DENY"
            assert c.command[c.command.index("--config") :][:2] == ["--config", "mesh.yaml"], c.line


def _subsequence(expected: list[str], actual: list[str]) -> str | None:
    """None when each expected line appears in ``actual`` in order; else the first missing one."""
    it = iter(actual)
    for want in expected:
        if want == "...":
            continue
        if not any(line.rstrip() == want for line in it):
            return want
    return None


CHECKS = [
    pytest.param(e, c, id=f"line-{c.line}") for e in EXAMPLES for c in e.checks
]  # fmt: skip


@pytest.mark.parametrize(("example", "check"), CHECKS)
def test_page_answers(
    example: Example, check: Check, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    (tmp_path / "mesh.yaml").write_text(MESH + ("---\n" + example.yaml if example.yaml else ""))
    monkeypatch.chdir(tmp_path)
    rc = call_main(check.command)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert rc in (0, 1), f"docs line {check.line}: {err}"
    assert lines[0] == check.expected[0], f"docs line {check.line}:\n{out}"
    assert rc == (0 if lines[0] == "ALLOW" else 1)
    missing = _subsequence(check.expected[1:], lines[1:])
    assert missing is None, f"docs line {check.line}: {missing!r} is not in the answer (in order):\n{out}"
