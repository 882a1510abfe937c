/**
 * The program's SSH connection against a real sshd (OpenSSH from Debian, on 127.0.0.1, its own host keys):
 *   - the Docker provider's ssh options (dockerSshOpts) with host.hostKey pinned: the right key logs in with no
 *     known_hosts file anywhere; a wrong key stops ssh before authentication, so nothing on stdin (a bundle) runs;
 *   - the rendered sshd drop-in's MaxStartups: with 40 connections still unauthenticated (as on a first `up`,
 *     when the Docker provider dials one ssh per container), 15 more logins all succeed; under OpenSSH's default
 *     10:30:100 the same load drops some (the control that shows the load is real).
 */
import { ChildProcess, spawn, spawnSync } from "child_process";
import * as fs from "fs";
import * as net from "net";
import * as path from "path";
import { parseConfig } from "../../components/config";
import { renderSshdConfig } from "../../components/render/baseline";
import { dockerSshOpts } from "../../components/services";
import { stackRaw, clone } from "../helpers/program";
import { Scratch, sh } from "../helpers/host";

jest.setTimeout(120_000);

const scratch = new Scratch("ts-ssh-");
const dir = scratch.dir;
const sshd: ChildProcess[] = [];
afterAll(() => {
  for (const p of sshd) if (p.exitCode === null) p.kill("SIGKILL");
  scratch.cleanup();
});

