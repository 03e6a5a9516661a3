"""One browser session: its WebSocket, its TCP connection, the queue between.

Server to browser, each frame's payload goes out as one text message,
byte for byte (decoded from UTF-8, never re-encoded as JSON).  Browser to
server, each text message is validated by the protocol module and framed
by it; anything invalid is answered with an ``error`` and never forwarded.
The close codes are listed in ``gateway.bridge``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import WSCloseCode, WSMsgType, web

from gateway.config import GatewayConfig
from gateway.messages import (
    LOST_REASON,
    LOST_SERVER,
    browser_frame,
    close_reason,
    error_text,
    farewell,
)
from gateway.metrics import Metrics
from tcpserver import protocol

log = logging.getLogger(__name__)

RECV_SIZE = 64 * 1024
# A close handshake with a browser that stopped reading cannot finish;
# after this long the transport is dropped instead.
CLOSE_TIMEOUT = 5.0


class _Reply(str):
    """A message of the gateway's own (an error reply), not a relayed frame."""

    __slots__ = ()


class _Close:
    """Queued after the server's last frame: close once everything is sent."""

    __slots__ = ("code", "reason", "label")

    def __init__(self, code: int, reason: str, label: str) -> None:
        self.code, self.reason, self.label = code, reason, label


class Session:
    """One browser: its WebSocket, its TCP connection and the queue between."""

    def __init__(self, ws: web.WebSocketResponse, address: str | None,
                 config: GatewayConfig, metrics: Metrics) -> None:
        self.ws = ws
        self.address = address
        self.config = config
        self.metrics = metrics
        # Everything bound for the browser goes through this one queue and
        # one sender task, so server frames and our own error replies stay
        # in order and only one task ever writes to the WebSocket.
        self.queue: asyncio.Queue[str | _Reply | _Close] = asyncio.Queue(config.queue_size)
        self.upstream: asyncio.StreamWriter | None = None
        self.close_label: str | None = None
        self._sender: asyncio.Task | None = None
        self._receiver: asyncio.Task | None = None
        self._closer: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"session {self.address}"

    async def run(self) -> None:
        """Relay until either side is done; returns once the session is closed."""
        self._sender = self._start(self._send_to_browser())
        deadline = time.monotonic() + self.config.hello_timeout
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
                    break
        finally:
            # The browser left first (or we are being cancelled): closing the
            # TCP connection is what makes the room see a leave.
            self.close(WSCloseCode.GOING_AWAY, "", "browser_closed")
            closer = self._closer
            assert closer is not None
            await asyncio.shield(closer)

    def close(self, code: int, reason: str, label: str) -> None:
        """Start closing both sides, once; later calls are ignored."""
        if self._closer is None:
            self.close_label = label
            self._closer = asyncio.create_task(self._close(code, reason, label))

    async def wait_closed(self) -> None:
        """Return once a close started by ``close`` has finished."""
        if self._closer is not None:
            await asyncio.shield(self._closer)

    def _start(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        # A bug in a relay task must end the session, not leave it half-alive.
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: relay task failed", self, exc_info=task.exception())
            self.close(WSCloseCode.INTERNAL_ERROR, "internal error in the gateway", "error")

    async def _close(self, code: int, reason: str, label: str) -> None:
        self.metrics.closes.labels(label).inc()
        if label == "browser_closed":
            log.debug("%s closed by the browser", self)
        else:
            log.info("%s closed (%s): %d %s", self, label, code, reason)
        current = asyncio.current_task()
        for task in (self._sender, self._receiver):
            if task is not None and task is not current:
                task.cancel()
        if self.upstream is not None:
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
            except (OSError, asyncio.TimeoutError):
                pass  # closing anyway; nothing left to tell anyone
        for task in (self._sender, self._receiver):
            if task is not None and task is not current:
                await asyncio.gather(task, return_exceptions=True)

    def _reject(self, code: str, message: str) -> None:
        self.metrics.rejected.inc()
        self._to_browser(_Reply(error_text(code, message)))

    def _to_browser(self, text: str) -> bool:
        """Queue a message for the browser; False (and closing) if it is full."""
        try:
            self.queue.put_nowait(text)
            return True
        except asyncio.QueueFull:
            self.close(WSCloseCode.TRY_AGAIN_LATER,
                       f"too far behind: {self.config.queue_size} messages waiting; "
                       "reconnect and ask for history", "overflow")
            return False

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
        if self.upstream.is_closing():
            return  # the server hung up; the session is about to close
        self.upstream.write(frame)
        self.metrics.relayed.labels("to_server").inc()
        try:
            # Waiting here stops us reading the WebSocket, so a browser
            # cannot outrun a slow server: backpressure, not buffering.
            await self.upstream.drain()
        except ConnectionError:
            pass  # the receiver sees the hang-up and closes the session

    async def _connect(self) -> bool:
        config = self.config
        try:
            reader, self.upstream = await asyncio.wait_for(
                asyncio.open_connection(config.chat_host, config.chat_port),
                config.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self.metrics.connect_failures.inc()
            why = ("timed out" if isinstance(exc, asyncio.TimeoutError)
                   else exc.strerror or str(exc))
            log.warning("cannot reach the chat server at %s: %s", config.chat_address, why)
            self.close(WSCloseCode.INTERNAL_ERROR,
                       f"chat server unreachable ({why})", "unreachable")
            return False
        if self._closer is not None:
            # Closed (e.g. gateway shutdown) while we were connecting.
            self.upstream.close()
            return False
        self._receiver = self._start(self._receive_from_server(reader))
        return True

    async def _receive_from_server(self, reader: asyncio.StreamReader) -> None:
        decoder = protocol.FrameDecoder(self.config.max_frame)
        # Without a farewell first, the end of the stream means the server
        # was lost (crashed, killed, reset), not that it closed in order.
        code, reason = LOST_SERVER, LOST_REASON
        try:
            while data := await reader.read(RECV_SIZE):
                decoder.receive_data(data)
                while (payload := decoder.next_payload()) is not None:
                    # The frames after a farewell (our own leave) are
                    # still relayed; the farewell names the close.
                    code, reason = farewell(payload) or (code, reason)
                    try:
                        text = payload.decode("utf-8")
                    except UnicodeDecodeError:
                        log.warning("%s: skipped a server frame that is not UTF-8", self)
                        continue
                    if self.queue.full():
                        # One read can hold a burst of frames bigger than the
                        # queue; let the sender take what the socket will
                        # accept before deciding the browser is too slow.
                        await asyncio.sleep(0)
                    if not self._to_browser(text):
                        return
        except protocol.FrameError as exc:
            log.warning("%s: bad frame from the chat server: %s", self, exc.message)
            reason = "the chat server sent a bad frame"
            code = WSCloseCode.INTERNAL_ERROR
        except ConnectionError as exc:
            if code == LOST_SERVER:
                reason = f"lost the chat server: {exc.strerror or exc}"
        # Blocks only while the browser drains the queue: the close must
        # come after every frame already queued.
        await self.queue.put(_Close(code, reason, "server_closed"))

    async def _send_to_browser(self) -> None:
        while True:
            item = await self.queue.get()
            if isinstance(item, _Close):
                self.close(item.code, item.reason, item.label)
                return
            try:
                await self.ws.send_str(item)
            except ConnectionError:
                return  # the browser vanished; run() sees it and closes
            if not isinstance(item, _Reply):
                self.metrics.relayed.labels("to_browser").inc()
