"""Campaigns end to end: thousands of contacts sent by a real campaign worker to a real
SMTP server, exactly once each, through a double launch and through pause and resume."""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from mailer import campaigns, dispatch, tasks
from mailer.models import (
    Campaign,
    CampaignStatus,
    Contact,
    Kind,
    Message,
    MessageStatus,
    Segment,
    Suppression,
    Template,
)

from .conftest import wait_for
from .factories import everyone_segment, marketing_template

pytestmark = pytest.mark.integration

POSTAL_ADDRESS = "1 Test St"
CONTACTS = 5_000
LAUNCH_DONE = re.compile(r"Task mailer\.tasks\.launch_campaign\[[^\]]+\] succeeded")
MARKETING_HTML = (
    "<html><body><p>Hi {{ contact.email }}, spring is here.</p>"
    '<p><a href="{{ site_url }}/shop">Shop the sale</a></p>'
    '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> · {{ postal_address }}</p>'
    "</body></html>"
)


@dataclass
class Audience:
    segment: Segment
    template: Template
    eligible: set[str]
    suppressed: set[str]
    unconsented: set[str]


@pytest.fixture
def marketing(smtp, settings):
    """The SMTP server, with this process allowed to send marketing (a postal address)."""
    settings.MAILER = {**settings.MAILER, "POSTAL_ADDRESS": POSTAL_ADDRESS}
    return smtp


@pytest.fixture
def audience(transactional_db) -> Audience:
    """5,000 contacts: ~10% without consent, ~5% suppressed (both scopes), the rest eligible;
    a segment selecting all of them and a marketing template."""
    granted, withdrawn = Contact.Consent.GRANTED, Contact.Consent.WITHDRAWN
    rows, eligible, suppressed, unconsented = [], set(), set(), set()
    for i in range(CONTACTS):
        email = f"c{i:05d}@example.com"
        if i % 10 == 1:
            unconsented.add(email)
            consent = withdrawn if i % 20 == 1 else Contact.Consent.UNKNOWN
        elif i % 20 == 0:
            suppressed.add(email)
            consent = granted
        else:
            eligible.add(email)
            consent = granted
        rows.append(Contact(email=email, consent=consent))
    Contact.objects.bulk_create(rows, batch_size=1_000)
    scopes = [Suppression.Scope.ALL, Suppression.Scope.MARKETING]
    Suppression.objects.bulk_create(
        Suppression(email=email, scope=scopes[n % 2], reason=Suppression.Reason.HARD_BOUNCE)
        for n, email in enumerate(sorted(suppressed))
    )
    segment = everyone_segment()
    template = marketing_template("spring-sale", "Spring sale", MARKETING_HTML)
    return Audience(segment, template, eligible, suppressed, unconsented)


def _campaign(audience: Audience, name: str) -> Campaign:
    campaign = Campaign.objects.create(name=name, template=audience.template)
    campaign.segments.add(audience.segment)
    return campaign


def _recipients(smtp) -> list[str]:
    return [r.lower() for m in smtp.messages for r in m.rcpt_tos]


def _statuses(campaign: Campaign) -> Counter:
    return Counter(Message.objects.filter(campaign=campaign).values_list("status", flat=True))


def _launches_done(worker) -> int:
    """How many launch tasks the worker has finished (its whole log, not the tail)."""
    return len(LAUNCH_DONE.findall(worker.log_path.read_text(errors="replace")))


def _wait_until_arrivals_stop(smtp, *, quiet: float = 3.0, timeout: float = 15.0) -> int:
    """Wait until no email has arrived for ``quiet`` seconds; return how many there are."""
    last = [len(smtp.messages), time.monotonic()]

    def quiet_now() -> bool:
        count = len(smtp.messages)
        if count != last[0]:
            last[:] = [count, time.monotonic()]
        return time.monotonic() - last[1] >= quiet

    wait_for(quiet_now, timeout=timeout, interval=0.1, message="emails kept arriving")
    return last[0]


