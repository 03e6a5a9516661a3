/* The chat room page: one WebSocket to the gateway, which relays the chat
 * protocol (tcpserver/PROTOCOL.md) as JSON text.  No HTML is ever built from
 * chat text: everything from the wire goes in through textContent. */
(function () {
  "use strict";

  // Reconnect delays double from the base up to the cap; each is drawn from
  // the upper half of its window ("equal jitter") so a room full of pages
  // that lost the same gateway does not return in one burst.
  var BACKOFF_BASE_MS = 500;
  var BACKOFF_CAP_MS = 15000;
  // After a reconnect the server may not have noticed the old session gone
  // yet (a dead link is only found by its idle timeout, 60 s by default).
  var NAME_TAKEN_RETRY_MS = 2000;
  var NAME_TAKEN_GIVE_UP_MS = 90000;
  // Silence this long draws our own ping; no answer this soon after it and
  // the link is taken for dead.
  var HEARTBEAT_IDLE_MS = 25000;
  var HEARTBEAT_WAIT_MS = 10000;
  // A history reply that never comes must not hold live events back forever.
  var CATCHUP_TIMEOUT_MS = 10000;
  // Oldest transcript entries are dropped past this many (only while the
  // reader is at the end: nothing is taken from under someone reading back).
  var MAX_TRANSCRIPT = 2000;
  // Scrolling back asks for this many older events at a time (history before).
  var OLDER_PAGE = 50;
  // Within this many pixels of the top, scrolling loads the older page.
  var OLDER_SCROLL_PX = 40;
  // A large room's "To" menu lists the members picked or heard from lately.
  var MAX_RECENTS = 20;
  // Typing in the member search waits this long for a pause (ms).
  var SEARCH_PAUSE_MS = 200;
  var NAME_RE = /^[A-Za-z0-9._-]{1,32}$/;
  // The server's rule for message text (check_text in tcpserver/protocol.py):
  // refused when every character is White_Space, a format character (Cf), a
  // Default_Ignorable_Code_Point, or a filler that draws as blank (Braille
  // blank, the Hangul fillers).  By Unicode property, not a list of known
  // offenders, so U+200B, U+2060, U+FEFF, U+00AD and the like all count.
  var NOTHING_VISIBLE_RE =
    /^[\p{White_Space}\p{Cf}\p{Default_Ignorable_Code_Point}\u2800\u3164\uFFA0\u115F\u1160]*$/u;

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

  var ERROR_TEXT = {
    name_taken: "That name is taken. Try another.",
    name_invalid: "Use 1\u201332 letters, digits, -, _ or . (not \u201cserver\u201d).",
    no_such_member: "No one by that name is here.",
    nothing_visible: "Nothing visible to send: add some text.",
    rate_limited: "You are sending too fast; that message was dropped.",
    flooding: "Disconnected for sending too fast.",
    bad_message: "The server could not accept that message.",
    server_full: "The room is full. Try again later.",
    too_many_connections: "Too many connections from your address.",
    hello_timeout: "The server gave up waiting for your name.",
    shutting_down: "The server is shutting down."
  };

  // WebSocket close codes from the gateway (RFC 6455 section 7.4.1, README):
  // 1012 the chat server shut down in order after a `shutdown` notice and
  // will be back; 1011 the chat server was lost without a word (a crash) or
  // cannot be reached.  Both are worth reconnecting for; the user is told
  // which one happened.
  var CLOSE_RESTART = 1012;
  var CLOSE_LOST_SERVER = 1011;

  // The welcome's resume token, kept per tab (sessionStorage), so that a
  // reconnect takes our name back from our own stale connection at once
  // instead of waiting for the server to time it out (protocol v2).
  var RESUME_KEY = "chatroom.resume";

  var STATUS_TEXT = {
    connecting: "Connecting\u2026",
    connected: "Connected",
    reconnecting: "Reconnecting\u2026",
    offline: "Offline"
  };

  var $ = function (id) { return document.getElementById(id); };
  var el = {
    app: $("app"),
    status: $("status"),
    statusText: $("status-text"),
    joinView: $("join-view"),
    joinForm: $("join-form"),
    joinName: $("join-name"),
    joinButton: $("join-button"),
    joinError: $("join-error"),
    chatView: $("chat-view"),
    transcript: $("transcript"),
    compose: $("compose"),
    composeTo: $("compose-to"),
    composeText: $("compose-text"),
    composeError: $("compose-error"),
    leaveButton: $("leave-button"),
    members: $("members"),
    membersStale: $("members-stale"),
    memberList: $("member-list"),
    memberMore: $("member-more"),
    memberFinder: $("member-finder"),
    memberSearch: $("member-search"),
    memberPager: $("member-pager"),
    memberCount: $("member-count")
  };

  var state = {
    ws: null,
    name: null,          // the name asked for
    label: null,         // our name@address once welcomed
    wanted: false,       // the user wants to be in the room
    joined: false,       // welcomed on the current socket
    everJoined: false,   // welcomed at least once since the user pressed Join
    joinPending: false,  // Join pressed, no welcome or refusal yet
    lastSeq: 0,          // highest room event seq rendered
    epoch: null,         // the chat server run that lastSeq belongs to
    memberBase: 0,       // welcome's last_seq: the member list is as of this seq
    members: new Map(),  // label -> true, in arrival order
    memberChunks: null,  // labels being collected while "more" is true
    catchup: null,       // {after, remaining, timer} while a history reply is due
    pending: new Map(),  // seq -> event held back until the gap before it fills
    pinned: true,        // the transcript is scrolled to its end: keep it there
    lostCode: null,      // close code of the socket whose loss began this reconnect
    replaying: false,    // between a welcome and the end of its replay
    replayUntil: 0,      // the welcome's last_seq: its replay ends there
    oldestSeq: null,     // lowest seq shown from the current transcript (epoch)
    olderDone: false,    // the beginning of the room is shown
    older: null,         // {before, remaining, more, events, timer} while a page is due
    large: false,        // over the server's announce limit: paged member panel
    largeCount: 0,       // the room's member count, from welcome/presence/members
    whoQueue: [],        // the members replies due, in order: {kind: "full"|"page"}
    recents: [],         // labels picked or heard from privately, newest first
    searchTimer: 0,
    attempt: 0,
    reconnectTimer: 0,
    helloTimer: 0,
    nameTakenSince: 0,
    lastRecv: 0,
    pingSentAt: 0,
    pingCount: 0
  };

  // --- small helpers ----------------------------------------------------

  function nameOf(label) {
    var at = String(label).indexOf("@");
    return at < 0 ? String(label) : String(label).slice(0, at);
  }

  function addressOf(label) {
    var at = String(label).indexOf("@");
    return at < 0 ? "" : String(label).slice(at + 1);
  }

  function span(className, text) {
    var node = document.createElement("span");
    node.className = className;
    node.textContent = text;
    return node;
  }

  function timeNode(ts) {
    var node = document.createElement("time");
    var date = new Date(typeof ts === "number" ? ts : Date.now());
    node.className = "time";
    node.dateTime = date.toISOString();
    node.title = date.toLocaleString();
    node.textContent = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return node;
  }

  function send(message) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
      return false;
    }
    state.ws.send(JSON.stringify(message));
    return true;
  }

  function setStatus(kind, detail) {
    el.status.dataset.state = kind;
    el.statusText.textContent = detail ? STATUS_TEXT[kind] + " " + detail : STATUS_TEXT[kind];
  }

  function showChat(on) {
    el.joinView.hidden = on;
    el.chatView.hidden = !on;
    el.app.dataset.joined = on ? "true" : "false";
  }

  function setJoinError(text) {
    el.joinError.textContent = text || "";
    el.joinName.setAttribute("aria-invalid", text ? "true" : "false");
  }

  function setComposeError(text) {
    el.composeError.textContent = text || "";
  }

  function setJoinBusy(busy) {
    el.joinButton.disabled = busy;
    el.joinButton.textContent = busy ? "Joining\u2026" : "Join";
  }

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
      var first = marker.nextElementSibling;
      while (first && !first.dataset.seq) {
        first = first.nextElementSibling;
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
      marker.appendChild(span("older-text", ""));
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
    dropOlder();
    el.transcript.appendChild(olderMarker());
    setMarker("idle");
  }

  function dropOlder() {
    if (state.older) {
      window.clearTimeout(state.older.timer);
      state.older = null;
    }
  }

  function loadOlder() {
    if (state.older || state.olderDone || !state.joined || state.replaying || state.catchup) {
      return;
    }
    var before = state.oldestSeq !== null ? state.oldestSeq : state.lastSeq + 1;
    if (before <= 1) {
      state.olderDone = true;
      setMarker("start");
      return;
    }
    state.older = {
      before: before,
      remaining: -1,  // unknown until the history header arrives
      more: true,
      events: [],
      timer: window.setTimeout(finishOlder, CATCHUP_TIMEOUT_MS)
    };
    setMarker("loading");
    send({ type: "history", before: before, limit: OLDER_PAGE });
  }

  function onOlderHeader(msg) {
    var older = state.older;
    if (!older || older.remaining !== -1 || msg.before !== older.before) {
      return;
    }
    older.remaining = msg.count;
    older.more = msg.more === true;
    if (msg.count === 0) {
      finishOlder();
    }
  }

  // Insert the page above what is shown, keeping the reader's place: the
  // distance from the bottom is what stays the same.
  function finishOlder() {
    var older = state.older;
    if (!older) {
      return;
    }
    dropOlder();
    if (older.remaining !== 0) {
      // No whole reply in time.  A part would leave a hole above what is
      // shown (pages come oldest first), so it is dropped; the button retries.
      setMarker("idle");
      return;
    }
    var floor = state.oldestSeq !== null ? state.oldestSeq : state.lastSeq + 1;
    var seen = {};
    var events = older.events.filter(function (ev) {
      var fresh = ev.seq < floor && !seen[ev.seq];
      seen[ev.seq] = true;
      return fresh;
    }).sort(function (a, b) { return a.seq - b.seq; });
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
    if (!older.more || (state.oldestSeq !== null && state.oldestSeq <= 1)) {
      state.olderDone = true;
      setMarker("start");
    } else {
      setMarker("idle");
    }
  }

  function entry(classes, ts) {
    var item = document.createElement("li");
    item.className = "entry " + classes;
    item.appendChild(timeNode(ts));
    return item;
  }

  function sender(label) {
    var node = span("sender", nameOf(label));
    node.title = label;
    return node;
  }

  function youMark(item, srText) {
    var badge = span("you-badge", "you");
    badge.setAttribute("aria-hidden", "true");
    item.appendChild(badge);
    item.appendChild(span("visually-hidden", srText));
  }

  function notice(text, kind) {
    var item = entry("notice system" + (kind ? " " + kind : ""), Date.now());
    item.appendChild(span("text", text));
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
    item.appendChild(span("text", ev.text));
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
    item.appendChild(span("text", " " + what));
    return item;
  }

  function renderPrivate(ev) {
    var fromMe = ev.from === state.label;
    var toMe = ev.to === state.label;
    remember(fromMe ? ev.to : ev.from);
    if (state.large) {
      renderRecipients();
    }
    var item = entry("private" + (fromMe ? " mine" : ""), ev.ts);
    var head = span("private-tag", "");
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
      item.appendChild(span("visually-hidden", "(your private message)"));
    }
    item.appendChild(span("text", ev.text));
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
        finishOlder();
      }
      return;
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
        addMember(ev.member);
      } else if (ev.type === "leave") {
        removeMember(ev.member);
      }
    }
    append(eventItem(ev));
    if (ev.type === "join" && ev.member === state.label) {
      endReplay();
    }
  }

  // Render held events: in order only, or (force) across a gap that
  // can no longer be filled.
  function drainPending(force) {
    var seqs = Array.from(state.pending.keys()).sort(function (a, b) { return a - b; });
    for (var i = 0; i < seqs.length; i++) {
      var seq = seqs[i];
      if (seq <= state.lastSeq) {
        state.pending.delete(seq);
      } else if (seq === state.lastSeq + 1 || force) {
        if (seq !== state.lastSeq + 1) {
          var lost = seq - state.lastSeq - 1;
          notice(lost + (lost === 1 ? " event was" : " events were") +
                 " missed while you were away (older than the server keeps).", "warning");
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
    send({ type: "history", after: after });
  }

  function onHistoryHeader(msg) {
    if (typeof msg.before === "number") {
      onOlderHeader(msg);
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
  }

  // --- members ------------------------------------------------------------

  function setMembers(labels) {
    state.members = new Map();
    labels.forEach(function (label) { state.members.set(label, true); });
    renderMembers();
  }

  function collectMembers(labels, more) {
    state.memberChunks = (state.memberChunks || []).concat(labels || []);
    if (!more) {
      var all = state.memberChunks;
      state.memberChunks = null;
      setMembers(all);
      setMembersStale(false);
    }
  }

  // While the socket is down the list shows who was here, not who is: it
  // is marked so until the next welcome's list replaces it.
  function setMembersStale(stale) {
    el.members.dataset.stale = stale ? "true" : "false";
    el.membersStale.hidden = !stale;
    el.memberList.setAttribute("aria-busy", stale ? "true" : "false");
  }

  // Members scrolled out of the list's box are counted on a button, so a
  // narrow screen never hides members with no sign that they exist.
  function updateMemberMore() {
    var list = el.memberList;
    var top = list.scrollTop;
    var bottom = top + list.clientHeight;
    var above = 0;
    var below = 0;
    var node;
    if (list.clientHeight > 0) {
      for (node = list.firstElementChild; node && node.offsetTop < top - 1;
           node = node.nextElementSibling) {
        above += 1;
      }
      for (node = list.lastElementChild;
           node && node.offsetTop + node.offsetHeight > bottom + 1;
           node = node.previousElementSibling) {
        below += 1;
      }
    }
    var hidden = Math.min(above + below, list.childElementCount);
    el.memberMore.hidden = hidden === 0;
    el.memberMore.dataset.direction = below > 0 ? "down" : "up";
    el.memberMore.textContent = "+" + hidden + " more " + (below > 0 ? "\u2193" : "\u2191");
    el.memberMore.setAttribute("aria-label", hidden + (hidden === 1 ? " member" : " members") +
                               " not shown; show " + (below > 0 ? "more" : "the first"));
  }

  function onMemberMore() {
    var list = el.memberList;
    if (el.memberMore.dataset.direction === "down") {
      list.scrollTop += Math.max(list.clientHeight - 8, 8);
    } else {
      list.scrollTop = 0;
    }
  }

  function addMember(label) {
    if (!state.members.has(label)) {
      state.members.set(label, true);
      renderMembers();
    }
  }

  function removeMember(label) {
    if (state.members.delete(label)) {
      renderMembers();
    }
  }

  function sortedMembers() {
    return Array.from(state.members.keys()).sort(function (a, b) {
      if (a === state.label) { return -1; }
      if (b === state.label) { return 1; }
      return a.toLowerCase() < b.toLowerCase() ? -1 : a.toLowerCase() > b.toLowerCase() ? 1 : 0;
    });
  }

  // One member, as a button that picks them for a private message (or a
  // plain span for ourselves).  Shared by the list and the large-room pager.
  function memberBody(label) {
    var body;
    if (label === state.label) {
      body = document.createElement("span");
      body.className = "member-body";
    } else {
      body = document.createElement("button");
      body.type = "button";
      body.className = "member-body";
      body.dataset.label = label;
      body.setAttribute("aria-label", "Message " + nameOf(label) + " privately");
      body.addEventListener("click", function () { chooseRecipient(label); });
    }
    body.appendChild(span("member-name", nameOf(label)));
    if (label === state.label) {
      body.appendChild(span("you-badge", "you"));
    }
    body.appendChild(span("member-addr", "@" + addressOf(label)));
    body.title = label;
    return body;
  }

  function renderMembers() {
    var labels = sortedMembers();
    var list = el.memberList;
    var focused = document.activeElement && list.contains(document.activeElement)
      ? document.activeElement.dataset.label : null;
    list.textContent = "";
    labels.forEach(function (label) {
      var item = document.createElement("li");
      item.className = "member" + (label === state.label ? " mine" : "");
      item.dataset.label = label;
      var body = memberBody(label);
      item.appendChild(body);
      list.appendChild(item);
      if (focused === label && body.focus) {
        body.focus();
      }
    });
    if (!state.large) {
      el.memberCount.textContent = String(labels.length);
    }
    updateMemberMore();
    renderRecipients();
  }

  // --- a large room: the count, a paged and searchable member panel --------

  var pager = new window.MemberPager({
    scroller: el.memberPager,
    request: function (query) {
      if (!state.joined) {
        return false;
      }
      var who = { type: "who", limit: query.limit };
      if (query.cursor !== undefined) {
        who.cursor = query.cursor;
      }
      if (query.prefix !== undefined) {
        who.prefix = query.prefix;
      }
      if (!send(who)) {
        return false;
      }
      state.whoQueue.push({ kind: "page", generation: query.generation });
      return true;
    },
    render: memberBody,
    empty: function (prefix) {
      return prefix ? "No one\u2019s name starts with \u201c" + prefix + "\u201d." : "No one is here.";
    }
  });

  function setLargeCount(count) {
    if (typeof count === "number") {
      state.largeCount = count;
      if (state.large) {
        el.memberCount.textContent = String(count);
      }
    }
  }

  // Switch the panel between the whole list (small rooms, exactly as
  // before) and the pager.  Joins and leaves are not broadcast in a large
  // room, so the whole list is dropped rather than left to go stale.
  function showLarge(large) {
    state.large = large;
    el.members.dataset.large = large ? "true" : "false";
    el.memberFinder.hidden = !large;
    el.memberList.hidden = large;
    if (large) {
      el.memberMore.hidden = true;
      state.members = new Map();
      state.memberChunks = null;
      el.memberList.textContent = "";
      el.memberCount.textContent = String(state.largeCount);
      pager.reset(el.memberSearch.value.trim());
      renderRecipients();
    }
  }

  // A `members` frame: a page for the pager, or part of a whole list.
  function onMembers(msg) {
    var head = state.whoQueue[0];
    if (head && head.kind === "page") {
      state.whoQueue.shift();
      setLargeCount(msg.count);
      pager.onPage(msg, head.generation);
      return;
    }
    if (typeof msg.cursor === "string") {
      // A page where a whole list was asked for: the room turned large
      // meanwhile, and its presence frame will say so.
      state.whoQueue.shift();
      state.memberChunks = null;
      return;
    }
    if (!msg.more && head) {
      state.whoQueue.shift();
    }
    if (!state.large) {
      collectMembers(msg.members, msg.more);
    }
  }

  function onPresence(msg) {
    setLargeCount(msg.count);
    var large = msg.large !== false;
    if (large && !state.large) {
      showLarge(true);
    } else if (!large && state.large) {
      // Small again: joins and leaves are announced from here on, and a
      // whole list replaces whatever the pager had.
      showLarge(false);
      askWholeList();
    }
  }

  function askWholeList() {
    if (send({ type: "who" })) {
      state.whoQueue.push({ kind: "full" });
    }
  }

  function onSearchInput() {
    window.clearTimeout(state.searchTimer);
    state.searchTimer = window.setTimeout(function () {
      if (state.large) {
        pager.reset(el.memberSearch.value.trim());
      }
    }, SEARCH_PAUSE_MS);
  }

  // Someone picked or heard from: kept for a large room's "To" menu.
  function remember(label) {
    if (!label || label === state.label) {
      return;
    }
    state.recents = [label].concat(state.recents.filter(function (l) { return l !== label; }))
      .slice(0, MAX_RECENTS);
  }

  function renderRecipients() {
    var labels = state.large ? state.recents : sortedMembers();
    var select = el.composeTo;
    var chosen = select.value;
    select.textContent = "";
    var everyone = document.createElement("option");
    everyone.value = "";
    everyone.textContent = "Everyone";
    select.appendChild(everyone);
    labels.forEach(function (label) {
      if (label !== state.label) {
        var option = document.createElement("option");
        option.value = label;
        option.textContent = nameOf(label);
        select.appendChild(option);
      }
    });
    if (chosen && (state.large ? labels.indexOf(chosen) < 0 : !state.members.has(chosen))) {
      // Never fall back to Everyone behind the user's back: a private
      // message must not go to the whole room because its reader left.
      var gone = document.createElement("option");
      gone.value = chosen;
      gone.textContent = nameOf(chosen) + " (not here)";
      select.appendChild(gone);
    }
    select.value = chosen;
    updatePlaceholder();
  }

  function updatePlaceholder() {
    var to = el.composeTo.value;
    el.composeText.placeholder = to ? "Private message to " + nameOf(to) : "Message everyone";
    el.compose.dataset.private = to ? "true" : "false";
  }

  function chooseRecipient(label) {
    remember(label);
    if (state.large) {
      renderRecipients();
    }
    el.composeTo.value = label;
    updatePlaceholder();
    el.composeText.focus();
  }

  // --- the connection -----------------------------------------------------

  function wsUrl() {
    var url = new URL("ws", window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    url.hash = "";
    return url.href;
  }

  function connect() {
    window.clearTimeout(state.reconnectTimer);
    window.clearTimeout(state.helloTimer);
    setStatus(state.everJoined ? "reconnecting" : "connecting",
              state.everJoined ? reconnectDetail() : "");
    var ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (err) {
      onSocketGone(null, "cannot open a WebSocket");
      return;
    }
    state.ws = ws;
    state.joined = false;
    ws.onopen = function () {
      if (state.ws === ws) {
        state.lastRecv = Date.now();
        sendHello();
      }
    };
    ws.onmessage = function (event) {
      if (state.ws !== ws) {
        return;
      }
      state.lastRecv = Date.now();
      state.pingSentAt = 0;
      // The gateway may batch several server payloads into one message,
      // separated by "\n" (JSON payloads never hold a raw newline).
      var parts = String(event.data).split("\n");
      for (var i = 0; i < parts.length; i++) {
        // A handler may close or replace this socket mid-batch.
        if (state.ws !== ws) {
          return;
        }
        var msg;
        try {
          msg = JSON.parse(parts[i]);
        } catch (err) {
          continue;
        }
        if (msg && typeof msg === "object" && typeof msg.type === "string") {
          handle(msg);
        }
      }
    };
    ws.onclose = function (event) {
      if (state.ws === ws) {
        onSocketGone(event.code, event.reason);
      }
    };
  }

  function storedResume(name) {
    try {
      var kept = JSON.parse(window.sessionStorage.getItem(RESUME_KEY) || "null");
      if (kept && typeof kept.token === "string" && typeof kept.name === "string" &&
          kept.name.toLowerCase() === String(name).toLowerCase()) {
        return kept.token;
      }
    } catch (err) {
      // Storage off or garbled: join without a token, as a new member.
    }
    return null;
  }

  function keepResume(name, token) {
    try {
      if (typeof token === "string" && token) {
        window.sessionStorage.setItem(RESUME_KEY, JSON.stringify({ name: name, token: token }));
      } else {
        window.sessionStorage.removeItem(RESUME_KEY);
      }
    } catch (err) {
      // Storage off: reconnects then wait for the old session to time out.
    }
  }

  function sendHello() {
    window.clearTimeout(state.helloTimer);
    var hello = { type: "hello", name: state.name };
    var token = storedResume(state.name);
    if (token) {
      hello.resume = token;
    }
    send(hello);
  }

  // The socket is closed or given up on; decide what happens next.
  function onSocketGone(code, reason) {
    var ws = state.ws;
    state.ws = null;
    state.joined = false;
    window.clearTimeout(state.helloTimer);
    if (state.catchup) {
      window.clearTimeout(state.catchup.timer);
      state.catchup = null;
    }
    if (state.older) {
      dropOlder();
      setMarker("idle");
    }
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) {
        ws.close(4000, "abandoned");
      }
    }
    if (!state.wanted) {
      setStatus("offline");
      return;
    }
    if (!state.everJoined) {
      // Never got in: if a Join is waiting, say why next to the form.  A
      // socket left open after a name error just ends (the server's hello
      // timeout); the next Join opens another.
      state.wanted = false;
      setStatus("offline");
      setJoinBusy(false);
      if (state.joinPending) {
        state.joinPending = false;
        setJoinError(closeText(code, reason));
      }
      showChat(false);
      return;
    }
    setMembersStale(true);
    if (state.attempt === 0) {
      // Later attempts fail with 1011 while a restarting server is down;
      // the status keeps saying why the page first lost it.
      state.lostCode = code;
      lostNotice(code, reason);
    }
    scheduleReconnect();
  }

  // Said once when a joined page loses its socket: an orderly restart, a
  // lost chat server and a dropped link read differently.
  function lostNotice(code, reason) {
    var text;
    var kind;
    if (code === CLOSE_RESTART) {
      text = "The chat server is restarting. You will be reconnected when it is back\u2026";
      kind = "restart";
    } else if (code === CLOSE_LOST_SERVER) {
      text = "Lost the chat server: it stopped without notice. Reconnecting\u2026";
      kind = "lost";
    } else {
      text = "Connection lost" + (reason ? ": " + reason : "") + ". Reconnecting\u2026";
      kind = "dropped";
    }
    notice(text, "warning connection-" + kind);
  }

  function closeText(code, reason) {
    if (ERROR_TEXT[reason]) {
      return ERROR_TEXT[reason];
    }
    if (code === CLOSE_RESTART) {
      return "The chat server is restarting. Try again in a moment.";
    }
    if (code === CLOSE_LOST_SERVER) {
      return "The chat server is unreachable. Try again later.";
    }
    if (reason) {
      return "Could not join: " + reason;
    }
    return "Could not reach the chat server. Try again later.";
  }

  function reconnectDetail() {
    return state.lostCode === CLOSE_RESTART ? "\u2014 the server is restarting"
      : state.lostCode === CLOSE_LOST_SERVER ? "\u2014 the chat server is unreachable" : "";
  }

  function scheduleReconnect() {
    window.clearTimeout(state.reconnectTimer);
    if (navigator.onLine === false) {
      setStatus("offline", "\u2014 waiting for the network");
      return;  // the "online" event reconnects
    }
    var window_ = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, state.attempt));
    var delay = window_ / 2 + Math.random() * window_ / 2;
    state.attempt += 1;
    setStatus("reconnecting", reconnectDetail());
    state.reconnectTimer = window.setTimeout(connect, delay);
  }

  function handle(msg) {
    switch (msg.type) {
      case "welcome": onWelcome(msg); break;
      case "members": onMembers(msg); break;
      case "presence": onPresence(msg); break;
      case "message":
      case "join":
      case "leave": roomEvent(msg); break;
      case "history": onHistoryHeader(msg); break;
      case "private": renderPrivate(msg); break;
      case "error": onError(msg); break;
      case "ping":
        send(msg.token === undefined ? { type: "pong" } : { type: "pong", token: msg.token });
        break;
      case "shutdown":
        notice(msg.message || "The server is shutting down.", "warning");
        break;
      default:
        break;  // pong, and anything newer than this page
    }
  }

  function onWelcome(msg) {
    var resuming = state.everJoined;
    state.joinPending = false;
    state.joined = true;
    state.everJoined = true;
    state.attempt = 0;
    state.nameTakenSince = 0;
    state.label = msg.label;
    state.name = msg.name;
    keepResume(msg.name, msg.resume);
    setStatus("connected", "as " + msg.name);
    setJoinBusy(false);
    setJoinError("");
    setComposeError("");
    showChat(true);
    // A new epoch, or numbers that never reached ours (a log lost behind
    // the same epoch): either way our seqs mean nothing to this room now.
    var restarted = state.epoch !== null &&
      (msg.epoch !== state.epoch || msg.last_seq < state.lastSeq);
    state.epoch = msg.epoch;
    if (resuming && restarted) {
      newTranscript("The chat server restarted; a new transcript starts here.");
    }
    // The replay ends at last_seq (our own join follows it, except in a
    // large room, where joins are not broadcast).
    state.replaying = msg.history > 0;
    state.replayUntil = msg.last_seq;
    state.memberBase = msg.last_seq;
    state.memberChunks = null;
    state.whoQueue = [];
    state.largeCount = typeof msg.count === "number" ? msg.count : 0;
    if (msg.large === true) {
      showLarge(true);
      setMembersStale(false);
    } else {
      if (state.large) {
        showLarge(false);
      }
      if (msg.more) {
        state.whoQueue.push({ kind: "full" });  // the rest of the list follows
      }
      collectMembers(msg.members, msg.more);
    }
    if (msg.history > 0) {
      el.transcript.setAttribute("aria-busy", "true");
    }
    if (resuming) {
      notice("Reconnected.", "ok");
      if (state.lastSeq > 0) {
        startCatchup(state.lastSeq);
      }
    } else {
      el.composeText.focus();
    }
  }

  // Our numbers are from another run of the room (PROTOCOL.md unknown_seq):
  // a new transcript, continuing from the welcome; what came before it can
  // be loaded by scrolling back.
  function onUnknownSeq() {
    if (state.catchup) {
      window.clearTimeout(state.catchup.timer);
      state.catchup = null;
    }
    var held = Array.from(state.pending.values());
    newTranscript("The chat server's transcript changed; a new transcript starts here.");
    state.lastSeq = state.memberBase;
    held.forEach(function (ev) {
      if (ev.seq > state.lastSeq) {
        state.pending.set(ev.seq, ev);
      }
    });
    drainPending(true);
    loadOlder();
  }

  function onError(msg) {
    var code = msg.code;
    if (code === "unknown_seq") {
      onUnknownSeq();
      return;
    }
    var text = code === "name_taken"
      ? "The name \u201c" + state.name + "\u201d is taken. Try another."
      : ERROR_TEXT[code] || msg.message || code;
    if (!state.joined && (code === "name_taken" || code === "name_invalid")) {
      if (!state.everJoined) {
        // The socket stays open: the next Join sends another hello on it.
        state.joinPending = false;
        setStatus("offline");
        setJoinBusy(false);
        setJoinError(text);
        el.joinName.focus();
        return;
      }
      if (code === "name_taken") {
        // Probably our own old session, not yet noticed gone.
        var now = Date.now();
        state.nameTakenSince = state.nameTakenSince || now;
        if (now - state.nameTakenSince < NAME_TAKEN_GIVE_UP_MS) {
          setStatus("reconnecting", "\u2014 waiting for the old session to end");
          state.helloTimer = window.setTimeout(sendHello, NAME_TAKEN_RETRY_MS);
          return;
        }
      }
      giveUp(text);
      return;
    }
    if (!state.everJoined) {
      if (state.joinPending) {
        setJoinError(text);
      }
      return;
    }
    setComposeError(text);
  }

  // Stop reconnecting and hand the choice back to the user.
  function giveUp(text) {
    state.wanted = false;
    state.everJoined = false;
    var ws = state.ws;
    if (ws) {
      state.ws = null;
      ws.onopen = ws.onmessage = ws.onclose = null;
      ws.close(1000, "left");
    }
    setStatus("offline");
    setJoinBusy(false);
    setJoinError(text);
    showChat(false);
    el.joinName.focus();
  }

  function heartbeat() {
    if (!state.ws || !state.joined) {
      return;
    }
    var now = Date.now();
    if (state.pingSentAt && now - state.pingSentAt > HEARTBEAT_WAIT_MS) {
      onSocketGone(null, "no answer from the gateway");
    } else if (!state.pingSentAt && now - state.lastRecv > HEARTBEAT_IDLE_MS) {
      state.pingCount += 1;
      state.pingSentAt = now;
      send({ type: "ping", token: "page-" + state.pingCount });
    }
  }

  // --- user actions -------------------------------------------------------

  function resetRoom() {
    state.lastSeq = 0;
    state.epoch = null;
    state.memberBase = 0;
    state.pending.clear();
    state.catchup = null;
    state.label = null;
    el.transcript.textContent = "";
    state.pinned = true;
    state.oldestSeq = null;
    state.olderDone = false;
    state.replaying = false;
    dropOlder();
    setMarker("idle");
    state.recents = [];
    state.whoQueue = [];
    state.largeCount = 0;
    if (state.large) {
      showLarge(false);
    }
    setMembers([]);
    setMembersStale(false);
  }

  function onJoinSubmit(event) {
    event.preventDefault();
    var name = el.joinName.value.trim();
    if (!NAME_RE.test(name) || name.toLowerCase() === "server") {
      setJoinError(ERROR_TEXT.name_invalid);
      el.joinName.focus();
      return;
    }
    setJoinError("");
    setJoinBusy(true);
    setStatus("connecting");
    state.joinPending = true;
    state.name = name;
    state.wanted = true;
    state.attempt = 0;
    resetRoom();
    if (state.ws && state.ws.readyState === WebSocket.OPEN && !state.joined) {
      sendHello();  // the socket stays open after a name error
    } else if (!state.ws) {
      connect();
    }
  }

  function hasVisible(text) {
    return !NOTHING_VISIBLE_RE.test(text);
  }

  function onComposeSubmit(event) {
    event.preventDefault();
    var text = el.composeText.value;
    if (text === "") {
      return;  // Enter on an empty box is not worth a scolding
    }
    var message = parseCommand(text);
    if (message === null) {
      return;
    }
    if (typeof message.text === "string" && !hasVisible(message.text)) {
      // The box keeps the text, so the user sees what was refused.
      setComposeError(ERROR_TEXT.nothing_visible);
      el.composeText.focus();
      return;
    }
    if (message.type === "quit") {
      leave();
      return;
    }
    if (message.type === "who") {
      if (!state.joined) {
        setComposeError("Not connected.");
        return;
      }
      if (state.large) {
        pager.reset(el.memberSearch.value.trim());
      } else {
        askWholeList();
      }
      setComposeError("");
      el.composeText.value = "";
      return;
    }
    if (!state.joined || !send(message)) {
      setComposeError("Not connected: your message was not sent.");
      return;
    }
    setComposeError("");
    el.composeText.value = "";
  }

  // Slash commands; anything else goes to the chosen recipient.
  function parseCommand(text) {
    // Only the start is trimmed: "/msg bob \ufeff" must reach the
    // nothing-visible rule, not lose its body to trim().
    var match = /^\/(\w+)(?:\s+([\s\S]*))?$/.exec(text.replace(/^\s+/, ""));
    if (match) {
      var command = match[1].toLowerCase();
      var rest = match[2] || "";
      if (command === "msg" || command === "w") {
        var parts = /^(\S+)\s+([\s\S]+)$/.exec(rest);
        if (!parts) {
          setComposeError("Usage: /msg name text");
          return null;
        }
        return { type: "private", to: parts[1], text: parts[2] };
      }
      if (command === "who") {
        return { type: "who" };
      }
      if (command === "quit") {
        return { type: "quit" };
      }
    }
    var to = el.composeTo.value;
    return to ? { type: "private", to: to, text: text } : { type: "say", text: text };
  }

  function leave() {
    keepResume(null, null);  // we quit: there is no session to take back
    state.wanted = false;
    state.everJoined = false;
    window.clearTimeout(state.reconnectTimer);
    window.clearTimeout(state.helloTimer);
    var ws = state.ws;
    if (ws && ws.readyState === WebSocket.OPEN && state.joined) {
      ws.send(JSON.stringify({ type: "quit" }));
      // The server closes after quit; don't wait on it forever.
      window.setTimeout(function () {
        if (ws.readyState === WebSocket.OPEN) { ws.close(1000, "left"); }
      }, 2000);
    } else if (ws) {
      ws.close(1000, "left");
    }
    state.ws = null;
    state.joined = false;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
    }
    setStatus("offline");
    setJoinBusy(false);
    showChat(false);
    el.joinName.value = state.name || "";
    el.joinName.focus();
  }

  el.joinForm.addEventListener("submit", onJoinSubmit);
  el.compose.addEventListener("submit", onComposeSubmit);
  el.composeTo.addEventListener("change", updatePlaceholder);
  el.leaveButton.addEventListener("click", leave);
  el.memberMore.addEventListener("click", onMemberMore);
  el.memberSearch.addEventListener("input", onSearchInput);
  el.memberList.addEventListener("scroll", updateMemberMore, { passive: true });
  el.transcript.addEventListener("scroll", function () {
    state.pinned = nearBottom();
    if (el.transcript.scrollTop < OLDER_SCROLL_PX &&
        el.transcript.scrollHeight > el.transcript.clientHeight) {
      loadOlder();
    }
  }, { passive: true });
  if (window.ResizeObserver) {
    // A resize or rotation changes the transcript's height without a
    // scroll: a reader who was at the end stays at the end.
    new ResizeObserver(function () {
      if (state.pinned) {
        scrollToEnd();
      }
    }).observe(el.transcript);
    new ResizeObserver(updateMemberMore).observe(el.memberList);
  }
  el.composeText.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && el.composeTo.value) {
      el.composeTo.value = "";
      updatePlaceholder();
    }
  });
  window.addEventListener("online", function () {
    if (state.wanted && !state.ws) {
      state.attempt = 0;
      connect();
    }
  });
  window.addEventListener("offline", function () {
    if (state.wanted && !state.ws) {
      setStatus("offline", "\u2014 waiting for the network");
    }
  });
  // Closing the tab is leaving: the room then reads "left", not "connection lost".
  window.addEventListener("pagehide", function () {
    if (state.joined) {
      send({ type: "quit" });
    }
  });
  window.setInterval(heartbeat, 5000);
  setStatus("offline");
  el.joinName.focus();
}());
