"""mailer.delivery in process: drain against a real SMTP server, retries, recovery, classify."""

from __future__ import annotations

import smtplib
import time
from datetime import timedelta

import pytest
import requests
from anymail.exceptions import AnymailAPIError, AnymailRecipientsRefused
from django.core import mail
from django.core.mail.backends.locmem import EmailBackend as LocmemBackend
from django.utils import timezone

from mailer import api, compose, delivery, outbox, rendering, transport
from mailer.exceptions import (
    PermanentSendError,
    ServiceUnavailable,
    Throttled,
    TransientSendError,
)
from mailer.models import Claim, Event, Kind, Message, MessageStatus, Suppression
from tests.conftest import assert_well_formed
from tests.factories import MessageFactory, SuppressionFactory

pytestmark = pytest.mark.django_db

WELCOME = {"user_name": "Ada", "login_url": "http://localhost:8000/"}


def queue(to: str, **fields) -> Message:
    return MessageFactory(to_email=to, **fields)


def make_due(*messages: Message) -> None:
    """Pretend the retry backoff has passed."""
    Message.objects.filter(pk__in=[m.pk for m in messages]).update(
        send_after=timezone.now() - timedelta(seconds=1)
    )


def mailer_settings(settings, **values) -> None:
    settings.MAILER = {**settings.MAILER, **values}


# --- Sending --------------------------------------------------------------------------


def test_drain_sends_each_queued_message_once_and_records_it(smtp, broker):
    messages = [queue(f"user{n}@example.com") for n in range(3)]

    assert delivery.drain(Kind.TRANSACTIONAL) == 3

    assert sorted(r for m in smtp.messages for r in m.rcpt_tos) == [
        "user0@example.com",
        "user1@example.com",
        "user2@example.com",
    ]
    for message in messages:
        message.refresh_from_db()
        assert message.status == MessageStatus.SENT
        assert message.attempts == 1
        assert message.sent_at is not None
        assert message.provider_message_id == f"<{message.uuid}@mailer.test>"
        assert list(message.events.values_list("event_type", flat=True)) == [Event.Type.SENT]
        received = smtp.to(message.to_email)[0].parsed()
        assert_well_formed(received)
        assert received["Message-ID"] == message.provider_message_id
        assert received["X-Mailer-Message-Id"] == str(message.uuid)
        assert received["Subject"] == "Welcome to Mailer Demo, Ada!"


@pytest.mark.parametrize(
    ("name", "address", "envelope"),
    [
        ("Mailer Tests", "noreply@mailer.test", "noreply@mailer.test"),
        ("Zoë Ünal", "news@mailer.test", "news@mailer.test"),
        ("Bücher", "news@bücher.example", "news@xn--bcher-kva.example"),
    ],
)
def test_the_envelope_sender_is_the_bare_address_of_the_from_header(
    smtp, broker, settings, name, address, envelope
):
    settings.MAILER = {**settings.MAILER, "FROM_EMAIL": address, "FROM_NAME": name}
    queue("user@example.com")

    assert delivery.drain(Kind.TRANSACTIONAL) == 1

    (received,) = smtp.messages
    assert received.mail_from == envelope
    assert received.parsed()["From"].addresses[0].display_name == name


@pytest.mark.parametrize("offered", [True, False])
def test_commands_are_pipelined_where_the_server_offers_it(smtp, broker, offered):
    smtp.handler.pipelining = offered
    smtp.handler.refuse["refused@example.com"] = "550 5.1.1 No such user"
    queue("refused@example.com")
    sent = [queue(f"p{n}@example.com") for n in range(3)]

    assert delivery.drain(Kind.TRANSACTIONAL) == 3

    assert smtp.handler.pipelined == (4 if offered else 0)
    assert sorted(r for m in smtp.messages for r in m.rcpt_tos) == sorted(m.to_email for m in sent)
    refused = Message.objects.get(to_email="refused@example.com")
    assert refused.status == MessageStatus.FAILED
    assert "550" in refused.last_error
    for received in smtp.messages:
        assert_well_formed(received.parsed())


