"""How the gateway packs server payloads into WebSocket messages.

One message carries every payload ready at that moment, joined by "\\n",
up to ``RAW_BATCH_BYTES`` (``BATCH_BYTES`` with permessage-deflate); see
``gateway.session`` for the path that fills them.  Also the byte sequence
that marks a read that may hold a farewell.
"""

from __future__ import annotations

from gateway.upstream import READ_BYTES

# Largest batch, in bytes, for a browser that negotiated permessage-deflate
# (a single bigger payload still goes alone): aiohttp's limit for
# compressing inline, so compression costs no thread hop.  At 100-byte chat
# lines that is ~150 payloads per message.
BATCH_BYTES = 16 * 1024
# Largest batch without compression: one whole read from the chat server
# fits, so a read's payloads are appended to a batch in one step instead of
# being split one by one between two; and joining a batch still takes
# memory from malloc's heap, not a fresh mmap (glibc's threshold: 128 KiB).
RAW_BATCH_BYTES = READ_BYTES


class Batch:
    """Payloads bound for one WebSocket message, filled as they arrive."""

    __slots__ = ("chunks", "size", "frames", "replies")

    def __init__(self) -> None:
        # Each chunk is the payloads of one read (or one error reply),
        # already joined by "\n": joined while the read is still in the
        # CPU's cache, and most messages are one chunk, sent as it is.
        self.chunks: list[bytes] = []
        self.size = -1  # joined length: each payload adds its bytes plus a separator
        self.frames = 0  # payloads in the chunks
        self.replies = 0  # how many of them are error replies, not relayed frames


def runs(payloads: list[bytes], limit: int):
    """Split ``payloads`` into runs that each fit a ``limit``-byte message
    (a bigger payload goes alone); yield (run, its joined size plus 1)."""
    run: list[bytes] = []
    size = -1
    for payload in payloads:
        if run and size + 1 + len(payload) > limit:
            yield run, size + 1
            run, size = [], -1
        run.append(payload)
        size += 1 + len(payload)
    yield run, size + 1


# Every farewell (a ``shutdown`` or an ``error``, see messages.farewell)
# has a "message" key, and no other server message has one.  A JSON string
# escapes its quotes, so chat text cannot hold this byte sequence, a key
# followed by its colon: a read without it needs no per-frame look, and one
# scan of the read replaces two (one per type name, which chat text can
# hold, e.g. "text":"shutdown").
FAREWELL_KEY = b'"message":'
KEY_OVERLAP = len(FAREWELL_KEY) - 1
