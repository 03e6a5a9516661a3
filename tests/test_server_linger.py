"""The presence linger on a real server: joins, leaves and member counts may
wait up to PRESENCE_LINGER (50 ms) to share a send, and nothing else may.
Each test catches one way it could go wrong: bytes held too long (or until
some later event), lost, reordered or sent twice, or no linger at all."""

import signal
import threading
import time

from conftest import RawClient

from tcpserver import protocol
from tcpserver.outbound import PRESENCE_LINGER

pytest_plugins = ["redis_fixtures"]


def storm(port: int, names: list[str]) -> list[RawClient]:
    """Join ``names`` one after another, each in its own loop turn (its
    welcome and own join read before the next hello)."""
    return [_joined(port, name) for name in names]


def _joined(port: int, name: str) -> RawClient:
    client = RawClient(port)
    client.join(name)
    return client


class Counter:
    """Reads a member's socket in a thread as fast as it can, counting the
    reads that found bytes (each at least one send of the server's) and
    when each frame arrived."""

    def __init__(self, client: RawClient) -> None:
        self.sock = client.sock
        self.decoder = protocol.FrameDecoder()
        self.reads = 0
        self.frames: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self.sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            self.reads += 1
            self.decoder.receive_data(data)
            while (payload := self.decoder.next_payload()) is not None:
                self.frames.append((now, protocol.parse_server_message(payload)))

    def wait_for(self, predicate, timeout: float = 5.0) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, msg in list(self.frames):
                if predicate(msg):
                    return when, msg
            time.sleep(0.002)
        raise AssertionError(f"not received in {timeout} s: {[m for _, m in self.frames]}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def assert_storm_then_message(watcher: RawClient, names: list[str], sent: float) -> None:
    """``watcher`` gets the joins of ``names``, then a message said at
    ``sent`` (monotonic s), within a second: whole, in order, seqs
    consecutive."""
    msg, before = watcher.recv_until(lambda m: m["type"] == "message", timeout=1.0)
    assert time.monotonic() - sent < 1.0
    joins = [m for m in before if m["type"] == "join"]
    assert [m["member"] for m in joins] == [f"{n}@127.0.0.1" for n in names]
    seqs = [m["seq"] for m in joins] + [msg["seq"]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def assert_sigterm_delivers_every_join_then_the_notice(server, open_client,
                                                       prefix: str) -> None:
    """Twenty joins, the last still lingering when SIGTERM comes: every
    member gets every join after its own (read by join()), none twice or
    missed, then the shutdown notice and the close; the server exits 0."""
    members = [open_client(server.port, "first")]
    names = [f"{prefix}{i}" for i in range(20)]
    for name in names:
        members.append(open_client(server.port, name))
    server.proc.send_signal(signal.SIGTERM)
    for index, member in enumerate(members):
        notice, before = member.recv_until(lambda m: m["type"] == "shutdown", timeout=3)
        seen = [m["member"] for m in before if m["type"] == "join"]
        assert seen == [f"{n}@127.0.0.1" for n in names[index:]]
        assert member.closed_by_server(3)
    assert server.proc.wait(5) == 0


def test_a_join_storm_then_a_message_arrive_whole_in_order_within_a_second(server,
                                                                             open_client):
    watcher = open_client(server.port, "watcher")
    names = [f"j{i}" for i in range(40)]
    joiners = storm(server.port, names)
    try:
        sent = time.monotonic()
        joiners[-1].send({"type": "say", "text": "after the storm"})
        assert_storm_then_message(watcher, names, sent)
    finally:
        for joiner in joiners:
            joiner.close()


def test_a_message_takes_the_lingering_joins_along_at_once(server, open_client):
    """A join followed at once by a message: the message does not wait for
    the join's linger (best of five, so a busy machine does not fail it)."""
    watcher = open_client(server.port, "watcher")
    counter = Counter(watcher)
    latencies = []
    try:
        for i in range(5):
            joiner = _joined(server.port, f"talker{i}")
            joiner.send({"type": "say", "text": f"hi {i}"})
            sent = time.monotonic()
            when, _ = counter.wait_for(lambda m, i=i: m.get("text") == f"hi {i}")
            latencies.append(when - sent)
            joiner.close()
        # The join came before the message it was published before.
        order = [(m["type"], m.get("member") or m.get("text")) for _, m in counter.frames
                 if m["type"] in ("join", "message")]
        for i in range(5):
            assert order.index(("join", f"talker{i}@127.0.0.1")) \
                < order.index(("message", f"hi {i}"))
    finally:
        counter.stop()
    assert min(latencies) < PRESENCE_LINGER * 0.6, latencies


def join_waits(counter: Counter, port: int, prefix: str, trials: int = 7) -> list[float]:
    """For each of ``trials`` joiners on ``port``, one at a time in an
    otherwise quiet room: seconds from its welcome (sent in the turn that
    published its join) until ``counter``'s member had that join."""
    waits = []
    for i in range(trials):
        time.sleep(0.1)
        joiner = RawClient(port)
        try:
            joiner.send({"type": "hello", "name": f"{prefix}{i}"})
            label = joiner.recv_type("welcome")["label"]
            welcomed = time.monotonic()
            when, _ = counter.wait_for(lambda m: m.get("member") == label)
            waits.append(when - welcomed)
        finally:
            joiner.close()
        counter.wait_for(lambda m: m["type"] == "leave" and m["member"] == label)
    return sorted(waits)


def test_an_idle_server_sends_a_lingering_join_when_its_linger_ends(server, open_client):
    """Nothing else happens after a join: the server wakes for it by itself
    after about PRESENCE_LINGER (not at its next 0.25 s tick, nor never)."""
    counter = Counter(open_client(server.port, "watcher"))
    try:
        waits = join_waits(counter, server.port, "late")
    finally:
        counter.stop()
    # One slow trial is forgiven (a busy machine); a wake-up left to the
    # tick would be up to 0.25 s late in most of them.
    assert waits[-2] < 0.12, waits
    assert waits[0] > PRESENCE_LINGER * 0.6, waits  # it did linger


def test_a_join_storm_costs_a_member_a_few_sends(server, open_client):
    watcher = open_client(server.port, "watcher")
    counter = Counter(watcher)
    joiners: list[RawClient] = []
    try:
        start = time.monotonic()
        joiners = storm(server.port, [f"s{i}" for i in range(40)])
        took = time.monotonic() - start
        counter.wait_for(lambda m: m.get("member") == "s39@127.0.0.1")
        joins = [m for _, m in counter.frames if m["type"] == "join"]
        assert len(joins) == 40
        # One send per linger at most, and a partial one at each end.
        assert counter.reads <= took / PRESENCE_LINGER + 3, (counter.reads, took)
    finally:
        counter.stop()
        for joiner in joiners:
            joiner.close()


def test_sigterm_after_a_join_storm_delivers_every_join_then_the_notice(start_server,
                                                                          open_client):
    server = start_server("--max-per-ip=200", "--shutdown-grace=3")
    assert_sigterm_delivers_every_join_then_the_notice(server, open_client, "m")


def test_a_quitter_gets_the_lingering_joins_before_its_own_leave_then_fin(server,
                                                                           open_client):
    quitter = open_client(server.port, "quitter")
    joiners = storm(server.port, ["x1", "x2", "x3"])
    try:
        quitter.send({"type": "quit"})  # the three joins still linger for it
        sent = time.monotonic()
        leave, before = quitter.recv_until(lambda m: m["type"] == "leave", timeout=1)
        assert leave["member"] == "quitter@127.0.0.1"
        assert [m["member"] for m in before if m["type"] == "join"] == [
            "x1@127.0.0.1", "x2@127.0.0.1", "x3@127.0.0.1"]
        assert quitter.closed_by_server(1)
        assert time.monotonic() - sent < PRESENCE_LINGER * 4
    finally:
        for joiner in joiners:
            joiner.close()


def test_a_who_reply_comes_after_the_joins_it_lists(server, open_client):
    watcher = open_client(server.port, "watcher")
    joiners = storm(server.port, ["w1", "w2"])
    try:
        watcher.send({"type": "who"})
        reply, before = watcher.recv_until(lambda m: m["type"] == "members", timeout=1)
        assert "w2@127.0.0.1" in reply["members"]
        assert [m["member"] for m in before if m["type"] == "join"] == [
            "w1@127.0.0.1", "w2@127.0.0.1"]
    finally:
        for joiner in joiners:
            joiner.close()


def test_with_redis_a_storm_on_two_nodes_then_a_message_arrive_whole_in_order(
        start_redis, start_server, open_client):
    """Joins read back from Redis (other nodes' included) linger like local
    ones, and a message read back takes them along."""
    redis = start_redis()
    a, b = (start_server("--max-per-ip=200", f"--redis={redis.url}") for _ in range(2))
    watchers = [open_client(a.port, "wa"), open_client(b.port, "wb")]
    watchers[0].recv_until(lambda m: m.get("member") == "wb@127.0.0.1")
    names = [f"r{i}" for i in range(30)]
    joiners = [_joined((a, b)[i % 2].port, name) for i, name in enumerate(names)]
    try:
        sent = time.monotonic()
        joiners[-1].send({"type": "say", "text": "after the storm"})
        for watcher in watchers:
            assert_storm_then_message(watcher, names, sent)
    finally:
        for joiner in joiners:
            joiner.close()


def test_with_redis_an_idle_node_sends_another_nodes_join_when_its_linger_ends(
        start_redis, start_server, open_client):
    redis = start_redis()
    a, b = (start_server("--max-per-ip=200", f"--redis={redis.url}") for _ in range(2))
    counter = Counter(open_client(a.port, "watcher"))
    try:
        waits = join_waits(counter, b.port, "far")
    finally:
        counter.stop()
    assert waits[-2] < 0.12, waits


def test_with_redis_sigterm_after_a_join_storm_delivers_every_join_then_the_notice(
        start_redis, start_server, open_client):
    redis = start_redis()
    a = start_server("--max-per-ip=200", f"--redis={redis.url}", "--shutdown-grace=3")
    assert_sigterm_delivers_every_join_then_the_notice(a, open_client, "q")
