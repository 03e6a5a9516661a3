"""The page with a room kept in Redis (real redis-server, server, gateway,
Chromium)."""

from __future__ import annotations

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
