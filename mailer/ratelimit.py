"""Per-queue send rates shared by every worker process: a token bucket in Redis or the DB.

Celery's own ``rate_limit`` counts per worker process; this one is global. Callers
reserve tokens and are told how long to wait, so concurrent workers queue up fairly
instead of polling.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from django.db import transaction
from django.db.models import F

from . import conf
from .models import QuotaCounter, RateBucket

logger = logging.getLogger(__name__)

# Reserve ARGV[3] tokens; tokens may go negative, and the caller waits until its share
# has accrued. Time comes from Redis so workers on skewed clocks agree.
_RESERVE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate) - want
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 60)
if tokens >= 0 then return '0' end
return tostring(-tokens / rate)
"""

_clients: dict[str, redis.Redis] = {}
_scripts: dict[object, object] = {}
_lock = threading.Lock()


def redis_client() -> redis.Redis | None:
    """A shared client for MAILER['REDIS_URL'] (or a Redis broker); None without Redis."""
    url = conf.redis_url()
    if not url:
        return None
    with _lock:
        client = _clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            _clients[url] = client
        return client


def burst_for(rate: float) -> float:
    """One second's worth of tokens, at least one: short bursts, smooth averages."""
    return max(1.0, rate)


def reserve(queue: str, tokens: int = 1, *, rate: float | None = None) -> float:
    """Reserve tokens on a queue's bucket; return the seconds to wait before sending.

    ``rate``: the rate to hold to now (a throttled queue's), else the configured one.
    """
    rate = rate or conf.rate_limit(queue)
    if rate is None or tokens <= 0:
        return 0.0
    client = redis_client()
    if client is not None:
        return _reserve_redis(client, queue, rate, tokens)
    return _reserve_db(queue, rate, tokens)


def acquire(queue: str, tokens: int = 1) -> float:
    """Block until ``tokens`` sends are allowed on the queue; return the time waited."""
    wait = reserve(queue, tokens)
    if wait > 0:
        time.sleep(wait)
    return wait


def chunk_size(queue: str, batch: int) -> int:
    """How many sends to reserve at once: at most 100 ms of the rate, so bursts stay small."""
    rate = conf.rate_limit(queue)
    if rate is None:
        return batch
    return max(1, min(batch, int(rate * 0.1)))


def _reserve_redis(client: redis.Redis, queue: str, rate: float, tokens: int) -> float:
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(_RESERVE)
    key = f"mailer:ratelimit:{conf.queue_name(queue)}"
    return float(script(keys=[key], args=[rate, burst_for(rate), tokens]))


def _reserve_db(queue: str, rate: float, tokens: int) -> float:
    burst = burst_for(rate)
    name = conf.queue_name(queue)
    with transaction.atomic():
        bucket, _ = RateBucket.objects.select_for_update().get_or_create(
            name=name, defaults={"tokens": burst, "updated": time.time()}
        )
        now = time.time()
        level = min(burst, bucket.tokens + max(0.0, now - bucket.updated) * rate) - tokens
        RateBucket.objects.filter(pk=bucket.pk).update(tokens=level, updated=now)
    return 0.0 if level >= 0 else -level / rate


# --- Open connections to the backend, all processes together ---------------------------------

# Hold (or renew) a slot for ARGV[3] until ARGV[2] seconds from now, if fewer than ARGV[1]
# other live slots are held; slots of processes that died lapse on their own.
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[3])
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 60)
return 1
"""

#: A slot not renewed for this long is free again (its process died).
SLOT_SECONDS = 60.0

_local_slots: dict[str, set[str]] = {}


def take_connection_slot(holder: str) -> bool:
    """May ``holder`` (a lane) keep a connection to the backend open? Renews its slot.

    MAILER['MAX_OPEN_CONNECTIONS'] caps the connections every worker process together
    keeps open to the backend (a relay that allows 20 from us answers the 21st with
    421). Without a cap: always. Without Redis the cap holds per process. The Redis
    store being down answers no: the lane waits, the relay is never flooded.
    """
    cap = conf.max_open_connections()
    if cap is None:
        return True
    key = f"mailer:connections:{conf.backend_key()}"
    client = redis_client()
    if client is None:
        with _lock:
            held = _local_slots.setdefault(key, set())
            if holder in held or len(held) < cap:
                held.add(holder)
                return True
            return False
    script = _scripts.get(("slot", id(client)))
    if script is None:
        script = _scripts[("slot", id(client))] = client.register_script(_TAKE_SLOT)
    try:
        return bool(script(keys=[key], args=[cap, SLOT_SECONDS, holder]))
    except redis.RedisError as exc:
        logger.warning("mailer: connection slots unavailable (%s)", exc.__class__.__name__)
        return False


def release_connection_slot(holder: str) -> None:
    """The lane closed its connection: its slot is free for another."""
    if conf.max_open_connections() is None:
        return
    key = f"mailer:connections:{conf.backend_key()}"
    client = redis_client()
    if client is None:
        with _lock:
            _local_slots.get(key, set()).discard(holder)
        return
    try:
        client.zrem(key, holder)
    except redis.RedisError:
        pass  # it lapses after SLOT_SECONDS


# --- Requests per API key, all web processes together ---------------------------------------


@dataclass(frozen=True)
class Window:
    """One fixed window of a request limit, as the RateLimit-* headers tell it."""

    limit: int
    remaining: int
    reset: int  # seconds until the window ends
    allowed: bool


def hit(name: str, limit: int, period: int, *, now: float | None = None) -> Window:
    """Count one request against ``limit`` per ``period`` seconds under ``name``.

    A fixed window in Redis (INCR and EXPIRE in one round trip), or in the database
    without Redis. An unreachable Redis lets the request through (logged): refusing
    every send because the limiter is down would be the worse outage.
    """
    now = time.time() if now is None else now
    start = int(now // period) * period
    reset = max(1, int(start + period - now + 0.999))
    key = f"mailer:api:{name}:{start}"
    client = redis_client()
    if client is None:
        used = _hit_db(key, start + period, now)
    else:
        try:
            pipe = client.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, period + 1)
            used = int(pipe.execute()[0])
        except redis.RedisError as exc:
            logger.warning("mailer: API rate limit store unavailable (%s)", exc.__class__.__name__)
            return Window(limit, limit, reset, True)
    return Window(limit, max(0, limit - used), reset, used <= limit)


def _hit_db(key: str, ends: float, now: float) -> int:
    expires = datetime.fromtimestamp(ends, tz=UTC)
    with transaction.atomic():
        QuotaCounter.objects.get_or_create(key=key, defaults={"expires_at": expires})
        QuotaCounter.objects.filter(key=key).update(used=F("used") + 1)
        used = QuotaCounter.objects.get(key=key).used
        QuotaCounter.objects.filter(
            key__startswith="mailer:api:", expires_at__lt=datetime.fromtimestamp(now, tz=UTC)
        ).delete()
    return used
