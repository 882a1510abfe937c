/**
 * The doctor's evaluator (components/doctor.ts) on recorded facts: tests/unit/fixtures/doctor-rig-healthy.json is the
 * probe's output on the healthy rig of tests/host/doctor.test.ts (recorded with DOCTOR_RECORD_FACTS=<file>), with
 * the rig stack's run-time overrides. Every check's ok / warn / fail (/ skip) branch is taken from it by changing
 * facts as the server would show the fault. Also: what the doctor expects is exactly what the program makes, the probe
 * is valid bash, and the CLI's exit codes for usage and config errors.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { stringify } from "yaml";
import { parseConfig, ServerConfig, splitStackConfig } from "../../components/config";
import {
  accessCheck,
  age,
  Check,
  connectionCheck,
  doctorTargets,
  evaluate,
  EvaluateContext,
  exitCodeOf,
  Facts,
  formatReport,
  OutsideResult,
  probeEnv,
  renderProbe,
  size,
  telegramRoute,
  TEST_ALERT_NAME,
} from "../../components/doctor";
import { renderAlertmanagerConfig } from "../../components/render/alerts";
import { buildRoutes } from "../../components/routes";
import { fingerprint, main, sshArgs } from "../../tools/doctor";
import { clone, runProgram, stackRaw } from "../helpers/program";

const fixture = JSON.parse(fs.readFileSync(path.join(__dirname, "fixtures", "doctor-rig-healthy.json"), "utf8")) as {
  overrides: { host: Record<string, string>; storage: { devices: string[] } };
  workspaceImage: string;
  facts: Facts;
};
const NOW = Number(fixture.facts["time.now"]);
const HOUR = 3600;

/** The rig stack as the recording saw it, edited by `edit`. */
function rigRaw(edit: (raw: Record<string, any>) => void = () => undefined): Record<string, any> {
  const raw = clone(stackRaw("rig"));
  raw.host = { ...raw.host, ...fixture.overrides.host };
  raw.storage = { ...raw.storage, ...fixture.overrides.storage };
  edit(raw);
  return raw;
}
const rig = parseConfig(rigRaw());
const SKIPPED = { skipped: "rig: true: not asked" };

/** The checks of the recorded facts with `change` applied (a value of undefined deletes the fact). */
function run(change: Record<string, string | undefined> = {}, opts: { config?: ServerConfig; ctx?: EvaluateContext } = {}): Check[] {
  const facts: Facts = { ...fixture.facts };
  for (const [k, v] of Object.entries(change)) {
    if (v === undefined) delete facts[k];
    else facts[k] = v;
  }
  return evaluate(opts.config ?? rig, facts, { workspaceImage: fixture.workspaceImage, outside: SKIPPED, ...opts.ctx });
}
function line(checks: Check[], name: string): Check {
  const c = checks.find((x) => x.name === name);
  if (!c) throw new Error(`no check ${name}; have: ${checks.map((x) => x.name).join(", ")}`);
  return c;
}
/** `status message` of one check. */
function at(change: Record<string, string | undefined>, name: string, opts: { config?: ServerConfig; ctx?: EvaluateContext } = {}): string {
  const c = line(run(change, opts), name);
  return `${c.status} ${c.message}`;
}
/** The recorded metric line key of a task's metric. */
function metricKey(metric: string, labels: string): string {
  const k = Object.keys(fixture.facts).find((x) => x.startsWith("metric.") && fixture.facts[x].startsWith(`${metric}{${labels}}`));
  if (!k) throw new Error(`no recorded ${metric}{${labels}}`);
  return k;
}
function taskChange(task: string, v: { success?: number; lastRun?: number; lastSuccess?: number }): Record<string, string> {
  const out: Record<string, string> = {};
  const l = `task="${task}"`;
  if (v.success !== undefined) out[metricKey("train_server_task_success", l)] = `train_server_task_success{${l}} ${v.success}`;
  if (v.lastRun !== undefined) out[metricKey("train_server_task_last_run_timestamp_seconds", l)] = `train_server_task_last_run_timestamp_seconds{${l}} ${v.lastRun}`;
  if (v.lastSuccess !== undefined) out[metricKey("train_server_task_last_success_timestamp_seconds", l)] = `train_server_task_last_success_timestamp_seconds{${l}} ${v.lastSuccess}`;
  return out;
}
/** Remove every metric of a task (it never ran). */
function taskAbsent(task: string): Record<string, undefined> {
  return Object.fromEntries(Object.keys(fixture.facts).filter((k) => k.startsWith("metric.") && fixture.facts[k].includes(`task="${task}"`)).map((k) => [k, undefined]));
}
function container(name: string, fields: Partial<Record<"state" | "health" | "image" | "id" | "restarts" | "exit", string>>): Record<string, string> {
  const [state, health, image, id, restarts, exit, started, finished] = fixture.facts[`container.${name}`].split("\t");
  const f = { state, health, image, id, restarts, exit, ...fields };
  return { [`container.${name}`]: [f.state, f.health, f.image, f.id, f.restarts, f.exit, started, finished].join("\t") };
}

describe("the recorded healthy rig", () => {
  const checks = run();

  test("evaluates to exit 0: everything ok but the documented warn/skip lines", () => {
    expect(exitCodeOf(checks)).toBe(0);
    expect(checks.filter((c) => c.status !== "ok").map((c) => `${c.status} ${c.name}`)).toEqual(["skip storage.bcache", "skip gpu", "warn network.tunnel", "skip network.access"]);
  });

  test("one line per configured container, service route and user check; fixes only on warn/fail lines' text", () => {
    const names = checks.map((c) => c.name);
    for (const c of doctorTargets(rig, fixture.workspaceImage).containers) expect(names).toContain(`docker.${c.name}`);
    for (const r of buildRoutes(rig).filter((x) => x.audience.kind !== "user")) expect(names).toContain(`network.route.${r.id}`);
    for (const u of ["alice", "bob"]) for (const k of ["ssh", "web", "quota"]) expect(names).toContain(`user.${u}.${k}`);
    for (const c of checks) if (c.status === "warn" || c.status === "fail") expect(c.fix).toBeTruthy();
    const text = formatReport("header", checks);
    expect(text.split("\n")[0]).toBe("header");
    expect(text).toMatch(/^  ok {4}storage\.devices +2 of 2 devices present, none missing \(\/dev\/loop0 \/dev\/loop1\)$/m);
    expect(text).toMatch(/^  warn  network\.tunnel .*\n {6} +fix: /m);
    expect(text.split("\n").pop()).toBe(`${checks.filter((c) => c.status === "ok").length} ok, 1 warn, 0 fail, 3 skip: healthy (exit 0)`);
  });
});

