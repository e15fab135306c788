"""Sending quotas over calendar hours and days, and warm-up caps, shared by every process.

The rate limiter (``ratelimit``) smooths sending second by second; a quota counts what an
ESP allows per hour or day, and a warm-up schedule what a new domain or IP may send per day.
Workers reserve sends in small chunks before they go, from counters in Redis (one Lua
script, so concurrent processes never overshoot) or in the database without Redis. A
reservation is counted whether or not its email then leaves, so a cap is never passed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import redis
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from . import conf
from .models import Queue, QuotaCounter, WarmupSchedule
from .ratelimit import redis_client

logger = logging.getLogger(__name__)

HOUR, DAY = "hour", "day"

#: A batch reserves at most this share of a cap at once, so a batch that ends early (a
#: pause, a stop, an outage) leaves at most 1 % of the cap reserved and unused.
CHUNK_SHARE = 0.01

#: Counters outlive their window by this long, for the admin's figures near a boundary.
KEEP_AFTER = timedelta(hours=1)

# KEYS: one counter per capped window. ARGV[1]: sends wanted; then per key its cap and
# seconds to keep it. Grants what every window has room for (maybe 0), counts it in each,
# and returns the grant followed by each counter's value before it.
_RESERVE = """
local grant = tonumber(ARGV[1])
local before = {}
for i, key in ipairs(KEYS) do
  local used = tonumber(redis.call('GET', key) or '0')
  before[i] = used
  grant = math.min(grant, tonumber(ARGV[2 * i]) - used)
end
if grant < 0 then grant = 0 end
for i, key in ipairs(KEYS) do
  if grant > 0 then redis.call('INCRBY', key, grant) end
  redis.call('EXPIRE', key, tonumber(ARGV[2 * i + 1]))
end
return {grant, unpack(before)}
"""

_scripts: dict[int, object] = {}


@dataclass(frozen=True)
class Window:
    """One capped calendar hour or day of a queue, with the cap that binds in it."""

    queue: Queue
    kind: str  # HOUR or DAY
    start: datetime
    end: datetime
    limit: int
    source: str  # "quota", or the warm-up schedule that sets the cap

    @property
    def key(self) -> str:
        return (
            f"mailer:quota:{conf.queue_name(self.queue)}:{self.kind}:{int(self.start.timestamp())}"
        )

    def describe(self) -> str:
        """Why mail waits, e.g. "daily quota of 50,000 reached (campaign); resumes …"."""
        if self.source == "quota":
            what = f"{'daily' if self.kind == DAY else 'hourly'} quota of {self.limit:,}"
            where = str(self.queue)
        else:
            what = f"warm-up allowance of {self.limit:,} for today"
            where = f"{self.queue}, schedule {self.source!r}"
        return f"{what} reached ({where}); resumes {stamp(self.end)}"


@dataclass(frozen=True)
class Grant:
    """What a reservation got: ``granted`` sends, and when a used-up window opens again."""

    granted: int
    resume_at: datetime | None = None
    reason: str = ""

    def wait(self, now: datetime | None = None) -> float:
        """Seconds until the window that is used up opens again (0 when none is)."""
        if self.resume_at is None:
            return 0.0
        return max(0.0, (self.resume_at - (now or timezone.now())).total_seconds())


@dataclass(frozen=True)
class Usage:
    """A capped window as the admin shows it."""

    window: Window
    used: int

    @property
    def remaining(self) -> int:
        return max(0, self.window.limit - self.used)

    @property
    def resets(self) -> str:
        return stamp(self.window.end)


def stamp(moment: datetime) -> str:
    """A window boundary as people read it, in the quota time zone."""
    zone = conf.quota_timezone()
    return f"{moment.astimezone(zone):%Y-%m-%d %H:%M} {zone.key}"


def local_today(now: datetime | None = None) -> date:
    return (now or timezone.now()).astimezone(conf.quota_timezone()).date()


# --- Caps ------------------------------------------------------------------------------------


def warmup_allowance(schedule: WarmupSchedule, day: date) -> int:
    """The schedule's cap on ``day``: the first day's cap, grown by the factor every
    ``every_days`` days, never past the target. Before the start date: the first day's."""
    steps = max(0, (day - schedule.start_date).days) // max(1, schedule.every_days)
    cap = float(schedule.first_day_cap)
    for _ in range(steps):  # a loop, not a power: no overflow however long it has run
        if cap >= schedule.target_cap:
            break
        cap *= schedule.growth_factor
    return min(schedule.target_cap, int(round(cap, 6)))


def caps(queue: str, now: datetime | None = None) -> dict[str, tuple[int, str]]:
    """The queue's binding cap per window kind, with what sets it: settings quotas, and on
    the campaign (marketing) queue the active warm-up schedules' allowance for today."""
    queue = Queue(queue)
    found = {kind: (limit, "quota") for kind, limit in conf.quotas(queue).items()}
    if queue == Queue.CAMPAIGN:
        today = local_today(now)
        for schedule in WarmupSchedule.objects.filter(active=True).order_by("pk"):
            allowance = warmup_allowance(schedule, today)
            if DAY not in found or allowance < found[DAY][0]:
                found[DAY] = (allowance, schedule.name)
    return found


