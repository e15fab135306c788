"""Adaptive throttling: a server's "slow down" halves the queue's speed for every process,
the emails concerned wait, and the speed comes back step by step."""

from __future__ import annotations

import smtplib
from datetime import timedelta

import pytest
import requests
from anymail.exceptions import AnymailAPIError
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from mailer import delivery, throttle, transport
from mailer.exceptions import ServiceUnavailable, Throttled, TransientSendError
from mailer.models import Kind, Message, MessageStatus, Queue, QueueThrottle
from tests.factories import MessageFactory

pytestmark = pytest.mark.django_db

SLOW_DOWN = "421 4.7.0 Try again later, closing connection"


def esp_error(status: int, **headers: str) -> AnymailAPIError:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers)
    return AnymailAPIError("ESP said no", status_code=status, response=response)


@pytest.mark.parametrize(
    ("error", "throttled"),
    [
        (smtplib.SMTPResponseException(421, b"4.7.0 Try again later"), True),
        (smtplib.SMTPResponseException(421, b"Service shutting down"), True),
        (smtplib.SMTPResponseException(450, b"4.7.1 Rate limited, slow down"), True),
        (
            smtplib.SMTPResponseException(451, b"4.7.28 Our system has detected an unusual rate"),
            True,
        ),
        (smtplib.SMTPResponseException(451, b"4.3.0 Temporary local problem"), False),
        (smtplib.SMTPResponseException(452, b"4.5.3 Too many recipients"), False),
        (smtplib.SMTPRecipientsRefused({"a@example.com": (421, b"4.7.0 Try later")}), True),
        (smtplib.SMTPRecipientsRefused({"a@example.com": (450, b"4.2.1 Mailbox busy")}), False),
        (esp_error(429), True),
        (esp_error(503), False),
    ],
)
def test_slow_down_replies_are_told_apart_from_other_temporary_errors(error, throttled):
    sorted_as = transport.classify(error)

    assert isinstance(sorted_as, TransientSendError)  # never a failure
    assert isinstance(sorted_as, Throttled) is throttled


def test_an_esp_retry_after_is_kept_in_seconds_or_as_a_date():
    assert transport.classify(esp_error(429, **{"Retry-After": "7"})).retry_after == 7.0
    when = timezone.now() + timedelta(seconds=90)
    dated = esp_error(429, **{"Retry-After": when.strftime("%a, %d %b %Y %H:%M:%S GMT")})
    assert 85 <= transport.classify(dated).retry_after <= 91
    assert transport.classify(esp_error(429)).retry_after is None
    assert isinstance(transport.classify(esp_error(429)), ServiceUnavailable)


def test_each_slow_down_halves_the_speed_once_and_quiet_brings_it_back(settings):
    settings.MAILER = {**settings.MAILER, "THROTTLE_RECOVERY": 30}
    t0 = timezone.now()

    assert throttle.speed(Queue.CAMPAIGN, t0).factor == 1.0
    assert throttle.slow_down(Queue.CAMPAIGN, SLOW_DOWN, t0).factor == 0.5
    # The pool's other connections meet the same reply a moment later: the same event.
    assert throttle.slow_down(Queue.CAMPAIGN, SLOW_DOWN, t0 + timedelta(seconds=1)).factor == 0.5
    assert throttle.slow_down(Queue.CAMPAIGN, SLOW_DOWN, t0 + timedelta(seconds=5)).factor == 0.25
    for n in range(6, 12):
        throttle.slow_down(Queue.CAMPAIGN, SLOW_DOWN, t0 + timedelta(seconds=3 * n))
    last = t0 + timedelta(seconds=33)
    assert throttle.speed(Queue.CAMPAIGN, last).factor == throttle.SLOWEST

    # A tenth back per quiet 30 s, up to full speed; the other queue never slowed.
    assert throttle.speed(Queue.CAMPAIGN, last + timedelta(seconds=29)).factor == 0.1
    assert throttle.speed(Queue.CAMPAIGN, last + timedelta(seconds=30)).factor == 0.2
    assert throttle.speed(Queue.CAMPAIGN, last + timedelta(seconds=150)).factor == 0.6
    assert not throttle.speed(Queue.CAMPAIGN, last + timedelta(seconds=270)).throttled
    assert throttle.speed(Queue.TRANSACTIONAL, last).factor == 1.0
    assert QueueThrottle.objects.get().since == t0


def test_a_slower_queue_uses_fewer_connections_and_a_lower_rate():
    half = throttle.Speed(0.5)
    assert half.connections(8) == 4
    assert half.connections(1) == 1
    assert throttle.Speed(0.1).connections(40) == 4
    assert half.rate(100.0) == 50.0
    assert half.rate(None) is None


