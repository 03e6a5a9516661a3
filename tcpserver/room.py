"""The room's shared output stream.

Every member receives the same ordered stream of room frames, so the server
appends each encoded frame once to one buffer and each member keeps only an
absolute offset into it.  A broadcast therefore costs one append, whatever
the number of members; members that fall too far behind are evicted, which
keeps the buffer bounded.
"""

from __future__ import annotations


class RoomStream:
    """An append-only byte stream addressed by absolute offsets.

    Offsets keep growing; bytes before the slowest reader are dropped by
    ``trim``.
    """

    __slots__ = ("_buf", "_base")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0  # absolute offset of _buf[0]

    @property
    def end(self) -> int:
        """Absolute offset just past the last byte appended."""
        return self._base + len(self._buf)

    def append(self, frame: bytes) -> None:
        self._buf += frame

    def view(self, start: int, stop: int) -> memoryview:
        """A zero-copy view of [start, stop).  The caller must ``release()``
        it before the next append or trim, which resize the buffer."""
        base = self._base
        return memoryview(self._buf)[start - base : stop - base]

    def window(self) -> tuple[memoryview, int]:
        """A zero-copy view of every byte held, and the absolute offset of
        its first.  Slices of it must be gone, and it released, before the
        next append or trim."""
        return memoryview(self._buf), self._base

    def trim(self, keep_from: int) -> None:
        """Forget bytes before ``keep_from`` once that frees enough to be
        worth a move (half the buffer), so trimming stays amortised O(1)."""
        drop = keep_from - self._base
        if drop > 0 and (drop == len(self._buf) or drop * 2 >= len(self._buf)):
            del self._buf[:drop]
            self._base = keep_from

    @property
    def buffered(self) -> int:
        return len(self._buf)
