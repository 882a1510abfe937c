/**
 * Operations renderers: every host file of the Operations area (systemd units and timers, btrbk.conf, the jobs'
 * environment file, secret files, the job scripts themselves, Prometheus rules, alertmanager.yml) as one map
 * `absolute host path -> {content, mode, owner}`. Pure functions, except `loadOpsScripts` which reads the job
 * scripts from host-scripts/ (call it once in the program and pass its result in).
 *
 * How it runs on the host:
 *   ops-install.sh (run by the program) installs these files from $TS_FILES_DIR (see `opsFilesDir`) and enables
 *   the timers. Each timer starts `ts-<job>.service`, which runs `<scriptDir>/<job>.sh apply` with
 *   EnvironmentFile=<configDir>/ops.env (TS_* variables, see `renderOpsEnv`; no secret in it, only paths to the
 *   root-only secret files). Every job writes `<textfileDir>/train_server_<job>.prom` atomically.
 *   On GPU hosts ts-gpu-ledger (every minute) accounts GPU time to users and ts-gpu-watchdog (every minute) checks
 *   that each workspace still reaches its GPUs (gpu-watchdog.sh); ts-weekly-digest sends the weekly digest;
 *   ts-drift-check (daily) runs every installed host step's `check` and exports what differs (drift-check.sh).
 */
import * as fs from "fs";
import * as path from "path";
import { renderAlertmanagerConfig, renderAlertRules, AlertParams } from "./alerts";
import { GpuAlertParams, gpuUsersEnv } from "./gpu";

export interface OpsUser {
  /** Login name (also the directory name under homes/, workspaces/, docker-volumes/). */
  name: string;
  uid: number;
  /** Soft quota over home + workspace + docker-volumes, in GiB (2^30 bytes, like `btrfs qgroup limit 1000G`). */
  quotaGb: number;
  /** GPUs the user may use: "all" (the shared pool, default) or pinned indexes ([] = none). */
  gpus?: "all" | number[];
}

