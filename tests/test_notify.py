"""Events for the host: mailer's signals and the outgoing webhooks, once per event even
when the ESP replays its webhook, posted signed to a real local HTTP server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import transaction
from django.test import Client
from django.utils import timezone

from mailer import notify, outbox, unsubscribe, webhooks_out
from mailer.models import Event, Message, MessageStatus, WebhookDelivery, WebhookEndpoint
from tests.factories import MessageFactory
from tests.test_webhooks import DELIVERED, HARD, SECRET, Postmark

pytestmark = [pytest.mark.django_db]

POSTMARK = Postmark()


@pytest.fixture(autouse=True)
def esp_secret(settings):
    settings.ANYMAIL = {"WEBHOOK_SECRET": SECRET}
    notify.forget_endpoints()
    yield
    notify.forget_endpoints()


class Receiver:
    """A real HTTP server on 127.0.0.1 that records each POST and answers ``codes``."""

    def __init__(self):
        self.posts: list[tuple[dict, bytes]] = []
        self.codes: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts.append((dict(self.headers), body))
                code = outer.codes.pop(0) if outer.codes else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def endpoint(receiver) -> WebhookEndpoint:
    return WebhookEndpoint.objects.create(
        name="host", url=receiver.url, secret=webhooks_out.new_secret(), event_types=[]
    )


@pytest.fixture
def heard():
    found: list[tuple[str, dict]] = []
    receivers = {}
    for kind, signal in notify.SIGNALS.items():

        def receiver(sender, kind=kind, **kwargs):
            found.append((kind, kwargs))

        receivers[kind] = receiver
        signal.connect(receiver)
    yield found
    for kind, signal in notify.SIGNALS.items():
        signal.disconnect(receivers[kind])


def sent_message(**fields) -> Message:
    return MessageFactory(status=MessageStatus.SENT, sent_at=timezone.now(), **fields)


def test_replayed_esp_webhook_fires_signal_and_webhook_once(
    client, endpoint, receiver, heard, django_capture_on_commit_callbacks
):
    message = sent_message(metadata={"order": 7})
    event = POSTMARK.event(DELIVERED, message)
    with django_capture_on_commit_callbacks(execute=True):
        for _ in range(3):  # the ESP delivers its webhook three times
            POSTMARK.post(client, [event])

    assert [kind for kind, _ in heard] == ["message.delivered"]
    kwargs = heard[0][1]
    assert kwargs["message"].pk == message.pk and kwargs["event"].event_type == "delivered"
    deliveries = list(WebhookDelivery.objects.all())
    assert len(deliveries) == 1 and deliveries[0].event_id == kwargs["event_id"]

    assert webhooks_out.deliver_due().delivered == 1
    assert webhooks_out.deliver_due().delivered == 0
    assert len(receiver.posts) == 1
    headers, body = receiver.posts[0]
    payload = json.loads(body)
    assert payload["type"] == "message.delivered" and payload["id"] == kwargs["event_id"]
    assert payload["data"]["message"] == {
        "id": f"msg_{message.uuid.hex}",
        "kind": message.kind,
        "to": message.to_email,
        "template": message.template_slug,
        "metadata": {"order": 7},
    }
    assert webhooks_out.verify(endpoint.secret, headers["Mailer-Signature"], body)
    assert not webhooks_out.verify("whsec_other", headers["Mailer-Signature"], body)
    assert not webhooks_out.verify(endpoint.secret, headers["Mailer-Signature"], body + b" ")
    assert WebhookDelivery.objects.get().status == WebhookDelivery.Status.DELIVERED


def test_signals_wait_for_the_commit_and_a_rollback_sends_none(heard, endpoint):
    message = sent_message()
    event = POSTMARK.event(HARD, message)
    with transaction.atomic():
        POSTMARK.post(Client(), [event])
        assert heard == []  # not before the commit
        transaction.set_rollback(True)
    assert heard == [] and not WebhookDelivery.objects.exists()


def test_hard_bounce_fires_bounced_with_the_event(
    client, heard, django_capture_on_commit_callbacks
):
    message = sent_message()
    with django_capture_on_commit_callbacks(execute=True):
        POSTMARK.post(client, [POSTMARK.event(HARD, message)])
    assert [kind for kind, _ in heard] == ["message.bounced"]
    assert heard[0][1]["event"].bounce == Event.Bounce.HARD


def test_endpoint_gets_only_the_event_types_it_chose(client, receiver, heard):
    WebhookEndpoint.objects.create(
        name="bounces", url=receiver.url, secret="s", event_types=["message.bounced"]
    )
    message = sent_message()
    POSTMARK.post(client, [POSTMARK.event(DELIVERED, message), POSTMARK.event(HARD, message)])
    assert list(WebhookDelivery.objects.values_list("event_type", flat=True)) == ["message.bounced"]


def test_sent_and_failed_fire_from_the_worker_path(
    endpoint, heard, django_capture_on_commit_callbacks
):
    ok = MessageFactory(status=MessageStatus.SENDING)
    bad = MessageFactory(status=MessageStatus.SENDING)
    with django_capture_on_commit_callbacks(execute=True):
        outbox.record_sent(outbox.Sent(ok, "pid-1"))
        outbox.record_failed(bad, "550 5.1.1 no such user")
        outbox.record_failed(bad, "550 again")  # already failed: no second event
    assert sorted(kind for kind, _ in heard) == ["message.failed", "message.sent"]
    assert sorted(WebhookDelivery.objects.values_list("event_type", flat=True)) == [
        "message.failed",
        "message.sent",
    ]


def test_unsubscribe_fires_contact_unsubscribed_once(
    endpoint, heard, django_capture_on_commit_callbacks
):
    target = unsubscribe.Target(email="ada@example.com", message_uuid=None)
    with django_capture_on_commit_callbacks(execute=True):
        assert unsubscribe.unsubscribe(target, source="link")
        assert not unsubscribe.unsubscribe(target, source="link")
    assert [kind for kind, _ in heard] == ["contact.unsubscribed"]
    assert heard[0][1]["email"] == "ada@example.com"
    payload = WebhookDelivery.objects.get().payload
    assert (
        payload["type"] == "contact.unsubscribed" and payload["data"]["email"] == "ada@example.com"
    )


def test_failing_endpoint_is_retried_with_backoff_then_failed(endpoint, receiver, settings):
    settings.MAILER = {**settings.MAILER, "WEBHOOK_MAX_ATTEMPTS": 3}
    receiver.codes = [500, 503, 500]
    with transaction.atomic():
        notify.sent([(sent_message(), timezone.now())])
    delivery = WebhookDelivery.objects.get()

    first = webhooks_out.deliver_due()
    delivery.refresh_from_db()
    assert first.retrying == 1 and delivery.attempts == 1 and delivery.last_status_code == 500
    wait = (delivery.next_attempt_at - timezone.now()).total_seconds()
    assert 5 < wait <= webhooks_out.backoff(1) + 1

    for _ in range(2):  # due again each time
        WebhookDelivery.objects.update(next_attempt_at=timezone.now())
        webhooks_out.deliver_due()
    delivery.refresh_from_db()
    assert delivery.status == WebhookDelivery.Status.FAILED and delivery.attempts == 3
    assert len(receiver.posts) == 3
    assert webhooks_out.backoff(2) == 2 * webhooks_out.backoff(1)


def test_unreachable_endpoint_waits_without_failing_the_event(receiver, endpoint):
    receiver.close()
    with transaction.atomic():
        notify.sent([(sent_message(), timezone.now())])
    result = webhooks_out.deliver_due()
    delivery = WebhookDelivery.objects.get()
    assert result.retrying == 1 and delivery.status == WebhookDelivery.Status.PENDING
    assert "could not be reached" in delivery.last_error


def test_admin_redeliver_queues_a_failed_delivery_again(admin_client, endpoint, receiver):
    with transaction.atomic():
        notify.sent([(sent_message(), timezone.now())])
    WebhookDelivery.objects.update(status=WebhookDelivery.Status.FAILED, attempts=8)
    delivery = WebhookDelivery.objects.get()
    response = admin_client.post(
        "/admin/mailer/webhookdelivery/",
        {"action": "redeliver", "_selected_action": [delivery.pk]},
    )
    assert response.status_code == 302
    assert webhooks_out.deliver_due().delivered == 1
    assert WebhookDelivery.objects.get().status == WebhookDelivery.Status.DELIVERED


def test_no_endpoint_and_no_receiver_costs_nothing(django_assert_num_queries):
    notify.forget_endpoints()
    message = sent_message()
    with django_assert_num_queries(1):  # the endpoint lookup, then cached
        notify.sent([(message, timezone.now())])
    with django_assert_num_queries(0):
        notify.sent([(message, timezone.now())])
