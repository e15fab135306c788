"""Finding, validating and rendering email templates in Jinja2's sandbox, bounded.

Per template version (cached): parse, inline CSS, derive the text part, compile what it
includes. Per recipient: three Jinja renders within TEMPLATE_LIMITS (mailer.sandbox),
nothing else.
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

from . import conf, sandbox
from .exceptions import HeaderInjection, TemplateError, TemplateLimitExceeded, TemplateNotFound
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

_html_env = sandbox.BoundedEnvironment(autoescape=True)
_text_env = sandbox.BoundedEnvironment(autoescape=False)
_JINJA_GLOBALS = frozenset(_html_env.globals)
_JINJA_TAG = re.compile(r"{{.*?}}|{%.*?%}|{#.*?#}", re.S)
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_inliner = css_inline.CSSInliner(load_remote_stylesheets=False, keep_style_tags=True)
_text_config = ParserConfig(css=CSS_PROFILES["strict"], display_links=True)
_SLUG = re.compile(r"[-a-zA-Z0-9_]+")


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
    """A template version ready to render many times.

    What it includes, imports or extends is resolved now, in its language, and compiled
    with it: rendering needs no database, and a stale include is noticed by ``compiled``.
    ``unsaved`` stands for the row of its slug while a template is being validated.
    """

    def __init__(self, source: Source, *, unsaved: Source | None = None):
        self.source = source
        self.unsaved = unsaved
        self.partials: dict[str, Any] = {}  # "html:footer" -> its compiled template
        self.partial_keys: dict[tuple, tuple] = {}  # (slug, languages) -> the row's cache key
        self.subject = _compile(_text_env, source.subject, "subject")
        inlined = _inline_css_source(source.html)
        html = _Partials(self, "html")
        self.html = _compile(_html_env, inlined or source.html, "html", html)
        if html.used and inlined is not None:  # what it includes is inlined with it, per render
            inlined = None
            self.html = _compile(_html_env, source.html, "html", html)
        self.inline_per_render = inlined is None
        self.text = None
        text_source = source.text or _derive_text_source(source.html)
        if text_source:
            try:
                self.text = _compile(_text_env, text_source, "text", _Partials(self, "text"))
            except _NoTextPart as missing:
                if source.text:
                    raise TemplateError(
                        f"text: the included template {missing.slug!r} has no text part, and "
                        "none can be derived from its HTML; give it one.",
                        field="text",
                    ) from None
        self.text_per_render = self.text is None
        self.unsaved = None

    @classmethod
    def subject_only(cls, source: str) -> Compiled:
        """An A/B variant's subject: no HTML, no text, nothing to include."""
        built = cls.__new__(cls)
        built.partials, built.partial_keys = {}, {}
        built.subject = _compile(_text_env, source, "subject")
        return built

    def current(self) -> bool:
        """False once a template it includes was changed or deleted."""
        return all(
            getattr(_database_template(slug, list(languages)), "cache_key", None) == key
            for (slug, languages), key in self.partial_keys.items()
        )

    def render_subject(
        self, context: dict[str, Any], limits: sandbox.Limits | None = None, *, sample: bool = False
    ) -> str:
        limits = limits or sandbox.Limits.configured()
        subject = _run(self.subject, context, "subject", limits, sample=sample).strip()
        if "\r" in subject or "\n" in subject:
            raise HeaderInjection("The rendered subject contains a line break.")
        return subject

    def render(self, context: dict[str, Any], *, sample: bool = False) -> Rendered:
        """Render all three parts, each within TEMPLATE_LIMITS.

        ``sample``: the context holds sample values (validation, previews), so an error
        that real values would not raise leaves that part empty instead of failing; a
        limit, the sandbox or an undefined name still fail.
        """
        limits = sandbox.Limits.configured()
        subject = self.render_subject(context, limits, sample=sample)
        html = _run(self.html, context, "html", limits, self.partials, sample=sample)
        if self.inline_per_render:
            try:
                html = _inliner.inline(html)
            except ValueError as exc:
                raise TemplateError(
                    f"html: the CSS cannot be inlined: {exc}", field="html"
                ) from None
        if self.text is not None:
            text = _run(self.text, context, "text", limits, self.partials, sample=sample)
        else:
            text = html_to_text(html)
        return Rendered(subject=subject, html=html, text=_BLANK_LINES.sub("\n\n", text).strip())


class _NoTextPart(Exception):
    """An included template has no text part and none can be derived from its HTML."""

    def __init__(self, slug: str):
        super().__init__(slug)
        self.slug = slug


