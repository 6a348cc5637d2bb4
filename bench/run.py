"""pushsite's benchmark: capacity, fan-out, latency and storage, against the
plain-asyncio limit measured in the same run.

    .venv/bin/python bench/run.py            # the full run (under 10 minutes on 2 cores)
    .venv/bin/python bench/run.py --smoke    # tiny sizes: checks that it all works

It starts the real service (daphne, MariaDB, Redis) and real WebSocket
clients in a separate process, and measures:

1. connect + login rate and server memory per idle logged-in socket;
2. broadcast fan-out (delivered msgs/s to every socket) for pushsite's hub
   path, the stock channels-redis path and a plain asyncio `websockets`
   server doing the same per-user fan-out (bench/reference.py);
3. personal push latency, signed API call -> frame at the client, at a fixed
   rate with storage in MariaDB on, the API answered by daphne and then by an
   API node (uvicorn + httptools), the sockets on daphne both times;
4. a reconnect storm (bench/storm.py): N sockets log in, the daphne is
   killed and started again, all N log in again; logins/s of both waves
   against the reference, and every message pushed while it was down must
   arrive once;
5. system broadcast storage: shard rows per second for 100k online users;
6. two nodes on one Redis (bench/nodes.py): bus messages each node receives
   per personal push to a user of the other node, and per broadcast.

Prints a table, writes bench/results/bench.json and bench.md, and exits
non-zero when clients lose messages or get one twice.
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
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fanout import (  # noqa: E402
    RESULTS,
    Server,
    cpu_seconds,
    django_setup,
    free_port,
    progress,
    raise_nofile,
    run_case,
    server_env,
    start_clients,
    stop_process,
)

BENCH_DB = "pushsite_bench"
IN_FLIGHT = 64
achieved: list[float] = []


def bench_environment(database: str = BENCH_DB) -> None:
    """The benchmark's own database and Redis database (unless given), the development verifier, DEBUG off."""
    os.environ.setdefault("DATABASE_URL", f"mysql://root@127.0.0.1:3306/{database}")
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/2")
    os.environ["PUSH_ENV"] = "local"
    os.environ["DJANGO_DEBUG"] = "false"


def prepare_database(name: str = BENCH_DB) -> None:
    """A fresh database of the benchmark's own (``name``), migrated, with the shard tables.

    Fresh each run: rows an interrupted run left unsent would be replayed at
    login and counted as extra frames.
    """
    subprocess.run(
        ["mysql", "--protocol=tcp", "-h127.0.0.1", "-uroot", "-e",
         f"DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}"],
        check=True,
    )  # fmt: skip
    env = {**os.environ, "DATABASE_URL": os.environ["DATABASE_URL"], "PUSH_ENV": "local"}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)


# --- 3. latency ---------------------------------------------------------------------


def latency_case(
    sockets: int, rate: int, seconds: float, api: str = "daphne", keyed: bool = False
) -> dict[str, object]:
    """Signed API pushes to random online users at a fixed rate; latency at the client.

    The sockets are on daphne either way; ``api`` says which server answers the
    push API: that daphne itself, or an API node (uvicorn + httptools) beside
    it on the same database and Redis prefix, so its publishes reach daphne's hub.
    Every push goes through the exactly-once check (keyed by its signature);
    ``keyed`` sends each with an ``Idempotency-Key`` of its own, as a sender
    that retries would.
    """
    server = Server("hub", PUSH_FRAME_RATE="1000")
    node = ApiNode(server) if api == "uvicorn" else None
    try:
        total = int(rate * seconds)
        # The first second's pushes warm the server up (database and Redis
        # connections per thread, the client's connections, first-call
        # imports): delivered and counted, not in the percentiles.
        warm = rate
        progress(f"latency ({api} API): {sockets} sockets, {warm} + {total} pushes at {rate}/s through the API")
        # Users of their own per case: a row the previous case's server wrote
        # but had not marked sent when it stopped would be replayed at login
        # and counted here, with that case's send time.
        uid_base = {"daphne": 20_000_000, "uvicorn": 21_000_000}[api] + (2_000_000 if keyed else 0)
        client, pipe, uids, _ = start_clients(server, sockets, warm + total, record_latency=True, uid_base=uid_base)
        api_port = node.port if node else server.port
        api_cpu = node.cpu if node else server.cpu
        cpu0, api_cpu0 = server.cpu(), api_cpu()
        pipe.send("go")
        answers, answer_times = asyncio.run(_push_at_rate(api_port, uids, rate, total, warm, keyed=keyed))
        result = pipe.recv()
        # Both processes' time, from the first push to the last frame at the client.
        api_cpu_s = api_cpu() - api_cpu0
        all_cpu_s = server.cpu() - cpu0 + (api_cpu_s if node else 0.0)
        client.join(30)
        lat = sorted(x * 1000 for x in result["latencies"])
        answered = sorted(x * 1000 for x in answer_times)
        ok = sum(1 for status in answers if status == 200)

        def pct(p: float, values: list[float] = lat) -> float:
            return round(values[min(len(values) - 1, int(len(values) * p))], 2) if values else float("nan")

        return {
            "api": api,
            "keyed": keyed,
            "sockets": sockets,
            "rate": rate,
            "achieved_rate": round(achieved[-1]) if achieved else 0,
            "pushes": warm + total,
            "warmup_pushes": warm,
            "api_2xx": ok,
            # Answers other than 200, by status (0: the request failed at the client).
            "api_errors": {str(status): n for status, n in sorted(Counter(answers).items()) if status != 200},
            # Signed request sent -> 200 read: the API's share of the latency.
            "answer_p50_ms": pct(0.50, answered),
            "answer_p99_ms": pct(0.99, answered),
            "received": result["received"],
            "lost": ok - result["received"],
            "p50_ms": pct(0.50),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "mean_ms": round(statistics.fmean(lat), 2) if lat else float("nan"),
            # CPU of the process answering the API, and of every server process
            # (with daphne answering, the two are the same process).
            "api_cpu_ms_per_push": round(api_cpu_s * 1000 / (warm + total), 2),
            "server_cpu_ms_per_push": round(all_cpu_s * 1000 / (warm + total), 2),
        }
    finally:
        if node:
            node.stop()
        server.stop()


