"""When the server's output goes out: ``Outbound`` on real socket pairs,
with the clock given by the test.  Presence (joins, leaves, member counts)
may linger to share its sends; anything else goes at once."""

import selectors
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpserver import protocol
from tcpserver.client_state import Client
from tcpserver.outbound import PRESENCE_LINGER, Outbound
from tcpserver.roomlog import MemoryLog
from tcpserver.settings import Limits

T0 = 1000.0


def join(n: int) -> bytes:
    return protocol.encode_frame({"type": "join", "seq": n, "member": f"m{n}@h", "ts": 1})


def message(n: int) -> bytes:
    return protocol.encode_frame({"type": "message", "seq": n, "from": "a@h", "text": "hi",
                                  "ts": 1})


def presence(count: int) -> bytes:
    return protocol.encode_frame({"type": "presence", "count": count, "large": True})


class Member:
    """A streaming member of ``out`` on one end of a socket pair; the test
    reads the other end as the member's peer would."""

    def __init__(self, out: Outbound) -> None:
        self.sock, self.peer = socket.socketpair()
        self.sock.setblocking(False)
        self.peer.setblocking(False)
        self.client = Client(self.sock, "127.0.0.1", T0, out.limits)
        out.follow(self.client)

    def received(self) -> bytes:
        """Everything in the peer's receive buffer now; each call that
        finds bytes stands for one send the member saw."""
        try:
            return self.peer.recv(1 << 20)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


@pytest.fixture
def out():
    limits = Limits()
    outbound = Outbound(selectors.DefaultSelector(), limits,
                        MemoryLog(limits.max_frame, limits.history, 1000),
                        drop=lambda client, reason: None,
                        internal_error=lambda client: None, input_ready=lambda client: None)
    yield outbound
    outbound.selector.close()


@pytest.fixture
def member(out):
    m = Member(out)
    yield m
    m.close()


def test_a_burst_of_joins_reaches_a_member_in_one_send(out, member):
    for n in range(1, 6):  # five turns, 10 ms apart, each with one join
        now = T0 + n * 0.01
        out.publish([join(n)], now)
        out.flush_all(now)
        assert member.received() == b"", f"join {n} went alone"
    assert out.flush_due() == pytest.approx(T0 + 0.01 + PRESENCE_LINGER)
    out.flush_all(T0 + 0.01 + PRESENCE_LINGER)
    assert member.received() == b"".join(join(n) for n in range(1, 6))
    assert out.flush_due() is None


def test_a_chat_message_takes_the_waiting_joins_along_at_once(out, member):
    out.publish([join(1)], T0)
    out.flush_all(T0)
    out.publish([message(2)], T0 + 0.001)
    assert out.flush_due() == 0.0
    out.flush_all(T0 + 0.001)
    assert member.received() == join(1) + message(2)


@pytest.mark.parametrize("frame", [message(1), protocol.encode_frame(
    {"type": "shutdown", "message": "the server is shutting down"})])
def test_anything_but_presence_goes_in_the_turn_it_was_published(out, member, frame):
    out.publish([frame], T0)
    out.flush_all(T0)
    assert member.received() == frame


def test_a_member_count_lingers_like_a_join(out, member):
    out.publish([presence(1500)], T0)
    out.flush_all(T0)
    assert member.received() == b""
    out.flush_all(T0 + PRESENCE_LINGER)
    assert member.received() == presence(1500)


def test_a_private_frame_goes_at_once_with_the_presence_before_it(out, member):
    """A newcomer's welcome (or any reply) does not wait for the linger; the
    room bytes queued before it go with it, in order."""
    other = Member(out)
    try:
        out.publish([join(1)], T0)
        welcome = protocol.encode_frame({"type": "pong", "token": "t"})
        out.send(member.client, welcome, reply=True)
        out.flush_all(T0)
        assert member.received() == join(1) + welcome
        assert other.received() == b""  # it has only presence pending
        out.flush_all(T0 + PRESENCE_LINGER)
        assert other.received() == join(1)
        assert member.received() == b""  # nothing twice
    finally:
        other.close()


def drain(out: Outbound, member: Member, now: float, turns: int = 10) -> bytes:
    """Run ``turns`` loop turns at ``now``; what the member's peer got."""
    got = b""
    for _ in range(turns):
        out.flush_all(now)
        got += member.received()
    return got


