"""The rows mailer keeps: contacts, templates, the message outbox, events, suppressions."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from .exceptions import HeaderInjection


class Kind(models.TextChoices):
    TRANSACTIONAL = "transactional", "Transactional"
    CAMPAIGN = "campaign", "Campaign"
    DRIP = "drip", "Drip"

    @classmethod
    def marketing(cls) -> tuple[Kind, ...]:
        """Mail a person can unsubscribe from; it carries unsubscribe links and headers."""
        return (cls.CAMPAIGN, cls.DRIP)


class Queue(models.TextChoices):
    """The two Celery queues; each carries its own kinds of mail under its own limits."""

    TRANSACTIONAL = "transactional", "Transactional"
    CAMPAIGN = "campaign", "Campaign"

    @classmethod
    def for_kind(cls, kind: str) -> Queue:
        return cls.TRANSACTIONAL if kind == Kind.TRANSACTIONAL else cls.CAMPAIGN

    @property
    def kinds(self) -> tuple[str, ...]:
        if self is Queue.TRANSACTIONAL:
            return (Kind.TRANSACTIONAL,)
        return Kind.marketing()


# What no stored text may hold: NUL (PostgreSQL refuses it: a DataError inside the
# caller's transaction), the other C0 and C1 controls but tab and line breaks, DEL, and
# lone surrogates (not UTF-8). A header holds not even those, nor U+2028 and U+2029.
_UNSAFE_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_UNSAFE_HEADER = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def unsafe_character(value: str, *, header: bool = False) -> str | None:
    """The first character of ``value`` that text (or a header) must not hold, as U+XXXX."""
    found = (_UNSAFE_HEADER if header else _UNSAFE_TEXT).search(value)
    return f"U+{ord(found.group()):04X}" if found else None


def header_safe(value: str, name: str = "This value") -> None:
    """Validator of every field that reaches a header: a line break there would let the
    value write headers of its own (Bcc:), and any control character breaks the email."""
    if isinstance(value, str) and (char := unsafe_character(value, header=True)):
        raise HeaderInjection(
            f"{name} contains a line break or control character ({char}); "
            "a header must be one line of text."
        )


def check_header_fields(instance: models.Model, fields=None) -> None:
    """Run ``header_safe`` on the instance's header fields (those of ``fields`` only, when
    given): a save through the ORM is held to what the admin's forms check."""
    for field in instance._meta.concrete_fields:
        if header_safe in field.validators and (fields is None or field.name in fields):
            header_safe(getattr(instance, field.attname), field.name)


def valid_timezone(value: str) -> None:
    """An IANA time zone name (``zoneinfo``), or empty."""
    if not value:
        return
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(
            f"{value!r} is not a time zone name such as Europe/Paris or America/New_York."
        ) from None


class Tag(models.Model):
    """A label on contacts, for segments."""

    name = models.SlugField(max_length=100, unique=True)

    class Meta:
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name


class Contact(models.Model):
    """One person we may email; registration creates or links one."""

    class Consent(models.TextChoices):
        UNKNOWN = "unknown", "Unknown"
        GRANTED = "granted", "Granted"
        WITHDRAWN = "withdrawn", "Withdrawn"

    email = models.EmailField(max_length=254, unique=True, help_text="Stored lower-case.")
    name = models.CharField(max_length=200, blank=True, validators=[header_safe])
    language = models.CharField(max_length=10, blank=True)
    timezone = models.CharField(
        max_length=64,
        blank=True,
        validators=[valid_timezone],
        help_text="IANA name, e.g. Europe/Paris; drips and local-time campaigns use it.",
    )
    attributes = models.JSONField(default=dict, blank=True)
    tags = models.ManyToManyField(Tag, blank=True, related_name="contacts")
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="mailer_contact",
    )
    verified_at = models.DateTimeField(null=True, blank=True)
    consent = models.CharField(max_length=10, choices=Consent.choices, default=Consent.UNKNOWN)
    consent_at = models.DateTimeField(null=True, blank=True)
    consent_source = models.CharField(
        max_length=200, blank=True, help_text="How consent was given: form, import, admin…"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("email",)

    def __str__(self) -> str:
        return self.email

    def save(self, *args, **kwargs):
        self.email = normalize_email(self.email)
        super().save(*args, **kwargs)

    @property
    def first_name(self) -> str:
        return self.name.split()[0] if self.name.strip() else ""


def normalize_email(address: str) -> str:
    """The form we store and compare addresses in: trimmed and lower-case."""
    return (address or "").strip().lower()


class Template(models.Model):
    """A Jinja2 email edited in the admin; overrides a file template of the same slug."""

    class Purpose(models.TextChoices):
        TRANSACTIONAL = "transactional", "Transactional"
        MARKETING = "marketing", "Marketing"

    slug = models.SlugField(max_length=100)
    language = models.CharField(max_length=10, default="en")
    purpose = models.CharField(
        max_length=20, choices=Purpose.choices, default=Purpose.TRANSACTIONAL
    )
    description = models.CharField(max_length=200, blank=True)
    subject = models.CharField(max_length=500, validators=[header_safe])
    html = models.TextField("HTML")
    text = models.TextField(blank=True, help_text="Leave empty to generate it from the HTML.")
    variables = models.CharField(
        max_length=500,
        blank=True,
        help_text="Extra context variables this template uses, separated by spaces or commas.",
    )
    version = models.PositiveIntegerField(default=1, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=("slug", "language"), name="mailer_template_slug_lang")
        ]
        ordering = ("slug", "language")

    def __str__(self) -> str:
        return f"{self.slug} ({self.language})"

    def save(self, *args, **kwargs):
        # Validated by a pre_save receiver (mailer.receivers): a broken template never
        # reaches the outbox, whoever saves it.
        if self.pk:
            self.version += 1
        super().save(*args, **kwargs)

    @property
    def declared_variables(self) -> set[str]:
        return {v for v in self.variables.replace(",", " ").split() if v}


