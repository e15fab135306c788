"""Campaigns end to end in process: status machine, launch, pause/cancel, A/B winners,
reports, the reputation guard and the admin — against real PostgreSQL, Redis and SMTP."""

from __future__ import annotations

import csv
import io
import json
import logging
import uuid
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timedelta

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from mailer import abtest, api, campaigns, compose, delivery, outbox, reports, reputation, segments
from mailer import admin as admin_module
from mailer.exceptions import CampaignError
from mailer.models import (
    Campaign,
    CampaignStatus,
    CampaignTransition,
    Contact,
    Event,
    Kind,
    Message,
    MessageStatus,
    Queue,
    ReputationPause,
    Segment,
    SegmentRule,
    Suppression,
    Tag,
    Template,
    Variant,
)

pytestmark = pytest.mark.django_db

S = CampaignStatus
POSTAL = "1 Test St"
NEWSLETTER = """<html><body><h1>Hello {{ contact.first_name }}</h1>
<p><a href="https://example.com/sale">See the sale</a></p>
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> · {{ postal_address }}</p></body></html>"""


@pytest.fixture(autouse=True)
def campaign_settings(settings, broker):
    """A postal address (CAN-SPAM), fast password hashing, and an empty Redis broker."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.MAILER = {**settings.MAILER, "POSTAL_ADDRESS": POSTAL}


def mailer_settings(settings, **values) -> None:
    settings.MAILER = {**settings.MAILER, **values}


@pytest.fixture
def newsletter() -> Template:
    return Template.objects.create(
        slug="newsletter",
        purpose=Template.Purpose.MARKETING,
        subject="News for {{ contact.first_name }}",
        html=NEWSLETTER,
    )


@pytest.fixture
def everyone() -> Segment:
    return Segment.objects.create(name="Everyone")


def add_contacts(count: int, prefix: str = "reader", **fields) -> list[Contact]:
    fields.setdefault("consent", Contact.Consent.GRANTED)
    return Contact.objects.bulk_create(
        [
            Contact(email=f"{prefix}{i}@example.com", name=f"Reader {i}", **fields)
            for i in range(count)
        ]
    )


def make_campaign(template, *include: Segment, exclude=(), variants=(), **fields) -> Campaign:
    campaign = Campaign.objects.create(name=fields.pop("name", "Spring sale"), template=template)
    Campaign.objects.filter(pk=campaign.pk).update(**fields)
    campaign.refresh_from_db()
    campaign.segments.set(include)
    campaign.exclude_segments.set(exclude)
    for label, subject in variants:
        Variant.objects.create(campaign=campaign, label=label, subject=subject)
    return campaign


def launched(campaign: Campaign) -> Campaign:
    """Send now and launch in process (what the enqueued launch task does)."""
    campaigns.send_now(campaign)
    campaigns.launch(campaign.pk)
    campaign.refresh_from_db()
    return campaign


def send_some(count: int) -> int:
    """One worker batch: claim ``count`` campaign messages and send them."""
    return delivery.send_batch(
        outbox.claim(Queue.CAMPAIGN, count, uuid.uuid4()), Queue.CAMPAIGN
    ).sent


def recipients(smtp) -> Counter:
    return Counter(r.lower() for m in smtp.messages for r in m.rcpt_tos)


def event(message: Message, kind: str, *, at=None, automated=False, link=None, **fields):
    """An event as a webhook or our tracking records it: the row, and for a person's
    event the message's status and first-event time."""
    stored = Event.objects.create(
        message=message,
        campaign_id=message.campaign_id,
        recipient=message.to_email,
        event_type=kind,
        timestamp=at or timezone.now(),
        automated=automated,
        automated_reason="scanner" if automated else "",
        link_id=link,
        **fields,
    )
    if not automated:
        outbox.apply_event(message.pk, kind, stored.timestamp)
    return stored


def statuses(campaign: Campaign) -> Counter:
    return Counter(Message.objects.filter(campaign=campaign).values_list("status", flat=True))


# --- Status machine ---------------------------------------------------------------------

ALL_STATUSES = list(S.values)
ALLOWED = sorted((a, b) for a, targets in campaigns.TRANSITIONS.items() for b in targets)
REFUSED = [(a, b) for a in ALL_STATUSES for b in ALL_STATUSES if (a, b) not in ALLOWED]


def test_the_transition_table_covers_every_status():
    assert set(campaigns.TRANSITIONS) == set(ALL_STATUSES)
    assert campaigns.TRANSITIONS[S.SENT] == set()
    assert campaigns.TRANSITIONS[S.CANCELLED] == set()


@pytest.mark.parametrize(("start", "end"), ALLOWED)
def test_every_allowed_transition_moves_the_campaign_and_is_recorded(start, end, admin_user):
    campaign = Campaign.objects.create(name="c", status=start)

    campaigns.transition(campaign, end, by=admin_user, note="because")

    assert campaign.status == end
    assert Campaign.objects.get(pk=campaign.pk).status == end
    (step,) = CampaignTransition.objects.filter(campaign=campaign)
    assert (step.from_status, step.to_status, step.by, step.note) == (
        start,
        end,
        admin_user,
        "because",
    )


@pytest.mark.parametrize(("start", "end"), REFUSED)
def test_every_other_transition_is_refused_and_records_nothing(start, end):
    campaign = Campaign.objects.create(name="c", status=start)

    with pytest.raises(CampaignError, match="cannot become"):
        campaigns.transition(campaign, end, note="nope")

    assert Campaign.objects.get(pk=campaign.pk).status == start
    assert not CampaignTransition.objects.exists()


# --- Readiness and scheduling -------------------------------------------------------------


def test_check_ready_returns_the_audience_size(newsletter, everyone):
    add_contacts(3)

    assert campaigns.check_ready(make_campaign(newsletter, everyone)) == 3


def test_a_campaign_without_a_template_is_not_ready(everyone):
    add_contacts(1)

    with pytest.raises(CampaignError, match="Choose a template") as caught:
        campaigns.check_ready(make_campaign(None, everyone))
    assert caught.value.field == "template"


def test_variant_templates_stand_in_for_the_campaign_template_only_in_an_ab_test(
    newsletter, everyone
):
    add_contacts(1)
    campaign = make_campaign(None, everyone, test_share=0)
    for label in "AB":
        Variant.objects.create(campaign=campaign, label=label, template=newsletter)

    with pytest.raises(CampaignError, match="Choose a template"):
        campaigns.check_ready(campaign)

    Campaign.objects.filter(pk=campaign.pk).update(test_share=50)
    assert campaigns.check_ready(Campaign.objects.get(pk=campaign.pk)) == 1


def test_an_ab_test_with_a_template_per_variant_launches_with_each_template(newsletter, everyone):
    other = Template.objects.create(
        slug="newsletter-b", purpose=Template.Purpose.MARKETING, subject="B", html=NEWSLETTER
    )
    add_contacts(200)
    campaign = make_campaign(None, everyone, test_share=50)
    Variant.objects.create(campaign=campaign, label="A", template=newsletter)
    Variant.objects.create(campaign=campaign, label="B", template=other)

    campaign = launched(campaign)

    pairs = set(
        Message.objects.filter(campaign=campaign).values_list("variant__label", "template_slug")
    )
    assert pairs == {("A", "newsletter"), ("B", "newsletter-b")}


def test_a_campaign_without_a_segment_is_not_ready(newsletter):
    add_contacts(1)

    with pytest.raises(CampaignError, match="at least one segment") as caught:
        campaigns.check_ready(make_campaign(newsletter))
    assert caught.value.field == "segments"


def test_a_transactional_template_cannot_be_sent_as_a_campaign(everyone):
    add_contacts(1)
    receipt = Template.objects.create(slug="receipt", subject="Receipt", html="<p>Paid</p>")

    with pytest.raises(CampaignError, match="is not a marketing template"):
        campaigns.check_ready(make_campaign(receipt, everyone))


def test_a_variant_with_a_transactional_template_is_refused(newsletter, everyone):
    add_contacts(1)
    receipt = Template.objects.create(slug="receipt", subject="Receipt", html="<p>Paid</p>")
    campaign = make_campaign(newsletter, everyone, test_share=20, variants=[("A", "a")])
    Variant.objects.create(campaign=campaign, label="B", template=receipt)

    with pytest.raises(CampaignError, match="receipt \\(en\\) is not a marketing template"):
        campaigns.check_ready(campaign)


@pytest.mark.parametrize("count", [1, 6])
def test_an_ab_test_needs_two_to_five_variants(newsletter, everyone, count):
    add_contacts(1)
    campaign = make_campaign(
        newsletter, everyone, test_share=20, variants=[(c, c) for c in "ABCDEF"[:count]]
    )

    with pytest.raises(CampaignError, match="two to five variants") as caught:
        campaigns.check_ready(campaign)
    assert caught.value.field == "test_share"


def test_an_ab_test_share_above_half_is_refused(newsletter, everyone):
    add_contacts(1)
    campaign = make_campaign(newsletter, everyone, test_share=60, variants=[("A", "a"), ("B", "b")])

    with pytest.raises(CampaignError, match="1 to 50 percent"):
        campaigns.check_ready(campaign)


