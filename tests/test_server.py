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
