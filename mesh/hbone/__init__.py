"""HBONE: mutual-TLS HTTP/2 CONNECT tunnels, the mesh's data-plane protocol (port 15008).

``protocol`` is the sans-IO core (bytes in, events out); ``aio`` runs it on asyncio sockets with a
server, a client connection pool and a flow-controlled relay.
"""

from mesh.hbone.events import (
    ConnectionTerminated,
    ConnectRequest,
    Data,
    Event,
    PingAcked,
    RequestRejected,
    Response,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from mesh.hbone.protocol import (
    ClientConnection,
    HboneConnection,
    LocalProtocolError,
    ProtocolError,
    ServerConnection,
    format_authority,
    parse_authority,
)

__all__ = [
    "ClientConnection",
    "ConnectRequest",
    "ConnectionTerminated",
    "Data",
    "Event",
    "HboneConnection",
    "LocalProtocolError",
    "PingAcked",
    "ProtocolError",
    "RequestRejected",
    "Response",
    "ServerConnection",
    "StreamEnded",
    "StreamReset",
    "WindowOpened",
    "format_authority",
    "parse_authority",
]
