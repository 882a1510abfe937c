/**
 * A booted systemd container for host tests that need a real init (services, reloads, UFW, Docker):
 * a Debian bookworm rootfs made once with debootstrap and cached under /var/cache/train-server-test/, booted with
 * `systemd-nspawn -b` on a throw-away overlay (the cache is never written), with its own network namespace
 * (--private-network). Commands run inside through nsenter into the container's PID 1.
 * Everything is released through the Scratch given to `start` (container stopped by pid, overlay unmounted).
 */
import { parseResults } from "../../components/host";
import { spawn, spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { HOST_SCRIPTS, Scratch, ScriptRun, sh } from "./host";

export const ROOTFS_CACHE = "/var/cache/train-server-test";
/** Packages of the cached rootfs: systemd plus what baseline.sh manages (so no apt run is needed inside). */
export const BASELINE_PACKAGES = [
  "systemd", "systemd-sysv", "dbus", "openssh-server", "ufw", "fail2ban", "iptables", "python3-systemd",
  "docker.io", "ca-certificates", "acl", "btrfs-progs",
];

/** The cached rootfs with `packages` (made with debootstrap the first time: ~60-90 s). Returns its path. */
export function ensureRootfs(name: string, packages: string[]): string {
  const dir = path.join(ROOTFS_CACHE, name);
  const stamp = path.join(ROOTFS_CACHE, `${name}.packages`);
  const want = [...packages].sort().join(",");
  if (fs.existsSync(dir) && fs.existsSync(stamp) && fs.readFileSync(stamp, "utf8") === want) return dir;
  const tmp = `${dir}.tmp-${process.pid}`;
  fs.mkdirSync(ROOTFS_CACHE, { recursive: true });
  const r = spawnSync("debootstrap", ["--variant=minbase", `--include=${want}`, "bookworm", tmp, "http://deb.debian.org/debian"], {
    encoding: "utf8",
    maxBuffer: 64 * 1024 * 1024,
  });
  if (r.status !== 0) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw new Error(`debootstrap failed: ${r.stderr}`);
  }
  fs.rmSync(dir, { recursive: true, force: true });
  fs.renameSync(tmp, dir);
  fs.writeFileSync(stamp, want);
  return dir;
}

export interface ExecResult {
  status: number;
  stdout: string;
  stderr: string;
}

export class NspawnContainer {
  /** The container's root as seen from the host (the overlay's merged dir). */
  readonly root: string;
  nspawnPid = 0;
  leader = 0;

  private constructor(root: string) {
    this.root = root;
  }

  /** Boot `rootfs` (read-only lower layer) with `binds` ("host:container" paths); waits for systemd to settle. */
  static start(scratch: Scratch, rootfs: string, binds: string[] = []): NspawnContainer {
    const base = fs.mkdtempSync(path.join(scratch.dir, "nspawn-"));
    const [upper, work, merged] = ["upper", "work", "merged"].map((d) => path.join(base, d));
    [upper, work, merged].forEach((d) => fs.mkdirSync(d));
    sh("mount", ["-t", "overlay", "overlay", "-o", `lowerdir=${rootfs},upperdir=${upper},workdir=${work}`, merged]);
    scratch.mountedAt(merged);
    const c = new NspawnContainer(merged);
    const args = ["-q", "-b", "-D", merged, "--register=no", "--keep-unit", "--private-network", `-M`, `ts${process.pid}`];
    for (const b of binds) args.push(`--bind=${b}`);
    bootNspawn(scratch, c, args, path.join(base, "console.log"), 30_000);
    return c;
  }

  /** Run a command inside the container (all its namespaces), with a clean environment plus `env`. */
  exec(cmd: string[], env: Record<string, string> = {}, input?: string): ExecResult {
    return nsExec(this.leader, cmd, env, input);
  }

  /** exec, throwing on a non-zero exit; returns stdout. */
  run(cmd: string[], env: Record<string, string> = {}): string {
    const r = this.exec(cmd, env);
    if (r.status !== 0) throw new Error(`${cmd.join(" ")} failed (${r.status}): ${r.stderr}`);
    return r.stdout;
  }