function keygen(name: string): string {
  sh("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "", "-f", path.join(dir, name)]);
  return fs.readFileSync(path.join(dir, `${name}.pub`), "utf8").trim();
}

const hostKey = keygen("host_ed25519");
const otherKey = keygen("other_ed25519");
const clientPub = keygen("client");
fs.writeFileSync(path.join(dir, "authorized_keys"), `${clientPub}\n`, { mode: 0o600 });
fs.mkdirSync("/run/sshd", { recursive: true });

/** Start a real sshd on 127.0.0.1:<port> with `extra` directives; resolves once it accepts connections. */
async function startSshd(port: number, extra: string[]): Promise<void> {
  const cfg = path.join(dir, `sshd-${port}.conf`);
  fs.writeFileSync(
    cfg,
    [
      ...extra,
      `ListenAddress 127.0.0.1:${port}`,
      `HostKey ${path.join(dir, "host_ed25519")}`,
      `AuthorizedKeysFile ${path.join(dir, "authorized_keys")}`,
      `PidFile ${path.join(dir, `sshd-${port}.pid`)}`,
      "PermitRootLogin prohibit-password",
      "StrictModes no",
      "UsePAM no",
      "",
    ].join("\n"),
  );
  const t = spawnSync("/usr/sbin/sshd", ["-t", "-f", cfg], { encoding: "utf8" });
  expect(t.stderr).toBe("");
  const p = spawn("/usr/sbin/sshd", ["-D", "-e", "-f", cfg], { stdio: ["ignore", "ignore", "pipe"] });
  sshd.push(p);
  for (let i = 0; i < 100; i++) {
    if (await new Promise<boolean>((res) => { const s = net.connect(port, "127.0.0.1", () => { s.destroy(); res(true); }); s.on("error", () => res(false)); })) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`sshd on ${port} did not start`);
}

/** The prod stack's config with host.hostKey = `key` (the connection as the program builds it). */
function configWith(key: string) {
  const raw = clone(stackRaw("prod"));
  raw.host.hostKey = key;
  return parseConfig(raw);
}

/** ssh as the Docker provider would (its options), as root to 127.0.0.1:port, running `remote` with `input`. */
function ssh(opts: string[], port: number, remote: string, input = "") {
  const home = fs.mkdtempSync(path.join(dir, "home-")); // an empty HOME: no known_hosts, no config, no agent
  const r = spawnSync("ssh", [...opts, "-F", "/dev/null", "-i", path.join(dir, "client"), "-p", String(port), "root@127.0.0.1", remote], {
    input,
    encoding: "utf8",
    timeout: 30_000,
    env: { PATH: process.env.PATH, HOME: home },
  });
  return { status: r.status ?? -1, stdout: r.stdout ?? "", stderr: r.stderr ?? "" };
}

function spawnSsh(opts: string[], port: number): Promise<number> {
  return new Promise((res) => {
    const p = spawn("ssh", [...opts, "-F", "/dev/null", "-i", path.join(dir, "client"), "-p", String(port), "root@127.0.0.1", "true"], {
      stdio: "ignore",
      env: { PATH: process.env.PATH, HOME: dir },
    });
    p.on("exit", (code) => res(code ?? -1));
  });
}

describe("host key pinning (dockerSshOpts)", () => {
  const port = 42000 + (process.pid % 1000);
  beforeAll(() => startSshd(port, []));

  test("the pinned key logs in, with no known_hosts file anywhere", () => {
    const r = ssh(dockerSshOpts(configWith(hostKey)), port, "echo pinned-ok");
    expect(r.stderr).not.toMatch(/Host key verification failed/);
    expect(r.stdout.trim()).toBe("pinned-ok");
  });

  test("a wrong key stops ssh before authentication: the bundle on stdin never runs", () => {
    const marker = path.join(dir, "bundle-ran");
    const r = ssh(dockerSshOpts(configWith(otherKey)), port, "bash -s", `touch ${marker}\n`);
    expect(r.status).toBe(255);
    expect(r.stderr).toMatch(/Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED/);
    expect(fs.existsSync(marker)).toBe(false);
    // the same bundle through the right key does run: the marker test can fail
    expect(ssh(dockerSshOpts(configWith(hostKey)), port, "bash -s", `touch ${marker}\n`).status).toBe(0);
    expect(fs.existsSync(marker)).toBe(true);
  });

  test("the user's own known_hosts cannot widen the trust: a matching entry there does not help a wrong pin", () => {
    const home = fs.mkdtempSync(path.join(dir, "home-kh-"));
    fs.mkdirSync(path.join(home, ".ssh"));
    fs.writeFileSync(path.join(home, ".ssh", "known_hosts"), `[127.0.0.1]:${port} ${hostKey}\n`);
    const r = spawnSync("ssh", [...dockerSshOpts(configWith(otherKey)), "-F", "/dev/null", "-i", path.join(dir, "client"), "-p", String(port), "root@127.0.0.1", "true"], {
      encoding: "utf8",
      env: { PATH: process.env.PATH, HOME: home },
    });
    expect(r.status).toBe(255);
  });
});

describe("sshd MaxStartups under a first up's burst of connections", () => {
  const rendered = renderSshdConfig({ sshPort: 22, lanCidr: "10.0.0.0/8", userPortRange: { from: 2222, to: 62999 }, adminUser: "ops", dataRoot: "/mnt/storage/docker-data", ramGb: 8, reservedRamGb: 2, gpuCount: 0 });
  const maxStartups = rendered.split("\n").filter((l) => l.startsWith("MaxStartups"));

  /** Hold `idle` TCP connections open without a word (unauthenticated), then run `logins` ssh logins at once. */
  async function burst(port: number, idle: number, logins: number): Promise<number[]> {
    const sockets: net.Socket[] = [];
    for (let i = 0; i < idle; i++) {
      const s = net.connect(port, "127.0.0.1");
      s.on("error", () => undefined);
      sockets.push(s);
    }
    await new Promise((r) => setTimeout(r, 1500)); // every idle connection accepted and forked by sshd
    const opts = dockerSshOpts(configWith(hostKey));
    const codes = await Promise.all(Array.from({ length: logins }, () => spawnSsh(opts, port)));
    for (const s of sockets) s.destroy();
    return codes;
  }

  test("the rendered config: 40 unauthenticated + 15 logins at once, every login succeeds", async () => {
    expect(maxStartups).toEqual(["MaxStartups 64:30:128"]);
    const port = 43000 + (process.pid % 1000);
    await startSshd(port, maxStartups);
    const codes = await burst(port, 40, 15);
    expect(codes.filter((c) => c !== 0)).toEqual([]);
  });

  test("control: OpenSSH's default 10:30:100 drops logins under the same load", async () => {
    const port = 44000 + (process.pid % 1000);
    await startSshd(port, ["MaxStartups 10:30:100"]);
    const codes = await burst(port, 40, 15);
    expect(codes.filter((c) => c !== 0).length).toBeGreaterThan(0);
  });
});
