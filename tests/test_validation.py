"""Hostile input at the edges: NUL and other control characters, NaN and deep nesting
get a typed error before anything is stored (never the database's DataError), and every
field that reaches a header refuses line breaks on save, in the admin and the ORM."""

from __future__ import annotations

import io

import pytest
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.urls import reverse

from mailer import api, campaigns, suppressions
from mailer.exceptions import (
    FieldError,
    HeaderInjection,
    ImportFileError,
    InvalidContext,
    TemplateNotFound,
)
from mailer.models import Campaign, Contact, Message, Segment, Suppression, Template, Variant

pytestmark = pytest.mark.django_db

WELCOME = {"user_name": "Ada", "login_url": "http://localhost:8000/"}
NEWSLETTER = '<p>Hi</p><p><a href="{{ unsubscribe_url }}">Unsubscribe</a> {{ postal_address }}</p>'


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def nested(depth: int) -> dict:
    value: dict = {"leaf": "x"}
    for _ in range(depth):
        value = {"n": value}
    return value


def refused_without_harm(call, error: type[Exception]) -> Exception:
    """Run ``call`` inside the caller's own transaction: it raises ``error``, stores no
    message, and the transaction stays usable (a DataError would have aborted it)."""
    with transaction.atomic():
        Contact.objects.create(email="caller@example.com")
        with pytest.raises(error) as caught:
            call()
        assert Contact.objects.filter(email="caller@example.com").exists()
    assert not Message.objects.exists()
    assert Contact.objects.filter(email="caller@example.com").exists()
    return caught.value


HOSTILE_CONTEXT = {
    "NUL": {**WELCOME, "login_url": "http://x.test/\x00"},
    "escape": {**WELCOME, "coupon": "\x1b[31mFREE"},
    "backspace": {**WELCOME, "coupon": "ab\x08c"},
    "DEL": {**WELCOME, "coupon": "a\x7f"},
    "C1 control": {**WELCOME, "coupon": "a\x9bb"},
    "lone surrogate": {**WELCOME, "coupon": "a\ud800b"},
    "nested NUL": {**WELCOME, "order": {"lines": [{"sku": "A-1"}, {"sku": "B\x00"}]}},
    "NUL in a key": {**WELCOME, "bad\x00key": "x"},
    "nested key": {**WELCOME, "order": {"k\x01": 1}},
    "NaN": {**WELCOME, "total": float("nan")},
    "Infinity": {**WELCOME, "total": float("inf")},
    "25 levels": {**WELCOME, "deep": nested(25)},
    "5000 levels": {**WELCOME, "deep": nested(5000)},
}


@pytest.mark.parametrize("context", HOSTILE_CONTEXT.values(), ids=HOSTILE_CONTEXT.keys())
def test_hostile_context_raises_invalid_context_and_stores_nothing(context):
    error = refused_without_harm(
        lambda: api.send("welcome", to="ada@example.com", context=context), InvalidContext
    )

    assert "context" in str(error)


def test_line_breaks_and_tabs_in_body_values_are_text_and_are_kept():
    context = {**WELCOME, "address": "1 Test St\r\nSpringfield\tUSA", "nested": nested(15)}

    message = api.send("welcome", to="ada@example.com", context=context)

    assert Message.objects.get(pk=message.pk).context == context


@pytest.mark.parametrize(
    "to",
    ["ada\x00@example.com", "ada@example.com\x00", '"ada\x01"@example.com', "ada@exa\x1bmple.com"],
)
def test_control_characters_in_the_address_raise_header_injection(to):
    refused_without_harm(lambda: api.send("welcome", to=to, context=WELCOME), HeaderInjection)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"metadata": {"order": "A\x00"}}, InvalidContext),
        ({"metadata": {"order": "A\tB"}}, HeaderInjection),
        ({"metadata": {"order": "A\u2028B"}}, HeaderInjection),
        ({"idempotency_key": "order-1\x00"}, HeaderInjection),
        ({"idempotency_key": "order-1\x1b"}, HeaderInjection),
        ({"language": "en\x00"}, TemplateNotFound),
    ],
)
def test_control_characters_in_metadata_keys_and_language_are_refused(kwargs, error):
    refused_without_harm(
        lambda: api.send("welcome", to="ada@example.com", context=WELCOME, **kwargs), error
    )


