"""Drip series: contacts enter (events, segments, anniversaries, the API), beat's tick moves
them through the steps, and they leave (the end, a goal, an unsubscribe, a marketer).

Due times live in the database (``Enrollment.next_due_at``), never in a Celery ETA. A
tick locks a batch of due enrollments (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two
ticks never take the same ones), decides in Python what each does next, and writes it all
in the same transaction: a worker killed mid-tick leaves nothing half done, and the
unique (enrollment, step) constraint on messages means a step never sends twice.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import redis
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Count, Exists, Max, Min, OuterRef, Q, Subquery
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Substr
from django.utils import timezone

from . import conf, dispatch, frequency, localtime, outbox, rendering, segments
from .contacts import clean_address, contact_for_user
from .exceptions import DripError, MailerError
from .localtime import Window
from .models import (
    Contact,
    DripSeries,
    DripSeriesStatus,
    DripStep,
    DripStepRun,
    DripTrigger,
    Enrollment,
    EnrollmentState,
    ExitReason,
    Kind,
    Message,
    MessageStatus,
    Queue,
    Reentry,
    StepOutcome,
    Suppression,
)
from .ratelimit import redis_client

logger = logging.getLogger(__name__)

Step, Branch, Condition = DripStep.Kind, DripStep.Branch, DripStep.Condition
ACTIVE = EnrollmentState.ACTIVE
S = MessageStatus

#: The task a tick runs in; routed to the campaign queue by ``conf.route_task``.
TICK_TASK = "mailer.tasks.advance_drips"
_KICK_KEY = "mailer:kick:drips"
_KICK_TTL_MS = 2000

#: Messages that will never be opened or clicked: a decision on them need not wait.
_NEVER_ARRIVED = frozenset({S.FAILED, S.CANCELLED, S.SUPPRESSED, S.BOUNCED})

CHUNK = 50_000  # contact ids per INSERT … SELECT of segment entries and anniversaries


# --- Who and what -------------------------------------------------------------------------


def series_for(value: DripSeries | int | str) -> DripSeries:
    """A series given itself, its id or its name; DripError when there is none."""
    if isinstance(value, DripSeries):
        return value
    lookup = {"pk": value} if isinstance(value, int) else {"name": value}
    found = DripSeries.objects.filter(**lookup).first()
    if found is None:
        raise DripError(f"No drip series {value!r}.", field="series")
    return found


def contact_for(value) -> Contact:
    """A contact given itself, a user account, or an address (created when unknown)."""
    if isinstance(value, Contact):
        return value
    if isinstance(value, str):
        contact, _ = Contact.objects.get_or_create(email=clean_address(value))
        return contact
    if hasattr(value, "get_username"):
        return contact_for_user(value)
    raise DripError(
        f"contact must be a Contact, a user or an email address, not {type(value).__name__}.",
        field="contact",
    )


def why_not(series: DripSeries, contact: Contact) -> str | None:
    """Why the contact may not receive the series' mail now (an ExitReason), or None."""
    reason = (
        Suppression.objects.filter(email=contact.email)
        .order_by("scope")
        .values_list("reason", flat=True)
        .first()
    )
    if reason is not None:
        unsubscribed = reason == Suppression.Reason.UNSUBSCRIBE
        return ExitReason.UNSUBSCRIBED if unsubscribed else ExitReason.SUPPRESSED
    if contact.consent == Contact.Consent.WITHDRAWN:
        return ExitReason.UNSUBSCRIBED
    if series.requires_consent and contact.consent != Contact.Consent.GRANTED:
        return ExitReason.NO_CONSENT
    return None


# --- Entering ------------------------------------------------------------------------------


