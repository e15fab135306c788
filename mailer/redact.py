"""Secrets in message context (reset and verification links…): masked wherever people
or logs could read them — the admin, stored errors, the worker's log."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from . import conf
from .exceptions import MailerConfigurationError

MASK = "[hidden]"

#: Context keys mailer itself fills with signed links (``accounts``).
BUILTIN_SECRET_KEYS = frozenset({"reset_url", "verify_url"})
_SECRET_NAME = re.compile(r"token|secret|password|passwd", re.IGNORECASE)
# Shorter values are not masked inside free text: "[hidden]" in place of every "a" or
# "1" would hide the error itself and protect nothing.
_MIN_SCRUB_LENGTH = 6


def secret_keys() -> frozenset[str]:
    """The built-in secret keys and those the host declares in SECRET_CONTEXT_KEYS."""
    declared = conf.get("SECRET_CONTEXT_KEYS")
    if isinstance(declared, str) or not all(isinstance(k, str) for k in declared or ()):
        raise MailerConfigurationError(
            "MAILER['SECRET_CONTEXT_KEYS'] must be a list of context key names."
        )
    return BUILTIN_SECRET_KEYS | {key.lower() for key in declared or ()}


def is_secret(key: object, keys: frozenset[str] | None = None) -> bool:
    name = str(key).lower()
    return name in (secret_keys() if keys is None else keys) or bool(_SECRET_NAME.search(name))


def masked(value: Any, keys: frozenset[str] | None = None) -> Any:
    """A copy of a context (or metadata) with every secret value, at any depth, MASK."""
    keys = secret_keys() if keys is None else keys
    if isinstance(value, Mapping):
        return {k: MASK if is_secret(k, keys) else masked(v, keys) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked(item, keys) for item in value]
    return value


def secret_values(value: Any, keys: frozenset[str] | None = None) -> Iterator[str]:
    """Every scalar held under a secret key, as text, at any depth."""
    keys = secret_keys() if keys is None else keys
    if isinstance(value, Mapping):
        for key, item in value.items():
            if is_secret(key, keys):
                yield from _scalars(item)
            else:
                yield from secret_values(item, keys)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from secret_values(item, keys)


def scrub(text: str, context: Any) -> str:
    """``text`` (an error about to be stored or logged) without the context's secrets."""
    found = {s for s in secret_values(context) if len(s) >= _MIN_SCRUB_LENGTH}
    for secret in sorted(found, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _scalars(value: Any) -> Iterator[str]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _scalars(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _scalars(item)
    elif value is not None:
        yield str(value)
