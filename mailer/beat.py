"""The periodic tasks mailer needs, written to django-celery-beat's tables from code."""

from __future__ import annotations

#: name → (task, every N seconds). Beat's DatabaseScheduler reads these rows.
SCHEDULE: dict[str, tuple[str, int]] = {
    "mailer: release scheduled messages": ("mailer.tasks.release_due_messages", 15),
    "mailer: recover stuck messages": ("mailer.tasks.recover_stuck_messages", 60),
    "mailer: launch due campaigns": ("mailer.tasks.launch_due_campaigns", 30),
    "mailer: campaign housekeeping": ("mailer.tasks.campaign_housekeeping", 60),
    "mailer: reputation guard": ("mailer.tasks.reputation_guard", 300),
}


def install_schedule(periodic_task_model, interval_model) -> int:
    """Create or update mailer's beat rows; idempotent, and leaves other rows alone.

    Takes the models as arguments so a migration can pass its historical models.
    """
    for name, (task, seconds) in SCHEDULE.items():
        interval, _ = interval_model.objects.get_or_create(every=seconds, period="seconds")
        periodic_task_model.objects.update_or_create(
            name=name, defaults={"task": task, "interval": interval, "enabled": True}
        )
    return len(SCHEDULE)