def test_a_pipelined_email_arrives_byte_for_byte_with_its_leading_dots(smtp):
    from mailer.backends import SMTPBackend

    body = b"Subject: dots\r\n\r\n.one\r\n..two\r\nmiddle . dot\r\n.\r\nend\r\n"
    backend = SMTPBackend(host="127.0.0.1", port=smtp.port, use_tls=False)
    backend.open()
    try:
        assert backend.connection.sendmail("a@example.com", ["b@example.com"], body) == {}
    finally:
        backend.close()

    (received,) = smtp.messages
    assert received.data.replace(b"\r\n", b"\n") == body.replace(b"\r\n", b"\n")
    assert smtp.handler.pipelined == 1


def test_drain_again_sends_nothing_more(smtp, broker):
    queue("ada@example.com")
    delivery.drain(Kind.TRANSACTIONAL)

    assert delivery.drain(Kind.TRANSACTIONAL) == 0

    assert len(smtp.messages) == 1
    assert Event.objects.filter(event_type=Event.Type.SENT).count() == 1


def test_message_claimed_by_another_worker_is_not_sent_again(smtp, broker):
    queue("ada@example.com", status=MessageStatus.SENDING, claimed_at=timezone.now(), attempts=1)

    assert delivery.drain(Kind.TRANSACTIONAL) == 0

    assert smtp.messages == []


