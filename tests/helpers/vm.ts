/**
 * A throwaway qemu VM for host tests that need a kernel feature this machine lacks (bcache: the test machine's
 * kernel cannot load modules). Debian's own kernel boots under TCG (no KVM) with an initramfs holding a Debian
 * minbase rootfs (built once by vm-build.sh, cached under /var/cache/train-server-test/); each run appends a
 * small cpio with the script, its environment and any files, boots, runs the script as root with udev running,
 * and returns its exit code, stdout and stderr (sent back over a second serial port), then powers off.
 * Disks are sparse files in `diskDir`, kept between runs: a second boot sees what the first one wrote.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import * as zlib from "zlib";

export interface VmDisk {
  /** File name stem in diskDir, and the disk's serial number (/dev/disk/by-id/virtio-<name>, nvme-..._<name>). */
  name: string;
  sizeMb: number;
  kind: "virtio" | "nvme";
}

export interface VmRunOptions {
  disks: VmDisk[];
  /** Where the disk images live; created on first use, reused afterwards. */
  diskDir: string;
  /** Bash script run as root in the VM (cwd /ts). */
  script: string;
  /** Environment of the script (names must be shell identifiers). */
  env?: Record<string, string>;
  /** Host files or directories copied into the VM under /ts/<key>. */
  files?: Record<string, string>;
  /** Run systemd-udevd at boot as a real host does (default true). */
  udev?: boolean;
  timeoutSec?: number;
  memoryMb?: number;
  /** Virtual CPUs (default 1). */
  cpus?: number;
}

export interface VmRun {
  exitCode: number;
  stdout: string;
  stderr: string;
  /** Kernel console (ttyS0) of the whole boot, for diagnosis. */
  serialLog: string;
  durationMs: number;
}

export interface VmImage {
  dir: string;
  kernel: string;
  initrd: string;
  kver: string;
  /** Seconds vm-build.sh took in this process (≈0 when the cached image was reused). */
  buildSeconds: number;
}

let image: VmImage | undefined;

/** Build the VM image, or reuse the cached one (same inputs → same directory). */
export function vmImage(): VmImage {
  if (image) return image;
  const started = Date.now();
  const r = spawnSync("bash", [path.join(__dirname, "vm-build.sh")], { encoding: "utf8", timeout: 1_200_000 });
  if (r.status !== 0) throw new Error(`vm-build.sh failed (${r.status}): ${r.stderr}${r.error ?? ""}`);
  const dir = r.stdout.trim().split("\n").pop()!;
  image = {
    dir,
    kernel: path.join(dir, "vmlinuz"),
    initrd: path.join(dir, "initrd.img"),
    kver: fs.readFileSync(path.join(dir, "kver"), "utf8").trim(),
    buildSeconds: (Date.now() - started) / 1000,
  };
  return image;
}

/** Device names the guest kernel gives the disks: virtio in order vda, vdb...; NVMe nvme0n1, nvme1n1... */
export function guestDevices(disks: VmDisk[]): Record<string, string> {
  const out: Record<string, string> = {};
  let v = 0;
  let n = 0;
  for (const d of disks) {
    out[d.name] = d.kind === "virtio" ? `/dev/vd${String.fromCharCode(97 + v++)}` : `/dev/nvme${n++}n1`;
  }
  return out;
}

const shellQuote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

