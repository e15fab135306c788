"""The worker's loop: drain a queue batch by batch, and send one claimed batch.

Delivery is at-least-once from the broker and effectively once at the recipient: a
worker sends only messages it claimed under its own token, marks each one tried before
it goes on the wire and records its outcome before the next one does, so a crash leaves
at most one email in doubt per connection (one call's emails, for an ESP's batch endpoint).
Faults of infrastructure make mail wait: an unreachable server or rate-limit store, or a
lost database connection, hands unsent claims back or waits for the service, and never
fails a message.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from queue import Empty, SimpleQueue

import redis
from django.db import DatabaseError, InterfaceError, OperationalError, transaction
from django.db import connection as db_connection
from django.utils import timezone

from . import (
    compose,
    conf,
    counters,
    dispatch,
    frequency,
    outbox,
    quota,
    ratelimit,
    redact,
    throttle,
    transport,
)
from .exceptions import PermanentSendError, SendError, ServiceUnavailable, Throttled
from .mime import PreparedEmail
from .models import Message, Queue, Suppression

logger = logging.getLogger(__name__)

#: How often a worker re-reads its campaigns' state while sending a batch (the try
#: statement also refuses a stopped campaign's email, so this only saves work).
STATE_CHECK_SECONDS = 1.0

#: Marks campaigns whose last email a batch handled as sent (``campaigns.finish_campaigns``).
FINISH_TASK = "mailer.tasks.finish_campaigns"

#: A stop request counts this long; a pool child signalled alone then carries on.
STOP_VALID_SECONDS = 60.0

_DB_DOWN = (OperationalError, InterfaceError)


# --- Stopping ------------------------------------------------------------------------------

_stop_at: float | None = None


def request_stop() -> None:
    """Warm shutdown: stop claiming, finish the email on the wire, hand back the rest.

    It runs in a signal handler, sometimes inside itself (the signal to the process group
    and the one the main process forwards arrive together): so it only sets a value, and
    never takes a lock a handler it interrupted might hold.
    """
    global _stop_at
    _stop_at = time.monotonic()


def stopping() -> bool:
    global _stop_at
    if _stop_at is None:
        return False
    if time.monotonic() - _stop_at > STOP_VALID_SECONDS:
        _stop_at = None
        return False
    return True


def clear_stop() -> None:
    """Forget a stop request (a process that carries on, and tests)."""
    global _stop_at
    _stop_at = None


def _pause(seconds: float) -> bool:
    """Sleep, waking within a tenth of a second of a stop request; True if cut short."""
    deadline = time.monotonic() + seconds
    while not stopping():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(left, 0.1))
    return True


# --- Holding claims and waiting for services --------------------------------------------------


class Leases:
    """Renews the lease on every claim a drain holds from one background thread while
    they are sent, so a live worker never loses a claim and a dead one's lapse within
    the lease. A pool's connections share it: one renewal statement for all."""

    def __init__(self):
        self.every = max(1.0, float(conf.get("SENDING_LEASE")) / 3)
        self._tokens: set[uuid.UUID] = set()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def hold(self, token: uuid.UUID):
        with self._lock:
            self._tokens.add(token)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mailer-lease", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._tokens.discard(token)

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while not self._done.wait(self.every):
                with self._lock:
                    tokens = list(self._tokens)
                if not tokens:
                    continue
                try:
                    outbox.renew(tokens)
                except DatabaseError as exc:
                    logger.warning("mailer: could not renew a lease: %s", exc.__class__.__name__)
                    db_connection.close()
        finally:
            db_connection.close()  # this thread's own connection


