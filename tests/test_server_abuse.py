"""Every class of bad input: the offender gets a clear error, while the other
members keep chatting and lose nothing that was accepted."""

import random
import socket
import struct
import threading
import time

import pytest

from tcpserver import protocol

FAST_TIMEOUTS = ("--max-per-ip=100", "--hello-timeout=1", "--frame-timeout=1")


@pytest.fixture
def room(start_server, open_client):
    """A server with short timers, and two members already chatting."""
    server = start_server(*FAST_TIMEOUTS)
    alice = open_client(server.port, "alice")
    bob = open_client(server.port, "bob")
    alice.recv_type("join")  # bob's
    return server, alice, bob


def chat_survives(alice, bob, tag: str, count: int = 5) -> None:
    """alice says ``count`` lines; bob gets exactly those, in order, and
    nothing from alice that came earlier is missing."""
    for i in range(count):
        alice.send({"type": "say", "text": f"{tag} {i}"})
    got = []
    while len(got) < count:
        msg = bob.recv()
        if msg["type"] == "message" and msg["text"].startswith(tag):
            got.append(msg["text"])
    assert got == [f"{tag} {i}" for i in range(count)]


def test_random_bytes(room, open_client):
    server, alice, bob = room
    chat_survives(alice, bob, "before")
    intruder = open_client(server.port)
    intruder.send_raw(random.Random(7).randbytes(4096))
    error = intruder.recv_type("error")
    assert error["code"] == "bad_frame"
    assert intruder.closed_by_server()
    chat_survives(alice, bob, "after")


@pytest.mark.parametrize("header", [b"\xff" * 4, struct.pack(">I", 64 * 1024 + 1),
                                    b"\x00\x00\x00\x00"], ids=["ff", "max+1", "zero"])
def test_bad_length_from_a_member(room, open_client, header):
    server, alice, bob = room
    mallory = open_client(server.port, "mallory")
    chat_survives(alice, bob, "before")
    mallory.send_raw(header + b"x" * 64)
    error = mallory.recv_type("error")
    assert error["code"] == "bad_frame"
    assert mallory.closed_by_server()
    leave = bob.recv_type("leave")
    assert (leave["member"], leave["reason"]) == ("mallory@127.0.0.1", "protocol_error")
    chat_survives(alice, bob, "after")


def test_huge_length_reserves_no_memory(room, open_client):
    server, alice, bob = room
    intruder = open_client(server.port)
    intruder.send_raw(b"\x7f\xff\xff\xff" + b"A" * 100)
    assert intruder.recv()["code"] == "bad_frame"
    chat_survives(alice, bob, "after")


@pytest.mark.parametrize("payload, fragment", [
    (b"\xc3\x28 not utf-8", "UTF-8"),
    (b"{not json", "JSON"),
    (b"[]", "object"),
    (b'{"type": "say", "text": 42}', "must be str"),
    (b'{"type": "nuke"}', "unknown"),
    (b'{"type": "say", "text": ""}', "empty"),
    (b'{"type": "say", "text": "\\u001b]0;pwned\\u0007"}', "control"),
], ids=["utf8", "json", "array", "type", "unknown", "empty", "control"])
def test_bad_payload_is_skipped_and_the_sender_stays(room, open_client, payload, fragment):
    server, alice, bob = room
    mallory = open_client(server.port, "mallory")
    mallory.send_raw(protocol.frame_payload(payload))
    error = mallory.recv_type("error")
    assert error["code"] == "bad_message"
    assert fragment in error["message"]
    # The frame was skipped but the stream is still in sync.
    mallory.send({"type": "say", "text": "still framed"})
    assert bob.recv_type("message")["text"] == "still framed"
    chat_survives(alice, bob, "after")


# Each is made only of characters that leave no mark: format characters,
# default-ignorable code points, blank fillers, and mixes with spaces.
INVISIBLE_TEXTS = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u3164", "\u2800",
                   "\u00ad", " \u200b \u2800\u3164 ", "\ufe0f\u034f", "\U000e0041\u202e"]


