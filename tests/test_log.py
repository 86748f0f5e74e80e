"""mesh.log: JSON lines on stderr, a level that changes at run time, errors with tracebacks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    from pathlib import PurePosixPath

    import structlog
    from mesh import log as meshlog

    meshlog.configure("info", json=True)
    log = structlog.get_logger("t")
    log.debug("hidden at info")
    log.info("shown", n=1, path=PurePosixPath("/x"))
    meshlog.set_level("debug")
    log.debug("shown after set_level")
    meshlog.set_level("warning")
    log.info("hidden at warning")
    log.warning("a warning")
    bound = log.bind(peer="p1")
    bound.info("hidden bound info")
    bound.error("bound error")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    """
)


@pytest.fixture(scope="module")
def lines() -> list[dict[str, object]]:
    # In a subprocess: configuring structlog is process-wide and other tests capture logs.
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    assert proc.stdout == ""  # logs never go to stdout
    return [json.loads(line) for line in proc.stderr.splitlines()]


def test_level_filters_and_changes_at_run_time(lines: list[dict[str, object]]) -> None:
    assert [e["event"] for e in lines] == [
        "shown",
        "shown after set_level",
        "a warning",
        "bound error",
        "failed",
    ]


def test_lines_carry_level_timestamp_and_bound_values(lines: list[dict[str, object]]) -> None:
    first = lines[0]
    assert first["level"] == "info" and first["n"] == 1
    assert first["path"] == "PurePosixPath('/x')"  # what JSON cannot carry is logged as its repr
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(line["timestamp"])), line
    assert lines[3]["peer"] == "p1" and lines[3]["level"] == "error"


def test_exception_logs_the_traceback_at_error(lines: list[dict[str, object]]) -> None:
    failed = lines[-1]
    assert failed["level"] == "error"
    assert "ValueError: boom" in str(failed["exception"])


def test_unknown_level_is_refused() -> None:
    from mesh import log as meshlog

    with pytest.raises(ValueError, match="'loud' is not one of debug, info, warning, error"):
        meshlog.set_level("loud")
