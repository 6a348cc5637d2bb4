"""Soak: sockets churn against one daphne for a long time; its memory must stay flat.

    .venv/bin/python bench/soak.py --minutes 10

Starts a real daphne on MariaDB and Redis (``DATABASE_URL``,
``PUSH_SHARD_DATABASE_URLS`` and ``REDIS_URL`` from the environment; the
database is migrated first), in the local profile so the login key
``dev-<uid>`` works, with DEBUG off so Django keeps no query log. A
population of ``--sockets`` sockets churns for the whole run: each one
connects, logs in as a random user of ``--users``, receives and acks its
pushes, and disconnects after a random lifetime (``--lifetime`` seconds on
average); another takes its place at once. Pushes go through the signed API
(``notifications.client.PushClient``) at ``--rate`` per second, each to one to
five random users, online or not. The server's RSS (``VmRSS``) is sampled
every ``--sample-every`` seconds.

Memory: the first 20 % of the run is warm-up. The drift is the median of the
last three samples against the median of the first three after warm-up; min,
max and last are over the samples after warm-up.

Delivery: every push the API answered with 2xx must be stored exactly once and
have reached its user, live on one of the user's sockets or still unread in
the store (what ``unread`` lists).

Prints a table, writes bench/results/soak.json and soak.md, and exits non-zero
when the drift exceeds ``--max-drift`` (5 %), an acknowledged push is missing,
or relation rows or presence entries are left after the last socket closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from bench.fanout import free_port, rss_kib  # noqa: E402

WARM_UP = 0.2
UID_BASE = 30_000_000


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


# --- the server ------------------------------------------------------------------


class Server:
    """One daphne node of the local profile on the configured MariaDB and Redis."""

    def __init__(self, extra_env: dict[str, str]) -> None:
        self.prefix = f"soak-{uuid.uuid4().hex[:8]}"
        self.node = self.prefix
        self.port = free_port()
        self.env = {
            **os.environ,
            "PUSH_ENV": "local",
            "DJANGO_DEBUG": "false",
            "DATABASE_URL": os.environ.get("DATABASE_URL", "mysql://root@127.0.0.1:3306/pushsite"),
            "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            "PUSH_REDIS_PREFIX": self.prefix,
            "PUSH_NODE_ID": self.node,
            "PUSH_JOBS": "inline",
            "PUSH_LOG_LEVEL": "WARNING",
            # Clients ack every push at once; the rate limit is not what is measured.
            "PUSH_FRAME_RATE": "1000",
            "PUSH_FRAME_BURST": "1000",
            "PUSH_MAX_ANONYMOUS_PER_ADDRESS": "1000000",  # all clients share 127.0.0.1
        }
        self.env.pop("PUSH_AUTH_VERIFY_URL", None)  # the development verifier takes dev-<uid>
        self.env.update(extra_env)
        self.log = Path(tempfile.mkstemp(prefix="pushsite-soak-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def migrate(self) -> None:
        """Migrate the main database and create the shard tables wherever they live."""
        for command in (["migrate", "--noinput"], ["init_push_tables"]):
            subprocess.run(
                [sys.executable, "manage.py", *command, "-v", "0"],
                cwd=ROOT,
                env=self.env,
                check=True,
                stdout=subprocess.DEVNULL,
            )

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(ROOT / ".venv/bin/daphne"), "-b", "127.0.0.1", "-p", str(self.port), "pushsite.asgi:application"],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        for _ in range(300):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"daphne did not start; see {self.log}")

    def rss(self) -> int:
        assert self.proc is not None
        return rss_kib(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def django(self) -> None:
        """Set up Django in this process on the server's backends (to push and to verify)."""
        os.environ.update({k: self.env[k] for k in ("DATABASE_URL", "REDIS_URL", "PUSH_REDIS_PREFIX")})
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsite.settings")
        import django

        django.setup()


# --- the churn ---------------------------------------------------------------------


