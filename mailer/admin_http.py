"""Admin for the HTTP API's keys and the outgoing webhooks (imported by mailer.admin)."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.utils.translation import ngettext

from . import apikeys, notify, webhooks_out
from .models import ApiKey, ApiScope, WebhookDelivery, WebhookEndpoint


class ApiKeyForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(
        choices=ApiScope.choices, widget=forms.CheckboxSelectMultiple, initial=[ApiScope.SEND]
    )

    class Meta:
        model = ApiKey
        fields = ("name", "scopes", "rate_limit", "expires_at")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are shown once, when created; afterwards only their prefix."""

    form = ApiKeyForm
    list_display = ("name", "prefix", "scopes", "expires_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix")
    readonly_fields = ("prefix", "last_used_at", "revoked_at", "created_at", "created_by")
    actions = ["revoke_keys"]

    def save_model(self, request, obj, form, change) -> None:
        if not change:
            key = apikeys.assign(obj)
            obj.created_by = request.user
            obj.save()
            self.message_user(
                request,
                f"The API key for {obj.name} is {key} — store it now: it will not be shown again.",
                messages.WARNING,
            )
            return
        super().save_model(request, obj, form, change)

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_keys(self, request, queryset) -> None:
        count = sum(apikeys.revoke(row) for row in queryset)
        self.message_user(request, ngettext("%d key revoked.", "%d keys revoked.", count) % count)


class WebhookEndpointForm(forms.ModelForm):
    url = forms.URLField(max_length=1000, assume_scheme="https")
    event_types = forms.MultipleChoiceField(
        choices=[(kind, kind) for kind in notify.EVENT_TYPES],
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text="None ticked: every event.",
    )

    class Meta:
        model = WebhookEndpoint
        fields = ("name", "url", "event_types", "secret", "active")


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    form = WebhookEndpointForm
    list_display = ("name", "url", "event_types", "active")
    list_filter = ("active",)

    def get_changeform_initial_data(self, request) -> dict:
        return {"secret": webhooks_out.new_secret()}


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    """The delivery log: what was posted where, how often, with what answer."""

    list_display = (
        "event_type",
        "endpoint",
        "status",
        "attempts",
        "last_status_code",
        "next_attempt_at",
        "created_at",
    )
    list_filter = ("status", "event_type", "endpoint")
    search_fields = ("event_id",)
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]
    actions = ["redeliver"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Deliver again now", permissions=["change"])
    def redeliver(self, request, queryset) -> None:
        count = webhooks_out.redeliver(queryset)
        self.message_user(
            request,
            ngettext("%d delivery queued again.", "%d deliveries queued again.", count) % count,
        )
