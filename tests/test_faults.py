"""Real faults in the middle of real sends: kill -9 and SIGTERM of the Procfile's workers,
Redis down for ten seconds, a PostgreSQL restart, cancels racing two draining processes.

Counted at the SMTP server by recipient: lost = expected recipients never received,
duplicated = sum of (count - 1) over recipients received more than once. Each test
records its figures (``fault_figures``): printed with ``-s`` and listed in the terminal
summary under "fault figures", pass or fail.

They restart the services they run on, so tests/services.sh must have started them:

    bash tests/services.sh run -- .venv/bin/pytest -m faults -s
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pytest
from django.db import connection, transaction
from django.db.models import Count, QuerySet

from mailer import api, campaigns
from mailer.models import (
    Campaign,
    CampaignStatus,
    Contact,
    Event,
    Kind,
    Message,
    MessageStatus,
)

from .conftest import ProcfileProcess, tally, wait_for
from .factories import everyone_segment, marketing_template

pytestmark = [
    pytest.mark.integration,
    pytest.mark.faults,
    pytest.mark.django_db(transaction=True),
]

KINDS = ["campaign", "transactional"]  # the queues, as the Procfile names their workers
POSTAL_ADDRESS = "1 Fault Lane, Testville"
RECIPIENTS = {"campaign": 2_000, "transactional": 1_500}
RATE = "150/s"  # per queue, across every worker process
FAULT_AFTER = 400  # emails received before the fault strikes
RECOVERY_SECONDS = 90  # from the fault until every recipient has the email
EXIT_SECONDS = 10  # from SIGTERM until the worker and its pool are gone
EXIT_WAIT = 45  # how long to wait for a slower exit, to measure it
REDIS_DOWN_SECONDS = 10
QUIET_SECONDS = 3  # no email for this long: late duplicates had their chance
# The claim a live worker renews; a dead worker's claims are recovered after it. Beat's
# recovery runs every 15 s per queue, so a dead worker's claims are back within 45 s.
SENDING_LEASE = "30"
CANCEL_ROUNDS = 10
CANCEL_CONTACTS = 1_500
CANCEL_AFTER = 150  # emails of the round received before cancel(): both processes busy
PENDING = (MessageStatus.QUEUED, MessageStatus.SCHEDULED, MessageStatus.SENDING)
MARKETING_HTML = (
    "<html><body><p>Hi {{ contact.email }}, everything must go.</p>"
    '<p><a href="{{ site_url }}/shop">Shop</a></p>'
    '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a> · {{ postal_address }}</p>'
    "</body></html>"
)


# --- What is sent ---------------------------------------------------------------------------


@dataclass
class Mail:
    """The emails under test: who must get one, and their Message rows."""

    kind: str
    expected: set[str]
    rows: Callable[[], QuerySet]

    def statuses(self) -> Counter:
        counts = self.rows().values_list("status").annotate(n=Count("id")).order_by()
        return Counter(dict(counts))


@pytest.fixture
def marketing(settings):
    """This process may launch campaigns (a postal address); one segment of everyone and
    a marketing template."""
    settings.MAILER = {**settings.MAILER, "POSTAL_ADDRESS": POSTAL_ADDRESS}
    return everyone_segment(), marketing_template("clearance", "Clearance sale", MARKETING_HTML)


def _contacts(count: int) -> set[str]:
    """``count`` contacts who granted marketing consent; their addresses."""
    addresses = [f"c{i:05d}@example.com" for i in range(count)]
    Contact.objects.bulk_create(
        [Contact(email=a, consent=Contact.Consent.GRANTED) for a in addresses], batch_size=1_000
    )
    return set(addresses)


def _launch_campaign(marketing, expected: set[str], name: str) -> tuple[Campaign, Mail]:
    segment, template = marketing
    campaign = Campaign.objects.create(name=name, template=template)
    campaign.segments.add(segment)
    campaigns.send_now(campaign)
    return campaign, Mail("campaign", expected, lambda: Message.objects.filter(campaign=campaign))


def _queue_transactional(count: int) -> Mail:
    addresses = [f"t{i:05d}@example.com" for i in range(count)]
    with transaction.atomic():  # one commit: the worker wakes to all of them
        for address in addresses:
            api.send("welcome", to=address, context={"user_name": "X"})
    return Mail(
        "transactional",
        set(addresses),
        lambda: Message.objects.filter(kind=Kind.TRANSACTIONAL),
    )


@pytest.fixture
def start_mail(marketing):
    """Start sending ``kind`` mail to its recipients; return what is expected."""

    def start(kind: str) -> Mail:
        if kind == "campaign":
            return _launch_campaign(marketing, _contacts(RECIPIENTS[kind]), "Clearance")[1]
        return _queue_transactional(RECIPIENTS[kind])

    return start


# --- The Procfile's processes -----------------------------------------------------------------


class Stack:
    """Both Procfile workers and beat, rate-limited, as production runs them."""

    def __init__(self, procfile, **env: str):
        self.procfile = procfile
        self.env = {
            "WORKER_CONCURRENCY": "2",
            "MAILER_POSTAL_ADDRESS": POSTAL_ADDRESS,
            "MAILER_RATE_LIMIT_CAMPAIGN": RATE,
            "MAILER_RATE_LIMIT_TRANSACTIONAL": RATE,
            "MAILER_SENDING_LEASE": SENDING_LEASE,
            **env,
        }
        self.workers: dict[str, ProcfileProcess] = {}

    def start(self) -> Stack:
        self.workers = {kind: self.procfile.process(f"worker_{kind}", **self.env) for kind in KINDS}
        self.procfile.start(*self.workers.values(), self.procfile.process("beat", **self.env))
        return self

    def replace(self, kind: str) -> ProcfileProcess:
        """A new worker for ``kind``'s queue, as a supervisor starts one after a crash."""
        self.workers[kind] = self.procfile.worker(kind, **self.env)
        return self.workers[kind]


