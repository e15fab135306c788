"""Errors as RFC 9457 problem details: one stable ``type`` per kind of error."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import set_rollback

from .. import exceptions as mailer_exceptions

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/problem+json"
PREFIX = "urn:mailer:problem:"


class Problem(exceptions.APIException):
    """An error the API answers with a problem document."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str = "",
        *,
        errors: list[dict] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail or title)
        self.status_code, self.slug, self.title = status, slug, title
        self.detail_text, self.errors, self.headers = detail, errors, headers or {}

    def body(self) -> dict[str, Any]:
        return document(self.status_code, self.slug, self.title, self.detail_text, self.errors)


def document(
    status: int, slug: str, title: str, detail: str = "", errors: list[dict] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": PREFIX + slug, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if errors:
        body["errors"] = errors
    return body


#: A mailer error's class → (problem slug, title, the request field it concerns).
MAILER_ERRORS: list[tuple[type, str, str, str | None]] = [
    (mailer_exceptions.InvalidRecipient, "invalid-recipient", "Invalid recipient", "to"),
    (mailer_exceptions.TemplateNotFound, "template-not-found", "Unknown template", "template"),
    (mailer_exceptions.HeaderInjection, "header-injection", "Line break in a header", None),
    (mailer_exceptions.InvalidContext, "invalid-context", "Invalid context", "context"),
    (mailer_exceptions.TemplateError, "template-error", "Template cannot render", "context"),
]


def from_mailer_error(exc: mailer_exceptions.MailerError, *, field: str | None = None) -> dict:
    """The problem document of a refused send (422)."""
    for cls, slug, title, default_field in MAILER_ERRORS:
        if isinstance(exc, cls):
            where = field or default_field
            errors = [{"field": where, "detail": str(exc)}] if where else None
            return document(422, slug, title, str(exc), errors)
    return document(422, "invalid-request", "Invalid request", str(exc))


def validation_errors(detail: Any, prefix: str = "") -> list[dict]:
    """DRF's nested error detail flattened into [{field, detail}]."""
    found: list[dict] = []
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if key == "non_field_errors":
                name = prefix or None
            found += validation_errors(value, name)
    elif isinstance(detail, list):
        if all(not isinstance(item, dict | list) for item in detail):
            found += [{"field": prefix or None, "detail": str(item)} for item in detail]
        else:
            for index, item in enumerate(detail):
                found += validation_errors(item, f"{prefix}[{index}]")
    else:
        found.append({"field": prefix or None, "detail": str(detail)})
    return found


def handler(exc: Exception, context: dict) -> Response | None:
    """DRF exception handler: everything the API raises becomes a problem document."""
    if isinstance(exc, RequestDataTooBig):
        exc = Problem(413, "payload-too-large", "Request body too large")
    if isinstance(exc, Problem):
        return _respond(exc.body(), exc.status_code, exc.headers)
    if isinstance(exc, mailer_exceptions.MailerError):
        body = from_mailer_error(exc)
        return _respond(body, 422)
    if isinstance(exc, Http404):
        return _respond(document(404, "not-found", "Not found", str(exc) or ""), 404)
    if isinstance(exc, exceptions.ValidationError):
        errors = validation_errors(exc.detail)
        return _respond(document(422, "validation-error", "Invalid fields", "", errors), 422)
    if isinstance(exc, exceptions.ParseError):
        return _respond(document(400, "malformed-json", "Malformed JSON", str(exc.detail)), 400)
    if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        body = document(401, "missing-api-key", "API key required", str(exc.detail))
        return _respond(body, 401, {"WWW-Authenticate": 'Bearer realm="mailer"'})
    if isinstance(exc, exceptions.PermissionDenied):
        return _respond(document(403, "forbidden", "Forbidden", str(exc.detail)), 403)
    if isinstance(exc, exceptions.APIException):
        slug = str(getattr(exc, "default_code", "error")).replace("_", "-")
        title = str(exc.default_detail)
        detail = str(exc.detail) if str(exc.detail) != title else ""
        return _respond(document(exc.status_code, slug, title, detail), exc.status_code)
    logger.exception("mailer: the HTTP API failed on %s", type(exc).__name__)
    return _respond(document(500, "server-error", "Internal error"), 500)


def _respond(body: dict, status: int, headers: dict[str, str] | None = None) -> Response:
    set_rollback()
    response = Response(body, status=status, headers=headers)
    response.content_type = CONTENT_TYPE
    return response
