"""The errors mailer raises: one root, typed leaves, configuration errors apart."""

from django.core.exceptions import ImproperlyConfigured, ValidationError


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


class HeaderInjection(MailerError, ValueError):
    """A value bound for a header carries CR or LF."""


class InvalidContext(MailerError, ValueError):
    """Template context that cannot be stored (not JSON) or is not a mapping."""


class ImportFileError(MailerError, ValueError):
    """A file to import cannot be read as a whole; nothing from it was imported."""


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
