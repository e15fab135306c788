"""/metrics in Prometheus's text format, right with any number of processes.

Gauges are read from the database at scrape time (a few aggregate queries); counters and
histograms come from the Redis hash every process adds to (``counters``). Nothing is kept
in the scraped process, so any web process answers for all of them.
"""

from __future__ import annotations

from collections import defaultdict

from django.db.models import Count, Min, Q
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from . import conf, counters, health
from .models import Message, MessageStatus, Queue, ReputationPause, WebhookDelivery

#: Counter families kept in Redis: name (without _total) → help.
COUNTERS = {
    "mailer_sent": "Emails the server or ESP accepted.",
    "mailer_failed": "Emails failed for good at sending.",
    "mailer_retried": "Emails that failed for a moment and wait to be tried again.",
    "mailer_deferred": "Emails handed back to wait for an outage or a quota window.",
    "mailer_suppressed_at_send": "Emails not sent because the address became suppressed.",
    "mailer_rate_limit_waits": "Times a worker waited for the queue's rate limit.",
    "mailer_rate_limit_wait_seconds": "Seconds workers waited for the queue's rate limit.",
    "mailer_webhook_events": "ESP and own tracking events stored, by type.",
    "mailer_suppressions_added": "Addresses suppressed, by reason.",
}
HISTOGRAMS = {
    "mailer_queued_to_sent_seconds": ("Seconds from queued to sent.", counters.LATENCY_BUCKETS),
    "mailer_drain_batch_size": ("Messages a worker claimed in one batch.", counters.BATCH_BUCKETS),
}


class Collector:
    """prometheus_client collector: everything computed when scraped."""

    def collect(self):
        yield from _from_database()
        yield from _from_counters(counters.read())


def _from_database():
    by_status = GaugeMetricFamily(
        "mailer_messages", "Messages in the outbox by kind and status.", labels=["kind", "status"]
    )
    depth = GaugeMetricFamily("mailer_queue_depth", "Messages queued.", labels=["queue"])
    age = GaugeMetricFamily(
        "mailer_queue_oldest_age_seconds",
        "Age of the oldest queued message (0: none queued).",
        labels=["queue"],
    )
    now = timezone.now()
    found = {q: [0, None] for q in Queue}
    # One pass over the table for both: the oldest queued time rides on the status count.
    rows = (
        Message.objects.values_list("kind", "status")
        .annotate(n=Count("*"), oldest=Min("queued_at", filter=Q(status=MessageStatus.QUEUED)))
        .order_by()
    )
    for kind, status, count, oldest in rows:
        by_status.add_metric([kind, status], count)
        if status != MessageStatus.QUEUED:
            continue
        slot = found[Queue.for_kind(kind)]
        slot[0] += count
        if oldest is not None and (slot[1] is None or oldest < slot[1]):
            slot[1] = oldest
    yield by_status
    for queue, (count, oldest) in found.items():
        name = conf.queue_name(queue)
        depth.add_metric([name], count)
        age.add_metric([name], (now - oldest).total_seconds() if oldest else 0.0)
    yield depth
    yield age

    pauses = ReputationPause.objects.aggregate(
        total=Count("id"), active=Count("id", filter=Q(active=True))
    )
    yield CounterMetricFamily(
        "mailer_reputation_pauses",
        "Times the reputation guard paused marketing.",
        value=pauses["total"],
    )
    yield GaugeMetricFamily(
        "mailer_reputation_paused",
        "1 while the reputation guard holds marketing.",
        value=1 if pauses["active"] else 0,
    )

    hooks = GaugeMetricFamily(
        "mailer_outgoing_webhooks", "Outgoing webhook deliveries by status.", labels=["status"]
    )
    for status, count in (
        WebhookDelivery.objects.values_list("status").annotate(n=Count("id")).order_by()
    ):
        hooks.add_metric([status], count)
    yield hooks

    running = health.processes()
    workers = GaugeMetricFamily(
        "mailer_workers", "Worker processes alive, by queue (heartbeats).", labels=["queue"]
    )
    for queue, count in running.workers.items():
        workers.add_metric([queue], count)
    yield workers


def _from_counters(values: dict[str, float]):
    grouped: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for field, value in values.items():
        name, labels = counters.parse(field)
        grouped[name].append((labels, value))
    for family, text in COUNTERS.items():
        rows = grouped.get(f"{family}_total", [])
        names = sorted({k for labels, _ in rows for k in labels})
        metric = CounterMetricFamily(family, text, labels=names)
        for labels, value in rows:
            metric.add_metric([labels.get(k, "") for k in names], value)
        yield metric
    for family, (text, bounds) in HISTOGRAMS.items():
        yield _histogram(family, text, bounds, grouped)


def _histogram(family: str, text: str, bounds: tuple, grouped: dict) -> HistogramMetricFamily:
    buckets: dict[tuple, dict[str, float]] = defaultdict(dict)
    sums: dict[tuple, float] = defaultdict(float)
    for labels, value in grouped.get(f"{family}_bucket", []):
        bound = labels.pop("le")
        buckets[tuple(sorted(labels.items()))][bound] = value
    for labels, value in grouped.get(f"{family}_sum", []):
        sums[tuple(sorted(labels.items()))] = value
    names = sorted({k for key in buckets for k, _ in key})
    metric = HistogramMetricFamily(family, text, labels=names)
    for key, counts in buckets.items():
        cumulative, total = [], 0.0
        for bound in [*(str(b) for b in bounds), "+Inf"]:
            total += counts.get(bound, 0.0)
            cumulative.append((bound, total))
        labels = dict(key)
        metric.add_metric([labels.get(k, "") for k in names], cumulative, sums[key])
    return metric


def render() -> bytes:
    """The exposition text of every mailer metric."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return generate_latest(registry)
