/**
 * Operations: snapshots (btrbk), restic backups to the Drive with monthly restore verification, monthly scrub,
 * the Drive mount, the GCS → Drive data sync, the per-user usage collector, on GPU hosts the per-user GPU ledger and
 * its idle notices, the weekly digest, Prometheus alert rules and alertmanager.yml — all rendered by
 * components/render/ops.ts and installed by host-scripts/ops-install.sh.
 *
 * The restic password is generated here (a secret, exported so the admin can keep it offline). The step
 * carries secret files (restic password, rclone config, alertmanager.yml with the bot token), so its whole
 * bundle is a secret and its output logging is off.
 */
import * as pulumi from "@pulumi/pulumi";
import * as random from "@pulumi/random";
import { SHARED_GID } from "./baseline";
import type { Profile, ServerConfig, ServerSecrets, Weekday } from "./config";
import { Host, HostScript, StepValue } from "./host";
import { workspaceContainer } from "./routes";
import { driveCacheSizeGb, HOST_ALERTMANAGER_DIR, HOST_RULES_DIR, loadOpsScripts, opsEnabledUnits, opsFilesDir, OpsParams, renderOperations } from "./render/ops";

/** Containers (components/services.ts) that reload on SIGHUP when their files under these host dirs change. */
export const RELOAD_ON_CHANGE: Array<{ prefix: string; container: string }> = [
  { prefix: `${HOST_RULES_DIR}/`, container: "prometheus" },
  { prefix: `${HOST_ALERTMANAGER_DIR}/`, container: "alertmanager" },
];

export const TEXTFILE_DIR = "/var/lib/prometheus/node-exporter";

/** Share of raw capacity a BTRFS data profile gives as usable space, over `n` devices. */
export function profileEfficiency(profile: Profile, n: number): number {
  switch (profile) {
    case "single":
    case "raid0":
      return 1;
    case "dup":
    case "raid1":
    case "raid10":
      return 0.5;
    case "raid1c3":
      return 1 / 3;
    case "raid1c4":
      return 1 / 4;
    case "raid5":
      return (n - 1) / n;
    case "raid6":
      return (n - 2) / n;
  }
}

/** Usable GB of the array from the device sizes storage.sh reports (`device_bytes`, space-separated). */
export function arrayUsableGb(config: ServerConfig, deviceBytes: string): number {
  const sizes = deviceBytes.split(/\s+/).filter(Boolean).map(Number);
  const raw = sizes.reduce((a, b) => a + b, 0);
  return Math.floor((raw * profileEfficiency(config.storage.dataProfile, sizes.length)) / 2 ** 30);
}

/** OnCalendar of a weekly job: ("monday", "09:00") -> "Mon *-*-* 09:00:00". */
export function weeklyOnCalendar(day: Weekday, at: string): string {
  return `${day[0].toUpperCase()}${day.slice(1, 3)} *-*-* ${at}:00`;
}

/** The GPU ledger's part of the Operations parameters (undefined on a host without GPUs). */
export function gpuLedgerParams(config: ServerConfig): OpsParams["gpuLedger"] {
  if (config.host.gpu.count === 0) return undefined;
  const a = config.alerts;
  return {
    idleHours: a.gpuIdleHours,
    workingHours: { days: [...a.workingHours.days], start: a.workingHours.start, end: a.workingHours.end },
    userChats: [...config.users]
      .sort((x, y) => x.uid - y.uid)
      .filter((u) => u.telegramChatId !== undefined)
      .map((u) => ({ user: u.name, chatId: Number(u.telegramChatId) })),
  };
}

/** The GPU watchdog's workspaces: every user with GPUs, their container, how many GPUs ("all" = the host's). */
export function gpuWatchdogParams(config: ServerConfig): NonNullable<OpsParams["gpuWatchdog"]> {
  return {
    workspaces: [...config.users]
      .sort((x, y) => x.uid - y.uid)
      .map((u) => ({ user: u.name, container: workspaceContainer(u), gpus: u.gpus === "all" ? config.host.gpu.count : u.gpus.length }))
      .filter((w) => w.gpus > 0),
  };
}

