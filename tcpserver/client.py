"""The terminal client: ``chatroom --name=bob --port=N [--host=H]``.

In a terminal (stdin and stdout both TTYs) a prompt_toolkit prompt
``[bob@127.0.0.1]> `` stays on the last line while the room scrolls above it,
so an incoming message never garbles what is being typed.  Otherwise every
line read from stdin is sent (commands work too; empty lines are skipped),
each one only after the server has echoed the one before, resending it if
it was rate-limited; at end of input the client quits and exits once the
server has closed the connection, so nothing piped in is lost.

What is shown, one line per event, is described in ``tcpserver/display.py``:
room lines on stdout, diagnostics (``! ...``) on stderr.

Commands: ``/who``, ``/msg NAME TEXT``, ``/quit``, ``/help``; ``//text``
sends ``/text``.  A message over ``protocol.MAX_TEXT_CHARS`` (4000)
characters is not sent: at the prompt it stays in the input line with the
limit shown, so it can be shortened; from a pipe it is skipped with the
limit on stderr.

Exit status: 0 after ``/quit``, end of input or a server shutdown; 1 if the
server cannot be reached, is not a chat server (say, the web gateway's HTTP
port) or the connection is lost; 2 if the server refuses the name.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
from typing import Callable

from tcpserver import display, protocol
from tcpserver.cli import DEFAULT_PORT

log = logging.getLogger(__name__)

# A reachable server accepts within milliseconds; 5 s allows a slow link
# without leaving someone who typed the wrong port waiting.
CONNECT_TIMEOUT = 5.0
# The server's own default hello timeout: no welcome by then means none.
WELCOME_TIMEOUT = 10.0
# After quit, how long to wait for our leave, and then for the close.
QUIT_WAIT = 2.0
# How long a piped line waits for its echo before we give up on it.
ECHO_TIMEOUT = 10.0
# After a rate_limited error, wait this long before resending: the server
# refills at least one token a second unless configured unusually low.
RATE_LIMIT_PAUSE = 1.0
MAX_ATTEMPTS = 30

EXIT_OK, EXIT_LOST, EXIT_REFUSED = 0, 1, 2
_NAME_ERRORS = ("name_taken", "name_invalid", "bad_message")

Reply = Callable[[dict], bool]


class JoinRefused(protocol.RemoteProtocolError):
    """The server answered hello with an error (``code``, ``message``)."""


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


class Session:
    """One joined connection: reads and shows server messages, sends ours."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 show: display.Show) -> None:
        self.reader, self.writer, self.show = reader, writer, show
        self.decoder = protocol.FrameDecoder()
        self.label = ""
        self.last_seq = 0  # highest room seq shown: skip anything at or below
        self.replay_until = 0  # events up to welcome's last_seq are history
        self.quiet: set[str] = set()  # error codes handled without a line
        self.shutdown = False
        self.quitting = False
        self.closed = asyncio.Event()
        self._members: list = []
        self._head = bytearray()  # the first bytes, to recognise a wrong port
        self._waiter: tuple[asyncio.Future, Reply] | None = None

    async def send(self, message: dict) -> None:
        """Send one message.  Raises OSError if the connection is gone."""
        self.writer.write(protocol.encode_frame(message))
        await self.writer.drain()

    async def _read(self) -> dict | None:
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
                    if not self.label:
                        raise NotChatServer("it answered with something that is not "
                                            "the chat protocol") from None
                    # The stream is still in sync: skip it, as the server would.
                    log.warning("ignored a bad message from the server: %s", exc.message)
                    continue
            data = await self.reader.read(65536)
            if not self.label and len(self._head) < _HEAD_BYTES:
                self._head += data[:_HEAD_BYTES - len(self._head)]
                verdict = foreign_greeting(bytes(self._head), complete=not data)
                if verdict:
                    raise NotChatServer(verdict)
            if not data:
                return None
            self.decoder.receive_data(data)

    async def join(self, name: str) -> None:
        """Say hello and read up to the welcome.

        Raises JoinRefused, NotChatServer, ConnectionError (closed before
        the welcome), OSError or FrameError.
        """
        await self.send({"type": "hello", "name": name})
        while True:
            msg = await self._read()
            if msg is None:
                raise ConnectionError("the server closed the connection")
            if msg["type"] == "error":
                raise JoinRefused(msg["code"], msg["message"])
            if msg["type"] == "ping":
                await self._pong(msg)
            elif msg["type"] == "welcome":
                break
            else:
                log.debug("ignored %s before welcome", msg["type"])
        self.label = msg["label"]
        self.replay_until = msg["last_seq"]
        self.show(f"* joined as {display.clean(self.label)}")
        self._members = list(msg["members"])
        if not msg["more"]:
            self._show_members()

    async def receive(self) -> None:
        """Handle server messages until the connection ends, then set ``closed``."""
        try:
            while (msg := await self._read()) is not None:
                await self._handle(msg)
        except (OSError, protocol.FrameError) as exc:
            log.debug("connection lost: %s", exc)
        finally:
            self.closed.set()
            if self._waiter and not self._waiter[0].done():
                self._waiter[0].set_result("closed")

    async def _handle(self, msg: dict) -> None:
        kind = msg["type"]
        if kind in ("message", "join", "leave"):
            if msg["seq"] <= self.last_seq:
                return  # already shown
            self.last_seq = msg["seq"]
            replay = msg["seq"] <= self.replay_until
            self.show(display.room_event(msg, replay), dim=replay)
        elif kind == "private":
            self.show(display.private(msg, self.label))
        elif kind == "members":
            self._members.extend(msg["members"])
            if not msg["more"]:
                self._show_members()
        elif kind == "error":
            if msg["code"] in self.quiet:
                log.debug("server: %s", msg["message"])
            else:
                self.show(display.error(msg["code"], msg["message"]), err=True)
        elif kind == "shutdown":
            self.shutdown = True
            self.show(display.error("shutdown", msg["message"]), err=True)
        elif kind == "ping":
            await self._pong(msg)
        waiter = self._waiter
        if waiter and not waiter[0].done():
            if kind == "error":
                waiter[0].set_result(msg["code"])
            elif waiter[1](msg):
                waiter[0].set_result("ok")

    def _show_members(self) -> None:
        self.show(display.members(self._members))
        self._members = []

    async def _pong(self, ping: dict) -> None:
        reply = {"type": "pong"}
        if ping.get("token") is not None:
            reply["token"] = ping["token"]
        try:
            await self.send(reply)
        except OSError as exc:
            log.debug("pong not sent: %s", exc)

    async def deliver(self, message: dict, is_reply: Reply,
                      timeout: float = ECHO_TIMEOUT) -> bool:
        """Send ``message`` until the frame ``is_reply`` accepts arrives.

        Returns True if it did; False after another error (shown), a lost
        connection or no reply within ``timeout``.  A rate-limited frame is
        resent after a pause; while a rate-limit streak lasts the server
        drops frames without another error, so a resent frame with no reply
        is resent again.
        """
        resent = False
        for _ in range(MAX_ATTEMPTS):
            if self.closed.is_set():
                return False
            future = asyncio.get_running_loop().create_future()
            self._waiter = (future, is_reply)
            try:
                await self.send(message)
                result = await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                result = "timeout"
            except OSError:
                return False  # the receiver notices the loss
            finally:
                self._waiter = None
            if result == "ok":
                return True
            if result == "rate_limited" or (result == "timeout" and resent):
                resent = True
                await asyncio.sleep(RATE_LIMIT_PAUSE)
                continue
            if result == "timeout":
                self.show(f"! no reply from the server within {timeout:g} s", err=True)
            return False
        return False

    async def quit(self) -> None:
        """Send quit until our leave comes back, then wait for the close.

        Waits at most QUIT_WAIT for each.  The server lets quit through its
        rate limit, so the room sees us leave rather than hang up.
        """
        self.quitting = True
        if await self.deliver({"type": "quit"}, lambda m: m["type"] == "leave"
                              and m["member"] == self.label, timeout=QUIT_WAIT):
            # The server closes once our leave is sent: when it has, nothing
            # before it is left unshown.
            try:
                await asyncio.wait_for(self.closed.wait(), QUIT_WAIT)
            except asyncio.TimeoutError:
                log.debug("the server did not close within %g s of our leave", QUIT_WAIT)


