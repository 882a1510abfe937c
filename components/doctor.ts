/**
 * The health check of a live server (`npm run doctor`, tools/doctor.ts): the reference's system test suite
 * (09-run-tests.sh) as a read-only look over SSH.
 *
 *   config ──► doctorTargets: what the config implies is on the server (containers and their pinned images, routes,
 *   │          units, users' ports, GPUs) — from the same modules the program builds them with
 *   ├─► probeEnv / renderProbe: ONE bash program (inputs + lib.sh + host-scripts/doctor-probe.sh) sent on the
 *   │   stdin of one ssh session; it prints facts as key=value lines and changes nothing
 *   └─► evaluate(config, facts): the ok / warn / fail / skip lines, each with its evidence and, unless ok, the fix
 *
 * Pure except `renderProbe` reading the two host scripts. The status rules:
 *   fail  something configured is broken or absent (exit 1);
 *   warn  works, but degraded or not yet proven (a first backup still to run, a check the rig cannot pass);
 *   skip  the check does not apply to this config (no GPU, no bcache) or was not asked for — with the reason;
 *   ok    with the evidence that it is.
 */
import { REMAPPED_ROOT_UID } from "./render/workspace-security";
import { parse as parseYaml } from "yaml";
import type { ServerConfig, UserConfig } from "./config";
import { publishedRoutes } from "./edge";
import { readHostScript, shellQuote } from "./host";
import { opsEnabledUnits, OPS_CONFIG_DIR } from "./render/ops";
import { renderPrometheusConfig, SERVICES_NETWORK } from "./render/services";
import { buildRoutes, Route, workspaceContainer } from "./routes";
import { serviceContainers } from "./services";
import { TEXTFILE_DIR } from "./operations";
import { workspaceImageTag } from "./workspace";

export type Status = "ok" | "warn" | "fail" | "skip";

/** One line of the report. `message` is the evidence; `fix` says what to do (warn and fail lines). */
export interface Check {
  name: string;
  status: Status;
  message: string;
  fix?: string;
}

/** The probe's output: key=value facts (see host-scripts/doctor-probe.sh). */
export type Facts = Record<string, string>;

/** The alert `--send-test-alert` posts; filtered out of the "alerts firing" line. */
export const TEST_ALERT_NAME = "TrainServerDoctorTest";

/** A container the config implies. */
export interface ExpectedContainer {
  name: string;
  image: string;
  healthcheck: boolean;
  /** The user of a workspace container. */
  user?: string;
}

export interface DoctorTargets {
  containers: ExpectedContainer[];
  /** Every route (services, then users), asked through Traefik on the LAN address. */
  routes: Route[];
  /** The routes published through the tunnel (each must show Access's login from outside). */
  published: Route[];
  /** systemd units that must be active: the ops timers and the Drive mount. */
  units: string[];
  /** Prometheus' scrape jobs (from the rendered prometheus.yml). */
  prometheusJobs: string[];
  driveMountpoint: string;
}

/** What the server must have, by the config (the program's own modules say so, nothing is restated here). */
export function doctorTargets(config: ServerConfig, workspaceImage: string = workspaceImageTag()): DoctorTargets {
  const users = [...config.users].sort((a, b) => a.uid - b.uid);
  const gpu = config.host.gpu.count > 0;
  const prom = parseYaml(renderPrometheusConfig({ nodeExporter: "node-exporter:9100", alertmanager: "alertmanager:9093", ...(gpu ? { gpuExporter: "dcgm-exporter:9400" } : {}) }));
  return {
    containers: [
      ...serviceContainers(config),
      ...users.map((u) => ({ name: workspaceContainer(u), image: workspaceImage, healthcheck: true, user: u.name })),
    ],
    routes: buildRoutes(config),
    published: publishedRoutes(config),
    units: opsEnabledUnits({ ...(config.dataSync?.enabled ? { dataSync: config.dataSync } : {}) }),
    prometheusJobs: (prom.scrape_configs as Array<{ job_name: string }>).map((j) => j.job_name),
    driveMountpoint: `${config.storage.mountpoint}/shared`,
  };
}

export interface ProbeOptions {
  /** POST one test alert to Alertmanager and watch it being delivered. */
  sendTestAlert?: boolean;
  /** Seconds to watch the test alert's delivery (Alertmanager's group_wait is 30 s). Default 60. */
  alertWaitS?: number;
  /** Who sends it (shown in the alert). */
  sender?: string;
  /** Now, for the test alert's timestamps (ms). */
  now?: number;
}

/** The probe's TS_* inputs for a config. */
export function probeEnv(config: ServerConfig, targets: DoctorTargets, opts: ProbeOptions = {}): Record<string, string> {
  const s = config.storage;
  const users = [...config.users].sort((a, b) => a.uid - b.uid);
  const now = opts.now ?? Date.now();
  const alert = [
    {
      labels: { alertname: TEST_ALERT_NAME, severity: "warning", family: "doctor", instance: config.host.address },
      annotations: {
        summary: `Test alert from train-server doctor (${opts.sender ?? "admin"})`,
        description: "Sent by `npm run doctor -- --send-test-alert`: if you read this in Telegram, alerts reach you. It resolves by itself in 5 minutes.",
      },
      startsAt: new Date(now).toISOString(),
      endsAt: new Date(now + 5 * 60_000).toISOString(),
    },
  ];
  return {
    TS_MOUNTPOINT: s.mountpoint,
    TS_LABEL: s.label,
    TS_DEVICES: s.devices.join(" "),
    TS_CACHE_MODE: s.cache && s.cache.mode !== "none" ? s.cache.mode : "none",
    TS_TEXTFILE_DIR: TEXTFILE_DIR,
    TS_OPS_ENV: `${OPS_CONFIG_DIR}/ops.env`,
    TS_DRIVE_MOUNTPOINT: targets.driveMountpoint,
    TS_GPU_COUNT: String(config.host.gpu.count),
    TS_NETWORK: SERVICES_NETWORK,
    TS_LAN_ADDRESS: config.host.lanAddress,
    TS_CONTAINERS: targets.containers.map((c) => `${c.name} ${c.image}`).join("\n"),
    TS_WORKSPACES: users.map((u) => `${u.name} ${workspaceContainer(u)} ${u.sshPort}`).join("\n"),
    TS_ROUTES: targets.routes.map((r) => `${r.id} ${r.hostname}`).join("\n"),
    TS_UNITS: targets.units.join(" "),
    TS_SEND_TEST_ALERT: opts.sendTestAlert ? "1" : "0",
    TS_TEST_ALERT: JSON.stringify(alert),
    TS_ALERT_WAIT_S: String(opts.alertWaitS ?? 60),
  };
}

