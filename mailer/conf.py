"""The one accessor for mailer's settings: the MAILER dict over documented defaults.

Values are read at call time, never at import, so ``override_settings`` works.
"""

from __future__ import annotations

import re
from email.utils import formataddr
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from anymail.utils import get_anymail_setting
from django.conf import settings

from .exceptions import MailerConfigurationError

#: Every MAILER key with its default. The README's configuration table mirrors this.
DEFAULTS: dict[str, Any] = {
    # Queue names; routing is built from these (see route_task).
    "QUEUES": {"transactional": "transactional", "campaign": "campaign"},
    # Global (all worker processes) send rates per queue: "50/s", "600/m", "10000/h" or None.
    "RATE_LIMITS": {"transactional": None, "campaign": None},
    # Caps per queue over calendar hours and days (an ESP's quotas, e.g. 50,000 a day),
    # shared by all worker processes: {"campaign": {"hour": None, "day": 50000}}; None: no cap.
    "QUOTAS": {
        "transactional": {"hour": None, "day": None},
        "campaign": {"hour": None, "day": None},
    },
    # The time zone whose calendar hours and days the quotas count (an IANA name).
    "QUOTA_TIMEZONE": "UTC",
    # Redis used for the shared token bucket; None: the broker URL if it is Redis, else the DB.
    "REDIS_URL": None,
    # Sender identity; None falls back to DEFAULT_FROM_EMAIL.
    "FROM_EMAIL": None,
    "FROM_NAME": None,
    "APP_NAME": "Mailer",
    # Absolute base URL for links in emails when no request is at hand.
    "SITE_URL": "http://localhost:8000",
    "DEFAULT_LANGUAGE": "en",
    # Bounds on every render of a template (on save, in previews, when sending); reaching
    # one stops that render with a TemplateLimitExceeded naming it (mailer.sandbox).
    "TEMPLATE_LIMITS": {
        # Characters one part (subject, HTML or text) may write; no single value it builds
        # may be larger either.
        "OUTPUT_CHARS": 1_000_000,
        # Characters of strings and list items one part may build, all values together.
        "MEMORY_CHARS": 10_000_000,
        # Loop iterations and macro calls in one part.
        "ITERATIONS": 100_000,
        # Items one range() may have.
        "RANGE": 10_000,
        # Calls of macros, blocks and recursive loops nested in one another.
        "RECURSION": 20,
        # Database templates included (imported, extended) within one another.
        "INCLUDE_DEPTH": 5,
        # The largest integer a template may compute, in bits (4096: about 1,200 digits).
        "NUMBER_BITS": 4096,
        # CPU seconds one part may take.
        "CPU_SECONDS": 1.0,
    },
    # Messages a worker claims and sends over one connection at a time.
    "BATCH_SIZE": 100,
    # Connections to the server (or concurrent API calls) each worker process sends
    # over, per queue: the waiting for a distant server overlaps.
    "CONNECTIONS": {"transactional": 1, "campaign": 1},
    # Emails sent over one connection before it is closed and opened again (for an ESP's
    # batch endpoint: calls).
    "MESSAGES_PER_CONNECTION": 100,
    # Emails one API call carries where the ESP has a batch endpoint (Postmark: up to
    # 500): None, as many as the ESP takes; 1, one call per email.
    "ESP_BATCH_SIZE": None,
    # Connections all worker processes together keep open to the backend (None: no cap).
    "MAX_OPEN_CONNECTIONS": None,
    # After a "slow down" (SMTP 421 / 4.7.x, ESP 429): how long the emails concerned wait
    # when the server gives no Retry-After, and how often a tenth of the speed comes back.
    "THROTTLE_WAIT": 30,
    "THROTTLE_RECOVERY": 30,
    # A drain task hands over to a fresh task after this many seconds.
    "DRAIN_SECONDS": 15,
    # Delivery attempts before a transient failure becomes final.
    "MAX_ATTEMPTS": 5,
    # Retry delay: BASE * 2**(attempt-1), capped at MAX, with +-JITTER fraction.
    "RETRY_BACKOFF_BASE": 30,
    "RETRY_BACKOFF_MAX": 3600,
    "RETRY_JITTER": 0.2,
    # Longest countdown handed to the broker; later sends wait in the DB for beat.
    # Must stay below the broker's visibility timeout (checked, mailer.E003).
    "MAX_COUNTDOWN": 300,
    # Seconds a claim lasts unless renewed; a live worker renews it every third of this,
    # so a dead worker's claims are recovered (by beat) within this plus a beat interval.
    "SENDING_LEASE": 30,
    # A message due and "queued" this long without a claim wakes a worker again.
    "QUEUED_LEASE": 60,
    # What recovery does with the one email a dead worker may have sent: "retry" or "fail".
    # Its untried claims are always queued again.
    "STUCK_POLICY": "retry",
    # How long a worker waits for a lost database before giving up on a batch.
    "DATABASE_WAIT": 120,
    # How long sending waits for an unreachable rate-limit store before handing back.
    "RATE_STORE_WAIT": 60,
    # Header carrying each message's id as an idempotency key, so an ESP that honours it
    # never delivers a resent email twice. None: chosen by the backend (Brevo's
    # "idempotencyKey", Resend's "Resend-Idempotency-Key"); "" turns it off.
    "IDEMPOTENCY_HEADER": None,
    # Email verification links stay valid this many seconds.
    "VERIFY_MAX_AGE": 3 * 24 * 3600,
    # A signed webhook (Mailgun) whose signature time is further than this many seconds
    # from now is refused, and each signature token is accepted once within twice this.
    "WEBHOOK_MAX_AGE": 300,
    # Seconds a process reuses a template lookup (other processes see edits this late).
    "TEMPLATE_CACHE_SECONDS": 5,
    # Extra names allowed in every template besides the standard context.
    "EXTRA_CONTEXT": [],
    # Context keys whose values are secrets (signed links, one-time codes): masked in the
    # admin and in stored errors, at any depth. Always masked besides these: reset_url,
    # verify_url, and any key whose name contains token, secret or password.
    "SECRET_CONTEXT_KEYS": [],
    # Own open/click tracking for SMTP set-ups. None: on unless an anymail ESP sends
    # (the ESP tracks then). Applies to marketing and drip mail only.
    "TRACK_OPENS": None,
    "TRACK_CLICKS": None,
    # Opens/clicks this soon after sending are flagged automated (scanners, proxies).
    "AUTOMATED_WINDOW": 10,
    # Distinct links of one message clicked within this many seconds: a scanner.
    "CLICK_BURST_SECONDS": 2,
    # User agents of link scanners and security gateways (case-insensitive regexes).
    "SCANNER_USER_AGENTS": [
        r"bot\b",
        r"spider",
        r"crawler",
        r"barracuda",
        r"mimecast",
        r"proofpoint",
        r"symantec",
        r"messagelabs",
        r"trend ?micro",
        r"zscaler",
        r"fortinet",
        r"sophos",
        r"forcepoint",
        r"cisco",
        r"ironport",
        r"safelinks",
        r"linkscanner",
        r"urlscan",
        r"python-requests",
        r"python-urllib",
        r"curl/",
        r"wget/",
        r"go-http-client",
        r"java/",
        r"okhttp",
        r"headlesschrome",
        r"phantomjs",
        r"microsoft office",
    ],
    # Soft bounces within the window before the address is suppressed for all mail.
    "SOFT_BOUNCE_LIMIT": 3,
    "SOFT_BOUNCE_DAYS": 30,
    # The mailto: of List-Unsubscribe; None: unsubscribe@<sender's domain>.
    "UNSUBSCRIBE_MAILTO": None,
    # Printed in every marketing email ({{ postal_address }}); CAN-SPAM requires one.
    "POSTAL_ADDRESS": "",
    # A/B: fewer trials than this in any arm means too little data for a winner.
    "AB_MIN_SAMPLE": 30,
    # DKIM signing on the SMTP path (mailer.dkimsign). DKIM_DOMAIN None: nothing is signed.
    # The domain must be the sender's domain or a parent of it (checked, mailer.E008).
    "DKIM_DOMAIN": None,
    "DKIM_SELECTOR": None,
    # The private key (PEM, RSA) as text, e.g. from the environment, or a file holding it:
    # set one of the two. Read and checked once per process; rotate by restarting workers.
    "DKIM_PRIVATE_KEY": None,
    "DKIM_PRIVATE_KEY_FILE": None,
    # Headers signed when the email has them; From, To, Cc, Reply-To and Subject are also
    # signed once more than present, so nobody can add a second one (see dkimsign).
    "DKIM_HEADERS": [
        "From",
        "To",
        "Cc",
        "Reply-To",
        "Subject",
        "Date",
        "Message-ID",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
    ],
    # Reputation guard: pause marketing when rolling rates pass these.
    "REPUTATION": {
        "BOUNCE_RATE": 0.05,
        "COMPLAINT_RATE": 0.001,
        "WINDOW_HOURS": 24,
        "MIN_SENT": 200,
    },
}

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PERIODS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
}


