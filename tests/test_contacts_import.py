"""Contact CSV import and export: upserts, de-duplication, consent, all-or-nothing files."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.contrib.messages import get_messages
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from mailer import contacts
from mailer.exceptions import ImportFileError
from mailer.models import Contact, Tag

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def csv_bytes(*lines: str) -> io.BytesIO:
    return io.BytesIO(("\n".join(lines) + "\n").encode())


def run_import(
    *lines: str, source: str = "test import", batch_size: int = 2000, dry_run: bool = False
):
    return contacts.import_csv(
        csv_bytes(*lines), source=source, batch_size=batch_size, dry_run=dry_run
    )


def tags_of(email: str) -> list[str]:
    return sorted(Contact.objects.get(email=email).tags.values_list("name", flat=True))


# --- Import -----------------------------------------------------------------------------


def test_import_creates_contacts_with_their_fields():
    report = run_import(
        "Email,Name,Language,Timezone",
        "Ada@Example.com, Ada Lovelace ,en,Europe/London",
        "bob@example.com,Bob,fr,",
    )

    assert (report.rows, report.created, report.updated, report.rejected) == (2, 2, 0, [])
    ada = Contact.objects.get(email="ada@example.com")
    assert (ada.name, ada.language, ada.timezone) == ("Ada Lovelace", "en", "Europe/London")
    assert ada.consent == Contact.Consent.UNKNOWN
    assert ada.attributes == {}
    assert Contact.objects.get(email="bob@example.com").timezone == ""


def test_import_updates_existing_contacts_and_keeps_what_the_file_does_not_mention():
    Contact.objects.create(
        email="ada@example.com",
        name="Old Name",
        language="de",
        attributes={"plan": "pro", "city": "Paris"},
    )

    report = run_import("email,name,city,company", "ada@example.com,Ada,London,Analytical")

    assert (report.created, report.updated) == (0, 1)
    ada = Contact.objects.get(email="ada@example.com")
    assert ada.name == "Ada"
    assert ada.language == "de"
    assert ada.attributes == {"plan": "pro", "city": "London", "company": "Analytical"}
    assert Contact.objects.count() == 1


def test_the_same_address_in_any_case_is_one_contact_within_the_file():
    report = run_import(
        "email,name,tags,team",
        "Ada@X.com,First,vip,red",
        "ada@x.com,Second,beta,",
        "  ADA@x.COM  ,,,",
    )

    assert (report.rows, report.created, report.duplicates) == (3, 1, 2)
    (ada,) = Contact.objects.all()
    assert ada.email == "ada@x.com"
    assert ada.name == "Second"  # later rows override, empty cells do not erase
    assert ada.attributes == {"team": "red"}
    assert tags_of("ada@x.com") == ["beta", "vip"]


def test_the_same_address_in_any_case_updates_an_existing_contact():
    Contact.objects.create(email="ada@x.com", name="Ada")

    report = run_import("email,name", "ADA@X.COM,Ada L.")

    assert (report.created, report.updated) == (0, 1)
    assert Contact.objects.get().name == "Ada L."


def test_small_batches_give_the_same_result_as_one_batch():
    lines = ["email,name,score,tags"]
    lines += [f"person{i}@example.com,Person {i},{i},group{i % 2}" for i in range(10)]
    lines += ["PERSON1@example.com,Person One,100,late"]  # a later batch, same contact

    report = run_import(*lines, batch_size=3)

    assert report.rows == 11
    assert report.created == 10
    assert report.rejected == []
    assert Contact.objects.count() == 10
    one = Contact.objects.get(email="person1@example.com")
    assert (one.name, one.attributes) == ("Person One", {"score": "100"})
    assert tags_of("person1@example.com") == ["group1", "late"]
    assert Contact.objects.filter(tags__name="group0").count() == 5


def test_tags_are_created_once_and_linked():
    Tag.objects.create(name="vip")

    run_import(
        "email,tags",
        'ada@example.com,"VIP; beta ;"',
        "bob@example.com,beta",
        "cy@example.com,",
    )

    assert sorted(Tag.objects.values_list("name", flat=True)) == ["beta", "vip"]
    assert tags_of("ada@example.com") == ["beta", "vip"]
    assert tags_of("bob@example.com") == ["beta"]
    assert tags_of("cy@example.com") == []


def test_importing_tags_again_adds_no_duplicate_links():
    run_import("email,tags", "ada@example.com,vip")
    run_import("email,tags", "ada@example.com,vip;new")

    assert tags_of("ada@example.com") == ["new", "vip"]


@pytest.mark.parametrize(
    ("word", "consent"),
    [
        ("yes", Contact.Consent.GRANTED),
        ("Granted", Contact.Consent.GRANTED),
        ("opt-in", Contact.Consent.GRANTED),
        ("no", Contact.Consent.WITHDRAWN),
        ("WITHDRAWN", Contact.Consent.WITHDRAWN),
        ("opt-out", Contact.Consent.WITHDRAWN),
    ],
)
def test_consent_words_are_mapped_and_the_evidence_recorded(word, consent):
    before = timezone.now()

    run_import("email,consent", f"ada@example.com,{word}", source="signup sheet 2024")

    ada = Contact.objects.get()
    assert ada.consent == consent
    assert before <= ada.consent_at <= timezone.now()
    assert ada.consent_source == "signup sheet 2024"


def test_a_consent_source_column_wins_over_the_import_source():
    run_import(
        "email,consent,consent_source",
        "ada@example.com,yes,webinar form",
        "bob@example.com,yes,",
        source="import of list.csv",
    )

    sources = dict(Contact.objects.values_list("email", "consent_source"))
    assert sources == {"ada@example.com": "webinar form", "bob@example.com": "import of list.csv"}


def test_an_empty_consent_cell_leaves_consent_untouched():
    Contact.objects.create(
        email="ada@example.com", consent=Contact.Consent.GRANTED, consent_source="form"
    )

    run_import("email,consent,name", "ada@example.com,,Ada")

    ada = Contact.objects.get()
    assert (ada.consent, ada.consent_source, ada.consent_at) == (
        Contact.Consent.GRANTED,
        "form",
        None,
    )


def test_bad_rows_are_reported_by_line_and_skipped():
    report = run_import(
        "email,name,consent",
        "good@example.com,Good,yes",
        "not-an-address,Bad,yes",
        "maybe@example.com,Maybe,perhaps",
        "extra@example.com,Extra,yes,surprise",
        ",Nobody,yes",
        "fine@example.com,Fine,no",
    )

    assert report.rows == 6
    assert report.created == 2
    lines = [line for line, _ in report.rejected]
    assert lines == [3, 4, 5, 6]
    reasons = dict(report.rejected)
    assert "not a valid email address" in reasons[3]
    assert "consent 'perhaps' is not one of" in reasons[4]
    assert reasons[5] == "more fields than the header has columns"
    assert "non-empty email address" in reasons[6]
    assert sorted(Contact.objects.values_list("email", flat=True)) == [
        "fine@example.com",
        "good@example.com",
    ]


def test_a_file_that_stops_being_utf8_midway_imports_nothing():
    Contact.objects.create(email="person5@example.com", name="Untouched")
    good = b"email,name,tags\n" + b"".join(
        f"person{i}@example.com,Person {i},imported\n".encode() for i in range(3000)
    )
    stream = io.BytesIO(good + b"late@example.com,Caf\xe9 Owner,imported\n")

    with CaptureQueriesContext(connection) as queries:
        with pytest.raises(ImportFileError, match="not UTF-8"):
            contacts.import_csv(stream, source="broken file", batch_size=500)

    # Batches had been written before the bad byte was read; all of it was rolled back.
    assert any('INSERT INTO "mailer_contact"' in q["sql"] for q in queries.captured_queries)

    assert list(Contact.objects.values_list("email", "name")) == [
        ("person5@example.com", "Untouched")
    ]
    assert not Tag.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_failed_file_leaves_nothing_committed():
    good = b"email\n" + b"".join(f"p{i}@example.com\n".encode() for i in range(3000))

    with pytest.raises(ImportFileError):
        contacts.import_csv(io.BytesIO(good + b"\xff\xfe@example.com\n"), source="x", batch_size=3)

    assert Contact.objects.count() == 0


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "needs a header row with an 'email' column"),
        (b"name,phone\nAda,123\n", "needs a header row with an 'email' column"),
        (b"\n\n", "needs a header row with an 'email' column"),
        (b"\xff\xfeemail\n", "not UTF-8"),
    ],
)
def test_an_unreadable_file_raises_import_file_error(content, says):
    with pytest.raises(ImportFileError, match=says):
        contacts.import_csv(io.BytesIO(content), source="x")

    assert not Contact.objects.exists()


def test_a_utf8_bom_and_accents_are_read():
    stream = io.BytesIO("\ufeffemail,name\nzoe@example.com,Zoë Ångström\n".encode())

    contacts.import_csv(stream, source="excel")

    assert Contact.objects.get().name == "Zoë Ångström"


def test_import_leaves_the_callers_stream_open():
    stream = csv_bytes("email", "ada@example.com")

    contacts.import_csv(stream, source="x")

    assert not stream.closed


# --- Export -----------------------------------------------------------------------------


def test_export_rows_are_a_header_then_one_row_per_contact_with_tags_and_attributes():
    ada = Contact.objects.create(
        email="ada@example.com",
        name="Ada",
        consent=Contact.Consent.GRANTED,
        consent_at=timezone.now(),
        consent_source="form",
        attributes={"plan": "pro", "city": "Zürich"},
    )
    ada.tags.add(Tag.objects.create(name="vip"), Tag.objects.create(name="beta"))
    Contact.objects.create(email="bob@example.com")

    header, *rows = list(contacts.export_rows(Contact.objects.all()))

    assert header == list(contacts.EXPORT_COLUMNS)
    assert [row[0] for row in rows] == ["ada@example.com", "bob@example.com"]
    first = dict(zip(header, rows[0], strict=True))
    assert first["tags"] == "beta;vip"
    assert json.loads(first["attributes"]) == {"plan": "pro", "city": "Zürich"}
    assert (first["consent"], first["consent_source"]) == ("granted", "form")
    assert first["consent_at"] == ada.consent_at.isoformat()
    second = dict(zip(header, rows[1], strict=True))
    assert (second["tags"], second["attributes"], second["consent_at"]) == ("", "{}", "")


def test_export_neutralizes_formula_cells():
    Contact.objects.create(
        email="=evil@example.com",
        name="=cmd|' /C calc'!A0",
        timezone="+41",
        consent_source="@SUM(A1)",
    )

    header, row = list(contacts.export_rows(Contact.objects.all()))
    cells = dict(zip(header, row, strict=True))

    assert cells["name"] == "'=cmd|' /C calc'!A0"
    assert cells["email"] == "'=evil@example.com"
    assert cells["timezone"] == "'+41"
    assert cells["consent_source"] == "'@SUM(A1)"


def test_an_export_imports_back_to_the_same_contacts():
    ada = Contact.objects.create(email="ada@example.com", name="Ada", attributes={"k": "v"})
    ada.tags.add(Tag.objects.create(name="vip"))
    buffer = io.StringIO()
    csv.writer(buffer).writerows(contacts.export_rows(Contact.objects.all()))
    Contact.objects.all().delete()

    report = contacts.import_csv(io.BytesIO(buffer.getvalue().encode()), source="re-import")

    assert report.rejected == []
    ada = Contact.objects.get()
    assert ada.name == "Ada"
    assert tags_of("ada@example.com") == ["vip"]


# --- Management command -----------------------------------------------------------------


def test_command_imports_a_file_and_prints_the_summary(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text(
        "email,name,consent\nada@example.com,Ada,yes\nADA@example.com,Ada L.,yes\nnope,X,yes\n"
    )
    out, err = io.StringIO(), io.StringIO()

    call_command("mailer_import_contacts", str(path), "--batch-size", "2", stdout=out, stderr=err)

    assert "3 rows: 1 created, 0 updated, 1 duplicates merged, 1 rejected." in out.getvalue()
    assert "line 4: " in err.getvalue()
    ada = Contact.objects.get()
    assert (ada.name, ada.consent_source) == ("Ada L.", "import of list.csv")


def test_command_records_the_given_consent_source(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("email,consent\nada@example.com,granted\n")

    call_command(
        "mailer_import_contacts", str(path), "--source", "paper form", stdout=io.StringIO()
    )

    assert Contact.objects.get().consent_source == "paper form"


def test_command_refuses_an_unreadable_file_and_imports_nothing(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"email,name\nada@example.com,Ada\nbob@example.com,Andr\xe9\n")

    with pytest.raises(CommandError, match="Nothing imported: The file is not UTF-8"):
        call_command("mailer_import_contacts", str(path), stdout=io.StringIO())

    assert not Contact.objects.exists()


def test_command_refuses_a_missing_file(tmp_path):
    with pytest.raises(CommandError, match="is not a file"):
        call_command("mailer_import_contacts", str(tmp_path / "nope.csv"))


# --- Admin ------------------------------------------------------------------------------


def upload(content: bytes, name: str = "contacts.csv") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, content, content_type="text/csv")


def test_admin_import_page_shows_the_form(admin_client):
    response = admin_client.get("/admin/mailer/contact/import/")

    assert response.status_code == 200
    assert 'type="file"' in response.content.decode()


def test_admin_import_creates_contacts_and_lists_row_errors(admin_client):
    content = b"email,name,consent\nada@example.com,Ada,yes\nbroken,Bad,yes\nbob@x.com,B,huh\n"

    response = admin_client.post(
        "/admin/mailer/contact/import/", {"file": upload(content), "_import": "Import"}
    )

    assert response.status_code == 200  # the report, row by row
    notes = [str(m) for m in get_messages(response.wsgi_request)]
    assert notes == ["3 rows: 1 contacts created, 0 updated, 0 duplicates merged, 2 rejected."]
    page = response.content.decode()
    assert "What the import did" in page
    assert "<li>Row 3: " in page
    assert "<li>Row 4: consent &#x27;huh&#x27;" in page
    assert '<tr data-line="2" class="mailer-import-created">' in page
    ada = Contact.objects.get()
    assert ada.consent == Contact.Consent.GRANTED
    assert ada.consent_source == "admin import of contacts.csv by admin"


def test_admin_import_of_an_unreadable_file_shows_why_and_imports_nothing(admin_client):
    response = admin_client.post(
        "/admin/mailer/contact/import/", {"file": upload(b"name\nAda\n", "no-email.csv")}
    )

    assert response.status_code == 200
    assert "Nothing was imported" in response.content.decode()
    assert not Contact.objects.exists()


def test_admin_export_streams_every_contact_as_csv(admin_client):
    Contact.objects.create(email="ada@example.com", name="=1+1")
    Contact.objects.create(email="bob@example.com", name="Bob")

    response = admin_client.get("/admin/mailer/contact/export/")

    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="contacts-')
    body = b"".join(response.streaming_content).decode()
    rows = list(csv.reader(io.StringIO(body)))
    assert rows[0] == list(contacts.EXPORT_COLUMNS)
    assert [(r[0], r[1]) for r in rows[1:]] == [
        ("ada@example.com", "'=1+1"),
        ("bob@example.com", "Bob"),
    ]


def test_admin_export_selected_action_streams_only_the_selection(admin_client):
    ada = Contact.objects.create(email="ada@example.com")
    Contact.objects.create(email="bob@example.com")

    response = admin_client.post(
        reverse("admin:mailer_contact_changelist"),
        {"action": "export_selected", "_selected_action": [ada.pk]},
    )

    body = b"".join(response.streaming_content).decode()
    assert [row[0] for row in csv.reader(io.StringIO(body))] == ["email", "ada@example.com"]


# --- Which row did what, and dry runs -------------------------------------------------------


def test_the_report_says_which_row_created_or_updated_which_contact_and_what_it_overwrote():
    Contact.objects.create(email="ada@example.com", name="Ada", language="en")
    report = run_import(
        "email,name,language,plan",
        "ada@example.com,Ada L.,en,pro",
        "bob@example.com,Bob,,",
        "ADA@example.com,Ada Lovelace,,team",
        "bob@example.com,Bob,,",
    )

    got = [(d.line, d.email, d.action) for d in report.details]
    assert got == [
        (2, "ada@example.com", "updated"),
        (3, "bob@example.com", "created"),
        (4, "ada@example.com", "updated"),
        (5, "bob@example.com", "unchanged"),
    ]
    first, _, later, _ = report.details
    assert [(c.field, c.before, c.after, c.overwrites_line) for c in first.changes] == [
        ("name", "Ada", "Ada L.", None),  # what was stored before the import
        ("attributes.plan", "", "pro", None),
    ]
    assert [(c.field, c.before, c.after, c.overwrites_line) for c in later.changes] == [
        ("name", "Ada L.", "Ada Lovelace", 2),
        ("attributes.plan", "pro", "team", 2),
    ]
    assert report.overwrites == [later]
    ada = Contact.objects.get(email="ada@example.com")
    assert (ada.name, ada.attributes) == ("Ada Lovelace", {"plan": "team"})


def test_a_dry_run_reports_exactly_what_an_import_would_do_and_stores_nothing():
    Contact.objects.create(email="ada@example.com", name="Ada")
    lines = ("email,name,tags", "ada@example.com,Ada L.,vip", "new@example.com,New,vip;beta")

    dry = run_import(*lines, dry_run=True)

    assert dry.dry_run
    assert list(Contact.objects.values_list("email", "name")) == [("ada@example.com", "Ada")]
    assert not Tag.objects.exists()
    real = run_import(*lines)
    assert (dry.rows, dry.created, dry.updated, dry.rejected) == (
        real.rows,
        real.created,
        real.updated,
        real.rejected,
    )
    assert [(d.line, d.action, d.changes, d.tags) for d in dry.details] == [
        (d.line, d.action, d.changes, d.tags) for d in real.details
    ]
    assert Contact.objects.get(email="new@example.com").name == "New"


def test_row_details_stop_at_the_limit_and_count_the_rest(monkeypatch):
    monkeypatch.setattr(contacts, "DETAIL_LIMIT", 3)

    report = run_import("email", *(f"c{i}@example.com" for i in range(5)), batch_size=2)

    assert [d.line for d in report.details] == [2, 3, 4]
    assert report.details_left_out == 2
    assert report.created == 5


def test_admin_dry_run_shows_the_report_and_imports_nothing(admin_client):
    Contact.objects.create(email="ada@example.com", name="Ada")
    content = b"email,name\nada@example.com,Ada L.\nada@example.com,Ada Lovelace\n"

    response = admin_client.post(
        "/admin/mailer/contact/import/", {"file": upload(content), "_dry_run": "Dry run"}
    )

    assert response.status_code == 200
    page = response.content.decode()
    assert "Dry run: what the import would do (nothing was stored)" in page
    assert "name: “Ada L.” → “Ada Lovelace” — overwrites row 2" in page
    assert "1 row overwrote a value an earlier row of this file had set" in page
    assert [str(m) for m in get_messages(response.wsgi_request)] == [
        "Dry run, nothing was imported. 2 rows: 0 contacts created, 1 updated, "
        "1 duplicates merged, 0 rejected."
    ]
    assert Contact.objects.get().name == "Ada"

    imported = admin_client.post(
        "/admin/mailer/contact/import/", {"file": upload(content), "_import": "Import"}
    )

    assert "What the import did" in imported.content.decode()
    assert Contact.objects.get().name == "Ada Lovelace"


def test_command_dry_run_prints_overwrites_and_imports_nothing(tmp_path):
    path = tmp_path / "people.csv"
    path.write_text("email,name\nada@example.com,Ada\nada@example.com,Ada L.\n")
    out = io.StringIO()

    call_command("mailer_import_contacts", str(path), "--dry-run", stdout=out)

    printed = out.getvalue()
    assert "line 3 overwrote ada@example.com: name 'Ada' → 'Ada L.' (set by line 2)" in printed
    assert "Dry run, nothing imported: 2 rows: 1 created" in printed
    assert not Contact.objects.exists()
