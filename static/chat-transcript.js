/* The transcript: entries, room events in seq order, filling a gap after a
 * reconnect (history after), and scrolling back (history before, through
 * chat-gaps.js, which also loads the gaps history after could not fill).
 * Part of the chat room page; the parts share one namespace, window.Chat
 * (chat-base.js makes it).  No HTML is ever built from chat text:
 * everything from the wire goes in through textContent. */
(function () {
  "use strict";

  var C = window.Chat;
  var el = C.el;
  var state = C.state;

  // Limits and texts of this part.
  // A history reply that never comes must not hold live events back forever.
  var CATCHUP_TIMEOUT_MS = 10000;
  // Oldest transcript entries are dropped past this many (only while the
  // reader is at the end: nothing is taken from under someone reading back).
  var MAX_TRANSCRIPT = 2000;
  // Scrolling back asks for this many older events at a time (history
  // before; the request itself is chat-gaps.js's fetchBefore).
  var OLDER_PAGE = 50;
  var LEAVE_REASONS = {
    quit: "left",
    hung_up: "left (connection lost)",
    timed_out: "left (timed out)",
    slow_reader: "was disconnected (could not keep up)",
    flooding: "was disconnected (sending too fast)",
    protocol_error: "was disconnected (protocol error)",
    shutdown: "left (the server shut down)",
    replaced: "left (reconnected)"
  };

  // --- transcript ---------------------------------------------------------

  function nearBottom() {
    var t = el.transcript;
    return t.scrollHeight - t.scrollTop - t.clientHeight < 48;
  }

  function scrollToEnd() {
    el.transcript.scrollTop = el.transcript.scrollHeight;
    state.pinned = true;
  }

  // Whether to follow new entries is decided by where the user left the
  // scroll, not measured at append time: a resize or rotation moves the
  // bottom away without the user scrolling.
  function append(item) {
    var stick = state.pinned;
    el.transcript.appendChild(item);
    if (stick) {
      trimTranscript();
      scrollToEnd();
    }
  }

  function trimTranscript() {
    var marker = olderMarker();
    var trimmedCurrent = false;
    while (el.transcript.childElementCount > MAX_TRANSCRIPT) {
      var victim = el.transcript.firstElementChild;
      if (victim === marker) {
        victim = marker.nextElementSibling;
        trimmedCurrent = trimmedCurrent || !!(victim && victim.dataset.seq);
      }
      el.transcript.removeChild(victim);
    }
    if (trimmedCurrent) {
      // What was dropped can be loaded again by scrolling back.
      // A gap marker with nothing of this transcript above it any more is
      // what scrolling back loads next: keeping it would load it twice.
      var first = marker.nextElementSibling;
      while (first && !first.dataset.seq) {
        var next = first.nextElementSibling;
        if (first.classList.contains("gap-marker")) {
          el.transcript.removeChild(first);
        }
        first = next;
      }
      state.oldestSeq = first ? Number(first.dataset.seq) : null;
      state.olderDone = false;
      setMarker("idle");
    }
  }

  // --- scrolling back: history before, above a marker ---------------------
  //
  // The marker is a list item that sits just above the current transcript's
  // first event (after a "new transcript" notice when the epoch changed);
  // older pages are inserted right below it.  It offers a button, says a
  // page is loading, or marks the beginning of the room.

  function olderMarker() {
    var marker = document.getElementById("older");
    if (!marker) {
      marker = document.createElement("li");
      marker.id = "older";
      marker.className = "older-marker";
      var button = document.createElement("button");
      button.type = "button";
      button.className = "secondary older-button";
      button.textContent = "Show earlier messages";
      button.addEventListener("click", loadOlder);
      marker.appendChild(button);
      marker.appendChild(C.span("older-text", ""));
      el.transcript.appendChild(marker);
    }
    return marker;
  }

  function setMarker(kind) {
    var marker = olderMarker();
    marker.dataset.state = kind;
    marker.querySelector(".older-button").hidden = kind !== "idle";
    marker.querySelector(".older-text").textContent = kind === "loading"
      ? "Loading earlier messages\u2026"
      : kind === "start" ? "The beginning of the room" : "";
  }

  // A new transcript (a new epoch) starts below everything shown so far.
  function newTranscript(text) {
    notice(text, "warning new-transcript");
    state.lastSeq = 0;
    state.pending.clear();
    state.oldestSeq = null;
    state.olderDone = false;
    C.dropOlder();
    C.staleGaps();
    el.transcript.appendChild(olderMarker());
    setMarker("idle");
  }

  function loadOlder() {
    if (state.older && state.older.done !== finishOlder && !state.olderDone && state.joined) {
      // A gap's page is under way: this page follows it (chat-gaps.js).
      state.olderWanted = true;
      setMarker("loading");
      return;
    }
    if (state.older || state.olderDone || !state.joined || state.replaying || state.catchup) {
      return;
    }
    var before = state.oldestSeq !== null ? state.oldestSeq : state.lastSeq + 1;
    if (before <= 1) {
      state.olderDone = true;
      setMarker("start");
      return;
    }
    if (C.fetchBefore(before, OLDER_PAGE, finishOlder)) {
      setMarker("loading");
    }
  }

  // Insert the page above what is shown, keeping the reader's place: the
  // distance from the bottom is what stays the same.
  function finishOlder(events, more) {
    if (events === null) {
      // No whole reply in time.  A part would leave a hole above what is
      // shown (pages come oldest first), so it is dropped; the button retries.
      setMarker("idle");
      return;
    }
    var floor = state.oldestSeq !== null ? state.oldestSeq : state.lastSeq + 1;
    events = events.filter(function (ev) { return ev.seq < floor; });
    if (events.length > 0) {
      var t = el.transcript;
      var fromBottom = t.scrollHeight - t.scrollTop;
      var page = document.createDocumentFragment();
      events.forEach(function (ev) { page.appendChild(eventItem(ev)); });
      var marker = olderMarker();
      t.insertBefore(page, marker.nextSibling);
      t.scrollTop = t.scrollHeight - fromBottom;
      state.oldestSeq = events[0].seq;
    }
    if (!more || (state.oldestSeq !== null && state.oldestSeq <= 1)) {
      state.olderDone = true;
      setMarker("start");
    } else {
      setMarker("idle");
    }
  }

  function entry(classes, ts) {
    var item = document.createElement("li");
    item.className = "entry " + classes;
    item.appendChild(C.timeNode(ts));
    return item;
  }

  function sender(label) {
    var node = C.span("sender", C.nameOf(label));
    node.title = label;
    return node;
  }

  function youMark(item, srText) {
    var badge = C.span("you-badge", "you");
    badge.setAttribute("aria-hidden", "true");
    item.appendChild(badge);
    item.appendChild(C.span("visually-hidden", srText));
  }

  function notice(text, kind) {
    var item = entry("notice system" + (kind ? " " + kind : ""), Date.now());
    item.appendChild(C.span("text", text));
    append(item);
  }

  function eventItem(ev) {
    return ev.type === "message" ? messageItem(ev) : membershipItem(ev);
  }

  function messageItem(ev) {
    var mine = ev.from === state.label;
    var item = entry("message" + (mine ? " mine" : ""), ev.ts);
    item.dataset.seq = String(ev.seq);
    item.appendChild(sender(ev.from));
    if (mine) {
      youMark(item, "(your message)");
    }
    item.appendChild(C.span("text", ev.text));
    return item;
  }

  function membershipItem(ev) {
    var mine = ev.member === state.label;
    var item = entry("notice " + ev.type + (mine ? " mine" : ""), ev.ts);
    item.dataset.seq = String(ev.seq);
    item.appendChild(sender(ev.member));
    if (mine) {
      youMark(item, "(you)");
    }
    var what = ev.type === "join" ? "joined"
      : (LEAVE_REASONS[ev.reason] || "left (" + String(ev.reason) + ")");
    item.appendChild(C.span("text", " " + what));
    return item;
  }

  function renderPrivate(ev) {
    var fromMe = ev.from === state.label;
    var toMe = ev.to === state.label;
    C.remember(fromMe ? ev.to : ev.from);
    if (state.large) {
      C.renderRecipients();
    }
    var item = entry("private" + (fromMe ? " mine" : ""), ev.ts);
    var head = C.span("private-tag", "");
    head.appendChild(document.createTextNode("private "));
    if (fromMe) {
      head.appendChild(document.createTextNode(toMe ? "note to yourself" : "to "));
      if (!toMe) {
        head.appendChild(sender(ev.to));
      }
    } else {
      head.appendChild(document.createTextNode("from "));
      head.appendChild(sender(ev.from));
    }
    item.appendChild(head);
    if (fromMe) {
      item.appendChild(C.span("visually-hidden", "(your private message)"));
    }
    item.appendChild(C.span("text", ev.text));
    append(item);
  }

  // --- room events: dedupe and order by seq -------------------------------

  function roomEvent(ev) {
    if (typeof ev.seq !== "number") {
      return;
    }
    if (state.replaying && ev.seq >= state.replayUntil) {
      endReplay();  // the welcome's replay ends at its last_seq
    }
    var older = state.older;
    if (older && older.remaining > 0 && ev.seq < older.before) {
      // Part of a page asked for by scrolling back (live events are newer).
      older.events.push(ev);
      older.remaining -= 1;
      if (older.remaining === 0) {
        C.endFetch("done");
      }
      return;
    }
    if (older && older.remaining > 0) {
      // A live event: no room event comes inside a reply, so this one came
      // short (PROTOCOL.md); it is over.
      C.endFetch("done");
    }
    var catchup = state.catchup;
    if (catchup && catchup.remaining > 0) {
      catchup.remaining -= 1;
    }
    if (ev.seq > state.lastSeq) {
      if (catchup && ev.seq !== state.lastSeq + 1) {
        // A gap before it: hold it until the history reply fills the gap.
        state.pending.set(ev.seq, ev);
      } else {
        render(ev);
        drainPending(false);
      }
    }
    if (catchup && catchup.remaining === 0) {
      finishCatchup();
    }
  }

  function endReplay() {
    state.replaying = false;
    el.transcript.setAttribute("aria-busy", "false");
    C.pumpGaps();
  }

  function render(ev) {
    state.lastSeq = ev.seq;
    state.pending.delete(ev.seq);
    if (state.oldestSeq === null) {
      state.oldestSeq = ev.seq;
      if (ev.seq <= 1) {
        state.olderDone = true;
        setMarker("start");
      }
    }
    if (ev.seq > state.memberBase && !state.large) {
      if (ev.type === "join") {
        C.addMember(ev.member);
      } else if (ev.type === "leave") {
        C.removeMember(ev.member);
      }
    }
    append(eventItem(ev));
    if (ev.type === "join" && ev.member === state.label) {
      endReplay();
    }
  }

  // Render held events: in order only, or (force) across a gap that the
  // history reply did not fill: a gap marker (chat-gaps.js) stands in for
  // the events skipped, and loads them (history before) when asked.  A gap
  // with nothing of this transcript above it gets none: scrolling back
  // loads it.
  function drainPending(force) {
    var seqs = Array.from(state.pending.keys()).sort(function (a, b) { return a - b; });
    for (var i = 0; i < seqs.length; i++) {
      var seq = seqs[i];
      if (seq <= state.lastSeq) {
        state.pending.delete(seq);
      } else if (seq === state.lastSeq + 1 || force) {
        if (seq !== state.lastSeq + 1 && state.oldestSeq !== null) {
          append(C.gapMarker(state.lastSeq, seq));
        }
        render(state.pending.get(seq));
      } else {
        return;
      }
    }
  }

  function startCatchup(after) {
    state.catchup = {
      after: after,
      remaining: -1,  // unknown until the history header arrives
      timer: window.setTimeout(finishCatchup, CATCHUP_TIMEOUT_MS)
    };
    C.send({ type: "history", after: after });
  }

  function onHistoryHeader(msg) {
    if (typeof msg.before === "number") {
      C.onBeforeHeader(msg);
      return;
    }
    var catchup = state.catchup;
    if (!catchup || catchup.remaining !== -1 || msg.after !== catchup.after) {
      return;  // not ours; its events are deduped by seq anyway
    }
    catchup.remaining = msg.count;
    if (msg.count === 0) {
      finishCatchup();
    }
  }

  function finishCatchup() {
    if (!state.catchup) {
      return;
    }
    window.clearTimeout(state.catchup.timer);
    state.catchup = null;
    drainPending(true);
    C.pumpGaps();
  }

  C.nearBottom = nearBottom;
  C.scrollToEnd = scrollToEnd;
  C.setMarker = setMarker;
  C.newTranscript = newTranscript;
  C.loadOlder = loadOlder;
  C.eventItem = eventItem;
  C.notice = notice;
  C.renderPrivate = renderPrivate;
  C.roomEvent = roomEvent;
  C.drainPending = drainPending;
  C.startCatchup = startCatchup;
  C.onHistoryHeader = onHistoryHeader;
}());
