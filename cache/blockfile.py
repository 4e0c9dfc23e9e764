"""A cache block's file: its data, per-chunk checksums and a checksummed footer.

Written once (:class:`Sealed`, streamed into diskcache) and read
back verified: :class:`OpenBlock` keeps a block file open with its checksum
table verified once, and every read verifies the 64 KiB chunks it covers.
"""

from __future__ import annotations

import io
import os
import struct
import time
from typing import BinaryIO, Callable

import xxhash

from .twocore import FILL_STEP, SPLIT_MIN, ReadPlan, fresh_bytes, helper

__all__ = ["CHUNK", "Corrupt", "OpenBlock", "Sealed", "read_range", "trailer"]

# Stored block layout: data || one xxh3_64 per CHUNK of data || one xxh3_64
# per SPAN of data || footer.  Chunks let a read of a few hundred KiB verify
# (and read) only the chunks it covers instead of the whole block; spans let a
# large aligned read verify with one call per MiB instead of sixteen: each call
# releases the GIL only for its own hash, and sixteen short calls a MiB made
# two threads reading at once queue for the GIL (a warm 1 MiB-read scan on two
# threads: 0.68-0.77x a local file with chunk checks, 0.87-0.89x with spans).
# The footer carries its own checksum.
CHUNK = 64 << 10
SPAN = 1 << 20
# data length, chunk size, chunk count, time stored, span size, span count, xxh3 of the tables + header
_FOOTER = struct.Struct("<QIIdIIQ")
# Files written before spans: no span table, and this shorter footer.
_FOOTER_V1 = struct.Struct("<QIIdQ")


def _sums(view: memoryview, size: int) -> bytes:
    count = (len(view) + size - 1) // size
    return struct.pack(f"<{count}Q", *(xxhash.xxh3_64_intdigest(view[i * size : (i + 1) * size]) for i in range(count)))


