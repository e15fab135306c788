"""Create, list or revoke HTTP API keys; a new key is printed once and never stored."""

from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from mailer import apikeys
from mailer.models import ApiKey, ApiScope


class Command(BaseCommand):
    help = "Create (prints the key once), list or revoke API keys for mailer's HTTP API."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="Create a key and print it.")
        create.add_argument("name")
        create.add_argument(
            "--scope",
            action="append",
            choices=ApiScope.values,
            dest="scopes",
            help="Repeat for several; default: send.",
        )
        create.add_argument("--expires-days", type=int, default=None)
        create.add_argument("--rate-limit", default="", help="e.g. 600/m; default: the setting.")
        sub.add_parser("list", help="List keys (prefix, name, scopes, state).")
        revoke = sub.add_parser("revoke", help="Revoke a key by its prefix.")
        revoke.add_argument("prefix")

    def handle(self, *args, action: str, **options):
        if action == "create":
            expires = options["expires_days"]
            try:
                row, key = apikeys.create(
                    options["name"],
                    scopes=options["scopes"] or [ApiScope.SEND],
                    expires_at=timezone.now() + timedelta(days=expires) if expires else None,
                    rate_limit=options["rate_limit"],
                )
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            self.stderr.write(f"Created key {row.prefix}… ({', '.join(row.scopes)}). Store it now:")
            self.stdout.write(key)
        elif action == "list":
            for row in ApiKey.objects.all():
                state = "revoked" if row.revoked else "expired" if row.expired() else "active"
                self.stdout.write(f"{row.prefix}\t{row.name}\t{','.join(row.scopes)}\t{state}")
        else:
            row = ApiKey.objects.filter(prefix=options["prefix"]).first()
            if row is None:
                raise CommandError(f"No key with prefix {options['prefix']!r}.")
            apikeys.revoke(row)
            self.stdout.write(self.style.SUCCESS(f"Revoked {row.prefix}."))