export interface OpsParams {
  /** Array mountpoint, e.g. /mnt/storage. */
  mountpoint: string;
  users: OpsUser[];
  /** Warning threshold of the per-user quota alert, in percent (the critical one is 100 %). Default 80. */
  quotaWarnPercent: number;
  snapshots: {
    /** How many hourly / daily / weekly read-only snapshots to keep (24 / 7 / 4). Each >= 1. */
    hourly: number;
    daily: number;
    weekly: number;
    /** Hour (0-23) from which a snapshot counts as that day's daily (and on weeklyDay, the weekly). Default 2. */
    dailyHour: number;
    /** Day whose daily snapshot is the weekly one. Default "sunday". */
    weeklyDay: "monday" | "tuesday" | "wednesday" | "thursday" | "friday" | "saturday" | "sunday";
    /**
     * Subvolumes to snapshot, relative to the mountpoint; "*" allowed in the last part (btrbk wildcard), e.g.
     * ["homes/*", "docker-volumes/*", "tensorboard/*"]. Each group's snapshots go to <mountpoint>/.snapshots/<group>.
     * "{user}" as the last part ("homes/{user}") snapshots each user's subvolume into a directory of its own,
     * <mountpoint>/.snapshots/<group>/<user>/ (what a user's workspace shows them, and nobody else's).
     */
    sources: string[];
  };
  backup: {
    /** restic repository, e.g. "rclone:gdrive:train-server/restic" (rclone remotes come from the rclone config). */
    repository: string;
    /** "HH:MM" (daily) or any systemd OnCalendar expression. Default "06:00". */
    schedule: string;
    /** Upload limit in Mbit/s (restic --limit-upload, converted to KiB/s). 0 = unlimited. */
    uploadLimitMbit: number;
    keepDaily: number;
    keepWeekly: number;
    /** Years the restic copies of archived homes are kept; 0 = forever (default). */
    archiveKeepYears?: number;
    /** Restore verification schedule, e.g. "*-*-01 08:00:00" (1st of the month, 08:00). */
    verifySchedule: string;
    /** Scrub schedule, e.g. "*-*-15 03:00:00". */
    scrubSchedule: string;
    /** Files restored and compared per verification. Default 50. */
    verifySampleFiles?: number;
    /** `restic check --read-data-subset` argument. Default "5%". */
    verifyReadDataSubset?: string;
  };
  drive: {
    /** rclone remote (with optional path), e.g. "gdrive:". */
    rcloneRemote: string;
    /** Where the Drive is mounted, e.g. /mnt/storage/shared. */
    mountpoint: string;
    /** VFS cache directory on the array, e.g. /mnt/storage/cache/gdrive. */
    cacheDir: string;
    /** --vfs-cache-max-size in GiB (see driveCacheSizeGb). */
    cacheSizeGb: number;
    /** --vfs-cache-max-age, e.g. "720h". */
    cacheMaxAge: string;
    /** Owner of the files as seen through the mount (--uid/--gid). Default 0 / 0. */
    uid?: number;
    gid?: number;
    /** --umask. Default "002" (group-writable, for a shared group). */
    umask?: string;
  };
  /** Daily copy of a bucket into the Drive; omit to disable. */
  dataSync?: {
    source: string;
    destination: string;
    /** "HH:MM" or OnCalendar. Default "04:00". */
    schedule: string;
    /** rclone --bwlimit value (bytes/s units: "20M" = 20 MiB/s). */
    bandwidthLimit: string;
    /** "copy" (never deletes at the destination, default) or "sync" (makes the destination identical). */
    mode?: "copy" | "sync";
  };
  alerts: Omit<AlertParams, "mountpoint" | "driveMountpoint" | "quotaWarnPercent" | "gpu">;
  /**
   * GPU hosts: the GPU ledger job (host-scripts/gpu-ledger.sh), its rules and the idle notices (omit: no GPUs).
   * `schedule` default "minutely"; `maxGapSeconds` (a longer pause between runs counts as this long) default 180.
   */
  gpuLedger?: GpuAlertParams & { schedule?: string; maxGapSeconds?: number };
  /**
   * GPU hosts: the GPU watchdog (host-scripts/gpu-watchdog.sh) and its alert. `workspaces`: every user with GPUs,
   * their workspace container and how many GPUs the config gives it; `schedule` default "minutely".
   */
  gpuWatchdog?: { workspaces: Array<{ user: string; container: string; gpus: number }>; schedule?: string };
  /**
   * The weekly digest to the admin chat: `schedule` (OnCalendar, default "Mon *-*-* 09:00:00"); `prometheusUrl`
   * (default "": the prometheus container's address on its Docker network).
   */
  digest?: { schedule?: string; prometheusUrl?: string };
  /** node-exporter textfile collector directory. Default /var/lib/prometheus/node-exporter. */
  textfileDir: string;
  /** Per-user usage directories relative to the mountpoint, "{user}" replaced. Default homes, workspaces, docker-volumes. */
  usageDirs?: string[];
  /** How often the usage/health collector runs (OnCalendar). Default "*:0/15". */
  usageSchedule?: string;
  /** When the drift check runs each installed host step's `check` ("HH:MM" daily or OnCalendar). Default "05:30". */
  driftSchedule?: string;
  /** Root-only secret files' contents (the program passes secret values; files are written 0600). */
  secrets: { resticPassword: string; rcloneConfig: string };
  /**
   * Self-service restore from restic (host-scripts/restore-broker.sh, run every minute): `spool` (default
   * RESTORE_SPOOL), `maxGb` (largest restore, default 100), `timeoutSeconds` (per request, default 7200).
   */
  restore?: { spool?: string; maxGb?: number; timeoutSeconds?: number };
  /** Where job scripts are installed. Default /usr/local/lib/train-server/ops. */
  scriptDir?: string;
  /** Where ops.env, btrbk.conf and the secret files go. Default /etc/train-server/ops. */
  configDir?: string;
  /** Prometheus rule file path. Default /etc/train-server/prometheus/rules/train-server-ops.rules.yml. */
  rulesPath?: string;
  /** alertmanager.yml path. Default /etc/train-server/alertmanager/alertmanager.yml. */
  alertmanagerPath?: string;
  /** Owner of alertmanager.yml (it holds the bot token; 0640). Default "root:65534" (the image's nobody group). */
  alertmanagerOwner?: string;
  /** Where the systemd units go. Default /etc/systemd/system. */
  unitDir?: string;
  /** State directory of the jobs (last backup id, ...). Default /var/lib/train-server/ops. */
  stateDir?: string;
}

export interface HostFile {
  content: string;
  /** Octal mode, e.g. "0644". */
  mode: string;
  /** "user:group" (names or numbers). */
  owner: string;
  /** True when the content holds a secret (the program must wrap it in pulumi.secret and not log it). */
  secret?: boolean;
}

