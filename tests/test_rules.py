"""The room's rules with no sockets: rules.Room driven through RoomHarness."""

from __future__ import annotations

import random

import pytest
from room_harness import RoomHarness

from tcpserver import protocol
from tcpserver.presence import Claim, MemoryPresence
from tcpserver.roomlog import MemoryLog, StorageError


@pytest.fixture
def harness():
    made = []

    def make(**limits) -> RoomHarness:
        made.append(RoomHarness(**limits))
        return made[-1]

    yield make
    for h in made:
        h.shutdown()


def welcome_of(h: RoomHarness, client) -> dict:
    return next(m for m in h.messages_for(client) if m["type"] == "welcome")


def test_resume_token_takes_the_name_back_from_a_stale_connection(harness):
    h = harness()
    old = h.join("alice")
    token = welcome_of(h, old)["resume"]
    assert len(token) == 32
    new = h.join("alice", resume=token)
    assert h.dropped == [old]
    assert h.room.members.get("alice") is new
    events = [(m["type"], m.get("reason")) for m in h.stream_messages()]
    assert events[-2:] == [("leave", "replaced"), ("join", None)]
    # The new connection has a new secret; the old one no longer works.
    assert welcome_of(h, new)["resume"] != token
    third = h.connect()
    with pytest.raises(protocol.MessageError) as refused:
        h.room.handle(third, {"type": "hello", "name": "alice", "resume": token})
    assert refused.value.code == "name_taken"


@pytest.mark.parametrize("token", [None, "", "0" * 32, "not even hex"])
def test_a_wrong_resume_token_is_name_taken(harness, token):
    h = harness()
    alice = h.join("alice")
    intruder = h.connect()
    hello = {"type": "hello", "name": "ALICE"}
    if token is not None:
        hello["resume"] = token
    with pytest.raises(protocol.MessageError) as refused:
        h.room.handle(intruder, hello)
    assert refused.value.code == "name_taken"
    assert h.room.members.get("alice") is alice and h.dropped == []


def test_a_burst_of_joins_shares_one_replay_blob(harness):
    h = harness(history=50)
    speaker = h.join("speaker")
    for i in range(60):
        h.room.handle(speaker, {"type": "say", "text": f"m{i}"})
    h.commit()
    h.sent.clear()
    joiners = [h.connect() for _ in range(20)]
    for i, client in enumerate(joiners):
        h.room.handle(client, {"type": "hello", "name": f"j{i}"})
    blobs = [frame for client, frame, reply in h.sent if reply and len(frame) > 1000]
    assert len(blobs) == 20
    # Joined once for the burst: the same object is queued for every joiner.
    assert all(blob is blobs[0] for blob in blobs)
    decoder = protocol.FrameDecoder()
    decoder.receive_data(blobs[0])
    replayed = [protocol.parse_server_message(p) for p in iter(decoder.next_payload, None)]
    assert [m["text"] for m in replayed] == [f"m{i}" for i in range(10, 60)]


def test_history_after_before_and_unknown_seq(harness):
    h = harness(history=5)
    alice = h.join("alice")  # seq 1 is alice's join
    for i in range(30):
        h.room.handle(alice, {"type": "say", "text": f"m{i}"})
    h.commit()
    last = h.log.last_seq
    assert last == 31
    h.sent.clear()
    h.room.handle(alice, {"type": "history", "after": 10})
    assert h.messages_for(alice)[-1] == {"type": "history", "after": 10, "count": 21,
                                         "missed": 0}
    assert h.replays[-1][1:] == (11, 31)
    h.room.handle(alice, {"type": "history", "after": 10, "limit": 5})
    assert h.messages_for(alice)[-1] == {"type": "history", "after": 10, "count": 5,
                                         "missed": 16}
    assert h.replays[-1][1:] == (27, 31)
    h.room.handle(alice, {"type": "history", "before": 12, "limit": 4})
    assert h.messages_for(alice)[-1] == {"type": "history", "before": 12, "count": 4,
                                         "more": True}
    assert h.replays[-1][1:] == (8, 11)
    h.room.handle(alice, {"type": "history", "before": 3, "limit": 50})
    assert h.messages_for(alice)[-1] == {"type": "history", "before": 3, "count": 2,
                                         "more": False}
    # The frames streamed are the original ones, whether from memory or not.
    assert [protocol.parse_server_message(f[4:])["seq"] for f in h.log.frames(8, 11, 1 << 20)] \
        == [8, 9, 10, 11]
    for bad in ({"after": last + 1}, {"before": last + 2}):
        with pytest.raises(protocol.MessageError) as refused:
            h.room.handle(alice, {"type": "history", **bad})
        assert refused.value.code == "unknown_seq"
        assert "another epoch" in refused.value.message
    for bad in ({}, {"after": 1, "before": 5}, {"before": 5, "limit": 0},
                {"before": 5, "limit": 201}, {"after": 1, "limit": 1001}):
        with pytest.raises(protocol.MessageError) as refused:
            h.room.handle(alice, {"type": "history", **bad})
        assert refused.value.code == "bad_message"


