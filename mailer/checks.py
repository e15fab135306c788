"""System checks: misconfiguration caught at start-up, not at the first send."""

from __future__ import annotations

import re
from functools import partial

from anymail.webhooks.base import AnymailCoreWebhookView
from celery import current_app
from django.apps import apps
from django.conf import settings
from django.core import checks
from django.urls import NoReverseMatch, URLResolver, get_resolver, reverse

from . import conf, dkimsign, redact
from .exceptions import HeaderInjection, MailerConfigurationError
from .models import Queue, header_safe

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

    for read in (
        conf.quota_timezone,
        conf.webhook_max_age,
        conf.template_limits,
        redact.secret_keys,
        conf.frequency_cap,
        conf.drip_settings,
    ):
        try:
            read()
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
    readers = [*(partial(conf.connections, queue) for queue in Queue)]
    readers += [conf.max_open_connections, conf.esp_batch_size]
    for read in readers:
        try:
            read()
        except MailerConfigurationError as exc:
            hint = "Set MAILER_CAMPAIGN_CONNECTIONS, MAILER_TRANSACTIONAL_CONNECTIONS, "
            hint += "MAILER_MAX_OPEN_CONNECTIONS or MAILER_ESP_BATCH_SIZE."
            errors.append(checks.Error(str(exc), hint=hint, id="mailer.E009"))
    if not conf.debug() and not conf.get("POSTAL_ADDRESS"):
        errors.append(
            checks.Warning(
                "MAILER['POSTAL_ADDRESS'] is empty: campaigns will refuse to send, because "
                "marketing email must carry a postal address (CAN-SPAM).",
                hint="Set MAILER_POSTAL_ADDRESS.",
                id="mailer.W001",
            )
        )
    errors.extend(check_sender())
    errors.extend(check_dkim())
    return errors


def check_sender() -> list[checks.CheckMessage]:
    """The sender settings reach every email's From header: a line break there breaks
    every email (or writes headers of its own)."""
    values = {
        "MAILER['FROM_NAME']": conf.get("FROM_NAME"),
        "MAILER['FROM_EMAIL']": conf.get("FROM_EMAIL"),
        "DEFAULT_FROM_EMAIL": settings.DEFAULT_FROM_EMAIL,
    }
    errors: list[checks.CheckMessage] = []
    for name, value in values.items():
        try:
            header_safe(value, name)
        except HeaderInjection as exc:
            errors.append(checks.Error(str(exc), id="mailer.E001"))
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


def check_deploy(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """``check --deploy``: settings that are fine on a laptop and dangerous in production."""
    if conf.debug() or "*" not in conf.allowed_hosts():
        return []
    return [
        checks.Warning(
            "ALLOWED_HOSTS contains '*' with DEBUG off: any Host header is accepted, so "
            "anything built from the request's host (links, redirects, cache keys) is the "
            "client's to choose. mailer's own links use SITE_URL; a host's may not.",
            hint="List the site's host names in ALLOWED_HOSTS.",
            id="mailer.W003",
        )
    ]


def check_webhook_urls(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """The ESP webhooks the host serves are mailer's guarded views (``mailer.webhooks``),
    not anymail's own."""
    unguarded = sorted(
        {
            name or view.__name__
            for name, view in _views(get_resolver().url_patterns)
            if issubclass(view, AnymailCoreWebhookView)
            and not getattr(view, "mailer_guarded", False)
        }
    )
    if not unguarded:
        return []
    return [
        checks.Warning(
            f"The ESP webhooks are anymail's own views, not mailer's guarded ones "
            f"({', '.join(unguarded)}): a malformed body answers 500, and a Mailgun "
            "signature is accepted however old and however often it is posted.",
            hint='Include "mailer.webhooks" instead of "anymail.urls" in your URLconf.',
            id="mailer.W004",
        )
    ]


def _views(patterns):
    """(name, view class) of every class-based view in a URLconf, included ones too."""
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _views(pattern.url_patterns)
        elif isinstance(getattr(pattern.callback, "view_class", None), type):
            yield pattern.name, pattern.callback.view_class


def check_host(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """What a host project must wire for mailer to send at all: said before ``migrate``
    or the first email fails, with what to do."""
    errors: list[checks.CheckMessage] = []
    if not apps.is_installed("django_celery_beat"):
        errors.append(
            checks.Error(
                "'django_celery_beat' is not in INSTALLED_APPS: mailer's migrations create "
                "its schedules (recovery of stuck mail, campaign launches), and migrate "
                "cannot run without it.",
                hint="Add 'django_celery_beat' to INSTALLED_APPS, before 'mailer'.",
                id="mailer.E010",
            )
        )
    if not _urls_included():
        errors.append(
            checks.Error(
                "mailer's URLs are not in the URLconf: verification, unsubscribe and "
                "tracking links in emails cannot be built.",
                hint='Add path("mailer/", include("mailer.urls")) to your urls.py.',
                id="mailer.E011",
            )
        )
    if not _celery_app_configured():
        errors.append(
            checks.Error(
                "No Celery app is configured: mailer's tasks would go to Celery's default "
                "app, and queued email would never be sent.",
                hint="Create a Celery app (celery.py with config_from_object("
                '"django.conf:settings", namespace="CELERY")) and import it in your '
                "project's __init__.py; for tests, CELERY_TASK_ALWAYS_EAGER = True.",
                id="mailer.E012",
            )
        )
    if not conf.debug() and conf.get("SITE_URL") == conf.DEFAULTS["SITE_URL"]:
        errors.append(
            checks.Warning(
                f"MAILER['SITE_URL'] is still {conf.DEFAULTS['SITE_URL']!r} with DEBUG off: "
                "links in emails (verification, unsubscribe, password reset) point there.",
                hint="Set MAILER['SITE_URL'] to the site's public URL.",
                id="mailer.W005",
            )
        )
    return errors


def _urls_included() -> bool:
    try:
        reverse("mailer:unsubscribe", args=["x"])
    except NoReverseMatch:
        return False
    return True


def _celery_app_configured() -> bool:
    """A host's Celery app is current; Celery's own fallback app is named 'default'."""
    return current_app.main != "default"
