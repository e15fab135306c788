"""Hostile templates: every render (save, admin preview, send) stops at TEMPLATE_LIMITS.

Each hostile template is tried through the doors a marketer or an attacker with a staff
account uses: the admin's add and change forms, the admin's previews of a template and of
a message, and sending (``api.send``, then a worker's drain against a real SMTP server).
A template stored before these bounds existed is put in with ``QuerySet.update``, which
skips validation, as a row from an older release would be.
"""

from __future__ import annotations

import tracemalloc
import uuid

import pytest
from django.urls import reverse
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailer import api, checks, delivery, rendering, sandbox
from mailer.exceptions import MailerConfigurationError, TemplateError, TemplateLimitExceeded
from mailer.models import Kind, Message, MessageStatus, Template
from tests.factories import MessageFactory, TemplateFactory

pytestmark = pytest.mark.django_db

WELCOME = {"user_name": "Ada", "login_url": "http://localhost:8000/"}

#: Templates that run away when rendered, and the bound that stops each.
RUNAWAY = {
    "nested range loops": (
        "{% for i in range(10000) %}{% for j in range(10000) %}{{ j }}{% endfor %}{% endfor %}",
        "ITERATIONS",
    ),
    "9 ** (9 ** 9)": ("<p>{{ 9 ** (9 ** 9) }}</p>", "NUMBER_BITS"),
    "squaring in a loop": (
        "{% set ns = namespace(x=9) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
        "{% endfor %}{{ ns.x }}",
        "NUMBER_BITS",
    ),
    "'a' * 10**9": ("<p>{{ 'a' * 10**9 }}</p>", "OUTPUT_CHARS"),
    "constant folded at compile time": ("<p>{{ 'a'|center(1000000000) }}</p>", "OUTPUT_CHARS"),
    "str.ljust": ("<p>{{ 'a'.ljust(1000000000) }}</p>", "OUTPUT_CHARS"),
    "str.format width": ("<p>{{ '{:>1000000000}'.format('a') }}</p>", "OUTPUT_CHARS"),
    "% width": ("<p>{{ '%1000000000s' % 'a' }}</p>", "OUTPUT_CHARS"),
    "% width on bytes": ("<p>{{ '%1000000000s'.encode() % ('a'.encode(),) }}</p>", "OUTPUT_CHARS"),
    "int.to_bytes": ("<p>{{ (1).to_bytes(1000000000, 'big')|length }}</p>", "OUTPUT_CHARS"),
    "lipsum": ("<p>{{ lipsum(1000000, max=1000000) }}</p>", "OUTPUT_CHARS"),
    "doubling with ~": (
        "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s|length }}",
        "OUTPUT_CHARS",
    ),
    "doubling through macro arguments": (
        "{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}"
        "{% endmacro %}{{ d('a', 64) }}",
        "OUTPUT_CHARS",
    ),
    "many large values": (
        "{{ range(10000)|map('center', 999999)|list|length }}",
        "MEMORY_CHARS",
    ),
    "range(10**9)": ("{% for i in range(10**9) %}{{ i }}{% endfor %}", "RANGE"),
    "deep macro recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RECURSION"),
    "a block calling itself": (
        "{% block b %}{{ self.b() }}{{ self.b() }}{% endblock %}",
        "RECURSION",
    ),
    "endless recursive loop": (
        "{% for c in 'ab' recursive %}{{ loop('ab') }}{% endfor %}",
        "RECURSION",
    ),
    "long output": ("{% for i in range(10000) %}{{ 'x' * 1000 }}{% endfor %}", "OUTPUT_CHARS"),
    "long literal output": (
        "{% for i in range(10000) %}" + "y" * 1000 + "{% endfor %}",
        "OUTPUT_CHARS",
    ),
    "long output kept in a macro": (
        "{% macro m() %}{% for i in range(10000) %}{% for j in range(10) %}" + "z" * 1000
        + "{% endfor %}{% endfor %}{% endmacro %}{{ m()|length }}",
        "MEMORY_CHARS",
    ),
}  # fmt: skip

