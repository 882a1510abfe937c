/**
 * The weekly digest: weekly-digest.jq renders recorded query results to the exact text (a pure function); then
 * weekly-digest.sh end to end against a REAL Prometheus 2.42 holding a week of backfilled ledger, quota and backup
 * series (promtool tsdb create-blocks-from openmetrics), sending through a local fake of the Telegram bot API:
 * `check` prints the digest and sends nothing, `apply` sends exactly that text to the admin chat, twice the same.
 */
import { ChildProcess, spawn, spawnSync } from "child_process";
import * as fs from "fs";
import * as http from "http";
import * as path from "path";
import { parseResults } from "../../components/host";
import { HOST_SCRIPTS, Scratch } from "../helpers/host";
import { TELEGRAM_TOKEN } from "../helpers/ops";

jest.setTimeout(180_000);

const GiB = 1024 ** 3;
const v = (metric: Record<string, string>, value: number) => ({ metric, value: [1796119200, String(value)] });
/** Query results as weekly-digest.sh collects them (Tue 2026-12-01 10:00 UTC). */
const DATA = {
  now: 1796119200,
  warn_percent: 80,
  gpus: [v({}, 2)],
  gpu_hours: [v({ user: "alice", gpu: "0" }, 31.25), v({ user: "alice", gpu: "1" }, 2.5), v({ user: "bob", gpu: "1" }, 12), v({ user: "host", gpu: "0" }, 0.04)],
  gpu_peak_bytes: [v({ user: "alice" }, 18.2 * GiB), v({ user: "bob" }, 8 * GiB)],
  idle_hours: [v({ user: "carol", gpu: "2" }, 31.5), v({ user: "alice", gpu: "0" }, 0)],
  working_hours: [v({}, 45)],
  quota_used_bytes: [v({ user: "alice" }, 820 * GiB), v({ user: "bob" }, 120 * GiB), v({ user: "carol" }, 1100 * GiB)],
  quota_bytes: [v({ user: "alice" }, 1000 * GiB), v({ user: "bob" }, 1000 * GiB), v({ user: "carol" }, 1000 * GiB)],
  backup_last_success: [v({}, 1796119200 - 4 * 3600)],
  backup_ok: [v({}, 1)],
  verify_last_success: [v({}, 1795370000)],
};
const EXPECTED = `train-server weekly digest (7 days to Tue 2026-12-01 10:00)

GPU hours per user (busy time; a shared GPU is split by the memory each user holds)
  alice        33.8 h  (GPU 0 31.3, GPU 1 2.5)  peak 18.2 GiB
  bob          12.0 h  (GPU 1)  peak 8.0 GiB
  host          0.0 h  (GPU 0)
  carol         0.0 h

Idle reservations: pinned GPUs idle in working hours (45.0 working hours this week)
  carol      GPU 2   idle 31.5 h

Quota (home + workspace + docker volumes)
  carol        1100 of 1000 GiB  110 %  OVER QUOTA
  alice         820 of 1000 GiB   82 %  over 80 %
  bob           120 of 1000 GiB   12 %

Backups
  last success Tue 2026-12-01 06:00 (4.0 h ago)
  last run ok
  restore verified Sun 2026-11-22 17:53`;

let scratch: Scratch;
beforeAll(() => (scratch = new Scratch("ts-digest-")));
afterAll(() => scratch.cleanup());

const render = (data: object) => {
  const f = path.join(scratch.dir, `data-${Math.random().toString(36).slice(2)}.json`);
  fs.writeFileSync(f, JSON.stringify(data));
  const r = spawnSync("jq", ["-r", "-f", path.join(HOST_SCRIPTS, "weekly-digest.jq"), f], { encoding: "utf8", env: { PATH: process.env.PATH, TZ: "UTC" } });
  expect(r.stderr).toBe("");
  return r.stdout.replace(/\n$/, "");
};

describe("weekly-digest.jq (pure)", () => {
  it("renders GPU hours per user, idle reservations, quota standings and backups from query results", () => {
    expect(render(DATA)).toBe(EXPECTED);
  });
  it("says what is missing: no GPU ledger, no quota data, no backup ever", () => {
    expect(render({ now: DATA.now, warn_percent: 80 })).toBe(
      "train-server weekly digest (7 days to Tue 2026-12-01 10:00)\n\nGPU hours: no GPU ledger data this week\n\nQuota (home + workspace + docker volumes)\n  no quota data\n\n" +
        "Backups\n  NO SUCCESSFUL BACKUP RECORDED\n  restore verification: never succeeded",
    );
  });
  it("a failed last backup is said loudly; the text never exceeds Telegram's limit", () => {
    expect(render({ ...DATA, backup_ok: [v({}, 0)] })).toContain("  LAST RUN FAILED: journalctl -u ts-backup");
    const many = Array.from({ length: 300 }, (_, i) => v({ user: `user${i}` }, 1000 * GiB));
    expect(render({ ...DATA, quota_bytes: many }).length).toBeLessThanOrEqual(4000);
  });
});

