"""The reputation guard: pause marketing when bounce or complaint rates climb."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db.models import Count, Q
from django.utils import timezone

from . import alerts, campaigns, conf, dispatch
from .models import Campaign, Event, Kind, Message, Queue, ReputationPause

logger = logging.getLogger(__name__)


def reputation_guard(now: datetime | None = None) -> ReputationPause | None:
    """Pause marketing when rolling bounce or complaint rates pass the thresholds.

    Transactional mail keeps flowing; paused campaigns stay paused until a person looks.
    """
    now = now or timezone.now()
    settings = conf.get("REPUTATION")
    since = now - timedelta(hours=float(settings["WINDOW_HOURS"]))
    min_sent = int(settings["MIN_SENT"])
    marketing = Kind.marketing()
    sent_by_campaign = dict(
        Message.objects.filter(kind__in=marketing, sent_at__gte=since)
        .values_list("campaign")
        .annotate(n=Count("pk"))
        .order_by()
    )
    bad = (
        Event.objects.filter(message__kind__in=marketing, timestamp__gte=since)
        .values("campaign")
        .annotate(
            bounces=Count(
                "message",
                filter=Q(event_type=Event.Type.BOUNCED, bounce=Event.Bounce.HARD),
                distinct=True,
            ),
            complaints=Count("message", filter=Q(event_type=Event.Type.COMPLAINED), distinct=True),
        )
        .order_by()
    )
    per_campaign = {row["campaign"]: row for row in bad}
    total_sent = sum(sent_by_campaign.values())
    total_bounces = sum(r["bounces"] for r in per_campaign.values())
    total_complaints = sum(r["complaints"] for r in per_campaign.values())
    bounce_limit, complaint_limit = (
        float(settings["BOUNCE_RATE"]),
        float(settings["COMPLAINT_RATE"]),
    )

    def over(bounces: int, complaints: int, sent: int) -> str:
        if sent < min_sent:
            return ""
        if bounces / sent > bounce_limit:
            return f"bounce rate {bounces / sent:.2%} > {bounce_limit:.2%} ({bounces} of {sent})"
        if complaints / sent > complaint_limit:
            rate = complaints / sent
            return f"complaint rate {rate:.3%} > {complaint_limit:.3%} ({complaints} of {sent})"
        return ""

    rates = {
        "window_hours": settings["WINDOW_HOURS"],
        "sent": total_sent,
        "bounces": total_bounces,
        "complaints": total_complaints,
    }
    overall = over(total_bounces, total_complaints, total_sent)
    paused: list[str] = []
    for campaign in Campaign.objects.running():
        row = per_campaign.get(campaign.pk, {"bounces": 0, "complaints": 0})
        why = over(row["bounces"], row["complaints"], sent_by_campaign.get(campaign.pk, 0))
        if why or overall:
            reason = f"Reputation guard: {why or 'overall ' + overall}"
            campaigns.pause(campaign, reason=reason)
            logger.error("mailer: paused campaign %s: %s", campaign.pk, reason)
            paused.append(f"campaign {campaign.name!r}: {reason}")
    if paused or overall:
        alerts.reputation_paused(paused + ([f"all marketing: {overall}"] if overall else []))
    if not overall:
        return None
    existing = ReputationPause.objects.filter(active=True).first()
    if existing:
        return existing
    logger.error("mailer: reputation guard paused all marketing: %s", overall)
    return ReputationPause.objects.create(reason=f"Overall {overall}", rates=rates)


def lift_reputation_pause(pause_row: ReputationPause, *, by=None) -> None:
    ReputationPause.objects.filter(pk=pause_row.pk).update(
        active=False, lifted_at=timezone.now(), lifted_by=by
    )
    dispatch.kick_on_commit(Queue.CAMPAIGN)
