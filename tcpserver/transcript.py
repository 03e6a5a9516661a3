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
* after a rejoin in another epoch the old numbers mean nothing: one line
  says so and no history is asked with them;
* ``older(n)`` asks for the ``n`` events before the oldest one shown
  (``history before``); they are printed as one block, marked ``(history)``.
"""

from __future__ import annotations

from typing import NamedTuple

from tcpserver import display

# The server's largest `history before` page (PLAN.md, protocol v2).
MAX_OLDER = 200
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
        self._welcome_last = 0
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
        if rejoin and self.last_seq and epoch is not None and epoch == self.epoch:
            self._gap, self._gap_due, self._missed = {}, None, 0
            self._welcome_last = msg["last_seq"]
            request = {"type": "history", "after": self.last_seq}
        else:
            if rejoin and self.last_seq:
                lines.append(Line(NEW_EPOCH, err=True))
            self.last_seq, self.oldest_seq = 0, None
            self.replay_until = msg["last_seq"]
        self.epoch = epoch
        return lines, request

    def event(self, msg: dict) -> list[Line]:
        """Take a room event (``message``, ``join``, ``leave``)."""
        seq = msg["seq"]
        if self._older_due and seq < self._older_before:
            self._older.append(msg)
            self._older_due -= 1
            return self._older_page() if not self._older_due else []
        if self._gap is not None:
            self._gap[seq] = msg
            if self._gap_due is not None:
                self._gap_due -= 1
                if self._gap_due <= 0:
                    return self._close_gap()
            return []
        return self._show(msg)

    def history(self, msg: dict) -> list[Line]:
        """Take the header of a ``history`` reply; its events follow."""
        if msg.get("before") is not None:
            if not msg["count"]:
                self.pages += 1
                return [Line("* nothing earlier is kept")]
            self._older, self._older_before = [], msg["before"]
            self._older_due, self._older_more = msg["count"], bool(msg.get("more"))
            return []
        if self._gap is not None and self._gap_due is None:
            self._gap_due, self._missed = msg["count"], msg.get("missed") or 0
            if not self._gap_due:
                return self._close_gap()
        return []

    def unknown_seq(self) -> list[Line]:
        """Take an ``unknown_seq`` error: our numbers are from another epoch.

        While filling a gap this shows what was held as after a first join.
        """
        if self._gap is None:
            return []
        held, self._gap = self._gap, None
        self.last_seq, self.oldest_seq = 0, None
        self.replay_until = self._welcome_last
        lines = [Line(NEW_EPOCH, err=True)]
        for seq in sorted(held):
            lines += self._show(held[seq])
        return lines

    def older(self, count: int) -> dict | None:
        """The request for the ``count`` events before the oldest shown
        (capped at MAX_OLDER), or None if nothing has been shown yet."""
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

    def _close_gap(self) -> list[Line]:
        held, self._gap, self._gap_due = self._gap or {}, None, None
        lines = []
        # The reply skipped seqs last+1 .. last+missed; the welcome's own
        # replay may still have brought some of them.
        first, end = self.last_seq, self.last_seq + self._missed
        lost = self._missed - sum(1 for seq in held if first < seq <= end)
        if lost:
            lines.append(Line(f"! {lost} events from while you were away were not "
                              "replayed (older than the server keeps, or more than it "
                              "replays at once)", err=True))
        for seq in sorted(held):
            lines += self._show(held[seq])
        return lines

    def _older_page(self) -> list[Line]:
        page = sorted(self._older, key=lambda m: m["seq"])
        self._older = []
        self.pages += 1
        if self.oldest_seq is None or page[0]["seq"] < self.oldest_seq:
            self.oldest_seq = page[0]["seq"]
        lines = [Line(f"* {len(page)} earlier events:")]
        lines += [Line(display.room_event(m, True), dim=True) for m in page]
        lines.append(Line("* /history shows more" if self._older_more
                          else "* that is the start of the kept history"))
        return lines
