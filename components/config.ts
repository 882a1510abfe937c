/**
 * The whole train-server configuration: one zod schema with every default in one place, cross-field checks
 * that report ALL problems at once (each naming its path and the fix), and the loader that reads it from
 * Pulumi stack config. Components receive the typed, validated `ServerConfig` and never read
 * `pulumi.Config` themselves.
 *
 * Stack config keys (namespace `train-server:`), each a structured value (`pulumi config set --path`):
 *   rig, host, storage, resources, users, domain, hostnames, cloudflare, backup, snapshots, alerts, drive,
 *   dataSync, workspace
 * Secrets (set with `pulumi config set --secret`), read only through `requireSecret`:
 *   sshPrivateKey, telegramBotToken, googleClientSecret, rcloneConfig
 */
import * as pulumi from "@pulumi/pulumi";
import { z } from "zod";

export const CONFIG_NAMESPACE = "train-server";

/** BTRFS block-group profiles. */
export const PROFILES = ["single", "dup", "raid0", "raid1", "raid1c3", "raid1c4", "raid10", "raid5", "raid6"] as const;
export type Profile = (typeof PROFILES)[number];

/**
 * Minimum number of devices per profile, from the mkfs.btrfs(8) PROFILES table (btrfs-progs 6.x) and its notes:
 * raid1 2, raid1c3 3, raid1c4 4, single/dup 1; raid0 and raid10 list 1 and 2 only for kernels >= 5.15 as
 * degenerate layouts without striping (note 5), so we require the classic 2 and 4; raid5 with 2 devices and raid6
 * with 3 are "not recommended" (notes 2 and 3: they degrade to mirrors with parity overhead), so 3 and 4.
 */
export const MIN_DEVICES: Record<Profile, number> = {
  single: 1,
  dup: 1,
  raid0: 2,
  raid1: 2,
  raid1c3: 3,
  raid1c4: 4,
  raid10: 4,
  raid5: 3,
  raid6: 4,
};

/** Bcache cache modes. `none` means no cache device at all. */
export const CACHE_MODES = ["none", "writeback", "writethrough"] as const;

/** Names that must never be a train-server user: system accounts, groups we manage, service names. */
export const RESERVED_USERNAMES = new Set([
  "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy", "www-data",
  "backup", "list", "irc", "gnats", "nobody", "nogroup", "systemd-network", "systemd-resolve", "systemd-timesync",
  "messagebus", "syslog", "sshd", "_apt", "ubuntu", "adm", "sudo", "wheel", "docker", "mlusers",
  "prometheus", "grafana", "traefik", "netdata", "cloudflared", "restic", "rclone", "shared", "workspace",
]);

/** Directories the array must never be mounted over. */
const SYSTEM_DIRS = new Set(["/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var"]);

/** Service route labels (first DNS label under `domain`) and their defaults. */
export const SERVICE_NAMES = [
  "traefik", "netdata", "prometheus", "grafana", "tensorboard", "filebrowser", "dozzle", "portainer",
] as const;
export type ServiceName = (typeof SERVICE_NAMES)[number];

const POSIX_USERNAME = /^[a-z_][a-z0-9_-]{0,30}$/;
const DNS_LABEL = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;
const DOMAIN = /^(?=.{1,253}$)((?!-)[a-z0-9-]{1,63}(?<!-)\.)+[a-z]{2,63}$/;
const EMAIL = /^[^\s@]+@[a-z0-9.-]+\.[a-z]{2,63}$/i;
const IPV4 = /^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$/;
/** An IPv4 CIDR: four octets 0-255 and a prefix 0-32 (host bits are checked in crossCheck). */
const CIDR_SHAPE = /^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\/(3[0-2]|[12]?\d)$/;
const HHMM = /^([01]\d|2[0-3]):[0-5]\d$/;
const CHAT_ID = /^-?\d+$/;

/** Days of the week, as the schedules name them. */
export const WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"] as const;
export type Weekday = (typeof WEEKDAYS)[number];
const CF_ID = /^[0-9a-f]{32}$/;
const DEVICE = /^\/dev\/[A-Za-z0-9._/-]+$/;
const SSH_KEY = /^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( .*)?$/;
const RCLONE_PATH = /^[A-Za-z0-9_-]+:.*$/;
const CPUSET = /^\d+(-\d+)?(,\d+(-\d+)?)*$/;
const RATE = /^\d+(\.\d+)?[KMG]?$/;

const gb = (what: string) => z.number({ error: `${what} must be a number of GB` }).int().positive();

const gpuSelection = z.union([z.literal("all"), z.literal("none"), z.array(z.number().int().nonnegative()).min(1)]);

const hostSchema = z
  .object({
    /** Address the program's SSH connection uses (LAN IP, DNS name, or a tunnel endpoint). */
    address: z.string().min(1),
    /**
     * The server's SSH host public key (`ssh-ed25519 AAAA...`). Every remote command and the Docker provider's ssh
     * verify it before anything is sent. Required unless `rig: true` (see `parseHostKey`).
     */
    hostKey: z.string().optional(),
    /** Admin account that runs host scripts with passwordless sudo (or root). */
    sshUser: z.string().regex(POSIX_USERNAME, "must be a POSIX user name (lowercase letters, digits, _ and -)"),
    sshPort: z.number().int().min(1).max(65535).default(22),
    /** The server's address on the office LAN: users' SSH/desktop ports bind here, local DNS points here. */
    lanAddress: z.string().regex(IPV4, "must be an IPv4 address like 192.168.1.50"),
    /** The office LAN (CIDR); the firewall opens SSH and desktop ports only to it. */
    lanCidr: z.string().regex(/^\d+\.\d+\.\d+\.\d+\/\d{1,2}$/, "must be a CIDR like 192.168.1.0/24"),
    /**
     * Office machines (IPv4 CIDRs inside lanCidr, e.g. "192.168.1.10/32") that may open the admin routes (Traefik,
     * Netdata, Prometheus, Grafana, Portainer, Dozzle) directly on the LAN. Default []: admin routes are served
     * through the tunnel only (Cloudflare Access); the LAN gets team and user routes.
     */
    adminSources: z.array(z.string().regex(CIDR_SHAPE, 'must be an IPv4 CIDR like "192.168.1.10/32"')).default([]),
    cpuCores: z.number().int().positive(),
    ramGb: z.number().int().positive(),
    /** RAM kept for the host OS and the shared services; user guarantees must fit in the rest. */
    reservedRamGb: z.number().int().nonnegative().default(16),
    gpu: z
      .object({ count: z.number().int().nonnegative().default(0), model: z.string().default("") })
      .strict()
      .prefault({}),
  })
  .strict();

