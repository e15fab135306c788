"""Segments: every rule family as one SQL query, match all/any, include/exclude, validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from mailer import segments
from mailer.admin import SegmentRuleForm
from mailer.exceptions import SegmentError
from mailer.models import Campaign, Contact, Event, Segment, SegmentRule, Tag

pytestmark = pytest.mark.django_db

ADA, BOB, CY, DEE = "ada@example.com", "bob@example.org", "cy@example.com", "dee@test.net"


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def people():
    """Four contacts that differ in every field a rule can look at."""
    now = timezone.now()
    vip, beta = Tag.objects.create(name="vip"), Tag.objects.create(name="beta")
    ada = Contact.objects.create(
        email=ADA,
        name="Ada Lovelace",
        language="en",
        timezone="Europe/London",
        consent=Contact.Consent.GRANTED,
        verified_at=now,
        attributes={"plan": "pro", "seats": 12, "trial": True},
    )
    bob = Contact.objects.create(
        email=BOB,
        name="Bob Stone",
        language="fr",
        timezone="Europe/Paris",
        consent=Contact.Consent.WITHDRAWN,
        attributes={"plan": "free", "seats": 2, "trial": False},
    )
    cy = Contact.objects.create(email=CY, name="", consent=Contact.Consent.UNKNOWN)
    dee = Contact.objects.create(
        email=DEE,
        name="Dee Dee",
        language="de",
        timezone="America/New_York",
        consent=Contact.Consent.GRANTED,
        verified_at=now,
        attributes={"plan": "Enterprise", "seats": 150},
    )
    ada.tags.add(vip, beta)
    bob.tags.add(beta)
    dee.tags.add(vip)
    signup = {
        ADA: datetime(2023, 1, 15, 12, tzinfo=UTC),
        DEE: datetime(2024, 3, 1, 12, tzinfo=UTC),
        BOB: now - timedelta(days=10),
        CY: now - timedelta(days=2),
    }
    for email, created in signup.items():
        Contact.objects.filter(email=email).update(created_at=created)

    past = Campaign.objects.create(name="Last month's newsletter")

    def event(email, kind, days_ago, **extra):
        Event.objects.create(
            recipient=email,
            event_type=kind,
            timestamp=now - timedelta(days=days_ago),
            **{"campaign": past, **extra},
        )

    event(ADA, Event.Type.OPENED, 3)
    event(ADA, Event.Type.CLICKED, 3)
    event(BOB, Event.Type.OPENED, 40)
    # A scanner opening and clicking for Cy is not Cy reading the campaign.
    event(CY, Event.Type.OPENED, 1, automated=True, automated_reason="scanner")
    event(CY, Event.Type.CLICKED, 1, automated=True, automated_reason="scanner")
    # Dee opened a transactional email, not a campaign.
    event(DEE, Event.Type.OPENED, 1, campaign=None)
    return {c.email: c for c in (ada, bob, cy, dee)}


def make_segment(*rules: tuple, match: str = Segment.Match.ALL, name: str = "") -> Segment:
    """A saved segment; each rule is (field, operator, value) or (field, operator, value, key)."""
    segment = Segment.objects.create(
        name=name or f"segment {Segment.objects.count() + 1}", match=match
    )
    for field, operator, value, *attribute in rules:
        SegmentRule.objects.create(
            segment=segment,
            field=field,
            operator=operator,
            value=value,
            attribute=attribute[0] if attribute else "",
        )
    return segment


def members(segment: Segment, assert_num_queries) -> set[str]:
    """The segment's contacts, checking the evaluation itself is a single query."""
    queryset = segments.contacts(segment)
    with assert_num_queries(1):
        rows = list(queryset.values_list("email", flat=True))
    return set(rows)