describe("host and storage", () => {
  test("host.sudo", () => {
    expect(at({}, "host.sudo")).toMatch(/^ok ops runs sudo -n/);
    expect(at({ sudo: "fail" }, "host.sudo")).toMatch(/^fail sudo -n fails for ops/);
  });

  test("storage.mount: by UUID from fstab, else why not", () => {
    expect(at({}, "storage.mount")).toMatch(/^ok \/mnt\/storage: btrfs "train-rig" UUID 92631a4f-.* in \/etc\/fstab by UUID$/);
    expect(at({ "storage.mounted": "0" }, "storage.mount")).toMatch(/^fail \/mnt\/storage is not mounted/);
    expect(at({ "storage.mount": "ext4 /dev/sdz1 rw" }, "storage.mount")).toMatch(/^fail \/mnt\/storage has a ext4 filesystem/);
    expect(at({ "storage.label": "other" }, "storage.mount")).toMatch(/^fail .*holds btrfs "other", not the array labelled "train-rig"/);
    expect(at({ "storage.fstab": "/dev/loop1" }, "storage.mount")).toMatch(/^fail .*fstab mounts it from "\/dev\/loop1", not UUID=92631a4f/);
    // not mounted: the array's own checks say why they did not run
    expect(at({ "storage.mounted": "0", "storage.mount": "" }, "storage.devices")).toMatch(/^skip .*not mounted/);
  });

  test("storage.devices: a missing device, an absent configured disk, a count that differs", () => {
    expect(at({ "storage.devices_missing": "1", "storage.missing_devid.2": "1", "storage.fs_devices": "/dev/loop1" }, "storage.devices")).toBe(
      "fail the array is DEGRADED: 1 of 2 device(s) missing (devid 2); present: /dev/loop1",
    );
    // btrfs filesystem show's own marker counts too (no sysfs devinfo)
    expect(at({ "storage.devices_missing": undefined, "storage.show_missing": "1" }, "storage.devices")).toMatch(/^fail the array is DEGRADED: 1 of 2/);
    expect(at({ "storage.device.1": "absent" }, "storage.devices")).toMatch(/^fail storage\.devices lists \/dev\/loop1, which the server does not have/);
    expect(at({ "storage.total_devices": "3" }, "storage.devices")).toMatch(/^fail the array has 3 devices .*storage\.devices lists 2/);
  });

  test("storage.profiles: as configured, else the convert command (and a hint for single chunks)", () => {
    expect(at({}, "storage.profiles")).toBe("ok data raid1, metadata raid1, as configured");
    const c = line(run({ "storage.data_profile": "raid1,single" }), "storage.profiles");
    expect(c.status).toBe("fail");
    expect(c.message).toMatch(/written while degraded/);
    expect(c.fix).toContain("btrfs balance start -dconvert=raid1,soft -mconvert=raid1,soft /mnt/storage");
  });

  test("storage.errors", () => {
    expect(at({}, "storage.errors")).toMatch(/^ok .*0 errors/);
    expect(at({ "storage.device_errors": "3", "storage.device_errors_detail": "[/dev/loop2].write_io_errs=3" }, "storage.errors")).toBe(
      "fail btrfs device stats counts 3 error(s): [/dev/loop2].write_io_errs=3",
    );
    expect(at({ "storage.device_errors": undefined }, "storage.errors")).toMatch(/^warn .*could not be read/);
  });

  test("storage.bcache: skipped without a cache; mode, attachment and dirty data with one", () => {
    expect(at({}, "storage.bcache")).toBe("skip storage.cache is not set: no bcache");
    const cached = parseConfig(rigRaw((r) => (r.storage.cache = { device: "/dev/nvme0n1p4", mode: "writeback" })));
    const o = { config: cached };
    expect(at({ "bcache.0": "writeback clean 0.0k", "bcache.1": "writeback dirty 12.3M" }, "storage.bcache", o)).toBe(
      "ok writeback on 2 device(s), /dev/nvme0n1p4; dirty data: /dev/loop0 clean 0.0k, /dev/loop1 dirty 12.3M",
    );
    expect(at({ "bcache.0": "writethrough clean 0.0k", "bcache.1": "writeback clean 0.0k" }, "storage.bcache", o)).toMatch(/^fail \/dev\/loop0 caches in writethrough, not writeback/);
    expect(at({ "bcache.0": "writeback no cache", "bcache.1": "writeback clean 0.0k" }, "storage.bcache", o)).toMatch(/^fail \/dev\/loop0 is detached from its cache/);
    expect(at({ "bcache.0": "none", "bcache.1": "writeback clean 0.0k" }, "storage.bcache", o)).toMatch(/^fail \/dev\/loop0 is not behind bcache/);
  });

  test("storage.space against alerts.fsUsedPercent (90): ok, warn within 10 points, fail at it", () => {
    expect(at({}, "storage.space")).toBe("ok 16.5 % used, 427.6 MiB free of 512.0 MiB (alert at 90 %)");
    expect(at({ "storage.space": "1000 150" }, "storage.space")).toMatch(/^warn 85\.0 % used/);
    expect(at({ "storage.space": "1000 50" }, "storage.space")).toMatch(/^fail 95\.0 % used/);
    expect(at({ "storage.space": "" }, "storage.space")).toMatch(/^warn df could not read/);
  });

  test("storage.scrub: the last scrub's result and age", () => {
    expect(at({}, "storage.scrub")).toMatch(/^ok the last scrub passed 25 s ago, no errors \(btrfs scrub status: .*no errors found\)$/);
    expect(at(taskAbsent("scrub"), "storage.scrub")).toMatch(/^warn no scrub has run yet \(monthly, day 15 at 03:00\)/);
    const errs = { [metricKey("train_server_btrfs_scrub_errors", 'type="csum"')]: 'train_server_btrfs_scrub_errors{type="csum"} 4' };
    expect(at({ ...taskChange("scrub", { success: 0 }), ...errs }, "storage.scrub")).toMatch(/^fail the last scrub \(2026-12-01T\d\d:\d\d:\d\dZ\) failed: 4 csum error\(s\)/);
    expect(at(taskChange("scrub", { lastSuccess: NOW - 40 * 86400 }), "storage.scrub")).toMatch(/^warn the last scrub passed 40\.0 d ago .*a month was skipped/);
  });

  test("storage.drive", () => {
    expect(at({}, "storage.drive")).toBe("ok the Drive is mounted at /mnt/storage/shared (fuse.rclone /srv/rig-drive)");
    expect(at({ "drive.mount": "" }, "storage.drive")).toBe("fail the Drive is not mounted at /mnt/storage/shared");
    expect(at({ "drive.readable": "0" }, "storage.drive")).toMatch(/^fail .*is mounted \(fuse\.rclone .*\) but does not answer/);
  });
});

