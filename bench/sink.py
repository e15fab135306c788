"""A bare asyncio SMTP responder for benchmarks: accepts everything, keeps nothing.

It speaks just enough SMTP for smtplib and Django's SMTP backend (greeting, EHLO/HELO,
MAIL, RCPT, DATA, RSET, NOOP, QUIT) and counts the messages and bytes it received.
It does no parsing beyond finding the end of each command and of each message, so it
costs far less per message than aiosmtpd (about 0.1 ms of CPU for a 10 KB message).

Run it in its own process so it never competes for the benchmark's GIL::

    python bench/sink.py --port 0          # prints "READY <port>" once listening
    python bench/sink.py --delay-ms 10     # every reply 10 ms late: a relay 10 ms away

Two extra commands, on any connection, serve the benchmark (one line reply each)::

    XSTATS   ->  250 messages=<n> bytes=<n> connections=<n> cpu=<seconds> open=<n> peak=<n>
    XRESET   ->  250 reset          (zeroes messages, bytes, connections; not cpu)

``cpu`` is this process's user + system CPU time since it started; ``open`` is the
connections open now (the asking one included), ``peak`` the most open at once since the
start or the last XRESET. With ``--delay-ms N`` every reply (the greeting too) is written
N ms after the command that it answers arrived, in order, so a client that waits for each
reply, as smtplib does, sees a server N ms away; a connection that has sent XSTATS or XRESET
gets its replies at once. From Python, ``Sink`` starts and stops the process and reads the
counters.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

END = b"\r\n.\r\n"
MAX_LINE = 4096  # a command line longer than this is an error (RFC 5321 allows 512)

EHLO_REPLY = (
    b"250-sink.bench Hello\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250 HELP\r\n"
)
REPLIES = {
    b"HELO": b"250 sink.bench\r\n",
    b"MAIL": b"250 OK\r\n",
    b"RCPT": b"250 OK\r\n",
    b"RSET": b"250 OK\r\n",
    b"NOOP": b"250 OK\r\n",
    b"VRFY": b"252 Cannot VRFY user\r\n",
}


class Counters:
    __slots__ = ("messages", "bytes", "connections", "open", "peak")

    def __init__(self) -> None:
        self.messages = self.bytes = self.connections = self.open = self.peak = 0


COUNTERS = Counters()
DELAY = 0.0  # seconds before each reply goes out (--delay-ms)


class SinkProtocol(asyncio.Protocol):
    """One SMTP session: command lines until DATA, then raw bytes until CRLF.CRLF."""

    __slots__ = ("transport", "buffer", "in_data", "tail", "size", "pending", "timer", "control")

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""  # unparsed command bytes
        self.in_data = False
        self.tail = b""  # the last 4 bytes of message data seen, to find END across reads
        self.size = 0
        self.pending: deque[tuple[float, bytes, bool]] = deque()  # delayed replies, in order
        self.timer: asyncio.TimerHandle | None = None
        self.control = False  # a benchmark's XSTATS connection: never delayed
        COUNTERS.connections += 1
        COUNTERS.open += 1
        COUNTERS.peak = max(COUNTERS.peak, COUNTERS.open)
        self._reply(b"220 sink.bench ESMTP ready\r\n")

    def _reply(self, data: bytes, close: bool = False) -> None:
        """Write ``data`` now, or DELAY seconds from now after the replies already waiting."""
        if DELAY <= 0 or (self.control and not self.pending):
            self.transport.write(data)
            if close:
                self.transport.close()
            return
        loop = asyncio.get_running_loop()
        self.pending.append((loop.time() + DELAY, data, close))
        if self.timer is None:
            self.timer = loop.call_at(self.pending[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        if self.transport is None:
            self.pending.clear()
            return
        now = asyncio.get_running_loop().time()
        while self.pending and self.pending[0][0] <= now:
            _, data, close = self.pending.popleft()
            self.transport.write(data)
            if close:
                self.transport.close()
                self.pending.clear()
                return
        if self.pending:
            self.timer = asyncio.get_running_loop().call_at(self.pending[0][0], self._flush)

    def data_received(self, data: bytes) -> None:
        out: list[bytes] = []
        while data:
            if self.in_data:
                data = self._message_data(data, out)
            else:
                data = self._commands(data, out)
                if data is None:
                    break
        if out and self.transport is not None:
            self._reply(b"".join(out) if len(out) > 1 else out[0])

    def _message_data(self, data: bytes, out: list[bytes]) -> bytes:
        """Consume message bytes; return what follows the end of the message, if any."""
        joined = self.tail + data
        end = joined.find(END)
        if end < 0:
            self.size += len(data)
            self.tail = joined[-4:]
            return b""
        # ``joined`` starts with up to 4 bytes already counted in ``self.size``.
        self.size += end + 2 - len(self.tail)  # the message keeps its last CRLF
        COUNTERS.messages += 1
        COUNTERS.bytes += self.size
        self.in_data = False
        out.append(b"250 OK queued\r\n")
        return joined[end + 5 :]

    def _commands(self, data: bytes, out: list[bytes]) -> bytes | None:
        """Answer complete command lines; return bytes after DATA's 354, or None."""
        buffer = self.buffer + data if self.buffer else data
        start = 0
        while True:
            eol = buffer.find(b"\r\n", start)
            if eol < 0:
                rest = buffer[start:]
                if len(rest) > MAX_LINE:
                    out.append(b"500 Line too long\r\n")
                    rest = b""
                self.buffer = rest
                return None
            verb = buffer[start : start + 4].upper()
            start = eol + 2
            reply = REPLIES.get(verb)
            if reply is not None:
                out.append(reply)
            elif verb == b"EHLO":
                out.append(EHLO_REPLY)
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.buffer = b""
                self.in_data = True
                self.tail = b"\r\n"  # the CRLF that ended DATA: an empty message is ".\r\n"
                self.size = 0
                return buffer[start:]
            elif verb == b"QUIT":
                out.append(b"221 Bye\r\n")
                self._reply(b"".join(out), close=True)
                out.clear()
                self.buffer = b""
                return None
            elif verb == b"XSTA":
                self.control = True
                cpu = time.process_time()
                out.append(
                    f"250 messages={COUNTERS.messages} bytes={COUNTERS.bytes} "
                    f"connections={COUNTERS.connections} cpu={cpu:.6f} "
                    f"open={COUNTERS.open} peak={COUNTERS.peak}\r\n".encode()
                )
            elif verb == b"XRES":
                self.control = True
                COUNTERS.messages = COUNTERS.bytes = COUNTERS.connections = 0
                COUNTERS.peak = COUNTERS.open
                out.append(b"250 reset\r\n")
            else:
                out.append(b"502 Command not implemented\r\n")

    def connection_lost(self, exc) -> None:
        COUNTERS.open -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SinkProtocol, host, port, reuse_address=True, backlog=128)
    bound = server.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()
    print(
        f"STOPPED messages={COUNTERS.messages} bytes={COUNTERS.bytes} "
        f"cpu={time.process_time():.3f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="write every reply this much later"
    )
    args = parser.parse_args(argv)
    global DELAY
    DELAY = max(0.0, args.delay_ms) / 1000
    gc.disable()  # nothing here makes cycles; spare the collector's pauses
    asyncio.run(serve(args.host, args.port))


