"""The terminal client as a real subprocess against the real server.

Pipe mode is driven through stdin/stdout; terminal mode through a
pseudo-terminal whose output is rendered by pyte, a terminal emulator, so
the tests check the screen a person would see rather than escape codes.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time

import pexpect
import pyte
import pytest
from conftest import Program, client_argv

from tcpserver import display, protocol
from tcpserver.client_conn import foreign_greeting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME = r"\[\d\d:\d\d:\d\d\]"
RUN_TIMEOUT = 20


def run_piped(port: int, name: str, stdin: str, timeout: float = RUN_TIMEOUT):
    """Run a client to completion with ``stdin`` piped in."""
    return subprocess.run(client_argv(port, name), input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def messages_from(raw, label: str, count: int, timeout: float = 10.0) -> list[str]:
    """Texts of the next ``count`` room messages from ``label`` seen by ``raw``."""
    texts: list[str] = []
    deadline = time.monotonic() + timeout
    while len(texts) < count:
        msg = raw.recv(max(0.01, deadline - time.monotonic()))
        if msg["type"] == "message" and msg["from"] == label:
            texts.append(msg["text"])
    return texts


def assert_one_clean_line(result) -> str:
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


# --- pipe mode -------------------------------------------------------------


def test_piped_lines_reach_the_room_and_eof_quits(server, connect):
    alice = connect("alice")
    result = run_piped(server.port, "bob", "hello room\n\n   \nsecond line\n")
    assert result.returncode == 0, result.stderr
    assert messages_from(alice, "bob@127.0.0.1", 2) == ["hello room", "second line"]
    leave = alice.recv_type("leave")
    assert (leave["member"], leave["reason"]) == ("bob@127.0.0.1", "quit")
    # Empty lines were skipped: nothing else came from bob.
    assert re.search(rf"^{TIME} bob@127.0.0.1: hello room$", result.stdout, re.M)
    assert re.search(rf"^{TIME} bob@127.0.0.1: second line$", result.stdout, re.M)
    assert len(re.findall(r"bob@127.0.0.1: ", result.stdout)) == 2
    assert re.search(rf"^{TIME} \* bob@127.0.0.1 left$", result.stdout, re.M)


def test_two_piped_clients_see_each_other(server, piped):
    alice = piped(server.port, "alice")
    alice.expect(rf"^{TIME} \* alice@127.0.0.1 joined$")
    result = run_piped(server.port, "bob", "hi alice\n")
    assert result.returncode == 0, result.stderr
    alice.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice.expect(rf"^{TIME} bob@127.0.0.1: hi alice$")
    alice.expect(rf"^{TIME} \* bob@127.0.0.1 left$")
    alice.type("bye bob")
    alice.expect(rf"^{TIME} alice@127.0.0.1: bye bob$")
    assert alice.finish() == 0
    assert alice.text("err") == ""


def test_every_line_piped_before_eof_is_delivered(start_server, open_client):
    # A small burst forces the rate limit: the server makes lines wait, none is lost.
    server = start_server("--msg-burst=10", "--msg-rate=50")
    alice = open_client(server.port, "alice")
    lines = [f"line {i}" for i in range(40)]
    result = run_piped(server.port, "bob", "\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert messages_from(alice, "bob@127.0.0.1", 40) == lines
    leave = alice.recv_type("leave")
    assert (leave["member"], leave["reason"]) == ("bob@127.0.0.1", "quit")
    assert "Traceback" not in result.stderr


def test_quit_after_the_burst_still_leaves_with_reason_quit(start_server, open_client):
    # Three tokens: hello and the two messages take them all; the quit still
    # has to be honoured, or the room would see bob hang up.
    server = start_server("--msg-burst=3", "--msg-rate=2")
    alice = open_client(server.port, "alice")
    result = run_piped(server.port, "bob", "one\ntwo\n")
    assert result.returncode == 0, result.stderr
    assert messages_from(alice, "bob@127.0.0.1", 2) == ["one", "two"]
    leave = alice.recv_type("leave")
    assert (leave["member"], leave["reason"]) == ("bob@127.0.0.1", "quit")


def test_history_is_replayed_and_marked(server, connect):
    alice = connect("alice")
    alice.send({"type": "say", "text": "said before bob came"})
    alice.recv_type("message")
    result = run_piped(server.port, "bob", "")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    replayed = re.search(rf"^{TIME} \(history\) alice@127.0.0.1: said before bob came$", out, re.M)
    own_join = re.search(rf"^{TIME} \* bob@127.0.0.1 joined$", out, re.M)
    assert replayed and own_join and replayed.start() < own_join.start(), out


def test_who_lists_the_members(server, connect, piped):
    bob = piped(server.port, "bob")
    bob.expect(r"^\* in the room \(1\): bob@127.0.0.1$")
    connect("alice")
    bob.expect(rf"^{TIME} \* alice@127.0.0.1 joined$")
    bob.type("/who")
    line = bob.expect(r"^\* in the room \(2\): (.*)$").group(1)
    assert sorted(line.split(", ")) == ["alice@127.0.0.1", "bob@127.0.0.1"]
    assert bob.finish() == 0


def test_private_messages_both_ways(server, connect, piped):
    bob = piped(server.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice = connect("alice")
    bob.type("/msg alice psst, alice")
    msg = alice.recv_type("private")
    assert (msg["from"], msg["to"], msg["text"]) == ("bob@127.0.0.1", "alice@127.0.0.1",
                                                     "psst, alice")
    bob.expect(rf"^{TIME} \(private\) you -> alice@127.0.0.1: psst, alice$")
    alice.send({"type": "private", "to": "bob", "text": "hi bob"})
    bob.expect(rf"^{TIME} \(private\) alice@127.0.0.1 -> you: hi bob$")
    bob.type("/msg nobody hello?")
    bob.expect(r"^! no_such_member: ", key="err")
    assert bob.finish() == 0
    # Nothing private leaked into the room.
    _, seen = alice.recv_until(lambda m: m["type"] == "leave")
    assert not [m for m in seen if m["type"] == "message"]


def test_join_and_leave_notices_name_the_reason(server, connect, open_client, piped):
    bob = piped(server.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice = connect("alice")
    bob.expect(rf"^{TIME} \* alice@127.0.0.1 joined$")
    alice.send({"type": "quit"})
    bob.expect(rf"^{TIME} \* alice@127.0.0.1 left$")
    carol = open_client(server.port, "carol")
    bob.expect(rf"^{TIME} \* carol@127.0.0.1 joined$")
    carol.close()
    bob.expect(rf"^{TIME} \* carol@127.0.0.1 hung up$")
    dave = open_client(server.port, "dave")
    dave.send_raw(b"\x00\x00\x00\x00")  # a zero length: protocol error
    bob.expect(rf"^{TIME} \* dave@127.0.0.1 was disconnected for a protocol error$")
    assert bob.finish() == 0


def test_commands_stay_local_and_slash_can_be_escaped(server, connect):
    alice = connect("alice")
    result = run_piped(server.port, "bob", "/frobnicate now\n/help\n//not a command\n/msg\n")
    assert result.returncode == 0, result.stderr
    assert "! unknown command /frobnicate: /help lists the commands" in result.stderr
    assert "! usage: /msg NAME TEXT" in result.stderr
    assert "/msg NAME TEXT" in result.stdout  # the help text
    _, seen = alice.recv_until(lambda m: m["type"] == "leave")
    assert [m["text"] for m in seen if m["type"] == "message"] == ["/not a command"]


def test_incoming_text_is_one_safe_line(server, connect, piped):
    bob = piped(server.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    alice = connect("alice")
    alice.send({"type": "say", "text": "two\nlines\u202eevil"})
    bob.expect(rf"^{TIME} alice@127.0.0.1: two\u21b5lines\ufffdevil$")
    assert bob.finish() == 0


def test_display_neutralises_control_characters():
    assert display.clean("a\x1b[2Jb\r\nc\x07") == "a\ufffd[2Jb\u21b5c\ufffd"
    assert display.clean("tab\tkept") == "tab\tkept"
    assert display.clean_outgoing("x\x1by\tz\x00") == "xy\tz"
    assert display.room_event({"type": "leave", "seq": 1, "member": "a@h", "ts": 0,
                               "reason": "slow_reader"}).endswith(
        "* a@h was evicted (too slow reading)")


def test_client_answers_the_servers_ping(start_server, open_client, piped):
    # Pinged after 0.5 s of silence, cut off after 1 s without a pong.
    server = start_server("--idle-timeout=1")
    bob = piped(server.port, "bob")
    bob.expect(rf"^{TIME} \* bob@127.0.0.1 joined$")
    time.sleep(3)
    assert bob.proc.poll() is None, bob.text("err")
    alice = open_client(server.port)
    alice.send({"type": "hello", "name": "alice"})
    assert "bob@127.0.0.1" in alice.recv_type("welcome")["members"]
    alice.close()
    assert bob.finish() == 0
    assert "idle_timeout" not in bob.text("err")


def test_chunked_member_lists_are_joined(start_server, open_client):
    # Small frames: about ten long labels fit in one members frame.
    server = start_server("--max-frame=1024", "--max-per-ip=200")
    names = [f"member-{i:02d}-" + "x" * 22 for i in range(25)]
    for name in names:
        member = open_client(server.port)
        member.send({"type": "hello", "name": name})
        member.recv_type("welcome")  # no join is broadcast in a large room
    result = run_piped(server.port, "bob", "/who\n")
    assert result.returncode == 0, result.stderr
    expected = sorted([f"{n}@127.0.0.1" for n in names] + ["bob@127.0.0.1"])
    lists = re.findall(r"^\* in the room \((\d+)\): (.*)$", result.stdout, re.M)
    assert len(lists) == 2, result.stdout  # on joining, and for /who
    for count, labels in lists:
        assert int(count) == 26 and sorted(labels.split(", ")) == expected


def test_who_in_a_large_room_shows_a_page_and_prefix_narrows(start_server, open_client):
    # Over --announce-limit the welcome carries a count, not names, and a
    # plain /who gets one page of 100 (the server's page) with more to come.
    server = start_server("--announce-limit=5", "--max-per-ip=200")
    names = [f"m{i:03d}" for i in range(104)] + ["carol"]
    for name in names:
        member = open_client(server.port)
        member.send({"type": "hello", "name": name})
        member.recv_type("welcome")  # no join is broadcast in a large room
    result = run_piped(server.port, "bob", "/who\n/who CA\n")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\* 106 in the room \(/who lists them\)$", result.stdout, re.M), \
        result.stdout
    page = re.search(r"^\* in the room \(106 in the room\), the first 100: (.*) and more "
                     r"\(/who PREFIX lists names starting with PREFIX\)$", result.stdout, re.M)
    assert page, result.stdout
    assert page.group(1).split(", ") == sorted(
        f"{n}@127.0.0.1" for n in ["bob", "carol"] + names[:-1])[:100]
    assert re.search(r"^\* names starting with 'CA' \(1\): carol@127.0.0.1$", result.stdout,
                     re.M), result.stdout


def fake_server(script):
    """Serve one connection with ``script(sock, decoder)`` in a thread.

    Returns (port, thread, failures); an assertion that fails in the
    script is put in ``failures``.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    failures: list[BaseException] = []

    def serve() -> None:
        with listener:
            listener.settimeout(10)
            sock, _ = listener.accept()
            with sock:
                sock.settimeout(10)
                try:
                    script(sock, protocol.FrameDecoder())
                except BaseException as exc:  # reported by the test
                    failures.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread, failures


