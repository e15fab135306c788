"""Drip benchmark: enrollments falling due in the same minute, advanced by beat's tick.

Run it through ``make bench-drips`` (or ``bash tests/services.sh run -- .venv/bin/python
bench/drips.py``), which exports DATABASE_URL and CELERY_BROKER_URL. It drops and
re-creates its own database (``mailer_bench_drips``) for every size and uses Redis DB 7.

Per size (10k and 100k enrollments by default; ``--sizes 10000,100000,200000``):

1. setup       contacts (in several time zones and languages) and one active series —
               send, wait a day, send — with every enrollment due within the last minute,
               all written in SQL
2. one tick    ``drips.advance_due()`` in a child process of its own: steps advanced per
               minute, from due to queued (each makes the step's message), and the
               process's peak RSS (VmHWM) against its RSS before the tick
3. two ticks   the same again (fresh enrollments) with two tick processes at once, as two
               beats or a tick and its hand-over would run: combined steps per minute,
               and that no step was made twice

Targets: ≥ 100,000 steps a minute (80× Mautic's ~1,250 scheduled events a minute), peak
RSS under 150 MB and flat (+20 % at most) from the smallest size to the largest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from common import (  # noqa: E402
    bench_env,
    machine_lines,
    migrate,
    recreate_database,
    require_services,
    say,
    setup_django,
    take_lock,
    vm_status,
    with_path,
)

DB_NAME = "mailer_bench_drips"
REDIS_DB = 7
LOCK_KEY = "mailer-bench-drips"
TARGET_STEPS_PER_MINUTE = 100_000
TARGET_RSS_MB = 150.0
FLAT_GROWTH = 0.20
ZONES = ["", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney", "UTC"]
LANGUAGES = ["en", "en", "fr", "de", ""]
HTML = """<html><body><h1>Hello {{ contact.first_name }}</h1>
<p>Day {{ day }} of your trial.</p>
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> · {{ postal_address }}</p></body></html>"""


# --- Child: one tick (or several batches of one) in a fresh process ---------------------------


def child_main(args: argparse.Namespace) -> int:
    import django

    django.setup()
    from mailer import drips

    base = vm_status("self").get("VmRSS", 0.0)
    cpu0, t0 = time.process_time(), time.perf_counter()
    total = drips.TickResult()
    while True:  # the tick hands over after TICK_SECONDS; run the hand-overs here too
        result = drips.advance_due(seconds=3600)
        total += result
        if not result.more and result.advanced == 0:
            break
    seconds = time.perf_counter() - t0
    print(
        "RESULT "
        + json.dumps(
            {
                "advanced": total.advanced,
                "steps": total.steps,
                "seconds": seconds,
                "cpu": time.process_time() - cpu0,
                "rss_base_mb": base,
                "rss_peak_mb": vm_status("self").get("VmHWM", 0.0),
            }
        ),
        flush=True,
    )
    return 0


# --- Parent -------------------------------------------------------------------------------------


def sql(statement: str, params=None) -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params or ())
        return cursor.rowcount


def setup(size: int) -> int:
    """Contacts, the series, and ``size`` enrollments due in the last minute (SQL only)."""
    from datetime import timedelta

    from django.db.models import Max

    from mailer.models import Contact, DripSeries, DripStep, Template

    t0 = time.perf_counter()
    start = (Contact.objects.aggregate(top=Max("pk"))["top"] or 0) + 1
    zones = "ARRAY[" + ", ".join(f"'{z}'" for z in ZONES) + "]"
    languages = "ARRAY[" + ", ".join(f"'{lang}'" for lang in LANGUAGES) + "]"
    sql(
        f"""
        INSERT INTO mailer_contact (email, name, language, timezone, attributes, consent,
                                    consent_source, created_at, updated_at)
        SELECT 'reader' || g || '@example.com', 'Reader ' || g,
               ({languages})[1 + g %% {len(LANGUAGES)}], ({zones})[1 + g %% {len(ZONES)}],
               '{{}}', 'granted', 'bench', now(), now()
          FROM generate_series(%s, %s) AS g
        """,  # noqa: S608 - constants only
        [start, start + size - 1],
    )
    template, _ = Template.objects.get_or_create(
        slug="trial-day",
        language="en",
        defaults={
            "purpose": "marketing",
            "subject": "Day {{ day }}",
            "html": HTML,
            "variables": "day",
        },
    )
    series, created = DripSeries.objects.get_or_create(
        name="Trial", defaults={"status": "active", "requires_consent": True}
    )
    if created:
        DripStep.objects.create(series=series, position=10, kind="send", template=template)
        DripStep.objects.create(series=series, position=20, kind="wait", delay=timedelta(days=1))
        DripStep.objects.create(series=series, position=30, kind="send", template=template)
    made = sql(
        """
        INSERT INTO mailer_enrollment (series_id, contact_id, state, next_position, next_due_at,
                                       entered_at, updated_at, exit_reason, source, data, note)
        SELECT %s, c.id, 'active', 0, now() - (random() * interval '59 seconds'),
               now() - interval '1 minute', now(), '', 'bench', '{"day": 1}', ''
          FROM mailer_contact c WHERE c.id >= %s AND c.id < %s
        """,
        [series.pk, start, start + size],
    )
    sql("ANALYZE mailer_contact, mailer_enrollment, mailer_message")
    say(f"  setup: {size:,} contacts and enrollments in {time.perf_counter() - t0:.1f} s")
    return made


def run_ticks(env: dict[str, str], processes: int) -> list[dict]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child"]
    children = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    results = []
    for child in children:
        result = None
        for line in child.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
            else:
                say(line.rstrip("\n"))
        code = child.wait()
        child.stdout.close()
        if code or result is None:
            raise RuntimeError(f"a tick process failed (exit code {code})")
        results.append(result)
    return results


def check_once(expected_messages: int) -> tuple[int, int]:
    """Messages made, and (enrollment, step) pairs made more than once (must be 0)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), count(*) - count(DISTINCT (enrollment_id, drip_step_id)) "
            "FROM mailer_message WHERE enrollment_id IS NOT NULL"
        )
        made, twice = cursor.fetchone()
    if made != expected_messages or twice:
        raise SystemExit(f"expected {expected_messages} messages once each; {made}, {twice} twice")
    return made, twice


