"""DKIM on the SMTP path: what goes on the wire verifies against the record we print."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import dkim
import pytest
from django.core import mail
from django.core.management import CommandError, call_command

from mailer import api, campaigns, delivery, dkimsign
from mailer.backends import SMTPBackend
from mailer.checks import check_dkim, check_settings
from mailer.mime import PreparedEmail
from mailer.models import Campaign, Contact, Kind, MessageStatus
from tests.conftest import FROM_EMAIL, assert_well_formed, wait_for
from tests.factories import MessageFactory, everyone_segment, marketing_template

pytestmark = pytest.mark.django_db

DOMAIN = "mailer.test"  # the domain of conftest's FROM_EMAIL
SELECTOR = "mail2026"
POSTAL = "1 Test St"
NEWSLETTER = """<html><body><h1>Hello {{ contact.first_name }}</h1>
<p><a href="https://example.com/sale">See the sale</a></p>
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> · {{ postal_address }}</p></body></html>"""


# --- Keys, made here and never committed ----------------------------------------------------


def openssl_key(bits: int = 2048, *, traditional: bool = False) -> bytes:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the DKIM tests make their keys with the openssl command", pytrace=False)
    pem = subprocess.run(
        [openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}"],
        capture_output=True,
        check=True,
    ).stdout
    if traditional:  # PKCS#1, "BEGIN RSA PRIVATE KEY"
        pem = subprocess.run(
            [openssl, "rsa", "-traditional"], input=pem, capture_output=True, check=True
        ).stdout
    return pem


@pytest.fixture(scope="session")
def private_pem() -> bytes:
    return openssl_key()


@pytest.fixture
def key_file(private_pem, tmp_path) -> Path:
    path = tmp_path / "dkim.pem"
    path.write_bytes(private_pem)
    path.chmod(0o600)
    return path


def dkim_settings(settings, **values) -> None:
    settings.MAILER = {
        **settings.MAILER,
        "DKIM_DOMAIN": DOMAIN,
        "DKIM_SELECTOR": SELECTOR,
        **values,
    }


@pytest.fixture
def signing(smtp, settings, key_file):
    """The SMTP server, with this process signing for DOMAIN with the key in key_file."""
    dkim_settings(settings, DKIM_PRIVATE_KEY_FILE=str(key_file))
    return smtp


def printed_record(**options) -> tuple[str, str, str]:
    """(name, value, whole output) of ``mailer_dkim_record``."""
    out = io.StringIO()
    call_command("mailer_dkim_record", stdout=out, **options)
    text = out.getvalue()
    name = re.search(r"^Name:\s+(\S+)$", text, re.M).group(1)
    value = re.search(r"^Value:\s+(.+)$", text, re.M).group(1)
    return name, value, text


def dns_from_command(**options):
    """A dnsfunc for dkim.verify that answers with the record the command printed."""
    name, value, _ = printed_record(**options)

    def dnsfunc(query: bytes, timeout: int = 5) -> bytes | None:
        return value.encode("ascii") if query.decode().rstrip(".") == name else None

    return dnsfunc


def split_signature(data: bytes) -> tuple[bytes, bytes]:
    """The leading DKIM-Signature header field (with its folded lines), and the rest."""
    assert data.startswith(b"DKIM-Signature: "), data[:80]
    end = 0
    while True:
        end = data.index(b"\r\n", end) + 2
        if data[end : end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]


def tags(signature: bytes) -> dict[str, str]:
    value = signature.split(b":", 1)[1].decode("ascii")
    value = re.sub(r"\s+", "", value)
    return dict(part.split("=", 1) for part in value.split(";") if part)


def verifies(data: bytes, dnsfunc) -> bool:
    return dkim.verify(data, dnsfunc=dnsfunc)


# --- Every kind of mail, as received by a real SMTP server ----------------------------------


def test_transactional_mail_is_signed_and_verifies_against_the_printed_record(
    signing, broker, private_pem, caplog
):
    MessageFactory(to_email="ada@example.com")

    with caplog.at_level(logging.DEBUG):
        assert delivery.drain(Kind.TRANSACTIONAL) == 1

    (received,) = signing.messages
    assert verifies(received.data, dns_from_command())
    signature, _ = split_signature(received.data)
    fields = tags(signature)
    assert (fields["d"], fields["s"], fields["a"], fields["c"]) == (
        DOMAIN,
        SELECTOR,
        "rsa-sha256",
        "relaxed/relaxed",
    )
    # Only headers the email has, From, To and Subject over-signed against additions.
    assert fields["h"].split(":") == [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "from",
        "to",
        "subject",
    ]
    assert_well_formed(received.parsed())
    assert key_body(private_pem) not in caplog.text


@pytest.fixture
def newsletter_campaign(settings) -> Campaign:
    settings.MAILER = {**settings.MAILER, "POSTAL_ADDRESS": POSTAL}
    template = marketing_template("newsletter", "News for {{ contact.first_name }}", NEWSLETTER)
    Contact.objects.create(email="reader@example.com", name="Reader", consent="granted")
    campaign = Campaign.objects.create(name="Spring sale", template=template)
    campaign.segments.set([everyone_segment()])
    campaigns.send_now(campaign)
    campaigns.launch(campaign.pk)
    return campaign


def test_campaign_mail_is_signed_with_its_unsubscribe_headers(signing, newsletter_campaign):
    assert delivery.drain(Kind.CAMPAIGN) == 1

    (received,) = signing.messages
    assert verifies(received.data, dns_from_command())
    signed = tags(split_signature(received.data)[0])["h"].split(":")
    # RFC 8058: the one-click unsubscribe headers must be covered by the signature.
    assert {"list-unsubscribe", "list-unsubscribe-post"} <= set(signed)
    assert received.parsed()["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_drip_mail_goes_out_on_the_campaign_queue_signed(signing, broker, settings):
    settings.MAILER = {**settings.MAILER, "POSTAL_ADDRESS": POSTAL}
    marketing_template("drip-day-1", "Day one", NEWSLETTER)
    contact = Contact.objects.create(email="drip@example.com", name="Drip", consent="granted")
    message = MessageFactory(
        kind=Kind.DRIP, to_email=contact.email, contact=contact, template_slug="drip-day-1"
    )

    assert delivery.drain(Kind.TRANSACTIONAL) == 0
    assert delivery.drain(Kind.CAMPAIGN) == 1

    (received,) = signing.messages
    assert verifies(received.data, dns_from_command())
    assert "list-unsubscribe" in tags(split_signature(received.data)[0])["h"]
    message.refresh_from_db()
    assert message.status == MessageStatus.SENT


def test_mail_through_djangos_own_path_is_signed_too(signing):
    """Not a PreparedEmail, or one with Cc: SMTPBackend builds Django's envelope."""
    backend = SMTPBackend()
    plain = mail.EmailMessage(
        "Plain Django", "Body\n", FROM_EMAIL, ["to@example.com"], cc=["cc@example.com"]
    )
    prepared = PreparedEmail(
        subject="Prepared with Cc",
        text="Text",
        html="<p>HTML</p>",
        message_id="<cc-1@mailer.test>",
        from_email=FROM_EMAIL,
        to=["to@example.com"],
        cc=["cc@example.com"],
    )

    assert backend.send_messages([plain, prepared]) == 2

    dnsfunc = dns_from_command()
    first, second = signing.messages
    assert sorted(first.rcpt_tos) == ["cc@example.com", "to@example.com"]
    assert first.mail_from == FROM_EMAIL
    assert verifies(first.data, dnsfunc)
    assert verifies(second.data, dnsfunc)
    assert "cc" in tags(split_signature(first.data)[0])["h"].split(":")


