/**
 * Benchmarks (`npm run bench`): prints a table and saves it to bench/results/latest.md.
 *
 *  - offline plan time for 5, 100 and 500 users (median of several runs) and the ratio 500/5;
 *  - the longest chain of dependent resources (remote steps and containers) for 5 vs 500 users;
 *  - resources changed when one user joins prod (must be only that user's and shared resources);
 *  - inputs changed between two runs of the same config (must be zero);
 *  - restic: first vs second backup of the same data (the real restic, a local repository);
 *  - the second-run time of each host script on the rig (as root: runs the RIG REPLAY suite, ~1 min).
 * Figures are ratios and counts from one run on one machine, never asserted as timings in tests.
 */
import { spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { CONFIG_NAMESPACE, SECRET_KEYS } from "../components/config";
import { buildProgram } from "../components/program";
import { diffRuns, PLACEHOLDER_SECRETS, Registered, runUnderMocks, toRuntimeConfig } from "../tools/harness";
import { parse as parseYaml } from "yaml";

const ROOT = path.resolve(__dirname, "..");
const RUNS = Number(process.env.BENCH_RUNS ?? 5);

function prodRaw(): Record<string, any> {
  const doc = parseYaml(fs.readFileSync(path.join(ROOT, "Pulumi.prod.yaml"), "utf8"));
  return Object.fromEntries(Object.entries(doc.config).map(([k, v]) => [k.replace(`${CONFIG_NAMESPACE}:`, ""), v]));
}

/** prod with `n` synthetic users (no cpusets; resources scaled so the config stays valid). */
function withUsers(n: number): Record<string, any> {
  const raw = JSON.parse(JSON.stringify(prodRaw()));
  const key = raw.users[0].sshKeys[0];
  raw.host.ramGb = Math.max(raw.host.ramGb, n * 2 + 64);
  raw.resources = { ...raw.resources, memoryGuaranteeGb: n > 5 ? 1 : 32, memoryLimitGb: n > 5 ? 16 : 100 };
  raw.users = Array.from({ length: n }, (_, i) => ({ name: `user${i + 1}`, uid: 1000 + i, email: `user${i + 1}@example.com`, admin: i === 0, sshKeys: [key] }));
  return raw;
}

/** One run of the program; `preview` as `npm run plan` does (outputs of not-yet-run commands are unknown). */
async function run(raw: Record<string, any>, preview = true) {
  const { config } = toRuntimeConfig(raw);
  const secretKeys = SECRET_KEYS.map((k) => `${CONFIG_NAMESPACE}:${k}`);
  for (const k of SECRET_KEYS) config[`${CONFIG_NAMESPACE}:${k}`] = PLACEHOLDER_SECRETS[k];
  const t0 = process.hrtime.bigint();
  const result = await runUnderMocks(() => buildProgram().outputs, config, secretKeys, { preview });
  return { ms: Number(process.hrtime.bigint() - t0) / 1e6, resources: result.resources };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

/** Longest chain of custom resources connected by dependency edges (a component edge = all its children). */
export function longestChain(res: Registered[]): number {
  const byUrn = new Map(res.map((r) => [r.urn, r]));
  const children = new Map<string, string[]>();
  for (const r of res) if (r.parent) children.set(r.parent, [...(children.get(r.parent) ?? []), r.urn]);
  const customsUnder = (urn: string): string[] => {
    const r = byUrn.get(urn);
    if (!r) return [];
    if (r.custom) return [urn];
    return (children.get(urn) ?? []).flatMap(customsUnder);
  };
  const memo = new Map<string, number>();
  const depth = (urn: string): number => {
    if (memo.has(urn)) return memo.get(urn)!;
    memo.set(urn, 1);
    const r = byUrn.get(urn)!;
    const deps = [...r.dependencies.flatMap(customsUnder), ...(r.provider ? [r.provider.split("::").slice(0, -1).join("::")] : [])].filter((d) => byUrn.has(d));
    const d = 1 + Math.max(0, ...deps.map(depth));
    memo.set(urn, d);
    return d;
  };
  return Math.max(0, ...res.filter((r) => r.custom).map((r) => depth(r.urn)));
}

async function main(): Promise<void> {
  const rows: string[][] = [];
  await run(withUsers(5)); // warm-up: module loading, JIT
  const times: Record<number, number> = {};
  const chains: Record<number, number> = {};
  const counts: Record<number, number> = {};
  for (const n of [5, 100, 500]) {
    const ms: number[] = [];
    let last: Registered[] = [];
    const runs = n >= 500 ? Math.min(RUNS, 3) : RUNS;
    for (let i = 0; i < runs; i++) {
      const r = await run(withUsers(n));
      ms.push(r.ms);
      last = r.resources;
    }
    times[n] = median(ms);
    chains[n] = longestChain(last);
    counts[n] = last.length;
    rows.push([`offline plan, ${n} users`, `${times[n].toFixed(0)} ms (median of ${runs})`, `${counts[n]} resources`]);
  }
  rows.push(["plan time ratio 500/5 users", (times[500] / times[5]).toFixed(2), `resources ratio ${(counts[500] / counts[5]).toFixed(1)}`]);
  rows.push(["longest dependency chain, 5 users", String(chains[5]), "resources in sequence"]);
  rows.push(["longest dependency chain, 500 users", String(chains[500]), chains[500] === chains[5] ? "same: users fan out, they do not chain" : "differs"]);

  // diffs without preview: every input known, as in an update after the first `pulumi up`
  const prod = prodRaw();
  const a = await run(prod, false);
  const b = await run(prod, false);
  const same = diffRuns(a.resources, b.resources);
  rows.push(["inputs changed, same config twice", String(same.added.length + same.removed.length + same.changed.length), "must be 0"]);

  const frank = JSON.parse(JSON.stringify(prod));
  frank.users.push({ name: "frank", uid: 1005, email: "frank@example.com", sshKeys: [prod.users[0].sshKeys[0]], memoryGuaranteeGb: 24, cpuset: "0-1" });
  const c = await run(frank, false);
  const d = diffRuns(a.resources, c.resources);
  const short = (k: string) => k.split("::")[1];
  rows.push(["frank joins prod: added", String(d.added.length), d.added.map(short).join(", ")]);
  rows.push(["frank joins prod: changed", String(d.changed.length), d.changed.map(short).join(", ")]);
  rows.push(["frank joins prod: removed", String(d.removed.length), d.removed.map(short).join(", ") || "-"]);
  const steps = d.changed.filter((k) => k.startsWith("command:remote:Command::") && k.endsWith("-apply"));
  rows.push(["frank joins prod: remote steps re-run", String(steps.length), steps.map(short).join(", ")]);
  const containers = d.changed.filter((k) => k.startsWith("docker:index/container:Container::"));
  rows.push(["frank joins prod: other containers changed (replace or restart)", String(containers.length), containers.map(short).join(", ") || "must be 0"]);

  rows.push(...benchRestic());
  rows.push(...benchRig());

  const width = [0, 1, 2].map((i) => Math.max(...rows.map((r) => r[i].length)));
  const table = ["| measure | value | note |", "|---|---|---|", ...rows.map((r) => `| ${r[0]} | ${r[1]} | ${r[2]} |`)].join("\n");
  console.log(rows.map((r) => r.map((c, i) => c.padEnd(width[i])).join("  ")).join("\n"));
  fs.mkdirSync(path.join(ROOT, "bench", "results"), { recursive: true });
  fs.writeFileSync(path.join(ROOT, "bench", "results", "latest.md"), `# npm run bench (${new Date().toISOString()})\n\n${table}\n`);
  console.log("\nsaved bench/results/latest.md");
}

/** restic first vs second backup of the same data: 64 MiB of random files, a local repository. */
function benchRestic(): string[][] {
  if (spawnSync("restic", ["version"]).status !== 0) return [["restic backups", "not measured", "restic is not installed (`npm test` installs it)"]];
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ts-bench-restic-"));
  try {
    const data = path.join(dir, "data");
    for (let i = 0; i < 64; i++) {
      fs.mkdirSync(path.join(data, `d${i % 8}`), { recursive: true });
      fs.writeFileSync(path.join(data, `d${i % 8}`, `f${i}.bin`), crypto.randomBytes(1024 * 1024));
    }
    const env = { ...process.env, RESTIC_REPOSITORY: path.join(dir, "repo"), RESTIC_PASSWORD: "bench" };
    const restic = (...args: string[]) => {
      const t = process.hrtime.bigint();
      const r = spawnSync("restic", ["--quiet", ...args], { env, encoding: "utf8" });
      if (r.status !== 0) throw new Error(`restic ${args.join(" ")}: ${r.stderr}`);
      return Number(process.hrtime.bigint() - t) / 1e6;
    };
    restic("init");
    const first = restic("backup", data);
    const second = restic("backup", data);
    return [
      ["restic backup of 64 MiB, first", `${first.toFixed(0)} ms`, "64 files, all new"],
      ["restic backup of the same data, second", `${second.toFixed(0)} ms`, `ratio second/first ${(second / first).toFixed(2)}`],
    ];
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** Each host script's time on the rig: first `up` and a forced second run (every script a no-op). */
function benchRig(): string[][] {
  if (process.getuid?.() !== 0) return [["host scripts on the rig", "not measured", "needs root (loop devices, systemd-nspawn)"]];
  const out = path.join(os.tmpdir(), `ts-bench-rig-${process.pid}.json`);
  const r = spawnSync("npx", ["jest", "tests/host/rig-replay.test.ts", "--selectProjects", "host", "--runInBand", "--silent"], {
    cwd: ROOT,
    env: { ...process.env, BENCH_RIG_OUT: out },
    encoding: "utf8",
  });
  if (!fs.existsSync(out)) return [["host scripts on the rig", "failed", `the rig replay did not run (exit ${r.status})`]];
  const m = JSON.parse(fs.readFileSync(out, "utf8")) as {
    totalMs: number;
    firstRun: Record<string, number>;
    secondRun: Record<string, number>;
    blast?: Record<string, { steps: string[]; unitsRestarted: number; mountsMoved: number }>;
  };
  fs.rmSync(out, { force: true });
  return [
    ...Object.keys(m.firstRun).map((step) => [
      `rig: ${step}, second run (no-op)`,
      `${m.secondRun[step] ?? "-"} ms`,
      `first run ${m.firstRun[step]} ms; ratio ${m.secondRun[step] ? (m.secondRun[step] / m.firstRun[step]).toFixed(2) : "-"}`,
    ]),
    ...Object.entries(m.blast ?? {}).map(([what, b]) => [
      `rig: a user ${what === "add" ? "added" : "removed"}: steps run / units restarted / mounts moved`,
      `${b.steps.length} / ${b.unitsRestarted} / ${b.mountsMoved}`,
      `${b.steps.join(", ")}; units and mounts must be 0`,
    ]),
    ["rig replay, whole suite", `${(m.totalMs / 1000).toFixed(0)} s`, r.status === 0 ? "all assertions passed" : `suite exit ${r.status}: see npx jest tests/host/rig-replay.test.ts`],
  ];
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
