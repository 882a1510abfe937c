/**
 * The Operations area's rendered files through the real validators: systemd-analyze verify/calendar, promtool
 * check/test rules (every alert fires on its condition and stays quiet otherwise), amtool check-config and
 * routes, and ops-install.sh installing everything into a scratch root (idempotent, drift check, destroy).
 */
import * as fs from "fs";
import * as path from "path";
import YAML from "yaml";
import { alertRules, AlertParams } from "../../components/render/alerts";
import { HostFile, loadOpsScripts, opsEnabledUnits, opsFilesDir, OpsParams, renderOperations } from "../../components/render/ops";
import { exampleOpsParams, expand, writeFiles } from "../helpers/ops";
import { runScript, Scratch, sh } from "../helpers/host";
import { spawnSync } from "child_process";

const run = (cmd: string, args: string[]) => {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  return { status: r.status ?? -1, out: (r.stdout ?? "") + (r.stderr ?? "") };
};

let scratch: Scratch;
beforeAll(() => (scratch = new Scratch("ts-ops-validators-")));
afterAll(() => scratch.cleanup());

describe("systemd units", () => {
  let params: OpsParams;
  let files: Record<string, HostFile>;
  let unitDir: string;
  beforeAll(() => {
    // Units reference the scripts at an absolute path: install them under the scratch dir so that
    // systemd-analyze sees executables exactly where the units say.
    const base = path.join(scratch.dir, "units-root");
    params = exampleOpsParams({ scriptDir: path.join(base, "lib"), unitDir: path.join(base, "units"), configDir: path.join(base, "etc") });
    files = renderOperations(params, loadOpsScripts());
    writeFiles("/", Object.fromEntries(Object.entries(files).filter(([p]) => p.startsWith(base))));
    unitDir = path.join(base, "units");
  });

  it("every rendered unit passes systemd-analyze verify", () => {
    const units = fs.readdirSync(unitDir).map((u) => path.join(unitDir, u));
    expect(units.map((u) => path.basename(u)).sort()).toEqual([
      "ts-backup.service", "ts-backup.timer", "ts-data-sync.service", "ts-data-sync.timer", "ts-drift-check.service", "ts-drift-check.timer", "ts-drive-mount.service",
      "ts-restore.service", "ts-restore.timer", "ts-scrub.service", "ts-scrub.timer", "ts-snapshot.service", "ts-snapshot.timer", "ts-usage-collector.service",
      "ts-usage-collector.timer", "ts-verify-restore.service", "ts-verify-restore.timer", "ts-weekly-digest.service", "ts-weekly-digest.timer",
    ]);
    const r = run("systemd-analyze", ["verify", ...units]);
    expect(r.out).toBe("");
    expect(r.status).toBe(0);
  });

  it("the validator does catch a unit whose ExecStart does not exist (control)", () => {
    const bad = path.join(scratch.dir, "ts-bad.service");
    fs.writeFileSync(bad, files[path.join(unitDir, "ts-backup.service")].content.replace(/^ExecStart=\S+/m, "ExecStart=/nonexistent/backup.sh"));
    const r = run("systemd-analyze", ["verify", bad]);
    expect(r.status).not.toBe(0);
    expect(r.out).toMatch(/not executable/);
  });

  it("every OnCalendar is a valid calendar expression and the daily jobs fire at the configured time", () => {
    const cals = Object.entries(files)
      .filter(([p]) => p.endsWith(".timer"))
      .map(([p, f]) => [path.basename(p), /^OnCalendar=(.*)$/m.exec(f.content)![1]] as const);
    expect(cals.length).toBe(9);
    for (const [, cal] of cals) expect(run("systemd-analyze", ["calendar", cal]).status).toBe(0);
    const normalized = (cal: string) => /Normalized form: (.*)/.exec(sh("systemd-analyze", ["calendar", cal]))![1].trim();
    const byTimer = Object.fromEntries(cals);
    expect(normalized(byTimer["ts-backup.timer"])).toBe("*-*-* 06:00:00");
    expect(normalized(byTimer["ts-data-sync.timer"])).toBe("*-*-* 04:00:00");
    expect(normalized(byTimer["ts-verify-restore.timer"])).toBe("*-*-01 08:00:00");
    expect(normalized(byTimer["ts-snapshot.timer"])).toBe("*-*-* *:00:00");
    expect(normalized(byTimer["ts-weekly-digest.timer"])).toBe("Mon *-*-* 09:00:00");
    expect(normalized(byTimer["ts-drift-check.timer"])).toBe("*-*-* 05:30:00");
    expect(normalized(byTimer["ts-restore.timer"])).toBe("*-*-* *:*:00"); // users' restore requests, every minute
    expect(run("systemd-analyze", ["calendar", "*-*-32 06:00"]).status).not.toBe(0); // control
  });
});