def get(name: str) -> Any:
    """Return the MAILER setting ``name``, or its documented default."""
    if name not in DEFAULTS:
        raise MailerConfigurationError(f"Unknown MAILER setting {name!r}.")
    user = getattr(settings, "MAILER", {}) or {}
    value = user.get(name, DEFAULTS[name])
    if isinstance(DEFAULTS[name], dict) and isinstance(value, dict):
        return {**DEFAULTS[name], **value}
    return value


def template_limits() -> dict[str, int | float]:
    """MAILER['TEMPLATE_LIMITS'] over its defaults, each a positive number (refused otherwise:
    a zero or a typo would silently make every render fail, or none bounded)."""
    limits = get("TEMPLATE_LIMITS")
    for name, value in limits.items():
        if name not in DEFAULTS["TEMPLATE_LIMITS"]:
            raise MailerConfigurationError(
                f"MAILER['TEMPLATE_LIMITS'] has an unknown key {name!r}; the keys are "
                f"{', '.join(DEFAULTS['TEMPLATE_LIMITS'])}."
            )
        number = (int, float) if name == "CPU_SECONDS" else int
        if isinstance(value, bool) or not isinstance(value, number) or value <= 0:
            raise MailerConfigurationError(
                f"MAILER['TEMPLATE_LIMITS'][{name!r}] is {value!r}: it must be a positive "
                f"{'number of seconds' if name == 'CPU_SECONDS' else 'whole number'}."
            )
    return limits