def enroll(
    series: DripSeries,
    contact: Contact,
    *,
    data: dict | None = None,
    key: str | None = None,
    source: str = "api",
    now: datetime | None = None,
) -> Enrollment | None:
    """Put the contact at the start of the series; its first step runs at the next tick
    (one is woken after commit). Returns None when the contact may not enter: it is in
    the series already, the re-entry policy says no, or it may not get marketing mail.
    """
    now = now or timezone.now()
    if series.status not in (DripSeriesStatus.ACTIVE, DripSeriesStatus.PAUSED):
        raise DripError(
            f"The drip series {series.name!r} is {series.get_status_display().lower()}; "
            "activate it first.",
            field="series",
        )
    refused = why_not(series, contact)
    if refused is not None:
        logger.info(
            "mailer: contact %s not enrolled in series %s (%s)", contact.pk, series.pk, refused
        )
        return None
    with transaction.atomic():
        if not may_enter(series, contact, key=key, now=now):
            return None
        try:
            with transaction.atomic():
                enrollment = Enrollment.objects.create(
                    series=series,
                    contact=contact,
                    data=data or {},
                    key=key,
                    source=source[:120],
                    entered_at=now,
                    next_due_at=now,
                    updated_at=now,
                )
        except IntegrityError:  # enrolled a moment ago by another process
            return None
    kick_on_commit()
    return enrollment


def may_enter(
    series: DripSeries, contact: Contact, *, key: str | None = None, now: datetime
) -> bool:
    """The re-entry policy: never while still in the series, then once ever, again after
    the cooldown, or always; never twice under one key. One query."""
    previous = Enrollment.objects.filter(series=series, contact=contact).aggregate(
        total=Count("pk"),
        active=Count("pk", filter=Q(state=ACTIVE)),
        keyed=Count("pk", filter=Q(key=key)) if key is not None else Count("pk", filter=Q(pk=0)),
        last_exit=Max("exited_at"),
    )
    if previous["active"] or previous["keyed"]:
        return False
    if series.reentry == Reentry.ONCE:
        return previous["total"] == 0
    if series.reentry == Reentry.COOLDOWN and previous["last_exit"] is not None:
        return previous["last_exit"] + (series.reentry_cooldown or timedelta()) <= now
    return True


def trigger(
    event: str,
    contact: Contact,
    *,
    data: dict | None = None,
    key: str | None = None,
    now: datetime | None = None,
) -> list[Enrollment]:
    """An event from the host: contacts in series whose goal it is leave them; the
    contact enters every series listening to it. Returns the new enrollments."""
    now = now or timezone.now()
    reached = Enrollment.objects.active().filter(contact=contact, series__goal_event=event)
    exit_enrollments(reached, ExitReason.GOAL_EVENT, now=now)
    listening = DripSeries.objects.accepting().filter(
        trigger=DripTrigger.EVENT, trigger_event=event
    )
    entered = [
        enroll(series, contact, data=data, key=key, source=f"event:{event}", now=now)
        for series in listening.order_by("pk")
    ]
    return [enrollment for enrollment in entered if enrollment is not None]


def _eligible(series: DripSeries, contacts):
    """The contacts who may get the series' mail, as a queryset filter."""
    contacts = contacts.exclude(Exists(Suppression.objects.filter(email=OuterRef("email"))))
    if series.requires_consent:
        return contacts.filter(consent=Contact.Consent.GRANTED)
    return contacts.exclude(consent=Contact.Consent.WITHDRAWN)


def _not_barred(series: DripSeries, contacts, now: datetime):
    """Contacts the re-entry policy lets in (as ``may_enter``, in SQL)."""
    mine = Enrollment.objects.filter(series=series, contact=OuterRef("pk"))
    if series.reentry == Reentry.ONCE:
        return contacts.exclude(Exists(mine))
    barred = Q(state=ACTIVE)
    if series.reentry == Reentry.COOLDOWN:
        barred |= Q(exited_at__gt=now - (series.reentry_cooldown or timedelta()))
    return contacts.exclude(Exists(mine.filter(barred)))


def _id_chunks():
    """(low, high] ranges of contact ids covering the table, CHUNK ids each."""
    bounds = Contact.objects.aggregate(low=Min("pk"), high=Max("pk"))
    if bounds["low"] is None:
        return
    low = bounds["low"] - 1
    while low < bounds["high"]:
        yield low, low + CHUNK
        low += CHUNK


def enter_segments(now: datetime | None = None) -> int:
    """Enroll the members of each segment-triggered series' segment who may enter, in
    SQL (INSERT … SELECT over id ranges), never loading contacts into Python."""
    now = now or timezone.now()
    created = 0
    for series in DripSeries.objects.accepting().filter(
        trigger=DripTrigger.SEGMENT, entry_segment__isnull=False
    ):
        for low, high in _id_chunks():
            members = segments.contacts(series.entry_segment, now=now, within=(low, high))
            members = _not_barred(series, _eligible(series, members), now)
            sql, params = members.values("pk").query.sql_with_params()
            created += outbox.insert_enrollments(
                series.pk, sql, list(params), now=now, source="segment", key=None
            )
    if created:
        logger.info("mailer: %d contacts entered drip series from segments", created)
        kick_on_commit()
    return created


