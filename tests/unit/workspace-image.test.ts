/**
 * The workspace image's build context, read statically: the Dockerfile's pinning policy (a small parser of
 * instructions with line continuations), the agreement between the image's files and the contract constants in
 * components/render/workspace-image.ts, and the content hash. (The image built and run for real:
 * tests/host/workspace-image.test.ts.)
 */
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { WORKSPACE_ROUTES } from "../../components/routes";
import {
  WORKSPACE_CACHE_ENV,
  WORKSPACE_CACHE_MOUNTS,
  WORKSPACE_DIND_DATA_ROOT,
  WORKSPACE_ENV,
  WORKSPACE_PASSWORD_FILE,
  WORKSPACE_PORTS,
  WORKSPACE_PROGRAMS,
  WORKSPACE_STATE_DIR,
  WORKSPACE_STOP_TIMEOUT_S,
  WORKSPACE_USER_STOP_GRACE_S,
  WORKSPACE_TARGETS,
  workspaceEnv,
  workspaceImageHash,
  workspaceMounts,
} from "../../components/render/workspace-image";

const DIR = path.resolve(__dirname, "..", "..", "images", "workspace");
const read = (f: string): string => fs.readFileSync(path.join(DIR, f), "utf8");

// ---- a small Dockerfile parser ----------------------------------------------------------------------------------
interface Instruction {
  cmd: string; // upper-case keyword
  args: string; // the rest, continuations joined
  line: number; // 1-based line of the keyword
  stage: string; // name (or index) of the stage it belongs to ("" before the first FROM)
}

/** Instructions of a Dockerfile: comments and blank lines dropped, `\` continuations joined (comment lines inside a
 * continued instruction are skipped, as Docker does). */
function parseDockerfile(text: string): Instruction[] {
  const out: Instruction[] = [];
  const lines = text.split("\n");
  let stage = "";
  let stages = 0;
  for (let i = 0; i < lines.length; i++) {
    const first = lines[i];
    if (!first.trim() || first.trim().startsWith("#")) continue;
    const start = i;
    let body = first;
    while (/\\\s*$/.test(body) && i + 1 < lines.length) {
      body = body.replace(/\\\s*$/, " ");
      i++;
      if (lines[i].trim().startsWith("#")) {
        body += "\\"; // keep continuing past a comment line
        continue;
      }
      body += lines[i];
    }
    const m = /^\s*([A-Za-z]+)\s+([\s\S]*)$/.exec(body);
    if (!m) throw new Error(`Dockerfile line ${start + 1}: cannot parse "${first}"`);
    const cmd = m[1].toUpperCase();
    const args = m[2].replace(/\s+/g, " ").trim();
    if (cmd === "FROM") {
      const as = /\s+AS\s+(\S+)$/i.exec(args);
      stage = as ? as[1] : String(stages);
      stages++;
    }
    out.push({ cmd, args, line: start + 1, stage });
  }
  return out;
}

/** Shell-ish words of a command (quotes removed; no expansion). */
function words(cmd: string): string[] {
  return (cmd.match(/"[^"]*"|'[^']*'|\S+/g) ?? []).map((w) => w.replace(/^["']|["']$/g, ""));
}

/** Simple commands of a RUN line (split at &&, ||, ;, |). */
function commands(run: string): string[] {
  return run.split(/&&|\|\||;|\|/).map((c) => c.trim()).filter(Boolean);
}

/** Options that take a value, per tool (their value is not a package). */
const PIP_VALUE_OPTS = new Set(["--index-url", "-i", "--extra-index-url", "--python", "-p", "--target", "-t", "--prefix", "--constraint", "-c"]);
const APT_VALUE_OPTS = new Set(["-o", "-t", "--target-release"]);