@pytest.mark.parametrize("text", INVISIBLE_TEXTS)
@pytest.mark.parametrize("kind", ["say", "private"])
def test_text_with_nothing_visible_is_refused(room, text, kind):
    server, alice, bob = room
    message = {"type": kind, "text": text}
    if kind == "private":
        message["to"] = "bob"
    alice.send(message)
    error = alice.recv_type("error")
    assert (error["code"], error["message"]) == ("bad_message", "text has nothing visible")
    chat_survives(alice, bob, "after")  # and nothing was published before it


def test_text_over_the_limit(room, open_client):
    server, alice, bob = room
    alice.send({"type": "say", "text": "x" * (protocol.MAX_TEXT_CHARS + 1)})
    assert alice.recv_type("error")["code"] == "bad_message"
    chat_survives(alice, bob, "after")


def test_room_commands_before_hello(room, open_client):
    server, alice, bob = room
    stranger = open_client(server.port)
    for message in ({"type": "say", "text": "hi"}, {"type": "who"},
                    {"type": "history", "after": 0},
                    {"type": "private", "to": "alice", "text": "hi"}):
        stranger.send(message)
        assert stranger.recv()["code"] == "not_joined"
    stranger.join("stranger")  # still allowed to join afterwards
    chat_survives(alice, bob, "after")


def test_no_hello_within_the_timeout(room, open_client):
    server, alice, bob = room
    silent = open_client(server.port)
    start = time.monotonic()
    error = silent.recv(timeout=5)
    assert error["code"] == "hello_timeout"
    assert 0.8 < time.monotonic() - start < 4
    assert silent.closed_by_server()
    chat_survives(alice, bob, "after")


def test_hello_trickled_a_byte_at_a_time_times_out(room, open_client):
    server, alice, bob = room
    trickler = open_client(server.port)
    frame = protocol.encode_frame({"type": "hello", "name": "slowpoke"})
    for byte in frame[:8]:  # all of it would take 5 s; the timeout is 1 s
        trickler.send_raw(bytes([byte]))
        time.sleep(0.2)
    assert trickler.recv()["code"] == "hello_timeout"
    assert trickler.closed_by_server()
    chat_survives(alice, bob, "after")
    assert "slowpoke" not in server.log_text()


def test_member_trickling_a_frame_is_cut_off(room, open_client):
    server, alice, bob = room
    mallory = open_client(server.port, "mallory")
    frame = protocol.encode_frame({"type": "say", "text": "x" * 100})
    try:
        for byte in frame[:40]:
            mallory.send_raw(bytes([byte]))  # each byte resets idle, not the frame timer
            time.sleep(0.1)
    except ConnectionError:
        pass
    error = mallory.recv_type("error", timeout=5)
    assert error["code"] == "frame_timeout"
    leave = bob.recv_type("leave")
    assert (leave["member"], leave["reason"]) == ("mallory@127.0.0.1", "timed_out")
    chat_survives(alice, bob, "after")


def test_idle_member_is_pinged_then_timed_out(start_server, open_client):
    server = start_server("--max-per-ip=100", "--idle-timeout=3")
    alice = open_client(server.port, "alice")
    bob = open_client(server.port, "bob")
    idle = open_client(server.port, "idle")
    assert idle.recv_type("ping", timeout=5)["token"] == "idle"
    # alice and bob answer their pings; idle does not.
    for member in (alice, bob):
        member.recv_type("ping", timeout=5)
        member.send({"type": "pong", "token": "idle"})
    assert idle.recv_type("error", timeout=5)["code"] == "idle_timeout"
    leave = bob.recv_type("leave", timeout=4)
    assert (leave["member"], leave["reason"]) == ("idle@127.0.0.1", "timed_out")
    alice.send({"type": "say", "text": "I answered"})
    assert bob.recv_type("message")["text"] == "I answered"


