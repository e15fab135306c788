"""Request and response shapes of the HTTP API; the OpenAPI schema is built from these."""

from __future__ import annotations

from rest_framework import serializers

from ..models import EventType, MessageStatus, Suppression


class MessageRequest(serializers.Serializer):
    """One transactional email: a template slug with its context, or inline subject and
    html (and text) without one. Checked by ``validate.message`` (documented here)."""

    to = serializers.CharField(max_length=254, help_text="The recipient's address.")
    template = serializers.SlugField(
        max_length=100, required=False, help_text="Template slug (a Template row or file)."
    )
    context = serializers.DictField(required=False, help_text="The template's variables.")
    subject = serializers.CharField(
        max_length=998, required=False, help_text="Inline content: the subject (no template)."
    )
    html = serializers.CharField(required=False, help_text="Inline content: the HTML body.")
    text = serializers.CharField(
        required=False, help_text="Inline content: the text body (derived from html if absent)."
    )
    language = serializers.CharField(max_length=10, required=False)
    send_at = serializers.DateTimeField(required=False, help_text="Send later (ISO 8601).")
    metadata = serializers.DictField(required=False, help_text="Stored, and passed to the ESP.")


class BatchRequest(serializers.Serializer):
    messages = serializers.ListField(
        child=MessageRequest(), help_text="Up to API_BATCH_MAX (500) messages."
    )


class Accepted(serializers.Serializer):
    id = serializers.CharField(help_text="The message's public id, msg_…")
    status = serializers.ChoiceField(choices=MessageStatus.choices)


class FieldError(serializers.Serializer):
    field = serializers.CharField(allow_null=True)
    detail = serializers.CharField()


class ProblemDocument(serializers.Serializer):
    """RFC 9457 problem details."""

    type = serializers.CharField(help_text="urn:mailer:problem:<kind>, stable per kind.")
    title = serializers.CharField()
    status = serializers.IntegerField()
    detail = serializers.CharField(required=False)
    errors = FieldError(many=True, required=False)


class BatchItem(serializers.Serializer):
    index = serializers.IntegerField()
    id = serializers.CharField(required=False)
    status = serializers.ChoiceField(choices=MessageStatus.choices, required=False)
    error = ProblemDocument(required=False)


class BatchResult(serializers.Serializer):
    accepted = serializers.IntegerField()
    rejected = serializers.IntegerField()
    results = BatchItem(many=True)


class EventOut(serializers.Serializer):
    type = serializers.ChoiceField(choices=EventType.choices)
    at = serializers.DateTimeField()
    description = serializers.CharField(allow_blank=True)
    bounce = serializers.CharField(allow_blank=True)


class MessageSummary(serializers.Serializer):
    id = serializers.CharField()
    kind = serializers.CharField()
    status = serializers.ChoiceField(choices=MessageStatus.choices)
    to = serializers.CharField()
    template = serializers.CharField()
    language = serializers.CharField(allow_blank=True)
    subject = serializers.CharField(allow_blank=True)
    attempts = serializers.IntegerField()
    created_at = serializers.DateTimeField()
    queued_at = serializers.DateTimeField(allow_null=True)
    send_after = serializers.DateTimeField(allow_null=True)
    sent_at = serializers.DateTimeField(allow_null=True)


class MessageDetail(MessageSummary):
    metadata = serializers.DictField()
    last_error = serializers.CharField(allow_blank=True)
    delivered_at = serializers.DateTimeField(allow_null=True)
    opened_at = serializers.DateTimeField(allow_null=True)
    clicked_at = serializers.DateTimeField(allow_null=True)
    bounced_at = serializers.DateTimeField(allow_null=True)
    complained_at = serializers.DateTimeField(allow_null=True)
    events = EventOut(many=True)


class MessagePage(serializers.Serializer):
    results = MessageSummary(many=True)
    next_cursor = serializers.CharField(allow_null=True)


class SuppressionRequest(serializers.Serializer):
    scope = serializers.ChoiceField(
        choices=Suppression.Scope.choices, default=Suppression.Scope.ALL
    )
    note = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class SuppressionOut(serializers.Serializer):
    email = serializers.CharField()
    scope = serializers.ChoiceField(choices=Suppression.Scope.choices)
    created = serializers.BooleanField(help_text="False when it was already suppressed.")


class Unsuppressed(serializers.Serializer):
    email = serializers.CharField()
    removed = serializers.IntegerField()