RULE_CASES = [
    # text fields
    ("email", "eq", "ADA@Example.com", {ADA}),
    ("email", "ne", "ada@example.com", {BOB, CY, DEE}),
    ("email", "contains", "EXAMPLE", {ADA, BOB, CY}),
    ("email", "not_contains", "example", {DEE}),
    ("email", "startswith", "b", {BOB}),
    ("email", "endswith", "@example.com", {ADA, CY}),
    ("email", "in", "ada@example.com, dee@test.net", {ADA, DEE}),
    ("email", "not_in", "ada@example.com,dee@test.net", {BOB, CY}),
    ("name", "contains", "dee", {DEE}),
    ("name", "set", "", {ADA, BOB, DEE}),
    ("name", "not_set", "", {CY}),
    ("language", "eq", "FR", {BOB}),
    ("language", "in", "en,de", {ADA, DEE}),
    ("language", "not_in", "en", {BOB, CY, DEE}),
    ("language", "set", "", {ADA, BOB, DEE}),
    ("language", "not_set", "", {CY}),
    ("timezone", "startswith", "Europe/", {ADA, BOB}),
    ("timezone", "not_in", "Europe/London", {BOB, CY, DEE}),
    ("timezone", "set", "", {ADA, BOB, DEE}),
    ("timezone", "not_set", "", {CY}),
    # consent and verification
    ("consent", "eq", "granted", {ADA, DEE}),
    ("consent", "ne", "granted", {BOB, CY}),
    ("consent", "in", "withdrawn, unknown", {BOB, CY}),
    ("consent", "not_in", "granted,unknown", {BOB}),
    ("verified", "true", "", {ADA, DEE}),
    ("verified", "false", "", {BOB, CY}),
    # signup date
    ("signup", "before", "2024-01-01", {ADA}),
    ("signup", "after", "2024-01-01", {BOB, CY, DEE}),
    ("signup", "within_days", "30", {BOB, CY}),
    ("signup", "older_than_days", "30", {ADA, DEE}),
    # tags
    ("tag", "eq", "VIP", {ADA, DEE}),
    ("tag", "ne", "vip", {BOB, CY}),
    ("tag", "in", "beta, vip", {ADA, BOB, DEE}),
    ("tag", "not_in", "beta", {CY, DEE}),
]

ATTRIBUTE_CASES = [
    ("plan", "eq", "PRO", {ADA}),
    ("plan", "contains", "pri", {DEE}),
    ("plan", "ne", "pro", {BOB, DEE}),
    ("seats", "gt", "10", {ADA, DEE}),
    ("seats", "lt", "10", {BOB}),
    ("seats", "gt", "12.5", {DEE}),
    ("trial", "true", "", {ADA}),
    ("trial", "false", "", {BOB}),
    ("plan", "set", "", {ADA, BOB, DEE}),
    ("plan", "not_set", "", {CY}),
    ("trial", "not_set", "", {CY, DEE}),
]

ENGAGEMENT_CASES = [
    ("opened_within", "within_days", "7", {ADA}),
    ("opened_within", "within_days", "60", {ADA, BOB}),
    ("clicked_within", "within_days", "7", {ADA}),
    ("never_opened", "true", "", {CY, DEE}),
    ("never_opened", "false", "", {ADA, BOB}),
]


@pytest.mark.parametrize(("field", "operator", "value", "expected"), RULE_CASES)
def test_contact_field_rules_select_the_right_contacts_in_one_query(
    people, django_assert_num_queries, field, operator, value, expected
):
    segment = make_segment((field, operator, value))

    assert members(segment, django_assert_num_queries) == expected


@pytest.mark.parametrize(("key", "operator", "value", "expected"), ATTRIBUTE_CASES)
def test_attribute_rules_select_the_right_contacts_in_one_query(
    people, django_assert_num_queries, key, operator, value, expected
):
    segment = make_segment(("attribute", operator, value, key))

    assert members(segment, django_assert_num_queries) == expected


def test_greater_and_less_compare_numbers_stored_as_text_numerically(django_assert_num_queries):
    # A CSV import stores every attribute as a string; "12" must still be more than 10.
    for email, seats in [
        ("text12@example.com", "12"),
        ("text2@example.com", " 2 "),
        ("decimal@example.com", "9.5"),
        ("number150@example.com", 150),
        ("words@example.com", "many"),
        ("flag@example.com", True),
        ("none@example.com", None),
    ]:
        Contact.objects.create(email=email, attributes={"seats": seats})
    Contact.objects.create(email="missing@example.com")

    more = make_segment(("attribute", "gt", "10", "seats"))
    less = make_segment(("attribute", "lt", "10", "seats"))

    assert members(more, django_assert_num_queries) == {
        "text12@example.com",
        "number150@example.com",
    }
    assert members(less, django_assert_num_queries) == {
        "text2@example.com",
        "decimal@example.com",
    }


