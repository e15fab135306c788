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


# --- Signals mailer sends, for the host to react to ---------------------------------------
# Each is sent once per event, after the transaction that recorded it commits, with:
#   message   the Message (contact_unsubscribed: None when no message is known)
#   event     the Event row, or None where none is kept (campaign mail's "sent")
#   event_id  a stable id ("evt_…"), the same as the outgoing webhook's
# contact_unsubscribed has email (the address) and contact (the Contact or None) instead
# of message.

# The server or ESP accepted the email.
message_sent = Signal()
# The ESP reports it delivered, opened, clicked (opens and clicks by people only).
message_delivered = Signal()
message_opened = Signal()
message_clicked = Signal()
# It bounced (event.bounce says hard or soft), or the recipient marked it as spam.
message_bounced = Signal()
message_complained = Signal()
# It failed for good: refused, invalid address, a template that cannot render.
message_failed = Signal()
# The address unsubscribed from marketing (link, mailto, ESP).
contact_unsubscribed = Signal()
