"""gRPC channel options for a node's connections to its control plane (discovery and CA).

gRPC's own reconnect backoff (1 s, x1.6, up to 120 s) and its process-wide subchannel pool (a
new channel inherits the backoff of an earlier one to the same address) left a node waiting
about 20 s, and up to two minutes, after its control plane came back. A node keeps probing at
most every second instead: while the control plane is down that is one TCP connect (refused at
once on a local control plane) per channel per second, and the moment it listens again the
channel is READY within a second. Each channel keeps its own subchannel, so one client's
backoff never delays another's first attempt. (``grpc.min_reconnect_backoff_ms`` is left alone:
gRPC reads it as the shortest time a connect attempt is given, which a remote control plane
needs.) See ../shared/design/PROTOCOLS.md.
"""

from __future__ import annotations

from typing import Any

RECONNECT_INITIAL_MS = 100
RECONNECT_MAX_MS = 1000

CONTROL_PLANE_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
    ("grpc.use_local_subchannel_pool", 1),
)
