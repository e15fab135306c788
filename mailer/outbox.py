"""The outbox: every change to a Message row, and all of mailer's raw SQL.

A message moves queued → sending (claimed, with a lease) → tried (``attempted_at``, the
one moment an email may be in doubt) → sent / failed / queued again. Each move is one
statement here, with the PostgreSQL form beside its portable twin, so the two cannot
drift apart unseen. Nothing here decides *whether* to send; ``delivery`` does.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache

import psycopg
from django.db import IntegrityError, connection, transaction
from django.db.models import Case, F, OuterRef, Q, Subquery, Value, When, prefetch_related_objects
from django.utils import timezone

from . import conf, dispatch
from .models import (
    Campaign,
    CampaignStatus,
    Contact,
    Event,
    Kind,
    Message,
    MessageStatus,
    Queue,
    ReputationPause,
    Suppression,
)

logger = logging.getLogger(__name__)

S = MessageStatus


def postgres() -> bool:
    return connection.vendor == "postgresql"


def _run(sql: str, params: dict | list) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return max(cursor.rowcount, 0)


def _run_prepared(sql: str, params: dict) -> tuple | None:
    """Run a statement the worker repeats for every email as a prepared statement.

    Planning it each time costs PostgreSQL more than running it (~1 ms against ~0.2 ms).
    Django's cursors bind on the client, so this takes a psycopg 3 server-binding cursor
    on Django's own connection; errors still come out as Django's database errors.
    """
    connection.ensure_connection()
    raw = connection.connection
    if not isinstance(raw, psycopg.Connection):
        with connection.cursor() as cursor:  # another driver: plain execution
            cursor.execute(sql, params)
            return cursor.fetchone()
    started = time.monotonic()
    with connection.wrap_database_errors, psycopg.Cursor(raw) as cursor:
        cursor.execute(sql, params, prepare=True)
        row = cursor.fetchone()
    if connection.queries_logged:  # DEBUG and the test suite's query counts see it too
        connection.queries_log.append(
            {"sql": sql, "time": f"{time.monotonic() - started:.3f}", "prepared": True}
        )
    return row


# --- Adding ------------------------------------------------------------------------------


def add(message: Message) -> Message:
    """Insert one new message; with an idempotency key, the first one with it wins."""
    if message.idempotency_key is None:
        message.save(force_insert=True)  # one round trip: nothing here can conflict
        return message
    try:
        with transaction.atomic():
            message.save(force_insert=True)
    except IntegrityError:  # the same key, sent a moment ago by another request
        return Message.objects.get(idempotency_key=message.idempotency_key)
    return message


def contact_and_suppression(address: str) -> tuple[Contact | None, bool]:
    """The address's contact, and whether it is suppressed for all mail, in one query.

    The request path pays a round trip per query; the contact may not exist, so this is
    a LEFT JOIN from a one-row table rather than two ORM lookups.
    """
    quote = connection.ops.quote_name
    contacts, suppressions = quote(Contact._meta.db_table), quote(Suppression._meta.db_table)
    sql = (
        f"SELECT c.id, c.name, c.language, c.attributes, EXISTS ("  # noqa: S608 - table names only
        f"SELECT 1 FROM {suppressions} s WHERE s.email = %s AND s.scope = %s) "
        f"FROM (SELECT 1 AS one) AS one LEFT JOIN {contacts} c ON c.email = %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [address, Suppression.Scope.ALL, address])
        pk, name, language, attributes, suppressed = cursor.fetchone()
    if pk is None:
        return None, bool(suppressed)
    field = Contact._meta.get_field("attributes")
    contact = Contact(
        id=pk,
        email=address,
        name=name,
        language=language,
        attributes=field.from_db_value(attributes, None, connection) or {},
    )
    contact._state.adding, contact._state.db = False, connection.alias
    return contact, bool(suppressed)


# --- Claiming ----------------------------------------------------------------------------

# The CTE is materialized: a plain ``id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`` may
# be re-run by the planner as the inner side of a join and claim more than n rows. Rows
# are locked in id order, as every other bulk change here locks them, so two statements
# never wait on each other in a cycle.
_CLAIM_SQL = """
WITH due AS MATERIALIZED (
     SELECT id FROM mailer_message
      WHERE kind = ANY(%(kinds)s) AND status = 'queued'
        AND (send_after IS NULL OR send_after <= %(now)s) {running}
      ORDER BY id LIMIT %(size)s
        FOR UPDATE SKIP LOCKED)
