"""Campaign reports, computed in the database: one pass over the messages, aggregates only."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Count, Q
from django.db.models.functions import TruncHour

from . import quota
from .models import Campaign, CampaignStatus, Event, Message, MessageStatus, Queue, Variant


@dataclass
class ArmStats:
    variant: Variant
    sent: int
    opens: int
    clicks: int

    def rate(self, metric: str) -> tuple[int, int]:
        """(successes, trials) for the metric."""
        if metric == Campaign.Metric.UNIQUE_OPEN_RATE:
            return self.opens, self.sent
        if metric == Campaign.Metric.CLICK_TO_OPEN:
            return self.clicks, self.opens
        return self.clicks, self.sent


def variant_stats(campaign: Campaign, figures: dict | None = None) -> list[ArmStats]:
    """Per variant: messages sent, unique human opens and clicks."""
    figures = tally(campaign) if figures is None else figures
    empty = {"sent_at": 0, "opened": 0, "clicked": 0}
    return [
        ArmStats(
            variant=v,
            sent=figures.get(v.pk, empty)["sent_at"],
            opens=figures.get(v.pk, empty)["opened"],
            clicks=figures.get(v.pk, empty)["clicked"],
        )
        for v in campaign.variants.all()
    ]


def tally(campaign: Campaign) -> dict[int | None, dict[str, int]]:
    """Per variant (None without one): message figures in one pass over the messages.

    Unique opens, clicks, deliveries, bounces and complaints are the first-event times
    ``tracking`` keeps on each message, so no query counts DISTINCT over the events; and
    grouping by status costs less than a filtered count per figure.
    """
    rows = (
        Message.objects.filter(campaign=campaign)
        .values("variant", "status")
        .annotate(
            n=Count("*"),
            sent_at=Count("sent_at"),
            delivered=Count("delivered_at"),
            opened=Count("opened_at"),
            clicked=Count("clicked_at"),
            bounced=Count("bounced_at"),
            complained=Count("complained_at"),
        )
        .order_by()
    )
    by_status = {
        "sent": MessageStatus.left(),
        "waiting": MessageStatus.waiting(),
        "failed": (MessageStatus.FAILED,),
        "suppressed": (MessageStatus.SUPPRESSED,),
        "cancelled": (MessageStatus.CANCELLED,),
    }
    figures: dict[int | None, dict[str, int]] = {}
    for row in rows:
        variant, status, n = row.pop("variant"), row.pop("status"), row.pop("n")
        into = figures.setdefault(variant, dict.fromkeys(["recipients", *by_status, *row], 0))
        into["recipients"] += n
        for name, statuses in by_status.items():
            if status in statuses:
                into[name] += n
        for name, count in row.items():
            into[name] += count
    return figures


def report(campaign: Campaign) -> dict:
    """Every figure of the campaign report, from SQL aggregates only.

    One pass over the messages (``tally``), one over the opens and clicks for the hourly
    chart, and small index reads for unsubscribes and links: fast at a million messages.
    """
    per_variant = tally(campaign)
    names = (
        "recipients", "sent", "waiting", "failed", "suppressed", "cancelled",
        "delivered", "opened", "clicked", "bounced", "complained",
    )  # fmt: skip
    totals = {name: sum(row[name] for row in per_variant.values()) for name in names}
    recipients, sent, failed = totals["recipients"], totals["sent"], totals["failed"]
    events = Event.objects.filter(campaign=campaign)
    # Counting timestamps (never NULL), not ids: the (campaign, event_type, timestamp,
    # automated) index then answers alone, without reading the events themselves.
    engagement = list(
        events.filter(event_type__in=(Event.Type.OPENED, Event.Type.CLICKED))
        .annotate(hour=TruncHour("timestamp"))
        .values("hour")
        .annotate(
            opens=Count("timestamp", filter=Q(event_type=Event.Type.OPENED, automated=False)),
            clicks=Count("timestamp", filter=Q(event_type=Event.Type.CLICKED, automated=False)),
            automated=Count("timestamp", filter=Q(automated=True)),
        )
        .order_by("hour")
    )
    unsubscribed = events.filter(event_type=Event.Type.UNSUBSCRIBED).aggregate(
        n=Count("recipient", distinct=True)
    )["n"]

    def rate(n: int, of: int) -> float:
        return round(100 * n / of, 2) if of else 0.0

    figures = {
        **{name: totals[name] for name in names if name != "waiting"},
        "pending": totals["waiting"],
        "progress": rate(recipients - totals["waiting"], recipients),
        "unsubscribed": unsubscribed,
        "automated": sum(row["automated"] for row in engagement),
    }
    figures["quota_wait"] = quota_wait(campaign, totals["waiting"])
    figures["rates"] = {
        "delivered": rate(totals["delivered"], sent),
        "opened": rate(totals["opened"], sent),
        "clicked": rate(totals["clicked"], sent),
        "click_to_open": rate(totals["clicked"], totals["opened"]),
        "bounced": rate(totals["bounced"], sent),
        "complained": rate(totals["complained"], sent),
        "unsubscribed": rate(unsubscribed, sent),
        "failed": rate(failed, recipients),
    }
    figures["variants"] = [
        {
            "label": arm.variant.label,
            "subject": arm.variant.subject,
            "sent": arm.sent,
            "opened": arm.opens,
            "clicked": arm.clicks,
            "open_rate": rate(arm.opens, arm.sent),
            "click_rate": rate(arm.clicks, arm.sent),
            "winner": campaign.winner_id == arm.variant.pk,
        }
        for arm in variant_stats(campaign, per_variant)
    ]
    figures["timeline"] = [
        {"hour": row["hour"], "opens": row["opens"], "clicks": row["clicks"]}
        for row in engagement
        if row["opens"] or row["clicks"]
    ]
    figures["top_links"] = list(
        events.filter(event_type=Event.Type.CLICKED, automated=False, link__isnull=False)
        .values("link__url")
        .annotate(clicks=Count("message", distinct=True))
        .order_by("-clicks", "link__url")[:10]
    )
    return figures


def quota_wait(campaign: Campaign, waiting: int) -> str:
    """The report's "Waiting for quota: …; resumes …" line, while a used-up quota holds
    this campaign's mail (empty otherwise)."""
    if not waiting or campaign.status not in CampaignStatus.running():
        return ""
    held = quota.holding(Queue.CAMPAIGN)
    return f"Waiting for quota: {held.reason}" if held is not None else ""