def test_message_sent_through_api_send_arrives(smtp, broker, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        message = api.send("welcome", to="ada@example.com", context=WELCOME, language="fr")
    assert len(callbacks) == 1  # the kick

    delivery.drain(Kind.TRANSACTIONAL)

    received = smtp.to("ada@example.com")[0].parsed()
    assert received["Subject"] == "Bienvenue sur Mailer Demo, Ada !"
    assert "Bienvenue, Ada !" in received.get_body(("plain",)).get_content()
    message.refresh_from_db()
    assert message.status == MessageStatus.SENT


def test_recipient_refused_with_550_fails_at_once(smtp, broker):
    smtp.handler.refuse["x@example.com"] = "550 5.1.1 No such user"
    refused = queue("x@example.com")
    fine = queue("ok@example.com")

    assert delivery.drain(Kind.TRANSACTIONAL) == 1

    refused.refresh_from_db()
    assert refused.status == MessageStatus.FAILED
    assert refused.attempts == 1
    assert "550" in refused.last_error
    assert refused.events.get().event_type == Event.Type.FAILED
    fine.refresh_from_db()
    assert fine.status == MessageStatus.SENT
    assert [m.rcpt_tos for m in smtp.messages] == [["ok@example.com"]]


def test_recipient_deferred_with_450_is_retried_later(smtp, broker):
    smtp.handler.refuse["busy@example.com"] = "450 4.2.1 Mailbox busy, try later"
    message = queue("busy@example.com")
    before = timezone.now()

    assert delivery.drain(Kind.TRANSACTIONAL) == 0

    message.refresh_from_db()
    assert message.status == MessageStatus.QUEUED
    assert message.attempts == 1
    assert message.send_after > before
    assert "450" in message.last_error
    event = message.events.get()
    assert event.event_type == Event.Type.DEFERRED
    assert event.data["attempt"] == 1
    # Not yet due: a second drain leaves it alone.
    assert delivery.drain(Kind.TRANSACTIONAL) == 0
    message.refresh_from_db()
    assert message.attempts == 1


def test_unreachable_server_makes_mail_wait_with_growing_delays_never_fail(smtp, broker, settings):
    mailer_settings(settings, MAX_ATTEMPTS=2, RETRY_BACKOFF_BASE=30, RETRY_JITTER=0)
    transport.outage.recovered()
    messages = [queue("ada@example.com"), queue("bob@example.com")]
    smtp.stop()

    waits = []
    for _ in range(4):  # twice past MAX_ATTEMPTS: an outage never uses attempts up
        before = timezone.now()
        assert delivery.drain(Kind.TRANSACTIONAL) == 0
        for message in messages:
            message.refresh_from_db()
            assert message.status == MessageStatus.QUEUED
            assert message.attempts == 0
            assert message.claim_token is None
            assert message.last_error.startswith("Waiting: Connection")
        waits.append(round((messages[0].send_after - before).total_seconds()))
        make_due(*messages)

    assert waits == [30, 60, 120, 240]
    assert not Event.objects.filter(event_type=Event.Type.FAILED).exists()
    smtp.start()
    assert delivery.drain(Kind.TRANSACTIONAL) == 2
    assert sorted(r for m in smtp.messages for r in m.rcpt_tos) == [
        "ada@example.com",
        "bob@example.com",
    ]
    for message in messages:
        message.refresh_from_db()
        assert message.status == MessageStatus.SENT
        assert message.attempts == 1


def test_transient_refusals_stop_at_max_attempts_and_the_message_fails(smtp, broker, settings):
    mailer_settings(settings, MAX_ATTEMPTS=2, RETRY_JITTER=0)
    smtp.handler.refuse["busy@example.com"] = "451 4.3.0 Try later"
    message = queue("busy@example.com")

    delivery.drain(Kind.TRANSACTIONAL)
    make_due(message)
    delivery.drain(Kind.TRANSACTIONAL)

    message.refresh_from_db()
    assert message.status == MessageStatus.FAILED
    assert message.attempts == 2
    assert message.last_error.startswith("Gave up after 2 attempts")
    assert list(message.events.order_by("id").values_list("event_type", flat=True)) == [
        Event.Type.DEFERRED,
        Event.Type.FAILED,
    ]


def test_retry_longer_than_max_countdown_waits_scheduled_in_the_database(smtp, broker, settings):
    mailer_settings(settings, RETRY_BACKOFF_BASE=600, RETRY_JITTER=0, MAX_COUNTDOWN=300)
    smtp.handler.refuse["busy@example.com"] = "452 4.2.2 Mailbox full"
    message = queue("busy@example.com")

    delivery.drain(Kind.TRANSACTIONAL)

    message.refresh_from_db()
    assert message.status == MessageStatus.SCHEDULED
    make_due(message)
    assert outbox.wake_due() == 1
    message.refresh_from_db()
    assert message.status == MessageStatus.QUEUED


def test_suppression_added_after_queueing_stops_the_send(smtp, broker):
    message = queue("ada@example.com")
    SuppressionFactory(email="ADA@example.com", scope=Suppression.Scope.ALL)

    assert delivery.drain(Kind.TRANSACTIONAL) == 0

    message.refresh_from_db()
    assert message.status == MessageStatus.SUPPRESSED
    assert smtp.messages == []


def test_marketing_suppression_added_after_queueing_does_not_stop_transactional(smtp, broker):
    message = queue("ada@example.com")
    SuppressionFactory(
        email="ada@example.com",
        scope=Suppression.Scope.MARKETING,
        reason=Suppression.Reason.UNSUBSCRIBE,
    )

    assert delivery.drain(Kind.TRANSACTIONAL) == 1

    message.refresh_from_db()
    assert message.status == MessageStatus.SENT


def test_message_whose_template_is_gone_fails_permanently(smtp, broker):
    message = queue("ada@example.com", template_slug="deleted-template")

    assert delivery.drain(Kind.TRANSACTIONAL) == 0

    message.refresh_from_db()
    assert message.status == MessageStatus.FAILED
    assert "deleted-template" in message.last_error
    assert smtp.messages == []


# --- Classifying errors -------------------------------------------------------------------


def esp_error(status: int) -> AnymailAPIError:
    response = requests.Response()
    response.status_code = status
    response.reason = "Reason"
    response._content = b'{"error": "x"}'
    return AnymailAPIError("ESP said no", status_code=status, response=response)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (smtplib.SMTPResponseException(421, b"4.7.0 Try again later"), Throttled),
        (smtplib.SMTPResponseException(450, b"4.2.1 Busy"), TransientSendError),
        (smtplib.SMTPResponseException(554, b"5.7.1 Rejected"), PermanentSendError),
        (smtplib.SMTPSenderRefused(451, b"4.3.0 Busy", "noreply@mailer.test"), TransientSendError),
        (smtplib.SMTPDataError(552, b"5.3.4 Too big"), PermanentSendError),
        (smtplib.SMTPRecipientsRefused({"a@x.test": (550, b"No")}), PermanentSendError),
        (smtplib.SMTPRecipientsRefused({"a@x.test": (452, b"Full")}), TransientSendError),
        (smtplib.SMTPServerDisconnected("gone"), ServiceUnavailable),
        (ConnectionRefusedError(111, "Connection refused"), ServiceUnavailable),
        (TimeoutError("timed out"), ServiceUnavailable),
        (esp_error(429), Throttled),
        (esp_error(503), ServiceUnavailable),
        (esp_error(400), PermanentSendError),
        (AnymailAPIError("no response"), ServiceUnavailable),
        (AnymailRecipientsRefused("all refused"), PermanentSendError),
    ],
)
def test_classify_sorts_errors_into_outage_transient_and_permanent(exc, expected):
    assert type(transport.classify(exc)) is expected


