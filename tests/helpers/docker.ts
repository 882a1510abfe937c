/**
 * A private dockerd for host tests, isolated from anything else on the machine:
 *   - data root on a fresh btrfs loop device (the btrfs storage driver, as on the server), exec root, socket,
 *     pidfile and daemon config in the test's Scratch dir, containers under their own cgroup parent;
 *   - its own bridge (made here, 10.231.x.1/24) and --iptables=false --ip-masq=false --ip-forward=false, so the
 *     host's iptables, FORWARD policy and ip_forward are never touched; published ports go through docker-proxy
 *     (userland proxy), which needs none of them. Builds run with --network host to reach Debian's archive.
 * Everything is released through the Scratch (containers, dockerd by pid, mounts under the scratch dir, the
 * bridge, the cgroup parent, the loop device). `hostNetState()` lets a test prove the host is as it was.
 * Also: a cached debootstrap rootfs (keyed by its inputs) to `docker import` as a base image.
 */
import { spawn, spawnSync, SpawnSyncReturns } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { Scratch, sh } from "./host";

export const TEST_CACHE = "/var/cache/train-server-test";

export interface Run {
  status: number;
  stdout: string;
  stderr: string;
}

const asRun = (r: SpawnSyncReturns<string>): Run => ({
  status: r.status ?? -1,
  stdout: r.stdout ?? "",
  stderr: (r.stderr ?? "") + (r.error ? String(r.error) : ""),
});

/** What a debootstrap rootfs is made of; the cache key is a hash of all of it. */
export interface RootfsSpec {
  suite: string;
  variant: "minbase" | "buildd";
  mirror: string;
  include: string[];
}

export const BOOKWORM_MINBASE: RootfsSpec = { suite: "bookworm", variant: "minbase", mirror: "http://deb.debian.org/debian", include: [] };
/** guacd with its VNC client (Debian's 1.3.0: bookworm has no guacd, bullseye's is the newest Debian package). */
export const GUACD_ROOTFS: RootfsSpec = { suite: "bullseye", variant: "minbase", mirror: "http://deb.debian.org/debian", include: ["guacd", "libguac-client-vnc0"] };

/** Key of a rootfs spec (also part of any cache key derived from it). */
export function rootfsKey(spec: RootfsSpec): string {
  const canon = JSON.stringify({ ...spec, include: [...spec.include].sort() });
  return crypto.createHash("sha256").update(canon).digest("hex").slice(0, 16);
}

/** The rootfs for `spec`, made once with debootstrap (~30 s for minbase) and cached under TEST_CACHE. */
export function ensureDebootstrapRootfs(spec: RootfsSpec): string {
  const dir = path.join(TEST_CACHE, `rootfs-${spec.suite}-${spec.variant}-${rootfsKey(spec)}`);
  if (fs.existsSync(path.join(dir, "etc", "os-release"))) return dir;
  fs.mkdirSync(TEST_CACHE, { recursive: true });
  const tmp = `${dir}.tmp-${process.pid}`;
  const args = [`--variant=${spec.variant}`, ...(spec.include.length ? [`--include=${[...spec.include].sort().join(",")}`] : []), spec.suite, tmp, spec.mirror];
  const r = asRun(spawnSync("debootstrap", args, { encoding: "utf8", maxBuffer: 64 * 1024 * 1024 }));
  if (r.status !== 0) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw new Error(`debootstrap ${args.join(" ")} failed: ${r.stderr.slice(-2000)}`);
  }
  fs.rmSync(dir, { recursive: true, force: true });
  fs.renameSync(tmp, dir);
  return dir;
}

/** The host's network state a private dockerd must leave as it found it. */
export interface HostNetState {
  ipForward: string;
  forwardPolicy: string;
  /** iptables-save lines mentioning Docker (chains DOCKER*, docker0). */
  dockerRules: string[];
  /** Names of the host's network links. */
  links: string[];
}

export function hostNetState(): HostNetState {
  const save = spawnSync("iptables-save", [], { encoding: "utf8" }).stdout ?? "";
  const policy = /^:FORWARD (\S+)/m.exec(save)?.[1] ?? "(none)";
  return {
    ipForward: fs.readFileSync("/proc/sys/net/ipv4/ip_forward", "utf8").trim(),
    forwardPolicy: policy,
    dockerRules: save.split("\n").filter((l) => /docker/i.test(l)),
    links: (spawnSync("ip", ["-o", "link", "show"], { encoding: "utf8" }).stdout ?? "")
      .split("\n")
      .map((l) => /^\d+: ([^:@]+)/.exec(l)?.[1])
      .filter((n): n is string => !!n)
      .sort(),
  };
}