#: Templates refused when compiled: files, names computed at render time, Python's limits.
REFUSED = {
    "include of a file": ("{% include '/etc/passwd' %}", "never a file"),
    "include of a relative path": ("{% include '../project/settings.py' %}", "never a file"),
    "import of a page template": (
        "{% import 'mailer/pages/base.html' as page %}{{ page }}",
        "never a file",
    ),
    "extends of a page template": ("{% extends 'base.html' %}", "never a file"),
    "from-import of a file": ("{% from 'registration/x.html' import y %}", "never a file"),
    "include of a computed name": (
        "{% set name = '/etc/' ~ 'passwd' %}{% include name %}",
        "slug in quotes",
    ),
    "include of a list of names": ("{% include ['a', 'b'] %}", "slug in quotes"),
    "25 nested loops": (
        "{% for i in range(1) %}" * 25 + "x" + "{% endfor %}" * 25,
        "nested too deeply",
    ),
}  # fmt: skip

#: Reaching Python's internals, refused by the sandbox.
INTERNALS = {
    "''.__class__.__mro__": "<p>{{ ''.__class__.__mro__ }}</p>",
    "a class through a method": "<p>{{ recipient.upper.__self__.__class__.__mro__ }}</p>",
    "format reaching attributes": "<p>{{ '{0.__class__.__mro__}'.format(recipient) }}</p>",
}


@pytest.fixture(autouse=True)
def steady_cpu(settings):
    """Each runaway stops at its own bound, not at the CPU bound on a busy machine (one test
    below sets a short CPU bound on purpose)."""
    limits(settings, CPU_SECONDS=120)


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def limits(settings, **values) -> None:
    current = settings.MAILER.get("TEMPLATE_LIMITS", {})
    settings.MAILER = {**settings.MAILER, "TEMPLATE_LIMITS": {**current, **values}}


def source(html: str, *, subject: str = "Hello", text: str = "") -> rendering.Source:
    return rendering.Source(
        slug="adhoc",
        language="en",
        subject=subject,
        html=html,
        text=text,
        cache_key=("test", uuid.uuid4().hex),
    )


def sample() -> dict:
    return rendering.sample_context(rendering.STANDARD_CONTEXT)


def stored(html: str, *, slug: str = "hostile", **fields) -> Template:
    """A template row holding ``html`` without validation, as an older release saved it."""
    template = TemplateFactory(slug=slug, **fields)
    Template.objects.filter(pk=template.pk).update(html=html)
    rendering.forget_templates()
    template.refresh_from_db()
    return template


def render_within_memory(html: str, **kwargs) -> tuple[Exception | None, int]:
    """Render, returning what it raised and the peak memory allocated meanwhile."""
    tracemalloc.start()
    try:
        rendering.Compiled(source(html, **kwargs)).render(sample())
    except TemplateError as exc:
        return exc, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return None, 0


# --- Rendering -------------------------------------------------------------------------------


@pytest.mark.parametrize("html, limit", RUNAWAY.values(), ids=RUNAWAY)
def test_runaway_template_stops_at_its_bound_within_bounded_memory(html, limit):
    error, peak = render_within_memory(html)

    assert isinstance(error, TemplateLimitExceeded)
    assert error.limit == limit
    assert error.field == "html"
    assert str(error).startswith("html: ")
    assert f"(TEMPLATE_LIMITS {limit})" in str(error)
    # The largest value is 1,000,000 characters and all of them 10,000,000; a runaway that
    # were not stopped would take gigabytes.
    assert peak < 80 * 2**20


def test_runaway_subject_stops_at_its_bound():
    with pytest.raises(TemplateLimitExceeded) as caught:
        rendering.Compiled(source("<p>Hi</p>", subject="{{ 'a' * 10**9 }}")).render(sample())

    assert caught.value.field == "subject"
    assert caught.value.limit == "OUTPUT_CHARS"


def test_runaway_explicit_text_part_stops_at_its_bound():
    text = "{% for i in range(10**9) %}{% endfor %}"
    with pytest.raises(TemplateLimitExceeded) as caught:
        rendering.Compiled(source("<p>Hi</p>", text=text)).render(sample())

    assert caught.value.field == "text"
    assert caught.value.limit == "RANGE"