def test_flooder_is_slowed_then_disconnected(start_server, open_client):
    # Default rate (10/s, burst 30); a flooder is cut off once more than
    # 2 s worth of frames at the rate (20) wait for it.
    server = start_server("--max-per-ip=100", "--flood-seconds=2")
    alice = open_client(server.port, "alice")
    bob = open_client(server.port, "bob")
    flooder = open_client(server.port, "flooder")
    alice.recv_type("join")
    bob.recv_type("join")
    flooder.send_raw(b"".join(protocol.encode_frame({"type": "say", "text": f"spam {i}"})
                              for i in range(300)))
    # While the flooder waits its turn, the others keep chatting.
    chat_survives(alice, bob, "meanwhile")
    codes = []
    while True:
        try:
            msg = flooder.recv()
        except (EOFError, ConnectionResetError):
            break
        if msg["type"] == "error":
            codes.append(msg["code"])
    # Nothing is refused for the rate: frames wait; then one closing error.
    assert codes == ["flooding"]
    leave, before = alice.recv_until(lambda m: m["type"] == "leave")
    assert (leave["member"], leave["reason"]) == ("flooder@127.0.0.1", "flooding")
    spam = [m["text"] for m in before
            if m["type"] == "message" and m["text"].startswith("spam")]
    # Its burst got through (less the token its hello took), in order, and
    # far from all: the pile behind it was past the bound at once.
    assert 29 <= len(spam) < 300
    assert spam == [f"spam {i}" for i in range(len(spam))]
    carol = open_client(server.port, "carol")
    alice.send({"type": "say", "text": "calm again"})
    assert carol.recv_type("message")["text"] == "calm again"


def test_reader_that_never_reads_is_evicted(start_server, open_client):
    server = start_server("--max-per-ip=100", "--slow-reader-bytes=262144",
                          "--msg-rate=100000", "--msg-burst=100000")
    alice = open_client(server.port, "alice")
    bob = open_client(server.port, "bob")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(protocol.encode_frame({"type": "hello", "name": "stalled"}))
    try:
        alice.recv_until(lambda m: m.get("member") == "stalled@127.0.0.1")
        bob.recv_until(lambda m: m.get("member") == "stalled@127.0.0.1")
        text = "y" * 3000
        sent = 0
        evicted = None
        deadline = time.monotonic() + 30
        while evicted is None and time.monotonic() < deadline:
            for _ in range(20):
                alice.send({"type": "say", "text": f"{sent} {text}"})
                sent += 1
            received = 0
            while received < 20:  # bob keeps up; so does alice
                msg = bob.recv()
                if msg["type"] == "message":
                    assert msg["text"].startswith(f"{sent - 20 + received} ")
                    received += 1
                elif msg["type"] == "leave":
                    evicted = msg
            alice.recv_until(lambda m: m.get("text", "").startswith(f"{sent - 1} "))
        assert evicted is not None, "the stalled reader was never evicted"
        assert (evicted["member"], evicted["reason"]) == ("stalled@127.0.0.1", "slow_reader")
        server.wait_log("evicted as a slow reader")
        chat_survives(alice, bob, "after")
    finally:
        stalled.close()


def test_abrupt_reset(room, open_client):
    server, alice, bob = room
    resetter = open_client(server.port, "resetter")
    bob.recv_type("join")
    resetter.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    resetter.send_raw(protocol.encode_frame({"type": "say", "text": "last words"})[:7])
    resetter.close()  # RST, mid-frame
    leave = bob.recv_type("leave")
    assert (leave["member"], leave["reason"]) == ("resetter@127.0.0.1", "hung_up")
    chat_survives(alice, bob, "after")


def test_connect_and_close_at_once(room):
    server, alice, bob = room
    for _ in range(50):
        socket.create_connection(("127.0.0.1", server.port)).close()
    chat_survives(alice, bob, "after")
    assert server.proc.poll() is None


