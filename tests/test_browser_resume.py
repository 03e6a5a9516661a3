"""The page across chat-server restarts, in real headless Chromium through
the real gateway: how the loss is worded, and how the page comes back."""

from __future__ import annotations

import re
import socket
import sqlite3
import threading

import pytest
from browser_helpers import PHONE, expect_, join, message_entry, notice_entry, room_entries
from conftest import ARTIFACTS

from tcpserver import protocol

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
    expect(restart).to_have_text(re.compile(r"shut down \(restarting or stopping\)"))
    expect(status).to_contain_text("the server is restarting or stopping")
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


def _welcomes(pages) -> list[dict]:
    return [m for socket_ in pages.received for m in socket_ if m["type"] == "welcome"]


@pytest.mark.parametrize("stop", ["kill", "terminate"])
def test_the_page_continues_across_a_server_restart_with_no_gap(
        stop, start_server, start_gateway, pages, open_client, tmp_path):
    expect = expect_()
    db = f"--db={tmp_path / 'room.db'}"
    first = start_server("--max-per-ip=200", db, "--shutdown-grace=0.5")
    gateway = start_gateway(first.port)
    alice = pages.open(gateway.url)
    join(alice, "alice")
    dave = open_client(first.port, "dave")
    for n in range(3):
        dave.send({"type": "say", "text": f"before {n}"})
    expect(message_entry(alice, "dave", "before 2")).to_have_count(1)

    # A crash (no notice, 1011) or an orderly restart (1012); same database.
    getattr(first, stop)()
    second = start_server("--max-per-ip=200", db, f"--port={first.port}")
    erin = open_client(second.port, "erin")
    for n in range(3):
        erin.send({"type": "say", "text": f"while away {n}"})
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected", timeout=BACK)
    erin.send({"type": "say", "text": "after"})
    expect(message_entry(alice, "erin", "after")).to_have_count(1)
    alice.wait_for_timeout(300)  # anything duplicated would arrive by now

    entries = room_entries(alice)
    seqs = [e["seq"] for e in entries]
    assert seqs == list(range(1, seqs[-1] + 1)), "gap or duplicate in the transcript"
    texts = [e["text"] for e in entries if e["kind"] == "message"]
    assert texts == ["before 0", "before 1", "before 2",
                     "while away 0", "while away 1", "while away 2", "after"]
    # One transcript: the same epoch, so no "new transcript" notice.
    welcomes = _welcomes(pages)
    assert len(welcomes) == 2 and welcomes[0]["epoch"] == welcomes[1]["epoch"]
    expect(alice.locator("#transcript li.new-transcript")).to_have_count(0)
    expect(alice.locator("#transcript li", has_text="new transcript")).to_have_count(0)
    expect(alice.locator("#member-list .member-name")).to_have_text(["alice", "erin"])


def _top_offset(page, seq: int) -> float:
    """Where the entry ``seq`` sits, in px below the transcript's top edge."""
    return page.eval_on_selector(
        f"#transcript li[data-seq='{seq}']",
        "e => e.getBoundingClientRect().top - e.parentElement.getBoundingClientRect().top")


