from __future__ import annotations

import pytest

from mesh.model import Store
from tests.controlplane.meshdata import load, manifest


@pytest.fixture
def store() -> Store:
    s = Store()
    load(s, manifest())
    return s
