"""Latency benchmark: campaign sending to a relay 10 ms away, an ESP 100 ms away, and the rate.

Run it through ``make bench-latency`` (or ``bash tests/services.sh run -- .venv/bin/python
bench/latency.py``), which exports DATABASE_URL and CELERY_BROKER_URL. It drops and
re-creates its own database (``mailer_bench_latency``) and uses Redis DB 7; the test
database, the other benchmarks' databases and Redis DBs 0, 5 and 6 are left alone. See
bench/README.md for how to read it.

Each run sends a campaign (materialized from the contacts imported at the start) with two
``celery worker -Q campaign -c 1`` processes, whose pool size per queue comes from
``MAILER_CAMPAIGN_CONNECTIONS`` (the ``MAILER["CONNECTIONS"]`` contract; code that has no
pool ignores it):

smtp   the sink answering every reply 10 ms late (``--delay-ms``): ``--messages`` with 40
       connections, ``--single-messages`` with 1, and ``--zero-messages`` with 40 to a sink
       that answers at once, for CPU per message without latency
esp    the fake Postmark API (bench/fake_esp.py) answering in 100 ms (``--esp-latency-ms``):
       ``--esp-messages`` with 40 concurrent calls, ``--esp-single-messages`` with 1, both
       through Postmark's batch endpoint; ``--esp-unbatched-messages`` with 40 concurrent
       calls of one email each (``MAILER_ESP_BATCH_SIZE=1``), for comparison
rate   ``MAILER_RATE_LIMIT_CAMPAIGN=500/s`` with 40 connections for ``--rate-seconds``
       (after ``--rate-warmup``): the measured rate and its distribution per second
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from campaign import CAMPAIGN_HTML, POSTAL_ADDRESS, SITE_URL, decile_rates, write_csv  # noqa: E402
from common import (  # noqa: E402
    NPROC,
    Interrupted,
    QueueWorker,
    bench_env,
    cpu_delta,
    cpu_snapshot,
    lock_is_held,
    machine_lines,
    migrate,
    on_sigterm,
    recreate_database,
    require_services,
    say,
    setup_django,
    steady_rate,
    take_lock,
    with_path,
)
from fake_esp import FakeEsp  # noqa: E402
from sink import Sink  # noqa: E402

DB_NAME = "mailer_bench_latency"
REDIS_DB = 7
LOCK_KEY = "mailer-bench-latency"
QUEUE = "campaign"
CONSENTED = 0.85  # write_csv grants consent to ~90 % of the rows; keep a margin

TARGET_SMTP = 1000.0  # msg/s with the pool, the relay 10 ms away
TARGET_ESP = 1000.0  # msg/s with concurrent calls, the ESP 100 ms away
TARGET_CPU = 0.10  # workers' CPU per message at 10 ms within +10 % of the figure at 0 ms
TARGET_RATE = 0.05  # measured rate within ±5 % of the limit

GROUPS = ("workers", "sink", "postgres", "redis", "bench")


@dataclass
class Run:
    """What one send run measured."""

    label: str
    connections: int
    target: int = 0  # messages to send (0: a timed run)
    sent: int = 0  # messages the server accepted by the end of the clock
    seconds: float = 0.0  # kick → every target row 'sent' (or the timed window)
    server_seconds: float = 0.0  # kick → the server had ``target``
    steady: float = float("nan")
    first_last: tuple[float, float] = (float("nan"), float("nan"))
    peak: int = 0  # connections (SMTP) or requests in flight (ESP) at once at the server
    opened: int = 0  # connections the server saw opened
    duplicates: int = 0
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per message, per group
    busy: float = 0.0  # cores in use on average
    per_second: list[int] = field(default_factory=list)  # timed runs

    @property
    def rate(self) -> float:
        return self.target / self.seconds if self.target and self.seconds else float("nan")

    @property
    def server_rate(self) -> float:
        return self.sent / self.server_seconds if self.server_seconds else float("nan")


class LatencyBench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        base_db, broker = require_services("latency.py")
        self.admin_url = base_db
        self.db_url = with_path(base_db, f"/{DB_NAME}")
        self.redis_url = with_path(broker, f"/{REDIS_DB}")
        self.tmp = Path(tempfile.mkdtemp(prefix="mailer-bench-latency-"))
        self.lock = None
        self.sinks: dict[float, Sink] = {}
        self.esp: FakeEsp | None = None
        self.workers: list[QueueWorker] = []
        self.env: dict[str, str] = {}
        self.template = self.segment = None
        self.runs: dict[str, Run] = {}
        self.warnings: list[str] = []
        self.shared: dict[str, float] = {}  # run → cores other processes used meanwhile
        self.foreign: list[str] = []  # runs while PostgreSQL served other databases too

    # -- life -------------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        say("mailer latency benchmark")
        for line in machine_lines():
            say(line)
        say(
            f"  phases    {', '.join(args.phases)}; 2 workers (-Q {QUEUE} -c 1); pool "
            f"{args.connections} (MAILER_CAMPAIGN_CONNECTIONS)"
        )
        self.lock = take_lock(self.admin_url, LOCK_KEY, args.lock_timeout)
        for other in ("mailer-bench", "mailer-bench-campaign"):
            if lock_is_held(self.lock, other):
                self.warnings.append(f"{other} was running on this server: the machine was shared")
        self.env = bench_env(
            self.db_url,
            self.redis_url,
            MAILER_POSTAL_ADDRESS=POSTAL_ADDRESS,
            SITE_URL=SITE_URL,
        )
        self.setup()
        if "smtp" in args.phases:
            self.phase_smtp()
        if "esp" in args.phases:
            self.phase_esp()
        if "rate" in args.phases:
            self.phase_rate()
        self.print_summary()

    def cleanup(self) -> None:
        self.stop_workers()
        for sink in self.sinks.values():
            sink.stop()
        self.sinks = {}
        if self.esp is not None:
            self.esp.stop()
            self.esp = None
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

    def sink(self, delay_ms: float) -> Sink:
        if delay_ms not in self.sinks:
            self.sinks[delay_ms] = Sink(delay_ms=delay_ms).start()
        return self.sinks[delay_ms]

    # -- the scene ----------------------------------------------------------------------------

    def contacts_needed(self) -> int:
        args = self.args
        sends = [args.messages, args.zero_messages, args.single_messages]
        if "esp" in args.phases:
            sends += [args.esp_messages, args.esp_single_messages, args.esp_unbatched_messages]
        if "rate" in args.phases:
            sends.append(int(args.rate * (args.rate_warmup + args.rate_seconds + 5)))
        return math.ceil(max(sends) / CONSENTED)

    def setup(self) -> None:
        recreate_database(self.admin_url, DB_NAME)
        say(f"\nsetup: database {DB_NAME!r} migrated in {migrate(self.env):.1f} s, Redis db 7")
        setup_django(self.env)
        self.scene()

    def scene(self) -> None:
        """Contacts enough for every run, a segment of the consenting, a marketing template."""
        from django.db import connection

        from mailer import contacts
        from mailer.models import Segment, SegmentRule, Template

        self.flush_redis()
        count = self.contacts_needed()
        path = self.tmp / "contacts.csv"
        write_csv(path, count)
        t0 = time.monotonic()
        with open(path, "rb") as stream:
            report = contacts.import_csv(stream, source="bench latency")
        path.unlink()
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE mailer_contact")
        say(f"  {report.rows:,} contacts imported in {time.monotonic() - t0:.1f} s")
        self.segment = Segment.objects.create(name="Consented")
        SegmentRule.objects.create(
            segment=self.segment,
            field=SegmentRule.Field.CONSENT,
            operator=SegmentRule.Operator.EQUALS,
            value="granted",
        )
        self.template = Template.objects.create(
            slug="spring-picks",
            purpose=Template.Purpose.MARKETING,
            subject="{{ contact.first_name or 'Hello' }}, our spring picks",
            html=CAMPAIGN_HTML,
        )

    def new_campaign(self, name: str):
        """A campaign to everyone consenting, materialized and held (paused) for the clock."""
        from django.utils import timezone

        from mailer import campaigns
        from mailer.models import Campaign, CampaignStatus

        campaign = Campaign.objects.create(
            name=name,
            template=self.template,
            from_name="Bench Shop",
            from_email="news@bench.test",
            reply_to="help@bench.test",
        )
        campaign.segments.add(self.segment)
        campaigns.check_ready(campaign)
        now = timezone.now()
        campaigns.transition(campaign, CampaignStatus.SCHEDULED, note="bench", send_at=now)
        campaigns.transition(campaign, CampaignStatus.SENDING, note="bench", launched_at=now)
        # A starting worker looks for work at once: hold the campaign until the clock runs.
        Campaign.objects.filter(pk=campaign.pk).update(status=CampaignStatus.PAUSED)
        created = campaigns.materialize(campaign, phase="all")
        return campaign, created

    # -- one run ------------------------------------------------------------------------------

    def send(
        self,
        key: str,
        label: str,
        server: Sink | FakeEsp,
        extra_env: dict[str, str],
        *,
        connections: int,
        messages: int = 0,
        seconds: float = 0.0,
    ) -> Run:
        """Two workers send one new campaign: ``messages`` of it, or for ``seconds``."""
        from mailer import campaigns, dispatch
        from mailer.models import Campaign, CampaignStatus, Message, MessageStatus, Queue

        say(f"\n  {label}")
        campaign, created = self.new_campaign(key)
        if messages > created:
            raise SystemExit(f"{key}: {messages:,} messages asked, the audience is {created:,}")
        env = {**self.env, **extra_env, "MAILER_CAMPAIGN_CONNECTIONS": str(connections)}
        self.flush_redis()
        t0 = time.monotonic()
        self.workers = [QueueWorker(f"{key}{i}", env, self.tmp, QUEUE).launch() for i in (1, 2)]
        for worker in self.workers:
            worker.wait_ready()
        say(f"    workers ready in {time.monotonic() - t0:.1f} s (logs in {self.tmp})")
        server.reset()
        sessions = {w.process.pid for w in self.workers}
        before = cpu_snapshot(sessions, server.process.pid, DB_NAME)
        Campaign.objects.filter(pk=campaign.pk).update(status=CampaignStatus.SENDING)
        t0 = time.monotonic()
        dispatch.kick(Queue.CAMPAIGN)
        run = Run(label=key, connections=connections, target=messages)
        samples = self.watch(server, t0, messages=messages, seconds=seconds)
        t_server = samples[-1][0]
        Campaign.objects.filter(pk=campaign.pk).update(status=CampaignStatus.PAUSED)
        if messages:
            sent_rows = Message.objects.filter(campaign=campaign, status=MessageStatus.SENT)
            while sent_rows.count() < messages:
                if time.monotonic() - t0 > t_server + self.args.stall_seconds:
                    raise RuntimeError("the server has the messages but the rows are not 'sent'")
                time.sleep(0.05)
            run.seconds = time.monotonic() - t0
            run.server_seconds = t_server
            run.sent = samples[-1][1]
            run.steady = steady_rate(samples, messages)
            run.first_last = decile_rates(samples, messages)
        after = cpu_snapshot(sessions, server.process.pid, DB_NAME)
        stats = server.stats()
        self.stop_workers()
        received = server.stats().messages
        recorded = Message.objects.filter(campaign=campaign, sent_at__isnull=False).count()
        run.duplicates = received - recorded
        if seconds:
            run.per_second = [b[1] - a[1] for a, b in zip(samples, samples[1:], strict=False)]
            run.sent, run.seconds = samples[-1][1], samples[-1][0]
        if isinstance(server, Sink):
            run.peak, run.opened = max(0, stats.peak - 1), stats.connections  # less XSTATS's
        else:
            run.peak, run.opened = stats.peak_in_flight, stats.connections
        cpu = cpu_delta(before, after)
        counted = max(1, stats.messages)
        run.cpu_ms = {g: cpu.get(g, 0.0) / counted * 1e3 for g in GROUPS}
        others = cpu["machine"] - sum(cpu.get(g, 0.0) for g in GROUPS)
        run.cpu_ms["everything else"] = others / counted * 1e3
        run.busy = cpu["machine"] / cpu["wall"]
        if others > 0.1 * cpu["machine"]:
            self.shared[key] = others / cpu["wall"]
        if cpu["foreign_backends"] > 1:  # one is this script's lock, on database "postgres"
            self.foreign.append(key)
        campaigns.cancel(Campaign.objects.get(pk=campaign.pk))  # its rest never goes out
        self.report(run, server)
        self.runs[key] = run
        return run

    def watch(self, server, t0: float, *, messages: int, seconds: float) -> list[tuple[float, int]]:
        """(seconds since the kick, messages the server has) until the target or the time.

        A timed run reads the server at each whole second, so consecutive samples give the
        messages of each second."""
        samples: list[tuple[float, int]] = [(0.0, 0)]
        last_progress = last_print = t0
        tick = 1
        while True:
            if seconds:
                time.sleep(max(0.0, t0 + tick - time.monotonic()))
                tick += 1
            else:
                time.sleep(0.05)
            now = time.monotonic()
            got = server.stats().messages
            if got != samples[-1][1]:
                last_progress = now
            if seconds or got != samples[-1][1]:
                samples.append((now - t0, got))
            if (messages and got >= messages) or (seconds and now - t0 >= seconds):
                return samples
            if now - last_print >= 10:
                last_print = now
                say(f"    {got:>9,} sent  {got / (now - t0):>8,.1f} msg/s so far")
            if now - last_progress > self.args.stall_seconds:
                raise RuntimeError(f"no progress for {self.args.stall_seconds} s at {got:,}")
            if any(w.process.poll() is not None for w in self.workers):
                raise RuntimeError("a worker died:\n" + "\n".join(w.tail() for w in self.workers))

    def report(self, run: Run, server) -> None:
        kind = "connections" if isinstance(server, Sink) else "requests in flight"
        if run.target:
            first, last = run.first_last
            say(
                f"    {run.target:,} messages in {run.seconds:.1f} s: {run.rate:,.1f} msg/s "
                f"kick → rows 'sent'; {run.server_rate:,.1f} msg/s as seen by the server; "
                f"steady {run.steady:,.1f}; first/last 10 % {first:,.1f}/{last:,.1f}"
            )
        else:
            say(f"    {run.sent:,} messages in {run.seconds:.1f} s")
        say(
            f"    {kind} at once at the server: {run.peak} (asked {run.connections} × 2 "
            f"workers); connections opened {run.opened:,}; duplicates {run.duplicates:+,}"
        )
        cpu = ", ".join(f"{g} {v:.3f}" for g, v in run.cpu_ms.items())
        say(f"    CPU per message (ms): {cpu}; machine busy {run.busy:.2f} of {NPROC} cores")

    # -- phases -------------------------------------------------------------------------------

    def phase_smtp(self) -> None:
        args = self.args
        delay, pool = args.delay_ms, args.connections
        say(f"\nsmtp: the sink answers every reply {delay:g} ms late")
        sink = self.sink(delay)
        port = {"SMTP_PORT": str(sink.port)}
        self.send(
            "smtp_pool",
            f"{pool} connections a worker, {args.messages:,} messages",
            sink,
            port,
            connections=pool,
            messages=args.messages,
        )
        self.send(
            "smtp_single",
            f"1 connection a worker, {args.single_messages:,} messages",
            sink,
            port,
            connections=1,
            messages=args.single_messages,
        )
        if args.zero_messages:
            zero = self.sink(0.0)
            self.send(
                "smtp_zero",
                f"no latency: {pool} connections a worker, {args.zero_messages:,} messages",
                zero,
                {"SMTP_PORT": str(zero.port)},
                connections=pool,
                messages=args.zero_messages,
            )

    def esp_env(self) -> dict[str, str]:
        return {
            "SMTP_HOST": "",  # SMTP_HOST wins over MAILER_ESP in project/settings.py
            "MAILER_ESP": "postmark",
            "ANYMAIL_POSTMARK_SERVER_TOKEN": "bench",
            "ANYMAIL_POSTMARK_API_URL": self.esp.url,
        }

    def phase_esp(self) -> None:
        args = self.args
        say(f"\nesp: the fake Postmark API answers in {args.esp_latency_ms:g} ms")
        self.esp = FakeEsp(latency_ms=args.esp_latency_ms).start()
        self.send(
            "esp_pool",
            f"{args.connections} concurrent calls a worker, {args.esp_messages:,} messages",
            self.esp,
            self.esp_env(),
            connections=args.connections,
            messages=args.esp_messages,
        )
        self.send(
            "esp_single",
            f"1 call at a time a worker, {args.esp_single_messages:,} messages",
            self.esp,
            self.esp_env(),
            connections=1,
            messages=args.esp_single_messages,
        )
        if args.esp_unbatched_messages:
            self.send(
                "esp_unbatched",
                f"{args.connections} concurrent calls a worker, one email a call "
                f"(MAILER_ESP_BATCH_SIZE=1), {args.esp_unbatched_messages:,} messages",
                self.esp,
                {**self.esp_env(), "MAILER_ESP_BATCH_SIZE": "1"},
                connections=args.connections,
                messages=args.esp_unbatched_messages,
            )

    def phase_rate(self) -> None:
        args = self.args
        say(
            f"\nrate: MAILER_RATE_LIMIT_CAMPAIGN={args.rate:g}/s, {args.connections} "
            f"connections a worker, the sink {args.rate_delay_ms:g} ms late, "
            f"{args.rate_warmup:g} + {args.rate_seconds:g} s"
        )
        sink = self.sink(args.rate_delay_ms)
        run = self.send(
            "rate",
            f"{args.rate:g}/s for {args.rate_warmup + args.rate_seconds:g} s",
            sink,
            {"SMTP_PORT": str(sink.port), "MAILER_RATE_LIMIT_CAMPAIGN": f"{args.rate:g}/s"},
            connections=args.connections,
            seconds=args.rate_warmup + args.rate_seconds,
        )
        warm = int(args.rate_warmup)
        window = run.per_second[warm:]
        if not window:
            return
        measured = sum(window) / len(window)
        ordered = sorted(window)
        say(
            f"    over seconds {warm}–{warm + len(window)}: {measured:,.1f} msg/s "
            f"({measured / args.rate - 1:+.1%} of {args.rate:g}/s)"
        )
        say(
            f"    per second: min {ordered[0]}, p5 {ordered[len(ordered) // 20]}, median "
            f"{statistics.median(ordered):g}, p95 {ordered[len(ordered) * 19 // 20]}, max "
            f"{ordered[-1]}, stdev {statistics.pstdev(window):.1f}"
        )
        say(f"    warm-up seconds: {', '.join(str(n) for n in run.per_second[:warm]) or '-'}")
        for start in range(0, len(window), 15):
            row = " ".join(f"{n:>4}" for n in window[start : start + 15])
            say(f"    s{warm + start:<3} {row}")
        run.steady = measured

    # -- summary ------------------------------------------------------------------------------

    def print_summary(self) -> None:
        args, runs = self.args, self.runs
        say("\n" + "=" * 78)
        say(f"PostgreSQL {DB_NAME}, Redis db {REDIS_DB}; per run above; targets:")
        if self.shared:
            cores = ", ".join(f"{key} {used:.2f}" for key, used in self.shared.items())
            self.warnings.append(
                f"other processes used CPU (cores) during {cores}: the machine was shared, "
                "read those runs' figures as pessimistic"
            )
        if self.foreign:
            self.warnings.append(
                f"PostgreSQL also served other databases during {', '.join(self.foreign)}: "
                "its CPU figure includes their backends that exited"
            )
        for warning in self.warnings:
            say(f"WARNING: {warning}")

        def verdict(ok: bool) -> str:
            return "MET" if ok else "MISSED"

        pool = args.connections
        if "smtp_pool" in runs:
            rate = runs["smtp_pool"].rate
            single = runs["smtp_single"].rate
            say(
                f"SMTP {args.delay_ms:g} ms: {rate:,.0f} msg/s with {pool} connections "
                f"(1 connection: {single:,.1f} msg/s) (target >= {TARGET_SMTP:,.0f} msg/s)  "
                f"{verdict(rate >= TARGET_SMTP)}"
            )
        if "smtp_pool" in runs and "smtp_zero" in runs:
            at, zero = runs["smtp_pool"].cpu_ms["workers"], runs["smtp_zero"].cpu_ms["workers"]
            change = at / zero - 1 if zero else float("nan")
            say(
                f"SMTP {args.delay_ms:g} ms: workers' CPU per message {at:.3f} ms vs "
                f"{zero:.3f} ms at 0 ms, {change:+.0%} (target within +{TARGET_CPU:.0%})  "
                f"{verdict(change <= TARGET_CPU)}"
            )
        if "esp_pool" in runs:
            rate, single = runs["esp_pool"].rate, runs["esp_single"].rate
            say(
                f"ESP {args.esp_latency_ms:g} ms: {rate:,.0f} msg/s with {pool} concurrent "
                f"calls (1 call: {single:,.1f} msg/s) (target >= {TARGET_ESP:,.0f} msg/s)  "
                f"{verdict(rate >= TARGET_ESP)}"
            )
            if "esp_unbatched" in runs:
                say(
                    f"  one email a call instead of batch calls: "
                    f"{runs['esp_unbatched'].rate:,.0f} msg/s with {pool} concurrent calls"
                )
        if "rate" in runs and runs["rate"].per_second:
            measured = runs["rate"].steady
            off = measured / args.rate - 1
            say(
                f"rate {args.rate:g}/s: {measured:,.1f} msg/s over {args.rate_seconds:g} s, "
                f"{off:+.1%} (target within ±{TARGET_RATE:.0%})  "
                f"{verdict(abs(off) <= TARGET_RATE)}"
            )
            unlimited = runs.get("smtp_pool" if args.rate_delay_ms == args.delay_ms else "")
            if unlimited and unlimited.rate < args.rate:
                say(
                    f"  (without a limit the same set-up sent {unlimited.rate:,.0f} msg/s: "
                    "the limit never bound)"
                )
        pooled = [
            r
            for key, r in runs.items()
            if key in ("smtp_pool", "esp_pool", "esp_unbatched", "rate")
        ]
        for run in pooled:
            if run.peak < run.connections * 2:
                why = ": one a worker, no pool in use" if run.peak <= 2 else ""
                say(
                    f"  note: {run.label} reached {run.peak} connections (or calls) at once at "
                    f"the server, of {run.connections} × 2 asked{why}"
                )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="mailer latency benchmark")
    parser.add_argument(
        "--phases", default="smtp,esp,rate", help="comma-separated: smtp, esp, rate"
    )
    parser.add_argument("--connections", type=int, default=40, help="pool size a worker")
    parser.add_argument("--messages", type=int, default=20_000, help="SMTP run with the pool")
    parser.add_argument("--single-messages", type=int, default=1000, help="SMTP, 1 connection")
    parser.add_argument(
        "--zero-messages", type=int, default=10_000, help="SMTP at 0 ms (0: skip it)"
    )
    parser.add_argument("--delay-ms", type=float, default=10.0, help="the sink's reply delay")
    parser.add_argument("--esp-messages", type=int, default=20_000, help="ESP with the pool")
    parser.add_argument("--esp-single-messages", type=int, default=2000, help="ESP, 1 call")
    parser.add_argument(
        "--esp-unbatched-messages",
        type=int,
        default=5000,
        help="ESP with the pool, one email a call (0: skip it)",
    )
    parser.add_argument("--esp-latency-ms", type=float, default=100.0)
    parser.add_argument("--rate", type=float, default=500.0, help="messages a second")
    parser.add_argument("--rate-seconds", type=float, default=60.0, help="the measured window")
    parser.add_argument("--rate-warmup", type=float, default=2.0, help="seconds not measured")
    parser.add_argument("--rate-delay-ms", type=float, default=10.0, help="the sink's delay")
    parser.add_argument("--stall-seconds", type=float, default=60.0)
    parser.add_argument("--lock-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(args.phases) - {"smtp", "esp", "rate"}
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    bench = LatencyBench(args)
    try:
        bench.run()
    except (KeyboardInterrupt, Interrupted):
        say("\ninterrupted: stopping workers and the servers")
        return 130
    finally:
        bench.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
