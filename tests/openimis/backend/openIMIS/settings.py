"""Django settings of the openIMIS test backend (modules from PyPI, newest release line).

Everything comes from environment variables that tests/openimis/harness.py sets; the defaults
below match it (PostgreSQL on 127.0.0.1:5432, user postgres, trust auth, database openimis_e2e).
Written for end-to-end tests on loopback only: DEBUG-ish dev mode, no Redis/RabbitMQ/OpenSearch.
"""
import os
from datetime import timedelta

from .openimisapps import openimis_apps

BASE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(name, default=""):
    return os.environ.get(name, default)


def _flag(name, default="false"):
    return _env(name, default).strip().lower() in ("1", "true", "yes", "on")


# As upstream: MODE is lower-cased, and MODE=dev implies DEBUG (so e.g. a POST without its trailing slash
# is a 500 RuntimeError, as on a dev openIMIS, not a 301). Core's MODE == "PROD" checks (rate limits,
# security headers) therefore never fire, as upstream. DEBUG=false/true in the environment overrides.
MODE = _env("MODE", "dev").lower()
DEBUG = _flag("DEBUG", "true" if MODE == "dev" else "false")
IS_TESTING = False
IS_UNIT_TEST_ENV = False
SECRET_KEY = _env("SECRET_KEY", "openimis-e2e-test-only-not-a-secret-0123456789abcdef")
ALLOWED_HOSTS = ["*"]


def SITE_ROOT():  # openIMIS modules call settings.SITE_ROOT()
    root = _env("SITE_ROOT", "api")
    if root and not root.endswith("/"):
        root += "/"
    return root


def SITE_URL():  # host[:port] without scheme; api_fhir_r4 builds absolute links with it
    return _env("SITE_URL", "").rstrip("/")


SITE_FRONT = _env("SITE_FRONT", "front")
FRONTEND_URL = SITE_ROOT() + SITE_FRONT

OPENIMIS_APPS = openimis_apps()

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "graphene_django",
    "graphql_jwt.refresh_token.apps.RefreshTokenConfig",
    "rest_framework",
    "rules",
    "health_check",
    "health_check.db",
    "health_check.cache",
    "django_apscheduler",
    "channels",
    "drf_spectacular",
    "axes",
    "django_opensearch_dsl",
]
INSTALLED_APPS += OPENIMIS_APPS
INSTALLED_APPS += ["signal_binding", "receiver_binding"]  # keep last

AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "rules.permissions.ObjectPermissionBackend",
    "graphql_jwt.backends.JSONWebTokenBackend",
    "django.contrib.auth.backends.ModelBackend",
]
ANONYMOUS_USER_NAME = None
AUTH_USER_MODEL = "core.User"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "core.jwt_authentication.JWTAuthentication",
        "rest_framework.authentication.BasicAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "EXCEPTION_HANDLER": "openIMIS.ExceptionHandlerDispatcher.dispatcher",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {"TITLE": "FHIR R4", "DESCRIPTION": "openIMIS FHIR R4 API", "VERSION": "1.0.0"}

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "core.middleware.GraphQLRateLimitMiddleware",
    "axes.middleware.AxesMiddleware",
    "core.middleware.DefaultAxesAttributesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "core.middleware.SecurityHeadersMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "openIMIS.urls"
WSGI_APPLICATION = "openIMIS.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.debug",
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

GRAPHENE = {
    "SCHEMA": "openIMIS.schema.schema",
    "RELAY_CONNECTION_MAX_LIMIT": 100,
    "MIDDLEWARE": [
        "openIMIS.tracer.TracerMiddleware",
        "graphql_jwt.middleware.JSONWebTokenMiddleware",
    ],
}

