"""Signal receivers: each calls one function in the concern's module."""

import logging

from . import accounts, rendering, tracking, unsubscribe

logger = logging.getLogger(__name__)


def on_user_registered(sender, user, request=None, **kwargs) -> None:
    accounts.welcome(user, request=request)


def on_password_reset_requested(sender, user, reset_url, request=None, **kwargs) -> None:
    accounts.send_password_reset(user, reset_url=reset_url, request=request)


def on_tracking(sender, event, esp_name, **kwargs) -> None:
    """anymail's tracking signal: one normalized ESP event."""
    tracking.record(event, esp_name.lower().replace(" ", "_"))


def on_inbound(sender, event, esp_name, **kwargs) -> None:
    """anymail's inbound signal: a reply to our List-Unsubscribe mailto unsubscribes."""
    message = event.message
    if message is None:
        return
    target = unsubscribe.from_inbound(message.get("Subject", "") or "", message.text or "")
    if target is not None:
        unsubscribe.unsubscribe(target, source=f"mailto via {esp_name}")


def on_template_changed(sender, **kwargs) -> None:
    rendering.forget_templates()
