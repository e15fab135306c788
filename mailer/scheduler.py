"""Beat's scheduler: django-celery-beat's, writing beat's heartbeat from its own tick."""

from __future__ import annotations

import logging
import time

from django.db import DatabaseError
from django_celery_beat.schedulers import DatabaseScheduler

from . import conf, health

logger = logging.getLogger(__name__)


class Scheduler(DatabaseScheduler):
    """A heartbeat written by a thread of its own says the process lives; written from
    the tick, it says beat schedules: a scheduler stuck on a lock or a lost database shows
    as beat down in ``/health/ready``. Run beat with ``-S mailer.scheduler:Scheduler``."""

    ticks_heartbeat = True  # read by receivers.on_beat_started: no heartbeat thread
    _heartbeat_at = float("-inf")

    def tick(self, *args, **kwargs):
        interval = super().tick(*args, **kwargs)
        now = time.monotonic()
        if now - self._heartbeat_at >= float(conf.get("HEARTBEAT_SECONDS")):
            try:
                health.beat(health.beat_name(), "beat", [])
                self._heartbeat_at = now
            except DatabaseError as exc:
                logger.warning("mailer: beat's heartbeat not written (%s)", type(exc).__name__)
        return interval