/** Package arguments of every `pip install` / `uv pip install` / `apt-get install` in the RUN instructions. */
function installs(ins: Instruction[], tool: "pip" | "apt"): Array<{ pkg: string; line: number }> {
  const out: Array<{ pkg: string; line: number }> = [];
  for (const i of ins.filter((x) => x.cmd === "RUN")) {
    for (const c of commands(i.args)) {
      const w = words(c);
      const at =
        tool === "pip"
          ? w.findIndex((x, k) => /(^|\/)pip3?$/.test(x) && w[k + 1] === "install")
          : w.findIndex((x, k) => /(^|\/)apt(-get)?$/.test(x) && w.slice(k + 1).includes("install"));
      if (at < 0) continue;
      const rest = w.slice(w.indexOf("install", at) + 1);
      const valueOpts = tool === "pip" ? PIP_VALUE_OPTS : APT_VALUE_OPTS;
      for (let k = 0; k < rest.length; k++) {
        const x = rest[k];
        if (x.startsWith("-")) {
          if (tool === "pip" && (x === "-r" || x === "--requirement" || x === "-e" || x === "--editable")) {
            throw new Error(`line ${i.line}: ${x} hides packages from the pin check; list them in the Dockerfile`);
          }
          if (valueOpts.has(x)) k++;
          continue;
        }
        out.push({ pkg: x, line: i.line });
      }
    }
  }
  return out;
}

const dockerfile = read("Dockerfile");
const ins = parseDockerfile(dockerfile);
const stageOf = (name: string): Instruction[] => ins.filter((i) => i.stage === name);

describe("Dockerfile parser", () => {
  test("joins continuations, skips comments inside them, tracks stages", () => {
    const got = parseDockerfile("ARG A=1\n# c\nFROM x AS one\nRUN a \\\n  # inner comment\n  b \\\n  c\nFROM one AS two\nEXPOSE 1\n");
    expect(got.map((i) => [i.cmd, i.args, i.line, i.stage])).toEqual([
      ["ARG", "A=1", 1, ""],
      ["FROM", "x AS one", 3, "one"],
      ["RUN", "a b c", 4, "one"],
      ["FROM", "one AS two", 8, "two"],
      ["EXPOSE", "1", 9, "two"],
    ]);
  });
  test("finds pip and apt packages after their options", () => {
    const got = parseDockerfile(
      'FROM x\nRUN apt-get update && apt-get install -y --no-install-recommends a b=1.2 \\\n c && rm -rf /x\n' +
        'RUN /opt/uv/bin/uv pip install --python /v/bin/python --index-url https://i "t[x]==1" u==2 && pip install --no-cache-dir v==3\n',
    );
    expect(installs(got, "apt").map((p) => p.pkg)).toEqual(["a", "b=1.2", "c"]);
    expect(installs(got, "pip").map((p) => p.pkg)).toEqual(["t[x]==1", "u==2", "v==3"]);
  });
});

