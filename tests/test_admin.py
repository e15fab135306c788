"""The Django admin as operators and marketers use it: outbox, retries, templates, suppressions."""

from __future__ import annotations

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from mailer import outbox
from mailer.models import Campaign, Kind, Message, MessageStatus, Suppression, Template, Variant
from tests.factories import MessageFactory, TemplateFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def changelist(admin_client, **params):
    response = admin_client.get(reverse("admin:mailer_message_changelist"), params)
    assert response.status_code == 200
    return sorted(m.to_email for m in response.context["cl"].result_list)


# --- Messages -------------------------------------------------------------------------


def test_message_changelist_filters_by_status_and_kind(admin_client):
    MessageFactory(to_email="failed@example.com", status=MessageStatus.FAILED)
    MessageFactory(to_email="queued@example.com")
    MessageFactory(to_email="drip@example.com", kind=Kind.DRIP, status=MessageStatus.FAILED)

    assert changelist(admin_client) == [
        "drip@example.com",
        "failed@example.com",
        "queued@example.com",
    ]
    assert changelist(admin_client, status="failed") == ["drip@example.com", "failed@example.com"]
    assert changelist(admin_client, kind="transactional") == [
        "failed@example.com",
        "queued@example.com",
    ]
    assert changelist(admin_client, status="failed", kind="transactional") == ["failed@example.com"]


def test_message_changelist_searches_by_address_and_exact_ids(admin_client):
    MessageFactory(to_email="ada@example.com", provider_message_id="<p-1@esp>")
    MessageFactory(to_email="bob@example.com", idempotency_key="order-42")

    assert changelist(admin_client, q="ada@") == ["ada@example.com"]
    assert changelist(admin_client, q="<p-1@esp>") == ["ada@example.com"]
    assert changelist(admin_client, q="order-42") == ["bob@example.com"]
    assert changelist(admin_client, q="order-4") == []


def test_message_change_page_shows_a_sandboxed_preview(admin_client):
    message = MessageFactory(to_email="ada@example.com", context={"user_name": "Zed"})

    response = admin_client.get(reverse("admin:mailer_message_change", args=[message.pk]))

    assert response.status_code == 200
    content = response.content.decode()
    assert '<iframe sandbox=""' in content
    assert "Welcome to Mailer Demo, Zed!" in content
    assert "srcdoc=" in content


def test_message_change_page_shows_when_a_person_first_opened_and_clicked(admin_client):
    message = MessageFactory(status=MessageStatus.SENT)
    opened = timezone.now().replace(year=2026, month=3, day=4, hour=5, minute=6)
    outbox.apply_event(message.pk, "opened", opened)

    response = admin_client.get(reverse("admin:mailer_message_change", args=[message.pk]))

    content = response.content.decode()
    assert "First events (people, not scanners)" in content
    assert "March 4, 2026, 5:06" in content
    assert MessageStatus.OPENED.label in content


def test_message_change_page_explains_a_message_that_cannot_render(admin_client):
    message = MessageFactory(template_slug="gone-template")

    response = admin_client.get(reverse("admin:mailer_message_change", args=[message.pk]))

    assert response.status_code == 200
    assert b"Cannot render this message" in response.content


def test_messages_cannot_be_added_by_hand(admin_client):
    response = admin_client.get(reverse("admin:mailer_message_add"))

    assert response.status_code == 403


def retry(admin_client, *messages):
    return admin_client.post(
        reverse("admin:mailer_message_changelist"),
        {"action": "retry_messages", "_selected_action": [m.pk for m in messages]},
        follow=True,
    )


def test_retry_action_requeues_failed_messages(admin_client):
    failed = MessageFactory(status=MessageStatus.FAILED, attempts=5, last_error="550 No such user")

    response = retry(admin_client, failed)

    failed.refresh_from_db()
    assert failed.status == MessageStatus.QUEUED
    assert failed.attempts == 0
    assert failed.last_error == ""
    assert [str(m) for m in get_messages(response.wsgi_request)] == ["1 message queued again."]


