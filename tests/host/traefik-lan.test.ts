/**
 * Issue 12 point 7 for real: the admin routes are not open to the whole office LAN.
 *
 * The real Traefik of SERVICE_IMAGES (v3.1.6, built from its Go module by tests/helpers/build-traefik.sh and cached)
 * runs with the program's own flags (`traefikCommand()`, plus only the Docker endpoint of the test's daemon) in a
 * network namespace, "the server". Its Docker provider reads the program's own labels (`traefikLabels`, for the
 * routes of the prod stack) from tiny backend containers (perl on the debootstrap base) on a `train-server` network of
 * a private dockerd. Requests come from:
 *   - two office machines in two more namespaces, on a LAN bridge inside the server's namespace: A (10.233.N.10, the
 *     one host.adminSources entry) and B (10.233.N.20);
 *   - the host itself, from the train-server network's gateway: exactly how docker-proxy forwards the tunnel
 *     entrypoint's 127.0.0.1 port to Traefik's container, i.e. what cloudflared's requests look like to Traefik;
 *   - a "workspace" container on the train-server network (a workspace shares that network with Traefik).
 * Each 200 is checked to come from the right backend for the right Host, with the client's address in
 * X-Forwarded-For; each refusal is Traefik's own (its API lists the routers and middlewares the labels made), and
 * every refusal is paired with a request that differs only in its source and succeeds.
 * Then the default (no host.adminSources): the admin backend relabelled, and the LAN gets 404 for it.
 *
 * Only loopback and the test's own links are used: the 10.233.N LAN exists only inside the namespaces; the
 * 10.232.N services subnet is the private dockerd's (its bridge carries the gateway, as the helper's own bridge
 * does). Everything is released by the Scratch: traefik by pid, containers, the network, veths, namespaces.
 */