@pytest.mark.parametrize(("field", "operator", "value", "expected"), ENGAGEMENT_CASES)
def test_engagement_rules_count_only_human_campaign_events(
    people, django_assert_num_queries, field, operator, value, expected
):
    segment = make_segment((field, operator, value))

    assert members(segment, django_assert_num_queries) == expected


def test_match_all_needs_every_rule_and_match_any_needs_one(people, django_assert_num_queries):
    rules = (("consent", "eq", "granted"), ("language", "eq", "fr"))
    every = make_segment(*rules, match=Segment.Match.ALL)
    either = make_segment(*rules, match=Segment.Match.ANY)
    narrow = make_segment(("consent", "eq", "granted"), ("tag", "eq", "beta"))

    assert members(every, django_assert_num_queries) == set()
    assert members(either, django_assert_num_queries) == {ADA, BOB, DEE}
    assert members(narrow, django_assert_num_queries) == {ADA}


def test_a_segment_without_rules_selects_every_contact(people, django_assert_num_queries):
    assert members(make_segment(), django_assert_num_queries) == {ADA, BOB, CY, DEE}


def test_included_segments_narrow_and_excluded_segments_remove(people, django_assert_num_queries):
    consented = make_segment(("consent", "eq", "granted"), name="consented")
    beta = make_segment(("tag", "eq", "beta"), name="beta testers")
    example = make_segment(("email", "contains", "example"), name="example.com people")

    example.include_segments.add(consented)
    assert members(example, django_assert_num_queries) == {ADA}

    example.include_segments.clear()
    example.exclude_segments.add(beta)
    assert members(example, django_assert_num_queries) == {CY}

    example.include_segments.add(consented)
    assert members(example, django_assert_num_queries) == set()


def test_nested_includes_are_still_one_query(people, django_assert_num_queries):
    consented = make_segment(("consent", "eq", "granted"), name="consented")
    vip = make_segment(("tag", "eq", "vip"), name="vip")
    vip.include_segments.add(consented)
    outer = make_segment(("verified", "true", ""), name="outer")
    outer.include_segments.add(vip)
    outer.exclude_segments.add(make_segment(("language", "eq", "de"), name="german"))

    assert members(outer, django_assert_num_queries) == {ADA}


def test_a_segment_including_itself_raises(people):
    loop = make_segment(("consent", "eq", "granted"), name="loop")
    loop.include_segments.add(loop)

    with pytest.raises(SegmentError, match="includes itself"):
        segments.contacts(loop)


def test_two_segments_including_each_other_raise(people):
    first = make_segment(name="first")
    second = make_segment(name="second")
    first.include_segments.add(second)
    second.exclude_segments.add(first)

    with pytest.raises(SegmentError, match="includes itself"):
        segments.contacts(first)


def test_count_matches_the_contacts_query(people):
    segment = make_segment(("tag", "in", "vip,beta"))

    assert segments.count(segment) == 3


# --- Validation -------------------------------------------------------------------------


def rule(field="email", operator="eq", value="x", attribute="") -> SegmentRule:
    return SegmentRule(field=field, operator=operator, value=value, attribute=attribute)


@pytest.mark.parametrize(
    ("bad", "form_field", "says"),
    [
        (rule(field="shoe_size"), "field", "Unknown field"),
        (rule(field="verified", operator="contains"), "operator", "does not take"),
        (rule(field="tag", operator="gt", value="1"), "operator", "does not take"),
        (rule(field="consent", operator="contains", value="granted"), "operator", "does not"),
        (rule(field="email", operator="eq", value="   "), "value", "needs a value"),
        (rule(field="signup", operator="within_days", value="ten"), "value", "whole number"),
        (rule(field="opened_within", operator="within_days", value="-3"), "value", "whole"),
        (rule(field="signup", operator="before", value="2024-13-01"), "value", "not a date"),
        (rule(field="signup", operator="after", value="yesterday"), "value", "not a date"),
        (rule(field="attribute", attribute="", operator="eq"), "attribute", "Attribute keys"),
        (rule(field="attribute", attribute="9lives", operator="eq"), "attribute", "Attribute"),
        (rule(field="attribute", attribute="a__b", operator="eq"), "attribute", "Attribute"),
        (rule(field="attribute", attribute="x'--", operator="eq"), "attribute", "Attribute"),
        (rule(field="attribute", attribute="seats", operator="gt", value="lots"), "value", "num"),
        (rule(field="consent", operator="eq", value="maybe"), "value", "Consent is one of"),
        (rule(field="consent", operator="in", value="granted,maybe"), "value", "Consent is"),
    ],
)
def test_validate_rule_refuses_a_rule_naming_the_form_field(bad, form_field, says):
    with pytest.raises(SegmentError, match=says) as caught:
        segments.validate_rule(bad)

    assert caught.value.field == form_field
    assert form_field in caught.value.message_dict


