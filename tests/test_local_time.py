"""Campaigns sent at a clock time in each contact's own zone, and in each contact's
language: launched when the first zone reaches the time, each email released in its
zone's hour, the translation chosen per contact (falling back as transactional mail does).
Under controlled time, through real PostgreSQL, Redis and an SMTP server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from mailer import campaigns, delivery, outbox
from mailer.exceptions import CampaignError
from mailer.models import Campaign, Contact, Kind, Message, MessageStatus, Segment, Template

pytestmark = pytest.mark.django_db

NEWS = """<html><body><h1>{greeting} {{{{ contact.first_name }}}}</h1>
<p><a href="{{{{ unsubscribe_url }}}}">{leave}</a> · {{{{ postal_address }}}}</p></body></html>"""


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    frozen = Clock(datetime(2027, 3, 14, 12, 0, tzinfo=UTC))
    monkeypatch.setattr(timezone, "now", frozen)
    return frozen


@pytest.fixture(autouse=True)
def _settings(settings, broker):
    settings.TIME_ZONE = "UTC"
    settings.MAILER = {**settings.MAILER, "POSTAL_ADDRESS": "1 Test St"}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def news(language: str, subject: str, greeting: str = "Hello") -> Template:
    return Template.objects.create(
        slug="news",
        language=language,
        purpose=Template.Purpose.MARKETING,
        subject=subject,
        html=NEWS.format(greeting=greeting, leave="Unsubscribe"),
    )


@pytest.fixture
def readers() -> dict[str, Contact]:
    people = {
        "tokyo": ("Asia/Tokyo", "ja"),
        "paris": ("Europe/Paris", "fr"),
        "new-york": ("America/New_York", "de-AT"),
        "nowhere": ("", ""),
        "bad-zone": ("Mars/Olympus", "fr-CA"),
    }
    return {
        name: Contact.objects.create(
            email=f"{name}@example.com", name=name.title(), timezone=zone, language=language,
            consent="granted",
        )
        for name, (zone, language) in people.items()
    }  # fmt: skip


def local_campaign(template: Template, send_at: datetime) -> Campaign:
    everyone = Segment.objects.create(name="Everyone")
    campaign = Campaign.objects.create(
        name="Local news", template=template, send_in_local_time=True, send_at=send_at
    )
    campaign.segments.add(everyone)
    return campaign


def received_by_hour(smtp, clock: Clock, start: datetime, hours: int) -> dict[str, tuple]:
    """Beat and a worker, hour by hour: release what is due, send it; who got what when."""
    seen: dict[str, tuple] = {}
    for hour in range(hours):
        clock.now = start + timedelta(hours=hour)
        outbox.release_due()
        delivery.drain(Kind.CAMPAIGN)
        for message in smtp.messages:
            email = message.parsed()
            for rcpt in message.rcpt_tos:
                seen.setdefault(rcpt, (clock.now, str(email["Subject"])))
    return seen


def test_each_contact_gets_the_campaign_at_nine_in_their_own_zone_and_language(
    clock, smtp, readers
):
    english = news("en", "Spring news")
    news("fr", "Les nouvelles", greeting="Bonjour")
    news("de", "Neuigkeiten", greeting="Hallo")
    campaign = local_campaign(english, at("2027-03-15T09:00"))  # 09:00 on Monday 15 March
    campaigns.schedule(campaign, campaign.send_at)

    # Beat launches it when the first zone on Earth (UTC+14) reaches 09:00: not before.
    clock.now = at("2027-03-14T18:59")
    assert campaigns.launch_due() == 0
    clock.now = at("2027-03-14T19:00")
    assert campaigns.launch_due() == 5
    assert set(Message.objects.values_list("status", flat=True)) == {MessageStatus.SCHEDULED}

    seen = received_by_hour(smtp, clock, at("2027-03-14T19:00"), 30)

    assert seen == {
        # 09:00 JST; a Japanese reader falls back to the default language.
        "tokyo@example.com": (at("2027-03-15T00:00"), "Spring news"),
        # 09:00 CET (Paris is still on winter time), in French.
        "paris@example.com": (at("2027-03-15T08:00"), "Les nouvelles"),
        # 09:00 EDT: New York moved to summer time the day before; de-AT finds "de".
        "new-york@example.com": (at("2027-03-15T13:00"), "Neuigkeiten"),
        # No zone, or one that does not exist: the site's (UTC); fr-CA finds "fr".
        "nowhere@example.com": (at("2027-03-15T09:00"), "Spring news"),
        "bad-zone@example.com": (at("2027-03-15T09:00"), "Les nouvelles"),
    }
    rows = {m.to_email: (m.language, m.template.language) for m in Message.objects.all()}
    assert rows["paris@example.com"] == ("fr", "fr")
    assert rows["new-york@example.com"] == ("de", "de")
    assert rows["tokyo@example.com"] == ("en", "en")
    # The campaign is only finished once the last zone had its turn.
    assert campaigns.finish_campaigns() == 1


def test_a_campaign_not_in_local_time_launches_at_its_time_in_each_language(clock, smtp, readers):
    """The translation applies to every campaign; a template in one language only falls
    back to its own language, never fails."""
    german_only = news("de", "Nur Deutsch", greeting="Hallo")
    campaign = Campaign.objects.create(name="German", template=german_only)
    campaign.segments.add(Segment.objects.create(name="All"))
    campaigns.send_now(campaign)
    assert campaigns.launch(campaign.pk) == 5
    assert set(Message.objects.values_list("status", "language")) == {("queued", "de")}
    delivery.drain(Kind.CAMPAIGN)
    assert len(smtp.messages) == 5


def test_send_now_in_local_time_sends_at_once_where_the_time_has_passed(clock, smtp, readers):
    news("en", "Now")
    campaign = local_campaign(Template.objects.get(slug="news"), None)
    clock.now = at("2027-03-15T10:00")  # 10:00 UTC: 19:00 in Tokyo, 05:00 in New York
    campaigns.send_now(campaign)
    campaigns.launch(campaign.pk)
    status = dict(Message.objects.values_list("to_email", "status"))
    send_after = dict(Message.objects.values_list("to_email", "send_after"))
    assert status["tokyo@example.com"] == "queued" and send_after["tokyo@example.com"] is None
    assert status["paris@example.com"] == "queued"  # 11:00 CET: its 10:00 has passed
    assert status["nowhere@example.com"] == "queued"
    assert status["new-york@example.com"] == "scheduled"
    assert send_after["new-york@example.com"] == at("2027-03-15T14:00")  # 10:00 EDT


def test_an_ab_test_cannot_send_in_local_time(clock, readers):
    campaign = local_campaign(news("en", "AB"), at("2027-03-16T09:00"))
    Campaign.objects.filter(pk=campaign.pk).update(test_share=20)
    campaign.refresh_from_db()
    with pytest.raises(CampaignError, match="local time"):
        campaigns.check_ready(campaign)
