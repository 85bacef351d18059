// The MessagePack codec: spec byte layouts, every width, and refusals.
import assert from "node:assert/strict";
import { test } from "node:test";

import { decode, encode } from "agora-client/msgpack";

const hex = (b) => Buffer.from(b).toString("hex");

test("known encodings (the msgpack spec's formats)", () => {
  assert.equal(hex(encode({ t: "ping" })), "81a174a470696e67");
  assert.equal(hex(encode(null)), "c0");
  assert.equal(hex(encode([true, false])), "92c3c2");
  assert.equal(hex(encode(127)), "7f");
  assert.equal(hex(encode(128)), "cc80");
  assert.equal(hex(encode(65535)), "cdffff");
  assert.equal(hex(encode(65536)), "ce00010000");
  assert.equal(hex(encode(2 ** 32)), "cf0000000100000000");
  assert.equal(hex(encode(-1)), "ff");
  assert.equal(hex(encode(-33)), "d0df");
  assert.equal(hex(encode(-129)), "d1ff7f");
  assert.equal(hex(encode(-32769)), "d2ffff7fff");
  assert.equal(hex(encode(-(2 ** 31) - 1)), "d3ffffffff7fffffff");
  assert.equal(hex(encode(1.5)), "cb3ff8000000000000");
  assert.equal(hex(encode("é")), "a2c3a9");
  assert.equal(hex(encode(new Uint8Array([1, 2]))), "c4020102");
});

test("round trips at every width", () => {
  const values = [
    0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, Number.MAX_SAFE_INTEGER,
    -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, Number.MIN_SAFE_INTEGER,
    0.25, -1e300, "", "x".repeat(31), "x".repeat(32), "x".repeat(255), "x".repeat(256),
    "y".repeat(70000), "日本語 ✓", [], Array.from({ length: 20 }, (_, i) => i),
    { a: { b: [1, { c: null }] }, "": true },
    Object.fromEntries(Array.from({ length: 20 }, (_, i) => [`k${i}`, i])),
  ];
  for (const v of values) assert.deepEqual(decode(encode(v)), v);
  const big = 2n ** 63n + 5n;
  assert.equal(decode(encode(big)), big);
  assert.equal(decode(encode(-(2n ** 62n))), -(2n ** 62n));
  assert.deepEqual(decode(encode(new Uint8Array(300).fill(7))), new Uint8Array(300).fill(7));
});

test("decodes float32 and 64-bit ints within 2^53 as numbers", () => {
  assert.equal(decode(Uint8Array.from([0xca, 0x3f, 0xc0, 0, 0])), 1.5);
  assert.equal(decode(Uint8Array.from([0xcf, 0, 0, 0, 0, 0, 0, 0, 9])), 9);
  assert.equal(decode(Uint8Array.from([0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe])), -2);
});

test("refuses what is not one whole value", () => {
  assert.throws(() => decode(Uint8Array.from([0xa3, 0x61])), RangeError); // truncated
  assert.throws(() => decode(Uint8Array.from([0xc0, 0xc0])), RangeError); // trailing
  assert.throws(() => decode(Uint8Array.from([0xc1])), TypeError); // never used
  assert.throws(() => decode(Uint8Array.from([0xd4, 1, 2])), TypeError); // ext
  assert.throws(() => decode(Uint8Array.from([0x81, 0x90, 0xc0])), TypeError); // array key
  assert.throws(() => encode(Symbol("s")), TypeError);
  assert.throws(() => encode(2n ** 64n), RangeError);
});

test("a __proto__ key is data, not a prototype", () => {
  const bytes = encode(JSON.parse('{"__proto__": {"polluted": 1}}'));
  const out = decode(bytes);
  assert.equal(Object.getPrototypeOf(out), Object.prototype);
  assert.deepEqual(Object.keys(out), ["__proto__"]);
  assert.equal({}.polluted, undefined);
});
