"""Composing one message: its template context, its signed links, the email to send.

Links are *made* here (unsubscribe, preferences, click redirects, the open pixel), and
read back by ``unsubscribe`` and ``tracking``, which share these salts and routes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass
from email.utils import formataddr
from functools import lru_cache
from urllib.parse import quote

from django.conf import settings
from django.db import IntegrityError, transaction
from django.urls import reverse

from . import conf, rendering, tokens
from .exceptions import PermanentSendError, SendError, TemplateError, TemplateNotFound
from .mime import PreparedEmail
from .models import Campaign, Kind, Link, Message

# Each its own salt: no kind of token can act as another.
UNSUBSCRIBE_SALT = "mailer.unsubscribe"
CLICK_SALT = "mailer.tracking.click"
OPEN_SALT = "mailer.tracking.open"


# --- Routes -----------------------------------------------------------------------------

_TOKEN_SLOT = "TOKENSLOT"  # noqa: S105 - a placeholder, not a secret


def route(name: str, token: str) -> str:
    """reverse(name, args=[token]), with the URL pattern resolved once per process.

    A campaign email has a handful of links; reversing each costs more than signing it.
    """
    before, after = _route_parts(name)
    return f"{before}{token}{after}"


@lru_cache(maxsize=32)
def _route_parts(name: str) -> tuple[str, str]:
    before, after = reverse(name, args=[_TOKEN_SLOT]).split(_TOKEN_SLOT)
    return before, after


# --- Unsubscribe links ---------------------------------------------------------------------


@dataclass(frozen=True)
class Links:
    token: str
    unsubscribe_url: str
    preferences_url: str


def unsubscribe_token(email: str, message_uuid: uuid.UUID | None = None) -> str:
    """Bound to one address (and the message, for reports); never expires. Encrypted, so
    the URL shows no address (``unsubscribe.read_token`` still reads the older, signed
    but readable tokens of mail already sent)."""
    payload = {"e": email.strip().lower()}
    if message_uuid is not None:
        payload["m"] = message_uuid.hex
    return tokens.seal(payload, salt=UNSUBSCRIBE_SALT)


def unsubscribe_links(email: str, message_uuid: uuid.UUID | None = None) -> Links:
    """The token and absolute unsubscribe and preference URLs for an address."""
    token = unsubscribe_token(email, message_uuid)
    base = conf.get("SITE_URL").rstrip("/")
    return Links(
        token=token,
        unsubscribe_url=base + route("mailer:unsubscribe", token),
        preferences_url=base + route("mailer:preferences", token),
    )


def unsubscribe_mailto() -> str:
    configured = conf.get("UNSUBSCRIBE_MAILTO")
    if configured:
        return configured
    domain = conf.from_email().rsplit("@", 1)[-1].strip(">") or "localhost"
    return f"unsubscribe@{domain}"


def unsubscribe_headers(found: Links) -> dict[str, str]:
    """List-Unsubscribe (https + mailto) and List-Unsubscribe-Post (RFC 8058)."""
    mailto = f"mailto:{unsubscribe_mailto()}?subject={quote('unsubscribe ' + found.token)}"
    return {
        "List-Unsubscribe": f"<{found.unsubscribe_url}>, <{mailto}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


# --- Tracking links (SMTP set-ups) ------------------------------------------------------------

_HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(https?://[^"'\s>]+)\2""", re.I)
_BODY_END = re.compile(r"</body\s*>", re.I)


class LinkCache(dict):
    """Link ids by URL for one batch (or one pooled drain): a campaign's few links cost a
    query each, and nothing stale outlives it. ``database`` runs the lookups where the
    caller's database work runs (a pool's database thread)."""

    def __init__(self, database=None):
        super().__init__()
        self.database = database


def link_id(url: str, cache: dict[str, int] | None = None) -> int:
    """The id of a recorded URL, recording it the first time."""
    if cache is not None and url in cache:
        return cache[url]
    database = getattr(cache, "database", None)
    pk = database(_record_link, url) if database is not None else _record_link(url)
    if cache is not None:
        cache[url] = pk
    return pk


