"""The README stays current: every MAILER key, every environment variable the demo
project reads and every system check id is documented there."""

from __future__ import annotations

import re
from pathlib import Path

from mailer import conf

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + 1)
    return README[start:end]


def test_every_mailer_key_is_in_the_readme_table_with_its_default():
    table = section("### The `MAILER` settings dict")
    rows = {
        key
        for line in table.splitlines()
        if line.startswith("| `")
        for key in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1])
    }

    assert set(conf.DEFAULTS) - rows == set()
    assert rows - set(conf.DEFAULTS) == set()  # nothing documented that does not exist


def test_every_environment_variable_of_the_project_is_in_the_readme():
    settings = (REPO / "project" / "settings.py").read_text(encoding="utf-8")
    read = set(re.findall(r'env(?:\.\w+)?\(\s*"([A-Z][A-Z0-9_]+)"', settings))
    table = section("### Environment variables")

    missing = sorted(name for name in read if f"`{name}`" not in table)

    assert read and missing == []


def test_every_system_check_id_is_in_the_readme():
    ids = set()
    for path in (REPO / "mailer").rglob("*.py"):
        ids |= set(re.findall(r'"mailer\.([EW]\d{3})"', path.read_text(encoding="utf-8")))

    assert ids
    assert sorted(i for i in ids if i not in README) == []
