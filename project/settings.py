"""Settings for the host project, all from the environment (django-environ).

The embedded defaults run a fresh clone with no servers: SQLite in WAL mode, Celery's
file-system broker and an outbox of .eml files, all under var/. Production sets
DEBUG=0, SECRET_KEY, DATABASE_URL, CELERY_BROKER_URL and SMTP_* or MAILER_ESP.
"""

import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")  # optional; missing file is fine

VAR_DIR = Path(env.str("VAR_DIR", default=str(BASE_DIR / "var")))

DEBUG = env.bool("DEBUG", default=True)
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")
    SECRET_KEY = "insecure-development-key-never-use-in-production"  # noqa: S105

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env.bool("BEHIND_TLS_PROXY", default=False) else None
)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env.bool("SECURE_COOKIES", default=not DEBUG)

INSTALLED_APPS = [
    "mailer",  # before django.contrib.admin: its admin index groups mailer's models
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "anymail",
    "django_celery_beat",
    "project",
    # mailer's HTTP API (mailer.http_api): Django REST framework and its OpenAPI schema
    "rest_framework",
    "drf_spectacular",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Web, workers and beat share one file: WAL lets readers run beside the writer, the
    # busy timeout waits for the lock instead of failing, and IMMEDIATE transactions
    # take the write lock up front so two writers never deadlock on an upgrade.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if env.str("TEST_DATABASE_NAME", default=""):
    # Lets two test runs share one PostgreSQL server without sharing a test database.
    DATABASES["default"]["TEST"] = {"NAME": env.str("TEST_DATABASE_NAME")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Celery ---------------------------------------------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://localhost/")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = VAR_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir),
        "data_folder_out": str(_broker_dir),
        "control_folder": str(VAR_DIR / "broker-control"),
        "store_processed": False,
    }
    for _dir in (_broker_dir, VAR_DIR / "broker-control"):
        os.makedirs(_dir, exist_ok=True)
else:
    # Unacknowledged tasks come back after this long; every countdown stays below it.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=3600)
    }
CELERY_TASK_ROUTES = ("mailer.conf.route_task",)
CELERY_TASK_DEFAULT_QUEUE = "transactional"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SOFT_TIME_LIMIT = 240
CELERY_TASK_TIME_LIMIT = 300
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULER = "mailer.scheduler:Scheduler"
CELERY_TIMEZONE = "UTC"

# --- Email ----------------------------------------------------------------------------
SMTP_HOST = env.str("SMTP_HOST", default="")
MAILER_ESP = env.str("MAILER_ESP", default="")
if SMTP_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_HOST = SMTP_HOST
    _security = env.str("SMTP_SECURITY", default="starttls").lower()
    if _security not in ("starttls", "ssl", "none"):
        raise ImproperlyConfigured("SMTP_SECURITY must be one of starttls, ssl, none.")
    EMAIL_PORT = env.int("SMTP_PORT", default={"ssl": 465, "starttls": 587}.get(_security, 25))
    EMAIL_HOST_USER = env.str("SMTP_USER", default="")
    EMAIL_HOST_PASSWORD = env.str("SMTP_PASSWORD", default="")
    EMAIL_USE_TLS = _security == "starttls"
    EMAIL_USE_SSL = _security == "ssl"
    EMAIL_TIMEOUT = env.int("SMTP_TIMEOUT", default=30)
elif MAILER_ESP:
    # Any anymail ESP: MAILER_ESP=sendgrid plus ANYMAIL_SENDGRID_API_KEY=..., and so on.
    EMAIL_BACKEND = f"anymail.backends.{MAILER_ESP.lower()}.EmailBackend"
else:
    EMAIL_BACKEND = "mailer.backends.OutboxBackend"
EMAIL_BACKEND = env.str("EMAIL_BACKEND", default=EMAIL_BACKEND)
EMAIL_FILE_PATH = str(VAR_DIR / "outbox")
ANYMAIL = {
    key.removeprefix("ANYMAIL_"): value
    for key, value in os.environ.items()
    if key.startswith("ANYMAIL_") and value
}
DEFAULT_FROM_EMAIL = SERVER_EMAIL = env.str("SMTP_FROM_EMAIL", default="mailer@localhost")

