"""What happens after an email leaves: ESP events, our own opens and clicks, bounces.

Every event is stored once (unique on the provider's event id, or a stable hash), and a
message's status only moves forward, so replays and reordering change nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import redis
from django.core import signing
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from . import compose, conf, notify, outbox
from .exceptions import InvalidWebhook, MailerError, WebhookStoreUnavailable
from .models import Event, Link, Message, Suppression, WebhookSignature
from .ratelimit import redis_client
from .suppressions import suppress

logger = logging.getLogger(__name__)

# Soft (temporary) Postmark bounce types (anymail calls Transient and DnsError "deferred").
_POSTMARK_SOFT = {"SoftBounce", "Transient", "DnsError", "MailFrontier", "ChallengeVerification"}
_SOFT_MARKERS = re.compile(r"soft|transient|temporar", re.I)


class TrackingError(MailerError):
    """A tracking link or pixel that is forged, altered or unknown."""


# --- Guarding ESP webhooks ---------------------------------------------------------------------

#: Fields of anymail's normalized event and what each may hold. An ESP's raw payload of the
#: wrong shape can parse into anything; nothing of it is recorded unless all fit.
_TEXT_FIELDS = (
    "event_type",
    "recipient",
    "click_url",
    "user_agent",
    "description",
    "mta_response",
    "reject_reason",
)
_ID_FIELDS = ("event_id", "message_id")


def check_event(event, esp: str) -> None:
    """Refuse (InvalidWebhook, a 400) an event whose fields have the wrong types."""
    wrong = [
        name
        for name in _TEXT_FIELDS
        if getattr(event, name, None) is not None and not isinstance(getattr(event, name), str)
    ]
    for name in _ID_FIELDS:
        value = getattr(event, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
            wrong.append(name)
    metadata = getattr(event, "metadata", None)
    if metadata is not None and not isinstance(metadata, dict):
        wrong.append("metadata")
    elif metadata and not isinstance(metadata.get("mailer_message_id", ""), str):
        wrong.append("metadata.mailer_message_id")
    tags = getattr(event, "tags", None)
    if tags is not None and (
        not isinstance(tags, list | tuple) or not all(isinstance(tag, str) for tag in tags)
    ):
        wrong.append("tags")
    stamp = getattr(event, "timestamp", None)
    if stamp is not None and not isinstance(stamp, datetime):
        wrong.append("timestamp")
    if wrong:
        raise InvalidWebhook(f"A {esp} event has fields of the wrong type: {', '.join(wrong)}.")
    if isinstance(event.recipient, str) and len(event.recipient) > 254:
        raise InvalidWebhook(f"A {esp} event names a recipient longer than an address can be.")
    if not (event.recipient or event.message_id or (metadata or {}).get("mailer_message_id")):
        raise InvalidWebhook(f"A {esp} event names no recipient and no message.")


def accept_signature(esp: str, *, timestamp: object, token: object) -> None:
    """A signed webhook is fresh and its signature not seen before, or InvalidWebhook.

    The signature (checked by anymail before this) covers the timestamp and the token,
    not the event data: without these checks a captured signature would carry any event,
    at any time. WebhookStoreUnavailable when the store of seen tokens cannot answer.
    """
    max_age = conf.webhook_max_age()
    try:
        signed_at = float(timestamp)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidWebhook(f"The {esp} webhook signature has no valid timestamp.") from None
    if not math.isfinite(signed_at) or abs(time.time() - signed_at) > max_age:
        raise InvalidWebhook(
            f"The {esp} webhook signature is stale: signed more than {max_age:.0f} seconds "
            "from now (MAILER['WEBHOOK_MAX_AGE'])."
        )
    if not isinstance(token, str) or not token:
        raise InvalidWebhook(f"The {esp} webhook signature has no token.")
    if not first_use(esp, token, ttl=2 * max_age):
        raise InvalidWebhook(f"The {esp} webhook signature was used before: replay refused.")


def first_use(esp: str, token: str, *, ttl: float) -> bool:
    """Whether this is the first time ``token`` is seen within ``ttl`` seconds, across every
    web process: in Redis (a key that expires), else in the database."""
    key = f"{esp[:20]}:{hashlib.sha256(token.encode()).hexdigest()}"
    client = redis_client()
    if client is not None:
        try:
            return bool(
                client.set(f"mailer:webhook-signature:{key}", 1, nx=True, ex=math.ceil(ttl))
            )
        except redis.RedisError as exc:
            raise WebhookStoreUnavailable(
                f"The store of seen webhook signatures is unreachable: {exc}"
            ) from exc
    now = timezone.now()
    expires_at = now + timedelta(seconds=ttl)
    WebhookSignature.objects.filter(expires_at__lt=now).delete()
    try:
        with transaction.atomic():
            WebhookSignature.objects.create(key=key, expires_at=expires_at)
    except IntegrityError:
        return False
    return True


def same_address(a: str, b: str) -> bool:
    """Equal as mail sees them: case aside, and a domain in Unicode or in IDNA form."""
    return conf.ascii_domain(a.strip().lower()) == conf.ascii_domain(b.strip().lower())


# --- ESP events ----------------------------------------------------------------------------


def _event_key(esp: str, event) -> str:
    """Unique per event and recipient: SES gives every recipient of one notification the
    same id, so the recipient is part of the key."""
    event_id = event.event_id
    raw = event.esp_event.get("event-data") if isinstance(event.esp_event, dict) else None
    if esp == "mailgun" and isinstance(raw, dict) and raw.get("id"):
        # anymail's id for a Mailgun event is its signature's token, new on every POST (a
        # retry too, and a reused one is refused): the event's own id, unique within a
        # day, with its time, is the same however often Mailgun posts it.
        event_id = f"{raw['id']}:{raw.get('timestamp', '')}"
    if event_id:
        key = f"{esp}:{event_id}:{(event.recipient or '').lower()}"
        return (
            key if len(key) <= 255 else f"{esp}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"
        )
    # No id from the ESP: a stable hash of what identifies the event.
    timestamp = event.timestamp.isoformat() if event.timestamp else ""
    parts = [esp, event.event_type, event.message_id, event.recipient, timestamp, event.click_url]
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
    return f"{esp}:sha256:{digest}"


def find_message(event) -> Message | None:
    """By our id in the metadata (works before the send recorded the provider id), then
    by the provider's message id."""
    ours = (event.metadata or {}).get("mailer_message_id")
    if ours:
        try:
            found = (
                Message.objects.filter(uuid=uuid.UUID(str(ours)))
                .only("id", "to_email", "campaign_id")
                .first()
            )
        except ValueError:
            found = None
        if found is not None:
            return found
    if event.message_id:
        return (
            Message.objects.filter(provider_message_id=str(event.message_id))
            .only("id", "to_email", "campaign_id")
            .first()
        )
    return None


