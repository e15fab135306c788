"""mailer's public Python API: everything a host project calls."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, BinaryIO

from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone

from . import dispatch, outbox, rendering
from .compose import message_context
from .contacts import ContactImportReport, clean_address, import_csv
from .exceptions import HeaderInjection, InvalidContext, MailerError, TemplateNotFound
from .models import Kind, Message, MessageStatus, Queue, Suppression, unsafe_character
from .suppressions import suppress as add_suppression

__all__ = ["send", "suppress", "import_contacts", "Message", "MailerError"]


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
    for name, value in (("template", template), ("language", language)):
        if isinstance(value, str) and unsafe_character(value, header=True):
            raise TemplateNotFound(f"{name} {value!r} contains a control character.")
    context = _json_mapping(context, "context")
    metadata = _json_mapping(metadata, "metadata")
    _refuse_header_breaks(metadata, "metadata")
    if idempotency_key is not None:
        _refuse_header_breaks({"idempotency_key": idempotency_key}, "idempotency_key")
        existing = Message.objects.filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing
    if send_at is not None and timezone.is_naive(send_at):
        send_at = timezone.make_aware(send_at)

    contact, suppressed = outbox.contact_and_suppression(address)
    source = rendering.find_template(template, language, contact.language if contact else None)
    message = Message(
        kind=Kind.TRANSACTIONAL,
        to_email=address,
        contact=contact,
        # By slug and language, not by row: a cached lookup may name a row deleted since.
        template_slug=template,
        language=source.language,
        context=context,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )
    # Rendering the subject now refuses CR/LF smuggled in through the context.
    message.subject = rendering.compiled(source).render_subject(message_context(message))

    now = timezone.now()
    if suppressed:
        message.status, message.last_error = MessageStatus.SUPPRESSED, "Address is suppressed."
    elif send_at is not None and send_at > now:
        message.status, message.send_after = MessageStatus.SCHEDULED, send_at
    else:
        message.status, message.queued_at = MessageStatus.QUEUED, now

    stored = outbox.add(message)
    if stored is message and message.status == MessageStatus.QUEUED:
        dispatch.kick_on_commit(Queue.TRANSACTIONAL)
    return stored


def suppress(
    email: str, *, marketing_only: bool = False, note: str = "", source: str = "api"
) -> bool:
    """Stop mailing an address (all mail, or marketing only); returns whether it is new.

    Waiting campaign and drip messages to it are cancelled at once.
    """
    scope = Suppression.Scope.MARKETING if marketing_only else Suppression.Scope.ALL
    _refuse_control_characters({"note": note, "source": source}, "suppress")
    _, created = add_suppression(
        email, scope=scope, reason=Suppression.Reason.MANUAL, source=source, note=note
    )
    return created


def import_contacts(stream: BinaryIO, *, source: str) -> ContactImportReport:
    """Import contacts from a CSV byte stream (see the README for the columns).

    Raises ImportFileError, importing nothing, when the file cannot be read; bad rows are
    listed in the returned report's ``rejected`` by line number.
    """
    return import_csv(stream, source=source)


#: Deeper context is refused: nobody writes it, and it would exhaust the stack.
MAX_CONTEXT_DEPTH = 20


def _json_mapping(value: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """The value as the database will store it (JSON, no NaN, no control characters),
    or InvalidContext before anything is written."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidContext(f"{name} must be a mapping, got {type(value).__name__}.")
    try:
        # allow_nan=False: PostgreSQL's jsonb has no NaN or Infinity.
        stored = json.loads(json.dumps(dict(value), cls=DjangoJSONEncoder, allow_nan=False))
    except RecursionError:
        raise InvalidContext(f"{name} is nested too deeply.") from None
    except (TypeError, ValueError) as exc:
        raise InvalidContext(f"{name} must be JSON-serializable: {exc}") from None
    _refuse_control_characters(stored, name)
    return stored


def _refuse_control_characters(value: Any, name: str, depth: int = 0) -> None:
    """Refuse NUL and other control characters (line breaks and tabs are text) in every
    key and string of ``value``, and nesting deeper than MAX_CONTEXT_DEPTH."""
    if depth > MAX_CONTEXT_DEPTH:
        raise InvalidContext(f"{name} is nested deeper than {MAX_CONTEXT_DEPTH} levels.")
    if isinstance(value, str):
        if char := unsafe_character(value):
            raise InvalidContext(f"{name} contains a control character ({char}).")
    elif isinstance(value, dict):
        for key, item in value.items():
            if char := unsafe_character(str(key)):
                raise InvalidContext(f"{name} has a key with a control character ({char}).")
            _refuse_control_characters(item, f"{name}[{key!r}]", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_control_characters(item, f"{name}[{index}]", depth + 1)


def _refuse_header_breaks(values: Mapping[str, Any], name: str) -> None:
    """Values that may travel as headers (ESP metadata, idempotency key): one line, no
    control characters."""
    for key, value in values.items():
        if isinstance(value, str) and (char := unsafe_character(value, header=True)):
            raise HeaderInjection(
                f"{name}[{key!r}] contains a line break or control character ({char})."
            )
