"""A burst through the batching gateway, seen by the page in real Chromium:
several payloads per WebSocket message, split by the page, and the same
transcript a raw member of the room gets."""

from __future__ import annotations

import pytest
from browser_helpers import expect_, join, room_entries
from conftest import RawClient

from tcpserver import protocol

pytest_plugins = ["browser_fixtures"]
pytestmark = pytest.mark.browser

SENDERS = 3
EACH = 100


def test_a_burst_is_shown_in_order_as_a_raw_member_gets_it(start_server, start_gateway,
                                                          pages, request):
    expect = expect_()
    server = start_server("--max-per-ip=200", "--msg-rate=1e9", "--msg-burst=1000000000")
    gateway = start_gateway(server.port)
    page = pages.open(gateway.url)
    frames: list[str] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda data: frames.append(data)))
    join(page, "page")
    listener = RawClient(server.port)
    request.addfinalizer(listener.close)
    listener.join("listener")
    senders = []
    for i in range(SENDERS):
        sender = RawClient(server.port)
        request.addfinalizer(sender.close)
        sender.join(f"s{i}")
        senders.append(sender)
    for i, sender in enumerate(senders):  # each burst in one write
        sender.send_raw(b"".join(protocol.encode_frame({"type": "say", "text": f"s{i}-{n}"})
                                 for n in range(EACH)))

    raw = []
    while len(raw) < SENDERS * EACH:
        message = listener.recv(10)
        if message["type"] == "message":
            raw.append((message["seq"], message["from"].split("@")[0], message["text"]))
    expect(page.locator("#transcript li.message")).to_have_count(SENDERS * EACH)
    shown = [(e["seq"], e["sender"], e["text"]) for e in room_entries(page)
             if e["kind"] == "message"]
    assert shown == raw
    for i in range(SENDERS):
        assert [t for _, who, t in shown if who == f"s{i}"] == [f"s{i}-{n}" for n in range(EACH)]
    # The page did get batches: some message carried several payloads.
    assert any("\n" in frame for frame in frames)
