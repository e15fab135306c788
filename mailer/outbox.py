"""The outbox: every change to a Message row, and all of mailer's raw SQL.

A message moves queued → sending (claimed under a token, whose ``Claim`` row holds the
lease and how far the worker got) → sent / failed / queued again. Each move is one
statement here, with the PostgreSQL form beside its portable twin, so the two cannot
drift apart unseen. Nothing here decides *whether* to send; ``delivery`` does.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import uuid
import weakref
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache

import psycopg
from django.db import IntegrityError, connection, transaction
from django.db.models import (
    Case,
    Exists,
    F,
    OuterRef,
    Q,
    Subquery,
    Value,
    When,
    prefetch_related_objects,
)
from django.utils import timezone

from . import conf, dispatch, notify, quota
from .models import (
    Campaign,
    CampaignStatus,
    Claim,
    Contact,
    Enrollment,
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


def _run_prepared(sql: str, params: tuple, *, many: bool = False):
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
            return cursor.fetchall() if many else cursor.fetchone()
    cursor = _prepared_cursors.get(raw)
    if cursor is None or cursor.closed:
        cursor = _prepared_cursors[raw] = psycopg.Cursor(raw)
    started = time.monotonic()
    with connection.wrap_database_errors:
        cursor.execute(sql, params, prepare=True)
        row = cursor.fetchall() if many else cursor.fetchone()
    if connection.queries_logged:  # DEBUG and the test suite's query counts see it too
        connection.queries_log.append(
            {"sql": sql, "time": f"{time.monotonic() - started:.3f}", "prepared": True}
        )
    return row


#: One server-binding cursor per psycopg connection, gone with the connection.
_prepared_cursors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def add_many(messages: list[Message]) -> list[Message]:
    """Insert new messages together; those with an idempotency key one by one (the first
    with a key wins, as in ``add``). Returns the stored rows in the same order."""
    plain = [m for m in messages if m.idempotency_key is None]
    if plain:
        Message.objects.bulk_create(plain, batch_size=500)
    return [add(m) if m.idempotency_key is not None else m for m in messages]


def by_idempotency_key(keys: list[str]) -> dict[str, Message]:
    """The messages already stored under these idempotency keys, by key (one query)."""
    if not keys:
        return {}
    return {m.idempotency_key: m for m in Message.objects.filter(idempotency_key__in=keys)}


def contacts_and_suppressions(addresses: set[str]) -> dict[str, tuple[Contact | None, bool]]:
    """For each address, its contact and whether it is suppressed for all mail: two
    queries for any number of addresses (a batch of sends)."""
    if not addresses:
        return {}
    contacts = {
        c.email: c
        for c in Contact.objects.filter(email__in=addresses).only(
            "id", "email", "name", "language", "attributes"
        )
    }
    suppressed = set(
        Suppression.objects.filter(email__in=addresses, scope=Suppression.Scope.ALL).values_list(
            "email", flat=True
        )
    )
    return {a: (contacts.get(a), a in suppressed) for a in addresses}


# --- Claiming ----------------------------------------------------------------------------

# The CTE is materialized: a plain ``id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`` may
# be re-run by the planner as the inner side of a join and claim more than n rows. Rows
# are locked in id order, as every other bulk change here locks them, so two statements
# never wait on each other in a cycle. The Claim row is written in the same statement:
# a claimed message always has one.
_CLAIM_SQL = """
WITH due AS MATERIALIZED (
     SELECT id FROM mailer_message
      WHERE kind = ANY(%(kinds)s) AND status = 'queued'
        AND (send_after IS NULL OR send_after <= %(now)s) {running}
      ORDER BY id LIMIT %(size)s
        FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE mailer_message AS m
       SET status = 'sending', claim_token = %(token)s, claimed_at = %(now)s
      FROM due
     WHERE m.id = due.id AND m.status = 'queued'
 RETURNING {columns}
), hold AS (
    INSERT INTO mailer_claim (token, queue, renewed_at, created_at)
    SELECT %(token)s, %(queue)s, %(now)s, %(now)s WHERE EXISTS (SELECT 1 FROM claimed)
)
SELECT * FROM claimed
"""
_RUNNING_SQL = (
    "AND (campaign_id IS NULL OR campaign_id IN "
    "(SELECT id FROM mailer_campaign WHERE status = ANY(%(running)s)))"
)
_RUNNING = [str(status) for status in CampaignStatus.running()]
# What sending reads, and no more: each timestamp column costs Django's loader ~15 µs a
# row, and a claimed batch is read for every email. The rest load on access (deferred).
_CLAIMED_COLUMNS = ", ".join(
    f"m.{name}"
    for name in (
        "id", "uuid", "kind", "status", "to_email", "contact_id", "campaign_id",
        "variant_id", "template_slug", "language", "context", "metadata", "attempts",
        "claim_token", "queued_at",
    )
)  # fmt: skip


def marketing_paused() -> bool:
    """The reputation guard holds all marketing until a person lifts it."""
    return ReputationPause.objects.in_force().exists()


def claim(queue: str, size: int, token: uuid.UUID) -> list[Message]:
    """Move up to ``size`` due queued messages to sending under ``token``, oldest first.

    On the campaign queue only messages of running campaigns (or none) qualify, and
    nothing while the reputation guard holds marketing. Nothing either while one of the
    queue's quotas is used up: its mail waits as it is, instead of being claimed and
    handed back batch after batch. The claim is a lease: the holder renews it (``renew``)
    or loses it to ``recover``.
    """
    queue = Queue(queue)
    campaign_queue = queue == Queue.CAMPAIGN
    if campaign_queue and marketing_paused():
        return []
    if quota.holding(queue) is not None:
        return []
    now = timezone.now()
    if postgres():
        # One statement (lock, mark, hold, return the rows) instead of a transaction.
        params = {
            "token": token,
            "now": now,
            "queue": str(queue),
            "kinds": list(queue.kinds),
            "size": size,
            "running": _RUNNING,
        }
        sql = _CLAIM_SQL.format(
            running=_RUNNING_SQL if campaign_queue else "", columns=_CLAIMED_COLUMNS
        )
        claimed = sorted(Message.objects.raw(sql, params), key=lambda m: m.pk)
    else:
        claimed = _claim_portable(queue, size, token, now)
    # Composing reads these for every email: one query each per batch, not per email.
    prefetch_related_objects(claimed, "contact", "campaign", "variant")
    attach_tested_campaigns(claimed)
    return claimed


def attach_tested_campaigns(messages: list[Message]) -> None:
    """Give each test email (a campaign's "Send a test") the campaign it tests, whose
    sender and Reply-To it carries, as ``tested_campaign``: one query, only when a batch
    holds such an email. Its ``campaign`` stays empty: it is not one of the recipients."""
    tests = {
        m: m.metadata["test_of_campaign"]
        for m in messages
        if m.campaign_id is None and isinstance(m.metadata, dict) and m.metadata.get("test")
    }
    if not tests:
        return
    found = Campaign.objects.in_bulk({pk for pk in tests.values() if isinstance(pk, int)})
    for message, pk in tests.items():
        message.tested_campaign = found.get(pk)


def _claim_portable(queue: Queue, size: int, token: uuid.UUID, now: datetime) -> list[Message]:
    due = Message.objects.for_queue(queue).filter(status=S.QUEUED)
    due = due.filter(Q(send_after__isnull=True) | Q(send_after__lte=now))
    if queue == Queue.CAMPAIGN:
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
            status=S.SENDING, claim_token=token, claimed_at=now
        )
        Claim.objects.create(token=token, queue=queue, renewed_at=now, created_at=now)
    return list(Message.objects.filter(pk__in=ids, claim_token=token).order_by("id"))


def renew(tokens: list[uuid.UUID]) -> int:
    """Extend the lease on what a live worker holds; returns the claims renewed."""
    if not tokens:
        return 0
    return Claim.objects.filter(token__in=tokens).update(renewed_at=timezone.now())


def stopped_campaigns(campaign_ids: set[int]) -> set[int]:
    """Which of these campaigns may no longer send (paused, cancelled, guard)."""
    if not campaign_ids:
        return set()
    if marketing_paused():
        return set(campaign_ids)
    running = Campaign.objects.filter(pk__in=campaign_ids, status__in=CampaignStatus.running())
    return set(campaign_ids) - set(running.values_list("pk", flat=True))


def campaigns_done(campaign_ids: set[int]) -> list[int]:
    """Which of these running campaigns have no message left waiting to be sent.

    A worker asks at the end of each batch, after writing it, so the campaign's status
    follows within seconds: one indexed NOT EXISTS on (campaign, status) per campaign.
    """
    if not campaign_ids:
        return []
    waiting = Message.objects.filter(campaign_id=OuterRef("pk"), status__in=S.waiting())
    done = Campaign.objects.filter(pk__in=campaign_ids, status__in=CampaignStatus.running())
    return sorted(done.filter(~Exists(waiting)).values_list("pk", flat=True))


# --- Trying, one email at a time --------------------------------------------------------------

# Before each email goes on the wire, one small row says how far the worker got: the
# previous email was sent (sent_through) and this one is being tried (tried_through),
# if the claim is still this worker's and the email's campaign may still send. So at any
# moment at most one email is in doubt; the messages' rows are updated once per batch.
_TRY_SQL = """
UPDATE mailer_claim
   SET sent_through = COALESCE(%s::bigint, sent_through),
       tried_through = CASE
           WHEN %s::bigint IS NOT NULL AND (%s::bigint IS NULL OR EXISTS (
                SELECT 1 FROM mailer_campaign
                 WHERE id = %s::bigint AND status IN ({running})))
           THEN %s::bigint ELSE tried_through END
 WHERE token = %s
RETURNING tried_through
""".format(running=", ".join(f"'{status}'" for status in _RUNNING))  # noqa: S608 - constants


@dataclass
class Sent:
    """An email the backend accepted, recorded on its row when the batch ends."""

    message: Message
    provider_id: str


def try_next(next_message: Message | None, token: uuid.UUID, *, done: Sent | None = None) -> bool:
    """Note ``done`` as sent and ``next_message`` as tried; True if it may be sent.

    False means the claim was lost (recovered after its lease lapsed) or the email's
    campaign stopped: the caller must not send it.
    """
    done_id = done.message.pk if done else None
    next_id = next_message.pk if next_message else None
    campaign_id = next_message.campaign_id if next_message else None
    if postgres():
        # Positional and no array: binding costs more than the statement here.
        params = (done_id, next_id, campaign_id, campaign_id, next_id, token)
        row = _run_prepared(_TRY_SQL, params)
    else:
        row = _try_portable(token, done_id, next_id, campaign_id)
    tried = next_id is not None and row is not None and row[0] == next_id
    if tried:
        next_message.attempts += 1
    return tried


def _try_portable(token, done_id, next_id, campaign_id) -> tuple | None:
    with transaction.atomic():
        hold = Claim.objects.select_for_update().filter(token=token).first()
        if hold is None:
            return None
        if done_id is not None:
            hold.sent_through = done_id
        may_send = campaign_id is None or (
            Campaign.objects.filter(pk=campaign_id, status__in=CampaignStatus.running()).exists()
        )
        if next_id is not None and may_send:
            hold.tried_through = next_id
        Claim.objects.filter(token=token).update(
            sent_through=hold.sent_through, tried_through=hold.tried_through
        )
    return (hold.tried_through,)


# --- Many lanes' notes in one statement ---------------------------------------------------

_TRY_MANY_SQL = """
UPDATE mailer_claim AS c
   SET sent_through = COALESCE(v.done, c.sent_through),
       tried_through = CASE
           WHEN v.campaign IS NULL OR EXISTS (
                SELECT 1 FROM mailer_campaign
                 WHERE id = v.campaign AND status IN ({running}))
           THEN v.next ELSE c.tried_through END
  FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[], %s::bigint[])
       AS v(token, done, next, campaign)
 WHERE c.token = v.token