def test_cpu_bound_stops_a_template_that_only_spins(settings):
    limits(settings, ITERATIONS=10**9, CPU_SECONDS=0.2)
    spin = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"

    with pytest.raises(TemplateLimitExceeded) as caught:
        rendering.Compiled(source(spin)).render(sample())

    assert caught.value.limit == "CPU_SECONDS"
    assert "took more than 0.2 s of CPU" in str(caught.value)


@pytest.mark.parametrize("html, refused", REFUSED.values(), ids=REFUSED)
def test_template_that_reaches_for_files_or_python_limits_does_not_compile(html, refused):
    with pytest.raises(TemplateError) as caught:
        rendering.Compiled(source(html))

    assert caught.value.field == "html"
    assert refused in str(caught.value)


@pytest.mark.parametrize("html", INTERNALS.values(), ids=INTERNALS)
def test_python_internals_are_refused_at_render_time(html):
    with pytest.raises(TemplateError) as caught:
        rendering.Compiled(source(html)).render(sample())

    assert "sandbox" in str(caught.value) or "unsafe" in str(caught.value)


ORDINARY = {
    "a table with formatting": (
        "<table>{% for row in rows %}<tr><td>{{ loop.index }}. {{ row.name|title }}</td>"
        "<td>{{ '%.2f'|format(row.price) }}</td><td>{{ '{:,}'.format(row.count) }}</td></tr>"
        "{% endfor %}</table>"
    ),
    "a running total": (
        "{% set ns = namespace(total=0) %}{% for row in rows %}{% set ns.total = ns.total + "
        "row.price * row.count %}{% endfor %}<p>{{ ns.total|round(2) }} {{ 2 ** 64 }}</p>"
    ),
    "a macro with a caller": (
        "{% macro button(url) %}<a href='{{ url }}'>{{ caller() }}</a>{% endmacro %}"
        "{% call button(site_url) %}Open {{ app_name ~ '!' }}{% endcall %}"
    ),
    "a recursive loop": (
        "<ul>{% for node in tree recursive %}<li>{{ node.name }}{% if node.children %}<ul>"
        "{{ loop(node.children) }}</ul>{% endif %}</li>{% endfor %}</ul>"
    ),
    "lists, dicts and joins": (
        "{% set words = ['a', recipient, contact.name] %}<p>{{ words|join(', ') }} "
        "{{ {'k': recipient}|dictsort }} {{ (rows|map(attribute='name')|list)[:2] }} "
        "{{ rows|batch(3)|list|length }} {{ [1, 2] * 3 }}</p>"
    ),
    "blocks and string methods": (
        "{% filter upper %}{{ recipient }}{% endfilter %}{% set x %}{{ contact.name }}"
        "{% endset %}{{ x|length }} {{ 'abc'.replace('b', 'xyz').center(9) }} "
        "{{ 'a\tb'.expandtabs(4) }} {{ '-'.join(['x', 'y']) }} {{ '%s=%d' % ('n', 7) }}"
    ),
}


@pytest.mark.parametrize("html", ORDINARY.values(), ids=ORDINARY)
def test_ordinary_templates_render_as_in_an_unbounded_sandbox(html):
    rows = [{"name": f"item {n}", "price": n * 1.25, "count": n * 1000} for n in range(300)]
    tree = [{"name": "a", "children": [{"name": "b", "children": [{"name": "c"}]}]}]
    context = {**sample(), "rows": rows, "tree": tree}
    unbounded = ImmutableSandboxedEnvironment(autoescape=True).from_string(html)
    bounded = sandbox.BoundedEnvironment(autoescape=True).bounded(html)

    expected = unbounded.render(context)

    assert sandbox.render(bounded, context, sandbox.Budget(sandbox.Limits.configured())) == expected
    assert expected.strip()


def test_limits_are_configurable(settings):
    html = "{% for i in range(200) %}{{ i }}{% endfor %}"
    assert rendering.Compiled(source(html)).render(sample()).html

    limits(settings, RANGE=100)

    with pytest.raises(TemplateLimitExceeded) as caught:
        rendering.Compiled(source(html)).render(sample())
    assert "range() of more than 100 items" in str(caught.value)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"RANGE": 0}, "'RANGE'] is 0"),
        ({"ITERATIONS": "many"}, "'ITERATIONS'] is 'many'"),
        ({"CPU_SECONDS": -1}, "positive number of seconds"),
        ({"RANGES": 10}, "unknown key 'RANGES'"),
    ],
)
def test_malformed_limits_are_a_configuration_error(settings, values, message):
    limits(settings, **values)

    with pytest.raises(MailerConfigurationError) as caught:
        rendering.Compiled(source("<p>{{ recipient }}</p>")).render(sample())

    assert message in str(caught.value)


