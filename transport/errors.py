"""Errors of the transport layer (moving blocks between peers).

Hierarchy (each subclasses the builtin a caller would already catch)::

    TransportError(OSError)
     ├── PeerUnavailable(ConnectionError)     refused, reset, closed, QP in error
     ├── TransportTimeout(TimeoutError)       no answer within the deadline
     ├── AuthenticationFailed(PermissionError) wrong or missing cluster secret
     ├── RdmaError                            a verbs call or completion failed
     │    └── RdmaUnavailable                 no device / no pyverbs / handshake refused
     └── TransportConfigError(ValueError)     bad addresses, secrets, settings
    ProtocolError(TransportError, ValueError) malformed or oversized frame
     └── FrameTooLarge                        a length field above its hard limit

Per-request problems (a block not found, a stale version, a busy or dead peer)
are *outcomes* (:class:`shoal.transport.base.Outcome`), not exceptions: a
fetch of many blocks never fails as a whole because one of them did.  The
exceptions above are for connection-level failures and for callers that
use the lower-level pieces directly.  Foreign errors (``socket``, pyverbs)
are translated once, where they are caught.
"""

from __future__ import annotations

__all__ = [
    "TransportError",
    "PeerUnavailable",
    "TransportTimeout",
    "AuthenticationFailed",
    "ProtocolError",
    "FrameTooLarge",
    "RdmaError",
    "RdmaUnavailable",
    "TransportConfigError",
]


class TransportError(OSError):
    """Base of every transport-layer error."""


class PeerUnavailable(TransportError, ConnectionError):
    """The peer cannot be reached, closed the connection, or its queue pair failed."""


class TransportTimeout(TransportError, TimeoutError):
    """The peer did not answer within the deadline."""


class AuthenticationFailed(TransportError, PermissionError):
    """Mutual authentication with the cluster secret failed (either side)."""


class ProtocolError(TransportError, ValueError):
    """A frame was malformed: bad magic, version, checksum, type or length."""


class FrameTooLarge(ProtocolError):
    """A length field exceeded its hard limit (the frame is refused unread)."""


class RdmaError(TransportError):
    """A verbs operation failed (post, completion with an error status, QP transition)."""


class RdmaUnavailable(RdmaError):
    """RDMA cannot be used here: no pyverbs, no device, or the handshake was refused."""


class TransportConfigError(TransportError, ValueError):
    """Invalid transport configuration (address, secret file, mode)."""
