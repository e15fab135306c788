"""System checks: misconfiguration caught at start-up, not at the first send."""

from __future__ import annotations

import re
from functools import partial

from django.core import checks

from . import conf, dkimsign
from .exceptions import MailerConfigurationError
from .models import Queue

_SELECTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]*)(?:\.[A-Za-z0-9_-]+)*$")
SMTP_BACKENDS = ("django.core.mail.backends.smtp.EmailBackend", "mailer.backends.SMTPBackend")


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
    try:
        conf.template_limits()
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
    # The readers refuse what sending would refuse: one rule, in conf.
    for read in [*(partial(conf.connections, queue) for queue in Queue), conf.max_open_connections]:
        try:
            read()
        except MailerConfigurationError as exc:
            hint = "Set MAILER_CAMPAIGN_CONNECTIONS, MAILER_TRANSACTIONAL_CONNECTIONS or "
            errors.append(
                checks.Error(str(exc), hint=hint + "MAILER_MAX_OPEN_CONNECTIONS.", id="mailer.E009")
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
    errors.extend(check_dkim())
    return errors


def check_dkim() -> list[checks.CheckMessage]:
    """DKIM settings that would make every email wait (mailer.E008), or sign for a domain
    that receivers will not align with the From address."""
    domain, selector = conf.get("DKIM_DOMAIN"), conf.get("DKIM_SELECTOR")
    has_key = bool(conf.get("DKIM_PRIVATE_KEY") or conf.get("DKIM_PRIVATE_KEY_FILE"))
    if not domain and not selector:
        if not has_key:
            return []
        return [
            checks.Error(
                "A DKIM private key is set but MAILER['DKIM_DOMAIN'] and "
                "MAILER['DKIM_SELECTOR'] are not, so nothing is signed.",
                hint="Set MAILER_DKIM_DOMAIN and MAILER_DKIM_SELECTOR, or unset the key.",
                id="mailer.E008",
            )
        ]
    if not domain or not selector:
        missing = "DKIM_SELECTOR" if domain else "DKIM_DOMAIN"
        return [
            checks.Error(
                f"MAILER['DKIM_DOMAIN'] and MAILER['DKIM_SELECTOR'] go together; "
                f"MAILER['{missing}'] is not set.",
                hint="Set both (MAILER_DKIM_DOMAIN, MAILER_DKIM_SELECTOR), or neither to "
                "send unsigned.",
                id="mailer.E008",
            )
        ]
    errors: list[checks.CheckMessage] = []
    if not _SELECTOR.match(selector):
        errors.append(
            checks.Error(
                f"MAILER['DKIM_SELECTOR'] {selector!r} is not a DNS label (letters, digits, "
                "'-' and '_').",
                id="mailer.E008",
            )
        )
    sender = conf.from_address()
    sender_domain = sender.rpartition("@")[2]
    if not dkimsign.aligned(domain, sender_domain):
        errors.append(
            checks.Error(
                f"MAILER['DKIM_DOMAIN'] {domain!r} is neither the sender's domain "
                f"({sender_domain!r}, from {sender!r}) nor a parent of it: receivers would "
                "not align the signature with the From address, and DMARC fails.",
                hint="Set MAILER_DKIM_DOMAIN to the domain of SMTP_FROM_EMAIL (or a parent "
                "of it), or send from an address in the DKIM domain.",
                id="mailer.E008",
            )
        )
    if not any(name.strip().lower() == "from" for name in conf.get("DKIM_HEADERS")):
        errors.append(checks.Error("MAILER['DKIM_HEADERS'] must include From.", id="mailer.E008"))
    try:
        dkimsign.configured_key()
    except MailerConfigurationError as exc:
        errors.append(
            checks.Error(
                str(exc),
                hint="Until it is fixed, mail waits in the queue rather than go out unsigned.",
                id="mailer.E008",
            )
        )
    if conf.email_backend() not in SMTP_BACKENDS:
        errors.append(
            checks.Warning(
                f"MAILER['DKIM_DOMAIN'] is set but EMAIL_BACKEND is {conf.email_backend()!r}: "
                "mailer signs only what it sends over SMTP.",
                hint="An ESP signs with keys you set up at the ESP; unset MAILER_DKIM_DOMAIN.",
                id="mailer.W002",
            )
        )
    return errors
