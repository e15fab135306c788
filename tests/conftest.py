"""Shared fixtures: a real SMTP server, real Celery worker processes, Redis, PostgreSQL.

Run through ``make test``, which starts PostgreSQL and Redis and exports DATABASE_URL and
CELERY_BROKER_URL. Integration fixtures fail (never skip) when a service is missing.
"""

from __future__ import annotations

import asyncio
import email
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from aiosmtpd.controller import Controller
from django.db import connection

pytest_plugins = ["tests.fakes"]  # slow_smtp, fake_esp

REPO = Path(__file__).resolve().parent.parent
FROM_EMAIL = "noreply@mailer.test"
FROM_NAME = "Mailer Tests"


@pytest.fixture(autouse=True)
def _fresh_template_caches():
    """Rolled-back Template rows send no signal: forget every lookup between tests."""
    from mailer import rendering

    rendering.forget_templates()
    yield
    rendering.forget_templates()


@pytest.fixture(autouse=True)
def _no_note_connection_left():
    """send_batch called on its own leaves its claim-note connection open, as a drain does
    not: close it, or the test database cannot be dropped."""
    yield
    from mailer import outbox

    outbox.close_notes()


def wait_for(
    predicate,
    timeout: float = 20.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "",
):
    """Poll until predicate() is truthy; fail with ``message`` after ``timeout`` seconds.

    ``message`` may be a callable, evaluated at the failure, so it can show the state then.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            pytest.fail(text or f"condition not met within {timeout}s", pytrace=True)
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- SMTP -----------------------------------------------------------------------------


@dataclass
class Received:
    at: float
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    def parsed(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.data, policy=policy.default)


class RecordingHandler:
    """Accepts everything, except recipients told to refuse with a given reply."""

    def __init__(self):
        self.lock = threading.Lock()
        self.messages: list[Received] = []
        self.refuse: dict[str, str] = {}
        self.delay = 0.0  # seconds before answering the end of DATA
        self.in_flight = self.most_in_flight = 0  # emails being answered at once
        self.pipelining = True  # offered in EHLO, as real relays do (RFC 2920)
        self.pipelined = 0  # transactions whose commands came in one go

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        # RCPT already waiting in the buffer: the client did not wait for this reply.
        if self.pipelining and b"RCPT" in bytes(getattr(server._reader, "_buffer", b"")):
            self.pipelined += 1
        envelope.mail_from, envelope.mail_options = address, mail_options
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.refuse.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            with self.lock:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            await asyncio.sleep(self.delay)
            with self.lock:
                self.in_flight -= 1
        with self.lock:
            self.messages.append(
                Received(
                    time.monotonic(), envelope.mail_from, list(envelope.rcpt_tos), envelope.content
                )
            )
        return "250 Message accepted for delivery"


class SMTPServer:
    """aiosmtpd on 127.0.0.1 at a fixed port, which tests may stop and start again."""

    def __init__(self):
        self.port = free_port()
        self.handler = RecordingHandler()
        self.controller: Controller | None = None

    def start(self) -> None:
        if self.controller is None:
            self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)
            self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    @property
    def messages(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.messages)

    def to(self, address: str) -> list[Received]:
        return [m for m in self.messages if address.lower() in (r.lower() for r in m.rcpt_tos)]

    def reset(self) -> None:
        with self.handler.lock:
            self.handler.messages.clear()
            self.handler.delay = 0.0
            self.handler.in_flight = self.handler.most_in_flight = 0
            self.handler.pipelining, self.handler.pipelined = True, 0
        self.handler.refuse.clear()
        self.start()


def send_through_smtp(settings, port: int) -> None:
    """Django's SMTP backend to a test server on 127.0.0.1, with the tests' sender."""
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", port
    settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
    settings.EMAIL_TIMEOUT = 5
    settings.DEFAULT_FROM_EMAIL = FROM_EMAIL
    settings.MAILER = {**settings.MAILER, "FROM_EMAIL": FROM_EMAIL, "FROM_NAME": FROM_NAME}


@pytest.fixture(scope="session")
def smtp_server():
    server = SMTPServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def smtp(smtp_server, settings):
    """The SMTP server, emptied, with this process's Django sending to it."""
    smtp_server.reset()
    send_through_smtp(settings, smtp_server.port)
    yield smtp_server
    smtp_server.start()