/** Mountpoints at or below `dir` in this mount namespace, deepest first. */
function mountsUnder(dir: string): string[] {
  const real = fs.realpathSync(dir);
  return fs
    .readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .map((l) => l.split(" ")[4])
    .filter((m): m is string => !!m && (m === real || m.startsWith(real + "/")))
    .map((m) => m.replace(/\\040/g, " "))
    .sort((a, b) => b.length - a.length);
}

function unmountAllUnder(dir: string): void {
  if (!fs.existsSync(dir)) return;
  for (const m of mountsUnder(dir)) {
    if (spawnSync("umount", [m]).status !== 0) spawnSync("umount", ["-l", m]);
  }
}

/**
 * `docker run` flags for a privileged container. Where this machine's capability bounding set is complete that is
 * `--privileged`. Some VMs (this test machine) lack CAP_SYS_RESOURCE in the bounding set, and runc then refuses a
 * privileged container ("unable to apply caps"); there the closest equivalent is used: every capability but the
 * missing one, no seccomp/AppArmor confinement, unmasked /proc and /sys paths, all devices allowed. Any other missing
 * capability throws: the test would no longer describe what production runs.
 */
export function privilegedRunArgs(): string[] {
  const bnd = BigInt(`0x${/^CapBnd:\s*([0-9a-f]+)$/m.exec(fs.readFileSync("/proc/self/status", "utf8"))![1]}`);
  const last = Number(fs.readFileSync("/proc/sys/kernel/cap_last_cap", "utf8").trim());
  const missing: number[] = [];
  for (let c = 0; c <= last; c++) if (((bnd >> BigInt(c)) & 1n) === 0n) missing.push(c);
  if (missing.length === 0) return ["--privileged"];
  const CAP_SYS_RESOURCE = 24;
  if (missing.some((c) => c !== CAP_SYS_RESOURCE)) throw new Error(`capabilities ${missing.join(",")} are missing from this machine's bounding set`);
  return [
    "--cap-add=ALL", "--cap-drop=SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined", "--security-opt", "systempaths=unconfined",
    "--device-cgroup-rule=a *:* rwm",
  ];
}

export interface PrivateDockerdOptions {
  /** Size of the sparse btrfs data-root image (MB). */
  dataRootMb?: number;
  /** Run with --userns-remap: a unique system user gets exactly these /etc/subuid and /etc/subgid lines (`{user}`
   * is replaced by its name); the user and its lines are removed again by the Scratch. */
  usernsRemapSubIds?: (user: string) => string;
  /** Directory name under the Scratch (default "dockerd"): two daemons in one Scratch need two names. */
  name?: string;
  /**
   * Keep the data root between runs in this sparse btrfs image file (made on first use, `dataRootMb` big): its
   * images and build cache survive, so a cache keyed by content costs nothing to load. Containers left by a killed
   * run are removed at start. One daemon at a time: a second start waits for the first one's lock.
   */
  persistentImage?: string;
}

/** Attach (and on first use create and format) the persistent data-root image; hold its lock until cleanup. */
function persistentDataRoot(scratch: Scratch, file: string, sizeMb: number): string {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const lock = fs.openSync(`${file}.lock`, "w");
  // flock(1) on the open descriptor: blocks while another run holds the image
  const r = spawnSync("flock", ["-w", "3600", "3"], { stdio: ["ignore", "inherit", "inherit", lock] }); // fd 3 in the child
  if (r.status !== 0) throw new Error(`${file} is held by another run for over an hour`);
  scratch.onCleanup(() => fs.closeSync(lock));
  const fresh = !fs.existsSync(file);
  if (fresh) sh("truncate", ["-s", `${sizeMb}M`, `${file}.tmp`]);
  const dev = sh("losetup", ["-f", "--show", fresh ? `${file}.tmp` : file]).trim();
  scratch.onCleanup(() => void spawnSync("losetup", ["-d", dev]));
  if (fresh) {
    sh("mkfs.btrfs", ["-q", dev]);
    fs.renameSync(`${file}.tmp`, file); // the loop device follows the inode
  }
  return dev;
}

/** Append `lines` to /etc/subuid and /etc/subgid for a new unique system user; undone by the Scratch. */
function remapUser(scratch: Scratch, id: string, lines: (user: string) => string): string {
  const user = `tsremap${id.slice(0, 8)}`;
  sh("useradd", ["-r", "-M", "-s", "/usr/sbin/nologin", user]);
  scratch.onCleanup(() => void spawnSync("userdel", [user]));
  for (const f of ["/etc/subuid", "/etc/subgid"]) {
    fs.appendFileSync(f, lines(user));
    scratch.onCleanup(() => {
      const keep = fs.readFileSync(f, "utf8").split("\n").filter((l) => !l.startsWith(`${user}:`));
      fs.writeFileSync(f, keep.join("\n"));
    });
  }
  return user;
}