def queue_name(queue: str) -> str:
    """The Celery queue name configured for mailer's "transactional" or "campaign" queue."""
    queues = get("QUEUES")
    try:
        return queues[str(queue)]
    except KeyError:
        raise MailerConfigurationError(f"MAILER['QUEUES'] has no {queue!r} queue.") from None


def parse_rate(value: str | None) -> float | None:
    """Turn "50/s" into 50.0 messages per second; None means unlimited."""
    if value in (None, "", 0):
        return None
    match = _RATE.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise MailerConfigurationError(
            f"Rate limit {value!r} cannot be parsed; write it as '50/s', '600/m' or '1000/h'."
        )
    return float(match.group(1)) / _PERIODS[match.group(2)]


def rate_limit(queue: str) -> float | None:
    """Messages per second allowed on a queue across all workers, or None."""
    return parse_rate(get("RATE_LIMITS").get(queue))


#: The windows a quota may cap, as MAILER['QUOTAS'] names them.
QUOTA_WINDOWS = ("hour", "day")


def quotas(queue: str) -> dict[str, int]:
    """The queue's caps by window ("hour", "day") from MAILER['QUOTAS']; absent: no cap."""
    configured = get("QUOTAS").get(str(queue)) or {}
    if not isinstance(configured, dict):
        raise MailerConfigurationError(
            f"MAILER['QUOTAS'][{str(queue)!r}] must be a dict like {{'day': 50000}}."
        )
    caps: dict[str, int] = {}
    for window, value in configured.items():
        if window not in QUOTA_WINDOWS:
            raise MailerConfigurationError(
                f"MAILER['QUOTAS'][{str(queue)!r}] has an unknown window {window!r}; "
                f"use {' or '.join(QUOTA_WINDOWS)}."
            )
        if value in (None, "", 0):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MailerConfigurationError(
                f"MAILER['QUOTAS'][{str(queue)!r}][{window!r}] must be a whole number of "
                f"emails or None, not {value!r}."
            )
        caps[window] = value
    return caps


def quota_timezone() -> ZoneInfo:
    """The time zone of the quota windows (MAILER['QUOTA_TIMEZONE'])."""
    name = get("QUOTA_TIMEZONE")
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError):
        raise MailerConfigurationError(
            f"MAILER['QUOTA_TIMEZONE'] {name!r} is not a time zone name such as 'UTC' or "
            "'Europe/Paris'."
        ) from None


