"""Opaque tokens for the links mailer puts in emails (unsubscribe, verification).

A signed token is tamper-proof but readable: base64 of its payload shows the address to
anyone who sees the URL (a proxy log, a browser history, a link scanner). These tokens are
encrypted and authenticated (Fernet: AES-128-CBC + HMAC-SHA256, from ``cryptography``),
so they carry no readable address. Each purpose has its own salt and so its own key: no
kind of token can act as another. Keys come from SECRET_KEY; tokens made under a key in
SECRET_KEY_FALLBACKS are still read, so rotating the secret does not break old links.
"""

from __future__ import annotations

import base64
import json
import time
from functools import lru_cache

from cryptography.fernet import Fernet, MultiFernet
from cryptography.fernet import InvalidToken as FernetInvalid
from django.utils.crypto import salted_hmac

from . import conf
from .exceptions import ExpiredToken, InvalidToken

#: Every token starts so (Fernet's version byte and the high bytes of its timestamp):
#: how a token is found in free text, such as the subject of a mailto unsubscribe.
TOKEN_PATTERN = r"gAAAAA[A-Za-z0-9_\-]{60,}"  # noqa: S105 - a pattern


def seal(data: dict, *, salt: str) -> str:
    """``data`` (JSON) encrypted and authenticated for one purpose; URL-safe, unpadded."""
    payload = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    return _fernet(salt, tuple(conf.secret_keys())).encrypt(payload).decode().rstrip("=")


def unseal(token: str, *, salt: str, max_age: float | None = None) -> dict:
    """The data of a token made by ``seal`` with this salt; InvalidToken or ExpiredToken."""
    fernet = _fernet(salt, tuple(conf.secret_keys()))
    raw = (token + "=" * (-len(token) % 4)).encode("ascii", "replace")
    try:
        payload = fernet.decrypt(raw)
        made = fernet.extract_timestamp(raw)
    except (FernetInvalid, ValueError, TypeError):
        raise InvalidToken("The token is not valid.") from None
    if max_age is not None and time.time() - made > max_age:
        raise ExpiredToken("The token has expired.")
    try:
        data = json.loads(payload)
    except ValueError:
        raise InvalidToken("The token is not valid.") from None
    if not isinstance(data, dict):
        raise InvalidToken("The token is not valid.")
    return data


@lru_cache(maxsize=16)
def _fernet(salt: str, secrets: tuple[str, ...]) -> MultiFernet:
    """One key per salt and secret, derived once per process (a changed key gets its own)."""
    keys = [
        Fernet(
            base64.urlsafe_b64encode(
                salted_hmac(salt, "mailer.tokens", secret, algorithm="sha256").digest()
            )
        )
        for secret in secrets
    ]
    return MultiFernet(keys)
