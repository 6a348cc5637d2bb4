"""Broadcast fan-out: pushsite's hub path against the stock Channels layer path.

Starts a real daphne (MariaDB + Redis), opens N real WebSocket clients in a
separate process, logs them all in, then publishes B broadcasts of one
notification to every online user through ``notifications.publish`` - the same
function the API and jobs use - and counts the frames that arrive.

    .venv/bin/python bench/fanout.py --sizes 1000 5000 --paths hub layer

Prints a table and writes bench/results/fanout.json and .md. Exits non-zero
when a client misses frames.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import resource
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
# A client that has received nothing for this long counts the rest as lost.
IDLE_GIVE_UP = 15.0


def raise_nofile() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far.

    On a loaded machine wall-clock rates swing with what else runs; the CPU a
    server spends per delivered frame does not, so both are reported.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


# --- client process ------------------------------------------------------------


def client_main(
    port: int, uids: list[int], expected: int, conn: mp.connection.Connection, record_latency: bool = False
) -> None:
    raise_nofile()
    asyncio.run(_client(port, uids, expected, conn, record_latency))


async def _client(
    port: int, uids: list[int], expected: int, conn: mp.connection.Connection, record_latency: bool
) -> None:
    import websockets

    latencies: list[float] = []
    received = 0
    done = asyncio.Event()
    first_at = last_at = 0.0

    ready = asyncio.Event()
    logged: list[int] = []
    started = time.perf_counter()
    handshakes = asyncio.Semaphore(200)  # connect in waves: a SYN flood helps nobody

    retried = 0

    async def connect() -> Any:
        # Like a real client: a handshake the server refused or let time out
        # (daphne rejects one still open after 5 s) is tried again, and counted.
        nonlocal retried
        for attempt in range(4):
            try:
                return await websockets.connect(
                    f"ws://127.0.0.1:{port}/ws/push/",
                    compression=None,
                    max_queue=None,
                    open_timeout=60,
                    ping_interval=None,  # one client process for thousands of sockets: its own pings would time out
                )
            except (OSError, TimeoutError, websockets.InvalidHandshake):
                if attempt == 3:
                    raise
                retried += 1
                await asyncio.sleep(1 + attempt)
        raise AssertionError("unreachable")

    async def one(uid: int) -> None:
        nonlocal received, first_at, last_at
        async with handshakes:
            ws = await connect()
            await ws.send(json.dumps({"action": "login", "body": {"ukey": f"dev-{uid}"}}))
            reply = json.loads(await ws.recv())
        if reply["code"] != 200:
            raise RuntimeError(f"login failed: {reply}")
        logged.append(uid)
        if len(logged) == len(uids):
            ready.set()
        try:
            async for message in ws:
                now = time.perf_counter()
                if not received:
                    first_at = now
                received += 1
                last_at = now
                if record_latency:
                    body = json.loads(message)["body"]
                    if not body.get("warm"):  # a latency case's warm-up push: counted, not timed
                        latencies.append(now - body["t"])
                if received >= expected:
                    done.set()
        finally:
            await ws.close()

    tasks = [asyncio.create_task(one(uid)) for uid in uids]
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task.done() and task.exception():
            conn.send({"error": repr(task.exception())})
            return
    await ready.wait()
    conn.send({"ready": time.perf_counter() - started, "retried": retried})
    conn.recv()  # "go"
    # Done when everything arrived, or when nothing has for a while (lost).
    waited_from = time.perf_counter()
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=1)
        quiet_since = max(last_at, waited_from)
        if time.perf_counter() - quiet_since > IDLE_GIVE_UP:
            break
    conn.send(
        {
            "received": received,
            "first_at": first_at,
            "last_at": last_at,
            "now": time.perf_counter(),
            "latencies": latencies,
        }
    )
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- orchestration ----------------------------------------------------------------


def server_env(fanout: str, prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PUSH_ENV": "local",  # the development login verifier: login keys dev-<uid>
            # DEBUG would keep a log of every query on every connection.
            "DJANGO_DEBUG": "false",
            "DATABASE_URL": env.get("DATABASE_URL", "mysql://root@127.0.0.1:3306/pushsite"),
            "REDIS_URL": env.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            "PUSH_FANOUT": fanout,
            "PUSH_REDIS_PREFIX": prefix,
            "PUSH_MAX_CONNECTIONS": "100000",
            "PUSH_IDLE_TIMEOUT": "3600",
            "PUSH_FRAME_RATE": "1000",
            "PUSH_FRAME_BURST": "1000",
            "PUSH_LOG_LEVEL": "WARNING",
            # Every benchmark client comes from 127.0.0.1, 200 handshakes in
            # flight; a site's clients come from many addresses.
            "PUSH_MAX_ANONYMOUS_PER_ADDRESS": "1000000",
        }
    )
    return env


class Server:
    """A server under test: pushsite on daphne (hub or layer path) or the plain-asyncio reference."""

    def __init__(self, kind: str, prefix: str | None = None, name: str | None = None, **extra_env: str) -> None:
        self.kind = kind
        self.prefix = prefix or f"bench-{uuid.uuid4().hex[:8]}"  # nodes of one site share it
        self.port = free_port()
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.log = open(RESULTS / f"server-{name or kind}.log", "wb")  # noqa: SIM115 - closed in stop()
        if kind == "reference":
            args = [sys.executable, str(ROOT / "bench/reference.py"), str(self.port)]
            env = dict(os.environ)
        else:
            env = {**server_env(kind, self.prefix), **extra_env}
            os.environ.update({k: env[k] for k in ("DATABASE_URL", "REDIS_URL", "PUSH_FANOUT", "PUSH_REDIS_PREFIX")})
            args = [
                str(ROOT / ".venv/bin/daphne"),
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                # No access-log line per handshake: a log write per connect is
                # not what this measures (deploy/README.md on access logs).
                "-v",
                "0",
                "pushsite.asgi:application",
            ]
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, preexec_fn=raise_nofile, stdout=self.log, stderr=subprocess.STDOUT
        )
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{kind} server did not start")

    def rss(self) -> int:
        return rss_kib(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def broadcast(self, uids: list[int], broadcasts: int) -> float:
        """Ask for the broadcasts; returns when they are handed over (publish time)."""
        body = {"title": "bench", "text": "x" * 64}
        t0 = time.perf_counter()
        if self.kind == "reference":
            asyncio.run(self._control(body, broadcasts))
            return time.perf_counter() - t0
        from connections.protocol import MsgType
        from notifications.publish import publish_stored
        from notifications.store import NewMessage

        django_setup(self)
        for b in range(broadcasts):
            publish_stored(
                messages=[
                    NewMessage(to_uid=uid, msg_type=MsgType.SYSTEM_NOTICE, body=body, noce_ack=f"b{b}-{uid}")
                    for uid in uids
                ]
            )
        return time.perf_counter() - t0

    async def _control(self, body: dict, broadcasts: int) -> None:
        import websockets

        async with websockets.connect(f"ws://127.0.0.1:{self.port}/control") as ws:
            await ws.send(json.dumps({"body": body, "broadcasts": broadcasts}))
            await ws.recv()

    def stop(self) -> None:
        stop_process(self.proc, self.log)


def stop_process(proc: subprocess.Popen, log: Any) -> None:
    """SIGTERM, then SIGKILL after 10 s; close its log."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def django_setup(server: Server | None = None) -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsite.settings")
    django.setup()
    if server is not None:
        from django.conf import settings

        settings.PUSH_FANOUT = server.kind
        settings.PUSH_REDIS_PREFIX = server.prefix


