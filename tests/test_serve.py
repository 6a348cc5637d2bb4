"""scripts/serve.sh as a user runs it: the whole service under honcho, then stopped.

serve.sh runs daphne, an API node, a Celery worker and Celery beat
(deploy/Procfile.local), and with ``--nginx`` also nginx at one address. Each
test starts the script itself, in a session of its own, as the local profile
(the development verifier logs ``dev-<uid>`` in) with a MariaDB database of its
own (``pushsite_serve_test``, created by scripts/services.sh through
PUSH_CREATE_DATABASES, migrated by the script, dropped here), Redis database 14,
and a key prefix and Celery queue of its own.

What they prove: the API node names daphne's (or nginx's) address in
/api/push/config; a personal notice, a system notice and a push to 150 uids
reach a socket, the last two through the worker; a schedule fires through beat;
and SIGTERM to the script leaves no process of it running: none in its session
or in any session honcho started (the worker's pool children included), none
carrying its environment, none on its ports.

Real configuration only: the script runs on the suite's MariaDB and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import MySQLdb
import pytest
import redis
import websockets

from notifications.client import PushClient
from tests.conftest import REAL_BACKENDS
from tests.servers import ROOT, free_port

pytestmark = [
    pytest.mark.slow,
    # The first run migrates a fresh database and creates the 128 shard tables.
    pytest.mark.timeout(600),
    pytest.mark.skipif(not REAL_BACKENDS, reason="serve.sh runs the real configuration (MariaDB and Redis)"),
]

DATABASE = "pushsite_serve_test"
REDIS_DB = 14  # the suite's is 15
NUL = b"\0"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# Variables of the suite's own configuration: the script gets none of them.
SUITE_PREFIXES = ("PUSH_", "DJANGO_", "CELERY_", "DB_")
SUITE_NAMES = {"DATABASE_URL", "REDIS_URL", "HOST", "PORT", "API_PORT", "NGINX_PORT", "PYTEST_CURRENT_TEST"}


def mariadb() -> Any:
    url = urlsplit(os.environ["DATABASE_URL"])
    return MySQLdb.connect(
        host=url.hostname or "127.0.0.1",
        port=url.port or 3306,
        user=unquote(url.username or "root"),
        password=unquote(url.password or ""),
    )


@pytest.fixture(scope="module")
def serve_database() -> Iterator[str]:
    """The URL of a database that does not exist yet: serve.sh creates and migrates it."""

    def drop() -> None:
        connection = mariadb()
        try:
            connection.cursor().execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
        finally:
            connection.close()

    drop()
    yield urlunsplit(urlsplit(os.environ["DATABASE_URL"])._replace(path=f"/{DATABASE}"))
    drop()


def proc_entries() -> Iterator[tuple[int, int, int, bytes, bytes]]:
    """Every live process: pid, process group, session, command line, environment."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if fields[0] == "Z":
            continue  # exited, waiting to be reaped
        yield int(entry.name), int(fields[2]), int(fields[3]), cmdline, environ


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def get_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status


