"""The demo and the compose stack as a newcomer starts them: the admin account they create,
a web server on loopback only, and Ctrl-C stopping everything quietly."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from django.contrib.auth import get_user_model
from django.core.management import call_command

from .conftest import REPO, free_port, process_group, wait_for

COMPOSE = REPO / "docker-compose.yml"


# --- docker compose: the admin account ----------------------------------------------------


@pytest.fixture
def superuser_env(monkeypatch):
    for name in ("USERNAME", "PASSWORD", "EMAIL"):
        monkeypatch.delenv(f"DJANGO_SUPERUSER_{name}", raising=False)
    return monkeypatch


@pytest.mark.django_db
def test_ensure_superuser_creates_the_admin_from_the_environment_once(superuser_env):
    superuser_env.setenv("DJANGO_SUPERUSER_USERNAME", "boss")
    superuser_env.setenv("DJANGO_SUPERUSER_PASSWORD", "first password 1")
    superuser_env.setenv("DJANGO_SUPERUSER_EMAIL", "boss@example.com")
    out = io.StringIO()

    call_command("ensure_superuser", stdout=out)

    boss = get_user_model().objects.get(username="boss")
    assert boss.is_superuser and boss.is_staff
    assert boss.email == "boss@example.com"
    assert boss.check_password("first password 1")
    assert "Admin account 'boss' created." in out.getvalue()

    # Every later `docker compose up` runs it again: it neither fails nor resets a
    # password changed in the admin since.
    boss.set_password("changed in the admin")
    boss.save()
    superuser_env.setenv("DJANGO_SUPERUSER_PASSWORD", "another")
    out = io.StringIO()
    call_command("ensure_superuser", stdout=out)

    assert "exists; left as it is" in out.getvalue()
    assert get_user_model().objects.get(username="boss").check_password("changed in the admin")
    assert get_user_model().objects.count() == 1


@pytest.mark.django_db
def test_ensure_superuser_without_the_variables_creates_nothing_and_says_why(superuser_env):
    superuser_env.setenv("DJANGO_SUPERUSER_USERNAME", "boss")
    out = io.StringIO()

    call_command("ensure_superuser", stdout=out)

    assert "set DJANGO_SUPERUSER_USERNAME and DJANGO_SUPERUSER_PASSWORD" in out.getvalue()
    assert not get_user_model().objects.exists()


def test_compose_creates_the_admin_after_migrating_and_publishes_on_loopback_only():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    migrate = services["migrate"]
    script = migrate["command"][-1]

    steps = [line.strip() for line in script.splitlines() if "manage.py" in line]
    assert steps == [
        "python manage.py migrate --noinput",
        "python manage.py collectstatic --noinput",
        "python manage.py ensure_superuser",
    ]
    env = migrate["environment"]
    assert env["DJANGO_SUPERUSER_USERNAME"] == "${DJANGO_SUPERUSER_USERNAME:-admin}"
    assert env["DJANGO_SUPERUSER_PASSWORD"] == "${DJANGO_SUPERUSER_PASSWORD:-admin}"
    assert env["DJANGO_SUPERUSER_EMAIL"] == "${DJANGO_SUPERUSER_EMAIL:-admin@example.com}"
    assert env["DATABASE_URL"] == services["web"]["environment"]["DATABASE_URL"]
    # The password is the one-shot service's alone, not every container's.
    assert "DJANGO_SUPERUSER_PASSWORD" not in services["web"]["environment"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    for name in ("web", "worker_transactional", "worker_campaign", "beat"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


# --- make demo: loopback, and Ctrl-C ---------------------------------------------------------


def _listening(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at ``port`` (from /proc/net/tcp)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (this test's own VAR_DIR)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if marker.encode() in Path(entry.path, "environ").read_bytes():
                    state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state not in ("Z", "X"):
                        pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.integration
def test_the_demo_listens_on_loopback_and_ctrl_c_stops_everything_without_errors(tmp_path):
    var = tmp_path / "demo-var"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE")
    }
    bin_dir = str(Path(sys.executable).parent)
    # The Makefile's demo environment (SQLite and the file-system broker under VAR_DIR).
    env.update(
        DEBUG="1",
        VAR_DIR=str(var),
        WEB_CONCURRENCY="1",
        WORKER_CONCURRENCY="1",
        PATH=f"{bin_dir}:{env.get('PATH', '')}",
    )
    env.pop("BIND_ADDRESS", None)  # the command's own default: loopback
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput"], cwd=REPO, env=env, check=True, timeout=180)
    port = free_port()
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        # Its own process group, as a shell gives a foreground job; Ctrl-C signals it all.
        demo = subprocess.Popen(
            [*manage, "demo_processes", "--port", str(port)]
            + ["web", "worker_transactional", "worker_campaign", "beat"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live").status == 200
                if _listening(port)
                else False
            ),
            timeout=60,
            message=f"the demo's web server did not answer:\n{log.read_text()}",
        )
        wait_for(
            lambda: log.read_text().count(" ready.") >= 2 and "beat: Starting" in log.read_text(),
            timeout=60,
            message=f"the workers and beat did not start:\n{log.read_text()}",
        )
        assert _listening(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 or ::
        assert len(_processes_with(str(var))) >= 5  # web + workers + pools + beat

        os.killpg(demo.pid, signal.SIGINT)  # what the terminal's Ctrl-C does
        returncode = demo.wait(timeout=40)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            for pid in _processes_with(str(var)):
                os.kill(pid, signal.SIGKILL)

    output = log.read_text()
    assert returncode == 0, output
    assert "stopped, as asked" in output
    assert "Traceback" not in output, output
    assert "SIGKILL" not in output
    assert not process_group(demo.pid)
    wait_for(lambda: not _processes_with(str(var)), timeout=5, message="processes left behind")
    assert not _listening(port)