def test_marketing_needs_a_postal_address(settings, newsletter, everyone):
    add_contacts(1)
    mailer_settings(settings, POSTAL_ADDRESS="")

    with pytest.raises(CampaignError, match="POSTAL_ADDRESS"):
        campaigns.check_ready(make_campaign(newsletter, everyone))


def test_a_segment_of_unconsented_or_suppressed_people_has_no_eligible_recipients(
    newsletter, everyone
):
    add_contacts(1, prefix="unknown", consent=Contact.Consent.UNKNOWN)
    add_contacts(1, prefix="withdrawn", consent=Contact.Consent.WITHDRAWN)
    add_contacts(1, prefix="bounced")
    add_contacts(1, prefix="unsubscribed")
    Suppression.objects.create(email="bounced0@example.com", scope=Suppression.Scope.ALL)
    Suppression.objects.create(email="unsubscribed0@example.com", scope=Suppression.Scope.MARKETING)

    with pytest.raises(CampaignError, match="No eligible recipients") as caught:
        campaigns.check_ready(make_campaign(newsletter, everyone))
    assert caught.value.field == "segments"


def test_schedule_in_the_past_is_refused_and_leaves_a_draft(newsletter, everyone):
    add_contacts(1)
    campaign = make_campaign(newsletter, everyone)

    with pytest.raises(CampaignError, match="in the past") as caught:
        campaigns.schedule(campaign, timezone.now() - timedelta(minutes=1))

    assert caught.value.field == "send_at"
    campaign.refresh_from_db()
    assert (campaign.status, campaign.send_at) == (S.DRAFT, None)
    assert not campaign.transitions.exists()


def test_schedule_refuses_a_naive_datetime(newsletter, everyone):
    add_contacts(1)
    campaign = make_campaign(newsletter, everyone)

    with pytest.raises(CampaignError, match="time zone"):
        campaigns.schedule(campaign, datetime(2099, 1, 1, 9, 0))

    assert Campaign.objects.get(pk=campaign.pk).status == S.DRAFT


def test_schedule_refuses_a_campaign_that_is_not_ready(newsletter):
    campaign = make_campaign(newsletter)

    with pytest.raises(CampaignError, match="segment"):
        campaigns.schedule(campaign, timezone.now() + timedelta(hours=1))

    assert Campaign.objects.get(pk=campaign.pk).status == S.DRAFT


def test_a_scheduled_campaign_launches_when_due_and_not_before(newsletter, everyone, admin_user):
    add_contacts(2)
    campaign = make_campaign(newsletter, everyone)
    send_at = timezone.now() + timedelta(hours=2)

    campaigns.schedule(campaign, send_at, by=admin_user)

    assert (campaign.status, campaign.send_at) == (S.SCHEDULED, send_at)
    step = campaign.transitions.get()
    assert step.by == admin_user
    assert "~2 recipients" in step.note
    assert campaigns.launch_due(now=send_at - timedelta(minutes=1)) == 0
    assert campaigns.launch(campaign.pk) == 0
    assert not Message.objects.exists()
    assert campaigns.launch_due(now=send_at + timedelta(seconds=1)) == 2
    assert Campaign.objects.get(pk=campaign.pk).status == S.SENDING


def test_unschedule_returns_a_scheduled_campaign_to_draft(newsletter, everyone):
    add_contacts(1)
    campaign = make_campaign(newsletter, everyone)
    campaigns.schedule(campaign, timezone.now() + timedelta(hours=1))

    campaigns.unschedule(campaign)

    assert campaign.status == S.DRAFT
    assert campaigns.launch_due(now=timezone.now() + timedelta(days=1)) == 0


# --- Launch -----------------------------------------------------------------------------


@pytest.fixture
def audience(newsletter):
    """Members tagged "member", some of whom must not be mailed, and one outsider."""
    member, blocked = Tag.objects.create(name="member"), Tag.objects.create(name="blocked")
    people = {
        "ok1": {},
        "ok2": {},
        "ok3": {},
        "unknown": {"consent": Contact.Consent.UNKNOWN},
        "withdrawn": {"consent": Contact.Consent.WITHDRAWN},
        "bounced": {},
        "unsubscribed": {},
        "excluded": {},
    }
    for name, fields in people.items():
        contact = Contact.objects.create(
            email=f"{name}@example.com",
            name=name.title(),
            consent=fields.get("consent", Contact.Consent.GRANTED),
        )
        contact.tags.add(member)
        if name == "excluded":
            contact.tags.add(blocked)
    Contact.objects.create(email="outsider@example.com", consent=Contact.Consent.GRANTED)
    Suppression.objects.create(email="bounced@example.com", scope=Suppression.Scope.ALL)
    Suppression.objects.create(email="unsubscribed@example.com", scope=Suppression.Scope.MARKETING)
    members = Segment.objects.create(name="Members")
    SegmentRule.objects.create(segment=members, field="tag", operator="eq", value="member")
    blocked_segment = Segment.objects.create(name="Blocked")
    SegmentRule.objects.create(segment=blocked_segment, field="tag", operator="eq", value="blocked")
    return make_campaign(newsletter, members, exclude=[blocked_segment])


ELIGIBLE = ["ok1@example.com", "ok2@example.com", "ok3@example.com"]


def test_launch_queues_one_message_per_eligible_contact_and_nobody_else(audience):
    campaign = launched(audience)

    messages = Message.objects.filter(campaign=campaign)
    assert sorted(messages.values_list("to_email", flat=True)) == ELIGIBLE
    for message in messages:
        assert (message.kind, message.status) == (Kind.CAMPAIGN, MessageStatus.QUEUED)
        assert message.template_slug == "newsletter"
        assert message.template_id == campaign.template_id
        assert message.contact.email == message.to_email
        assert message.variant_id is None
    assert campaign.status == S.SENDING
    assert campaign.recipients == 3
    assert campaign.launched_at is not None
    assert [t.to_status for t in campaign.transitions.all()] == [S.SCHEDULED, S.SENDING]


def test_launching_or_materializing_twice_adds_nobody(audience):
    campaign = launched(audience)

    assert campaigns.launch(campaign.pk) == 0
    assert campaigns.materialize(campaign, phase="all") == 0
    assert Message.objects.filter(campaign=campaign).count() == 3
    assert Campaign.objects.get(pk=campaign.pk).recipients == 3


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_small_chunks_materialize_the_same_audience(monkeypatch, newsletter, chunk):
    """Each chunk evaluates the segments, nested ones too, on its own range of ids."""
    monkeypatch.setattr(campaigns, "CHUNK", chunk)
    people = add_contacts(30)  # "Reader 0" … "Reader 29"
    german = Segment.objects.create(name="German")
    SegmentRule.objects.create(segment=german, field="language", operator="eq", value="de")
    readers = Segment.objects.create(name="Readers", match=Segment.Match.ANY)
    SegmentRule.objects.create(segment=readers, field="name", operator="contains", value="1")
    SegmentRule.objects.create(segment=readers, field="name", operator="contains", value="3")
    readers.exclude_segments.add(german)
    Contact.objects.filter(pk__in=[people[i].pk for i in (1, 10, 14)]).update(language="de")
    for i in (3, 23):
        Suppression.objects.create(email=people[i].email, scope=Suppression.Scope.ALL)

    campaign = launched(make_campaign(newsletter, readers))

    expected = {f"reader{i}@example.com" for i in (11, 12, 13, 15, 16, 17, 18, 19, 21)}
    mailed = list(Message.objects.filter(campaign=campaign).values_list("to_email", flat=True))
    assert sorted(mailed) == sorted(expected)
    assert set(segments.audience(campaign).values_list("email", flat=True)) == expected


def test_the_audience_matches_what_launch_materializes(audience):
    expected = sorted(segments.audience(audience).values_list("email", flat=True))

    launched(audience)

    assert expected == ELIGIBLE


def test_drain_sends_each_recipient_once_and_the_campaign_finishes(smtp, audience):
    campaign = launched(audience)

    assert delivery.drain(Kind.CAMPAIGN) == 3
    assert delivery.drain(Kind.CAMPAIGN) == 0

    assert recipients(smtp) == Counter(ELIGIBLE)
    email = smtp.to("ok1@example.com")[0].parsed()
    assert email["Subject"] == "News for Ok1"
    assert email["List-Unsubscribe"]
    assert POSTAL in email.get_body(("html",)).get_content()
    assert statuses(campaign) == Counter({MessageStatus.SENT: 3})
    sent = Message.objects.filter(campaign=campaign)
    assert all(m.sent_at and m.provider_message_id.startswith("<") for m in sent)
    # sent_at is the record: no per-recipient 'sent' event for a million-recipient campaign
    assert not Event.objects.filter(message__campaign=campaign).exists()
    assert campaigns.finish_campaigns() == 1
    campaign.refresh_from_db()
    assert campaign.status == S.SENT
    assert campaign.finished_at is not None


