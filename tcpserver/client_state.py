"""What the server keeps for each connection."""

from __future__ import annotations

import socket
from collections import deque

from tcpserver import protocol
from tcpserver.settings import Limits


class Client:
    """One connection: its decoder, its output position and its timers.

    Output is the shared room stream from ``pos`` (for members) merged with
    ``queue``, a deque of (room offset, frame, is reply) for frames meant for
    this client alone: a frame queued at offset N is sent after the room
    bytes before N and before those after it.  Replies (welcome, member
    lists, history) are output the client asked for: they are counted in
    ``reply_bytes``, not against the slow-reader limit, and while any are
    unsent the client's next request waits.  A history reply is streamed from
    the log: ``replay`` is the seq range still to send and ``hold_at`` the
    room offset where the stream waits for it.

    Input over the rate limit waits too ("fake lag"): the first frame without
    a token is ``held``, the rest stay in the decoder, and ``wake_at`` is when
    the next token is due.  ``timer_at`` is the client's live entry in the
    server's deadline heap (``timers.Deadlines``).
    """

    __slots__ = (
        "sock", "fd", "peer_ip", "ip", "decoder", "name", "label",
        "pos", "stop_at", "queue", "queued_bytes", "reply_bytes", "replay", "hold_at",
        "writing", "reading", "resume", "waiting", "proxied",
        "tokens", "token_time", "held", "wake_at", "timer_at",
        "connected_at", "last_recv", "pinged", "partial_since",
        "closing", "close_deadline", "fin_sent", "closed",
    )

    def __init__(self, sock: socket.socket, ip: str, now: float, limits: Limits) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer_ip = ip  # who is connected
        self.ip = ip  # who is counted: the peer, or the address a trusted proxy forwarded
        self.proxied = False  # from a trusted proxy, before hello: counted as pending
        self.decoder = protocol.FrameDecoder(limits.max_frame)
        self.name: str | None = None  # set once in the room
        self.label: str | None = None
        self.pos: int | None = None  # room stream offset; None until joined
        self.stop_at: int | None = None  # room offset to stop at once leaving
        self.queue: deque[tuple[int, bytes, bool]] = deque()
        self.queued_bytes = 0  # unsent bytes of queued frames that are not replies
        self.reply_bytes = 0  # unsent bytes of queued replies
        self.replay: list[int] | None = None  # [next seq, last seq] still to stream
        self.hold_at: int | None = None  # room offset the stream waits at for replay
        self.writing = False  # EVENT_WRITE registered: the kernel buffer is full
        self.reading = True  # EVENT_READ registered
        self.resume: str | None = None  # the secret that takes this name back
        self.waiting = False  # a request awaits an answer from elsewhere (Redis)
        self.tokens = float(limits.msg_burst)
        self.token_time = now
        # A frame decoded but waiting for a token (fake lag): a parsed
        # message, or the MessageError it raised (garbage costs a token too).
        self.held: dict | protocol.MessageError | None = None
        self.wake_at = 0.0  # when the next token is due for a held frame, or 0
        self.timer_at = float("inf")  # its live entry in the server's Deadlines
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

    def backlog(self, room_end: int) -> int:
        """Unsent bytes that count against the slow-reader limit: the room
        stream up to ``room_end`` and queued frames that are not replies."""
        room = room_end - self.pos if self.pos is not None else 0
        return room + self.queued_bytes

    def pending(self, room_end: int) -> int:
        """All bytes not yet sent, counting the room stream up to ``room_end``."""
        return self.backlog(room_end) + self.reply_bytes

    def advance(self, sent: int) -> None:
        """Account for ``sent`` bytes written, in the order ``_flush`` sends:
        room bytes up to the first queued frame's offset, that frame, ..."""
        queue = self.queue
        while sent and queue:
            offset, frame, reply = queue[0]
            if self.pos is not None and self.pos < offset:
                step = min(sent, offset - self.pos)
                self.pos += step
                sent -= step
                continue
            step = min(sent, len(frame))
            if step == len(frame):
                queue.popleft()
            else:
                # A view, not a copy: a shared replay blob stays shared.
                queue[0] = (offset, memoryview(frame)[step:], reply)
            if reply:
                self.reply_bytes -= step
            else:
                self.queued_bytes -= step
            sent -= step
        if sent:
            self.pos += sent
