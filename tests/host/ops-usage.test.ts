/**
 * usage-collector.sh on a real btrfs array with quotas: per-user usage from qgroups (subvolumes) or du (plain
 * directories), a user over quota, btrfs device counters, the Drive mount state; then the collected metrics run
 * through the rendered alert rules (promtool test rules): alice is over quota, bob is not.
 */
import * as fs from "fs";
import * as path from "path";
import YAML from "yaml";
import { alertRules, renderAlertRules } from "../../components/render/alerts";
import { exampleOpsParams } from "../helpers/ops";
import { runScript, Scratch, sh, writeRandomFile } from "../helpers/host";
import { spawnSync } from "child_process";

const MiB = 1024 * 1024;
let scratch: Scratch;
let mnt: string;
let drive: string;
let env: Record<string, string>;

beforeAll(() => {
  scratch = new Scratch("ts-ops-usage-");
  mnt = scratch.btrfsArray({ sizeMb: 1024, mountOptions: "compress=zstd", quota: true, subvolumes: ["homes/alice", "workspaces/alice", "docker-volumes/alice", "homes/bob"] });
  fs.mkdirSync(path.join(mnt, "workspaces/bob")); // a plain directory: du fallback
  writeRandomFile(path.join(mnt, "homes/alice/a.bin"), 30);
  writeRandomFile(path.join(mnt, "workspaces/alice/ckpt.bin"), 40);
  writeRandomFile(path.join(mnt, "docker-volumes/alice/v.bin"), 5);
  writeRandomFile(path.join(mnt, "homes/bob/b.bin"), 10);
  writeRandomFile(path.join(mnt, "workspaces/bob/w.bin"), 6);
  sh("btrfs", ["filesystem", "sync", mnt]);
  sh("btrfs", ["quota", "rescan", "-w", mnt]);
  drive = path.join(scratch.dir, "drive");
  fs.mkdirSync(drive);
  env = {
    TS_MOUNTPOINT: mnt,
    TS_USERS: `alice:${64 * MiB} bob:${100 * MiB}`,
    TS_USAGE_DIRS: "homes/{user} workspaces/{user} docker-volumes/{user}",
    TS_DRIVE_MOUNTPOINT: drive,
    TS_TEXTFILE_DIR: path.join(scratch.dir, "textfile"),
  };
});
afterAll(() => scratch.cleanup());

const samples = (text: string) =>
  text.split("\n").filter((l) => l && !l.startsWith("#")).map((l) => {
    const m = /^(\w+)\{(.*)\} (\S+)$/.exec(l)!;
    return { name: m[1], labels: m[2], value: Number(m[3]) };
  });