class Segment(models.Model):
    """A saved rule set over contacts, evaluated as one SQL query (mailer.segments)."""

    class Match(models.TextChoices):
        ALL = "all", "All rules match"
        ANY = "any", "Any rule matches"

    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    match = models.CharField(max_length=3, choices=Match.choices, default=Match.ALL)
    include_segments = models.ManyToManyField(
        "self",
        symmetrical=False,
        blank=True,
        related_name="+",
        help_text="Contacts must also be in all of these segments.",
    )
    exclude_segments = models.ManyToManyField(
        "self",
        symmetrical=False,
        blank=True,
        related_name="+",
        help_text="Contacts in any of these segments are left out.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name


class SegmentRule(models.Model):
    """One condition of a segment: field, operator, value — no code needed."""

    class Field(models.TextChoices):
        EMAIL = "email", "Email"
        NAME = "name", "Name"
        LANGUAGE = "language", "Language"
        TIMEZONE = "timezone", "Time zone"
        CONSENT = "consent", "Marketing consent"
        VERIFIED = "verified", "Email verified"
        SIGNUP = "signup", "Signup date"
        TAG = "tag", "Tag"
        ATTRIBUTE = "attribute", "Attribute"
        OPENED_WITHIN = "opened_within", "Opened a campaign in the last N days"
        CLICKED_WITHIN = "clicked_within", "Clicked a campaign in the last N days"
        NEVER_OPENED = "never_opened", "Never opened a campaign"

    class Operator(models.TextChoices):
        EQUALS = "eq", "is"
        NOT_EQUALS = "ne", "is not"
        CONTAINS = "contains", "contains"
        NOT_CONTAINS = "not_contains", "does not contain"
        STARTS_WITH = "startswith", "starts with"
        ENDS_WITH = "endswith", "ends with"
        IN = "in", "is one of (comma-separated)"
        NOT_IN = "not_in", "is none of (comma-separated)"
        IS_SET = "set", "is set"
        IS_NOT_SET = "not_set", "is not set"
        GREATER = "gt", "greater than"
        LESS = "lt", "less than"
        BEFORE = "before", "before (date)"
        AFTER = "after", "after (date)"
        WITHIN_DAYS = "within_days", "within the last N days"
        OLDER_THAN_DAYS = "older_than_days", "more than N days ago"
        TRUE = "true", "is true"
        FALSE = "false", "is false"

    segment = models.ForeignKey(Segment, on_delete=models.CASCADE, related_name="rules")
    field = models.CharField(max_length=20, choices=Field.choices)
    attribute = models.CharField(
        max_length=100, blank=True, help_text="Attribute key, for the Attribute field."
    )
    operator = models.CharField(max_length=20, choices=Operator.choices)
    value = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ("id",)

    def __str__(self) -> str:
        subject = (
            f"attribute {self.attribute}" if self.field == self.Field.ATTRIBUTE else self.field
        )
        return f"{subject} {self.get_operator_display()} {self.value}".strip()


class CampaignStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    SCHEDULED = "scheduled", "Scheduled"
    TESTING = "testing", "A/B testing"
    WAITING = "waiting", "Waiting for winner"
    SENDING = "sending", "Sending"
    SENT = "sent", "Sent"
    PAUSED = "paused", "Paused"
    CANCELLED = "cancelled", "Cancelled"

    @classmethod
    def running(cls) -> tuple[CampaignStatus, ...]:
        """A campaign in these statuses may send; workers check it before every email."""
        return (cls.SENDING, cls.TESTING)


class CampaignQuerySet(models.QuerySet):
    def due(self, now: datetime | None = None) -> CampaignQuerySet:
        """Scheduled and due; a local-time send may be due up to 26 hours before its send
        time (the first zone on Earth reaches its clock time; ``campaigns.launch_time``)."""
        now = now or timezone.now()
        return self.filter(status=CampaignStatus.SCHEDULED).filter(
            Q(send_at__lte=now) | Q(send_in_local_time=True, send_at__lte=now + timedelta(hours=26))
        )

    def running(self) -> CampaignQuerySet:
        return self.filter(status__in=CampaignStatus.running())

    def test_window_over(self, now: datetime | None = None) -> CampaignQuerySet:
        return self.filter(
            status__in=(CampaignStatus.TESTING, CampaignStatus.WAITING),
            test_ends_at__lte=now or timezone.now(),
        )


class Campaign(models.Model):
    """What to send, to which segments, when; optionally as an A/B test."""

    Status = CampaignStatus

    class Metric(models.TextChoices):
        UNIQUE_CLICK_RATE = "click_rate", "Unique click rate"
        UNIQUE_OPEN_RATE = "open_rate", "Unique open rate"
        CLICK_TO_OPEN = "click_to_open", "Click-to-open rate"

    class TieRule(models.TextChoices):
        VARIANT_A = "variant_a", "Send variant A"
        EXTEND_ONCE = "extend_once", "Extend the test window once, then variant A"

    name = models.CharField(max_length=200)
    template = models.ForeignKey(
        Template,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="campaigns",
        limit_choices_to={"purpose": "marketing"},
    )
    segments = models.ManyToManyField(Segment, blank=True, related_name="campaigns")
    exclude_segments = models.ManyToManyField(Segment, blank=True, related_name="+")
    from_name = models.CharField(max_length=200, blank=True, validators=[header_safe])
    from_email = models.EmailField(blank=True, validators=[header_safe])
    reply_to = models.EmailField(blank=True, validators=[header_safe])
    send_at = models.DateTimeField(
        null=True, blank=True, help_text="When to send; empty means when you press Send now."
    )
    send_in_local_time = models.BooleanField(
        default=False,
        help_text="Send at the send time's clock time in each contact's own time zone "
        "(contacts without one: the site's). The send spreads over the time zones.",
    )
    status = models.CharField(
        max_length=20, choices=CampaignStatus.choices, default=CampaignStatus.DRAFT, db_index=True
    )
    test_share = models.PositiveSmallIntegerField(
        default=0, help_text="Percent of recipients in the A/B test (0: no test)."
    )
    winner_metric = models.CharField(
        max_length=20, choices=Metric.choices, default=Metric.UNIQUE_CLICK_RATE
    )
    test_window = models.DurationField(
        default=timedelta(hours=4), validators=[MinValueValidator(timedelta(minutes=1))]
    )
    tie_rule = models.CharField(max_length=20, choices=TieRule.choices, default=TieRule.VARIANT_A)
    test_ends_at = models.DateTimeField(null=True, blank=True)
    test_extended = models.BooleanField(default=False)
    winner = models.ForeignKey(
        "Variant", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    winner_reason = models.JSONField(default=dict, blank=True)
    paused_reason = models.TextField(blank=True)
    recipients = models.PositiveIntegerField(default=0, editable=False)
    launched_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = CampaignQuerySet.as_manager()

    class Meta:
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return self.name


class Variant(models.Model):
    """One arm of an A/B test: differs in subject, sender name, or template."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="variants")
    label = models.CharField(
        max_length=1,
        validators=[RegexValidator(r"^[A-E]$", "A variant is labelled A to E.")],
        help_text="A to E.",
    )
    subject = models.CharField(
        max_length=500, blank=True, help_text="Empty: the template's.", validators=[header_safe]
    )
    from_name = models.CharField(max_length=200, blank=True, validators=[header_safe])
    template = models.ForeignKey(
        Template,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        limit_choices_to={"purpose": "marketing"},
    )

    class Meta:
        ordering = ("label",)
        constraints = [
            models.UniqueConstraint(fields=("campaign", "label"), name="mailer_variant_label")
        ]

    def __str__(self) -> str:
        return f"{self.campaign} · {self.label}"


class CampaignTransition(models.Model):
    """The campaign's status history: who moved it where, when, and why."""

    campaign = models.ForeignKey(Campaign, on_delete=models.CASCADE, related_name="transitions")
    from_status = models.CharField(max_length=20, choices=CampaignStatus.choices)
    to_status = models.CharField(max_length=20, choices=CampaignStatus.choices)
    at = models.DateTimeField(default=timezone.now)
    by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    note = models.TextField(blank=True)

    class Meta:
        ordering = ("at", "id")

    def __str__(self) -> str:
        return f"{self.from_status} → {self.to_status}"


class ReputationPauseQuerySet(models.QuerySet):
    def in_force(self) -> ReputationPauseQuerySet:
        return self.filter(active=True)


class ReputationPause(models.Model):
    """Marketing stopped by the reputation guard; lifted only by a person."""

    reason = models.TextField()
    rates = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now)
    active = models.BooleanField(default=True, db_index=True)
    lifted_at = models.DateTimeField(null=True, blank=True)
    lifted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )

    objects = ReputationPauseQuerySet.as_manager()

    class Meta:
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return self.reason[:80]