def test_malformed_limits_fail_the_system_check(settings):
    limits(settings, OUTPUT_CHARS=0)

    errors = checks.check_settings()

    assert [e.id for e in errors if "TEMPLATE_LIMITS'" in e.msg] == ["mailer.E001"]
    limits(settings, OUTPUT_CHARS=1000)
    assert not [e for e in checks.check_settings() if "TEMPLATE_LIMITS" in e.msg]


# --- Saving in the admin ------------------------------------------------------------------------


def template_form(**values) -> dict:
    return {
        "slug": "promo",
        "language": "en",
        "purpose": Template.Purpose.TRANSACTIONAL,
        "description": "",
        "subject": "Hi {{ contact.first_name }}",
        "html": "<p>Hello</p>",
        "text": "",
        "variables": "",
        **values,
    }


def html_error(response) -> str:
    assert response.status_code == 200
    return " ".join(response.context["adminform"].form.errors["html"])


HOSTILE = {
    **{name: (html, f"(TEMPLATE_LIMITS {limit})") for name, (html, limit) in RUNAWAY.items()},
    **REFUSED,
    "''.__class__.__mro__": (INTERNALS["''.__class__.__mro__"], "not allowed"),
    "format reaching attributes": (INTERNALS["format reaching attributes"], "unsafe"),
    "source longer than the output": ("x" * 1_000_001, "(TEMPLATE_LIMITS OUTPUT_CHARS)"),
}


@pytest.mark.parametrize("html, error", HOSTILE.values(), ids=HOSTILE)
def test_admin_add_form_refuses_hostile_template_and_saves_nothing(admin_client, html, error):
    response = admin_client.post(reverse("admin:mailer_template_add"), template_form(html=html))

    assert error in html_error(response)
    assert not Template.objects.exists()


@pytest.mark.parametrize("name", ["nested range loops", "'a' * 10**9", "deep macro recursion"])
def test_admin_change_form_refuses_hostile_edit_and_keeps_the_template(admin_client, name):
    template = TemplateFactory(slug="promo", html="<p>Hello {{ contact.name }}</p>")
    html, limit = RUNAWAY[name]

    response = admin_client.post(
        reverse("admin:mailer_template_change", args=[template.pk]), template_form(html=html)
    )

    assert f"(TEMPLATE_LIMITS {limit})" in html_error(response)
    kept = Template.objects.get()
    assert (kept.html, kept.version) == ("<p>Hello {{ contact.name }}</p>", 1)


def test_admin_refuses_a_subject_that_includes(admin_client):
    response = admin_client.post(
        reverse("admin:mailer_template_add"), template_form(subject="{% include 'footer' %}")
    )

    assert "may not include" in " ".join(response.context["adminform"].form.errors["subject"])
    assert not Template.objects.exists()


# --- Previews in the admin ----------------------------------------------------------------------

PREVIEWED = {
    **{name: (html, f"(TEMPLATE_LIMITS {limit})") for name, (html, limit) in RUNAWAY.items()},
    **{name: (html, text) for name, (html, text) in REFUSED.items()},
    **{name: (html, "unsafe") for name, html in INTERNALS.items()},
}


@pytest.mark.parametrize("html, error", PREVIEWED.values(), ids=PREVIEWED)
def test_template_preview_of_a_stored_hostile_template_shows_the_error(admin_client, html, error):
    template = stored(html)

    response = admin_client.get(reverse("admin:mailer_template_change", args=[template.pk]))

    assert response.status_code == 200
    content = response.content.decode()
    assert "Cannot render: html: " in content
    assert error.replace("'", "&#x27;") in content or error in content


