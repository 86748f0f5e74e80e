"""HBONE: mutual-TLS HTTP/2 CONNECT tunnels, the mesh's data-plane protocol (port 15008).

``protocol`` is the sans-IO core (bytes in, events out). On asyncio: ``connection`` runs it on a
TLS transport, ``stream`` holds one tunnel's bytes each way, ``client`` dials (``open_connection``)
and ``pool`` shares client connections, ``server`` accepts (``HboneServer``), and ``relay`` joins a
stream to a TCP connection with backpressure both ways.
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
