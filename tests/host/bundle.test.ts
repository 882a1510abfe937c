/**
 * The Host step protocol, run for real with bash as the remote command would run it: the bundle on stdin
 * installs script, lib, env and files exactly, runs `apply` with stdin from /dev/null, and the teardown
 * command runs the installed copy's `destroy`.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import { parseResults, readHostScript, renderBundle, STEPS_DIR, teardownCommand } from "../../components/host";

const STEP = `test-bundle-${process.pid}`;
const DIR = `${STEPS_DIR}/${STEP}`;
const MARKER = `/tmp/${STEP}.destroyed`;

const SCRIPT = `#!/usr/bin/env bash
source "\${BASH_SOURCE[0]%/*}/lib.sh"
action=$(ts_action "$@")
if [[ $action == destroy ]]; then echo destroyed >"$TS_MARKER"; finish; exit 0; fi
# stdin must be /dev/null: a script reading stdin must never eat the rest of the bundle
if read -r -t 1 line; then echo "stdin had: $line" >&2; exit 9; fi
result quoted "$TS_QUOTED"
result multiline_lines "$(printf '%s\\n' "$TS_MULTI" | wc -l)"
result files "$(ls "$TS_FILES_DIR" | tr '\\n' ' ')"
result sha_plain "$(sha256sum <"$TS_FILES_DIR/plain.conf" | cut -c1-64)"
result sha_nonl "$(sha256sum <"$TS_FILES_DIR/no-newline.bin" | cut -c1-64)"
result script_name "$TS_SCRIPT_NAME"
changed "nothing really"
finish
`;

function sha(text: string): string {
  return require("crypto").createHash("sha256").update(text).digest("hex");
}

function runBundle(bundle: string) {
  return spawnSync("bash", ["-s"], { input: bundle + "echo 'this line after the bundle must still run'\n", encoding: "utf8" });
}

afterAll(() => {
  fs.rmSync(DIR, { recursive: true, force: true });
  fs.rmSync(MARKER, { force: true });
  fs.rmSync(`/var/log/train-server/${STEP}.log`, { force: true });
});

describe("host step bundle", () => {
  const quoted = `it's "quoted" $HOME \`x\` \\n ;rm -rf /`;
  const plain = "[section]\nkey = value with 'quotes' and $vars\n";
  const noNewline = "line1\nline2 without newline TS_EOF_ fake delimiter";
  const bundle = renderBundle({
    step: STEP,
    script: SCRIPT,
    lib: readHostScript("lib"),
    env: { TS_QUOTED: quoted, TS_MULTI: "a\nb\nc", TS_MARKER: MARKER },
    files: { "plain.conf": plain, "no-newline.bin": noNewline },
  });

  test("installs and applies; env values and files arrive byte for byte; stdin is /dev/null", () => {
    const r = runBundle(bundle);
    expect(r.stderr).not.toContain("stdin had");
    expect(r.status).toBe(0);
    const results = parseResults(r.stdout);
    expect(results).toMatchObject({
      quoted,
      multiline_lines: "3",
      files: "no-newline.bin plain.conf ",
      sha_plain: sha(plain),
      sha_nonl: sha(noNewline),
      script_name: STEP,
      changes: "1",
    });
    expect(r.stdout).toContain("this line after the bundle must still run");
    expect(fs.readFileSync(`${DIR}/files/plain.conf`, "utf8")).toBe(plain);
    // the env file holds inputs (maybe secrets): root-only
    expect(fs.statSync(`${DIR}/env`).mode & 0o077).toBe(0);
    expect(fs.statSync(`${DIR}/files`).mode & 0o077).toBe(0);
    // stderr is also kept in the step's log on the host
    expect(fs.readFileSync(`/var/log/train-server/${STEP}.log`, "utf8")).toContain("changed: nothing really");
  });

  test("a re-run replaces files: a file dropped from the step is gone", () => {
    const next = renderBundle({ step: STEP, script: SCRIPT.replace(/result sha_nonl.*\n/, ""), lib: readHostScript("lib"), env: { TS_QUOTED: "x", TS_MULTI: "" }, files: { "plain.conf": plain } });
    const r = runBundle(next);
    expect(r.status).toBe(0);
    expect(parseResults(r.stdout).files).toBe("plain.conf ");
  });

  test("a refused destroy fails the teardown and keeps the step's copy", () => {
    const refusing = renderBundle({ step: STEP, script: `source "\${BASH_SOURCE[0]%/*}/lib.sh"\n[[ $1 == destroy ]] && refuse "data is kept"\nfinish\n`, lib: readHostScript("lib"), env: {}, files: {} });
    expect(runBundle(refusing).status).toBe(0);
    const r = spawnSync("bash", ["-c", teardownCommand(STEP, "")], { encoding: "utf8" });
    expect(r.status).toBe(3);
    expect(fs.existsSync(`${DIR}/script.sh`)).toBe(true);
  });

  test("a failing script fails the command with its exit code", () => {
    const failing = renderBundle({ step: STEP, script: `source "\${BASH_SOURCE[0]%/*}/lib.sh"\nrefuse "no way"\n`, lib: readHostScript("lib"), env: {}, files: {} });
    const r = runBundle(failing);
    expect(r.status).toBe(3);
    expect(r.stderr).toContain("REFUSED: no way");
    expect(r.stdout).not.toContain("this line after the bundle must still run");
  });

  test("a secret-bearing (quiet) step never prints its output: results pass, stderr and stray stdout stay in the root-only log", () => {
    const secret = `s3cr3t-${process.pid}-value`;
    const leaky = `source "\${BASH_SOURCE[0]%/*}/lib.sh"\necho "debug: token is $TS_TOKEN"\necho "rclone: bad config $TS_TOKEN" >&2\nresult stage half\n[[ $TS_FAIL == 1 ]] && die "failed with $TS_TOKEN"\nfinish\n`;
    const log = `/var/log/train-server/${STEP}.log`;
    fs.rmSync(log, { force: true });
    for (const fail of ["0", "1"]) {
      const b = renderBundle({ step: STEP, script: leaky, lib: readHostScript("lib"), env: { TS_TOKEN: secret, TS_FAIL: fail }, files: {}, quiet: true });
      const r = runBundle(b);
      expect({ fail, leaks: (r.stdout + r.stderr).includes(secret) }).toEqual({ fail, leaks: false });
      expect(parseResults(r.stdout).stage).toBe("half");
      if (fail === "1") {
        expect(r.status).not.toBe(0);
        expect(r.stderr).toContain(`step ${STEP} failed (exit`);
        expect(r.stderr).toContain(log);
        expect(r.stdout).not.toContain("this line after the bundle must still run");
      } else {
        expect(r.status).toBe(0);
        expect(parseResults(r.stdout).changes).toBe("0");
      }
    }
    // the same bundle without quiet shows the secret: the test's script really leaks
    const loud = runBundle(renderBundle({ step: STEP, script: leaky, lib: readHostScript("lib"), env: { TS_TOKEN: secret, TS_FAIL: "1" }, files: {} }));
    expect((loud.stdout + loud.stderr).includes(secret)).toBe(true);
    expect(fs.readFileSync(log, "utf8")).toContain(`rclone: bad config ${secret}`);
    expect(fs.statSync(log).mode & 0o077).toBe(0);
  });

  test("teardown runs the installed copy's destroy, then removes the copy (env, files: maybe secrets); then it is a no-op", () => {
    runBundle(bundle);
    const r = spawnSync("bash", ["-c", teardownCommand(STEP, "")], { encoding: "utf8" });
    expect(r.status).toBe(0);
    expect(fs.readFileSync(MARKER, "utf8")).toBe("destroyed\n");
    expect(fs.existsSync(DIR)).toBe(false);
    const none = spawnSync("bash", ["-c", teardownCommand(STEP, "")], { encoding: "utf8" });
    expect(none.status).toBe(0);
    expect(none.stdout).toContain("nothing installed");
  });

  test("bad step, env or file names are rejected before anything is rendered", () => {
    const base = { step: STEP, script: "", lib: "", env: {}, files: {} };
    expect(() => renderBundle({ ...base, step: "Bad Name" })).toThrow(/step name/);
    expect(() => renderBundle({ ...base, env: { PATH: "/tmp" } })).toThrow(/must match/);
    expect(() => renderBundle({ ...base, files: { "../etc/passwd": "x" } })).toThrow(/file name/);
  });
});