UPDATE mailer_message AS m
   SET status = 'sending', claim_token = %(token)s, claimed_at = %(now)s, attempted_at = NULL
  FROM due
 WHERE m.id = due.id AND m.status = 'queued'
RETURNING m.*
"""
_RUNNING_SQL = (
    "AND (campaign_id IS NULL OR campaign_id IN "
    "(SELECT id FROM mailer_campaign WHERE status = ANY(%(running)s)))"
)


def marketing_paused() -> bool:
    """The reputation guard holds all marketing until a person lifts it."""
    return ReputationPause.objects.in_force().exists()


def claim(queue: str, size: int, token: uuid.UUID) -> list[Message]:
    """Move up to ``size`` due queued messages to sending under ``token``, oldest first.

    On the campaign queue only messages of running campaigns (or none) qualify, and
    nothing while the reputation guard holds marketing. The claim is a lease: the holder
    renews it (``renew``) or loses it to ``recover``.
    """
    queue = Queue(queue)
    campaign_queue = queue == Queue.CAMPAIGN
    if campaign_queue and marketing_paused():
        return []
    now = timezone.now()
    if postgres():
        # One statement (lock, mark, return the rows) instead of a transaction of three.
        params = {
            "token": token,
            "now": now,
            "kinds": list(queue.kinds),
            "size": size,
            "running": list(CampaignStatus.running()),
        }
        sql = _CLAIM_SQL.format(running=_RUNNING_SQL if campaign_queue else "")
        claimed = sorted(Message.objects.raw(sql, params), key=lambda m: m.pk)
    else:
        claimed = _claim_portable(queue, size, token, now)
    # Composing reads these for every email: one query each per batch, not per email.
    prefetch_related_objects(claimed, "contact", "campaign", "variant")
    return claimed


def _claim_portable(queue: Queue, size: int, token: uuid.UUID, now: datetime) -> list[Message]:
    campaign_queue = queue == Queue.CAMPAIGN
    due = Message.objects.for_queue(queue).filter(status=S.QUEUED)
    due = due.filter(Q(send_after__isnull=True) | Q(send_after__lte=now))
    if campaign_queue:
        running = CampaignStatus.running()
        due = due.filter(Q(campaign__isnull=True) | Q(campaign__status__in=running))
    with transaction.atomic():
        ids = list(
            due.order_by("id")
            .select_for_update(skip_locked=True, of=("self",))
            .values_list("id", flat=True)[:size]
        )
        if not ids:
            return []
        Message.objects.filter(pk__in=ids, status=S.QUEUED).update(
            status=S.SENDING, claim_token=token, claimed_at=now, attempted_at=None
        )
    return list(Message.objects.filter(pk__in=ids, claim_token=token).order_by("id"))


# Rows locked in id order, and never waited for: the one the worker is recording at
# this instant is renewed next time, and renewing can never deadlock with recording.
_RENEW_SQL = """
UPDATE mailer_message SET claimed_at = %(now)s
 WHERE id IN (SELECT id FROM mailer_message
               WHERE status = 'sending' AND claim_token = ANY(%(tokens)s)
               ORDER BY id FOR UPDATE SKIP LOCKED)