def test_classify_keeps_smtp_code_in_the_error_text():
    error = transport.classify(smtplib.SMTPResponseException(554, b"5.7.1 Rejected"))

    assert "554" in str(error)
    assert "5.7.1 Rejected" in str(error)


def test_classify_makes_an_unknown_error_transient_never_permanent():
    error = transport.classify(KeyError("bug"))

    assert type(error) is TransientSendError
    assert "KeyError" in str(error)


# --- Recovery and retry -------------------------------------------------------------------


def test_requeue_puts_failed_messages_back_with_attempts_reset():
    failed = queue("ada@example.com", status=MessageStatus.FAILED, attempts=5, last_error="550")
    sent = queue("bob@example.com", status=MessageStatus.SENT, attempts=1)

    assert outbox.requeue(Message.objects.all()) == 1

    failed.refresh_from_db()
    assert failed.status == MessageStatus.QUEUED
    assert failed.attempts == 0
    assert failed.last_error == ""
    assert failed.send_after is None
    sent.refresh_from_db()
    assert sent.status == MessageStatus.SENT


# --- anymail --------------------------------------------------------------------------


def test_anymail_backend_gets_metadata_header_and_returns_provider_id(broker, settings):
    settings.EMAIL_BACKEND = "anymail.backends.test.EmailBackend"
    messages = [queue("ada@example.com"), queue("bob@example.com")]

    assert delivery.drain(Kind.TRANSACTIONAL) == 2

    assert len(mail.outbox) == 2
    for message in messages:
        message.refresh_from_db()
        sent = next(e for e in mail.outbox if e.to == [message.to_email])
        assert message.status == MessageStatus.SENT
        assert message.provider_message_id == str(sent.anymail_status.message_id)
        assert sent.anymail_test_params["metadata"] == {"mailer_message_id": str(message.uuid)}
        headers = sent.anymail_test_params["extra_headers"]
        assert headers["X-Mailer-Message-Id"] == str(message.uuid)
        assert sent.anymail_test_params["tags"] == ["welcome"]
    assert {m.provider_message_id for m in messages} == {"0", "1"}


def test_anymail_server_error_makes_the_email_wait(broker, settings, monkeypatch):
    settings.EMAIL_BACKEND = "anymail.backends.test.EmailBackend"
    original = compose.build_email

    def failing(message, compiled, connection=None, link_cache=None):
        email = original(message, compiled, connection)
        email.anymail_test_response = esp_error(503)
        return email

    monkeypatch.setattr(compose, "build_email", failing)
    message = queue("ada@example.com")

    assert delivery.drain(Kind.TRANSACTIONAL) == 0

    message.refresh_from_db()
    assert message.status == MessageStatus.QUEUED  # an ESP outage: the email waits
    assert message.attempts == 0
    assert "503" in message.last_error


