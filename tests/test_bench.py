"""The benchmark's own machinery still works: the C load generator speaks
both protocols and counts deliveries, losses and seq gaps.  A few members for
a second each; no timing is asserted."""

from __future__ import annotations

import json
import selectors
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

# Appended, not prepended, and no bench module is named like a package: the
# editable install's import hook runs after sys.path, so a tests/bench module
# called gateway.py would hide the real package from every later test.
sys.path.append(str(Path(__file__).resolve().parent / "bench"))

from harness import Loadgen, build_loadgen, start_redis, start_server  # noqa: E402

from tcpserver import protocol  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory):
    return build_loadgen(tmp_path_factory.mktemp("loadgen"))


def run(loadgen: Path, mode: str, proto: str, port: int, members: int, **options) -> dict:
    gen = Loadgen(loadgen, mode, proto, port, members, timeout=30, **options)
    try:
        seated = gen.line("seated")
        result = gen.line("result")
    finally:
        gen.close()
    assert gen.proc.returncode == 0, gen.errors()
    return {**seated, **result}


def test_chat_throughput_counts_every_delivery(loadgen, tmp_path):
    server = start_server(tmp_path, 20)
    try:
        r = run(loadgen, "throughput", "chat", server.port, 20, publishers=5, seconds=1)
    finally:
        server.stop()
    assert r["joined"] == "20"
    assert int(r["published"]) > 0
    assert int(r["deliveries"]) > 0
    assert (r["lost"], r["seq_gaps"], r["disconnects"]) == ("0", "0", "0")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_throughput_counts_every_delivery(loadgen, tmp_path):
    redis = start_redis(tmp_path, 20)
    try:
        r = run(loadgen, "throughput", "redis", redis.port, 20, publishers=5, seconds=1)
    finally:
        redis.stop()
    assert int(r["deliveries"]) > 0
    assert (r["lost"], r["disconnects"]) == ("0", "0")


def test_storm_seats_everyone_and_they_hear_a_message(loadgen, tmp_path):
    server = start_server(tmp_path, 50)
    try:
        r = run(loadgen, "storm", "chat", server.port, 50)
    finally:
        server.stop()
    assert (r["joined"], r["heard"]) == ("50", "50")


class GappyServer(threading.Thread):
    """A chat server that welcomes everyone and then, on the first say,
    sends each member messages 1 and 3 (2 is missing) and never echoes the
    says: the generator must report both the seq gap and the lost says."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        members: list[socket.socket] = []
        decoders: dict[socket.socket, protocol.FrameDecoder] = {}
        sent = False
        while not self.stop.is_set():
            for key, _ in sel.select(0.1):
                if key.fileobj is self.listener:
                    sock, _ = self.listener.accept()
                    sel.register(sock, selectors.EVENT_READ)
                    decoders[sock] = protocol.FrameDecoder()
                    continue
                sock = key.fileobj
                data = sock.recv(65536)
                if not data:
                    sel.unregister(sock)
                    continue
                decoders[sock].receive_data(data)
                while (payload := decoders[sock].next_payload()) is not None:
                    frame = json.loads(payload)
                    if frame["type"] == "hello":
                        members.append(sock)
                        sock.sendall(protocol.encode_frame(
                            {"type": "welcome", "name": frame["name"], "last_seq": 0}))
                    elif frame["type"] == "say" and not sent:
                        sent = True
                        for member in members:
                            for seq in (1, 3):
                                member.sendall(protocol.encode_frame(
                                    {"type": "message", "seq": seq, "from": "x@127.0.0.1",
                                     "text": "hi", "ts": 0}))
        for sock in [*members, self.listener]:
            sock.close()


def test_losses_and_gaps_are_reported(loadgen):
    server = GappyServer()
    server.start()
    try:
        r = run(loadgen, "throughput", "chat", server.port, 3, publishers=3, window=2,
                seconds=0.5, drain=0.5)
    finally:
        server.stop.set()
        server.join(10)
    assert r["published"] == "6"
    assert r["deliveries"] == "6"
    assert r["lost"] == str(6 * 3 - 6)
    assert r["seq_gaps"] == "3"


@pytest.mark.parametrize("db", ["room.db", ":memory:"])
def test_restart_members_come_back(loadgen, tmp_path, db):
    """Killed mid-burst and started again: every member reconnects, rejoins
    and fills its gap; with a database nothing is lost and the epoch stays
    (a replay limit of 5 makes the rejoins' own joins overflow history-after,
    so members must page back with history-before), without one every member
    notices the new epoch."""
    db_arg = f"--db={tmp_path / db if db != ':memory:' else db}"
    server = start_server(tmp_path, 20, db_arg, "--history-replay=5")
    restarted = None
    gen = Loadgen(loadgen, "restart", "chat", server.port, 20, publishers=3, timeout=30)
    try:
        gen.line("seated")
        time.sleep(0.2)  # some traffic, so that members hold different seqs
        server.kill(signal.SIGKILL)
        restarted = start_server(tmp_path, 20, db_arg, "--history-replay=5", port=server.port)
        result = gen.line("result")
    finally:
        gen.close()
        server.stop()
        if restarted:
            restarted.stop()
    assert result["back"] == "20"
    if db == ":memory:":
        assert result["epoch_changed"] == "20"
    else:
        assert (result["epoch_changed"], result["lost"]) == ("0", "0")
        assert int(result["paged"]) == int(result["missed"]) > 0


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_paced_run_over_two_nodes_times_every_delivery(loadgen, tmp_path):
    # cluster.py's options: port2 splits the members over two nodes of one
    # room; rate paces the publishers and records every delivery's latency.
    from cluster import scrape

    redis = start_redis(tmp_path, 20)
    nodes = []
    try:
        for i in range(2):
            nodes.append(start_server(tmp_path, 20, f"--redis=redis://127.0.0.1:{redis.port}/0",
                                      "--metrics-port=0", log_name=f"node{i}.log"))
        urls = [n._wait_for(r"metrics on (http://\S+/metrics)", 10).group(1) for n in nodes]
        gen = Loadgen(loadgen, "throughput", "chat", nodes[0].port, 20, publishers=4,
                      seconds=1, rate=40, timeout=30, port2=nodes[1].port)
        try:
            gen.line("seated")
            latency = gen.line("latency")
            result = gen.line("result")
        finally:
            gen.close()
        accepted = [scrape(url, "chat_connections_accepted_total") for url in urls]
    finally:
        for node in nodes:
            node.stop()
        redis.stop()
    assert accepted == [10, 10]
    assert 30 <= int(result["published"]) <= 41  # 40 a second, on a schedule, for 1 s
    assert (result["lost"], result["seq_gaps"], result["disconnects"]) == ("0", "0", "0")
    assert int(latency["samples"]) == int(result["published"]) * 20
    assert float(latency["p50_ms"]) <= float(latency["p99_ms"]) <= float(latency["max_ms"])
