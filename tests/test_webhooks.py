"""ESP webhooks end to end: each ESP's own raw payload, POSTed to anymail's view with the
webhook secret, becomes Event rows, message statuses and suppressions through
mailer.receivers.on_tracking -> mailer.tracking.record.

The ESP table below (SendGrid, Mailgun, Postmark, Amazon SES via SNS, Brevo) builds
payloads in each ESP's raw format: how it names the event, where it puts its event id,
its message id and our metadata ``{"mailer_message_id": <uuid>}``, and its timestamps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest
from django.utils import timezone

from mailer import outbox
from mailer.models import Event, Kind, Message, MessageStatus, Suppression, WebhookSignature
from mailer.outbox import RANK
from tests.factories import MessageFactory

pytestmark = [
    pytest.mark.django_db,
    # anymail warns on every SendGrid view it builds; not what these tests are about.
    pytest.mark.filterwarnings("ignore::anymail.exceptions.AnymailNotSupportedWarning"),
]

SECRET = "hook:s3cret"
MAILGUN_SIGNING_KEY = "mailgun-webhook-signing-key-for-tests"


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


AUTH = basic(SECRET)

# What happened, in our words; each ESP says it its own way.
DELIVERED = "delivered"
OPENED = "opened"
CLICKED = "clicked"
HARD = "hard_bounce"
SOFT = "soft_bounce"
COMPLAINT = "complaint"
UNSUBSCRIBE = "unsubscribe"
GROUP_UNSUBSCRIBE = "group_unsubscribe"  # SendGrid's suppression-group unsubscribe

EVENT_TYPE = {
    DELIVERED: Event.Type.DELIVERED,
    OPENED: Event.Type.OPENED,
    CLICKED: Event.Type.CLICKED,
    HARD: Event.Type.BOUNCED,
    SOFT: Event.Type.BOUNCED,
    COMPLAINT: Event.Type.COMPLAINED,
    UNSUBSCRIBE: Event.Type.UNSUBSCRIBED,
    GROUP_UNSUBSCRIBE: Event.Type.UNSUBSCRIBED,
}

USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0"
CLICK_URL = "https://shop.example.com/spring?utm_source=mail"

_clock = count(1)


def when(at: datetime | None) -> datetime:
    """``at``, or a distinct recent moment (events without an ESP id are keyed by time)."""
    return at or timezone.now() - timedelta(seconds=next(_clock))


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture(autouse=True)
def webhook_secret(settings):
    settings.ANYMAIL = {
        "WEBHOOK_SECRET": SECRET,
        "MAILGUN_WEBHOOK_SIGNING_KEY": MAILGUN_SIGNING_KEY,
    }


# --- The ESP table ------------------------------------------------------------------------


def provider_id(esp: str, message: Message) -> str:
    """The id the ESP gave ``message`` (what the send stores in provider_message_id)."""
    h = uuid.uuid5(uuid.NAMESPACE_URL, f"{esp}:{message.uuid}")
    if esp == "sendgrid":
        return str(h)  # anymail's anymail_id custom arg
    if esp == "mailgun":
        return f"<20240501120000.{h.hex[:16].upper()}@mg.example.com>"
    if esp == "postmark":
        return str(h)
    if esp == "amazon_ses":
        return f"0100018f{h.hex[:8]}-{h}-000000"
    if esp == "brevo":
        return f"<202405011200.{h.int % 10**13}@smtp-relay.mailin.fr>"
    raise ValueError(esp)


class Esp:
    name = ""  # as mailer stores it: Event.data["esp"], Suppression.source "webhook:<name>"
    url = ""
    kinds: tuple[str, ...] = (DELIVERED, OPENED, CLICKED, HARD, SOFT, COMPLAINT, UNSUBSCRIBE)

    def event(
        self,
        kind: str,
        message: Message,
        *,
        recipient: str | None = None,
        at: datetime | None = None,
        metadata: bool = True,
    ) -> dict:
        """One raw ESP event about ``message``; ``metadata=False`` leaves our uuid out, so
        only the ESP's message id can link it."""
        raise NotImplementedError

    def event_type(self, kind: str) -> str:
        return EVENT_TYPE[kind]

    def bodies(self, events: list[dict]) -> list:
        """The request bodies that carry ``events``: one per event unless the ESP batches."""
        return list(events)

    def redelivered(self, body: dict) -> dict:
        """``body`` as the ESP posts it again (a retry): the same, unless it signs each POST."""
        return body

    def request(self, body) -> dict:
        return {"data": json.dumps(body), "content_type": "application/json"}

    def post(self, client, events: list[dict], *, auth: str | None = AUTH) -> list:
        extra = {"HTTP_AUTHORIZATION": auth} if auth is not None else {}
        return [
            client.post(self.url, **self.request(body), **extra) for body in self.bodies(events)
        ]

    def __repr__(self) -> str:
        return self.name


class SendGrid(Esp):
    """Event webhook: a JSON array of events; custom args (our metadata, anymail_id) are
    merged into each event; sg_event_id is the event id."""

    name, url = "sendgrid", "/anymail/sendgrid/tracking/"
    kinds = Esp.kinds + (GROUP_UNSUBSCRIBE,)

    def event(self, kind, message, *, recipient=None, at=None, metadata=True):
        at = when(at)
        raw = {
            "email": recipient or message.to_email,
            "timestamp": int(at.timestamp()),
            "smtp-id": f"<{message.uuid.hex[:20]}@ismtpd0102p1lon1.sendgrid.net>",
            "sg_event_id": base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="),
            "sg_message_id": f"{message.uuid.hex[:22]}.recvd-5f8b6c9c4-xk2lp-1-6630A1B2-3.0",
            "category": [message.template_slug],
            "anymail_id": provider_id(self.name, message),
        }
        if metadata:
            raw["mailer_message_id"] = str(message.uuid)
        raw.update(
            {
                DELIVERED: {
                    "event": "delivered",
                    "response": "250 2.0.0 OK  1714564800 a1si123456qkb.42 - gsmtp",
                    "ip": "149.72.123.24",
                    "tls": 1,
                },
                OPENED: {
                    "event": "open",
                    "useragent": USER_AGENT,
                    "ip": "203.0.113.7",
                    "sg_machine_open": False,
                },
                CLICKED: {
                    "event": "click",
                    "url": CLICK_URL,
                    "url_offset": {"index": 0, "type": "html"},
                    "useragent": USER_AGENT,
                    "ip": "203.0.113.7",
                },
                HARD: {
                    "event": "bounce",
                    "type": "bounce",
                    "status": "5.1.1",
                    "reason": "550 5.1.1 The email account that you tried to reach does not exist.",
                    "bounce_classification": "Invalid Address",
                    "ip": "149.72.123.24",
                    "tls": 1,
                },
                SOFT: {
                    "event": "bounce",
                    "type": "blocked",
                    "status": "4.2.2",
                    "reason": "452 4.2.2 The email account that you tried to reach is over quota.",
                    "bounce_classification": "Mailbox Unavailable",
                    "ip": "149.72.123.24",
                    "tls": 1,
                },
                COMPLAINT: {"event": "spamreport"},
                UNSUBSCRIBE: {"event": "unsubscribe"},
                GROUP_UNSUBSCRIBE: {
                    "event": "group_unsubscribe",
                    "asm_group_id": 42,
                    "useragent": USER_AGENT,
                    "ip": "203.0.113.7",
                },
            }[kind]
        )
        return raw

    def bodies(self, events):
        return [events]  # SendGrid posts its events in batches


