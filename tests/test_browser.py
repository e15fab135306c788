"""A marketer's path through the admin in a real browser (Debian's headless Chromium driven
by Playwright), with a real campaign worker and SMTP server behind the live server."""

from __future__ import annotations

import os
import random
import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import connections
from django.db.models import F
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

from mailer import compose, outbox
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
    Variant,
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
WIDTH = 1400  # the marketer's screen: nothing may overflow or clip at this width
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
        page = browser.new_page(viewport={"width": WIDTH, "height": 900})
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

        page.click("button[data-action=send_now]")  # asks first, showing the audience
        expect(page.locator(".mailer-confirm-count")).to_have_text(f"{CONTACTS} recipients")
        assert Campaign.objects.get(pk=campaign.pk).status == CampaignStatus.DRAFT
        page.click("input.mailer-confirm-yes")
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
        for kind in ("opens", "clicks"):
            bars = chart.locator(f"rect.mailer-bar-{kind}")
            heights = [float(bars.nth(i).get_attribute("height")) for i in range(bars.count())]
            assert any(h > 0 for h in heights), (kind, heights)
        expect(chart.locator(".mailer-legend")).to_contain_text("Opens")
        expect(chart.locator(".mailer-legend")).to_contain_text("Clicks")
        # Sent when the worker handled the last email: no beat runs in this test.
        expect(page.locator(".mailer-report > p > strong").first).to_have_text("Sent")
        expect(page.locator("button[data-action=pause]")).to_have_count(0)
        expect(page.locator("button[data-action=send_now]")).to_have_count(0)
        page.screenshot(path=tmp_path / "campaign-report.png", full_page=True)
        print(f"screenshot: {tmp_path / 'campaign-report.png'}")
    finally:
        worker.stop()


# --- Every page a marketer uses, at 1400 px -------------------------------------------------

#: Lists what overflows the viewport, or what an element cuts off or scrolls sideways:
#: its tag, id and classes, and by how much. Hidden, fixed and 1-pixel (screen-reader)
#: elements are skipped, as are form controls, whose own scrolling is expected.
OVERFLOW_JS = """
() => {
  const width = document.documentElement.clientWidth;
  const name = (el) => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
    (typeof el.className === 'string' && el.className.trim()
      ? '.' + el.className.trim().split(/\\s+/).join('.') : '');
  const controls = ['SELECT', 'TEXTAREA', 'INPUT', 'OPTION'];
  const clippedAbove = (el) => {
    for (let up = el.parentElement; up && up !== document.body; up = up.parentElement) {
      if (getComputedStyle(up).overflowX !== 'visible') return true;
    }
    return false;
  };
  const problems = [];
  const root = document.scrollingElement;
  if (root.scrollWidth > width + 1) {
    problems.push(`the page scrolls sideways: ${root.scrollWidth}px wide in ${width}px`);
  }
  for (const el of document.body.querySelectorAll('*')) {
    const style = getComputedStyle(el);
    if (style.display === 'none' || style.visibility === 'hidden' || style.position === 'fixed') {
      continue;
    }
    const box = el.getBoundingClientRect();
    if (box.width <= 1 || box.height <= 1 || controls.includes(el.tagName)) continue;
    if (box.right > width + 1 && !clippedAbove(el)) {
      problems.push(`${name(el)} reaches ${Math.round(box.right)}px of ${width}px`);
    }
    const iconOnly = parseFloat(style.textIndent) < 0;  // text moved out for an icon
    if (style.overflowX !== 'visible' && el.scrollWidth > el.clientWidth + 1 && !iconOnly) {
      problems.push(
        `${name(el)} cuts or scrolls its content: ${el.scrollWidth}px in ${el.clientWidth}px`);
    }
  }
  return problems;
}
"""


def fits(page, what: str, shots: Path | None = None) -> None:
    """Nothing on the page overflows or clips at the marketer's width."""
    page.wait_for_load_state("networkidle")
    assert page.viewport_size["width"] == WIDTH
    problems = page.evaluate(OVERFLOW_JS)
    if shots is not None:
        screenshot(page, shots / f"{what}.png")
    assert problems == [], f"{what}: {problems}"


