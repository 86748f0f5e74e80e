"""Writing files the way secrets and watched files need: atomically, with the mode set first."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` in one step, with ``mode`` set before any byte is written.

    A reader (a ztunnel re-reading its token, a process loading certificates) never sees a
    half-written file, and a secret is never briefly world-readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
