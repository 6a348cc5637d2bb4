"""Settings from the environment (pushsite/settings.py), each case in a fresh process.

Guards the module's promises: ``PUSH_ENV=production`` refuses to start with
DEBUG on, development secrets or the development login verifier, and passes
Django's deployment checks when configured; the absence or presence of
``DATABASE_URL`` and ``REDIS_URL`` picks the embedded or the real backends.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REAL_BACKENDS
from tests.servers import BIN, ROOT, free_port

PYTHON = str(BIN / "python")

# Variables that choose a configuration: none of the test run's own may leak in.
CONFIG_PREFIXES = ("PUSH_", "DJANGO_", "DATABASE_URL", "REDIS_URL", "CELERY_", "DB_")

INSPECT = """
import json, django
django.setup()
from django.conf import settings
from django.core.cache import caches
from django.db import connections
from channels.layers import get_channel_layer
db = settings.DATABASES["default"]
print(json.dumps({
    "engine": db["ENGINE"],
    "name": str(db["NAME"]),
    "options": {k: v for k, v in db.get("OPTIONS", {}).items() if isinstance(v, (str, int))},
    "vendor": connections["default"].vendor,
    "layer_backend": settings.CHANNEL_LAYERS["default"]["BACKEND"],
    "layer_class": type(get_channel_layer()).__module__ + "." + type(get_channel_layer()).__name__,
    "cache_backend": settings.CACHES["default"]["BACKEND"],
    "cache_class": type(caches["default"]).__name__,
    "broker": settings.CELERY_BROKER_URL,
    "push_jobs": settings.PUSH_JOBS,
    "debug": settings.DEBUG,
    "push_env": settings.PUSH_ENV,
    "allowed_hosts": settings.ALLOWED_HOSTS,
    "idle": settings.PUSH_IDLE_TIMEOUT,
    "max_connections": settings.PUSH_MAX_CONNECTIONS,
    "db_threads": __import__("connections.bridge").bridge._db_threads(),
}))
"""


def clean_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CONFIG_PREFIXES)}
    env["PUSH_VAR_DIR"] = str(tmp_path / "var")
    env["DJANGO_SETTINGS_MODULE"] = "pushsite.settings"
    env.update(variables)
    return env


def production_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """A complete production environment, with some variables changed or removed ("" removes)."""
    complete = {
        "PUSH_ENV": "production",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(64),
        "PUSH_API_SECRET": secrets.token_hex(32),
        "PUSH_AUTH_VERIFY_URL": "https://www.example.com/api/push/verify",
        "PUSH_AUTH_VERIFY_TOKEN": secrets.token_hex(16),
        "DJANGO_ALLOWED_HOSTS": "push.example.com",
    }
    complete.update(variables)
    return clean_env(tmp_path, **{k: v for k, v in complete.items() if v != ""})


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run(env, "manage.py", *args)


def inspect(env: dict[str, str]) -> dict[str, Any]:
    result = run(env, "-c", INSPECT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The refusal message of a process that would not start."""
    assert result.returncode != 0, result.stdout
    assert "ImproperlyConfigured" in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


# --- production refuses to start ---------------------------------------------------


