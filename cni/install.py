"""Installing the chained CNI plugin into the host's CNI directories (and removing it again).

Two things go in, both idempotent (installing twice changes nothing, not even mtimes):

* ``<cni-bin-dir>/ambient-cni-plugin`` (the runtime looks plugins up by ``type`` in its bin dir):
  a copy of the static Go plugin (``cni/plugin-go``, built into the image at
  :data:`DEFAULT_PLUGIN_BINARY`), which runs on the node with nothing but the agent's socket. Where
  there is no such binary (local mode, a development checkout) it is a two-line shell wrapper that
  execs this venv's Python on ``cni.plugin_main`` instead: that only works where this Python
  exists, i.e. on the machine the agent runs on, not from inside a container;
* our entry ``{"type": "ambient-cni-plugin", "agent_socket": ...}`` appended to the ``plugins``
  of the primary ``.conflist`` — the lexicographically first one, which is the one the runtime
  uses — rewritten atomically (temp file in the same directory, then rename), so the runtime never
  reads half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cni.plugin import DEFAULT_AGENT_SOCKET

log = structlog.get_logger(__name__)

PLUGIN_TYPE = "ambient-cni-plugin"
DEFAULT_CNI_BIN_DIR = "/opt/cni/bin"
DEFAULT_CNI_CONF_DIR = "/etc/cni/net.d"
# Where the Dockerfile puts the static plugin binary (outside the venv: it is not Python's).
DEFAULT_PLUGIN_BINARY = "/usr/local/lib/ambient-mesh/ambient-cni-plugin"


class InstallError(RuntimeError):
    """The CNI directories are not in a state we can install into; the message says why."""


@dataclass(frozen=True, slots=True)
class InstallConfig:
    """``plugin_binary``: the static plugin to copy into ``cni_bin_dir``. ``None`` (the default)
    copies :data:`DEFAULT_PLUGIN_BINARY` when it exists and falls back to the Python wrapper
    otherwise; an explicit path must exist (the cni chart passes one, so an image without the
    binary fails at start instead of installing a plugin the node cannot run)."""

    cni_bin_dir: str = DEFAULT_CNI_BIN_DIR
    cni_conf_dir: str = DEFAULT_CNI_CONF_DIR
    agent_socket: str = DEFAULT_AGENT_SOCKET
    python: str = sys.executable
    plugin_binary: str | None = None


@dataclass(frozen=True, slots=True)
class InstallResult:
    binary: str
    conflist: str
    binary_changed: bool
    conflist_changed: bool


def wrapper_script(python: str) -> str:
    return f'#!/bin/sh\nexec {shlex.quote(python)} -m cni.plugin_main "$@"\n'


def plugin_entry(agent_socket: str) -> dict[str, Any]:
    return {"type": PLUGIN_TYPE, "agent_socket": agent_socket}


def primary_conflist(conf_dir: str) -> Path:
    paths = sorted(p for p in Path(conf_dir).glob("*.conflist") if p.is_file())
    if not paths:
        raise InstallError(f"no .conflist in {conf_dir}: the primary CNI plugin is not installed yet")
    return paths[0]


def plugin_executable(config: InstallConfig) -> bytes:
    """The bytes to install as the plugin: the static binary, or else the Python wrapper."""
    path = DEFAULT_PLUGIN_BINARY if config.plugin_binary is None else config.plugin_binary
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        if config.plugin_binary is not None:
            raise InstallError(f"plugin binary {path} does not exist") from None
    except OSError as e:
        raise InstallError(f"cannot read plugin binary {path}: {e}") from None
    log.warning(
        "no static CNI plugin binary; installing the Python wrapper (it runs only where this "
        "Python is: local mode and tests, not a Kubernetes node)",
        binary=path,
        python=config.python,
    )
    return wrapper_script(config.python).encode()


def _write_atomic(path: Path, data: str | bytes, mode: int) -> None:
    """Write a temp file in the same directory, then rename it over ``path``: a reader (the
    runtime exec'ing the plugin, reading the conflist) sees the old or the new file, never half
    of one, and replacing a binary that is running does not fail with ``ETXTBSY``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_conflist(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise InstallError(f"{path} is not JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("plugins"), list):
        raise InstallError(f"{path} has no 'plugins' list")
    return doc


def _without_ours(plugins: list[Any]) -> list[Any]:
    return [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]


def install(config: InstallConfig) -> InstallResult:
    """Install (or update) the plugin and the conflist entry; unchanged parts are not rewritten."""
    bin_path = Path(config.cni_bin_dir) / PLUGIN_TYPE
    wanted_bin = plugin_executable(config)
    bin_changed = False
    try:
        current = bin_path.read_bytes()
    except FileNotFoundError:
        current = None
    if current != wanted_bin or not os.access(bin_path, os.X_OK):
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(bin_path, wanted_bin, 0o755)
        bin_changed = True

    conf = primary_conflist(config.cni_conf_dir)
    doc = _read_conflist(conf)
    plugins = doc["plugins"]
    wanted = [*_without_ours(plugins), plugin_entry(config.agent_socket)]
    conf_changed = plugins != wanted
    if conf_changed:
        doc["plugins"] = wanted
        _write_atomic(conf, json.dumps(doc, indent=2) + "\n", conf.stat().st_mode & 0o7777)
    log.info(
        "cni plugin installed",
        binary=str(bin_path),
        conflist=str(conf),
        binary_changed=bin_changed,
        conflist_changed=conf_changed,
    )
    return InstallResult(str(bin_path), str(conf), bin_changed, conf_changed)


def uninstall(config: InstallConfig) -> InstallResult:
    """Remove our conflist entry (from every .conflist) and the plugin; absent parts are fine."""
    bin_path = Path(config.cni_bin_dir) / PLUGIN_TYPE
    bin_changed = False
    with contextlib.suppress(FileNotFoundError):
        bin_path.unlink()
        bin_changed = True
    conf_changed = False
    first = ""
    for conf in sorted(Path(config.cni_conf_dir).glob("*.conflist")):
        first = first or str(conf)
        try:
            doc = _read_conflist(conf)
        except InstallError as e:
            log.warning("conflist skipped", error=str(e))
            continue
        kept = _without_ours(doc["plugins"])
        if kept != doc["plugins"]:
            doc["plugins"] = kept
            _write_atomic(conf, json.dumps(doc, indent=2) + "\n", conf.stat().st_mode & 0o7777)
            conf_changed = True
            first = str(conf)
    log.info(
        "cni plugin uninstalled",
        binary=str(bin_path),
        binary_changed=bin_changed,
        conflist_changed=conf_changed,
    )
    return InstallResult(str(bin_path), first, bin_changed, conf_changed)