def test_small_room_behaves_as_before(harness):
    h = harness(announce_limit=5)
    clients = [h.join(f"m{i}") for i in range(5)]
    assert not h.room.large
    types = [m["type"] for m in h.stream_messages()]
    assert types == ["join"] * 5
    welcome = welcome_of(h, clients[-1])
    assert welcome["large"] is False and welcome["count"] == 5
    assert len(welcome["members"]) == 5


def test_a_burst_of_joins_shares_one_encoded_member_list(harness):
    # A join storm must not hold one copy of the list per joiner (issue 9:
    # 10 KB each at 1000 members, all queued in the same loop turns).
    h = harness(max_frame=2048, history=0)  # a small frame: the list takes several
    for i in range(150):
        h.join(f"early{i:03}")
    burst = [h.connect() for _ in range(3)]
    for i, client in enumerate(burst):  # one loop turn: no commit between
        h.room.handle(client, {"type": "hello", "name": f"late{i}"})
    h.room.handle(h.clients[0], {"type": "who"})
    h.commit()

    def big_buffers(client):
        return [frame for c, frame, _ in h.sent if c is client and len(frame) > 512]

    shared = big_buffers(burst[0])
    assert len(shared) > 1  # the welcome's list and more ``members`` frames
    for client in (*burst[1:], h.clients[0]):
        assert all(a is b for a, b in zip(big_buffers(client), shared, strict=True))
    # Each joiner's list and the stream after it add up to the whole room.
    everyone = {f"early{i:03}@127.0.0.1" for i in range(150)} | {
        f"late{i}@127.0.0.1" for i in range(3)}
    for client in burst:
        listed = [label for m in h.messages_for(client) if m["type"] in ("welcome", "members")
                  for label in m["members"]]
        joined = [m["member"] for m in h.stream_messages()[150:]]
        assert set(listed) | set(joined) == everyone
    # The next turn's joiner gets a list encoded anew, with the burst in it.
    latest = h.join("latest")
    listed = [label for m in h.messages_for(latest) if m["type"] in ("welcome", "members")
              for label in m["members"]]
    assert set(listed) == everyone | {"latest@127.0.0.1"}
    assert not set(big_buffers(latest)) & {id(b) for b in shared}


def test_crossing_the_announce_limit_both_ways(harness):
    h = harness(announce_limit=3)
    clients = [h.join(f"m{i}") for i in range(3)]
    h.room.tick(100.0)
    assert [m["type"] for m in h.stream_messages()] == ["join"] * 3  # no presence yet
    big = h.join("m3")  # the 4th member makes it large: no join broadcast
    assert h.room.large
    assert [m["type"] for m in h.stream_messages()] == ["join"] * 3
    welcome = welcome_of(h, big)
    assert (welcome["large"], welcome["members"], welcome["count"]) == (True, [], 4)
    h.room.tick(101.0)
    assert h.stream_messages()[-1] == {"type": "presence", "count": 4, "large": True}
    h.room.tick(101.1)  # nothing changed: nothing sent
    assert len(h.stream_messages()) == 4
    h.join("m4")
    h.room.tick(101.2)  # changed, but within the 0.25 s interval
    assert len(h.stream_messages()) == 4
    h.room.tick(101.3)
    assert h.stream_messages()[-1] == {"type": "presence", "count": 5, "large": True}
    # Leaves while large are counted, not announced, down to the limit.
    h.room.leave(big, "quit")
    h.room.leave(clients[0], "quit")
    h.commit()
    assert [m["type"] for m in h.stream_messages()].count("leave") == 0
    h.room.tick(102.0)
    assert h.stream_messages()[-1] == {"type": "presence", "count": 3, "large": False}
    h.room.leave(clients[1], "hung_up")  # small again: announced
    h.commit()
    assert h.stream_messages()[-1]["type"] == "leave"


