"""The drip admin: series with inline steps, read top to bottom with each step's funnel;
the enrollments list, its filters and actions (with the permissions they need); each
contact's enrollments on its page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse

from mailer import drips
from mailer.models import Contact, DripSeries, DripStep, Enrollment, Message, Template
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

NEWSLETTER = (
    "<html><body><p>Hello {{ contact.first_name }}</p>"
    '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> {{ postal_address }}</p></body></html>'
)


@pytest.fixture(autouse=True)
def admin_settings(settings, broker):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.MAILER = {**settings.MAILER, "POSTAL_ADDRESS": "1 Test St"}


def staff(username: str, *verbs: str) -> Client:
    user = UserFactory(username=username, is_staff=True)
    user.user_permissions.add(
        *[
            p
            for p in Permission.objects.filter(content_type__app_label="mailer")
            if p.codename.startswith(tuple(f"{verb}_" for verb in verbs))
        ]
    )
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def onboarding() -> DripSeries:
    welcome = Template.objects.create(
        slug="welcome-drip", purpose="marketing", subject="Welcome", html=NEWSLETTER
    )
    tips = Template.objects.create(
        slug="tips", purpose="marketing", subject="Tips", html=NEWSLETTER
    )
    series = DripSeries.objects.create(name="Onboarding", status="active", requires_consent=False)
    DripStep.objects.create(series=series, position=10, kind="send", template=welcome)
    DripStep.objects.create(series=series, position=20, kind="wait", delay=timedelta(days=1))
    DripStep.objects.create(
        series=series, position=30, kind="decide", condition="clicked_any", if_yes="exit"
    )
    DripStep.objects.create(series=series, position=40, kind="send", template=tips)
    return series


def test_the_series_page_reads_top_to_bottom_with_each_steps_funnel(admin_client, onboarding):
    people = [Contact.objects.create(email=f"p{i}@example.com") for i in range(3)]
    for who in people:
        drips.enroll(onboarding, who)
    drips.advance_due()
    Message.objects.filter(contact=people[0]).update(
        status="opened", sent_at="2027-01-01T00:00Z", opened_at="2027-01-01T01:00Z"
    )
    drips.remove(Enrollment.objects.filter(contact=people[2]))

    page = admin_client.get(reverse("admin:mailer_dripseries_change", args=[onboarding.pk]))

    assert page.status_code == 200
    html = page.content.decode()
    flow = html[html.index("Steps, top to bottom") :]
    order = [
        flow.index(text) for text in ("send welcome-drip", "wait 1 day", "if any", "send tips")
    ]
    assert order == sorted(order)
    # Step 10: 3 entered, 3 made, 1 opened; step 20: 2 waiting, 1 removed there.
    assert "<td>10</td><td>send welcome-drip</td><td>3</td><td>0</td><td>1</td><td>1</td>" in flow
    assert "<td>20</td><td>wait 1 day after the previous step</td><td>3</td>" in flow
    assert "Removed by a marketer: 1" in flow


def test_the_series_list_and_its_status_actions(admin_client, onboarding):
    broken = DripSeries.objects.create(name="Broken")
    DripStep.objects.create(series=broken, position=10, kind="send")  # no template
    page = admin_client.get(reverse("admin:mailer_dripseries_changelist"))
    assert page.status_code == 200
    response = admin_client.post(
        reverse("admin:mailer_dripseries_changelist"),
        {"action": "activate", "_selected_action": [broken.pk]},
        follow=True,
    )
    texts = [str(m) for m in get_messages(response.wsgi_request)]
    assert any("A send step needs a template" in t for t in texts)
    assert DripSeries.objects.get(pk=broken.pk).status == "draft"
    admin_client.post(
        reverse("admin:mailer_dripseries_changelist"),
        {"action": "pause", "_selected_action": [onboarding.pk]},
    )
    assert DripSeries.objects.get(pk=onboarding.pk).status == "paused"


def test_steps_are_edited_inline_and_a_jump_must_go_forward(admin_client, onboarding):
    url = reverse("admin:mailer_dripseries_change", args=[onboarding.pk])
    page = admin_client.get(url)
    form = page.context["adminform"].form
    data = {key: value for key, value in form.initial.items() if value is not None}
    data.update(
        name="Onboarding",
        status="active",
        trigger="manual",
        reentry="once",
        timezone="Europe/Paris",
        requires_consent="",
    )
    steps = list(onboarding.steps.order_by("position"))
    prefix = "steps"
    data.update(
        {
            f"{prefix}-TOTAL_FORMS": str(len(steps)),
            f"{prefix}-INITIAL_FORMS": str(len(steps)),
            f"{prefix}-MIN_NUM_FORMS": "0",
            f"{prefix}-MAX_NUM_FORMS": "1000",
        }
    )
    for index, step in enumerate(steps):
        row = {
            "id": step.pk,
            "series": onboarding.pk,
            "position": step.position,
            "kind": step.kind,
            "template": step.template_id or "",
            "delay": "1 00:00:00" if step.delay else "",
            "delay_from": step.delay_from,
            "condition": step.condition,
            "if_yes": step.if_yes,
            "if_no": step.if_no,
        }
        data.update({f"{prefix}-{index}-{k}": v for k, v in row.items()})
    # The decision at 30 jumps back to 10 when the contact clicked: refused.
    data[f"{prefix}-2-if_yes"] = "jump"
    data[f"{prefix}-2-yes_step"] = steps[0].pk
    response = admin_client.post(url, data)
    assert response.status_code == 200
    assert "Jump only to a later step of this series." in response.content.decode()
    data[f"{prefix}-2-yes_step"] = steps[3].pk
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:3000]
    assert DripStep.objects.get(pk=steps[2].pk).yes_step_id == steps[3].pk


def test_enrollments_list_filters_and_remove_needs_change_permission(onboarding):
    people = [Contact.objects.create(email=f"e{i}@example.com") for i in range(2)]
    for who in people:
        drips.enroll(onboarding, who)
    url = reverse("admin:mailer_enrollment_changelist")
    viewer = staff("viewer", "view")
    page = viewer.get(url, {"state": "active"})
    assert page.status_code == 200
    assert "e0@example.com" in page.content.decode()
    assert "remove_contacts" not in page.content.decode()  # not offered
    viewer.post(url, {"action": "remove_contacts", "_selected_action": [people[0].pk]})
    assert Enrollment.objects.filter(state="active").count() == 2

    editor = staff("editor", "view", "change")
    enrollment = Enrollment.objects.get(contact=people[0])
    editor.post(url, {"action": "remove_contacts", "_selected_action": [enrollment.pk]})
    enrollment.refresh_from_db()
    assert (enrollment.state, enrollment.exit_reason) == ("exited", "removed")
    editor.post(url, {"action": "pause_series", "_selected_action": [enrollment.pk]})
    assert DripSeries.objects.get(pk=onboarding.pk).status == "paused"


def test_the_contact_page_shows_its_enrollments(admin_client, onboarding):
    who = Contact.objects.create(email="c@example.com")
    drips.enroll(onboarding, who)
    drips.advance_due()
    page = admin_client.get(reverse("admin:mailer_contact_change", args=[who.pk]))
    html = page.content.decode()
    assert page.status_code == 200
    assert "Onboarding" in html and "In the series" in html
    assert "20. wait 1 day" in html  # where it stands
