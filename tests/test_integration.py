"""End-to-end behaviour with real services: PostgreSQL, Redis, Celery worker processes and
an SMTP server on 127.0.0.1."""

from __future__ import annotations

import re
import threading
import time

import pytest
from django.contrib.auth.models import User
from django.db import close_old_connections, connection, transaction

from mailer import api, delivery
from mailer.models import Event, Message, MessageStatus
from mailer.signals import user_registered

from .conftest import assert_well_formed, wait_for

pytestmark = pytest.mark.integration


def _status(message: Message) -> str:
    return Message.objects.values_list("status", flat=True).get(pk=message.pk)


def test_user_registered_delivers_welcome_and_verification_through_a_worker(live):
    with transaction.atomic():
        user = User.objects.create_user("ada", "Ada@Example.com", "pw", first_name="Ada")
        user_registered.send(sender=User, user=user, request=None)

    received = wait_for(
        lambda: len(live.to("ada@example.com")) >= 2 and live.to("ada@example.com"),
        message="welcome and verification emails did not arrive",
    )
    assert len(received) == 2
    subjects = set()
    for item in received:
        parsed = item.parsed()
        assert_well_formed(parsed)
        subjects.add(parsed["Subject"])
        assert parsed["X-Mailer-Message-Id"]
    assert any(s.startswith("Welcome to") for s in subjects)
    assert any(s.startswith("Confirm your email") for s in subjects)
    verify = next(m.parsed() for m in received if "Confirm" in m.parsed()["Subject"])
    assert "/mailer/verify/" in verify.get_body(("plain",)).get_content()
    wait_for(lambda: set(Message.objects.values_list("status", flat=True)) == {"sent"})
    assert Event.objects.filter(event_type="sent").count() == 2


def test_one_idempotency_key_twice_makes_one_message_and_one_email(live):
    first = api.send(
        "welcome", to="key@example.com", context={"user_name": "K"}, idempotency_key="k-1"
    )
    second = api.send(
        "welcome", to="key@example.com", context={"user_name": "K"}, idempotency_key="k-1"
    )
    assert first.pk == second.pk
    wait_for(lambda: _status(first) == MessageStatus.SENT)
    time.sleep(1.0)  # give a duplicate every chance to arrive
    assert len(live.to("key@example.com")) == 1
    assert Message.objects.filter(idempotency_key="k-1").count() == 1


@pytest.mark.django_db(transaction=True)
def test_campaign_only_worker_never_takes_transactional_mail(broker, smtp, start_worker):
    campaign_worker = start_worker("campaign-only", "campaign")
    try:
        message = api.send("welcome", to="sep@example.com", context={"user_name": "S"})
        time.sleep(4)
        assert _status(message) == MessageStatus.QUEUED
        assert smtp.to("sep@example.com") == []
        assert "Task mailer.tasks.drain_transactional[" not in campaign_worker.log()
    finally:
        campaign_worker.stop()
    worker = start_worker("transactional-late", "transactional")
    try:
        wait_for(
            lambda: smtp.to("sep@example.com"), message="a transactional worker should send it"
        )
    finally:
        worker.stop()