def test_scrolling_up_loads_older_messages_in_pages(start_server, start_gateway, pages,
                                                    open_client, tmp_path):
    expect = expect_()
    server = start_server("--max-per-ip=200", f"--db={tmp_path / 'room.db'}",
                          "--history=20", "--msg-burst=200")
    gateway = start_gateway(server.port)
    dave = open_client(server.port, "dave")  # seq 1
    for n in range(130):  # seq 2-131
        dave.send({"type": "say", "text": f"old {n}"})
    dave.recv_until(lambda m: m.get("text") == "old 129", timeout=10)
    alice = pages.open(gateway.url, PHONE)
    join(alice, "alice")  # seq 132, after a replay of 112-131
    marker = alice.locator("#older")
    transcript = alice.locator("#transcript")
    assert [e["seq"] for e in room_entries(alice)] == list(range(112, 133))
    expect(marker).to_have_attribute("data-state", "idle")

    oldest = 112
    for expected_first, more in ((62, True), (12, True), (1, False)):
        # To the top, and where the oldest entry then sits, before the
        # scroll event (next frame) asks for the page.
        before = transcript.evaluate(
            """(t, seq) => {
                t.scrollTop = 0;
                const e = t.querySelector(`li[data-seq='${seq}']`);
                return e.getBoundingClientRect().top - t.getBoundingClientRect().top;
            }""", oldest)
        expect(alice.locator(f"#transcript li[data-seq='{expected_first}']")).to_have_count(1)
        expect(marker).to_have_attribute("data-state", "idle" if more else "start")
        # The reader's place is kept: what was at the top has not moved.
        assert abs(_top_offset(alice, oldest) - before) <= 1
        oldest = expected_first

    entries = room_entries(alice)
    assert [e["seq"] for e in entries] == list(range(1, 133)), "gap or duplicate"
    assert [e["text"] for e in entries if e["kind"] == "message"] == [
        f"old {n}" for n in range(130)]
    expect(marker.locator(".older-text")).to_have_text("The beginning of the room")
    expect(marker.locator("button")).to_be_hidden()
    befores = [m for m in pages.sent[0] if m["type"] == "history"]
    assert befores == [{"type": "history", "before": b, "limit": 50} for b in (112, 62, 12)]
    # The member list was not touched by old joins and leaves.
    expect(alice.locator("#member-list .member-name")).to_have_text(["alice", "dave"])
    alice.evaluate("document.activeElement.blur()")
    transcript.evaluate("t => { t.scrollTop = 0; }")
    alice.screenshot(path=str(ARTIFACTS / "older-375.png"))
    assert len([m for m in pages.sent[0] if m["type"] == "history"]) == 3

    # Live messages still arrive at the end; a reader up here stays put.
    place = transcript.evaluate("t => t.scrollTop")
    dave.send({"type": "say", "text": "new"})
    expect(message_entry(alice, "dave", "new")).to_have_count(1)
    assert transcript.evaluate("t => t.scrollTop") == place
    assert pages.problems == []


def test_a_log_restored_from_a_backup_starts_a_new_transcript(
        start_server, start_gateway, pages, open_client, tmp_path):
    expect = expect_()
    db, backup = tmp_path / "room.db", tmp_path / "backup.db"
    first = start_server("--max-per-ip=200", f"--db={db}")
    gateway = start_gateway(first.port)
    alice = pages.open(gateway.url)
    join(alice, "alice")
    dave = open_client(first.port, "dave")
    dave.send({"type": "say", "text": "kept"})
    expect(message_entry(alice, "dave", "kept")).to_have_count(1)
    with sqlite3.connect(db) as live, sqlite3.connect(backup) as copy:
        live.backup(copy)
    # More than the restored room will issue before the page is back (the
    # leaves of the members the kill stranded, erin's join and message).
    for n in range(10):
        dave.send({"type": "say", "text": f"lost {n}"})
    expect(message_entry(alice, "dave", "lost 9")).to_have_count(1)

    # The same epoch, but its numbers stop short of the page's: they will
    # be issued again to new events, which must not be taken for repeats.
    first.kill()
    second = start_server("--max-per-ip=200", f"--db={backup}", f"--port={first.port}")
    # (Only a last seq below the page's can tell: numbers that reach the
    # page's again carry no sign that they are other events.)
    erin = open_client(second.port, "erin")
    erin.send({"type": "say", "text": "new"})
    expect(alice.locator("#status")).to_have_attribute("data-state", "connected", timeout=BACK)
    expect(alice.locator("#transcript li.new-transcript")).to_have_count(1)
    expect(message_entry(alice, "erin", "new")).to_have_count(1)
    erin.send({"type": "say", "text": "after"})
    expect(message_entry(alice, "erin", "after")).to_have_count(1)
    # Below the notice, the restored room's transcript, in order.
    below = alice.eval_on_selector_all("#transcript li.new-transcript ~ li[data-seq]",
                                       "els => els.map(e => Number(e.dataset.seq))")
    assert below == list(range(1, below[-1] + 1))
    assert pages.problems == []


