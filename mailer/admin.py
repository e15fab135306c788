"""The operators' and marketers' window: messages, templates, contacts, suppressions."""

from __future__ import annotations

import csv
import io
import json

import redis
from django import forms
from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse, HttpResponseNotAllowed, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import ngettext

from . import (
    abtest,
    campaigns,
    compose,
    conf,
    contacts,
    outbox,
    quota,
    redact,
    rendering,
    reports,
    reputation,
    segments,
    suppressions,
    throttle,
)
from .exceptions import ImportFileError, MailerError
from .models import (
    Campaign,
    CampaignStatus,
    CampaignTransition,
    Contact,
    Event,
    Link,
    Message,
    Queue,
    QueueThrottle,
    ReputationPause,
    Segment,
    SegmentRule,
    Suppression,
    Tag,
    Template,
    Variant,
    WarmupSchedule,
)


class _Echo:
    """A file-like sink for csv.writer that hands each row back (streaming CSV)."""

    def write(self, value: str) -> str:
        return value


def stream_csv(rows, filename: str) -> StreamingHttpResponse:
    writer = csv.writer(_Echo())
    response = StreamingHttpResponse(
        (writer.writerow(row) for row in rows), content_type="text/csv; charset=utf-8"
    )
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


class CSVImportForm(forms.Form):
    file = forms.FileField()


class ContactImportForm(CSVImportForm):
    file = forms.FileField(
        widget=forms.ClearableFileInput(attrs={"accept": ".csv,text/csv"}),
        help_text="UTF-8 CSV. Rows stream through in batches; a file that cannot be read "
        "imports nothing.",
    )


#: Preview width: an email is laid out for 600 px, plus the preview's scrollbar.
PREVIEW_WIDTH = 680


def _iframe(html: str, height: int = 640) -> str:
    # srcdoc in a sandbox with no permissions: no scripts, no same-origin access. At an
    # email's own width, never squeezed by the form around it (a narrow one scrolls).
    return format_html(
        '<div class="mailer-preview" style="max-width:100%;overflow-x:auto">'
        '<iframe sandbox="" class="mailer-preview-frame" referrerpolicy="no-referrer" '
        'srcdoc="{}" style="display:block;width:{}px;height:{}px;border:1px solid #ccc;'
        'background:#fff"></iframe></div>',
        html,
        PREVIEW_WIDTH,
        height,
    )


def _json_block(value) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)
    return format_html('<pre style="white-space:pre-wrap;margin:0">{}</pre>', text)


class ReadOnlyRecord:
    """An admin whose records may be read-only (a message, a sent campaign): their page
    shows no Save buttons, as there is nothing to save."""

    def is_read_only(self, obj) -> bool:
        return True

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None and self.is_read_only(obj):
            context.update(
                show_save=False, show_save_and_continue=False, show_save_and_add_another=False
            )
        return super().render_change_form(request, context, add, change, form_url, obj)


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
class MessageAdmin(ReadOnlyRecord, admin.ModelAdmin):
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
        "context_masked",
        "metadata_masked",
        "idempotency_key",
        "attempts",
        "last_error",
        "provider_message_id",
        "send_after",
        "created_at",
        "queued_at",
        "claimed_at",
        "sent_at",
        "delivered_at",
        "opened_at",
        "clicked_at",
        "bounced_at",
        "complained_at",
        "updated_at",
        "preview",
    )
    fieldsets = (
        (None, {"fields": ("uuid", "kind", "status", "to_email", "contact", "subject")}),
        (
            "Template",
            {
                "fields": (
                    "template_slug",
                    "language",
                    "template",
                    "context_masked",
                    "metadata_masked",
                )
            },
        ),
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
        (
            "First events (people, not scanners)",
            {"fields": ("delivered_at", "opened_at", "clicked_at", "bounced_at", "complained_at")},
        ),
        ("Preview", {"fields": ("preview",)}),
    )

    def has_add_permission(self, request) -> bool:
        return False  # messages come from mailer.api and campaigns, not by hand

    # Context and metadata as stored, secrets masked: a live reset link is a login.
    @admin.display(description="Context")
    def context_masked(self, obj: Message) -> str:
        return _json_block(redact.masked(obj.context or {}))

    @admin.display(description="Metadata")
    def metadata_masked(self, obj: Message) -> str:
        return _json_block(redact.masked(obj.metadata or {}))

    @admin.display(description="Rendered email")
    def preview(self, obj: Message) -> str:
        try:
            source = rendering.find_template(obj.template_slug, obj.language)
            context = redact.masked(compose.message_context(obj))
            rendered = rendering.compiled(source).render(context)
            subject = rendered.subject
            if obj.variant is not None and obj.variant.subject:  # as compose sends it
                subject = rendering.subject_template(obj.variant.subject).render_subject(context)
        except MailerError as exc:
            return format_html("<em>Cannot render this message: {}</em>", exc)
        return format_html(
            "<p><strong>Subject:</strong> {}</p>{}<details><summary>Text part</summary>"
            "<pre style='white-space:pre-wrap'>{}</pre></details>",
            subject,
            _iframe(rendered.html),
            rendered.text,
        )

    @admin.action(description="Retry selected failed or cancelled messages", permissions=["change"])
    def retry_messages(self, request, queryset) -> None:
        count = outbox.requeue(queryset)
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


