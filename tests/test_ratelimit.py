"""mailer.ratelimit: a global token bucket in Redis or, without Redis, in the database."""

from __future__ import annotations

import time

import pytest

from mailer import conf, ratelimit
from mailer.exceptions import MailerConfigurationError
from mailer.models import RateBucket

BURST = 10


@pytest.fixture
def ten_per_second(settings):
    settings.MAILER = {**settings.MAILER, "RATE_LIMITS": {"transactional": "10/s"}}


@pytest.fixture
def redis_bucket(ten_per_second, broker, settings):
    settings.MAILER = {**settings.MAILER, "REDIS_URL": None}
    assert ratelimit.redis_client() is not None  # the Redis broker carries the bucket


@pytest.fixture
def db_bucket(ten_per_second, db, settings):
    settings.MAILER = {**settings.MAILER, "REDIS_URL": None}
    settings.CELERY_BROKER_URL = "memory://"
    assert ratelimit.redis_client() is None


def assert_burst_then_rate(count: int = 60) -> None:
    """The first BURST reservations are free, then each waits its share of 1/10 s.

    A wait is measured from the moment of asking, so the time the reservations themselves
    took (``spent``) is added back to compare with the ideal schedule.
    """
    start = time.monotonic()
    waits, spent = [], []
    for _ in range(BURST + count):
        asked = time.monotonic()
        waits.append(ratelimit.reserve("transactional"))
        spent.append((asked + time.monotonic()) / 2 - start)

    assert waits[:BURST] == [0.0] * BURST
    assert 0 < waits[BURST] <= 0.1
    assert waits[BURST] + spent[BURST] == pytest.approx(0.1, abs=0.02)
    implied_rate = count / (waits[-1] + spent[-1])
    assert implied_rate == pytest.approx(10.0, rel=0.03)


def test_redis_bucket_allows_a_burst_of_ten_then_ten_per_second(redis_bucket):
    assert_burst_then_rate()


def test_database_bucket_allows_a_burst_of_ten_then_ten_per_second(db_bucket):
    assert_burst_then_rate()
    assert RateBucket.objects.get(name="transactional").tokens < 0


def test_reserving_several_tokens_at_once_waits_for_all_of_them(redis_bucket):
    assert ratelimit.reserve("transactional", BURST) == 0.0

    wait = ratelimit.reserve("transactional", 5)

    assert 0.45 < wait <= 0.5


def test_queue_without_rate_limit_never_waits(ten_per_second, broker):
    assert [ratelimit.reserve("campaign") for _ in range(100)] == [0.0] * 100


def test_chunk_size_is_at_most_a_tenth_of_a_second_of_the_rate(settings):
    settings.MAILER = {**settings.MAILER, "RATE_LIMITS": {"transactional": "500/s"}}

    assert ratelimit.chunk_size("transactional", 100) == 50
    assert ratelimit.chunk_size("transactional", 20) == 20
    assert ratelimit.chunk_size("campaign", 100) == 100


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("50/s", 50.0), ("600/m", 10.0), ("3600/h", 1.0), (" 2.5 / second ", 2.5), (None, None)],
)
def test_parse_rate_reads_per_second_minute_and_hour(text, per_second):
    assert conf.parse_rate(text) == per_second


@pytest.mark.parametrize("text", ["fast", "10", "10/d", "-5/s", "0/s"])
def test_parse_rate_refuses_what_it_cannot_read(text):
    with pytest.raises(MailerConfigurationError):
        conf.parse_rate(text)