def test_without_a_dkim_domain_nothing_is_signed(smtp, broker, key_file, settings):
    settings.MAILER = {**settings.MAILER, "DKIM_PRIVATE_KEY_FILE": str(key_file)}
    MessageFactory(to_email="ada@example.com")

    delivery.drain(Kind.TRANSACTIONAL)

    assert not smtp.messages[0].data.startswith(b"DKIM-Signature")
    assert b"DKIM-Signature" not in smtp.messages[0].data


# --- The bytes: ours, with one header in front ----------------------------------------------


def prepared_email() -> PreparedEmail:
    email = PreparedEmail(
        subject="Ünïcode subject for a header that folds, long enough to need two lines",
        text="Hello Ada,\n\nLine with trailing spaces   \nÉtude à la plage.\n" + "x" * 200,
        html="<p>Hello <b>Ada</b></p>\n<p>Étude</p>",
        message_id="<bytes-1@mailer.test>",
        from_email=f"Mailer Tests <{FROM_EMAIL}>",
        to=["Ada Lovelace <ada@example.com>"],
        reply_to=["support@mailer.test"],
        headers={"X-Mailer-Message-Id": "1234"},
    )
    email.to_pairs = [("Ada Lovelace", "ada@example.com")]
    return email


def test_the_bytes_after_the_signature_are_our_unsigned_mime_build(signing):
    email = prepared_email()
    unsigned = email.message().as_bytes(linesep="\r\n")

    SMTPBackend().send_messages([email])

    (received,) = signing.messages
    signature, rest = split_signature(received.data)
    assert rest.rstrip(b"\r\n") == unsigned.rstrip(b"\r\n")  # the SMTP server's line end
    signed = dkimsign.sign(unsigned)
    assert split_signature(signed)[1] == unsigned
    assert verifies(signed, dns_from_command())
    assert verifies(received.data, dns_from_command())


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(
            lambda d: re.sub(
                rb"\r\nSubject: .*?\r\n(?=[^ \t])", b"\r\nSubject: You won!\r\n", d, flags=re.S
            ),
            id="subject",
        ),
        pytest.param(lambda d: d.replace(b"Hello Ada", b"Hello Eve", 1), id="body"),
        pytest.param(
            lambda d: d.replace(b"\r\nFrom: ", b"\r\nFrom: eve@evil.test\r\nFrom: "), id="from"
        ),
        pytest.param(lambda d: d + b"Appended line.\r\n", id="appended"),
    ],
)
def test_changing_the_email_after_signing_fails_verification(signing, tamper):
    signed = dkimsign.sign(prepared_email().message().as_bytes(linesep="\r\n"))
    dnsfunc = dns_from_command()
    assert verifies(signed, dnsfunc)

    tampered = tamper(signed)

    assert tampered != signed
    assert not verifies(tampered, dnsfunc)


