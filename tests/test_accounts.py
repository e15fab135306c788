"""Account emails: welcome and verification on registration, password reset, verify links."""

from __future__ import annotations

import base64
import time
from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.core import signing
from django.test import Client

from mailer.models import Contact, Message, MessageStatus, Suppression
from mailer.signals import user_registered
from tests.factories import ContactFactory, SuppressionFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def register(user) -> None:
    user_registered.send(sender=type(user), user=user, request=None)


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def verify_url(user) -> str:
    return Message.objects.get(template_slug="verify_email", to_email=user.email).context[
        "verify_url"
    ]


# --- Registration ---------------------------------------------------------------------


def test_registration_queues_welcome_and_verification_once():
    user = UserFactory(username="ada", email="Ada@Example.com")

    register(user)
    register(user)

    messages = Message.objects.order_by("template_slug")
    assert [(m.template_slug, m.status, m.to_email) for m in messages] == [
        ("verify_email", MessageStatus.QUEUED, "ada@example.com"),
        ("welcome", MessageStatus.QUEUED, "ada@example.com"),
    ]
    welcome = messages.get(template_slug="welcome")
    assert welcome.context["user_name"] == "Ada"
    assert welcome.subject == "Welcome to Mailer Demo, Ada!"


def test_registration_creates_a_contact_linked_to_the_user():
    user = UserFactory(username="ada", email="ada@example.com")

    register(user)

    contact = Contact.objects.get(email="ada@example.com")
    assert contact.user == user
    assert contact.name == "Ada Lovelace"
    assert contact.verified_at is None
    assert set(contact.messages.values_list("template_slug", flat=True)) == {
        "welcome",
        "verify_email",
    }


def test_registration_links_an_existing_contact():
    existing = ContactFactory(email="ada@example.com", name="", language="fr")
    user = UserFactory(username="ada", email="ada@example.com")

    register(user)

    existing.refresh_from_db()
    assert existing.user == user
    assert Contact.objects.count() == 1
    assert Message.objects.get(template_slug="welcome").language == "fr"


def test_verify_link_confirms_the_address_with_the_button(client):
    user = UserFactory(username="ada", email="ada@example.com")
    register(user)

    response = client.post(path_of(verify_url(user)))

    assert response.status_code == 200
    assert b"ada@example.com" in response.content
    assert Contact.objects.get(email="ada@example.com").verified_at is not None


def test_opening_the_verify_link_only_asks_for_confirmation(client):
    """Link scanners GET (and HEAD) every URL in an email: none of it verifies."""
    user = UserFactory(username="ada", email="ada@example.com")
    register(user)
    path = path_of(verify_url(user))

    page = client.get(path)
    scanner = Client(HTTP_USER_AGENT="Mimecast LinkScanner").get(path)
    head = client.head(path)

    assert page.status_code == 200
    assert b"Confirm ada@example.com?" in page.content
    assert f'<form method="post" action="{path}">'.encode() in page.content
    assert scanner.status_code == 200
    assert head.status_code == 405
    assert Contact.objects.get(email="ada@example.com").verified_at is None
    # The button posts without a CSRF cookie: the link may open in another browser.
    assert Client(enforce_csrf_checks=True).post(path).status_code == 200
    assert Contact.objects.get(email="ada@example.com").verified_at is not None


def test_verify_link_works_twice_and_keeps_the_first_time(client):
    user = UserFactory(username="ada", email="ada@example.com")
    register(user)
    client.post(path_of(verify_url(user)))
    first = Contact.objects.get(email="ada@example.com").verified_at

    assert client.post(path_of(verify_url(user))).status_code == 200
    assert Contact.objects.get(email="ada@example.com").verified_at == first


def test_tampered_verify_link_is_refused(client):
    user = UserFactory(username="ada", email="ada@example.com")
    register(user)
    path = path_of(verify_url(user))
    token = path.rstrip("/").rsplit("/", 1)[1]
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")

    for method in (client.get, client.post):
        response = method(path.replace(token, tampered))
        assert response.status_code == 400
        assert b"not valid" in response.content
    assert Contact.objects.get(email="ada@example.com").verified_at is None


def test_expired_verify_link_is_refused(client, settings):
    user = UserFactory(username="ada", email="ada@example.com")
    register(user)
    settings.MAILER = {**settings.MAILER, "VERIFY_MAX_AGE": 0}
    time.sleep(1.1)  # signing timestamps count whole seconds

    response = client.post(path_of(verify_url(user)))

    assert response.status_code == 400
    assert b"expired" in response.content
    assert Contact.objects.get(email="ada@example.com").verified_at is None


