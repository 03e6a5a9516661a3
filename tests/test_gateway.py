"""The gateway app in-process (pytest-aiohttp) against the real chat server.

RawClient is blocking, so anything that waits for the gateway to act runs
in a thread (``asyncio.to_thread``); the gateway shares the test's loop.
"""

import asyncio
import ipaddress
import json
import socket
import struct
import weakref
from collections import deque

import aiohttp
import pytest
from aiohttp import WSMsgType
from conftest import RawClient

import gateway
import gateway.session
from gateway.app import BRIDGE, METRICS, PROBE, SECURITY_HEADERS, create_app
from gateway.config import GatewayConfig, build_parser, config_from_args
from tcpserver import protocol

pytestmark = pytest.mark.asyncio

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)



@pytest.fixture
def gateway_client(aiohttp_client):
    """Factory: ``await gateway_client(chat_port, **config) -> TestClient``."""

    async def make(chat_port: int, **overrides):
        config = GatewayConfig(chat_port=chat_port, **overrides)
        return await aiohttp_client(create_app(config))

    return make


@pytest.fixture
def member(server):
    """A RawClient already in the room as alice."""
    client = RawClient(server.port)
    client.join("alice")
    yield client
    client.close()


def free_port() -> int:
    """A port with nothing listening on it (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Payloads read but not yet returned, per WebSocket: one message may carry
# several, one per line (protocol v2).
_unread: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split(msg: aiohttp.WSMessage) -> list[dict]:
    """The payloads of one text message, in order."""
    assert msg.type is WSMsgType.TEXT, msg
    return [json.loads(line) for line in msg.data.split("\n")]


async def recv_json(ws, timeout: float = 5.0) -> dict:
    """The next payload (not message) from the gateway."""
    unread = _unread.setdefault(ws, deque())
    if not unread:
        unread.extend(split(await ws.receive(timeout=timeout)))
    return unread.popleft()


async def recv_all(ws, timeout: float = 10.0) -> tuple[list[dict], aiohttp.WSMessage]:
    """Every payload up to the close; return them and the close."""
    seen = list(_unread.pop(ws, ()))
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type is not WSMsgType.TEXT:
            return seen, msg
        seen.extend(split(msg))


async def recv_until(ws, predicate, timeout: float = 5.0) -> tuple[dict, list[dict]]:
    seen = []
    while True:
        message = await recv_json(ws, timeout)
        if predicate(message):
            return message, seen
        seen.append(message)


async def join(ws, name: str) -> dict:
    """hello; return welcome after reading up to our own join."""
    await ws.send_json({"type": "hello", "name": name})
    welcome, _ = await recv_until(ws, lambda m: m["type"] == "welcome")
    await recv_until(ws, lambda m: m["type"] == "join" and m["member"] == welcome["label"])
    return welcome


async def recv_close(ws, timeout: float = 5.0) -> aiohttp.WSMessage:
    """Skip payloads until the close; return it."""
    return (await recv_all(ws, timeout))[1]


async def in_thread(func, *args):
    return await asyncio.to_thread(func, *args)


def metric(app, name: str, **labels) -> float:
    value = app[METRICS].registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


async def eventually(check, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --- relaying ---------------------------------------------------------------

async def test_relay_both_ways_with_the_browsers_address(gateway_client, server, member):
    client = await gateway_client(server.port, trusted_proxies=LOOPBACK)
    async with client.ws_connect("/ws", headers={"X-Forwarded-For": "203.0.113.7"}) as ws:
        # Whatever the browser claims is replaced by the address we saw.
        await ws.send_json({"type": "hello", "name": "web", "forwarded_for": "6.6.6.6"})
        welcome = await recv_json(ws)
        assert welcome["type"] == "welcome"
        assert welcome["label"] == "web@203.0.113.7"
        assert welcome["members"] == ["alice@127.0.0.1", "web@203.0.113.7"]
        joined = await in_thread(member.recv_type, "join")
        assert joined["member"] == "web@203.0.113.7"

        await ws.send_json({"type": "say", "text": "hello alice ✓"})
        said = await in_thread(member.recv_type, "message")
        assert (said["from"], said["text"]) == ("web@203.0.113.7", "hello alice ✓")

        await in_thread(member.send, {"type": "say", "text": "hi web"})
        heard, _ = await recv_until(ws, lambda m: m["type"] == "message" and m["text"] == "hi web")
        assert heard["from"] == "alice@127.0.0.1"
        # Room events reach the browser byte for byte as the server framed them.
        assert json.dumps(heard, ensure_ascii=False, separators=(",", ":")) == \
            protocol.encode_payload(heard).decode()

        await ws.send_json({"type": "private", "to": "alice", "text": "psst"})
        private = await in_thread(member.recv_type, "private")
        assert (private["from"], private["to"], private["text"]) == \
            ("web@203.0.113.7", "alice@127.0.0.1", "psst")
        await in_thread(member.send, {"type": "private", "to": "web", "text": "back"})
        back, _ = await recv_until(ws, lambda m: m["type"] == "private" and m["text"] == "back")
        assert back["to"] == "web@203.0.113.7"


async def test_forwarded_claims_ignored_without_trusted_proxies(gateway_client, server):
    client = await gateway_client(server.port)
    async with client.ws_connect("/ws", headers={"X-Forwarded-For": "6.6.6.7"}) as ws:
        await ws.send_json({"type": "hello", "name": "web", "forwarded_for": "6.6.6.6"})
        assert (await recv_json(ws))["label"] == "web@127.0.0.1"


@pytest.mark.parametrize("headers, label", [
    # Issue 6 item 5: entries with a port were ignored (labelled @127.0.0.1).
    ({"X-Forwarded-For": "203.0.113.1:51001"}, "web@203.0.113.1"),
    ({"X-Forwarded-For": "[2001:db8::2]:51002"}, "web@2001:db8::2"),
    ({"X-Forwarded-For": "6.6.6.6, 203.0.113.1:51001, 127.0.0.5:80"}, "web@203.0.113.1"),
    # RFC 7239 Forwarded, sent alone by some proxies.
    ({"Forwarded": 'for="[2001:db8::2]:51002";proto=http'}, "web@2001:db8::2"),
    ({"Forwarded": "for=6.6.6.6, for=203.0.113.3"}, "web@203.0.113.3"),
    # Both: X-Forwarded-For wins (the client may have written Forwarded).
    ({"X-Forwarded-For": "203.0.113.4", "Forwarded": "for=6.6.6.6"}, "web@203.0.113.4"),
    # A proxy that hides its client: counted under the proxy.
    ({"Forwarded": "for=unknown"}, "web@127.0.0.1"),
])
async def test_forwarded_addresses_with_ports_and_rfc7239(gateway_client, server,
                                                          headers, label):
    client = await gateway_client(server.port, trusted_proxies=LOOPBACK)
    async with client.ws_connect("/ws", headers=headers) as ws:
        assert (await join(ws, "web"))["label"] == label


async def test_distinct_ported_addresses_are_not_one_address(gateway_client, server):
    # Before the fix every such user counted as 127.0.0.1 and the 9th got 429.
    client = await gateway_client(server.port, trusted_proxies=LOOPBACK)
    sockets = []
    try:
        for i in range(10):
            ws = await client.ws_connect(
                "/ws", headers={"X-Forwarded-For": f"203.0.113.{i + 1}:{51000 + i}"})
            sockets.append(ws)
            assert (await join(ws, f"user{i}"))["label"] == f"user{i}@203.0.113.{i + 1}"
    finally:
        for ws in sockets:
            await ws.close()


@pytest.mark.parametrize("headers", [
    {"X-Forwarded-For": "203.0.113.1:51001"},
    {"Forwarded": 'for="[2001:db8::2]:51002"'},
])
async def test_forwarded_headers_from_untrusted_peers_are_ignored(gateway_client, server,
                                                                  headers):
    client = await gateway_client(server.port, trusted_proxies=(
        ipaddress.ip_network("10.0.0.0/8"),))
    async with client.ws_connect("/ws", headers=headers) as ws:
        assert (await join(ws, "web"))["label"] == "web@127.0.0.1"


async def test_retry_after_name_taken_keeps_the_real_address(gateway_client, server, member):
    client = await gateway_client(server.port, trusted_proxies=LOOPBACK)
    async with client.ws_connect("/ws", headers={"X-Forwarded-For": "203.0.113.8"}) as ws:
        await ws.send_json({"type": "hello", "name": "ALICE"})
        error = await recv_json(ws)
        assert (error["type"], error["code"]) == ("error", "name_taken")
        await ws.send_json({"type": "hello", "name": "alice2", "forwarded_for": "6.6.6.6"})
        assert (await recv_json(ws))["label"] == "alice2@203.0.113.8"


async def test_bad_browser_input_is_answered_and_never_forwarded(gateway_client, server, member):
    client = await gateway_client(server.port)
    app = client.server.app
    async with client.ws_connect("/ws") as ws:
        await join(ws, "web")
        await in_thread(member.recv_type, "join")
        bad = ["not json", "[1]", '{"type": "nope"}', '{"type": "say"}',
               json.dumps({"type": "say", "text": "x" * (protocol.MAX_TEXT_CHARS + 1)}),
               json.dumps({"type": "say", "text": "   "}),
               json.dumps({"type": "say", "text": "ring\u0007"}),
               json.dumps({"type": "private", "to": "alice", "text": ""})]
        for text in bad:
            await ws.send_str(text)
            reply = await recv_json(ws)
            assert (reply["type"], reply["code"]) == ("error", "bad_message"), text
        await ws.send_bytes(b'{"type": "say", "text": "binary"}')
        reply = await recv_json(ws)
        assert (reply["code"], "binary" in reply["message"]) == ("bad_message", True)

        # Still working; and alice's next room event is this one, so none of
        # the bad input reached the room.
        await ws.send_json({"type": "say", "text": "still here"})
        event = await in_thread(member.recv)
        assert (event["type"], event["text"]) == ("message", "still here")
        echo, skipped = await recv_until(ws, lambda m: m["type"] == "message")
        assert echo["text"] == "still here" and skipped == []
    assert metric(app, "gateway_messages_rejected_total") == len(bad) + 1
    assert metric(app, "gateway_messages_relayed_total", direction="to_server") == 2


async def test_commands_before_hello_do_not_reach_the_server(gateway_client, server):
    client = await gateway_client(server.port)
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"type": "say", "text": "too early"})
        reply = await recv_json(ws)
        assert (reply["type"], reply["code"]) == ("error", "not_joined")
        await ws.send_str("garbage")
        assert (await recv_json(ws))["code"] == "bad_message"
        await join(ws, "web")  # the session is fine afterwards
    assert server.log_text().count("connect from") == 1


async def test_message_over_the_frame_limit_closes_1009(gateway_client, server, member):
    client = await gateway_client(server.port, max_frame=1000)
    async with client.ws_connect("/ws") as ws:
        await join(ws, "web")
        await ws.send_json({"type": "say", "text": "y" * 1000})
        msg = await recv_close(ws)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, aiohttp.WSCloseCode.MESSAGE_TOO_BIG)
    joined = await in_thread(member.recv_type, "join")
    left = await in_thread(member.recv)  # nothing of the big message came through
    assert (left["type"], left["member"]) == ("leave", joined["member"])


# --- closing --------------------------------------------------------------

async def test_unreachable_chat_server_closes_1011(gateway_client):
    client = await gateway_client(free_port())
    app = client.server.app
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"type": "hello", "name": "web"})
        msg = await recv_close(ws)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, aiohttp.WSCloseCode.INTERNAL_ERROR)
        assert "chat server unreachable" in msg.extra
    assert metric(app, "gateway_upstream_connect_failures_total") == 1
    assert metric(app, "gateway_session_closes_total", reason="unreachable") == 1


async def test_server_shutdown_is_delivered_then_closes_1012(gateway_client, server, member):
    client = await gateway_client(server.port)
    app = client.server.app
    async with client.ws_connect("/ws") as ws:
        await join(ws, "web")
        # Room events the server accepted just before its SIGTERM must all
        # reach the browser, then the shutdown notice, then the close.
        for i in range(20):
            member.send({"type": "say", "text": f"m{i}"})
        # Accepted: the server has published all 20 (a SIGTERM may otherwise
        # overtake frames still in its socket buffer).
        await in_thread(member.recv_until, lambda m: m.get("text") == "m19")
        # Done talking: otherwise the server waits its grace period for alice.
        member.sock.shutdown(socket.SHUT_WR)
        stopped = asyncio.ensure_future(in_thread(server.terminate))
        seen, msg = await recv_all(ws)
        texts = [m["text"] for m in seen if m["type"] == "message"]
        assert texts == [f"m{i}" for i in range(20)], (seen, msg)
        assert seen[-1] == {"type": "shutdown", "message": "the server is shutting down"}
        # 1012 "service restart": an orderly close, the page may say so.
        assert (msg.type, msg.data, msg.extra) == \
            (WSMsgType.CLOSE, aiohttp.WSCloseCode.SERVICE_RESTART, "the server is shutting down")
        assert await stopped == 0
    assert metric(app, "gateway_session_closes_total", reason="server_closed") == 1


async def test_server_error_becomes_the_close_reason(gateway_client, start_server):
    server = start_server("--idle-timeout=1")
    client = await gateway_client(server.port)
    async with client.ws_connect("/ws") as ws:
        await join(ws, "web")
        # Never answer the server's ping: it disconnects us for silence.
        ping, _ = await recv_until(ws, lambda m: m["type"] == "ping")
        error, _ = await recv_until(ws, lambda m: m["type"] == "error")
        assert error["code"] == "idle_timeout"
        msg = await recv_close(ws)
        assert (msg.type, msg.data, msg.extra) == \
            (WSMsgType.CLOSE, aiohttp.WSCloseCode.POLICY_VIOLATION, error["message"])


async def test_a_killed_chat_server_closes_1011_not_like_a_shutdown(gateway_client, server,
                                                                    member):
    client = await gateway_client(server.port)
    app = client.server.app
    async with client.ws_connect("/ws") as ws:
        await join(ws, "web")
        await in_thread(member.send, {"type": "say", "text": "last words"})
        await recv_until(ws, lambda m: m["type"] == "message")
        server.kill()  # SIGKILL: no shutdown notice, the kernel closes the socket
        seen, msg = await recv_all(ws)
        assert [m for m in seen if m["type"] == "shutdown"] == []
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, aiohttp.WSCloseCode.INTERNAL_ERROR)
        assert msg.extra.startswith("lost the chat server")
    assert metric(app, "gateway_session_closes_total", reason="server_closed") == 1


async def test_frames_before_a_bad_one_are_relayed_then_1011(gateway_client):
    """A server that sends two good frames and a bad length in one write."""

    async def handle(reader, writer):
        await reader.read(100)  # the hello
        good = [protocol.encode_frame({"type": "ping", "token": t}) for t in ("a", "b")]
        writer.write(b"".join(good) + struct.pack("!I", 0))
        await writer.drain()
        await reader.read(100)  # until the gateway hangs up
        writer.close()

    fake = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with fake:
        client = await gateway_client(fake.sockets[0].getsockname()[1])
        async with client.ws_connect("/ws") as ws:
            await ws.send_json({"type": "hello", "name": "web"})
            seen, msg = await recv_all(ws)
            assert [m["token"] for m in seen] == ["a", "b"]
            assert (msg.type, msg.data, msg.extra) == (
                WSMsgType.CLOSE, aiohttp.WSCloseCode.INTERNAL_ERROR,
                "the chat server sent a bad frame")


async def test_a_frame_that_is_not_utf8_is_skipped_not_relayed(gateway_client):
    """A browser fails the whole connection on a bad text message."""

    async def handle(reader, writer):
        await reader.read(100)  # the hello
        ping = protocol.encode_frame({"type": "ping", "token": "ü"})
        writer.write(ping + protocol.frame_payload(b'{"type":"ping","token":"\xff"}') + ping)
        await writer.drain()
        await reader.read(100)
        writer.close()

    fake = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with fake:
        client = await gateway_client(fake.sockets[0].getsockname()[1])
        async with client.ws_connect("/ws") as ws:
            await ws.send_json({"type": "hello", "name": "web"})
            assert [(await recv_json(ws))["token"] for _ in range(2)] == ["ü", "ü"]


async def test_a_reset_chat_connection_closes_1011(gateway_client):
    """A server that answers, then resets the connection (SO_LINGER 0)."""

    async def handle(reader, writer):
        await reader.read(100)  # the hello
        writer.write(protocol.encode_frame({"type": "ping", "token": "t"}))
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    fake = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with fake:
        client = await gateway_client(fake.sockets[0].getsockname()[1])
        async with client.ws_connect("/ws") as ws:
            await ws.send_json({"type": "hello", "name": "web"})
            assert (await recv_json(ws))["type"] == "ping"
            msg = await recv_close(ws)
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, aiohttp.WSCloseCode.INTERNAL_ERROR)
            assert msg.extra.startswith("lost the chat server")


async def test_gateway_shutdown_closes_1001(gateway_client, server, member):
    client = await gateway_client(server.port)
    app = client.server.app
    async with client.ws_connect("/ws") as ws:
        welcome = await join(ws, "web")
        closing = asyncio.ensure_future(client.server.close())
        msg = await recv_close(ws)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, aiohttp.WSCloseCode.GOING_AWAY)
        assert msg.extra == "the gateway is shutting down"
        await asyncio.wait_for(closing, 10)
    left = await in_thread(member.recv_until,
                           lambda m: m["type"] == "leave" and m["member"] == welcome["label"])
    assert left[0]["reason"] == "hung_up"
    assert metric(app, "gateway_session_closes_total", reason="shutdown") == 1


# A browser that closes its WebSocket on purpose (1000: the page closed it;
# 1001: the tab closed or navigated away) has left: the room reads "quit".
# Any other close code is no goodbye (the page's 4000 abandons a socket to
# reconnect and resume).
@pytest.mark.parametrize("code, reason", [(1000, "quit"), (1001, "quit"),
                                          (4000, "hung_up"), (1011, "hung_up")])
async def test_browser_gone_the_room_sees_a_leave(gateway_client, server, member, code,
                                                  reason):
    client = await gateway_client(server.port)
    app = client.server.app
    ws = await client.ws_connect("/ws")
    welcome = await join(ws, "web")
    await in_thread(member.recv_type, "join")
    await ws.close(code=code)
    left = await in_thread(member.recv)
    assert (left["type"], left["member"], left["reason"]) == ("leave", welcome["label"], reason)
    await eventually(lambda: app[BRIDGE].session_count == 0)
    assert metric(app, "gateway_session_closes_total", reason="browser_closed") == 1


async def test_a_leaving_browsers_queued_messages_come_before_its_quit(gateway_client, server,
                                                                      member):
    # Lines over the rate limit wait in the server; a hang-up would drop
    # them (PROTOCOL.md), a quit waits behind them.
    client = await gateway_client(server.port)
    ws = await client.ws_connect("/ws")
    welcome = await join(ws, "web")
    await in_thread(member.recv_type, "join")
    lines = [f"line {n}" for n in range(40)]  # past the default burst of 30, at 10/s
    for text in lines:
        await ws.send_json({"type": "say", "text": text})
    await ws.close(code=1001)
    left, seen = await in_thread(member.recv_until, lambda m: m["type"] == "leave")
    assert [m["text"] for m in seen if m["type"] == "message"] == lines
    assert (left["member"], left["reason"]) == (welcome["label"], "quit")


async def test_browser_vanishing_without_a_close_frame(gateway_client, server, member):
    client = await gateway_client(server.port)
    ws = await client.ws_connect("/ws")
    welcome = await join(ws, "web")
    await in_thread(member.recv_type, "join")
    ws._response.connection.transport.abort()  # a crashed tab: no close frame, just gone
    left = await in_thread(member.recv)
    assert (left["type"], left["member"], left["reason"]) == ("leave", welcome["label"], "hung_up")
    await ws.close()


async def test_a_browser_missing_its_heartbeat_hangs_up(gateway_client, server, member):
    # A closed laptop lid: no pong, so aiohttp drops it (1006), no goodbye.
    client = await gateway_client(server.port, heartbeat=0.2)
    ws = await client.ws_connect("/ws", autoping=False)
    await ws.send_json({"type": "hello", "name": "web"})
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome"
    left = await in_thread(member.recv_until,
                           lambda m: m["type"] == "leave" and m["member"] == welcome["label"])
    assert left[0]["reason"] == "hung_up"
    await ws.close()


async def test_no_hello_in_time_closes_1008(gateway_client, server):
    client = await gateway_client(server.port, hello_timeout=0.3)
    app = client.server.app
    async with client.ws_connect("/ws") as ws:
        msg = await recv_close(ws)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, aiohttp.WSCloseCode.POLICY_VIOLATION)
        assert "hello" in msg.extra
    assert metric(app, "gateway_session_closes_total", reason="hello_timeout") == 1
    assert "connect from" not in server.log_text()


async def flood_server(frame_text_size: int = 16000):
    """A fake chat server that answers hello with room messages as fast as
    TCP takes them, until the gateway hangs up.  Returns (port, done event)."""
    done = asyncio.Event()
    filler = "z" * frame_text_size

    async def handle(reader, writer):
        await reader.read(100)  # the hello
        seq = 0
        try:
            while True:
                seq += 1
                writer.write(protocol.encode_frame(
                    {"type": "message", "seq": seq, "from": "x@192.0.2.1", "text": filler,
                     "ts": 0}))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], done


async def test_a_browser_that_falls_behind_is_closed_1013_not_dropped(gateway_client):
    fake, port, upstream_closed = await flood_server()
    async with fake:
        client = await gateway_client(port, queue_size=4)
        app = client.server.app
        # No compression, so the flood really fills the socket buffers.
        async with client.ws_connect("/ws", compress=0) as ws:
            await ws.send_json({"type": "hello", "name": "slow"})
            # Read nothing until the gateway gives up on us.
            await eventually(
                lambda: metric(app, "gateway_session_closes_total", reason="overflow") == 1,
                timeout=20)
            await asyncio.wait_for(upstream_closed.wait(), 5)
            seen, msg = await recv_all(ws)
            seqs = [m["seq"] for m in seen]
            # Everything delivered is in order with no gap, then a close that
            # says why: the page knows to reconnect and ask for history.
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 10
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1013)
            assert "too far behind" in msg.extra
        fake.close()


async def test_a_browser_that_sends_junk_and_reads_nothing_is_closed_1013(gateway_client):
    """Its error replies are held like relayed frames: at most queue_size."""
    client = await gateway_client(free_port(), queue_size=4, hello_timeout=120)
    app = client.server.app
    async with client.ws_connect("/ws", compress=0) as ws:
        # Bounded: the kernel's buffers hold a few MB of ~80-byte replies.
        for sent in range(300_000):
            await ws.send_str("junk")
            if sent % 1000 == 0:
                await asyncio.sleep(0)  # the gateway runs in this loop too
                if metric(app, "gateway_session_closes_total", reason="overflow"):
                    break
        assert metric(app, "gateway_session_closes_total", reason="overflow") == 1
        seen, msg = await recv_all(ws)
        assert {m["code"] for m in seen} == {"bad_message"}
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1013)


async def test_a_relay_bug_closes_the_session_1011(gateway_client, server, member, monkeypatch):
    def broken():
        raise RuntimeError("simulated bug")

    client = await gateway_client(server.port)
    async with client.ws_connect("/ws") as ws:
        # Every relayed frame goes into a batch: the bug hits the first one.
        monkeypatch.setattr("gateway.session.Batch", broken)
        await ws.send_json({"type": "hello", "name": "web"})
        msg = await recv_close(ws)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, aiohttp.WSCloseCode.INTERNAL_ERROR)
    joined = await in_thread(member.recv_type, "join")
    left = await in_thread(member.recv_type, "leave")
    assert left["member"] == joined["member"] == "web@127.0.0.1"
    assert metric(client.server.app, "gateway_session_closes_total", reason="error") == 1


# --- batching --------------------------------------------------------------

async def test_permessage_deflate_is_declined_unless_asked_for(gateway_client, server):
    """Browsers offer permessage-deflate (RFC 7692); its zlib streams would
    cost ~150 KiB a session, so the gateway declines unless --ws-deflate."""
    for enabled, negotiated in ((False, 0), (True, 15)):
        client = await gateway_client(server.port, ws_deflate=enabled)
        async with client.ws_connect("/ws", compress=15) as ws:
            assert ws.compress == negotiated
            assert (await join(ws, f"page{negotiated}"))["type"] == "welcome"
        await client.close()


@pytest.mark.parametrize("compress", [0, 15], ids=["raw", "deflate"])
async def test_a_burst_is_batched_in_order_and_matches_a_raw_members_transcript(
        gateway_client, start_server, compress):
    """Four raw members each send 250 messages in one write while the page
    says 50 of its own: the page gets several payloads per WebSocket
    message, and exactly the transcript a raw member gets, in order.  With
    permessage-deflate the messages are kept within aiohttp's limit for
    compressing inline."""
    server = start_server("--max-per-ip=200", "--msg-rate=1e9", "--msg-burst=1000000000")
    listener = RawClient(server.port)
    senders = [RawClient(server.port) for _ in range(4)]
    try:
        listener.join("listener")
        for i, sender in enumerate(senders):
            sender.join(f"s{i}")
        client = await gateway_client(server.port, ws_deflate=bool(compress))
        async with client.ws_connect("/ws", compress=compress) as ws:
            assert ws.compress == compress
            page = (await join(ws, "page"))["label"]
            await in_thread(listener.recv_until,
                            lambda m: m["type"] == "join" and m["member"] == page)
            for i, sender in enumerate(senders):
                burst = b"".join(protocol.encode_frame({"type": "say", "text": f"s{i}-{n}"})
                                 for n in range(250))
                await in_thread(sender.send_raw, burst)
            for n in range(50):
                await ws.send_json({"type": "say", "text": f"page-{n}"})
            total = 4 * 250 + 50

            sizes, seen = [], list(_unread.pop(ws, ()))
            while sum(m["type"] == "message" for m in seen) < total:
                msg = await ws.receive(timeout=10)
                sizes.append(len(msg.data.encode()))
                seen.extend(split(msg))
            on_page = [(m["seq"], m["from"], m["text"]) for m in seen if m["type"] == "message"]

            def raw_transcript():
                got = []
                while len(got) < total:
                    m = listener.recv(10)
                    if m["type"] == "message":
                        got.append((m["seq"], m["from"], m["text"]))
                return got

            assert await in_thread(raw_transcript) == on_page
        # Every sender's messages in the order it sent them, in seq order.
        assert [seq for seq, _, _ in on_page] == sorted(seq for seq, _, _ in on_page)
        for i in range(4):
            mine = [text for _, sender, text in on_page if sender.startswith(f"s{i}@")]
            assert mine == [f"s{i}-{n}" for n in range(250)]
        assert [t for _, who, t in on_page if who == page] == [f"page-{n}" for n in range(50)]
        # Batched: fewer WebSocket messages than payloads, none over the cap.
        assert len(sizes) < len(seen)
        cap = gateway.session.BATCH_BYTES if compress else gateway.session.RAW_BATCH_BYTES
        assert max(sizes) <= cap
    finally:
        for raw in (listener, *senders):
            raw.close()


async def test_a_farewell_is_found_however_the_reads_split_it():
    """The relay skips its per-frame farewell look for reads that cannot hold
    one; a shutdown split anywhere across reads must still be seen."""
    from gateway.metrics import Metrics
    from gateway.session import Session

    frames = [protocol.encode_frame(m) for m in (
        {"type": "message", "seq": 1, "from": "a@b", "text": "hi", "ts": 1},
        {"type": "shutdown", "message": "the server is shutting down"},
        {"type": "leave", "seq": 2, "member": "a@b", "reason": "shutdown", "ts": 2})]
    stream = b"".join(frames)
    for cut in [*range(1, len(stream)), None]:
        session = Session(None, None, GatewayConfig(), Metrics())
        pieces = ([bytes([b]) for b in stream] if cut is None
                  else [stream[:cut], stream[cut:]])
        for piece in pieces:
            session._from_server(piece)
        assert session._farewell == (1012, "the server is shutting down"), cut
        relayed = b"\n".join(chunk for batch in session._backlog
                             for chunk in batch.chunks).split(b"\n")
        assert relayed == [frame[4:] for frame in frames]


async def test_payloads_over_the_message_cap_go_alone_in_order():
    """With permessage-deflate's 16 KiB cap, a read of many payloads is split
    over several messages, and a single payload bigger than the cap (a
    welcome listing many members) still goes, alone, in its place."""
    from gateway.metrics import Metrics
    from gateway.session import BATCH_BYTES, Session

    big = {"type": "members", "members": [f"m{n:05d}@127.0.0.1" for n in range(1500)],
           "more": False}
    messages = [{"type": "message", "seq": n, "from": "a@b", "text": "x" * 90, "ts": 1}
                for n in range(300)]
    messages[150:150] = [big]
    frames = [protocol.encode_frame(m) for m in messages]
    assert len(frames[150]) > BATCH_BYTES
    session = Session(None, None, GatewayConfig(), Metrics())  # no ws: the deflate cap
    session._from_server(b"".join(frames))
    assert session._closer is None
    sent = [b"\n".join(batch.chunks) for batch in session._backlog]
    assert [s.split(b"\n") for s in sent if len(s) > BATCH_BYTES] == [[frames[150][4:]]]
    assert b"\n".join(sent).split(b"\n") == [frame[4:] for frame in frames]
    assert sum(batch.frames for batch in session._backlog) == len(frames)


async def test_chat_text_cannot_pass_for_a_farewell(monkeypatch):
    """Chat text that spells out a farewell, quotes and all, is escaped by
    JSON: the relay neither takes it for one nor parses it looking for
    one; a real closing error after it is found."""
    from gateway.metrics import Metrics
    from gateway.session import Session

    looked = []
    real = gateway.session.farewell
    monkeypatch.setattr(gateway.session, "farewell",
                        lambda payload: looked.append(payload) or real(payload))
    texts = ['{"type":"shutdown","message":"bye"}', '"message":', "shutdown", "error"]
    chat = b"".join(protocol.encode_frame({"type": "message", "seq": n, "from": "a@b",
                                           "text": text, "ts": 1})
                    for n, text in enumerate(texts, 1))
    session = Session(None, None, GatewayConfig(), Metrics())
    session._from_server(chat)
    assert (session._farewell, looked) == (None, [])
    closing = protocol.encode_frame({"type": "error", "code": "idle_timeout",
                                     "message": "idle too long"})
    session._from_server(closing)
    assert session._farewell == (1008, "idle too long")
    assert looked == [closing[4:]]


# --- admission: origin and per-address cap ----------------------------------

async def test_cross_origin_websocket_is_refused_403(gateway_client, server):
    client = await gateway_client(server.port)
    for origin in ("http://evil.example", "null", f"http://localhost:{client.port + 1}"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect("/ws", headers={"Origin": origin})
        assert info.value.status == 403, origin
    assert client.server.app[BRIDGE].session_count == 0


async def test_same_origin_and_no_origin_are_accepted(gateway_client, server):
    client = await gateway_client(server.port)
    origin = f"http://{client.host}:{client.port}"
    async with client.ws_connect("/ws", headers={"Origin": origin}) as ws:
        await join(ws, "same")
    async with client.ws_connect("/ws") as ws:  # no Origin: not a browser
        await join(ws, "tool")


async def test_allowed_origin_option(gateway_client, server):
    client = await gateway_client(server.port,
                                  allowed_origins=frozenset({"https://chat.example.org"}))
    async with client.ws_connect("/ws", headers={"Origin": "https://chat.example.org"}) as ws:
        await join(ws, "proxied")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws", headers={"Origin": "https://other.example.org"})
    assert info.value.status == 403


REBIND = "rebind.attacker.example"


def same_origin(host: str) -> dict[str, str]:
    """Headers of a browser whose page was loaded from ``http://host``."""
    return {"Host": host, "Origin": f"http://{host}"}


