"""Operators' endpoints: /health/live, /health/ready, the mailer_health command, worker
and beat heartbeats, /metrics (access, figures against the database, a draining campaign)
and the throttled alerts to ADMINS."""

from __future__ import annotations

import json
import re
import threading
from datetime import timedelta
from io import StringIO

import pytest
from django.core import mail
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from mailer import alerts, campaigns, counters, delivery, health, reputation
from mailer.models import Heartbeat, Kind, Message, MessageStatus, ReputationPause
from tests.conftest import wait_for
from tests.factories import MessageFactory
from tests.test_campaign_integration import POSTAL_ADDRESS, _campaign, audience, marketing

TOKEN = "metrics-token-for-tests"


@pytest.fixture
def scraper(settings, broker) -> Client:
    settings.MAILER = {**settings.MAILER, "METRICS_TOKEN": TOKEN, "REDIS_URL": None}
    return Client(headers={"Authorization": f"Bearer {TOKEN}"})


def scrape(client: Client) -> dict[str, float]:
    """The exposition parsed into {'name{labels}': value} (labels as Prometheus prints)."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    found = {}
    for line in response.content.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


# --- Health -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_live_answers_without_touching_anything(django_assert_num_queries):
    with django_assert_num_queries(0):
        response = Client().get("/health/live")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_ready_reports_each_check_workers_and_beat(broker):
    now = timezone.now()
    Heartbeat.objects.create(name="t@host", kind="worker", queues=["transactional"], seen_at=now)
    Heartbeat.objects.create(
        name="old@host", kind="worker", queues=["campaign"], seen_at=now - timedelta(hours=1)
    )
    Heartbeat.objects.create(name="beat@host", kind="beat", queues=[], seen_at=now)

    response = Client().get("/health/ready")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "database": True,
        "broker": True,
        "redis": True,
    }
    assert body["workers"] == {"transactional": 1, "campaign": 0}
    assert body["beat"]["alive"] is True and body["beat"]["last_tick"]


@pytest.mark.django_db
def test_ready_answers_503_naming_the_store_that_is_down(settings, broker):
    settings.MAILER = {**settings.MAILER, "REDIS_URL": "redis://127.0.0.1:1/0"}
    response = Client().get("/health/ready")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["redis"]["ok"] is False and body["checks"]["database"]["ok"] is True


@pytest.mark.django_db
def test_health_command_requires_the_workers_and_beat_asked_for(broker):
    out = StringIO()
    call_command("mailer_health", stdout=out)
    assert json.loads(out.getvalue())["status"] == "ok"

    with pytest.raises(SystemExit) as stopped:
        call_command("mailer_health", "--queue", "campaign", "--beat", stdout=(out := StringIO()))
    assert stopped.value.code == 1
    body = json.loads(out.getvalue())
    assert body["missing_workers"] == ["campaign"] and body["status"] == "unavailable"

    health.beat("campaign@host", "worker", ["campaign"])
    health.beat(health.beat_name(), "beat", [])
    call_command("mailer_health", "--queue", "campaign", "--beat", stdout=StringIO())


# --- Metrics access ------------------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_refuse_without_token_or_allowed_address(settings, broker):
    settings.MAILER = {**settings.MAILER, "METRICS_TOKEN": TOKEN}
    assert Client().get("/metrics").status_code == 403
    wrong = Client(headers={"Authorization": "Bearer nope"})
    assert wrong.get("/metrics").status_code == 403

    settings.MAILER = {**settings.MAILER, "METRICS_TOKEN": None, "METRICS_ALLOWED_IPS": []}
    assert Client().get("/metrics").status_code == 403
    settings.MAILER = {**settings.MAILER, "METRICS_ALLOWED_IPS": ["127.0.0.0/8"]}
    assert Client().get("/metrics").status_code == 200  # the test client is 127.0.0.1


# --- Metrics figures -----------------------------------------------------------------------


@pytest.mark.django_db
def test_gauges_match_the_database(scraper):
    old = timezone.now() - timedelta(minutes=10)
    for _ in range(3):
        MessageFactory(status=MessageStatus.QUEUED, queued_at=old)
    MessageFactory(status=MessageStatus.SENT)
    MessageFactory(status=MessageStatus.FAILED)
    ReputationPause.objects.create(reason="test")

    found = scrape(scraper)

    assert found['mailer_messages{kind="transactional",status="queued"}'] == 3
    assert found['mailer_messages{kind="transactional",status="sent"}'] == 1
    assert found['mailer_messages{kind="transactional",status="failed"}'] == 1
    assert found['mailer_queue_depth{queue="transactional"}'] == 3
    assert found['mailer_queue_depth{queue="campaign"}'] == 0
    assert 590 < found['mailer_queue_oldest_age_seconds{queue="transactional"}'] < 700
    assert found["mailer_reputation_pauses_total"] == 1
    assert found["mailer_reputation_paused"] == 1


@pytest.mark.django_db
def test_counters_and_histograms_add_up_across_batches(scraper, settings):
    """Two sends drained by send_batch: counted in Redis, read back by the scrape."""
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    queued = timezone.now() - timedelta(seconds=3)
    for i in range(2):
        MessageFactory(status=MessageStatus.QUEUED, queued_at=queued, to_email=f"u{i}@example.com")
    counters.inc("mailer_suppressions_added_total", reason="hard_bounce", scope="all")
    delivery.drain("transactional")

    found = scrape(scraper)
    queue = 'queue="transactional"'
    assert found[f"mailer_sent_total{{{queue}}}"] == 2
    assert found[f"mailer_queued_to_sent_seconds_count{{{queue}}}"] == 2
    assert found[f'mailer_queued_to_sent_seconds_bucket{{le="2.5",{queue}}}'] == 0
    assert found[f'mailer_queued_to_sent_seconds_bucket{{le="5.0",{queue}}}'] == 2
    assert found[f'mailer_queued_to_sent_seconds_bucket{{le="+Inf",{queue}}}'] == 2
    assert 6 <= found[f"mailer_queued_to_sent_seconds_sum{{{queue}}}"] < 10
    assert found[f"mailer_drain_batch_size_count{{{queue}}}"] == 1
    assert found['mailer_suppressions_added_total{reason="hard_bounce",scope="all"}'] == 1


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_metrics_follow_a_draining_campaign(broker, marketing, audience, start_worker, settings):
    """Scraped while a real worker sends a campaign at 400/s: every scrape lies between
    the database's counts just before and just after it; the last one equals them."""
    settings.MAILER = {**settings.MAILER, "METRICS_TOKEN": TOKEN, "REDIS_URL": None}
    scraper = Client(headers={"Authorization": f"Bearer {TOKEN}"})
    worker = start_worker(
        "campaign-metrics",
        "campaign",
        MAILER_POSTAL_ADDRESS=POSTAL_ADDRESS,
        MAILER_RATE_LIMIT_CAMPAIGN="400/s",
    )
    campaign = _campaign(audience, "Metrics")
    campaigns.send_now(campaign)
    total = len(audience.eligible)
    sent = Message.objects.filter(kind=Kind.CAMPAIGN, status=MessageStatus.SENT)
    wait_for(lambda: sent.count() > 0, timeout=60, message=lambda: worker.log())

    scrapes = 0
    while True:
        before = sent.count()
        found = scrape(scraper)
        after = sent.count()
        shown = found.get('mailer_messages{kind="campaign",status="sent"}', 0)
        assert before <= shown <= after
        counted = found.get('mailer_sent_total{queue="campaign"}', 0)
        assert counted <= after  # counted when the batch's rows are written
        states = {k: v for k, v in found.items() if k.startswith('mailer_messages{kind="campaign"')}
        assert sum(states.values()) == Message.objects.filter(kind=Kind.CAMPAIGN).count()
        scrapes += 1
        if after == total:
            break
        wait_for(lambda n=after: sent.count() > n, timeout=30, message=lambda: worker.log())
    assert scrapes >= 2, "the campaign finished before it could be scraped while draining"

    wait_for(
        lambda: scrape(scraper).get('mailer_sent_total{queue="campaign"}') == total,
        timeout=20,
        message="the sent counter never reached the database's count",
    )
    final = scrape(scraper)
    assert final['mailer_messages{kind="campaign",status="sent"}'] == total
    assert final['mailer_queue_depth{queue="campaign"}'] == 0
    assert final['mailer_queued_to_sent_seconds_count{queue="campaign"}'] == total
    assert final['mailer_rate_limit_waits_total{queue="campaign"}'] > 0
    batches = final['mailer_drain_batch_size_sum{queue="campaign"}']
    assert batches == total + _handed_back(final)
    assert final['mailer_workers{queue="campaign"}'] == 1
    worker.stop()