import { spawn, spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { parseConfig, ServerConfig } from "../../components/config";
import { traefikCommand, traefikLabels, tunnelSources } from "../../components/render/services";
import { buildRoutes, Route } from "../../components/routes";
import { SERVICE_IMAGES } from "../../components/services";
import { BOOKWORM_MINBASE, ensureDebootstrapRootfs, PrivateDockerd } from "../helpers/docker";
import { REPO, Scratch, sh } from "../helpers/host";
import { clone, stackRaw } from "../helpers/program";

// a cold run builds Traefik from source first (≈11 min on 2 busy cores)
jest.setTimeout(40 * 60_000);

const VERSION = SERVICE_IMAGES.traefik.split(":")[1];
const ID = crypto.randomBytes(3).toString("hex");
const NS = { server: `tslan${ID}s`, a: `tslan${ID}a`, b: `tslan${ID}b` };
const ROOT_VETH = `tsl${ID}v`;
const BRIDGE = `tsl${ID}br`;

/** A request's outcome: the HTTP status and body, or the connection error. */
interface Answer {
  status?: number;
  body?: string;
  /** the Location header of a redirect */
  location?: string;
  error?: string;
}

const CLIENT = `
const http = require("http");
const [url, host, extra] = process.argv.slice(1);
const req = http.get(url, { headers: { Host: host, ...(extra ? JSON.parse(extra) : {}) }, agent: false, timeout: 5000 }, (res) => {
  let body = "";
  res.setEncoding("utf8");
  res.on("data", (d) => (body += d));
  res.on("end", () => console.log(JSON.stringify({ status: res.statusCode, body, ...(res.headers.location ? { location: res.headers.location } : {}) })));
});
req.on("timeout", () => req.destroy(Object.assign(new Error("timeout"), { code: "TIMEOUT" })));
req.on("error", (e) => console.log(JSON.stringify({ error: e.code || e.message })));
`;

/** GET `url` with Host `host` (and `headers`) from network namespace `ns` (undefined: the host's own namespace). */
function get(ns: string | undefined, url: string, host: string, headers?: Record<string, string>): Answer {
  // url's path is sent as given (the backends answer every path)
  const cmd = [process.execPath, "-e", CLIENT, url, host, ...(headers ? [JSON.stringify(headers)] : [])];
  const r = ns ? spawnSync("ip", ["netns", "exec", ns, ...cmd], { encoding: "utf8" }) : spawnSync(cmd[0], cmd.slice(1), { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`client in ${ns ?? "host"} failed: ${r.stderr}`);
  return JSON.parse(r.stdout.trim());
}

/** The backends: answer every request with who they are, which port, the Host and X-Forwarded-For they got (and the
 * Access identity header, only when it arrived). */
const BACKEND = String.raw`
use strict; use IO::Socket::INET; use IO::Select;
my ($name, @ports) = @ARGV;
my $sel = IO::Select->new(map { IO::Socket::INET->new(LocalPort => $_, Listen => 16, ReuseAddr => 1, Proto => "tcp") or die "listen $_: $!" } @ports);
while (1) {
  for my $l ($sel->can_read) {
    my $c = $l->accept or next;
    my %h; my $line = <$c>;
    while (defined($line = <$c>)) { $line =~ s/\r?\n\z//; last if $line eq ""; $h{lc $1} = $2 if $line =~ /^([^:]+):\s*(.*)$/ }
    my $id = $h{"cf-access-authenticated-user-email"};
    my $body = "backend=$name port=" . $l->sockport . " host=" . ($h{host} // "") . " xff=" . ($h{"x-forwarded-for"} // "") . (defined $id ? " identity=$id" : "") . "\n";
    print $c "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " . length($body) . "\r\nConnection: close\r\n\r\n" . $body;
    close $c;
  }
}`;

/** A raw HTTP request from inside a container (a workspace's view); prints the status line and the body. */
const PROBE = String.raw`
use strict; use IO::Socket::INET;
my ($addr, $host) = @ARGV;
my $s = IO::Socket::INET->new(PeerAddr => $addr, Timeout => 5) or do { print "error=$!\n"; exit 0 };
print $s "GET / HTTP/1.1\r\nHost: $host\r\nConnection: close\r\n\r\n";
local $/; my $r = <$s>; $r =~ s/\r//g; print $r;`;

let scratch: Scratch;
let d: PrivateDockerd;
let traefikPid = 0;
let traefikLog = "";
let traefikBin = "";
let buildOutput = "";
let N = 0;
let lanAddress = "";
let srvSvc = ""; // the server's address on the services network (Traefik's container address in production)
let gateway = "";
let adminA = "";
let otherB = "";
let config: ServerConfig;
let defaults: ServerConfig;
let routes: Route[];
let tunnel: string[];
const containers = ["portainer", "filebrowser", "workspace-alice", "guacamole"];
const hostOf = (id: string) => routes.find((r) => r.id === id)!.hostname;

function freeSubnetIndex(): number {
  const addrs = sh("ip", ["-4", "-o", "addr"]);
  for (let i = 0; i < 50; i++) {
    const n = 1 + crypto.randomInt(254);
    if (!addrs.includes(`10.232.${n}.`) && !addrs.includes(`10.233.${n}.`)) return n;
  }
  throw new Error("no free 10.232.N.0/24 subnet on this host");
}

function traefikTail(): string {
  return fs.existsSync(traefikLog) ? fs.readFileSync(traefikLog, "utf8").slice(-3000) : "(no log)";
}

/** Traefik's API (inside the server's namespace): GET /api/<what>. */
function api(what: string): any {
  const a = get(NS.server, `http://127.0.0.1:8080/api/${what}`, "127.0.0.1");
  if (a.status !== 200) throw new Error(`traefik API ${what}: ${JSON.stringify(a)}\n${traefikTail()}`);
  return JSON.parse(a.body!);
}

/** Wait until Traefik's HTTP routers (from the Docker provider) satisfy `ok`; returns them by name. */
function waitForRouters(ok: (routers: Record<string, any>) => boolean, what: string): Record<string, any> {
  const deadline = Date.now() + 60_000;
  let last: Record<string, any> = {};
  while (Date.now() < deadline) {
    try {
      last = Object.fromEntries((api("http/routers") as any[]).map((r) => [r.name, r]));
      if (ok(last)) return last;
    } catch {
      /* not up yet */
    }
    spawnSync("sleep", ["0.5"]);
  }
  throw new Error(`traefik never showed ${what}; routers: ${JSON.stringify(Object.keys(last))}\n${traefikTail()}`);
}

/** Run the backend container `name` with exactly the program's labels for its routes under `cfg`. */
function runBackend(name: string, cfg: ServerConfig): Record<string, string> {
  const mine = buildRoutes(cfg).filter((r) => r.container === name);
  expect(mine.length).toBeGreaterThan(0);
  const labels = traefikLabels(mine, { adminSources: cfg.host.adminSources, tunnelSources: tunnel });
  const ports = [...new Set(mine.map((r) => String(r.port)))];
  d.dockerOk([
    "run", "-d", "--name", name, "--network", "train-server", "--network-alias", name,
    ...Object.entries(labels).flatMap(([k, v]) => ["--label", `${k}=${v}`]),
    "local/base", "perl", "-e", BACKEND, name, ...ports,
  ]);
  return labels;
}

function probeFromWorkspace(addr: string, host: string): string {
  return d.dockerOk(["run", "--rm", "--network", "train-server", "local/base", "perl", "-e", PROBE, addr, host], { timeoutMs: 60_000 });
}

beforeAll(() => {
  // --- Traefik, the version the program pins, built once from the Go module proxy ---
  const t = Date.now();
  const build = spawnSync("bash", [path.join(REPO, "tests/helpers/build-traefik.sh"), VERSION], { encoding: "utf8", maxBuffer: 64 * 1024 * 1024 });
  if (build.status !== 0) throw new Error(`building traefik ${VERSION} failed:\n${build.stderr.slice(-4000)}`);
  traefikBin = build.stdout.trim().split("\n").pop()!;
  buildOutput = `${build.stderr.trim() ? build.stderr.trim().split("\n").pop() : `cached ${traefikBin}`} (${((Date.now() - t) / 1000).toFixed(1)} s here)`;
  for (const dir of ["/etc/traefik"]) {
    // traefik would read a traefik.{toml,yml,yaml} found there INSTEAD of its flags
    const found = fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => /^traefik\.(toml|ya?ml)$/.test(f)) : [];
    if (found.length) throw new Error(`${dir}/${found[0]} exists; traefik would ignore its flags`);
  }

  scratch = new Scratch("tslan-");
  N = freeSubnetIndex();
  lanAddress = `10.233.${N}.1`;
  adminA = `10.233.${N}.10`;
  otherB = `10.233.${N}.20`;
  srvSvc = `10.232.${N}.200`;

  // --- the stack: prod, on this LAN, with client A as the one admin source ---
  const raw = clone(stackRaw("prod"));
  raw.host = { ...raw.host, lanAddress, lanCidr: `10.233.${N}.0/24`, adminSources: [`${adminA}/32`] };
  config = parseConfig(raw);
  delete raw.host.adminSources;
  defaults = parseConfig(raw);
  routes = buildRoutes(config);
  expect(routes.find((r) => r.id === "portainer")!.audience.kind).toBe("admins");
  expect(routes.find((r) => r.id === "filebrowser")!.audience.kind).toBe("team");
  expect(routes.find((r) => r.id === "alice-code")!.audience.kind).toBe("user");

  // --- namespaces: the server with a LAN bridge, two office machines on it ---
  for (const ns of Object.values(NS)) {
    sh("ip", ["netns", "add", ns]);
    scratch.onCleanup(() => void spawnSync("ip", ["netns", "del", ns]));
    sh("ip", ["-n", ns, "link", "set", "lo", "up"]);
  }
  sh("ip", ["-n", NS.server, "link", "add", "lan0", "type", "bridge"]);
  sh("ip", ["-n", NS.server, "addr", "add", `${lanAddress}/24`, "dev", "lan0"]);
  sh("ip", ["-n", NS.server, "link", "set", "lan0", "up"]);
  for (const [ns, addr, port] of [[NS.a, adminA, "lana"], [NS.b, otherB, "lanb"]]) {
    sh("ip", ["-n", NS.server, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns]);
    sh("ip", ["-n", NS.server, "link", "set", port, "master", "lan0", "up"]);
    sh("ip", ["-n", ns, "addr", "add", `${addr}/24`, "dev", "eth0"]);
    sh("ip", ["-n", ns, "link", "set", "eth0", "up"]);
  }

  // --- a private dockerd, its train-server network, the server's leg on it ---
  d = PrivateDockerd.start(scratch);
  d.importRootfs(ensureDebootstrapRootfs(BOOKWORM_MINBASE), "local/base");
  d.dockerOk([
    "network", "create", "--driver", "bridge", "--subnet", `10.232.${N}.0/24`, "--ip-range", `10.232.${N}.0/25`, "--gateway", `10.232.${N}.1`,
    "-o", `com.docker.network.bridge.name=${BRIDGE}`, "train-server",
  ]);
  scratch.onCleanup(() => void spawnSync("ip", ["link", "del", BRIDGE]));
  scratch.onCleanup(() => void d.docker(["network", "rm", "train-server"]));
  scratch.onCleanup(() => void d.docker(["rm", "-f", ...containers]));
  // the tunnel's sources, computed by the program's function from what Docker reports, as in production
  tunnel = tunnelSources(JSON.parse(d.dockerOk(["network", "inspect", "train-server", "--format", "{{json .IPAM.Config}}"])));
  expect(tunnel).toEqual([`10.232.${N}.1/32`]);
  gateway = `10.232.${N}.1`;
  sh("ip", ["link", "add", ROOT_VETH, "type", "veth", "peer", "name", "svc0", "netns", NS.server]);
  scratch.onCleanup(() => void spawnSync("ip", ["link", "del", ROOT_VETH]));
  sh("ip", ["link", "set", ROOT_VETH, "master", BRIDGE, "up"]);
  sh("ip", ["link", "set", BRIDGE, "up"]);
  sh("ip", ["-n", NS.server, "addr", "add", `${srvSvc}/24`, "dev", "svc0"]);
  sh("ip", ["-n", NS.server, "link", "set", "svc0", "up"]);
  // bridged frames pass iptables' FORWARD (br_netfilter): let ours through if the policy is not ACCEPT
  if (!/^-P FORWARD ACCEPT$/m.test(sh("iptables", ["-S", "FORWARD"]))) {
    sh("iptables", ["-I", "FORWARD", "1", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"]);
    scratch.onCleanup(() => void spawnSync("iptables", ["-D", "FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"]));
  }

  // --- the backends, with the program's labels ---
  for (const c of containers) runBackend(c, config);

  // --- Traefik in the server's namespace, with the program's flags ---
  const home = path.join(scratch.dir, "traefik-home");
  fs.mkdirSync(home);
  traefikLog = path.join(scratch.dir, "traefik.log");
  const log = fs.openSync(traefikLog, "w");
  const args = [...traefikCommand(), `--providers.docker.endpoint=unix://${d.sock}`];
  const child = spawn("ip", ["netns", "exec", NS.server, traefikBin, ...args], {
    cwd: home,
    env: { PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin", HOME: home, XDG_CONFIG_HOME: home },
    stdio: ["ignore", log, log],
    detached: true,
  });
  fs.closeSync(log);
  traefikPid = child.pid ?? 0;
  child.unref();
  scratch.onCleanup(() => {
    // ours (before or after `ip netns exec` exec()s it), and not a zombie
    const alive = () => {
      try {
        return fs.readFileSync(`/proc/${traefikPid}/cmdline`, "utf8").includes(traefikBin) && !/^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${traefikPid}/stat`, "utf8"));
      } catch {
        return false;
      }
    };
    if (!traefikPid || !alive()) return;
    process.kill(traefikPid, "SIGTERM");
    for (let i = 0; i < 50 && alive(); i++) spawnSync("sleep", ["0.2"]);
    if (alive()) process.kill(traefikPid, "SIGKILL");
  });
  waitForRouters((r) => ["portainer@docker", "portainer-lan@docker", "filebrowser@docker", "filebrowser-lan@docker", "alice-code@docker", "alice-code-lan@docker", "alice-tensorboard@docker", "alice-tensorboard-lan@docker"].every((n) => r[n]), "the labelled routers");
});

afterAll(() => scratch?.cleanup());

describe("the real Traefik with the program's flags and labels", () => {
  test(`it is Traefik ${VERSION} (the pinned image's version), built from its Go module`, () => {
    expect(VERSION).toBe("v3.1.6");
    expect(sh(traefikBin, ["version"])).toMatch(new RegExp(`^Version:\\s+${VERSION.replace(/\./g, "\\.")}$`, "m"));
    console.log(`traefik build: ${buildOutput}`);
  });

  test("its entrypoints are the rendered ones: tunnel :81, lan :80 (plus its own API entrypoint :8080)", () => {
    const eps = Object.fromEntries((api("entrypoints") as any[]).map((e) => [e.name, e.address]));
    expect(eps).toEqual({ tunnel: ":81", lan: ":80", traefik: ":8080" });
  });

  test("it read the labels as meant: admin LAN router behind the admin-sources allow list, tunnel routers behind the gateway's", () => {
    const routers = waitForRouters(() => true, "routers");
    const mws = Object.fromEntries((api("http/middlewares") as any[]).map((m) => [m.name, m]));
    expect(routers["portainer-lan@docker"]).toMatchObject({ entryPoints: ["lan"], middlewares: ["portainer-admin-sources@docker"], status: "enabled" });
    expect(mws["portainer-admin-sources@docker"].ipAllowList.sourceRange).toEqual([`${adminA}/32`]);
    for (const id of ["portainer", "filebrowser", "alice-code"]) {
      expect(routers[`${id}@docker`]).toMatchObject({ entryPoints: ["tunnel"], middlewares: [`${id}-tunnel-sources@docker`], status: "enabled" });
      expect(mws[`${id}-tunnel-sources@docker`].ipAllowList.sourceRange).toEqual([`${gateway}/32`]);
    }
    expect(routers["filebrowser-lan@docker"].middlewares).toBeUndefined();
    // the backends carry exactly the labels the program renders
    const want = traefikLabels(routes.filter((r) => r.container === "portainer"), { adminSources: config.host.adminSources, tunnelSources: tunnel });
    const got = JSON.parse(d.dockerOk(["inspect", "portainer", "--format", "{{json .Config.Labels}}"]));
    expect(got).toEqual(want);
  });
});

describe("with host.adminSources = [A]: requests to the LAN entrypoint (the office's local-DNS path)", () => {
  const lan = () => `http://${lanAddress}:80/`;

  test("admin source A gets 200 for the admin hostname (Portainer), from Portainer's backend, as A", () => {
    const a = get(NS.a, lan(), hostOf("portainer"));
    expect(a).toEqual({ status: 200, body: `backend=portainer port=9000 host=${hostOf("portainer")} xff=${adminA}\n` });
  });

  test("the other LAN address B gets 403 from Traefik's ipAllowList for the same request", () => {
    expect(get(NS.b, lan(), hostOf("portainer"))).toEqual({ status: 403, body: "Forbidden" });
  });

  test("both get 200 for the team hostname (FileBrowser) and the user hostname (alice's code-server)", () => {
    for (const [ns, addr] of [[NS.a, adminA], [NS.b, otherB]]) {
      expect(get(ns, lan(), hostOf("filebrowser"))).toEqual({ status: 200, body: `backend=filebrowser port=80 host=${hostOf("filebrowser")} xff=${addr}\n` });
      expect(get(ns, lan(), hostOf("alice-code"))).toEqual({ status: 200, body: `backend=workspace-alice port=8080 host=${hostOf("alice-code")} xff=${addr}\n` });
    }
  });

  test("the user's TensorBoard hostname: / is a relative redirect to code-server's proxy path, which reaches alice's code-server", () => {
    const tb = routes.find((r) => r.id === "alice-tensorboard")!;
    expect(tb).toMatchObject({ container: "workspace-alice", port: 8080, entryPath: "/absproxy/6006/" });
    for (const [ns, addr] of [[NS.a, adminA], [NS.b, otherB]]) {
      const root = get(ns, lan(), tb.hostname);
      expect(root.location).toBe("/absproxy/6006/");
      expect([302, 307]).toContain(root.status);
      expect(get(ns, `${lan()}absproxy/6006/`, tb.hostname)).toEqual({ status: 200, body: `backend=workspace-alice port=8080 host=${tb.hostname} xff=${addr}\n` });
      // any other path is passed untouched (code-server's own login page, its assets)
      expect(get(ns, `${lan()}login`, tb.hostname)).toEqual({ status: 200, body: `backend=workspace-alice port=8080 host=${tb.hostname} xff=${addr}\n` });
    }
    // the same on the tunnel entrypoint, after its source check
    expect(get(undefined, `http://${srvSvc}:81/`, tb.hostname)).toMatchObject({ location: "/absproxy/6006/" });
    expect(get(NS.a, `http://${lanAddress}:81/`, tb.hostname)).toEqual({ status: 403, body: "Forbidden" });
  });

  test("Guacamole's hostname: the LAN router removes the Access identity header (no LAN machine can sign in as someone)", () => {
    const r = routes.find((x) => x.id === "guacamole")!;
    expect(r.identityHeaders).toEqual(["Cf-Access-Authenticated-User-Email"]);
    for (const [ns, addr] of [[NS.a, adminA], [NS.b, otherB]]) {
      // forged in any case: Traefik matches header names case-insensitively
      for (const name of ["Cf-Access-Authenticated-User-Email", "cf-access-authenticated-user-email"]) {
        expect(get(ns, lan(), r.hostname, { [name]: "alice@example.com" })).toEqual({ status: 200, body: `backend=guacamole port=8080 host=${r.hostname} xff=${addr}\n` });
      }
    }
    // control: the header does reach the backend where Access sets it (the tunnel entrypoint, from the gateway)
    expect(get(undefined, `http://${srvSvc}:81/`, r.hostname, { "Cf-Access-Authenticated-User-Email": "alice@example.com" })).toEqual({
      status: 200,
      body: `backend=guacamole port=8080 host=${r.hostname} xff=${gateway} identity=alice@example.com\n`,
    });
  });

  test("control: a hostname no route has is Traefik's 404", () => {
    expect(get(NS.a, lan(), "nothing.example.com")).toEqual({ status: 404, body: "404 page not found\n" });
  });
});

describe("the tunnel entrypoint", () => {
  test("serves the admin hostname (and the others) to the tunnel's source: the host, from the services network's gateway", () => {
    const url = `http://${srvSvc}:81/`;
    expect(get(undefined, url, hostOf("portainer"))).toEqual({ status: 200, body: `backend=portainer port=9000 host=${hostOf("portainer")} xff=${gateway}\n` });
    expect(get(undefined, url, hostOf("filebrowser"))).toMatchObject({ status: 200, body: expect.stringContaining("backend=filebrowser port=80") });
    expect(get(undefined, url, hostOf("alice-code"))).toMatchObject({ status: 200, body: expect.stringContaining("backend=workspace-alice port=8080") });
  });

  test("a workspace on the services network cannot use it to skip Access: 403 (but gets the LAN entrypoint's team route)", () => {
    expect(probeFromWorkspace(`${srvSvc}:81`, hostOf("portainer"))).toMatch(/^HTTP\/1\.1 403 Forbidden\n[\s\S]*\nForbidden$/);
    expect(probeFromWorkspace(`${srvSvc}:81`, hostOf("filebrowser"))).toMatch(/^HTTP\/1\.1 403 Forbidden\n/);
    // its address is no admin source either
    expect(probeFromWorkspace(`${srvSvc}:80`, hostOf("portainer"))).toMatch(/^HTTP\/1\.1 403 Forbidden\n/);
    expect(probeFromWorkspace(`${srvSvc}:80`, hostOf("filebrowser"))).toMatch(/^HTTP\/1\.1 200 OK\n[\s\S]*backend=filebrowser port=80 /);
  });

  test("an office machine that reaches it directly (Docker before 28.0 forwards routed traffic to 127.0.0.1-published ports: moby/moby#45610) gets 403, admin source or not", () => {
    for (const ns of [NS.a, NS.b]) {
      expect(get(ns, `http://${lanAddress}:81/`, hostOf("portainer"))).toEqual({ status: 403, body: "Forbidden" });
      expect(get(ns, `http://${lanAddress}:81/`, hostOf("alice-code"))).toEqual({ status: 403, body: "Forbidden" });
    }
  });
});

describe("default host.adminSources = []: admin routes are tunnel-only", () => {
  beforeAll(() => {
    d.dockerOk(["rm", "-f", "portainer"]);
    const labels = runBackend("portainer", defaults);
    expect(Object.keys(labels).some((k) => k.includes("portainer-lan"))).toBe(false);
    waitForRouters((r) => !!r["portainer@docker"] && !r["portainer-lan@docker"], "portainer without its LAN router");
  });

  test("both LAN addresses get 404 for the admin hostname (no LAN router); team and user hostnames still 200", () => {
    for (const [ns, addr] of [[NS.a, adminA], [NS.b, otherB]]) {
      expect(get(ns, `http://${lanAddress}:80/`, hostOf("portainer"))).toEqual({ status: 404, body: "404 page not found\n" });
      expect(get(ns, `http://${lanAddress}:80/`, hostOf("filebrowser"))).toEqual({ status: 200, body: `backend=filebrowser port=80 host=${hostOf("filebrowser")} xff=${addr}\n` });
    }
  });

  test("the tunnel entrypoint still serves it", () => {
    expect(get(undefined, `http://${srvSvc}:81/`, hostOf("portainer"))).toEqual({ status: 200, body: `backend=portainer port=9000 host=${hostOf("portainer")} xff=${gateway}\n` });
  });
});

describe("cleanup", () => {
  test("traefik, the containers, the network, the veths and the namespaces are gone", () => {
    scratch.cleanup();
    expect(fs.existsSync(`/proc/${traefikPid}`) && !/^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${traefikPid}/stat`, "utf8"))).toBe(false);
    const netns = sh("ip", ["netns", "list"]);
    for (const ns of Object.values(NS)) expect(netns).not.toContain(ns);
    const links = sh("ip", ["-o", "link", "show"]);
    expect(links).not.toContain(ROOT_VETH);
    expect(links).not.toContain(BRIDGE);
    expect(sh("ip", ["-4", "-o", "addr"])).not.toContain(`10.232.${N}.`);
    expect(sh("iptables", ["-S", "FORWARD"])).not.toContain(BRIDGE);
  });
});