describe("Dockerfile policy", () => {
  test("the base image comes only from ARG BASE_IMAGE, with a pinned default; later stages build on earlier ones", () => {
    expect(ins[0].cmd).toBe("ARG");
    const m = /^BASE_IMAGE=(\S+)$/.exec(ins[0].args);
    expect(m).not.toBeNull();
    expect(m![1]).toMatch(/^[a-z0-9./-]+:[A-Za-z0-9._-]+$/); // a tag is given
    expect(m![1]).not.toMatch(/:latest$/);
    const froms = ins.filter((i) => i.cmd === "FROM");
    expect(froms.length).toBeGreaterThanOrEqual(2);
    const seen: string[] = [];
    for (const f of froms) {
      const image = f.args.split(" ")[0];
      expect(image === "${BASE_IMAGE}" || image === "$BASE_IMAGE" || seen.includes(image)).toBe(true);
      seen.push(f.stage);
    }
    expect(froms[0].args.split(" ")[0]).toBe("${BASE_IMAGE}");
    expect(seen).toEqual(Object.values(WORKSPACE_TARGETS)); // in stage order; `workspace` is last: the default target
  });

  test("no `latest` anywhere", () => {
    for (const i of ins) expect(`${i.line}: ${i.args}`).not.toMatch(/[:/]latest\b|\blatest\.(tar|deb|zip)/);
  });

  test("every pip/uv package is pinned with ==version", () => {
    const pkgs = installs(ins, "pip");
    expect(pkgs.length).toBeGreaterThan(10);
    for (const p of pkgs) expect(`${p.line}: ${p.pkg}`).toMatch(/^\d+: [A-Za-z0-9_.-]+(\[[A-Za-z0-9_,-]+\])?==\d[A-Za-z0-9.+!-]*$/);
  });

  test("every apt package is pinned or in apt-allowlist.txt with a reason, and the allowlist has no stale entry", () => {
    const allow = new Map<string, string>();
    for (const l of read("apt-allowlist.txt").split("\n")) {
      if (!l.trim() || l.startsWith("#")) continue;
      const m = /^([a-z0-9][a-z0-9.+-]*): (.*\S.*)$/.exec(l);
      expect(m).not.toBeNull(); // `package: reason`, the reason non-empty
      expect(allow.has(m![1])).toBe(false);
      allow.set(m![1], m![2]);
    }
    const pkgs = installs(ins, "apt");
    expect(pkgs.length).toBeGreaterThan(20);
    const unjustified = pkgs.filter((p) => !/=[^=]+$/.test(p.pkg) && !allow.has(p.pkg)).map((p) => `line ${p.line}: ${p.pkg}`);
    expect(unjustified).toEqual([]);
    const used = new Set(pkgs.map((p) => p.pkg.replace(/=.*$/, "")));
    expect([...allow.keys()].filter((k) => !used.has(k))).toEqual([]);
  });

  test("every download is checked against a pinned checksum in the same RUN", () => {
    const runs = ins.filter((i) => i.cmd === "RUN" && /\b(curl|wget)\b[^&|;]*https?:\/\//.test(i.args));
    expect(runs.length).toBeGreaterThan(0);
    for (const r of runs) {
      expect(`${r.line}: ${r.args}`).toMatch(/sha(256|512)sum -c/);
      // one pinned checksum (an ARG with the hex digest) for every file downloaded in this RUN
      const downloads = [...r.args.matchAll(/\b(curl|wget)\b[^&|;]*https?:\/\//g)].length;
      const sumArgs = [...new Set([...r.args.matchAll(/\$\{([A-Z0-9_]+_SHA(?:256|512))\}/g)].map((m) => m[1]))];
      expect(`${r.line}: ${sumArgs.length} checksums for ${downloads} downloads`).toBe(`${r.line}: ${downloads} checksums for ${downloads} downloads`);
      for (const sumArg of sumArgs) {
        const def = ins.find((i) => i.cmd === "ARG" && i.args.startsWith(`${sumArg}=`));
        expect(`${sumArg}: ${def?.args}`).toMatch(sumArg.endsWith("SHA512") ? /=[0-9a-f]{128}$/ : /=[0-9a-f]{64}$/);
      }
    }
  });

  test("HEALTHCHECK, ENTRYPOINT and the internal ports", () => {
    const core = stageOf(WORKSPACE_TARGETS.core);
    const full = stageOf(WORKSPACE_TARGETS.full);
    expect(core.find((i) => i.cmd === "HEALTHCHECK")?.args).toMatch(/CMD \["supervisorctl", .*"status"\]/);
    expect(core.find((i) => i.cmd === "ENTRYPOINT")?.args).toBe('["/usr/local/sbin/workspace-entrypoint"]');
    expect(core.some((i) => i.cmd === "COPY" && i.args === "entrypoint.sh /usr/local/sbin/workspace-entrypoint")).toBe(true);
    const ports = (stage: Instruction[]): number[] => stage.filter((i) => i.cmd === "EXPOSE").flatMap((i) => i.args.split(" ").map(Number));
    expect(ports(core)).toEqual([WORKSPACE_PORTS.ssh]);
    expect(ports(full).sort()).toEqual([WORKSPACE_PORTS.codeServer, WORKSPACE_PORTS.jupyter, WORKSPACE_PORTS.vnc].sort());
    // no secret ever passes through the image's environment
    for (const i of ins.filter((x) => x.cmd === "ENV" || x.cmd === "ARG")) expect(i.args).not.toMatch(/PASS|SECRET|TOKEN/i);
  });

  test("every file of the build context is used by a COPY (except the allowlist), and every COPY source exists", () => {
    const copied = ins
      .filter((i) => i.cmd === "COPY")
      .flatMap((i) => {
        const w = i.args.split(" ").filter((x) => !x.startsWith("--"));
        return w.slice(0, -1);
      });
    for (const c of copied) expect(fs.existsSync(path.join(DIR, c))).toBe(true);
    const files: string[] = [];
    const walk = (d: string): void => {
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        const p = path.join(d, e.name);
        if (e.isDirectory()) walk(p);
        else files.push(path.relative(DIR, p));
      }
    };
    walk(DIR);
    expect(files.filter((f) => f !== "Dockerfile" && f !== "apt-allowlist.txt" && !copied.includes(f))).toEqual([]);
  });
});

describe("image files agree with the contract in components/render/workspace-image.ts", () => {
  test("cache.env is WORKSPACE_CACHE_ENV, and every cache variable points into a /cache mount", () => {
    const env: Record<string, string> = {};
    for (const l of read("cache.env").split("\n")) {
      if (!l.trim() || l.startsWith("#")) continue;
      const m = /^([A-Za-z_][A-Za-z0-9_]*)=(\/[A-Za-z0-9/_.-]+)$/.exec(l);
      expect(m).not.toBeNull(); // plain KEY=/path: pam_env and sh read the same file
      env[m![1]] = m![2];
    }
    expect(env).toEqual(WORKSPACE_CACHE_ENV);
    for (const v of Object.values(env)) expect(WORKSPACE_CACHE_MOUNTS.some((c) => v === `/cache/${c}` || v.startsWith(`/cache/${c}/`))).toBe(true);
    expect(env.HF_HOME).toBeUndefined(); // the HF token must stay in the user's home
  });

  test("the entrypoint reads exactly the documented variables and the password file", () => {
    const ep = read("entrypoint.sh");
    for (const v of Object.values(WORKSPACE_ENV)) expect(ep).toContain(`\${${v}`);
    const used = new Set([...ep.matchAll(/\$\{(WORKSPACE_[A-Z_]+)/g)].map((m) => m[1]));
    expect([...used].sort()).toEqual(Object.values(WORKSPACE_ENV).sort());
    expect(ep).toContain(`PASSWORD_FILE=${WORKSPACE_PASSWORD_FILE}`);
    expect(ep).toContain(`STATE_DIR=${WORKSPACE_STATE_DIR}`);
    expect(ep.split("\n")[0]).toBe("#!/usr/bin/env bash");
    expect(ep).toMatch(/^set -euo pipefail$/m);
    expect(ep).not.toMatch(/set -x|xtrace/); // would print the password
    expect(ep).not.toMatch(/chown -R|chown --recursive/);
    expect(ep).toMatch(/useradd -M /); // never creates or fills the home
  });

  test("supervisord programs per stage are WORKSPACE_PROGRAMS", () => {
    const programs = (stage: string): string[] =>
      stageOf(stage)
        .filter((i) => i.cmd === "COPY" && i.args.startsWith("supervisor/"))
        .flatMap((i) => i.args.split(" ").slice(0, -1))
        .flatMap((f) => [...read(f).matchAll(/^\[program:([^\]]+)\]/gm)].map((m) => m[1]));
    expect(programs(WORKSPACE_TARGETS.core).sort()).toEqual([...WORKSPACE_PROGRAMS.core]);
    expect([...programs(WORKSPACE_TARGETS.core), ...programs(WORKSPACE_TARGETS.full)].sort()).toEqual([...WORKSPACE_PROGRAMS.full]);
  });

  test("a stop fits in the stop timeout: the user's processes first (graceful-stop, highest priority), then dockerd, then the rest", () => {
    const conf = (f: string) => {
      const text = read(f);
      return { priority: Number(/^priority=(\d+)$/m.exec(text)?.[1] ?? 999), stopwait: Number(/^stopwaitsecs=(\d+)$/m.exec(text)?.[1] ?? 10) };
    };
    const all = ["graceful-stop", "dockerd", "sshd", "code-server", "jupyter", "x2go-cleansessions"].map((p) => ({ p, ...conf(`supervisor/${p}.conf`) }));
    const graceful = all.find((x) => x.p === "graceful-stop")!;
    // supervisord stops the highest priority number first
    for (const x of all) if (x.p !== "graceful-stop") expect({ p: x.p, before: graceful.priority > x.priority }).toEqual({ p: x.p, before: true });
    expect(read("graceful-stop.sh")).toContain(`WORKSPACE_USER_STOP_GRACE_S:-${WORKSPACE_USER_STOP_GRACE_S}}`);
    expect(graceful.stopwait).toBeGreaterThan(WORKSPACE_USER_STOP_GRACE_S);
    // the user's programs (code-server, jupyter) end with the user's processes; what is left: dockerd, sshd, x2go
    const rest = all.filter((x) => ["dockerd", "sshd", "x2go-cleansessions"].includes(x.p)).reduce((a, x) => a + x.stopwait, 0);
    expect(WORKSPACE_USER_STOP_GRACE_S + rest).toBeLessThanOrEqual(WORKSPACE_STOP_TIMEOUT_S);
  });

  test("sshd keeps its host keys and dockerd its data on the state mount; sshd is keys-only on port 22", () => {
    const sshd = read("sshd_config");
    expect(sshd).toMatch(new RegExp(`^Port ${WORKSPACE_PORTS.ssh}$`, "m"));
    const keys = [...sshd.matchAll(/^HostKey (\S+)$/gm)].map((m) => m[1]);
    expect(keys.length).toBe(2);
    for (const k of keys) expect(k.startsWith(`${WORKSPACE_STATE_DIR}/ssh/`)).toBe(true);
    expect(sshd).toMatch(/^PasswordAuthentication no$/m);
    expect(sshd).toMatch(/^PermitRootLogin no$/m);
    expect(read("supervisor/dockerd.conf")).toMatch(new RegExp(`^command=/usr/local/bin/workspace-dockerd --data-root=${WORKSPACE_DIND_DATA_ROOT}$`, "m"));
    // the user's own daemon, run as the user (supervisord expands the container's environment)
    expect(read("supervisor/dockerd.conf")).toMatch(/^user=%\(ENV_WORKSPACE_USER\)s$/m);
    expect(read("supervisor/dockerd.conf")).toContain('XDG_RUNTIME_DIR="/run/user/%(ENV_WORKSPACE_UID)s"');
    expect(read("supervisor/code-server.conf")).toContain(`0.0.0.0:${WORKSPACE_PORTS.codeServer}`);
    expect(read("supervisor/jupyter.conf")).toContain(`--port=${WORKSPACE_PORTS.jupyter}`);
  });

  test("the user's TensorBoard listens on loopback only, under the path code-server's proxy passes on (the route's entry path)", () => {
    const tb = read("supervisor/tensorboard.conf");
    const entry = WORKSPACE_ROUTES.tensorboard.entryPath!;
    expect(entry).toBe(`/absproxy/${WORKSPACE_PORTS.tensorboard}/`);
    expect(WORKSPACE_ROUTES.tensorboard.port).toBe(WORKSPACE_PORTS.codeServer);
    expect(tb).toContain(` --host=127.0.0.1 --port=${WORKSPACE_PORTS.tensorboard} --path_prefix=${entry.replace(/\/$/, "")} `);
    expect(tb).toContain("--logdir=/shared/tensorboard/%(ENV_WORKSPACE_USER)s ");
    expect(tb).toMatch(/^user=%\(ENV_WORKSPACE_USER\)s$/m);
    expect(tb).not.toMatch(/0\.0\.0\.0|--bind_all/);
  });
});

describe("workspaceImageHash", () => {
  const copy = (): string => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), "ws-hash-"));
    fs.cpSync(DIR, d, { recursive: true });
    return d;
  };
  const dirs: string[] = [];
  afterAll(() => dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));

  test("depends on the relative paths and contents only", () => {
    const base = workspaceImageHash(DIR);
    expect(base).toMatch(/^[0-9a-f]{64}$/);
    const d = copy();
    dirs.push(d);
    expect(workspaceImageHash(d)).toBe(base); // another location
    fs.utimesSync(path.join(d, "Dockerfile"), new Date(0), new Date(0));
    fs.chmodSync(path.join(d, "cache.env"), 0o600);
    expect(workspaceImageHash(d)).toBe(base); // mtime and mode: no change
    fs.appendFileSync(path.join(d, "supervisor", "sshd.conf"), "\n");
    const changed = workspaceImageHash(d);
    expect(changed).not.toBe(base); // one byte of one config
    fs.renameSync(path.join(d, "profile.sh"), path.join(d, "profile2.sh"));
    expect(workspaceImageHash(d)).not.toBe(changed); // a rename
    fs.mkdirSync(path.join(d, "empty"));
    const renamed = workspaceImageHash(d);
    fs.writeFileSync(path.join(d, "empty", "new"), "");
    expect(workspaceImageHash(d)).not.toBe(renamed); // a new empty file
  });

  test("refuses symlinks in the build context", () => {
    const d = copy();
    dirs.push(d);
    fs.symlinkSync("/etc/passwd", path.join(d, "link"));
    expect(() => workspaceImageHash(d)).toThrow(/not a regular file/);
  });

  test("the default directory is the repository's images/workspace (run from the repo root)", () => {
    const cwd = process.cwd();
    process.chdir(path.resolve(DIR, "..", ".."));
    try {
      expect(workspaceImageHash()).toBe(workspaceImageHash(DIR));
    } finally {
      process.chdir(cwd);
    }
  });
});

