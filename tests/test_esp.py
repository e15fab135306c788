"""Sending through an ESP's HTTP API: Postmark's batch endpoint, a pool of concurrent
calls, 429 and outages, counted at a fake Postmark API on 127.0.0.1 (tests/fakes.py)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from django.utils import timezone

from mailer import campaigns, conf, delivery, transport
from mailer.exceptions import MailerConfigurationError
from mailer.models import (
    Campaign,
    Claim,
    Contact,
    Kind,
    Message,
    MessageStatus,
    QueueThrottle,
)
from tests.factories import MessageFactory, everyone_segment, marketing_template

# A pool's database thread has a connection of its own: it sees committed rows only.
pytestmark = pytest.mark.django_db(transaction=True)

S = MessageStatus
HTML = (
    "<p>Hi {{ contact.email }}</p>"
    '<a href="https://example.com/sale">Sale</a> {{ postal_address }}'
    ' <a href="{{ unsubscribe_url }}">Unsubscribe</a>'
)


def mailer_settings(settings, **values) -> None:
    settings.MAILER = {**settings.MAILER, "POSTAL_ADDRESS": "1 Test Street, Testville", **values}


def campaign_to(count: int, name: str = "Sale") -> Campaign:
    """A running campaign to ``count`` new contacts (and any made before)."""
    start = Contact.objects.count()
    Contact.objects.bulk_create(
        Contact(email=f"m{n:03d}@example.com", consent=Contact.Consent.GRANTED)
        for n in range(start, start + count)
    )
    campaign = Campaign.objects.create(
        name=name, template=marketing_template(name.lower(), "Sale", HTML)
    )
    campaign.segments.add(everyone_segment(f"Everyone {name}"))
    campaigns.send_now(campaign)
    campaigns.launch(campaign.pk)
    return campaign


def received(fake_esp) -> Counter:
    return Counter(r.lower() for r in fake_esp.recipients)


def test_a_campaign_goes_out_in_batch_calls_each_email_personal(fake_esp, broker, settings):
    mailer_settings(settings, BATCH_SIZE=50)
    campaign_to(30)

    assert delivery.drain(Kind.CAMPAIGN) == 30

    calls = fake_esp.calls
    assert {c.path for c in calls} == {"/email/batch"}
    assert len(calls) == 1 and len(calls[0].messages) == 30
    assert received(fake_esp) == Counter({f"m{n:03d}@example.com": 1 for n in range(30)})
    rows = {m.uuid.hex: m for m in Message.objects.all()}
    unsubscribe_links = set()
    for sent in calls[0].messages:
        # Each email of the call is its own: recipient, content, headers, metadata.
        row = rows[sent["Metadata"]["mailer_message_id"].replace("-", "")]
        assert sent["To"] == row.to_email
        assert f"Hi {row.to_email}" in sent["HtmlBody"]
        headers = {h["Name"]: h["Value"] for h in sent["Headers"]}
        link = re.search(r"<(https?://[^>]+)>", headers["List-Unsubscribe"]).group(1)
        assert link in sent["HtmlBody"].replace("&amp;", "&")
        unsubscribe_links.add(link)
        assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert sent["Tag"] == "sale"
    assert len(unsubscribe_links) == 30
    statuses = Counter(Message.objects.values_list("status", flat=True))
    assert statuses == {S.SENT: 30}
    provider_ids = set(Message.objects.values_list("provider_message_id", flat=True))
    assert len(provider_ids) == 30 and "" not in provider_ids  # Postmark's own, per email
    assert Message.objects.filter(attempts=1).count() == 30
    assert not Claim.objects.exists()


def test_a_pool_of_batch_calls_overlaps_a_distant_esp(fake_esp, broker, settings):
    mailer_settings(settings, CONNECTIONS={"transactional": 1, "campaign": 4}, BATCH_SIZE=200)
    fake_esp.latency = 0.1
    campaign_to(120)

    assert delivery.drain(Kind.CAMPAIGN) == 120

    assert fake_esp.max_concurrent > 1
    assert all(len(c.messages) <= 50 for c in fake_esp.calls)  # a lane's claim at most
    assert len(fake_esp.calls) < 120 / 5
    assert received(fake_esp) == Counter({f"m{n:03d}@example.com": 1 for n in range(120)})
    assert Counter(Message.objects.values_list("status", flat=True)) == {S.SENT: 120}


def test_esp_batch_size_caps_the_emails_of_a_call(fake_esp, broker, settings):
    mailer_settings(settings, BATCH_SIZE=50, ESP_BATCH_SIZE=7)
    campaign_to(30)

    assert delivery.drain(Kind.CAMPAIGN) == 30

    assert [len(c.messages) for c in fake_esp.calls] == [7, 7, 7, 7, 2]


def test_esp_batch_size_1_sends_one_call_per_email_concurrently(fake_esp, broker, settings):
    mailer_settings(settings, ESP_BATCH_SIZE=1, CONNECTIONS={"transactional": 4, "campaign": 4})
    fake_esp.latency = 0.05
    for n in range(20):
        MessageFactory(to_email=f"t{n}@example.com")

    assert delivery.drain(Kind.TRANSACTIONAL) == 20

    assert {c.path for c in fake_esp.calls} == {"/email"}
    assert len(fake_esp.calls) == 20
    assert fake_esp.max_concurrent > 1
    assert Message.objects.filter(status=S.SENT).count() == 20


def test_a_refused_recipient_fails_alone_and_the_rest_of_the_call_is_sent(
    fake_esp, broker, settings
):
    mailer_settings(settings, BATCH_SIZE=50)
    fake_esp.inactive("m003@example.com")
    campaign_to(10)

    assert delivery.drain(Kind.CAMPAIGN) == 9

    (call,) = fake_esp.calls
    assert len(call.messages) == 10 and call.refused == ["m003@example.com"]
    refused = Message.objects.get(to_email="m003@example.com")
    assert refused.status == S.FAILED
    assert "ESP refused the recipient" in refused.last_error
    assert Message.objects.filter(status=S.SENT).count() == 9


def test_a_429_on_a_batch_call_defers_its_emails_and_slows_the_queue(fake_esp, broker, settings):
    mailer_settings(settings, BATCH_SIZE=50)
    fake_esp.throttle(times=1, retry_after=120)
    campaign_to(10)
    before = timezone.now()

    assert delivery.drain(Kind.CAMPAIGN) == 0

    assert [c.status for c in fake_esp.calls] == [429]
    assert received(fake_esp) == Counter()
    waiting = Message.objects.all()
    assert {m.status for m in waiting} == {S.QUEUED}
    assert {m.attempts for m in waiting} == {0}  # deferred, never failed, no attempt used
    assert all(m.send_after >= before + timezone.timedelta(seconds=110) for m in waiting)
    assert all("throttled" in m.last_error for m in waiting)
    assert QueueThrottle.objects.get(queue="campaign").reason

    # When the wait is over, each email goes once.
    Message.objects.update(send_after=None)
    assert delivery.drain(Kind.CAMPAIGN) == 10
    assert received(fake_esp) == Counter({f"m{n:03d}@example.com": 1 for n in range(10)})


def test_an_esp_outage_on_a_batch_call_makes_its_emails_wait_then_sends_each_once(
    fake_esp, broker, settings
):
    mailer_settings(settings, BATCH_SIZE=50)
    fake_esp.fail(503, times=1)
    campaign_to(10)

    assert delivery.drain(Kind.CAMPAIGN) == 0

    assert {m.status for m in Message.objects.all()} == {S.QUEUED}
    assert {m.attempts for m in Message.objects.all()} == {0}
    assert all(m.last_error.startswith("Waiting: ESP error 503") for m in Message.objects.all())
    Message.objects.update(send_after=None)
    transport.outage.recovered()

    assert delivery.drain(Kind.CAMPAIGN) == 10
    assert received(fake_esp) == Counter({f"m{n:03d}@example.com": 1 for n in range(10)})


def test_a_batch_refused_as_a_whole_is_sent_again_one_email_a_call(fake_esp, broker, settings):
    mailer_settings(settings, BATCH_SIZE=50)
    fake_esp.fail(422, times=1)  # e.g. "Too many batch messages" or a body it cannot parse
    campaign_to(5)

    assert delivery.drain(Kind.CAMPAIGN) == 5

    assert [(c.path, c.status) for c in fake_esp.calls] == [("/email/batch", 422)] + [
        ("/email", 200)
    ] * 5
    assert received(fake_esp) == Counter({f"m{n:03d}@example.com": 1 for n in range(5)})


def test_refused_credentials_make_mail_wait_not_fail(fake_esp, broker, settings):
    mailer_settings(settings, BATCH_SIZE=50)
    settings.ANYMAIL = {**settings.ANYMAIL, "POSTMARK_SERVER_TOKEN": "wrong"}
    campaign_to(4)

    assert delivery.drain(Kind.CAMPAIGN) == 0

    assert {m.status for m in Message.objects.all()} == {S.QUEUED}
    assert all("credentials" in m.last_error for m in Message.objects.all())


def test_transactional_mail_goes_in_batch_calls_too(fake_esp, broker, settings):
    mailer_settings(settings, BATCH_SIZE=50)
    for n in range(6):
        MessageFactory(to_email=f"t{n}@example.com")

    assert delivery.drain(Kind.TRANSACTIONAL) == 6

    (call,) = fake_esp.calls
    assert sorted(m["To"] for m in call.messages) == [f"t{n}@example.com" for n in range(6)]


def test_a_chunk_never_mixes_campaigns(fake_esp, broker, settings):
    # The claim note checks one campaign may still send: a call carries only its emails.
    mailer_settings(settings, BATCH_SIZE=50)
    first = campaign_to(3, "First")
    second = campaign_to(3, "Second")  # to all six contacts

    assert delivery.drain(Kind.CAMPAIGN) == 3 + 6

    assert len(fake_esp.calls) == 2
    for call in fake_esp.calls:
        uuids = {m["Metadata"]["mailer_message_id"] for m in call.messages}
        owners = set(Message.objects.filter(uuid__in=uuids).values_list("campaign_id", flat=True))
        assert len(owners) == 1, owners
    assert sorted(len(c.messages) for c in fake_esp.calls) == [3, 6]
    assert {first.pk, second.pk} == set(Message.objects.values_list("campaign_id", flat=True))


def test_esp_batch_size_out_of_range_is_refused(settings):
    settings.MAILER = {**settings.MAILER, "ESP_BATCH_SIZE": 0}
    with pytest.raises(MailerConfigurationError, match="ESP_BATCH_SIZE"):
        conf.esp_batch_size()


def test_a_connection_that_dies_mid_call_loses_and_doubles_nothing(fake_esp, broker, settings):
    mailer_settings(settings, BATCH_SIZE=50)
    fake_esp.drop(times=1)
    campaign_to(8)

    assert delivery.drain(Kind.CAMPAIGN) == 0

    assert [c.status for c in fake_esp.calls] == [-1]
    assert {m.status for m in Message.objects.all()} == {S.QUEUED}
    assert {m.attempts for m in Message.objects.all()} == {0}
    assert all(m.last_error.startswith("Waiting: ESP connection") for m in Message.objects.all())
    Message.objects.update(send_after=None)
    transport.outage.recovered()

    assert delivery.drain(Kind.CAMPAIGN) == 8
    assert received(fake_esp) == Counter({f"m{n:03d}@example.com": 1 for n in range(8)})
    assert not Claim.objects.exists()


def test_batch_calls_keep_the_queue_rate_limit(fake_esp, broker, settings):
    # Each email of a call takes its token before the call: a call of n emails goes out
    # once the rate allows n. Small calls, so the spacing shows at the server.
    mailer_settings(
        settings,
        CONNECTIONS={"transactional": 2, "campaign": 2},
        RATE_LIMITS={"transactional": None, "campaign": "20/s"},
        ESP_BATCH_SIZE=3,
    )
    campaign_to(100)

    assert delivery.drain(Kind.CAMPAIGN) == 100

    assert {len(c.messages) for c in fake_esp.calls} <= {1, 2, 3}
    times = sorted(c.at for c in fake_esp.calls for _ in c.messages)
    # After the bucket's first burst, the two lanes together keep to 20 a second.
    steady = times[20:]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    assert rate <= 20 * 1.15, f"{rate:.1f}/s"
    assert received(fake_esp) == Counter({f"m{n:03d}@example.com": 1 for n in range(100)})