def with_database(action, *args, **kwargs):
    """Run a database action, waiting for a lost database with bounded backoff.

    After DATABASE_WAIT seconds the error goes up: the claims left in sending are then
    recovered when their lease lapses.
    """
    deadline = time.monotonic() + float(conf.get("DATABASE_WAIT"))
    delay = 0.25
    while True:
        try:
            return action(*args, **kwargs)
        except _DB_DOWN as exc:
            if time.monotonic() > deadline:
                raise
            logger.warning(
                "mailer: database unavailable (%s); trying again in %.1f s",
                exc.__class__.__name__,
                delay,
            )
            db_connection.close()  # Django reconnects on the next query
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class Database:
    """Where a drain's database work runs.

    One connection to the server: inline. A pool: on one thread of its own, so forty
    SMTP connections share one database connection (PostgreSQL allows about a hundred
    in all) and their statements never interleave.
    """

    def __init__(self, *, shared: bool = False):
        self.shared = shared
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mailer-db") if shared else None
        self._notes: SimpleQueue = SimpleQueue()

    def __call__(self, action, *args, **kwargs):
        if self._executor is None:
            return with_database(action, *args, **kwargs)
        return self._executor.submit(with_database, action, *args, **kwargs).result()

    def note(self, message: Message, token: uuid.UUID, done: outbox.Sent | None):
        """The claim note for an email: sent ahead on one lane; in a pool, written when
        read, together with whatever notes the other lanes are waiting for."""
        if self._executor is None:
            return with_database(outbox.Note, message, token, done)
        return _GroupNote(self, message, token, done)

    def read(self, note) -> bool:
        """Whether the noted email may go (see outbox.try_next)."""
        if self._executor is None:
            return with_database(note.result)
        return note.result()

    def _wait_for_group(self, note: _GroupNote) -> bool:
        answer: Future = Future()
        self._notes.put((note, answer))
        self._executor.submit(self._write_notes)
        return answer.result()

    def _write_notes(self) -> None:
        waiting = []
        while True:
            try:
                waiting.append(self._notes.get_nowait())
            except Empty:
                break
        if not waiting:
            return  # an earlier run wrote them
        try:
            answers = with_database(
                outbox.try_many, [(n.message, n.token, n.done) for n, _ in waiting]
            )
        except Exception as exc:  # noqa: BLE001 - each lane gets the error as its own
            for _, answer in waiting:
                answer.set_exception(exc)
            return
        for (_, answer), tried in zip(waiting, answers, strict=True):
            answer.set_result(tried)

    def call(self, action, *args, **kwargs):
        """Run where the database work runs, without waiting out a database outage."""
        if self._executor is None:
            return action(*args, **kwargs)
        return self._executor.submit(action, *args, **kwargs).result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.submit(_close_connections).result()
            self._executor.shutdown()


class _GroupNote:
    """A pool lane's claim note, written with the other lanes' in one statement."""

    def __init__(self, db: Database, message: Message, token: uuid.UUID, done):
        self.db, self.message, self.token, self.done = db, message, token, done
        self._tried: bool | None = None

    def result(self) -> bool:
        if self._tried is None:
            self._tried = self.db._wait_for_group(self)
        return self._tried


def _close_connections() -> None:
    outbox.close_notes()
    db_connection.close()


