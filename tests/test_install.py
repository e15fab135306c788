"""mailer as a host project installs it: a wheel built from pyproject.toml, a fresh
virtualenv, a `startproject` host with only the settings the README documents.

The virtualenv gets the wheel alone (no network: the test may reach only 127.0.0.1);
mailer's dependencies come from this interpreter's site-packages through a .pth file,
which adds the directory without running its own .pth files, so this checkout's
editable install of mailer stays out of sight.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def run(*args, cwd: Path | None = None, env: dict | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, REPO)
    (built,) = dist.glob("django_mailer_celery-*.whl")
    return built


def test_the_wheel_ships_templates_migrations_and_static(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())

    for expected in (
        "mailer/templates/mailer/welcome/body.html",
        "mailer/templates/mailer/welcome/fr/subject.txt",
        "mailer/templates/mailer/verify_email/body.txt",
        "mailer/templates/mailer/password_reset/subject.txt",
        "mailer/templates/mailer/layouts/base.html",
        "mailer/templates/mailer/pages/unsubscribe_confirm.html",
        "mailer/templates/admin/mailer/campaign/report.html",
        "mailer/migrations/0001_initial.py",
    ):
        assert expected in names, expected
    assert not any(n.startswith(("project/", "tests/", "bench/")) for n in names)


@pytest.fixture(scope="module")
def host(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel, and a startproject host set up as the README's
    "Add mailer to your Django project" says."""
    root = tmp_path_factory.mktemp("host")
    venv = root / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", wheel)
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    deps = sysconfig.get_paths()["purelib"]
    Path(purelib.strip(), "mailer_test_dependencies.pth").write_text(deps + "\n")
    site = root / "site"
    site.mkdir()
    run(python, "-m", "django", "startproject", "shop", site)
    settings = site / "shop" / "settings.py"
    settings.write_text(
        settings.read_text()
        + textwrap.dedent(
            """
            INSTALLED_APPS = ["mailer", "django_celery_beat", *INSTALLED_APPS]
            MAILER = {"SITE_URL": "https://shop.example", "FROM_EMAIL": "hello@shop.example"}
            CELERY_BROKER_URL = "memory://"
            CELERY_TASK_ALWAYS_EAGER = True
            EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
            """
        )
    )
    urls = site / "shop" / "urls.py"
    urls.write_text(
        urls.read_text()
        .replace("from django.urls import path", "from django.urls import include, path")
        .replace(
            "urlpatterns = [",
            'urlpatterns = [\n    path("mailer/", include("mailer.urls")),',
        )
    )
    (site / "shop" / "celery.py").write_text(
        textwrap.dedent(
            """
            import os

            from celery import Celery

            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
            app = Celery("shop")
            app.config_from_object("django.conf:settings", namespace="CELERY")
            app.autodiscover_tasks()
            """
        )
    )
    (site / "shop" / "__init__.py").write_text("from .celery import app as celery_app\n")
    return site


def host_env() -> dict[str, str]:
    # Nothing of this checkout's settings: the host stands on its own.
    drop = ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MAILER")}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1"}


def test_a_fresh_host_checks_migrates_and_sends_welcome_through_the_console(host):
    python = host.parent / "venv" / "bin" / "python"
    where = run(python, "-c", "import mailer; print(mailer.__file__)", cwd=host, env=host_env())
    assert "site-packages" in where and str(REPO) not in where  # the wheel, not this checkout

    assert "no issues" in run(python, "manage.py", "check", cwd=host, env=host_env())
    run(python, "manage.py", "migrate", "--noinput", cwd=host, env=host_env())
    script = textwrap.dedent(
        """
        from django.db import transaction
        from mailer import api
        with transaction.atomic():
            message = api.send(
                "welcome", to="ada@example.com",
                context={"user_name": "Ada", "login_url": "https://shop.example/login"},
            )
        message.refresh_from_db()
        print("STATUS", message.status)
        """
    )
    out = run(python, "manage.py", "shell", "-c", script, cwd=host, env=host_env())

    assert "STATUS sent" in out
    assert "To: ada@example.com" in out
    assert "Subject: Welcome to" in out
    assert "From: hello@shop.example" in out


def test_a_host_missing_what_mailer_needs_is_told_what_to_do(host):
    python = host.parent / "venv" / "bin" / "python"
    settings = host / "shop" / "settings.py"
    original = settings.read_text()
    try:
        settings.write_text(
            original.replace('["mailer", "django_celery_beat", ', '["mailer", ')
            + '\nDEBUG = False\nALLOWED_HOSTS = ["shop.example"]\nMAILER["SITE_URL"] = '
            '"http://localhost:8000"\n'
        )
        done = subprocess.run(
            [str(python), "manage.py", "migrate", "--noinput"],
            cwd=host,
            env=host_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        settings.write_text(original)

    assert done.returncode != 0
    assert "mailer.E010" in done.stderr and "django_celery_beat" in done.stderr
    assert "NodeNotFoundError" not in done.stderr
    assert "mailer.W005" in done.stderr