class TemplateForm(forms.ModelForm):
    """Shows a template error on its field; the pre_save receiver refuses it anyway."""

    class Meta:
        model = Template
        fields = (
            "slug", "language", "purpose", "description", "subject", "html", "text", "variables",
        )  # fmt: skip

    def _post_clean(self) -> None:
        super()._post_clean()
        try:
            rendering.validate_template(self.instance)
        except MailerError as exc:
            self.add_error(getattr(exc, "field", None), str(exc))


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    form = TemplateForm
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
    list_filter = ("consent", "language", "tags")
    search_fields = ("email", "name")
    raw_id_fields = ("user",)
    filter_horizontal = ("tags",)
    readonly_fields = ("created_at", "updated_at")
    show_full_result_count = False
    actions = ("export_selected",)
    change_list_template = "admin/mailer/contact/change_list.html"

    def get_urls(self):
        return [
            path(
                "import/",
                self.admin_site.admin_view(self.import_view),
                name="mailer_contact_import",
            ),
            path(
                "export/",
                self.admin_site.admin_view(self.export_view),
                name="mailer_contact_export",
            ),
        ] + super().get_urls()

    @admin.action(description="Export selected contacts as CSV", permissions=["view"])
    def export_selected(self, request, queryset):
        return stream_csv(contacts.export_rows(queryset), "contacts.csv")

    def export_view(self, request):
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        stamp = timezone.now().strftime("%Y%m%d-%H%M")
        return stream_csv(contacts.export_rows(Contact.objects.all()), f"contacts-{stamp}.csv")

    def has_import_permission(self, request) -> bool:
        """An import adds contacts and updates existing ones (their consent too)."""
        return self.has_add_permission(request) and self.has_change_permission(request)

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "can_import": self.has_import_permission(request)}
        return super().changelist_view(request, extra_context)

    def import_view(self, request):
        if not self.has_import_permission(request):
            return HttpResponse(status=403)
        form = ContactImportForm(request.POST or None, request.FILES or None)
        report = None
        if request.method == "POST" and form.is_valid():
            upload = form.cleaned_data["file"]
            dry_run = "_dry_run" in request.POST
            try:
                report = contacts.import_csv(
                    upload.file,
                    source=f"admin import of {upload.name} by {request.user.get_username()}",
                    dry_run=dry_run,
                )
            except ImportFileError as exc:
                form.add_error("file", f"Nothing was imported: {exc}")
            else:
                summary = (
                    f"{report.rows} rows: {report.created} contacts created, "
                    f"{report.updated} updated, {report.duplicates} duplicates merged, "
                    f"{len(report.rejected)} rejected."
                )
                if dry_run:
                    summary = f"Dry run, nothing was imported. {summary}"
                level = messages.WARNING if report.rejected or dry_run else messages.SUCCESS
                self.message_user(request, summary, level)
                form = ContactImportForm()  # a dry run's file is chosen again to import it
        context = {
            **self.admin_site.each_context(request),
            "title": "Import contacts",
            "form": form,
            "opts": self.model._meta,
            "report": report,
            "dry_run_button": True,
            "help": "CSV with a header row: email (required), name, language, timezone, tags "
            "(;-separated), consent (granted/withdrawn/yes/no), consent_source. Any other column "
            "becomes an attribute. Existing contacts are updated; the same address in any case "
            "is one contact. A dry run shows what the import would do and stores nothing.",
        }
        return render(request, "admin/mailer/import.html", context)


@admin.register(Tag)
class TagAdmin(admin.ModelAdmin):
    search_fields = ("name",)