class Limiter:
    """The queue's shared rate limit and quotas, reserved a few sends at a time.

    When the rate-limit store is unreachable sending waits for it (it never goes
    unlimited, and never fails mail); after RATE_STORE_WAIT seconds the batch is handed
    back. When a quota is used up, ``held`` says until when and why, and the rest of the
    batch waits for that window.
    """

    def __init__(
        self,
        queue: Queue,
        batch: int,
        db: Database | None = None,
        speed: throttle.Speed = throttle.FULL,
        quota_step: int | None = None,
        lanes: int = 1,
    ):
        self.queue, self.db = queue, db or Database()
        self.rate = speed.rate(conf.rate_limit(queue))
        # A pool's lanes reserve a share each: tokens a lane holds while it waits are
        # lost to the rate if the drain ends first.
        self.step = max(1, ratelimit.chunk_size(queue, batch) // lanes)
        self.quota_step = quota_step  # None: no quota applies
        self.left = batch  # sends this batch may still ask for
        self.reserved = 0
        self.held: quota.Grant | None = None

    def take(self) -> bool:
        """Wait for one send's token; False if the batch must stop instead."""
        if self.rate is None and self.quota_step is None:
            return True
        if self.reserved == 0 and not self._reserve():
            return False
        self.reserved -= 1
        self.left -= 1
        return True

    def _reserve(self) -> bool:
        want = max(1, min(self.step, self.left))
        if self.quota_step is not None:
            grant = self._from_store(quota.reserve, min(want, self.quota_step))
            if grant is None:
                return False
            if not grant.granted:
                self.held = grant
                return False
            want = grant.granted
        if self.rate is not None:
            wait = self._from_store(ratelimit.reserve, want, rate=self.rate)
            if wait:
                counters.add(_waited(self.queue, wait))
            if wait is None or (wait > 0 and _pause(wait)):
                return False
        self.reserved = want
        return True

    def _from_store(self, reserve, count: int, **kwargs):
        deadline = time.monotonic() + float(conf.get("RATE_STORE_WAIT"))
        delay = 0.25
        while not stopping():
            try:
                return self.db.call(reserve, self.queue, count, **kwargs)
            except (redis.RedisError, DatabaseError) as exc:
                if time.monotonic() > deadline:
                    logger.error("mailer: rate-limit store still down; handing the batch back")
                    return None
                logger.warning(
                    "mailer: rate-limit store unavailable (%s); %s mail waits",
                    exc.__class__.__name__,
                    self.queue,
                )
                if isinstance(exc, DatabaseError):
                    self.db.call(db_connection.close)
                if _pause(delay):
                    return None
                delay = min(delay * 2, 2.0)
        return None


def _waited(queue: Queue, seconds: float) -> dict[str, float]:
    label = {"queue": str(queue)}
    return {
        counters.series("mailer_rate_limit_waits_total", label): 1,
        counters.series("mailer_rate_limit_wait_seconds_total", label): round(seconds, 6),
    }


# --- Draining a queue -----------------------------------------------------------------------


def batch_size(queue: Queue, lanes: int = 1) -> int:
    """BATCH_SIZE (a pool lane's share of it), or fewer: all lanes together never hold
    more claims than about five seconds of the rate."""
    size = int(conf.get("BATCH_SIZE"))
    if lanes > 1:  # a lane's share, not less than LANE_CLAIM: a claim is not paid per email
        size = max(size // lanes, min(LANE_CLAIM, size))
    rate = conf.rate_limit(queue)
    return size if rate is None else max(1, min(size, int(rate * 5 / lanes)))


#: A pool's lanes claim FIRST_CLAIM at first, twice as many while claims come back full,
#: up to their share of BATCH_SIZE (at least LANE_CLAIM): a few due emails spread over
#: the lanes, and the last claims of a campaign do not leave most lanes idle.
FIRST_CLAIM = 10
LANE_CLAIM = 25
#: Seconds before a drain that found no free connection slot looks again.
SLOT_WAIT = 2


class Shared:
    """What the lanes of one drain share: the database thread, the lease renewer, a
    connection to the server per lane, and the queue's state (its speed after a server
    asked us to slow down, its quota chunk), read at most once a second."""

    def __init__(self, queue: Queue, *, lanes: int = 1):
        self.queue, self.lanes = queue, lanes
        pooled = lanes > 1
        self.db = Database(shared=pooled)
        self.leases = Leases()
        self.links = compose.LinkCache(self.db if pooled else None)
        self._speed: tuple[float, throttle.Speed] = (-1.0, throttle.FULL)
        self._quota: dict[int, tuple[float, int | None]] = {}

    def speed(self) -> throttle.Speed:
        read_at, speed = self._speed
        if time.monotonic() - read_at > STATE_CHECK_SECONDS:
            speed = self.db(throttle.speed, self.queue)
            self._speed = (time.monotonic(), speed)
        return speed

    def quota_step(self, batch: int) -> int | None:
        """How many sends to reserve at once from the quotas (None: no quota applies).
        Warm-up schedules are rows: read where the database work runs."""
        read_at, step = self._quota.get(batch, (-1.0, None))
        if time.monotonic() - read_at > STATE_CHECK_SECONDS:
            step = self.db.call(quota.chunk_size, self.queue, batch)
            self._quota[batch] = (time.monotonic(), step)
        return step

    def close(self) -> None:
        self.leases.close()
        self.db.close()
        if not self.db.shared:
            outbox.close_notes()


def drain(queue: str = Queue.TRANSACTIONAL) -> int:
    """Send the due messages of a queue batch by batch; hand over after DRAIN_SECONDS.

    With CONNECTIONS above 1 the queue is drained by that many lanes at once, each with
    its own connection to the server and its own claims, sharing one database thread:
    the waiting for the server overlaps, the CPU per email stays the same. Returns how
    many emails were sent.
    """
    queue = Queue(queue)
    # Inside a transaction (a host draining in atomic(), or a test) the claims are not
    # visible to another connection: one lane, on this one.
    lanes = 1 if db_connection.in_atomic_block else conf.connections(queue)
    deadline = time.monotonic() + float(conf.get("DRAIN_SECONDS"))
    shared = Shared(queue, lanes=lanes)
    try:
        if lanes == 1:
            total, more = _lane(shared, deadline, batch_size(queue), 0, 1)
        else:
            total, more = _pool(shared, lanes, deadline)
    finally:
        shared.close()
    if more is not None:
        # Hand over to a fresh task; on shutdown a few seconds later, to another worker,
        # so a process told to stop never spins on its own wake-ups.
        dispatch.kick(queue, countdown=more)
    return total


def _pool(shared: Shared, lanes: int, deadline: float):
    size = batch_size(shared.queue, lanes)
    with ThreadPoolExecutor(lanes, thread_name_prefix=f"mailer-{shared.queue}") as pool:
        futures = [pool.submit(_lane, shared, deadline, size, lane, lanes) for lane in range(lanes)]
    outcomes = [future.result() for future in futures]  # a lane's error goes up here
    total = sum(sent for sent, _ in outcomes)
    waits = [more for _, more in outcomes if more is not None]
    return total, (max(waits) if waits else None)


def _lane(
    shared: Shared, deadline: float, size: int, lane: int, lanes: int
) -> tuple[int, float | None]:
    """Claim and send batches until the queue is empty, the deadline or a stop, over a
    connection of its own.

    Returns how many were sent and when the queue should be looked at again (None: it
    is empty, or this lane is idle while the queue is throttled; 0: at once).
    """
    queue, total, sender = shared.queue, 0, transport.Sender()
    claim = size if lanes == 1 else min(size, FIRST_CLAIM)
    holder = uuid.uuid4().hex  # this lane's slot under MAX_OPEN_CONNECTIONS
    try:
        while not stopping() and time.monotonic() < deadline:
            if lane and lane >= shared.speed().connections(lanes):
                return total, None  # the server asked us to slow down: fewer connections
            if not ratelimit.take_connection_slot(holder):
                # Every connection the backend allows us is open elsewhere: look again
                # in a moment, unless other lanes of this drain carry on meanwhile.
                return total, SLOT_WAIT
            if lane == 0:
                dispatch.clear_kick(queue)
            token = uuid.uuid4()
            batch = shared.db(outbox.claim, queue, claim, token)
            if not batch:
                return total, None
            if len(batch) == claim:
                if lane == 0:
                    dispatch.kick(queue)  # more is waiting: an idle worker process may help
                claim = min(size, claim * 2)
            result = send_batch(
                batch, queue, token=token, deadline=deadline, shared=shared, sender=sender
            )
            total += result.sent
            if result.wait:
                # The server is unreachable: the batch waits, and so does this lane.
                return total, result.wait
        return total, (5 if stopping() else 0)
    finally:
        sender.close()
        ratelimit.release_connection_slot(holder)


# --- Sending one batch --------------------------------------------------------------------


@dataclass
class BatchResult:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    suppressed: int = 0
    released: int = 0
    wait: float = 0.0  # seconds to wait before trying the server again (an outage)
    outage: str = ""  # why
    countdowns: set[int] = field(default_factory=set)  # when retried emails fall due


def suppressed_addresses(addresses: list[str], queue: str) -> set[str]:
    """Which of these addresses must not get this queue's mail (one query)."""
    scopes = [Suppression.Scope.ALL]
    if queue != Queue.TRANSACTIONAL:
        scopes.append(Suppression.Scope.MARKETING)
    return set(
        Suppression.objects.filter(email__in=addresses, scope__in=scopes).values_list(
            "email", flat=True
        )
    )


def hold_capped(messages: list[Message], token: uuid.UUID) -> set[int]:
    """Campaign emails whose contact has had the frequency cap's worth of marketing mail
    today or this week go back, scheduled for the first day with room; the rest are sent.
    Nothing to do (no query) without a cap."""
    if not conf.frequency_cap():
        return set()
    with transaction.atomic():
        held = frequency.hold_capped(messages)
        outbox.defer(held, token)
    return set(held)


def provider_id(email: PreparedEmail) -> str:
    status = getattr(email, "anymail_status", None)
    if status is not None and status.message_id not in (None, ""):  # 0 is an id too
        return str(status.message_id)
    return email.message_id


def send_batch(
    messages: list[Message],
    queue: str,
    *,
    token: uuid.UUID | None = None,
    deadline: float | None = None,
    shared: Shared | None = None,
    sender: transport.Sender | None = None,
) -> BatchResult:
    """Send messages claimed under ``token``, noting each outcome before the next email.

    Before an email goes on the wire, its claim notes the previous one as sent and this
    one as tried (for an ESP's batch endpoint: the previous call's emails and this
    call's); failures and skips are written at once; the sent emails' rows are written
    when the batch ends. What is not tried (a stop request, the deadline, an outage) is
    handed back to the queue untouched.
    """
    queue = Queue(queue)
    token = token or (messages[0].claim_token if messages else None)
    result = BatchResult()
    if not messages:
        return result
    if shared is None or sender is None:  # a batch sent on its own
        own, sender = shared is None, sender or transport.Sender()
        shared = shared or Shared(queue)
        try:
            return send_batch(
                messages, queue, token=token, deadline=deadline, shared=shared, sender=sender
            )
        finally:
            sender.close()
            if own:
                shared.close()
    db = shared.db
    if queue == Queue.CAMPAIGN:
        held = db(hold_capped, messages, token)
        if held:
            result.released += len(held)
            messages = [m for m in messages if m.pk not in held]
    run = _Run(
        messages=messages,
        queue=queue,
        token=token,
        deadline=deadline,
        shared=shared,
        sender=sender,
        result=result,
        blocked=db(suppressed_addresses, [m.to_email for m in messages], queue),
        limiter=Limiter(
            queue,
            len(messages),
            db,
            shared.speed(),
            shared.quota_step(len(messages)),
            lanes=shared.lanes,
        ),
        stopped=db(outbox.stopped_campaigns, {m.campaign_id for m in messages} - {None}),
    )
    chunk = transport.batch_limit()
    with shared.leases.hold(token):
        try:
            if chunk > 1:
                _in_chunks(run, chunk)
            else:
                _one_by_one(run)
        finally:
            run.batch.sent.extend(run.pending)
            result.released += db(
                outbox.finish,
                run.batch,
                run.untried,
                delay=result.wait,
                reason=result.outage,
                uncount=run.uncount,
            )
    for countdown in sorted(result.countdowns):
        dispatch.kick(queue, countdown=countdown)
    # The batch is written: if it held the last emails of a campaign, mark it sent now
    # rather than at the next housekeeping (a task, since campaigns sit above delivery).
    done = db(outbox.campaigns_done, {m.campaign_id for m in messages} - {None})
    if done:
        dispatch.enqueue(FINISH_TASK, args=(done,))
    counters.add(_figures(queue, len(messages), result, run.batch.sent))
    if result.sent or result.failed or result.retried:
        logger.info(
            "mailer: %s batch of %d: %d sent, %d retrying, %d failed, %d suppressed, "
            "%d handed back",
            queue,
            len(messages),
            result.sent,
            result.retried,
            result.failed,
            result.suppressed,
            result.released,
        )
    return result


def _figures(queue: Queue, claimed: int, result: BatchResult, sent: list) -> dict[str, float]:
    """What one batch adds to the metrics (one Redis round trip, see ``counters``)."""
    label = {"queue": str(queue)}
    waited = [
        (at - done.message.__dict__["queued_at"]).total_seconds()
        for done, at in sent
        if done.message.__dict__.get("queued_at") is not None
    ]
    return {
        counters.series("mailer_sent_total", label): result.sent,
        counters.series("mailer_failed_total", label): result.failed,
        counters.series("mailer_retried_total", label): result.retried,
        counters.series("mailer_deferred_total", label): result.released if result.wait else 0,
        counters.series("mailer_suppressed_at_send_total", label): result.suppressed,
        **counters.observations(
            "mailer_queued_to_sent_seconds", waited, counters.LATENCY_BUCKETS, **label
        ),
        **counters.observations(
            "mailer_drain_batch_size", [claimed], counters.BATCH_BUCKETS, **label
        ),
    }


@dataclass
class _Run:
    """One claimed batch being sent: what its loop reads, and what it leaves for
    ``outbox.finish``."""

    messages: list[Message]
    queue: Queue
    token: uuid.UUID
    deadline: float | None
    shared: Shared
    sender: transport.Sender
    result: BatchResult
    blocked: set[str]  # suppressed addresses
    limiter: Limiter
    stopped: set[int]  # campaigns that stopped
    checked: float = field(default_factory=time.monotonic)  # when ``stopped`` was read
    templates: compose.Templates = field(default_factory=compose.Templates)
    batch: outbox.Batch = field(init=False)
    untried: list[Message] = field(default_factory=list)  # handed back as they are
    uncount: list[Message] = field(default_factory=list)  # handed back, attempt not used
    pending: list[tuple[outbox.Sent, datetime]] = field(default_factory=list)  # to note

    def __post_init__(self):
        self.batch = outbox.Batch(token=self.token)

    def over(self) -> bool:
        """Stop before the next email: a stop request, an outage, the deadline."""
        deadline = self.deadline
        return stopping() or bool(self.result.wait) or (deadline and time.monotonic() > deadline)

    def skip(self, message: Message) -> bool:
        """Write at once what is not sent (a stopped campaign, a suppressed address):
        recovery counts every message of the claim still in sending, up to the last one
        sent, as having left."""
        if message.campaign_id and time.monotonic() - self.checked > STATE_CHECK_SECONDS:
            self.stopped = self.shared.db(outbox.stopped_campaigns, {message.campaign_id})
            self.checked = time.monotonic()
        if message.campaign_id in self.stopped:
            self.result.released += self.shared.db(outbox.release, [message], self.token)
            return True
        if message.to_email in self.blocked:
            self.result.suppressed += self.shared.db(outbox.record_suppressed, [message])
            return True
        return False

    def no_token(self) -> None:
        """The limiter refused: a quota is used up, or the rate-limit store stayed down."""
        result = self.result
        if self.limiter.held is not None:  # a quota is used up: wait for its window
            result.wait, result.outage = self.limiter.held.wait(), self.limiter.held.reason
        elif not stopping():  # the rate-limit store stayed down: wait a while
            result.wait = float(conf.get("RATE_STORE_WAIT"))
            result.outage = "the rate-limit store is unavailable"

    def sent(self, message: Message, email: PreparedEmail) -> None:
        self.pending.append((outbox.Sent(message, provider_id(email)), timezone.now()))
        self.result.sent += 1


def _one_by_one(run: _Run) -> None:
    """Each email noted on the claim (the one before it sent, it tried) just before it
    goes: a crash leaves at most this one email in doubt."""
    db, sender, result, messages = run.shared.db, run.sender, run.result, run.messages
    for index, message in enumerate(messages):
        if run.over():
            run.untried.extend(messages[index:])
            break
        if run.skip(message):
            continue
        # The note for this email travels while it is composed (outbox.Note); in a
        # pool it is written when read, with the other lanes' (Database.note).
        note = db.note(message, run.token, run.pending[-1][0] if run.pending else None)
        run.batch.sent.extend(run.pending)  # noted now, or written when the batch ends
        run.pending = []
        try:
            email = _compose(message, run.templates, run.shared.links, db)
        except Exception as exc:  # noqa: BLE001 - classify sorts every failure
            # A template that cannot render fails at once; an unknown error is
            # retried, and counts as an attempt although nothing left.
            if db.read(note):
                _fail(message, transport.classify(exc), result, db)
            else:
                result.released += db(outbox.release, [message], run.token)
            continue
        if not run.limiter.take():
            run.no_token()
            db.read(note)  # read, so the connection is free again
            run.untried.extend(messages[index:])
            break
        try:
            sender.open()
        except ServiceUnavailable as error:
            _outage(run.queue, error, result, db)
            db.read(note)
            run.untried.extend(messages[index:])
            break
        if not db.read(note):  # its campaign stopped, or the claim lapsed
            run.stopped |= {message.campaign_id} - {None}
            result.released += db(outbox.release, [message], run.token)
            continue
        try:
            sender.send(email)
        except ServiceUnavailable as error:
            # The connection failed under this email: it most likely did not
            # leave. It waits with the rest; its attempt does not count.
            _outage(run.queue, error, result, db)
            message.attempts -= 1
            run.uncount.append(message)
            continue
        except SendError as error:
            _fail(message, error, result, db)
            continue
        transport.outage.recovered()
        run.sent(message, email)


def _in_chunks(run: _Run, size: int) -> None:
    """Up to ``size`` emails of one campaign in one call to an ESP's batch endpoint.

    The claim notes the chunk's last email as tried before the call, the previous
    chunk's as sent: a crash leaves at most one call's emails in doubt. A chunk never
    mixes campaigns, so the note's check that the campaign may still send covers it all.
    """
    db, result, messages = run.shared.db, run.result, run.messages
    index = 0
    while index < len(messages):
        if run.over():
            run.untried.extend(messages[index:])
            return
        chunk: list[Message] = []
        while index < len(messages) and len(chunk) < size:
            message = messages[index]
            if chunk and message.campaign_id != chunk[0].campaign_id:
                break
            index += 1
            if not run.skip(message):
                chunk.append(message)
        ready: list[tuple[Message, PreparedEmail]] = []
        for position, message in enumerate(chunk):
            try:
                email = _compose(message, run.templates, run.shared.links, db)
            except Exception as exc:  # noqa: BLE001 - classify sorts every failure
                # Nothing was noted for it: the attempt is counted here.
                _fail(message, transport.classify(exc), result, db, count=True)
                continue
            if not run.limiter.take():  # the rest waits; what has its tokens goes
                run.no_token()
                run.untried.extend(chunk[position:] + messages[index:])
                index = len(messages)
                break
            ready.append((message, email))
        if ready:
            _send_chunk(run, ready)


def _send_chunk(run: _Run, ready: list[tuple[Message, PreparedEmail]]) -> None:
    db, result, sender = run.shared.db, run.result, run.sender
    last = ready[-1][0]
    note = db.note(last, run.token, run.pending[-1][0] if run.pending else None)
    run.batch.sent.extend(run.pending)
    run.pending = []
    try:
        sender.open()
    except ServiceUnavailable as error:
        _outage(run.queue, error, result, db)
        db.read(note)
        run.untried.extend(message for message, _ in ready)
        return
    if not db.read(note):  # its campaign stopped, or the claim lapsed
        run.stopped |= {last.campaign_id} - {None}
        result.released += db(outbox.release, [message for message, _ in ready], run.token)
        return
    for message, _ in ready[:-1]:
        message.attempts += 1  # the note counted the last one's
    errors = sender.send_many([email for _, email in ready])
    for (message, email), error in zip(ready, errors, strict=True):
        if error is None:
            run.sent(message, email)
        elif isinstance(error, ServiceUnavailable):
            # The call failed: its emails most likely did not leave. They wait with
            # the rest; their attempts do not count.
            if not result.wait:
                _outage(run.queue, error, result, db)
            message.attempts -= 1
            run.uncount.append(message)
        else:
            _fail(message, error, result, db)
    if any(error is None for error in errors):
        transport.outage.recovered()


def _compose(
    message: Message, templates: compose.Templates, link_cache: compose.LinkCache, db: Database
) -> PreparedEmail:
    if not db.shared:  # inline, and again if the database connection drops meanwhile
        return db(_build, message, templates, link_cache)
    # A lane renders on its own thread; its few lookups go to the database thread.
    return compose.build_email(message, db(templates.for_message, message), link_cache=link_cache)


def _build(message: Message, templates: compose.Templates, link_cache: compose.LinkCache):
    return compose.build_email(message, templates.for_message(message), link_cache=link_cache)


def _outage(queue: Queue, error: SendError, result: BatchResult, db: Database) -> None:
    if isinstance(error, Throttled):
        # Asked to slow down, not down: the queue slows for every process, and the
        # emails concerned wait what the server asked (or THROTTLE_WAIT).
        db(throttle.slow_down, queue, str(error))
        wait = error.retry_after if error.retry_after is not None else conf.get("THROTTLE_WAIT")
        result.wait, result.outage = max(1.0, float(wait)), f"throttled: {error}"
        return
    result.wait, result.outage = transport.outage.failed(), str(error)
    logger.warning(
        "mailer: %s backend unavailable (%s); mail waits %.0f s", queue, error, result.wait
    )


def _fail(
    message: Message, error: SendError, result: BatchResult, db: Database, *, count: bool = False
) -> None:
    """Permanent: failed now. Transient: again after a backoff, until MAX_ATTEMPTS.

    ``count``: the attempt was not counted by a try (the email never reached the wire).
    """
    if count:
        message.attempts += 1
    max_attempts = int(conf.get("MAX_ATTEMPTS"))
    # A template error may quote a context value (a reset link): stored and logged, never.
    text = redact.scrub(str(error), message.context)
    if isinstance(error, PermanentSendError) or message.attempts >= max_attempts:
        if not isinstance(error, PermanentSendError):
            text = f"Gave up after {message.attempts} attempts: {text}"
        db(outbox.record_failed, message, text)
        result.failed += 1
        return
    delay = transport.backoff(max(1, message.attempts))
    max_countdown = float(conf.get("MAX_COUNTDOWN"))
    status = db(
        outbox.record_retry,
        message,
        text,
        delay=delay,
        max_countdown=max_countdown,
    )
    result.retried += 1
    if status == Message.Status.QUEUED:
        result.countdowns.add(math.ceil(delay))
