"""The page with a room kept in Redis (real redis-server, server, gateway,
Chromium)."""

from __future__ import annotations

import time

import pytest
from browser_helpers import expect_, join, message_entry, say

pytest_plugins = ["browser_fixtures", "redis_fixtures"]
pytestmark = pytest.mark.browser

BACK = 30_000  # ms: the page's reconnect backoff, then Redis's own reconnect


def test_a_page_rejoining_while_redis_is_away_gets_in_once_it_is_back(
        start_redis, start_server, start_gateway, pages):
    expect = expect_()
    redis = start_redis()
    server = start_server("--max-per-ip=200", f"--redis={redis.url}")
    gateway = start_gateway(server.port)
    alice = pages.open(gateway.url)
    join(alice, "alice")
    redis.kill()
    # The page loses its link (a new gateway on the same port) while Redis
    # is away: its hello is answered room_unavailable, and asked again.
    gateway.kill()
    start_gateway(server.port, gateway.port)
    expect(alice.locator("#status")).to_have_attribute("data-state", "reconnecting",
                                                       timeout=BACK)
    expect(alice.locator("#status")).to_contain_text("unavailable", timeout=BACK)
    redis.start()
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected", timeout=BACK)
    say(alice, "back again")
    expect(message_entry(alice, "alice", "back again")).to_have_count(1)
    # A reconnect attempt may land between the two gateways: that refusal is
    # the test's doing; anything else is the page's.
    assert [p for p in pages.problems if "ERR_CONNECTION_REFUSED" not in p] == []


def test_a_gap_the_room_cannot_read_while_redis_is_away_offers_load_again(
        start_redis, start_server, start_gateway, pages, open_client):
    # The gap's events are older than the server's in-memory copy, so a
    # Load reads them from Redis; with Redis away the answer is
    # room_unavailable.  The marker says so and offers Load again at once
    # (it showed "Loading" until its request timed out); once Redis is
    # back, Load fills the gap.
    expect = expect_()
    redis = start_redis(persist=True)
    server = start_server("--max-per-ip=200", f"--redis={redis.url}", "--history=5",
                          "--history-replay=5")
    dave = open_client(server.port, "dave")
    gateway = start_gateway(server.port)
    alice = pages.open(gateway.url)
    join(alice, "alice")
    gateway.kill()
    expect(alice.locator("#status")).to_have_attribute("data-state", "reconnecting")
    dave.recv_until(lambda m: m["type"] == "leave" and m["member"].startswith("alice@"))
    for n in range(30):
        dave.send({"type": "say", "text": f"away {n:02d}"})
    dave.recv_until(lambda m: m.get("text") == "away 29")
    start_gateway(server.port, gateway.port)
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected", timeout=BACK)
    marker = alice.locator("#transcript li.gap-marker")
    expect(marker).to_have_count(1)
    expect(alice.locator("#transcript")).to_have_attribute("aria-busy", "false")

    redis.kill()
    degraded(dave, True)
    marker.locator("button").click()
    expect(marker).to_have_attribute("data-state", "unavailable")
    expect(marker.locator(".gap-text")).to_contain_text("the room cannot read them right now")
    redis.start()
    degraded(dave, False)
    marker.locator("button").click()
    expect(marker).to_have_count(0)
    expect(message_entry(alice, "dave", "away 00")).to_have_count(1)
    assert [p for p in pages.problems if "ERR_CONNECTION_REFUSED" not in p] == []


def degraded(member, want: bool, timeout: float = 20.0) -> None:
    """Ping until the pong says the room is (or is no longer) degraded."""
    deadline = time.monotonic() + timeout
    while True:
        member.send({"type": "ping", "token": "health"})
        pong, _ = member.recv_until(lambda m: m.get("token") == "health")
        if bool(pong.get("degraded")) == want:
            return
        assert time.monotonic() < deadline, f"degraded never became {want}"
        time.sleep(0.1)
