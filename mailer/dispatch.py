"""Waking workers: one coalesced drain task per burst of messages, enqueued by task name.

Nothing here knows what a drain does; tasks are found by name in the Celery app, so this
module sits below everything that wants a worker to look at a queue.
"""

from __future__ import annotations

import logging

import redis
from celery import current_app
from django.db import transaction
from kombu.exceptions import OperationalError as BrokerError

from . import conf
from .models import Queue
from .ratelimit import redis_client

logger = logging.getLogger(__name__)

#: How long a kick flag says "a drain is already on its way" (milliseconds).
KICK_TTL_MS = 2000

#: The task that drains each queue; routed by name through ``conf.route_task``.
DRAIN_TASKS = {
    Queue.TRANSACTIONAL: "mailer.tasks.drain_transactional",
    Queue.CAMPAIGN: "mailer.tasks.drain_campaign",
}


def enqueue(name: str, *, args: tuple = (), countdown: float | None = None) -> bool:
    """Send a task by name; False (logged) when the broker is unreachable.

    A task registered in this process goes through ``apply_async`` so eager mode works in a
    host's tests; otherwise by name, for processes that never import the tasks.
    """
    try:
        task = current_app.tasks.get(name)
        if task is not None:
            task.apply_async(args=args, countdown=countdown)
        else:
            current_app.send_task(name, args=args, countdown=countdown)
    except (BrokerError, OSError, redis.RedisError) as exc:
        logger.error("mailer: broker unavailable, %s not enqueued: %s", name, exc)
        return False
    return True


def _kick_key(queue: str) -> str:
    return f"mailer:kick:{conf.queue_name(queue)}"


def kick(queue: str = Queue.TRANSACTIONAL, *, countdown: float | None = None) -> bool:
    """Make sure a drain task will look at ``queue``; coalesce bursts into one task.

    With Redis, a short-lived flag means "a drain is already on its way": the drain
    clears it before looking for work, so a message committed before the flag was seen
    is always found. Returns whether a task was enqueued. When the broker is down the
    rows wait, committed and queued, for beat's recovery to wake a worker.

    A countdown never passes MAX_COUNTDOWN (no long ETAs: the broker would hand the task
    out again after its visibility timeout); mail that waits longer, like mail held for
    its quota window, is woken by beat's recovery once it is due.
    """
    if countdown is not None:
        countdown = min(countdown, float(conf.get("MAX_COUNTDOWN")))
    client = redis_client()
    if client is not None and countdown is None:
        try:
            if not client.set(_kick_key(queue), 1, nx=True, px=KICK_TTL_MS):
                return False
        except redis.RedisError as exc:
            logger.warning("mailer: kick flag unavailable (%s); enqueueing anyway", exc)
    return enqueue(DRAIN_TASKS[Queue(queue)], countdown=countdown)


def kick_on_commit(queue: str = Queue.TRANSACTIONAL) -> None:
    transaction.on_commit(lambda: kick(queue))


def clear_kick(queue: str) -> None:
    """Called by a drain before it looks for work, so the next commit kicks again."""
    client = redis_client()
    if client is not None:
        try:
            client.delete(_kick_key(queue))
        except redis.RedisError as exc:
            logger.warning("mailer: could not clear kick flag: %s", exc)