def mailgun_signature(token: str, timestamp: str, key: str = MAILGUN_SIGNING_KEY) -> str:
    return hmac.new(key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()


def mailgun_signed(at: float | None = None, token: str | None = None) -> dict:
    """A Mailgun signature block made at ``at`` (now), with a fresh token."""
    stamp = str(int(time.time() if at is None else at))
    token = token or secrets.token_hex(25)
    return {"timestamp": stamp, "token": token, "signature": mailgun_signature(token, stamp)}


class Mailgun(Esp):
    """Webhooks v2: {"signature": {timestamp, token, signature}, "event-data": {...}},
    HMAC-SHA256 of timestamp+token with the webhook signing key; the token is the event
    id; user-variables carry our metadata; a temporary failure is a soft bounce."""

    name, url = "mailgun", "/anymail/mailgun/tracking/"

    def event_type(self, kind):
        # anymail turns "failed" with severity "temporary" into "deferred"
        return Event.Type.DEFERRED if kind == SOFT else EVENT_TYPE[kind]

    def event(self, kind, message, *, recipient=None, at=None, metadata=True):
        at = when(at)
        email = recipient or message.to_email
        client_info = {
            "client-type": "browser",
            "client-os": "Linux",
            "device-type": "desktop",
            "client-name": "Firefox",
            "user-agent": USER_AGENT,
        }
        data = {
            "id": base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("="),
            "timestamp": at.timestamp(),
            "log-level": "info",
            "recipient": email,
            "recipient-domain": email.rsplit("@", 1)[-1],
            "tags": [message.template_slug],
            "campaigns": [],
            "user-variables": {"mailer_message_id": str(message.uuid)} if metadata else {},
            "flags": {"is-routed": False, "is-authenticated": True, "is-test-mode": False},
            "envelope": {
                "sender": "bounce+1a2b3c@mg.example.com",
                "transport": "smtp",
                "targets": email,
            },
            "message": {
                "headers": {
                    "to": email,
                    # Mailgun leaves the angle brackets off; anymail puts them back.
                    "message-id": provider_id(self.name, message).strip("<>"),
                    "from": "Mailer Tests <noreply@mg.example.com>",
                    "subject": message.subject,
                },
                "attachments": [],
                "size": 4211,
            },
        }
        data.update(
            {
                DELIVERED: {
                    "event": "delivered",
                    "delivery-status": {
                        "tls": True,
                        "mx-host": "mx.example.com",
                        "code": 250,
                        "description": "",
                        "session-seconds": 0.52,
                        "attempt-no": 1,
                        "message": "OK",
                        "certificate-verified": True,
                    },
                },
                OPENED: {"event": "opened", "ip": "203.0.113.7", "client-info": client_info},
                CLICKED: {
                    "event": "clicked",
                    "url": CLICK_URL,
                    "ip": "203.0.113.7",
                    "client-info": client_info,
                },
                HARD: {
                    "event": "failed",
                    "severity": "permanent",
                    "reason": "bounce",
                    "delivery-status": {
                        "code": 550,
                        "attempt-no": 1,
                        "description": "",
                        "message": "5.1.1 The email account that you tried to reach does not "
                        "exist.",
                        "mx-host": "mx.example.com",
                    },
                },
                SOFT: {
                    "event": "failed",
                    "severity": "temporary",
                    "reason": "generic",
                    "delivery-status": {
                        "code": 452,
                        "attempt-no": 1,
                        "retry-seconds": 600,
                        "description": "",
                        "message": "4.2.2 The email account that you tried to reach is over quota.",
                        "mx-host": "mx.example.com",
                    },
                },
                COMPLAINT: {"event": "complained"},
                UNSUBSCRIBE: {
                    "event": "unsubscribed",
                    "ip": "203.0.113.7",
                    "client-info": client_info,
                },
            }[kind]
        )
        return self.redelivered({"event-data": data})

    def redelivered(self, body):
        """Mailgun signs each POST when it makes it, a retry too: the time now and a fresh
        token (the event data keeps its own id and time)."""
        return {**body, "signature": mailgun_signed()}


class Postmark(Esp):
    """One JSON object per POST; RecordType + Type name the event; only bounces and spam
    complaints carry an ID; Metadata carries ours; MessageID is Postmark's."""

    name, url = "postmark", "/anymail/postmark/tracking/"

    def event(self, kind, message, *, recipient=None, at=None, metadata=True):
        at = when(at)
        email = recipient or message.to_email
        raw = {
            "MessageStream": "outbound",
            "MessageID": provider_id(self.name, message),
            "ServerID": 23,
            "Tag": message.template_slug,
            "Metadata": {"mailer_message_id": str(message.uuid)} if metadata else {},
        }
        bounce = {
            "ID": secrets.randbelow(10**15) + 10**14,
            "Email": email,
            "From": "noreply@mailer.test",
            "BouncedAt": iso(at),
            "Subject": message.subject,
            "DumpAvailable": True,
            "CanActivate": True,
        }
        engagement = {
            "Recipient": email,
            "ReceivedAt": iso(at),
            "UserAgent": USER_AGENT,
            "Platform": "Desktop",
            "Client": {"Name": "Firefox 126.0", "Company": "Mozilla", "Family": "Firefox"},
            "OS": {"Name": "Linux", "Company": "-", "Family": "Linux"},
            "Geo": {"CountryISOCode": "NL", "Country": "Netherlands", "IP": "203.0.113.7"},
        }
        if kind == DELIVERED:
            raw |= {
                "RecordType": "Delivery",
                "Recipient": email,
                "DeliveredAt": iso(at),
                "Details": "smtp;250 2.0.0 OK 1714564800 a1si123456qkb.42 - gsmtp",
            }
        elif kind == OPENED:
            raw |= {"RecordType": "Open", "FirstOpen": True, "ReadSeconds": 5, **engagement}
        elif kind == CLICKED:
            raw |= {
                "RecordType": "Click",
                "ClickLocation": "HTML",
                "OriginalLink": CLICK_URL,
                **engagement,
            }
        elif kind == HARD:
            raw |= {
                "RecordType": "Bounce",
                "Type": "HardBounce",
                "TypeCode": 1,
                "Name": "Hard bounce",
                "Description": "The server was unable to deliver your message (ex: unknown "
                "user, mailbox not found).",
                "Details": "smtp;550 5.1.1 The email account that you tried to reach does "
                "not exist.",
                "Inactive": True,
                **bounce,
            }
        elif kind == SOFT:
            raw |= {
                "RecordType": "Bounce",
                "Type": "SoftBounce",
                "TypeCode": 4096,
                "Name": "Soft bounce/Undeliverable",
                "Description": "Unable to temporarily deliver this email.",
                "Details": "smtp;452 4.2.2 The email account that you tried to reach is "
                "over quota.",
                "Inactive": False,
                **bounce,
            }
        elif kind == COMPLAINT:
            raw |= {
                "RecordType": "SpamComplaint",
                "Type": "SpamComplaint",
                "TypeCode": 512,
                "Name": "Spam complaint",
                "Description": "The subscriber explicitly marked this message as spam.",
                "Details": "Test spam complaint details",
                "Inactive": True,
                **bounce,
            }
        elif kind == UNSUBSCRIBE:
            raw |= {
                "RecordType": "SubscriptionChange",
                "Recipient": email,
                "Origin": "Recipient",
                "SuppressSending": True,
                "SuppressionReason": "ManualSuppression",
                "ChangedAt": iso(at),
            }
        else:
            raise ValueError(kind)
        return raw


class AmazonSES(Esp):
    """SES event publishing through an SNS topic: an SNS Notification envelope whose
    Message is the SES event JSON. The SNS MessageId is the event id, mail.messageId the
    message id; our metadata travels in the X-Metadata header anymail adds."""

    name, url = "amazon_ses", "/anymail/amazon_ses/tracking/"
    kinds = (DELIVERED, OPENED, CLICKED, HARD, SOFT, COMPLAINT)  # no unsubscribe event

    def event(self, kind, message, *, recipient=None, at=None, metadata=True):
        at = when(at)
        email = recipient or message.to_email
        sent = at - timedelta(seconds=30)
        headers = [
            {"name": "From", "value": "Mailer Tests <noreply@mailer.test>"},
            {"name": "To", "value": email},
            {"name": "Subject", "value": message.subject},
            {"name": "MIME-Version", "value": "1.0"},
            {"name": "Content-Type", "value": 'multipart/alternative; boundary="===123=="'},
            {"name": "X-Tag", "value": message.template_slug},
        ]
        if metadata:
            meta = json.dumps({"mailer_message_id": str(message.uuid)})
            headers.append({"name": "X-Metadata", "value": meta})
        ses = {
            "mail": {
                "timestamp": iso(sent),
                "source": "noreply@mailer.test",
                "sourceArn": "arn:aws:ses:eu-west-1:123456789012:identity/mailer.test",
                "sendingAccountId": "123456789012",
                "messageId": provider_id(self.name, message),
                "destination": [email],
                "headersTruncated": False,
                "headers": headers,
                "commonHeaders": {
                    "from": ["Mailer Tests <noreply@mailer.test>"],
                    "to": [email],
                    "subject": message.subject,
                },
                "tags": {"ses:configuration-set": ["mailer"], "ses:from-domain": ["mailer.test"]},
            }
        }
        feedback = f"0100018f{secrets.token_hex(4)}-{uuid.uuid4()}-000000"
        if kind == DELIVERED:
            ses |= {
                "eventType": "Delivery",
                "delivery": {
                    "timestamp": iso(at),
                    "processingTimeMillis": 546,
                    "recipients": [email],
                    "smtpResponse": "250 2.0.0 OK 1714564800 a1si123456qkb.42 - gsmtp",
                    "reportingMTA": "a8-30.smtp-out.amazonses.com",
                    "remoteMtaIp": "192.0.2.10",
                },
            }
        elif kind == OPENED:
            ses |= {
                "eventType": "Open",
                "open": {"ipAddress": "203.0.113.7", "timestamp": iso(at), "userAgent": USER_AGENT},
            }
        elif kind == CLICKED:
            ses |= {
                "eventType": "Click",
                "click": {
                    "ipAddress": "203.0.113.7",
                    "timestamp": iso(at),
                    "userAgent": USER_AGENT,
                    "link": CLICK_URL,
                    "linkTags": {},
                },
            }
        elif kind in (HARD, SOFT):
            hard = kind == HARD
            ses |= {
                "eventType": "Bounce",
                "bounce": {
                    "bounceType": "Permanent" if hard else "Transient",
                    "bounceSubType": "General" if hard else "MailboxFull",
                    "bouncedRecipients": [
                        {
                            "emailAddress": email,
                            "action": "failed",
                            "status": "5.1.1" if hard else "4.2.2",
                            "diagnosticCode": "smtp; 550 5.1.1 user unknown"
                            if hard
                            else "smtp; 452 4.2.2 mailbox full",
                        }
                    ],
                    "timestamp": iso(at),
                    "feedbackId": feedback,
                    "reportingMTA": "dsn; a8-30.smtp-out.amazonses.com",
                },
            }
        elif kind == COMPLAINT:
            ses |= {
                "eventType": "Complaint",
                "complaint": {
                    "complainedRecipients": [{"emailAddress": email}],
                    "timestamp": iso(at),
                    "feedbackId": feedback,
                    "userAgent": "Mail.ru Feedback Loop",
                    "complaintFeedbackType": "abuse",
                    "arrivalDate": iso(at),
                },
            }
        else:
            raise ValueError(kind)
        return {
            "Type": "Notification",
            "MessageId": str(uuid.uuid4()),
            "TopicArn": "arn:aws:sns:eu-west-1:123456789012:mailer-ses-events",
            "Subject": "Amazon SES Email Event Notification",
            "Message": json.dumps(ses),
            "Timestamp": iso(at),
            "SignatureVersion": "1",
            "Signature": base64.b64encode(secrets.token_bytes(64)).decode(),
            "SigningCertURL": "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-x.pem",
            "UnsubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe&x=1",
        }

    def request(self, body):
        # SNS posts its JSON as text/plain, with its type and id repeated in headers.
        return {
            "data": json.dumps(body),
            "content_type": "text/plain; charset=UTF-8",
            "HTTP_X_AMZ_SNS_MESSAGE_TYPE": body["Type"],
            "HTTP_X_AMZ_SNS_MESSAGE_ID": body["MessageId"],
            "HTTP_X_AMZ_SNS_TOPIC_ARN": body["TopicArn"],
        }


class Brevo(Esp):
    """Transactional webhook: one JSON object per POST; "event" names it; no event id;
    X-Mailin-custom is our metadata as a JSON string; ts_epoch is UTC milliseconds."""

    name, url = "brevo", "/anymail/brevo/tracking/"

    def event(self, kind, message, *, recipient=None, at=None, metadata=True):
        at = when(at)
        raw = {
            "event": {
                DELIVERED: "delivered",
                OPENED: "unique_opened",
                CLICKED: "click",
                HARD: "hard_bounce",
                SOFT: "soft_bounce",
                COMPLAINT: "spam",
                UNSUBSCRIBE: "unsubscribe",
            }[kind],
            "email": recipient or message.to_email,
            "id": 1234567,
            "date": at.strftime("%Y-%m-%d %H:%M:%S"),
            "ts": int(at.timestamp()),
            "ts_event": int(at.timestamp()),
            "ts_epoch": int(at.timestamp() * 1000),
            "message-id": provider_id(self.name, message),
            "subject": message.subject,
            "tag": message.template_slug,
            "tags": [message.template_slug],
            "sending_ip": "185.41.28.109",
        }
        if metadata:
            raw["X-Mailin-custom"] = json.dumps({"mailer_message_id": str(message.uuid)})
        if kind == HARD:
            raw["reason"] = "550 5.1.1 The email account that you tried to reach does not exist."
        elif kind == SOFT:
            raw["reason"] = "452 4.2.2 The email account that you tried to reach is over quota."
        elif kind == CLICKED:
            raw["link"] = CLICK_URL
        return raw


ESPS = [SendGrid(), Mailgun(), Postmark(), AmazonSES(), Brevo()]


def esps_with(*kinds: str) -> list:
    return [pytest.param(esp, id=esp.name) for esp in ESPS if set(kinds) <= set(esp.kinds)]


# --- Helpers ------------------------------------------------------------------------------


def sent_message(esp: Esp | None = None, **fields) -> Message:
    """A message the ESP accepted: status sent, provider id recorded."""
    fields.setdefault("status", MessageStatus.SENT)
    fields.setdefault("sent_at", timezone.now() - timedelta(minutes=10))
    message = MessageFactory(**fields)
    if esp is not None and "provider_message_id" not in fields:
        message.provider_message_id = provider_id(esp.name, message)
        message.save(update_fields=["provider_message_id"])
    return message


def assert_ok(responses) -> None:
    codes = [r.status_code for r in responses]
    assert codes == [200] * len(codes), [r.content[:300] for r in responses]


def suppressions(email: str) -> set[tuple[str, str]]:
    return set(Suppression.objects.filter(email=email).values_list("scope", "reason"))


def status(message: Message) -> str:
    message.refresh_from_db(fields=["status"])
    return message.status


def state() -> tuple:
    """Everything a webhook may change."""
    return (
        Event.objects.count(),
        sorted(Suppression.objects.values_list("email", "scope", "reason", "created_at")),
        sorted(Message.objects.values_list("pk", "status", "last_error")),
    )


# --- One event, its consequences -----------------------------------------------------------


@pytest.mark.parametrize("esp", esps_with(HARD))
def test_hard_bounce_suppresses_all_mail(client, esp):
    message = sent_message(esp)

    assert_ok(esp.post(client, [esp.event(HARD, message)]))

    event = Event.objects.get()
    assert (event.message, event.event_type, event.bounce) == (message, "bounced", "hard")
    assert event.recipient == message.to_email
    assert event.data["esp"] == esp.name
    assert event.provider_event_id.startswith(f"{esp.name}:")
    assert status(message) == MessageStatus.BOUNCED
    suppression = Suppression.objects.get()
    assert (suppression.email, suppression.scope, suppression.reason) == (
        message.to_email,
        Suppression.Scope.ALL,
        Suppression.Reason.HARD_BOUNCE,
    )
    assert suppression.source == f"webhook:{esp.name}"


@pytest.mark.parametrize("esp", esps_with(COMPLAINT))
def test_complaint_suppresses_marketing(client, esp):
    message = sent_message(esp, status=MessageStatus.OPENED)

    assert_ok(esp.post(client, [esp.event(COMPLAINT, message)]))

    event = Event.objects.get()
    assert (event.message, event.event_type, event.bounce) == (message, "complained", "")
    assert status(message) == MessageStatus.COMPLAINED
    assert suppressions(message.to_email) == {("marketing", "complaint")}


@pytest.mark.parametrize("esp", esps_with(DELIVERED, OPENED, CLICKED))
def test_delivered_opened_clicked_move_status_forward(client, esp):
    message = sent_message(esp)

    for kind, expected in [
        (DELIVERED, MessageStatus.DELIVERED),
        (OPENED, MessageStatus.OPENED),
        (CLICKED, MessageStatus.CLICKED),
    ]:
        assert_ok(esp.post(client, [esp.event(kind, message)]))
        assert status(message) == expected
    # A late delivery report (another event id) never moves it back.
    assert_ok(esp.post(client, [esp.event(DELIVERED, message)]))
    assert status(message) == MessageStatus.CLICKED

    events = Event.objects.filter(message=message)
    assert sorted(events.values_list("event_type", flat=True)) == sorted(
        ["delivered", "opened", "clicked", "delivered"]
    )
    assert set(events.values_list("bounce", flat=True)) == {""}
    assert events.get(event_type="clicked").data["click_url"] == CLICK_URL
    assert not Suppression.objects.exists()


@pytest.mark.parametrize(
    "esp,kind",
    [
        pytest.param(esp, kind, id=f"{esp.name}-{kind}")
        for esp in ESPS
        for kind in (UNSUBSCRIBE, GROUP_UNSUBSCRIBE)
        if kind in esp.kinds
    ],
)
def test_esp_unsubscribe_suppresses_marketing(client, esp, kind):
    message = sent_message(esp, kind=Kind.CAMPAIGN, status=MessageStatus.CLICKED)

    assert_ok(esp.post(client, [esp.event(kind, message)]))

    event = Event.objects.get()
    assert (event.message, event.event_type) == (message, "unsubscribed")
    assert suppressions(message.to_email) == {("marketing", "unsubscribe")}
    assert status(message) == MessageStatus.CLICKED  # an unsubscribe is no delivery status


# --- Soft bounces ---------------------------------------------------------------------------


@pytest.mark.parametrize("esp", esps_with(SOFT))
def test_third_soft_bounce_in_30_days_suppresses_all_mail(client, esp):
    address = "full.mailbox@example.net"
    messages = [sent_message(esp, to_email=address) for _ in range(3)]

    assert_ok(esp.post(client, [esp.event(SOFT, m) for m in messages[:2]]))
    assert not Suppression.objects.exists()  # two soft bounces: not yet

    assert_ok(esp.post(client, [esp.event(SOFT, messages[2])]))
    assert suppressions(address) == {("all", "soft_bounce")}
    events = Event.objects.all()
    assert events.count() == 3
    assert {(e.message_id, e.event_type, e.bounce) for e in events} == {
        (m.pk, esp.event_type(SOFT), "soft") for m in messages
    }


@pytest.mark.parametrize("esp", esps_with(SOFT))
def test_two_soft_bounces_suppress_nobody(client, esp):
    address = "full.mailbox@example.net"
    messages = [sent_message(esp, to_email=address) for _ in range(2)]

    assert_ok(esp.post(client, [esp.event(SOFT, m) for m in messages]))

    assert Event.objects.filter(bounce="soft").count() == 2
    assert not Suppression.objects.exists()


@pytest.mark.parametrize("esp", esps_with(SOFT))
def test_soft_bounces_older_than_30_days_do_not_count(client, esp):
    address = "full.mailbox@example.net"
    old, *recent = [sent_message(esp, to_email=address) for _ in range(4)]
    long_ago = timezone.now() - timedelta(days=40)

    assert_ok(esp.post(client, [esp.event(SOFT, old, at=long_ago)]))
    assert_ok(esp.post(client, [esp.event(SOFT, m) for m in recent[:2]]))
    assert Event.objects.filter(bounce="soft").count() == 3
    assert not Suppression.objects.exists()  # only two within the window

    assert_ok(esp.post(client, [esp.event(SOFT, recent[2])]))
    assert suppressions(address) == {("all", "soft_bounce")}


# --- Replays ----------------------------------------------------------------------------------


@pytest.mark.parametrize("esp", [pytest.param(esp, id=esp.name) for esp in ESPS])
def test_same_batch_twice_adds_nothing(client, esp):
    engaged = sent_message(esp, kind=Kind.CAMPAIGN)
    bounced = sent_message(esp)
    soft_address = "soft@example.net"
    softs = [sent_message(esp, to_email=soft_address) for _ in range(3)]
    queued = MessageFactory(to_email=bounced.to_email, kind=Kind.CAMPAIGN)
    batch = [
        esp.event(DELIVERED, engaged),
        esp.event(OPENED, engaged),
        esp.event(CLICKED, engaged),
        esp.event(COMPLAINT, engaged),
        esp.event(DELIVERED, bounced),
        esp.event(HARD, bounced),
        *[esp.event(SOFT, m) for m in softs],
    ]
    if UNSUBSCRIBE in esp.kinds:
        batch.append(esp.event(UNSUBSCRIBE, sent_message(esp, kind=Kind.CAMPAIGN)))

    assert_ok(esp.post(client, batch))
    first = state()
    assert first[0] == len(batch)
    assert status(engaged) == MessageStatus.COMPLAINED
    assert status(bounced) == MessageStatus.BOUNCED
    assert status(queued) == MessageStatus.CANCELLED
    assert suppressions(soft_address) == {("all", "soft_bounce")}

    assert_ok(esp.post(client, [esp.redelivered(body) for body in batch]))
    assert state() == first


# --- The secret -------------------------------------------------------------------------------


@pytest.mark.parametrize("esp", [pytest.param(esp, id=esp.name) for esp in ESPS])
@pytest.mark.parametrize(
    "auth",
    [
        pytest.param(None, id="no-auth"),
        pytest.param(basic("hook:wrong"), id="wrong-password"),
        pytest.param(basic("other:s3cret"), id="wrong-user"),
        pytest.param("Bearer hook:s3cret", id="not-basic"),
    ],
)
def test_without_the_secret_nothing_happens(client, esp, auth):
    message = sent_message(esp)
    queued = MessageFactory(to_email=message.to_email, kind=Kind.CAMPAIGN)
    batch = [esp.event(HARD, message), esp.event(COMPLAINT, message)]

    responses = esp.post(client, batch, auth=auth)

    assert all(not 200 <= r.status_code < 300 for r in responses), [
        r.status_code for r in responses
    ]
    assert all(r.status_code in (400, 401, 403) for r in responses)
    assert not Event.objects.exists()
    assert not Suppression.objects.exists()
    assert status(message) == MessageStatus.SENT
    assert status(queued) == MessageStatus.QUEUED


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda body: body["signature"].update(signature="0" * 64), id="forged"),
        pytest.param(
            lambda body: body["signature"].update(
                signature=mailgun_signature(
                    body["signature"]["token"], body["signature"]["timestamp"], "other-key"
                )
            ),
            id="other-key",
        ),
        pytest.param(lambda body: body.pop("signature"), id="unsigned"),
        pytest.param(
            lambda body: body["signature"].update(token=secrets.token_hex(25)), id="replaced-token"
        ),
    ],
)
def test_mailgun_needs_its_signature_besides_basic_auth(client, tamper):
    esp = Mailgun()
    message = sent_message(esp)
    body = esp.event(HARD, message)
    tamper(body)

    (response,) = esp.post(client, [body])

    assert response.status_code == 400
    assert not Event.objects.exists()
    assert not Suppression.objects.exists()


