/**
 * What the doctor's host test adds to the RIG (tests/helpers/rig.ts), which the rig replay leaves without the
 * program's Docker containers (no registry here, so no image can be pulled):
 *
 *   - a Docker that can RUN containers inside the rig: systemd-nspawn's system call filter lets the keyring calls
 *     through (runc gives each container a session keyring), and the cgroup v1 hierarchies nspawn mounts read-only
 *     are remounted writable inside it; every container goes under its own cgroup parent, removed at cleanup;
 *   - one container per container the config implies, under the program's names and tagged with the program's pinned
 *     image references (a tiny imported image: /usr comes from the rig, read-only):
 *       prometheus, alertmanager, node-exporter  the REAL binaries (this machine's Debian prometheus 2.42, alertmanager
 *                                                0.25; the rig's node exporter) with the program's prometheus.yml
 *                                                (scrape interval 2 s), rules, alertmanager.yml (with a fake Telegram
 *                                                API) and textfile directory;
 *       every other one                          tests/helpers/doctor-stub.py answering on the real service's ports
 *                                                (Traefik routes every Host, health endpoints, metrics, SSH banners);
 *       cloudflared                              idle (a rig has no tunnel to Cloudflare);
 *   - `fake-telegram`: the Telegram Bot API Alertmanager delivers to, recording each message.
 * Everything lives in the rig and dies with it; the cgroups are removed after the rig is stopped.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import type { ServerConfig } from "../../components/config";
import { doctorTargets } from "../../components/doctor";
import { opsParams } from "../../components/operations";
import { renderAlertmanagerConfig } from "../../components/render/alerts";
import { HOST_RULES_DIR } from "../../components/render/ops";
import { renderPrometheusConfig, SERVICES_NETWORK } from "../../components/render/services";
import { TEXTFILE_DIR } from "../../components/operations";
import { Scratch, sh } from "./host";
import { Rig, RigOptions } from "./rig";

/** Where the stubs' files live inside the rig (mounted read-only at /stubs in every stub container). */
const STUB_DIR = "/root/doctor-stubs";
/** The fake Telegram's record of what Alertmanager sent (one JSON line per request). */
export const TELEGRAM_RECORD = `${STUB_DIR}/rec/telegram.jsonl`;

/** Boot a rig whose Docker can run containers (see the file comment). */
export function startContainerRig(scratch: Scratch, opts: RigOptions = {}): Rig {
  // runc gives every container its own session keyring: allow the keyring calls nspawn's filter denies
  const rig = Rig.start(scratch, { ...opts, nspawnArgs: [...(opts.nspawnArgs ?? []), "--system-call-filter=@keyring"] });
  const parent = cgroupParent();
  scratch.onCleanup(() => {
    // once the rig (and every container in its PID namespace) is gone, our cgroups are empty
    rig.stop();
    for (const h of fs.readdirSync("/sys/fs/cgroup")) {
      const dir = path.join("/sys/fs/cgroup", h, parent);
      if (fs.existsSync(dir)) spawnSync("find", [dir, "-depth", "-type", "d", "-exec", "rmdir", "{}", ";"]);
    }
  });
  rig.run('for c in /sys/fs/cgroup/*/; do if mountpoint -q "$c"; then mount -o remount,rw,bind "$c"; fi; done');
  return rig;
}

/**
 * The cgroup parent of this test's containers: a systemd slice of the rig's systemd, since the baseline's daemon.json
 * pins Docker's systemd cgroup driver as on a real host (no dash in the name: systemd would nest it under ts.slice).
 */
export function cgroupParent(): string {
  return `tsdoctor${process.pid}.slice`;
}

type Answer = [number, string, string];
interface HttpSpec {
  port: number;
  routes?: Record<string, Answer>;
  prefix?: Record<string, Answer>;
  default?: Answer;
  record?: string;
}
interface StubSpec {
  http?: HttpSpec[];
  banner?: Array<{ port: number; text: string }>;
}

const metrics = (text: string): Answer => [200, "text/plain; version=0.0.4", text.endsWith("\n") ? text : text + "\n"];
const page = (text: string): Answer => [200, "text/html", `<html><body>${text}</body></html>\n`];

