"""The checked-in stubs must be exactly what scripts/gen_protos.sh makes from the .proto files.

A stale stub is a silent wire bug (a renumbered field still "works" locally), so the test
regenerates into a scratch directory and compares bytes. The output depends on the installed
grpcio-tools version; when this fails after an upgrade, rerun the script and commit the diff.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "mesh" / "proto"
SCRIPT = ROOT / "scripts" / "gen_protos.sh"


def _generated(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and "_pb2" in p.name and p.suffix in (".py", ".pyi")
    }


@pytest.mark.skipif(shutil.which("bash") is None, reason="the generator is a bash script")
def test_checked_in_stubs_match_the_generator(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    fresh = _generated(tmp_path / "mesh" / "proto")
    checked_in = _generated(PROTO_DIR)
    assert fresh, "the generator produced nothing"
    assert sorted(checked_in) == sorted(fresh), "stub files differ: run scripts/gen_protos.sh"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale stubs {stale}: run `bash scripts/gen_protos.sh`"


def test_every_proto_has_a_stub() -> None:
    for proto in PROTO_DIR.glob("*.proto"):
        assert (PROTO_DIR / f"{proto.stem}_pb2.py").is_file(), proto.name
        assert (PROTO_DIR / f"{proto.stem}_pb2.pyi").is_file(), proto.name