def test_a_key_in_the_environment_with_escaped_line_breaks_signs(smtp, settings, private_pem):
    escaped = private_pem.decode().replace("\n", "\\n")  # how .env files often carry it
    dkim_settings(settings, DKIM_PRIVATE_KEY=escaped)
    signed = dkimsign.sign(prepared_email().message().as_bytes(linesep="\r\n"))

    assert verifies(signed, dns_from_command())
    assert [m.id for m in check_dkim()] == []


def test_a_pkcs1_key_signs_as_well(smtp, settings, tmp_path):
    path = tmp_path / "pkcs1.pem"
    path.write_bytes(openssl_key(traditional=True))
    dkim_settings(settings, DKIM_PRIVATE_KEY_FILE=str(path))

    signed = dkimsign.sign(prepared_email().message().as_bytes(linesep="\r\n"))

    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert verifies(signed, dns_from_command())


def test_the_key_is_read_once_per_process(signing, key_file, monkeypatch):
    dkimsign.sign(b"From: a@mailer.test\r\n\r\nbody\r\n")
    reads = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or b"")

    dkimsign.sign(b"From: a@mailer.test\r\n\r\nbody\r\n")

    assert reads == []


def test_a_key_that_cannot_be_loaded_makes_mail_wait_not_go_unsigned(
    smtp, broker, settings, tmp_path
):
    dkim_settings(settings, DKIM_PRIVATE_KEY_FILE=str(tmp_path / "missing.pem"))
    message = MessageFactory(to_email="ada@example.com")

    assert delivery.drain(Kind.TRANSACTIONAL) == 0

    assert smtp.messages == []
    message.refresh_from_db()
    assert message.status == MessageStatus.QUEUED
    assert message.attempts == 0
    assert message.last_error.startswith("Waiting: DKIM:")
    assert "missing.pem" in message.last_error


# --- System check ---------------------------------------------------------------------------


def key_body(pem: bytes) -> str:
    """A line from the middle of the key: it must never appear in a message or log."""
    return pem.decode().splitlines()[5]


def dkim_errors() -> list[tuple[str, str]]:
    return [(m.id, m.msg) for m in check_dkim()]


def test_a_good_configuration_passes_every_check(signing, settings):
    settings.ANYMAIL = {**settings.ANYMAIL, "WEBHOOK_SECRET": "user:long-random-password"}
    settings.MAILER = {**settings.MAILER, "POSTAL_ADDRESS": POSTAL}

    assert dkim_errors() == []
    assert [m.id for m in check_settings() if m.id.startswith("mailer.")] == []


def test_a_parent_domain_of_the_sender_is_aligned(signing, settings):
    settings.MAILER = {**settings.MAILER, "FROM_EMAIL": "news@eu.mailer.test"}

    assert dkim_errors() == []


@pytest.mark.parametrize("domain", ["other.test", "ailer.test", "news.mailer.test"])
def test_a_dkim_domain_that_is_not_the_senders_is_error_e008(signing, settings, domain):
    settings.MAILER = {**settings.MAILER, "DKIM_DOMAIN": domain}

    ((check_id, message),) = dkim_errors()

    assert check_id == "mailer.E008"
    assert domain in message and "'mailer.test'" in message and FROM_EMAIL in message