# --- Controlling a sink process from the benchmark ----------------------------------------


@dataclass
class Stats:
    messages: int
    bytes: int
    connections: int
    cpu: float  # seconds of CPU the sink process has used since it started
    open: int = 0  # connections open now, the one that asked included
    peak: int = 0  # the most connections open at once since the start or the last reset


class Sink:
    """A sink in a child process: ``start()``, ``stats()``, ``reset()``, ``stop()``."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", delay_ms: float = 0.0):
        self.host, self.port, self.delay_ms = host, port, delay_ms
        self.process: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._reader = None

    def start(self, timeout: float = 10.0) -> Sink:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--host", self.host]
            + ["--port", str(self.port), "--delay-ms", str(self.delay_ms)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C reaches the benchmark, which stops us
        )
        deadline = time.monotonic() + timeout
        line = self.process.stdout.readline()
        if not line.startswith("READY ") or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"sink did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def _command(self, verb: str) -> str:
        if self._control is None:
            self._control = socket.create_connection((self.host, self.port), timeout=5)
            self._reader = self._control.makefile("rb")
            self._reader.readline()  # greeting
        self._control.sendall(verb.encode() + b"\r\n")
        return self._reader.readline().decode().strip()

    def stats(self) -> Stats:
        reply = self._command("XSTATS")
        fields = dict(item.split("=", 1) for item in reply.split()[1:])
        return Stats(
            messages=int(fields["messages"]),
            bytes=int(fields["bytes"]),
            connections=int(fields["connections"]),
            cpu=float(fields["cpu"]),
            open=int(fields.get("open", 0)),
            peak=int(fields.get("peak", 0)),
        )

    def reset(self) -> None:
        self._command("XRESET")

    def stop(self) -> None:
        if self._control is not None:
            try:
                self._control.close()
            except OSError:
                pass
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

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
