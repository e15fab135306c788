"""Signal receivers: each calls one function in mailer.accounts."""

from . import accounts


def on_user_registered(sender, user, request=None, **kwargs) -> None:
    accounts.welcome(user, request=request)


def on_password_reset_requested(sender, user, reset_url, request=None, **kwargs) -> None:
    accounts.send_password_reset(user, reset_url=reset_url, request=request)
