"""System checks: mailer's misconfigurations are caught at start-up."""

from __future__ import annotations

import pytest

from mailer.checks import check_settings


def mailer_ids() -> list[str]:
    return sorted(message.id for message in check_settings())


@pytest.fixture(autouse=True)
def webhook_secret(settings):
    settings.ANYMAIL = {**settings.ANYMAIL, "WEBHOOK_SECRET": "user:long-random-password"}


@pytest.fixture
def redis_broker(settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6390/3"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
    settings.CELERY_TASK_TIME_LIMIT = 300


def test_project_settings_pass_every_check(redis_broker):
    assert mailer_ids() == []


def test_documented_defaults_pass_every_check(redis_broker, settings):
    settings.MAILER = {"POSTAL_ADDRESS": "1 Test Street"}

    assert mailer_ids() == []


def test_defaults_without_redis_or_time_limit_pass(settings):
    settings.MAILER = {"POSTAL_ADDRESS": "1 Test Street"}
    settings.CELERY_BROKER_URL = "filesystem://localhost/"
    settings.CELERY_TASK_TIME_LIMIT = None

    assert mailer_ids() == []


@pytest.mark.parametrize("rate", ["fast", "10 per second", "10/d"])
def test_unparsable_rate_limit_is_error_e001(redis_broker, settings, rate):
    settings.MAILER = {**settings.MAILER, "RATE_LIMITS": {"campaign": rate}}

    errors = check_settings()

    assert [e.id for e in errors] == ["mailer.E001"]
    assert rate in errors[0].msg


def test_max_countdown_at_or_past_visibility_timeout_is_error_e002(redis_broker, settings):
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 900}
    settings.MAILER = {**settings.MAILER, "MAX_COUNTDOWN": 900}

    assert mailer_ids() == ["mailer.E002"]


def test_max_countdown_is_not_checked_without_a_visibility_timeout(settings):
    settings.CELERY_BROKER_URL = "filesystem://localhost/"
    settings.MAILER = {**settings.MAILER, "MAX_COUNTDOWN": 100_000}

    assert mailer_ids() == []


def test_visibility_timeout_within_task_time_limit_is_error_e003(redis_broker, settings):
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 400}
    settings.MAILER = {**settings.MAILER, "MAX_COUNTDOWN": 100}
    settings.CELERY_TASK_TIME_LIMIT = 400

    assert mailer_ids() == ["mailer.E003"]


def test_sending_lease_too_short_to_renew_is_error_e004(redis_broker, settings):
    settings.MAILER = {**settings.MAILER, "SENDING_LEASE": 5}

    assert mailer_ids() == ["mailer.E004"]


def test_unknown_stuck_policy_is_error_e005(redis_broker, settings):
    settings.MAILER = {**settings.MAILER, "STUCK_POLICY": "ignore"}

    assert mailer_ids() == ["mailer.E005"]


def test_zero_max_attempts_is_error_e006(redis_broker, settings):
    settings.MAILER = {**settings.MAILER, "MAX_ATTEMPTS": 0}

    assert mailer_ids() == ["mailer.E006"]


def test_missing_webhook_secret_without_debug_is_error_e007(settings):
    settings.ANYMAIL = {}
    settings.DEBUG = False

    assert "mailer.E007" in mailer_ids()


def test_missing_webhook_secret_is_fine_in_debug(settings):
    settings.ANYMAIL = {}
    settings.DEBUG = True

    assert "mailer.E007" not in mailer_ids()


def test_missing_postal_address_without_debug_is_warning_w001(settings):
    settings.MAILER = {**settings.MAILER, "POSTAL_ADDRESS": ""}
    settings.DEBUG = False

    assert "mailer.W001" in mailer_ids()


@pytest.mark.parametrize("value", [-1, "many", 2.5, True])
def test_a_cap_on_open_connections_that_is_not_a_whole_number_is_error_e009(settings, value):
    from mailer.checks import check_settings

    settings.MAILER = {**settings.MAILER, "MAX_OPEN_CONNECTIONS": value}

    assert "mailer.E009" in [error.id for error in check_settings()]


@pytest.mark.parametrize("value", [0, -5, "50", 2.5, False])
def test_an_esp_batch_size_that_is_not_a_positive_whole_number_is_error_e009(settings, value):
    from mailer.checks import check_settings

    settings.MAILER = {**settings.MAILER, "ESP_BATCH_SIZE": value}

    assert "mailer.E009" in [error.id for error in check_settings()]


