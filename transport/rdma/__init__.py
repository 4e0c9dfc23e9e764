"""RDMA data path for the block transport (one-sided WRITE by the owner).

:mod:`.verbs` is the thin backend interface, :mod:`.fake` an in-process fake
of it (what CI runs), :mod:`.pyverbs_backend` the real one (needs an RDMA
device and ``python3-pyverbs``; never run in this project's CI), and
:mod:`.transport` the transport built on it.
"""

from .fake import FakeFabric, FakeVerbs
from .transport import RdmaClient, RdmaServer, RdmaTransport, detect_backend
from .verbs import Access, QPEndpoint, QPState, VerbsBackend, WCStatus

__all__ = [
    "Access",
    "FakeFabric",
    "FakeVerbs",
    "QPEndpoint",
    "QPState",
    "RdmaClient",
    "RdmaServer",
    "RdmaTransport",
    "VerbsBackend",
    "WCStatus",
    "detect_backend",
]
