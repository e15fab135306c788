"""Finding, validating and rendering email templates in Jinja2's sandbox.

Per template version (cached): parse, inline CSS, derive the text part. Per recipient:
three Jinja renders, nothing else.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import css_inline
from django.template import engines
from inscriptis import get_text
from inscriptis.css_profiles import CSS_PROFILES
from inscriptis.model.config import ParserConfig
from jinja2 import TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.exceptions import TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import conf
from .exceptions import HeaderInjection, TemplateError, TemplateNotFound
from .models import Template

#: Names every template may use without declaring them.
STANDARD_CONTEXT = frozenset(
    {
        "app_name",
        "site_url",
        "recipient",
        "contact",
        "message_id",
        "language",
        "unsubscribe_url",
        "preferences_url",
        "postal_address",
    }
)

#: Names the built-in transactional emails receive; a database override may use them.
BUILTIN_VARIABLES: dict[str, frozenset[str]] = {
    "welcome": frozenset({"user_name", "login_url"}),
    "verify_email": frozenset({"user_name", "verify_url", "expires_hours"}),
    "password_reset": frozenset({"user_name", "reset_url", "expires_hours"}),
}

_html_env = ImmutableSandboxedEnvironment(autoescape=True, auto_reload=False)
_text_env = ImmutableSandboxedEnvironment(autoescape=False, auto_reload=False)
_JINJA_GLOBALS = frozenset(_html_env.globals)
_JINJA_TAG = re.compile(r"{{.*?}}|{%.*?%}|{#.*?#}", re.S)
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_inliner = css_inline.CSSInliner(load_remote_stylesheets=False, keep_style_tags=True)
_text_config = ParserConfig(css=CSS_PROFILES["strict"], display_links=True)


@dataclass(frozen=True)
class Source:
    """A template's text as found in the database or on disk."""

    slug: str
    language: str
    subject: str
    html: str
    text: str
    cache_key: tuple
    template_id: int | None = None
    purpose: str = "transactional"


@dataclass(frozen=True)
class Rendered:
    subject: str
    html: str
    text: str


class Compiled:
    """A template version ready to render many times."""

    def __init__(self, source: Source):
        self.source = source
        self.subject = _compile(_text_env, source.subject, "subject")
        inlined = _inline_css_source(source.html)
        self.inline_per_render = inlined is None
        self.html = _compile(_html_env, inlined or source.html, "html")
        text_source = source.text or _derive_text_source(source.html)
        self.text_per_render = text_source is None
        self.text = _compile(_text_env, text_source, "text") if text_source else None

    def render_subject(self, context: dict[str, Any]) -> str:
        subject = _run(self.subject, context, "subject").strip()
        if "\r" in subject or "\n" in subject:
            raise HeaderInjection("The rendered subject contains a line break.")
        return subject

    def render(self, context: dict[str, Any]) -> Rendered:
        subject = self.render_subject(context)
        html = _run(self.html, context, "html")
        if self.inline_per_render:
            html = _inliner.inline(html)
        if self.text is not None:
            text = _run(self.text, context, "text")
        else:
            text = html_to_text(html)
        return Rendered(subject=subject, html=html, text=_BLANK_LINES.sub("\n\n", text).strip())


def _compile(env: ImmutableSandboxedEnvironment, source: str, field: str):
    try:
        return env.from_string(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"{field}: line {exc.lineno}: {exc.message}", field=field) from None


def _run(template, context: dict[str, Any], field: str) -> str:
    try:
        return template.render(context)
    except SecurityError as exc:
        raise TemplateError(f"{field}: refused by the sandbox: {exc}", field=field) from None
    except JinjaTemplateError as exc:
        raise TemplateError(f"{field}: {exc}", field=field) from None


def _mask(source: str, token: str) -> tuple[str, list[str]]:
    tags: list[str] = []

    def replace(match: re.Match) -> str:
        tags.append(match.group(0))
        return token.format(len(tags) - 1)

    return _JINJA_TAG.sub(replace, source), tags


def _unmask(text: str, tags: list[str], token: str, *, may_drop_output: bool = False) -> str | None:
    """Put the Jinja tags back; None when the HTML tool lost, doubled or moved one.

    A ``{{ expression }}`` may vanish where the output has no place for it (an attribute
    has no text equivalent); a block tag may not, or the template's structure breaks.
    Nor may a tag cross a block tag: a table cell moved out of its loop renders once, empty.
    """
    blocks_before, seen = [], 0
    for tag in tags:
        blocks_before.append(seen)
        seen += tag.startswith("{%")
    seen = 0
    for at, index in sorted((text.find(token.format(i)), i) for i in range(len(tags))):
        if at < 0:
            continue
        if blocks_before[index] != seen:
            return None  # moved into or out of a block: do that work per render instead
        seen += tags[index].startswith("{%")
    for index, tag in enumerate(tags):
        placeholder = token.format(index)
        count = text.count(placeholder)
        if count == 1:
            text = text.replace(placeholder, tag)
        elif not (count == 0 and may_drop_output and tag.startswith("{{")):
            return None  # do that work per render instead
    return text


