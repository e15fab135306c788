"""API-key authentication, scopes and the per-key rate limit of the HTTP API."""

from __future__ import annotations

from django.contrib.auth.models import AnonymousUser
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission

from .. import apikeys, conf, ratelimit
from ..models import ApiKey
from .problems import Problem

_TITLES = {
    "invalid": "Invalid API key",
    "revoked": "Revoked API key",
    "expired": "Expired API key",
}
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mailer"'}


class KeyAuthentication(BaseAuthentication):
    """``Authorization: Bearer <key>``; the request's ``auth`` is the ApiKey row."""

    def authenticate(self, request) -> tuple[AnonymousUser, ApiKey] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Problem(
                401,
                "invalid-api-key",
                _TITLES["invalid"],
                "Use 'Authorization: Bearer <key>'.",
                headers=_CHALLENGE,
            )
        try:
            row = apikeys.authenticate(key.strip())
        except apikeys.ApiKeyError as exc:
            raise Problem(
                401, f"{exc.reason}-api-key", _TITLES[exc.reason], str(exc), headers=_CHALLENGE
            ) from None
        return AnonymousUser(), row

    def authenticate_header(self, request) -> str:
        return _CHALLENGE["WWW-Authenticate"]


class HasScope(BasePermission):
    """The key must hold the view's scope for this method (``view.scopes``)."""

    def has_permission(self, request, view) -> bool:
        row = request.auth
        if not isinstance(row, ApiKey):
            return False  # DRF answers 401: no credentials were given
        needed = view.scopes[request.method]
        if needed not in row.scopes:
            raise Problem(
                403, "missing-scope", "Missing scope", f"This API key lacks the {needed!r} scope."
            )
        return True


def rate_limit(row: ApiKey) -> ratelimit.Window | None:
    """Count a request against the key's limit; a 429 problem when it is used up."""
    limit = conf.api_rate(row.rate_limit or None)
    if limit is None:
        return None
    window = ratelimit.hit(f"key:{row.pk}", *limit)
    if not window.allowed:
        raise Problem(
            429,
            "rate-limited",
            "Too many requests",
            f"This API key may make {window.limit} requests per {limit[1]} s.",
            headers={"Retry-After": str(window.reset), **headers(window)},
        )
    return window


def headers(window: ratelimit.Window) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(window.limit),
        "RateLimit-Remaining": str(window.remaining),
        "RateLimit-Reset": str(window.reset),
    }


class KeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Tells drf-spectacular how keys are presented."""

    target_class = KeyAuthentication
    name = "apiKey"

    def get_security_definition(self, auto_schema) -> dict:
        return {"type": "http", "scheme": "bearer", "description": "An API key from the admin."}