@pytest.mark.django_db(transaction=True)
def test_campaign_reaches_every_eligible_contact_exactly_once_and_a_relaunch_sends_nothing(
    broker, marketing, audience, start_worker
):
    worker = start_worker("campaign", "campaign", MAILER_POSTAL_ADDRESS=POSTAL_ADDRESS)
    try:
        campaign = _campaign(audience, "Spring sale")
        # No beat runs here: the launch task send_now enqueues is what starts the campaign.
        campaigns.send_now(campaign)

        wait_for(
            lambda: len(marketing.messages) >= len(audience.eligible),
            timeout=90,
            interval=0.25,
            message=f"{len(marketing.messages)} of {len(audience.eligible)} emails arrived:\n"
            f"{worker.log()}",
        )
        wait_for(
            lambda: _statuses(campaign) == {MessageStatus.SENT: len(audience.eligible)},
            message=f"messages not all recorded as sent: {_statuses(campaign)}",
        )
        # No beat, no housekeeping: the worker that handled the last email marks it sent.
        wait_for(
            lambda: Campaign.objects.get(pk=campaign.pk).status == CampaignStatus.SENT,
            timeout=10,
            message=f"the campaign did not become sent:\n{worker.log()}",
        )
        campaign.refresh_from_db()
        assert campaign.finished_at is not None
        assert campaign.transitions.last().note == "every message handled"
        assert campaign.recipients == len(audience.eligible)
        assert _launches_done(worker) == 1

        received = _recipients(marketing)
        assert len(received) == len(set(received)), "some contact got the campaign twice"
        assert set(received) == audience.eligible
        assert not set(received) & audience.suppressed
        assert not set(received) & audience.unconsented

        sample = marketing.messages[0].parsed()
        assert sample["Subject"] == "Spring sale"
        assert sample["List-Unsubscribe"]
        assert POSTAL_ADDRESS in sample.get_body(("html",)).get_content()

        # Launching again, in this process and through the worker, and materializing again
        # must neither add messages nor send anything.
        assert campaigns.launch(campaign.pk) == 0
        assert campaigns.materialize(campaign, phase="all") == 0
        tasks.launch_campaign.delay(campaign.pk)
        dispatch.kick(Kind.CAMPAIGN)
        wait_for(
            lambda: _launches_done(worker) == 2,
            message=f"the second launch task did not run:\n{worker.log()}",
        )
        time.sleep(3)  # give a duplicate every chance to arrive
        assert len(marketing.messages) == len(audience.eligible)
        assert Message.objects.filter(campaign=campaign).count() == len(audience.eligible)
        assert _statuses(campaign) == {MessageStatus.SENT: len(audience.eligible)}
        assert Campaign.objects.get(pk=campaign.pk).status == CampaignStatus.SENT
    finally:
        worker.stop()


@pytest.mark.django_db(transaction=True)
def test_pausing_a_campaign_stops_sending_within_seconds_and_resuming_finishes_without_duplicates(
    broker, marketing, audience, start_worker
):
    # A rate limit stretches the send over many seconds, so it can be paused part-way.
    worker = start_worker(
        "campaign-limited",
        "campaign",
        MAILER_POSTAL_ADDRESS=POSTAL_ADDRESS,
        MAILER_RATE_LIMIT_CAMPAIGN="250/s",
    )
    try:
        campaign = _campaign(audience, "Summer sale")
        total = len(audience.eligible)
        campaigns.send_now(campaign)
        wait_for(
            lambda: len(marketing.messages) >= total * 0.3,
            timeout=60,
            interval=0.1,
            message=f"the campaign did not get going:\n{worker.log()}",
        )

        campaigns.pause(campaign, reason="checking a typo")
        arrived = _wait_until_arrivals_stop(marketing)
        assert arrived < total, "the campaign finished before the pause took effect"
        wait_for(
            lambda: MessageStatus.SENDING not in _statuses(campaign),
            message=f"claimed messages were not handed back: {_statuses(campaign)}",
        )
        campaign.refresh_from_db()
        assert campaign.status == CampaignStatus.PAUSED
        assert campaign.paused_reason == "checking a typo"
        assert _statuses(campaign) == {
            MessageStatus.SENT: arrived,
            MessageStatus.QUEUED: total - arrived,
        }
        time.sleep(1)
        assert len(marketing.messages) == arrived  # still nothing while paused

        campaigns.resume(campaign)
        campaign.refresh_from_db()
        assert campaign.status == CampaignStatus.SENDING
        wait_for(
            lambda: len(marketing.messages) >= total,
            timeout=60,
            interval=0.25,
            message=f"{len(marketing.messages)} of {total} after resuming:\n{worker.log()}",
        )
        wait_for(
            lambda: _statuses(campaign) == {MessageStatus.SENT: total},
            message=f"messages not all recorded as sent: {_statuses(campaign)}",
        )
        wait_for(
            lambda: Campaign.objects.get(pk=campaign.pk).status == CampaignStatus.SENT,
            timeout=10,
            message=f"the resumed campaign did not become sent:\n{worker.log()}",
        )
        time.sleep(2)  # give a duplicate every chance to arrive
        received = _recipients(marketing)
        assert len(received) == total
        assert len(set(received)) == total, "some contact got the campaign twice"
        assert set(received) == audience.eligible
    finally:
        worker.stop()
