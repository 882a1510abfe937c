/**
 * Issue 15 point 3 on real containers: the rollout guard (host-scripts/rollout-guard.sh) with exactly the inputs the
 * program gives it (`rolloutGuardEnv` of the prod stack's users), against workspaces run by a private dockerd.
 * Busy is real: a CPU loop in the container (its cgroup's CPU time, sampled), a process titled like sshd's session
 * process, a GPU compute process reported by a fake nvidia-smi (its documented CSV form) with a pid of the container.
 * Releases are real: the admin's rolloutNow, the maintenance window around the current time, the user's
 * `rollout-ready` (the image's own script, run as the user against the home). And the home's files are written as the
 * user only: a planted symlink gets nothing written through it.
 * What this cannot show: the engine skipping the replacement of a workspace whose guard refused (issue 11, the real
 * engine is not buildable here); the program side (the guard runs first, its trigger is the spec hash) is in the unit tests.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { parseConfig, ServerConfig, UserConfig } from "../../components/config";
import { rolloutGuardEnv, WORKSPACE_SPEC_LABEL } from "../../components/workspace";
import { BOOKWORM_MINBASE, ensureDebootstrapRootfs, PrivateDockerd } from "../helpers/docker";
import { REPO, runScript, Scratch, ScriptRun } from "../helpers/host";
import { clone, stackRaw } from "../helpers/program";

jest.setTimeout(10 * 60_000);

let scratch: Scratch;
let d: PrivateDockerd;
let config: ServerConfig;
let alice: UserConfig;
let home = "";
let fakeBin = "";
const SPEC = "a".repeat(64);
const OLD = "b".repeat(64);
const C = "workspace-alice";

function configWith(edit: (raw: any) => void = () => undefined): ServerConfig {
  const raw = clone(stackRaw("prod"));
  edit(raw);
  return parseConfig(raw);
}

/** Run the guard as the program would (its env for alice), with this test's daemon and home. */
function guard(action: "apply" | "check", cfg: ServerConfig = config, extra: Record<string, string> = {}): ScriptRun {
  const user = cfg.users.find((u) => u.name === "alice")!;
  return runScript(
    "rollout-guard",
    action,
    {
      ...rolloutGuardEnv(cfg, user, SPEC),
      TS_HOME: home,
      TS_CPU_SAMPLE_S: "2",
      DOCKER_HOST: `unix://${d.sock}`,
      DOCKER_CONFIG: path.join(path.dirname(d.sock), "client"),
      PATH: `${fakeBin}:${process.env.PATH}`,
      ...extra,
    },
    120_000,
  );
}

/** (Re)start alice's workspace stand-in running `cmd`, labelled with `spec`. */
function workspace(spec: string, cmd: string): void {
  d.docker(["rm", "-f", C]);
  d.dockerOk(["run", "-d", "--name", C, "--label", `${WORKSPACE_SPEC_LABEL}=${spec}`, "local/base", "bash", "-c", cmd]);
}

const pending = () => path.join(home, ".train-server", "rollout-pending");
const ready = () => path.join(home, ".train-server", "rollout-ready");