@pytest.mark.parametrize("name", ["nested range loops", "9 ** (9 ** 9)", "range(10**9)"])
def test_message_preview_of_a_hostile_template_shows_the_error(admin_client, name):
    html, limit = RUNAWAY[name]
    stored(html)
    message = MessageFactory(template_slug="hostile", context={})

    response = admin_client.get(reverse("admin:mailer_message_change", args=[message.pk]))

    assert response.status_code == 200
    content = response.content.decode()
    assert "Cannot render this message: html: " in content
    assert f"(TEMPLATE_LIMITS {limit})" in content


# --- Sending ------------------------------------------------------------------------------------


@pytest.mark.parametrize("html, limit", RUNAWAY.values(), ids=RUNAWAY)
def test_sending_a_hostile_template_fails_that_message_and_the_batch_goes_on(
    html, limit, smtp, broker, django_capture_on_commit_callbacks
):
    stored(html)
    with django_capture_on_commit_callbacks(execute=True):
        hostile = api.send("hostile", to="target@example.com")
        fine = api.send("welcome", to="ada@example.com", context=WELCOME)

    assert delivery.drain(Kind.TRANSACTIONAL) == 1

    hostile.refresh_from_db()
    assert hostile.status == MessageStatus.FAILED
    assert hostile.attempts == 1  # permanent: never retried
    assert hostile.last_error.startswith("Template: html: ")
    assert f"(TEMPLATE_LIMITS {limit})" in hostile.last_error
    fine.refresh_from_db()
    assert fine.status == MessageStatus.SENT
    assert [m.rcpt_tos for m in smtp.messages] == [["ada@example.com"]]


@pytest.mark.parametrize("html", INTERNALS.values(), ids=INTERNALS)
def test_sending_a_template_reaching_for_internals_fails_that_message(
    html, smtp, broker, django_capture_on_commit_callbacks
):
    stored(html)
    with django_capture_on_commit_callbacks(execute=True):
        hostile = api.send("hostile", to="target@example.com")
        fine = api.send("welcome", to="ada@example.com", context=WELCOME)

    assert delivery.drain(Kind.TRANSACTIONAL) == 1

    hostile.refresh_from_db()
    assert hostile.status == MessageStatus.FAILED
    assert "refused by the sandbox" in hostile.last_error
    fine.refresh_from_db()
    assert fine.status == MessageStatus.SENT


def test_a_stored_include_cycle_is_shown_in_the_preview_and_refused_when_sending(admin_client):
    template = stored("<p>{% include 'hostile' %}</p>")

    response = admin_client.get(reverse("admin:mailer_template_change", args=[template.pk]))

    assert response.status_code == 200
    assert "including hostile → hostile goes round in a cycle" in response.content.decode()
    with pytest.raises(TemplateError):
        api.send("hostile", to="target@example.com")
    assert not Message.objects.exists()


def test_a_message_queued_before_its_template_turned_hostile_fails_at_send(smtp, broker):
    TemplateFactory(slug="news")
    message = MessageFactory(template_slug="news", context={})
    Template.objects.filter(slug="news").update(html=RUNAWAY["deep macro recursion"][0])
    rendering.forget_templates()

    assert delivery.drain(Kind.TRANSACTIONAL) == 0

    message.refresh_from_db()
    assert message.status == MessageStatus.FAILED
    assert "(TEMPLATE_LIMITS RECURSION)" in message.last_error
    assert smtp.messages == []


@pytest.mark.parametrize("html, refused", REFUSED.values(), ids=REFUSED)
def test_sending_a_template_that_cannot_compile_is_refused_and_stores_nothing(html, refused):
    stored(html)

    with pytest.raises(TemplateError) as caught:
        api.send("hostile", to="target@example.com")

    assert refused in str(caught.value)
    assert not Message.objects.exists()


def test_sending_through_a_hostile_subject_is_refused_and_stores_nothing():
    template = TemplateFactory(slug="hostile")
    Template.objects.filter(pk=template.pk).update(subject="{{ 'a' * 10**9 }}")
    rendering.forget_templates()

    with pytest.raises(TemplateLimitExceeded) as caught:
        api.send("hostile", to="target@example.com")

    assert caught.value.limit == "OUTPUT_CHARS"
    assert not Message.objects.exists()


# --- Database templates included, imported, extended -----------------------------------------


