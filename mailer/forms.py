"""Forms a host plugs into Django's own views to route their email through mailer."""

from __future__ import annotations

from django.contrib.auth import forms as auth_forms
from django.db import transaction

from . import dispatch

PASSWORD_RESET_TASK = "mailer.tasks.password_reset"  # noqa: S105 - a task name


class PasswordResetForm(auth_forms.PasswordResetForm):
    """Django's PasswordResetForm, sending through mailer's password_reset template.

    Use it with ``PasswordResetView.as_view(form_class=PasswordResetForm)``. The request
    only queues a task with the address: a worker looks the user up and sends the link
    (to Django's ``password_reset_confirm`` view, under SITE_URL) or does nothing. So a
    known and an unknown address cost the request exactly the same, and the link never
    comes from the request's Host header. The view's ``domain_override``, ``use_https``
    and ``token_generator`` are not used: SITE_URL and Django's default generator are.
    """

    def save(self, *args, **kwargs) -> None:
        email = self.cleaned_data["email"]
        transaction.on_commit(lambda: dispatch.enqueue(PASSWORD_RESET_TASK, args=(email,)))
