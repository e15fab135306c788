"""Celery tasks: thin edges that call one function of the concern's module.

Routing lives in ``mailer.conf.route_task`` (the CELERY_TASK_ROUTES of the host).
"""

from celery import shared_task

from . import (
    abtest,
    accounts,
    alerts,
    campaigns,
    delivery,
    drips,
    outbox,
    reputation,
    webhooks_out,
)
from .models import Queue

_RELIABLE = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True}


@shared_task(name="mailer.tasks.drain_transactional", **_RELIABLE)
def drain_transactional() -> int:
    """Send every due transactional message, batch by batch."""
    return delivery.drain(Queue.TRANSACTIONAL)


@shared_task(name="mailer.tasks.drain_campaign", **_RELIABLE)
def drain_campaign() -> int:
    """Send every due campaign and drip message, batch by batch."""
    return delivery.drain(Queue.CAMPAIGN)


@shared_task(name="mailer.tasks.release_due_messages", **_RELIABLE)
def release_due_messages(queue: str | None = None) -> int:
    """Beat: hand scheduled messages whose time has come to the queue's workers."""
    return outbox.wake_due(queue)


@shared_task(name="mailer.tasks.recover_stuck_messages", **_RELIABLE)
def recover_stuck_messages(queue: str | None = None) -> dict:
    """Beat: recover a stopped worker's lapsed claims; wake workers for lost kicks."""
    return outbox.recover_stuck(queue)


@shared_task(name="mailer.tasks.launch_campaign", **_RELIABLE)
def launch_campaign(campaign_id: int) -> int:
    """Launch one campaign now (Send now); a no-op unless it is scheduled and due."""
    return campaigns.launch(campaign_id)


@shared_task(name="mailer.tasks.launch_due_campaigns", **_RELIABLE)
def launch_due_campaigns() -> int:
    """Beat: launch campaigns whose send time has come."""
    return campaigns.launch_due()


@shared_task(name="mailer.tasks.campaign_housekeeping", **_RELIABLE)
def campaign_housekeeping() -> dict:
    """Beat: pick A/B winners whose window ended; mark finished campaigns sent."""
    return {"winners": abtest.pick_due_winners(), "finished": campaigns.finish_campaigns()}


@shared_task(name="mailer.tasks.finish_campaigns", **_RELIABLE)
def finish_campaigns(campaign_ids: list[int]) -> int:
    """A worker handled the last email of these campaigns: mark them sent now."""
    return campaigns.finish_campaigns(ids=campaign_ids)


@shared_task(name="mailer.tasks.reputation_guard", **_RELIABLE)
def reputation_guard() -> bool:
    """Beat: pause marketing when bounce or complaint rates pass the thresholds."""
    return reputation.reputation_guard() is not None


@shared_task(name="mailer.tasks.password_reset", **_RELIABLE)
def password_reset(email: str) -> int:
    """A reset request: send the link if an account has this address, else nothing."""
    return len(accounts.password_reset(email))


@shared_task(name="mailer.tasks.deliver_webhooks", **_RELIABLE)
def deliver_webhooks() -> int:
    """Post due outgoing webhooks (and beat's sweep for any whose wake-up was lost)."""
    return webhooks_out.deliver_due().delivered


@shared_task(name="mailer.tasks.operator_alerts", **_RELIABLE)
def operator_alerts() -> int:
    """Beat: email ADMINS (throttled) when failed messages pile up."""
    return alerts.check_failed()


@shared_task(name="mailer.tasks.advance_drips", **_RELIABLE)
def advance_drips() -> int:
    """Beat, and new enrollments: move due drip enrollments through their steps."""
    return drips.tick().steps


@shared_task(name="mailer.tasks.drip_entries", **_RELIABLE)
def drip_entries() -> dict:
    """Beat: enroll new members of entry segments, and today's anniversaries."""
    return drips.run_entries()


@shared_task(name="mailer.tasks.check_drips", **_RELIABLE)
def check_drips() -> int:
    """Beat: report and re-queue drip enrollments overdue without progress."""
    return drips.check_stuck()