class QueueThrottle(models.Model):
    """How fast a queue may send after its server asked us to slow down (shared by all
    worker processes): halved by each request, regained a step at a time (``throttle``)."""

    queue = models.CharField(max_length=20, primary_key=True, choices=Queue.choices)
    factor = models.FloatField(default=1.0)  # at the last request; recovery is computed
    reason = models.TextField(blank=True)
    since = models.DateTimeField(null=True, blank=True)  # slowed down since (None: full)
    signalled_at = models.DateTimeField(null=True, blank=True)  # the last request

    class Meta:
        verbose_name = "queue throttle"

    def __str__(self) -> str:
        return f"{self.queue} throttle"


class MessageStatus(models.TextChoices):
    SCHEDULED = "scheduled", "Scheduled"
    QUEUED = "queued", "Queued"
    SENDING = "sending", "Sending"
    SENT = "sent", "Sent"
    DELIVERED = "delivered", "Delivered"
    OPENED = "opened", "Opened"
    CLICKED = "clicked", "Clicked"
    BOUNCED = "bounced", "Bounced"
    COMPLAINED = "complained", "Complained"
    FAILED = "failed", "Failed"
    SUPPRESSED = "suppressed", "Suppressed"
    CANCELLED = "cancelled", "Cancelled"

    @classmethod
    def unsent(cls) -> tuple[MessageStatus, ...]:
        """Not yet handed to a worker: cancelling or suppressing stops these."""
        return (cls.SCHEDULED, cls.QUEUED)

    @classmethod
    def waiting(cls) -> tuple[MessageStatus, ...]:
        """Not finished: a campaign with any of these is still sending."""
        return (cls.SCHEDULED, cls.QUEUED, cls.SENDING)

    @classmethod
    def left(cls) -> tuple[MessageStatus, ...]:
        """The email left us, whatever happened to it afterwards."""
        return (cls.SENT, cls.DELIVERED, cls.OPENED, cls.CLICKED, cls.BOUNCED, cls.COMPLAINED)

    @classmethod
    def retryable(cls) -> tuple[MessageStatus, ...]:
        return (cls.FAILED, cls.CANCELLED)


class MessageQuerySet(models.QuerySet):
    def due(self, now: datetime | None = None) -> MessageQuerySet:
        """Scheduled messages whose time has come; beat hands them to the broker."""
        return self.filter(status=MessageStatus.SCHEDULED, send_after__lte=now or timezone.now())

    def stuck_sending(self, lease: float, now: datetime | None = None) -> MessageQuerySet:
        """Claimed longer ago than the lease: the worker died or lost its connection."""
        cutoff = (now or timezone.now()) - timedelta(seconds=lease)
        return self.filter(status=MessageStatus.SENDING, claimed_at__lt=cutoff)

    def lost_in_queue(self, lease: float, now: datetime | None = None) -> MessageQuerySet:
        """Queued and due for longer than the lease without a worker claiming it."""
        cutoff = (now or timezone.now()) - timedelta(seconds=lease)
        return self.filter(status=MessageStatus.QUEUED, queued_at__lt=cutoff).filter(
            Q(send_after__isnull=True) | Q(send_after__lt=cutoff)
        )

    def retryable(self) -> MessageQuerySet:
        return self.filter(status__in=MessageStatus.retryable())

    def for_queue(self, queue: str) -> MessageQuerySet:
        return self.filter(kind__in=Queue(queue).kinds)


