/**
 * The RIG: a throw-away train-server target that the program can reach over real SSH, as a bare server would be.
 *
 * A booted Debian bookworm (systemd as PID 1) in a systemd-nspawn container on a throw-away overlay of a cached
 * debootstrap rootfs (tests/helpers/nspawn.ts ensureRootfs), in its OWN network namespace joined to the host by a
 * veth pair (host 10.77.N.1/24, rig 10.77.N.2/24, N from the test's pid), with:
 *   - an `ops` account with a fresh ed25519 key and NOPASSWD sudo (what the admin sets up on a real server);
 *   - blank loop devices (the array's disks) bound in at the same /dev path, plus /dev/btrfs-control (multi-device
 *     btrfs needs its device scan) and /dev/fuse (the Drive mount);
 *   - every package the host scripts would install, preinstalled (the rig's netns has no route to the internet).
 * Everything is released through the Scratch given to `start`: container killed by pid, overlay unmounted, netns
 * and veth deleted, loop devices forgotten by btrfs and detached, key files removed with the scratch dir.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { Scratch, sh } from "./host";
import { bootNspawn, ensureRootfs, ExecResult, killNspawn, nsExec } from "./nspawn";

/** Packages of the rig's rootfs: systemd, sshd, sudo, and what baseline.sh, ops-install.sh and storage.sh use. */
export const RIG_PACKAGES = [
  "systemd", "systemd-sysv", "dbus", "openssh-server", "sudo", "iproute2", "procps", "kmod",
  // baseline.sh
  "ufw", "fail2ban", "iptables", "python3-systemd", "docker.io", "ca-certificates", "acl",
  // storage.sh (util-linux, perl-base and coreutils are in minbase)
  "btrfs-progs", "bcache-tools",
  // ops-install.sh's TS_OPS_PACKAGES
  "btrbk", "restic", "rclone", "fuse3", "jq", "smartmontools", "prometheus-node-exporter-collectors",
];

/** uid of the rig's admin account `ops`. */
export const ADMIN_UID = 60100;

export interface RigOptions {
  /** Number of array disks (loop devices). Default 2. */
  disks?: number;
  /** Size of each disk in MB. Default 512. */
  diskMb?: number;
  /** Extra systemd-nspawn options (e.g. a wider --system-call-filter for a Docker that runs containers). */
  nspawnArgs?: string[];
}

export class Rig {
  /** The rig's address in its network namespace (what the stack's host.address must be). */
  readonly address: string;
  /** The host's end of the veth: the LAN the rig's firewall must let in. */
  readonly lanCidr: string;
  /** The blank disks, as /dev paths valid both on the host and inside the rig. */
  readonly devices: string[];
  /** `ops`'s private key (OpenSSH format): the stack's sshPrivateKey secret. */
  readonly privateKey: string;
  readonly publicKey: string;
  readonly sshUser = "ops";
  /** The container's root as seen from the host. */
  readonly root: string;
  nspawnPid = 0;
  leader = 0;
  private readonly keyFile: string;

  /** The rig's sshd ed25519 host key (`ssh-ed25519 AAAA...`): what the stack's host.hostKey pins. */
  get hostKey(): string {
    const [type, b64] = fs.readFileSync(path.join(this.root, "etc", "ssh", "ssh_host_ed25519_key.pub"), "utf8").trim().split(/\s+/);
    return `${type} ${b64}`;
  }

  private constructor(f: { address: string; lanCidr: string; devices: string[]; privateKey: string; publicKey: string; root: string; keyFile: string }) {
    this.address = f.address;
    this.lanCidr = f.lanCidr;
    this.devices = f.devices;
    this.privateKey = f.privateKey;
    this.publicKey = f.publicKey;
    this.root = f.root;
    this.keyFile = f.keyFile;
  }