def read_message(sock, decoder) -> dict:
    while (payload := decoder.next_payload()) is None:
        data = sock.recv(65536)
        if not data:
            raise EOFError("client closed")
        decoder.receive_data(data)
    return protocol.parse_client_message(payload)


def test_ping_is_answered_with_the_same_token(piped):
    def script(sock, decoder):
        assert read_message(sock, decoder) == {"type": "hello", "name": "bob"}
        for message in (
            {"type": "welcome", "name": "bob", "label": "bob@10.1.2.3", "epoch": "e1",
             "last_seq": 0, "members": ["bob@10.1.2.3"], "more": False, "history": 0},
            {"type": "join", "seq": 1, "member": "bob@10.1.2.3", "ts": 0},
            {"type": "ping", "token": "tok-7"},
        ):
            sock.sendall(protocol.encode_frame(message))
        assert read_message(sock, decoder) == {"type": "pong", "token": "tok-7"}
        sock.sendall(protocol.encode_frame({"type": "ping"}))
        assert read_message(sock, decoder) == {"type": "pong"}
        sock.sendall(protocol.encode_frame({"type": "shutdown", "message": "bye now"}))

    port, thread, failures = fake_server(script)
    bob = piped(port, "bob")  # stdin stays open: no quit interferes
    thread.join(10)
    assert not failures, failures
    bob.expect(r"^! shutdown: bye now$", key="err")
    # The server went away after its notice: the client waits for it to
    # come back, and end of input then leaves with nothing to send.
    bob.expect(r"^! the server is restarting or stopping; reconnecting \(Ctrl-C to stop\)$",
               key="err")
    assert bob.finish() == 0, bob.text("err")