def test_amazon_ses_without_auth_gets_the_401_sns_needs(client):
    esp = AmazonSES()
    (response,) = esp.post(client, [esp.event(HARD, sent_message(esp))], auth=None)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Basic ")


# --- Order ----------------------------------------------------------------------------------

SCENARIOS = {
    # final statuses outrank engagement
    "bounce": (
        [DELIVERED, OPENED, CLICKED, HARD],
        MessageStatus.BOUNCED,
        {("all", "hard_bounce")},
    ),
    # ...and complained outranks bounced
    "complaint": (
        [DELIVERED, OPENED, CLICKED, HARD, COMPLAINT],
        MessageStatus.COMPLAINED,
        {("all", "hard_bounce"), ("marketing", "complaint")},
    ),
    "engagement": ([DELIVERED, OPENED, CLICKED], MessageStatus.CLICKED, set()),
    # "report spam and unsubscribe": one marketing suppression, and it says complaint
    "unsubscribe-and-complaint": (
        [DELIVERED, OPENED, UNSUBSCRIBE, COMPLAINT],
        MessageStatus.COMPLAINED,
        {("marketing", "complaint")},
    ),
}


def orders(kinds: list[str], seed: str) -> list[list[int]]:
    """In order, reversed, and a few seeded shuffles: positions into ``kinds``."""
    rng = random.Random(seed)
    result = [list(range(len(kinds))), list(reversed(range(len(kinds))))]
    while len(result) < 6:
        order = list(range(len(kinds)))
        rng.shuffle(order)
        if order not in result:
            result.append(order)
    return result