  /** Build (cached rootfs), wire and boot the rig; returns once `ops` can log in over SSH. */
  static start(scratch: Scratch, opts: RigOptions = {}): Rig {
    const rootfs = ensureRootfs("rig-bookworm", RIG_PACKAGES);
    const id = process.pid;
    const devices = Array.from({ length: opts.disks ?? 2 }, () => scratch.loopDevice(opts.diskMb ?? 512));
    scratch.onCleanup(() => {
      // the kernel keeps scanned btrfs devices registered: forget ours before the loop devices go
      for (const d of devices) spawnSync("btrfs", ["device", "scan", "--forget", d]);
    });

    // network: a namespace of our own, a veth pair, host .1 / rig .2
    const net = `10.77.${20 + (id % 200)}`;
    const ns = `tsrig${id}`;
    const vh = `tsrh${id % 100000}`;
    const vc = `tsrc${id % 100000}`;
    sh("ip", ["netns", "add", ns]);
    scratch.onCleanup(() => {
      spawnSync("ip", ["netns", "del", ns]);
      spawnSync("ip", ["link", "del", vh]); // normally gone with its peer's namespace
    });
    sh("ip", ["link", "add", vh, "type", "veth", "peer", "name", vc]);
    sh("ip", ["link", "set", vc, "netns", ns]);
    sh("ip", ["addr", "add", `${net}.1/24`, "dev", vh]);
    sh("ip", ["link", "set", vh, "up"]);
    for (const args of [["link", "set", "lo", "up"], ["link", "set", vc, "name", "host0"], ["addr", "add", `${net}.2/24`, "dev", "host0"], ["link", "set", "host0", "up"]]) {
      sh("ip", ["-n", ns, ...args]);
    }

    // throw-away overlay over the cached rootfs
    const base = fs.mkdtempSync(path.join(scratch.dir, "rig-"));
    const [upper, work, merged] = ["upper", "work", "merged"].map((d) => path.join(base, d));
    [upper, work, merged].forEach((d) => fs.mkdirSync(d));
    sh("mount", ["-t", "overlay", "overlay", "-o", `lowerdir=${rootfs},upperdir=${upper},workdir=${work}`, merged]);
    scratch.mountedAt(merged);

    // the admin's account, as on a fresh server: key login + passwordless sudo
    const keyFile = path.join(base, "id_ed25519");
    sh("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "rig-admin", "-f", keyFile]);
    const publicKey = fs.readFileSync(`${keyFile}.pub`, "utf8").trim();
    // a uid outside the users' range (1000..59999): on a real server, too, the admin's account must not hold a
    // uid the config gives to a user (users.sh refuses: "uid 1000 of alice already belongs to account ops")
    sh("chroot", [merged, "groupadd", "-g", String(ADMIN_UID), "ops"]);
    sh("chroot", [merged, "useradd", "-m", "-u", String(ADMIN_UID), "-g", "ops", "-s", "/bin/bash", "ops"]);
    sh("chroot", [merged, "install", "-d", "-m", "700", "-o", "ops", "-g", "ops", "/home/ops/.ssh"]);
    fs.writeFileSync(path.join(merged, "home/ops/.ssh/authorized_keys"), publicKey + "\n", { mode: 0o600 });
    sh("chroot", [merged, "chown", "ops:ops", "/home/ops/.ssh/authorized_keys"]);
    fs.writeFileSync(path.join(merged, "etc/sudoers.d/ops"), "ops ALL=(ALL) NOPASSWD: ALL\n", { mode: 0o440 });
    fs.writeFileSync(path.join(merged, "etc/hostname"), "train-rig\n");
    // Debian 12 has no /var/log/auth.log (no rsyslog), so its stock fail2ban sshd jail cannot start; Ubuntu has
    // one. Give the rig one, so that fail2ban runs before baseline.sh and after its destroy, as on Ubuntu.
    fs.writeFileSync(path.join(merged, "var/log/auth.log"), "", { mode: 0o640 });
    fs.writeFileSync(path.join(merged, "etc/hosts"), "127.0.0.1 localhost\n127.0.1.1 train-rig\n");

    const rig = new Rig({ address: `${net}.2`, lanCidr: `${net}.0/24`, devices, privateKey: fs.readFileSync(keyFile, "utf8"), publicKey, root: merged, keyFile });
    const args = ["-q", "-b", "-D", merged, "--register=no", "--keep-unit", "-M", `tsrig${id}`, `--network-namespace-path=/run/netns/${ns}`, "--private-network"];
    for (const d of [...devices, "/dev/btrfs-control", "/dev/fuse"]) args.push(`--bind=${d}`);
    // with a private network nspawn mounts only parts of sysfs; storage.sh and the usage collector read
    // /sys/fs/btrfs (which devices a mounted array holds, missing devices), as on any host
    args.push("--bind-ro=/sys/fs/btrfs");
    args.push(...(opts.nspawnArgs ?? []));
    bootNspawn(scratch, rig, args, path.join(base, "console.log"), 60_000);
    // systemd is up; wait for sshd to answer
    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline) {
      if (rig.ssh("true").status === 0) return rig;
      spawnSync("sleep", ["0.2"]);
    }
    throw new Error(`the rig booted but sshd did not answer: ${fs.readFileSync(path.join(base, "console.log"), "utf8").slice(-3000)}`);
  }