const storageSchema = z
  .object({
    /** The HDDs of the array (whole devices; stable /dev/disk/by-id paths are best). */
    devices: z.array(z.string().regex(DEVICE, "must be a device path under /dev/")).min(1),
    dataProfile: z.enum(PROFILES),
    /** Defaults to a sensible profile for the data profile (see `defaultMetadataProfile`). */
    metadataProfile: z.enum(PROFILES).optional(),
    /** Optional bcache: an NVMe partition caching every HDD. */
    cache: z
      .object({
        device: z.string().regex(DEVICE, "must be a device path under /dev/ (an NVMe partition)"),
        mode: z.enum(CACHE_MODES).default("writeback"),
      })
      .strict()
      .optional(),
    mountpoint: z.string().regex(/^\/[A-Za-z0-9._/-]*[^/]$/, "must be an absolute path without a trailing /").default("/mnt/storage"),
    label: z.string().regex(/^[A-Za-z0-9_-]{1,64}$/, "must be 1-64 letters, digits, _ or -").default("train-storage"),
    mountOptions: z.string().regex(/^[a-z0-9_=:,.-]+$/, "must be a comma-separated mount option list").default("noatime,compress=zstd:3,space_cache=v2"),
    /** Convert an adopted array whose profiles differ (btrfs balance). Off: such a change is refused. */
    convertProfile: z.boolean().default(false),
  })
  .strict();

const resourcesSchema = z
  .object({
    memoryGuaranteeGb: gb("memoryGuaranteeGb").default(32),
    memoryLimitGb: gb("memoryLimitGb").default(100),
    swapGb: z.number().int().nonnegative().default(50),
    shmSizeGb: gb("shmSizeGb").default(16),
    quotaGb: gb("quotaGb").default(1000),
    quotaWarnPercent: z.number().int().min(1).max(99).default(80),
    gpus: gpuSelection.default("all"),
  })
  .strict();

const userSchema = z
  .object({
    name: z.string(),
    /** Stable UID (1000..59999). It fixes the user's slot: SSH port 2222+(uid-1000), desktop 4000+(uid-1000). */
    uid: z.number().int(),
    sshKeys: z.array(z.string()).min(1, "needs at least one SSH public key (logins are key-only)"),
    /** The Google Workspace address Cloudflare Access admits for this user's routes. */
    email: z.string().regex(EMAIL, "must be an e-mail address"),
    admin: z.boolean().default(false),
    memoryGuaranteeGb: gb("memoryGuaranteeGb").optional(),
    memoryLimitGb: gb("memoryLimitGb").optional(),
    swapGb: z.number().int().nonnegative().optional(),
    shmSizeGb: gb("shmSizeGb").optional(),
    /** CPU count limit (docker --cpus). */
    cpus: z.number().positive().optional(),
    /** Pinned CPUs, e.g. "0-7" or "0-3,16-19". Users' cpusets may not overlap. */
    cpuset: z.string().regex(CPUSET, 'must be a cpuset like "0-7" or "0-3,16-19"').optional(),
    gpus: gpuSelection.optional(),
    quotaGb: gb("quotaGb").optional(),
    /** The user's own Telegram chat with the alert bot: idle-GPU notices go there too (the admin chat always gets them). */
    telegramChatId: z.string().regex(CHAT_ID, "must be a numeric Telegram chat id (the user's chat with the bot)").optional(),
  })
  .strict();

const hostnamesSchema = z
  .object({
    traefik: z.string().default("traefik"),
    netdata: z.string().default("health"),
    prometheus: z.string().default("prometheus"),
    grafana: z.string().default("grafana"),
    tensorboard: z.string().default("tensorboard"),
    filebrowser: z.string().default("files"),
    dozzle: z.string().default("logs"),
    portainer: z.string().default("portainer"),
  })
  .strict();

const cloudflareSchema = z
  .object({
    accountId: z.string().regex(CF_ID, "must be the 32-hex-digit Cloudflare account id"),
    zoneId: z.string().regex(CF_ID, "must be the 32-hex-digit Cloudflare zone id of the domain"),
    /** OAuth client id of the Google Workspace identity provider (its secret is `googleClientSecret`). */
    googleClientId: z.string().min(1),
    /** Google Workspace domains whose members may reach team routes. */
    allowedDomains: z.array(z.string().regex(DOMAIN, "must be a domain like example.com")).default([]),
    /** Extra individual addresses admitted to team routes. */
    allowedEmails: z.array(z.string().regex(EMAIL, "must be an e-mail address")).default([]),
    requireMfa: z.boolean().default(true),
    sessionDuration: z
      .string()
      .regex(/^\d+(m|h)$/, 'must be a duration like "24h" or "30m"')
      .refine((d) => (d.endsWith("h") ? Number(d.slice(0, -1)) * 60 : Number(d.slice(0, -1))) <= 720 * 60, "must be at most 720h (Cloudflare's maximum session with MFA)")
      .default("24h"),
    tunnelName: z.string().regex(/^[A-Za-z0-9_-]{1,64}$/).default("train-server"),
    /**
     * Optional SSH route for hosted CI runners (the PR preview): `<hostname>.<domain>` → the host's sshd through
     * the tunnel, behind an Access application that admits only a service token this program creates.
     */
    ciSsh: z
      .object({
        hostname: z.string().default("ssh"),
        /** Lifetime of the service token (Cloudflare durations in hours, e.g. "8760h" = one year). */
        tokenDuration: z.string().regex(/^[1-9]\d*h$/, 'must be a duration in hours like "8760h"').default("8760h"),
      })
      .strict()
      .optional(),
  })
  .strict();

