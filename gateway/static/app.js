// The demo web app: chats and a community feed on top of /static/agora.js. No build step,
// no framework: a little state, and render functions that rebuild one region at a time.
import { AgoraClient, AgoraError, AgoraHttp } from "/static/agora.js";

const $ = (id) => document.getElementById(id);
const TYPING_SEND_EVERY_MS = 2000;
const TYPING_SHOW_MS = 3500;

/** h("li", {class: "x", onclick}, "text", child) -> an element; text is never HTML. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined && c !== false) {
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }
  return el;
}

const state = {
  me: null,
  token: null,
  client: null,
  http: null,
  convs: new Map(), // id -> conversation
  messages: new Map(), // conv -> Map(seq -> msg)
  pending: new Map(), // cid -> {conv, body}
  unread: new Map(), // conv -> count
  typing: new Map(), // conv -> Map(user -> until ms)
  open: null, // the open conversation id
  posts: new Map(), // post id -> post
  byThread: new Map(), // thread conv id -> post id
  feedThreads: new Set(), // threads subscribed for live scores
  post: null, // the open post id
  lastTypingSent: 0,
  creating: false, // a conversation create is in flight
  byId: new Map(), // message id -> its msg (current state: edits, deletes, reactions)
  floor: new Map(), // conv -> the seq the last history page reflected (older events skip)
  replyTo: null, // the message id the composer answers
  editing: null, // the message id the composer edits
  readSeq: new Map(), // conv -> my read pointer (the largest heard)
  latest: new Map(), // conv -> the largest seq seen
  receipts: new Map(), // conv -> Map(user -> seq they have read up to)
  online: new Map(), // user -> {online, last_seen}
};
const EVENT_KINDS = new Set(["edit", "delete", "react", "unreact"]);

function toast(text) {
  const t = $("toast");
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), 4000);
}

function fail(err) {
  console.error(err);
  toast(err instanceof AgoraError ? err.message : String(err));
}

// -- sign in ------------------------------------------------------------------------------
async function signIn(ev) {
  ev.preventDefault();
  $("signin-error").textContent = "";
  const user = $("signin-user").value.trim();
  const name = $("signin-name").value.trim() || undefined;
  const pasted = $("signin-token").value.trim();
  try {
    let token = pasted;
    if (!token) {
      const resp = await fetch("/v1/dev/token", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ user, name }),
      });
      if (resp.status === 404) {
        $("signin-token-box").hidden = false; // dev tokens are off on this server
        throw new Error("paste a token to sign in");
      }
      const data = await resp.json();
      if (!resp.ok) throw new Error(data.error ? data.error.message : resp.statusText);
      token = data.token;
    }
    sessionStorage.setItem("agora.token", token);
    await start(token);
  } catch (err) {
    $("signin-error").textContent = err.message;
  }
}

function signOut() {
  sessionStorage.removeItem("agora.token");
  location.reload();
}

async function start(token) {
  state.token = token;
  state.http = new AgoraHttp({ token });
  const me = await state.http.get("/v1/me");
  state.me = me.id;
  $("me").textContent = me.name && me.name !== me.id ? `${me.name} (${me.id})` : me.id;
  $("signin").hidden = true;
  $("app").hidden = false;

  const wsUrl = new URL("/v1/ws", location.href);
  const client = (state.client = new AgoraClient({ url: wsUrl.toString(), token }));
  window.agora = client; // for the console (and the end-to-end tests)
  client.on("state", renderConn);
  client.on("open", (hello) => {
    renderConn();
    $("conn").title = `node ${hello.node}`;
  });
  client.on("msg", onMsg);
  client.on("typing", onTyping);
  client.on("score", onScore);
  client.on("joined", (f) => addConversation(f.conv, true));
  client.on("read", onRead);
  client.on("receipt", onReceipt);
  client.on("notify", onNotify);
  client.on("presence", onPresence);
  client.on("gap", (g) => loadHistory(g.conv).catch(fail));
  client.on("unauthorized", () => {
    toast("Session expired: sign in again");
    sessionStorage.removeItem("agora.token");
    setTimeout(signOut, 1500);
  });
  client.connect();
  loadInbox().catch(fail);
  await loadConversations();
  route();
}

function renderConn() {
  const c = state.client;
  const el = $("conn");
  el.textContent = c.state === "open" ? `online · ${c.hello.node}` : c.state;
  el.className = `conn ${c.state}`;
}

// -- conversations ------------------------------------------------------------------------
async function loadConversations() {
  const page = await state.http.get("/v1/conversations?limit=100");
  for (const conv of page.items) addConversation(conv, false);
  renderConvList();
}

function addConversation(conv, announce) {
  const known = state.convs.has(conv.id);
  state.convs.set(conv.id, { ...state.convs.get(conv.id), ...conv });
  if (typeof conv.unread === "number") {
    // The server's count (texts of others after my read pointer) is the truth on load.
    if (conv.unread && !viewing(conv.id)) state.unread.set(conv.id, conv.unread);
    else state.unread.delete(conv.id);
    state.readSeq.set(conv.id, Math.max(state.readSeq.get(conv.id) || 0, conv.read_seq || 0));
  }
  if (!known) {
    state.client.subscribe(conv.id).catch(fail);
    loadPresence(conv.id).catch(() => {});
    // Not for one I am creating: its `joined` frame may beat the HTTP answer here.
    if (announce && !state.creating) toast(`You are in ${convName(conv)}`);
  }
  renderConvList();
}

function convName(conv) {
  if (conv.title) return conv.title;
  const others = conv.members.filter((m) => m !== state.me);
  return others.length ? others.join(", ") : "just you";
}

function renderConvList() {
  const items = [...state.convs.values()].sort(
    (a, b) => (b.last_activity || 0) - (a.last_activity || 0),
  );
  $("conv-list").replaceChildren(
    ...items.map((c) =>
      h(
        "li",
        {
          class: c.id === state.open ? "active" : "",
          "data-conv": c.id,
          onclick: () => (location.hash = `#/chat/${c.id}`),
        },
        h(
          "span",
          {},
          c.kind === "direct"
            ? h("span", { class: `dot ${c.members.some((m) => m !== state.me && isOnline(m)) ? "on" : ""}`, "data-testid": "dot" })
            : null,
          convName(c),
          h("span", { class: "muted" }, c.kind === "direct" ? "" : " · group"),
        ),
        state.unread.get(c.id) ? h("span", { class: "badge", "data-testid": "unread" }, state.unread.get(c.id)) : null,
      ),
    ),
  );
}

async function createConversation(ev) {
  ev.preventDefault();
  const kind = $("new-conv-kind").value;
  const members = $("new-conv-members")
    .value.split(",")
    .map((m) => m.trim())
    .filter(Boolean);
  const title = $("new-conv-title").value.trim();
  state.creating = true;
  try {
    const conv = await state.http.post("/v1/conversations", { kind, members, title });
    addConversation(conv, false);
    $("new-conv-members").value = $("new-conv-title").value = "";
    location.hash = `#/chat/${conv.id}`;
  } catch (err) {
    fail(err);
  } finally {
    state.creating = false;
  }
}

function store(conv, msg) {
  if (!state.messages.has(conv)) state.messages.set(conv, new Map());
  msg.reactions = msg.reactions || {};
  msg.mine = new Set(msg.my_reactions || []);
  state.messages.get(conv).set(msg.seq, msg);
  state.byId.set(msg.id, msg);
}

/** An edit, delete or reaction event: change its target (every sequenced reaction event
 * moves a count by exactly one, so counting is exact). */
