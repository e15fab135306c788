"""factory-boy factories for mailer's models and Django users."""

from __future__ import annotations

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from mailer.models import (
    Contact,
    Kind,
    Message,
    MessageStatus,
    Segment,
    SegmentRule,
    Suppression,
    Template,
)

PASSWORD = "correct horse battery staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@example.com")
    first_name = "Ada"
    last_name = "Lovelace"
    password = factory.django.Password(PASSWORD)


class ContactFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Contact

    email = factory.Sequence(lambda n: f"contact{n}@example.com")
    name = "Ada Lovelace"
    language = ""


class TemplateFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Template

    slug = factory.Sequence(lambda n: f"template-{n}")
    language = "en"
    subject = "Hello {{ contact.first_name }}"
    html = (
        "<html><head><style>p { color: #123456; }</style></head>"
        '<body><p>Hi {{ contact.name }}.</p><p><a href="{{ site_url }}/x">Open</a></p>'
        "</body></html>"
    )
    text = ""
    variables = ""


class MessageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Message

    kind = Kind.TRANSACTIONAL
    status = MessageStatus.QUEUED
    to_email = factory.Sequence(lambda n: f"rcpt{n}@example.com")
    template_slug = "welcome"
    language = "en"
    context = factory.LazyFunction(lambda: {"user_name": "Ada", "login_url": "http://x.test/"})
    subject = "Welcome"
    queued_at = factory.LazyFunction(timezone.now)


class SuppressionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Suppression

    email = factory.Sequence(lambda n: f"suppressed{n}@example.com")
    scope = Suppression.Scope.ALL
    reason = Suppression.Reason.HARD_BOUNCE
    source = "tests"


def everyone_segment(name: str = "Everyone") -> Segment:
    """A segment every contact is in (their address contains an @)."""
    segment = Segment.objects.create(name=name)
    SegmentRule.objects.create(
        segment=segment,
        field=SegmentRule.Field.EMAIL,
        operator=SegmentRule.Operator.CONTAINS,
        value="@",
    )
    return segment


def marketing_template(slug: str, subject: str, html: str) -> Template:
    return Template.objects.create(
        slug=slug, purpose=Template.Purpose.MARKETING, subject=subject, html=html
    )
