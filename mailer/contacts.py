"""Contacts: clean addresses, the contact behind a user account, CSV import and export."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from .exceptions import HeaderInjection, ImportFileError, InvalidRecipient
from .models import Contact, Tag, normalize_email, unsafe_character


def clean_address(value: object) -> str:
    """A valid, normalized address, or InvalidRecipient / HeaderInjection saying why."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecipient(f"Recipient must be a non-empty email address, got {value!r}.")
    if "\r" in value or "\n" in value:
        raise HeaderInjection("Recipient address contains a line break.")
    if char := unsafe_character(value, header=True):
        raise HeaderInjection(f"Recipient address contains a control character ({char}).")
    address = normalize_email(value)
    try:
        validate_email(address)
    except ValidationError:
        raise InvalidRecipient(f"{value!r} is not a valid email address.") from None
    return address


def contact_for_user(user) -> Contact:
    """Create or link the contact for a user account (registration calls this)."""
    address = clean_address(getattr(user, "email", ""))
    name = (user.get_full_name() if hasattr(user, "get_full_name") else "") or ""
    contact, created = Contact.objects.get_or_create(
        email=address, defaults={"name": name or user.get_username(), "user": user}
    )
    if not created and contact.user_id != user.pk:
        contact.user = user
        contact.name = contact.name or name
        contact.save(update_fields=["user", "name", "updated_at"])
    return contact


# --- CSV import and export ------------------------------------------------------------------

KNOWN_COLUMNS = {"email", "name", "language", "timezone", "tags", "consent", "consent_source"}
_CONSENT_WORDS = {
    "granted": Contact.Consent.GRANTED,
    "yes": Contact.Consent.GRANTED,
    "true": Contact.Consent.GRANTED,
    "1": Contact.Consent.GRANTED,
    "y": Contact.Consent.GRANTED,
    "opt-in": Contact.Consent.GRANTED,
    "withdrawn": Contact.Consent.WITHDRAWN,
    "no": Contact.Consent.WITHDRAWN,
    "false": Contact.Consent.WITHDRAWN,
    "0": Contact.Consent.WITHDRAWN,
    "n": Contact.Consent.WITHDRAWN,
    "opt-out": Contact.Consent.WITHDRAWN,
    "unknown": Contact.Consent.UNKNOWN,
    "": Contact.Consent.UNKNOWN,
}
EXPORT_COLUMNS = (
    "email",
    "name",
    "language",
    "timezone",
    "consent",
    "consent_at",
    "consent_source",
    "verified_at",
    "tags",
    "attributes",
    "created_at",
)


#: Row details a report keeps (the counts cover every row): a file of a million rows
#: still imports in flat memory.
DETAIL_LIMIT = 1000
#: Fields whose changes a row reports ("consent_source" follows "consent").
REPORTED_FIELDS = ("name", "language", "timezone", "consent")


@dataclass
class Change:
    """One field a row changed: its value before, after, and the earlier row of the same
    file that had set the value it overwrote (None: it was stored before the import)."""

    field: str
    before: str
    after: str
    overwrites_line: int | None = None


@dataclass
class RowOutcome:
    """What one accepted row did to its contact: created it, updated it, or nothing."""

    line: int
    email: str
    action: str  # "created", "updated" or "unchanged"
    changes: list[Change] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


@dataclass
class ContactImportReport:
    rows: int = 0
    created: int = 0
    updated: int = 0
    duplicates: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    #: Row by row, in file order, up to DETAIL_LIMIT rows; ``details_left_out`` more.
    details: list[RowOutcome] = field(default_factory=list)
    details_left_out: int = 0
    dry_run: bool = False

    def note(self, outcome: RowOutcome) -> None:
        if len(self.details) < DETAIL_LIMIT:
            self.details.append(outcome)
        else:
            self.details_left_out += 1

    @property
    def overwrites(self) -> list[RowOutcome]:
        """Rows that overwrote a value an earlier row of the same file had set."""
        return [d for d in self.details if any(c.overwrites_line for c in d.changes)]