def test_a_campaign_is_not_finished_while_messages_wait(smtp, audience):
    campaign = launched(audience)
    send_some(2)

    assert campaigns.finish_campaigns() == 0
    assert Campaign.objects.get(pk=campaign.pk).status == S.SENDING


def test_campaign_sender_and_reply_to_are_used(smtp, audience):
    Campaign.objects.filter(pk=audience.pk).update(
        from_name="Spring Team", from_email="team@mailer.test", reply_to="replies@mailer.test"
    )
    launched(Campaign.objects.get(pk=audience.pk))

    delivery.drain(Kind.CAMPAIGN)

    email = smtp.to("ok2@example.com")[0].parsed()
    assert email["From"].addresses[0].display_name == "Spring Team"
    assert email["From"].addresses[0].addr_spec == "team@mailer.test"
    assert email["Reply-To"] == "replies@mailer.test"


def test_a_contact_suppressed_after_launch_is_not_mailed(smtp, audience):
    campaign = launched(audience)
    Suppression.objects.create(email="ok2@example.com", scope=Suppression.Scope.MARKETING)

    delivery.drain(Kind.CAMPAIGN)

    assert sorted(recipients(smtp)) == ["ok1@example.com", "ok3@example.com"]
    assert Message.objects.get(campaign=campaign, to_email="ok2@example.com").status == (
        MessageStatus.SUPPRESSED
    )


# --- The campaign's status follows its last email ----------------------------------------


@contextmanager
def tasks_here():
    """Celery runs each task in this process as it is sent, as a worker would."""
    from celery import current_app

    import mailer.tasks  # noqa: F401 - registers the tasks, as a worker does

    conf = current_app.conf
    before = conf.task_always_eager, conf.task_eager_propagates
    conf.task_always_eager = conf.task_eager_propagates = True
    try:
        yield
    finally:
        conf.task_always_eager, conf.task_eager_propagates = before


def test_the_batch_that_handles_the_last_email_marks_the_campaign_sent(smtp, audience):
    campaign = launched(audience)  # three recipients

    with tasks_here():
        assert send_some(2) == 2
        assert Campaign.objects.get(pk=campaign.pk).status == S.SENDING  # one still to go

        assert send_some(5) == 1  # no housekeeping runs here

    campaign.refresh_from_db()
    assert campaign.status == S.SENT
    assert campaign.finished_at is not None
    assert campaign.transitions.last().note == "every message handled"


def test_a_campaign_whose_last_email_is_suppressed_at_send_is_sent_too(smtp, audience):
    campaign = launched(audience)
    send_some(2)
    last = Message.objects.get(campaign=campaign, status=MessageStatus.QUEUED)
    Suppression.objects.create(email=last.to_email, scope=Suppression.Scope.MARKETING)

    with tasks_here():
        assert send_some(5) == 0

    assert Message.objects.get(pk=last.pk).status == MessageStatus.SUPPRESSED
    assert Campaign.objects.get(pk=campaign.pk).status == S.SENT


def test_campaigns_done_is_one_query_and_names_only_running_campaigns_with_nothing_waiting(
    smtp, newsletter, everyone, django_assert_num_queries
):
    add_contacts(2)
    finished = launched(make_campaign(newsletter, everyone, name="finished"))
    Message.objects.filter(campaign=finished).update(status=MessageStatus.SENT)
    waiting = launched(make_campaign(newsletter, everyone, name="waiting"))
    Message.objects.filter(campaign=waiting).update(status=MessageStatus.SENT)
    Message.objects.filter(campaign=waiting).filter(
        pk=Message.objects.filter(campaign=waiting).order_by("pk").values("pk")[:1]
    ).update(status=MessageStatus.SENDING)
    paused = launched(make_campaign(newsletter, everyone, name="paused"))
    Message.objects.filter(campaign=paused).update(status=MessageStatus.CANCELLED)
    campaigns.pause(paused)

    with django_assert_num_queries(1):
        done = outbox.campaigns_done({finished.pk, waiting.pk, paused.pk})

    assert done == [finished.pk]
    assert outbox.campaigns_done(set()) == []


def test_finishing_twice_is_harmless(smtp, audience):
    campaign = launched(audience)
    delivery.drain(Kind.CAMPAIGN)

    assert campaigns.finish_campaigns(ids=[campaign.pk]) == 1
    assert campaigns.finish_campaigns(ids=[campaign.pk]) == 0
    assert campaigns.finish_campaigns() == 0
    assert Campaign.objects.get(pk=campaign.pk).status == S.SENT


# --- Pause, resume, cancel ---------------------------------------------------------------


@pytest.fixture
def six(newsletter, everyone):
    add_contacts(6)
    return launched(make_campaign(newsletter, everyone))


def test_pause_stops_sending_and_releases_claimed_messages(smtp, six, admin_user):
    assert send_some(2) == 2
    claimed = outbox.claim(Queue.CAMPAIGN, 2, uuid.uuid4())
    assert {m.attempts for m in claimed} == {0}  # an attempt counts when it is tried

    campaigns.pause(six, by=admin_user, reason="checking a typo")
    result = delivery.send_batch(claimed, Queue.CAMPAIGN)

    assert result.sent == 0
    for message in Message.objects.filter(pk__in=[m.pk for m in claimed]):
        assert message.status == MessageStatus.QUEUED
        assert message.attempts == 0
        assert message.claim_token is None
    assert delivery.drain(Kind.CAMPAIGN) == 0
    assert len(smtp.messages) == 2
    six.refresh_from_db()
    assert (six.status, six.paused_reason) == (S.PAUSED, "checking a typo")
    assert six.transitions.last().by == admin_user


def test_resume_sends_the_rest_and_nobody_twice(smtp, six):
    send_some(2)
    claimed = outbox.claim(Queue.CAMPAIGN, 2, uuid.uuid4())
    campaigns.pause(six)
    delivery.send_batch(claimed, Queue.CAMPAIGN)

    campaigns.resume(six)

    assert six.status == S.SENDING
    assert six.paused_reason == ""
    assert delivery.drain(Kind.CAMPAIGN) == 4
    sent = recipients(smtp)
    assert len(sent) == 6
    assert set(sent.values()) == {1}
    assert set(Message.objects.filter(campaign=six).values_list("attempts", flat=True)) == {1}
    assert campaigns.finish_campaigns() == 1


def test_resume_of_a_campaign_that_is_not_paused_is_refused(six):
    with pytest.raises(CampaignError, match="cannot become"):
        campaigns.resume(six)


def test_cancel_cancels_unsent_messages_and_cannot_be_resumed(smtp, six, admin_user):
    send_some(2)

    assert campaigns.cancel(six, by=admin_user) == 4

    assert statuses(six) == Counter({MessageStatus.SENT: 2, MessageStatus.CANCELLED: 4})
    six.refresh_from_db()
    assert six.status == S.CANCELLED
    assert six.finished_at is not None
    with pytest.raises(CampaignError, match="cannot become"):
        campaigns.resume(six)
    assert delivery.drain(Kind.CAMPAIGN) == 0
    assert len(smtp.messages) == 2


def test_messages_claimed_when_the_campaign_is_cancelled_end_up_cancelled(smtp, six):
    claimed = outbox.claim(Queue.CAMPAIGN, 2, uuid.uuid4())

    campaigns.cancel(six)
    delivery.send_batch(claimed, Queue.CAMPAIGN)

    assert statuses(six) == Counter({MessageStatus.CANCELLED: 6})
    assert reports.report(six)["pending"] == 0
    assert not smtp.messages


def test_a_paused_campaign_can_still_be_cancelled(six):
    campaigns.pause(six)

    assert campaigns.cancel(six) == 6

    assert Campaign.objects.get(pk=six.pk).status == S.CANCELLED


# --- Duplicate and test sends ------------------------------------------------------------


def test_duplicate_copies_content_segments_and_variants_into_a_new_draft(
    newsletter, everyone, admin_user
):
    excluded = Segment.objects.create(name="Staff")
    original = make_campaign(
        newsletter,
        everyone,
        exclude=[excluded],
        variants=[("A", "Spring is here"), ("B", "Sale: {{ contact.first_name }}")],
        name="Spring",
        from_name="Shop",
        reply_to="help@example.com",
        test_share=20,
        tie_rule=Campaign.TieRule.EXTEND_ONCE,
        status=S.SENT,
    )

    copy = campaigns.duplicate(original, by=admin_user)

    assert copy.pk != original.pk
    assert (copy.name, copy.status, copy.template) == ("Copy of Spring", S.DRAFT, newsletter)
    assert (copy.from_name, copy.reply_to, copy.test_share) == ("Shop", "help@example.com", 20)
    assert copy.tie_rule == Campaign.TieRule.EXTEND_ONCE
    assert list(copy.segments.all()) == [everyone]
    assert list(copy.exclude_segments.all()) == [excluded]
    assert [(v.label, v.subject) for v in copy.variants.all()] == [
        ("A", "Spring is here"),
        ("B", "Sale: {{ contact.first_name }}"),
    ]
    assert not set(copy.variants.values_list("pk", flat=True)) & set(
        original.variants.values_list("pk", flat=True)
    )
    step = copy.transitions.get()
    assert (step.by, step.note) == (admin_user, f"duplicated from #{original.pk}")
    assert original.variants.count() == 2
    assert Campaign.objects.get(pk=original.pk).status == S.SENT