// ---------- Prometheus rules ----------
const alertParams: AlertParams = {
  ...exampleOpsParams().alerts,
  mountpoint: "/mnt/storage",
  driveMountpoint: "/mnt/storage/shared",
  quotaWarnPercent: 80,
};

interface Case {
  alert: string;
  interval?: string;
  series: Array<{ series: string; values: string }>;
  /** Evaluation time -> alerts expected then: their own labels and the value the expression yields. */
  evals: Array<{ at: string; firing: Array<{ labels: Record<string, string>; value: number }> }>;
}

const gib = 1024 ** 3;
const CASES: Case[] = [
  { alert: "SmartDeviceUnhealthy", series: [
      { series: 'smartmon_device_smart_healthy{disk="/dev/sda",type="sat"}', values: "0x20" },
      { series: 'smartmon_device_smart_healthy{disk="/dev/sdb",type="sat"}', values: "1x20" }],
    evals: [{ at: "5m", firing: [{ labels: { disk: "/dev/sda", type: "sat" }, value: 0 }] }] },
  { alert: "GpuTemperatureHigh", series: [
      { series: 'DCGM_FI_DEV_GPU_TEMP{gpu="0"}', values: "85x20" },
      { series: 'DCGM_FI_DEV_GPU_TEMP{gpu="1"}', values: "80x20" },
      { series: 'DCGM_FI_DEV_GPU_TEMP{gpu="2"}', values: "90 90 90 70x20" }],
    evals: [{ at: "3m", firing: [] }, { at: "10m", firing: [{ labels: { gpu: "0" }, value: 85 }] }] },
  { alert: "BtrfsDeviceErrors", series: [
      { series: 'train_server_btrfs_device_errors{device="/dev/sdb",type="corruption_errs"}', values: "3x20" },
      { series: 'train_server_btrfs_device_errors{device="/dev/sdc",type="corruption_errs"}', values: "0x20" }],
    evals: [{ at: "5m", firing: [{ labels: { device: "/dev/sdb", type: "corruption_errs" }, value: 3 }] }] },
  { alert: "BtrfsArrayDegraded", series: [
      { series: 'train_server_btrfs_devices_missing{mountpoint="/mnt/storage"}', values: "0x5 1x10" }],
    evals: [{ at: "3m", firing: [] }, { at: "10m", firing: [{ labels: { mountpoint: "/mnt/storage" }, value: 1 }] }] },
  { alert: "OomKill", series: [{ series: 'node_vmstat_oom_kill{instance="a"}', values: "4x10 5x30" }, { series: 'node_vmstat_oom_kill{instance="b"}', values: "7x40" }],
    evals: [{ at: "9m", firing: [] }, { at: "30m", firing: [] }, { at: "15m", firing: [{ labels: { instance: "a" }, value: 1 }] }] },
  { alert: "UserQuotaWarning", series: [
      { series: `train_server_user_quota_bytes{user="alice"}`, values: `${1000 * gib}x10` },
      { series: `train_server_user_usage_bytes{user="alice",dir="homes",method="qgroup"}`, values: `${500 * gib}x10` },
      { series: `train_server_user_usage_bytes{user="alice",dir="workspaces",method="qgroup"}`, values: `${350 * gib}x10` },
      { series: `train_server_user_quota_bytes{user="bob"}`, values: `${1000 * gib}x10` },
      { series: `train_server_user_usage_bytes{user="bob",dir="homes",method="du"}`, values: `${790 * gib}x10` }],
    evals: [{ at: "5m", firing: [{ labels: { user: "alice" }, value: 0.85 }] }] },
  { alert: "UserQuotaExceeded", series: [
      { series: `train_server_user_quota_bytes{user="alice"}`, values: `${1000 * gib}x10` },
      { series: `train_server_user_usage_bytes{user="alice",dir="homes",method="qgroup"}`, values: `${850 * gib}x10` },
      { series: `train_server_user_quota_bytes{user="bob"}`, values: `${100 * gib}x10` },
      { series: `train_server_user_usage_bytes{user="bob",dir="homes",method="qgroup"}`, values: `${100 * gib}x10` },
      { series: `train_server_user_usage_bytes{user="bob",dir="docker-volumes",method="qgroup"}`, values: `${25 * gib}x10` }],
    evals: [{ at: "5m", firing: [{ labels: { user: "bob" }, value: 1.25 }] }] },
  { alert: "FilesystemAlmostFull", series: [
      { series: 'node_filesystem_size_bytes{mountpoint="/mnt/storage",fstype="btrfs"}', values: "1000x30" },
      { series: 'node_filesystem_avail_bytes{mountpoint="/mnt/storage",fstype="btrfs"}', values: "50x30" },
      { series: 'node_filesystem_size_bytes{mountpoint="/",fstype="ext4"}', values: "1000x30" },
      { series: 'node_filesystem_avail_bytes{mountpoint="/",fstype="ext4"}', values: "150x30" },
      { series: 'node_filesystem_size_bytes{mountpoint="/mnt/storage/shared",fstype="fuse.rclone"}', values: "1000x30" },
      { series: 'node_filesystem_avail_bytes{mountpoint="/mnt/storage/shared",fstype="fuse.rclone"}', values: "0x30" }],
    evals: [{ at: "5m", firing: [] }, { at: "15m", firing: [{ labels: { mountpoint: "/mnt/storage", fstype: "btrfs" }, value: 95 }] }] },
  { alert: "BackupTooOld", interval: "5m", series: [
      { series: 'train_server_task_last_success_timestamp_seconds{task="backup"}', values: "0x400" },
      { series: 'train_server_task_last_success_timestamp_seconds{task="scrub"}', values: "0x400" }],
    evals: [{ at: "25h", firing: [] }, { at: "27h", firing: [{ labels: { task: "backup" }, value: 27 * 3600 }] }] },
  { alert: "BackupNeverSucceeded", interval: "5m", series: [{ series: 'train_server_task_last_success_timestamp_seconds{task="scrub"}', values: "0x400" }],
    evals: [{ at: "25h", firing: [] }, { at: "27h", firing: [{ labels: { task: "backup" }, value: 1 }] }] },
  { alert: "BackupNeverSucceeded", interval: "5m", series: [{ series: 'train_server_task_last_success_timestamp_seconds{task="backup"}', values: "0x400" }],
    evals: [{ at: "27h", firing: [] }] },
  { alert: "BackupFailed", series: [{ series: 'train_server_task_success{task="backup"}', values: "1x5 0x5" }, { series: 'train_server_task_success{task="data-sync"}', values: "0x10" }],
    evals: [{ at: "3m", firing: [] }, { at: "8m", firing: [{ labels: { task: "backup" }, value: 0 }] }] },
  { alert: "RestoreVerificationFailed", series: [{ series: 'train_server_task_success{task="verify-restore"}', values: "1x5 0x5" }],
    evals: [{ at: "3m", firing: [] }, { at: "8m", firing: [{ labels: { task: "verify-restore" }, value: 0 }] }] },
  { alert: "BtrfsScrubErrors", series: [
      { series: 'train_server_btrfs_scrub_errors{type="corrected"}', values: "2x10" },
      { series: 'train_server_btrfs_scrub_errors{type="uncorrectable"}', values: "0x10" }],
    evals: [{ at: "5m", firing: [{ labels: { type: "corrected" }, value: 2 }] }] },
  { alert: "ScrubFailed", series: [{ series: 'train_server_task_success{task="scrub"}', values: "1x5 0x5" }],
    evals: [{ at: "3m", firing: [] }, { at: "8m", firing: [{ labels: { task: "scrub" }, value: 0 }] }] },
  { alert: "SnapshotFailed", series: [{ series: 'train_server_task_success{task="snapshot"}', values: "1x5 0x5" }, { series: 'train_server_task_success{task="scrub"}', values: "0x10" }],
    evals: [{ at: "3m", firing: [] }, { at: "8m", firing: [{ labels: { task: "snapshot" }, value: 0 }] }] },
  { alert: "SnapshotFailed", interval: "5m", series: [
      { series: 'train_server_task_success{task="snapshot"}', values: "1x80" },
      { series: 'train_server_task_last_success_timestamp_seconds{task="snapshot"}', values: "0+300x30 9000x50" }],
    evals: [{ at: "2h", firing: [] }, { at: "5h30m", firing: [] }, { at: "6h", firing: [{ labels: { task: "snapshot" }, value: 21600 - 9000 }] }] },
  { alert: "DriveMountDown", series: [
      { series: 'train_server_mount_up{mountpoint="/mnt/storage/shared"}', values: "1x5 0x20" },
      { series: 'train_server_mount_up{mountpoint="/elsewhere"}', values: "0x25" }],
    evals: [{ at: "8m", firing: [] }, { at: "15m", firing: [{ labels: { mountpoint: "/mnt/storage/shared" }, value: 0 }] }] },
  { alert: "OpsMetricsStale", interval: "5m", series: [{ series: 'train_server_task_last_run_timestamp_seconds{task="usage-collector"}', values: "0+900x4 3600x30" }],
    evals: [{ at: "1h", firing: [] }, { at: "2h5m", firing: [{ labels: { task: "usage-collector" }, value: 7500 - 3600 }] }] },
  { alert: "HostDrift", series: [
      { series: 'train_server_drift{step="server-baseline",item="sshd.conf"}', values: "0x5 1x10" },
      { series: 'train_server_drift{step="server-baseline",item="ufw-rules"}', values: "0x15" },
      { series: 'train_server_drift_items{step="server-storage"}', values: "0x15" }],
    evals: [{ at: "3m", firing: [] }, { at: "10m", firing: [{ labels: { step: "server-baseline", item: "sshd.conf" }, value: 1 }] }] },
  { alert: "DriftCheckFailing", series: [
      { series: 'train_server_drift_check_success{step="server-users"}', values: "1x5 0x10" },
      { series: 'train_server_drift_check_success{step="server-baseline"}', values: "1x15" }],
    evals: [{ at: "3m", firing: [] }, { at: "10m", firing: [{ labels: { step: "server-users" }, value: 0 }] }] },
  // the job itself: a success older than 2 days fires (the value is its age); a daily success never does
  { alert: "DriftCheckFailing", interval: "5m", series: [
      { series: 'train_server_task_last_success_timestamp_seconds{task="drift-check"}', values: "0x287 86400x600" },
      { series: 'train_server_task_last_success_timestamp_seconds{task="usage-collector"}', values: "0x900" }],
    evals: [{ at: "48h", firing: [] }, { at: "73h", firing: [{ labels: { task: "drift-check" }, value: 73 * 3600 - 86400 }] }] },
  { alert: "DriftCheckFailing", interval: "5m", series: [
      { series: 'train_server_task_last_success_timestamp_seconds{task="drift-check"}', values: "0x287 86400x287 172800x287 259200x287 345600x300" },
      { series: 'train_server_drift_check_success{step="server-storage"}', values: "1x1450" }],
    evals: [{ at: "50h", firing: [] }, { at: "119h", firing: [] }] },
  { alert: "DataSyncFailed", series: [{ series: 'train_server_task_success{task="data-sync"}', values: "1x5 0x5" }, { series: 'train_server_task_success{task="backup"}', values: "0x10" }],
    evals: [{ at: "3m", firing: [] }, { at: "8m", firing: [{ labels: { task: "data-sync" }, value: 0 }] }] },
];

