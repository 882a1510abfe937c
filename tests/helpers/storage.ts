/**
 * Helpers for the storage.sh host tests: loop devices that are safe to detach in the middle of a test,
 * the script's environment, and read-backs of the array (profiles, subvolumes, quotas, fstab).
 */
import { spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { Scratch, bash, checksumTree, sh } from "./host";

export interface Loop {
  dev: string;
  file: string;
  /** Detach now (only if the loop device is still backed by our file). */
  detach(): void;
}

function backFile(dev: string): string {
  const r = spawnSync("losetup", ["-nO", "BACK-FILE", dev], { encoding: "utf8" });
  return r.status === 0 ? r.stdout.trim() : "";
}

/**
 * A sparse file of `sizeMb` on a fresh loop device. Unlike Scratch.loopDevice it may be detached during the
 * test (a missing disk): cleanup only detaches the device while it is still backed by our file, so a loop
 * number reused by someone else in the meantime is never touched. Before detaching, btrfs forgets it.
 */
export function attachLoop(s: Scratch, sizeMb = 300): Loop {
  const file = path.join(s.dir, `disk-${crypto.randomBytes(4).toString("hex")}.img`);
  sh("truncate", ["-s", `${sizeMb}M`, file]);
  return attachFile(s, file);
}

/** Attach an existing backing `file` to a fresh loop device: a disk plugged in again, maybe under another name. */
export function attachFile(s: Scratch, file: string): Loop {
  const dev = sh("losetup", ["-f", "--show", file]).trim();
  const detach = (): void => {
    if (backFile(dev) !== file) return;
    spawnSync("btrfs", ["device", "scan", "--forget", dev], { stdio: "ignore" });
    spawnSync("losetup", ["-d", dev]);
  };
  s.onCleanup(detach);
  return { dev, file, detach };
}

/** Environment of storage.sh for a test array; a unique label, mountpoint and fstab inside the scratch dir. */
export function storageEnv(s: Scratch, devices: string[], over: Record<string, string> = {}): Record<string, string> {
  const fstab = path.join(s.dir, "fstab");
  if (!fs.existsSync(fstab)) {
    fs.writeFileSync(fstab, "# test fstab\nUUID=0000-not-ours /mnt/elsewhere ext4 defaults 0 2\n");
  }
  const mountpoint = path.join(s.dir, "mnt");
  s.mountedAt(mountpoint);
  return {
    TS_DEVICES: devices.join(" "),
    TS_DATA_PROFILE: "raid1",
    TS_METADATA_PROFILE: "raid1",
    TS_CACHE_DEVICE: "",
    TS_CACHE_MODE: "none",
    TS_MOUNTPOINT: mountpoint,
    TS_LABEL: `ts-test-${crypto.randomBytes(3).toString("hex")}`,
    TS_MOUNT_OPTIONS: "noatime,compress=zstd:3,space_cache=v2",
    TS_SUBVOLUMES: "homes workspaces shared cache cache/pip cache/huggingface snapshots",
    TS_ALLOW_WIPE: "0",
    TS_CONVERT_PROFILE: "0",
    TS_FSTAB: fstab,
    ...over,
  };
}

/** Exit code of `blkid -p` (2 = no signature at all). */
export function blkidRc(dev: string): number {
  return spawnSync("blkid", ["-p", dev]).status ?? -1;
}

export function blkidValue(dev: string, tag: string): string {
  return spawnSync("blkid", ["-p", "-s", tag, "-o", "value", dev], { encoding: "utf8" }).stdout.trim();
}

export function isMountpoint(dir: string): boolean {
  return spawnSync("mountpoint", ["-q", dir]).status === 0;
}

/** Kernel mount options of the filesystem mounted at `dir`. */
export function mountOptions(dir: string): string[] {
  return sh("findmnt", ["-rn", "-M", dir, "-o", "OPTIONS"]).trim().split(",");
}

/** Profiles per chunk type from `btrfs filesystem df` (lowercase, sorted, comma-joined when mixed). */
export function profiles(mp: string): { data: string; metadata: string; system: string } {
  const out: Record<string, Set<string>> = {};
  for (const line of sh("btrfs", ["filesystem", "df", mp]).split("\n")) {
    const m = /^(\w+), (\w+):/.exec(line);
    if (m) (out[m[1]] ??= new Set()).add(m[2].toLowerCase());
  }
  const get = (k: string): string => [...(out[k] ?? [])].sort().join(",");
  return { data: get("Data"), metadata: get("Metadata"), system: get("System") };
}

/** Subvolume paths under the top level of `mp`, with their ids. */
export function subvolumes(mp: string): Map<string, string> {
  const map = new Map<string, string>();
  for (const line of sh("btrfs", ["subvolume", "list", mp]).split("\n")) {
    const m = /^ID (\d+) .* path (.+)$/.exec(line);
    if (m) map.set(m[2], m[1]);
  }
  return map;
}

/** qgroup ids (0/<subvolid>) listed by `btrfs qgroup show`; throws when quotas are disabled. */
export function qgroups(mp: string): Set<string> {
  const out = sh("btrfs", ["qgroup", "show", mp]);
  return new Set(out.split("\n").map((l) => l.split(/\s+/)[0]).filter((id) => /^0\/\d+$/.test(id)));
}

/** Non-comment fstab lines whose mountpoint is `mp`. */
export function fstabLinesFor(fstab: string, mp: string): string[] {
  return fs
    .readFileSync(fstab, "utf8")
    .split("\n")
    .filter((l) => l.trim() && !l.startsWith("#") && l.split(/\s+/)[1] === mp);
}

/** A short digest of a checksum tree (for the report table), and the tree itself. */
export function treeDigest(root: string): { tree: Record<string, string>; digest: string } {
  const tree = checksumTree(root);
  const digest = crypto.createHash("sha256").update(JSON.stringify(Object.entries(tree).sort())).digest("hex").slice(0, 12);
  return { tree, digest };
}

/** Make an ext4 with a random file on `dev`; returns its checksum tree (read through a temporary mount). */
export function makeExt4WithData(s: Scratch, dev: string): Record<string, string> {
  sh("mkfs.ext4", ["-q", "-L", "foreign", dev]);
  return withMount(s, dev, (dir) => {
    const r = bash(`head -c 3M /dev/urandom > '${dir}/precious.bin' && sync`);
    if (r.status !== 0) throw new Error(r.stderr);
    return checksumTree(dir);
  });
}

/** Mount `dev` on a temporary directory, run `fn`, unmount. */
export function withMount<T>(s: Scratch, dev: string, fn: (dir: string) => T): T {
  const dir = fs.mkdtempSync(path.join(s.dir, "m-"));
  sh("mount", [dev, dir]);
  try {
    return fn(dir);
  } finally {
    sh("umount", [dir]);
  }
}
