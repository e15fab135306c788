"""Templates: validation on save, CSS inlining, text parts, escaping and the sandbox."""

from __future__ import annotations

import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mailer import rendering
from mailer.exceptions import TemplateError
from mailer.models import Contact, Template
from tests.factories import ContactFactory, TemplateFactory

pytestmark = pytest.mark.django_db

HTML_TAG = re.compile(r"</?[a-zA-Z!][^>]*>")


def source(html: str, *, subject: str = "Hello", text: str = "") -> rendering.Source:
    """A source that skips Template.save()'s validation, as a file template would."""
    return rendering.Source(
        slug="adhoc",
        language="en",
        subject=subject,
        html=html,
        text=text,
        cache_key=("test", uuid.uuid4().hex),
    )


def context(**values) -> dict:
    return {**rendering.sample_context(rendering.STANDARD_CONTEXT), **values}


# --- Validation on save ---------------------------------------------------------------


def assert_refused(field: str, **fields) -> TemplateError:
    before = Template.objects.count()
    with pytest.raises(TemplateError) as caught:
        TemplateFactory(**fields)
    assert caught.value.field == field
    assert Template.objects.count() == before
    return caught.value


def test_save_refuses_syntax_error_on_the_html_field():
    error = assert_refused("html", html="<p>{% if contact.name %}Hi</p>")
    assert "line 1" in str(error)


def test_save_refuses_unknown_variable_and_names_it():
    error = assert_refused("html", html="<p>{{ order_total }}</p>")
    assert "order_total" in str(error)


def test_save_refuses_unknown_variable_in_subject():
    error = assert_refused("subject", subject="Your order {{ order_id }}")
    assert "order_id" in str(error)


@pytest.mark.parametrize(
    "html",
    [
        "<p>{{ ''.__class__ }}</p>",
        "<p>{{ ''.__class__.__mro__[1].__subclasses__() }}</p>",
        "<p>{{ helper.__globals__ }}</p>",
        "<p>{{ contact['_secret'] }}</p>",
        "<p>{{ contact._meta }}</p>",
    ],
)
def test_save_refuses_access_to_private_attributes(html):
    error = assert_refused("html", html=html, variables="helper")
    assert "not allowed" in str(error) or "sandbox" in str(error)


def test_save_accepts_declared_variables():
    template = TemplateFactory(
        subject="Order {{ order_id }}",
        html="<p>{{ contact.first_name }}, order {{ order_id }} costs {{ total }}.</p>",
        variables="order_id, total",
    )

    assert Template.objects.filter(pk=template.pk).exists()


def test_saving_again_bumps_the_version():
    template = TemplateFactory()
    template.subject = "Changed"
    template.save()

    template.refresh_from_db()
    assert template.version == 2


# --- Rendering ------------------------------------------------------------------------


def test_css_is_inlined_into_style_attributes():
    template = TemplateFactory()
    compiled = rendering.compiled(rendering.find_template(template.slug, "en"))

    html = compiled.render(context()).html

    assert re.search(r'<p style="color: #123456;?">Hi Ada Lovelace\.</p>', html)


def test_css_is_inlined_once_per_version_not_per_render(monkeypatch):
    calls = []
    real = rendering._inliner

    class CountingInliner:
        def inline(self, html):
            calls.append(html)
            return real.inline(html)

    monkeypatch.setattr(rendering, "_inliner", CountingInliner())
    compiled = rendering.Compiled(source("<style>p { color: red }</style><p>{{ recipient }}</p>"))
    for address in ("a@example.com", "b@example.com", "c@example.com"):
        assert 'style="color: red;"' in compiled.render(context(recipient=address)).html

    assert len(calls) == 1
    assert compiled.inline_per_render is False


@pytest.mark.parametrize("slug", ["welcome", "verify_email", "password_reset"])
@pytest.mark.parametrize("language", ["en", "fr"])
def test_builtin_templates_inline_css_and_derive_text_once_per_version(slug, language):
    compiled = rendering.Compiled(rendering.find_template(slug, language))

    assert compiled.inline_per_render is False
    assert compiled.text_per_render is False


def test_text_part_is_derived_from_html_when_empty():
    template = TemplateFactory(text="")
    compiled = rendering.compiled(rendering.find_template(template.slug, "en"))

    text = compiled.render(context()).text

    assert "Hi Ada Lovelace." in text
    assert "[Open](http://localhost:8000/x)" in text
    assert not HTML_TAG.search(text)
    assert "color" not in text  # the <style> block is not text


def test_explicit_text_part_is_used_as_written():
    template = TemplateFactory(text="Plain {{ contact.first_name }}")
    compiled = rendering.compiled(rendering.find_template(template.slug, "en"))

    assert compiled.render(context()).text == "Plain Ada"


def test_html_autoescapes_context_values_and_text_keeps_them_raw():
    template = TemplateFactory(html="<p>Note: {{ note }}</p>", variables="note")
    compiled = rendering.compiled(rendering.find_template(template.slug, "en"))

    rendered = compiled.render(context(note="<script>alert(1)</script>"))

    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered.html
    assert "<script>" not in rendered.html
    assert "Note: <script>alert(1)</script>" in rendered.text


@pytest.fixture
def http_server():
    """A local HTTP server that records every request it gets."""
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            body = b"p { color: #ff0000 }"
            self.send_response(200)
            self.send_header("Content-Type", "text/css")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.requests = requests
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_remote_stylesheet_is_never_fetched(http_server):
    port = http_server.server_address[1]
    html = (
        f'<html><head><link rel="stylesheet" href="http://127.0.0.1:{port}/style.css">'
        "<style>h1 { color: blue }</style></head><body><h1>{{ recipient }}</h1></body></html>"
    )

    rendered = rendering.Compiled(source(html)).render(context())

    assert 'style="color: blue;"' in rendered.html
    assert "ada@example.com" in rendered.html
    assert http_server.requests == []


