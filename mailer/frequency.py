"""The frequency cap: how much marketing email (campaigns and drips together; never
transactional) one contact may get per calendar day and ISO week in their own time zone.

Two places decide, and both lock the contacts' rows first so that two processes deciding
for one contact take turns: beat's drip tick before it makes a step's email (a capped
step waits for the next allowed moment in its send window), and a campaign worker for
the campaign emails it claimed (a capped one is scheduled for the next allowed day, at
the same clock time). Never dropped, only delayed.
"""

from __future__ import annotations

import bisect
from datetime import datetime, timedelta

from django.db.models import Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from . import conf, localtime
from .localtime import Window
from .models import Contact, Kind, Message, MessageStatus

S = MessageStatus

#: Messages the cap does not count: they never went and never will.
NOT_COUNTED = (S.CANCELLED, S.FAILED, S.SUPPRESSED)
#: What a campaign worker counts: email that left or is leaving, and drip steps (their
#: tick reserved the slot). A campaign email merely queued has reserved nothing yet.
COMMITTED = Q(status__in=(*S.left(), S.SENDING)) | Q(
    kind=Kind.DRIP, status__in=(S.QUEUED, S.SCHEDULED)
)


def lock(contact_ids) -> dict[int, str]:
    """Lock the contacts' rows until the transaction ends (in id order, so two lockers
    never wait on each other in a cycle); returns their time zones."""
    return dict(
        Contact.objects.select_for_update()
        .filter(pk__in=sorted(set(contact_ids)))
        .order_by("pk")
        .values_list("pk", "timezone")
    )


class Ledger:
    """The marketing email each of some contacts has around ``now``, by the time it goes
    (or went): sent, or planned. ``committed`` counts what a campaign worker counts."""

    def __init__(
        self,
        contact_ids,
        now: datetime,
        caps: dict[str, int],
        *,
        committed: bool = False,
        leave_out=(),
    ):
        self.caps = caps
        ids = sorted(set(contact_ids))
        found = Message.objects.filter(contact_id__in=ids, kind__in=Kind.marketing())
        if committed:
            found = found.filter(COMMITTED)
        else:
            found = found.exclude(status__in=NOT_COUNTED)
        if leave_out:
            found = found.exclude(pk__in=list(leave_out))
        rows = (
            found.annotate(planned=Coalesce("sent_at", "send_after", "queued_at", "created_at"))
            .filter(planned__gte=now - timedelta(days=8))
            .values_list("contact_id", "planned")
        )
        self.times: dict[int, list[datetime]] = {}
        for contact_id, planned_at in rows:
            self.times.setdefault(contact_id, []).append(planned_at)
        for times in self.times.values():
            times.sort()

    def add(self, contact_id: int, moment: datetime) -> None:
        bisect.insort(self.times.setdefault(contact_id, []), moment)

    def count(self, contact_id: int, start: datetime, end: datetime) -> int:
        times = self.times.get(contact_id, [])
        return bisect.bisect_left(times, end) - bisect.bisect_left(times, start)

    def full_until(self, contact_id: int, moment: datetime, tz) -> tuple[datetime | None, str]:
        """When the day or week holding ``moment`` that has no room left ends (None: there
        is room), and which cap it is."""
        until, why = None, ""
        for kind, bounds in (("day", localtime.day_bounds), ("week", localtime.week_bounds)):
            limit = self.caps.get(kind)
            if limit is None:
                continue
            start, end = bounds(moment, tz)
            if self.count(contact_id, start, end) >= limit:
                if until is None or end > until:
                    until = end
                why = f"Waiting: frequency cap of {limit} a {kind} reached."
        return until, why

    def first_allowed(
        self, contact_id: int, moment: datetime, tz, window: Window | None = None
    ) -> tuple[datetime, str]:
        """The first moment from ``moment`` with room under every cap, and why it moved
        ("" if it did not): the window's next opening after the full day or week, or
        without a window the same clock time on the first day with room."""
        why = ""
        for _ in range(400):  # a year of days: any cap has room long before
            until, reason = self.full_until(contact_id, moment, tz)
            if until is None:
                return moment, why
            why = reason
            if window is not None:
                moment = window.next_open(until, tz)
            else:
                while moment < until:
                    moment = localtime.later(moment, timedelta(days=1), tz)
        return moment, why


def hold_capped(messages: list[Message], now: datetime | None = None) -> dict[int, tuple]:
    """Which of a claimed batch's campaign emails would pass the cap, with when each may
    go and why; the others are counted as going now. Call inside a transaction: the
    contacts stay locked until the caller has written its decision."""
    caps = conf.frequency_cap()
    mine = [m for m in messages if m.kind == Kind.CAMPAIGN and m.contact_id is not None]
    if not caps or not mine:
        return {}
    now = now or timezone.now()
    zones = lock(m.contact_id for m in mine)
    ledger = Ledger(zones, now, caps, committed=True, leave_out=[m.pk for m in messages])
    fallback = conf.site_timezone()
    held = {}
    for message in sorted(mine, key=lambda m: m.pk):
        tz = localtime.zone_for(zones.get(message.contact_id), fallback)
        until, why = ledger.first_allowed(message.contact_id, now, tz)
        if until > now:
            held[message.pk] = (until, why)
        else:
            ledger.add(message.contact_id, now)
    return held
