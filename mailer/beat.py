"""The periodic tasks mailer needs, written to django-celery-beat's tables from code."""

from __future__ import annotations

import json

#: name → (task, every N seconds, arguments). Beat's DatabaseScheduler reads these rows.
#: Recovery and release run once per queue, on that queue, so each queue's workers look
#: after their own mail: a dead worker's claims come back within the lease plus 15 s.
SCHEDULE: dict[str, tuple[str, int, list]] = {
    "mailer: release scheduled messages": (
        "mailer.tasks.release_due_messages",
        15,
        ["transactional"],
    ),
    "mailer: release scheduled campaign messages": (
        "mailer.tasks.release_due_messages",
        15,
        ["campaign"],
    ),
    "mailer: recover stuck messages": (
        "mailer.tasks.recover_stuck_messages",
        15,
        ["transactional"],
    ),
    "mailer: recover stuck campaign messages": (
        "mailer.tasks.recover_stuck_messages",
        15,
        ["campaign"],
    ),
    "mailer: launch due campaigns": ("mailer.tasks.launch_due_campaigns", 30, []),
    "mailer: campaign housekeeping": ("mailer.tasks.campaign_housekeeping", 60, []),
    "mailer: reputation guard": ("mailer.tasks.reputation_guard", 300, []),
    "mailer: outgoing webhooks": ("mailer.tasks.deliver_webhooks", 60, []),
    "mailer: operator alerts": ("mailer.tasks.operator_alerts", 300, []),
    "mailer: advance drip series": ("mailer.tasks.advance_drips", 10, []),
    "mailer: drip entries (segments, anniversaries)": ("mailer.tasks.drip_entries", 60, []),
    "mailer: overdue drip enrollments": ("mailer.tasks.check_drips", 120, []),
}


def install_schedule(periodic_task_model, interval_model) -> int:
    """Create or update mailer's beat rows; idempotent, and leaves other rows alone.

    Takes the models as arguments so a migration can pass its historical models.
    """
    for name, (task, seconds, args) in SCHEDULE.items():
        interval, _ = interval_model.objects.get_or_create(every=seconds, period="seconds")
        periodic_task_model.objects.update_or_create(
            name=name,
            defaults={
                "task": task,
                "interval": interval,
                "args": json.dumps(args),
                "enabled": True,
            },
        )
    return len(SCHEDULE)
