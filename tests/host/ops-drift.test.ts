/**
 * drift-check.sh over a scratch steps directory laid out as the bundles install it (script.sh, lib.sh, env,
 * files/): each complete step's `check` runs with exactly its own env and stdin from /dev/null, under a timeout;
 * named verdicts, a bare pending count, a failing and a hanging check and an incomplete directory each come out as
 * the metrics say; promtool accepts the textfile. (The real steps on a booted host: rig-drift.test.ts.)
 */
import * as fs from "fs";
import * as path from "path";
import { spawnSync } from "child_process";
import { shellQuote } from "../../components/host";
import { HOST_SCRIPTS, runScript, Scratch } from "../helpers/host";

let scratch: Scratch;
let steps: string;
let env: Record<string, string>;

/** A step directory as renderBundle makes it: the script, lib.sh, env (TS_STEP_DIR, TS_FILES_DIR, ...), files/. */
function step(name: string, body: string, extraEnv: Record<string, string> = {}): string {
  const d = path.join(steps, name);
  fs.mkdirSync(path.join(d, "files"), { recursive: true });
  fs.copyFileSync(path.join(HOST_SCRIPTS, "lib.sh"), path.join(d, "lib.sh"));
  fs.writeFileSync(path.join(d, "script.sh"), `source "\${BASH_SOURCE[0]%/*}/lib.sh"\naction=$(ts_action "$@")\n${body}\nfinish\n`);
  const vars = { TS_STEP_DIR: d, TS_FILES_DIR: `${d}/files`, TS_SCRIPT_NAME: name, ...extraEnv };
  fs.writeFileSync(path.join(d, "env"), Object.entries(vars).map(([k, v]) => `${k}=${shellQuote(v)}`).join("\n") + "\n");
  return d;
}

beforeAll(() => {
  scratch = new Scratch("ts-ops-drift-");
  steps = path.join(scratch.dir, "steps");
  const marker = path.join(scratch.dir, "apply-ran");
  // as declared, if it runs as a check, with its own env only and nothing on stdin
  step(
    "clean",
    [
      `[[ $action == check ]] || touch ${marker}`,
      `ok=no; [[ $TS_OWN == "it's mine" && -z \${TS_TEXTFILE_DIR:-} && -z \${TS_LEAK:-} && -d $TS_FILES_DIR ]] || ok=yes`,
      `drift env "$ok"`,
      `if read -r -t 1 _; then drift stdin yes; else drift stdin no; fi`,
    ].join("\n"),
    { TS_OWN: "it's mine" },
  );
  step("server-baseline", `drift sshd.conf yes\ndrift ufw-rules no\ndrift fstab yes`);
  step("pending-only", `result pending 2`);
  step("broken", `log "cannot look"; exit 3`);
  step("slow", `sleep 30`);
  fs.mkdirSync(path.join(steps, "half")); // cut short before its env: not a step yet
  fs.writeFileSync(path.join(steps, "half", "script.sh"), "exit 1\n");
  fs.writeFileSync(path.join(steps, "stray-file"), "");
  env = { TS_TEXTFILE_DIR: path.join(scratch.dir, "textfile"), TS_STEPS_DIR: steps, TS_LOG_DIR: path.join(scratch.dir, "log"), TS_DRIFT_TIMEOUT: "2", TS_LEAK: "job-only" };
});
afterAll(() => scratch.cleanup());

const samples = (text: string) =>
  text.split("\n").filter((l) => l && !l.startsWith("#"));

it("runs each complete step's check in isolation and exports its verdicts, failures and timeouts", () => {
  const t0 = Date.now();
  const r = runScript("drift-check", "apply", env);
  expect(r.stderr).not.toMatch(/ERROR/);
  expect(r.status).toBe(0);
  expect(Date.now() - t0).toBeLessThan(20_000); // the hanging check was cut at its timeout
  expect(fs.existsSync(path.join(scratch.dir, "apply-ran"))).toBe(false);
  const prom = fs.readFileSync(path.join(env.TS_TEXTFILE_DIR, "train_server_drift-check.prom"), "utf8");
  const check = spawnSync("promtool", ["check", "metrics"], { input: prom, encoding: "utf8" });
  expect(check.stdout + check.stderr).toBe("");
  const lines = samples(prom).filter((l) => !l.startsWith("train_server_drift_check_duration_seconds") && !l.startsWith("train_server_task_"));
  expect(lines.sort()).toEqual(
    [
      'train_server_drift_check_success{step="broken"} 0',
      'train_server_drift_check_success{step="clean"} 1',
      'train_server_drift{step="clean",item="env"} 0',
      'train_server_drift{step="clean",item="stdin"} 0',
      'train_server_drift_items{step="clean"} 0',
      'train_server_drift_check_success{step="pending-only"} 1',
      'train_server_drift{step="pending-only",item="unnamed"} 1',
      'train_server_drift_items{step="pending-only"} 1',
      'train_server_drift_check_success{step="server-baseline"} 1',
      'train_server_drift{step="server-baseline",item="sshd.conf"} 1',
      'train_server_drift{step="server-baseline",item="ufw-rules"} 0',
      'train_server_drift{step="server-baseline",item="fstab"} 1',
      'train_server_drift_items{step="server-baseline"} 2',
      'train_server_drift_check_success{step="slow"} 0',
    ].sort(),
  );
  expect(prom).toContain('train_server_task_success{task="drift-check"} 1');
  expect(r.results).toMatchObject({ steps_checked: "5", steps_failed: "2", steps_differing: "2", "drift_check.broken": "failed", "drift_check.slow": "failed" });
  expect(r.stderr).toMatch(/slow: check timed out after 2s/);
  expect(r.stderr).toMatch(/broken: check failed \(exit 3\)/);
  expect(r.stderr).toMatch(/server-baseline: differs from the declared state: sshd.conf fstab/);
  expect(r.stderr).toMatch(/skipped .*\/half: not a complete step/);
  // each check's own stderr went to the step's root-only log, not to the job's output
  const log = path.join(env.TS_LOG_DIR, "broken.log");
  expect(fs.readFileSync(log, "utf8")).toMatch(/\[broken\] cannot look/);
  expect((fs.statSync(log).mode & 0o777).toString(8)).toBe("600");
  expect(r.stderr).not.toMatch(/cannot look/);
});

it("fails (and says so in its task metrics) when no step is installed", () => {
  const empty = path.join(scratch.dir, "no-steps");
  fs.mkdirSync(empty);
  const r = runScript("drift-check", "apply", { ...env, TS_STEPS_DIR: empty, TS_TEXTFILE_DIR: path.join(scratch.dir, "textfile2") });
  expect(r.status).toBe(1);
  expect(r.stderr).toMatch(/no complete step under/);
  expect(fs.readFileSync(path.join(scratch.dir, "textfile2", "train_server_drift-check.prom"), "utf8")).toContain('train_server_task_success{task="drift-check"} 0');
});
