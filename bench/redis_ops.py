"""What one push, one login and one broadcast chunk cost Redis: server CPU per call.

docs/scaling.md builds its capacity model on these figures. The script makes
presence entries for ``--users`` users spread over ``--nodes`` nodes (each
node a real subscriber that drains its channel), then runs pushsite's own
calls against them and reads Redis' own accounting (``INFO commandstats``:
microseconds of server time per call), so the client's speed does not enter:

* a personal push: the node-addressed publish script for one user;
* a broadcast chunk: the same script for 2000 users (``BUS_CHUNK``);
* a login batch: the presence writes of 500 logins in one pipeline;
* a login cache look-up of 500 keys (MGET).

Two Redis figures per round: the time inside the command (``usec`` of
``INFO commandstats``) and the whole redis-server process's CPU (``INFO cpu``,
which adds parsing and the network); the second is what a capacity model
needs. Run it on a Redis nothing else uses.

Run: ``REDIS_URL=redis://127.0.0.1:6379/2 .venv/bin/python bench/redis_ops.py``.
It uses its own key prefix and deletes its keys at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pushsite.settings")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/2")
os.environ.setdefault("PUSH_REDIS_PREFIX", f"bench-{uuid.uuid4().hex[:6]}")

import django

django.setup()

from connections import bus  # noqa: E402
from connections.presence import online_key  # noqa: E402
from notifications.publish import BUS_CHUNK, _publish_one_group  # noqa: E402
from pushsite.redis_client import get_redis  # noqa: E402


def commandstats(client) -> dict[str, tuple[int, float]]:
    """command -> (calls, usec) since the last CONFIG RESETSTAT."""
    stats = {}
    for name, value in client.info("commandstats").items():
        stats[name.removeprefix("cmdstat_")] = (int(value["calls"]), float(value["usec"]))
    return stats


def redis_cpu(client) -> float:
    """Seconds of CPU the redis-server process has used (parsing and network included)."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def measure(client, label: str, command: str, run, repeat: int) -> None:
    client.config_resetstat()
    cpu_before = redis_cpu(client)
    started = time.perf_counter()
    for _ in range(repeat):
        run()
    wall = time.perf_counter() - started
    cpu = redis_cpu(client) - cpu_before
    calls, usec = commandstats(client).get(command, (0, 0.0))
    print(
        f"{label:<48} {command} x{calls // repeat}: {usec / repeat:>8.1f} µs in the command, "
        f"{cpu / repeat * 1e6:>8.1f} µs Redis process CPU, {wall / repeat * 1e3:>6.2f} ms wall per round"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    client = get_redis()
    nodes = [f"bench-node-{n}" for n in range(args.nodes)]
    uids = list(range(10_000_000, 10_000_000 + args.users))

    pipe = client.pipeline(transaction=False)
    for uid in uids:
        node = nodes[uid % len(nodes)]
        pipe.hset(online_key(uid), f"{node}.{uid}", f"{node} 1 1700000000")
    pipe.execute()

    received = [0] * len(nodes)
    stop = threading.Event()

    def drain(i: int, node: str) -> None:
        sub = client.pubsub(ignore_subscribe_messages=True)
        sub.subscribe(bus.node_channel(node))
        while not stop.is_set():
            if sub.get_message(timeout=0.2) is not None:
                received[i] += 1
        sub.close()

    drains = [threading.Thread(target=drain, args=(i, node), daemon=True) for i, node in enumerate(nodes)]
    for thread in drains:
        thread.start()
    time.sleep(0.5)
    group = {"msg_type": 7, "from_uid": 0, "body": {"text": "x" * 100}}
    try:
        print(f"{args.users} users online over {args.nodes} nodes; Redis {client.info('server')['redis_version']}")
        one = iter(range(10**9))
        measure(
            client,
            "personal push (1 user)",
            "evalsha",
            lambda: _publish_one_group({**group, "to": [[uids[next(one) % len(uids)], "ack"]]}),
            args.repeat * 10,
        )
        chunk = [[uid, f"ack-{uid}"] for uid in uids[:BUS_CHUNK]]
        measure(
            client,
            f"broadcast chunk ({BUS_CHUNK} users, {args.nodes} nodes)",
            "evalsha",
            lambda: _publish_one_group({**group, "to": chunk}),
            args.repeat,
        )

        def login_batch() -> None:
            pipe = client.pipeline(transaction=False)
            for uid in uids[:500]:
                pipe.hset(online_key(uid), f"bench-login.{uid}", "bench-login 1 1700000000")
            pipe.execute()

        measure(client, "login batch presence (500 HSET, one pipeline)", "hset", login_batch, args.repeat)
        keys = [f"pushsite:login:{n}" for n in range(500)]
        measure(client, "login cache look-up (500 keys, one MGET)", "mget", lambda: client.mget(keys), args.repeat)
    finally:
        stop.set()
        for thread in drains:
            thread.join()
        pipe = client.pipeline(transaction=False)
        for uid in uids:
            pipe.delete(online_key(uid))
        pipe.execute()
    print(f"bus messages received per node: {received}")


if __name__ == "__main__":
    main()