def test_rank_semantics():
    assert RANK[MessageStatus.COMPLAINED] > RANK[MessageStatus.BOUNCED]
    assert RANK[MessageStatus.BOUNCED] > RANK[MessageStatus.FAILED]
    engagement = (MessageStatus.DELIVERED, MessageStatus.OPENED, MessageStatus.CLICKED)
    assert max(RANK[s] for s in engagement) < RANK[MessageStatus.FAILED]
    assert [RANK[s] for s in engagement] == sorted({RANK[s] for s in engagement})


@pytest.mark.parametrize(
    "esp,scenario",
    [
        pytest.param(esp, scenario, id=f"{esp.name}-{scenario}")
        for scenario, (kinds, _, _) in SCENARIOS.items()
        for esp in ESPS
        if set(kinds) <= set(esp.kinds)
    ],
)
def test_shuffled_events_give_the_same_final_state(client, esp, scenario):
    kinds, expected_status, expected_suppressions = SCENARIOS[scenario]
    finals = {}
    for n, order in enumerate(orders(kinds, f"{esp.name}-{scenario}")):
        message = sent_message(esp, to_email=f"order{n}@example.org")
        start = timezone.now() - timedelta(hours=1)
        # Timestamps say what really happened first; arrival order is the permutation.
        events = [
            esp.event(kind, message, at=start + timedelta(minutes=i))
            for i, kind in enumerate(kinds)
        ]
        assert_ok(esp.post(client, [events[i] for i in order]))
        finals[tuple(kinds[i] for i in order)] = (
            status(message),
            suppressions(message.to_email),
            Event.objects.filter(message=message).count(),
        )
    expected = (expected_status, expected_suppressions, len(kinds))
    assert len(finals) >= 6
    assert all(final == expected for final in finals.values()), finals


