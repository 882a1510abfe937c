/**
 * .github/ssh-through-tunnel.sh, CI's way to the server, run for real with bash against recording fakes of the
 * tools it calls (ssh, ssh-agent, ssh-add, curl, dpkg, sudo, ip, cloudflared, sleep): the probe logs in as the
 * stack's admin (SSH_USER), not as the runner's own account; known_hosts and the agent are set up; the tunnel
 * listens where the stack's connection dials; a server that never answers fails with a message.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { REPO, Scratch } from "../helpers/host";

const scratch = new Scratch("ts-cissh-");
afterAll(() => scratch.cleanup());

const SCRIPT = path.join(REPO, ".github", "ssh-through-tunnel.sh");
const FAKES = ["ssh", "ssh-agent", "ssh-add", "curl", "dpkg", "sudo", "ip", "cloudflared", "sleep"];

/** Run the script with fakes that log `name args...`; the fake ssh succeeds from its `okAfter`-th call on. */
function run(env: Record<string, string>, okAfter = 1) {
  const dir = fs.mkdtempSync(path.join(scratch.dir, "run-"));
  const bin = path.join(dir, "bin");
  fs.mkdirSync(bin);
  const log = path.join(dir, "calls.log");
  for (const f of FAKES) {
    let body = `echo "${f} $*" >>${log}\n`;
    if (f === "ssh-agent") body += `echo "SSH_AUTH_SOCK=/tmp/agent.sock; export SSH_AUTH_SOCK; SSH_AGENT_PID=4242; export SSH_AGENT_PID;"\n`;
    if (f === "ssh-add") body += "cat >/dev/null\n";
    if (f === "sudo") body += 'if [ "$1" = "-b" ]; then shift; fi; "$@"\n';
    if (f === "ssh") body += `n=$(grep -c '^ssh ' ${log}); [ "$n" -ge ${okAfter} ]\n`;
    fs.writeFileSync(path.join(bin, f), `#!/bin/bash\n${body}`, { mode: 0o755 });
  }
  const home = path.join(dir, "home");
  fs.mkdirSync(home);
  const githubEnv = path.join(dir, "github_env");
  const r = spawnSync("bash", [SCRIPT], {
    encoding: "utf8",
    env: { PATH: `${bin}:/usr/bin:/bin`, HOME: home, GITHUB_ENV: githubEnv, USER: "runner", ...env },
  });
  return {
    status: r.status,
    stderr: r.stderr,
    calls: fs.existsSync(log) ? fs.readFileSync(log, "utf8").trim().split("\n") : [],
    knownHosts: fs.readFileSync(path.join(home, ".ssh", "known_hosts"), "utf8"),
    githubEnv: fs.existsSync(githubEnv) ? fs.readFileSync(githubEnv, "utf8") : "",
  };
}

const BASE = { SSH_KEY: "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----", SSH_KNOWN_HOSTS: "192.168.1.50 ssh-ed25519 AAAAC3Nz" };
const TUNNEL = { ...BASE, SSH_HOSTNAME: "ssh.example.com", SSH_ADDRESS: "192.168.1.50", SSH_PORT: "22", SSH_USER: "ops", CF_ACCESS_CLIENT_ID: "id.access", CF_ACCESS_CLIENT_SECRET: "s3cret" };

test("self-hosted runner (no SSH_HOSTNAME): only the key and known_hosts; no tunnel, no probe", () => {
  const r = run(BASE);
  expect(r.status).toBe(0);
  expect(r.knownHosts).toBe(`${BASE.SSH_KNOWN_HOSTS}\n`);
  expect(r.githubEnv).toContain("SSH_AUTH_SOCK=/tmp/agent.sock");
  expect(r.calls.filter((c) => /^(cloudflared|ssh) /.test(c))).toEqual([]);
});

test("hosted runner: the tunnel listens on host.address:sshPort and the probe logs in as SSH_USER, strictly", () => {
  const r = run(TUNNEL);
  expect(r.status).toBe(0);
  expect(r.calls).toContain("ip addr add 192.168.1.50/32 dev lo");
  expect(r.calls).toContain("cloudflared access tcp --hostname ssh.example.com --url 192.168.1.50:22 --service-token-id id.access --service-token-secret s3cret --loglevel warn");
  const probes = r.calls.filter((c) => c.startsWith("ssh "));
  expect(probes).toEqual(["ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -p 22 ops@192.168.1.50 true"]);
});

test("the probe retries while the tunnel comes up, then succeeds", () => {
  const r = run(TUNNEL, 3);
  expect(r.status).toBe(0);
  expect(r.calls.filter((c) => c.startsWith("ssh "))).toHaveLength(3);
});

test("without SSH_USER the script refuses, naming the variable (it never probes as the runner's account)", () => {
  const { SSH_USER: _omit, ...noUser } = TUNNEL;
  const r = run(noUser);
  expect(r.status).not.toBe(0);
  expect(r.stderr).toContain("TRAIN_SERVER_SSH_USER");
  expect(r.calls.filter((c) => c.startsWith("ssh "))).toEqual([]);
});

test("a server that never answers fails after 30 tries with where it looked", () => {
  const r = run(TUNNEL, 1000);
  expect(r.status).toBe(1);
  expect(r.calls.filter((c) => c.startsWith("ssh "))).toHaveLength(30);
  expect(r.stderr).toContain("not reachable through the tunnel at ops@192.168.1.50:22 (route ssh.example.com)");
});