def run_size(size: int, env: dict[str, str], admin_url: str) -> dict:
    from django.db import connections

    say(f"\n==================== {size:,} enrollments ====================")
    connections.close_all()
    recreate_database(admin_url, DB_NAME)
    say(f"  database re-created and migrated in {migrate(env):.1f} s")
    figures = {}
    for processes in (1, 2):
        setup(size)
        connections.close_all()
        results = run_ticks(env, processes)
        steps = sum(r["steps"] for r in results)
        wall = max(r["seconds"] for r in results)
        per_minute = steps / wall * 60
        peak = max(r["rss_peak_mb"] for r in results)
        base = max(r["rss_base_mb"] for r in results)
        made, twice = check_once(size * processes)
        cpu = sum(r["cpu"] for r in results)
        say(
            f"  {processes} tick process{'es' if processes > 1 else ''}: {steps:,} steps in "
            f"{wall:.1f} s = {per_minute:,.0f} steps/min  (tick CPU {cpu / steps * 1000:.3f} ms "
            f"a step; peak RSS {peak:.0f} MB, {base:.0f} MB before the tick; "
            f"{made:,} messages, {twice} made twice)"
        )
        figures[processes] = {"per_minute": per_minute, "peak": peak, "base": base}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    database, broker = require_services("drips.py")
    db_url = with_path(database, f"/{DB_NAME}")
    redis_url = broker.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    env = bench_env(db_url, redis_url, MAILER_POSTAL_ADDRESS="1 Bench Street")
    lock = take_lock(database, LOCK_KEY, timeout=600)
    sizes = [int(s) for s in args.sizes.split(",")]
    for line in machine_lines():
        say(line)
    setup_django(env)
    summary = {size: run_size(size, env, database) for size in sizes}
    lock.close()

    say("\n==================== summary ====================")
    smallest, largest = summary[sizes[0]], summary[sizes[-1]]
    for size in sizes:
        one, two = summary[size][1], summary[size][2]
        say(
            f"  {size:>9,}: one tick {one['per_minute']:>10,.0f} steps/min, two ticks "
            f"{two['per_minute']:>10,.0f} steps/min; peak RSS {one['peak']:.0f} MB "
            f"(before the tick {one['base']:.0f} MB)"
        )
    rate = largest[1]["per_minute"]
    growth = largest[1]["peak"] / smallest[1]["peak"] - 1
    verdicts = [
        (rate >= TARGET_STEPS_PER_MINUTE, f"≥ {TARGET_STEPS_PER_MINUTE:,} steps/min, one tick"),
        (largest[1]["peak"] < TARGET_RSS_MB, f"peak RSS < {TARGET_RSS_MB:.0f} MB"),
        (growth <= FLAT_GROWTH, f"peak RSS flat ({growth:+.0%} from the smallest size)"),
    ]
    for ok, what in verdicts:
        say(f"  {'MET' if ok else 'MISSED'}: {what}")
    say(f"  load avg after the run: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
