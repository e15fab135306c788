"""Helpers shared by the campaign and webhook benchmarks, on top of transactional.py's.

transactional.py stays the home of the CPU accounting, the worker process, database
creation and migration; this module re-exports those and adds what the newer scripts
need besides: a worker for any queue, a lock per script, the benchmark environment as a
function, and peak memory (RSS) readings from /proc.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "bench") not in sys.path:
    sys.path[:0] = [str(REPO), str(REPO / "bench")]

from transactional import (  # noqa: E402
    NPROC,
    CpuSnapshot,
    Interrupted,
    Timers,
    Worker,
    _on_sigterm,
    cpu_delta,
    cpu_snapshot,
    migrate,
    percentile,
    recreate_database,
    say,
    steady_rate,
    with_path,
)

__all__ = [
    "NPROC",
    "REPO",
    "CpuSnapshot",
    "Interrupted",
    "QueueWorker",
    "Timers",
    "bench_env",
    "cpu_delta",
    "cpu_snapshot",
    "lock_is_held",
    "machine_lines",
    "migrate",
    "on_sigterm",
    "percentile",
    "process_tree_hwm",
    "recreate_database",
    "require_services",
    "say",
    "self_peak_mb",
    "session_pids",
    "setup_django",
    "steady_rate",
    "take_lock",
    "vm_status",
    "with_path",
]

on_sigterm = _on_sigterm


def require_services(script: str) -> tuple[str, str]:
    """DATABASE_URL (PostgreSQL) and CELERY_BROKER_URL (Redis), or exit saying how."""
    database = os.environ.get("DATABASE_URL", "")
    broker = os.environ.get("CELERY_BROKER_URL", "")
    if not database.startswith("postgres") or not broker.startswith("redis://"):
        raise SystemExit(
            "DATABASE_URL (PostgreSQL) and CELERY_BROKER_URL (Redis) must be set: run "
            f"`bash tests/services.sh run -- .venv/bin/python bench/{script}`, or "
            '`eval "$(bash tests/services.sh start)"` first.'
        )
    return database, broker


def take_lock(admin_url: str, key: str, timeout: float):
    """A session advisory lock named ``key`` on the server, held until the connection closes.

    Two runs of one script would drop each other's database; runs of different scripts
    use different databases and Redis DBs, so each script has its own key.
    """
    import psycopg

    conn = psycopg.connect(with_path(admin_url, "/postgres"), autocommit=True)
    deadline, told = time.monotonic() + timeout, False
    while not conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [key]).fetchone()[0]:
        if time.monotonic() > deadline:
            conn.close()
            raise SystemExit(f"another run held the lock {key!r} for {timeout:.0f} s; gave up")
        if not told:
            say(f"  another run holds {key!r} on this server: waiting for it")
            told = True
        time.sleep(1)
    return conn


def lock_is_held(conn, key: str) -> bool:
    """Whether someone else holds ``key`` (e.g. transactional.py's 'mailer-bench')."""
    if conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [key]).fetchone()[0]:
        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", [key])
        return False
    return True


def bench_env(db_url: str, redis_url: str, *, smtp_port: int = 25, **extra: str) -> dict[str, str]:
    """The environment of every benchmark process: as transactional.py's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILER_", "PYTEST"))}
    env.update(
        DJANGO_SETTINGS_MODULE="project.settings",
        DATABASE_URL=db_url,
        CELERY_BROKER_URL=redis_url,
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(smtp_port),
        SMTP_SECURITY="none",
        SMTP_FROM_EMAIL="noreply@bench.test",
        SMTP_FROM_NAME="Mailer Bench",
        DEBUG="0",
        SECRET_KEY="bench",  # noqa: S106 - a throwaway benchmark process
        # DEBUG=0 makes mailer's checks insist on a webhook secret (mailer.E007).
        ANYMAIL_WEBHOOK_SECRET="bench:bench-only-webhook-secret",  # noqa: S106
        # django.test.Client talks to "testserver".
        ALLOWED_HOSTS="localhost,127.0.0.1,testserver",
        MAILER_LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def setup_django(env: dict[str, str]) -> None:
    """Make this process's environment ``env`` and set Django up with it."""
    os.environ.clear()
    os.environ.update(env)
    import django

    django.setup()


class QueueWorker(Worker):
    """transactional.py's ``celery worker -c 1`` process, for any queue."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, queue: str):
        super().__init__(name, env, log_dir)
        self.queue = queue

    def launch(self) -> QueueWorker:
        log = open(self.log_path, "wb")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "project", "worker", "-Q", self.queue]
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


# --- Memory --------------------------------------------------------------------------------


def vm_status(pid: int | str) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MB; empty if it is gone."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def session_pids(session: int) -> list[int]:
    """Every live process of a session (a worker's main process and its pool child)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = Path(f"/proc/{entry}/stat").read_text()
            if int(raw[raw.rindex(")") + 2 :].split()[3]) == session:
                pids.append(int(entry))
    return sorted(pids)


def process_tree_hwm(session: int) -> list[tuple[int, float]]:
    """(pid, peak RSS MB) of each process of a session, session leader first."""
    return [(pid, vm_status(pid).get("VmHWM", 0.0)) for pid in session_pids(session)]


def self_peak_mb() -> float:
    """This process's peak RSS so far (ru_maxrss is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- Output ------------------------------------------------------------------------------


def machine_lines() -> list[str]:
    import celery
    import django

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"  machine   {NPROC} CPUs ({model}), {platform.system()} {platform.release()}",
        f"  python    {platform.python_version()} ({sys.executable})",
        f"  versions  Django {django.get_version()}, Celery {celery.__version__}",
        f"  load avg  {load} (before the run)",
    ]