describe("Prometheus alert rules", () => {
  const rules = alertRules(alertParams);
  const ruleFile = () => {
    const f = path.join(scratch.dir, "rules.yml");
    fs.writeFileSync(f, renderOperations(exampleOpsParams(), loadOpsScripts())["/etc/train-server/prometheus/rules/train-server-ops.rules.yml"].content);
    return f;
  };

  it("promtool check rules accepts the rendered file", () => {
    const r = run("promtool", ["check", "rules", ruleFile()]);
    expect(r.out).toMatch(new RegExp(`SUCCESS: ${rules.length} rules found`));
    expect(r.status).toBe(0);
  });

  it("every alert has a promtool test case", () => {
    expect([...new Set(CASES.map((c) => c.alert))].sort()).toEqual(rules.map((r) => r.alert).sort());
  });

  it("promtool test rules: each alert fires on its condition and not otherwise", () => {
    const file = ruleFile();
    const byName = Object.fromEntries(rules.map((r) => [r.alert, r]));
    const tests = CASES.map((c) => ({
      interval: c.interval ?? "1m",
      input_series: c.series,
      alert_rule_test: c.evals.map((e) => ({
        eval_time: e.at,
        alertname: c.alert,
        exp_alerts: e.firing.map((a) => ({
          exp_labels: { ...a.labels, ...byName[c.alert].labels },
          exp_annotations: {
            summary: expand(byName[c.alert].annotations.summary, a.labels, a.value),
            description: expand(byName[c.alert].annotations.description, a.labels, a.value),
          },
        })),
      })),
    }));
    const testFile = path.join(scratch.dir, "rules.test.yml");
    fs.writeFileSync(testFile, YAML.stringify({ rule_files: [file], evaluation_interval: "1m", tests }));
    const r = run("promtool", ["test", "rules", testFile]);
    expect(r.out).toMatch(/SUCCESS/);
    expect(r.status).toBe(0);
  });

  it("promtool test rules does fail a wrong expectation (control)", () => {
    const testFile = path.join(scratch.dir, "rules.bad.yml");
    const c = CASES[0];
    fs.writeFileSync(testFile, YAML.stringify({ rule_files: [ruleFile()], evaluation_interval: "1m", tests: [{
      interval: "1m", input_series: c.series, alert_rule_test: [{ eval_time: "5m", alertname: c.alert, exp_alerts: [] }] }] }));
    expect(run("promtool", ["test", "rules", testFile]).status).not.toBe(0);
  });
});

