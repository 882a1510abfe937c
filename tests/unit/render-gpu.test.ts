/** The GPU ledger's renderers: working hours as minute-of-week ranges, its rules, the idle notices' routes, the units and env. */
import YAML from "yaml";
import { parseConfig } from "../../components/config";
import { gpuLedgerParams, gpuWatchdogParams, opsParams, weeklyOnCalendar } from "../../components/operations";
import { gpuRules, gpuUsersEnv, workingRanges } from "../../components/render/gpu";
import { gpuWorkspacesEnv, opsEnabledUnits, OpsScripts, OPS_JOB_SCRIPTS, renderOperations, renderOpsEnv } from "../../components/render/ops";
import { alertRules } from "../../components/render/alerts";
import { runProgram } from "../helpers/program";
import { renderGrafanaDashboards } from "../../components/render/services";
import { clone, stackRaw } from "../helpers/program";
import { exampleGpuOpsParams, exampleOpsParams, TELEGRAM_TOKEN } from "../helpers/ops";

const scripts = Object.fromEntries(OPS_JOB_SCRIPTS.map((n) => [n, `# ${n}\n`])) as OpsScripts;
const WEEK = { days: ["monday", "tuesday", "wednesday", "thursday", "friday"], start: "09:00", end: "18:00" };

describe("working hours", () => {
  it("Mon-Fri 09:00-18:00 are five [from, to) minute-of-week ranges, Sunday 00:00 = 0", () => {
    expect(workingRanges(WEEK)).toEqual([1, 2, 3, 4, 5].map((d) => [d * 1440 + 540, d * 1440 + 1080]));
    expect(workingRanges({ days: ["sunday"], start: "00:00", end: "23:59" })).toEqual([[0, 1439]]);
  });
  it("refuses an empty or inverted day, naming the setting", () => {
    expect(() => workingRanges({ ...WEEK, end: "09:00" })).toThrow(/alerts\.workingHours\.end/);
    expect(() => workingRanges({ ...WEEK, start: "9am" })).toThrow(/alerts\.workingHours\.start/);
    expect(() => workingRanges({ ...WEEK, days: ["mon"] })).toThrow(/not a day of the week/);
  });
});

describe("GPU rules", () => {
  const g = gpuRules({ idleHours: 4, workingHours: WEEK, userChats: [] });
  const rec = Object.fromEntries(g.recording.map((r) => [r.record, r.expr]));
  it("local time from the ledger's UTC offset; working hours 1 inside the ranges, 0 outside", () => {
    expect(rec["train_server:local_time_seconds"]).toBe("time() + max by (instance) (train_server_utc_offset_seconds)");
    expect(rec["train_server:working_hours"]).toBe(
      "(" + [1, 2, 3, 4, 5].map((d) => `train_server:local_minute_of_week >= ${d * 1440 + 540} < ${d * 1440 + 1080}`).join(" or ") + ") * 0 + 1 or train_server:local_minute_of_week * 0",
    );
  });
  it("every recorded series is defined before it is read (one group, evaluated in order)", () => {
    g.recording.forEach((r, i) => {
      const later = g.recording.slice(i).map((x) => x.record);
      for (const name of later) expect([r.record, r.expr.includes(`${name} `) || r.expr.endsWith(name)]).toEqual([r.record, false]);
    });
  });
  it("the idle notice is info, held for the idle hours (fractions in minutes), and never about `all`/`none` users", () => {
    const idle = g.alerts.find((a) => a.alert === "GpuReservationIdle")!;
    expect(idle).toMatchObject({ for: "4h", labels: { severity: "info", family: "gpu-idle" } });
    expect(idle.expr).toBe("train_server:user_gpus_idle == 1 and on (instance) train_server:working_hours == 1");
    expect(idle.annotations.description).toMatch(/\(Mon, Tue, Wed, Thu, Fri 09:00-18:00\)\. Nothing was stopped/);
    expect(gpuRules({ idleHours: 1.5, workingHours: WEEK, userChats: [] }).alerts[0].for).toBe("90m");
    expect(() => gpuRules({ idleHours: 0, workingHours: WEEK, userChats: [] })).toThrow(/gpuIdleHours/);
  });
  it("TS_GPU_USERS: pinned indexes sorted, all, none", () => {
    expect(gpuUsersEnv([{ name: "alice", uid: 1000, gpus: [2, 0] }, { name: "bob", uid: 1001, gpus: "all" }, { name: "carol", uid: 1002, gpus: [] }, { name: "dave", uid: 1003 }])).toBe(
      "alice:1000:0,2 bob:1001:all carol:1002:none dave:1003:all",
    );
  });
});

