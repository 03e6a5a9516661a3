"""One session's TCP connection to the chat server, as an asyncio Protocol.

A Protocol rather than a StreamReader and a reader task: the event loop
hands each read straight to ``on_data``, which decodes it and queues the
payloads for the browser in the same callback.  No stream buffer copy, no
task switch per read.

A BufferedProtocol, reading into one buffer that every session of the
thread shares: a plain Protocol gets each read as a new bytes object of
asyncio's full read size (256 KiB), which malloc serves with a fresh mmap,
page faults and an mremap to shrink it, for every read.  Here a read is
copied once out of the shared buffer into a bytes object of its own size.
Sharing is safe because ``buffer_updated`` runs right after the read, in
the same thread, and nothing keeps a view of the buffer past it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

# The most one read takes.  A bytes object this size is still served by
# malloc from its heap (below glibc's 128 KiB mmap threshold), and at
# 100-byte chat lines one read holds ~400 frames.
READ_BYTES = 64 * 1024

_local = threading.local()


def _read_buffer() -> memoryview:
    """This thread's read buffer (READ_BYTES)."""
    view = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_BYTES))
    return view


class Upstream(asyncio.BufferedProtocol):
    """The chat-server side of a session.

    ``on_data(bytes)`` is called with every read and ``on_lost(exc)`` once
    when the connection ends (``exc`` None after a plain EOF, else the
    OSError that ended it).  Writes go through ``write``; ``drain`` waits
    while the kernel and the transport hold more than the high-water mark.
    """

    __slots__ = ("transport", "_on_data", "_on_lost", "_paused", "_drained", "_closed")

    def __init__(self, on_data: Callable[[bytes], None],
                 on_lost: Callable[[Exception | None], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_data = on_data
        self._on_lost = on_lost
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- asyncio.BufferedProtocol ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's is not an asyncio.Transport subclass.
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._on_data(_read_buffer()[:nbytes].tobytes())

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost(None) follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._wake()
        if not self._closed.done():
            self._closed.set_result(None)
        self._on_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    # --- for the session ------------------------------------------------------

    @property
    def closing(self) -> bool:
        """True once either side started closing: write nothing more."""
        return self.transport is None or self.transport.is_closing()

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the server (never blocks; see ``drain``)."""
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Return once the write buffer is below its high-water mark, or the
        connection is gone.  Never raises (the loss is reported by on_lost)."""
        if self._paused and not self._closed.done():
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def close(self) -> None:
        """Close after flushing what is written; see ``wait_closed``."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, discarding unsent data."""
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        """Return once the connection is fully closed."""
        await asyncio.shield(self._closed)

    def _wake(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None
