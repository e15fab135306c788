"""The operators' and marketers' window: messages, templates, contacts, suppressions."""

from __future__ import annotations

import io

from django import forms
from django.contrib import admin, messages
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import ngettext

from . import delivery, rendering, suppressions
from .exceptions import ImportFileError, MailerError
from .models import Contact, Event, Link, Message, Suppression, Template


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
    fields = (
        "timestamp",
        "event_type",
        "description",
        "automated_reason",
        "link",
        "provider_event_id",
    )
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


class SuppressionImportForm(forms.Form):
    file = forms.FileField(
        help_text="CSV with a header row: email (required), scope (all/marketing), "
        "reason (hard_bounce, soft_bounce, invalid, complaint, unsubscribe, manual), note."
    )


@admin.register(Suppression)
class SuppressionAdmin(admin.ModelAdmin):
    list_display = ("email", "scope", "reason", "source", "created_at")
    list_filter = ("scope", "reason", ("created_at", admin.DateFieldListFilter))
    search_fields = ("email", "note", "source")
    actions = ("export_csv",)
    change_list_template = "admin/mailer/suppression/change_list.html"

    def get_urls(self):
        extra = [
            path(
                "import/",
                self.admin_site.admin_view(self.import_view),
                name="mailer_suppression_import",
            ),
            path(
                "export/",
                self.admin_site.admin_view(self.export_all_view),
                name="mailer_suppression_export",
            ),
        ]
        return extra + super().get_urls()

    def save_model(self, request, obj, form, change) -> None:
        if not change:
            # Through the service, so the address's waiting marketing is cancelled too.
            obj.source = obj.source or f"admin:{request.user.get_username()}"
            saved, _ = suppressions.suppress(
                obj.email, scope=obj.scope, reason=obj.reason, source=obj.source, note=obj.note
            )
            obj.pk = saved.pk
            return
        super().save_model(request, obj, form, change)

    def _csv_response(self, queryset) -> HttpResponse:
        buffer = io.StringIO()
        suppressions.export_csv(queryset.iterator(), buffer)
        response = HttpResponse(buffer.getvalue(), content_type="text/csv; charset=utf-8")
        stamp = timezone.now().strftime("%Y%m%d-%H%M")
        response["Content-Disposition"] = f'attachment; filename="suppressions-{stamp}.csv"'
        return response

    @admin.action(description="Export selected suppressions as CSV")
    def export_csv(self, request, queryset):
        return self._csv_response(queryset)

    def export_all_view(self, request):
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        return self._csv_response(Suppression.objects.order_by("email"))

    def import_view(self, request):
        if not self.has_add_permission(request):
            return HttpResponse(status=403)
        form = SuppressionImportForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            upload = form.cleaned_data["file"]
            try:
                report = suppressions.import_csv(
                    upload.read(), source=f"import:{request.user.get_username()}"
                )
            except ImportFileError as exc:
                form.add_error("file", str(exc))
            else:
                self.message_user(
                    request,
                    f"{report.created} suppressions added, {report.existing} already present, "
                    f"{len(report.rejected)} rows rejected.",
                    messages.SUCCESS if not report.rejected else messages.WARNING,
                )
                for line, reason in report.rejected[:50]:
                    self.message_user(request, f"Row {line}: {reason}", messages.WARNING)
                return redirect(reverse("admin:mailer_suppression_changelist"))
        context = {
            **self.admin_site.each_context(request),
            "title": "Import suppressions",
            "form": form,
            "opts": self.model._meta,
        }
        return render(request, "admin/mailer/suppression/import.html", context)


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ("timestamp", "event_type", "recipient", "bounce", "automated", "message")
    list_filter = (
        "event_type",
        "bounce",
        "automated",
        ("timestamp", admin.DateFieldListFilter),
    )
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


@admin.register(Link)
class LinkAdmin(admin.ModelAdmin):
    list_display = ("id", "url", "created_at")
    search_fields = ("url",)
    readonly_fields = ("url", "url_hash", "created_at")

    def has_add_permission(self, request) -> bool:
        return False
