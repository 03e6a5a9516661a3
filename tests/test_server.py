"""The chat server as a real subprocess: the room's behaviour."""

import os
import pty
import resource
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, RawClient
from room_harness import RoomHarness

from tcpserver import protocol


def room_events(client: RawClient, count: int, timeout: float = 5.0) -> list[dict]:
    """The next ``count`` room events (message/join/leave) the client gets."""
    events = []
    while len(events) < count:
        msg = client.recv(timeout)
        if msg["type"] in ("message", "join", "leave"):
            events.append(msg)
    return events


def test_everyone_gets_one_identical_transcript(connect):
    clients = [connect(name) for name in ("alice", "bob", "carol")]
    # Let every member reach the same point: carol's join.
    for client in clients[:2]:
        client.recv_until(lambda m: m.get("member") == "carol@127.0.0.1")
    per_sender = 20  # within the default burst of the rate limit
    for i in range(per_sender):
        for client in clients:
            client.send({"type": "say", "text": f"{client.label} #{i}"})
    transcripts = [room_events(c, per_sender * 3) for c in clients]
    assert transcripts[0] == transcripts[1] == transcripts[2]
    seqs = [event["seq"] for event in transcripts[0]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    texts = [e["text"] for e in transcripts[0]]
    for client in clients:  # the sender included, in the order it sent
        own = [t for t in texts if t.startswith(client.label)]
        assert own == [f"{client.label} #{i}" for i in range(per_sender)]
    assert all(e["from"] == e["text"].split(" ")[0] for e in transcripts[0])


def test_welcome_lists_members_and_recent_history(connect):
    alice = connect("alice")
    alice.send({"type": "say", "text": "before bob"})
    room_events(alice, 1)
    bob = connect()
    bob.send({"type": "hello", "name": "bob"})
    welcome = bob.recv_type("welcome")
    assert welcome["label"] == "bob@127.0.0.1"
    assert welcome["members"] == ["alice@127.0.0.1", "bob@127.0.0.1"]
    assert welcome["more"] is False
    replay = [bob.recv() for _ in range(welcome["history"])]
    assert [e["seq"] for e in replay] == list(range(1, welcome["last_seq"] + 1))
    assert replay[-1]["text"] == "before bob"
    own_join = bob.recv()
    assert own_join == {**own_join, "type": "join", "member": "bob@127.0.0.1",
                        "seq": welcome["last_seq"] + 1}


def test_join_and_leave_notices_with_reasons(connect):
    alice = connect("alice")
    bob = connect("bob")
    join = alice.recv_type("join")
    assert join["member"] == "bob@127.0.0.1"
    bob.send({"type": "quit"})
    leave = alice.recv_type("leave")
    assert (leave["member"], leave["reason"]) == ("bob@127.0.0.1", "quit")
    # The quitter sees its own leave, then the server closes.
    assert bob.recv_type("leave")["member"] == "bob@127.0.0.1"
    assert bob.closed_by_server()
    carol = connect("carol")
    alice.recv_type("join")
    carol.close()
    leave = alice.recv_type("leave")
    assert (leave["member"], leave["reason"]) == ("carol@127.0.0.1", "hung_up")


def test_name_rules(connect):
    connect("Alice")
    other = connect()
    other.send({"type": "hello", "name": "aLiCe"})
    assert other.recv()["code"] == "name_taken"
    for bad in ("server", "has space", "x" * 33, ""):
        other.send({"type": "hello", "name": bad})
        assert other.recv()["code"] == "name_invalid"
    # The connection stays usable: a good name still joins.
    assert other.join("alice2")["label"] == "alice2@127.0.0.1"
    other.send({"type": "hello", "name": "again"})
    assert other.recv()["code"] == "already_joined"


def test_private_messages(connect):
    alice, bob, carol = connect("alice"), connect("bob"), connect("carol")
    alice.send({"type": "private", "to": "BOB", "text": "psst"})
    got = bob.recv_type("private")
    assert (got["from"], got["to"], got["text"]) == ("alice@127.0.0.1", "bob@127.0.0.1", "psst")
    assert alice.recv_type("private")["text"] == "psst"  # echoed to the sender
    alice.send({"type": "private", "to": "bob@127.0.0.1", "text": "by label"})
    assert bob.recv_type("private")["text"] == "by label"
    alice.send({"type": "private", "to": "nobody", "text": "hello?"})
    assert alice.recv_type("error")["code"] == "no_such_member"
    # carol saw none of it
    carol.send({"type": "say", "text": "marker"})
    _, before = carol.recv_until(lambda m: m.get("text") == "marker")
    assert all(m["type"] != "private" for m in before)


def test_who(connect):
    alice = connect("alice")
    connect("bob")
    alice.send({"type": "who"})
    members = alice.recv_type("members")
    assert members == {"type": "members", "members": ["alice@127.0.0.1", "bob@127.0.0.1"],
                       "more": False, "count": 2}


def test_history_after_a_sequence_number(connect):
    alice = connect("alice")
    for i in range(5):
        alice.send({"type": "say", "text": f"m{i}"})
    events = room_events(alice, 5)
    alice.send({"type": "history", "after": events[1]["seq"]})
    header = alice.recv_type("history")
    assert header == {"type": "history", "after": events[1]["seq"], "count": 3, "missed": 0}
    assert [alice.recv() for _ in range(3)] == events[2:]


def test_retention_bounds_history_and_reports_the_gap(start_server, open_client):
    server = start_server("--retain-events=3", "--max-per-ip=50")
    alice = open_client(server.port)
    alice.join("alice")
    for i in range(6):
        alice.send({"type": "say", "text": f"m{i}"})
    events = room_events(alice, 6)
    alice.send({"type": "history", "after": 0})
    header = alice.recv_type("history")
    assert (header["count"], header["missed"]) == (3, events[-1]["seq"] - 3)
    assert [alice.recv() for _ in range(3)] == events[-3:]


def test_ping_before_hello_never_joins(connect):
    alice = connect("alice")
    probe = connect()
    probe.send({"type": "ping", "token": "probe-1"})
    assert probe.recv() == {"type": "pong", "token": "probe-1"}
    probe.send({"type": "ping"})
    assert probe.recv() == {"type": "pong"}
    probe.close()
    alice.send({"type": "who"})
    assert alice.recv_type("members")["members"] == ["alice@127.0.0.1"]
    alice.send({"type": "say", "text": "marker"})
    _, before = alice.recv_until(lambda m: m.get("text") == "marker")
    assert [m for m in before if m["type"] in ("join", "leave")] == []


def test_forwarded_address_only_from_trusted_proxies(start_server, open_client):
    trusting = start_server("--max-per-ip=50")  # loopback trusted by default
    client = open_client(trusting.port)
    client.send({"type": "hello", "name": "web", "forwarded_for": "203.0.113.7"})
    assert client.recv_type("welcome")["label"] == "web@203.0.113.7"
    distrusting = start_server("--trusted-proxy=10.9.9.9")
    client = open_client(distrusting.port)
    client.send({"type": "hello", "name": "web", "forwarded_for": "203.0.113.7"})
    assert client.recv_type("welcome")["label"] == "web@127.0.0.1"
    distrusting.wait_log("ignored forwarded_for")


def test_per_ip_limit_counts_the_forwarded_address(start_server, open_client):
    server = start_server("--max-per-ip=2")
    first = open_client(server.port)
    first.send({"type": "hello", "name": "a", "forwarded_for": "198.51.100.1"})
    first.recv_type("welcome")
    second = open_client(server.port)
    second.send({"type": "hello", "name": "b", "forwarded_for": "198.51.100.1"})
    second.recv_type("welcome")
    third = open_client(server.port)
    third.send({"type": "hello", "name": "c", "forwarded_for": "198.51.100.1"})
    assert third.recv_type("error")["code"] == "too_many_connections"
    assert third.closed_by_server()
    other = open_client(server.port)  # a different forwarded address still fits
    other.send({"type": "hello", "name": "d", "forwarded_for": "198.51.100.2"})
    assert other.recv_type("welcome")["label"] == "d@198.51.100.2"


def test_sigterm_during_traffic_notifies_everyone_and_exits_zero(start_server, open_client):
    server = start_server("--max-per-ip=50", "--msg-rate=100000", "--msg-burst=100000")
    alice, bob = open_client(server.port), open_client(server.port)
    alice.join("alice")
    bob.join("bob")
    for i in range(200):
        alice.send({"type": "say", "text": f"busy {i}"})
    server.proc.send_signal(signal.SIGTERM)
    for client in (alice, bob):
        notice, before = client.recv_until(lambda m: m["type"] == "shutdown", timeout=10)
        texts = [m["text"] for m in before if m["type"] == "message"]
        # Whatever the server accepted arrives, in order, before the notice.
        assert texts == [f"busy {i}" for i in range(len(texts))]
        assert client.closed_by_server()
        client.close()
    assert server.proc.wait(10) == 0
    assert "Traceback" not in server.log_text()


def test_sigint_also_shuts_down_cleanly(start_server, open_client):
    server = start_server()
    client = open_client(server.port)
    client.join("alice")
    server.proc.send_signal(signal.SIGINT)
    assert client.recv_type("shutdown")["message"]
    client.close()
    assert server.proc.wait(10) == 0
    assert "Traceback" not in server.log_text()


def test_stdin_eof_or_pipe_does_not_stop_the_server(open_client):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcpserver", "--name=server", "--port=0"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        line = proc.stderr.readline().decode()
        port = int(line.rsplit(":", 1)[1])
        proc.stdin.write(b"quit\n")  # a pipe is not a console: ignored
        proc.stdin.close()  # EOF
        time.sleep(0.5)
        assert proc.poll() is None
        client = open_client(port)
        client.send({"type": "ping"})
        assert client.recv()["type"] == "pong"
        client.close()
    finally:
        proc.terminate()
        proc.stderr.close()
        assert proc.wait(10) == 0


def test_quit_typed_on_a_console_stops_the_server():
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcpserver", "--name=server", "--port=0"],
        stdin=follower, stdout=follower, stderr=follower, cwd=ROOT)
    os.close(follower)
    try:
        output = b""
        deadline = time.monotonic() + 10
        while b"listening on" not in output and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                output += os.read(leader, 4096)
        assert b"listening on" in output
        os.write(leader, b"quit\n")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


