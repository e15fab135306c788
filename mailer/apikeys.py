"""API keys for the HTTP API: made, checked and revoked here; only a hash is stored.

Keys are ``<prefix>.<secret>`` from djangorestframework-api-key's generator: the prefix
finds the row, a SHA-512 of the whole key proves it (a random key needs no slow hash).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from django.utils import timezone
from rest_framework_api_key.crypto import KeyGenerator

from .exceptions import MailerError
from .models import ApiKey, ApiScope

_generator = KeyGenerator(prefix_length=8, secret_key_length=40)

#: last_used_at is written at most this often per key (not one UPDATE per request).
LAST_USED_EVERY = timedelta(seconds=60)


class ApiKeyError(MailerError):
    """A key that is missing, unknown, revoked or expired (``reason`` says which)."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason


def create(
    name: str,
    *,
    scopes: Iterable[str],
    expires_at: datetime | None = None,
    rate_limit: str = "",
    by=None,
) -> tuple[ApiKey, str]:
    """Make a key; returns the row and the key itself, which is never shown again."""
    scopes = sorted(set(scopes))
    unknown = set(scopes) - set(ApiScope.values)
    if unknown:
        raise ValueError(f"Unknown scopes: {', '.join(sorted(unknown))}.")
    row = ApiKey(name=name, scopes=scopes, expires_at=expires_at, rate_limit=rate_limit)
    row.created_by = by
    key = assign(row)
    row.save()
    return row, key


def assign(row: ApiKey) -> str:
    """Give an unsaved row a new key (prefix and hash); returns the key."""
    key, prefix, hashed = _generator.generate()
    row.prefix, row.hashed_key = prefix, hashed
    return key


def authenticate(key: str, now: datetime | None = None) -> ApiKey:
    """The usable row for a presented key, or ApiKeyError: one indexed query."""
    prefix, dot, secret = (key or "").partition(".")
    if not dot or not prefix or not secret:
        raise ApiKeyError("The API key is malformed.", reason="invalid")
    row = ApiKey.objects.filter(prefix=prefix).first()
    if row is None or not _generator.verify(key, row.hashed_key):
        raise ApiKeyError("The API key is not valid.", reason="invalid")
    now = now or timezone.now()
    if row.revoked:
        raise ApiKeyError("The API key was revoked.", reason="revoked")
    if row.expired(now):
        raise ApiKeyError("The API key has expired.", reason="expired")
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_EVERY:
        ApiKey.objects.filter(pk=row.pk).update(last_used_at=now)
        row.last_used_at = now
    return row


def revoke(row: ApiKey) -> bool:
    """Revoke a key for good; False if it already was."""
    updated = ApiKey.objects.filter(pk=row.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    row.refresh_from_db(fields=["revoked_at"])
    return bool(updated)
