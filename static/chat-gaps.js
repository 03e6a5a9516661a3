/* History before: one request at a time, for scrolling back and for gaps.
 * A gap is what a reconnect's `history after` could not replay (more
 * missed than the server's --history-replay, PROTOCOL.md): a marker stands
 * in the transcript where those events belong, says how many are not
 * shown, and on a click loads them with `history before`, newest first,
 * inserting each page right below itself and shrinking until the gap is
 * closed (it then goes), or until the server says the rest is no longer
 * kept.  Loading is by click only: a marker that loaded as it scrolled
 * into view would fill every gap the moment it was made, since a new gap
 * sits at the end of the transcript, where the reader is.
 * Part of the chat room page; the parts share one namespace, window.Chat
 * (chat-base.js makes it).  No HTML is ever built from chat text:
 * everything from the wire goes in through textContent. */
(function () {
  "use strict";

  var C = window.Chat;
  var el = C.el;
  var state = C.state;

  // Limits of this part.
  // A history reply that never comes must not block later requests forever.
  var FETCH_TIMEOUT_MS = 10000;
  // The server's largest `history before` page (PROTOCOL.md).
  var GAP_PAGE = 200;
  // One click loads at most this many events (five pages); a longer gap
  // keeps a smaller marker for the next click.  The transcript keeps 2000
  // entries while the reader follows the end, so one click never loads
  // more than it can show.
  var GAP_PER_CLICK = 1000;

  // --- one history-before request at a time -------------------------------
  //
  // state.older = {before, remaining, more, events, done, timer} while a
  // reply is due.  Its events are told from live ones by seq (they are
  // below `before`; live ones are above everything shown), and the reply is
  // handed to done(events, more, why) once whole, oldest first, each seq
  // once.  events is null when no whole reply came: why is then "timeout",
  // "lost" (the socket went) or "unavailable" (the room cannot read its
  // history right now, e.g. Redis is away).

  function dropOlder() {
    state.olderWanted = false;
    if (state.older) {
      window.clearTimeout(state.older.timer);
      state.older = null;
    }
  }

  // Returns false when a request is under way or none can be sent now
  // (not joined, or a welcome's replay or a gap reply still coming).
  function fetchBefore(before, limit, done) {
    if (state.older || !state.joined || state.replaying || state.catchup) {
      return false;
    }
    state.older = {
      before: before,
      remaining: -1,  // unknown until the history header arrives
      more: true,
      events: [],
      done: done,
      timer: window.setTimeout(function () { endFetch("timeout"); }, FETCH_TIMEOUT_MS)
    };
    C.send({ type: "history", before: before, limit: limit });
    return true;
  }

  function onBeforeHeader(msg) {
    var older = state.older;
    if (!older || older.remaining !== -1 || msg.before !== older.before) {
      return;
    }
    older.remaining = msg.count;
    older.more = msg.more === true;
    if (msg.count === 0) {
      endFetch("done");
    }
  }

  function endFetch(why) {
    var older = state.older;
    if (!older) {
      return;
    }
    var wanted = state.olderWanted;
    dropOlder();
    var events = null;
    if (why === "done") {
      // The unbroken run of seqs just below `before`, oldest first: a reply
      // cut short (retention dropped some while it was sent, PROTOCOL.md)
      // must not leave an unmarked hole under what it inserts.
      var bySeq = {};
      older.events.forEach(function (ev) { bySeq[ev.seq] = ev; });
      events = [];
      for (var seq = older.before - 1; bySeq[seq]; seq--) {
        events.unshift(bySeq[seq]);
      }
    }
    older.done(events, older.more, why);
    if (wanted && !state.older) {
      // Scrolling back was asked meanwhile: it goes first (or, not joined
      // now, the marker offers its button again).
      C.setMarker("idle");
      C.loadOlder();
    }
    pumpGaps();
  }

  // --- gap markers --------------------------------------------------------
  //
  // data-after: the last seq shown above the gap; data-before: the first
  // seq shown below it; the gap is the seqs strictly between.  data-state:
  // idle (a button), queued (clicked, waiting for the request slot),
  // loading, unavailable (the room could not read them just now: a button
  // again), gone (the server no longer keeps the rest), stale (the room
  // started a new transcript: these numbers mean nothing now).

  function gapSize(item) {
    return Number(item.dataset.before) - Number(item.dataset.after) - 1;
  }

  function gapMarker(after, before) {
    var item = document.createElement("li");
    item.className = "gap-marker";
    item.dataset.after = String(after);
    item.dataset.before = String(before);
    item.appendChild(C.span("gap-text", ""));
    var button = document.createElement("button");
    button.type = "button";
    button.className = "secondary gap-button";
    button.textContent = "Load";
    button.addEventListener("click", function () { wantGap(item); });
    item.appendChild(button);
    setGap(item, "idle");
    return item;
  }

  function setGap(item, kind) {
    var n = gapSize(item);
    var what = n === 1 ? "1 earlier message" : n + " earlier messages";
    item.dataset.state = kind;
    var button = item.querySelector(".gap-button");
    button.hidden = kind !== "idle" && kind !== "unavailable";
    button.setAttribute("aria-label", "Load the " + what + " not shown");
    item.querySelector(".gap-text").textContent =
      kind === "idle" ? what + " not shown \u2014"
        : kind === "unavailable" ? what + " not shown: the room cannot read them right now \u2014"
        : kind === "gone" ? what + (n === 1 ? " is" : " are") + " no longer kept by the server"
          : kind === "stale" ? what + " not shown (from the earlier transcript)"
            : "Loading " + what + "\u2026";
  }

  function wantGap(item) {
    if (item.dataset.state !== "idle" && item.dataset.state !== "unavailable") {
      return;
    }
    item.gapBudget = GAP_PER_CLICK;
    setGap(item, "queued");
    pumpGaps();
  }

  // Start the first queued gap's next page, if the request slot is free.
  // Called whenever it may have become free: a reply done, a welcome's
  // replay or a reconnect's gap reply over.
  function pumpGaps() {
    if (state.older) {
      return;
    }
    var item = el.transcript.querySelector("li.gap-marker[data-state='queued']");
    if (!item) {
      return;
    }
    var limit = Math.min(GAP_PAGE, gapSize(item), item.gapBudget);
    var started = C.fetchBefore(Number(item.dataset.before), limit, function (events, more, why) {
      gapPage(item, events, more, why);
    });
    if (started) {
      setGap(item, "loading");
    }
  }

  function gapPage(item, events, more, why) {
    if (!item.isConnected || item.dataset.state !== "loading") {
      return;  // trimmed away, or a new transcript began
    }
    if (events === null) {
      // A lost socket resumes after the reconnect; a reply that never
      // came is left to another click.
      setGap(item, why === "lost" ? "queued" : why === "unavailable" ? "unavailable" : "idle");
      return;
    }
    var after = Number(item.dataset.after);
    var before = Number(item.dataset.before);
    var fresh = events.filter(function (ev) { return ev.seq > after && ev.seq < before; });
    if (fresh.length > 0) {
      insertBelow(item, fresh);
      before = fresh[0].seq;
      item.dataset.before = String(before);
      item.gapBudget -= fresh.length;
    }
    if (before <= after + 1) {
      item.parentNode.removeChild(item);  // closed
    } else if (fresh.length === 0 || !more) {
      setGap(item, "gone");
    } else {
      setGap(item, item.gapBudget > 0 ? "queued" : "idle");
    }
  }

  // The page goes right below the marker (pages come newest first, each
  // page oldest first).  What the reader looks at stays put: with the
  // marker in view or below it, what is above the insertion does not move;
  // with the marker scrolled away above, the distance from the bottom is
  // kept instead.
  function insertBelow(item, events) {
    var t = el.transcript;
    var markerAbove = item.getBoundingClientRect().bottom <= t.getBoundingClientRect().top;
    var fromBottom = t.scrollHeight - t.scrollTop;
    var page = document.createDocumentFragment();
    events.forEach(function (ev) { page.appendChild(C.eventItem(ev)); });
    t.insertBefore(page, item.nextSibling);
    if (markerAbove) {
      t.scrollTop = t.scrollHeight - fromBottom;
    }
    state.pinned = C.nearBottom();
  }

  // A new transcript (epoch): the old gaps' numbers mean nothing now.
  function staleGaps() {
    var items = el.transcript.querySelectorAll("li.gap-marker");
    Array.prototype.forEach.call(items, function (item) {
      if (item.dataset.state !== "gone") {
        setGap(item, "stale");
      }
    });
  }

  C.dropOlder = dropOlder;
  C.fetchBefore = fetchBefore;
  C.onBeforeHeader = onBeforeHeader;
  C.endFetch = endFetch;
  C.abortFetch = function () { endFetch("lost"); };
  C.gapMarker = gapMarker;
  C.pumpGaps = pumpGaps;
  C.staleGaps = staleGaps;
}());