def test_a_slow_down_reply_defers_the_email_and_slows_the_queue(smtp, broker, settings, caplog):
    settings.MAILER = {**settings.MAILER, "THROTTLE_WAIT": 45}
    smtp.handler.refuse["m2@example.com"] = SLOW_DOWN
    messages = [MessageFactory(to_email=f"m{n}@example.com") for n in range(5)]

    sent = delivery.drain(Kind.TRANSACTIONAL)

    assert sent == 2  # m0 and m1 went before the server asked us to slow down
    rows = {m.to_email: m for m in Message.objects.all()}
    assert rows["m0@example.com"].status == rows["m1@example.com"].status == MessageStatus.SENT
    waiting = [rows[f"m{n}@example.com"] for n in range(2, 5)]
    for row in waiting:
        assert row.status == MessageStatus.QUEUED  # waits: never failed
        assert row.attempts == 0  # the server's slowness is not the email's fault
        assert row.last_error.startswith("Waiting: throttled: SMTP server asks to slow down")
        assert row.send_after >= timezone.now() + timedelta(seconds=40)
    assert throttle.speed(Queue.TRANSACTIONAL).factor == 0.5
    assert "transactional queue throttled by the server" in caplog.text
    assert "sending at 50%" in caplog.text
    assert len(messages) == 5


def test_an_esp_retry_after_sets_how_long_the_emails_wait(broker, settings):
    settings.EMAIL_BACKEND = "anymail.backends.test.EmailBackend"
    settings.ANYMAIL = {**getattr(settings, "ANYMAIL", {}), "TEST_SEND_DEFAULTS": {}}
    MessageFactory(to_email="e@example.com")

    def throttled(*args, **kwargs):
        raise esp_error(429, **{"Retry-After": "120"})

    from anymail.backends.test import EmailBackend

    original = EmailBackend.send_messages
    EmailBackend.send_messages = throttled
    try:
        assert delivery.drain(Kind.TRANSACTIONAL) == 0
    finally:
        EmailBackend.send_messages = original

    row = Message.objects.get()
    assert row.status == MessageStatus.QUEUED and row.attempts == 0
    assert row.send_after >= timezone.now() + timedelta(seconds=115)
    assert throttle.speed(Queue.TRANSACTIONAL).throttled


@pytest.mark.django_db(transaction=True)
def test_a_throttled_pool_sends_over_fewer_connections(smtp, broker, settings):
    settings.MAILER = {
        **settings.MAILER,
        "CONNECTIONS": {"transactional": 4, "campaign": 1},
        "BATCH_SIZE": 4,
    }
    QueueThrottle.objects.create(
        queue=Queue.TRANSACTIONAL, factor=0.5, reason=SLOW_DOWN, signalled_at=timezone.now()
    )
    smtp.handler.delay = 0.03
    for n in range(24):
        MessageFactory(to_email=f"f{n}@example.com")

    assert delivery.drain(Kind.TRANSACTIONAL) == 24

    assert smtp.handler.most_in_flight == 2


def test_a_throttled_queue_keeps_to_its_lower_rate(smtp, broker, settings):
    settings.MAILER = {**settings.MAILER, "RATE_LIMITS": {"transactional": "20/s"}}
    QueueThrottle.objects.create(
        queue=Queue.TRANSACTIONAL, factor=0.5, reason=SLOW_DOWN, signalled_at=timezone.now()
    )
    for n in range(25):
        MessageFactory(to_email=f"r{n}@example.com")

    assert delivery.drain(Kind.TRANSACTIONAL) == 25

    times = sorted(m.at for m in smtp.messages)[10:]  # after the first burst
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert rate <= 10 * 1.1, f"{rate:.1f}/s"


def _staff(*codenames: str) -> Client:
    user = User.objects.create_user("ops", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def test_the_admin_shows_a_throttled_queue_and_only_change_permission_resets_it(settings):
    settings.MAILER = {**settings.MAILER, "CONNECTIONS": {"campaign": 8, "transactional": 1}}
    throttle.slow_down(Queue.CAMPAIGN, SLOW_DOWN)
    url = "/admin/mailer/queuethrottle/"

    viewer = _staff("view_queuethrottle")
    page = viewer.get(url)
    assert page.status_code == 200
    assert "50%" in page.content.decode() and "4 of 8" in page.content.decode()
    assert "4.7.0 Try again later" in page.content.decode()
    refused = viewer.post(
        url, {"action": "back_to_full_speed", "_selected_action": [Queue.CAMPAIGN.value]}
    )
    assert refused.status_code in (200, 302, 403)
    assert throttle.speed(Queue.CAMPAIGN).throttled

    User.objects.all().delete()
    operator = _staff("view_queuethrottle", "change_queuethrottle")
    operator.post(url, {"action": "back_to_full_speed", "_selected_action": [Queue.CAMPAIGN.value]})
    assert not throttle.speed(Queue.CAMPAIGN).throttled
