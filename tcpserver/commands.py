"""What each client message does in the room: the room's rules.

``RoomCommands`` is mixed into ``ChatServer``, which owns the sockets and
provides the output primitives used here: ``_queue`` (a frame for one
client), ``_publish`` (a room event for everyone), ``_fail`` and ``_leave``.
Handlers raise ``protocol.MessageError`` for a request they refuse; the
server turns it into an ``error`` frame to that client alone.
"""

from __future__ import annotations

import ipaddress
import logging
import time

from tcpserver import protocol
from tcpserver.client_state import Client

log = logging.getLogger("tcpserver.server")

# Room for the fields around a member list when packing it into frames.
_MEMBERS_FRAME_SLACK = 512


def now_ms() -> int:
    """The server's clock for ``ts`` fields: milliseconds since the epoch."""
    return int(time.time() * 1000)


class RoomCommands:
    """One ``_on_<type>`` method per client message type."""

    def _on_hello(self, client: Client, message: dict) -> None:
        if client.name is not None:
            raise protocol.MessageError("already_joined", "you are already in the room")
        name = message["name"]
        protocol.check_name(name)
        key = name.casefold()
        if key in self.members:
            raise protocol.MessageError("name_taken", f"the name {name!r} is taken")
        address = self._client_address(client, message.get("forwarded_for"))
        if address != client.ip:
            self._count_ip(client.ip, -1)
            client.ip = address
            self._count_ip(address, +1)
            if self.per_ip[address] > self.limits.max_per_ip:
                return self._fail(client, "too_many_connections",
                                  f"too many connections from {address}", "hung_up")
        client.name = name
        client.label = f"{name}@{address}"
        self.members[key] = client
        # The welcome and replayed history are queued at the current end of
        # the stream, and the member reads the stream from here: so its own
        # join follows them, and nothing is missed or seen twice.
        history, _ = self.history.after(0)
        chunks = self._member_chunks()
        self._send(client, {"type": "welcome", "name": name, "label": client.label,
                            "epoch": self.epoch, "last_seq": self.seq, "members": chunks[0],
                            "more": len(chunks) > 1, "history": len(history)})
        self._queue_member_chunks(client, chunks[1:])
        for frame in history:
            self._queue(client, frame)
        client.pos = self.room.end
        self.streaming.add(client)
        log.info("%s joined", client.label)
        self._publish({"type": "join", "seq": 0, "member": client.label, "ts": now_ms()})

    def _client_address(self, client: Client, forwarded: str | None) -> str:
        if forwarded is None:
            return client.ip
        # Trust is decided by who is connected, never by an address claimed
        # in an earlier hello on this connection.
        peer = ipaddress.ip_address(client.peer_ip)
        if not any(peer in net for net in self.trusted):
            log.info("%s: ignored forwarded_for from an untrusted peer", client.peer_ip)
            return client.ip
        try:
            return str(ipaddress.ip_address(forwarded))
        except ValueError:
            raise protocol.MessageError("bad_message", "forwarded_for is not an IP address")

    def _on_say(self, client: Client, message: dict) -> None:
        self._require_member(client)
        protocol.check_text(message["text"])
        self._publish({"type": "message", "seq": 0, "from": client.label,
                       "text": message["text"], "ts": now_ms()})

    def _on_private(self, client: Client, message: dict) -> None:
        self._require_member(client)
        protocol.check_text(message["text"])
        name = message["to"].split("@", 1)[0]
        target = self.members.get(name.casefold())
        if target is None or (message["to"] != name and message["to"] != target.label):
            raise protocol.MessageError("no_such_member", f"no one called {message['to']!r}")
        frame = self._encode({"type": "private", "from": client.label, "to": target.label,
                              "text": message["text"], "ts": now_ms()})
        self._queue(target, frame)
        if target is not client:
            self._queue(client, frame)

    def _on_who(self, client: Client, message: dict) -> None:
        self._require_member(client)
        chunks = self._member_chunks()
        self._queue_member_chunks(client, chunks)

    def _on_history(self, client: Client, message: dict) -> None:
        self._require_member(client)
        if message.get("after") is None:
            raise protocol.MessageError("bad_message", "history: give 'after'")
        frames, missed = self.history.after(message["after"])
        self._send(client, {"type": "history", "after": message["after"],
                            "count": len(frames), "missed": missed})
        for frame in frames:
            self._queue(client, frame)

    def _on_ping(self, client: Client, message: dict) -> None:
        reply = {"type": "pong"}
        if message.get("token") is not None:
            reply["token"] = message["token"]
        self._send(client, reply)

    def _on_quit(self, client: Client, message: dict) -> None:
        self._leave(client, "quit")
        self._start_closing(client)

    def _require_member(self, client: Client) -> None:
        if client.name is None:
            raise protocol.MessageError("not_joined", "say hello first")

    def _member_chunks(self) -> list[list[str]]:
        """Member labels split so that each list fits in one frame."""
        budget = self.limits.max_frame - _MEMBERS_FRAME_SLACK
        chunks: list[list[str]] = [[]]
        size = 0
        for member in self.members.values():
            cost = len(member.label.encode()) + 3  # quotes and comma
            if size + cost > budget and chunks[-1]:
                chunks.append([])
                size = 0
            chunks[-1].append(member.label)
            size += cost
        return chunks

    def _queue_member_chunks(self, client: Client, chunks: list[list[str]]) -> None:
        for i, chunk in enumerate(chunks):
            self._send(client, {"type": "members", "members": chunk,
                                "more": i < len(chunks) - 1})

    def _on_pong(self, client: Client, message: dict) -> None:
        """Nothing to answer: receiving it already reset the idle timer."""