class _Partials:
    """Resolves the slugs one part includes, imports or extends to database templates in
    the includer's languages (never files), compiles each once, and refuses a cycle or
    nesting past INCLUDE_DEPTH."""

    def __init__(self, compiled: Compiled, part: str, chain: tuple[str, ...] = ()):
        self.compiled, self.part = compiled, part
        self.chain = chain or (compiled.source.slug,)
        self.used = False

    def __call__(self, slug: str, lineno: int) -> str:
        compiled, part = self.compiled, self.part
        if not _SLUG.fullmatch(slug):
            raise TemplateSyntaxError(
                f"{slug!r} is not a template's slug: include, import and extends name "
                "another template saved here, never a file.",
                lineno,
            )
        if slug in self.chain:
            raise TemplateSyntaxError(
                f"including {' → '.join((*self.chain, slug))} goes round in a cycle.", lineno
            )
        depth = sandbox.Limits.configured().include_depth
        if len(self.chain) > depth:
            raise TemplateLimitExceeded(
                f"{part}: line {lineno}: templates included more than {depth} deep "
                "(TEMPLATE_LIMITS INCLUDE_DEPTH).",
                limit="INCLUDE_DEPTH",
                field=part,
            )
        languages = language_candidates(compiled.source.language)
        if compiled.source.cache_key[0] == "file":
            # A file template (shipped with mailer or the host's own) shares a layout
            # from templates/mailer/layouts/; a database template never reaches a file.
            found = _file_layout(slug)
            if found is None:
                raise TemplateSyntaxError(
                    f"there is no layout templates/mailer/layouts/{slug}.html.", lineno
                )
        else:
            unsaved = compiled.unsaved
            found = (
                unsaved if unsaved and unsaved.slug == slug else _database_template(slug, languages)
            )
            if found is None:
                raise TemplateSyntaxError(f"there is no template {slug!r} to include.", lineno)
            compiled.partial_keys[(slug, tuple(languages))] = found.cache_key
        key = f"{part}:{slug}"
        if key not in compiled.partials:
            if part == "html":
                text = found.html
            else:
                text = found.text or _derive_text_source(found.html)
                if not text:
                    raise _NoTextPart(slug)
            env = _html_env if part == "html" else _text_env
            nested = _Partials(compiled, part, (*self.chain, slug))
            compiled.partials[key] = _compile(env, text, part, nested, count_all=True, name=slug)
        self.used = True
        return key


def _compile(
    env: sandbox.BoundedEnvironment,
    source: str,
    field: str,
    resolve: _Partials | None = None,
    *,
    count_all: bool = False,
    name: str | None = None,
):
    where = f"{field}: in the included template {name!r}" if name else field
    try:
        return env.bounded(source, resolve=resolve, count_all=count_all)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"{where}: line {exc.lineno}: {exc.message}", field=field) from None
    except (SyntaxError, RecursionError, MemoryError):
        # Python's own limits: 20 nested blocks, 200 nested parentheses.
        raise TemplateError(f"{where}: nested too deeply to compile.", field=field) from None


#: What a sandboxed render of JSON values can raise besides Jinja's errors: the template's
#: fault, never the infrastructure's (it reads no database and no network).
_RENDER_FAULTS = (
    ArithmeticError,
    AttributeError,
    LookupError,
    TypeError,
    ValueError,
    RuntimeError,  # RecursionError, a generator's StopIteration
    MemoryError,
    JinjaTemplateError,
)


def _run(
    template,
    context: dict[str, Any],
    field: str,
    limits: sandbox.Limits,
    partials: dict[str, Any] | None = None,
    *,
    sample: bool = False,
) -> str:
    try:
        return sandbox.render(template, context, sandbox.Budget(limits, partials))
    except TemplateLimitExceeded as exc:
        raise TemplateLimitExceeded(f"{field}: {exc}", limit=exc.limit, field=field) from None
    except SecurityError as exc:
        raise TemplateError(f"{field}: refused by the sandbox: {exc}", field=field) from None
    except UndefinedError as exc:
        raise TemplateError(f"{field}: {exc}", field=field) from None
    except _RENDER_FAULTS as exc:
        if sample and not isinstance(exc, RuntimeError | MemoryError):
            return ""  # sample values are not real data; recursion and memory do not depend on them
        if isinstance(exc, JinjaTemplateError):
            raise TemplateError(f"{field}: {exc}", field=field) from None
        detail = f"{type(exc).__name__}: {exc}"[:200].rstrip(": ")
        raise TemplateError(f"{field}: {detail}", field=field) from None


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
    """The compiled form of a source, built once per template version (and again when a
    template it includes changes)."""
    with _cache_lock:
        hit = _cache.get(source.cache_key)
        if hit is not None:
            _cache.move_to_end(source.cache_key)
    if hit is not None and hit.current():
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
        hit = Compiled.subject_only(source)
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


