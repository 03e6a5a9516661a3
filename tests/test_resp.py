"""tcpserver.resp against a real redis-server: pipelining, replies in
order, failures answered, reconnect with backoff."""

from __future__ import annotations

import selectors
import time

import pytest

from tcpserver import resp

pytest_plugins = ["redis_fixtures"]


class Loop:
    """The server's loop in miniature: select, dispatch, flush, tick."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.conns: list[resp.RedisConnection] = []

    def connect(self, url: str, **hooks) -> resp.RedisConnection:
        conn = resp.RedisConnection(resp.RedisAddress(url), self.selector, "test", **hooks)
        self.conns.append(conn)
        return conn

    def turn(self, timeout: float = 0.05) -> None:
        for key, mask in self.selector.select(timeout):
            key.data.on_ready(mask)
        now = time.monotonic()
        for conn in self.conns:
            conn.flush()
            conn.tick(now)

    def until(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not met in time"
            self.turn()

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.selector.close()


@pytest.fixture
def loop():
    made = Loop()
    yield made
    made.close()


def test_address_parsing():
    address = resp.RedisAddress("redis://10.0.0.1:7000/3")
    assert (address.host, address.port, address.db) == ("10.0.0.1", 7000, 3)
    assert resp.RedisAddress("redis://localhost").port == 6379
    for bad in ("http://x:1/0", "redis://x:1/db", "redis:///0"):
        with pytest.raises(ValueError):
            resp.RedisAddress(bad)


def test_a_turns_commands_go_in_one_write_and_replies_come_in_order(start_redis, loop):
    redis = start_redis()
    conn = loop.connect(redis.url)
    loop.until(lambda: conn.up)
    replies = []
    for i in range(500):
        conn.command("INCR", "n", callback=replies.append)
    conn.command("GET", "missing", callback=replies.append)
    conn.command("HSET", "n", "f", "v", callback=replies.append)  # wrong type: an error
    assert conn.pending == 502
    queued = len(conn._out)
    assert queued > 500 * len(b"*2\r\n$4\r\nINCR\r\n")  # nothing sent before the flush
    conn.flush()
    assert not conn._out  # the whole pipeline went in one send
    loop.until(lambda: len(replies) == 502)
    assert replies[:500] == list(range(1, 501))
    assert replies[500] is None
    assert isinstance(replies[501], resp.ReplyError) and "WRONGTYPE" in str(replies[501])


def test_select_a_database(start_redis, loop):
    redis = start_redis()
    conn = loop.connect(redis.url.replace("/0", "/2"))
    loop.until(lambda: conn.up)
    done = []
    conn.command("SET", "k", "in-2", callback=done.append)
    loop.until(lambda: done)
    address = resp.RedisAddress(redis.url)
    assert resp.call(address, ("SELECT", 2), ("GET", "k"))[1] == b"in-2"
    assert resp.call(address, ("GET", "k")) == [None]


def test_failure_answers_every_pending_callback_then_reconnects(start_redis, loop):
    redis = start_redis()
    ups, downs = [], []
    conn = loop.connect(redis.url, on_up=lambda: ups.append(1), on_down=downs.append)
    loop.until(lambda: conn.up)
    replies = []
    # A blocking read keeps a callback pending while Redis dies.
    conn.command("BLPOP", "nothing", 0, callback=replies.append, timeout=60)
    loop.turn()
    redis.kill()
    loop.until(lambda: replies)
    assert isinstance(replies[0], ConnectionError)
    assert downs and not conn.up
    # Commands while down are answered with an error, not dropped.
    conn.command("PING", callback=replies.append)
    loop.turn()
    assert isinstance(replies[1], ConnectionError)
    redis.start()
    loop.until(lambda: conn.up, timeout=15)
    assert len(ups) == 2
    conn.command("PING", callback=replies.append)
    loop.until(lambda: len(replies) == 3)
    assert replies[2] == b"PONG"


def test_backoff_doubles_and_is_capped(start_redis, loop):
    redis = start_redis()
    redis.kill()  # nothing listens on the port now
    conn = loop.connect(redis.url)
    gaps = []
    for _ in range(7):
        before = conn._backoff
        conn.tick(conn._retry_at)
        loop.until(lambda: conn.state == "down")
        gaps.append(before)
    assert gaps[:3] == [0.5, 1.0, 2.0]
    assert max(gaps) == resp.BACKOFF_MAX


def test_a_reply_that_never_comes_breaks_the_connection(start_redis, loop):
    redis = start_redis()
    conn = loop.connect(redis.url)
    loop.until(lambda: conn.up)
    replies = []
    conn.command("BLPOP", "nothing", 0, callback=replies.append, timeout=0.2)
    loop.until(lambda: replies)
    assert isinstance(replies[0], ConnectionError) and "no reply in time" in str(replies[0])


def test_blocking_call_for_start_up(start_redis):
    redis = start_redis()
    address = resp.RedisAddress(redis.url)
    assert resp.call(address, ("SET", "a", "1"), ("GET", "a")) == [b"OK", b"1"]
    redis.kill()
    with pytest.raises(OSError):
        resp.call(address, ("PING",))


def test_a_connection_that_keeps_answering_is_never_timed_out(start_redis, loop):
    redis = start_redis()
    conn = loop.connect(redis.url)
    loop.until(lambda: conn.up)
    replies = []

    def again(reply):
        # Like the stream reader: each reply queues the next blocking read.
        replies.append(reply)
        conn.command("BLPOP", "nothing", 0.1, callback=again, timeout=0.3)

    conn.command("BLPOP", "nothing", 0.1, callback=again, timeout=0.3)
    loop.until(lambda: len(replies) >= 8)  # 8 x 0.1 s: well past one timeout
    assert all(reply is None for reply in replies), replies
    assert conn.up