def bounce_kind(esp: str, event) -> str:
    """'hard', 'soft' or '' for an anymail event, read from the ESP's own fields.

    anymail calls most bounces "bounced"; whether one is temporary is ESP-specific.
    """
    if event.event_type == Event.Type.DEFERRED:
        # Mailgun reports a temporary *failure* this way, and so does Postmark for its
        # Transient and DnsError bounce records; elsewhere it is only a delay.
        raw = event.esp_event if isinstance(event.esp_event, dict) else {}
        postmark_bounce = esp == "postmark" and raw.get("RecordType") == "Bounce"
        soft = esp == "mailgun" or (postmark_bounce and raw.get("Type") in _POSTMARK_SOFT)
        return Event.Bounce.SOFT if soft else Event.Bounce.NONE
    if event.event_type != Event.Type.BOUNCED:
        return Event.Bounce.NONE
    raw = event.esp_event if isinstance(event.esp_event, dict) else {}
    if esp == "postmark":
        soft = raw.get("Type") in _POSTMARK_SOFT
    elif esp in ("brevo", "sendinblue"):
        soft = raw.get("event") == "soft_bounce"
    elif esp == "sendgrid":
        soft = raw.get("type") == "blocked"
    elif esp == "amazon_ses":
        bounce = raw.get("bounce") if isinstance(raw.get("bounce"), dict) else {}
        soft = bounce.get("bounceType") in ("Transient", "Undetermined")
    elif esp == "mailgun":
        soft = raw.get("severity") == "temporary"
    else:
        soft = bool(_SOFT_MARKERS.search(f"{raw.get('type', '')} {raw.get('event', '')}"))
    return Event.Bounce.SOFT if soft else Event.Bounce.HARD