function applyEvent(e) {
  if (e.seq <= (state.floor.get(e.conv) || 0)) return; // the history page reflects it
  const m = state.byId.get(e.ref);
  if (!m) return;
  if (e.kind === "edit") {
    m.body = e.body;
    m.edited = true;
  } else if (e.kind === "delete") {
    m.body = "";
    m.deleted = true;
    m.reactions = {};
    m.mine.clear();
  } else {
    const step = e.kind === "react" ? 1 : -1;
    const n = (m.reactions[e.body] || 0) + step;
    if (n > 0) m.reactions[e.body] = n;
    else delete m.reactions[e.body];
    if (e.from === state.me) {
      if (step > 0) m.mine.add(e.body);
      else m.mine.delete(e.body);
    }
  }
}

async function loadHistory(conv) {
  const page = await state.http.get(`/v1/conversations/${conv}/messages?limit=100`);
  for (const m of page.items) store(conv, m);
  state.latest.set(conv, Math.max(state.latest.get(conv) || 0, page.last_seq || 0));
  state.floor.set(conv, Math.max(state.floor.get(conv) || 0, page.last_seq || 0));
  if (conv === state.open) renderMessages();
  if (state.post && state.posts.get(state.post)?.thread === conv) renderComments();
}

async function openConversation(conv) {
  state.open = conv;
  state.unread.delete(conv);
  const c = state.convs.get(conv);
  $("chat-empty").hidden = true;
  $("chat").hidden = false;
  $("chat-title").textContent = c ? convName(c) : conv;
  renderConvList();
  renderMessages();
  renderTyping();
  renderPresence();
  $("composer-input").focus();
  await loadHistory(conv);
  markRead(conv);
  loadReceipts(conv).catch(() => {}); // 403 in big groups: no receipts there
}

