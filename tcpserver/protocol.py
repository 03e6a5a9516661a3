"""The chat room's wire protocol, with no networking code in it.

A frame is a 4-byte unsigned big-endian length followed by that many bytes
of UTF-8 JSON holding one object with a ``"type"`` field.  See PROTOCOL.md.

This is the only module in the project that builds or parses frames.  The
select() server, the terminal client and the web gateway all use it:

* ``FrameDecoder`` splits a byte stream into frame payloads;
* ``parse_client_message`` / ``parse_server_message`` turn a payload into a
  validated ``dict`` (never anything executable);
* ``encode_frame`` / ``frame_payload`` build frames.
"""

from __future__ import annotations

import bisect
import json
import re
import struct
import unicodedata
from typing import Any

# 64 KiB holds a chat message hundreds of times longer than anyone types,
# while keeping the memory one half-received frame can pin per client small.
MAX_FRAME_SIZE = 64 * 1024

# Text is capped well below the frame size so that the server's outgoing
# frame (text plus sender label, sequence number and timestamp, with JSON
# escaping of up to 6 bytes per character) always fits in MAX_FRAME_SIZE.
MAX_TEXT_CHARS = 4000

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,32}")
RESERVED_NAMES = frozenset({"server"})

HEADER = struct.Struct("!I")

# Leave reasons, carried by ``leave`` events and used in the server's log.
LEAVE_REASONS = (
    "quit",  # the member said goodbye
    "hung_up",  # the connection closed or reset without a quit
    "timed_out",  # silent past the idle timeout, or a frame left unfinished
    "slow_reader",  # stopped reading: output backlog over the limit
    "flooding",  # input kept waiting for the rate limit too long
    "protocol_error",  # sent bytes that are not frames
    "shutdown",  # the server is shutting down
    "replaced",  # the same member reconnected with its resume token
)

# Machine-readable error codes sent in ``error`` frames.
ERROR_CODES = (
    "bad_frame",  # length 0 or over the maximum: the stream cannot be trusted
    "bad_message",  # framing fine, content invalid (UTF-8, JSON, type, field)
    "not_joined",  # a room command before hello
    "already_joined",  # a second hello
    "name_invalid",
    "name_taken",
    "no_such_member",  # private message to someone not in the room
    "rate_limited",  # no longer sent (frames over the rate wait); kept for older servers
    "flooding",
    "hello_timeout",
    "idle_timeout",
    "frame_timeout",
    "server_full",
    "too_many_connections",
    "unknown_seq",  # history asked about a seq this room never issued
    "room_unavailable",  # the event could not be stored; it was not published
)

# After these errors the server closes the connection; after the others the
# connection stays usable (PROTOCOL.md, the error table).
CLOSING_ERRORS = frozenset({
    "bad_frame", "flooding", "hello_timeout", "idle_timeout", "frame_timeout",
    "server_full", "too_many_connections",
})


class ProtocolError(Exception):
    """Base class.  ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks the protocol."""


class FrameError(RemoteProtocolError):
    """A bad length header.  Frame boundaries are lost: close the connection."""