RETURNING c.token, c.tried_through
""".format(running=", ".join(f"'{status}'" for status in _RUNNING))  # noqa: S608 - constants


def try_many(notes: list[tuple[Message, uuid.UUID, Sent | None]]) -> list[bool]:
    """try_next for the notes of several claims (a pool's lanes) in one statement, so the
    database commits them together; each claim has at most one note here."""
    if not postgres() or len(notes) == 1:
        return [try_next(message, token, done=done) for message, token, done in notes]
    params = (
        [token for _, token, _ in notes],
        [done.message.pk if done else None for _, _, done in notes],
        [message.pk for message, _, _ in notes],
        [message.campaign_id for message, _, _ in notes],
    )
    tried_through = dict(_run_prepared(_TRY_MANY_SQL, params, many=True))
    answers = []
    for message, token, _ in notes:
        tried = tried_through.get(token) == message.pk
        if tried:
            message.attempts += 1
        answers.append(tried)
    return answers


# --- The same note, sent ahead ------------------------------------------------------------

# The worker sends the note for an email before composing it and reads the answer just
# before the email goes on the wire, so PostgreSQL's round trip overlaps the rendering.
# It travels on a connection of its own (autocommit, the statement prepared once), as
# Django's connection is used meanwhile. The guarantee is the same: nothing is sent
# before its note is committed.
_NOTE_NAME = b"mailer_try_next"
_NOTE_SQL = _TRY_SQL
for _n in range(1, 7):
    _NOTE_SQL = _NOTE_SQL.replace("%s", f"${_n}", 1)
NOTE_TIMEOUT = 10.0  # seconds without an answer before the note is sent again


class Note:
    """A note under way; ``result()`` says whether the email may be sent (see try_next)."""

    def __init__(
        self, next_message: Message, token: uuid.UUID, done: Sent | None, *, ahead: bool = True
    ):
        self.next_message, self.token, self.done = next_message, token, done
        self._tried: bool | None = None
        self._notes = _notes() if ahead and _can_send_ahead() else None
        if self._notes is not None:
            params = (done.message.pk if done else None, next_message.pk)
            params += (next_message.campaign_id,) * 2 + (next_message.pk, token)
            if not self._notes.send(params):
                self._notes = None

    def result(self) -> bool:
        """Wait for the answer; on any trouble, the note is written again the plain way."""
        if self._tried is None:
            value = self._notes.read() if self._notes is not None else _NO_ANSWER
            self._notes = None
            if value is _NO_ANSWER:
                self._tried = try_next(self.next_message, self.token, done=self.done)
            else:
                self._tried = value == str(self.next_message.pk)
                if self._tried:
                    self.next_message.attempts += 1
        return self._tried


_NO_ANSWER = object()


def _can_send_ahead() -> bool:
    # Inside a transaction the claim is not visible to another connection (tests, or a
    # host draining in atomic()): the note then goes the plain way.
    return (
        postgres()
        and not connection.in_atomic_block
        and isinstance(connection.connection, psycopg.Connection)
    )


class _Notes:
    """This thread's connection for claim notes."""

    def __init__(self):
        self.conn: psycopg.Connection | None = None
        self.pid = os.getpid()
        self.retry_at = 0.0  # after a failure, the plain way for a while

    def send(self, params: tuple) -> bool:
        if self.conn is None and time.monotonic() < self.retry_at:
            return False
        try:
            if self.conn is None or self.conn.closed:
                self._connect()
            pgconn = self.conn.pgconn
            pgconn.send_query_prepared(
                _NOTE_NAME, [None if value is None else str(value).encode() for value in params]
            )
            while pgconn.flush():  # 1 while bytes are left to send
                self._wait(write=True)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            self._drop(exc)
            return False
        if connection.queries_logged:  # DEBUG and the suite's query counts see it too
            connection.queries_log.append({"sql": _TRY_SQL, "time": "0.000", "ahead": True})
        return True

    def read(self):
        """The answer's tried_through as text, None for no row, or _NO_ANSWER."""
        try:
            pgconn, answer = self.conn.pgconn, None
            while True:  # every result up to the end of the query, the first is ours
                pgconn.consume_input()
                while pgconn.is_busy():
                    self._wait(write=False)
                    pgconn.consume_input()
                result = pgconn.get_result()
                if result is None:
                    break
                if answer is None:
                    answer = result
            if answer is None or answer.status != psycopg.pq.ExecStatus.TUPLES_OK:
                message = answer.error_message.decode(errors="replace") if answer else ""
                raise psycopg.OperationalError(message or "no answer to the claim note")
            if not answer.ntuples:
                return None
            value = answer.get_value(0, 0)
            return None if value is None else value.decode()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            self._drop(exc)
            return _NO_ANSWER

    def _connect(self) -> None:
        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        params["connect_timeout"] = params.get("connect_timeout") or int(NOTE_TIMEOUT)
        conn = psycopg.connect(**params, autocommit=True)
        prepared = conn.pgconn.prepare(_NOTE_NAME, _NOTE_SQL.encode())
        if prepared.status != psycopg.pq.ExecStatus.COMMAND_OK:
            conn.close()
            raise psycopg.OperationalError(prepared.error_message.decode(errors="replace"))
        self.conn = conn

    def _wait(self, *, write: bool) -> None:
        fileno = self.conn.pgconn.socket
        readable, writable = ([], [fileno]) if write else ([fileno], [])
        if not any(select.select(readable, writable, [], NOTE_TIMEOUT)):
            raise TimeoutError(f"no answer to the claim note in {NOTE_TIMEOUT:.0f} s")

    def _drop(self, exc: Exception) -> None:
        logger.info("mailer: claim notes go the plain way once (%s)", exc.__class__.__name__)
        if self.conn is not None:
            with suppress(Exception):
                self.conn.close()
        self.conn, self.retry_at = None, time.monotonic() + 5.0


_local = threading.local()


def _notes() -> _Notes:
    notes = getattr(_local, "notes", None)
    if notes is None or notes.pid != os.getpid():
        # A forked child must not touch (or, by closing, end) its parent's session.
        if notes is not None and notes.conn is not None:
            _inherited.append(notes.conn)
        notes = _local.notes = _Notes()
    return notes


def close_notes() -> None:
    """Close this thread's note connection (a drain ends; Django closes its own too)."""
    notes = getattr(_local, "notes", None)
    if notes is not None and notes.pid == os.getpid() and notes.conn is not None:
        with suppress(Exception):
            notes.conn.close()
        notes.conn = None


#: Connections a forked process inherited: kept, never used or closed.
_inherited: list = []


# --- Recording what happened --------------------------------------------------------------

_RECORD_SENT_SQL = """
UPDATE mailer_message AS m
   SET status = CASE WHEN m.status IN ('sending', 'queued', 'scheduled')
                     THEN 'sent' ELSE m.status END,
       sent_at = v.at, last_error = '', provider_message_id = v.pid,
       attempts = m.attempts + 1
  FROM unnest(%(ids)s::bigint[], %(pids)s::text[], %(ats)s::timestamptz[]) AS v(id, pid, at)
 WHERE m.id = v.id
"""


@dataclass
class Batch:
    """What one batch did, written to the messages' rows when it ends."""

    token: uuid.UUID
    sent: list[tuple[Sent, datetime]] = field(default_factory=list)


def finish(
    batch: Batch,
    untried: list[Message],
    *,
    delay: float = 0,
    reason: str = "",
    uncount: list[Message] | None = None,
) -> int:
    """Write a batch's outcome in one transaction and drop its claim.

    Sent emails become ``sent`` (keeping a status a webhook already moved on, and even if
    recovery took the claim back meanwhile: they did leave), with a ``sent`` event for
    transactional mail; what was not tried goes back to the queue (after ``delay``,
    saying ``reason``). Returns how many went back.
    """
    with transaction.atomic():
        _record_sent(batch)
        released = release(untried, batch.token, delay=delay, reason=reason)
        released += release(uncount or [], batch.token, delay=delay, reason=reason)
        Claim.objects.filter(token=batch.token).delete()
    return released


def _record_sent(batch: Batch) -> None:
    if not batch.sent:
        return
    if postgres():
        # Django's form is a CASE with one WHEN per message: ~0.25 ms of CPU each.
        _run(
            _RECORD_SENT_SQL,
            {
                "ids": [done.message.pk for done, _ in batch.sent],
                "pids": [done.provider_id for done, _ in batch.sent],
                "ats": [at for _, at in batch.sent],
            },
        )
    else:
        for done, at in batch.sent:
            Message.objects.filter(pk=done.message.pk).update(
                status=Case(
                    When(status__in=(S.SENDING, S.QUEUED, S.SCHEDULED), then=Value(S.SENT)),
                    default=F("status"),
                ),
                sent_at=at,
                last_error="",
                provider_message_id=done.provider_id,
                attempts=F("attempts") + 1,
            )
    # The history of transactional mail; campaign mail has sent_at (a million rows spared).
    Event.objects.bulk_create(
        Event(
            message_id=done.message.pk,
            event_type=Event.Type.SENT,
            recipient=done.message.to_email,
            timestamp=at,
        )
        for done, at in batch.sent
        if done.message.kind == Kind.TRANSACTIONAL
    )
    for done, at in batch.sent:
        done.message.status, done.message.sent_at = S.SENT, at
    notify.sent((done.message, at) for done, at in batch.sent)


def record_sent(done: Sent) -> None:
    """Record one accepted email at once (outside a worker's batch)."""
    _record_sent(Batch(token=done.message.claim_token, sent=[(done, timezone.now())]))


def record_failed(message: Message, error: str) -> None:
    """The recipient refused, the address is invalid, or the template cannot render."""
    logger.warning("mailer: message %s failed permanently: %s", message.pk, error)
    now = timezone.now()
    with transaction.atomic():
        moved = Message.objects.filter(pk=message.pk, status=S.SENDING).update(
            status=S.FAILED, last_error=error[:2000], attempts=message.attempts
        )
        event = _history(message, Event.Type.FAILED, now, error, {"attempt": message.attempts})
        if moved:
            notify.failed(message, event, error)
    message.status, message.last_error = S.FAILED, error[:2000]


def record_retry(message: Message, error: str, *, delay: float, max_countdown: float) -> str:
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
            claim_token=None,
            attempts=message.attempts,
        )
        data = {"attempt": message.attempts, "retry_at": send_after.isoformat()}
        _history(message, Event.Type.DEFERRED, now, error, data | {"retry_in": round(delay, 3)})
    message.status, message.send_after = status, send_after
    return status


