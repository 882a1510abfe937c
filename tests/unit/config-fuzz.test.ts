/**
 * Hostile-input campaign over the stack files (issue 16): mutations of the TEXT of Pulumi.<stack>.yaml, generated
 * deterministically from SEED, each read exactly as the offline plan reads a stack (tools/plan.ts `planStack`:
 * readStackFile → toRuntimeConfig → loadConfig → the whole program under mocks). For every mutation:
 *   - a rejection is a ConfigError; every issue names a path, and one names the mutated path (or its message
 *     does, when the other side of a collision is reported); never a TypeError, a YAML exception or a renderer's
 *     own throw;
 *   - an accepted mutation runs the whole program without an error, as a preview and as an up (every output
 *     resolved): a value the schema accepts never makes a renderer throw;
 *   - the outcome is the expected one: each case says reject, or accept and why that is sensible for a server.
 * The figures (mutations run, rejected with a path, accepted, crashes) are printed at the end.
 */
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { parseDocument } from "yaml";
import { ConfigError, ConfigIssue } from "../../components/config";
import { parseStackText, REPO_ROOT } from "../../tools/harness";
import { planStack } from "../../tools/plan";
import { rng } from "../helpers/edge";

// Pulumi's runtime records a stack trace for every promise it makes (runtime/debuggable.js); with source maps that
// is ~90 % of a program run under mocks. The campaign reads messages only: no frames, ~0.3 s per accepted run.
Error.stackTraceLimit = 0;
jest.setTimeout(60_000);

const SEED = 0x16f022;
const rand = rng(SEED);
const int = (lo: number, hi: number) => lo + Math.floor(rand() * (hi - lo + 1));
const pick = <T>(xs: readonly T[]): T => xs[int(0, xs.length - 1)];

type Base = "prod" | "minimal" | "rig";
const BASES: Record<Base, string> = {
  prod: fs.readFileSync(path.join(REPO_ROOT, "Pulumi.prod.yaml"), "utf8"),
  minimal: fs.readFileSync(path.join(REPO_ROOT, "Pulumi.minimal.yaml"), "utf8"),
  rig: fs.readFileSync(path.join(REPO_ROOT, "Pulumi.rig.yaml"), "utf8"),
};

type Path = Array<string | number>;
/** `["users", 1, "uid"]` → `users[1].uid` (the program's own path notation). */
const fmt = (p: Path): string => p.reduce<string>((out, x) => (typeof x === "number" ? `${out}[${x}]` : out ? `${out}.${x}` : x), "");

/** What a mutation should do: be rejected with an issue naming `path` (a RegExp: matching), or be accepted. */
type Expect = { reject: string | RegExp } | { accept: string };
interface Mutation {
  name: string;
  text: string;
  expect: Expect;
}
const DELETE = Symbol("delete");
const RAW = "__ts_fuzz_raw_value__";
type Value = unknown | typeof DELETE | { raw: string };

/** The base stack's text with `sets` applied (paths without the namespace; values, DELETE, or raw YAML text). */
function edit(base: Base, sets: Array<[Path, Value]>): string {
  const doc = parseDocument(BASES[base]);
  const raws: string[] = [];
  for (const [p, v] of sets) {
    const full = ["config", `train-server:${p[0]}`, ...p.slice(1)];
    if (v === DELETE) doc.deleteIn(full);
    else if (v && typeof v === "object" && "raw" in (v as object)) {
      doc.setIn(full, `${RAW}${raws.length}`);
      raws.push((v as { raw: string }).raw);
    } else if (typeof v === "string" && /[^\x20-\x7e]/.test(v)) {
      // double-quoted with escapes: the yaml library can print a plain scalar with a line break as invalid YAML
      const node = doc.createNode(v);
      node.type = "QUOTE_DOUBLE";
      doc.setIn(full, node);
    } else doc.setIn(full, v);
  }
  let text = String(doc);
  raws.forEach((r, i) => (text = text.replace(`${RAW}${i}`, r)));
  return text;
}

const mutations: Mutation[] = [];
const add = (name: string, text: string, expect: Expect) => mutations.push({ name: `#${String(mutations.length + 1).padStart(3, "0")} ${name}`, text, expect });
const show = (v: unknown) => (typeof v === "string" ? JSON.stringify(v.length > 48 ? `${v.slice(0, 48)}…` : v) : v === DELETE ? "(deleted)" : typeof v === "object" && v && "raw" in v ? (v as { raw: string }).raw : JSON.stringify(v));
/** Single rejected value mutations of prod (the material of the seeded combinations). */
const singles: Array<{ name: string; set: [Path, Value]; want: string }> = [];
/** One value mutation (or several at once). */
function set(base: Base, sets: Array<[Path, Value]>, expect: Expect, label?: string): void {
  const name = label ?? sets.map(([p, v]) => `${fmt(p)} = ${show(v)}`).join(", ");
  add(`[${base}] ${name}`, edit(base, sets), expect);
  if (base === "prod" && sets.length === 1 && "reject" in expect && typeof expect.reject === "string") singles.push({ name, set: sets[0], want: expect.reject });
}
const reject = (p: Path | string | RegExp): Expect => ({ reject: Array.isArray(p) ? fmt(p) : p });
const accept = (why: string): Expect => ({ accept: why });

