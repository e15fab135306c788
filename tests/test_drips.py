"""Drip series under controlled time: steps on time in each contact's zone (DST too),
decisions, goals and unsubscribes, re-entry, the frequency cap, live edits, triggers with
data, anniversaries, and the tick's guarantees (one message per step, never stuck)."""

from __future__ import annotations

import io
import logging
from datetime import UTC, datetime, time, timedelta

import pytest
from django.db.models import Min
from django.utils import timezone

from mailer import api, drips, localtime
from mailer.exceptions import DripError, InvalidContext
from mailer.models import (
    Contact,
    DripSeries,
    DripStep,
    DripStepRun,
    Enrollment,
    Kind,
    Message,
    MessageStatus,
    ReputationPause,
    Segment,
    SegmentRule,
    Suppression,
    Template,
)
from mailer.signals import user_registered
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

NEWSLETTER = """<html><body><h1>Hello {{ contact.first_name }}</h1>
<p><a href="{{ site_url }}/start">Start</a></p>
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> · {{ postal_address }}</p></body></html>"""


class Clock:
    """``timezone.now()`` everywhere reads this."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    frozen = Clock(datetime(2027, 3, 10, 12, 0, tzinfo=UTC))
    monkeypatch.setattr(timezone, "now", frozen)
    return frozen


@pytest.fixture(autouse=True)
def _postal_address(settings):
    settings.MAILER = {**settings.MAILER, "POSTAL_ADDRESS": "1 Test St"}


def template(slug: str, language: str = "en", subject: str | None = None, **fields) -> Template:
    found = Template.objects.filter(slug=slug, language=language).first()
    if found is not None:
        return found
    return Template.objects.create(
        slug=slug,
        language=language,
        purpose=Template.Purpose.MARKETING,
        subject=subject or slug.replace("-", " ").title(),
        html=NEWSLETTER,
        **fields,
    )


def send(slug: str, **fields) -> dict:
    return {"kind": DripStep.Kind.SEND, "template": template(slug), **fields}


def wait(days: int = 0, hours: int = 0, *, after: str = "previous", **fields) -> dict:
    return {
        "kind": DripStep.Kind.WAIT,
        "delay": timedelta(days=days, hours=hours),
        "delay_from": after,
        **fields,
    }


def series(name: str = "Onboarding", *steps: dict, **fields) -> DripSeries:
    values = {"status": "active", "requires_consent": False, **fields}
    made = DripSeries.objects.create(name=name, **values)
    for index, step in enumerate(steps, start=1):
        DripStep.objects.create(series=made, position=index * 10, **step)
    return made


def contact(email: str, **fields) -> Contact:
    return Contact.objects.create(email=email, consent="granted", **fields)


def run(clock: Clock, until: datetime) -> None:
    """Beat, as often as needed: tick, then jump to the next due time, up to ``until``."""
    for _ in range(200):
        moved = drips.advance_due().advanced
        due = Enrollment.objects.active().aggregate(next=Min("next_due_at"))["next"]
        if due is None or due > until or (not moved and due <= clock.now):
            clock.now = max(clock.now, until)
            return
        clock.now = max(clock.now, due)
    pytest.fail("the series never settled")


def mail(who: Contact) -> list[tuple[str, datetime]]:
    """The drip emails made for a contact: template and when it was handed to the queue."""
    return list(
        Message.objects.filter(contact=who, kind=Kind.DRIP)
        .order_by("pk")
        .values_list("template_slug", "queued_at")
    )


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- Steps on time, in each contact's own time zone -----------------------------------------


WEEKDAYS_9_TO_5 = {"window_days": "12345", "window_start": time(9), "window_end": time(17)}


@pytest.mark.parametrize(
    ("zone", "series_zone", "registered", "expected"),
    [
        # New York moves to summer time on Sunday 14 March 2027, between steps 1 and 2.
        (
            "America/New_York",
            "UTC",
            "2027-03-12T21:30",  # Friday 16:30 EST, in the window
            ["2027-03-12T21:30", "2027-03-15T13:00", "2027-03-19T20:30"],
        ),
        # London leaves summer time on Sunday 31 October 2027.
        (
            "Europe/London",
            "UTC",
            "2027-10-29T15:30",  # Friday 16:30 BST
            ["2027-10-29T15:30", "2027-11-01T09:00", "2027-11-05T16:30"],
        ),
        # No zone of its own: the series' (Tokyo, no DST).
        (
            "",
            "Asia/Tokyo",
            "2027-03-12T07:30",  # Friday 16:30 JST
            ["2027-03-12T07:30", "2027-03-15T00:00", "2027-03-19T07:30"],
        ),
    ],
)
def test_registration_starts_onboarding_on_time_in_the_contacts_zone_across_dst(
    clock, zone, series_zone, registered, expected
):
    """Step 1 at once, step 2 a day later, step 3 a week after registering; each moved to
    the next opening of Monday–Friday 09:00–17:00 in the contact's zone, a day keeping
    its clock time across the DST change (Saturday 16:30 → Monday 09:00; Friday 16:30 a
    week later, in the window again)."""
    onboarding = series(
        "Onboarding",
        send("welcome-drip"),
        wait(days=1),
        send("getting-started"),
        wait(days=7, after="enrollment"),
        send("tips"),
        trigger="event",
        trigger_event="user_registered",
        timezone=series_zone,
        **WEEKDAYS_9_TO_5,
    )
    clock.now = at(registered)
    user = UserFactory(email="ada@example.com")
    Contact.objects.create(email="ada@example.com", timezone=zone)
    user_registered.send(sender=None, user=user, request=None)

    run(clock, clock.now + timedelta(days=30))

    who = Contact.objects.get(email="ada@example.com")
    assert mail(who) == [
        ("welcome-drip", at(expected[0])),
        ("getting-started", at(expected[1])),
        ("tips", at(expected[2])),
    ]
    enrollment = Enrollment.objects.get(series=onboarding, contact=who)
    assert (enrollment.state, enrollment.exit_reason) == ("completed", "end")
    # The welcome email of accounts is transactional and separate from the series.
    assert Message.objects.filter(to_email="ada@example.com", kind=Kind.TRANSACTIONAL).exists()


def test_a_step_due_outside_its_window_waits_in_the_database_not_in_a_celery_eta(clock):
    clock.now = at("2027-03-12T20:00")  # Friday 20:00 UTC
    nightly = series(
        "Weekend",
        send("weekend", window_days="6", window_start=time(10), window_end=time(12)),
    )
    who = contact("bo@example.com", timezone="Europe/Paris")
    enrollment = drips.enroll(nightly, who)
    drips.advance_due()
    enrollment.refresh_from_db()
    # Saturday 10:00 in Paris (UTC+1 in March) is 09:00 UTC; nothing made yet.
    assert enrollment.next_due_at == at("2027-03-13T09:00")
    assert enrollment.note == "Waiting for the send window."
    assert mail(who) == []
    run(clock, at("2027-03-14T00:00"))
    assert mail(who) == [("weekend", at("2027-03-13T09:00"))]


def test_skipped_clock_times_and_whole_days_across_a_dst_change():
    tz = localtime.zone("America/New_York")
    window = localtime.Window(days=frozenset(), start=time(2, 30), end=time(4))
    # 02:30 does not exist on 14 March 2027 in New York: the window opens at 03:30 EDT.
    assert window.next_open(at("2027-03-14T05:00"), tz) == at("2027-03-14T07:30")
    # A day later keeps the clock time: 23 hours over the spring change.
    start = at("2027-03-13T17:00")  # 12:00 EST
    assert localtime.later(start, timedelta(days=1), tz) == at("2027-03-14T16:00")  # 12:00 EDT
    # Hours are elapsed time: 2 h after 01:30 EST is 04:30 EDT.
    assert localtime.later(at("2027-03-14T06:30"), timedelta(hours=2), tz) == at("2027-03-14T08:30")


# --- Decisions -------------------------------------------------------------------------------


def decision_series(condition: str, window: timedelta | None) -> DripSeries:
    made = series("Nurture", send("first"), send("nudge"), send("thanks"))
    thanks = made.steps.get(position=30)
    DripStep.objects.create(
        series=made,
        position=15,
        kind="decide",
        condition=condition,
        condition_window=window,
        if_yes="jump",
        yes_step=thanks,
        if_no="continue",
    )
    # After the nudge, skip "thanks": it is for those who acted.
    DripStep.objects.create(
        series=made,
        position=25,
        kind="decide",
        condition="opened_any",
        if_yes="continue",
        if_no="exit",
    )
    return made


def sent_at(message: Message, moment: datetime) -> None:
    Message.objects.filter(pk=message.pk).update(status=MessageStatus.SENT, sent_at=moment)


def test_opened_within_the_window_takes_the_yes_path_at_once(clock):
    made = decision_series("opened", timedelta(days=2))
    who = contact("op@example.com")
    drips.enroll(made, who)
    drips.advance_due()
    first = Message.objects.get(contact=who)
    sent_at(first, clock.now)
    clock.now += timedelta(hours=5)
    Message.objects.filter(pk=first.pk).update(opened_at=clock.now)
    clock.now += timedelta(minutes=1)
    run(clock, clock.now + timedelta(days=5))
    assert [slug for slug, _ in mail(who)] == ["first", "thanks"]
    assert [slug for slug, when in mail(who)][1] == "thanks"
    assert mail(who)[1][1] < first.queued_at + timedelta(days=2)  # before the window ended


def test_not_opened_waits_out_the_window_then_takes_the_other_path(clock):
    made = decision_series("opened", timedelta(days=2))
    who = contact("no@example.com")
    drips.enroll(made, who)
    drips.advance_due()
    first = Message.objects.get(contact=who)
    sent_at(first, clock.now)
    start = clock.now
    run(clock, start + timedelta(days=1))
    assert [slug for slug, _ in mail(who)] == ["first"]  # still waiting for an open
    run(clock, start + timedelta(days=5))
    # The nudge went when the window ended; then nobody opened anything: the series ends
    # before "thanks".
    assert mail(who) == [("first", start), ("nudge", start + timedelta(days=2))]
    enrollment = Enrollment.objects.get(contact=who)
    assert (enrollment.state, enrollment.exit_reason) == ("exited", "decided")
    outcomes = dict(
        DripStepRun.objects.filter(enrollment=enrollment).values_list("step__position", "outcome")
    )
    assert outcomes == {10: "sent", 15: "no", 20: "sent", 25: "no"}


def test_segment_decision(clock):
    pro = Segment.objects.create(name="Pro")
    SegmentRule.objects.create(
        segment=pro, field="attribute", attribute="plan", operator="eq", value="pro"
    )
    made = series("Upsell", send("intro"), send("upgrade"), send("welcome-pro"))
    DripStep.objects.create(
        series=made,
        position=15,
        kind="decide",
        condition="segment",
        condition_segment=pro,
        if_yes="jump",
        yes_step=made.steps.get(position=30),
        if_no="continue",
    )
    free, paid = contact("free@example.com"), contact("pro@example.com", attributes={"plan": "pro"})
    for who in (free, paid):
        drips.enroll(made, who)
    run(clock, clock.now + timedelta(days=1))
    assert [slug for slug, _ in mail(free)] == ["intro", "upgrade", "welcome-pro"]
    assert [slug for slug, _ in mail(paid)] == ["intro", "welcome-pro"]


# --- Ways out ----------------------------------------------------------------------------------


def three_days() -> DripSeries:
    return series("Three days", send("d1"), wait(days=1), send("d2"), wait(days=1), send("d3"))


def test_unsubscribing_leaves_every_series_at_once_and_cancels_waiting_mail(clock, client):
    first, second = three_days(), series("Other", wait(days=2), send("o1"))
    who = contact("unsub@example.com")
    for made in (first, second):
        drips.enroll(made, who)
    drips.advance_due()
    assert [slug for slug, _ in mail(who)] == ["d1"]
    from mailer import unsubscribe

    unsubscribe.unsubscribe(unsubscribe.Target(who.email, None), source="link")
    states = set(Enrollment.objects.filter(contact=who).values_list("state", "exit_reason"))
    assert states == {("exited", "unsubscribed")}
    assert Message.objects.get(contact=who).status == MessageStatus.CANCELLED
    run(clock, clock.now + timedelta(days=5))
    assert [slug for slug, _ in mail(who)] == ["d1"]


def test_a_suppression_made_in_sql_is_caught_by_the_tick(clock):
    made = three_days()
    who = contact("bounce@example.com")
    drips.enroll(made, who)
    drips.advance_due()
    Suppression.objects.bulk_create([Suppression(email=who.email, reason="hard_bounce")])
    run(clock, clock.now + timedelta(days=5))
    assert [slug for slug, _ in mail(who)] == ["d1"]
    assert Enrollment.objects.get(contact=who).exit_reason == "suppressed"


def test_goal_segment_and_goal_event_exit(clock):
    buyers = Segment.objects.create(name="Buyers")
    SegmentRule.objects.create(segment=buyers, field="tag", operator="eq", value="buyer")
    made = series(
        "Cart", send("c1"), wait(days=1), send("c2"), goal_segment=buyers, goal_event="purchased"
    )
    by_segment, by_event, neither = (contact(f"{n}@example.com") for n in ("seg", "evt", "none"))
    for who in (by_segment, by_event, neither):
        drips.enroll(made, who)
    drips.advance_due()
    from mailer.models import Tag

    by_segment.tags.add(Tag.objects.create(name="buyer"))
    api.trigger("purchased", contact=by_event)
    run(clock, clock.now + timedelta(days=3))
    reasons = dict(Enrollment.objects.values_list("contact__email", "exit_reason"))
    assert reasons == {
        "seg@example.com": "goal_segment",
        "evt@example.com": "goal_event",
        "none@example.com": "end",
    }
    assert [slug for slug, _ in mail(by_segment)] == ["c1"]
    assert [slug for slug, _ in mail(by_event)] == ["c1"]
    assert [slug for slug, _ in mail(neither)] == ["c1", "c2"]


def test_a_marketer_removes_a_contact(clock):
    made = series("Slow", wait(hours=1), send("s1"))
    who = contact("rm@example.com")
    enrollment = drips.enroll(made, who)
    drips.remove(Enrollment.objects.filter(pk=enrollment.pk))
    run(clock, clock.now + timedelta(days=1))
    assert mail(who) == []
    assert Enrollment.objects.get(pk=enrollment.pk).exit_reason == "removed"


def test_consent_is_required_unless_the_series_says_otherwise(clock):
    strict = series("Strict", send("x"), requires_consent=True)
    lenient = series("Lenient", send("y"))
    unknown = Contact.objects.create(email="unknown@example.com")
    withdrawn = Contact.objects.create(email="w@example.com", consent="withdrawn")
    assert drips.enroll(strict, unknown) is None
    assert drips.enroll(lenient, unknown) is not None
    assert drips.enroll(lenient, withdrawn) is None


# --- Re-entry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "cooldown", "expected"),
    [
        ("once", None, [True, False, False, False]),
        ("cooldown", timedelta(days=7), [True, False, False, True]),
        ("always", None, [True, False, True, True]),
    ],
)
def test_reentry_policies(clock, policy, cooldown, expected):
    """Tries at: the start, while still in the series, just after it ended, 8 days on."""
    made = series(
        "Again", send("a1"), wait(days=1), send("a2"), reentry=policy, reentry_cooldown=cooldown
    )
    who = contact("again@example.com")
    answers = [drips.enroll(made, who) is not None]
    answers.append(drips.enroll(made, who) is not None)
    run(clock, clock.now + timedelta(days=1, hours=1))
    answers.append(drips.enroll(made, who) is not None)
    Enrollment.objects.filter(contact=who, state="active").update(
        state="exited", exit_reason="removed", exited_at=clock.now
    )
    clock.now += timedelta(days=8)
    answers.append(drips.enroll(made, who) is not None)
    assert answers == expected
    assert Enrollment.objects.filter(contact=who, state="active").count() <= 1


def test_one_active_enrollment_per_series_is_a_database_constraint(clock):
    from django.db import IntegrityError, transaction

    made = series("Unique", send("u"), reentry="always")
    who = contact("u@example.com")
    Enrollment.objects.create(series=made, contact=who)
    with pytest.raises(IntegrityError), transaction.atomic():
        Enrollment.objects.create(series=made, contact=who)


# --- Triggers, data, the API ------------------------------------------------------------------


def test_trigger_enrolls_every_listening_series_and_data_reaches_the_template(clock):
    cart = Template.objects.create(
        slug="cart",
        purpose="marketing",
        subject="You left {{ item }} behind",
        html=NEWSLETTER.replace("<h1>", "<h1>{{ item }} · <a href='{{ cart_url }}'>cart</a>"),
        variables="item cart_url",
    )
    made = series(
        "Abandoned cart",
        {"kind": "send", "template": cart},
        trigger="event",
        trigger_event="cart_abandoned",
    )
    other = series("Also cart", send("cart-2"), trigger="event", trigger_event="cart_abandoned")
    series("Not cart", send("nope"), trigger="event", trigger_event="something_else")
    entered = api.trigger(
        "cart_abandoned",
        contact="shopper@example.com",
        data={"item": "red shoes", "cart_url": "https://shop.test/cart/9"},
    )
    assert {e.series for e in entered} == {made, other}
    drips.advance_due()
    message = Message.objects.get(drip_step__series=made)
    assert message.context == {"item": "red shoes", "cart_url": "https://shop.test/cart/9"}
    from mailer import compose, rendering

    email = compose.build_email(message, rendering.compiled(rendering.find_template("cart", "en")))
    assert email.subject == "You left red shoes behind"
    assert "https://shop.test/cart/9" in email.html or "/t/c/" in email.html
    assert "List-Unsubscribe" in email.extra_headers


def test_trigger_refuses_bad_input_and_stores_nothing(clock):
    series("Cart", send("c"), trigger="event", trigger_event="cart_abandoned")
    with pytest.raises(DripError):
        api.trigger("cart abandoned!", contact="a@example.com")
    with pytest.raises(InvalidContext):
        api.trigger("cart_abandoned", contact="a@example.com", data={"x": float("nan")})
    with pytest.raises(DripError):
        api.enroll("No such series", "a@example.com")
    draft = series("Draft", send("d"), status="draft")
    with pytest.raises(DripError):
        api.enroll(draft, "a@example.com")
    assert not Enrollment.objects.exists()


def test_the_same_key_enrolls_once(clock):
    made = series("Keyed", send("k"), trigger="event", trigger_event="order", reentry="always")
    first = api.trigger("order", contact="k@example.com", key="order-1")
    Enrollment.objects.update(state="completed", exit_reason="end", exited_at=clock.now)
    again = api.trigger("order", contact="k@example.com", key="order-1")
    other = api.trigger("order", contact="k@example.com", key="order-2")
    assert (len(first), len(again), len(other)) == (1, 0, 1)
    assert Enrollment.objects.filter(series=made).count() == 2


def test_anniversary_enrolls_once_a_year(clock):
    made = series(
        "Birthday",
        send("happy-birthday"),
        trigger="anniversary",
        anniversary_attribute="birthday",
        timezone="Europe/Paris",
    )
    today = contact("today@example.com", attributes={"birthday": "1990-03-10"})
    contact("other@example.com", attributes={"birthday": "1990-07-01"})
    leap = contact("leap@example.com", attributes={"birthday": "2000-02-29"})
    clock.now = at("2027-03-10T08:00")
    assert drips.enter_anniversaries() == 1
    assert drips.enter_anniversaries() == 0  # beat runs it every minute
    run(clock, clock.now + timedelta(hours=1))
    clock.now = at("2027-03-11T08:00")  # "yesterday" is still looked at: nothing new
    assert drips.enter_anniversaries() == 0
    clock.now = at("2028-03-10T08:00")
    assert drips.enter_anniversaries() == 1
    run(clock, clock.now + timedelta(hours=1))
    assert len(mail(today)) == 2
    assert list(
        Enrollment.objects.filter(series=made).values_list("key", flat=True).order_by("key")
    ) == [
        "anniversary:2027",
        "anniversary:2028",
    ]
    clock.now = at("2027-02-28T12:00")  # not a leap year: 29 February is the 28th
    assert drips.enter_anniversaries() == 1
    assert Enrollment.objects.filter(contact=leap).count() == 1


def test_segment_entries_in_sql(clock, django_assert_max_num_queries):
    fans = Segment.objects.create(name="Fans")
    SegmentRule.objects.create(segment=fans, field="tag", operator="eq", value="fan")
    made = series("Fans", send("f1"), trigger="segment", entry_segment=fans, requires_consent=True)
    from mailer.models import Tag

    tag = Tag.objects.create(name="fan")
    members = [contact(f"fan{i}@example.com") for i in range(30)]
    for member in members:
        member.tags.add(tag)
    Contact.objects.create(email="fan-no-consent@example.com").tags.add(tag)
    contact("not-a-fan@example.com")
    with django_assert_max_num_queries(12):
        assert drips.enter_segments() == 30
    assert drips.enter_segments() == 0  # once ever (the default policy)
    assert set(Enrollment.objects.values_list("series", flat=True)) == {made.pk}


# --- Live edits and pauses --------------------------------------------------------------------


def test_a_step_added_to_a_live_series_reaches_contacts_who_had_not_passed_it(clock):
    made = series("Live", send("l1"), wait(days=1), send("l2"), wait(days=1), send("l3"))
    early, late = contact("early@example.com"), contact("late@example.com")
    drips.enroll(made, early)
    run(clock, clock.now + timedelta(days=1, hours=1))  # early has had l1 and l2
    drips.enroll(made, late)
    drips.advance_due()  # late has had l1
    # A new email between l1's wait and l2, and a removed step (l3).
    DripStep.objects.create(series=made, position=25, kind="send", template=template("added"))
    DripStep.objects.filter(series=made, position=50).delete()
    run(clock, clock.now + timedelta(days=5))
    assert [slug for slug, _ in mail(early)] == ["l1", "l2"]
    assert [slug for slug, _ in mail(late)] == ["l1", "added", "l2"]


def test_a_paused_series_holds_everyone_in_place(clock):
    made = series("Pausable", send("p1"), wait(days=1), send("p2"))
    who = contact("hold@example.com")
    drips.enroll(made, who)
    drips.advance_due()
    drips.set_status(made, "paused")
    run(clock, clock.now + timedelta(days=3))
    assert [slug for slug, _ in mail(who)] == ["p1"]
    drips.set_status(made, "active")
    drips.advance_due()
    assert [slug for slug, _ in mail(who)] == ["p1", "p2"]


def test_the_reputation_guard_holds_drips(clock):
    made = series("Guarded", send("g1"))
    who = contact("guard@example.com")
    drips.enroll(made, who)
    pause = ReputationPause.objects.create(reason="bounces")
    drips.advance_due()
    assert mail(who) == []
    assert drips.check_stuck(clock.now + timedelta(hours=1)) == 0  # held on purpose
    ReputationPause.objects.filter(pk=pause.pk).update(active=False)
    drips.advance_due()
    assert [slug for slug, _ in mail(who)] == ["g1"]


# --- Failures and stuck enrollments -----------------------------------------------------------


def test_a_step_whose_template_fails_fails_that_email_only(clock, smtp):
    """A template that saved (it renders with sample values) but cannot render with one
    contact's data fails that contact's email, with the reason; the rest go out."""
    greedy = Template.objects.create(
        slug="greedy",
        purpose="marketing",
        subject="Hi",
        html=NEWSLETTER.replace("<h1>", "<h1>{{ 'x' * size }}"),
        variables="size",
    )
    made = series("Fragile", {"kind": "send", "template": greedy}, send("after"))
    ok, bad = contact("fine@example.com"), contact("huge@example.com")
    drips.enroll(made, ok, data={"size": 3})
    drips.enroll(made, bad, data={"size": 10**9})
    drips.advance_due()
    from mailer import delivery

    delivery.drain(Kind.CAMPAIGN)
    failed = Message.objects.get(contact=bad, template_slug="greedy")
    assert failed.status == MessageStatus.FAILED
    assert "OUTPUT_CHARS" in failed.last_error or "MEMORY_CHARS" in failed.last_error
    assert Message.objects.get(contact=bad, template_slug="after").status == MessageStatus.SENT
    assert sorted(r for m in smtp.messages for r in m.rcpt_tos) == [
        "fine@example.com",
        "fine@example.com",
        "huge@example.com",
    ]
    funnel = {row["step"].position: row for row in drips.funnel(made)}
    assert (funnel[10]["sent"], funnel[10]["failed"]) == (1, 1)


def test_overdue_enrollments_are_reported_and_requeued(clock, caplog, monkeypatch):
    made = series("Stuck", send("s"))
    who = contact("stuck@example.com")
    drips.enroll(made, who)
    queued = []
    monkeypatch.setattr(drips.dispatch, "enqueue", lambda name, **kw: queued.append(name) or True)
    clock.now += timedelta(minutes=5)
    assert drips.check_stuck() == 0
    clock.now += timedelta(minutes=10)
    with caplog.at_level(logging.ERROR, logger="mailer.drips"):
        assert drips.check_stuck() == 1
    assert "1 drip enrollments are overdue" in caplog.text
    assert queued == [drips.TICK_TASK]
    drips.advance_due()
    assert drips.check_stuck() == 0


def test_ticking_again_never_makes_a_second_message_for_a_step(clock):
    made = series("Once", send("o"))
    who = contact("once@example.com")
    enrollment = drips.enroll(made, who)
    drips.advance_due()
    # As if the tick's enrollment update were lost (a restart between statements): the
    # step runs again, and the unique (enrollment, step) constraint keeps one message.
    Enrollment.objects.filter(pk=enrollment.pk).update(
        state="active", next_position=0, next_due_at=clock.now, exit_reason=""
    )
    drips.advance_due()
    assert Message.objects.filter(enrollment=enrollment).count() == 1


# --- Frequency cap ------------------------------------------------------------------------------


def test_frequency_cap_delays_and_never_drops(clock, settings):
    settings.MAILER = {**settings.MAILER, "FREQUENCY_CAP": {"day": 1, "week": 3}}
    clock.now = at("2027-03-08T10:00")  # a Monday
    made = series("Daily", send("n1"), send("n2"), send("n3"), send("n4"), send("n5"))
    who = contact("cap@example.com", timezone="Europe/Paris")
    # A campaign email today counts too; transactional mail never does.
    Message.objects.create(
        kind=Kind.CAMPAIGN,
        to_email=who.email,
        contact=who,
        status="sent",
        template_slug="news",
        queued_at=clock.now,
        sent_at=clock.now,
    )
    Message.objects.create(
        kind=Kind.TRANSACTIONAL,
        to_email=who.email,
        contact=who,
        status="sent",
        template_slug="welcome",
        queued_at=clock.now,
    )
    drips.enroll(made, who)
    drips.advance_due()
    enrollment = Enrollment.objects.get(contact=who)
    assert enrollment.note == "Waiting: frequency cap of 1 a day reached."
    run(clock, at("2027-03-22T00:00"))
    days = [
        (slug, when.astimezone(localtime.zone("Europe/Paris")).date().isoformat())
        for slug, when in mail(who)
    ]
    # One a day (Paris days), three a week with the campaign's: Tue, Wed, then next week.
    assert days == [
        ("n1", "2027-03-09"),
        ("n2", "2027-03-10"),
        ("n3", "2027-03-15"),
        ("n4", "2027-03-16"),
        ("n5", "2027-03-17"),
    ]


def test_frequency_cap_settings_are_checked(settings):
    from mailer import conf
    from mailer.exceptions import MailerConfigurationError

    settings.MAILER = {**settings.MAILER, "FREQUENCY_CAP": {"month": 3}}
    with pytest.raises(MailerConfigurationError, match="unknown window"):
        conf.frequency_cap()
    settings.MAILER = {**settings.MAILER, "FREQUENCY_CAP": {"day": 0}}
    with pytest.raises(MailerConfigurationError, match="at least 1"):
        conf.frequency_cap()


def test_drip_and_cap_settings_that_cannot_work_fail_the_checks(settings):
    from mailer import checks

    def e001() -> list[str]:
        return [e.msg for e in checks.check_settings() if e.id == "mailer.E001"]

    assert e001() == []
    settings.MAILER = {**settings.MAILER, "FREQUENCY_CAP": {"day": -1}}
    assert len(e001()) == 1 and "FREQUENCY_CAP" in e001()[0]
    settings.MAILER = {**settings.MAILER, "FREQUENCY_CAP": {}, "DRIPS": {"BATCH_SIZE": 0}}
    assert len(e001()) == 1 and "BATCH_SIZE" in e001()[0]
    settings.MAILER = {**settings.MAILER, "DRIPS": {"TICKS": 5}}
    assert "unknown key 'TICKS'" in e001()[0]


# --- Two ticks at once, and a tick killed mid-way (real PostgreSQL) ------------------------------

KILLED_TICK = """
import os, sys, time
import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django.setup()
from mailer import drips, outbox

