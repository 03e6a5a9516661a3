"""One room across several chat server processes through a real redis-server."""

from __future__ import annotations

import pytest

pytest_plugins = ["redis_fixtures"]

BURST = 20  # says per member: under the rate limit's burst of 30


@pytest.fixture
def node(start_server):
    """Factory ``node(redis, *args) -> ServerProcess`` joined to the room in ``redis``."""

    def start(redis, *args: str):
        return start_server("--max-per-ip=200", f"--redis={redis.url}", *args)

    return start


def room_events(client, until, timeout: float = 15.0) -> list[dict]:
    """Room events (those with a seq) read until ``until(events)`` holds."""
    events: list[dict] = []
    while not until(events):
        message = client.recv(timeout)
        if "seq" in message:
            events.append(message)
    return events


def key(event: dict) -> tuple:
    return (event["seq"], event["type"], event.get("from") or event.get("member"),
            event.get("text"))


def test_six_members_on_two_nodes_see_one_identical_transcript(start_redis, node, open_client):
    redis = start_redis()
    a, b = node(redis), node(redis)
    members = []
    for i in range(3):
        members.append(open_client(a.port, f"a{i}"))
        members.append(open_client(b.port, f"b{i}"))
    # Everyone has seen the last join before the burst starts.
    last_join = members[-1].label
    for member in members[:-1]:  # the last one read its own join in join()
        member.recv_until(lambda m: m["type"] == "join" and m["member"] == last_join)
    for i in range(BURST):
        for n, member in enumerate(members):
            member.send({"type": "say", "text": f"{n}:{i}"})
    total = BURST * len(members)

    def all_said(events):
        return sum(e["type"] == "message" for e in events) == total

    transcripts = [[key(e) for e in room_events(m, all_said)] for m in members]
    assert all(t == transcripts[0] for t in transcripts)
    seqs = [k[0] for k in transcripts[0]]
    assert seqs == list(range(seqs[0], seqs[0] + total))
    # Each member's own messages are in it, in the order it sent them.
    for n, member in enumerate(members):
        own = [k[3] for k in transcripts[n] if k[2] == member.label]
        assert own == [f"{n}:{i}" for i in range(BURST)]