def import_csv(
    stream: BinaryIO, *, source: str, batch_size: int = 2000, dry_run: bool = False
) -> ContactImportReport:
    """Import contacts from a CSV stream with bulk upserts, in one transaction.

    Rows stream through in batches (flat memory). Emails are de-duplicated
    case-insensitively; unknown columns become attributes; ``tags`` is ;-separated;
    ``consent`` takes granted/withdrawn/yes/no. Bad rows are reported by line and
    skipped; a file that cannot be read (not UTF-8, no email column, broken CSV) raises
    ImportFileError and leaves nothing behind. The report says what each row did to
    which contact, and which later row overwrote what an earlier one set. ``dry_run``
    does all of it and rolls it back: the same report, nothing imported.
    """
    report = ContactImportReport(dry_run=dry_run)
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    try:
        with transaction.atomic():
            reader = csv.DictReader(text)
            columns = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
            if "email" not in columns:
                raise ImportFileError("The CSV needs a header row with an 'email' column.")
            if any(unsafe_character(c) for c in columns):
                raise ImportFileError("The header row contains a control character.")
            reader.fieldnames = columns
            # Rows of one batch by address, in file order; a later row of the same address
            # is applied after the earlier one, so each reports what it changed.
            batch: dict[str, list[tuple[int, dict]]] = {}
            held = 0
            for line, row in enumerate(reader, start=2):
                report.rows += 1
                parsed = _parse_row(row, columns, source)
                if isinstance(parsed, str):
                    report.rejected.append((line, parsed))
                    continue
                if parsed["email"] in batch:
                    report.duplicates += 1
                batch.setdefault(parsed["email"], []).append((line, parsed))
                held += 1
                if held >= batch_size:
                    _upsert(batch, report)
                    batch, held = {}, 0
            if batch:
                _upsert(batch, report)
            if dry_run:
                transaction.set_rollback(True)
    except UnicodeDecodeError as exc:
        raise ImportFileError(
            f"The file is not UTF-8 text ({exc.reason} at byte {exc.start})."
        ) from None
    except csv.Error as exc:
        raise ImportFileError(f"The CSV cannot be parsed: {exc}") from None
    finally:
        text.detach()
    return report


def _parse_row(row: dict, columns: list[str], source: str) -> dict | str:
    if None in row:
        return "more fields than the header has columns"
    try:
        email = clean_address(row.get("email") or "")
    except (InvalidRecipient, HeaderInjection) as exc:
        return str(exc)
    for key, value in row.items():
        # NUL would fail the whole batch in PostgreSQL; a name travels in the To header.
        if isinstance(value, str) and (char := unsafe_character(value, header=key == "name")):
            return f"column {key!r} contains a control character ({char})"
    consent_word = (row.get("consent") or "").strip().lower()
    if consent_word not in _CONSENT_WORDS:
        return f"consent {consent_word!r} is not one of granted/withdrawn/yes/no"
    parsed: dict = {
        "email": email,
        "attributes": {
            key: value.strip()
            for key in columns
            if key and key not in KNOWN_COLUMNS and (value := row.get(key)) not in (None, "")
        },
        "tags": {
            t.strip().lower()
            for t in (row.get("tags") or "").replace(",", ";").split(";")
            if t.strip()
        },
    }
    for key in ("name", "language", "timezone"):
        if value := (row.get(key) or "").strip():
            parsed[key] = value[:200]
    if "consent" in columns and consent_word:
        parsed["consent"] = _CONSENT_WORDS[consent_word]
        parsed["consent_source"] = (row.get("consent_source") or "").strip()[:200] or source[:200]
    return parsed