/** Is `conv` on screen (open, its tab shown, the page visible)? Only then is it read. */
function viewing(conv) {
  return conv === state.open && !$("chats").hidden && document.visibilityState !== "hidden";
}

/** Tell the server (and so my other devices) that I have read the open conversation. */
function markRead(conv) {
  const seq = state.latest.get(conv) || 0;
  if (seq > (state.readSeq.get(conv) || 0) && viewing(conv)) {
    state.readSeq.set(conv, seq);
    state.client.read(conv, seq).catch(() => {}); // best effort: sent again on the next message
  }
}

function onRead(f) {
  // Another device (or this one) read up to f.seq: frames from two nodes may cross, keep the max.
  if (f.seq > (state.readSeq.get(f.conv) || 0)) state.readSeq.set(f.conv, f.seq);
  const readTo = state.readSeq.get(f.conv);
  const loaded = [...(state.messages.get(f.conv) || new Map()).values()];
  const left = loaded.filter((m) => m.seq > readTo && m.from !== state.me).length;
  if (left && !viewing(f.conv)) state.unread.set(f.conv, left);
  else state.unread.delete(f.conv);
  renderConvList();
}

// -- presence ------------------------------------------------------------------------------
async function loadPresence(conv) {
  const page = await state.http.get(`/v1/conversations/${conv}/presence?limit=100`);
  for (const p of page.items) state.online.set(p.user, { online: p.online, last_seen: p.last_seen });
  renderConvList();
  if (conv === state.open) renderPresence();
}

function onPresence(f) {
  state.online.set(f.user, { online: f.online, last_seen: f.last_seen });
  renderConvList();
  renderPresence();
}

function isOnline(user) {
  return Boolean(state.online.get(user)?.online);
}

/** The open conversation's members, each with a dot (green: online). */
function renderPresence() {
  const c = state.convs.get(state.open);
  if (!c) return;
  const others = c.members.filter((m) => m !== state.me);
  $("chat-members").replaceChildren(
    ...others.map((m) =>
      h("span", { class: "member", "data-testid": "member", "data-user": m, "data-online": isOnline(m) ? "yes" : "no" },
        h("span", { class: `dot ${isOnline(m) ? "on" : ""}` }), m),
    ),
  );
}

// -- notifications -------------------------------------------------------------------------
const NOTE_TEXT = { mention: "mentioned you", reply: "replied to you", dm: "wrote to you" };

function setBell(n) {
  state.bell = Math.max(0, n);
  $("bell-count").textContent = String(state.bell);
}

async function loadInbox() {
  const page = await state.http.get("/v1/notifications?limit=30");
  setBell(page.unread);
  $("inbox-list").replaceChildren(
    ...page.items.map((n) =>
      h(
        "li",
        { class: n.read ? "" : "unread", "data-testid": "note", onclick: () => (location.hash = `#/chat/${n.conv}`) },
        `${n.from} ${NOTE_TEXT[n.kind] || n.kind}: ${n.excerpt}`,
      ),
    ),
  );
}

