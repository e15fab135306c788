"""One-click unsubscribe (RFC 8058), the preference page, and what unsubscribing blocks."""

from __future__ import annotations

import base64
import time
from email.utils import parseaddr
from unittest import mock
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from anymail.inbound import AnymailInboundMessage
from anymail.signals import AnymailInboundEvent, inbound
from django.core import signing
from django.test import Client

from mailer import api, compose, delivery, tokens, unsubscribe
from mailer.models import Contact, Event, Kind, Message, MessageStatus, Suppression, Template

from .factories import MessageFactory

pytestmark = pytest.mark.django_db

NEWSLETTER = """<html><body><h1>News for {{ contact.first_name }}</h1>
<p><a href="https://example.com/article">Read</a></p>
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> · <a href="{{ preferences_url }}">Preferences</a>
· {{ postal_address }}</p></body></html>"""


@pytest.fixture
def newsletter():
    return Template.objects.create(
        slug="newsletter", purpose=Template.Purpose.MARKETING, subject="News", html=NEWSLETTER
    )


def marketing_message(address: str = "reader@example.com") -> Message:
    contact, _ = Contact.objects.get_or_create(email=address, defaults={"name": "Rea Der"})
    return MessageFactory(
        kind=Kind.CAMPAIGN,
        to_email=address,
        contact=contact,
        template_slug="newsletter",
        context={},
    )


def sent_marketing_email(smtp, newsletter, address: str = "reader@example.com"):
    message = marketing_message(address)
    assert delivery.drain(Kind.CAMPAIGN) == 1
    (received,) = smtp.to(address)
    return message, received.parsed()


def test_marketing_email_carries_rfc8058_headers_and_links(smtp, broker, newsletter):
    message, email = sent_marketing_email(smtp, newsletter)

    header = email["List-Unsubscribe"]
    https_url, mailto = [part.strip().strip("<>") for part in header.split(",")]
    assert https_url.startswith("http://localhost:8000/mailer/unsubscribe/")
    assert mailto.startswith("mailto:unsubscribe@mailer.test?subject=")
    assert email["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    html = email.get_body(("html",)).get_content()
    assert https_url.replace("&", "&amp;") in html or https_url in html
    target = unsubscribe.read_token(urlparse(https_url).path.split("/")[-2])
    assert target.email == "reader@example.com"
    assert target.message_uuid == message.uuid
    token_in_subject = unquote(parse_qs(urlparse(mailto).query)["subject"][0]).split(" ", 1)[1]
    assert unsubscribe.read_token(token_in_subject).email == "reader@example.com"


def test_transactional_email_has_no_unsubscribe_headers(smtp, broker):
    api.send("welcome", to="user@example.com", context={"user_name": "U"})
    delivery.drain(Kind.TRANSACTIONAL)
    (received,) = smtp.to("user@example.com")
    assert received.parsed()["List-Unsubscribe"] is None


def test_one_click_post_without_cookie_or_csrf_suppresses_at_once():
    message = marketing_message()
    token = compose.unsubscribe_token(message.to_email, message.uuid)
    client = Client(enforce_csrf_checks=True)

    response = client.post(
        f"/mailer/unsubscribe/{token}/",
        data="List-Unsubscribe=One-Click",
        content_type="application/x-www-form-urlencoded",
    )

    assert response.status_code == 200
    suppression = Suppression.objects.get(email="reader@example.com")
    assert (suppression.scope, suppression.reason) == ("marketing", "unsubscribe")
    assert suppression.source == "one-click"
    event = Event.objects.get(event_type=Event.Type.UNSUBSCRIBED)
    assert event.message_id == message.pk
    assert Contact.objects.get(email="reader@example.com").consent == Contact.Consent.WITHDRAWN


def test_get_shows_a_confirmation_and_changes_nothing(client):
    token = compose.unsubscribe_token("reader@example.com")

    response = client.get(f"/mailer/unsubscribe/{token}/")

    assert response.status_code == 200
    assert b"Unsubscribe reader@example.com?" in response.content
    assert b'method="post"' in response.content
    assert not Suppression.objects.exists()
    assert not Event.objects.exists()


def test_posting_twice_is_harmless():
    token = compose.unsubscribe_token("reader@example.com")
    client = Client(enforce_csrf_checks=True)
    for _ in range(2):
        assert client.post(f"/mailer/unsubscribe/{token}/").status_code == 200
    assert Suppression.objects.count() == 1
    assert Event.objects.filter(event_type=Event.Type.UNSUBSCRIBED).count() == 1


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # signature altered
        lambda t: t[:40] + ("A" if t[40] != "A" else "B") + t[41:],  # ciphertext altered
        lambda t: t[:-30],  # cut short
        lambda t: (  # an old signed token's signature on another address's payload
            legacy_token("other@example.com").split(":")[0]
            + ":"
            + legacy_token("reader@example.com").split(":", 1)[1]
        ),
        lambda t: "not-a-token",
        lambda t: "gAAAAA" + "A" * 120,  # shaped like a token, made by nobody
    ],
    ids=["bad-signature", "altered", "truncated", "moved-to-another-address", "garbage", "forged"],
)
def test_tampered_token_gets_400_and_suppresses_nobody(mangle):
    token = mangle(compose.unsubscribe_token("reader@example.com"))
    client = Client(enforce_csrf_checks=True)

    assert client.post(f"/mailer/unsubscribe/{token}/").status_code == 400
    assert client.get(f"/mailer/unsubscribe/{token}/").status_code == 400
    assert (
        client.post(f"/mailer/preferences/{token}/", {"action": "unsubscribe"}).status_code == 400
    )
    assert not Suppression.objects.exists()


