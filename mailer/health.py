"""Health checks for probes: database, broker and Redis reachable; workers and beat alive
(from the heartbeats their processes write every HEARTBEAT_SECONDS)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from celery import current_app
from django.db import DatabaseError, connection
from django.utils import timezone

from . import conf
from .models import Heartbeat
from .ratelimit import redis_client

logger = logging.getLogger(__name__)


@dataclass
class Check:
    ok: bool
    detail: str = ""
    ms: float = 0.0

    def as_dict(self) -> dict:
        return {"ok": self.ok, "detail": self.detail, "ms": round(self.ms, 1)}


def _timed(probe) -> Check:
    started = time.perf_counter()
    try:
        detail = probe() or ""
        ok = True
    except Exception as exc:  # noqa: BLE001 - any failure of a probe is "not ready"
        ok, detail = False, f"{exc.__class__.__name__}: unreachable"
        logger.warning("mailer: health check failed: %s", exc.__class__.__name__)
    return Check(ok, detail, (time.perf_counter() - started) * 1000)


def database() -> Check:
    def probe():
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()

    check = _timed(probe)
    if not check.ok:
        try:
            connection.close()  # a broken connection must not stay in this process
        except DatabaseError:
            pass
    return check


def broker() -> Check:
    def probe():
        with current_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            return conn.transport_cls if isinstance(conn.transport_cls, str) else ""

    return _timed(probe)


def redis_store() -> Check:
    client = redis_client()
    if client is None:
        return Check(True, "not configured")

    def probe():
        client.ping()

    return _timed(probe)


@dataclass
class Processes:
    workers: dict[str, int] = field(default_factory=dict)  # queue → live workers
    beat_seen: str | None = None  # ISO time of beat's last tick
    beat_alive: bool = False

    def as_dict(self) -> dict:
        return {
            "workers": self.workers,
            "beat": {"alive": self.beat_alive, "last_tick": self.beat_seen},
        }


def processes() -> Processes:
    """Live workers per queue and beat's last tick, from their heartbeats."""
    alive_since = timezone.now() - timedelta(seconds=3 * float(conf.get("HEARTBEAT_SECONDS")))
    found = Processes(workers={conf.queue_name(q): 0 for q in ("transactional", "campaign")})
    for kind, queues, seen in Heartbeat.objects.values_list("kind", "queues", "seen_at"):
        if kind == "beat":
            if found.beat_seen is None or seen.isoformat() > found.beat_seen:
                found.beat_seen, found.beat_alive = seen.isoformat(), seen >= alive_since
        elif seen >= alive_since:
            for queue in queues:
                found.workers[queue] = found.workers.get(queue, 0) + 1
    return found


def ready() -> tuple[bool, dict]:
    """Database, broker and Redis reachable (the web can accept mail); workers and beat
    are reported, not required: a web process stays ready while workers restart."""
    checks = {"database": database(), "broker": broker(), "redis": redis_store()}
    ok = all(check.ok for check in checks.values())
    try:
        running = processes().as_dict()
    except DatabaseError:
        running = {}
    body = {"status": "ok" if ok else "unavailable"}
    body["checks"] = {name: check.as_dict() for name, check in checks.items()}
    body.update(running)
    return ok, body


# --- Heartbeats (worker and beat processes) ----------------------------------------------------


def beat(name: str, kind: str, queues: list[str]) -> None:
    """Say this process is alive now."""
    Heartbeat.objects.update_or_create(
        name=name[:200], defaults={"kind": kind, "queues": queues, "seen_at": timezone.now()}
    )


def start_heartbeat(name: str, kind: str, queues: list[str]) -> threading.Thread:
    """A daemon thread that writes this process's heartbeat every HEARTBEAT_SECONDS."""

    def run():
        while True:
            try:
                beat(name, kind, queues)
            except DatabaseError as exc:
                logger.warning("mailer: heartbeat not written (%s)", exc.__class__.__name__)
            finally:
                connection.close()  # this thread's own connection
            time.sleep(float(conf.get("HEARTBEAT_SECONDS")))

    thread = threading.Thread(target=run, name=f"mailer-heartbeat-{kind}", daemon=True)
    thread.start()
    return thread


def stop_heartbeat(name: str) -> None:
    """A process that stops cleanly takes its heartbeat with it."""
    try:
        Heartbeat.objects.filter(name=name[:200]).delete()
    except DatabaseError:
        pass


def beat_name() -> str:
    return f"beat@{socket.gethostname()}"
