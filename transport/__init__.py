"""shoal.transport: moving cache blocks between peers (TCP, RDMA) and the peer cache tier.

* :class:`BlockTransport` (``fetch(peer, requests, buffers, timeout) -> [Outcome]``)
  with :class:`TcpTransport` and :class:`~shoal.transport.rdma.RdmaTransport`;
  :class:`BlockServer` serves a :class:`BlockProvider` (e.g. a worker's cache).
* :class:`PeerTier` is the tier a :class:`shoal.cache.BlockReader` consults
  between its SSD cache and the store (``BlockReader(config, peers=PeerTier.from_env())``).
* :func:`shoal.transport.worker.main` is ``shoal worker``.
"""

from .base import (
    BlockProvider,
    BlockRequest,
    BlockTransport,
    Origin,
    Outcome,
    PeerAddress,
    ServedBlock,
    TransportMetrics,
    load_secret,
    make_transport,
    transport_mode,
    transport_names,
)
from .errors import (
    AuthenticationFailed,
    FrameTooLarge,
    PeerUnavailable,
    ProtocolError,
    RdmaError,
    RdmaUnavailable,
    TransportConfigError,
    TransportError,
    TransportTimeout,
)
from .membership import Membership
from .peercache import PeerConfig, PeerMetrics, PeerTier
from .providers import CacheProvider, MemoryProvider
from .server import BlockServer, ServerConfig
from .tcp import ClientConfig, TcpTransport

__all__ = [
    "AuthenticationFailed",
    "BlockProvider",
    "BlockRequest",
    "BlockServer",
    "BlockTransport",
    "CacheProvider",
    "ClientConfig",
    "FrameTooLarge",
    "Membership",
    "MemoryProvider",
    "Origin",
    "Outcome",
    "PeerAddress",
    "PeerConfig",
    "PeerMetrics",
    "PeerTier",
    "PeerUnavailable",
    "ProtocolError",
    "RdmaError",
    "RdmaUnavailable",
    "ServedBlock",
    "ServerConfig",
    "TcpTransport",
    "TransportConfigError",
    "TransportError",
    "TransportMetrics",
    "TransportTimeout",
    "load_secret",
    "make_transport",
    "transport_mode",
    "transport_names",
]
