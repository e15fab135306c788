"""mailer.outbox: claims, the tried mark, recording, releasing and cancelling rows.

These run on PostgreSQL and again on SQLite (``make test``): each statement has a
PostgreSQL form and a portable twin, and both must do the same thing.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from mailer import campaigns, outbox
from mailer.models import Campaign, CampaignStatus, Event, Kind, Message, MessageStatus, Queue
from tests.factories import MessageFactory

pytestmark = pytest.mark.django_db

S = MessageStatus


def claimed(count: int = 1, *, campaign: Campaign | None = None, kind: str = Kind.TRANSACTIONAL):
    for n in range(count):
        MessageFactory(to_email=f"r{n}@example.com", campaign=campaign, kind=kind)
    token = uuid.uuid4()
    return token, outbox.claim(Queue.for_kind(kind), count, token)


def row(message: Message) -> Message:
    return Message.objects.get(pk=message.pk)


def test_claim_marks_messages_sending_under_a_token_without_counting_an_attempt():
    token, messages = claimed(3)

    assert [m.status for m in messages] == [S.SENDING] * 3
    assert {row(m).claim_token for m in messages} == {token}
    assert {row(m).attempts for m in messages} == {0}
    assert {row(m).attempted_at for m in messages} == {None}
    assert outbox.claim(Queue.TRANSACTIONAL, 3, uuid.uuid4()) == []  # nothing left


def test_try_next_records_the_previous_email_and_marks_the_next_one_tried():
    token, (first, second) = claimed(2)

    assert outbox.try_next(first, token)
    assert (row(first).attempts, row(first).status) == (1, S.SENDING)
    assert row(first).attempted_at is not None

    assert outbox.try_next(second, token, done=outbox.Sent(first, "<id-1@x>"))

    first_row = row(first)
    assert first_row.status == S.SENT
    assert first_row.sent_at is not None
    assert first_row.provider_message_id == "<id-1@x>"
    assert row(second).attempts == 1
    assert row(second).status == S.SENDING  # on the wire until its own outcome comes
    assert list(first.events.values_list("event_type", flat=True)) == [Event.Type.SENT]


def test_try_next_refuses_a_message_whose_claim_lapsed_and_was_taken_back():
    token, (message,) = claimed(1)
    Message.objects.filter(pk=message.pk).update(claim_token=uuid.uuid4())  # recovered

    assert not outbox.try_next(message, token)
    assert row(message).attempts == 0


def test_try_next_refuses_a_message_of_a_cancelled_campaign():
    campaign = Campaign.objects.create(name="Spring", status=CampaignStatus.SENDING)
    token, (message,) = claimed(1, campaign=campaign, kind=Kind.CAMPAIGN)
    Campaign.objects.filter(pk=campaign.pk).update(status=CampaignStatus.CANCELLED)

    assert not outbox.try_next(message, token)

    assert outbox.release([message], token) == 0
    assert row(message).status == S.CANCELLED


def test_recording_sent_keeps_a_status_a_webhook_already_moved_on():
    token, (message,) = claimed(1)
    outbox.try_next(message, token)
    Message.objects.filter(pk=message.pk).update(status=S.DELIVERED)

    outbox.record_sent(outbox.Sent(message, "pid"))

    assert row(message).status == S.DELIVERED
    assert row(message).provider_message_id == "pid"


def test_release_hands_untried_claims_back_and_can_take_back_an_attempt():
    token, (untried, tried) = claimed(2)
    outbox.try_next(tried, token)

    assert outbox.release([untried], token, delay=30, reason="Connection refused") == 1
    assert outbox.release([tried], token, uncount=True) == 1

    waiting = row(untried)
    assert (waiting.status, waiting.attempts, waiting.claim_token) == (S.QUEUED, 0, None)
    assert waiting.send_after > timezone.now() + timedelta(seconds=25)
    assert waiting.last_error == "Waiting: Connection refused"
    again = row(tried)
    assert (again.status, again.attempts, again.attempted_at) == (S.QUEUED, 0, None)


def test_release_leaves_alone_what_another_token_holds():
    token, (message,) = claimed(1)

    assert outbox.release([message], uuid.uuid4()) == 0
    assert row(message).status == S.SENDING


def test_retry_and_failure_are_recorded_with_their_history():
    token, (retried, failed) = claimed(2)
    outbox.try_next(retried, token)

    status = outbox.record_retry(retried, "451 try later", delay=10, max_countdown=300)
    outbox.record_failed(failed, "550 no such user")

    assert status == S.QUEUED
    assert row(retried).status == S.QUEUED
    assert retried.events.get().data["retry_in"] == 10
    assert row(failed).status == S.FAILED
    assert failed.events.get().description == "550 no such user"


def test_cancel_in_chunks_cancels_every_unsent_message_and_nothing_else(monkeypatch):
    monkeypatch.setattr(outbox, "CANCEL_CHUNK", 3)
    campaign = Campaign.objects.create(name="Big", status=CampaignStatus.SENDING)
    queued = [
        MessageFactory(to_email=f"q{n}@example.com", campaign=campaign, kind=Kind.CAMPAIGN)
        for n in range(10)
    ]
    sent = MessageFactory(
        to_email="sent@example.com", campaign=campaign, kind=Kind.CAMPAIGN, status=S.SENT
    )
    other = MessageFactory(to_email="other@example.com", kind=Kind.CAMPAIGN)

    assert campaigns.cancel(campaign) == 10

    assert {row(m).status for m in queued} == {S.CANCELLED}
    assert row(sent).status == S.SENT
    assert row(other).status == S.QUEUED
    campaign.refresh_from_db()
    assert campaign.status == CampaignStatus.CANCELLED


def test_requeue_puts_failed_and_cancelled_back_and_clears_the_claim():
    failed = MessageFactory(status=S.FAILED, attempts=5, claim_token=uuid.uuid4())

    assert outbox.requeue(Message.objects.all()) == 1

    again = row(failed)
    assert (again.status, again.attempts, again.claim_token) == (S.QUEUED, 0, None)