@pytest.mark.parametrize("value", [0, 500, "8", None])
def test_a_connection_count_out_of_range_is_refused_not_bent_into_it(settings, value):
    from mailer import conf
    from mailer.checks import check_settings
    from mailer.exceptions import MailerConfigurationError

    settings.MAILER = {**settings.MAILER, "CONNECTIONS": {"campaign": value}}

    with pytest.raises(MailerConfigurationError, match="CONNECTIONS"):
        conf.connections("campaign")
    assert conf.connections("transactional") == 1  # unset: one connection
    assert "mailer.E009" in [error.id for error in check_settings()]


# --- Security: hosts and webhooks ---------------------------------------------------------


def check_ids(**kwargs) -> list[str]:
    """Every registered check, as ``manage.py check`` (``--deploy``) runs them."""
    from django.core.checks import run_checks

    return sorted(m.id for m in run_checks(**kwargs) if m.id and m.id.startswith("mailer."))


def test_any_host_allowed_without_debug_is_deploy_warning_w003(settings):
    settings.DEBUG = False
    settings.ALLOWED_HOSTS = ["app.example.com", "*"]

    assert "mailer.W003" in check_ids(include_deployment_checks=True)
    assert "mailer.W003" not in check_ids()  # a deployment check only


@pytest.mark.parametrize(
    "debug,hosts", [(True, ["*"]), (False, ["app.example.com", ".example.com"])]
)
def test_listed_hosts_or_debug_raise_no_w003(settings, debug, hosts):
    settings.DEBUG = debug
    settings.ALLOWED_HOSTS = hosts

    assert "mailer.W003" not in check_ids(include_deployment_checks=True)


def test_anymails_own_webhook_views_are_warning_w004(settings):
    settings.ROOT_URLCONF = __name__  # this module's urlpatterns: anymail.urls as is

    assert "mailer.W004" in check_ids()


def test_the_projects_guarded_webhooks_raise_no_w004():
    assert "mailer.W004" not in check_ids()


@pytest.mark.parametrize("value", [0, -5, "300", None])
def test_a_webhook_max_age_that_is_not_positive_seconds_is_error_e001(settings, value):
    settings.MAILER = {**settings.MAILER, "WEBHOOK_MAX_AGE": value}

    assert "mailer.E001" in mailer_ids()


def _anymail_urls():
    from django.urls import include, path

    return [path("anymail/", include("anymail.urls"))]


urlpatterns = _anymail_urls()


# --- What a host project must wire ------------------------------------------------------------


def host_ids() -> list[str]:
    from mailer.checks import check_host

    return sorted(message.id for message in check_host())


def test_the_demo_host_is_wired_as_a_host_must_be(settings):
    settings.DEBUG = True

    assert host_ids() == []


def test_a_host_without_django_celery_beat_is_error_e010_before_migrate_can_crash(settings):
    from django.test import modify_settings

    with modify_settings(INSTALLED_APPS={"remove": "django_celery_beat"}):
        assert "mailer.E010" in host_ids()


def test_a_host_without_mailer_urls_is_error_e011(settings):
    settings.ROOT_URLCONF = "django.contrib.auth.urls"  # a URLconf without mailer's

    assert "mailer.E011" in host_ids()


def test_a_host_without_a_celery_app_is_error_e012(monkeypatch):
    from celery import Celery, _state

    fallback = Celery("default", fixups=[], set_as_current=False)
    monkeypatch.setattr(_state._tls, "current_app", fallback)

    assert "mailer.E012" in host_ids()


def test_the_default_site_url_with_debug_off_is_warning_w005(settings):
    settings.DEBUG = False
    settings.MAILER = {**settings.MAILER, "SITE_URL": "http://localhost:8000"}
    assert "mailer.W005" in host_ids()

    settings.MAILER = {**settings.MAILER, "SITE_URL": "https://shop.example.com"}
    assert "mailer.W005" not in host_ids()


@pytest.mark.parametrize("key", ["FROM_NAME", "FROM_EMAIL"])
def test_a_sender_setting_with_a_line_break_is_error_e001(settings, key):
    settings.MAILER = {**settings.MAILER, key: "News\r\nBcc: everyone@example.com"}

    assert "mailer.E001" in mailer_ids()


def test_secret_context_keys_that_are_not_a_list_of_names_is_error_e001(settings):
    settings.MAILER = {**settings.MAILER, "SECRET_CONTEXT_KEYS": "api_token"}

    assert "mailer.E001" in mailer_ids()
