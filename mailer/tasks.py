"""Celery tasks: thin wrappers around the delivery module.

Routing lives in ``mailer.conf.route_task`` (the CELERY_TASK_ROUTES of the host).
"""

from celery import shared_task

from . import delivery
from .models import Kind

_RELIABLE = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True}


@shared_task(name="mailer.tasks.drain_transactional", **_RELIABLE)
def drain_transactional() -> int:
    """Send every due transactional message, batch by batch."""
    return delivery.drain(Kind.TRANSACTIONAL)


@shared_task(name="mailer.tasks.drain_campaign", **_RELIABLE)
def drain_campaign() -> int:
    """Send every due campaign and drip message, batch by batch."""
    return delivery.drain(Kind.CAMPAIGN)


@shared_task(name="mailer.tasks.release_due_messages", **_RELIABLE)
def release_due_messages() -> int:
    """Beat: hand scheduled messages whose time has come to the workers."""
    return delivery.release_due()


@shared_task(name="mailer.tasks.recover_stuck_messages", **_RELIABLE)
def recover_stuck_messages() -> dict:
    """Beat: recover messages a dead worker left in sending, wake workers for lost kicks."""
    return delivery.recover_stuck()


def drain_task(kind: str):
    """The drain task for a kind of mail."""
    return {Kind.TRANSACTIONAL: drain_transactional, Kind.CAMPAIGN: drain_campaign}[kind]
