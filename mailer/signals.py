"""Signals a host project sends to have mailer email its users.

Each is a declaration; mailer.receivers does the work.
"""

from django.dispatch import Signal

# A user account was created.
# Arguments: user (the new user), request (HttpRequest or None; links use SITE_URL).
# Sends the welcome and email-verification emails and creates or links the Contact.
user_registered = Signal()

# A user asked to reset their password.
# Arguments: user, request (or None), reset_url (absolute URL of the reset form).
# Sends the password_reset email; never blocked by a marketing unsubscribe.
password_reset_requested = Signal()
