"""The terminal client's input: typed or piped lines, and what each does.

Commands: ``/who [PREFIX]``, ``/msg NAME TEXT``, ``/history [N]`` (the N events,
default 20, before the oldest one shown; first the newest of a gap left
after a reconnect), ``/quit``, ``/help``; ``//text`` sends ``/text``.

A message over ``protocol.MAX_TEXT_CHARS`` (4000) characters, or one the
protocol refuses otherwise (``line_problem``), is not sent.  At the prompt
the line stays in the input line with the reason shown below it, so it can
be shortened; while reconnecting, Enter is refused the same way and the
line waits.  From a pipe the line is skipped with the reason on stderr, and
the lines after it go on (a script gets on with the rest, and the skipped
line is named on stderr).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading

from tcpserver import display, protocol
from tcpserver.client import Outgoing, Reply, Session

log = logging.getLogger(__name__)

HISTORY_DEFAULT = 20
WHO_LIMIT = 100  # names in one /who PREFIX page: a screenful or two


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
        return await _command(session, command.lower(), rest, confirm)
    text = line[1:] if line.startswith("//") else line
    await _submit(session, {"type": "say", "text": text},
                  lambda m: m["type"] == "message" and m["seq"] > session.echo_floor
                  and m["from"] == session.sent_as and m["text"] == text, confirm)
    return True


async def _command(session: Session, command: str, rest: str, confirm: bool) -> bool:
    if command == "quit":
        return False
    if command == "help":
        session.show(display.HELP)
    elif command == "who":
        prefix = session.who_prefix = rest.strip()
        # A prefix asks for one page; a large room pages a plain /who too.
        request = {"type": "who", "prefix": prefix, "limit": WHO_LIMIT} if prefix else {
            "type": "who"}
        await _submit(session, request,
                      lambda m: m["type"] == "members" and (
                          not m["more"] or m.get("cursor") is not None), confirm)
    elif command == "msg":
        to, _, text = rest.strip().partition(" ")
        if not to or not text.strip():
            session.show("! usage: /msg NAME TEXT", err=True)
        else:
            await _submit(session, {"type": "private", "to": to, "text": text},
                          lambda m: m["type"] == "private" and m["from"] == session.label
                          and m["text"] == text, confirm)
    elif command == "history":
        count = rest.strip() or str(HISTORY_DEFAULT)
        if not count.isdigit() or int(count) < 1:
            session.show("! usage: /history [N], N a number of events", err=True)
            return True
        # Aimed once back and the gap filled, and again at each resend after
        # a drop: a hole the fill leaves comes first.
        await session.ready.wait()
        if session.transcript.older(int(count)) is None:
            session.show("* nothing shown yet to go back from")
        else:
            # Done when the whole page is shown, so a next /history goes on from it.
            pages = session.transcript.pages
            await _submit(session, lambda: session.transcript.older(int(count)),
                          lambda m: session.transcript.pages > pages, confirm)
    else:
        session.show(f"! unknown command /{command}: /help lists the commands", err=True)
    return True


async def _submit(session: Session, message: Outgoing, is_reply: Reply,
                  confirm: bool) -> None:
    if confirm:
        await session.deliver(message, is_reply)
        return
    frame = message() if callable(message) else message
    if frame is None:
        return
    try:
        await session.send(frame)
    except OSError as exc:
        # The validator holds lines while reconnecting; this is the drop
        # happening between Enter and the send.
        session.show(f"! not sent: {exc}", err=True)


async def _converse(session: Session, next_line, confirm: bool) -> None:
    """Carry out lines from ``await next_line()`` (None: no more input)
    until one quits or input ends; then quit."""
    while True:
        line = await next_line()
        if line is None or not await act(session, line, confirm):
            break
    await session.quit()


def _line_validator(session: Session, buffer):
    """``buffer()`` gives the prompt's input buffer once the prompt exists."""
    from prompt_toolkit.application.current import get_app_or_none
    from prompt_toolkit.buffer import ValidationState
    from prompt_toolkit.validation import ValidationError, Validator

    class LineValidator(Validator):
        """Refuses Enter on a line that cannot be sent now, so it stays."""

        waiting: asyncio.Task | None = None

        def validate(self, document) -> None:
            problem = line_problem(document.text)
            if problem:
                raise ValidationError(document.cursor_position,
                                      f"not sent: {problem}; edit the line, then Enter")
            if not session.ready.is_set() and _sends(document.text):
                if self.waiting is None or self.waiting.done():
                    self.waiting = asyncio.ensure_future(self._forget_when_back())
                # Back but still fetching what was missed: not "not connected".
                why = ("catching up on what you missed" if session.transcript.filling
                       and session.conn is not None and not session.conn.ended.is_set()
                       else "not connected: reconnecting")
                raise ValidationError(document.cursor_position,
                                      f"{why}; the line is kept, press Enter again when back")

        async def _forget_when_back(self) -> None:
            # prompt_toolkit asks a validator again only once the text
            # changes; the connection coming back must count as a change.
            await session.ready.wait()
            buf = buffer()
            buf.validation_state = ValidationState.UNKNOWN
            buf.validation_error = None
            app = get_app_or_none()
            if app is not None:
                app.invalidate()

    return LineValidator()


def _sends(line: str) -> bool:
    """Whether ``line`` needs the server (everything but blank lines,
    /help and /quit)."""
    line = display.clean_outgoing(line).strip()
    command = line[1:].partition(" ")[0].lower() if line.startswith("/") else None
    return bool(line) and (line.startswith("//") or command not in ("help", "quit"))


async def interactive(session: Session) -> None:
    """Prompt for lines in a terminal until /quit, Ctrl-D or Ctrl-C."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout

    prompt: PromptSession = PromptSession(
        lambda: f"[{display.clean(session.label)}]> ",
        validator=_line_validator(session, lambda: prompt.default_buffer),
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


async def piped(session: Session) -> None:
    """Send stdin line by line until end of input, waiting out reconnects."""
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