@pytest.mark.parametrize("esp", esps_with(SOFT, HARD))
@pytest.mark.parametrize("hard_at", [0, 2, 3], ids=["hard-first", "hard-third", "hard-last"])
def test_soft_and_hard_bounces_in_any_order_end_as_hard_bounce(client, esp, hard_at):
    """Three soft bounces and a hard one for one address: a hard-bounce suppression,
    whichever arrives first."""
    address = "bouncy@example.org"
    messages = [sent_message(esp, to_email=address) for _ in range(4)]
    kinds = [SOFT, SOFT, SOFT]
    kinds.insert(hard_at, HARD)

    for kind, message in zip(kinds, messages, strict=True):
        assert_ok(esp.post(client, [esp.event(kind, message)]))

    assert suppressions(address) == {("all", "hard_bounce")}


@pytest.mark.parametrize("esp", esps_with(HARD, COMPLAINT))
def test_webhook_never_rewrites_a_manual_suppression(client, esp):
    message = sent_message(esp)
    for scope in (Suppression.Scope.ALL, Suppression.Scope.MARKETING):
        Suppression.objects.create(
            email=message.to_email, scope=scope, reason=Suppression.Reason.MANUAL, source="admin"
        )

    assert_ok(esp.post(client, [esp.event(HARD, message), esp.event(COMPLAINT, message)]))

    assert suppressions(message.to_email) == {("all", "manual"), ("marketing", "manual")}
    assert set(Suppression.objects.values_list("source", flat=True)) == {"admin"}


