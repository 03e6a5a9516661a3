"""Connections from a trusted proxy (the web gateway) are counted under the
addresses it forwards, never under its own (issue 6 item 4)."""

import asyncio
import json
import re
import urllib.request

import aiohttp
import pytest
from conftest import Program, RawClient

SERVING = re.compile(r"serving on http://(\S+?):(\d+)/")


def test_a_forwarded_member_is_not_charged_to_the_proxy(start_server, open_client):
    server = start_server()  # loopback trusted, 32 per address
    for i in range(32):
        open_client(server.port, f"term{i}")  # direct members from 127.0.0.1
    probe = open_client(server.port)  # a health probe: ping before hello
    probe.send({"type": "ping", "token": "health"})
    assert probe.recv_type("pong")["token"] == "health"
    web = open_client(server.port)
    web.send({"type": "hello", "name": "web", "forwarded_for": "203.0.113.7"})
    assert web.recv_type("welcome")["label"] == "web@203.0.113.7"
    # A 33rd direct member from 127.0.0.1 is still one too many.
    extra = open_client(server.port)
    extra.send({"type": "hello", "name": "term32"})
    error = extra.recv_type("error")
    assert (error["code"], error["message"]) == ("too_many_connections",
                                                 "too many connections from 127.0.0.1")


def test_pending_proxied_connections_have_their_own_bound(start_server, open_client):
    server = start_server("--max-pending-proxied=3")
    pending = [open_client(server.port) for _ in range(3)]
    for client in pending:  # all three are in
        client.send({"type": "ping"})
        client.recv_type("pong")
    extra = open_client(server.port)
    error = extra.recv_type("error")
    assert error["code"] == "server_full"
    assert "waiting for hello" in error["message"]
    assert extra.closed_by_server()
    # Once one says hello it is counted under its address, and a seat frees.
    pending[0].send({"type": "hello", "name": "a", "forwarded_for": "198.51.100.1"})
    pending[0].recv_type("welcome")
    late = open_client(server.port)
    late.send({"type": "ping", "token": "late"})
    assert late.recv_type("pong")["token"] == "late"


# --- through the real gateway --------------------------------------------------

@pytest.fixture
def gateway(tmp_path, server_for_gateway):
    """``python -m gateway`` trusting 127.0.0.1 as its reverse proxy, in
    front of a chat server with default limits; yields (http base, server)."""
    gw = Program(tmp_path, "-m", "gateway", "--http-port=0",
                 f"--chat-port={server_for_gateway.port}", "--trusted-proxy=127.0.0.1/32")
    try:
        host, port = gw.wait_log(SERVING).groups()
        yield f"http://{host}:{port}", server_for_gateway
    finally:
        gw.kill()


@pytest.fixture
def server_for_gateway(start_server):
    return start_server()  # default limits: 32 per address


async def read_until(ws, kinds: set[str], timeout: float = 20) -> dict:
    """The first server payload whose type is in ``kinds`` (errors too)."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            for line in msg.data.split("\n"):
                payload = json.loads(line)
                if payload["type"] in kinds or payload["type"] == "error":
                    return payload


async def join(http, base: str, name: str, address: str, resume: str | None = None):
    """A browser session from ``address``; returns (ws, welcome or error)."""
    ws = await http.ws_connect(f"{base}/ws", headers={"X-Forwarded-For": address})
    hello = {"type": "hello", "name": name}
    if resume:
        hello["resume"] = resume
    await ws.send_json(hello)
    return ws, await read_until(ws, {"welcome"})


async def sessions_at_once(base: str, count: int, prefix: str) -> list[dict]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        results = await asyncio.gather(*(
            join(http, base, f"{prefix}{i}", f"198.51.100.{i + 1}") for i in range(count)))
        replies = [reply for _, reply in results]
        for ws, _ in results:
            await ws.close()
    return replies


def test_forty_browsers_through_one_gateway_all_welcomed(gateway):
    base, _ = gateway
    replies = asyncio.run(sessions_at_once(base, 40, "web"))
    assert [r["type"] for r in replies] == ["welcome"] * 40, [
        r for r in replies if r["type"] != "welcome"]
    assert sorted(r["label"] for r in replies) == sorted(
        f"web{i}@198.51.100.{i + 1}" for i in range(40))


def test_terminal_members_do_not_shut_browsers_or_health_out(gateway):
    base, server = gateway
    members = [RawClient(server.port) for _ in range(32)]
    try:
        for i, member in enumerate(members):
            member.join(f"term{i}")

        async def browser() -> dict:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                ws, reply = await join(http, base, "browser", "203.0.113.7")
                await ws.close()
                return reply

        reply = asyncio.run(browser())
        assert (reply["type"], reply.get("label")) == ("welcome", "browser@203.0.113.7")
        with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
            health = json.loads(response.read())
        assert (response.status, health["status"]) == (200, "ok"), health
    finally:
        for member in members:
            member.close()


def test_a_reconnect_storm_of_200_browsers_all_get_back_in(gateway):
    base, _ = gateway
    count = 200
    addresses = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(count)]

    async def storm() -> list[dict]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            first = await asyncio.gather(*(join(http, base, f"b{i}", addresses[i])
                                           for i in range(count)))
            assert [r["type"] for _, r in first] == ["welcome"] * count
            tokens = [r["resume"] for _, r in first]
            # Every session drops at once, then all reconnect at once.
            await asyncio.gather(*(ws.close() for ws, _ in first))
            again = await asyncio.gather(*(join(http, base, f"b{i}", addresses[i], tokens[i])
                                           for i in range(count)))
            await asyncio.gather(*(ws.close() for ws, _ in again))
            return [r for _, r in again]

    replies = asyncio.run(storm())
    refused = [r for r in replies if r["type"] != "welcome"]
    assert refused == []
    assert sorted(r["label"] for r in replies) == sorted(
        f"b{i}@{addresses[i]}" for i in range(count))
