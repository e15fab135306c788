"""A bare asyncio HTTP server that answers Postmark's send API, for benchmarks.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) for anymail's Postmark
backend, which posts JSON to ``/email``, ``/email/batch``, ``/email/withTemplate`` and
``/email/batchWithTemplates`` and reads, per message, ``{"To": …, "SubmittedAt": …,
"MessageID": …, "ErrorCode": 0, "Message": "OK"}`` (a list for the batch endpoints). Each
answer goes out ``--latency-ms`` after its request arrived, as from an ESP that far away.
It keeps nothing but counters. Run it in its own process::

    python bench/fake_esp.py --port 0 --latency-ms 100    # prints "READY <port>"
    python bench/fake_esp.py --limit 500                  # 429 + Retry-After: 1 past 500
                                                          # messages in a second

Two extra endpoints serve the benchmark, answered at once::

    GET  /stats  ->  {"calls", "messages", "bytes", "throttled", "connections", "open",
                      "peak_open", "in_flight", "peak_in_flight", "cpu"}
    POST /reset  ->  zeroes the counters (not cpu); peaks restart from what is open now

``cpu`` is this process's user + system CPU time since it started; ``in_flight`` counts
requests received and not yet answered, ``peak_in_flight`` the most at once: the
concurrency a worker reached. From Python, ``FakeEsp`` starts and stops the process and
reads the counters.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HEADERS_END = b"\r\n\r\n"
MAX_HEAD = 16384
SEND_PATHS = {
    b"/email": False,
    b"/email/withTemplate": False,
    b"/email/withTemplate/": False,
    b"/email/batch": True,
    b"/email/batchWithTemplates": True,
}


class Counters:
    __slots__ = (
        "calls",
        "messages",
        "bytes",
        "throttled",
        "connections",
        "open",
        "peak_open",
        "in_flight",
        "peak_in_flight",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def reset(self) -> None:
        self.calls = self.messages = self.bytes = self.throttled = self.connections = 0
        self.peak_open, self.peak_in_flight = self.open, self.in_flight

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {name: getattr(self, name) for name in self.__slots__}
        out["cpu"] = time.process_time()
        return out


COUNTERS = Counters()
LATENCY = 0.0  # seconds before each answer (--latency-ms)
LIMIT = 0  # messages a second before answering 429 (--limit); 0: no limit
_window = [0, 0]  # [the second, messages accepted in it]


def response(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )


def answer_send(path: bytes, body: bytes) -> bytes:
    """What Postmark answers to one send call (or 429 past --limit)."""
    try:
        data = json.loads(body)
    except ValueError:
        return response(b"422 Unprocessable Entity", b'{"ErrorCode":402,"Message":"Bad JSON"}')
    batch = SEND_PATHS[path]
    if batch:
        messages = data.get("Messages", []) if isinstance(data, dict) else data
    else:
        messages = [data]
    if LIMIT:
        second = int(time.monotonic())
        if _window[0] != second:
            _window[:] = [second, 0]
        if _window[1] + len(messages) > LIMIT:
            COUNTERS.throttled += 1
            return response(
                b"429 Too Many Requests",
                b'{"ErrorCode":429,"Message":"Rate limit exceeded"}',
                b"Retry-After: 1\r\n",
            )
        _window[1] += len(messages)
    COUNTERS.messages += len(messages)
    submitted = datetime.now(UTC).isoformat()
    answers = [
        {
            "To": message.get("To", "") if isinstance(message, dict) else "",
            "SubmittedAt": submitted,
            "MessageID": str(uuid.uuid4()),
            "ErrorCode": 0,
            "Message": "OK",
        }
        for message in messages
    ]
    return response(b"200 OK", json.dumps(answers if batch else answers[0]).encode())


class EspProtocol(asyncio.Protocol):
    """One keep-alive connection: a request head, its body, the answer LATENCY later."""

    __slots__ = ("transport", "buffer", "pending", "timer")

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""
        self.pending: deque[tuple[float, bytes]] = deque()  # answers waiting, in order
        self.timer: asyncio.TimerHandle | None = None
        COUNTERS.connections += 1
        COUNTERS.open += 1
        COUNTERS.peak_open = max(COUNTERS.peak_open, COUNTERS.open)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            head_end = self.buffer.find(HEADERS_END)
            if head_end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.transport.close()
                return
            head = self.buffer[:head_end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body, self.buffer = self.buffer[head_end + 4 : end], self.buffer[end:]
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            self.request(method, path, body)

    def request(self, method: bytes, path: bytes, body: bytes) -> None:
        if path == b"/stats":
            self.transport.write(response(b"200 OK", json.dumps(COUNTERS.as_dict()).encode()))
            return
        if path == b"/reset" and method == b"POST":
            COUNTERS.reset()
            self.transport.write(response(b"200 OK", b"{}"))
            return
        COUNTERS.calls += 1
        COUNTERS.bytes += len(body)
        if path not in SEND_PATHS or method != b"POST":
            answer = response(b"404 Not Found", b'{"ErrorCode":404,"Message":"Not found"}')
        else:
            answer = answer_send(path, body)
        if LATENCY <= 0:
            self.transport.write(answer)
            return
        COUNTERS.in_flight += 1
        COUNTERS.peak_in_flight = max(COUNTERS.peak_in_flight, COUNTERS.in_flight)
        loop = asyncio.get_running_loop()
        self.pending.append((loop.time() + LATENCY, answer))
        if self.timer is None:
            self.timer = loop.call_at(self.pending[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self.pending and self.pending[0][0] <= now:
            _, answer = self.pending.popleft()
            COUNTERS.in_flight -= 1
            if self.transport is not None:
                self.transport.write(answer)
        if self.pending:
            self.timer = loop.call_at(self.pending[0][0], self._flush)

    def connection_lost(self, exc) -> None:
        COUNTERS.open -= 1
        COUNTERS.in_flight -= len(self.pending)
        self.pending.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EspProtocol, host, port, reuse_address=True, backlog=256)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()
    print(
        f"STOPPED calls={COUNTERS.calls} messages={COUNTERS.messages} "
        f"cpu={time.process_time():.3f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    global LATENCY, LIMIT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="answer this much later")
    parser.add_argument("--limit", type=int, default=0, help="messages a second, then 429")
    args = parser.parse_args(argv)
    LATENCY, LIMIT = max(0.0, args.latency_ms) / 1000, max(0, args.limit)
    gc.disable()  # nothing here makes cycles; spare the collector's pauses
    asyncio.run(serve(args.host, args.port))


# --- Controlling a fake ESP process from the benchmark ----------------------------------------


@dataclass
class Stats:
    calls: int
    messages: int
    bytes: int
    throttled: int
    connections: int
    open: int
    peak_open: int
    in_flight: int
    peak_in_flight: int
    cpu: float  # seconds of CPU the process has used since it started


class FakeEsp:
    """A fake ESP in a child process: ``start()``, ``stats()``, ``reset()``, ``stop()``.

    ``url`` is what ``ANYMAIL_POSTMARK_API_URL`` should be.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", latency_ms: float = 0.0, limit=0):
        self.host, self.port, self.latency_ms, self.limit = host, port, latency_ms, limit
        self.process: subprocess.Popen | None = None
        self._control: http.client.HTTPConnection | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> FakeEsp:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--host", self.host]
            + ["--port", str(self.port), "--latency-ms", str(self.latency_ms)]
            + ["--limit", str(self.limit)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C reaches the benchmark, which stops us
        )
        line = self.process.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"fake ESP did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def _call(self, method: str, path: str) -> dict:
        """One call over a kept-alive control connection (opened once, so a reset's counts
        leave it out, as the sink's XSTATS connection)."""
        for attempt in (1, 2):
            if self._control is None:
                self._control = http.client.HTTPConnection(self.host, self.port, timeout=5)
            try:
                self._control.request(method, "/" + path)
                return json.loads(self._control.getresponse().read())
            except (OSError, http.client.HTTPException):
                self._control.close()
                self._control = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def stats(self) -> Stats:
        return Stats(**self._call("GET", "stats"))

    def reset(self) -> None:
        self._call("POST", "reset")

    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=5)
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None

    def __enter__(self) -> FakeEsp:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
