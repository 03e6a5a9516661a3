"""What the server keeps for each connection."""

from __future__ import annotations

import socket
from collections import deque

from tcpserver import protocol
from tcpserver.settings import Limits


class Client:
    """One connection: its decoder, its output position and its timers.

    Output is the shared room stream from ``pos`` (for members) merged with
    ``queue``, a deque of (room offset, frame) for frames meant for this
    client alone: a frame queued at offset N is sent after the room bytes
    before N and before those after it.
    """

    __slots__ = (
        "sock", "fd", "peer_ip", "ip", "decoder", "name", "label",
        "pos", "stop_at", "queue", "queued_bytes", "writing",
        "tokens", "token_time", "strikes",
        "connected_at", "last_recv", "pinged", "partial_since",
        "closing", "close_deadline", "fin_sent", "closed",
    )

    def __init__(self, sock: socket.socket, ip: str, now: float, limits: Limits) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer_ip = ip  # who is connected
        self.ip = ip  # who is counted: the peer, or the address a trusted proxy forwarded
        self.decoder = protocol.FrameDecoder(limits.max_frame)
        self.name: str | None = None  # set once in the room
        self.label: str | None = None
        self.pos: int | None = None  # room stream offset; None until joined
        self.stop_at: int | None = None  # room offset to stop at once leaving
        self.queue: deque[tuple[int, bytes]] = deque()
        self.queued_bytes = 0
        self.writing = False  # EVENT_WRITE registered: the kernel buffer is full
        self.tokens = float(limits.msg_burst)
        self.token_time = now
        self.strikes = 0  # frames dropped in a row for the rate limit
        self.connected_at = now
        self.last_recv = now
        self.pinged = False
        self.partial_since = 0.0  # when an unfinished frame began, or 0
        self.closing = False
        self.close_deadline = 0.0
        self.fin_sent = False
        self.closed = False

    def __repr__(self) -> str:
        return self.label or f"{self.ip} (fd {self.fd})"

    def pending(self, room_end: int) -> int:
        """Bytes not yet sent, counting the room stream up to ``room_end``."""
        room = room_end - self.pos if self.pos is not None else 0
        return room + self.queued_bytes

    def advance(self, sent: int) -> None:
        """Account for ``sent`` bytes written, in the order ``_flush`` sends:
        room bytes up to the first queued frame's offset, that frame, ..."""
        queue = self.queue
        while sent and queue:
            offset, frame = queue[0]
            if self.pos is not None and self.pos < offset:
                step = min(sent, offset - self.pos)
                self.pos += step
                sent -= step
                continue
            if sent >= len(frame):
                queue.popleft()
                self.queued_bytes -= len(frame)
                sent -= len(frame)
            else:
                queue[0] = (offset, frame[sent:])
                self.queued_bytes -= sent
                sent = 0
        if sent:
            self.pos += sent