def legacy_token(address: str, message_uuid=None) -> str:
    """An unsubscribe token as mailer made them before they were encrypted."""
    payload = {"e": address, **({"m": message_uuid.hex} if message_uuid else {})}
    return signing.dumps(payload, salt=compose.UNSUBSCRIBE_SALT)


def test_tokens_from_other_features_are_not_unsubscribe_tokens():
    forged = signing.dumps({"e": "reader@example.com"}, salt="mailer.accounts.verify-email")
    sealed = tokens.seal({"e": "reader@example.com"}, salt="mailer.accounts.verify-email")
    for token in (forged, sealed):
        assert Client().post(f"/mailer/unsubscribe/{token}/").status_code == 400
    assert not Suppression.objects.exists()


def test_unsubscribe_links_carry_no_readable_address(smtp, broker, newsletter):
    """Neither the URL nor any decoding of its token shows the address."""
    _message, email = sent_marketing_email(smtp, newsletter, "reader.name@example.com")

    https_url, mailto = [p.strip().strip("<>") for p in email["List-Unsubscribe"].split(",")]
    token = urlparse(https_url).path.split("/")[-2]
    padded = token + "=" * (-len(token) % 4)
    decodings = [token, unquote(mailto), base64.urlsafe_b64decode(padded).decode("latin-1")]
    for text in decodings:
        assert "reader" not in text.lower() and "example.com" not in text.lower(), text
    assert unsubscribe.read_token(token).email == "reader.name@example.com"
    # Two links to one address differ (a random IV): a token says nothing about another.
    assert compose.unsubscribe_token("reader.name@example.com") != compose.unsubscribe_token(
        "reader.name@example.com"
    )


def test_links_of_mail_sent_before_tokens_were_encrypted_still_unsubscribe():
    message = marketing_message()
    token = legacy_token(message.to_email, message.uuid)

    assert Client().get(f"/mailer/unsubscribe/{token}/").status_code == 200
    assert Client().post(f"/mailer/unsubscribe/{token}/").status_code == 200

    assert Suppression.objects.get(email="reader@example.com").reason == "unsubscribe"
    assert Event.objects.get(event_type=Event.Type.UNSUBSCRIBED).message_id == message.pk


def test_links_made_under_a_rotated_secret_key_still_work(settings):
    token = compose.unsubscribe_token("reader@example.com")
    settings.SECRET_KEY_FALLBACKS = [settings.SECRET_KEY]
    settings.SECRET_KEY = "a-new-secret-key-after-rotation"

    assert Client().post(f"/mailer/unsubscribe/{token}/").status_code == 200
    assert Suppression.objects.filter(email="reader@example.com").exists()


def test_links_made_under_a_key_no_longer_trusted_are_refused(settings):
    token = compose.unsubscribe_token("reader@example.com")
    settings.SECRET_KEY = "a-new-secret-key-after-rotation"

    assert Client().post(f"/mailer/unsubscribe/{token}/").status_code == 400
    assert not Suppression.objects.exists()


def test_token_still_works_after_more_than_30_days():
    forty_days_ago = time.time() - 40 * 24 * 3600
    with mock.patch("django.core.signing.time.time", return_value=forty_days_ago):
        token = compose.unsubscribe_token("reader@example.com")

    assert Client().post(f"/mailer/unsubscribe/{token}/").status_code == 200
    assert Suppression.objects.filter(email="reader@example.com").exists()


def test_unsubscribed_contact_still_receives_a_password_reset(smtp, broker):
    Client().post(f"/mailer/unsubscribe/{compose.unsubscribe_token('reader@example.com')}/")

    message = api.send(
        "password_reset", to="reader@example.com", context={"reset_url": "https://x/r"}
    )
    assert message.status == MessageStatus.QUEUED
    delivery.drain(Kind.TRANSACTIONAL)
    assert len(smtp.to("reader@example.com")) == 1