def test_the_sender_from_smtp_from_email_is_what_the_domain_is_checked_against(signing, settings):
    settings.MAILER = {**settings.MAILER, "FROM_EMAIL": None}
    settings.DEFAULT_FROM_EMAIL = "noreply@elsewhere.test"

    ((check_id, message),) = dkim_errors()

    assert check_id == "mailer.E008" and "elsewhere.test" in message


def test_a_missing_key_file_is_error_e008(signing, settings, tmp_path):
    settings.MAILER = {**settings.MAILER, "DKIM_PRIVATE_KEY_FILE": str(tmp_path / "nope.pem")}

    ((check_id, message),) = dkim_errors()

    assert check_id == "mailer.E008"
    assert "nope.pem" in message and "cannot be read" in message


def test_an_unreadable_key_file_is_error_e008(signing, settings, tmp_path):
    unreadable = tmp_path / "dir.pem"
    unreadable.mkdir()  # root reads any file, so a directory stands for "cannot read"
    settings.MAILER = {**settings.MAILER, "DKIM_PRIVATE_KEY_FILE": str(unreadable)}

    ((check_id, message),) = dkim_errors()

    assert check_id == "mailer.E008" and "cannot be read" in message


@pytest.mark.parametrize(
    ("garbage", "says"),
    [
        (b"not a key at all", "is not a PEM private key"),
        (
            b"-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n",
            "does not parse",
        ),
        (
            b"-----BEGIN EC PRIVATE KEY-----\nZ2FyYmFnZQ==\n-----END EC PRIVATE KEY-----\n",
            "needs an RSA key",
        ),
    ],
)
def test_a_garbage_key_is_error_e008(signing, settings, tmp_path, garbage, says):
    path = tmp_path / "garbage.pem"
    path.write_bytes(garbage)
    settings.MAILER = {**settings.MAILER, "DKIM_PRIVATE_KEY_FILE": str(path)}

    ((check_id, message),) = dkim_errors()

    assert check_id == "mailer.E008" and says in message


def test_a_key_too_short_for_receivers_is_error_e008(signing, settings, tmp_path):
    path = tmp_path / "short.pem"
    path.write_bytes(openssl_key(512))
    settings.MAILER = {**settings.MAILER, "DKIM_PRIVATE_KEY_FILE": str(path)}

    ((check_id, message),) = dkim_errors()

    assert check_id == "mailer.E008" and "512-bit" in message


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"DKIM_SELECTOR": None}, "DKIM_SELECTOR'] is not set"),
        ({"DKIM_DOMAIN": None}, "DKIM_DOMAIN'] is not set"),
        ({"DKIM_DOMAIN": None, "DKIM_SELECTOR": None}, "nothing is signed"),
        ({"DKIM_PRIVATE_KEY_FILE": None}, "needs a private key"),
        ({"DKIM_PRIVATE_KEY": "-----BEGIN PRIVATE KEY-----"}, "both set"),
        ({"DKIM_SELECTOR": "bad selector"}, "not a DNS label"),
        ({"DKIM_HEADERS": ["Subject", "To"]}, "must include From"),
    ],
)
def test_incomplete_settings_are_error_e008(signing, settings, values, says):
    settings.MAILER = {**settings.MAILER, **values}

    messages = dkim_errors()

    assert [check_id for check_id, _ in messages] == ["mailer.E008"]
    assert says in messages[0][1]


def test_dkim_with_an_esp_backend_is_warning_w002(signing, settings):
    settings.EMAIL_BACKEND = "anymail.backends.sendgrid.EmailBackend"

    assert [check_id for check_id, _ in dkim_errors()] == ["mailer.W002"]


def test_no_check_message_shows_the_private_key(smtp, settings, tmp_path, private_pem):
    broken = private_pem.replace(b"-----END PRIVATE KEY-----", b"-----END BROKEN-----")
    for text in (broken.decode(), private_pem.decode()[:-40] + "\n-----END PRIVATE KEY-----"):
        dkim_settings(settings, DKIM_PRIVATE_KEY=text, DKIM_DOMAIN="other.test")
        messages = check_dkim()
        assert messages
        assert all(key_body(private_pem) not in f"{m.msg} {m.hint}" for m in messages)


# --- The management command ------------------------------------------------------------------


def test_the_command_prints_the_record_of_the_configured_key(signing, private_pem):
    name, value, text = printed_record()

    assert name == f"{SELECTOR}._domainkey.{DOMAIN}"
    assert value == dkimsign.parse_key(private_pem, "test").dns_value()
    assert value.startswith("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA")
    strings = re.findall(r'^    "([^"]*)"$', text, re.M)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == value
    assert f"{name}. IN TXT (" in text
    assert key_body(private_pem) not in text


