"""mailer.api.send: validation at the edge, idempotency, suppression, scheduling, language."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.utils import timezone

from mailer import api, outbox, rendering
from mailer.exceptions import HeaderInjection, InvalidContext, InvalidRecipient, TemplateNotFound
from mailer.models import Kind, Message, MessageStatus, Suppression
from tests.factories import ContactFactory, MessageFactory, SuppressionFactory, TemplateFactory

pytestmark = pytest.mark.django_db

WELCOME = {"user_name": "Ada", "login_url": "http://localhost:8000/"}


def test_send_creates_queued_transactional_message_in_resolved_language():
    message = api.send("welcome", to="  Ada@Example.com ", context=WELCOME)

    stored = Message.objects.get()
    assert stored.pk == message.pk
    assert stored.kind == Kind.TRANSACTIONAL
    assert stored.status == MessageStatus.QUEUED
    assert stored.queued_at is not None
    assert stored.to_email == "ada@example.com"
    assert stored.template_slug == "welcome"
    assert stored.language == "en"
    assert stored.context == WELCOME
    assert stored.subject == "Welcome to Mailer Demo, Ada!"


@pytest.mark.parametrize("address", ["not-an-address", "", "ada@", None])
def test_invalid_address_raises_invalid_recipient_and_stores_nothing(address):
    with pytest.raises(InvalidRecipient):
        api.send("welcome", to=address, context=WELCOME)
    assert not Message.objects.exists()


def test_missing_template_raises_template_not_found_and_stores_nothing():
    with pytest.raises(TemplateNotFound):
        api.send("no-such-template", to="ada@example.com")
    assert not Message.objects.exists()


@pytest.mark.parametrize("to", ["ada@example.com\r\nBcc: eve@example.com", "ada@example.com\n"])
def test_line_break_in_recipient_raises_header_injection(to):
    with pytest.raises(HeaderInjection):
        api.send("welcome", to=to, context=WELCOME)
    assert not Message.objects.exists()


def test_line_break_smuggled_into_subject_through_context_raises_header_injection():
    context = {**WELCOME, "user_name": "Ada\r\nBcc: eve@example.com"}
    with pytest.raises(HeaderInjection):
        api.send("welcome", to="ada@example.com", context=context)
    assert not Message.objects.exists()


@pytest.mark.parametrize("context", [{"when": object()}, {"n": {1, 2}}, ["not", "a", "mapping"]])
def test_context_that_is_not_a_json_mapping_raises_invalid_context(context):
    with pytest.raises(InvalidContext):
        api.send("welcome", to="ada@example.com", context=context)
    assert not Message.objects.exists()


def test_same_idempotency_key_returns_the_same_message_and_one_row():
    first = api.send("welcome", to="ada@example.com", context=WELCOME, idempotency_key="k-1")
    second = api.send("welcome", to="ada@example.com", context=WELCOME, idempotency_key="k-1")

    assert second.pk == first.pk
    assert Message.objects.count() == 1


def test_hard_bounce_suppression_makes_message_suppressed():
    SuppressionFactory(email="ada@example.com", scope=Suppression.Scope.ALL)

    message = api.send("welcome", to="ada@example.com", context=WELCOME)

    message.refresh_from_db()
    assert message.status == MessageStatus.SUPPRESSED
    assert message.queued_at is None


@pytest.mark.parametrize("reason", [Suppression.Reason.UNSUBSCRIBE, Suppression.Reason.COMPLAINT])
def test_marketing_only_suppression_does_not_block_transactional_mail(reason):
    SuppressionFactory(email="ada@example.com", scope=Suppression.Scope.MARKETING, reason=reason)

    message = api.send("welcome", to="ada@example.com", context=WELCOME)

    message.refresh_from_db()
    assert message.status == MessageStatus.QUEUED


def test_future_send_at_schedules_and_release_due_queues_it_once_due(broker):
    send_at = timezone.now() + timedelta(hours=1)
    message = api.send("welcome", to="ada@example.com", context=WELCOME, send_at=send_at)

    message.refresh_from_db()
    assert message.status == MessageStatus.SCHEDULED
    assert message.send_after == send_at
    assert outbox.wake_due() == 0
    message.refresh_from_db()
    assert message.status == MessageStatus.SCHEDULED

    # The hour has passed.
    Message.objects.filter(pk=message.pk).update(send_after=timezone.now() - timedelta(seconds=1))
    assert outbox.wake_due() == 1

    message.refresh_from_db()
    assert message.status == MessageStatus.QUEUED
    assert message.queued_at is not None


def test_past_send_at_queues_at_once():
    message = api.send(
        "welcome",
        to="ada@example.com",
        context=WELCOME,
        send_at=timezone.now() - timedelta(minutes=5),
    )

    assert message.status == MessageStatus.QUEUED


def test_naive_send_at_is_taken_as_aware_in_the_current_time_zone():
    naive = datetime.now() + timedelta(days=1)  # naive on purpose

    message = api.send("welcome", to="ada@example.com", context=WELCOME, send_at=naive)

    message.refresh_from_db()
    assert message.status == MessageStatus.SCHEDULED
    assert timezone.is_aware(message.send_after)
    assert message.send_after == timezone.make_aware(naive)


def test_requested_language_picks_the_translated_file_template():
    message = api.send("welcome", to="ada@example.com", context=WELCOME, language="fr")

    assert message.language == "fr"
    assert message.subject == "Bienvenue sur Mailer Demo, Ada !"


def test_contact_language_is_used_when_none_is_requested():
    ContactFactory(email="ada@example.com", language="fr")

    message = api.send("welcome", to="ada@example.com", context=WELCOME)

    assert message.language == "fr"
    assert message.subject.startswith("Bienvenue")
    assert message.contact.email == "ada@example.com"


def test_requested_language_beats_contact_language():
    ContactFactory(email="ada@example.com", language="fr")

    message = api.send("welcome", to="ada@example.com", context=WELCOME, language="en")

    assert message.language == "en"


def test_unknown_language_falls_back_to_default_language():
    message = api.send("welcome", to="ada@example.com", context=WELCOME, language="xx")

    assert message.language == "en"
    assert message.subject == "Welcome to Mailer Demo, Ada!"


def test_database_template_overrides_for_its_language():
    row = TemplateFactory(
        slug="welcome",
        language="de",
        subject="Willkommen, {{ user_name }}!",
        html="<p>Hallo {{ user_name }}</p>",
    )

    message = api.send("welcome", to="ada@example.com", context=WELCOME, language="de")

    assert message.language == "de"
    assert message.subject == "Willkommen, Ada!"  # rendered from the row, not the file
    assert rendering.find_template("welcome", "de").template_id == row.pk


def test_regional_language_falls_back_to_its_base_language():
    message = api.send("welcome", to="ada@example.com", context=WELCOME, language="fr-CA")

    assert message.language == "fr"
    assert message.subject.startswith("Bienvenue")


def test_api_suppress_blocks_all_mail_and_cancels_waiting_marketing():
    waiting = MessageFactory(kind="campaign", to_email="gone@example.com")

    assert api.suppress("Gone@Example.com", note="asked by phone") is True
    assert api.suppress("gone@example.com") is False

    assert Message.objects.get(pk=waiting.pk).status == MessageStatus.CANCELLED
    assert api.send("welcome", to="gone@example.com", context=WELCOME).status == "suppressed"


def test_api_suppress_marketing_only_still_lets_transactional_through():
    api.suppress("news@example.com", marketing_only=True)
    assert api.send("welcome", to="news@example.com", context=WELCOME).status == "queued"


def test_api_import_contacts_reports_rejected_rows():
    import io

    report = api.import_contacts(
        io.BytesIO(b"email,plan\na@example.com,pro\nnope,free\n"), source="t"
    )

    assert (report.created, [line for line, _ in report.rejected]) == (1, [3])
