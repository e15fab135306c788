"""Talking to the backend: connections, what an error means, and how long to back off.

``classify`` sorts every error into three: the recipient's permanent refusal (fail),
a transient problem with this one email (retry, a bounded number of times), and an
outage of the server or ESP (the email waits; its attempts are not used up).
"""

from __future__ import annotations

import logging
import random
import re
import smtplib
import threading
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from anymail.exceptions import AnymailAPIError, AnymailError, AnymailRecipientsRefused
from django.core.mail import get_connection

from . import conf
from .backends import PostmarkBackend, SMTPBackend
from .exceptions import (
    HeaderInjection,
    PermanentSendError,
    SendError,
    ServiceUnavailable,
    TemplateError,
    TemplateNotFound,
    Throttled,
    TransientSendError,
)
from .mime import PreparedEmail

logger = logging.getLogger(__name__)


def _smtp_reply(exc: smtplib.SMTPResponseException) -> str:
    error = exc.smtp_error
    return error.decode(errors="replace") if isinstance(error, bytes) else str(error)


_SLOW_DOWN = re.compile(r"\b4\.7\.\d{1,3}\b")  # enhanced status 4.7.x: policy, often rate


def _slow_down(code: int, text: str) -> bool:
    """421 (closing: too many connections or messages) or a 4xx with status 4.7.x."""
    return code == 421 or (400 <= code < 500 and bool(_SLOW_DOWN.search(text)))


