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
import { WORKSPACE_ROUTE_SUFFIXES } from "./routes";
import { WORKSPACE_DESKTOPS } from "./render/workspace-image";

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
  // every shared service's container: its data lives in docker-volumes/<service>, beside each user's docker-volumes/<name>
  "alertmanager", "cadvisor", "node-exporter", "dcgm-exporter", "tensorboard", "filebrowser", "dozzle", "portainer",
  "guacamole", "guacd", "guacamole-db",
  // Ubuntu groups that grant privileges to their members (a user's primary group has the user's name)
  "lxd", "disk", "kvm", "shadow", "staff", "systemd-journal", "tty", "video", "render", "input", "plugdev", "netdev",
  "operator", "utmp", "dialout", "kmem", "crontab", "_ssh", "nvidia-persistenced", "polkitd", "tss", "tcpdump",
]);

/** Ubuntu's /etc/sudoers grants sudo to the group `admin` (`%admin ALL=(ALL) ALL`): only an admin may be named so. */
export const SUDOERS_GROUP_NAMES = new Set(["admin"]);

/** Directories the array must never be mounted over. */
const SYSTEM_DIRS = new Set(["/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp", "/usr", "/var"]);
/**
 * Trees the OS (and this program) own: the array is never mounted anywhere under them. /var holds the program's own
 * state (/var/lib/train-server) and Docker's; /tmp and /run are cleaned at boot (systemd-tmpfiles would age the
 * array's files out); /etc, /usr, /boot, /proc, /sys, /dev, /run are the system itself.
 */
const SYSTEM_TREES = ["/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root", "/run", "/sbin", "/snap", "/sys", "/tmp", "/usr", "/var", "/lost+found"];

/** Filesystem labels of Ubuntu's own filesystems (cloud images, installer, Raspberry Pi/Core images). */
const OS_LABELS = new Set(["cloudimg-rootfs", "rootfs", "root", "writable", "system-boot", "boot", "uefi", "efi", "esp", "swap", "home"]);

/** Ports on the host that something other than a user's workspace already binds. */
const HOST_PORTS: Array<[number, string]> = [
  [80, "Traefik HTTP (80)"],
  [443, "HTTPS (443)"],
  [2000, "cloudflared's metrics (127.0.0.1:2000, host network)"],
];

/** Upper bounds of a real server (beyond them a value is a typo, and numbers stop being exact in the host files). */
export const LIMITS = { cpuCores: 8192, ramGb: 65536, gpus: 64, quotaGb: 1_000_000, cacheGb: 1_000_000 } as const;

/** Service route labels (first DNS label under `domain`) and their defaults. */
export const SERVICE_NAMES = [
  "traefik", "netdata", "prometheus", "grafana", "tensorboard", "filebrowser", "dozzle", "portainer", "guacamole",
] as const;
export type ServiceName = (typeof SERVICE_NAMES)[number];