function onNotify(f) {
  setBell((state.bell || 0) + 1);
  toast(`${f.n.from} ${NOTE_TEXT[f.n.kind] || f.n.kind}`);
  if (!$("inbox").hidden) loadInbox().catch(fail);
}

async function toggleInbox() {
  $("inbox").hidden = !$("inbox").hidden;
  if (!$("inbox").hidden) await loadInbox();
}

async function readAllNotes() {
  await state.http.post("/v1/notifications/read", {});
  await loadInbox();
}

async function loadReceipts(conv) {
  const page = await state.http.get(`/v1/conversations/${conv}/receipts`);
  const map = state.receipts.get(conv) || new Map();
  for (const r of page.items) map.set(r.user, Math.max(map.get(r.user) || 0, r.seq));
  state.receipts.set(conv, map);
  if (conv === state.open) renderMessages();
}

function onReceipt(f) {
  if (!state.receipts.has(f.conv)) state.receipts.set(f.conv, new Map());
  const map = state.receipts.get(f.conv);
  map.set(f.user, Math.max(map.get(f.user) || 0, f.seq));
  if (f.conv === state.open) renderMessages();
}

/** Who has read up to my last message of the open conversation ("seen by ..."). */
function seenLine(msgs) {
  const mine = msgs.filter((m) => m.from === state.me && m.seq);
  if (!mine.length) return null;
  const last = mine[mine.length - 1].seq;
  const who = [...(state.receipts.get(state.open) || new Map()).entries()]
    .filter(([user, seq]) => user !== state.me && seq >= last)
    .map(([user]) => user);
  return who.length ? `seen by ${who.join(", ")}` : null;
}

function messageItem(m, pending) {
  const mine = m.from === state.me;
  const quoted = m.reply_to ? state.byId.get(m.reply_to) : null;
  const actions = [];
  if (!pending && !m.deleted && m.id && m.conv === state.open) {
    actions.push(h("button", { class: "link", "data-testid": "reply", onclick: () => startReply(m) }, "reply"));
    actions.push(h("button", { class: "link", "data-testid": "react", onclick: () => toggleReaction(m, "👍") }, "👍"));
    if (mine) {
      actions.push(h("button", { class: "link", "data-testid": "edit", onclick: () => startEdit(m) }, "edit"));
      actions.push(h("button", { class: "link", "data-testid": "delete", onclick: () => deleteMsg(m) }, "delete"));
    }
  }
  const chips = Object.entries(m.reactions || {}).map(([emoji, n]) =>
    h(
      "button",
      { class: `chip ${m.mine && m.mine.has(emoji) ? "on" : ""}`, "data-testid": "reaction", onclick: () => toggleReaction(m, emoji) },
      `${emoji} ${n}`,
    ),
  );
  return h(
    "li",
    { class: `${mine ? "mine" : ""} ${pending ? "pending" : ""}`, "data-seq": m.seq ?? "", "data-id": m.id ?? "" },
    h("div", { class: "from" }, mine ? "you" : m.from, m.service ? h("span", { class: "badge service", "data-testid": "service" }, "service") : null),
    m.reply_to
      ? h("div", { class: "quote", "data-testid": "quote" }, `↪ ${quoted ? (quoted.deleted ? "deleted message" : quoted.body) : "an earlier message"}`)
      : null,
    m.deleted
      ? h("div", { class: "body deleted", "data-testid": "tombstone" }, "message deleted")
      : h("div", { class: "body" }, m.body, m.edited ? h("span", { class: "muted", "data-testid": "edited" }, " (edited)") : null),
    chips.length ? h("div", { class: "row chips" }, chips) : null,
    actions.length ? h("div", { class: "row actions" }, actions) : null,
  );
}

function composerMode() {
  const target = state.byId.get(state.replyTo || state.editing);
  $("composer-mode").hidden = !target;
  $("composer-mode-text").textContent = !target
    ? ""
    : state.editing
      ? "Editing your message"
      : `Replying to ${target.from}: ${target.body.slice(0, 60)}`;
}

