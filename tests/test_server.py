"""pushsite/server.py: the frames it writes straight to the socket parse as RFC 6455 frames."""

from __future__ import annotations

import contextlib
import pprint

import pytest
from websockets.exceptions import ProtocolError
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from pushsite.server import text_frame


def parse(data: bytes) -> Frame:
    """Parse one frame the way a client does (unmasked, from a server)."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        assert not reader.buffer, "bytes left after the frame"
        return done.value
    raise AssertionError("the frame is incomplete")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_parses_whole_at_every_length_boundary(size):
    payload = ("é" * size).encode()[:size]  # a cut multi-byte character is still a byte count
    frame = parse(text_frame(payload))
    assert frame.opcode == Opcode.TEXT
    assert frame.fin is True
    assert frame.data == payload


def test_text_frame_uses_the_shortest_length_field():
    # A client may refuse a non-minimal length (RFC 6455 5.2); websockets does not, so check the bytes.
    assert text_frame(b"x" * 125)[:2] == bytes((0x81, 125))
    assert text_frame(b"x" * 126)[:4] == bytes((0x81, 126, 0, 126))
    assert text_frame(b"x" * 65536)[:10] == bytes((0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0))


def test_a_truncated_frame_does_not_parse():
    with pytest.raises((AssertionError, ProtocolError, EOFError)):
        parse(text_frame(b"abc")[:-1])


def test_an_open_socket_keeps_no_http_channel():
    # daphne leaves the HTTP channel it upgraded from as the transport's producer,
    # which kept every socket's handshake request alive.
    from twisted.internet.testing import StringTransport
    from twisted.web.http import HTTPChannel

    from pushsite.server import release_http_channel

    transport = StringTransport()
    transport.registerProducer(HTTPChannel(), True)
    release_http_channel(transport)
    assert transport.producer is None


def test_a_producer_of_another_kind_stays_registered():
    from twisted.internet.testing import StringTransport
    from twisted.protocols.basic import FileSender

    from pushsite.server import release_http_channel

    transport = StringTransport()
    sender = FileSender()
    transport.registerProducer(sender, False)
    release_http_channel(transport)
    assert transport.producer is sender


async def test_input_queue_is_fifo_and_get_waits_for_a_put():
    import asyncio

    from pushsite.server import InputQueue

    queue = InputQueue()
    queue.put_nowait({"type": "websocket.connect"})
    queue.put_nowait({"type": "websocket.receive", "text": "1"})
    assert (await queue.get())["type"] == "websocket.connect"
    assert (await queue.get())["text"] == "1"

    waiting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not waiting.done(), "get waits while the queue is empty"
    queue.put_nowait({"type": "websocket.receive", "text": "2"})
    assert (await asyncio.wait_for(waiting, 1))["text"] == "2"


async def test_a_cancelled_get_leaves_the_event_for_the_next_get():
    import asyncio

    from pushsite.server import InputQueue

    queue = InputQueue()
    waiting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait({"type": "websocket.disconnect", "code": 1000})
    waiting.cancel()  # cancelled after the put woke it, before it ran
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert (await asyncio.wait_for(queue.get(), 1))["type"] == "websocket.disconnect"


def test_autobahn_debug_arguments_are_built_only_when_formatted():
    import autobahn.websocket.protocol as ws

    from pushsite.server import install_close_codes

    assert install_close_codes()
    options = [("openHandshakeTimeout", 5, "factory")]
    argument = ws.pformat(options)
    assert not isinstance(argument, str)  # nothing formatted yet
    assert f"{argument}" == pprint.pformat(options)  # and when a line is written, the same text
    name = ws.hltype(test_autobahn_debug_arguments_are_built_only_when_formatted)
    assert "test_autobahn_debug_arguments_are_built_only_when_formatted" in str(name)
    assert install_close_codes() and getattr(ws.hlval, "pushsite_lazy", False)  # installed once, not wrapped twice
    assert ws.hlval(5).__str__() == ws.hlval.__closure__[0].cell_contents(5)


# --- version guards: every patch names what it was written for, and refuses anything else ---


def test_the_installed_versions_pass_the_check():
    from pushsite.server import PATCHES, check_patches, installed_version

    check_patches()  # raises on a mismatch
    for patch in PATCHES:
        assert patch.replaces and patch.drop_when, f"patch {patch.number} says what it replaces and when it can go"
        for distribution, versions in patch.written_for.items():
            assert installed_version(distribution) in versions


def test_every_numbered_item_of_the_docstring_has_an_entry():
    import re

    import pushsite.server as server

    items = {int(number) for number in re.findall(r"^(\d+)\. ", server.__doc__, flags=re.MULTILINE)}
    assert items == {patch.number for patch in server.PATCHES}


def _patch_with(written_for=None, upstream=()):
    from pushsite.server import PATCHES, Patch

    first = PATCHES[0]
    return Patch(
        first.number,
        first.name,
        written_for if written_for is not None else first.written_for,
        first.replaces,
        first.drop_when,
        tuple(upstream),
    )


def test_another_version_refuses_to_start_with_a_message_naming_the_patch():
    from pushsite.server import PatchVersionError, check_patches, installed_version

    patch = _patch_with({"daphne": ("0.0.1",)})
    with pytest.raises(PatchVersionError) as refused:
        check_patches((patch,))
    message = str(refused.value)
    assert f"patch {patch.number} ({patch.name})" in message
    assert f"written for daphne 0.0.1, found daphne {installed_version('daphne')}" in message
    assert patch.replaces in message and patch.drop_when in message


def test_a_distribution_not_installed_is_refused():
    from pushsite.server import PatchVersionError, check_patches

    with pytest.raises(PatchVersionError, match="no not-a-real-distribution installed"):
        check_patches((_patch_with({"not-a-real-distribution": ("1.0",)}),))


@pytest.mark.parametrize(
    ("need", "says"),
    [
        (("daphne.ws_protocol:WebSocketProtocol.noSuchMethod",), "which is not there"),
        (("no_such_module_of_daphne:Thing",), "does not import"),
        (("daphne.ws_protocol:WebSocketProtocol.serverClose", ("self", "code", "reason")), "and it takes (self, code)"),
        (("daphne.ws_protocol:WebSocketProtocol.onConnect", None, ("no_such_attribute",)), "to use no_such_attribute"),
    ],
)
def test_an_upstream_name_changed_under_the_same_version_is_refused(need, says):
    from pushsite.server import PatchVersionError, Upstream, check_patches

    with pytest.raises(PatchVersionError) as refused:
        check_patches((_patch_with(upstream=[Upstream(*need)]),))
    assert says in str(refused.value)


def test_the_server_does_not_start_on_a_mismatch(monkeypatch):
    # install_close_codes, which pushsite/asgi.py calls before daphne serves, runs the check first.
    import pushsite.server as server

    monkeypatch.setattr(server, "PATCHES", (_patch_with({"Twisted": ("1.0",)}),))
    monkeypatch.setattr(server.check_patches, "__defaults__", (server.PATCHES,))
    with pytest.raises(server.PatchVersionError, match=r"written for Twisted 1\.0"):
        server.install_close_codes()


def test_a_daphne_with_other_versions_exits_naming_the_patch(tmp_path):
    # A real start: daphne imports pushsite.asgi under a version it was not written for.
    import os
    import subprocess
    import sys

    shim = tmp_path / "sitecustomize.py"
    shim.write_text(
        "import importlib.metadata as m\n"
        "_real = m.version\n"
        "m.version = lambda name: '99.0' if name.lower() == 'autobahn' else _real(name)\n"
    )
    path = f"{tmp_path}{os.pathsep}{os.getcwd()}"
    env = dict(os.environ, PYTHONPATH=path, DJANGO_SETTINGS_MODULE="pushsite.settings")
    started = subprocess.run(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", "0", "pushsite.asgi:application"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode != 0
    assert "PatchVersionError" in started.stderr
    assert "written for autobahn" in started.stderr and "found autobahn 99.0" in started.stderr


def test_endpoint_strings_get_the_backlog_unless_they_name_one():
    from pushsite.server import with_backlog

    assert with_backlog("tcp:port=8001:interface=127.0.0.1", 4096) == "tcp:port=8001:interface=127.0.0.1:backlog=4096"
    assert with_backlog(r"tcp6:port=8001:interface=\:\:1", 7) == r"tcp6:port=8001:interface=\:\:1:backlog=7"
    assert with_backlog("unix:/run/pushsite.sock", 7) == "unix:/run/pushsite.sock:backlog=7"
    assert with_backlog("tcp:port=8001:backlog=128", 4096) == "tcp:port=8001:backlog=128"  # the operator's own
    assert with_backlog("fd:fileno=3", 4096) == "fd:fileno=3"  # a socket listening already: not ours to size
