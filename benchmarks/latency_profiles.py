"""What the benchmark S3 proxy (``s3proxy.py``) injects: latency profiles,
fault settings and the bandwidth pacer.

The numbers come from ``shared/BENCHMARKING.md`` and section 2 of
``shared/research/perf_anchors.md``.  They are a fit to published
measurements, not a measured distribution; treat them as a repeatable
stand-in for "a real object store", not as a model of any one region.

Everything here is pure and synchronous so that the samplers can be tested
directly (``profile.sample_ttfb(random.Random(seed))``) without sleeping.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20

#: Fault kinds understood by the proxy, in the order their rates are stacked.
FAULT_KINDS: tuple[str, ...] = ("slowdown", "reset", "truncate", "stall")

#: Pacing granularity and token-bucket depth in bytes (~4 ms at 60 MiB/s: a burst
#: the size of a TCP window, and a quarter of the wakeups of 64 KiB pacing).
PACE = 256 * 1024


@dataclass(frozen=True, kw_only=True)
class LatencyProfile:
    """How the proxy delays and throttles each request.

    Attributes:
        name: label reported in stats and benchmark output.
        ttfb_median_s: median of the lognormal time-to-first-byte body of the
            distribution (0 disables it).
        ttfb_sigma: sigma of that lognormal (0 means "always the median").
        tail: ``((prob, lo_s, hi_s), ...)``: with probability ``prob`` a request
            draws its TTFB uniformly from ``[lo_s, hi_s]`` instead of the
            lognormal.  The probabilities are disjoint and must sum to <= 1.
        bandwidth_bytes_per_s: per-connection cap on response bodies, or None.
        bandwidth_range: if set, each request draws its per-connection cap
            uniformly from ``(lo, hi)`` bytes/s (overrides the fixed cap).
        aggregate_bytes_per_s: cap shared by all connections, or None.
        connect_delay_s: delay before the first request on a new connection.
        error_rate: probability that a request gets one of ``error_kinds``.
        error_kinds: fault kinds drawn uniformly when ``error_rate`` hits.
    """

    name: str = "custom"
    ttfb_median_s: float = 0.0
    ttfb_sigma: float = 0.0
    tail: tuple[tuple[float, float, float], ...] = ()
    bandwidth_bytes_per_s: float | None = None
    bandwidth_range: tuple[float, float] | None = None
    aggregate_bytes_per_s: float | None = None
    connect_delay_s: float = 0.0
    error_rate: float = 0.0
    error_kinds: tuple[str, ...] = ("slowdown",)

    def __post_init__(self) -> None:
        # Validate eagerly: a typo in a profile should fail at start-up, not
        # show up as a silently wrong benchmark.
        if self.ttfb_median_s < 0 or self.ttfb_sigma < 0 or self.connect_delay_s < 0:
            raise ValueError("delays and sigma must be >= 0")
        if sum(p for p, _, _ in self.tail) > 1.0 + 1e-9:
            raise ValueError("tail probabilities sum to more than 1")
        for p, lo, hi in self.tail:
            if p < 0 or lo < 0 or hi < lo:
                raise ValueError(f"bad tail entry {(p, lo, hi)!r}")
        for rate in (self.bandwidth_bytes_per_s, self.aggregate_bytes_per_s):
            if rate is not None and rate <= 0:
                raise ValueError("bandwidth caps must be > 0 (use None for no cap)")
        if self.bandwidth_range is not None:
            lo, hi = self.bandwidth_range
            if lo <= 0 or hi < lo:
                raise ValueError("bandwidth_range must be 0 < lo <= hi")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be in [0, 1]")
        bad = set(self.error_kinds) - set(FAULT_KINDS)
        if bad or (self.error_rate > 0 and not self.error_kinds):
            raise ValueError(f"error_kinds must be drawn from {FAULT_KINDS}")

    def sample_ttfb(self, rng: random.Random) -> float:
        """Draw one time-to-first-byte in seconds (no sleeping)."""
        u = rng.random()
        acc = 0.0
        for prob, lo, hi in self.tail:
            acc += prob
            if u < acc:
                return rng.uniform(lo, hi)
        if self.ttfb_median_s <= 0:
            return 0.0
        if self.ttfb_sigma <= 0:
            return self.ttfb_median_s
        # Lognormal parametrised by its median: median * exp(sigma * N(0, 1)).
        return self.ttfb_median_s * math.exp(self.ttfb_sigma * rng.gauss(0.0, 1.0))

    def sample_bandwidth(self, rng: random.Random) -> float | None:
        """Per-connection cap for one request in bytes/s, or None for no cap."""
        if self.bandwidth_range is not None:
            return rng.uniform(*self.bandwidth_range)
        return self.bandwidth_bytes_per_s

    def replace(self, **changes: Any) -> "LatencyProfile":
        """Copy with some fields changed (keeps the name unless given)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, for benchmark reports."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Injected fault rates: probabilities per request, disjoint, sum <= 1.

    Attributes:
        slowdown_rate: answer ``503 SlowDown`` without contacting upstream.
        reset_rate: send ``body_fraction`` of the body, then a TCP reset.
        truncate_rate: send ``body_fraction`` of the body, then a clean close.
        stall_rate: wait ``stall_s`` more before the first response byte.
        stall_s: length of a stall in seconds.
        body_fraction: where resets and truncations cut the body.
        only_get: inject faults (the profile's errors too) on GETs only.
    """

    slowdown_rate: float = 0.0
    reset_rate: float = 0.0
    truncate_rate: float = 0.0
    stall_rate: float = 0.0
    stall_s: float = 10.0
    body_fraction: float = 0.5
    only_get: bool = False

    def __post_init__(self) -> None:
        rates = [getattr(self, f"{kind}_rate") for kind in FAULT_KINDS]
        if any(r < 0 for r in rates) or sum(rates) > 1.0 + 1e-9:
            raise ValueError("fault rates must be >= 0 and sum to <= 1")
        if not 0.0 <= self.body_fraction <= 1.0 or self.stall_s < 0:
            raise ValueError("body_fraction must be in [0, 1] and stall_s >= 0")

    def draw(self, rng: random.Random, method: bytes, profile: LatencyProfile) -> str | None:
        """Pick this request's fault kind, or None (consumes RNG draws)."""
        if self.only_get and method != b"GET":
            return None
        u, acc = rng.random(), 0.0
        for kind in FAULT_KINDS:
            acc += getattr(self, f"{kind}_rate")
            if u < acc:
                return kind
        if profile.error_rate and rng.random() < profile.error_rate:
            return rng.choice(profile.error_kinds)
        return None


class Pacer:
    """Token bucket (``PACE`` bytes deep) in GCRA form.

    ``tat`` is when the bucket would be full again.  Keeping virtual time
    instead of sleeping a fixed amount per chunk keeps the long-run rate exact
    although asyncio sleeps are coarse (~1 ms).
    """

    __slots__ = ("tat",)

    def __init__(self) -> None:
        self.tat = 0.0

    def delay(self, n: int, rate: float, now: float) -> float:
        """Reserve ``n`` bytes at ``rate`` bytes/s; return seconds to wait first."""
        self.tat = max(self.tat, now) + n / rate
        return self.tat - now - PACE / rate


_S3_TAIL = ((0.029, 0.200, 0.600), (0.001, 2.0, 5.0))

#: Named profiles.  "none" measures the proxy's own overhead.
PROFILES: dict[str, LatencyProfile] = {
    p.name: p
    for p in (
        LatencyProfile(name="none"),
        # Same-region S3 Standard: lognormal 27 ms / 0.5 plus a 3% tail,
        # 60 MiB/s fixed per connection (deterministic runs), 10 Gbit/s total,
        # 0.01% of requests get a 503 SlowDown or a reset.
        LatencyProfile(
            name="s3-standard",
            ttfb_median_s=0.027,
            ttfb_sigma=0.5,
            tail=_S3_TAIL,
            bandwidth_bytes_per_s=60 * MiB,
            aggregate_bytes_per_s=1.25e9,
            connect_delay_s=0.001,
            error_rate=0.0001,
            error_kinds=("slowdown", "reset"),
        ),
        # Variant with the AnyBlob per-request spread of 25-95 MiB/s.
        LatencyProfile(
            name="s3-standard-variable",
            ttfb_median_s=0.027,
            ttfb_sigma=0.5,
            tail=_S3_TAIL,
            bandwidth_range=(25 * MiB, 95 * MiB),
            aggregate_bytes_per_s=1.25e9,
            connect_delay_s=0.001,
            error_rate=0.0001,
            error_kinds=("slowdown", "reset"),
        ),
        # Variant with the 2.5 Gbit/s aggregate cap.
        LatencyProfile(
            name="s3-standard-2g5",
            ttfb_median_s=0.027,
            ttfb_sigma=0.5,
            tail=_S3_TAIL,
            bandwidth_bytes_per_s=60 * MiB,
            aggregate_bytes_per_s=2.5e9 / 8,
            connect_delay_s=0.001,
            error_rate=0.0001,
            error_kinds=("slowdown", "reset"),
        ),
        # S3 Express One Zone: single-digit ms first byte, 90 MiB/s.
        LatencyProfile(
            name="s3-express",
            ttfb_median_s=0.005,
            ttfb_sigma=0.4,
            bandwidth_bytes_per_s=90 * MiB,
            aggregate_bytes_per_s=1.25e9,
            connect_delay_s=0.001,
        ),
        # MinIO on a LAN: 1-2 ms (median 1.5 ms, sigma 0.2 keeps ~90% in
        # 1.1-2.1 ms), 1 Gbit/s per connection, no aggregate cap.
        LatencyProfile(
            name="lan-minio",
            ttfb_median_s=0.0015,
            ttfb_sigma=0.2,
            bandwidth_bytes_per_s=1e9 / 8,
            connect_delay_s=0.0002,
        ),
        # Cross-region / internet: 120 ms median, 10 MiB/s per connection.
        # The 20 ms connection setup is our guess, not from the anchors.
        LatencyProfile(
            name="wan",
            ttfb_median_s=0.120,
            ttfb_sigma=0.4,
            bandwidth_bytes_per_s=10 * MiB,
            connect_delay_s=0.020,
        ),
    )
}


def get_profile(name_or_profile: str | LatencyProfile) -> LatencyProfile:
    """Look up a named profile (or pass a LatencyProfile through)."""
    if isinstance(name_or_profile, LatencyProfile):
        return name_or_profile
    try:
        return PROFILES[name_or_profile]
    except KeyError:
        raise ValueError(
            f"unknown profile {name_or_profile!r}; known: {', '.join(PROFILES)}"
        ) from None
