"""The account emails: welcome, email verification and password reset.

Every link in them is built from SITE_URL, never from the request: the Host header is the
client's to choose, and a forged one would send a user a link to someone else's site.
"""

from __future__ import annotations

from django.contrib.auth.forms import PasswordResetForm
from django.contrib.auth.tokens import default_token_generator
from django.core import signing
from django.urls import reverse
from django.utils import timezone
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from . import api, conf, tokens
from .contacts import contact_for_user
from .exceptions import ExpiredToken, InvalidToken, MailerError
from .models import Contact, Message

_VERIFY_SALT = "mailer.accounts.verify-email"


class InvalidVerificationLink(MailerError):
    """The verification link is forged, altered, expired or for another address."""


def absolute_url(path: str) -> str:
    """``path`` under SITE_URL."""
    return conf.get("SITE_URL").rstrip("/") + path


def verification_token(contact: Contact) -> str:
    """Timestamped, bound to the address so it cannot verify another one, and encrypted
    so the link shows no address."""
    return tokens.seal({"c": contact.pk, "e": contact.email}, salt=_VERIFY_SALT)


def read_verification_token(token: str) -> Contact:
    """The contact a verification link is for; changes nothing."""
    max_age = conf.get("VERIFY_MAX_AGE")
    try:
        data = tokens.unseal(token, salt=_VERIFY_SALT, max_age=max_age)
    except ExpiredToken:
        raise InvalidVerificationLink("This verification link has expired.") from None
    except InvalidToken:
        data = _read_signed_token(token, max_age)
    contact = Contact.objects.filter(pk=data.get("c"), email=data.get("e")).first()
    if contact is None:
        raise InvalidVerificationLink("This verification link is for an address we no longer have.")
    return contact


def _read_signed_token(token: str, max_age: int) -> dict:
    """The signed (readable) links sent before they were encrypted, while they last."""
    try:
        data = signing.loads(token, salt=_VERIFY_SALT, max_age=max_age)
    except signing.SignatureExpired:
        raise InvalidVerificationLink("This verification link has expired.") from None
    except signing.BadSignature:
        raise InvalidVerificationLink("This verification link is not valid.") from None
    if not isinstance(data, dict) or not isinstance(data.get("c"), int):
        raise InvalidVerificationLink("This verification link is not valid.")
    return data


def verify_email(token: str) -> Contact:
    """Mark the contact behind a verification link verified; idempotent."""
    contact = read_verification_token(token)
    if contact.verified_at is None:
        contact.verified_at = timezone.now()
        contact.save(update_fields=["verified_at", "updated_at"])
    return contact


def welcome(user) -> list[Message]:
    """Link the user's contact and send welcome + verification, once per user."""
    contact = contact_for_user(user)
    user_name = user.get_short_name() or user.get_username()
    verify_path = reverse("mailer:verify-email", args=[verification_token(contact)])
    return [
        api.send(
            "welcome",
            to=contact.email,
            context={"user_name": user_name, "login_url": absolute_url("/")},
            idempotency_key=f"welcome:{user.pk}",
        ),
        api.send(
            "verify_email",
            to=contact.email,
            context={
                "user_name": user_name,
                "verify_url": absolute_url(verify_path),
                "expires_hours": conf.get("VERIFY_MAX_AGE") // 3600,
            },
            idempotency_key=f"verify-email:{user.pk}:{contact.email}",
        ),
    ]


def send_password_reset(user, *, reset_url: str) -> Message:
    """The reset email; transactional, so a marketing unsubscribe never blocks it."""
    contact = contact_for_user(user)
    return api.send(
        "password_reset",
        to=contact.email,
        context={
            "user_name": user.get_short_name() or user.get_username(),
            "reset_url": reset_url,
            "expires_hours": conf.password_reset_hours(),
        },
    )


def password_reset(email: str) -> list[Message]:
    """Run by a worker for every reset request, known address or not: the request itself
    only queues this, so it costs the same whether an account exists (no enumeration by
    timing). Users as Django's own form finds them (active, with a usable password); the
    link to Django's ``password_reset_confirm`` view, under SITE_URL."""
    sent = []
    for user in PasswordResetForm().get_users(email):
        path = reverse(
            "password_reset_confirm",
            kwargs={
                "uidb64": urlsafe_base64_encode(force_bytes(user.pk)),
                "token": default_token_generator.make_token(user),
            },
        )
        sent.append(send_password_reset(user, reset_url=absolute_url(path)))
    return sent
