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
from mailer.models import (
    Campaign,
    CampaignStatus,
    Claim,
    Event,
    Kind,
    Message,
    MessageStatus,
    Queue,
)
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


def claim_of(token) -> Claim:
    return Claim.objects.get(token=token)


def test_claim_marks_messages_sending_under_a_token_with_a_claim_row():
    token, messages = claimed(3)

    assert [m.status for m in messages] == [S.SENDING] * 3
    assert {row(m).claim_token for m in messages} == {token}
    assert {row(m).attempts for m in messages} == {0}
    hold = claim_of(token)
    assert (hold.queue, hold.tried_through, hold.sent_through) == ("transactional", None, None)
    assert outbox.claim(Queue.TRANSACTIONAL, 3, uuid.uuid4()) == []  # nothing left
    assert Claim.objects.count() == 1  # an empty claim leaves no row


def test_try_next_notes_the_previous_email_sent_and_the_next_one_tried():
    token, (first, second) = claimed(2)

    assert outbox.try_next(first, token)
    assert (claim_of(token).tried_through, claim_of(token).sent_through) == (first.pk, None)
    assert first.attempts == 1

    assert outbox.try_next(second, token, done=outbox.Sent(first, "<id-1@x>"))

    assert (claim_of(token).tried_through, claim_of(token).sent_through) == (second.pk, first.pk)
    assert row(first).status == S.SENDING  # its row is written when the batch ends


def test_finish_writes_the_batch_and_drops_its_claim():
    token, (first, second, third) = claimed(3)
    outbox.try_next(first, token)
    outbox.try_next(second, token, done=outbox.Sent(first, "<id-1@x>"))
    batch = outbox.Batch(token=token, sent=[(outbox.Sent(first, "<id-1@x>"), timezone.now())])

    assert outbox.finish(batch, [third], uncount=[second]) == 2

    sent = row(first)
    assert (sent.status, sent.attempts, sent.provider_message_id) == (S.SENT, 1, "<id-1@x>")
    assert list(first.events.values_list("event_type", flat=True)) == [Event.Type.SENT]
    assert {row(m).status for m in (second, third)} == {S.QUEUED}
    assert {row(m).attempts for m in (second, third)} == {0}
    assert not Claim.objects.filter(token=token).exists()


def test_try_next_refuses_once_the_claim_was_recovered():
    token, (message,) = claimed(1)
    Claim.objects.filter(token=token).delete()  # recovery took it back

    assert not outbox.try_next(message, token)


def test_try_next_refuses_a_message_of_a_cancelled_campaign_and_notes_the_sent_one():
    campaign = Campaign.objects.create(name="Spring", status=CampaignStatus.SENDING)
    token, (first, second) = claimed(2, campaign=campaign, kind=Kind.CAMPAIGN)
    outbox.try_next(first, token)
    Campaign.objects.filter(pk=campaign.pk).update(status=CampaignStatus.CANCELLED)

    assert not outbox.try_next(second, token, done=outbox.Sent(first, "pid"))

    assert claim_of(token).sent_through == first.pk
    assert outbox.release([second], token) == 0
    assert row(second).status == S.CANCELLED


def test_recording_sent_keeps_a_status_a_webhook_already_moved_on():
    token, (message,) = claimed(1)
    Message.objects.filter(pk=message.pk).update(status=S.DELIVERED)

    outbox.record_sent(outbox.Sent(message, "pid"))

    assert row(message).status == S.DELIVERED
    assert row(message).provider_message_id == "pid"


def test_release_hands_untried_claims_back_saying_why():
    token, (untried,) = claimed(1)

    assert outbox.release([untried], token, delay=30, reason="Connection refused") == 1

    waiting = row(untried)
    assert (waiting.status, waiting.attempts, waiting.claim_token) == (S.QUEUED, 0, None)
    assert waiting.send_after > timezone.now() + timedelta(seconds=25)
    assert waiting.last_error == "Waiting: Connection refused"