def start_clients(
    server: Server, sockets: int, expected: int, record_latency: bool = False, uid_base: int = 10_000_000
):
    """Open and log in the clients in their own process; returns (process, pipe, hello)."""
    uids = list(range(uid_base, uid_base + sockets))
    parent, child = mp.Pipe()
    client = mp.Process(target=client_main, args=(server.port, uids, expected, child, record_latency))
    client.start()
    hello = parent.recv()
    if "error" in hello:
        raise RuntimeError(hello["error"])
    return client, parent, uids, hello


WARM_UP_SOCKETS = 50


async def warm_up(port: int, sockets: int) -> None:
    """Connect, log in and close a few sockets before the baseline RSS is read.

    The first socket makes the server start what every later one shares (the
    hub, database threads and their connections, the bus subscription, lazy
    imports). Counted in the baseline, not divided among the measured sockets.
    """
    import websockets

    for n in range(sockets):
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/push/", compression=None, open_timeout=60) as ws:
            await ws.send(json.dumps({"action": "login", "body": {"ukey": f"dev-{9_000_000 + n}"}}))
            await ws.recv()


def run_case(kind: str, sockets: int, broadcasts: int) -> dict[str, object]:
    """Connect and log in N sockets, then B broadcasts to all of them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    server = Server(kind)
    try:
        asyncio.run(warm_up(server.port, WARM_UP_SOCKETS))
        time.sleep(1.0)
        base_rss = server.rss()
        progress(f"{kind}: connecting and logging in {sockets} sockets")
        client, pipe, uids, hello = start_clients(server, sockets, sockets * broadcasts)
        time.sleep(1.0)
        idle_rss = server.rss()
        progress(f"{kind}: {broadcasts} broadcasts to {sockets} sockets")
        pipe.send("go")
        t0 = time.perf_counter()
        cpu0 = server.cpu()
        publish_s = server.broadcast(uids, broadcasts)
        result = pipe.recv()
        cpu_s = server.cpu() - cpu0
        client.join(30)
        # The client's clock and ours are the same monotonic clock on one machine.
        elapsed = result["last_at"] - t0 if result["received"] else float("nan")
        expected = sockets * broadcasts
        return {
            "path": kind,
            "sockets": sockets,
            "broadcasts": broadcasts,
            "expected": expected,
            "received": result["received"],
            "lost": expected - result["received"],
            "seconds": round(elapsed, 3),
            "msgs_per_s": round(result["received"] / elapsed) if result["received"] else 0,
            "publish_s": round(publish_s, 3),
            # Only the broadcast phase; the idle tail after the last frame adds a little.
            "server_cpu_us_per_msg": round(cpu_s * 1e6 / result["received"], 1) if result["received"] else 0,
            "connect_login_s": round(hello["ready"], 2),
            "logins_per_s": round(sockets / hello["ready"]),
            "handshakes_retried": hello["retried"],
            "kib_per_socket": round((idle_rss - base_rss) / sockets, 1),
        }
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--paths", nargs="+", default=["hub", "layer"], choices=["hub", "layer", "reference"])
    parser.add_argument("--broadcasts", type=int, default=20)
    parser.add_argument(
        "--layer-broadcasts", type=int, default=5, help="fewer for the stock path: it is slow, the figure is a rate"
    )
    parser.add_argument("--out", default="fanout")
    args = parser.parse_args()
    raise_nofile()
    rows = []
    for sockets in args.sizes:
        for path in args.paths:
            row = run_case(path, sockets, args.layer_broadcasts if path == "layer" else args.broadcasts)
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(rows, indent=2))
    header = (
        "| path | sockets | delivered msgs/s | server CPU µs/msg | lost | publish s | KiB/socket |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r['path']} | {r['sockets']} | {r['msgs_per_s']} | {r['server_cpu_us_per_msg']} | {r['lost']} "
        f"| {r['publish_s']} | {r['kib_per_socket']} |"
        for r in rows
    ]
    table = header + "\n".join(lines) + "\n"
    (RESULTS / f"{args.out}.md").write_text(table)
    print(table)
    return 1 if any(r["lost"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