/** The job scripts (file names under host-scripts/) installed on the host and run by the timers. */
/** Host directories the Prometheus and Alertmanager containers mount read-only (see components/services.ts). */
export const HOST_RULES_DIR = "/etc/train-server/prometheus/rules";
export const HOST_ALERTMANAGER_DIR = "/etc/train-server/alertmanager";
/** Where ops.env, btrbk.conf and the jobs' secret files go (OpsParams.configDir's default). */
export const OPS_CONFIG_DIR = "/etc/train-server/ops";

export const OPS_JOB_SCRIPTS = [
  "lib.sh",
  "ops-lib.sh",
  "snapshot.sh",
  "backup.sh",
  "verify-restore.sh",
  "scrub.sh",
  "usage-collector.sh",
  "data-sync.sh",
  "gpu-ledger.sh",
  "gpu-watchdog.sh",
  "weekly-digest.sh",
  "weekly-digest.jq",
  "drift-check.sh",
  "restic-admin.sh",
  "restore-broker.sh",
] as const;
export type OpsScripts = Record<(typeof OPS_JOB_SCRIPTS)[number], string>;

/** Read the job scripts from host-scripts/ (the only impure function here). */
export function loadOpsScripts(dir = path.resolve(__dirname, "..", "..", "host-scripts")): OpsScripts {
  const out = {} as OpsScripts;
  for (const name of OPS_JOB_SCRIPTS) out[name] = fs.readFileSync(path.join(dir, name), "utf8");
  return out;
}

/**
 * Size of the rclone VFS cache when `drive.cacheSizeGb` is "auto": 20 % of the array's usable space, rounded
 * down, at least 1 GB (10 000 GB usable -> 2000 GB, the reference's figure for 5 x 1000 GB quotas). It depends on
 * the disks only: a user added or removed never changes the mount unit, so the Drive is never remounted under
 * the other users' workspaces.
 */
export function driveCacheSizeGb(args: { arrayUsableGb: number }): number {
  return Math.max(1, Math.floor(args.arrayUsableGb * 0.2));
}

/** Mbit/s -> restic --limit-upload (KiB/s): 100 Mbit/s = 12 500 000 B/s = 12207 KiB/s (rounded down). */
export function mbitToKiBps(mbit: number): number {
  return Math.floor((mbit * 1_000_000) / 8 / 1024);
}

/** Mbit/s -> rclone --bwlimit (its units are bytes/s; "k" = KiB/s): 100 Mbit/s -> "12207k". */
export function mbitToRcloneBwlimit(mbit: number): string {
  return `${mbitToKiBps(mbit)}k`;
}

/** "HH:MM" -> "*-*-* HH:MM:00"; anything else is taken as an OnCalendar expression already. */
export function toOnCalendar(schedule: string): string {
  const m = /^(\d{1,2}):(\d{2})$/.exec(schedule.trim());
  if (!m) return schedule.trim();
  const h = Number(m[1]);
  const min = Number(m[2]);
  if (h > 23 || min > 59) throw new Error(`schedule "${schedule}": not a time of day`);
  return `*-*-* ${String(h).padStart(2, "0")}:${m[2]}:00`;
}

/** btrbk keeps "N hours/days/weeks back" PLUS the current one, so keeping exactly N of a class means N-1 back. */
export function btrbkPreserve(s: { hourly: number; daily: number; weekly: number }): string {
  for (const [k, v] of Object.entries({ hourly: s.hourly, daily: s.daily, weekly: s.weekly })) {
    if (!Number.isInteger(v) || v < 1) throw new Error(`snapshots.${k} must be an integer >= 1 (got ${v})`);
  }
  return `${s.hourly - 1}h ${s.daily - 1}d ${s.weekly - 1}w`;
}

const SAFE_REL = /^[A-Za-z0-9._-]+(\/[A-Za-z0-9._*-]+)*$/;
const SAFE_ABS = /^\/[A-Za-z0-9._\/-]*$/;
const SAFE_WORD = /^[A-Za-z0-9._:\/@%+=,-]*$/;
const URL_RE = /^https?:\/\/[A-Za-z0-9.-]+(:\d+)?(\/[A-Za-z0-9._\/-]*)?$/;

function check(re: RegExp, what: string, v: string, emptyOk = false): string {
  if (emptyOk && v === "") return v;
  if (!re.test(v) || v.includes("..")) throw new Error(`${what}: unsafe value ${JSON.stringify(v)}`);
  return v;
}

