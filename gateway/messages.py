"""Between WebSocket text and protocol frames: what may pass, and how.

Pure functions; every frame is built and parsed by ``tcpserver.protocol``.
"""

from __future__ import annotations

from tcpserver import protocol

# RFC 6455: a close frame's reason is at most 123 bytes of UTF-8.
MAX_REASON_BYTES = 123


def close_reason(text: str) -> bytes:
    """Return ``text`` as UTF-8 cut to fit a close frame, never mid-character."""
    return text.encode()[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode()


def error_payload(code: str, message: str) -> bytes:
    """An ``error`` payload (UTF-8 JSON) for the browser, encoded by the
    protocol module."""
    return protocol.encode_payload({"type": "error", "code": code, "message": message})


def browser_frame(text: str, address: str | None, max_frame: int) -> tuple[str, bytes]:
    """Validate one browser message; return its type and the frame to forward.

    A ``hello`` gets ``forwarded_for`` set to ``address`` (whatever the
    browser put there is replaced, or dropped if the address is unknown).
    Any other message is forwarded as the browser wrote it: it passed the
    same parser and checks the server applies, so encoding it again would
    only cost a JSON encode per message.
    Raises protocol.ProtocolError if the message may not be forwarded.
    """
    try:
        payload = text.encode("utf-8")
    except UnicodeEncodeError:
        raise protocol.MessageError("bad_message", "text is not valid UTF-8") from None
    if len(payload) > max_frame:
        raise protocol.MessageError("bad_message", f"message is over {max_frame} bytes")
    message = protocol.parse_client_message(payload)
    kind = message["type"]
    if kind in ("say", "private"):
        protocol.check_text(message["text"])
    elif kind == "hello":
        message.pop("forwarded_for", None)
        if address is not None:
            message["forwarded_for"] = address
        return kind, protocol.encode_frame(message, max_frame)
    return kind, protocol.frame_payload(payload, max_frame)


# WebSocket close codes (RFC 6455 section 7.4.1 and the IANA registry) for a
# chat-server connection that ended: the page tells an orderly close from a
# lost server by the code alone.
SERVICE_RESTART = 1012  # the server said `shutdown` first: it will be back
LOST_SERVER = 1011  # it went away without a word: crash, kill -9, reset
POLICY_VIOLATION = 1008  # it closed us for our conduct (idle, flooding, ...)
TRY_AGAIN_LATER = 1013  # it is full, or our address holds too many seats

LOST_REASON = "lost the chat server: the connection dropped without notice"

# Closing errors that are about the server's capacity, not the client's conduct.
_CAPACITY_ERRORS = frozenset({"server_full", "too_many_connections"})


def farewell(payload: bytes) -> tuple[int, str] | None:
    """If ``payload`` announces the server is closing on us, return the
    WebSocket close (code, reason) it calls for.

    A ``shutdown`` gives (1012, its text); an ``error`` with a code in
    ``protocol.CLOSING_ERRORS`` gives (1013, text) for server_full and
    too_many_connections, else (1008, text).  Other payloads give None, and
    those that cannot be one are skipped without parsing.  Never raises.
    """
    if b'"shutdown"' not in payload and b'"error"' not in payload:
        return None
    try:
        message = protocol.parse_server_message(payload)
    except protocol.ProtocolError:
        return None
    if message["type"] == "shutdown":
        return SERVICE_RESTART, message["message"]
    if message["type"] == "error" and message["code"] in protocol.CLOSING_ERRORS:
        code = TRY_AGAIN_LATER if message["code"] in _CAPACITY_ERRORS else POLICY_VIOLATION
        return code, message["message"]
    return None
