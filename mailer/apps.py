"""App config: connects receivers and registers system checks, nothing else."""

from django.apps import AppConfig


class MailerConfig(AppConfig):
    name = "mailer"
    verbose_name = "Mailer"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core import checks

        from . import checks as mailer_checks
        from . import receivers, signals

        signals.user_registered.connect(
            receivers.on_user_registered, dispatch_uid="mailer.user_registered"
        )
        signals.password_reset_requested.connect(
            receivers.on_password_reset_requested, dispatch_uid="mailer.password_reset"
        )
        from anymail.signals import inbound, tracking

        tracking.connect(receivers.on_tracking, dispatch_uid="mailer.anymail_tracking")
        inbound.connect(receivers.on_inbound, dispatch_uid="mailer.anymail_inbound")
        checks.register(mailer_checks.check_settings)