class SegmentRuleForm(forms.ModelForm):
    class Meta:
        model = SegmentRule
        fields = ("field", "attribute", "operator", "value")
        # Sized for one row of the rules table beside the form's labels at 1400 px.
        widgets = {
            "attribute": forms.TextInput(attrs={"size": 14}),
            "value": forms.TextInput(attrs={"size": 24}),
        }

    def _post_clean(self) -> None:
        super()._post_clean()
        if self.cleaned_data.get("DELETE"):
            return
        try:
            segments.validate_rule(self.instance)
        except MailerError as exc:
            self.add_error(getattr(exc, "field", None), str(exc))


class SegmentRuleInline(admin.TabularInline):
    model = SegmentRule
    form = SegmentRuleForm
    extra = 1
    fields = ("field", "attribute", "operator", "value")


class SegmentForm(forms.ModelForm):
    """Refuses a segment that would include or exclude itself, directly or through
    others, before anything is saved."""

    class Meta:
        model = Segment
        fields = ("name", "description", "match", "include_segments", "exclude_segments")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:  # itself is never offered; a longer loop is refused in clean
            for name in ("include_segments", "exclude_segments"):
                if name in self.fields:
                    field = self.fields[name]
                    field.queryset = field.queryset.exclude(pk=self.instance.pk)

    def clean(self) -> dict:
        cleaned = super().clean()
        try:
            segments.check_no_cycle(
                self.instance,
                include=cleaned.get("include_segments") or (),
                exclude=cleaned.get("exclude_segments") or (),
            )
        except MailerError as exc:
            self.add_error(getattr(exc, "field", None), str(exc))
        return cleaned


@admin.register(Segment)
class SegmentAdmin(admin.ModelAdmin):
    form = SegmentForm
    list_display = ("name", "match", "updated_at")
    search_fields = ("name", "description")
    filter_horizontal = ("include_segments", "exclude_segments")
    inlines = (SegmentRuleInline,)
    readonly_fields = ("live_count",)
    fields = ("name", "description", "match", "include_segments", "exclude_segments", "live_count")

    @admin.display(description="Contacts now")
    def live_count(self, obj: Segment) -> str:
        if not obj.pk:
            return "Save to see how many contacts match."
        try:
            return f"{segments.count(obj):,}"
        except MailerError as exc:
            return f"Cannot evaluate: {exc}"


class VariantForm(forms.ModelForm):
    """A variant's subject is a template of its own: checked as a template's subject is."""

    class Meta:
        model = Variant
        fields = ("label", "subject", "from_name", "template")
        # Sized for one row of the variants table beside the form's labels at 1400 px.
        widgets = {
            "label": forms.TextInput(attrs={"size": 2}),
            "subject": forms.TextInput(attrs={"size": 32}),
            "from_name": forms.TextInput(attrs={"size": 18}),
        }

    def _post_clean(self) -> None:
        super()._post_clean()
        subject = self.cleaned_data.get("subject")
        if not subject or "subject" in self.errors:
            return
        campaign = self.instance.campaign if self.instance.campaign_id else None
        template = self.cleaned_data.get("template") or getattr(campaign, "template", None)
        try:
            rendering.validate_subject(subject, template)
        except MailerError as exc:
            self.add_error("subject", str(exc))


class VariantInline(admin.TabularInline):
    model = Variant
    form = VariantForm
    extra = 0
    max_num = 5
    fields = ("label", "subject", "from_name", "template")

    # Variants are fixed once a campaign leaves draft/scheduled/paused: the test is running.
    def _editable(self, obj) -> bool:
        return obj is None or obj.status in EDITABLE

    def has_add_permission(self, request, obj=None) -> bool:
        return self._editable(obj) and super().has_add_permission(request, obj)

    def has_change_permission(self, request, obj=None) -> bool:
        return self._editable(obj) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        return self._editable(obj) and super().has_delete_permission(request, obj)


class TransitionInline(admin.TabularInline):
    model = CampaignTransition
    extra = 0
    can_delete = False
    fields = ("at", "from_status", "to_status", "by", "note")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


class CampaignForm(forms.ModelForm):
    class Meta:
        model = Campaign
        fields = (
            "name",
            "template",
            "segments",
            "exclude_segments",
            "from_name",
            "from_email",
            "reply_to",
            "send_at",
            "send_in_local_time",
            "test_share",
            "winner_metric",
            "test_window",
            "tie_rule",
        )

    def clean_send_at(self):
        send_at = self.cleaned_data.get("send_at")
        if send_at and send_at <= timezone.now() and self.instance.status in ("draft", "scheduled"):
            raise forms.ValidationError("The send time is in the past.")
        return send_at