@pytest.mark.parametrize("call", ["obj.delete()", "obj.save()"])
def test_sandbox_refuses_model_methods_that_alter_data(call):
    contact = ContactFactory()
    compiled = rendering.Compiled(source(f"<p>{{{{ {call} }}}}</p>"))

    with pytest.raises(TemplateError) as caught:
        compiled.render(context(obj=contact))

    assert caught.value.field == "html"
    assert "sandbox" in str(caught.value)
    assert Contact.objects.filter(pk=contact.pk).exists()


def test_sandbox_refuses_dunder_access_at_render_time():
    compiled = rendering.Compiled(source("<p>{{ ''.__class__.__mro__ }}</p>"))

    with pytest.raises(TemplateError) as caught:
        compiled.render(context())

    assert "sandbox" in str(caught.value)


def test_block_tags_inside_a_table_render_rows_in_place():
    html = (
        "<html><head><style>td { color: red }</style></head><body><p>Before</p>"
        "<table>{% for row in rows %}<tr><td>{{ row }}</td></tr>{% endfor %}</table>"
        "<p>After</p></body></html>"
    )
    compiled = rendering.Compiled(source(html))

    rendered = compiled.render(context(rows=["first-row", "second-row"]))

    table = rendered.html[rendered.html.index("<table") : rendered.html.index("</table>")]
    assert '<td style="color: red;">first-row</td>' in table
    assert '<td style="color: red;">second-row</td>' in table
    assert table.index("first-row") < table.index("second-row")
    assert rendered.html.count("<tr>") == 2
    assert rendered.html.index("Before") < rendered.html.index("<table")
    assert rendered.html.index("</table>") < rendered.html.index("After")
    lines = rendered.text.splitlines()
    assert lines.index("Before") < lines.index("first-row") < lines.index("second-row")
    assert lines.index("second-row") < lines.index("After")


# --- File templates shipped in the package, and the host's own --------------------------------

LAYOUT_CONTEXT = {
    "user_name": "Ada",
    "app_name": "Shop",
    "login_url": "https://shop.example/login",
    "recipient": "ada@example.com",
    "site_url": "https://shop.example",
    "language": "en",
}


def host_templates(settings, tmp_path, *, app_dirs: bool = True):
    settings.TEMPLATES = [
        {
            "BACKEND": "django.template.backends.django.DjangoTemplates",
            "DIRS": [tmp_path],
            "APP_DIRS": app_dirs,
            "OPTIONS": {},
        }
    ]
    rendering.forget_templates()
    return tmp_path / "mailer"


def test_built_in_templates_ship_in_the_package_and_share_one_layout():
    source = rendering.find_template("welcome", "en")

    assert source.cache_key[1].startswith(str(rendering.BUILT_IN_TEMPLATES))
    rendered = rendering.compiled(source).render(LAYOUT_CONTEXT)
    assert "Welcome, Ada!" in rendered.html
    assert "Shop · https://shop.example" in rendered.html  # the layout's footer block
    assert "<title>Welcome</title>" in rendered.html


def test_built_in_templates_are_found_without_app_template_dirs(settings, tmp_path):
    host_templates(settings, tmp_path, app_dirs=False)

    source = rendering.find_template("password_reset", "en")

    assert source.cache_key[1].startswith(str(rendering.BUILT_IN_TEMPLATES))


def test_a_host_replaces_a_built_in_template_and_the_layout(settings, tmp_path):
    mine = host_templates(settings, tmp_path)
    (mine / "welcome").mkdir(parents=True)
    (mine / "welcome" / "subject.txt").write_text("Hello {{ user_name }}")
    (mine / "welcome" / "body.html").write_text(
        '{% extends "base" %}{% block content %}<p>Our own, {{ user_name }}.</p>{% endblock %}'
    )
    (mine / "layouts").mkdir()
    (mine / "layouts" / "base.html").write_text(
        "<html><body><div class=host>{% block content %}{% endblock %}</div>"
        "<footer>{% block footer %}{{ app_name }}{% endblock %}</footer></body></html>"
    )

    rendered = rendering.compiled(rendering.find_template("welcome", "en")).render(LAYOUT_CONTEXT)

    assert rendered.subject == "Hello Ada"
    assert '<div class="host"><p>Our own, Ada.</p></div>' in rendered.html
    assert "<footer>Shop</footer>" in rendered.html
    # Another built-in template still comes from mailer, in the host's layout.
    reset = rendering.find_template("password_reset", "en")
    assert reset.cache_key[1].startswith(str(rendering.BUILT_IN_TEMPLATES))


def test_a_layout_using_super_extends_at_render_time(settings, tmp_path):
    mine = host_templates(settings, tmp_path)
    (mine / "welcome").mkdir(parents=True)
    (mine / "welcome" / "subject.txt").write_text("Hi")
    (mine / "welcome" / "body.html").write_text(
        '{% extends "base" %}{% block footer %}{{ super() }} · extra{% endblock %}'
        "{% block content %}<p>Hi</p>{% endblock %}"
    )

    compiled = rendering.compiled(rendering.find_template("welcome", "en"))

    assert compiled.inline_per_render  # not flattened: Jinja's own inheritance
    assert "Shop · https://shop.example · extra" in compiled.render(LAYOUT_CONTEXT).html


def test_a_database_template_never_extends_a_file_layout():
    with pytest.raises(TemplateError, match="no template 'base'"):
        TemplateFactory(
            slug="sneaky",
            subject="Hi",
            html='{% extends "base" %}{% block content %}x{% endblock %}',
        )