def test_send_test_mails_each_variant_once_outside_the_campaign_numbers(smtp, newsletter, everyone):
    add_contacts(2)
    campaign = make_campaign(
        newsletter,
        everyone,
        test_share=20,
        variants=[("A", "Alpha for {{ contact.first_name }}"), ("B", "Beta")],
    )

    created = campaigns.send_test(campaign, "Tester@Example.com")

    assert len(created) == 2
    assert delivery.drain(Kind.CAMPAIGN) == 2
    subjects = sorted(m.parsed()["Subject"] for m in smtp.to("tester@example.com"))
    assert subjects == ["[TEST] Alpha for", "[TEST] Beta"]
    assert len(smtp.messages) == 2
    tests = Message.objects.filter(metadata__test_of_campaign=campaign.pk)
    assert tests.count() == 2
    assert set(tests.values_list("campaign_id", flat=True)) == {None}
    assert not Message.objects.filter(campaign=campaign).exists()
    report = reports.report(campaign)
    assert (report["recipients"], report["sent"]) == (0, 0)
    assert Campaign.objects.get(pk=campaign.pk).status == S.DRAFT


def test_send_test_without_variants_sends_the_template_once(smtp, newsletter, everyone):
    campaign = make_campaign(newsletter, everyone)

    campaigns.send_test(campaign, "tester@example.com")
    delivery.drain(Kind.CAMPAIGN)

    (received,) = smtp.to("tester@example.com")
    assert received.parsed()["Subject"] == "[TEST] News for"


def _headers(email) -> tuple:
    sender = email["From"].addresses[0]
    return (
        email["Subject"].removeprefix("[TEST] "),
        sender.display_name,
        sender.addr_spec,
        email["Reply-To"],
        bool(email["List-Unsubscribe"]),
    )


def test_send_test_carries_the_campaigns_sender_reply_to_and_variant_as_the_real_send(
    smtp, newsletter, everyone
):
    add_contacts(40)
    campaign = make_campaign(
        newsletter,
        everyone,
        test_share=50,
        variants=[("A", "Alpha"), ("B", "Beta")],
        from_name="Spring Team",
        from_email="team@mailer.test",
        reply_to="replies@mailer.test",
    )
    Variant.objects.filter(campaign=campaign, label="B").update(from_name="The B Team")

    campaigns.send_test(campaign, "tester@example.com")
    assert delivery.drain(Kind.CAMPAIGN) == 2
    tests = {_headers(m.parsed()) for m in smtp.to("tester@example.com")}

    assert tests == {
        ("Alpha", "Spring Team", "team@mailer.test", "replies@mailer.test", True),
        ("Beta", "The B Team", "team@mailer.test", "replies@mailer.test", True),
    }
    # The real send's test share gets exactly those headers, variant by variant.
    launched(campaign)
    delivery.drain(Kind.CAMPAIGN)
    real = {_headers(m.parsed()) for m in smtp.messages if "tester@example.com" not in m.rcpt_tos}
    assert real == tests


def test_send_test_of_a_campaign_without_an_ab_test_ignores_its_variants(
    smtp, newsletter, everyone
):
    campaign = make_campaign(
        newsletter,
        everyone,
        variants=[("A", "Alpha"), ("B", "Beta")],
        from_email="team@mailer.test",
        reply_to="replies@mailer.test",
    )

    (message,) = campaigns.send_test(campaign, "tester@example.com")
    delivery.drain(Kind.CAMPAIGN)

    assert message.variant is None
    (received,) = smtp.to("tester@example.com")
    email = received.parsed()
    assert email["Subject"] == "[TEST] News for"  # the template's, as the launch sends
    assert email["From"].addresses[0].addr_spec == "team@mailer.test"
    assert email["Reply-To"] == "replies@mailer.test"


def test_a_test_email_built_outside_a_batch_reads_its_campaign(newsletter, everyone):
    campaign = make_campaign(newsletter, everyone, from_email="team@mailer.test")
    (message,) = campaigns.send_test(campaign, "tester@example.com")
    fresh = Message.objects.get(pk=message.pk)

    assert compose.sending_campaign(fresh) == campaign
    assert compose.sending_campaign(Message(metadata={"test_of_campaign": "x", "test": 1})) is None


def test_send_test_needs_a_template(everyone):
    with pytest.raises(CampaignError, match="template"):
        campaigns.send_test(make_campaign(None, everyone), "tester@example.com")


# --- A/B tests ----------------------------------------------------------------------------


def ab_campaign(newsletter, everyone, contacts: int, share: int, **fields) -> Campaign:
    add_contacts(contacts)
    return make_campaign(
        newsletter,
        everyone,
        test_share=share,
        variants=[("A", "Plain subject"), ("B", "Exciting subject!")],
        **fields,
    )


def assignment(campaign: Campaign) -> dict[int, int]:
    return dict(Message.objects.filter(campaign=campaign).values_list("contact_id", "variant_id"))


def test_ab_launch_mails_the_test_share_split_evenly_between_variants(newsletter, everyone):
    campaign = launched(ab_campaign(newsletter, everyone, 2000, 20))

    test_group = Message.objects.filter(campaign=campaign)
    share = test_group.count() / 2000
    assert abs(share - 0.20) <= 0.03
    a, b = (test_group.filter(variant__label=label).count() for label in "AB")
    assert a + b == test_group.count()
    assert abs(a - b) <= 0.10 * max(a, b)
    assert campaign.status == S.TESTING
    assert campaign.test_ends_at == campaign.launched_at + timedelta(hours=4)
    assert campaign.recipients == test_group.count()


def test_the_ab_split_is_reproducible(newsletter, everyone):
    campaign = launched(ab_campaign(newsletter, everyone, 500, 30))
    first = assignment(campaign)

    Message.objects.filter(campaign=campaign).delete()
    campaigns.materialize(campaign, phase="test")

    assert assignment(campaign) == first
    assert len(set(first.values())) == 2


def test_test_group_and_the_rest_partition_the_audience(newsletter, everyone):
    campaign = launched(ab_campaign(newsletter, everyone, 500, 30))
    test_group = assignment(campaign)

    abtest.choose_winner(campaign, campaign.variants.get(label="B"))

    everybody = assignment(campaign)
    assert len(everybody) == 500
    assert {pk: v for pk, v in everybody.items() if pk in test_group} == test_group
    b = campaign.variants.get(label="B").pk
    assert {v for pk, v in everybody.items() if pk not in test_group} == {b}


@pytest.fixture
def ab_sent(smtp, newsletter, everyone):
    """An A/B test launched at a known time whose test group has been mailed."""
    campaign = launched(ab_campaign(newsletter, everyone, 300, 50))
    now = campaign.launched_at
    delivery.drain(Kind.CAMPAIGN)
    campaigns.finish_campaigns(now=now + timedelta(minutes=5))
    campaign.refresh_from_db()
    assert campaign.status == S.WAITING
    return campaign, now


def click_share(campaign: Campaign, label: str, share: float, **fields) -> int:
    messages = list(Message.objects.filter(campaign=campaign, variant__label=label).order_by("pk"))
    chosen = messages[: round(len(messages) * share)]
    for message in chosen:
        event(message, Event.Type.OPENED, **fields)
        event(message, Event.Type.CLICKED, **fields)
    return len(chosen)


def test_the_variant_with_the_best_human_click_rate_wins_after_the_window(smtp, ab_sent):
    campaign, launched_at = ab_sent
    test_group = set(Message.objects.filter(campaign=campaign).values_list("to_email", flat=True))
    click_share(campaign, "A", 0.05)
    click_share(campaign, "A", 1.0, automated=True)  # link scanners must not make A win
    click_share(campaign, "B", 0.40)

    assert abtest.pick_due_winners(now=launched_at + timedelta(hours=3, minutes=59)) == 0
    assert Campaign.objects.get(pk=campaign.pk).winner is None

    assert abtest.pick_due_winners(now=launched_at + timedelta(hours=4, minutes=1)) == 1

    campaign.refresh_from_db()
    assert campaign.winner.label == "B"
    assert campaign.status == S.SENDING
    reason = campaign.winner_reason
    assert (reason["metric"], reason["action"], reason["winner"]) == (
        "click_rate",
        "best rate",
        "B",
    )
    arms = {row["label"]: row for row in reason["variants"]}
    for label in "AB":
        arm = Message.objects.filter(campaign=campaign, variant__label=label)
        assert (
            arms[label]["sent"]
            == arms[label]["trials"]
            == arm.filter(sent_at__isnull=False).count()
        )
    assert arms["B"]["rate"] > arms["A"]["rate"]
    assert arms["A"]["clicks"] == round(arms["A"]["sent"] * 0.05)
    assert reason["probability_best"] > 0.99
    rest = Message.objects.filter(campaign=campaign).exclude(to_email__in=test_group)
    assert rest.count() == 300 - len(test_group)
    assert set(rest.values_list("variant__label", flat=True)) == {"B"}

    delivery.drain(Kind.CAMPAIGN)

    sent = recipients(smtp)
    assert len(sent) == 300
    assert set(sent.values()) == {1}
    assert campaigns.finish_campaigns() == 1
    assert Campaign.objects.get(pk=campaign.pk).status == S.SENT


