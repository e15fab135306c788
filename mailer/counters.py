"""Counters and histograms for /metrics, kept in Redis so every process adds to the same
figures (web, workers, beat) and any web process serves them all.

One Redis hash holds every series; a batch of emails adds to it in one round trip. Without
Redis nothing is counted (the database gauges of ``metrics`` still work). Counting never
fails or delays mail: a Redis error is logged and the figures miss that batch.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Iterable, Mapping

import redis

from .ratelimit import redis_client

logger = logging.getLogger(__name__)

KEY = "mailer:metrics"

#: Upper bounds (seconds) of the queued → sent histogram; +Inf is implied.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: Upper bounds of the drain batch size histogram.
BATCH_BUCKETS = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)


def series(name: str, labels: Mapping[str, str] | None = None) -> str:
    """The hash field of one series: ``name|k=v,k=v`` (labels sorted)."""
    if not labels:
        return f"{name}|"
    return f"{name}|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def parse(field: str) -> tuple[str, dict[str, str]]:
    name, _, rest = field.partition("|")
    labels = dict(part.split("=", 1) for part in rest.split(",") if part)
    return name, labels


def add(increments: Mapping[str, float]) -> None:
    """Add to several series at once (fields from ``series``); zero adds are skipped."""
    increments = {field: value for field, value in increments.items() if value}
    client = redis_client()
    if client is None or not increments:
        return
    try:
        pipe = client.pipeline(transaction=False)
        for field, value in increments.items():
            if float(value).is_integer():
                pipe.hincrby(KEY, field, int(value))
            else:
                pipe.hincrbyfloat(KEY, field, float(value))
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("mailer: metrics not counted (%s)", exc.__class__.__name__)


def inc(name: str, amount: float = 1, **labels: str) -> None:
    add({series(name, labels): amount})


def observations(
    name: str, values: Iterable[float], buckets: tuple[float, ...], **labels: str
) -> dict[str, float]:
    """The increments that add ``values`` to a histogram (bucket counts are not
    cumulative here; ``metrics`` sums them at scrape)."""
    counts: Counter[str] = Counter()
    total = 0.0
    for value in values:
        index = bisect.bisect_left(buckets, value)
        bound = str(buckets[index]) if index < len(buckets) else "+Inf"
        counts[series(f"{name}_bucket", {**labels, "le": bound})] += 1
        counts[series(f"{name}_count", labels)] += 1
        total += value
    increments: dict[str, float] = dict(counts)
    if counts:
        increments[series(f"{name}_sum", labels)] = round(total, 6)
    return increments


def read() -> dict[str, float]:
    """Every series, by field; {} without Redis (or when it does not answer)."""
    client = redis_client()
    if client is None:
        return {}
    try:
        raw = client.hgetall(KEY)
    except redis.RedisError as exc:
        logger.warning("mailer: metrics unavailable (%s)", exc.__class__.__name__)
        return {}
    return {k.decode(): float(v) for k, v in raw.items()}