def test_a_history_reply_keeps_its_place_among_lingering_joins(out, member):
    """Joins published before a history request come before its reply,
    joins after it come after the replayed events, lingering or not."""
    for text in ("one", "two", "three"):
        out.log.stage({"type": "message", "from": "a@h", "text": text, "ts": 1})
    replayed = b"".join(out.log.commit())
    out.publish([join(4)], T0)
    out.flush_all(T0)
    assert member.received() == b""
    header = protocol.encode_frame({"type": "history", "after": 0, "count": 3, "missed": 0})
    out.send(member.client, header, reply=True)
    out.replay(member.client, 1, 3)
    out.publish([join(5)], T0 + 0.001)
    got = drain(out, member, T0 + 0.001)
    assert got == join(4) + header + replayed + join(5)
    out.flush_all(T0 + PRESENCE_LINGER)
    assert member.received() == b""  # nothing twice
    assert out.flush_due() is None


def test_a_leaver_gets_the_lingering_joins_up_to_its_own_leave_then_fin(out, member):
    other = Member(out)
    try:
        out.publish([join(1)], T0)
        out.flush_all(T0)
        out.leaving(member.client, T0)
        member.client.closing = True
        out.dirty.add(member.client)
        leave = protocol.encode_frame({"type": "leave", "seq": 2, "member": "m@h",
                                       "reason": "quit", "ts": 1})
        out.publish([leave], T0 + 0.01)
        out.end_leavers(T0 + 0.01)
        out.publish([join(3)], T0 + 0.02)  # after its stream ended
        out.flush_all(T0 + 0.02)
        assert member.received() == join(1) + leave
        assert member.peer.recv(1) == b""  # then its FIN, at once
        assert other.received() == b""
        out.flush_all(T0 + PRESENCE_LINGER)
        assert other.received() == join(1) + leave + join(3)
        assert out.flush_due() is None
    finally:
        other.close()


def test_a_blocked_member_is_evicted_when_lingering_joins_take_it_over_the_limit():
    limits = Limits(slow_reader_bytes=4000)
    dropped = []
    out = Outbound(selectors.DefaultSelector(), limits,
                   MemoryLog(limits.max_frame, limits.history, 1000),
                   drop=lambda client, reason: dropped.append(reason),
                   internal_error=lambda client: None, input_ready=lambda client: None)
    member = Member(out)
    try:
        member.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        n = 0
        while not member.client.writing:  # fill the kernel's buffers
            n += 1
            out.publish([message(n)], T0)
            out.flush_all(T0)
        assert not dropped
        now = T0
        while out.stream.end - member.client.pos <= limits.slow_reader_bytes:
            n += 1
            now += 0.001
            out.publish([join(n)], now)
            out.flush_all(now)
        out.flush_all(now + PRESENCE_LINGER)
        assert dropped == ["slow_reader"]
    finally:
        member.close()
        out.selector.close()


def test_deliveries_count_the_members_each_frame_was_published_to(out, member):
    out.publish([join(1)], T0)  # one member
    late = Member(out)  # follows while join 1 lingers: it starts after it
    try:
        out.publish([join(2)], T0 + 0.01)
        out.flush_all(T0 + PRESENCE_LINGER)
        assert out.stats.delivered == 1 + 2
        assert member.received() == join(1) + join(2)
        assert late.received() == join(2)
    finally:
        late.close()


def test_a_lingering_turn_that_served_a_reply_still_wakes_for_the_linger(out, member):
    """Not a busy loop (0.0) and not a sleep past the linger (None)."""
    out.publish([join(1)], T0)
    out.send(member.client, protocol.encode_frame({"type": "pong"}), reply=True)
    out.flush_all(T0)
    assert out.flush_due() == pytest.approx(T0 + PRESENCE_LINGER)
    out.flush_all(T0 + PRESENCE_LINGER)
    assert out.flush_due() is None
    assert out.stream.buffered == 0  # trimmed once every member had it


_KINDS = {
    "join": join,
    "message": message,
    "big": lambda n: protocol.encode_frame({"type": "message", "seq": n, "from": "a@h",
                                            "text": "x" * 3000, "ts": 1}),
    "presence": presence,
    "leave": lambda n: protocol.encode_frame({"type": "leave", "seq": n, "member": "m@h",
                                              "reason": "quit", "ts": 1}),
}
_turns = st.lists(st.tuples(
    st.sampled_from(["join", "message", "big", "presence", "leave", "none", "none"]),
    st.sampled_from(["none", "none", "follow", "private", "reply", "quit"]),
    st.integers(0, 5),  # which member
    st.sampled_from([0.0, 0.001, 0.01, 0.03, 0.049, 0.05, 0.2])),  # time since the last turn
    max_size=40)


