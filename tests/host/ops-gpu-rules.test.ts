/**
 * The GPU ledger's rules through the real validators: promtool check rules; promtool test rules for the working
 * hours (the host's UTC offset applied) and the idle notice — pinned GPUs idle 4 working hours fire, idle over a
 * weekend or an evening does not (the count restarts each working day), busy does not, one busy GPU of two pinned
 * does not, a user with `gpus: none` or the shared pool (`all`) never does — and the ledger-failing alert;
 * amtool: alertmanager.yml is valid and a notice reaches the user's own chat and the admin's.
 * promtool tests start at t=0 = Thursday 1970-01-01 00:00 UTC; inputs are sampled every 5 minutes.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import YAML from "yaml";
import { alertRules } from "../../components/render/alerts";
import { gpuRules } from "../../components/render/gpu";
import { loadOpsScripts, renderOperations } from "../../components/render/ops";
import { exampleGpuOpsParams } from "../helpers/ops";
import { Scratch, sh } from "../helpers/host";

const run = (cmd: string, args: string[]) => {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  return { status: r.status ?? -1, out: (r.stdout ?? "") + (r.stderr ?? "") };
};

const params = exampleGpuOpsParams();
const files = renderOperations(params, loadOpsScripts());
const rules = gpuRules(params.gpuLedger!);
const idle = rules.alerts.find((a) => a.alert === "GpuReservationIdle")!;
const failing = rules.alerts.find((a) => a.alert === "GpuLedgerFailing")!;

let scratch: Scratch;
let rulesFile: string;
beforeAll(() => {
  scratch = new Scratch("ts-gpu-rules-");
  rulesFile = path.join(scratch.dir, "rules.yml");
  fs.writeFileSync(rulesFile, files["/etc/train-server/prometheus/rules/train-server-ops.rules.yml"].content);
});
afterAll(() => scratch.cleanup());

/** "Mon 13:05" -> the promtool duration since Thursday 00:00 UTC (Thu 0d … Wed 6d). */
const at = (when: string) => {
  const [day, hm] = when.split(" ");
  const d = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"].indexOf(day);
  const [h, m] = hm.split(":").map(Number);
  if (d < 0) throw new Error(when);
  return `${d}d${h}h${m}m`;
};
/** 5-minute steps from Thursday 00:00 UTC to `when`. */
const steps = (when: string) => {
  const [day, hm] = when.split(" ");
  const [h, m] = hm.split(":").map(Number);
  return (["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"].indexOf(day) * 1440 + h * 60 + m) / 5;
};
const N = steps("Wed 00:00"); // every input runs this long
const busy = (gpu: number) => ({ series: `train_server_gpu_busy_seconds_total{gpu="${gpu}",uuid="GPU-${gpu}"}`, values: `0+150x${N}` }); // 50 %
const idleGpu = (gpu: number) => ({ series: `train_server_gpu_busy_seconds_total{gpu="${gpu}",uuid="GPU-${gpu}"}`, values: `0x${N}` });
/** Busy until `when`, idle after it. */
const busyUntil = (gpu: number, when: string) => {
  const n = steps(when);
  return { series: `train_server_gpu_busy_seconds_total{gpu="${gpu}",uuid="GPU-${gpu}"}`, values: `0+150x${n} ${150 * n}x${N - n}` };
};
const pinned = (user: string, gpu: number) => ({ series: `train_server_gpu_reservation{gpu="${gpu}",user="${user}"}`, values: `1x${N}` });
const offset = (s: number) => ({ series: "train_server_utc_offset_seconds", values: `${s}x${N}` });

const expand = (t: string, user: string) => t.replace(/\{\{ \$labels\.user \}\}/g, user);
const fires = (user: string) => ({
  exp_labels: { user, ...idle.labels },
  exp_annotations: { summary: expand(idle.annotations.summary, user), description: expand(idle.annotations.description, user) },
});
const idleAt = (when: string, users: string[]) => ({ eval_time: at(when), alertname: "GpuReservationIdle", exp_alerts: users.map(fires) });

function promtoolTest(name: string, tests: object[]) {
  const file = path.join(scratch.dir, `${name}.test.yml`);
  fs.writeFileSync(file, YAML.stringify({ rule_files: [rulesFile], evaluation_interval: "5m", tests }, { lineWidth: 0 }));
  return run("promtool", ["test", "rules", file]);
}

test("promtool check rules accepts the rule file with the GPU group", () => {
  const r = run("promtool", ["check", "rules", rulesFile]);
  const n = (YAML.parse(fs.readFileSync(rulesFile, "utf8")).groups as Array<{ rules: object[] }>).reduce((a, g) => a + g.rules.length, 0);
  const ops = alertRules({ ...params.alerts, mountpoint: params.mountpoint, driveMountpoint: params.drive.mountpoint, quotaWarnPercent: params.quotaWarnPercent });
  expect(n).toBe(ops.length + rules.recording.length + rules.alerts.length);
  expect(r.out).toContain(`SUCCESS: ${n} rules found`);
  expect(r.status).toBe(0);
});

test("working hours: Mon-Fri 09:00-18:00 in the host's local time (its UTC offset from the ledger)", () => {
  const wh = (when: string, value: number) => ({ expr: "train_server:working_hours", eval_time: at(when), exp_samples: [{ labels: "train_server:working_hours", value }] });
  const r = promtoolTest("working-hours", [
    { interval: "5m", input_series: [offset(0)], promql_expr_test: [
      wh("Thu 08:55", 0), wh("Thu 09:00", 1), wh("Thu 17:55", 1), wh("Thu 18:00", 0), wh("Sat 12:00", 0), wh("Sun 12:00", 0), wh("Mon 09:00", 1), wh("Tue 23:00", 0)] },
    // UTC+1 (CET): 08:00 UTC is 09:00 local
    { interval: "5m", input_series: [offset(3600)], promql_expr_test: [wh("Mon 07:55", 0), wh("Mon 08:00", 1), wh("Mon 16:55", 1), wh("Mon 17:00", 0)] },
  ]);
  expect(r.out).toMatch(/SUCCESS/);
  expect(r.status).toBe(0);
});