_found: dict[tuple, tuple[float, Source | None]] = {}


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
    rows = _database_rows(slug, candidates)
    for language in candidates:
        row = rows.get(language)
        if row is not None:
            return _row_source(row)
        found = _file_template(slug, language)
        if found is not None:
            return found
    raise TemplateNotFound(
        f"No template {slug!r} in languages {', '.join(candidates)} "
        "(neither a Template row nor a file templates/mailer/<slug>/)."
    )


def _database_rows(slug: str, candidates: list[str]) -> dict[str, Template]:
    return {
        row.language: row
        for row in Template.objects.filter(slug=slug, language__in=candidates).only(
            "id", "slug", "language", "subject", "html", "text", "version", "purpose"
        )
    }


def _row_source(row: Template) -> Source:
    return Source(
        slug=row.slug,
        language=row.language,
        subject=row.subject,
        html=row.html,
        text=row.text,
        # The content is part of the key: SQLite reuses the id of a deleted row, and a new
        # row starts again at version 1.
        cache_key=("db", row.pk, row.version, hash((row.subject, row.html, row.text))),
        template_id=row.pk,
        purpose=row.purpose,
    )


def _database_template(slug: str, candidates: list[str]) -> Source | None:
    """The database template an include names, in the first language that has one; never a
    file. Cached as find_template's lookups are."""
    key = ("partial", slug, tuple(candidates))
    ttl = float(conf.get("TEMPLATE_CACHE_SECONDS"))
    hit = _found.get(key)
    now = time.monotonic()
    if hit is not None and now - hit[0] < ttl:
        return hit[1]
    rows = _database_rows(slug, candidates)
    row = next((rows[language] for language in candidates if language in rows), None)
    source = _row_source(row) if row is not None else None
    if ttl > 0:
        if len(_found) > 1024:
            _found.clear()
        _found[key] = (now, source)
    return source


#: The built-in email templates and layouts, shipped inside the package: found even when
#: the host's TEMPLATES has no APP_DIRS (or no Django engine at all).
BUILT_IN_TEMPLATES = Path(__file__).resolve().parent / "templates"


def _template_dirs() -> list[Path]:
    """The host's template directories first (its own templates/mailer/<slug>/ and
    layouts replace mailer's), then mailer's own."""
    dirs: list[Path] = []
    for engine in engines.all():
        for directory in getattr(engine, "template_dirs", ()):
            if Path(directory) not in dirs:
                dirs.append(Path(directory))
    if BUILT_IN_TEMPLATES not in dirs:
        dirs.append(BUILT_IN_TEMPLATES)
    return dirs


def _file_layout(name: str) -> Source | None:
    """templates/mailer/layouts/<name>.html (and .txt, else the text is derived), which
    file templates include, import or extend by name."""
    for base in _template_dirs():
        html_file = base / "mailer" / "layouts" / f"{name}.html"
        if html_file.is_file():
            text_file = html_file.with_suffix(".txt")
            return Source(
                slug=name,
                language="",
                subject="",
                html=html_file.read_text(encoding="utf-8"),
                text=text_file.read_text(encoding="utf-8") if text_file.is_file() else "",
                cache_key=("file", str(html_file), html_file.stat().st_mtime_ns),
            )
    return None


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
                html = html_file.read_text(encoding="utf-8")
                return Source(
                    slug=slug,
                    language=language,
                    subject=subject_file.read_text(encoding="utf-8").strip(),
                    html=_flatten_layout(html) or html,
                    text=text_file.read_text(encoding="utf-8") if text_file.is_file() else "",
                    cache_key=("file", str(where), mtimes),
                )
    return None


_EXTENDS = re.compile(r"""\A\s*\{%-?\s*extends\s+["']([-a-zA-Z0-9_]+)["']\s*-?%\}""")
_BLOCK = re.compile(
    r"\{%-?\s*block\s+(\w+)\s*-?%\}(.*?)\{%-?\s*endblock(?:\s+\w+)?\s*-?%\}", re.DOTALL
)


_BLOCK_TAG = re.compile(r"\{%-?\s*block\b")