class ApiNode:
    """An API node beside ``server``: uvicorn + httptools, HTTP only, the same environment and Redis prefix."""

    def __init__(self, server: Server) -> None:
        self.port = free_port()
        self.log = open(RESULTS / "server-api.log", "wb")  # noqa: SIM115 - closed in stop()
        env = {**server_env(server.kind, server.prefix), "PUSH_FRAME_RATE": "1000", "PUSH_DB_THREADS": "2"}
        args = [str(ROOT / ".venv/bin/uvicorn"), "pushsite.asgi:application", "--ws", "none", "--http", "httptools",
                "--lifespan", "off", "--no-access-log", "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("API node did not start")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc, self.log)


async def _push_at_rate(
    port: int, uids: list[int], rate: int, total: int, warm: int = 0, keyed: bool = False
) -> tuple[list[int], list[float]]:
    """Statuses of every push, and the seconds each measured 200 took to come back.

    The first ``warm`` pushes carry ``"warm": 1`` in their body: the clients
    count their frames but leave them out of the latencies.
    """
    from notifications.signing import signed_headers

    secret = os.environ.get("PUSH_API_SECRET", "pushsite-development-api-secret")
    statuses: list[int] = []
    answer_times: list[float] = []
    # Open loop at the asked rate, but never more than IN_FLIGHT requests at
    # once: a server that cannot keep up shows as a lower achieved rate and
    # queueing in the latency, not as a client that falls over.
    in_flight = asyncio.Semaphore(IN_FLIGHT)
    pool = _KeepAlivePool(port)
    run_id = uuid.uuid4().hex[:8]

    async def one(uid: int, warming: bool, n: int) -> None:
        try:
            sent = time.perf_counter()
            body = json.dumps({"uid": uid, "body": {"t": sent, "warm": 1} if warming else {"t": sent}}).encode()
            headers = signed_headers(secret, body)
            if keyed:
                headers["Idempotency-Key"] = f"bench-{run_id}-{n}"
            status = await pool.post("/api/notice/userMessage", body, headers)
            statuses.append(status)
            if status == 200 and not warming:
                answer_times.append(time.perf_counter() - sent)
        except (OSError, ValueError, KeyError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            statuses.append(0)
        finally:
            in_flight.release()

    started = time.perf_counter()
    tasks = []
    for n in range(warm + total):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await in_flight.acquire()
        tasks.append(asyncio.create_task(one(random.choice(uids), n < warm, n)))
    await asyncio.gather(*tasks)
    achieved.append((warm + total) / (time.perf_counter() - started))
    pool.close()
    return statuses, answer_times


class _KeepAlivePool:
    """Raw HTTP/1.1 keep-alive connections, one request at a time on each.

    Not httpx: its connection pool scans every connection on every request
    (``has_expired``, a ``getpeername`` and a poll per connection), which at
    64 connections cost the load generator 8-10 ms of CPU per request, more
    than twice the server's, so the benchmark measured its own client
    (bench/README.md, latency).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        conn = None
        while self.idle and conn is None:
            conn = self.idle.pop()
            if conn[0].at_eof():  # the server closed it while it was idle (uvicorn: after 5 s)
                conn[1].close()
                conn = None
        if conn is None:
            conn = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = conn
        try:
            head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{head}\r\n".encode()
                + body
            )
            lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            await reader.readexactly(int(fields["content-length"]))
        except BaseException:
            writer.close()
            raise
        if fields.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append(conn)
        return status

    def close(self) -> None:
        for _reader, writer in self.idle:
            writer.close()
        self.idle.clear()


# --- 4. storage ---------------------------------------------------------------------


def storage_case(users: int, batch: int) -> dict[str, object]:
    """A periodic system broadcast stored for `users` online users; rows per second."""
    django_setup()
    from django.utils import timezone

    from connections.models import Connection
    from connections.protocol import MsgType
    from notifications import periodic
    from notifications.services import push_job_run
    from notifications.sharding import SHARD_COUNT, message_model

    node = f"bench-{uuid.uuid4().hex[:6]}"
    base = 50_000_000
    now = timezone.now()
    progress(f"storage: {users} online users in the relation table")
    # Only this case's users: sockets of the earlier cases may have left rows.
    Connection.objects.all().delete()
    Connection.objects.bulk_create(
        [
            Connection(
                uid=base + n,
                conn_id=f"{node}.{n}",
                node=node,
                user_status=1,
                client_type=1,
                login_time=now,
                update_time=now,
            )
            for n in range(users)
        ],
        batch_size=5000,
    )
    try:
        job = periodic.broadcast_job(msg_type=MsgType.SYSTEM_NOTICE, body={"bench": True}, run_key=node)
        progress(f"storage: broadcast run, batches of {batch}")
        t0 = time.perf_counter()
        job = push_job_run(job_id=job.id, batch_size=batch)
        elapsed = time.perf_counter() - t0
        return {"users": users, "batch": batch, "rows": job.stored, "seconds": round(elapsed, 2),
                "rows_per_s": round(job.stored / elapsed)}  # fmt: skip
    finally:
        Connection.objects.filter(node=node).delete()
        for shard in range(SHARD_COUNT):
            message_model(shard).objects.filter(noce_ack__startswith=job.id.hex).delete()


# --- report -------------------------------------------------------------------------


def report(
    fanout: list[dict], latency: list[dict], storm: list[str], storage: dict, nodes: dict | None, smoke: bool
) -> str:
    """The Markdown tables; ``storm`` is bench/storm.py's section, already written out."""
    ref = {row["sockets"]: row for row in fanout if row["path"] == "reference"}
    lines = [
        "## Connect, memory and broadcast fan-out",
        "",
        "| server | sockets | logins/s | KiB/socket | delivered msgs/s | x reference | server CPU µs/msg | lost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in fanout:
        base = ref.get(row["sockets"])
        ratio = f"{row['msgs_per_s'] / base['msgs_per_s']:.2f}" if base and base["msgs_per_s"] else "-"
        lines.append(
            f"| {row['path']} | {row['sockets']} | {row['logins_per_s']} | {row['kib_per_socket']} "
            f"| {row['msgs_per_s']} | {ratio} | {row['server_cpu_us_per_msg']} | {row['lost']} |"
        )
    lines += [
        "",
        "## Personal push latency (signed API -> frame at the client, storage on)",
        "",
        "Sockets on daphne in every row; the API answered by that daphne or by an API node"
        " (uvicorn + httptools), in the last row with an Idempotency-Key of its own on every push."
        " The first second of pushes warms the servers up: they count in pushes,"
        " 2xx and received, not in the percentiles. Answer: request sent -> 200 read. CPU per push: the"
        " process answering the API / every server process.",
        "",
        "| API server | sockets | pushes/s asked | achieved | pushes | 2xx | received | p50 ms | p95 ms | p99 ms "
        "| answer p50 / p99 ms | API CPU ms/push | server CPU ms/push |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['api'] + (' + Idempotency-Key' if row.get('keyed') else '')} "
        f"| {row['sockets']} | {row['rate']} | {row['achieved_rate']} | {row['pushes']} "
        f"| {row['api_2xx']} | {row['received']} | {row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} "
        f"| {row['answer_p50_ms']} / {row['answer_p99_ms']} "
        f"| {row['api_cpu_ms_per_push']} | {row['server_cpu_ms_per_push']} |"
        for row in latency
    ]
    lines += ["", *storm]
    lines += [
        "",
        "## System broadcast storage",
        "",
        "| online users | batch | rows stored | seconds | rows/s |",
        "|---:|---:|---:|---:|---:|",
        f"| {storage['users']} | {storage['batch']} | {storage['rows']} | {storage['seconds']} "
        f"| {storage['rows_per_s']} |",
    ]
    if nodes is not None:
        push, broadcast = nodes["bus_per_push"], nodes["bus_per_broadcast"]
        lines += [
            "",
            "## Two nodes on one Redis: bus messages received per node",
            "",
            f"{nodes['sockets'] // 2} sockets on each node; {nodes['pushes_to_node_a']} personal pushes to users"
            f" on node A, then {nodes['broadcasts']} broadcasts to all {nodes['sockets']} users.",
            "",
            "| | node A | node B |",
            "|---|---:|---:|",
            f"| per personal push (users on A) | {push['node_a']} | {push['node_b']} |",
            f"| per broadcast | {broadcast['node_a']} | {broadcast['node_b']} |",
            "",
            f"{nodes['received']} of {nodes['expected']} frames delivered.",
        ]
    if smoke:
        lines.insert(0, "(smoke sizes: a correctness run, not a measurement)\n")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that everything works")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--broadcasts", type=int, default=20)
    parser.add_argument("--stock-up-to", type=int, default=5000, help="largest size for the slow stock path")
    parser.add_argument("--rate", type=int, default=500, help="personal pushes per second")
    parser.add_argument("--storm-sizes", type=int, nargs="+", default=[3000, 10000], help="sockets per storm")
    parser.add_argument("--storage-users", type=int, default=100_000)
    parser.add_argument("--nodes-sockets", type=int, default=4000, help="sockets over two nodes (0: skip)")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args()
    # Here, not at the top: bench/storm.py and bench/nodes.py import this module.
    from bench import nodes as nodes_bench
    from bench import storm as storm_bench

    if args.smoke:
        args.sizes, args.broadcasts, args.stock_up_to, args.rate, args.storage_users = [50], 3, 50, 50, 500
        args.storm_sizes, args.nodes_sockets = [50], min(args.nodes_sockets, 50)
    bench_environment()
    raise_nofile()
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    prepare_database()

    fanout = []
    for sockets in args.sizes:
        paths = ["reference", "hub"] + (["layer"] if sockets <= args.stock_up_to else [])
        for path in paths:
            broadcasts = max(2, args.broadcasts // 4) if path == "layer" else args.broadcasts
            row = run_case(path, sockets, broadcasts)
            fanout.append(row)
            progress(f"{path} {sockets}: {row['msgs_per_s']} msgs/s, {row['kib_per_socket']} KiB/socket")
    latency = []
    for api, keyed in (("daphne", False), ("uvicorn", False), ("uvicorn", True)):
        latency.append(latency_case(min(args.sizes[0], 1000), args.rate, 4 if args.smoke else 10, api, keyed))
        progress(f"latency ({api} API): p50 {latency[-1]['p50_ms']} ms, p99 {latency[-1]['p99_ms']} ms")
    # Before storage: that case clears the relation table, rows of the killed daphne included.
    storm = [row for sockets in args.storm_sizes for row in storm_bench.storm_case(sockets)]
    storage = storage_case(args.storage_users, 5000 if not args.smoke else 100)
    progress(f"storage: {storage['rows_per_s']} rows/s")
    nodes = None
    if args.nodes_sockets:
        nodes = nodes_bench.run(args.nodes_sockets, max(10, args.nodes_sockets // 4), 2 if args.smoke else 5)
        progress(f"two nodes: node B got {nodes['bus_per_push']['node_b']} bus messages per push to node A's users")

    table = report(fanout, latency, storm_bench.report(storm), storage, nodes, args.smoke)
    (RESULTS / f"{args.out}.json").write_text(
        json.dumps(
            {
                "fanout": fanout,
                "latency": latency,
                "storm": storm,
                "storage": storage,
                "nodes": nodes,
                "seconds": round(time.monotonic() - started),
            },
            indent=2,
        )
    )
    (RESULTS / f"{args.out}.md").write_text(table)
    print(table)
    print(f"total {time.monotonic() - started:.0f} s")
    # Both ways are failures: frames missing, or frames delivered twice.
    wrong = [row for row in fanout if row["path"] != "layer" and row["lost"] != 0]
    latency_lost = [(row["api"], row["lost"]) for row in latency if row["lost"] != 0 or row["api_errors"]]
    storm_wrong = storm_bench.storm_failures(storm)
    nodes_lost = nodes["lost"] if nodes else 0
    if wrong or latency_lost or storm_wrong or nodes_lost or storage["rows"] != args.storage_users:
        print(
            f"FAILED: fan-out off by {[(r['path'], r['sockets'], r['lost']) for r in wrong]}, "
            f"latency off by {latency_lost} (errors: {[row['api_errors'] for row in latency]}), "
            f"storm: {storm_wrong or 'ok'}, two nodes lost {nodes_lost}, "
            f"{storage['rows']} of {args.storage_users} rows stored",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