def test_port_in_use_is_one_clear_error(start_server):
    server = start_server()
    result = subprocess.run(
        [sys.executable, "-m", "tcpserver", "--name=server", f"--port={server.port}"],
        capture_output=True, text=True, timeout=20, cwd=ROOT)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{server.port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("backend", ["select", "poll", "epoll"])
def test_every_backend_serves(start_server, open_client, backend):
    server = start_server(f"--backend={backend}", "--max-per-ip=50")
    alice, bob = open_client(server.port), open_client(server.port)
    alice.join("alice")
    bob.join("bob")
    alice.send({"type": "say", "text": f"via {backend}"})
    assert bob.recv_type("message")["text"] == f"via {backend}"


def test_select_backend_refuses_descriptors_past_fd_setsize(start_server, open_client):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip("needs 1200 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    server = start_server("--backend=select", "--max-per-ip=2000", "--hello-timeout=60")
    alice = open_client(server.port)
    alice.join("alice")
    crowd = []
    try:
        refused = None
        for _ in range(1100):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            crowd.append(sock)
            sock.setblocking(False)
            time.sleep(0.001)
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            refused = data
            break
        assert refused is not None, "no connection was refused"
        assert b'"code":"server_full"' in refused
        # The loop survived: the room still works.
        alice.send({"type": "say", "text": "still here"})
        assert alice.recv_type("message")["text"] == "still here"
        server.wait_log("refused 127.0.0.1")
        assert "ValueError" not in server.log_text()
    finally:
        for sock in crowd:
            sock.close()


def test_max_clients_refuses_with_an_error(start_server, open_client):
    server = start_server("--max-clients=2", "--max-per-ip=50")
    keep = [open_client(server.port), open_client(server.port)]
    keep[0].join("alice")
    extra = open_client(server.port)
    assert extra.recv()["code"] == "server_full"
    assert extra.closed_by_server()
    keep[0].send({"type": "say", "text": "unaffected"})
    assert keep[0].recv_type("message")["text"] == "unaffected"


def test_per_ip_limit_refuses_with_an_error(start_server, open_client):
    # Loopback is not a trusted proxy here, so it is counted from accept on.
    server = start_server("--max-per-ip=2", "--trusted-proxy=192.0.2.1/32")
    keep = [open_client(server.port), open_client(server.port)]
    extra = open_client(server.port)
    assert extra.recv()["code"] == "too_many_connections"
    keep[0].send({"type": "ping"})
    assert keep[0].recv()["type"] == "pong"


def test_second_signal_skips_the_shutdown_grace(start_server, open_client):
    server = start_server("--shutdown-grace=60")
    client = open_client(server.port, "lingerer")  # reads, but never hangs up
    server.proc.send_signal(signal.SIGTERM)
    assert client.recv_type("shutdown")
    server.wait_log("shutting down")
    with pytest.raises(subprocess.TimeoutExpired):
        server.proc.wait(1)  # waiting for the lingerer, as it should
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0


def test_member_lists_use_the_whole_of_a_large_max_frame():
    # The rules alone, with no sockets: thousands of long labels.
    harness = RoomHarness(max_frame=200_000, announce_limit=10_000)
    labels = [f"{'n' * 27}{i:05d}@2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}" for i in range(3000)]
    try:
        for label in labels:
            name, address = label.split("@")
            harness.join(name, forwarded_for=address)
        asker = harness.clients[0]
        harness.sent.clear()
        harness.room.handle(asker, {"type": "who"})
        frames = harness.payloads_for(asker)
        assert [m["more"] for _, m in frames] == [True] * (len(frames) - 1) + [False]
        assert [label for _, m in frames for label in m["members"]] == labels
        assert max(size for size, _ in frames) > protocol.MAX_FRAME_SIZE
    finally:
        harness.shutdown()


def test_resume_token_takes_a_name_back_and_a_wrong_one_does_not(connect):
    alice = connect()
    alice.send({"type": "hello", "name": "alice"})
    token = alice.recv_type("welcome")["resume"]
    bob = connect("bob")
    # alice's link dies silently: the server still holds her old connection.
    thief = connect()
    thief.send({"type": "hello", "name": "alice", "resume": "f" * 32})
    assert thief.recv_type("error")["code"] == "name_taken"
    again = connect()
    again.send({"type": "hello", "name": "alice", "resume": token})
    welcome = again.recv_type("welcome")
    assert welcome["label"] == "alice@127.0.0.1" and welcome["resume"] != token
    assert alice.closed_by_server()
    leave = bob.recv_type("leave")
    assert (leave["member"], leave["reason"]) == ("alice@127.0.0.1", "replaced")
    assert bob.recv_type("join")["member"] == "alice@127.0.0.1"
    again.send({"type": "say", "text": "back"})
    assert bob.recv_type("message")["text"] == "back"


def test_a_large_room_counts_instead_of_announcing(start_server, open_client):
    server = start_server("--announce-limit=3")
    first = [open_client(server.port, f"m{i}") for i in range(3)]
    big = open_client(server.port)
    big.send({"type": "hello", "name": "m3"})
    welcome = big.recv_type("welcome")
    assert (welcome["large"], welcome["members"], welcome["count"]) == (True, [], 4)
    presence = first[0].recv_type("presence")
    assert presence == {"type": "presence", "count": 4, "large": True}
    big.send({"type": "who", "limit": 2})
    page = big.recv_type("members")
    assert (page["members"], page["more"], page["count"]) == (
        ["m0@127.0.0.1", "m1@127.0.0.1"], True, 4)
    big.send({"type": "who", "limit": 2, "cursor": page["cursor"]})
    assert big.recv_type("members")["members"] == ["m2@127.0.0.1", "m3@127.0.0.1"]
    big.send({"type": "quit"})
    assert first[0].recv_type("presence") == {"type": "presence", "count": 3, "large": False}
    first[2].send({"type": "quit"})  # small again: announced
    leave = first[0].recv_type("leave")
    assert leave["member"] == "m2@127.0.0.1"
    # No join or leave of the large phase was broadcast.
    first[1].send({"type": "say", "text": "marker"})
    _, seen = first[1].recv_until(lambda m: m.get("text") == "marker")
    assert [(m["type"], m["member"]) for m in seen if m["type"] in ("join", "leave")] == [
        ("join", "m2@127.0.0.1"), ("leave", "m2@127.0.0.1")]
