"""The readiness checks for container probes of workers and beat: exit 0 when healthy."""

import json

from django.core.management.base import BaseCommand

from mailer import health


class Command(BaseCommand):
    help = (
        "Check the database, broker and Redis (and, on request, live workers of a queue or "
        "beat); print the result as JSON and exit 1 when something is wrong."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--queue", action="append", default=[], help="Require a live worker on QUEUE."
        )
        parser.add_argument("--beat", action="store_true", help="Require beat's heartbeat.")

    def handle(self, *args, queue: list[str], beat: bool, **options):
        ok, body = health.ready()
        workers = body.get("workers", {})
        missing = [name for name in queue if not workers.get(name)]
        if missing:
            ok = False
            body["missing_workers"] = missing
        if beat and not body.get("beat", {}).get("alive"):
            ok = False
        body["status"] = "ok" if ok else "unavailable"
        self.stdout.write(json.dumps(body, sort_keys=True))
        if not ok:
            raise SystemExit(1)
