"""Idempotency-Key: the first answer to a request is kept and replayed to its retries.

The key is claimed by a committed row before the request runs, so a concurrent retry
sees it in flight (409); the answer is written in the same transaction as what the
request stored, so a replay never describes messages that were rolled back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from .. import conf
from ..models import ApiKey, IdempotencyRecord
from .problems import Problem

MAX_KEY_LENGTH = 255


@dataclass
class Replay:
    status: int
    body: dict


def fingerprint(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(b"\0".join([method.encode(), path.encode(), body])).hexdigest()


def begin(api_key: ApiKey, key: str, print_: str) -> IdempotencyRecord | Replay:
    """Claim ``key`` for this request, or the stored answer to replay.

    Raises a 409 problem while the first request is still in flight, and a 422 one when
    the key was used for a different request.
    """
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            f"The Idempotency-Key header must be 1 to {MAX_KEY_LENGTH} printable characters.",
        )
    now = timezone.now()
    record = IdempotencyRecord(api_key=api_key, key=key, fingerprint=print_, started_at=now)
    try:
        with transaction.atomic():
            record.save(force_insert=True)
        return record
    except IntegrityError:
        pass
    found = IdempotencyRecord.objects.get(api_key=api_key, key=key)
    ttl = timedelta(seconds=float(conf.get("IDEMPOTENCY_TTL")))
    stale = timedelta(seconds=float(conf.get("IDEMPOTENCY_IN_FLIGHT")))
    lapsed = found.started_at < now - ttl
    abandoned = found.status_code is None and found.started_at < now - stale
    if lapsed or abandoned:
        # Expired, or its first request died: this request takes the key over.
        taken = IdempotencyRecord.objects.filter(pk=found.pk, started_at=found.started_at).update(
            fingerprint=print_, status_code=None, response=None, started_at=now
        )
        if taken:
            found.fingerprint, found.status_code, found.response = print_, None, None
            found.started_at = now
            return found
        found.refresh_from_db()
    if found.fingerprint != print_:
        raise Problem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "This Idempotency-Key was used with a different request.",
        )
    if found.status_code is None:
        raise Problem(
            409,
            "idempotency-in-flight",
            "Request in progress",
            "A request with this Idempotency-Key is still being processed; retry later.",
            headers={"Retry-After": "1"},
        )
    return Replay(found.status_code, found.response)


def finish(record: IdempotencyRecord, status: int, body: dict) -> None:
    """Keep the answer (inside the request's transaction)."""
    IdempotencyRecord.objects.filter(pk=record.pk).update(status_code=status, response=body)


def abandon(record: IdempotencyRecord) -> None:
    """The request failed without an answer worth keeping: free the key for a retry."""
    IdempotencyRecord.objects.filter(pk=record.pk, status_code__isnull=True).delete()
