/**
 * Helpers for host tests: run host scripts for real, make and clean up loop devices and scratch dirs.
 * Every resource a test makes is recorded and released by `cleanup()` (call it in afterAll/afterEach);
 * nothing here touches loop devices, mounts or files it did not create.
 */
import { execFileSync, spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { parseResults } from "../../components/host";

export const REPO = path.resolve(__dirname, "..", "..");
export const HOST_SCRIPTS = path.join(REPO, "host-scripts");

export interface ScriptRun {
  status: number;
  stdout: string;
  stderr: string;
  /** `key=value` lines of stdout (the host-script result contract, see host-scripts/lib.sh). */
  results: Record<string, string>;
  /** The `changes=N` count the script reported (NaN if absent). */
  changes: number;
}

/** Run `bash host-scripts/<name>.sh <action>` with exactly `env` (plus PATH) and return what it did. */
export function runScript(name: string, action: string, env: Record<string, string>, timeoutMs = 300_000): ScriptRun {
  const r = spawnSync("bash", [path.join(HOST_SCRIPTS, `${name}.sh`), action], {
    env: { PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin", LANG: "C.UTF-8", ...env },
    encoding: "utf8",
    timeout: timeoutMs,
    maxBuffer: 64 * 1024 * 1024,
  });
  const results = parseResults(r.stdout);
  return {
    status: r.status ?? -1,
    stdout: r.stdout ?? "",
    stderr: (r.stderr ?? "") + (r.error ? String(r.error) : ""),
    results,
    changes: results.changes === undefined ? NaN : Number(results.changes),
  };
}

/** Run a command and return stdout; throws with stderr on failure. */
/** Sleep `s` seconds (fractions allowed), blocking: for polling loops in synchronous tests. */
export const sleep = (s: number): void => void spawnSync("sleep", [String(s)]);

/** Named wall-clock durations (s) a test prints at the end: `timed(what, fn)` records one and returns fn's result. */
export function stopwatch(): { timings: Record<string, number>; timed: <T>(what: string, fn: () => T) => T } {
  const timings: Record<string, number> = {};
  const timed = <T>(what: string, fn: () => T): T => {
    const t = Date.now();
    try {
      return fn();
    } finally {
      timings[what] = (Date.now() - t) / 1000;
    }
  };
  return { timings, timed };
}

export function sh(cmd: string, args: string[] = [], input?: string): string {
  return execFileSync(cmd, args, { encoding: "utf8", input, stdio: ["pipe", "pipe", "pipe"], maxBuffer: 64 * 1024 * 1024 });
}

/** Run a shell command line; returns status and output without throwing. */
export function bash(line: string): { status: number; stdout: string; stderr: string } {
  const r = spawnSync("bash", ["-c", line], { encoding: "utf8", maxBuffer: 64 * 1024 * 1024 });
  return { status: r.status ?? -1, stdout: r.stdout ?? "", stderr: r.stderr ?? "" };
}

/** Tracks what a test made so that it can be released in reverse order. */
export class Scratch {
  private readonly undo: Array<() => void> = [];
  readonly dir: string;

  constructor(prefix = "ts-test-") {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
    this.undo.push(() => fs.rmSync(this.dir, { recursive: true, force: true }));
  }

  /** A sparse backing file of `sizeMb` attached to a fresh loop device; returns the device path. */
  loopDevice(sizeMb = 512): string {
    const file = path.join(this.dir, `disk-${crypto.randomBytes(4).toString("hex")}.img`);
    sh("truncate", ["-s", `${sizeMb}M`, file]);
    const dev = sh("losetup", ["-f", "--show", file]).trim();
    this.undo.push(() => {
      spawnSync("losetup", ["-d", dev]);
    });
    return dev;
  }

  /**
   * A scratch BTRFS filesystem on one fresh loop device of `sizeMb`, mounted at `<scratch>/<name>` (unmounted at
   * cleanup), with `subvolumes` created (parents made as plain directories). Returns the mountpoint.
   */
  btrfsArray(opts: { sizeMb?: number; name?: string; mountOptions?: string; quota?: boolean; subvolumes?: string[] } = {}): string {
    const dev = this.loopDevice(opts.sizeMb ?? 1024);
    sh("mkfs.btrfs", ["-q", dev]);
    const mnt = path.join(this.dir, opts.name ?? "mnt");
    fs.mkdirSync(mnt, { recursive: true });
    sh("mount", [...(opts.mountOptions ? ["-o", opts.mountOptions] : []), dev, mnt]);
    this.mountedAt(mnt);
    if (opts.quota) sh("btrfs", ["quota", "enable", mnt]);
    for (const sv of opts.subvolumes ?? []) {
      fs.mkdirSync(path.join(mnt, path.dirname(sv)), { recursive: true });
      sh("btrfs", ["-q", "subvolume", "create", path.join(mnt, sv)]);
    }
    return mnt;
  }

  /** Register a mountpoint to unmount (lazily, if busy) at cleanup. */
  mountedAt(mountpoint: string): void {
    this.undo.push(() => {
      if (spawnSync("mountpoint", ["-q", mountpoint]).status === 0) {
        if (spawnSync("umount", [mountpoint]).status !== 0) spawnSync("umount", ["-l", mountpoint]);
      }
    });
  }

  /** Register any other undo step. */
  onCleanup(fn: () => void): void {
    this.undo.push(fn);
  }

  cleanup(): void {
    while (this.undo.length) {
      const fn = this.undo.pop()!;
      try {
        fn();
      } catch {
        /* keep releasing the rest */
      }
    }
  }
}

/** sha256 of every regular file under `root`, keyed by relative path (for "data intact" assertions). */
export function checksumTree(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (dir: string): void => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile()) out[path.relative(root, p)] = crypto.createHash("sha256").update(fs.readFileSync(p)).digest("hex");
    }
  };
  walk(root);
  return out;
}

/** Write `mb` megabytes of incompressible data (btrfs qgroup tests need it under compress=zstd). */
export function writeRandomFile(file: string, mb: number): void {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const fd = fs.openSync(file, "w");
  try {
    for (let i = 0; i < mb; i++) fs.writeSync(fd, crypto.randomBytes(1024 * 1024));
  } finally {
    fs.closeSync(fd);
  }
}

/** users.sh's inputs for a test: the array at `mp`, its state dir, the shared group, and the TS_USERS lines. */
export function usersEnv(p: { mp: string; stateDir: string; shared: { group: string; gid: number } }, users: string[]): Record<string, string> {
  return {
    TS_MOUNTPOINT: p.mp,
    TS_USERS: users.join("\n"),
    TS_STATE_DIR: p.stateDir,
    TS_SHARED_GROUP: p.shared.group,
    TS_SHARED_GID: String(p.shared.gid),
    TS_RESTORE_SPOOL: path.join(path.dirname(p.stateDir), "restore"),
  };
}
