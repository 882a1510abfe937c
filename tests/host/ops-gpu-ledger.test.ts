/**
 * gpu-ledger.sh with REAL processes in REAL cgroups named like Docker's (systemd driver `docker-<id>.scope`, cgroupfs
 * driver `docker/<id>`, a Docker-in-Docker container below a workspace's, and on this v1/v2 hybrid a v1-only one),
 * under a test-owned parent in this host's cgroup fs; a fake `nvidia-smi` prints its real CSV format (see the script's
 * header) with those pids, a fake `docker ps` names the containers. Asserts who gets which GPU's time and memory, the
 * memory-proportional split of a shared GPU, "host"/"unknown", counters that accumulate across runs and survive a
 * lost textfile (state file), a second run with nothing changed, and nvidia-smi failing.
 */
import { ChildProcess, spawn, spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { loadOpsScripts, renderOperations } from "../../components/render/ops";
import { exampleGpuOpsParams, writeFiles } from "../helpers/ops";
import { runScript, Scratch, sh } from "../helpers/host";

jest.setTimeout(120_000);

const GPU = ["GPU-0a0a0a0a-0000-4000-8000-000000000000", "GPU-1b1b1b1b-1111-4111-8111-111111111111", "GPU-2c2c2c2c-2222-4222-8222-222222222222",
  "GPU-3d3d3d3d-3333-4333-8333-333333333333", "GPU-4e4e4e4e-4444-4444-8444-444444444444"];
const UTIL = [80, 30, 10, 50, 20];
const cid = (c: string) => c.repeat(64);
const ID = { alice: cid("a"), bob: cid("b"), carol: cid("c"), dave: cid("d"), grafana: cid("e"), unnamed: cid("f"), inner: "0123456789abcdef".repeat(4) };
const USERS = "alice:2001:0 bob:2002:all carol:2003:1 dave:2004:none erin:2005:3";

let scratch: Scratch;
let env: Record<string, string>;
let prom: string;
let stateFile: string;
const children: ChildProcess[] = [];
const cgroupDirs: string[] = [];
let v1Used = false;

/** The cgroup2 mount and, on a hybrid host, the v1 `pids` hierarchy. */
function cgroupMounts(): { v2: string; pids?: string } {
  const mounts = fs.readFileSync("/proc/mounts", "utf8").split("\n").map((l) => l.split(" "));
  const v2 = mounts.find((m) => m[2] === "cgroup2")?.[1];
  if (!v2) throw new Error("no cgroup2 mount on this host");
  const pids = mounts.find((m) => m[2] === "cgroup" && m[3].split(",").includes("pids"))?.[1];
  return pids ? { v2, pids } : { v2 };
}

/** A `sleep` (as `uid`, default root) placed into cgroup `dir` (made here, removed at cleanup); returns its pid. */
function sleeper(dir: string | undefined, uid?: number): number {
  const child = spawn("sleep", ["600"], { stdio: "ignore", ...(uid ? { uid } : {}) });
  children.push(child);
  if (dir) {
    fs.mkdirSync(dir, { recursive: true });
    cgroupDirs.push(dir);
    fs.writeFileSync(path.join(dir, "cgroup.procs"), String(child.pid));
  }
  return child.pid!;
}

const samples = (text: string) =>
  Object.fromEntries(text.split("\n").filter((l) => l && !l.startsWith("#")).map((l) => {
    const m = /^(\S+) (\S+)$/.exec(l)!;
    return [m[1], Number(m[2])];
  }));
const read = () => samples(fs.readFileSync(prom, "utf8"));
const userBusy = (s: Record<string, number>, gpu: number, user: string) => s[`train_server_gpu_user_busy_seconds_total{gpu="${gpu}",uuid="${GPU[gpu]}",user="${user}"}`];
const userMem = (s: Record<string, number>, gpu: number, user: string) => s[`train_server_gpu_user_memory_bytes{gpu="${gpu}",uuid="${GPU[gpu]}",user="${user}"}`];
/** Pretend the last run was `secondsAgo` before now (the state file's clock). */
const backdate = (secondsAgo: number) =>
  fs.writeFileSync(stateFile, fs.readFileSync(stateFile, "utf8").replace(/^last \d+$/m, `last ${Math.floor(Date.now() / 1000) - secondsAgo}`));
const ledger = () => {
  const r = runScript("gpu-ledger", "apply", env);
  expect({ status: r.status, stderr: r.stderr.split("\n").filter((l) => /ERROR|FAILED|line \d+/.test(l)) }).toEqual({ status: 0, stderr: [] });
  expect(r.changes).toBe(0);
  return r;
};
let apps: Array<[number, number, number]> = []; // [gpu, pid, MiB]
const writeApps = () => fs.writeFileSync(path.join(scratch.dir, "apps.csv"), apps.map(([g, pid, mib]) => `${GPU[g]}, ${pid}, ${mib}\n`).join(""));

beforeAll(() => {
  scratch = new Scratch("ts-gpu-ledger-");
  const bin = path.join(scratch.dir, "bin");
  fs.mkdirSync(bin);
  // nvidia-smi's own CSV (`--format=csv,noheader,nounits`: ", " between fields, MiB, nothing when no process)
  fs.writeFileSync(path.join(bin, "nvidia-smi"), `#!/bin/sh
[ -e ${scratch.dir}/smi-fails ] && { echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2; exit 9; }
case "$*" in
  "--query-gpu=index,uuid,utilization.gpu,memory.used,memory.total --format=csv,noheader,nounits") cat ${scratch.dir}/gpus.csv ;;
  "--query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader,nounits") cat ${scratch.dir}/apps.csv ;;
  *) echo "fake nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;
esac
`, { mode: 0o755 });
  const names = [[ID.alice, "workspace-alice"], [ID.bob, "workspace-bob"], [ID.carol, "workspace-carol"], [ID.dave, "workspace-dave"], [ID.grafana, "grafana"]];
  fs.writeFileSync(path.join(bin, "docker"), `#!/bin/sh
[ "$*" = "ps --no-trunc --format {{.ID}} {{.Names}}" ] || { echo "fake docker: unexpected arguments: $*" >&2; exit 1; }
printf '%s\\n' ${names.map(([i, n]) => `'${i} ${n}'`).join(" ")}
`, { mode: 0o755 });
  fs.writeFileSync(path.join(scratch.dir, "gpus.csv"), GPU.map((u, i) => `${i}, ${u}, ${UTIL[i]}, ${i === 3 ? 0 : 4000}, 81559\n`).join(""));

  const cg = cgroupMounts();
  const parent = path.join(cg.v2, `ts-gpu-ledger-${process.pid}`);
  const pidMax = Number(fs.readFileSync("/proc/sys/kernel/pid_max", "utf8"));
  const gone = pidMax - 1;
  expect(fs.existsSync(`/proc/${gone}`)).toBe(false);
  // the v1-only case: the process's v2 line names no container, its v1 `pids` line does (Docker on cgroup v1)
  const daveDir = cg.pids ? path.join(cg.pids, `ts-gpu-ledger-${process.pid}`, "docker", ID.dave) : path.join(parent, "docker", ID.dave);
  v1Used = cg.pids !== undefined;
  apps = [
    [0, sleeper(path.join(parent, "system.slice", `docker-${ID.alice}.scope`)), 3000], // systemd cgroup driver
    [0, sleeper(path.join(parent, "docker", ID.bob)), 1000], // cgroupfs driver
    [1, sleeper(path.join(parent, "system.slice", `docker-${ID.carol}.scope`, "docker", ID.inner)), 2000], // DinD in carol's workspace
    [1, sleeper(undefined), 1000], // a host process
    [2, sleeper(path.join(parent, "system.slice", `docker-${ID.grafana}.scope`)), 500], // a service container
    [2, sleeper(path.join(parent, "system.slice", `docker-${ID.unnamed}.scope`), 2002), 500], // Docker does not name it: bob's uid
    [2, gone, 1000], // exited before the ledger looked
    [4, sleeper(daveDir), 800],
  ];
  writeApps();
  stateFile = path.join(scratch.dir, "state", "gpu-ledger.state");
  prom = path.join(scratch.dir, "textfile", "train_server_gpu-ledger.prom");
  env = {
    PATH: `${bin}:${process.env.PATH}`,
    TS_GPU_USERS: USERS,
    TS_TEXTFILE_DIR: path.join(scratch.dir, "textfile"),
    TS_STATE_DIR: path.join(scratch.dir, "state"),
    TS_GPU_LEDGER_MAX_GAP: "100",
    TZ: "Europe/Berlin",
  };
});

afterAll(async () => {
  await Promise.all(children.map((c) => (c.exitCode !== null || c.signalCode !== null ? Promise.resolve() : new Promise((res) => { c.once("exit", res); c.kill("SIGKILL"); }))));
  for (const dir of [...cgroupDirs].sort((a, b) => b.length - a.length)) {
    for (let d = dir; d.includes("ts-gpu-ledger-"); d = path.dirname(d)) if (fs.existsSync(d)) try { fs.rmdirSync(d); } catch { /* a sibling still there: removed on its turn */ }
  }
  scratch.cleanup();
});

test("the processes really are in the cgroups (the v2 line first; the v1-only one on this hybrid host)", () => {
  const cg = (pid: number) => fs.readFileSync(`/proc/${pid}/cgroup`, "utf8");
  expect(cg(apps[0][1])).toMatch(new RegExp(`^0::/ts-gpu-ledger-\\d+/system\\.slice/docker-${ID.alice}\\.scope$`, "m"));
  expect(cg(apps[2][1])).toMatch(new RegExp(`^0::/.*/docker-${ID.carol}\\.scope/docker/${ID.inner}$`, "m"));
  if (v1Used) {
    expect(cg(apps[7][1])).toMatch(new RegExp(`^\\d+:pids:/ts-gpu-ledger-\\d+/docker/${ID.dave}$`, "m"));
    expect(cg(apps[7][1])).not.toMatch(new RegExp(`^0::.*${ID.dave}`, "m"));
  }
});

test("first run: memory by user and GPU, processes, pinned GPUs, offset; counters start at 0", () => {
  const r = ledger();
  expect([r.results.gpus, r.results.processes]).toEqual(["5", "8"]);
  const text = fs.readFileSync(prom, "utf8");
  expect(spawnSync("promtool", ["check", "metrics"], { input: text, encoding: "utf8" }).stdout).toBe("");
  expect(text).toMatch(/^# TYPE train_server_gpu_user_busy_seconds_total counter$/m);
  const s = read();
  const MiB = 1048576;
  expect([userMem(s, 0, "alice"), userMem(s, 0, "bob")]).toEqual([3000 * MiB, 1000 * MiB]);
  expect([userMem(s, 1, "carol"), userMem(s, 1, "host")]).toEqual([2000 * MiB, 1000 * MiB]); // DinD counts for the workspace
  expect([userMem(s, 2, "host"), userMem(s, 2, "bob"), userMem(s, 2, "unknown")]).toEqual([500 * MiB, 500 * MiB, 1000 * MiB]);
  expect(userMem(s, 4, "dave")).toBe(800 * MiB);
  expect(Object.keys(s).filter((k) => k.startsWith("train_server_gpu_user_memory_bytes")).length).toBe(8);
  expect(s[`train_server_gpu_user_processes{gpu="2",uuid="${GPU[2]}",user="bob"}`]).toBe(1);
  expect(Object.keys(s).filter((k) => k.startsWith("train_server_gpu_reservation")).sort()).toEqual([
    'train_server_gpu_reservation{gpu="0",user="alice"}', 'train_server_gpu_reservation{gpu="1",user="carol"}', 'train_server_gpu_reservation{gpu="3",user="erin"}',
  ]);
  expect(s[`train_server_gpu_utilization_ratio{gpu="3",uuid="${GPU[3]}"}`]).toBe(0.5);
  expect(s[`train_server_gpu_memory_total_bytes{gpu="0",uuid="${GPU[0]}"}`]).toBe(81559 * MiB);
  expect([3600, 7200]).toContain(s["train_server_utc_offset_seconds{}"]); // Europe/Berlin, CET or CEST
  expect(Object.entries(s).filter(([k]) => k.includes("busy_seconds_total")).every(([, v]) => v === 0)).toBe(true);
  expect(fs.readFileSync(stateFile, "utf8")).toMatch(/^last \d+$/m);
});

test("busy seconds: each GPU's split among its users by memory, busy time without a process to unknown", () => {
  backdate(1000); // a long pause counts as TS_GPU_LEDGER_MAX_GAP = 100 s
  ledger();
  const s = read();
  // GPU 0 80 % busy, alice 3000 / bob 1000 MiB; GPU 1 30 %, carol 2000 / host 1000; GPU 2 10 %, host/bob/unknown
  // 500/500/1000; GPU 3 50 % with no process; GPU 4 20 %, dave alone
  const want: Array<[number, string, number]> = [[0, "alice", 60], [0, "bob", 20], [1, "carol", 20], [1, "host", 10], [2, "host", 2.5], [2, "bob", 2.5],
    [2, "unknown", 5], [3, "unknown", 50], [4, "dave", 20]];
  for (const [g, u, v] of want) expect([g, u, userBusy(s, g, u)]).toEqual([g, u, v]);
  expect(Object.keys(s).filter((k) => k.startsWith("train_server_gpu_user_busy_seconds_total")).length).toBe(want.length);
  UTIL.forEach((u, g) => expect(s[`train_server_gpu_busy_seconds_total{gpu="${g}",uuid="${GPU[g]}"}`]).toBe(u)); // u % of 100 s
});

test("a second run with nothing changed: the same series and gauges; counters grow by their rate x elapsed, nothing else", () => {
  const before = read(); // every counter is rate x 100 s here (the run above)
  backdate(5); // at least 5 s since the last run, so that every counter must move by exactly its rate
  ledger();
  const after = read();
  expect(Object.keys(after).sort()).toEqual(Object.keys(before).sort());
  const gpu3 = `train_server_gpu_busy_seconds_total{gpu="3",uuid="${GPU[3]}"}`;
  const dt = (after[gpu3] - before[gpu3]) / 0.5; // whole seconds since the last run
  expect({ dt, whole: Number.isInteger(Math.round(dt * 1000) / 1000), inRange: dt >= 5 && dt <= 100 }).toEqual({ dt, whole: true, inRange: true });
  for (const k of Object.keys(after).filter((x) => !x.startsWith("train_server_task_"))) {
    if (/_total\{/.test(k)) expect([k, dt, after[k] - before[k]]).toEqual([k, dt, expect.closeTo((before[k] / 100) * dt, 2)]);
    else expect([k, after[k]]).toEqual([k, before[k]]);
  }
});

test("the counters survive a lost textfile and a process ending (state file); the memory of the ended one is gone", () => {
  backdate(10);
  const before = read();
  fs.rmSync(prom);
  apps = apps.filter(([g, , mib]) => !(g === 0 && mib === 3000)); // alice's process on GPU 0 ended
  writeApps();
  ledger();
  const s = read();
  expect(userMem(s, 0, "alice")).toBeUndefined();
  expect(userMem(s, 0, "bob")).toBe(1000 * 1048576);
  expect(userBusy(s, 0, "alice")).toBeGreaterThanOrEqual(userBusy(before, 0, "alice")); // kept, no longer growing
  // bob is now alone on GPU 0: all of its 80 % for the (about 10 s) since the last run
  const dtBob = (userBusy(s, 0, "bob") - userBusy(before, 0, "bob")) / 0.8;
  expect(dtBob).toBeGreaterThanOrEqual(10);
  expect(dtBob).toBeLessThan(60); // well under TS_GPU_LEDGER_MAX_GAP (100 s): the real elapsed time, not the cap
});

test("nvidia-smi failing: the run fails and says so, the counters are still exported, the state is untouched", () => {
  const before = read();
  const state = fs.readFileSync(stateFile, "utf8");
  fs.writeFileSync(path.join(scratch.dir, "smi-fails"), "");
  try {
    const r = runScript("gpu-ledger", "apply", env);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/nvidia-smi failed/);
  } finally {
    fs.rmSync(path.join(scratch.dir, "smi-fails"));
  }
  const s = read();
  expect(s['train_server_task_success{task="gpu-ledger"}']).toBe(0);
  for (const k of Object.keys(before).filter((x) => x.includes("busy_seconds_total"))) expect([k, s[k]]).toEqual([k, before[k]]);
  expect(fs.readFileSync(stateFile, "utf8")).toBe(state);
  ledger(); // and recovers
});

test("a malformed state file is refused, not reset", () => {
  const state = fs.readFileSync(stateFile, "utf8");
  fs.writeFileSync(stateFile, state + "garbage line\n");
  const r = runScript("gpu-ledger", "apply", env);
  expect(r.status).not.toBe(0);
  expect(r.stderr).toMatch(/malformed; move it away/);
  fs.writeFileSync(stateFile, state);
});

test("its units (and the digest's) pass systemd-analyze verify; the ledger runs every minute", () => {
  const base = path.join(scratch.dir, "units-root");
  const files = renderOperations(exampleGpuOpsParams({ scriptDir: path.join(base, "lib"), unitDir: path.join(base, "units"), configDir: path.join(base, "etc") }), loadOpsScripts());
  writeFiles("/", Object.fromEntries(Object.entries(files).filter(([p]) => p.startsWith(base))));
  const units = ["ts-gpu-ledger.service", "ts-gpu-ledger.timer", "ts-weekly-digest.service", "ts-weekly-digest.timer"].map((u) => path.join(base, "units", u));
  const r = spawnSync("systemd-analyze", ["verify", ...units], { encoding: "utf8" });
  expect(r.stdout + r.stderr).toBe("");
  expect(r.status).toBe(0);
  const cal = /^OnCalendar=(.*)$/m.exec(files[units[1]].content)![1];
  expect(/Normalized form: (.*)/.exec(sh("systemd-analyze", ["calendar", cal]))![1].trim()).toBe("*-*-* *:*:00");
});
