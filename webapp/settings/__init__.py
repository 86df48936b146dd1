"""Tandem settings: every knob comes from the environment, with a safe development default.

Development (the README's run command) needs no service: SQLite, a file-system Celery broker
consumed by a real worker process, CPU. Production (`webapp.settings.production`) refuses to start
with an insecure default.
"""
import os
from pathlib import Path

import dj_database_url
from celery.schedules import crontab

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = Path(os.environ.get("TANDEM_VAR_DIR", BASE_DIR / "var"))

INSECURE_SECRET_KEY = "django-insecure-tandem-development-key"


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


SECRET_KEY = os.environ.get("SECRET_KEY", INSECURE_SECRET_KEY)
DEBUG = env_bool("DEBUG", True)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "webapp",
    "annotation",
    "policy",
    "rewards",
]

MIDDLEWARE = [
    "webapp.api_errors.RequestBodyLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "webapp.urls"
WSGI_APPLICATION = "webapp.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "webapp" / "templates"],
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

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{VAR_DIR / 'tandem.sqlite3'}"),
        conn_max_age=int(os.environ.get("DATABASE_CONN_MAX_AGE", "60")),
    )
}
# Tests run against the database DATABASE_URL names. The test database gets a fixed name (a file
# for SQLite) so that a Celery worker started by a test can open the same one; the suffix keeps
# parallel test runs on one server apart.
_test_suffix = os.environ.get("TANDEM_TEST_DB_SUFFIX", "")
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # The embedded default needs nothing installed, and nothing created by hand either.
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test_tandem{_test_suffix}.sqlite3")}
    # IMMEDIATE: a transaction takes the write lock when it begins. With SQLite's default (DEFERRED) two
    # requests that both read and then write (two annotators leasing at once) deadlock, and one fails
    # at once with "database is locked" instead of waiting up to the timeout.
    DATABASES["default"]["OPTIONS"] = {"timeout": 30, "transaction_mode": "IMMEDIATE"}
    DATABASES["default"]["CONN_MAX_AGE"] = 0