def test_postmark_transient_and_dns_error_bounces_count_as_soft(client):
    """Postmark reports these as Bounce records; anymail calls them "deferred"."""
    esp = Postmark()
    address = "flaky@example.org"
    messages = [sent_message(esp, to_email=address) for _ in range(3)]
    bodies = []
    for message, (type_, code, name) in zip(
        messages,
        [
            ("Transient", 2, "Message delayed/Undeliverable"),
            ("DnsError", 2048, "DNS error"),
            ("Transient", 2, "Message delayed/Undeliverable"),
        ],
        strict=True,
    ):
        body = esp.event(SOFT, message)
        body.update(Type=type_, TypeCode=code, Name=name, Description="Temporary failure.")
        bodies.append(body)

    assert_ok(esp.post(client, bodies[:2]))
    assert not Suppression.objects.exists()
    assert_ok(esp.post(client, bodies[2:]))

    assert set(Event.objects.values_list("event_type", "bounce")) == {("deferred", "soft")}
    assert suppressions(address) == {("all", "soft_bounce")}
    assert {status(m) for m in messages} == {MessageStatus.SENT}  # a delay is no final status


# --- Linking events to messages -------------------------------------------------------------


@pytest.mark.parametrize("esp", [pytest.param(esp, id=esp.name) for esp in ESPS])
def test_event_before_the_send_recorded_the_provider_id_links_by_metadata(client, esp):
    # The ESP accepted the message and reported delivery before our worker stored the id.
    message = MessageFactory(status=MessageStatus.SENDING, provider_message_id="")
    assert_ok(esp.post(client, [esp.event(DELIVERED, message)]))

    event = Event.objects.get()
    assert event.message == message
    assert status(message) == MessageStatus.DELIVERED

    # The send finishes: it records the id and keeps the status the webhook moved on.
    outbox.record_sent(outbox.Sent(message, provider_id(esp.name, message)))
    message.refresh_from_db()
    assert message.status == MessageStatus.DELIVERED
    assert message.provider_message_id == provider_id(esp.name, message)

    # From now on the provider's id alone is enough.
    assert_ok(esp.post(client, [esp.event(OPENED, message, metadata=False)]))
    assert Event.objects.get(event_type="opened").message == message
    assert status(message) == MessageStatus.OPENED


@pytest.mark.parametrize("esp", [pytest.param(esp, id=esp.name) for esp in ESPS])
def test_event_without_metadata_links_by_provider_id(client, esp):
    message = sent_message(esp)
    other = sent_message(esp)  # a neighbour the event must not touch

    assert_ok(esp.post(client, [esp.event(HARD, message, metadata=False)]))

    assert Event.objects.get().message == message
    assert status(message) == MessageStatus.BOUNCED
    assert status(other) == MessageStatus.SENT


@pytest.mark.parametrize("esp", [pytest.param(esp, id=esp.name) for esp in ESPS])
def test_event_for_an_unknown_message_still_suppresses_the_address(client, esp):
    stranger = MessageFactory.build(to_email="stranger@example.org")  # never saved

    assert_ok(esp.post(client, [esp.event(HARD, stranger)]))

    event = Event.objects.get()
    assert event.message is None
    assert event.recipient == "stranger@example.org"
    assert suppressions("stranger@example.org") == {("all", "hard_bounce")}


@pytest.mark.parametrize("esp", [pytest.param(esp, id=esp.name) for esp in ESPS])
def test_recipient_address_case_is_normalized(client, esp):
    message = sent_message(esp, to_email="mixed.case@example.org")
    queued = MessageFactory(to_email="mixed.case@example.org", kind=Kind.CAMPAIGN)

    assert_ok(esp.post(client, [esp.event(HARD, message, recipient="Mixed.Case@Example.ORG")]))

    assert Event.objects.get().recipient == "mixed.case@example.org"
    assert suppressions("mixed.case@example.org") == {("all", "hard_bounce")}
    assert status(queued) == MessageStatus.CANCELLED


# --- Consequences for waiting mail -----------------------------------------------------------


@pytest.mark.parametrize("esp", esps_with(HARD))
def test_hard_bounce_cancels_queued_marketing_but_not_transactional(client, esp):
    bounced = sent_message(esp, to_email="gone@example.org")
    campaign = MessageFactory(to_email="gone@example.org", kind=Kind.CAMPAIGN)
    drip = MessageFactory(
        to_email="gone@example.org",
        kind=Kind.DRIP,
        status=MessageStatus.SCHEDULED,
        send_after=timezone.now() + timedelta(days=1),
    )
    transactional = MessageFactory(to_email="gone@example.org", kind=Kind.TRANSACTIONAL)
    sent_campaign = sent_message(esp, to_email="gone@example.org", kind=Kind.CAMPAIGN)
    elsewhere = MessageFactory(to_email="still.here@example.org", kind=Kind.CAMPAIGN)

    assert_ok(esp.post(client, [esp.event(HARD, bounced)]))

    assert status(campaign) == MessageStatus.CANCELLED
    assert status(drip) == MessageStatus.CANCELLED
    campaign.refresh_from_db()
    assert campaign.last_error == "Address suppressed."
    assert status(transactional) == MessageStatus.QUEUED
    assert status(sent_campaign) == MessageStatus.SENT
    assert status(elsewhere) == MessageStatus.QUEUED
    assert status(bounced) == MessageStatus.BOUNCED


# --- Volume ---------------------------------------------------------------------------------


def test_sendgrid_batch_of_500_events_in_one_post(client):
    esp = SendGrid()
    messages = Message.objects.bulk_create(
        MessageFactory.build(
            status=MessageStatus.SENT, sent_at=timezone.now(), to_email=f"bulk{n}@example.org"
        )
        for n in range(125)
    )
    for message in messages:
        message.provider_message_id = provider_id(esp.name, message)
    Message.objects.bulk_update(messages, ["provider_message_id"])
    last = [HARD, COMPLAINT, UNSUBSCRIBE, GROUP_UNSUBSCRIBE, SOFT]
    batch = []
    for n, message in enumerate(messages):
        for kind in (DELIVERED, OPENED, CLICKED, last[n % len(last)]):
            batch.append(esp.event(kind, message, metadata=n % 2 == 0))
    random.Random(500).shuffle(batch)
    assert len(batch) == 500

    started = time.perf_counter()
    (response,) = esp.post(client, batch)
    elapsed = time.perf_counter() - started
    print(f"\nSendGrid batch of {len(batch)} events in one POST: {elapsed:.2f}s")

    assert response.status_code == 200
    assert Event.objects.count() == 500
    assert not Event.objects.filter(message__isnull=True).exists()
    statuses = dict(Message.objects.values_list("to_email", "status"))
    expected = {
        HARD: MessageStatus.BOUNCED,
        COMPLAINT: MessageStatus.COMPLAINED,
        UNSUBSCRIBE: MessageStatus.CLICKED,
        GROUP_UNSUBSCRIBE: MessageStatus.CLICKED,
        SOFT: MessageStatus.BOUNCED,
    }
    assert statuses == {
        f"bulk{n}@example.org": expected[last[n % len(last)]] for n in range(len(messages))
    }
    counts = {
        (scope, reason): Suppression.objects.filter(scope=scope, reason=reason).count()
        for scope, reason in Suppression.objects.values_list("scope", "reason").distinct()
    }
    assert counts == {
        ("all", "hard_bounce"): 25,
        ("marketing", "complaint"): 25,
        ("marketing", "unsubscribe"): 50,
    }

    # and the same 500 again: nothing new
    before = state()
    (response,) = esp.post(client, batch)
    assert response.status_code == 200
    assert state() == before