it("measures each user's directories (qgroup for subvolumes, du otherwise) against the quota", () => {
  const r = runScript("usage-collector", "apply", env);
  expect(r.stderr).not.toMatch(/ERROR/);
  expect(r.status).toBe(0);
  const prom = fs.readFileSync(path.join(env.TS_TEXTFILE_DIR, "train_server_usage-collector.prom"), "utf8");
  expect(spawnSync("promtool", ["check", "metrics"], { input: prom, encoding: "utf8" }).status).toBe(0);
  const s = samples(prom);
  const usage = (user: string, dir: string) => s.find((x) => x.name === "train_server_user_usage_bytes" && x.labels.includes(`user="${user}"`) && x.labels.includes(`dir="${dir}"`))!;
  // within 1 MiB of what was written (incompressible data; qgroup counts the extents, du the blocks)
  for (const [user, dir, mb, method] of [["alice", "homes", 30, "qgroup"], ["alice", "workspaces", 40, "qgroup"], ["alice", "docker-volumes", 5, "qgroup"], ["bob", "homes", 10, "qgroup"], ["bob", "workspaces", 6, "du"]] as const) {
    const u = usage(user, dir);
    expect([user, dir, u.labels.includes(`method="${method}"`)]).toEqual([user, dir, true]);
    expect(Math.abs(u.value - mb * MiB)).toBeLessThan(MiB);
  }
  expect(s.filter((x) => x.name === "train_server_user_usage_bytes" && x.labels.includes('user="bob"'))).toHaveLength(2); // no docker-volumes/bob
  expect(Number(r.results["usage.alice"])).toBeGreaterThan(64 * MiB);
  expect(s.find((x) => x.name === "train_server_user_quota_bytes" && x.labels === 'user="alice"')!.value).toBe(64 * MiB);
  // btrfs health: one device, five counters, all zero; no device missing; the Drive is not mounted
  const devErrs = s.filter((x) => x.name === "train_server_btrfs_device_errors");
  expect(devErrs).toHaveLength(5);
  expect(devErrs.every((x) => x.value === 0)).toBe(true);
  expect(s.find((x) => x.name === "train_server_btrfs_devices_missing")!.value).toBe(0);
  expect(s.find((x) => x.name === "train_server_mount_up")!.value).toBe(0);
  expect(prom).toMatch(/^train_server_task_success\{task="usage-collector"\} 1$/m);

  // Feed what was collected to the rendered rules: alice (~75 MiB of 64 MiB) is over quota, bob (16 of 100) is fine.
  const rulesFile = path.join(scratch.dir, "rules.yml");
  const ap = { ...exampleOpsParams().alerts, mountpoint: mnt, driveMountpoint: drive, quotaWarnPercent: 80 };
  fs.writeFileSync(rulesFile, renderAlertRules(ap));
  const input = s.filter((x) => x.name.startsWith("train_server_user_")).map((x) => ({ series: `${x.name}{${x.labels}}`, values: `${x.value}x10` }));
  const rule = Object.fromEntries(alertRules(ap).map((a) => [a.alert, a]));
  const ratio = (s.filter((x) => x.name === "train_server_user_usage_bytes" && x.labels.includes('user="alice"')).reduce((a, x) => a + x.value, 0)) / (64 * MiB);
  const pct = `${Number((ratio * 100).toPrecision(4))}%`;
  const exp = (name: string) => [{
    exp_labels: { user: "alice", ...rule[name].labels },
    exp_annotations: {
      summary: rule[name].annotations.summary.replace("{{ $labels.user }}", "alice").replace("{{ $value | humanizePercentage }}", pct),
      description: rule[name].annotations.description.replace("{{ $labels.user }}", "alice"),
    },
  }];
  const testFile = path.join(scratch.dir, "quota.test.yml");
  fs.writeFileSync(testFile, YAML.stringify({ rule_files: [rulesFile], evaluation_interval: "1m", tests: [{ interval: "1m", input_series: input, alert_rule_test: [
    { eval_time: "5m", alertname: "UserQuotaExceeded", exp_alerts: exp("UserQuotaExceeded") },
    { eval_time: "5m", alertname: "UserQuotaWarning", exp_alerts: exp("UserQuotaWarning") },
  ] }] }));
  const t = spawnSync("promtool", ["test", "rules", testFile], { encoding: "utf8" });
  expect(t.stdout + t.stderr).toMatch(/SUCCESS/);
});

it("sees the Drive mount once something is mounted there", () => {
  sh("mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", drive]);
  scratch.mountedAt(drive);
  const r = runScript("usage-collector", "apply", env);
  expect(r.status).toBe(0);
  expect(r.results.drive_mount_up).toBe("1");
});

it("fails, and says so in its metric, when the array is not mounted", () => {
  const r = runScript("usage-collector", "apply", { ...env, TS_MOUNTPOINT: path.join(scratch.dir, "nope") });
  expect(r.status).not.toBe(0);
  expect(fs.readFileSync(path.join(env.TS_TEXTFILE_DIR, "train_server_usage-collector.prom"), "utf8")).toMatch(/^train_server_task_success\{task="usage-collector"\} 0$/m);
});