/** Boot the VM, run `script`, power off. Throws only when the VM could not be started at all. */
export function runInVm(opts: VmRunOptions): VmRun {
  const img = vmImage();
  const udev = opts.udev ?? true;
  const timeoutSec = opts.timeoutSec ?? 600;
  for (const d of opts.disks) {
    if (!/^[A-Za-z0-9_-]{1,20}$/.test(d.name)) throw new Error(`bad disk name ${d.name}`);
  }
  fs.mkdirSync(opts.diskDir, { recursive: true });
  const run = fs.mkdtempSync(path.join(os.tmpdir(), "ts-vm-run-"));
  try {
    // Per-run payload: /init, /ts/run.sh, /ts/env, /ts/<files>, appended to the cached initramfs as a second
    // archive (the kernel unpacks both into one root).
    const ts = path.join(run, "payload", "ts");
    fs.mkdirSync(ts, { recursive: true });
    fs.copyFileSync(path.join(__dirname, "vm-init.sh"), path.join(run, "payload", "init"));
    fs.chmodSync(path.join(run, "payload", "init"), 0o755);
    fs.writeFileSync(path.join(ts, "run.sh"), opts.script, { mode: 0o755 });
    const envLines = Object.entries(opts.env ?? {}).map(([k, v]) => {
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k)) throw new Error(`bad environment variable name ${k}`);
      return `${k}=${shellQuote(v)}`;
    });
    fs.writeFileSync(path.join(ts, "env"), envLines.join("\n") + "\n");
    for (const [dest, src] of Object.entries(opts.files ?? {})) {
      fs.cpSync(src, path.join(ts, dest), { recursive: true });
    }
    const cpio = spawnSync("bash", ["-c", "find init ts -print0 | cpio --null -o -H newc --quiet"], {
      cwd: path.join(run, "payload"),
      maxBuffer: 256 * 1024 * 1024,
    });
    if (cpio.status !== 0) throw new Error(`cpio failed: ${cpio.stderr}`);
    const initrd = path.join(run, "initrd.img");
    fs.copyFileSync(img.initrd, initrd);
    fs.appendFileSync(initrd, zlib.gzipSync(cpio.stdout));

    const args = [
      "-accel", "tcg", "-cpu", "max", "-smp", String(opts.cpus ?? 1), "-m", String(opts.memoryMb ?? 1024),
      "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-nic", "none",
      "-kernel", img.kernel, "-initrd", initrd,
      "-append", [
        "console=ttyS0", "panic=-1", "loglevel=5", "mitigations=off",
        `ts.udev=${udev ? 1 : 0}`, `ts.timeout=${timeoutSec}`,
        `ts.disks=${Object.values(guestDevices(opts.disks)).map((p) => p.slice(5)).join(",")}`,
      ].join(" "),
      "-serial", `file:${path.join(run, "serial.log")}`,
      "-serial", `file:${path.join(run, "result.log")}`,
    ];
    opts.disks.forEach((d, i) => {
      const file = path.join(opts.diskDir, `${d.name}.img`);
      if (!fs.existsSync(file)) {
        fs.closeSync(fs.openSync(file, "w"));
        fs.truncateSync(file, d.sizeMb * 1024 * 1024);
      }
      args.push("-drive", `file=${file},if=none,id=disk${i},format=raw`);
      args.push("-device", d.kind === "virtio" ? `virtio-blk-pci,drive=disk${i},serial=${d.name}` : `nvme,drive=disk${i},serial=${d.name}`);
    });

    const started = Date.now();
    const q = spawnSync("qemu-system-x86_64", args, {
      encoding: "utf8",
      timeout: (timeoutSec + 120) * 1000,
      killSignal: "SIGKILL",
    });
    const durationMs = Date.now() - started;
    const serialLog = readIfExists(path.join(run, "serial.log"));
    const result = readIfExists(path.join(run, "result.log")).replace(/\r/g, "");
    const m = /==TS-RESULT-BEGIN==\nexit=(\d+)\n==TS-STDOUT==\n([\s\S]*?)==TS-STDERR==\n([\s\S]*?)==TS-RESULT-END==/.exec(result);
    if (!m) {
      const why = q.error ? String(q.error) : `qemu exited ${q.status}: ${q.stderr}`;
      return { exitCode: -1, stdout: "", stderr: `no result from the VM (${why})`, serialLog, durationMs };
    }
    const decode = (b64: string): string => Buffer.from(b64.replace(/\s+/g, ""), "base64").toString("utf8");
    return { exitCode: Number(m[1]), stdout: decode(m[2]), stderr: decode(m[3]), serialLog, durationMs };
  } finally {
    fs.rmSync(run, { recursive: true, force: true });
  }
}

function readIfExists(file: string): string {
  return fs.existsSync(file) ? fs.readFileSync(file, "utf8") : "";
}
