"""Parsing ``host:port`` arguments given by users, with errors that name the argument."""

from __future__ import annotations

from mesh.hbone.protocol import parse_authority


def parse_hostport(value: str, what: str = "address", *, listen: bool = False) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; ValueError says which argument is wrong and how.

    ``listen`` allows port 0 (let the kernel pick), which makes no sense as a destination.
    """
    if listen and value.endswith(":0"):
        host, _ = parse_hostport(value[:-2] + ":1", what)
        return host, 0
    try:
        return parse_authority(value)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