def test_a_template_name_with_nul_is_not_found_rather_than_a_database_error():
    refused_without_harm(
        lambda: api.send("welcome\x00", to="ada@example.com", context=WELCOME), TemplateNotFound
    )


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"email": "ada\x00@example.com"}, HeaderInjection),
        ({"email": "ada@example.com", "note": "asked\x00by phone"}, InvalidContext),
        ({"email": "ada@example.com", "source": "crm\x1b"}, InvalidContext),
    ],
)
def test_api_suppress_refuses_control_characters_and_stores_nothing(kwargs, error):
    refused_without_harm(lambda: api.suppress(**kwargs), error)

    assert not Suppression.objects.exists()


def test_a_contact_import_rejects_rows_with_control_characters_and_keeps_the_rest():
    data = (
        "email,name,city\n"
        "good@example.com,Good,Paris\n"
        "nul@example.com,Eve\x00,Paris\n"
        'crlf@example.com,"Eve\r\nBcc: x@example.com",Paris\n'
        "attr@example.com,Ann,Par\x00is\n"
        '"quoted\x01"@example.com,Q,Paris\n'
        'multi@example.com,Mo,"Line 1\nLine 2"\n'
    )

    report = api.import_contacts(io.BytesIO(data.encode()), source="test")

    assert sorted(Contact.objects.values_list("email", flat=True)) == [
        "good@example.com",
        "multi@example.com",
    ]
    assert [line for line, _ in report.rejected] == [3, 4, 5, 6]  # records, not lines
    assert "control character (U+0000)" in dict(report.rejected)[3]
    assert Contact.objects.get(email="multi@example.com").attributes == {"city": "Line 1\nLine 2"}


def test_a_contact_import_with_nul_in_its_header_imports_nothing():
    with pytest.raises(ImportFileError, match="control character"):
        api.import_contacts(io.BytesIO(b"email,ci\x00ty\na@example.com,Paris\n"), source="t")

    assert not Contact.objects.exists()


def test_a_suppression_import_rejects_a_note_with_nul_and_keeps_the_rest():
    data = b"email,note\ngood@example.com,fine\nbad@example.com,ev\x00il\n"

    report = suppressions.import_csv(data, source="t")

    assert list(Suppression.objects.values_list("email", flat=True)) == ["good@example.com"]
    assert [line for line, _ in report.rejected] == [3]


# --- Header fields, on save -------------------------------------------------------------

BREAKS = ["Shop\r\nBcc: eve@example.com", "Shop\nX-Evil: 1", "Shop\x00", "Shop\x1b", "Shop\u2028"]


@pytest.fixture
def newsletter() -> Template:
    return Template.objects.create(
        slug="news", purpose=Template.Purpose.MARKETING, subject="News", html=NEWSLETTER
    )


@pytest.mark.parametrize("value", BREAKS)
@pytest.mark.parametrize(
    ("model", "field"),
    [
        (Campaign, "from_name"),
        (Campaign, "from_email"),
        (Campaign, "reply_to"),
        (Variant, "subject"),
        (Variant, "from_name"),
        (Template, "subject"),
    ],
)
def test_every_header_field_refuses_line_breaks_on_save(newsletter, model, field, value):
    campaign = Campaign.objects.create(name="Spring", template=newsletter)
    row = {
        Campaign: lambda: Campaign(name="Other", template=newsletter),
        Variant: lambda: Variant(campaign=campaign, label="A"),
        Template: lambda: Template(slug="other", subject="Hi", html="<p>Hi</p>"),
    }[model]()
    setattr(row, field, value)
    before = (Campaign.objects.count(), Variant.objects.count(), Template.objects.count())

    with pytest.raises(FieldError) as caught:
        row.save()
    with pytest.raises(ValidationError) as cleaned:
        row.full_clean(exclude=["campaign"])

    assert "a header must be one line of text" in " ".join(cleaned.value.message_dict[field])

    assert isinstance(caught.value, HeaderInjection) or model is Template
    assert before == (Campaign.objects.count(), Variant.objects.count(), Template.objects.count())