def test_database_templates_include_import_and_extend_each_other(
    admin_client, smtp, broker, django_capture_on_commit_callbacks
):
    TemplateFactory(slug="footer", html="<p>Sent by {{ app_name }} to {{ recipient }}</p>")
    TemplateFactory(
        slug="buttons", html="{% macro button(url) %}<a href='{{ url }}'>Go</a>{% endmacro %}"
    )
    TemplateFactory(
        slug="layout",
        html="<html><body>{% block body %}{% endblock %}{% include 'footer' %}</body></html>",
    )
    response = admin_client.post(
        reverse("admin:mailer_template_add"),
        template_form(
            slug="news",
            html="{% extends 'layout' %}{% block body %}{% import 'buttons' as b %}"
            "<h1>News</h1>{{ b.button(site_url) }}{% endblock %}",
        ),
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    news = Template.objects.get(slug="news")
    preview = admin_client.get(reverse("admin:mailer_template_change", args=[news.pk]))
    assert "Sent by" in preview.content.decode()

    with django_capture_on_commit_callbacks(execute=True):
        api.send("news", to="ada@example.com")
    delivery.drain(Kind.TRANSACTIONAL)

    received = smtp.to("ada@example.com")[0].parsed()
    html = received.get_body(("html",)).get_content()
    text = received.get_body(("plain",)).get_content()
    assert "<h1>News</h1>" in html and "href=" in html
    assert "Sent by Mailer Demo to ada@example.com" in html
    assert "News" in text and "Sent by Mailer Demo to ada@example.com" in text


def test_an_edited_include_is_rendered_at_once_in_this_process():
    footer = TemplateFactory(slug="footer", html="<p>old footer</p>")
    TemplateFactory(slug="news", html="<p>News</p>{% include 'footer' %}")
    news = rendering.find_template("news", "en")
    assert "old footer" in rendering.compiled(news).render(sample()).html

    footer.html = "<p>new footer</p>"
    footer.save()

    assert "new footer" in rendering.compiled(news).render(sample()).html


def test_including_itself_is_a_cycle_refused_on_save():
    with pytest.raises(TemplateError) as caught:
        TemplateFactory(slug="loop", html="<p>{% include 'loop' %}</p>")

    assert "including loop → loop goes round in a cycle" in str(caught.value)
    assert not Template.objects.exists()


def test_a_cycle_through_another_template_is_refused_on_save():
    first = TemplateFactory(slug="first", html="<p>first</p>")
    TemplateFactory(slug="second", html="<p>{% include 'first' %}</p>")

    first.html = "<p>{% include 'second' %}</p>"
    with pytest.raises(TemplateError) as caught:
        first.save()

    assert "first → second → first" in str(caught.value)
    assert Template.objects.get(slug="first").html == "<p>first</p>"


def test_includes_nested_past_the_bound_are_refused(settings):
    limits(settings, INCLUDE_DEPTH=2)
    TemplateFactory(slug="level-3", html="<p>3</p>")
    TemplateFactory(slug="level-2", html="<p>{% include 'level-3' %}</p>")
    TemplateFactory(slug="level-1", html="<p>{% include 'level-2' %}</p>")

    with pytest.raises(TemplateLimitExceeded) as caught:
        TemplateFactory(slug="top", html="<p>{% include 'level-1' %}</p>")

    assert caught.value.limit == "INCLUDE_DEPTH"
    assert not Template.objects.filter(slug="top").exists()


def test_an_included_runaway_stops_at_its_bound_even_inside_a_macro():
    stored(RUNAWAY["long literal output"][0], slug="bulky")
    html = (
        "{% macro m() %}{% for i in range(20) %}{% include 'bulky' %}{% endfor %}{% endmacro %}"
        "{{ m() }}"
    )

    error, peak = render_within_memory(html)

    assert isinstance(error, TemplateLimitExceeded)
    assert error.limit in ("OUTPUT_CHARS", "MEMORY_CHARS")
    assert peak < 80 * 2**20


def test_a_missing_include_is_refused_on_save():
    with pytest.raises(TemplateError) as caught:
        TemplateFactory(html="<p>{% include 'nowhere' %}</p>")

    assert "there is no template 'nowhere' to include" in str(caught.value)