def test_admin_rule_form_reports_the_rule_error_on_its_field():
    form = SegmentRuleForm(data={"field": "verified", "operator": "eq", "value": "yes"})

    assert not form.is_valid()
    assert form.errors == {
        "operator": ["Email verified does not take 'eq'; use one of: false, true."]
    }


@pytest.mark.parametrize(
    "good",
    [
        rule(field="verified", operator="true", value=""),
        rule(field="name", operator="not_set", value=""),
        rule(field="signup", operator="before", value="2024-02-29"),
        rule(field="attribute", attribute="plan-name_2", operator="eq", value="pro"),
        rule(field="attribute", attribute="seats", operator="lt", value="-1.5"),
        rule(field="consent", operator="not_in", value="granted, withdrawn"),
    ],
)
def test_validate_rule_accepts_a_well_formed_rule(good):
    segments.validate_rule(good)


def test_a_stored_rule_that_became_invalid_fails_evaluation_loudly(people):
    segment = make_segment(("email", "eq", "ada@example.com"))
    segment.rules.update(operator="gt")

    with pytest.raises(SegmentError, match="does not take"):
        segments.contacts(segment)


# --- Admin ------------------------------------------------------------------------------


def segment_form(*rules: dict, **values) -> dict:
    data = {
        "name": "Engaged VIPs",
        "description": "",
        "match": "all",
        "rules-TOTAL_FORMS": str(len(rules)),
        "rules-INITIAL_FORMS": "0",
        "rules-MIN_NUM_FORMS": "0",
        "rules-MAX_NUM_FORMS": "1000",
        **values,
    }
    for i, fields in enumerate(rules):
        for key in ("field", "attribute", "operator", "value"):
            data[f"rules-{i}-{key}"] = fields.get(key, "")
    return data


@pytest.mark.parametrize(
    ("bad_rule", "shown"),
    [
        ({"field": "verified", "operator": "contains", "value": "x"}, "does not take"),
        ({"field": "email", "operator": "eq", "value": ""}, "This rule needs a value."),
        ({"field": "signup", "operator": "within_days", "value": "a week"}, "whole number"),
        ({"field": "signup", "operator": "before", "value": "01/02/2024"}, "is not a date"),
        ({"field": "attribute", "attribute": "a b", "operator": "eq", "value": "1"}, "letters"),
    ],
)
def test_admin_shows_a_bad_rule_and_saves_nothing(admin_client, bad_rule, shown):
    response = admin_client.post(
        reverse("admin:mailer_segment_add"),
        segment_form({"field": "consent", "operator": "eq", "value": "granted"}, bad_rule),
    )

    assert response.status_code == 200
    assert shown in response.content.decode()
    assert response.context["inline_admin_formsets"][0].formset.errors[1]
    assert not Segment.objects.exists()
    assert not SegmentRule.objects.exists()


def test_admin_saves_a_segment_with_its_rules(admin_client, people):
    response = admin_client.post(
        reverse("admin:mailer_segment_add"),
        segment_form(
            {"field": "consent", "operator": "eq", "value": "granted"},
            {"field": "attribute", "attribute": "seats", "operator": "gt", "value": "100"},
        ),
    )

    assert response.status_code == 302
    segment = Segment.objects.get(name="Engaged VIPs")
    assert [(r.field, r.operator, r.value) for r in segment.rules.all()] == [
        ("consent", "eq", "granted"),
        ("attribute", "gt", "100"),
    ]
    assert set(segments.contacts(segment).values_list("email", flat=True)) == {DEE}