def test_who_pages_with_cursor_and_prefix(harness):
    h = harness(announce_limit=10)
    names = [f"user{i:02d}" for i in range(30)] + ["Carol", "carl", "Caroline"]
    clients = [h.join(name) for name in names]
    asker = clients[0]

    def page(**who) -> dict:
        h.sent.clear()
        h.room.handle(asker, {"type": "who", **who})
        (reply,) = h.messages_for(asker)
        return reply

    first = page()  # a large room pages (100 by default) even without a limit
    assert (first["count"], len(first["members"]), first["more"]) == (33, 33, False)
    seen, cursor = [], None
    while True:
        reply = page(limit=7, **({"cursor": cursor} if cursor else {}))
        seen += reply["members"]
        if not reply["more"]:
            assert "cursor" not in reply
            break
        cursor = reply["cursor"]
    assert [label.split("@")[0] for label in seen] == sorted(names, key=str.casefold)
    found = page(prefix="CAR", limit=2)
    assert [label.split("@")[0] for label in found["members"]] == ["carl", "Carol"]
    assert found["more"] is True
    rest = page(prefix="car", limit=2, cursor=found["cursor"])
    assert ([label.split("@")[0] for label in rest["members"]], rest["more"]) == (["Caroline"],
                                                                                False)
    assert page(prefix="zz", limit=5) == {"type": "members", "members": [], "more": False,
                                          "count": 33}
    with pytest.raises(protocol.MessageError):
        page(limit=501)


def test_private_message_reaches_a_member_of_a_large_room(harness):
    h = harness(announce_limit=2)
    clients = [h.join(f"m{i}") for i in range(5)]
    h.sent.clear()
    h.room.handle(clients[0], {"type": "private", "to": "M4", "text": "found you"})
    assert h.messages_for(clients[4])[0]["text"] == "found you"
    assert h.messages_for(clients[0])[0]["to"] == "m4@127.0.0.1"


def test_a_reconnect_storm_shares_replay_pieces(harness):
    h = harness(history=5)
    alice = h.join("alice")
    for i in range(40):
        h.room.handle(alice, {"type": "say", "text": f"m{i}"})
    h.commit()
    pieces = [h.log.chunk(3, 41, 300) for _ in range(50)]
    assert all(piece[1] is pieces[0][1] for piece in pieces)
    next_seq, blob = pieces[0]
    decoder = protocol.FrameDecoder()
    decoder.receive_data(blob)
    seqs = [protocol.parse_server_message(p)["seq"] for p in iter(decoder.next_payload, None)]
    assert seqs == list(range(3, next_seq)) and len(blob) <= 300 and next_seq <= 41


def test_crossing_the_limit_and_back_within_a_tick_still_tells_everyone(harness):
    h = harness(announce_limit=2)
    alice, bob = h.join("alice"), h.join("bob")
    h.room.tick(100.0)
    carol = h.join("carol")  # large for a moment: not announced
    h.room.leave(bob, "quit")  # small again: not announced either
    h.commit()
    assert [m["type"] for m in h.stream_messages()] == ["join", "join"]
    h.room.tick(100.5)
    # The count did not change since the last look, but two changes went
    # unannounced: a presence tells clients to fetch the whole list.
    assert h.stream_messages()[-1] == {"type": "presence", "count": 2, "large": False}
    h.room.tick(101.0)
    assert len(h.stream_messages()) == 3
    assert carol.name == "carol" and alice.name == "alice"


class FailingLog(MemoryLog):
    """A log whose storing can be made to fail, as a full disk does."""

    failing = False

    def _store(self, events, presence) -> None:
        if self.failing:
            raise StorageError("storage: database or disk is full")

    @property
    def degraded(self):
        return "storage: database or disk is full" if self.failing else None


def test_a_storage_fault_refuses_joins_and_refreshes_lists_after(harness):
    log = FailingLog(65536, 100, 1000)
    h = RoomHarness(roomlog=log)
    try:
        alice, bob = h.join("alice"), h.join("bob")
        h.room.tick(10.0)
        log.failing = True
        h.room.leave(bob, "quit")
        h.commit()  # the leave could not be stored, so it was not sent
        assert [m["type"] for m in h.stream_messages()] == ["join", "join"]
        with pytest.raises(protocol.MessageError) as refused:
            h.room.handle(h.connect(), {"type": "hello", "name": "carol"})
        assert refused.value.code == "room_unavailable"
        assert "disk is full" in refused.value.message
        log.failing = False
        h.room.tick(11.0)  # clients fetch the list again: bob is gone
        assert h.stream_messages()[-1] == {"type": "presence", "count": 1, "large": False}
        assert h.join("carol").name == "carol"
        assert alice.name == "alice"
    finally:
        h.shutdown()