function startReply(m) {
  state.editing = null;
  state.replyTo = m.id;
  composerMode();
  $("composer-input").focus();
}

function startEdit(m) {
  state.replyTo = null;
  state.editing = m.id;
  $("composer-input").value = m.body;
  composerMode();
  $("composer-input").focus();
}

function cancelMode() {
  if (state.editing) $("composer-input").value = "";
  state.replyTo = state.editing = null;
  composerMode();
}

async function deleteMsg(m) {
  try {
    await state.client.deleteMessage(m.conv, m.id);
  } catch (err) {
    fail(err);
  }
}

async function toggleReaction(m, emoji) {
  try {
    await state.client.react(m.conv, m.id, emoji, { remove: m.mine.has(emoji) });
  } catch (err) {
    fail(err);
  }
}

function renderMessages() {
  const conv = state.open;
  if (!conv) return;
  const list = $("messages");
  const stuckToBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const msgs = [...(state.messages.get(conv) || new Map()).values()].sort((a, b) => a.seq - b.seq);
  const seen = new Set(msgs.map((m) => m.cid));
  const pending = [...state.pending.entries()]
    .filter(([cid, p]) => p.conv === conv && !seen.has(cid))
    .map(([cid, p]) => ({ from: state.me, body: p.body, cid }));
  list.replaceChildren(...msgs.map((m) => messageItem(m, false)), ...pending.map((m) => messageItem(m, true)));
  $("seen").textContent = seenLine(msgs) || "";
  if (stuckToBottom) list.scrollTop = list.scrollHeight;
}

function onMsg(m) {
  state.latest.set(m.conv, Math.max(state.latest.get(m.conv) || 0, m.seq));
  if (EVENT_KINDS.has(m.kind)) {
    applyEvent(m);
    if (m.conv === state.open) renderMessages();
    const postId = state.byThread.get(m.conv);
    if (postId && postId === state.post) renderComments();
    return;
  }
  store(m.conv, m);
  const conv = state.convs.get(m.conv);
  if (conv) {
    conv.last_activity = m.ts;
    if (!viewing(m.conv) && m.from !== state.me) {
      state.unread.set(m.conv, (state.unread.get(m.conv) || 0) + 1);
    }
    renderConvList();
  }
  clearTyping(m.conv, m.from);
  if (m.conv === state.open) {
    renderMessages();
    markRead(m.conv);
  }
  const postId = state.byThread.get(m.conv);
  if (postId) {
    const p = state.posts.get(postId);
    if (p) p.comments = Math.max(p.comments, m.seq);
    if (postId === state.post) renderComments();
    renderFeed();
  }
}

async function sendMessage(ev) {
  ev.preventDefault();
  const input = $("composer-input");
  const body = input.value.trim();
  if (!body || !state.open) return;
  input.value = "";
  const editing = state.editing;
  const replyTo = state.replyTo;
  state.editing = state.replyTo = null;
  composerMode();
  if (editing) {
    try {
      await state.client.edit(state.open, editing, body);
    } catch (err) {
      fail(err);
    }
    return;
  }
  await sendTo(state.open, body, renderMessages, replyTo);
}

async function sendTo(conv, body, rerender, replyTo = null) {
  const cid = crypto.getRandomValues(new Uint32Array(3)).join("-");
  state.pending.set(cid, { conv, body });
  rerender();
  try {
    await state.client.send(conv, body, { cid, replyTo });
  } catch (err) {
    fail(err);
  } finally {
    state.pending.delete(cid);
    rerender();
  }
}

// -- typing -------------------------------------------------------------------------------
function onComposerInput() {
  const now = Date.now();
  if (state.open && now - state.lastTypingSent > TYPING_SEND_EVERY_MS) {
    state.lastTypingSent = now;
    state.client.typing(state.open);
  }
}

