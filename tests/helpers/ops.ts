/** Shared fixtures of the Operations tests: example params (the stack's defaults) and writing a files map to a root. */
import * as fs from "fs";
import * as path from "path";
import { HostFile, OpsParams } from "../../components/render/ops";

export const TELEGRAM_TOKEN = "123456:ABC-test_token";

export function exampleOpsParams(over: Partial<OpsParams> = {}): OpsParams {
  return {
    mountpoint: "/mnt/storage",
    users: [
      { name: "alice", uid: 2001, quotaGb: 1000 },
      { name: "bob", uid: 2002, quotaGb: 1000 },
    ],
    quotaWarnPercent: 80,
    snapshots: { hourly: 24, daily: 7, weekly: 4, dailyHour: 2, weeklyDay: "sunday", sources: ["homes/{user}", "docker-volumes/*"] },
    backup: {
      repository: "rclone:gdrive:train-server/restic",
      schedule: "06:00",
      uploadLimitMbit: 100,
      keepDaily: 7,
      keepWeekly: 52,
      verifySchedule: "*-*-01 08:00:00",
      scrubSchedule: "*-*-15 03:00:00",
    },
    drive: { rcloneRemote: "gdrive:", mountpoint: "/mnt/storage/shared", cacheDir: "/mnt/storage/cache/gdrive", cacheSizeGb: 2000, cacheMaxAge: "720h", uid: 0, gid: 3000 },
    dataSync: { source: "gcs:bucket/path", destination: "gdrive:path", schedule: "04:00", bandwidthLimit: "20M" },
    alerts: { gpuTempC: 80, fsUsedPercent: 90, backupMaxAgeHours: 26, telegramChatId: -100123456, telegramBotToken: TELEGRAM_TOKEN },
    textfileDir: "/var/lib/prometheus/node-exporter",
    secrets: { resticPassword: "restic-secret-pw\n", rcloneConfig: "[gdrive]\ntype = drive\n" },
    ...over,
  };
}

/** Write every file of the map under `root` (content and mode; owner is left to the caller). */
export function writeFiles(root: string, files: Record<string, HostFile>): void {
  for (const [p, f] of Object.entries(files)) {
    const dest = path.join(root, p);
    fs.mkdirSync(path.dirname(dest), { recursive: true });
    fs.writeFileSync(dest, f.content, { mode: parseInt(f.mode, 8) });
    fs.chmodSync(dest, parseInt(f.mode, 8));
  }
}

/**
 * A GPU host's params: alice has GPU 0 pinned (and her own Telegram chat), bob uses the shared pool (all), carol
 * has none; idle notices after 4 working hours, Mon-Fri 09:00-18:00.
 */
export function exampleGpuOpsParams(over: Partial<OpsParams> = {}): OpsParams {
  return exampleOpsParams({
    users: [
      { name: "alice", uid: 2001, quotaGb: 1000, gpus: [0] },
      { name: "bob", uid: 2002, quotaGb: 1000, gpus: "all" },
      { name: "carol", uid: 2003, quotaGb: 1000, gpus: [] },
    ],
    gpuLedger: {
      idleHours: 4,
      workingHours: { days: ["monday", "tuesday", "wednesday", "thursday", "friday"], start: "09:00", end: "18:00" },
      userChats: [{ user: "alice", chatId: 111222333 }],
    },
    ...over,
  });
}

/**
 * The Go-template functions used in the alert annotations, as Prometheus formats them (for promtool's
 * exp_annotations): `{{ $labels.x }}`, `{{ $value }}` with humanize / humanizePercentage / humanizeDuration, and
 * `{{ if $labels.x }}...{{ else }}...{{ end }}` (not nested).
 */
export function expand(tmpl: string, labels: Record<string, string>, value: number): string {
  const g = (v: number) => String(Number(v.toPrecision(4)));
  const dur = (v: number) => {
    const d = Math.floor(v / 86400), h = Math.floor((v % 86400) / 3600), m = Math.floor((v % 3600) / 60), s = Math.floor(v % 60);
    return d ? `${d}d ${h}h ${m}m ${s}s` : h ? `${h}h ${m}m ${s}s` : m ? `${m}m ${s}s` : `${g(v)}s`;
  };
  return tmpl
    .replace(/\{\{ if \$labels\.(\w+) \}\}(.*?)(?:\{\{ else \}\}(.*?))?\{\{ end \}\}/g, (_, k, yes, no) => (labels[k] ? yes : (no ?? "")))
    .replace(/\{\{ \$labels\.(\w+) \}\}/g, (_, k) => labels[k] ?? "")
    .replace(/\{\{ \$value \| humanizePercentage \}\}/g, () => `${g(value * 100)}%`)
    .replace(/\{\{ \$value \| humanizeDuration \}\}/g, () => dur(value))
    .replace(/\{\{ \$value \| humanize \}\}/g, () => g(value))
    .replace(/\{\{ \$value \}\}/g, () => String(value));
}

/**
 * backup.sh's inputs for a test: root-only secret files under `dir`/secrets (the password; an rclone config whose
 * remote `backupdisk` is the local disk) and an `rclone:` repository under `dir`/drive, the array at `mountpoint`,
 * no upload limit, retention 7 daily / 52 weekly, archives forever; `over` replaces any of them.
 */
export function backupTestEnv(dir: string, mountpoint: string, password: string, over: Record<string, string> = {}): Record<string, string> {
  const secrets = path.join(dir, "secrets");
  fs.mkdirSync(secrets, { mode: 0o700 });
  fs.writeFileSync(path.join(secrets, "restic-password"), `${password}\n`, { mode: 0o600 });
  fs.writeFileSync(path.join(secrets, "rclone.conf"), "[backupdisk]\ntype = local\n", { mode: 0o600 });
  return {
    TS_MOUNTPOINT: mountpoint,
    TS_SNAPSHOT_SOURCES: "homes/* docker-volumes/*",
    TS_RESTIC_REPOSITORY: `rclone:backupdisk:${path.join(dir, "drive", "restic")}`,
    TS_RESTIC_PASSWORD_FILE: path.join(secrets, "restic-password"),
    TS_RCLONE_CONFIG: path.join(secrets, "rclone.conf"),
    TS_BACKUP_LIMIT_UPLOAD_KIB: "0",
    TS_BACKUP_KEEP_DAILY: "7",
    TS_BACKUP_KEEP_WEEKLY: "52",
    TS_BACKUP_ARCHIVE_KEEP_YEARS: "0",
    TS_STATE_DIR: path.join(dir, "ops-state"),
    TS_TEXTFILE_DIR: path.join(dir, "textfile"),
    ...over,
  };
}
