"""anymail's ESP webhook views, guarded; a URLconf to include in place of anymail's.

``path("anymail/", include("mailer.webhooks"))`` serves the same URLs under the same names
(``anymail:mailgun_tracking_webhook``…) as ``include("anymail.urls")``, with each view:

- answering 400, never 500, to a body that is not well-formed or not shaped as the ESP's
  (anymail raises whatever its parser meets: KeyError, TypeError, a JSON error), and
  recording nothing of a request unless every event in it is well-formed;
- for Mailgun, which signs a timestamp and a token but not the event data, refusing a
  signature older or newer than ``WEBHOOK_MAX_AGE`` or seen before (``tracking.accept_signature``);
  503 when the store of seen signatures cannot answer, so Mailgun tries again later.

Errors raised while *recording* events (the database lost…) stay 500s: the ESP retries.
"""

from __future__ import annotations

import json

from anymail import urls as anymail_urls
from anymail.exceptions import (
    AnymailConfigurationError,
    AnymailError,
    AnymailImproperlyInstalled,
)
from anymail.signals import AnymailTrackingEvent
from anymail.webhooks.mailgun import MailgunBaseWebhookView
from django.core.exceptions import SuspiciousOperation
from django.http import HttpResponse
from django.urls import URLPattern

from . import tracking
from .exceptions import InvalidWebhook, WebhookStoreUnavailable

#: What anymail's validators and parsers raise on a body they cannot read. Parsing touches
#: nothing but the request, so none of these can be a fault of ours.
MALFORMED = (
    AnymailError,
    AnymailConfigurationError,  # Brevo's parser says so of an inbound-shaped body
    ValueError,  # JSON, UnicodeDecodeError, numbers and dates that do not parse
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,  # JSON nested thousands deep
)


class GuardedWebhook:
    """Mixed in before an anymail webhook view class."""

    mailer_guarded = True  # what check mailer.W004 looks for

    def post(self, request, *args, **kwargs):
        try:
            return super().post(request, *args, **kwargs)
        except WebhookStoreUnavailable:
            return HttpResponse("The webhook cannot be checked now; try again later.", status=503)

    def run_validators(self, request) -> None:
        """anymail's (credentials, the ESP's signature), then freshness and replay."""
        try:
            super().run_validators(request)
        except SuspiciousOperation:
            raise  # anymail's refusals (credentials, signature) are 400s already
        except MALFORMED:
            raise InvalidWebhook(f"The {self.esp_name} webhook body is malformed.") from None
        self.check_signature_use(request)

    def check_signature_use(self, request) -> None:
        """Where the ESP signs a timestamp and a token: refuse stale or reused ones."""

    def parse_events(self, request) -> list:
        try:
            events = list(super().parse_events(request))
        except (SuspiciousOperation, AnymailImproperlyInstalled):
            raise  # a 400 already; a package missing is ours to fix, not the ESP's
        except MALFORMED:
            raise InvalidWebhook(
                f"The {self.esp_name} webhook body is not shaped as {self.esp_name} sends it."
            ) from None
        esp = self.esp_name.lower().replace(" ", "_")
        for event in events:
            if isinstance(event, AnymailTrackingEvent):
                tracking.check_event(event, esp)
        return events


class GuardedMailgun(GuardedWebhook):
    def check_signature_use(self, request) -> None:
        if request.content_type == "application/json":
            try:
                signature = json.loads(request.body.decode("utf-8"))["signature"]
                timestamp, token = signature["timestamp"], signature["token"]
            except MALFORMED:
                raise InvalidWebhook("The Mailgun webhook signature is malformed.") from None
        else:  # legacy form posts; anymail reads the last value of each field too
            timestamp, token = request.POST.get("timestamp"), request.POST.get("token")
        tracking.accept_signature("mailgun", timestamp=timestamp, token=token)


def guarded(view_class: type) -> type:
    """``view_class`` with the guard mixed in (Mailgun's own for Mailgun's views)."""
    guard = GuardedMailgun if issubclass(view_class, MailgunBaseWebhookView) else GuardedWebhook
    return type(f"Guarded{view_class.__name__}", (guard, view_class), {})


def _guarded_pattern(pattern: URLPattern) -> URLPattern:
    view = pattern.callback
    as_view = guarded(view.view_class).as_view(**view.view_initkwargs)
    return URLPattern(pattern.pattern, as_view, pattern.default_args, pattern.name)


# The same routes and names as anymail's, whatever ESPs its version serves.
app_name = anymail_urls.app_name
urlpatterns = [_guarded_pattern(pattern) for pattern in anymail_urls.urlpatterns]