/** Run a host script without blocking the event loop (the fake Telegram API answers in this process). */
function runAsync(name: string, action: string, env: Record<string, string>): Promise<{ status: number; stdout: string; stderr: string; results: Record<string, string> }> {
  return new Promise((resolve) => {
    const c = spawn("bash", [path.join(HOST_SCRIPTS, `${name}.sh`), action], { env: { PATH: process.env.PATH ?? "/usr/bin:/bin", LANG: "C.UTF-8", ...env } });
    let stdout = "";
    let stderr = "";
    c.stdout.on("data", (d) => (stdout += d));
    c.stderr.on("data", (d) => (stderr += d));
    c.on("close", (status) => resolve({ status: status ?? -1, stdout, stderr, results: parseResults(stdout) }));
  });
}

describe("weekly-digest.sh against a real Prometheus and a fake Telegram API", () => {
  let prometheus: ChildProcess | undefined;
  let telegram: http.Server;
  const sent: Array<{ url: string; form: URLSearchParams }> = [];
  let env: Record<string, string>;
  const now = Math.floor(Date.now() / 1000);

  beforeAll(async () => {
    // a week (and an hour) of samples on a 5-minute grid, plus one at now-20 s (inside the query's lookback)
    const grid: number[] = [];
    for (let t = Math.floor((now - 7 * 86400 - 3600) / 300) * 300; t < now - 20; t += 300) grid.push(t);
    grid.push(now - 20);
    const t0 = grid[0];
    const lines: string[] = [];
    const series = (name: string, labels: string, f: (t: number, i: number) => number) => grid.forEach((t, i) => lines.push(`${name}{${labels}} ${f(t, i)} ${t}`));
    const counter = (perSecond: number) => (t: number) => Number((perSecond * (t - t0)).toFixed(3));
    series("train_server_gpu_user_busy_seconds_total", 'gpu="0",uuid="GPU-0",user="alice"', counter(0.5)); // 84 GPU hours a week
    series("train_server_gpu_user_busy_seconds_total", 'gpu="0",uuid="GPU-0",user="bob"', counter(0.1)); // 16.8
    series("train_server_gpu_user_busy_seconds_total", 'gpu="1",uuid="GPU-1",user="alice"', counter(0.02)); // 3.36
    series("train_server_gpu_user_memory_bytes", 'gpu="0",uuid="GPU-0",user="alice"', (_t, i) => (i === 1000 ? 20 * GiB : 10 * GiB));
    series("train_server_gpu_memory_total_bytes", 'gpu="0",uuid="GPU-0"', () => 80 * GiB);
    series("train_server_gpu_memory_total_bytes", 'gpu="1",uuid="GPU-1"', () => 80 * GiB);
    // carol's pinned GPU 1 idle in working hours for 12 h (144 steps), within 45 working hours (540 steps)
    series("train_server:gpu_reservation_idle_working", 'gpu="1",user="carol"', (_t, i) => (i >= 600 && i < 744 ? 1 : 0));
    series("train_server:working_hours", "", (_t, i) => (i >= 500 && i < 1040 ? 1 : 0));
    series("train_server_user_usage_bytes", 'user="alice",dir="homes",method="qgroup"', () => 500 * GiB);
    series("train_server_user_usage_bytes", 'user="alice",dir="workspaces",method="qgroup"', () => 320 * GiB);
    series("train_server_user_usage_bytes", 'user="carol",dir="homes",method="qgroup"', () => 1100 * GiB);
    for (const u of ["alice", "carol"]) series("train_server_user_quota_bytes", `user="${u}"`, () => 1000 * GiB);
    series("train_server_task_last_success_timestamp_seconds", 'task="backup"', () => now - 4 * 3600);
    series("train_server_task_success", 'task="backup"', () => 1);
    series("train_server_task_last_success_timestamp_seconds", 'task="verify-restore"', () => now - 9 * 86400);
    const om = path.join(scratch.dir, "week.om");
    fs.writeFileSync(om, lines.join("\n") + "\n# EOF\n");
    const data = path.join(scratch.dir, "tsdb");
    const b = spawnSync("promtool", ["tsdb", "create-blocks-from", "openmetrics", om, data], { encoding: "utf8" });
    expect(b.stderr + (b.status === 0 ? "" : b.stdout)).not.toMatch(/error/i);
    fs.writeFileSync(path.join(scratch.dir, "prometheus.yml"), "global:\n  scrape_interval: 1h\n");
    const port = 19000 + (process.pid % 900);
    prometheus = spawn("prometheus", [`--config.file=${path.join(scratch.dir, "prometheus.yml")}`, `--storage.tsdb.path=${data}`, `--web.listen-address=127.0.0.1:${port}`], { stdio: "ignore" });
    const prom = `http://127.0.0.1:${port}`;
    for (let i = 0; ; i++) {
      if (spawnSync("curl", ["-fs", `${prom}/-/ready`]).status === 0) break;
      if (i > 120) throw new Error("prometheus did not become ready");
      await new Promise((r) => setTimeout(r, 250));
    }

    telegram = http.createServer((req, res) => {
      let body = "";
      req.on("data", (d) => (body += d));
      req.on("end", () => {
        sent.push({ url: req.url ?? "", form: new URLSearchParams(body) });
        res.setHeader("content-type", "application/json");
        res.end(JSON.stringify({ ok: true, result: { message_id: sent.length } }));
      });
    });
    await new Promise<void>((r) => telegram.listen(0, "127.0.0.1", () => r()));
    const token = path.join(scratch.dir, "telegram-bot-token");
    fs.writeFileSync(token, TELEGRAM_TOKEN, { mode: 0o600 });
    env = {
      TS_TELEGRAM_CHAT_ID: "-100123456",
      TS_TELEGRAM_BOT_TOKEN_FILE: token,
      TS_TELEGRAM_API_URL: `http://127.0.0.1:${(telegram.address() as { port: number }).port}`,
      TS_PROMETHEUS_URL: prom,
      TS_QUOTA_WARN_PERCENT: "80",
      TS_TEXTFILE_DIR: path.join(scratch.dir, "textfile"),
      TZ: "UTC",
    };
  });

  afterAll(async () => {
    if (prometheus && prometheus.exitCode === null) await new Promise((r) => { prometheus!.once("exit", r); prometheus!.kill("SIGTERM"); });
    await new Promise((r) => telegram?.close(r));
  });

  it("check: asks Prometheus for the week and prints the digest; sends nothing", async () => {
    const r = await runAsync("weekly-digest", "check", env);
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    const text = r.stdout.slice(0, r.stdout.lastIndexOf("\nchanges=0"));
    const lines = text.split("\n");
    expect(lines[0]).toMatch(/^train-server weekly digest \(7 days to \w{3} \d{4}-\d\d-\d\d \d\d:\d\d\)$/);
    const at = (prefix: string) => lines.find((l) => l.startsWith(prefix)) ?? `(no line starting "${prefix}")`;
    expect(at("  alice ")).toBe("  alice        87.4 h  (GPU 0 84.0, GPU 1 3.4)  peak 20.0 GiB");
    expect(at("  bob ")).toBe("  bob          16.8 h  (GPU 0)");
    expect(at("Idle reservations")).toBe("Idle reservations: pinned GPUs idle in working hours (45.0 working hours this week)");
    expect(at("  carol      GPU")).toBe("  carol      GPU 1   idle 12.0 h");
    expect(at("  carol        1100")).toBe("  carol        1100 of 1000 GiB  110 %  OVER QUOTA");
    expect(at("  alice         820")).toBe("  alice         820 of 1000 GiB   82 %  over 80 %");
    expect(at("  last success")).toMatch(/\(4\.0 h ago\)$/);
    expect(text).toContain("  last run ok\n  restore verified ");
    expect(sent).toEqual([]);
    expect(fs.existsSync(env.TS_TEXTFILE_DIR)).toBe(false); // check writes nothing
  });

  it("apply: sends exactly that text to the admin chat (token only in the URL path), and a second run the same", async () => {
    const check = await runAsync("weekly-digest", "check", env);
    const text = check.stdout.slice(0, check.stdout.lastIndexOf("\nchanges=0"));
    for (const n of [1, 2]) {
      const r = await runAsync("weekly-digest", "apply", env);
      expect([r.status, r.results.changes]).toEqual([0, "0"]);
      expect(sent).toHaveLength(n);
      expect(sent[n - 1].url).toBe(`/bot${TELEGRAM_TOKEN}/sendMessage`);
      expect(sent[n - 1].form.get("chat_id")).toBe("-100123456");
      expect(sent[n - 1].form.get("text")).toBe(text + "\n");
    }
    expect(fs.readFileSync(path.join(env.TS_TEXTFILE_DIR, "train_server_weekly-digest.prom"), "utf8")).toMatch(/^train_server_task_success\{task="weekly-digest"\} 1$/m);
  });

  it("refuses a token file others can read, and fails when Telegram says no", async () => {
    fs.chmodSync(env.TS_TELEGRAM_BOT_TOKEN_FILE, 0o644);
    const open = await runAsync("weekly-digest", "apply", env);
    fs.chmodSync(env.TS_TELEGRAM_BOT_TOKEN_FILE, 0o600);
    expect(open.status).not.toBe(0);
    expect(open.stderr).toMatch(/readable by group\/other/);
    const r = await runAsync("weekly-digest", "apply", { ...env, TS_TELEGRAM_CHAT_ID: "-1", TS_TELEGRAM_API_URL: `${env.TS_PROMETHEUS_URL}/nowhere` });
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/Telegram refused the digest|did not answer/);
    expect(fs.readFileSync(path.join(env.TS_TEXTFILE_DIR, "train_server_weekly-digest.prom"), "utf8")).toMatch(/^train_server_task_success\{task="weekly-digest"\} 0$/m);
  });
});