def _handed_back(found: dict) -> float:
    """Claimed messages that were handed back and claimed again count twice in batches."""
    return found.get('mailer_deferred_total{queue="campaign"}', 0)


# --- Alerts --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_failed_messages_past_the_threshold_email_admins_once_per_interval(settings):
    settings.ADMINS = [("Ops", "ops@example.com")]
    settings.MAILER = {**settings.MAILER, "FAILED_ALERT_THRESHOLD": 3}
    for _ in range(2):
        MessageFactory(status=MessageStatus.FAILED)
    assert alerts.check_failed() == 2 and mail.outbox == []

    MessageFactory(status=MessageStatus.FAILED)
    assert alerts.check_failed() == 3
    assert alerts.check_failed() == 3  # throttled: still one email
    assert len(mail.outbox) == 1
    assert (
        mail.outbox[0].to == ["ops@example.com"] and "3 messages failed" in mail.outbox[0].subject
    )


@pytest.mark.django_db
def test_reputation_pause_emails_admins(settings):
    settings.ADMINS = [("Ops", "ops@example.com")]
    settings.MAILER = {
        **settings.MAILER,
        "REPUTATION": {
            "BOUNCE_RATE": 0.05,
            "COMPLAINT_RATE": 0.001,
            "WINDOW_HOURS": 24,
            "MIN_SENT": 2,
        },
    }
    now = timezone.now()
    for i in range(4):
        message = MessageFactory(kind=Kind.CAMPAIGN, status=MessageStatus.SENT, sent_at=now)
        if i < 2:
            message.events.create(event_type="bounced", bounce="hard", recipient=message.to_email)
    assert reputation.reputation_guard() is not None
    assert len(mail.outbox) == 1
    assert re.search(r"paused", mail.outbox[0].subject)
    assert "bounce rate" in mail.outbox[0].body


__all__ = ["audience", "marketing"]


@pytest.mark.django_db(transaction=True)
def test_beats_heartbeat_comes_from_its_scheduler_tick(broker, settings):
    # Not a thread: a scheduler that stops ticking stops saying beat is alive.
    from celery import current_app

    from mailer.receivers import on_beat_started
    from mailer.scheduler import Scheduler

    settings.MAILER = {**settings.MAILER, "HEARTBEAT_SECONDS": 3600}
    scheduler = Scheduler(app=current_app)
    assert not Heartbeat.objects.filter(kind="beat").exists()

    scheduler.tick()
    first = Heartbeat.objects.get(kind="beat").seen_at
    scheduler.tick()  # within HEARTBEAT_SECONDS: no second write
    assert Heartbeat.objects.get(kind="beat").seen_at == first

    class Service:  # what beat_init sends: no heartbeat thread for mailer's scheduler
        scheduler_cls = "mailer.scheduler:Scheduler"

    on_beat_started(sender=Service())
    assert not any(t.name == "mailer-heartbeat-beat" for t in threading.enumerate())