const backupSchema = z
  .object({
    /** restic repository, normally on the Drive remote through rclone. */
    repository: z.string().regex(/^(rclone:[A-Za-z0-9_-]+:|\/|sftp:|s3:|b2:|gs:|rest:)/, 'must be a restic repository like "rclone:gdrive:train-server/restic"').default("rclone:gdrive:train-server/restic"),
    schedule: z.string().regex(HHMM, 'must be a time like "06:00"').default("06:00"),
    uploadLimitMbit: z.number().positive().default(100),
    keepDaily: z.number().int().positive().default(7),
    keepWeekly: z.number().int().positive().default(52),
    /** Monthly restore verification: day of month and time. */
    verifyDay: z.number().int().min(1).max(28).default(1),
    verifyAt: z.string().regex(HHMM, 'must be a time like "08:00"').default("08:00"),
    /** Monthly BTRFS scrub: day of month and time. */
    scrubDay: z.number().int().min(1).max(28).default(15),
    scrubAt: z.string().regex(HHMM, 'must be a time like "03:00"').default("03:00"),
  })
  .strict();

const snapshotsSchema = z
  .object({
    hourly: z.number().int().min(1).default(24),
    daily: z.number().int().min(1).default(7),
    weekly: z.number().int().min(1).default(4),
    /** Hour (0-23) from which the day's first hourly snapshot is kept as that day's daily snapshot. */
    dailyHour: z.number().int().min(0).max(23).default(2),
    /** Day whose daily snapshot is kept as the weekly one. */
    weeklyDay: z.enum(WEEKDAYS).default("sunday"),
  })
  .strict();

const alertsSchema = z
  .object({
    /** Telegram chat id (negative for groups). The bot token is the secret `telegramBotToken`. */
    telegramChatId: z.string().regex(CHAT_ID, "must be a numeric Telegram chat id (negative for groups)"),
    gpuTempC: z.number().int().min(40).max(110).default(80),
    fsUsedPercent: z.number().int().min(50).max(99).default(90),
    backupMaxAgeHours: z.number().int().min(1).default(26),
    /**
     * A user whose pinned GPUs (an index list in users[i].gpus) have been idle this many working hours in a row gets a
     * Telegram notice, the admin a summary. Nothing is ever stopped. The count restarts each working day.
     */
    gpuIdleHours: z.number({ error: "must be a number of hours" }).positive().max(24).default(4),
    /** When idle pinned GPUs count, in the server's local time. */
    workingHours: z
      .object({
        days: z.array(z.enum(WEEKDAYS)).min(1, "needs at least one day").default(["monday", "tuesday", "wednesday", "thursday", "friday"]),
        start: z.string().regex(HHMM, 'must be a time like "09:00"').default("09:00"),
        end: z.string().regex(HHMM, 'must be a time like "18:00"').default("18:00"),
      })
      .strict()
      .prefault({}),
    /** The weekly Telegram digest (GPU hours, idle reservations, quotas, backups): day and time. */
    digestDay: z.enum(WEEKDAYS).default("monday"),
    digestAt: z.string().regex(HHMM, 'must be a time like "09:00"').default("09:00"),
  })
  .strict();

const driveSchema = z
  .object({
    /** rclone remote (defined in the secret `rcloneConfig`) of the Google Workspace shared drive. */
    remote: z.string().regex(/^[A-Za-z0-9_-]+$/, "must be an rclone remote name").default("gdrive"),
    /**
     * VFS cache size: "auto" = 20 % of the array's usable space (see `driveCacheSizeGb`): a function of the disks
     * only, so adding or removing a user never changes (and never remounts) the Drive under everyone's workspace.
     */
    cacheSizeGb: z.union([z.literal("auto"), z.number().int().positive()]).default("auto"),
    cacheMaxAge: z.string().regex(/^\d+[smhd]$/, 'must be a duration like "720h"').default("720h"),
    /** Removed: the cache size no longer depends on the users' quotas. Kept only to say so clearly. */
    snapshotReservePercent: z.unknown().optional(),
  })
  .strict();

const dataSyncSchema = z
  .object({
    enabled: z.boolean().default(true),
    /** rclone source, e.g. "gcs:my-bucket/datasets". */
    source: z.string().regex(RCLONE_PATH, 'must be an rclone path like "gcs:bucket/path"'),
    /** rclone destination, e.g. "gdrive:datasets". */
    destination: z.string().regex(RCLONE_PATH, 'must be an rclone path like "gdrive:datasets"'),
    schedule: z.string().regex(HHMM, 'must be a time like "04:00"').default("04:00"),
    bandwidthLimit: z.string().regex(RATE, 'must be an rclone rate like "20M"').default("20M"),
  })
  .strict();

const workspaceSchema = z
  .object({
    /** Base image of the workspace image (a CUDA runtime with cuDNN). */
    baseImage: z.string().min(1).default("nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04"),
  })
  .strict();

/** The raw stack config, parsed field by field. */
export const rawConfigSchema = z
  .object({
    /** A throwaway test rig: storage is not protected and may be wiped; `pulumi destroy` leaves the target bare. */
    rig: z.boolean().default(false),
    host: hostSchema,
    storage: storageSchema,
    resources: resourcesSchema.prefault({}),
    users: z.array(userSchema).default([]),
    domain: z.string().regex(DOMAIN, "must be a lowercase domain like example.com"),
    hostnames: hostnamesSchema.prefault({}),
    cloudflare: cloudflareSchema,
    backup: backupSchema.prefault({}),
    snapshots: snapshotsSchema.prefault({}),
    alerts: alertsSchema,
    drive: driveSchema.prefault({}),
    dataSync: dataSyncSchema.optional(),
    workspace: workspaceSchema.prefault({}),
  })
  .strict();

