"""No token or secret in the logs the project configures: gunicorn's access and error logs
(the Procfile's web process, run for real), Django's request logging, the console handler."""

from __future__ import annotations

import base64
import logging
import urllib.error
import urllib.request
import uuid

import pytest
from django.contrib.auth.tokens import default_token_generator
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from mailer import accounts, compose
from mailer.logs import REDACTED, RedactTokens, redact
from mailer.models import Contact, Suppression
from tests.conftest import free_port, wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

# --- What redact() blanks, and what it keeps ------------------------------------------------


@pytest.mark.parametrize(
    "line,expected",
    [
        (
            '"GET /mailer/unsubscribe/gAAAAABk1x2y3z/ HTTP/1.1" 200',
            f'"GET /mailer/unsubscribe/{REDACTED}/ HTTP/1.1" 200',
        ),
        ("POST /m/verify/abc.def:ghi/", f"POST /m/verify/{REDACTED}/"),
        (
            "/mailer/preferences/tok/?utm=1&key=2",
            f"/mailer/preferences/{REDACTED}/?utm={REDACTED}&key={REDACTED}",
        ),
        ("/mailer/t/c/abc:def/", f"/mailer/t/c/{REDACTED}/"),
        ("/mailer/t/o/abc:def.gif", f"/mailer/t/o/{REDACTED}"),
        (
            "/accounts/reset/MQ/cz3k4q-0123456789abcdef0123456789abcdef/",
            f"/accounts/reset/MQ/{REDACTED}/",
        ),
        ("/accounts/reset/MQ/set-password/", "/accounts/reset/MQ/set-password/"),
        (
            "https://app.example.com/elsewhere/" + "x" * 60 + "/",
            f"https://app.example.com/elsewhere/{REDACTED}/",
        ),
        ("/accounts/login/?next=/mailer/verify/tok/", f"/accounts/login/?next={REDACTED}"),
        ("/admin/mailer/message/12/change/", "/admin/mailer/message/12/change/"),
        ("mailer: transactional batch of 1: 1 sent", "mailer: transactional batch of 1: 1 sent"),
    ],
)
def test_redact_blanks_token_segments_and_query_values(line, expected):
    assert redact(line) == expected


def test_the_console_handler_redacts_djangos_request_warnings(client, capsys):
    """django.request logs the path of every 4xx: through the project's console handler
    (settings.LOGGING), the token in it is gone."""
    token = compose.unsubscribe_token("reader@example.com")[:-4] + "AAAA"  # forged: a 400
    handler = next(h for h in logging.getLogger().handlers if h.filters)
    assert any(isinstance(f, RedactTokens) for f in handler.filters)
    records = []
    capture = logging.Handler()
    capture.emit = lambda record: records.append(handler.format(record))
    capture.filters = handler.filters
    logger = logging.getLogger("django.request")
    logger.addHandler(capture)
    try:
        assert client.get(f"/mailer/unsubscribe/{token}/").status_code == 400
    finally:
        logger.removeHandler(capture)

    assert records, "django.request logged nothing"
    assert f"/mailer/unsubscribe/{REDACTED}/" in records[0]
    assert not [r for r in records if token in r]


# --- The Procfile's web process ----------------------------------------------------------------

#: gunicorn's default access format plus the atoms a host might add: the query string, the
#: raw URI, the path, and the Authorization and Cookie headers.
ACCESS_FORMAT = (
    '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" '
    'q="%(q)s" U="%(U)s" raw="%({raw_uri}e)s" auth="%({authorization}i)s" '
    'cookie="%({cookie}i)s"'
)
WEBHOOK_PASSWORD = "hook-password-nobody-may-read"
SESSION = "sessionid-value-nobody-may-read"


