"""The room's rules driven with no server and no network: a recording outbox.

``RoomHarness`` is what the select() server is to ``rules.Room``, minus the
sockets: it records what the room sends, streams and closes, so tests of the
rules read like "alice says X; bob is sent Y".
"""

from __future__ import annotations

import ipaddress
import socket

from tcpserver import protocol
from tcpserver.client_state import Client
from tcpserver.roomlog import MemoryLog, RoomLog
from tcpserver.rules import Room
from tcpserver.settings import DEFAULT_TRUSTED_PROXIES, Limits


class RoomHarness:
    """A Room with a recording ``Outbox``.  ``sent`` holds (client, frame,
    reply) in order; ``stream`` the frames broadcast or committed."""

    def __init__(self, roomlog: RoomLog | None = None, **limits) -> None:
        self.limits = Limits(**limits)
        self.log = roomlog or MemoryLog(self.limits.max_frame, self.limits.history, 10_000)
        trusted = tuple(ipaddress.ip_network(net) for net in DEFAULT_TRUSTED_PROXIES)
        # A log shared with other processes (Redis) brings its presence.
        self.room = Room(self.limits, self.log, self, trusted, self.log.make_presence())
        self.sent: list[tuple[Client, bytes, bool]] = []
        self.stream: list[bytes] = []
        self.replays: list[tuple[Client, int, int]] = []
        self.closed: list[Client] = []
        self.dropped: list[Client] = []
        self.clients: list[Client] = []
        # Client wants a socket for its descriptor number; one pair serves all.
        self._sock, self._peer = socket.socketpair()

    def shutdown(self) -> None:
        """Close the harness's own sockets."""
        self._sock.close()
        self._peer.close()

    # --- rules.Outbox ----------------------------------------------------

    def send(self, client: Client, frame: bytes, reply: bool = False) -> None:
        self.sent.append((client, frame, reply))

    def replay(self, client: Client, first: int, last: int) -> None:
        self.replays.append((client, first, last))

    def broadcast(self, frame: bytes) -> None:
        self.stream.append(frame)

    def follow(self, client: Client) -> None:
        client.pos = 0

    def leaving(self, client: Client) -> None:
        pass

    def close(self, client: Client) -> None:
        self.closed.append(client)

    def drop(self, client: Client) -> None:
        self.dropped.append(client)
        client.closed = True

    def address_admitted(self, client: Client, address: str) -> bool:
        client.ip = address
        return True

    # --- driving ---------------------------------------------------------

    def connect(self, ip: str = "127.0.0.1") -> Client:
        client = Client(self._sock, ip, 0.0, self.limits)
        self.clients.append(client)
        return client

    def join(self, name: str, **hello) -> Client:
        client = self.connect()
        self.room.handle(client, {"type": "hello", "name": name, **hello})
        self.commit()
        return client

    def commit(self) -> None:
        self.stream.extend(self.room.commit())

    def messages_for(self, client: Client) -> list[dict]:
        """Every message sent to ``client`` alone, decoded, in order."""
        return [message for _, message in self.payloads_for(client)]

    def payloads_for(self, client: Client) -> list[tuple[int, dict]]:
        """(payload size in bytes, message) for each frame sent to ``client``."""
        decoder = protocol.FrameDecoder(1 << 30)
        decoder.receive_data(b"".join(f for c, f, _ in self.sent if c is client))
        out = []
        while (payload := decoder.next_payload()) is not None:
            out.append((len(payload), protocol.parse_server_message(payload)))
        return out

    def stream_messages(self) -> list[dict]:
        decoder = protocol.FrameDecoder(1 << 30)
        decoder.receive_data(b"".join(self.stream))
        out = []
        while (payload := decoder.next_payload()) is not None:
            out.append(protocol.parse_server_message(payload))
        return out