/** A container to run: command, ports to publish, the port its health check dials (0 = `true`, absent = none). */
interface Run {
  cmd: string[];
  ports?: string[];
  volumes?: string[];
  health?: number;
  hostNetwork?: boolean;
}

export interface Stubs {
  /** Every container started (configured ones and fake-telegram). */
  names: string[];
  /** docker … inside the rig; throws on failure. */
  docker(args: string[]): string;
  /** Wait until every container with a health check is healthy and (unless `targets` is false) Prometheus has every target up. */
  waitReady(timeoutMs?: number, targets?: boolean): void;
}


/**
 * Start the stand-ins for every container `config` implies (doctorTargets: the same list the doctor expects), tagged
 * with the expected images. `telegramBotToken` is the stack's placeholder token (Alertmanager's config needs one).
 */
export function startStubs(rig: Rig, config: ServerConfig, telegramBotToken: string): Stubs {
  const docker = (args: string[]): string => {
    const r = rig.exec(["docker", ...args]);
    if (r.status !== 0) throw new Error(`rig: docker ${args.join(" ").slice(0, 300)} failed (${r.status}): ${r.stderr}`);
    return r.stdout;
  };
  const lan = config.host.lanAddress;
  const dir = path.join(rig.root, STUB_DIR);
  fs.mkdirSync(path.join(dir, "rec"), { recursive: true });
  fs.copyFileSync(path.join(__dirname, "doctor-stub.py"), path.join(dir, "doctor-stub.py"));
  for (const [from, to] of [["/usr/bin/prometheus", "prometheus"], ["/usr/bin/prometheus-alertmanager", "alertmanager"]]) {
    if (!fs.existsSync(from)) throw new Error(`${from} is missing: apt-get install prometheus prometheus-alertmanager (tests/run.sh does)`);
    fs.copyFileSync(from, path.join(rig.root, "usr/local/bin", to));
    fs.chmodSync(path.join(rig.root, "usr/local/bin", to), 0o755);
  }
  // Debian's Alertmanager reads its default notification templates from here
  fs.cpSync("/usr/share/prometheus/alertmanager", path.join(rig.root, "usr/share/prometheus/alertmanager"), { recursive: true });
  fs.writeFileSync(path.join(dir, "prometheus.yml"), renderPrometheusConfig({ nodeExporter: "node-exporter:9100", alertmanager: "alertmanager:9093", scrapeInterval: "2s" }));
  const ops = opsParams(config, 1, { resticPassword: "-", rcloneConfig: "-", telegramBotToken });
  fs.writeFileSync(
    path.join(dir, "alertmanager.yml"),
    renderAlertmanagerConfig({ ...ops.alerts, mountpoint: ops.mountpoint, driveMountpoint: ops.drive.mountpoint, quotaWarnPercent: ops.quotaWarnPercent, dataSyncEnabled: !!ops.dataSync, telegramApiUrl: "http://fake-telegram:8081" }),
  );

  // the image: an empty root with the usual symlinks into /usr (which every container mounts from the rig)
  const root = path.join(dir, "image-root");
  for (const d of ["etc", "tmp", "proc", "sys", "dev", "usr", "run", "var", "root"]) fs.mkdirSync(path.join(root, d), { recursive: true });
  fs.chmodSync(path.join(root, "tmp"), 0o1777);
  for (const [l, t] of [["bin", "usr/bin"], ["lib", "usr/lib"], ["lib64", "usr/lib64"], ["sbin", "usr/sbin"]]) fs.symlinkSync(t, path.join(root, l));
  sh("tar", ["-C", root, "-cf", path.join(dir, "image.tar"), "."]);
  docker(["import", `${STUB_DIR}/image.tar`, "local/doctor-stub"]);
  docker(["network", "create", SERVICES_NETWORK]);

  const stub = (spec: StubSpec): string[] => ["python3", "/stubs/doctor-stub.py", JSON.stringify(spec)];
  const web = (port: number, routes: Record<string, Answer> = {}, what = "stub"): HttpSpec => ({ port, routes, default: page(what) });
  const runs: Record<string, Run> = {
    traefik: {
      cmd: stub({ http: [{ port: 80, default: page("stub traefik: every Host is routed here") }, web(8080, { "/metrics": metrics("traefik_config_reloads_total 1"), "/ping": [200, "text/plain", "OK"] })] }),
      ports: [`${lan}:80:80`],
      health: 80,
    },
    netdata: { cmd: stub({ http: [web(19999, { "/api/v1/allmetrics": metrics("netdata_info 1") })] }), health: 19999 },
    cadvisor: { cmd: stub({ http: [web(8080, { "/metrics": metrics("cadvisor_version_info 1"), "/healthz": [200, "text/plain", "ok"] })] }), health: 8080 },
    "node-exporter": {
      cmd: ["/usr/bin/prometheus-node-exporter", "--web.listen-address=:9100", `--collector.textfile.directory=${TEXTFILE_DIR}`],
      volumes: [`${TEXTFILE_DIR}:${TEXTFILE_DIR}:ro`],
      health: 9100,
    },
    alertmanager: {
      cmd: ["/usr/local/bin/alertmanager", "--config.file=/stubs/alertmanager.yml", "--storage.path=/tmp/alertmanager", "--web.listen-address=:9093", "--cluster.listen-address="],
      health: 9093,
    },
    prometheus: {
      cmd: ["/usr/local/bin/prometheus", "--config.file=/stubs/prometheus.yml", "--storage.tsdb.path=/tmp/prometheus", "--web.listen-address=:9090"],
      volumes: [`${HOST_RULES_DIR}:/etc/prometheus/rules:ro`],
      health: 9090,
    },
    grafana: { cmd: stub({ http: [web(3000, { "/api/health": [200, "application/json", '{"commit":"stub","database":"ok","version":"11.2.2"}'] })] }), health: 3000 },
    tensorboard: { cmd: stub({ http: [web(6006)] }), health: 6006 },
    filebrowser: { cmd: stub({ http: [web(80, { "/health": [200, "application/json", '{"status":"OK"}'] })] }), health: 80 },
    dozzle: { cmd: stub({ http: [web(8080)] }), health: 8080 },
    portainer: { cmd: stub({ http: [web(9000)] }) },
    cloudflared: { cmd: ["sleep", "infinity"], hostNetwork: true, health: 0 },
  };
  for (const u of config.users) {
    runs[`workspace-${u.name}`] = {
      cmd: stub({ http: [web(8080, {}, `stub code-server of ${u.name}`), web(8888, {}, `stub Jupyter of ${u.name}`)], banner: [{ port: 22, text: "SSH-2.0-OpenSSH_9.6p1 doctor-stub\r\n" }] }),
      ports: [`${lan}:${u.sshPort}:22`, `${lan}:${u.desktopPort}:22`],
      health: 22,
    };
  }
  const chat = Number(config.alerts.telegramChatId);
  const start = (name: string, image: string, r: Run) => {
    const health =
      r.health === undefined
        ? []
        : ["--health-cmd", r.health ? `python3 -c "import socket; socket.create_connection(('127.0.0.1', ${r.health}), 2)"` : "true", "--health-interval", "2s", "--health-retries", "3"];
    docker([
      "run", "-d", "--name", name, "--cgroup-parent", cgroupParent(),
      // as in production: the daemon remaps user namespaces (baseline daemon.json), the services opt out
      ...(name.startsWith("workspace-") ? [] : ["--userns", "host"]),
      ...(r.hostNetwork ? ["--network", "host"] : ["--network", SERVICES_NETWORK, "--network-alias", name]),
      "-v", "/usr:/usr:ro", "-v", `${STUB_DIR}:/stubs:ro`,
      ...(r.volumes ?? []).flatMap((v) => ["-v", v]),
      ...(r.ports ?? []).flatMap((p) => ["-p", p]),
      ...health,
      image, ...r.cmd,
    ]);
  };
  const names: string[] = [];
  for (const c of doctorTargets(config).containers) {
    const r = runs[c.name];
    if (!r) throw new Error(`no stand-in for the configured container ${c.name}: add one to tests/helpers/doctor-stubs.ts`);
    if ((r.health !== undefined) !== c.healthcheck) throw new Error(`the stand-in of ${c.name} must ${c.healthcheck ? "" : "not "}have a health check, as the program's container does`);
    docker(["tag", "local/doctor-stub", c.image]);
    start(c.name, c.image, r);
    names.push(c.name);
  }
  const telegramOk = JSON.stringify({ ok: true, result: { message_id: 1, date: 0, chat: { id: chat, type: "group" }, text: "", id: 1, is_bot: true, first_name: "stub" } });
  start("fake-telegram", "local/doctor-stub", {
    cmd: stub({ http: [{ port: 8081, prefix: { "/bot": [200, "application/json", telegramOk] }, record: "/rec/telegram.jsonl" }] }),
    volumes: [`${STUB_DIR}/rec:/rec`],
    health: 8081,
  });
  names.push("fake-telegram");

  const waitReady = (timeoutMs = 120_000, targets = true): void => {
    const deadline = Date.now() + timeoutMs;
    let last = "";
    while (Date.now() < deadline) {
      const states = docker(["inspect", "--format", "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}", ...names]).trim().split("\n");
      const notReady = states.filter((l) => !/ running (healthy|none)$/.test(l));
      const ip = docker(["inspect", "--format", `{{with index .NetworkSettings.Networks "${SERVICES_NETWORK}"}}{{.IPAddress}}{{end}}`, "prometheus"]).trim();
      const t = rig.exec(["python3", "-c", `import json,urllib.request\nd=json.load(urllib.request.urlopen("http://${ip}:9090/api/v1/targets", timeout=3))["data"]["activeTargets"]\nprint(" ".join(x["labels"]["job"] + "=" + x["health"] + ("" if x["health"] == "up" else " (" + x["lastError"] + ")") for x in d))`]);
      const logs = notReady.map((l) => l.split(" ")[0].slice(1)).map((n) => `${n}: ${rig.exec(["docker", "logs", "--tail", "5", n]).stderr.trim()}`);
      last = `${notReady.join("; ")} | targets: ${t.stdout.trim() || t.stderr.trim().split("\n").pop()}\n${logs.join("\n")}`;
      if (!notReady.length && (!targets || (t.status === 0 && t.stdout.trim() && !/=(down|unknown)/.test(t.stdout)))) return;
      spawnSync("sleep", ["1"]);
    }
    throw new Error(`the stand-ins did not become ready: ${last}`);
  };
  return { names, docker, waitReady };
}

