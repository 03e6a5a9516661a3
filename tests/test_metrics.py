"""--metrics-port: a real server subprocess scraped over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tcpserver import protocol
from tests.conftest import ROOT

# start_redis
pytest_plugins = ["redis_fixtures"]

METRICS_AT = r"metrics on http://127\.0\.0\.1:(\d+)/metrics"


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_value(port: int, name: str, expected: float, timeout: float = 10.0) -> dict:
    """Scrape until ``name`` equals ``expected`` (the loop updates some
    numbers a turn after the bytes left); return the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if value(samples, name) == expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def metrics_server(start_server, *args: str):
    server = start_server("--metrics-port=0", *args)
    return server, int(server.wait_log(METRICS_AT).group(1))


def test_metrics_count_a_conversation(start_server, open_client):
    # Loopback is not a trusted proxy here: it is counted from accept on.
    server, port = metrics_server(start_server, "--max-per-ip=3", "--trusted-proxy=192.0.2.1/32")
    samples = scrape(port)
    assert value(samples, "chat_members") == 0
    assert value(samples, "chat_connections_refused_total", reason="too_many_connections") == 0
    assert ("chat_redis_round_trip_seconds_count", ()) not in samples  # no Redis here

    alice = open_client(server.port, "alice")
    bob = open_client(server.port, "bob")
    carol = open_client(server.port, "carol")
    for i in range(4):
        alice.send({"type": "say", "text": f"hello {i}"})
    for member in (alice, bob, carol):
        member.recv_until(lambda m: m.get("text") == "hello 3")
    refused = open_client(server.port)
    assert refused.recv()["code"] == "too_many_connections"

    samples = scrape(port)  # the refusal was counted before it was sent
    assert value(samples, "chat_members") == 3
    assert value(samples, "chat_connections_accepted_total") == 3
    assert value(samples, "chat_connections_refused_total", reason="too_many_connections") == 1
    # Three joins and four messages, each committed once.
    assert value(samples, "chat_events_published_total") == 7
    assert value(samples, "chat_stream_events_total") == 7
    # Joins reach 1, 2 and 3 members; each message reaches all three.
    assert value(samples, "chat_deliveries_total") == 1 + 2 + 3 + 4 * 3
    assert value(samples, "chat_bytes_out_total") > 0
    assert value(samples, "chat_evictions_total") == 0
    assert value(samples, "process_cpu_seconds_total") > 0

    carol.send({"type": "quit"})
    alice.recv_until(lambda m: m["type"] == "leave")
    samples = wait_value(port, "chat_members", 2)
    assert value(samples, "chat_members") == 2
    assert value(samples, "chat_events_published_total") == 8


def test_bytes_out_counts_what_clients_read(start_server):
    server, port = metrics_server(start_server)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        sock.sendall(protocol.encode_frame({"type": "hello", "name": "solo"}))
        sock.sendall(protocol.encode_frame({"type": "say", "text": "the end"}))
        received = b""
        while b"the end" not in received:
            chunk = sock.recv(65536)
            assert chunk, "the server closed"
            received += chunk
        samples = wait_value(port, "chat_bytes_out_total", len(received))
        assert value(samples, "chat_bytes_out_total") == len(received)
    finally:
        sock.close()


def test_metrics_count_an_eviction(start_server, open_client):
    server, port = metrics_server(start_server, "--slow-reader-bytes=65536",
                                  "--msg-rate=100000", "--msg-burst=100000")
    alice = open_client(server.port, "alice")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(protocol.encode_frame({"type": "hello", "name": "stalled"}))
    try:
        alice.recv_until(lambda m: m.get("member") == "stalled@127.0.0.1")
        evicted = None
        deadline = time.monotonic() + 30
        # Bounded: 3000 x 3 KB is past any kernel buffer plus the 64 KiB limit.
        for i in range(3000):
            if time.monotonic() > deadline:
                break
            alice.send({"type": "say", "text": f"{i} " + "y" * 3000})
            msg = alice.recv_until(lambda m: m.get("text", "").startswith(f"{i} ")
                                   or m["type"] == "leave")[0]
            if msg["type"] == "leave":
                evicted = msg
                break
        assert evicted is not None and evicted["reason"] == "slow_reader"
        samples = wait_value(port, "chat_evictions_total", 1)
        assert value(samples, "chat_evictions_total") == 1
        assert value(samples, "chat_members") == 1
    finally:
        stalled.close()


def test_metrics_port_in_use_is_one_line_and_exit_1(tmp_path):
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "tcpserver", "--name=server", "--port=0", "--db=:memory:",
             f"--metrics-port={taken.getsockname()[1]}"],
            cwd=ROOT, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    finally:
        taken.close()
    assert result.returncode == 1
    assert "cannot serve metrics on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_port_out_of_range_is_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "tcpserver", "--name=server", "--metrics-port=70000"],
        cwd=ROOT, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert "port 70000 is out of range" in result.stderr


def test_redis_nodes_count_their_own_publications_and_every_stream_event(
        start_redis, start_server, open_client):
    redis = start_redis()
    node_a, port_a = metrics_server(start_server, f"--redis={redis.url}", "--room=metrics")
    node_b, port_b = metrics_server(start_server, f"--redis={redis.url}", "--room=metrics")
    ann = open_client(node_a.port, "ann")
    ben = open_client(node_b.port, "ben")
    ann.recv_until(lambda m: m.get("member") == ben.label)
    for i in range(3):
        ann.send({"type": "say", "text": f"across {i}"})
    for member in (ann, ben):
        member.recv_until(lambda m: m.get("text") == "across 2")

    a = wait_value(port_a, "chat_stream_events_total", 5)
    b = wait_value(port_b, "chat_stream_events_total", 5)
    # Each node published its own member's events, once; each streamed all
    # five (two joins, three messages) from Redis.
    assert value(a, "chat_events_published_total") == 4
    assert value(b, "chat_events_published_total") == 1
    assert value(a, "chat_stream_events_total") == value(b, "chat_stream_events_total") == 5
    assert (value(a, "chat_members"), value(b, "chat_members")) == (1, 1)
    for samples, publish_calls in ((a, 2), (b, 1)):
        count = value(samples, "chat_redis_round_trip_seconds_count")
        assert count >= publish_calls  # one per EVALSHA at least
        assert value(samples, "chat_redis_round_trip_seconds_bucket", le="+Inf") == count
        assert value(samples, "chat_redis_round_trip_seconds_sum") > 0
        assert value(samples, "chat_stream_lag_events") == 0
        assert value(samples, "chat_stream_lag_seconds") >= 0
        assert value(samples, "chat_deliveries_total") >= 3