def anniversary_days(today: date) -> list[date]:
    """The dates whose anniversary is due: today, and yesterday in case beat was down
    over midnight (each enrolls once a year, so nothing happens twice)."""
    return [today, today - timedelta(days=1)]


def _month_days(day: date) -> list[str]:
    """The attribute endings ("MM-DD") that fall on ``day``: 29 February is celebrated on
    the 28th in other years."""
    found = [f"{day.month:02d}-{day.day:02d}"]
    leap = day.year % 4 == 0 and (day.year % 100 != 0 or day.year % 400 == 0)
    if (day.month, day.day) == (2, 28) and not leap:
        found.append("02-29")
    return found


def enter_anniversaries(now: datetime | None = None) -> int:
    """Enroll contacts whose date attribute (YYYY-MM-DD) has its anniversary today in the
    series' time zone, once a year (the enrollment's key is the year), in SQL."""
    now = now or timezone.now()
    created = 0
    for series in DripSeries.objects.accepting().filter(trigger=DripTrigger.ANNIVERSARY):
        attribute = series.anniversary_attribute
        today = now.astimezone(localtime.zone_for(None, series.timezone)).date()
        for day in anniversary_days(today):
            dates = Contact.objects.order_by().annotate(
                _month_day=Substr(KeyTextTransform(attribute, "attributes"), 6, 5)
            )
            for low, high in _id_chunks():
                chunk = dates.filter(pk__gt=low, pk__lte=high, _month_day__in=_month_days(day))
                chunk = _eligible(series, chunk)
                chunk = chunk.exclude(
                    Exists(
                        Enrollment.objects.filter(
                            series=series, contact=OuterRef("pk"), state=ACTIVE
                        )
                    )
                )
                sql, params = chunk.values("pk").query.sql_with_params()
                created += outbox.insert_enrollments(
                    series.pk,
                    sql,
                    list(params),
                    now=now,
                    source=f"anniversary:{day.isoformat()}",
                    key=f"anniversary:{day.year}",
                )
    if created:
        logger.info("mailer: %d contacts entered drip series on their anniversary", created)
        kick_on_commit()
    return created


# --- Leaving -------------------------------------------------------------------------------


def exit_enrollments(queryset, reason: str, *, now: datetime | None = None) -> int:
    """End active enrollments with a reason; they never move again."""
    now = now or timezone.now()
    state = EnrollmentState.COMPLETED if reason == ExitReason.END else EnrollmentState.EXITED
    return queryset.filter(state=ACTIVE).update(
        state=state, exit_reason=reason, exited_at=now, next_due_at=None, updated_at=now
    )


def exit_address(email: str, reason: str) -> int:
    """The address unsubscribed or was suppressed: it leaves every series at once."""
    left = exit_enrollments(Enrollment.objects.filter(contact__email=email), reason)
    if left:
        logger.info("mailer: %d drip enrollments left (%s)", left, reason)
    return left


def exit_for_suppression(suppression: Suppression) -> int:
    reason = (
        ExitReason.UNSUBSCRIBED
        if suppression.reason == Suppression.Reason.UNSUBSCRIBE
        else ExitReason.SUPPRESSED
    )
    return exit_address(suppression.email, reason)


def remove(queryset, *, by=None) -> int:
    """A marketer takes contacts out: they leave, and their unsent drip mail is cancelled."""
    ids = list(queryset.filter(state=ACTIVE).values_list("pk", flat=True))
    with transaction.atomic():
        removed = exit_enrollments(Enrollment.objects.filter(pk__in=ids), ExitReason.REMOVED)
        outbox.cancel_enrollment_messages(ids, "Removed from the drip series.")
    logger.info("mailer: %d drip enrollments removed by %s", removed, getattr(by, "pk", None))
    return removed


