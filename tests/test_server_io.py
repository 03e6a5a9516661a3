"""The server's I/O under output the server itself chose to send: a joining
client's welcome burst, history replies, and the memory one client can pin."""

import socket
import time

from conftest import RawClient

from tcpserver import protocol

# 4000 characters of 3 or 4 bytes in UTF-8: 12-16 KB frames.
WIDE_TEXTS = ("\u20ac" * protocol.MAX_TEXT_CHARS, "\U0001f600" * protocol.MAX_TEXT_CHARS)
# An ordinary internet link's segment size, forced on loopback.
INTERNET_MSS = 1400


class SmallSegmentClient(RawClient):
    """A RawClient whose socket has TCP_MAXSEG set before it connects, so the
    server's sends are cut into internet-sized segments."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, INTERNET_MSS)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        self.sock = sock
        self.decoder = protocol.FrameDecoder()
        self.label = None


def fill_history(open_client, port: int, count: int = 100) -> tuple[list[str], RawClient]:
    """``count`` wide messages said by four members (each within the default
    burst of the rate limit); return the texts in room order and one of the
    members, who has read them all."""
    senders = [open_client(port, f"filler{i}") for i in range(4)]
    texts = []
    for i in range(count):
        text = WIDE_TEXTS[i % 2]
        senders[i % 4].send({"type": "say", "text": text})
        # One at a time, so the room order is known and the backlog small.
        senders[0].recv_until(lambda m: m["type"] == "message" and m["text"] == text,
                              timeout=10)
        texts.append(text)
    return texts, senders[0]


def read_replay(client: RawClient, count: int) -> list[dict]:
    """The next ``count`` room events (message, join, leave); fails on an
    error first."""
    got = []
    while len(got) < count:
        msg = client.recv(timeout=20)
        assert msg["type"] != "error", msg
        if msg["type"] in ("message", "join", "leave"):
            got.append(msg)
    return got


def test_a_joining_client_is_not_evicted_by_its_welcome_burst(start_server, open_client):
    server = start_server()  # default limits: history 100, slow reader 1 MiB
    texts, watcher = fill_history(open_client, server.port)
    newcomer = SmallSegmentClient(server.port)
    try:
        newcomer.send({"type": "hello", "name": "newcomer"})
        welcome = newcomer.recv_type("welcome", timeout=20)
        assert welcome["history"] == 100
        replay = read_replay(newcomer, 100)
        assert [m["text"] for m in replay] == texts
        seqs = [m["seq"] for m in replay]
        assert seqs == list(range(seqs[0], seqs[0] + 100))
        # Still a member: its own say comes back and the room saw no leave.
        newcomer.send({"type": "say", "text": "made it"})
        msg, before = newcomer.recv_until(lambda m: m.get("text") == "made it", timeout=10)
        assert msg["from"] == "newcomer@127.0.0.1"
        seen, events = watcher.recv_until(lambda m: m.get("text") == "made it", timeout=10)
        assert not [e for e in events if e["type"] == "leave"], events
        assert "slow reader" not in server.log_text()
    finally:
        newcomer.close()


def test_a_history_request_by_a_reconnecting_member_is_not_evicted(start_server, open_client):
    server = start_server()
    texts, _ = fill_history(open_client, server.port)
    member = SmallSegmentClient(server.port)
    try:
        # A reconnecting page: hello, then at once ask for everything after 0,
        # without reading the welcome first.
        member.send({"type": "hello", "name": "returning"})
        member.send({"type": "history", "after": 0})
        welcome = member.recv_type("welcome", timeout=20)
        read_replay(member, welcome["history"])
        reply = member.recv_type("history", timeout=20)
        # Everything the log holds (at least the last 100 events), ending
        # with our own join.
        assert reply["count"] >= 100
        replay = read_replay(member, reply["count"])
        said = [m["text"] for m in replay if m["type"] == "message"]
        assert len(said) >= 99 and said == texts[-len(said):]
        assert replay[-1] == {**replay[-1], "type": "join", "member": "returning@127.0.0.1"}
        member.send({"type": "say", "text": "still here"})
        member.recv_until(lambda m: m.get("text") == "still here", timeout=10)
        assert "slow reader" not in server.log_text()
    finally:
        member.close()


def test_a_client_that_never_reads_its_welcome_pins_bounded_memory(start_server,
                                                                   open_client):
    # The welcome (100 wide events) is never read; the client keeps sending
    # requests.  They wait behind the unsent reply, the server stops reading
    # the socket once a bound is buffered, TCP pushes back, and the idle timer
    # finally drops the client.
    server = start_server("--idle-timeout=4")
    _, watcher = fill_history(open_client, server.port)
    hog = SmallSegmentClient(server.port, rcvbuf=4096)
    try:
        hog.send({"type": "hello", "name": "hog"})
        watcher.recv_until(lambda m: m.get("member") == "hog@127.0.0.1")
        hog.sock.setblocking(False)
        request = protocol.encode_frame({"type": "who"})
        accepted = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                accepted += hog.sock.send(request)
            except BlockingIOError:
                time.sleep(0.05)
                try:
                    accepted += hog.sock.send(request)
                except BlockingIOError:
                    break  # pushed back
        else:
            raise AssertionError(f"the server kept reading: {accepted} bytes accepted")
        # What the kernels hold plus what the server reads before pausing.
        assert accepted < 16 * 1024 * 1024
        # The silent fillers time out too; the watcher answers its pings.
        while True:
            msg = watcher.recv(timeout=15)
            if msg["type"] == "ping":
                watcher.send({"type": "pong", "token": msg["token"]})
            elif msg["type"] == "leave" and msg["member"] == "hog@127.0.0.1":
                assert msg["reason"] == "timed_out"
                break
        watcher.send({"type": "say", "text": "room is fine"})
        watcher.recv_until(lambda m: m.get("text") == "room is fine")
    finally:
        hog.close()


def test_a_reply_whose_events_retention_dropped_meanwhile_does_not_freeze_the_stream(
        start_server, open_client):
    # A history reply is streamed once the client has read what came
    # before it, and retention may drop its events meanwhile.  Then the
    # reply is empty by the time it is sent: the room's events after it
    # must still follow, without waiting for some later event to come.
    server = start_server("--max-per-ip=200", "--retain-events=660", "--history=1",
                          "--slow-reader-bytes=67108864", "--msg-rate=5000",
                          "--msg-burst=5000")
    talker = open_client(server.port, "talker")
    for n in range(50):
        talker.send({"type": "say", "text": f"old {n}"})
    last = talker.recv_until(lambda m: m.get("text") == "old 49")[0]["seq"]
    reader = open_client(server.port, "reader")
    # The reader stops reading while about 10 MB reach it (more than the
    # sockets' buffers take), then asks for the first ten old messages.
    for n in range(600):
        talker.send({"type": "say", "text": f"big {n} " + "\U0001F600" * 3900})
    talker.recv_until(lambda m: m.get("text", "").startswith("big 599 "), timeout=30)
    reader.send({"type": "history", "before": last - 39, "limit": 10})
    talker.send({"type": "ping", "token": "after the request"})
    talker.recv_until(lambda m: m.get("token") == "after the request")
    # Twenty more events: the page asked for is past --retain-events now.
    for n in range(20):
        talker.send({"type": "say", "text": f"new {n}"})
    talker.recv_until(lambda m: m.get("text") == "new 19")
    header, before = reader.recv_until(lambda m: m["type"] == "history", timeout=60)
    assert header["before"] == last - 39
    assert [m["text"] for m in before if m["type"] == "message"][-1].startswith("big 599 ")
    _, rest = reader.recv_until(lambda m: m.get("text") == "new 19", timeout=10)
    assert [m["text"] for m in rest if m["type"] == "message"] == [f"new {n}" for n in range(19)]