describe("Alertmanager", () => {
  it("amtool check-config accepts alertmanager.yml, and routes every severity to telegram", () => {
    const f = path.join(scratch.dir, "alertmanager.yml");
    fs.writeFileSync(f, renderOperations(exampleOpsParams(), loadOpsScripts())["/etc/train-server/alertmanager/alertmanager.yml"].content);
    const r = run("amtool", ["check-config", f]);
    expect(r.out).toMatch(/SUCCESS/);
    expect(r.out).toMatch(/1 inhibit rules/);
    expect(r.status).toBe(0);
    for (const sev of ["critical", "warning"]) {
      expect(sh("amtool", ["config", "routes", "test", "--config.file", f, "--verify.receivers=telegram", "alertname=X", `severity=${sev}`]).trim()).toBe("telegram");
    }
  });
});

describe("ops-install.sh", () => {
  it("installs every file with its mode and owner, enables the units, then changes nothing; check sees drift; destroy removes", () => {
    const root = path.join(scratch.dir, "root");
    const filesDir = path.join(scratch.dir, "files");
    fs.mkdirSync(filesDir);
    const params = exampleOpsParams();
    const files = renderOperations(params, loadOpsScripts());
    for (const [name, content] of Object.entries(opsFilesDir(files, opsEnabledUnits(params)))) fs.writeFileSync(path.join(filesDir, name), content);
    const env = { TS_FILES_DIR: filesDir, TS_ROOT: root };

    const first = runScript("ops-install", "apply", env);
    expect(first.stderr).not.toMatch(/ERROR/);
    expect(first.status).toBe(0);
    expect(first.changes).toBe(Object.keys(files).length + opsEnabledUnits(params).length);
    for (const [p, f] of Object.entries(files)) {
      expect(fs.readFileSync(path.join(root, p), "utf8")).toBe(f.content);
      const st = fs.statSync(path.join(root, p));
      expect([p, (st.mode & 0o7777).toString(8).padStart(4, "0")]).toEqual([p, f.mode]);
      expect([p, `${st.uid}:${st.gid}`]).toEqual([p, f.owner === "root:65534" ? "0:65534" : "0:0"]);
    }
    expect(fs.readlinkSync(path.join(root, "etc/systemd/system/timers.target.wants/ts-backup.timer"))).toBe("/etc/systemd/system/ts-backup.timer");
    expect(fs.readlinkSync(path.join(root, "etc/systemd/system/multi-user.target.wants/ts-drive-mount.service"))).toBe("/etc/systemd/system/ts-drive-mount.service");

    const second = runScript("ops-install", "apply", env);
    expect([second.status, second.changes]).toEqual([0, 0]);
    expect(runScript("ops-install", "check", env).results.drift).toBe("0");

    fs.chmodSync(path.join(root, "etc/train-server/ops/restic-password"), 0o644);
    fs.rmSync(path.join(root, "etc/systemd/system/timers.target.wants/ts-scrub.timer"));
    const check = runScript("ops-install", "check", env);
    expect([check.results.drift, check.changes]).toEqual(["2", 0]);
    // named, for the drift check's metric: the file by its name, the unit as <unit>.enabled
    expect(Object.entries(check.results).filter(([k]) => k.startsWith("drift."))).toEqual([["drift.restic-password", "yes"], ["drift.ts-scrub.timer.enabled", "yes"]]);
    expect((fs.statSync(path.join(root, "etc/train-server/ops/restic-password")).mode & 0o777).toString(8)).toBe("644");
    expect(runScript("ops-install", "apply", env).changes).toBe(2);
    expect((fs.statSync(path.join(root, "etc/train-server/ops/restic-password")).mode & 0o777).toString(8)).toBe("600");

    const destroy = runScript("ops-install", "destroy", env);
    expect(destroy.status).toBe(0);
    for (const p of Object.keys(files)) expect(fs.existsSync(path.join(root, p))).toBe(false);
    expect(fs.existsSync(path.join(root, "etc/systemd/system/timers.target.wants"))).toBe(false); // systemctl disable removed the links (and the empty dir)
  });

  it("signals a running container when its files changed (rules → Prometheus, alertmanager.yml → Alertmanager), and only then", () => {
    const root = path.join(scratch.dir, "reload-root");
    const bin = path.join(scratch.dir, "reload-bin");
    const calls = path.join(scratch.dir, "docker-calls");
    fs.mkdirSync(bin);
    // a stand-in docker CLI: prometheus and alertmanager run; every call is recorded
    fs.writeFileSync(
      path.join(bin, "docker"),
      `#!/bin/sh\necho "$*" >>${calls}\ncase "$1" in inspect) case "$4" in prometheus|alertmanager) echo true;; *) exit 1;; esac;; esac\n`,
      { mode: 0o755 },
    );
    const write = (gpuTempC: number) => {
      const dir = fs.mkdtempSync(path.join(scratch.dir, "reload-files-"));
      const params = exampleOpsParams();
      params.alerts = { ...params.alerts, gpuTempC };
      for (const [name, content] of Object.entries(opsFilesDir(renderOperations(params, loadOpsScripts()), opsEnabledUnits(params)))) fs.writeFileSync(path.join(dir, name), content);
      return dir;
    };
    const reload = "/etc/train-server/prometheus/rules/ prometheus\n/etc/train-server/alertmanager/ alertmanager\n/etc/nowhere/ other";
    const run = (dir: string) => {
      fs.rmSync(calls, { force: true });
      const r = runScript("ops-install", "apply", { TS_FILES_DIR: dir, TS_ROOT: root, TS_RELOAD: reload, PATH: `${bin}:${process.env.PATH}` });
      expect(r.status).toBe(0);
      return fs.existsSync(calls) ? fs.readFileSync(calls, "utf8").split("\n").filter((l) => l.startsWith("kill")) : [];
    };
    expect(run(write(80)).sort()).toEqual(["kill --signal=HUP alertmanager", "kill --signal=HUP prometheus"]);
    expect(run(write(80))).toEqual([]); // nothing changed: no signal
    expect(run(write(85))).toEqual(["kill --signal=HUP prometheus"]); // only the rules changed
  });

  it("refuses a manifest with a relative or .. path before writing anything", () => {
    const filesDir = path.join(scratch.dir, "badfiles");
    const root = path.join(scratch.dir, "badroot");
    fs.mkdirSync(filesDir);
    fs.writeFileSync(path.join(filesDir, "f001"), "x");
    fs.writeFileSync(path.join(filesDir, "f002"), "y");
    fs.writeFileSync(path.join(filesDir, "manifest"), "f001 0644 root:root /etc/ok\nf002 0644 root:root /etc/../../escape\n");
    fs.writeFileSync(path.join(filesDir, "units"), "");
    const r = runScript("ops-install", "apply", { TS_FILES_DIR: filesDir, TS_ROOT: root });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/not a plain absolute path/);
    expect(fs.existsSync(path.join(root, "etc/ok"))).toBe(false);
  });
});
