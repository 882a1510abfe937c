/**
 * A booted systemd container for host tests that need a real init (services, reloads, UFW, Docker):
 * a Debian bookworm rootfs made once with debootstrap and cached under /var/cache/train-server-test/, booted with
 * `systemd-nspawn -b` on a throw-away overlay (the cache is never written), with its own network namespace
 * (--private-network). Commands run inside through nsenter into the container's PID 1.
 * Everything is released through the Scratch given to `start` (container stopped by pid, overlay unmounted).
 */
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
  private nspawnPid = 0;
  private leader = 0;

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
    const log = fs.openSync(path.join(base, "console.log"), "w");
    const args = ["-q", "-b", "-D", merged, "--register=no", "--keep-unit", "--private-network", `-M`, `ts${process.pid}`];
    for (const b of binds) args.push(`--bind=${b}`);
    // detached, own process group: stopped by pid in cleanup
    const child = spawn("systemd-nspawn", args, { stdio: ["ignore", log, log], detached: true });
    fs.closeSync(log);
    c.nspawnPid = child.pid ?? 0;
    child.unref();
    scratch.onCleanup(() => c.stop());
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      const kids = spawnSync("pgrep", ["-P", String(c.nspawnPid)], { encoding: "utf8" }).stdout.trim().split("\n").filter(Boolean);
      if (kids.length === 1) {
        c.leader = Number(kids[0]);
        const s = c.exec(["systemctl", "is-system-running", "--wait"]).stdout.trim();
        if (s === "running" || s === "degraded") return c;
      }
      spawnSync("sleep", ["0.2"]);
    }
    throw new Error(`container did not boot: ${fs.readFileSync(path.join(base, "console.log"), "utf8").slice(-2000)}`);
  }

  /** Run a command inside the container (all its namespaces), with a clean environment plus `env`. */
  exec(cmd: string[], env: Record<string, string> = {}, input?: string): ExecResult {
    const envArgs = Object.entries({ PATH: "/usr/sbin:/usr/bin:/sbin:/bin", LANG: "C.UTF-8", ...env }).map(([k, v]) => `${k}=${v}`);
    const r = spawnSync("nsenter", ["-t", String(this.leader), "-a", "env", "-i", ...envArgs, ...cmd], {
      encoding: "utf8",
      input,
      maxBuffer: 64 * 1024 * 1024,
      timeout: 600_000,
    });
    return { status: r.status ?? -1, stdout: r.stdout ?? "", stderr: (r.stderr ?? "") + (r.error ? String(r.error) : "") };
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
    const results: Record<string, string> = {};
    for (const line of r.stdout.split("\n")) {
      const m = /^([A-Za-z0-9_.-]+)=(.*)$/.exec(line);
      if (m) results[m[1]] = m[2];
    }
    return { ...r, results, changes: results.changes === undefined ? NaN : Number(results.changes) };
  }

  /**
   * Stop the container: SIGKILL to its PID 1 ends every process of its PID namespace at once (a throw-away
   * container needs no clean shutdown; a polite poweroff takes ~20 s here), then nspawn exits by itself.
   */
  stop(): void {
    if (!this.nspawnPid) return;
    const pid = this.nspawnPid;
    this.nspawnPid = 0;
    // a zombie counts as gone (node reaps its children only when the event loop runs)
    const alive = (p: number): boolean => {
      try {
        return !/^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${p}/stat`, "utf8"));
      } catch {
        return false;
      }
    };
    if (this.leader && alive(this.leader)) process.kill(this.leader, "SIGKILL");
    for (let i = 0; i < 50 && alive(pid); i++) spawnSync("sleep", ["0.2"]);
    if (alive(pid)) process.kill(pid, "SIGKILL");
  }
}
