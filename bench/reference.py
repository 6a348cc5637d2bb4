"""The plain-asyncio reference: a bare `websockets` server doing the same fan-out.

It speaks just enough of pushsite's protocol for the benchmark client: a
`login` frame is answered with code 200, and a control connection on
``/control`` asks for N broadcasts, each one frame per socket rendered from the
same template pushsite uses (so both sides pay for per-user frames). No
database, no Redis, no Django: the floor any Python server on this machine can
reach, measured in the same run as pushsite.

    python bench/reference.py PORT
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connections.protocol import MsgType, PushTemplate

LOGIN_OK = json.dumps(
    {"msg_type": 1, "code": 200, "msg": "SUCCESS", "uid": 0, "body": {}, "noce_ack": None, "seq": None}
)


async def main(port: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sockets: dict[object, int] = {}

    async def handler(ws) -> None:
        if ws.request.path == "/control":
            async for message in ws:
                order = json.loads(message)
                template = PushTemplate(MsgType.SYSTEM_NOTICE, from_uid=0, body=order["body"])
                for b in range(order["broadcasts"]):
                    for peer, uid in list(sockets.items()):
                        try:
                            await peer.send(template.render(uid, f"b{b}-{uid}"))
                        except websockets.ConnectionClosed:
                            sockets.pop(peer, None)
                await ws.send("done")
            return
        try:
            async for message in ws:
                frame = json.loads(message)
                if frame.get("action") == "login":
                    sockets[ws] = int(frame["body"]["ukey"].removeprefix("dev-"))
                    await ws.send(LOGIN_OK)
        finally:
            sockets.pop(ws, None)

    # The backlog pushsite's daphne listens with (PUSH_LISTEN_BACKLOG): with
    # asyncio's 100, the kernel dropped SYNs of a 200-connection burst and the
    # reference waited a second for their retransmits.
    async with websockets.serve(handler, "127.0.0.1", port, compression=None, max_queue=None, backlog=4096):
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