def set_status(series: DripSeries, status: str) -> DripSeries:
    """Activate, pause (everyone holds where they are) or archive a series."""
    if status not in DripSeriesStatus.values:
        raise DripError(f"Unknown series status {status!r}.", field="status")
    if status == DripSeriesStatus.ACTIVE:
        steps = list(series.steps.all())
        broken = [step for step in steps if _step_problem(step)]
        if broken:
            raise DripError(
                f"Step {broken[0].position}: {_step_problem(broken[0])}", field="status"
            )
        if any(step.kind == Step.SEND for step in steps) and not conf.get("POSTAL_ADDRESS"):
            raise DripError(
                "Set MAILER['POSTAL_ADDRESS'] (MAILER_POSTAL_ADDRESS): marketing email must "
                "carry a postal address (CAN-SPAM).",
                field="status",
            )
    DripSeries.objects.filter(pk=series.pk).update(status=status, updated_at=timezone.now())
    series.status = status
    if status == DripSeriesStatus.ACTIVE:
        kick_on_commit()
    return series


def _step_problem(step: DripStep) -> str | None:
    try:
        step.clean()
    except ValidationError as exc:
        return "; ".join(exc.messages)
    return None


# --- The tick ------------------------------------------------------------------------------


def kick() -> bool:
    """Have a tick run soon (so a new enrollment's first step does not wait for beat);
    bursts of enrollments coalesce into one task. False when nothing was enqueued."""
    client = redis_client()
    if client is not None:
        try:
            if not client.set(_KICK_KEY, 1, nx=True, px=_KICK_TTL_MS):
                return False
        except redis.RedisError as exc:
            logger.warning("mailer: drip kick flag unavailable (%s)", exc.__class__.__name__)
    return dispatch.enqueue(TICK_TASK)


def kick_on_commit() -> None:
    transaction.on_commit(kick)


@dataclass
class _Sent:
    """A message of an enrollment, as a decision reads it."""

    step_id: int | None
    status: str
    sent_at: datetime | None
    opened_at: datetime | None
    clicked_at: datetime | None


class _Enrollment:
    """One due enrollment as a tick reads and moves it."""

    __slots__ = (
        "pk", "contact_id", "next_position", "next_due_at", "step_id", "step_started_at",
        "last_step_at", "entered_at", "data", "email", "tz", "language", "consent",
        "suppression", "state", "exited_at", "exit_reason", "note",
    )  # fmt: skip

    def __init__(self, row: tuple):
        (
            self.pk, self.contact_id, self.next_position, self.next_due_at, self.step_id,
            self.step_started_at, self.last_step_at, self.entered_at, self.data, self.email,
            self.tz, self.language, self.consent, self.suppression,
        ) = row  # fmt: skip
        self.state, self.exited_at, self.exit_reason, self.note = ACTIVE, None, "", ""

    def row(self) -> tuple:
        return (
            self.pk, self.state, self.next_position, self.next_due_at, self.step_id,
            self.step_started_at, self.last_step_at, self.exited_at, self.exit_reason,
            self.note[:2000],
        )  # fmt: skip


_READ = (
    "pk", "contact_id", "next_position", "next_due_at", "step_id", "step_started_at",
    "last_step_at", "entered_at", "data", "contact__email", "contact__timezone",
    "contact__language", "contact__consent", "suppression",
)  # fmt: skip


class _Plan:
    """A running series as a tick runs it: its steps in order, found by position."""

    def __init__(self, series: DripSeries):
        self.series = series
        self.steps = list(
            series.steps.select_related("template", "condition_segment", "yes_step", "no_step")
        )
        self.positions = [step.position for step in self.steps]
        self.zone = localtime.zone_for(None, series.timezone)
        self.windows = {step.pk: Window.of(step, series) for step in self.steps}

    def at(self, position: int) -> DripStep | None:
        index = bisect.bisect_left(self.positions, position)
        return self.steps[index] if index < len(self.steps) else None


@dataclass
class TickResult:
    advanced: int = 0  # enrollments a tick looked at
    steps: int = 0  # steps run (sent, waited out, decided)
    messages: int = 0  # emails made
    exited: int = 0
    more: bool = False  # the tick ran out of time with work left

    def __iadd__(self, other: TickResult) -> TickResult:
        self.advanced += other.advanced
        self.steps += other.steps
        self.messages += other.messages
        self.exited += other.exited
        return self


