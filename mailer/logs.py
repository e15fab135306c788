"""Keeping tokens and secrets out of logs: request lines, referers and headers.

A link in an email carries its credential in the path (``/mailer/unsubscribe/<token>/``,
Django's ``/reset/<uid>/<token>/``), and whoever reads a log then holds it. ``redact``
blanks such segments and every query-string value; ``RedactTokens`` applies it to Django's
log records (``django.request`` logs the path of every 4xx), and ``GunicornLogger`` to
gunicorn's access and error logs (``--logger-class mailer.logs.GunicornLogger``), whose
custom formats may also name the Authorization or Cookie headers: those are blanked.
"""

from __future__ import annotations

import logging
import re

try:
    from gunicorn.glogging import Logger as _GunicornLogger
except ImportError:  # gunicorn is the host's choice, not a dependency of mailer
    _GunicornLogger = None

REDACTED = "[redacted]"

#: A path segment that is a credential: after mailer's token routes (wherever the host
#: mounts them) and in Django's password-reset confirmation (whose own redirect target,
#: ``set-password``, is kept), or any long token-looking segment elsewhere.
_TOKEN_SEGMENTS = re.compile(
    r"(?P<keep>/(?:unsubscribe|preferences|verify|t/c|t/o)/)[^/?#\s\"']+"
    r"|(?P<reset>/reset/[^/?#\s\"']+/)(?!set-password[/?#\s\"']|set-password$)[^/?#\s\"']+"
    r"|(?P<long>/)[A-Za-z0-9_\-:.=%]{40,}(?=[/?#\s\"']|$)"
)
_QUERY = re.compile(r"\?[^\s#\"']*")
_QUERY_VALUE = re.compile(r"=[^&;]*")

#: Header atoms (gunicorn ``{name}i`` / ``{name}e`` / ``{name}o``) that hold secrets.
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-csrftoken",
        "http_authorization",
        "http_proxy_authorization",
        "http_cookie",
        "http_x_api_key",
        "http_x_csrftoken",
    }
)


def redact(text: str) -> str:
    """``text`` with token path segments and query-string values replaced by [redacted]."""
    if "/" not in text and "?" not in text:
        return text
    text = _TOKEN_SEGMENTS.sub(_redact_segment, text)
    return _QUERY.sub(lambda m: redact_query(m.group(0)), text)


def redact_query(query: str) -> str:
    """A query string (with or without its ``?``) with every value replaced."""
    return _QUERY_VALUE.sub("=" + REDACTED, query)


def _redact_segment(match: re.Match) -> str:
    prefix = match.group("keep") or match.group("reset") or match.group("long")
    return prefix + REDACTED


def _redact_value(value):
    return redact(value) if isinstance(value, str) else value


class RedactTokens(logging.Filter):
    """A logging filter (on a handler or logger) that redacts messages and their args."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, dict):
            for key in list(record.args):  # in place: gunicorn's atoms are a dict subclass
                record.args[key] = _redact_value(dict.__getitem__(record.args, key))
        elif isinstance(record.args, tuple):
            record.args = tuple(_redact_value(arg) for arg in record.args)
        return True


if _GunicornLogger is not None:

    class GunicornLogger(_GunicornLogger):
        """gunicorn's logger, with tokens, query values and secret headers redacted."""

        _filter = RedactTokens()

        def setup(self, cfg) -> None:
            super().setup(cfg)
            self.error_log.addFilter(self._filter)  # "Error handling request /path"

        def atoms(self, resp, req, environ, request_time) -> dict:
            atoms = super().atoms(resp, req, environ, request_time)
            for key, value in atoms.items():
                name = key[1:-2].lower() if key.startswith("{") else ""
                if name in SECRET_HEADERS:
                    atoms[key] = REDACTED
                elif key == "q" or name == "query_string":
                    atoms[key] = redact_query(value or "")
                elif isinstance(value, str):
                    atoms[key] = redact(value)
            return atoms
