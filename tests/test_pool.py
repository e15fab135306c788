"""A drain over a pool of connections (MAILER['CONNECTIONS']): the waiting overlaps, every
guarantee of a single connection holds per connection."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from django.core.mail.backends.locmem import EmailBackend as LocmemBackend
from django.db import connection

from mailer import campaigns, conf, delivery
from mailer.models import Campaign, Claim, Contact, Kind, Message, MessageStatus
from tests.factories import MessageFactory, everyone_segment, marketing_template

# The pool's database thread has a connection of its own: it sees committed rows only.
pytestmark = pytest.mark.django_db(transaction=True)


def pooled(settings, connections: int, **values) -> None:
    settings.MAILER = {
        **settings.MAILER,
        "CONNECTIONS": {"transactional": connections, "campaign": connections},
        **values,
    }


@pytest.fixture
def stop_cleared():
    yield
    delivery.clear_stop()


def test_a_pool_sends_each_message_once_over_several_connections_at_once(smtp, broker, settings):
    pooled(settings, 4, BATCH_SIZE=8)
    smtp.handler.delay = 0.05  # a distant server: the pool's lanes wait side by side
    messages = [MessageFactory(to_email=f"p{n}@example.com") for n in range(40)]

    assert delivery.drain(Kind.TRANSACTIONAL) == 40

    counts = Counter(r for m in smtp.messages for r in m.rcpt_tos)
    assert counts == Counter({m.to_email: 1 for m in messages})
    assert smtp.handler.most_in_flight == 4
    assert set(Message.objects.values_list("status", flat=True)) == {MessageStatus.SENT}
    assert Message.objects.filter(attempts=1).count() == 40
    assert not Claim.objects.exists()


@pytest.mark.integration  # PostgreSQL's pg_stat_activity
@pytest.mark.parametrize("kind", [Kind.TRANSACTIONAL, Kind.CAMPAIGN])
def test_a_pool_uses_one_database_connection_for_all_its_lanes(smtp, broker, settings, kind):
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.fail("needs PostgreSQL (pg_stat_activity)", pytrace=False)
    pooled(settings, 8, BATCH_SIZE=5)
    smtp.handler.delay = 0.02
    for n in range(40):
        MessageFactory(to_email=f"c{n}@example.com", kind=kind)
    seen, done = [], threading.Event()

    def watch():
        from django.db import connection as own

        with own.cursor() as cursor:
            while not done.wait(0.02):
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                )
                seen.append(cursor.fetchone()[0])
        own.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert delivery.drain(kind) == 40
    finally:
        done.set()
        watcher.join()

    # This test's, the watcher's, the pool's database thread and the lease renewer: never
    # one per lane.
    assert seen and max(seen) <= 4, seen


class LaneWatching(LocmemBackend):
    """Before each email, reads its claim as another process would."""

    seen: list[tuple[int, int | None, int | None, str]] = []
    lock = threading.Lock()
    on_send = None

    def send_messages(self, messages):
        for email in messages:
            message = Message.objects.get(uuid=email.extra_headers["X-Mailer-Message-Id"])
            hold = Claim.objects.get(token=message.claim_token)
            with LaneWatching.lock:
                LaneWatching.seen.append(
                    (message.pk, hold.sent_through, hold.tried_through, str(hold.token))
                )
                count = len(LaneWatching.seen)
            if LaneWatching.on_send:
                LaneWatching.on_send(count)
        # This thread's own database connection, opened by the reads above: closed here,
        # or it outlives the test and blocks the test database's teardown.
        connection.close()
        return super().send_messages(messages)


@pytest.fixture
def lane_watching(settings, stop_cleared):
    settings.EMAIL_BACKEND = "tests.test_pool.LaneWatching"
    LaneWatching.seen, LaneWatching.on_send = [], None
    yield LaneWatching
    LaneWatching.on_send = None


@pytest.mark.integration  # reads rows from the lanes' threads (see below)
def test_each_lane_notes_its_email_on_its_own_claim_before_it_goes_out(
    broker, settings, lane_watching
):
    pooled(settings, 3, BATCH_SIZE=5)
    for n in range(30):
        MessageFactory(to_email=f"w{n}@example.com")

    assert delivery.drain(Kind.TRANSACTIONAL) == 30

    # Every email went out marked tried on its own lane's claim, the one before it in
    # that claim noted sent: a crash leaves at most one email in doubt per connection.
    by_claim: dict[str, list[tuple[int, int | None, int | None]]] = {}
    for pk, sent, tried, token in lane_watching.seen:
        by_claim.setdefault(token, []).append((pk, sent, tried))
    assert len(by_claim) >= 3
    for notes in by_claim.values():
        ids = [pk for pk, _, _ in notes]
        assert [(sent, tried) for _, sent, tried in notes] == list(
            zip([None, *ids[:-1]], ids, strict=True)
        )
    assert Message.objects.filter(status=MessageStatus.SENT).count() == 30
    assert not Claim.objects.exists()


# The backend reads rows from the lanes' threads: SQLite's shared-cache test database
# refuses that ("table is locked"), which mailer itself never does.
@pytest.mark.integration
def test_a_stop_request_ends_every_lane_after_its_email_on_the_wire(
    broker, settings, lane_watching
):
    pooled(settings, 4, BATCH_SIZE=10)
    for n in range(60):
        MessageFactory(to_email=f"s{n}@example.com")
    lane_watching.on_send = lambda count: delivery.request_stop() if count == 10 else None

    sent = delivery.drain(Kind.TRANSACTIONAL)

    statuses = Counter(Message.objects.values_list("status", flat=True))
    assert 10 <= sent <= 10 + 3  # the lanes' emails already on the wire still go
    assert statuses == {MessageStatus.SENT: sent, MessageStatus.QUEUED: 60 - sent}
    assert Message.objects.filter(status=MessageStatus.QUEUED, attempts=0).count() == 60 - sent
    assert not Claim.objects.exists()


def test_a_pool_keeps_the_queue_rate_limit(smtp, broker, settings):
    pooled(settings, 8, RATE_LIMITS={"transactional": "20/s", "campaign": None})
    smtp.handler.delay = 0.01
    for n in range(50):
        MessageFactory(to_email=f"r{n}@example.com")

    assert delivery.drain(Kind.TRANSACTIONAL) == 50

    times = sorted(m.at for m in smtp.messages)
    # After the bucket's first burst, eight connections together keep to 20 a second.
    steady = times[20:]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    assert rate <= 20 * 1.1, f"{rate:.1f}/s"


def test_a_pool_inside_a_transaction_sends_on_one_connection(smtp, broker, settings):
    from django.db import transaction

    pooled(settings, 4)
    smtp.handler.delay = 0.02
    with transaction.atomic():
        for n in range(8):
            MessageFactory(to_email=f"t{n}@example.com")
        assert delivery.drain(Kind.TRANSACTIONAL) == 8

    assert smtp.handler.most_in_flight == 1


def test_campaign_mail_goes_through_the_pool_with_its_links(smtp, broker, settings):
    pooled(settings, 4, BATCH_SIZE=3, POSTAL_ADDRESS="1 Test Street, Testville")
    smtp.handler.delay = 0.02
    Contact.objects.bulk_create(
        Contact(email=f"m{n}@example.com", consent=Contact.Consent.GRANTED) for n in range(12)
    )
    html = (
        '<p>Hi</p><a href="https://example.com/sale">Sale</a> {{ postal_address }}'
        ' <a href="{{ unsubscribe_url }}">Unsubscribe</a>'
    )
    campaign = Campaign.objects.create(
        name="Pool", template=marketing_template("pool", "Sale", html)
    )
    campaign.segments.add(everyone_segment())
    campaigns.send_now(campaign)
    campaigns.launch(campaign.pk)

    assert delivery.drain(Kind.CAMPAIGN) == 12

    assert smtp.handler.most_in_flight > 1
    assert sorted(r for m in smtp.messages for r in m.rcpt_tos) == sorted(
        f"m{n}@example.com" for n in range(12)
    )
    for received in smtp.messages:
        parsed = received.parsed()
        assert parsed["List-Unsubscribe"]
        assert "/mailer/t/c/" in parsed.get_body(("html",)).get_content()


@pytest.mark.parametrize(("per_connection", "connections"), [(100, 1), (3, 3)])
def test_a_lane_keeps_its_connection_across_batches_up_to_a_number_of_emails(
    slow_smtp, broker, settings, per_connection, connections
):
    settings.MAILER = {
        **settings.MAILER,
        "BATCH_SIZE": 2,
        "MESSAGES_PER_CONNECTION": per_connection,
    }
    for n in range(7):
        MessageFactory(to_email=f"k{n}@example.com")

    assert delivery.drain(Kind.TRANSACTIONAL) == 7

    assert slow_smtp.connections == connections
    assert len(slow_smtp.messages) == 7


def test_the_lanes_notes_are_written_together(smtp, broker, settings, monkeypatch):
    # Lanes waiting for their notes at the same moment share one statement (and commit).
    from mailer import outbox

    pooled(settings, 8, BATCH_SIZE=5)
    smtp.handler.delay = 0.02
    for n in range(80):
        MessageFactory(to_email=f"g{n}@example.com")
    groups = []
    original = outbox.try_many

    def recording(notes):
        groups.append(len(notes))
        return original(notes)

    monkeypatch.setattr(outbox, "try_many", recording)

    assert delivery.drain(Kind.TRANSACTIONAL) == 80

    assert sum(groups) == 80
    assert max(groups) > 1 and len(groups) < 80
    assert Message.objects.filter(status=MessageStatus.SENT, attempts=1).count() == 80


def test_all_drains_together_keep_to_the_cap_on_open_connections(slow_smtp, broker, settings):
    # Two drains (as two worker processes would) of 4 connections each, a relay that
    # allows us 3: never more than 3 open at once, and every email goes out once.
    from django.db import connection

    pooled(settings, 4, BATCH_SIZE=4, MAX_OPEN_CONNECTIONS=3)
    slow_smtp.delay = 0.01
    for n in range(60):
        MessageFactory(to_email=f"cap{n}@example.com")
    sent = []

    def drain_in_thread():
        sent.append(delivery.drain(Kind.TRANSACTIONAL))
        connection.close()

    threads = [threading.Thread(target=drain_in_thread) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    while sum(sent) < 60:  # a drain that found every slot taken looks again later
        sent.append(delivery.drain(Kind.TRANSACTIONAL))
        assert len(sent) < 20, sent

    assert slow_smtp.max_concurrent <= 3
    assert sorted(r for m in slow_smtp.messages for r in m.rcpt_tos) == sorted(
        f"cap{n}@example.com" for n in range(60)
    )
    assert not broker.zcard("mailer:connections:" + conf.backend_key())  # all given back


def test_a_lapsed_slot_of_a_dead_process_is_free_again(broker, settings):
    from mailer import ratelimit

    settings.MAILER = {**settings.MAILER, "MAX_OPEN_CONNECTIONS": 1}
    assert ratelimit.take_connection_slot("dead-lane")
    assert not ratelimit.take_connection_slot("live-lane")
    assert ratelimit.take_connection_slot("dead-lane")  # its own slot: renewed
    broker.zadd("mailer:connections:" + conf.backend_key(), {"dead-lane": 0})  # lapsed

    assert ratelimit.take_connection_slot("live-lane")
