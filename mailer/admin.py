"""The operators' and marketers' window: messages, templates, contacts, suppressions."""

from __future__ import annotations

from django.contrib import admin, messages
from django.utils.html import format_html
from django.utils.translation import ngettext

from . import delivery, rendering
from .exceptions import MailerError
from .models import Contact, Event, Message, Suppression, Template


def _iframe(html: str, height: int = 480) -> str:
    # srcdoc in a sandbox with no permissions: no scripts, no same-origin access.
    return format_html(
        '<iframe sandbox="" referrerpolicy="no-referrer" srcdoc="{}" '
        'style="width:100%;max-width:760px;height:{}px;border:1px solid #ccc;background:#fff">'
        "</iframe>",
        html,
        height,
    )


class EventInline(admin.TabularInline):
    model = Event
    extra = 0
    can_delete = False
    fields = ("timestamp", "event_type", "recipient", "description", "provider_event_id")
    readonly_fields = fields
    ordering = ("timestamp",)

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "to_email",
        "template_slug",
        "kind",
        "status",
        "attempts",
        "created_at",
        "sent_at",
    )
    list_filter = ("status", "kind", ("created_at", admin.DateFieldListFilter), "template_slug")
    search_fields = ("to_email", "=provider_message_id", "=idempotency_key")
    date_hierarchy = "created_at"
    list_select_related = False
    show_full_result_count = False
    actions = ("retry_messages",)
    inlines = (EventInline,)
    readonly_fields = (
        "uuid",
        "kind",
        "status",
        "to_email",
        "contact",
        "template",
        "template_slug",
        "language",
        "subject",
        "context",
        "metadata",
        "idempotency_key",
        "attempts",
        "last_error",
        "provider_message_id",
        "send_after",
        "created_at",
        "queued_at",
        "claimed_at",
        "sent_at",
        "updated_at",
        "preview",
    )
    fieldsets = (
        (None, {"fields": ("uuid", "kind", "status", "to_email", "contact", "subject")}),
        ("Template", {"fields": ("template_slug", "language", "template", "context", "metadata")}),
        (
            "Delivery",
            {
                "fields": (
                    "attempts",
                    "last_error",
                    "provider_message_id",
                    "idempotency_key",
                    "send_after",
                    "created_at",
                    "queued_at",
                    "claimed_at",
                    "sent_at",
                    "updated_at",
                )
            },
        ),
        ("Preview", {"fields": ("preview",)}),
    )

    def has_add_permission(self, request) -> bool:
        return False  # messages come from mailer.api and campaigns, not by hand

    @admin.display(description="Rendered email")
    def preview(self, obj: Message) -> str:
        try:
            source = rendering.find_template(obj.template_slug, obj.language)
            rendered = rendering.compiled(source).render(delivery.message_context(obj))
        except MailerError as exc:
            return format_html("<em>Cannot render this message: {}</em>", exc)
        return format_html(
            "<p><strong>Subject:</strong> {}</p>{}<details><summary>Text part</summary>"
            "<pre style='white-space:pre-wrap'>{}</pre></details>",
            rendered.subject,
            _iframe(rendered.html),
            rendered.text,
        )

    @admin.action(description="Retry selected failed or cancelled messages")
    def retry_messages(self, request, queryset) -> None:
        count = delivery.requeue(queryset)
        skipped = queryset.count() - count
        self.message_user(
            request,
            ngettext("%d message queued again.", "%d messages queued again.", count) % count,
            messages.SUCCESS if count else messages.WARNING,
        )
        if skipped:
            self.message_user(
                request,
                ngettext(
                    "%d message skipped: only failed or cancelled messages can be retried.",
                    "%d messages skipped: only failed or cancelled messages can be retried.",
                    skipped,
                )
                % skipped,
                messages.WARNING,
            )


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    list_display = ("slug", "language", "purpose", "description", "version", "updated_at")
    list_filter = ("purpose", "language")
    search_fields = ("slug", "description", "subject")
    readonly_fields = ("version", "created_at", "updated_at", "available_variables", "preview")
    fieldsets = (
        (None, {"fields": ("slug", "language", "purpose", "description")}),
        ("Content", {"fields": ("subject", "html", "text", "variables", "available_variables")}),
        ("Preview with sample data", {"fields": ("preview",)}),
        ("History", {"fields": ("version", "created_at", "updated_at")}),
    )

    @admin.display(description="Standard variables")
    def available_variables(self, obj: Template) -> str:
        names = sorted(
            rendering.STANDARD_CONTEXT | rendering.BUILTIN_VARIABLES.get(obj.slug, set())
        )
        return ", ".join(names)

    @admin.display(description="Preview")
    def preview(self, obj: Template) -> str:
        if not obj.pk:
            return "Save the template to see a preview."
        source = rendering.find_template(obj.slug, obj.language)
        try:
            rendered = rendering.compiled(source).render(
                rendering.sample_context(rendering.allowed_names(obj.slug, obj.declared_variables))
            )
        except MailerError as exc:
            return format_html("<em>Cannot render: {}</em>", exc)
        return format_html(
            "<p><strong>Subject:</strong> {}</p>{}<details><summary>Text part</summary>"
            "<pre style='white-space:pre-wrap'>{}</pre></details>",
            rendered.subject,
            _iframe(rendered.html),
            rendered.text,
        )


@admin.register(Contact)
class ContactAdmin(admin.ModelAdmin):
    list_display = ("email", "name", "language", "consent", "verified_at", "created_at")
    list_filter = ("consent", "language")
    search_fields = ("email", "name")
    raw_id_fields = ("user",)
    readonly_fields = ("created_at", "updated_at")


@admin.register(Suppression)
class SuppressionAdmin(admin.ModelAdmin):
    list_display = ("email", "scope", "reason", "source", "created_at")
    list_filter = ("scope", "reason", ("created_at", admin.DateFieldListFilter))
    search_fields = ("email", "note")

    def save_model(self, request, obj, form, change) -> None:
        if not change and not obj.source:
            obj.source = f"admin:{request.user.get_username()}"
        super().save_model(request, obj, form, change)


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ("timestamp", "event_type", "recipient", "message")
    list_filter = ("event_type", ("timestamp", admin.DateFieldListFilter))
    search_fields = ("recipient", "=provider_event_id")
    raw_id_fields = ("message",)
    readonly_fields = (
        "message",
        "event_type",
        "provider_event_id",
        "recipient",
        "timestamp",
        "description",
        "data",
    )

    def has_add_permission(self, request) -> bool:
        return False