def test_too_little_data_sends_variant_a_by_rule(smtp, newsletter, everyone):
    campaign = launched(ab_campaign(newsletter, everyone, 40, 50))
    now = campaign.launched_at
    delivery.drain(Kind.CAMPAIGN)
    click_share(campaign, "B", 1.0)

    assert abtest.pick_due_winners(now=now + timedelta(hours=5)) == 1

    campaign.refresh_from_db()
    assert campaign.winner.label == "A"
    assert campaign.winner_reason["fallback"] == "too little data"
    assert campaign.winner_reason["action"] == "variant A by rule"


@pytest.fixture
def tied(settings, smtp, newsletter, everyone):
    """An A/B test with enough data where both variants did exactly as well."""
    mailer_settings(settings, AB_MIN_SAMPLE=5)

    def make(**fields):
        campaign = launched(ab_campaign(newsletter, everyone, 60, 50, **fields))
        now = campaign.launched_at
        delivery.drain(Kind.CAMPAIGN)
        click_share(campaign, "A", 1.0)
        click_share(campaign, "B", 1.0)
        return campaign, now

    return make


def test_a_tie_sends_variant_a_by_rule(tied):
    campaign, now = tied()

    assert abtest.pick_due_winners(now=now + timedelta(hours=5)) == 1

    campaign.refresh_from_db()
    assert campaign.winner.label == "A"
    assert (campaign.winner_reason["fallback"], campaign.winner_reason["action"]) == (
        "tie",
        "variant A by rule",
    )


def test_extend_once_extends_the_window_the_first_time_then_picks_a(tied):
    campaign, now = tied(tie_rule=Campaign.TieRule.EXTEND_ONCE)
    first = now + timedelta(hours=4, minutes=1)

    assert abtest.pick_due_winners(now=first) == 0

    campaign.refresh_from_db()
    assert campaign.winner is None
    assert campaign.test_extended is True
    assert campaign.test_ends_at == first + timedelta(hours=4)
    assert campaign.winner_reason["action"] == "extended once"
    assert "extended once (tie)" in campaign.transitions.last().note
    assert abtest.pick_due_winners(now=first + timedelta(hours=1)) == 0

    assert abtest.pick_due_winners(now=first + timedelta(hours=4, minutes=1)) == 1

    campaign.refresh_from_db()
    assert campaign.winner.label == "A"
    assert campaign.winner_reason["action"] == "variant A by rule"
    assert campaign.status == S.SENDING


def test_a_winner_can_be_chosen_by_hand_before_the_window_ends(newsletter, everyone, admin_user):
    campaign = launched(ab_campaign(newsletter, everyone, 200, 20))
    test_size = Message.objects.filter(campaign=campaign).count()
    b = campaign.variants.get(label="B")

    assert abtest.choose_winner(campaign, b, by=admin_user) == b

    campaign.refresh_from_db()
    assert (campaign.winner, campaign.status) == (b, S.SENDING)
    assert campaign.winner_reason["action"] == "chosen by hand"
    assert campaign.transitions.last().by == admin_user
    assert Message.objects.filter(campaign=campaign).count() == 200
    assert Message.objects.filter(campaign=campaign, variant=b).count() > 200 - test_size
    with pytest.raises(CampaignError, match="only while the A/B test runs"):
        abtest.choose_winner(campaign, campaign.variants.get(label="A"))


def test_a_variant_of_another_campaign_cannot_win(newsletter, everyone):
    campaign = launched(ab_campaign(newsletter, everyone, 50, 20))
    before = Message.objects.count()
    other = make_campaign(newsletter, everyone, name="Other", variants=[("A", "x")])

    with pytest.raises(CampaignError, match="another campaign"):
        abtest.choose_winner(campaign, other.variants.get())

    campaign.refresh_from_db()
    assert (campaign.winner, campaign.status) == (None, S.TESTING)
    assert Message.objects.count() == before


def test_resume_returns_a_paused_ab_test_to_testing(newsletter, everyone):
    campaign = launched(ab_campaign(newsletter, everyone, 50, 20))
    campaigns.pause(campaign)

    campaigns.resume(campaign)

    assert campaign.status == S.TESTING


def test_a_winner_chosen_while_paused_is_sent_after_resume(smtp, newsletter, everyone):
    campaign = launched(ab_campaign(newsletter, everyone, 50, 20))
    delivery.drain(Kind.CAMPAIGN)
    campaigns.pause(campaign)
    abtest.choose_winner(campaign, campaign.variants.get(label="B"))
    assert Campaign.objects.get(pk=campaign.pk).status == S.PAUSED
    assert delivery.drain(Kind.CAMPAIGN) == 0

    campaigns.resume(campaign)

    assert campaign.status == S.SENDING
    delivery.drain(Kind.CAMPAIGN)
    assert len(recipients(smtp)) == 50
    assert campaigns.finish_campaigns() == 1
    assert Campaign.objects.get(pk=campaign.pk).status == S.SENT


# --- Reports ------------------------------------------------------------------------------


@pytest.fixture
def mixed(smtp, newsletter, everyone):
    """Ten recipients: delivered, opened, clicked, bounced, complained, unsubscribed, failed."""
    add_contacts(10)
    smtp.handler.refuse["reader9@example.com"] = "550 5.1.1 No such user"
    campaign = launched(make_campaign(newsletter, everyone))
    delivery.drain(Kind.CAMPAIGN)
    m = {msg.to_email: msg for msg in Message.objects.filter(campaign=campaign)}
    m = [m[f"reader{i}@example.com"] for i in range(10)]
    hour = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    sale = compose.link_id("https://example.com/sale")
    faq = compose.link_id("https://example.com/faq")
    for message in m[:8]:
        event(message, Event.Type.DELIVERED, at=hour)
    event(m[0], Event.Type.DELIVERED, at=hour)  # a repeated webhook
    event(m[0], Event.Type.OPENED, at=hour + timedelta(minutes=5))
    event(m[0], Event.Type.OPENED, at=hour + timedelta(minutes=40))
    event(m[0], Event.Type.CLICKED, at=hour + timedelta(minutes=41), link=sale)
    event(m[0], Event.Type.CLICKED, at=hour + timedelta(minutes=42), link=sale)
    event(m[1], Event.Type.OPENED, at=hour + timedelta(hours=2, minutes=10))
    event(m[1], Event.Type.CLICKED, at=hour + timedelta(hours=2, minutes=11), link=sale)
    event(m[1], Event.Type.CLICKED, at=hour + timedelta(hours=2, minutes=12), link=faq)
    event(m[2], Event.Type.OPENED, at=hour + timedelta(minutes=1), automated=True)
    event(m[3], Event.Type.CLICKED, at=hour + timedelta(minutes=1), automated=True, link=faq)
    event(m[8], Event.Type.BOUNCED, at=hour, bounce=Event.Bounce.HARD)
    Message.objects.filter(pk=m[8].pk).update(status=MessageStatus.BOUNCED)
    event(m[4], Event.Type.COMPLAINED, at=hour + timedelta(hours=1))
    event(m[5], Event.Type.UNSUBSCRIBED, at=hour + timedelta(hours=1))
    return campaign, hour


def unique_messages(campaign: Campaign, kind: str, human_only: bool = False) -> int:
    rows = Event.objects.filter(campaign=campaign, event_type=kind)
    return len({e.message_id for e in rows if not (human_only and e.automated)})


def test_report_figures_equal_counts_from_messages_and_events(mixed):
    campaign, _ = mixed
    by_status = statuses(campaign)

    report = reports.report(campaign)

    assert report["recipients"] == Message.objects.filter(campaign=campaign).count() == 10
    assert report["failed"] == by_status[MessageStatus.FAILED] == 1
    assert report["sent"] == by_status.total() - by_status[MessageStatus.FAILED] == 9
    assert by_status[MessageStatus.CLICKED] == 2  # the events moved the statuses on
    assert report["delivered"] == unique_messages(campaign, Event.Type.DELIVERED) == 8
    assert report["opened"] == unique_messages(campaign, Event.Type.OPENED, True) == 2
    assert report["clicked"] == unique_messages(campaign, Event.Type.CLICKED, True) == 2
    assert report["bounced"] == unique_messages(campaign, Event.Type.BOUNCED) == 1
    assert report["complained"] == unique_messages(campaign, Event.Type.COMPLAINED) == 1
    assert report["unsubscribed"] == 1
    assert report["automated"] == Event.objects.filter(campaign=campaign, automated=True).count()
    assert report["automated"] == 2
    assert (report["pending"], report["progress"]) == (0, 100.0)
    assert report["rates"]["opened"] == round(100 * 2 / 9, 2)
    assert report["rates"]["click_to_open"] == 100.0
    assert report["rates"]["failed"] == 10.0
    assert report["variants"] == []