async def test_dns_rebinding_websocket_is_refused_403_before_upgrade(gateway_client, server):
    # Issue 6 item 3: the attacker's page is same-origin to the browser, so
    # its Origin equals its Host; the old gateway answered 101 and let it in.
    client = await gateway_client(server.port)
    for host in (f"{REBIND}:{client.port}", REBIND, f"localhost.{REBIND}:{client.port}"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect("/ws", headers=same_origin(host))
        assert info.value.status == 403, host
        for name, value in SECURITY_HEADERS.items():
            assert info.value.headers.get(name) == value
    assert client.server.app[BRIDGE].session_count == 0
    assert "connect from" not in server.log_text()  # nothing reached the room


async def test_dns_rebinding_pages_get_421(gateway_client, server):
    client = await gateway_client(server.port)
    for path in ("/", "/static/chat.js", "/no-such-page", "/health", "/metrics", "/ws"):
        response = await client.get(path, headers={"Host": f"{REBIND}:{client.port}"})
        assert response.status == (403 if path == "/ws" else 421), path
        if path != "/ws":
            assert "--server-name" in await response.text()
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = await client.get("/", headers={"Host": f"{REBIND}:{client.port}"})
    assert "<html" not in (await page.text()).lower()  # not the chat page


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.0.0.2", "localhost."])
async def test_loopback_names_are_served(gateway_client, server, host):
    client = await gateway_client(server.port)
    host = f"{host}:{client.port}"
    assert (await client.get("/", headers={"Host": host})).status == 200
    assert (await client.get("/static/chat.css", headers={"Host": host})).status == 200
    async with client.ws_connect("/ws", headers=same_origin(host)) as ws:
        await join(ws, "local")


async def test_server_name_option(gateway_client, server, aiohttp_client):
    config = config_from_args(build_parser().parse_args(
        [f"--chat-port={server.port}", "--server-name", "Chat.Example.org",
         "--server-name", "192.0.2.44"]))
    client = await aiohttp_client(create_app(config))
    for name in ("chat.example.org", "192.0.2.44"):
        host = f"{name}:{client.port}"
        assert (await client.get("/", headers={"Host": host})).status == 200
        async with client.ws_connect("/ws", headers=same_origin(host)) as ws:
            await join(ws, "named" + name[-1])
    # Only the names given: neighbours and the old rebinding name stay out.
    for name in ("example.org", "evil.chat.example.org", REBIND, "192.0.2.45"):
        host = f"{name}:{client.port}"
        assert (await client.get("/", headers={"Host": host})).status == 421, name
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect("/ws", headers=same_origin(host))
        assert info.value.status == 403


async def test_allowed_origin_hosts_are_served(gateway_client, server):
    # Behind a proxy at https://chat.example.org that passes the Host on.
    client = await gateway_client(server.port,
                                  allowed_origins=frozenset({"https://chat.example.org"}))
    headers = {"Host": "chat.example.org", "Origin": "https://chat.example.org"}
    assert (await client.get("/", headers={"Host": "chat.example.org"})).status == 200
    async with client.ws_connect("/ws", headers=headers) as ws:
        await join(ws, "proxied")


async def test_wildcard_bind_serves_any_address_but_not_unlisted_names(gateway_client, server):
    client = await gateway_client(server.port, host="0.0.0.0")
    for address in ("192.0.2.10", "[2001:db8::10]"):
        host = f"{address}:{client.port}"  # a user who typed the machine's IP
        assert (await client.get("/", headers={"Host": host})).status == 200
        async with client.ws_connect("/ws", headers=same_origin(host)) as ws:
            await join(ws, "lan")
    assert (await client.get("/", headers={"Host": REBIND})).status == 421
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws", headers=same_origin(REBIND))
    assert info.value.status == 403


async def test_monitors_may_probe_by_any_address(gateway_client, server):
    client = await gateway_client(server.port)  # bound to loopback
    for host in ("127.0.0.1", f"127.0.0.1:{client.port}", "[::1]", "192.0.2.9:80", None):
        headers = {"Host": host} if host else {}
        skip = () if host else ("Host",)
        health = await client.get("/health", headers=headers, skip_auto_headers=skip)
        assert health.status == 200, host
        metrics = await client.get("/metrics", headers=headers, skip_auto_headers=skip)
        assert metrics.status == 200, host
    # The page by a foreign address is still refused: only a rebinding
    # needs a name, but the page has no reason to answer for every address.
    assert (await client.get("/", headers={"Host": "192.0.2.9"})).status == 421


async def test_sessions_per_address_are_capped_429(gateway_client, server):
    client = await gateway_client(server.port, max_sessions_per_ip=2, trusted_proxies=LOOPBACK)
    bridge = client.server.app[BRIDGE]
    first = await client.ws_connect("/ws")
    second = await client.ws_connect("/ws")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws")
    assert info.value.status == 429
    # Another (proxied) address has its own allowance.
    other = await client.ws_connect("/ws", headers={"X-Forwarded-For": "203.0.113.9"})
    await first.close()
    await eventually(lambda: bridge.per_address["127.0.0.1"] == 1)
    third = await client.ws_connect("/ws")
    await join(third, "third")
    for ws in (second, other, third):
        await ws.close()
    await eventually(lambda: not bridge.per_address)


async def test_plain_get_on_ws_and_shutting_down(gateway_client, server):
    client = await gateway_client(server.port)
    bridge = client.server.app[BRIDGE]
    assert (await client.get("/ws")).status == 400  # not an upgrade
    assert not bridge.per_address
    await bridge.shutdown(client.server.app)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws")
    assert info.value.status == 503


# --- /health -----------------------------------------------------------------

async def test_health_ok_and_the_probe_never_joins(gateway_client, server, member):
    client = await gateway_client(server.port)
    response = await client.get("/health")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "ok"
    assert body["chat_server"]["reachable"] is True
    assert body["chat_server"]["address"] == f"127.0.0.1:{server.port}"
    assert 0 < body["chat_server"]["rtt_ms"] < 1000
    assert body["sessions"] == 0 and body["version"] == gateway.__version__
    assert body["uptime_s"] >= 0
    # The room saw nothing: alice's next frames are only the who reply.
    await in_thread(member.send, {"type": "who"})
    members, seen = await in_thread(member.recv_until, lambda m: m["type"] == "members")
    assert members["members"] == ["alice@127.0.0.1"] and seen == []
    server.wait_log(r"closed 127\.0\.0\.1")  # the probe hung up


async def test_health_unavailable_503(gateway_client):
    port = free_port()
    client = await gateway_client(port)
    response = await client.get("/health")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "unavailable"
    assert body["chat_server"] == {"reachable": False, "rtt_ms": None,
                                   "address": f"127.0.0.1:{port}",
                                   "error": "connection refused", "degraded": None}


async def test_health_follows_the_chat_server_stopping_and_starting(gateway_client,
                                                                    start_server):
    first = start_server()
    client = await gateway_client(first.port, health_cache=0.2)

    async def status_becomes(code: int) -> None:
        async def check():
            while (await client.get("/health")).status != code:
                await asyncio.sleep(0.1)
        await asyncio.wait_for(check(), 10)

    await status_becomes(200)
    assert await in_thread(first.terminate) == 0
    await status_becomes(503)
    start_server(f"--port={first.port}")
    await status_becomes(200)
    body = await (await client.get("/health")).json()
    assert body["chat_server"]["reachable"] is True


async def test_health_reports_a_degraded_room_503_until_it_recovers(gateway_client,
                                                                    start_server, tmp_path):
    # The chat server's disk "fills up" (SQLite max_page_count, a testing
    # knob); its pongs then say why, and /health must pass that on.
    cap = tmp_path / "max-pages"
    cap.write_text("1")  # no growth from the start
    server = start_server(env={"CHATROOM_TEST_DB_MAX_PAGES_FILE": str(cap)})
    client = await gateway_client(server.port, health_cache=0)
    alice = RawClient(server.port)
    try:
        await in_thread(alice.join, "alice")
        for i in range(200):  # bounded: a few pages fill in a few dozen
            await in_thread(alice.send, {"type": "say", "text": f"{i} " + "x" * 3000})
            reply, _ = await in_thread(alice.recv_until, lambda m: m["type"] in (
                "message", "error"))
            if reply["type"] == "error":
                break
        assert reply["code"] == "room_unavailable"
        response = await client.get("/health")
        body = await response.json()
        assert response.status == 503 and body["status"] == "degraded"
        assert body["chat_server"]["reachable"] is True
        assert body["chat_server"]["degraded"] == "storage: database or disk is full"

        cap.write_text("1000000")  # space again: the server notices by itself

        async def recovered():
            while (await client.get("/health")).status != 200:
                await asyncio.sleep(0.1)
        await asyncio.wait_for(recovered(), 10)
        body = await (await client.get("/health")).json()
        assert body["status"] == "ok" and body["chat_server"]["degraded"] is None
    finally:
        alice.close()
    assert server.log_text().count("database or disk is full; events are not published") == 1


async def test_health_times_out_on_a_silent_server(gateway_client):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        client = await gateway_client(silent.getsockname()[1], health_timeout=0.3)
        started = asyncio.get_running_loop().time()
        response = await client.get("/health")
        assert response.status == 503
        assert asyncio.get_running_loop().time() - started < 2


async def test_health_is_cached_so_polling_cannot_flood_the_server(gateway_client, server):
    client = await gateway_client(server.port, health_cache=30)
    responses = await asyncio.gather(*(client.get("/health") for _ in range(50)))
    assert [r.status for r in responses] == [200] * 50
    for _ in range(20):
        assert (await client.get("/health")).status == 200
    assert client.server.app[PROBE].probes == 1
    server.wait_log("connect from")
    await asyncio.sleep(0.2)
    assert server.log_text().count("connect from") == 1


async def test_concurrent_checks_share_one_probe(gateway_client, server):
    client = await gateway_client(server.port, health_cache=0)
    probe = client.server.app[PROBE]
    results = await asyncio.gather(*(probe.check() for _ in range(30)))
    assert all(r.reachable for r in results)
    assert probe.probes == 1
    await probe.check()  # the cache is off: a later check probes again
    assert probe.probes == 2


# --- /metrics, headers, page -------------------------------------------------

def samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def test_metrics_count_sessions_messages_and_closes(gateway_client, server):
    client = await gateway_client(server.port)
    async with client.ws_connect("/ws") as ws:
        await join(ws, "web")  # hello out; welcome and own join back
        await ws.send_json({"type": "say", "text": "one"})
        await recv_until(ws, lambda m: m["type"] == "message")
        await ws.send_str("junk")
        await recv_json(ws)
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        now = samples(await response.text())
        assert now["gateway_sessions"] == 1
        assert now["gateway_messages_relayed_total{direction=to_server}"] == 2
        assert now["gateway_messages_relayed_total{direction=to_browser}"] == 3
        assert now["gateway_messages_rejected_total"] == 1
    await eventually(lambda: client.server.app[BRIDGE].session_count == 0)
    after = samples(await (await client.get("/metrics")).text())
    assert after["gateway_sessions"] == 0
    assert after["gateway_session_closes_total{reason=browser_closed}"] == 1
    assert after["gateway_upstream_connect_failures_total"] == 0


async def test_apps_have_separate_registries(gateway_client, server):
    first = await gateway_client(server.port)
    second = await gateway_client(server.port)
    async with first.ws_connect("/ws") as ws:
        await join(ws, "web")
    assert metric(first.server.app, "gateway_messages_relayed_total", direction="to_server") == 1
    assert metric(second.server.app, "gateway_messages_relayed_total", direction="to_server") == 0


async def test_security_headers_on_every_response(gateway_client, server):
    client = await gateway_client(server.port)
    responses = [await client.get(path) for path in
                 ("/", "/health", "/metrics", "/static/chat.js", "/no-such-page")]
    assert [r.status for r in responses] == [200, 200, 200, 200, 404]
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws", headers={"Origin": "http://evil.example"})
    header_sets = [r.headers for r in responses] + [info.value.headers]
    async with client.ws_connect("/ws") as ws:  # the 101 upgrade too
        header_sets.append(ws._response.headers)
    for headers in header_sets:
        for name, value in SECURITY_HEADERS.items():
            assert headers.get(name) == value, (name, headers)
    assert SECURITY_HEADERS["Content-Security-Policy"] == "default-src 'self'; connect-src 'self'"


async def test_page_and_static_files(gateway_client, server):
    client = await gateway_client(server.port)
    app = client.server.app
    page = await client.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    assert gateway.__version__ in await page.text()
    import aiohttp_jinja2

    assert aiohttp_jinja2.get_env(app).autoescape is True
    for name in ("chat.js", "chat.css"):
        response = await client.get(f"/static/{name}")
        assert response.status == 200, name
        assert await response.read() == (app[gateway.app.STATIC_DIR] / name).read_bytes()
    assert (await client.get("/static/../pyproject.toml")).status in (403, 404)