def test_release_leaves_alone_what_another_token_holds():
    token, (message,) = claimed(1)

    assert outbox.release([message], uuid.uuid4()) == 0
    assert row(message).status == S.SENDING


def lapse(token) -> None:
    Claim.objects.filter(token=token).update(renewed_at=timezone.now() - timedelta(seconds=31))


@pytest.mark.parametrize(("policy", "doubt_status"), [("retry", S.QUEUED), ("fail", S.FAILED)])
def test_recovery_of_a_dead_worker_knows_what_left_what_is_in_doubt_and_what_was_untried(
    policy, doubt_status, settings
):
    settings.MAILER = {**settings.MAILER, "SENDING_LEASE": 30, "STUCK_POLICY": policy}
    token, (sent, doubt, untried) = claimed(3)
    outbox.try_next(sent, token)
    outbox.try_next(doubt, token, done=outbox.Sent(sent, "pid"))  # then kill -9
    lapse(token)

    counts = outbox.recover_stuck()

    assert (counts["sent"], counts["untried"]) == (1, 1)
    assert counts["in_doubt_requeued" if policy == "retry" else "in_doubt_failed"] == 1
    assert (row(sent).status, row(sent).attempts) == (S.SENT, 1)
    assert (row(doubt).status, row(doubt).attempts) == (doubt_status, 1)
    assert f"STUCK_POLICY={policy}" in row(doubt).last_error
    assert (row(untried).status, row(untried).attempts) == (S.QUEUED, 0)
    recovered = dict(Event.objects.values_list("message", "data__recovered"))
    assert recovered == {sent.pk: "sent", doubt.pk: "in doubt", untried.pk: "untried"}
    assert not Claim.objects.exists()


def test_recovery_holds_every_email_of_one_batch_call_in_doubt_and_no_other(settings):
    # An ESP batch call: the claim notes the call's last email tried, the previous
    # call's last sent; one email of the call failed before it and was written at once.
    settings.MAILER = {**settings.MAILER, "SENDING_LEASE": 30, "STUCK_POLICY": "retry"}
    token, (sent_a, sent_b, failed, doubt_a, doubt_b, untried) = claimed(6)
    outbox.try_next(sent_b, token)
    outbox.record_failed(failed, "Template: broken")
    outbox.try_next(doubt_b, token, done=outbox.Sent(sent_b, "pid"))  # then kill -9
    lapse(token)

    counts = outbox.recover_stuck()

    assert (counts["sent"], counts["in_doubt_requeued"], counts["untried"]) == (2, 2, 1)
    assert {row(m).status for m in (sent_a, sent_b)} == {S.SENT}
    assert row(failed).status == S.FAILED
    assert {row(m).status for m in (doubt_a, doubt_b, untried)} == {S.QUEUED}
    assert "STUCK_POLICY=retry" in row(doubt_a).last_error
    assert (row(untried).attempts, row(untried).last_error) == (0, "")


def test_recovery_leaves_a_live_worker_alone():
    token, (message,) = claimed(1)
    lapse(token)

    assert outbox.renew([token]) == 1  # the worker's lease thread
    assert outbox.recover_stuck()["untried"] == 0
    assert row(message).status == S.SENDING


def test_recovery_treats_a_claim_without_its_row_as_in_doubt(settings):
    settings.MAILER = {**settings.MAILER, "SENDING_LEASE": 30, "STUCK_POLICY": "fail"}
    message = MessageFactory(
        status=S.SENDING,
        claim_token=uuid.uuid4(),
        claimed_at=timezone.now() - timedelta(seconds=31),
    )

    assert outbox.recover_stuck()["in_doubt_failed"] == 1
    assert row(message).status == S.FAILED


def test_retry_and_failure_are_recorded_with_their_history():
    token, (retried, failed) = claimed(2)

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