def _inline_css_source(html: str) -> str | None:
    """Inline CSS into the template source once, with Jinja tags hidden in comments."""
    token = "<!--mlr{}-->"  # noqa: S105 - a placeholder pattern, not a secret
    masked, tags = _mask(html, token)
    try:
        return _unmask(_inliner.inline(masked), tags, token)
    except ValueError:
        return None


def _derive_text_source(html: str) -> str | None:
    """Derive a Jinja text template from the HTML template, once per version."""
    token = "MLRTAG{}X"  # noqa: S105 - a placeholder pattern, not a secret
    masked, tags = _mask(html, token)
    return _unmask(html_to_text(masked), tags, token, may_drop_output=True)


def html_to_text(html: str) -> str:
    """Readable plain text from HTML, links kept as [label](url)."""
    text = "\n".join(line.rstrip() for line in get_text(html, _text_config).splitlines())
    return _BLANK_LINES.sub("\n\n", text).strip()


# --- Finding templates ------------------------------------------------------------------

_cache: OrderedDict[tuple, Compiled] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_SIZE = 256


def compiled(source: Source) -> Compiled:
    """The compiled form of a source, built once per template version."""
    with _cache_lock:
        hit = _cache.get(source.cache_key)
        if hit is not None:
            _cache.move_to_end(source.cache_key)
            return hit
    built = Compiled(source)
    with _cache_lock:
        _cache[source.cache_key] = built
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return built


def subject_template(source: str) -> Compiled:
    """A subject-only template (A/B variants override the subject), cached by its text."""
    key = ("subject", source)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is None:
        hit = Compiled.__new__(Compiled)
        hit.subject = _compile(_text_env, source, "subject")
        with _cache_lock:
            _cache[key] = hit
    return hit


def language_candidates(*languages: str | None) -> list[str]:
    """Requested, then contact's, then default language; 'fr-ca' also tries 'fr'."""
    out: list[str] = []
    for language in (*languages, conf.get("DEFAULT_LANGUAGE")):
        if not language:
            continue
        language = language.lower().replace("_", "-")
        for candidate in (language, language.split("-")[0]):
            if candidate not in out:
                out.append(candidate)
    return out


_found: dict[tuple, tuple[float, Source]] = {}


def forget_templates() -> None:
    """Drop this process's template lookups (a Template row was saved or deleted)."""
    _found.clear()


def find_template(slug: str, *languages: str | None) -> Source:
    """The template for slug in the first language that has one, database before file.

    Lookups are cached for TEMPLATE_CACHE_SECONDS per process (dropped at once in the
    process that saves a template): the request path should not pay a query for a row
    that changes a few times a month.
    """
    candidates = language_candidates(*languages)
    key = (slug, tuple(candidates))
    ttl = float(conf.get("TEMPLATE_CACHE_SECONDS"))
    hit = _found.get(key)
    now = time.monotonic()
    if hit is not None and now - hit[0] < ttl:
        return hit[1]
    source = _lookup_template(slug, candidates)
    if ttl > 0:
        if len(_found) > 1024:
            _found.clear()
        _found[key] = (now, source)
    return source


def _lookup_template(slug: str, candidates: list[str]) -> Source:
    rows = {
        row.language: row
        for row in Template.objects.filter(slug=slug, language__in=candidates).only(
            "id", "slug", "language", "subject", "html", "text", "version", "purpose"
        )
    }
    for language in candidates:
        row = rows.get(language)
        if row is not None:
            return Source(
                slug=slug,
                language=language,
                subject=row.subject,
                html=row.html,
                text=row.text,
                # The content is part of the key: SQLite reuses the id of a deleted row,
                # and a new row starts again at version 1.
                cache_key=("db", row.pk, row.version, hash((row.subject, row.html, row.text))),
                template_id=row.pk,
                purpose=row.purpose,
            )
        found = _file_template(slug, language)
        if found is not None:
            return found
    raise TemplateNotFound(
        f"No template {slug!r} in languages {', '.join(candidates)} "
        "(neither a Template row nor templates/mailer/<slug>/)."
    )


def _template_dirs() -> list[Path]:
    dirs: list[Path] = []
    for engine in engines.all():
        for directory in getattr(engine, "template_dirs", ()):
            dirs.append(Path(directory))
    return dirs


def _file_template(slug: str, language: str) -> Source | None:
    """templates/mailer/<slug>/ holds the default language; <slug>/<lang>/ translations."""
    if not re.fullmatch(r"[-a-zA-Z0-9_]+", slug):
        return None
    default = language == conf.get("DEFAULT_LANGUAGE")
    for base in _template_dirs():
        folder = base / "mailer" / slug
        for where in ((folder / language),) + ((folder,) if default else ()):
            subject_file, html_file = where / "subject.txt", where / "body.html"
            if subject_file.is_file() and html_file.is_file():
                text_file = where / "body.txt"
                mtimes = tuple(
                    f.stat().st_mtime_ns for f in (subject_file, html_file) if f.exists()
                )
                return Source(
                    slug=slug,
                    language=language,
                    subject=subject_file.read_text(encoding="utf-8").strip(),
                    html=html_file.read_text(encoding="utf-8"),
                    text=text_file.read_text(encoding="utf-8") if text_file.is_file() else "",
                    cache_key=("file", str(where), mtimes),
                )
    return None


