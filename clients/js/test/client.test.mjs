// The client's reconnect, resume and retry rules against a scripted socket (no network).
import assert from "node:assert/strict";
import { beforeEach, test } from "node:test";

import { AgoraClient, CloseCode, backoffDelay, reconnectDelay } from "agora-client";
import { FakeSocket, until } from "../fake.mjs";

const FAST = { baseMs: 1, maxMs: 5 };

function client(extra = {}) {
  return new AgoraClient({
    url: ["ws://a/v1/ws", "ws://b/v1/ws"],
    token: "tok",
    WebSocket: FakeSocket,
    backoff: FAST,
    requestTimeoutMs: 500,
    ...extra,
  });
}

function lastFrame(sock, t) {
  const found = sock.frames().filter((f) => f.t === t);
  return found[found.length - 1];
}

beforeEach(() => FakeSocket.reset());

test("reconnectDelay follows the close codes", () => {
  const zero = () => 0;
  for (const code of [CloseCode.NORMAL, CloseCode.TOO_LARGE, CloseCode.PROTOCOL_ERROR]) {
    assert.equal(reconnectDelay(code, 0, {}, zero), null);
  }
  assert.equal(reconnectDelay(CloseCode.UNAUTHORIZED, 0, {}, zero), null);
  assert.equal(reconnectDelay(CloseCode.TRY_AGAIN_LATER, 0, {}, zero), 1000);
  assert.equal(reconnectDelay(CloseCode.RATE_LIMITED, 0, {}, zero), 1000);
  assert.equal(reconnectDelay(CloseCode.ABNORMAL, 0, { neverOpened: true }, zero), 1000);
  assert.equal(reconnectDelay(CloseCode.GOING_AWAY, 0, {}, zero), 0);
  assert.equal(reconnectDelay(CloseCode.INTERNAL, 0, { retryAfterMs: 7000 }, zero), 7000);
  const almostOne = () => 0.999999;
  assert.ok(backoffDelay(3, { baseMs: 100, maxMs: 30000 }, almostOne) < 800);
  assert.ok(backoffDelay(40, { baseMs: 100, maxMs: 30000 }, almostOne) < 30000);
});

test("token goes on the URL, each attempt takes the next URL", async () => {
  const c = client();
  c.connect();
  const first = FakeSocket.last();
  assert.equal(first.url, "ws://a/v1/ws?token=tok");
  assert.equal(first.protocol, "chat.v1.json");
  first.open();
  first.drop(CloseCode.GOING_AWAY);
  await until(() => FakeSocket.all.length === 2, "a second attempt");
  assert.equal(FakeSocket.last().url, "ws://b/v1/ws?token=tok");
  c.close();
});

test("after a drop it resubscribes with since and drops duplicates", async () => {
  const c = client();
  const got = [];
  c.on("msg", (m) => got.push(m.seq));
  c.connect();
  const s1 = FakeSocket.last();
  s1.open();
  const sub = c.subscribe("1");
  const req = lastFrame(s1, "sub");
  assert.equal(req.since, undefined);
  s1.deliver({ t: "subbed", rid: req.rid, conv: "1", seq: 5, recovered: false });
  assert.equal((await sub).seq, 5);
  s1.deliver({ t: "msg", conv: "1", id: "9", seq: 6, from: "x", body: "b", ts: 1, cid: "c", kind: "text" });
  s1.drop(1006);

  await until(() => FakeSocket.all.length === 2, "a reconnect");
  const s2 = FakeSocket.last();
  s2.open();
  await until(() => lastFrame(s2, "sub"), "the resubscription");
  const resub = lastFrame(s2, "sub");
  assert.deepEqual([resub.conv, resub.since], ["1", 6]);
  // The server replays from since: seq 6 again is a duplicate, 7 is new.
  for (const seq of [6, 7]) {
    s2.deliver({ t: "msg", conv: "1", id: String(seq), seq, from: "x", body: "b", ts: 1, cid: "c", kind: "text" });
  }
  s2.deliver({ t: "subbed", rid: resub.rid, conv: "1", seq: 7, recovered: true });
  assert.deepEqual(got, [6, 7]);
  assert.equal(c.lastSeq("1"), 7);
  c.close();
});

test("a gap the server could not replay is reported", async () => {
  const c = client();
  const gaps = [];
  c.on("gap", (g) => gaps.push(g));
  c.connect();
  const s = FakeSocket.last();
  s.open();
  const sub = c.subscribe("1", { since: 3 });
  const req = lastFrame(s, "sub");
  assert.equal(req.since, 3);
  s.deliver({ t: "subbed", rid: req.rid, conv: "1", seq: 5000, recovered: false });
  await sub;
  assert.deepEqual(gaps, [{ conv: "1", after: 3, before: 5001 }]);
  c.close();
});

test("an unacknowledged send is sent again with the same cid after a reconnect", async () => {
  const c = client();
  c.connect();
  const s1 = FakeSocket.last();
  s1.open();
  const sending = c.send("1", "hello", { cid: "cid-1" });
  await until(() => lastFrame(s1, "send"), "the send");
  assert.equal(lastFrame(s1, "send").cid, "cid-1");
  s1.drop(1006); // the ack is lost with the connection
  await until(() => FakeSocket.all.length === 2, "a reconnect");
  const s2 = FakeSocket.last();
  s2.open();
  await until(() => lastFrame(s2, "send"), "the resend");
  const again = lastFrame(s2, "send");
  assert.deepEqual([again.cid, again.body], ["cid-1", "hello"]);
  s2.deliver({ t: "ack", rid: again.rid, cid: "cid-1", id: "77", ts: 1 });
  assert.equal((await sending).id, "77");
  assert.deepEqual(c.unacked, []);
  c.close();
});