def test_the_public_key_is_the_one_openssl_derives(private_pem):
    public = subprocess.run(
        [shutil.which("openssl"), "pkey", "-pubout"],
        input=private_pem,
        capture_output=True,
        check=True,
    ).stdout.decode()
    der_base64 = "".join(line for line in public.splitlines() if not line.startswith("-----"))

    assert dkimsign.parse_key(private_pem, "test").dns_value().endswith(f"p={der_base64}")


def test_generate_writes_a_private_key_that_signs_mail_that_verifies(smtp, settings, tmp_path):
    path = tmp_path / "keys" / "new.pem"
    path.parent.mkdir()
    dkim_settings(settings)

    name, value, text = printed_record(generate=str(path))

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert dkimsign.parse_key(path.read_bytes(), "new").bits == 2048
    assert f"MAILER_DKIM_PRIVATE_KEY_FILE={path}" in text
    assert key_body(path.read_bytes()) not in text

    settings.MAILER = {**settings.MAILER, "DKIM_PRIVATE_KEY_FILE": str(path)}
    SMTPBackend().send_messages([prepared_email()])
    assert verifies(smtp.messages[0].data, dns_from_command())


def test_generate_never_overwrites_a_key(smtp, settings, key_file):
    before = key_file.read_bytes()
    dkim_settings(settings)

    with pytest.raises(CommandError, match="exists"):
        printed_record(generate=str(key_file))

    assert key_file.read_bytes() == before


def test_the_command_takes_selector_and_domain_before_they_are_configured(key_file, settings):
    settings.MAILER = {**settings.MAILER, "DKIM_PRIVATE_KEY_FILE": str(key_file)}

    name, _, _ = printed_record(selector="s1", domain="Bücher.Example")

    assert name == "s1._domainkey.xn--bcher-kva.example"


def test_the_command_without_a_selector_says_what_to_set(settings):
    settings.MAILER = {**settings.MAILER, "DKIM_DOMAIN": None, "DKIM_SELECTOR": None}

    with pytest.raises(CommandError, match="MAILER_DKIM_SELECTOR"):
        printed_record()


# --- A real worker, configured from the environment as in production ---------------------


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_worker_signs_with_the_key_from_its_environment(
    broker, smtp, start_worker, private_pem, settings
):
    """project/settings.py reads MAILER_DKIM_* (the PEM with its line breaks as \\n)."""
    worker = start_worker(
        "dkim",
        "transactional",
        MAILER_DKIM_DOMAIN=DOMAIN,
        MAILER_DKIM_SELECTOR=SELECTOR,
        MAILER_DKIM_PRIVATE_KEY=private_pem.decode().replace("\n", "\\n"),
    )
    try:
        api.send("welcome", to="env@example.com", context={"user_name": "Env"})
        (received,) = wait_for(
            lambda: smtp.to("env@example.com"), message="the worker sent nothing"
        )
    finally:
        worker.stop()

    dkim_settings(settings, DKIM_PRIVATE_KEY=private_pem.decode())
    assert verifies(received.data, dns_from_command())
    assert key_body(private_pem) not in worker.log()


@pytest.mark.parametrize("traditional", [False, True])
def test_the_rsa_step_by_openssl_is_byte_for_byte_dkimpys_own(traditional):
    # Signing goes through OpenSSL (25 times faster); PKCS#1 v1.5 is deterministic, so
    # the bytes must equal dkimpy's pure-Python signature for the same digest and key.
    import hashlib

    from dkim.crypto import RSASSA_PKCS1_v1_5_sign, parse_pem_private_key

    from mailer import dkimsign

    key = parse_pem_private_key(openssl_key(traditional=traditional))
    for data in (b"", b"x", b"DKIM" * 1000):
        assert dkimsign.openssl_rsa_sign(hashlib.sha256(data), key) == RSASSA_PKCS1_v1_5_sign(
            hashlib.sha256(data), key
        )
    # A digest other than SHA-256 goes dkimpy's own way.
    sha1 = hashlib.sha1(b"x")  # noqa: S324 - rsa-sha1 signatures, still verifiable
    assert dkimsign.openssl_rsa_sign(sha1, key) == RSASSA_PKCS1_v1_5_sign(sha1, key)
    # And dkimpy signs through it.
    import dkim

    assert dkim.RSASSA_PKCS1_v1_5_sign is dkimsign.openssl_rsa_sign