# --- Validation -------------------------------------------------------------------------


def allowed_names(slug: str, declared: set[str] | frozenset[str] = frozenset()) -> set[str]:
    return (
        set(STANDARD_CONTEXT)
        | set(BUILTIN_VARIABLES.get(slug, ()))
        | set(declared)
        | set(conf.get("EXTRA_CONTEXT"))
        | set(_JINJA_GLOBALS)
    )


def validate_template(template: Any) -> None:
    """Refuse a template that does not parse, uses unknown names or leaves the sandbox.

    ``template`` is a mailer Template (or anything with slug, subject, html, text and
    declared_variables). Raises TemplateError naming the field.
    """
    allowed = allowed_names(template.slug, template.declared_variables)
    if "\n" in template.subject or "\r" in template.subject:
        raise TemplateError("subject: must be one line.", field="subject")
    parts = {"subject": template.subject, "html": template.html, "text": template.text}
    for field, source in parts.items():
        if not source:
            if field != "text":
                raise TemplateError(f"{field}: may not be empty.", field=field)
            continue
        env = _html_env if field == "html" else _text_env
        try:
            ast = env.parse(source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"{field}: line {exc.lineno}: {exc.message}", field=field) from None
        unknown = sorted(meta.find_undeclared_variables(ast) - allowed)
        if unknown:
            raise TemplateError(
                f"{field}: unknown variable(s) {', '.join(unknown)}. Use the standard context "
                f"({', '.join(sorted(STANDARD_CONTEXT))}) or declare them under Variables.",
                field=field,
            )
        _refuse_private_access(ast, field)
        _sample_render(env, source, allowed, field)
        if field == "html" and getattr(template, "purpose", "") == "marketing":
            _require_marketing_footer(ast)


def _require_marketing_footer(ast: nodes.Template) -> None:
    """CAN-SPAM and RFC 8058: every marketing email has a way out and a postal address."""
    used = {node.name for node in ast.find_all(nodes.Name)}
    if not used & {"unsubscribe_url", "preferences_url"}:
        raise TemplateError(
            "html: a marketing template must link to {{ unsubscribe_url }} "
            "(or {{ preferences_url }}).",
            field="html",
        )
    if "postal_address" not in used:
        raise TemplateError(
            "html: a marketing template must show {{ postal_address }} (CAN-SPAM).", field="html"
        )


def _refuse_private_access(ast: nodes.Template, field: str) -> None:
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        name = node.attr if isinstance(node, nodes.Getattr) else None
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value if isinstance(node.arg.value, str) else None
        if name and name.startswith("_"):
            raise TemplateError(
                f"{field}: line {node.lineno}: access to {name!r} is not allowed.", field=field
            )


def sample_context(names: set[str]) -> dict[str, Any]:
    """Plausible values for preview and validation renders."""
    context: dict[str, Any] = {name: f"[{name}]" for name in names - set(_JINJA_GLOBALS)}
    context.update(
        app_name=conf.get("APP_NAME"),
        site_url=conf.get("SITE_URL"),
        recipient="ada@example.com",
        contact={
            "email": "ada@example.com",
            "name": "Ada Lovelace",
            "first_name": "Ada",
            "language": "en",
            "attributes": {},
        },
        message_id="00000000-0000-0000-0000-000000000000",
        language="en",
        unsubscribe_url=f"{conf.get('SITE_URL')}/mailer/unsubscribe/sample/",
        preferences_url=f"{conf.get('SITE_URL')}/mailer/preferences/sample/",
        postal_address=conf.get("POSTAL_ADDRESS") or "1 Sample Street, Springfield",
        user_name="Ada",
        expires_hours=72,
    )
    return context


def _sample_render(env, source: str, allowed: set[str], field: str) -> None:
    try:
        env.from_string(source).render(sample_context(allowed))
    except SecurityError as exc:
        raise TemplateError(f"{field}: refused by the sandbox: {exc}", field=field) from None
    except UndefinedError as exc:
        raise TemplateError(f"{field}: {exc}", field=field) from None
    except Exception:  # noqa: BLE001, S110 - sample values are not real data; only the two above are template faults
        pass


def check_header(name: str, value: str) -> None:
    """Refuse CR or LF in a value bound for a header (injection)."""
    if value and ("\r" in value or "\n" in value):
        raise HeaderInjection(f"{name} contains a line break.")


def site_url() -> str:
    return conf.get("SITE_URL").rstrip("/")
