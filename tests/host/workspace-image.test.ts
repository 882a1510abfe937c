/**
 * The workspace image for real: a private dockerd (btrfs data root on a loop device, its own bridge, no iptables,
 * user-namespace remapping as baseline.sh configures it), a Debian bookworm base imported from a cached debootstrap
 * rootfs, `docker build --target core`, and a container run exactly as components/workspace.ts runs one
 * (workspaceEnv/workspaceMounts, workspaceSecurity: not privileged, the seccomp/AppArmor options, the GPU device
 * nodes, the limits, the SSH port published on the host). Proves: the uid/gid inside, the home byte-for-byte
 * untouched (also across a restart and a replacement), a real SSH key login through the published port with the
 * cache env, sudo with the password from the file, the user's rootless Docker (run, build, compose; nested containers
 * inside the workspace's cpuset and memory limit), GPU pinning by the device cgroup (ENXIO for the user's GPUs, EPERM
 * for the others, in the workspace and nested), what root in a workspace cannot do on the host, supervisord programs
 * RUNNING, limits read back, the password in no env/log/process environment, refusals before anything is written,
 * the `restore` command on the user's own read-only snapshots, and the host network left as it was.
 *
 * The built core image (plus a test-only docker-compose layer) is built by a second, plain private dockerd (a
 * remapping daemon refuses --network host builds) and cached under /var/cache/train-server-test as
 * ws-core-compose-<rootfs key>-<workspaceImageHash>.tar: rebuilt whenever any file of images/workspace changes
 * (TS_WORKSPACE_REBUILD=1 forces a build).
 */
import { spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as net from "net";
import * as path from "path";
import {
  WORKSPACE_CACHE_ENV,
  WORKSPACE_CACHE_MOUNTS,
  WORKSPACE_DIND_DATA_ROOT,
  WORKSPACE_IMAGE_DIR,
  WORKSPACE_PORTS,
  WORKSPACE_PROGRAMS,
  WORKSPACE_STOP_TIMEOUT_S,
  WORKSPACE_TARGETS,
  workspaceEnv,
  workspaceImageHash,
  workspaceMounts,
} from "../../components/render/workspace-image";
import {
  BOOKWORM_MINBASE,
  ensureDebootstrapRootfs,
  HostNetState,
  hostNetState,
  PrivateDockerd,
  rootfsKey,
  TEST_CACHE,
} from "../helpers/docker";
import { REPO, Scratch, sh, writeRandomFile, sleep, stopwatch } from "../helpers/host";
import { containerLifecycle } from "../../components/services";
import {
  NVIDIA_CONTROL_NODES,
  REMAPPED_ROOT_UID,
  renderDockerRemapSubIds,
  workspaceSeccompJson,
  workspaceSecurity,
  workspaceSecurityRunArgs,
  type WorkspaceSecurity,
} from "../../components/render/workspace-security";

jest.setTimeout(30 * 60_000);

const USER = "alice";
const UID = 1234;
const SHARED_GID = 2000;
const LIMITS = { cpuset: "1", memoryMb: 1024, reservationMb: 512, swapMb: 1536, shmMb: 256 };
const NAME = "workspace-alice";
/** The host has 2 GPUs; alice is pinned to GPU 1 (bob, further down, has "all"). */
const GPU_COUNT = 2;
const ALICE_GPUS = [1];

const { timings, timed } = stopwatch();

/** Every entry under `root`: type, mode, owner, size, mtime (ns) and sha256 of files. */
function snapshotTree(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (p: string): void => {
    const st = fs.lstatSync(p, { bigint: true });
    const rel = path.relative(root, p) || ".";
    let what = `${st.mode.toString(8)} ${st.uid}:${st.gid} ${st.size} ${st.mtimeNs}`;
    if (st.isFile()) what += ` ${crypto.createHash("sha256").update(fs.readFileSync(p)).digest("hex")}`;
    if (st.isSymbolicLink()) what += ` -> ${fs.readlinkSync(p)}`;
    out[rel] = what;
    if (st.isDirectory()) for (const e of fs.readdirSync(p).sort()) walk(path.join(p, e));
  };
  walk(root);
  return out;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}


/** A character-device major no driver has registered here (stands for nvidia-uvm's dynamic major). */
function freeCharMajor(): number {
  const text = fs.readFileSync("/proc/devices", "utf8");
  const used = new Set([...text.split("Block devices:")[0].matchAll(/^\s*(\d+) /gm)].map((m) => Number(m[1])));
  for (let m = 511; m > 300; m--) if (!used.has(m)) return m;
  throw new Error("no free character major in 301..511");
}

/** What opening a device node read-write gave (bash's message → errno name). */
function openResult(out: string): string {
  if (/^OPENED$/m.test(out)) return "opened";
  if (/No such device or address/.test(out)) return "ENXIO";
  if (/Operation not permitted/.test(out)) return "EPERM";
  if (/No such file or directory/i.test(out)) return "ENOENT";
  if (/Permission denied/.test(out)) return "EACCES";
  return `other: ${out.trim().slice(-200)}`;
}
/** A shell command that opens NODE read-write and prints OPENED or the error. */
const openCmd = (node: string): string => `bash -c 'exec 3<>${node} && echo OPENED' 2>&1; true`;

describe("workspace image (core target) in a private dockerd", () => {
  const scratch = new Scratch("ts-workspace-");
  let netBefore: HostNetState;
  let d: PrivateDockerd;
  let image: string;
  let data: string; // test data on the btrfs filesystem
  let home: string;
  let key: string;
  let password: string;
  let pwFile: string;
  let port: number;
  let homeBefore: Record<string, string>;
  let runArgs: string[];
  let hostKey: string;
  let snaps: string;
  let spool: string;
  let devDir: string; // the host's (fake) NVIDIA device nodes
  let seccompFile: string;
  let security: WorkspaceSecurity;

  const exec = (args: string[], input?: string) => d.docker(["exec", ...(input !== undefined ? ["-i"] : []), NAME, ...args], { input });
  const ssh = (cmd: string, input?: string) =>
    spawnSync(
      "ssh",
      ["-i", key, "-p", String(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", `${USER}@127.0.0.1`, cmd],
      { encoding: "utf8", input, timeout: 60_000 },
    );

  /** Wait until supervisord reports every core program RUNNING; returns `supervisorctl status`. */
  const waitRunning = (): string => {
    let last = "";
    const deadline = Date.now() + 90_000;
    while (Date.now() < deadline) {
      const r = exec(["supervisorctl", "-c", "/etc/supervisor/supervisord.conf", "status"]);
      last = r.stdout + r.stderr;
      const running = [...last.matchAll(/^(\S+)\s+RUNNING/gm)].map((m) => m[1]).sort();
      if (r.status === 0 && WORKSPACE_PROGRAMS.core.every((p) => running.includes(p)) && ssh("true").status === 0) return last;
      sleep(1);
    }
    throw new Error(`programs not RUNNING: ${last}\nlogs: ${d.docker(["logs", NAME]).stderr.slice(-3000)}`);
  };
  const keyscan = (): string =>
    sh("ssh-keyscan", ["-t", "ed25519", "-p", String(port), "127.0.0.1"]).split("\n").filter((l) => l && !l.startsWith("#")).join("\n");

  beforeAll(async () => {
    netBefore = hostNetState();
    d = timed("dockerd start", () => PrivateDockerd.start(scratch, { usernsRemapSubIds: renderDockerRemapSubIds }));
    const rootfs = timed("debootstrap rootfs (cached)", () => ensureDebootstrapRootfs(BOOKWORM_MINBASE));
    const hash = workspaceImageHash(path.join(REPO, WORKSPACE_IMAGE_DIR));
    image = `train-server/workspace:core-${hash.slice(0, 12)}`;
    // the core image and, on top, a test-only layer with Debian's docker-compose (v1): bookworm has no `docker
    // compose` plugin (the full image installs Ubuntu's docker-compose-v2), so that `docker-compose up` can be shown
    const cached = path.join(TEST_CACHE, `ws-core-compose-${rootfsKey(BOOKWORM_MINBASE)}-${hash.slice(0, 16)}.tar`);
    if (!fs.existsSync(cached) || process.env.TS_WORKSPACE_REBUILD === "1") {
      // builds need the host's network (Debian's archive), which a remapped daemon refuses: a second, plain daemon
      const builder = timed("builder dockerd start", () => PrivateDockerd.start(scratch, { name: "builder" }));
      timed("docker import base", () => builder.importRootfs(rootfs, "local/bookworm"));
      timed("docker build --target core", () =>
        builder.dockerOk(
          ["build", "--network", "host", "--target", WORKSPACE_TARGETS.core, "--build-arg", "BASE_IMAGE=local/bookworm", "-t", image, path.join(REPO, WORKSPACE_IMAGE_DIR)],
          { timeoutMs: 25 * 60_000 },
        ),
      );
      timed("docker build (test layer: docker-compose)", () =>
        builder.dockerOk(["build", "--network", "host", "-t", `${image}-compose`, "-"], {
          input: `FROM ${image}\nRUN apt-get update && apt-get install -y --no-install-recommends docker-compose && rm -rf /var/lib/apt/lists/*\n`,
          timeoutMs: 10 * 60_000,
        }),
      );
      timed("docker save (cache)", () => {
        builder.dockerOk(["save", "-o", `${cached}.tmp`, image, `${image}-compose`], { timeoutMs: 600_000 });
        fs.renameSync(`${cached}.tmp`, cached);
        // keep only the current image: older ones belong to build contexts that no longer exist
        for (const f of fs.readdirSync(TEST_CACHE)) {
          if (/^ws-core-compose-.*\.tar$/.test(f) && path.join(TEST_CACHE, f) !== cached) fs.rmSync(path.join(TEST_CACHE, f), { force: true });
        }
      });
      builder.stop();
    }
    timed("docker load (cached images)", () => d.dockerOk(["load", "-i", cached], { timeoutMs: 600_000 }));

    // NVIDIA device nodes as the host has them (major 195; nvidia-uvm's major is dynamic: an unregistered one
    // here). No driver: an open the device cgroup allows fails with ENXIO, one it denies with EPERM.
    // under a remapping daemon runc bind-mounts each node from the host at its path inside: a unique dir in /dev
    devDir = fs.mkdtempSync("/dev/ts-ws-");
    fs.chmodSync(devDir, 0o755); // runc binds the nodes as the remapped root
    scratch.onCleanup(() => fs.rmSync(devDir, { recursive: true, force: true }));
    const uvmMajor = freeCharMajor();
    const nodes: Record<string, string> = { nvidia0: "195 0", nvidia1: "195 1", nvidiactl: "195 255", "nvidia-modeset": "195 254", "nvidia-uvm": `${uvmMajor} 0`, "nvidia-uvm-tools": `${uvmMajor} 1` };
    for (const [n, mm] of Object.entries(nodes)) sh("mknod", ["-m", "666", path.join(devDir, n), "c", ...mm.split(" ")]);
    security = workspaceSecurity({ gpus: ALICE_GPUS, gpuCount: GPU_COUNT, devDir });
    seccompFile = path.join(scratch.dir, "seccomp.json");
    fs.writeFileSync(seccompFile, workspaceSeccompJson());

    // the user's storage, as users.sh/baseline.sh leave it: subvolumes, owner uid, shared caches setgid mlusers
    data = path.join(d.btrfs, "storage");
    fs.mkdirSync(data);
    for (const sub of ["homes", "workspaces", "docker-volumes", "cache"]) fs.mkdirSync(path.join(data, sub));
    home = path.join(data, "homes", USER);
    sh("btrfs", ["-q", "subvolume", "create", home]);
    sh("btrfs", ["-q", "subvolume", "create", path.join(data, "workspaces", USER)]);
    sh("btrfs", ["-q", "subvolume", "create", path.join(data, "docker-volumes", USER)]);
    fs.chownSync(path.join(data, "docker-volumes", USER), UID, UID); // users.sh: 750 user:user
    fs.chmodSync(path.join(data, "docker-volumes", USER), 0o750);
    for (const c of WORKSPACE_CACHE_MOUNTS) {
      const dir = path.join(data, "cache", c);
      fs.mkdirSync(dir);
      fs.chownSync(dir, 0, SHARED_GID);
      fs.chmodSync(dir, 0o2775);
    }
    // a lived-in home: dotfiles, data, a symlink, odd modes, a root-owned file, an empty dir
    key = path.join(scratch.dir, "id_ed25519");
    sh("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", key]);
    fs.mkdirSync(path.join(home, ".ssh"), { mode: 0o700 });
    fs.writeFileSync(path.join(home, ".ssh", "authorized_keys"), fs.readFileSync(`${key}.pub`), { mode: 0o600 });
    fs.writeFileSync(path.join(home, ".bashrc"), "# alice's own bashrc\nexport PS1='alice> '\n");
    fs.writeFileSync(path.join(home, ".profile"), "# alice's profile\n");
    fs.mkdirSync(path.join(home, ".config", "code-server"), { recursive: true });
    fs.writeFileSync(path.join(home, ".config", "code-server", "config.yaml"), "bind-addr: 127.0.0.1:9999\n");
    writeRandomFile(path.join(home, "projects", "model.bin"), 3);
    fs.writeFileSync(path.join(home, "projects", "secret-notes.txt"), "private\n", { mode: 0o600 });
    fs.symlinkSync("/workspace", path.join(home, "workspace"));
    fs.mkdirSync(path.join(home, "empty"));
    sh("chown", ["-R", "-h", `${UID}:${UID}`, home]);
    fs.writeFileSync(path.join(home, "root-owned.txt"), "left by an admin\n", { mode: 0o644 }); // stays root's
    fs.chmodSync(home, 0o750);
    const old = new Date("2024-01-02T03:04:05Z");
    fs.utimesSync(path.join(home, "projects", "model.bin"), old, old);
    homeBefore = snapshotTree(home);
    // the user's own snapshot dir and restore spool, as users.sh and btrbk leave them (one read-only snapshot)
    snaps = path.join(data, ".snapshots", "homes", USER);
    fs.mkdirSync(snaps, { recursive: true });
    sh("btrfs", ["-q", "subvolume", "snapshot", "-r", home, path.join(snaps, `${USER}.20261201T1000`)]);
    spool = path.join(scratch.dir, "restore", USER);
    for (const [dir, mode] of [[spool, 0o750], [path.join(spool, "requests"), 0o770], [path.join(spool, "results"), 0o750]] as const) {
      fs.mkdirSync(dir, { recursive: true });
      fs.chownSync(dir, 0, UID);
      fs.chmodSync(dir, mode);
    }
    fs.chownSync(snaps, 0, UID);
    fs.chmodSync(snaps, 0o750);

    password = `pw-${crypto.randomBytes(12).toString("base64url")}:x"y\\z`;
    pwFile = path.join(scratch.dir, "alice.password");
    fs.writeFileSync(pwFile, `${password}\n`, { mode: 0o400 });
    // production uploads it into the container (owned by the container's root); a bind mount needs that owner
    fs.chownSync(pwFile, REMAPPED_ROOT_UID, REMAPPED_ROOT_UID);

    port = await freePort();
    const mounts = workspaceMounts({
      user: USER,
      home,
      scratch: path.join(data, "workspaces", USER),
      state: path.join(data, "docker-volumes", USER),
      cacheRoot: path.join(data, "cache"),
      passwordFile: pwFile,
      snapshots: snaps,
      restoreSpool: spool,
    });
    runArgs = [
      "--name", NAME, "--hostname", NAME, ...workspaceSecurityRunArgs(security, seccompFile),
      "--cpuset-cpus", LIMITS.cpuset, "--memory", `${LIMITS.memoryMb}m`, "--memory-reservation", `${LIMITS.reservationMb}m`,
      "--memory-swap", `${LIMITS.swapMb}m`, "--shm-size", `${LIMITS.shmMb}m`, "--stop-timeout", String(WORKSPACE_STOP_TIMEOUT_S),
      "-p", `127.0.0.1:${port}:${WORKSPACE_PORTS.ssh}`,
      ...Object.entries(workspaceEnv({ user: USER, uid: UID, sharedGid: SHARED_GID })).flatMap(([k, v]) => ["-e", `${k}=${v}`]),
      ...mounts.flatMap((m) => ["--mount", `type=bind,source=${m.source},target=${m.target}${m.readOnly ? ",readonly" : ""}`]),
      `${image}-compose`,
    ];
    timed("container start to all programs RUNNING", () => {
      d.dockerOk(["run", "-d", ...runArgs]);
      waitRunning();
    });
    hostKey = keyscan();
  });

  afterAll(() => {
    process.stderr.write(`workspace-image timings (s): ${JSON.stringify(timings)}\n`);
    scratch.cleanup();
  });

  test("the user exists with the host's uid/gid, in sudo, docker and the shared-cache group", () => {
    expect(exec(["id", USER]).stdout.trim()).toMatch(new RegExp(`^uid=${UID}\\(${USER}\\) gid=${UID}\\(${USER}\\) groups=.*`));
    const groups = exec(["id", "-Gn", USER]).stdout.trim().split(" ").sort();
    expect(groups).toEqual([USER, "mlusers", "sudo"].sort());
    expect(exec(["getent", "group", "mlusers"]).stdout.trim()).toBe(`mlusers:x:${SHARED_GID}:${USER}`);
    expect(exec(["getent", "passwd", USER]).stdout.trim()).toBe(`${USER}:x:${UID}:${UID}::/home/${USER}:/bin/bash`);
  });

  test("the existing home is byte-for-byte untouched (content, modes, owners, mtimes)", () => {
    expect(snapshotTree(home)).toEqual(homeBefore);
  });

  test("supervisord runs the core programs; the HEALTHCHECK command passes and fails when one stops", () => {
    const status = exec(["supervisorctl", "-c", "/etc/supervisor/supervisord.conf", "status"]);
    expect(status.status).toBe(0);
    const programs = [...status.stdout.matchAll(/^(\S+)\s+(\S+)/gm)].map((m) => `${m[1]} ${m[2]}`).sort();
    expect(programs).toEqual(WORKSPACE_PROGRAMS.core.map((p) => `${p} RUNNING`));
    const health = JSON.parse(d.dockerOk(["inspect", "--format", "{{json .Config.Healthcheck}}", NAME]));
    expect(health.Test.slice(0, 2)).toEqual(["CMD", "supervisorctl"]);
    expect(exec(["supervisorctl", "-c", "/etc/supervisor/supervisord.conf", "stop", "sshd"]).status).toBe(0);
    expect(exec(health.Test.slice(1)).status).not.toBe(0);
    expect(exec(["supervisorctl", "-c", "/etc/supervisor/supervisord.conf", "start", "sshd"]).status).toBe(0);
    expect(exec(health.Test.slice(1)).status).toBe(0);
    expect(exec(["sshd", "-t"]).status).toBe(0);
  });

  test("SSH: a real key login as the user through the published port, with the cache environment", () => {
    const r = ssh('id -u; id -g; echo "$HOME"; env | grep -E "^(PIP_CACHE_DIR|CONDA_PKGS_DIRS|HF_HUB_CACHE|HF_DATASETS_CACHE|TORCH_HOME|GOMODCACHE|npm_config_cache)=" | sort');
    expect(r.stderr).toBe("");
    const lines = r.stdout.trim().split("\n");
    expect(lines.slice(0, 3)).toEqual([String(UID), String(UID), `/home/${USER}`]);
    expect(lines.slice(3)).toEqual(Object.entries(WORKSPACE_CACHE_ENV).map(([k, v]) => `${k}=${v}`).sort());
    // a login shell sees them too (/etc/profile.d)
    expect(ssh("bash -lc 'echo $TORCH_HOME'").stdout.trim()).toBe(WORKSPACE_CACHE_ENV.TORCH_HOME);
    // password logins are off: only the key works
    const pw = spawnSync("ssh", ["-p", String(port), "-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no", "-o", "StrictHostKeyChecking=no",
      "-o", "UserKnownHostsFile=/dev/null", `${USER}@127.0.0.1`, "true"], { encoding: "utf8", timeout: 30_000 });
    expect(pw.status).toBe(255);
    expect(pw.stderr).toMatch(/Permission denied \(publickey\)/);
  });

  test("the shared caches are writable by the user, and files stay in the shared group", () => {
    expect(ssh("touch /cache/pip/probe && mkdir -p /cache/huggingface/hub/x").status).toBe(0);
    const st = fs.statSync(path.join(data, "cache", "pip", "probe"));
    expect([st.uid, st.gid]).toEqual([UID, SHARED_GID]);
  });

  test("sudo takes the password from the file (and only that password)", () => {
    const ok = ssh("sudo -S -p '' id -u", `${password}\n`);
    expect(ok.stdout.trim()).toBe("0");
    const bad = ssh("sudo -S -p '' id -u", "wrong-password\n");
    expect(bad.status).not.toBe(0);
    expect(bad.stdout.trim()).toBe("");
  });

  test("Docker inside: the user's own rootless daemon (DOCKER_HOST from /etc/environment), data on the state mount", () => {
    const r = ssh("echo $DOCKER_HOST; docker info --format '{{.DockerRootDir}} {{.Driver}} {{json .SecurityOptions}}'");
    expect(r.stderr).toBe("");
    const [host, info] = r.stdout.trim().split("\n");
    expect(host).toBe(`unix:///run/user/${UID}/docker.sock`);
    expect(info.split(" ")[0]).toBe(WORKSPACE_DIND_DATA_ROOT);
    expect(info).toContain("rootless");
    // the daemon runs as the user: no root dockerd, no /var/run/docker.sock
    expect(exec(["sh", "-c", "ps -o user= -C dockerd | sort -u"]).stdout.trim()).toBe(USER);
    expect(exec(["test", "-e", "/var/run/docker.sock"]).status).not.toBe(0);
    const root = path.join(data, "docker-volumes", USER, path.basename(WORKSPACE_DIND_DATA_ROOT));
    expect(fs.statSync(root).uid).toBe(UID);
    expect(fs.readdirSync(root)).toEqual(expect.arrayContaining(["image", "containers"]));
  });

  test("as the user: docker run of a local image, docker build, docker-compose up; nested containers stay in the workspace's cpuset and memory limit", () => {
    const t = Date.now();
    const imp = spawnSync("bash", ["-c", `set -o pipefail; tar -C "$1" -c . | ssh -i "$2" -p "$3" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR ${USER}@127.0.0.1 docker import - local/base`,
      "_", ensureDebootstrapRootfs(BOOKWORM_MINBASE), key, String(port)], { encoding: "utf8", timeout: 300_000 });
    expect(imp.stderr).toBe("");
    expect(imp.status).toBe(0);
    timings["docker import in the workspace"] = (Date.now() - t) / 1000;
    // run: root in the nested container is the user on the host side, limits are the workspace's own
    const run = ssh("docker run --rm local/base sh -c 'cat /proc/self/uid_map; grep Cpus_allowed_list /proc/self/status; cat /sys/fs/cgroup/memory/memory.limit_in_bytes'");
    expect(run.stderr).toBe("");
    const [map0, map1, cpus, mem] = run.stdout.trim().split("\n").map((l) => l.trim().split(/\s+/).join(" "));
    expect(map0).toBe(`0 ${UID} 1`);
    expect(map1).toBe(`1 ${UID * 65536} 65536`);
    expect(cpus).toBe(`Cpus_allowed_list: ${LIMITS.cpuset}`);
    expect(mem).toBe(String(LIMITS.memoryMb * 2 ** 20));
    // the limit holds: a nested container that takes more than limit + swap is killed, the workspace lives on
    const big = ssh(`docker run --rm local/base sh -c 'head -c ${LIMITS.swapMb + 300}m /dev/zero | tail >/dev/null && echo survived'`);
    expect(big.stdout).not.toContain("survived");
    expect(big.status).toBe(137);
    expect(exec(["supervisorctl", "-c", "/etc/supervisor/supervisord.conf", "status", "dockerd"]).stdout).toMatch(/RUNNING/);
    // build (legacy builder, as on the server's Docker 20.10) and compose, in the user's /workspace
    const proj = path.join(data, "workspaces", USER, "proj");
    fs.mkdirSync(proj, { recursive: true });
    fs.writeFileSync(path.join(proj, "Dockerfile"), 'FROM local/base\nRUN echo built-inside > /built\nCMD ["cat", "/built"]\n');
    fs.writeFileSync(path.join(proj, "docker-compose.yml"),
      'services:\n  web:\n    image: local/built\n  probe:\n    image: local/base\n    command: ["sh", "-c", "getent hosts web >/dev/null && echo probe-resolved-web"]\n');
    sh("chown", ["-R", `${UID}:${UID}`, path.join(data, "workspaces", USER)]);
    const b = ssh("set -e; cd /workspace/proj; DOCKER_BUILDKIT=0 docker build -q -t local/built . >/dev/null; docker run --rm local/built; " +
      "docker-compose --no-ansi up --abort-on-container-exit 2>&1; docker-compose down >/dev/null 2>&1");
    expect(b.stdout).toMatch(/^built-inside$/m);
    expect(b.stdout).toMatch(/web_1\s*\|\s*built-inside/);
    expect(b.stdout).toMatch(/probe_1\s*\|\s*probe-resolved-web/);
    fs.rmSync(proj, { recursive: true });
    timings["import+run+build+compose"] = (Date.now() - t) / 1000;
  });

  test("the limits and the confinement read back exactly through docker inspect; not privileged", () => {
    const hc = JSON.parse(d.dockerOk(["inspect", "--format", "{{json .HostConfig}}", NAME]));
    expect({
      CpusetCpus: hc.CpusetCpus,
      Memory: hc.Memory,
      MemoryReservation: hc.MemoryReservation,
      MemorySwap: hc.MemorySwap,
      ShmSize: hc.ShmSize,
      Privileged: hc.Privileged,
      SecurityOpt: hc.SecurityOpt,
      CapAdd: hc.CapAdd ?? [],
      Devices: hc.Devices,
    }).toEqual({
      CpusetCpus: LIMITS.cpuset,
      Memory: LIMITS.memoryMb * 2 ** 20,
      MemoryReservation: LIMITS.reservationMb * 2 ** 20,
      MemorySwap: LIMITS.swapMb * 2 ** 20,
      ShmSize: LIMITS.shmMb * 2 ** 20,
      Privileged: false,
      // what components/workspace.ts sends (the CLI sent the profile file's compact JSON); Docker keeps
      // systempaths=unconfined as empty masked/read-only path lists instead (checked below)
      SecurityOpt: security.securityOpts.filter((o) => o !== "systempaths=unconfined"),
      CapAdd: [],
      Devices: security.devices.map((x) => ({ PathOnHost: x.hostPath, PathInContainer: x.containerPath, CgroupPermissions: x.permissions })),
    });
    expect([hc.MaskedPaths, hc.ReadonlyPaths]).toEqual([[], []]);
    expect(security.devices.map((x) => x.containerPath)).toEqual(["/dev/net/tun", `${devDir}/nvidia1`, ...NVIDIA_CONTROL_NODES.map((n) => `${devDir}/${n}`)]);
    expect(exec(["cat", "/sys/fs/cgroup/cpuset/cpuset.cpus"]).stdout.trim()).toBe(LIMITS.cpuset);
    expect(exec(["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]).stdout.trim()).toBe(String(LIMITS.memoryMb * 2 ** 20));
  });

  test("GPU pinning: alice (GPU 1 of 2) opens GPU 1 and the control nodes (ENXIO: allowed, no driver), never GPU 0 (EPERM), in the workspace and nested", () => {
    // nodes the host puts into alice's /workspace: visible inside, so only the device cgroup decides
    const ws = path.join(data, "workspaces", USER);
    sh("mknod", ["-m", "666", path.join(ws, "gpu0-node"), "c", "195", "0"]);
    sh("mknod", ["-m", "666", path.join(ws, "gpu1-node"), "c", "195", "1"]);
    const asUser = (node: string) => openResult(ssh(openCmd(node)).stdout);
    const asRoot = (node: string) => openResult(exec(["bash", "-c", openCmd(node)]).stdout);
    const nested = (node: string, opts: string) => openResult(ssh(`docker run --rm ${opts} local/base ${openCmd(node)}`).stdout);
    const table: Array<[string, string, string]> = [];
    const row = (who: string, node: string, got: string, want: string) => {
      table.push([who, node, got]);
      expect(`${who} ${node}: ${got}`).toBe(`${who} ${node}: ${want}`);
    };
    for (const n of ["nvidia1", ...NVIDIA_CONTROL_NODES]) {
      row("alice, workspace", `/dev/${n}`, asUser(`${devDir}/${n}`), "ENXIO");
      row("alice, nested (--device)", `/dev/${n}`, nested(`${devDir}/${n}`, `--device ${devDir}/${n}`), "ENXIO");
    }
    row("alice, workspace", "/dev/nvidia0", ssh(`test -e ${devDir}/nvidia0 && echo present || echo absent`).stdout.trim(), "absent");
    row("alice, nested (--device)", "/dev/nvidia0", openResult(ssh(`docker run --rm --device ${devDir}/nvidia0 local/base true 2>&1; true`).stdout), "ENOENT");
    row("alice, workspace", "195:0 (host-made node)", asUser("/workspace/gpu0-node"), "EPERM");
    row("alice, workspace", "195:1 (host-made node)", asUser("/workspace/gpu1-node"), "ENXIO");
    row("root (sudo), workspace", "/dev/nvidia1", asRoot(`${devDir}/nvidia1`), "ENXIO");
    row("root (sudo), workspace", "195:0 (host-made node)", asRoot("/workspace/gpu0-node"), "EPERM");
    row("root (sudo), workspace", "mknod c 195 0", openResult(exec(["bash", "-c", "mknod /tmp/nv0 c 195 0 2>&1; true"]).stdout), "EPERM");
    row("alice, nested (-v /workspace)", "195:0 (host-made node)", nested("/w/gpu0-node", "-v /workspace:/w"), "EPERM");
    row("alice, nested (-v /workspace)", "195:1 (host-made node)", nested("/w/gpu1-node", "-v /workspace:/w"), "ENXIO");
    // every capability and no seccomp in the nested container: still the workspace's device cgroup
    const allCaps = "--cap-add ALL --security-opt seccomp=unconfined";
    row("alice, nested (all caps)", "195:0 (host-made node)", nested("/w/gpu0-node", `${allCaps} -v /workspace:/w`), "EPERM");
    row("alice, nested (all caps)", "mknod c 195 0", openResult(ssh(`docker run --rm ${allCaps} local/base sh -c 'mknod /n c 195 0' 2>&1; true`).stdout), "EPERM");

    // carol has "all": a second workspace with the options rendered for her
    const carol = { name: "carol", uid: 1236 };
    const cname = "workspace-carol";
    for (const sub of ["homes", "workspaces", "docker-volumes"]) {
      const dir = path.join(data, sub, carol.name);
      sh("btrfs", ["-q", "subvolume", "create", dir]);
      fs.chownSync(dir, carol.uid, carol.uid);
    }
    const carolPw = path.join(scratch.dir, "carol.password");
    fs.writeFileSync(carolPw, "carol-pw\n", { mode: 0o400 });
    fs.chownSync(carolPw, REMAPPED_ROOT_UID, REMAPPED_ROOT_UID);
    const carolSec = workspaceSecurity({ gpus: "all", gpuCount: GPU_COUNT, devDir });
    expect(carolSec.devices.map((x) => x.containerPath)).toEqual(["/dev/net/tun", ...["nvidia0", "nvidia1", ...NVIDIA_CONTROL_NODES].map((n) => `${devDir}/${n}`)]);
    const carolMounts = workspaceMounts({
      user: carol.name, home: path.join(data, "homes", carol.name), scratch: path.join(data, "workspaces", carol.name),
      state: path.join(data, "docker-volumes", carol.name), cacheRoot: path.join(data, "cache"), passwordFile: carolPw,
    });
    d.dockerOk(["run", "-d", "--name", cname, ...workspaceSecurityRunArgs(carolSec, seccompFile),
      ...Object.entries(workspaceEnv({ user: carol.name, uid: carol.uid, sharedGid: SHARED_GID })).flatMap(([k, v]) => ["-e", `${k}=${v}`]),
      ...carolMounts.flatMap((m) => ["--mount", `type=bind,source=${m.source},target=${m.target}${m.readOnly ? ",readonly" : ""}`]), image]);
    try {
      for (let i = 0; i < 100 && d.docker(["exec", cname, "id", carol.name]).status !== 0; i++) sleep(0.2);
      for (const n of ["nvidia0", "nvidia1", ...NVIDIA_CONTROL_NODES]) {
        row("carol (all), workspace", `/dev/${n}`, openResult(d.docker(["exec", "-u", carol.name, cname, "bash", "-c", openCmd(`${devDir}/${n}`)]).stdout), "ENXIO");
      }
    } finally {
      d.docker(["rm", "-f", cname], { timeoutMs: 120_000 });
    }
    fs.rmSync(path.join(ws, "gpu0-node"));
    fs.rmSync(path.join(ws, "gpu1-node"));
    console.log(["device-open results (user × node × where):", "| who, where | node | open |", "|---|---|---|", ...table.map((r) => `| ${r.join(" | ")} |`)].join("\n"));
  });

  test("sudo in the workspace is not root on the host (each attempt as root inside, also from a new user namespace)", () => {
    // root by sudo has exactly the capabilities of `docker exec` root: Docker's default set, nothing more
    const caps = (r: { stdout: string }) => /^CapEff:\s*(\S+)$/m.exec(r.stdout)?.[1];
    expect(caps(ssh("sudo -S -p '' cat /proc/self/status", `${password}\n`))).toBe(caps(exec(["cat", "/proc/self/status"])));
    expect(caps(exec(["cat", "/proc/self/status"]))).toBe("00000000a80425fb"); // Docker's default capabilities
    const [major, minor] = fs.readFileSync("/proc/self/mountinfo", "utf8").split("\n").map((l) => l.split(" ")).find((f) => f[4] === "/")![2].split(":");
    const ws = path.join(data, "workspaces", USER);
    // the host's root disk as a node in the user's /workspace, made by the host (root inside cannot mknod)
    sh("mknod", [path.join(ws, "hostdisk"), "b", major, minor]);
    const mod = (nr: number) => `python3 -c 'import ctypes,os; l=ctypes.CDLL(None,use_errno=True); fd=os.open("/etc/hostname",os.O_RDONLY); r=l.syscall(${nr},fd,b"",0); print("syscall", r, os.strerror(ctypes.get_errno()))'`;
    const sysctl = "v=$(cat /proc/sys/kernel/printk_ratelimit); echo $v > /proc/sys/kernel/printk_ratelimit && echo WROTE-HOST-SYSCTL";
    const cases: Array<[string, string, RegExp]> = [
      ["no block device in /dev", "find /dev -type b | wc -l", /^0$/m],
      ["mknod a disk node", "mknod /tmp/vda b 254 0", /Operation not permitted/],
      ["open the host's root disk (node made by the host)", "exec 3</workspace/hostdisk", /Operation not permitted/],
      ["mount the host's root disk", "mount -o ro /workspace/hostdisk /mnt", /permission denied|Operation not permitted|must be superuser/i],
      ["mount a tmpfs", "mount -t tmpfs t /mnt", /permission denied|Operation not permitted|must be superuser/i],
      ["a loop device", "losetup -f", /cannot find an unused loop device|No such file|Permission denied/],
      ["load a kernel module (finit_module)", mod(313), /syscall -1 Operation not permitted/],
      ["load a kernel module (init_module)", mod(175), /syscall -1 Operation not permitted/],
      ["see other users' homes", "ls /home; grep -c ' /home/' /proc/self/mountinfo", /^alice\n1$/m],
      ["reach the host's Docker socket", `ls /var/run/docker.sock ${d.sock} 2>&1 | grep -c 'No such file'`, /^2$/m],
      ["add a network link", "ip link add tsx0 type dummy", /Operation not permitted/],
      ["read or change iptables", "iptables -S", /Permission denied|Operation not permitted/],
      ["write a host sysctl (/proc/sys is writable: systempaths=unconfined)", sysctl, /Permission denied/],
      ["sysrq / kcore", "echo h >/proc/sysrq-trigger; head -c1 /proc/kcore", /(No such file|Permission denied|Operation not permitted)[\s\S]*(No such file|Permission denied|Operation not permitted)/],
      ["unshare -r: mount the host's disk", "unshare -r mount -o ro /workspace/hostdisk /mnt", /permission denied|Operation not permitted|must be superuser/i],
      ["unshare -r: load a kernel module", `unshare -r ${mod(313)}`, /syscall -1 Operation not permitted/],
      ["unshare -r: add a link to the workspace's network", "unshare -r ip link add tsx1 type dummy", /Operation not permitted/],
      ["unshare -r: write a host sysctl", `unshare -r bash -c '${sysctl}'`, /Permission denied/],
    ];
    const results: string[] = [];
    for (const [what, cmd, want] of cases) {
      const r = exec(["bash", "-c", `${cmd} 2>&1`]);
      const out = (r.stdout + r.stderr).trim();
      results.push(`| ${what} | ${out.split("\n").slice(-1)[0].slice(0, 90)} |`);
      expect({ what, out }).toEqual({ what, out: expect.stringMatching(want) });
      expect(out).not.toContain("WROTE-HOST-SYSCTL");
    }
    fs.rmSync(path.join(ws, "hostdisk"));
    console.log(["root in the workspace (negative tests):", "| attempt | result |", "|---|---|", ...results].join("\n"));
  });

  test("the password is in no container env, no log line and no process environment", () => {
    const inspect = d.dockerOk(["inspect", NAME]);
    expect(inspect).not.toContain(password);
    expect(JSON.parse(inspect)[0].Config.Env.join("\n")).not.toMatch(/PASS/i);
    const logs = d.docker(["logs", NAME]);
    expect(logs.stdout + logs.stderr).not.toContain(password);
    expect(logs.stderr + logs.stdout).toContain(`password of ${USER} set from /run/secrets/workspace-password`);
    const environ = exec(["sh", "-c", "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"]).stdout;
    expect(environ).toContain("PIP_CACHE_DIR=/cache/pip"); // the environments were read
    expect(environ).not.toContain(password);
  });

  test("after a restart: same user, same host key, home still untouched", () => {
    const t = Date.now();
    d.dockerOk(["restart", NAME], { timeoutMs: 180_000 });
    waitRunning();
    timings["restart to RUNNING"] = (Date.now() - t) / 1000;
    expect(exec(["id", "-u", USER]).stdout.trim()).toBe(String(UID));
    expect(exec(["grep", "-c", `^${USER}:`, "/etc/passwd"]).stdout.trim()).toBe("1");
    expect(keyscan()).toBe(hostKey);
    expect(ssh("id -u").stdout.trim()).toBe(String(UID));
    expect(snapshotTree(home)).toEqual(homeBefore);
  });

  test("a replace as the Docker provider does it (stop with destroyGraceSeconds, then remove): the user's job gets SIGTERM and the time to save", () => {
    // the workspace's grace exactly as components/workspace.ts gives it to the provider
    const destroyGraceSeconds = containerLifecycle(WORKSPACE_STOP_TIMEOUT_S, true).destroyGraceSeconds as number;
    const log = path.join(data, "workspaces", USER, "stop.log");
    // a training run started over SSH and left running (nohup, own session): on SIGTERM it takes 3 s to save
    const scratchDir = path.join(data, "workspaces", USER);
    fs.chownSync(scratchDir, UID, UID); // as users.sh leaves it: the user's own
    fs.writeFileSync(
      path.join(scratchDir, "job.sh"),
      [
        "tag=$1 log=/workspace/stop.log",
        'on_term() { echo "$tag term $(date +%s.%N)" >>"$log"; sleep 3; echo "$tag saved $(date +%s.%N)" >>"$log"; exit 0; }',
        "trap on_term TERM",
        'echo "$tag started" >>"$log"',
        "while :; do sleep 1; done",
        "",
      ].join("\n"),
    );
    const job = (tag: string) => ssh(`nohup setsid bash /workspace/job.sh ${tag} >/dev/null 2>&1 </dev/null &`);
    const waitStarted = (tag: string) => {
      for (let i = 0; i < 50 && !(fs.existsSync(log) && fs.readFileSync(log, "utf8").includes(`${tag} started`)); i++) sleep(0.2);
    };
    expect(job("graceful").status).toBe(0);
    waitStarted("graceful");
    const t = Date.now();
    d.dockerOk(["stop", "-t", String(destroyGraceSeconds), NAME], { timeoutMs: 300_000 });
    const stopS = (Date.now() - t) / 1000;
    d.dockerOk(["rm", "-f", NAME]);
    const lines = fs.readFileSync(log, "utf8").trim().split("\n");
    const at = (what: string) => Number(lines.find((l) => l.startsWith(`graceful ${what} `))?.split(" ")[2]);
    expect(lines).toContain("graceful started");
    expect(at("term")).toBeGreaterThan(0);
    expect(at("saved") - at("term")).toBeGreaterThanOrEqual(3);
    expect(stopS).toBeLessThan(destroyGraceSeconds);
    console.log(`workspace replace: the job got SIGTERM and ${(at("saved") - at("term")).toFixed(2)} s to save; docker stop took ${stopS.toFixed(1)} s of its ${destroyGraceSeconds} s grace`);
    timings["graceful stop (job saved in 3 s)"] = stopS;

    // the provider's default (destroyGraceSeconds 0): the same job never gets to save
    d.dockerOk(["run", "-d", ...runArgs]);
    waitRunning();
    expect(job("killed").status).toBe(0);
    waitStarted("killed");
    d.dockerOk(["stop", "-t", "0", NAME], { timeoutMs: 60_000 });
    d.dockerOk(["rm", "-f", NAME]);
    expect(fs.readFileSync(log, "utf8")).toContain("killed started");
    expect(fs.readFileSync(log, "utf8")).not.toContain("killed saved");
    fs.rmSync(log);
    fs.rmSync(path.join(scratchDir, "job.sh"));
    d.dockerOk(["run", "-d", ...runArgs]);
    waitRunning();
  });

  test("after a replacement (image update: new container, same mounts): same host key, home untouched", () => {
    d.dockerOk(["rm", "-f", NAME], { timeoutMs: 180_000 });
    const t = Date.now();
    d.dockerOk(["run", "-d", ...runArgs]);
    waitRunning();
    timings["replacement to RUNNING"] = (Date.now() - t) / 1000;
    expect(keyscan()).toBe(hostKey);
    expect(ssh("id -u; sudo -S -p '' id -u", `${password}\n`).stdout.trim().split("\n")).toEqual([String(UID), "0"]);
    expect(snapshotTree(home)).toEqual(homeBefore);
  });

  describe("refusals: the entrypoint exits 3 before changing anything", () => {
    /** The container's run arguments without its name, hostname and published port (refusals run beside it). */
    const baseArgs = (): string[] => {
      const out: string[] = [];
      for (let i = 0; i < runArgs.length; i++) {
        if (["--name", "--hostname", "-p"].includes(runArgs[i])) i++;
        else out.push(runArgs[i]);
      }
      return out;
    };
    /** baseArgs with the bind mount at `target` replaced by `source` (null: dropped). */
    const replaceMount = (target: string, source: string | null, extra = ""): string[] => {
      const a = baseArgs();
      const out: string[] = [];
      for (let i = 0; i < a.length; i++) {
        if (a[i] === "--mount" && (a[i + 1].endsWith(`,target=${target}`) || a[i + 1].includes(`,target=${target},`))) {
          if (source !== null) out.push("--mount", `type=bind,source=${source},target=${target}${extra}`);
          i++;
        } else out.push(a[i]);
      }
      expect(out.length).toBe(a.length - (source === null ? 2 : 0));
      return out;
    };
    const attempt = (args: string[]): { status: number; out: string } => {
      const r = d.docker(["run", "--rm", ...args], { timeoutMs: 120_000 });
      return { status: r.status, out: r.stdout + r.stderr };
    };

    test("a home owned by another uid", () => {
      const other = path.join(data, "homes", "bob");
      sh("btrfs", ["-q", "subvolume", "create", other]);
      fs.writeFileSync(path.join(other, "notes"), "bob's\n");
      sh("chown", ["-R", "4321:4321", other]);
      const before = snapshotTree(other);
      const r = attempt(replaceMount(`/home/${USER}`, other));
      expect(r.status).toBe(3);
      expect(r.out).toMatch(/REFUSED: \/home\/alice belongs to uid 4321, not WORKSPACE_UID 1234/);
      expect(snapshotTree(other)).toEqual(before);
    });

    test("no home mount", () => {
      const r = attempt(replaceMount(`/home/${USER}`, null));
      expect(r.status).toBe(3);
      expect(r.out).toMatch(/REFUSED: \/home\/alice is not a mounted directory/);
    });

    test("no state mount", () => {
      const r = attempt(replaceMount("/var/lib/workspace", null));
      expect(r.status).toBe(3);
      expect(r.out).toMatch(/REFUSED: \/var\/lib\/workspace is not mounted/);
    });

    test("a password file readable by others", () => {
      const loose = path.join(scratch.dir, "loose.password");
      fs.writeFileSync(loose, `${password}\n`, { mode: 0o644 });
      fs.chmodSync(loose, 0o644);
      const r = attempt(replaceMount("/run/secrets/workspace-password", loose, ",readonly"));
      expect(r.status).toBe(3);
      expect(r.out).toMatch(/REFUSED: \/run\/secrets\/workspace-password has mode 644/);
      expect(r.out).not.toContain(password);
    });

    test("the home is still untouched after all of it", () => {
      expect(snapshotTree(home)).toEqual(homeBefore);
    });
  });

  test("restore in the workspace (an SSH session as the user): only their snapshots, read-only, a file back from one; requests reach the host's spool", () => {
    expect(ssh("ls -a /snapshots").stdout).toBe(`.\n..\n${USER}.20261201T1000\n`);
    expect(ssh("restore --list").stdout).toBe("20261201T1000  2026-12-01 10:00\n");
    const w = ssh(`touch /snapshots/x /snapshots/${USER}.20261201T1000/x`);
    expect([w.status, w.stderr]).toEqual([1, expect.stringMatching(/Read-only file system[\s\S]*Read-only file system/)]);
    const r = ssh("restore projects/secret-notes.txt --from 20261201T1000");
    expect(r.stderr).toBe("");
    expect(r.stdout).toBe("restored projects/secret-notes.txt from snapshot 2026-12-01 10:00 into ~/restored/20261201T1000/projects/secret-notes.txt\n");
    expect(fs.readFileSync(path.join(home, "restored/20261201T1000/projects/secret-notes.txt"), "utf8")).toBe("private\n");
    expect(sh("stat", ["-c", "%u %a", path.join(home, "restored/20261201T1000/projects/secret-notes.txt")]).trim()).toBe(`${UID} 600`);
    // an older date goes to the host: the request lands in the host's spool (no broker here: no answer, exit 4)
    const b = ssh("restore --backups --wait 0");
    expect([b.status, b.stderr]).toEqual([4, expect.stringMatching(/no answer yet from the host/)]);
    const reqs = fs.readdirSync(path.join(spool, "requests"));
    expect(reqs).toHaveLength(1);
    expect(fs.readFileSync(path.join(spool, "requests", reqs[0]), "utf8")).toBe("action=list\n");
    expect(fs.statSync(path.join(spool, "requests", reqs[0])).uid).toBe(UID);
  });

  test("cleanup removes dockerd, containers, mounts, the bridge and cgroups, and leaves the host network as it was", () => {
    const sockDir = path.dirname(d.sock);
    scratch.cleanup();
    expect(fs.existsSync(sockDir)).toBe(false);
    expect(fs.readFileSync("/proc/self/mountinfo", "utf8")).not.toContain(scratch.dir);
    expect(d.leftoverCgroups()).toEqual([]);
    expect(hostNetState()).toEqual(netBefore);
  });
});