def test_report_timeline_counts_human_opens_and_clicks_per_bucket_without_gaps(mixed):
    campaign, hour = mixed  # people opened and clicked from +0:05 to +2:12: 5-minute bars

    report = reports.report(campaign)
    timeline = report["timeline"]

    assert report["bucket"].label == "5 minutes"
    assert [p["start"] for p in timeline] == [
        hour + timedelta(minutes=5 * n) for n in range(1, 27)
    ]  # every bucket from the first to the last, empty ones included
    busy = {
        p["start"] - hour: (p["opens"], p["clicks"]) for p in timeline if p["opens"] or p["clicks"]
    }
    assert busy == {
        timedelta(minutes=5): (1, 0),
        timedelta(minutes=40): (1, 2),
        timedelta(hours=2, minutes=10): (1, 2),
    }  # the scanners' open and click at +0:01 are left out


def _clicks_at(campaign: Campaign, *offsets: timedelta) -> None:
    messages = list(Message.objects.filter(campaign=campaign))
    start = campaign.launched_at
    for n, offset in enumerate(offsets):
        event(messages[n % len(messages)], Event.Type.OPENED, at=start + offset)


@pytest.mark.parametrize(
    ("last", "label"),
    [
        (timedelta(minutes=30), "minute"),
        (timedelta(hours=3), "5 minutes"),
        (timedelta(hours=11), "15 minutes"),
        (timedelta(hours=30), "hour"),
        (timedelta(days=5), "3 hours"),
        (timedelta(days=40), "day"),
        (timedelta(days=400), "week"),
    ],
)
def test_report_bucket_fits_the_campaigns_span(smtp, newsletter, everyone, last, label):
    add_contacts(3)
    campaign = launched(make_campaign(newsletter, everyone))
    _clicks_at(campaign, timedelta(minutes=1), last)

    report = reports.report(campaign)

    assert report["bucket"].label == label
    assert 2 <= len(report["timeline"]) <= reports.MAX_BUCKETS + 1 or label == "week"
    assert sum(p["opens"] for p in report["timeline"]) == 2
    assert report["timeline"][0]["start"] <= campaign.launched_at


@pytest.mark.parametrize(("points", "seconds"), [(1, 60), (12, 300), (49, 3600), (120, 604800)])
def test_report_chart_has_axes_and_time_labels_that_fit_without_overlapping(points, seconds):
    start = timezone.now().replace(minute=0, second=0, microsecond=0)
    size = dict(reports.BUCKET_SIZES)[seconds]
    bucket = reports.Bucket(seconds, size, start, start)
    timeline = [
        {"start": start + timedelta(seconds=seconds * n), "opens": n % 7, "clicks": n % 3}
        for n in range(points)
    ]

    drawn = admin_module.chart(timeline, bucket)

    assert len(drawn["bars"]) == 2 * points
    assert [t["value"] for t in drawn["ticks"]][0] == "0"
    assert drawn["bucket"] == size
    xs = [label["x"] for label in drawn["labels"]]
    assert xs, "no time label at all"
    width = (len(drawn["labels"][0]["text"]) * 6 + 12) / 2
    assert all(width <= x <= drawn["width"] - width for x in xs)  # inside the chart
    assert all(b - a >= 2 * width for a, b in zip(xs, xs[1:], strict=False))  # apart
    assert all(
        0 <= bar["y"] and bar["y"] + bar["h"] <= drawn["bottom_y"] + 0.1 for bar in drawn["bars"]
    )


def test_report_says_when_smtp_cannot_report_deliveries(smtp, newsletter, everyone, admin_client):
    add_contacts(3)
    campaign = launched(make_campaign(newsletter, everyone))
    delivery.drain(Kind.CAMPAIGN)

    report = reports.report(campaign)
    page = admin_client.get(reverse("admin:mailer_campaign_change", args=[campaign.pk]))
    csv_rows = list(
        csv.reader(
            io.StringIO(
                b"".join(
                    admin_client.get(
                        reverse("admin:mailer_campaign_report_csv", args=[campaign.pk])
                    ).streaming_content
                ).decode()
            )
        )
    )

    assert report["delivery_reported"] is False
    content = page.content.decode()
    assert 'data-rate="delivered">not reported<' in content
    assert 'data-rate="bounced">not reported<' in content
    assert "Delivery, bounces and complaints are not reported" in content
    assert 'data-figure="delivered" style="text-align:right">—<' in content  # not a 0
    assert ["delivered", "", "not reported"] in csv_rows


def test_report_shows_delivery_rates_once_a_webhook_reports_them(mixed, admin_client, settings):
    campaign, _ = mixed

    page = admin_client.get(reverse("admin:mailer_campaign_change", args=[campaign.pk]))

    assert reports.report(campaign)["delivery_reported"] is True
    content = page.content.decode()
    assert 'data-figure="delivered" style="text-align:right">8<' in content
    assert "not reported" not in content


def test_report_top_links_are_ordered_by_unique_human_clicks(mixed):
    campaign, _ = mixed

    top = reports.report(campaign)["top_links"]

    assert top == [
        {"link__url": "https://example.com/sale", "clicks": 2},
        {"link__url": "https://example.com/faq", "clicks": 1},
    ]


def test_report_csv_is_formula_safe(admin_client, mixed):
    campaign, hour = mixed
    Campaign.objects.filter(pk=campaign.pk).update(name='=HYPERLINK("http://evil","x")')

    response = admin_client.get(reverse("admin:mailer_campaign_report_csv", args=[campaign.pk]))

    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == ["campaign", '\'=HYPERLINK("http://evil","x")']
    figures = {row[0]: row[1:] for row in rows if len(row) == 3}
    assert figures["opened"] == ["2", str(round(100 * 2 / 9, 2))]
    assert figures["failed"] == ["1", "10.0"]
    assert ["bucket", "5 minutes"] in rows
    assert [(hour + timedelta(minutes=40)).isoformat(), "1", "2"] in rows
    assert ["https://example.com/sale", "2"] in rows


def test_report_of_an_ab_test_shows_each_variant(newsletter, everyone, smtp):
    campaign = launched(ab_campaign(newsletter, everyone, 100, 50))
    delivery.drain(Kind.CAMPAIGN)
    click_share(campaign, "B", 0.5)

    variants = {v["label"]: v for v in reports.report(campaign)["variants"]}

    sent_b = Message.objects.filter(campaign=campaign, variant__label="B").count()
    assert variants["B"]["sent"] == sent_b
    assert variants["B"]["clicked"] == round(sent_b * 0.5)
    assert variants["A"]["clicked"] == 0
    assert variants["B"]["subject"] == "Exciting subject!"


# --- Reputation guard ---------------------------------------------------------------------


@pytest.fixture
def running(settings, smtp, newsletter, everyone):
    """A campaign of 30 with 20 sent, and the guard's minimum sample lowered to 10."""
    mailer_settings(settings, REPUTATION={"MIN_SENT": 10})
    add_contacts(30)
    campaign = launched(make_campaign(newsletter, everyone))
    assert send_some(20) == 20
    return campaign


def test_complaints_above_the_threshold_pause_marketing_but_not_transactional_mail(
    running, smtp, caplog, admin_user
):
    sent = Message.objects.filter(campaign=running, status=MessageStatus.SENT)
    event(sent[0], Event.Type.COMPLAINED)

    with caplog.at_level(logging.ERROR, logger="mailer"):
        pause_row = reputation.reputation_guard()

    running.refresh_from_db()
    assert running.status == S.PAUSED
    assert "complaint rate" in running.paused_reason
    assert "(1 of 20)" in running.paused_reason
    assert pause_row is not None
    assert pause_row.active
    assert "complaint rate" in pause_row.reason
    assert pause_row.rates["complaints"] == 1
    assert pause_row.rates["sent"] == 20
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("complaint rate" in r.getMessage() for r in errors)

    assert delivery.drain(Kind.CAMPAIGN) == 0
    assert len(smtp.messages) == 20
    api.send("welcome", to="customer@example.com", context={"user_name": "Cus"})
    assert delivery.drain(Kind.TRANSACTIONAL) == 1
    assert len(smtp.to("customer@example.com")) == 1

    # Beat keeps running: nothing resumes the campaign by itself.
    assert reputation.reputation_guard() == pause_row
    assert campaigns.finish_campaigns() == 0
    assert campaigns.launch_due() == 0
    assert abtest.pick_due_winners(now=timezone.now() + timedelta(days=1)) == 0
    assert Campaign.objects.get(pk=running.pk).status == S.PAUSED
    assert ReputationPause.objects.filter(active=True).count() == 1
    with pytest.raises(CampaignError, match="reputation guard"):
        campaigns.resume(running)
    assert Campaign.objects.get(pk=running.pk).status == S.PAUSED

    reputation.lift_reputation_pause(pause_row, by=admin_user)
    campaigns.resume(running)

    pause_row.refresh_from_db()
    assert (pause_row.active, pause_row.lifted_by) == (False, admin_user)
    assert pause_row.lifted_at is not None
    assert delivery.drain(Kind.CAMPAIGN) == 10
    marketing = recipients(smtp)
    del marketing["customer@example.com"]
    assert len(marketing) == 30
    assert set(marketing.values()) == {1}


