"""Load the demo: an admin account, a few templates and contacts. Idempotent."""

from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from mailer.models import (
    Campaign,
    Contact,
    DripSeries,
    DripStep,
    Segment,
    SegmentRule,
    Suppression,
    Template,
)

DEMO_USER, DEMO_PASSWORD = "admin", "admin"  # noqa: S105 - demo only; refused without DEBUG

FIRST = ["Ada", "Grace", "Alan", "Katherine", "Linus", "Margaret", "Dennis", "Barbara"]
LAST = ["Lovelace", "Hopper", "Turing", "Johnson", "Torvalds", "Hamilton", "Ritchie", "Liskov"]
LANGS = ["en", "fr", "de", "en", "es"]

NEWSLETTER_HTML = """<html><head><style>
h1 { color: #102a43; font-family: Helvetica, Arial, sans-serif; }
p { font-size: 16px; line-height: 24px; }
</style></head><body>
<h1>Hello {{ contact.first_name or "there" }}!</h1>
<p>Here is what is new at {{ app_name }} this month.</p>
<p><a href="{{ site_url }}/">Read more</a></p>
<p style="font-size:12px;color:#627d98">You receive this as a {{ app_name }} user.
<a href="{{ unsubscribe_url }}">Unsubscribe</a> · <a href="{{ preferences_url }}">Preferences</a>
· {{ postal_address }}</p>
</body></html>"""

WELCOME_DE_HTML = """<html><head><style>h1 { color: #102a43; }</style></head><body>
<h1>Willkommen, {{ user_name }}!</h1>
<p>Danke, dass Sie sich bei {{ app_name }} angemeldet haben.</p>
<p><a href="{{ login_url }}">{{ app_name }} öffnen</a></p>
</body></html>"""


ONBOARDING = [
    # slug, subject, what the email says
    ("onboarding-welcome", "Welcome to {{ app_name }}", "Here is how to find your way around."),
    ("onboarding-getting-started", "Getting started with {{ app_name }}", "Three first steps."),
    ("onboarding-tips", "Tips from the {{ app_name }} team", "What our best users do."),
]
ONBOARDING_HTML = """<html><head><style>h1 {{ color: #102a43; }}</style></head><body>
<h1>Hello {{{{ contact.first_name or "there" }}}}!</h1>
<p>{text}</p>
<p><a href="{{{{ site_url }}}}/">Open {{{{ app_name }}}}</a></p>
<p style="font-size:12px;color:#627d98"><a href="{{{{ unsubscribe_url }}}}">Unsubscribe</a>
· {{{{ postal_address }}}}</p>
</body></html>"""


def onboarding_series() -> DripSeries:
    """Welcome at once, getting started a day later, tips a week after registering: the
    last two only to contacts who have not clicked anything yet."""
    templates = {}
    for slug, subject, text in ONBOARDING:
        templates[slug], _ = Template.objects.update_or_create(
            slug=slug,
            language="en",
            defaults={
                "purpose": Template.Purpose.MARKETING,
                "description": "Onboarding series (demo)",
                "subject": subject,
                "html": ONBOARDING_HTML.format(text=text),
            },
        )
    series, created = DripSeries.objects.get_or_create(
        name="Onboarding (demo)",
        defaults={
            "description": "Started by registration (the user_registered signal).",
            "status": DripSeries.Status.ACTIVE,
            "trigger": DripSeries.Trigger.EVENT,
            "trigger_event": "user_registered",
            "requires_consent": False,
        },
    )
    if created:
        steps = [
            {"kind": "send", "template": templates["onboarding-welcome"]},
            {"kind": "wait", "delay": timedelta(days=1)},
            {"kind": "decide", "condition": "clicked_any", "if_yes": "exit"},
            {"kind": "send", "template": templates["onboarding-getting-started"]},
            {"kind": "wait", "delay": timedelta(days=7), "delay_from": "enrollment"},
            {"kind": "decide", "condition": "clicked_any", "if_yes": "exit"},
            {"kind": "send", "template": templates["onboarding-tips"]},
        ]
        for index, step in enumerate(steps, start=1):
            DripStep.objects.create(series=series, position=index * 10, **step)
    return series


class Command(BaseCommand):
    help = "Create the demo admin, templates and contacts (DEBUG only)."

    def handle(self, *args, **options):
        if not settings.DEBUG:
            raise CommandError("mailer_demo only runs with DEBUG=1: it creates a known password.")
        User = get_user_model()
        admin, _ = User.objects.get_or_create(
            username=DEMO_USER, defaults={"email": "admin@example.com"}
        )
        admin.is_staff = admin.is_superuser = True
        admin.set_password(DEMO_PASSWORD)
        admin.save()

        newsletter, _ = Template.objects.update_or_create(
            slug="newsletter",
            language="en",
            defaults={
                "purpose": Template.Purpose.MARKETING,
                "description": "Monthly newsletter (demo)",
                "subject": "What's new at {{ app_name }}",
                "html": NEWSLETTER_HTML,
            },
        )
        Template.objects.update_or_create(
            slug="welcome",
            language="de",
            defaults={
                "description": "German welcome: a database row overriding the file template",
                "subject": "Willkommen bei {{ app_name }}, {{ user_name }}!",
                "html": WELCOME_DE_HTML,
            },
        )
        for index in range(40):
            first, last = FIRST[index % len(FIRST)], LAST[(index * 3) % len(LAST)]
            Contact.objects.update_or_create(
                email=f"{first}.{last}.{index}@example.com".lower(),
                defaults={
                    "name": f"{first} {last}",
                    "language": LANGS[index % len(LANGS)],
                    "attributes": {"plan": ["free", "pro", "team"][index % 3]},
                    "consent": Contact.Consent.GRANTED if index % 4 else Contact.Consent.UNKNOWN,
                    "consent_source": "demo",
                },
            )
        Suppression.objects.update_or_create(
            email="bounced@example.com",
            scope=Suppression.Scope.ALL,
            defaults={"reason": Suppression.Reason.HARD_BOUNCE, "source": "demo"},
        )
        everyone, _ = Segment.objects.get_or_create(
            name="Consenting contacts", defaults={"description": "Everyone who said yes."}
        )
        if not everyone.rules.exists():
            SegmentRule.objects.create(
                segment=everyone, field="consent", operator="eq", value="granted"
            )
        pro, _ = Segment.objects.get_or_create(name="Pro plan")
        if not pro.rules.exists():
            SegmentRule.objects.create(
                segment=pro, field="attribute", attribute="plan", operator="eq", value="pro"
            )
        onboarding_series()
        campaign, created = Campaign.objects.get_or_create(
            name="Spring newsletter (demo)", defaults={"template": newsletter}
        )
        if created:
            campaign.segments.add(everyone)
        self.stdout.write(
            self.style.SUCCESS(
                f"Demo ready. Admin: http://127.0.0.1:8000/admin/  user: {DEMO_USER}  "
                f"password: {DEMO_PASSWORD}"
            )
        )
