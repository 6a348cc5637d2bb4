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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


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


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


# --- client process ------------------------------------------------------------


def client_main(port: int, uids: list[int], expected: int, conn: mp.connection.Connection) -> None:
    raise_nofile()
    asyncio.run(_client(port, uids, expected, conn))


async def _client(port: int, uids: list[int], expected: int, conn: mp.connection.Connection) -> None:
    import websockets

    received = 0
    done = asyncio.Event()
    first_at = last_at = 0.0

    ready = asyncio.Event()
    logged: list[int] = []
    started = time.perf_counter()
    handshakes = asyncio.Semaphore(200)  # connect in waves: a SYN flood helps nobody

    async def one(uid: int) -> None:
        nonlocal received, first_at, last_at
        async with handshakes:
            ws = await websockets.connect(
                f"ws://127.0.0.1:{port}/ws/push/", compression=None, max_queue=None, open_timeout=60
            )
            await ws.send(json.dumps({"action": "login", "body": {"ukey": f"dev-{uid}"}}))
            reply = json.loads(await ws.recv())
        if reply["code"] != 200:
            raise RuntimeError(f"login failed: {reply}")
        logged.append(uid)
        if len(logged) == len(uids):
            ready.set()
        try:
            async for _ in ws:
                now = time.perf_counter()
                if not received:
                    first_at = now
                received += 1
                last_at = now
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
    conn.send({"ready": time.perf_counter() - started})
    conn.recv()  # "go"
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout=300)
    conn.send({"received": received, "first_at": first_at, "last_at": last_at, "now": time.perf_counter()})
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- orchestration ----------------------------------------------------------------


def server_env(fanout: str, prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PUSH_ENV": "local",
            "DATABASE_URL": env.get("DATABASE_URL", "mysql://root@127.0.0.1:3306/pushsite"),
            "REDIS_URL": env.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            "PUSH_FANOUT": fanout,
            "PUSH_REDIS_PREFIX": prefix,
            "PUSH_MAX_CONNECTIONS": "100000",
            "PUSH_IDLE_TIMEOUT": "3600",
            "PUSH_FRAME_RATE": "1000",
            "PUSH_FRAME_BURST": "1000",
            "PUSH_LOG_LEVEL": "WARNING",
        }
    )
    return env


def run_case(fanout: str, sockets: int, broadcasts: int) -> dict[str, object]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    env = server_env(fanout, prefix)
    os.environ.update({k: env[k] for k in ("DATABASE_URL", "REDIS_URL", "PUSH_FANOUT", "PUSH_REDIS_PREFIX")})
    port = free_port()
    server = subprocess.Popen(
        [str(ROOT / ".venv/bin/daphne"), "-b", "127.0.0.1", "-p", str(port), "pushsite.asgi:application"],
        cwd=ROOT,
        env=env,
        preexec_fn=raise_nofile,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        base_rss = rss_kib(server.pid)
        uids = list(range(10_000_000, 10_000_000 + sockets))
        parent, child = mp.Pipe()
        client = mp.Process(target=client_main, args=(port, uids, sockets * broadcasts, child))
        client.start()
        progress(f"{fanout}: connecting and logging in {sockets} sockets")
        hello = parent.recv()
        if "error" in hello:
            raise RuntimeError(hello["error"])
        time.sleep(1.0)
        idle_rss = rss_kib(server.pid)

        import django

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsite.settings")
        django.setup()
        from django.conf import settings

        settings.PUSH_FANOUT = fanout
        settings.PUSH_REDIS_PREFIX = prefix
        from connections.protocol import MsgType
        from notifications.publish import publish_stored
        from notifications.store import NewMessage

        body = {"title": "bench", "text": "x" * 64}
        batches = [
            [NewMessage(to_uid=uid, msg_type=MsgType.SYSTEM_NOTICE, body=body, noce_ack=f"b{b}-{uid}") for uid in uids]
            for b in range(broadcasts)
        ]
        progress(f"{fanout}: publishing {broadcasts} broadcasts to {sockets} sockets")
        parent.send("go")
        t0 = time.perf_counter()
        for batch in batches:
            publish_stored(messages=batch)
        publish_s = time.perf_counter() - t0
        result = parent.recv()
        client.join(30)
        # Client clock and ours are the same monotonic clock on one machine.
        elapsed = result["last_at"] - t0 if result["received"] else float("nan")
        expected = sockets * broadcasts
        return {
            "path": fanout,
            "sockets": sockets,
            "broadcasts": broadcasts,
            "expected": expected,
            "received": result["received"],
            "lost": expected - result["received"],
            "seconds": round(elapsed, 3),
            "msgs_per_s": round(result["received"] / elapsed) if result["received"] else 0,
            "publish_s": round(publish_s, 3),
            "connect_login_s": round(hello["ready"], 2),
            "kib_per_socket": round((idle_rss - base_rss) / sockets, 1),
        }
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--paths", nargs="+", default=["hub", "layer"], choices=["hub", "layer"])
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
    header = "| path | sockets | delivered msgs/s | lost | publish s | KiB/socket |\n|---|---:|---:|---:|---:|---:|\n"
    lines = [
        f"| {r['path']} | {r['sockets']} | {r['msgs_per_s']} | {r['lost']} | {r['publish_s']} | {r['kib_per_socket']} |"
        for r in rows
    ]
    table = header + "\n".join(lines) + "\n"
    (RESULTS / f"{args.out}.md").write_text(table)
    print(table)
    return 1 if any(r["lost"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
