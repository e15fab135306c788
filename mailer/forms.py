"""Forms a host plugs into Django's own views to route their email through mailer."""

from __future__ import annotations

from django.contrib.auth import forms as auth_forms
from django.urls import reverse

from .signals import password_reset_requested


class PasswordResetForm(auth_forms.PasswordResetForm):
    """Django's PasswordResetForm, sending through mailer's password_reset template.

    Use it with ``PasswordResetView.as_view(form_class=PasswordResetForm)``; the reset
    link still points at Django's ``password_reset_confirm`` view.
    """

    def save(self, *args, request=None, **kwargs):
        self._request = request
        return super().save(*args, request=request, **kwargs)

    def send_mail(
        self,
        subject_template_name,
        email_template_name,
        context,
        from_email,
        to_email,
        html_email_template_name=None,
    ) -> None:
        path = reverse(
            "password_reset_confirm", kwargs={"uidb64": context["uid"], "token": context["token"]}
        )
        password_reset_requested.send(
            sender=self.__class__,
            user=context["user"],
            request=getattr(self, "_request", None),
            reset_url=f"{context['protocol']}://{context['domain']}{path}",
        )