"""


def renew(tokens: list[uuid.UUID]) -> int:
    """Extend the lease on what a live worker holds; returns the rows renewed."""
    if not tokens:
        return 0
    now = timezone.now()
    if postgres():
        return _run(_RENEW_SQL, {"now": now, "tokens": list(tokens)})
    return Message.objects.filter(status=S.SENDING, claim_token__in=tokens).update(claimed_at=now)


def stopped_campaigns(campaign_ids: set[int]) -> set[int]:
    """Which of these campaigns may no longer send (paused, cancelled, guard)."""
    if not campaign_ids:
        return set()
    if marketing_paused():
        return set(campaign_ids)
    running = Campaign.objects.filter(pk__in=campaign_ids, status__in=CampaignStatus.running())
    return set(campaign_ids) - set(running.values_list("pk", flat=True))


# --- Trying and recording, one message at a time ------------------------------------------

# Record the previous email as sent (and its history event, for transactional mail) and
# mark the next one as tried, in one round trip: the outcome of each email is written
# before the next goes on the wire, so a crash leaves at most one email in doubt. The
# next one is tried only if the claim is still ours and its campaign may still send.
_TRY_SQL = """
WITH done AS (
    UPDATE mailer_message
       SET status = CASE WHEN status IN ('sending', 'queued', 'scheduled')
                         THEN 'sent' ELSE status END,
           sent_at = %(now)s, last_error = '', provider_message_id = %(pid)s
     WHERE id = %(done)s
 RETURNING id, kind, to_email, campaign_id
), history AS (
    INSERT INTO mailer_event (message_id, campaign_id, event_type, recipient, timestamp,
                              description, bounce, automated, automated_reason, data)
    SELECT id, campaign_id, 'sent', to_email, %(now)s, '', '', false, '', '{}'::jsonb
      FROM done WHERE kind = 'transactional'
)
UPDATE mailer_message AS m
   SET attempts = m.attempts + 1, attempted_at = %(now)s
 WHERE m.id = %(next)s AND m.status = 'sending' AND m.claim_token = %(token)s
   AND (m.campaign_id IS NULL OR EXISTS (
        SELECT 1 FROM mailer_campaign c WHERE c.id = m.campaign_id AND c.status = ANY(%(running)s)))