real = outbox.update_enrollments


def stall(rows, now):
    real(rows, now)  # messages and runs are written, the transaction is still open
    with open(sys.argv[1], "w") as marker:
        marker.write(str(len(rows)))
    time.sleep(120)


outbox.update_enrollments = stall
drips.advance_due(batch_size=int(sys.argv[2]))
"""


def many(made: DripSeries, count: int, prefix: str) -> list[Contact]:
    people = Contact.objects.bulk_create(
        [Contact(email=f"{prefix}{i}@example.com", consent="granted") for i in range(count)]
    )
    Enrollment.objects.bulk_create(
        [Enrollment(series=made, contact=who, next_due_at=timezone.now()) for who in people]
    )
    return people


def one_message_per_step(made: DripSeries, people: int) -> None:
    steps = made.steps.filter(kind="send").count()
    pairs = Message.objects.filter(enrollment__series=made).values_list("enrollment", "drip_step")
    assert len(pairs) == len(set(pairs)) == people * steps


@pytest.mark.integration
def test_two_ticks_at_once_take_each_enrollment_once(transactional_db, test_database_url):
    import threading

    from django.db import connection

    made = series("Concurrent", send("c1"), send("c2"))
    many(made, 1000, "pair")
    start, results = threading.Barrier(2), []

    def tick():
        try:
            start.wait()
            results.append(drips.advance_due(batch_size=100))
        finally:
            connection.close()

    threads = [threading.Thread(target=tick) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(r.advanced for r in results) == 1000  # nobody advanced twice
    assert all(r.advanced > 0 for r in results)  # both really worked
    one_message_per_step(made, 1000)
    assert DripStepRun.objects.count() == 2000


@pytest.mark.integration
def test_a_tick_killed_mid_way_leaves_nothing_half_done(
    transactional_db, worker_env, smtp, tmp_path
):
    import os
    import signal
    import subprocess
    import sys

    from mailer import delivery
    from tests.conftest import REPO, tally, wait_for

    made = series("Killed", send("k1"), send("k2"))
    people = many(made, 300, "killed")
    marker = tmp_path / "stalled"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_TICK, str(marker), "200"],
        cwd=REPO,
        env=worker_env,
        start_new_session=True,
    )
    try:
        wait_for(marker.exists, timeout=60, message="the tick never reached its last write")
        assert marker.read_text() == "200"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    # Its transaction died with it: the 200 enrollments it held are due again.
    wait_for(
        lambda: drips.advance_due().advanced == 0 and not Enrollment.objects.active().exists(),
        timeout=30,
        message="enrollments left behind by the killed tick",
    )
    one_message_per_step(made, 300)
    while delivery.drain(Kind.CAMPAIGN):
        pass
    received = tally(smtp, {who.email for who in people})
    assert (received.lost, received.unexpected, received.received) == (0, 0, 600)
    assert received.duplicated == 300  # two steps each: every address got exactly two


# --- The demo's onboarding series ------------------------------------------------------------


@pytest.mark.parametrize("clicked", [False, True])
def test_the_demo_onboarding_series(clock, settings, clicked):
    """Welcome at once, getting started a day later, tips a week after registering; the
    last two only to contacts who have not clicked anything yet."""
    from django.core.management import call_command

    settings.DEBUG = True
    call_command("mailer_demo", stdout=io.StringIO())
    call_command("mailer_demo", stdout=io.StringIO())  # idempotent
    assert DripSeries.objects.filter(name="Onboarding (demo)").count() == 1
    start = clock.now
    user = UserFactory(email="newbie@example.com")
    user_registered.send(sender=None, user=user, request=None)
    drips.advance_due()
    who = Contact.objects.get(email="newbie@example.com")
    if clicked:
        Message.objects.filter(contact=who, kind=Kind.DRIP).update(
            status="clicked", sent_at=start, clicked_at=start + timedelta(hours=2)
        )
    run(clock, start + timedelta(days=10))
    expected = [("onboarding-welcome", start)]
    if not clicked:
        expected += [
            ("onboarding-getting-started", start + timedelta(days=1)),
            ("onboarding-tips", start + timedelta(days=7)),
        ]
    assert mail(who) == expected