def test_retry_action_skips_other_statuses_with_a_warning(admin_client):
    failed = MessageFactory(status=MessageStatus.FAILED)
    sent = MessageFactory(status=MessageStatus.SENT, sent_at=timezone.now())
    queued = MessageFactory(status=MessageStatus.QUEUED)

    response = retry(admin_client, failed, sent, queued)

    statuses = dict(Message.objects.values_list("pk", "status"))
    assert statuses == {
        failed.pk: MessageStatus.QUEUED,
        sent.pk: MessageStatus.SENT,
        queued.pk: MessageStatus.QUEUED,
    }
    notes = {str(m): m.level_tag for m in get_messages(response.wsgi_request)}
    assert notes["2 messages skipped: only failed or cancelled messages can be retried."] == (
        "warning"
    )


# --- Templates ------------------------------------------------------------------------


def template_form(**values) -> dict:
    return {
        "slug": "promo",
        "language": "en",
        "purpose": Template.Purpose.TRANSACTIONAL,
        "description": "",
        "subject": "Hi {{ contact.first_name }}",
        "html": "<p>Hello</p>",
        "text": "",
        "variables": "",
        **values,
    }


def test_template_add_form_shows_syntax_error_and_saves_nothing(admin_client):
    response = admin_client.post(
        reverse("admin:mailer_template_add"), template_form(html="<p>{% for x in %}</p>")
    )

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["html"]
    assert errors["html"][0].startswith("html: line 1")
    assert not Template.objects.exists()


def test_template_add_form_shows_unknown_variable_and_saves_nothing(admin_client):
    response = admin_client.post(
        reverse("admin:mailer_template_add"), template_form(subject="Hi {{ nickname }}")
    )

    assert response.status_code == 200
    assert "nickname" in response.context["adminform"].form.errors["subject"][0]
    assert not Template.objects.exists()


def test_template_add_form_saves_a_valid_template(admin_client):
    response = admin_client.post(
        reverse("admin:mailer_template_add"),
        template_form(html="<p>{{ coupon }}</p>", variables="coupon"),
    )

    assert response.status_code == 302
    assert Template.objects.get().declared_variables == {"coupon"}


def test_template_change_page_shows_a_sandboxed_preview(admin_client):
    template = TemplateFactory(subject="Hello {{ contact.first_name }}!")

    response = admin_client.get(reverse("admin:mailer_template_change", args=[template.pk]))

    assert response.status_code == 200
    content = response.content.decode()
    assert "Hello Ada!" in content
    assert '<iframe sandbox=""' in content


# --- Suppressions ---------------------------------------------------------------------


def test_suppression_added_in_admin_records_who_added_it(admin_client, admin_user):
    now = timezone.now()

    response = admin_client.post(
        reverse("admin:mailer_suppression_add"),
        {
            "email": "Spam.Trap@Example.com",
            "scope": Suppression.Scope.ALL,
            "reason": Suppression.Reason.MANUAL,
            "source": "",
            "note": "asked by phone",
            "created_at_0": now.strftime("%Y-%m-%d"),
            "created_at_1": now.strftime("%H:%M:%S"),
        },
    )

    assert response.status_code == 302
    suppression = Suppression.objects.get()
    assert suppression.email == "spam.trap@example.com"
    assert suppression.source == f"admin:{admin_user.get_username()}"


def test_marketing_template_without_unsubscribe_link_or_address_is_refused(admin_client):
    for html, missing in (
        ("<p>Hello {{ postal_address }}</p>", b"unsubscribe_url"),
        ('<p><a href="{{ unsubscribe_url }}">Leave</a></p>', b"postal_address"),
    ):
        response = admin_client.post(
            reverse("admin:mailer_template_add"),
            template_form(purpose=Template.Purpose.MARKETING, html=html),
        )
        assert response.status_code == 200
        assert missing in response.content
    assert not Template.objects.exists()