RETURNING m.id
"""


_RUNNING = [str(status) for status in CampaignStatus.running()]


@dataclass
class Sent:
    """An email the backend accepted whose row still says sending."""

    message: Message
    provider_id: str


def try_next(next_message: Message | None, token: uuid.UUID, *, done: Sent | None = None) -> bool:
    """Record ``done`` as sent and mark ``next_message`` tried; True if it may be sent.

    False means the claim was lost (recovered after an expired lease) or its campaign
    stopped: the caller must not send it.
    """
    now = timezone.now()
    if postgres():
        params = {
            "now": now,
            "done": done.message.pk if done else None,
            "pid": done.provider_id if done else "",
            "next": next_message.pk if next_message else None,
            "token": token,
            "running": _RUNNING,
        }
        tried = _run_prepared(_TRY_SQL, params) is not None
    else:
        with transaction.atomic():
            if done is not None:
                _record_sent_portable(done, now)
            tried = next_message is not None and bool(
                Message.objects.filter(pk=next_message.pk, status=S.SENDING, claim_token=token)
                .filter(Q(campaign__isnull=True) | Q(campaign__status__in=CampaignStatus.running()))
                .update(attempts=F("attempts") + 1, attempted_at=now)
            )
    if next_message is not None and tried:
        next_message.attempts += 1
        next_message.attempted_at = now
    if done is not None:
        done.message.status, done.message.sent_at = S.SENT, now
    return tried


def _record_sent_portable(done: Sent, now: datetime) -> None:
    message = done.message
    Message.objects.filter(pk=message.pk).update(
        status=Case(
            When(status__in=(S.SENDING, S.QUEUED, S.SCHEDULED), then=Value(S.SENT)),
            default=F("status"),
        ),
        sent_at=now,
        last_error="",
        provider_message_id=done.provider_id,
    )
    if message.kind == Kind.TRANSACTIONAL:
        Event.objects.create(
            message_id=message.pk,
            campaign_id=message.campaign_id,
            event_type=Event.Type.SENT,
            recipient=message.to_email,
            timestamp=now,
        )


def record_sent(done: Sent) -> None:
    """Record an accepted email when no other email follows it."""
    try_next(None, done.message.claim_token, done=done)


def record_failed(message: Message, error: str) -> None:
    """The recipient refused, the address is invalid, or the template cannot render."""
    logger.warning("mailer: message %s failed permanently: %s", message.pk, error)
    now = timezone.now()
    with transaction.atomic():
        Message.objects.filter(pk=message.pk, status=S.SENDING).update(
            status=S.FAILED, last_error=error[:2000], attempts=message.attempts
        )
        Event.objects.create(
            message_id=message.pk,
            campaign_id=message.campaign_id,
            event_type=Event.Type.FAILED,
            recipient=message.to_email,
            timestamp=now,
            description=error[:2000],
            data={"attempt": message.attempts},
        )
    message.status, message.last_error = S.FAILED, error[:2000]


def record_retry(
    message: Message,
    error: str,
    *,
    delay: float,
    max_countdown: float,
    attempts: int | None = None,
) -> str:
    """A transient failure of this one email: try again after ``delay`` seconds.

    Returns the status it now waits in: queued (the broker holds the wake-up) or
    scheduled (longer than the broker may hold a task: beat releases it).
    """
    now = timezone.now()
    send_after = now + timedelta(seconds=delay)
    status = S.QUEUED if delay <= max_countdown else S.SCHEDULED
    with transaction.atomic():
        Message.objects.filter(pk=message.pk, status=S.SENDING).update(
            status=status,
            last_error=error[:2000],
            send_after=send_after,
            queued_at=now,
            attempted_at=None,
            attempts=message.attempts if attempts is None else attempts,
        )
        Event.objects.create(
            message_id=message.pk,
            campaign_id=message.campaign_id,
            event_type=Event.Type.DEFERRED,
            recipient=message.to_email,
            timestamp=now,
            description=error[:2000],
            data={
                "attempt": message.attempts,
                "retry_at": send_after.isoformat(),
                "retry_in": round(delay, 3),
            },
        )
    message.status, message.send_after = status, send_after
    return status


def record_suppressed(messages: list[Message]) -> int:
    if not messages:
        return 0
    return Message.objects.filter(pk__in=[m.pk for m in messages], status=S.SENDING).update(
        status=S.SUPPRESSED, last_error="Address is suppressed."
    )


def release(
    messages: list[Message],
    token: uuid.UUID,
    *,
    delay: float = 0,
    uncount: bool = False,
    reason: str = "",
) -> int:
    """Hand claimed messages back untouched: the drain stopped, or its campaign did.

    A cancelled campaign's messages are cancelled instead (cancel skips rows a worker
    holds). ``uncount`` takes back the attempt of an email that never left because the
    server was unreachable: an outage makes mail wait, it never uses up its attempts.
    """
    if not messages:
        return 0
    now = timezone.now()
    ids = sorted(m.pk for m in messages)
    held = Message.objects.filter(pk__in=ids, status=S.SENDING, claim_token=token)
    with transaction.atomic():
        held.filter(campaign__status=CampaignStatus.CANCELLED).update(
            status=S.CANCELLED, claim_token=None, last_error="Campaign cancelled."
        )
        fields = {
            "status": S.QUEUED,
            "claim_token": None,
            "attempted_at": None,
            "send_after": now + timedelta(seconds=delay) if delay else None,
        }
        if reason:
            fields["last_error"] = f"Waiting: {reason}"[:2000]
        if uncount:
            fields["attempts"] = Case(
                When(attempts__gt=0, attempted_at__isnull=False, then=F("attempts") - 1),
                default=F("attempts"),
                output_field=Message._meta.get_field("attempts"),
            )
        return held.update(**fields)


# --- Waking, retrying and recovering -----------------------------------------------------


def release_due(queue: str | None = None, limit: int = 10_000) -> tuple[int, set[Queue]]:
    """Scheduled messages whose time has come become queued: how many, and their queues."""
    now = timezone.now()
    due = Message.objects.due(now)
    if queue is not None:
        due = due.for_queue(queue)
    rows = list(due.order_by("id").values_list("id", "kind")[:limit])
    if not rows:
        return 0, set()
    count = Message.objects.filter(pk__in=[pk for pk, _ in rows], status=S.SCHEDULED).update(
        status=S.QUEUED, queued_at=now
    )
    return count, {Queue.for_kind(kind) for _, kind in rows}


RECOVERED_UNTRIED = "Recovered from a worker that stopped before trying it; queued again."
RECOVERED_IN_DOUBT = "The worker stopped while sending; the email may or may not have left."


@dataclass
class Recovery:
    untried: int = 0  # claimed, never tried: queued again, attempt not counted
    in_doubt_requeued: int = 0  # tried, outcome unknown: sent again (STUCK_POLICY=retry)
    in_doubt_failed: int = 0  # tried, outcome unknown: failed for a person to decide
    queues: set[Queue] = field(default_factory=set)  # queues that now have mail to send

    def total(self) -> int:
        return self.untried + self.in_doubt_requeued + self.in_doubt_failed


def recover(lease: float, *, policy: str, max_attempts: int, queue: str | None = None) -> Recovery:
    """Take back the claims of workers that stopped renewing their lease.

    Each recovered message gets an event saying what happened, so the history survives
    the next send.
    """
    now = timezone.now()
    stuck = Message.objects.stuck_sending(lease, now)
    if queue is not None:
        stuck = stuck.for_queue(queue)
    result = Recovery()
    rows = {
        row[0]: row
        for row in stuck.order_by("id").values_list(
            "id", "kind", "attempted_at", "attempts", "to_email", "campaign_id"
        )
    }
    if not rows:
        return result
    untried = [pk for pk, row in rows.items() if row[2] is None]
    doubt = [pk for pk, row in rows.items() if row[2] is not None]
    retry = [pk for pk in doubt if policy == "retry" and rows[pk][3] < max_attempts]
    fail = sorted(set(doubt) - set(retry))
    with transaction.atomic():
        if untried:
            result.untried = stuck.filter(pk__in=untried, attempted_at__isnull=True).update(
                status=S.QUEUED, claim_token=None, queued_at=now, send_after=None
            )
        if retry:
            result.in_doubt_requeued = stuck.filter(pk__in=retry).update(
                status=S.QUEUED,
                claim_token=None,
                queued_at=now,
                send_after=None,
                attempted_at=None,
                last_error=f"{RECOVERED_IN_DOUBT} Sent again (STUCK_POLICY=retry).",
            )
        if fail:
            note = (
                "Not sent again (STUCK_POLICY=fail); retry by hand."
                if policy != "retry"
                else "Gave up: attempts exhausted."
            )
            result.in_doubt_failed = stuck.filter(pk__in=fail).update(
                status=S.FAILED, claim_token=None, last_error=f"{RECOVERED_IN_DOUBT} {note}"
            )
        again, failed = f"{RECOVERED_IN_DOUBT} Sent again.", f"{RECOVERED_IN_DOUBT} Failed."
        described = [(pk, RECOVERED_UNTRIED, Event.Type.DEFERRED) for pk in untried]
        described += [(pk, again, Event.Type.DEFERRED) for pk in retry]
        described += [(pk, failed, Event.Type.FAILED) for pk in fail]
        Event.objects.bulk_create(
            Event(
                message_id=pk,
                campaign_id=rows[pk][5],
                recipient=rows[pk][4],
                event_type=event_type,
                timestamp=now,
                description=text,
                data={"recovered": "untried" if pk in untried else "in doubt"},
            )
            for pk, text, event_type in described
        )
    result.queues = {Queue.for_kind(rows[pk][1]) for pk in [*untried, *retry]}
    return result


def lost_queues(lease: float, queues: list[Queue]) -> set[Queue]:
    """Queues with due messages nobody claimed for ``lease`` seconds (a kick was lost)."""
    lost = Message.objects.lost_in_queue(lease).filter(
        Q(campaign__isnull=True) | Q(campaign__status__in=CampaignStatus.running())
    )
    return {queue for queue in queues if lost.for_queue(queue).exists()}


# --- Beat's entry points: change rows, then wake the workers that should act on them -----


def wake_due(queue: str | None = None) -> int:
    """Release scheduled messages whose time has come and wake their queues."""
    count, queues = release_due(queue)
    for name in queues:
        dispatch.kick(name)
    return count


def recover_stuck(queue: str | None = None) -> dict[str, int]:
    """Recover lapsed claims, and wake workers for them or for lost kicks.

    The log line counts what was really done, by kind of recovery.
    """
    queues = [Queue(queue)] if queue else list(Queue)
    recovery = recover(
        float(conf.get("SENDING_LEASE")),
        policy=conf.get("STUCK_POLICY"),
        max_attempts=int(conf.get("MAX_ATTEMPTS")),
        queue=queue,
    )
    counts = {
        "untried": recovery.untried,
        "in_doubt_requeued": recovery.in_doubt_requeued,
        "in_doubt_failed": recovery.in_doubt_failed,
        "kicked": 0,
    }
    if recovery.total():
        logger.error(
            "mailer: recovered %d claims of a stopped worker: %d untried queued again, "
            "%d in doubt sent again, %d in doubt failed",
            recovery.total(),
            recovery.untried,
            recovery.in_doubt_requeued,
            recovery.in_doubt_failed,
        )
    for name in recovery.queues | lost_queues(float(conf.get("QUEUED_LEASE")), queues):
        counts["kicked"] += int(dispatch.kick(name))
    return counts


def requeue(queryset) -> int:
    """Put failed or cancelled messages back in the queue (the admin's retry action);
    their workers are woken when the transaction commits."""
    now = timezone.now()
    ids = list(queryset.retryable().order_by("id").values_list("id", flat=True))
    count = (
        Message.objects.filter(pk__in=ids)
        .retryable()
        .update(
            status=S.QUEUED,
            attempts=0,
            send_after=None,
            queued_at=now,
            last_error="",
            claim_token=None,
            attempted_at=None,
        )
    )
    kinds = set(Message.objects.filter(pk__in=ids).values_list("kind", flat=True))
    for queue in {Queue.for_kind(kind) for kind in kinds}:
        dispatch.kick_on_commit(queue)
    return count


# --- Cancelling ----------------------------------------------------------------------------

CANCEL_CHUNK = 5_000

_CANCEL_CHUNK_SQL = """
WITH target AS MATERIALIZED (
     SELECT id FROM mailer_message
      WHERE campaign_id = %(campaign)s AND status IN ('queued', 'scheduled')
      ORDER BY id LIMIT %(size)s
        FOR UPDATE SKIP LOCKED)
UPDATE mailer_message AS m SET status = 'cancelled', last_error = %(note)s
  FROM target WHERE m.id = target.id
"""


def cancel_campaign_messages(campaign_id: int, note: str = "Campaign cancelled.") -> int:
    """Cancel a campaign's unsent messages in id-ordered chunks, skipping held rows.

    Call it after the campaign's own status is committed: a worker then refuses to try
    anything of it, and releases what it holds as cancelled. Each chunk is its own short
    transaction, so a million-message cancel never holds locks a worker waits on.
    """
    total = 0
    while True:
        if postgres():
            count = _run(
                _CANCEL_CHUNK_SQL, {"campaign": campaign_id, "size": CANCEL_CHUNK, "note": note}
            )
        else:
            with transaction.atomic():
                ids = list(
                    Message.objects.filter(campaign_id=campaign_id, status__in=S.unsent())
                    .order_by("id")
                    .values_list("id", flat=True)[:CANCEL_CHUNK]
                )
                count = Message.objects.filter(pk__in=ids, status__in=S.unsent()).update(
                    status=S.CANCELLED, last_error=note
                )
        total += count
        if count < CANCEL_CHUNK:
            return total


def cancel_waiting_marketing(address: str) -> int:
    """Cancel queued or scheduled campaign and drip messages to a suppressed address."""
    return Message.objects.filter(
        to_email=address, kind__in=Kind.marketing(), status__in=S.unsent()
    ).update(status=S.CANCELLED, last_error="Address suppressed.")


# --- Materializing a campaign's recipients -------------------------------------------------


def analyze_audience_tables() -> None:
    """ANALYZE the tables an audience reads (PostgreSQL; ~0.3 s at a million contacts).

    Contacts imported minutes ago may have no statistics yet, and without them the
    planner nests loops over each chunk's id ranges: quadratic in the chunk size.
    """
    if not postgres():
        return
    tables = (Contact, Contact.tags.through, Suppression)
    names = ", ".join(connection.ops.quote_name(t._meta.db_table) for t in tables)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {names}")


@dataclass
class Columns:
    """SQL fragments choosing each recipient's variant and template (integers only)."""

    variant: str
    template: str
    slug: str
    language: str
    params: list


def insert_campaign_messages(
    campaign_id: int, columns: Columns, ids_sql: str, ids_params: list, condition: str, now
) -> int:
    """INSERT … SELECT one queued message per contact id the audience query yields.

    ON CONFLICT DO NOTHING on (campaign, contact): running it twice adds nobody twice.
    """
    uuid_sql = "gen_random_uuid()" if postgres() else "lower(hex(randomblob(16)))"
    # Only integers and fixed SQL fragments are formatted in; values are parameters.
    sql = f"""
        INSERT INTO mailer_message (
            uuid, kind, status, to_email, contact_id, template_id, campaign_id, variant_id,
            template_slug, language, context, metadata, subject, attempts, last_error,
            provider_message_id, created_at, queued_at, updated_at
        )
        SELECT {uuid_sql}, 'campaign', 'queued', c.email, c.id, {columns.template}, %s,
               {columns.variant}, {columns.slug}, {columns.language}, '{{}}', '{{}}', '', 0,
               '', '', %s, %s, %s
        FROM mailer_contact c
        WHERE c.id IN ({ids_sql}) AND c.id > %s AND c.id <= %s AND {condition}
        ON CONFLICT DO NOTHING
    """  # noqa: S608
    return _run(sql, [campaign_id, *columns.params, now, now, now, *ids_params])


# --- What events do to a message --------------------------------------------------------------

#: Status a message takes from an event, and its rank: a status only moves to a higher
#: rank. The final ones (failed < bounced < complained) outrank any engagement.
EVENT_STATUS = {
    Event.Type.DELIVERED: S.DELIVERED,
    Event.Type.OPENED: S.OPENED,
    Event.Type.CLICKED: S.CLICKED,
    Event.Type.REJECTED: S.FAILED,
    Event.Type.FAILED: S.FAILED,
    Event.Type.BOUNCED: S.BOUNCED,
    Event.Type.COMPLAINED: S.COMPLAINED,
}
RANK = {
    S.SCHEDULED: 0,
    S.QUEUED: 0,
    S.SENDING: 0,
    S.SENT: 1,
    S.DELIVERED: 2,
    S.OPENED: 3,
    S.CLICKED: 4,
    S.FAILED: 10,
    S.BOUNCED: 11,
    S.COMPLAINED: 12,
}

#: The message column that keeps when each kind of event first happened (see Message).
FIRST_AT = {
    Event.Type.DELIVERED: "delivered_at",
    Event.Type.OPENED: "opened_at",
    Event.Type.CLICKED: "clicked_at",
    Event.Type.BOUNCED: "bounced_at",
    Event.Type.COMPLAINED: "complained_at",
}


def apply_event(message_id: int, event_type: str, timestamp: datetime) -> None:
    """Move the status forward and keep the event's first time: one UPDATE per event.

    The earliest time wins and the status only climbs, so replayed or reordered events
    leave the same row. Only events by people come here (not scanners' opens/clicks).
    """
    sql = _apply_sql(event_type)
    if sql is None:
        return
    params: list = []
    status = EVENT_STATUS.get(event_type)
    if status is not None:
        params += [*_lower_ranks(status), status]
    column = FIRST_AT.get(event_type)
    if column is not None:
        at = Message._meta.get_field(column).get_db_prep_value(timestamp, connection)
        params += [at, at]
    _run(sql, [*params, message_id])


def _lower_ranks(status: str) -> list[str]:
    return [s for s, rank in RANK.items() if rank < RANK[status]]


@cache
def _apply_sql(event_type: str) -> str | None:
    """The UPDATE for one event type, built once (Django's CASE expressions cost about a
    millisecond of CPU to compile per event)."""
    quote = connection.ops.quote_name
    sets = []
    status = EVENT_STATUS.get(event_type)
    if status is not None:
        marks = ", ".join(["%s"] * len(_lower_ranks(status)))
        sets.append(f"status = CASE WHEN status IN ({marks}) THEN %s ELSE status END")
    column = FIRST_AT.get(event_type)
    if column is not None:
        col = quote(column)
        sets.append(f"{col} = CASE WHEN {col} IS NULL OR {col} > %s THEN %s ELSE {col} END")
    if not sets:
        return None
    table = quote(Message._meta.db_table)
    return f"UPDATE {table} SET {', '.join(sets)} WHERE id = %s"  # noqa: S608


def restamp(message_id: int, event_type: str) -> None:
    """Recompute a first-event time after some of the message's events were re-flagged."""
    first = (
        Event.objects.filter(message=OuterRef("pk"), event_type=event_type, automated=False)
        .order_by("timestamp")
        .values("timestamp")[:1]
    )
    Message.objects.filter(pk=message_id).update(**{FIRST_AT[event_type]: Subquery(first)})


def insert_event_once(event: Event) -> bool:
    """Insert unless an event with the same provider id exists: one round trip.

    ``INSERT … ON CONFLICT DO NOTHING RETURNING id`` (PostgreSQL, SQLite ≥ 3.35) instead
    of a transaction around a create that may fail; a webhook batch of hundreds of events
    spends most of its time in round trips.
    """
    fields = [f for f in Event._meta.concrete_fields if not f.primary_key]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column) for f in fields)
    marks = ", ".join(["%s"] * len(fields))
    values = [f.get_db_prep_save(f.pre_save(event, add=True), connection) for f in fields]
    table = quote(Event._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING RETURNING id",  # noqa: S608
            values,
        )
        row = cursor.fetchone()
    if row is None:
        return False
    event.pk = row[0]
    event._state.adding = False
    return True
