"""One browser session: its WebSocket, its TCP connection, the backlog between.

Server to browser, each frame's payload is relayed byte for byte (never
re-encoded as JSON).  Payloads that are ready together go out together: one
WebSocket text message carries every payload waiting at that moment, joined
by ``"\\n"`` (protocol v2; JSON payloads never hold a raw newline), up to
``RAW_BATCH_BYTES``, or ``BATCH_BYTES`` with permessage-deflate.  Nothing
waits to fill a batch: a lone frame in a quiet room goes out as soon as it
is read.

The path is short on purpose.  The event loop hands each read from the chat
server to ``Session._from_server``, which decodes every whole frame in it
at once (``FrameDecoder.payloads``), joins them by "\\n" and appends that
chunk to the open batch of one backlog (a deque of batches) in that same
callback; one sender task takes the batches in order, with one
``send_frame`` each (a batch of one chunk is sent as it is).  No queue hop
or task switch per frame, one copy out of the frame decoder and one into
the chunk.

Backpressure, in frames: when a read arrives while ``queue_size`` frames
from earlier reads are still waiting (the browser stopped taking them), the
session is closed with 1013 rather than dropping frames silently.  So one
session holds at most ``queue_size`` frames plus one read.

Browser to server, each text message is validated by the protocol module
and framed by it; anything invalid is answered with an ``error``, queued in
the same backlog so it keeps its place among the relayed frames, and never
forwarded.  The close codes are listed in ``gateway.bridge``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from aiohttp import WSCloseCode, WSMsgType, web

from gateway.batching import (
    BATCH_BYTES,
    FAREWELL_KEY,
    KEY_OVERLAP,
    RAW_BATCH_BYTES,
    Batch,
    runs,
)
from gateway.config import GatewayConfig
from gateway.messages import (
    LOST_REASON,
    LOST_SERVER,
    browser_frame,
    close_reason,
    error_payload,
    farewell,
)
from gateway.metrics import Metrics
from gateway.upstream import Upstream
from tcpserver import protocol

log = logging.getLogger(__name__)

# A close handshake with a browser that stopped reading cannot finish;
# after this long the transport is dropped instead.
CLOSE_TIMEOUT = 5.0
# Close codes (RFC 6455 section 7.4.1) with which a browser leaves on
# purpose: 1000 (the page closed it), 1001 (the tab closed or navigated
# away).  The gateway then sends the chat server a ``quit``, so the room
# reads "left"; any other end (no close frame, 1006, a missed heartbeat, the
# page's own 4000 when it abandons a socket to reconnect) stays a hang-up.
LEAVING_CODES = frozenset({WSCloseCode.OK, WSCloseCode.GOING_AWAY})
_QUIT = protocol.encode_frame({"type": "quit"})


class Session:
    """One browser: its WebSocket, its TCP connection and the backlog between."""

    def __init__(self, ws: web.WebSocketResponse, address: str | None,
                 config: GatewayConfig, metrics: Metrics) -> None:
        self.ws = ws
        self.address = address
        self.config = config
        self.metrics = metrics
        self.upstream: Upstream | None = None
        # Everything bound for the browser goes through this one backlog and
        # one sender task, so server frames and our own error replies stay
        # in order and only one task ever writes to the WebSocket.
        # The last batch is the open one; the sender takes from the left.
        self._backlog: deque[Batch] = deque()
        self._waiting = 0  # frames in the backlog
        self._tail = b""  # the end of the last read, for a farewell key split across reads
        self._carry = False  # a partial frame held by the decoder may hold the key
        self._decoder = protocol.FrameDecoder(config.max_frame)
        self._batch_limit = BATCH_BYTES if ws is None or ws.compress else RAW_BATCH_BYTES
        self._to_server_metric = metrics.relayed.labels("to_server")
        # The close the last server frame called for (a shutdown or a
        # closing error), and the close to make once the backlog is sent.
        self._farewell: tuple[int, str] | None = None
        self._end: tuple[int, str] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._sender: asyncio.Task | None = None
        self._closer: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"session {self.address}"

    async def run(self) -> None:
        """Relay until either side is done; returns once the session is closed."""
        self._sender = asyncio.create_task(self._send_to_browser())
        self._sender.add_done_callback(self._sender_done)
        deadline = time.monotonic() + self.config.hello_timeout
        quit = False
        try:
            while self._closer is None:
                timeout = None
                if self.upstream is None:
                    timeout = deadline - time.monotonic()
                    if timeout <= 0:
                        self.close(WSCloseCode.POLICY_VIOLATION,
                                   f"no hello within {self.config.hello_timeout:g} s",
                                   "hello_timeout")
                        break
                try:
                    msg = await self.ws.receive(timeout=timeout)
                except asyncio.TimeoutError:
                    continue  # the loop's deadline check closes the session
                if msg.type is WSMsgType.TEXT:
                    await self._from_browser(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    self._reject("bad_message", "binary messages are not accepted; send JSON text")
                else:  # CLOSE, CLOSING, CLOSED, ERROR: the browser is gone
                    # Only a close the browser began counts as leaving; the
                    # answer to our own close (shutdown, 1013, ...) does not.
                    quit = (msg.type is WSMsgType.CLOSE and msg.data in LEAVING_CODES
                            and self._closer is None)
                    break
        finally:
            # The browser left first (or we are being cancelled): closing the
            # TCP connection is what makes the room see a leave.
            self.close(WSCloseCode.GOING_AWAY, "", "browser_closed", quit=quit)
            closer = self._closer
            assert closer is not None
            await asyncio.shield(closer)

    def close(self, code: int, reason: str, label: str, quit: bool = False) -> None:
        """Start closing both sides, once; later calls are ignored.

        ``quit``: the browser left on purpose, so tell the chat server with
        a ``quit`` and let it close (the room sees reason ``quit``, not
        ``hung_up``).
        """
        if self._closer is None:
            self._closer = asyncio.create_task(self._close(code, reason, label, quit))

    async def wait_closed(self) -> None:
        """Return once a close started by ``close`` has finished."""
        if self._closer is not None:
            await asyncio.shield(self._closer)

    def _sender_done(self, task: asyncio.Task) -> None:
        # A bug in the sender must end the session, not leave it half-alive.
        if not task.cancelled() and task.exception() is not None:
            self._failed(task.exception())

    def _failed(self, exc: BaseException) -> None:
        log.error("%s: relay failed", self, exc_info=exc)
        self.close(WSCloseCode.INTERNAL_ERROR, "internal error in the gateway", "error")

    async def _close(self, code: int, reason: str, label: str, quit: bool) -> None:
        self.metrics.closes.labels(label).inc()
        if label == "browser_closed":
            log.debug("%s closed by the browser%s", self, " (leaving)" if quit else "")
        else:
            log.info("%s closed (%s): %d %s", self, label, code, reason)
        sender = self._sender
        if sender is not None and sender is not asyncio.current_task():
            sender.cancel()
        if self.upstream is not None:
            if quit and not self.upstream.closing:
                # The server closes after a quit.  Closing our side at once
                # could discard it: frames waiting for the rate limit, the
                # quit behind them, are dropped on a hang-up (PROTOCOL.md).
                # A second quit (the page sends one on pagehide) is harmless.
                self.upstream.write(_QUIT)
            else:
                self.upstream.close()
        if not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(code=code, message=close_reason(reason)),
                                       CLOSE_TIMEOUT)
            except asyncio.TimeoutError:
                log.info("%s: close handshake timed out", self)
        if self.upstream is not None:
            try:
                await asyncio.wait_for(self.upstream.wait_closed(), CLOSE_TIMEOUT)
            except asyncio.TimeoutError:
                # The server stopped reading, or did not act on a quit in
                # time: nothing left to say.
                self.upstream.abort()
        if sender is not None and sender is not asyncio.current_task():
            await asyncio.gather(sender, return_exceptions=True)
        self._backlog.clear()

    # --- server to browser -----------------------------------------------------

    def _from_server(self, data: bytes) -> None:
        """Upstream's on_data: decode one read and queue its payloads."""
        if self._closer is not None or self._end is not None:
            return
        try:
            self._relay(data)
        except Exception as exc:  # a bug: end this session, not the loop's callback
            self._failed(exc)

    def _relay(self, data: bytes) -> None:
        if self._waiting >= self.config.queue_size:
            # The sender had its turn since the last read and these are
            # still waiting: the browser is not taking them.
            self._overflow()
            return
        # Without copying the read: look in it, and across its seam with the last.
        seam = self._tail + data[:KEY_OVERLAP]
        look = self._carry or FAREWELL_KEY in data or FAREWELL_KEY in seam
        self._tail = data[-KEY_OVERLAP:] if len(data) >= KEY_OVERLAP else seam[-KEY_OVERLAP:]
        decoder = self._decoder
        payloads: list[bytes] = []
        bad: protocol.FrameError | None = None
        grown = 0
        held = decoder.buffered + len(data)
        try:
            payloads = decoder.payloads(data)
            # The joined size of the payloads, from the bytes the decoder
            # consumed: each frame is its payload plus a 4-byte header, each
            # part of a batch its payload plus a 1-byte separator.
            grown = held - decoder.buffered - 3 * len(payloads)
            if payloads and decoder.buffered >= protocol.HEADER.size:
                # A length header is left: this finds a bad one that stopped
                # the split (the frames before it are relayed first); a
                # frame still arriving is None.
                decoder.next_payload()
            self._carry = look and decoder.buffered > 0
            if look:
                for payload in payloads:
                    # Frames after a farewell (our own leave) are still
                    # relayed; the farewell names the close.
                    said = farewell(payload)
                    if said is not None:
                        self._farewell = said
        except protocol.FrameError as exc:
            bad = exc  # the frames before it are still relayed
        if payloads:
            self._queue(payloads, grown, 0)
        if bad is not None:
            log.warning("%s: bad frame from the chat server: %s", self, bad.message)
            self._end = (WSCloseCode.INTERNAL_ERROR, "the chat server sent a bad frame")
            if self.upstream is not None:
                self.upstream.abort()
            self._wake_sender()

    def _queue(self, payloads: list[bytes], grown: int, replies: int) -> None:
        """Append ``payloads`` to the backlog's batches and wake the sender.

        ``grown`` is their joined size (bytes plus one separator each);
        ``replies`` of them (0 or all) are the gateway's own error replies.
        """
        limit = self._batch_limit
        if grown - 1 > limit and len(payloads) > 1:
            # More than one message holds (only with deflate's small limit);
            # a single bigger payload goes alone.
            for run, size in runs(payloads, limit):
                self._queue(run, size, len(run) if replies else 0)
            return
        backlog = self._backlog
        batch = backlog[-1] if backlog else None
        if batch is None or batch.size + grown > limit:
            batch = Batch()
            backlog.append(batch)
        batch.chunks.append(b"\n".join(payloads))
        batch.size += grown
        batch.frames += len(payloads)
        batch.replies += replies
        self._waiting += len(payloads)
        self._wake_sender()

    def _server_gone(self, exc: Exception | None) -> None:
        """Upstream.connection_lost: close once the backlog is sent."""
        if self._closer is not None or self._end is not None:
            return
        if self._farewell is not None:
            self._end = self._farewell
        elif exc is not None:
            # Without a farewell first, the end of the stream means the
            # server was lost (crashed, killed, reset), not an orderly close.
            why = getattr(exc, "strerror", None) or exc
            self._end = (LOST_SERVER, f"lost the chat server: {why}")
        else:
            self._end = (LOST_SERVER, LOST_REASON)
        self._wake_sender()

    def _reject(self, code: str, message: str) -> None:
        self.metrics.rejected.inc()
        if self._waiting >= self.config.queue_size:
            # A browser that sends junk and reads nothing must not make us
            # hold its replies without bound either.
            self._overflow()
            return
        payload = error_payload(code, message)
        self._queue([payload], len(payload) + 1, 1)

    def _overflow(self) -> None:
        self.close(WSCloseCode.TRY_AGAIN_LATER,
                   f"too far behind: {self.config.queue_size} messages waiting; "
                   "reconnect and ask for history", "overflow")

    def _wake_sender(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _send_to_browser(self) -> None:
        loop = asyncio.get_running_loop()
        backlog = self._backlog
        relayed_metric = self.metrics.relayed.labels("to_browser")
        while True:
            if not backlog:
                if self._end is not None:
                    self.close(*self._end, "server_closed")
                    return
                self._wakeup = loop.create_future()
                await self._wakeup
                self._wakeup = None
                continue
            taken = backlog.popleft()
            self._waiting -= taken.frames
            relayed = taken.frames - taken.replies
            chunks = taken.chunks
            batch = chunks[0] if len(chunks) == 1 else b"\n".join(chunks)
            # ASCII is UTF-8; only other text needs the full check.  A
            # browser fails the whole connection on a bad text message.
            if not batch.isascii():
                batch = self._valid_utf8(batch)
                if not batch:
                    continue
            try:
                await self.ws.send_frame(batch, WSMsgType.TEXT)
            except ConnectionError:
                return  # the browser vanished; run() sees it and closes
            if relayed:
                relayed_metric.inc(relayed)

    def _valid_utf8(self, batch: bytes) -> bytes:
        try:
            batch.decode("utf-8")
            return batch
        except UnicodeDecodeError:
            pass
        kept = []
        for payload in batch.split(b"\n"):
            try:
                payload.decode("utf-8")
                kept.append(payload)
            except UnicodeDecodeError:
                log.warning("%s: skipped a server frame that is not UTF-8", self)
        return b"\n".join(kept)

    # --- browser to server -----------------------------------------------------

    async def _from_browser(self, text: str) -> None:
        try:
            kind, frame = browser_frame(text, self.address, self.config.max_frame)
        except protocol.ProtocolError as exc:
            return self._reject("bad_message", exc.message)
        if self.upstream is None:
            if kind != "hello":
                return self._reject("not_joined", "say hello first")
            if not await self._connect():
                return
        upstream = self.upstream
        if upstream.closing:
            return  # the server hung up; the session is about to close
        upstream.write(frame)
        self._to_server_metric.inc()
        # Waiting here stops us reading the WebSocket, so a browser cannot
        # outrun a slow server: backpressure, not buffering.
        await upstream.drain()

    async def _connect(self) -> bool:
        config = self.config
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await asyncio.wait_for(
                loop.create_connection(lambda: Upstream(self._from_server, self._server_gone),
                                       config.chat_host, config.chat_port),
                config.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self.metrics.connect_failures.inc()
            why = ("timed out" if isinstance(exc, asyncio.TimeoutError)
                   else exc.strerror or str(exc))
            log.warning("cannot reach the chat server at %s: %s", config.chat_address, why)
            self.close(WSCloseCode.INTERNAL_ERROR,
                       f"chat server unreachable ({why})", "unreachable")
            return False
        self.upstream = upstream
        if self._closer is not None:
            # Closed (e.g. gateway shutdown) while we were connecting.
            upstream.close()
            return False
        return True
