"""The ``waypoint`` process as the kubelet runs it: how it fails when it cannot start."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from mesh.pki import CertificateAuthority

TIMEOUT = 60


def test_no_certificate_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    """A CA that never answers: after --start-timeout the waypoint says why (the last CA error)
    and exits 1 for the kubelet to restart it, with no traceback."""
    ca = CertificateAuthority.generate()
    (tmp_path / "root.pem").write_text(ca.roots_pem)
    (tmp_path / "token").write_text("not-a-real-token")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "PATH": "/usr/bin:/bin",
        "CA_ROOT_CERT": str(tmp_path / "root.pem"),
        "TOKEN_FILE": str(tmp_path / "token"),
        "LOG_LEVEL": "info",
    }
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "waypoint"), "--gateway", "shop/waypoint", "--ca-address", f"127.0.0.1:{port}",
            "--hbone-port", "0", "--admin-port", "0", "--stats-port", "0", "--readiness-port", "0",
            "--start-timeout", "2",
        ],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "waypoint cannot start: the CA gave no certificate for its identity" in out
    assert "spiffe://cluster.local/ns/shop/sa/waypoint" in out
    assert "Traceback" not in out
