"""Campaigns: a checked status machine, readiness, launching and materializing in SQL."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connection, transaction
from django.db.models import Max, Min
from django.utils import timezone

from . import conf, dispatch, localtime, outbox, rendering, segments
from .contacts import clean_address
from .exceptions import CampaignError, TemplateNotFound
from .models import (
    Campaign,
    CampaignStatus,
    CampaignTransition,
    Contact,
    Kind,
    Message,
    MessageStatus,
    Queue,
    Template,
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
    if campaign.test_share and campaign.send_in_local_time:
        raise CampaignError(
            "An A/B test cannot send in each contact's local time: the test would end "
            "before most time zones had their turn.",
            field="send_in_local_time",
        )
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


def estimated_audience(campaign: Campaign) -> int | None:
    """How many contacts the campaign would reach now (None without a segment): what a
    draft shows, and what "Send now" asks a person to confirm. One COUNT."""
    if not campaign.segments.exists():
        return None
    return segments.audience(campaign).count()


def unsent(campaign: Campaign) -> int:
    """Messages of the campaign still waiting to go: what a cancel would stop."""
    return Message.objects.filter(campaign=campaign, status__in=MessageStatus.waiting()).count()


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
    transaction.on_commit(
        lambda: dispatch.enqueue("mailer.tasks.launch_campaign", args=(campaign.pk,))
    )
    return campaign


def unschedule(campaign: Campaign, *, by=None) -> Campaign:
    return transition(campaign, S.DRAFT, by=by, note="back to draft")


def pause(campaign: Campaign, *, by=None, reason: str = "") -> Campaign:
    """Stop sending within seconds: workers check the campaign before every chunk."""
    return transition(campaign, S.PAUSED, by=by, note=reason or "paused", paused_reason=reason)


def resume(campaign: Campaign, *, by=None) -> Campaign:
    """Carry on where it stopped; messages already sent are never sent again."""
    if outbox.marketing_paused():
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
    dispatch.kick_on_commit(Queue.CAMPAIGN)
    return campaign


def cancel(campaign: Campaign, *, by=None) -> int:
    """Cancel the campaign and every message of it not yet sent; returns that count.

    The status is committed first, so workers refuse to try anything more of it; the
    messages are then cancelled in short id-ordered chunks that skip rows a worker holds
    (the worker hands those back as cancelled). Never a deadlock, however large.
    """
    transition(campaign, S.CANCELLED, by=by, note="cancelled", finished_at=timezone.now())
    return outbox.cancel_campaign_messages(campaign.pk)


def duplicate(campaign: Campaign, *, by=None) -> Campaign:
    """A new draft with the same content, audience and variants."""
    with transaction.atomic():
        copy = Campaign.objects.create(
            name=f"Copy of {campaign.name}"[:200],
            template=campaign.template,
            from_name=campaign.from_name,
            from_email=campaign.from_email,
            reply_to=campaign.reply_to,
            send_in_local_time=campaign.send_in_local_time,
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
    """Send one address what the campaign's recipients will get, now, outside its numbers:
    each A/B variant (or the template alone, as without a test), from the campaign's
    sender with its Reply-To (compose reads them from ``test_of_campaign``); the subject
    says TEST."""
    address = clean_address(to)
    variants = list(campaign.variants.all())
    # The launch's rule: variants are sent only in an A/B test, else everyone gets the
    # campaign's own template and subject.
    if not (campaign.test_share and len(variants) >= 2):
        variants = [None]
    contact = Contact.objects.filter(email=address).first()
    created = []
    for variant in variants:
        template = (
            variant.template if variant and variant.template_id else None
        ) or campaign.template
        if template is None:
            raise CampaignError("Choose a template before sending a test.", field="template")
        created.append(
            outbox.add(
                Message(
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
        )
    dispatch.kick_on_commit(Queue.CAMPAIGN)
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
    now = now or timezone.now()
    campaign = Campaign.objects.get(pk=campaign_id)
    starts = launch_time(campaign)
    if campaign.status != S.SCHEDULED or (starts and starts > now):
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
    dispatch.kick(Queue.CAMPAIGN)
    return created


def materialize(campaign: Campaign, *, phase: str, now: datetime | None = None) -> int:
    """One queued Message per eligible contact, in SQL, in id-range chunks.

    phase "all": everyone (no test); "test": the test share, split between variants;
    "rest": everyone else, with the winning variant.
    """
    now = now or timezone.now()
    variants = list(campaign.variants.all())
    outbox.analyze_audience_tables()
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
    columns = _columns(campaign, variants, phase, seed, now)
    created = 0
    low = bounds["low"] - 1
    while low < bounds["high"]:
        high = low + CHUNK
        chunk = segments.audience(campaign, now=now, within=(low, high))
        ids_sql, ids_params = chunk.values("pk").query.sql_with_params()
        created += _insert_chunk(
            campaign, columns, ids_sql, [*ids_params, low, high], condition, now
        )
        low = high
    total = Message.objects.filter(campaign=campaign).count()
    Campaign.objects.filter(pk=campaign.pk).update(recipients=total)
    logger.info("mailer: campaign %s materialized %d messages (%s)", campaign.pk, created, phase)
    return created


def _insert_chunk(campaign, columns, ids_sql, ids_params, condition, now) -> int:
    return outbox.insert_campaign_messages(
        campaign.pk, columns, ids_sql, ids_params, condition, now
    )


def _columns(
    campaign: Campaign, variants: list[Variant], phase: str, seed: int, now: datetime
) -> outbox.Columns:
    """Which variant, template and translation each recipient gets, and when it goes, as
    SQL over the contact ``c``: worked out once per materialization, not per chunk."""
    languages = _contact_languages()
    if phase == "test":
        # CASE picks the variant's id and template for the contact's pseudo-random arm.
        pick = variant_sql(seed, len(variants))
        templates = [v.template or campaign.template for v in variants]
        arms = [_by_language(t, languages) for t in templates]

        def case(values: list[str]) -> str:
            return (
                "CASE "
                + " ".join(f"WHEN {pick} = {i} THEN {v}" for i, v in enumerate(values))
                + " END"
            )

        return outbox.Columns(
            variant=case([str(v.pk) for v in variants]),
            template=case([arm.template for arm in arms]),
            template_params=[p for arm in arms for p in arm.template_params],
            slug=case(["%s"] * len(templates)),
            language=case([arm.language for arm in arms]),
            params=[t.slug for t in templates] + [p for arm in arms for p in arm.language_params],
        )
    variant = campaign.winner if phase == "rest" else None
    template = (variant.template if variant and variant.template_id else None) or campaign.template
    chosen = _by_language(template, languages)
    return outbox.Columns(
        variant=str(variant.pk) if variant else "NULL",
        template=chosen.template,
        template_params=chosen.template_params,
        slug="%s",
        language=chosen.language,
        params=[template.slug, *chosen.language_params],
        timing=_local_timing(campaign, now) if campaign.send_in_local_time else None,
    )


# --- Translations: each contact gets the template in their language -----------------------


def _contact_languages() -> list[str]:
    """The languages contacts have (a handful; one pass over the table)."""
    return sorted(Contact.objects.order_by().values_list("language", flat=True).distinct())


@dataclass
class _Translation:
    template: str
    template_params: list
    language: str
    language_params: list


def translation(template: Template, language: str) -> tuple[int, str]:
    """The row of ``template`` (by slug) a contact speaking ``language`` gets: theirs,
    else the default language, else the template's own (as transactional mail falls
    back, then to what the marketer chose)."""
    try:
        source = rendering.find_template(
            template.slug, language or None, conf.get("DEFAULT_LANGUAGE"), template.language
        )
    except TemplateNotFound:
        return template.pk, template.language
    if source.template_id is None:  # a file template of that slug: keep the marketer's row
        return template.pk, template.language
    return source.template_id, source.language


def _by_language(template: Template, languages: list[str]) -> _Translation:
    """CASE over the contact's language for the translation's id and language; plain
    values when every contact gets the same one."""
    fallback = translation(template, "")
    groups: dict[tuple[int, str], list[str]] = {}
    for language in languages:
        chosen = translation(template, language)
        if chosen != fallback:
            groups.setdefault(chosen, []).append(language)
    if not groups:
        return _Translation(str(fallback[0]), [], "%s", [fallback[1]])
    ids, names, id_params, name_params = [], [], [], []
    for (pk, name), spoken in groups.items():
        marks = ", ".join(["%s"] * len(spoken))
        ids.append(f"WHEN c.language IN ({marks}) THEN {int(pk)}")
        names.append(f"WHEN c.language IN ({marks}) THEN %s")
        id_params += spoken
        name_params += [*spoken, name]
    return _Translation(
        f"CASE {' '.join(ids)} ELSE {int(fallback[0])} END",
        id_params,
        f"CASE {' '.join(names)} ELSE %s END",
        [*name_params, fallback[1]],
    )


# --- Local time: each contact at the send time's clock time in their own zone ------------------

#: The furthest a zone is ahead of UTC (Kiritimati) and behind it (Baker Island).
MOST_AHEAD, MOST_BEHIND = timedelta(hours=14), timedelta(hours=12)


def wall_time(campaign: Campaign) -> datetime:
    """The clock time a local-time campaign goes at: its send time as the site reads it."""
    site = localtime.zone_for(None, conf.site_timezone())
    return (campaign.send_at or timezone.now()).astimezone(site).replace(tzinfo=None)


def local_send_time(campaign: Campaign, zone_name: str) -> datetime:
    """When the campaign's clock time comes in a contact's zone (the site's if it has none
    or an unknown one), DST included."""
    wall = wall_time(campaign)
    tz = localtime.zone_for(zone_name, conf.site_timezone())
    return localtime.at_wall_time(wall.date(), wall.time(), tz)


def launch_time(campaign: Campaign) -> datetime | None:
    """When beat launches the campaign: its send time, or for a local-time send, when the
    first zone on Earth reaches its clock time (messages then wait for each zone's)."""
    if campaign.send_at is None:
        return None
    if not campaign.send_in_local_time:
        return campaign.send_at
    return wall_time(campaign).replace(tzinfo=UTC) - MOST_AHEAD


def _local_timing(campaign: Campaign, now: datetime) -> outbox.Timing:
    """Each contact's send time by their zone: queued now if it has passed (a Send now,
    or a launch that came late), else scheduled for it (beat releases it then)."""
    zones = sorted(Contact.objects.order_by().values_list("timezone", flat=True).distinct())
    fallback = local_send_time(campaign, "")
    groups: dict[datetime, list[str]] = {}
    for name in zones:
        at = local_send_time(campaign, name)
        if at != fallback:
            groups.setdefault(at, []).append(name)
    prep = Message._meta.get_field("send_after").get_db_prep_value
    stamp = prep(now, connection)
    branches = [(names, at) for at, names in sorted(groups.items())] + [(None, fallback)]
    status: list[tuple[str, list]] = []
    queued: list[tuple[str, list]] = []
    after: list[tuple[str, list]] = []
    for _names, at in branches:
        later = at > now
        status.append(("'scheduled'" if later else "'queued'", []))
        queued.append(("NULL", []) if later else ("%s", [stamp]))
        after.append(("%s", [prep(at, connection)]) if later else ("NULL", []))
    conditions = [names for names, _ in branches]
    status_sql, status_params = _zone_case(conditions, status)
    queued_sql, queued_params = _zone_case(conditions, queued)
    after_sql, after_params = _zone_case(conditions, after)
    return outbox.Timing(
        status_sql, status_params, queued_sql, queued_params, after_sql, after_params
    )


def _zone_case(conditions: list, values: list[tuple[str, list]]) -> tuple[str, list]:
    """CASE over the contact's zone: one branch per group of zones, the last the rest.
    Branches that all give the same value collapse to it (so NULL keeps its column type)."""
    if len({(sql, tuple(params)) for sql, params in values}) == 1:
        return values[-1]
    sql, params = "CASE", []
    for names, (value, value_params) in zip(conditions, values, strict=True):
        if names is None:
            sql += f" ELSE {value} END"
        else:
            sql += f" WHEN c.timezone IN ({', '.join(['%s'] * len(names))}) THEN {value}"
            params += names
        params += value_params
    return sql, params


def finish_campaigns(now: datetime | None = None, *, ids: list[int] | None = None) -> int:
    """Mark campaigns whose messages have all left as sent (or the test as done).

    Workers call it (``ids``) when a batch handled a campaign's last email; beat's
    housekeeping calls it for every running campaign, in case such a call was lost.
    """
    now = now or timezone.now()
    finished = 0
    pending = Message.objects.filter(status__in=MessageStatus.waiting())
    running = Campaign.objects.running()
    if ids is not None:
        running = running.filter(pk__in=ids)
    for campaign in running:
        if pending.filter(campaign=campaign).exists():
            continue
        try:
            if campaign.status == S.SENDING:
                transition(campaign, S.SENT, note="every message handled", finished_at=now)
            else:
                transition(
                    campaign, S.WAITING, note="test sent; waiting for the test window to end"
                )
        except CampaignError:
            continue  # another worker (or a person) moved it a moment ago
        finished += 1
    return finished


def launch_due(now: datetime | None = None) -> int:
    return sum(launch(pk, now=now) for pk in Campaign.objects.due(now).values_list("pk", flat=True))
