"""``ambientctl waf test``: a request evaluated offline against a WafPolicy from a YAML file, with
the real engine and the Debian Core Rule Set (through ``ambientctl.main``, as a user runs it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import structlog

from ambientctl.main import main as ambientctl_main
from mesh import log as meshlog

POLICY = """\
apiVersion: extensions.ambient-mesh.io/v1alpha1
kind: WafPolicy
metadata: {name: reviews, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  mode: Enforce
"""
QUERY = "GET /query?sql=select name from users where id = 1"


def main(argv: list[str]) -> int:
    """``ambientctl`` in-process. ``main`` configures logging on the stderr of the moment
    (capsys's, closed after the test): put back what was there, so nothing logs to a closed file
    later (as tests/test_cli_policy.py does)."""
    config = structlog.get_config()
    handlers = logging.getLogger().handlers[:]
    level = meshlog._threshold
    try:
        return ambientctl_main(argv)
    finally:
        structlog.configure(**config)
        logging.getLogger().handlers[:] = handlers
        meshlog._threshold = level


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "waf.yaml"
    path.write_text(text)
    return str(path)


def test_a_block_lists_the_rules_and_the_exclusion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, POLICY)
    assert main(["waf", "test", "--config", config, "--request", QUERY]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[1] == (
        "GET /query?sql=select%20name%20from%20users%20where%20id%20=%201 -> BLOCK 403, anomaly score 5"
    )
    assert "\n    942100  SQL Injection Attack Detected via libinjection\n" in out
    assert "\n *  949110  Inbound Anomaly Score Exceeded (Total Score: 5)\n" in out
    assert out.splitlines()[-1] == "to exclude: ruleExclusions: [{id: 942100}]"
    # With the exclusion the same request passes.
    config = write(tmp_path, POLICY + "  ruleExclusions: [{id: 942100}]\n")
    assert main(["waf", "test", "-f", config, "-r", QUERY]) == 0
    assert "-> PASS (no rule matched), anomaly score 0" in capsys.readouterr().out


def test_json_headers_and_body(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, POLICY.replace("Enforce", "DetectOnly"))
    rc = main(
        ["waf", "test", "-f", config, "-r", "POST /api", "-H", "Content-Type: application/json",
         "--body", '{"q": "<script>alert(1)</script>"}', "-o", "json"]
    )  # fmt: skip
    assert rc == 0  # DetectOnly: passes
    doc = json.loads(capsys.readouterr().out)
    assert (doc["action"], doc["mode"], doc["status"], doc["body_inspected"]) == (
        "detect",
        "DetectOnly",
        None,
        True,
    )
    assert 941100 in [f["rule_id"] for f in doc["findings"]]
    assert "attack-xss" in doc["findings"][0]["tags"]
    # A form body (the default type) is inspected too.
    config = write(tmp_path, POLICY)
    assert main(["waf", "test", "-f", config, "-r", "POST /login", "-d", "user=admin&pass=' OR 1=1 --"]) == 1


def test_bad_input_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_rule = POLICY + '  extraRules: [\'SecRule ARGS "@rx x" "id:1000002,deny,nosuchaction"\']\n'
    assert main(["waf", "test", "-f", write(tmp_path, bad_rule), "-r", "GET /"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "ambientctl waf test: WafPolicy shop/reviews: ModSecurity refused the rules: Rules error."
    )
    assert "Expecting an action, got:  nosuchaction" in err
    assert (
        main(
            ["waf", "test", "-f", write(tmp_path, POLICY.replace("mode: Enforce", "mode: On")), "-r", "GET /"]
        )
        == 2
    )
    assert (
        "spec.mode: required: Enforce, DetectOnly or Disabled (YAML reads On/Off as booleans)"
        in capsys.readouterr().err
    )
    assert main(["waf", "test", "-f", write(tmp_path, POLICY), "-r", "/no-method"]) == 2
    assert '--request: expected "METHOD /path?query"' in capsys.readouterr().err
    two = POLICY + "---\n" + POLICY.replace("name: reviews, namespace", "name: other, namespace")
    assert main(["waf", "test", "-f", write(tmp_path, two), "-r", "GET /"]) == 2
    assert "need exactly one WafPolicy (found shop/other, shop/reviews)" in capsys.readouterr().err
    assert main(["waf", "test", "-f", write(tmp_path, two), "--policy", "other", "-r", "GET /"]) == 0
    assert main(["waf", "test", "-f", str(tmp_path / "missing.yaml"), "-r", "GET /"]) == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_the_docs_walkthrough_is_real(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/waf.md: each policy loads, and each ``$ ambientctl waf test`` prints what the page says
    (run against the policy shown last above it)."""
    import re
    import shlex

    from mesh.model.waf import WafPolicy
    from sources.local import parse_manifest

    doc = (Path(__file__).resolve().parents[2] / "docs" / "waf.md").read_text()
    policy: str | None = None
    ran = 0
    for lang, block in re.findall(r"```(\w+)\n(.*?)```", doc, re.S):
        if lang == "yaml":
            (p,) = parse_manifest(block)
            assert isinstance(p, WafPolicy)
            policy = write(tmp_path, block)
            continue
        if lang != "text" or not block.startswith("$ ambientctl waf test"):
            continue
        assert policy is not None
        for run in block.strip().split("\n\n"):
            command, _, expected = run.partition("\n")
            argv = shlex.split(command.removeprefix("$ ambientctl "))
            argv[argv.index("-f") + 1] = policy
            main(argv)
            assert capsys.readouterr().out == expected + "\n", command
            ran += 1
    assert ran == 4