def advance_due(
    *, now: datetime | None = None, batch_size: int | None = None, seconds: float | None = None
) -> TickResult:
    """Beat's tick: move every due enrollment of every running series as far as it goes
    now, batch by batch (each its own transaction), round-robin over the series, for at
    most ``seconds`` (the next tick carries on). Nothing moves while the reputation guard
    holds marketing."""
    _clear_kick()
    result = TickResult()
    if outbox.marketing_paused():
        return result
    size = int(batch_size or conf.drips("BATCH_SIZE"))
    deadline = time.monotonic() + float(seconds or conf.drips("TICK_SECONDS"))
    plans = [_Plan(series) for series in DripSeries.objects.running().order_by("pk")]
    while plans:
        for plan in list(plans):
            if time.monotonic() > deadline:
                result.more = True
                return result
            with transaction.atomic():
                batch = _advance_batch(plan, now or timezone.now(), size)
            result += batch
            if batch.advanced < size:
                plans.remove(plan)
    return result


def tick() -> TickResult:
    """A tick as beat runs it: advance what is due, and if time ran out with work left,
    queue the next tick at once rather than wait for beat."""
    result = advance_due()
    if result.more:
        dispatch.enqueue(TICK_TASK)
    return result


def _clear_kick() -> None:
    client = redis_client()
    if client is not None:
        try:
            client.delete(_KICK_KEY)
        except redis.RedisError:
            pass


def _advance_batch(plan: _Plan, now: datetime, size: int) -> TickResult:
    due = Enrollment.objects.filter(series=plan.series, state=ACTIVE, next_due_at__lte=now)
    ids = list(
        due.order_by("next_due_at")
        .select_for_update(skip_locked=True)
        .values_list("pk", flat=True)[:size]
    )
    if not ids:
        return TickResult()
    suppression = Suppression.objects.filter(email=OuterRef("contact__email")).order_by("scope")
    rows = (
        Enrollment.objects.filter(pk__in=ids)
        .annotate(suppression=Subquery(suppression.values("reason")[:1]))
        .order_by("pk")
        .values_list(*_READ)
    )
    batch = _Batch(plan, [_Enrollment(row) for row in rows], now)
    return batch.run()