/** The Operations renderer's parameters from a config (pure; secrets and cache size passed in). */
export function opsParams(config: ServerConfig, cacheSizeGb: number, secrets: { resticPassword: string; rcloneConfig: string; telegramBotToken: string }): OpsParams {
  const mp = config.storage.mountpoint;
  const b = config.backup;
  const day = (d: number) => String(d).padStart(2, "0");
  return {
    mountpoint: mp,
    users: [...config.users].sort((a, b) => a.uid - b.uid).map((u) => ({ name: u.name, uid: u.uid, quotaGb: u.quotaGb, gpus: u.gpus })),
    quotaWarnPercent: config.resources.quotaWarnPercent,
    snapshots: {
      hourly: config.snapshots.hourly,
      daily: config.snapshots.daily,
      weekly: config.snapshots.weekly,
      dailyHour: config.snapshots.dailyHour,
      weeklyDay: config.snapshots.weeklyDay,
      // each user's home snapshots in a directory of their own (their workspace shows them at /snapshots)
      sources: ["homes/{user}", "docker-volumes/*"],
    },
    backup: {
      repository: b.repository,
      schedule: b.schedule,
      uploadLimitMbit: b.uploadLimitMbit,
      keepDaily: b.keepDaily,
      keepWeekly: b.keepWeekly,
      archiveKeepYears: b.archiveKeepYears === "forever" ? 0 : b.archiveKeepYears,
      verifySchedule: `*-*-${day(b.verifyDay)} ${b.verifyAt}:00`,
      scrubSchedule: `*-*-${day(b.scrubDay)} ${b.scrubAt}:00`,
    },
    drive: {
      rcloneRemote: `${config.drive.remote}:`,
      mountpoint: `${mp}/shared`,
      cacheDir: `${mp}/cache/gdrive`,
      cacheSizeGb,
      cacheMaxAge: config.drive.cacheMaxAge,
      uid: 0,
      gid: SHARED_GID,
      umask: "002",
    },
    ...(config.dataSync?.enabled
      ? { dataSync: { source: config.dataSync.source, destination: config.dataSync.destination, schedule: config.dataSync.schedule, bandwidthLimit: config.dataSync.bandwidthLimit } }
      : {}),
    alerts: {
      gpuTempC: config.alerts.gpuTempC,
      fsUsedPercent: config.alerts.fsUsedPercent,
      backupMaxAgeHours: config.alerts.backupMaxAgeHours,
      telegramChatId: Number(config.alerts.telegramChatId),
      telegramBotToken: secrets.telegramBotToken,
    },
    ...(config.host.gpu.count > 0 ? { gpuLedger: gpuLedgerParams(config), gpuWatchdog: gpuWatchdogParams(config) } : {}),
    digest: { schedule: weeklyOnCalendar(config.alerts.digestDay, config.alerts.digestAt) },
    textfileDir: TEXTFILE_DIR,
    secrets: { resticPassword: secrets.resticPassword, rcloneConfig: secrets.rcloneConfig },
  };
}

type OpsSecrets = { resticPassword: string; rcloneConfig: string; telegramBotToken: string };
const PLACEHOLDER_A: OpsSecrets = { resticPassword: "-", rcloneConfig: "-", telegramBotToken: "0:layout" };
const PLACEHOLDER_B: OpsSecrets = { resticPassword: "+", rcloneConfig: "+", telegramBotToken: "1:other" };

/** The ops step's files directory (`f001`…, manifest, units) for a config, secrets and cache size (pure). */
function renderOpsDir(config: ServerConfig, scripts: ReturnType<typeof loadOpsScripts>, units: string[], sec: OpsSecrets, cacheGb: number): Record<string, string> {
  return opsFilesDir(renderOperations(opsParams(config, cacheGb, sec), scripts), units);
}

/**
 * Which of the ops step's files depend on what (pure): `plain` (neither secrets nor the cache size: shown as text
 * in `pulumi preview --diff`), `cache` (the Drive cache size, known only once the array reports its size; not
 * secret) or `secret` (embeds a secret: the restic password, the rclone config, the bot token). Found by rendering
 * with two sets of placeholder secrets and two cache sizes: a file that differs embeds that input.
 */
