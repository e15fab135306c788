"""The HTTP API through Django's test client: status codes, problem documents, keys,
scopes, rate limits, idempotency, batches, reading and suppressing, the OpenAPI document."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from io import StringIO

import jsonschema
import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from mailer import apikeys, ratelimit
from mailer.http_api import idempotency
from mailer.models import ApiKey, Event, IdempotencyRecord, Message, MessageStatus, Suppression
from tests.factories import MessageFactory, SuppressionFactory

pytestmark = pytest.mark.django_db

WELCOME = {"user_name": "Ada", "login_url": "http://localhost:8000/"}
PROBLEM = "application/problem+json"


@pytest.fixture
def redis_store(broker, settings):
    """Counters in the test Redis, emptied before and after."""
    settings.MAILER = {**settings.MAILER, "REDIS_URL": None}
    return broker


@pytest.fixture
def key(redis_store) -> str:
    _, raw = apikeys.create("test", scopes=["send", "read", "suppress"])
    return raw


@pytest.fixture
def client(key) -> Client:
    return Client(headers={"Authorization": f"Bearer {key}"})


def post(client: Client, path: str, body, **headers):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(f"/api/v1/{path}", data, content_type="application/json", headers=headers)


def welcome(to: str = "ada@example.com", **extra) -> dict:
    return {"to": to, "template": "welcome", "context": WELCOME, **extra}


def assert_problem(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM
    body = response.json()
    assert body["type"] == f"urn:mailer:problem:{kind}"
    assert body["status"] == status and body["title"]
    return body


# --- Sending -----------------------------------------------------------------------------


def test_send_answers_202_with_public_id_and_queues_the_message(client):
    response = post(client, "messages", welcome(metadata={"user_id": 42}))

    assert response.status_code == 202
    body = response.json()
    message = Message.objects.get()
    assert body == {"id": f"msg_{message.uuid.hex}", "status": "queued"}
    assert message.to_email == "ada@example.com" and message.template_slug == "welcome"
    assert message.metadata == {"user_id": 42} and message.status == MessageStatus.QUEUED


def test_send_at_in_the_future_is_scheduled(client):
    later = (timezone.now() + timedelta(hours=2)).isoformat()
    response = post(client, "messages", welcome(send_at=later))

    assert response.status_code == 202 and response.json()["status"] == "scheduled"
    assert Message.objects.get().send_after is not None


def test_inline_subject_and_html_are_sent_through_the_inline_template(client):
    body = {"to": "ada@example.com", "subject": "Your receipt", "html": "<p>Paid: <b>42</b></p>"}
    response = post(client, "messages", body)

    assert response.status_code == 202
    message = Message.objects.get()
    assert message.template_slug == "inline" and message.subject == "Your receipt"
    assert message.context["inline_html"] == "<p>Paid: <b>42</b></p>"
    assert "Paid: 42" in message.context["inline_text"]


def test_malformed_json_answers_400(client):
    response = post(client, "messages", '{"to": "ada@example.com",')
    assert_problem(response, 400, "malformed-json")
    assert not Message.objects.exists()


@pytest.mark.parametrize(
    ("body", "field", "kind"),
    [
        ({"template": "welcome"}, "to", "validation-error"),
        (welcome(to="not-an-address"), "to", "invalid-recipient"),
        (welcome(context=["not", "a", "mapping"]), "context", "validation-error"),
        (
            {"to": "ada@example.com", "template": "no-such-template"},
            "template",
            "template-not-found",
        ),
        ({"to": "ada@example.com", "subject": "Hi"}, "html", "validation-error"),
        (welcome(subject="Hi"), "template", "validation-error"),
        (welcome(colour="blue"), "colour", "validation-error"),
        (welcome(send_at="tomorrow"), "send_at", "validation-error"),
    ],
)
def test_invalid_fields_answer_422_naming_the_field_and_store_nothing(client, body, field, kind):
    response = post(client, "messages", body)

    problem = assert_problem(response, 422, kind)
    assert field in {error["field"] for error in problem["errors"]}
    assert not Message.objects.exists()


def test_line_break_in_subject_through_context_is_a_header_injection(client):
    body = welcome(context={**WELCOME, "user_name": "Ada\r\nBcc: eve@example.com"})
    assert_problem(post(client, "messages", body), 422, "header-injection")
    assert not Message.objects.exists()


def test_body_over_the_limit_answers_413_unread(client, settings):
    settings.MAILER = {**settings.MAILER, "API_MAX_BODY_BYTES": 1000}
    body = welcome(context={**WELCOME, "padding": "x" * 2000})

    assert_problem(post(client, "messages", body), 413, "payload-too-large")
    assert not Message.objects.exists()


# --- Keys, scopes, rate limits -------------------------------------------------------------


def test_missing_key_answers_401_with_a_bearer_challenge(redis_store):
    response = post(Client(), "messages", welcome())

    assert_problem(response, 401, "missing-api-key")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_wrong_secret_with_a_real_prefix_answers_401(key):
    prefix = key.split(".")[0]
    response = post(Client(headers={"Authorization": f"Bearer {prefix}.wrong"}), "messages", {})
    assert_problem(response, 401, "invalid-api-key")


def test_revoked_key_answers_401_from_the_next_request(client, key):
    assert post(client, "messages", welcome()).status_code == 202
    apikeys.revoke(ApiKey.objects.get())

    assert_problem(post(client, "messages", welcome("bob@example.com")), 401, "revoked-api-key")
    assert Message.objects.count() == 1


def test_expired_key_answers_401(client):
    ApiKey.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert_problem(post(client, "messages", welcome()), 401, "expired-api-key")


def test_key_without_the_scope_answers_403(redis_store):
    _, raw = apikeys.create("reader", scopes=["read"])
    reader = Client(headers={"Authorization": f"Bearer {raw}"})

    assert_problem(post(reader, "messages", welcome()), 403, "missing-scope")
    assert reader.get("/api/v1/messages").status_code == 200
    response = reader.post("/api/v1/contacts/ada@example.com/suppressions")
    assert_problem(response, 403, "missing-scope")
    assert not Message.objects.exists() and not Suppression.objects.exists()


def test_key_records_when_it_was_last_used(client):
    assert ApiKey.objects.get().last_used_at is None
    post(client, "messages", welcome())
    assert ApiKey.objects.get().last_used_at is not None


def test_key_is_stored_only_as_a_hash_behind_its_visible_prefix(key):
    row = ApiKey.objects.get()
    assert key.startswith(f"{row.prefix}.")
    assert key.split(".", 1)[1] not in row.hashed_key and row.hashed_key.startswith("sha512$$")


def test_rate_limit_answers_429_with_retry_after_and_ratelimit_headers(client):
    ApiKey.objects.update(rate_limit="3/m")
    answers = [post(client, "messages", welcome(f"u{i}@example.com")) for i in range(4)]

    assert [r.status_code for r in answers] == [202, 202, 202, 429]
    assert [r["RateLimit-Remaining"] for r in answers] == ["2", "1", "0", "0"]
    assert all(r["RateLimit-Limit"] == "3" for r in answers)
    limited = assert_problem(answers[-1], 429, "rate-limited")
    assert 1 <= int(answers[-1]["Retry-After"]) <= 60 and limited["detail"]
    assert Message.objects.count() == 3


def test_rate_limit_is_shared_with_other_processes(client):
    """Another web process spending the key's allowance leaves none for this one."""
    row = ApiKey.objects.get()
    row.rate_limit = "5/m"
    row.save()
    script = (
        "import django; django.setup()\n"
        "from mailer import ratelimit\n"
        f"print(sum(ratelimit.hit('key:{row.pk}', 5, 60).allowed for _ in range(5)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "5"
    assert_problem(post(client, "messages", welcome()), 429, "rate-limited")


def test_rate_limit_without_redis_counts_in_the_database(client, settings):
    settings.CELERY_BROKER_URL = "memory://"
    assert ratelimit.redis_client() is None
    ApiKey.objects.update(rate_limit="2/m")
    codes = [post(client, "messages", welcome(f"u{i}@example.com")).status_code for i in range(3)]
    assert codes == [202, 202, 429]


# --- Idempotency ---------------------------------------------------------------------------


def test_same_idempotency_key_and_body_replays_the_first_answer(client):
    first = post(client, "messages", welcome(), **{"Idempotency-Key": "order-1"})
    again = post(client, "messages", welcome(), **{"Idempotency-Key": "order-1"})

    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first
    assert Message.objects.count() == 1


def test_same_idempotency_key_with_another_body_answers_422(client):
    post(client, "messages", welcome(), **{"Idempotency-Key": "order-1"})
    other = post(client, "messages", welcome("bob@example.com"), **{"Idempotency-Key": "order-1"})

    assert_problem(other, 422, "idempotency-key-reused")
    assert Message.objects.count() == 1


def test_idempotency_key_whose_first_request_is_in_flight_answers_409(client):
    body = json.dumps(welcome()).encode()
    # The first request has claimed the key and not answered yet.
    idempotency.begin(
        ApiKey.objects.get(), "order-1", idempotency.fingerprint("POST", "/api/v1/messages", body)
    )
    response = post(client, "messages", body, **{"Idempotency-Key": "order-1"})

    assert_problem(response, 409, "idempotency-in-flight")
    assert response["Retry-After"] == "1"
    assert not Message.objects.exists()


def test_abandoned_in_flight_key_is_taken_over_after_the_timeout(client):
    body = json.dumps(welcome()).encode()
    idempotency.begin(
        ApiKey.objects.get(), "order-1", idempotency.fingerprint("POST", "/api/v1/messages", body)
    )
    IdempotencyRecord.objects.update(started_at=timezone.now() - timedelta(minutes=5))

    assert post(client, "messages", body, **{"Idempotency-Key": "order-1"}).status_code == 202
    assert Message.objects.count() == 1


def test_refused_request_frees_its_idempotency_key(client):
    bad = post(client, "messages", welcome(to="nope"), **{"Idempotency-Key": "k"})
    assert_problem(bad, 422, "invalid-recipient")
    assert not IdempotencyRecord.objects.exists()


def test_idempotency_keys_belong_to_their_api_key(client, redis_store):
    _, other_raw = apikeys.create("other", scopes=["send"])
    other = Client(headers={"Authorization": f"Bearer {other_raw}"})
    post(client, "messages", welcome(), **{"Idempotency-Key": "k"})
    response = post(other, "messages", welcome("bob@example.com"), **{"Idempotency-Key": "k"})
    assert response.status_code == 202 and "Idempotent-Replayed" not in response
    assert Message.objects.count() == 2


# --- Batches -------------------------------------------------------------------------------


def test_batch_accepts_valid_items_and_lists_each_error(client):
    items = [
        welcome("a@example.com"),
        welcome("not-an-address"),
        {"to": "b@example.com", "subject": "Hi", "html": "<p>Hi</p>"},
        {"to": "c@example.com", "template": "no-such-template"},
        {"template": "welcome"},
        welcome("d@example.com", send_at=(timezone.now() + timedelta(days=1)).isoformat()),
    ]
    response = post(client, "messages/batch", {"messages": items})

    assert response.status_code == 202
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (3, 3)
    results = body["results"]
    assert [r["index"] for r in results] == list(range(6))
    by_id = {f"msg_{m.uuid.hex}": m for m in Message.objects.all()}
    assert set(by_id) == {results[i]["id"] for i in (0, 2, 5)}
    assert [by_id[results[i]["id"]].to_email for i in (0, 2, 5)] == [
        "a@example.com",
        "b@example.com",
        "d@example.com",
    ]
    assert results[5]["status"] == "scheduled"
    assert results[1]["error"]["type"] == "urn:mailer:problem:invalid-recipient"
    assert results[3]["error"]["type"] == "urn:mailer:problem:template-not-found"
    assert results[4]["error"]["errors"] == [{"field": "to", "detail": "This field is required."}]


def test_batch_of_suppressed_address_is_accepted_as_suppressed(client):
    SuppressionFactory(email="gone@example.com", scope=Suppression.Scope.ALL)
    body = post(client, "messages/batch", {"messages": [welcome("gone@example.com")]}).json()
    assert body["results"][0]["status"] == "suppressed"


def test_batch_over_the_maximum_answers_422_and_stores_nothing(client, settings):
    settings.MAILER = {**settings.MAILER, "API_BATCH_MAX": 3}
    response = post(client, "messages/batch", {"messages": [welcome()] * 4})
    assert_problem(response, 422, "validation-error")
    assert not Message.objects.exists()


def test_batch_replays_with_its_idempotency_key(client):
    batch = {"messages": [welcome("a@example.com"), welcome("b@example.com")]}
    first = post(client, "messages/batch", batch, **{"Idempotency-Key": "b1"})
    again = post(client, "messages/batch", batch, **{"Idempotency-Key": "b1"})
    assert again.json() == first.json() and again["Idempotent-Replayed"] == "true"
    assert Message.objects.count() == 2


# --- Reading -------------------------------------------------------------------------------


def test_message_detail_shows_status_attempts_timestamps_and_events(client):
    sent = json.loads(post(client, "messages", welcome()).content)
    message = Message.objects.get()
    Event.objects.create(message=message, event_type="delivered", recipient=message.to_email)

    response = client.get(f"/api/v1/messages/{sent['id']}")

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == sent["id"] and body["status"] == "queued" and body["attempts"] == 0
    assert body["to"] == "ada@example.com" and body["queued_at"]
    assert [e["type"] for e in body["events"]] == ["delivered"]


@pytest.mark.parametrize("wrong", ["msg_" + "0" * 32, "12", "msg_nothex"])
def test_unknown_message_answers_404(client, wrong):
    assert_problem(client.get(f"/api/v1/messages/{wrong}"), 404, "not-found")


def test_list_filters_and_pages_with_a_cursor(client):
    for i in range(5):
        MessageFactory(to_email=f"u{i}@example.com", status=MessageStatus.SENT)
    MessageFactory(to_email="failed@example.com", status=MessageStatus.FAILED)

    first = client.get("/api/v1/messages", {"status": "sent", "limit": 2}).json()
    second = client.get(
        "/api/v1/messages", {"status": "sent", "limit": 2, "cursor": first["next_cursor"]}
    ).json()
    third = client.get(
        "/api/v1/messages", {"status": "sent", "limit": 2, "cursor": second["next_cursor"]}
    ).json()

    pages = [first, second, third]
    addresses = [m["to"] for page in pages for m in page["results"]]
    assert addresses == [f"u{i}@example.com" for i in (4, 3, 2, 1, 0)]
    assert third["next_cursor"] is None
    only = client.get("/api/v1/messages", {"to": "FAILED@example.com"}).json()["results"]
    assert [m["status"] for m in only] == ["failed"]


def test_list_refuses_a_forged_cursor_and_bad_limit(client):
    response = client.get("/api/v1/messages", {"cursor": "xyz", "limit": 0})
    problem = assert_problem(response, 422, "validation-error")
    assert {e["field"] for e in problem["errors"]} == {"cursor", "limit"}


# --- Suppressions --------------------------------------------------------------------------


def test_suppress_and_lift_an_opt_out(client):
    path = "/api/v1/contacts/Ada@Example.com/suppressions"
    created = client.post(path, {"scope": "marketing"}, content_type="application/json")
    again = client.post(path, {"scope": "marketing"}, content_type="application/json")

    assert created.status_code == 201 and again.status_code == 200
    assert created.json() == {"email": "ada@example.com", "scope": "marketing", "created": True}
    assert Suppression.objects.filter(email="ada@example.com", scope="marketing").exists()

    lifted = client.delete(path)
    assert lifted.status_code == 200 and lifted.json()["removed"] == 1
    assert not Suppression.objects.exists()


def test_lifting_leaves_a_hard_bounce_in_place(client):
    SuppressionFactory(email="ada@example.com", reason=Suppression.Reason.HARD_BOUNCE)
    response = client.delete("/api/v1/contacts/ada@example.com/suppressions")
    assert response.json()["removed"] == 0 and Suppression.objects.count() == 1


def test_suppressing_an_invalid_address_answers_422(client):
    response = client.post(
        "/api/v1/contacts/nobody/suppressions", {}, content_type="application/json"
    )
    assert_problem(response, 422, "invalid-recipient")


# --- The OpenAPI document ------------------------------------------------------------------


@pytest.fixture
def openapi(redis_store) -> dict:
    response = Client().get("/api/v1/openapi.json")
    assert response.status_code == 200
    return response.json()


def check_against_openapi(document: dict, response, path: str, method: str) -> None:
    """The response's body matches what the document says this status returns."""
    operation = document["paths"][path][method]
    content = operation["responses"][str(response.status_code)]["content"]
    media = response["Content-Type"].split(";")[0]
    assert media in content, f"{response.status_code} {media} not documented for {method} {path}"
    registry = Registry().with_resource(
        "urn:openapi", Resource.from_contents(document, default_specification=DRAFT202012)
    )
    schema = {"$ref": "urn:openapi#" + _pointer(content[media]["schema"])}
    if "$ref" not in content[media]["schema"]:
        schema = content[media]["schema"]
    jsonschema.Draft202012Validator(schema, registry=registry).validate(response.json())


def _pointer(schema: dict) -> str:
    return schema["$ref"].removeprefix("#")


def test_openapi_document_describes_every_answer(client, openapi):
    item = welcome()
    answers = [
        ("/api/v1/messages", "post", post(client, "messages", item)),
        ("/api/v1/messages", "post", post(client, "messages", "{")),
        ("/api/v1/messages", "post", post(client, "messages", welcome(to="x"))),
        ("/api/v1/messages", "post", post(Client(), "messages", item)),
        (
            "/api/v1/messages/batch",
            "post",
            post(client, "messages/batch", {"messages": [item, {}]}),
        ),
        ("/api/v1/messages", "get", client.get("/api/v1/messages")),
    ]
    message_id = answers[0][2].json()["id"]
    answers += [
        ("/api/v1/messages/{message_id}", "get", client.get(f"/api/v1/messages/{message_id}")),
        ("/api/v1/messages/{message_id}", "get", client.get("/api/v1/messages/msg_x")),
        (
            "/api/v1/contacts/{email}/suppressions",
            "post",
            client.post(
                "/api/v1/contacts/a@example.com/suppressions", {}, content_type="application/json"
            ),
        ),
        (
            "/api/v1/contacts/{email}/suppressions",
            "delete",
            client.delete("/api/v1/contacts/a@example.com/suppressions"),
        ),
    ]
    ApiKey.objects.update(rate_limit="1/m")
    answers.append(("/api/v1/messages", "get", client.get("/api/v1/messages")))
    statuses = [response.status_code for _, _, response in answers]
    assert statuses == [202, 400, 422, 401, 202, 200, 200, 404, 201, 200, 429]
    for path, method, response in answers:
        check_against_openapi(openapi, response, path, method)


def test_openapi_request_schema_accepts_what_the_api_accepts(openapi):
    registry = Registry().with_resource(
        "urn:openapi", Resource.from_contents(openapi, default_specification=DRAFT202012)
    )
    operation = openapi["paths"]["/api/v1/messages"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator(
        {"$ref": "urn:openapi#" + _pointer(schema)}, registry=registry
    )
    validator.validate(welcome(send_at=timezone.now().isoformat(), metadata={"a": 1}))
    validator.validate({"to": "a@example.com", "subject": "Hi", "html": "<p>Hi</p>"})
    assert not validator.is_valid({"template": "welcome"})  # "to" is required


# --- Creating keys -----------------------------------------------------------------------


def test_admin_creates_a_key_shown_once_that_then_works(admin_client, redis_store):
    response = admin_client.post(
        "/admin/mailer/apikey/add/",
        {"name": "billing", "scopes": ["send"], "rate_limit": "", "expires_at": ""},
        follow=True,
    )
    shown = [str(m) for m in response.context["messages"]]
    row = ApiKey.objects.get()
    assert row.scopes == ["send"] and row.created_by is not None
    key = next(text.split(" is ")[1].split(" ")[0] for text in shown if row.prefix in text)
    assert key.startswith(f"{row.prefix}.") and key not in row.hashed_key

    sender = Client(headers={"Authorization": f"Bearer {key}"})
    assert post(sender, "messages", welcome()).status_code == 202
    page = admin_client.get(f"/admin/mailer/apikey/{row.pk}/change/").content.decode()
    assert key not in page and row.prefix in page


def test_command_creates_a_key_prints_it_once_and_revokes_it(redis_store):
    out = StringIO()
    call_command(
        "mailer_api_key", "create", "cron", "--scope", "read", stdout=out, stderr=StringIO()
    )
    key = out.getvalue().strip()
    reader = Client(headers={"Authorization": f"Bearer {key}"})
    assert reader.get("/api/v1/messages").status_code == 200

    call_command("mailer_api_key", "revoke", key.split(".")[0], stdout=StringIO())
    assert_problem(reader.get("/api/v1/messages"), 401, "revoked-api-key")
