"""Campaign benchmark: import, materialize, send and report at 100k (and 1M) contacts.

Run it through ``make bench-campaign`` (or ``bash tests/services.sh run -- .venv/bin/python
bench/campaign.py``), which exports DATABASE_URL and CELERY_BROKER_URL. It drops and
re-creates its own database (``mailer_bench_campaign``) for every size and uses Redis
DB 6; the test database, ``mailer_bench`` and Redis DBs 0 and 5 are left alone. See
bench/README.md for how to read it.

Per size (100k contacts by default; ``--million`` adds 1M, ``--contacts N`` sets it):

1. import         a generated CSV through ``mailer.contacts.import_csv`` → rows/s, peak RSS
2. materialize    ``campaigns.materialize(campaign, phase="all")`` → rows/s, peak RSS, and
                  a raw ``COPY`` of the same rows into a scratch copy of mailer_message
3. sending        the sink's one-connection ceiling for this campaign's message, then two
                  ``celery worker -Q campaign -c 1`` processes drain the campaign → msg/s,
                  CPU per message, each worker's peak RSS
4. report         opens, clicks, bounces as Event rows in bulk; ``reports.report()`` and
                  the admin change page (django.test.Client), median of 5

The import, materialize and COPY phases each run in a child process of their own (this
script with ``--child``), so their peak RSS is theirs alone and comparable across sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from common import (  # noqa: E402
    NPROC,
    Interrupted,
    QueueWorker,
    Timers,
    bench_env,
    cpu_delta,
    cpu_snapshot,
    lock_is_held,
    machine_lines,
    migrate,
    on_sigterm,
    process_tree_hwm,
    recreate_database,
    require_services,
    say,
    setup_django,
    steady_rate,
    take_lock,
    vm_status,
    with_path,
)
from sink import Sink  # noqa: E402

DB_NAME = "mailer_bench_campaign"
REDIS_DB = 6
LOCK_KEY = "mailer-bench-campaign"
QUEUE = "campaign"
POSTAL_ADDRESS = "Bench Shop, 1 Example Street, 75001 Paris"
SITE_URL = "https://shop.bench.test"

TARGET_MATERIALIZE = 0.30  # of raw COPY
TARGET_RSS_MB = 300.0
FLAT_GROWTH = 0.20  # "flat": the largest size's peak within +20 % of the smallest's
TARGET_SEND = 0.50  # of the sink ceiling
TARGET_PAGE_S = 1.0

INSERT_EVENT = (
    "INSERT INTO mailer_event (message_id, event_type, provider_event_id, recipient, timestamp, "
    "description, bounce, link_id, campaign_id, automated, automated_reason, data)"
)
BOUNCE_KIND = "CASE WHEN h1 < 100 THEN 'hard' ELSE 'soft' END"  # 1 % hard, 0.5 % soft

#: mailer_message's columns that materialize fills (and the COPY comparison copies).
MESSAGE_COLUMNS = (
    "uuid, kind, status, to_email, contact_id, template_id, campaign_id, variant_id, "
    "template_slug, language, context, metadata, subject, attempts, last_error, "
    "provider_message_id, created_at, queued_at, updated_at"
)


# --- The data: contacts CSV and the campaign's template -----------------------------------

FIRST = "ada alan grace linus margaret ken barbara dennis frances john edsger radia".split()
LAST = "lovelace turing hopper torvalds hamilton thompson liskov ritchie allen backus".split()
DOMAINS = ["example.com", "example.org", "mail.example.net", "shop.example.io", "corp.test"]
LANGUAGES = ["en"] * 5 + ["fr", "de", "es"]
PLANS = ["free"] * 6 + ["pro"] * 3 + ["team"]
TAGS = ["newsletter", "promo", "vip", "beta", "spring", "retail", "b2b", "events"]


def write_csv(path: Path, count: int, seed: int = 1) -> dict[str, int]:
    """``count`` contact rows: ~90 % consent yes, 0.1 % invalid, 0.2 % case duplicates."""
    rng = random.Random(seed)
    stats = {"rows": count, "invalid": 0, "duplicates": 0}
    previous = ""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "name", "language", "plan", "consent", "tags"])
        for i in range(count):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            if i % 1000 == 999:
                email = f"broken-address-{i}"
                stats["invalid"] += 1
            elif i % 500 == 250 and previous:
                email = previous.upper()  # the same person again, another case
                stats["duplicates"] += 1
            else:
                email = f"{first}.{last}.{i}@{DOMAINS[i % len(DOMAINS)]}"
                previous = email
            roll = rng.random()
            consent = "yes" if roll < 0.90 else ("no" if roll < 0.95 else "")
            tags = ";".join(rng.sample(TAGS, rng.randint(0, 3)))
            writer.writerow(
                [
                    email,
                    f"{first.title()} {last.title()}",
                    rng.choice(LANGUAGES),
                    rng.choice(PLANS),
                    consent,
                    tags,
                ]
            )
    return stats


_PARAGRAPH = (
    "Spring is here, and so are the first picks of the season: light jackets, linen "
    "shirts and the shoes you will walk in all summer. Everything ships free this week. "
)
CAMPAIGN_HTML = (
    "<!DOCTYPE html><html><head><style>"
    "body { margin: 0; padding: 0; background: #f4f5f7; font-family: Helvetica, sans-serif; }"
    " .card { background: #ffffff; border-radius: 6px; padding: 24px; margin: 16px; }"
    " p { font-size: 16px; line-height: 24px; color: #1f2933; margin: 0 0 16px; }"
    " a.button { background: #0b7285; color: #ffffff; padding: 12px 20px; }"
    " .footer { font-size: 12px; color: #7b8794; }"
    "</style></head><body>"
    '<div class="card"><p>Hi {{ contact.first_name or "there" }},</p>'
    "{% if contact.attributes.plan == 'pro' %}<p>As a Pro member you get 20% off "
    "everything until Sunday.</p>{% endif %}"
    + "".join(
        f'<p>{_PARAGRAPH * 2}<a href="{SITE_URL}/spring/{name}?utm_source=mail">'
        f"See the {name}</a></p>"
        for name in ("jackets", "shirts", "shoes", "bags", "hats", "sale")
    )
    + f'<p><a class="button" href="{SITE_URL}/spring?utm_source=mail">Shop spring</a></p>'
    + "</div>"
    + '<p class="footer">You get this email because you said yes to news from Bench Shop. '
    '<a href="{{ unsubscribe_url }}">Unsubscribe</a> or '
    '<a href="{{ preferences_url }}">choose what you get</a>.<br>{{ postal_address }}</p>'
    + "</body></html>"
)


# --- Child processes: one phase each, so each has its own peak RSS ---------------------------


def child_main(args: argparse.Namespace) -> int:
    """Run one phase in this (fresh) process; print its figures as ``RESULT {json}``."""
    import django

    django.setup()
    base = vm_status("self").get("VmRSS", 0.0)
    if args.child == "import":
        result = child_import(Path(args.csv))
    elif args.child == "materialize":
        result = child_materialize(args.campaign_id)
    elif args.child == "copy":
        result = child_copy(args.campaign_id, Path(args.scratch_file))
    else:
        raise SystemExit(f"unknown child phase {args.child!r}")
    result["rss_base_mb"] = base
    result["rss_peak_mb"] = vm_status("self").get("VmHWM", 0.0)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def child_import(path: Path) -> dict:
    from mailer import contacts

    with open(path, "rb") as handle:
        total = sum(1 for _ in handle) - 1
    step = max(2000, total // 10)
    seen = {"next": step}
    original = contacts._upsert
    t0 = time.perf_counter()

    def upsert(batch, report):  # progress, and RSS as the import goes
        original(batch, report)
        if report.rows >= seen["next"]:
            seen["next"] += step
            rss = vm_status("self").get("VmRSS", 0.0)
            rate = report.rows / (time.perf_counter() - t0)
            say(f"    imported {report.rows:>9,} rows  {rate:>8,.0f} rows/s  RSS {rss:.0f} MB")

    contacts._upsert = upsert
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        with open(path, "rb") as stream:
            report = contacts.import_csv(stream, source="bench import")
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        contacts._upsert = original
    return {
        "rows": report.rows,
        "created": report.created,
        "updated": report.updated,
        "duplicates": report.duplicates,
        "rejected": len(report.rejected),
        "seconds": seconds,
        "cpu": cpu,
    }


def child_materialize(campaign_id: int) -> dict:
    from mailer import campaigns
    from mailer.models import Campaign

    campaign = Campaign.objects.get(pk=campaign_id)
    chunks = {"n": 0, "rows": 0}
    original = campaigns._insert_chunk
    t0 = time.perf_counter()

    def insert_chunk(*args, **kwargs):
        created = original(*args, **kwargs)
        chunks["n"] += 1
        chunks["rows"] += created
        if chunks["n"] % 4 == 0:
            rate = chunks["rows"] / (time.perf_counter() - t0)
            rss = vm_status("self").get("VmRSS", 0.0)
            say(
                f"    chunk {chunks['n']:>3}: {chunks['rows']:>9,} rows  {rate:>8,.0f} rows/s  "
                f"RSS {rss:.0f} MB"
            )
        return created

    campaigns._insert_chunk = insert_chunk
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        created = campaigns.materialize(campaign, phase="all")
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        campaigns._insert_chunk = original
    return {"created": created, "chunks": chunks["n"], "seconds": seconds, "cpu": cpu}


def child_copy(campaign_id: int, scratch: Path) -> dict:
    """COPY the campaign's rows into a scratch table like mailer_message: the ceiling."""
    import psycopg

    url = os.environ["DATABASE_URL"]
    out: dict = {}
    with psycopg.connect(url, autocommit=True) as conn:
        # The very rows materialize wrote (same uuids, emails, ids), as COPY text.
        with open(scratch, "wb") as handle, conn.cursor() as cur:
            sql = (
                f"COPY (SELECT {MESSAGE_COLUMNS} FROM mailer_message "  # noqa: S608 - ints
                f"WHERE campaign_id = {int(campaign_id)} ORDER BY id) TO STDOUT"
            )
            with cur.copy(sql) as copy:
                for data in copy:
                    handle.write(data)
        out["bytes"] = scratch.stat().st_size
        for variant, foreign_keys in (("plain", False), ("fk", True)):
            conn.execute("DROP TABLE IF EXISTS bench_scratch_message")
            conn.execute("CREATE TABLE bench_scratch_message (LIKE mailer_message INCLUDING ALL)")
            if foreign_keys:  # as mailer_message has them (LIKE does not copy them)
                for column, table in (
                    ("contact_id", "mailer_contact"),
                    ("template_id", "mailer_template"),
                    ("campaign_id", "mailer_campaign"),
                    ("variant_id", "mailer_variant"),
                ):
                    conn.execute(
                        f"ALTER TABLE bench_scratch_message ADD FOREIGN KEY ({column}) "
                        f"REFERENCES {table} (id) DEFERRABLE INITIALLY DEFERRED"
                    )
            with contextlib.suppress(psycopg.Error):
                conn.execute("CHECKPOINT")  # both sides start from a checkpoint
            t0 = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur, open(scratch, "rb") as handle:
                with cur.copy(f"COPY bench_scratch_message ({MESSAGE_COLUMNS}) FROM STDIN") as copy:
                    while data := handle.read(1 << 20):
                        copy.write(data)
            out[f"{variant}_seconds"] = time.perf_counter() - t0
            (rows,) = conn.execute("SELECT count(*) FROM bench_scratch_message").fetchone()
            out[f"{variant}_rows"] = rows
        conn.execute("DROP TABLE IF EXISTS bench_scratch_message")
    scratch.unlink(missing_ok=True)
    return out