def outgoing_text(line: str) -> str | None:
    """The message text that ``line`` would send: its text for a message or
    ``/msg NAME TEXT``, None for blank lines and other commands."""
    line = display.clean_outgoing(line)
    if not line.strip():
        return None
    if line.startswith("//"):
        return line[1:]
    if line.startswith("/"):
        command, _, rest = line[1:].partition(" ")
        if command.lower() != "msg":
            return None
        to, _, text = rest.strip().partition(" ")
        return text if to and text.strip() else None
    return line


def line_problem(line: str) -> str | None:
    """Why ``line`` cannot be sent as typed (e.g. over MAX_TEXT_CHARS), or None."""
    text = outgoing_text(line)
    if text is None:
        return None
    if len(text) > protocol.MAX_TEXT_CHARS:
        return (f"a message is at most {protocol.MAX_TEXT_CHARS} characters and "
                f"this one has {len(text)}")
    try:
        protocol.check_text(text)
    except protocol.MessageError as exc:
        return exc.message
    return None


async def act(session: Session, line: str, confirm: bool) -> bool:
    """Carry out one input line: a command or a message.

    With ``confirm``, wait until the server has echoed what was sent.  A
    message that breaks the protocol's rules (``line_problem``) is not
    sent; the reason is shown on stderr.  Returns False when the line asks
    to quit.
    """
    line = display.clean_outgoing(line)
    if not line.strip():
        return True
    problem = line_problem(line)
    if problem:
        session.show(f"! not sent: {problem}; skipped", err=True)
        return True
    if line.startswith("/") and not line.startswith("//"):
        command, _, rest = line[1:].partition(" ")
        command = command.lower()
        if command == "quit":
            return False
        if command == "help":
            session.show(display.HELP)
        elif command == "who":
            await _submit(session, {"type": "who"},
                          lambda m: m["type"] == "members" and not m["more"], confirm)
        elif command == "msg":
            to, _, text = rest.strip().partition(" ")
            if not to or not text.strip():
                session.show("! usage: /msg NAME TEXT", err=True)
            else:
                await _submit(session, {"type": "private", "to": to, "text": text},
                              lambda m: m["type"] == "private" and m["from"] == session.label
                              and m["text"] == text, confirm)
        else:
            session.show(f"! unknown command /{command}: /help lists the commands", err=True)
        return True
    text = line[1:] if line.startswith("//") else line
    await _submit(session, {"type": "say", "text": text},
                  lambda m: m["type"] == "message" and m["from"] == session.label
                  and m["text"] == text, confirm)
    return True


