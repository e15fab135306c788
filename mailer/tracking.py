"""What happens after an email leaves: ESP events, our own opens and clicks, bounces.

Every event is stored once (unique on the provider's event id, or a stable hash), and a
message's status only moves forward, so replays and reordering change nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache, lru_cache

from django.core import signing
from django.db import IntegrityError, connection, transaction
from django.db.models import OuterRef, Q, Subquery
from django.urls import reverse
from django.utils import timezone

from . import conf
from .exceptions import MailerError
from .models import Event, Link, Message, MessageStatus, Suppression
from .suppressions import suppress

logger = logging.getLogger(__name__)

#: Status a message takes from an event, and its rank: a status only moves to a higher
#: rank. The final ones (failed < bounced < complained) outrank any engagement.
EVENT_STATUS = {
    Event.Type.DELIVERED: MessageStatus.DELIVERED,
    Event.Type.OPENED: MessageStatus.OPENED,
    Event.Type.CLICKED: MessageStatus.CLICKED,
    Event.Type.REJECTED: MessageStatus.FAILED,
    Event.Type.FAILED: MessageStatus.FAILED,
    Event.Type.BOUNCED: MessageStatus.BOUNCED,
    Event.Type.COMPLAINED: MessageStatus.COMPLAINED,
}
RANK = {
    MessageStatus.SCHEDULED: 0,
    MessageStatus.QUEUED: 0,
    MessageStatus.SENDING: 0,
    MessageStatus.SENT: 1,
    MessageStatus.DELIVERED: 2,
    MessageStatus.OPENED: 3,
    MessageStatus.CLICKED: 4,
    MessageStatus.FAILED: 10,
    MessageStatus.BOUNCED: 11,
    MessageStatus.COMPLAINED: 12,
}

# Soft (temporary) Postmark bounce types (anymail calls Transient and DnsError "deferred").
_POSTMARK_SOFT = {"SoftBounce", "Transient", "DnsError", "MailFrontier", "ChallengeVerification"}
_SOFT_MARKERS = re.compile(r"soft|transient|temporar", re.I)


class TrackingError(MailerError):
    """A tracking link or pixel that is forged, altered or unknown."""


#: The message column that keeps when each kind of event first happened (see Message).
FIRST_AT = {
    Event.Type.DELIVERED: "delivered_at",
    Event.Type.OPENED: "opened_at",
    Event.Type.CLICKED: "clicked_at",
    Event.Type.BOUNCED: "bounced_at",
    Event.Type.COMPLAINED: "complained_at",
}


def apply_to_message(message_id: int, event_type: str, timestamp: datetime) -> None:
    """Move the status forward and keep the event's first time: one UPDATE per event.

    The earliest time wins and the status only climbs, so replayed or reordered events
    leave the same row. Only events by people come here (not scanners' opens/clicks).
    """
    sql = _apply_sql(event_type)
    if sql is None:
        return
    params: list = []
    status = EVENT_STATUS.get(event_type)
    if status is not None:
        params += [*_lower_ranks(status), status]
    column = FIRST_AT.get(event_type)
    if column is not None:
        at = Message._meta.get_field(column).get_db_prep_value(timestamp, connection)
        params += [at, at]
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, message_id])


def _lower_ranks(status: str) -> list[str]:
    return [s for s, rank in RANK.items() if rank < RANK[status]]


@cache
def _apply_sql(event_type: str) -> str | None:
    """The UPDATE for one event type, built once (Django's CASE expressions cost about a
    millisecond of CPU to compile per event)."""
    quote = connection.ops.quote_name
    sets = []
    status = EVENT_STATUS.get(event_type)
    if status is not None:
        marks = ", ".join(["%s"] * len(_lower_ranks(status)))
        sets.append(f"status = CASE WHEN status IN ({marks}) THEN %s ELSE status END")
    column = FIRST_AT.get(event_type)
    if column is not None:
        col = quote(column)
        sets.append(f"{col} = CASE WHEN {col} IS NULL OR {col} > %s THEN %s ELSE {col} END")
    if not sets:
        return None
    table = quote(Message._meta.db_table)
    return f"UPDATE {table} SET {', '.join(sets)} WHERE id = %s"  # noqa: S608


def restamp(message_id: int, event_type: str) -> None:
    """Recompute a first-event time after some of the message's events were re-flagged."""
    first = (
        Event.objects.filter(message=OuterRef("pk"), event_type=event_type, automated=False)
        .order_by("timestamp")
        .values("timestamp")[:1]
    )
    Message.objects.filter(pk=message_id).update(**{FIRST_AT[event_type]: Subquery(first)})


# --- ESP events ----------------------------------------------------------------------------


def _event_key(esp: str, event) -> str:
    """Unique per event and recipient: SES gives every recipient of one notification the
    same id, so the recipient is part of the key."""
    if event.event_id:
        key = f"{esp}:{event.event_id}:{(event.recipient or '').lower()}"
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


def insert_once(event: Event) -> bool:
    """Insert unless an event with the same provider id exists: one round trip.

    ``INSERT … ON CONFLICT DO NOTHING RETURNING id`` (PostgreSQL, SQLite ≥ 3.35) instead
    of a transaction around a create that may fail; a webhook batch of hundreds of events
    spends most of its time in round trips.
    """
    fields = [f for f in Event._meta.concrete_fields if not f.primary_key]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column) for f in fields)
    marks = ", ".join(["%s"] * len(fields))
    values = [f.get_db_prep_save(f.pre_save(event, add=True), connection) for f in fields]
    table = quote(Event._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING RETURNING id",  # noqa: S608
            values,
        )
        row = cursor.fetchone()
    if row is None:
        return False
    event.pk = row[0]
    event._state.adding = False
    return True


