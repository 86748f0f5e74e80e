"""Parsing ``host:port`` arguments given by users, with errors that name the argument, and the
client address a proxy passes on in ``forwarded: for=…``."""

from __future__ import annotations

import ipaddress
import re

from mesh.hbone.protocol import parse_authority

_FOR = re.compile(r'for="?\[?([0-9a-fA-F:.]+?)\]?(?::(\d+))?"?(?:;|,|$)')


def forwarded_for(header: str | None) -> tuple[str, int | None] | None:
    """(client IP, port or None) in ``forwarded: for="ip:port"`` (the first hop), or None."""
    if not header:
        return None
    m = _FOR.search(header)
    if m is None:
        return None
    try:
        ip = str(ipaddress.ip_address(m.group(1)))
    except ValueError:
        return None
    return ip, int(m.group(2)) if m.group(2) else None


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
