"""mailer.mime: the MIME bytes we build are standards-clean and parse back to the input."""

from __future__ import annotations

import email
from email import policy

import pytest

from mailer import mime

MESSAGE_ID = "<0f8e5c1a-0000-4000-8000-000000000001@mailer.test>"


def build(**overrides) -> bytes:
    values = {
        "from_header": "Mailer <noreply@mailer.test>",
        "to_header": "ada@example.com",
        "subject": "Hello",
        "text": "Hello Ada.\n\nBye.",
        "html": "<p>Hello Ada.</p>",
        "message_id": MESSAGE_ID,
    }
    return mime.build(**{**values, **overrides})


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=policy.default)


def prepared(**overrides) -> mime.PreparedEmail:
    values = {
        "subject": "Hello",
        "text": "Hello Ada.",
        "html": "<p>Hello Ada.</p>",
        "message_id": MESSAGE_ID,
        "from_email": "Mailer <noreply@mailer.test>",
        "to": ["ada@example.com"],
    }
    return mime.PreparedEmail(**{**values, **overrides})


def prepared_bytes(**overrides) -> bytes:
    return prepared(**overrides).message().as_bytes(linesep="\r\n")


def test_built_message_parses_without_defects_into_text_and_html_parts():
    message = parse(build(text="Grüße, Ada — ça va?", html="<p>Grüße, Ada — ça va?</p>"))

    assert [(part.get_content_type(), part.defects) for part in message.walk()] == [
        ("multipart/alternative", []),
        ("text/plain", []),
        ("text/html", []),
    ]
    assert message.get_body(("plain",)).get_content().rstrip() == "Grüße, Ada — ça va?"
    assert message.get_body(("html",)).get_content().rstrip() == "<p>Grüße, Ada — ça va?</p>"
    assert message["MIME-Version"] == "1.0"
    assert message["Date"] is not None


def test_non_ascii_subject_round_trips():
    subject = "Grüße aus Köln — 日本語のテスト ✓"

    message = parse(build(subject=subject))

    assert message["Subject"] == subject


def test_non_ascii_display_names_round_trip():
    data = prepared_bytes(
        from_email="Zoë Ünïcode <noreply@mailer.test>",
        to=["Søren Kierkegård <soren@example.com>"],
    )
    message = parse(data)

    assert data.split(b"\r\n\r\n", 1)[0].isascii()
    assert message["From"].addresses[0].display_name == "Zoë Ünïcode"
    assert message["From"].addresses[0].addr_spec == "noreply@mailer.test"
    assert message["To"].addresses[0].display_name == "Søren Kierkegård"
    assert message["To"].addresses[0].addr_spec == "soren@example.com"
    assert not [part.defects for part in message.walk() if part.defects]


def test_long_lines_are_folded_and_quoted_printable_lines_stay_within_76():
    long_word = "x" * 5000
    long_text = " ".join(["Wörter"] * 1500)
    long_subject = "Ünïcode " * 60
    data = build(subject=long_subject.strip(), text=long_word + "\n" + long_text, html=long_word)

    lines = data.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    body = data.split(b"\r\n\r\n", 1)[1]
    qp_lines = [line for line in body.split(b"\r\n") if not line.startswith(b"--=_mailer_")]
    assert max(len(line) for line in qp_lines) <= 76
    message = parse(data)
    assert message["Subject"] == long_subject.strip()
    assert message.get_body(("plain",)).get_content().splitlines() == [long_word, long_text]
    assert message.get_body(("html",)).get_content().rstrip() == long_word


def test_every_line_ends_with_crlf():
    data = build(text="one\ntwo\r\nthree\rfour", html="<p>a</p>\n<p>b</p>")

    assert data.count(b"\n") == data.count(b"\r\n")
    assert data.count(b"\r") == data.count(b"\r\n")
    assert data.endswith(b"\r\n")
    assert parse(data).get_body(("plain",)).get_content().splitlines() == [
        "one",
        "two",
        "three",
        "four",
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        {"subject": "Hello\r\nBcc: eve@example.com"},
        {"subject": "Hello\nBcc: eve@example.com"},
        {"headers": {"X-Campaign": "spring\rBcc: eve@example.com"}},
    ],
)
def test_header_value_with_line_break_raises_value_error(overrides):
    with pytest.raises(ValueError, match="line break"):
        build(**overrides)


def test_idn_domain_in_to_is_punycode_encoded():
    data = prepared_bytes(to=["jörg@bücher.example"])
    head = data.split(b"\r\n\r\n", 1)[0]

    assert head.isascii()
    to = parse(data)["To"]
    assert "xn--bcher-kva.example" in str(to)
    assert to.addresses[0].domain == "xn--bcher-kva.example"


def test_message_id_header_is_the_given_one():
    assert parse(build())["Message-ID"] == MESSAGE_ID
    assert parse(prepared_bytes())["Message-ID"] == MESSAGE_ID


def test_extra_headers_are_kept_and_duplicates_of_built_ones_dropped():
    email_message = prepared(
        headers={"X-Mailer-Message-Id": "abc", "Message-ID": "<other@x>", "Subject": "no"}
    )
    message = parse(email_message.message().as_bytes(linesep="\r\n"))

    assert message["X-Mailer-Message-Id"] == "abc"
    assert message.get_all("Message-ID") == [MESSAGE_ID]
    assert message.get_all("Subject") == ["Hello"]


def test_prepared_email_serializes_with_the_requested_line_separator():
    email_message = prepared()

    assert b"\r" not in email_message.message().as_bytes(linesep="\n")
    assert email_message.message().as_bytes(linesep="\r\n").count(b"\r\n") > 5