describe("GPU", () => {
  // two GPUs; alice gets all of them, bob GPU 1
  const gpuRig = parseConfig(
    rigRaw((r) => {
      r.host.gpu = { count: 2, model: "T4" };
      r.users[0].gpus = "all";
      r.users[1].gpus = [1];
    }),
  );
  const o = { config: gpuRig };
  const host = { "gpu.rc": "0", "gpu.host": "0, GPU-aaa, Tesla T4, 41 | 1, GPU-bbb, Tesla T4, 39" };

  test("host.gpu.count 0: one skip line, with the reason", () => {
    const gpuLines = run().filter((c) => c.name.startsWith("gpu"));
    expect(gpuLines).toEqual([{ name: "gpu", status: "skip", message: "host.gpu.count is 0: no GPU check" }]);
  });

  test("gpu.host: the driver answers with host.gpu.count GPUs", () => {
    expect(at(host, "gpu.host", o)).toBe("ok the driver answers: GPU 0 Tesla T4 41 °C, GPU 1 Tesla T4 39 °C");
    expect(at({ "gpu.host": "absent" }, "gpu.host", o)).toMatch(/^fail nvidia-smi is not installed/);
    expect(at({ "gpu.rc": "9", "gpu.host": "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver" }, "gpu.host", o)).toMatch(/^fail nvidia-smi fails \(exit 9\)/);
    expect(at({ "gpu.rc": "0", "gpu.host": "0, GPU-aaa, Tesla T4, 41" }, "gpu.host", o)).toMatch(/^fail nvidia-smi lists 1 GPU\(s\), host\.gpu\.count is 2/);
  });

  test("gpu.workspace-<user>: exactly the configured GPUs are visible inside", () => {
    expect(at({ ...host, "gpu.ws.alice": "0 GPU-aaa,GPU-bbb" }, "gpu.workspace-alice", o)).toBe("ok sees exactly all GPUs (GPU-aaa, GPU-bbb)");
    expect(at({ ...host, "gpu.ws.bob": "0 GPU-bbb" }, "gpu.workspace-bob", o)).toBe("ok sees exactly GPU 1 (GPU-bbb)");
    expect(at({ ...host, "gpu.ws.bob": "0 GPU-aaa,GPU-bbb" }, "gpu.workspace-bob", o)).toBe("fail sees GPU-aaa, GPU-bbb, configured: GPU 1");
    expect(at({ ...host, "gpu.ws.alice": "127 bash: nvidia-smi: command not found" }, "gpu.workspace-alice", o)).toMatch(/^fail nvidia-smi fails inside workspace-alice \(exit 127\)/);
    expect(at(host, "gpu.workspace-alice", o)).toMatch(/^skip workspace-alice is not running/);
    // a user with no GPU must see none
    const none = parseConfig(rigRaw((r) => ((r.host.gpu = { count: 2 }), (r.users[1].gpus = "none"))));
    expect(at({ ...host, "gpu.ws.bob": "6 No devices were found" }, "gpu.workspace-bob", { config: none })).toBe("ok sees exactly no GPU");
    expect(at({ ...host, "gpu.ws.bob": "0 GPU-aaa" }, "gpu.workspace-bob", { config: none })).toBe("fail sees GPU-aaa, configured: no GPU");
  });
});