GRAPHQL_JWT = {
    "JWT_VERIFY_EXPIRATION": True,
    "JWT_EXPIRATION_DELTA": timedelta(days=1),
    "JWT_REFRESH_EXPIRATION_DELTA": timedelta(days=30),
    "JWT_AUTH_HEADER_PREFIX": "Bearer",
    "JWT_ENCODE_HANDLER": "core.jwt.jwt_encode_user_key",
    "JWT_DECODE_HANDLER": "core.jwt.jwt_decode_user_key",
    "JWT_ALLOW_ANY_CLASSES": [
        "graphql_jwt.mutations.ObtainJSONWebToken",
        "graphql_jwt.mutations.Verify",
        "graphql_jwt.mutations.Refresh",
        "graphql_jwt.mutations.Revoke",
        "core.schema.ResetPasswordMutation",
        "core.schema.SetPasswordMutation",
    ],
}

# Row security: a claim administrator only sees the data of his health facility (upstream default True).
ROW_SECURITY = _flag("ROW_SECURITY", "true")

# Login lockout (django-axes). Off by default here: e2e tests send wrong passwords on purpose and a
# lockout would leak from one test into the next. OPENIMIS_AXES_ENABLED=true restores upstream behaviour.
AXES_ENABLED = _flag("AXES_ENABLED", "false")
AXES_FAILURE_LIMIT = int(_env("LOGIN_LOCKOUT_FAILURE_LIMIT", "5"))
AXES_COOLOFF_TIME = timedelta(minutes=int(_env("LOGIN_LOCKOUT_COOLOFF_TIME", "5")))
AXES_CACHE = "default"

RATELIMIT_CACHE = "default"
RATELIMIT_KEY = "ip"
RATELIMIT_RATE = _env("RATELIMIT_RATE", "150/m")
RATELIMIT_METHOD = "ALL"
RATELIMIT_GROUP = "graphql"
RATELIMIT_SKIP_TIMEOUT = "False"

CSRF_COOKIE_SECURE = False
SESSION_COOKIE_SECURE = False
SESSION_COOKIE_NAME = "openimis_session"
CSRF_USE_SESSIONS = True
USER_AGENT_CSRF_BYPASS = []
MASTER_DATA_PASSWORD = None
PASSWORD_MIN_LENGTH = 8
PASSWORD_UPPERCASE = 1
PASSWORD_LOWERCASE = 1
PASSWORD_DIGITS = 1
PASSWORD_SYMBOLS = 1

DATABASES = {
    "default": {
        "ENGINE": _env("DB_ENGINE", "django.db.backends.postgresql"),
        "NAME": _env("DB_NAME", "openimis_e2e"),
        "USER": _env("DB_USER", "postgres"),
        "PASSWORD": _env("DB_PASSWORD", ""),
        "HOST": _env("DB_HOST", "127.0.0.1"),
        "PORT": _env("DB_PORT", "5432"),
        "OPTIONS": {"options": "-c search_path=django,public", "connect_timeout": 10},
        "CONN_MAX_AGE": 0,
    }
}
MSSQL = "mssql" in DATABASES["default"]["ENGINE"] or "sql_server" in DATABASES["default"]["ENGINE"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "KEY_PREFIX": "oi"},
    "location": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "KEY_PREFIX": "loc"},
    "coverage": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "KEY_PREFIX": "cov"},
}
CACHE_OBJECT_DEFAULT = True
CACHE_OBJECT_TTL = None

CELERY_BROKER_URL = _env("CELERY_BROKER_URL", "memory://")
ASYNC = False

SCHEDULER_CONFIG = {
    "apscheduler.jobstores.default": {"class": "django_apscheduler.jobstores:DjangoJobStore"},
    "apscheduler.executors.processpool": {"type": "threadpool"},
}
SCHEDULER_AUTOSTART = False
SCHEDULER_JOBS = []
SCHEDULER_CUSTOM = []

OPENSEARCH_DSL_AUTOSYNC = False
OPENSEARCH_DSL_AUTO_REFRESH = False
OPENSEARCH_DSL = {"default": {"hosts": ["127.0.0.1:9"], "timeout": 1}}

EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024

LANGUAGE_CODE = "en-GB"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = False
LOCALE_PATHS = []

STATIC_ROOT = os.path.join(BASE_DIR, "staticfiles")
STATIC_URL = f"/{SITE_ROOT()}static/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": _env("OPENIMIS_LOG_LEVEL", "WARNING")},
}