class _Batch:
    """One transaction's worth of due enrollments of one series."""

    def __init__(self, plan: _Plan, enrollments: list[_Enrollment], now: datetime):
        self.plan, self.enrollments, self.now = plan, enrollments, now
        self.series = plan.series
        self.result = TickResult(advanced=len(enrollments))
        self.messages: list[Message] = []
        self.runs: list[DripStepRun] = []
        self._sent: dict[int, list[_Sent]] | None = None
        self._members: dict[int, set[int]] = {}
        self._templates: dict[tuple, rendering.Source | MailerError] = {}
        self.caps = conf.frequency_cap()
        self.ledger: frequency.Ledger | None = None
        self.grace = timedelta(seconds=conf.drips("WINDOW_GRACE"))
        self.recheck = timedelta(seconds=conf.drips("DECIDE_RECHECK"))

    def run(self) -> TickResult:
        goal = self.series.goal_segment
        reached = self._in_segment(goal) if goal is not None else set()
        for enrollment in self.enrollments:
            refused = self._refused(enrollment)
            if refused is not None:
                self._exit(enrollment, refused)
            elif enrollment.contact_id in reached:
                self._exit(enrollment, ExitReason.GOAL_SEGMENT)
            else:
                self._advance(enrollment)
        created = outbox.add_drip_messages(self.messages)
        DripStepRun.objects.bulk_create(self.runs, batch_size=1000, ignore_conflicts=True)
        outbox.update_enrollments([e.row() for e in self.enrollments], self.now)
        self.result.messages = created
        if any(m.status == S.QUEUED for m in self.messages):
            dispatch.kick_on_commit(Queue.CAMPAIGN)
        return self.result

    def _refused(self, enrollment: _Enrollment) -> str | None:
        if enrollment.suppression is not None:
            unsubscribed = enrollment.suppression == Suppression.Reason.UNSUBSCRIBE
            return ExitReason.UNSUBSCRIBED if unsubscribed else ExitReason.SUPPRESSED
        if enrollment.consent == Contact.Consent.WITHDRAWN:
            return ExitReason.UNSUBSCRIBED
        if self.series.requires_consent and enrollment.consent != Contact.Consent.GRANTED:
            return ExitReason.NO_CONSENT
        return None

    def _exit(self, enrollment: _Enrollment, reason: str) -> None:
        completed = reason == ExitReason.END
        enrollment.state = EnrollmentState.COMPLETED if completed else EnrollmentState.EXITED
        enrollment.exit_reason, enrollment.exited_at = reason, self.now
        enrollment.next_due_at = None
        self.result.exited += 1

    # -- one enrollment, as far as it goes now

    def _advance(self, enrollment: _Enrollment) -> None:
        for _ in range(len(self.plan.steps) + 1):  # jumps only go forward: this suffices
            step = self.plan.at(enrollment.next_position)
            if step is None:
                self._exit(enrollment, ExitReason.END)
                return
            if enrollment.step_id != step.pk:
                enrollment.step_id, enrollment.step_started_at = step.pk, self.now
                enrollment.note = ""
            if step.kind == Step.WAIT:
                moved = self._wait(enrollment, step)
            elif step.kind == Step.SEND:
                moved = self._send(enrollment, step)
            else:
                moved = self._decide(enrollment, step)
            if not moved or enrollment.state != ACTIVE:
                return
            self.result.steps += 1
        self._exit(enrollment, ExitReason.END)

    def _done(self, enrollment, step, outcome: str, at: datetime, note: str = "") -> None:
        self.runs.append(
            DripStepRun(
                enrollment_id=enrollment.pk, step_id=step.pk, at=at, outcome=outcome, note=note
            )
        )
        enrollment.last_step_at = at
        enrollment.next_position = step.position + 1

    def _wait(self, enrollment: _Enrollment, step: DripStep) -> bool:
        after_enrollment = step.delay_from == DripStep.WaitFrom.ENROLLMENT
        base = enrollment.entered_at if after_enrollment else enrollment.last_step_at
        tz = localtime.zone_for(enrollment.tz, self.plan.zone)
        due = localtime.later(base or enrollment.entered_at, step.delay or timedelta(), tz)
        if due > self.now:
            enrollment.next_due_at, enrollment.next_position = due, step.position
            return False
        self._done(enrollment, step, StepOutcome.WAITED, due)
        return True

    def _send(self, enrollment: _Enrollment, step: DripStep) -> bool:
        tz = localtime.zone_for(enrollment.tz, self.plan.zone)
        window = self.plan.windows[step.pk]
        late = enrollment.next_due_at
        in_grace = late is not None and self.now - late <= self.grace and window.contains(late, tz)
        slot = self.now if in_grace else window.next_open(self.now, tz)
        note = "" if slot == self.now else "Waiting for the send window."
        if self.caps:
            slot, capped = self._ledger().first_allowed(enrollment.contact_id, slot, tz, window)
            note = capped or note
        if slot > self.now:
            enrollment.next_due_at, enrollment.next_position = slot, step.position
            enrollment.note = note
            return False
        source = self._template(step, enrollment.language)
        message = Message(
            kind=Kind.DRIP,
            to_email=enrollment.email,
            contact_id=enrollment.contact_id,
            enrollment_id=enrollment.pk,
            drip_step_id=step.pk,
            context=enrollment.data or {},
            metadata={"drip_series": self.series.pk},
            created_at=self.now,
        )
        if isinstance(source, MailerError):
            message.template_slug = step.template.slug if step.template_id else ""
            message.language = enrollment.language or ""
            message.status, message.last_error = S.FAILED, f"Template: {source}"[:2000]
            outcome, note = StepOutcome.FAILED, message.last_error
            logger.warning(
                "mailer: drip step %s failed for enrollment %s: %s", step.pk, enrollment.pk, source
            )
        else:
            message.template_id, message.template_slug = source.template_id, source.slug
            message.language = source.language
            message.status, message.queued_at = S.QUEUED, self.now
            outcome, note = StepOutcome.SENT, ""
            if self.ledger is not None:
                self.ledger.add(enrollment.contact_id, self.now)
        self.messages.append(message)
        self._remember(enrollment.pk, message)
        enrollment.note = note
        self._done(enrollment, step, outcome, self.now, note)
        return True

    def _template(self, step: DripStep, language: str) -> rendering.Source | MailerError:
        """The step's template in the contact's language, falling back as transactional
        mail does (then to the step's own language); one lookup per language a batch."""
        key = (step.pk, language)
        if key not in self._templates:
            if step.template is None:
                self._templates[key] = DripError("The step has no template.", field="template")
            else:
                try:
                    self._templates[key] = rendering.find_template(
                        step.template.slug,
                        language or None,
                        conf.get("DEFAULT_LANGUAGE"),
                        step.template.language,
                    )
                except MailerError as exc:
                    self._templates[key] = exc
        return self._templates[key]

    def _decide(self, enrollment: _Enrollment, step: DripStep) -> bool:
        answer, until = self._answer(enrollment, step)
        if answer is None:
            enrollment.next_due_at, enrollment.next_position = until, step.position
            enrollment.note = "Waiting for the decision's window to end."
            return False
        self._done(enrollment, step, StepOutcome.YES if answer else StepOutcome.NO, self.now)
        branch = step.if_yes if answer else step.if_no
        target = step.yes_step if answer else step.no_step
        if branch == Branch.EXIT:
            self._exit(enrollment, ExitReason.DECIDED)
        elif branch == Branch.JUMP and target is not None and target.position > step.position:
            enrollment.next_position = target.position
        return True

    def _answer(self, enrollment: _Enrollment, step: DripStep) -> tuple[bool | None, datetime]:
        """True or False, or (None, when to look again) while the window is open."""
        condition, window = step.condition, step.condition_window
        if condition == Condition.IN_SEGMENT:
            segment = step.condition_segment
            return (
                segment is not None and enrollment.contact_id in self._in_segment(segment)
            ), self.now
        column = (
            "opened_at" if condition in (Condition.OPENED, Condition.OPENED_ANY) else "clicked_at"
        )
        mine = self._sent_by(enrollment.pk)
        if condition in (Condition.OPENED, Condition.CLICKED):
            last = mine[-1] if mine else None
            if last is None:
                return False, self.now
            acted = getattr(last, column)
            if acted is not None and (
                window is None or last.sent_at is None or acted <= last.sent_at + window
            ):
                return True, self.now
            if last.status in _NEVER_ARRIVED or window is None:
                return False, self.now
            if last.sent_at is None:  # not sent yet (its window, or the queue): look later
                return None, self.now + min(self.recheck, window)
            ends = last.sent_at + window
        else:
            if any(getattr(message, column) is not None for message in mine):
                return True, self.now
            if window is None:
                return False, self.now
            ends = (enrollment.step_started_at or self.now) + window
        if self.now >= ends:
            return False, self.now
        return None, min(ends, self.now + self.recheck)

    # -- what a batch looks up once

    def _in_segment(self, segment) -> set[int]:
        if segment.pk not in self._members:
            ids = [e.contact_id for e in self.enrollments]
            members = segments.contacts(segment, now=self.now).filter(pk__in=ids)
            self._members[segment.pk] = set(members.values_list("pk", flat=True))
        return self._members[segment.pk]

    def _sent_by(self, enrollment_id: int) -> list[_Sent]:
        if self._sent is None:
            self._sent = {}
            ids = [e.pk for e in self.enrollments]
            found = (
                Message.objects.filter(enrollment_id__in=ids)
                .order_by("pk")
                .values_list(
                    "enrollment_id", "drip_step_id", "status", "sent_at", "opened_at", "clicked_at"
                )
            )
            for owner, *values in found:
                self._sent.setdefault(owner, []).append(_Sent(*values))
            for message in self.messages:
                self._remember(message.enrollment_id, message)
        return self._sent.get(enrollment_id, [])

    def _remember(self, enrollment_id: int, message: Message) -> None:
        if self._sent is not None:
            self._sent.setdefault(enrollment_id, []).append(
                _Sent(message.drip_step_id, message.status, None, None, None)
            )

    def _ledger(self) -> frequency.Ledger:
        if self.ledger is None:
            contacts = [e.contact_id for e in self.enrollments]
            frequency.lock(contacts)
            self.ledger = frequency.Ledger(contacts, self.now, self.caps)
        return self.ledger