# --- The benchmark -------------------------------------------------------------------------


class Table:
    """Figures by (phase, label), one column per size; printed as they come and at the end."""

    def __init__(self):
        self.values: dict[tuple[str, str], dict[int, str]] = {}
        self.order: list[tuple[str, str]] = []

    def add(self, size: int, phase: str, label: str, value: str) -> None:
        key = (phase, label)
        if key not in self.values:
            self.values[key] = {}
            self.order.append(key)
        self.values[key][size] = value
        say(f"  {label:<48} {value}")

    def print(self, sizes: list[int]) -> None:
        width = max(len(label) for _, label in self.order) + 2
        columns = [
            max(len(size_label(s)), *(len(v.get(s, "")) for v in self.values.values())) + 3
            for s in sizes
        ]
        total = 6 + width + sum(columns)
        say("\n" + "=" * total)
        head = "".join(f"{size_label(s):<{c}}" for s, c in zip(sizes, columns, strict=True))
        say(f"{'phase':<6}{'figure':<{width}}{head}")
        say("-" * total)
        last = None
        for phase, label in self.order:
            cells = "".join(
                f"{self.values[(phase, label)].get(s, '—'):<{c}}"
                for s, c in zip(sizes, columns, strict=True)
            )
            say(f"{phase if phase != last else '':<6}{label:<{width}}{cells}".rstrip())
            last = phase
        say("=" * total)