def trailer(view: memoryview) -> bytes:
    """Per-chunk and per-span checksums and the footer that follow a block's data on disk."""
    sums, spans = _sums(view, CHUNK), _sums(view, SPAN)
    head = _FOOTER.pack(len(view), CHUNK, len(sums) // 8, time.time(), SPAN, len(spans) // 8, 0)[:-8]
    return b"".join((sums, spans, head, struct.pack("<Q", xxhash.xxh3_64_intdigest(sums + spans + head))))


class Sealed:
    """A block and its trailer as a file-like object for ``diskcache.set(read=True)``:
    the block file is written without first copying the block into one sealed
    buffer (a copy into fresh memory per block fetched, on the cold path)."""

    def __init__(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._parts = [view, memoryview(trailer(view))]

    def read(self, size: int = -1) -> memoryview:
        while self._parts and not len(self._parts[0]):
            self._parts.pop(0)
        if not self._parts:
            return memoryview(b"")
        head = self._parts[0]
        size = len(head) if size < 0 else size
        self._parts[0] = head[size:]
        return head[:size]


class Corrupt(Exception):
    pass


def _footer(total: int, read_at: Callable[[int, int], bytes]) -> tuple[int, int, float, bytes, int, bytes]:
    """Verified footer of a sealed block file of ``total`` bytes, read with
    ``read_at(size, offset)``: (data length, chunk size, time stored, raw
    per-chunk sums, span size, raw per-span sums; span size 0 and no sums for a
    file written before spans); raises :class:`Corrupt` for a short, truncated
    or altered file."""
    if total < _FOOTER_V1.size:
        raise Corrupt("too short")
    tail = read_at(_FOOTER.size, total - _FOOTER.size) if total >= _FOOTER.size else b""
    if tail:
        length, chunk, count, stored_at, span, spans, footer_sum = _FOOTER.unpack(tail)
        if (chunk and span and span % chunk == 0 and count == (length + chunk - 1) // chunk
                and spans == (length + span - 1) // span and total == length + 8 * (count + spans) + _FOOTER.size):
            tables = read_at(8 * (count + spans), length)
            if xxhash.xxh3_64_intdigest(tables + tail[:-8]) != footer_sum:
                raise Corrupt("bad checksum table")
            return length, chunk, stored_at, tables[: 8 * count], span, tables[8 * count :]
    length, chunk, count, stored_at, footer_sum = _FOOTER_V1.unpack(read_at(_FOOTER_V1.size, total - _FOOTER_V1.size))
    if chunk == 0 or count != (length + chunk - 1) // chunk or total != length + 8 * count + _FOOTER_V1.size:
        raise Corrupt("bad footer or truncated")
    sums = read_at(8 * count, length)
    head = _FOOTER_V1.pack(length, chunk, count, stored_at, 0)[: _FOOTER_V1.size - 8]
    if xxhash.xxh3_64_intdigest(sums + head) != footer_sum:
        raise Corrupt("bad checksum table")
    return length, chunk, stored_at, sums, 0, b""


def _check_chunks(raw: memoryview, chunk: int, sums: bytes, first: int, last: int) -> None:
    """Raise :class:`Corrupt` unless ``raw`` (chunks ``first`` to ``last`` of a block,
    the last one possibly short) matches their stored sums."""
    count = last + 1 - first
    expected = struct.unpack_from(f"<{count}Q", sums, 8 * first)
    for n in range(count):
        if xxhash.xxh3_64_intdigest(raw[n * chunk : (n + 1) * chunk]) != expected[n]:
            raise Corrupt(f"chunk {first + n} checksum mismatch")


def _check(raw: memoryview, base: int, length: int, chunk: int, sums: bytes, span: int, spans: bytes) -> None:
    """Raise :class:`Corrupt` unless ``raw``, the block's bytes from chunk-aligned
    ``base`` to a chunk boundary or the block's end, matches the stored sums:
    a whole span it covers by one span sum, the rest chunk by chunk (a span
    that fails is checked chunk by chunk, to name the bad chunk)."""
    end = base + len(raw)
    at = base
    while at < end:
        if span and at % span == 0:
            stop = min(at + span, length)
            if stop <= end:
                if xxhash.xxh3_64_intdigest(raw[at - base : stop - base]) != struct.unpack_from("<Q", spans, 8 * (at // span))[0]:
                    _check_chunks(raw[at - base : stop - base], chunk, sums, at // chunk, (stop - 1) // chunk)
                    raise Corrupt(f"span {at // span} checksum mismatch")
                at = stop
                continue
        stop = min(end, (at // span + 1) * span) if span else end
        _check_chunks(raw[at - base : stop - base], chunk, sums, at // chunk, (stop - 1) // chunk)
        at = stop


def _read_at(handle: BinaryIO) -> Callable[[int, int], bytes]:
    def read_at(size: int, offset: int) -> bytes:
        handle.seek(offset)
        return handle.read(size)

    return read_at


def read_range(handle: BinaryIO, lo: int, hi: int | None) -> tuple[memoryview, int, float]:
    """Bytes ``[lo, hi)`` of a sealed block read from ``handle``, verified chunk by chunk.

    Returns (bytes, block length, time stored); raises :class:`Corrupt`.
    """
    length, chunk, stored_at, sums, span, spans = _footer(handle.seek(0, io.SEEK_END), _read_at(handle))
    hi = length if hi is None else min(hi, length)
    if hi <= lo:
        return memoryview(b""), length, stored_at
    first, last = lo // chunk, (hi - 1) // chunk
    base = first * chunk
    want = min((last + 1) * chunk, length) - base
    handle.seek(base)
    raw = memoryview(handle.read(want))
    if len(raw) != want:
        raise Corrupt("truncated")
    _check(raw, base, length, chunk, sums, span, spans)
    return raw[lo - base : hi - base], length, stored_at


class OpenBlock:
    """A block file kept open with its verified footer, so that consecutive
    reads of one block skip the index lookup, the open and the footer (a 1 MiB
    read of a warm block spent more on those than on copying its data).

    Reads use ``os.pread`` (safe to share between threads).  The file is an
    unbuffered duplicate of diskcache's handle, closed when the last reference
    goes, never while a reader holds it; a block deleted meanwhile (evicted)
    stays readable, and its bytes, keyed by object version, are still right.
    Nothing large stays allocated between reads (only the verified checksum
    table, 8 bytes per chunk): long-lived buffers in the middle of the heap
    kept glibc from reusing the memory of earlier reads, and fresh memory
    costs a page fault per 4 KiB.
    """

    __slots__ = ("fd", "length", "chunk", "stored_at", "sums", "span", "spans")

    def __init__(self, fd: int) -> None:
        """Takes ownership of ``fd`` (closed when this is collected, or at once if invalid)."""
        self.fd = fd
        try:
            self._verify_footer(fd)
        except BaseException:
            self.fd = -1
            os.close(fd)
            raise

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _verify_footer(self, fd: int) -> None:
        # The verified table (8 bytes per 64 KiB chunk) stays: reads need not
        # read it again, and a table changed on disk since cannot vouch for data.
        self.length, self.chunk, self.stored_at, self.sums, self.span, self.spans = _footer(
            os.fstat(fd).st_size, lambda size, offset: os.pread(fd, size, offset))

    def read(self, lo: int, hi: int | None) -> memoryview:
        """Bytes ``[lo, hi)``, verified chunk by chunk (raises :class:`Corrupt`)."""
        chunk, length = self.chunk, self.length
        hi = length if hi is None else min(hi, length)
        if hi <= lo:
            return memoryview(b"")
        first, last = lo // chunk, (hi - 1) // chunk
        base = first * chunk
        want = min((last + 1) * chunk, length) - base
        if want >= SPLIT_MIN and lo == base and hi == base + want and fresh_bytes is not None:
            return memoryview(self._read_split(base, want))
        # The data first: small allocations made between a reader's big ones
        # split the memory its last read freed, and glibc then takes fresh pages.
        raw = memoryview(os.pread(self.fd, want, base))
        if len(raw) != want:
            raise Corrupt("truncated")
        _check(raw, base, length, chunk, self.sums, self.span, self.spans)
        return raw[lo - base : hi - base]

    # -- reads that use a second core (see twocore.py) ---------------------------

    def plan_reads(self, lo: int, size: int, *, queue: bool = False) -> ReadPlan | None:
        """Hand the later half of the ``size``-byte reads that follow ``lo`` in
        this block to the helper thread (the reader is about to read ``lo - size``
        to ``lo`` itself); None if it is busy or the reads do not fall on chunk bounds."""
        chunk, length = self.chunk, self.length
        if fresh_bytes is None or size <= 0 or size % chunk or lo % chunk:
            return None
        starts = list(range(lo, length, size))
        later = starts[len(starts) // 2 :]
        if not later:
            return None
        plan = ReadPlan([(start, min(start + size, length)) for start in later])
        return plan if helper.try_submit(plan.run, self._fill, queue=queue) is not None else None

    def _read_split(self, base: int, want: int) -> bytes:
        """Chunks from ``base`` (``want`` bytes), the second half filled by the helper thread."""
        assert fresh_bytes is not None
        data, view = fresh_bytes(want)
        half = (want // 2) // self.chunk * self.chunk
        future = helper.try_submit(self._fill, data, view[half:], base + half)
        if future is None:
            self._fill(data, view, base)
            return data
        try:
            self._fill(data, view[:half], base)
        finally:
            error = future.exception()  # always wait: the helper writes into ``data``
        if error is not None:
            raise error
        return data

    def _fill(self, data: bytes, view: memoryview, offset: int) -> None:
        """Fill ``view`` (``data``'s, kept alive by this call) from the block at
        chunk-aligned ``offset``, verifying each step's chunks while they are in cache."""
        chunk = self.chunk
        step = max(FILL_STEP // chunk, 1) * chunk
        for at in range(0, len(view), step):
            part = view[at : at + step]
            got = 0
            while got < len(part):
                count = os.preadv(self.fd, [part[got:]], offset + at + got)
                if count <= 0:
                    raise Corrupt("truncated")
                got += count
            _check(part, offset + at, self.length, chunk, self.sums, self.span, self.spans)