@settings(max_examples=150, deadline=None)
@given(_turns)
def test_every_member_gets_its_stream_and_frames_once_in_order_and_on_time(turns):
    """Random turns as the server runs them (requests, publish, end the
    leavers' streams, flush): each member gets exactly the room bytes from
    its join to its leave with its own frames at their places, anything
    but presence in the turn it was published, presence within
    PRESENCE_LINGER, and a quitter its FIN.  One more member reads nothing
    until the end through small buffers: what it missed meanwhile must
    still be held for it (not trimmed)."""
    limits = Limits()
    out = Outbound(selectors.DefaultSelector(), limits,
                   MemoryLog(limits.max_frame, limits.history, 1000),
                   drop=lambda client, reason: pytest.fail(f"dropped: {reason}"),
                   internal_error=lambda client: pytest.fail("internal error"),
                   input_ready=lambda client: None)
    slow = Member(out)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    slow.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    members: list[Member] = []
    expected: dict[Member, list] = {slow: [("room", 0)]}  # ("room", start) /
    got: dict[Member, bytes] = {slow: b""}  # ("frame", bytes) / ("stop", end)
    room = bytearray()  # every byte published, untrimmed
    now, seq = T0, 0
    oldest_unsent = None  # when the oldest room bytes not sent to all were published
    try:
        for kind, action, index, dt in [("none", "follow", 0, 0.0), *turns]:
            now += dt
            live = [m for m in members if not m.client.closing]
            target = live[index % len(live)] if live else None
            if target is None:
                action = "follow"
            private = set()
            if action == "follow":
                member = Member(out)
                members.append(member)
                expected[member] = [("room", out.stream.end)]
                got[member] = b""
            elif action in ("private", "reply"):
                frame = protocol.encode_frame({"type": "pong", "token": f"{seq}"})
                out.send(target.client, frame, reply=action == "reply")
                expected[target] += [("room", out.stream.end), ("frame", frame)]
                private.add(target)
            elif action == "quit":
                out.leaving(target.client, now)
                target.client.closing = True
                out.dirty.add(target.client)
                kind = "leave"
            frames = []
            if kind != "none":
                seq += 1
                frames.append(_KINDS[kind](seq))
            if frames and oldest_unsent is None:
                oldest_unsent = now
            out.publish(frames, now)
            room.extend(b"".join(frames))
            urgent = kind in ("message", "big")
            out.end_leavers(now)
            if action == "quit":
                expected[target].append(("stop", out.stream.end))
                private.add(target)
            out.flush_all(now)
            due = out.flush_due()
            assert due != 0.0, "a busy loop: nothing left to do at once"
            everyone = urgent or (oldest_unsent is not None
                                  and now >= oldest_unsent + PRESENCE_LINGER)
            if everyone:
                oldest_unsent = None
                assert due is None
            for member in members:
                if member.client.fin_sent and not member.client.closing:
                    pytest.fail("FIN to a member that stays")
                got[member] += member.received()
                if everyone or member in private:
                    # Nothing of its own left unsent, nor room bytes.
                    assert got[member] == _bytes(room, expected[member]), member
        now += PRESENCE_LINGER
        out.flush_all(now)
        assert out.flush_due() is None
        for member in members:
            got[member] += member.received()
            assert got[member] == _bytes(room, expected[member])
            if member.client.closing:
                assert member.client.fin_sent
        for _ in range(len(room)):  # it reads at last; EVENT_WRITE sends the rest
            data = slow.received()
            got[slow] += data
            if slow.client.writing:
                out.flush(slow.client)
            elif not data or len(got[slow]) > len(room):
                break
        assert got[slow] == bytes(room)
    finally:
        for member in [slow, *members]:
            member.close()
        out.selector.close()


def _bytes(stream: bytes, plan: list) -> bytes:
    """What ``plan`` (a member's join, frames, stop) says it should have
    received once sent everything, ``stream`` being every room byte."""
    result, pos = b"", None
    for step, value in plan:
        if step == "room":
            if pos is not None and value > pos:
                result += stream[pos:value]
            pos = value if pos is None else max(pos, value)
        elif step == "frame":
            result += value
        else:
            return result + stream[pos:value]
    return result + stream[pos:]