@pytest.mark.parametrize("forwarded", ["fe80::1%evil@x y", "fe80::1%eth0", "1.2.3.4/8", "host"])
def test_forwarded_for_must_be_a_plain_address(harness, forwarded):
    h = harness()
    with pytest.raises(protocol.MessageError) as refused:
        h.room.handle(h.connect(), {"type": "hello", "name": "bob", "forwarded_for": forwarded})
    assert refused.value.code == "bad_message" and not h.room.members


def test_an_ipv4_mapped_forwarded_address_is_labelled_as_ipv4(harness):
    h = harness()
    bob = h.join("bob", forwarded_for="::ffff:203.0.113.9")
    assert bob.label == "bob@203.0.113.9"


def test_a_who_cursor_ignores_case(harness):
    h = harness(announce_limit=2)
    for name in ("amy", "Bea", "cy", "dee"):
        h.join(name)
    asker = h.clients[0]
    h.sent.clear()
    h.room.handle(asker, {"type": "who", "limit": 2, "cursor": "BEA"})
    (page,) = h.messages_for(asker)
    assert [label.split("@")[0] for label in page["members"]] == ["cy", "dee"]



@pytest.mark.parametrize("seed", range(40))
def test_every_member_list_plus_the_stream_after_it_is_the_room(harness, seed):
    # Random turns of joins, leaves and whole-list ``who``, a list over
    # several frames, and (odd seeds) the announce limit crossed both ways
    # within turns: each list sent (welcome or ``who``) plus the joins and
    # leaves streamed after it must add up to the room at the end, unless a
    # ``presence`` follows it (the client then fetches the list again).
    rng = random.Random(seed)
    h = harness(announce_limit=4 if seed % 2 else 1000, max_frame=1024, history=1)
    members: list = []
    lists = []  # (client, stream position after its turn's commit, labels)
    for turn in range(30):
        asked = []
        for _ in range(rng.randint(1, 6)):
            roll, start = rng.random(), len(h.sent)
            if roll < 0.45 or not members:
                client = h.connect()
                name = f"n{turn:02}{len(asked)}" + "x" * rng.randint(0, 20)
                h.room.handle(client, {"type": "hello", "name": name})
                members.append(client)
            elif roll < 0.8:
                h.room.leave(members.pop(rng.randrange(len(members))), "quit")
                continue
            else:
                client = rng.choice(members)
                h.room.handle(client, {"type": "who"})
            asked.append((client, start, len(h.sent)))
        position = len(h.stream)
        for client, start, end in asked:
            sent = [m for m in messages(h.sent[start:end], client)
                    if m["type"] in ("welcome", "members")]
            paged = any(m.get("large") or m.get("cursor") is not None for m in sent)
            if sent and not paged:
                lists.append((client, position, {x for m in sent for x in m["members"]}))
        h.commit()
        h.room.tick(100.0 + turn)
    room = {client.label for client in members}
    stream = h.stream_messages()
    assert len(stream) == len(h.stream)  # one message a frame: positions line up
    for client, position, view in lists:
        after = stream[position:]
        if client not in members or any(m["type"] == "presence" for m in after):
            continue
        for m in after:
            if m["type"] == "join":
                view.add(m["member"])
            elif m["type"] == "leave":
                view.discard(m["member"])
        assert view == room, (client.label, room - view, view - room)


def messages(sent, client) -> list[dict]:
    decoder = protocol.FrameDecoder(1 << 30)
    decoder.receive_data(b"".join(frame for c, frame, _ in sent if c is client))
    out = []
    while (payload := decoder.next_payload()) is not None:
        out.append(protocol.parse_server_message(payload))
    return out


class RosterLostLog(MemoryLog):
    """A shared room's log whose presence claims names but cannot read the
    whole room's list (Redis failed between the claim and the roster)."""

    def make_presence(self):
        return RosterLostPresence()


class RosterLostPresence(MemoryPresence):
    def claim(self, client, key, label, token, resume, done) -> None:
        done(Claim(count=len(self.room.members) + 1, partial=True))


def test_a_welcome_without_the_whole_rooms_list_makes_clients_fetch_it_again():
    h = RoomHarness(roomlog=RosterLostLog(65536, 100, 1000))
    try:
        h.join("alice")
        h.room.tick(10.0)
        # Small room, so the presence says large: false: fetch the whole list.
        assert h.stream_messages()[-1] == {"type": "presence", "count": 1, "large": False}
    finally:
        h.shutdown()
