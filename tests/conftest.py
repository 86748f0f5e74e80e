from __future__ import annotations

import os
from collections.abc import Callable, Generator, Mapping
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, settings

# CI runs on a loaded 2-core machine: no per-example deadline, and slow input generation is
# not a failure. Every test run uses this profile (developers' machines are loaded too when
# the netns tests run beside them); a test may still lower max_examples for itself.
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable[[], Any]]:
    """Tests run on uvloop, the loop every daemon uses in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """In CI (root, every tool installed) nothing may skip: a skip there hides a broken setup.

    A developer without root still gets the netns tests skipped with the reason; CI turns the
    same skip into a failure naming it.
    """
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {report.longrepr}"