def test_non_ascii_display_name_and_plain_address_survive_the_fast_smtp_path(smtp, broker):
    from mailer.models import Contact

    contact = Contact.objects.create(email="zoe@example.com", name="Zoë Ærøskøbing, Jr.")
    queue("zoe@example.com", contact=contact)

    assert delivery.drain(Kind.TRANSACTIONAL) == 1

    (received,) = smtp.to("zoe@example.com")
    parsed = received.parsed()
    assert received.rcpt_tos == ["zoe@example.com"]
    assert parsed["To"].addresses[0].display_name == "Zoë Ærøskøbing, Jr."
    assert parsed["To"].addresses[0].addr_spec == "zoe@example.com"
    assert not [part.defects for part in parsed.walk() if part.defects]


# --- Faults, in process (real processes are killed in tests/test_faults.py) ---------------


class Watching(LocmemBackend):
    """locmem, but before each email it reads the rows as another process would: every
    earlier email must already be recorded sent, and this one marked tried."""

    seen: list[tuple[int, int, bool]] = []
    on_send = None

    def send_messages(self, messages):
        for email in messages:
            pk = int(Message.objects.get(uuid=email.extra_headers["X-Mailer-Message-Id"]).pk)
            hold = Claim.objects.get()
            Watching.seen.append((pk, hold.sent_through, hold.tried_through))
            if Watching.on_send:
                Watching.on_send(len(Watching.seen))
        return super().send_messages(messages)


@pytest.fixture
def watching(settings):
    settings.EMAIL_BACKEND = "tests.test_delivery.Watching"
    Watching.seen, Watching.on_send = [], None
    yield Watching
    Watching.on_send = None
    delivery.clear_stop()


def test_each_outcome_is_recorded_before_the_next_email_goes_out(broker, watching):
    for n in range(5):
        queue(f"r{n}@example.com")

    assert delivery.drain(Kind.TRANSACTIONAL) == 5

    # Each email went out with the one before it noted as sent and itself as tried: a
    # crash at any moment leaves at most the one on the wire in doubt.
    ids = [pk for pk, _, _ in watching.seen]
    assert ids == sorted(ids)
    assert [(sent, tried) for _, sent, tried in watching.seen] == list(
        zip([None, *ids[:-1]], ids, strict=True)
    )
    assert Message.objects.filter(status=MessageStatus.SENT).count() == 5
    assert not Claim.objects.exists()


def _notes_ahead(captured) -> int:
    return sum(1 for query in captured if query.get("ahead"))


@pytest.mark.django_db(transaction=True)
def test_a_note_sent_ahead_is_committed_before_its_email_goes_out(broker, watching):
    # Outside a transaction the note travels on its own connection while the email is
    # composed; the backend, reading committed rows, still sees it in place.
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for n in range(5):
        queue(f"r{n}@example.com")

    with CaptureQueriesContext(connection) as captured:
        assert delivery.drain(Kind.TRANSACTIONAL) == 5

    assert _notes_ahead(captured) == (5 if connection.vendor == "postgresql" else 0)
    ids = [pk for pk, _, _ in watching.seen]
    assert [(sent, tried) for _, sent, tried in watching.seen] == list(
        zip([None, *ids[:-1]], ids, strict=True)
    )
    assert Message.objects.filter(status=MessageStatus.SENT).count() == 5
    assert not Claim.objects.exists()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_lost_note_connection_falls_back_to_the_plain_way_without_a_gap(
    broker, watching, test_database_url
):
    # PostgreSQL ends the note connection mid-batch: the next note is written on
    # Django's connection, every email still goes out once with its note in place.
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from mailer import outbox

    def end_note_session(count):
        if count == 2:
            pid = outbox._local.notes.conn.pgconn.backend_pid
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid])

    watching.on_send = end_note_session
    for n in range(5):
        queue(f"r{n}@example.com")

    with CaptureQueriesContext(connection) as captured:
        assert delivery.drain(Kind.TRANSACTIONAL) == 5

    assert _notes_ahead(captured) == 3  # then the plain way for a few seconds
    ids = [pk for pk, _, _ in watching.seen]
    assert [(sent, tried) for _, sent, tried in watching.seen] == list(
        zip([None, *ids[:-1]], ids, strict=True)
    )
    assert Message.objects.filter(status=MessageStatus.SENT).count() == 5