describe("Operations on a GPU host", () => {
  const files = renderOperations(exampleGpuOpsParams(), scripts);
  const unit = (n: string) => files[`/etc/systemd/system/${n}`].content;
  it("the ledger runs every minute as a job of its own, the digest weekly after the network is up", () => {
    expect(unit("ts-gpu-ledger.timer")).toMatch(/^OnCalendar=minutely$/m);
    expect(unit("ts-gpu-ledger.service")).toMatch(/^ExecStart=\/usr\/local\/lib\/train-server\/ops\/gpu-ledger\.sh apply$/m);
    expect(unit("ts-weekly-digest.timer")).toMatch(/^OnCalendar=Mon \*-\*-\* 09:00:00$/m);
    expect(unit("ts-weekly-digest.service")).toMatch(/^After=network-online.target$/m);
    expect(opsEnabledUnits(exampleGpuOpsParams()).slice(-2)).toEqual(["ts-gpu-ledger.timer", "ts-weekly-digest.timer"]);
    expect(files["/usr/local/lib/train-server/ops/gpu-ledger.sh"].mode).toBe("0755");
    expect(files["/usr/local/lib/train-server/ops/weekly-digest.jq"].mode).toBe("0644");
  });
  it("ops.env: the users' GPU selections, the ledger's gap and the digest's inputs; the bot token only in its 0600 file", () => {
    const env = renderOpsEnv(exampleGpuOpsParams());
    expect(env).toContain('TS_GPU_USERS="alice:2001:0 bob:2002:all carol:2003:none"');
    expect(env).toContain('TS_GPU_LEDGER_MAX_GAP="180"');
    expect(env).toContain('TS_TELEGRAM_CHAT_ID="-100123456"');
    expect(env).toContain('TS_TELEGRAM_BOT_TOKEN_FILE="/etc/train-server/ops/telegram-bot-token"');
    expect(env).toContain('TS_PROMETHEUS_URL=""');
    expect(env).not.toContain(TELEGRAM_TOKEN);
    expect(files["/etc/train-server/ops/telegram-bot-token"]).toEqual({ content: TELEGRAM_TOKEN, mode: "0600", owner: "root:root", secret: true });
    expect(() => renderOpsEnv(exampleGpuOpsParams({ digest: { prometheusUrl: "http://x/;rm" } }))).toThrow(/digest\.prometheusUrl/);
  });
  it("the rule file gains the GPU group; alertmanager routes the notice to the user's chat and then the admin's", () => {
    const rules = YAML.parse(files["/etc/train-server/prometheus/rules/train-server-ops.rules.yml"].content);
    expect(rules.groups.map((x: { name: string }) => x.name)).toEqual(["train-server-ops", "train-server-gpu"]);
    const am = YAML.parse(files["/etc/train-server/alertmanager/alertmanager.yml"].content);
    expect(am.route.routes.slice(0, 2)).toEqual([
      { receiver: "telegram-user-alice", matchers: ['alertname="GpuReservationIdle"', 'user="alice"'], group_by: ["alertname", "user"], repeat_interval: "24h", continue: true },
      { receiver: "telegram-notices", matchers: ['severity="info"'], repeat_interval: "24h" },
    ]);
    const byName = Object.fromEntries(am.receivers.map((r: { name: string; telegram_configs: object[] }) => [r.name, r.telegram_configs[0]]));
    expect(byName["telegram-user-alice"]).toMatchObject({ chat_id: 111222333, bot_token: TELEGRAM_TOKEN, send_resolved: false });
    expect(byName["telegram-notices"]).toMatchObject({ chat_id: -100123456, send_resolved: false });
  });
  it("a host without GPUs has no ledger, no GPU rules and no notice routes, but the digest", () => {
    const plain = renderOperations(exampleOpsParams(), scripts);
    expect(Object.keys(plain).filter((k) => k.includes("gpu-ledger.") && k.startsWith("/etc/systemd"))).toEqual([]);
    expect(YAML.parse(plain["/etc/train-server/prometheus/rules/train-server-ops.rules.yml"].content).groups).toHaveLength(1);
    expect(YAML.parse(plain["/etc/train-server/alertmanager/alertmanager.yml"].content).receivers.map((r: { name: string }) => r.name)).toEqual(["telegram"]);
    expect(renderOpsEnv(exampleOpsParams())).not.toContain("TS_GPU_USERS");
    expect(opsEnabledUnits(exampleOpsParams())).toContain("ts-weekly-digest.timer");
    expect(opsEnabledUnits(exampleOpsParams())).not.toContain("ts-gpu-ledger.timer");
  });
});

