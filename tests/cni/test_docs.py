"""docs/cni.md shows the exact ruleset and version list the code uses."""

from __future__ import annotations

from pathlib import Path

from cni import plugin, rules

DOC = Path(__file__).resolve().parents[2] / "docs" / "cni.md"


def test_doc_shows_the_ruleset() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert rules.replace_script() in text
    assert "    udp dport 53 redirect to :15053\n    tcp dport 53 redirect to :15053\n" in text
    assert ", ".join(plugin.SUPPORTED_VERSIONS) in text