def test_a_stop_request_finishes_the_email_on_the_wire_and_hands_back_the_rest(broker, watching):
    messages = [queue(f"r{n}@example.com") for n in range(6)]
    watching.on_send = lambda count: delivery.request_stop() if count == 2 else None

    assert delivery.drain(Kind.TRANSACTIONAL) == 2

    statuses = [Message.objects.get(pk=m.pk) for m in messages]
    assert [m.status for m in statuses] == ["sent"] * 2 + ["queued"] * 4
    assert {m.attempts for m in statuses[2:]} == {0}  # handed back untried
    assert {m.claim_token for m in statuses[2:]} == {None}
    assert len(mail.outbox) == 2


def test_an_unreachable_rate_limit_store_makes_mail_wait_never_fail(broker, settings, smtp):
    mailer_settings(
        settings,
        RATE_LIMITS={"transactional": "100/s"},
        REDIS_URL="redis://127.0.0.1:1/0",  # nothing listens there
        RATE_STORE_WAIT=1,
    )
    messages = [queue(f"r{n}@example.com") for n in range(3)]

    assert delivery.drain(Kind.TRANSACTIONAL) == 0

    for message in messages:
        message.refresh_from_db()
        assert (message.status, message.attempts) == (MessageStatus.QUEUED, 0)
        assert message.last_error == "Waiting: the rate-limit store is unavailable"
    assert smtp.messages == []
    assert not Event.objects.filter(event_type=Event.Type.FAILED).exists()
    # The store is back (the broker's Redis carries the bucket again): all of it goes.
    mailer_settings(settings, REDIS_URL=None)
    make_due(*messages)
    assert delivery.drain(Kind.TRANSACTIONAL) == 3


@pytest.mark.django_db(transaction=True)
def test_a_live_worker_keeps_renewing_the_lease_on_a_slow_batch(broker, settings, watching):
    mailer_settings(settings, SENDING_LEASE=3)  # renewed every second
    for n in range(3):
        queue(f"r{n}@example.com")
    renewed_at = []

    def slow(count):
        renewed_at.append(Claim.objects.get().renewed_at)
        time.sleep(1.3)

    watching.on_send = slow

    assert delivery.drain(Kind.TRANSACTIONAL) == 3

    assert renewed_at[0] < renewed_at[1] < renewed_at[2]  # renewed while it was held


def _queries_to_drain(count: int) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from mailer.models import Contact

    Message.objects.all().delete()
    rendering.forget_templates()
    for n in range(count):
        contact = Contact.objects.create(email=f"c{count}-{n}@example.com", name="Ada")
        queue(contact.email, contact=contact)
    with CaptureQueriesContext(connection) as captured:
        assert delivery.drain(Kind.TRANSACTIONAL) == count
    return len(captured)


def test_a_batch_costs_one_statement_per_email_beyond_a_fixed_few(smtp, broker, monkeypatch):
    # Contacts, campaigns and variants come with the claim; the only statement per email
    # is the one that records the previous email and marks this one tried (on SQLite,
    # the same few statements in one transaction).
    from django.db import connection

    from mailer import notify

    # Lookups a process makes once in a while (the webhook endpoints, every few seconds)
    # are not per email: made before, and not again while this test runs.
    monkeypatch.setattr(notify, "_ENDPOINTS_TTL", 3600.0)
    _queries_to_drain(2)
    four, eight, twelve = (_queries_to_drain(n) for n in (4, 8, 12))

    assert twelve - eight == eight - four
    per_email = (twelve - four) / 8
    assert per_email == (1 if connection.vendor == "postgresql" else 5)