/**
 * Everything on the rig the doctor could change, as sorted text lines (compare two calls; jest shows the diff):
 * every file and directory (path, type, size, mtime, mode, owner) under /etc, the train-server state, the textfile
 * metrics, the array (but the Docker data root, whose containers write, and the Drive's FUSE mount), the rig's Drive
 * (which holds the restic repository: a lock file would show); the content of every file under /etc, the state and
 * the metrics; the array's subvolumes and device counters; the containers and their states.
 */
export function stateDigest(rig: Rig, mountpoint: string): string[] {
  const roots = ["/etc", "/var/lib/train-server", TEXTFILE_DIR, "/srv/rig-drive", mountpoint].join(" ");
  const script = [
    `find ${roots} -path ${mountpoint}/docker-data -prune -o -path ${mountpoint}/shared -prune -o -printf 'file %p %y %s %T@ %m %U:%G\\n'`,
    `find /etc /var/lib/train-server ${TEXTFILE_DIR} -type f -exec sha256sum {} + | sed 's/^/sha /'`,
    `btrfs subvolume list -a ${mountpoint} | grep -v docker-data | sed 's/^/subvol /'`,
    `btrfs device stats ${mountpoint} | sed 's/^/stats /'`,
    `docker ps -a --format 'container {{.Names}} {{.Image}} {{.State}}'`,
  ].join("; ");
  const r = rig.exec(["bash", "-c", script]);
  if (r.status !== 0 && !r.stdout) throw new Error(`state digest failed: ${r.stderr}`);
  return r.stdout.split("\n").filter(Boolean).sort();
}
