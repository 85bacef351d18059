// Not run: compiled by `tsc --noEmit` to check that agora.d.ts describes a usable API.
import {
  AgoraClient,
  AgoraError,
  AgoraHttp,
  CloseCode,
  backoffDelay,
  reconnectDelay,
  type Ack,
  type Msg,
  type ServerFrame,
} from "agora-client";
import { decode, encode } from "agora-client/msgpack";

export async function example(token: string): Promise<string> {
  const client = new AgoraClient({ url: ["wss://a/v1/ws", "wss://b/v1/ws"], token, encoding: "msgpack" });
  const off = client.on("msg", (m: Msg) => console.log(m.conv, m.seq, m.body.length));
  client.on("gap", (g) => console.log(g.conv, g.after ?? 0, g.before));
  client.on("close", (c) => console.log(c.code === CloseCode.SLOW_CONSUMER, c.reconnectInMs));
  client.on("unauthorized", () => client.setToken("new"));
  client.connect();
  const subbed = await client.subscribe("42", { since: 7 });
  if (subbed !== null && !subbed.recovered) console.log("fetch over HTTP");
  const ack: Ack = await client.send(42, "hello", { kind: "text" });
  await client.send(42, "re", { replyTo: ack.id });
  await client.edit(42, ack.id, "hello!");
  await client.react(42, ack.id, "👍", { remove: false });
  await client.deleteMessage(42, ack.id);
  await client.read(42, 3);
  client.on("presence", (p) => console.log(p.user, p.online, p.last_seen ?? 0));
  client.on("notify", (f) => console.log(f.n.kind, f.n.excerpt));
  const reply: ServerFrame = await client.request({ t: "ping" });
  if (reply.t === "err") console.log(reply.code, reply.retry_after_ms);
  off();
  const delay: number | null = reconnectDelay(CloseCode.TRY_AGAIN_LATER, 3, { neverOpened: true });
  console.log(delay, backoffDelay(2, { baseMs: 100 }));
  const http = new AgoraHttp({ base: "https://chat.example", token });
  try {
    await http.get<{ id: string }>("/v1/me");
  } catch (err) {
    if (err instanceof AgoraError) console.log(err.code, err.status, err.retryAfterMs);
  }
  const bytes: Uint8Array = encode({ t: "ping", rid: 1 });
  console.log(decode(bytes));
  client.close();
  return ack.id;
}

// Mistakes the declarations must refuse.
// @ts-expect-error: an unknown encoding
new AgoraClient({ url: "ws://x", encoding: "xml" });
// @ts-expect-error: a send's body is a string
new AgoraClient({ url: "ws://x" }).send("1", 42);
// @ts-expect-error: no such event
new AgoraClient({ url: "ws://x" }).on("message", () => {});
