"""mailer's public Python API: everything a host project calls."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, BinaryIO

from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from . import rendering
from .contacts import ContactImportReport, clean_address, import_csv
from .delivery import kick_on_commit, message_context
from .exceptions import HeaderInjection, InvalidContext, MailerError
from .models import Contact, Kind, Message, MessageStatus, Suppression

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

    contact, suppressed = _contact_and_suppression(address)
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

    if idempotency_key is None:
        message.save(force_insert=True)  # one round trip: nothing here can conflict
    else:
        try:
            with transaction.atomic():
                message.save(force_insert=True)
        except IntegrityError:  # the same key, sent a moment ago by another request
            return Message.objects.get(idempotency_key=idempotency_key)
    if message.status == MessageStatus.QUEUED:
        kick_on_commit(Kind.TRANSACTIONAL)
    return message


def suppress(
    email: str, *, marketing_only: bool = False, note: str = "", source: str = "api"
) -> bool:
    """Stop mailing an address (all mail, or marketing only); returns whether it is new.

    Waiting campaign and drip messages to it are cancelled at once.
    """
    from .suppressions import suppress as add

    scope = Suppression.Scope.MARKETING if marketing_only else Suppression.Scope.ALL
    _, created = add(email, scope=scope, reason=Suppression.Reason.MANUAL, source=source, note=note)
    return created


def import_contacts(stream: BinaryIO, *, source: str) -> ContactImportReport:
    """Import contacts from a CSV byte stream (see the README for the columns).

    Raises ImportFileError, importing nothing, when the file cannot be read; bad rows are
    listed in the returned report's ``rejected`` by line number.
    """
    return import_csv(stream, source=source)


def _contact_and_suppression(address: str) -> tuple[Contact | None, bool]:
    """The address's contact, and whether it is suppressed for all mail, in one query.

    The request path pays a round trip per query; the contact may not exist, so this is
    a LEFT JOIN from a one-row table rather than two ORM lookups.
    """
    quote = connection.ops.quote_name
    contacts, suppressions = quote(Contact._meta.db_table), quote(Suppression._meta.db_table)
    sql = (
        f"SELECT c.id, c.name, c.language, c.attributes, EXISTS ("  # noqa: S608 - table names only
        f"SELECT 1 FROM {suppressions} s WHERE s.email = %s AND s.scope = %s) "
        f"FROM (SELECT 1 AS one) AS one LEFT JOIN {contacts} c ON c.email = %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [address, Suppression.Scope.ALL, address])
        pk, name, language, attributes, suppressed = cursor.fetchone()
    if pk is None:
        return None, bool(suppressed)
    field = Contact._meta.get_field("attributes")
    contact = Contact(
        id=pk,
        email=address,
        name=name,
        language=language,
        attributes=field.from_db_value(attributes, None, connection) or {},
    )
    contact._state.adding, contact._state.db = False, connection.alias
    return contact, bool(suppressed)


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