EDITABLE = ("draft", "scheduled", "paused")
#: Campaigns with mail on the way (or held): cancelled first, then deleted.
UNDELETABLE = ("testing", "waiting", "sending", "paused")
# The permission each campaign action needs: a copy adds a campaign, the rest change one
# (a test email, a launch, a pause). A view-only user is offered none of them.
ACTION_PERMISSIONS = {"duplicate": "add"}
ACTIONS = {
    "send_test": "Send a test to me",
    "schedule": "Schedule",
    "send_now": "Send now",
    "unschedule": "Back to draft",
    "pause": "Pause",
    "resume": "Resume",
    "cancel": "Cancel",
    "duplicate": "Duplicate",
}
#: Actions that cannot be undone: a page first shows what they will do (the audience, the
#: unsent messages) and asks; one click never sends or cancels a campaign.
IRREVERSIBLE = ("send_now", "cancel")


class CampaignChangeList(ChangeList):
    """The campaign list, with each row's sent, open and click figures from one
    aggregate over the page's campaigns (``reports.summaries``)."""

    def get_results(self, request) -> None:
        super().get_results(request)
        stats = reports.summaries([c.pk for c in self.result_list])
        for campaign in self.result_list:
            campaign.list_stats = stats.get(campaign.pk, {})


@admin.register(Campaign)
class CampaignAdmin(ReadOnlyRecord, admin.ModelAdmin):
    form = CampaignForm
    list_display = (
        "name",
        "status",
        "send_at",
        "recipients",
        "sent_count",
        "open_rate",
        "click_rate",
        "finished_at",
    )
    list_filter = ("status",)
    search_fields = ("name",)
    filter_horizontal = ("segments", "exclude_segments")
    inlines = (VariantInline, TransitionInline)
    readonly_fields = (
        "status",
        "audience",
        "recipients",
        "launched_at",
        "finished_at",
        "test_ends_at",
        "winner",
        "paused_reason",
        "report",
        "report_read_only",
    )
    fieldsets = (
        (
            None,
            {"fields": ("name", "status", "template", "segments", "exclude_segments", "audience")},
        ),
        ("Sender", {"fields": ("from_name", "from_email", "reply_to")}),
        ("When", {"fields": ("send_at", "send_in_local_time")}),
        (
            "A/B test",
            {
                "fields": (
                    "test_share",
                    "winner_metric",
                    "test_window",
                    "tie_rule",
                    "test_ends_at",
                    "winner",
                )
            },
        ),
        (
            "Report",
            {"fields": ("report", "recipients", "launched_at", "finished_at", "paused_reason")},
        ),
    )
    actions = (
        "send_test_action",
        "send_now_action",
        "pause_action",
        "resume_action",
        "cancel_action",
        "duplicate_action",
    )
    change_form_template = "admin/mailer/campaign/change_form.html"

    def is_read_only(self, obj: Campaign) -> bool:
        return obj.status not in EDITABLE  # on its way, or done: nothing here changes it

    def get_changelist(self, request, **kwargs):
        return CampaignChangeList

    @admin.display(description="sent")
    def sent_count(self, obj: Campaign) -> str:
        stats = getattr(obj, "list_stats", None) or {}
        return f"{stats['sent']:,}" if stats else "—"

    @admin.display(description="open rate")
    def open_rate(self, obj: Campaign) -> str:
        rate = (getattr(obj, "list_stats", None) or {}).get("open_rate")
        return "—" if rate is None else f"{rate}%"

    @admin.display(description="click rate")
    def click_rate(self, obj: Campaign) -> str:
        rate = (getattr(obj, "list_stats", None) or {}).get("click_rate")
        return "—" if rate is None else f"{rate}%"

    @admin.display(description="Audience")
    def audience(self, obj: Campaign) -> str:
        if obj.pk is None:
            return "Save the campaign to see its audience."
        if obj.status not in (CampaignStatus.DRAFT, CampaignStatus.SCHEDULED):
            return f"{obj.recipients:,} recipients at launch"
        try:
            size = campaigns.estimated_audience(obj)
        except MailerError as exc:
            return f"Cannot evaluate the segments: {exc}"
        if size is None:
            return "Choose a segment to see the audience."
        return format_html(
            '<span data-audience="{}">~{} contacts now</span> (in the segments, with consent, '
            "not suppressed; counted again at launch)",
            size,
            f"{size:,}",
        )

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and obj.status not in EDITABLE:
            fields += [
                "name",
                "template",
                "segments",
                "exclude_segments",
                "from_name",
                "from_email",
                "reply_to",
                "send_at",
                "test_share",
                "winner_metric",
                "test_window",
                "tie_rule",
            ]
        return fields

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if self.has_change_permission(request, obj):
            return fieldsets
        # Without change permission the report offers no "Pick as winner" buttons.
        return [
            (name, {**options, "fields": [_read_only(f) for f in options["fields"]]})
            for name, options in fieldsets
        ]

    def get_urls(self):
        return [
            path(
                "<int:pk>/do/<str:action>/",
                self.admin_site.admin_view(self.do_view),
                name="mailer_campaign_do",
            ),
            path(
                "<int:pk>/winner/<int:variant>/",
                self.admin_site.admin_view(self.winner_view),
                name="mailer_campaign_winner",
            ),
            path(
                "<int:pk>/report.csv",
                self.admin_site.admin_view(self.report_csv_view),
                name="mailer_campaign_report_csv",
            ),
        ] + super().get_urls()

    def change_view(self, request, object_id, form_url="", extra_context=None):
        allowed = {action: label for action, label in ACTIONS.items() if self.may(request, action)}
        extra_context = {**(extra_context or {}), "campaign_actions": allowed}
        return super().change_view(request, object_id, form_url, extra_context)

    def has_delete_permission(self, request, obj=None) -> bool:
        # A campaign sending (or paused, or mid A/B test) has messages on the way and a
        # history its report reads: cancel it first; drafts and finished ones may go.
        if obj is not None and obj.status in UNDELETABLE:
            return False
        return super().has_delete_permission(request, obj)

    def delete_queryset(self, request, queryset) -> None:
        blocked = queryset.filter(status__in=UNDELETABLE)
        if blocked.exists():
            raise PermissionDenied("Cancel a campaign before deleting it.")
        super().delete_queryset(request, queryset)

    def may(self, request, action: str, campaign: Campaign | None = None) -> bool:
        """Whether the user holds the permission ``action`` needs (ACTION_PERMISSIONS)."""
        if ACTION_PERMISSIONS.get(action) == "add":
            return self.has_add_permission(request) and self.has_view_permission(request, campaign)
        return self.has_change_permission(request, campaign)

    @admin.display(description="Report")
    def report(self, obj: Campaign, *, can_change: bool = True) -> str:
        if not obj.pk:
            return "—"
        figures = reports.report(obj)
        return render_to_string(
            "admin/mailer/campaign/report.html",
            {
                "campaign": obj,
                "r": figures,
                "chart": chart(figures["timeline"], figures["bucket"]),
                "can_change": can_change,
            },
        )

    @admin.display(description="Report")
    def report_read_only(self, obj: Campaign) -> str:
        return self.report(obj, can_change=False)

    def _run(self, request, campaign: Campaign, action: str) -> None:
        # Checked here, not only by the callers: every door to an action passes this way.
        if action in ACTIONS and not self.may(request, action, campaign):
            raise PermissionDenied
        user = request.user
        if action == "send_test":
            if not user.email:
                raise MailerError("Your admin account has no email address to send the test to.")
            sent = campaigns.send_test(campaign, user.email, by=user)
            self.message_user(request, f"{len(sent)} test email(s) on their way to {user.email}.")
        elif action == "schedule":
            if campaign.send_at is None:
                raise MailerError("Set a send time first (or use Send now).")
            campaigns.schedule(campaign, campaign.send_at, by=user)
            self.message_user(
                request, f"“{campaign}” scheduled for {campaign.send_at:%Y-%m-%d %H:%M %Z}."
            )
        elif action == "send_now":
            campaigns.send_now(campaign, by=user)
            self.message_user(request, f"“{campaign}” is being sent.")
        elif action == "unschedule":
            campaigns.unschedule(campaign, by=user)
            self.message_user(request, f"“{campaign}” is a draft again.")
        elif action == "pause":
            campaigns.pause(campaign, by=user, reason=f"paused by {user.get_username()}")
            self.message_user(request, f"“{campaign}” paused; workers stop within seconds.")
        elif action == "resume":
            campaigns.resume(campaign, by=user)
            self.message_user(request, f"“{campaign}” resumed.")
        elif action == "cancel":
            count = campaigns.cancel(campaign, by=user)
            self.message_user(
                request, f"“{campaign}” cancelled; {count} unsent messages cancelled."
            )
        elif action == "duplicate":
            copy = campaigns.duplicate(campaign, by=user)
            self.message_user(
                request,
                format_html(
                    'Duplicated as <a href="{}">{}</a>.',
                    reverse("admin:mailer_campaign_change", args=[copy.pk]),
                    copy,
                ),
            )
        else:
            raise MailerError(f"Unknown action {action!r}.")

    def do_view(self, request, pk: int, action: str):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        campaign = get_object_or_404(Campaign, pk=pk)
        if not self.may(request, action, campaign):
            return HttpResponse(status=403)
        if action in IRREVERSIBLE and request.POST.get("confirm") != "yes":
            return self.confirmation(request, [campaign], action)
        try:
            self._run(request, campaign, action)
        except MailerError as exc:
            self.message_user(request, str(exc), messages.ERROR)
        return redirect(reverse("admin:mailer_campaign_change", args=[pk]))

    def winner_view(self, request, pk: int, variant: int):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        campaign = get_object_or_404(Campaign, pk=pk)
        if not self.has_change_permission(request, campaign):
            return HttpResponse(status=403)
        try:
            chosen = abtest.choose_winner(
                campaign, get_object_or_404(Variant, pk=variant), by=request.user
            )
        except MailerError as exc:
            self.message_user(request, str(exc), messages.ERROR)
        else:
            self.message_user(request, f"Variant {chosen.label} wins; sending it to the rest.")
        return redirect(reverse("admin:mailer_campaign_change", args=[pk]))

    def report_csv_view(self, request, pk: int):
        campaign = get_object_or_404(Campaign, pk=pk)
        if not self.has_view_permission(request, campaign):
            return HttpResponse(status=403)
        return stream_csv(
            report_rows(campaign, reports.report(campaign)), f"campaign-{pk}-report.csv"
        )

    def confirmation(self, request, chosen: list[Campaign], action: str, *, bulk: bool = False):
        """The page between a click on Send now or Cancel and its effect: what it will
        do to each campaign (its audience, or why it cannot be sent; its unsent mail)."""
        rows = []
        for campaign in chosen:
            row = {"campaign": campaign, "size": None, "error": "", "unsent": None}
            if action == "send_now":
                try:
                    row["size"] = campaigns.check_ready(campaign)
                except MailerError as exc:
                    row["error"] = str(exc)
                if campaign.status not in (CampaignStatus.DRAFT, CampaignStatus.SCHEDULED):
                    row["error"] = f"It is {campaign.get_status_display().lower()}."
            else:
                row["unsent"] = campaigns.unsent(campaign)
                if campaign.status in (CampaignStatus.SENT, CampaignStatus.CANCELLED):
                    row["error"] = f"It is already {campaign.get_status_display().lower()}."
            count = row["size"] if action == "send_now" else row["unsent"]
            row["count"] = "" if count is None else f"{count:,}"
            rows.append(row)
        ready = [row for row in rows if not row["error"]]
        context = {
            **self.admin_site.each_context(request),
            "title": f"{ACTIONS[action]}: are you sure?",
            "opts": self.opts,
            "action": action,
            "label": ACTIONS[action],
            "rows": rows,
            "ready": ready,
            "total": f"{sum(row['size'] or 0 for row in ready):,}",
            "bulk": bulk,
            "back": reverse("admin:mailer_campaign_changelist")
            if bulk
            else reverse("admin:mailer_campaign_change", args=[chosen[0].pk]),
        }
        return TemplateResponse(request, "admin/mailer/campaign/confirm.html", context)

    def _bulk(self, request, queryset, action: str) -> None:
        for campaign in queryset:
            try:
                self._run(request, campaign, action)
            except MailerError as exc:
                self.message_user(request, f"“{campaign}”: {exc}", messages.ERROR)

    @admin.action(description="Send a test of selected campaigns to me", permissions=["change"])
    def send_test_action(self, request, queryset):
        self._bulk(request, queryset, "send_test")

    @admin.action(description="Send selected campaigns now", permissions=["change"])
    def send_now_action(self, request, queryset):
        if request.POST.get("confirm") != "yes":
            return self.confirmation(request, list(queryset), "send_now", bulk=True)
        self._bulk(request, queryset, "send_now")

    @admin.action(description="Pause selected campaigns", permissions=["change"])
    def pause_action(self, request, queryset):
        self._bulk(request, queryset, "pause")

    @admin.action(description="Resume selected campaigns", permissions=["change"])
    def resume_action(self, request, queryset):
        self._bulk(request, queryset, "resume")

    @admin.action(description="Cancel selected campaigns", permissions=["change"])
    def cancel_action(self, request, queryset):
        if request.POST.get("confirm") != "yes":
            return self.confirmation(request, list(queryset), "cancel", bulk=True)
        self._bulk(request, queryset, "cancel")

    @admin.action(description="Duplicate selected campaigns", permissions=["add"])
    def duplicate_action(self, request, queryset):
        self._bulk(request, queryset, "duplicate")