def test_a_refusal_is_final(piped):
    def script(sock, decoder):
        read_message(sock, decoder)  # the hello
        for message in (
            {"type": "welcome", "name": "bob", "label": "bob@10.1.2.3", "epoch": "e1",
             "last_seq": 0, "members": ["bob@10.1.2.3"], "more": False, "history": 0},
            {"type": "join", "seq": 1, "member": "bob@10.1.2.3", "ts": 0},
            {"type": "error", "code": "flooding", "message": "too many frames"},
        ):
            sock.sendall(protocol.encode_frame(message))

    port, thread, failures = fake_server(script)
    bob = piped(port, "bob")
    thread.join(10)
    assert not failures, failures
    assert bob.wait() == 1
    assert bob.text("err").splitlines() == ["! flooding: too many frames",
                                            "! the server closed the connection"]


# --- refusals ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_is_one_line():
    port = free_port()
    result = run_piped(port, "bob", "hello\n")
    assert result.returncode == 1
    line = assert_one_clean_line(result)
    assert line == (f"chatroom: cannot reach the chat server at 127.0.0.1:{port} "
                    "(connection refused)")


def test_taken_name_is_one_line(server, connect):
    connect("alice")
    result = run_piped(server.port, "ALICE", "hello\n")
    assert result.returncode == 2
    line = assert_one_clean_line(result)
    assert "cannot join as 'ALICE'" in line and "(name_taken)" in line