def test_marketing_template_with_footer_saves(admin_client):
    html = '<p>News</p><p><a href="{{ unsubscribe_url }}">Unsubscribe</a> {{ postal_address }}</p>'
    response = admin_client.post(
        reverse("admin:mailer_template_add"),
        template_form(purpose=Template.Purpose.MARKETING, html=html),
    )
    assert response.status_code == 302
    assert Template.objects.get(slug="promo").purpose == Template.Purpose.MARKETING


@pytest.mark.parametrize("status", ["sending", "testing", "waiting", "paused"])
def test_a_campaign_with_mail_on_the_way_cannot_be_deleted_until_cancelled(admin_client, status):
    from mailer.models import Campaign

    campaign = Campaign.objects.create(name="Live", status=status)
    message = MessageFactory(to_email="live@example.com", campaign=campaign, kind="campaign")

    page = admin_client.post(
        reverse("admin:mailer_campaign_delete", args=[campaign.pk]), {"post": "yes"}
    )
    bulk = admin_client.post(
        reverse("admin:mailer_campaign_changelist"),
        {"action": "delete_selected", "_selected_action": [campaign.pk], "post": "yes"},
    )

    assert page.status_code == 403
    assert bulk.status_code == 403
    assert Campaign.objects.filter(pk=campaign.pk).exists()
    assert Message.objects.filter(pk=message.pk).exists()

    Campaign.objects.filter(pk=campaign.pk).update(status="cancelled")
    gone = admin_client.post(
        reverse("admin:mailer_campaign_delete", args=[campaign.pk]), {"post": "yes"}
    )
    assert gone.status_code == 302
    assert not Campaign.objects.filter(pk=campaign.pk).exists()


# --- Layout for a marketer --------------------------------------------------------------


def test_admin_index_groups_mailers_models_for_a_marketer_apart_from_the_plumbing(admin_client):
    response = admin_client.get(reverse("admin:index"))

    page = response.content.decode()
    groups = [
        ("campaigns", ["campaign"]),
        ("audience", ["contact", "segment", "tag", "suppression"]),
        ("content", ["template"]),
        ("outbox", ["message", "event", "link"]),
        ("sending-operations", ["queuethrottle", "reputationpause", "warmupschedule", "apikey"]),
    ]
    starts = []
    for slug, models in groups:
        start = page.index(f"mailer-group-{slug} ")
        block = page[start : page.index("</table>", start)]
        for model in models:
            assert f'class="model-{model}' in block, (slug, model)
        starts.append(start)
    assert starts == sorted(starts)  # campaigns first, operations last of mailer's
    auth = page.index("app-auth ")
    plumbing = page.index("mailer-group-periodic-tasks-scheduling-plumbing")
    assert starts[-1] < auth < plumbing  # the periodic tasks come last
    assert page.count('class="model-campaign') == 1  # each model once


def test_message_page_is_read_only_without_save_buttons(admin_client):
    message = MessageFactory(to_email="ada@example.com")

    page = admin_client.get(reverse("admin:mailer_message_change", args=[message.pk]))

    content = page.content.decode()
    assert page.status_code == 200
    for button in ("_save", "_continue", "_addanother"):
        assert f'name="{button}"' not in content


def test_previews_are_shown_at_email_width(admin_client):
    message = MessageFactory(to_email="ada@example.com")
    template = TemplateFactory(slug="news")

    for url in (
        reverse("admin:mailer_message_change", args=[message.pk]),
        reverse("admin:mailer_template_change", args=[template.pk]),
    ):
        content = admin_client.get(url).content.decode()
        assert 'class="mailer-preview-frame"' in content
        assert "width:680px" in content  # an email's 600 px and a scrollbar, never squeezed


def test_message_preview_shows_the_subject_of_its_ab_variant(admin_client):
    template = TemplateFactory(slug="news", subject="The template's subject")
    campaign = Campaign.objects.create(name="Spring", template=template)
    variant = Variant.objects.create(campaign=campaign, label="B", subject="Variant B speaks")
    message = MessageFactory(template=template, template_slug="news", variant=variant)

    content = admin_client.get(
        reverse("admin:mailer_message_change", args=[message.pk])
    ).content.decode()

    assert "<strong>Subject:</strong> Variant B speaks" in content
