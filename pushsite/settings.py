"""Settings, read from the environment in this one module.

The contract (PROTOCOL.md section 5) names the variables; everything else has a
default that works for a first look. Two configurations are supported:

* embedded (no ``DATABASE_URL``, no ``REDIS_URL``): SQLite in ``var/``, the
  in-process channel layer, a local-memory cache and a filesystem Celery broker;
* real: MariaDB/MySQL through mysqlclient, channels-redis, the Redis cache.

Code reads ``django.conf.settings.PUSH_*`` at call time, never at import time,
so ``override_settings`` changes behaviour in tests.

``PUSH_ENV=production`` refuses to start with DEBUG on, the development API
secret or the development login verifier (tests/test_settings.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from pushsite.redis_url import celery_broker, channel_layer_host, parse_sentinel_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("PUSH_VAR_DIR", BASE_DIR / "var"))


def env_str(name: str, default: str = "") -> str:
    """The variable's value, or the default when unset or empty."""
    return os.environ.get(name, "").strip() or default


def env_int(name: str, default: int) -> int:
    raw = env_str(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, got {raw!r}") from None


def env_bool(name: str, default: bool) -> bool:
    raw = env_str(name).lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, got {raw!r}")


def env_list(name: str, default: list[str]) -> list[str]:
    raw = env_str(name)
    return [item.strip() for item in raw.split(",") if item.strip()] if raw else default


PUSH_ENV = env_str("PUSH_ENV", "local")
if PUSH_ENV not in {"local", "test", "production"}:
    raise ImproperlyConfigured(f"PUSH_ENV must be local, test or production, got {PUSH_ENV!r}")
PRODUCTION = PUSH_ENV == "production"

DEV_SECRET_KEY = "pushsite-development-only-secret-key-not-for-production-use"  # noqa: S105
DEV_PUSH_API_SECRET = "pushsite-development-api-secret"  # noqa: S105

SECRET_KEY = env_str("DJANGO_SECRET_KEY", DEV_SECRET_KEY)
DEBUG = env_bool("DJANGO_DEBUG", PUSH_ENV == "local")
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", [] if PRODUCTION else ["*"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_celery_beat",
    "connections",
    "notifications",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "pushsite.urls"
ASGI_APPLICATION = "pushsite.asgi.application"
WSGI_APPLICATION = None

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

# --- Database -------------------------------------------------------------

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    # Persistent connections pay off on the long-lived database threads of the
    # bridge (connections/bridge.py), where every socket's work and the push API
    # run. Other views run on a thread per request under ASGI; their
    # connections are closed when the request ends (bridge.close_request_connections).
    _default_db = dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DB_CONN_MAX_AGE", 60))
    _default_db["CONN_HEALTH_CHECKS"] = True
    if _default_db["ENGINE"] == "django.db.backends.mysql":
        _default_db.setdefault("OPTIONS", {}).update(
            {
                "charset": "utf8mb4",
                # A stopped MariaDB must turn into a quick 503, not a hang.
                "connect_timeout": env_int("DB_CONNECT_TIMEOUT", 3),
                "read_timeout": env_int("DB_READ_TIMEOUT", 10),
                "write_timeout": env_int("DB_WRITE_TIMEOUT", 10),
                "init_command": "SET sql_mode='STRICT_TRANS_TABLES'",
            }
        )
        _default_db.setdefault("TEST", {}).update({"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"})
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    _default_db = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": VAR_DIR / "pushsite.sqlite3",
        # WAL and a busy timeout let the server, a worker and a test share the
        # file. IMMEDIATE takes the write lock when a transaction begins, so a
        # writer waits out another one instead of failing at once when its read
        # snapshot cannot be upgraded.
        "OPTIONS": {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL;", "transaction_mode": "IMMEDIATE"},
        # A file, not Django's default shared-cache memory database: shared
        # cache locks whole tables and ignores the busy timeout, so an inline
        # job's thread and the test's thread failed with "database table is
        # locked" where the embedded server (a file) would have waited.
        "TEST": {"NAME": VAR_DIR / "test-pushsite.sqlite3"},
    }

DATABASES = {"default": _default_db}

# Shard tables can be spread over extra databases: each URL becomes an alias
# and the 128 shards are split into contiguous ranges over them.
PUSH_SHARD_DATABASES = ["default"]
for _index, _url in enumerate(env_list("PUSH_SHARD_DATABASE_URLS", [])):
    _alias = f"shards{_index}"
    # parse() sets CONN_MAX_AGE and CONN_HEALTH_CHECKS itself: pass the default's,
    # or a shard connection left over from before a database restart is used unchecked.
    DATABASES[_alias] = {
        **_default_db,
        **dj_database_url.parse(
            _url,
            conn_max_age=_default_db.get("CONN_MAX_AGE", 0),
            conn_health_checks=_default_db.get("CONN_HEALTH_CHECKS", False),
        ),
    }
    DATABASES[_alias]["OPTIONS"] = dict(_default_db.get("OPTIONS", {}))
    DATABASES[_alias]["TEST"] = dict(_default_db.get("TEST", {}))
    PUSH_SHARD_DATABASES = [a for a in PUSH_SHARD_DATABASES if a != "default"] + [_alias]
DATABASE_ROUTERS = ["notifications.router.ShardRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: channel layer, cache, login hash --------------------------------

# redis://host:port/db, or redis+sentinel://host:port,host:port/<master name>/<db>
# for a Sentinel group (pushsite/redis_url.py): every Redis user follows a failover.
REDIS_URL = env_str("REDIS_URL")
try:
    parse_sentinel_url(REDIS_URL)
except ValueError as error:
    raise ImproperlyConfigured(str(error)) from None

# redis-py's defaults (a short socket_timeout, a small pool) drop idle pub/sub
# sockets and fail mass disconnects; the options are therefore always explicit.
REDIS_CONNECTION_OPTIONS = {
    "socket_connect_timeout": 2,
    "socket_timeout": None,
    "socket_keepalive": True,
    "health_check_interval": 30,
    "retry_on_timeout": False,
}

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [channel_layer_host(REDIS_URL, REDIS_CONNECTION_OPTIONS)],
                # The stock layer drops group messages past capacity silently;
                # it is only the comparison path (PUSH_FANOUT=layer), so give it room.
                "capacity": 10000,
                "expiry": 300,
                "prefix": "pushsite:layer",
            },
        }
    }
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            # A list: Django splits a LOCATION string at commas, as in a sentinel list.
            "LOCATION": [REDIS_URL],
            "KEY_PREFIX": "pushsite",
            "OPTIONS": {
                "socket_connect_timeout": 2,
                "socket_timeout": 2,
                "pool_class": "pushsite.redis_client.CachePool",
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Celery ---------------------------------------------------------------

# The broker as configured (push_status reads its queue); CELERY_BROKER_URL is kombu's form of it.
PUSH_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL) or "filesystem://"
try:
    CELERY_BROKER_URL, CELERY_BROKER_TRANSPORT_OPTIONS = celery_broker(PUSH_BROKER_URL)
