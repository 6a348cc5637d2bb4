"""Two WebSocket nodes on one Redis: what reaches each node's bus per push and per broadcast.

Starts two daphnes of one site (one Redis prefix, node ids ``node-a`` and
``node-b``), logs half the users in on each, then

1. sends P personal pushes, each to one user on node A, through
   ``notifications.publish.publish_stored`` (what the API does after storing);
2. sends B system broadcasts to every user.

Each node's ``pushsite_bus_messages_total`` (its /metrics) is read before and
after each phase. A push addressed to the nodes that hold its user moves node
B's counter by 0 in phase 1; a broadcast costs each node one bus message per
chunk of ``BUS_CHUNK`` users it holds. Every frame must arrive: a lost one
fails the run.

    .venv/bin/python bench/nodes.py --sockets 2000 --pushes 500 --broadcasts 5

Writes bench/results/nodes.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fanout import RESULTS, Server, django_setup, progress, raise_nofile, start_clients
from bench.run import bench_environment, prepare_database


def bus_messages(server: Server) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "pushsite_bus_messages_total"
    )


def run(sockets: int, pushes: int, broadcasts: int) -> dict[str, object]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    half = sockets // 2
    servers = [Server("hub", prefix=prefix, name=f"node-{n}", PUSH_NODE_ID=f"node-{n}") for n in ("a", "b")]
    clients = []
    try:
        node_a, node_b = servers
        progress(f"nodes: logging in {half} sockets on each of two nodes")
        # Node A's users get the personal pushes (spread over them) and the broadcasts; B's only the broadcasts.
        clients.append(start_clients(node_a, half, pushes + half * broadcasts, uid_base=20_000_000))
        clients.append(start_clients(node_b, half, half * broadcasts, uid_base=30_000_000))
        uids_a, uids_b = clients[0][2], clients[1][2]
        for _, pipe, _, _ in clients:
            pipe.send("go")

        from connections.protocol import MsgType
        from notifications.publish import publish_stored
        from notifications.store import NewMessage

        django_setup(node_a)
        before = [bus_messages(s) for s in servers]
        for n in range(pushes):
            uid = uids_a[n % len(uids_a)]
            publish_stored(
                messages=[NewMessage(to_uid=uid, msg_type=MsgType.USER_NOTICE, body={"n": n}, noce_ack=f"p{n}")]
            )
        time.sleep(1.0)
        after_pushes = [bus_messages(s) for s in servers]
        body = {"title": "bench", "text": "x" * 64}
        t0 = time.perf_counter()
        for b in range(broadcasts):
            publish_stored(
                messages=[
                    NewMessage(to_uid=uid, msg_type=MsgType.SYSTEM_NOTICE, body=body, noce_ack=f"b{b}-{uid}")
                    for uid in uids_a + uids_b
                ]
            )
        results = [pipe.recv() for _, pipe, _, _ in clients]
        elapsed = time.perf_counter() - t0
        after_broadcasts = [bus_messages(s) for s in servers]
        expected = pushes + sockets * broadcasts
        received = sum(r["received"] for r in results)
        return {
            "sockets": sockets,
            "pushes_to_node_a": pushes,
            "broadcasts": broadcasts,
            "bus_per_push": {
                "node_a": round((after_pushes[0] - before[0]) / pushes, 3),
                "node_b": round((after_pushes[1] - before[1]) / pushes, 3),
            },
            "bus_per_broadcast": {
                "node_a": round((after_broadcasts[0] - after_pushes[0]) / broadcasts, 2),
                "node_b": round((after_broadcasts[1] - after_pushes[1]) / broadcasts, 2),
            },
            "expected": expected,
            "received": received,
            "lost": expected - received,
            "broadcasts_s": round(elapsed, 2),  # from the first broadcast to the last frame of all
        }
    finally:
        for client, _, _, _ in clients:
            client.join(30)
            if client.is_alive():
                client.terminate()
        for server in servers:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--pushes", type=int, default=500)
    parser.add_argument("--broadcasts", type=int, default=5)
    args = parser.parse_args()
    bench_environment()
    raise_nofile()
    prepare_database()
    row = run(args.sockets, args.pushes, args.broadcasts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "nodes.json").write_text(json.dumps(row, indent=2))
    print(json.dumps(row, indent=2))
    return 1 if row["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
