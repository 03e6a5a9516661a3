"""What the terminal client has shown of the room, with no I/O in it.

Feed a ``Transcript`` what the server sent (``welcome``, room events,
``history`` replies, an ``unknown_seq`` error) and it returns the ``Line``\\ s
to print and, after a rejoin, the ``history`` request to send.  Its rules:

* each room event is shown once: anything at or below the highest ``seq``
  shown is skipped, so replays and live events can overlap freely;
* after a rejoin in the same epoch (protocol v2, PLAN.md) everything is held
  back until the reply to ``history after LAST`` has arrived; then the held
  events and the reply are shown once, in ``seq`` order, so the gap is
  filled with no duplicate and nothing out of order;
* when that reply reports ``missed`` events (more than the server's
  ``--history-replay``), the newest GAP_FILL of them are fetched with
  ``history before``, in pages of MAX_OLDER, still holding everything
  else; then all are shown in order.  A longer gap leaves a *hole*: one
  line says how many events are not shown, where they belong, and that
  ``/history`` shows them; what the server no longer keeps is counted (and
  kept in ``lost``), and a page the room cannot read now
  (``room_unavailable``) leaves a hole too;
* after a rejoin in another epoch the old numbers mean nothing: one line
  says so, no history is asked with them, and what was held for a gap
  still being filled when the link dropped again is dropped (``restarts``
  counts such new starts);
* ``older(n)`` asks for the ``n`` newest events of the newest hole, else
  the ``n`` before the oldest one shown (``history before``); they are
  printed as one block, marked ``(history)``.

Requests to send besides the welcome's (the gap's pages) are collected;
``take_requests()`` hands them over.
"""

from __future__ import annotations

from typing import NamedTuple

from tcpserver import display

# The server's largest `history before` page (PLAN.md, protocol v2).
MAX_OLDER = 200
# Most missed events fetched by hand after a rejoin (five pages): as many
# as the server replays by default, so at most about two screens' worth
# of scrollback per thousand lines; the rest is there for /history.
GAP_FILL = 1000
NEW_EPOCH = ("! the server started a new transcript (its history restarted); "
             "what follows does not continue the lines above")


class Line(NamedTuple):
    """One line to print: ``err`` for stderr, ``dim`` for replayed history."""

    text: str
    err: bool = False
    dim: bool = False


