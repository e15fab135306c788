"""Campaigns: a checked status machine, launching in SQL, A/B winners, reports, and the
reputation guard that pauses marketing when bounces or complaints climb."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.db.models import Count, Max, Min, Q
from django.db.models.functions import TruncHour
from django.utils import timezone

from . import conf, segments
from .exceptions import CampaignError
from .models import (
    Campaign,
    CampaignStatus,
    CampaignTransition,
    Contact,
    Event,
    Kind,
    Message,
    MessageStatus,
    ReputationPause,
    Suppression,
    Variant,
)

logger = logging.getLogger(__name__)
S = CampaignStatus

#: The only moves a campaign may make.
TRANSITIONS: dict[str, set[str]] = {
    S.DRAFT: {S.SCHEDULED, S.CANCELLED},
    S.SCHEDULED: {S.DRAFT, S.SENDING, S.TESTING, S.SENT, S.CANCELLED},
    S.TESTING: {S.WAITING, S.SENDING, S.PAUSED, S.CANCELLED},
    S.WAITING: {S.SENDING, S.PAUSED, S.CANCELLED},
    S.SENDING: {S.SENT, S.PAUSED, S.CANCELLED},
    S.PAUSED: {S.TESTING, S.WAITING, S.SENDING, S.CANCELLED},
    S.SENT: set(),
    S.CANCELLED: set(),
}
WAITING_STATUSES = (MessageStatus.QUEUED, MessageStatus.SCHEDULED, MessageStatus.SENDING)
#: Statuses of a message that left us (whatever happened to it afterwards).
SENT_STATUSES = (
    MessageStatus.SENT,
    MessageStatus.DELIVERED,
    MessageStatus.OPENED,
    MessageStatus.CLICKED,
    MessageStatus.BOUNCED,
    MessageStatus.COMPLAINED,
)
CHUNK = 50_000  # contact ids per INSERT … SELECT


def transition(campaign: Campaign, to: str, *, by=None, note: str = "", **fields) -> Campaign:
    """Move a campaign to ``to`` if that move is allowed, and record it."""
    with transaction.atomic():
        current = Campaign.objects.select_for_update().get(pk=campaign.pk)
        if to not in TRANSITIONS[current.status]:
            raise CampaignError(
                f"A {current.get_status_display().lower()} campaign cannot become "
                f"{S(to).label.lower()}."
            )
        Campaign.objects.filter(pk=campaign.pk).update(
            status=to, updated_at=timezone.now(), **fields
        )
        CampaignTransition.objects.create(
            campaign=current, from_status=current.status, to_status=to, by=by, note=note[:2000]
        )
    campaign.refresh_from_db()
    logger.info("mailer: campaign %s %s → %s %s", campaign.pk, current.status, to, note)
    return campaign


# --- Readiness ---------------------------------------------------------------------------


def check_ready(campaign: Campaign) -> int:
    """Refuse a campaign that cannot be sent, saying why; return its audience size."""
    variants = list(campaign.variants.all())
    # Variant templates stand in for the campaign's only in an A/B test: without a test
    # share, everyone gets the campaign's template.
    per_variant = campaign.test_share and variants and all(v.template_id for v in variants)
    if campaign.template_id is None and not per_variant:
        raise CampaignError("Choose a template (or one per variant) first.", field="template")
    for template in [campaign.template, *(v.template for v in variants)]:
        if template is not None and template.purpose != template.Purpose.MARKETING:
            raise CampaignError(
                f"Template {template} is not a marketing template.", field="template"
            )
    if not campaign.segments.exists():
        raise CampaignError("Choose at least one segment to send to.", field="segments")
    if campaign.test_share:
        if not 2 <= len(variants) <= 5:
            raise CampaignError("An A/B test needs two to five variants.", field="test_share")
        if not 1 <= campaign.test_share <= 50:
            raise CampaignError("The test share is 1 to 50 percent.", field="test_share")
    if not conf.get("POSTAL_ADDRESS"):
        raise CampaignError(
            "Set MAILER['POSTAL_ADDRESS'] (MAILER_POSTAL_ADDRESS): marketing email must carry "
            "a postal address (CAN-SPAM)."
        )
    size = segments.audience(campaign).count()
    if size == 0:
        raise CampaignError(
            "No eligible recipients: the segments are empty, or everyone in them is "
            "unsubscribed, suppressed or has not given consent.",
            field="segments",
        )
    return size


def schedule(campaign: Campaign, send_at: datetime, *, by=None) -> Campaign:
    if timezone.is_naive(send_at):
        raise CampaignError("Give the send time with its time zone.", field="send_at")
    if send_at <= timezone.now():
        raise CampaignError(
            "The send time is in the past; choose a later one, or Send now.", field="send_at"
        )
    size = check_ready(campaign)
    return transition(
        campaign,
        S.SCHEDULED,
        by=by,
        note=f"for {send_at.isoformat()}, ~{size} recipients",
        send_at=send_at,
    )


def send_now(campaign: Campaign, *, by=None) -> Campaign:
    """Launch at once, from draft or scheduled (beat would pick it up within a minute)."""
    from . import tasks

    size = check_ready(campaign)
    now = timezone.now()
    note = f"send now, ~{size} recipients"
    if campaign.status == S.SCHEDULED:
        # Already scheduled for later: bring the time forward, keep the history honest.
        with transaction.atomic():
            updated = Campaign.objects.filter(pk=campaign.pk, status=S.SCHEDULED).update(
                send_at=now
            )
            if not updated:
                raise CampaignError("The campaign changed status meanwhile; reload the page.")
            CampaignTransition.objects.create(
                campaign=campaign, from_status=S.SCHEDULED, to_status=S.SCHEDULED, by=by, note=note
            )
        campaign.refresh_from_db()
    else:
        campaign = transition(campaign, S.SCHEDULED, by=by, note=note, send_at=now)
    transaction.on_commit(lambda: tasks.launch_campaign.delay(campaign.pk))
    return campaign


def unschedule(campaign: Campaign, *, by=None) -> Campaign:
    return transition(campaign, S.DRAFT, by=by, note="back to draft")


def pause(campaign: Campaign, *, by=None, reason: str = "") -> Campaign:
    """Stop sending within seconds: workers check the campaign before every chunk."""
    return transition(campaign, S.PAUSED, by=by, note=reason or "paused", paused_reason=reason)


def resume(campaign: Campaign, *, by=None) -> Campaign:
    """Carry on where it stopped; messages already sent are never sent again."""
    from .delivery import kick

    if marketing_paused():
        raise CampaignError("Marketing is paused by the reputation guard; lift that pause first.")
    before = campaign.transitions.filter(to_status=S.PAUSED).order_by("-at", "-id").first()
    campaign.refresh_from_db(fields=["winner"])
    # Back to the A/B test it left, unless a winner was chosen meanwhile: then send it.
    target = (
        before.from_status
        if before and before.from_status in (S.TESTING, S.WAITING) and not campaign.winner_id
        else S.SENDING
    )
    campaign = transition(campaign, target, by=by, note="resumed", paused_reason="")
    transaction.on_commit(lambda: kick(Kind.CAMPAIGN))
    return campaign


def cancel(campaign: Campaign, *, by=None) -> int:
    """Cancel the campaign and every message of it not yet sent; returns that count."""
    with transaction.atomic():
        transition(campaign, S.CANCELLED, by=by, note="cancelled", finished_at=timezone.now())
        return Message.objects.filter(
            campaign=campaign, status__in=(MessageStatus.QUEUED, MessageStatus.SCHEDULED)
        ).update(status=MessageStatus.CANCELLED, last_error="Campaign cancelled.")


def duplicate(campaign: Campaign, *, by=None) -> Campaign:
    """A new draft with the same content, audience and variants."""
    with transaction.atomic():
        copy = Campaign.objects.create(
            name=f"Copy of {campaign.name}"[:200],
            template=campaign.template,
            from_name=campaign.from_name,
            from_email=campaign.from_email,
            reply_to=campaign.reply_to,
            test_share=campaign.test_share,
            winner_metric=campaign.winner_metric,
            test_window=campaign.test_window,
            tie_rule=campaign.tie_rule,
        )
        copy.segments.set(campaign.segments.all())
        copy.exclude_segments.set(campaign.exclude_segments.all())
        Variant.objects.bulk_create(
            [
                Variant(
                    campaign=copy,
                    label=v.label,
                    subject=v.subject,
                    from_name=v.from_name,
                    template=v.template,
                )
                for v in campaign.variants.all()
            ]
        )
        CampaignTransition.objects.create(
            campaign=copy,
            from_status=S.DRAFT,
            to_status=S.DRAFT,
            by=by,
            note=f"duplicated from #{campaign.pk}",
        )
    return copy


def send_test(campaign: Campaign, to: str, *, by=None) -> list[Message]:
    """Send each variant (or the template) to one address now, outside the campaign's
    numbers; the subject says TEST."""
    from .contacts import clean_address
    from .delivery import kick_on_commit

    address = clean_address(to)
    variants = list(campaign.variants.all()) or [None]
    contact = Contact.objects.filter(email=address).first()
    created = []
    for variant in variants:
        template = (
            variant.template if variant and variant.template_id else None
        ) or campaign.template
        if template is None:
            raise CampaignError("Choose a template before sending a test.", field="template")
        created.append(
            Message.objects.create(
                kind=Kind.CAMPAIGN,
                to_email=address,
                contact=contact,
                template=template,
                template_slug=template.slug,
                language=template.language,
                variant=variant,
                status=MessageStatus.QUEUED,
                queued_at=timezone.now(),
                metadata={"test_of_campaign": campaign.pk, "test": True},
            )
        )
    kick_on_commit(Kind.CAMPAIGN)
    return created


# --- Launch and materialization ----------------------------------------------------------

# Deterministic pseudo-random buckets per (campaign, contact): two rounds of
# multiplicative hashing modulo a prime, in plain SQL integer arithmetic so PostgreSQL
# and SQLite agree and the split is reproducible. The second multiplier stays below 2**31
# so (value < 2**32) * multiplier fits a signed 64-bit integer: PostgreSQL raises "bigint
# out of range" on overflow and SQLite silently turns to imprecise floats.
# The fragments run through cursor.execute with parameters, hence "%%" for modulo.
_PRIME = 4294967291


def _hash_sql(column: str, seed: int) -> str:
    first = f"(({column} * 2654435761 + {seed}) %% {_PRIME})"
    return f"(({first} * 1597334677 + 3266489917) %% {_PRIME})"


def bucket_sql(seed: int) -> str:
    """0..9999: which share of the audience a contact falls in (SQL with %% escaped)."""
    return f"({_hash_sql('c.id', seed)} %% 10000)"


def variant_sql(seed: int, count: int) -> str:
    return f"({_hash_sql('c.id', seed + 7919)} %% {count})"


def launch(campaign_id: int, *, now: datetime | None = None) -> int:
    """Start a due campaign: claim it, materialize recipients, wake the workers.

    Claiming is an atomic status change, so two beats or a double click launch once;
    materializing is INSERT … ON CONFLICT DO NOTHING on (campaign, contact), so running
    it twice never duplicates anyone.
    """
    from .delivery import kick

    now = now or timezone.now()
    campaign = Campaign.objects.get(pk=campaign_id)
    if campaign.status != S.SCHEDULED or (campaign.send_at and campaign.send_at > now):
        return 0
    testing = bool(campaign.test_share) and campaign.variants.count() >= 2
    target = S.TESTING if testing else S.SENDING
    fields = {"launched_at": now}
    if testing:
        fields["test_ends_at"] = now + campaign.test_window
    try:
        campaign = transition(campaign, target, note="launched", **fields)
    except CampaignError:
        return 0  # launched by someone else a moment ago
    created = materialize(campaign, phase="test" if testing else "all", now=now)
    if created == 0 and not testing:
        transition(campaign, S.SENT, note="no eligible recipients at launch", finished_at=now)
    kick(Kind.CAMPAIGN)
    return created


def materialize(campaign: Campaign, *, phase: str, now: datetime | None = None) -> int:
    """One queued Message per eligible contact, in SQL, in id-range chunks.

    phase "all": everyone (no test); "test": the test share, split between variants;
    "rest": everyone else, with the winning variant.
    """
    now = now or timezone.now()
    variants = list(campaign.variants.all())
    _fresh_statistics()
    # The ends of the contact id index; each chunk then selects its own audience.
    bounds = Contact.objects.aggregate(low=Min("pk"), high=Max("pk"))
    if bounds["low"] is None:
        return 0
    seed = campaign.pk * 7
    share = campaign.test_share * 100  # of 10000 buckets
    if phase == "test":
        condition = f"{bucket_sql(seed)} < {share}"
    elif phase == "rest":
        condition = f"{bucket_sql(seed)} >= {share}"
    else:
        condition = "1 = 1"
    created = 0
    low = bounds["low"] - 1
    while low < bounds["high"]:
        high = low + CHUNK
        chunk = segments.audience(campaign, now=now, within=(low, high))
        ids_sql, ids_params = chunk.values("pk").query.sql_with_params()
        created += _insert_chunk(
            campaign, variants, phase, ids_sql, [*ids_params, low, high], condition, seed, now
        )
        low = high
    total = Message.objects.filter(campaign=campaign).count()
    Campaign.objects.filter(pk=campaign.pk).update(recipients=total)
    logger.info("mailer: campaign %s materialized %d messages (%s)", campaign.pk, created, phase)
    return created


def _fresh_statistics() -> None:
    """ANALYZE the tables an audience reads (PostgreSQL; ~0.3 s at a million contacts).

    Contacts imported minutes ago may have no statistics yet, and without them the
    planner nests loops over each chunk's id ranges: quadratic in the chunk size.
    """
    if connection.vendor != "postgresql":
        return
    tables = (Contact, Contact.tags.through, Suppression)
    names = ", ".join(connection.ops.quote_name(t._meta.db_table) for t in tables)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {names}")


def _insert_chunk(campaign, variants, phase, ids_sql, ids_params, condition, seed, now) -> int:
    postgres = connection.vendor == "postgresql"
    uuid_sql = "gen_random_uuid()" if postgres else "lower(hex(randomblob(16)))"
    if phase == "test":
        # CASE picks the variant's id and template for the contact's pseudo-random arm.
        pick = variant_sql(seed, len(variants))
        variant_col = (
            "CASE "
            + " ".join(f"WHEN {pick} = {i} THEN {v.pk}" for i, v in enumerate(variants))
            + " END"
        )
        templates = [v.template or campaign.template for v in variants]
        template_col = (
            "CASE "
            + " ".join(f"WHEN {pick} = {i} THEN {t.pk}" for i, t in enumerate(templates))
            + " END"
        )
        slug_col = (
            "CASE " + " ".join(f"WHEN {pick} = {i} THEN %s" for i in range(len(variants))) + " END"
        )
        lang_col = (
            "CASE " + " ".join(f"WHEN {pick} = {i} THEN %s" for i in range(len(variants))) + " END"
        )
        select_params = [t.slug for t in templates] + [t.language for t in templates]
    else:
        variant = campaign.winner if phase == "rest" else None
        template = (
            variant.template if variant and variant.template_id else None
        ) or campaign.template
        variant_col = str(variant.pk) if variant else "NULL"
        template_col = str(template.pk)
        slug_col, lang_col = "%s", "%s"
        select_params = [template.slug, template.language]
    # Only integers and fixed SQL fragments are formatted in; values are parameters.
    sql = f"""
        INSERT INTO mailer_message (
            uuid, kind, status, to_email, contact_id, template_id, campaign_id, variant_id,
            template_slug, language, context, metadata, subject, attempts, last_error,
            provider_message_id, created_at, queued_at, updated_at
        )
        SELECT {uuid_sql}, 'campaign', 'queued', c.email, c.id, {template_col}, %s, {variant_col},
               {slug_col}, {lang_col}, '{{}}', '{{}}', '', 0, '', '', %s, %s, %s
        FROM mailer_contact c
        WHERE c.id IN ({ids_sql}) AND c.id > %s AND c.id <= %s AND {condition}
        ON CONFLICT DO NOTHING
    """  # noqa: S608
    params = [campaign.pk, *select_params, now, now, now, *ids_params]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return max(cursor.rowcount, 0)


def finish_campaigns(now: datetime | None = None) -> int:
    """Mark campaigns whose messages have all left as sent (or the test as done)."""
    now = now or timezone.now()
    finished = 0
    pending = Message.objects.filter(status__in=WAITING_STATUSES)
    for campaign in Campaign.objects.running():
        if pending.filter(campaign=campaign).exists():
            continue
        if campaign.status == S.SENDING:
            transition(campaign, S.SENT, note="every message handled", finished_at=now)
        else:
            transition(campaign, S.WAITING, note="test sent; waiting for the test window to end")
        finished += 1
    return finished


def launch_due(now: datetime | None = None) -> int:
    return sum(launch(pk, now=now) for pk in Campaign.objects.due(now).values_list("pk", flat=True))


# --- A/B winners --------------------------------------------------------------------------


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
        "sent": SENT_STATUSES,
        "waiting": WAITING_STATUSES,
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
    stats = variant_stats(campaign)
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
    from .delivery import kick

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
            transition(
                campaign, S.SENDING, by=by, note=f"winner {variant.label}: {reason.get('action')}"
            )
        materialize(campaign, phase="rest", now=now)
    transaction.on_commit(lambda: kick(Kind.CAMPAIGN))
    return variant


def pick_due_winners(now: datetime | None = None) -> int:
    picked = 0
    for campaign in Campaign.objects.test_window_over(now).filter(winner__isnull=True):
        if pick_winner(campaign, now=now) is not None:
            picked += 1
    return picked


# --- Reports ------------------------------------------------------------------------------


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


# --- Reputation guard -------------------------------------------------------------------


def reputation_guard(now: datetime | None = None) -> ReputationPause | None:
    """Pause marketing when rolling bounce or complaint rates pass the thresholds.

    Transactional mail keeps flowing; paused campaigns stay paused until a person looks.
    """
    now = now or timezone.now()
    settings = conf.get("REPUTATION")
    since = now - timedelta(hours=float(settings["WINDOW_HOURS"]))
    min_sent = int(settings["MIN_SENT"])
    marketing = (Kind.CAMPAIGN, Kind.DRIP)
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
    for campaign in Campaign.objects.running():
        row = per_campaign.get(campaign.pk, {"bounces": 0, "complaints": 0})
        why = over(row["bounces"], row["complaints"], sent_by_campaign.get(campaign.pk, 0))
        if why or overall:
            reason = f"Reputation guard: {why or 'overall ' + overall}"
            pause(campaign, reason=reason)
            logger.error("mailer: paused campaign %s: %s", campaign.pk, reason)
    if not overall:
        return None
    existing = ReputationPause.objects.filter(active=True).first()
    if existing:
        return existing
    logger.error("mailer: reputation guard paused all marketing: %s", overall)
    return ReputationPause.objects.create(reason=f"Overall {overall}", rates=rates)


def lift_reputation_pause(pause_row: ReputationPause, *, by=None) -> None:
    from .delivery import kick

    ReputationPause.objects.filter(pk=pause_row.pk).update(
        active=False, lifted_at=timezone.now(), lifted_by=by
    )
    transaction.on_commit(lambda: kick(Kind.CAMPAIGN))


def marketing_paused() -> bool:
    return ReputationPause.objects.filter(active=True).exists()
