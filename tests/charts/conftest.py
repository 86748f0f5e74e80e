from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.charts.helm import Helm, find_tool, prepare


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    binary = find_tool("helm")
    if binary is None:
        # Under CI the suite's conftest turns this skip into a failure.
        pytest.skip("helm is not installed: run `bash scripts/dev.sh test` (installs it into .venv/bin)")
    return prepare(binary, tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="session")
def base_crds(helm: Helm) -> dict[str, dict[str, Any]]:
    """The CRDs the base chart renders by default, by kind."""
    return {d["spec"]["names"]["kind"]: d for d in helm.template("base")}


def load(text: str) -> dict[str, Any]:
    obj = yaml.safe_load(text)
    assert isinstance(obj, dict)
    return obj