describe("the GPU watchdog", () => {
  const watchdog = { workspaces: [{ user: "alice", container: "workspace-alice", gpus: 1 }, { user: "bob", container: "workspace-bob", gpus: 4 }, { user: "carol", container: "workspace-carol", gpus: 0 }] };
  const p = exampleGpuOpsParams({ gpuWatchdog: watchdog });
  const files = renderOperations(p, scripts);
  const unit = (n: string) => files[`/etc/systemd/system/${n}`].content;
  it("runs every minute after Docker, with the workspaces of the users that have GPUs and how many", () => {
    expect(unit("ts-gpu-watchdog.timer")).toMatch(/^OnCalendar=minutely$/m);
    expect(unit("ts-gpu-watchdog.service")).toMatch(/^ExecStart=\/usr\/local\/lib\/train-server\/ops\/gpu-watchdog\.sh apply$/m);
    expect(unit("ts-gpu-watchdog.service")).toMatch(/^After=docker\.service$/m);
    expect(renderOpsEnv(p)).toContain('TS_GPU_WORKSPACES="alice:workspace-alice:1 bob:workspace-bob:4"');
    expect(opsEnabledUnits(p)).toEqual(expect.arrayContaining(["ts-gpu-ledger.timer", "ts-gpu-watchdog.timer"]));
    expect(() => gpuWorkspacesEnv([{ user: "x;y", container: "c", gpus: 1 }])).toThrow(/gpuWatchdog\.user/);
  });
  it("its alerts are in the ops group on GPU hosts only", () => {
    const rules = YAML.parse(files["/etc/train-server/prometheus/rules/train-server-ops.rules.yml"].content).groups[0].rules.map((r: { alert: string }) => r.alert);
    expect(rules).toEqual(expect.arrayContaining(["WorkspaceGpuUnreachable", "GpuWatchdogFailing"]));
    const plain = renderOperations(exampleOpsParams(), scripts);
    expect(plain["/etc/systemd/system/ts-gpu-watchdog.timer"]).toBeUndefined();
    expect(alertRules({ ...exampleOpsParams().alerts, mountpoint: "/m", driveMountpoint: "/d", quotaWarnPercent: 80 }).map((r) => r.alert)).not.toContain("WorkspaceGpuUnreachable");
  });
  it("from the config: `all` counts the host's GPUs, pinned users their list, `none` is left out", () => {
    const raw = clone(stackRaw("prod"));
    raw.host.gpu.count = 4;
    raw.users[1].gpus = [1, 3];
    raw.users[2].gpus = "none";
    expect(gpuWatchdogParams(parseConfig(raw)).workspaces).toEqual([
      { user: "alice", container: "workspace-alice", gpus: 4 },
      { user: "bob", container: "workspace-bob", gpus: 2 },
      { user: "dave", container: "workspace-dave", gpus: 4 },
      { user: "eve", container: "workspace-eve", gpus: 4 },
    ]);
  });
  it("the program enables the ledger's and the watchdog's timers on a GPU host (not on one without GPUs)", async () => {
    const units = async (raw: Record<string, any>) => {
      const { resources } = await runProgram(raw);
      const ops = resources.find((r) => r.type === "train-server:host:Script" && r.inputs.script === "ops-install")!;
      return String(ops.inputs.files.units).trim().split("\n");
    };
    expect(await units(stackRaw("prod"))).toEqual(expect.arrayContaining(["ts-gpu-ledger.timer", "ts-gpu-watchdog.timer"]));
    const noGpu = clone(stackRaw("prod"));
    noGpu.host.gpu.count = 0;
    for (const u of noGpu.users) delete u.gpus;
    delete noGpu.resources?.gpus;
    expect(await units(noGpu)).not.toEqual(expect.arrayContaining(["ts-gpu-watchdog.timer"]));
  });
});

describe("from the stack config", () => {
  it("prod (1 GPU): everyone on the shared pool by default; a pinned user with a chat gets the notice route", () => {
    const raw = clone(stackRaw("prod"));
    raw.users[1].gpus = [0];
    raw.users[1].telegramChatId = "4242";
    raw.alerts.workingHours = { days: ["monday", "friday"], start: "08:30", end: "17:00" };
    const config = parseConfig(raw);
    expect(gpuLedgerParams(config)).toEqual({
      idleHours: 4,
      workingHours: { days: ["monday", "friday"], start: "08:30", end: "17:00" },
      userChats: [{ user: "bob", chatId: 4242 }],
    });
    const p = opsParams(config, 100, { resticPassword: "x", rcloneConfig: "y", telegramBotToken: "1:a" });
    expect(p.users.map((u) => `${u.name}:${JSON.stringify(u.gpus)}`)).toEqual(['alice:"all"', "bob:[0]", 'charlie:"all"', 'dave:"all"', 'eve:"all"']);
    expect(p.digest).toEqual({ schedule: "Mon *-*-* 09:00:00" });
  });
  it("no GPUs: no ledger", () => {
    const raw = clone(stackRaw("prod"));
    raw.host.gpu.count = 0;
    expect(gpuLedgerParams(parseConfig(raw))).toBeUndefined();
  });
  it("the digest's schedule from alerts.digestDay/digestAt", () => {
    expect(weeklyOnCalendar("friday", "16:30")).toBe("Fri *-*-* 16:30:00");
  });
});

describe("dashboards", () => {
  it('a GPU host gets "Who uses which GPU" on the ledger\'s series; a host without GPUs does not', () => {
    const boards = renderGrafanaDashboards({ mountpoint: "/mnt/storage", gpu: true });
    const d = JSON.parse(boards["gpu-users.json"]);
    expect([d.uid, d.title]).toEqual(["ts-gpu-users", "Who uses which GPU"]);
    expect(d.panels.map((p: { targets: Array<{ expr: string }> }) => p.targets[0].expr).join(" ")).toMatch(/train_server_gpu_user_memory_bytes.*train_server_gpu_user_busy_seconds_total/);
    expect(Object.keys(renderGrafanaDashboards({ mountpoint: "/mnt/storage", gpu: false }))).not.toContain("gpu-users.json");
  });
});