const PER_USER = /\/\{user\}$/;

/** The snapshot groups: "homes/*" -> {group: "homes", subvolume: "homes/*"}; "homes/{user}" -> the same, per user. */
export function snapshotGroups(sources: string[]): Array<{ group: string; subvolume: string; dir: string; perUser: boolean }> {
  const seen = new Set<string>();
  return sources.map((s) => {
    const perUser = PER_USER.test(s);
    check(SAFE_REL, "snapshots.sources", s.replace(PER_USER, "/*"));
    const group = s.replace(PER_USER, "").replace(/\/\*$/, "").replace(/\*/g, "").replace(/\//g, "-");
    if (!group || seen.has(group)) throw new Error(`snapshots.sources: "${s}" is empty or duplicates another group`);
    if (s.includes("*") && !/\/\*$/.test(s)) throw new Error(`snapshots.sources: "*" only as the last part ("${s}")`);
    seen.add(group);
    return { group, subvolume: s, dir: `.snapshots/${group}`, perUser };
  });
}

/** Where btrbk puts one user's home snapshots, relative to the mountpoint (the "homes/{user}" source). */
export const HOME_SNAPSHOTS_DIR = ".snapshots/homes";
/** A user's home snapshots on the host: <mountpoint>/.snapshots/homes/<user>/<user>.<YYYYMMDDThhmm> (read-only). */
export function homeSnapshotDir(mountpoint: string, user: string): string {
  return `${mountpoint}/${HOME_SNAPSHOTS_DIR}/${user}`;
}
/**
 * The self-service restore's spool: <spool>/<user>/requests (the user writes a request), <spool>/<user>/results (the
 * broker answers); bind-mounted into that user's workspace only (components/render/workspace-image.ts).
 */
export const RESTORE_SPOOL = "/var/lib/train-server/restore";

function positiveInt(what: string, v: number): number {
  if (!Number.isInteger(v) || v < 1) throw new Error(`${what} must be a whole number >= 1 (got ${v})`);
  return v;
}

function usersByUid(p: OpsParams): OpsUser[] {
  for (const u of p.users) check(/^[a-z_][a-z0-9_-]*$/, "users.name", u.name);
  return [...p.users].sort((a, b) => a.uid - b.uid);
}

function archiveKeepYears(y: number): number {
  if (!Number.isInteger(y) || y < 0 || y > 100) throw new Error(`backup.archiveKeepYears must be 0 (forever) or 1..100 years (got ${y})`);
  return y;
}

function hourOfDay(h: number): number {
  if (!Number.isInteger(h) || h < 0 || h > 23) throw new Error(`snapshots.dailyHour must be 0..23 (got ${h})`);
  return h;
}

/** btrbk.conf: read-only snapshots of every source, kept exactly hourly/daily/weekly (see btrbkPreserve). */
export function renderBtrbkConf(p: OpsParams): string {
  const s = p.snapshots;
  const lines = [
    "# Rendered by train-server (components/render/ops.ts). Snapshots only, no send/receive targets.",
    "timestamp_format        long",
    "snapshot_create         always",
    "snapshot_preserve_min   latest",
    `snapshot_preserve       ${btrbkPreserve(s)}`,
    `preserve_hour_of_day    ${hourOfDay(s.dailyHour)}`,
    `preserve_day_of_week    ${s.weeklyDay}`,
    "lockfile                /run/lock/train-server-btrbk.lock",
    "",
    `volume ${check(SAFE_ABS, "mountpoint", p.mountpoint)}`,
  ];
  for (const g of snapshotGroups(s.sources)) {
    if (!g.perUser) lines.push(`  subvolume ${g.subvolume}`, `    snapshot_dir ${g.dir}`);
    else for (const u of usersByUid(p)) lines.push(`  subvolume ${g.subvolume.replace(PER_USER, `/${u.name}`)}`, `    snapshot_dir ${g.dir}/${u.name}`);
  }
  return lines.join("\n") + "\n";
}

function defaults(p: OpsParams) {
  return {
    scriptDir: p.scriptDir ?? "/usr/local/lib/train-server/ops",
    configDir: p.configDir ?? OPS_CONFIG_DIR,
    unitDir: p.unitDir ?? "/etc/systemd/system",
    stateDir: p.stateDir ?? "/var/lib/train-server/ops",
    rulesPath: p.rulesPath ?? `${HOST_RULES_DIR}/train-server-ops.rules.yml`,
    alertmanagerPath: p.alertmanagerPath ?? `${HOST_ALERTMANAGER_DIR}/alertmanager.yml`,
    usageDirs: p.usageDirs ?? ["homes/{user}", "workspaces/{user}", "docker-volumes/{user}"],
  };
}

/**
 * ops.env: every TS_* variable the jobs read (KEY=value lines, systemd EnvironmentFile syntax, values quoted).
 * Variables per script are listed in the header of each script.
 */
export function renderOpsEnv(p: OpsParams): string {
  const d = defaults(p);
  const groups = snapshotGroups(p.snapshots.sources);
  for (const u of p.users) {
    check(/^[a-z_][a-z0-9_-]*$/, "users.name", u.name);
    if (!(u.quotaGb > 0)) throw new Error(`user ${u.name}: quotaGb must be > 0`);
  }
  for (const dir of d.usageDirs) check(/^[A-Za-z0-9._{}\/-]+$/, "usageDirs", dir);
  const env: Record<string, string> = {
    TS_MOUNTPOINT: check(SAFE_ABS, "mountpoint", p.mountpoint),
    TS_TEXTFILE_DIR: check(SAFE_ABS, "textfileDir", p.textfileDir),
    TS_STATE_DIR: check(SAFE_ABS, "stateDir", d.stateDir),
    TS_BTRBK_CONF: `${d.configDir}/btrbk.conf`,
    // backup.sh expands these itself: every home, removed users' too
    TS_SNAPSHOT_SOURCES: groups.map((g) => g.subvolume.replace(PER_USER, "/*")).join(" "),
    TS_RESTIC_REPOSITORY: check(SAFE_WORD, "backup.repository", p.backup.repository),
    TS_RESTIC_PASSWORD_FILE: `${d.configDir}/restic-password`,
    TS_RCLONE_CONFIG: `${d.configDir}/rclone.conf`,
    TS_BACKUP_LIMIT_UPLOAD_KIB: String(mbitToKiBps(p.backup.uploadLimitMbit)),
    TS_BACKUP_KEEP_DAILY: String(p.backup.keepDaily),
    TS_BACKUP_KEEP_WEEKLY: String(p.backup.keepWeekly),
    TS_BACKUP_ARCHIVE_KEEP_YEARS: String(archiveKeepYears(p.backup.archiveKeepYears ?? 0)),
    TS_VERIFY_SAMPLE_FILES: String(p.backup.verifySampleFiles ?? 50),
    TS_VERIFY_READ_DATA_SUBSET: check(/^[0-9.]+%?$|^\d+\/\d+$|^\d+[kKmMgGtT]?$/, "verifyReadDataSubset", p.backup.verifyReadDataSubset ?? "5%"),
    TS_USERS: p.users.map((u) => `${u.name}:${Math.round(u.quotaGb * 1024 ** 3)}`).join(" "),
    TS_USAGE_DIRS: d.usageDirs.join(" "),
    TS_DRIVE_MOUNTPOINT: check(SAFE_ABS, "drive.mountpoint", p.drive.mountpoint),
    TS_QUOTA_WARN_PERCENT: String(p.quotaWarnPercent),
    TS_RESTORE_SPOOL: check(SAFE_ABS, "restore.spool", p.restore?.spool ?? RESTORE_SPOOL),
    TS_RESTORE_USERS: usersByUid(p).map((u) => `${u.name}:${u.uid}`).join(" "),
    TS_RESTORE_MAX_MB: String(positiveInt("restore.maxGb", p.restore?.maxGb ?? 100) * 1024),
    TS_RESTORE_TIMEOUT_S: String(positiveInt("restore.timeoutSeconds", p.restore?.timeoutSeconds ?? 7200)),
    TS_TELEGRAM_CHAT_ID: check(/^-?\d+$/, "alerts.telegramChatId", String(p.alerts.telegramChatId)),
    TS_TELEGRAM_API_URL: check(URL_RE, "alerts.telegramApiUrl", p.alerts.telegramApiUrl ?? "https://api.telegram.org"),
    TS_TELEGRAM_BOT_TOKEN_FILE: `${d.configDir}/telegram-bot-token`,
    TS_PROMETHEUS_URL: check(URL_RE, "digest.prometheusUrl", p.digest?.prometheusUrl ?? "", true),
  };
  if (p.gpuLedger) {
    env.TS_GPU_USERS = gpuUsersEnv(p.users);
    const gap = p.gpuLedger.maxGapSeconds ?? 180;
    if (!Number.isInteger(gap) || gap < 1) throw new Error(`gpuLedger.maxGapSeconds must be a positive integer (got ${gap})`);
    env.TS_GPU_LEDGER_MAX_GAP = String(gap);
  }
  if (p.gpuWatchdog) env.TS_GPU_WORKSPACES = gpuWorkspacesEnv(p.gpuWatchdog.workspaces);
  if (p.dataSync) {
    env.TS_SYNC_SOURCE = check(SAFE_WORD, "dataSync.source", p.dataSync.source);
    env.TS_SYNC_DESTINATION = check(SAFE_WORD, "dataSync.destination", p.dataSync.destination);
    env.TS_SYNC_BWLIMIT = check(/^(\d+(\.\d+)?[bBkKMGTP]?|off)$/, "dataSync.bandwidthLimit", p.dataSync.bandwidthLimit);
    env.TS_SYNC_MODE = p.dataSync.mode ?? "copy";
  }
  const body = Object.entries(env).map(([k, v]) => `${k}="${v}"`);
  return ["# Rendered by train-server (components/render/ops.ts): inputs of the ops jobs. No secrets here.", ...body].join("\n") + "\n";
}

/** TS_GPU_WORKSPACES of gpu-watchdog.sh: "user:container:count ..." (users without GPUs are left out). */
export function gpuWorkspacesEnv(workspaces: Array<{ user: string; container: string; gpus: number }>): string {
  return workspaces
    .filter((w) => w.gpus > 0)
    .map((w) => {
      check(/^[a-z_][a-z0-9_-]*$/, "gpuWatchdog.user", w.user);
      check(/^[A-Za-z0-9][A-Za-z0-9_.-]*$/, "gpuWatchdog.container", w.container);
      if (!Number.isInteger(w.gpus)) throw new Error(`gpuWatchdog: ${w.user} has a GPU count ${w.gpus} that is not an integer`);
      return `${w.user}:${w.container}:${w.gpus}`;
    })
    .join(" ");
}

interface UnitSpec {
  description: string;
  execStart: string;
  /** Extra [Unit] lines. */
  unit?: string[];
  /** Extra [Service] lines. */
  service?: string[];
}

/** A oneshot job service. */
export function renderJobService(s: UnitSpec, envFile: string): string {
  return [
    "[Unit]",
    `Description=${s.description}`,
    ...(s.unit ?? []),
    "",
    "[Service]",
    "Type=oneshot",
    `EnvironmentFile=${envFile}`,
    `ExecStart=${s.execStart}`,
    "Nice=10",
    "IOSchedulingClass=idle",
    "PrivateTmp=yes",
    ...(s.service ?? []),
    "",
  ].join("\n");
}

export function renderTimer(description: string, onCalendar: string, randomizedDelaySec = 0): string {
  return [
    "[Unit]",
    `Description=${description}`,
    "",
    "[Timer]",
    `OnCalendar=${onCalendar}`,
    "Persistent=true",
    ...(randomizedDelaySec ? [`RandomizedDelaySec=${randomizedDelaySec}`] : []),
    "",
    "[Install]",
    "WantedBy=timers.target",
    "",
  ].join("\n");
}

/** The rclone mount of the Drive (VFS cache on the array). */
export function renderDriveMountUnit(p: OpsParams): string {
  const d = defaults(p);
  const dr = p.drive;
  const args = [
    "/usr/bin/rclone mount",
    check(SAFE_WORD, "drive.rcloneRemote", dr.rcloneRemote),
    check(SAFE_ABS, "drive.mountpoint", dr.mountpoint),
    `--config ${d.configDir}/rclone.conf`,
    "--vfs-cache-mode full",
    `--cache-dir ${check(SAFE_ABS, "drive.cacheDir", dr.cacheDir)}`,
    `--vfs-cache-max-size ${Math.floor(dr.cacheSizeGb)}G`,
    `--vfs-cache-max-age ${check(/^\d+(ms|s|m|h|d|w)$/, "drive.cacheMaxAge", dr.cacheMaxAge)}`,
    "--allow-other",
    `--uid ${dr.uid ?? 0}`,
    `--gid ${dr.gid ?? 0}`,
    `--umask ${check(/^0?[0-7]{3}$/, "drive.umask", dr.umask ?? "002")}`,
    "--dir-cache-time 5m",
    "--poll-interval 1m",
  ];
  return [
    "[Unit]",
    "Description=train-server: Google Drive mounted by rclone (VFS cache on the array)",
    "Wants=network-online.target",
    "After=network-online.target",
    `RequiresMountsFor=${p.mountpoint} ${dr.cacheDir}`,
    "",
    "[Service]",
    "Type=notify",
    `ExecStartPre=/bin/mkdir -p ${dr.mountpoint} ${dr.cacheDir}`,
    `ExecStart=${args.join(" \\\n    ")}`,
    `ExecStop=/bin/fusermount3 -uz ${dr.mountpoint}`,
    "Restart=on-failure",
    "RestartSec=30",
    "",
    "[Install]",
    "WantedBy=multi-user.target",
    "",
  ].join("\n");
}

/** Unit names of the jobs (service + timer each), the drive mount service. */
export const OPS_UNITS = {
  snapshot: "ts-snapshot",
  backup: "ts-backup",
  verify: "ts-verify-restore",
  scrub: "ts-scrub",
  usage: "ts-usage-collector",
  dataSync: "ts-data-sync",
  gpuLedger: "ts-gpu-ledger",
  gpuWatchdog: "ts-gpu-watchdog",
  digest: "ts-weekly-digest",
  drift: "ts-drift-check",
  restore: "ts-restore",
  drive: "ts-drive-mount.service",
} as const;

/**
 * Every host file of the Operations area, keyed by absolute host path. `scripts` = loadOpsScripts().
 * Throws on invalid parameters (before anything reaches the host).
 */
export function renderOperations(p: OpsParams, scripts: OpsScripts): Record<string, HostFile> {
  const d = defaults(p);
  const env = `${d.configDir}/ops.env`;
  const files: Record<string, HostFile> = {};
  const put = (file: string, content: string, mode = "0644", owner = "root:root", secret = false) => {
    files[file] = secret ? { content, mode, owner, secret } : { content, mode, owner };
  };
  const job = (name: string, script: string, desc: string, onCalendar: string, extra: Partial<UnitSpec> = {}, delay = 0) => {
    put(`${d.unitDir}/${name}.service`, renderJobService({ description: `train-server: ${desc}`, execStart: `${d.scriptDir}/${script} apply`, ...extra }, env));
    put(`${d.unitDir}/${name}.timer`, renderTimer(`train-server: ${desc} (schedule)`, onCalendar, delay));
  };
  const onArray = { unit: [`RequiresMountsFor=${p.mountpoint}`] };

  for (const name of OPS_JOB_SCRIPTS) put(`${d.scriptDir}/${name}`, scripts[name], name.endsWith(".sh") && !name.endsWith("lib.sh") ? "0755" : "0644");
  put(env, renderOpsEnv(p), "0644");
  put(`${d.configDir}/btrbk.conf`, renderBtrbkConf(p));
  put(`${d.configDir}/restic-password`, p.secrets.resticPassword, "0600", "root:root", true);
  put(`${d.configDir}/rclone.conf`, p.secrets.rcloneConfig, "0600", "root:root", true);
  // the digest's copy of the bot token (alertmanager.yml holds the other: Alertmanager 0.25 has no bot_token_file)
  put(`${d.configDir}/telegram-bot-token`, p.alerts.telegramBotToken, "0600", "root:root", true);

  job(OPS_UNITS.snapshot, "snapshot.sh", "btrfs snapshots (btrbk)", "hourly", onArray);
  job(OPS_UNITS.backup, "backup.sh", "restic backup to Google Drive", toOnCalendar(p.backup.schedule), {
    unit: [...onArray.unit, "Wants=network-online.target", "After=network-online.target"],
    service: ["TimeoutStartSec=20h"],
  });
  job(OPS_UNITS.verify, "verify-restore.sh", "restic restore verification", toOnCalendar(p.backup.verifySchedule), {
    unit: [...onArray.unit, "After=network-online.target", `After=${OPS_UNITS.backup}.service`],
  });
  job(OPS_UNITS.scrub, "scrub.sh", "btrfs scrub", toOnCalendar(p.backup.scrubSchedule), onArray);
  job(OPS_UNITS.usage, "usage-collector.sh", "per-user usage and btrfs health metrics", p.usageSchedule ?? "*:0/15", onArray);
  if (p.dataSync) {
    job(OPS_UNITS.dataSync, "data-sync.sh", "bucket to Drive data sync", toOnCalendar(p.dataSync.schedule), {
      unit: ["Wants=network-online.target", "After=network-online.target"],
    });
  }
  if (p.gpuLedger) job(OPS_UNITS.gpuLedger, "gpu-ledger.sh", "per-user GPU ledger (who uses which GPU)", p.gpuLedger.schedule ?? "minutely");
  if (p.gpuWatchdog) job(OPS_UNITS.gpuWatchdog, "gpu-watchdog.sh", "GPU watchdog (each workspace still reaches its GPUs)", p.gpuWatchdog.schedule ?? "minutely", {
    unit: ["After=docker.service"],
    service: ["TimeoutStartSec=5min"],
  });
  job(OPS_UNITS.digest, "weekly-digest.sh", "weekly Telegram digest", p.digest?.schedule ?? "Mon *-*-* 09:00:00", {
    unit: ["Wants=network-online.target", "After=network-online.target"],
  });
  // every installed host step's own `check`, daily: what differs from the declared state becomes train_server_drift
  job(OPS_UNITS.drift, "drift-check.sh", "drift check of the host steps (check mode, changes nothing)", toOnCalendar(p.driftSchedule ?? "05:30"), {
    service: ["TimeoutStartSec=2h"],
  });
  // users' restore requests from restic, every minute (a constant unit: adding a user changes only ops.env)
  job(OPS_UNITS.restore, "restore-broker.sh", "self-service restore requests (restic)", "minutely", {
    unit: [...onArray.unit, "After=network-online.target"],
    service: ["TimeoutStartSec=3h"],
  });
  put(`${d.unitDir}/${OPS_UNITS.drive}`, renderDriveMountUnit(p));

  const alertParams: AlertParams = {
    ...p.alerts,
    mountpoint: p.mountpoint,
    driveMountpoint: p.drive.mountpoint,
    quotaWarnPercent: p.quotaWarnPercent,
    dataSyncEnabled: p.dataSync !== undefined,
    gpuWatchdog: p.gpuWatchdog !== undefined,
    ...(p.gpuLedger ? { gpu: { idleHours: p.gpuLedger.idleHours, workingHours: p.gpuLedger.workingHours, userChats: p.gpuLedger.userChats } } : {}),
  };
  put(d.rulesPath, renderAlertRules(alertParams));
  put(d.alertmanagerPath, renderAlertmanagerConfig(alertParams), "0640", p.alertmanagerOwner ?? "root:65534", true);
  return files;
}

/** Timers ops-install.sh enables (and the mount service), in the order it starts them. */
export function opsEnabledUnits(p: Pick<OpsParams, "dataSync" | "gpuLedger" | "gpuWatchdog">): string[] {
  const timers: string[] = [OPS_UNITS.snapshot, OPS_UNITS.backup, OPS_UNITS.verify, OPS_UNITS.scrub, OPS_UNITS.usage, OPS_UNITS.drift, OPS_UNITS.restore];
  if (p.dataSync) timers.push(OPS_UNITS.dataSync);
  if (p.gpuLedger) timers.push(OPS_UNITS.gpuLedger);
  if (p.gpuWatchdog) timers.push(OPS_UNITS.gpuWatchdog);
  timers.push(OPS_UNITS.digest);
  return [OPS_UNITS.drive, ...timers.map((t) => `${t}.timer`)];
}

/**
 * The files map as the $TS_FILES_DIR of ops-install.sh: one file per entry (names f001...) plus `manifest`, one
 * line per file: `<name> <mode> <owner> <absolute path>`, and `units` (what to enable).
 */
export function opsFilesDir(files: Record<string, HostFile>, enabledUnits: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  const manifest: string[] = [];
  Object.keys(files)
    .sort()
    .forEach((file, i) => {
      const f = files[file];
      check(SAFE_ABS, "host path", file);
      check(/^0?[0-7]{3,4}$/, "mode", f.mode);
      check(/^[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+$/, "owner", f.owner);
      const name = `f${String(i + 1).padStart(3, "0")}`;
      out[name] = f.content;
      manifest.push(`${name} ${f.mode} ${f.owner} ${file}`);
    });
  out.manifest = manifest.join("\n") + "\n";
  out.units = enabledUnits.join("\n") + "\n";
  return out;
}