export type RawConfig = z.output<typeof rawConfigSchema>;
export type GpuSelection = z.output<typeof gpuSelection>;

/** One user with every default applied and the slot-derived identity filled in. */
export interface UserConfig {
  name: string;
  uid: number;
  /** uid - 1000: the stable slot behind ports (never list order). */
  slot: number;
  sshKeys: string[];
  email: string;
  admin: boolean;
  memoryGuaranteeGb: number;
  memoryLimitGb: number;
  swapGb: number;
  shmSizeGb: number;
  cpus?: number;
  cpuset?: string;
  /** Resolved: "all", or GPU indexes, or [] for none. */
  gpus: "all" | number[];
  quotaGb: number;
  sshPort: number;
  desktopPort: number;
  /** The user's Telegram chat with the alert bot (idle-GPU notices), when set. */
  telegramChatId?: string;
}

/** The validated, defaulted, frozen configuration of one server. */
export interface ServerConfig extends Omit<RawConfig, "users" | "storage" | "drive"> {
  drive: Omit<RawConfig["drive"], "snapshotReservePercent">;
  storage: RawConfig["storage"] & { metadataProfile: Profile };
  users: UserConfig[];
}

/** Secrets of one server, only ever as Pulumi secret outputs. */
export interface ServerSecrets {
  sshPrivateKey: pulumi.Output<string>;
  telegramBotToken: pulumi.Output<string>;
  googleClientSecret: pulumi.Output<string>;
  /** rclone.conf content with the Drive (and GCS) remotes. */
  rcloneConfig: pulumi.Output<string>;
}
export const SECRET_KEYS = ["sshPrivateKey", "telegramBotToken", "googleClientSecret", "rcloneConfig"] as const;

export const UID_MIN = 1000;
/** Highest uid; with it the highest port is 4000 + 58999 = 62999, so slot ports always fit. */
export const UID_MAX = 59999;
export const SSH_PORT_BASE = 2222;
export const DESKTOP_PORT_BASE = 4000;

/** One problem found in the configuration. */
export interface ConfigIssue {
  path: string;
  message: string;
}

export class ConfigError extends Error {
  constructor(readonly issues: ConfigIssue[]) {
    super(
      `train-server configuration has ${issues.length} problem${issues.length === 1 ? "" : "s"}:\n` +
        issues.map((i) => `  - ${i.path || "(root)"}: ${i.message}`).join("\n"),
    );
    this.name = "ConfigError";
  }
}

/** `users[2].name` from a zod path. */
export function formatPath(path: ReadonlyArray<PropertyKey>): string {
  let out = "";
  for (const p of path) {
    if (typeof p === "number") out += `[${p}]`;
    else out += out ? `.${String(p)}` : String(p);
  }
  return out;
}

/** Metadata profile to use when the stack does not name one. */
export function defaultMetadataProfile(data: Profile, deviceCount: number): Profile {
  switch (data) {
    case "raid5":
      return "raid1";
    case "raid6":
      return deviceCount >= 3 ? "raid1c3" : "raid1";
    case "single":
    case "raid0":
    case "dup":
      return deviceCount >= 2 ? "raid1" : "dup";
    default:
      return data;
  }
}

/** CPUs of a cpuset string ("0-3,8") as a sorted list; throws on a reversed range. */
export function parseCpuset(cpuset: string): number[] {
  const cpus = new Set<number>();
  for (const part of cpuset.split(",")) {
    const [a, b] = part.split("-").map(Number);
    const hi = b === undefined ? a : b;
    if (hi < a) throw new Error(`range ${part} is reversed`);
    for (let c = a; c <= hi; c++) cpus.add(c);
  }
  return [...cpus].sort((x, y) => x - y);
}

function ipToInt(ip: string): number {
  return ip.split(".").reduce((acc, o) => acc * 256 + Number(o), 0);
}

function cidrContains(cidr: string, ip: string): boolean | undefined {
  const [net, bitsS] = cidr.split("/");
  const bits = Number(bitsS);
  if (!IPV4.test(net) || bits > 32) return undefined;
  const mask = bits === 0 ? 0 : (~0 << (32 - bits)) >>> 0;
  return ((ipToInt(net) & mask) >>> 0) === ((ipToInt(ip) & mask) >>> 0);
}

function intToIp(n: number): string {
  return [24, 16, 8, 0].map((s) => (n >>> s) & 255).join(".");
}

/** Whether every address of `inner` (a valid CIDR) lies inside `outer` (a valid CIDR). */
function cidrInside(inner: string, outer: string): boolean {
  const [, innerBits] = inner.split("/");
  const [, outerBits] = outer.split("/");
  return Number(innerBits) >= Number(outerBits) && cidrContains(outer, inner.split("/")[0]) === true;
}

/** Whether `maybePart` is `disk` itself or a partition of it (/dev/sda1 of /dev/sda, /dev/nvme0n1p2 of /dev/nvme0n1). */
function sameDisk(disk: string, maybePart: string): boolean {
  if (disk === maybePart) return true;
  if (!maybePart.startsWith(disk)) return false;
  const rest = maybePart.slice(disk.length);
  return /^p?\d+$/.test(rest) || /^-part\d+$/.test(rest);
}

/** Host key types the connection accepts (ssh-rsa is refused: the Go SSH client would verify it with SHA-1). */
export const HOST_KEY_TYPES = ["ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"] as const;

const HOST_KEY_HOWTO = (h: { address: string; sshPort: number }) =>
  `Get it with \`ssh-keyscan -t ed25519 -p ${h.sshPort} ${h.address}\` and check it against \`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub\` ` +
  `run on the server's console; then set host.hostKey to "ssh-ed25519 AAAA..." (the line without the leading host name)`;

