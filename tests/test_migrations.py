"""Schema changes keep what an existing installation already recorded."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("mailer", "0007_variant_validation")]
AFTER = [("mailer", "0008_first_event_times_lean_indexes")]


def migrate(targets):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.fixture
def old_schema():
    apps = migrate(BEFORE)
    yield apps
    migrate(executor_leaf())


def executor_leaf():
    return MigrationExecutor(connection).loader.graph.leaf_nodes()


def test_first_event_times_are_filled_from_the_events_already_stored(old_schema):
    Message, Event = (
        old_schema.get_model("mailer", "Message"),
        old_schema.get_model("mailer", "Event"),
    )
    t0 = timezone.now().replace(microsecond=0) - timedelta(days=1)
    read = Message.objects.create(to_email="a@example.com", template_slug="news", status="clicked")
    scanned = Message.objects.create(to_email="b@example.com", template_slug="news", status="sent")
    quiet = Message.objects.create(to_email="c@example.com", template_slug="news", status="sent")
    for minutes, event_type, automated in [
        (5, "delivered", False),
        (30, "opened", False),
        (10, "opened", False),  # stored out of order: the earliest wins
        (12, "clicked", False),
        (1, "clicked", True),  # a scanner before the person: not the first click
    ]:
        Event.objects.create(
            message=read,
            event_type=event_type,
            recipient=read.to_email,
            timestamp=t0 + timedelta(minutes=minutes),
            automated=automated,
        )
    Event.objects.create(
        message=scanned, event_type="opened", recipient=scanned.to_email, automated=True
    )

    apps = migrate(AFTER)

    Message = apps.get_model("mailer", "Message")
    row = Message.objects.get(pk=read.pk)
    assert (row.delivered_at, row.opened_at, row.clicked_at) == (
        t0 + timedelta(minutes=5),
        t0 + timedelta(minutes=10),
        t0 + timedelta(minutes=12),
    )
    assert row.bounced_at is row.complained_at is None
    assert Message.objects.get(pk=scanned.pk).opened_at is None
    assert Message.objects.get(pk=quiet.pk).delivered_at is None
    assert Message.objects.count() == 3


def test_idempotency_keys_stay_unique_after_the_index_change():
    from django.db import IntegrityError, transaction

    from mailer.models import Message

    Message.objects.create(to_email="a@example.com", template_slug="x", idempotency_key="k1")
    with pytest.raises(IntegrityError), transaction.atomic():
        Message.objects.create(to_email="b@example.com", template_slug="x", idempotency_key="k1")
    Message.objects.create(to_email="c@example.com", template_slug="x")
    Message.objects.create(to_email="d@example.com", template_slug="x")  # NULL keys repeat
    assert Message.objects.count() == 3