# --- Beat's checks -------------------------------------------------------------------------


def check_stuck(now: datetime | None = None) -> int:
    """Enrollments that should have moved and did not: logged, and a tick queued for them.
    Never silent, whatever held them (beat down, a lost task, a tick that keeps failing)."""
    now = now or timezone.now()
    if outbox.marketing_paused():
        return 0  # held on purpose until a person lifts the pause
    lost = Enrollment.objects.filter(
        state=ACTIVE, next_due_at__isnull=True, series__status=DripSeriesStatus.ACTIVE
    ).update(next_due_at=now, note="Had no due time; queued again.", updated_at=now)
    overdue = Enrollment.objects.overdue(conf.drips("STUCK_AFTER"), now)
    found = overdue.aggregate(count=Count("pk"), oldest=Min("next_due_at"))
    stuck = found["count"] + lost
    if stuck:
        logger.error(
            "mailer: %d drip enrollments are overdue (oldest due %s, %d had no due time); "
            "queuing a tick",
            stuck,
            found["oldest"].isoformat() if found["oldest"] else "—",
            lost,
        )
        dispatch.enqueue(TICK_TASK)
    return stuck


def run_entries(now: datetime | None = None) -> dict[str, int]:
    """Beat: segment entries and anniversaries."""
    return {
        "segments": enter_segments(now),
        "anniversaries": enter_anniversaries(now),
    }