def _read_only(field: str) -> str:
    return "report_read_only" if field == "report" else field


def report_rows(campaign: Campaign, r: dict):
    """The report as CSV rows, every text cell formula-safe."""
    safe = contacts.csv_safe
    yield ["campaign", safe(campaign.name)]
    yield ["status", campaign.status]
    if r.get("quota_wait"):
        yield ["waiting", safe(r["quota_wait"])]
    yield []
    yield ["figure", "count", "rate %"]
    for key in (
        "recipients",
        "sent",
        "delivered",
        "opened",
        "clicked",
        "bounced",
        "complained",
        "unsubscribed",
        "failed",
        "suppressed",
        "cancelled",
        "pending",
    ):
        if key in ("delivered", "bounced", "complained") and not r["delivery_reported"]:
            yield [key, "", "not reported"]  # SMTP gives no delivery events: not a 0
            continue
        yield [key, r[key], r["rates"].get(key, "")]
    if r["variants"]:
        yield []
        yield [
            "variant",
            "subject",
            "sent",
            "opened",
            "clicked",
            "open rate %",
            "click rate %",
            "winner",
        ]
        for v in r["variants"]:
            yield [
                v["label"],
                safe(v["subject"]),
                v["sent"],
                v["opened"],
                v["clicked"],
                v["open_rate"],
                v["click_rate"],
                "yes" if v["winner"] else "",
            ]
    yield []
    yield ["bucket", r["bucket"].label]
    yield ["start", "opens", "clicks"]
    for point in r["timeline"]:
        yield [point["start"].isoformat(), point["opens"], point["clicks"]]
    yield []
    yield ["link", "unique clicks"]
    for link in r["top_links"]:
        yield [safe(link["link__url"]), link["clicks"]]


