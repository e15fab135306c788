"""Transactional email benchmark against real PostgreSQL, Redis, Celery and an SMTP sink.

Run it through ``make bench`` (or ``bash tests/services.sh run -- .venv/bin/python
bench/transactional.py [--quick]``), which exports DATABASE_URL and CELERY_BROKER_URL.
It never touches the test database or Redis DB 0: it drops and re-creates its own
database (``mailer_bench``) and uses Redis DB 5. See bench/README.md for how to read it.

Phases, each printed as it finishes and then summed up in one table:

a. sink ceiling      smtplib, one reused connection, pre-built ~10 KB messages → msg/s
b. api.send          the request-path cost, autocommit (each call fires its kick)
c. end-to-end        N queued rows, two ``celery worker -c 1`` processes, one kick →
                     msg/s until every row is ``sent``, and CPU per message per process
b2. api.send live    api.send again with the workers idle and running (kick → task)
e. breakdown         the worker's drain loop run in this process, each step timed
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from sink import Sink  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
NPROC = len(os.sched_getaffinity(0))
QUEUE = "transactional"
TARGET_API_P50_MS = 3.0
TARGET_RATIO = 0.50


# --- Small helpers ----------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


class Interrupted(Exception):
    """SIGTERM, turned into an exception so every finally block runs."""


def _on_sigterm(signum, frame):
    raise Interrupted(f"signal {signum}")


# --- CPU accounting from /proc -------------------------------------------------------------


def _stat(pid: str) -> tuple[str, int, float, float] | None:
    """(comm, session id, own CPU s, reaped children's CPU s) of a process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): session is field 6, utime/stime/cutime/cstime 14-17.
    own = (int(rest[11]) + int(rest[12])) / CLK_TCK
    children = (int(rest[13]) + int(rest[14])) / CLK_TCK
    return comm, int(rest[3]), own, children


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, not idle or iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLK_TCK


@dataclass
class CpuSnapshot:
    at: float
    machine: float
    per_pid: dict[tuple[str, str], float] = field(default_factory=dict)  # (group, pid) → s
    foreign_backends: int = 0  # PostgreSQL backends serving other databases (shared server)

    def group(self, name: str) -> dict[str, float]:
        return {pid: cpu for (g, pid), cpu in self.per_pid.items() if g == name}


def cpu_snapshot(worker_sessions: set[int], sink_pid: int | None, db_name: str) -> CpuSnapshot:
    """CPU used so far by each process we care about, grouped."""
    snap = CpuSnapshot(at=time.monotonic(), machine=machine_busy())
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        stat = _stat(pid)
        if stat is None:
            continue
        comm, session, cpu, reaped = stat
        if int(pid) == me:
            group = "bench"
        elif session in worker_sessions:
            group, cpu = "workers", cpu + reaped  # a pool child that exited counts too
        elif sink_pid is not None and int(pid) == sink_pid:
            group = "sink"
        elif comm.startswith("redis-server"):
            group = "redis"
        elif comm == "postgres":
            cmdline = _cmdline(pid)
            if f" {db_name} " in cmdline:
                group = "postgres"  # a live backend of the benchmark database
            elif re.match(r"postgres: \S+ \S+ (\S+\(\d+\)|\[local\])", cmdline):
                snap.foreign_backends += 1  # someone else's session on the shared server
                continue
            elif not cmdline.startswith("postgres:"):
                # The postmaster: backends that have exited (Celery closes its database
                # connection after every task) left their CPU in its children's time.
                group, cpu = "postgres", reaped
            else:
                continue
        else:
            continue
        snap.per_pid[(group, pid)] = cpu
    return snap


def cpu_delta(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds per group between two snapshots (processes started between count whole)."""
    out: dict[str, float] = defaultdict(float)
    for key, cpu in after.per_pid.items():
        out[key[0]] += cpu - before.per_pid.get(key, 0.0)
    out["machine"] = after.machine - before.machine
    out["foreign_backends"] = max(before.foreign_backends, after.foreign_backends)
    out["wall"] = after.at - before.at
    return dict(out)


# --- Services: the benchmark database and Redis -----------------------------------------------


def recreate_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(with_path(admin_url, "/postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def take_bench_lock(admin_url: str, timeout: float):
    """One benchmark at a time per server: a session advisory lock, held until exit.

    Two runs would drop each other's database and flush each other's Redis DB. Returns
    the connection that holds the lock; closing it releases the lock.
    """
    import psycopg

    conn = psycopg.connect(with_path(admin_url, "/postgres"), autocommit=True)
    deadline, told = time.monotonic() + timeout, False
    while not conn.execute("SELECT pg_try_advisory_lock(hashtext('mailer-bench'))").fetchone()[0]:
        if time.monotonic() > deadline:
            conn.close()
            raise SystemExit(f"another benchmark run held the lock for {timeout:.0f} s; gave up")
        if not told:
            say("  another benchmark run is in progress on this server: waiting for it")
            told = True
        time.sleep(1)
    return conn


def migrate(env: dict[str, str]) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"migrate failed:\n{result.stdout}\n{result.stderr}")
    return time.monotonic() - started


# --- Celery workers ---------------------------------------------------------------------------


class Worker:
    """A real ``celery worker -c 1`` process (its own session, so its pool child counts)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path):
        self.name, self.env = name, env
        self.log_path = log_dir / f"worker-{name}.log"
        self.process: subprocess.Popen | None = None

    def launch(self) -> Worker:
        log = open(self.log_path, "wb")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "project", "worker", "-Q", QUEUE]
            + ["-n", f"{self.name}@%h", "-c", "1", "-P", "prefork", "-l", "info"]
            + ["--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while b" ready." not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} did not start:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None


# --- The benchmark -------------------------------------------------------------------------


@dataclass
class Results:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # phase, figure, value
    ceiling: float = 0.0
    parallel_ceiling: float = 0.0
    warnings: list[str] = field(default_factory=list)
    api_p50: float = float("nan")
    e2e: float = 0.0

    def add(self, phase: str, figure: str, value: str) -> None:
        self.rows.append((phase, figure, value))
        say(f"  {figure:<44} {value}")


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results = Results()
        self.sink: Sink | None = None
        self.lock = None  # the connection holding the one-benchmark-at-a-time lock
        self.workers: list[Worker] = []
        self.log_dir = Path(tempfile.mkdtemp(prefix="mailer-bench-"))
        base_db = os.environ.get("DATABASE_URL", "")
        broker = os.environ.get("CELERY_BROKER_URL", "")
        if not base_db.startswith("postgres") or not broker.startswith("redis://"):
            raise SystemExit(
                "DATABASE_URL (PostgreSQL) and CELERY_BROKER_URL (Redis) must be set: run "
                "`make bench` or `bash tests/services.sh run -- .venv/bin/python "
                "bench/transactional.py`."
            )
        self.db_url = with_path(base_db, f"/{args.db_name}")
        self.admin_url = base_db
        self.redis_url = with_path(broker, f"/{args.redis_db}")

    # -- environment ----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILER_", "PYTEST"))}
        env.update(
            DJANGO_SETTINGS_MODULE="project.settings",
            DATABASE_URL=self.db_url,
            CELERY_BROKER_URL=self.redis_url,
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(self.sink.port if self.sink else 25),
            SMTP_SECURITY="none",
            SMTP_FROM_EMAIL="noreply@bench.test",
            SMTP_FROM_NAME="Mailer Bench",
            DEBUG="0",
            SECRET_KEY="bench",  # noqa: S106 - a throwaway benchmark process
            # DEBUG=0 makes mailer's checks insist on a webhook secret (mailer.E007).
            ANYMAIL_WEBHOOK_SECRET="bench:bench-only-webhook-secret",  # noqa: S106
            MAILER_LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        return env

    def run(self) -> None:
        args = self.args
        self.print_machine()
        say(f"\nsetup: sink, database {args.db_name!r}, Redis db {args.redis_db}")
        self.lock = take_bench_lock(self.admin_url, args.lock_timeout)
        self.sink = Sink().start()
        say(f"  sink pid {self.sink.process.pid} on 127.0.0.1:{self.sink.port}")
        recreate_database(self.admin_url, args.db_name)
        env = self.env()
        say(f"  migrated {args.db_name} in {migrate(env):.1f} s")
        os.environ.clear()
        os.environ.update(env)
        import django

        django.setup()
        self.flush_redis()

        self.phase_ceiling()
        self.phase_api("b. api.send", workers_live=False)
        self.phase_end_to_end()
        if not args.skip_live:
            self.phase_api("b2. api.send, workers live", workers_live=True)
        self.stop_workers()
        if not args.skip_breakdown:
            self.phase_breakdown()
        self.print_table()

    def cleanup(self) -> None:
        self.stop_workers()
        if self.sink is not None:
            self.sink.stop()
            self.sink = None
        if self.lock is not None:  # without it, Redis DB and database are another run's
            with contextlib.suppress(Exception):
                self.flush_redis()
            with contextlib.suppress(Exception):
                self.lock.close()
            self.lock = None

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []

    # -- shared steps ---------------------------------------------------------------------

    def flush_redis(self) -> None:
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()

    def truncate(self) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE mailer_message, mailer_event RESTART IDENTITY CASCADE")

    def queue_rows(self, count: int, start: int = 0) -> float:
        """Insert ``count`` queued messages shaped exactly like api.send's, in bulk."""
        from django.utils import timezone

        from mailer import rendering
        from mailer.compose import message_context
        from mailer.models import Kind, Message, MessageStatus

        started = time.monotonic()
        source = rendering.find_template("welcome", None, None)
        compiled = rendering.compiled(source)
        now = timezone.now()
        rows = []
        for i in range(start, start + count):
            message = Message(
                kind=Kind.TRANSACTIONAL,
                to_email=f"user{i}@example.com",
                template_id=source.template_id,
                template_slug="welcome",
                language=source.language,
                context=welcome_context(i),
                metadata={},
                status=MessageStatus.QUEUED,
                queued_at=now,
            )
            message.subject = compiled.render_subject(message_context(message))
            rows.append(message)
        Message.objects.bulk_create(rows, batch_size=2000)
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("ANALYZE mailer_message")
        return time.monotonic() - started

    def pg_sessions(self) -> int:
        """Sessions PostgreSQL has opened on the benchmark database (its own statistics)."""
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
            )
            return int(cursor.fetchone()[0] or 0)

    def snapshot(self) -> CpuSnapshot:
        sessions = {w.process.pid for w in self.workers if w.process is not None}
        sink_pid = self.sink.process.pid if self.sink and self.sink.process else None
        return cpu_snapshot(sessions, sink_pid, self.args.db_name)

    def start_workers(self) -> float:
        started = time.monotonic()
        env = self.env()
        self.workers = [Worker(f"bench{i}", env, self.log_dir).launch() for i in (1, 2)]
        for worker in self.workers:
            worker.wait_ready()
        return time.monotonic() - started

    def worker_logs(self) -> str:
        return "\n".join(f"--- {w.name} ({w.log_path}) ---\n{w.tail()}" for w in self.workers)

    # -- a. the sink's ceiling ------------------------------------------------------------

    def phase_ceiling(self) -> None:
        from mailer import mime

        count = self.args.ceiling_messages
        say(f"\na. sink ceiling: smtplib, one connection, {count} pre-built messages")
        data = mime.build(
            from_header="Mailer Bench <noreply@bench.test>",
            to_header="user@example.com",
            subject="Benchmark message",
            text=LOREM_TEXT,
            html=LOREM_HTML,
            message_id="<bench@bench.test>",
            headers={"X-Mailer-Message-Id": "bench"},
        )
        rounds = 3
        per_round = max(1, count // rounds)
        rates: list[float] = []
        client_cpu = 0.0
        client = smtplib.SMTP("127.0.0.1", self.sink.port, timeout=10)
        try:
            client.ehlo()
            for _ in range(min(200, count)):  # warm up both ends
                client.sendmail("noreply@bench.test", ["user@example.com"], data)
            self.sink.reset()
            before = self.sink.stats()
            for _ in range(rounds):  # the median of three: this figure is the noisiest
                cpu0, t0 = time.process_time(), time.perf_counter()
                for _ in range(per_round):
                    client.sendmail("noreply@bench.test", ["user@example.com"], data)
                rates.append(per_round / (time.perf_counter() - t0))
                client_cpu += time.process_time() - cpu0
            after = self.sink.stats()
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()
        sent = per_round * rounds
        if after.messages != sent:
            raise RuntimeError(f"sink counted {after.messages} messages, sent {sent}")
        rate = statistics.median(rates)
        self.results.ceiling = rate
        add = self.results.add
        add("a", "message size", f"{len(data):,} bytes ({after.bytes / sent:,.0f} on the wire)")
        add("a", "sink ceiling (1 connection), median of 3", f"{rate:,.0f} msg/s")
        add("a", "  the 3 rounds", " / ".join(f"{r:,.0f}" for r in rates) + " msg/s")
        add("a", "client (smtplib) CPU per message", f"{client_cpu / sent * 1e3:.3f} ms")
        add("a", "sink CPU per message", f"{(after.cpu - before.cpu) / sent * 1e3:.3f} ms")
        self.parallel_ceiling(data, count)

    def parallel_ceiling(self, data: bytes, count: int) -> None:
        """Two smtplib clients in two processes, as two workers would send (for context)."""
        path = self.log_dir / "ceiling.eml"
        path.write_bytes(data)
        each = max(1, count // 2)
        before = self.sink.stats()
        t0 = time.perf_counter()
        clients = [
            subprocess.Popen(
                [sys.executable, "-c", PARALLEL_CLIENT, str(self.sink.port), str(each), str(path)]
            )
            for _ in range(2)
        ]
        try:
            codes = [c.wait(timeout=600) for c in clients]
        finally:
            for c in clients:
                if c.poll() is None:
                    c.kill()
        elapsed = time.perf_counter() - t0
        after = self.sink.stats()
        if any(codes) or after.messages - before.messages != 2 * each:
            raise RuntimeError(f"parallel ceiling: exit codes {codes}")
        self.results.parallel_ceiling = 2 * each / elapsed
        self.results.add(
            "a", "sink, 2 clients in parallel (context)", f"{2 * each / elapsed:,.0f} msg/s"
        )

    # -- b. api.send in the request path ---------------------------------------------------

    def phase_api(self, label: str, *, workers_live: bool) -> None:
        from django.db import connection
        from django.test.utils import CaptureQueriesContext

        from mailer import api, dispatch
        from mailer.models import Message

        calls = self.args.api_calls
        say(f"\n{label}: {calls} calls, autocommit, built-in 'welcome' template")
        if not workers_live:
            self.truncate()
            self.flush_redis()
        sink_base = self.sink.stats().messages
        offset = 10_000_000 if workers_live else 0
        warmups = 20
        for i in range(warmups):  # connections, template compile, caches
            api.send("welcome", to=f"warm{offset + i}@example.com", context=welcome_context(i))
        with CaptureQueriesContext(connection) as queries:
            api.send("welcome", to=f"probe{offset}@example.com", context=welcome_context(0))
        first_id = Message.objects.order_by("-id").values_list("id", flat=True).first()

        kicks = {"calls": 0, "enqueued": 0}
        original_kick = dispatch.kick

        def counting_kick(*args, **kwargs):
            enqueued = original_kick(*args, **kwargs)
            kicks["calls"] += 1
            kicks["enqueued"] += bool(enqueued)
            return enqueued

        dispatch.kick = counting_kick
        sessions = self.pg_sessions()
        before = self.snapshot()
        timings = []
        try:
            for i in range(calls):
                t0 = time.perf_counter()
                api.send("welcome", to=f"user{offset + i}@example.com", context=welcome_context(i))
                timings.append((time.perf_counter() - t0) * 1e3)
        finally:
            dispatch.kick = original_kick
        after = self.snapshot()
        cpu = cpu_delta(before, after)

        phase = "b2" if workers_live else "b"
        add = self.results.add
        p50 = percentile(timings, 0.5)
        if not workers_live:
            self.results.api_p50 = p50
        p90, p99 = percentile(timings, 0.9), percentile(timings, 0.99)
        add(phase, "api.send p50", f"{p50:.2f} ms")
        add(phase, "api.send p90 / p99", f"{p90:.2f} / {p99:.2f} ms")
        add(
            phase, "api.send mean / max", f"{statistics.fmean(timings):.2f} / {max(timings):.2f} ms"
        )
        add(phase, "api.send calls/s, one thread", f"{calls / (sum(timings) / 1e3):,.0f}")
        add(phase, "SQL queries per call", f"{len(queries.captured_queries)}")
        add(phase, "kicks that enqueued a drain task", f"{kicks['enqueued']} of {kicks['calls']}")
        add(phase, "bench-process CPU per call", f"{cpu.get('bench', 0) / calls * 1e3:.2f} ms")
        add(phase, "postgres CPU per call", f"{cpu.get('postgres', 0) / calls * 1e3:.2f} ms")
        if workers_live:
            self.finish_live(
                first_id, calls, sink_base + warmups + 1, before, sessions, kicks["enqueued"]
            )
        else:
            # Which part of api.send is what: more calls with their parts timed.
            for name, ms in self.api_parts().items():
                add(phase, f"  part: {name}", f"{ms:.3f} ms")

    def finish_live(
        self,
        first_id: int | None,
        calls: int,
        sink_base: int,
        before: CpuSnapshot,
        sessions: int,
        tasks: int,
    ) -> None:
        """With workers live: wait for the mail, report how long it waited in the queue."""
        from django.db.models import F

        from mailer.models import Message, MessageStatus

        deadline = time.monotonic() + self.args.stall_seconds
        while self.sink.stats().messages < sink_base + calls and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.2)  # the last drain's bookkeeping; PostgreSQL's statistics flush
        cpu = cpu_delta(before, self.snapshot())
        sessions = self.pg_sessions() - sessions
        rows = Message.objects.filter(id__gt=first_id or 0, status=MessageStatus.SENT)
        waits = [
            d.total_seconds() * 1e3
            for d in rows.annotate(w=F("claimed_at") - F("queued_at")).values_list("w", flat=True)
        ]
        add = self.results.add
        worker_ms = cpu.get("workers", 0) / calls * 1e3
        add("b2", "worker CPU per call, until delivered", f"{worker_ms:.2f} ms")
        if tasks:
            per_task = cpu.get("workers", 0) / tasks * 1e3
            add("b2", "messages per kick-enqueued drain task", f"{calls / tasks:.1f}")
            add("b2", "worker CPU per kick-enqueued drain task", f"{per_task:.2f} ms")
        add("b2", "PostgreSQL sessions opened (pg_stat)", f"{sessions}")
        if waits:
            p50, p99 = percentile(waits, 0.5), percentile(waits, 0.99)
            add("b2", "queued → claimed p50 / p99", f"{p50:.1f} / {p99:.1f} ms")
        add("b2", "sink CPU per call", f"{cpu.get('sink', 0) / calls * 1e3:.2f} ms")
        add("b2", "delivered to the sink", f"{self.sink.stats().messages - sink_base} of {calls}")

    def api_parts(self, calls: int = 200) -> dict[str, float]:
        """Time api.send's parts by wrapping them (this process only, then restored)."""
        from django.db import transaction

        from mailer import api, dispatch, outbox, rendering
        from mailer.models import Message

        timers = Timers()
        timers.wrap(api, "clean_address", "clean_address")
        timers.wrap(outbox, "contact_and_suppression", "contact + suppression (1 query)")
        timers.wrap(rendering, "find_template", "find_template (DB + disk)")
        timers.wrap(rendering, "compiled", "compiled (cache lookup)")
        timers.wrap(rendering.Compiled, "render_subject", "render subject")
        timers.wrap(Message, "save", "INSERT (Message.save)")
        timers.wrap(transaction.Atomic, "__enter__", "transaction.atomic enter")
        timers.wrap(transaction.Atomic, "__exit__", "transaction.atomic exit (COMMIT)")
        timers.wrap(dispatch, "kick", "kick (Redis SET NX / apply_async)")
        try:
            timers.reset()
            t0 = time.perf_counter()
            for i in range(calls):
                api.send("welcome", to=f"part{i}@example.com", context=welcome_context(i))
            total = (time.perf_counter() - t0) * 1e3 / calls
        finally:
            timers.restore()
        parts = {name: ms / calls for name, ms in timers.ms.items()}
        parts["other (validation, JSON, Python)"] = total - sum(parts.values())
        parts["= total (wrapped)"] = total
        return parts

    # -- c. end to end with two workers ----------------------------------------------------

    def phase_end_to_end(self) -> None:
        from django.db.models import Count

        from mailer import dispatch
        from mailer.models import Message, MessageStatus, Queue

        count = self.args.messages
        say(f"\nc. end-to-end: {count} queued messages, 2 workers (-c 1 each), one kick")
        self.truncate()
        self.flush_redis()
        # Workers first: a starting worker looks for work at once, and must find none yet.
        say(f"  workers ready in {self.start_workers():.1f} s (logs: {self.log_dir})")
        time.sleep(1.0)  # their start-up drains find an empty queue and finish
        inserted = self.queue_rows(count)
        say(f"  (queued {count} rows in bulk in {inserted:.1f} s; not part of the figure)")
        self.sink.reset()
        sessions = self.pg_sessions()
        before = self.snapshot()
        t0 = time.monotonic()
        dispatch.kick(Queue.TRANSACTIONAL)
        samples: list[tuple[float, int]] = [(0.0, 0)]
        last_progress, last_count = t0, 0
        while True:
            now = time.monotonic()
            got = self.sink.stats().messages
            if got != last_count:
                samples.append((now - t0, got))
                last_progress, last_count = now, got
            if got >= count:
                break
            if now - last_progress > self.args.stall_seconds:
                raise RuntimeError(
                    f"no progress for {self.args.stall_seconds} s at {got}/{count}:\n"
                    + self.worker_logs()
                )
            if any(w.process.poll() is not None for w in self.workers):
                raise RuntimeError("a worker died:\n" + self.worker_logs())
            time.sleep(0.02)
        t_sink = time.monotonic() - t0
        while Message.objects.filter(status=MessageStatus.SENT).count() < count:
            if time.monotonic() - t0 > t_sink + self.args.stall_seconds:
                raise RuntimeError("the sink has every message but rows are not 'sent'")
            time.sleep(0.01)
        t_sent = time.monotonic() - t0
        after = self.snapshot()
        cpu = cpu_delta(before, after)
        stats = self.sink.stats()
        statuses = dict(
            Message.objects.values_list("status").annotate(n=Count("id")).values_list("status", "n")
        )

        rate = count / t_sent
        self.results.e2e = rate
        add = self.results.add
        add("c", "end-to-end (kick → all rows 'sent')", f"{rate:,.0f} msg/s in {t_sent:.2f} s")
        add("c", "ratio to the sink ceiling", f"{rate / self.results.ceiling:.0%}")
        add("c", "as seen by the sink (kick → N received)", f"{count / t_sink:,.0f} msg/s")
        add("c", "steady state (10% → 90% received)", f"{steady_rate(samples, count):,.0f} msg/s")
        add("c", "message size on the wire", f"{stats.bytes / max(1, stats.messages):,.0f} bytes")
        add("c", "sink messages / duplicates", f"{stats.messages} / {stats.messages - count}")
        add("c", "row statuses", ", ".join(f"{k}={v}" for k, v in sorted(statuses.items())))
        add("c", "SMTP connections opened", f"{stats.connections}")
        for group in ("workers", "sink", "postgres", "redis", "bench"):
            add("c", f"CPU per message: {group}", f"{cpu.get(group, 0) / count * 1e3:.3f} ms")
        accounted = sum(cpu.get(g, 0) for g in ("workers", "sink", "postgres", "redis", "bench"))
        add(
            "c",
            "CPU per message: everything else",
            f"{(cpu['machine'] - accounted) / count * 1e3:.3f} ms",
        )
        others = cpu["machine"] - accounted
        if cpu["foreign_backends"]:
            self.results.warnings.append(
                "PostgreSQL also served other databases during phase c: its CPU figure "
                "includes their backends that exited (a shared server)"
            )
        if others > 0.1 * cpu["machine"]:
            self.results.warnings.append(
                f"other processes used {others / cpu['wall']:.2f} cores during phase c: "
                "the machine was shared, read the figures as pessimistic"
            )
        add(
            "c",
            "machine busy during the run",
            f"{cpu['machine'] / cpu['wall']:.2f} of {NPROC} cores",
        )
        import redis

        client = redis.Redis.from_url(self.redis_url)
        left = client.llen(QUEUE)
        add("c", "drain tasks still queued at the end", f"{left}")
        # They find nothing to send, but each costs a task and a database session; let
        # them run now so that they do not count in phase b2.
        t0, before = time.monotonic(), self.snapshot()
        while client.llen(QUEUE) and time.monotonic() - t0 < self.args.stall_seconds:
            time.sleep(0.05)
        time.sleep(0.5)  # the last one is running
        spent = cpu_delta(before, self.snapshot())
        if left:
            add(
                "c",
                "  then run in / worker CPU per empty task",
                f"{time.monotonic() - t0:.1f} s / {spent.get('workers', 0) / left * 1e3:.1f} ms",
            )
        time.sleep(1.2)  # PostgreSQL flushes session statistics about once a second
        opened = self.pg_sessions() - sessions
        add("c", "PostgreSQL sessions opened (with those)", f"{opened}")

    # -- e. where a worker's time goes -------------------------------------------------------

    def phase_breakdown(self) -> None:
        from django.core.mail.backends import smtp as django_smtp
        from django.db import connection

        from mailer import compose, delivery, dispatch, mime, outbox, rendering, transport
        from mailer.models import Queue

        count = self.args.breakdown_messages
        say(f"\ne. breakdown: the worker's drain loop in this process, {count} messages")
        self.truncate()
        self.flush_redis()
        self.queue_rows(200, start=0)
        delivery.drain(Queue.TRANSACTIONAL)  # warm-up: compile, connect
        self.queue_rows(count, start=1000)
        self.flush_redis()

        timers = Timers()
        timers.wrap(outbox, "claim", "claim (lock, mark sending, load)")
        timers.wrap(delivery, "suppressed_addresses", "suppression check (1 query)")
        timers.wrap(compose.Templates, "for_message", "template lookup (per batch cache)")
        timers.wrap(rendering.Compiled, "render", "render (subject + html + text)")
        timers.wrap(compose, "build_email", "build_email other (context, PreparedEmail)")
        timers.wrap(mime, "build", "MIME bytes (mime.build)")
        timers.wrap(transport.Sender, "send", "SMTP send (backend + smtplib + sink)")
        for module in (mime, django_smtp):  # both may parse addresses for a message
            if hasattr(module, "sanitize_address"):
                timers.wrap(module, "sanitize_address", "address parsing (sanitize_address)")
        # One round trip per message, sent before the email is composed and read before
        # it goes out: the previous one sent, this one tried.
        timers.wrap(outbox.Note, "__init__", "claim note: send (ahead of composing)")
        timers.wrap(outbox.Note, "result", "claim note: wait for its answer")
        timers.wrap(dispatch, "kick", "kick (Redis + apply_async)")
        timers.wrap(dispatch, "clear_kick", "clear kick flag (Redis DEL)")
        nested = {
            "build_email other (context, PreparedEmail)": ["render (subject + html + text)"],
            "SMTP send (backend + smtplib + sink)": [
                "MIME bytes (mime.build)",
                "address parsing (sanitize_address)",
            ],
        }
        sink_before = self.sink.stats()
        profiler = None
        if self.args.profile:
            import cProfile

            profiler = cProfile.Profile()
        try:
            cpu0, t0 = time.process_time(), time.perf_counter()
            if profiler:
                profiler.enable()
            # A drain hands over after DRAIN_SECONDS; the worker's next task would go on.
            sent = 0
            while sent < count:
                got = delivery.drain(Queue.TRANSACTIONAL)
                if not got:
                    break
                sent += got
            if profiler:
                profiler.disable()
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        finally:
            timers.restore()
        sink_after = self.sink.stats()
        if sent != count:
            raise RuntimeError(f"drain sent {sent} of {count}")
        exclusive, exclusive_cpu = dict(timers.ms), dict(timers.cpu_ms)
        for outer, inners in nested.items():
            for inner in inners:
                exclusive[outer] -= exclusive.get(inner, 0.0)
                exclusive_cpu[outer] -= exclusive_cpu.get(inner, 0.0)
        add = self.results.add
        add("e", "one process, no Celery", f"{count / wall:,.0f} msg/s ({wall:.2f} s)")
        add("e", "this process's CPU per message", f"{cpu / count * 1e3:.3f} ms")
        add(
            "e",
            "sink CPU per message",
            f"{(sink_after.cpu - sink_before.cpu) / count * 1e3:.3f} ms",
        )
        order = [
            "claim (lock, mark sending, load)",
            "suppression check (1 query)",
            "template lookup (per batch cache)",
            "render (subject + html + text)",
            "build_email other (context, PreparedEmail)",
            "MIME bytes (mime.build)",
            "address parsing (sanitize_address)",
            "SMTP send (backend + smtplib + sink)",
            "claim note: send (ahead of composing)",
            "claim note: wait for its answer",
            "kick (Redis + apply_async)",
            "clear kick flag (Redis DEL)",
        ]
        total_ms, total_cpu = wall * 1e3, cpu * 1e3
        add("e", "  step (exclusive)", "   CPU µs/msg  wall µs/msg  share of CPU")

        def line(name: str, ms: float, cpu_ms: float) -> None:
            add(
                "e",
                f"  {name}",
                f"{cpu_ms / count * 1e3:12.1f} {ms / count * 1e3:12.1f} {cpu_ms / total_cpu:13.1%}",
            )

        for name in order:
            line(name, exclusive.get(name, 0.0), exclusive_cpu.get(name, 0.0))
        line(
            "other (drain/send_batch loop)",
            total_ms - sum(exclusive.values()),
            total_cpu - sum(exclusive_cpu.values()),
        )
        if profiler:
            import pstats

            profiler.dump_stats(self.args.profile)
            say(f"  cProfile of the drain written to {self.args.profile}; top functions:")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        connection.close()

    # -- output ---------------------------------------------------------------------------

    def print_machine(self) -> None:
        import celery
        import django

        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        model = ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        say("mailer transactional benchmark")
        say(f"  machine   {NPROC} CPUs ({model}), {platform.system()} {platform.release()}")
        say(f"  python    {platform.python_version()} ({sys.executable})")
        say(f"  versions  Django {django.get_version()}, Celery {celery.__version__}")
        say(f"  load avg  {load} (before the run)")
        say(
            f"  sizes     --messages {self.args.messages}  --api-calls {self.args.api_calls}  "
            f"ceiling {self.args.ceiling_messages}  breakdown {self.args.breakdown_messages}"
        )

    def print_table(self) -> None:
        rows = self.results.rows
        width = max(len(r[1]) for r in rows) + 2
        say("\n" + "=" * (width + 40))
        say(f"{'phase':<6}{'figure':<{width}}value")
        say("-" * (width + 40))
        phase = None
        for p, figure, value in rows:
            say(f"{p if p != phase else '':<6}{figure:<{width}}{value}")
            phase = p
        say("=" * (width + 40))
        r = self.results
        ratio = r.e2e / r.ceiling if r.ceiling else 0.0
        ok_api = "MET" if r.api_p50 < TARGET_API_P50_MS else "MISSED"
        ok_e2e = "MET" if ratio >= TARGET_RATIO else "MISSED"
        for warning in r.warnings:
            say(f"WARNING: {warning}")
        say(
            f"machine: {NPROC} CPUs, Python {platform.python_version()}, "
            f"load avg {os.getloadavg()[0]:.2f} now"
        )
        say(f"api.send p50 {r.api_p50:.2f} ms (target < {TARGET_API_P50_MS:g} ms): {ok_api}")
        say(
            f"end-to-end {r.e2e:,.0f} msg/s = {ratio:.0%} of sink ceiling "
            f"{r.ceiling:,.0f} msg/s (target >= {TARGET_RATIO:.0%}): {ok_e2e}"
        )
        if r.parallel_ceiling:
            say(
                f"  (context: {r.e2e / r.parallel_ceiling:.0%} of the 2-client sink figure, "
                f"{r.parallel_ceiling:,.0f} msg/s)"
            )


PARALLEL_CLIENT = """
import smtplib, sys
port, count, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
client = smtplib.SMTP("127.0.0.1", port, timeout=10)
for _ in range(count):
    client.sendmail("noreply@bench.test", ["user@example.com"], data)
client.quit()
"""


def steady_rate(samples: list[tuple[float, int]], count: int) -> float:
    lo = next((s for s in samples if s[1] >= count * 0.1), None)
    hi = next((s for s in samples if s[1] >= count * 0.9), None)
    if lo is None or hi is None or hi[0] <= lo[0]:
        return float("nan")
    return (hi[1] - lo[1]) / (hi[0] - lo[0])


class Timers:
    """Wrap functions to add up their wall and CPU time; ``restore()`` undoes it.

    CPU is this thread's (``time.thread_time``): wall minus CPU is time spent waiting for
    PostgreSQL, Redis or the sink. Each wrapped call costs about 2 µs of its own.
    """

    def __init__(self):
        self.ms: dict[str, float] = defaultdict(float)
        self.cpu_ms: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[object, str, object]] = []

    def reset(self) -> None:
        self.ms.clear()
        self.cpu_ms.clear()

    def wrap(self, owner: object, name: str, label: str, *, optional: bool = False) -> None:
        if optional and not hasattr(owner, name):
            return
        own = name in vars(owner)  # else inherited: restoring deletes our attribute
        original = vars(owner)[name] if own and isinstance(owner, type) else getattr(owner, name)
        ms, cpu_ms = self.ms, self.cpu_ms

        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                ms[label] += (time.perf_counter() - t0) * 1e3
                cpu_ms[label] += (time.thread_time() - c0) * 1e3

        setattr(owner, name, timed)
        self._undo.append((owner, name, original if own else None))

    def wrap_queryset(self, model, name: str, label: str) -> None:
        from django.db.models import QuerySet

        original = getattr(QuerySet, name)
        ms, cpu_ms = self.ms, self.cpu_ms

        def timed(qs, *args, **kwargs):
            if qs.model is not model:
                return original(qs, *args, **kwargs)
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return original(qs, *args, **kwargs)
            finally:
                ms[label] += (time.perf_counter() - t0) * 1e3
                cpu_ms[label] += (time.thread_time() - c0) * 1e3

        setattr(QuerySet, name, timed)
        self._undo.append((QuerySet, name, original))

    def wrap_manager(self, model, name: str, label: str) -> None:
        manager = model.objects  # the one Manager instance Model.objects returns
        self.wrap(manager, name, label)  # an instance attribute: restore deletes it

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            if original is None:
                with contextlib.suppress(AttributeError):
                    delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._undo.clear()


def welcome_context(i: int) -> dict[str, str]:
    return {"user_name": f"User {i}", "login_url": f"https://app.example.com/login/?u={i}"}


# ~10 KB of text + HTML for the sink ceiling's pre-built message.
_PARAGRAPH = (
    "Thanks for joining. Your account is ready, and everything you need to get started "
    "is one click away. If you did not create this account, you can ignore this email. "
)
LOREM_TEXT = "\n\n".join(_PARAGRAPH * 2 for _ in range(8))
LOREM_HTML = (
    '<!DOCTYPE html><html><body style="margin:0;padding:0;background:#f4f5f7">'
    + "".join(
        f'<p style="font-size:16px;line-height:24px;margin:0 0 16px;color:#1f2933">'
        f'{_PARAGRAPH * 2}<a href="https://app.example.com/welcome/{i}">Open</a></p>'
        for i in range(16)
    )
    + "</body></html>"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="mailer transactional benchmark")
    parser.add_argument("--messages", type=int, default=20_000, help="end-to-end messages")
    parser.add_argument("--api-calls", type=int, default=2000, help="timed api.send calls")
    parser.add_argument("--ceiling-messages", type=int, default=10_000)
    parser.add_argument("--breakdown-messages", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    parser.add_argument("--skip-live", action="store_true", help="skip phase b2")
    parser.add_argument("--skip-breakdown", action="store_true", help="skip phase e")
    parser.add_argument("--profile", metavar="PATH", help="cProfile phase e's drain into PATH")
    parser.add_argument("--db-name", default="mailer_bench")
    parser.add_argument("--redis-db", type=int, default=5)
    parser.add_argument("--stall-seconds", type=float, default=60.0)
    parser.add_argument(
        "--lock-timeout", type=float, default=900.0, help="wait this long for another run"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.messages = min(args.messages, 2000)
        args.api_calls = min(args.api_calls, 200)
        args.ceiling_messages = min(args.ceiling_messages, 1000)
        args.breakdown_messages = min(args.breakdown_messages, 500)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    bench = Bench(args)
    try:
        bench.run()
    except (KeyboardInterrupt, Interrupted):
        say("\ninterrupted: stopping workers and the sink")
        return 130
    finally:
        bench.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