/** What is wrong with a host key line, or undefined when it is `<type> <base64 key>` of an accepted type. */
export function hostKeyProblem(line: string): string | undefined {
  const parts = line.trim().split(/\s+/);
  if (parts.length >= 3 && !parts[0].includes("-") && (HOST_KEY_TYPES as readonly string[]).includes(parts[1]))
    return `starts with the host name "${parts[0]}" (ssh-keyscan's format); drop it and keep "${parts[1]} ${parts[2].slice(0, 12)}..."`;
  const [type, b64] = parts;
  if (type === "ssh-rsa") return "is an RSA key, which the program's SSH client would verify with SHA-1 (refused by current OpenSSH); use the server's ed25519 key";
  if (!(HOST_KEY_TYPES as readonly string[]).includes(type)) return `"${type.slice(0, 40)}" is not a host key type (${HOST_KEY_TYPES.join(", ")})`;
  if (!b64 || !/^[A-Za-z0-9+/]+={0,3}$/.test(b64)) return "has no base64 key after the type";
  // the key blob starts with its own type name (uint32 length + name): a truncated or pasted-wrong key fails here
  const blob = Buffer.from(b64, "base64");
  const n = blob.length >= 4 ? blob.readUInt32BE(0) : -1;
  if (n <= 0 || blob.length < 4 + n || blob.subarray(4, 4 + n).toString("latin1") !== type)
    return `the base64 part is not a ${type} key (truncated or mis-pasted?)`;
  if (type === "ssh-ed25519" && blob.length !== 4 + n + 4 + 32) return "the ed25519 key is not 32 bytes long (truncated?)";
  return undefined;
}

/** The host key as the connection takes it: `<type> <base64>` (comment dropped). */
export function normalizeHostKey(line: string): string {
  const [type, b64] = line.trim().split(/\s+/);
  return `${type} ${b64}`;
}

