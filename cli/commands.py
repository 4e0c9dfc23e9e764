"""The subcommands other than the shell: ``sql``, ``tables``, ``cache ...``, ``config show``."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from .errors import EXIT_OK, UsageError
from .output import human_size
from .statements import split_statements

if TYPE_CHECKING:
    from shoal.cache import ShoalFileSystem

    from .main import Context

__all__ = ["sql", "tables", "cache", "config_show", "print_stats", "stats_dict"]


# -- sql ----------------------------------------------------------------------------------------


def _read_script(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read script {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read script {path}: not UTF-8 text") from None


def sql(ctx: "Context", query: str | None, script: str | None) -> int:
    """``shoal sql "..."`` / ``shoal sql -f FILE``: run each statement, print each result."""
    if query is not None and script is not None:
        raise UsageError("give either a query or -f FILE, not both")
    if script is not None:
        text = _read_script(script)
    elif query is not None:
        text = query
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise UsageError("no query: give SQL text, -f FILE, or pipe statements on stdin")
    statements = split_statements(text)
    if not statements:
        raise UsageError("no SQL statement given")
    printer = ctx.printer()
    try:
        for statement in statements:
            ctx.execute(statement, printer)
    finally:
        printer.close()
    return EXIT_OK


# -- tables ---------------------------------------------------------------------------------------


def tables(ctx: "Context") -> int:
    entries = ctx.table_entries()
    table = pa.table({
        "name": [e.table.name for e in entries],
        "url": [e.table.url for e in entries],
        "hive_partitioning": [e.table.hive for e in entries],
        "source": [e.source for e in entries],
    })
    printer = ctx.printer()
    try:
        if entries or ctx.fmt != "table":
            printer.rows(table)
        if ctx.fmt == "table" or not entries:
            hint = "" if entries else " (name them with --table NAME=URL, --catalog or [tables] in the config file)"
            printer.status(f"{len(entries)} table{'' if len(entries) == 1 else 's'}{hint}")
    finally:
        printer.close()
    return EXIT_OK


# -- cache --------------------------------------------------------------------------------------


def _filesystem(ctx: "Context", *, enabled: bool = True) -> "ShoalFileSystem":
    from shoal.cache import ShoalFileSystem

    return ShoalFileSystem(cache=ctx.config.cache_config(enabled=enabled), store=ctx.config.store_config())


def stats_dict(fs: "ShoalFileSystem", configured_enabled: bool) -> dict[str, Any]:
    raw = fs.stats()
    process_keys = ("hits", "misses", "bytes_from_cache", "bytes_from_store", "store_requests", "evictions",
                    "corrupt_blocks", "write_failures", "read_failures", "errors", "degraded")
    cache = fs.reader.cache
    return {
        "directory": raw["directory"],
        "enabled": configured_enabled,
        "size_limit": raw["size_limit"],
        "block_size": raw["block_size"],
        "volume": raw["volume"],
        "entries": cache.entries(),
        "this_process": {k: raw[k] for k in process_keys if k in raw},
        "all_processes": cache.persisted_stats(),
    }


def print_stats(stats: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return
    used = stats["volume"] / stats["size_limit"] * 100 if stats["size_limit"] else 0.0
    print(f"directory:   {stats['directory']}" + ("" if stats["enabled"] else "  (caching disabled)"))
    print(f"size limit:  {human_size(stats['size_limit'])} in blocks of {human_size(stats['block_size'])}")
    print(f"used:        {human_size(stats['volume'])} ({used:.1f}%), {stats['entries']} blocks")
    rows = [("hits", "hits"), ("misses", "misses"), ("bytes from cache", "bytes_from_cache"),
            ("bytes from store", "bytes_from_store"), ("store requests", "store_requests"),
            ("evictions", "evictions"), ("errors", "errors")]
    everyone = dict(stats["all_processes"])
    failures = ("corrupt_blocks", "write_failures", "read_failures")
    everyone.setdefault("errors", sum(everyone.get(k, 0) for k in failures))
    print(f"{'':18}{'this process':>16}{'all processes':>16}")
    for label, key in rows:
        mine, total = stats["this_process"].get(key, 0), everyone.get(key, 0)
        if key.startswith("bytes"):
            mine, total = human_size(mine), human_size(total)
        print(f"{label:18}{mine!s:>16}{total!s:>16}")
    hits, misses = everyone.get("hits", 0), everyone.get("misses", 0)
    if hits + misses:
        print(f"hit rate (all processes): {hits / (hits + misses) * 100:.1f}%")


def cache(ctx: "Context", action: str, target: str | None, as_json: bool) -> int:
    if action == "stats":
        if ctx._session is not None:  # the shell's .stats: this process's own counters
            stats = stats_dict(ctx._session.fs, ctx.config["cache.enabled"])
        else:
            fs = _filesystem(ctx)
            try:
                stats = stats_dict(fs, ctx.config["cache.enabled"])
            finally:
                fs.close()
        print_stats(stats, as_json)
        return EXIT_OK
    if action == "clear":
        fs = _filesystem(ctx)
        try:
            before = fs.reader.cache.volume()
            removed = fs.reader.cache.clear()
            fs.clear_local_copies()
            after = fs.reader.cache.volume()
        finally:
            fs.close()
        print(f"removed {removed} blocks ({human_size(max(0, before - after))}) "
              f"from {ctx.config.cache_config().directory}")
        return EXIT_OK
    if action == "warm":
        return _warm(ctx, str(target))
    raise UsageError(f"unknown cache action {action!r}")


def _warm(ctx: "Context", target: str) -> int:
    from shoal.cache import ObjectNotFoundError
    from shoal.cache.source import split_url
    from shoal.engine import TableDef

    if not ctx.config["cache.enabled"]:
        raise UsageError("the cache is disabled (--no-cache or SHOAL_CACHE=off): nothing to warm")
    named = {e.table.name.lower(): e.table for e in ctx.table_entries()}
    table = named.get(target.lower()) or TableDef(name="warm", url=target)
    started = time.perf_counter()
    fs = _filesystem(ctx)
    try:
        versions = [v for v in fs.versions(table.pattern) if v.size > 0]
        if not versions:
            raise ObjectNotFoundError(f"no objects match {table.url}")
        protocol, _ = split_url(versions[0].url)
        source = fs.source(protocol)
        if source.store_id == "file":
            print(f"shoal: {table.url} is on the local disk and is read in place; nothing to cache",
                  file=sys.stderr)
            return EXIT_OK
        before = fs.reader.metrics.snapshot()
        chunk = max(fs.cache_config.max_request_size, fs.cache_config.block_size)

        def read_all(version: Any) -> int:
            for start in range(0, version.size, chunk):
                fs.reader.read(source, version, start, min(start + chunk, version.size))
            return version.size

        with ThreadPoolExecutor(max_workers=min(8, len(versions)), thread_name_prefix="shoal-warm") as pool:
            total = sum(pool.map(read_all, versions))
        fs.reader.flush()
        after = fs.reader.metrics.snapshot()
    finally:
        fs.close()
    fetched = after["bytes_from_store"] - before["bytes_from_store"]
    cached = after["bytes_from_cache"] - before["bytes_from_cache"]
    elapsed = time.perf_counter() - started
    print(f"warmed {len(versions)} object{'' if len(versions) == 1 else 's'}, {human_size(total)} "
          f"({human_size(fetched)} fetched from the store, {human_size(cached)} already cached) "
          f"in {elapsed:.2f} s")
    return EXIT_OK


# -- config ---------------------------------------------------------------------------------------


def config_show(ctx: "Context", as_json: bool) -> int:
    rows = ctx.config.show()
    if as_json:
        print(json.dumps({r["key"]: {"value": r["value"], "source": r["source"]} for r in rows},
                         indent=2, default=str))
        return EXIT_OK
    width = max(len(r["key"]) for r in rows)
    for row in rows:
        value = "(not set)" if row["value"] is None else row["value"]
        print(f"{row['key']:<{width}}  {value}  ({row['source']})")
    return EXIT_OK
