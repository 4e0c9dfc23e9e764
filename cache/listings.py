"""Remembered listings: the JSON of an earlier LIST of a table, one file each.

Files of their own (``<cache dir>/listings/<hash>.json``), not diskcache
entries: a warm query reads one per table before anything else, and a file
read costs far less than a SQLite lookup on a fresh connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

__all__ = ["ListingFiles"]

logger = logging.getLogger(__name__)


class ListingFiles:
    """Listings by key in one directory; writes are atomic (readers see the old
    listing or the new one, whole), failures are logged, never raised."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        # Keys can come from peers: hashed, never used as a path themselves.
        name = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return self.directory / f"{name}.json"

    def get(self, key: str) -> list[dict[str, Any]] | None:
        try:
            return json.loads(self._path(key).read_bytes())
        except (OSError, ValueError):
            return None

    def put(self, key: str, entries: list[dict[str, Any]]) -> None:
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            path.parent.mkdir(exist_ok=True)
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, path)
        except OSError as exc:
            logger.debug("could not remember a listing: %s", exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
