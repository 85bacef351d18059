// The package's exports resolve under Node, and agora.d.ts declares exactly what
// agora.js exports (tsc checks the declarations themselves: clients/js/tsconfig.json).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { test } from "node:test";

const require = createRequire(import.meta.url);

function declared(dts) {
  const names = new Set();
  for (const m of dts.matchAll(/^export (?:declare )?(?:const|class|function) (\w+)/gm)) {
    names.add(m[1]);
  }
  return names;
}

for (const [spec, dts] of [
  ["agora-client", "agora.d.ts"],
  ["agora-client/msgpack", "msgpack.d.ts"],
]) {
  test(`${spec}: runtime exports are the declared ones`, async () => {
    const mod = await import(spec);
    const pkgDir = require.resolve("agora-client/package.json").replace(/package\.json$/, "");
    const text = readFileSync(pkgDir + dts, "utf8");
    assert.deepEqual(new Set(Object.keys(mod)), declared(text));
  });
}

test("package.json: an ES module with types for every export", () => {
  const pkg = JSON.parse(readFileSync(require.resolve("agora-client/package.json"), "utf8"));
  assert.equal(pkg.type, "module");
  for (const [key, entry] of Object.entries(pkg.exports)) {
    if (key === "./package.json") continue;
    assert.ok(entry.types && entry.default, key);
    assert.ok(pkg.files.includes(entry.types.slice(2)), entry.types);
    assert.ok(pkg.files.includes(entry.default.slice(2)), entry.default);
  }
});