// ------------------------------------------------------------------------------------------------ the leaves
const prodConfig: Record<string, any> = Object.fromEntries(Object.entries(parseStackText(BASES.prod)).map(([k, v]) => [k.replace(/^train-server:/, ""), v]));
interface Leaf {
  path: Path;
  value: unknown;
}
function leaves(v: unknown, p: Path): Leaf[] {
  if (Array.isArray(v)) {
    // users and devices: one element, chosen from the seed, stands for all of them
    const i = int(0, v.length - 1);
    return v.length ? leaves(v[i], [...p, i]) : [];
  }
  if (v && typeof v === "object") return Object.entries(v).flatMap(([k, x]) => leaves(x, [...p, k]));
  return [{ path: p, value: v }];
}
const LEAVES = Object.entries(prodConfig).flatMap(([k, v]) => leaves(v, [k]));
const TRIMMED = /^(users\[\d+\]\.sshKeys\[\d+\]|host\.hostKey)$/; // the program trims these

// ------------------------------------------------------------------ families over every leaf of the prod stack
const HOMOGLYPHS: Record<string, string> = { a: "а", e: "е", o: "о", c: "с", p: "р", x: "х", A: "А", E: "Е", O: "О", C: "С", T: "Т", X: "Х" };
const insertAt = (s: string, ch: string) => {
  const i = s.length > 1 ? int(1, s.length - 1) : s.length;
  return s.slice(0, i) + ch + s.slice(i);
};
for (const { path: p, value } of LEAVES) {
  const at = fmt(p);
  if (typeof value === "string") {
    set("prod", [[p, [1, 2]]], reject(p), `${at} = [1, 2] (a list for a string)`);
    set("prod", [[p, ""]], at === "host.gpu.model" ? accept("the GPU model is informational; empty is its default") : reject(p));
    set("prod", [[p, "   "]], reject(p));
    set("prod", [[p, `  ${value}  `]], TRIMMED.test(at) ? accept("a key line is trimmed (a pasted key often ends in a newline)") : reject(p), `${at} = padded with spaces`);
    const glyph = [...value].findIndex((ch) => ch in HOMOGLYPHS);
    const homoglyph = glyph >= 0 ? value.slice(0, glyph) + HOMOGLYPHS[value[glyph]] + value.slice(glyph + 1) : `${value}а`;
    set("prod", [[p, homoglyph]], reject(p), `${at} = homoglyph ${JSON.stringify(homoglyph.slice(0, 40))}`);
    for (const [what, ch] of [["RTL mark", "\u200f"], ["NUL", "\u0000"], ["newline", "\n"], ["zero-width space", "\u200b"], ["RTL override", "\u202e"]] as const)
      set("prod", [[p, insertAt(value, ch)]], reject(p), `${at} = ${what} inside`);
  } else if (typeof value === "number") {
    const zeroOk: Record<string, string> = {
      "host.reservedRamGb": "0 GB kept back is the admin's call on a box whose services are small",
      "host.gpu.count": "a CPU-only server (users' gpus resolve to none)",
      "resources.swapGb": "no swap on top of the memory limit",
    };
    const cases: Array<[string, Value, Expect]> = [
      ["0", 0, zeroOk[at] ? accept(zeroOk[at]) : reject(p)],
      ["-1", -1, reject(p)],
      ["1e308", 1e308, reject(p)],
      ["2^53+1", { raw: "9007199254740993" }, reject(p)],
      ["0.5", 0.5, at === "backup.uploadLimitMbit" ? accept("half a Mbit/s (61 KiB/s) is a real, if slow, uplink limit") : reject(p)],
      ["1e9", 1e9, reject(p)],
      ['"NaN"', "NaN", reject(p)],
      [".nan", NaN, reject(p)],
      [".inf", Infinity, reject(p)],
      ['"12" (a string)', "12", reject(p)],
    ];
    for (const [what, v, e] of cases) set("prod", [[p, v]], e, `${at} = ${what}`);
  } else if (typeof value === "boolean") {
    set("prod", [[p, "yes"]], reject(p), `${at} = "yes" (YAML 1.1 boolean)`);
    set("prod", [[p, 1]], reject(p), `${at} = 1`);
  }
}

// -------------------------------------------------------------------------------- path tricks in path fields
const PATHS: Array<[Path, string]> = [
  [["storage", "mountpoint"], "/mnt/storage"],
  [["storage", "devices", int(0, 3)], "/dev/sdb"],
  [["storage", "cache", "device"], "/dev/nvme0n1p4"],
  [["backup", "repository"], "rclone:gdrive:train-server/restic"],
  [["dataSync", "source"], "gcs:example-ml-data"],
  [["dataSync", "destination"], "gdrive:gcs-mirror"],
];
for (const [p, v] of PATHS) {
  const slash = v.lastIndexOf("/") > 0 ? v.lastIndexOf("/") : v.indexOf(":");
  const head = v.slice(0, slash + 1);
  const tail = v.slice(slash + 1);
  const tricks: Array<[string, string]> = [
    ['".." component', `${head}../${tail}`],
    ['"//"', v.includes("/") ? v.replace("/", "//") : `${head}x//${tail}`],
    ["trailing /", `${v}/`],
    ['"." component', `${head}./${tail}`],
    ['".." at the end', `${v}/..`],
    ["a space", `${head}my ${tail}`],
  ];
  for (const [what, x] of tricks) set("prod", [[p, x]], reject(p), `${fmt(p)} = ${JSON.stringify(x)} (${what})`);
}

