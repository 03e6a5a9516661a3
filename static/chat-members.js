/* The member panel: the whole list of a small room, the paged and
 * searchable panel of a large one (member-pager.js), and the "To" menu.
 * Part of the chat room page; the parts share one namespace, window.Chat
 * (chat-base.js makes it).  No HTML is ever built from chat text:
 * everything from the wire goes in through textContent. */
(function () {
  "use strict";

  var C = window.Chat;
  var el = C.el;
  var state = C.state;

  // Limits and texts of this part.
  // A large room's "To" menu lists the members picked or heard from lately.
  var MAX_RECENTS = 20;
  // Typing in the member search waits this long for a pause (ms).
  var SEARCH_PAUSE_MS = 200;

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
      body.setAttribute("aria-label", "Message " + C.nameOf(label) + " privately");
      body.addEventListener("click", function () { chooseRecipient(label); });
    }
    body.appendChild(C.span("member-name", C.nameOf(label)));
    if (label === state.label) {
      body.appendChild(C.span("you-badge", "you"));
    }
    body.appendChild(C.span("member-addr", "@" + C.addressOf(label)));
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
      if (!C.send(who)) {
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
    } else if (!large) {
      // Small (again): joins and leaves are announced from here on, and a
      // whole list replaces whatever we had, which missed some (the room
      // was large for a moment, or could not record them).
      if (state.large) {
        showLarge(false);
      }
      askWholeList();
    }
  }

  function askWholeList() {
    if (C.send({ type: "who" })) {
      state.whoQueue.push({ kind: "full" });
    }
  }

  function searchNow() {
    window.clearTimeout(state.searchTimer);
    if (state.large) {
      pager.reset(el.memberSearch.value.trim());
    }
  }

  function onSearchInput() {
    window.clearTimeout(state.searchTimer);
    state.searchTimer = window.setTimeout(searchNow, SEARCH_PAUSE_MS);
  }

  // Enter searches without waiting for the pause.
  function onSearchKey(event) {
    if (event.key === "Enter") {
      event.preventDefault();
      searchNow();
    }
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
        option.textContent = C.nameOf(label);
        select.appendChild(option);
      }
    });
    if (chosen && (state.large ? labels.indexOf(chosen) < 0 : !state.members.has(chosen))) {
      // Never fall back to Everyone behind the user's back: a private
      // message must not go to the whole room because its reader left.
      var gone = document.createElement("option");
      gone.value = chosen;
      gone.textContent = C.nameOf(chosen) + " (not here)";
      select.appendChild(gone);
    }
    select.value = chosen;
    updatePlaceholder();
  }

  function updatePlaceholder() {
    var to = el.composeTo.value;
    el.composeText.placeholder = to ? "Private message to " + C.nameOf(to) : "Message everyone";
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

  C.setMembers = setMembers;
  C.collectMembers = collectMembers;
  C.setMembersStale = setMembersStale;
  C.updateMemberMore = updateMemberMore;
  C.onMemberMore = onMemberMore;
  C.addMember = addMember;
  C.removeMember = removeMember;
  C.pager = pager;
  C.showLarge = showLarge;
  C.onMembers = onMembers;
  C.onPresence = onPresence;
  C.askWholeList = askWholeList;
  C.onSearchInput = onSearchInput;
  C.onSearchKey = onSearchKey;
  C.remember = remember;
  C.renderRecipients = renderRecipients;
  C.updatePlaceholder = updatePlaceholder;
}());