else:
    DATABASES["default"]["TEST"] = {"NAME": f"test_tandem{_test_suffix}"}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = os.environ.get("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", BASE_DIR / "staticfiles"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
if DEBUG:
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "annotation:home"
LOGOUT_REDIRECT_URL = "login"

DATA_UPLOAD_MAX_MEMORY_SIZE = int(os.environ.get("DATA_UPLOAD_MAX_MEMORY_SIZE", str(10 * 1024 * 1024)))
# Multipart file uploads (the staff import page) may be larger; both are enforced from Content-Length.
TANDEM_MAX_UPLOAD_BYTES = int(os.environ.get("TANDEM_MAX_UPLOAD_BYTES", str(512 * 1024 * 1024)))

# Cache: per-process memory by default; Redis (shared by all web workers, so that the login and
# token failure counters are too) when CACHE_URL (or REDIS_URL) is set.
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "tandem"}}
if _cache_url := os.environ.get("CACHE_URL") or os.environ.get("REDIS_URL"):
    CACHES["default"] = {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": _cache_url}
# Failed logins / token authentications per address (and per username for logins) before 429.
TANDEM_AUTH_FAILURE_LIMIT = int(os.environ.get("TANDEM_AUTH_FAILURE_LIMIT", "10"))
TANDEM_AUTH_FAILURE_WINDOW = int(os.environ.get("TANDEM_AUTH_FAILURE_WINDOW", "900"))

# --- Tandem -------------------------------------------------------------------------------------
# Where checkpoints, reward models and snapshots live. Paths outside these roots are refused.
TANDEM_MODEL_ROOTS = [Path(p) for p in env_list("TANDEM_MODEL_ROOTS", str(VAR_DIR / "models"))]
TANDEM_ARTIFACT_DIR = Path(os.environ.get("TANDEM_ARTIFACT_DIR", VAR_DIR / "artifacts"))
TANDEM_SNAPSHOT_DIR = Path(os.environ.get("TANDEM_SNAPSHOT_DIR", VAR_DIR / "snapshots"))
# How long an annotator holds a leased comparison before it returns to the queue.
TANDEM_LEASE_SECONDS = int(os.environ.get("TANDEM_LEASE_SECONDS", "900"))
# How many annotators judge each comparison by default (overlap, for agreement).
TANDEM_DEFAULT_OVERLAP = int(os.environ.get("TANDEM_DEFAULT_OVERLAP", "1"))
# Held-out test slice per frozen batch: the paper held out 1,000; small batches keep 10%.
TANDEM_TEST_SLICE_SIZE = int(os.environ.get("TANDEM_TEST_SLICE_SIZE", "1000"))
TANDEM_TEST_SLICE_FRACTION = float(os.environ.get("TANDEM_TEST_SLICE_FRACTION", "0.1"))

# --- Celery ---------------------------------------------------------------------------------------
# Default: a file-system broker that needs no server; the run command starts a real worker on it.
BROKER_DIR = Path(os.environ.get("TANDEM_BROKER_DIR", VAR_DIR / "broker"))
# (It names a host only so kombu does not warn about a missing one on every connection.)
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://localhost/")
CELERY_BROKER_TRANSPORT_OPTIONS = (
    {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
    }
    if CELERY_BROKER_URL.startswith("filesystem")
    else {"visibility_timeout": int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", "43200"))}
)
if CELERY_BROKER_URL.startswith("filesystem"):
    # The embedded broker is a pair of folders that the web process and the worker share.
    for _folder in ("queue", "processed", "control"):
        (BROKER_DIR / _folder).mkdir(parents=True, exist_ok=True)
CELERY_TASK_IGNORE_RESULT = True  # progress and results live in our own rows
CELERY_TASK_ACKS_LATE = True  # a worker killed midway leaves the message for the next one
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = TIME_ZONE
CELERY_BEAT_SCHEDULE = {
    "freeze-last-week": {
        "task": "workers.batches.freeze_previous_week",
        "schedule": crontab(minute=5, hour=0, day_of_week="mon"),
    },
    "requeue-orphaned-jobs": {
        "task": "workers.sweeper.requeue_orphaned_jobs",
        "schedule": int(os.environ.get("TANDEM_ORPHAN_SWEEP_SECONDS", "120")),
    },
}
# A running job whose worker died is sent again once it started at least this long ago.
TANDEM_ORPHAN_GRACE_SECONDS = int(os.environ.get("TANDEM_ORPHAN_GRACE_SECONDS", "60"))
TANDEM_ORPHAN_RESEND_SECONDS = int(os.environ.get("TANDEM_ORPHAN_RESEND_SECONDS", "1800"))

# --- REST API -----------------------------------------------------------------------------------
REST_FRAMEWORK = {
    # Token first: its challenge makes unauthenticated API requests 401. Session authentication
    # (the browser) enforces CSRF on unsafe methods.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "webapp.auth.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.CursorPagination",
    "PAGE_SIZE": 100,
    "EXCEPTION_HANDLER": "webapp.api_errors.exception_handler",
    # `format` is a parameter of our own (the export's row format, the checkpoint format filter),
    # not DRF's renderer override; clients choose JSON / the browsable page with Accept.
    "URL_FORMAT_OVERRIDE": None,
    "DEFAULT_PARSER_CLASSES": [
        "webapp.api_errors.StrictJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_THROTTLE_CLASSES": [
        "rest_framework.throttling.AnonRateThrottle",
        "rest_framework.throttling.UserRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": os.environ.get("TANDEM_API_ANON_RATE", "300/min"),
        "user": os.environ.get("TANDEM_API_USER_RATE", "6000/min"),
    },
    "NUM_PROXIES": int(os.environ["TANDEM_NUM_PROXIES"]) if os.environ.get("TANDEM_NUM_PROXIES") else None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Tandem API",
    "DESCRIPTION": "Human preference data, reward models and RLHF rounds of the Llama 2 loop.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI / Redoc assets served from drf-spectacular-sidecar: no CDN needed.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}
