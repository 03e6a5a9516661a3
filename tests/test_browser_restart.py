"""The whole product as a user starts it (``chatroom``: the launcher, its chat
server child and the gateway), in real headless Chromium: the chat server
is killed outright, the launcher starts it again on the same room
database, and the page carries on with one transcript."""

from __future__ import annotations

import logging
import os
import re
import signal
import time

import pytest
from browser_helpers import expect_, join, message_entry, room_entries
from conftest import Program, RawClient

log = logging.getLogger(__name__)
pytest_plugins = ["browser_fixtures"]
pytestmark = pytest.mark.browser

LISTENING = re.compile(r"listening on (\S+):(\d+)")
SERVING = re.compile(r"serving on http://(\S+?):(\d+)/")
STARTED = re.compile(r"the chat server started as pid (\d+)")


@pytest.fixture
def chatroom(tmp_path):
    """``python -m gateway.cli`` (the ``chatroom`` command) on free ports;
    its room database goes under this test's XDG_STATE_HOME (conftest)."""
    room = Program(tmp_path, "-m", "gateway.cli", "--port=0", "--http-port=0",
                   "--max-per-ip=200")
    yield room
    room.signal(signal.SIGTERM)
    room.kill()


def test_the_page_carries_on_when_chatroom_restarts_its_killed_server(chatroom, pages,
                                                                      request):
    expect = expect_()
    chat_port = int(chatroom.wait_log(LISTENING).group(2))
    host, http_port = chatroom.wait_log(SERVING).groups()
    alice = pages.open(f"http://{host}:{http_port}/")
    join(alice, "alice")
    dave = RawClient(chat_port)
    request.addfinalizer(dave.close)
    dave.join("dave")
    for n in range(3):
        dave.send({"type": "say", "text": f"before {n}"})
    expect(message_entry(alice, "dave", "before 2")).to_have_count(1)

    [first] = [int(pid) for pid in STARTED.findall(chatroom.log_text())]
    killed_at = time.monotonic()
    os.kill(first, signal.SIGKILL)
    expect(alice.locator("#transcript li.connection-lost")).to_have_count(1)
    chatroom.wait_log(rf"the chat server is back on port {chat_port}")
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected",
                                                       timeout=20_000)
    back_s = time.monotonic() - killed_at
    erin = RawClient(chat_port)
    request.addfinalizer(erin.close)
    erin.join("erin")
    erin.send({"type": "say", "text": "after"})
    expect(message_entry(alice, "erin", "after")).to_have_count(1)
    alice.wait_for_timeout(300)  # anything duplicated would arrive by now

    seqs = [e["seq"] for e in room_entries(alice)]
    assert seqs == list(range(1, seqs[-1] + 1)), "gap or duplicate in the transcript"
    assert [e["text"] for e in room_entries(alice) if e["kind"] == "message"] == [
        "before 0", "before 1", "before 2", "after"]
    expect(alice.locator("#transcript li.new-transcript")).to_have_count(0)
    assert chatroom.proc.poll() is None  # the launcher and gateway stayed up
    # How long the page was away (not asserted: timings belong in a benchmark).
    log.info("page back %.2f s after the server was killed", back_s)
