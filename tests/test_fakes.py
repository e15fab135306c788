"""The slow SMTP server and the fake Postmark API behave as the tests built on them assume."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import threading
import time

import pytest
from anymail.exceptions import AnymailAPIError, AnymailRecipientsRefused
from anymail.message import AnymailMessage
from django.core import mail

from tests.conftest import REPO, tally

DATA = b"Subject: hi\r\n\r\nHello.\r\n"


def connect(server) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", server.port, timeout=5)
    client.ehlo()
    return client


# --- slow_smtp ------------------------------------------------------------------------------


def test_slow_smtp_delays_the_banner_and_every_reply(slow_smtp):
    slow_smtp.delay = 0.2  # margins wide enough for a busy machine
    t0 = time.monotonic()
    client = smtplib.SMTP("127.0.0.1", slow_smtp.port, timeout=5)
    banner = time.monotonic() - t0
    t0 = time.monotonic()
    client.ehlo()
    ehlo = time.monotonic() - t0
    t0 = time.monotonic()
    client.sendmail("a@example.com", ["b@example.com"], DATA)  # MAIL, RCPT, DATA, end
    send = time.monotonic() - t0
    client.quit()

    assert banner >= 0.2
    assert 0.2 <= ehlo < 0.6  # one wait for a multi-line reply, not one per line (>= 1 s)
    assert 0.8 <= send < 1.6  # four replies: MAIL, RCPT, DATA, the end of the data
    assert [m.rcpt_tos for m in slow_smtp.messages] == [["b@example.com"]]
    assert slow_smtp.messages[0].data.endswith(b"Hello.\r\n")


def test_slow_smtp_without_delay_answers_at_once(slow_smtp):
    t0 = time.monotonic()
    client = connect(slow_smtp)
    client.sendmail("a@example.com", ["b@example.com"], DATA)
    client.quit()
    assert time.monotonic() - t0 < 1.0  # no delay (0.2 s a reply would take 1.4 s)


def test_a_programmed_421_at_mail_is_what_smtplib_sees_and_closes(slow_smtp):
    slow_smtp.reply_with(421, "4.7.0 Try again later", times=2, stage="MAIL")
    for _ in range(2):
        client = connect(slow_smtp)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@example.com", ["b@example.com"], DATA)
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            421,
            b"4.7.0 Try again later",
        )
        # The server closed the connection after the 421.
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    client = connect(slow_smtp)  # the third transaction is accepted
    client.sendmail("a@example.com", ["b@example.com"], DATA)
    client.quit()
    assert len(slow_smtp.messages) == 1


def test_a_421_banner_refuses_the_connection(slow_smtp):
    slow_smtp.reply_with(421, "4.7.0 Too many connections", stage="CONNECT")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP("127.0.0.1", slow_smtp.port, timeout=5)
    assert refused.value.smtp_code == 421
    connect(slow_smtp).quit()


@pytest.mark.parametrize("code", [450, 451, 452, 550])
def test_a_programmed_rcpt_reply_refuses_the_recipient(slow_smtp, code):
    slow_smtp.reply_with(code, "4.2.2 Mailbox full", stage="RCPT")
    client = connect(slow_smtp)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        client.sendmail("a@example.com", ["b@example.com"], DATA)
    assert refused.value.recipients == {"b@example.com": (code, b"4.2.2 Mailbox full")}
    client.sendmail("a@example.com", ["c@example.com"], DATA)  # same connection goes on
    client.quit()
    assert tally(slow_smtp, {"b@example.com", "c@example.com"}).lost == 1


def test_a_programmed_reply_at_the_end_of_data_rejects_the_message(slow_smtp):
    slow_smtp.reply_with(451, "4.3.0 Local error", stage="DATA")
    client = connect(slow_smtp)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("a@example.com", ["b@example.com"], DATA)
    assert refused.value.smtp_code == 451
    client.quit()
    assert slow_smtp.messages == []


def test_the_drop_comes_after_the_data_arrived_and_before_the_reply(slow_smtp):
    slow_smtp.drop_after_data()
    client = connect(slow_smtp)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("a@example.com", ["b@example.com"], DATA)
    # In doubt: the server has the bytes, the client got no answer, nothing was accepted.
    assert [m.rcpt_tos for m in slow_smtp.dropped] == [["b@example.com"]]
    assert slow_smtp.dropped[0].data.endswith(b"Hello.\r\n")
    assert slow_smtp.messages == []
    client = connect(slow_smtp)  # one drop only
    client.sendmail("a@example.com", ["b@example.com"], DATA)
    client.quit()
    assert len(slow_smtp.messages) == 1


def test_slow_smtp_counts_connections_open_at_once(slow_smtp):
    clients = [connect(slow_smtp) for _ in range(3)]
    for client in clients:
        client.quit()
    connect(slow_smtp).quit()
    assert slow_smtp.connections == 4
    assert slow_smtp.max_concurrent == 3


def test_slow_smtp_measures_the_rate_of_acceptance(slow_smtp):
    slow_smtp.delay = 0.005  # four replies a message: about 20 ms each
    client = connect(slow_smtp)
    for i in range(10):
        client.sendmail("a@example.com", [f"r{i}@example.com"], DATA)
    client.quit()
    assert 10 < slow_smtp.rate() < 60
    assert sum(slow_smtp.per_second()) == 10


def test_djangos_smtp_backend_sends_to_slow_smtp(slow_smtp):
    sent = mail.send_mail("Hi", "Hello.", None, ["someone@example.com"])
    assert sent == 1
    (message,) = slow_smtp.to("someone@example.com")
    assert message.parsed()["Subject"] == "Hi"


# --- fake_esp -------------------------------------------------------------------------------


def test_anymail_postmark_sends_one_email_through_fake_esp(fake_esp):
    message = AnymailMessage("Hi", "Hello.", to=["someone@example.com"])
    assert message.send() == 1

    (call,) = fake_esp.calls
    assert call.path == "/email"
    assert call.headers["X-Postmark-Server-Token"] == "test"
    assert call.body["To"] == "someone@example.com"
    assert call.body["Subject"] == "Hi"
    assert fake_esp.recipients == ["someone@example.com"]
    status = message.anymail_status
    assert status.status == {"sent"}
    assert status.recipients["someone@example.com"].message_id == status.message_id


def test_anymail_postmark_sends_a_template_batch_with_merge_data(fake_esp):
    message = AnymailMessage(to=["a@example.com", "b@example.com"])
    message.template_id = "welcome"
    message.merge_data = {"a@example.com": {"name": "A"}, "b@example.com": {"name": "B"}}
    message.send()

    (call,) = fake_esp.calls
    assert call.path == "/email/batchWithTemplates"
    assert [m["TemplateModel"] for m in call.messages] == [{"name": "A"}, {"name": "B"}]
    assert sorted(fake_esp.recipients) == ["a@example.com", "b@example.com"]
    ids = {r: s.message_id for r, s in message.anymail_status.recipients.items()}
    assert len(set(ids.values())) == 2
    assert message.anymail_status.status == {"sent"}


def test_anymail_postmark_sends_a_plain_batch(fake_esp):
    message = AnymailMessage("Hi", "Hello.", to=["a@example.com", "b@example.com"])
    message.merge_metadata = {"a@example.com": {"n": "1"}, "b@example.com": {"n": "2"}}
    message.send()

    (call,) = fake_esp.calls
    assert call.path == "/email/batch"
    assert [m["Metadata"] for m in call.messages] == [{"n": "1"}, {"n": "2"}]
    assert message.anymail_status.status == {"sent"}


def test_a_throttled_fake_esp_answers_429_with_retry_after(fake_esp):
    fake_esp.throttle(times=1, retry_after=2)
    with pytest.raises(AnymailAPIError) as error:
        AnymailMessage("Hi", "Hello.", to=["someone@example.com"]).send()
    assert error.value.status_code == 429
    assert error.value.response.headers["Retry-After"] == "2"
    assert fake_esp.recipients == []

    AnymailMessage("Hi", "Hello.", to=["someone@example.com"]).send()  # only once
    assert [c.status for c in fake_esp.calls] == [429, 200]
    assert fake_esp.recipients == ["someone@example.com"]


def test_a_failing_fake_esp_answers_5xx(fake_esp):
    fake_esp.fail(503, times=1)
    with pytest.raises(AnymailAPIError) as error:
        AnymailMessage("Hi", "Hello.", to=["someone@example.com"]).send()
    assert error.value.status_code == 503


def test_fake_esp_latency_is_observed_and_concurrent_calls_counted(fake_esp):
    fake_esp.latency = 0.2
    times: list[float] = []

    def send(i: int) -> None:
        t0 = time.monotonic()
        connection = mail.get_connection()  # a backend (and HTTP session) per thread
        AnymailMessage("Hi", "Hello.", to=[f"r{i}@example.com"], connection=connection).send()
        times.append(time.monotonic() - t0)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(times) == 4 and min(times) >= 0.2
    assert fake_esp.max_concurrent == 4  # in parallel, not one after the other
    assert len(fake_esp.recipients) == 4


def test_fake_esp_refuses_an_inactive_recipient_alone_and_in_a_batch(fake_esp):
    fake_esp.inactive("Bounced@example.com")
    with pytest.raises(AnymailRecipientsRefused):
        AnymailMessage("Hi", "Hello.", to=["bounced@example.com"]).send()
    assert fake_esp.calls[0].status == 422

    message = AnymailMessage("Hi", "Hello.", to=["bounced@example.com", "ok@example.com"])
    message.merge_metadata = {}
    message.send()
    statuses = {r: s.status for r, s in message.anymail_status.recipients.items()}
    assert statuses == {"bounced@example.com": "rejected", "ok@example.com": "sent"}
    assert fake_esp.recipients == ["ok@example.com"]
    assert fake_esp.calls[1].path == "/email/batch"
    assert fake_esp.calls[1].refused == ["bounced@example.com"]


def test_fake_esp_refuses_a_wrong_token(fake_esp, settings):
    settings.ANYMAIL = {**settings.ANYMAIL, "POSTMARK_SERVER_TOKEN": "wrong"}
    with pytest.raises(AnymailAPIError) as error:
        AnymailMessage("Hi", "Hello.", to=["someone@example.com"]).send()
    assert error.value.status_code == 401


def test_fake_esp_keeps_connections_alive(fake_esp):
    connection = mail.get_connection()
    connection.open()
    for i in range(3):
        AnymailMessage("Hi", "Hello.", to=[f"r{i}@example.com"], connection=connection).send()
    connection.close()
    assert fake_esp.connections == 1
    assert len(fake_esp.calls) == 3


def test_worker_env_makes_project_settings_send_to_the_fakes(slow_smtp, fake_esp):
    """A worker process started with ``worker_env()`` sends where the fixture listens."""
    script = (
        "import json, django; from django.conf import settings; django.setup(); "
        "print(json.dumps([settings.EMAIL_BACKEND, getattr(settings, 'EMAIL_PORT', None), "
        "settings.ANYMAIL.get('POSTMARK_API_URL')]))"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MAILER_", "ANYMAIL_"))}
    base.update(DJANGO_SETTINGS_MODULE="project.settings", SMTP_HOST="smtp.example.com")
    seen = []
    for fake in (slow_smtp, fake_esp):
        out = subprocess.run(
            [sys.executable, "-c", script],
            env={**base, **fake.worker_env()},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        seen.append(json.loads(out.stdout.strip().splitlines()[-1]))
    (smtp_backend, smtp_port, _), (esp_backend, _, esp_url) = seen
    assert (smtp_backend, smtp_port) == (
        "django.core.mail.backends.smtp.EmailBackend",
        slow_smtp.port,
    )
    assert (esp_backend, esp_url) == ("anymail.backends.postmark.EmailBackend", fake_esp.url)