@pytest.mark.integration
def test_gunicorn_logs_hold_no_token_or_secret(transactional_db, procfile, settings):
    """The web entry of the Procfile, on 127.0.0.1: every kind of link a recipient opens,
    forged ones (Django logs their 400s), a referer and a query carrying tokens, webhook
    credentials and a cookie. The log has a line for each, and no secret in any."""
    settings.SECRET_KEY = "tests-only-secret"  # the web process's, for tokens it accepts
    port = free_port()
    user = UserFactory(username="ada", email="ada@example.com")
    contact = Contact.objects.create(email="reader@example.com", user=user)
    secrets = {
        "unsubscribe": compose.unsubscribe_token("reader@example.com", uuid.uuid4()),
        "verify": accounts.verification_token(contact),
        "reset": default_token_generator.make_token(user),
        "click": compose.click_token(uuid.uuid4(), 1),
        "open": compose.open_token(uuid.uuid4()),
        "forged": compose.unsubscribe_token("reader@example.com")[:-4] + "AAAA",
        "webhook": WEBHOOK_PASSWORD,
        "webhook-basic-auth": base64.b64encode(f"hook:{WEBHOOK_PASSWORD}".encode()).decode(),
        "session": SESSION,
    }
    uid = urlsafe_base64_encode(force_bytes(user.pk))
    web = procfile.process(
        "web",
        PORT=str(port),
        WEB_CONCURRENCY="1",
        ALLOWED_HOSTS="127.0.0.1",
        ANYMAIL_WEBHOOK_SECRET=f"hook:{WEBHOOK_PASSWORD}",
        # its own control socket off: another gunicorn on this machine may hold the default
        GUNICORN_CMD_ARGS=f"--access-logformat '{ACCESS_FORMAT}' --no-control-socket",
    )
    web.command = web.command.replace("0.0.0.0:", "127.0.0.1:")  # loopback only
    assert "--logger-class mailer.logs.GunicornLogger" in web.command
    web.ready = b"Booting worker"
    procfile.start(web)
    base = f"http://127.0.0.1:{port}"

    def call(path, *, data=None, headers=None):
        request = urllib.request.Request(base + path, data=data, headers=headers or {})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    wait_for(lambda: call("/") == 200, timeout=60, message=web.log)
    unsubscribe = f"/mailer/unsubscribe/{secrets['unsubscribe']}/"
    answers = {
        "unsubscribe page": call(unsubscribe),
        "one-click": call(
            unsubscribe,
            data=b"List-Unsubscribe=One-Click",
            headers={"Referer": base + unsubscribe, "Cookie": f"sessionid={SESSION}"},
        ),
        "preferences": call(f"/mailer/preferences/{secrets['unsubscribe']}/?from=mail"),
        "verify page": call(f"/mailer/verify/{secrets['verify']}/"),
        "verify": call(f"/mailer/verify/{secrets['verify']}/", data=b""),
        "reset": call(f"/accounts/reset/{uid}/{secrets['reset']}/"),
        "click": call(f"/mailer/t/c/{secrets['click']}/"),
        "open": call(f"/mailer/t/o/{secrets['open']}.gif"),
        "forged": call(f"/mailer/unsubscribe/{secrets['forged']}/"),
        "login next": call(f"/accounts/login/?next=/mailer/verify/{secrets['verify']}/"),
        "webhook": call(
            "/anymail/postmark/tracking/",
            data=b"{not json",
            headers={
                "Authorization": f"Basic {secrets['webhook-basic-auth']}",
                "Content-Type": "application/json",
            },
        ),
    }
    assert answers == {
        "unsubscribe page": 200,
        "one-click": 200,
        "preferences": 200,
        "verify page": 200,
        "verify": 200,
        "reset": 200,  # urllib followed Django's redirect to .../set-password/
        "click": 400,
        "open": 400,
        "forged": 400,
        "login next": 200,
        "webhook": 400,
    }
    assert Suppression.objects.filter(email="reader@example.com").exists()
    assert Contact.objects.get(pk=contact.pk).verified_at is not None

    def logged() -> str:
        return web.log(tail=200_000)

    wait_for(lambda: "/mailer/t/o/" in logged(), message=logged)  # the last lines are out
    log = logged()
    found = {name: value for name, value in secrets.items() if value in log}
    assert not found, f"secrets in the log: {sorted(found)}\n{log[-3000:]}"
    expected = [
        f'"GET /mailer/unsubscribe/{REDACTED}/ HTTP/1.1" 200',
        f'"POST /mailer/unsubscribe/{REDACTED}/ HTTP/1.1" 200',
        f'"{base}/mailer/unsubscribe/{REDACTED}/"',  # the referer
        f'"GET /mailer/preferences/{REDACTED}/?from={REDACTED} HTTP/1.1" 200',
        f'q="from={REDACTED}"',
        f'"POST /mailer/verify/{REDACTED}/ HTTP/1.1" 200',
        f'"GET /accounts/reset/{uid}/{REDACTED}/ HTTP/1.1" 302',
        f'"GET /accounts/reset/{uid}/set-password/ HTTP/1.1" 200',
        f"Bad Request: /mailer/t/c/{REDACTED}/",  # Django's request log, same process
        f"Bad Request: /mailer/unsubscribe/{REDACTED}/",
        f'auth="{REDACTED}"',
        f'cookie="{REDACTED}"',
        f'"GET /accounts/login/?next={REDACTED} HTTP/1.1" 200',
    ]
    missing = [line for line in expected if line not in log]
    assert not missing, f"{missing}\n{log[-3000:]}"