class Churn:
    """Sockets that come and go, pushes that flow, and what each side saw."""

    def __init__(self, args: argparse.Namespace, server: Server, secret: str) -> None:
        from notifications.client import PushClient

        self.args = args
        self.server = server
        self.url = f"ws://127.0.0.1:{server.port}/ws/push/"
        self.api = PushClient(f"http://127.0.0.1:{server.port}", secret=secret, timeout=30)
        self.users = list(range(UID_BASE, UID_BASE + args.users))
        self.rng = random.Random(args.seed)
        self.counts: Counter[str] = Counter()
        self.open_sockets = 0
        self.live: dict[int, set[str]] = defaultdict(set)  # uid -> noce_acks that reached a socket
        self.acked: dict[int, set[str]] = defaultdict(set)  # uid -> noce_acks the API answered 2xx for
        self.samples: list[tuple[float, int]] = []
        self.stopping = False

    async def run(self) -> None:
        seconds = self.args.minutes * 60
        started = time.monotonic()
        clients = [asyncio.create_task(self.client()) for _ in range(self.args.sockets)]
        pusher = asyncio.create_task(self.pushes())
        sampler = asyncio.create_task(self.sample(started))
        await asyncio.sleep(seconds)
        pusher.cancel()
        await asyncio.gather(pusher, return_exceptions=True)
        await asyncio.sleep(2)  # the last pushes reach their sockets
        self.stopping = True
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)

    async def sample(self, started: float) -> None:
        next_report = 30.0
        while True:
            elapsed = time.monotonic() - started
            rss = self.server.rss()
            self.samples.append((round(elapsed, 1), rss))
            if elapsed >= next_report:
                next_report += 30
                progress(
                    f"{elapsed:5.0f}s rss {rss / 1024:.1f} MiB, open {self.open_sockets}, "
                    f"logins {self.counts['logins']}, pushes {self.counts['pushes_acked']}"
                )
            await asyncio.sleep(self.args.sample_every)

    async def client(self) -> None:
        import websockets

        loop = asyncio.get_running_loop()
        while not self.stopping:
            uid = self.rng.choice(self.users)
            lifetime = self.rng.expovariate(1 / self.args.lifetime)
            try:
                async with websockets.connect(self.url, open_timeout=30, max_queue=None, compression=None) as ws:
                    self.counts["connects"] += 1
                    self.open_sockets += 1
                    try:
                        await ws.send(json.dumps({"action": "login", "body": {"ukey": f"dev-{uid}"}}))
                        deadline = loop.time() + lifetime
                        while (left := deadline - loop.time()) > 0:
                            try:
                                text = await asyncio.wait_for(ws.recv(), left)
                            except TimeoutError:
                                break
                            await self.on_frame(ws, uid, json.loads(text))
                    finally:
                        self.open_sockets -= 1
                self.counts["disconnects"] += 1
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, websockets.ConnectionClosed) as error:
                self.counts[f"socket error {error.__class__.__name__}"] += 1
                await asyncio.sleep(0.5)

    async def on_frame(self, ws: Any, uid: int, frame: dict[str, Any]) -> None:
        msg_type = frame["msg_type"]
        if msg_type == 1:
            self.counts["logins"] += 1
        elif msg_type in (5, 6, 7):
            self.live[uid].add(frame["noce_ack"])
            self.counts["frames_live"] += 1
            await ws.send(json.dumps({"action": "ack", "body": {"noce_ack": frame["noce_ack"]}}))
        elif msg_type == 4:
            self.counts["acks_answered"] += 1
        elif msg_type in (9, 10):
            self.counts[f"refused {frame['code']}"] += 1

    async def pushes(self) -> None:
        in_flight = asyncio.Semaphore(16)
        loop = asyncio.get_running_loop()
        interval = 1 / self.args.rate
        due = loop.time()
        tasks: set[asyncio.Task[None]] = set()
        n = 0
        try:
            while True:
                due += interval
                await asyncio.sleep(max(0.0, due - loop.time()))
                await in_flight.acquire()
                uids = self.rng.sample(self.users, self.rng.randint(1, 5))
                task = asyncio.create_task(self.push(uids, n, in_flight))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def push(self, uids: list[int], n: int, in_flight: asyncio.Semaphore) -> None:
        from notifications.client import PushError

        try:
            answer = await asyncio.to_thread(self.api.user_message, uids, {"soak": n})
        except PushError as error:
            self.counts[f"push refused {error.status}"] += 1
            return
        finally:
            in_flight.release()
        self.counts["pushes_acked"] += 1
        for uid, noce_ack in answer["data"]["noce_acks"].items():
            self.acked[int(uid)].add(noce_ack)


# --- after the run --------------------------------------------------------------------


def verify(churn: Churn) -> dict[str, int]:
    """Every acknowledged push stored once and delivered, live or as unread."""
    from notifications.sharding import model_for_uid

    result = Counter({"acknowledged": 0, "live": 0, "unread": 0, "missing": 0, "read_not_seen": 0})
    for uid, acks in churn.acked.items():
        rows = dict(
            model_for_uid(uid).objects.filter(to_uid=uid, noce_ack__in=list(acks)).values_list("noce_ack", "is_read")
        )
        for ack in acks:
            result["acknowledged"] += 1
            if ack not in rows:
                result["missing"] += 1
            elif ack in churn.live[uid]:
                result["live"] += 1
            elif not rows[ack]:
                result["unread"] += 1
            else:
                result["read_not_seen"] += 1  # read, yet no socket of ours got it: lost on the way
    return dict(result)