def windows(queue: str, now: datetime | None = None) -> list[Window]:
    """The queue's capped windows that contain ``now`` (calendar hours and days in the
    quota time zone; a day is 23 or 25 hours long when the clocks change)."""
    now = now or timezone.now()
    zone = conf.quota_timezone()
    local = now.astimezone(zone)
    found = []
    for kind, (limit, source) in sorted(caps(queue, now).items()):
        start, end = _bounds(kind, local, zone)
        found.append(Window(Queue(queue), kind, start, end, limit, source))
    return found


def _bounds(kind: str, local: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    if kind == DAY:
        start = datetime.combine(local.date(), time(), tzinfo=zone)
        end = datetime.combine(local.date() + timedelta(days=1), time(), tzinfo=zone)
        return start.astimezone(UTC), end.astimezone(UTC)
    # Hours in UTC arithmetic: a wall-clock hour is an hour, even across a clock change.
    start = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
    return start, start + timedelta(hours=1)


def chunk_size(queue: str, batch: int) -> int | None:
    """How many sends to reserve at once on a capped queue (None: no cap applies)."""
    found = caps(queue)
    if not found:
        return None
    tightest = min(limit for limit, _ in found.values())
    return max(1, min(batch, math.ceil(tightest * CHUNK_SHARE)))


# --- Reserving --------------------------------------------------------------------------------


def reserve(queue: str, count: int, *, now: datetime | None = None) -> Grant:
    """Reserve up to ``count`` sends on the queue's quotas; never more than every capped
    window has room for. A short grant says when the used-up window opens again.

    Raises ``redis.RedisError`` (or a database error) when the store is unreachable: the
    caller waits, it never sends unlimited.
    """
    now = now or timezone.now()
    capped = windows(queue, now)
    if not capped or count <= 0:
        return Grant(max(count, 0))
    client = redis_client()
    if client is not None:
        granted, before = _reserve_redis(client, capped, count, now)
    else:
        granted, before = _reserve_db(capped, count, now)
    full = [w for w, used in zip(capped, before, strict=True) if used + granted >= w.limit]
    for window, used in zip(capped, before, strict=True):
        if used < window.limit <= used + granted:  # this reservation filled it: log once
            logger.warning("mailer: %s; %s mail waits", window.describe(), window.queue)
    if granted >= count or not full:
        return Grant(granted)
    last = max(full, key=lambda w: w.end)  # a full day outlasts a full hour
    return Grant(granted, resume_at=last.end, reason=last.describe())


def _ttl(window: Window, now: datetime) -> int:
    return max(1, math.ceil((window.end + KEEP_AFTER - now).total_seconds()))


def _reserve_redis(
    client: redis.Redis, capped: list[Window], count: int, now: datetime
) -> tuple[int, list[int]]:
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(_RESERVE)
    args: list[int] = [count]
    for window in capped:
        args += [window.limit, _ttl(window, now)]
    granted, *before = script(keys=[w.key for w in capped], args=args)
    return int(granted), [int(n) for n in before]


def _reserve_db(capped: list[Window], count: int, now: datetime) -> tuple[int, list[int]]:
    with transaction.atomic():
        for window in sorted(capped, key=lambda w: w.key):  # one lock order for everyone
            QuotaCounter.objects.get_or_create(
                key=window.key, defaults={"expires_at": window.end + KEEP_AFTER}
            )
        locked = QuotaCounter.objects.select_for_update().filter(key__in=[w.key for w in capped])
        used = {row.key: row.used for row in locked.order_by("key")}
        rows = [used[w.key] for w in capped]
        granted = max(0, min([count] + [w.limit - n for w, n in zip(capped, rows, strict=True)]))
        if granted:
            QuotaCounter.objects.filter(key__in=[w.key for w in capped]).update(
                used=F("used") + granted
            )
        QuotaCounter.objects.filter(expires_at__lt=now).delete()
    return granted, rows


# --- Reading ----------------------------------------------------------------------------------


def usage(queue: str, now: datetime | None = None) -> list[Usage]:
    """Each capped window of the queue now, with the sends counted in it."""
    now = now or timezone.now()
    capped = windows(queue, now)
    if not capped:
        return []
    keys = [w.key for w in capped]
    client = redis_client()
    if client is not None:
        counts = [int(n or 0) for n in client.mget(keys)]
    else:
        stored = dict(QuotaCounter.objects.filter(key__in=keys).values_list("key", "used"))
        counts = [stored.get(key, 0) for key in keys]
    return [Usage(w, n) for w, n in zip(capped, counts, strict=True)]


def used_up(queue: str, now: datetime | None = None) -> Grant | None:
    """If a window of the queue has no room left: when it opens again, and why."""
    full = [u.window for u in usage(queue, now) if u.remaining == 0]
    if not full:
        return None
    last = max(full, key=lambda w: w.end)
    return Grant(0, resume_at=last.end, reason=last.describe())


def holding(queue: str) -> Grant | None:
    """``used_up``, for callers that must not stop on an unreachable store: the limiter
    waits for the store when it reserves, so here an outage holds nothing."""
    try:
        return used_up(queue)
    except redis.RedisError as exc:
        logger.warning("mailer: quota store unavailable (%s)", exc.__class__.__name__)
        return None
