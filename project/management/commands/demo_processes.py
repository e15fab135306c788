"""Run the demo's Procfile processes side by side; Ctrl-C stops them all, quietly.

honcho reads the Procfile and hands out ports; the stop is done here as ``docker stop``
does it, because honcho signals each whole process group and gives up after 5 s: a
Celery worker then finds its pool children killed under it (logged as errors) and is
SIGKILLed while it finishes the email on its wire. Here each main process gets one
SIGTERM (gunicorn, the workers and beat stop their own children), up to ``STOP_WAIT``
seconds, and the command exits 0 when a person stopped it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from honcho.environ import expand_processes, parse_procfile

#: Seconds the processes get to stop (a worker finishes the email on its wire: ~10 s).
STOP_WAIT = 20.0


class Command(BaseCommand):
    help = (
        "Run Procfile processes for the demo (web on 127.0.0.1 unless BIND_ADDRESS says "
        "otherwise); Ctrl-C stops every one of them cleanly."
    )

    def add_arguments(self, parser):
        parser.add_argument("processes", nargs="*", help="Procfile entries (default: all).")
        parser.add_argument("--port", type=int, default=8000, help="The web process's port.")
        parser.add_argument("--procfile", type=Path, default=Path("Procfile"))

    def handle(self, *args, processes: list[str], port: int, procfile: Path, **options):
        entries = parse_procfile(procfile.read_text()).processes
        unknown = [name for name in processes if name not in entries]
        if unknown:
            raise CommandError(f"Not in {procfile}: {', '.join(unknown)}.")
        chosen = {name: entries[name] for name in processes or entries}
        base = {**os.environ, "BIND_ADDRESS": os.environ.get("BIND_ADDRESS", "127.0.0.1")}
        running = [
            _Process(p.name, p.cmd, {**base, **p.env}) for p in expand_processes(chosen, port=port)
        ]
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        width = max(len(p.name) for p in running)
        for process in running:
            process.start(width)
        while not stop.is_set() and all(p.alive() for p in running):
            stop.wait(0.2)
        asked = stop.is_set()
        self._stop_all(running)
        if asked:
            _say(width, "stopped, as asked")
            return
        failed = [p.name for p in running if p.returncode]
        raise CommandError(f"{', '.join(failed) or 'a process'} stopped; everything was stopped.")

    def _stop_all(self, running: list[_Process]) -> None:
        for process in running:
            process.terminate()
        deadline = time.monotonic() + STOP_WAIT
        while any(p.alive() for p in running) and time.monotonic() < deadline:
            time.sleep(0.1)
        for process in running:
            if process.alive():
                process.kill()
        for process in running:
            process.wait()


def _say(width: int, text: str, name: str = "system") -> None:
    sys.stdout.write(f"{time.strftime('%H:%M:%S')} {name:<{width}} | {text}\n")
    sys.stdout.flush()


class _Process:
    """One Procfile process in a session of its own (so the terminal's Ctrl-C reaches only
    this command), its output prefixed with its name."""

    def __init__(self, name: str, command: str, env: dict[str, str]):
        self.name, self.command, self.env = name, command, env
        self.popen: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self, width: int) -> None:
        # exec: the shell becomes the process, so its SIGTERM reaches the program itself.
        self.popen = subprocess.Popen(
            ["/bin/sh", "-c", f"exec {self.command}"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=self._relay, args=(width,), daemon=True).start()

    def _relay(self, width: int) -> None:
        for raw in self.popen.stdout:
            _say(width, raw.decode(errors="replace").rstrip("\n"), self.name)

    def alive(self) -> bool:
        if self.popen is None:
            return False
        self.returncode = self.popen.poll()
        return self.returncode is None

    def terminate(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> None:
        self.returncode = self.popen.wait()
