"""The rate limit delays, it does not refuse ("fake lag", issue 6 item 10):
members who never sent faster than the limit lose nothing after a stall."""

import signal
import time

from tcpserver import protocol

# Scaled from the case (defaults: 10/s, burst 30; 40 messages at
# 2/s through a 20 s stall): a small burst makes a short stall overflow it.
RATE, BURST = 10, 4
STALL_S = 6.0
SEND_INTERVAL = 0.5  # a fifth of the rate
PER_SENDER = int(STALL_S / SEND_INTERVAL)  # all sent while the server is stopped


def test_senders_within_the_rate_lose_nothing_after_a_stall(start_server, open_client):
    server = start_server("--max-per-ip=100", f"--msg-rate={RATE}", f"--msg-burst={BURST}")
    watcher = open_client(server.port, "watcher")
    senders = [open_client(server.port, f"sender{i}") for i in range(5)]
    watcher.recv_until(lambda m: m.get("member") == "sender4@127.0.0.1")
    server.proc.send_signal(signal.SIGSTOP)
    try:
        for i in range(PER_SENDER):
            for sender in senders:
                sender.send({"type": "say", "text": f"{sender.label} {i}"})
            time.sleep(SEND_INTERVAL)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    total = PER_SENDER * len(senders)
    got = []
    while len(got) < total:
        msg = watcher.recv(timeout=10)
        assert msg["type"] in ("message", "join"), msg
        if msg["type"] == "message":
            got.append(msg["text"])
    for sender in senders:
        own = [t for t in got if t.startswith(f"{sender.label} ")]
        assert own == [f"{sender.label} {i}" for i in range(PER_SENDER)]
        # The sender was told of no refusal, and gets its own lines back.
        echo, seen = sender.recv_until(
            lambda m: m.get("text") == f"{sender.label} {PER_SENDER - 1}", timeout=10)
        assert [m for m in seen if m["type"] == "error"] == []
    assert "flooding" not in server.log_text()


def test_waiting_frames_keep_their_order_with_requests(start_server, open_client):
    # Over the rate, a who and a ping wait in line with the says around them.
    server = start_server("--max-per-ip=100", "--msg-rate=20", "--msg-burst=2")
    alice = open_client(server.port, "alice")
    frames = [{"type": "say", "text": "one"}, {"type": "say", "text": "two"},
              {"type": "ping", "token": "t"}, {"type": "say", "text": "three"},
              {"type": "who"}, {"type": "say", "text": "four"}]
    alice.send_raw(b"".join(protocol.encode_frame(f) for f in frames))
    order = []
    while len(order) < 6:
        msg = alice.recv(timeout=10)
        assert msg["type"] != "error", msg
        if msg["type"] == "message":
            order.append(msg["text"])
        elif msg["type"] in ("pong", "members"):
            order.append(msg["type"])
    assert order == ["one", "two", "pong", "three", "members", "four"]


def test_a_throttled_sender_is_pushed_back_by_tcp(start_server, open_client):
    # A flooder's waiting input is bounded: the server stops reading its
    # socket, so its sends block, and the room keeps going meanwhile.
    server = start_server("--max-per-ip=100", "--msg-rate=1", "--msg-burst=1",
                          "--flood-seconds=600")  # a 600-frame bound: TCP stops it first
    alice = open_client(server.port, "alice")
    bob = open_client(server.port, "bob")
    flooder = open_client(server.port, "flooder")
    alice.recv_type("join")
    frame = protocol.encode_frame({"type": "say", "text": "x" * 3000})
    flooder.sock.setblocking(False)
    accepted = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            accepted += flooder.sock.send(frame)
        except BlockingIOError:
            time.sleep(0.1)
            try:
                accepted += flooder.sock.send(frame)
            except BlockingIOError:
                break
    else:
        raise AssertionError(f"the server kept reading: {accepted} bytes accepted")
    assert accepted < 16 * 1024 * 1024
    bob.send({"type": "say", "text": "bob is not slowed"})
    alice.recv_until(lambda m: m.get("text") == "bob is not slowed")


def test_a_sender_just_under_the_rate_is_not_cut_off_after_a_stall(start_server, open_client):
    # 18 a second against a rate of 20: after a 3 s stall its backlog drains
    # at only 2 a second while it keeps sending, so it waits for seconds
    # without catching up. That is a stall, not flooding: nothing is lost.
    server = start_server("--max-per-ip=100", "--msg-rate=20", "--msg-burst=5",
                          "--flood-seconds=3")
    watcher = open_client(server.port, "watcher")
    sender = open_client(server.port, "sender")
    watcher.recv_until(lambda m: m.get("member") == "sender@127.0.0.1")
    sent = 0

    def send_for(seconds: float) -> None:
        nonlocal sent
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sender.send({"type": "say", "text": f"line {sent}"})
            sent += 1
            time.sleep(1 / 18)

    send_for(1.0)
    server.proc.send_signal(signal.SIGSTOP)
    try:
        send_for(3.0)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    send_for(4.0)
    got = []
    while len(got) < sent:
        msg = watcher.recv(timeout=15)
        assert msg["type"] == "message", msg
        got.append(msg["text"])
    assert got == [f"line {i}" for i in range(sent)]
    assert "flooding" not in server.log_text()