def record(event, esp: str) -> Event | None:
    """Store one anymail tracking event and apply its consequences; None for a replay, or
    for an event whose message was sent to another address than the event names."""
    check_event(event, esp)
    message = find_message(event)
    if (
        message is not None
        and event.recipient
        and not same_address(event.recipient, message.to_email)
    ):
        # Its ids point at someone else's message: moving that message, or suppressing
        # its address, on this event's word would be wrong. Nothing is recorded.
        logger.warning(
            "mailer: %s event for message %s names another recipient; ignored", esp, message.pk
        )
        return None
    recipient = (event.recipient or (message.to_email if message else "") or "").strip().lower()
    stamp = event.timestamp
    if stamp is not None and timezone.is_naive(stamp):
        stamp = stamp.replace(tzinfo=UTC)
    data = {
        "esp": esp,
        "reject_reason": event.reject_reason,
        "mta_response": (event.mta_response or "")[:1000],
        "tags": list(event.tags or []),
    }
    if event.click_url:
        data["click_url"] = event.click_url[:2000]
    if event.user_agent:
        data["user_agent"] = event.user_agent[:500]
    stored = Event(
        message=message,
        campaign_id=message.campaign_id if message else None,
        link_id=compose.link_id(event.click_url) if event.click_url else None,
        event_type=event.event_type
        if event.event_type in Event.Type.values
        else Event.Type.UNKNOWN,
        provider_event_id=_event_key(esp, event),
        recipient=recipient[:254],
        timestamp=stamp or timezone.now(),
        description=(event.description or "")[:2000],
        bounce=bounce_kind(esp, event),
        data=data,
    )
    if not outbox.insert_event_once(stored):
        return None  # seen before: a replayed webhook changes nothing
    if message is not None:
        outbox.apply_event(message.pk, stored.event_type, stored.timestamp)
    apply_policy(stored, reject_reason=event.reject_reason)
    notify.recorded(stored, message, esp)  # first time only: signals, outgoing webhooks
    return stored


def apply_policy(event: Event, *, reject_reason: str | None = None) -> Suppression | None:
    """Suppress the recipient as the event warrants (MAILER soft-bounce settings)."""
    address = event.recipient
    if not address:
        return None
    source = f"webhook:{event.data.get('esp', 'own')}"
    kind, reason, scope = event.event_type, None, None
    if kind == Event.Type.BOUNCED and event.bounce == Event.Bounce.HARD:
        reason, scope = Suppression.Reason.HARD_BOUNCE, Suppression.Scope.ALL
    elif kind in (Event.Type.REJECTED, Event.Type.FAILED) and reject_reason == "invalid":
        reason, scope = Suppression.Reason.INVALID, Suppression.Scope.ALL
    elif event.bounce == Event.Bounce.SOFT:
        since = timezone.now() - timedelta(days=int(conf.get("SOFT_BOUNCE_DAYS")))
        count = Event.objects.filter(
            recipient=address, bounce=Event.Bounce.SOFT, timestamp__gte=since
        ).count()
        if count >= int(conf.get("SOFT_BOUNCE_LIMIT")):
            reason, scope = Suppression.Reason.SOFT_BOUNCE, Suppression.Scope.ALL
    elif kind == Event.Type.COMPLAINED:
        reason, scope = Suppression.Reason.COMPLAINT, Suppression.Scope.MARKETING
    elif kind == Event.Type.UNSUBSCRIBED:
        reason, scope = Suppression.Reason.UNSUBSCRIBE, Suppression.Scope.MARKETING
    if reason is None:
        return None
    note = event.description[:500]
    try:
        suppression, created = suppress(
            address, scope=scope, reason=reason, source=source, note=note
        )
    except MailerError as exc:
        logger.warning("mailer: event %s has an unusable recipient: %s", event.pk, exc)
        return None
    old = _REASON_STRENGTH.get(suppression.reason)
    if not created and old is not None and _REASON_STRENGTH[reason] > old:
        # The stronger reason wins whichever event came first (manual ones stay).
        Suppression.objects.filter(pk=suppression.pk, reason=suppression.reason).update(
            reason=reason, source=source[:100], note=note
        )
        suppression.reason, suppression.source, suppression.note = reason, source[:100], note
    return suppression