/** `rollout-ready` of the image, run as alice with her home. */
function rolloutReady(...args: string[]): string {
  const r = spawnSync("setpriv", [`--reuid=${alice.uid}`, `--regid=${alice.uid}`, "--clear-groups", "bash", path.join(REPO, "images/workspace/rollout-ready.sh"), ...args], {
    env: { PATH: process.env.PATH, HOME: home },
    encoding: "utf8",
  });
  if (r.status !== 0) throw new Error(`rollout-ready ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
}

beforeAll(() => {
  scratch = new Scratch("tsguard-");
  config = configWith();
  alice = config.users.find((u) => u.name === "alice")!;
  home = path.join(scratch.dir, "home-alice");
  fs.mkdirSync(home, { mode: 0o700 });
  fs.chownSync(home, alice.uid, alice.uid);
  fs.chmodSync(scratch.dir, 0o755);
  fakeBin = path.join(scratch.dir, "bin");
  fs.mkdirSync(fakeBin);
  d = PrivateDockerd.start(scratch);
  d.importRootfs(ensureDebootstrapRootfs(BOOKWORM_MINBASE), "local/base");
  scratch.onCleanup(() => void d.docker(["rm", "-f", C]));
});

afterAll(() => scratch?.cleanup());

describe("nothing to keep: the replacement goes on", () => {
  test("no workspace container yet (a first up)", () => {
    const r = guard("apply");
    expect(r.status).toBe(0);
    expect(r.results).toMatchObject({ "rollout.decision": "go", "rollout.reason": `no container ${C} yet: nothing to keep` });
  });

  test("the workspace already runs this spec (nothing will be replaced), even while busy", () => {
    workspace(SPEC, "while :; do :; done");
    const r = guard("apply");
    expect(r.results).toMatchObject({ "rollout.decision": "go", "rollout.reason": `${C} already runs this spec: no replacement` });
  });

  test("a stopped workspace", () => {
    workspace(OLD, "sleep 600");
    d.dockerOk(["stop", "-t", "1", C]);
    expect(guard("apply").results["rollout.reason"]).toBe(`${C} is not running: nothing to keep`);
  });

  test("an idle workspace (an older spec, a sleeping process): replaced now, and no notice is left", () => {
    workspace(OLD, "sleep 600");
    const r = guard("apply");
    expect(r.status).toBe(0);
    expect(r.results).toMatchObject({ "rollout.decision": "go", "rollout.reason": `${C} is idle: replaced now` });
    expect(fs.existsSync(pending())).toBe(false);
  });
});

describe("a busy workspace is kept, the up says who, what and how", () => {
  beforeAll(() => workspace(OLD, "while :; do :; done"));

  test("a CPU loop: refused (exit 3) with the CPU figure and every way to proceed", () => {
    const r = guard("apply");
    expect(r.status).toBe(3);
    expect(r.results["rollout.decision"]).toBe("hold");
    const cores = Number(/CPU (\d+\.\d) cores busy over 2 s/.exec(r.stderr)?.[1]);
    expect(cores).toBeGreaterThanOrEqual(0.5);
    expect(r.stderr).toContain("REFUSED: alice's workspace is busy (CPU");
    expect(r.stderr).toContain("other users' rollouts go on (pulumi up --continue-on-error)");
    expect(r.stderr).toContain("alice runs rollout-ready in the workspace");
    expect(r.stderr).toContain("the admin sets rolloutNow: true on alice in the stack config");
    // the container was not touched
    expect(d.dockerOk(["inspect", "-f", "{{.State.Running}}", C]).trim()).toBe("true");
  });

  test("the user finds the notice in their home, written as them (and their login shell prints it)", () => {
    const st = fs.statSync(pending());
    expect([st.uid, st.gid]).toEqual([alice.uid, alice.uid]);
    expect(fs.readFileSync(pending(), "utf8")).toMatch(/^A workspace update is waiting \(.*\)\. Run rollout-ready when your work is saved\.\nalice's workspace is busy/);
    expect(rolloutReady("--status")).toContain("A workspace update is waiting");
  });

  test("check mode reports the same verdict without refusing, sampling or writing", () => {
    fs.rmSync(pending());
    const r = guard("check");
    expect(r.status).toBe(0);
    // no CPU sample in check mode: a CPU-only workspace reads as idle there; the verdict of the real run is apply's
    expect(r.results["rollout.decision"]).toBe("go");
    expect(fs.existsSync(pending())).toBe(false);
  });

  test("an SSH session (sshd's per-session process) alone makes it busy", () => {
    workspace(OLD, `exec -a "sshd: alice@pts/0" sleep 600`);
    const r = guard("apply");
    expect(r.status).toBe(3);
    expect(r.stderr).toContain("alice's workspace is busy (1 SSH session(s))");
  });

  test("a GPU compute process of the workspace (nvidia-smi's pid is a host pid of the container's)", () => {
    workspace(OLD, "sleep 600");
    const pid = d.dockerOk(["inspect", "-f", "{{.State.Pid}}", C]).trim();
    fs.writeFileSync(
      path.join(fakeBin, "nvidia-smi"),
      `#!/bin/sh\n[ "$*" = "--query-compute-apps=pid,process_name,used_memory --format=csv,noheader,nounits" ] || exit 9\necho "${pid}, /opt/venvs/torch/bin/python3, 30000"\necho "999999, /usr/bin/other, 10"\n`,
      { mode: 0o755 },
    );
    try {
      const r = guard("apply");
      expect(r.status).toBe(3);
      expect(r.stderr).toContain(`alice's workspace is busy (1 GPU process(es): pid ${pid} python3 30000 MiB)`);
    } finally {
      fs.rmSync(path.join(fakeBin, "nvidia-smi"));
    }
  });
});

