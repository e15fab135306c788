"""Admin for the HTTP API's keys and the outgoing webhooks (imported by mailer.admin)."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.utils.translation import ngettext

from . import apikeys
from .models import ApiKey, ApiScope


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
