"""Import contacts from a CSV file (streamed; all or nothing if the file is unreadable)."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from mailer.contacts import import_csv
from mailer.exceptions import ImportFileError


class Command(BaseCommand):
    help = (
        "Import contacts from CSV. Columns: email (required), name, language, timezone, "
        "tags (;-separated), consent (granted/withdrawn/yes/no), consent_source; any other "
        "column becomes an attribute."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path)
        parser.add_argument("--source", default="", help="Consent evidence to record.")
        parser.add_argument("--batch-size", type=int, default=2000)
        parser.add_argument(
            "--dry-run", action="store_true", help="Report what would change; import nothing."
        )

    def handle(
        self, *args, file: Path, source: str, batch_size: int, dry_run: bool = False, **options
    ):
        if not file.is_file():
            raise CommandError(f"{file} is not a file.")
        try:
            with file.open("rb") as stream:
                report = import_csv(
                    stream,
                    source=source or f"import of {file.name}",
                    batch_size=batch_size,
                    dry_run=dry_run,
                )
        except ImportFileError as exc:
            raise CommandError(f"Nothing imported: {exc}") from None
        for line, reason in report.rejected:
            self.stderr.write(f"line {line}: {reason}")
        for outcome in report.overwrites:
            changes = "; ".join(
                f"{c.field} {c.before!r} → {c.after!r} (set by line {c.overwrites_line})"
                for c in outcome.changes
                if c.overwrites_line
            )
            self.stdout.write(f"line {outcome.line} overwrote {outcome.email}: {changes}")
        self.stdout.write(
            self.style.SUCCESS(
                f"{'Dry run, nothing imported: ' if dry_run else ''}"
                f"{report.rows} rows: {report.created} created, {report.updated} updated, "
                f"{report.duplicates} duplicates merged, {len(report.rejected)} rejected."
            )
        )