class Served:
    """One run of scripts/serve.sh, with its environment, ports and log."""

    def __init__(self, *args: str, database_url: str) -> None:
        self.args = args
        self.tag = f"pushserve-{uuid.uuid4().hex[:10]}"
        self.port, self.api_port, self.nginx_port = free_port(), free_port(), free_port()
        self.secret = secrets.token_hex(16)
        self.work = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.log = self.work / "serve.log"
        self.redis_url = urlunsplit(urlsplit(os.environ["REDIS_URL"])._replace(path=f"/{REDIS_DB}"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(SUITE_PREFIXES) and k not in SUITE_NAMES}
        self.env.update(
            {
                "PUSH_ENV": "local",
                "DATABASE_URL": database_url,
                "PUSH_CREATE_DATABASES": DATABASE,
                "REDIS_URL": self.redis_url,
                "PUSH_REDIS_PREFIX": self.tag,
                "PUSH_CELERY_QUEUE": self.tag,
                "PUSH_API_SECRET": self.secret,
                "PUSH_ADMIN_PASSWORD": secrets.token_urlsafe(12),
                "PUSH_VAR_DIR": str(self.work / "var"),
                "HOST": "127.0.0.1",
                "PORT": str(self.port),
                "API_PORT": str(self.api_port),
                "NGINX_PORT": str(self.nginx_port),
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.sessions: set[int] = set()

    @property
    def ports(self) -> list[int]:
        return [self.port, self.api_port, *([self.nginx_port] if "--nginx" in self.args else [])]

    def start(self, ready_timeout: float = 420) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(ROOT / "scripts/serve.sh"), *self.args],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.sessions.add(self.proc.pid)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.sh exited with {self.proc.returncode}:\n{self.output()}")
            self.sessions |= set(self.started().values())
            output = self.output(limit=None)
            if all(map(port_open, self.ports)) and " ready." in output and "beat: Starting" in output:
                return
            time.sleep(0.3)
        raise RuntimeError(f"serve.sh not ready after {ready_timeout}s:\n{self.output()}")

    def output(self, limit: int | None = 8000) -> str:
        text = self.log.read_text(errors="replace")
        return text[-limit:] if limit else text

    def started(self) -> dict[str, int]:
        """honcho's processes by name; each leads a session of its own, which its children share."""
        return {name: int(pid) for name, pid in re.findall(r"\| (\w+)\.1 started \(pid=(\d+)\)", self.output(None))}

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM to serve.sh's process only, as systemd or a shell's kill would send it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def survivors(self, wait: float = 15) -> list[str]:
        """Processes of this run still alive after waiting up to ``wait`` seconds."""
        marker = f"PUSH_REDIS_PREFIX={self.tag}".encode()
        deadline = time.monotonic() + wait
        while True:
            found = [
                f"{pid} {b' '.join(cmdline.split(NUL)).decode(errors='replace')}"
                for pid, pgrp, session, cmdline, environ in proc_entries()
                if pid != os.getpid()
                and (session in self.sessions or pgrp in self.sessions or marker in environ.split(NUL))
            ]
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.3)

    def cleanup(self) -> None:
        """Whatever a failed test left: killed, its Redis keys removed, its files deleted."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.terminate(timeout=20)
        for line in self.survivors(wait=0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        client = redis.Redis.from_url(self.redis_url)
        for key in client.scan_iter(match=f"*{self.tag}*"):
            client.delete(key)
        client.close()
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture
def serve(serve_database: str) -> Iterator[Callable[..., Served]]:
    runs: list[Served] = []

    def _serve(*args: str) -> Served:
        served = Served(*args, database_url=serve_database)
        runs.append(served)
        served.start()
        return served

    yield _serve
    for served in runs:
        served.cleanup()


def assert_stopped_by_sigterm(served: Served, names: set[str]) -> None:
    assert set(served.started()) == names, served.output()
    assert served.terminate() == 143, served.output()  # honcho's answer to SIGTERM: it got the signal
    assert served.survivors() == [], served.output()
    with pytest.raises(ProcessLookupError):
        os.killpg(served.proc.pid, 0)
    ports = "|".join(f"-p {port}|--port {port}|listen 127.0.0.1:{port}" for port in served.ports)
    found = subprocess.run(
        ["pgrep", "-af", "--", rf"({ports})( |$)|{served.tag}"], capture_output=True, text=True, check=False
    )
    assert found.returncode == 1, found.stdout
    assert not any(map(port_open, served.ports))


async def frame(ws: Any, timeout: float = 10) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def login(url: str, uid: int) -> Any:
    ws = await websockets.connect(url, open_timeout=10)
    await ws.send(json.dumps({"action": "login", "body": {"ukey": f"dev-{uid}"}, "seq": 1}))
    reply = await frame(ws)
    assert reply["code"] == 200, reply
    return ws


async def job_done(client: PushClient, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = (await asyncio.to_thread(client.job, job_id))["data"]
        if job["state"] == "done" or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.2)


def manage_shell(served: Served, code: str) -> str:
    """Run Python in a management shell with serve.sh's environment; its last line of output."""
    done = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "manage.py", "shell", "-v", "0", "-c", code],
        cwd=ROOT,
        env=served.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


