"""What the terminal client sends again after a drop: a ``/history`` cut
off is aimed anew once back.  A real server subprocess, the client as a
piped subprocess and a relay that cuts its link (test_client_gap_faults)."""

from __future__ import annotations

from test_client_gap_faults import bob_behind
from test_client_gaps import SERVER, Member
from test_client_resume import RECONNECTING

from tcpserver import transcript

HOLE_LINE = (r"^! (\d+) earlier events from while you were away are not shown "
             r"\(/history shows them\)$")


def busy_while_away(relay, bob, alice: Member, count: int = transcript.GAP_FILL + 50) -> None:
    """With bob's link cut (and held down), alice says ``count`` lines;
    then bob may come back."""
    bob.expect(RECONNECTING, key="err")
    alice.read_until(lambda m: m["type"] == "leave" and m["member"] == "bob@127.0.0.1")
    for n in range(count):
        alice.say(f"away {n:04d}")
    alice.read_until(lambda m: m.get("text") == f"away {count - 1:04d}")
    relay.stalled = False
    relay.held = False


def test_slash_history_cut_off_by_a_drop_is_aimed_at_the_hole_once_back(
        start_server, piped, open_client, request, tmp_path):
    # /history is sent, and the link drops before its reply; meanwhile the
    # room says more than the fill fetches.  Once back, the request must be
    # aimed anew, at the hole (before: it went out unchanged, before the
    # oldest line shown before the drop, and said nothing earlier is kept).
    server = start_server(*SERVER, f"--db={tmp_path / 'room.db'}")
    relay, _, bob, alice = bob_behind(server, b'"before"', request, piped, open_client,
                                      gated=False)
    bob.type("/history 30")
    assert relay.tripped.wait(20), "the client did not ask for history"
    busy_while_away(relay, bob, alice)
    hole = int(bob.expect(HOLE_LINE, key="err", timeout=30).group(1))
    bob.expect(rf"^\* /history shows more \({hole - 30} from while you were away not shown "
               r"yet\)$", timeout=20)
    assert bob.finish() == 0
    assert "nothing earlier is kept" not in bob.text()
    assert "Traceback" not in bob.text("err")