@dataclass(frozen=True)
class Tally:
    """What the SMTP server received, counted by recipient against the expected set."""

    expected: int
    received: int  # recipients over all emails, duplicates included
    lost: int  # expected recipients never received
    duplicated: int  # sum of (count - 1) over recipients received more than once
    unexpected: int  # emails to recipients outside the expected set


def tally(smtp: SMTPServer, expected: set[str]) -> Tally:
    counts = Counter(r.lower() for m in smtp.messages for r in m.rcpt_tos)
    return Tally(
        expected=len(expected),
        received=sum(counts.values()),
        lost=sum(1 for address in expected if address not in counts),
        duplicated=sum(n - 1 for n in counts.values() if n > 1),
        unexpected=sum(n for address, n in counts.items() if address not in expected),
    )


def assert_well_formed(message: email.message.EmailMessage) -> None:
    """No MIME defects anywhere, a text and an HTML part, our From."""
    defects = [(part.get_content_type(), part.defects) for part in message.walk() if part.defects]
    assert not defects, defects
    assert message.get_content_type() == "multipart/alternative"
    assert message.get_body(("plain",)) is not None
    assert message.get_body(("html",)) is not None
    assert message["From"].addresses[0].addr_spec == FROM_EMAIL
    assert message["From"].addresses[0].display_name == FROM_NAME


# --- Services ---------------------------------------------------------------------------


def _require_env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        pytest.fail(
            f"{name} is not set. Run the suite with `make test`, which starts PostgreSQL "
            "and Redis and exports it.",
            pytrace=False,
        )
    return value


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = _require_env("CELERY_BROKER_URL")
    if not url.startswith("redis://"):
        pytest.fail(f"CELERY_BROKER_URL must be a Redis URL for the tests, got {url!r}.")
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {url} does not answer: {exc}. Run `make test`.", pytrace=False)
    return url


@pytest.fixture
def broker(redis_url):
    """The Redis broker, emptied before the test (queues, kick flags, rate buckets)."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def test_database_url(django_db_setup, django_db_blocker) -> str:
    """The URL of pytest-django's test database, for worker processes."""
    with django_db_blocker.unblock():
        if connection.vendor != "postgresql":
            pytest.fail(
                "Integration tests need PostgreSQL: run `make test` (sets DATABASE_URL).",
                pytrace=False,
            )
        s = connection.settings_dict
        return f"postgres://{s['USER']}:{s['PASSWORD']}@{s['HOST']}:{s['PORT']}/{s['NAME']}"


# --- Celery workers -----------------------------------------------------------------------


class Worker:
    """A real ``celery worker`` process on the given queues."""

    def __init__(self, name: str, queues: str, env: dict[str, str], log_dir: Path):
        self.name, self.queues, self.env = name, queues, env
        self.log_path = log_dir / f"worker-{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 40.0) -> Worker:
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "project",
                "worker",
                "-Q",
                self.queues,
                "-n",
                f"{self.name}@%h",
                "-c",
                "1",
                "-P",
                "prefork",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "info",
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while b" ready." not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"worker {self.name} did not start:\n{self.log()}", pytrace=False)
            time.sleep(0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="session")
def worker_env(test_database_url, redis_url, smtp_server) -> dict[str, str]:
    """Environment for worker processes: the test DB, Redis, the test SMTP server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILER_", "PYTEST"))}
    env.update(
        DATABASE_URL=test_database_url,
        CELERY_BROKER_URL=redis_url,
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(smtp_server.port),
        SMTP_SECURITY="none",
        SMTP_TIMEOUT="5",
        SMTP_FROM_EMAIL=FROM_EMAIL,
        SMTP_FROM_NAME=FROM_NAME,
        DEBUG="0",
        SECRET_KEY="tests-only-secret",
        CONN_MAX_AGE="0",
        MAILER_RETRY_BACKOFF_BASE="1",
        MAILER_RETRY_BACKOFF_MAX="8",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def start_worker(worker_env, tmp_path_factory):
    """Factory: start a worker on ``queues`` with extra env; all are stopped at the end."""
    started: list[Worker] = []
    log_dir = tmp_path_factory.mktemp("workers")

    def start(name: str, queues: str = "transactional", **extra_env: str) -> Worker:
        worker = Worker(name, queues, {**worker_env, **extra_env}, log_dir).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def live(transactional_db, broker, smtp, start_worker):
    """Everything real: committed DB rows, an empty broker and SMTP server, and a worker
    on the transactional queue that lives only for this test (so no other test's worker
    takes its messages)."""
    worker = start_worker("transactional", "transactional")
    yield smtp
    worker.stop()


# --- Fault injection: Procfile processes, PostgreSQL and Redis restarts --------------------

PROCFILE = REPO / "Procfile"
SERVICES_SH = REPO / "tests" / "services.sh"


def procfile_command(entry: str) -> str:
    """The command line of one Procfile entry (``worker_campaign``, ``beat``, …)."""
    for line in PROCFILE.read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() == entry:
            return command.strip()
    pytest.fail(f"the Procfile has no {entry!r} entry", pytrace=False)


def process_group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc.

    Orphans of a killed main process are reparented and may linger as zombies where
    PID 1 does not reap them, so ``killpg(pgid, 0)`` alone would never say "gone".
    """
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp …
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


