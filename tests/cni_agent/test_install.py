"""Installing the CNI plugin into (temporary) host CNI directories."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cni import install

BRIDGE = {
    "cniVersion": "1.0.0",
    "name": "podnet",
    "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}
OTHER = {"cniVersion": "1.0.0", "name": "other", "plugins": [{"type": "loopback"}]}


@pytest.fixture
def dirs(tmp_path: Path) -> install.InstallConfig:
    conf = tmp_path / "net.d"
    conf.mkdir()
    (conf / "10-bridge.conflist").write_text(json.dumps(BRIDGE))
    (conf / "20-other.conflist").write_text(json.dumps(OTHER))
    (conf / "05-not-a-list.conf").write_text("{}")
    return install.InstallConfig(
        cni_bin_dir=str(tmp_path / "bin"), cni_conf_dir=str(conf), agent_socket="/run/x/agent.sock"
    )


def test_install_is_idempotent_and_uninstall_removes(dirs: install.InstallConfig) -> None:
    first = install.install(dirs)
    assert first.binary_changed and first.conflist_changed
    assert first.conflist.endswith("10-bridge.conflist")
    doc = json.loads(Path(first.conflist).read_text())
    assert doc["plugins"][:2] == BRIDGE["plugins"]
    assert doc["plugins"][2] == {"type": "ambient-cni-plugin", "agent_socket": "/run/x/agent.sock"}
    assert os.access(first.binary, os.X_OK)
    assert json.loads((Path(dirs.cni_conf_dir) / "20-other.conflist").read_text()) == OTHER
    assert not [p for p in os.listdir(dirs.cni_conf_dir) if p.endswith(".tmp")]
    stamps = (os.stat(first.binary).st_mtime_ns, os.stat(first.conflist).st_mtime_ns)

    again = install.install(dirs)
    assert not again.binary_changed and not again.conflist_changed
    assert (os.stat(first.binary).st_mtime_ns, os.stat(first.conflist).st_mtime_ns) == stamps
    assert len(json.loads(Path(first.conflist).read_text())["plugins"]) == 3

    # A new agent socket updates our entry in place (still one entry).
    moved = install.install(install.InstallConfig(dirs.cni_bin_dir, dirs.cni_conf_dir, "/run/y.sock"))
    assert moved.conflist_changed and not moved.binary_changed
    plugins = json.loads(Path(first.conflist).read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["bridge", "portmap", "ambient-cni-plugin"]
    assert plugins[2]["agent_socket"] == "/run/y.sock"

    gone = install.uninstall(dirs)
    assert gone.binary_changed and gone.conflist_changed
    assert json.loads(Path(first.conflist).read_text()) == BRIDGE
    assert not os.path.exists(first.binary)
    again_gone = install.uninstall(dirs)
    assert not again_gone.binary_changed and not again_gone.conflist_changed


def test_wrapper_runs_the_plugin(dirs: install.InstallConfig) -> None:
    result = install.install(dirs)
    p = subprocess.run(
        [result.binary],
        input=b'{"cniVersion": "1.0.0"}',
        env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=30,
        cwd="/",
    )
    assert p.returncode == 0, p.stderr
    assert "1.0.0" in json.loads(p.stdout)["supportedVersions"]


def test_no_conflist_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "net.d").mkdir()
    cfg = install.InstallConfig(str(tmp_path / "bin"), str(tmp_path / "net.d"))
    with pytest.raises(install.InstallError, match="no .conflist"):
        install.install(cfg)


def test_broken_conflist_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "10-x.conflist").write_text("{not json")
    cfg = install.InstallConfig(str(tmp_path / "bin"), str(tmp_path / "net.d"))
    with pytest.raises(install.InstallError, match="not JSON"):
        install.install(cfg)
