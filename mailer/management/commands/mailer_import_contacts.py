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

    def handle(self, *args, file: Path, source: str, batch_size: int, **options):
        if not file.is_file():
            raise CommandError(f"{file} is not a file.")
        try:
            with file.open("rb") as stream:
                report = import_csv(
                    stream, source=source or f"import of {file.name}", batch_size=batch_size
                )
        except ImportFileError as exc:
            raise CommandError(f"Nothing imported: {exc}") from None
        for line, reason in report.rejected:
            self.stderr.write(f"line {line}: {reason}")
        self.stdout.write(
            self.style.SUCCESS(
                f"{report.rows} rows: {report.created} created, {report.updated} updated, "
                f"{report.duplicates} duplicates merged, {len(report.rejected)} rejected."
            )
        )
