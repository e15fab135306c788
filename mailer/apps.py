"""App config: connects receivers and registers system checks, nothing else."""

from django.apps import AppConfig


class MailerConfig(AppConfig):
    name = "mailer"
    verbose_name = "Mailer"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core import checks

        from . import checks as mailer_checks

        # ``tasks`` registers mailer's shared tasks in every process, not only workers: in
        # eager mode (a host's tests) a task runs where it is sent, so it must be known there.
        from . import receivers, signals, tasks  # noqa: F401

        signals.user_registered.connect(
            receivers.on_user_registered, dispatch_uid="mailer.user_registered"
        )
        signals.password_reset_requested.connect(
            receivers.on_password_reset_requested, dispatch_uid="mailer.password_reset"
        )
        from anymail.signals import inbound, tracking
        from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutting_down
        from django.db.models.signals import post_delete, post_save, pre_save

        from .models import Campaign, Template, Variant

        pre_save.connect(
            receivers.on_template_saving, sender=Template, dispatch_uid="mailer.template_saving"
        )
        for model in (Campaign, Variant, Template):
            pre_save.connect(
                receivers.on_header_fields_saving,
                sender=model,
                dispatch_uid=f"mailer.header_fields_saving.{model.__name__}",
            )
        worker_shutting_down.connect(
            receivers.on_worker_stopping, dispatch_uid="mailer.worker_stopping"
        )
        worker_ready.connect(receivers.on_worker_ready, dispatch_uid="mailer.worker_ready")
        task_prerun.connect(receivers.on_task_starting, dispatch_uid="mailer.task_starting")
        task_postrun.connect(receivers.on_task_finished, dispatch_uid="mailer.task_finished")
        for signal in (post_save, post_delete):
            signal.connect(
                receivers.on_template_changed,
                sender=Template,
                dispatch_uid=f"mailer.template_changed.{signal is post_save}",
            )

        tracking.connect(receivers.on_tracking, dispatch_uid="mailer.anymail_tracking")
        inbound.connect(receivers.on_inbound, dispatch_uid="mailer.anymail_inbound")
        checks.register(mailer_checks.check_settings)
        checks.register(mailer_checks.check_deploy, checks.Tags.security, deploy=True)
        checks.register(mailer_checks.check_webhook_urls, checks.Tags.security, checks.Tags.urls)
        checks.register(mailer_checks.check_host)

        # Heartbeats for /health/ready, and the outgoing webhooks' endpoint cache.
        from celery.signals import beat_init, worker_shutdown

        from .models import WebhookEndpoint

        worker_ready.connect(
            receivers.on_worker_heartbeat_start, dispatch_uid="mailer.heartbeat_start"
        )
        worker_shutdown.connect(
            receivers.on_worker_heartbeat_stop, dispatch_uid="mailer.heartbeat_stop"
        )
        beat_init.connect(receivers.on_beat_started, dispatch_uid="mailer.beat_heartbeat")
        for signal in (post_save, post_delete):
            signal.connect(
                receivers.on_webhook_endpoint_changed,
                sender=WebhookEndpoint,
                dispatch_uid=f"mailer.webhook_endpoint_changed.{signal is post_save}",
            )

        # Drip series: the onboarding series listens to user_registered; an unsubscribe
        # or suppression takes the address out of every series at once.
        from .models import Suppression

        signals.user_registered.connect(
            receivers.on_user_registered_drips, dispatch_uid="mailer.user_registered.drips"
        )
        post_save.connect(
            receivers.on_suppression_saved, sender=Suppression, dispatch_uid="mailer.drips_exit"
        )
