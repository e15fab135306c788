"""Contacts: clean addresses, and the contact behind a user account."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from .exceptions import HeaderInjection, InvalidRecipient
from .models import Contact, normalize_email


def clean_address(value: object) -> str:
    """A valid, normalized address, or InvalidRecipient / HeaderInjection saying why."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecipient(f"Recipient must be a non-empty email address, got {value!r}.")
    if "\r" in value or "\n" in value:
        raise HeaderInjection("Recipient address contains a line break.")
    address = normalize_email(value)
    try:
        validate_email(address)
    except ValidationError:
        raise InvalidRecipient(f"{value!r} is not a valid email address.") from None
    return address


def contact_for_user(user) -> Contact:
    """Create or link the contact for a user account (registration calls this)."""
    address = clean_address(getattr(user, "email", ""))
    name = (user.get_full_name() if hasattr(user, "get_full_name") else "") or ""
    contact, created = Contact.objects.get_or_create(
        email=address, defaults={"name": name or user.get_username(), "user": user}
    )
    if not created and contact.user_id != user.pk:
        contact.user = user
        contact.name = contact.name or name
        contact.save(update_fields=["user", "name", "updated_at"])
    return contact
