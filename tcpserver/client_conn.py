"""One connection of the terminal client to the chat server, read through
the codec, and how to tell that the peer is not a chat server at all.

``foreign_greeting`` judges the first bytes a peer sends (sans-I/O): the web
gateway's HTTP reply, another server's banner, or bytes that cannot begin a
frame.  ``Connection`` uses it until the welcome, and raises NotChatServer.
"""

from __future__ import annotations

import asyncio
import logging

from tcpserver import protocol

log = logging.getLogger("tcpserver.client")


class NotChatServer(Exception):
    """The peer answered in something other than the chat protocol.

    ``args[0]`` says what it looked like, e.g. "it answered like an HTTP server".
    """


# What other servers send first, or answer our hello with: enough to name
# the usual wrong port (the web gateway's HTTP port above all).
_GREETINGS = (
    (b"HTTP/", "an HTTP server, such as the web gateway"),
    (b"SSH-", "an SSH server"),
    (b"220", "a mail or FTP server"),
    (b"+OK", "a POP3 server"),
    (b"* OK", "an IMAP server"),
    (b"-ERR", "a Redis server"),
    # A TLS alert record (content type 21, version 3.x): a TLS port.
    (b"\x15\x03", "a TLS server; this client speaks plain TCP"),
)
# Bytes kept from the start of the stream to judge it.
_HEAD_BYTES = 16


def foreign_greeting(head: bytes, complete: bool = False,
                     max_frame_size: int = protocol.MAX_FRAME_SIZE) -> str | None:
    """Say what the peer is if the first bytes it sent cannot be chat frames.

    ``head`` is the start of what arrived before any welcome; ``complete``
    means no more will come.  Returns None while ``head`` may still be the
    start of a frame (or is too short to tell), else a phrase such as
    ``"it answered like an HTTP server, such as the web gateway"``.  No I/O;
    frame lengths are judged by ``protocol.FrameDecoder`` itself.
    """
    for prefix, what in _GREETINGS:
        if head[:len(prefix)] == prefix:
            return f"it answered like {what}"
        if prefix.startswith(head) and head and not complete:
            return None  # wait for the bytes that tell
    probe = protocol.FrameDecoder(max_frame_size)
    probe.receive_data(head)
    try:
        probe.next_payload()
    except protocol.FrameError:
        return "it answered with bytes that are not chat protocol frames"
    if complete and head and len(head) < protocol.HEADER.size:
        return "it answered with bytes that are not chat protocol frames"
    return None


class Connection:
    """One TCP connection to the server, read through the codec."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = protocol.FrameDecoder()
        self.welcomed = False
        self.ended = asyncio.Event()
        self._head = bytearray()  # the first bytes, to recognise a wrong port

    async def send(self, message: dict) -> None:
        """Send one message.  Raises OSError if the connection is gone."""
        self.writer.write(protocol.encode_frame(message))
        await self.writer.drain()

    async def read(self) -> dict | None:
        """Return the next valid server message, or None at end of stream.

        Raises OSError on a reset and FrameError on a bad length; before
        the welcome, NotChatServer if the peer does not speak the protocol.
        """
        while True:
            payload = self.decoder.next_payload()
            if payload is not None:
                try:
                    return protocol.parse_server_message(payload)
                except protocol.MessageError as exc:
                    if not self.welcomed:
                        raise NotChatServer("it answered with something that is not "
                                            "the chat protocol") from None
                    # The stream is still in sync: skip it, as the server would.
                    log.warning("ignored a bad message from the server: %s", exc.message)
                    continue
            data = await self.reader.read(65536)
            if not self.welcomed and len(self._head) < _HEAD_BYTES:
                self._head += data[:_HEAD_BYTES - len(self._head)]
                verdict = foreign_greeting(bytes(self._head), complete=not data)
                if verdict:
                    raise NotChatServer(verdict)
            if not data:
                return None
            self.decoder.receive_data(data)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError as exc:
            log.debug("close: %s", exc)