def test_verify_link_for_a_changed_address_is_refused(client):
    user = UserFactory(username="ada", email="ada@example.com")
    register(user)
    Contact.objects.filter(email="ada@example.com").update(email="ada@new.example")

    assert client.post(path_of(verify_url(user))).status_code == 400
    assert Contact.objects.get().verified_at is None


def test_verify_link_carries_no_readable_address():
    user = UserFactory(username="ada", email="ada.lovelace@example.com")
    register(user)

    token = path_of(verify_url(user)).rstrip("/").rsplit("/", 1)[1]
    decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("latin-1")
    for text in (token, decoded):
        assert "lovelace" not in text.lower() and "example.com" not in text.lower()


def test_verify_links_sent_before_they_were_encrypted_still_work(client):
    user = UserFactory(username="ada", email="ada@example.com")
    register(user)
    contact = Contact.objects.get(email="ada@example.com")
    old = signing.dumps(
        {"c": contact.pk, "e": contact.email}, salt="mailer.accounts.verify-email", compress=True
    )

    assert client.get(f"/mailer/verify/{old}/").status_code == 200
    assert Contact.objects.get().verified_at is None
    assert client.post(f"/mailer/verify/{old}/").status_code == 200
    assert Contact.objects.get().verified_at is not None


def test_demo_registration_page_creates_user_and_queues_two_messages(client):
    response = client.post(
        "/register/",
        {
            "username": "grace",
            "email": "Grace@Example.com",
            "password1": "a-long enough password 42",
            "password2": "a-long enough password 42",
        },
    )

    assert response.status_code == 302
    user = get_user_model().objects.get(username="grace")
    assert user.email == "grace@example.com"
    assert sorted(Message.objects.values_list("template_slug", "to_email")) == [
        ("verify_email", "grace@example.com"),
        ("welcome", "grace@example.com"),
    ]
    assert Contact.objects.get(email="grace@example.com").user == user


def test_demo_registration_refuses_an_existing_email(client):
    UserFactory(username="ada", email="ada@example.com")

    response = client.post(
        "/register/",
        {
            "username": "other",
            "email": "ADA@example.com",
            "password1": "a-long enough password 42",
            "password2": "a-long enough password 42",
        },
    )

    assert response.status_code == 200
    assert not Message.objects.exists()


# --- Password reset -------------------------------------------------------------------


def request_reset(client, address: str):
    return client.post("/accounts/password_reset/", {"email": address})


def test_password_reset_queues_a_mailer_message_whose_link_opens_the_form(client):
    user = UserFactory(username="ada", email="ada@example.com")

    response = request_reset(client, "ada@example.com")

    assert response.status_code == 302
    message = Message.objects.get()
    assert message.template_slug == "password_reset"
    assert message.status == MessageStatus.QUEUED
    assert message.to_email == "ada@example.com"
    assert message.context["expires_hours"] > 0
    reset_url = message.context["reset_url"]
    assert reset_url.startswith("http://testserver/accounts/reset/")

    opened = client.get(path_of(reset_url))
    assert opened.status_code == 302
    assert opened["Location"].endswith("/set-password/")
    form = client.get(opened["Location"])
    assert form.status_code == 200
    assert form.context["validlink"] is True

    changed = client.post(
        opened["Location"],
        {"new_password1": "brand new secret 1234", "new_password2": "brand new secret 1234"},
    )
    assert changed.status_code == 302
    user.refresh_from_db()
    assert user.check_password("brand new secret 1234")


def test_password_reset_for_unknown_email_queues_nothing(client):
    UserFactory(username="ada", email="ada@example.com")

    response = request_reset(client, "nobody@example.com")

    assert response.status_code == 302  # same answer: no account enumeration
    assert not Message.objects.exists()


@pytest.mark.parametrize("reason", [Suppression.Reason.UNSUBSCRIBE, Suppression.Reason.COMPLAINT])
def test_password_reset_is_not_blocked_by_marketing_suppression(client, reason):
    UserFactory(username="ada", email="ada@example.com")
    SuppressionFactory(email="ada@example.com", scope=Suppression.Scope.MARKETING, reason=reason)

    request_reset(client, "ada@example.com")

    assert Message.objects.get().status == MessageStatus.QUEUED


def test_password_reset_to_hard_bounced_address_is_suppressed(client):
    UserFactory(username="ada", email="ada@example.com")
    SuppressionFactory(email="ada@example.com", scope=Suppression.Scope.ALL)

    request_reset(client, "ada@example.com")

    assert Message.objects.get().status == MessageStatus.SUPPRESSED