/** Cross-field checks over a schema-valid raw config. Pushes every problem found. */
function crossCheck(c: RawConfig, issues: ConfigIssue[]): void {
  const add = (path: string, message: string) => issues.push({ path, message });
  const d = c.resources;

  // --- storage ---
  const devs = c.storage.devices;
  const seenDev = new Map<string, number>();
  devs.forEach((dev, i) => {
    const prev = seenDev.get(dev);
    if (prev !== undefined) add(`storage.devices[${i}]`, `duplicates storage.devices[${prev}] (${dev}); list each disk once`);
    else seenDev.set(dev, i);
    devs.forEach((other, j) => {
      if (j !== i && other !== dev && sameDisk(other, dev))
        add(`storage.devices[${i}]`, `${dev} is a partition of storage.devices[${j}] (${other}); give whole disks only`);
    });
  });
  const metadata = c.storage.metadataProfile ?? defaultMetadataProfile(c.storage.dataProfile, devs.length);
  for (const [field, profile] of [["dataProfile", c.storage.dataProfile], ["metadataProfile", metadata]] as const) {
    const min = MIN_DEVICES[profile];
    if (devs.length < min)
      add(`storage.${field}`, `${profile} needs at least ${min} devices, storage.devices has ${devs.length}; add devices or choose a profile such as ${devs.length >= 4 ? "raid10" : devs.length >= 2 ? "raid1" : "single"}`);
  }
  if (metadata === "raid5" || metadata === "raid6")
    add("storage.metadataProfile", `${metadata} is not safe for metadata (btrfs write hole); use raid1 or raid1c3 for metadata`);
  if (c.storage.dataProfile === "dup" && devs.length > 1)
    add("storage.dataProfile", "dup keeps both copies on one device; with several devices use raid1");
  if (c.storage.cache) {
    const cdev = c.storage.cache.device;
    devs.forEach((dev, i) => {
      if (sameDisk(dev, cdev) || sameDisk(cdev, dev))
        add("storage.cache.device", `${cdev} is storage.devices[${i}] (${dev}) or on it; the cache must be a separate NVMe/SSD partition`);
    });
    if (c.storage.cache.mode === "none")
      add("storage.cache.mode", 'is "none" but storage.cache.device is set; remove storage.cache or choose writeback/writethrough');
  }
  if (SYSTEM_DIRS.has(c.storage.mountpoint))
    add("storage.mountpoint", `${c.storage.mountpoint} is a system directory; use a dedicated path such as /mnt/storage`);

  // --- host ---
  if (c.host.hostKey === undefined) {
    if (!c.rig) add("host.hostKey", `is required: the SSH connection carries every secret, so it must verify the server. ${HOST_KEY_HOWTO(c.host)}`);
  } else {
    const problem = hostKeyProblem(c.host.hostKey);
    if (problem) add("host.hostKey", `${problem}. ${HOST_KEY_HOWTO(c.host)}`);
  }
  const lan = cidrContains(c.host.lanCidr, c.host.lanAddress);
  if (lan === undefined) add("host.lanCidr", `${c.host.lanCidr} is not a valid IPv4 CIDR`);
  else if (!lan) add("host.lanAddress", `${c.host.lanAddress} is not inside host.lanCidr ${c.host.lanCidr}; fix one of them`);
  const seenSource = new Map<string, number>();
  c.host.adminSources.forEach((src, i) => {
    const p = `host.adminSources[${i}]`;
    const [net, bits] = src.split("/");
    const mask = Number(bits) === 0 ? 0 : (~0 << (32 - Number(bits))) >>> 0;
    const base = (ipToInt(net) & mask) >>> 0;
    if (base !== ipToInt(net))
      add(p, `${src} has host bits set; write the network ${intToIp(base)}/${bits}, or ${net}/32 for one machine`);
    else if (lan !== undefined && !cidrInside(src, c.host.lanCidr))
      add(p, `${src} is not inside host.lanCidr ${c.host.lanCidr}; admin sources are office machines as the server sees them`);
    if (seenSource.has(src)) add(p, `duplicates host.adminSources[${seenSource.get(src)}] (${src})`);
    else seenSource.set(src, i);
  });
  if (c.host.reservedRamGb >= c.host.ramGb)
    add("host.reservedRamGb", `${c.host.reservedRamGb} GB reserved leaves nothing of host.ramGb ${c.host.ramGb} GB for users`);

  // --- users ---
  const names = new Map<string, number>();
  const uids = new Map<number, number>();
  const emails = new Map<string, number>();
  const ports = new Map<number, string>([
    [c.host.sshPort, "host.sshPort"],
    [80, "Traefik HTTP (80)"],
    [443, "HTTPS (443)"],
  ]);
  const cpuOwners = new Map<number, number>();
  let guaranteeSum = 0;
  if (c.users.length > 0 && !c.users.some((u) => u.admin))
    add("users", "no user has admin: true; mark at least one admin (admins reach the infrastructure routes)");
  c.users.forEach((u, i) => {
    const p = `users[${i}]`;
    if (POSIX_USERNAME.test(u.name) && u.name.includes("_"))
      add(`${p}.name`, `"${u.name}" contains "_", which is not allowed in its route hostnames (${u.name}-code.${c.domain}); use - instead`);
    if (!POSIX_USERNAME.test(u.name))
      add(`${p}.name`, `"${u.name}" is not a POSIX user name; use lowercase letters, digits, _ and - (max 31, not starting with a digit or -)`);
    else if (RESERVED_USERNAMES.has(u.name)) add(`${p}.name`, `"${u.name}" is reserved (system account or service name); pick another name`);
    else if (u.name === c.host.sshUser) add(`${p}.name`, `"${u.name}" is host.sshUser, the admin account the program uses; pick another name`);
    if (names.has(u.name)) add(`${p}.name`, `duplicates users[${names.get(u.name)}].name "${u.name}"`);
    else names.set(u.name, i);
    if (u.uid < UID_MIN || u.uid > UID_MAX) add(`${p}.uid`, `${u.uid} is outside ${UID_MIN}..${UID_MAX}; pick a free uid in that range and never change it`);
    if (uids.has(u.uid)) add(`${p}.uid`, `duplicates users[${uids.get(u.uid)}].uid ${u.uid}; every user needs their own stable uid`);
    else uids.set(u.uid, i);
    const email = u.email.toLowerCase();
    if (emails.has(email)) add(`${p}.email`, `duplicates users[${emails.get(email)}].email ${u.email}`);
    else emails.set(email, i);
    const domainOk = c.cloudflare.allowedDomains.some((dom) => email.endsWith(`@${dom}`));
    const listed = c.cloudflare.allowedEmails.some((e) => e.toLowerCase() === email);
    if (!domainOk && !listed)
      add(`${p}.email`, `${u.email} is neither in cloudflare.allowedDomains nor cloudflare.allowedEmails, so Access would never admit this user; add the domain or address`);
    u.sshKeys.forEach((k, j) => {
      if (!SSH_KEY.test(k.trim())) add(`${p}.sshKeys[${j}]`, "is not an OpenSSH public key line (e.g. \"ssh-ed25519 AAAA... alice@laptop\")");
      else if (/^ssh-rsa /.test(k.trim()) && k.trim().split(" ")[1].length < 370) add(`${p}.sshKeys[${j}]`, "is an RSA key shorter than 2048 bits; use ed25519");
    });
    const slot = u.uid - UID_MIN;
    for (const [what, port] of [["SSH", SSH_PORT_BASE + slot], ["desktop", DESKTOP_PORT_BASE + slot]] as const) {
      if (u.uid < UID_MIN || u.uid > UID_MAX) break;
      const other = ports.get(port);
      if (other) add(`${p}.uid`, `uid ${u.uid} gives ${what} port ${port}, already used by ${other}; pick another uid`);
      else ports.set(port, `${p} ${what}`);
    }
    const guarantee = u.memoryGuaranteeGb ?? d.memoryGuaranteeGb;
    const limit = u.memoryLimitGb ?? d.memoryLimitGb;
    guaranteeSum += guarantee;
    if (guarantee > limit)
      add(`${p}.memoryGuaranteeGb`, `guarantee ${guarantee} GB exceeds the limit ${limit} GB; lower the guarantee or raise memoryLimitGb`);
    if (limit > c.host.ramGb) add(`${p}.memoryLimitGb`, `${limit} GB exceeds host.ramGb ${c.host.ramGb} GB`);
    if (u.cpus !== undefined && u.cpus > c.host.cpuCores) add(`${p}.cpus`, `${u.cpus} exceeds host.cpuCores ${c.host.cpuCores}`);
    if (u.cpuset !== undefined) {
      let cpus: number[] = [];
      try {
        cpus = parseCpuset(u.cpuset);
      } catch (e) {
        add(`${p}.cpuset`, `"${u.cpuset}": ${(e as Error).message}; write ranges low-high`);
      }
      const out = cpus.filter((cpu) => cpu >= c.host.cpuCores);
      if (out.length) add(`${p}.cpuset`, `CPU ${out[0]} is out of range: host.cpuCores is ${c.host.cpuCores} (CPUs 0-${c.host.cpuCores - 1})`);
      for (const cpu of cpus) {
        const owner = cpuOwners.get(cpu);
        if (owner !== undefined && owner !== i) {
          add(`${p}.cpuset`, `CPU ${cpu} is also in users[${owner}].cpuset; cpusets must not overlap`);
          break;
        }
        cpuOwners.set(cpu, i);
      }
      if (u.cpus !== undefined && cpus.length && u.cpus > cpus.length)
        add(`${p}.cpus`, `${u.cpus} CPUs cannot fit in cpuset "${u.cpuset}" (${cpus.length} CPUs)`);
    }
    const g = u.gpus ?? d.gpus;
    if (Array.isArray(g)) {
      if (c.host.gpu.count === 0) add(`${p}.gpus`, "names GPUs but host.gpu.count is 0; set host.gpu.count or remove gpus");
      else {
        const bad = g.find((x) => x >= c.host.gpu.count);
        if (bad !== undefined) add(`${p}.gpus`, `GPU ${bad} does not exist: host.gpu.count is ${c.host.gpu.count} (GPUs 0-${c.host.gpu.count - 1})`);
      }
    }
  });
  const available = c.host.ramGb - c.host.reservedRamGb;
  if (guaranteeSum > available && c.host.reservedRamGb < c.host.ramGb)
    add("users", `memory guarantees sum to ${guaranteeSum} GB but only ${available} GB is available (host.ramGb ${c.host.ramGb} - host.reservedRamGb ${c.host.reservedRamGb}); lower resources.memoryGuaranteeGb or per-user guarantees`);
  if (Array.isArray(d.gpus)) {
    const bad = d.gpus.find((x) => x >= c.host.gpu.count);
    if (bad !== undefined) add("resources.gpus", `GPU ${bad} does not exist: host.gpu.count is ${c.host.gpu.count}`);
  }
  const warnGb = (d.quotaGb * d.quotaWarnPercent) / 100;
  if (warnGb < 1) add("resources.quotaWarnPercent", "the warning threshold is below 1 GB; raise quotaGb or quotaWarnPercent");

  // --- hostnames: every route's first label, unique and valid ---
  const labels = new Map<string, string>();
  for (const svc of SERVICE_NAMES) {
    const label = c.hostnames[svc];
    const path = `hostnames.${svc}`;
    if (!DNS_LABEL.test(label)) add(path, `"${label}" is not a DNS label (lowercase letters, digits and -, 1-63 chars)`);
    if (labels.has(label)) add(path, `"${label}" is also used by ${labels.get(label)}; hostnames must be unique`);
    else labels.set(label, path);
  }
  if (c.cloudflare.ciSsh) {
    const label = c.cloudflare.ciSsh.hostname;
    const path = "cloudflare.ciSsh.hostname";
    if (!DNS_LABEL.test(label)) add(path, `"${label}" is not a DNS label (lowercase letters, digits and -, 1-63 chars)`);
    if (labels.has(label)) add(path, `"${label}" is also used by ${labels.get(label)}; hostnames must be unique`);
    else labels.set(label, path);
  }
  c.users.forEach((u, i) => {
    for (const suffix of ["code", "jupyter"]) {
      const label = `${u.name}-${suffix}`;
      if (labels.has(label)) add(`users[${i}].name`, `route ${label}.${c.domain} collides with ${labels.get(label)}; rename the user or the service hostname`);
      else labels.set(label, `users[${i}]`);
      if (label.length > 63) add(`users[${i}].name`, `route label ${label} is longer than 63 characters; use a shorter name`);
    }
  });

  // --- cloudflare ---
  if (c.cloudflare.allowedDomains.length === 0 && c.cloudflare.allowedEmails.length === 0)
    add("cloudflare.allowedDomains", "nobody is admitted: set allowedDomains (your Google Workspace domain) or allowedEmails");

  // --- backups / drive ---
  if (c.drive.snapshotReservePercent !== undefined)
    add("drive.snapshotReservePercent", "was removed: the Drive cache no longer depends on the users' quotas (a user change would remount it under everyone); delete this key, and set drive.cacheSizeGb to a number to fix the size");
  if (c.backup.keepWeekly * 7 < c.backup.keepDaily)
    add("backup.keepWeekly", `keeps less history (${c.backup.keepWeekly} weeks) than keepDaily (${c.backup.keepDaily} days)`);
  if (c.backup.repository.startsWith("rclone:")) {
    const remote = c.backup.repository.split(":")[1];
    if (remote !== c.drive.remote)
      add("backup.repository", `uses rclone remote "${remote}" but drive.remote is "${c.drive.remote}"; the repository lives on the Drive remote`);
  }
  if (c.dataSync?.enabled && c.dataSync.source.split(":")[0] === c.dataSync.destination.split(":")[0] && c.dataSync.source === c.dataSync.destination)
    add("dataSync.destination", "is the same as dataSync.source");
  if (c.dataSync?.enabled && c.dataSync.schedule === c.backup.schedule)
    add("backup.schedule", `runs at the same time as dataSync.schedule (${c.backup.schedule}); both use the uplink, schedule them apart`);

  // --- GPU idle notices: the working day must hold the idle time (the count restarts each working day) ---
  const wh = c.alerts.workingHours;
  const seenDay = new Map<string, number>();
  wh.days.forEach((day, i) => {
    if (seenDay.has(day)) add(`alerts.workingHours.days[${i}]`, `duplicates alerts.workingHours.days[${seenDay.get(day)}] (${day})`);
    else seenDay.set(day, i);
  });
  const minutes = (hhmm: string) => Number(hhmm.slice(0, 2)) * 60 + Number(hhmm.slice(3));
  const dayMinutes = minutes(wh.end) - minutes(wh.start);
  if (dayMinutes <= 0)
    add("alerts.workingHours.end", `${wh.end} is not after alerts.workingHours.start ${wh.start}; working hours cannot span midnight`);
  else if (c.alerts.gpuIdleHours * 60 > dayMinutes)
    add("alerts.gpuIdleHours", `${c.alerts.gpuIdleHours} h does not fit in a working day of ${dayMinutes / 60} h (${wh.start}-${wh.end}), so no notice could ever be sent; lower it or widen alerts.workingHours`);
}

