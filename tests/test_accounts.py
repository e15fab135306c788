"""Account emails: welcome and verification on registration, password reset, verify links."""

from __future__ import annotations

import base64
import json
import re
import time
from urllib.parse import urlsplit

import pytest
from celery import current_app
from django.contrib.auth import get_user_model
from django.core import signing
from django.db import connection
from django.test import Client, TestCase
from django.test.utils import CaptureQueriesContext

from mailer.models import Contact, Message, MessageStatus, Suppression
from mailer.signals import user_registered
from tests.conftest import wait_for
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


def test_registration_links_come_from_site_url_whatever_the_host(client, settings, site_url):
    settings.ALLOWED_HOSTS = ["*"]
    response = client.post(
        "/register/",
        {
            "username": "grace",
            "email": "grace@example.com",
            "password1": "a-long enough password 42",
            "password2": "a-long enough password 42",
        },
        HTTP_HOST="evil.example",
    )

    assert response.status_code == 302
    for message in Message.objects.all():
        links = [v for v in message.context.values() if str(v).startswith("http")]
        assert links and all(link.startswith(f"{SITE_URL}/") for link in links), links


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


SITE_URL = "https://app.example.com"


@pytest.fixture
def site_url(settings):
    settings.MAILER = {**settings.MAILER, "SITE_URL": SITE_URL}
    return SITE_URL


@pytest.fixture
def tasks_run_here(broker, smtp, site_url):
    """Celery runs each task in this process as it is sent, as a worker would, and mail
    goes to the test SMTP server."""
    import mailer.tasks  # noqa: F401 - registers the tasks, as a worker does

    conf = current_app.conf
    before = conf.task_always_eager, conf.task_eager_propagates
    conf.task_always_eager = conf.task_eager_propagates = True
    yield smtp
    conf.task_always_eager, conf.task_eager_propagates = before


def request_reset(client, address: str, **extra):
    """POST the reset form; what it queues runs once the request is over (its commit)."""
    with TestCase.captureOnCommitCallbacks(execute=True):
        return client.post("/accounts/password_reset/", {"email": address}, **extra)


def reset_link(smtp, address: str) -> str:
    (received,) = smtp.to(address)
    text = received.parsed().get_body(("plain",)).get_content()
    (link,) = re.findall(r"https?://[^\s)\]>]+/accounts/reset/[^\s)\]>]+", text)
    return link


def test_password_reset_sends_a_link_under_site_url_that_opens_the_form(client, tasks_run_here):
    user = UserFactory(username="ada", email="ada@example.com")

    response = request_reset(client, "ada@example.com")

    assert response.status_code == 302
    message = Message.objects.get()
    assert (message.template_slug, message.status) == ("password_reset", MessageStatus.SENT)
    assert message.context["expires_hours"] > 0
    link = reset_link(tasks_run_here, "ada@example.com")
    assert link == message.context["reset_url"]
    assert link.startswith(f"{SITE_URL}/accounts/reset/")

    opened = client.get(path_of(link))
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


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"HTTP_HOST": "evil.example"}, id="host"),
        pytest.param({"HTTP_HOST": "evil.example:8443"}, id="host-with-port"),
        pytest.param({"HTTP_HOST": "app.example.com.evil.example"}, id="lookalike-host"),
        pytest.param(
            {"HTTP_HOST": "app.example.com", "HTTP_X_FORWARDED_HOST": "evil.example"},
            id="x-forwarded-host",
        ),
        pytest.param(
            {"HTTP_HOST": "app.example.com", "HTTP_X_FORWARDED_PROTO": "http"},
            id="x-forwarded-proto",
        ),
    ],
)
def test_a_forged_host_never_reaches_the_reset_link(client, settings, tasks_run_here, headers):
    """With a permissive ALLOWED_HOSTS (and proxy headers trusted), the request's Host
    still says nothing about the link: it comes from SITE_URL."""
    settings.ALLOWED_HOSTS = ["*"]
    settings.USE_X_FORWARDED_HOST = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    UserFactory(username="ada", email="ada@example.com")

    response = request_reset(client, "ada@example.com", **headers)

    assert response.status_code == 302
    link = reset_link(tasks_run_here, "ada@example.com")
    assert link.startswith(f"{SITE_URL}/accounts/reset/")
    (received,) = tasks_run_here.to("ada@example.com")
    assert b"evil.example" not in received.data