def screenshot(page, path: Path) -> None:
    """The whole page, previews included: a window as tall as the page (Chromium leaves
    sandboxed frames outside the window blank in a full-page screenshot)."""
    size = page.viewport_size
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": size["width"], "height": height})
    page.screenshot(path=path)
    page.set_viewport_size(size)


def log_in(page, site, username: str = "marketer") -> None:
    page.goto(f"{site.url}/admin/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("#site-name")).to_be_visible()


@pytest.fixture
def marketer(transactional_db):
    return get_user_model().objects.create_superuser("marketer", MARKETER_EMAIL, PASSWORD)


def _preview_width(page) -> float:
    frame = page.locator("iframe.mailer-preview-frame")
    expect(frame).to_be_visible()
    return frame.bounding_box()["width"]


@pytest.mark.django_db(transaction=True)
def test_each_admin_page_of_a_campaign_fits_and_asks_before_anything_irreversible(
    site, smtp, broker, audience, start_worker, browser, marketer, settings, tmp_path
):
    template, segment = audience
    campaign = Campaign.objects.create(
        name="Autumn offers",
        template=template,
        from_name="Shop Team",
        from_email="team@shop.test",
        reply_to="help@shop.test",
        test_share=50,
    )
    campaign.segments.add(segment)
    Variant.objects.create(campaign=campaign, label="A", subject="Autumn is here")
    Variant.objects.create(campaign=campaign, label="B", subject="Autumn deals", from_name="Ana")
    worker = start_worker(
        "campaign-pages",
        "campaign",
        MAILER_POSTAL_ADDRESS=POSTAL_ADDRESS,
        SITE_URL=site.url,
        SECRET_KEY=settings.SECRET_KEY,
    )
    shots = tmp_path
    try:
        page = browser.new_page(viewport={"width": WIDTH, "height": 900})
        page.set_default_timeout(15_000)
        log_in(page, site)
        fits(page, "index", shots)
        groups = page.locator("#content-main .mailer-group caption").all_inner_texts()
        assert groups[:4] == ["CAMPAIGNS", "AUDIENCE", "CONTENT", "OUTBOX"], groups

        change = f"{site.url}/admin/mailer/campaign/{campaign.pk}/change/"
        page.goto(change)
        fits(page, "campaign-draft", shots)
        expect(page.locator("[data-audience]")).to_have_text(f"~{CONTACTS} contacts now")

        # Send a test: the campaign's sender, Reply-To and each variant, as recipients get.
        page.click("button[data-action=send_test]")
        expect(page.locator("ul.messagelist")).to_contain_text(f"on their way to {MARKETER_EMAIL}")
        tests = wait_for(
            lambda: len(smtp.to(MARKETER_EMAIL)) == 2 and smtp.to(MARKETER_EMAIL),
            message=f"the test emails did not arrive:\n{worker.log()}",
        )
        seen = sorted(
            (
                e["Subject"],
                e["From"].addresses[0].display_name,
                e["From"].addresses[0].addr_spec,
                e["Reply-To"],
            )
            for e in (m.parsed() for m in tests)
        )
        assert seen == [
            ("[TEST] Autumn deals", "Ana", "team@shop.test", "help@shop.test"),
            ("[TEST] Autumn is here", "Shop Team", "team@shop.test", "help@shop.test"),
        ]

        # Send now asks first, with the audience; going back changes nothing.
        page.click("button[data-action=send_now]")
        fits(page, "campaign-confirm", shots)
        expect(page.locator(".mailer-confirm-count")).to_have_text(f"{CONTACTS} recipients")
        expect(page.locator("input.mailer-confirm-yes")).to_have_value(
            f"Yes, send it now to {CONTACTS} recipients"
        )
        page.click("a.mailer-confirm-no")
        expect(page).to_have_url(change)
        assert Campaign.objects.get(pk=campaign.pk).status == CampaignStatus.DRAFT
        assert not Message.objects.filter(campaign=campaign).exists()

        page.click("button[data-action=send_now]")
        page.click("input.mailer-confirm-yes")
        expect(page.locator("ul.messagelist")).to_contain_text("is being sent")
        # The test share goes out; the campaign then waits for the winner: its status
        # follows the last email of the share within seconds, with no beat running.
        wait_for(
            lambda: Campaign.objects.get(pk=campaign.pk).status == CampaignStatus.WAITING,
            timeout=30,
            message=f"the test share did not finish:\n{worker.log()}",
        )
        page.reload()
        fits(page, "campaign-waiting", shots)
        expect(page.locator(".mailer-report > p > strong").first).to_have_text("Waiting for winner")
        expect(page.locator("input[name=_save]")).to_have_count(0)  # nothing to save now

        page.goto(f"{site.url}/admin/mailer/campaign/")
        fits(page, "campaign-list", shots)
        row = page.locator("#result_list tbody tr", has_text="Autumn offers")
        sent = Message.objects.filter(campaign=campaign).count()
        expect(row.locator("td.field-sent_count")).to_have_text(str(sent))
        expect(row.locator("td.field-open_rate")).to_have_text("0.0%")

        # Cancel from the list asks first too.
        row.locator("input.action-select").check()
        page.select_option("select[name=action]", "cancel_action")
        page.click("button[name=index]")
        fits(page, "campaign-cancel-confirm", shots)
        # The test share has gone; the rest of the audience is queued only for the winner.
        expect(page.locator(".mailer-confirm-count")).to_have_text("0")
        assert Campaign.objects.get(pk=campaign.pk).status == CampaignStatus.WAITING
        page.click("input.mailer-confirm-yes")
        expect(page.locator("ul.messagelist")).to_contain_text("cancelled")
        assert Campaign.objects.get(pk=campaign.pk).status == CampaignStatus.CANCELLED

        message = Message.objects.filter(campaign=campaign).exclude(status="cancelled").first()
        page.goto(f"{site.url}/admin/mailer/message/{message.pk}/change/")
        fits(page, "message", shots)
        assert _preview_width(page) >= 600
        expect(page.locator("input[name=_save]")).to_have_count(0)
        expect(page.locator("input[name=_continue]")).to_have_count(0)
    finally:
        print(f"screenshots: {shots}")
        worker.stop()


@pytest.mark.django_db(transaction=True)
def test_segment_import_and_template_pages_fit_and_refuse_what_they_must(
    site, audience, browser, marketer, tmp_path
):
    template, segment = audience
    wide = Segment.objects.create(name="Everyone who ever bought anything from the spring sale")
    wide.include_segments.add(segment)
    Contact.objects.filter(email="reader00@example.com").update(name="Ada")
    shots = tmp_path
    page = browser.new_page(viewport={"width": WIDTH, "height": 900})
    page.set_default_timeout(15_000)
    try:
        log_in(page, site)

        # A segment that would include itself through another is refused on save.
        page.goto(f"{site.url}/admin/mailer/segment/{segment.pk}/change/")
        fits(page, "segment", shots)
        expect(page.locator("#id_include_segments_from option")).to_have_text([wide.name])
        page.select_option("#id_include_segments_from", value=str(wide.pk))
        page.click("#id_include_segments_add")
        page.click("input[name=_continue]")
        expect(page.locator(".errornote")).to_be_visible()
        expect(page.locator(".errorlist")).to_contain_text(
            f"{segment.name} → {wide.name} → {segment.name}"
        )
        fits(page, "segment-refused", shots)
        assert not segment.include_segments.exists()

        # Contact import: a dry run shows which row does what, and imports nothing.
        page.goto(f"{site.url}/admin/mailer/contact/import/")
        fits(page, "import", shots)
        csv_file = tmp_path / "people.csv"
        csv_file.write_text(
            "email,name,plan\n"
            "reader00@example.com,Ada Lovelace,pro\n"
            "new.person.with.a.rather.long.address@example.com,Newcomer,free\n"
            "READER00@example.com,Ada King,team\n"
            "broken-address,Nobody,free\n"
        )
        page.set_input_files("input[type=file]", str(csv_file))
        page.click("input.mailer-dry-run-button")
        expect(page.locator(".mailer-import-report h2")).to_contain_text("Dry run")
        fits(page, "import-dry-run", shots)
        expect(page.locator("tr[data-line='4'] .mailer-import-overwrite").first).to_contain_text(
            "“Ada Lovelace” → “Ada King” — overwrites row 2"
        )
        expect(page.locator("tr[data-line='3']")).to_contain_text("Created")
        expect(page.locator(".mailer-import-rejected")).to_contain_text("Row 5:")
        assert Contact.objects.get(email="reader00@example.com").name == "Ada"
        assert not Contact.objects.filter(email__startswith="new.person").exists()
        page.set_input_files("input[type=file]", str(csv_file))
        page.click("input[name=_import]")
        expect(page.locator(".mailer-import-report h2")).to_have_text("What the import did")
        assert Contact.objects.get(email="reader00@example.com").name == "Ada King"

        # The template's preview is at an email's width.
        page.goto(f"{site.url}/admin/mailer/template/{template.pk}/change/")
        fits(page, "template", shots)
        assert _preview_width(page) >= 600
    finally:
        print(f"screenshots: {shots}")


# --- The report of a finished 5,000-recipient campaign (docs/report-5000.png) ---------------

BIG = 5_000
REPORT_SHOT = Path(__file__).resolve().parent.parent / "docs" / "report-5000.png"
LINKS = (
    "https://shop.example.com/autumn",
    "https://shop.example.com/boots",
    "https://blog.example.com/",
)


def _engage(campaign: Campaign, rng: random.Random) -> tuple[int, int]:
    """People open and click over the day and a half after the send, most in the first
    hours; a few link scanners too. Stored as tracking stores them (events, and the first
    open and click on each message, through ``outbox.apply_event``)."""
    start = campaign.launched_at
    links = [compose.link_id(url) for url in LINKS]
    events, opened, clicked = [], 0, 0
    for message in Message.objects.filter(campaign=campaign).only("pk", "to_email"):
        if rng.random() < 0.02:  # a scanner opens and clicks at once: left out of the rates
            at = start + timedelta(seconds=rng.uniform(2, 8))
            for kind in (Event.Type.OPENED, Event.Type.CLICKED):
                events.append(
                    Event(
                        message=message,
                        campaign=campaign,
                        recipient=message.to_email,
                        event_type=kind,
                        timestamp=at,
                        automated=True,
                        automated_reason="scanner",
                        link_id=links[0],
                    )
                )
        if rng.random() >= 0.41:
            continue
        opened += 1
        at = start + timedelta(hours=min(rng.expovariate(1 / 5), 35.5))
        events.append(
            Event(
                message=message,
                campaign=campaign,
                recipient=message.to_email,
                event_type=Event.Type.OPENED,
                timestamp=at,
            )
        )
        outbox.apply_event(message.pk, Event.Type.OPENED, at)
        if rng.random() < 0.27:
            clicked += 1
            at += timedelta(minutes=rng.uniform(0.2, 20))
            events.append(
                Event(
                    message=message,
                    campaign=campaign,
                    recipient=message.to_email,
                    event_type=Event.Type.CLICKED,
                    timestamp=at,
                    link_id=links[min(int(rng.expovariate(1.2)), len(links) - 1)],
                )
            )
            outbox.apply_event(message.pk, Event.Type.CLICKED, at)
    Event.objects.bulk_create(events, batch_size=2_000)
    return opened, clicked


@pytest.mark.django_db(transaction=True)
def test_the_report_of_a_finished_5000_recipient_campaign_reads_well_at_1400px(
    site, smtp, broker, start_worker, browser, marketer, settings, tmp_path
):
    """Sends 5,000 emails through a real worker, then shows the report. With
    MAILER_WRITE_SCREENSHOTS=1 its screenshot is written to docs/report-5000.png."""
    Contact.objects.bulk_create(
        (
            Contact(email=f"customer{i:04d}@example.com", consent=Contact.Consent.GRANTED)
            for i in range(BIG)
        ),
        batch_size=1_000,
    )
    segment = Segment.objects.create(name="All customers")
    SegmentRule.objects.create(
        segment=segment,
        field=SegmentRule.Field.CONSENT,
        operator=SegmentRule.Operator.EQUALS,
        value="granted",
    )
    template = Template.objects.create(
        slug="autumn-sale",
        purpose=Template.Purpose.MARKETING,
        subject="Autumn sale: 30 % off boots",
        html=(
            "<html><body><h1>Autumn sale</h1>"
            + "".join(f'<p><a href="{url}">{url}</a></p>' for url in LINKS)
            + '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> · {{ postal_address }}</p>'
            "</body></html>"
        ),
    )
    campaign = Campaign.objects.create(
        name="Autumn sale 2026", template=template, from_name="Shop", from_email="news@shop.test"
    )
    campaign.segments.add(segment)
    worker = start_worker(
        "campaign-5000", "campaign", MAILER_POSTAL_ADDRESS=POSTAL_ADDRESS, SITE_URL=site.url
    )
    try:
        page = browser.new_page(viewport={"width": WIDTH, "height": 900})
        page.set_default_timeout(15_000)
        log_in(page, site)
        page.goto(f"{site.url}/admin/mailer/campaign/{campaign.pk}/change/")
        page.click("button[data-action=send_now]")
        expect(page.locator(".mailer-confirm-count")).to_have_text(f"{BIG:,} recipients")
        page.click("input.mailer-confirm-yes")
        wait_for(
            lambda: Campaign.objects.get(pk=campaign.pk).status == CampaignStatus.SENT,
            timeout=120,
            interval=0.5,
            message=f"the campaign was not sent: {len(smtp.messages)} arrived\n{worker.log()}",
        )
        assert len({r for m in smtp.messages for r in m.rcpt_tos}) == BIG
        # Read two days later: the send happened then, the opens and clicks since.
        earlier = timedelta(days=2)
        Campaign.objects.filter(pk=campaign.pk).update(
            launched_at=F("launched_at") - earlier, finished_at=F("finished_at") - earlier
        )
        Message.objects.filter(campaign=campaign).update(sent_at=F("sent_at") - earlier)
        campaign.refresh_from_db()
        opened, clicked = _engage(campaign, random.Random(BIG))

        page.reload()
        fits(page, "report-5000-page", tmp_path)
        figures = {
            name: page.locator(f"[data-figure={name}]").inner_text()
            for name in ("recipients", "sent", "opened", "clicked", "delivered")
        }
        assert figures == {
            "recipients": str(BIG),
            "sent": str(BIG),
            "opened": str(opened),
            "clicked": str(clicked),
            "delivered": "—",  # SMTP reports no deliveries: said, not shown as 0 %
        }
        expect(page.locator("[data-rate=delivered]")).to_have_text("not reported")
        chart = page.locator("svg.mailer-chart")
        expect(chart.locator(".mailer-x-title")).to_contain_text("per hour")
        assert chart.locator(".mailer-x-axis text").count() >= 4  # time labels and title
        assert chart.locator(".mailer-y-axis text").count() == 6  # five ticks and title
        assert 30 <= chart.locator("rect.mailer-bar-opens").count() <= 49
        expect(page.locator(".mailer-links")).to_contain_text(LINKS[0])
        report = page.locator("fieldset", has=page.locator(".mailer-report"))
        report.screenshot(path=tmp_path / "report-5000.png")
        if os.environ.get("MAILER_WRITE_SCREENSHOTS") == "1":
            REPORT_SHOT.parent.mkdir(exist_ok=True)
            report.screenshot(path=REPORT_SHOT)
        print(f"screenshot: {tmp_path / 'report-5000.png'}")
    finally:
        worker.stop()