def _record_link(url: str) -> int:
    digest = hashlib.sha256(url.encode()).hexdigest()
    link = Link.objects.filter(url_hash=digest).only("id").first()
    if link is None:
        try:
            with transaction.atomic():
                link = Link.objects.create(url=url, url_hash=digest)
        except IntegrityError:
            link = Link.objects.get(url_hash=digest)
    return link.pk


class _Signer:
    """Signs exactly as ``signing.Signer(salt=…)`` does, so its ``unsign`` reads the tokens,
    with the HMAC key derived once per process instead of once per link."""

    def __init__(self, salt: str, secret: str):
        key = hashlib.sha256(f"{salt}signer{secret}".encode()).digest()
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def sign(self, value: str) -> str:
        mac = self._mac.copy()
        mac.update(value.encode())
        return f"{value}:{base64.urlsafe_b64encode(mac.digest()).rstrip(b'=').decode()}"


def _signer(salt: str) -> _Signer:
    return _signer_for(salt, settings.SECRET_KEY)  # a changed key (tests) gets its own


@lru_cache(maxsize=8)
def _signer_for(salt: str, secret: str) -> _Signer:
    return _Signer(salt, secret)


def click_token(message_uuid: uuid.UUID, link: int) -> str:
    return _signer(CLICK_SALT).sign(f"{message_uuid.hex}.{link}")


def open_token(message_uuid: uuid.UUID) -> str:
    return _signer(OPEN_SALT).sign(message_uuid.hex)


def add_tracking(
    html: str,
    message: Message,
    *,
    base_url: str,
    opens: bool,
    clicks: bool,
    link_cache: dict[str, int] | None = None,
) -> str:
    """Rewrite http(s) links to signed click redirects and add an open pixel."""
    if clicks:
        unsubscribe_prefix = f"{base_url}/mailer/"

        def rewrite(match: re.Match) -> str:
            url = match.group(3).replace("&amp;", "&")
            if url.startswith(unsubscribe_prefix):
                return match.group(0)  # our own pages are never wrapped
            token = click_token(message.uuid, link_id(url, link_cache))
            target = base_url + route("mailer:click", token)
            return f"{match.group(1)}{match.group(2)}{target}{match.group(2)}"

        html = _HREF.sub(rewrite, html)
    if opens:
        pixel = (
            f'<img src="{base_url}{route("mailer:open", open_token(message.uuid))}" '
            'width="1" height="1" alt="" style="display:block;border:0;width:1px;height:1px">'
        )
        html, count = _BODY_END.subn(pixel + "</body>", html, count=1)
        if not count:
            html += pixel
    return html


# --- The email ------------------------------------------------------------------------------


def message_context(message: Message, links: Links | None = None) -> dict:
    """The message's own context under the standard names every template may use."""
    contact = message.contact
    context = dict(message.context or {})
    if links is not None:
        context.update(unsubscribe_url=links.unsubscribe_url, preferences_url=links.preferences_url)
    context.update(
        app_name=conf.get("APP_NAME"),
        site_url=rendering.site_url(),
        recipient=message.to_email,
        message_id=str(message.uuid),
        language=message.language,
        contact={
            "email": message.to_email,
            "name": contact.name if contact else "",
            "first_name": contact.first_name if contact else "",
            "language": contact.language if contact else "",
            "attributes": dict(contact.attributes or {}) if contact else {},
        },
    )
    context.setdefault("unsubscribe_url", "")
    context.setdefault("preferences_url", "")
    context.setdefault("postal_address", conf.get("POSTAL_ADDRESS"))
    return context


def message_id_header(message: Message) -> str:
    domain = conf.from_email().rsplit("@", 1)[-1].strip(">") or "localhost"
    return f"<{message.uuid}@{domain}>"


