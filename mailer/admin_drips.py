"""Admin for drip series: the series with its steps inline, read top to bottom with each
step's funnel; the enrollments list; each contact's enrollments (imported by mailer.admin)."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, Q
from django.utils.html import format_html, format_html_join
from django.utils.translation import ngettext

from . import drips, localtime
from .admin import ContactAdmin
from .exceptions import DripError
from .models import DripSeries, DripStep, Enrollment, ExitReason


class DripStepForm(forms.ModelForm):
    class Meta:
        model = DripStep
        fields = (
            "position",
            "kind",
            "name",
            "template",
            "delay",
            "delay_from",
            "condition",
            "condition_window",
            "condition_segment",
            "if_yes",
            "yes_step",
            "if_no",
            "no_step",
            "window_days",
            "window_start",
            "window_end",
        )


class DripStepInline(admin.StackedInline):
    """The steps in order; a decision may jump only to a later step of the same series."""

    model = DripStep
    form = DripStepForm
    fk_name = "series"
    extra = 0
    ordering = ("position",)
    fieldsets = (
        (None, {"fields": (("position", "kind", "name"),)}),
        ("Send", {"fields": ("template",)}),
        ("Wait", {"fields": (("delay", "delay_from"),)}),
        (
            "Decide",
            {
                "fields": (
                    ("condition", "condition_window", "condition_segment"),
                    ("if_yes", "yes_step"),
                    ("if_no", "no_step"),
                )
            },
        ),
        (
            "Send window (empty: the series')",
            {"fields": (("window_days", "window_start", "window_end"),)},
        ),
    )

    def get_formset(self, request, obj=None, **kwargs):
        formset = super().get_formset(request, obj, **kwargs)
        for name in ("yes_step", "no_step"):
            field = formset.form.base_fields[name]
            field.queryset = DripStep.objects.filter(series=obj) if obj else DripStep.objects.none()
        return formset


@admin.register(DripSeries)
class DripSeriesAdmin(admin.ModelAdmin):
    """A series, its entry, exits and windows, its steps, and how contacts go through."""

    inlines = [DripStepInline]
    list_display = ("name", "status", "trigger", "in_series", "completed", "updated_at")
    list_filter = ("status", "trigger")
    search_fields = ("name", "trigger_event")
    actions = ("activate", "pause", "archive")
    readonly_fields = ("status", "flow", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "description", "status")}),
        (
            "Entry",
            {
                "fields": (
                    "trigger",
                    "trigger_event",
                    "entry_segment",
                    "anniversary_attribute",
                    ("reentry", "reentry_cooldown"),
                    "requires_consent",
                )
            },
        ),
        ("Goal (contacts who reach it leave)", {"fields": ("goal_segment", "goal_event")}),
        (
            "Send window, in each contact's time zone",
            {"fields": ("timezone", ("window_days", "window_start", "window_end"))},
        ),
        ("Flow and funnel", {"fields": ("flow",)}),
    )

    def get_queryset(self, request):
        state = "enrollments__state"
        return (
            super()
            .get_queryset(request)
            .annotate(
                _active=Count("enrollments", filter=Q(**{state: Enrollment.State.ACTIVE})),
                _completed=Count("enrollments", filter=Q(**{state: Enrollment.State.COMPLETED})),
            )
        )

    @admin.display(description="In the series", ordering="_active")
    def in_series(self, obj: DripSeries) -> int:
        return obj._active

    @admin.display(description="Completed", ordering="_completed")
    def completed(self, obj: DripSeries) -> int:
        return obj._completed

    @admin.display(description="Steps, top to bottom")
    def flow(self, obj: DripSeries) -> str:
        if not obj.pk:
            return "Save the series to add steps."
        rows = drips.funnel(obj)
        if not rows:
            return "No steps yet."
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    row["step"].position,
                    _what(row["step"], obj),
                    row["entered"],
                    row["waiting"],
                    row["sent"] if row["step"].kind == DripStep.Kind.SEND else "",
                    row["opened"] if row["step"].kind == DripStep.Kind.SEND else "",
                    row["clicked"] if row["step"].kind == DripStep.Kind.SEND else "",
                    row["failed"] or "",
                    row["yes"] if row["step"].kind == DripStep.Kind.DECIDE else "",
                    row["no"] if row["step"].kind == DripStep.Kind.DECIDE else "",
                    ", ".join(
                        f"{ExitReason(reason).label}: {n}" for reason, n in row["exited"].items()
                    ),
                )
                for row in rows
            ),
        )
        return format_html(
            "<table><thead><tr><th>#</th><th>Step</th><th>Entered</th><th>Waiting</th>"
            "<th>Sent</th><th>Opened</th><th>Clicked</th><th>Failed</th><th>Yes</th>"
            "<th>No</th><th>Left here</th></tr></thead><tbody>{}</tbody></table>"
            "<p class='help'>Opens and clicks by people only (scanners and proxies left out). "
            "Left the series overall: {}.</p>",
            body,
            ", ".join(f"{ExitReason(r).label}: {n}" for r, n in drips.exits(obj).items()) or "—",
        )

    def _set_status(self, request, queryset, status: str, done: str) -> None:
        changed = 0
        for series in queryset:
            try:
                drips.set_status(series, status)
            except DripError as exc:
                self.message_user(request, f"{series}: {exc}", messages.ERROR)
            else:
                changed += 1
        self.message_user(
            request, ngettext("%d series %s.", "%d series %s.", changed) % (changed, done)
        )

    @admin.action(description="Activate selected series", permissions=["change"])
    def activate(self, request, queryset) -> None:
        self._set_status(request, queryset, DripSeries.Status.ACTIVE, "activated")

    @admin.action(
        description="Pause selected series (everyone holds where they are)",
        permissions=["change"],
    )
    def pause(self, request, queryset) -> None:
        self._set_status(request, queryset, DripSeries.Status.PAUSED, "paused")

    @admin.action(description="Archive selected series", permissions=["change"])
    def archive(self, request, queryset) -> None:
        self._set_status(request, queryset, DripSeries.Status.ARCHIVED, "archived")


def _what(step: DripStep, series: DripSeries) -> str:
    text = step.name or step.describe()
    if step.name:
        text += f" ({step.describe()})"
    if step.kind == DripStep.Kind.SEND:
        window = localtime.Window.of(step, series)
        if not window.always:
            days = "".join(str(d) for d in sorted(window.days)) if window.days else "every day"
            hours = f" {window.start:%H:%M}–{window.end:%H:%M}" if window.start else ""
            text += f" · window {days}{hours}"
    return text


@admin.register(Enrollment)
class EnrollmentAdmin(admin.ModelAdmin):
    """Who is in which series, where they stand, and why they left. Read-only: contacts
    move on their own; a marketer removes them or pauses a series."""

    list_display = (
        "contact",
        "series",
        "state",
        "step",
        "next_due_at",
        "exit_reason",
        "entered_at",
        "source",
    )
    list_filter = ("state", "exit_reason", "series")
    search_fields = ("contact__email",)
    list_select_related = ("contact", "series", "step")
    show_full_result_count = False
    actions = ("remove_contacts", "pause_series")
    readonly_fields = [f.name for f in Enrollment._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Remove from their series", permissions=["change"])
    def remove_contacts(self, request, queryset) -> None:
        removed = drips.remove(queryset, by=request.user)
        self.message_user(
            request,
            ngettext("%d contact removed.", "%d contacts removed.", removed) % removed,
        )

    @admin.action(description="Pause their series", permissions=["change"])
    def pause_series(self, request, queryset) -> None:
        if not request.user.has_perm("mailer.change_dripseries"):
            self.message_user(request, "You may not change drip series.", messages.ERROR)
            return
        paused = 0
        for series in DripSeries.objects.filter(pk__in=queryset.values("series")):
            drips.set_status(series, DripSeries.Status.PAUSED)
            paused += 1
        self.message_user(
            request, ngettext("%d series paused.", "%d series paused.", paused) % paused
        )


class EnrollmentInline(admin.TabularInline):
    """On a contact's page: their series and where they stand."""

    model = Enrollment
    fk_name = "contact"
    extra = 0
    can_delete = False
    show_change_link = True
    fields = ("series", "state", "step", "next_due_at", "note", "exit_reason", "entered_at")
    readonly_fields = fields
    ordering = ("-entered_at",)

    def has_add_permission(self, request, obj=None) -> bool:
        return False


ContactAdmin.inlines = [*ContactAdmin.inlines, EnrollmentInline]
