"""Real server processes for tests: daphne nodes, API nodes and Celery workers.

Each process gets the environment of the test's own configuration: the test
database pytest-django created (so rows written by the process are visible to
the test), the same Redis, the test's Redis key prefix and the local verify
server. Logs go to a file that is printed when the process fails to start.

``server_env`` needs MariaDB (it copies the test's settings). Processes that run
in both configurations take ``configuration_environment`` instead, and
``prepare_server_database`` gives them a migrated SQLite file of their own when
the test database lives in memory (tests/connections/test_daphne.py,
tests/e2e/test_demo_browser.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def database_url(alias: str = "default") -> str:
    """A URL for the database the test run uses (pytest-django's test database)."""
    db = settings.DATABASES[alias]
    if db["ENGINE"] != "django.db.backends.mysql":
        raise RuntimeError("server processes share the database only in the MariaDB configuration")
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"mysql://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 3306}/{db['NAME']}"


def server_env(**overrides: Any) -> dict[str, str]:
    """The environment of a pushsite process that shares this test's backends."""
    env = dict(os.environ)
    env.update(
        {
            "PUSH_ENV": "test",
            "DATABASE_URL": database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "PUSH_REDIS_PREFIX": settings.PUSH_REDIS_PREFIX,
            "PUSH_AUTH_VERIFY_URL": settings.PUSH_AUTH_VERIFY_URL,
            "PUSH_AUTH_VERIFY_TOKEN": settings.PUSH_AUTH_VERIFY_TOKEN,
            "PUSH_API_SECRET": settings.PUSH_API_SECRET,
            "PYTHONUNBUFFERED": "1",
        }
    )
    shard_urls = [database_url(alias) for alias in settings.PUSH_SHARD_DATABASES if alias != "default"]
    if shard_urls:
        env["PUSH_SHARD_DATABASE_URLS"] = ",".join(shard_urls)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def configuration_environment(
    var_dir: Path, *, push_env: str = "test", verify_url: str | None = None, verify_token: str = ""
) -> dict[str, str]:
    """The environment of a server sharing this test run's backends, and nothing else of the test's.

    Unlike ``server_env`` it keeps no ``PUSH_*`` setting of the test process, and it
    works in both configurations: with MariaDB the server uses the test databases
    (and Redis, if configured); embedded, it gets ``var_dir`` for its own SQLite
    file (see ``prepare_server_database``). Without ``verify_url`` a ``local``
    server uses the development login verifier.
    """
    drop = {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "PUSH_SHARD_DATABASE_URLS", "DJANGO_SETTINGS_MODULE"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PUSH_")}
    env.update(
        {
            "PUSH_ENV": push_env,
            "DJANGO_DEBUG": "false",
            "PYTHONUNBUFFERED": "1",
            "PUSH_VAR_DIR": str(var_dir),
        }
    )
    if verify_url:
        env.update({"PUSH_AUTH_VERIFY_URL": verify_url, "PUSH_AUTH_VERIFY_TOKEN": verify_token})
    if settings.DATABASES["default"]["ENGINE"] == "django.db.backends.mysql":
        # pytest-django has switched NAME to the test database: the server must use it too.
        env["DATABASE_URL"] = database_url()
        shard_urls = [database_url(alias) for alias in settings.PUSH_SHARD_DATABASES if alias != "default"]
        if shard_urls:
            env["PUSH_SHARD_DATABASE_URLS"] = ",".join(shard_urls)
    if settings.REDIS_URL:
        env["REDIS_URL"] = settings.REDIS_URL
    return env


def prepare_server_database(env: dict[str, str]) -> Path | None:
    """Embedded: migrate the servers' own SQLite file and return its path; None with MariaDB.

    The test's SQLite database lives in memory, so processes cannot share it.
    """
    if "DATABASE_URL" in env:
        return None
    subprocess.run(
        [str(BIN / "python"), "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    sqlite_path = Path(env["PUSH_VAR_DIR"]) / "pushsite.sqlite3"
    assert sqlite_path.exists()
    return sqlite_path


class ServerProcess:
    """A child process with a log file; stopped (or killed) at the end."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], port: int | None = None) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.port = port
        self.log = Path(tempfile.mkstemp(prefix=f"pushsite-{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 30) -> ServerProcess:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {ready_timeout}s:\n{self.output()}")

    def ready(self) -> bool:
        if self.port is None:
            return True
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
            return True
        return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        """SIGKILL: the process dies without any cleanup, as in a crash."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def daphne_with(name: str, env: dict[str, str]) -> ServerProcess:
    """A daphne process on a free port with exactly this environment."""
    port = free_port()
    daphne_bin = str(BIN / "daphne")
    return ServerProcess(name, [daphne_bin, "-b", "127.0.0.1", "-p", str(port), "pushsite.asgi:application"], env, port)


def daphne(name: str = "daphne", **env: Any) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        name,
        [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "pushsite.asgi:application"],
        server_env(**env),
        port=port,
    )


def api_node(name: str = "api", **env: Any) -> ServerProcess:
    """An API node: uvicorn + httptools, HTTP only, as deploy/systemd/pushsite-api@.service runs it."""
    port = free_port()
    return ServerProcess(
        name,
        [str(BIN / "uvicorn"), "pushsite.asgi:application", "--no-proxy-headers", "--ws", "none", "--http", "httptools",
         "--lifespan", "off", "--no-access-log", "--host", "127.0.0.1", "--port", str(port)],
        server_env(**{"PUSH_DB_THREADS": "2", **env}),
        port=port,
    )  # fmt: skip


class WorkerProcess(ServerProcess):
    """A Celery worker; ready once it says so in its log."""

    def ready(self) -> bool:
        return "ready." in self.log.read_text(errors="replace")


def celery_worker(name: str = "worker", **env: Any) -> WorkerProcess:
    return WorkerProcess(
        name,
        [
            str(BIN / "celery"),
            "-A",
            "pushsite",
            "worker",
            "--pool=solo",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        server_env(**env),
    )


class BeatProcess(ServerProcess):
    """Celery beat with the database scheduler; ready once it has started."""

    def ready(self) -> bool:
        return "beat: Starting" in self.log.read_text(errors="replace")


def celery_beat(name: str = "beat", **env: Any) -> BeatProcess:
    return BeatProcess(
        name,
        [
            str(BIN / "celery"),
            "-A",
            "pushsite",
            "beat",
            "--loglevel=INFO",
            "--scheduler=django_celery_beat.schedulers:DatabaseScheduler",
            f"--pidfile={tempfile.mktemp(prefix='pushsite-beat-', suffix='.pid')}",
        ],
        server_env(**env),
    )


async def open_socket(node: Any, uid: int) -> Any:
    """A real WebSocket to a running node, logged in as uid through the test verifier."""
    ws = await websockets.connect(f"ws://127.0.0.1:{node.port}/ws/push/")
    await ws.send(json.dumps({"action": "login", "body": {"ukey": f"key-{uid}"}, "seq": 1}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert reply["code"] == 200, reply
    return ws