except ValueError as error:
    raise ImproperlyConfigured(str(error).replace("REDIS_URL", "CELERY_BROKER_URL")) from None
if CELERY_BROKER_URL == "filesystem://":
    _broker_dir = VAR_DIR / "celery-broker"
    _broker_dir.mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir),
        "data_folder_out": str(_broker_dir),
        # kombu's default is ./control, inside whatever directory runs it.
        "control_folder": str(VAR_DIR / "celery-control"),
    }
CELERY_TASK_DEFAULT_QUEUE = env_str("PUSH_CELERY_QUEUE", "pushsite")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"

# --- Auth, i18n, static ---------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("DJANGO_STATIC_ROOT", str(BASE_DIR / "staticfiles")))
# daphne serves static files itself unless a proxy in front does (production).
PUSH_SERVE_STATIC = env_bool("PUSH_SERVE_STATIC", not PRODUCTION)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"()": "pushsite.logs.TextFormatter", "format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "pushsite.logs.JsonFormatter"},
    },
    # PUSH_LOG_FORMAT (checked below): "json" writes one JSON object per line.
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if env_str("PUSH_LOG_FORMAT") == "json" else "text",
        }
    },
    "root": {"handlers": ["console"], "level": env_str("PUSH_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        # httpx logs each request URL at INFO: the verify URL carries login keys and the token.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}

# --- pushsite -------------------------------------------------------------

PUSH_API_SECRET = env_str("PUSH_API_SECRET", DEV_PUSH_API_SECRET)
PUSH_API_MAX_SKEW = 300
PUSH_AUTH_VERIFY_URL = env_str("PUSH_AUTH_VERIFY_URL")
PUSH_AUTH_VERIFY_TOKEN = env_str("PUSH_AUTH_VERIFY_TOKEN")
PUSH_AUTH_VERIFY_TIMEOUT = float(env_str("PUSH_AUTH_VERIFY_TIMEOUT", "3"))
# Seconds a verified login stays cached, and a refused one (short: a user who
# just signed up must not wait long).
PUSH_LOGIN_CACHE_TTL = env_int("PUSH_LOGIN_CACHE_TTL", 300)
PUSH_LOGIN_NEGATIVE_CACHE_TTL = env_int("PUSH_LOGIN_NEGATIVE_CACHE_TTL", 10)
PUSH_IDLE_TIMEOUT = env_int("PUSH_IDLE_TIMEOUT", 180)
PUSH_MAX_CONNECTIONS = env_int("PUSH_MAX_CONNECTIONS", 10000)
PUSH_MAX_FRAME_BYTES = 64 * 1024
# Connections the kernel queues for daphne to accept (pushsite/server.py, item 9);
# Linux caps it at net.core.somaxconn.
PUSH_LISTEN_BACKLOG = env_int("PUSH_LISTEN_BACKLOG", 4096)
if not 1 <= PUSH_LISTEN_BACKLOG <= 65535:
    raise ImproperlyConfigured(f"PUSH_LISTEN_BACKLOG must be 1 to 65535, got {PUSH_LISTEN_BACKLOG}")
# Deepest JSON nesting a frame or a push API body may have (the outer object is
# 1); MariaDB's JSON column refuses documents from depth 32 on.
PUSH_MAX_JSON_DEPTH = env_int("PUSH_MAX_JSON_DEPTH", 20)
# What may wait in the process for a client that does not read before it is dropped.
PUSH_MAX_PENDING_BYTES = env_int("PUSH_MAX_PENDING_BYTES", 1024 * 1024)
# Sockets one uid may hold across all nodes (tabs, devices); a login past it kicks the oldest (KICK 4001).
PUSH_MAX_SOCKETS_PER_USER = env_int("PUSH_MAX_SOCKETS_PER_USER", 32)
# Login attempts that reach the main site (connections/throttle.py): a token
# bucket per client address and one per server process; a refusal costs two.
# The test profile starts high, because every test client shares loopback;
# the tests of the limits set them.
_LIMIT_SCALE = 1000 if PUSH_ENV == "test" else 1
PUSH_LOGIN_RATE_PER_ADDRESS = float(env_str("PUSH_LOGIN_RATE_PER_ADDRESS", str(1 * _LIMIT_SCALE)))
PUSH_LOGIN_BURST_PER_ADDRESS = env_int("PUSH_LOGIN_BURST_PER_ADDRESS", 20 * _LIMIT_SCALE)
PUSH_LOGIN_RATE_PER_NODE = float(env_str("PUSH_LOGIN_RATE_PER_NODE", str(200 * _LIMIT_SCALE)))
PUSH_LOGIN_BURST_PER_NODE = env_int("PUSH_LOGIN_BURST_PER_NODE", 1000 * _LIMIT_SCALE)
# Sockets not logged in that one client address may hold in one process.
PUSH_MAX_ANONYMOUS_PER_ADDRESS = env_int("PUSH_MAX_ANONYMOUS_PER_ADDRESS", 64 * _LIMIT_SCALE)
# Token bucket per socket: a steady rate and a burst allowance.
PUSH_FRAME_RATE = float(env_str("PUSH_FRAME_RATE", "20"))
PUSH_FRAME_BURST = env_int("PUSH_FRAME_BURST", 40)
# Threads that run a process's database and Redis calls (connections/bridge.py);
# each holds its own connections. SQLite always gets one. An API node answers
# with less waiting at 2 (bench/README.md, latency); daphne's logins want more.
PUSH_DB_THREADS = env_int("PUSH_DB_THREADS", 8)
if not 1 <= PUSH_DB_THREADS <= 64:
    raise ImproperlyConfigured(f"PUSH_DB_THREADS must be 1 to 64, got {PUSH_DB_THREADS}")
# "hub": one bus subscription per process, frames written straight to local
# sockets. "layer": the stock Channels group_send path, kept for comparison.
PUSH_FANOUT = env_str("PUSH_FANOUT", "hub")
if PUSH_FANOUT not in {"hub", "layer"}:
    raise ImproperlyConfigured(f"PUSH_FANOUT must be hub or layer, got {PUSH_FANOUT!r}")
# Push API limits; pushes to more uids than PUSH_API_INLINE_MAX_UIDS become jobs.
PUSH_API_MAX_UIDS = env_int("PUSH_API_MAX_UIDS", 10000)
PUSH_API_INLINE_MAX_UIDS = env_int("PUSH_API_INLINE_MAX_UIDS", 100)
PUSH_API_MAX_REQUEST_BYTES = 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = PUSH_API_MAX_REQUEST_BYTES
# Jobs run on Celery workers when a broker is configured, else in a thread of
# the server process (the embedded default has no worker running).
PUSH_JOBS = env_str("PUSH_JOBS", "celery" if (REDIS_URL or env_str("CELERY_BROKER_URL")) else "inline")
if PUSH_JOBS not in {"celery", "inline"}:
    raise ImproperlyConfigured(f"PUSH_JOBS must be celery or inline, got {PUSH_JOBS!r}")
PUSH_JOB_BATCH = env_int("PUSH_JOB_BATCH", 1000)
# Exactly-once pushes (notifications/idempotency.py): how long an accepted
# Idempotency-Key is answered as a duplicate, how long a retry waits for a
# first request with its key still being answered, and after how long such an
# unanswered claim counts as abandoned (its server died) and is taken over.
PUSH_IDEMPOTENCY_TTL = env_int("PUSH_IDEMPOTENCY_TTL", 86400)
PUSH_IDEMPOTENCY_WAIT = float(env_str("PUSH_IDEMPOTENCY_WAIT", "5"))
PUSH_IDEMPOTENCY_CLAIM_TIMEOUT = env_int("PUSH_IDEMPOTENCY_CLAIM_TIMEOUT", 30)
# Unsent messages delivered at login, oldest first; the rest wait for the next run.
PUSH_LOGIN_REPLAY_LIMIT = env_int("PUSH_LOGIN_REPLAY_LIMIT", 100)
# Logins that wait together are written and read as one batch (connections/logins.py).
PUSH_LOGIN_BATCH = env_int("PUSH_LOGIN_BATCH", 500)
if not 1 <= PUSH_LOGIN_BATCH <= 5000:
    raise ImproperlyConfigured(f"PUSH_LOGIN_BATCH must be 1 to 5000, got {PUSH_LOGIN_BATCH}")
# Admission control: when logins have waited this long for their batch, a new
# socket gets KICK 503 with retry_after (at most PUSH_LOGIN_RETRY_AFTER_MAX s).
PUSH_LOGIN_MAX_WAIT = float(env_str("PUSH_LOGIN_MAX_WAIT", "2"))
PUSH_LOGIN_RETRY_AFTER_MAX = env_int("PUSH_LOGIN_RETRY_AFTER_MAX", 30)
PUSH_NODE_ID = env_str("PUSH_NODE_ID")
# A node id names its bus channel and starts its connection ids and presence
# values ("<node> <client_type> <epoch>"): no spaces, and it must fit the column.
if PUSH_NODE_ID and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", PUSH_NODE_ID):
    raise ImproperlyConfigured(
        f"PUSH_NODE_ID must be 1 to 64 characters from A-Z a-z 0-9 _ . : -, got {PUSH_NODE_ID!r}"
    )
PUSH_NODE_HEARTBEAT = env_int("PUSH_NODE_HEARTBEAT", 10)
# A node whose liveness mark is older than this is dead; its relation rows go.
PUSH_NODE_DEAD_AFTER = env_int("PUSH_NODE_DEAD_AFTER", 35)
PUSH_REDIS_PREFIX = env_str("PUSH_REDIS_PREFIX", "pushsite")
PUSH_WS_PUBLIC_URL = env_str("PUSH_WS_PUBLIC_URL")
# Peers whose X-Forwarded-For is believed (pushsite/clientaddr.py): CIDRs.
PUSH_TRUSTED_PROXIES = env_list("PUSH_TRUSTED_PROXIES", ["127.0.0.0/8", "::1/128"])
# GET /metrics: loopback clients, or anyone sending this as a Bearer token.
PUSH_METRICS_TOKEN = env_str("PUSH_METRICS_TOKEN")
# Celery workers serve /metrics on this port when it is set (0: off).
PUSH_METRICS_PORT = env_int("PUSH_METRICS_PORT", 0)
# host:port of the nodes, API nodes and workers whose /metrics push_status and
# the admin's node page read (the figures Prometheus scrapes), comma-separated.
PUSH_METRICS_TARGETS = env_list("PUSH_METRICS_TARGETS", [])
# "text" (the default) or "json": one JSON object per log line.
PUSH_LOG_FORMAT = env_str("PUSH_LOG_FORMAT", "text")
if PUSH_LOG_FORMAT not in {"text", "json"}:
    raise ImproperlyConfigured(f"PUSH_LOG_FORMAT must be text or json, got {PUSH_LOG_FORMAT!r}")
# gen-0, gen-1, gen-2 thresholds of the server's garbage collector; empty keeps
# Python's. "50000,20,20" raised fan-out at 10k sockets but let memory drift
# +17 % over a 5-minute churn run (bench/soak.py); Python's stayed within 0.4 %.
PUSH_GC_THRESHOLD = tuple(int(x) for x in env_list("PUSH_GC_THRESHOLD", []))
PUSH_ALLOWED_ORIGINS = env_list("PUSH_ALLOWED_ORIGINS", [] if PRODUCTION else ["*"])

# --- Production ------------------------------------------------------------

if PRODUCTION:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_REDIRECT_EXEMPT = [r"^api/", r"^healthz$"]

    _problems = []
    if DEBUG:
        _problems.append("DJANGO_DEBUG is on")
    if SECRET_KEY == DEV_SECRET_KEY or len(SECRET_KEY) < 50:
        _problems.append("DJANGO_SECRET_KEY is unset or shorter than 50 characters")
    if PUSH_API_SECRET == DEV_PUSH_API_SECRET or len(PUSH_API_SECRET) < 16:
        _problems.append("PUSH_API_SECRET is unset or shorter than 16 characters")
    if not PUSH_AUTH_VERIFY_URL or not PUSH_AUTH_VERIFY_TOKEN:
        _problems.append(
            "PUSH_AUTH_VERIFY_URL and PUSH_AUTH_VERIFY_TOKEN are required (the development login verifier is refused)"
        )
    elif urlsplit(PUSH_AUTH_VERIFY_URL).scheme not in {"http", "https"}:
        _problems.append("PUSH_AUTH_VERIFY_URL must be an http(s) URL")
    if not ALLOWED_HOSTS:
        _problems.append("DJANGO_ALLOWED_HOSTS is unset")
    if _problems:
        raise ImproperlyConfigured("PUSH_ENV=production refuses to start: " + "; ".join(_problems))