# --- Hostile input ------------------------------------------------------------------------
#
# What an attacker who knows (or guesses) the webhook URL, or holds the credentials but
# not the ESP's good faith, posts: each gets a 4xx, and changes nothing.


def hostile_request(esp: Esp, body: bytes) -> dict:
    """``body`` as the ESP would deliver it: content type and, for SNS, its headers."""
    if isinstance(esp, AmazonSES):
        return {
            "data": body,
            "content_type": "text/plain; charset=utf-8",  # as is: the test client keeps it
            "HTTP_X_AMZ_SNS_MESSAGE_TYPE": "Notification",
            "HTTP_X_AMZ_SNS_MESSAGE_ID": "1",
        }
    return {"data": body, "content_type": "application/json"}


#: Bodies that are not JSON, or JSON of no ESP's shape.
RAW_BODIES = {
    "not-json": b"{not json",
    "empty": b"",
    "not-utf8": b'\xff\xfe{"event": "bounce"}',
    "nested-50000-deep": b"[" * 50000 + b"]" * 50000,
    "null": b"null",
    "number": b"42",
    "string": b'"bounce"',
    "list-of-numbers": b"[1, 2, 3]",
    "unknown-object": b'{"unexpected": true}',
}


@pytest.fixture
def bystander():
    """A sent message and a queued one that no hostile request may touch."""
    sent = sent_message(to_email="bystander@example.org")
    queued = MessageFactory(to_email="bystander@example.org", kind=Kind.CAMPAIGN)
    return sent, queued


def assert_untouched(before, bystander) -> None:
    assert state() == before
    sent, queued = bystander
    assert (status(sent), status(queued)) == (MessageStatus.SENT, MessageStatus.QUEUED)


@pytest.mark.parametrize("esp", [pytest.param(esp, id=esp.name) for esp in ESPS])
@pytest.mark.parametrize("name", list(RAW_BODIES))
def test_a_body_of_no_esp_shape_gets_400_even_with_the_credentials(client, esp, name, bystander):
    before = state()

    response = client.post(
        esp.url, **hostile_request(esp, RAW_BODIES[name]), HTTP_AUTHORIZATION=AUTH
    )

    assert response.status_code == 400, response.content[:300]
    assert_untouched(before, bystander)


def signed_for(esp: Esp, body) -> bytes:
    """``body`` as a validly authenticated request carries it (Mailgun: signed now)."""
    if isinstance(esp, Mailgun):
        body = {"signature": mailgun_signed(), "event-data": body}
    elif isinstance(esp, AmazonSES):
        body = {
            "Type": "Notification",
            "MessageId": "1",
            "Timestamp": iso(timezone.now()),
            "Message": body if isinstance(body, str) else json.dumps(body),
        }
    return json.dumps(body).encode()


#: Payloads of the right envelope whose fields have the wrong shapes, per ESP: each
#: mutates the ESP's own raw hard bounce for the bystander.
def _ses(change):
    def mutate(body):
        ses = json.loads(body["Message"])
        change(ses)
        body["Message"] = json.dumps(ses)

    return mutate


WRONG_SHAPES = {
    "sendgrid": {
        "names-nobody": lambda b: b.clear() or b.update(event="bounce"),
        "recipient-is-an-object": lambda b: b.__setitem__("email", {"addr": "x@example.org"}),
        "timestamp-is-text": lambda b: b.__setitem__("timestamp", "yesterday"),
        "timestamp-overflows": lambda b: b.__setitem__("timestamp", 10**20),
        "event-is-a-list": lambda b: b.__setitem__("event", ["bounce"]),
        "our-id-is-an-object": lambda b: b.__setitem__("mailer_message_id", {"$ne": None}),
        "category-is-a-number": lambda b: b.__setitem__("category", 7),
    },
    "mailgun": {
        "event-data-is-a-list": lambda b: b.__setitem__("event-data", []),
        "recipient-is-a-number": lambda b: b["event-data"].__setitem__("recipient", 5),
        "timestamp-is-text": lambda b: b["event-data"].__setitem__("timestamp", "yesterday"),
        "timestamp-overflows": lambda b: b["event-data"].__setitem__("timestamp", 1e300),
        "event-is-a-list": lambda b: b["event-data"].__setitem__("event", ["failed"]),
        "user-variables-is-a-list": lambda b: b["event-data"].__setitem__("user-variables", [1]),
        "message-is-text": lambda b: b["event-data"].__setitem__("message", "x"),
        "tags-is-text": lambda b: b["event-data"].__setitem__("tags", "a,b"),
    },
    "postmark": {
        "recipient-is-a-list": lambda b: b.__setitem__("Email", ["x@example.org"]),
        "record-type-is-a-list": lambda b: b.__setitem__("RecordType", ["Bounce"]),
        "metadata-is-a-list": lambda b: b.__setitem__("Metadata", ["x"]),
        "message-id-is-an-object": lambda b: b.__setitem__("MessageID", {"a": 1}),
        "bounced-at-is-a-number": lambda b: b.__setitem__("BouncedAt", 12),
        "inbound-on-tracking": lambda b: b.pop("RecordType") and b.__setitem__("FromFull", {}),
    },
    "amazon_ses": {
        "message-not-json": lambda b: b.__setitem__("Message", "{not json"),
        "mail-is-text": _ses(lambda s: s.__setitem__("mail", "x")),
        "recipients-is-text": _ses(lambda s: s["bounce"].__setitem__("bouncedRecipients", "x")),
        "recipient-is-a-number": _ses(
            lambda s: s["bounce"]["bouncedRecipients"][0].__setitem__("emailAddress", 5)
        ),
        "headers-are-text": _ses(lambda s: s["mail"].__setitem__("headers", "x")),
        "message-is-a-number": lambda b: b.__setitem__("Message", 42),
    },
    "brevo": {
        "recipient-is-a-number": lambda b: b.__setitem__("email", 5),
        "custom-not-json": lambda b: b.__setitem__("X-Mailin-custom", "{not json"),
        "custom-is-a-list": lambda b: b.__setitem__("X-Mailin-custom", "[1]"),
        "epoch-is-text": lambda b: b.__setitem__("ts_epoch", "yesterday"),
        "event-is-a-list": lambda b: b.__setitem__("event", ["hard_bounce"]),
        "inbound-on-tracking": lambda b: b.__setitem__("items", []),
    },
}


@pytest.mark.parametrize(
    "esp,name",
    [
        pytest.param(esp, name, id=f"{esp.name}-{name}")
        for esp in ESPS
        for name in WRONG_SHAPES[esp.name]
    ],
)
def test_an_event_of_the_wrong_shape_gets_400_and_nothing_of_the_batch_is_kept(
    client, esp, name, bystander
):
    sent, _queued = bystander
    raw = esp.event(HARD, sent)
    if isinstance(esp, Mailgun):
        raw = raw["event-data"]
        body = {"event-data": raw}
        WRONG_SHAPES[esp.name][name](body)
        payload = signed_for(esp, body["event-data"])
    elif isinstance(esp, AmazonSES):
        WRONG_SHAPES[esp.name][name](raw)
        payload = json.dumps(raw).encode()
    elif isinstance(esp, SendGrid):
        good = esp.event(DELIVERED, sent)  # a well-formed event in the same batch
        WRONG_SHAPES[esp.name][name](raw)
        payload = json.dumps([good, raw]).encode()
    else:
        WRONG_SHAPES[esp.name][name](raw)
        payload = json.dumps(raw).encode()
    before = state()

    response = client.post(esp.url, **hostile_request(esp, payload), HTTP_AUTHORIZATION=AUTH)

    assert response.status_code == 400, response.content[:300]
    assert_untouched(before, bystander)