/** Apply per-user defaults and derive slot, ports, resolved GPUs. */
function resolveUser(u: RawConfig["users"][number], c: RawConfig): UserConfig {
  const d = c.resources;
  const g = u.gpus ?? d.gpus;
  const slot = u.uid - UID_MIN;
  return {
    name: u.name,
    uid: u.uid,
    slot,
    sshKeys: u.sshKeys.map((k) => k.trim()),
    email: u.email.toLowerCase(),
    admin: u.admin,
    memoryGuaranteeGb: u.memoryGuaranteeGb ?? d.memoryGuaranteeGb,
    memoryLimitGb: u.memoryLimitGb ?? d.memoryLimitGb,
    swapGb: u.swapGb ?? d.swapGb,
    shmSizeGb: u.shmSizeGb ?? d.shmSizeGb,
    ...(u.cpus !== undefined ? { cpus: u.cpus } : {}),
    ...(u.cpuset !== undefined ? { cpuset: u.cpuset } : {}),
    gpus: c.host.gpu.count === 0 || g === "none" ? [] : g,
    quotaGb: u.quotaGb ?? d.quotaGb,
    sshPort: SSH_PORT_BASE + slot,
    desktopPort: DESKTOP_PORT_BASE + slot,
    ...(u.telegramChatId !== undefined ? { telegramChatId: u.telegramChatId } : {}),
  };
}

