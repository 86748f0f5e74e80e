from __future__ import annotations

from collections.abc import Iterator

import pytest

from mesh.model import Store
from tests.k8s.fakeapi import FakeApiServer


@pytest.fixture
def fake() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def store() -> Store:
    return Store()
