"""The errors mailer raises: one root, typed leaves, configuration errors apart."""

from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation, ValidationError


class MailerError(Exception):
    """Root of every runtime error mailer raises on purpose."""


class InvalidRecipient(MailerError, ValueError):
    """The address cannot receive mail: malformed, empty or refused by the server."""


class TemplateNotFound(MailerError, LookupError):
    """No database or file template has that slug in any fallback language."""


class FieldError(MailerError, ValidationError):
    """Bad input tied to a form field; a ValidationError too, so admin forms show it."""

    def __init__(self, message: str, *, field: str | None = None):
        MailerError.__init__(self, message)
        ValidationError.__init__(self, {field: [message]} if field else message)
        self.args = (message,)
        self.field = field

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class TemplateError(FieldError):
    """A template does not parse, uses an unknown variable or breaks the sandbox."""


class TemplateLimitExceeded(TemplateError):
    """A render reached one of MAILER['TEMPLATE_LIMITS'] (``limit`` names which): the
    template stops there, whatever it was doing, and the process carries on."""

    def __init__(self, message: str, *, limit: str, field: str | None = None):
        super().__init__(message, field=field)
        self.limit = limit


class SegmentError(FieldError):
    """A segment rule that cannot be evaluated: unknown field, wrong operator, bad value."""


class CampaignError(FieldError):
    """A campaign that cannot make this move: not ready, wrong status, in the past."""


class DripError(FieldError):
    """A drip series or enrollment that cannot make this move: a draft series, an unknown
    series or event name, a step that cannot run."""


class HeaderInjection(FieldError, ValueError):
    """A value bound for a header carries CR, LF or another control character; a
    ValidationError too, so a model field's validator shows it on its form field."""


class InvalidContext(MailerError, ValueError):
    """Context, metadata or a note that cannot be stored: not a JSON mapping, nested too
    deep, or carrying NUL or another control character."""


class ImportFileError(MailerError, ValueError):
    """A file to import cannot be read as a whole; nothing from it was imported."""


class InvalidWebhook(MailerError, SuspiciousOperation):
    """An ESP webhook request that is malformed, wrongly shaped, stale or replayed.

    A SuspiciousOperation too, so Django answers 400 wherever it is raised: the ESP sees a
    refusal, and nothing from the request is recorded."""


class InvalidToken(MailerError):
    """A link's token was altered, forged, made for another purpose or under an unknown key."""


class ExpiredToken(InvalidToken):
    """A link's token is authentic but older than its purpose allows."""


class WebhookStoreUnavailable(MailerError):
    """The store of seen webhook signatures cannot be reached: the request is refused
    (503, so the ESP tries again later) rather than accepted unchecked."""


class SuppressedRecipient(MailerError):
    """The address is on the suppression list for this kind of mail."""


class SendError(MailerError):
    """Delivery failed; subclasses say whether trying again can help."""


class TransientSendError(SendError):
    """This email could not go now (SMTP 4xx for the recipient, an unknown error): retry
    with backoff, a bounded number of times."""


class ServiceUnavailable(TransientSendError):
    """The server or ESP cannot be reached, dropped the connection, or is throttling.

    An outage is not the email's fault: it waits, and its attempts are not used up.
    """


class Throttled(ServiceUnavailable):
    """The server or ESP asks us to slow down (SMTP 421 or 4.7.x, HTTP 429): the email
    waits, and the queue sends more slowly for a while."""

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentSendError(SendError):
    """Recipient refused, invalid address, 4xx from an ESP: never retry."""


class MailerConfigurationError(ImproperlyConfigured):
    """A MAILER setting is missing or malformed. Stands outside MailerError on purpose."""