# --- An event about someone else's message ------------------------------------------------


@pytest.mark.parametrize("esp", esps_with(HARD, COMPLAINT))
@pytest.mark.parametrize("by", ["our-id", "provider-id"])
def test_an_event_naming_another_recipient_moves_and_suppresses_nothing(client, esp, by):
    """A bounce for a@x carrying b's ids: b's message stays as it was, b's address is not
    suppressed, and nor is a@x on an event that contradicts itself."""
    victim = sent_message(esp, to_email="b@example.org")
    waiting = MessageFactory(to_email="b@example.org", kind=Kind.CAMPAIGN)
    before = state()
    events = [
        esp.event(kind, victim, recipient="a@example.net", metadata=by == "our-id")
        for kind in (HARD, COMPLAINT)
    ]
    if by == "our-id" and not isinstance(esp, SendGrid | AmazonSES):
        for event in events:  # and a provider id that points nowhere
            _set_provider_id(esp, event, "<nowhere@example.invalid>")

    assert_ok(esp.post(client, events))

    assert state() == before
    assert (status(victim), status(waiting)) == (MessageStatus.SENT, MessageStatus.QUEUED)
    assert not Suppression.objects.exists()


def _set_provider_id(esp: Esp, event: dict, value: str) -> None:
    if isinstance(esp, Mailgun):
        event["event-data"]["message"]["headers"]["message-id"] = value.strip("<>")
    elif isinstance(esp, Postmark):
        event["MessageID"] = value
    elif isinstance(esp, Brevo):
        event["message-id"] = value


@pytest.mark.parametrize("esp", esps_with(HARD))
def test_an_internationalised_domain_in_either_form_is_the_same_recipient(client, esp):
    message = sent_message(esp, to_email="reader@bücher.example")

    assert_ok(
        esp.post(client, [esp.event(HARD, message, recipient="Reader@xn--bcher-kva.example")])
    )

    assert status(message) == MessageStatus.BOUNCED


# --- Mailgun's signature: fresh, and once ----------------------------------------------------


def mailgun_post(client, body: dict):
    return client.post(
        Mailgun.url, data=json.dumps(body), content_type="application/json", HTTP_AUTHORIZATION=AUTH
    )


@pytest.mark.parametrize(
    "signed_at",
    [
        pytest.param(datetime(2020, 3, 1, tzinfo=UTC).timestamp(), id="from-2020"),
        pytest.param(time.time() - 301, id="five-minutes-old"),
        pytest.param(time.time() + 3600, id="an-hour-ahead"),
    ],
)
def test_mailgun_refuses_a_stale_or_future_signature(client, bystander, signed_at):
    sent, _ = bystander
    body = Mailgun().event(HARD, sent)
    body["signature"] = mailgun_signed(at=signed_at)
    before = state()

    response = mailgun_post(client, body)

    assert response.status_code == 400
    assert_untouched(before, bystander)


@pytest.mark.parametrize("stamp", ["yesterday", "", "nan", "inf", "1e400"])
def test_mailgun_refuses_a_signed_timestamp_that_is_no_time(client, bystander, stamp):
    """Even correctly signed (as if by Mailgun): a time that is no number is refused."""
    sent, _ = bystander
    body = Mailgun().event(HARD, sent)
    token = secrets.token_hex(25)
    body["signature"] = {
        "timestamp": stamp,
        "token": token,
        "signature": mailgun_signature(token, stamp),
    }
    before = state()

    assert mailgun_post(client, body).status_code == 400
    assert_untouched(before, bystander)


def test_mailgun_accepts_a_signature_a_few_minutes_old(client):
    message = sent_message(Mailgun())
    body = Mailgun().event(HARD, message)
    body["signature"] = mailgun_signed(at=time.time() - 240)

    assert mailgun_post(client, body).status_code == 200
    assert status(message) == MessageStatus.BOUNCED


def test_mailgun_token_used_twice_with_other_event_data_is_refused(client):
    """The 2020 attack: one captured signature carried two different events."""
    first = sent_message(Mailgun(), to_email="first@example.org")
    second = sent_message(Mailgun(), to_email="second@example.org")
    signature = mailgun_signed()
    body_one = {**Mailgun().event(HARD, first), "signature": signature}
    body_two = {**Mailgun().event(HARD, second), "signature": signature}

    assert mailgun_post(client, body_one).status_code == 200
    after_first = state()
    response = mailgun_post(client, body_two)

    assert response.status_code == 400
    assert state() == after_first
    assert status(second) == MessageStatus.SENT
    assert suppressions("second@example.org") == set()
    assert suppressions("first@example.org") == {("all", "hard_bounce")}


def test_mailgun_same_request_replayed_is_refused(client):
    message = sent_message(Mailgun())
    body = Mailgun().event(COMPLAINT, message)

    assert mailgun_post(client, body).status_code == 200
    after = state()
    assert mailgun_post(client, body).status_code == 400
    assert state() == after


def test_mailgun_legacy_form_post_with_a_stale_signature_is_refused(client, bystander):
    sent, _ = bystander
    signature = mailgun_signed(at=datetime(2020, 3, 1, tzinfo=UTC).timestamp())
    before = state()

    response = client.post(
        Mailgun.url,
        {**signature, "event": "bounced", "recipient": sent.to_email, "code": "550"},
        HTTP_AUTHORIZATION=AUTH,
    )

    assert response.status_code == 400
    assert_untouched(before, bystander)


def test_mailgun_without_a_reachable_store_answers_503_and_keeps_nothing(
    client, settings, bystander
):
    """Fail safe: a signature that cannot be checked is not accepted; Mailgun retries (a
    503 is no 406), and the retry, signed anew, is recorded once the store answers."""
    sent, _ = bystander
    settings.MAILER = {**settings.MAILER, "REDIS_URL": f"redis://127.0.0.1:{_closed_port()}/0"}
    body = Mailgun().event(HARD, sent)
    before = state()

    response = mailgun_post(client, body)

    assert response.status_code == 503
    assert_untouched(before, bystander)

    settings.MAILER = {k: v for k, v in settings.MAILER.items() if k != "REDIS_URL"}
    assert mailgun_post(client, Mailgun().redelivered(body)).status_code == 200
    assert status(sent) == MessageStatus.BOUNCED


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when this returns: nothing listens


def test_mailgun_tokens_are_remembered_in_the_database_without_redis(client, settings):
    settings.MAILER = {**settings.MAILER, "REDIS_URL": None}
    settings.CELERY_BROKER_URL = "memory://"
    message = sent_message(Mailgun())
    body = Mailgun().event(HARD, message)
    WebhookSignature.objects.create(key="mailgun:expired", expires_at=timezone.now())

    assert mailgun_post(client, body).status_code == 200
    assert mailgun_post(client, body).status_code == 400
    assert list(WebhookSignature.objects.values_list("key", flat=True)) == [
        "mailgun:" + hashlib.sha256(body["signature"]["token"].encode()).hexdigest()
    ]  # the expired row was pruned; the token is stored hashed
    assert Event.objects.count() == 1
