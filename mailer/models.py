"""The rows mailer keeps: contacts, templates, the message outbox, events, suppressions."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Kind(models.TextChoices):
    TRANSACTIONAL = "transactional", "Transactional"
    CAMPAIGN = "campaign", "Campaign"
    DRIP = "drip", "Drip"


class Contact(models.Model):
    """One person we may email; registration creates or links one."""

    class Consent(models.TextChoices):
        UNKNOWN = "unknown", "Unknown"
        GRANTED = "granted", "Granted"
        WITHDRAWN = "withdrawn", "Withdrawn"

    email = models.EmailField(max_length=254, unique=True, help_text="Stored lower-case.")
    name = models.CharField(max_length=200, blank=True)
    language = models.CharField(max_length=10, blank=True)
    timezone = models.CharField(max_length=64, blank=True)
    attributes = models.JSONField(default=dict, blank=True)
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
    subject = models.CharField(max_length=500)
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
        # Caught on save, not on send: a broken template never reaches the outbox.
        from .rendering import validate_template

        validate_template(self)
        if self.pk:
            self.version += 1
        super().save(*args, **kwargs)

    def clean(self) -> None:
        from .rendering import validate_template

        validate_template(self)

    @property
    def declared_variables(self) -> set[str]:
        return {v for v in self.variables.replace(",", " ").split() if v}


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
        return self.filter(status__in=(MessageStatus.FAILED, MessageStatus.CANCELLED))


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
    template_slug = models.SlugField(max_length=100)
    language = models.CharField(max_length=10, blank=True)
    context = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    subject = models.CharField(max_length=998, blank=True)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True, unique=True)
    attempts = models.PositiveIntegerField(default=0)
    claim_token = models.UUIDField(null=True, blank=True, editable=False)
    last_error = models.TextField(blank=True)
    provider_message_id = models.CharField(max_length=255, blank=True, db_index=True)
    send_after = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = MessageQuerySet.as_manager()

    class Meta:
        ordering = ("-created_at",)
        indexes = [
            models.Index(fields=("status", "send_after"), name="mailer_msg_status_due"),
            models.Index(fields=("status", "claimed_at"), name="mailer_msg_status_claim"),
            models.Index(fields=("to_email",), name="mailer_msg_to"),
        ]

    def __str__(self) -> str:
        return f"{self.template_slug} → {self.to_email} [{self.status}]"


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