MAILER = {
    "FROM_EMAIL": DEFAULT_FROM_EMAIL,
    "FROM_NAME": env.str("SMTP_FROM_NAME", default="") or None,
    "APP_NAME": env.str("APP_NAME", default="Mailer Demo"),
    "SITE_URL": env.str("SITE_URL", default="http://localhost:8000"),
    "REDIS_URL": env.str("MAILER_REDIS_URL", default="") or None,
    "RATE_LIMITS": {
        "transactional": env.str("MAILER_RATE_LIMIT_TRANSACTIONAL", default="") or None,
        "campaign": env.str("MAILER_RATE_LIMIT_CAMPAIGN", default="") or None,
    },
    # ESP quotas per calendar hour and day (empty: no cap), counted in QUOTA_TIMEZONE.
    "QUOTAS": {
        "transactional": {
            "hour": env.int("MAILER_TRANSACTIONAL_HOURLY_QUOTA", default=0) or None,
            "day": env.int("MAILER_TRANSACTIONAL_DAILY_QUOTA", default=0) or None,
        },
        "campaign": {
            "hour": env.int("MAILER_CAMPAIGN_HOURLY_QUOTA", default=0) or None,
            "day": env.int("MAILER_CAMPAIGN_DAILY_QUOTA", default=0) or None,
        },
    },
    "QUOTA_TIMEZONE": env.str("MAILER_QUOTA_TIMEZONE", default="UTC"),
    # CAN-SPAM: every marketing email shows it. Only the demo (DEBUG) has a made-up one.
    "POSTAL_ADDRESS": env.str(
        "MAILER_POSTAL_ADDRESS",
        default="Mailer Demo, 1 Example Street, 75001 Paris (demo address)" if DEBUG else "",
    ),
    "UNSUBSCRIBE_MAILTO": env.str("MAILER_UNSUBSCRIBE_MAILTO", default="") or None,
    "CONNECTIONS": {
        "transactional": env.int("MAILER_TRANSACTIONAL_CONNECTIONS", default=1),
        "campaign": env.int("MAILER_CAMPAIGN_CONNECTIONS", default=1),
    },
    "MAX_OPEN_CONNECTIONS": env.int("MAILER_MAX_OPEN_CONNECTIONS", default=None),
    "ESP_BATCH_SIZE": env.int("MAILER_ESP_BATCH_SIZE", default=None),
    "MAX_ATTEMPTS": env.int("MAILER_MAX_ATTEMPTS", default=5),
    "RETRY_BACKOFF_BASE": env.float("MAILER_RETRY_BACKOFF_BASE", default=30.0),
    "RETRY_BACKOFF_MAX": env.float("MAILER_RETRY_BACKOFF_MAX", default=3600.0),
    "SENDING_LEASE": env.float("MAILER_SENDING_LEASE", default=30.0),
    "STUCK_POLICY": env.str("MAILER_STUCK_POLICY", default="retry"),
    # DKIM on the SMTP path: domain and selector together, and one of the two keys (the
    # PEM in the environment may carry its line breaks as \n).
    "DKIM_DOMAIN": env.str("MAILER_DKIM_DOMAIN", default="") or None,
    "DKIM_SELECTOR": env.str("MAILER_DKIM_SELECTOR", default="") or None,
    "DKIM_PRIVATE_KEY": env.str("MAILER_DKIM_PRIVATE_KEY", default="", multiline=True) or None,
    "DKIM_PRIVATE_KEY_FILE": env.str("MAILER_DKIM_PRIVATE_KEY_FILE", default="") or None,
}

# --- mailer's HTTP API -----------------------------------------------------------------------
# drf-spectacular builds the OpenAPI document; mailer's views set everything else themselves.
REST_FRAMEWORK = {"DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema"}
MAILER.update(
    {
        "API_RATE_LIMIT": env.str("MAILER_API_RATE_LIMIT", default="600/m") or None,
        "METRICS_TOKEN": env.str("MAILER_METRICS_TOKEN", default="") or None,
        "METRICS_ALLOWED_IPS": env.list("MAILER_METRICS_ALLOWED_IPS", default=[]),
    }
)

# --- Drip series and the frequency cap (README: "Drip series") ------------------------------
MAILER.update(
    {
        "FREQUENCY_CAP": {
            "day": env.int("MAILER_FREQUENCY_CAP_DAY", default=0) or None,
            "week": env.int("MAILER_FREQUENCY_CAP_WEEK", default=0) or None,
        },
    }
)

# --- The rest ---------------------------------------------------------------------------
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("fr", "French"), ("de", "German"), ("es", "Spanish")]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
os.makedirs(STATIC_ROOT, exist_ok=True)  # WhiteNoise warns about a missing directory
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = DEBUG

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "home"

# Every record leaves through the console handler, which blanks tokens in paths and
# query strings (django.request logs the path of every 4xx). gunicorn's own access and
# error logs: --logger-class mailer.logs.GunicornLogger (Procfile).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "filters": {"redact_tokens": {"()": "mailer.logs.RedactTokens"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["redact_tokens"],
        }
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "mailer": {"level": env.str("MAILER_LOG_LEVEL", default="INFO")},
        # runserver's request lines, through the same handler
        "django.server": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
