"""Query profiles and EXPLAIN text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shoal.cache.reader import UrlIO

from .planner import QueryPlan

__all__ = ["TableIO", "QueryProfile", "render_explain"]


@dataclass
class TableIO:
    """Bytes and requests one table's scan caused, by tier."""

    bytes_from_store: int = 0
    bytes_from_cache: int = 0
    bytes_from_memory: int = 0
    #: Whole blocks delivered by peer workers' caches (``SHOAL_PEERS``), not the store.
    bytes_from_peers: int = 0
    blocks_from_peers: int = 0
    store_requests: int = 0
    #: Files DuckDB read natively from local copies of their cached ranges.
    local_copies: int = 0
    rows_out: int = 0
    seconds: float = 0.0

    def add(self, io: UrlIO) -> None:
        self.bytes_from_store += io.bytes_from_store
        self.bytes_from_cache += io.bytes_from_cache
        self.bytes_from_memory += io.bytes_from_memory
        self.bytes_from_peers += io.bytes_from_peers
        self.blocks_from_peers += io.blocks_from_peers
        self.store_requests += io.store_requests
        self.local_copies += io.local_copies


@dataclass
class QueryProfile:
    """What a query did: its plan, stage times and I/O per table."""

    plan: QueryPlan | None = None
    executor: str = "threads"
    workers: int = 1
    stages: dict[str, float] = field(default_factory=dict)
    tables: dict[str, TableIO] = field(default_factory=dict)
    rows: int = 0
    #: Whether the session had a peer cache tier (then the profile shows peer bytes, even 0).
    peer_tier: bool = False

    @property
    def bytes_from_store(self) -> int:
        return sum(t.bytes_from_store for t in self.tables.values())

    @property
    def bytes_from_cache(self) -> int:
        return sum(t.bytes_from_cache + t.bytes_from_memory for t in self.tables.values())

    @property
    def bytes_from_peers(self) -> int:
        return sum(t.bytes_from_peers for t in self.tables.values())

    @property
    def store_requests(self) -> int:
        return sum(t.store_requests for t in self.tables.values())

    @property
    def local_copies(self) -> int:
        """Files DuckDB read natively from local copies (their bytes are not counted above)."""
        return sum(t.local_copies for t in self.tables.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "executor": self.executor,
            "workers": self.workers,
            "rows": self.rows,
            "stages_s": dict(self.stages),
            "tables": {name: vars(io) for name, io in self.tables.items()},
            "bytes_from_store": self.bytes_from_store,
            "bytes_from_cache": self.bytes_from_cache,
            "bytes_from_peers": self.bytes_from_peers,
            "store_requests": self.store_requests,
            "local_copies": self.local_copies,
        }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render_explain(profile: QueryProfile, *, analyze: bool, max_fragments: int = 8) -> str:
    """Human-readable plan; with ``analyze``, measured I/O and stage times too."""
    plan = profile.plan
    fused = profile.executor == "local"
    lines = [f"Shoal plan: {profile.executor} executor, {profile.workers} "
             + ("DuckDB thread(s)" if fused else "worker(s)")]
    if plan is None:
        return lines[0]
    for name, scan in plan.scans.items():
        label = scan.table.url if name.startswith("__shoal_scan_") else f"{name} ({scan.table.url})"
        lines.append(f"  scan {label}")
        pruned = scan.files_listed - len(scan.files)
        lines.append(f"    files: {len(scan.files)} of {scan.files_listed} listed"
                     + (f" ({pruned} pruned by partition filter {scan.partition_filter})" if pruned else "")
                     + f", {_size(sum(f.size for f in scan.files))}")
        if plan.fused:
            named = "all (the query reads whole rows)" if scan.all_named else (", ".join(scan.columns) or "(none)")
            lines.append(f"    columns the query names (prefetched): {named}")
            lines.append("    projection and filters: pushed into the scan by DuckDB")
        else:
            lines.append(f"    columns ({len(scan.columns)} of {len(scan.all_columns)}): {', '.join(scan.columns)}")
            lines.append(f"    pushed-down filter: {scan.filter or '(none)'}")
        lines.append(f"    fragments: {len(scan.fragments)}")
        for fragment in scan.fragments[:max_fragments]:
            lines.append(f"      [{fragment.index}] {fragment.describe()}")
        if len(scan.fragments) > max_fragments:
            lines.append(f"      ... {len(scan.fragments) - max_fragments} more")
        if analyze and name in profile.tables:
            io = profile.tables[name]
            peers = (f"{_size(io.bytes_from_peers)} from peers ({io.blocks_from_peers} blocks), "
                     if profile.peer_tier or io.bytes_from_peers else "")
            lines.append(
                f"    read: {_size(io.bytes_from_store)} from store in {io.store_requests} GET(s), {peers}"
                f"{_size(io.bytes_from_cache)} from SSD cache, {_size(io.bytes_from_memory)} from memory"
                + (f"; {io.local_copies} file(s) read natively from local copies" if io.local_copies else "")
                + ("" if fused else f"; {io.rows_out} rows to coordinator")
            )
    if plan.partial is not None:
        group = f" GROUP BY {plan.partial.worker_group_by}" if plan.partial.worker_group_by else ""
        lines.append(f"  partial aggregation on workers: SELECT {plan.partial.worker_select}{group}")
        lines.append("  coordinator: DuckDB merges the partial aggregates")
    elif fused:
        lines.append("  coordinator: the scans above run inside the coordinator's DuckDB pipeline")
    else:
        lines.append("  coordinator: DuckDB runs the query over the workers' Arrow results")
    if analyze:
        stages = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in profile.stages.items())
        lines.append(f"  stages: {stages}")
        peers = (f"{_size(profile.bytes_from_peers)} from peers, "
                 if profile.peer_tier or profile.bytes_from_peers else "")
        lines.append(
            f"  total: {profile.rows} rows; {_size(profile.bytes_from_store)} from store "
            f"({profile.store_requests} GETs), {peers}{_size(profile.bytes_from_cache)} from cache"
            + (f", {profile.local_copies} file(s) from local copies" if profile.local_copies else "")
        )
    return "\n".join(lines)
