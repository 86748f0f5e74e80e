from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable[[], Any]]:
    """Tests run on uvloop, the loop every daemon uses in production."""
    return {"uvloop": uvloop.new_event_loop}
