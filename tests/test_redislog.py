"""RedisLog in-process against a real redis-server: seqs from Redis, the
in-memory mirror, start-up from the stream, a failed publish handed back."""

from __future__ import annotations

import selectors
import time

import pytest

from tcpserver import protocol
from tcpserver.redislog import RedisLog

pytest_plugins = ["redis_fixtures"]


class Driven:
    """A RedisLog in its own selector loop, as the server drives it."""

    def __init__(self, url: str, recent: int = 5) -> None:
        self.selector = selectors.DefaultSelector()
        self.log = RedisLog(url, "t", protocol.MAX_FRAME_SIZE, recent, retain=1000)
        self.log.attach(self.selector)
        self.delivered: list[bytes] = []

    def turn(self) -> None:
        for key, mask in self.selector.select(0.05):
            key.data.on_ready(mask)
        self.delivered += self.log.commit()
        self.log.flush()
        self.log.tick(time.monotonic())

    def until(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not met in time"
            self.turn()

    def close(self) -> None:
        self.log.close()
        self.selector.close()


@pytest.fixture
def driven():
    made = []

    def make(url: str, recent: int = 5) -> Driven:
        made.append(Driven(url, recent))
        return made[-1]

    yield make
    for d in made:
        d.close()


def seqs(frames: list[bytes]) -> list[int]:
    decoder = protocol.FrameDecoder()
    decoder.receive_data(b"".join(frames))
    return [protocol.parse_server_message(p)["seq"] for p in iter(decoder.next_payload, None)]


def test_events_get_consecutive_seqs_and_the_mirror_keeps_the_newest(start_redis, driven):
    redis = start_redis()
    d = driven(redis.url)
    d.until(lambda: d.log.cmd.up and d.log.reader.up)
    for i in range(8):
        # A text that looks like the seq field must not confuse the split.
        frame = d.log.stage({"type": "message", "from": "a@1", "text": f'"seq":{i}', "ts": 1})
        assert b'"seq":1000000000000000' in frame  # the placeholder, for its size
    assert d.log.staged == 8
    d.until(lambda: len(d.delivered) == 8)
    assert seqs(d.delivered) == list(range(1, 9))
    texts = [protocol.parse_server_message(f[4:])["text"] for f in d.delivered]
    assert texts == [f'"seq":{i}' for i in range(8)]
    assert (d.log.first_seq, d.log.last_seq) == (4, 8)  # a mirror of 5
    assert seqs(d.log.frames(6, 8, 1 << 20)) == [6, 7, 8]
    count, blob = d.log.tail(3)
    assert count == 3 and seqs([blob]) == [6, 7, 8]
    # A second node (or this one restarted) starts from the stream: same
    # epoch, the same last seq, the same newest frames byte for byte.
    again = driven(redis.url)
    assert again.log.epoch == d.log.epoch
    assert (again.log.first_seq, again.log.last_seq) == (4, 8)
    assert again.log.frames(4, 8, 1 << 20) == d.log.frames(4, 8, 1 << 20)


def test_a_publish_that_fails_hands_its_owner_back(start_redis, driven):
    redis = start_redis()
    d = driven(redis.url)
    d.until(lambda: d.log.cmd.up)
    redis.kill()
    d.until(lambda: not d.log.cmd.up)
    assert d.log.degraded.startswith("redis: ")
    owner = object()
    d.log.stage({"type": "message", "from": "a@1", "text": "lost", "ts": 1}, owner)
    d.turn()
    assert d.log.take_failed() == [owner]
    assert d.log.take_failed() == []
    assert d.delivered == []


def test_stream_lag_is_measured_from_the_newest_event(start_redis, driven):
    redis = start_redis()
    d = driven(redis.url)
    d.until(lambda: d.log.cmd.up and d.log.reader.up)
    assert d.log.stats.redis
    hour_ago = int(time.time() * 1000) - 3600_000
    d.log.stage({"type": "message", "from": "a@1", "text": '"ts":1,', "ts": hour_ago})
    d.until(lambda: d.delivered)
    assert 3590 < d.log.stats.stream_lag_seconds < 3700
    assert d.log.stats.stream_lag_events == 0
    assert d.log.stats.published == 1


def test_sync_keeps_a_name_whose_claim_is_on_its_way(start_redis):
    # SYNC (run on a reconnect, or when a node finds it was reaped) takes out
    # this node's names that are not its members: but a name claimed a
    # moment ago is not a member yet, and must stay.
    from tcpserver import redisscripts, resp

    redis = start_redis()
    address = resp.RedisAddress(redis.url)
    prefix = "chatroom:{t}:"
    keys = [prefix + k for k in ("epoch", "seq", "stream", "names", "index")]

    def claim(name: str) -> None:
        assert resp.call(address, ("EVAL", redisscripts.CLAIM, 2, prefix + "names",
                                   prefix + "index", prefix, "n1", name,
                                   f'n1\ntok\n"{name}@1"', ""))[0][0] == 1

    def sync(*pairs: str) -> list:
        return resp.call(address, ("EVAL", redisscripts.SYNC, len(keys), *keys, "e", 1000,
                                   prefix, "n1", 1, 1000, *pairs))[0]

    resp.call(address, ("SET", keys[0], "e"))
    claim("alice")
    claim("bob")
    assert sync("alice", "") == []  # alice: on its way; bob: gone from this node
    names = resp.call(address, ("HKEYS", keys[3]))[0]
    assert names == [b"alice"]
    stream = resp.call(address, ("XRANGE", keys[2], "-", "+"))[0]
    assert [protocol.parse_server_message(f[1]) for _, f in stream] == [
        {"type": "leave", "member": "bob@1", "reason": "hung_up", "ts": 1, "seq": 1}]
    # A member that Redis lost is put back, and said to be missing.
    resp.call(address, ("HDEL", keys[3], "alice"))
    assert sync("alice", 'n1\ntok\n"alice@1"') == [b"alice"]
    assert resp.call(address, ("HKEYS", keys[3]))[0] == [b"alice"]


def test_a_resync_while_a_claim_is_on_its_way_keeps_the_name(start_redis):
    from room_harness import RoomHarness

    from tcpserver import resp

    redis = start_redis()
    log = RedisLog(redis.url, "t", protocol.MAX_FRAME_SIZE, 5)
    h = RoomHarness(roomlog=log)  # the Room with the log's RedisPresence
    selector = selectors.DefaultSelector()
    log.attach(selector)
    presence = h.room.presence

    def turn() -> None:
        for key, mask in selector.select(0.05):
            key.data.on_ready(mask)
        h.commit()
        log.flush()
        log.tick(time.monotonic())

    try:
        deadline = time.monotonic() + 10
        while not presence._registered:
            assert time.monotonic() < deadline
            turn()
        alice = h.connect()
        h.room.handle(alice, {"type": "hello", "name": "alice"})
        assert alice.waiting  # the claim is on its way...
        presence._sync()  # ...when the node resyncs (e.g. it was reaped)
        while alice.name is None:
            assert time.monotonic() < deadline
            turn()
        names = resp.call(resp.RedisAddress(redis.url), ("HKEYS", "chatroom:{t}:names"))[0]
        assert names == [b"alice"]
    finally:
        log.close()
        selector.close()
        h.shutdown()