def _apply(contact: Contact, line: int, data: dict, set_by: dict[str, int], now) -> list[Change]:
    """Apply one row to its contact; what it changed, naming an earlier row it overwrote."""
    changes = []
    for key in REPORTED_FIELDS:
        if key in data:
            before = getattr(contact, key) or ""
            if before != data[key]:
                changes.append(Change(key, str(before), str(data[key]), set_by.get(key)))
            setattr(contact, key, data[key])
            set_by[key] = line
    if "consent" in data:
        contact.consent_source = data["consent_source"]
        contact.consent_at = now
    attributes = dict(contact.attributes or {})
    for key, value in data["attributes"].items():
        before = attributes.get(key)
        if before != value:
            changes.append(
                Change(
                    f"attributes.{key}",
                    "" if before is None else str(before),
                    str(value),
                    set_by.get(f"attributes.{key}"),
                )
            )
        attributes[key] = value
        set_by[f"attributes.{key}"] = line
    contact.attributes = attributes
    return changes


def _upsert(batch: dict[str, list[tuple[int, dict]]], report: ContactImportReport) -> None:
    now = timezone.now()
    existing = {c.email: c for c in Contact.objects.filter(email__in=list(batch))}
    new, changed = [], []
    outcomes: list[RowOutcome] = []
    for email, rows in batch.items():
        contact = existing.get(email) or Contact(email=email, created_at=now)
        created = contact.pk is None
        set_by: dict[str, int] = {}
        for index, (line, data) in enumerate(rows):
            changes = _apply(contact, line, data, set_by, now)
            action = "created" if created and index == 0 else "updated" if changes else "unchanged"
            outcomes.append(RowOutcome(line, email, action, changes, sorted(data["tags"])))
        contact.updated_at = now
        (new if created else changed).append(contact)
    for outcome in sorted(outcomes, key=lambda o: o.line):
        report.note(outcome)
    Contact.objects.bulk_create(new, batch_size=1000)
    Contact.objects.bulk_update(
        changed,
        [
            "name",
            "language",
            "timezone",
            "consent",
            "consent_at",
            "consent_source",
            "attributes",
            "updated_at",
        ],
        batch_size=1000,
    )
    report.created += len(new)
    report.updated += len(changed)
    tag_names = set().union(*(d["tags"] for rows in batch.values() for _, d in rows))
    if tag_names:
        Tag.objects.bulk_create([Tag(name=n[:100]) for n in tag_names], ignore_conflicts=True)
        tags = dict(Tag.objects.filter(name__in=tag_names).values_list("name", "pk"))
        ids = dict(Contact.objects.filter(email__in=list(batch)).values_list("email", "pk"))
        Through = Contact.tags.through
        Through.objects.bulk_create(
            [
                Through(contact_id=ids[e], tag_id=tags[t])
                for e, rows in batch.items()
                for t in set().union(*(d["tags"] for _, d in rows))
            ],
            ignore_conflicts=True,
            batch_size=2000,
        )


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: object) -> str:
    """A cell a spreadsheet will not run as a formula (OWASP CSV injection)."""
    text = "" if value is None else str(value)
    return f"'{text}" if text.startswith(_FORMULA_START) else text


def export_rows(queryset: QuerySet) -> Iterator[list[str]]:
    """CSV rows (header first) for contacts, streamed in chunks, formula-safe."""
    yield list(EXPORT_COLUMNS)
    for contact in queryset.order_by("pk").prefetch_related("tags").iterator(chunk_size=2000):
        tags = ";".join(sorted(tag.name for tag in contact.tags.all()))
        yield [
            csv_safe(contact.email),
            csv_safe(contact.name),
            csv_safe(contact.language),
            csv_safe(contact.timezone),
            contact.consent,
            contact.consent_at.isoformat() if contact.consent_at else "",
            csv_safe(contact.consent_source),
            contact.verified_at.isoformat() if contact.verified_at else "",
            csv_safe(tags),
            csv_safe(json.dumps(contact.attributes, ensure_ascii=False)),
            contact.created_at.isoformat(),
        ]