class Message(models.Model):
    """One email to one address: the outbox row and, when it fails, the dead letter."""

    Status = MessageStatus

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.TRANSACTIONAL)
    status = models.CharField(
        max_length=20, choices=MessageStatus.choices, default=MessageStatus.QUEUED
    )
    to_email = models.EmailField("to", max_length=254)
    contact = models.ForeignKey(
        Contact, null=True, blank=True, on_delete=models.SET_NULL, related_name="messages"
    )
    template = models.ForeignKey(
        Template, null=True, blank=True, on_delete=models.SET_NULL, related_name="messages"
    )
    # Indexed by (campaign, status) below: a single-column index would only cost writes.
    campaign = models.ForeignKey(
        Campaign,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="messages",
        db_index=False,
    )
    variant = models.ForeignKey(
        Variant, null=True, blank=True, on_delete=models.SET_NULL, related_name="messages"
    )
    # A drip step's email: one per (enrollment, step), never two (constraint below).
    enrollment = models.ForeignKey(
        "Enrollment",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="messages",
        db_index=False,
    )
    drip_step = models.ForeignKey(
        "DripStep",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="messages",
        db_index=False,
    )
    template_slug = models.SlugField(max_length=100, db_index=False)
    language = models.CharField(max_length=10, blank=True)
    context = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    subject = models.CharField(max_length=998, blank=True)
    # NULL, not "", when absent: the unique constraint lets NULLs repeat.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    attempts = models.PositiveIntegerField(default=0)
    claim_token = models.UUIDField(null=True, blank=True, editable=False)
    last_error = models.TextField(blank=True)
    provider_message_id = models.CharField(max_length=255, blank=True)
    send_after = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    # When a worker claimed it (under claim_token; the lease lives on its Claim).
    claimed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    # The first event of each kind (opens and clicks by people only, not scanners), kept
    # on the message so a million-recipient report is one pass over its messages instead
    # of DISTINCT counts over millions of events. Set by ``tracking`` with the status.
    delivered_at = models.DateTimeField(null=True, blank=True, editable=False)
    opened_at = models.DateTimeField(null=True, blank=True, editable=False)
    clicked_at = models.DateTimeField(null=True, blank=True, editable=False)
    bounced_at = models.DateTimeField(null=True, blank=True, editable=False)
    complained_at = models.DateTimeField(null=True, blank=True, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    objects = MessageQuerySet.as_manager()

    class Meta:
        ordering = ("-created_at",)
        constraints = [
            models.UniqueConstraint(
                fields=("campaign", "contact"),
                condition=Q(campaign__isnull=False),
                name="mailer_msg_one_per_campaign_contact",
            ),
            models.UniqueConstraint(fields=("idempotency_key",), name="mailer_msg_idempotency_key"),
            models.UniqueConstraint(
                fields=("enrollment", "drip_step"),
                condition=Q(enrollment__isnull=False),
                name="mailer_msg_one_per_enrollment_step",
            ),
        ]
        # Every index costs each of the million inserts a campaign launch makes, so only
        # equality lookups here: Meta indexes skip the LIKE twin a db_index column gets.
        indexes = [
            models.Index(fields=("provider_message_id",), name="mailer_msg_provider_id"),
            models.Index(fields=("template_slug",), name="mailer_msg_template_slug"),
            # Claims take the oldest queued ids: a partial index keeps that a short index
            # read however many sent rows a million-recipient campaign leaves behind.
            models.Index(fields=("id",), condition=Q(status="queued"), name="mailer_msg_queued_id"),
            models.Index(fields=("campaign", "status"), name="mailer_msg_campaign_status"),
            models.Index(fields=("status", "send_after"), name="mailer_msg_status_due"),
            models.Index(fields=("status", "claimed_at"), name="mailer_msg_status_claim"),
            models.Index(fields=("to_email",), name="mailer_msg_to"),
            # A drip step's funnel; partial, so campaign inserts never touch it.
            models.Index(
                fields=("drip_step", "status"),
                condition=Q(drip_step__isnull=False),
                name="mailer_msg_drip_step",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.template_slug} → {self.to_email} [{self.status}]"


class Claim(models.Model):
    """A worker's hold on one batch of messages: its lease, and how far it got.

    Messages are tried in id order; ``tried_through`` and ``sent_through`` are written
    before each email goes on the wire (one small row, cheap to update), so when a worker
    dies recovery knows which of its messages left, which single one is in doubt, and
    which were never tried. The messages' own rows are updated once per batch.
    """

    token = models.UUIDField(primary_key=True, editable=False)
    queue = models.CharField(max_length=20, choices=Queue.choices)
    tried_through = models.BigIntegerField(null=True, blank=True)
    sent_through = models.BigIntegerField(null=True, blank=True)
    renewed_at = models.DateTimeField(db_index=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.queue} claim {self.token}"


class EventType(models.TextChoices):
    # anymail's normalized event types
    QUEUED = "queued", "Queued"
    SENT = "sent", "Sent"
    REJECTED = "rejected", "Rejected"
    FAILED = "failed", "Failed"
    BOUNCED = "bounced", "Bounced"
    DEFERRED = "deferred", "Deferred"
    DELIVERED = "delivered", "Delivered"
    AUTORESPONDED = "autoresponded", "Autoresponded"
    OPENED = "opened", "Opened"
    CLICKED = "clicked", "Clicked"
    COMPLAINED = "complained", "Complained"
    UNSUBSCRIBED = "unsubscribed", "Unsubscribed"
    SUBSCRIBED = "subscribed", "Subscribed"
    UNKNOWN = "unknown", "Unknown"


class Link(models.Model):
    """A URL recorded at send time; click redirects go only to these, by signed id."""

    url = models.TextField()
    url_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.url[:100]


class Event(models.Model):
    """Something that happened to a message, once per provider event."""

    Type = EventType

    class Bounce(models.TextChoices):
        NONE = "", "—"
        HARD = "hard", "Hard"
        SOFT = "soft", "Soft"

    message = models.ForeignKey(
        Message, null=True, blank=True, on_delete=models.CASCADE, related_name="events"
    )
    event_type = models.CharField(max_length=20, choices=EventType.choices)
    provider_event_id = models.CharField(max_length=255, null=True, blank=True, unique=True)
    recipient = models.EmailField(max_length=254, blank=True)
    timestamp = models.DateTimeField(default=timezone.now, db_index=True)
    description = models.TextField(blank=True)
    bounce = models.CharField(max_length=4, choices=Bounce.choices, blank=True, default="")
    link = models.ForeignKey(Link, null=True, blank=True, on_delete=models.SET_NULL)
    # Copied from the message so campaign reports aggregate without a join. Indexed by
    # (campaign, event_type, …) below.
    campaign = models.ForeignKey(
        Campaign,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="events",
        db_index=False,
    )
    automated = models.BooleanField(
        default=False, help_text="Looks like a scanner or proxy, not a person; left out of rates."
    )
    automated_reason = models.CharField(max_length=100, blank=True)
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ("-timestamp",)
        indexes = [
            models.Index(fields=("event_type", "timestamp"), name="mailer_event_type_ts"),
            models.Index(fields=("recipient", "timestamp"), name="mailer_event_rcpt_ts"),
            # Covers the report's hourly opens and clicks: an index-only scan.
            models.Index(
                fields=("campaign", "event_type", "timestamp", "automated"),
                name="mailer_event_campaign_type_ts",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.recipient}"


class Suppression(models.Model):
    """An address we must not mail: all mail, or marketing only."""

    class Scope(models.TextChoices):
        ALL = "all", "All mail"
        MARKETING = "marketing", "Marketing only"

    class Reason(models.TextChoices):
        HARD_BOUNCE = "hard_bounce", "Hard bounce"
        SOFT_BOUNCE = "soft_bounce", "Repeated soft bounces"
        INVALID = "invalid", "Rejected as invalid"
        COMPLAINT = "complaint", "Complaint"
        UNSUBSCRIBE = "unsubscribe", "Unsubscribed"
        MANUAL = "manual", "Manual"

    email = models.EmailField(max_length=254)
    scope = models.CharField(max_length=10, choices=Scope.choices, default=Scope.ALL)
    reason = models.CharField(max_length=20, choices=Reason.choices, default=Reason.MANUAL)
    source = models.CharField(max_length=100, blank=True, help_text="admin, webhook, import…")
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=("email", "scope"), name="mailer_suppression_email")
        ]
        ordering = ("-created_at",)

    def __str__(self) -> str:
        return f"{self.email} ({self.get_scope_display()})"

    def save(self, *args, **kwargs):
        self.email = normalize_email(self.email)
        super().save(*args, **kwargs)


class RateBucket(models.Model):
    """Token-bucket state for the database rate limiter, used when there is no Redis."""

    name = models.CharField(max_length=100, unique=True)
    tokens = models.FloatField(default=0)
    updated = models.FloatField(default=0, help_text="Unix time of the last refill.")

    def __str__(self) -> str:
        return self.name


class WebhookSignature(models.Model):
    """A signed webhook's token, seen once, for the database store (no Redis): the same
    signature posted again is refused. Rows older than their window are pruned."""

    key = models.CharField(max_length=100, unique=True)
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.key


class WarmupSchedule(models.Model):
    """A daily cap on marketing mail that grows from a start date while a new sending
    domain or IP earns its reputation. Edited in the admin: ops adjust it without a deploy.

    Today's allowance is ``first_day_cap × growth_factor ^ (days since start // every_days)``,
    at most ``target_cap``; ``mailer.quota`` applies it to the campaign queue only.
    """

    name = models.CharField(max_length=100, unique=True, help_text="e.g. the new IP or domain.")
    start_date = models.DateField(help_text="Day 0, in the quota time zone.")
    first_day_cap = models.PositiveIntegerField(
        default=500, validators=[MinValueValidator(1)], help_text="Emails allowed on day 0."
    )
    growth_factor = models.FloatField(
        default=2.0,
        validators=[MinValueValidator(1.0)],
        help_text="The cap is multiplied by this every step.",
    )
    every_days = models.PositiveIntegerField(
        default=3, validators=[MinValueValidator(1)], help_text="Days per step."
    )
    target_cap = models.PositiveIntegerField(
        validators=[MinValueValidator(1)], help_text="The cap never grows past this."
    )
    active = models.BooleanField(
        default=True, db_index=True, help_text="Only active schedules hold marketing mail."
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("-active", "start_date", "name")
        verbose_name = "warm-up schedule"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        super().clean()
        if self.first_day_cap and self.target_cap and self.target_cap < self.first_day_cap:
            raise ValidationError({"target_cap": "The target cannot be below the first day's cap."})


class QuotaCounter(models.Model):
    """Sends counted in one quota window, for the database quota store (no Redis)."""

    key = models.CharField(max_length=200, unique=True)
    used = models.PositiveIntegerField(default=0)
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.key}: {self.used}"


# --- HTTP API, health and outgoing webhooks ------------------------------------------------


class ApiScope(models.TextChoices):
    SEND = "send", "Send messages"
    READ = "read", "Read messages"
    SUPPRESS = "suppress", "Manage suppressions"


class ApiKey(models.Model):
    """A key for the HTTP API: only a fast hash (SHA-512) of it is stored, with a visible
    prefix to find the row by; the key itself is shown once, when it is created."""

    Scope = ApiScope

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    hashed_key = models.CharField(max_length=200, editable=False)
    scopes = models.JSONField(default=list, help_text="send, read, suppress")
    rate_limit = models.CharField(
        max_length=20, blank=True, help_text="e.g. 600/m; empty: MAILER['API_RATE_LIMIT']."
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, editable=False
    )

    class Meta:
        ordering = ("-created_at",)
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())