/**
 * The bash program the doctor sends on stdin: its inputs, lib.sh, then doctor-probe.sh, in `{ }` so that bash reads
 * all of it before running any of it. Nothing in it is secret (the probe reads secrets on the host, as root, and
 * prints none of them).
 */
export function renderProbe(env: Record<string, string>, scripts = { lib: readHostScript("lib"), probe: readHostScript("doctor-probe") }): string {
  const vars = Object.keys(env)
    .sort()
    .map((k) => {
      if (!/^TS_[A-Z0-9_]+$/.test(k)) throw new Error(`probe input ${k} must match TS_[A-Z0-9_]+`);
      return `${k}=${shellQuote(env[k])}`;
    });
  return ["{", "TS_SCRIPT_NAME=doctor-probe", ...vars, scripts.lib, scripts.probe, "}", ""].join("\n");
}

// --------------------------------------------------------------------------------------------- helpers

/** A sample of the ops jobs' textfile metrics. */
interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

function parseMetrics(facts: Facts): Sample[] {
  const out: Sample[] = [];
  for (const [k, line] of Object.entries(facts)) {
    if (!/^metric\.\d+$/.test(k)) continue;
    const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? "").matchAll(/([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

interface TaskState {
  success: number;
  lastRun: number;
  lastSuccess: number;
}

function task(samples: Sample[], name: string): TaskState | undefined {
  const get = (metric: string) => samples.find((s) => s.name === metric && s.labels.task === name)?.value;
  const success = get("train_server_task_success");
  if (success === undefined) return undefined;
  return { success, lastRun: get("train_server_task_last_run_timestamp_seconds") ?? 0, lastSuccess: get("train_server_task_last_success_timestamp_seconds") ?? 0 };
}

function value(samples: Sample[], name: string, labels: Record<string, string> = {}): number | undefined {
  return samples.find((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))?.value;
}

/** "12 min", "3.2 h", "4.0 d" */
export function age(seconds: number): string {
  if (seconds < 90) return `${Math.max(0, Math.round(seconds))} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 3 * 86400) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} d`;
}

/** 512 B, 3.4 MiB, 1.25 GiB, 930.1 GiB */
export function size(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  for (const [unit, n] of [["KiB", 2 ** 10], ["MiB", 2 ** 20], ["GiB", 2 ** 30]] as const) {
    if (bytes < n * 1024 || unit === "GiB") return `${(bytes / n).toFixed(bytes / n < 10 ? 2 : 1)} ${unit}`;
  }
  return `${bytes} B`;
}

function when(epoch: number): string {
  return new Date(epoch * 1000).toISOString().replace(/\.\d+Z$/, "Z");
}

const ok = (name: string, message: string): Check => ({ name, status: "ok", message });
const warn = (name: string, message: string, fix: string): Check => ({ name, status: "warn", message, fix });
const fail = (name: string, message: string, fix: string): Check => ({ name, status: "fail", message, fix });
const skip = (name: string, message: string): Check => ({ name, status: "skip", message });

// ------------------------------------------------------------------------------------------- the checks

export interface EvaluateContext {
  /** Now in ms, when the facts carry no server time. */
  now?: number;
  /** The test alert was asked for (its line is shown only then). */
  sendTestAlert?: boolean;
  /** Results of the requests from outside (Access), by route id; or why they were not made. */
  outside?: { results: Record<string, OutsideResult> } | { skipped: string };
  /** The workspace image tag (default: the checkout's). */
  workspaceImage?: string;
}

/** One unauthenticated request to a public hostname, made from the admin's machine through public DNS. */
export interface OutsideResult {
  address?: string;
  status?: number;
  location?: string;
  server?: string;
  /** `DNS <code>: ...` (resolving through public DNS) or `HTTPS <code>: ...` (the request). */
  error?: string;
}

/** Every check of a probe's facts, in report order. */
export function evaluate(config: ServerConfig, facts: Facts, ctx: EvaluateContext = {}): Check[] {
  const targets = doctorTargets(config, ctx.workspaceImage);
  const now = Number(facts["time.now"]) || Math.floor((ctx.now ?? Date.now()) / 1000);
  const samples = parseMetrics(facts);
  const e: Env = { config, facts, targets, now, samples, ctx };
  return [
    ...checkHost(e),
    ...checkStorage(e),
    ...checkGpu(e),
    ...checkDocker(e),
    ...checkNetwork(e),
    ...checkMonitoring(e),
    ...checkBackups(e),
    ...checkUsers(e),
  ];
}

interface Env {
  config: ServerConfig;
  facts: Facts;
  targets: DoctorTargets;
  now: number;
  samples: Sample[];
  ctx: EvaluateContext;
}

function checkHost({ config, facts }: Env): Check[] {
  const user = config.host.sshUser;
  if (facts.sudo === "ok") return [ok("host.sudo", `${user} runs sudo -n without a password (${facts["probe.host"] ?? "?"})`)];
  return [
    fail(
      "host.sudo",
      `sudo -n fails for ${user}: the btrfs, Docker and restic reads below are incomplete`,
      `give ${user} passwordless sudo on the server (README: "The admin account"), e.g. /etc/sudoers.d/${user}: "${user} ALL=(ALL) NOPASSWD: ALL"`,
    ),
  ];
}

function checkStorage({ config, facts, now, samples, targets: t }: Env): Check[] {
  const s = config.storage;
  const mp = s.mountpoint;
  const out: Check[] = [];
  const [fstype, source] = (facts["storage.mount"] ?? "").split(/\s+/);
  const uuid = facts["storage.uuid"] ?? "";
  const mounted = facts["storage.mounted"] === "1";
  // --- mount
  if (!mounted) {
    out.push(fail("storage.mount", `${mp} is not mounted`, `sudo mount ${mp} (its /etc/fstab line is ${facts["storage.fstab"] || "missing"}); if that fails: sudo btrfs filesystem show, dmesg | tail`));
  } else if (fstype !== "btrfs") {
    out.push(fail("storage.mount", `${mp} has a ${fstype || "?"} filesystem (${source ?? "?"}) mounted, not the btrfs array`, `unmount it; the array is mounted by \`pulumi up\` (storage.sh)`));
  } else if (facts["storage.label"] !== s.label) {
    out.push(fail("storage.mount", `${mp} holds btrfs "${facts["storage.label"] ?? "?"}", not the array labelled "${s.label}"`, `check storage.label and what is mounted (sudo btrfs filesystem show ${mp})`));
  } else if (facts["storage.fstab"] !== `UUID=${uuid}`) {
    out.push(fail("storage.mount", `${mp} (UUID ${uuid}) is mounted, but /etc/fstab mounts it from "${facts["storage.fstab"] || "(no line)"}", not UUID=${uuid}: the next boot may not mount it`, "pulumi up (storage.sh writes the fstab line by UUID)"));
  } else {
    out.push(ok("storage.mount", `${mp}: btrfs "${s.label}" UUID ${uuid} (${source}), in /etc/fstab by UUID`));
  }
  const notMounted = (name: string) => skip(name, `${mp} is not mounted (see storage.mount)`);
  // --- devices
  const absent = s.devices.filter((_, i) => (facts[`storage.device.${i}`] ?? "absent") === "absent");
  if (!mounted || fstype !== "btrfs") out.push(notMounted("storage.devices"));
  else {
    const total = Number(facts["storage.total_devices"] ?? NaN);
    const missing = Number(facts["storage.devices_missing"] ?? 0) + (facts["storage.show_missing"] === "1" && !Number(facts["storage.devices_missing"] ?? 0) ? 1 : 0);
    const ids = Object.keys(facts).filter((k) => k.startsWith("storage.missing_devid.")).map((k) => k.split(".").pop());
    const fsDevs = facts["storage.fs_devices"] ?? "";
    if (missing > 0) {
      out.push(
        fail(
          "storage.devices",
          `the array is DEGRADED: ${missing} of ${total} device(s) missing${ids.length ? ` (devid ${ids.join(", ")})` : ""}; present: ${fsDevs || "none"}${absent.length ? `; not on the server: ${absent.join(" ")}` : ""}`,
          `find the disk (sudo dmesg | grep -i btrfs, sudo smartctl -a <disk>); replace it with \`sudo btrfs replace start <devid> <new disk> ${mp}\` before another fails, then list the array's disks in storage.devices`,
        ),
      );
    } else if (absent.length) {
      out.push(fail("storage.devices", `storage.devices lists ${absent.join(" ")}, which the server does not have (renamed? use /dev/disk/by-id paths)`, "point storage.devices at the array's disks (ls -l /dev/disk/by-id)"));
    } else if (total !== s.devices.length) {
      out.push(fail("storage.devices", `the array has ${total} devices (${fsDevs}), storage.devices lists ${s.devices.length}`, "list exactly the array's disks in storage.devices (adding or removing a disk is done by hand: btrfs device add/remove)"));
    } else {
      out.push(ok("storage.devices", `${total} of ${s.devices.length} devices present, none missing (${fsDevs})`));
    }
  }
  // --- profiles
  if (!mounted || fstype !== "btrfs") out.push(notMounted("storage.profiles"));
  else {
    const d = facts["storage.data_profile"] ?? "";
    const m = facts["storage.metadata_profile"] ?? "";
    if (d === s.dataProfile && m === s.metadataProfile) out.push(ok("storage.profiles", `data ${d}, metadata ${m}, as configured`));
    else
      out.push(
        fail(
          "storage.profiles",
          `data ${d || "?"}, metadata ${m || "?"}; the config wants data ${s.dataProfile}, metadata ${s.metadataProfile}${/single/.test(`${d},${m}`) && s.dataProfile !== "single" ? " (single chunks: written while degraded?)" : ""}`,
          `once every disk is present: sudo btrfs balance start -dconvert=${s.dataProfile},soft -mconvert=${s.metadataProfile},soft ${mp}; a deliberate profile change is storage.convertProfile: true + pulumi up`,
        ),
      );
  }
  // --- device errors
  if (!mounted || fstype !== "btrfs") out.push(notMounted("storage.errors"));
  else if (facts["storage.device_errors"] === undefined) out.push(warn("storage.errors", "btrfs device stats could not be read", `sudo btrfs device stats ${mp}`));
  else if (Number(facts["storage.device_errors"]) === 0) out.push(ok("storage.errors", "btrfs device stats: 0 errors on every device"));
  else
    out.push(
      fail(
        "storage.errors",
        `btrfs device stats counts ${facts["storage.device_errors"]} error(s): ${facts["storage.device_errors_detail"]}`,
        `check the disk (sudo smartctl -a <disk>, sudo dmesg | grep -i btrfs), run a scrub; after repairing or replacing it: sudo btrfs device stats -z ${mp}`,
      ),
    );
  // --- bcache
  const mode = s.cache && s.cache.mode !== "none" ? s.cache.mode : undefined;
  if (!mode) out.push(skip("storage.bcache", "storage.cache is not set: no bcache"));
  else {
    const bad: string[] = [];
    const dirty: string[] = [];
    s.devices.forEach((dev, i) => {
      const [m, state, d] = (facts[`bcache.${i}`] ?? "none").split(/\s+/);
      if (m === "none" || m === undefined) bad.push(`${dev} is not behind bcache`);
      else if (m !== mode) bad.push(`${dev} caches in ${m}, not ${mode}`);
      else if (state === "no") bad.push(`${dev} is detached from its cache (state "no cache")`);
      else dirty.push(`${dev} ${state} ${d ?? "?"}`);
    });
    if (bad.length) out.push(fail("storage.bcache", bad.join("; "), "pulumi up (storage.sh attaches the devices and sets the mode); a device that stays detached: cat /sys/block/<bcacheN>/bcache/state, dmesg"));
    else out.push(ok("storage.bcache", `${mode} on ${s.devices.length} device(s), ${s.cache!.device}; dirty data: ${dirty.join(", ")}`));
  }
  // --- space
  if (!mounted) out.push(notMounted("storage.space"));
  else {
    const [bytes, avail] = (facts["storage.space"] ?? "").split(/\s+/).map(Number);
    const limit = config.alerts.fsUsedPercent;
    if (!(bytes > 0)) out.push(warn("storage.space", "df could not read the array's size", `df -h ${mp}`));
    else {
      const used = 100 * (1 - avail / bytes);
      const msg = `${used.toFixed(1)} % used, ${size(avail)} free of ${size(bytes)} (alert at ${limit} %)`;
      if (used >= limit) out.push(fail("storage.space", msg, "free space: old checkpoints in workspaces (sudo btrfs qgroup show -reF), snapshots (btrbk), the Drive cache (drive.cacheSizeGb)"));
      else if (used >= limit - 10) out.push(warn("storage.space", msg, "plan for space: the alert fires at alerts.fsUsedPercent; see who uses most in user.*.quota"));
      else out.push(ok("storage.space", msg));
    }
  }
  // --- scrub
  const scrub = task(samples, "scrub");
  const status = facts["storage.scrub_status"] ? ` (btrfs scrub status: ${facts["storage.scrub_status"]})` : "";
  const sched = `monthly, day ${config.backup.scrubDay} at ${config.backup.scrubAt}`;
  if (!scrub) out.push(warn("storage.scrub", `no scrub has run yet (${sched})${status}`, "sudo systemctl start ts-scrub.service (reads every block; hours on large disks)"));
  else if (scrub.success !== 1) {
    const errs = ["read", "csum", "verify", "super", "uncorrectable", "corrected"].map((t) => [t, value(samples, "train_server_btrfs_scrub_errors", { type: t }) ?? 0] as const).filter(([, n]) => n > 0);
    out.push(
      fail(
        "storage.scrub",
        `the last scrub (${when(scrub.lastRun)}) failed${errs.length ? `: ${errs.map(([t, n]) => `${n} ${t}`).join(", ")} error(s)` : ""}${status}`,
        `sudo journalctl -u ts-scrub; sudo btrfs device stats ${mp}; a disk going bad is replaced with btrfs replace`,
      ),
    );
  } else if (now - scrub.lastSuccess > 32 * 86400) out.push(warn("storage.scrub", `the last scrub passed ${age(now - scrub.lastSuccess)} ago (${sched}): a month was skipped${status}`, "systemctl list-timers ts-scrub.timer; sudo systemctl start ts-scrub.service"));
  else out.push(ok("storage.scrub", `the last scrub passed ${age(now - scrub.lastSuccess)} ago, no errors${status}`));
  // --- the Drive
  const drive = t.driveMountpoint;
  const [dtype] = (facts["drive.mount"] ?? "").split(/\s+/);
  if (dtype?.startsWith("fuse") && facts["drive.readable"] === "1") out.push(ok("storage.drive", `the Drive is mounted at ${drive} (${facts["drive.mount"]})`));
  else
    out.push(
      fail(
        "storage.drive",
        dtype ? `${drive} is mounted (${facts["drive.mount"]}) but does not answer` : `the Drive is not mounted at ${drive}`,
        "sudo systemctl status ts-drive-mount; sudo journalctl -u ts-drive-mount (rclone config, network)",
      ),
    );
  return out;
}

function checkGpu({ config, facts, targets: t }: Env): Check[] {
  const n = config.host.gpu.count;
  if (n === 0) return [skip("gpu", "host.gpu.count is 0: no GPU check")];
  const out: Check[] = [];
  const host = facts["gpu.host"] ?? "";
  const gpus = host
    .split(" | ")
    .map((l) => l.split(",").map((x) => x.trim()))
    .filter((f) => /^\d+$/.test(f[0] ?? ""))
    .map(([index, uuid, name, temp]) => ({ index: Number(index), uuid, name, temp }));
  if (host === "absent") out.push(fail("gpu.host", "nvidia-smi is not installed: no NVIDIA driver on the host", "install the driver (sudo ubuntu-drivers install) and reboot; then pulumi up (the container toolkit)"));
  else if (facts["gpu.rc"] !== "0") out.push(fail("gpu.host", `nvidia-smi fails (exit ${facts["gpu.rc"] ?? "?"}): ${host.slice(0, 200)}`, "the driver does not answer: sudo dmesg | grep -i nvrm; a driver/kernel mismatch after an update needs a reboot"));
  else if (gpus.length !== n) out.push(fail("gpu.host", `nvidia-smi lists ${gpus.length} GPU(s), host.gpu.count is ${n}: ${gpus.map((g) => g.name).join(", ")}`, "a GPU fell off the bus (dmesg | grep -i xid) or host.gpu.count is wrong"));
  else out.push(ok("gpu.host", `the driver answers: ${gpus.map((g) => `GPU ${g.index} ${g.name} ${g.temp} °C`).join(", ")}`));
  for (const c of t.containers.filter((x) => x.user)) {
    const u = config.users.find((x) => x.name === c.user) as UserConfig;
    const want = u.gpus === "all" ? gpus.map((g) => g.uuid) : u.gpus.map((i) => gpus.find((g) => g.index === i)?.uuid ?? `GPU ${i}`);
    const wantText = u.gpus === "all" ? "all GPUs" : u.gpus.length ? `GPU ${u.gpus.join(", ")}` : "no GPU";
    const name = `gpu.${c.name}`;
    const fact = facts[`gpu.ws.${u.name}`];
    if (fact === undefined) {
      out.push(skip(name, `${c.name} is not running (see docker.${c.name})`));
      continue;
    }
    const [rc, list = ""] = [fact.split(" ")[0], fact.slice(fact.indexOf(" ") + 1)];
    const seen = rc === "0" ? list.split(",").map((x) => x.trim()).filter((x) => x.startsWith("GPU-")) : [];
    const same = seen.length === want.length && want.every((w) => seen.includes(w));
    if (same) out.push(ok(name, `sees exactly ${wantText}${seen.length ? ` (${seen.join(", ")})` : ""}`));
    else if (rc !== "0" && want.length) out.push(fail(name, `nvidia-smi fails inside ${c.name} (exit ${rc}): ${list.slice(0, 160)}`, `the container has no GPU access: pulumi up (its device requests); sudo docker inspect ${c.name} --format '{{json .HostConfig.DeviceRequests}}'`));
    else out.push(fail(name, `sees ${seen.length ? seen.join(", ") : "no GPU"}, configured: ${wantText}`, `pulumi up (replaces ${c.name} with its configured device requests)`));
  }
  return out;
}

function checkDocker({ config, facts, targets: t }: Env): Check[] {
  const out: Check[] = [];
  const [version, driver, root] = (facts["docker.info"] ?? "").split(/\s+/);
  // userns-remap (baseline daemon.json): the daemon keeps its data in <data-root>/<uid>.<gid> of the remapped root
  const dataRoot = `${config.storage.mountpoint}/docker-data/${REMAPPED_ROOT_UID}.${REMAPPED_ROOT_UID}`;
  if (facts["docker.rc"] !== "0") out.push(fail("docker.daemon", `docker info fails: ${facts["docker.info"] ?? "no answer"}`, "sudo systemctl status docker; sudo journalctl -u docker | tail"));
  else if (driver !== "btrfs" || root !== dataRoot) out.push(fail("docker.daemon", `Docker ${version} uses ${driver} in ${root}, not btrfs in ${dataRoot}`, "pulumi up (baseline.sh writes /etc/docker/daemon.json); then sudo systemctl restart docker"));
  else out.push(ok("docker.daemon", `Docker ${version}, btrfs, data root ${root}`));
  for (const c of t.containers) {
    const name = `docker.${c.name}`;
    const fact = facts[`container.${c.name}`];
    if (fact === undefined) {
      out.push(fail(name, "not running: Docker does not answer (see docker.daemon)", "sudo systemctl start docker; then run the doctor again"));
      continue;
    }
    if (fact === "absent") {
      out.push(fail(name, `configured but absent (image ${c.image})`, "pulumi up (creates it; a failed health wait shows its reason there)"));
      continue;
    }
    const [state, health, image, imageId, restarts, exitCode, startedAt, finishedAt] = fact.split("\t");
    const expectedId = facts[`container.${c.name}.expected_id`] ?? "";
    const imageOk = image === c.image || (!!expectedId && imageId === expectedId);
    if (state !== "running")
      out.push(fail(name, `${state}${state === "exited" ? ` (exit code ${exitCode}) at ${finishedAt}` : ""}`, `sudo docker logs --tail 50 ${c.name}; sudo docker start ${c.name} (or pulumi up)`));
    else if (!imageOk) out.push(fail(name, `runs ${image}, the config pins ${c.image}`, `pulumi up (replaces ${c.name} with the pinned image)`));
    else if (health === "unhealthy")
      out.push(fail(name, `running but unhealthy: ${facts[`container.${c.name}.health_log`] || "(no health log)"}`, `sudo docker logs --tail 50 ${c.name}; sudo docker inspect ${c.name} --format '{{json .State.Health}}'`));
    else if (health === "starting") out.push(warn(name, `running, health check still starting (since ${startedAt})`, `wait a minute and run the doctor again; sudo docker logs ${c.name}`));
    else if (health === "none" && c.healthcheck) out.push(warn(name, `running ${image} without the health check the program gives it (not made by this program?)`, `pulumi up (re-creates ${c.name})`));
    else if (Number(restarts) > 3) out.push(warn(name, `running ${image}, but restarted ${restarts} times`, `sudo docker logs ${c.name} (crash loop?)`));
    else out.push(ok(name, `running, ${health === "none" ? "no health check" : health}, ${image}${image === c.image ? "" : ` (= ${c.image})`}`));
  }
  return out;
}

function checkNetwork({ config, facts, targets: t, ctx }: Env): Check[] {
  const out: Check[] = [];
  // --- tunnel
  const conns = Number(facts["tunnel.ha_connections"] ?? 0);
  const metrics = facts["tunnel.metrics"];
  if (conns > 0) out.push(ok("network.tunnel", `cloudflared holds ${conns} connection(s) to the Cloudflare edge`));
  else {
    const msg = metrics === "none" || metrics === undefined ? "cloudflared's metrics (127.0.0.1:2000) do not answer" : `cloudflared holds no connection to the Cloudflare edge (metrics: HTTP ${metrics}, ha_connections ${facts["tunnel.ha_connections"] || "absent"})`;
    const fix = "see docker.cloudflared; sudo docker logs --tail 50 cloudflared (token, outbound 7844/443 to Cloudflare)";
    if (config.rig) out.push(warn("network.tunnel", `${msg} — expected on a test rig (rig: true), which has no tunnel to Cloudflare`, fix));
    else out.push(fail("network.tunnel", msg, fix));
  }
  // --- every route through Traefik, LAN path (service routes here, users' in user.*)
  for (const r of t.routes.filter((x) => x.audience.kind !== "user")) out.push(routeCheck(`network.route.${r.id}`, r, facts, config.host.lanAddress));
  // --- Access in front of every public hostname, from outside
  const o = ctx.outside;
  if (!o || "skipped" in o) out.push(skip("network.access", o ? o.skipped : "not asked (--outside)"));
  else for (const r of t.published) out.push(accessCheck(r, o.results[r.id]));
  return out;
}

/** What Traefik answered on the LAN address for a route's hostname. */
function routeVerdict(r: Route, facts: Facts, lan: string): { good: boolean; text: string; fix: string } {
  const fact = facts[`route.${r.id}`];
  const backend = `${r.container}:${r.port}`;
  if (fact === undefined || fact === "none")
    return { good: false, text: `Traefik on ${lan}:80 does not answer for ${r.hostname}`, fix: "see docker.traefik; sudo docker logs --tail 50 traefik" };
  const [status, first = ""] = fact.split("\t");
  if (status === "404" && /404 page not found/.test(first))
    return { good: false, text: `Traefik has no router for ${r.hostname} (404)`, fix: `pulumi up (the Traefik labels of ${r.container}); see docker.${r.container}` };
  if (["502", "503", "504"].includes(status))
    return { good: false, text: `Traefik answers ${status} for ${r.hostname}: its backend ${backend} does not`, fix: `see docker.${r.container}; sudo docker logs --tail 50 ${r.container}` };
  return { good: true, text: `${r.hostname} → HTTP ${status} through Traefik (${backend})`, fix: "" };
}

function routeCheck(name: string, r: Route, facts: Facts, lan: string): Check {
  const v = routeVerdict(r, facts, lan);
  return v.good ? ok(name, v.text) : fail(name, v.text, v.fix);
}

/** Access's login page (a redirect to <team>.cloudflareaccess.com or /cdn-cgi/access/login). */
const ACCESS_LOGIN = /cloudflareaccess\.com|\/cdn-cgi\/access\/login/;

export function accessCheck(r: Route, res: OutsideResult | undefined): Check {
  const name = `network.access.${r.id}`;
  const fixDns = "pulumi up (Edge: the proxied CNAME of each route); check the zone in the Cloudflare dashboard";
  if (!res) return warn(name, `${r.hostname}: not asked`, "run the doctor with --outside");
  if (res.error) {
    if (/^DNS (ENOTFOUND|ENODATA)/.test(res.error)) return fail(name, `${r.hostname} does not resolve in public DNS (${res.error})`, fixDns);
    // the public resolvers did not answer: this machine cannot look, which says nothing about the server
    if (/^DNS /.test(res.error)) return warn(name, `${r.hostname}: public DNS (1.1.1.1, 8.8.8.8) does not answer from here (${res.error}): not checked`, "run the doctor from a network that lets DNS out, or pass --no-outside");
    return fail(name, `${r.hostname}${res.address ? ` (${res.address})` : ""}: no answer from outside (${res.error})`, "the Cloudflare edge is not reachable from here, or the tunnel is down (network.tunnel)");
  }
  const s = res.status ?? 0;
  if (s >= 300 && s < 400 && ACCESS_LOGIN.test(res.location ?? ""))
    return ok(name, `${r.hostname}: an unauthenticated request gets Access's login (${s} → ${(res.location ?? "").replace(/\?.*$/, "")})`);
  if (s >= 200 && s < 300)
    return fail(name, `${r.hostname} answers ${s} to an unauthenticated request: the app is PUBLIC, without Access`, "pulumi up (Edge: one Access application per hostname); until then remove the DNS record in the Cloudflare dashboard");
  if (s === 530 || s === 502) return fail(name, `${r.hostname}: Cloudflare answers ${s} (the tunnel does not reach the server)`, "see network.tunnel and docker.cloudflared");
  return fail(name, `${r.hostname}: ${s}${res.location ? ` → ${res.location}` : ""}, not Access's login`, "check the hostname's Access application (Zero Trust → Access → Applications); pulumi up");
}

function checkMonitoring({ config, facts, targets: t, ctx }: Env): Check[] {
  const out: Check[] = [];
  if (facts["tool.jq"] === "0")
    return [warn("monitoring", "jq is not installed on the server: Prometheus, Grafana and Alertmanager answers were not read", "sudo apt-get install jq (ops-install.sh installs it: pulumi up)")];
  // --- Prometheus targets
  const ps = facts["prom.status"];
  if (ps !== "200") out.push(fail("monitoring.targets", `the Prometheus API does not answer (${ps === "no-ip" ? "no prometheus container on the services network" : ps === "none" || ps === undefined ? "no answer" : `HTTP ${ps}`})`, "see docker.prometheus; sudo docker logs --tail 50 prometheus"));
  else {
    const targets = Object.keys(facts)
      .filter((k) => /^prom\.target\.\d+$/.test(k))
      .map((k) => facts[k].split("\t"))
      .map(([job, health, url, err]) => ({ job, health, url, err }));
    const bad: string[] = [];
    for (const job of t.prometheusJobs) {
      const of = targets.filter((x) => x.job === job);
      if (!of.length) bad.push(`no target for job ${job}`);
      for (const x of of.filter((y) => y.health !== "up")) bad.push(`${job} ${x.url} is ${x.health}${x.err ? `: ${x.err}` : ""}`);
    }
    if (bad.length) out.push(fail("monitoring.targets", bad.join("; "), "see the docker.* line of that exporter; Prometheus → Status → Targets"));
    else out.push(ok("monitoring.targets", `${targets.length} target(s) up: ${t.prometheusJobs.join(", ")}`));
  }
  // --- Grafana
  const [db, version] = (facts["grafana.health"] ?? "").split(" ");
  if (facts["grafana.status"] === "200" && db === "ok") out.push(ok("monitoring.grafana", `Grafana ${version} answers, database ok`));
  else {
    const gs = facts["grafana.status"];
    const why = gs === "no-ip" ? "no grafana container on the services network" : gs === "none" || gs === undefined ? "no answer" : `HTTP ${gs}${db ? `, database ${db}` : ""}`;
    out.push(fail("monitoring.grafana", `Grafana's /api/health: ${why}`, "see docker.grafana; sudo docker logs --tail 50 grafana"));
  }
  // --- Alertmanager's Telegram route
  const chat = Number(config.alerts.telegramChatId);
  const as = facts["am.status"];
  if (as !== "200") out.push(fail("monitoring.alertmanager", `the Alertmanager API does not answer (${as === "no-ip" ? "no alertmanager container on the services network" : as === "none" || as === undefined ? "no answer" : `HTTP ${as}`})`, "see docker.alertmanager; sudo docker logs --tail 50 alertmanager"));
  else {
    const v = telegramRoute(Buffer.from(facts["am.config_b64"] ?? "", "base64").toString("utf8"), chat);
    if (v.good) out.push(ok("monitoring.alertmanager", `Alertmanager ${facts["am.version"] ?? ""}: every alert routes to Telegram (${v.text})`));
    else out.push(fail("monitoring.alertmanager", `Alertmanager ${facts["am.version"] ?? ""}: ${v.text}`, "pulumi up (Operations renders alertmanager.yml and signals Alertmanager); alerts.telegramChatId and the telegramBotToken secret"));
  }
  // --- alerts firing now
  if (facts["am.status"] === "200") {
    const firing = Object.keys(facts)
      .filter((k) => /^am\.alert\.\d+$/.test(k))
      .map((k) => facts[k].split("\t"))
      .filter(([n]) => n !== TEST_ALERT_NAME);
    if (firing.length) out.push(warn("monitoring.alerts", `${firing.length} alert(s) firing: ${firing.map(([n, sev, at]) => `${n} (${sev || "?"}, since ${at})`).join(", ")}`, "each is in the Telegram chat with its description; the lines above show most causes"));
    else out.push(ok("monitoring.alerts", "no alert firing"));
  }
  // --- the test alert
  if (ctx.sendTestAlert) out.push(testAlertCheck(facts));
  return out;
}

/** Whether an Alertmanager config (as its API shows it) routes everything to a Telegram receiver for `chat`. */
export function telegramRoute(yamlText: string, chat: number): { good: boolean; text: string } {
  let cfg: any;
  try {
    cfg = parseYaml(yamlText);
  } catch (e) {
    return { good: false, text: `its configuration does not parse (${(e as Error).message.split("\n")[0]})` };
  }
  if (!cfg?.route?.receiver) return { good: false, text: "its configuration has no route" };
  const names = new Set<string>([cfg.route.receiver, ...((cfg.route.routes ?? []) as Array<{ receiver?: string }>).map((r) => r.receiver).filter((r): r is string => !!r)]);
  const problems: string[] = [];
  const chats = new Set<number>();
  for (const n of names) {
    const rcv = ((cfg.receivers ?? []) as Array<any>).find((r) => r.name === n);
    const tg = (rcv?.telegram_configs ?? []) as Array<any>;
    if (!tg.length) problems.push(`receiver "${n}" has no telegram_configs`);
    for (const c of tg) {
      if (Number(c.chat_id) !== chat) problems.push(`receiver "${n}" sends to chat ${c.chat_id}, alerts.telegramChatId is ${chat}`);
      else chats.add(Number(c.chat_id));
      if (!c.bot_token && !c.bot_token_file) problems.push(`receiver "${n}" has no bot token`);
    }
  }
  if (problems.length) return { good: false, text: problems.join("; ") };
  return { good: true, text: `receiver ${[...names].join(", ")} → chat ${[...chats].join(", ")}` };
}

function testAlertCheck(facts: Facts): Check {
  const name = "monitoring.test-alert";
  const sent = facts["am.test_alert"];
  if (sent === undefined) return fail(name, "not sent: Alertmanager does not answer", "see monitoring.alertmanager");
  if (sent !== "200") return fail(name, `Alertmanager refused the test alert (HTTP ${sent || "none"})`, "sudo docker logs --tail 50 alertmanager");
  const [a0, f0] = (facts["am.notify_before"] ?? "0 0").split(" ").map(Number);
  const [a1, f1] = (facts["am.notify_after"] ?? "0 0").split(" ").map(Number);
  const waited = facts["am.notify_waited"] ?? "?";
  if (f1 > f0) return fail(name, `sent (HTTP 200), but Alertmanager could not deliver it to Telegram (${f1 - f0} failed attempt(s) in ${waited} s)`, "sudo docker logs alertmanager | grep -i telegram (bot token, chat id, outbound HTTPS to api.telegram.org)");
  if (a1 > a0) return ok(name, `${TEST_ALERT_NAME} delivered to Telegram by Alertmanager in ~${waited} s: check the chat`);
  return warn(name, `sent (HTTP 200), but Alertmanager made no delivery attempt within ${waited} s`, "look in the chat in a minute; sudo docker logs alertmanager");
}

function checkBackups({ config, facts, now, samples, targets: t }: Env): Check[] {
  const out: Check[] = [];
  const maxH = config.alerts.backupMaxAgeHours;
  // --- btrbk snapshots
  const groups = Object.keys(facts)
    .filter((k) => k.startsWith("snapshots."))
    .map((k) => ({ group: k.slice("snapshots.".length), count: Number(facts[k].split(" ")[0]), newest: Number(facts[k].split(" ")[1]) }));
  const snap = task(samples, "snapshot");
  const newest = Math.max(0, ...groups.map((g) => g.newest), groups.some((g) => g.newest === 0) ? (snap?.lastSuccess ?? 0) : 0);
  const snapFix = "systemctl list-timers ts-snapshot.timer; sudo journalctl -u ts-snapshot";
  if (snap && snap.success !== 1) out.push(fail("backup.snapshots", `the last snapshot run (${when(snap.lastRun)}) failed`, snapFix));
  else if (!groups.length || newest === 0) out.push(snap ? fail("backup.snapshots", `no snapshot under ${config.storage.mountpoint}/.snapshots`, snapFix) : warn("backup.snapshots", "no snapshot yet (hourly)", "sudo systemctl start ts-snapshot.service"));
  else if (now - newest > 2 * 3600) out.push(fail("backup.snapshots", `the newest snapshot is ${age(now - newest)} old (hourly)`, snapFix));
  else out.push(ok("backup.snapshots", `newest ${age(now - newest)} ago; ${groups.map((g) => `${g.group} ${g.count}`).join(", ")}`));
  // --- the backup job
  const b = task(samples, "backup");
  const bFix = "sudo journalctl -u ts-backup; sudo systemctl start ts-backup.service runs one now";
  if (!b) out.push(warn("backup.job", `no backup has run yet (daily at ${config.backup.schedule})`, "sudo systemctl start ts-backup.service runs the first one now"));
  else if (b.success !== 1) out.push(fail("backup.job", `the last backup (${when(b.lastRun)}) failed${b.lastSuccess ? `; last success ${age(now - b.lastSuccess)} ago` : ", none ever succeeded"}`, bFix));
  else if (now - b.lastSuccess > maxH * 3600) out.push(fail("backup.job", `the last successful backup is ${age(now - b.lastSuccess)} old (alerts.backupMaxAgeHours ${maxH})`, `systemctl list-timers ts-backup.timer (did it run at ${config.backup.schedule}?); ${bFix}`));
  else {
    const added = value(samples, "train_server_backup_data_added");
    const files = value(samples, "train_server_backup_total_files_processed");
    out.push(ok("backup.job", `the last backup succeeded ${age(now - b.lastSuccess)} ago${files !== undefined ? ` (${files} files, ${size(added ?? 0)} added)` : ""}`));
  }
  // --- the repository itself
  const repo = config.backup.repository;
  const rFix = `as root: restic -r ${repo} snapshots (with RESTIC_PASSWORD_FILE and RCLONE_CONFIG from ${OPS_CONFIG_DIR}/ops.env)`;
  if (facts["restic.error"] !== undefined) out.push(fail("backup.restic", `cannot list ${repo}: ${facts["restic.error"]}`, rFix));
  else if (facts["restic.snapshots"] === undefined) out.push(warn("backup.restic", "the repository was not read", rFix));
  else {
    const [countS, latest] = [facts["restic.snapshots"].split(" ")[0], facts["restic.snapshots"].split(" ")[1] ?? ""];
    const count = Number(countS);
    const at = Date.parse(latest) / 1000;
    if (count === 0 || !Number.isFinite(at)) out.push(b ? fail("backup.restic", `${repo} holds no snapshot`, rFix) : warn("backup.restic", `${repo} holds no snapshot yet`, "sudo systemctl start ts-backup.service"));
    else if (now - at > maxH * 3600) out.push(fail("backup.restic", `the newest restic snapshot in ${repo} is ${age(now - at)} old (alerts.backupMaxAgeHours ${maxH}); ${count} snapshot(s)`, bFix));
    else out.push(ok("backup.restic", `${count} snapshot(s) in ${repo}, newest ${age(now - at)} ago`));
  }
  // --- restore verification
  const v = task(samples, "verify-restore");
  const vSched = `monthly, day ${config.backup.verifyDay} at ${config.backup.verifyAt}`;
  if (!v) out.push(warn("backup.verify", `no restore verification has run yet (${vSched})`, "sudo systemctl start ts-verify-restore.service (after a backup)"));
  else if (v.success !== 1) {
    const mism = value(samples, "train_server_verify_mismatches");
    const repoOk = value(samples, "train_server_verify_repository_ok");
    out.push(fail("backup.verify", `the last restore verification (${when(v.lastRun)}) FAILED${mism !== undefined ? `: ${mism} mismatching file(s), repository check ${repoOk === 1 ? "ok" : "failed"}` : ""}`, "sudo journalctl -u ts-verify-restore: restored files differ or restic check found damage"));
  } else if (now - v.lastSuccess > 32 * 86400) out.push(warn("backup.verify", `the last restore verification passed ${age(now - v.lastSuccess)} ago (${vSched}): a month was skipped`, "systemctl list-timers ts-verify-restore.timer"));
  else {
    const compared = value(samples, "train_server_verify_files_compared");
    out.push(ok("backup.verify", `the last restore verification passed ${age(now - v.lastSuccess)} ago${compared !== undefined ? ` (${compared} files restored and compared, repository check ok)` : ""}`));
  }
  // --- the data sync
  if (config.dataSync?.enabled) {
    const d = task(samples, "data-sync");
    const dFix = "sudo journalctl -u ts-data-sync";
    if (!d) out.push(warn("backup.data-sync", `no data sync has run yet (daily at ${config.dataSync.schedule})`, "sudo systemctl start ts-data-sync.service"));
    else if (d.success !== 1) out.push(fail("backup.data-sync", `the last data sync (${when(d.lastRun)}) failed`, dFix));
    else if (now - d.lastSuccess > 26 * 3600) out.push(fail("backup.data-sync", `the last successful data sync is ${age(now - d.lastSuccess)} old (daily)`, `systemctl list-timers ts-data-sync.timer; ${dFix}`));
    else out.push(ok("backup.data-sync", `the last data sync (${config.dataSync.source} → ${config.dataSync.destination}) succeeded ${age(now - d.lastSuccess)} ago`));
  }
  // --- the timers
  const inactive = t.units.filter((u) => facts[`unit.${u}`] !== "active");
  if (inactive.length) out.push(fail("ops.timers", `not active: ${inactive.map((u) => `${u} (${facts[`unit.${u}`] || "unknown"})`).join(", ")}`, `pulumi up (ops-install.sh enables them), or sudo systemctl enable --now ${inactive.join(" ")}`));
  else out.push(ok("ops.timers", `active: ${t.units.join(", ")}`));
  return out;
}

function checkUsers({ config, facts, now, samples, targets: t }: Env): Check[] {
  const out: Check[] = [];
  const collector = task(samples, "usage-collector");
  const stale = collector && now - collector.lastRun > 3600 ? ` (figures ${age(now - collector.lastRun)} old: the usage collector is late)` : "";
  for (const u of [...config.users].sort((a, b) => a.uid - b.uid)) {
    const p = `user.${u.name}`;
    const container = workspaceContainer(u);
    // SSH into the workspace
    const banner = facts[`${p}.ssh`];
    if (banner?.startsWith("SSH-2.0-")) out.push(ok(`${p}.ssh`, `port ${u.sshPort} on ${config.host.lanAddress} answers (${banner.trim()})`));
    else out.push(fail(`${p}.ssh`, `port ${u.sshPort} on ${config.host.lanAddress} does not answer with SSH (${banner ?? "not asked"})`, `see docker.${container}; sudo docker logs --tail 50 ${container}`));
    // code-server, Jupyter and TensorBoard (through code-server) through Traefik
    const v = t.routes.filter((r) => r.audience.kind === "user" && r.audience.user === u.name).map((r) => ({ r, v: routeVerdict(r, facts, config.host.lanAddress) }));
    const bad = v.filter((x) => !x.v.good);
    if (bad.length) out.push(fail(`${p}.web`, bad.map((x) => x.v.text).join("; "), bad[0].v.fix));
    else out.push(ok(`${p}.web`, v.map((x) => `${x.r.id.slice(u.name.length + 1)} HTTP ${(facts[`route.${x.r.id}`] ?? "").split("\t")[0]}`).join(", ") + " through Traefik"));
    // quota standing
    const used = samples.filter((s) => s.name === "train_server_user_usage_bytes" && s.labels.user === u.name);
    const quota = value(samples, "train_server_user_quota_bytes", { user: u.name }) ?? u.quotaGb * 2 ** 30;
    if (!used.length) {
      out.push(warn(`${p}.quota`, "no usage figures (the usage collector has not measured this user yet)", "sudo systemctl start ts-usage-collector.service"));
      continue;
    }
    const total = used.reduce((a, s) => a + s.value, 0);
    const pct = (100 * total) / quota;
    const parts = used.map((s) => `${s.labels.dir} ${size(s.value)}`).join(", ");
    const msg = `${size(total)} of ${size(quota)} (${pct.toFixed(1)} %): ${parts}${stale}`;
    const warnAt = config.resources.quotaWarnPercent;
    if (pct > 100) out.push(fail(`${p}.quota`, `over quota: ${msg}`, `ask ${u.name} to clean up (old checkpoints in /workspace); the quota is soft (users[].quotaGb)`));
    else if (pct >= warnAt || stale) out.push(warn(`${p}.quota`, msg, stale ? "systemctl list-timers ts-usage-collector.timer" : `above ${warnAt} %: ask ${u.name} to clean up soon`));
    else out.push(ok(`${p}.quota`, msg));
  }
  return out;
}

// ------------------------------------------------------------------------------------ the connection

/** How the ssh session ended, as the CLI saw it. */
export interface SshOutcome {
  status: number | null;
  stderr: string;
  /** The probe printed its last fact. */
  complete: boolean;
  /** The ssh target `user@host:port`. */
  target: string;
  /** The pinned host key's type and fingerprint (`ssh-ed25519 SHA256:...`); absent: strict known_hosts. */
  pinned?: string;
}

/** The line about the connection itself; a failed connection is the only line of the report. */
export function connectionCheck(o: SshOutcome): Check {
  const err = o.stderr.trim().split("\n").filter((l) => !/^\*\*|^@@@/.test(l)).slice(-3).join(" / ");
  if (o.complete) return ok("ssh.connect", `${o.target}, host key ${o.pinned ? `pinned (${o.pinned})` : "checked against known_hosts (this stack pins none: host.hostKey)"}`);
  if (/Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|No .* host key is known/.test(o.stderr)) {
    const what = o.pinned ? `did not present the host key this stack pins (${o.pinned})` : "presented a host key that is not in known_hosts";
    return fail(
      "ssh.hostkey",
      `${o.target} ${what}: ssh refused before logging in, nothing was sent`,
      o.pinned
        ? "if the server was reinstalled, check its key on its console (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) and update host.hostKey; otherwise something is impersonating it"
        : "pin the server's key in host.hostKey (README: Configuration reference), checked on its console",
    );
  }
  if (/Permission denied/.test(o.stderr))
    return fail("ssh.auth", `${o.target} refused the key: ${err}`, "pass the admin key with --identity FILE or load it in ssh-agent (the sshPrivateKey secret's key)");
  if (o.status === 255 || o.status === null)
    return fail("ssh.connect", `cannot reach ${o.target}: ${err || `ssh exited ${o.status}`}`, "check host.address/host.sshPort and the network path (LAN, VPN or the tunnel's SSH route)");
  return fail("ssh.connect", `the probe stopped early (ssh exit ${o.status}): ${err}`, "run it again; if it persists, run host-scripts/doctor-probe.sh by hand on the server");
}

// --------------------------------------------------------------------------------------------- output

export function summarize(checks: Check[]): Record<Status, number> {
  const s: Record<Status, number> = { ok: 0, warn: 0, fail: 0, skip: 0 };
  for (const c of checks) s[c.status]++;
  return s;
}

/** 0 when nothing failed, 1 otherwise. */
export function exitCodeOf(checks: Check[]): 0 | 1 {
  return checks.some((c) => c.status === "fail") ? 1 : 0;
}

/** The report as text: one line per check (status, name, evidence), the fix under each warn/fail, then totals. */
export function formatReport(header: string, checks: Check[]): string {
  const width = Math.min(34, Math.max(...checks.map((c) => c.name.length)));
  const lines = [header];
  for (const c of checks) {
    lines.push(`  ${c.status.padEnd(4)}  ${c.name.padEnd(width)}  ${c.message}`);
    if (c.fix && c.status !== "ok" && c.status !== "skip") lines.push(`  ${"".padEnd(4)}  ${"".padEnd(width)}  fix: ${c.fix}`);
  }
  const s = summarize(checks);
  lines.push(`${s.ok} ok, ${s.warn} warn, ${s.fail} fail, ${s.skip} skip: ${s.fail ? "UNHEALTHY" : "healthy"} (exit ${exitCodeOf(checks)})`);
  return lines.join("\n");
}
