"""The two CNI plugin executables: cni/plugin.py (Python) and cni/plugin-go (the static Go binary).

:func:`go_build` builds the binary the way the Dockerfile does (``CGO_ENABLED=0``), offline: no
module dependencies, ``GOPROXY=off``, ``GOTOOLCHAIN=local``, caches under the given directory.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GO_SOURCE = REPO / "cni" / "plugin-go"


def go_build(out: Path, work: Path) -> None:
    """Build the plugin as the Dockerfile does; raises with go's output when it fails."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain: apt-get install -y golang-go (scripts/dev.sh installs it)")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(work),
        "GOCACHE": str(work / "cache"),
        "GOPATH": str(work / "gopath"),
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",
    }
    p = subprocess.run(
        [go, "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", str(out), "."],
        cwd=GO_SOURCE,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if p.returncode != 0:
        raise AssertionError(f"go build failed (exit {p.returncode}):\n{p.stdout}\n{p.stderr}")


@dataclass(frozen=True)
class PluginExe:
    """One way to run the plugin: ``argv`` plus the environment it needs on top of the CNI one."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    def install_as(self, path: Path) -> None:
        """Put the plugin at ``path`` as a runtime finds it: an executable named by ``type``."""
        if self.name == "go":
            shutil.copyfile(self.argv[0], path)
        else:
            assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
            command = " ".join(shlex.quote(a) for a in self.argv)
            path.write_text(f'#!/bin/sh\n{assigns} exec {command} "$@"\n', encoding="utf-8")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def python_plugin() -> PluginExe:
    return PluginExe("python", (sys.executable, "-m", "cni.plugin_main"), {"PYTHONPATH": str(REPO)})