export function opsFileSecrecy(
  config: ServerConfig,
  scripts: ReturnType<typeof loadOpsScripts>,
  units: string[],
): { kind: Record<string, "plain" | "cache" | "secret">; plain: Record<string, string> } {
  const r = (sec: OpsSecrets, gb: number) => renderOpsDir(config, scripts, units, sec, gb);
  const a = r(PLACEHOLDER_A, 1);
  const b = r(PLACEHOLDER_B, 1);
  const c = r(PLACEHOLDER_A, 2);
  return { kind: Object.fromEntries(Object.keys(a).map((k) => [k, a[k] !== b[k] ? "secret" : a[k] !== c[k] ? "cache" : "plain"])), plain: a };
}

export interface OperationsArgs {
  config: ServerConfig;
  host: Host;
  secrets: ServerSecrets;
  /** `device_bytes` reported by storage.sh (sizes the Drive cache when drive.cacheSizeGb is "auto"). */
  deviceBytes: pulumi.Output<string>;
  after?: pulumi.Resource[];
}

export class Operations extends pulumi.ComponentResource {
  /** The restic repository password (a secret): keep a copy offline, the backups are useless without it. */
  readonly resticPassword: pulumi.Output<string>;
  readonly driveCacheSizeGb: pulumi.Output<number>;
  /** The install step (later steps that need the Drive mounted depend on it). */
  readonly ready: pulumi.Resource;

  constructor(name: string, args: OperationsArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:operations:Operations", name, {}, opts);
    const { config, secrets } = args;
    const restic = new random.RandomPassword(`${name}-restic-password`, { length: 40, special: false }, { parent: this, protect: !config.rig });
    this.resticPassword = pulumi.secret(restic.result);

    const cfgCache = config.drive.cacheSizeGb;
    this.driveCacheSizeGb =
      cfgCache === "auto"
        ? args.deviceBytes.apply((bytes) => driveCacheSizeGb({ arrayUsableGb: arrayUsableGb(config, bytes) }))
        : pulumi.output(cfgCache);

    const scripts = loadOpsScripts();
    // on GPU hosts the ledger's and the watchdog's timers too (the same condition as opsParams renders them)
    const gpu = config.host.gpu.count > 0 ? { gpuLedger: gpuLedgerParams(config), gpuWatchdog: gpuWatchdogParams(config) } : {};
    const units = opsEnabledUnits({ ...(config.dataSync?.enabled ? { dataSync: config.dataSync } : {}), ...gpu });
    const { kind, plain } = opsFileSecrecy(config, scripts, units);
    const renderWith = (sec: OpsSecrets, cacheGb: number) => renderOpsDir(config, scripts, units, sec, cacheGb);
    // what a review sees: plain files as text in `pulumi preview --diff`; the cache size (known at apply) only in
    // the files it shapes; real secrets only inside the files that embed one, and those files stay secret
    const real = pulumi
      .all([this.resticPassword, secrets.rcloneConfig, secrets.telegramBotToken, this.driveCacheSizeGb])
      .apply(([resticPassword, rcloneConfig, telegramBotToken, cacheGb]) => renderWith({ resticPassword, rcloneConfig, telegramBotToken }, cacheGb));
    const byCache = this.driveCacheSizeGb.apply((gb) => renderWith(PLACEHOLDER_A, gb));
    const files: Record<string, StepValue> = Object.fromEntries(
      Object.entries(kind).map(([k, how]) => [k, how === "plain" ? plain[k] : how === "cache" ? byCache.apply((r) => r[k]) : pulumi.secret(real.apply((r) => r[k]))]),
    );

    const env = { TS_RELOAD: RELOAD_ON_CHANGE.map((r) => `${r.prefix} ${r.container}`).join("\n") };
    const step = new HostScript(name, { host: args.host, script: "ops-install", env, files, teardown: true, after: args.after ?? [] }, { parent: this });
    this.ready = step.apply;
    this.registerOutputs({ driveCacheSizeGb: this.driveCacheSizeGb });
  }
}