def test_hard_bounces_above_the_threshold_pause_the_campaign(running):
    sent = list(Message.objects.filter(campaign=running, status=MessageStatus.SENT)[:2])
    for message in sent:
        event(message, Event.Type.BOUNCED, bounce=Event.Bounce.HARD)

    reputation.reputation_guard()

    running.refresh_from_db()
    assert running.status == S.PAUSED
    assert "bounce rate" in running.paused_reason


def test_below_the_thresholds_nothing_is_paused(running):
    sent = Message.objects.filter(campaign=running, status=MessageStatus.SENT)
    event(sent[0], Event.Type.BOUNCED, bounce=Event.Bounce.HARD)  # 5% is the limit, not over
    event(sent[1], Event.Type.BOUNCED, bounce=Event.Bounce.SOFT)
    event(sent[2], Event.Type.OPENED)

    assert reputation.reputation_guard() is None

    assert Campaign.objects.get(pk=running.pk).status == S.SENDING
    assert not ReputationPause.objects.exists()
    assert delivery.drain(Kind.CAMPAIGN) == 10


def test_too_few_sends_never_trip_the_guard(settings, running):
    mailer_settings(settings, REPUTATION={"MIN_SENT": 200})
    sent = Message.objects.filter(campaign=running, status=MessageStatus.SENT)
    for message in sent[:5]:
        event(message, Event.Type.COMPLAINED)

    assert reputation.reputation_guard() is None

    assert Campaign.objects.get(pk=running.pk).status == S.SENDING


def test_complaints_outside_the_window_do_not_count(running):
    sent = Message.objects.filter(campaign=running, status=MessageStatus.SENT)
    event(sent[0], Event.Type.COMPLAINED, at=timezone.now() - timedelta(hours=30))

    assert reputation.reputation_guard() is None

    assert Campaign.objects.get(pk=running.pk).status == S.SENDING


def test_the_admin_lift_action_lifts_the_pause_but_leaves_campaigns_paused(admin_client, running):
    event(Message.objects.filter(campaign=running, status=MessageStatus.SENT)[0], "complained")
    pause_row = reputation.reputation_guard()

    response = admin_client.post(
        reverse("admin:mailer_reputationpause_changelist"),
        {"action": "lift", "_selected_action": [pause_row.pk]},
    )

    assert response.status_code == 302
    pause_row.refresh_from_db()
    assert not pause_row.active
    assert pause_row.lifted_by.username == "admin"
    assert Campaign.objects.get(pk=running.pk).status == S.PAUSED


# --- Admin --------------------------------------------------------------------------------


def do(admin_client, campaign: Campaign, action: str, *, confirm: bool = True):
    """Press a campaign button; Send now and Cancel also need their page's confirmation."""
    data = {"confirm": "yes"} if confirm else {}
    return admin_client.post(reverse("admin:mailer_campaign_do", args=[campaign.pk, action]), data)


def notes(response) -> dict[str, str]:
    return {str(m): m.level_tag for m in get_messages(response.wsgi_request)}


def test_admin_creates_a_campaign_through_the_add_form(admin_client, newsletter, everyone):
    page = admin_client.get(reverse("admin:mailer_campaign_add"))
    assert page.status_code == 200
    data = {}
    for inline in page.context["inline_admin_formsets"]:
        management = inline.formset.management_form
        for name in management.fields:
            data[f"{management.prefix}-{name}"] = management[name].value()
    data.update(
        {
            "name": "Autumn",
            "template": newsletter.pk,
            "segments": [everyone.pk],
            "from_name": "Shop",
            "from_email": "",
            "reply_to": "",
            "send_at_0": "",
            "send_at_1": "",
            "test_share": "20",
            "winner_metric": "open_rate",
            "test_window": "02:00:00",
            "tie_rule": "variant_a",
            "variants-TOTAL_FORMS": "2",
            "variants-0-label": "A",
            "variants-0-subject": "Autumn is here",
            "variants-1-label": "B",
            "variants-1-subject": "Leaves are falling",
        }
    )

    response = admin_client.post(reverse("admin:mailer_campaign_add"), data)

    assert response.status_code == 302, response.context["errors"]
    campaign = Campaign.objects.get(name="Autumn")
    assert (campaign.status, campaign.template, campaign.test_share) == (S.DRAFT, newsletter, 20)
    assert campaign.test_window == timedelta(hours=2)
    assert list(campaign.segments.all()) == [everyone]
    assert [v.label for v in campaign.variants.all()] == ["A", "B"]


@pytest.mark.parametrize(
    ("subject", "named"),
    [
        ("{{ range(10**9)|list|length }}", "RANGE"),
        ("{{ ''.__class__.__mro__ }}", "not allowed"),
        ("{{ secret_plan }}", "unknown variable"),
        ("{% include '/etc/passwd' %}", "include"),
        ("{{ 'a' * 10**9 }}", "TEMPLATE_LIMITS"),
    ],
)
def test_admin_refuses_a_variant_subject_that_would_not_render(
    admin_client, newsletter, everyone, subject, named
):
    page = admin_client.get(reverse("admin:mailer_campaign_add"))
    data = {}
    for inline in page.context["inline_admin_formsets"]:
        management = inline.formset.management_form
        for name in management.fields:
            data[f"{management.prefix}-{name}"] = management[name].value()
    data.update(
        {
            "name": "Hostile",
            "template": newsletter.pk,
            "segments": [everyone.pk],
            "send_at_0": "",
            "send_at_1": "",
            "test_share": "20",
            "winner_metric": "open_rate",
            "test_window": "02:00:00",
            "tie_rule": "variant_a",
            "variants-TOTAL_FORMS": "2",
            "variants-0-label": "A",
            "variants-0-subject": "Fine {{ contact.name }}",
            "variants-1-label": "B",
            "variants-1-subject": subject,
        }
    )

    response = admin_client.post(reverse("admin:mailer_campaign_add"), data)

    assert response.status_code == 200
    errors = str(response.context["inline_admin_formsets"][0].formset.errors)
    assert named in errors, errors
    assert not Campaign.objects.filter(name="Hostile").exists()


@pytest.fixture
def draft(newsletter, everyone):
    add_contacts(3)
    return make_campaign(newsletter, everyone, name="Winter")


def test_admin_send_test_mails_the_admin_user(admin_client, draft):
    response = do(admin_client, draft, "send_test")

    assert response.status_code == 302
    assert response["Location"] == reverse("admin:mailer_campaign_change", args=[draft.pk])
    assert "1 test email(s) on their way to admin@example.com." in notes(response)
    (message,) = Message.objects.filter(to_email="admin@example.com")
    assert message.campaign_id is None
    assert message.metadata == {"test_of_campaign": draft.pk, "test": True}


def test_admin_send_test_needs_an_email_on_the_admin_account(admin_client, admin_user, draft):
    admin_user.email = ""
    admin_user.save()

    response = do(admin_client, draft, "send_test")

    assert notes(response) == {
        "Your admin account has no email address to send the test to.": "error"
    }
    assert not Message.objects.exists()


