"""The room's rules, with no sockets in them.

``Room`` is fed what members say (``handle``), that they left (``leave``)
and the passing of time (``tick``); it answers through a narrow ``Outbox``
that the server implements: a frame for one client, a reply streamed from
the log, the room stream, closing.  Room events go to the ``RoomLog``,
which the server commits once per loop turn before anything is sent.

Handlers raise ``protocol.MessageError`` for a request they refuse; the
server turns it into an ``error`` frame to that client alone.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Protocol

from tcpserver import protocol
from tcpserver.admission import forwarded_address
from tcpserver.client_state import Client
from tcpserver.presence import Claim, MemoryPresence, Presence
from tcpserver.roomlog import RoomLog, StorageError
from tcpserver.roster import Roster, chunk_labels, encode_arrays
from tcpserver.settings import IPNetwork, Limits

log = logging.getLogger("tcpserver.server")

# A page of ``who`` when the client names no limit (large rooms only).
WHO_PAGE = 100
WHO_PAGE_MAX = 500
# ``history before``: a screenful by default; 200 bounds one reply.
BEFORE_DEFAULT = 50
BEFORE_MAX = 200
# Presence in a large room: at most this often, and only on a change.
PRESENCE_INTERVAL = 0.25


def now_ms() -> int:
    """The server's clock for ``ts`` fields: milliseconds since the epoch."""
    return int(time.time() * 1000)


class Outbox(Protocol):
    """What the room asks of the server (which owns the sockets)."""

    def send(self, client: Client, frame: bytes, reply: bool = False) -> None:
        """Queue a frame for one client after the room bytes so far.
        ``reply``: output the client asked for, not counted as backlog."""

    def replay(self, client: Client, first: int, last: int) -> None:
        """Stream committed events ``first..last`` to the client as it reads."""

    def broadcast(self, frame: bytes) -> None:
        """A frame for every member now, outside the log (``presence``)."""

    def follow(self, client: Client) -> None:
        """The client reads the room stream from here on."""

    def leaving(self, client: Client) -> None:
        """The client gets the room stream up to the events staged so far."""

    def close(self, client: Client) -> None:
        """Finish sending what is queued, then close."""

    def drop(self, client: Client) -> None:
        """Close at once (a replaced, stale connection)."""

    def address_admitted(self, client: Client, address: str) -> bool:
        """Count the client under ``address``; False if that is over the limit."""


