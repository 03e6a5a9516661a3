"""The terminal client comes back: server restarts, network drops, resume
tokens, the gap filled once, and /history reaching back.

Real server subprocesses on a fixed port (restarted in place) and a small
TCP proxy in the test that can cut or hold the link.
"""

from __future__ import annotations

import re
import select
import signal
import socket
import threading
import time

import pexpect
import pytest
from conftest import RawClient
from test_client import Terminal

from tcpserver import protocol, transcript
from tcpserver.client import backoff

TIME = r"\[\d\d:\d\d:\d\d\]"
RECONNECTING = r"^! the connection was lost; reconnecting \(Ctrl-C to stop\)$"
RESTARTING = r"^! the server is restarting or stopping; reconnecting \(Ctrl-C to stop\)$"
NEW_EPOCH = "^" + re.escape(transcript.NEW_EPOCH) + "$"


class Proxy:
    """A TCP relay from a loopback port to ``target``, one thread per link.

    ``cut()`` closes every link (both sides, or only the client's side,
    leaving the server holding a stale connection); while ``held``, new
    connections are closed at once, so the client keeps retrying.  New
    links reach the server from ``source`` (another loopback address makes
    the client come back under another label).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.source = "127.0.0.1"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held = False
        self.links: list[tuple[socket.socket, socket.socket]] = []
        self.stale: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.held:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5,
                                                source_address=(self.source, 0))
            with self._lock:
                self.links.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return  # cut: a socket was closed under us

    def cut(self, server_side: bool = True) -> None:
        with self._lock:
            links, self.links = self.links, []
        for client, upstream in links:
            if not server_side:
                self.stale.append(upstream)  # kept open: a reference, or GC closes it
            # shutdown first: close() alone would not wake the pump's select.
            for sock in (client, upstream) if server_side else (client,):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._stop = True
        self.cut()
        for sock in self.stale:
            sock.close()
        self.listener.close()


@pytest.fixture
def proxy():
    made: list[Proxy] = []

    def make(target: int) -> Proxy:
        made.append(Proxy(target))
        return made[-1]

    yield make
    for p in made:
        p.close()


def shown(client, pattern: str) -> int:
    """How many stdout lines of ``client`` match ``pattern``."""
    return len(re.findall(pattern, client.text(), re.MULTILINE))


def wait_seen(raw, label: str, timeout: float = 10.0) -> None:
    """Read ``raw`` until ``label``'s join arrives."""
    raw.recv_until(lambda m: m["type"] == "join" and m["member"] == label, timeout)


# --- the backoff -----------------------------------------------------------


def test_backoff_doubles_from_half_a_second_to_15_s_with_20_percent_jitter():
    import random
    rng = random.Random(7)
    for attempt, base in enumerate([0.5, 1, 2, 4, 8, 15, 15, 15]):
        delays = [backoff(attempt, rng) for _ in range(200)]
        assert all(0.8 * base <= d <= 1.2 * base for d in delays), (attempt, base)
        assert max(delays) - min(delays) > 0.2 * base  # jittered, not fixed
    assert backoff(10_000, rng) <= 18


# --- server restarts ---------------------------------------------------------


