"""Who must not be mailed: adding suppressions, their side effects, CSV import/export."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.db import IntegrityError, transaction

from . import counters
from .contacts import clean_address, csv_safe
from .exceptions import ImportFileError, MailerError
from .models import Suppression, unsafe_character
from .outbox import cancel_waiting_marketing

logger = logging.getLogger(__name__)


def suppress(
    email: str,
    *,
    scope: str,
    reason: str,
    source: str = "",
    note: str = "",
) -> tuple[Suppression, bool]:
    """Suppress an address (idempotent) and cancel the marketing it has waiting.

    Returns the suppression and whether it is new.
    """
    address = clean_address(email)
    try:
        with transaction.atomic():
            suppression, created = Suppression.objects.get_or_create(
                email=address,
                scope=scope,
                defaults={"reason": reason, "source": source[:100], "note": note},
            )
    except IntegrityError:  # a concurrent webhook created it first
        suppression, created = Suppression.objects.get(email=address, scope=scope), False
    if created:
        transaction.on_commit(
            lambda: counters.inc("mailer_suppressions_added_total", reason=reason, scope=scope)
        )
        cancelled = cancel_waiting_marketing(address)
        logger.info(
            "mailer: suppressed %s (%s, %s); %d waiting marketing messages cancelled",
            address,
            scope,
            reason,
            cancelled,
        )
    return suppression, created


def resubscribe(address: str) -> int:
    """Lift marketing-only suppressions (not hard bounces or manual blocks)."""
    return Suppression.objects.filter(
        email=clean_address(address), scope=Suppression.Scope.MARKETING
    ).delete()[0]


#: Suppressions a person asked for, which the host may lift; bounces, invalid addresses and
#: complaints protect the sender's reputation and stay.
OPT_OUT_REASONS = (Suppression.Reason.MANUAL, Suppression.Reason.UNSUBSCRIBE)


def lift(address: str, *, scope: str | None = None) -> int:
    """Remove the address's opt-out suppressions (in one scope, or both); how many."""
    found = Suppression.objects.filter(email=clean_address(address), reason__in=OPT_OUT_REASONS)
    if scope is not None:
        found = found.filter(scope=scope)
    return found.delete()[0]


# --- CSV ---------------------------------------------------------------------------------

CSV_COLUMNS = ("email", "scope", "reason", "source", "note", "created_at")


def export_csv(queryset: Iterable[Suppression], out: io.TextIOBase) -> int:
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    count = 0
    for row in queryset:
        writer.writerow(
            [csv_safe(getattr(row, column)) for column in CSV_COLUMNS[:-1]]
            + [row.created_at.isoformat()]
        )
        count += 1
    return count


@dataclass
class ImportReport:
    created: int = 0
    existing: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)


def import_csv(data: bytes, *, source: str) -> ImportReport:
    """Import suppressions from CSV with at least an ``email`` column.

    Optional columns: scope (all/marketing, default all), reason (default manual), note.
    A file that cannot be decoded or has no email column imports nothing; bad rows are
    reported by line number and skipped.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ImportFileError("The file is not UTF-8 text.") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    if "email" not in columns:
        raise ImportFileError("The CSV needs a header row with an 'email' column.")
    reader.fieldnames = columns
    scopes, reasons = set(Suppression.Scope.values), set(Suppression.Reason.values)
    report = ImportReport()
    rows: list[tuple[int, str, str, str, str]] = []
    try:
        for line, row in enumerate(reader, start=2):
            email = (row.get("email") or "").strip()
            scope = (row.get("scope") or "all").strip().lower()
            reason = (row.get("reason") or "manual").strip().lower()
            if scope not in scopes:
                report.rejected.append((line, f"unknown scope {scope!r}"))
                continue
            if reason not in reasons:
                report.rejected.append((line, f"unknown reason {reason!r}"))
                continue
            try:
                address = clean_address(email)
            except MailerError as exc:
                report.rejected.append((line, str(exc)))
                continue
            note = (row.get("note") or "").strip()
            if char := unsafe_character(note):  # NUL would fail the whole import
                report.rejected.append((line, f"the note contains a control character ({char})"))
                continue
            rows.append((line, address, scope, reason, note))
    except csv.Error as exc:
        raise ImportFileError(f"The CSV cannot be parsed: {exc}") from None
    with transaction.atomic():
        for _, address, scope, reason, note in rows:
            _, created = suppress(address, scope=scope, reason=reason, source=source, note=note)
            report.created += created
            report.existing += not created
    return report
