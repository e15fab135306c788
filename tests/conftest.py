"""Shared fixtures: a real SMTP server, real Celery worker processes, Redis, PostgreSQL.

Run through ``make test``, which starts PostgreSQL and Redis and exports DATABASE_URL and
CELERY_BROKER_URL. Integration fixtures fail (never skip) when a service is missing.
"""

from __future__ import annotations

import email
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from email import policy
from pathlib import Path

import pytest
import redis
from aiosmtpd.controller import Controller
from django.db import connection

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


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, message: str = ""):
    """Poll until predicate() is truthy; fail with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(message or f"condition not met within {timeout}s", pytrace=True)
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

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.refuse.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
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
        self.handler.refuse.clear()
        self.start()


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
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", smtp_server.port
    settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
    settings.EMAIL_TIMEOUT = 5
    settings.DEFAULT_FROM_EMAIL = FROM_EMAIL
    settings.MAILER = {**settings.MAILER, "FROM_EMAIL": FROM_EMAIL, "FROM_NAME": FROM_NAME}
    yield smtp_server
    smtp_server.start()


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