describe("releases", () => {
  beforeEach(() => workspace(OLD, "while :; do :; done"));

  test("the admin's users[i].rolloutNow", () => {
    const forced = configWith((raw) => (raw.users.find((u: any) => u.name === "alice").rolloutNow = true));
    const r = guard("apply", forced);
    expect(r.status).toBe(0);
    expect(r.results["rollout.reason"]).toBe("released by the admin (rolloutNow: true on alice in the stack config)");
  });

  test("the maintenance window: inside it the busy workspace goes, outside it stays", () => {
    const now = new Date();
    const day = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"][now.getDay()];
    const hhmm = (m: number) => `${String(Math.floor(m / 60)).padStart(2, "0")}:${String(m % 60).padStart(2, "0")}`;
    const m = now.getHours() * 60 + now.getMinutes();
    const around = configWith((raw) => (raw.workspace = { rollout: { window: { days: [day], start: hhmm(Math.max(0, m - 30)), end: hhmm(Math.min(1439, m + 30)) } } }));
    const r = guard("apply", around);
    expect(r.status).toBe(0);
    expect(r.results["rollout.reason"]).toMatch(/^inside the maintenance window \(workspace\.rollout\.window: \w+ \d\d:\d\d-\d\d:\d\d server time\)$/);
    const otherDay = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"][(now.getDay() + 3) % 7];
    const elsewhere = configWith((raw) => (raw.workspace = { rollout: { window: { days: [otherDay], start: "00:00", end: "23:59" } } }));
    const h = guard("apply", elsewhere);
    expect(h.status).toBe(3);
    expect(h.stderr).toContain(`or it happens in the maintenance window (workspace.rollout.window: ${otherDay} 00:00-23:59 server time)`);
  });

  test("the user's rollout-ready: released once (the marker is consumed), a stale one is ignored, --cancel takes it back", () => {
    expect(rolloutReady()).toContain("Released");
    const r = guard("apply");
    expect(r.status).toBe(0);
    expect(r.results["rollout.reason"]).toMatch(/^released by alice \(rollout-ready, 0 min ago\)$/);
    expect(fs.existsSync(ready())).toBe(false);
    expect(guard("apply").status).toBe(3);
    rolloutReady();
    spawnSync("touch", ["-d", "2 days ago", ready()]);
    const stale = guard("apply");
    expect(stale.status).toBe(3);
    expect(stale.stderr).toMatch(/ignoring .*rollout-ready: 48 h old \(older than 24 h\)/);
    rolloutReady();
    rolloutReady("--cancel");
    expect(guard("apply").status).toBe(3);
  });

  test("a marker that is a symlink to a file the user cannot read is no release", () => {
    const secret = path.join(scratch.dir, "root-only");
    fs.mkdirSync(secret, { mode: 0o700 });
    fs.writeFileSync(path.join(secret, "f"), "x");
    fs.rmSync(ready(), { force: true });
    fs.symlinkSync(path.join(secret, "f"), ready());
    try {
      expect(guard("apply").status).toBe(3);
      expect(fs.existsSync(path.join(secret, "f"))).toBe(true);
    } finally {
      fs.rmSync(ready());
    }
  });

  test("a home whose .train-server is a symlink into a root-only directory: the notice is not written through it", () => {
    const dir = path.join(home, ".train-server");
    fs.rmSync(dir, { recursive: true, force: true });
    const target = path.join(scratch.dir, "root-dir");
    fs.mkdirSync(target, { mode: 0o700 });
    fs.symlinkSync(target, dir);
    try {
      const r = guard("apply");
      expect(r.status).toBe(3);
      expect(fs.readdirSync(target)).toEqual([]);
      expect(r.stderr).toContain("could not leave the notice");
    } finally {
      fs.rmSync(dir);
    }
  });
});

describe("bad input is named before anything is looked at", () => {
  test.each([
    ["TS_FORCE", "yes", "TS_FORCE 'yes' must be 0 or 1"],
    ["TS_WINDOW", "8 02:00-06:00", "TS_WINDOW '8 02:00-06:00' is not"],
    ["TS_CPU_SAMPLE_S", "2s", "TS_CPU_SAMPLE_S '2s' is not a whole number"],
  ])("%s=%s", (name, value, message) => {
    const r = guard("apply", config, { [name]: value });
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(message);
  });
});