class MessageError(RemoteProtocolError):
    """A well-framed payload with bad content.  The stream is still in sync."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""


class FrameDecoder:
    """Incremental splitter of a byte stream into frame payloads.

    Feed bytes with ``receive_data``; call ``next_payload`` until it returns
    None.  A bad length raises FrameError; after that the decoder is unusable,
    because nothing tells where the next frame would start.
    """

    __slots__ = ("max_frame_size", "_buf", "_pos")

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0  # start of unread data in _buf; compacted lazily

    def receive_data(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buf) - self._pos

    def whole_frames(self, limit: int) -> int:
        """How many whole frames are buffered, counting no further than
        ``limit`` (so the cost is bounded).  Does not check lengths: a bad
        one is found, and raised, by ``next_payload``."""
        buf, pos, count = self._buf, self._pos, 0
        while count < limit and len(buf) - pos >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, pos)
            pos += HEADER.size + length
            if length == 0 or pos > len(buf):
                break
            count += 1
        return count

    def next_payload(self) -> bytes | None:
        """Return the next whole payload, or None if more data is needed.

        Raises FrameError for a length of 0 or over ``max_frame_size``.
        """
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(buf, pos)
        if length == 0:
            raise FrameError("bad_frame", "frame length is 0")
        if length > self.max_frame_size:
            raise FrameError(
                "bad_frame",
                f"frame length {length} is over the limit of {self.max_frame_size}",
            )
        end = pos + HEADER.size + length
        if len(buf) < end:
            return None
        self._pos = end
        return bytes(buf[pos + HEADER.size : end])

    def payloads(self, data: bytes = b"") -> list[bytes]:
        """Take ``data`` as ``receive_data`` would, then return every whole
        payload held, oldest first (maybe none).

        The frames ``next_payload`` would return one by one, in one call:
        cheaper per frame when one read holds many (the web gateway's
        relay), and with nothing held from before, ``data`` is split where
        it lies instead of being copied in first.  A bad length after good
        frames ends the list there, and the next call raises FrameError, so
        the good frames are not lost.
        """
        limit, head = self.max_frame_size, HEADER.size
        unpack = HEADER.unpack_from
        out: list[bytes] = []
        if data and self._pos == len(self._buf):
            # The gateway's hot loop, once per relayed frame: kept to the
            # fewest bytecodes (a bound append, each sum computed once).
            append = out.append
            pos, size = 0, len(data)
            last = size - head  # where the last whole header can start
            while pos <= last:
                (length,) = unpack(data, pos)
                start = pos + head
                end = start + length
                if end > size or not 0 < length <= limit:
                    break
                append(data[start:end])  # a slice of bytes: one copy
                pos = end
            self._buf.clear()
            self._pos = 0
            if pos < size:
                self._buf += memoryview(data)[pos:]
        else:
            if data:
                self.receive_data(data)
            buf, pos = self._buf, self._pos
            size = len(buf)
            with memoryview(buf) as view:  # slices copy once, not twice
                while size - pos >= head:
                    (length,) = unpack(buf, pos)
                    end = pos + head + length
                    if end > size or not 0 < length <= limit:
                        break
                    out.append(bytes(view[pos + head : end]))
                    pos = end
            self._pos = pos
        if not out:
            self.next_payload()  # raises FrameError if a bad length stopped us
        return out


def frame_payload(payload: bytes, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """Prefix an already-encoded JSON payload with its length header.

    Raises LocalProtocolError if the payload is empty or too large.
    """
    if not payload or len(payload) > max_frame_size:
        raise LocalProtocolError(
            "bad_frame", f"payload of {len(payload)} bytes cannot be framed"
        )
    return HEADER.pack(len(payload)) + payload


def encode_payload(message: Any) -> bytes:
    """Encode one message object (or any JSON value) as a payload (JSON,
    UTF-8, no header).

    The web gateway sends payloads as WebSocket text; frames add the header.
    """
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


def encode_frame(message: dict[str, Any], max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """Encode one message object as a whole frame (header included).

    Raises LocalProtocolError if it does not fit in ``max_frame_size``.
    """
    return frame_payload(encode_payload(message), max_frame_size)


def encode_frame_parts(message: dict[str, Any], key: str, value: bytes,
                       max_frame_size: int = MAX_FRAME_SIZE) -> tuple[bytes, bytes, bytes]:
    """Encode ``message`` plus one last field, ``key``, whose value is JSON
    encoded already: ``(head, value, b"}")``, which joined are one frame.

    This lets many frames share one encoded value (a member list) instead
    of each holding a copy; ``value`` must be valid JSON (from
    ``encode_payload`` or ``json.dumps`` with ``ensure_ascii=False``) and
    ``key`` not already in ``message``.  Raises LocalProtocolError if the
    frame would not fit in ``max_frame_size``.
    """
    payload = encode_payload(message)
    body = payload[:-1] + (b',"' if len(payload) > 2 else b'"') + key.encode() + b'":'
    length = len(body) + len(value) + 1
    if length > max_frame_size:
        raise LocalProtocolError("bad_frame", f"payload of {length} bytes cannot be framed")
    return HEADER.pack(length) + body, value, b"}"


# --- validation ----------------------------------------------------------
#
# Each message type maps to {field: (type, required)}.  Unknown fields are
# ignored so that newer peers can add fields without breaking older ones.

Schema = dict[str, dict[str, tuple[type, bool]]]

_OPT_STR = (str, False)
_STR = (str, True)
_INT = (int, True)
_OPT_INT = (int, False)
_OPT_BOOL = (bool, False)
_LIST = (list, True)
_BOOL = (bool, True)

CLIENT_MESSAGES: Schema = {
    "hello": {"name": _STR, "forwarded_for": _OPT_STR, "resume": _OPT_STR},
    "say": {"text": _STR},
    "private": {"to": _STR, "text": _STR},
    "who": {"limit": _OPT_INT, "cursor": _OPT_STR, "prefix": _OPT_STR},
    # Exactly one of after and before: checked by the room, not the schema.
    "history": {"after": _OPT_INT, "before": _OPT_INT, "limit": _OPT_INT},
    "ping": {"token": _OPT_STR},
    "pong": {"token": _OPT_STR},
    "quit": {},
}

SERVER_MESSAGES: Schema = {
    "welcome": {
        "name": _STR,
        "label": _STR,
        "epoch": _OPT_STR,
        "last_seq": _INT,
        "members": _LIST,
        "more": _BOOL,
        "history": _INT,
        "resume": _OPT_STR,
        "count": _OPT_INT,
        "large": _OPT_BOOL,
    },
    "members": {"members": _LIST, "more": _BOOL, "cursor": _OPT_STR, "count": _OPT_INT},
    "presence": {"count": _INT, "large": _OPT_BOOL},
    "message": {"seq": _INT, "from": _STR, "text": _STR, "ts": _INT},
    "join": {"seq": _INT, "member": _STR, "ts": _INT},
    "leave": {"seq": _INT, "member": _STR, "reason": _STR, "ts": _INT},
    "private": {"from": _STR, "to": _STR, "text": _STR, "ts": _INT},
    "history": {"after": _OPT_INT, "before": _OPT_INT, "count": _INT, "missed": _OPT_INT,
                "more": _OPT_BOOL},
    "error": {"code": _STR, "message": _STR},
    "shutdown": {"message": _STR},
    "ping": {"token": _OPT_STR},
    "pong": {"token": _OPT_STR, "degraded": _OPT_STR},
}

# C0 controls other than tab and newline, DEL, and C1 controls could rewrite
# a terminal user's screen; lone surrogates cannot be encoded as UTF-8.
_FORBIDDEN_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _decode_object(payload: bytes) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError("bad_message", "payload is not valid UTF-8") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError and over-long integer literals;
        # RecursionError covers absurdly deep nesting.
        raise MessageError("bad_message", "payload is not valid JSON") from None
    if not isinstance(obj, dict):
        raise MessageError("bad_message", "payload is not a JSON object")
    return obj


def _validate(obj: dict[str, Any], schema: Schema) -> dict[str, Any]:
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise MessageError("bad_message", "message has no string 'type' field")
    fields = schema.get(kind)
    if fields is None:
        raise MessageError("bad_message", f"unknown message type {kind[:40]!r}")
    for field, (expected, required) in fields.items():
        value = obj.get(field)
        if value is None:
            if required:
                raise MessageError("bad_message", f"{kind}: missing field {field!r}")
            continue
        # bool is a subclass of int, but true is not a sequence number.
        if type(value) is not expected:
            raise MessageError(
                "bad_message", f"{kind}: field {field!r} must be {expected.__name__}"
            )
        if expected is str and _FORBIDDEN_CHARS.search(value):
            raise MessageError(
                "bad_message", f"{kind}: field {field!r} contains control characters"
            )
    return obj


def parse_client_message(payload: bytes) -> dict[str, Any]:
    """Validate a payload sent by a client; return the message object.

    Checks types and fields only; room rules (name syntax, text length) are
    the server's and are checked by ``check_name`` and ``check_text``.
    Raises MessageError.
    """
    return _validate(_decode_object(payload), CLIENT_MESSAGES)


def parse_server_message(payload: bytes) -> dict[str, Any]:
    """Validate a payload sent by the server; return the message object.

    Raises MessageError.
    """
    return _validate(_decode_object(payload), SERVER_MESSAGES)


def check_name(name: str) -> None:
    """Raise MessageError('name_invalid') unless ``name`` may be used."""
    if not NAME_PATTERN.fullmatch(name):
        raise MessageError(
            "name_invalid",
            "a name is 1-32 characters: letters, digits, '-', '_' and '.'",
        )
    if name.casefold() in RESERVED_NAMES:
        raise MessageError("name_invalid", f"the name {name!r} is reserved")


# Default_Ignorable_Code_Point (Unicode DerivedCoreProperties.txt) as
# (first, last) ranges, plus blank fillers that render as nothing but are
# letters or symbols: U+2800 BRAILLE PATTERN BLANK (the Hangul fillers are
# already default-ignorable).  unicodedata has no accessor for the property.
_INVISIBLE_RANGES = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x2800, 0x2800), (0x3164, 0x3164), (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)
_INVISIBLE_STARTS = [first for first, _ in _INVISIBLE_RANGES]


def is_visible(char: str) -> bool:
    """Whether one character leaves a mark on screen.

    Invisible: White_Space, format characters (general category Cf),
    Default_Ignorable_Code_Point (Unicode DerivedCoreProperties.txt) and
    blank fillers such as U+2800.  The page applies the same rule.
    """
    if char.isspace() or unicodedata.category(char) == "Cf":
        return False
    code = ord(char)
    i = bisect.bisect_right(_INVISIBLE_STARTS, code) - 1
    return i < 0 or code > _INVISIBLE_RANGES[i][1]


def check_text(text: str) -> None:
    """Raise MessageError('bad_message') unless ``text`` may be sent: 1 to
    MAX_TEXT_CHARS characters, at least one of them visible (``is_visible``)."""
    if not text:
        raise MessageError("bad_message", "message text is empty")
    if not any(map(is_visible, text)):
        raise MessageError("bad_message", "text has nothing visible")
    if len(text) > MAX_TEXT_CHARS:
        raise MessageError(
            "bad_message", f"message text is over {MAX_TEXT_CHARS} characters"
        )