#: Within one scope, which webhook reason replaces which, so arrival order does not matter.
_REASON_STRENGTH = {
    Suppression.Reason.SOFT_BOUNCE: 1,
    Suppression.Reason.INVALID: 2,
    Suppression.Reason.HARD_BOUNCE: 3,
    Suppression.Reason.UNSUBSCRIBE: 1,
    Suppression.Reason.COMPLAINT: 2,
}


# --- Own tracking (SMTP set-ups) -------------------------------------------------------------

PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


@dataclass
class Hit:
    message: Message
    link: Link | None = None


def resolve_click(token: str) -> Hit:
    try:
        value = signing.Signer(salt=compose.CLICK_SALT).unsign(token)
        message_hex, link_pk = value.split(".", 1)
        message = Message.objects.get(uuid=uuid.UUID(message_hex))
        link = Link.objects.get(pk=int(link_pk))
    except (signing.BadSignature, ValueError, Message.DoesNotExist, Link.DoesNotExist):
        raise TrackingError("This link is not valid.") from None
    return Hit(message=message, link=link)


def resolve_open(token: str) -> Hit:
    try:
        message = Message.objects.get(
            uuid=uuid.UUID(signing.Signer(salt=compose.OPEN_SALT).unsign(token))
        )
    except (signing.BadSignature, ValueError, Message.DoesNotExist):
        raise TrackingError("This pixel is not valid.") from None
    return Hit(message=message)


@lru_cache(maxsize=8)
def _scanner_pattern(patterns: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.I)


def automated_reason(
    message: Message, *, method: str, user_agent: str, now: datetime, link: Link | None = None
) -> str:
    """Why an open or click looks automatic, or '' when it looks like a person."""
    if method == "HEAD":
        return "HEAD request"
    if not user_agent.strip():
        return "no user agent"
    if _scanner_pattern(tuple(conf.get("SCANNER_USER_AGENTS"))).search(user_agent):
        return "scanner user agent"
    if message.sent_at and now - message.sent_at < timedelta(
        seconds=float(conf.get("AUTOMATED_WINDOW"))
    ):
        return "seconds after delivery"
    if link is not None:
        burst = now - timedelta(seconds=float(conf.get("CLICK_BURST_SECONDS")))
        others = (
            Event.objects.filter(
                message=message, event_type=Event.Type.CLICKED, timestamp__gte=burst
            )
            .exclude(link=link)
            .values("link")
            .distinct()
            .count()
        )
        if others >= 1:
            return "several links clicked at once"
    return ""


def record_own(hit: Hit, *, event_type: str, method: str, user_agent: str) -> Event:
    """Store an open or click from our pixel or redirect, flagged when automatic."""
    now = timezone.now()
    reason = automated_reason(
        hit.message, method=method, user_agent=user_agent, now=now, link=hit.link
    )
    event = Event.objects.create(
        message=hit.message,
        campaign_id=hit.message.campaign_id,
        event_type=event_type,
        recipient=hit.message.to_email,
        timestamp=now,
        link=hit.link,
        automated=bool(reason),
        automated_reason=reason,
        data={"user_agent": user_agent[:500]} if user_agent else {},
    )
    if reason == "several links clicked at once":
        # The earlier clicks of the burst were the same scanner.
        Event.objects.filter(
            Q(message=hit.message, event_type=Event.Type.CLICKED, automated=False),
            timestamp__gte=now - timedelta(seconds=float(conf.get("CLICK_BURST_SECONDS"))),
        ).update(automated=True, automated_reason=reason)
        outbox.restamp(hit.message.pk, event_type)
    if not reason:
        outbox.apply_event(hit.message.pk, event_type, now)
    notify.recorded(event, hit.message)
    return event
