"""Suppressions: CSV import and export in the admin, formula-injection safe."""

from __future__ import annotations

import csv
import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from mailer import suppressions
from mailer.exceptions import ImportFileError
from mailer.models import Kind, Message, MessageStatus, Suppression

from .factories import MessageFactory

pytestmark = pytest.mark.django_db


def test_import_adds_good_rows_and_reports_every_bad_one_by_line():
    data = (
        b"Email,Scope,Reason,Note\n"
        b"a@example.com,all,hard_bounce,from old ESP\n"
        b"B@Example.com,marketing,unsubscribe,\n"
        b"not-an-address,all,manual,\n"
        b"c@example.com,everything,manual,\n"
        b"d@example.com,all,angry,\n"
        b"a@example.com,all,hard_bounce,dup\n"
    )

    report = suppressions.import_csv(data, source="import:test")

    assert (report.created, report.existing) == (2, 1)
    assert [line for line, _ in report.rejected] == [4, 5, 6]
    assert "not a valid email" in report.rejected[0][1]
    assert set(Suppression.objects.values_list("email", "scope")) == {
        ("a@example.com", "all"),
        ("b@example.com", "marketing"),
    }


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe\x00garbage", b"address,scope\nx@example.com,all\n", b""],
    ids=["not-utf8", "no-email-column", "empty"],
)
def test_unreadable_file_imports_nothing(data):
    with pytest.raises(ImportFileError):
        suppressions.import_csv(data, source="t")
    assert not Suppression.objects.exists()


def test_import_cancels_waiting_marketing_for_new_suppressions():
    waiting = MessageFactory(kind=Kind.CAMPAIGN, to_email="a@example.com")
    suppressions.import_csv(b"email\na@example.com\n", source="t")
    assert Message.objects.get(pk=waiting.pk).status == MessageStatus.CANCELLED


def test_export_neutralizes_formulas():
    Suppression.objects.create(email="x@example.com", note='=HYPERLINK("http://evil","click")')
    Suppression.objects.create(email="y@example.com", note="+1 call me", source="@import")
    out = io.StringIO()

    suppressions.export_csv(Suppression.objects.order_by("email"), out)

    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0] == ["email", "scope", "reason", "source", "note", "created_at"]
    assert rows[1][4] == '\'=HYPERLINK("http://evil","click")'
    assert rows[2][3] == "'@import"
    assert rows[2][4] == "'+1 call me"


def test_admin_import_and_export(admin_client):
    upload = SimpleUploadedFile(
        "s.csv", b"email,reason\nz@example.com,manual\nbad,manual\n", "text/csv"
    )

    response = admin_client.post("/admin/mailer/suppression/import/", {"file": upload}, follow=True)

    assert response.status_code == 200
    messages = [str(m) for m in response.context["messages"]]
    assert any("1 suppressions added" in m for m in messages)
    assert any(m.startswith("Row 3:") for m in messages)
    assert Suppression.objects.get(email="z@example.com").source == "import:admin"

    export = admin_client.get("/admin/mailer/suppression/export/")
    assert export["Content-Type"].startswith("text/csv")
    assert b"z@example.com" in export.content


def test_admin_import_of_an_unreadable_file_shows_the_error(admin_client):
    upload = SimpleUploadedFile("s.csv", b"nope,nothing\n1,2\n", "text/csv")
    response = admin_client.post("/admin/mailer/suppression/import/", {"file": upload})
    assert response.status_code == 200
    assert b"email" in response.content and b"column" in response.content
    assert not Suppression.objects.exists()


def test_manual_suppression_in_the_admin_cancels_waiting_marketing(admin_client):
    waiting = MessageFactory(kind=Kind.CAMPAIGN, to_email="m@example.com")
    response = admin_client.post(
        "/admin/mailer/suppression/add/",
        {
            "email": "m@example.com",
            "scope": "all",
            "reason": "manual",
            "source": "",
            "note": "asked by phone",
            "created_at_0": "2026-01-01",
            "created_at_1": "00:00:00",
        },
    )
    assert response.status_code == 302
    suppression = Suppression.objects.get(email="m@example.com")
    assert suppression.source == "admin:admin" and suppression.note == "asked by phone"
    assert Message.objects.get(pk=waiting.pk).status == MessageStatus.CANCELLED
