"""Fixtures for the CNI plugin tests: both plugin executables.

The Python plugin and the static Go binary must keep one contract, so every test that runs "the
plugin" as a process takes ``plugin_exe`` and runs once per executable. The Go binary is built
once per session into a temp dir (tests/cni/pluginexe.py); without a Go toolchain those tests
skip, which CI (``CI=true``) turns into failures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cni.pluginexe import PluginExe, go_build, python_plugin


@pytest.fixture(scope="session")
def go_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("goplugin")
    out = work / "ambient-cni-plugin"
    go_build(out, work)
    return out


@pytest.fixture(params=["python", "go"])
def plugin_exe(request: pytest.FixtureRequest) -> PluginExe:
    if request.param == "python":
        return python_plugin()
    go: Path = request.getfixturevalue("go_plugin")
    return PluginExe("go", (str(go),))