def test_a_campaign_stored_with_a_line_break_before_this_check_can_still_be_cancelled(
    newsletter,
):
    campaign = Campaign.objects.create(name="Old", template=newsletter)
    Campaign.objects.filter(pk=campaign.pk).update(from_name="Old\r\nShop")
    campaign.refresh_from_db()

    campaigns.cancel(campaign)
    campaign.name = "Renamed"
    campaign.save(update_fields=["name"])

    assert Campaign.objects.get(pk=campaign.pk).status == Campaign.Status.CANCELLED
    with pytest.raises(HeaderInjection, match="from_name"):
        campaign.save()


def campaign_form(newsletter, segment, **values) -> dict:
    data = {
        "name": "Autumn",
        "template": newsletter.pk,
        "segments": [segment.pk],
        "from_name": "Shop",
        "from_email": "",
        "reply_to": "",
        "send_at_0": "",
        "send_at_1": "",
        "test_share": "0",
        "winner_metric": "click_rate",
        "test_window": "04:00:00",
        "tie_rule": "variant_a",
        "variants-TOTAL_FORMS": "0",
        "variants-INITIAL_FORMS": "0",
        "variants-MIN_NUM_FORMS": "0",
        "variants-MAX_NUM_FORMS": "5",
        "transitions-TOTAL_FORMS": "0",
        "transitions-INITIAL_FORMS": "0",
        "transitions-MIN_NUM_FORMS": "0",
        "transitions-MAX_NUM_FORMS": "1000",
    }
    data.update(values)
    return data


ONE_VARIANT = {"variants-TOTAL_FORMS": "1", "variants-0-label": "A"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("from_name", "Shop\r\nBcc: eve@example.com"),
        ("from_name", "Shop\x00"),
        ("reply_to", '"a\x01"@example.com'),
        ("from_email", '"news\x7f"@example.com'),
        ("variants-0-subject", "Sale\r\nBcc: eve@example.com"),
        ("variants-0-from_name", "Eve\x1b"),
    ],
)
def test_the_campaign_form_shows_the_header_error_and_saves_nothing(
    admin_client, newsletter, field, value
):
    segment = Segment.objects.create(name="Everyone")
    url = reverse("admin:mailer_campaign_add")

    response = admin_client.post(
        url, campaign_form(newsletter, segment, **ONE_VARIANT, **{field: value})
    )

    assert response.status_code == 200
    content = response.content.decode()
    assert "a header must be one line of text" in content or "Null characters" in content
    assert not Campaign.objects.exists() and not Variant.objects.exists()
    fixed = value.translate({c: None for c in range(32)} | {0x7F: None})
    assert (
        admin_client.post(
            url, campaign_form(newsletter, segment, **ONE_VARIANT, **{field: fixed})
        ).status_code
        == 302
    )


def test_the_template_and_contact_forms_refuse_a_subject_or_name_with_a_line_break(admin_client):
    template = admin_client.post(
        reverse("admin:mailer_template_add"),
        {
            "slug": "promo",
            "language": "en",
            "purpose": "transactional",
            "subject": "Hi\x1b[2J",
            "html": "<p>Hello</p>",
        },
    )
    contact = Contact.objects.create(email="ada@example.com", name="Ada")
    edit = admin_client.post(
        reverse("admin:mailer_contact_change", args=[contact.pk]),
        {"email": "ada@example.com", "name": "Ada\r\nBcc: eve@example.com", "consent": "unknown"},
    )

    assert template.status_code == edit.status_code == 200
    assert "subject" in template.context["adminform"].form.errors
    assert not Template.objects.exists()
    assert "name" in edit.context["adminform"].form.errors
    assert Contact.objects.get(pk=contact.pk).name == "Ada"


def test_the_connection_is_usable_after_every_refusal():
    """The refusals above happen before SQL: PostgreSQL never saw a NUL."""
    for context in HOSTILE_CONTEXT.values():
        with pytest.raises(InvalidContext):
            api.send("welcome", to="ada@example.com", context=context)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