function onTyping(f) {
  if (f.user === state.me) return;
  if (!state.typing.has(f.conv)) state.typing.set(f.conv, new Map());
  state.typing.get(f.conv).set(f.user, Date.now() + TYPING_SHOW_MS);
  renderTyping();
  setTimeout(renderTyping, TYPING_SHOW_MS + 50);
}

function clearTyping(conv, user) {
  state.typing.get(conv)?.delete(user);
  if (conv === state.open) renderTyping();
}

function renderTyping() {
  const now = Date.now();
  const who = [...(state.typing.get(state.open) || new Map()).entries()]
    .filter(([, until]) => until > now)
    .map(([u]) => u);
  $("typing").textContent = who.length ? `${who.join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
}

// -- community ----------------------------------------------------------------------------
function voteBox(p, big) {
  const vote = (value) => () => castVote(p.id, p.my_vote === value ? 0 : value);
  return h(
    "div",
    { class: "votes", "data-post": p.id },
    h("button", { class: `up ${p.my_vote === 1 ? "on" : ""}`, title: "upvote", "data-testid": "vote-up", onclick: vote(1) }, "▲"),
    h("span", { class: "score", "data-testid": big ? "post-score" : "score" }, p.score),
    h("button", { class: `down ${p.my_vote === -1 ? "on" : ""}`, title: "downvote", "data-testid": "vote-down", onclick: vote(-1) }, "▼"),
  );
}

async function loadFeed() {
  const kind = $("feed-kind").value;
  const community = $("feed-community").value.trim();
  const q = new URLSearchParams({ limit: "25" });
  if (community) q.set("community", community);
  let page;
  try {
    page = await state.http.get(`/v1/feeds/${kind}?${q}`);
  } catch (err) {
    fail(err);
    return;
  }
  // Follow the visible posts' threads: their `score` frames keep the numbers live.
  const wanted = new Set(page.items.map((p) => p.thread));
  for (const t of state.feedThreads) {
    if (!wanted.has(t) && state.posts.get(state.byThread.get(t))?.id !== state.post) {
      state.client.unsubscribe(t).catch(() => {});
      state.feedThreads.delete(t);
    }
  }
  for (const p of page.items) {
    state.posts.set(p.id, p);
    state.byThread.set(p.thread, p.id);
    if (!state.feedThreads.has(p.thread)) {
      state.feedThreads.add(p.thread);
      state.client.subscribe(p.thread).catch(fail);
    }
  }
  state.feedOrder = page.items.map((p) => p.id);
  renderFeed();
}

function renderFeed() {
  const ids = state.feedOrder || [];
  $("post-list").replaceChildren(
    ...ids.map((id) => {
      const p = state.posts.get(id);
      return h(
        "li",
        { class: id === state.post ? "active" : "", "data-post": id },
        voteBox(p, false),
        h(
          "div",
          { onclick: () => (location.hash = `#/post/${id}`), style: "flex:1" },
          h("div", { class: "post-title", "data-testid": "post-title" }, p.title),
          h("div", { class: "muted" }, `c/${p.community} · ${p.author} · ${p.comments} comment${p.comments === 1 ? "" : "s"}`),
        ),
      );
    }),
  );
}

async function castVote(postId, value) {
  try {
    const r = await state.http.put(`/v1/posts/${postId}/vote`, { value });
    const p = state.posts.get(postId);
    if (p) Object.assign(p, { my_vote: r.my_vote, score: r.score, up: r.up ?? p.up, down: r.down ?? p.down });
    renderFeed();
    if (postId === state.post) renderPost();
  } catch (err) {
    fail(err);
  }
}

function onScore(f) {
  const p = state.posts.get(f.post);
  if (!p) return;
  Object.assign(p, { score: f.score, up: f.up, down: f.down });
  renderFeed();
  if (f.post === state.post) renderPost();
  for (const el of document.querySelectorAll(`.votes[data-post="${f.post}"] .score`)) {
    el.classList.add("flash");
  }
}

async function createPost(ev) {
  ev.preventDefault();
  try {
    const post = await state.http.post("/v1/posts", {
      community: $("new-post-community").value.trim(),
      title: $("new-post-title").value.trim(),
      body: $("new-post-body").value,
    });
    $("new-post-title").value = $("new-post-body").value = "";
    state.posts.set(post.id, post);
    state.byThread.set(post.thread, post.id);
    $("feed-kind").value = "new";
    await loadFeed();
    location.hash = `#/post/${post.id}`;
  } catch (err) {
    fail(err);
  }
}

