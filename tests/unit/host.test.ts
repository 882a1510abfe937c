/** The host step protocol's pure parts: the bundle (and so the trigger) changes exactly with script, lib, env or files. */
import { parseResults, renderBundle, sha256, shellQuote } from "../../components/host";

const base = { step: "server-storage", script: "#!/bin/bash\necho hi\n", lib: "# lib\n", env: { TS_A: "1", TS_B: "two words" }, files: { "x.conf": "k = v\n" } };
const hash = (p: typeof base) => sha256(renderBundle(p));

test("the same parts give the same bundle, whatever the key order", () => {
  expect(hash(base)).toBe(hash({ ...base, env: { TS_B: "two words", TS_A: "1" } }));
});

test.each([
  ["the script", { script: "#!/bin/bash\necho hello\n" }],
  ["the shared lib", { lib: "# lib v2\n" }],
  ["an input value", { env: { TS_A: "2", TS_B: "two words" } }],
  ["adding an input", { env: { ...base.env, TS_C: "" } }],
  ["a rendered file", { files: { "x.conf": "k = w\n" } }],
  ["a file's name", { files: { "y.conf": "k = v\n" } }],
])("changing %s changes the trigger", (_what, change) => {
  expect(hash({ ...base, ...change } as typeof base)).not.toBe(hash(base));
});

test("shellQuote survives quotes, $ and newlines", () => {
  expect(shellQuote(`it's $HOME\n`)).toBe(`'it'\\''s $HOME\n'`);
});

test("parseResults reads key=value lines exactly and ignores the rest", () => {
  expect(parseResults("uuid=abc\nnoise line\nuser.alice.uid=1000\nchanges=0\nspaced=a b \n")).toEqual({ uuid: "abc", "user.alice.uid": "1000", changes: "0", spaced: "a b " });
  expect(parseResults(undefined)).toEqual({});
});