  /** Run a command inside the rig directly (nsenter into PID 1's namespaces): for looking, not for the program. */
  exec(cmd: string[], input?: string): ExecResult {
    return nsExec(this.leader, cmd, {}, input);
  }

  /** exec a bash line, throwing on a non-zero exit; returns stdout. */
  run(line: string): string {
    const r = this.exec(["bash", "-c", line]);
    if (r.status !== 0) throw new Error(`rig: \`${line}\` failed (${r.status}): ${r.stderr}`);
    return r.stdout;
  }

  /** `ssh ops@rig <command>` with the admin's key, as a user (or the program) logs in. */
  ssh(command: string, input?: string): ExecResult {
    return sshRun({ host: this.address, port: 22, user: this.sshUser, keyFile: this.keyFile }, command, input);
  }

  /** Kill the container (SIGKILL to its PID 1 ends the whole PID namespace), then make sure nspawn is gone. */
  stop(): void {
    if (!this.nspawnPid) return;
    killNspawn(this.nspawnPid, this.leader);
    this.nspawnPid = 0;
  }
}

export interface SshTarget {
  host: string;
  port: number;
  user: string;
  keyFile: string;
  /** The connection's pinned host key (`connection.hostKey`): verified as the command provider does. */
  hostKey?: string;
}

/**
 * One non-interactive SSH session running `command` (by the remote login shell) with `input` on stdin — what
 * the Pulumi command provider does for a `command.remote.Command`. Like the provider, it verifies the host key
 * only when the connection pins one (`hostKey`), and then accepts no other (the same options as dockerSshOpts).
 */
export function sshRun(t: SshTarget, command: string, input?: string, timeoutMs = 600_000): ExecResult {
  const r = spawnSync(
    "ssh",
    [
      "-T", "-i", t.keyFile, "-p", String(t.port),
      "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "UserKnownHostsFile=/dev/null", "-o", "GlobalKnownHostsFile=/dev/null",
      ...(t.hostKey
        ? ["-o", "StrictHostKeyChecking=yes", "-o", `KnownHostsCommand=/bin/echo * ${t.hostKey}`, "-o", `HostKeyAlgorithms=${t.hostKey.split(" ")[0]}`]
        : ["-o", "StrictHostKeyChecking=no"]),
      "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
      `${t.user}@${t.host}`, command,
    ],
    { encoding: "utf8", input: input ?? "", maxBuffer: 64 * 1024 * 1024, timeout: timeoutMs },
  );
  return { status: r.status ?? -1, stdout: r.stdout ?? "", stderr: (r.stderr ?? "") + (r.error ? String(r.error) : "") };
}
