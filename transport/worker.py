"""``shoal worker``: a standalone process that serves its SSD cache to peers.

    shoal worker --listen HOST:PORT [--cache-dir DIR] [--secret-file F] [--peers H:P,H:P]

The cache directory comes from ``--cache-dir`` or ``SHOAL_CACHE_DIR``; the
cluster secret from ``--secret-file`` or ``SHOAL_CLUSTER_SECRET_FILE`` (never
from a command-line value); the peers from ``--peers`` or ``SHOAL_PEERS``;
the object store from the usual AWS variables (``AWS_ENDPOINT_URL_S3``...).

A request for a block the worker does not have, that says where the block
comes from, is filled from the object store into the worker's cache and
then served (the worker is that block's owner): concurrent requests for one
block wait for one store read.  A ranged request (a slice of a block, e.g.
one Parquet column chunk) is filled as exactly that slice and kept as a
piece of the block, as a local reader keeps the pieces it reads.  The
worker never forwards a request to another peer, so requests cannot loop.

This module imports the cache layer (it is an entry point, like the CLI);
the rest of :mod:`shoal.transport` does not.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any, Sequence

from .base import BlockRequest, PeerAddress, ServedBlock, load_secret, transport_mode
from .errors import TransportConfigError, TransportError
from .membership import Membership, is_local_address
from .protocol import Status
from .providers import CacheProvider
from .server import BlockServer, ServerConfig

if TYPE_CHECKING:
    from shoal.cache import BlockCache, BlockReader, CacheConfig, StoreConfig
    from shoal.cache.source import ObjectSource

__all__ = ["Worker", "StoreFiller", "main", "build_parser"]

logger = logging.getLogger(__name__)

#: Object stores an owner fills from on a miss (object stores only: never local files).
_FILL_PROTOCOLS = ("s3", "s3a")


class StoreFiller:
    """Reads a block an owner misses from the object store, through a
    :class:`~shoal.cache.reader.BlockReader` on the worker's cache (which stores
    it, and makes concurrent requests for one block share one GET)."""

    def __init__(self, cache: "BlockCache", cache_config: "CacheConfig", store: "StoreConfig",
                 *, max_block: int) -> None:
        self.cache = cache
        self.cache_config = cache_config
        self.store = store
        self.max_block = max_block
        self._readers: dict[int, BlockReader] = {}
        self._sources: dict[str, ObjectSource] = {}
        self._lock = threading.Lock()

    def _reader(self, block_size: int) -> "BlockReader":
        from shoal.cache import BlockReader

        with self._lock:
            reader = self._readers.get(block_size)
            if reader is None:
                config = self.cache_config.replace(block_size=block_size, readahead_blocks=0,
                                                   cache_local_files=True, max_request_size=block_size)
                reader = self._readers[block_size] = BlockReader(config, cache=self.cache)
            return reader

    def _source(self, protocol: str) -> "ObjectSource":
        from shoal.cache import open_source

        protocol = "s3" if protocol == "s3a" else protocol
        with self._lock:
            if protocol not in self._sources:
                self._sources[protocol] = open_source(protocol, self.store)
            return self._sources[protocol]

    def __call__(self, request: BlockRequest) -> ServedBlock | None:
        from shoal.cache import ObjectChangedError, ObjectNotFoundError, ObjectVersion, StorageError
        from shoal.cache.source import split_url

        origin = request.origin
        if origin is None:
            return None
        bs = origin.block_size
        if bs < 4096 or bs & (bs - 1) or bs > self.max_block:
            return ServedBlock(Status.REJECTED, detail=f"unsupported block size {bs}")
        protocol = split_url(origin.url)[0]
        if protocol not in _FILL_PROTOCOLS:
            # Never local paths: a peer must not be able to read the worker's own files.
            return ServedBlock(Status.NOT_FOUND, detail=f"{protocol} objects are not shared between peers")
        try:
            source = self._source(protocol)
        except (StorageError, ValueError, ImportError) as exc:
            return ServedBlock(Status.NOT_FOUND, detail=f"cannot open {protocol}: {type(exc).__name__}")
        if source.store_id != origin.store_id:
            return ServedBlock(Status.NOT_FOUND, detail="this worker reads another object store")
        version = ObjectVersion(url=origin.url, size=origin.size, etag=origin.etag,
                                version_id=origin.version_id, mtime=origin.mtime)
        if version.token != request.token:
            return ServedBlock(Status.REJECTED, detail="version token does not match the origin")
        reader = self._reader(bs)
        if f"{reader.object_key(source, version)}:{origin.index}" != request.key:
            return ServedBlock(Status.REJECTED, detail="key does not match the origin")
        start = origin.index * bs
        end = min(start + bs, origin.size)
        if end - start != (request.block_length if request.ranged else request.length):
            return ServedBlock(Status.REJECTED, detail="length does not match the origin")
        if request.ranged:  # the slice only (kept as a piece of the block)
            start, end = start + request.offset, start + request.offset + request.length
        try:
            data = reader.read(source, version, start, end)
        except ObjectChangedError:
            return ServedBlock(Status.STALE, detail="object changed in the store")
        except ObjectNotFoundError:
            return ServedBlock(Status.STALE, detail="object no longer in the store")
        except StorageError as exc:
            logger.warning("filling %s from the store failed: %s", origin.url, exc)
            return ServedBlock(Status.UNAVAILABLE, detail=type(exc).__name__)
        return ServedBlock(Status.FILLED, token=request.token, data=data)

    def store_stats(self) -> dict[str, Any]:
        with self._lock:
            sources = dict(self._sources)
        return {name: {"requests": getattr(s, "requests", 0), "bytes": getattr(s, "bytes_fetched", 0)}
                for name, s in sources.items()}

    def close(self) -> None:
        with self._lock:
            readers = list(self._readers.values())
            self._readers.clear()
        for reader in readers:
            reader.close()


class _WorkerProvider(CacheProvider):
    def __init__(self, worker: "Worker") -> None:
        super().__init__(worker.cache, worker.filler)
        self.worker = worker

    def stats(self) -> dict[str, Any]:
        data = super().stats()
        data["store"] = self.worker.filler.store_stats()
        data["membership"] = self.worker.membership.snapshot()
        return data


class Worker:
    """A block server over one cache directory, filling misses from the store."""

    def __init__(self, *, listen: PeerAddress | str, secret: bytes, cache: "CacheConfig | None" = None,
                 store: "StoreConfig | None" = None, peers: Sequence[str] = (), mode: str = "auto",
                 max_block: int = 16 << 20, rdma_device: str | None = None) -> None:
        from shoal.cache import BlockCache, CacheConfig, StoreConfig

        self.listen = PeerAddress.parse(listen)
        self.cache_config = cache or CacheConfig.from_env()
        self.cache = BlockCache(self.cache_config)
        if not self.cache.available:
            raise TransportConfigError(f"cannot use the cache directory {self.cache_config.directory}")
        self.filler = StoreFiller(self.cache, self.cache_config, store or StoreConfig.from_env(),
                                  max_block=max_block)
        self.membership = Membership(peers, self_address=self.listen)
        rdma = self._rdma_server(transport_mode(mode), rdma_device, max_block)
        config = ServerConfig(max_block=max_block, node=f"{socket.gethostname()}:{self.listen.port}")
        self.server = BlockServer(_WorkerProvider(self), secret, self.listen.host, self.listen.port,
                                  config=config, rdma=rdma)

    @staticmethod
    def _rdma_server(mode: str, device: str | None, max_block: int) -> Any:
        if mode == "tcp":
            return None
        from .rdma.transport import RdmaServer, detect_backend

        backend = detect_backend(device)
        if backend is None:
            if mode == "rdma":
                raise TransportConfigError("--transport rdma, but no RDMA device is usable here")
            logger.info("no RDMA device: serving over TCP only")
            return None
        return RdmaServer(backend, device=device, max_block=min(max_block, 4 << 20))

    def start(self) -> PeerAddress:
        address = self.server.start()
        if self.listen.port == 0:  # tell the membership which port we really got
            self.membership.self_address = PeerAddress(self.listen.host, address.port)
        if self.membership.peers and self.membership.self_address not in self.membership.peers:
            same_port = [p for p in self.membership.peers if p.port == address.port and is_local_address(p)]
            if same_port:
                self.membership.self_address = same_port[0]
            else:
                logger.warning("this worker (%s) is not in the peer list %s", address,
                               ", ".join(map(str, self.membership.peers)))
        return address

    def close(self) -> None:
        self.server.close()
        self.filler.close()
        self.cache.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal worker", description="Serve this machine's block cache to peers.")
    parser.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on (port 0: any)")
    parser.add_argument("--cache-dir", help="cache directory (default: SHOAL_CACHE_DIR or ~/.cache/shoal)")
    parser.add_argument("--cache-size", help="cache size limit, e.g. 20GB (default: SHOAL_CACHE_SIZE)")
    parser.add_argument("--secret-file", help="cluster secret file (default: SHOAL_CLUSTER_SECRET_FILE)")
    parser.add_argument("--peers", help="all workers, HOST:PORT,HOST:PORT (default: SHOAL_PEERS)")
    parser.add_argument("--transport", choices=("auto", "tcp", "rdma"), help="default: SHOAL_TRANSPORT or auto")
    parser.add_argument("--max-block", type=int, default=16 << 20, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default=os.environ.get("SHOAL_LOG_LEVEL", "INFO"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a worker until SIGTERM/SIGINT; returns the process exit status."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shoal.cache import CacheConfig, StorageError

    try:
        secret = load_secret(args.secret_file)
        listen = PeerAddress.parse(args.listen)
        peers = [str(p) for p in PeerAddress.parse_list(args.peers or os.environ.get("SHOAL_PEERS"))]
        cache = CacheConfig.from_env(directory=args.cache_dir, size_limit=args.cache_size)
        worker = Worker(listen=listen, secret=secret, cache=cache, peers=peers,
                        mode=transport_mode(args.transport), max_block=args.max_block)
        address = worker.start()
    except (TransportConfigError, StorageError, ValueError) as exc:
        print(f"shoal worker: error: {exc}", file=sys.stderr)
        return 2
    except (TransportError, OSError) as exc:
        print(f"shoal worker: error: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    print(f"shoal worker listening on {address} (cache {cache.directory})", flush=True)
    try:
        while not stop.wait(1.0):
            worker.cache.flush_stats()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        worker.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
