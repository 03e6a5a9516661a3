"""The page across chat-server restarts, in real headless Chromium through
the real gateway: how the loss is worded, and how the page comes back."""

from __future__ import annotations

import re
import socket
import threading

import pytest
from browser_helpers import expect_, join, message_entry, notice_entry, room_entries

pytest_plugins = ["browser_fixtures"]
pytestmark = pytest.mark.browser

BACK = 20_000  # ms: reconnect backoff is capped at 15 s


class FreezableProxy:
    """A TCP forwarder on 127.0.0.1 to ``target_port`` that can freeze: it
    then forwards nothing and closes nothing, so the far side keeps a
    connection whose other end is gone, as after a network drop."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.socks: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
                far = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                return  # closed at teardown
            self.socks += [near, far]
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                src.settimeout(None)
                data = src.recv(65536)
                if self.frozen.is_set():
                    self.closed.wait(30)  # hold both ends open, pass nothing on
                    return
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except OSError:
            return  # a socket closed at teardown

    def close(self) -> None:
        self.closed.set()
        for sock in self.socks:
            sock.close()


@pytest.fixture
def freezable_proxy():
    """Factory: ``freezable_proxy(target_port) -> FreezableProxy``."""
    made: list[FreezableProxy] = []

    def make(target_port: int) -> FreezableProxy:
        made.append(FreezableProxy(target_port))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


def test_the_resume_token_takes_the_name_back_from_a_stale_session(
        server, start_gateway, pages, connect, freezable_proxy):
    expect = expect_()
    proxy = freezable_proxy(server.port)
    first = start_gateway(proxy.port)
    alice = pages.open(first.url)
    join(alice, "alice")
    token = pages.received[0][0]["resume"]
    assert re.fullmatch(r"[0-9a-f]{32}", token)
    kept = alice.evaluate("JSON.parse(sessionStorage.getItem('chatroom.resume'))")
    assert kept == {"name": "alice", "token": token}
    dave = connect("dave")
    expect(notice_entry(alice, "join", "dave")).to_have_count(1)

    # The link dies without a word: the server still holds alice's session.
    proxy.frozen.set()
    first.kill()
    expect(alice.locator("#status")).to_have_attribute("data-state", "reconnecting")
    dave.send({"type": "say", "text": "while alice is away"})
    start_gateway(server.port, http_port=first.port)
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected", timeout=BACK)
    assert pages.sent[-1][0] == {"type": "hello", "name": "alice", "resume": token}

    # The room saw the stale session replaced, then alice back.
    leave, _ = dave.recv_until(lambda m: m["type"] == "leave")
    assert leave["member"].startswith("alice@") and leave["reason"] == "replaced"
    dave.recv_until(lambda m: m["type"] == "join" and m["member"].startswith("alice@"))
    expect(message_entry(alice, "dave", "while alice is away")).to_have_count(1)
    expect(notice_entry(alice, "leave", "alice")).to_contain_text("left (reconnected)")
    seqs = [e["seq"] for e in room_entries(alice)]
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "gap or duplicate"
    # The new welcome's token replaces the old one.
    new_token = pages.received[-1][0]["resume"]
    assert new_token != token
    assert alice.evaluate("JSON.parse(sessionStorage.getItem('chatroom.resume'))") == {
        "name": "alice", "token": new_token}
    # Leaving forgets it.
    alice.click("#leave-button")
    assert alice.evaluate("sessionStorage.getItem('chatroom.resume')") is None


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
