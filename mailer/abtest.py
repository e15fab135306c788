"""A/B tests: per-variant figures, the winner after the test window, and the rest of the
audience sent the winning variant."""

from __future__ import annotations

import math
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from . import campaigns, conf, dispatch, reports
from .exceptions import CampaignError
from .models import Campaign, CampaignStatus, CampaignTransition, Queue, Variant

S = CampaignStatus


def probability_better(s1: int, n1: int, s2: int, n2: int) -> float:
    """P(arm 1 really beats arm 2): one-sided two-proportion z-test."""
    if n1 == 0 or n2 == 0:
        return 0.5
    p1, p2 = s1 / n1, s2 / n2
    pooled = (s1 + s2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.5
    return 0.5 * (1 + math.erf((p1 - p2) / se / math.sqrt(2)))


def pick_winner(campaign: Campaign, *, now: datetime | None = None) -> Variant | None:
    """After the window: the best variant by the metric, or the tie rule; record why."""
    now = now or timezone.now()
    metric = campaign.winner_metric
    stats = reports.variant_stats(campaign)
    rows = []
    for arm in stats:
        successes, trials = arm.rate(metric)
        rows.append(
            {
                "label": arm.variant.label,
                "sent": arm.sent,
                "opens": arm.opens,
                "clicks": arm.clicks,
                "rate": round(successes / trials, 6) if trials else 0.0,
                "successes": successes,
                "trials": trials,
            }
        )
    ranked = sorted(zip(rows, stats, strict=True), key=lambda r: (-r[0]["rate"], r[0]["label"]))
    (best, best_arm), (second, _) = ranked[0], ranked[1]
    probability = probability_better(
        best["successes"], best["trials"], second["successes"], second["trials"]
    )
    min_sample = int(conf.get("AB_MIN_SAMPLE"))
    too_little = any(r["trials"] < min_sample for r in rows) or best["successes"] == 0
    tie = best["rate"] == second["rate"]
    reason = {
        "metric": metric,
        "variants": rows,
        "probability_best": round(probability, 4),
        "decided_at": now.isoformat(),
    }
    if too_little or tie:
        reason["fallback"] = "too little data" if too_little else "tie"
        if campaign.tie_rule == Campaign.TieRule.EXTEND_ONCE and not campaign.test_extended:
            Campaign.objects.filter(pk=campaign.pk).update(
                test_extended=True,
                test_ends_at=now + campaign.test_window,
                winner_reason={**reason, "action": "extended once"},
            )
            CampaignTransition.objects.create(
                campaign=campaign,
                from_status=campaign.status,
                to_status=campaign.status,
                note=f"A/B test extended once ({reason['fallback']})",
            )
            return None
        winner = (
            next(arm.variant for arm in stats if arm.variant.label == "A")
            if any(a.variant.label == "A" for a in stats)
            else stats[0].variant
        )
        reason["action"] = "variant A by rule"
    else:
        winner = best_arm.variant
        reason["action"] = "best rate"
    reason["winner"] = winner.label
    return choose_winner(campaign, winner, reason=reason, now=now)


def choose_winner(
    campaign: Campaign,
    variant: Variant,
    *,
    by=None,
    reason: dict | None = None,
    now: datetime | None = None,
) -> Variant:
    """Send the winning variant to everyone outside the test (also by hand, early)."""
    if variant.campaign_id != campaign.pk:
        raise CampaignError("That variant belongs to another campaign.")
    if campaign.status not in (S.TESTING, S.WAITING, S.PAUSED) or campaign.winner_id:
        raise CampaignError("A winner can be chosen only while the A/B test runs.")
    now = now or timezone.now()
    reason = reason or {
        "action": "chosen by hand",
        "winner": variant.label,
        "decided_at": now.isoformat(),
    }
    with transaction.atomic():
        Campaign.objects.filter(pk=campaign.pk).update(winner=variant, winner_reason=reason)
        campaign.refresh_from_db()
        if campaign.status != S.PAUSED:
            campaigns.transition(
                campaign, S.SENDING, by=by, note=f"winner {variant.label}: {reason.get('action')}"
            )
        campaigns.materialize(campaign, phase="rest", now=now)
    dispatch.kick_on_commit(Queue.CAMPAIGN)
    return variant


def pick_due_winners(now: datetime | None = None) -> int:
    picked = 0
    for campaign in Campaign.objects.test_window_over(now).filter(winner__isnull=True):
        if pick_winner(campaign, now=now) is not None:
            picked += 1
    return picked
