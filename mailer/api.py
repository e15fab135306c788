"""mailer's public Python API: everything a host project calls."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import rendering
from .contacts import clean_address
from .delivery import kick_on_commit, message_context
from .exceptions import HeaderInjection, InvalidContext, MailerError
from .models import Contact, Kind, Message, MessageStatus, Suppression

__all__ = ["send", "Message", "MailerError"]


def send(
    template: str,
    *,
    to: str,
    context: Mapping[str, Any] | None = None,
    language: str | None = None,
    idempotency_key: str | None = None,
    send_at: datetime | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Message:
    """Queue one transactional email and return its Message.

    Validates everything that can be known now — address, template, context, header
    values — so a bad call raises a typed error and stores nothing. The email goes to the
    ``transactional`` queue after the surrounding transaction commits. The same
    ``idempotency_key`` always returns the same Message, and one email.
    """
    address = clean_address(to)
    context = _json_mapping(context, "context")
    metadata = _json_mapping(metadata, "metadata")
    _refuse_line_breaks(metadata, "metadata")
    if idempotency_key is not None:
        _refuse_line_breaks({"idempotency_key": idempotency_key}, "idempotency_key")
        existing = Message.objects.filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing
    if send_at is not None and timezone.is_naive(send_at):
        send_at = timezone.make_aware(send_at)

    contact = (
        Contact.objects.filter(email=address).only("id", "name", "language", "attributes").first()
    )
    source = rendering.find_template(template, language, contact.language if contact else None)
    message = Message(
        kind=Kind.TRANSACTIONAL,
        to_email=address,
        contact=contact,
        template_id=source.template_id,
        template_slug=template,
        language=source.language,
        context=context,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )
    # Rendering the subject now refuses CR/LF smuggled in through the context.
    message.subject = rendering.compiled(source).render_subject(message_context(message))

    now = timezone.now()
    if Suppression.objects.filter(email=address, scope=Suppression.Scope.ALL).exists():
        message.status, message.last_error = MessageStatus.SUPPRESSED, "Address is suppressed."
    elif send_at is not None and send_at > now:
        message.status, message.send_after = MessageStatus.SCHEDULED, send_at
    else:
        message.status, message.queued_at = MessageStatus.QUEUED, now

    try:
        with transaction.atomic():
            message.save(force_insert=True)
    except IntegrityError:
        if idempotency_key is None:
            raise
        return Message.objects.get(idempotency_key=idempotency_key)
    if message.status == MessageStatus.QUEUED:
        kick_on_commit(Kind.TRANSACTIONAL)
    return message


def _json_mapping(value: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidContext(f"{name} must be a mapping, got {type(value).__name__}.")
    try:
        return json.loads(json.dumps(dict(value), cls=DjangoJSONEncoder))
    except (TypeError, ValueError) as exc:
        raise InvalidContext(f"{name} must be JSON-serializable: {exc}") from None


def _refuse_line_breaks(values: Mapping[str, Any], name: str) -> None:
    for key, value in values.items():
        if isinstance(value, str) and ("\r" in value or "\n" in value):
            raise HeaderInjection(f"{name}[{key!r}] contains a line break.")