// ------------------------------------------------------------------- values that defeat a rule elsewhere (targeted)
const S = (p: Path, v: Value, e: Expect, base: Base = "prod") => set(base, [[p, v]], e);
// mountpoints: system dirs, OS-managed trees, non-canonical spellings of them
for (const mp of ["/var", "//var", "/mnt/../var", "/./var", "/var/lib/train-server", "/var/lib/docker", "/tmp/storage", "/run/storage", "/etc/storage", "/usr/local/storage", "/boot/storage", "/proc/x", "/home", "/srv", "/mnt", "/", "mnt/storage", "/mnt/storage/", "/mnt/stor age", "/mnt/storage\\x"])
  S(["storage", "mountpoint"], mp, reject("storage.mountpoint"));
for (const [mp, why] of [["/srv/storage", "a dedicated directory under /srv"], ["/data", "a top-level data mount"], ["/mnt/storage.v2", "dots inside a name are plain characters"]] as const)
  S(["storage", "mountpoint"], mp, accept(why));
// labels
for (const l of ["cloudimg-rootfs", "writable", "Root", "my storage!", "", "a".repeat(65)]) S(["storage", "label"], l, reject("storage.label"));
S(["storage", "label"], "train_storage-2", accept("letters, digits, _ and - (the array's own name)"));
// mount options
for (const o of ["subvol=homes", "noatime,subvolid=5", "ro", "noatime,degraded", "noatime,,compress=zstd", "noatime,", "compress=zstd:99", "compress=brotli", "noexec", "user_subvol_rm_allowed", "nobarrier", "noatime,noatime", "rescue=all", "noatime=1", "space_cache=v3", "commit=0", "bogus"])
  S(["storage", "mountOptions"], o, reject("storage.mountOptions"));
for (const o of ["noatime,compress=zstd:1,space_cache=v2,discard=async", "relatime", "noatime,compress-force=zstd:3,nofail,x-systemd.device-timeout=30"])
  S(["storage", "mountOptions"], o, accept("known btrfs/mount options with valid values"));
// devices
for (const d of ["sda", "/dev/null", "/dev/zero", "/dev/disk/by-uuid/1234-abcd", "/dev/disk/by-label/data", "/dev/sd a", "/dev/pts/0", "/dev/shm/disk", "/dev/sda\\x"])
  S(["storage", "devices", 1], d, reject("storage.devices[1]"));
set("prod", [[["storage", "devices"], ["/dev/disk/by-id/ata-WDC_WD201KFGX-68BKJN0_1", "/dev/disk/by-id/ata-WDC_WD201KFGX-68BKJN0_2", "/dev/disk/by-id/ata-WDC_WD201KFGX-68BKJN0_3", "/dev/disk/by-id/ata-WDC_WD201KFGX-68BKJN0_4"]]], accept("stable /dev/disk/by-id names (the README's advice)"));
set("prod", [[["storage", "devices"], ["/dev/disk/by-path/pci-0000:00:17.0-ata-1", "/dev/disk/by-path/pci-0000:00:17.0-ata-2", "/dev/disk/by-id/usb-WD_Elements_25A3-0:0", "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"]]], accept("by-path and by-id names with ':' (udev's own spelling)"));
set("rig", [[["storage", "devices"], ["/dev/loop1", "/dev/loop10"]]], accept("/dev/loop10 is not a partition of /dev/loop1 (partitions of a name ending in a digit are <name>p<N>)"));
set("prod", [[["storage", "devices"], ["/dev/nvme1n1", "/dev/nvme1n10", "/dev/nvme1n11", "/dev/nvme1n12"]]], accept("nvme namespaces 1, 10, 11, 12 are four disks"));
set("prod", [[["storage", "devices", 3], "/dev/sda1"]], reject("storage.devices[3]"));
set("rig", [[["storage", "devices"], ["/dev/loop1", "/dev/loop1p1"]]], reject("storage.devices[1]"));
set("prod", [[["storage", "devices", 3], "/dev/disk/by-id/ata-X"], [["storage", "devices", 2], "/dev/disk/by-id/ata-X-part1"]], reject("storage.devices[2]"));
for (const c of ["/dev/sdb", "/dev/sdc3", "/dev/nvme0n1p4/", "/dev/../dev/nvme0n1p4"]) S(["storage", "cache", "device"], c, reject("storage.cache.device"));
// cpusets and cpus
for (const c of ["0-", "-3", "00-3", "7-2", "0-99999", "0,,1", "2-7,", " 2-7", "2–7", "0-63"]) S(["users", 0, "cpuset"], c, reject("users[0].cpuset"));
S(["users", 0, "cpuset"], "2-7,5", accept("Docker takes overlapping ranges; the CPUs are the same set 2-7"));
S(["users", 0, "cpuset"], "0-1,6", accept("single CPUs and ranges within the host's 32, apart from the others'"));
for (const c of [0, 0.001, 1.234, -2, 33]) S(["users", 0, "cpus"], c, reject(/users\[0\]\.cpus/));
S(["users", 1, "cpus"], 2.5, accept("2.5 CPUs (docker --cpus takes 0.01 steps), inside the host's 32"));
// identities: uids, names, emails, keys
for (const u of [0, 999, 65534, 60000, 1000.5, -1000]) S(["users", 2, "uid"], u, reject("users[2].uid"));
for (const n of ["portainer", "alertmanager", "node-exporter", "dozzle", "tensorboard", "filebrowser", "cadvisor", "lxd", "root", "docker", "sudo", "ops", "Alice", "ab-", "bob_x", "1bob", "-bob", "a".repeat(33)])
  S(["users", 3, "name"], n, reject("users[3].name"));