def _history(message: Message, event_type: str, at: datetime, text: str, data: dict) -> Event:
    return Event.objects.create(
        message_id=message.pk,
        campaign_id=message.campaign_id,
        event_type=event_type,
        recipient=message.to_email,
        timestamp=at,
        description=text[:2000],
        data=data,
    )


def record_suppressed(messages: list[Message]) -> int:
    if not messages:
        return 0
    return Message.objects.filter(pk__in=[m.pk for m in messages], status=S.SENDING).update(
        status=S.SUPPRESSED, last_error="Address is suppressed.", claim_token=None
    )


def release(
    messages: list[Message], token: uuid.UUID, *, delay: float = 0, reason: str = ""
) -> int:
    """Hand claimed messages back untouched: the drain stopped, or its campaign did.

    A cancelled campaign's messages are cancelled instead (cancel skips rows a worker
    holds). Attempts are counted only for emails that left or failed, so an outage or a
    stop never uses them up.
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
            "send_after": now + timedelta(seconds=delay) if delay else None,
        }
        if reason:
            fields["last_error"] = f"Waiting: {reason}"[:2000]
        return held.update(**fields)


def defer(held: dict[int, tuple[datetime, str]], token: uuid.UUID) -> int:
    """Hand claimed messages back scheduled for later, saying why (the frequency cap):
    beat releases each when its time comes. Attempts are not counted."""
    moved = 0
    for pk, (until, why) in sorted(held.items()):
        moved += Message.objects.filter(pk=pk, status=S.SENDING, claim_token=token).update(
            status=S.SCHEDULED, claim_token=None, send_after=until, last_error=why[:2000]
        )
    return moved


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


RECOVERED_SENT = "Sent before its worker stopped; recorded by recovery."
RECOVERED_UNTRIED = "Recovered from a worker that stopped before trying it; queued again."
RECOVERED_IN_DOUBT = "The worker stopped while sending; the email may or may not have left."


@dataclass
class Recovery:
    sent: int = 0  # left before the worker stopped: recorded as sent
    untried: int = 0  # claimed, never tried: queued again, attempt not counted
    in_doubt_requeued: int = 0  # tried, outcome unknown: sent again (STUCK_POLICY=retry)
    in_doubt_failed: int = 0  # tried, outcome unknown: failed for a person to decide
    queues: set[Queue] = field(default_factory=set)  # queues that now have mail to send

    def total(self) -> int:
        return self.sent + self.untried + self.in_doubt_requeued + self.in_doubt_failed


def recover(lease: float, *, policy: str, max_attempts: int, queue: str | None = None) -> Recovery:
    """Take back the claims of workers that stopped renewing their lease.

    A claim says how far its worker got: its messages up to ``sent_through`` left, those
    past that up to ``tried_through`` are in doubt (one email; one call's emails for an
    ESP's batch endpoint; ``policy`` decides), the rest were never tried. Each recovered
    message gets an event saying what happened, so the history survives the next send.
    """
    now = timezone.now()
    cutoff = now - timedelta(seconds=lease)
    lapsed = Claim.objects.filter(renewed_at__lt=cutoff)
    if queue is not None:
        lapsed = lapsed.filter(queue=queue)
    result = Recovery()
    for hold in lapsed.order_by("created_at")[:1000]:
        with transaction.atomic():
            _recover_claim(hold, now, policy, max_attempts, result)
    # Claims from before claim rows existed (or a row deleted by hand): in doubt.
    orphans = Message.objects.stuck_sending(lease, now).exclude(
        claim_token__in=Claim.objects.values("token")
    )
    if queue is not None:
        orphans = orphans.for_queue(queue)
    orphan_ids = list(orphans.order_by("id").values_list("id", flat=True)[:10_000])
    if orphan_ids:
        with transaction.atomic():
            rows = _rows(Message.objects.filter(pk__in=orphan_ids, status=S.SENDING))
            _resolve(rows, sent=[], doubt=list(rows), untried=[], now=now, policy=policy,
                     max_attempts=max_attempts, result=result)  # fmt: skip
    return result


def _rows(queryset) -> dict[int, tuple]:
    fields = ("id", "kind", "attempts", "to_email", "campaign_id")
    return {row[0]: row for row in queryset.order_by("id").values_list(*fields)}


def _recover_claim(hold: Claim, now, policy: str, max_attempts: int, result: Recovery) -> None:
    rows = _rows(Message.objects.filter(claim_token=hold.token, status=S.SENDING))
    sent_through = hold.sent_through or 0
    tried = hold.tried_through
    # One email, or the emails of one ESP batch call: those still in sending between the
    # last one noted sent and the last one noted tried (what failed or was skipped in
    # between was written at once, and is no longer in sending).
    doubt = [pk for pk in rows if tried is not None and sent_through < pk <= tried]
    sent = [pk for pk in rows if pk <= sent_through]
    untried = [pk for pk in rows if pk not in set(doubt) and pk > sent_through]
    _resolve(rows, sent=sent, doubt=doubt, untried=untried, now=now, policy=policy,
             max_attempts=max_attempts, result=result)  # fmt: skip
    Claim.objects.filter(token=hold.token).delete()


def _resolve(rows, *, sent, doubt, untried, now, policy, max_attempts, result) -> None:
    retry = [pk for pk in doubt if policy == "retry" and rows[pk][2] + 1 < max_attempts]
    fail = sorted(set(doubt) - set(retry))
    messages = Message.objects.filter(status=S.SENDING)
    if sent:
        result.sent += messages.filter(pk__in=sent).update(
            status=S.SENT, sent_at=now, claim_token=None, attempts=F("attempts") + 1
        )
    if untried:
        result.untried += messages.filter(pk__in=untried).update(
            status=S.QUEUED, claim_token=None, queued_at=now, send_after=None
        )
    if retry:
        result.in_doubt_requeued += messages.filter(pk__in=retry).update(
            status=S.QUEUED,
            claim_token=None,
            queued_at=now,
            send_after=None,
            attempts=F("attempts") + 1,
            last_error=f"{RECOVERED_IN_DOUBT} Sent again (STUCK_POLICY=retry).",
        )
    if fail:
        note = (
            "Not sent again (STUCK_POLICY=fail); retry by hand."
            if policy != "retry"
            else "Gave up: attempts exhausted."
        )
        result.in_doubt_failed += messages.filter(pk__in=fail).update(
            status=S.FAILED,
            claim_token=None,
            attempts=F("attempts") + 1,
            last_error=f"{RECOVERED_IN_DOUBT} {note}",
        )
    again, failed = f"{RECOVERED_IN_DOUBT} Sent again.", f"{RECOVERED_IN_DOUBT} Failed."
    described = [(pk, RECOVERED_SENT, Event.Type.SENT, "sent") for pk in sent]
    described += [(pk, RECOVERED_UNTRIED, Event.Type.DEFERRED, "untried") for pk in untried]
    described += [(pk, again, Event.Type.DEFERRED, "in doubt") for pk in retry]
    described += [(pk, failed, Event.Type.FAILED, "in doubt") for pk in fail]
    Event.objects.bulk_create(
        Event(
            message_id=pk,
            campaign_id=rows[pk][4],
            recipient=rows[pk][3],
            event_type=event_type,
            timestamp=now,
            description=text,
            data={"recovered": what},
        )
        for pk, text, event_type, what in described
    )
    result.queues |= {Queue.for_kind(rows[pk][1]) for pk in [*untried, *retry]}


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
        "sent": recovery.sent,
        "untried": recovery.untried,
        "in_doubt_requeued": recovery.in_doubt_requeued,
        "in_doubt_failed": recovery.in_doubt_failed,
        "kicked": 0,
    }
    if recovery.total():
        logger.error(
            "mailer: recovered %d messages of stopped workers: %d had left (recorded sent), "
            "%d untried queued again, %d in doubt sent again, %d in doubt failed",
            recovery.total(),
            recovery.sent,
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
class Timing:
    """SQL fragments (with their parameters) for when each recipient's message goes:
    its status, queued_at and send_after. Default: queued now."""

    status: str = "'queued'"
    status_params: list = field(default_factory=list)
    queued_at: str = "%s"
    queued_at_params: list | None = None  # None: [now]
    send_after: str = "NULL"
    send_after_params: list = field(default_factory=list)


@dataclass
class Columns:
    """SQL fragments choosing each recipient's variant, template (and translation), and
    when it goes; ``params`` are the slug's then the language's."""

    variant: str
    template: str
    slug: str
    language: str
    params: list
    template_params: list = field(default_factory=list)
    timing: Timing | None = None


def insert_campaign_messages(
    campaign_id: int, columns: Columns, ids_sql: str, ids_params: list, condition: str, now
) -> int:
    """INSERT … SELECT one message per contact id the audience query yields: queued, or
    scheduled for the contact's own time (``columns.timing``).

    ON CONFLICT DO NOTHING on (campaign, contact): running it twice adds nobody twice.
    """
    uuid_sql = "gen_random_uuid()" if postgres() else "lower(hex(randomblob(16)))"
    timing = columns.timing or Timing()
    queued_params = [now] if timing.queued_at_params is None else timing.queued_at_params
    # Only integers and fixed SQL fragments are formatted in; values are parameters.
    sql = f"""
        INSERT INTO mailer_message (
            uuid, kind, status, to_email, contact_id, template_id, campaign_id, variant_id,
            template_slug, language, context, metadata, subject, attempts, last_error,
            provider_message_id, created_at, queued_at, updated_at, send_after
        )
        SELECT {uuid_sql}, 'campaign', {timing.status}, c.email, c.id, {columns.template}, %s,
               {columns.variant}, {columns.slug}, {columns.language}, '{{}}', '{{}}', '', 0,
               '', '', %s, {timing.queued_at}, %s, {timing.send_after}
        FROM mailer_contact c
        WHERE c.id IN ({ids_sql}) AND c.id > %s AND c.id <= %s AND {condition}
        ON CONFLICT DO NOTHING
    """  # noqa: S608
    params = [
        *timing.status_params,
        *columns.template_params,
        campaign_id,
        *columns.params,
        now,
        *queued_params,
        now,
        *timing.send_after_params,
        *ids_params,
    ]
    return _run(sql, params)


# --- Drip enrollments: their steps' messages, bulk moves, SQL entries ------------------------


def add_drip_messages(messages: list[Message]) -> int:
    """Insert drip steps' messages; one per (enrollment, step) ever, so a step run twice
    (a redelivered tick, a restart) adds nothing the second time. Returns how many."""
    if not messages:
        return 0
    before = len(messages)
    created = Message.objects.bulk_create(messages, batch_size=1000, ignore_conflicts=True)
    return len(created) if created is not None else before


def cancel_enrollment_messages(enrollment_ids: list[int], note: str) -> int:
    """Cancel the unsent messages of enrollments a marketer removed."""
    if not enrollment_ids:
        return 0
    return Message.objects.filter(enrollment_id__in=enrollment_ids, status__in=S.unsent()).update(
        status=S.CANCELLED, last_error=note[:2000]
    )


#: The columns a tick writes back to each enrollment it advanced.
ENROLLMENT_COLUMNS = (
    "state", "next_position", "next_due_at", "step_id", "step_started_at", "last_step_at",
    "exited_at", "exit_reason", "note",
)  # fmt: skip

_ENROLLMENTS_SQL = """
UPDATE mailer_enrollment AS e
   SET state = v.state, next_position = v.next_position, next_due_at = v.next_due_at,
       step_id = v.step_id, step_started_at = v.step_started_at,
       last_step_at = v.last_step_at, exited_at = v.exited_at, exit_reason = v.exit_reason,
       note = v.note, updated_at = %s
  FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::timestamptz[], %s::bigint[],
              %s::timestamptz[], %s::timestamptz[], %s::timestamptz[], %s::text[], %s::text[])
       AS v(id, state, next_position, next_due_at, step_id, step_started_at, last_step_at,
            exited_at, exit_reason, note)
 WHERE e.id = v.id