def test_segment_change_page_shows_the_live_count(admin_client):
    Contact.objects.bulk_create(
        [Contact(email=f"fan{i}@example.com", consent=Contact.Consent.GRANTED) for i in range(1234)]
        + [Contact(email=f"other{i}@example.com") for i in range(5)]
    )
    segment = make_segment(("consent", "eq", "granted"), name="Fans")

    response = admin_client.get(reverse("admin:mailer_segment_change", args=[segment.pk]))

    assert response.status_code == 200
    content = response.content.decode()
    assert "Contacts now" in content
    assert '<div class="readonly">1,234</div>' in content


def test_segment_change_page_explains_a_segment_that_cannot_be_evaluated(admin_client):
    loop = make_segment(name="Loop")
    loop.include_segments.add(loop)

    response = admin_client.get(reverse("admin:mailer_segment_change", args=[loop.pk]))

    assert response.status_code == 200
    assert "Cannot evaluate: Segment &#x27;Loop&#x27; includes itself." in response.content.decode()


def test_segment_add_page_asks_to_save_before_counting(admin_client):
    response = admin_client.get(reverse("admin:mailer_segment_add"))

    assert response.status_code == 200
    assert "Save to see how many contacts match." in response.content.decode()


# --- Cycles: refused on save --------------------------------------------------------------


def test_check_no_cycle_refuses_a_segment_naming_itself():
    loop = make_segment(name="Loop")

    with pytest.raises(SegmentError, match="Loop → Loop"):
        segments.check_no_cycle(loop, include=[loop])


def test_check_no_cycle_follows_includes_and_excludes_of_other_segments():
    first, second, third = (make_segment(name=n) for n in ("First", "Second", "Third"))
    first.include_segments.add(second)
    second.exclude_segments.add(third)

    with pytest.raises(SegmentError, match="Third → First → Second → Third"):
        segments.check_no_cycle(third, include=[first])
    with pytest.raises(SegmentError, match="Third → First → Second → Third"):
        segments.check_no_cycle(third, exclude=[first])


def test_check_no_cycle_accepts_a_diamond_and_a_new_segment():
    top, left, right, bottom = (make_segment(name=n) for n in ("Top", "Left", "Right", "Bottom"))
    left.include_segments.add(bottom)
    right.exclude_segments.add(bottom)

    segments.check_no_cycle(top, include=[left, right], exclude=[bottom])
    segments.check_no_cycle(Segment(name="Unsaved"), include=[top])


def test_admin_refuses_a_segment_that_would_include_itself_through_others(admin_client):
    first, second, third = (make_segment(name=n) for n in ("First", "Second", "Third"))
    first.include_segments.add(second)
    second.include_segments.add(third)

    response = admin_client.post(
        reverse("admin:mailer_segment_change", args=[third.pk]),
        segment_form(name="Third", include_segments=[str(first.pk)]),
    )

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "Third → First → Second → Third" in str(errors["include_segments"])
    assert "Third → First → Second → Third" in response.content.decode()
    assert not third.include_segments.exists()  # nothing saved


def test_admin_refuses_an_exclude_that_loops_back(admin_client):
    first, second = make_segment(name="First"), make_segment(name="Second")
    first.exclude_segments.add(second)

    response = admin_client.post(
        reverse("admin:mailer_segment_change", args=[second.pk]),
        segment_form(name="Second", include_segments=[str(first.pk)]),
    )

    assert response.status_code == 200
    assert "Second → First → Second" in response.content.decode()
    assert not second.include_segments.exists()


def test_admin_never_offers_a_segment_to_itself_and_saves_a_chain(admin_client):
    first, second = make_segment(name="First"), make_segment(name="Second")
    page = admin_client.get(reverse("admin:mailer_segment_change", args=[second.pk]))
    offered = page.context["adminform"].form.fields["include_segments"].queryset
    assert list(offered) == [first]

    response = admin_client.post(
        reverse("admin:mailer_segment_change", args=[second.pk]),
        segment_form(name="Second", include_segments=[str(first.pk)]),
    )

    assert response.status_code == 302
    assert list(second.include_segments.all()) == [first]