def connections(queue: str) -> int:
    """How many connections a worker process sends a queue's mail over (1 to 200).

    A value out of range is refused, not bent into it: 500 connections would otherwise
    quietly become 200, and 0 one."""
    value = get("CONNECTIONS").get(str(queue), 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONNECTIONS:
        raise MailerConfigurationError(
            f"MAILER['CONNECTIONS'][{str(queue)!r}] is {value!r}: it must be a whole number "
            f"from 1 to {MAX_CONNECTIONS}."
        )
    return value


MAX_CONNECTIONS = 200


def max_open_connections() -> int | None:
    """MAX_OPEN_CONNECTIONS: the cap on connections to the backend, all processes."""
    value = get("MAX_OPEN_CONNECTIONS")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MailerConfigurationError(
            f"MAILER['MAX_OPEN_CONNECTIONS'] is {value!r}: it must be a whole number of "
            "connections, or None for no cap."
        )
    return value


def esp_batch_size() -> int | None:
    """ESP_BATCH_SIZE: emails one ESP API call carries at most (None: the ESP's limit)."""
    value = get("ESP_BATCH_SIZE")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MailerConfigurationError(
            f"MAILER['ESP_BATCH_SIZE'] is {value!r}: it must be a whole number of emails "
            "(1: one call per email), or None for as many as the ESP takes."
        )
    return value


def backend_key() -> str:
    """Names the backend the connection cap counts for: its class, host and port."""
    backend = email_backend()
    if backend.endswith(("smtp.EmailBackend", "SMTPBackend")):
        return f"smtp:{settings.EMAIL_HOST}:{settings.EMAIL_PORT}"
    return backend


def redis_url() -> str | None:
    """The Redis for shared state: MAILER['REDIS_URL'], else a Redis broker, else None."""
    url = get("REDIS_URL")
    if url:
        return url
    broker = getattr(settings, "CELERY_BROKER_URL", "") or ""
    return broker if broker.startswith(("redis://", "rediss://")) else None


def from_address() -> str:
    """The sender's bare address: FROM_EMAIL, else DEFAULT_FROM_EMAIL."""
    return ascii_domain(get("FROM_EMAIL") or settings.DEFAULT_FROM_EMAIL)


def ascii_domain(address: str) -> str:
    """The address with an internationalised domain in its ASCII (IDNA) form, which
    headers and the SMTP envelope need; an invalid one is left for sending to refuse."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return address


def from_email() -> str:
    """The From header: 'Name <address>' built from FROM_NAME and FROM_EMAIL."""
    name = get("FROM_NAME")
    return formataddr((name, from_address())) if name else from_address()


# Task name → the queue it runs on. Celery routes through route_task, the one place.
# PER_QUEUE tasks take the queue they serve as their first argument and run on it, so
# a queue's recovery never waits for the other queue's workers.
PER_QUEUE = "per-queue"
TASK_QUEUES = {
    "mailer.tasks.drain_transactional": "transactional",
    "mailer.tasks.drain_campaign": "campaign",
    "mailer.tasks.launch_campaign": "campaign",
    "mailer.tasks.launch_due_campaigns": "campaign",
    "mailer.tasks.campaign_housekeeping": "campaign",
    "mailer.tasks.finish_campaigns": "campaign",
    "mailer.tasks.reputation_guard": "campaign",
    "mailer.tasks.password_reset": "transactional",
    "mailer.tasks.release_due_messages": PER_QUEUE,
    "mailer.tasks.recover_stuck_messages": PER_QUEUE,
}


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any):
    """Celery router: put mailer's tasks on the queue named in MAILER['QUEUES']."""
    queue = TASK_QUEUES.get(name)
    if queue == PER_QUEUE:
        served = (list(args or ()) or [(kwargs or {}).get("queue")])[0]
        queue = served if served in ("transactional", "campaign") else "transactional"
    return {"queue": queue_name(queue)} if queue else None


# --- Settings that belong to Django or Celery, read here so nothing else needs to. ---


def broker_visibility_timeout() -> float | None:
    """Seconds before an unacknowledged task comes back (Redis/SQS brokers), if any."""
    broker = getattr(settings, "CELERY_BROKER_URL", "") or ""
    if not broker.startswith(("redis://", "rediss://", "sqs://")):
        return None
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {}
    return float(options.get("visibility_timeout", 3600))


def task_time_limit() -> float | None:
    """The hard time limit Celery kills a task at, if set."""
    limit = getattr(settings, "CELERY_TASK_TIME_LIMIT", None)
    return float(limit) if limit else None


def email_backend() -> str:
    """Django's EMAIL_BACKEND, as a dotted path."""
    return str(getattr(settings, "EMAIL_BACKEND", ""))


#: The header each ESP that deduplicates sends reads its idempotency key from.
ESP_IDEMPOTENCY_HEADERS = {
    "anymail.backends.brevo.": "idempotencyKey",
    "anymail.backends.sendinblue.": "idempotencyKey",
    "anymail.backends.resend.": "Resend-Idempotency-Key",
}


def idempotency_header() -> str | None:
    """The header that makes a resent email a no-op at the ESP, if the backend has one."""
    configured = get("IDEMPOTENCY_HEADER")
    if configured is not None:
        return configured or None
    backend = email_backend()
    for prefix, header in ESP_IDEMPOTENCY_HEADERS.items():
        if backend.startswith(prefix):
            return header
    if str(getattr(settings, "EMAIL_HOST", "")).endswith("resend.com"):
        return "Resend-Idempotency-Key"
    return None


def esp_tracks() -> bool:
    """True when an anymail ESP sends (and tracks opens and clicks itself)."""
    return email_backend().startswith("anymail.")


def track_opens() -> bool:
    value = get("TRACK_OPENS")
    return (not esp_tracks()) if value is None else bool(value)


def track_clicks() -> bool:
    value = get("TRACK_CLICKS")
    return (not esp_tracks()) if value is None else bool(value)


def webhook_secret() -> str | None:
    """anymail's WEBHOOK_SECRET ("user:password"), read the way anymail reads it."""
    return get_anymail_setting("webhook_secret", default=None)


def debug() -> bool:
    return bool(settings.DEBUG)


def allowed_hosts() -> list[str]:
    return list(getattr(settings, "ALLOWED_HOSTS", []) or [])


def secret_keys() -> list[str]:
    """SECRET_KEY first (new tokens), then SECRET_KEY_FALLBACKS (tokens still read)."""
    return [settings.SECRET_KEY, *(getattr(settings, "SECRET_KEY_FALLBACKS", []) or [])]


def webhook_max_age() -> float:
    """WEBHOOK_MAX_AGE in seconds; a positive number, or the window means nothing."""
    value = get("WEBHOOK_MAX_AGE")
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise MailerConfigurationError(
            f"MAILER['WEBHOOK_MAX_AGE'] is {value!r}: it must be a positive number of seconds."
        )
    return float(value)


def password_reset_hours() -> int:
    return int(settings.PASSWORD_RESET_TIMEOUT) // 3600


# --- HTTP API, health, metrics and outgoing webhooks (README: "HTTP API") --------------------

DEFAULTS.update(
    {
        # Requests per key across every web process ("600/m", "20/s"); an ApiKey's own
        # rate_limit overrides it. None: no limit.
        "API_RATE_LIMIT": "600/m",
        # Largest request body the API reads; a larger one is answered 413 unread.
        "API_MAX_BODY_BYTES": 2 * 1024 * 1024,
        # Messages one POST /messages/batch may carry.
        "API_BATCH_MAX": 500,
        # How long an Idempotency-Key's first answer is replayed, and after how many
        # seconds a first request that never finished (its process died) stops holding it.
        "IDEMPOTENCY_TTL": 24 * 3600,
        "IDEMPOTENCY_IN_FLIGHT": 60,
        # /metrics: a bearer token, and/or client addresses (IPs or CIDR networks) allowed
        # without it. Neither set: /metrics answers 403 to everyone.
        "METRICS_TOKEN": None,
        "METRICS_ALLOWED_IPS": [],
        # Worker and beat processes write a heartbeat this often; /health/ready counts a
        # process alive for three times as long.
        "HEARTBEAT_SECONDS": 15,
        # Email ADMINS when this many messages failed in the last FAILED_ALERT_WINDOW
        # seconds (None: never), and at most once per ALERT_INTERVAL seconds per alert.
        "FAILED_ALERT_THRESHOLD": 100,
        "FAILED_ALERT_WINDOW": 3600,
        "ALERT_INTERVAL": 3600,
        # Outgoing webhooks: seconds to wait for the host's answer, attempts before a
        # delivery is failed, and the first retry delay (doubling, capped at MAX_COUNTDOWN).
        "WEBHOOK_TIMEOUT": 10,
        "WEBHOOK_MAX_ATTEMPTS": 8,
        "WEBHOOK_BACKOFF_BASE": 10,
    }
)
TASK_QUEUES.update(
    {
        "mailer.tasks.deliver_webhooks": "transactional",
        "mailer.tasks.operator_alerts": "transactional",
    }
)


def api_rate(value: str | None = None) -> tuple[int, int] | None:
    """A key's limit as (requests, window seconds): "600/m" → (600, 60); None: unlimited."""
    value = value or get("API_RATE_LIMIT")
    if value in (None, "", 0):
        return None
    match = _RATE.match(str(value))
    if not match or float(match.group(1)) < 1 or not float(match.group(1)).is_integer():
        raise MailerConfigurationError(
            f"API rate limit {value!r} cannot be parsed; write it as '600/m', '20/s' or "
            "'10000/h' (a whole number of requests)."
        )
    return int(float(match.group(1))), _PERIODS[match.group(2)]


# --- Drip series and the frequency cap (README: "Drip series") -----------------------------

DEFAULTS.update(
    {
        # Marketing email (campaigns and drips together; never transactional) each contact
        # may get per calendar day and ISO week in their own time zone: {"day": 1,
        # "week": 3}. None: no cap. A capped drip step waits for the next allowed day.
        "FREQUENCY_CAP": {"day": None, "week": None},
        # The beat tick that moves drip enrollments along.
        "DRIPS": {
            # Enrollments advanced per transaction (each locked, skipped by other ticks).
            "BATCH_SIZE": 1000,
            # A tick hands over to the next after this many seconds.
            "TICK_SECONDS": 30,
            # How often a decision still waiting for an open or click looks again.
            "DECIDE_RECHECK": 3600,
            # A step due in its send window may still go this many seconds after it closed
            # (the tick came late); later, it waits for the next opening.
            "WINDOW_GRACE": 900,
            # An active enrollment due longer ago than this is reported and queued again.
            "STUCK_AFTER": 600,
        },
    }
)
TASK_QUEUES.update(
    {
        "mailer.tasks.advance_drips": "campaign",
        "mailer.tasks.drip_entries": "campaign",
        "mailer.tasks.check_drips": "campaign",
    }
)

#: The windows a frequency cap may count, as MAILER['FREQUENCY_CAP'] names them.
CAP_WINDOWS = ("day", "week")


def frequency_cap() -> dict[str, int]:
    """MAILER['FREQUENCY_CAP'] as {"day": n, "week": m}, only the windows that cap."""
    configured = get("FREQUENCY_CAP") or {}
    if not isinstance(configured, dict):
        raise MailerConfigurationError(
            "MAILER['FREQUENCY_CAP'] must be a dict like {'day': 1, 'week': 3}."
        )
    caps: dict[str, int] = {}
    for window, value in configured.items():
        if window not in CAP_WINDOWS:
            raise MailerConfigurationError(
                f"MAILER['FREQUENCY_CAP'] has an unknown window {window!r}; use day or week."
            )
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MailerConfigurationError(
                f"MAILER['FREQUENCY_CAP'][{window!r}] must be a whole number of emails "
                f"(at least 1) or None, not {value!r}."
            )
        caps[window] = value
    return caps


def drips(name: str) -> float:
    """One of MAILER['DRIPS']'s numbers, checked positive."""
    value = get("DRIPS")[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise MailerConfigurationError(
            f"MAILER['DRIPS'][{name!r}] is {value!r}: it must be a positive number."
        )
    return value


def drip_settings() -> dict[str, float]:
    """MAILER['DRIPS'] over its defaults, every key known and positive (checks E001)."""
    configured = get("DRIPS")
    unknown = sorted(set(configured) - set(DEFAULTS["DRIPS"]))
    if unknown:
        raise MailerConfigurationError(
            f"MAILER['DRIPS'] has an unknown key {unknown[0]!r}; the keys are "
            f"{', '.join(DEFAULTS['DRIPS'])}."
        )
    return {name: drips(name) for name in configured}


def site_timezone() -> str:
    """Django's TIME_ZONE: whose clock a local-time campaign's send time is read in, and
    the zone of its contacts without one."""
    return str(settings.TIME_ZONE or "UTC")
