"""Reconnect storm: every socket of a daphne node comes back at once after the node died.

    .venv/bin/python bench/storm.py --sockets 3000
    .venv/bin/python bench/storm.py --sockets 3000 10000 19500

Per size it starts one daphne node (as bench/fanout.py does: local profile,
DEBUG off, open-files limit raised) and an API node beside it (uvicorn +
httptools, deploy/Procfile ``api1``), then:

1. N clients (one separate process, at most 200 handshakes in flight) connect
   and log in (``dev-<uid>``, the development verifier): the first wave;
2. the daphne is killed with SIGKILL; while it is down, one personal notice
   each goes to every 15th user (``--sample-every``) through the signed API on the API node
   (``notifications.client.PushClient``): stored, unsent;
3. the daphne starts again on the same port and all N clients reconnect and
   log in again, at most 200 handshakes in flight: the storm. A client told to
   come back later (KICK 503 with ``retry_after``, close 1013: the login
   pipeline's admission control, connections/logins.py) waits that long plus
   up to 20 % jitter and tries again; a handshake that failed (reset, timed
   out, HTTP 5xx, closed before the login reply) is tried up to three more
   times. Both are counted; a handshake refused for good (HTTP 4xx, or still
   failing after that) fails the run;
4. each pushed message must arrive exactly once on its user's socket, as the
   login replay of what is unsent (checked by noce_ack).

The same client runs the same two waves (no pushes) against bench/reference.py,
the plain-asyncio server answering the same login frame, in the same run.

Reported per size: logins/s of both waves and the reference's, the ratio,
seconds from the restart (daphne started again) until every socket is logged
in, daphne's CPU per login (user + system time from /proc/<pid>/stat over each
wave), lost, duplicated and unexpected messages, retried handshakes and
503 kicks. Writes bench/results/storm.json and storm.md (``--out``) and exits
non-zero when a message is lost, duplicated or unexpected, a push is not
answered 200, or a socket does not get back in.

Standalone it uses a fresh database of its own (``pushsite_storm``) and Redis
database 2 unless ``DATABASE_URL`` / ``REDIS_URL`` say otherwise; bench/run.py
runs the same case (``storm_case``) on its own database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fanout import RESULTS, cpu_seconds, progress, raise_nofile, server_env  # noqa: E402
from bench.run import ApiNode, bench_environment, prepare_database  # noqa: E402
from connections.protocol import CloseCode, Code, MsgType  # noqa: E402

STORM_DB = "pushsite_storm"
UID_BASE = 40_000_000
HANDSHAKES_IN_FLIGHT = 200
SAMPLE_EVERY = 15  # one user in this many gets a push while the node is down
HANDSHAKE_RETRIES = 3  # a failed handshake is tried this many more times; then it is refused for good
MAX_KICKS = 60  # KICK 503s one socket takes before the run counts it refused for good
LINGER = 2.0  # seconds to wait for duplicates after the last expected message
IDLE_GIVE_UP = 15.0  # seconds without a new message after which the missing ones count lost
DEV_SECRET = "pushsite-development-api-secret"


class Node:
    """One server process on a fixed port, so that a restart comes back where its clients were.

    daphne is started as bench/fanout.py's ``Server`` starts it (same
    environment and arguments); ``kind="reference"`` runs bench/reference.py.
    """

    def __init__(self, kind: str) -> None:
        self.kind = "hub" if kind == "pushsite" else kind
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"  # kept over the restart, like a real node's
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.log = open(RESULTS / f"server-storm-{kind}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the process; seconds until its port accepts connections."""
        t0 = time.perf_counter()
        if self.kind == "reference":
            args, env = [sys.executable, str(ROOT / "bench/reference.py"), str(self.port)], dict(os.environ)
        else:
            env = server_env(self.kind, self.prefix)
            args = [str(ROOT / ".venv/bin/daphne"), "-b", "127.0.0.1", "-p", str(self.port), "-v", "0",
                    "pushsite.asgi:application"]  # fmt: skip
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, preexec_fn=raise_nofile, stdout=self.log, stderr=subprocess.STDOUT
        )
        for _ in range(600):
            if self.proc.poll() is not None:
                break
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return time.perf_counter() - t0
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} server did not start on port {self.port} (see {self.log.name})")

    def cpu(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, its relation rows and presence entries stay behind."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- client process ------------------------------------------------------------


class Refused(Exception):
    """A socket that could not get in: the run fails."""


def client_main(port: int, uids: list[int], pipe: Any) -> None:
    raise_nofile()
    # The load client, not the server under test: with Python's thresholds
    # its collector walked the thousands of live sockets over and over, and it
    # set the reference's rate (10k sockets: 971 against 1,211 logins/s).
    gc.set_threshold(50_000, 20, 20)
    asyncio.run(_client(port, uids, pipe))


async def _client(port: int, uids: list[int], pipe: Any) -> None:
    """Two waves of the same sockets; each step is started by the parent and reported back to it."""
    import websockets

    loop = asyncio.get_running_loop()
    url = f"ws://127.0.0.1:{port}/ws/push/"
    handshakes = asyncio.Semaphore(HANDSHAKES_IN_FLIGHT)
    go = {1: asyncio.Event(), 2: asyncio.Event()}
    started = {1: 0.0, 2: 0.0}
    logged = {1: 0, 2: 0}
    last_login = {1: 0.0, 2: 0.0}
    all_in = {1: asyncio.Event(), 2: asyncio.Event()}
    closed = 0
    all_closed = asyncio.Event()
    counts: dict[int, Counter[str]] = {1: Counter(), 2: Counter()}
    # uid -> noce_acks that reached its socket after the reconnect; pushes in
    # the first wave (there should be none) are kept apart.
    received: dict[int, list[str]] = defaultdict(list)
    early: list[str] = []
    last_frame = 0.0
    failure: asyncio.Future[str] = loop.create_future()

    def record(uid: int, wave: int, frame: dict[str, Any]) -> None:
        nonlocal last_frame
        if frame.get("noce_ack"):
            (received[uid] if wave == 2 else early).append(frame["noce_ack"])
            last_frame = time.perf_counter()

    async def attempt(uid: int, wave: int) -> tuple[Any, str, float]:
        """One handshake and login: (the socket, "", 0) or (None, why not, seconds to wait)."""
        try:
            ws = await websockets.connect(
                url,
                compression=None,
                max_queue=None,
                open_timeout=60,
                ping_interval=None,  # one process for thousands of sockets: its own pings would time out
                # No proxy look-up: websockets reads the proxy environment
                # (urllib's getproxies) on every connect, 24 % of this
                # client's time under cProfile, for a loopback address.
                proxy=None,
            )
        except websockets.InvalidStatus as error:
            if error.response.status_code < 500:  # 403, 404: configuration, not load
                raise Refused(f"uid {uid}: handshake refused: {error}") from None
            return None, "handshakes_retried", 1.0
        except (OSError, TimeoutError, websockets.InvalidHandshake):
            return None, "handshakes_retried", 1.0
        try:
            await ws.send(json.dumps({"action": "login", "body": {"ukey": f"dev-{uid}"}}))
            while True:
                frame = json.loads(await ws.recv())
                if frame["msg_type"] in (MsgType.LOGIN, MsgType.ERROR, MsgType.KICK):
                    break
                record(uid, wave, frame)
        except websockets.ConnectionClosed as error:
            # 1013 without its KICK frame is still "come back later".
            if error.rcvd is not None and error.rcvd.code == CloseCode.TRY_AGAIN_LATER:
                return None, "kicked", 1.0
            return None, "handshakes_retried", 1.0
        if frame["msg_type"] == MsgType.LOGIN and frame["code"] == Code.OK:
            return ws, "", 0.0
        await ws.close()
        if frame["msg_type"] == MsgType.KICK and frame["code"] == Code.UNAVAILABLE:
            return None, "kicked", float((frame.get("body") or {}).get("retry_after") or 1)
        if frame["msg_type"] == MsgType.ERROR and frame["code"] == Code.UNAVAILABLE:
            return None, "login_503", 1.0  # a backend was down: the protocol says retry
        raise Refused(f"uid {uid}: login answered {frame}")

    async def login(uid: int, wave: int) -> Any:
        """An open, logged-in socket, after as many tries as the protocol allows."""
        tries: Counter[str] = Counter()
        while True:
            async with handshakes:  # released while a kicked socket waits
                ws, why, wait = await attempt(uid, wave)
            if ws is not None:
                return ws
            tries[why] += 1
            counts[wave][why] += 1
            if tries["kicked"] > MAX_KICKS or tries["handshakes_retried"] + tries["login_503"] > HANDSHAKE_RETRIES:
                raise Refused(f"uid {uid}: no login after {dict(tries)}")
            if why != "kicked":
                wait = float(tries[why])  # 1, 2, 3 s, as bench/fanout.py's clients back off
            # Every reconnect delay carries up to 20 % jitter (PROTOCOL.md section 8).
            await asyncio.sleep(wait * (1 + 0.2 * random.random()))

    async def session(uid: int) -> None:
        nonlocal closed
        try:
            for wave in (1, 2):
                await go[wave].wait()
                ws = await login(uid, wave)
                logged[wave] += 1
                if logged[wave] == len(uids):
                    last_login[wave] = time.perf_counter()
                    all_in[wave].set()
                with contextlib.suppress(websockets.ConnectionClosed):
                    async for message in ws:
                        record(uid, wave, json.loads(message))
                if wave == 1:
                    closed += 1
                    if closed == len(uids):
                        all_closed.set()
        except Refused as error:
            if not failure.done():
                failure.set_result(str(error))
        except Exception as error:
            if not failure.done():
                failure.set_result(f"uid {uid}: {error!r}")

    async def until(event: asyncio.Event, within: float) -> None:
        """Wait for ``event``; a socket that could not get in, or ``within`` seconds passing, ends the run."""
        waiter = asyncio.ensure_future(event.wait())
        await asyncio.wait([waiter, failure], timeout=within, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if failure.done():
            raise Refused(failure.result())
        if not event.is_set():
            raise Refused(f"timed out after {within:.0f} s")

    async def command() -> Any:
        return await loop.run_in_executor(None, pipe.recv)

    tasks = [asyncio.create_task(session(uid)) for uid in uids]
    try:
        within = 60 + len(uids) / 10  # 10 logins/s at the least: failure detection only
        for wave in (1, 2):
            order = await command()
            started[wave] = time.perf_counter()
            go[wave].set()
            await until(all_in[wave], within)
            pipe.send(
                {
                    "wave": wave,
                    "seconds": last_login[wave] - started[wave],
                    "last_login": last_login[wave],
                    "kicked": counts[wave]["kicked"],
                    "handshakes_retried": counts[wave]["handshakes_retried"],
                    "login_503": counts[wave]["login_503"],
                }
            )
            if wave == 1:
                await until(all_closed, 60)
                pipe.send({"closed": closed, "early": early})
        expected = order["expect"]
        waited_from = time.perf_counter()
        while True:
            got = sum(len(acks) for acks in received.values())
            now = time.perf_counter()
            if got >= expected and now - max(last_frame, waited_from) >= LINGER:
                break
            if now - max(last_frame, waited_from) > IDLE_GIVE_UP:
                break
            await asyncio.sleep(0.2)
        pipe.send({"received": {str(uid): acks for uid, acks in received.items()}})
    except Refused as error:
        pipe.send({"error": str(error)})
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- orchestration ----------------------------------------------------------------


def _answer(pipe: Any, what: str, timeout: float) -> dict[str, Any]:
    if not pipe.poll(timeout):
        raise RuntimeError(f"storm client: no {what} within {timeout:.0f} s")
    answer = pipe.recv()
    if "error" in answer:
        raise RuntimeError(f"storm client, {what}: {answer['error']}")
    return answer


def _push_while_down(port: int, uids: list[int]) -> tuple[dict[int, str], Counter[str]]:
    """One signed personal notice to each uid through the API node: {uid: noce_ack} of the 200s, and the statuses."""
    from notifications.client import PushClient, PushError

    api = PushClient(f"http://127.0.0.1:{port}", secret=os.environ.get("PUSH_API_SECRET", DEV_SECRET), timeout=30)

    def one(uid: int) -> tuple[int, int, str | None]:
        try:
            answer = api.user_message([uid], {"storm": uid})
        except PushError as error:
            return uid, error.status, None
        return uid, 200, answer["data"]["noce_acks"][str(uid)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, uids))
    return {uid: ack for uid, _, ack in results if ack}, Counter(str(status) for _, status, _ in results)


def _profiler(pid: int, path: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling one process (all threads, GIL holders marked) until it is sent SIGINT."""
    args = [str(ROOT / ".venv/bin/py-spy"), "record", "--pid", str(pid), "--format", "raw", "--threads",
            "--gil", "--rate", "250", "--output", str(path)]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_storm(kind: str, sockets: int, sample_every: int = SAMPLE_EVERY, profile: Path | None = None) -> dict[str, Any]:
    """Both waves against one server (``pushsite`` or ``reference``); pushes while it is down for pushsite only.

    With ``profile``, py-spy samples the restarted server over the storm wave
    into that file (collapsed stacks, GIL holders only).
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    uids = list(range(UID_BASE, UID_BASE + sockets))
    node = Node(kind)
    api: ApiNode | None = None
    client: mp.Process | None = None
    timeout = 120 + sockets / 10
    try:
        node.start()
        if kind == "pushsite":
            api = ApiNode(node)  # type: ignore[arg-type] - it reads kind and prefix
        pipe, child = mp.Pipe()
        client = mp.Process(target=client_main, args=(node.port, uids, child))
        client.start()
        progress(f"storm, {kind}: first wave, {sockets} sockets")
        cpu0, client0 = node.cpu(), cpu_seconds(client.pid)
        pipe.send({"wave": 1})
        first = _answer(pipe, "first wave", timeout)
        cpu1, client1 = node.cpu(), cpu_seconds(client.pid)
        node.kill()
        gone = _answer(pipe, "closes after the SIGKILL", 90)
        pushed: dict[int, str] = {}
        statuses: Counter[str] = Counter()
        if api is not None:
            sample = uids[::sample_every]
            progress(f"storm, {kind}: killed; {len(sample)} pushes through the API node while it is down")
            pushed, statuses = _push_while_down(api.port, sample)
        progress(f"storm, {kind}: restarted; {sockets} sockets reconnect")
        restarted = time.perf_counter()
        start_s = node.start()
        profiler = _profiler(node.proc.pid, profile) if profile is not None and node.proc is not None else None
        cpu2, client2 = node.cpu(), cpu_seconds(client.pid)
        pipe.send({"wave": 2, "expect": len(pushed)})
        storm = _answer(pipe, "storm", timeout)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(60)
        cpu3, client3 = node.cpu(), cpu_seconds(client.pid)
        got = _answer(pipe, "messages", 60 + IDLE_GIVE_UP)["received"]
        client.join(30)
    finally:
        if client is not None and client.is_alive():
            client.terminate()
        if api is not None:
            api.stop()
        node.stop()
    expected = set(pushed.items())
    seen = Counter((int(uid), ack) for uid, acks in got.items() for ack in acks)
    return {
        "server": kind,
        "sockets": sockets,
        "sample_every": sample_every,
        "first_wave_s": round(first["seconds"], 2),
        "first_wave_logins_per_s": round(sockets / first["seconds"]),
        "storm_s": round(storm["seconds"], 2),
        "storm_logins_per_s": round(sockets / storm["seconds"]),
        # From starting the server again (its start-up included) to the last login.
        "back_s": round(storm["last_login"] - restarted, 2),
        "restart_s": round(start_s, 2),
        "server_cpu_ms_per_login_first": round((cpu1 - cpu0) * 1000 / sockets, 3),
        "server_cpu_ms_per_login_storm": round((cpu3 - cpu2) * 1000 / sockets, 3),
        # The one client process: at the reference's rates it can be the limit.
        "client_cpu_s_first": round(client1 - client0, 2),
        "client_cpu_s_storm": round(client3 - client2, 2),
        "pushed": sum(statuses.values()),
        "api_errors": {status: n for status, n in sorted(statuses.items()) if status != "200"},
        "received": sum(seen.values()),
        "lost": len(expected - set(seen)),
        "duplicated": sum(n - 1 for n in seen.values()),
        # Pushes nobody sent in this run, or any push in the first wave: there should be none.
        "unexpected": len(set(seen) - expected) + len(gone["early"]),
        "handshakes_retried_first": first["handshakes_retried"],
        "handshakes_retried_storm": storm["handshakes_retried"],
        "kicked_first": first["kicked"],
        "kicked_storm": storm["kicked"],
        "login_503": first["login_503"] + storm["login_503"],
    }


def storm_case(sockets: int, sample_every: int = SAMPLE_EVERY, profile: bool = False) -> list[dict[str, Any]]:
    """The reference, then pushsite, with the same client; pushsite's row carries the ratios."""
    ref = run_storm("reference", sockets)
    progress(f"storm, reference {sockets}: {ref['first_wave_logins_per_s']} / {ref['storm_logins_per_s']} logins/s")
    path = RESULTS / f"storm-profile-{sockets}.txt" if profile else None
    row = run_storm("pushsite", sockets, sample_every, profile=path)
    row["x_reference_first"] = round(row["first_wave_logins_per_s"] / ref["first_wave_logins_per_s"], 2)
    row["x_reference_storm"] = round(row["storm_logins_per_s"] / ref["storm_logins_per_s"], 2)
    progress(
        f"storm, pushsite {sockets}: {row['first_wave_logins_per_s']} / {row['storm_logins_per_s']} logins/s, "
        f"back in {row['back_s']} s, lost {row['lost']}, duplicated {row['duplicated']}"
    )
    return [ref, row]


def storm_failures(rows: list[dict[str, Any]]) -> list[str]:
    """What makes a storm run fail: messages lost, twice or unexpected, and pushes not answered 200."""
    return [
        f"{row['server']} {row['sockets']}: lost {row['lost']}, duplicated {row['duplicated']}, "
        f"unexpected {row['unexpected']}, API errors {row['api_errors']}"
        for row in rows
        if row["lost"] or row["duplicated"] or row["unexpected"] or row["api_errors"]
    ]


def report(rows: list[dict[str, Any]]) -> list[str]:
    """The storm's Markdown section, as lines."""
    sample = rows[-1]["sample_every"] if rows else SAMPLE_EVERY
    lines = [
        "## Reconnect storm",
        "",
        f"N sockets log in (first wave); the server is killed (SIGKILL); one user in {sample} gets"
        " a push through the API node while it is down; the server starts again on the same port and all N"
        f" log in again (storm), at most {HANDSHAKES_IN_FLIGHT} handshakes in flight. Back: seconds from the"
        " restart to the last login. Reference: the same client and waves against bench/reference.py."
        " Retried: failed handshakes tried again; kicked: KICK 503 + retry_after (first / storm).",
        "",
        "| server | sockets | first wave logins/s | x ref | storm logins/s | x ref | back s "
        "| server CPU ms/login first / storm | pushed | received | lost | dup | retried | kicked |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['server']} | {row['sockets']} | {row['first_wave_logins_per_s']} "
            f"| {row.get('x_reference_first', '-')} | {row['storm_logins_per_s']} "
            f"| {row.get('x_reference_storm', '-')} | {row['back_s']} "
            f"| {row['server_cpu_ms_per_login_first']} / {row['server_cpu_ms_per_login_storm']} "
            f"| {row['pushed']} | {row['received']} | {row['lost']} | {row['duplicated']} "
            f"| {row['handshakes_retried_first']} / {row['handshakes_retried_storm']} "
            f"| {row['kicked_first']} / {row['kicked_storm']} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, nargs="+", default=[3000])
    parser.add_argument("--sample-every", type=int, default=SAMPLE_EVERY, help="one user in this many gets a push")
    parser.add_argument("--out", default="storm")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample pushsite's daphne with py-spy over the storm: bench/results/storm-profile-N.txt",
    )
    args = parser.parse_args()
    bench_environment(STORM_DB)
    raise_nofile()
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    prepare_database(STORM_DB)
    rows = [row for sockets in args.sockets for row in storm_case(sockets, args.sample_every, args.profile)]
    table = "\n".join(report(rows)) + "\n"
    (RESULTS / f"{args.out}.json").write_text(
        json.dumps({"storm": rows, "seconds": round(time.monotonic() - started)}, indent=2)
    )
    (RESULTS / f"{args.out}.md").write_text(table)
    print(table)
    failures = storm_failures(rows)
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
