"""A marketer's path through the admin in a real browser (Debian's headless Chromium driven
by Playwright), with a real campaign worker and SMTP server behind the live server."""

from __future__ import annotations

import os
import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connections
from django.db.models import F
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

from mailer.models import (
    Campaign,
    CampaignStatus,
    Contact,
    Event,
    Message,
    MessageStatus,
    Segment,
    SegmentRule,
    Template,
)

from .conftest import wait_for

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Headless Chromium says "HeadlessChrome", which mailer rightly counts as a scanner; the
# people reading the campaign use an ordinary desktop browser.
READER_USER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)
POSTAL_ADDRESS = "1 Test St"
MARKETER_EMAIL = "marketer@example.com"
PASSWORD = "correct horse battery staple"
CONTACTS = 20
OPENERS, CLICKERS = 5, 3


@pytest.fixture
def browser(monkeypatch):
    """Debian's Chromium under Playwright; the test fails (never skips) without it."""
    # Playwright's sync API leaves its event loop registered as running in this thread, so
    # Django would refuse the ORM calls the test makes between browser steps. They are
    # plain synchronous calls, never made from a coroutine.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium package (`make test` does, "
            "through tests/services.sh). Never `playwright install`.",
            pytrace=False,
        )
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except PlaywrightError as exc:
        playwright.stop()
        pytest.fail(f"Chromium ({CHROMIUM}) could not start: {exc}", pytrace=False)
    yield chromium
    # With that loop registered, Django gave the test's ORM calls connections of their own
    # (it keeps them per async context); close them, or they keep the test database open
    # and it cannot be dropped at the end of the session.
    connections.close_all()
    chromium.close()
    playwright.stop()


@pytest.fixture
def site(live_server, smtp, settings):
    """The live server, with this process able to send marketing and emails linking to it."""
    settings.MAILER = {
        **settings.MAILER,
        "POSTAL_ADDRESS": POSTAL_ADDRESS,
        "SITE_URL": live_server.url,
    }
    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = False  # plain http here
    return live_server


@pytest.fixture
def audience(transactional_db) -> tuple[Template, Segment]:
    Contact.objects.bulk_create(
        Contact(email=f"reader{i:02d}@example.com", consent=Contact.Consent.GRANTED)
        for i in range(CONTACTS)
    )
    segment = Segment.objects.create(name="Newsletter readers")
    SegmentRule.objects.create(
        segment=segment,
        field=SegmentRule.Field.EMAIL,
        operator=SegmentRule.Operator.CONTAINS,
        value="@",
    )
    template = Template.objects.create(
        slug="spring-news",
        purpose=Template.Purpose.MARKETING,
        subject="Spring news",
        html=(
            "<html><body><h1>Spring news</h1>"
            '<p><a href="{{ site_url }}/spring">Read the story</a></p>'
            '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> · {{ postal_address }}</p>'
            "</body></html>"
        ),
    )
    return template, segment


@pytest.mark.django_db(transaction=True)
def test_marketer_creates_tests_sends_a_campaign_and_reads_its_report_in_the_admin(
    site, smtp, broker, audience, start_worker, browser, settings, tmp_path
):
    template, segment = audience
    get_user_model().objects.create_superuser("marketer", MARKETER_EMAIL, PASSWORD)
    worker = start_worker(
        "campaign-browser",
        "campaign",
        MAILER_POSTAL_ADDRESS=POSTAL_ADDRESS,
        SITE_URL=site.url,  # tracking links in the emails point at the live server
        SECRET_KEY=settings.SECRET_KEY,  # which signs those links
    )
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(15_000)

        page.goto(f"{site.url}/admin/")
        page.fill("#id_username", "marketer")
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        expect(page.locator("#site-name")).to_be_visible()

        # The add form: a template from the select, a segment through filter_horizontal.
        page.goto(f"{site.url}/admin/mailer/campaign/add/")
        page.fill("#id_name", "Spring news")
        page.select_option("#id_template", value=str(template.pk))
        page.select_option("#id_segments_from", value=str(segment.pk))
        page.click("#id_segments_add")
        expect(page.locator("#id_segments_to option")).to_have_text([segment.name])
        page.click("input[name=_continue]")
        expect(page).to_have_url(re.compile(r"/admin/mailer/campaign/\d+/change/$"))
        campaign = Campaign.objects.get(name="Spring news")
        assert campaign.status == CampaignStatus.DRAFT
        assert campaign.template == template
        assert list(campaign.segments.all()) == [segment]

        page.click("button[data-action=send_test]")
        expect(page.locator("ul.messagelist")).to_contain_text(f"on their way to {MARKETER_EMAIL}")
        test_email = wait_for(
            lambda: smtp.to(MARKETER_EMAIL),
            message=f"the test email did not arrive:\n{worker.log()}",
        )[0].parsed()
        assert test_email["Subject"] == "[TEST] Spring news"
        assert POSTAL_ADDRESS in test_email.get_body(("html",)).get_content()

        page.click("button[data-action=send_now]")
        expect(page.locator("ul.messagelist")).to_contain_text("is being sent")
        wait_for(
            lambda: (
                Message.objects.filter(campaign=campaign, status=MessageStatus.SENT).count()
                == CONTACTS
            ),
            timeout=30,
            message=f"the campaign was not sent:\n{worker.log()}",
        )
        readers = [m for m in smtp.messages if MARKETER_EMAIL not in m.rcpt_tos]
        assert len(readers) == CONTACTS

        # People read it an hour later (sooner would look like a link scanner): a few open
        # it in their browser, which loads the pixel, and some click through.
        Message.objects.filter(campaign=campaign).update(sent_at=F("sent_at") - timedelta(hours=1))
        reader = browser.new_context(user_agent=READER_USER_AGENT)
        inbox = reader.new_page()
        inbox.set_default_timeout(15_000)
        for n, received in enumerate(readers[:OPENERS]):
            inbox.set_content(received.parsed().get_body(("html",)).get_content())
            if n < CLICKERS:
                inbox.click("a[href*='/mailer/t/c/']")
                inbox.wait_for_url(f"{site.url}/spring")
        reader.close()
        human = Event.objects.filter(campaign=campaign, automated=False)
        wait_for(
            lambda: (
                human.filter(event_type=Event.Type.OPENED).count() == OPENERS
                and human.filter(event_type=Event.Type.CLICKED).count() == CLICKERS
            ),
            message=f"opens/clicks not recorded: {list(human.values('event_type'))}",
        )
        assert not Event.objects.filter(campaign=campaign, automated=True).exists()

        page.reload()
        figures = {
            name: page.locator(f"[data-figure={name}]").inner_text()
            for name in ("recipients", "sent", "opened", "clicked", "failed")
        }
        assert figures == {
            "recipients": str(CONTACTS),
            "sent": str(CONTACTS),
            "opened": str(OPENERS),
            "clicked": str(CLICKERS),
            "failed": "0",
        }
        chart = page.locator("svg.mailer-chart")
        expect(chart).to_be_visible()
        bars = chart.locator("rect")
        assert bars.count() >= 2  # opens and clicks of this hour
        heights = [float(bars.nth(i).get_attribute("height")) for i in range(bars.count())]
        assert all(h > 0 for h in heights), heights
        expect(page.locator("button[data-action=pause]")).to_be_visible()
        expect(page.locator("button[data-action=send_now]")).to_have_count(0)
        page.screenshot(path=tmp_path / "campaign-report.png", full_page=True)
        print(f"screenshot: {tmp_path / 'campaign-report.png'}")
    finally:
        worker.stop()