describe("workspaceMounts / workspaceEnv", () => {
  test("one user's mounts and environment", () => {
    const m = workspaceMounts({
      user: "alice",
      home: "/mnt/storage/homes/alice",
      scratch: "/mnt/storage/workspaces/alice",
      state: "/mnt/storage/docker-volumes/alice",
      cacheRoot: "/mnt/storage/cache",
      passwordFile: "/etc/train-server/workspace/alice.password",
    });
    expect(m).toEqual([
      { source: "/mnt/storage/homes/alice", target: "/home/alice", readOnly: false },
      { source: "/mnt/storage/workspaces/alice", target: "/workspace", readOnly: false },
      { source: "/mnt/storage/docker-volumes/alice", target: WORKSPACE_STATE_DIR, readOnly: false },
      { source: "/etc/train-server/workspace/alice.password", target: WORKSPACE_PASSWORD_FILE, readOnly: true },
      ...WORKSPACE_CACHE_MOUNTS.map((c) => ({ source: `/mnt/storage/cache/${c}`, target: `/cache/${c}`, readOnly: false })),
    ]);
    expect(workspaceEnv({ user: "alice", uid: 1003 })).toEqual({
      WORKSPACE_USER: "alice",
      WORKSPACE_UID: "1003",
      WORKSPACE_GID: "1003",
      WORKSPACE_SHARED_GROUP: "mlusers",
      WORKSPACE_SHARED_GID: "2000",
    });
  });
  test("rejects bad names, uids and relative paths", () => {
    expect(() => workspaceEnv({ user: "root", uid: 1000 })).toThrow(/non-root/);
    expect(() => workspaceEnv({ user: "bob", uid: 999 })).toThrow(/1000\.\.59999/);
    expect(() =>
      workspaceMounts({ user: "bob", home: "homes/bob", scratch: "/s", state: "/st", cacheRoot: "/c", passwordFile: "/p" }),
    ).toThrow(/absolute/);
    // another user's snapshot directory or spool is never mounted into bob's workspace
    const base = { user: "bob", home: "/h/bob", scratch: "/s", state: "/st", cacheRoot: "/c" };
    expect(() => workspaceMounts({ ...base, snapshots: "/mnt/storage/.snapshots/homes/alice" })).toThrow(/snapshots .* is not bob's own directory/);
    expect(() => workspaceMounts({ ...base, restoreSpool: "/var/lib/train-server/restore" })).toThrow(/restoreSpool .* is not bob's own directory/);
    expect(workspaceMounts({ ...base, snapshots: "/a/bob", restoreSpool: "/r/bob" }).slice(-2)).toEqual([
      { source: "/a/bob", target: "/snapshots", readOnly: true },
      { source: "/r/bob", target: "/run/train-server-restore", readOnly: false },
    ]);
  });
});
