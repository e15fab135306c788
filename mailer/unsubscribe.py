"""Unsubscribing: reading the signed links ``compose`` makes, and the preference choices."""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass

from django.core import signing
from django.db import transaction
from django.utils import timezone

from . import compose, notify, tokens
from .exceptions import InvalidToken, MailerError
from .models import Contact, Event, Message, Suppression
from .suppressions import resubscribe, suppress

logger = logging.getLogger(__name__)

# Today's encrypted tokens, then the signed ones of mail sent before them.
_TOKEN_IN_TEXT = re.compile(
    rf"{tokens.TOKEN_PATTERN}|\.?[A-Za-z0-9_\-]+:[A-Za-z0-9_\-]+:[A-Za-z0-9_\-]+"
)


class InvalidUnsubscribeToken(MailerError):
    """The unsubscribe link was altered or forged."""


@dataclass(frozen=True)
class Target:
    email: str
    message_uuid: uuid.UUID | None


def read_token(token: str) -> Target:
    """The address (and message) behind an unsubscribe link; links work for years."""
    try:
        data = tokens.unseal(token, salt=compose.UNSUBSCRIBE_SALT)
    except InvalidToken:
        data = _read_signed_token(token)
    email, message = data.get("e"), data.get("m")
    try:
        if not isinstance(email, str) or not email:
            raise ValueError(email)
        return Target(email=email, message_uuid=uuid.UUID(message) if message else None)
    except (ValueError, TypeError, AttributeError):
        raise InvalidUnsubscribeToken("This unsubscribe link is not valid.") from None


def _read_signed_token(token: str) -> dict:
    """The signed (readable) tokens mailer made before they were encrypted: mail already
    sent carries them, and an unsubscribe link must keep working."""
    try:
        data = signing.loads(token, salt=compose.UNSUBSCRIBE_SALT)
    except signing.BadSignature:
        raise InvalidUnsubscribeToken("This unsubscribe link is not valid.") from None
    if not isinstance(data, dict):
        raise InvalidUnsubscribeToken("This unsubscribe link is not valid.")
    return data


def unsubscribe(target: Target, *, source: str) -> bool:
    """Suppress marketing to the address at once; returns whether it is new."""
    with transaction.atomic():
        _, created = suppress(
            target.email,
            scope=Suppression.Scope.MARKETING,
            reason=Suppression.Reason.UNSUBSCRIBE,
            source=source,
        )
        Contact.objects.filter(email=target.email).update(
            consent=Contact.Consent.WITHDRAWN, consent_at=timezone.now(), consent_source=source
        )
        if created:
            message = (
                Message.objects.filter(uuid=target.message_uuid).only("id", "campaign_id").first()
                if target.message_uuid
                else None
            )
            event = Event.objects.create(
                message=message,
                campaign_id=message.campaign_id if message else None,
                event_type=Event.Type.UNSUBSCRIBED,
                recipient=target.email,
                data={"source": source},
            )
            notify.unsubscribed(target.email, event)
    return created


def subscribe(target: Target, *, source: str) -> Contact:
    """Resubscribe from the preference page, recording the consent and its evidence."""
    with transaction.atomic():
        resubscribe(target.email)
        contact, _ = Contact.objects.get_or_create(email=target.email)
        contact.consent = Contact.Consent.GRANTED
        contact.consent_at = timezone.now()
        contact.consent_source = source[:200]
        contact.save(update_fields=["consent", "consent_at", "consent_source", "updated_at"])
        Event.objects.create(
            event_type=Event.Type.SUBSCRIBED, recipient=target.email, data={"source": source}
        )
    return contact


def is_subscribed(email: str) -> bool:
    return not Suppression.objects.filter(email=email).exists()


def from_inbound(subject: str, text: str = "") -> Target | None:
    """The unsubscribe token in a reply to the List-Unsubscribe mailto, if any."""
    for candidate in _TOKEN_IN_TEXT.findall(f"{subject} {text}"):
        try:
            return read_token(candidate)
        except InvalidUnsubscribeToken:
            continue
    return None