S(["users", 3, "name"], "dave-", accept("a POSIX name may end in -: its route dave--code has the -- in places 5-6, which DNS allows"));
S(["users", 0, "name"], "admin", accept("an admin may be named admin (Ubuntu's %admin sudo rule gives nothing an admin lacks)"));
set("minimal", [[["users", 0, "admin"], false], [["users", 1, "admin"], true]], reject("users[0].name"), "users[0] named admin with admin: false (%admin in Ubuntu's sudoers)");
for (const e of ["аlice@example.com", "alice@exаmple.com", "alice@example.com.", "alice@@example.com", "alice @example.com", "<alice@example.com>", "alice@example"]) S(["users", 0, "email"], e, reject("users[0].email"));
S(["users", 0, "email"], "ALICE@Example.COM", accept("addresses are case-insensitive: normalized to alice@example.com"));
S(["users", 0, "email"], "alice+ml@example.com", accept("a plus address in the allowed domain"));
const KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDm+MDWku3UWnMtuEXlaaEnTgoPOudIW7KRhtgJVKB1k";
for (const k of ["ssh-ed25519 AAAA", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDm+MDWku3UWnMtuEXla", `no-pty ${KEY}`, `${KEY} a\n${KEY} b`, "ssh-dss AAAAB3NzaC1kc3MAAACBAP", `ecdsa-sha2-nistp256 ${KEY.split(" ")[1]}`, "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7"])
  S(["users", 0, "sshKeys", 0], k, reject("users[0].sshKeys[0]"));
S(["users", 0, "sshKeys", 0], `${KEY} josé@laptop`, accept("a key comment is free text (non-ASCII letters are fine; control characters are not)"));
S(["users", 0, "sshKeys", 0], `${KEY}\n`, accept("a trailing newline (a block scalar or a pasted file) is trimmed"));
S(["users", 1, "sshKeys"], [KEY], accept("the same key on two users is one person with two accounts"));
// hostnames, domain, Access
for (const d of ["example.com.", "Example.com", "example", "-example.com", "exa_mple.com", `${"a".repeat(63)}.${"b".repeat(63)}.${"c".repeat(63)}.${"d".repeat(50)}.com`]) S(["domain"], d, reject(/^(domain|hostnames\.\w+|users\[\d+\]\.name)$/));
S(["domain"], "xn--bcher-kva.ch", accept("an internationalized domain in its A-label form"));
for (const h of ["Grafana", "grafana.", "graf ana", "ab--x", "-x", "health", "alice-code", "a".repeat(64)]) S(["hostnames", "grafana"], h, reject(/^(hostnames\.\w+|users\[\d+\]\.name)$/));
S(["hostnames", "grafana"], "dash", accept("another first label for Grafana"));
for (const s of ["0m", "0h", "00h", "007h", "721h", "24H", "1d", "24", "-1h", "1e3h"]) S(["cloudflare", "sessionDuration"], s, reject("cloudflare.sessionDuration"));
S(["cloudflare", "sessionDuration"], "1m", accept("one minute: short, but a valid Access session"));
S(["cloudflare", "sessionDuration"], "720h", accept("Cloudflare's maximum"));
for (const d of [["example.com", "example.com"], ["Example.com"], ["example.com."], ["*.example.com"]]) S(["cloudflare", "allowedDomains"], d, reject(/^cloudflare\.allowedDomains/));
set("prod", [[["cloudflare", "allowedEmails"], ["x@example.com", "X@example.com"]]], reject("cloudflare.allowedEmails[1]"));
for (const g of ["", "x\ny", "not-a-client-id", " 1234567890-abcdefg.apps.googleusercontent.com"]) S(["cloudflare", "googleClientId"], g, reject("cloudflare.googleClientId"));
for (const a of ["ABC", "0123456789abcdef0123456789abcde", "0123456789ABCDEF0123456789ABCDEF"]) S(["cloudflare", "accountId"], a, reject("cloudflare.accountId"));
// backup schedule, times, collisions
for (const t of ["24:00", "6:00", "06:60", "06:00:00", "6am", "", "-1:00"]) S(["backup", "schedule"], t, reject("backup.schedule"));
S(["backup", "schedule"], "23:59", accept("a minute before midnight is a time of day"));
S(["backup", "schedule"], "04:00", reject("backup.schedule")); // = dataSync.schedule
S(["backup", "verifyAt"], "06:00", reject("backup.verifyAt")); // = backup: restic's lock
S(["backup", "scrubAt"], "06:00", reject("backup.scrubAt")); // = backup
S(["dataSync", "schedule"], "03:00", reject(/^(dataSync\.schedule|backup\.scrubAt)$/)); // = scrub (day 15)
set("prod", [[["backup", "scrubDay"], 1], [["backup", "scrubAt"], "08:00"]], reject("backup.scrubAt"), "backup.scrubDay/scrubAt = verifyDay/verifyAt (1, 08:00)");
set("prod", [[["backup", "scrubDay"], 2], [["backup", "scrubAt"], "08:00"]], accept("the scrub at the verification's time, but on another day"));
for (const d of [0, 29, 31, 1.5]) S(["backup", "verifyDay"], d, reject("backup.verifyDay"));
set("prod", [[["dataSync", "enabled"], false], [["dataSync", "schedule"], "06:00"]], accept("a disabled data sync does not collide with the backup"));
// repositories and sync paths
for (const r of ["rclone:gdrive:", "rclone:gdrive:/restic", "rclone:other:restic", "rclone:gdrive:train-server/../restic", "s3:s3.amazonaws.com/bucket", "b2:bucket:restic", "gs:bucket:/restic", "/", "/mnt/storage/restic", "/mnt/storage", "restic", "rclone:gdrive:my backups", "sftp:nas:/srv/../restic", "rclone:g drive:restic"])
  S(["backup", "repository"], r, reject("backup.repository"));
S(["backup", "repository"], "/srv/restic", accept("a local repository on another disk than the array"));
S(["backup", "repository"], "sftp:backup@nas.lan:/srv/restic", accept("restic's sftp backend with root's own ssh setup"));
S(["backup", "repository"], "rclone:gdrive:backups/train-server.restic", accept("another folder on the Drive remote"));
for (const [p, v] of [[["dataSync", "destination"], "gdrive:train-server/restic"], [["dataSync", "destination"], "gdrive:train-server"], [["dataSync", "destination"], "gdrive:train-server/restic/data"], [["dataSync", "destination"], "gcs:example-ml-data"], [["dataSync", "destination"], "gcs:example-ml-data/mirror"], [["dataSync", "source"], "gdrive:gcs-mirror/x"], [["dataSync", "destination"], "gdrive:"], [["dataSync", "source"], "gcs:"], [["dataSync", "source"], "/data"]] as Array<[Path, string]>)
  S(p, v, reject(/^dataSync\.(source|destination)$/));
S(["dataSync", "destination"], "gdrive:datasets/2025", accept("a dated folder on the Drive, apart from the repository"));
for (const b of ["0", "0M", "0.0K", "20 M", "off", "-5M", "20MB"]) S(["dataSync", "bandwidthLimit"], b, reject("dataSync.bandwidthLimit"));
S(["dataSync", "bandwidthLimit"], "1.5M", accept("1.5 MiB/s"));
// drive cache
for (const [v, e] of [[0, reject("drive.cacheSizeGb")], [1_000_001, reject("drive.cacheSizeGb")], ["AUTO", reject("drive.cacheSizeGb")], [2.5, reject("drive.cacheSizeGb")], [500, accept("a fixed 500 GB cache")]] as const) S(["drive", "cacheSizeGb"], v, e);
for (const a of ["0h", "99999999h", "87601h", "720", "1w", "01h"]) S(["drive", "cacheMaxAge"], a, reject("drive.cacheMaxAge"));
S(["drive", "cacheMaxAge"], "30d", accept("30 days"));
S(["drive", "snapshotReservePercent"], 50, reject("drive.snapshotReservePercent"));
// LAN, address, ports
for (const [p, v] of [[["host", "lanCidr"], "192.168.1.50/24"], [["host", "lanCidr"], "0.0.0.0/0"], [["host", "lanCidr"], "192.168.0.0/4"], [["host", "lanCidr"], "192.168.1.0/33"], [["host", "lanCidr"], "192.168.1.0"], [["host", "lanAddress"], "192.168.1.0"], [["host", "lanAddress"], "192.168.1.255"], [["host", "lanAddress"], "192.168.1.050"], [["host", "lanAddress"], "10.0.0.5"]] as Array<[Path, string]>)
  S(p, v, reject(/^host\.lan(Cidr|Address)$/));
set("prod", [[["host", "lanCidr"], "127.0.0.0/8"], [["host", "lanAddress"], "127.0.0.1"]], reject("host.lanAddress"));
set("prod", [[["host", "lanCidr"], "192.168.1.50/32"], [["host", "lanAddress"], "192.168.1.50"]], accept("a /32 LAN: only the server itself (ports open to nobody else)"));
for (const a of ["-oProxyCommand=touch /tmp/x", "10.0.0.10 ; rm -rf /", "999.1.1.1", "server..lan", "", "ssh://host", "[::1]"]) S(["host", "address"], a, reject("host.address"));
S(["host", "address"], "Train-Server.LAN", accept("DNS names are case-insensitive"));
for (const port of [80, 443, 2000, 2222, 4003, 0, 65536]) S(["host", "sshPort"], port, reject(/^(host\.sshPort|users\[\d\]\.uid)$/));
S(["host", "sshPort"], 2200, accept("a free port below the users' 2222+"));
S(["host", "sshPort"], { raw: "0x16" }, accept("YAML's hex spelling of 22"));
S(["host", "ramGb"], { raw: "2e2" }, accept("2e2 is the number 200"));
// sizes that no real server has, and their consequences
for (const [p, v] of [[["host", "ramGb"], 1e9], [["host", "cpuCores"], 100_000], [["host", "gpu", "count"], 65], [["resources", "quotaGb"], 1e7], [["users", 0, "quotaGb"], 1e12], [["resources", "swapGb"], 1e15], [["resources", "shmSizeGb"], 101], [["users", 2, "shmSizeGb"], 101], [["backup", "uploadLimitMbit"], 0.001], [["backup", "uploadLimitMbit"], 1e6], [["backup", "keepDaily"], 1e6], [["snapshots", "hourly"], 10_000], [["alerts", "backupMaxAgeHours"], 1e9], [["alerts", "gpuTempC"], 200]] as Array<[Path, number]>)
  S(p, v, reject(p));
set("prod", [[["resources", "quotaGb"], 1], [["resources", "quotaWarnPercent"], 50]], reject("resources.quotaWarnPercent"));
for (const g of ["ALL", [], [-1], [0, 0], [1], "some"]) S(["resources", "gpus"], g, reject("resources.gpus"));
S(["resources", "gpus"], "none", accept("nobody gets a GPU by default"));
S(["users", 1, "gpus"], [0], accept("GPU 0 of the host's one GPU"));
for (const c of ["-0", "007", "-99999999999999999999", "1e3", "@chan", ""]) S(["alerts", "telegramChatId"], c, reject("alerts.telegramChatId"));
S(["alerts", "telegramChatId"], "123456789", accept("a user's chat id (positive)"));
for (const m of ["RTX 5080\u202e", "x".repeat(65), "RTX\t5080"]) S(["host", "gpu", "model"], m, reject("host.gpu.model"));
S(["host", "gpu", "model"], "NVIDIA RTX A6000 (48 GB)", accept("informational text"));
for (const i of ["", "nvidia/cuda:12.4 ; rm -rf /", "NVIDIA/CUDA", "nvidia/cuda:", "nvidia/cuda@sha256:abc"]) S(["workspace", "baseImage"], i, reject("workspace.baseImage"));
S(["workspace", "baseImage"], "registry.example.com:5000/team/cuda:12.4.1-runtime", accept("an image on a private registry with a port"));
S(["workspace", "baseImage"], `nvidia/cuda@sha256:${"a".repeat(64)}`, accept("an image pinned by digest"));
// host keys and the rig
S(["host", "hostKey"], DELETE, reject("host.hostKey"));
S(["host", "hostKey"], `10.0.0.10 ${KEY}`, reject("host.hostKey"), "minimal");
set("rig", [], accept("the rig stack as it is (no host key: a throwaway VM)"), "the rig stack unchanged");
S(["rig"], "true", accept("a top-level string \"true\" is how Pulumi stores every plain value"), "rig");
S(["rig"], "yes", reject("rig"), "rig");
S(["rig"], false, reject("host.hostKey"), "rig"); // a rig without a host key is a production stack without one
S(["storage", "convertProfile"], "true", reject("storage.convertProfile"));
S(["users"], [], accept("a server without users (admin routes are not published)"));
S(["users"], "alice", reject("users"));
S(["users", 0], "alice", reject("users[0]"));
S(["host"], "10.0.0.10", reject("host"));
S(["host"], null, reject("host"));
S(["storage", "devices"], [], reject("storage.devices"));
S(["storage", "devices"], "/dev/sda /dev/sdb /dev/sdc /dev/sdd", reject("storage.devices"));
S(["users", 0, "memoryLimitGB"], 10, reject("users[0].memoryLimitGB"));
S(["storrage"], {}, reject("storrage"));

// ------------------------------------------------------------------------------------------------ YAML level
const P = BASES.prod;
const lines = P.split("\n");
const lineOf = (re: RegExp) => lines.findIndex((l) => re.test(l));
const withLine = (i: number, extra: string) => [...lines.slice(0, i + 1), extra, ...lines.slice(i + 1)].join("\n");
const FILE = /^Pulumi\.fz-\d+\.yaml(:\d+:\d+)?$/;
const text = (name: string, t: string, e: Expect) => add(`[text] ${name}`, t, e);
text("duplicated top-level key train-server:domain", `${P}\n  train-server:domain: evil.example\n`, reject("domain"));
text("duplicated nested key host.sshUser", withLine(lineOf(/^ {4}sshUser:/), "    sshUser: root"), reject("host.sshUser"));
text("duplicated key in a user entry (uid)", withLine(lineOf(/^ {4}uid: 1001/), "    uid: 1000"), reject("users[1].uid"));
text("duplicated key in a flow mapping", P.replace(/  train-server:snapshots:\n(    .*\n)+/, "  train-server:snapshots: {hourly: 24, hourly: 1}\n"), reject("snapshots.hourly"));
text("duplicated config: section", `${P}config:\n  train-server:rig: true\n`, reject("config"));
text("host given as host and train-server:host", P.replace("config:\n", "config:\n  host: {address: 1.2.3.4}\n"), reject("host"));
text("unbalanced [", P.replace("- /dev/sda\n", "- [/dev/sda\n"), reject(FILE));
text("unclosed quote", P.replace("telegramChatId: '-1001234567890'", "telegramChatId: '-1001234567890"), reject(FILE));
text("tab indentation", P.replace("    sshUser: ops", "\tsshUser: ops"), reject(FILE));
text("a: b: c (nested compact mapping)", P.replace("    sshUser: ops", "    sshUser: ops: root"), reject(FILE));
text("wrong indentation", P.replace("    sshUser: ops", "      sshUser: ops"), reject(FILE));
text("config: is a list", "config:\n  - train-server:host\n  - train-server:storage\n", reject("config"));
text("config: is a string", "config: train-server\n", reject("config"));
text("config: is a number", "config: 42\n", reject("config"));
text("config: is empty", "config:\n", reject("host"));
text("no config: at all", "encryptionsalt: v1:abc\n", reject("host"));
text("the document is a list", "- config: {}\n", reject(FILE));
text("the document is a scalar", "just text\n", reject(FILE));
text("two documents", `${P}---\nconfig: {}\n`, reject(FILE));
text("alias bomb", `${P}  train-server:x0: &a [1,1,1,1,1,1,1,1,1,1]\n${Array.from({ length: 6 }, (_, i) => `  train-server:x${i + 1}: &${"b".repeat(i + 1)} [${Array(10).fill(`*${i ? "b".repeat(i) : "a"}`).join(",")}]`).join("\n")}\n`, reject(FILE));
text("undefined alias", P.replace("sshUser: ops", "sshUser: *nope"), reject(FILE));
text("unknown tag !secret", P.replace("sshUser: ops", "sshUser: !secret ops"), reject(FILE));
text("!!binary value", P.replace("model: RTX 5080", "model: !!binary UlRYIDUwODA="), reject("host.gpu.model"));
text("merge key <<", P.replace("  train-server:resources:\n", "  train-server:resources:\n    <<: {swapGb: 1}\n"), reject("resources.<<"));
text("complex key", P.replace("  train-server:domain: example.com", "  ? [train-server:domain]\n  : example.com"), reject(FILE));
text("namespace typo Train-Server:domain", P.replace("train-server:domain:", "Train-Server:domain:"), reject(/^(Train-Server:domain|domain)$/));
text("key with two colons train-server:host:extra", `${P}  train-server:host:extra: {address: 1.2.3.4}\n`, reject("host:extra"));
text("empty key train-server:", `${P}  "train-server:": 1\n`, reject("train-server:"));
text("key without namespace", `${P}  rig: true\n`, reject("rig"));
text("a secret in plain text", `${P}  train-server:sshPrivateKey: "-----BEGIN OPENSSH PRIVATE KEY-----"\n`, reject("sshPrivateKey"));
text("a secret given as secure:", `${P}  train-server:telegramBotToken:\n    secure: v1:AAAA\n`, accept("the encrypted form Pulumi writes for a secret"));
text(".nan for a number", P.replace("cpuCores: 32", "cpuCores: .nan"), reject("host.cpuCores"));
text(".inf for a number", P.replace("ramGb: 200", "ramGb: .inf"), reject("host.ramGb"));
text("an empty value (null)", P.replace("sshPort: 22", "sshPort:"), reject("host.sshPort"));
text("CRLF line endings", P.replace(/\n/g, "\r\n"), accept("Windows line endings are the same YAML"));
text("a byte order mark", `\ufeff${P}`, accept("a UTF-8 BOM is allowed by YAML"));
text("comments everywhere", P.replace(/\n/g, " # note\n"), accept("comments are not values"));
text("flow style host", P.replace(/  train-server:host:\n(    .*\n|      .*\n)+/, `  train-server:host: {address: 192.168.1.50, hostKey: "${prodConfig.host.hostKey}", sshUser: ops, lanAddress: 192.168.1.50, lanCidr: 192.168.1.0/24, cpuCores: 32, ramGb: 200, gpu: {count: 1}}\n`), accept("JSON-like flow style is the same mapping"));
text("quoted keys", P.replace("  train-server:domain:", '  "train-server:domain":'), accept("a quoted key is the same key"));
text("keys reordered", `config:\n${P.split(/\n(?=  train-server:)/).slice(1).reverse().join("\n")}\n`, accept("the order of keys does not matter"));
text("the whole file empty", "", reject("host"));
text("a very long line", P.replace("model: RTX 5080", `model: ${"R".repeat(100_000)}`), reject("host.gpu.model"));

// ------------------------------------------------------------------------------------ seeded combinations
// two rejected single mutations at once (on unrelated paths): still rejected, and one of the two is named
const related = (a: string, b: string) => a === b || a.startsWith(`${b}.`) || a.startsWith(`${b}[`) || b.startsWith(`${a}.`) || b.startsWith(`${a}[`);
const escape = (x: string) => x.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
for (let n = 0; n < 60; n++) {
  const a = pick(singles);
  const b = pick(singles);
  if (related(fmt(a.set[0]), fmt(b.set[0]))) continue;
  let combined: string;
  try {
    combined = edit("prod", [a.set, b.set]);
  } catch {
    continue; // one of them replaced a mapping by a scalar: the other's path no longer exists
  }
  add(`[combo] ${a.name} + ${b.name}`, combined, { reject: new RegExp(`^(${escape(a.want)}|${escape(b.want)})([.[]|$)`) });
}

// ------------------------------------------------------------------------------------------------ the run
type Outcome = { kind: "rejected"; issues: ConfigIssue[] } | { kind: "accepted" } | { kind: "crash"; error: string };
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ts-fuzz-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const unhandled: unknown[] = [];
const onUnhandled = (e: unknown) => void unhandled.push(e);
beforeAll(() => process.on("unhandledRejection", onUnhandled));
afterAll(() => process.off("unhandledRejection", onUnhandled));

async function run(m: Mutation, n: number): Promise<Outcome> {
  const stack = `fz-${n}`;
  fs.writeFileSync(path.join(dir, `Pulumi.${stack}.yaml`), m.text);
  const before = unhandled.length;
  try {
    for (const preview of [false, true]) await planStack(stack, dir, preview);
    await new Promise((r) => setImmediate(r));
    if (unhandled.length > before) return { kind: "crash", error: `unhandled rejection: ${String((unhandled[before] as Error)?.message ?? unhandled[before])}` };
    return { kind: "accepted" };
  } catch (e) {
    if (e instanceof ConfigError) return { kind: "rejected", issues: e.issues };
    return { kind: "crash", error: `${(e as Error)?.constructor?.name}: ${(e as Error)?.message ?? String(e)}` };
  }
}

/** Whether an issue names the expected path: that path, one under or above it, or (a collision) in its message. */
function names(issue: ConfigIssue, want: string | RegExp, file: string): boolean {
  if (want instanceof RegExp) return want.test(issue.path) || (want === FILE && issue.path.startsWith(file));
  const p = issue.path;
  return p === want || p.startsWith(`${want}.`) || p.startsWith(`${want}[`) || want.startsWith(`${p}.`) || want.startsWith(`${p}[`) || issue.message.includes(want);
}

const figures = { run: 0, rejectedWithPath: 0, accepted: 0, crashes: 0 };
const acceptedList: string[] = [];

describe(`config fuzz: ${mutations.length} mutations of the stack files from seed 0x${SEED.toString(16)}`, () => {
  test("at least 300 mutations, all distinct", () => {
    expect(mutations.length).toBeGreaterThanOrEqual(300);
    expect(new Set(mutations.map((m) => m.text)).size).toBeGreaterThan(mutations.length * 0.95);
  });

  test.each(mutations.map((m, i) => [m.name, m, i] as const))("%s", async (_name, m, i) => {
    const out = await run(m, i);
    figures.run++;
    if (out.kind === "crash") {
      figures.crashes++;
      throw new Error(`crash (not a ConfigError): ${out.error}`);
    }
    if (out.kind === "accepted") {
      figures.accepted++;
      acceptedList.push(`${m.name} — ${"accept" in m.expect ? m.expect.accept : "(UNEXPECTED)"}`);
      expect({ outcome: "accepted" }).toEqual({ outcome: "accept" in m.expect ? "accepted" : `rejected naming ${String((m.expect as { reject: unknown }).reject)}` });
      return;
    }
    const file = `Pulumi.fz-${i}.yaml`;
    const want = "reject" in m.expect ? m.expect.reject : undefined;
    const named = want !== undefined && out.issues.some((x) => names(x, want, file));
    const unnamed = out.issues.filter((x) => !x.path || !x.message);
    if (named && !unnamed.length) figures.rejectedWithPath++;
    expect({ outcome: "rejected", named, unnamed, issues: out.issues }).toEqual({ outcome: want === undefined ? "accepted" : "rejected", named: true, unnamed: [], issues: out.issues });
  });

  afterAll(() => {
    console.log(
      [
        `config fuzz (seed 0x${SEED.toString(16)}): mutations run ${figures.run}, rejected with a path ${figures.rejectedWithPath}, accepted ${figures.accepted}, crashes ${figures.crashes}`,
        "accepted:",
        ...acceptedList.map((a) => `  ${a}`),
      ].join("\n"),
    );
  });
});
