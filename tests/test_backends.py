"""Every Django email backend a host may configure sends mailer's email: SMTP, console,
file-based, locmem, dummy, mailer's outbox and anymail's ESPs."""

from __future__ import annotations

import email
from email import policy

import pytest
from django.core import mail

from mailer import api, delivery
from mailer.models import Kind, Message, MessageStatus

pytestmark = pytest.mark.django_db

WELCOME = {"user_name": "Ada", "login_url": "http://localhost:8000/"}


def send_one(broker) -> Message:
    api.send("welcome", to="ada@example.com", context=WELCOME)
    assert delivery.drain(Kind.TRANSACTIONAL) == 1
    return Message.objects.get()


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)


def assert_welcome(message: email.message.EmailMessage) -> None:
    assert message["To"] == "ada@example.com"
    assert message.get_body(("plain",)) is not None
    assert "Ada" in message.get_body(("html",)).get_content()


def test_console_backend_prints_the_whole_email(broker, settings, capsys):
    settings.EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"

    assert send_one(broker).status == MessageStatus.SENT

    out = capsys.readouterr().out
    assert "To: ada@example.com" in out
    assert_welcome(parsed(out.split("\n" + "-" * 79)[0].encode()))


def test_filebased_backend_writes_the_email(broker, settings, tmp_path):
    settings.EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    settings.EMAIL_FILE_PATH = str(tmp_path)

    assert send_one(broker).status == MessageStatus.SENT

    (written,) = tmp_path.iterdir()
    assert_welcome(parsed(written.read_bytes().split(b"\n" + b"-" * 79)[0]))


def test_mailer_outbox_backend_writes_one_eml_file(broker, settings, tmp_path):
    settings.EMAIL_BACKEND = "mailer.backends.OutboxBackend"
    settings.EMAIL_FILE_PATH = str(tmp_path)

    assert send_one(broker).status == MessageStatus.SENT

    (written,) = tmp_path.glob("*.eml")
    assert_welcome(parsed(written.read_bytes()))


def test_locmem_backend_keeps_the_email_in_the_outbox(broker, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"

    assert send_one(broker).status == MessageStatus.SENT

    (sent,) = mail.outbox
    assert sent.to == ["ada@example.com"]
    assert_welcome(parsed(sent.message().as_bytes()))


def test_dummy_backend_takes_the_email_and_sends_nothing(broker, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.dummy.EmailBackend"

    assert send_one(broker).status == MessageStatus.SENT


def test_smtp_backend_delivers_to_the_server(broker, smtp):
    assert send_one(broker).status == MessageStatus.SENT

    (received,) = smtp.messages
    assert received.rcpt_tos == ["ada@example.com"]
    assert_welcome(received.parsed())


def test_anymail_test_backend_gets_the_email_with_its_metadata(broker, settings):
    settings.EMAIL_BACKEND = "anymail.backends.test.EmailBackend"

    stored = send_one(broker)

    assert stored.status == MessageStatus.SENT
    (sent,) = mail.outbox
    assert sent.anymail_test_params["metadata"] == {"mailer_message_id": str(stored.uuid)}
    assert stored.provider_message_id == str(sent.anymail_status.message_id)
