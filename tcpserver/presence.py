"""Who is in the room: the presence interface the room's rules use.

``rules.Room`` keeps the members connected to this process; a ``Presence``
answers for the whole room, which with Redis spans several processes.  The
rules ask it to claim a name (``claim``, answered through a callback, so a
Redis round trip fits the same code path), to release one, and how many
members the room has.  ``MemoryPresence`` is the single-process room: the
local members are everyone, and every answer comes at once.
``tcpserver.redispresence.RedisPresence`` is the room shared through Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from tcpserver.client_state import Client
    from tcpserver.rules import Room


@dataclass(frozen=True)
class Claim:
    """The answer to a claim of a name.

    ``error``: None when the name is now the claimant's, else the error code
    to answer the hello with (``name_taken``, ``room_unavailable``).
    ``count``: members in the room, the claimant included.  ``arrays``:
    every member's label ordered by casefolded name when the room is small,
    encoded once for every claim it answers (``roster.encode_arrays``;
    None: use this process's members).  ``replaced``: the label of a
    member on another process whose name the claimant took back with its
    resume token (its ``leave`` is the claimant's process's to publish).
    ``partial``: the whole room's list could not be read (Redis failed
    after the claim), so ``arrays`` is None and this process's members
    stand in; the room then tells clients to fetch the list again.
    """

    error: str | None = None
    count: int = 0
    arrays: list[bytes] | None = None
    replaced: str | None = None
    partial: bool = False


class Presence:
    """The whole room's members, as the rules see them."""

    # True when members may be on other processes (who and private ask
    # the presence instead of the local members).
    distributed = False

    def bind(self, room: Room) -> None:
        """Called once by the Room that uses this presence."""
        self.room = room

    def count(self) -> int:
        """Members in the whole room."""
        return len(self.room.members)

    def claim(self, client: Client, key: str, label: str, token: str, resume: str | None,
              done: Callable[[Claim], None]) -> None:
        """Claim casefolded name ``key`` for ``client`` (``label``, resume
        secret ``token``); ``resume`` is the secret the hello presented.
        ``done(claim)`` is called once, maybe before this returns."""
        done(Claim(count=len(self.room.members) + 1))

    def release(self, client: Client) -> None:
        """``client`` left: its name is free (unless already taken back)."""

    def close(self) -> None:
        """The process stops: its members leave the room."""


class MemoryPresence(Presence):
    """One process holds the whole room (the default)."""
