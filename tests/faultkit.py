"""Helpers shared by the fault and peer tests (imported like ``s3servers``: tests/ is on sys.path)."""

from __future__ import annotations

import random
import threading
from typing import Any, Callable, TypeVar

import pytest

__all__ = ["put", "within"]

T = TypeVar("T")


def within(seconds: float, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on a thread; fail (instead of hanging) if it is still running after ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"within-{getattr(fn, '__name__', 'call')}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} hung: still running after {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def put(client: Any, bucket: str, key: str, size: int, seed: int) -> tuple[str, bytes]:
    """Store ``size`` seeded random bytes at ``s3://bucket/key``; returns the URL and the bytes."""
    data = random.Random(seed).randbytes(size)
    client.put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}", data
