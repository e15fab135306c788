"""Outgoing webhooks: post each delivery to the host's URL, signed, retried with backoff.

The signature follows Stripe's scheme: ``Mailer-Signature: t=<unix time>,v1=<hex>`` where
the hex is HMAC-SHA256 of ``"<t>.<body>"`` under the endpoint's secret; ``verify`` checks
one on the receiving side. A delivery is leased while it is posted, so two workers never
post it at once; a worker that dies leaves it to be posted again when the lease ends
(at least once: receivers deduplicate by the event id).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta

import requests
from django.db import transaction
from django.db.models import Min
from django.utils import timezone

from . import conf, dispatch
from .models import WebhookDelivery
from .notify import DELIVER_TASK

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "Mailer-Signature"
BATCH = 50
USER_AGENT = "mailer-webhooks/1"


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300) -> bool:
    """For receivers: is ``header`` a valid signature of ``body``, made recently?"""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


@dataclass
class Round:
    delivered: int = 0
    retrying: int = 0
    failed: int = 0


def deliver_due(limit: int = BATCH) -> Round:
    """Post the deliveries that are due (a batch), then wake a worker for the rest."""
    result = Round()
    for delivery in _lease(limit):
        _post(delivery, result)
    _schedule_next()
    return result


def _lease(limit: int) -> list[WebhookDelivery]:
    """Take due deliveries for the time a post may take: others skip them meanwhile."""
    now = timezone.now()
    lease = now + timedelta(seconds=float(conf.get("WEBHOOK_TIMEOUT")) + 30)
    with transaction.atomic():
        due = list(
            WebhookDelivery.objects.select_related("endpoint")
            .filter(status=WebhookDelivery.Status.PENDING, next_attempt_at__lte=now)
            .order_by("next_attempt_at", "id")
            .select_for_update(skip_locked=True, of=("self",))[:limit]
        )
        WebhookDelivery.objects.filter(pk__in=[d.pk for d in due]).update(next_attempt_at=lease)
    return due


def _post(delivery: WebhookDelivery, result: Round) -> None:
    endpoint = delivery.endpoint
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        SIGNATURE_HEADER: sign(endpoint.secret, body, int(time.time())),
        "Mailer-Event-Id": delivery.event_id,
        "Mailer-Event-Type": delivery.event_type,
    }
    attempts = delivery.attempts + 1
    code, error = None, ""
    if not endpoint.active:
        error = "The endpoint was disabled."
    else:
        try:
            answer = requests.post(
                endpoint.url,
                data=body,
                headers=headers,
                timeout=float(conf.get("WEBHOOK_TIMEOUT")),
                allow_redirects=False,
            )
            code = answer.status_code
            if not 200 <= code < 300:
                error = f"HTTP {code}"
        except requests.RequestException as exc:
            error = f"{exc.__class__.__name__}: the endpoint could not be reached"
    fields: dict = {"attempts": attempts, "last_status_code": code, "last_error": error}
    if not error:
        fields.update(status=WebhookDelivery.Status.DELIVERED, delivered_at=timezone.now())
        result.delivered += 1
    elif attempts >= int(conf.get("WEBHOOK_MAX_ATTEMPTS")) or not endpoint.active:
        fields["status"] = WebhookDelivery.Status.FAILED
        result.failed += 1
        logger.warning("mailer: webhook delivery %s failed for good: %s", delivery.pk, error)
    else:
        fields["next_attempt_at"] = timezone.now() + timedelta(seconds=backoff(attempts))
        result.retrying += 1
    WebhookDelivery.objects.filter(pk=delivery.pk).update(**fields)


def backoff(attempts: int) -> float:
    """Seconds before the next try: WEBHOOK_BACKOFF_BASE doubling, capped at an hour."""
    return min(float(conf.get("WEBHOOK_BACKOFF_BASE")) * 2 ** (attempts - 1), 3600.0)


def _schedule_next() -> None:
    """One follow-up task: at once if more are due, else when the next retry falls due
    (beat's sweep catches anything later than MAX_COUNTDOWN)."""
    soonest = WebhookDelivery.objects.filter(status=WebhookDelivery.Status.PENDING).aggregate(
        at=Min("next_attempt_at")
    )["at"]
    if soonest is None:
        return
    wait = max(0.0, (soonest - timezone.now()).total_seconds())
    if wait <= float(conf.get("MAX_COUNTDOWN")):
        dispatch.enqueue(DELIVER_TASK, countdown=wait or None)


def redeliver(queryset) -> int:
    """Admin: post these deliveries again now (failed ones too)."""
    count = queryset.update(
        status=WebhookDelivery.Status.PENDING, next_attempt_at=timezone.now(), attempts=0
    )
    if count:
        transaction.on_commit(lambda: dispatch.enqueue(DELIVER_TASK))
    return count