async def _submit(session: Session, message: dict, is_reply: Reply, confirm: bool) -> None:
    if confirm:
        await session.deliver(message, is_reply)
        return
    try:
        await session.send(message)
    except OSError as exc:
        log.debug("not sent: %s", exc)  # the receiver notices the loss


async def _converse(session: Session, next_line, confirm: bool) -> None:
    """Carry out lines from ``await next_line()`` (None: no more input)
    until one quits, input ends or the server closes; then quit."""
    closed = asyncio.ensure_future(session.closed.wait())
    try:
        while True:
            ask = asyncio.ensure_future(next_line())
            done, _ = await asyncio.wait({ask, closed}, return_when=asyncio.FIRST_COMPLETED)
            if closed in done:
                ask.cancel()
                await asyncio.gather(ask, return_exceptions=True)
                return
            line = ask.result()
            if line is None or not await act(session, line, confirm):
                break
        await session.quit()
    finally:
        closed.cancel()


def _line_validator():
    from prompt_toolkit.validation import ValidationError, Validator

    class LineValidator(Validator):
        """Refuses Enter on a line that cannot be sent, so it stays to be edited."""

        def validate(self, document) -> None:
            problem = line_problem(document.text)
            if problem:
                raise ValidationError(document.cursor_position,
                                      f"not sent: {problem}; edit the line, then Enter")

    return LineValidator()