@pytest.mark.django_db(transaction=True)
def test_delivery_task_run_twice_at_once_sends_each_email_once(broker, smtp):
    messages = [
        api.send("welcome", to=f"twice{i}@example.com", context={"user_name": "T"})
        for i in range(60)
    ]
    barrier = threading.Barrier(2)
    sent_counts: list[int] = []

    def run_task():
        try:
            barrier.wait()
            from mailer.tasks import drain_transactional

            sent_counts.append(drain_transactional.apply().get())
        finally:
            close_old_connections()
            connection.close()

    threads = [threading.Thread(target=run_task) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(sent_counts) == 60
    assert len(smtp.messages) == 60
    assert sorted(r for m in smtp.messages for r in m.rcpt_tos) == sorted(
        m.to_email for m in messages
    )
    # A redelivered task finds nothing left to claim.
    assert delivery.drain("transactional") == 0
    assert len(smtp.messages) == 60


@pytest.mark.django_db(transaction=True)
def test_smtp_outage_makes_mail_wait_with_growing_delays_then_delivers_once(
    broker, smtp, start_worker
):
    worker = start_worker("retrying", MAILER_MAX_ATTEMPTS="2")
    try:
        smtp.stop()
        message = api.send("welcome", to="retry@example.com", context={"user_name": "R"})
        waits = lambda: [  # noqa: E731
            int(w) for w in re.findall(r"mail waits (\d+) s", worker.log(), flags=re.M)
        ]
        wait_for(lambda: len(waits()) >= 4, timeout=60, message=f"no retries:\n{worker.log()}")
        first = waits()[:4]
        assert first[0] < first[-1], first  # the waits grow
        waiting = Message.objects.get(pk=message.pk)
        # Four tries past MAX_ATTEMPTS=2: an outage never uses the email's attempts up.
        assert (waiting.status, waiting.attempts) == (MessageStatus.QUEUED, 0)
        assert waiting.last_error.startswith("Waiting: Connection")
        smtp.start()
        wait_for(lambda: _status(message) == MessageStatus.SENT, timeout=40, message=worker.log())
        time.sleep(1)
        assert len(smtp.to("retry@example.com")) == 1
        assert Message.objects.get(pk=message.pk).attempts == 1
    finally:
        smtp.start()
        worker.stop()


@pytest.mark.django_db(transaction=True)
def test_retries_stop_at_the_maximum_and_the_message_stays_failed(broker, smtp, start_worker):
    worker = start_worker("give-up", MAILER_MAX_ATTEMPTS="3")
    try:
        smtp.handler.refuse["never@example.com"] = "451 4.3.0 Try again later"
        message = api.send("welcome", to="never@example.com", context={"user_name": "N"})
        wait_for(lambda: _status(message) == MessageStatus.FAILED, timeout=40, message=worker.log())
        time.sleep(4)  # longer than the next backoff would be
        failed = Message.objects.get(pk=message.pk)
        assert failed.status == MessageStatus.FAILED
        assert failed.attempts == 3
        assert failed.last_error.startswith("Gave up after 3 attempts")
    finally:
        worker.stop()


def test_recipient_refused_fails_at_once_without_retry(live):
    live.handler.refuse["nobody@example.com"] = "550 5.1.1 No such user here"
    message = api.send("welcome", to="nobody@example.com", context={"user_name": "N"})
    wait_for(lambda: _status(message) == MessageStatus.FAILED)
    failed = Message.objects.get(pk=message.pk)
    assert failed.attempts == 1
    assert "550" in failed.last_error
    time.sleep(2)
    assert Message.objects.get(pk=message.pk).attempts == 1


@pytest.mark.django_db(transaction=True)
def test_two_workers_together_stay_within_the_rate_limit(broker, smtp, start_worker):
    rate = 10
    workers = [
        start_worker(
            f"limited-{i}", MAILER_RATE_LIMIT_TRANSACTIONAL=f"{rate}/s", MAILER_LOG_LEVEL="INFO"
        )
        for i in range(2)
    ]
    try:
        for i in range(300):
            api.send("welcome", to=f"rate{i}@example.com", context={"user_name": "R"})
        wait_for(lambda: smtp.messages, timeout=20)
        start = smtp.messages[0].at
        window = 20.0
        time.sleep(window + 1.5 - (time.monotonic() - start))
        in_window = [m for m in smtp.messages if start + 1.0 <= m.at < start + 1.0 + window]
        measured = len(in_window) / window
        assert rate * 0.9 <= measured <= rate * 1.1, f"{measured:.2f}/s"
        both = [w for w in workers if "sent" in w.log()]
        assert len(both) == 2, "both worker processes should have been sending"
    finally:
        for worker in workers:
            worker.stop()
