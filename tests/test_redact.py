"""Secrets in message context (reset and verification links, what a host declares) are
masked in the admin and kept out of stored errors and the worker's log."""

from __future__ import annotations

import logging

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from mailer import api, delivery, redact
from mailer.exceptions import MailerConfigurationError
from mailer.models import Event, Kind, MessageStatus, Template
from tests.factories import MessageFactory, UserFactory

pytestmark = pytest.mark.django_db

RESET = "https://app.test/reset/MQ/cz7k1w-0f5c8e2b9d4a7c1e3f6b/"
VERIFY = "https://app.test/mailer/verify/eyJjIjoxLCJlIjoiYWRhQGV4YW1wbGUuY29tIn0:1v7Ab:x9Qz/"


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def viewer() -> Client:
    """A staff user who may view messages, and nothing else."""
    user = UserFactory(username="viewer", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_message"))
    client = Client()
    client.force_login(user)
    return client


def message_page(client: Client, message) -> str:
    response = client.get(reverse("admin:mailer_message_change", args=[message.pk]))
    assert response.status_code == 200
    return response.content.decode()


@pytest.mark.parametrize(
    ("template", "key", "link"),
    [("password_reset", "reset_url", RESET), ("verify_email", "verify_url", VERIFY)],
)
@pytest.mark.parametrize("who", ["viewer", "admin_client"])
def test_a_live_link_is_masked_on_the_message_page_and_in_its_preview(
    request, who, template, key, link
):
    client = request.getfixturevalue(who)
    message = MessageFactory(
        template_slug=template, context={"user_name": "Ada", key: link, "expires_hours": 72}
    )

    page = message_page(client, message)

    assert link not in page
    assert link.split("/")[-2] not in page  # not even the token alone
    assert redact.MASK in page
    assert "Ada" in page  # the rest of the context is shown
    assert '<iframe sandbox=""' in page  # the preview still renders, with the mask


def test_host_declared_and_secret_looking_keys_are_masked_at_any_depth(settings, viewer):
    settings.MAILER = {**settings.MAILER, "SECRET_CONTEXT_KEYS": ["Coupon"]}
    secrets = ["C0UP0N-7731-XQ", "tok_5f2a9c1e77", "hunter2hunter2", "sk_live_9f8e7d6c", "mg-k3y"]
    message = MessageFactory(
        context={
            "user_name": "Ada",
            "login_url": "https://app.test/login",
            "coupon": secrets[0],
            "orders": [{"id": 7, "tracking": {"access_token": secrets[1]}}],
            "profile": {"Password": secrets[2]},
        },
        metadata={"client_secret": secrets[3], "source": "checkout"},
    )
    MessageFactory(context={"api_token": secrets[4]})

    page = message_page(viewer, message)

    for secret in secrets:
        assert secret not in page
    assert page.count(redact.MASK) >= 4
    assert "https://app.test/login" in page and "checkout" in page


def test_secret_context_keys_must_be_a_list_of_names(settings):
    settings.MAILER = {**settings.MAILER, "SECRET_CONTEXT_KEYS": "reset_url"}

    with pytest.raises(MailerConfigurationError, match="SECRET_CONTEXT_KEYS"):
        redact.secret_keys()


def test_a_template_error_quoting_a_reset_link_is_stored_and_logged_without_it(
    smtp, broker, caplog
):
    # Saved before the template checks of the day, or by hand: it quotes its context in
    # the error it raises while rendering ("No filter named '<the link>'").
    row = Template.objects.create(
        slug="password_reset", subject="Reset", html="<p>{{ user_name }}</p>"
    )
    Template.objects.filter(pk=row.pk).update(html="<p>{{ [1]|map(reset_url)|list }}</p>")
    message = api.send(
        "password_reset",
        to="ada@example.com",
        context={"user_name": "Ada", "reset_url": RESET, "expires_hours": 1},
    )

    with caplog.at_level(logging.DEBUG):
        delivery.drain(Kind.TRANSACTIONAL)

    message.refresh_from_db()
    assert message.status == MessageStatus.FAILED
    assert smtp.messages == []
    failure = Event.objects.get(message=message, event_type=Event.Type.FAILED)
    token = RESET.split("/")[-2]
    assert token not in message.last_error and token not in failure.description
    assert redact.MASK in message.last_error
    assert caplog.records and all(token not in r.getMessage() for r in caplog.records)
    assert all(token not in (r.exc_text or "") for r in caplog.records)
