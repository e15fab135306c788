"""The frequency cap on marketing email per contact, across campaigns and drips: a capped
email waits for the next allowed day and is never dropped; transactional mail never counts;
two processes deciding for one contact at once still keep to the cap."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.utils import timezone

from mailer import campaigns, delivery, outbox
from mailer.models import Campaign, Contact, Kind, Message, MessageStatus, Queue, Segment, Template

pytestmark = pytest.mark.django_db

NEWS = """<html><body><h1>Hi</h1>
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> · {{ postal_address }}</p></body></html>"""


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    frozen = Clock(datetime(2027, 5, 4, 14, 0, tzinfo=UTC))  # a Tuesday
    monkeypatch.setattr(timezone, "now", frozen)
    return frozen


@pytest.fixture(autouse=True)
def _settings(settings, broker):
    settings.TIME_ZONE = "UTC"
    settings.MAILER = {
        **settings.MAILER,
        "POSTAL_ADDRESS": "1 Test St",
        "FREQUENCY_CAP": {"day": 1, "week": 3},
    }


def launched(name: str, everyone: Segment) -> Campaign:
    template, _ = Template.objects.get_or_create(
        slug="news",
        language="en",
        defaults={"purpose": "marketing", "subject": "News", "html": NEWS},
    )
    campaign = Campaign.objects.create(name=name, template=template)
    campaign.segments.add(everyone)
    campaigns.send_now(campaign)
    campaigns.launch(campaign.pk)
    return campaign


def readers(count: int, prefix: str = "r", **fields) -> list[Contact]:
    return Contact.objects.bulk_create(
        [
            Contact(email=f"{prefix}{i}@example.com", consent="granted", **fields)
            for i in range(count)
        ]
    )


def test_a_campaign_email_over_the_cap_waits_for_the_next_day_and_then_goes(clock, smtp):
    everyone = Segment.objects.create(name="Everyone")
    mailed, fresh = readers(1, "had-a-drip", timezone="Europe/Berlin") + readers(1, "fresh")
    # A drip email this morning, and a password reset: only the drip counts.
    Message.objects.create(
        kind=Kind.DRIP,
        to_email=mailed.email,
        contact=mailed,
        status="sent",
        template_slug="d",
        sent_at=clock.now - timedelta(hours=4),
    )
    Message.objects.create(
        kind=Kind.TRANSACTIONAL,
        to_email=fresh.email,
        contact=fresh,
        status="sent",
        template_slug="reset",
        sent_at=clock.now,
    )
    campaign = launched("May news", everyone)

    delivery.drain(Kind.CAMPAIGN)

    assert [r for m in smtp.messages for r in m.rcpt_tos] == [fresh.email]
    held = Message.objects.get(campaign=campaign, contact=mailed)
    assert held.status == MessageStatus.SCHEDULED
    assert held.last_error == "Waiting: frequency cap of 1 a day reached."
    assert held.send_after == clock.now + timedelta(days=1)  # same clock time in Berlin
    assert held.attempts == 0
    assert campaigns.finish_campaigns() == 0  # not finished while one waits

    clock.now += timedelta(days=1)
    outbox.release_due()
    delivery.drain(Kind.CAMPAIGN)
    assert sorted(r for m in smtp.messages for r in m.rcpt_tos) == sorted(
        [fresh.email, mailed.email]
    )
    assert campaigns.finish_campaigns() == 1


def test_two_campaigns_the_same_day_one_waits_and_the_week_cap_holds(clock, smtp):
    everyone = Segment.objects.create(name="Everyone")
    (reader,) = readers(1)
    sent_days = []
    for day in range(7):
        launched(f"Daily {day}", everyone)
        launched(f"Daily {day} again", everyone)
        outbox.release_due()
        delivery.drain(Kind.CAMPAIGN)
        sent_days.append(len(smtp.messages))
        clock.now += timedelta(days=1)
    # One a day, at most three a week (Monday to Sunday): Tue, Wed, Thu; nothing Fri–Sun;
    # Monday starts a new week.
    assert sent_days == [1, 2, 3, 3, 3, 3, 4]
    assert Message.objects.filter(contact=reader, status="scheduled").count() == 10
    assert not Message.objects.filter(contact=reader, status__in=("cancelled", "failed")).exists()


@pytest.mark.integration
def test_two_workers_at_once_keep_each_contact_to_the_cap(transactional_db, smtp, clock):
    everyone = Segment.objects.create(name="Everyone")
    people = readers(200)
    first, second = launched("One", everyone), launched("Two", everyone)
    start = threading.Barrier(2)

    def worker(campaign: Campaign) -> None:
        try:
            start.wait()
            while True:
                token = uuid.uuid4()
                claimed = outbox.claim(Queue.CAMPAIGN, 50, token)
                if not claimed:
                    return
                delivery.send_batch(claimed, Queue.CAMPAIGN, token=token)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(c,)) for c in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    per_contact = Counter(r for m in smtp.messages for r in m.rcpt_tos)
    assert per_contact == Counter({p.email: 1 for p in people})
    assert Message.objects.filter(status="scheduled").count() == 200  # the other, tomorrow