def size_label(size: int) -> str:
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M contacts"
    if size >= 1000 and size % 1000 == 0:
        return f"{size // 1000}k contacts"
    return f"{size:,} contacts"


def mb(value: float) -> str:
    return f"{value:,.0f} MB"


class CampaignBench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        base_db, broker = require_services("campaign.py")
        self.admin_url = base_db
        self.db_url = with_path(base_db, f"/{DB_NAME}")
        self.redis_url = with_path(broker, f"/{REDIS_DB}")
        self.table = Table()
        self.sink: Sink | None = None
        self.lock = None
        self.workers: list[QueueWorker] = []
        self.child: subprocess.Popen | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="mailer-bench-campaign-"))
        self.env: dict[str, str] = {}
        self.summary: dict[int, dict[str, float]] = {}
        self.warnings: list[str] = []

    # -- running ----------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        say("mailer campaign benchmark")
        for line in machine_lines():
            say(line)
        say(
            f"  sizes     {', '.join(f'{s:,}' for s in args.sizes)} contacts; "
            f"send cap {args.send_cap:,}; ceiling {args.ceiling_messages:,} messages"
        )
        say(f"\nsetup: sink, database {DB_NAME!r} (re-created per size), Redis db {REDIS_DB}")
        self.lock = take_lock(self.admin_url, LOCK_KEY, args.lock_timeout)
        if lock_is_held(self.lock, "mailer-bench"):
            self.warnings.append(
                "bench/transactional.py was running on this server at the start: "
                "the machine was shared"
            )
        self.sink = Sink().start()
        say(f"  sink pid {self.sink.process.pid} on 127.0.0.1:{self.sink.port}; temp {self.tmp}")
        self.env = bench_env(
            self.db_url,
            self.redis_url,
            smtp_port=self.sink.port,
            MAILER_POSTAL_ADDRESS=POSTAL_ADDRESS,
            SITE_URL=SITE_URL,
        )
        setup_django(self.env)
        for size in args.sizes:
            self.run_size(size)
        self.table.print(args.sizes)
        self.print_summary()

    def cleanup(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.child.wait(timeout=10)
            if self.child.poll() is None:
                self.child.kill()
        self.child = None
        self.stop_workers()
        if self.sink is not None:
            self.sink.stop()
            self.sink = None
        if self.lock is not None:
            with contextlib.suppress(Exception):
                self.flush_redis()
            with contextlib.suppress(Exception):
                self.lock.close()
            self.lock = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def flush_redis(self) -> None:
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()

    def sql(self, statement: str, params=None) -> int:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(statement, () if params is None else params)  # "%%" is always "%"
            return cursor.rowcount

    def run_child(self, phase: str, *extra: str) -> dict:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", phase, *extra]
        self.child = subprocess.Popen(
            command, cwd=REPO, env=self.env, stdout=subprocess.PIPE, text=True
        )
        result = None
        for line in self.child.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
            else:
                say(line.rstrip("\n"))
        code = self.child.wait()
        self.child.stdout.close()
        self.child = None
        if code or result is None:
            raise RuntimeError(f"the {phase} child process failed (exit code {code})")
        return result

    def run_size(self, size: int) -> None:
        from django.db import connections

        started = time.monotonic()
        say(f"\n{'=' * 20} {size_label(size)} {'=' * 20}")
        connections.close_all()
        recreate_database(self.admin_url, DB_NAME)
        say(f"  database re-created and migrated in {migrate(self.env):.1f} s")
        self.flush_redis()
        self.summary[size] = {}
        campaign_id = self.phase_import(size)
        self.phase_materialize(size, campaign_id)
        self.phase_send(size, campaign_id)
        if self.args.breakdown:
            self.phase_breakdown(size, campaign_id)
        self.phase_report(size, campaign_id)
        say(f"\n  ({size_label(size)} done in {time.monotonic() - started:.0f} s)")

    # -- 1. import -------------------------------------------------------------------------

    def phase_import(self, size: int) -> int:
        add = self.table.add
        path = self.tmp / f"contacts-{size}.csv"
        t0 = time.monotonic()
        made = write_csv(path, size)
        say(
            f"\n1. import: {size:,} CSV rows ({path.stat().st_size / 1e6:.1f} MB, written in "
            f"{time.monotonic() - t0:.1f} s) through contacts.import_csv, in a child process"
        )
        result = self.run_child("import", "--csv", str(path))
        path.unlink(missing_ok=True)
        rate = result["rows"] / result["seconds"]
        add(size, "1", "import rate (rows/s)", f"{rate:,.0f} rows/s")
        add(size, "1", "  import time", f"{result['seconds']:.1f} s")
        add(
            size,
            "1",
            "  rows created / duplicates / rejected",
            (f"{result['created']:,} / {result['duplicates']:,} / {result['rejected']:,}"),
        )
        add(
            size,
            "1",
            "  CPU of the importing process per row",
            (f"{result['cpu'] / result['rows'] * 1e6:.0f} µs"),
        )
        add(size, "1", "peak RSS, import process", mb(result["rss_peak_mb"]))
        add(size, "1", "  RSS after django.setup (baseline)", mb(result["rss_base_mb"]))
        if made["invalid"] != result["rejected"]:
            self.warnings.append(
                f"{size:,}: the CSV had {made['invalid']} invalid rows, import rejected "
                f"{result['rejected']}"
            )
        self.summary[size]["rss_import"] = result["rss_peak_mb"]

        # The rest of the scene: statistics, a few suppressions, segment, template, campaign.
        t0 = time.monotonic()
        self.sql("VACUUM ANALYZE mailer_contact")
        self.sql("VACUUM ANALYZE mailer_contact_tags")
        say(f"  VACUUM ANALYZE of the contacts: {time.monotonic() - t0:.1f} s")
        suppressed = self.sql(
            "INSERT INTO mailer_suppression (email, scope, reason, source, note, created_at) "
            "SELECT email, CASE WHEN id %% 2 = 0 THEN 'all' ELSE 'marketing' END, "
            "'hard_bounce', 'bench', '', now() FROM mailer_contact WHERE id %% 100 = 42"
        )
        self.sql("ANALYZE mailer_suppression")
        campaign, audience, seconds = self.make_campaign()
        add(size, "2", "audience (consented, not suppressed)", f"{audience:,} contacts")
        add(size, "2", "  suppressed contacts (1 %, both scopes)", f"{suppressed:,}")
        add(size, "2", "  audience count (check_ready)", f"{seconds * 1e3:,.0f} ms")
        return campaign.pk

    def make_campaign(self):
        from django.utils import timezone

        from mailer import campaigns
        from mailer.models import Campaign, CampaignStatus, Segment, SegmentRule, Template

        segment = Segment.objects.create(name="Consented")
        SegmentRule.objects.create(
            segment=segment,
            field=SegmentRule.Field.CONSENT,
            operator=SegmentRule.Operator.EQUALS,
            value="granted",
        )
        template = Template.objects.create(
            slug="spring-picks",
            purpose=Template.Purpose.MARKETING,
            subject="{{ contact.first_name or 'Hello' }}, our spring picks",
            html=CAMPAIGN_HTML,
        )
        campaign = Campaign.objects.create(
            name="Spring picks",
            template=template,
            from_name="Bench Shop",
            from_email="news@bench.test",
            reply_to="help@bench.test",
        )
        campaign.segments.add(segment)
        t0 = time.perf_counter()
        audience = campaigns.check_ready(campaign)
        seconds = time.perf_counter() - t0
        # What launch() does before it materializes: scheduled, then sending.
        now = timezone.now()
        campaigns.transition(campaign, CampaignStatus.SCHEDULED, note="bench", send_at=now)
        campaigns.transition(campaign, CampaignStatus.SENDING, note="bench", launched_at=now)
        return campaign, audience, seconds

    # -- 2. materialize, and raw COPY of the same rows ---------------------------------------

    def phase_materialize(self, size: int, campaign_id: int) -> None:
        add = self.table.add
        say("\n2. materialize: campaigns.materialize(campaign, phase='all'), in a child process")
        with contextlib.suppress(Exception):
            self.sql("CHECKPOINT")
        result = self.run_child("materialize", "--campaign-id", str(campaign_id))
        rate = result["created"] / result["seconds"]
        add(size, "2", "materialize rate (rows/s)", f"{rate:,.0f} rows/s")
        add(
            size,
            "2",
            "  messages created / time",
            (f"{result['created']:,} in {result['seconds']:.2f} s ({result['chunks']} chunks)"),
        )
        add(size, "2", "peak RSS, materializing process", mb(result["rss_peak_mb"]))
        self.summary[size]["rss_materialize"] = result["rss_peak_mb"]

        say("  raw COPY of the same rows into CREATE TABLE … (LIKE mailer_message INCLUDING ALL)")
        copy = self.run_child(
            "copy", "--campaign-id", str(campaign_id), "--scratch-file", str(self.tmp / "copy")
        )
        ceiling = copy["plain_rows"] / copy["plain_seconds"]
        with_fk = copy["fk_rows"] / copy["fk_seconds"]
        add(size, "2", "raw COPY, same rows and indexes (rows/s)", f"{ceiling:,.0f} rows/s")
        add(size, "2", "  raw COPY with mailer_message's 4 FKs too", f"{with_fk:,.0f} rows/s")
        add(size, "2", "  COPY data", f"{copy['plain_rows']:,} rows, {copy['bytes'] / 1e6:.0f} MB")
        ratio = rate / ceiling
        add(size, "2", "materialize / raw COPY", f"{ratio:.0%}")
        add(size, "2", "  materialize / COPY with FKs", f"{rate / with_fk:.0%}")
        self.summary[size].update(materialize=rate, copy=ceiling, materialize_ratio=ratio)
        self.sql("ANALYZE mailer_message")

    # -- 3. sending -----------------------------------------------------------------------------

    def campaign_message_bytes(self, campaign_id: int) -> bytes:
        """One real message of the campaign, built exactly as a worker builds it."""
        from mailer import compose, rendering
        from mailer.models import Message

        message = (
            Message.objects.filter(campaign_id=campaign_id)
            .select_related("contact", "campaign", "variant")
            .order_by("id")
            .first()
        )
        compiled = rendering.compiled(
            rendering.find_template(message.template_slug, message.language)
        )
        email = compose.build_email(message, compiled, link_cache={})
        return email.message().as_bytes(linesep="\r\n")

    def sink_ceiling(self, size: int, data: bytes) -> float:
        count = self.args.ceiling_messages
        rounds = 3
        per_round = max(1, count // rounds)
        rates, client_cpu = [], 0.0
        client = smtplib.SMTP("127.0.0.1", self.sink.port, timeout=10)
        try:
            client.ehlo()
            for _ in range(min(200, count)):  # warm up both ends
                client.sendmail("news@bench.test", ["user@example.com"], data)
            self.sink.reset()
            before = self.sink.stats()
            for _ in range(rounds):
                cpu0, t0 = time.process_time(), time.perf_counter()
                for _ in range(per_round):
                    client.sendmail("news@bench.test", ["user@example.com"], data)
                rates.append(per_round / (time.perf_counter() - t0))
                client_cpu += time.process_time() - cpu0
            after = self.sink.stats()
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
        sent = per_round * rounds
        rate = statistics.median(rates)
        add = self.table.add
        add(size, "3", "message size (this campaign's, built by mailer)", f"{len(data):,} bytes")
        add(size, "3", "sink ceiling (1 connection), median of 3", f"{rate:,.0f} msg/s")
        add(size, "3", "  the 3 rounds", " / ".join(f"{r:,.0f}" for r in rates))
        add(size, "3", "  smtplib client CPU per message", f"{client_cpu / sent * 1e3:.3f} ms")
        add(
            size,
            "3",
            "  sink CPU per message (ceiling)",
            (f"{(after.cpu - before.cpu) / sent * 1e3:.3f} ms"),
        )
        return rate

    def snapshot(self):
        sessions = {w.process.pid for w in self.workers if w.process is not None}
        sink_pid = self.sink.process.pid if self.sink and self.sink.process else None
        return cpu_snapshot(sessions, sink_pid, DB_NAME)

    def pg_sessions(self) -> int:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
            )
            return int(cursor.fetchone()[0] or 0)

    def phase_send(self, size: int, campaign_id: int) -> None:
        from mailer import campaigns, dispatch
        from mailer.models import Campaign, Message, MessageStatus, Queue

        add = self.table.add
        queued = Message.objects.filter(campaign_id=campaign_id).count()
        target = min(queued, self.args.send_cap)
        capped = target < queued
        say(
            f"\n3. sending: sink ceiling, then 2 workers (-Q campaign -c 1) send "
            f"{target:,} of {queued:,} messages" + (" (capped: --send-cap)" if capped else "")
        )
        ceiling = self.sink_ceiling(size, self.campaign_message_bytes(campaign_id))
        self.flush_redis()
        # A starting worker looks for work at once: hold the campaign until the clock runs.
        running = Campaign.objects.get(pk=campaign_id).status
        Campaign.objects.filter(pk=campaign_id).update(status="paused")
        t0 = time.monotonic()
        self.workers = [
            QueueWorker(f"campaign{i}", self.env, self.tmp, QUEUE).launch() for i in (1, 2)
        ]
        for worker in self.workers:
            worker.wait_ready()
        say(f"  workers ready in {time.monotonic() - t0:.1f} s (logs in {self.tmp})")
        self.sink.reset()
        sessions = self.pg_sessions()
        before = self.snapshot()
        Campaign.objects.filter(pk=campaign_id).update(status=running)
        t0 = time.monotonic()
        dispatch.kick(Queue.CAMPAIGN)
        samples: list[tuple[float, int]] = [(0.0, 0)]
        last_progress = last_print = t0
        last_count = 0
        while True:
            now = time.monotonic()
            got = self.sink.stats().messages
            if got != last_count:
                samples.append((now - t0, got))
                last_progress, last_count = now, got
            if got >= target:
                break
            if now - last_print >= 10:
                last_print = now
                say(f"    {got:>9,} sent  {got / (now - t0):>7,.0f} msg/s so far")
            if now - last_progress > self.args.stall_seconds:
                raise RuntimeError(f"no progress for {self.args.stall_seconds} s at {got}")
            if any(w.process.poll() is not None for w in self.workers):
                logs = "\n".join(w.tail() for w in self.workers)
                raise RuntimeError("a worker died:\n" + logs)
            time.sleep(0.05)
        t_sink = time.monotonic() - t0
        if capped:
            campaigns.pause(Campaign.objects.get(pk=campaign_id), reason="bench: send cap")
        sent_rows = Message.objects.filter(campaign_id=campaign_id, status=MessageStatus.SENT)
        while sent_rows.count() < target:
            if time.monotonic() - t0 > t_sink + self.args.stall_seconds:
                raise RuntimeError("the sink has the messages but the rows are not 'sent'")
            time.sleep(0.1)
        t_sent = time.monotonic() - t0
        after = self.snapshot()
        cpu = cpu_delta(before, after)
        stats = self.sink.stats()
        memory = [process_tree_hwm(w.process.pid) for w in self.workers]
        self.stop_workers()
        # A capped run pauses at the cap; batches in flight still go out. Duplicates are
        # emails the sink got beyond the rows marked sent.
        received = self.sink.stats().messages
        recorded = Message.objects.filter(campaign_id=campaign_id, sent_at__isnull=False).count()

        rate = target / t_sent
        ratio = rate / ceiling
        add(size, "3", "sending, kick → rows 'sent' (msg/s)", f"{rate:,.0f} msg/s")
        add(size, "3", "  messages / time", f"{target:,} in {t_sent:.1f} s")
        add(size, "3", "ratio to the sink ceiling", f"{ratio:.0%}")
        add(size, "3", "  as seen by the sink", f"{target / t_sink:,.0f} msg/s")
        add(size, "3", "  steady state (10 % → 90 %)", f"{steady_rate(samples, target):,.0f} msg/s")
        first, last = decile_rates(samples, target)
        add(size, "3", "  first 10 % / last 10 %", f"{first:,.0f} / {last:,.0f} msg/s")
        add(
            size,
            "3",
            "  sink messages / rows sent (duplicates)",
            f"{received:,} / {recorded:,} ({received - recorded:+,})",
        )
        if capped:
            add(size, "3", "  sent past the cap (in-flight at pause)", f"{recorded - target:,}")
        add(size, "3", "  SMTP connections opened", f"{stats.connections:,}")
        time.sleep(1.1)  # PostgreSQL flushes session statistics about once a second
        add(size, "3", "  PostgreSQL sessions opened", f"{self.pg_sessions() - sessions:,}")
        groups = ("workers", "sink", "postgres", "redis", "bench")
        for group in groups:
            add(
                size, "3", f"CPU per message: {group}", f"{cpu.get(group, 0) / target * 1e3:.3f} ms"
            )
        accounted = sum(cpu.get(g, 0) for g in groups)
        others = cpu["machine"] - accounted
        add(size, "3", "CPU per message: everything else", f"{others / target * 1e3:.3f} ms")
        add(size, "3", "machine busy", f"{cpu['machine'] / cpu['wall']:.2f} of {NPROC} cores")
        if others > 0.1 * cpu["machine"]:
            self.warnings.append(
                f"{size:,}: other processes used {others / cpu['wall']:.2f} cores while "
                "sending: the machine was shared, read the figures as pessimistic"
            )
        if cpu["foreign_backends"]:
            self.warnings.append(
                f"{size:,}: PostgreSQL also served other databases while sending: its CPU "
                "figure includes their backends that exited"
            )
        peaks = []
        for worker, tree in zip(("1", "2"), memory, strict=True):
            peaks += [hwm for _, hwm in tree]
            add(
                size,
                "3",
                f"peak RSS, worker {worker} (main / pool child)",
                " / ".join(mb(hwm) for _, hwm in tree),
            )
        self.summary[size].update(
            send=rate, ceiling=ceiling, send_ratio=ratio, rss_workers=max(peaks, default=0.0)
        )

    # -- 3b. where a worker's time goes ----------------------------------------------------------

    def claim_and_send(self, size: int) -> tuple[int, int]:
        """One batch as a worker's drain takes it: claim under a fresh token, then send.

        Returns (messages claimed, emails sent); nothing claimed means nothing is due.
        """
        from mailer import delivery, outbox
        from mailer.models import Queue

        token = uuid.uuid4()
        batch = outbox.claim(Queue.CAMPAIGN, size, token)
        if not batch:
            return 0, 0
        return len(batch), delivery.send_batch(batch, Queue.CAMPAIGN, token=token).sent

    def phase_breakdown(self, size: int, campaign_id: int) -> None:
        """The worker's claim/send loop in this process, each step timed (no Celery)."""
        from django.core.mail.backends import smtp as django_smtp

        from mailer import compose, delivery, mime, outbox, rendering, transport
        from mailer.models import Campaign, Message, MessageStatus

        count = self.args.breakdown
        batch_size = 100
        say(f"\n3b. breakdown: outbox.claim + send_batch in this process, {count:,} messages")
        messages = Message.objects.filter(campaign_id=campaign_id)
        queued = messages.filter(status=MessageStatus.QUEUED).count()
        if queued < count + batch_size:  # everything was sent: queue some again
            again = list(
                messages.filter(status=MessageStatus.SENT)
                .order_by("id")
                .values_list("id", flat=True)[: count + batch_size - queued]
            )
            Message.objects.filter(pk__in=again).update(
                status=MessageStatus.QUEUED, sent_at=None, claim_token=None
            )
        Campaign.objects.filter(pk=campaign_id).update(status="sending")
        self.claim_and_send(batch_size)  # warm-up: compile, connect, record the links

        timers = Timers()
        timers.wrap(outbox, "claim", "claim (lock, mark sending, load)")
        timers.wrap(delivery, "suppressed_addresses", "suppression check")
        timers.wrap(outbox, "stopped_campaigns", "campaign state check")
        timers.wrap(compose.Templates, "for_message", "template lookup (per batch cache)")
        timers.wrap(rendering.Compiled, "render", "render (subject + html + text)")
        timers.wrap(compose, "unsubscribe_links", "unsubscribe links (signing)")
        timers.wrap(compose, "add_tracking", "add_tracking (click + open links)")
        timers.wrap(compose, "build_email", "build_email other")
        timers.wrap(mime, "build", "MIME bytes (mime.build)")
        for module in (mime, django_smtp):  # both may parse addresses for a message
            if hasattr(module, "sanitize_address"):
                timers.wrap(module, "sanitize_address", "address parsing (sanitize_address)")
        timers.wrap(transport.Sender, "send", "SMTP send (backend + smtplib + sink)")
        # One round trip per message, sent before the email is composed and read before
        # it goes out: the previous one sent, this one tried (if claim and campaign allow).
        timers.wrap(outbox.Note, "__init__", "claim note: send (ahead of composing)")
        timers.wrap(outbox.Note, "result", "claim note: wait for its answer")
        nested = {
            "build_email other": [
                "render (subject + html + text)",
                "unsubscribe links (signing)",
                "add_tracking (click + open links)",
            ],
            "SMTP send (backend + smtplib + sink)": [
                "MIME bytes (mime.build)",
                "address parsing (sanitize_address)",
            ],
        }
        sink_before = self.sink.stats()
        sent = 0
        try:
            cpu0, t0 = time.process_time(), time.perf_counter()
            while sent < count:
                claimed, batch_sent = self.claim_and_send(batch_size)
                if not claimed:
                    break
                sent += batch_sent
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        finally:
            timers.restore()
        sink_cpu = self.sink.stats().cpu - sink_before.cpu
        Campaign.objects.filter(pk=campaign_id).update(status="paused")
        exclusive, exclusive_cpu = dict(timers.ms), dict(timers.cpu_ms)
        for outer, inners in nested.items():
            for inner in inners:
                exclusive[outer] = exclusive.get(outer, 0.0) - exclusive.get(inner, 0.0)
                exclusive_cpu[outer] = exclusive_cpu.get(outer, 0.0) - exclusive_cpu.get(inner, 0.0)
        add = self.table.add
        add(size, "3b", "one process, no Celery", f"{sent / wall:,.0f} msg/s ({sent:,} messages)")
        add(size, "3b", "this process's CPU per message", f"{cpu / sent * 1e3:.3f} ms")
        add(size, "3b", "sink CPU per message", f"{sink_cpu / sent * 1e3:.3f} ms")
        add(size, "3b", "  step (exclusive): CPU µs / wall µs / share", "per message")
        steps = [
            "claim (lock, mark sending, load)",
            "suppression check",
            "campaign state check",
            "template lookup (per batch cache)",
            "render (subject + html + text)",
            "unsubscribe links (signing)",
            "add_tracking (click + open links)",
            "build_email other",
            "MIME bytes (mime.build)",
            "address parsing (sanitize_address)",
            "SMTP send (backend + smtplib + sink)",
            "claim note: send (ahead of composing)",
            "claim note: wait for its answer",
        ]
        total_ms, total_cpu = wall * 1e3, cpu * 1e3
        rows = [(s, exclusive.get(s, 0.0), exclusive_cpu.get(s, 0.0)) for s in steps]
        rows.append(
            (
                "other (the loop, send_batch's own work)",
                total_ms - sum(exclusive.values()),
                total_cpu - sum(exclusive_cpu.values()),
            )
        )
        for name, ms_total, cpu_ms in rows:
            add(
                size,
                "3b",
                f"  {name}",
                f"{cpu_ms / sent * 1e3:6.0f} / {ms_total / sent * 1e3:6.0f} / "
                f"{cpu_ms / total_cpu:4.0%}",
            )

    # -- 4. the report ----------------------------------------------------------------------

    def fake_outcomes(self, campaign_id: int) -> dict[str, int]:
        """As if the campaign were sent and two days went by: Event rows in bulk SQL.

        From two hashes of the message id: 1 % hard and 0.5 % soft bounces, the rest
        delivered; of those 30 % open (40 % of them twice), 5 % click (30 % twice, another
        link), 5 % of deliveries get a scanner's automated open, 0.3 % unsubscribe and
        0.05 % complain. Events spread over 48 hours from the launch.
        """
        from mailer.models import Campaign

        campaign = Campaign.objects.get(pk=campaign_id)
        base = campaign.launched_at
        # The links the workers recorded while sending (the template's six).
        links = [int(pk) for (pk,) in self.query("SELECT id FROM mailer_link ORDER BY id")]
        link_array = f"ARRAY[{','.join(map(str, links)) or 'NULL'}]::bigint[]"
        counts: dict[str, int] = {}
        params = {"c": campaign_id, "base": base}
        # The messages the workers did not send (a capped run) are sent too.
        sent_at = "%(base)s + (id %% 3600) * interval '1 second'"
        counts["sent (added)"] = self.sql(
            f"UPDATE mailer_message SET status = 'sent', attempts = 1, sent_at = {sent_at} "  # noqa: S608
            "WHERE campaign_id = %(c)s AND status IN ('queued', 'sending')",
            params,
        )
        hashed = (
            "SELECT id, to_email, (id * 2654435761) %% 10000 AS h1, "
            "(id * 2246822519 + 3266489917) %% 10000 AS h2 "
            "FROM mailer_message WHERE campaign_id = %(c)s"
        )
        n = max(1, len(links))
        opened_at = "(h2 * 7919) %% 172800"  # spread over 48 hours
        # (event type, seconds after launch, which messages, bounce, link, automated)
        events = [
            ("delivered", "60 + h2 %% 600", "h1 >= 150", "''", "NULL", False),
            ("bounced", "60 + h2 %% 600", "h1 < 150", BOUNCE_KIND, "NULL", False),
            ("opened", f"700 + {opened_at}", "h1 >= 150 AND h2 < 3000", "''", "NULL", False),
            ("opened", f"4000 + {opened_at}", "h1 >= 150 AND h2 < 1200", "''", "NULL", False),
            ("opened", "65 + h2 %% 600", "h1 >= 150 AND h1 %% 20 = 0", "''", "NULL", True),
            ("clicked", f"730 + {opened_at}", "h1 >= 150 AND h2 < 500", "''", "L0", False),
            ("clicked", f"760 + {opened_at}", "h1 >= 150 AND h2 < 150", "''", "L1", False),
            ("unsubscribed", f"900 + {opened_at}", "h1 >= 150 AND h2 BETWEEN 9960 AND 9989",
             "''", "NULL", False),
            ("complained", f"900 + {opened_at}", "h1 >= 150 AND h2 >= 9995", "''", "NULL", False),
        ]  # fmt: skip
        link_sql = {
            "NULL": "NULL",
            "L0": f"({link_array})[(1 + h2 %% {n})::int]",
            "L1": f"({link_array})[(1 + (h2 + 1) %% {n})::int]",
        }
        for event_type, seconds, condition, bounce, link, automated in events:
            flag = "true, 'scanner user agent'" if automated else "false, ''"
            # Only the fixed fragments above and integers are formatted in.
            insert = (
                f"{INSERT_EVENT} SELECT id, '{event_type}', NULL, to_email, "  # noqa: S608
                f"%(base)s + ({seconds}) * interval '1 second', '', {bounce}, {link_sql[link]}, "
                f"%(c)s, {flag}, '{{}}' FROM ({hashed}) m WHERE {condition}"
            )
            key = event_type + (" (automated)" if automated else "")
            counts[key] = counts.get(key, 0) + self.sql(insert, params)
        update = (
            "UPDATE mailer_message m SET status = CASE "  # noqa: S608
            "WHEN h.h1 < 150 THEN 'bounced' WHEN h.h2 >= 9995 THEN 'complained' "
            "WHEN h.h2 < 500 THEN 'clicked' WHEN h.h2 < 3000 THEN 'opened' "
            f"ELSE 'delivered' END FROM ({hashed}) h WHERE m.id = h.id"
        )
        self.sql(update, params)
        # What tracking keeps on each message as the events come: the first time of each.
        first = (
            "UPDATE mailer_message m SET delivered_at = e.delivered, opened_at = e.opened, "
            "clicked_at = e.clicked, bounced_at = e.bounced, complained_at = e.complained "
            "FROM (SELECT message_id, "
            "min(timestamp) FILTER (WHERE event_type = 'delivered') AS delivered, "
            "min(timestamp) FILTER (WHERE event_type = 'opened' AND NOT automated) AS opened, "
            "min(timestamp) FILTER (WHERE event_type = 'clicked' AND NOT automated) AS clicked, "
            "min(timestamp) FILTER (WHERE event_type = 'bounced') AS bounced, "
            "min(timestamp) FILTER (WHERE event_type = 'complained') AS complained "
            "FROM mailer_event WHERE campaign_id = %(c)s GROUP BY message_id) e "
            "WHERE m.id = e.message_id"
        )
        self.sql(first, params)
        Campaign.objects.filter(pk=campaign_id).update(status="sent", finished_at=base)
        return counts

    def query(self, statement: str, params=None) -> list[tuple]:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(statement, () if params is None else params)
            return cursor.fetchall()

    def phase_report(self, size: int, campaign_id: int) -> None:
        from django.contrib.auth import get_user_model
        from django.db import connection
        from django.test import Client
        from django.test.utils import CaptureQueriesContext
        from django.urls import reverse

        from mailer import reports
        from mailer.models import Campaign, Event

        add = self.table.add
        say("\n4. report: outcomes as Event rows in bulk SQL, then report() and the admin page")
        t0 = time.monotonic()
        counts = self.fake_outcomes(campaign_id)
        say(
            f"  events inserted in {time.monotonic() - t0:.1f} s: "
            + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        )
        t0 = time.monotonic()
        self.sql("VACUUM ANALYZE mailer_message")
        self.sql("VACUUM ANALYZE mailer_event")
        say(f"  VACUUM ANALYZE of messages and events: {time.monotonic() - t0:.1f} s")
        campaign = Campaign.objects.get(pk=campaign_id)
        events = Event.objects.filter(campaign=campaign).count()
        add(
            size,
            "4",
            "messages / events of the campaign",
            (f"{campaign.recipients:,} / {events:,}"),
        )

        figures = reports.report(campaign)  # warm-up
        times = []
        for _ in range(self.args.repeat):
            t0 = time.perf_counter()
            figures = reports.report(campaign)
            times.append(time.perf_counter() - t0)
        with CaptureQueriesContext(connection) as report_queries:
            reports.report(campaign)
        rates = figures["rates"]
        add(
            size,
            "4",
            "report(): figures",
            (
                f"sent {figures['sent']:,}, opened {rates['opened']}%, "
                f"clicked {rates['clicked']}%, bounced {rates['bounced']}%"
            ),
        )
        # The report reads first-event times off the messages; check them against the events.
        ((opened, clicked),) = self.query(
            "SELECT count(DISTINCT message_id) FILTER (WHERE event_type = 'opened'), "
            "count(DISTINCT message_id) FILTER (WHERE event_type = 'clicked') "
            "FROM mailer_event WHERE campaign_id = %s AND NOT automated",
            [campaign_id],
        )
        same = (figures["opened"], figures["clicked"]) == (opened, clicked)
        add(
            size,
            "4",
            "  unique opens/clicks = COUNT(DISTINCT) over events",
            f"{'yes' if same else 'NO'} ({opened:,} / {clicked:,})",
        )
        add(size, "4", f"reports.report(), median of {len(times)}", ms(statistics.median(times)))
        add(size, "4", "  report() min / max", f"{ms(min(times))} / {ms(max(times))}")
        add(size, "4", "  SQL queries", f"{len(report_queries.captured_queries)}")
        slowest = sorted(
            report_queries.captured_queries, key=lambda q: float(q["time"]), reverse=True
        )
        for query in slowest[:3]:
            add(size, "4", f"  query: {describe(query['sql'])}", ms(float(query["time"])))

        user_model = get_user_model()
        admin, _ = user_model.objects.get_or_create(
            username="bench-admin",
            defaults={"is_staff": True, "is_superuser": True, "email": "admin@bench.test"},
        )
        client = Client()
        client.force_login(admin)
        url = reverse("admin:mailer_campaign_change", args=[campaign.pk])
        response = client.get(url)
        if response.status_code != 200:
            raise RuntimeError(f"GET {url} → {response.status_code}")
        page_times = []
        for _ in range(self.args.repeat):
            t0 = time.perf_counter()
            response = client.get(url)
            page_times.append(time.perf_counter() - t0)
        with CaptureQueriesContext(connection) as page_queries:
            client.get(url)
        page = statistics.median(page_times)
        add(size, "4", f"admin change page GET, median of {len(page_times)}", ms(page))
        add(size, "4", "  page min / max", f"{ms(min(page_times))} / {ms(max(page_times))}")
        add(
            size,
            "4",
            "  SQL queries / page size",
            (f"{len(page_queries.captured_queries)} / {len(response.content) / 1024:.0f} KB"),
        )
        self.summary[size].update(report=statistics.median(times), page=page)
        if page >= TARGET_PAGE_S or self.args.explain:
            self.explain(slowest[0]["sql"])

    def explain(self, sql: str) -> None:
        say("\n  EXPLAIN (ANALYZE, BUFFERS) of the slowest query of report():")
        say("    " + sql[:600] + (" …" if len(sql) > 600 else ""))
        for (line,) in self.query("EXPLAIN (ANALYZE, BUFFERS) " + sql.replace("%", "%%")):
            say("    | " + line)

    # -- output -------------------------------------------------------------------------------

    def print_summary(self) -> None:
        sizes = self.args.sizes
        for warning in self.warnings:
            say(f"WARNING: {warning}")
        say(
            f"machine: {NPROC} CPUs, load avg {os.getloadavg()[0]:.2f} now; "
            f"PostgreSQL {DB_NAME}, Redis db {REDIS_DB}"
        )

        def verdict(ok: bool) -> str:
            return "MET" if ok else "MISSED"

        for size in sizes:
            s = self.summary.get(size, {})
            if "materialize_ratio" in s:
                say(
                    f"[{size_label(size)}] materialize {s['materialize']:,.0f} rows/s = "
                    f"{s['materialize_ratio']:.0%} of raw COPY {s['copy']:,.0f} rows/s "
                    f"(target >= {TARGET_MATERIALIZE:.0%}): "
                    f"{verdict(s['materialize_ratio'] >= TARGET_MATERIALIZE)}"
                )
            peaks = {k: v for k, v in s.items() if k.startswith("rss_")}
            if peaks:
                top = max(peaks.values())
                parts = ", ".join(f"{k[4:]} {v:,.0f} MB" for k, v in peaks.items())
                say(
                    f"[{size_label(size)}] peak RSS {parts} (target < {TARGET_RSS_MB:.0f} MB): "
                    f"{verdict(top < TARGET_RSS_MB)}"
                )
            if "send_ratio" in s:
                say(
                    f"[{size_label(size)}] sending {s['send']:,.0f} msg/s = {s['send_ratio']:.0%} "
                    f"of sink ceiling {s['ceiling']:,.0f} msg/s (target >= {TARGET_SEND:.0%}): "
                    f"{verdict(s['send_ratio'] >= TARGET_SEND)}"
                )
            if "page" in s:
                say(
                    f"[{size_label(size)}] report page {ms(s['page'])}, report() "
                    f"{ms(s['report'])} (target < {TARGET_PAGE_S:g} s): "
                    f"{verdict(s['page'] < TARGET_PAGE_S)}"
                )
        if len(sizes) > 1:
            small, large = self.summary.get(sizes[0], {}), self.summary.get(sizes[-1], {})
            growth = {
                key[4:]: large[key] / small[key] - 1
                for key in small
                if key.startswith("rss_") and key in large and small[key]
            }
            if growth:
                parts = ", ".join(f"{k} {v:+.0%}" for k, v in growth.items())
                flat = all(v <= FLAT_GROWTH for v in growth.values())
                say(
                    f"peak RSS from {size_label(sizes[0])} to {size_label(sizes[-1])}: {parts} "
                    f"(target: flat, within +{FLAT_GROWTH:.0%}): {verdict(flat)}"
                )
        else:
            say("peak RSS flat across sizes: not checked (run with --million to compare)")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms"


def describe(sql: str) -> str:
    """A short name for a captured query: its table and what it computes."""
    text = " ".join(sql.split())
    table = ""
    if " FROM " in text:
        table = text.split(" FROM ", 1)[1].split()[0].strip('"')
    if "COUNT(DISTINCT" in text and "FILTER" in text:
        what = "event aggregates (COUNT DISTINCT … FILTER)"
    elif "date_trunc" in text.lower():
        what = "timeline per hour"
    elif "GROUP BY" in text and "mailer_link" in text:
        what = "top links"
    elif "GROUP BY" in text:
        what = "GROUP BY"
    else:
        what = text[:40]
    return f"{table} {what}"[:60]


def decile_rates(samples: list[tuple[float, int]], count: int) -> tuple[float, float]:
    """Send rate over the first and the last 10 % of the messages."""

    def at(fraction: float) -> tuple[float, int] | None:
        return next((s for s in samples if s[1] >= count * fraction), None)

    start, ten, ninety, end = at(0.0), at(0.1), at(0.9), at(1.0)
    if None in (ten, ninety, end) or ten[0] <= start[0] or end[0] <= ninety[0]:
        return float("nan"), float("nan")
    return ten[1] / (ten[0] - start[0]), (end[1] - ninety[1]) / (end[0] - ninety[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="mailer campaign benchmark")
    parser.add_argument("--contacts", type=int, default=100_000, help="contacts per run")
    parser.add_argument("--million", action="store_true", help="also run 1,000,000 contacts")
    parser.add_argument(
        "--send-cap", type=int, default=100_000, help="send at most this many per size"
    )
    parser.add_argument("--ceiling-messages", type=int, default=6000)
    parser.add_argument("--repeat", type=int, default=5, help="timed report/page runs")
    parser.add_argument(
        "--breakdown", type=int, default=2000, help="messages for phase 3b (0: skip it)"
    )
    parser.add_argument("--explain", action="store_true", help="always EXPLAIN the slowest")
    parser.add_argument("--stall-seconds", type=float, default=60.0)
    parser.add_argument("--lock-timeout", type=float, default=900.0)
    # Internal: run one phase in a child process.
    parser.add_argument(
        "--child", choices=("import", "materialize", "copy"), help=argparse.SUPPRESS
    )
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    parser.add_argument("--campaign-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scratch-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [args.contacts]
    if args.million and 1_000_000 not in args.sizes:
        args.sizes.append(1_000_000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    signal.signal(signal.SIGTERM, on_sigterm)
    bench = CampaignBench(args)
    try:
        bench.run()
    except (KeyboardInterrupt, Interrupted):
        say("\ninterrupted: stopping workers, the sink and child processes")
        return 130
    finally:
        bench.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