describe("Docker", () => {
  test("docker.daemon", () => {
    expect(at({}, "docker.daemon")).toBe("ok Docker 20.10.24+dfsg1, btrfs, data root /mnt/storage/docker-data/4200000000.4200000000");
    expect(at({ "docker.rc": "1", "docker.info": "Cannot connect to the Docker daemon" }, "docker.daemon")).toMatch(/^fail docker info fails: Cannot connect/);
    expect(at({ "docker.info": "24.0.7 overlay2 /var/lib/docker" }, "docker.daemon")).toMatch(/^fail Docker 24\.0\.7 uses overlay2 in \/var\/lib\/docker, not btrfs/);
  });

  test("docker.<container>: running, healthy, on the pinned image — else which of those it is not", () => {
    expect(at({}, "docker.traefik")).toBe("ok running, healthy, traefik:v3.1.6");
    expect(at({}, "docker.portainer")).toBe("ok running, no health check, portainer/portainer-ce:2.21.4");
    expect(at({ "container.grafana": "absent" }, "docker.grafana")).toBe("fail configured but absent (image grafana/grafana-oss:11.2.2)");
    expect(at(container("grafana", { state: "exited", exit: "137" }), "docker.grafana")).toMatch(/^fail exited \(exit code 137\) at 0001-01-01T00:00:00Z/);
    expect(at(container("grafana", { state: "restarting" }), "docker.grafana")).toBe("fail restarting");
    expect(at({ ...container("grafana", { image: "grafana/grafana-oss:10.0.0", id: "sha256:other" }) }, "docker.grafana")).toBe("fail runs grafana/grafana-oss:10.0.0, the config pins grafana/grafana-oss:11.2.2");
    // created from the image id of the pinned reference: still the pinned image
    expect(at(container("grafana", { image: "sha256:90066215437c" }), "docker.grafana")).toBe("ok running, healthy, sha256:90066215437c (= grafana/grafana-oss:11.2.2)");
    expect(at({ ...container("grafana", { health: "unhealthy" }), "container.grafana.health_log": "wget: server returned error: HTTP/1.1 503" }, "docker.grafana")).toBe(
      "fail running but unhealthy: wget: server returned error: HTTP/1.1 503",
    );
    expect(at(container("grafana", { health: "starting" }), "docker.grafana")).toMatch(/^warn running, health check still starting/);
    expect(at(container("grafana", { health: "none" }), "docker.grafana")).toMatch(/^warn running grafana\/grafana-oss:11\.2\.2 without the health check the program gives it/);
    expect(at(container("grafana", { restarts: "7" }), "docker.grafana")).toMatch(/^warn .*restarted 7 times/);
    // the workspaces run the checkout's image
    expect(at({}, "docker.workspace-alice", { ctx: { workspaceImage: "train-server/workspace:0123456789abcdef" } })).toMatch(/^ok /); // by image id
    expect(at(container("workspace-alice", { id: "sha256:old" }), "docker.workspace-alice", { ctx: { workspaceImage: "train-server/workspace:0123456789abcdef" } })).toBe(
      `fail runs ${fixture.workspaceImage}, the config pins train-server/workspace:0123456789abcdef`,
    );
  });

  test("Docker not answering: every container is a fail that says why", () => {
    const change = Object.fromEntries(Object.keys(fixture.facts).filter((k) => k.startsWith("container.")).map((k) => [k, undefined]));
    const checks = run({ ...change, "docker.rc": "1", "docker.info": "Cannot connect to the Docker daemon" });
    expect(line(checks, "docker.traefik")).toMatchObject({ status: "fail", message: "not running: Docker does not answer (see docker.daemon)" });
  });
});

