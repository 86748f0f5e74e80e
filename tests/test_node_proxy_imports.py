"""Node proxies (ztunnel, waypoint) do not load grpcio: their xDS and CA calls run on grpclib
(mesh/xds/channel.py), which saves each process about 13 MiB of RSS (docs/benchmarks.md). A
stray ``import grpc`` anywhere in their import graph would bring it back silently."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# What each process imports at start and in ``run`` (the clients are imported lazily there).
PROCESS_IMPORTS = {
    "ztunnel": ["ztunnel.main", "ztunnel.app", "mesh.caclient", "mesh.xds.client"],
    "waypoint": ["waypoint.main", "waypoint.app", "mesh.caclient", "mesh.xds.client"],
}


@pytest.mark.parametrize("process", sorted(PROCESS_IMPORTS))
def test_node_proxies_do_not_import_grpcio(process: str) -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {PROCESS_IMPORTS[process]!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'grpc_')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == [], f"{process} imports grpcio"
