"""Adaptive throttling: a server's "slow down" halves a queue's speed, for every worker.

Gmail and Outlook answer a sender that goes too fast with 421 / 4.7.x, ESPs with 429;
one that carries on gets deferred for hours or blocked. Each such reply halves the
queue's speed (its connections per process and its rate limit), down to a tenth; while
no more come, the speed comes back a tenth every THROTTLE_RECOVERY seconds. The state is
one row per queue, so every process slows down together and the admin shows it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from . import conf
from .models import Queue, QueueThrottle

logger = logging.getLogger(__name__)

SLOWEST = 0.1  # never below a tenth of the configured speed (and one connection)
STEP = 0.1  # regained after each quiet THROTTLE_RECOVERY seconds
#: Replies within this long of the last slow-down are the same event (a pool's lanes
#: meet the same throttling together): one halving, not forty.
SAME_EVENT_SECONDS = 2.0


@dataclass(frozen=True)
class Speed:
    """A queue's speed now: 1.0 is full speed."""

    factor: float
    reason: str = ""
    since: datetime | None = None

    @property
    def throttled(self) -> bool:
        return self.factor < 1.0

    def connections(self, configured: int) -> int:
        return max(1, math.ceil(configured * self.factor - 1e-9))

    def rate(self, configured: float | None) -> float | None:
        return None if configured is None else max(configured * self.factor, 0.1)


FULL = Speed(1.0)


def speed(queue: str, now: datetime | None = None) -> Speed:
    """The queue's speed: the factor at the last slow-down, plus what was regained since."""
    row = QueueThrottle.objects.filter(queue=queue).first()
    return _current(row, now or timezone.now())


def speed_of(row: QueueThrottle | None, now: datetime | None = None) -> Speed:
    """The speed a row already read stands for (the admin's list reads each row once)."""
    return _current(row, now or timezone.now())


def _current(row: QueueThrottle | None, now: datetime) -> Speed:
    if row is None or row.signalled_at is None or row.factor >= 1.0:
        return FULL
    quiet = max(0.0, (now - row.signalled_at).total_seconds())
    factor = min(1.0, row.factor + STEP * math.floor(quiet / _recovery()))
    if factor >= 1.0:
        return FULL
    return Speed(round(factor, 3), row.reason, row.since)


def _recovery() -> float:
    return max(1.0, float(conf.get("THROTTLE_RECOVERY")))


def slow_down(queue: str, reason: str, now: datetime | None = None) -> Speed:
    """The server asked us to slow down: halve the queue's speed (once per event)."""
    now = now or timezone.now()
    with transaction.atomic():
        row, _ = QueueThrottle.objects.select_for_update().get_or_create(queue=queue)
        current = _current(row, now)
        same_event = (
            row.signalled_at is not None
            and (now - row.signalled_at).total_seconds() < SAME_EVENT_SECONDS
            and row.factor < 1.0
        )
        if same_event:
            factor = row.factor
        else:
            factor = max(SLOWEST, round(current.factor / 2, 3))
        row.factor, row.reason, row.signalled_at = factor, reason[:500], now
        row.since = current.since if current.throttled else now
        row.save()
    if not same_event:
        configured = conf.connections(queue)
        logger.warning(
            "mailer: %s queue throttled by the server (%s): sending at %d%% "
            "(%d of %d connections per process%s)",
            queue,
            reason,
            round(factor * 100),
            Speed(factor).connections(configured),
            configured,
            _rate_text(queue, factor),
        )
    return Speed(factor, row.reason, row.since)


def _rate_text(queue: str, factor: float) -> str:
    rate = Speed(factor).rate(conf.rate_limit(queue))
    return "" if rate is None else f", {rate:g}/s"


def reset(queue: str) -> None:
    """Back to full speed at once (an admin's decision)."""
    QueueThrottle.objects.filter(queue=queue).update(factor=1.0, since=None)


def states(now: datetime | None = None) -> dict[str, Speed]:
    """Every queue's speed, for the admin."""
    now = now or timezone.now()
    rows = {row.queue: row for row in QueueThrottle.objects.all()}
    return {queue.value: _current(rows.get(queue.value), now) for queue in Queue}