  /** Copy the current host-scripts into the container and run `bash <name>.sh <action>` there with `env`. */
  runScript(name: string, action: string, env: Record<string, string>): ScriptRun {
    const dest = path.join(this.root, "root/host-scripts");
    fs.rmSync(dest, { recursive: true, force: true });
    fs.cpSync(HOST_SCRIPTS, dest, { recursive: true });
    const r = this.exec(["bash", `/root/host-scripts/${name}.sh`, action], env);
    const results = parseResults(r.stdout);
    return { ...r, results, changes: results.changes === undefined ? NaN : Number(results.changes) };
  }

  /**
   * Stop the container: SIGKILL to its PID 1 ends every process of its PID namespace at once (a throw-away
   * container needs no clean shutdown; a polite poweroff takes ~20 s here), then nspawn exits by itself.
   */
  stop(): void {
    if (!this.nspawnPid) return;
    killNspawn(this.nspawnPid, this.leader);
    this.nspawnPid = 0;
  }
}

/** A booted container's handle: the nspawn process, its PID 1, and how to stop it. */
export interface NspawnHandle {
  nspawnPid: number;
  leader: number;
  stop(): void;
}

/**
 * Start `systemd-nspawn <args>` detached (console to `logFile`), register its stop with `scratch`, and wait up to
 * `timeoutMs` for systemd inside to be running (or degraded). Sets `handle.nspawnPid` and `handle.leader`.
 */
export function bootNspawn(scratch: Scratch, handle: NspawnHandle, args: string[], logFile: string, timeoutMs: number): void {
  const log = fs.openSync(logFile, "w");
  const child = spawn("systemd-nspawn", args, { stdio: ["ignore", log, log], detached: true });
  fs.closeSync(log);
  handle.nspawnPid = child.pid ?? 0;
  child.unref();
  scratch.onCleanup(() => handle.stop());
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const kids = spawnSync("pgrep", ["-P", String(handle.nspawnPid)], { encoding: "utf8" }).stdout.trim().split("\n").filter(Boolean);
    if (kids.length === 1) {
      handle.leader = Number(kids[0]);
      const s = nsExec(handle.leader, ["systemctl", "is-system-running", "--wait"]).stdout.trim();
      if (s === "running" || s === "degraded") return;
    }
    spawnSync("sleep", ["0.2"]);
  }
  throw new Error(`container did not boot: ${fs.readFileSync(logFile, "utf8").slice(-3000)}`);
}

/** Run a command in every namespace of `leader` (a container's PID 1), with a clean environment plus `env`. */
export function nsExec(leader: number, cmd: string[], env: Record<string, string> = {}, input?: string): ExecResult {
  const envArgs = Object.entries({ PATH: "/usr/sbin:/usr/bin:/sbin:/bin", LANG: "C.UTF-8", ...env }).map(([k, v]) => `${k}=${v}`);
  const r = spawnSync("nsenter", ["-t", String(leader), "-a", "env", "-i", ...envArgs, ...cmd], {
    encoding: "utf8",
    input,
    maxBuffer: 64 * 1024 * 1024,
    timeout: 600_000,
  });
  return { status: r.status ?? -1, stdout: r.stdout ?? "", stderr: (r.stderr ?? "") + (r.error ? String(r.error) : "") };
}

/**
 * Kill a booted nspawn container: SIGKILL to its PID 1 (`leader`) ends every process of its PID namespace at
 * once, then wait for the nspawn process (`pid`) to exit, killing it too after 10 s.
 */
export function killNspawn(pid: number, leader: number): void {
  // a zombie counts as gone (node reaps its children only when the event loop runs)
  const alive = (p: number): boolean => {
    try {
      return !/^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${p}/stat`, "utf8"));
    } catch {
      return false;
    }
  };
  if (leader && alive(leader)) process.kill(leader, "SIGKILL");
  for (let i = 0; i < 50 && alive(pid); i++) spawnSync("sleep", ["0.2"]);
  if (alive(pid)) process.kill(pid, "SIGKILL");
}
