"""Webhook benchmark: ESP event batches through anymail's views into mailer, in-process.

Run it through ``bash tests/services.sh run -- .venv/bin/python bench/webhooks.py``, or
with the services already running (``eval "$(bash tests/services.sh start)"``). It drops
and re-creates its own database (``mailer_bench_webhooks``); nothing it does touches
Redis. The payloads are the ESPs' raw formats, built by tests/test_webhooks.py's ESP
classes (the same ones the webhook tests post).

a. SendGrid: one POST carrying N events (delivered / open / click / bounce mix) about N
   sent messages, through django.test.Client with the webhook's basic auth → ms per
   batch and per event, SQL queries per event, CPU of this process and of PostgreSQL;
   then the same batch again (a replay: every event is known, nothing changes).
b. SendGrid by event type: a batch of one type at a time → ms and queries per event.
c. Postmark: N single-event POSTs (Postmark posts one event per request), and replayed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from common import (  # noqa: E402
    Interrupted,
    bench_env,
    cpu_delta,
    cpu_snapshot,
    machine_lines,
    migrate,
    on_sigterm,
    recreate_database,
    require_services,
    say,
    setup_django,
    take_lock,
    with_path,
)

DB_NAME = "mailer_bench_webhooks"
REDIS_DB = 7  # named in the environment only: the webhook path never uses Redis
LOCK_KEY = "mailer-bench-webhooks"
WEBHOOK_SECRET = "bench:bench-only-webhook-secret"  # noqa: S105 - bench_env's, a throwaway

# The mix of a SendGrid batch, per 20 events.
MIX = (["delivered"] * 8) + (["opened"] * 6) + (["clicked"] * 4) + ["hard_bounce", "soft_bounce"]


@dataclass
class Timing:
    label: str
    events: int
    seconds: list[float]
    cpu_self: float = 0.0  # seconds, summed over the rounds
    cpu_postgres: float = 0.0
    queries: int = 0
    kinds: Counter | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class WebhookBench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        base_db, broker = require_services("webhooks.py")
        self.admin_url = base_db
        self.db_url = with_path(base_db, f"/{DB_NAME}")
        self.redis_url = with_path(broker, f"/{REDIS_DB}")
        self.lock = None
        self.rows: list[tuple[str, str]] = []
        self.next_set = 0

    def add(self, figure: str, value: str) -> None:
        self.rows.append((figure, value))
        say(f"  {figure:<50} {value}")

    def run(self) -> None:
        args = self.args
        say("mailer webhook benchmark")
        for line in machine_lines():
            say(line)
        sizes = f"{args.events} events a batch, {args.rounds} rounds, {args.filler:,} filler"
        say(f"  sizes     {sizes}")
        self.lock = take_lock(self.admin_url, LOCK_KEY, args.lock_timeout)
        recreate_database(self.admin_url, DB_NAME)
        env = bench_env(self.db_url, self.redis_url)
        say(f"\nsetup: database {DB_NAME!r} migrated in {migrate(env):.1f} s")
        setup_django(env)
        warnings.filterwarnings("ignore", module="anymail")  # one per SendGrid view built
        from django.test import Client

        from tests import test_webhooks as esps

        self.esps = esps
        self.auth = esps.basic(WEBHOOK_SECRET)
        self.client = Client()
        self.make_filler()

        sendgrid, postmark = esps.SendGrid(), esps.Postmark()
        self.warm_up(sendgrid)
        self.warm_up(postmark)
        n = args.events

        say(f"\na. SendGrid: one POST of {n} events ({self.mix_text()}), {args.rounds} rounds")
        fresh, replay = self.rounds(sendgrid, n, args.rounds)
        self.print_timing("SendGrid batch", fresh, per_request=n)
        self.print_timing("SendGrid batch replayed", replay, per_request=n)

        say(f"\nb. SendGrid by event type: one POST of {args.per_type} events of one type")
        for kind in ("delivered", "opened", "clicked", "hard_bounce", "soft_bounce"):
            timing, _ = self.rounds(sendgrid, args.per_type, 1, kinds=[kind])
            per_event = timing.median / timing.events * 1e3
            self.add(
                f"{kind}: ms / queries per event",
                f"{per_event:.2f} ms / {timing.queries / timing.events:.1f}",
            )

        say(f"\nc. Postmark: {n} single-event POSTs, {args.rounds} rounds")
        fresh, replay = self.rounds(postmark, n, args.rounds)
        self.print_timing("Postmark single-event POSTs", fresh, per_request=1)
        self.print_timing("Postmark POSTs replayed", replay, per_request=1)
        self.print_table()

    def cleanup(self) -> None:
        if self.lock is not None:
            with contextlib.suppress(Exception):
                self.lock.close()
            self.lock = None

    # -- data ---------------------------------------------------------------------------------

    def make_filler(self) -> None:
        """Other messages and events, so lookups go through indexes of a realistic depth."""
        from django.db import connection

        from mailer.models import Campaign

        self.campaign = Campaign.objects.create(name="Webhook bench", status="sent")
        t0 = time.monotonic()
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO mailer_message (uuid, kind, status, to_email, template_slug, "
                "language, context, metadata, subject, attempts, last_error, "
                "provider_message_id, created_at, sent_at, updated_at) "
                "SELECT gen_random_uuid(), 'transactional', 'delivered', "
                "'filler' || g || '@example.net', 'welcome', 'en', '{}', '{}', 'Welcome', 1, "
                "'', 'filler-' || g, now(), now(), now() FROM generate_series(1, %s) g",
                [self.args.filler],
            )
            cursor.execute(
                "INSERT INTO mailer_event (message_id, event_type, recipient, timestamp, "
                "description, bounce, automated, automated_reason, data, provider_event_id) "
                "SELECT id, 'delivered', to_email, now(), '', '', false, '', '{}', "
                "'filler:' || id FROM mailer_message"
            )
            cursor.execute("VACUUM ANALYZE mailer_message")
            cursor.execute("VACUUM ANALYZE mailer_event")
        say(
            f"  filler: {self.args.filler:,} messages with a delivered event each, in "
            f"{time.monotonic() - t0:.1f} s"
        )

    def messages(self, esp, count: int) -> list:
        """``count`` sent campaign messages whose provider ids are ``esp``'s."""
        from django.utils import timezone

        from mailer.models import Kind, Message, MessageStatus

        self.next_set += 1
        sent_at = timezone.now() - timedelta(hours=1)
        rows = [
            Message(
                kind=Kind.CAMPAIGN,
                campaign=self.campaign,
                status=MessageStatus.SENT,
                to_email=f"r{self.next_set}-{i}@{esp.name}.example.org",
                template_slug="spring-picks",
                language="en",
                subject="Our spring picks",
                attempts=1,
                sent_at=sent_at,
                queued_at=sent_at,
            )
            for i in range(count)
        ]
        for message in rows:
            message.provider_message_id = self.esps.provider_id(esp.name, message)
        return Message.objects.bulk_create(rows, batch_size=1000)

    def events(self, esp, messages: list, kinds: list[str] | None = None) -> list[dict]:
        kinds = kinds or MIX
        return [
            # Half carry our id in the metadata, half only the ESP's message id.
            esp.event(kinds[i % len(kinds)], message, metadata=i % 2 == 0)
            for i, message in enumerate(messages)
        ]

    def mix_text(self) -> str:
        counts = Counter(MIX)
        return ", ".join(f"{k} {v / len(MIX):.0%}" for k, v in counts.items())

    # -- timing -------------------------------------------------------------------------------

    def post(self, esp, events: list[dict]) -> None:
        responses = esp.post(self.client, events, auth=self.auth)
        bad = [r.status_code for r in responses if r.status_code != 200]
        if bad:
            raise RuntimeError(f"{esp.name}: {len(bad)} POSTs failed, e.g. HTTP {bad[0]}")

    def warm_up(self, esp) -> None:
        """Imports, the anymail view, the database connection, prepared caches."""
        messages = self.messages(esp, 40)
        events = self.events(esp, messages)
        self.post(esp, events)
        self.post(esp, events)

    def snapshot(self):
        return cpu_snapshot(set(), None, DB_NAME)

    def rounds(self, esp, count: int, rounds: int, kinds: list[str] | None = None):
        """Fresh events, then the same again, ``rounds`` times on new messages each time;
        then one more round with every SQL query captured (not timed)."""
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        from mailer.models import Event

        fresh = Timing("fresh", count, [])
        replay = Timing("replay", count, [])
        for _ in range(rounds):
            events = self.events(esp, self.messages(esp, count), kinds)
            for timing in (fresh, replay):
                stored = Event.objects.count()
                before = self.snapshot()
                cpu0, t0 = time.process_time(), time.perf_counter()
                self.post(esp, events)
                timing.seconds.append(time.perf_counter() - t0)
                timing.cpu_self += time.process_time() - cpu0
                timing.cpu_postgres += cpu_delta(before, self.snapshot()).get("postgres", 0.0)
                added = Event.objects.count() - stored
                expected = count if timing is fresh else 0
                if added != expected:
                    raise RuntimeError(f"{esp.name} {timing.label}: {added} events stored")
        events = self.events(esp, self.messages(esp, count), kinds)
        for timing in (fresh, replay):
            with CaptureQueriesContext(connection) as captured:
                self.post(esp, events)
            timing.queries = len(captured.captured_queries)
            timing.kinds = Counter(query_kind(q["sql"]) for q in captured.captured_queries)
        return fresh, replay

    def print_timing(self, label: str, timing: Timing, *, per_request: int) -> None:
        n, rounds = timing.events, len(timing.seconds)
        if per_request == 1:
            self.add(f"{label}: all {n}, median of {rounds}", f"{timing.median * 1e3:,.0f} ms")
        else:
            self.add(f"{label}: one POST, median of {rounds}", f"{timing.median * 1e3:,.0f} ms")
        self.add("  rounds", " / ".join(f"{s * 1e3:,.0f}" for s in timing.seconds) + " ms")
        self.add("  per event", f"{timing.median / n * 1e3:.2f} ms")
        self.add("  SQL queries per event", f"{timing.queries / n:.2f}")
        kinds = ", ".join(
            f"{kind} {count / n:.2f}" for kind, count in (timing.kinds or Counter()).most_common()
        )
        say(f"      ({kinds})")
        self.rows.append(("    by statement", kinds))
        self.add("  CPU per event: this process", f"{timing.cpu_self / rounds / n * 1e3:.2f} ms")
        self.add("  CPU per event: PostgreSQL", f"{timing.cpu_postgres / rounds / n * 1e3:.2f} ms")

    def print_table(self) -> None:
        width = max(len(f) for f, _ in self.rows) + 2
        say("\n" + "=" * (width + 50))
        for figure, value in self.rows:
            say(f"{figure:<{width}}{value}")
        say("=" * (width + 50))
        say(f"machine load avg {os.getloadavg()[0]:.2f} now; database {DB_NAME}")


def query_kind(sql: str) -> str:
    """'SELECT message', 'INSERT event', 'SAVEPOINT'… for a captured statement."""
    words = sql.split()
    verb = words[0].upper() if words else "?"
    table = ""
    for marker in ("FROM", "INTO", "UPDATE"):
        if marker in (w.upper() for w in words):
            index = [w.upper() for w in words].index(marker)
            if index + 1 < len(words):
                table = words[index + 1].strip('"').removeprefix("mailer_")
                break
    return f"{verb} {table}".strip() if verb in ("SELECT", "INSERT", "UPDATE", "DELETE") else verb


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="mailer webhook benchmark")
    parser.add_argument("--events", type=int, default=500, help="events per batch")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--per-type", type=int, default=100, help="events per type in b.")
    parser.add_argument("--filler", type=int, default=100_000, help="other messages in the DB")
    parser.add_argument("--lock-timeout", type=float, default=900.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    bench = WebhookBench(args)
    try:
        bench.run()
    except (KeyboardInterrupt, Interrupted):
        say("\ninterrupted")
        return 130
    finally:
        bench.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
