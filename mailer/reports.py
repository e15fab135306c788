"""Campaign reports, computed in the database: one pass over the messages, aggregates only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, Max, Min, Q, QuerySet
from django.db.models.functions import TruncDay, TruncHour, TruncMinute
from django.utils import timezone

from . import conf, quota
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


def summaries(campaign_ids: list[int]) -> dict[int, dict]:
    """Sent, unique opens and clicks, and their rates, for a page of the campaign list:
    one GROUP BY over those campaigns' messages (the first-event times, as the report)."""
    rows = (
        Message.objects.filter(campaign_id__in=campaign_ids)
        .values("campaign_id")
        .annotate(
            sent=Count("pk", filter=Q(status__in=MessageStatus.left())),
            opened=Count("opened_at"),
            clicked=Count("clicked_at"),
        )
        .order_by()
    )
    found = {}
    for row in rows:
        sent = row["sent"]
        found[row["campaign_id"]] = {
            **row,
            "open_rate": round(100 * row["opened"] / sent, 1) if sent else None,
            "click_rate": round(100 * row["clicked"] / sent, 1) if sent else None,
        }
    return found


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
    bucket = chart_bucket(campaign, events)
    # Counting timestamps (never NULL), not ids: the (campaign, event_type, timestamp,
    # automated) index then answers alone, without reading the events themselves.
    engagement = list(
        events.filter(event_type__in=(Event.Type.OPENED, Event.Type.CLICKED))
        .annotate(at=bucket.trunc("timestamp"))
        .values("at")
        .annotate(
            opens=Count("timestamp", filter=Q(event_type=Event.Type.OPENED, automated=False)),
            clicks=Count("timestamp", filter=Q(event_type=Event.Type.CLICKED, automated=False)),
            automated=Count("timestamp", filter=Q(automated=True)),
        )
        .order_by("at")
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
    figures["bucket"] = bucket
    figures["timeline"] = bucket.timeline(engagement)
    figures["delivery_reported"] = delivery_reported(totals)
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


def delivery_reported(totals: dict[str, int]) -> bool:
    """Whether the backend tells us about deliveries, bounces and complaints.

    An ESP's webhooks do; plain SMTP only says the relay accepted the email, so its report
    says "not reported" instead of a 0 % that reads as a disaster.
    """
    return conf.esp_tracks() or any(totals[k] for k in ("delivered", "bounced", "complained"))


# --- The chart's time buckets ---------------------------------------------------------------

#: Bucket sizes the chart may use, smallest first: (seconds, label).
BUCKET_SIZES = (
    (60, "minute"),
    (5 * 60, "5 minutes"),
    (15 * 60, "15 minutes"),
    (30 * 60, "30 minutes"),
    (3600, "hour"),
    (3 * 3600, "3 hours"),
    (6 * 3600, "6 hours"),
    (12 * 3600, "12 hours"),
    (86400, "day"),
    (7 * 86400, "week"),
)
#: The smallest bucket that covers the campaign's span in at most this many bars.
MAX_BUCKETS = 48


@dataclass(frozen=True)
class Bucket:
    """The chart's bucket: its size, and the first bucket's start (local time)."""

    seconds: int
    label: str
    start: datetime | None
    end: datetime | None

    @property
    def unit(self) -> int:
        """What the database truncates to; buckets of several units merge in Python."""
        return 60 if self.seconds < 3600 else 3600 if self.seconds < 86400 else 86400

    def trunc(self, field: str):
        return {60: TruncMinute, 3600: TruncHour, 86400: TruncDay}[self.unit](field)

    def floor(self, at: datetime) -> datetime:
        at = timezone.localtime(at) if timezone.is_aware(at) else at
        step = self.seconds
        if step >= 86400:
            origin = at.replace(hour=0, minute=0, second=0, microsecond=0)
            if step > 86400:  # weeks start on Monday
                origin -= timedelta(days=origin.weekday())
            return origin
        day = at.replace(hour=0, minute=0, second=0, microsecond=0)
        offset = int((at - day).total_seconds()) // step * step
        return day + timedelta(seconds=offset)

    def timeline(self, rows: list[dict]) -> list[dict]:
        """Opens and clicks per bucket from the first to the last, empty buckets included
        (at most MAX_BUCKETS + 1 points), so the time axis is even."""
        if self.start is None or self.end is None:
            return []
        first, last = self.floor(self.start), self.floor(self.end)
        points: dict[datetime, dict] = {}
        at = first
        while at <= last:
            points[at] = {"start": at, "opens": 0, "clicks": 0}
            following = self.floor(at + timedelta(seconds=self.seconds))
            # A clock change can floor back onto the same bucket: move on in real time.
            at = following if following > at else at + timedelta(seconds=self.seconds)
        for row in rows:
            point = points.get(self.floor(row["at"]))
            if point is not None:
                point["opens"] += row["opens"]
                point["clicks"] += row["clicks"]
        return list(points.values())


def chart_bucket(campaign: Campaign, events: QuerySet) -> Bucket:
    """The smallest bucket that shows the campaign's span (launch to its last human open
    or click) in at most MAX_BUCKETS bars: minutes for a short one, hours or days for a
    long one. Two index lookups (the first and last open, the first and last click)."""
    ends = []
    for kind in (Event.Type.OPENED, Event.Type.CLICKED):
        found = events.filter(event_type=kind, automated=False).aggregate(
            first=Min("timestamp"), last=Max("timestamp")
        )
        ends += [at for at in found.values() if at is not None]
    if not ends:
        return Bucket(3600, "hour", None, None)
    start, end = min(ends), max(ends)
    if campaign.launched_at is not None and campaign.launched_at < start:
        start = campaign.launched_at
    span = (end - start).total_seconds()
    # The first size that fits; else weeks, however many: nothing is left out.
    seconds, label = next(
        ((size, label) for size, label in BUCKET_SIZES if span / size < MAX_BUCKETS),
        BUCKET_SIZES[-1],
    )
    return Bucket(seconds, label, start, end)
