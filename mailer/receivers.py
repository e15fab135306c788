"""Signal receivers: each calls one function in the concern's module."""

import logging
import os
import signal
import threading

from billiard.process import active_children
from celery.utils.imports import symbol_by_name

from . import (
    accounts,
    conf,
    delivery,
    dispatch,
    drips,
    health,
    notify,
    rendering,
    tracking,
    unsubscribe,
)
from .models import Queue, check_header_fields

logger = logging.getLogger(__name__)


def on_user_registered(sender, user, request=None, **kwargs) -> None:
    accounts.welcome(user)


def on_user_registered_drips(sender, user, request=None, **kwargs) -> None:
    """Registration is the event ``user_registered``: it starts the onboarding series."""
    drips.trigger("user_registered", drips.contact_for(user))


def on_suppression_saved(sender, instance, created=False, **kwargs) -> None:
    if created:
        drips.exit_for_suppression(instance)


def on_password_reset_requested(sender, user, reset_url, request=None, **kwargs) -> None:
    accounts.send_password_reset(user, reset_url=reset_url)


def on_tracking(sender, event, esp_name, **kwargs) -> None:
    """anymail's tracking signal: one normalized ESP event."""
    tracking.record(event, esp_name.lower().replace(" ", "_"))


def on_inbound(sender, event, esp_name, **kwargs) -> None:
    """anymail's inbound signal: a reply to our List-Unsubscribe mailto unsubscribes."""
    message = event.message
    if message is None:
        return
    target = unsubscribe.from_inbound(message.get("Subject", "") or "", message.text or "")
    if target is not None:
        unsubscribe.unsubscribe(target, source=f"mailto via {esp_name}")


def on_template_changed(sender, **kwargs) -> None:
    rendering.forget_templates()


def on_template_saving(sender, instance, **kwargs) -> None:
    """Caught on save, not on send: a broken template never reaches the outbox."""
    rendering.validate_template(instance)


def on_header_fields_saving(sender, instance, update_fields=None, **kwargs) -> None:
    """A sender name or subject with a line break is refused on save, whoever saves it:
    stored, it would fail every email of its campaign. Only the fields being written are
    checked, so a row stored before this check can still be paused or cancelled."""
    check_header_fields(instance, update_fields)


def on_worker_stopping(sender=None, **kwargs) -> None:
    """Celery's warm shutdown began (main process): stop claiming here, and tell the pool
    children, which Celery does not signal, to finish or hand back what they hold."""
    delivery.request_stop()  # the solo and threads pools drain in this process
    for child in active_children():
        try:
            os.kill(child.pid, signal.SIGTERM)
        except (OSError, TypeError):
            continue  # already gone


def on_worker_ready(sender=None, **kwargs) -> None:
    """A worker that starts looks for work at once: mail a dead worker left queued does
    not wait for beat."""
    consumer = getattr(sender, "task_consumer", None)
    names = {queue.name for queue in getattr(consumer, "queues", None) or ()}
    for queue in Queue:
        if not names or conf.queue_name(queue) in names:
            dispatch.kick(queue)


def on_task_starting(sender=None, **kwargs) -> None:
    """While a drain runs in a pool child, SIGTERM (forwarded above, or sent to the whole
    process group by systemd or honcho) means: finish the email on the wire, hand back
    the rest, return. Billiard's own handler, which exits at once, is put back after."""
    if getattr(sender, "name", "") in DRAIN_TASK_NAMES and _in_main_thread():
        _previous_handlers.append(signal.signal(signal.SIGTERM, _stop_draining))


def on_task_finished(sender=None, **kwargs) -> None:
    if getattr(sender, "name", "") in DRAIN_TASK_NAMES and _in_main_thread():
        if _previous_handlers:
            signal.signal(signal.SIGTERM, _previous_handlers.pop())


DRAIN_TASK_NAMES = frozenset(dispatch.DRAIN_TASKS.values())
_previous_handlers: list = []


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _stop_draining(signum, frame) -> None:
    delivery.request_stop()


# --- Heartbeats and outgoing webhook endpoints (health, notify) -------------------------------


def on_worker_heartbeat_start(sender=None, **kwargs) -> None:
    """A worker started: write its heartbeat (with its queues) from now on."""
    consumer = getattr(sender, "task_consumer", None)
    queues = sorted({queue.name for queue in getattr(consumer, "queues", None) or ()})
    health.start_heartbeat(_worker_name(sender), "worker", queues)


def on_worker_heartbeat_stop(sender=None, **kwargs) -> None:
    health.stop_heartbeat(_worker_name(sender))


def on_beat_started(sender=None, **kwargs) -> None:
    # Resolved by name: importing mailer.scheduler here would load django-celery-beat's
    # models in every process, before check E010 can say it is missing.
    scheduler = getattr(sender, "scheduler_cls", None)
    if scheduler is not None and getattr(symbol_by_name(scheduler), "ticks_heartbeat", False):
        return  # mailer's scheduler writes the heartbeat from its tick
    health.start_heartbeat(health.beat_name(), "beat", [])


def on_webhook_endpoint_changed(sender, **kwargs) -> None:
    notify.forget_endpoints()


def _worker_name(sender) -> str:
    return str(getattr(sender, "hostname", None) or f"worker@{os.getpid()}")