def _flatten_layout(html: str, depth: int = 0) -> str | None:
    """A file template that extends a layout, as one source: the layout with the child's
    blocks put in. Its CSS is then inlined and its text derived once per version, not per
    email (inheritance at render time costs ten times the render). None when the template
    does more than fill plain blocks (nested blocks, super(), content outside blocks):
    Jinja's own inheritance then runs at render time."""
    match = _EXTENDS.match(html)
    if match is None or depth > 5:
        return None
    layout = _file_layout(match.group(1))
    if layout is None:
        return None
    rest = html[match.end() :]
    blocks = dict(_BLOCK.findall(rest))
    layout_blocks = [body for _, body in _BLOCK.findall(layout.html)]
    if (
        any(_BLOCK_TAG.search(body) or "super()" in body for body in blocks.values())
        or any(_BLOCK_TAG.search(body) for body in layout_blocks)  # nested: Jinja's way
        or _BLOCK.sub("", rest).strip()  # anything outside the blocks
    ):
        return None
    flat = _BLOCK.sub(lambda m: blocks.get(m.group(1), m.group(2)), layout.html)
    # A layout may extend another; what cannot be flattened further extends at render.
    return _flatten_layout(flat, depth + 1) or flat


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
    """Refuse a template that does not parse, uses unknown names, leaves the sandbox,
    includes anything but another saved template, or reaches a TEMPLATE_LIMITS bound when
    rendered with sample values: one that saves, renders.

    ``template`` is a mailer Template (or anything with slug, subject, html, text and
    declared_variables). Raises TemplateError naming the field.
    """
    allowed = allowed_names(template.slug, template.declared_variables)
    if "\n" in template.subject or "\r" in template.subject:
        raise TemplateError("subject: must be one line.", field="subject")
    longest = sandbox.Limits.configured().output_chars
    parts = {"subject": template.subject, "html": template.html, "text": template.text}
    for field, source in parts.items():
        if not source:
            if field != "text":
                raise TemplateError(f"{field}: may not be empty.", field=field)
            continue
        if len(source) > longest:
            raise TemplateLimitExceeded(
                f"{field}: longer than {longest} characters (TEMPLATE_LIMITS OUTPUT_CHARS).",
                limit="OUTPUT_CHARS",
                field=field,
            )
        env = _html_env if field == "html" else _text_env
        try:
            ast = env.parse(source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"{field}: line {exc.lineno}: {exc.message}", field=field) from None
        except RecursionError:
            raise TemplateError(f"{field}: nested too deeply to compile.", field=field) from None
        unknown = sorted(meta.find_undeclared_variables(ast) - allowed)
        if unknown:
            raise TemplateError(
                f"{field}: unknown variable(s) {', '.join(unknown)}. Use the standard context "
                f"({', '.join(sorted(STANDARD_CONTEXT))}) or declare them under Variables.",
                field=field,
            )
        _refuse_private_access(ast, field)
        if field == "html" and getattr(template, "purpose", "") == "marketing":
            _require_marketing_footer(ast)
    unsaved = Source(
        slug=template.slug,
        language=getattr(template, "language", "") or conf.get("DEFAULT_LANGUAGE"),
        subject=template.subject,
        html=template.html,
        text=template.text,
        cache_key=("unsaved",),
    )
    # Compiled as it will be sent (CSS, text part, includes), then rendered as a preview is.
    Compiled(unsaved, unsaved=unsaved).render(sample_context(allowed), sample=True)


def validate_subject(subject: str, template: Any = None) -> None:
    """An A/B variant's subject, held to what a template's subject is: it parses, uses
    only names its template allows, stays in the sandbox and renders within the bounds.
    Raises TemplateError (field "subject")."""
    if "\n" in subject or "\r" in subject:
        raise TemplateError("subject: must be one line.", field="subject")
    slug = getattr(template, "slug", "")
    allowed = allowed_names(slug, getattr(template, "declared_variables", None) or frozenset())
    try:
        ast = _text_env.parse(subject)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"subject: line {exc.lineno}: {exc.message}", field="subject") from None
    except RecursionError:
        raise TemplateError("subject: nested too deeply to compile.", field="subject") from None
    unknown = sorted(meta.find_undeclared_variables(ast) - allowed)
    if unknown:
        raise TemplateError(f"subject: unknown variable(s) {', '.join(unknown)}.", field="subject")
    _refuse_private_access(ast, "subject")
    Compiled.subject_only(subject).render_subject(sample_context(allowed), sample=True)


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


def check_header(name: str, value: str) -> None:
    """Refuse CR or LF in a value bound for a header (injection)."""
    if value and ("\r" in value or "\n" in value):
        raise HeaderInjection(f"{name} contains a line break.")


def site_url() -> str:
    return conf.get("SITE_URL").rstrip("/")