def test_password_reset_for_unknown_email_sends_nothing(client, tasks_run_here):
    UserFactory(username="ada", email="ada@example.com")

    response = request_reset(client, "nobody@example.com")

    assert response.status_code == 302  # same answer: no account enumeration
    assert not Message.objects.exists()
    assert not tasks_run_here.messages


def test_password_reset_skips_inactive_users_and_unusable_passwords(client, tasks_run_here):
    UserFactory(username="gone", email="gone@example.com", is_active=False)
    sso = UserFactory(username="sso", email="sso@example.com")
    sso.set_unusable_password()
    sso.save()

    for address in ("gone@example.com", "sso@example.com"):
        assert request_reset(client, address).status_code == 302

    assert not Message.objects.exists()


def published(broker) -> list[tuple[str, list]]:
    """The tasks waiting in the broker's transactional queue: (name, args), oldest first."""
    found = []
    for raw in reversed(broker.lrange("transactional", 0, -1)):
        envelope = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        found.append((envelope["headers"]["task"], args))
    return found


def test_known_and_unknown_addresses_cost_the_request_the_same(client, broker, site_url):
    """The request only queues a task with the address; the lookup, the token and the
    email happen in the worker, for both. Same queries, same task, same answer."""
    UserFactory(username="ada", email="ada@example.com")
    seen = {}
    for address in ("ada@example.com", "nobody@example.com"):
        with CaptureQueriesContext(connection) as queries:
            response = request_reset(client, address)
        tasks = published(broker)
        broker.delete("transactional")
        seen[address] = (
            [query["sql"] for query in queries.captured_queries],
            (response.status_code, response["Location"]),
            [(name, args == [address]) for name, args in tasks],
        )
        assert not Message.objects.exists()  # nothing is looked up or sent in the request

    assert seen["ada@example.com"] == seen["nobody@example.com"]
    queries, answer, tasks = seen["ada@example.com"]
    assert not [sql for sql in queries if "auth_user" in sql]
    assert answer == (302, "/accounts/password_reset/done/")
    assert tasks == [("mailer.tasks.password_reset", True)]

    # What the worker then does with each: a link for the account, nothing for nobody.
    import mailer.tasks

    assert mailer.tasks.password_reset("nobody@example.com") == 0
    assert mailer.tasks.password_reset("ada@example.com") == 1
    assert Message.objects.get().context["reset_url"].startswith(f"{SITE_URL}/accounts/reset/")


@pytest.mark.parametrize("reason", [Suppression.Reason.UNSUBSCRIBE, Suppression.Reason.COMPLAINT])
def test_password_reset_is_not_blocked_by_marketing_suppression(client, reason, tasks_run_here):
    UserFactory(username="ada", email="ada@example.com")
    SuppressionFactory(email="ada@example.com", scope=Suppression.Scope.MARKETING, reason=reason)

    request_reset(client, "ada@example.com")

    assert Message.objects.get().status == MessageStatus.SENT
    assert len(tasks_run_here.to("ada@example.com")) == 1


def test_password_reset_to_hard_bounced_address_is_suppressed(client, tasks_run_here):
    UserFactory(username="ada", email="ada@example.com")
    SuppressionFactory(email="ada@example.com", scope=Suppression.Scope.ALL)

    request_reset(client, "ada@example.com")

    assert Message.objects.get().status == MessageStatus.SUPPRESSED
    assert not tasks_run_here.messages


@pytest.mark.integration
def test_reset_through_a_real_worker_links_to_site_url_whatever_the_host(
    transactional_db, broker, smtp, start_worker, settings
):
    """The Procfile's way: the web process queues, a real worker looks up and sends."""
    settings.ALLOWED_HOSTS = ["*"]
    UserFactory(username="ada", email="ada@example.com")
    worker = start_worker("reset", "transactional", SITE_URL=SITE_URL)
    try:
        response = Client(HTTP_HOST="evil.example").post(
            "/accounts/password_reset/", {"email": "ada@example.com"}
        )
        Client().post("/accounts/password_reset/", {"email": "nobody@example.com"})
        assert response.status_code == 302
        wait_for(lambda: smtp.to("ada@example.com"), message=lambda: worker.log())
    finally:
        worker.stop()
    link = reset_link(smtp, "ada@example.com")
    assert link.startswith(f"{SITE_URL}/accounts/reset/")
    assert b"evil.example" not in smtp.messages[0].data
    assert [m.rcpt_tos for m in smtp.messages] == [["ada@example.com"]]