class Room:
    """Members, names and the room's commands."""

    def __init__(self, limits: Limits, roomlog: RoomLog, outbox: Outbox,
                 trusted: tuple[IPNetwork, ...], presence: Presence | None = None) -> None:
        self.limits = limits
        self.log = roomlog
        self.out = outbox
        self.trusted = trusted
        self.members = Roster(limits.max_frame)  # on this process
        self.presence = presence if presence is not None else MemoryPresence()
        self.presence.bind(self)
        self._staged_by: list[Client | None] = []  # who staged each event
        self._presence_sent = (0, 0.0)  # (count, when)
        self._large_announced = False
        # A join or leave went unannounced (large room, failed commit): the
        # next tick's presence makes clients fetch the list again.
        self._unannounced = False
        self._storage_failing = False
        # Members the log saw join but never leave: the server died under them.
        for label in roomlog.stranded():
            self._stage({"type": "leave", "member": label, "reason": "hung_up",
                         "ts": now_ms()}, None)
        self._handlers = {
            "hello": self._on_hello, "say": self._on_say, "private": self._on_private,
            "who": self._on_who, "history": self._on_history, "ping": self._on_ping,
            "pong": self._on_pong, "quit": self._on_quit,
        }

    @property
    def large(self) -> bool:
        """Over ``--announce-limit``: no join/leave broadcasts, paged lists."""
        return self.presence.count() > self.limits.announce_limit

    # --- input -----------------------------------------------------------

    def handle(self, client: Client, message: dict) -> None:
        """Apply one validated client message.  Raises protocol.MessageError
        (refused) or protocol.LocalProtocolError (the reply cannot fit)."""
        self._handlers[message["type"]](client, message)

    def leave(self, client: Client, reason: str) -> None:
        """Take a member out of the room (a no-op for non-members)."""
        if client.name is None or self.members.get(client.name.casefold()) is not client:
            return
        self.members.remove(client.name.casefold())
        self.presence.release(client)
        log.info("%s left (%s)", client.label, reason)
        if self.presence.count() < self.limits.announce_limit:  # not large: announce it
            self._stage({"type": "leave", "member": client.label, "reason": reason,
                         "ts": now_ms()}, None)
        else:
            self.log.note_left(client.label)
            self._unannounced = True
        self.out.leaving(client)

    def replaced_elsewhere(self, client: Client) -> None:
        """The member's name was taken back on another process with its
        resume token (which announced the leave): close this stale copy."""
        key = client.name.casefold()
        if self.members.get(key) is client:
            self.members.remove(key)
            log.info("%s left (replaced on another server)", client.label)
        self.out.drop(client)

    def forget_all(self) -> None:
        """Shutdown: everyone is out at once, announced by ``shutdown``."""
        for client in self.members.values():
            log.info("%s left (shutdown)", client.label)
        self.members.clear()
        self.log.forget_members()

    def commit(self) -> list[bytes]:
        """Commit this turn's events; return their frames for the stream.

        If storage fails the events are not published: each sender of a
        message is told ``room_unavailable``, and the failure is logged."""
        staged_by, self._staged_by = self._staged_by, []
        self.members.new_turn()  # the stream moves on: no list is shared past it
        try:
            frames = self.log.commit()
        except StorageError as exc:
            # One error line per episode: a full disk must not flood the log.
            if not self._storage_failing:
                log.error("room log: %s; events are not published until storing works "
                          "again", exc)
            self._storage_failing = True
            self._unannounced = True  # joins or leaves may have been among them
            log.debug("room log: %d events not published", len(staged_by))
            self._unavailable(staged_by)
            return []
        if self.log.degraded is None:
            self._storage_failing = False  # the episode is over
        # A log that stores asynchronously (Redis) reports failures later.
        self._unavailable(self.log.take_failed())
        return frames

    def _unavailable(self, senders) -> None:
        for sender in senders:
            if sender is not None and not sender.closed:
                self._error(sender, "room_unavailable",
                            "the room cannot store messages right now; send it again later")

    def tick(self, now: float) -> None:
        """Send the member count of a large room, at most every 0.25 s, and
        once after joins or leaves went unannounced (``large: false`` then
        tells clients of a small room to fetch the whole list again)."""
        count, when = self._presence_sent
        large = self.large
        if large or self._large_announced or self._unannounced:
            members = self.presence.count()
            if (count != members or large != self._large_announced or self._unannounced) \
                    and now - when >= PRESENCE_INTERVAL:
                self._presence_sent = (members, now)
                self._large_announced = large
                self._unannounced = False
                self.members.new_turn()
                self.out.broadcast(self._encode({"type": "presence", "count": members,
                                                 "large": large}))

    # --- commands --------------------------------------------------------

    def _on_hello(self, client: Client, message: dict) -> None:
        if client.name is not None:
            raise protocol.MessageError("already_joined", "you are already in the room")
        name = message["name"]
        protocol.check_name(name)
        key = name.casefold()
        held = self.members.get(key)
        if held is not None and not _same_secret(held.resume, message.get("resume")):
            raise protocol.MessageError("name_taken", f"the name {name!r} is taken")
        degraded = self.log.degraded
        if self._storage_failing and degraded is not None:
            # Its join could not be recorded: better no member than a ghost.
            # (A Redis room refuses through its claim instead.)
            raise protocol.MessageError(
                "room_unavailable", f"the room cannot take new members right now ({degraded}); "
                "try again later")
        address = forwarded_address(client, message.get("forwarded_for"), self.trusted)
        if not self.out.address_admitted(client, address):
            self._error(client, "too_many_connections", f"too many connections from {address}")
            self.out.close(client)
            return
        label, token = f"{name}@{address}", secrets.token_hex(16)
        # The claim is answered at once in one process, after a Redis round
        # trip in a shared room; the client's next requests wait for it.
        client.waiting = True
        self.presence.claim(client, key, label, token, message.get("resume"),
                            lambda claim: self._claimed(client, name, label, token, claim))

    def _claimed(self, client: Client, name: str, label: str, token: str,
                 claim: Claim) -> None:
        client.waiting = False
        key = name.casefold()
        if claim.error is not None:
            text = (f"the name {name!r} is taken" if claim.error == "name_taken" else
                    "the room cannot take new members right now; try again later")
            # A reply, so the client's next request waits until it is sent.
            self.out.send(client, self._encode({"type": "error", "code": claim.error,
                                                "message": text}), reply=True)
            return
        if client.closed:  # hung up while the claim was on its way
            client.name, client.resume = name, token
            self.presence.release(client)
            client.name = None
            return
        held = self.members.get(key)
        if held is not None and held is not client:
            # The member's own reconnect: its old connection is stale.
            self.leave(held, "replaced")
            self.out.drop(held)
        elif claim.replaced is not None and claim.count <= self.limits.announce_limit:
            # Taken back from a stale connection on another process.
            self._stage({"type": "leave", "member": claim.replaced, "reason": "replaced",
                         "ts": now_ms()}, None)
        client.name = name
        client.label = label
        client.resume = token
        self.members.add(key, client)
        self._welcome(client, claim.arrays)
        if claim.partial:
            self._unannounced = True  # its list lacks other processes' members
        log.info("%s joined", client.label)
        if not self.large:
            self._stage({"type": "join", "member": client.label, "ts": now_ms()}, None)
        else:
            self._unannounced = True

    def _welcome(self, client: Client, arrays: list[bytes] | None) -> None:
        # The welcome and replayed history are queued at the current end of
        # the stream, and the member reads the stream from here: so events
        # staged this turn, its own join included, follow them, and nothing
        # is missed or seen twice.
        large = self.large
        if large:
            arrays = [b"[]"]
        elif arrays is None:  # this process holds the whole room
            arrays = self.members.arrays()
        count, history = self.log.tail(self.limits.history)
        self._send_list(client, {
            "type": "welcome", "name": client.name, "label": client.label,
            "epoch": self.log.epoch, "last_seq": self.log.last_seq, "more": len(arrays) > 1,
            "history": count, "count": self.presence.count(), "large": large,
            "resume": client.resume}, arrays)
        if history:
            self.out.send(client, history, reply=True)
        self.out.follow(client)

    def _on_say(self, client: Client, message: dict) -> None:
        self._require_member(client)
        protocol.check_text(message["text"])
        self._stage({"type": "message", "from": client.label, "text": message["text"],
                     "ts": now_ms()}, client)

    def _on_private(self, client: Client, message: dict) -> None:
        self._require_member(client)
        protocol.check_text(message["text"])
        name = message["to"].split("@", 1)[0]
        target = self.members.get(name.casefold())
        if target is None and self.presence.distributed:
            return self.presence.private(client, message)  # maybe on another process
        if target is None or (message["to"] != name and message["to"] != target.label):
            raise protocol.MessageError("no_such_member", f"no one called {message['to']!r}")
        frame = self._encode({"type": "private", "from": client.label, "to": target.label,
                              "text": message["text"], "ts": now_ms()})
        self.out.send(target, frame)
        if target is not client:
            self.out.send(client, frame)

    def _on_who(self, client: Client, message: dict) -> None:
        self._require_member(client)
        if self.presence.distributed:
            return self.presence.who(client, message)
        limit = message.get("limit")
        if limit is None and message.get("prefix") is None and message.get("cursor") is None \
                and not self.large:
            return self.send_members(client, None)
        limit = WHO_PAGE if limit is None else limit
        if not 1 <= limit <= WHO_PAGE_MAX:
            raise protocol.MessageError("bad_message", f"who: limit is 1 to {WHO_PAGE_MAX}")
        cursor = message.get("cursor")
        page, more = self.members.page((message.get("prefix") or "").casefold(),
                                       None if cursor is None else cursor.casefold(), limit)
        # A page fits one frame: trim it if not.
        chunk = chunk_labels([member.label for member in page], self.limits.max_frame)[0]
        if len(chunk) < len(page):
            more = True
        reply = {"type": "members", "members": chunk, "more": more,
                 "count": self.presence.count()}
        if more and chunk:
            reply["cursor"] = page[len(chunk) - 1].name.casefold()
        self.out.send(client, self._encode(reply), reply=True)

    def _on_history(self, client: Client, message: dict) -> None:
        self._require_member(client)
        after, before, limit = message.get("after"), message.get("before"), message.get("limit")
        if (after is None) == (before is None):
            raise protocol.MessageError("bad_message", "history: give one of after and before")
        anchor = after if after is not None else before
        last = self.log.last_seq
        # before may name last_seq + 1 ("everything up to now").
        if anchor > last + (before is not None):
            raise protocol.MessageError(
                "unknown_seq", f"seq {anchor} was never issued in this room (the last is "
                f"{last}); your numbers are from another epoch")
        first_held = self.log.first_seq
        if after is not None:
            cap = self.limits.history_replay
            limit = cap if limit is None else limit
            if not 1 <= limit <= cap:
                raise protocol.MessageError("bad_message", f"history: limit is 1 to {cap}")
            start = max(after + 1, first_held, last - limit + 1)
            reply = {"type": "history", "after": after, "count": last - start + 1,
                     "missed": start - (max(after, 0) + 1)}
            if last < start:
                reply["count"], reply["missed"] = 0, 0
            self.out.send(client, self._encode(reply), reply=True)
            self.out.replay(client, start, last)
            return
        limit = BEFORE_DEFAULT if limit is None else limit
        if not 1 <= limit <= BEFORE_MAX:
            raise protocol.MessageError("bad_message", f"history: limit is 1 to {BEFORE_MAX}")
        stop = min(before - 1, last)
        oldest = self.log.oldest_seq
        start = max(oldest, stop - limit + 1, 1)
        if start < first_held:
            # Older than the log keeps at hand (Redis: its in-memory copy):
            # fetched first, then sent whole; the client waits meanwhile.
            client.waiting = True
            return self.log.fetch(start, stop, lambda frames: self._fetched(
                client, before, frames))
        count = max(0, stop - start + 1)
        self.out.send(client, self._encode({"type": "history", "before": before, "count": count,
                                            "more": start > oldest}), reply=True)
        self.out.replay(client, start, stop)

    def _fetched(self, client: Client, before: int, frames: list[tuple[int, bytes]] | None,
                 ) -> None:
        client.waiting = False
        if client.closed:
            return
        if frames is None:
            self.out.send(client, self._encode(
                {"type": "error", "code": "room_unavailable",
                 "message": "the room cannot read its history right now; try again later"}),
                reply=True)
            return
        more = bool(frames) and frames[0][0] > self.log.oldest_seq
        self.out.send(client, self._encode({"type": "history", "before": before,
                                            "count": len(frames), "more": more}), reply=True)
        if frames:
            self.out.send(client, b"".join(frame for _, frame in frames), reply=True)

    def _on_ping(self, client: Client, message: dict) -> None:
        reply = {"type": "pong"}
        if message.get("token") is not None:
            reply["token"] = message["token"]
        degraded = self.log.degraded
        if degraded is not None:
            reply["degraded"] = degraded
        self.out.send(client, self._encode(reply))

    def _on_pong(self, client: Client, message: dict) -> None:
        """Nothing to answer: receiving it already reset the idle timer."""

    def _on_quit(self, client: Client, message: dict) -> None:
        self.leave(client, "quit")
        self.out.close(client)

    # --- helpers -----------------------------------------------------------

    def _stage(self, event: dict, sender: Client | None) -> None:
        self.log.stage(event, sender)
        self._staged_by.append(sender)

    def _error(self, client: Client, code: str, message: str) -> None:
        self.out.send(client, self._encode({"type": "error", "code": code, "message": message}))

    def _encode(self, message: dict) -> bytes:
        return protocol.encode_frame(message, self.limits.max_frame)

    def _require_member(self, client: Client) -> None:
        if client.name is None:
            raise protocol.MessageError("not_joined", "say hello first")

    def send_members(self, client: Client, labels: list[str] | None) -> None:
        """A whole member list as ``members`` replies: ``labels``, or this
        process's members for None."""
        arrays = (self.members.arrays() if labels is None
                  else encode_arrays(labels, self.limits.max_frame))
        self._send_list(client, {"type": "members", "more": len(arrays) > 1,
                                 "count": self.presence.count()}, arrays)

    def _send_list(self, client: Client, head: dict, arrays: list[bytes]) -> None:
        """``head`` with the first array as its ``members``, then a
        ``members`` frame for each other array; all replies."""
        for part in protocol.encode_frame_parts(head, "members", arrays[0],
                                                self.limits.max_frame):
            self.out.send(client, part, reply=True)
        count = self.presence.count()
        for i, array in enumerate(arrays[1:], 2):
            for part in protocol.encode_frame_parts(
                    {"type": "members", "more": i < len(arrays), "count": count},
                    "members", array, self.limits.max_frame):
                self.out.send(client, part, reply=True)


def _same_secret(expected: str | None, given: str | None) -> bool:
    return expected is not None and given is not None and secrets.compare_digest(
        expected.encode(), given.encode())
