// The client under Node against a real gateway, in both encodings. Started by
// tests/integration/test_js_client.py, which runs the stack and passes, in the environment:
// AGORA_LIVE_WS (the WebSocket URL), AGORA_LIVE_TOKEN_A / _B (two members of the group
// AGORA_LIVE_CONV), AGORA_LIVE_HTTP and AGORA_LIVE_VERSION (what /healthz must say). Node 20
// needs --experimental-websocket for its WebSocket.
import assert from "node:assert/strict";
import { test } from "node:test";

import { AgoraClient, AgoraHttp } from "agora-client";

const env = process.env;
const live = env.AGORA_LIVE_WS && globalThis.WebSocket;
const skip = live ? false : "needs AGORA_LIVE_* (tests/integration/test_js_client.py) and a WebSocket";

function open(token, encoding) {
  const c = new AgoraClient({ url: env.AGORA_LIVE_WS, token, encoding, backoff: { baseMs: 50, maxMs: 500 } });
  const msgs = [];
  c.on("msg", (m) => msgs.push(m));
  c.connect();
  return { c, msgs };
}

async function until(cond, what, ms = 20000) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test("json and msgpack clients talk through the gateway, and one resumes after a drop", { skip }, async () => {
  const conv = env.AGORA_LIVE_CONV;
  const a = open(env.AGORA_LIVE_TOKEN_A, "json");
  const b = open(env.AGORA_LIVE_TOKEN_B, "msgpack");
  try {
    await until(() => a.c.state === "open" && b.c.state === "open", "both open");
    assert.equal(typeof b.c.hello.hb, "number"); // hello decoded from MessagePack
    await a.c.subscribe(conv);
    await b.c.subscribe(conv);

    const ack = await a.c.send(conv, "from json", { cid: "js-a-1" });
    assert.match(ack.id, /^[0-9]+$/);
    const back = await b.c.send(conv, "from msgpack ✓", { cid: "js-b-1" });
    await until(() => a.msgs.length >= 2 && b.msgs.length >= 2, "both messages on both sides");
    for (const side of [a, b]) {
      assert.deepEqual(side.msgs.map((m) => m.body), ["from json", "from msgpack ✓"]);
      assert.deepEqual(side.msgs.map((m) => m.id), [ack.id, back.id]);
    }
    // A repeated cid is the same message, never a second one.
    assert.equal((await a.c.send(conv, "again", { cid: "js-a-1" })).id, ack.id);

    // b loses its connection; what a sends meanwhile is replayed on b's resubscribe.
    const seqBefore = b.c.lastSeq(conv);
    b.c._drop();
    const during = await a.c.send(conv, "while b was away", { cid: "js-a-2" });
    await until(() => b.c.connects === 2 && b.msgs.some((m) => m.id === during.id), "b resumed");
    const seqs = b.msgs.map((m) => m.seq);
    assert.deepEqual(seqs, [...new Set(seqs)]); // no duplicate
    assert.equal(b.c.lastSeq(conv), seqBefore + 1);

    const bad = await a.c.send(conv, "x".repeat(4001)).catch((err) => err);
    assert.equal(bad.code, "too_large");
  } finally {
    a.c.close();
    b.c.close();
  }
});

test("the HTTP helper under Node: /healthz names the version, errors are AgoraError", { skip }, async () => {
  const anon = new AgoraHttp({ base: env.AGORA_LIVE_HTTP });
  const health = await anon.get("/healthz");
  assert.equal(health.status, "ok");
  assert.equal(health.version, env.AGORA_LIVE_VERSION);
  const denied = await anon.get("/v1/me").catch((err) => err);
  assert.deepEqual([denied.code, denied.status], ["unauthorized", 401]);
  const me = await new AgoraHttp({ base: env.AGORA_LIVE_HTTP, token: env.AGORA_LIVE_TOKEN_A }).get("/v1/me");
  assert.match(me.id, /^jsa-/);
});