class ScriptedServer:
    """A chat-server peer on 127.0.0.1 that answers from a script: for
    answers the real server never gives (``unknown_seq`` to a page whose
    welcome looked in order).  ``script(conn, n, message)`` is called for
    each client message on the n-th connection that said hello; pings are
    answered here.  Speaks through the real codec."""

    def __init__(self, script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.hellos = 0
        self.received: list[dict] = []
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        decoder = protocol.FrameDecoder()
        number = None
        try:
            while data := conn.recv(65536):
                decoder.receive_data(data)
                while (payload := decoder.next_payload()) is not None:
                    message = protocol.parse_client_message(payload)
                    if message["type"] == "ping":
                        conn.sendall(protocol.encode_frame({"type": "pong"}))
                        continue
                    if message["type"] == "hello":
                        self.hellos += 1
                        number = self.hellos
                    self.received.append(message)
                    for reply in self.script(number, message):
                        if reply == "close":
                            conn.close()
                            return
                        conn.sendall(protocol.encode_frame(reply))
        except OSError:
            return

    def close(self) -> None:
        for sock in [self.listener, *self.conns]:
            sock.close()


def _event(kind: str, seq: int, **fields) -> dict:
    return {"type": kind, "seq": seq, "ts": 1_795_834_800_000 + seq, **fields}


def test_unknown_seq_starts_a_new_transcript(start_gateway, pages):
    expect = expect_()
    me = "alice@127.0.0.1"

    def welcome(last_seq: int) -> dict:
        return {"type": "welcome", "name": "alice", "label": me, "epoch": "e1",
                "last_seq": last_seq, "members": [me], "more": False, "history": 0,
                "count": 1, "large": False, "resume": "0" * 32}

    def script(n: int, message: dict) -> list:
        kind = message["type"]
        if (n, kind) == (1, "hello"):
            return [welcome(5), _event("join", 6, member=me)]
        if (n, kind) == (1, "say"):  # then the server dies without a word
            return [_event("message", 7, **{"from": me, "text": message["text"]}), "close"]
        if (n, kind) == (2, "hello"):  # numbers that look in order, from another log
            return [welcome(9), _event("join", 10, member=me)]
        if kind == "history" and "after" in message:
            return [{"type": "error", "code": "unknown_seq",
                     "message": "seq 7 was never issued in this room (the last is 5)"}]
        if kind == "history":
            return [{"type": "history", "before": message["before"], "count": 2, "more": False},
                    _event("message", 8, **{"from": "bob@127.0.0.1", "text": "eight"}),
                    _event("message", 9, **{"from": "bob@127.0.0.1", "text": "nine"})]
        return []

    server = ScriptedServer(script)
    try:
        gateway = start_gateway(server.port)
        alice = pages.open(gateway.url)
        join(alice, "alice")
        alice.fill("#compose-text", "before")
        alice.press("#compose-text", "Enter")
        expect(alice.locator("#transcript li.connection-lost")).to_have_count(1)
        expect(alice.locator("#status")).to_have_attribute("data-state", "connected",
                                                           timeout=BACK)
        notice = alice.locator("#transcript li.new-transcript")
        expect(notice).to_have_count(1)
        # Below the notice: this log's own events, the older ones loaded back.
        expect(message_entry(alice, "bob", "nine")).to_have_count(1)
        below = alice.eval_on_selector_all("#transcript li.new-transcript ~ li[data-seq]",
                                           "els => els.map(e => Number(e.dataset.seq))")
        assert below == [8, 9, 10]
        history = [m for m in server.received if m["type"] == "history"]
        assert history == [{"type": "history", "after": 7},
                           {"type": "history", "before": 10, "limit": 50}]
        expect(alice.locator("#compose-error")).to_have_text("")
    finally:
        server.close()