@pytest.fixture
def stack(broker, smtp, procfile) -> Stack:
    return Stack(procfile).start()


POOL = 8  # connections per worker process in the pooled stack
POOL_REPLY_DELAY = 0.02  # a distant server: each process has several emails on the wire


@pytest.fixture
def pooled_stack(broker, smtp, procfile) -> Stack:
    smtp.handler.delay = POOL_REPLY_DELAY
    connections = {f"MAILER_{kind.upper()}_CONNECTIONS": str(POOL) for kind in KINDS}
    return Stack(procfile, **connections).start()


# --- Measuring --------------------------------------------------------------------------------


@dataclass
class Outcome:
    lost: int
    duplicated: int
    unexpected: int
    failed: int
    left_sending: int
    seconds_to_all_delivered: float | None  # from the fault; None: not within the bound
    statuses: dict[str, int]


def _poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    """Like wait_for, but answers False at the timeout: the test records figures first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _wait_mid_send(smtp, worker: ProcfileProcess, count: int = FAULT_AFTER) -> None:
    wait_for(
        lambda: len(smtp.messages) >= count,
        timeout=60,
        message=lambda: f"only {len(smtp.messages)} emails arrived:\n{worker.log()}",
    )


def _settle(smtp, mail: Mail, until: float) -> None:
    """Wait until nothing is left sending and no email came for QUIET_SECONDS (so a late
    duplicate had its chance), or until ``until``."""
    seen = [len(smtp.messages), time.monotonic()]

    def settled() -> bool:
        now, count = time.monotonic(), len(smtp.messages)
        if count != seen[0]:
            seen[:] = [count, now]
        return now - seen[1] >= QUIET_SECONDS and not mail.statuses()[MessageStatus.SENDING]

    _poll(settled, max(0.0, until - time.monotonic()))


def _outcome(smtp, mail: Mail, fault_at: float, bound: float = RECOVERY_SECONDS) -> Outcome:
    """Wait (bounded) for every recipient, then for the rows to settle; count.

    The wait ends early when nothing is left to send (no row queued, scheduled or sending)
    yet some recipient has nothing: a failed message stays failed.
    """

    def finished() -> bool:
        if tally(smtp, mail.expected).lost == 0:
            return True
        statuses = mail.statuses()
        return not any(statuses[status] for status in PENDING)

    _poll(finished, bound - (time.monotonic() - fault_at))
    delivered = tally(smtp, mail.expected).lost == 0
    seconds = round(time.monotonic() - fault_at, 1) if delivered else None
    _settle(smtp, mail, until=max(fault_at + bound, time.monotonic() + QUIET_SECONDS + 2))
    counted, statuses = tally(smtp, mail.expected), mail.statuses()
    return Outcome(
        lost=counted.lost,
        duplicated=counted.duplicated,
        unexpected=counted.unexpected,
        failed=statuses[MessageStatus.FAILED],
        left_sending=statuses[MessageStatus.SENDING],
        seconds_to_all_delivered=seconds,
        statuses=dict(statuses),
    )


def _record(figures: dict, mail: Mail, outcome: Outcome, **extra) -> None:
    figures.update(kind=mail.kind, expected=len(mail.expected), **asdict(outcome), **extra)


def _assert_delivered_once(outcome: Outcome, *, duplicates_allowed: int = 0) -> None:
    assert outcome.lost == 0, outcome
    assert outcome.duplicated <= duplicates_allowed, outcome
    assert outcome.unexpected == 0, outcome
    assert outcome.seconds_to_all_delivered is not None, outcome
    assert outcome.seconds_to_all_delivered <= RECOVERY_SECONDS, outcome
    assert outcome.failed == 0, outcome
    assert outcome.left_sending == 0, outcome


def _sigterm_finish_and_assert(stack: Stack, server, mail: Mail, figures: dict, fault: str):
    """SIGTERM to the campaign worker's group mid-send: it exits within EXIT_SECONDS, a
    new worker finishes, every recipient has the email once and nothing was recovered."""
    worker = stack.workers["campaign"]
    worker.terminate_group()
    fault_at = time.monotonic()
    exit_seconds = worker.wait_gone(EXIT_WAIT)
    if exit_seconds is None:
        worker.kill()
        worker.wait_gone(10)
    stack.replace("campaign")
    outcome = _outcome(server, mail, fault_at)
    shown = f"{exit_seconds:.1f}" if exit_seconds is not None else f">{EXIT_WAIT}"
    _record(figures, mail, outcome, fault=fault, exit_seconds=shown)

    assert exit_seconds is not None and exit_seconds <= EXIT_SECONDS, (
        f"the worker took {shown} s to exit:\n{worker.log(3000)}"
    )
    _assert_delivered_once(outcome)
    assert not Event.objects.filter(data__has_key="recovered").exists()


# --- Worker deaths ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_kill_9_of_a_sending_worker_loses_nothing_and_doubles_at_most_one_email_per_process(
    kind, stack, start_mail, smtp, fault_figures
):
    mail = start_mail(kind)
    worker = stack.workers[kind]
    _wait_mid_send(smtp, worker)

    worker.kill()  # SIGKILL to the main process and both pool processes
    fault_at = time.monotonic()
    gone = worker.wait_gone(10)
    stack.replace(kind)
    outcome = _outcome(smtp, mail, fault_at)
    # Each killed pool process may have had one email on the wire, unrecorded.
    allowed = worker.concurrency
    _record(fault_figures, mail, outcome, fault="kill -9 group", duplicates_allowed=allowed)

    assert gone is not None, "the killed worker's processes are still there"
    _assert_delivered_once(outcome, duplicates_allowed=allowed)


def test_kill_9_of_a_pooled_worker_doubles_at_most_one_email_per_connection(
    pooled_stack, start_mail, smtp, fault_figures
):
    mail = start_mail("campaign")
    worker = pooled_stack.workers["campaign"]
    _wait_mid_send(smtp, worker)

    worker.kill()
    fault_at = time.monotonic()
    gone = worker.wait_gone(10)
    pooled_stack.replace("campaign")
    outcome = _outcome(smtp, mail, fault_at)
    # Each connection of each killed pool process may have had one email on the wire.
    allowed = worker.concurrency * POOL
    _record(fault_figures, mail, outcome, fault="kill -9 pooled", duplicates_allowed=allowed)

    assert gone is not None, "the killed worker's processes are still there"
    _assert_delivered_once(outcome, duplicates_allowed=allowed)


def test_sigterm_stops_a_pooled_worker_within_10_s_without_loss_or_double(
    pooled_stack, start_mail, smtp, fault_figures
):
    mail = start_mail("campaign")
    _wait_mid_send(smtp, pooled_stack.workers["campaign"])

    _sigterm_finish_and_assert(pooled_stack, smtp, mail, fault_figures, "SIGTERM pooled")


# --- Through an ESP's batch endpoint ---------------------------------------------------------


class _EspCounted:
    """The fake Postmark API's accepted emails, as ``tally`` counts an SMTP server's."""

    def __init__(self, fake_esp):
        self.fake = fake_esp

    @property
    def messages(self) -> list:
        return [_Received([r]) for r in self.fake.recipients]


@dataclass
class _Received:
    rcpt_tos: list[str]


ESP_LATENCY = 0.05  # each call waits: several calls of several emails on the way at once


@pytest.fixture
def esp_stack(broker, fake_esp, procfile) -> Stack:
    fake_esp.latency = ESP_LATENCY
    connections = {f"MAILER_{kind.upper()}_CONNECTIONS": str(POOL) for kind in KINDS}
    return Stack(procfile, **fake_esp.worker_env(), **connections).start()


def test_kill_9_of_a_worker_sending_batch_calls_doubles_at_most_one_call_per_connection(
    esp_stack, start_mail, fake_esp, fault_figures
):
    esp = _EspCounted(fake_esp)
    mail = start_mail("campaign")
    worker = esp_stack.workers["campaign"]
    _wait_mid_send(esp, worker)

    worker.kill()
    fault_at = time.monotonic()
    gone = worker.wait_gone(10)
    esp_stack.replace("campaign")
    outcome = _outcome(esp, mail, fault_at)
    # Each connection of each killed pool process may have had one call on the way; a
    # call carries at most a lane's claim.
    biggest = max(len(call.messages) for call in fake_esp.calls)
    allowed = worker.concurrency * POOL * biggest
    _record(
        fault_figures,
        mail,
        outcome,
        fault="kill -9 ESP batch calls",
        duplicates_allowed=allowed,
        biggest_call=biggest,
    )

    assert gone is not None, "the killed worker's processes are still there"
    assert {call.path for call in fake_esp.calls} == {"/email/batch"}
    assert biggest > 1
    _assert_delivered_once(outcome, duplicates_allowed=allowed)


def test_sigterm_stops_a_worker_sending_batch_calls_within_10_s_without_loss_or_double(
    esp_stack, start_mail, fake_esp, fault_figures
):
    esp = _EspCounted(fake_esp)
    mail = start_mail("campaign")
    _wait_mid_send(esp, esp_stack.workers["campaign"])

    _sigterm_finish_and_assert(esp_stack, esp, mail, fault_figures, "SIGTERM ESP batch calls")


SIGTERMS = [
    pytest.param("campaign", "main", id="campaign-main-process"),
    pytest.param("campaign", "group", id="campaign-process-group"),
    pytest.param("transactional", "main", id="transactional-main-process"),
    pytest.param("transactional", "group", id="transactional-process-group"),
]


@pytest.mark.parametrize(("kind", "target"), SIGTERMS)
def test_sigterm_stops_the_worker_within_10_s_and_a_new_worker_finishes_without_loss_or_double(
    kind, target, stack, start_mail, smtp, fault_figures
):
    mail = start_mail(kind)
    worker = stack.workers[kind]
    _wait_mid_send(smtp, worker)

    # docker stop signals the main process; systemd and honcho signal the whole group.
    if target == "main":
        worker.terminate()
    else:
        worker.terminate_group()
    fault_at = time.monotonic()
    exit_seconds = worker.wait_gone(EXIT_WAIT)
    if exit_seconds is None:
        worker.kill()  # what docker or systemd do after their grace period
        worker.wait_gone(10)
    stack.replace(kind)
    outcome = _outcome(smtp, mail, fault_at)
    shown = f"{exit_seconds:.1f}" if exit_seconds is not None else f">{EXIT_WAIT}"
    _record(fault_figures, mail, outcome, fault=f"SIGTERM {target}", exit_seconds=shown)

    assert exit_seconds is not None and exit_seconds <= EXIT_SECONDS, (
        f"the worker took {shown} s to exit:\n{worker.log(3000)}"
    )
    _assert_delivered_once(outcome)
    # A warm shutdown hands its claims back itself: nothing waited for lease recovery.
    assert not Event.objects.filter(data__has_key="recovered").exists()


# --- Services down ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_redis_down_for_10_s_mid_send_loses_fails_and_doubles_nothing(
    kind, stack, start_mail, smtp, redis_server, fault_figures
):
    mail = start_mail(kind)
    _wait_mid_send(smtp, stack.workers[kind])

    redis_server.stop()  # broker, rate-limit bucket and kick flags all gone
    fault_at = time.monotonic()
    time.sleep(REDIS_DOWN_SECONDS)  # the outage itself
    redis_server.start()
    outcome = _outcome(smtp, mail, fault_at)
    _record(fault_figures, mail, outcome, fault=f"Redis down {REDIS_DOWN_SECONDS} s")

    _assert_delivered_once(outcome)


@pytest.mark.parametrize("kind", KINDS)
def test_postgres_restart_mid_send_loses_and_doubles_nothing_and_leaves_nothing_sending(
    kind, postgres_server, stack, start_mail, smtp, fault_figures
):
    mail = start_mail(kind)
    _wait_mid_send(smtp, stack.workers[kind])

    fault_at = time.monotonic()
    restart_seconds = postgres_server.restart()  # pg_ctl restart -m fast
    outcome = _outcome(smtp, mail, fault_at)
    _record(
        fault_figures,
        mail,
        outcome,
        fault="pg_ctl restart -m fast",
        restart_seconds=round(restart_seconds, 1),
    )

    _assert_delivered_once(outcome)


# --- Cancel racing the workers ----------------------------------------------------------------


def test_cancelling_while_two_processes_drain_never_deadlocks_and_sends_nothing_still_queued(
    postgres_server, broker, smtp, procfile, marketing, fault_figures
):
    expected = _contacts(CANCEL_CONTACTS)
    # Unthrottled: both pool processes claim and send as fast as they can.
    worker = procfile.worker(
        "campaign", WORKER_CONCURRENCY="2", MAILER_POSTAL_ADDRESS=POSTAL_ADDRESS
    )
    log_start = postgres_server.log_size()
    with connection.cursor() as cursor:  # a cancel stuck behind a lock fails, never hangs
        cursor.execute("SET statement_timeout = '30s'")
    rounds: list[dict] = []
    fault_figures.update(rounds=rounds)

    for number in range(1, CANCEL_ROUNDS + 1):
        smtp.reset()
        campaign, mail = _launch_campaign(marketing, expected, f"Round {number}")
        _wait_mid_send(smtp, worker, CANCEL_AFTER)

        cancelled = campaigns.cancel(campaign)
        # In this order: a message still sending now may go out; one counted as arrived
        # below was either sending now or already sent. Claims stop at the cancel.
        sending_at_cancel = mail.statuses()[MessageStatus.SENDING]
        arrived_at_cancel = len(smtp.messages)
        settle_from = time.monotonic()
        _settle(smtp, mail, until=settle_from + 30)

        campaign.refresh_from_db()
        statuses = mail.statuses()
        received = Counter(r.lower() for m in smtp.messages for r in m.rcpt_tos)
        never_to_go = set(
            mail.rows().filter(status=MessageStatus.CANCELLED).values_list("to_email", flat=True)
        )
        deadlocks = [
            line
            for line in postgres_server.log_since(log_start).splitlines()
            if "deadlock detected" in line
        ]
        outcome = {
            "round": number,
            "cancel_returned": cancelled,
            "sending_at_cancel": sending_at_cancel,
            "arrived_at_cancel": arrived_at_cancel,
            "arrived_after_cancel": len(smtp.messages) - arrived_at_cancel,
            "cancelled_yet_received": len(never_to_go & set(received)),
            "duplicated": sum(n - 1 for n in received.values() if n > 1),
            "campaign": campaign.status,
            "statuses": dict(statuses),
            "settle_seconds": round(time.monotonic() - settle_from, 1),
        }
        rounds.append(outcome)

        assert not deadlocks, "\n".join(deadlocks)
        assert campaign.status == CampaignStatus.CANCELLED, outcome
        assert not statuses[MessageStatus.SENDING], f"claims left sending: {outcome}"
        assert statuses[MessageStatus.CANCELLED] > 0, f"the cancel came too late: {outcome}"
        assert outcome["arrived_after_cancel"] <= sending_at_cancel, outcome
        assert outcome["cancelled_yet_received"] == 0, outcome
        assert outcome["duplicated"] == 0, outcome
    fault_figures.update(
        max_arrived_after_cancel=max(r["arrived_after_cancel"] for r in rounds),
        max_sending_at_cancel=max(r["sending_at_cancel"] for r in rounds),
    )