def retry_after(exc: BaseException) -> float | None:
    """Seconds from an HTTP Retry-After header (a number or a date), if the ESP sent one."""
    response = getattr(exc, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def classify(exc: BaseException) -> SendError:
    """Permanent (never again), transient (again, bounded) or an outage (wait)."""
    if isinstance(exc, SendError):
        return exc
    if isinstance(exc, TemplateError | TemplateNotFound | HeaderInjection):
        return PermanentSendError(f"Template: {exc}")
    if isinstance(exc, AnymailRecipientsRefused):
        return PermanentSendError(f"ESP refused the recipient: {exc}")
    if isinstance(exc, AnymailAPIError):
        status = getattr(exc, "status_code", None)
        if status == 429:
            return Throttled(f"ESP error 429: {exc}", retry_after=retry_after(exc))
        if status is None or status >= 500:
            return ServiceUnavailable(f"ESP error {status or 'connection'}: {exc}")
        if status in (401, 403):
            return ServiceUnavailable(f"ESP refused our credentials ({status}): {exc}")
        return PermanentSendError(f"ESP error {status}: {exc}")
    if isinstance(exc, AnymailError):
        return PermanentSendError(f"ESP: {exc}")
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        detail = "; ".join(
            f"{code} {reply.decode(errors='replace')}" for code, reply in exc.recipients.values()
        )
        if codes and all(_slow_down(code, detail) for code in codes):
            return Throttled(f"SMTP server asks to slow down: {detail}")
        if codes and all(400 <= code < 500 for code in codes):
            return TransientSendError(f"SMTP recipient deferred: {detail}")
        return PermanentSendError(f"SMTP recipient refused: {detail}")
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        # Credentials are fixed by ops, not by waiting, but failing every queued email
        # at once would be worse: the mail waits and the error stays visible.
        return ServiceUnavailable(f"SMTP authentication failed: {exc.smtp_code}")
    if isinstance(exc, smtplib.SMTPResponseException):
        text = f"SMTP {exc.smtp_code} {_smtp_reply(exc)}"
        if _slow_down(exc.smtp_code, text):
            return Throttled(text)
        if 400 <= exc.smtp_code < 500:
            return TransientSendError(text)
        return PermanentSendError(text)
    if isinstance(exc, smtplib.SMTPServerDisconnected | smtplib.SMTPNotSupportedError):
        return ServiceUnavailable(f"SMTP connection: {exc}")
    if isinstance(exc, OSError):  # refused, reset, timeout, TLS failure, DNS
        return ServiceUnavailable(f"Connection: {exc.__class__.__name__}: {exc}")
    if isinstance(exc, ValueError) and "address" in str(exc).lower():
        return PermanentSendError(f"Invalid address: {exc}")
    # Nobody classified it: maybe a bug, maybe a passing fault. Try again, a bounded
    # number of times, and leave the traceback in the worker's log.
    logger.error("mailer: unclassified send error", exc_info=exc)
    return TransientSendError(f"Unexpected {exc.__class__.__name__}; see the worker log.")


def backoff(attempt: int) -> float:
    """Exponential delay with jitter before retry number ``attempt``."""
    base = float(conf.get("RETRY_BACKOFF_BASE"))
    delay = min(float(conf.get("RETRY_BACKOFF_MAX")), base * 2 ** max(0, attempt - 1))
    jitter = float(conf.get("RETRY_JITTER"))
    return max(1.0, delay * random.uniform(1 - jitter, 1 + jitter))  # noqa: S311


class Outage:
    """Consecutive outages of this process's backend, for a growing wait between tries."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0

    def failed(self) -> float:
        """One more outage; the seconds mail should wait before the next try."""
        with self._lock:
            self.count += 1
            count = self.count
        return min(float(conf.get("MAX_COUNTDOWN")), backoff(count))

    def recovered(self) -> None:
        with self._lock:
            self.count = 0


outage = Outage()


#: Backends mailer sends through in their place: the same settings and behaviour, less
#: CPU per email (prepared SMTP bytes) or fewer calls (Postmark's batch endpoint).
_UPGRADES = {
    "django.core.mail.backends.smtp.EmailBackend": SMTPBackend,
    "anymail.backends.postmark.EmailBackend": PostmarkBackend,
}


def _backend_class():
    upgrade = _UPGRADES.get(conf.email_backend())
    if upgrade is PostmarkBackend and conf.esp_batch_size() == 1:
        return None  # anymail's own backend, one call per email
    return upgrade


def open_backend():
    """A backend connection for a batch: one of ours in place of Django's SMTP backend
    or anymail's Postmark backend; every other backend as configured."""
    upgrade = _backend_class()
    if upgrade is not None:
        return get_connection(f"{upgrade.__module__}.{upgrade.__name__}", fail_silently=False)
    return get_connection(fail_silently=False)


def batch_limit() -> int:
    """How many emails one call to the backend carries: above 1 only for an ESP with a
    batch endpoint (see ``PostmarkBackend``); every other backend sends one at a time."""
    upgrade = _backend_class()
    if upgrade is None or not hasattr(upgrade, "send_batch"):
        return 1
    return min(conf.esp_batch_size() or upgrade.batch_limit, upgrade.batch_limit)


class Sender:
    """One backend connection for a lane of a drain; reopened after the server drops it,
    and after MESSAGES_PER_CONNECTION emails (servers limit them; a reply refusing more
    would read as a request to slow down).

    A failure to open raises ``ServiceUnavailable``: the caller hands the batch back.
    """

    def __init__(self):
        self.connection = None
        self.sent = 0  # on this connection

    def open(self) -> None:
        """Connect if not connected; an unreachable server raises ServiceUnavailable."""
        if self.connection is not None and self.sent >= int(conf.get("MESSAGES_PER_CONNECTION")):
            self.close()
        if self.connection is None:
            connection = open_backend()
            try:
                connection.open()
            except Exception as exc:  # noqa: BLE001 - every failure to open is sorted
                error = classify(exc)
                if not isinstance(error, ServiceUnavailable):
                    error = ServiceUnavailable(str(error))
                raise error from exc
            self.connection, self.sent = connection, 0

    def send(self, email: PreparedEmail) -> None:
        self.open()
        email.connection = self.connection
        try:
            self.sent += 1
            if not self.connection.send_messages([email]):
                raise TransientSendError("The backend accepted nothing.")
        except Exception as exc:
            error = classify(exc)
            if isinstance(error, ServiceUnavailable):
                self.close()  # a dropped or refused connection is never reused
            raise error from exc

    def send_many(self, emails: list[PreparedEmail]) -> list[SendError | None]:
        """One batch call (see ``batch_limit``); by position, None for an email accepted
        or its sorted error. A connection that failed is not reused."""
        self.open()
        self.sent += 1  # calls, for an HTTP connection
        try:
            outcomes = self.connection.send_batch(emails)
        except Exception as exc:  # noqa: BLE001 - classify sorts every failure
            outcomes = [exc] * len(emails)
        errors = [None if outcome is None else classify(outcome) for outcome in outcomes]
        if any(isinstance(error, ServiceUnavailable) for error in errors):
            self.close()
        return errors

    def close(self) -> None:
        if self.connection is not None:
            try:
                self.connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                logger.debug("mailer: closing a broken connection failed", exc_info=True)
            self.connection = None