class Templates:
    """Compiled templates for one batch, by (slug, language); a broken one fails its
    messages permanently without being looked up again."""

    def __init__(self):
        self._cache: dict[tuple, rendering.Compiled | SendError] = {}

    def for_message(self, message: Message) -> rendering.Compiled:
        key = (message.template_slug, message.language)
        hit = self._cache.get(key)
        if hit is None:
            try:
                hit = rendering.compiled(rendering.find_template(*key))
            except (TemplateNotFound, TemplateError) as exc:
                hit = PermanentSendError(f"Template: {exc}")
            self._cache[key] = hit
        if isinstance(hit, SendError):
            raise hit
        return hit


def sending_campaign(message: Message) -> Campaign | None:
    """The campaign whose sender and Reply-To the email carries: its own, or for a test
    email the campaign it tests, so the test shows exactly what the recipients will get.

    ``outbox.claim`` attaches the tested campaign to the batch (``tested_campaign``);
    a message built outside a batch reads it here.
    """
    if message.campaign_id is not None:
        return message.campaign
    metadata = message.metadata if isinstance(message.metadata, dict) else {}
    tested = metadata.get("test_of_campaign") if metadata.get("test") else None
    if not isinstance(tested, int):
        return None
    if "tested_campaign" not in message.__dict__:
        message.tested_campaign = Campaign.objects.filter(pk=tested).first()
    return message.tested_campaign


def build_email(
    message: Message,
    compiled: rendering.Compiled,
    connection=None,
    link_cache: dict[str, int] | None = None,
) -> PreparedEmail:
    """Render one message into an email ready for any Django backend.

    Marketing and drip mail also gets signed unsubscribe links, the RFC 8058 headers and,
    on SMTP set-ups, our open pixel and click redirects.
    """
    headers = {"X-Mailer-Message-Id": str(message.uuid)}
    idempotency = conf.idempotency_header()
    if idempotency:
        headers[idempotency] = str(message.uuid)  # a resend in doubt is dropped by the ESP
    marketing = message.kind != Kind.TRANSACTIONAL
    links = unsubscribe_links(message.to_email, message.uuid) if marketing else None
    context = message_context(message, links)
    rendered = compiled.render(context)
    html = rendered.html
    if links is not None:
        headers.update(unsubscribe_headers(links))
        opens, clicks = conf.track_opens(), conf.track_clicks()
        if opens or clicks:
            html = add_tracking(
                html,
                message,
                base_url=rendering.site_url(),
                opens=opens,
                clicks=clicks,
                link_cache=link_cache,
            )
    name = (message.contact.name if message.contact else "").replace("\r", " ").replace("\n", " ")
    header_id = message_id_header(message)
    subject, from_email, reply_to = rendered.subject, conf.from_email(), []
    campaign, variant = sending_campaign(message), message.variant
    if variant is not None and variant.subject:
        subject = rendering.subject_template(variant.subject).render_subject(context)
    if campaign is not None or variant is not None:
        sender_name = (variant.from_name if variant else "") or (
            campaign.from_name if campaign else ""
        )
        sender_email = campaign.from_email if campaign else ""
        if sender_name or sender_email:
            from_email = formataddr(
                (
                    sender_name or conf.get("FROM_NAME") or "",
                    conf.ascii_domain(sender_email) if sender_email else conf.from_address(),
                )
            )
        if campaign is not None and campaign.reply_to:
            reply_to = [campaign.reply_to]
    if (message.metadata or {}).get("test"):
        subject = f"[TEST] {subject}"
    email = PreparedEmail(
        subject=subject,
        text=rendered.text,
        html=html,
        message_id=header_id,
        from_email=from_email,
        to=[formataddr((name, message.to_email)) if name else message.to_email],
        reply_to=reply_to,
        connection=connection,
        headers=headers,
    )
    email.to_pairs = [(name, message.to_email)]  # mime builds the To header from these
    email.metadata = {"mailer_message_id": str(message.uuid)}  # anymail
    email.tags = [message.template_slug]
    return email