def test_hard_bounced_contact_gets_no_password_reset(smtp, broker):
    Suppression.objects.create(
        email="reader@example.com", scope="all", reason=Suppression.Reason.HARD_BOUNCE
    )

    message = api.send(
        "password_reset", to="reader@example.com", context={"reset_url": "https://x/r"}
    )

    assert message.status == MessageStatus.SUPPRESSED
    delivery.drain(Kind.TRANSACTIONAL)
    assert smtp.to("reader@example.com") == []


def test_unsubscribing_cancels_waiting_marketing_but_not_transactional():
    waiting = marketing_message()
    transactional = MessageFactory(to_email="reader@example.com")

    Client().post(f"/mailer/unsubscribe/{compose.unsubscribe_token('reader@example.com')}/")

    assert Message.objects.get(pk=waiting.pk).status == MessageStatus.CANCELLED
    assert Message.objects.get(pk=transactional.pk).status == MessageStatus.QUEUED


def test_suppressed_address_gets_no_marketing_at_send_time(smtp, broker, newsletter):
    message = marketing_message()
    Suppression.objects.create(email=message.to_email, scope="marketing", reason="complaint")

    delivery.drain(Kind.CAMPAIGN)

    assert Message.objects.get(pk=message.pk).status == MessageStatus.SUPPRESSED
    assert smtp.to(message.to_email) == []


def test_preference_page_leaves_and_resubscribes_with_consent_recorded():
    token = compose.unsubscribe_token("reader@example.com")
    client = Client(enforce_csrf_checks=True)

    page = client.get(f"/mailer/preferences/{token}/")
    assert b"you receive our newsletters" in page.content

    client.post(f"/mailer/preferences/{token}/", {"action": "unsubscribe"})
    assert Suppression.objects.filter(email="reader@example.com", scope="marketing").exists()
    assert b"you receive no marketing email" in client.get(f"/mailer/preferences/{token}/").content

    response = client.post(f"/mailer/preferences/{token}/", {"action": "subscribe"})
    assert response.status_code == 200
    assert not Suppression.objects.filter(email="reader@example.com").exists()
    contact = Contact.objects.get(email="reader@example.com")
    assert contact.consent == Contact.Consent.GRANTED
    assert contact.consent_at is not None
    assert contact.consent_source.startswith("preference page")
    assert Event.objects.filter(
        event_type=Event.Type.SUBSCRIBED, recipient="reader@example.com"
    ).exists()


def test_resubscribing_does_not_lift_a_hard_bounce():
    Suppression.objects.create(email="reader@example.com", scope="all", reason="hard_bounce")
    token = compose.unsubscribe_token("reader@example.com")

    Client().post(f"/mailer/preferences/{token}/", {"action": "subscribe"})

    assert Suppression.objects.filter(email="reader@example.com", scope="all").exists()


def test_preference_page_refuses_unknown_actions():
    token = compose.unsubscribe_token("reader@example.com")
    assert Client().post(f"/mailer/preferences/{token}/", {"action": "delete"}).status_code == 400
    assert not Suppression.objects.exists()


def test_reply_to_the_unsubscribe_mailto_unsubscribes():
    token = compose.unsubscribe_token("reader@example.com")
    message = AnymailInboundMessage.construct(
        from_email="Reader <reader@example.com>",
        to="unsubscribe@mailer.test",
        subject=f"unsubscribe {token}",
        text="",
    )
    inbound.send(
        sender=object,
        event=AnymailInboundEvent(event_type="inbound", message=message),
        esp_name="Mailgun",
    )

    suppression = Suppression.objects.get(email="reader@example.com")
    assert suppression.scope == "marketing"
    assert suppression.source == "mailto via Mailgun"
    assert parseaddr(message["From"])[1] == "reader@example.com"


def test_reply_quoting_an_old_signed_token_unsubscribes_too():
    message = AnymailInboundMessage.construct(
        subject=f"Re: unsubscribe {legacy_token('reader@example.com')}", text="> quoted"
    )
    inbound.send(
        sender=object,
        event=AnymailInboundEvent(event_type="inbound", message=message),
        esp_name="Mailgun",
    )
    assert Suppression.objects.get(email="reader@example.com").scope == "marketing"


def test_inbound_mail_without_a_token_changes_nothing():
    message = AnymailInboundMessage.construct(subject="unsubscribe me please", text="thanks")
    inbound.send(
        sender=object,
        event=AnymailInboundEvent(event_type="inbound", message=message),
        esp_name="Mailgun",
    )
    assert not Suppression.objects.exists()
