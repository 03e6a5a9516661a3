"""The page across chat-server restarts, in real headless Chromium through
the real gateway: how the loss is worded, and how the page comes back."""

from __future__ import annotations

import re

import pytest
from browser_helpers import expect_, join

pytest_plugins = ["browser_fixtures"]
pytestmark = pytest.mark.browser

BACK = 20_000  # ms: reconnect backoff is capped at 15 s


def test_a_restart_and_a_lost_server_are_worded_differently(start_server, start_gateway,
                                                            pages):
    expect = expect_()
    first = start_server("--max-per-ip=200", "--shutdown-grace=0.5")
    gateway = start_gateway(first.port)
    alice = pages.open(gateway.url)
    join(alice, "alice")
    status = alice.locator("#status-text")
    restart = alice.locator("#transcript li.connection-restart")
    lost = alice.locator("#transcript li.connection-lost")

    # An orderly stop: the server says shutdown, the gateway closes 1012.
    assert first.terminate() == 0
    expect(restart).to_have_count(1)
    expect(restart).to_have_text(re.compile(r"restarting"))
    expect(status).to_contain_text("the server is restarting")
    second = start_server("--max-per-ip=200", f"--port={first.port}")
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected", timeout=BACK)

    # A crash: no notice, the gateway closes 1011.
    second.kill()
    expect(lost).to_have_count(1)
    expect(lost).to_have_text(re.compile(r"Lost the chat server: it stopped without notice"))
    expect(status).to_contain_text("the chat server is unreachable")
    start_server("--max-per-ip=200", f"--port={first.port}")
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected", timeout=BACK)
    expect(alice.locator("#transcript li.connection-dropped")).to_have_count(0)
    expect(restart).to_have_count(1)
    expect(lost).to_have_count(1)