test("unavailable is retried with the same cid; bad_request is not", async () => {
  const c = client();
  c.connect();
  const s = FakeSocket.last();
  s.open();
  const sending = c.send("1", "x", { cid: "cid-2" });
  await until(() => lastFrame(s, "send"), "the send");
  const first = lastFrame(s, "send");
  s.deliver({ t: "err", rid: first.rid, code: "unavailable", msg: "down", retry_after_ms: 5 });
  await until(() => s.frames().filter((f) => f.t === "send").length === 2, "the retry");
  const second = lastFrame(s, "send");
  assert.equal(second.cid, "cid-2");
  assert.notEqual(second.rid, first.rid);
  s.deliver({ t: "err", rid: second.rid, code: "bad_request", msg: "no" });
  await assert.rejects(sending, (err) => err.code === "bad_request");
  c.close();
});

test("4001 waits for a new token, then reconnects at once", async () => {
  const c = client();
  let unauthorized = 0;
  c.on("unauthorized", () => unauthorized++);
  c.connect();
  const s = FakeSocket.last();
  s.open();
  s.drop(CloseCode.UNAUTHORIZED, "expired");
  assert.equal(c.state, "unauthorized");
  assert.equal(unauthorized, 1);
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(FakeSocket.all.length, 1); // no retry with the old token
  c.setToken("fresh");
  assert.equal(FakeSocket.all.length, 2);
  assert.match(FakeSocket.last().url, /token=fresh/);
  c.close();
});

test("final close codes stop the client and fail pending sends", async () => {
  const c = client();
  c.connect();
  const s = FakeSocket.last();
  s.open();
  const sending = c.send("1", "x");
  s.drop(CloseCode.PROTOCOL_ERROR);
  await assert.rejects(sending, (err) => err.code === "closed");
  assert.equal(c.state, "closed");
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(FakeSocket.all.length, 1);
});

test("a draining node's reconnect frame moves the client after after_ms, not before", async () => {
  const c = client();
  c.connect();
  const s1 = FakeSocket.last();
  s1.open();
  const told = Date.now();
  s1.deliver({ t: "reconnect", after_ms: 60 });
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(FakeSocket.all.length, 1); // still on the draining node
  await until(() => FakeSocket.all.length === 2, "the move", 2000);
  assert.ok(Date.now() - told >= 55, "moved early");
  assert.equal(s1.closedWith, 1000);
  c.close();
});

test("msgpack: binary frames on chat.v1.msgpack", async () => {
  const { decode, encode } = await import("agora-client/msgpack");
  const c = client({ encoding: "msgpack" });
  c.connect();
  const s = FakeSocket.last();
  assert.equal(s.protocol, "chat.v1.msgpack");
  assert.equal(s.binaryType, "arraybuffer");
  s.onopen({});
  const hello = encode({ t: "hello", user: "u", node: "n", hb: 25000, max_frame: 65536 });
  s.onmessage({ data: hello.buffer.slice(hello.byteOffset, hello.byteOffset + hello.length) });
  assert.equal(c.state, "open");
  const ping = c.ping();
  const sent = decode(s.sent[s.sent.length - 1]);
  assert.equal(sent.t, "ping");
  s.onmessage({ data: encode({ t: "pong", rid: sent.rid }) });
  assert.equal((await ping).t, "pong");
  assert.throws(() => client({ encoding: "xml" }), TypeError);
  c.close();
});

test("a token provider renews the session with auth before hello.exp", async () => {
  let issued = 0;
  const c = client({ tokenProvider: async () => `fresh${++issued}`, refreshMarginMs: 1000 });
  c.connect();
  const s = FakeSocket.last();
  const expIn = (sec) => Math.floor(Date.now() / 1000) + sec;
  s.open({ t: "hello", user: "u", node: "n1", hb: 25000, max_frame: 65536, exp: expIn(1) });
  await until(() => lastFrame(s, "auth"), "an auth frame", 3000);
  const auth = lastFrame(s, "auth");
  assert.equal(auth.token, "fresh1");
  s.deliver({ t: "ok", rid: auth.rid, exp: expIn(3600) });
  await until(() => c.refreshes === 1, "the refresh to count");
  assert.equal(c.token, "fresh1"); // also for the next connection
  assert.equal(FakeSocket.all.length, 1); // the same session all along
  c.close();
});

test("with a token provider a 4001 reconnects with a fresh token", async () => {
  const c = client({ tokenProvider: async () => "fresh" });
  c.connect();
  FakeSocket.last().open();
  FakeSocket.last().drop(CloseCode.UNAUTHORIZED, "token expired");
  await until(() => FakeSocket.all.length === 2, "a reconnect");
  assert.match(FakeSocket.last().url, /token=fresh/);
  c.close();
});

test("unsubbed forgets the subscription: it is not resumed", async () => {
  const c = client();
  const told = [];
  c.on("unsubbed", (f) => told.push([f.conv, f.reason]));
  c.connect();
  const s = FakeSocket.last();
  s.open();
  for (const conv of ["1", "2"]) {
    const pending = c.subscribe(conv);
    const sub = lastFrame(s, "sub");
    s.deliver({ t: "subbed", rid: sub.rid, conv, seq: 0, recovered: false });
    await pending;
  }
  s.deliver({ t: "unsubbed", conv: "1", reason: "removed" });
  assert.deepEqual(told, [["1", "removed"]]);
  s.drop(CloseCode.GOING_AWAY);
  await until(() => FakeSocket.all.length === 2, "a reconnect");
  const next = FakeSocket.last();
  next.open();
  await until(() => lastFrame(next, "sub"), "the resubscription");
  assert.deepEqual(next.frames().filter((f) => f.t === "sub").map((f) => f.conv), ["2"]);
  c.close();
});