class ProcfileProcess:
    """One Procfile entry run as honcho or systemd runs it: ``bash -c 'exec CMD'`` in a
    process group of its own (start_new_session), so a test can signal the main process
    alone (``docker stop``) or the whole group (systemd, honcho, ``kill -9`` of a unit)."""

    def __init__(self, entry: str, env: dict[str, str], log_path: Path, ready: bytes):
        self.entry, self.env, self.log_path, self.ready = entry, env, log_path, ready
        self.command = procfile_command(entry)
        self.process: subprocess.Popen | None = None

    def spawn(self) -> ProcfileProcess:
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            ["bash", "-c", f"exec {self.command}"],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def wait_ready(self, timeout: float = 60.0) -> ProcfileProcess:
        deadline = time.monotonic() + timeout
        while self.ready not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{self.entry} did not start:\n{self.log()}", pytrace=False)
            time.sleep(0.1)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def concurrency(self) -> int:
        """Pool processes of a worker: the Procfile's --concurrency with this env."""
        args = shlex.split(self.command)
        value = args[args.index("--concurrency") + 1]
        if value.startswith("${"):
            name, _, default = value[2:-1].partition(":-")
            value = self.env.get(name) or default
        return int(value)

    def members(self) -> list[int]:
        if self.process is None:
            return []
        self.process.poll()  # reap the main process once it exits
        return process_group(self.pid)

    def kill(self) -> None:
        """SIGKILL to the whole group: the main process and every pool process."""
        self.signal_group(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM to the main process only, as ``docker stop`` sends it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    def terminate_group(self) -> None:
        """SIGTERM to every process of the group, as systemd and honcho send it."""
        self.signal_group(signal.SIGTERM)

    def signal_group(self, signum: int) -> None:
        if self.process is not None:
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                pass

    def wait_gone(self, timeout: float) -> float | None:
        """Seconds until the main process and all its children are gone, or None."""
        start = time.monotonic()
        while self.members():
            if time.monotonic() - start > timeout:
                return None
            time.sleep(0.05)
        return time.monotonic() - start

    def stop(self) -> None:
        """Kill what is left (teardown: the test's state no longer matters)."""
        if self.process is not None and self.members():
            self.kill()
            if self.wait_gone(15) is None:
                pytest.fail(f"{self.entry} (pid {self.pid}) survived SIGKILL", pytrace=False)

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]


class Procfile:
    """Starts Procfile entries against the test services; kills them all at teardown."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        bin_dir = str(Path(sys.executable).parent)  # the venv's celery first on PATH
        self.env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
        self.log_dir = log_dir
        self.started: list[ProcfileProcess] = []

    def process(self, entry: str, **extra_env: str) -> ProcfileProcess:
        ready = b"beat: Starting..." if entry == "beat" else b" ready."
        log_path = self.log_dir / f"{entry}-{len(self.started)}.log"
        process = ProcfileProcess(entry, {**self.env, **extra_env}, log_path, ready)
        self.started.append(process)
        return process

    def start(self, *processes: ProcfileProcess) -> None:
        """Start several at once (they load Django in parallel) and wait for each."""
        for process in processes:
            if process.entry == "beat":
                install_beat_schedule()
            process.spawn()
        for process in processes:
            process.wait_ready()

    def worker(self, queue: str, **extra_env: str) -> ProcfileProcess:
        """A started ``worker_<queue>`` Procfile entry."""
        process = self.process(f"worker_{queue}", **extra_env)
        self.start(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


def install_beat_schedule() -> None:
    """transactional_db flushed django-celery-beat's tables: write mailer's rows again."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from mailer.beat import install_schedule

    install_schedule(PeriodicTask, IntervalSchedule)


