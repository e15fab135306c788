"""The HTTP API's views: thin edges that check the request and call ``mailer.api``."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Callable

from django.db import transaction
from django.http import Http404
from django.utils.dateparse import parse_datetime
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.exceptions import ValidationError
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import api, conf
from ..contacts import clean_address
from ..exceptions import MailerError
from ..models import Message, MessageStatus, Suppression
from . import auth, idempotency, problems, serializers, validate
from .problems import Problem

PUBLIC_PREFIX = "msg_"


def public_id(message: Message) -> str:
    """The id the API shows: never the database id."""
    return f"{PUBLIC_PREFIX}{message.uuid.hex}"


def _problem_responses(*codes: int) -> dict:
    described = {
        400: "Malformed JSON or header",
        401: "Missing, invalid, revoked or expired API key",
        403: "The key lacks the scope",
        404: "Not found",
        409: "A request with this Idempotency-Key is in flight",
        413: "Request body too large",
        422: "Invalid fields, or an Idempotency-Key reused for another request",
        429: "Rate limit of the key used up",
    }
    return {
        (code, problems.CONTENT_TYPE): OpenApiResponse(
            serializers.ProblemDocument, description=described[code]
        )
        for code in codes
    }


IDEMPOTENCY_HEADER = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="Replays the first answer to a retry of the same request.",
)


class ApiView(APIView):
    """Key authentication, scopes, the per-key rate limit, problem documents."""

    authentication_classes = [auth.KeyAuthentication]
    permission_classes = [auth.HasScope]
    parser_classes = [JSONParser]
    renderer_classes = [JSONRenderer]
    throttle_classes: list = []
    schema = AutoSchema()
    scopes: dict[str, str] = {}

    def get_exception_handler(self) -> Callable:
        return problems.handler

    def initial(self, request, *args, **kwargs) -> None:
        length = request.META.get("CONTENT_LENGTH") or 0
        try:
            too_big = int(length) > int(conf.get("API_MAX_BODY_BYTES"))
        except ValueError:
            too_big = False
        if too_big:
            raise Problem(
                413,
                "payload-too-large",
                "Request body too large",
                f"The API reads at most {conf.get('API_MAX_BODY_BYTES')} bytes.",
            )
        super().initial(request, *args, **kwargs)
        request.rate_window = auth.rate_limit(request.auth)

    def finalize_response(self, request, response, *args, **kwargs):
        window = getattr(request, "rate_window", None)
        if window is not None:
            for name, value in auth.headers(window).items():
                response.headers.setdefault(name, value)
        return super().finalize_response(request, response, *args, **kwargs)

    def idempotent(self, request, handle: Callable[[], tuple[int, dict]]) -> Response:
        """Run ``handle``, once per Idempotency-Key when one is given (then in one
        transaction with the stored answer). Without a key, ``handle`` stores what it
        stores in one statement: no transaction, two round trips fewer."""
        key = request.headers.get("Idempotency-Key")
        if key is None:
            status, body = handle()
            return Response(body, status=status)
        raw = request._request.body  # before parsing: the fingerprint is of the bytes sent
        begun = idempotency.begin(
            request.auth, key, idempotency.fingerprint(request.method, request.path, raw)
        )
        if isinstance(begun, idempotency.Replay):
            response = Response(
                begun.body, status=begun.status, headers={"Idempotent-Replayed": "true"}
            )
            if begun.status >= 400:
                response.content_type = problems.CONTENT_TYPE
            return response
        try:
            with transaction.atomic():
                status, body = handle()
                idempotency.finish(begun, status, body)
        except BaseException:
            idempotency.abandon(begun)
            raise
        return Response(body, status=status)


def _send_one(fields: dict) -> Message:
    if "template" in fields:
        return api.send(fields.pop("template"), **fields)
    return api.send_rendered(**fields)


class MessagesView(ApiView):
    """Send one email (scope ``send``); list messages (scope ``read``)."""

    scopes = {"POST": "send", "GET": "read"}

    @extend_schema(
        operation_id="send_message",
        summary="Send one transactional email",
        request=serializers.MessageRequest,
        parameters=[IDEMPOTENCY_HEADER],
        responses={
            202: serializers.Accepted,
            **_problem_responses(400, 401, 403, 409, 413, 422, 429),
        },
    )
    def post(self, request) -> Response:
        def handle() -> tuple[int, dict]:
            message = _send_one(validate.message(request.data))
            return 202, {"id": public_id(message), "status": message.status}

        return self.idempotent(request, handle)

    @extend_schema(
        operation_id="list_messages",
        summary="Messages, newest first, a page at a time",
        parameters=[
            OpenApiParameter("status", OpenApiTypes.STR, enum=MessageStatus.values),
            OpenApiParameter("kind", OpenApiTypes.STR),
            OpenApiParameter("to", OpenApiTypes.STR),
            OpenApiParameter("template", OpenApiTypes.STR),
            OpenApiParameter("created_after", OpenApiTypes.DATETIME),
            OpenApiParameter("created_before", OpenApiTypes.DATETIME),
            OpenApiParameter("limit", OpenApiTypes.INT, description="1 to 200 (50)."),
            OpenApiParameter("cursor", OpenApiTypes.STR, description="next_cursor of a page."),
        ],
        responses={200: serializers.MessagePage, **_problem_responses(401, 403, 422, 429)},
    )
    def get(self, request) -> Response:
        query, errors = Message.objects.order_by("-id"), {}
        params = request.query_params
        for name, lookup in (("status", "status"), ("kind", "kind"), ("template", "template_slug")):
            if name in params:
                query = query.filter(**{lookup: params[name]})
        if "to" in params:
            try:
                query = query.filter(to_email=clean_address(params["to"]))
            except MailerError as exc:
                errors["to"] = [str(exc)]
        for name, lookup in (("created_after", "gte"), ("created_before", "lt")):
            if name in params:
                moment = parse_datetime(params[name])
                if moment is None:
                    errors[name] = ["Must be an ISO 8601 date and time."]
                else:
                    query = query.filter(**{f"created_at__{lookup}": moment})
        limit = params.get("limit", "50")
        if not limit.isdigit() or not 1 <= int(limit) <= 200:
            errors["limit"] = ["Must be a whole number from 1 to 200."]
        if "cursor" in params:
            after = _read_cursor(params["cursor"])
            if after is None:
                errors["cursor"] = ["Not a cursor this API gave."]
            else:
                query = query.filter(id__lt=after)
        if errors:
            raise ValidationError(errors)
        rows = list(query.only(*_SUMMARY_FIELDS)[: int(limit) + 1])
        more = len(rows) > int(limit)
        rows = rows[: int(limit)]
        return Response(
            {
                "results": [_summary(m) for m in rows],
                "next_cursor": _cursor(rows[-1].pk) if more else None,
            }
        )


class BatchView(ApiView):
    """Send many emails at once (scope ``send``)."""

    scopes = {"POST": "send"}

    @extend_schema(
        operation_id="send_batch",
        summary="Send up to 500 transactional emails; each is accepted or refused alone",
        request=serializers.BatchRequest,
        parameters=[IDEMPOTENCY_HEADER],
        responses={
            202: serializers.BatchResult,
            **_problem_responses(400, 401, 403, 409, 413, 422, 429),
        },
    )
    def post(self, request) -> Response:
        return self.idempotent(request, lambda: _batch(request.data))


def _batch(data) -> tuple[int, dict]:
    items = data.get("messages") if isinstance(data, dict) else None
    most = int(conf.get("API_BATCH_MAX"))
    if not isinstance(items, list) or not items:
        raise ValidationError({"messages": ["A non-empty list of messages is required."]})
    if len(items) > most:
        raise ValidationError({"messages": [f"At most {most} messages in one batch."]})
    unknown = set(data) - {"messages"}
    if unknown:
        raise ValidationError({name: ["Unknown field."] for name in sorted(unknown)})
    results: list[dict] = [{"index": index} for index in range(len(items))]
    valid: list[tuple[int, dict]] = []
    for index, item in enumerate(items):
        try:
            valid.append((index, validate.message(item)))
        except ValidationError as exc:
            errors = problems.validation_errors(exc.detail)
            results[index]["error"] = problems.document(
                422, "validation-error", "Invalid fields", "", errors
            )
    outcomes = api.send_many([fields for _, fields in valid])
    for (index, _), outcome in zip(valid, outcomes, strict=True):
        if isinstance(outcome, MailerError):
            results[index]["error"] = problems.from_mailer_error(outcome)
        else:
            results[index].update(id=public_id(outcome), status=outcome.status)
    rejected = sum(1 for r in results if "error" in r)
    return 202, {"accepted": len(results) - rejected, "rejected": rejected, "results": results}


class MessageView(ApiView):
    """One message by its public id (scope ``read``)."""

    scopes = {"GET": "read"}

    @extend_schema(
        operation_id="get_message",
        summary="One message: status, attempts, timestamps and events",
        responses={200: serializers.MessageDetail, **_problem_responses(401, 403, 404, 429)},
    )
    def get(self, request, message_id: str) -> Response:
        message = _find(message_id)
        events = message.events.order_by("timestamp", "id")[:200]
        body = _summary(message) | {
            "metadata": message.metadata,
            "last_error": message.last_error,
            **{name: message.__dict__[name] for name in _FIRST_EVENT_FIELDS},
            "events": [
                {
                    "type": e.event_type,
                    "at": e.timestamp,
                    "description": e.description,
                    "bounce": e.bounce,
                }
                for e in events
            ],
        }
        return Response(body)


class SuppressionsView(ApiView):
    """Suppress an address, or lift its opt-outs (scope ``suppress``)."""

    scopes = {"POST": "suppress", "DELETE": "suppress"}

    @extend_schema(
        operation_id="suppress_contact",
        summary="Stop mailing an address (all mail, or marketing only)",
        request=serializers.SuppressionRequest,
        responses={
            201: serializers.SuppressionOut,
            200: serializers.SuppressionOut,
            **_problem_responses(400, 401, 403, 413, 422, 429),
        },
    )
    def post(self, request, email: str) -> Response:
        shape = serializers.SuppressionRequest(data=request.data)
        shape.is_valid(raise_exception=True)
        scope = shape.validated_data["scope"]
        created = api.suppress(
            email,
            marketing_only=scope == Suppression.Scope.MARKETING,
            note=shape.validated_data["note"],
            source=f"http api key {request.auth.prefix}",
        )
        body = {"email": clean_address(email), "scope": scope, "created": created}
        return Response(body, status=201 if created else 200)

    @extend_schema(
        operation_id="unsuppress_contact",
        summary="Lift an address's opt-outs (bounces and complaints stay)",
        parameters=[
            OpenApiParameter("scope", OpenApiTypes.STR, enum=Suppression.Scope.values),
        ],
        responses={200: serializers.Unsuppressed, **_problem_responses(401, 403, 422, 429)},
    )
    def delete(self, request, email: str) -> Response:
        scope = request.query_params.get("scope")
        if scope not in (None, *Suppression.Scope.values):
            raise ValidationError({"scope": [f"One of {', '.join(Suppression.Scope.values)}."]})
        marketing_only = None if scope is None else scope == Suppression.Scope.MARKETING
        removed = api.unsuppress(email, marketing_only=marketing_only)
        return Response({"email": clean_address(email), "removed": removed})


# --- Reading messages --------------------------------------------------------------------

_FIRST_EVENT_FIELDS = ("delivered_at", "opened_at", "clicked_at", "bounced_at", "complained_at")
_SUMMARY_FIELDS = (
    "id",
    "uuid",
    "kind",
    "status",
    "to_email",
    "template_slug",
    "language",
    "subject",
    "attempts",
    "created_at",
    "queued_at",
    "send_after",
    "sent_at",
)


def _summary(message: Message) -> dict:
    return {
        "id": public_id(message),
        "kind": message.kind,
        "status": message.status,
        "to": message.to_email,
        "template": message.template_slug,
        "language": message.language,
        "subject": message.subject,
        "attempts": message.attempts,
        "created_at": message.created_at,
        "queued_at": message.queued_at,
        "send_after": message.send_after,
        "sent_at": message.sent_at,
    }


def _find(message_id: str) -> Message:
    try:
        if not message_id.startswith(PUBLIC_PREFIX):
            raise ValueError(message_id)
        key = uuid.UUID(hex=message_id.removeprefix(PUBLIC_PREFIX))
        return Message.objects.get(uuid=key)
    except (ValueError, Message.DoesNotExist):
        raise Http404(f"No message {message_id!r}.") from None


def _cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"m{last_id}".encode()).decode().rstrip("=")


def _read_cursor(value: str) -> int | None:
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return int(text[1:]) if text[:1] == "m" and text[1:].isdigit() else None