function deepFreeze<T>(o: T): T {
  if (o && typeof o === "object") {
    Object.freeze(o);
    for (const v of Object.values(o)) deepFreeze(v);
  }
  return o;
}

/**
 * Validate a raw config object (as read from the stack). Returns the frozen ServerConfig or throws a
 * ConfigError listing every problem (schema and cross-field) with its path and fix.
 */
export function parseConfig(raw: unknown): ServerConfig {
  const parsed = rawConfigSchema.safeParse(raw);
  if (!parsed.success) {
    throw new ConfigError(
      parsed.error.issues.map((i) => ({
        path: formatPath(i.path),
        message: describeZodIssue(i),
      })),
    );
  }
  const c = parsed.data;
  const issues: ConfigIssue[] = [];
  crossCheck(c, issues);
  if (issues.length) throw new ConfigError(issues);
  const metadataProfile = c.storage.metadataProfile ?? defaultMetadataProfile(c.storage.dataProfile, c.storage.devices.length);
  const { snapshotReservePercent: _removed, ...drive } = c.drive;
  return deepFreeze({
    ...c,
    host: { ...c.host, ...(c.host.hostKey !== undefined ? { hostKey: normalizeHostKey(c.host.hostKey) } : {}) },
    drive,
    storage: { ...c.storage, metadataProfile },
    users: c.users.map((u) => resolveUser(u, c)),
  });
}

function describeZodIssue(i: z.core.$ZodIssue): string {
  switch (i.code) {
    case "unrecognized_keys":
      return `unknown key${i.keys.length > 1 ? "s" : ""} ${i.keys.map((k) => `"${k}"`).join(", ")}; check the spelling (see README, Configuration reference)`;
    case "invalid_type":
      return i.input === undefined ? `is required (expected ${i.expected})` : `${i.message}`;
    default:
      return i.message;
  }
}

/** Stack config keys the schema knows (used to read them and to report unknown ones). */
export const CONFIG_KEYS = Object.keys(rawConfigSchema.shape) as Array<keyof typeof rawConfigSchema.shape>;

/**
 * Read the raw structured config of the current stack. Values that are JSON (objects, arrays, booleans,
 * numbers) are parsed; plain strings are kept. Unknown `train-server:` keys are reported as issues.
 */
export function readStackConfig(): { raw: Record<string, unknown>; unknownKeys: string[] } {
  return splitStackConfig(pulumi.runtime.allConfig());
}

/**
 * The raw structured config in a runtime config map (`train-server:key` → string, as `pulumi.runtime.allConfig()`
 * or the offline tools' `readStackFile` give it): JSON values parsed, secrets and other namespaces left out,
 * unknown `train-server:` keys listed. Pure; `readStackConfig` and `npm run doctor` read a stack through it.
 */
export function splitStackConfig(all: Record<string, string>): { raw: Record<string, unknown>; unknownKeys: string[] } {
  const raw: Record<string, unknown> = {};
  const unknownKeys: string[] = [];
  const known = new Set<string>([...CONFIG_KEYS, ...SECRET_KEYS]);
  for (const [fullKey, value] of Object.entries(all)) {
    const [ns, key] = fullKey.split(":", 2);
    if (ns !== CONFIG_NAMESPACE || key === undefined) continue;
    if (!known.has(key)) {
      unknownKeys.push(key);
      continue;
    }
    if ((SECRET_KEYS as readonly string[]).includes(key)) continue;
    raw[key] = parseValue(value);
  }
  return { raw, unknownKeys };
}

function parseValue(value: string): unknown {
  try {
    return JSON.parse(value);
  } catch {
    return value;
  }
}

/**
 * Load and validate the current stack's configuration and its secrets. Throws one ConfigError listing
 * every problem: schema, cross-field, unknown keys and missing secrets.
 */
export function loadConfig(): { config: ServerConfig; secrets: ServerSecrets } {
  const { raw, unknownKeys } = readStackConfig();
  const issues: ConfigIssue[] = unknownKeys.map((k) => ({
    path: k,
    message: `unknown stack config key "${CONFIG_NAMESPACE}:${k}"; known keys: ${[...CONFIG_KEYS, ...SECRET_KEYS].join(", ")}`,
  }));
  const all = pulumi.runtime.allConfig();
  for (const key of SECRET_KEYS) {
    if (all[`${CONFIG_NAMESPACE}:${key}`] === undefined)
      issues.push({ path: key, message: `secret is missing; set it with: pulumi config set --secret ${key} <value>` });
  }
  let config: ServerConfig | undefined;
  try {
    config = parseConfig(raw);
  } catch (e) {
    if (e instanceof ConfigError) issues.unshift(...e.issues);
    else throw e;
  }
  if (issues.length || !config) throw new ConfigError(issues);
  const cfg = new pulumi.Config(CONFIG_NAMESPACE);
  const secrets: ServerSecrets = {
    sshPrivateKey: cfg.requireSecret("sshPrivateKey"),
    telegramBotToken: cfg.requireSecret("telegramBotToken"),
    googleClientSecret: cfg.requireSecret("googleClientSecret"),
    rcloneConfig: cfg.requireSecret("rcloneConfig"),
  };
  return { config, secrets };
}