def test_the_web_gateways_port_is_named_as_not_a_chat_port(server, tmp_path):
    gateway = Program(tmp_path, "-m", "gateway", "--http-port=0", f"--chat-port={server.port}")
    try:
        port = int(gateway.wait_log(r"serving on http://\S+?:(\d+)/").group(1))
        result = run_piped(port, "bob", "hello\n")
    finally:
        gateway.kill()
    assert result.returncode == 1
    line = assert_one_clean_line(result)
    assert line == (f"chatroom: 127.0.0.1:{port} is not a chat server port (it answered like "
                    "an HTTP server, such as the web gateway); the chat port is --port, "
                    "default 10000")


@pytest.mark.parametrize("junk, looks_like", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "it answered like an SSH server"),
    (b"garbage\r\n", "it answered with bytes that are not chat protocol frames"),
    (b"\x15\x03\x03\x00\x02\x02\x32", "it answered like a TLS server; this client speaks "
     "plain TCP"),
    (b"\x00\x00\x00\x00", "it answered with bytes that are not chat protocol frames"),
    (b"\x00\x00\x00\x05hello", "it answered with something that is not the chat protocol"),
    (b"\x00\x01", "it answered with bytes that are not chat protocol frames"),  # then closes
])
def test_a_server_that_answers_junk_is_not_a_chat_port(junk, looks_like):
    def script(sock, decoder):
        read_message(sock, decoder)  # the hello
        sock.sendall(junk)

    port, thread, failures = fake_server(script)
    result = run_piped(port, "bob", "hello\n")
    thread.join(10)
    assert not failures, failures
    assert result.returncode == 1
    line = assert_one_clean_line(result)
    assert line == (f"chatroom: 127.0.0.1:{port} is not a chat server port ({looks_like}); "
                    "the chat port is --port, default 10000")


def test_a_silent_peer_gets_a_hint_about_the_port():
    def script(sock, decoder):
        read_message(sock, decoder)  # the hello, then nothing until the client leaves
        sock.settimeout(RUN_TIMEOUT)
        assert sock.recv(1) == b""

    port, thread, failures = fake_server(script)
    result = run_piped(port, "bob", "hello\n")
    thread.join(10)
    assert not failures, failures
    assert result.returncode == 1
    assert assert_one_clean_line(result) == (
        f"chatroom: no welcome from 127.0.0.1:{port} within 10 s; is it the chat port? "
        "(--port, default 10000)")


