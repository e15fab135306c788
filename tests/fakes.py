"""Slow and failing mail servers for tests of concurrent sending and throttling.

Registered as a pytest plugin by ``tests/conftest.py`` (``pytest_plugins``). Two fixtures:

``slow_smtp``
    A real SMTP server (aiosmtpd in a thread, on 127.0.0.1) that waits ``delay`` seconds
    before every reply (the banner, EHLO, MAIL, RCPT, DATA's 354 and the end of data), can
    answer with a programmed code at a chosen stage (``reply_with``) and can drop the
    connection after the message data arrived, before replying (``drop_after_data``: an
    email in doubt). It records each accepted message as ``tests.conftest.Received`` (so
    ``tally()`` works on it), each dropped one, and the connections open at once.

``fake_esp``
    A local HTTP server that answers Postmark's send API (``/email``, ``/email/batch``,
    ``/email/withTemplate``, ``/email/batchWithTemplates``) as anymail's Postmark backend
    expects, after ``latency`` seconds; can answer 429 with ``Retry-After`` (``throttle``)
    or a 5xx (``fail``), refuses inactive recipients (``inactive``: Postmark's 406); records
    every call and every recipient, and the requests in flight at once.

Both fixtures point this process's Django at the server, as the ``smtp`` fixture does.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import getaddresses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from tests.conftest import FROM_EMAIL, FROM_NAME, Received, free_port, send_through_smtp

STAGES = ("CONNECT", "MAIL", "RCPT", "DATA")
_DROP = "__drop the connection__"  # a handler's answer that SlowSMTPSession never writes


@dataclass
class Programmed:
    """A reply to give instead of the normal one, ``times`` more times."""

    reply: str
    times: int


# --- SMTP ---------------------------------------------------------------------------------


class SlowHandler:
    """aiosmtpd hooks: accept and record, unless a reply or a drop is programmed."""

    def __init__(self, server: SlowSMTP):
        self.server = server

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        programmed = self.server._take("MAIL")
        if programmed:
            return programmed
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        programmed = self.server._take("RCPT")
        if programmed:
            return programmed
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        received = Received(
            time.monotonic(), envelope.mail_from, list(envelope.rcpt_tos), envelope.content
        )
        programmed = self.server._take("DATA")
        if programmed == _DROP:
            self.server._record(received, dropped=True)
            return _DROP
        if programmed:
            return programmed
        self.server._record(received)
        return "250 Message accepted for delivery"


class SlowSMTPSession(SMTP):
    """One connection: every reply waits ``server.delay``; 421 closes, as RFC 5321 says."""

    def __init__(self, handler: SlowHandler, **kwargs):
        super().__init__(handler, **kwargs)
        self.slow = handler.server
        self.greeted = False

    def connection_made(self, transport) -> None:
        self.slow._opened()
        super().connection_made(transport)

    def connection_lost(self, error) -> None:
        self.slow._closed()
        super().connection_lost(error)

    async def push(self, status) -> None:
        text = status.decode() if isinstance(status, bytes) else status
        if not self.greeted:
            self.greeted = True
            text = self.slow._take("CONNECT") or text
        if text == _DROP:  # the data arrived; go away without a word
            self.transport.close()
            return
        if text[3:4] != "-" and self.slow.delay > 0:  # one wait per reply, not per line
            await asyncio.sleep(self.slow.delay)
        await super().push(text)
        if text.startswith("421"):
            self.transport.close()


class SlowController(Controller):
    def __init__(self, server: SlowSMTP, port: int):
        super().__init__(SlowHandler(server), hostname="127.0.0.1", port=port)

    def factory(self) -> SMTP:
        return SlowSMTPSession(self.handler, **self.SMTP_kwargs)


class SlowSMTP:
    """The server behind ``slow_smtp``: settings are attributes, read at each reply."""

    def __init__(self):
        self.port = free_port()
        self.delay = 0.0  # seconds before every reply
        self.lock = threading.Lock()
        self.controller: SlowController | None = None
        self._program: dict[str, deque[Programmed]] = {stage: deque() for stage in STAGES}
        self._messages: list[Received] = []
        self._dropped: list[Received] = []
        self.connections = 0  # opened since the last reset
        self.open_now = 0
        self.max_concurrent = 0  # the most connections open at once since the last reset

    # -- life ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.controller is None:
            self.controller = SlowController(self, self.port)
            self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def reset(self) -> None:
        """No delay, nothing programmed, nothing recorded; counters from the open ones."""
        with self.lock:
            self.delay = 0.0
            for queue in self._program.values():
                queue.clear()
            self._messages.clear()
            self._dropped.clear()
            self.connections = 0
            self.max_concurrent = self.open_now
        self.start()

    # -- programming ----------------------------------------------------------------------

    def reply_with(self, code: int, text: str = "", *, times: int = 1, stage: str = "MAIL"):
        """Answer ``code text`` instead of the normal reply the next ``times`` times ``stage``
        is reached (CONNECT: the banner; MAIL; RCPT: each recipient; DATA: the end of the
        data, after it was received). A 421 closes the connection after the reply."""
        stage = stage.upper()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
        reply = f"{code} {text}".rstrip()
        with self.lock:
            self._program[stage].append(Programmed(reply, times))

    def drop_after_data(self, *, times: int = 1) -> None:
        """Close the next ``times`` connections that send a message, after the data and
        before the reply: the client cannot know whether the email was taken."""
        with self.lock:
            self._program["DATA"].append(Programmed(_DROP, times))

    def _take(self, stage: str) -> str | None:
        with self.lock:
            queue = self._program[stage]
            if not queue:
                return None
            head = queue[0]
            head.times -= 1
            if head.times <= 0:
                queue.popleft()
            return head.reply

    # -- recording ------------------------------------------------------------------------

    def _record(self, received: Received, *, dropped: bool = False) -> None:
        with self.lock:
            (self._dropped if dropped else self._messages).append(received)

    def _opened(self) -> None:
        with self.lock:
            self.connections += 1
            self.open_now += 1
            self.max_concurrent = max(self.max_concurrent, self.open_now)

    def _closed(self) -> None:
        with self.lock:
            self.open_now -= 1

    @property
    def messages(self) -> list[Received]:
        """Accepted messages, in order of acceptance (``tally()`` reads this)."""
        with self.lock:
            return list(self._messages)

    @property
    def dropped(self) -> list[Received]:
        """Messages whose data arrived on a connection dropped before the reply."""
        with self.lock:
            return list(self._dropped)

    def to(self, address: str) -> list[Received]:
        return [m for m in self.messages if address.lower() in (r.lower() for r in m.rcpt_tos)]

    def worker_env(self) -> dict[str, str]:
        """What a worker process needs to send here: ``start_worker(..., **env)``."""
        return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.port), "SMTP_SECURITY": "none"}

    @property
    def accepted_at(self) -> list[float]:
        """``time.monotonic()`` of each acceptance, in order."""
        return [m.at for m in self.messages]

    def rate(self) -> float:
        """Messages per second between the first and the last acceptance."""
        times = self.accepted_at
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def per_second(self) -> list[int]:
        """Acceptances in each whole second from the first one on."""
        times = self.accepted_at
        if not times:
            return []
        counts = Counter(int(t - times[0]) for t in times)
        return [counts.get(second, 0) for second in range(max(counts) + 1)]


@pytest.fixture(scope="session")
def slow_smtp_server():
    server = SlowSMTP()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def slow_smtp(slow_smtp_server, settings):
    """The slow SMTP server, reset (no delay, nothing programmed), with Django sending to it.

    ``slow_smtp.delay = 0.010``; ``slow_smtp.reply_with(421, "4.7.0 Try again later",
    times=3, stage="MAIL")``; ``slow_smtp.drop_after_data()``; then ``.messages``,
    ``.dropped``, ``.max_concurrent``, ``.connections``, ``.rate()``, ``.per_second()``.
    """
    slow_smtp_server.reset()
    send_through_smtp(settings, slow_smtp_server.port)
    yield slow_smtp_server
    slow_smtp_server.reset()


# --- Postmark-like HTTP API -----------------------------------------------------------------

POSTMARK_ENDPOINTS = {
    "/email": "single",
    "/email/withTemplate": "single",
    "/email/batch": "batch",
    "/email/batchWithTemplates": "batch",
}


@dataclass
class EspCall:
    """One request the fake ESP received, and what it answered."""

    at: float  # time.monotonic() when the request arrived
    path: str
    headers: dict[str, str]
    body: object  # the JSON it carried
    status: int = 0
    recipients: list[str] = field(default_factory=list)  # To addresses it accepted
    refused: list[str] = field(default_factory=list)  # To addresses it refused (inactive)

    @property
    def messages(self) -> list[dict]:
        """The messages of the call: one for /email, each of a batch's."""
        if isinstance(self.body, list):
            return self.body
        if isinstance(self.body, dict) and isinstance(self.body.get("Messages"), list):
            return self.body["Messages"]
        return [self.body] if isinstance(self.body, dict) else []