def test_admin_send_now_schedules_and_enqueues_the_launch(
    admin_client, draft, broker, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = do(admin_client, draft, "send_now")

    assert "“Winter” is being sent." in notes(response)
    draft.refresh_from_db()
    assert draft.status == S.SCHEDULED
    assert draft.transitions.get().by.username == "admin"
    queued = [json.loads(raw) for raw in broker.lrange("campaign", 0, -1)]
    launches = [m for m in queued if m["headers"]["task"] == "mailer.tasks.launch_campaign"]
    assert [m["headers"]["argsrepr"] for m in launches] == [f"({draft.pk},)"]

    assert campaigns.launch(draft.pk) == 3
    assert Campaign.objects.get(pk=draft.pk).status == S.SENDING


def test_admin_pause_resume_and_cancel(admin_client, draft):
    launched(draft)

    response = do(admin_client, draft, "pause")
    assert "“Winter” paused; workers stop within seconds." in notes(response)
    draft.refresh_from_db()
    assert (draft.status, draft.paused_reason) == (S.PAUSED, "paused by admin")

    response = do(admin_client, draft, "resume")
    assert "“Winter” resumed." in notes(response)
    assert Campaign.objects.get(pk=draft.pk).status == S.SENDING

    response = do(admin_client, draft, "cancel")
    assert "“Winter” cancelled; 3 unsent messages cancelled." in notes(response)
    assert Campaign.objects.get(pk=draft.pk).status == S.CANCELLED
    assert [t.by.username for t in draft.transitions.all()[2:]] == ["admin"] * 3


def test_admin_duplicate_links_to_the_copy(admin_client, draft):
    response = do(admin_client, draft, "duplicate")

    copy = Campaign.objects.get(name="Copy of Winter")
    url = reverse("admin:mailer_campaign_change", args=[copy.pk])
    assert f'Duplicated as <a href="{url}">Copy of Winter</a>.' in notes(response)
    assert copy.status == S.DRAFT


@pytest.mark.parametrize(
    ("action", "error"),
    [
        ("explode", "Unknown action 'explode'."),
        ("resume", "A draft campaign cannot become sending."),
        ("schedule", "Set a send time first (or use Send now)."),
    ],
)
def test_admin_a_bad_action_shows_an_error(admin_client, draft, action, error):
    response = do(admin_client, draft, action)

    assert response.status_code == 302
    assert notes(response) == {error: "error"}
    assert Campaign.objects.get(pk=draft.pk).status == S.DRAFT


@pytest.mark.parametrize("action", ["send_now", "cancel"])
def test_admin_one_click_never_sends_or_cancels_it_asks_first(admin_client, draft, action):
    add_contacts(2, prefix="unconsented", consent=Contact.Consent.UNKNOWN)

    page = do(admin_client, draft, action, confirm=False)

    assert page.status_code == 200
    assert page.templates[0].name == "admin/mailer/campaign/confirm.html"
    content = page.content.decode()
    if action == "send_now":
        assert "3 recipients" in content  # the audience now: consented contacts only
        assert 'value="Yes, send it now to 3 recipients"' in content
    else:
        assert 'value="Yes, cancel it"' in content
    assert 'name="confirm" value="yes"' in content
    assert Campaign.objects.get(pk=draft.pk).status == S.DRAFT
    assert not draft.transitions.exists()

    confirmed = do(admin_client, draft, action)

    assert confirmed.status_code == 302
    expected = S.SCHEDULED if action == "send_now" else S.CANCELLED
    assert Campaign.objects.get(pk=draft.pk).status == expected


def test_admin_send_now_page_says_why_a_campaign_cannot_be_sent(admin_client, newsletter):
    lonely = make_campaign(newsletter, name="Nobody")

    page = do(admin_client, lonely, "send_now", confirm=False)

    content = page.content.decode()
    assert "Not possible: Choose at least one segment to send to." in content
    assert "mailer-confirm-yes" not in content  # nothing to confirm


def test_admin_cancel_page_counts_the_unsent_emails(admin_client, draft, smtp):
    campaign = launched(draft)
    send_some(1)

    page = do(admin_client, campaign, "cancel", confirm=False)

    cells = page.content.decode().split('class="mailer-confirm-count">', 1)[1]
    assert cells.startswith("2<")
    assert Campaign.objects.get(pk=campaign.pk).status == S.SENDING


def test_admin_list_actions_send_now_and_cancel_ask_first(
    admin_client, draft, newsletter, everyone
):
    other = make_campaign(newsletter, everyone, name="Autumn")
    url = reverse("admin:mailer_campaign_changelist")
    chosen = {"action": "send_now_action", "_selected_action": [draft.pk, other.pk], "index": "0"}

    page = admin_client.post(url, chosen)

    assert page.status_code == 200
    content = page.content.decode()
    assert 'value="Yes, send 2 campaigns now to 6 recipients"' in content
    assert set(Campaign.objects.values_list("status", flat=True)) == {S.DRAFT}

    response = admin_client.post(url, {**chosen, "confirm": "yes"})

    assert response.status_code == 302
    assert set(Campaign.objects.values_list("status", flat=True)) == {S.SCHEDULED}


def test_admin_draft_page_shows_its_estimated_audience(admin_client, draft):
    add_contacts(4, prefix="nope", consent=Contact.Consent.WITHDRAWN)
    Suppression.objects.create(email="reader0@example.com")

    page = admin_client.get(reverse("admin:mailer_campaign_change", args=[draft.pk]))

    assert '<span data-audience="2">~2 contacts now</span>' in page.content.decode()


def test_admin_campaign_list_shows_sent_open_and_click_rates(
    admin_client, mixed, newsletter, everyone, django_assert_max_num_queries
):
    campaign, _ = mixed  # 9 sent, 2 people opened, 2 clicked
    draft = make_campaign(newsletter, everyone, name="Draft")

    with django_assert_max_num_queries(12):
        page = admin_client.get(reverse("admin:mailer_campaign_changelist"))

    content = page.content.decode()
    row = content.split(f"/admin/mailer/campaign/{campaign.pk}/change/", 1)[1].split("</tr>")[0]
    assert '<td class="field-sent_count">9</td>' in row
    assert '<td class="field-open_rate">22.2%</td>' in row
    assert '<td class="field-click_rate">22.2%</td>' in row
    draft_row = content.split(f"/admin/mailer/campaign/{draft.pk}/change/", 1)[1]
    assert '<td class="field-open_rate">—</td>' in draft_row.split("</tr>")[0]


def test_admin_a_campaign_that_left_draft_has_no_save_buttons(admin_client, draft, smtp):
    editable = admin_client.get(reverse("admin:mailer_campaign_change", args=[draft.pk]))
    assert 'name="_save"' in editable.content.decode()

    launched(draft)
    delivery.drain(Kind.CAMPAIGN)
    campaigns.finish_campaigns()
    page = admin_client.get(reverse("admin:mailer_campaign_change", args=[draft.pk]))

    content = page.content.decode()
    assert Campaign.objects.get(pk=draft.pk).status == S.SENT
    assert 'name="_save"' not in content
    assert 'name="_continue"' not in content
    assert 'name="_addanother"' not in content


def test_admin_actions_refuse_get(admin_client, draft):
    response = admin_client.get(reverse("admin:mailer_campaign_do", args=[draft.pk, "cancel"]))

    assert response.status_code == 405
    assert Campaign.objects.get(pk=draft.pk).status == S.DRAFT


def test_admin_change_page_draws_the_chart_once_there_are_opens(admin_client, draft):
    campaign = launched(draft)
    url = reverse("admin:mailer_campaign_change", args=[campaign.pk])

    before = admin_client.get(url).content.decode()
    assert "No opens or clicks yet." in before
    assert '<svg class="mailer-chart"' not in before

    event(Message.objects.filter(campaign=campaign).first(), Event.Type.OPENED)
    page = admin_client.get(url)

    assert page.status_code == 200
    content = page.content.decode()
    assert '<svg class="mailer-chart"' in content
    assert 'data-figure="opened" style="text-align:right">1<' in content
    assert "mailer-pause" in content  # the actions that fit a sending campaign
    assert "mailer-resume" not in content


def test_admin_winner_view_picks_a_variant(admin_client, newsletter, everyone):
    campaign = launched(ab_campaign(newsletter, everyone, 40, 50))
    b = campaign.variants.get(label="B")

    response = admin_client.post(reverse("admin:mailer_campaign_winner", args=[campaign.pk, b.pk]))

    assert notes(response) == {"Variant B wins; sending it to the rest.": "info"}
    campaign.refresh_from_db()
    assert (campaign.winner, campaign.status) == (b, S.SENDING)
    assert Message.objects.filter(campaign=campaign).count() == 40
    assert (
        admin_client.get(
            reverse("admin:mailer_campaign_winner", args=[campaign.pk, b.pk])
        ).status_code
        == 405
    )


def test_admin_winner_view_refuses_a_variant_of_another_campaign(
    admin_client, newsletter, everyone
):
    campaign = launched(ab_campaign(newsletter, everyone, 40, 50))
    other = make_campaign(newsletter, everyone, name="Other", variants=[("A", "x")])

    response = admin_client.post(
        reverse("admin:mailer_campaign_winner", args=[campaign.pk, other.variants.get().pk])
    )

    assert notes(response) == {"That variant belongs to another campaign.": "error"}
    assert Campaign.objects.get(pk=campaign.pk).winner is None


def test_send_now_on_a_scheduled_campaign_brings_the_time_forward(
    newsletter, everyone, django_capture_on_commit_callbacks
):
    add_contacts(3)
    campaign = make_campaign(newsletter, everyone)
    campaigns.schedule(campaign, timezone.now() + timedelta(days=3))

    with django_capture_on_commit_callbacks() as callbacks:
        campaigns.send_now(campaign)

    campaign.refresh_from_db()
    assert campaign.status == CampaignStatus.SCHEDULED
    assert campaign.send_at <= timezone.now()
    assert len(callbacks) == 1  # the launch task
    last = campaign.transitions.order_by("-at", "-id").first()
    assert (last.from_status, last.to_status) == ("scheduled", "scheduled")
    assert last.note.startswith("send now")


@pytest.mark.parametrize("label", ["Z", "a", "1", ""])
def test_a_variant_label_outside_a_to_e_is_refused(newsletter, label):
    from django.core.exceptions import ValidationError

    campaign = make_campaign(newsletter)
    with pytest.raises(ValidationError) as caught:
        Variant(campaign=campaign, label=label).full_clean()
    assert "label" in caught.value.message_dict


def test_an_ab_test_window_under_a_minute_is_refused(newsletter):
    from django.core.exceptions import ValidationError

    campaign = make_campaign(newsletter)
    campaign.test_window = timedelta(seconds=0)
    with pytest.raises(ValidationError) as caught:
        campaign.full_clean()
    assert "test_window" in caught.value.message_dict
