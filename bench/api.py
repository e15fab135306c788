"""HTTP API benchmark: gunicorn (2 workers) in front of PostgreSQL and Redis.

Run it through ``bash tests/services.sh run -- .venv/bin/python bench/api.py`` (or with
DATABASE_URL and CELERY_BROKER_URL exported). It drops and re-creates its own database
(``mailer_bench_api``) and uses Redis DB 6; no Celery worker runs, so accepted mail stays
queued (the API's cost alone is measured). The load generator is this process: threads
with plain http.client, open loop (each request has a scheduled start; latency counts
from it, so a slow server cannot hide its queueing).

Phases:

a. single sends at 200 requests/s: p50, p99 (targets: p99 < 50 ms)
b. single sends at rising rates: the highest rate sustained (≥ 97 % accepted on time,
   every answer 202, p99 < 50 ms); target ≥ 400/s
c. batches of 500 messages, two clients back to back: accepted messages per second
   (target ≥ 5,000/s)
d. /metrics with 1M messages in the table: scrape time (target < 200 ms)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from common import (  # noqa: E402
    bench_env,
    machine_lines,
    migrate,
    percentile,
    recreate_database,
    require_services,
    say,
    setup_django,
    take_lock,
    with_path,
)

PORT = 8931
TOKEN = "bench-metrics-token"  # noqa: S105 - a throwaway benchmark process
P99_TARGET_MS = 50.0


def start_gunicorn(env: dict[str, str], workers: int, threads: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            str(REPO / ".venv/bin/gunicorn"),
            "project.wsgi",
            "--bind",
            f"127.0.0.1:{PORT}",
            "--workers",
            str(workers),
            "--threads",
            str(threads),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            status, _ = request("GET", "/health/live")
            if status == 200:
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("gunicorn did not answer /health/live within 30 s")


def request(method: str, path: str, body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class OpenLoop:
    """``rate`` requests a second for ``seconds``, each started at its scheduled time by
    one of ``threads`` threads; latency runs from the scheduled time."""

    def __init__(self, rate: float, seconds: float, make_body, headers: dict, threads: int = 48):
        self.rate, self.total = rate, int(rate * seconds)
        self.make_body, self.headers, self.threads = make_body, headers, threads
        self.next = 0
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.late = 0

    def run(self) -> OpenLoop:
        self.start = time.perf_counter() + 0.2
        workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        self.wall = time.perf_counter() - self.start
        return self

    def _work(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
        while True:
            with self.lock:
                index = self.next
                self.next += 1
            if index >= self.total:
                conn.close()
                return
            due = self.start + index / self.rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            body = self.make_body(index)
            try:
                conn.request("POST", "/api/v1/messages", body=body, headers=self.headers)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
                status = 0
            latency = time.perf_counter() - due
            with self.lock:
                self.latencies.append(latency)
                self.statuses[status] = self.statuses.get(status, 0) + 1

    @property
    def accepted(self) -> int:
        return self.statuses.get(202, 0)

    def p(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000


def single_body(run: str):
    def make(index: int) -> bytes:
        return json.dumps(
            {
                "to": f"user{index}.{run}@example.com",
                "template": "welcome",
                "context": {"user_name": f"User {index}", "login_url": "https://example.com/"},
                "metadata": {"user_id": index},
            }
        ).encode()

    return make


def batch_phase(headers: dict, seconds: float, clients: int = 2, size: int = 500) -> dict:
    done = {"messages": 0, "batches": 0, "errors": 0, "latencies": []}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))

    def client() -> None:
        while time.perf_counter() < stop_at:
            with lock:
                n = next(counter)
            items = [
                {
                    "to": f"b{n}.{i}@example.com",
                    "template": "welcome",
                    "context": {"user_name": "Ada", "login_url": "https://example.com/"},
                }
                for i in range(size)
            ]
            started = time.perf_counter()
            status, body = request(
                "POST", "/api/v1/messages/batch", json.dumps({"messages": items}).encode(), headers
            )
            took = time.perf_counter() - started
            with lock:
                if status == 202:
                    done["messages"] += json.loads(body)["accepted"]
                    done["batches"] += 1
                    done["latencies"].append(took)
                else:
                    done["errors"] += 1

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done["wall"] = time.perf_counter() - began
    return done


def fill_million(db_url: str, rows: int) -> float:
    """``rows`` messages straight into the table (a mix of kinds and statuses)."""
    import psycopg

    started = time.monotonic()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO mailer_message (
                uuid, kind, status, to_email, template_slug, language, context, metadata,
                subject, attempts, last_error, provider_message_id, created_at, queued_at,
                sent_at, updated_at)
            SELECT md5(g::text || 'x')::uuid,
                   CASE WHEN g %% 10 < 8 THEN 'campaign' ELSE 'transactional' END,
                   CASE WHEN g %% 100 < 60 THEN 'sent' WHEN g %% 100 < 80 THEN 'delivered'
                        WHEN g %% 100 < 90 THEN 'opened' WHEN g %% 100 < 95 THEN 'queued'
                        WHEN g %% 100 < 98 THEN 'failed' ELSE 'bounced' END,
                   'm' || g || '@example.com', 'welcome', 'en', '{}', '{}', 'Hi', 1, '', '',
                   now() - (g || ' seconds')::interval, now() - (g || ' seconds')::interval,
                   now(), now()
            FROM generate_series(1, %s) AS g
            """,
            [rows],
        )
        conn.execute("VACUUM ANALYZE mailer_message")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1, help="gunicorn threads a worker (>1: gthread)"
    )
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rates", default="300,400,500,600,800")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db-name", default="mailer_bench_api")
    args = parser.parse_args()

    db_url, broker = require_services("api.py")
    lock = take_lock(db_url, "mailer-bench-api", timeout=600)
    bench_db = with_path(db_url, f"/{args.db_name}")
    redis_url = with_path(broker, "/6")
    env = bench_env(
        bench_db,
        redis_url,
        MAILER_REDIS_URL=redis_url,
        WEB_CONCURRENCY=str(args.workers),
        CONN_MAX_AGE="600",
        MAILER_METRICS_TOKEN=TOKEN,
    )
    say("mailer HTTP API benchmark")
    for line in machine_lines():
        say(line)
    recreate_database(db_url, args.db_name)
    migrate(env)
    setup_django(env)

    import redis

    from mailer import apikeys

    redis.Redis.from_url(redis_url).flushdb()
    _, key = apikeys.create("bench", scopes=["send", "read"], rate_limit="1000000/s")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    gunicorn = start_gunicorn(env, args.workers, args.threads)
    say(f"  gunicorn  {args.workers} workers × {args.threads} thread(s)")
    results: list[str] = []
    try:
        OpenLoop(100, 3, single_body("warm"), headers).run()

        base = OpenLoop(200, args.seconds, single_body("r200"), headers).run()
        line = (
            f"a. single sends at 200/s: p50 {base.p(0.5):.1f} ms, p99 {base.p(0.99):.1f} ms, "
            f"{base.accepted}/{base.total} accepted (202), statuses {base.statuses}"
        )
        say(line)
        results.append(line)

        best = 0.0
        for rate in [float(r) for r in args.rates.split(",")]:
            run = OpenLoop(rate, args.seconds, single_body(f"r{int(rate)}"), headers).run()
            achieved = run.accepted / run.wall
            ok = (
                run.accepted == run.total
                and achieved >= rate * 0.97
                and run.p(0.99) < P99_TARGET_MS
            )
            say(
                f"   {rate:.0f}/s: achieved {achieved:.0f}/s, p50 {run.p(0.5):.1f} ms, "
                f"p99 {run.p(0.99):.1f} ms, statuses {run.statuses} "
                f"{'sustained' if ok else 'NOT sustained'}"
            )
            if ok:
                best = rate
            else:
                break
        line = f"b. highest sustained single-send rate: {best:.0f}/s (target ≥ 400/s, p99 < 50 ms)"
        say(line)
        results.append(line)

        batch = batch_phase(headers, args.seconds)
        rate = batch["messages"] / batch["wall"]
        line = (
            f"c. batches of 500, 2 clients: {rate:,.0f} accepted messages/s (target ≥ 5,000/s), "
            f"{batch['batches']} batches, p50 {percentile(batch['latencies'], 0.5) * 1000:.0f} ms "
            f"a batch, {batch['errors']} errors"
        )
        say(line)
        results.append(line)

        filled = fill_million(bench_db, args.rows)
        say(f"   {args.rows:,} messages inserted and analyzed in {filled:.1f} s")
        times = []
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for _ in range(12):
            started = time.perf_counter()
            status, body = request("GET", "/metrics", headers=auth)
            times.append(time.perf_counter() - started)
            if status != 200:
                raise SystemExit(f"/metrics answered {status}: {body[:200]!r}")
        times = times[2:]  # the first scrapes warm the cache
        line = (
            f"d. /metrics with {args.rows:,} + sent messages: median "
            f"{percentile(times, 0.5) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms "
            f"(target < 200 ms)"
        )
        say(line)
        results.append(line)
    finally:
        os.killpg(gunicorn.pid, 15)
        gunicorn.wait(timeout=30)
        lock.close()
    say()
    say("summary")
    for line in results:
        say("  " + line)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    say(f"  load avg after: {load}")


if __name__ == "__main__":
    main()