# --- Reports ----------------------------------------------------------------------------------


def funnel(series: DripSeries) -> list[dict]:
    """Per step, in order: entered, waiting there, emails made, sent, opened and clicked
    (by people: scanners are left out of the first-open and first-click times), failed,
    the decisions' yes and no, and who left there, by reason. Three grouped queries."""
    steps = list(series.steps.select_related("template", "condition_segment"))
    rows = {
        step.pk: {
            "step": step,
            "entered": 0,
            "waiting": 0,
            "made": 0,
            "sent": 0,
            "opened": 0,
            "clicked": 0,
            "failed": 0,
            "yes": 0,
            "no": 0,
            "exited": {},
        }
        for step in steps
    }
    runs = (
        DripStepRun.objects.filter(step__series=series)
        .values_list("step_id", "outcome")
        .annotate(n=Count("pk"))
        .order_by()
    )
    for step_id, outcome, n in runs:
        row = rows[step_id]
        row["entered"] += n
        if outcome in (StepOutcome.YES, StepOutcome.NO):
            row[outcome] += n
    ran = DripStepRun.objects.filter(enrollment=OuterRef("pk"), step=OuterRef("step"))
    standing = (
        Enrollment.objects.filter(series=series, step__isnull=False)
        .annotate(ran=Exists(ran))
        .values_list("step_id", "state", "exit_reason", "ran")
        .annotate(n=Count("pk"))
        .order_by()
    )
    for step_id, state, reason, has_run, n in standing:
        row = rows.get(step_id)
        if row is None:
            continue
        if not has_run:
            row["entered"] += n
        if state == ACTIVE:
            row["waiting"] += n
        else:
            row["exited"][reason] = row["exited"].get(reason, 0) + n
    made = (
        Message.objects.filter(drip_step__series=series)
        .values("drip_step")
        .annotate(
            made=Count("pk"),
            sent=Count("pk", filter=Q(status__in=S.left())),
            opened=Count("pk", filter=Q(opened_at__isnull=False)),
            clicked=Count("pk", filter=Q(clicked_at__isnull=False)),
            failed=Count("pk", filter=Q(status=S.FAILED)),
        )
        .order_by()
    )
    for found in made:
        row = rows.get(found.pop("drip_step"))
        if row is not None:
            row.update(found)
    return [rows[step.pk] for step in steps]


def exits(series: DripSeries) -> dict[str, int]:
    """How many left the series, by reason (the end included)."""
    return dict(
        Enrollment.objects.filter(series=series)
        .exclude(state=ACTIVE)
        .values_list("exit_reason")
        .annotate(n=Count("pk"))
        .order_by()
    )


def where(contact: Contact) -> list[Enrollment]:
    """The contact's enrollments, newest first, with their series and current step."""
    return list(
        Enrollment.objects.filter(contact=contact)
        .select_related("series", "step")
        .order_by("-entered_at")
    )