class _EspRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as requests' Session uses it
    server: _EspHTTPServer

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass

    def setup(self) -> None:
        super().setup()
        self.server.fake._connected()

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        call = EspCall(time.monotonic(), path, dict(self.headers.items()), body)
        if fake._dropping():
            # The connection dies before Postmark took the call: nothing is accepted.
            call.status = -1
            with fake.lock:
                fake._calls.append(call)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        fake._begin()
        try:
            if fake.latency > 0:
                time.sleep(fake.latency)
            status, payload, headers = fake._answer(call)
        finally:
            fake._end(call, status)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        try:
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client is gone (a killed worker): it was accepted all the same
            self.close_connection = True


class _EspHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeESP


class FakeESP:
    """The server behind ``fake_esp``: settings are attributes, read at each request."""

    token = "test"  # the X-Postmark-Server-Token it expects

    def __init__(self):
        self.latency = 0.0  # seconds before every answer
        self.lock = threading.Lock()
        self.httpd = _EspHTTPServer(("127.0.0.1", 0), _EspRequestHandler)
        self.httpd.fake = self
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.thread: threading.Thread | None = None
        self._program: deque[tuple[int, dict, dict, list[int]]] = deque()
        self._inactive: set[str] = set()
        self._drops = 0
        self._calls: list[EspCall] = []
        self.connections = 0
        self.in_flight = 0
        self.max_concurrent = 0  # the most requests in flight at once since the last reset

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(
                target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join(timeout=5)
            self.thread = None
        self.httpd.server_close()

    def reset(self) -> None:
        with self.lock:
            self.latency = 0.0
            self._program.clear()
            self._inactive.clear()
            self._drops = 0
            self._calls.clear()
            self.connections = 0
            self.max_concurrent = self.in_flight

    # -- programming ----------------------------------------------------------------------

    def throttle(self, *, times: int = 1, retry_after: float | None = 2) -> None:
        """Answer the next ``times`` calls with 429 and ``Retry-After: retry_after``."""
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        body = {"ErrorCode": 429, "Message": "Rate limit exceeded"}
        with self.lock:
            self._program.append((429, body, headers, [times]))

    def fail(self, status: int = 500, *, times: int = 1, retry_after: float | None = None):
        """Answer the next ``times`` calls with ``status`` (a 5xx: Postmark is down)."""
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        body = {"ErrorCode": status, "Message": "Internal Server Error"}
        with self.lock:
            self._program.append((status, body, headers, [times]))

    def drop(self, *, times: int = 1) -> None:
        """Close the connection of the next ``times`` calls without answering them, before
        anything is accepted (a connection that dies mid-call)."""
        with self.lock:
            self._drops += times

    def _dropping(self) -> bool:
        with self.lock:
            if self._drops <= 0:
                return False
            self._drops -= 1
            return True

    def inactive(self, *addresses: str) -> None:
        """Refuse these recipients as Postmark refuses an address that bounced hard or
        complained (ErrorCode 406; HTTP 422 for /email, an entry of a batch's 200)."""
        with self.lock:
            self._inactive.update(a.lower() for a in addresses)

    def _answer(self, call: EspCall) -> tuple[int, object, dict[str, str]]:
        with self.lock:
            if self._program:
                status, body, headers, left = self._program[0]
                left[0] -= 1
                if left[0] <= 0:
                    self._program.popleft()
                return status, body, headers
        kind = POSTMARK_ENDPOINTS.get(call.path)
        if kind is None:
            return 404, {"ErrorCode": 404, "Message": f"No such endpoint {call.path}"}, {}
        if call.headers.get("X-Postmark-Server-Token") != self.token:
            return 401, {"ErrorCode": 10, "Message": "Bad or missing Server API token"}, {}
        answers = []
        with self.lock:
            inactive = set(self._inactive)
        for message in call.messages:
            to = message.get("To", "") if isinstance(message, dict) else ""
            addresses = [address for _, address in getaddresses([to]) if address]
            refused = [a.lower() for a in addresses if a.lower() in inactive]
            if refused:
                call.refused += refused
                answers.append(
                    {
                        "ErrorCode": 406,
                        "Message": "You tried to send to a recipient that has been marked as "
                        f"inactive.\n Found inactive addresses: {', '.join(refused)}.\n "
                        "Inactive recipients are ones that have generated a hard bounce or a "
                        "spam complaint. ",
                    }
                )
                continue
            call.recipients += addresses
            answers.append(
                {
                    "To": to,
                    "SubmittedAt": datetime.now(UTC).isoformat(),
                    "MessageID": str(uuid.uuid4()),
                    "ErrorCode": 0,
                    "Message": "OK",
                }
            )
        if kind == "single":
            if len(answers) != 1:
                return 422, {"ErrorCode": 402, "Message": "Invalid JSON"}, {}
            return (422 if answers[0]["ErrorCode"] else 200), answers[0], {}
        return 200, answers, {}

    # -- recording ------------------------------------------------------------------------

    def _connected(self) -> None:
        with self.lock:
            self.connections += 1

    def _begin(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_concurrent = max(self.max_concurrent, self.in_flight)

    def _end(self, call: EspCall, status: int) -> None:
        call.status = status
        with self.lock:
            self.in_flight -= 1
            self._calls.append(call)

    @property
    def calls(self) -> list[EspCall]:
        """Every request, in the order they were answered."""
        with self.lock:
            return list(self._calls)

    @property
    def recipients(self) -> list[str]:
        """The To address of every message accepted, duplicates included."""
        return [r for call in self.calls for r in call.recipients]

    def worker_env(self) -> dict[str, str]:
        """What a worker process needs to send here: ``start_worker(..., **env)``.

        SMTP_HOST is emptied: in project/settings.py it wins over MAILER_ESP."""
        return {
            "SMTP_HOST": "",
            "MAILER_ESP": "postmark",
            "ANYMAIL_POSTMARK_SERVER_TOKEN": self.token,
            "ANYMAIL_POSTMARK_API_URL": self.url,
        }

    def to(self, address: str) -> list[EspCall]:
        return [c for c in self.calls if address.lower() in (r.lower() for r in c.recipients)]


@pytest.fixture(scope="session")
def fake_esp_server():
    server = FakeESP()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake_esp(fake_esp_server, settings):
    """The fake Postmark API, reset, with Django's EMAIL_BACKEND anymail's Postmark backend.

    ``fake_esp.latency = 0.1``; ``fake_esp.throttle(times=2, retry_after=2)``;
    ``fake_esp.fail(503, times=1)``; ``fake_esp.drop(times=1)``;
    ``fake_esp.inactive("bounced@example.com")``; then
    ``.calls``, ``.recipients``, ``.max_concurrent``, ``.connections``.
    """
    fake_esp_server.reset()
    settings.EMAIL_BACKEND = "anymail.backends.postmark.EmailBackend"
    settings.ANYMAIL = {
        **getattr(settings, "ANYMAIL", {}),
        "POSTMARK_SERVER_TOKEN": FakeESP.token,
        "POSTMARK_API_URL": fake_esp_server.url,
    }
    settings.DEFAULT_FROM_EMAIL = FROM_EMAIL
    settings.MAILER = {**settings.MAILER, "FROM_EMAIL": FROM_EMAIL, "FROM_NAME": FROM_NAME}
    yield fake_esp_server
    fake_esp_server.reset()