export class PrivateDockerd {
  /** unix socket path (use with `docker -H unix://…`). */
  readonly sock: string;
  /** The mounted btrfs filesystem; `docker/` in it is the data root, the rest is free for test data. */
  readonly btrfs: string;
  readonly bridge: string;
  /** The bridge's address (gateway of the containers). */
  readonly gateway: string;
  readonly cgroupParent: string;
  readonly log: string;
  private pid = 0;

  private constructor(scratch: Scratch, id: string, name = "dockerd") {
    const base = path.join(scratch.dir, name);
    fs.mkdirSync(base);
    this.sock = path.join(base, "docker.sock");
    this.btrfs = path.join(base, "btrfs");
    this.log = path.join(base, "dockerd.log");
    this.bridge = `tsws${id.slice(0, 8)}`;
    this.gateway = `10.231.${parseInt(id.slice(8, 10), 16)}.1`;
    this.cgroupParent = `/ts-ws-${id}`;
  }

  /** Start dockerd and wait until it answers (≈1 s). Everything is undone by `scratch.cleanup()`. */
  static start(scratch: Scratch, opts: PrivateDockerdOptions = {}): PrivateDockerd {
    const id = crypto.randomBytes(5).toString("hex");
    const d = new PrivateDockerd(scratch, id, opts.name);
    const base = path.dirname(d.sock);
    // data root: btrfs on a loop device
    const dev = opts.persistentImage ? persistentDataRoot(scratch, opts.persistentImage, opts.dataRootMb ?? 8192) : scratch.loopDevice(opts.dataRootMb ?? 8192);
    if (!opts.persistentImage) sh("mkfs.btrfs", ["-q", dev]);
    fs.mkdirSync(d.btrfs);
    sh("mount", [dev, d.btrfs]);
    scratch.mountedAt(d.btrfs);
    if (!fs.existsSync(path.join(d.btrfs, "docker"))) sh("btrfs", ["-q", "subvolume", "create", path.join(d.btrfs, "docker")]);
    // the bridge, ours alone
    if (hostNetState().links.includes(d.bridge)) throw new Error(`bridge ${d.bridge} already exists`);
    if (spawnSync("ip", ["-4", "-o", "addr"], { encoding: "utf8" }).stdout.includes(d.gateway.replace(/\.1$/, "."))) {
      throw new Error(`subnet of ${d.gateway} is in use on this host; run again`);
    }
    sh("ip", ["link", "add", d.bridge, "type", "bridge"]);
    scratch.onCleanup(() => void spawnSync("ip", ["link", "del", d.bridge]));
    sh("ip", ["addr", "add", `${d.gateway}/24`, "dev", d.bridge]);
    sh("ip", ["link", "set", d.bridge, "up"]);
    scratch.onCleanup(() => d.removeCgroupParent());

    // the remapped root must reach its data root: o+x on every directory above it (dockerd checks)
    if (opts.usernsRemapSubIds) fs.chmodSync(scratch.dir, 0o711);
    const config = path.join(base, "daemon.json");
    fs.writeFileSync(config, "{}\n");
    const args = [
      `--config-file=${config}`,
      `--data-root=${path.join(d.btrfs, "docker")}`,
      `--exec-root=${path.join(base, "exec")}`,
      `--host=unix://${d.sock}`,
      `--pidfile=${path.join(base, "docker.pid")}`,
      `--bridge=${d.bridge}`,
      "--iptables=false",
      "--ip-masq=false",
      "--ip-forward=false",
      "--storage-driver=btrfs",
      `--cgroup-parent=${d.cgroupParent}`,
      ...(opts.usernsRemapSubIds ? [`--userns-remap=${remapUser(scratch, id, opts.usernsRemapSubIds)}`] : []),
    ];
    const log = fs.openSync(d.log, "w");
    const child = spawn("dockerd", args, { stdio: ["ignore", log, log], detached: true });
    fs.closeSync(log);
    d.pid = child.pid ?? 0;
    child.unref();
    scratch.onCleanup(() => d.stop());
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      if (d.docker(["version", "--format", "{{.Server.Version}}"]).status === 0) {
        if (opts.persistentImage) {
          const left = d.docker(["ps", "-aq"]).stdout.split("\n").filter(Boolean);
          if (left.length > 0) d.docker(["rm", "-f", "-v", ...left], { timeoutMs: 300_000 });
        }
        return d;
      }
      if (spawnSync("kill", ["-0", String(d.pid)]).status !== 0) break;
      spawnSync("sleep", ["0.2"]);
    }
    throw new Error(`dockerd did not come up: ${fs.readFileSync(d.log, "utf8").slice(-3000)}`);
  }

  /** Run the docker CLI against this daemon (legacy builder: BuildKit is off). */
  docker(args: string[], opts: { input?: string | Buffer; timeoutMs?: number } = {}): Run {
    return asRun(
      spawnSync("docker", ["-H", `unix://${this.sock}`, ...args], {
        encoding: "utf8",
        input: opts.input,
        timeout: opts.timeoutMs ?? 120_000,
        maxBuffer: 256 * 1024 * 1024,
        env: { ...process.env, DOCKER_BUILDKIT: "0", DOCKER_CONFIG: path.join(path.dirname(this.sock), "client") },
      }),
    );
  }

  /** docker …, throwing with its stderr on failure; returns stdout. */
  dockerOk(args: string[], opts: { input?: string | Buffer; timeoutMs?: number } = {}): string {
    const r = this.docker(args, opts);
    if (r.status !== 0) throw new Error(`docker ${args.join(" ")} failed (${r.status}): ${r.stderr.slice(-3000)}`);
    return r.stdout;
  }

  /** Import a rootfs directory as an image (`tar -C dir -c . | docker import - tag`). */
  importRootfs(dir: string, tag: string): void {
    const r = spawnSync("bash", ["-c", 'set -o pipefail; tar -C "$1" -c . | docker -H "unix://$2" import - "$3"', "_", dir, this.sock, tag], {
      encoding: "utf8",
      maxBuffer: 16 * 1024 * 1024,
    });
    if (r.status !== 0) throw new Error(`docker import of ${dir} failed: ${r.stderr}`);
  }

  /** Stop every container, then dockerd (SIGTERM, SIGKILL after 30 s), then release what it left mounted. */
  stop(): void {
    if (this.pid && spawnSync("kill", ["-0", String(this.pid)]).status === 0) {
      const ids = this.docker(["ps", "-aq"], { timeoutMs: 30_000 }).stdout.split("\n").filter(Boolean);
      if (ids.length) this.docker(["rm", "-f", ...ids], { timeoutMs: 120_000 });
      spawnSync("kill", ["-TERM", String(this.pid)]);
      const deadline = Date.now() + 30_000;
      while (Date.now() < deadline && spawnSync("kill", ["-0", String(this.pid)]).status === 0) spawnSync("sleep", ["0.2"]);
      if (spawnSync("kill", ["-0", String(this.pid)]).status === 0) spawnSync("kill", ["-KILL", String(this.pid)]);
      // the managed containerd is dockerd's child: make sure it is gone too
      const pidfile = path.join(path.dirname(this.sock), "exec", "containerd", "containerd.pid");
      if (fs.existsSync(pidfile)) {
        const cpid = fs.readFileSync(pidfile, "utf8").trim();
        if (/^\d+$/.test(cpid) && fs.existsSync(`/proc/${cpid}/cmdline`) && fs.readFileSync(`/proc/${cpid}/cmdline`, "utf8").includes(this.sock.replace(/docker\.sock$/, ""))) {
          spawnSync("kill", ["-TERM", cpid]);
        }
      }
    }
    this.pid = 0;
    // netns bind mounts under the exec root, leftovers of a killed daemon; never the btrfs mount itself here
    unmountAllUnder(path.join(path.dirname(this.sock), "exec"));
    for (const m of mountsUnder(this.btrfs).filter((m) => m !== fs.realpathSync(this.btrfs))) {
      if (spawnSync("umount", [m]).status !== 0) spawnSync("umount", ["-l", m]);
    }
  }

  /** rmdir our cgroup parent (depth first) in every cgroup hierarchy. */
  private removeCgroupParent(): void {
    const rm = (dir: string): void => {
      if (!fs.existsSync(dir)) return;
      for (const e of fs.readdirSync(dir, { withFileTypes: true })) if (e.isDirectory()) rm(path.join(dir, e.name));
      try {
        fs.rmdirSync(dir);
      } catch {
        /* still in use: left for the kernel to report */
      }
    };
    for (const h of fs.readdirSync("/sys/fs/cgroup")) rm(path.join("/sys/fs/cgroup", h, this.cgroupParent));
    rm(path.join("/sys/fs/cgroup", this.cgroupParent));
  }

  /** cgroup directories of ours still present (empty after a clean stop). */
  leftoverCgroups(): string[] {
    const out: string[] = [];
    for (const h of fs.readdirSync("/sys/fs/cgroup")) {
      const p = path.join("/sys/fs/cgroup", h, this.cgroupParent);
      if (fs.existsSync(p)) out.push(p);
    }
    return out;
  }
}