describe("network", () => {
  test("network.tunnel: connections to the edge; none is a warn on a rig, a fail in production", () => {
    expect(at({ "tunnel.metrics": "200", "tunnel.ha_connections": "4" }, "network.tunnel")).toBe("ok cloudflared holds 4 connection(s) to the Cloudflare edge");
    expect(at({}, "network.tunnel")).toMatch(/^warn cloudflared's metrics \(127\.0\.0\.1:2000\) do not answer — expected on a test rig/);
    const prod = parseConfig(rigRaw((r) => (r.rig = false)));
    expect(at({}, "network.tunnel", { config: prod })).toBe("fail cloudflared's metrics (127.0.0.1:2000) do not answer");
    expect(at({ "tunnel.metrics": "200", "tunnel.ha_connections": "0" }, "network.tunnel", { config: prod })).toMatch(/^fail cloudflared holds no connection to the Cloudflare edge/);
  });

  test("network.route.<id>: what Traefik answers for the hostname on the LAN address", () => {
    expect(at({}, "network.route.grafana")).toBe("ok grafana.rig.example.com → HTTP 200 through Traefik (grafana:3000)");
    expect(at({ "route.grafana": "302\t" }, "network.route.grafana")).toMatch(/^ok .*HTTP 302/);
    // a backend's own 404 page is an answer; Traefik's is "no router"
    expect(at({ "route.grafana": "404\t<!doctype html>Not Found" }, "network.route.grafana")).toMatch(/^ok .*HTTP 404/);
    expect(at({ "route.grafana": "404\t404 page not found" }, "network.route.grafana")).toBe("fail Traefik has no router for grafana.rig.example.com (404)");
    expect(at({ "route.grafana": "502\tBad Gateway" }, "network.route.grafana")).toBe("fail Traefik answers 502 for grafana.rig.example.com: its backend grafana:3000 does not");
    expect(at({ "route.grafana": "none" }, "network.route.grafana")).toMatch(/^fail Traefik on 10\.77\.117\.2:80 does not answer/);
  });

  test("network.access: skipped with the reason, else one line per published hostname", () => {
    expect(at({}, "network.access")).toBe("skip rig: true: not asked");
    const published = doctorTargets(rig, fixture.workspaceImage).published;
    const results: Record<string, OutsideResult> = Object.fromEntries(published.map((r) => [r.id, { address: "104.16.0.1", status: 302, location: `https://team.cloudflareaccess.com/cdn-cgi/access/login/${r.hostname}?kid=1` }]));
    const checks = run({}, { ctx: { outside: { results } } });
    expect(checks.filter((c) => c.name.startsWith("network.access.")).map((c) => c.status)).toEqual(published.map(() => "ok"));
    expect(line(checks, "network.access.grafana").message).toBe("grafana.rig.example.com: an unauthenticated request gets Access's login (302 → https://team.cloudflareaccess.com/cdn-cgi/access/login/grafana.rig.example.com)");
  });

  test("accessCheck: the app answering without Access, no DNS, no answer, a broken tunnel", () => {
    const r = buildRoutes(rig).find((x) => x.id === "alice-code")!;
    const verdict = (res: OutsideResult | undefined) => {
      const c = accessCheck(r, res);
      return `${c.status} ${c.message}`;
    };
    expect(verdict({ status: 200 })).toBe("fail alice-code.rig.example.com answers 200 to an unauthenticated request: the app is PUBLIC, without Access");
    expect(verdict({ error: "DNS ENOTFOUND: queryA ENOTFOUND alice-code.rig.example.com" })).toMatch(/^fail .* does not resolve in public DNS/);
    // this machine cannot ask public DNS: not the server's fault, and not a pass either
    expect(verdict({ error: "DNS ETIMEOUT: queryA ETIMEOUT alice-code.rig.example.com" })).toMatch(/^warn .*public DNS \(1\.1\.1\.1, 8\.8\.8\.8\) does not answer from here .*not checked$/);
    expect(verdict({ address: "104.16.0.1", error: "HTTPS ETIMEDOUT: no answer in 10000 ms" })).toMatch(/^fail .*\(104\.16\.0\.1\): no answer from outside/);
    expect(verdict({ status: 530 })).toMatch(/^fail .*Cloudflare answers 530/);
    expect(verdict({ status: 302, location: "https://evil.example.net/" })).toMatch(/^fail .*302 → https:\/\/evil\.example\.net\/, not Access's login/);
    expect(verdict(undefined)).toMatch(/^warn .*not asked/);
  });
});

describe("monitoring", () => {
  test("monitoring.targets: every scrape job of the rendered prometheus.yml is up", () => {
    expect(at({}, "monitoring.targets")).toBe("ok 5 target(s) up: prometheus, node, cadvisor, traefik, netdata");
    expect(at({ "prom.target.2": 'node\tdown\thttp://node-exporter:9100/metrics\tdial tcp 172.18.0.5:9100: i/o timeout' }, "monitoring.targets")).toBe(
      "fail node http://node-exporter:9100/metrics is down: dial tcp 172.18.0.5:9100: i/o timeout",
    );
    expect(at({ "prom.target.0": undefined }, "monitoring.targets")).toBe("fail no target for job cadvisor");
    expect(at({ "prom.status": "no-ip" }, "monitoring.targets")).toBe("fail the Prometheus API does not answer (no prometheus container on the services network)");
    expect(at({ "prom.status": "none" }, "monitoring.targets")).toBe("fail the Prometheus API does not answer (no answer)");
    // without jq on the server nothing of this was read: one warn instead
    expect(run({ "tool.jq": "0" }).filter((c) => c.name.startsWith("monitoring"))).toEqual([expect.objectContaining({ name: "monitoring", status: "warn" })]);
  });

  test("monitoring.grafana", () => {
    expect(at({}, "monitoring.grafana")).toBe("ok Grafana 11.2.2 answers, database ok");
    expect(at({ "grafana.status": "503", "grafana.health": "failing 11.2.2" }, "monitoring.grafana")).toBe("fail Grafana's /api/health: HTTP 503, database failing");
    expect(at({ "grafana.status": "no-ip" }, "monitoring.grafana")).toBe("fail Grafana's /api/health: no grafana container on the services network");
  });

  test("monitoring.alertmanager: the loaded config routes every alert to Telegram, to the configured chat", () => {
    expect(at({}, "monitoring.alertmanager")).toBe("ok Alertmanager 0.25.0: every alert routes to Telegram (receiver telegram → chat -1001234567890)");
    const other = parseConfig(rigRaw((r) => (r.alerts.telegramChatId = "-42")));
    expect(at({}, "monitoring.alertmanager", { config: other })).toBe('fail Alertmanager 0.25.0: receiver "telegram" sends to chat -1001234567890, alerts.telegramChatId is -42');
    const noTelegram = Buffer.from("route:\n  receiver: mail\nreceivers:\n- name: mail\n  email_configs: [{to: a@b.c}]\n").toString("base64");
    expect(at({ "am.config_b64": noTelegram }, "monitoring.alertmanager")).toBe('fail Alertmanager 0.25.0: receiver "mail" has no telegram_configs');
    expect(at({ "am.status": "none" }, "monitoring.alertmanager")).toBe("fail the Alertmanager API does not answer (no answer)");
  });

  test("telegramRoute on the program's own alertmanager.yml (the API masks the token as <secret>)", () => {
    const rendered = renderAlertmanagerConfig({ gpuTempC: 80, fsUsedPercent: 90, backupMaxAgeHours: 26, quotaWarnPercent: 80, telegramChatId: -100, telegramBotToken: "1:abc", mountpoint: "/mnt/storage", driveMountpoint: "/mnt/storage/shared" });
    expect(telegramRoute(rendered, -100)).toEqual({ good: true, text: "receiver telegram → chat -100" });
    expect(telegramRoute(rendered.replace("bot_token: 1:abc", "bot_token: <secret>"), -100).good).toBe(true);
    expect(telegramRoute(rendered.replace("bot_token: 1:abc", "api_url: http://telegram.example"), -100)).toEqual({ good: false, text: 'receiver "telegram" has no bot token' });
    expect(telegramRoute("::: not yaml", -100).good).toBe(false);
  });

  test("monitoring.alerts: what fires now (the doctor's own test alert aside)", () => {
    expect(at({}, "monitoring.alerts")).toBe("ok no alert firing");
    expect(at({ "am.alert.0": "BackupTooOld\tcritical\t2026-12-01T09:50:00Z", "am.alert.1": `${TEST_ALERT_NAME}\twarning\t2026-12-01T09:50:00Z` }, "monitoring.alerts")).toBe(
      "warn 1 alert(s) firing: BackupTooOld (critical, since 2026-12-01T09:50:00Z)",
    );
  });

  test("monitoring.test-alert: only when asked; delivered, refused, failed, or no attempt seen", () => {
    expect(run().some((c) => c.name === "monitoring.test-alert")).toBe(false);
    const asked = { ctx: { sendTestAlert: true } };
    const sent = { "am.test_alert": "200", "am.notify_before": "0 0", "am.notify_waited": "33" };
    expect(at({ ...sent, "am.notify_after": "1 0" }, "monitoring.test-alert", asked)).toBe(`ok ${TEST_ALERT_NAME} delivered to Telegram by Alertmanager in ~33 s: check the chat`);
    expect(at({ ...sent, "am.notify_after": "1 1" }, "monitoring.test-alert", asked)).toMatch(/^fail sent \(HTTP 200\), but Alertmanager could not deliver it to Telegram \(1 failed attempt/);
    expect(at({ ...sent, "am.notify_after": "0 0", "am.notify_waited": "60" }, "monitoring.test-alert", asked)).toBe("warn sent (HTTP 200), but Alertmanager made no delivery attempt within 60 s");
    expect(at({ "am.test_alert": "400" }, "monitoring.test-alert", asked)).toBe("fail Alertmanager refused the test alert (HTTP 400)");
    expect(at({ "am.status": "none" }, "monitoring.test-alert", asked)).toBe("fail not sent: Alertmanager does not answer");
  });
});

describe("backups and ops", () => {
  test("backup.snapshots: the newest btrbk snapshot within its hourly schedule", () => {
    expect(at({}, "backup.snapshots")).toBe("ok newest 29 s ago; docker-volumes 2, homes 2");
    expect(at({ "snapshots.homes": `2 ${NOW - 5 * HOUR}`, "snapshots.docker-volumes": `2 ${NOW - 5 * HOUR}` }, "backup.snapshots")).toBe("fail the newest snapshot is 5.0 h old (hourly)");
    expect(at(taskChange("snapshot", { success: 0 }), "backup.snapshots")).toMatch(/^fail the last snapshot run \(.*\) failed/);
    expect(at({ "snapshots.homes": undefined, "snapshots.docker-volumes": undefined, ...taskAbsent("snapshot") }, "backup.snapshots")).toBe("warn no snapshot yet (hourly)");
    expect(at({ "snapshots.homes": undefined, "snapshots.docker-volumes": undefined }, "backup.snapshots")).toBe("fail no snapshot under /mnt/storage/.snapshots");
    // no birth time on this filesystem: the snapshot job's last success stands in
    expect(at({ "snapshots.homes": "2 0", "snapshots.docker-volumes": "2 0" }, "backup.snapshots")).toMatch(/^ok newest 25 s ago/);
  });

  test("backup.job: the last backup succeeded within alerts.backupMaxAgeHours", () => {
    expect(at({}, "backup.job")).toBe("ok the last backup succeeded 18 s ago (2 files, 4.98 KiB added)");
    expect(at(taskChange("backup", { lastSuccess: NOW - 30 * HOUR, lastRun: NOW - 30 * HOUR }), "backup.job")).toBe("fail the last successful backup is 30.0 h old (alerts.backupMaxAgeHours 26)");
    expect(at(taskChange("backup", { success: 0 }), "backup.job")).toMatch(/^fail the last backup \(.*\) failed; last success 18 s ago/);
    expect(at(taskAbsent("backup"), "backup.job")).toBe("warn no backup has run yet (daily at 06:00)");
  });

  test("backup.restic: the repository's newest snapshot, read from the server", () => {
    expect(at({}, "backup.restic")).toBe("ok 1 snapshot(s) in rclone:gdrive:train-server/restic, newest 21 s ago");
    expect(at({ "restic.snapshots": "8 2026-11-29T06:00:03Z" }, "backup.restic")).toMatch(/^fail the newest restic snapshot in rclone:gdrive:train-server\/restic is 55\.6 h old \(alerts\.backupMaxAgeHours 26\); 8 snapshot\(s\)$/);
    expect(at({ "restic.snapshots": undefined, "restic.error": "Fatal: wrong password or no key found" }, "backup.restic")).toBe(
      "fail cannot list rclone:gdrive:train-server/restic: Fatal: wrong password or no key found",
    );
    expect(at({ "restic.snapshots": "0 " }, "backup.restic")).toBe("fail rclone:gdrive:train-server/restic holds no snapshot");
    expect(at({ "restic.snapshots": "0 ", ...taskAbsent("backup") }, "backup.restic")).toBe("warn rclone:gdrive:train-server/restic holds no snapshot yet");
  });

  test("backup.verify: the last restore verification passed", () => {
    expect(at({}, "backup.verify")).toBe("ok the last restore verification passed 16 s ago (2 files restored and compared, repository check ok)");
    const mism = { [metricKey("train_server_verify_mismatches", "")]: "train_server_verify_mismatches{} 3" };
    expect(at({ ...taskChange("verify-restore", { success: 0 }), ...mism }, "backup.verify")).toMatch(/^fail the last restore verification \(.*\) FAILED: 3 mismatching file\(s\), repository check ok$/);
    expect(at(taskAbsent("verify-restore"), "backup.verify")).toBe("warn no restore verification has run yet (monthly, day 1 at 08:00)");
    expect(at(taskChange("verify-restore", { lastSuccess: NOW - 45 * 86400 }), "backup.verify")).toMatch(/^warn .*45\.0 d ago .*a month was skipped/);
  });

  test("backup.data-sync (only with dataSync enabled)", () => {
    expect(at({}, "backup.data-sync")).toBe("ok the last data sync (gcs:rig-bucket → gdrive:gcs-mirror) succeeded 16 s ago");
    expect(at(taskChange("data-sync", { success: 0 }), "backup.data-sync")).toMatch(/^fail the last data sync \(.*\) failed$/);
    expect(at(taskChange("data-sync", { lastSuccess: NOW - 50 * HOUR }), "backup.data-sync")).toBe("fail the last successful data sync is 50.0 h old (daily)");
    expect(at(taskAbsent("data-sync"), "backup.data-sync")).toBe("warn no data sync has run yet (daily at 04:00)");
    const off = parseConfig(rigRaw((r) => delete r.dataSync));
    expect(run({}, { config: off }).some((c) => c.name === "backup.data-sync")).toBe(false);
  });

  test("ops.timers: the ops timers and the Drive mount are active", () => {
    expect(at({}, "ops.timers")).toMatch(/^ok active: ts-drive-mount\.service, ts-snapshot\.timer, .*ts-data-sync\.timer, ts-weekly-digest\.timer$/);
    expect(at({ "unit.ts-scrub.timer": "inactive" }, "ops.timers")).toBe("fail not active: ts-scrub.timer (inactive)");
  });
});

describe("users", () => {
  test("user.<name>.ssh: the workspace's SSH port answers", () => {
    expect(at({}, "user.alice.ssh")).toBe("ok port 2222 on 10.77.117.2 answers (SSH-2.0-OpenSSH_9.6p1 doctor-stub)");
    expect(at({ "user.bob.ssh": "none" }, "user.bob.ssh")).toBe("fail port 2223 on 10.77.117.2 does not answer with SSH (none)");
  });

  test("user.<name>.web: code-server, Jupyter and TensorBoard through Traefik", () => {
    expect(at({}, "user.alice.web")).toBe("ok code HTTP 200, jupyter HTTP 200, tensorboard HTTP 200 through Traefik");
    expect(at({ "route.alice-jupyter": "502\tBad Gateway" }, "user.alice.web")).toBe("fail Traefik answers 502 for alice-jupyter.rig.example.com: its backend workspace-alice:8888 does not");
  });

  test("user.<name>.quota: usage against the soft quota (warn at quotaWarnPercent, fail over it)", () => {
    const k = metricKey("train_server_user_usage_bytes", 'user="alice",dir="workspaces",method="qgroup"');
    const use = (bytes: number) => ({ [k]: `train_server_user_usage_bytes{user="alice",dir="workspaces",method="qgroup"} ${bytes}` });
    expect(at({}, "user.alice.quota")).toBe("ok 48.0 KiB of 2.00 GiB (0.0 %): homes 16.0 KiB, workspaces 16.0 KiB, docker-volumes 16.0 KiB");
    expect(at(use(1.7 * 2 ** 30), "user.alice.quota")).toMatch(/^warn 1\.70 GiB of 2\.00 GiB \(85\.0 %\)/);
    expect(at(use(2.5 * 2 ** 30), "user.alice.quota")).toMatch(/^fail over quota: 2\.50 GiB of 2\.00 GiB \(125\.0 %\)/);
    const noUsage = Object.fromEntries(Object.keys(fixture.facts).filter((x) => fixture.facts[x].startsWith('train_server_user_usage_bytes{user="alice"')).map((x) => [x, undefined]));
    expect(at(noUsage, "user.alice.quota")).toMatch(/^warn no usage figures/);
    expect(at(taskChange("usage-collector", { lastRun: NOW - 3 * HOUR }), "user.alice.quota")).toMatch(/^warn .*\(figures 3\.0 h old: the usage collector is late\)$/);
  });
});

describe("the connection", () => {
  const base = { target: "ops@10.0.0.2:22", pinned: "ssh-ed25519 SHA256:abc" };
  test("ok once the probe ran to its end; a refused host key, a refused login, no route are failures of their own", () => {
    expect(connectionCheck({ ...base, status: 0, stderr: "", complete: true })).toEqual({ name: "ssh.connect", status: "ok", message: "ops@10.0.0.2:22, host key pinned (ssh-ed25519 SHA256:abc)" });
    expect(connectionCheck({ ...base, status: 255, stderr: "Host key verification failed.\n", complete: false })).toMatchObject({
      name: "ssh.hostkey",
      status: "fail",
      message: "ops@10.0.0.2:22 did not present the host key this stack pins (ssh-ed25519 SHA256:abc): ssh refused before logging in, nothing was sent",
    });
    expect(connectionCheck({ target: base.target, status: 255, stderr: "Host key verification failed.\n", complete: false }).message).toMatch(/not in known_hosts/);
    expect(connectionCheck({ ...base, status: 255, stderr: "ops@10.0.0.2: Permission denied (publickey).\n", complete: false })).toMatchObject({ name: "ssh.auth", status: "fail" });
    expect(connectionCheck({ ...base, status: 255, stderr: "ssh: connect to host 10.0.0.2 port 22: No route to host\n", complete: false })).toMatchObject({
      name: "ssh.connect",
      message: "cannot reach ops@10.0.0.2:22: ssh: connect to host 10.0.0.2 port 22: No route to host",
    });
    expect(connectionCheck({ ...base, status: 1, stderr: "bash: line 3: syntax error\n", complete: false }).message).toMatch(/^the probe stopped early \(ssh exit 1\)/);
  });

  test("the ssh command line: the program's host-key options (dockerSshOpts), the admin, bash -s", () => {
    const prod = parseConfig(stackRaw("prod"));
    const args = sshArgs(prod, "/keys/admin");
    expect(args.slice(0, 1)).toEqual(["-T"]);
    expect(args).toEqual(expect.arrayContaining(["StrictHostKeyChecking=yes", "UserKnownHostsFile=/dev/null", `KnownHostsCommand=/bin/echo * ${prod.host.hostKey}`, "HostKeyAlgorithms=ssh-ed25519"]));
    expect(args.slice(-6)).toEqual(["-i", "/keys/admin", "-o", "IdentitiesOnly=yes", "ops@192.168.1.50", "bash -s"]);
    // the fingerprint as ssh-keygen -l shows it
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ts-fp-"));
    try {
      spawnSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", path.join(dir, "k")]);
      const pub = fs.readFileSync(path.join(dir, "k.pub"), "utf8");
      expect(spawnSync("ssh-keygen", ["-lf", path.join(dir, "k.pub")], { encoding: "utf8" }).stdout).toContain(fingerprint(pub));
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("what the doctor expects is what the program makes", () => {
  const CONTAINER = "docker:index/container:Container";
  test.each(["rig", "prod", "large", "minimal"])("%s: every container, by name, image and health check", async (stack) => {
    const raw = stackRaw(stack);
    const { resources } = await runProgram(raw);
    const program = resources
      .filter((r) => r.type === CONTAINER)
      .map((r) => ({ name: r.inputs.name, image: r.inputs.image, healthcheck: r.inputs.healthcheck !== undefined || String(r.inputs.name).startsWith("workspace-") }))
      .sort((a, b) => a.name.localeCompare(b.name));
    const image = resources.find((r) => r.type === "docker:index/image:Image")!.inputs.imageName;
    const expected = doctorTargets(parseConfig(raw), image)
      .containers.map(({ name, image: i, healthcheck }) => ({ name, image: i, healthcheck }))
      .sort((a, b) => a.name.localeCompare(b.name));
    expect(expected).toEqual(program);
  });

  test("probe inputs: the config's values, quoted for bash; the probe is valid bash and names only TS_ inputs", () => {
    const prod = parseConfig(stackRaw("prod"));
    const t = doctorTargets(prod, "train-server/workspace:x");
    const env = probeEnv(prod, t, { sendTestAlert: true, now: 0, sender: "me@laptop" });
    expect(env).toMatchObject({ TS_MOUNTPOINT: "/mnt/storage", TS_CACHE_MODE: "writeback", TS_GPU_COUNT: "1", TS_SEND_TEST_ALERT: "1", TS_OPS_ENV: "/etc/train-server/ops/ops.env" });
    expect(env.TS_CONTAINERS.split("\n")).toContain("dcgm-exporter nvcr.io/nvidia/k8s/dcgm-exporter:3.3.8-3.6.0-ubuntu22.04");
    expect(env.TS_WORKSPACES.split("\n")[0]).toBe("alice workspace-alice 2222");
    expect(JSON.parse(env.TS_TEST_ALERT)[0]).toMatchObject({ labels: { alertname: TEST_ALERT_NAME }, startsAt: "1970-01-01T00:00:00.000Z", endsAt: "1970-01-01T00:05:00.000Z" });
    const text = renderProbe(env);
    expect(text.startsWith("{\nTS_SCRIPT_NAME=doctor-probe\n")).toBe(true);
    expect(text).toContain(`TS_TEST_ALERT='${env.TS_TEST_ALERT}'`);
    expect(spawnSync("bash", ["-n"], { input: text, encoding: "utf8" }).status).toBe(0);
    expect(() => renderProbe({ "BAD-NAME": "x" })).toThrow(/must match/);
    // every TS_ variable the probe reads is an input
    const probe = fs.readFileSync(path.join(__dirname, "..", "..", "host-scripts", "doctor-probe.sh"), "utf8");
    const used = new Set([...probe.matchAll(/\$\{?(TS_[A-Z0-9_]+)/g)].map((m) => m[1]));
    for (const v of used) if (!["TS_HTTP_TIMEOUT"].includes(v)) expect(Object.keys(env)).toContain(v);
  });

  test("the stack file is read as the program reads it (splitStackConfig)", () => {
    const { raw, unknownKeys } = splitStackConfig({ "train-server:host": '{"a":1}', "train-server:domain": "x.example.com", "train-server:sshPrivateKey": "secret", "train-server:bogus": "1", "cloudflare:apiToken": "t" });
    expect(raw).toEqual({ host: { a: 1 }, domain: "x.example.com" });
    expect(unknownKeys).toEqual(["bogus"]);
  });

  test("age and size read as a person would say them", () => {
    expect([age(5), age(600), age(5 * HOUR), age(4 * 86400)]).toEqual(["5 s", "10 min", "5.0 h", "4.0 d"]);
    expect([size(500), size(5100), size(448417792), size(2.5 * 2 ** 30), size(930 * 2 ** 30)]).toEqual(["500 B", "4.98 KiB", "427.6 MiB", "2.50 GiB", "930.0 GiB"]);
  });
});

describe("the CLI: exit 2 when it cannot run, 1 when the server cannot be reached", () => {
  function capture() {
    const out: string[] = [];
    const err: string[] = [];
    return { out, err, io: { out: (t: string) => void out.push(t), err: (t: string) => void err.push(t) } };
  }
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "ts-doctor-cli-"));
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
  const writeStack = (name: string, raw: Record<string, unknown>) =>
    fs.writeFileSync(path.join(tmp, `Pulumi.${name}.yaml`), stringify({ config: Object.fromEntries(Object.entries(raw).map(([k, v]) => [`train-server:${k}`, v])) }));

  test.each([
    [[], /--stack is required/],
    [["--stack"], /--stack needs a value/],
    [["--stack", "prod", "--frobnicate"], /unknown option "--frobnicate"/],
    [["--stack", "../etc"], /is not a stack name/],
    [["--stack", "prod", "--timeout", "soon"], /--timeout takes a number of seconds/],
    [["--stack", "prod", "--identity", "/nonexistent/key"], /--identity \/nonexistent\/key: no such file/],
  ])("usage %j → exit 2 with the usage", async (args, message) => {
    const c = capture();
    expect(await main(args as string[], c.io)).toBe(2);
    expect(c.err.join("\n")).toMatch(message);
    expect(c.err.join("\n")).toContain("usage: npm run doctor -- --stack NAME");
    expect(c.out).toEqual([]);
  });

  test("an unknown stack → exit 2, naming the stacks there are", async () => {
    const c = capture();
    expect(await main(["--stack", "nope"], c.io)).toBe(2);
    expect(c.err.join("\n")).toMatch(/^doctor: no stack file .*Pulumi\.nope\.yaml \(stacks: large, minimal, prod, rig\)$/);
  });

  test("a config error → exit 2 with every problem's path, as the program reports them (no stack trace)", async () => {
    const raw = clone(stackRaw("prod"));
    raw.users[2].name = "Charlie";
    raw.host.hostKey = "ssh-rsa AAAAB3NzaC1yc2E";
    raw.colour = "blue";
    writeStack("bad", raw);
    const c = capture();
    expect(await main(["--stack", "bad", "--root", tmp], c.io)).toBe(2);
    const text = c.err.join("\n");
    expect(text).toMatch(/^doctor: stack "bad": train-server configuration has \d+ problems:/);
    expect(text).toContain('  - colour: unknown stack config key "train-server:colour"');
    expect(text).toContain('  - users[2].name: "Charlie" is not a POSIX user name');
    expect(text).toContain("  - host.hostKey: is an RSA key");
    expect(text).not.toMatch(/\n\s+at /);
  });

  test("a server that does not answer → exit 1, one ssh.connect line (text and --json)", async () => {
    const raw = clone(stackRaw("prod"));
    raw.host = { ...raw.host, address: "127.0.0.1", sshPort: 1 };
    writeStack("down", raw);
    const c = capture();
    expect(await main(["--stack", "down", "--root", tmp, "--no-outside", "--timeout", "20"], c.io)).toBe(1);
    expect(c.out.join("\n")).toMatch(/^ {2}fail {2}ssh\.connect +cannot reach ops@127\.0\.0\.1:1: .*Connection refused/m);
    const j = capture();
    expect(await main(["--stack", "down", "--root", tmp, "--no-outside", "--json"], j.io)).toBe(1);
    const doc = JSON.parse(j.out.join("\n"));
    expect(doc).toMatchObject({ stack: "down", target: "ops@127.0.0.1:1", exitCode: 1, summary: { ok: 0, fail: 1 }, checks: [{ name: "ssh.connect", status: "fail" }] });
  });
});