def test_complete_production_environment_passes_the_deployment_checks(tmp_path):
    result = manage(production_env(tmp_path), "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_settings_are_hardened(tmp_path):
    found = inspect(production_env(tmp_path))
    assert found["debug"] is False
    assert found["push_env"] == "production"
    assert found["allowed_hosts"] == ["push.example.com"]


@pytest.mark.parametrize(
    ("variables", "problem"),
    [
        ({"DJANGO_DEBUG": "true"}, "DJANGO_DEBUG is on"),
        ({"DJANGO_DEBUG": "1"}, "DJANGO_DEBUG is on"),
        ({"PUSH_API_SECRET": ""}, "PUSH_API_SECRET"),
        ({"PUSH_API_SECRET": "pushsite-development-api-secret"}, "PUSH_API_SECRET"),
        ({"PUSH_API_SECRET": "short-secret"}, "PUSH_API_SECRET"),
        ({"PUSH_AUTH_VERIFY_URL": ""}, "PUSH_AUTH_VERIFY_URL"),
        ({"PUSH_AUTH_VERIFY_TOKEN": ""}, "PUSH_AUTH_VERIFY_TOKEN"),
        ({"PUSH_AUTH_VERIFY_URL": "ftp://www.example.com/verify"}, "http(s) URL"),
        ({"DJANGO_SECRET_KEY": ""}, "DJANGO_SECRET_KEY"),
        ({"DJANGO_ALLOWED_HOSTS": ""}, "DJANGO_ALLOWED_HOSTS"),
    ],
    ids=[
        "debug-true",
        "debug-1",
        "no-api-secret",
        "development-api-secret",
        "short-api-secret",
        "no-verify-url",
        "no-verify-token",
        "verify-url-not-http",
        "no-secret-key",
        "no-allowed-hosts",
    ],
)
def test_production_refuses_to_start(tmp_path, variables, problem):
    message = refused(manage(production_env(tmp_path, **variables), "check"))
    assert "PUSH_ENV=production refuses to start" in message
    assert problem in message


def test_production_names_every_problem_at_once(tmp_path):
    message = refused(manage(clean_env(tmp_path, PUSH_ENV="production", DJANGO_DEBUG="true"), "check"))
    for problem in ("DJANGO_DEBUG", "DJANGO_SECRET_KEY", "PUSH_API_SECRET", "PUSH_AUTH_VERIFY_URL"):
        assert problem in message


def test_production_refusal_keeps_the_server_from_starting(tmp_path):
    env = production_env(tmp_path, DJANGO_DEBUG="true")
    result = subprocess.run(
        [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(free_port()), "pushsite.asgi:application"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "DJANGO_DEBUG is on" in refused(result)


@pytest.mark.parametrize("profile", ["local", "test"])
def test_development_profiles_start_without_secrets(tmp_path, profile):
    result = manage(clean_env(tmp_path, PUSH_ENV=profile), "check")
    assert result.returncode == 0, result.stderr


# --- values that are refused in any profile ---------------------------------------------


@pytest.mark.parametrize(
    ("variables", "fragment"),
    [
        ({"PUSH_ENV": "staging"}, "PUSH_ENV must be local, test or production, got 'staging'"),
        ({"PUSH_ENV": "Production"}, "PUSH_ENV must be"),
        ({"PUSH_IDLE_TIMEOUT": "three minutes"}, "PUSH_IDLE_TIMEOUT must be a whole number"),
        ({"PUSH_MAX_CONNECTIONS": "1e4"}, "PUSH_MAX_CONNECTIONS must be a whole number"),
        ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG must be true or false"),
        ({"PUSH_FANOUT": "broadcast"}, "PUSH_FANOUT must be hub or layer"),
        ({"PUSH_DB_THREADS": "0"}, "PUSH_DB_THREADS must be 1 to 64, got 0"),
        ({"PUSH_DB_THREADS": "two"}, "PUSH_DB_THREADS must be a whole number"),
        ({"PUSH_NODE_ID": "web 1"}, "PUSH_NODE_ID must be 1 to 64 characters"),
        ({"PUSH_NODE_ID": "n" * 65}, "PUSH_NODE_ID must be 1 to 64 characters"),
        ({"REDIS_URL": "redis+sentinel://127.0.0.1/mymaster"}, "REDIS_URL: a sentinel must be host:port"),
        ({"REDIS_URL": "redis+sentinel://127.0.0.1:26379"}, "REDIS_URL: redis+sentinel:// needs /<master name>"),
        ({"REDIS_URL": "redis+sentinel://127.0.0.1:26379/m/zero"}, "REDIS_URL: the database must be a number"),
        ({"REDIS_URL": "redis+sentinel://h:26379/m/0?sentinel_pass=x"}, "REDIS_URL: unknown option 'sentinel_pass'"),
        ({"CELERY_BROKER_URL": "redis+sentinel://h:1"}, "CELERY_BROKER_URL: redis+sentinel:// needs"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(tmp_path, variables, fragment):
    assert fragment in refused(manage(clean_env(tmp_path, **variables), "check"))


# --- which backends a configuration selects ------------------------------------------------


def test_embedded_default_selects_sqlite_in_memory_layer_and_local_cache(tmp_path):
    found = inspect(clean_env(tmp_path))
    assert found["engine"] == "django.db.backends.sqlite3" and found["vendor"] == "sqlite"
    assert Path(found["name"]) == tmp_path / "var" / "pushsite.sqlite3"
    assert found["layer_backend"] == "channels.layers.InMemoryChannelLayer"
    assert found["layer_class"] == "channels.layers.InMemoryChannelLayer"
    assert found["cache_backend"] == "django.core.cache.backends.locmem.LocMemCache"
    assert found["cache_class"] == "LocMemCache"
    assert found["broker"] == "filesystem://"
    assert found["push_jobs"] == "inline"
    assert found["push_env"] == "local" and found["debug"] is True
    assert (found["idle"], found["max_connections"]) == (180, 10000)
    assert found["db_threads"] == 1  # SQLite: one writer, one thread


def test_database_and_redis_urls_select_mysql_redis_layer_and_redis_cache(tmp_path):
    found = inspect(
        clean_env(
            tmp_path,
            DATABASE_URL="mysql://push:secret@db.internal:3307/pushsite",
            REDIS_URL="redis://redis.internal:6379/3",
            PUSH_IDLE_TIMEOUT="60",
            PUSH_MAX_CONNECTIONS="500",
            PUSH_DB_THREADS="2",
        )
    )
    assert found["engine"] == "django.db.backends.mysql" and found["vendor"] == "mysql"
    assert found["name"] == "pushsite"
    assert found["options"]["charset"] == "utf8mb4"
    assert "STRICT_TRANS_TABLES" in found["options"]["init_command"]
    assert found["options"]["connect_timeout"] > 0
    assert found["layer_backend"] == "channels_redis.core.RedisChannelLayer"
    assert found["layer_class"] == "channels_redis.core.RedisChannelLayer"
    assert found["cache_backend"] == "django.core.cache.backends.redis.RedisCache"
    assert found["cache_class"] == "RedisCache"
    assert found["broker"] == "redis://redis.internal:6379/3"
    assert found["push_jobs"] == "celery"
    assert (found["idle"], found["max_connections"]) == (60, 500)
    assert found["db_threads"] == 2


SHARD_ALIASES = """
import json, django
django.setup()
from django.conf import settings
keys = ("CONN_HEALTH_CHECKS", "CONN_MAX_AGE", "OPTIONS", "NAME", "HOST", "PORT")
print(json.dumps({alias: {k: db[k] for k in keys} for alias, db in settings.DATABASES.items()}))
"""


def test_shard_databases_keep_the_default_databases_connection_hygiene(tmp_path):
    """A shard alias pings a reused connection and times out like the default; only the address differs."""
    result = run(
        clean_env(
            tmp_path,
            DATABASE_URL="mysql://push@db.internal:3306/pushsite",
            PUSH_SHARD_DATABASE_URLS="mysql://push@db-a.internal:3307/shard_a,mysql://push@db-b.internal:3308/shard_b",
            DB_CONN_MAX_AGE="45",
        ),
        "-c",
        SHARD_ALIASES,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(found) == ["default", "shards0", "shards1"]
    default = found["default"]
    assert default["CONN_HEALTH_CHECKS"] is True and default["CONN_MAX_AGE"] == 45
    assert [(found[a]["NAME"], found[a]["HOST"], found[a]["PORT"]) for a in ("shards0", "shards1")] == [
        ("shard_a", "db-a.internal", 3307),
        ("shard_b", "db-b.internal", 3308),
    ]
    for alias in ("shards0", "shards1"):
        same = {k: found[alias][k] for k in ("CONN_HEALTH_CHECKS", "CONN_MAX_AGE", "OPTIONS")}
        assert same == {k: default[k] for k in same}, alias


def test_a_sentinel_url_reaches_the_layer_the_cache_the_broker_and_our_clients(tmp_path):
    code = """
import json, django
django.setup()
from django.conf import settings
from django.core.cache import caches
from pushsite.redis_client import get_redis
cache_pool = caches["default"]._cache._get_connection_pool(True)
ours = get_redis().connection_pool
def sentinel_password(options):
    retry = options["sentinel_kwargs"].pop("retry")
    assert retry._retries == 0, "a sentinel that fails is not asked again with backoff"
    return [type(retry).__module__, *options["sentinel_kwargs"].pop("credential_provider").get_credentials()]
hosts = settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"]
transport = dict(settings.CELERY_BROKER_TRANSPORT_OPTIONS)
print(json.dumps({
    "layer_sentinel_password": sentinel_password(hosts[0]),
    "transport_sentinel_password": sentinel_password(transport),
    "layer": hosts,
    "broker": settings.CELERY_BROKER_URL,
    "transport": transport,
    "cache_pool": [type(cache_pool).__name__, cache_pool.service_name, cache_pool.connection_kwargs.get("db")],
    "ours": [type(ours).__name__, ours.service_name, ours.connection_kwargs.get("db"),
             ours.connection_kwargs.get("password"),
             [[s.connection_pool.connection_kwargs.get(k) for k in ("host", "port", "socket_timeout")]
              + list(s.connection_pool.connection_kwargs["credential_provider"].get_credentials())
              + [s.get_retry()._retries]
              for s in ours.sentinel_manager.sentinels]],
    "cache_sentinels": [s.connection_pool.connection_kwargs["credential_provider"].get_credentials()
                        for s in cache_pool.sentinel_manager.sentinels],
}))
"""
    url = "redis+sentinel://:pa%3Ass@10.0.0.1:26379,10.0.0.2:26380/pushmaster/4?sentinel_password=s%26nt"
    result = run(clean_env(tmp_path, DATABASE_URL="mysql://root@127.0.0.1:3306/pushsite", REDIS_URL=url), "-c", code)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    (host,) = found["layer"]
    assert host["master_name"] == "pushmaster" and host["db"] == 4 and host["password"] == "pa:ss"
    assert host["sentinels"] == [["10.0.0.1", 26379], ["10.0.0.2", 26380]]
    # The sentinels' own password goes to the sentinels only, never into the master's URL.
    assert host["sentinel_kwargs"] == {"socket_connect_timeout": 1, "socket_timeout": 1}
    # channels-redis speaks asyncio, kombu does not: each gets the retry policy of its own redis-py clients.
    assert found["layer_sentinel_password"] == ["redis.asyncio.retry", "s&nt"]
    assert found["transport_sentinel_password"] == ["redis.retry", "s&nt"]
    assert found["broker"] == "sentinel://:pa%3Ass@10.0.0.1:26379/4;sentinel://:pa%3Ass@10.0.0.2:26380/4"
    assert found["transport"]["master_name"] == "pushmaster"
    assert found["cache_pool"] == ["SentinelConnectionPool", "pushmaster", 4]
    assert found["ours"][:4] == ["SentinelConnectionPool", "pushmaster", 4, "pa:ss"]
    assert found["ours"][4] == [["10.0.0.1", 26379, 1, "s&nt", 0], ["10.0.0.2", 26380, 1, "s&nt", 0]]
    assert found["cache_sentinels"] == [["s&nt"], ["s&nt"]]


def test_no_redis_error_of_a_sentinel_url_spells_out_its_passwords(tmp_path):
    # Sentinels that do not answer: every client's error names the master it looked for, and no secret.
    code = """
import asyncio, django
django.setup()
from django.core.cache import cache
from pushsite.redis_client import get_async_redis, get_redis
errors = []
for call in (get_redis().ping, lambda: cache.get("k")):
    try:
        call()
    except Exception as error:
        errors.append(repr(error) + str(error))
async def ping():
    try:
        await get_async_redis().ping()
    except Exception as error:
        errors.append(repr(error) + str(error))
asyncio.run(ping())
print(len(errors), all("pushmaster" in e for e in errors))
print("\\n".join(errors))
"""
    dead = [free_port() for _ in range(2)]
    url = (
        f"redis+sentinel://:m4ster-secret@127.0.0.1:{dead[0]},127.0.0.1:{dead[1]}/pushmaster/0"
        "?sentinel_password=s3ntinel-secret"
    )
    result = run(clean_env(tmp_path, DATABASE_URL="mysql://root@127.0.0.1:3306/pushsite", REDIS_URL=url), "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "3 True", result.stdout
    assert "secret" not in result.stdout + result.stderr


def test_database_url_alone_keeps_the_in_process_layer(tmp_path):
    found = inspect(clean_env(tmp_path, DATABASE_URL="mysql://root@127.0.0.1:3306/pushsite"))
    assert found["vendor"] == "mysql" and found["db_threads"] == 8
    assert found["layer_backend"] == "channels.layers.InMemoryChannelLayer"
    assert found["cache_class"] == "LocMemCache"


@pytest.mark.skipif(not REAL_BACKENDS, reason="needs MariaDB (the real configuration)")
def test_real_database_connection_uses_utf8mb4_and_strict_mode(tmp_path):
    env = clean_env(tmp_path, DATABASE_URL=os.environ["DATABASE_URL"])
    script = (
        "import django; django.setup()\n"
        "from django.db import connection\n"
        "with connection.cursor() as c:\n"
        "    c.execute('SELECT @@character_set_connection, @@sql_mode')\n"
        "    print(*c.fetchone(), sep='|')\n"
    )
    result = run(env, "-c", script)
    assert result.returncode == 0, result.stderr
    charset, sql_mode = result.stdout.strip().splitlines()[-1].split("|")
    assert charset == "utf8mb4"
    assert "STRICT_TRANS_TABLES" in sql_mode