def test_client_survives_a_killed_server_and_shows_missed_messages_once(start_server, piped,
                                                                       open_client):
    server = start_server("--max-per-ip=200")
    port = server.port
    bob = piped(port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice = open_client(port, "alice")
    alice.send({"type": "say", "text": "before the crash"})
    bob.expect(rf"^{TIME} alice@127.0.0.1: before the crash$")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(5)
    bob.expect(RECONNECTING, key="err")
    # Restarted in place; without a stored log it starts a new transcript.
    restarted = start_server("--max-per-ip=200", f"--port={port}")
    carol = open_client(restarted.port, "carol")
    for i in range(3):
        carol.send({"type": "say", "text": f"missed {i}"})
    bob.expect(r"^\* reconnected as bob@127.0.0.1 \(\d+ in the room\)$")
    bob.expect(NEW_EPOCH, key="err")
    for i in range(3):
        # Said before or after bob was back: in his welcome's history, or live.
        bob.expect(rf"^{TIME} (\(history\) )?carol@127.0.0.1: missed {i}$")
    bob.type("back again")
    carol.recv_until(lambda m: m["type"] == "message" and m["text"] == "back again")
    assert bob.finish() == 0
    for i in range(3):
        assert shown(bob, rf"carol@127.0.0.1: missed {i}$") == 1, bob.text()
    assert shown(bob, r"alice@127.0.0.1: before the crash$") == 1
    assert len(re.findall(RECONNECTING, bob.text("err"), re.M)) == 1
    assert "Traceback" not in bob.text("err")


def test_a_server_restarted_on_its_database_is_continued_without_a_gap(start_server, piped,
                                                                       open_client):
    server = start_server("--max-per-ip=200")
    port, db = server.port, server.db
    bob = piped(port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice = open_client(port, "alice")
    alice.send({"type": "say", "text": "before the crash"})
    bob.expect(rf"^{TIME} alice@127.0.0.1: before the crash$")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(5)
    bob.expect(RECONNECTING, key="err")
    restarted = start_server("--max-per-ip=200", f"--port={port}", f"--db={db}")
    carol = open_client(restarted.port, "carol")
    for i in range(3):
        carol.send({"type": "say", "text": f"missed {i}"})
    bob.expect(r"^\* reconnected as bob@127.0.0.1 \(\d+ in the room\)$")
    bob.expect(rf"^{TIME} carol@127.0.0.1: missed 2$")
    assert bob.finish() == 0
    out = bob.text()
    # Same epoch: the transcript simply continues; nothing is replayed as
    # history, nothing twice, and no restart notice.
    after = out[out.index("* reconnected as bob@127.0.0.1"):]
    assert "(history)" not in after, out
    assert transcript.NEW_EPOCH not in bob.text("err")
    for i in range(3):
        assert shown(bob, rf"^{TIME} carol@127.0.0.1: missed {i}$") == 1, out
    assert shown(bob, r"alice@127.0.0.1: before the crash$") == 1
    assert shown(bob, rf"^{TIME} \* carol@127.0.0.1 joined$") == 1


def test_after_a_shutdown_notice_the_client_comes_back(start_server, piped, open_client):
    server = start_server("--max-per-ip=200")
    port = server.port
    bob = piped(port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    assert server.terminate() == 0
    bob.expect(r"^! shutdown: the server is shutting down$", key="err")
    bob.expect(RESTARTING, key="err")
    # A line piped while away waits for the rejoin, then goes out once.
    bob.type("hello again")
    restarted = start_server("--max-per-ip=200", f"--port={port}")
    alice = open_client(restarted.port, "alice")
    bob.expect(r"^\* reconnected as bob@127.0.0.1 \(\d+ in the room\)$")
    msg, _ = alice.recv_until(lambda m: m["type"] == "message")
    assert (msg["from"], msg["text"]) == ("bob@127.0.0.1", "hello again")
    assert bob.finish() == 0
    _, rest = alice.recv_until(lambda m: m["type"] == "leave" and m["member"] == "bob@127.0.0.1")
    assert not [m for m in rest if m["type"] == "message"], rest


def test_ctrl_c_while_reconnecting_exits_zero(start_server, piped):
    server = start_server()
    bob = piped(server.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    server.proc.send_signal(signal.SIGKILL)
    bob.expect(RECONNECTING, key="err")
    bob.proc.send_signal(signal.SIGINT)
    assert bob.wait() == 0
    assert "Traceback" not in bob.text("err")


# --- network drops -------------------------------------------------------------


def test_a_dropped_link_is_rejoined_and_the_gap_filled_once(server, proxy, piped, connect):
    link = proxy(server.port)
    bob = piped(link.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice = connect("alice")
    alice.send({"type": "say", "text": "seen live"})
    bob.expect(rf"^{TIME} alice@127.0.0.1: seen live$")
    link.held = True
    link.cut()
    bob.expect(RECONNECTING, key="err")
    alice.recv_until(lambda m: m["type"] == "leave" and m["member"] == "bob@127.0.0.1")
    for i in range(5):
        alice.send({"type": "say", "text": f"while away {i}"})
    alice.recv_until(lambda m: m["type"] == "message" and m["text"] == "while away 4")
    link.held = False
    bob.expect(r"^\* reconnected as bob@127.0.0.1 \(\d+ in the room\)$")
    bob.expect(rf"^{TIME} alice@127.0.0.1: while away 4$")
    bob.type("/who")
    bob.expect(r"^\* in the room \(2\)", timeout=10)
    assert bob.finish() == 0
    out = bob.text()
    # Same epoch: no restart notice; the missed lines are shown once, in
    # order, after the reconnect line and not as (history).
    assert transcript.NEW_EPOCH not in bob.text("err")
    back = out.index("* reconnected as bob@127.0.0.1")
    positions = [out.index(f"alice@127.0.0.1: while away {i}") for i in range(5)]
    assert back < positions[0] and positions == sorted(positions), out
    for i in range(5):
        assert shown(bob, rf"^{TIME} alice@127.0.0.1: while away {i}$") == 1, out
    assert shown(bob, r"seen live$") == 1
    assert shown(bob, rf"^{TIME} \* bob@127.0.0.1 hung up$") == 1
    # One line when back: the member list comes only when asked for.
    assert shown(bob, r"^\* in the room \(2\): ") == 1, out


def test_a_gap_the_server_no_longer_holds_is_counted(start_server, proxy, piped, open_client):
    # An in-memory log keeps --history events, 3 here: most of the gap is
    # gone, and the client says how much, once (after asking for them with
    # history before), then shows the rest in order.
    server = start_server("--db=:memory:", "--history=3", "--max-per-ip=200")
    link = proxy(server.port)
    bob = piped(link.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice = open_client(server.port, "alice")
    bob.expect(rf"^{TIME} \* alice@127.0.0.1 joined$")
    link.held = True
    link.cut()
    bob.expect(RECONNECTING, key="err")
    for i in range(12):
        alice.send({"type": "say", "text": f"away {i:02d}"})
    alice.recv_until(lambda m: m["type"] == "message" and m["text"] == "away 11")
    link.held = False
    bob.expect(rf"^{TIME} alice@127.0.0.1: away 11$")
    assert bob.finish() == 0
    # Missed: bob's hang-up and away 00..08; the welcome replayed 09..11.
    # Asked for with history before, they are gone from the log.
    assert re.findall(r"^! (\d+) events from while you were away are no longer kept by "
                      r"the server$", bob.text("err"), re.M) == ["10"], bob.text("err")
    texts = re.findall(r"alice@127.0.0.1: (away \d\d)$", bob.text(), re.M)
    assert texts == ["away 09", "away 10", "away 11"], bob.text()


def test_resume_takes_the_name_back_from_a_stale_connection(server, proxy, piped, connect):
    link = proxy(server.port)
    bob = piped(link.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice = connect("alice")
    # Only bob's side is cut: the server still holds bob's old connection,
    # as after a network drop it has not noticed yet.
    link.cut(server_side=False)
    bob.expect(RECONNECTING, key="err")
    bob.expect(r"^\* reconnected as bob@127.0.0.1 \(\d+ in the room\)$")
    leave, _ = alice.recv_until(lambda m: m["type"] == "leave")
    assert (leave["member"], leave["reason"]) == ("bob@127.0.0.1", "replaced")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 left \(replaced by a new connection\)$")
    assert bob.finish() == 0


def cut_at_the_prompt(term: Terminal, link, connect) -> RawClient:
    """Wait for bob's prompt, seat alice, cut bob's link and hold it down
    until the terminal says it is reconnecting; return alice."""
    term.wait(lambda: term.cursor_row() == "[bob@127.0.0.1]>", "the prompt")
    alice = connect("alice")
    link.held = True
    link.cut()
    term.wait(lambda: "! the connection was lost; reconnecting (Ctrl-C to stop)"
              in term.rows(), "the reconnecting line")
    return alice


def test_terminal_comes_back_with_the_gap_filled_and_the_prompt_intact(server, proxy, connect):
    link = proxy(server.port)
    term = Terminal(link.port, "bob")
    try:
        alice = cut_at_the_prompt(term, link, connect)
        for i in range(3):
            alice.send({"type": "say", "text": f"while away {i}"})
        alice.recv_until(lambda m: m["type"] == "message" and m["text"] == "while away 2")
        term.child.send("typed meanwhile")
        link.held = False
        term.wait(lambda: "* reconnected as bob@127.0.0.1 (2 in the room)" in term.rows(),
                  "the return")
        term.wait(lambda: any(r.endswith("alice@127.0.0.1: while away 2") for r in term.rows()),
                  "the missed lines")
        rows = term.rows()
        for i in range(3):
            assert sum(r.endswith(f"alice@127.0.0.1: while away {i}") for r in rows) == 1, rows
        term.wait(lambda: term.cursor_row() == "[bob@127.0.0.1]> typed meanwhile", "the draft")
        term.child.send("\r")
        msg, _ = alice.recv_until(lambda m: m["type"] == "message")
        assert (msg["from"], msg["text"]) == ("bob@127.0.0.1", "typed meanwhile")
        term.wait(lambda: any(r.endswith("bob@127.0.0.1: typed meanwhile") for r in term.rows())
                  and term.cursor_row() == "[bob@127.0.0.1]>", "the echo and a fresh prompt")
        term.child.sendcontrol("d")
        term.child.expect(pexpect.EOF, timeout=5)
        term.child.close()
        assert term.child.exitstatus == 0
    finally:
        term.close()


def test_a_line_refused_while_reconnecting_is_sent_by_enter_once_back(server, proxy, connect):
    link = proxy(server.port)
    term = Terminal(link.port, "bob")
    try:
        alice = cut_at_the_prompt(term, link, connect)
        term.child.send("kept line\r")  # refused: not connected, the line stays
        term.wait(lambda: any("the line is kept" in r for r in term.rows()), "the refusal")
        link.held = False
        term.wait(lambda: "* reconnected as bob@127.0.0.1 (2 in the room)" in term.rows(),
                  "the return")
        term.child.send("\r")  # the same text, unchanged: Enter alone must send it now
        msg, _ = alice.recv_until(lambda m: m["type"] == "message")
        assert (msg["from"], msg["text"]) == ("bob@127.0.0.1", "kept line")
    finally:
        term.close()


def test_a_name_taken_by_someone_else_while_away_ends_the_client(server, proxy, piped,
                                                                   connect):
    link = proxy(server.port)
    bob = piped(link.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    link.held = True
    link.cut()
    bob.expect(RECONNECTING, key="err")
    impostor = connect()
    for _ in range(100):  # until the server has seen bob hang up
        impostor.send({"type": "hello", "name": "BOB"})
        reply, _ = impostor.recv_until(lambda m: m["type"] in ("welcome", "error"))
        if reply["type"] == "welcome":
            break
        assert reply["code"] == "name_taken", reply
        time.sleep(0.05)
    assert reply["type"] == "welcome"
    link.held = False
    assert bob.wait() == 2
    assert bob.text("err").splitlines()[-1] == (
        "! cannot rejoin as 'bob': the name 'bob' is taken (name_taken)")


def test_a_line_cut_off_by_a_drop_is_resent_even_if_its_text_was_said_before(piped):
    # bob says "same" twice; the link drops before the second echo. The
    # replay after the rejoin holds the first "same": that is not the
    # second one's echo, so the line must be sent again.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    seen: list[dict] = []
    failures: list[BaseException] = []

    def frames(sock, *messages):
        sock.sendall(b"".join(protocol.encode_frame(m) for m in messages))

    def serve():
        label = "bob@10.0.0.1"
        welcome = {"type": "welcome", "name": "bob", "label": label, "epoch": "e1",
                   "members": [label], "more": False, "resume": "t1"}
        said = {"type": "message", "seq": 2, "from": label, "text": "same", "ts": 0}
        try:
            with listener:
                sock, _ = listener.accept()
                with sock:
                    decoder = protocol.FrameDecoder()
                    seen.append(read_message(sock, decoder))  # hello
                    frames(sock, {**welcome, "last_seq": 0, "history": 0},
                           {"type": "join", "seq": 1, "member": label, "ts": 0})
                    seen.append(read_message(sock, decoder))  # say same
                    frames(sock, said)
                    seen.append(read_message(sock, decoder))  # say same, again: drop
                sock, _ = listener.accept()
                with sock:
                    decoder = protocol.FrameDecoder()
                    seen.append(read_message(sock, decoder))  # hello with resume
                    frames(sock, {**welcome, "last_seq": 2, "history": 2},
                           {"type": "join", "seq": 1, "member": label, "ts": 0}, said,
                           {"type": "join", "seq": 3, "member": label, "ts": 0})
                    seen.append(read_message(sock, decoder))  # history after 2
                    frames(sock, {"type": "history", "after": 2, "count": 1, "missed": 0},
                           {"type": "join", "seq": 3, "member": label, "ts": 0})
                    seen.append(read_message(sock, decoder))  # the resent say
                    frames(sock, {**said, "seq": 4})
                    seen.append(read_message(sock, decoder))  # quit
                    frames(sock, {"type": "leave", "seq": 5, "member": label,
                                  "reason": "quit", "ts": 0})
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    bob = piped(listener.getsockname()[1], "bob")
    bob.type("same")
    bob.expect(rf"^{TIME} bob@10.0.0.1: same$")
    bob.type("same")
    bob.expect(r"^\* reconnected as bob@10.0.0.1 \(1 in the room\)$")
    assert bob.finish() == 0, bob.text("err")
    thread.join(10)
    assert not failures, failures
    assert seen[3] == {"type": "hello", "name": "bob", "resume": "t1"}
    assert seen[4] == {"type": "history", "after": 2}
    assert seen[5] == {"type": "say", "text": "same"}
    assert shown(bob, r"bob@10.0.0.1: same$") == 2, bob.text()


def test_a_port_that_stops_being_a_chat_server_ends_the_reconnecting(piped):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    failures: list[BaseException] = []

    def serve():
        try:
            with listener:
                sock, _ = listener.accept()
                with sock:
                    read_message(sock, protocol.FrameDecoder())  # hello
                    label = "bob@10.0.0.1"
                    sock.sendall(protocol.encode_frame(
                        {"type": "welcome", "name": "bob", "label": label, "epoch": "e1",
                         "last_seq": 0, "members": [label], "more": False, "history": 0}))
                # Dropped; now something else has the port.
                sock, _ = listener.accept()
                with sock:
                    sock.recv(65536)
                    sock.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    bob = piped(port, "bob")
    assert bob.wait() == 1
    thread.join(10)
    assert not failures, failures
    assert bob.text("err").splitlines() == [
        "! the connection was lost; reconnecting (Ctrl-C to stop)",
        f"! 127.0.0.1:{port} is no longer a chat server (it answered like an HTTP server, "
        "such as the web gateway)"]


def read_message(sock, decoder) -> dict:
    while (payload := decoder.next_payload()) is None:
        data = sock.recv(65536)
        if not data:
            raise EOFError("client closed")
        decoder.receive_data(data)
    return protocol.parse_client_message(payload)


# --- /history --------------------------------------------------------------------


def test_slash_history_says_when_nothing_earlier_is_kept(start_server, piped, open_client):
    # An in-memory log keeps what the welcome replays, so nothing is older.
    server = start_server("--db=:memory:")
    alice = open_client(server.port, "alice")
    alice.send({"type": "say", "text": "old 0"})
    alice.recv_type("message")
    bob = piped(server.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    bob.type("/history 5")
    bob.expect(r"^\* nothing earlier is kept$")
    bob.type("/history five")
    bob.expect(r"^! usage: /history \[N\], N a number of events$", key="err")
    assert bob.finish() == 0


# --- the transcript rules, with no I/O ---------------------------------------------


def event(seq: int, text: str | None = None) -> dict:
    if text is None:
        return {"type": "join", "seq": seq, "member": "x@h", "ts": 0}
    return {"type": "message", "seq": seq, "from": "a@h", "text": text, "ts": 0}


def welcome(epoch: str, last_seq: int) -> dict:
    return {"type": "welcome", "name": "b", "label": "b@h", "epoch": epoch,
            "last_seq": last_seq, "members": [], "more": False, "history": 0}


def texts(lines) -> list[str]:
    return [line.text.split(": ", 1)[1] for line in lines if ": " in line.text
            and not line.err]


def test_transcript_holds_a_rejoin_until_the_gap_reply_then_shows_each_once():
    t = transcript.Transcript()
    t.welcome(welcome("e1", 1), rejoin=False)
    assert texts(t.event(event(2, "m2"))) == ["m2"]
    lines, request = t.welcome(welcome("e1", 6), rejoin=True)
    assert (lines, request) == ([], {"type": "history", "after": 2})
    # The welcome's replay (5, 6), our join (7) and a live event (8) wait.
    for seq in (5, 6, 7):
        assert t.event(event(seq, f"m{seq}")) == []
    assert t.filling
    assert t.history({"type": "history", "after": 2, "count": 6, "missed": 0}) == []
    shown = []
    for seq in range(3, 9):
        shown += t.event(event(seq, f"m{seq}"))
    assert texts(shown) == ["m3", "m4", "m5", "m6", "m7", "m8"]
    assert not t.filling
    assert texts(t.event(event(8, "m8"))) == []  # never twice
    assert texts(t.event(event(9, "m9"))) == ["m9"]


def test_transcript_after_a_new_epoch_says_so_and_asks_nothing():
    t = transcript.Transcript()
    t.welcome(welcome("e1", 0), rejoin=False)
    t.event(event(40, "old"))
    lines, request = t.welcome(welcome("e2", 2), rejoin=True)
    assert request is None and [line.text for line in lines] == [transcript.NEW_EPOCH]
    shown = t.event(event(2, "new"))
    assert texts(shown) == ["new"] and "(history)" in shown[0].text


def test_transcript_unknown_seq_while_filling_starts_over():
    t = transcript.Transcript()
    t.welcome(welcome("e1", 0), rejoin=False)
    t.event(event(40, "old"))
    t.welcome(welcome("e1", 3), rejoin=True)  # same name, but numbers went back
    t.event(event(3, "held"))
    lines = t.unknown_seq()
    assert lines[0].text == transcript.NEW_EPOCH and texts(lines) == ["held"]
    assert not t.filling and t.last_seq == 3


def test_transcript_pages_back_with_history_before():
    t = transcript.Transcript()
    t.welcome(welcome("e1", 10), rejoin=False)
    for seq in (9, 10, 11):
        t.event(event(seq, f"m{seq}"))
    assert t.older(500) == {"type": "history", "before": 9, "limit": transcript.MAX_OLDER}
    # Live before the reply's header: shown (no room event comes inside a reply).
    live = t.event(event(12, "m12"))
    assert texts(live) == ["m12"]
    assert t.history({"type": "history", "before": 9, "count": 2, "more": True}) == []
    assert t.event(event(7, "m7")) == []
    page = t.event(event(8, "m8"))
    assert [line.text for line in page][0] == "* 2 earlier events:"
    assert texts(page) == ["m7", "m8"] and page[-1].text == "* /history shows more"
    assert t.pages == 1 and t.older(5)["before"] == 7


def test_slash_history_reaches_back_before_the_oldest_line(start_server, piped, open_client):
    # The welcome replays 3 events; the database keeps them all.
    server = start_server("--history=3", "--max-per-ip=200")
    alice = open_client(server.port, "alice")
    for i in range(10):
        alice.send({"type": "say", "text": f"old {i}"})
    alice.recv_until(lambda m: m["type"] == "message" and m["text"] == "old 9")
    bob = piped(server.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    # The welcome replayed old 7..9: four before them, then the rest.
    bob.type("/history 4")
    bob.expect(r"^\* /history shows more$")
    bob.type("/history")
    bob.expect(r"^\* that is the start of the kept history$")
    bob.type("/history")
    bob.expect(r"^\* nothing earlier is kept$")
    assert bob.finish() == 0
    out = bob.text()
    first = out[out.index("* 4 earlier events:"):out.index("* /history shows more")]
    assert re.findall(r"\(history\) alice@127.0.0.1: (old \d)$", first, re.M) == [
        "old 3", "old 4", "old 5", "old 6"], out
    second = out[out.index("* /history shows more"):]
    assert re.findall(r"^\* \d+ earlier events:$", second, re.M) == ["* 4 earlier events:"]
    assert re.findall(r"\(history\) alice@127.0.0.1: (old \d)$", second, re.M) == [
        "old 0", "old 1", "old 2"], out
    assert re.search(rf"^{TIME} \(history\) \* alice@127.0.0.1 joined$", second, re.M), out