test("idle notices: 4 idle working hours fire; weekends, evenings, busy GPUs and users without a pinned GPU never do", () => {
  const r = promtoolTest("idle", [
    {
      // alice's pinned GPU 0 idle all along: nothing on Thursday night or all weekend; Monday from 09:00, fires at 13:00;
      // at 18:00 the working day ends (resolved), and Tuesday counts again from 09:00
      interval: "5m",
      input_series: [offset(0), pinned("alice", 0), idleGpu(0), idleGpu(1), idleGpu(2)],
      alert_rule_test: [
        idleAt("Thu 12:55", []), idleAt("Thu 13:05", ["alice"]), idleAt("Thu 23:00", []),
        idleAt("Sat 14:00", []), idleAt("Sun 23:55", []),
        idleAt("Mon 09:30", []), idleAt("Mon 12:55", []), idleAt("Mon 13:05", ["alice"]), idleAt("Mon 17:55", ["alice"]),
        idleAt("Mon 18:05", []), idleAt("Tue 12:55", []), idleAt("Tue 13:05", ["alice"]),
      ],
    },
    {
      // busy until Friday 18:00, idle over the weekend: Monday morning is not 4 idle working hours
      interval: "5m",
      input_series: [offset(0), pinned("alice", 0), busyUntil(0, "Fri 18:00")],
      alert_rule_test: [idleAt("Fri 17:55", []), idleAt("Sun 12:00", []), idleAt("Mon 09:30", []), idleAt("Mon 12:55", []), idleAt("Mon 13:05", ["alice"])],
    },
    {
      // busy GPUs: alice's at 50 %; carol pins GPUs 1 and 2 and uses only 2; bob (all) and dave (none) have no
      // reservation series at all, however idle GPU 3 is
      interval: "5m",
      input_series: [offset(0), pinned("alice", 0), busy(0), pinned("carol", 1), pinned("carol", 2), idleGpu(1), busy(2), idleGpu(3)],
      alert_rule_test: [idleAt("Thu 13:05", []), idleAt("Mon 13:05", []), idleAt("Tue 17:00", [])],
    },
    {
      // UTC+1: the working day starts at 08:00 UTC, so the notice comes at 12:00 UTC
      interval: "5m",
      input_series: [offset(3600), pinned("alice", 0), idleGpu(0)],
      alert_rule_test: [idleAt("Mon 11:55", []), idleAt("Mon 12:05", ["alice"])],
    },
  ]);
  expect(r.out).toMatch(/SUCCESS/);
  expect(r.status).toBe(0);
});

test("the ledger failing or stale for 10 minutes warns; a working ledger does not", () => {
  const exp = [{ exp_labels: { task: "gpu-ledger", ...failing.labels }, exp_annotations: failing.annotations }];
  const r = promtoolTest("failing", [
    { interval: "1m", input_series: [{ series: 'train_server_task_success{task="gpu-ledger"}', values: "1x10 0x30" }, { series: 'train_server_task_last_run_timestamp_seconds{task="gpu-ledger"}', values: "0+60x40" }],
      alert_rule_test: [{ eval_time: "9m", alertname: "GpuLedgerFailing", exp_alerts: [] }, { eval_time: "15m", alertname: "GpuLedgerFailing", exp_alerts: [] }, { eval_time: "25m", alertname: "GpuLedgerFailing", exp_alerts: exp }] },
    { interval: "1m", input_series: [{ series: 'train_server_task_success{task="gpu-ledger"}', values: "1x60" }, { series: 'train_server_task_last_run_timestamp_seconds{task="gpu-ledger"}', values: "0+60x10 600x50" }],
      alert_rule_test: [{ eval_time: "20m", alertname: "GpuLedgerFailing", exp_alerts: [] }, { eval_time: "40m", alertname: "GpuLedgerFailing", exp_alerts: exp }] },
  ]);
  expect(r.out).toMatch(/SUCCESS/);
  expect(r.status).toBe(0);
});

test("control: promtool fails an idle notice expected over the weekend", () => {
  const r = promtoolTest("control", [{ interval: "5m", input_series: [offset(0), pinned("alice", 0), idleGpu(0)], alert_rule_test: [idleAt("Sun 14:00", ["alice"])] }]);
  expect(r.status).not.toBe(0);
});

test("amtool: the config is valid; a notice goes to the user's own chat and the admin's, others to the admin only", () => {
  const f = path.join(scratch.dir, "alertmanager.yml");
  fs.writeFileSync(f, files["/etc/train-server/alertmanager/alertmanager.yml"].content);
  const c = run("amtool", ["check-config", f]);
  expect(c.out).toMatch(/SUCCESS/);
  expect(c.out).toMatch(/3 receivers/);
  expect(c.status).toBe(0);
  const routes = (labels: string[]) => sh("amtool", ["config", "routes", "test", "--config.file", f, ...labels]).trim();
  expect(routes(["alertname=GpuReservationIdle", "user=alice", "severity=info", "family=gpu-idle"])).toBe("telegram-user-alice,telegram-notices");
  expect(routes(["alertname=GpuReservationIdle", "user=carol", "severity=info", "family=gpu-idle"])).toBe("telegram-notices");
  expect(routes(["alertname=GpuLedgerFailing", "severity=warning", "family=gpu"])).toBe("telegram");
  expect(routes(["alertname=BackupFailed", "severity=critical", "user=alice"])).toBe("telegram");
});
