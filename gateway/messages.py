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


def error_text(code: str, message: str) -> str:
    """An ``error`` message for the browser, encoded by the protocol module."""
    return protocol.encode_payload({"type": "error", "code": code, "message": message}).decode()


def browser_frame(text: str, address: str | None, max_frame: int) -> tuple[str, bytes]:
    """Validate one browser message; return its type and the frame to forward.

    A ``hello`` gets ``forwarded_for`` set to ``address`` (whatever the
    browser put there is replaced, or dropped if the address is unknown).
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


DEFAULT_CLOSE_REASON = "the chat server closed the connection"


def farewell(payload: bytes) -> str | None:
    """If ``payload`` announces the server is closing on us, return its text.

    That is a ``shutdown``, or an ``error`` with a code in
    ``protocol.CLOSING_ERRORS``; the others leave the connection open.
    Payloads that cannot be one are skipped without parsing.  Never raises.
    """
    if b'"shutdown"' not in payload and b'"error"' not in payload:
        return None
    try:
        message = protocol.parse_server_message(payload)
    except protocol.ProtocolError:
        return None
    if message["type"] == "shutdown" or (
            message["type"] == "error" and message["code"] in protocol.CLOSING_ERRORS):
        return message["message"]
    return None
