"""What clients send, and how long we wait for it: bytes read from a socket,
cut into frames, parsed and handed to the room's rules, one request at a
time and at the rate limit; and the timeouts on a client's input (hello,
an unfinished frame, silence, the grace for hanging up once closing).

Input over the rate waits ("fake lag") instead of being refused, and while
requests wait the socket is read only up to PAUSED_INPUT_BYTES, so TCP
pushes back on the sender; only a backlog that the rate cannot work off in
``--flood-seconds`` counts as flooding.
"""

from __future__ import annotations

import logging
import selectors
from typing import Callable

from tcpserver import protocol
from tcpserver.client_state import Client
from tcpserver.outbound import Outbound, watch
from tcpserver.pacing import take_token, timed_out
from tcpserver.rules import Room
from tcpserver.settings import Limits
from tcpserver.timers import Deadlines

log = logging.getLogger("tcpserver.server")

RECV_SIZE = 256 * 1024
# While a client's requests wait (a reply still unsent), its socket is read
# only until this much input is buffered; then TCP pushes back.  The same
# bound applies to input waiting for the rate limit.
PAUSED_INPUT_BYTES = 2 * protocol.MAX_FRAME_SIZE


class Inbound:
    """Reads clients' sockets, feeds their requests to ``room`` and fires
    their input timeouts; answers (errors, pings) go to ``out``, wake-ups
    to ``deadlines``.

    ``close(client)`` sends what is queued, then closes; ``drop(client,
    reason)`` closes at once (the member leaving for ``reason``);
    ``input_ready(client)`` says its waiting requests may go on.
    """

    def __init__(self, selector: selectors.BaseSelector, limits: Limits, room: Room,
                 out: Outbound, deadlines: Deadlines, *,
                 close: Callable[[Client], None],
                 drop: Callable[[Client, str], None],
                 input_ready: Callable[[Client], None]) -> None:
        self.selector = selector
        self.limits = limits
        self.room = room
        self.out = out
        self.deadlines = deadlines
        self._close = close
        self._drop = drop
        self._input_ready = input_ready

    def on_readable(self, client: Client, now: float) -> None:
        """Read what the client sent and handle the whole frames in it."""
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("%s: recv failed: %s", client, exc)
            return self._drop(client, "hung_up")
        if not data:
            return self._drop(client, "hung_up")
        client.last_recv = now
        client.pinged = False
        if client.closing:
            return  # read only to see the peer hang up
        client.decoder.receive_data(data)
        self.process(client, now)

    def process(self, client: Client, now: float) -> None:
        """Handle the whole frames buffered, in order, until a reply makes
        the rest wait or the client is out of tokens ("fake lag": frames over
        the rate wait their turn instead of being refused)."""
        decoder = client.decoder
        busy = throttled = False
        while not client.closing:
            if client.reply_bytes or client.hold_at is not None or client.waiting:
                # One reply at a time: the next request waits until this one
                # is sent, so a client cannot queue unbounded output.
                busy = True
                break
            message = client.held
            if message is None:
                try:
                    payload = decoder.next_payload()
                except protocol.FrameError as exc:
                    return self.fail(client, exc.code, exc.message, "protocol_error")
                if payload is None:
                    break
                try:
                    message = protocol.parse_client_message(payload)
                except protocol.MessageError as exc:
                    message = exc  # garbage costs a token too
            # quit costs nothing, but it waits behind the frames sent before
            # it, which are delivered first.
            if (isinstance(message, protocol.MessageError) or message["type"] != "quit") \
                    and not take_token(client, self.limits, now):
                client.held = message
                throttled = True
                break
            client.held = None
            if isinstance(message, protocol.MessageError):
                self.out.send_error(client, message.code, message.message)
                continue
            try:
                self.room.handle(client, message)
            except protocol.MessageError as exc:
                self.out.send_error(client, exc.code, exc.message)
            except protocol.LocalProtocolError:
                # Only possible with a small --max-frame: the reply would not fit.
                self.out.send_error(client, "bad_message", "too long for this server's frames")
        if client.closed:
            return
        if throttled and not client.closing:
            # Flooding is a backlog that takes too long to work off at the
            # rate, not time spent waiting: a stall bunches a polite
            # sender's frames, but only a flooder's pile keeps growing.
            bound = self.limits.flood_frames
            if 1 + decoder.whole_frames(bound) > bound:
                return self.fail(client, "flooding", f"disconnected for flooding: over {bound} "
                                  f"messages waiting for the rate limit ({self.limits.msg_rate:g} "
                                  "a second)", "flooding")
            client.wake_at = now + (1 - client.tokens) / self.limits.msg_rate
            self.deadlines.schedule(client, client.wake_at)
        waiting = busy or throttled
        if waiting:
            # Stop reading once enough waits: TCP pushes back on the sender.
            if client.reading and decoder.buffered >= PAUSED_INPUT_BYTES:
                client.reading = False
                watch(self.selector, client)
        elif not client.reading:
            client.reading = True
            watch(self.selector, client)
        if decoder.buffered and not waiting and not client.closing:
            if not client.partial_since:
                client.partial_since = now
                self.deadlines.schedule(client, now + self.limits.frame_timeout)
        else:
            client.partial_since = 0.0

    def on_deadline(self, client: Client, now: float) -> None:
        """Fire whichever of the client's timers is due (at most one)."""
        limits = self.limits
        if client.closing:
            if now >= client.close_deadline:
                self._drop(client, "hung_up")  # its grace to hang up is over
        elif (timeout := timed_out(client, limits, now)) is not None:
            self.fail(client, *timeout, "timed_out")
        elif not client.pinged and now >= client.last_recv + limits.idle_timeout / 2:
            client.pinged = True
            self.out.send(client, _IDLE_PING)
        if client.wake_at and now >= client.wake_at and not client.closing:
            client.wake_at = 0.0
            self._input_ready(client)  # its next token is due

    def fail(self, client: Client, code: str, message: str, reason: str) -> None:
        """Tell the client what it did wrong, take it out, and close."""
        log.info("%s: %s (%s)", client, message, code)
        self.out.send_error(client, code, message)
        self.room.leave(client, reason)
        self._close(client)


# Every silent member is pinged with the same frame: encode it once.
_IDLE_PING = protocol.encode_frame({"type": "ping", "token": "idle"})