def leftovers(server: Server, timeout: float = 15) -> dict[str, int]:
    """Relation rows and presence entries still there once every socket closed."""
    from connections.models import Connection
    from pushsite.redis_client import get_redis

    deadline = time.monotonic() + timeout
    while True:
        rows = Connection.objects.filter(node=server.node).count()
        entries = sum(1 for _ in get_redis().scan_iter(f"{server.prefix}:online:*", count=1000))
        if (rows == 0 and entries == 0) or time.monotonic() > deadline:
            return {"relation_rows": rows, "presence_entries": entries}
        time.sleep(0.5)


def memory(samples: list[tuple[float, int]], seconds: float) -> dict[str, Any]:
    after = [rss for t, rss in samples if t >= seconds * WARM_UP]
    if len(after) < 6:
        raise SystemExit("too few samples after warm-up: run longer or sample more often")
    baseline = statistics.median(after[:3])
    end = statistics.median(after[-3:])
    return {
        "warm_up_s": round(seconds * WARM_UP),
        "samples_after_warm_up": len(after),
        "rss_start_mib": round(samples[0][1] / 1024, 1),
        "rss_baseline_mib": round(baseline / 1024, 1),
        "rss_min_mib": round(min(after) / 1024, 1),
        "rss_max_mib": round(max(after) / 1024, 1),
        "rss_last_mib": round(after[-1] / 1024, 1),
        "drift_pct": round((end - baseline) / baseline * 100, 2),
        "spread_pct": round((max(after) - min(after)) / baseline * 100, 2),
    }


def report(result: dict[str, Any]) -> str:
    m, d = result["memory"], result["delivery"]
    c = Counter(result["churn"])
    rows = [
        ("duration", f"{result['minutes']} min ({result['seconds']} s), warm-up {m['warm_up_s']} s"),
        ("sockets (population)", f"{result['sockets']} over {result['users']} users"),
        ("connects / logins / disconnects", f"{c['connects']} / {c['logins']} / {c['disconnects']}"),
        ("pushes acknowledged (API 2xx)", f"{c['pushes_acked']} requests, {d['acknowledged']} messages"),
        ("delivered live / through unread", f"{d['live']} / {d['unread']}"),
        ("missing", f"{d['missing'] + d['read_not_seen']}"),
        ("RSS at start", f"{m['rss_start_mib']} MiB"),
        ("RSS after warm-up: min / max / last", f"{m['rss_min_mib']} / {m['rss_max_mib']} / {m['rss_last_mib']} MiB"),
        ("drift (end vs start of the measured part)", f"{m['drift_pct']:+.2f} % (limit {result['max_drift_pct']} %)"),
        ("spread (max - min)", f"{m['spread_pct']:.2f} %"),
        (
            "left after the last close",
            f"{result['left']['relation_rows']} rows, {result['left']['presence_entries']} entries",
        ),
        ("errors", ", ".join(f"{k}: {v}" for k, v in c.items() if "error" in k or "refused" in k) or "none"),
    ]
    table = "| figure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    return table + f"\nverdict: {'PASS' if result['ok'] else 'FAIL'}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--sockets", type=int, default=200, help="sockets open at any time")
    parser.add_argument("--users", type=int, default=400, help="uids the sockets log in as")
    parser.add_argument("--lifetime", type=float, default=10, help="mean seconds a socket stays")
    parser.add_argument("--rate", type=float, default=20, help="push API requests per second")
    parser.add_argument("--sample-every", type=float, default=5, help="seconds between RSS samples")
    parser.add_argument("--max-drift", type=float, default=5.0, help="percent")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="soak")
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE", help="extra server setting (repeatable)"
    )
    args = parser.parse_args()

    server = Server(dict(item.split("=", 1) for item in args.server_env))
    progress(f"migrating {server.env['DATABASE_URL']}")
    server.migrate()
    server.start()
    try:
        server.django()
        from django.conf import settings

        churn = Churn(args, server, settings.PUSH_API_SECRET)
        progress(f"churning {args.sockets} sockets for {args.minutes} min (server log: {server.log})")
        asyncio.run(churn.run())
        delivery = verify(churn)
        left = leftovers(server)
        seconds = args.minutes * 60
        mem = memory(churn.samples, seconds)
    finally:
        server.stop()
    result = {
        "minutes": args.minutes,
        "seconds": round(args.minutes * 60),
        "sockets": args.sockets,
        "users": args.users,
        "lifetime_s": args.lifetime,
        "push_rate": args.rate,
        "server_env": args.server_env,
        "max_drift_pct": args.max_drift,
        "churn": dict(churn.counts),
        "delivery": delivery,
        "memory": mem,
        "left": left,
        "samples": churn.samples,
    }
    result["ok"] = (
        mem["drift_pct"] <= args.max_drift
        and delivery["missing"] == 0
        and delivery["read_not_seen"] == 0
        and left == {"relation_rows": 0, "presence_entries": 0}
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    table = report(result)
    (RESULTS / f"{args.out}.md").write_text(table)
    print(table)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
