"""Checks a message request's shape: the same rules as serializers.MessageRequest (which
documents them in the OpenAPI schema), in plain Python, since a batch of 500 through DRF
serializers costs 60 ms of CPU before anything is sent."""

from __future__ import annotations

import re
from typing import Any

from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework.exceptions import ValidationError

_SLUG = re.compile(r"^[-a-zA-Z0-9_]+\Z")
_STRINGS = {"to": 254, "template": 100, "subject": 998, "html": None, "text": None, "language": 10}
_MAPPINGS = ("context", "metadata")
FIELDS = frozenset({*_STRINGS, *_MAPPINGS, "send_at"})


def message(data: Any) -> dict[str, Any]:
    """The keyword arguments for api.send / send_rendered, or a ValidationError by field."""
    if not isinstance(data, dict):
        raise ValidationError({"non_field_errors": ["Expected a JSON object."]})
    errors: dict[str, list[str]] = {}
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name not in FIELDS:
            errors[name] = ["Unknown field."]
        elif name in _STRINGS:
            if not isinstance(value, str) or not value:
                errors[name] = ["Must be a non-empty string."]
            elif _STRINGS[name] is not None and len(value) > _STRINGS[name]:
                errors[name] = [f"At most {_STRINGS[name]} characters."]
            elif name == "template" and not _SLUG.match(value):
                errors[name] = ["Must be a slug (letters, digits, - and _)."]
            else:
                out[name] = value
        elif name in _MAPPINGS:
            if not isinstance(value, dict):
                errors[name] = ["Must be a JSON object."]
            else:
                out[name] = value
        elif value is not None:  # send_at
            moment = parse_datetime(value) if isinstance(value, str) else None
            if moment is None:
                errors[name] = ["Must be an ISO 8601 date and time."]
            else:
                out[name] = moment if timezone.is_aware(moment) else timezone.make_aware(moment)
    if "to" not in data:
        errors.setdefault("to", ["This field is required."])
    if errors:
        raise ValidationError(errors)
    inline = {"subject", "html", "text"} & set(out)
    if "template" in out and inline:
        raise ValidationError(
            {"template": ["Give a template or inline subject and html, not both."]}
        )
    if "template" not in out:
        missing = [name for name in ("subject", "html") if name not in out]
        if missing:
            raise ValidationError({name: ["Required without a template."] for name in missing})
        if "context" in out:
            raise ValidationError({"context": ["Inline content takes no context."]})
    return out