class Transcript:
    """The client's view of the room transcript across reconnections."""

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.last_seq = 0  # highest seq shown in this epoch
        self.oldest_seq: int | None = None  # lowest seq shown in this epoch
        self.replay_until = 0  # events up to the welcome's last_seq are history
        self._gap: dict[int, dict] | None = None  # held while filling a gap
        self._gap_due: int | None = None  # reply frames still to come; None: no reply yet
        self._missed = 0
        self._fill: list[int] | None = None  # [lo, hi]: the hole being fetched
        self._fill_due: int | None = None  # its page's frames still to come
        self._fill_more = False
        self._fill_budget = 0
        self._requests: list[dict] = []
        self.holes: list[tuple[int, int]] = []  # (lo, hi) seqs not shown, oldest first
        # (lo, hi) seqs of a gap the server no longer kept when it was filled
        self.lost: list[tuple[int, int]] = []
        self.restarts = 0  # times the numbers started over (another epoch, unknown_seq)
        self.welcome_last = 0  # the last welcome's last_seq
        self._older: list[dict] = []  # a /history page being read
        self._older_before = 0
        self._older_due = 0
        self._older_more = False
        self.pages = 0  # /history replies completed, to know when one is

    @property
    def filling(self) -> bool:
        """True while a gap after a rejoin is being filled (hold input)."""
        return self._gap is not None

    def welcome(self, msg: dict, rejoin: bool) -> tuple[list[Line], dict | None]:
        """Take a ``welcome``; ``rejoin`` is True after a lost connection.

        Returns the lines to show and the ``history`` request to send (or
        None): in the same epoch a rejoin asks for everything after the
        last ``seq`` shown.
        """
        epoch = msg.get("epoch")
        lines: list[Line] = []
        request = None
        self._older_due = 0
        self._fill, self._fill_due, self._requests = None, None, []
        # A gap being filled when the link dropped again is given up: the
        # same epoch asks again from the last seq shown; another epoch's
        # numbers are not ours (its held events go, as on the page).
        self._gap, self._gap_due, self._missed = None, None, 0
        if rejoin and self.last_seq and epoch is not None and epoch == self.epoch:
            self._gap, self._gap_due, self._missed = {}, None, 0
            request = {"type": "history", "after": self.last_seq}
        else:
            if rejoin and self.last_seq:
                lines.append(Line(NEW_EPOCH, err=True))
            self.last_seq, self.oldest_seq, self.holes, self.lost = 0, None, [], []
            self.replay_until = msg["last_seq"]
            self.restarts += 1
        self.welcome_last = msg["last_seq"]
        self.epoch = epoch
        return lines, request

    def event(self, msg: dict) -> list[Line]:
        """Take a room event (``message``, ``join``, ``leave``)."""
        seq = msg["seq"]
        lines: list[Line] = []
        if self._older_due:
            if seq < self._older_before:
                self._older.append(msg)
                self._older_due -= 1
                return self._older_page() if not self._older_due else []
            # A live event: the server sends none within a reply, so this
            # one came short (retention dropped some while it was sent).
            self._older_due = 0
            lines = self._older_page()
        if self._gap is not None:
            self._gap[seq] = msg
            if self._fill is not None:
                # Fetching the hole: its page's frames are below the request's
                # bound; anything else is live, held until the end (and ends
                # a page that came short, as above).
                if self._fill_due and seq <= self._fill[1]:
                    self._fill_due -= 1
                    if not self._fill_due:
                        return self._fill_page()
                elif self._fill_due:
                    self._fill_due = 0
                    return lines + self._fill_page()
            elif self._gap_due is not None:
                self._gap_due -= 1
                if self._gap_due <= 0:
                    return self._replayed()
            return lines
        return lines + self._show(msg)

    def take_requests(self) -> list[dict]:
        """The requests to send now (pages of a gap being filled)."""
        requests, self._requests = self._requests, []
        return requests

    def history(self, msg: dict) -> list[Line]:
        """Take the header of a ``history`` reply; its events follow."""
        if msg.get("before") is not None:
            fill = self._fill
            if fill is not None and self._fill_due is None and msg["before"] == fill[1] + 1:
                self._fill_due, self._fill_more = msg["count"], bool(msg.get("more"))
                return [] if msg["count"] else self._fill_page()
            if not msg["count"]:
                self.pages += 1
                if self.holes and msg["before"] == self.holes[-1][1] + 1:
                    lo, hi = self.holes.pop()
                    n = hi - lo + 1
                    return [Line(f"* the {_events(n)} from while you were away "
                                 f"{_are(n)} no longer kept")]
                return [Line("* nothing earlier is kept")]
            self._older, self._older_before = [], msg["before"]
            self._older_due, self._older_more = msg["count"], bool(msg.get("more"))
            return []
        if self._gap is not None and self._gap_due is None:
            self._gap_due, self._missed = msg["count"], msg.get("missed") or 0
            if not self._gap_due:
                return self._replayed()
        return []

    def unknown_seq(self) -> list[Line]:
        """Take an ``unknown_seq`` error: our numbers are from another epoch.

        While filling a gap this shows what was held as after a first join.
        """
        if self._gap is None:
            return []
        held, self._gap = self._gap, None
        self._fill, self._fill_due, self._requests = None, None, []
        self.last_seq, self.oldest_seq, self.holes, self.lost = 0, None, [], []
        self.replay_until = self.welcome_last
        self.restarts += 1
        lines = [Line(NEW_EPOCH, err=True)]
        for seq in sorted(held):
            lines += self._show(held[seq])
        return lines

    def unavailable(self) -> list[Line]:
        """Take a ``room_unavailable`` error: while a page of the gap is
        due it is that page's answer (the room cannot read its history now,
        e.g. Redis is away), so what is held is shown and the rest of the
        gap is left as a hole for ``/history``."""
        if self._fill is None or self._fill_due is not None:
            return []
        return self._leave_hole(*self._fill)

    def older(self, count: int) -> dict | None:
        """The request for the ``count`` newest events of the newest hole,
        else for the ``count`` before the oldest shown (capped at
        MAX_OLDER), or None if nothing has been shown yet."""
        if self.holes:
            lo, hi = self.holes[-1]
            return {"type": "history", "before": hi + 1,
                    "limit": max(1, min(count, MAX_OLDER, hi - lo + 1))}
        if self.oldest_seq is None:
            return None
        return {"type": "history", "before": self.oldest_seq,
                "limit": max(1, min(count, MAX_OLDER))}

    def _show(self, msg: dict) -> list[Line]:
        seq = msg["seq"]
        if seq <= self.last_seq:
            return []  # already shown
        self.last_seq = seq
        if self.oldest_seq is None:
            self.oldest_seq = seq
        replay = seq <= self.replay_until
        return [Line(display.room_event(msg, replay), dim=replay)]

    def _replayed(self) -> list[Line]:
        """The ``history after`` reply is in: fetch the hole it left, if any."""
        # The reply skipped seqs last+1 .. last+missed; the welcome's own
        # replay may have brought the newest of them.  What came is the
        # newest part of the gap, so the hole runs up to the oldest of it,
        # also past last+missed when the reply came short (retention
        # dropped its oldest events while it was sent).
        lo = self.last_seq + 1
        held = [s for s in self._gap or {} if s >= lo]
        hi = min(held) - 1 if held else self.last_seq + self._missed
        if hi < lo:
            return self._close_gap([])
        self._fill, self._fill_budget = [lo, hi], GAP_FILL
        self._ask_fill()
        return []

    def _ask_fill(self) -> None:
        lo, hi = self._fill
        self._fill_due = None
        self._requests.append({"type": "history", "before": hi + 1,
                               "limit": min(MAX_OLDER, hi - lo + 1, self._fill_budget)})

    def _fill_page(self) -> list[Line]:
        lo, hi = self._fill
        # The page is the newest of the hole: the run now held below hi
        # narrows it.  Anything held under a break in that run (a page cut
        # short) is asked again with the rest.
        top = hi
        while top >= lo and top in self._gap:
            top -= 1
        for seq in [s for s in self._gap if lo <= s < top]:
            del self._gap[seq]
        self._fill_budget -= hi - top
        fetched = top < hi
        self._fill[1] = top
        if top < lo:
            return self._close_gap([])
        count = top - lo + 1
        if not fetched or not self._fill_more:
            self.lost.append((lo, top))
            return self._close_gap([Line(f"! {_events(count)} from while you were away "
                                         f"{_are(count)} no longer kept by the server",
                                         err=True)])
        if self._fill_budget <= 0:
            return self._leave_hole(lo, top)
        self._ask_fill()
        return []

    def _leave_hole(self, lo: int, hi: int) -> list[Line]:
        """End the fill with seqs ``lo..hi`` left as a hole for ``/history``,
        said in one line where they belong, then what is held."""
        self.holes.append((lo, hi))
        count = hi - lo + 1
        return self._close_gap([Line(f"! {_events(count, 'earlier ')} from while you were away "
                                     f"{_are(count)} not shown (/history shows them)", err=True)])

    def _close_gap(self, lines: list[Line]) -> list[Line]:
        held, self._gap, self._gap_due = self._gap or {}, None, None
        self._fill, self._fill_due = None, None
        for seq in sorted(held):
            lines += self._show(held[seq])
        return lines

    def _older_page(self) -> list[Line]:
        page = _newest_run(self._older, self._older_before - 1)
        self._older = []
        self.pages += 1
        if self.holes and self._older_before == self.holes[-1][1] + 1:
            return self._hole_page(page)
        if not page:
            return [Line("* nothing earlier is kept")]
        if self.oldest_seq is None or page[0]["seq"] < self.oldest_seq:
            self.oldest_seq = page[0]["seq"]
        lines = [Line(f"* {_events(len(page), 'earlier ')}:")]
        lines += [Line(display.room_event(m, True), dim=True) for m in page]
        lines.append(Line("* /history shows more" if self._older_more
                          else "* that is the start of the kept history"))
        return lines

    def _hole_page(self, page: list[dict]) -> list[Line]:
        lo, hi = self.holes.pop()
        page = [m for m in page if lo <= m["seq"] <= hi]
        lines = [Line(f"* {_events(len(page))} from while you were away:")]
        lines += [Line(display.room_event(m, True), dim=True) for m in page]
        hi = page[0]["seq"] - 1 if page else hi
        if hi < lo:
            lines.append(Line("* that closes the gap"))
        elif page and self._older_more:
            self.holes.append((lo, hi))
            lines.append(Line(f"* /history shows more ({hi - lo + 1} from while you were "
                              "away not shown yet)"))
        else:
            lines.append(Line(f"* the {hi - lo + 1} before them {_are(hi - lo + 1)} no longer "
                              "kept"))
        return lines


def _newest_run(events: list[dict], top: int) -> list[dict]:
    """The events ``top``, ``top - 1``, ... down to the first one missing,
    oldest first: a reply that came short (its oldest events dropped by
    retention while it was sent) must not leave an unmarked hole."""
    by_seq = {m["seq"]: m for m in events}
    run: list[dict] = []
    while top in by_seq:
        run.append(by_seq[top])
        top -= 1
    return run[::-1]


def _events(count: int, kind: str = "") -> str:
    """``3 earlier events``, ``1 earlier event``."""
    return f"{count} {kind}event{'' if count == 1 else 's'}"


def _are(count: int) -> str:
    return "is" if count == 1 else "are"