def _nice_top(value: int) -> int:
    """The smallest 1, 2 or 5 × 10ⁿ at or above ``value`` (at least 4), for even ticks."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= max(value, 4):
                return step * factor
        step *= 10


def chart(
    timeline: list[dict], bucket: reports.Bucket, width: int = 720, height: int = 260
) -> dict:
    """Geometry of the inline SVG of opens and clicks per bucket (no scripts, no CDN):
    bars, a y axis with even ticks, time labels on the x axis, axis titles and a legend."""
    left, right, top, bottom = 52, 12, 30, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    base = {
        "width": width,
        "height": height,
        "left": left,
        "top": top,
        "right_x": width - right,
        "bottom_y": top + plot_h,
        "bucket": bucket.label,
        "timezone": timezone.get_current_timezone_name(),
    }
    if not timeline:
        return {**base, "bars": [], "max": 0, "labels": [], "ticks": []}
    peak = max(max(p["opens"], p["clicks"]) for p in timeline)
    scale = _nice_top(peak)
    slot = plot_w / len(timeline)
    bar = max(1.0, slot * 0.8 / 2)
    bars, labels = [], []
    one_day = timeline[0]["start"].date() == timeline[-1]["start"].date()
    if bucket.seconds >= 86400:
        fmt = "%d %b"
    elif one_day:
        fmt = "%H:%M"
    else:
        fmt = "%d %b %H:%M"
    # Time labels as many as fit side by side (about 6 px a character at 10 px), each
    # centred on its bar and left out where it would run past the chart's edge.
    label_w = len(timeline[0]["start"].strftime(fmt)) * 6 + 12
    every = max(1, -(-len(timeline) * label_w // plot_w))
    for i, point in enumerate(timeline):
        x = left + i * slot + slot * 0.1
        for j, key in enumerate(("opens", "clicks")):
            h = plot_h * point[key] / scale
            bars.append(
                {
                    "x": round(x + j * bar, 1),
                    "y": round(top + plot_h - h, 1),
                    "w": round(bar, 1),
                    "h": round(h, 1),
                    "kind": key,
                    "value": point[key],
                    "start": point["start"],
                }
            )
        centre = left + (i + 0.5) * slot
        if i % every == 0 and label_w / 2 <= centre <= width - label_w / 2:
            labels.append({"x": round(centre, 1), "text": point["start"].strftime(fmt)})
    ticks = [
        {"y": round(top + plot_h - plot_h * k / 4, 1), "value": f"{scale * k // 4:,}"}
        for k in range(5)
    ]
    return {**base, "bars": bars, "max": peak, "labels": labels, "ticks": ticks}


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

    @admin.action(description="Export selected suppressions as CSV", permissions=["view"])
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
        return render(request, "admin/mailer/import.html", context)


@admin.register(Event)
class EventAdmin(ReadOnlyRecord, admin.ModelAdmin):
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
class LinkAdmin(ReadOnlyRecord, admin.ModelAdmin):
    list_display = ("id", "url", "created_at")
    search_fields = ("url",)
    readonly_fields = ("url", "url_hash", "created_at")

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(QueueThrottle)
class QueueThrottleAdmin(admin.ModelAdmin):
    """A queue the server asked to slow down: how fast it sends now, and why."""

    list_display = ("queue", "speed_now", "connections_now", "rate_now", "reason", "since")
    readonly_fields = ("queue", "factor", "reason", "since", "signalled_at", "speed_now")
    actions = ("back_to_full_speed",)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # set by the servers' replies; the action below resets it

    def _speed(self, row: QueueThrottle) -> throttle.Speed:
        return throttle.speed_of(row)  # the row in hand: no query per column

    @admin.display(description="speed now")
    def speed_now(self, row: QueueThrottle) -> str:
        speed = self._speed(row)
        return "full" if not speed.throttled else f"{round(speed.factor * 100)}%"

    @admin.display(description="connections per process")
    def connections_now(self, row: QueueThrottle) -> str:
        configured = conf.connections(row.queue)
        return f"{self._speed(row).connections(configured)} of {configured}"

    @admin.display(description="rate limit now")
    def rate_now(self, row: QueueThrottle) -> str:
        configured = conf.rate_limit(row.queue)
        if configured is None:
            return "none"
        return f"{self._speed(row).rate(configured):g}/s of {configured:g}/s"

    @admin.action(description="Back to full speed", permissions=("reset",))
    def back_to_full_speed(self, request, queryset):
        for row in queryset:
            throttle.reset(row.queue)
        self.message_user(request, f"{queryset.count()} queue(s) back to full speed.")

    def has_reset_permission(self, request) -> bool:
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")


@admin.register(ReputationPause)
class ReputationPauseAdmin(ReadOnlyRecord, admin.ModelAdmin):
    list_display = ("created_at", "active", "reason", "lifted_at", "lifted_by")
    list_filter = ("active",)
    readonly_fields = ("reason", "rates", "created_at", "active", "lifted_at", "lifted_by")
    actions = ("lift",)

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(
        description="Lift the selected pauses (campaigns stay paused until resumed)",
        permissions=["change"],
    )
    def lift(self, request, queryset):
        count = 0
        for row in queryset.filter(active=True):
            reputation.lift_reputation_pause(row, by=request.user)
            count += 1
        self.message_user(request, ngettext("%d pause lifted.", "%d pauses lifted.", count) % count)


@admin.register(WarmupSchedule)
class WarmupScheduleAdmin(admin.ModelAdmin):
    """Warm-up schedules, edited by ops without a deploy, with today's allowance and use;
    the list also shows every queue's quotas from the settings with their use."""

    list_display = (
        "name",
        "active",
        "start_date",
        "first_day_cap",
        "growth_factor",
        "every_days",
        "target_cap",
        "todays_allowance",
        "todays_use",
    )
    list_filter = ("active",)
    search_fields = ("name",)
    readonly_fields = ("todays_allowance", "todays_use", "created_at", "updated_at")
    change_list_template = "admin/mailer/warmupschedule/change_list.html"

    @admin.display(description="Today's allowance")
    def todays_allowance(self, obj: WarmupSchedule) -> str:
        if not obj.pk or not obj.start_date:
            return "—"
        return f"{quota.warmup_allowance(obj, quota.local_today()):,}"

    @admin.display(description="Today's use (campaign queue)")
    def todays_use(self, obj: WarmupSchedule) -> str:
        day = [u for u in _quota_usage(Queue.CAMPAIGN) if u.window.kind == quota.DAY]
        return f"{day[0].used:,}" if day else "—"

    def changelist_view(self, request, extra_context=None):
        rows = [(queue, usage) for queue in Queue for usage in _quota_usage(queue)]
        extra_context = {**(extra_context or {}), "quota_rows": rows}
        return super().changelist_view(request, extra_context)


def _quota_usage(queue: Queue) -> list[quota.Usage]:
    """The queue's capped windows now, or none when the quota store cannot be read."""
    try:
        return quota.usage(queue)
    except redis.RedisError:
        return []


# The HTTP API's keys and the outgoing webhooks have their own module.
from . import admin_http  # noqa: E402, F401

# isort: split
# Drip series, enrollments, and the enrollments block on a contact's page.
from . import admin_drips  # noqa: E402, F401