async function openPost(id) {
  state.post = id;
  let p = state.posts.get(id);
  if (!p) {
    p = await state.http.get(`/v1/posts/${id}`);
    state.posts.set(id, p);
    state.byThread.set(p.thread, id);
  }
  if (!state.feedThreads.has(p.thread)) {
    state.feedThreads.add(p.thread);
    state.client.subscribe(p.thread).catch(fail);
  }
  $("post-empty").hidden = true;
  $("post").hidden = false;
  renderFeed();
  renderPost();
  renderComments();
  await loadHistory(p.thread);
}

function renderPost() {
  const p = state.posts.get(state.post);
  if (!p) return;
  $("post-votes").replaceWith(Object.assign(voteBox(p, true), { id: "post-votes" }));
  $("post-title").textContent = p.title;
  $("post-meta").textContent = `c/${p.community} · by ${p.author} · ${new Date(p.created_at).toLocaleString()}`;
  $("post-body").textContent = p.body;
}

function renderComments() {
  const p = state.posts.get(state.post);
  if (!p) return;
  const msgs = [...(state.messages.get(p.thread) || new Map()).values()].sort((a, b) => a.seq - b.seq);
  const seen = new Set(msgs.map((m) => m.cid));
  const pending = [...state.pending.entries()]
    .filter(([cid, x]) => x.conv === p.thread && !seen.has(cid))
    .map(([cid, x]) => ({ from: state.me, body: x.body, cid }));
  $("comments").replaceChildren(...msgs.map((m) => messageItem(m, false)), ...pending.map((m) => messageItem(m, true)));
}

async function sendComment(ev) {
  ev.preventDefault();
  const p = state.posts.get(state.post);
  const body = $("comment-input").value.trim();
  if (!p || !body) return;
  $("comment-input").value = "";
  await sendTo(p.thread, body, renderComments);
}

// -- navigation ---------------------------------------------------------------------------
function showTab(name) {
  $("chats").hidden = name !== "chats";
  $("feed").hidden = name !== "feed";
  $("tab-chats").classList.toggle("active", name === "chats");
  $("tab-feed").classList.toggle("active", name === "feed");
}

function route() {
  const [, view, id] = location.hash.split("/");
  if (view === "post" && id) {
    showTab("feed");
    if (!state.feedOrder) loadFeed();
    openPost(id).catch(fail);
  } else if (view === "feed") {
    showTab("feed");
    loadFeed();
  } else {
    showTab("chats");
    if (view === "chat" && id) openConversation(id).catch(fail);
  }
}

function init() {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", signOut);
  $("new-conv").addEventListener("submit", createConversation);
  $("composer").addEventListener("submit", sendMessage);
  $("composer-input").addEventListener("input", onComposerInput);
  $("composer-cancel").addEventListener("click", cancelMode);
  $("bell").addEventListener("click", () => toggleInbox().catch(fail));
  $("inbox-read").addEventListener("click", () => readAllNotes().catch(fail));
  $("new-post").addEventListener("submit", createPost);
  $("comment-form").addEventListener("submit", sendComment);
  $("feed-kind").addEventListener("change", loadFeed);
  $("feed-refresh").addEventListener("click", loadFeed);
  $("feed-community").addEventListener("change", loadFeed);
  $("tab-chats").addEventListener("click", () => (location.hash = state.open ? `#/chat/${state.open}` : "#/chats"));
  $("tab-feed").addEventListener("click", () => (location.hash = state.post ? `#/post/${state.post}` : "#/feed"));
  window.addEventListener("hashchange", route);
  const saved = sessionStorage.getItem("agora.token");
  if (saved) {
    start(saved).catch(() => {
      sessionStorage.removeItem("agora.token");
      $("signin").hidden = false;
    });
  } else {
    $("signin").hidden = false;
  }
}

init();