def test_message_that_fits_in_but_not_out_of_a_small_frame(start_server, open_client):
    server = start_server("--max-frame=1024", "--max-per-ip=50")
    alice = open_client(server.port, "alice")
    bob = open_client(server.port, "bob")
    text = "z" * (1024 - len('{"type":"say","text":""}'))  # exactly the limit inbound
    alice.send({"type": "say", "text": text})
    error = alice.recv_type("error")
    assert (error["code"], error["message"]) == ("bad_message",
                                                  "too long for this server's frames")
    chat_survives(alice, bob, "after")
    assert "Traceback" not in server.log_text()


def test_bad_limits_on_the_command_line_are_one_clear_error():
    import subprocess
    import sys

    from conftest import ROOT

    for option in ("--max-frame=10", "--msg-rate=0", "--trusted-proxy=not-an-ip"):
        result = subprocess.run([sys.executable, "-m", "tcpserver", "--name=server",
                                 "--port=0", option], capture_output=True, text=True,
                                timeout=20, cwd=ROOT)
        assert result.returncode == 2, option
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr


def test_quit_waits_its_turn_behind_frames_over_the_rate(start_server, open_client):
    # quit costs no token but keeps its place: the frames sent before it are
    # delivered first, none refused, and the room sees bob leave with "quit".
    server = start_server("--max-per-ip=100", "--msg-burst=3", "--msg-rate=5")
    alice = open_client(server.port, "alice")
    bob = open_client(server.port, "bob")
    alice.recv_type("join")
    bob.send_raw(b"".join(protocol.encode_frame({"type": "say", "text": f"hasty {i}"})
                          for i in range(5)) + protocol.encode_frame({"type": "quit"}))
    leave, before = alice.recv_until(lambda m: m["type"] == "leave")
    assert (leave["member"], leave["reason"]) == ("bob@127.0.0.1", "quit")
    assert [m["text"] for m in before if m["type"] == "message"] == [
        f"hasty {i}" for i in range(5)]
    seen = bob.recv_until(lambda m: m["type"] == "leave")[1]
    assert [m for m in seen if m["type"] == "error"] == []


def test_a_connection_flood_from_one_address_does_not_stall_the_room(start_server,
                                                                    open_client):
    # Loopback untrusted, so the flood meets the per-address limit as a
    # remote host's would: five seats for the members, five for the flood.
    server = start_server("--max-per-ip=10", "--trusted-proxy=192.0.2.1/32",
                          "--log-level=info")
    members = [open_client(server.port, f"m{i}") for i in range(5)]
    for member in members[:-1]:
        member.recv_until(lambda m: m.get("member") == "m4@127.0.0.1")
    flood_total = 3000
    made = []

    def flood() -> None:
        opened = []
        deadline = time.monotonic() + 60
        for _ in range(flood_total):
            if time.monotonic() > deadline:
                break
            try:
                opened.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
                made.append(1)
            except OSError:
                pass
            if len(opened) > 20:
                opened.pop(0).close()  # each closed shortly after
        for sock in opened:
            sock.close()

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        rounds = 0
        while flooder.is_alive() and rounds < 200 or rounds < 10:
            for member in members:
                member.send({"type": "say", "text": f"{member.label} {rounds}"})
            for member in members:  # everyone gets the round, in order
                got = [m["text"] for m in room_messages(member, len(members))]
                assert sorted(got) == sorted(f"{m.label} {rounds}" for m in members)
            rounds += 1
    finally:
        flooder.join(90)
    assert len(made) > 1000
    # The server still takes a new member once the flood's seats are free.
    deadline = time.monotonic() + 10
    while True:
        late = open_client(server.port)
        late.send({"type": "hello", "name": "late"})
        reply = late.recv_until(lambda m: m["type"] in ("welcome", "error"))[0]
        if reply["type"] == "welcome" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reply["type"] == "welcome", reply
    chat_survives(members[0], late, "after the flood")
    # Refusals are logged with a count, not one line each.
    warnings = server.log_text().count(" WARNING refused")
    assert 0 < warnings < len(made) / 2


def room_messages(client, count: int) -> list[dict]:
    """The next ``count`` messages (other frames skipped)."""
    got = []
    while len(got) < count:
        msg = client.recv(timeout=20)
        if msg["type"] == "message":
            got.append(msg)
    return got