async def _interactive(session: Session) -> None:
    """Prompt for lines in a terminal until /quit, Ctrl-D or the server closes."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout

    prompt: PromptSession = PromptSession(f"[{display.clean(session.label)}]> ",
                                          validator=_line_validator(),
                                          validate_while_typing=False)

    async def next_line() -> str | None:
        try:
            return await prompt.prompt_async()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C
            return None

    session.show("* /help lists the commands")
    # raw=True lets our own (sanitized) dim escape through to the terminal.
    with patch_stdout(raw=True):
        await _converse(session, next_line, confirm=False)


async def _piped(session: Session) -> None:
    """Send stdin line by line until end of input or the server closes."""
    session.quiet.add("rate_limited")  # deliver() resends instead
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    _read_stdin_lines(asyncio.get_running_loop(), lines)
    await _converse(session, lines.get, confirm=True)


def _read_stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    """Feed stdin's lines, then None, into ``queue`` from a daemon thread.

    A thread works for pipes, files and terminals alike, and a daemon
    thread blocked in read() does not keep the process alive at exit.  It
    uses os.read, not sys.stdin: a daemon thread inside the buffered reader
    holds its lock, and the interpreter aborts when it finds it held at exit.
    """
    def put(item: str | None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            pass  # the loop is closed: the client is exiting

    def pump() -> None:
        pending = b""
        try:
            while data := os.read(sys.stdin.fileno(), 65536):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    put(line.rstrip(b"\r").decode("utf-8", "replace"))
        except (OSError, ValueError) as exc:
            log.warning("cannot read stdin: %s", exc)
        finally:
            if pending:
                put(pending.decode("utf-8", "replace"))
            put(None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, ConnectionRefusedError) or "refused" in str(exc).lower():
        # One address family or several: open_connection may merge errors.
        return "connection refused"
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).lower()


async def _main(name: str, host: str, port: int) -> int:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                CONNECT_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as exc:
        print(f"chatroom: cannot reach the chat server at {where} ({_why(exc)})",
              file=sys.stderr)
        return EXIT_LOST
    terminal = os.isatty(0) and os.isatty(1)
    session = Session(reader, writer, display.printer(terminal))
    receiver = None
    try:
        try:
            await asyncio.wait_for(session.join(name), WELCOME_TIMEOUT)
        except JoinRefused as exc:
            print(f"chatroom: cannot join as {name!r}: {display.clean(exc.message)} "
                  f"({display.clean(exc.code)})", file=sys.stderr)
            return EXIT_REFUSED if exc.code in _NAME_ERRORS else EXIT_LOST
        except NotChatServer as exc:
            print(f"chatroom: {where} is not a chat server port ({exc.args[0]}); "
                  f"the chat port is --port, default {DEFAULT_PORT}", file=sys.stderr)
            return EXIT_LOST
        except asyncio.TimeoutError:
            print(f"chatroom: no welcome from {where} within {WELCOME_TIMEOUT:g} s; is it "
                  f"the chat port? (--port, default {DEFAULT_PORT})", file=sys.stderr)
            return EXIT_LOST
        except (OSError, protocol.FrameError) as exc:
            print(f"chatroom: the chat server at {where} did not let us in ({exc})",
                  file=sys.stderr)
            return EXIT_LOST
        receiver = asyncio.ensure_future(session.receive())
        await (_interactive(session) if terminal else _piped(session))
        if session.quitting:
            return EXIT_OK
        session.show("! the server closed the connection", err=True)
        return EXIT_OK if session.shutdown else EXIT_LOST
    finally:
        if receiver is not None:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def run(name: str, host: str, port: int) -> int:
    """Join the room at ``host:port`` as ``name`` from this terminal or pipe.

    Returns the exit status (see the module docstring); never raises for
    network trouble, which is reported in one line on stderr.
    """
    logging.basicConfig(level=logging.WARNING, format="chatroom: %(message)s")
    try:
        return asyncio.run(_main(name, host, port))
    except KeyboardInterrupt:
        return 130
