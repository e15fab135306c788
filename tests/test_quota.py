"""Quotas over calendar hours and days, and warm-up schedules, under controlled time."""

from __future__ import annotations

import csv
import io
import logging
import random
import threading
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta

import pytest
from django.contrib.auth.models import Permission
from django.core import checks as django_checks
from django.urls import reverse
from django.utils import timezone

from mailer import campaigns, checks, conf, delivery, dispatch, outbox, quota, reports
from mailer.exceptions import MailerConfigurationError
from mailer.models import (
    Campaign,
    Claim,
    Contact,
    Event,
    Kind,
    Message,
    MessageStatus,
    Queue,
    QuotaCounter,
    Segment,
    Template,
    WarmupSchedule,
)
from tests.conftest import wait_for
from tests.factories import PASSWORD, MessageFactory, UserFactory

pytestmark = pytest.mark.django_db

NEWSLETTER = """<html><body><h1>Hello {{ contact.first_name }}</h1>
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> · {{ postal_address }}</p></body></html>"""


def mailer_settings(settings, **values) -> None:
    settings.MAILER = {**settings.MAILER, **values}


class Clock:
    """``timezone.now()`` everywhere (claims, hand-backs, quota windows) reads this."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    frozen = Clock(datetime(2026, 12, 5, 18, 0, tzinfo=UTC))
    monkeypatch.setattr(timezone, "now", frozen)
    return frozen


def queue(n: int, prefix: str = "q", **fields) -> list[Message]:
    return [MessageFactory(to_email=f"{prefix}{i}@example.com", **fields) for i in range(n)]


def rows(messages: list[Message]) -> list[Message]:
    return list(Message.objects.filter(pk__in=[m.pk for m in messages]).order_by("id"))


def schedule(**fields) -> WarmupSchedule:
    values = {
        "name": "New IP",
        "start_date": date(2026, 12, 1),
        "first_day_cap": 500,
        "growth_factor": 2.0,
        "every_days": 3,
        "target_cap": 5000,
    }
    return WarmupSchedule.objects.create(**(values | fields))


# --- Daily and hourly caps, drained against the real SMTP server -----------------------------


def test_the_50001st_message_of_the_day_waits_until_the_next_day(
    smtp, broker, settings, clock, caplog
):
    mailer_settings(settings, QUOTAS={"transactional": {"day": 50_000}})
    assert quota.reserve(Queue.TRANSACTIONAL, 49_999).granted == 49_999  # the day so far
    messages = queue(4)
    caplog.set_level(logging.WARNING, logger="mailer")

    assert delivery.drain(Kind.TRANSACTIONAL) == 1

    first, *held = rows(messages)
    assert first.status == MessageStatus.SENT
    assert [r.rcpt_tos for r in smtp.messages] == [[first.to_email]]
    midnight = datetime(2026, 12, 6, tzinfo=UTC)
    reason = "Waiting: daily quota of 50,000 reached (transactional); resumes 2026-12-06 00:00 UTC"
    for message in held:
        assert (message.status, message.attempts) == (MessageStatus.QUEUED, 0)
        assert message.send_after == midnight
        assert message.last_error == reason
    assert not Event.objects.filter(event_type__in=("failed", "deferred")).exists()
    # Later that day nothing more goes, and nothing is claimed only to be handed back.
    clock.now = datetime(2026, 12, 5, 23, 59, 59, tzinfo=UTC)
    (late,) = queue(1, prefix="late")
    assert delivery.drain(Kind.TRANSACTIONAL) == 0
    assert len(smtp.messages) == 1
    late.refresh_from_db()
    assert (late.status, late.send_after, late.last_error) == (MessageStatus.QUEUED, None, "")
    assert Claim.objects.count() == 0
    reached = [r for r in caplog.records if "quota of 50,000 reached" in r.getMessage()]
    assert len(reached) == 1  # once per window, not per email or per batch

    clock.now = midnight + timedelta(seconds=1)
    assert delivery.drain(Kind.TRANSACTIONAL) == 4

    assert {m.status for m in rows([*messages, late])} == {MessageStatus.SENT}
    assert len(smtp.messages) == 5
    (today,) = quota.usage(Queue.TRANSACTIONAL)
    assert (today.window.start, today.used) == (midnight, 4)


def test_an_hourly_cap_holds_the_rest_until_the_next_hour(smtp, broker, settings, clock):
    mailer_settings(settings, QUOTAS={"transactional": {"hour": 2, "day": None}})
    clock.now = datetime(2026, 12, 5, 10, 20, tzinfo=UTC)
    messages = queue(3)

    assert delivery.drain(Kind.TRANSACTIONAL) == 2

    held = rows(messages)[2]
    assert held.status == MessageStatus.QUEUED
    assert held.send_after == datetime(2026, 12, 5, 11, 0, tzinfo=UTC)
    assert held.last_error == (
        "Waiting: hourly quota of 2 reached (transactional); resumes 2026-12-05 11:00 UTC"
    )
    # Beat's recovery wakes a worker once the held mail is due, a minute into the hour.
    assert outbox.lost_queues(60, [Queue.TRANSACTIONAL]) == set()
    clock.now = datetime(2026, 12, 5, 11, 1, 1, tzinfo=UTC)
    assert outbox.lost_queues(60, [Queue.TRANSACTIONAL]) == {Queue.TRANSACTIONAL}
    assert delivery.drain(Kind.TRANSACTIONAL) == 1
    assert len(smtp.messages) == 3


def test_days_are_counted_in_the_quota_time_zone(broker, settings):
    mailer_settings(settings, QUOTAS={"campaign": {"day": 10}}, QUOTA_TIMEZONE="Europe/Paris")
    now = datetime(2026, 12, 5, 22, 30, tzinfo=UTC)  # 23:30 in Paris

    assert quota.reserve(Queue.CAMPAIGN, 15, now=now).granted == 10
    grant = quota.reserve(Queue.CAMPAIGN, 1, now=now)

    assert grant.granted == 0
    assert grant.resume_at == datetime(2026, 12, 5, 23, 0, tzinfo=UTC)  # Paris midnight
    assert grant.reason.endswith("resumes 2026-12-06 00:00 Europe/Paris")
    assert quota.reserve(Queue.CAMPAIGN, 1, now=grant.resume_at).granted == 1


def test_a_day_with_a_clock_change_is_counted_as_one_calendar_day(broker, settings):
    mailer_settings(settings, QUOTAS={"campaign": {"day": 10}}, QUOTA_TIMEZONE="Europe/Paris")
    (window,) = quota.windows(Queue.CAMPAIGN, datetime(2026, 10, 25, 12, tzinfo=UTC))

    assert window.end - window.start == timedelta(hours=25)


def test_processes_reserving_at_once_never_exceed_the_cap(broker, settings):
    mailer_settings(settings, QUOTAS={"campaign": {"hour": 1000, "day": 1500}})
    now = datetime(2026, 12, 5, 9, 15, tzinfo=UTC)
    granted: list[int] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        while (grant := quota.reserve(Queue.CAMPAIGN, rng.randint(1, 7), now=now)).granted:
            granted.append(grant.granted)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sum(granted) == 1000
    assert [u.used for u in quota.usage(Queue.CAMPAIGN, now)] == [1000, 1000]  # day, hour


def test_the_database_store_counts_without_redis(settings, db):
    settings.CELERY_BROKER_URL = "memory://"
    mailer_settings(settings, REDIS_URL=None, QUOTAS={"transactional": {"day": 5}})
    now = datetime(2026, 12, 5, 12, tzinfo=UTC)
    QuotaCounter.objects.create(key="old", used=3, expires_at=now - timedelta(days=1))

    assert quota.reserve(Queue.TRANSACTIONAL, 3, now=now).granted == 3
    short = quota.reserve(Queue.TRANSACTIONAL, 3, now=now)
    assert (short.granted, short.resume_at) == (2, datetime(2026, 12, 6, tzinfo=UTC))
    assert quota.reserve(Queue.TRANSACTIONAL, 1, now=now).granted == 0

    assert [u.used for u in quota.usage(Queue.TRANSACTIONAL, now)] == [5]
    assert quota.used_up(Queue.TRANSACTIONAL, now).resume_at == datetime(2026, 12, 6, tzinfo=UTC)
    assert not QuotaCounter.objects.filter(key="old").exists()  # expired windows go


def test_an_unreachable_quota_store_makes_mail_wait_never_fail(broker, settings, smtp):
    mailer_settings(
        settings,
        QUOTAS={"transactional": {"day": 100}},
        REDIS_URL="redis://127.0.0.1:1/0",  # nothing listens there
        RATE_STORE_WAIT=1,
    )
    messages = queue(3)

    assert delivery.drain(Kind.TRANSACTIONAL) == 0

    for message in rows(messages):
        assert (message.status, message.attempts) == (MessageStatus.QUEUED, 0)
        assert message.last_error == "Waiting: the rate-limit store is unavailable"
    assert smtp.messages == []
    assert not Event.objects.filter(event_type=Event.Type.FAILED).exists()


def test_a_wait_longer_than_max_countdown_is_never_a_long_broker_eta(settings, monkeypatch):
    mailer_settings(settings, MAX_COUNTDOWN=300)
    enqueued = []
    monkeypatch.setattr(dispatch, "enqueue", lambda name, **kw: enqueued.append(kw) or True)

    dispatch.kick(Queue.CAMPAIGN, countdown=6 * 3600)

    assert enqueued == [{"countdown": 300.0}]


# --- Warm-up -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "allowance"),
    [(-2, 500), (0, 500), (2, 500), (3, 1000), (5, 1000), (6, 2000), (9, 4000), (12, 5000)],
)
def test_warmup_caps_rise_on_schedule_up_to_the_target(broker, settings, day, allowance):
    schedule()
    noon = datetime(2026, 12, 1, 12, tzinfo=UTC) + timedelta(days=day)

    assert quota.caps(Queue.CAMPAIGN, noon) == {"day": (allowance, "New IP")}


def test_warmup_allowance_never_overflows_and_rounds_down():
    slow = WarmupSchedule(
        start_date=date(2020, 1, 1),
        first_day_cap=100,
        growth_factor=1.5,
        every_days=1,
        target_cap=10**9,
    )
    assert [quota.warmup_allowance(slow, date(2020, 1, d)) for d in (1, 2, 3, 4)] == [
        100,
        150,
        225,
        337,
    ]
    assert quota.warmup_allowance(slow, date(2026, 1, 1)) == 10**9


def test_the_tighter_of_warmup_and_the_daily_quota_binds(broker, settings):
    mailer_settings(settings, QUOTAS={"campaign": {"day": 800}})
    schedule()
    assert quota.caps(Queue.CAMPAIGN, datetime(2026, 12, 1, tzinfo=UTC)) == {"day": (500, "New IP")}
    assert quota.caps(Queue.CAMPAIGN, datetime(2026, 12, 4, tzinfo=UTC)) == {"day": (800, "quota")}
    WarmupSchedule.objects.update(active=False)
    assert quota.caps(Queue.CAMPAIGN, datetime(2026, 12, 1, tzinfo=UTC)) == {"day": (800, "quota")}


def test_transactional_mail_is_never_held_by_warmup(smtp, broker, settings, clock):
    schedule(first_day_cap=1, target_cap=1, start_date=date(2026, 12, 5))
    messages = queue(3)

    assert delivery.drain(Kind.TRANSACTIONAL) == 3

    assert quota.caps(Queue.TRANSACTIONAL) == {}
    assert {m.status for m in rows(messages)} == {MessageStatus.SENT}


@pytest.fixture
def campaign_of_three(settings, broker):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    mailer_settings(settings, POSTAL_ADDRESS="1 Test St")
    template = Template.objects.create(
        slug="newsletter",
        purpose=Template.Purpose.MARKETING,
        subject="News for {{ contact.first_name }}",
        html=NEWSLETTER,
    )
    Contact.objects.bulk_create(
        Contact(email=f"reader{i}@example.com", name=f"Reader {i}", consent="granted")
        for i in range(3)
    )
    campaign = Campaign.objects.create(name="Launch", template=template)
    campaign.segments.set([Segment.objects.create(name="Everyone")])
    return campaign


def test_warmup_holds_a_campaign_and_its_report_says_until_when(
    smtp, broker, clock, campaign_of_three, admin_client
):
    clock.now = datetime(2026, 12, 5, 9, tzinfo=UTC)
    schedule(first_day_cap=2, target_cap=100, start_date=date(2026, 12, 5))
    campaign = campaign_of_three
    campaigns.send_now(campaign)
    campaigns.launch(campaign.pk)
    campaign.refresh_from_db()

    assert delivery.drain(Queue.CAMPAIGN) == 2

    waiting = (
        "warm-up allowance of 2 for today reached (campaign, schedule 'New IP'); "
        "resumes 2026-12-06 00:00 UTC"
    )
    (held,) = Message.objects.filter(campaign=campaign, status=MessageStatus.QUEUED)
    assert held.last_error == f"Waiting: {waiting}"
    assert held.send_after == datetime(2026, 12, 6, tzinfo=UTC)
    figures = reports.report(campaign)
    assert figures["pending"] == 1
    assert figures["quota_wait"] == f"Waiting for quota: {waiting}"
    page = admin_client.get(reverse("admin:mailer_campaign_change", args=[campaign.pk]))
    assert f"Waiting for quota: {waiting}".replace("'", "&#x27;") in page.content.decode()
    answer = admin_client.get(reverse("admin:mailer_campaign_report_csv", args=[campaign.pk]))
    table = list(csv.reader(io.StringIO(b"".join(answer.streaming_content).decode())))
    assert ["waiting", f"Waiting for quota: {waiting}"] in table

    clock.now = datetime(2026, 12, 6, 0, 1, tzinfo=UTC)  # day 1: still 2 a day
    assert reports.report(campaign)["quota_wait"] == ""
    assert delivery.drain(Queue.CAMPAIGN) == 1
    assert len(smtp.messages) == 3


# --- Admin --------------------------------------------------------------------------------


def test_warmup_changelist_shows_todays_allowance_and_use(admin_client, broker, settings):
    mailer_settings(settings, QUOTAS={"transactional": {"hour": 7_000}})
    schedule(start_date=quota.local_today() - timedelta(days=3), name="Fresh domain")
    quota.reserve(Queue.CAMPAIGN, 123)
    quota.reserve(Queue.TRANSACTIONAL, 45)

    page = admin_client.get(reverse("admin:mailer_warmupschedule_changelist"))

    html = page.content.decode()
    assert page.status_code == 200
    assert '<td class="field-todays_allowance">1,000</td>' in html
    assert '<td class="field-todays_use">123</td>' in html
    assert 'data-queue="transactional" data-window="hour"' in html
    assert '<td style="text-align:right" class="cap">7000</td>' in html
    assert '<td style="text-align:right" class="used">45</td>' in html


def test_a_view_only_staff_user_sees_warmup_schedules_but_cannot_change_them(client, broker):
    row = schedule()
    viewer = UserFactory(username="viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_warmupschedule"))
    client.login(username="viewer", password=PASSWORD)
    url = reverse("admin:mailer_warmupschedule_change", args=[row.pk])

    assert client.get(reverse("admin:mailer_warmupschedule_changelist")).status_code == 200
    assert client.get(url).status_code == 200
    answer = client.post(
        url,
        {
            "name": "New IP",
            "start_date": "2026-12-01",
            "first_day_cap": 99_999,
            "growth_factor": 2,
            "every_days": 3,
            "target_cap": 99_999,
            "active": "on",
        },
    )
    assert answer.status_code == 403
    assert WarmupSchedule.objects.get(pk=row.pk).first_day_cap == 500
    assert client.get(reverse("admin:mailer_warmupschedule_add")).status_code == 403


def test_a_target_below_the_first_days_cap_is_refused(admin_client):
    answer = admin_client.post(
        reverse("admin:mailer_warmupschedule_add"),
        {
            "name": "Backwards",
            "start_date": "2026-12-01",
            "first_day_cap": 500,
            "growth_factor": 2,
            "every_days": 3,
            "target_cap": 100,
            "active": "on",
        },
    )
    assert answer.status_code == 200
    assert "The target cannot be below the first day" in answer.content.decode()
    assert not WarmupSchedule.objects.exists()


# --- Configuration ----------------------------------------------------------------------------


def test_quotas_that_do_not_parse_are_reported_by_the_system_check(settings):
    mailer_settings(settings, QUOTAS={"campaign": {"week": 5}}, QUOTA_TIMEZONE="Mars/Base")

    with pytest.raises(MailerConfigurationError):
        conf.quotas(Queue.CAMPAIGN)
    errors = [e for e in checks.check_settings() if e.id == "mailer.E001"]
    assert len(errors) == 2
    assert all(isinstance(e, django_checks.Error) for e in errors)
    assert "week" in errors[0].msg and "Mars/Base" in errors[1].msg


# --- Real worker processes ----------------------------------------------------------------------


@pytest.mark.integration
def test_two_worker_processes_together_send_exactly_the_daily_quota(
    transactional_db, broker, smtp, start_worker
):
    workers = [
        start_worker(f"quota-{i}", MAILER_TRANSACTIONAL_DAILY_QUOTA="150", MAILER_LOG_LEVEL="INFO")
        for i in range(2)
    ]
    try:
        messages = queue(300, prefix="daily")
        dispatch.kick(Queue.TRANSACTIONAL)

        wait_for(lambda: len(smtp.messages) >= 150, timeout=60)
        wait_for(
            lambda: (
                not Message.objects.filter(status=MessageStatus.SENDING).exists()
                and not Claim.objects.exists()
            ),
            timeout=30,
        )
        time.sleep(2)  # nothing more leaves

        assert len(smtp.messages) == 150
        statuses = Counter(m.status for m in rows(messages))
        assert statuses == {MessageStatus.SENT: 150, MessageStatus.QUEUED: 150}
        assert not Event.objects.filter(event_type__in=("failed", "deferred")).exists()
        held = Message.objects.filter(status=MessageStatus.QUEUED).exclude(last_error="")
        assert {m.last_error.split(";")[0] for m in held} == {
            "Waiting: daily quota of 150 reached (transactional)"
        }
        logs = "".join(w.log_path.read_text(errors="replace") for w in workers)
        assert logs.count("daily quota of 150 reached") == 1
        assert all(" sent," in w.log_path.read_text() for w in workers), "both should send"
    finally:
        for worker in workers:
            worker.stop()
