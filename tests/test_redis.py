"""One room across several chat server processes through a real redis-server."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import Program, RawClient

from tcpserver import protocol, resp

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


def test_a_name_is_unique_across_nodes_and_a_resume_token_takes_it_back(
        start_redis, node, open_client):
    redis = start_redis()
    a, b = node(redis), node(redis)
    alice = open_client(a.port)
    welcome = alice.join("Alice")
    bob = open_client(b.port, "bob")
    intruder = open_client(b.port)
    intruder.send({"type": "hello", "name": "ALICE"})
    assert intruder.recv_type("error")["code"] == "name_taken"
    intruder.send({"type": "hello", "name": "alice", "resume": "0" * 32})
    assert intruder.recv_type("error")["code"] == "name_taken"
    # The right token on node B takes the name from the stale connection on A.
    intruder.send({"type": "hello", "name": "alice", "resume": welcome["resume"]})
    assert intruder.recv_type("welcome")["name"] == "alice"
    assert alice.closed_by_server()
    leave, _ = bob.recv_until(lambda m: m["type"] == "leave")
    assert (leave["member"], leave["reason"]) == ("Alice@127.0.0.1", "replaced")
    join = bob.recv_type("join")
    assert join["member"] == "alice@127.0.0.1" and join["seq"] == leave["seq"] + 1


def test_private_message_and_who_cross_nodes(start_redis, node, open_client):
    redis = start_redis()
    a, b = node(redis), node(redis)
    alice = open_client(a.port, "alice")
    carol = open_client(a.port, "carol")
    bob = open_client(b.port, "bob")
    welcome = open_client(b.port).join("dave")
    assert welcome["members"] == ["alice@127.0.0.1", "bob@127.0.0.1", "carol@127.0.0.1",
                                  "dave@127.0.0.1"]
    assert welcome["count"] == 4
    alice.send({"type": "private", "to": "bob", "text": "psst"})
    got = bob.recv_type("private")
    assert (got["from"], got["to"], got["text"]) == ("alice@127.0.0.1", "bob@127.0.0.1", "psst")
    assert alice.recv_type("private")["text"] == "psst"  # the sender's copy
    alice.send({"type": "private", "to": "nobody", "text": "x"})
    assert alice.recv_type("error")["code"] == "no_such_member"
    alice.send({"type": "private", "to": "bob@10.9.9.9", "text": "x"})  # a wrong label
    assert alice.recv_type("error")["code"] == "no_such_member"
    bob.send({"type": "who"})
    members = bob.recv_type("members")
    assert members["members"] == welcome["members"] and members["count"] == 4
    # Paged, with a prefix and a cursor, over both nodes.
    carol.send({"type": "who", "limit": 2})
    first = carol.recv_type("members")
    assert first["members"] == ["alice@127.0.0.1", "bob@127.0.0.1"] and first["more"]
    carol.send({"type": "who", "limit": 2, "cursor": first["cursor"]})
    second = carol.recv_type("members")
    assert second["members"] == ["carol@127.0.0.1", "dave@127.0.0.1"]
    assert not second["more"]
    carol.send({"type": "who", "limit": 10, "prefix": "D"})
    assert carol.recv_type("members")["members"] == ["dave@127.0.0.1"]


@pytest.mark.parametrize("survivors", [1, 2])
def test_members_of_a_killed_node_leave_once_within_15_s(start_redis, node, open_client,
                                                        survivors):
    redis = start_redis()
    nodes = [node(redis) for _ in range(survivors)]
    doomed = node(redis)
    watchers = [open_client(n.port, f"watcher{i}") for i, n in enumerate(nodes)]
    victims = [open_client(doomed.port, f"victim{i}") for i in range(3)]
    labels = {v.label for v in victims}
    for watcher in watchers:
        watcher.recv_until(lambda m: m.get("member") == victims[-1].label)
    doomed.kill()
    started = time.monotonic()
    for watcher in watchers:
        leaves = []
        while {m["member"] for m in leaves} != labels:
            message = watcher.recv(max(0.01, started + 15 - time.monotonic()))
            if message["type"] == "leave":
                leaves.append(message)
        assert all(m["reason"] == "hung_up" for m in leaves)
        assert len(leaves) == 3
    assert time.monotonic() - started < 15
    # Once each: nothing more arrives after a few more reap rounds.
    time.sleep(5)
    for watcher in watchers:
        watcher.send({"type": "ping", "token": "end"})
        _, before = watcher.recv_until(lambda m: m.get("token") == "end")
        assert not [m for m in before if m["type"] == "leave"]
    # Their names are free again.
    open_client(nodes[0].port, "victim0")


def say_and_wait(member, text: str, timeout: float = 10.0) -> str:
    """Say ``text``; return "echoed" or the error code that answered it."""
    member.send({"type": "say", "text": text})
    reply, _ = member.recv_until(
        lambda m: (m["type"] == "message" and m["text"] == text and m["from"] == member.label)
        or m["type"] == "error", timeout)
    return "echoed" if reply["type"] == "message" else reply["code"]


def degraded(member, timeout: float = 20.0, want: bool = True,
             seen: list | None = None) -> str | None:
    """Ping until the pong's ``degraded`` is present (``want``) or absent;
    messages read meanwhile go to ``seen``."""
    deadline = time.monotonic() + timeout
    while True:
        member.send({"type": "ping", "token": "health"})
        pong, before = member.recv_until(lambda m: m.get("token") == "health")
        if seen is not None:
            seen.extend(before)
        if bool(pong.get("degraded")) == want:
            return pong.get("degraded")
        assert time.monotonic() < deadline, f"degraded never became {want}"
        time.sleep(0.1)


def test_redis_restart_with_persistence_loses_nothing_and_leaves_no_gap(
        start_redis, node, open_client):
    redis = start_redis(persist=True)
    a, b = node(redis), node(redis)
    alice = open_client(a.port, "alice")
    bob = open_client(b.port, "bob")
    carol = open_client(b.port)
    epoch = carol.join("carol")["epoch"]
    outcome = {}
    for i in range(10):
        outcome[f"m{i}"] = say_and_wait(alice, f"m{i}")
    redis.kill()
    assert degraded(alice).startswith("redis: ")
    for i in range(10, 15):
        outcome[f"m{i}"] = say_and_wait(alice, f"m{i}")
    newcomer = open_client(a.port)
    newcomer.send({"type": "hello", "name": "eve"})  # no name can be checked now
    assert newcomer.recv_type("error")["code"] == "room_unavailable"
    carol.send({"type": "quit"})  # her leave cannot be published yet
    assert carol.closed_by_server()
    redis.start()
    degraded(alice, want=False)
    bob_seen: list[dict] = []
    degraded(bob, want=False, seen=bob_seen)
    for i in range(15, 25):
        outcome[f"m{i}"] = say_and_wait(alice, f"m{i}", timeout=20)
    assert [outcome[f"m{i}"] for i in range(25)] == \
        ["echoed"] * 10 + ["room_unavailable"] * 5 + ["echoed"] * 10
    # Bob, on the other node, saw every echoed message once, with no gap.
    events = [m for m in bob_seen if "seq" in m]
    def done(more):
        seen = events + more
        return any(e.get("text") == "m24" for e in seen) and \
            any(e["type"] == "leave" for e in seen)

    events += room_events(bob, done, timeout=20)
    # Carol's leave was published once Redis was back (as hung_up: the node
    # re-read who is still connected), and her name is free again.
    leaves = [e for e in events if e["type"] == "leave"]
    assert [(e["member"], e["reason"]) for e in leaves] == [("carol@127.0.0.1", "hung_up")]
    said = [e["text"] for e in events if e["type"] == "message"]
    assert said == [f"m{i}" for i in range(10)] + [f"m{i}" for i in range(15, 25)]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # The room's history (from Redis, on either node) holds the same events;
    # the epoch did not change.
    dave = open_client(a.port)
    assert dave.join("carol")["epoch"] == epoch
    dave.send({"type": "history", "after": seqs[0] - 1})
    reply = dave.recv_type("history")
    replayed = [dave.recv() for _ in range(reply["count"])]
    assert [(e["seq"], e.get("text")) for e in replayed][:len(events)] == \
        [(e["seq"], e.get("text")) for e in events]


def test_redis_restarted_empty_starts_a_new_epoch_and_clients_are_told(
        start_redis, node, open_client):
    redis = start_redis()
    a, b = node(redis), node(redis)
    alice = open_client(a.port)
    old = alice.join("alice")["epoch"]
    bob = open_client(b.port, "bob")
    alice.send({"type": "say", "text": "before"})
    bob.recv_until(lambda m: m.get("text") == "before")
    redis.restart(wipe=True)
    for member in (alice, bob):
        notice, _ = member.recv_until(lambda m: m["type"] == "shutdown", timeout=20)
        assert "new transcript" in notice["message"]
        assert member.closed_by_server()
    alice, bob = open_client(a.port), open_client(b.port)
    welcome = alice.join("alice")
    assert welcome["epoch"] != old
    assert bob.join("bob")["epoch"] == welcome["epoch"]
    alice.send({"type": "say", "text": "after"})
    message, _ = bob.recv_until(lambda m: m.get("text") == "after")
    assert message["seq"] <= 3  # numbering starts again: alice's join, bob's, this


def test_a_node_shut_down_takes_its_members_out_at_once(start_redis, node, open_client):
    redis = start_redis()
    a, b = node(redis), node(redis)
    watcher = open_client(a.port, "watcher")
    leaving = open_client(b.port, "leaving")
    watcher.recv_until(lambda m: m.get("member") == leaving.label)
    assert b.terminate() == 0
    assert leaving.recv_type("shutdown")
    # Within the alive key's TTL (5 s): the node retired itself, nobody reaped it.
    leave = watcher.recv_type("leave", timeout=4)
    assert (leave["member"], leave["reason"]) == ("leaving@127.0.0.1", "hung_up")
    watcher.send({"type": "who"})
    assert watcher.recv_type("members")["members"] == ["watcher@127.0.0.1"]


@pytest.mark.parametrize("how", ["unreachable", "not a redis url", "bad room name"])
def test_a_server_that_cannot_use_redis_exits_in_one_line(start_redis, tmp_path, how):
    redis = start_redis()
    redis.kill()  # nothing listens on its port now
    url = "http://127.0.0.1:1/" if how == "not a redis url" else redis.url
    room = "a}b" if how == "bad room name" else "main"
    server = Program(tmp_path, "-m", "tcpserver", "--name=server", "--port=0",
                     f"--redis={url}", f"--room={room}")
    if how != "unreachable":  # a usage error, refused before anything starts
        assert server.proc.wait(10) == 2
        lines = server.log_text().strip().splitlines()
        expected = ("error: --redis: not a redis://" if how == "not a redis url"
                    else "error: --room: the room name 'a}b' is not")
        assert len(lines) == 1 and expected in lines[0], lines
    else:
        assert server.proc.wait(10) == 1
        lines = server.log_text().strip().splitlines()
        assert len(lines) == 1 and f"cannot use Redis at {url}" in lines[0], lines
    server.kill()


def test_the_gateways_health_is_503_while_redis_is_down(start_redis, tmp_path):
    def health() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_for(status: int) -> dict:
        deadline = time.monotonic() + 30
        while True:
            got, body = health()
            if got == status:
                return body
            assert time.monotonic() < deadline, f"/health stayed {got}: {body}"
            time.sleep(0.2)

    redis = start_redis()
    # The launcher (server plus gateway) passes --redis on to its server.
    room = Program(tmp_path, "-m", "gateway.cli", "--port=0", "--http-port=0",
                   f"--redis={redis.url}")
    try:
        host, port = room.wait_log(re.compile(r"serving on http://(\S+?):(\d+)/")).groups()
        wait_for(200)
        redis.kill()
        body = wait_for(503)
        assert body["status"] == "degraded"
        assert body["chat_server"]["degraded"].startswith("redis: ")
        redis.start()
        wait_for(200)
    finally:
        room.kill()


def test_a_join_storm_after_script_flush_welcomes_everyone(start_redis, node):
    # SCRIPT FLUSH makes every EVALSHA meet NOSCRIPT and go again as EVAL,
    # later than the commands queued meanwhile: a turn's member list must
    # still wait for every claim of that turn.
    redis = start_redis()
    a = node(redis)
    members = []
    try:
        for round_ in range(3):
            assert resp.call(resp.RedisAddress(redis.url), ("SCRIPT", "FLUSH")) == [b"OK"]
            batch = [RawClient(a.port) for _ in range(40)]
            members += batch
            hellos = [protocol.encode_frame({"type": "hello", "name": f"r{round_}m{i}"})
                      for i in range(len(batch))]
            for client, hello in zip(batch, hellos):
                client.send_raw(hello)
            for client in batch:
                assert client.recv_until(lambda m: m["type"] in ("welcome", "error"))[0]["type"] \
                    == "welcome"
    finally:
        for client in members:
            client.close()


def test_a_stalled_node_taken_for_dead_puts_its_members_back(start_redis, node, open_client):
    redis = start_redis()
    a, b = node(redis), node(redis)
    watcher = open_client(a.port, "watcher")
    sleeper = open_client(b.port, "sleeper")
    watcher.recv_until(lambda m: m.get("member") == sleeper.label)
    b.proc.send_signal(signal.SIGSTOP)  # past its alive key's TTL: taken for dead
    try:
        leave = watcher.recv_type("leave", timeout=20)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    assert (leave["member"], leave["reason"]) == (sleeper.label, "hung_up")
    # Awake again, B sees it was unregistered and puts its member back.
    join = watcher.recv_type("join", timeout=15)
    assert join["member"] == sleeper.label
    sleeper.send({"type": "say", "text": "still here"})
    assert watcher.recv_type("message")["text"] == "still here"
    watcher.send({"type": "who"})
    assert watcher.recv_type("members")["members"] == [sleeper.label, watcher.label]


def test_redis_killed_mid_traffic_loses_no_echoed_message(start_redis, node, open_client):
    redis = start_redis(persist=True)
    a, b = node(redis), node(redis)
    senders = [open_client(a.port, "alice"), open_client(b.port, "bob")]
    watcher = open_client(b.port, "carol")
    echoed: list[str] = []
    stop = threading.Event()

    def talk(member) -> None:
        # Bounded: at most 300 says, and only until told to stop.
        for i in range(300):
            if stop.is_set():
                return
            text = f"{member.label}:{i}"
            if say_and_wait(member, text, timeout=30) == "echoed":
                echoed.append(text)
            else:
                time.sleep(0.05)

    threads = [threading.Thread(target=talk, args=(m,)) for m in senders]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        redis.kill()
        time.sleep(1.0)
        redis.start()
        time.sleep(2.0)  # reconnect (backoff 0.5 s, 1 s, ...) and talk again
    finally:
        stop.set()
        for thread in threads:
            thread.join(40)
    assert echoed, "nothing was echoed at all"
    last = {m.label: max(int(t.rsplit(":", 1)[1]) for t in echoed if t.startswith(m.label))
            for m in senders if any(t.startswith(m.label) for t in echoed)}

    def heard_last(events):
        texts = {e.get("text") for e in events}
        return all(f"{label}:{n}" in texts for label, n in last.items())

    events = room_events(watcher, heard_last, timeout=30)
    texts = [e.get("text") for e in events]
    assert set(echoed) <= set(texts)
    assert len(set(texts) - {None}) == len([t for t in texts if t])  # none twice
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_a_redis_that_refuses_writes_degrades_the_room_until_it_accepts_them(
        start_redis, node, open_client):
    redis = start_redis()
    a = node(redis)
    alice = open_client(a.port, "alice")
    address = resp.RedisAddress(redis.url)
    # Over maxmemory with no eviction, Redis refuses every write with OOM.
    resp.call(address, ("CONFIG", "SET", "maxmemory-policy", "noeviction"),
              ("CONFIG", "SET", "maxmemory", "1"))
    try:
        assert say_and_wait(alice, "refused") == "room_unavailable"
        assert "OOM" in degraded(alice)
    finally:
        resp.call(address, ("CONFIG", "SET", "maxmemory", "0"))
    degraded(alice, want=False)  # the heartbeat's write succeeds again
    assert say_and_wait(alice, "accepted") == "echoed"


def test_history_before_reaches_back_past_the_memory_copy_into_the_stream(
        start_redis, node, open_client):
    redis = start_redis()
    # A copy of 5 events in memory; the stream holds them all.
    a = node(redis, "--history=5", "--history-replay=5")
    alice = open_client(a.port, "alice")  # seq 1: her join
    for i in range(19):
        assert say_and_wait(alice, f"m{i}") == "echoed"  # seqs 2..20

    def page(before: int, limit: int) -> tuple[dict, list[dict]]:
        alice.send({"type": "history", "before": before, "limit": limit})
        reply = alice.recv_type("history")
        return reply, [alice.recv() for _ in range(reply["count"])]

    reply, events = page(21, 10)
    assert (reply["count"], reply["more"]) == (10, True)
    assert [e["seq"] for e in events] == list(range(11, 21))
    assert [e["text"] for e in events] == [f"m{i}" for i in range(9, 19)]
    reply, events = page(11, 50)
    assert (reply["count"], reply["more"]) == (10, False)
    assert [e["seq"] for e in events] == list(range(1, 11))
    assert events[0]["type"] == "join"
    # Within the memory copy: the same answer as ever.
    reply, events = page(21, 5)
    assert (reply["count"], reply["more"]) == (5, True)
    assert [e["seq"] for e in events] == [16, 17, 18, 19, 20]
    # The transcript goes on after the pages, with no gap.
    assert say_and_wait(alice, "after") == "echoed"


def test_a_message_published_before_shutdown_reaches_its_sender_first(
        start_redis, node, open_client):
    # "Members receive shutdown after every room event accepted before it":
    # with Redis, an event is accepted once published, and its echo comes
    # back later; the notice must wait for it.
    redis = start_redis()
    b = node(redis)
    bob = open_client(b.port, "bob")
    checked = 0
    for trial in range(6):
        a = node(redis)
        alice = open_client(a.port, f"alice{trial}")
        bob.recv_until(lambda m: m.get("member") == alice.label)
        text = f"last words {trial}"
        alice.send({"type": "say", "text": text})
        time.sleep(0.002 * trial)  # a different moment each time
        a.proc.send_signal(signal.SIGTERM)
        _, before = alice.recv_until(lambda m: m["type"] == "shutdown")
        alice.close()
        _, seen = bob.recv_until(
            lambda m: m["type"] == "leave" and m["member"] == alice.label, timeout=15)
        if any(m.get("text") == text for m in seen):
            checked += 1
            assert any(m.get("text") == text for m in before), f"trial {trial}"
        assert a.proc.wait(10) == 0
    assert checked, "no trial published the message: nothing was checked"



def test_a_member_who_quits_sees_its_last_message_and_its_own_leave(
        start_redis, node, open_client):
    # As without Redis: the leaver's stream ends just after its own leave,
    # which comes back from Redis after the quit was handled.  (The
    # terminal client waits for that leave before it exits.)
    redis = start_redis()
    a = node(redis)
    address = resp.RedisAddress(redis.url)
    for i in range(4):
        alice = open_client(a.port, f"alice{i}")
        if i % 2:
            # A slow Redis: its writes wait 300 ms, far past one loop turn.
            resp.call(address, ("CLIENT", "PAUSE", 300, "WRITE"))
        alice.send({"type": "say", "text": "bye"})
        alice.send({"type": "quit"})
        seen = []
        try:
            while True:
                seen.append(alice.recv(10))
        except (EOFError, ConnectionResetError):
            pass
        kinds = [(m["type"], m.get("text") or m.get("reason")) for m in seen]
        assert kinds[-2:] == [("message", "bye"), ("leave", "quit")], kinds


def test_a_member_of_a_killed_node_resumes_on_another_without_a_hung_up_leave(
        start_redis, node, open_client):
    redis = start_redis()
    a, b = node(redis), node(redis)
    watcher = open_client(a.port, "watcher")
    alice = open_client(b.port)
    token = alice.join("alice")["resume"]
    watcher.recv_until(lambda m: m.get("member") == alice.label)
    b.kill()
    # Failover: straight to node A with the resume token, before any reap.
    again = open_client(a.port)
    again.send({"type": "hello", "name": "alice", "resume": token})
    assert again.recv_type("welcome")["name"] == "alice"
    leave = watcher.recv_type("leave")
    assert leave["reason"] == "replaced"
    assert watcher.recv_type("join")["member"] == "alice@127.0.0.1"
    # Node B is reaped meanwhile: alice is no longer its member, so no
    # hung_up leave follows.
    time.sleep(8)  # past the alive key's TTL and a reap round
    watcher.send({"type": "ping", "token": "end"})
    _, later = watcher.recv_until(lambda m: m.get("token") == "end")
    assert [m for m in later if m["type"] == "leave"] == []
    watcher.send({"type": "who"})
    assert watcher.recv_type("members")["members"] == ["alice@127.0.0.1", "watcher@127.0.0.1"]


class Talker:
    """A member saying something every ~millisecond in a thread, and
    draining what it is sent, until ``stop()``."""

    def __init__(self, port: int, name: str) -> None:
        self.client = RawClient(port)
        self.client.join(name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock, n = self.client.sock, 0
        while not self._stop.is_set():
            self.client.send({"type": "say", "text": f"t{n}"})
            n += 1
            time.sleep(0.001)
            sock.setblocking(False)
            try:
                while sock.recv(1 << 20):
                    pass
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


def test_a_welcome_amid_another_nodes_traffic_is_followed_by_each_event_once(
        start_redis, node):
    # Events this node has read from Redis but not yet put on its stream
    # when a welcome is written: the welcome's last_seq (and its history)
    # must not include them, or the newcomer gets them twice.
    redis = start_redis()
    a, b = node(redis), node(redis, "--msg-rate=2000", "--msg-burst=2000")
    talker = Talker(b.port, "talker")
    try:
        for n in range(120):
            client = RawClient(a.port)
            try:
                client.send({"type": "hello", "name": f"n{n}"})
                welcome = client.recv_type("welcome")
                history = [client.recv() for _ in range(welcome["history"])]
                if history:
                    assert history[-1]["seq"] == welcome["last_seq"]
                _, live = client.recv_until(
                    lambda m: m["type"] == "join" and m["member"] == welcome["label"])
                seqs = [m["seq"] for m in live if "seq" in m]
                assert seqs == list(range(welcome["last_seq"] + 1,
                                          welcome["last_seq"] + 1 + len(seqs))), (n, seqs)
            finally:
                client.close()
    finally:
        talker.stop()


def test_a_history_reply_amid_another_nodes_traffic_is_followed_by_no_event_twice(
        start_redis, node, open_client):
    redis = start_redis()
    a, b = (node(redis, "--msg-rate=2000", "--msg-burst=2000") for _ in range(2))
    reader = open_client(a.port, "reader")
    talker = Talker(b.port, "talker")
    try:
        for n in range(300):
            reader.send({"type": "history", "after": 0, "limit": 5})
            reader.send({"type": "ping", "token": f"p{n}"})
            header = reader.recv_type("history")
            replayed = [reader.recv()["seq"] for _ in range(header["count"])]
            _, after = reader.recv_until(lambda m: m.get("token") == f"p{n}")
            streamed = [m["seq"] for m in after if "seq" in m]
            assert not streamed or streamed[0] == replayed[-1] + 1, (n, replayed, streamed)
    finally:
        talker.stop()
