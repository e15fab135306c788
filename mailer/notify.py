"""Telling the host what happened: mailer's signals and the outgoing webhooks' rows.

Called where each event is first recorded (``outbox`` for sent and failed, ``tracking``
for ESP events, ``unsubscribe``). Webhook deliveries are written in the same transaction
as the event, once per endpoint and event (unique), and a worker posts them; signals go
out after the commit. A replayed ESP webhook stores no new event, so nothing is sent twice.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from . import counters, dispatch, signals
from .models import Contact, Event, Message, WebhookDelivery, WebhookEndpoint

logger = logging.getLogger(__name__)

#: Webhook event type → the signal sent with it.
SIGNALS = {
    "message.sent": signals.message_sent,
    "message.delivered": signals.message_delivered,
    "message.opened": signals.message_opened,
    "message.clicked": signals.message_clicked,
    "message.bounced": signals.message_bounced,
    "message.complained": signals.message_complained,
    "message.failed": signals.message_failed,
    "contact.unsubscribed": signals.contact_unsubscribed,
}
EVENT_TYPES = tuple(SIGNALS)

#: A stored event's type → the webhook event type it is told as.
FROM_EVENT = {
    Event.Type.DELIVERED: "message.delivered",
    Event.Type.OPENED: "message.opened",
    Event.Type.CLICKED: "message.clicked",
    Event.Type.BOUNCED: "message.bounced",
    Event.Type.COMPLAINED: "message.complained",
    Event.Type.REJECTED: "message.failed",
    Event.Type.FAILED: "message.failed",
    Event.Type.UNSUBSCRIBED: "contact.unsubscribed",
}

DELIVER_TASK = "mailer.tasks.deliver_webhooks"


def public_id(message: Message) -> str:
    """The id the HTTP API and webhooks show for a message: never the database id."""
    return f"msg_{message.uuid.hex}"


def event_id(key: str) -> str:
    return "evt_" + hashlib.sha256(key.encode()).hexdigest()[:32]


# --- Where events are first recorded ------------------------------------------------------


def sent(done: Iterable[tuple[Message, datetime]]) -> None:
    """Emails the server accepted (a worker's batch)."""
    if not _wanted("message.sent"):
        return
    _emit(
        [
            _Told(
                "message.sent",
                event_id(f"sent:{m.uuid.hex}"),
                at,
                message=m,
                event_data={"type": "sent", "at": at.isoformat()},
            )
            for m, at in done
        ]
    )


def failed(message: Message, event: Event | None, error: str) -> None:
    """A message failed for good (recorded by outbox.record_failed)."""
    if not _wanted("message.failed"):
        return
    key = f"failed:{event.pk}" if event is not None else f"failed:{message.uuid.hex}"
    at = event.timestamp if event is not None else timezone.now()
    _emit([_Told("message.failed", event_id(key), at, message=message, event=event)])


def recorded(event: Event, message: Message | None, esp: str = "") -> None:
    """An event stored for the first time (an ESP webhook, our pixel or redirect)."""
    counters.inc("mailer_webhook_events_total", type=event.event_type, esp=esp or "own")
    kind = FROM_EVENT.get(event.event_type)
    if kind is None or event.automated or not _wanted(kind):
        return
    if kind == "contact.unsubscribed":
        unsubscribed(event.recipient, event)
        return
    if message is None:
        return
    _emit([_Told(kind, event_id(f"event:{event.pk}"), event.timestamp, message, event)])


def unsubscribed(email: str, event: Event) -> None:
    """An address unsubscribed from marketing (its Event row was just stored)."""
    if not _wanted("contact.unsubscribed"):
        return
    _emit(
        [
            _Told(
                "contact.unsubscribed",
                event_id(f"event:{event.pk}"),
                event.timestamp,
                event=event,
                email=email,
            )
        ]
    )


# --- Sending signals and writing deliveries -------------------------------------------------


_PAYLOAD_FIELDS = {"uuid", "kind", "to_email", "template_slug", "metadata"}


class _Told:
    """One event to tell: to the signal's receivers, and as a webhook payload."""

    def __init__(self, kind, eid, at, message=None, event=None, *, email="", event_data=None):
        self.kind, self.id, self.at = kind, eid, at
        self.message, self.event, self.email = message, event, email
        self.event_data = event_data

    def payload(self) -> dict:
        data: dict = {}
        if self.message is not None:
            m = self.message
            missing = m.get_deferred_fields() & _PAYLOAD_FIELDS
            if missing:  # tracking loads only what it needs: one query for the rest
                m.refresh_from_db(fields=sorted(missing))
            data["message"] = {
                "id": public_id(m),
                "kind": m.kind,
                "to": m.to_email,
                "template": m.template_slug,
                "metadata": m.metadata or {},
            }
        if self.email:
            data["email"] = self.email
        if self.event is not None:
            e = self.event
            data["event"] = {
                "type": e.event_type,
                "at": e.timestamp.isoformat(),
                "description": e.description[:500],
                "bounce": e.bounce,
            }
        elif self.event_data:
            data["event"] = self.event_data
        return {"id": self.id, "type": self.kind, "created_at": self.at.isoformat(), "data": data}


def _emit(told: list[_Told]) -> None:
    if not told:
        return
    endpoints = _endpoints()
    rows = [
        WebhookDelivery(endpoint_id=pk, event_id=t.id, event_type=t.kind, payload=t.payload())
        for t in told
        for pk, types in endpoints
        if not types or t.kind in types
    ]
    if rows:
        WebhookDelivery.objects.bulk_create(rows, ignore_conflicts=True, batch_size=500)
        transaction.on_commit(lambda: dispatch.enqueue(DELIVER_TASK))
    kinds = {t.kind for t in told}
    if any(SIGNALS[kind].has_listeners(Message) for kind in kinds):
        transaction.on_commit(lambda: _send_signals(told))


def _send_signals(told: list[_Told]) -> None:
    for t in told:
        if SIGNALS[t.kind].has_listeners(Message):
            for receiver, result in _results(t):
                if isinstance(result, Exception):
                    logger.error("mailer: receiver %r of %s failed: %r", receiver, t.kind, result)


def _results(t: _Told):
    kwargs = {"event": t.event, "event_id": t.id}
    if t.kind == "contact.unsubscribed":
        kwargs.update(
            email=t.email,
            contact=Contact.objects.filter(email=t.email).first(),
            message=t.message,
        )
    else:
        kwargs["message"] = t.message
    return SIGNALS[t.kind].send_robust(sender=Message, **kwargs)


# Which endpoints want what, read at most every few seconds per process: the sending
# path asks for every batch.
_ENDPOINTS_TTL = 5.0
_endpoint_cache: list = [0.0, []]


def _endpoints() -> list[tuple[int, set[str]]]:
    now = time.monotonic()
    if now - _endpoint_cache[0] > _ENDPOINTS_TTL:
        _endpoint_cache[1] = [
            (pk, set(types or ()))
            for pk, types in WebhookEndpoint.objects.filter(active=True).values_list(
                "pk", "event_types"
            )
        ]
        _endpoint_cache[0] = now
    return _endpoint_cache[1]


def forget_endpoints() -> None:
    """An endpoint was saved or deleted: read them again on the next event."""
    _endpoint_cache[0] = 0.0


def _wanted(kind: str) -> bool:
    if SIGNALS[kind].has_listeners(Message):
        return True
    return any(not types or kind in types for _, types in _endpoints())