@pytest.mark.parametrize("head, complete, verdict", [
    (b"", False, None),
    (b"HT", False, None),  # may still be HTTP/: wait
    (b"HTTP", False, None),
    (b"HTTP/1.1 400", False, "it answered like an HTTP server, such as the web gateway"),
    (b"HTT", True, "it answered with bytes that are not chat protocol frames"),
    (b"\x00\x00", False, None),
    (b"\x00\x00\x00\x10{", False, None),
    # 65537: one over the limit
    (b"\x00\x01\x00\x01", False, "it answered with bytes that are not chat protocol frames"),
    (b"\x00\x01\x00\x00", False, None),  # 65536: the limit itself
])
def test_foreign_greeting_needs_only_the_first_bytes(head, complete, verdict):
    assert foreign_greeting(head, complete) == verdict


@pytest.mark.parametrize("name", ["bad name", "Server", "x" * 33, "a/b"])
def test_invalid_name_is_one_line(server, name):
    result = run_piped(server.port, name, "hello\n")
    assert result.returncode == 2
    line = assert_one_clean_line(result)
    assert "(name_invalid)" in line


# --- terminal mode -------------------------------------------------------------


class Terminal:
    """The client on a pseudo-terminal, its output rendered by pyte."""

    ROWS, COLS = 24, 100

    def __init__(self, port: int, name: str, rows: int = ROWS, cols: int = COLS) -> None:
        self.ROWS, self.COLS = rows, cols
        # No cursor position requests: pexpect is not a terminal that answers.
        env = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
        self.child = pexpect.spawn(sys.executable, client_argv(port, name)[1:], env=env,
                                   cwd=ROOT, encoding="utf-8", codec_errors="replace",
                                   dimensions=(self.ROWS, self.COLS), timeout=5)
        self.screen = pyte.Screen(self.COLS, self.ROWS)
        self.stream = pyte.Stream(self.screen)

    def _pump(self) -> None:
        try:
            while True:
                self.stream.feed(self.child.read_nonblocking(65536, timeout=0.05))
        except (pexpect.TIMEOUT, pexpect.EOF):
            pass

    def rows(self) -> list[str]:
        return [row.rstrip() for row in self.screen.display]

    def cursor_row(self) -> str:
        return self.rows()[self.screen.cursor.y]

    def wait(self, predicate, what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._pump()
            if predicate():
                return
        raise AssertionError(f"screen never showed {what}:\n" + "\n".join(self.rows()))

    def close(self) -> None:
        self.child.close(force=True)


@pytest.fixture
def terminal():
    started: list[Terminal] = []

    def start(port: int, name: str, **size) -> Terminal:
        term = Terminal(port, name, **size)
        started.append(term)
        return term

    yield start
    for term in started:
        term.close()


def test_terminal_prompt_and_sending(server, connect, terminal):
    alice = connect("alice")
    term = terminal(server.port, "bob")
    term.wait(lambda: term.cursor_row() == "[bob@127.0.0.1]>", "the prompt")
    term.child.send("hello from a terminal\r")
    assert messages_from(alice, "bob@127.0.0.1", 1) == ["hello from a terminal"]
    term.wait(lambda: any(re.fullmatch(rf"{TIME} bob@127.0.0.1: hello from a terminal", r)
                          for r in term.rows()), "the echo")
    term.child.sendcontrol("d")  # Ctrl-D leaves
    leave = alice.recv_type("leave")
    assert (leave["member"], leave["reason"]) == ("bob@127.0.0.1", "quit")
    term.child.expect(pexpect.EOF, timeout=5)
    term.child.close()
    assert term.child.exitstatus == 0


def test_incoming_message_does_not_garble_typing(server, connect, terminal):
    alice = connect("alice")
    term = terminal(server.port, "bob")
    term.wait(lambda: term.cursor_row() == "[bob@127.0.0.1]>", "the prompt")
    term.child.send("half a thou")
    term.wait(lambda: term.cursor_row() == "[bob@127.0.0.1]> half a thou", "the typed text")

    alice.send({"type": "say", "text": "interrupting!"})
    incoming = rf"{TIME} alice@127.0.0.1: interrupting!"
    term.wait(lambda: any(re.fullmatch(incoming, r) for r in term.rows()), "the message")
    # The message sits on its own line above; the prompt and the partial
    # text are redrawn below it, untouched.
    term.wait(lambda: term.cursor_row() == "[bob@127.0.0.1]> half a thou", "the redraw")
    y = term.screen.cursor.y
    assert re.fullmatch(incoming, term.rows()[y - 1]), term.rows()
    assert not any("interrupting" in r and "half" in r for r in term.rows())

    term.child.send("ght, finished\r")
    assert messages_from(alice, "bob@127.0.0.1", 1) == ["half a thought, finished"]


def test_terminal_ctrl_c_while_reconnecting_exits_zero(server, terminal):
    term = terminal(server.port, "bob")
    term.wait(lambda: term.cursor_row() == "[bob@127.0.0.1]>", "the prompt")
    term.child.send("unsent draft")
    server.terminate()
    term.wait(lambda: "! shutdown: the server is shutting down" in term.rows(), "the notice")
    term.wait(lambda: "! the server is restarting or stopping; reconnecting (Ctrl-C to stop)"
              in term.rows(), "the reconnecting line")
    # Enter while disconnected keeps the line and says why.
    term.child.send("\r")
    term.wait(lambda: any("not connected: reconnecting; the line is kept" in r
                          for r in term.rows()), "the refusal")
    assert term.cursor_row() == "[bob@127.0.0.1]> unsent draft"
    term.child.sendcontrol("c")
    term.child.expect(pexpect.EOF, timeout=5)
    term.child.close()
    assert term.child.exitstatus == 0


def test_an_over_long_line_stays_in_the_prompt(server, connect, terminal):
    alice = connect("alice")
    # Tall enough that the 4001-character line and the message both fit.
    term = terminal(server.port, "bob", rows=60, cols=120)
    term.wait(lambda: term.cursor_row() == "[bob@127.0.0.1]>", "the prompt")
    text = "".join(chr(ord("a") + i % 26) for i in range(protocol.MAX_TEXT_CHARS + 1))
    term.child.send(text)
    term.wait(lambda: text[-20:] in "".join(term.rows()), "the typed text")
    term.child.send("\r")
    term.wait(lambda: any("not sent: a message is at most 4000 characters and this one has "
                          "4001; edit the line, then Enter" in r for r in term.rows()),
              "the limit")
    # Still there to edit: one BackSpace makes it fit, and Enter sends it.
    term.child.send("\x7f\r")
    assert messages_from(alice, "bob@127.0.0.1", 1) == [text[:-1]]


def test_an_over_long_piped_line_is_skipped_with_the_limit(server, connect):
    alice = connect("alice")
    long = "x" * (protocol.MAX_TEXT_CHARS + 1)
    result = run_piped(server.port, "bob", f"before\n{long}\n/msg alice {long}\nafter\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("! not sent: a message is at most 4000 characters and this "
                               "one has 4001; skipped") == 2, result.stderr
    assert messages_from(alice, "bob@127.0.0.1", 2) == ["before", "after"]


def test_a_piped_line_the_room_could_not_store_is_sent_again(piped):
    def script(sock, decoder):
        read_message(sock, decoder)  # the hello
        for message in (
            {"type": "welcome", "name": "bob", "label": "bob@10.1.2.3", "epoch": "e1",
             "last_seq": 0, "members": ["bob@10.1.2.3"], "more": False, "history": 0},
            {"type": "join", "seq": 1, "member": "bob@10.1.2.3", "ts": 0},
        ):
            sock.sendall(protocol.encode_frame(message))
        assert read_message(sock, decoder) == {"type": "say", "text": "keep me"}
        sock.sendall(protocol.encode_frame({"type": "error", "code": "room_unavailable",
                                            "message": "storage: disk is full"}))
        assert read_message(sock, decoder) == {"type": "say", "text": "keep me"}
        sock.sendall(protocol.encode_frame({"type": "message", "seq": 2, "ts": 0,
                                            "from": "bob@10.1.2.3", "text": "keep me"}))
        assert read_message(sock, decoder) == {"type": "quit"}
        sock.sendall(protocol.encode_frame({"type": "leave", "seq": 3, "ts": 0,
                                            "member": "bob@10.1.2.3", "reason": "quit"}))

    port, thread, failures = fake_server(script)
    bob = piped(port, "bob")
    bob.type("keep me")
    bob.expect(rf"^{TIME} bob@10.1.2.3: keep me$")
    assert bob.finish() == 0
    thread.join(10)
    assert not failures, failures
    assert "! room_unavailable: storage: disk is full" in bob.text("err")
