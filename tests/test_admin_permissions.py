"""Every admin action and custom admin view checks the permission its effect needs: a
staff user who may only view can look at everything and change nothing."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from mailer import campaigns, throttle
from mailer.models import (
    Campaign,
    CampaignStatus,
    CampaignTransition,
    Contact,
    Message,
    MessageStatus,
    Queue,
    QueueThrottle,
    ReputationPause,
    Segment,
    Suppression,
    Template,
    Variant,
)
from tests.factories import MessageFactory, UserFactory

pytestmark = pytest.mark.django_db

S = CampaignStatus
NEWSLETTER = (
    "<html><body><p>Hello {{ contact.first_name }}</p>"
    '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> {{ postal_address }}</p></body></html>'
)


@pytest.fixture(autouse=True)
def admin_settings(settings, broker):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.MAILER = {**settings.MAILER, "POSTAL_ADDRESS": "1 Test St"}


def staff(username: str, *verbs: str) -> Client:
    """A logged-in staff user holding ``verbs`` (view, change, add…) on every mailer model."""
    user = UserFactory(username=username, is_staff=True)
    codenames = [f"{verb}_" for verb in verbs]
    user.user_permissions.add(
        *[
            p
            for p in Permission.objects.filter(content_type__app_label="mailer")
            if p.codename.startswith(tuple(codenames))
        ]
    )
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer() -> Client:
    return staff("viewer", "view")


@pytest.fixture
def operator() -> Client:
    return staff("operator", "view", "change", "add")


@pytest.fixture
def world():
    """A draft, a sending, a paused and an A/B-testing campaign; a failed message; a
    throttled queue."""
    template = Template.objects.create(
        slug="news", purpose=Template.Purpose.MARKETING, subject="News", html=NEWSLETTER
    )
    segment = Segment.objects.create(name="Everyone")
    Contact.objects.bulk_create(
        [Contact(email=f"reader{i}@example.com", consent=Contact.Consent.GRANTED) for i in range(4)]
    )

    def campaign(name: str, **fields) -> Campaign:
        row = Campaign.objects.create(name=name, template=template, **fields)
        row.segments.set([segment])
        return row

    draft = campaign("Draft")
    sending = campaign("Sending")
    campaigns.send_now(sending)
    campaigns.launch(sending.pk)
    paused = campaign("Paused")
    campaigns.send_now(paused)
    campaigns.launch(paused.pk)
    campaigns.pause(paused)
    ab = campaign("AB", test_share=50)
    for label in "AB":
        Variant.objects.create(campaign=ab, label=label, subject=f"Subject {label}")
    campaigns.send_now(ab)
    campaigns.launch(ab.pk)
    failed = MessageFactory(status=MessageStatus.FAILED, attempts=5, last_error="550 no")
    throttle.slow_down(Queue.CAMPAIGN, "421 4.7.0 Try again later")
    return {
        "draft": Campaign.objects.get(pk=draft.pk),
        "sending": Campaign.objects.get(pk=sending.pk),
        "paused": Campaign.objects.get(pk=paused.pk),
        "ab": Campaign.objects.get(pk=ab.pk),
        "failed": failed,
    }


@pytest.fixture
def guarded(world):
    """The world with marketing paused by the reputation guard."""
    pause = ReputationPause.objects.create(reason="complaints 0.5%", rates={})
    return {**world, "pause": pause}


def snapshot() -> dict:
    """Everything an admin action could change."""
    return {
        "campaigns": sorted(
            Campaign.objects.values_list("pk", "name", "status", "winner_id", "paused_reason")
        ),
        "transitions": CampaignTransition.objects.count(),
        "messages": sorted(Message.objects.values_list("pk", "status", "attempts", "last_error")),
        "pauses": sorted(ReputationPause.objects.values_list("pk", "active")),
        "throttles": sorted(QueueThrottle.objects.values_list("queue", "factor")),
        "contacts": sorted(Contact.objects.values_list("email", "name", "consent")),
        "suppressions": sorted(Suppression.objects.values_list("email", "scope")),
    }


def offered(client: Client, model: str) -> set[str]:
    page = client.get(reverse(f"admin:mailer_{model}_changelist"))
    assert page.status_code == 200
    form = page.context["action_form"]
    return {name for name, _ in form.fields["action"].choices if name} if form else set()


def run_action(client: Client, model: str, action: str, *pks, **extra) -> object:
    return client.post(
        reverse(f"admin:mailer_{model}_changelist"),
        {"action": action, "_selected_action": [str(pk) for pk in pks], "index": "0", **extra},
    )


# Every changelist action of mailer's admin, with the rows it is tried on.
CHANGELIST_ACTIONS = [
    ("campaign", "send_test_action", ("draft",)),
    ("campaign", "send_now_action", ("draft",)),
    ("campaign", "pause_action", ("sending", "ab")),
    ("campaign", "resume_action", ("paused",)),
    ("campaign", "cancel_action", ("draft", "sending", "paused", "ab")),
    ("campaign", "duplicate_action", ("draft", "sending")),
    ("campaign", "delete_selected", ("draft",)),
    ("message", "retry_messages", ("failed",)),
    ("message", "delete_selected", ("failed",)),
    ("reputationpause", "lift", ("pause",)),
    ("queuethrottle", "back_to_full_speed", (Queue.CAMPAIGN.value,)),
]


def pks(world: dict, names) -> list:
    return [world[n].pk if n in world else n for n in names]


@pytest.mark.parametrize(("model", "action", "rows"), CHANGELIST_ACTIONS)
def test_a_view_only_user_is_offered_no_action_and_posting_one_changes_nothing(
    viewer, guarded, model, action, rows
):
    before = snapshot()

    assert action not in offered(viewer, model)
    response = run_action(viewer, model, action, *pks(guarded, rows))

    assert response.status_code in (200, 302)  # the changelist again, nothing done
    assert snapshot() == before
    assert throttle.speed(Queue.CAMPAIGN).throttled


# What each campaign action does for a user who holds its permission.
CAMPAIGN_EFFECTS = {
    "send_test": ("draft", lambda w: Message.objects.filter(to_email="operator@example.com")),
    "send_now": ("draft", lambda w: Campaign.objects.filter(pk=w["draft"].pk, status=S.SCHEDULED)),
    "pause": ("sending", lambda w: Campaign.objects.filter(pk=w["sending"].pk, status=S.PAUSED)),
    "resume": ("paused", lambda w: Campaign.objects.filter(pk=w["paused"].pk, status=S.SENDING)),
    "cancel": ("draft", lambda w: Campaign.objects.filter(pk=w["draft"].pk, status=S.CANCELLED)),
    "duplicate": ("draft", lambda w: Campaign.objects.filter(name="Copy of Draft")),
}


@pytest.mark.parametrize("action", sorted(CAMPAIGN_EFFECTS))
def test_an_operator_runs_each_campaign_action_from_the_list(operator, world, action):
    row, effect = CAMPAIGN_EFFECTS[action]
    assert f"{action}_action" in offered(operator, "campaign")

    # Send now and Cancel ask first (their confirmation page posts confirm=yes).
    response = run_action(operator, "campaign", f"{action}_action", world[row].pk, confirm="yes")

    assert response.status_code == 302
    assert effect(world).exists()


@pytest.mark.parametrize("action", sorted(CAMPAIGN_EFFECTS))
def test_an_operator_runs_each_campaign_action_from_its_page(operator, world, action):
    row, effect = CAMPAIGN_EFFECTS[action]

    response = operator.post(
        reverse("admin:mailer_campaign_do", args=[world[row].pk, action]), {"confirm": "yes"}
    )

    assert response.status_code == 302
    assert effect(world).exists()


@pytest.mark.parametrize(
    "action", ["send_test", "schedule", "send_now", "unschedule", "pause", "resume", "cancel"]
)
@pytest.mark.parametrize("row", ["draft", "sending", "paused", "ab"])
def test_a_view_only_user_gets_403_from_every_campaign_button(viewer, guarded, action, row):
    before = snapshot()

    response = viewer.post(reverse("admin:mailer_campaign_do", args=[guarded[row].pk, action]))

    assert response.status_code == 403
    assert snapshot() == before


@pytest.mark.parametrize("action", ["duplicate", "explode", "send_test%0d%0a"])
def test_a_view_only_user_cannot_duplicate_or_probe_actions(viewer, world, action):
    before = snapshot()

    response = viewer.post(f"/admin/mailer/campaign/{world['draft'].pk}/do/{action}/")

    assert response.status_code == 403
    assert snapshot() == before


def test_duplicating_needs_add_permission_even_with_change(world):
    editor = staff("editor", "view", "change")
    before = snapshot()

    assert "duplicate_action" not in offered(editor, "campaign")
    response = editor.post(
        reverse("admin:mailer_campaign_do", args=[world["draft"].pk, "duplicate"])
    )
    listed = run_action(editor, "campaign", "duplicate_action", world["draft"].pk)

    assert response.status_code == 403
    assert listed.status_code == 302
    assert snapshot() == before


def test_a_view_only_user_cannot_pick_an_ab_winner(viewer, operator, world):
    ab = world["ab"]
    variant = ab.variants.get(label="B")
    before = snapshot()

    page = viewer.get(reverse("admin:mailer_campaign_change", args=[ab.pk]))
    response = viewer.post(reverse("admin:mailer_campaign_winner", args=[ab.pk, variant.pk]))

    assert page.status_code == 200
    assert "Pick as winner" not in page.content.decode()
    assert "mailer-action" not in page.content.decode()  # no buttons at all
    assert response.status_code == 403
    assert snapshot() == before

    assert (
        "Pick as winner"
        in operator.get(reverse("admin:mailer_campaign_change", args=[ab.pk])).content.decode()
    )
    operator.post(reverse("admin:mailer_campaign_winner", args=[ab.pk, variant.pk]))
    assert Campaign.objects.get(pk=ab.pk).winner_id == variant.pk


def test_a_view_only_user_cannot_edit_a_campaign_through_its_form(viewer, world):
    draft = world["draft"]
    before = snapshot()

    response = viewer.post(
        reverse("admin:mailer_campaign_change", args=[draft.pk]),
        {"name": "Hijacked", "from_name": "Eve", "template": draft.template_id},
    )

    assert response.status_code == 403
    assert snapshot() == before


def test_a_view_only_user_may_read_reports_and_exports(viewer, world):
    report = viewer.get(reverse("admin:mailer_campaign_report_csv", args=[world["sending"].pk]))
    contacts = viewer.get(reverse("admin:mailer_contact_export"))
    suppressions = viewer.get(reverse("admin:mailer_suppression_export"))

    assert report.status_code == contacts.status_code == suppressions.status_code == 200
    assert b"reader0@example.com" in b"".join(contacts.streaming_content)
    assert "export_selected" in offered(viewer, "contact")
    assert "export_csv" in offered(viewer, "suppression")


def csv_upload(text: str) -> SimpleUploadedFile:
    return SimpleUploadedFile("list.csv", text.encode(), content_type="text/csv")


@pytest.mark.parametrize(
    ("model", "upload"),
    [
        (
            "contact",
            "email,name,consent\nreader0@example.com,Eve,withdrawn\nnew@example.com,N,yes\n",
        ),
        ("suppression", "email,scope,reason\nreader0@example.com,all,manual\n"),
    ],
)
def test_a_view_only_user_cannot_import(viewer, world, model, upload):
    before = snapshot()
    url = reverse(f"admin:mailer_{model}_import")

    page = viewer.get(url)
    response = viewer.post(url, {"file": csv_upload(upload)})
    changelist = viewer.get(reverse(f"admin:mailer_{model}_changelist")).content.decode()

    assert page.status_code == response.status_code == 403
    assert snapshot() == before
    assert url not in changelist  # the Import link is not offered


def test_a_contact_import_needs_change_permission_too_because_it_updates_contacts(world):
    adder = staff("adder", "view", "add")
    before = snapshot()

    response = adder.post(
        reverse("admin:mailer_contact_import"),
        {"file": csv_upload("email,consent\nreader0@example.com,withdrawn\n")},
    )

    assert response.status_code == 403
    assert snapshot() == before


def test_an_operator_imports_contacts_and_suppressions(operator, world):
    contacts = operator.post(
        reverse("admin:mailer_contact_import"),
        {"file": csv_upload("email,consent\nreader0@example.com,withdrawn\n")},
    )
    suppressions = operator.post(
        reverse("admin:mailer_suppression_import"),
        {"file": csv_upload("email,scope,reason\nreader1@example.com,all,manual\n")},
    )

    assert contacts.status_code == 200  # the contact import's report, row by row
    assert suppressions.status_code == 302
    assert Contact.objects.get(email="reader0@example.com").consent == Contact.Consent.WITHDRAWN
    assert Suppression.objects.filter(email="reader1@example.com").exists()


def test_an_operator_retries_lifts_and_resets_from_the_lists(operator, guarded):
    for model, action, rows in CHANGELIST_ACTIONS:
        if model != "campaign" and action != "delete_selected":
            assert action in offered(operator, model)
            response = run_action(operator, model, action, *pks(guarded, rows))
            assert response.status_code == 302, action
            levels = [m.level_tag for m in get_messages(response.wsgi_request)]
            assert levels and "error" not in levels and "warning" not in levels, action

    assert Message.objects.get(pk=guarded["failed"].pk).status == MessageStatus.QUEUED
    assert not ReputationPause.objects.get(pk=guarded["pause"].pk).active
    assert not throttle.speed(Queue.CAMPAIGN).throttled


def test_every_mailer_admin_action_declares_the_permission_it_needs():
    # An action added later without permissions= would run for a view-only user.
    from django.contrib import admin

    undeclared = []
    for model, model_admin in admin.site._registry.items():
        if model._meta.app_label != "mailer":
            continue
        for action in model_admin.actions or ():
            func = getattr(model_admin, action) if isinstance(action, str) else action
            if not getattr(func, "allowed_permissions", None):
                undeclared.append(f"{model.__name__}.{getattr(func, '__name__', action)}")

    assert undeclared == []