def record(event, esp: str) -> Event | None:
    """Store one anymail tracking event and apply its consequences; None for a replay."""
    message = find_message(event)
    recipient = (event.recipient or (message.to_email if message else "") or "").strip().lower()
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
        link_id=link_id(event.click_url) if event.click_url else None,
        event_type=event.event_type
        if event.event_type in Event.Type.values
        else Event.Type.UNKNOWN,
        provider_event_id=_event_key(esp, event),
        recipient=recipient[:254],
        timestamp=event.timestamp or timezone.now(),
        description=(event.description or "")[:2000],
        bounce=bounce_kind(esp, event),
        data=data,
    )
    if not insert_once(stored):
        return None  # seen before: a replayed webhook changes nothing
    if message is not None:
        apply_to_message(message.pk, stored.event_type, stored.timestamp)
    apply_policy(stored, reject_reason=event.reject_reason)
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

_CLICK_SALT = "mailer.tracking.click"
_OPEN_SALT = "mailer.tracking.open"
_HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(https?://[^"'\s>]+)\2""", re.I)
_BODY_END = re.compile(r"</body\s*>", re.I)
PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


def link_id(url: str, cache: dict[str, int] | None = None) -> int:
    """The id of a recorded URL, recording it the first time.

    ``cache`` lives for one batch: a campaign's few links cost a query each per batch,
    and nothing stale outlives it.
    """
    if cache is not None and url in cache:
        return cache[url]
    digest = hashlib.sha256(url.encode()).hexdigest()
    link = Link.objects.filter(url_hash=digest).only("id").first()
    if link is None:
        try:
            with transaction.atomic():
                link = Link.objects.create(url=url, url_hash=digest)
        except IntegrityError:
            link = Link.objects.get(url_hash=digest)
    if cache is not None:
        cache[url] = link.pk
    return link.pk


def click_token(message_uuid: uuid.UUID, link: int, signer: signing.Signer | None = None) -> str:
    return (signer or signing.Signer(salt=_CLICK_SALT)).sign(f"{message_uuid.hex}.{link}")


def open_token(message_uuid: uuid.UUID) -> str:
    return signing.Signer(salt=_OPEN_SALT).sign(message_uuid.hex)


_TOKEN_SLOT = "TOKENSLOT"  # noqa: S105 - a placeholder, not a secret


def route(name: str, token: str) -> str:
    """reverse(name, args=[token]), with the URL pattern resolved once per process.

    A campaign email has a handful of links; reversing each costs more than signing it.
    """
    before, after = _route_parts(name)
    return f"{before}{token}{after}"


@lru_cache(maxsize=32)
def _route_parts(name: str) -> tuple[str, str]:
    before, after = reverse(name, args=[_TOKEN_SLOT]).split(_TOKEN_SLOT)
    return before, after


def add_tracking(
    html: str,
    message: Message,
    *,
    base_url: str,
    opens: bool,
    clicks: bool,
    link_cache: dict[str, int] | None = None,
) -> str:
    """Rewrite http(s) links to signed click redirects and add an open pixel."""
    if clicks:
        unsubscribe_prefix = f"{base_url}/mailer/"
        signer = signing.Signer(salt=_CLICK_SALT)  # one per email, not one per link

        def rewrite(match: re.Match) -> str:
            url = match.group(3).replace("&amp;", "&")
            if url.startswith(unsubscribe_prefix):
                return match.group(0)  # our own pages are never wrapped
            token = click_token(message.uuid, link_id(url, link_cache), signer)
            target = base_url + route("mailer:click", token)
            return f"{match.group(1)}{match.group(2)}{target}{match.group(2)}"

        html = _HREF.sub(rewrite, html)
    if opens:
        pixel = (
            f'<img src="{base_url}{route("mailer:open", open_token(message.uuid))}" '
            'width="1" height="1" alt="" style="display:block;border:0;width:1px;height:1px">'
        )
        html, count = _BODY_END.subn(pixel + "</body>", html, count=1)
        if not count:
            html += pixel
    return html


@dataclass
class Hit:
    message: Message
    link: Link | None = None


def resolve_click(token: str) -> Hit:
    try:
        value = signing.Signer(salt=_CLICK_SALT).unsign(token)
        message_hex, link_pk = value.split(".", 1)
        message = Message.objects.get(uuid=uuid.UUID(message_hex))
        link = Link.objects.get(pk=int(link_pk))
    except (signing.BadSignature, ValueError, Message.DoesNotExist, Link.DoesNotExist):
        raise TrackingError("This link is not valid.") from None
    return Hit(message=message, link=link)


def resolve_open(token: str) -> Hit:
    try:
        message = Message.objects.get(uuid=uuid.UUID(signing.Signer(salt=_OPEN_SALT).unsign(token)))
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
        restamp(hit.message.pk, event_type)
    if not reason:
        apply_to_message(hit.message.pk, event_type, now)
    return event
