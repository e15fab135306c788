"""System checks: misconfiguration caught at start-up, not at the first send."""

from __future__ import annotations

from django.core import checks

from . import conf
from .exceptions import MailerConfigurationError


def check_settings(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for queue in ("transactional", "campaign"):
        try:
            conf.queue_name(queue)
            conf.rate_limit(queue)
            conf.quotas(queue)
        except MailerConfigurationError as exc:
            errors.append(checks.Error(str(exc), id="mailer.E001"))

    try:
        conf.quota_timezone()
    except MailerConfigurationError as exc:
        errors.append(checks.Error(str(exc), id="mailer.E001"))

    visibility = conf.broker_visibility_timeout()
    countdown = float(conf.get("MAX_COUNTDOWN"))
    if visibility is not None and countdown >= visibility:
        errors.append(
            checks.Error(
                f"MAILER['MAX_COUNTDOWN'] ({countdown:.0f}s) must be shorter than the broker's "
                f"visibility_timeout ({visibility:.0f}s), or delayed tasks run twice.",
                id="mailer.E002",
            )
        )
    limit = conf.task_time_limit()
    if visibility is not None and limit is not None and visibility <= limit:
        errors.append(
            checks.Error(
                f"The broker's visibility_timeout ({visibility:.0f}s) is shorter than "
                f"CELERY_TASK_TIME_LIMIT ({limit:.0f}s): a long task would be handed to a "
                "second worker while the first still runs.",
                id="mailer.E003",
            )
        )
    lease = float(conf.get("SENDING_LEASE"))
    if lease < 10:
        errors.append(
            checks.Error(
                f"MAILER['SENDING_LEASE'] ({lease:.0f}s) must be at least 10 seconds: a live "
                "worker renews its claims every third of it, and a lease that lapses between "
                "two renewals lets recovery resend mail that worker is sending.",
                id="mailer.E004",
            )
        )
    if conf.get("STUCK_POLICY") not in ("retry", "fail"):
        errors.append(
            checks.Error("MAILER['STUCK_POLICY'] must be 'retry' or 'fail'.", id="mailer.E005")
        )
    if int(conf.get("MAX_ATTEMPTS")) < 1:
        errors.append(checks.Error("MAILER['MAX_ATTEMPTS'] must be at least 1.", id="mailer.E006"))
    if not conf.debug() and not conf.webhook_secret():
        errors.append(
            checks.Error(
                "ANYMAIL['WEBHOOK_SECRET'] is not set: anyone could post forged bounces and "
                "complaints to the ESP webhooks.",
                hint="Set ANYMAIL_WEBHOOK_SECRET='user:long-random-password' and put the "
                "same credentials in the webhook URL at your ESP.",
                id="mailer.E007",
            )
        )
    for queue, value in (conf.get("CONNECTIONS") or {}).items():
        try:
            valid = 1 <= int(value) <= conf.MAX_CONNECTIONS
        except (TypeError, ValueError):
            valid = False
        if not valid:
            errors.append(
                checks.Error(
                    f"MAILER['CONNECTIONS'][{queue!r}] is {value!r}: it must be a whole "
                    f"number from 1 to {conf.MAX_CONNECTIONS}.",
                    hint="Set MAILER_CAMPAIGN_CONNECTIONS / MAILER_TRANSACTIONAL_CONNECTIONS.",
                    id="mailer.E010",
                )
            )
    if not conf.debug() and not conf.get("POSTAL_ADDRESS"):
        errors.append(
            checks.Warning(
                "MAILER['POSTAL_ADDRESS'] is empty: campaigns will refuse to send, because "
                "marketing email must carry a postal address (CAN-SPAM).",
                hint="Set MAILER_POSTAL_ADDRESS.",
                id="mailer.W001",
            )
        )
    return errors
