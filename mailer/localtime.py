"""Clock times in a contact's own time zone: send windows, local days and weeks, DST.

Everything here is plain arithmetic on aware datetimes with ``zoneinfo``: a wall-clock
time is turned into an instant in its zone (a time the spring change skips moves on to
the same time after the change; one the autumn change repeats is taken the first time),
never by adding hours to a UTC instant, so 09:00 stays 09:00 across a DST change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: How many days ahead a window's next opening is looked for (a window that opens one
#: weekday a week opens within 7).
_HORIZON_DAYS = 8


@lru_cache(maxsize=1024)
def zone(name: str | None) -> ZoneInfo | None:
    """The zone for an IANA name, or None for an empty or unknown one (a contact's
    imported time zone may be anything; it then falls back, never fails a send)."""
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def zone_for(contact_zone: str | None, fallback: str | ZoneInfo) -> ZoneInfo:
    """The contact's own zone if it has a valid one, else the fallback (a series' zone)."""
    found = zone(contact_zone)
    if found is not None:
        return found
    return fallback if isinstance(fallback, ZoneInfo) else (zone(fallback) or ZoneInfo("UTC"))


def at_wall_time(day: date, clock: time, tz: ZoneInfo) -> datetime:
    """The instant (UTC) at which ``tz``'s clocks show ``clock`` on ``day``.

    A clock time the spring change skips (02:30 in a zone that jumps from 02:00 to 03:00)
    becomes the instant that time would have been, i.e. 03:30 after the change; an
    ambiguous one (autumn) is its first occurrence.
    """
    # fold=0: a skipped time is read with the offset before the change, which lands
    # after it; a repeated one is its first occurrence.
    return datetime.combine(day, clock, tzinfo=tz).astimezone(UTC)


@dataclass(frozen=True)
class Window:
    """Weekdays (ISO: 1 = Monday) and clock times when email may go; empty: always."""

    days: frozenset[int] = frozenset()
    start: time | None = None
    end: time | None = None

    @classmethod
    def of(cls, *owners) -> Window:
        """The first owner's window that is set (a step's, else its series')."""
        for owner in owners:
            if owner is not None and (owner.window_days or owner.window_start is not None):
                return cls(
                    days=frozenset(int(d) for d in owner.window_days),
                    start=owner.window_start,
                    end=owner.window_end,
                )
        return cls()

    @property
    def always(self) -> bool:
        return not self.days and self.start is None

    def contains(self, moment: datetime, tz: ZoneInfo) -> bool:
        if self.always:
            return True
        local = moment.astimezone(tz)
        if self.days and local.isoweekday() not in self.days:
            return False
        if self.start is None:
            return True
        opens = at_wall_time(local.date(), self.start, tz)
        closes = at_wall_time(local.date(), self.end, tz)
        return opens <= moment < closes

    def next_open(self, moment: datetime, tz: ZoneInfo) -> datetime:
        """``moment`` if the window is open then, else the window's next opening."""
        if self.contains(moment, tz):
            return moment
        local_day = moment.astimezone(tz).date()
        for ahead in range(_HORIZON_DAYS):
            day = local_day + timedelta(days=ahead)
            if self.days and day.isoweekday() not in self.days:
                continue
            opens = at_wall_time(day, self.start or time(0), tz)
            if opens >= moment:
                return opens
        raise ValueError("A send window with no day in it never opens.")  # pragma: no cover


def later(moment: datetime, delay: timedelta, tz: ZoneInfo) -> datetime:
    """``moment`` plus ``delay``, whole days on the local calendar: "a day later" is the
    same clock time the next day, 23 or 25 hours away across a DST change; the rest of
    the delay (hours, minutes) is elapsed time."""
    days = timedelta(days=delay.days)
    local = moment.astimezone(tz) + days  # wall-clock arithmetic in the zone
    return local.astimezone(UTC) + (delay - days)


def day_bounds(moment: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The local calendar day containing ``moment``: [midnight, next midnight) as instants
    (23 or 25 hours long across a clock change)."""
    day = moment.astimezone(tz).date()
    return at_wall_time(day, time(0), tz), at_wall_time(day + timedelta(days=1), time(0), tz)


def week_bounds(moment: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """The local ISO week (Monday 00:00 to the next Monday 00:00) containing ``moment``."""
    day = moment.astimezone(tz).date()
    monday = day - timedelta(days=day.weekday())
    return at_wall_time(monday, time(0), tz), at_wall_time(monday + timedelta(days=7), time(0), tz)
