"""Own open and click tracking for SMTP set-ups: signed links, bot flags, forward status."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from mailer import api, delivery, outbox
from mailer.models import Contact, Event, Kind, Link, Message, MessageStatus, Template

from .factories import MessageFactory

pytestmark = pytest.mark.django_db

BROWSER = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) AppleWebKit/605.1.15 Safari/605.1.15"
HTML = """<html><body><p>Hi {{ contact.first_name }}</p>
<p><a href="https://example.com/one?a=1&amp;b=2">One</a>
<a href='https://example.com/two'>Two</a>
<a href="mailto:help@example.com">Mail us</a></p>
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> {{ postal_address }}</p></body></html>"""


@pytest.fixture
def promo():
    return Template.objects.create(slug="promo", purpose="marketing", subject="Promo", html=HTML)


def send_promo(smtp, address="fan@example.com"):
    contact, _ = Contact.objects.get_or_create(email=address, defaults={"name": "Fan Person"})
    message = MessageFactory(
        kind=Kind.CAMPAIGN, to_email=address, contact=contact, template_slug="promo", context={}
    )
    delivery.drain(Kind.CAMPAIGN)
    (received,) = smtp.to(address)
    html = received.parsed().get_body(("html",)).get_content()
    return Message.objects.get(pk=message.pk), html


def tracked_links(html: str) -> list[str]:
    return re.findall(r'href=["\'](http://localhost:8000/mailer/t/c/[^"\']+)["\']', html)


def age(message: Message, seconds: int = 3600) -> None:
    Message.objects.filter(pk=message.pk).update(
        sent_at=timezone.now() - timedelta(seconds=seconds)
    )


def test_links_are_rewritten_to_signed_redirects_and_a_pixel_is_added(smtp, broker, promo):
    message, html = send_promo(smtp)

    links = tracked_links(html)
    assert len(links) == 2
    assert "https://example.com/one" not in html
    assert 'href="mailto:help@example.com"' in html
    assert "/mailer/unsubscribe/" in html  # our own pages are never wrapped
    assert re.search(r'<img src="http://localhost:8000/mailer/t/o/[^"]+\.gif"', html)
    assert set(Link.objects.values_list("url", flat=True)) == {
        "https://example.com/one?a=1&b=2",
        "https://example.com/two",
    }


def test_click_redirects_to_the_recorded_url_and_counts_once_human(smtp, broker, promo):
    message, html = send_promo(smtp)
    age(message)

    response = Client().get(
        tracked_links(html)[0].removeprefix("http://localhost:8000"), HTTP_USER_AGENT=BROWSER
    )

    assert response.status_code == 302
    assert response["Location"] == "https://example.com/one?a=1&b=2"
    click = Event.objects.get(event_type=Event.Type.CLICKED)
    assert (click.message_id, click.automated) == (message.pk, False)
    assert click.link.url == "https://example.com/one?a=1&b=2"
    message = Message.objects.get(pk=message.pk)
    assert (message.status, message.clicked_at) == (MessageStatus.CLICKED, click.timestamp)


def test_tampered_click_token_gets_400_and_no_redirect(smtp, broker, promo):
    message, html = send_promo(smtp)
    path = tracked_links(html)[0].removeprefix("http://localhost:8000")
    token = path.split("/")[-2]
    forged_value = f"{message.uuid.hex}.999999"
    forged = f"{forged_value}:{token.rsplit(':', 1)[1]}"

    for bad in (
        path[:-3] + "xx/",
        f"/mailer/t/c/{forged}/",
        "/mailer/t/c/https:evil.example:sig/",
    ):
        response = Client().get(bad, HTTP_USER_AGENT=BROWSER)
        assert response.status_code == 400
        assert "Location" not in response
    assert not Event.objects.filter(event_type=Event.Type.CLICKED).exists()


def test_open_pixel_records_an_open_and_returns_a_gif(smtp, broker, promo):
    message, html = send_promo(smtp)
    age(message)
    pixel = re.search(r'<img src="http://localhost:8000(/mailer/t/o/[^"]+)"', html).group(1)

    response = Client().get(pixel, HTTP_USER_AGENT=BROWSER)

    assert response.status_code == 200
    assert response["Content-Type"] == "image/gif"
    assert response.content.startswith(b"GIF89a")
    assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]
    opened = Event.objects.get(event_type=Event.Type.OPENED)
    assert opened.automated is False
    message = Message.objects.get(pk=message.pk)
    assert (message.status, message.opened_at) == (MessageStatus.OPENED, opened.timestamp)


@pytest.mark.parametrize(
    ("method", "agent", "reason"),
    [
        ("head", BROWSER, "HEAD request"),
        ("get", "Mozilla/5.0 (compatible; Barracuda Sentinel)", "scanner user agent"),
        ("get", "python-requests/2.31", "scanner user agent"),
        ("get", "", "no user agent"),
    ],
)
def test_automatic_clicks_are_kept_but_flagged(smtp, broker, promo, method, agent, reason):
    message, html = send_promo(smtp)
    age(message)

    getattr(Client(), method)(
        tracked_links(html)[0].removeprefix("http://localhost:8000"), HTTP_USER_AGENT=agent
    )

    click = Event.objects.get(event_type=Event.Type.CLICKED)
    assert click.automated is True
    assert click.automated_reason == reason
    message = Message.objects.get(pk=message.pk)
    assert (message.status, message.clicked_at) == (MessageStatus.SENT, None)


def test_a_click_seconds_after_delivery_is_flagged(smtp, broker, promo):
    message, html = send_promo(smtp)  # sent_at is now

    Client().get(
        tracked_links(html)[0].removeprefix("http://localhost:8000"), HTTP_USER_AGENT=BROWSER
    )

    assert (
        Event.objects.get(event_type=Event.Type.CLICKED).automated_reason
        == "seconds after delivery"
    )


def test_every_link_clicked_at_once_flags_the_whole_burst(smtp, broker, promo):
    message, html = send_promo(smtp)
    age(message)
    client = Client()

    for link in tracked_links(html):
        client.get(link.removeprefix("http://localhost:8000"), HTTP_USER_AGENT=BROWSER)

    clicks = Event.objects.filter(event_type=Event.Type.CLICKED)
    assert clicks.count() == 2
    assert all(
        c.automated and c.automated_reason == "several links clicked at once" for c in clicks
    )
    # The first click looked human when it came; the burst takes it back out of reports.
    assert Message.objects.get(pk=message.pk).clicked_at is None


def test_transactional_mail_is_never_tracked(smtp, broker):

    api.send(
        "welcome",
        to="new@example.com",
        context={"user_name": "N", "login_url": "https://example.com/"},
    )
    delivery.drain(Kind.TRANSACTIONAL)
    html = smtp.to("new@example.com")[0].parsed().get_body(("html",)).get_content()
    assert "/mailer/t/" not in html
    assert 'href="https://example.com/"' in html


def test_own_tracking_is_off_when_an_esp_sends(broker, promo, settings):
    from django.core import mail

    settings.EMAIL_BACKEND = "anymail.backends.test.EmailBackend"
    contact = Contact.objects.create(email="esp@example.com", name="E")
    MessageFactory(
        kind=Kind.CAMPAIGN,
        to_email=contact.email,
        contact=contact,
        template_slug="promo",
        context={},
    )

    delivery.drain(Kind.CAMPAIGN)

    (sent,) = mail.outbox
    assert "/mailer/t/" not in sent.html
    assert "List-Unsubscribe" in sent.extra_headers


def test_status_only_moves_forward():
    message = MessageFactory(status=MessageStatus.CLICKED)
    now = timezone.now()

    def after(event_type: str) -> str:
        outbox.apply_event(message.pk, event_type, now)
        return Message.objects.get(pk=message.pk).status

    assert after(Event.Type.OPENED) == MessageStatus.CLICKED
    assert after(Event.Type.BOUNCED) == MessageStatus.BOUNCED
    assert after(Event.Type.DELIVERED) == MessageStatus.BOUNCED
    assert after(Event.Type.COMPLAINED) == MessageStatus.COMPLAINED
    assert after(Event.Type.BOUNCED) == MessageStatus.COMPLAINED


def test_first_event_times_keep_the_earliest_whatever_the_order():
    message = MessageFactory(status=MessageStatus.SENT)
    t0 = timezone.now().replace(microsecond=0)
    later, earlier = t0 + timedelta(minutes=5), t0 + timedelta(minutes=1)

    outbox.apply_event(message.pk, Event.Type.OPENED, later)
    outbox.apply_event(message.pk, Event.Type.OPENED, earlier)
    outbox.apply_event(message.pk, Event.Type.OPENED, later)
    outbox.apply_event(message.pk, Event.Type.DELIVERED, t0)

    message.refresh_from_db()
    assert (message.delivered_at, message.opened_at) == (t0, earlier)
    assert message.clicked_at is message.bounced_at is message.complained_at is None
    assert message.status == MessageStatus.OPENED


def test_link_tokens_are_django_signatures_under_the_current_secret_key(settings):
    # Signed with a key derived once per process: still exactly signing.Signer's tokens,
    # and a new SECRET_KEY signs with the new key (the old one only verifies as fallback).
    from django.core import signing

    from mailer import compose

    message = MessageFactory.build()
    click = compose.click_token(message.uuid, 7)
    assert signing.Signer(salt=compose.CLICK_SALT).unsign(click) == f"{message.uuid.hex}.7"
    opened = compose.open_token(message.uuid)
    assert signing.Signer(salt=compose.OPEN_SALT).unsign(opened) == message.uuid.hex
    with pytest.raises(signing.BadSignature):
        signing.Signer(salt=compose.OPEN_SALT).unsign(click)

    settings.SECRET_KEY, old = "another-key-" + "x" * 40, settings.SECRET_KEY
    assert compose.click_token(message.uuid, 7) != click
    with pytest.raises(signing.BadSignature):
        signing.Signer(salt=compose.CLICK_SALT, key=old).unsign(
            compose.click_token(message.uuid, 7)
        )