class IdempotencyRecord(models.Model):
    """The first answer to an Idempotency-Key, replayed to a retry of the same request.

    ``status_code`` is NULL while the first request is still being answered."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response = models.JSONField(null=True, blank=True)
    started_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=("api_key", "key"), name="mailer_idempotency_key")
        ]

    def __str__(self) -> str:
        return self.key


class Heartbeat(models.Model):
    """A worker or beat process saying it is alive (and, for a worker, which queues)."""

    name = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=10)  # "worker" or "beat"
    queues = models.JSONField(default=list, blank=True)
    seen_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.name


class WebhookEndpoint(models.Model):
    """A URL of the host's that is told about message events, signed with its secret."""

    name = models.CharField(max_length=100)
    url = models.URLField(max_length=1000)
    event_types = models.JSONField(
        default=list, blank=True, help_text="Events to send; empty: all of them."
    )
    secret = models.CharField(
        max_length=100, help_text="Signs each payload (HMAC-SHA256 over timestamp.body)."
    )
    active = models.BooleanField(default=True, db_index=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ("name",)
        verbose_name = "outgoing webhook"

    def __str__(self) -> str:
        return self.name


class WebhookDelivery(models.Model):
    """One event for one endpoint: its payload, attempts and outcome (the delivery log)."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed"

    endpoint = models.ForeignKey(
        WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries"
    )
    event_id = models.CharField(max_length=100)
    event_type = models.CharField(max_length=30)
    payload = models.JSONField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at",)
        verbose_name_plural = "webhook deliveries"
        constraints = [
            models.UniqueConstraint(fields=("endpoint", "event_id"), name="mailer_webhook_once")
        ]
        indexes = [
            models.Index(fields=("status", "next_attempt_at"), name="mailer_webhook_due"),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} → {self.endpoint}"


# --- Drip series: ordered steps, and the contacts going through them ------------------------

_WEEKDAYS = RegexValidator(
    r"^(?!.*(.).*\1)[1-7]{0,7}$",
    "Weekdays as digits from 1 (Monday) to 7 (Sunday), each once: 12345 is Monday to Friday.",
)
_EVENT_NAME = RegexValidator(
    r"^[A-Za-z0-9_.:\-]{1,100}$", "An event name: letters, digits and _ . : - only."
)


class SendWindow(models.Model):
    """When email may go out: these weekdays, between these clock times, in the contact's
    time zone. Empty fields: any day, any time (a step's empty fields: its series')."""

    window_days = models.CharField(
        "send on",
        max_length=7,
        blank=True,
        validators=[_WEEKDAYS],
        help_text="Weekdays as digits, 1 = Monday … 7 = Sunday (12345: Monday to Friday). "
        "Empty: every day.",
    )
    window_start = models.TimeField("from", null=True, blank=True)
    window_end = models.TimeField("until", null=True, blank=True)

    class Meta:
        abstract = True

    def clean(self) -> None:
        super().clean()
        start, end = self.window_start, self.window_end
        if (start is None) != (end is None):
            raise ValidationError({"window_end": "Give both ends of the send window, or neither."})
        if start is not None and start >= end:
            raise ValidationError(
                {"window_end": "The window ends after it starts, on the same day."}
            )

    @property
    def has_window(self) -> bool:
        return bool(self.window_days) or self.window_start is not None


class DripSeriesStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    ACTIVE = "active", "Active"
    PAUSED = "paused", "Paused"
    ARCHIVED = "archived", "Archived"


class DripTrigger(models.TextChoices):
    MANUAL = "manual", "Only by mailer.api.enroll (or the admin)"
    EVENT = "event", "An event (mailer.api.trigger, or a signal such as user_registered)"
    SEGMENT = "segment", "Entering a segment"
    ANNIVERSARY = "anniversary", "A date attribute's anniversary (a birthday)"


class Reentry(models.TextChoices):
    ONCE = "once", "Once ever"
    COOLDOWN = "cooldown", "Again after a cooldown"
    ALWAYS = "always", "Every time (never while still in the series)"


class DripSeriesQuerySet(models.QuerySet):
    def accepting(self) -> DripSeriesQuerySet:
        """Series that take new enrollments (a paused one holds them where they are)."""
        return self.filter(status__in=(DripSeriesStatus.ACTIVE, DripSeriesStatus.PAUSED))

    def running(self) -> DripSeriesQuerySet:
        return self.filter(status=DripSeriesStatus.ACTIVE)


class DripSeries(SendWindow):
    """An ordered list of steps (send, wait, decide) that contacts enter and go through."""

    Status = DripSeriesStatus
    Trigger = DripTrigger
    Reentry = Reentry

    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    status = models.CharField(
        max_length=10, choices=DripSeriesStatus.choices, default=DripSeriesStatus.DRAFT
    )
    trigger = models.CharField(
        max_length=20, choices=DripTrigger.choices, default=DripTrigger.MANUAL
    )
    trigger_event = models.CharField(
        max_length=100,
        blank=True,
        validators=[_EVENT_NAME],
        help_text="For an event trigger: e.g. user_registered or cart_abandoned.",
    )
    entry_segment = models.ForeignKey(
        Segment, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    anniversary_attribute = models.CharField(
        max_length=100,
        blank=True,
        validators=[
            RegexValidator(
                r"^[A-Za-z][A-Za-z0-9_\-]{0,99}$",
                "An attribute name starts with a letter and uses letters, digits, - and _.",
            )
        ],
        help_text="For an anniversary: the contact attribute holding a date (YYYY-MM-DD).",
    )
    reentry = models.CharField(max_length=10, choices=Reentry.choices, default=Reentry.ONCE)
    reentry_cooldown = models.DurationField(
        null=True, blank=True, help_text="For re-entry after a cooldown: since the last exit."
    )
    goal_segment = models.ForeignKey(
        Segment,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="A contact who enters this segment has reached the goal and leaves.",
    )
    goal_event = models.CharField(
        max_length=100,
        blank=True,
        validators=[_EVENT_NAME],
        help_text="An event (mailer.api.trigger) that means the goal is reached, e.g. purchased.",
    )
    timezone = models.CharField(
        max_length=64,
        default="UTC",
        validators=[valid_timezone],
        help_text="For contacts without a time zone of their own.",
    )
    requires_consent = models.BooleanField(
        default=True,
        help_text="Only contacts who gave marketing consent. Turn off for mail a new user "
        "expects, such as onboarding; unsubscribes and suppressions always apply.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = DripSeriesQuerySet.as_manager()

    class Meta:
        ordering = ("name",)
        verbose_name = "drip series"
        verbose_name_plural = "drip series"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        super().clean()
        errors = {}
        if self.trigger == DripTrigger.EVENT and not self.trigger_event:
            errors["trigger_event"] = "Name the event that enrolls contacts."
        if self.trigger == DripTrigger.SEGMENT and not self.entry_segment_id:
            errors["entry_segment"] = "Choose the segment whose new members enroll."
        if self.trigger == DripTrigger.ANNIVERSARY and not self.anniversary_attribute:
            errors["anniversary_attribute"] = "Name the date attribute, e.g. birthday."
        if self.reentry == Reentry.COOLDOWN and not self.reentry_cooldown:
            errors["reentry_cooldown"] = "Give the cooldown."
        if self.trigger == DripTrigger.SEGMENT and self.reentry == Reentry.ALWAYS:
            errors["reentry"] = (
                "A contact stays in a segment: with 'every time' it would start over as soon "
                "as it finished. Choose once, or after a cooldown."
            )
        if errors:
            raise ValidationError(errors)


def duration(value: timedelta | None) -> str:
    """A delay as people say it: "1 day", "2 days 3 hours", "30 minutes"."""
    if not value:
        return "—"
    seconds = int(value.total_seconds())
    parts = []
    for name, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {name}{'s' if count != 1 else ''}")
    return " ".join(parts) or "0 seconds"


class StepKind(models.TextChoices):
    SEND = "send", "Send an email"
    WAIT = "wait", "Wait"
    DECIDE = "decide", "Decide"


class WaitFrom(models.TextChoices):
    PREVIOUS = "previous", "after the previous step"
    ENROLLMENT = "enrollment", "after enrollment"


class Condition(models.TextChoices):
    OPENED = "opened", "The previous email was opened"
    CLICKED = "clicked", "The previous email was clicked"
    OPENED_ANY = "opened_any", "Any email of this series was opened"
    CLICKED_ANY = "clicked_any", "Any email of this series was clicked"
    IN_SEGMENT = "segment", "The contact is in a segment"


class Branch(models.TextChoices):
    CONTINUE = "continue", "Continue with the next step"
    JUMP = "jump", "Jump to a later step"
    EXIT = "exit", "End the series for this contact"


class DripStep(SendWindow):
    """One step of a series, run in ``position`` order; gaps let a step be put in between.

    A step added to a live series reaches every contact that has not passed its position;
    a removed one is skipped.
    """

    Kind = StepKind
    WaitFrom = WaitFrom
    Condition = Condition
    Branch = Branch

    series = models.ForeignKey(DripSeries, on_delete=models.CASCADE, related_name="steps")
    position = models.PositiveIntegerField(help_text="Steps run in this order (10, 20, 30…).")
    kind = models.CharField(max_length=10, choices=StepKind.choices, default=StepKind.SEND)
    name = models.CharField(max_length=200, blank=True)
    template = models.ForeignKey(
        Template,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        limit_choices_to={"purpose": "marketing"},
        help_text="For a send step; each contact gets its translation in their language.",
    )
    delay = models.DurationField(null=True, blank=True, help_text="For a wait step.")
    delay_from = models.CharField(
        max_length=10, choices=WaitFrom.choices, default=WaitFrom.PREVIOUS
    )
    condition = models.CharField(max_length=20, choices=Condition.choices, blank=True)
    condition_window = models.DurationField(
        null=True,
        blank=True,
        help_text="For opens and clicks: how long to wait for one (from the email's "
        "sending; for 'any email', from reaching this step). Empty: decide at once.",
    )
    condition_segment = models.ForeignKey(
        Segment, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    if_yes = models.CharField(max_length=10, choices=Branch.choices, default=Branch.CONTINUE)
    yes_step = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    if_no = models.CharField(max_length=10, choices=Branch.choices, default=Branch.CONTINUE)
    no_step = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ("series", "position")
        constraints = [
            models.UniqueConstraint(fields=("series", "position"), name="mailer_dripstep_position")
        ]

    def __str__(self) -> str:
        return f"{self.position}. {self.name or self.describe()}"

    def describe(self) -> str:
        """The step in words, for the admin's flow."""
        if self.kind == StepKind.SEND:
            return f"send {self.template.slug if self.template_id else '(no template)'}"
        if self.kind == StepKind.WAIT:
            return f"wait {duration(self.delay)} {self.get_delay_from_display()}"
        what = self.get_condition_display() if self.condition else "(no condition)"
        if self.condition == Condition.IN_SEGMENT and self.condition_segment_id:
            what = f"in segment {self.condition_segment}"
        if self.condition_window and self.condition != Condition.IN_SEGMENT:
            what += f" within {duration(self.condition_window)}"
        return f"if {what.lower()}: {self._branch('yes')}; else: {self._branch('no')}"

    def _branch(self, which: str) -> str:
        branch, target = getattr(self, f"if_{which}"), getattr(self, f"{which}_step")
        if branch == Branch.JUMP:
            return f"jump to step {target.position}" if target else "continue"
        return "end" if branch == Branch.EXIT else "continue"

    def clean(self) -> None:
        super().clean()
        errors = {}
        if self.kind == StepKind.SEND and not self.template_id:
            errors["template"] = "A send step needs a template."
        if self.kind == StepKind.WAIT and not self.delay:
            errors["delay"] = "A wait step needs a delay."
        if self.kind == StepKind.DECIDE:
            if not self.condition:
                errors["condition"] = "A decide step needs a condition."
            elif self.condition == Condition.IN_SEGMENT and not self.condition_segment_id:
                errors["condition_segment"] = "Choose the segment."
            for which in ("yes", "no"):
                target = getattr(self, f"{which}_step")
                if getattr(self, f"if_{which}") != Branch.JUMP:
                    continue
                if target is None:
                    errors[f"{which}_step"] = "Choose the step to jump to."
                elif target.series_id != self.series_id or (
                    self.position is not None and target.position <= self.position
                ):
                    errors[f"{which}_step"] = "Jump only to a later step of this series."
        if errors:
            raise ValidationError(errors)


class EnrollmentState(models.TextChoices):
    ACTIVE = "active", "In the series"
    COMPLETED = "completed", "Completed"
    EXITED = "exited", "Exited"


class ExitReason(models.TextChoices):
    END = "end", "Reached the end"
    DECIDED = "decided", "Ended by a decision"
    GOAL_SEGMENT = "goal_segment", "Reached the goal segment"
    GOAL_EVENT = "goal_event", "Reached the goal event"
    UNSUBSCRIBED = "unsubscribed", "Unsubscribed"
    SUPPRESSED = "suppressed", "Suppressed"
    NO_CONSENT = "no_consent", "No marketing consent"
    REMOVED = "removed", "Removed by a marketer"


class EnrollmentQuerySet(models.QuerySet):
    def active(self) -> EnrollmentQuerySet:
        return self.filter(state=EnrollmentState.ACTIVE)

    def overdue(self, seconds: float, now: datetime | None = None) -> EnrollmentQuerySet:
        """Active in a running series, and due longer ago than ``seconds``: no tick got to
        them (beat stopped, a task was lost, a tick keeps failing)."""
        cutoff = (now or timezone.now()) - timedelta(seconds=seconds)
        return self.filter(
            state=EnrollmentState.ACTIVE,
            series__status=DripSeriesStatus.ACTIVE,
            next_due_at__lt=cutoff,
        )


class Enrollment(models.Model):
    """One contact going through one series: where it stands and when it next moves."""

    State = EnrollmentState
    ExitReason = ExitReason

    series = models.ForeignKey(DripSeries, on_delete=models.CASCADE, related_name="enrollments")
    contact = models.ForeignKey(Contact, on_delete=models.CASCADE, related_name="enrollments")
    state = models.CharField(
        max_length=10, choices=EnrollmentState.choices, default=EnrollmentState.ACTIVE
    )
    # The next step to run is the first with a position at least this (so a step put in
    # between reaches the contact, a removed one is skipped), at next_due_at.
    next_position = models.PositiveIntegerField(default=0)
    next_due_at = models.DateTimeField(null=True, blank=True)
    step = models.ForeignKey(
        DripStep,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The step it waits at (or left from).",
    )
    step_started_at = models.DateTimeField(null=True, blank=True)
    last_step_at = models.DateTimeField(null=True, blank=True)
    entered_at = models.DateTimeField(default=timezone.now)
    exited_at = models.DateTimeField(null=True, blank=True)
    exit_reason = models.CharField(max_length=20, choices=ExitReason.choices, blank=True)
    source = models.CharField(max_length=120, blank=True, help_text="How it entered.")
    # Set for enrollments that must happen at most once per key (an anniversary's year).
    key = models.CharField(max_length=100, null=True, blank=True)  # noqa: DJ001
    data = models.JSONField(
        default=dict, blank=True, help_text="The event's data: templates see it."
    )
    note = models.TextField(blank=True, help_text="Why it waits, or what went wrong.")
    updated_at = models.DateTimeField(default=timezone.now)

    objects = EnrollmentQuerySet.as_manager()

    class Meta:
        ordering = ("-entered_at",)
        constraints = [
            # Never in the same series twice at once, whatever the re-entry policy.
            models.UniqueConstraint(
                fields=("series", "contact"),
                condition=Q(state="active"),
                name="mailer_enrollment_one_active",
            ),
            models.UniqueConstraint(
                fields=("series", "contact", "key"),
                condition=Q(key__isnull=False),
                name="mailer_enrollment_key",
            ),
        ]
        indexes = [
            # The beat tick's read: a series' due enrollments, oldest first.
            models.Index(
                fields=("series", "next_due_at"),
                condition=Q(state="active"),
                name="mailer_enrollment_due",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.contact} in {self.series}"


class StepOutcome(models.TextChoices):
    SENT = "sent", "Email made"
    FAILED = "failed", "Failed"
    WAITED = "waited", "Waited"
    YES = "yes", "Condition met"
    NO = "no", "Condition not met"


class DripStepRun(models.Model):
    """A step an enrollment went through (once per enrollment and step): the funnel."""

    Outcome = StepOutcome

    enrollment = models.ForeignKey(
        Enrollment, on_delete=models.CASCADE, related_name="runs", db_index=False
    )
    step = models.ForeignKey(DripStep, on_delete=models.CASCADE, related_name="runs")
    at = models.DateTimeField()
    outcome = models.CharField(max_length=10, choices=StepOutcome.choices)
    note = models.TextField(blank=True)

    class Meta:
        ordering = ("at", "id")
        constraints = [
            models.UniqueConstraint(fields=("enrollment", "step"), name="mailer_dripstep_run_once")
        ]

    def __str__(self) -> str:
        return f"{self.step} {self.outcome}"