"""


def update_enrollments(rows: list[tuple], now: datetime) -> int:
    """Write what a tick decided: ``rows`` are (id, *ENROLLMENT_COLUMNS) tuples; one
    statement on PostgreSQL however many."""
    if not rows:
        return 0
    if postgres():
        columns = list(zip(*rows, strict=True))
        return _run(_ENROLLMENTS_SQL, [now, *[list(column) for column in columns]])
    for pk, *values in rows:
        Enrollment.objects.filter(pk=pk).update(
            updated_at=now, **dict(zip(ENROLLMENT_COLUMNS, values, strict=True))
        )
    return len(rows)


def insert_enrollments(
    series_id: int, ids_sql: str, ids_params: list, *, now: datetime, source: str, key: str | None
) -> int:
    """INSERT … SELECT one active enrollment per contact id ``ids_sql`` yields, due now.

    ON CONFLICT DO NOTHING: a contact already in the series (or already enrolled under
    ``key``, an anniversary's year) is left as it is.
    """
    sql = f"""
        INSERT INTO mailer_enrollment (
            series_id, contact_id, state, next_position, next_due_at, entered_at, updated_at,
            exit_reason, source, key, data, note
        )
        SELECT %s, c.id, 'active', 0, %s, %s, %s, '', %s, %s, '{{}}', ''
        FROM mailer_contact c
        WHERE c.id IN ({ids_sql})
        ON CONFLICT DO NOTHING
    """  # noqa: S608 - the ids query is Django's, values are parameters
    at = Enrollment._meta.get_field("entered_at").get_db_prep_value(now, connection)
    return _run(sql, [series_id, at, at, at, source[:120], key, *ids_params])


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
