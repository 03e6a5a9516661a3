r"""What the terminal client shows: one line per event.

Room lines go to stdout::

    * joined as bob@127.0.0.1
    * in the room (2): alice@127.0.0.1, bob@127.0.0.1      on joining, and /who
    [12:02:50] (history) alice@127.0.0.1: earlier           replayed on joining
    [12:03:05] alice@127.0.0.1: hello                       a room message
    [12:03:06] * carol@10.0.0.5 joined
    [12:03:09] * carol@10.0.0.5 hung up                     leave, reason in words
    [12:03:11] (private) alice@127.0.0.1 -> you: psst
    [12:03:12] (private) you -> alice@127.0.0.1: hi

so a script can take ``^\[..:..:..\] (\S+): (.*)$`` as a live room message.
Times are the server's timestamps in local time.  Line breaks inside a
message show as ``↵`` and control characters as U+FFFD, so an event is
always exactly one line.  Diagnostics start with ``!`` and go to stderr::

    ! rate_limited: slow down: at most 10 messages a second
    ! shutdown: the server is shutting down
    ! the server is restarting or stopping; reconnecting (Ctrl-C to stop)

and after a rejoin ``* reconnected as bob@127.0.0.1 (3 in the room)`` on
stdout, then the events missed meanwhile, each once.

The functions here build lines and do no I/O; ``printer`` makes the one
function that prints them.
"""

from __future__ import annotations

import os
import re
import sys
import time
import unicodedata
from typing import Callable

HELP = """\
commands:
  /who [PREFIX]    list the members of the room (whose name starts with PREFIX)
  /msg NAME TEXT   send TEXT to NAME only
  /history [N]     show the N (default 20) events before the oldest shown
                   (first those of a gap not shown after a reconnect)
  /quit            leave the room (Ctrl-D does too)
  /help            show this help
  //text           send a message that starts with '/'"""

Show = Callable[..., None]  # show(line, err=False, dim=False)

# A human phrase for each leave reason in PROTOCOL.md.
LEAVE_PHRASES = {
    "quit": "left",
    "hung_up": "hung up",
    "timed_out": "timed out",
    "slow_reader": "was evicted (too slow reading)",
    "flooding": "was disconnected for flooding",
    "protocol_error": "was disconnected for a protocol error",
    "shutdown": "left (server shutdown)",
    "replaced": "left (replaced by a new connection)",
}

# The protocol already forbids C0/C1 controls in strings, but a terminal is
# rewritten by any escape that slips through, so the client never trusts
# that alone.  Bidi overrides can make a line read differently than it is.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# Line breaks inside a message would split one event over several lines.
_BREAKS = re.compile("\r\n|[\n\r\u2028\u2029\x85]")
NEWLINE_MARK = "\u21b5"  # ↵


def clean(text: str) -> str:
    """Return ``text`` safe for one terminal line.

    Line breaks become ``↵``, other control and bidi-override characters
    become U+FFFD; tabs are kept.
    """
    text = _BREAKS.sub(NEWLINE_MARK, text)
    return _UNSAFE.sub("\ufffd", text)


def clean_outgoing(text: str) -> str:
    """Return ``text`` without the control characters the protocol forbids.

    Keeps tab; used on what the user typed or piped before it is sent.
    """
    return "".join(
        ch for ch in text
        if ch == "\t" or not (unicodedata.category(ch) == "Cc" or "\ud800" <= ch <= "\udfff")
    )


def clock(ts_ms: int | None = None) -> str:
    """Return ``[HH:MM:SS]`` in local time for a server timestamp (ms), or now."""
    seconds = time.time() if ts_ms is None else ts_ms / 1000
    return time.strftime("[%H:%M:%S]", time.localtime(seconds))


def room_event(msg: dict, replay: bool = False) -> str | None:
    """Return the line for a ``message``, ``join`` or ``leave`` event.

    ``replay`` marks an event replayed from history with ``(history)``.
    Returns None for any other type.
    """
    head = clock(msg["ts"]) + (" (history)" if replay else "")
    kind = msg["type"]
    if kind == "message":
        return f"{head} {clean(msg['from'])}: {clean(msg['text'])}"
    if kind == "join":
        return f"{head} * {clean(msg['member'])} joined"
    if kind == "leave":
        reason = msg["reason"]
        phrase = LEAVE_PHRASES.get(reason, f"left ({clean(reason)})")
        return f"{head} * {clean(msg['member'])} {phrase}"
    return None


def private(msg: dict, me: str) -> str:
    """Return the line for a ``private`` message; ``me`` is our own label."""
    sender = "you" if msg["from"] == me else clean(msg["from"])
    recipient = "you" if msg["to"] == me else clean(msg["to"])
    return f"{clock(msg['ts'])} (private) {sender} -> {recipient}: {clean(msg['text'])}"


def members(labels: list[str], total: int | None = None, more: bool = False,
            prefix: str = "") -> str:
    """Return the ``* in the room (N): a, b`` line for a member list.

    ``more`` marks one page of a larger list (``total`` members in the
    room): ``* in the room (1200), the first 100: a, b and more (...)``.
    ``prefix`` names the ``/who PREFIX`` the list answers.
    """
    names = ", ".join(clean(str(x)) for x in labels)
    head = f"* names starting with {clean(prefix)!r}" if prefix else "* in the room"
    if not more:
        return f"{head} ({len(labels)}): {names}"
    count = "?" if total is None else total
    return (f"{head} ({count} in the room), the first {len(labels)}: {names} and more "
            "(/who PREFIX lists names starting with PREFIX)")


def error(code: str, message: str) -> str:
    """Return the ``! code: message`` line for a server error."""
    return f"! {clean(code)}: {clean(message)}"


def printer(terminal: bool) -> Show:
    """Return ``show(line, err=False, dim=False)``, which prints one line.

    ``err`` sends it to stderr; ``dim`` (history) dims it on a terminal.
    """
    def show(line: str, err: bool = False, dim: bool = False) -> None:
        if terminal and dim:
            line = f"\x1b[2m{line}\x1b[0m"
        try:
            print(line, file=sys.stderr if err else sys.stdout, flush=True)
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): go on without output.
            sys.stdout = open(os.devnull, "w")
    return show