SCHEDULE_AND_STORE = """
import json
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from connections.protocol import MsgType
from notifications.store import NewMessage, messages_store
every, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
PeriodicTask.objects.create(
    name="ServeTestPushUserNotice", task="notifications.push_unsent", interval=every,
    kwargs=json.dumps({"msg_type": int(MsgType.USER_NOTICE)}),
)
message = NewMessage(to_uid=UID, msg_type=MsgType.USER_NOTICE, body={"via": "beat"})
messages_store(messages=[message])
print(message.noce_ack)
"""


async def test_serve_runs_jobs_and_schedules_and_sigterm_stops_every_process(serve, new_uid):
    served = serve()
    api = PushClient(f"http://127.0.0.1:{served.api_port}", secret=served.secret)
    try:
        # Asked on the API node, the config names daphne, where sockets go.
        config = await asyncio.to_thread(get_json, f"http://127.0.0.1:{served.api_port}/api/push/config")
        assert config["ws_url"] == f"ws://127.0.0.1:{served.port}/ws/push/"
        uid = new_uid()
        ws = await login(config["ws_url"], uid)
        try:
            answer = await asyncio.to_thread(api.user_message, [uid], {"personal": 1})
            assert answer["code"] == 200 and answer["data"]["sent"] == 1, answer
            got = await frame(ws)
            assert (got["msg_type"], got["body"]) == (7, {"to_uid": uid, "personal": 1})

            answer = await asyncio.to_thread(api.system_message, {"notice": "everyone"})
            assert answer["code"] == 202, answer
            got = await frame(ws, timeout=30)
            assert (got["msg_type"], got["body"]) == (6, {"to_uid": uid, "notice": "everyone"})
            job = await job_done(api, answer["data"]["job_id"])
            assert job["state"] == "done" and job["sent"] == 1, job

            others = [new_uid() for _ in range(149)]
            answer = await asyncio.to_thread(api.user_message, [uid, *others], {"many": 150})
            assert answer["code"] == 202, answer  # more than 100 uids: a job for the worker
            got = await frame(ws, timeout=30)
            assert (got["msg_type"], got["body"]) == (7, {"to_uid": uid, "many": 150})
            job = await job_done(api, answer["data"]["job_id"])
            assert job["state"] == "done" and job["stored"] == 150 and job["sent"] == 1, job

            # Stored but never published, then a schedule added while beat runs:
            # beat picks it up from the database and the worker delivers the row.
            noce_ack = await asyncio.to_thread(manage_shell, served, SCHEDULE_AND_STORE.replace("UID", str(uid)))
            got = await frame(ws, timeout=40)
            assert (got["noce_ack"], got["body"]) == (noce_ack, {"to_uid": uid, "via": "beat"})
        finally:
            await ws.close()
        output = served.output(None)
        assert "Sending due task ServeTestPushUserNotice" in output
        assert re.search(r"worker\.1 +\| .*notifications\.run_push_job\[.*\] succeeded", output)
    finally:
        assert_stopped_by_sigterm(served, {"web", "api", "worker", "beat"})


async def test_serve_with_nginx_serves_sockets_api_and_admin_at_one_address(serve, new_uid):
    if not os.path.exists(NGINX):
        if os.environ.get("CI"):
            pytest.fail("nginx is needed (scripts/setup.sh --dev installs it)")
        pytest.skip("nginx not installed (scripts/setup.sh --dev or --nginx installs it)")
    served = serve("--nginx")
    base = f"http://127.0.0.1:{served.nginx_port}"
    try:
        for where in (base, f"http://127.0.0.1:{served.api_port}"):
            config = await asyncio.to_thread(get_json, f"{where}/api/push/config")
            assert config["ws_url"] == f"ws://127.0.0.1:{served.nginx_port}/ws/push/", where
        assert await asyncio.to_thread(get_status, f"{base}/admin/login/") == 200
        uid = new_uid()
        ws = await login(config["ws_url"], uid)
        try:
            api = PushClient(base, secret=served.secret)
            answer = await asyncio.to_thread(api.user_message, [uid], {"via": "nginx"})
            assert answer["code"] == 200 and answer["data"]["sent"] == 1, answer
            got = await frame(ws)
            assert (got["msg_type"], got["body"]) == (7, {"to_uid": uid, "via": "nginx"})
        finally:
            await ws.close()
    finally:
        assert_stopped_by_sigterm(served, {"web", "api", "worker", "beat", "nginx"})