const POSIX_USERNAME = /^[a-z_][a-z0-9_-]{0,30}$/;
const DNS_LABEL = /^(?!-)[a-z0-9-]{1,63}(?<!-)$/;
const DOMAIN = /^(?=.{1,253}$)((?!-)[a-z0-9-]{1,63}(?<!-)\.)+[a-z]{2,63}$/;
/** ASCII only: a homoglyph (Cyrillic а for a) or an invisible mark would be another address to Access. */
const EMAIL = /^[A-Za-z0-9._%+-]+@([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$/;
const HOSTNAME = /^(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*$/;
const IPV4 = /^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$/;
/** An IPv4 CIDR: four octets 0-255 and a prefix 0-32 (host bits are checked in crossCheck). */
const CIDR_SHAPE = /^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\/(3[0-2]|[12]?\d)$/;
const HHMM = /^([01]\d|2[0-3]):[0-5]\d$/;
const CHAT_ID = /^-?\d+$/;

/** Days of the week, as the schedules name them. */
export const WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"] as const;
export type Weekday = (typeof WEEKDAYS)[number];
const CF_ID = /^[0-9a-f]{32}$/;
/** udev's by-id/by-path names use letters, digits and # + - . : = @ _ (e.g. /dev/disk/by-path/pci-0000:00:17.0-ata-1). */
const DEVICE = /^\/dev(\/[A-Za-z0-9#+.:=@_-]+)+$/;
const SSH_KEY = /^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( .*)?$/;
const RCLONE_REMOTE = /^[A-Za-z0-9_-]+$/;
const CPU = "(0|[1-9]\\d{0,4})";
const CPUSET = new RegExp(`^${CPU}(-${CPU})?(,${CPU}(-${CPU})?)*$`);
const RATE = /^\d+(\.\d+)?[KMG]?$/;
/** A docker image reference: [registry[:port]/]path[:tag][@sha256:digest]. */
const IMAGE_REF = /^([a-zA-Z0-9][a-zA-Z0-9.-]*(:\d+)?\/)?[a-z0-9]+([._-]+[a-z0-9]+)*(\/[a-z0-9]+([._-]+[a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$/;
const GOOGLE_CLIENT_ID = /^[0-9]+-[a-z0-9]+\.apps\.googleusercontent\.com$/;

/**
 * Characters no config value may hold: C0/C1 controls (NUL, tab, line breaks), DEL, soft hyphen, bidi controls
 * (RTL/LTR marks, embeddings, isolates), zero-width characters, line/paragraph separators and the BOM. Invisible in
 * a review, they make a value differ from what it looks like (or cut a host file's line in two).
 */
const INVISIBLE = /[\u0000-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff]/;
const INVISIBLE_NAMES: Record<string, string> = {
  "\u0000": "a NUL character", "\t": "a tab", "\n": "a line break", "\r": "a carriage return", "\u200b": "a zero-width space",
  "\u200c": "a zero-width non-joiner", "\u200d": "a zero-width joiner", "\u200e": "a left-to-right mark", "\u200f": "a right-to-left mark",
  "\u202a": "a left-to-right embedding", "\u202b": "a right-to-left embedding", "\u202c": "a bidi pop", "\u202d": "a left-to-right override",
  "\u202e": "a right-to-left override", "\u2028": "a line separator", "\u2029": "a paragraph separator", "\ufeff": "a byte order mark",
};

const gb = (what: string) =>
  z.number({ error: `${what} must be a number of GB` }).int(`${what} must be a whole number of GB`).positive(`${what} must be at least 1 GB`).max(LIMITS.ramGb, `${what} must be at most ${LIMITS.ramGb} GB`);

/** A whole number in [min, max], with the bounds in the message. */
const count = (min: number, max: number, unit = "") =>
  z.number().int(`must be a whole number${unit && ` of${unit}`}`).min(min, `must be at least ${min}${unit}`).max(max, `must be at most ${max}${unit}`);

const quota = () =>
  z
    .number({ error: "quotaGb must be a number of GB" })
    .int("quotaGb must be a whole number of GB")
    .positive("quotaGb must be at least 1 GB")
    .max(LIMITS.quotaGb, `quotaGb must be at most ${LIMITS.quotaGb} GB (1 PB)`);

type Refinement = (value: string, ctx: z.RefinementCtx) => void;
/** A zod refinement from a function that names the first problem of a value (or undefined). */
const refinement = (problem: (value: string) => string | undefined): Refinement => (value, ctx) => {
  const message = problem(value);
  if (message) ctx.addIssue({ code: "custom", message });
};

/** What is wrong with a path's components: "" (from // or a trailing /), "." or "..". */
function componentProblem(parts: string[], example: string): string | undefined {
  if (parts.some((c) => c === "")) return `is not canonical (an empty component from "//" or a trailing "/"); write it as ${example}`;
  const dots = parts.find((c) => c === "." || c === "..");
  if (dots) return `must not contain a "${dots}" component (it names another place than it seems to); write the plain path, like ${example}`;
  return undefined;
}

const NOT_DISKS = /^\/dev\/(null|zero|full|u?random|tty\w*|console|ptmx|mem|kmem|port|kmsg|std(in|out|err)|fuse|kvm|loop-control|btrfs-control|bcache-ctl|nvidia\w*|(pts|shm|fd|mqueue|hugepages|input|snd|dri|char|cpu|net|vfio|mapper\/control)(\/.*)?)$/;

/** The problem of a device path in storage.devices / storage.cache.device, or undefined. */
function devicePathProblem(dev: string, what: string): string | undefined {
  if (!dev.startsWith("/dev/")) return `must be a device path under /dev/ (${what}; /dev/disk/by-id/... is best)`;
  const bad = componentProblem(dev.slice(1).split("/"), "/dev/disk/by-id/ata-...");
  if (bad) return bad;
  if (!DEVICE.test(dev)) return "may only hold letters, digits and # + - . : = @ _ between the slashes";
  const link = /^\/dev\/disk\/by-(uuid|label)\//.exec(dev);
  if (link) return `names a filesystem by its ${link[1]}, which changes when the array is made; give the disk itself (/dev/disk/by-id/...)`;
  if (NOT_DISKS.test(dev)) return `is not a disk (a character device or a pseudo-file of the kernel); give ${what} (/dev/disk/by-id/...)`;
  return undefined;
}
const devicePath = (what: string): Refinement => refinement((dev) => devicePathProblem(dev, what));

/** The problem of storage.mountpoint, or undefined: canonical, plain, and outside every system directory. */
function mountpointProblem(mp: string): string | undefined {
  if (!mp.startsWith("/")) return "must be an absolute path like /mnt/storage";
  if (mp.length > 1 && mp.endsWith("/")) return `must be an absolute path without a trailing / (write ${mp.replace(/\/+$/, "") || "/mnt/storage"})`;
  const parts = mp.slice(1).split("/");
  const bad = mp === "/" ? undefined : componentProblem(parts, "/mnt/storage");
  if (bad) return bad;
  if (!parts.every((c) => /^[A-Za-z0-9._-]+$/.test(c)) && mp !== "/") return "may only hold letters, digits, . _ and - between the slashes";
  if (mp.length > 200) return "is longer than 200 characters";
  if (SYSTEM_DIRS.has(mp)) return `${mp} is a system directory; use a dedicated path such as /mnt/storage`;
  const tree = SYSTEM_TREES.find((t) => mp.startsWith(`${t}/`));
  const why: Record<string, string> = {
    "/var": "which holds the OS's and this program's own state (/var/lib/train-server, /var/lib/docker)",
    "/tmp": "which is cleaned at boot and by systemd-tmpfiles",
    "/run": "which is a tmpfs, empty at every boot",
  };
  if (tree) return `${mp} is under ${tree}, ${why[tree] ?? "which the OS owns"}; use a dedicated path such as /mnt/storage`;
  return undefined;
}
const mountpointSyntax = refinement(mountpointProblem);

/** btrfs mount options the program accepts, with a check of the value where one is taken. */
const MOUNT_OPTIONS: Record<string, RegExp | null> = {
  noatime: null, relatime: null, strictatime: null, nodiratime: null, lazytime: null, nolazytime: null, rw: null, defaults: null,
  nosuid: null, nodev: null, acl: null, noacl: null, nofail: null, _netdev: null, autodefrag: null, noautodefrag: null,
  ssd: null, nossd: null, ssd_spread: null, nossd_spread: null, nodiscard: null, datacow: null, nodatacow: null, datasum: null,
  nodatasum: null, flushoncommit: null, noflushoncommit: null, barrier: null, treelog: null, notreelog: null, skip_balance: null,
  nospace_cache: null, enospc_debug: null, noenospc_debug: null,
  compress: /^(zlib(:[1-9])?|lzo|zstd(:([1-9]|1[0-5]))?|no)$/,
  "compress-force": /^(zlib(:[1-9])?|lzo|zstd(:([1-9]|1[0-5]))?)$/,
  space_cache: /^v[12]$/,
  discard: /^(sync|async)$/,
  commit: /^([1-9]|[1-9]\d|[1-2]\d\d|300)$/,
  max_inline: /^\d+[kKmM]?$/,
  thread_pool: /^[1-9]\d{0,3}$/,
  metadata_ratio: /^\d{1,4}$/,
  fatal_errors: /^(bug|panic)$/,
};
const MOUNT_OPTION_REFUSED: Record<string, string> = {
  subvol: "selects a subvolume; the program mounts the array's top level (the subvolumes are under it)",
  subvolid: "selects a subvolume; the program mounts the array's top level (the subvolumes are under it)",
  ro: "would mount the array read-only (nothing could be written to it)",
  degraded: "would mount the array degraded without anyone noticing a missing disk; that is an admin decision, by hand",
  device: "names member devices; the program knows them from storage.devices",
  nobarrier: "turns off write barriers: a power cut can corrupt the array",
  rescue: "is a recovery option (read-only mounts for a repair); use it by hand only",
  usebackuproot: "is a recovery option (read-only mounts for a repair); use it by hand only",
  nologreplay: "is a recovery option (read-only mounts for a repair); use it by hand only",
  norecovery: "is a recovery option (read-only mounts for a repair); use it by hand only",
  clear_cache: "rebuilds the free-space cache at every mount; use it once, by hand",
  user_subvol_rm_allowed: "lets every user delete the subvolumes they own (their home among them)",
  noexec: "would forbid running programs from the array (Docker's data root and the users' homes live on it)",
};
function mountOptionsProblem(opts: string, ctx: z.RefinementCtx): void {
  const seen = new Set<string>();
  for (const item of opts.split(",")) {
    const [name, ...rest] = item.split("=");
    const value = rest.join("=");
    let message: string | undefined;
    if (item === "") message = 'has an empty option (",," or a "," at an end)';
    else if (MOUNT_OPTION_REFUSED[name]) message = `"${item}" ${MOUNT_OPTION_REFUSED[name]}`;
    else if (!(name in MOUNT_OPTIONS) && !/^x-systemd\.[a-z-]+$/.test(name)) message = `"${name}" is not a btrfs mount option this program knows (a mount with it would fail at boot); known: ${Object.keys(MOUNT_OPTIONS).join(", ")}`;
    else if (seen.has(name)) message = `sets "${name}" twice`;
    else {
      const re = MOUNT_OPTIONS[name];
      if (re === null && rest.length) message = `"${name}" takes no value`;
      else if (re && rest.length && !re.test(value)) message = `"${item}" is not a valid value of ${name}`;
    }
    if (message) {
      ctx.addIssue({ code: "custom", message });
      return;
    }
    seen.add(name);
  }
}

/** The problem of a folder path on an rclone remote (no "//", no "." or "..", one word), or undefined. */
function remoteFolderProblem(folder: string, example: string): string | undefined {
  if (folder === "") return `names the whole remote; name a folder on it, like ${example}`;
  if (folder.startsWith("/")) return `has a "/" after the remote's ":"; write ${example}`;
  const bad = componentProblem(folder.split("/"), example);
  if (bad) return bad;
  if (/\s/.test(folder)) return "must not contain spaces (the host files take it as one word); rename the folder or use - or _";
  if (!/^[A-Za-z0-9._@%+=,\/-]+$/.test(folder)) return "may only hold letters, digits, / and . _ @ % + = , -";
  return undefined;
}

function rclonePathProblem(v: string, example: string): string | undefined {
  const m = /^([A-Za-z0-9_-]+):(.*)$/s.exec(v);
  if (!m) return `must be an rclone path like "${example}"`;
  return remoteFolderProblem(m[2], example.split(":")[1]);
}
const rclonePath = (example: string): Refinement => refinement((v) => rclonePathProblem(v, example));

/** The problem of backup.repository: rclone:<remote>:<folder>, a local path, sftp: or rest:. */
function repositoryProblem(repo: string): string | undefined {
  if (repo.startsWith("rclone:")) return rclonePathProblem(repo.slice("rclone:".length), "gdrive:train-server/restic");
  if (repo.startsWith("/")) {
    const bad = repo === "/" ? "is the root directory" : componentProblem(repo.slice(1).split("/"), "/srv/restic");
    if (bad) return bad;
    return /^(\/[A-Za-z0-9._-]+)+$/.test(repo) ? undefined : "may only hold letters, digits, . _ and - between the slashes";
  }
  const backend = /^(s3|b2|gs|azure|swift):/.exec(repo);
  if (backend)
    return `the ${backend[1]} backend needs credentials in restic's environment, which the program does not pass (only rcloneConfig reaches the host); define the bucket as an rclone remote in rcloneConfig and write rclone:<remote>:<folder>`;
  if (/^(sftp|rest):/.test(repo)) {
    if (repo.includes("..")) return 'must not contain ".."';
    return /^[A-Za-z0-9._:\/@%+=,-]+$/.test(repo) ? undefined : "may only hold letters, digits and . _ : / @ % + = , -";
  }
  return 'must be a restic repository like "rclone:gdrive:train-server/restic"';
}
const repositorySyntax = refinement(repositoryProblem);

/** Seconds of a duration like "720h" (units s, m, h, d). */
function durationSeconds(d: string): number {
  const unit: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86400 };
  return Number(d.slice(0, -1)) * (unit[d.slice(-1)] ?? NaN);
}

const gpuSelection = z.union(
  [
    z.literal("all"),
    z.literal("none"),
    z.array(z.number().int().nonnegative().max(LIMITS.gpus - 1)).min(1),
  ],
  { error: 'must be "all", "none" or a list of GPU indexes like [0, 1]' },
);

const hostSchema = z
  .object({
    /** Address the program's SSH connection uses (LAN IP, DNS name, or a tunnel endpoint). */
    address: z
      .string()
      .refine((a) => IPV4.test(a) || (HOSTNAME.test(a) && !/^[\d.]+$/.test(a)), "must be a DNS name or an IPv4 address like 192.168.1.50 (letters, digits, . and -)"),
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
    cpuCores: count(1, LIMITS.cpuCores),
    ramGb: count(1, LIMITS.ramGb, " GB"),
    /** RAM kept for the host OS and the shared services; user guarantees must fit in the rest. */
    reservedRamGb: count(0, LIMITS.ramGb, " GB").default(16),
    gpu: z
      .object({
        count: count(0, LIMITS.gpus).default(0),
        model: z.string().regex(/^([\x21-\x7e]([\x20-\x7e]{0,62}[\x21-\x7e])?)?$/, "must be printable ASCII text of at most 64 characters, like RTX 4090").default(""),
      })
      .strict()
      .prefault({}),
  })
  .strict();

const storageSchema = z
  .object({
    /** The HDDs of the array (whole devices; stable /dev/disk/by-id paths are best). */
    devices: z.array(z.string().superRefine(devicePath("an HDD"))).min(1),
    dataProfile: z.enum(PROFILES),
    /** Defaults to a sensible profile for the data profile (see `defaultMetadataProfile`). */
    metadataProfile: z.enum(PROFILES).optional(),
    /** Optional bcache: an NVMe partition caching every HDD. */
    cache: z
      .object({
        device: z.string().superRefine(devicePath("an NVMe partition")),
        mode: z.enum(CACHE_MODES).default("writeback"),
      })
      .strict()
      .optional(),
    mountpoint: z.string().superRefine(mountpointSyntax).default("/mnt/storage"),
    label: z
      .string()
      .regex(/^[A-Za-z0-9_-]{1,64}$/, "must be 1-64 letters, digits, _ or -")
      .refine((l) => !OS_LABELS.has(l.toLowerCase()), "is the label of one of Ubuntu's own filesystems (a second filesystem with it makes /dev/disk/by-label ambiguous); pick a distinct label such as train-storage")
      .default("train-storage"),
    mountOptions: z
      .string()
      .regex(/^[a-z0-9_=:,.-]+$/, "must be a comma-separated mount option list")
      .superRefine(mountOptionsProblem)
      .default("noatime,compress=zstd:3,space_cache=v2"),
    /** Convert an adopted array whose profiles differ (btrfs balance). Off: such a change is refused. */
    convertProfile: z.boolean().default(false),
  })
  .strict();

const resourcesSchema = z
  .object({
    memoryGuaranteeGb: gb("memoryGuaranteeGb").default(32),
    memoryLimitGb: gb("memoryLimitGb").default(100),
    swapGb: count(0, LIMITS.ramGb, " GB").default(50),
    shmSizeGb: gb("shmSizeGb").default(16),
    quotaGb: quota().default(1000),
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
    swapGb: count(0, LIMITS.ramGb, " GB").optional(),
    shmSizeGb: gb("shmSizeGb").optional(),
    /** CPU count limit (docker --cpus: 0.01 steps). */
    cpus: z
      .number()
      .min(0.01, "must be at least 0.01 (docker --cpus)")
      .max(LIMITS.cpuCores)
      .refine((n) => Math.abs(n * 100 - Math.round(n * 100)) < 1e-6, "must be a multiple of 0.01 (docker --cpus), like 4 or 2.5")
      .optional(),
    /** Pinned CPUs, e.g. "0-7" or "0-3,16-19". Users' cpusets may not overlap. */
    cpuset: z.string().regex(CPUSET, 'must be a cpuset like "0-7" or "0-3,16-19" (numbers without leading zeros)').optional(),
    gpus: gpuSelection.optional(),
    quotaGb: quota().optional(),
    /** The user's own Telegram chat with the alert bot: idle-GPU notices go there too (the admin chat always gets them). */
    telegramChatId: z.string().regex(CHAT_ID, "must be a numeric Telegram chat id (the user's chat with the bot)").optional(),
    /** Replace this user's workspace at the next `up` even if it is busy (set it back to false afterwards). */
    rolloutNow: z.boolean().default(false),
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
    /** Apache Guacamole, the browser desktop (each user's own workspace desktop). */
    guacamole: z.string().default("remote"),
  })
  .strict();

const cloudflareSchema = z
  .object({
    accountId: z.string().regex(CF_ID, "must be the 32-hex-digit Cloudflare account id"),
    zoneId: z.string().regex(CF_ID, "must be the 32-hex-digit Cloudflare zone id of the domain"),
    /** OAuth client id of the Google Workspace identity provider (its secret is `googleClientSecret`). */
    googleClientId: z.string().regex(GOOGLE_CLIENT_ID, 'must be a Google OAuth client id like "1234567890-abc123.apps.googleusercontent.com"'),
    /** Google Workspace domains whose members may reach team routes. */
    allowedDomains: z.array(z.string().regex(DOMAIN, "must be a domain like example.com")).default([]),
    /** Extra individual addresses admitted to team routes. */
    allowedEmails: z.array(z.string().regex(EMAIL, "must be an e-mail address")).default([]),
    requireMfa: z.boolean().default(true),
    sessionDuration: z
      .string()
      .regex(/^[1-9]\d{0,5}(m|h)$/, 'must be a duration like "24h" or "30m" (at least 1m, no leading zeros)')
      .refine((d) => (d.endsWith("h") ? Number(d.slice(0, -1)) * 60 : Number(d.slice(0, -1))) <= 720 * 60, "must be at most 720h (Cloudflare's maximum session with MFA)")
      .default("24h"),
    tunnelName: z.string().regex(/^[A-Za-z0-9_-]{1,64}$/, "must be 1-64 letters, digits, _ or -").default("train-server"),
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

const ARCHIVE_YEARS = 'must be "forever" or a whole number of years (1-100); "forever" is the default';
const backupSchema = z
  .object({
    /** restic repository, normally on the Drive remote through rclone. */
    repository: z.string().superRefine(repositorySyntax).default("rclone:gdrive:train-server/restic"),
    schedule: z.string().regex(HHMM, 'must be a time like "06:00"').default("06:00"),
    uploadLimitMbit: z.number().min(0.01, "must be at least 0.01 Mbit/s (restic's --limit-upload is in whole KiB/s; 0 would mean unlimited)").max(100_000, "must be at most 100000 Mbit/s").default(100),
    keepDaily: count(1, 36_500).default(7),
    keepWeekly: count(1, 5_200).default(52),
    /**
     * How long the restic copy of a removed user's archived home is kept (its own tag: the daily/weekly `forget`
     * never touches it): "forever" (default) or whole years. The archive snapshot on the array is never deleted.
     */
    archiveKeepYears: z
      .union([z.literal("forever"), z.number().int(ARCHIVE_YEARS).min(1, ARCHIVE_YEARS).max(100, ARCHIVE_YEARS)], { error: ARCHIVE_YEARS })
      .default("forever"),
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
    // every snapshot of a subvolume with qgroups on slows each later write: a few hundred at most
    hourly: count(1, 168).default(24),
    daily: count(1, 366).default(7),
    weekly: count(1, 260).default(4),
    /** Hour (0-23) from which the day's first hourly snapshot is kept as that day's daily snapshot. */
    dailyHour: z.number().int().min(0).max(23).default(2),
    /** Day whose daily snapshot is kept as the weekly one. */
    weeklyDay: z.enum(WEEKDAYS).default("sunday"),
  })
  .strict();

/** Some days of the week, from a start to an end time on each (server local time, not across midnight). */
function weekWindow(d: { days: Array<(typeof WEEKDAYS)[number]>; start: string; end: string }) {
  return z
    .object({
      days: z.array(z.enum(WEEKDAYS)).min(1, "needs at least one day").default(d.days),
      start: z.string().regex(HHMM, `must be a time like "${d.start}"`).default(d.start),
      end: z.string().regex(HHMM, `must be a time like "${d.end}"`).default(d.end),
    })
    .strict();
}

const alertsSchema = z
  .object({
    /** Telegram chat id (negative for groups). The bot token is the secret `telegramBotToken`. */
    telegramChatId: z
      .string()
      .regex(/^-?[1-9]\d*$/, "must be a numeric Telegram chat id (negative for groups), without leading zeros")
      .refine((id) => Number.isSafeInteger(Number(id)), "is too long for a Telegram chat id (at most 15 digits)"),
    gpuTempC: z.number().int().min(40).max(110).default(80),
    fsUsedPercent: z.number().int().min(50).max(99).default(90),
    backupMaxAgeHours: count(1, 744, " hours").default(26),
    /**
     * A user whose pinned GPUs (an index list in users[i].gpus) have been idle this many working hours in a row gets a
     * Telegram notice, the admin a summary. Nothing is ever stopped. The count restarts each working day.
     */
    gpuIdleHours: z.number({ error: "must be a number of hours" }).positive().max(24).default(4),
    /** When idle pinned GPUs count, in the server's local time. */
    workingHours: weekWindow({ days: ["monday", "tuesday", "wednesday", "thursday", "friday"], start: "09:00", end: "18:00" }).prefault({}),
    /** The weekly Telegram digest (GPU hours, idle reservations, quotas, backups): day and time. */
    digestDay: z.enum(WEEKDAYS).default("monday"),
    digestAt: z.string().regex(HHMM, 'must be a time like "09:00"').default("09:00"),
  })
  .strict();

const driveSchema = z
  .object({
    /** rclone remote (defined in the secret `rcloneConfig`) of the Google Workspace shared drive. */
    remote: z.string().regex(RCLONE_REMOTE, "must be an rclone remote name").default("gdrive"),
    /**
     * VFS cache size: "auto" = 20 % of the array's usable space (see `driveCacheSizeGb`): a function of the disks
     * only, so adding or removing a user never changes (and never remounts) the Drive under everyone's workspace.
     */
    cacheSizeGb: z
      .union([z.literal("auto"), z.number().int().positive().max(LIMITS.cacheGb)], { error: `must be "auto" or a whole number of GB (1-${LIMITS.cacheGb})` })
      .default("auto"),
    cacheMaxAge: z
      .string()
      .regex(/^[1-9]\d{0,5}[smhd]$/, 'must be a duration like "720h" (at least 1, no leading zeros)')
      .refine((d) => durationSeconds(d) <= 10 * 365 * 86400, "must be at most 10 years (87600h)")
      .default("720h"),
    /** Removed: the cache size no longer depends on the users' quotas. Kept only to say so clearly. */
    snapshotReservePercent: z.unknown().optional(),
  })
  .strict();

const dataSyncSchema = z
  .object({
    enabled: z.boolean().default(true),
    /** rclone source, e.g. "gcs:my-bucket/datasets". */
    source: z.string().superRefine(rclonePath("gcs:bucket/path")),
    /** rclone destination, e.g. "gdrive:datasets". */
    destination: z.string().superRefine(rclonePath("gdrive:datasets")),
    schedule: z.string().regex(HHMM, 'must be a time like "04:00"').default("04:00"),
    bandwidthLimit: z
      .string()
      .regex(RATE, 'must be an rclone rate like "20M"')
      .refine((r) => parseFloat(r) > 0, 'must be more than 0 (rclone takes 0 as no limit at all); e.g. "20M"')
      .default("20M"),
  })
  .strict();

const workspaceSchema = z
  .object({
    /** Base image of the workspace image (Debian bookworm: the frameworks bring their CUDA libraries as wheels). */
    baseImage: z.string().regex(IMAGE_REF, 'must be a docker image reference like "debian:bookworm"').default("debian:bookworm"),
    /** The browser desktop's session (X2Go users pick theirs in the client): KDE Plasma, or the lighter XFCE. */
    desktop: z.enum(WORKSPACE_DESKTOPS, { error: 'must be "kde" or "xfce"' }).default("kde"),
    /**
     * Rollouts never kill a job: before `pulumi up` replaces a workspace (new image, limits, GPUs, mounts, routes),
     * its guard step looks for running work (GPU processes, CPU use, SSH or desktop sessions) and, if it finds any,
     * keeps that workspace as it is (the up names who and what) until the user runs `rollout-ready`, the admin sets
     * users[i].rolloutNow, or the maintenance window comes.
     */
    rollout: z
      .object({
        /** When busy workspaces are replaced anyway (server local time); none by default. */
        window: weekWindow({ days: ["saturday"], start: "02:00", end: "06:00" }).optional(),
        /** CPU use (in cores, averaged over cpuSampleSeconds) at which a workspace counts as busy. */
        busyCpuCores: z.number({ error: "must be a number of cores" }).positive().max(LIMITS.cpuCores).default(0.5),
        cpuSampleSeconds: z.number().int("must be whole seconds").min(1).max(60).default(5),
        /** How long a user's `rollout-ready` stays good. */
        readyMaxAgeHours: z.number().int("must be whole hours").min(1).max(168).default(24),
      })
      .strict()
      .prefault({}),
    /**
     * The browser desktop: Apache Guacamole at `<hostnames.guacamole>.<domain>` (default remote.<domain>), each user
     * their own workspace's desktop, admins all (README, "Browser desktop").
     */
    guacamole: z.boolean({ error: "must be true or false (the browser desktop at remote.<domain>)" }).default(true),
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
  /** Replace a busy workspace anyway at the next up (the admin's override of the rollout guard). */
  rolloutNow: boolean;
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
    if (hi < a) throw new Error(`range ${part} is reversed; write ranges low-high`);
    if (hi > 65535) throw new Error(`CPU ${hi} is beyond any machine`);
    for (let c = a; c <= hi; c++) cpus.add(c);
  }
  return [...cpus].sort((x, y) => x - y);
}

function intToIp(n: number): string {
  return [24, 16, 8, 0].map((s) => (n >>> s) & 255).join(".");
}

/** The netmask of an IPv4 prefix length, as an unsigned 32-bit number (/24 -> 0xffffff00). */
function prefixMask(bits: number): number {
  return bits === 0 ? 0 : (~0 << (32 - bits)) >>> 0;
}

function ipToInt(ip: string): number {
  return ip.split(".").reduce((acc, o) => acc * 256 + Number(o), 0);
}

function cidrContains(cidr: string, ip: string): boolean | undefined {
  const [net, bitsS] = cidr.split("/");
  const bits = Number(bitsS);
  if (!IPV4.test(net) || bits > 32) return undefined;
  const mask = prefixMask(bits);
  return ((ipToInt(net) & mask) >>> 0) === ((ipToInt(ip) & mask) >>> 0);
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
  if (/^-part\d+$/.test(rest)) return true; // /dev/disk/by-id/...-part1
  // kernel names: a disk whose name ends in a digit has partitions <disk>p<N> (nvme0n1p1, loop1p1), others <disk><N>
  // (sda1); so /dev/loop10 is not a partition of /dev/loop1
  return /\d$/.test(disk) ? /^p\d+$/.test(rest) : /^\d+$/.test(rest);
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

/**
 * What is wrong with the base64 key blob of a user's public key of `type`, or undefined. The blob is a list of
 * (uint32 length, bytes) strings starting with the type's own name: a truncated or mis-pasted key fails here.
 */
export function userKeyBlobProblem(type: string, b64: string): string | undefined {
  const blob = Buffer.from(b64, "base64");
  let off = 0;
  const field = (): Buffer | undefined => {
    if (off + 4 > blob.length) return undefined;
    const n = blob.readUInt32BE(off);
    if (off + 4 + n > blob.length) return undefined;
    off += 4 + n;
    return blob.subarray(off - n, off);
  };
  if (field()?.toString("latin1") !== type) return `the base64 part is not a ${type} key (truncated or mis-pasted?)`;
  if (type === "ssh-rsa") {
    field(); // public exponent
    const declared = off + 4 <= blob.length ? blob.readUInt32BE(off) : 0;
    const bits = declared * 8 - (blob[off + 4] === 0 ? 8 : 0);
    if (bits < 2048) return "is an RSA key shorter than 2048 bits; use ed25519";
  }
  while (off < blob.length) if (!field()) return `the base64 part is not a complete ${type} key (truncated?)`;
  if (type === "ssh-ed25519" && blob.length !== 4 + type.length + 4 + 32) return "the ed25519 key is not 32 bytes long (truncated?)";
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

  // --- host ---
  if (c.host.hostKey === undefined) {
    if (!c.rig) add("host.hostKey", `is required: the SSH connection carries every secret, so it must verify the server. ${HOST_KEY_HOWTO(c.host)}`);
  } else {
    const problem = hostKeyProblem(c.host.hostKey);
    if (problem) add("host.hostKey", `${problem}. ${HOST_KEY_HOWTO(c.host)}`);
  }
  const lan = cidrContains(c.host.lanCidr, c.host.lanAddress);
  if (lan === undefined) add("host.lanCidr", `${c.host.lanCidr} is not a valid IPv4 CIDR`);
  else {
    const [net, bitsS] = c.host.lanCidr.split("/");
    const bits = Number(bitsS);
    const mask = prefixMask(bits);
    const netInt = ipToInt(net);
    const addr = ipToInt(c.host.lanAddress);
    if (bits < 8) add("host.lanCidr", `${c.host.lanCidr} is wider than a /8 (the firewall opens the users' ports to it); an office LAN is /8 to /32, e.g. 192.168.1.0/24`);
    else if ((netInt & ~mask) >>> 0 !== 0) add("host.lanCidr", `${c.host.lanCidr} has host bits set; the network is ${intToIp((netInt & mask) >>> 0)}/${bits}`);
    if (!lan) add("host.lanAddress", `${c.host.lanAddress} is not inside host.lanCidr ${c.host.lanCidr}; fix one of them`);
    else {
      const special =
        addr >>> 24 === 127 ? "a loopback address" : addr >>> 24 === 0 ? "in 0.0.0.0/8 (\"this network\")" : addr >>> 28 >= 14 ? "a multicast or reserved address" :
        bits <= 30 && (addr & ~mask) >>> 0 === 0 ? `the network address of ${c.host.lanCidr}` :
        bits <= 30 && ((addr | mask) >>> 0) === 0xffffffff ? `the broadcast address of ${c.host.lanCidr}` : undefined;
      if (special) add("host.lanAddress", `${c.host.lanAddress} is ${special}, not a host's address on the LAN; give the server's own address`);
    }
  }
  const seenSource = new Map<string, number>();
  c.host.adminSources.forEach((src, i) => {
    const p = `host.adminSources[${i}]`;
    const [net, bits] = src.split("/");
    const mask = prefixMask(Number(bits));
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
  const ports = new Map<number, string>(HOST_PORTS);
  const taken = ports.get(c.host.sshPort);
  if (taken) add("host.sshPort", `${c.host.sshPort} is already used by ${taken}; pick another port for the host's sshd`);
  else ports.set(c.host.sshPort, "host.sshPort");
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
    else if (SUDOERS_GROUP_NAMES.has(u.name) && !u.admin)
      add(`${p}.name`, `"${u.name}" is a group Ubuntu's /etc/sudoers grants sudo (%${u.name}), and each user's primary group has the user's name: this user would have host sudo although admin is false; pick another name`);
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
      const path = `${p}.sshKeys[${j}]`;
      if (!SSH_KEY.test(k.trim())) {
        add(path, "is not an OpenSSH public key line (e.g. \"ssh-ed25519 AAAA... alice@laptop\")");
        return;
      }
      // (the same key on two users is accepted: one person with two accounts)
      const [type, b64] = k.trim().split(" ");
      const problem = userKeyBlobProblem(type, b64);
      if (problem) add(path, problem);
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
    const shm = u.shmSizeGb ?? d.shmSizeGb;
    if (shm > limit)
      add(u.shmSizeGb !== undefined ? `${p}.shmSizeGb` : "resources.shmSizeGb", `${shm} GB of /dev/shm exceeds the memory limit ${limit} GB of ${u.name} (/dev/shm is the container's memory); at most ${limit}`);
    if (u.cpus !== undefined && u.cpus > c.host.cpuCores) add(`${p}.cpus`, `${u.cpus} exceeds host.cpuCores ${c.host.cpuCores}`);
    if (u.cpuset !== undefined) {
      let cpus: number[] = [];
      try {
        cpus = parseCpuset(u.cpuset);
      } catch (e) {
        add(`${p}.cpuset`, `"${u.cpuset}": ${(e as Error).message}`);
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
    const twice = Array.isArray(u.gpus) ? u.gpus.find((x, k) => u.gpus!.indexOf(x as never) !== k) : undefined;
    if (twice !== undefined) add(`${p}.gpus`, `lists GPU ${twice} twice; list each index once`);
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
    const twice = d.gpus.find((x, k) => (d.gpus as number[]).indexOf(x) !== k);
    if (twice !== undefined) add("resources.gpus", `lists GPU ${twice} twice; list each index once`);
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
    else {
      const problem = routeLabelProblem(label, c.domain);
      if (problem) add(path, problem);
    }
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
    for (const suffix of WORKSPACE_ROUTE_SUFFIXES) {
      const label = `${u.name}-${suffix}`;
      if (labels.has(label)) add(`users[${i}].name`, `route ${label}.${c.domain} collides with ${labels.get(label)}; rename the user or the service hostname`);
      else labels.set(label, `users[${i}]`);
      if (label.length > 63) add(`users[${i}].name`, `route label ${label} is longer than 63 characters; use a shorter name`);
      else if (POSIX_USERNAME.test(u.name) && !u.name.includes("_")) {
        const problem = routeLabelProblem(label, c.domain);
        if (problem) add(`users[${i}].name`, problem);
      }
    }
  });

  // --- cloudflare ---
  if (c.cloudflare.allowedDomains.length === 0 && c.cloudflare.allowedEmails.length === 0)
    add("cloudflare.allowedDomains", "nobody is admitted: set allowedDomains (your Google Workspace domain) or allowedEmails");
  for (const key of ["allowedDomains", "allowedEmails"] as const) {
    const list = c.cloudflare[key].map((x) => x.toLowerCase());
    list.forEach((x, i) => {
      const first = list.indexOf(x);
      if (first !== i) add(`cloudflare.${key}[${i}]`, `duplicates cloudflare.${key}[${first}] (${x}); list each once`);
    });
  }

  // --- backups / drive ---
  if (c.drive.snapshotReservePercent !== undefined)
    add("drive.snapshotReservePercent", "was removed: the Drive cache no longer depends on the users' quotas (a user change would remount it under everyone); delete this key, and set drive.cacheSizeGb to a number to fix the size");
  if (c.backup.keepWeekly * 7 < c.backup.keepDaily)
    add("backup.keepWeekly", `keeps less history (${c.backup.keepWeekly} weeks) than keepDaily (${c.backup.keepDaily} days)`);
  const repo = c.backup.repository;
  if (repo.startsWith("rclone:")) {
    const remote = repo.split(":")[1];
    if (remote !== c.drive.remote)
      add("backup.repository", `uses rclone remote "${remote}" but drive.remote is "${c.drive.remote}"; the repository lives on the Drive remote`);
  }
  const mp = c.storage.mountpoint;
  if (repo === mp || repo.startsWith(`${mp}/`))
    add("backup.repository", `${repo} is on the array it backs up (storage.mountpoint ${mp}): a lost array takes its backups with it; use the Drive remote (rclone:${c.drive.remote}:train-server/restic) or another disk`);
  if (c.dataSync?.enabled) {
    const { source, destination } = c.dataSync;
    const repoPath = repo.startsWith("rclone:") ? repo.slice("rclone:".length) : undefined;
    if (source === destination) add("dataSync.destination", "is the same as dataSync.source");
    else if (rcloneOverlap(source, destination))
      add("dataSync.destination", `${destination} and dataSync.source ${source} are one inside the other: every run would copy its own copy again; choose folders apart`);
    if (repoPath && rcloneOverlap(destination, repoPath))
      add("dataSync.destination", `${destination} overlaps the restic repository ${repo} (backup.repository): the sync would write into the backups; choose another folder`);
  }
  // jobs that start at the same minute compete for the disks and the uplink (and restic's repository lock)
  const jobs: Array<{ path: string; at: string; day?: number }> = [
    { path: "backup.schedule", at: c.backup.schedule },
    ...(c.dataSync?.enabled ? [{ path: "dataSync.schedule", at: c.dataSync.schedule }] : []),
    { path: "backup.verifyAt", at: c.backup.verifyAt, day: c.backup.verifyDay },
    { path: "backup.scrubAt", at: c.backup.scrubAt, day: c.backup.scrubDay },
  ];
  jobs.forEach((a, i) =>
    jobs.slice(i + 1).forEach((b) => {
      if (a.at !== b.at || (a.day !== undefined && b.day !== undefined && a.day !== b.day)) return;
      if (b.path === "dataSync.schedule") add("backup.schedule", `runs at the same time as dataSync.schedule (${a.at}); both use the uplink, schedule them apart`);
      else
        add(b.path, `starts at the same time as ${a.path} (${a.at}${b.day !== undefined ? ` on day ${b.day} of the month` : ""})${a.path === "backup.schedule" && b.path === "backup.verifyAt" ? ": restic cannot verify while the backup holds the repository's lock" : ""}; schedule them apart`);
    }),
  );

  // --- GPU idle notices: the working day must hold the idle time (the count restarts each working day) ---
  const wh = c.alerts.workingHours;
  const dayMinutes = checkWeekWindow("alerts.workingHours", wh, add);
  if (c.workspace.rollout.window) checkWeekWindow("workspace.rollout.window", c.workspace.rollout.window, add);
  if (dayMinutes > 0 && c.alerts.gpuIdleHours * 60 > dayMinutes)
    add("alerts.gpuIdleHours", `${c.alerts.gpuIdleHours} h does not fit in a working day of ${dayMinutes / 60} h (${wh.start}-${wh.end}), so no notice could ever be sent; lower it or widen alerts.workingHours`);
}

/** Whether two rclone paths (remote:folder) are the same folder or one is inside the other. */
function rcloneOverlap(a: string, b: string): boolean {
  const [ra, ...pa] = a.split(":");
  const [rb, ...pb] = b.split(":");
  const fa = pa.join(":").replace(/\/+$/, "");
  const fb = pb.join(":").replace(/\/+$/, "");
  return ra === rb && (fa === fb || fa.startsWith(`${fb}/`) || fb.startsWith(`${fa}/`) || fa === "" || fb === "");
}

/** The problem of a route's first DNS label under `domain` (IDNA, full name length), or undefined. */
function routeLabelProblem(label: string, domain: string): string | undefined {
  if (label.slice(2, 4) === "--") return `route label ${label} has "--" in its 3rd and 4th characters, which DNS reserves for internationalized names (xn--); choose another`;
  if (label.length + 1 + domain.length > 253) return `route ${label}.${domain} is longer than 253 characters, the most a DNS name may have; use a shorter label or domain`;
  return undefined;
}

/** Problems of a weekly window (days listed twice, an end not after the start); returns its minutes per day. */
function checkWeekWindow(path: string, w: { days: readonly string[]; start: string; end: string }, add: (path: string, message: string) => void): number {
  const seenDay = new Map<string, number>();
  w.days.forEach((day, i) => {
    if (seenDay.has(day)) add(`${path}.days[${i}]`, `duplicates ${path}.days[${seenDay.get(day)}] (${day})`);
    else seenDay.set(day, i);
  });
  const minutes = (hhmm: string) => Number(hhmm.slice(0, 2)) * 60 + Number(hhmm.slice(3));
  const span = minutes(w.end) - minutes(w.start);
  if (span <= 0) add(`${path}.end`, `${w.end} is not after ${path}.start ${w.start}; the window cannot span midnight (split it into two days)`);
  return span;
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
    rolloutNow: u.rolloutNow,
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
  const invisible = invisibleCharacters(raw);
  const parsed = rawConfigSchema.safeParse(raw);
  if (!parsed.success || invisible.length) {
    const flagged = new Set(invisible.map((i) => i.path));
    const schema = (parsed.error?.issues ?? []).flatMap(zodIssues).filter((i) => !flagged.has(i.path));
    throw new ConfigError([...invisible, ...schema]);
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

/** A zod issue as config issues: an unknown key is reported at its own path, one issue per key. */
function zodIssues(i: z.core.$ZodIssue): ConfigIssue[] {
  if (i.code === "unrecognized_keys")
    return i.keys.map((k) => ({ path: formatPath([...i.path, k]), message: `unknown key "${k}"; check the spelling (see README, Configuration reference)` }));
  return [{ path: formatPath(i.path), message: describeZodIssue(i) }];
}

function describeZodIssue(i: z.core.$ZodIssue): string {
  switch (i.code) {
    case "invalid_type":
      if (i.input === undefined) return `is required (expected ${i.expected})`;
      if (i.input === null) return `is empty (expected ${i.expected}); give a value or delete the key`;
      return `must be ${/^[aeiou]/.test(i.expected) ? "an" : "a"} ${i.expected} (got ${describeInput(i.input)})`;
    default:
      return i.message;
  }
}

function describeInput(v: unknown): string {
  if (Array.isArray(v)) return "a list";
  if (typeof v === "string") return `the string ${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}...` : v)}`;
  if (typeof v === "number") return Number.isNaN(v) ? "NaN" : `the number ${v}`;
  if (typeof v === "object") return "a mapping";
  return `${typeof v} ${String(v)}`;
}

/**
 * Every string in the raw config (at any depth) that holds an invisible or control character, as issues: checked
 * before the schema so that every key, also one added later, is covered. Leading/trailing whitespace is the
 * fields' own business (an SSH key's trailing newline is trimmed).
 */
function invisibleCharacters(raw: unknown, path: PropertyKey[] = []): ConfigIssue[] {
  if (typeof raw === "string") {
    const value = raw.trim();
    const m = INVISIBLE.exec(value);
    if (!m) return [];
    const ch = m[0];
    const name = INVISIBLE_NAMES[ch] ?? "an invisible or control character";
    const code = `U+${ch.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
    const lines = ch === "\n" && /sshKeys\[\d+\]$/.test(formatPath(path)) ? "; give each SSH key as its own list item" : "; retype the value without it";
    return [{ path: formatPath(path), message: `contains ${name} (${code}) at character ${m.index + 1}${lines}` }];
  }
  if (Array.isArray(raw)) return raw.flatMap((v, i) => invisibleCharacters(v, [...path, i]));
  if (raw && typeof raw === "object") return Object.entries(raw).flatMap(([k, v]) => invisibleCharacters(v, [...path, k]));
  return [];
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
    const colon = fullKey.indexOf(":");
    const ns = fullKey.slice(0, colon);
    const key = fullKey.slice(colon + 1); // all of the rest: "train-server:host:x" is the key "host:x", not "host"
    if (colon < 0) continue;
    if (ns !== CONFIG_NAMESPACE) {
      // "Train-Server:host" is silently another project's key to Pulumi: say so
      if (ns.toLowerCase() === CONFIG_NAMESPACE.toLowerCase()) unknownKeys.push(fullKey);
      continue;
    }
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
  const issues: ConfigIssue[] = unknownKeys.map((k) =>
    k.toLowerCase().startsWith(`${CONFIG_NAMESPACE}:`)
      ? { path: k, message: `stack config key "${k}" is not in the "${CONFIG_NAMESPACE}" namespace (check its spelling: namespaces are case-sensitive)` }
      : { path: k || `${CONFIG_NAMESPACE}:`, message: `unknown stack config key "${CONFIG_NAMESPACE}:${k}"; known keys: ${[...CONFIG_KEYS, ...SECRET_KEYS].join(", ")}` },
  );
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
