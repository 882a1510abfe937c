/**
 * The workspace image for real: a private dockerd (btrfs data root on a loop device, its own bridge, no iptables),
 * a Debian bookworm base imported from a cached debootstrap rootfs, `docker build --target core`, and a container
 * run exactly as components/workspace.ts runs one (workspaceEnv/workspaceMounts, privileged, the limits, the SSH
 * port published on the host). Proves: the uid/gid inside, the home byte-for-byte untouched (also across a restart
 * and a replacement), a real SSH key login through the published port with the cache env, sudo with the password
 * from the file, Docker-in-Docker usable by the user, supervisord programs RUNNING, limits read back, the password
 * in no env/log/process environment, refusals before anything is written, the `restore` command on the user's own
 * read-only snapshots, and the host network left as it was.
 *
 * The built core image is cached under /var/cache/train-server-test keyed by workspaceImageHash + the base rootfs
 * key: it is rebuilt whenever any file of images/workspace changes (TS_WORKSPACE_REBUILD=1 forces a build).
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
  WORKSPACE_PRIVILEGED,
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
  privilegedRunArgs,
  rootfsKey,
  TEST_CACHE,
} from "../helpers/docker";
import { REPO, Scratch, sh, writeRandomFile } from "../helpers/host";
import { containerLifecycle } from "../../components/services";

jest.setTimeout(30 * 60_000);

const USER = "alice";
const UID = 1234;
const SHARED_GID = 2000;
const LIMITS = { cpuset: "1", memoryMb: 1024, reservationMb: 512, swapMb: 1536, shmMb: 256 };
const NAME = "workspace-alice";
/** WORKSPACE_PRIVILEGED as this machine allows it (see privilegedRunArgs). */
const PRIVILEGED = privilegedRunArgs();

const timings: Record<string, number> = {};
const timed = <T>(what: string, fn: () => T): T => {
  const t = Date.now();
  try {
    return fn();
  } finally {
    timings[what] = (Date.now() - t) / 1000;
  }
};

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

const sleep = (s: number): void => void spawnSync("sleep", [String(s)]);

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
    d = timed("dockerd start", () => PrivateDockerd.start(scratch));
    const rootfs = timed("debootstrap rootfs (cached)", () => ensureDebootstrapRootfs(BOOKWORM_MINBASE));
    timed("docker import base", () => d.importRootfs(rootfs, "local/bookworm"));

    const hash = workspaceImageHash(path.join(REPO, WORKSPACE_IMAGE_DIR));
    image = `train-server/workspace:core-${hash.slice(0, 12)}`;
    const cached = path.join(TEST_CACHE, `workspace-core-${rootfsKey(BOOKWORM_MINBASE)}-${hash.slice(0, 16)}.tar`);
    if (fs.existsSync(cached) && process.env.TS_WORKSPACE_REBUILD !== "1") {
      timed("docker load (cached core image)", () => d.dockerOk(["load", "-i", cached], { timeoutMs: 600_000 }));
    } else {
      timed("docker build --target core", () =>
        d.dockerOk(
          ["build", "--network", "host", "--target", WORKSPACE_TARGETS.core, "--build-arg", "BASE_IMAGE=local/bookworm", "-t", image, path.join(REPO, WORKSPACE_IMAGE_DIR)],
          { timeoutMs: 25 * 60_000 },
        ),
      );
      timed("docker save (cache)", () => {
        d.dockerOk(["save", "-o", `${cached}.tmp`, image], { timeoutMs: 600_000 });
        fs.renameSync(`${cached}.tmp`, cached);
        // keep only the current image: older ones belong to build contexts that no longer exist
        for (const f of fs.readdirSync(TEST_CACHE)) {
          if (/^workspace-core-.*\.tar$/.test(f) && path.join(TEST_CACHE, f) !== cached) fs.rmSync(path.join(TEST_CACHE, f), { force: true });
        }
      });
    }

    // the user's storage, as users.sh/baseline.sh leave it: subvolumes, owner uid, shared caches setgid mlusers
    data = path.join(d.btrfs, "storage");
    fs.mkdirSync(data);
    for (const sub of ["homes", "workspaces", "docker-volumes", "cache"]) fs.mkdirSync(path.join(data, sub));
    home = path.join(data, "homes", USER);
    sh("btrfs", ["-q", "subvolume", "create", home]);
    sh("btrfs", ["-q", "subvolume", "create", path.join(data, "workspaces", USER)]);
    sh("btrfs", ["-q", "subvolume", "create", path.join(data, "docker-volumes", USER)]);
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
      "--name", NAME, "--hostname", NAME, ...PRIVILEGED,
      "--cpuset-cpus", LIMITS.cpuset, "--memory", `${LIMITS.memoryMb}m`, "--memory-reservation", `${LIMITS.reservationMb}m`,
      "--memory-swap", `${LIMITS.swapMb}m`, "--shm-size", `${LIMITS.shmMb}m`, "--stop-timeout", String(WORKSPACE_STOP_TIMEOUT_S),
      "-p", `127.0.0.1:${port}:${WORKSPACE_PORTS.ssh}`,
      ...Object.entries(workspaceEnv({ user: USER, uid: UID, sharedGid: SHARED_GID })).flatMap(([k, v]) => ["-e", `${k}=${v}`]),
      ...mounts.flatMap((m) => ["--mount", `type=bind,source=${m.source},target=${m.target}${m.readOnly ? ",readonly" : ""}`]),
      image,
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
    expect(groups).toEqual([USER, "docker", "mlusers", "sudo"].sort());
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

  test("Docker-in-Docker: the user talks to the inner dockerd, whose data is on the state mount", () => {
    const r = ssh("docker info --format '{{.DockerRootDir}} {{.Driver}}'");
    expect(r.stderr).toBe("");
    expect(r.stdout.trim().split(" ")[0]).toBe(WORKSPACE_DIND_DATA_ROOT);
    expect(fs.readdirSync(path.join(data, "docker-volumes", USER, "docker"))).toEqual(expect.arrayContaining(["image", "containers"]));
  });

  test("the limits read back exactly through docker inspect; privileged for DinD", () => {
    const hc = JSON.parse(d.dockerOk(["inspect", "--format", "{{json .HostConfig}}", NAME]));
    expect({
      CpusetCpus: hc.CpusetCpus,
      Memory: hc.Memory,
      MemoryReservation: hc.MemoryReservation,
      MemorySwap: hc.MemorySwap,
      ShmSize: hc.ShmSize,
      Privileged: hc.Privileged,
    }).toEqual({
      CpusetCpus: LIMITS.cpuset,
      Memory: LIMITS.memoryMb * 2 ** 20,
      MemoryReservation: LIMITS.reservationMb * 2 ** 20,
      MemorySwap: LIMITS.swapMb * 2 ** 20,
      ShmSize: LIMITS.shmMb * 2 ** 20,
      Privileged: PRIVILEGED.includes("--privileged"),
    });
    expect(WORKSPACE_PRIVILEGED).toBe(true);
    expect(exec(["cat", "/sys/fs/cgroup/cpuset/cpuset.cpus"]).stdout.trim()).toBe(LIMITS.cpuset);
    expect(exec(["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]).stdout.trim()).toBe(String(LIMITS.memoryMb * 2 ** 20));
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
