"""Did a line sent just before a drop reach the room?  A search of what the
reconnect left unshown, with no I/O in it.

A piped line is sent again after a drop unless its echo was seen, or the
room would miss it.  But the gap fill (``transcript.py``) shows only the
newest of what was missed and leaves the oldest as a *hole*, and in a busy
room the echo of a line sent just before the drop lies exactly there:
sending it again would say it twice.  ``EchoSearch`` reads the hole from
its oldest end, one page at a time (``history before``, MAX_OLDER events,
each page followed by a ``ping`` whose ``pong`` ends it: the server reads
the ping only once the reply is sent, so a page that retention cut short
still ends), and gives one verdict:

* FOUND: the echo is there; the line was said: do not send it again.
* ABSENT: the line was not said (the server dropped it with the
  connection, e.g. while it waited for the rate limit): send it again.
  Reached at the old connection's own ``leave`` (that connection said
  nothing after it), at the first event the server stamped more than
  GRACE_MS after the drop, or past the last unshown ``seq`` it could have.
* UNKNOWN: part of where it could be is gone (retention: "no longer
  kept"), the numbers restarted (another epoch, ``unknown_seq``), or
  MAX_PAGES pages brought no answer.  The caller sends it again (nothing
  piped in is lost) and says it may be there twice.
* AGAIN: the room could not read its history (``room_unavailable``): ask
  again after a pause.

The echo's ``seq`` is above ``floor`` (the highest shown when it was sent)
and at most the ``last_seq`` of the welcome that brought us back (the old
connection had ended by then).  Every event of that stretch that arrived
passed the caller's echo test, so only the transcript's ``holes`` and
``lost`` ranges are searched, oldest first.  What is read is not shown: the
holes stay as they were, for ``/history``.
"""

from __future__ import annotations

from typing import Callable

from tcpserver.transcript import MAX_OLDER, Transcript

FOUND, ABSENT, UNKNOWN, AGAIN = "found", "absent", "unknown", "again"
# At most this many pages (5000 events) per line: the time bound below
# stops far sooner unless the room said over 500 events a second.
MAX_PAGES = 25
# How long after our link dropped (server clock, ms) the server may still
# have stamped our line: a frame it had read waits at most for its next
# token (1 / --msg-rate s; one frame outstanding), and one it had not read
# by then never arrives (whatever ended our link ended its path too).
# 10 s covers a rate of 0.1/s and the error of estimating the server's
# clock from our own receipt times.
GRACE_MS = 10_000


class EchoSearch:
    """The search for one line's echo; see the module docstring.

    ``floor``: the highest seq shown when the line was sent; ``label``: the
    label it was sent as (the old connection's ``leave`` names it);
    ``is_echo(event) -> bool``; ``restarts``: ``Transcript.restarts`` then;
    ``dropped_at``: when the link dropped, in seconds of the caller's
    monotonic clock.
    """

    def __init__(self, floor: int, label: str, is_echo: Callable[[dict], bool],
                 restarts: int, dropped_at: float) -> None:
        self.checked = floor  # the echo is above this seq
        self.label, self.is_echo = label, is_echo
        self.restarts, self.dropped_at = restarts, dropped_at
        self.upper: int | None = None  # the echo is at most this seq
        self.cutoff_ms: float | None = None  # nor stamped after this (server ms)
        self.pages = 0
        self.verdict: str | None = None
        self.why = ""  # for UNKNOWN: what is in the way, in words
        self._asked: tuple[int, int] | None = None  # the page's lo, hi
        self._token = ""
        self._events: list[dict] | None = None  # None: its header is not in yet

    def begin(self, upper: int, clock_ms: float | None) -> None:
        """Set the bounds on the first run after the drop: ``upper`` is the
        welcome's ``last_seq``; ``clock_ms`` is the server's clock minus
        ours (ms; None if no live event came yet, then no time bound)."""
        self.verdict, self._asked = None, None
        if self.upper is None:
            self.upper = upper
            if clock_ms is not None:
                self.cutoff_ms = self.dropped_at * 1000 + clock_ms + GRACE_MS

    @property
    def waiting(self) -> bool:
        """True while a page asked for is not wholly in."""
        return self._asked is not None

    def requests(self, transcript: Transcript) -> list[dict] | None:
        """The frames to send for the next page (``history``, ``ping``), or
        None once ``verdict`` is set."""
        if self.verdict is not None:
            return None
        if transcript.restarts != self.restarts:
            return self._decide(UNKNOWN, "the server started a new transcript")
        seq = self.checked + 1
        unshown = sorted([(lo, hi, False) for lo, hi in transcript.holes]
                         + [(lo, hi, True) for lo, hi in transcript.lost])
        for lo, hi, lost in unshown:
            if hi < seq:
                continue
            if max(lo, seq) > self.upper:
                break
            if lost:
                return self._decide(UNKNOWN, "the server no longer keeps where it would be")
            if self.pages >= MAX_PAGES:
                return self._decide(UNKNOWN, f"not in the first {MAX_PAGES * MAX_OLDER} "
                                             "events of the gap")
            lo = max(lo, seq)
            hi = min(hi, self.upper, lo + MAX_OLDER - 1)
            self.pages += 1
            self._asked, self._events = (lo, hi), None
            self._token = f"echo-search-{self.pages}"
            return [{"type": "history", "before": hi + 1, "limit": hi - lo + 1},
                    {"type": "ping", "token": self._token}]
        return self._decide(ABSENT)

    def take(self, msg: dict) -> bool:
        """Take ``msg`` if it answers the page asked for (its header, its
        events, the pong ending it, or an error instead); False if not."""
        if self._asked is None:
            return False
        lo, hi = self._asked
        kind = msg["type"]
        if kind == "history" and self._events is None and msg.get("before") == hi + 1:
            self._events = []
        elif kind in ("message", "join", "leave") and self._events is not None \
                and msg["seq"] <= hi:
            # Live events are above the whole gap: this one is the page's.
            self._events.append(msg)
        elif kind == "pong" and msg.get("token") == self._token:
            self._asked = None
            if self.verdict is None:  # else given up on: swallowed only
                self._judge(lo, hi, self._events or [])
        elif kind == "error" and self._events is None and msg["code"] in (
                "room_unavailable", "unknown_seq"):
            self._asked = None
            if msg["code"] == "room_unavailable":
                self.pages -= 1  # not read: it does not count
                self._decide(AGAIN)
            else:
                self._decide(UNKNOWN, "the server's numbers are not ours")
        else:
            return False
        return True

    def timed_out(self) -> str:
        """No answer to a page in time: give up (UNKNOWN).  The page stays
        asked, so ``take`` still swallows it (up to its pong) if it comes."""
        self._decide(UNKNOWN, "the server did not answer the search")
        return UNKNOWN

    def _judge(self, lo: int, hi: int, events: list[dict]) -> None:
        whole = True  # lo .. the event at hand all came
        expect = lo
        for msg in sorted(events, key=lambda m: m["seq"]):
            if msg["seq"] != expect:
                whole = False
            expect = msg["seq"] + 1
            if self.is_echo(msg):
                self._decide(FOUND)
                return
            if whole and ((msg["type"] == "leave" and msg["member"] == self.label)
                          or (self.cutoff_ms is not None and msg["ts"] > self.cutoff_ms)):
                self._decide(ABSENT)
                return
        if not whole or expect != hi + 1:
            self._decide(UNKNOWN, "the server no longer keeps where it would be")
            return
        self.checked = hi

    def _decide(self, verdict: str, why: str = "") -> None:
        """Set the verdict; returns None, which ``requests`` passes on."""
        self.verdict, self.why = verdict, why