@pytest.fixture
def procfile(worker_env, tmp_path):
    """Factory for Procfile processes (workers, beat) that live only for this test."""
    launcher = Procfile(worker_env, tmp_path)
    yield launcher
    launcher.stop_all()


def _services_sh(action: str, env: dict[str, str], timeout: float = 120.0) -> float:
    """Run ``tests/services.sh ACTION``; return its duration, fail the test with its output."""
    start = time.monotonic()
    try:
        result = subprocess.run(
            ["bash", str(SERVICES_SH), *action.split()],
            cwd=REPO,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"tests/services.sh {action} took more than {timeout}s", pytrace=False)
    if result.returncode != 0:
        pytest.fail(
            f"tests/services.sh {action} failed ({result.returncode}):\n{result.stderr}",
            pytrace=False,
        )
    return time.monotonic() - start


class PostgresServer:
    """The PostgreSQL cluster tests/services.sh started: restart it, read its log."""

    def __init__(self, data: str, log: Path, port: str):
        self.data, self.log_path, self.port = data, log, port

    def restart(self) -> float:
        """``pg_ctl restart -m fast`` (as the postgres user when root); returns seconds.

        The server drops every connection, this process's too: it is closed here, so
        Django opens a fresh one on the next query.
        """
        seconds = _services_sh(
            "pg-restart",
            {
                "MAILER_TEST_PG_DATA": self.data,
                "MAILER_TEST_PG_LOG": str(self.log_path),
                "MAILER_TEST_PG_PORT": self.port,
            },
        )
        connection.close()
        return seconds

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")


@pytest.fixture
def postgres_server(test_database_url, django_db_blocker) -> PostgresServer:
    """The test cluster; fails (never skips) unless tests/services.sh started it."""
    data, log = os.environ.get("MAILER_TEST_PG_DATA"), os.environ.get("MAILER_TEST_PG_LOG")
    if not data or not log:
        pytest.fail(
            "MAILER_TEST_PG_DATA / MAILER_TEST_PG_LOG are not set: PostgreSQL was not started "
            "by tests/services.sh, so this test cannot restart it or read its log. Run "
            "`bash tests/services.sh run -- pytest …` with no PostgreSQL already on the port.",
            pytrace=False,
        )
    if not Path(log).is_file():
        pytest.fail(f"PostgreSQL's log {log} does not exist", pytrace=False)
    with django_db_blocker.unblock():
        port = str(connection.settings_dict["PORT"])
    return PostgresServer(data, Path(log), port)


class RedisServer:
    """The Redis tests/services.sh started, stopped and started again on the same port."""

    def __init__(self, url: str):
        self.url = url
        self.port = str(urlsplit(url).port or 6379)
        self.stopped = False

    def _env(self) -> dict[str, str]:
        return {"MAILER_TEST_REDIS_PORT": self.port}

    def stop(self, *, keep_data: bool = True) -> float:
        """Stop the server; by default after a snapshot, so its queues come back."""
        seconds = _services_sh("redis-stop" + ("" if keep_data else " --nosave"), self._env())
        self.stopped = True
        return seconds

    def start(self) -> float:
        seconds = _services_sh("redis-start", self._env())
        self.stopped = False
        return seconds


@pytest.fixture
def redis_server(broker, redis_url):
    """Started again at teardown if a test left it stopped (before ``broker`` empties it)."""
    server = RedisServer(redis_url)
    yield server
    if server.stopped:
        server.start()


_FAULT_FIGURES: list[tuple[str, dict]] = []


@pytest.fixture
def fault_figures(request, record_property):
    """A dict the test fills with its figures (lost, duplicated, seconds…): recorded as
    properties, printed, and listed again in the terminal summary, pass or fail."""
    figures: dict[str, object] = {}
    yield figures
    if figures:
        for name, value in figures.items():
            record_property(name, value)
        _FAULT_FIGURES.append((request.node.nodeid, figures))
        line = ", ".join(f"{name}={value}" for name, value in figures.items())
        print(f"\nFAULT FIGURES {request.node.name}: {line}")


def pytest_terminal_summary(terminalreporter):
    if _FAULT_FIGURES:
        terminalreporter.section("fault figures")
        for nodeid, figures in _FAULT_FIGURES:
            line = ", ".join(f"{name}={value}" for name, value in figures.items())
            terminalreporter.write_line(f"{nodeid}: {line}")
