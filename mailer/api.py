"""mailer's public Python API: everything a host project calls."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, BinaryIO

from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils import timezone

from . import dispatch, drips, outbox, rendering
from .compose import message_context
from .contacts import ContactImportReport, clean_address, import_csv
from .exceptions import DripError, HeaderInjection, InvalidContext, MailerError, TemplateNotFound
from .models import (
    Contact,
    DripSeries,
    Enrollment,
    Kind,
    Message,
    MessageStatus,
    Queue,
    Suppression,
    unsafe_character,
)
from .suppressions import lift as lift_suppressions
from .suppressions import suppress as add_suppression

__all__ = [
    "send",
    "send_rendered",
    "send_many",
    "suppress",
    "unsuppress",
    "import_contacts",
    "trigger",
    "enroll",
    "Message",
    "MailerError",
]


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
    _refuse_header_breaks(metadata, "metadata")
    if idempotency_key is not None:
        _refuse_header_breaks({"idempotency_key": idempotency_key}, "idempotency_key")
        existing = Message.objects.filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing
    contact, suppressed = outbox.contact_and_suppression(address)
    message = _build(
        template,
        address=address,
        contact=contact,
        suppressed=suppressed,
        context=context,
        language=language,
        idempotency_key=idempotency_key,
        send_at=send_at,
        metadata=metadata,
    )
    stored = outbox.add(message)
    if stored is message and message.status == MessageStatus.QUEUED:
        dispatch.kick_on_commit(Queue.TRANSACTIONAL)
    return stored


def send_rendered(
    *,
    to: str,
    subject: str,
    html: str,
    text: str | None = None,
    language: str | None = None,
    idempotency_key: str | None = None,
    send_at: datetime | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Message:
    """Queue an email the host rendered itself (subject and HTML, optionally text).

    The same path as ``send()``: the content travels in the message's context to the
    built-in ``inline`` template. Without ``text``, one is derived from the HTML now.
    """
    return send(
        INLINE_TEMPLATE,
        to=to,
        context=inline_context(subject, html, text),
        language=language,
        idempotency_key=idempotency_key,
        send_at=send_at,
        metadata=metadata,
    )


#: The built-in template that carries content rendered by the host (templates/mailer/inline).
INLINE_TEMPLATE = "inline"


def inline_context(subject: object, html: object, text: object = None) -> dict[str, str]:
    """The context of the ``inline`` template, or InvalidContext saying what is wrong."""
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidContext("subject must be a non-empty string.")
    if "\r" in subject or "\n" in subject:
        raise HeaderInjection("subject contains a line break.")
    if not isinstance(html, str) or not html.strip():
        raise InvalidContext("html must be a non-empty string.")
    if text is not None and not isinstance(text, str):
        raise InvalidContext("text must be a string.")
    return {
        "inline_subject": subject,
        "inline_html": html,
        "inline_text": text if text is not None else rendering.html_to_text(html),
    }


def send_many(items: Iterable[Mapping[str, Any]]) -> list[Message | MailerError]:
    """Queue many transactional emails at once; each item is validated on its own.

    An item holds ``send()``'s keyword arguments (``template`` included), or
    ``send_rendered()``'s. Returns, in order, each item's Message or the MailerError that
    refused it. The valid items are stored together (one INSERT, one query for their
    contacts and suppressions) and an invalid one stores nothing.
    """
    items = list(items)
    results: list[Message | MailerError] = []
    addresses: list[str | None] = []
    for item in items:
        try:
            addresses.append(clean_address(item.get("to")))
        except MailerError as exc:
            addresses.append(None)
            results.append(exc)
        else:
            results.append(None)  # type: ignore[arg-type]  # filled below
    known = outbox.contacts_and_suppressions({a for a in addresses if a})
    keyed: dict[str, int] = {}
    for index, (item, address) in enumerate(zip(items, addresses, strict=True)):
        if address is None:
            continue
        try:
            results[index] = _build_item(item, address, known[address])
        except MailerError as exc:
            results[index] = exc
            continue
        key = results[index].idempotency_key
        if key is not None:
            if key in keyed:  # the same key twice in one call: one message
                results[index] = keyed[key]  # type: ignore[assignment]
            else:
                keyed[key] = index
    fresh = [r for r in results if isinstance(r, Message)]
    existing = outbox.by_idempotency_key([m.idempotency_key for m in fresh if m.idempotency_key])
    fresh = [m for m in fresh if m.idempotency_key not in existing]
    with transaction.atomic():  # all the valid items, or (on a crash) none of them
        stored = {id(m): m for m in outbox.add_many(fresh)}
    for index, result in enumerate(results):
        if isinstance(result, int):
            results[index] = results[result]
        elif isinstance(result, Message):
            if result.idempotency_key in existing:
                results[index] = existing[result.idempotency_key]
            else:
                results[index] = stored.get(id(result), result)
    if any(m.status == MessageStatus.QUEUED for m in fresh):
        dispatch.kick_on_commit(Queue.TRANSACTIONAL)
    return results


_SEND_ARGS = frozenset(
    {"template", "to", "context", "language", "idempotency_key", "send_at", "metadata"}
)
_RENDERED_ARGS = frozenset({"subject", "html", "text"})


def _build_item(item: Mapping[str, Any], address: str, known: tuple) -> Message:
    unknown = set(item) - _SEND_ARGS - _RENDERED_ARGS
    if unknown:
        raise InvalidContext(f"Unknown arguments: {', '.join(sorted(unknown))}.")
    template, context = item.get("template"), item.get("context")
    if template is None:
        template = INLINE_TEMPLATE
        context = inline_context(item.get("subject"), item.get("html"), item.get("text"))
    elif not isinstance(template, str):
        raise TemplateNotFound(f"template must be a slug, got {template!r}.")
    key = item.get("idempotency_key")
    if key is not None:
        _refuse_header_breaks({"idempotency_key": key}, "idempotency_key")
    metadata = _json_mapping(item.get("metadata"), "metadata")
    _refuse_header_breaks(metadata, "metadata")
    contact, suppressed = known
    return _build(
        template,
        address=address,
        contact=contact,
        suppressed=suppressed,
        context=_json_mapping(context, "context"),
        language=item.get("language"),
        idempotency_key=key,
        send_at=item.get("send_at"),
        metadata=metadata,
    )


def _build(
    template: str,
    *,
    address: str,
    contact,
    suppressed: bool,
    context: dict[str, Any],
    language: str | None,
    idempotency_key: str | None,
    send_at: datetime | None,
    metadata: dict[str, Any],
) -> Message:
    """A new, valid, unsaved Message from checked context and metadata: the template,
    language and subject are checked here."""
    for name, value in (("template", template), ("language", language)):
        if isinstance(value, str) and unsafe_character(value, header=True):
            raise TemplateNotFound(f"{name} {value!r} contains a control character.")
    if send_at is not None and timezone.is_naive(send_at):
        send_at = timezone.make_aware(send_at)
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
    return message


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


def unsuppress(email: str, *, marketing_only: bool | None = None) -> int:
    """Lift an address's opt-outs (manual and unsubscribe suppressions; bounces and
    complaints stay): all of them, or one scope. Returns how many were removed."""
    scope = None
    if marketing_only is not None:
        scope = Suppression.Scope.MARKETING if marketing_only else Suppression.Scope.ALL
    return lift_suppressions(email, scope=scope)


def import_contacts(stream: BinaryIO, *, source: str, dry_run: bool = False) -> ContactImportReport:
    """Import contacts from a CSV byte stream (see the README for the columns).

    Raises ImportFileError, importing nothing, when the file cannot be read; bad rows are
    listed in the returned report's ``rejected`` by line number, and what each accepted
    row did to which contact in ``details``. ``dry_run``: the same report, nothing stored.
    """
    return import_csv(stream, source=source, dry_run=dry_run)


def trigger(
    event: str,
    *,
    contact: Contact | str | Any,
    data: Mapping[str, Any] | None = None,
    key: str | None = None,
) -> list[Enrollment]:
    """Tell mailer that ``event`` happened to a contact (``"cart_abandoned"``).

    The contact (a Contact, a user, or an address: created when unknown) enters every
    active drip series listening to the event, and leaves those whose goal it is. ``data``
    (JSON) reaches the series' templates as variables. ``key`` makes the call idempotent
    per series: a second trigger with the same key enrolls nobody again. Returns the new
    enrollments (none when the contact may not enter: see the re-entry policy).
    """
    _event_name(event)
    return drips.trigger(
        event,
        drips.contact_for(contact),
        data=_json_mapping(data, "data"),
        key=_enrollment_key(key),
    )


def enroll(
    series: DripSeries | int | str,
    contact: Contact | str | Any,
    *,
    data: Mapping[str, Any] | None = None,
    key: str | None = None,
) -> Enrollment | None:
    """Put a contact at the start of a drip series (given as itself, its id or its name).

    Returns the enrollment, or None when the contact may not enter (already in it, the
    re-entry policy, no consent, unsubscribed). A draft or archived series raises
    DripError.
    """
    return drips.enroll(
        drips.series_for(series),
        drips.contact_for(contact),
        data=_json_mapping(data, "data"),
        key=_enrollment_key(key),
    )


def _event_name(event: object) -> None:
    if not isinstance(event, str) or not _EVENT.match(event):
        raise DripError(
            f"An event name is 1 to 100 letters, digits, _ . : or -, not {event!r}.",
            field="event",
        )


_EVENT = re.compile(r"^[A-Za-z0-9_.:\-]{1,100}$")


def _enrollment_key(key: object) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > 100:
        raise DripError("key must be a string of 1 to 100 characters.", field="key")
    _refuse_header_breaks({"key": key}, "key")
    return key


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
