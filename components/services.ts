/**
 * SharedServices: the Docker provider over SSH, the services network, and the shared web services as
 * containers with pinned images, persistent data under the array's docker-volumes, health checks, restart
 * policies and Traefik routes from the route table. Also the exporters Prometheus scrapes (cAdvisor, and
 * DCGM on GPU hosts) and the cloudflared connector of the tunnel.
 */
import * as docker from "@pulumi/docker";
import * as pulumi from "@pulumi/pulumi";
import * as random from "@pulumi/random";
import type { ServerConfig } from "./config";
import { TEXTFILE_DIR } from "./operations";
import { HOST_ALERTMANAGER_DIR, HOST_RULES_DIR } from "./render/ops";
import { Host, HostScript } from "./host";
import {
  renderGrafanaDashboardProvider,
  renderGrafanaDashboards,
  renderGrafanaDatasources,
  renderPrometheusConfig,
  SERVICES_NETWORK,
  labelList,
  TRAEFIK_ENTRYPOINTS,
  traefikCommand,
  traefikLabels,
  tunnelSources,
} from "./render/services";
import type { Route } from "./routes";
import { GUACAMOLE_NETWORK } from "./render/guacamole";

/** Pinned images (update deliberately: a tag change replaces that container and nothing else). */
export const SERVICE_IMAGES = {
  traefik: "traefik:v3.1.6",
  netdata: "netdata/netdata:v1.47.5",
  prometheus: "prom/prometheus:v2.54.1",
  grafana: "grafana/grafana-oss:11.2.2",
  tensorboard: "tensorflow/tensorflow:2.17.0",
  filebrowser: "filebrowser/filebrowser:v2.31.2",
  dozzle: "amir20/dozzle:v8.5.4",
  portainer: "portainer/portainer-ce:2.21.4",
  cadvisor: "gcr.io/cadvisor/cadvisor:v0.49.1",
  nodeExporter: "prom/node-exporter:v1.8.2",
  alertmanager: "prom/alertmanager:v0.27.0",
  dcgmExporter: "nvcr.io/nvidia/k8s/dcgm-exporter:3.3.8-3.6.0-ubuntu22.04",
  cloudflared: "cloudflare/cloudflared:2024.10.1",
  // the browser desktop (components/guacamole.ts): guacd and the web app of one release, its PostgreSQL
  guacd: "guacamole/guacd:1.6.0",
  guacamole: "guacamole/guacamole:1.6.0",
  guacamoleDb: "postgres:16.4",
} as const;

/**
 * Stop grace per container, in seconds: what `docker stop` (and so every replace, image roll and destroy through
 * the Docker provider, whose `destroyGraceSeconds` defaults to 0 = SIGKILL) waits between SIGTERM and SIGKILL.
 * Sized to what each one must flush: Prometheus its TSDB head/WAL, Grafana its SQLite database, cloudflared its
 * connections (its own --grace-period is 30 s), Traefik its in-flight requests.
 */
export const SERVICE_STOP_GRACE_S: Record<string, number> = {
  traefik: 30,
  netdata: 30,
  cadvisor: 10,
  "node-exporter": 10,
  alertmanager: 30,
  "dcgm-exporter": 10,
  prometheus: 120,
  grafana: 60,
  tensorboard: 15,
  filebrowser: 30,
  dozzle: 10,
  portainer: 30,
  cloudflared: 35,
  // guacd ends the desktop sessions it proxies; PostgreSQL needs a clean shutdown (a checkpoint)
  guacd: 10,
  guacamole: 30,
  "guacamole-db": 60,
};

/** How long `pulumi up` waits for a new container's health check to pass before failing the update. */
export const SERVICE_WAIT_TIMEOUT_S = 300;

/**
 * Lifecycle inputs of a container: the stop grace both ways the provider stops it (`stopTimeout` for a plain
 * `docker stop`/restart, `destroyGraceSeconds` for replace and destroy), and `wait` for a healthy state after
 * create, so a container that never becomes healthy fails the `up` with its reason instead of passing silently.
 * `wait` needs a health check (the provider refuses it otherwise).
 */
export function containerLifecycle(graceS: number, healthcheck: boolean, waitTimeoutS = SERVICE_WAIT_TIMEOUT_S): Pick<docker.ContainerArgs, "stopTimeout" | "destroyGraceSeconds" | "wait" | "waitTimeout"> {
  if (!Number.isInteger(graceS) || graceS < 1) throw new Error(`stop grace ${graceS}: a container needs at least 1 s between SIGTERM and SIGKILL`);
  return { stopTimeout: graceS, destroyGraceSeconds: graceS, ...(healthcheck ? { wait: true, waitTimeout: waitTimeoutS } : { wait: false }) };
}

/** The eight shared web services of the mission (each has a route). */
export const WEB_SERVICES = ["traefik", "netdata", "prometheus", "grafana", "tensorboard", "filebrowser", "dozzle", "portainer"] as const;

/** Persistent data of a service: host dir under docker-volumes, and the uid:gid that owns it. */
export const SERVICE_DATA: Record<string, { owner: string }> = {
  netdata: { owner: "201:201" },
  prometheus: { owner: "65534:65534" },
  alertmanager: { owner: "65534:65534" },
  grafana: { owner: "472:0" },
  filebrowser: { owner: "0:0" },
  portainer: { owner: "0:0" },
  // PostgreSQL of Guacamole (postgres in the official image is 999:999; initdb wants 0700)
  "guacamole-db": { owner: "999:999" },
};

export interface SharedServicesArgs {
  config: ServerConfig;
  host: Host;
  routes: Route[];
  /** The cloudflared connector's token (a secret); without it no connector is run. */
  tunnelToken?: pulumi.Output<string>;
  /** Deleted after the cloudflared container and before the tunnel (see Edge.tunnelCleanup). */
  tunnelCleanup?: pulumi.Resource;
  /** Steps that must finish first (Docker installed, array mounted). */
  after?: pulumi.Resource[];
}

/**
 * The Docker provider's ssh options. With `host.hostKey` the pinned key is the ONLY key ssh trusts for this
 * connection: the user's and the system's known_hosts are not read, and `KnownHostsCommand` (OpenSSH >= 8.5)
 * prints the one known_hosts line (`* <type> <key>`; no file, so no path that differs between checkouts), with
 * HostKeyAlgorithms pinned to its type so ssh never negotiates another of the server's keys. A rig without a
 * hostKey falls back to the user's known_hosts, still strictly.
 */
export function dockerSshOpts(config: ServerConfig): string[] {
  const base = ["-o", "BatchMode=yes", "-o", "ServerAliveInterval=30", "-o", "StrictHostKeyChecking=yes"];
  const key = config.host.hostKey;
  if (key === undefined) return base;
  const type = key.split(" ")[0];
  return [
    ...base,
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "GlobalKnownHostsFile=/dev/null",
    "-o", `KnownHostsCommand=/bin/echo * ${key}`,
    "-o", `HostKeyAlgorithms=${type}`,
  ];
}

/** One container SharedServices runs: its name, pinned image, and whether it has a health check. */
export interface ServiceContainer {
  name: string;
  image: string;
  healthcheck: boolean;
}

/**
 * The containers SharedServices makes for a config, in the order it makes them (a unit test holds this list to
 * the program's registered containers): what `npm run doctor` expects to find running on the server.
 */
export function serviceContainers(config: ServerConfig, opts: { tunnel: boolean } = { tunnel: true }): ServiceContainer[] {
  const I = SERVICE_IMAGES;
  const list: ServiceContainer[] = [
    { name: "traefik", image: I.traefik, healthcheck: true },
    { name: "netdata", image: I.netdata, healthcheck: true },
    { name: "cadvisor", image: I.cadvisor, healthcheck: true },
    { name: "node-exporter", image: I.nodeExporter, healthcheck: true },
    { name: "alertmanager", image: I.alertmanager, healthcheck: true },
    ...(config.host.gpu.count > 0 ? [{ name: "dcgm-exporter", image: I.dcgmExporter, healthcheck: true }] : []),
    { name: "prometheus", image: I.prometheus, healthcheck: true },
    { name: "grafana", image: I.grafana, healthcheck: true },
    { name: "tensorboard", image: I.tensorboard, healthcheck: true },
    { name: "filebrowser", image: I.filebrowser, healthcheck: true },
    { name: "dozzle", image: I.dozzle, healthcheck: true },
    { name: "portainer", image: I.portainer, healthcheck: false },
  ];
  if (opts.tunnel) list.push({ name: "cloudflared", image: I.cloudflared, healthcheck: true });
  // the browser desktop's (components/guacamole.ts, made after the workspaces)
  if (config.workspace.guacamole) list.push(
    { name: "guacamole-db", image: I.guacamoleDb, healthcheck: true },
    { name: "guacd", image: I.guacd, healthcheck: false },
    { name: "guacamole", image: I.guacamole, healthcheck: false },
  );
  return list;
}

/** `ssh://user@host:port` for the Docker provider (the system ssh client and agent supply the key). */
export function dockerHost(config: ServerConfig): string {
  return `ssh://${config.host.sshUser}@${config.host.address}:${config.host.sshPort}`;
}

export class SharedServices extends pulumi.ComponentResource {
  readonly provider: docker.Provider;
  readonly network: docker.Network;
  /** Guacamole's network: its web app and database, and Traefik; no workspace joins it (components/guacamole.ts). */
  readonly guacamoleNetwork?: docker.Network;
  /** The services' data directories are made (a service made elsewhere orders its container after this). */
  readonly dataDirs: pulumi.Resource;
  readonly containers: Record<string, docker.Container> = {};
  readonly grafanaPassword: pulumi.Output<string>;
  /** Where tunnel requests reach Traefik from (the services network's gateway, /32): for every Traefik label set. */
  readonly tunnelSources: pulumi.Output<string[]>;

  constructor(name: string, args: SharedServicesArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:services:SharedServices", name, {}, opts);
    const { config, routes } = args;
    const volumes = `${config.storage.mountpoint}/docker-volumes`;
    const dataDir = (svc: string) => `${volumes}/${svc}`;

    const dirs = new HostScript(
      `${name}-data-dirs`,
      {
        host: args.host,
        script: "service-dirs",
        env: {
          TS_DIRS: Object.entries(SERVICE_DATA)
            .filter(([svc]) => svc !== "guacamole-db" || config.workspace.guacamole)
            .map(([svc, d]) => `${dataDir(svc)} ${d.owner} 0750`)
            .join("\n"),
        },
        after: args.after ?? [],
      },
      { parent: this },
    );
    this.dataDirs = dirs.apply;

    this.provider = new docker.Provider(
      `${name}-docker`,
      { host: dockerHost(config), sshOpts: dockerSshOpts(config) },
      { parent: this, dependsOn: args.after ?? [] },
    );
    const child = { parent: this, provider: this.provider };
    this.network = new docker.Network(`${name}-network`, { name: SERVICES_NETWORK, driver: "bridge", attachable: true }, { ...child, dependsOn: args.after ?? [] });

    if (config.workspace.guacamole) {
      this.guacamoleNetwork = new docker.Network(
        `${name}-guacamole-network`,
        { name: GUACAMOLE_NETWORK, driver: "bridge", internal: true },
        { ...child, dependsOn: args.after ?? [] },
      );
    }

    // docker-proxy forwards the tunnel entrypoint's 127.0.0.1 port from the network's gateway (read back from Docker)
    this.tunnelSources = this.network.ipamConfigs.apply((c) => tunnelSources(c));
    const routesOf = (container: string) => routes.filter((r) => r.container === container);
    const base = (svc: string): Partial<docker.ContainerArgs> => ({
      name: svc,
      restart: "unless-stopped",
      // the daemon remaps user namespaces for the workspaces (baseline daemon.json "userns-remap"); the services
      // keep the host's ids (their data dirs, the Docker socket, host pid/network modes): README, "Workspace isolation"
      usernsMode: "host",
      networksAdvanced: [{ name: this.network.name, aliases: [svc] }],
      labels: this.tunnelSources.apply((ts) => labelList(traefikLabels(routesOf(svc), { adminSources: config.host.adminSources, tunnelSources: ts }))),
    });
    const make = (svc: string, a: docker.ContainerArgs, extraDeps: pulumi.Resource[] = []) => {
      const grace = SERVICE_STOP_GRACE_S[svc];
      if (grace === undefined) throw new Error(`service ${svc} has no stop grace in SERVICE_STOP_GRACE_S`);
      this.containers[svc] = new docker.Container(
        `${name}-${svc}`,
        { ...base(svc), ...containerLifecycle(grace, a.healthcheck !== undefined), ...a },
        { ...child, deleteBeforeReplace: true, dependsOn: [dirs.apply, ...extraDeps] },
      );
      return this.containers[svc];
    };
    const sock = { hostPath: "/var/run/docker.sock", containerPath: "/var/run/docker.sock", readOnly: true };

    make("traefik", {
      image: SERVICE_IMAGES.traefik,
      command: traefikCommand(),
      // the office reaches the LAN entrypoint on the LAN address (local-DNS bypass); cloudflared (host network)
      // reaches the tunnel entrypoint on the host's loopback only
      ports: [
        { internal: TRAEFIK_ENTRYPOINTS.lan.port, external: TRAEFIK_ENTRYPOINTS.lan.port, ip: config.host.lanAddress },
        { internal: TRAEFIK_ENTRYPOINTS.tunnel.port, external: TRAEFIK_ENTRYPOINTS.tunnel.port, ip: TRAEFIK_ENTRYPOINTS.tunnel.hostIp },
      ],
      volumes: [sock],
      // and Guacamole's network, to reach its web app (render/guacamole.ts: no workspace is on it)
      ...(this.guacamoleNetwork
        ? { networksAdvanced: [{ name: this.network.name, aliases: ["traefik"] }, { name: this.guacamoleNetwork.name, aliases: ["traefik"] }] }
        : {}),
      healthcheck: { tests: ["CMD", "traefik", "healthcheck", "--ping"], interval: "30s", timeout: "5s", retries: 3 },
    });

    make("netdata", {
      image: SERVICE_IMAGES.netdata,
      hostname: "train-server",
      pidMode: "host",
      capabilities: { adds: ["SYS_PTRACE", "SYS_ADMIN", "SYS_RAWIO"] },
      securityOpts: ["apparmor=unconfined"],
      volumes: [
        { hostPath: `${dataDir("netdata")}/config`, containerPath: "/etc/netdata" },
        { hostPath: `${dataDir("netdata")}/lib`, containerPath: "/var/lib/netdata" },
        { hostPath: `${dataDir("netdata")}/cache`, containerPath: "/var/cache/netdata" },
        { hostPath: "/etc/passwd", containerPath: "/host/etc/passwd", readOnly: true },
        { hostPath: "/etc/group", containerPath: "/host/etc/group", readOnly: true },
        { hostPath: "/etc/os-release", containerPath: "/host/etc/os-release", readOnly: true },
        { hostPath: "/proc", containerPath: "/host/proc", readOnly: true },
        { hostPath: "/sys", containerPath: "/host/sys", readOnly: true },
        { hostPath: "/var/log/smartd", containerPath: "/var/log/smartd", readOnly: true },
        sock,
      ],
      healthcheck: { tests: ["CMD-SHELL", "/usr/sbin/health.sh"], interval: "60s", timeout: "10s", retries: 3 },
    });

    // not privileged (README, "Workspace isolation"): every container's cgroup stats are readable files under the
    // read-only /sys and /rootfs binds (root in the container reads them with Docker's default capabilities);
    // /dev/kmsg, read-only, is where cAdvisor watches OOM kills (container_oom_events_total), and reading it takes
    // CAP_SYSLOG under Ubuntu's kernel.dmesg_restrict=1; /dev/disk names the block devices of the disk metrics.
    make("cadvisor", {
      image: SERVICE_IMAGES.cadvisor,
      capabilities: { adds: ["SYSLOG"] },
      securityOpts: ["no-new-privileges:true"],
      devices: [{ hostPath: "/dev/kmsg", permissions: "r" }],
      command: ["--docker_only=true", "--housekeeping_interval=30s"],
      volumes: [
        { hostPath: "/", containerPath: "/rootfs", readOnly: true },
        { hostPath: "/var/run", containerPath: "/var/run", readOnly: true },
        { hostPath: "/sys", containerPath: "/sys", readOnly: true },
        { hostPath: `${config.storage.mountpoint}/docker-data`, containerPath: "/var/lib/docker", readOnly: true },
        { hostPath: "/dev/disk", containerPath: "/dev/disk", readOnly: true },
      ],
      healthcheck: { tests: ["CMD", "wget", "-q", "--spider", "http://localhost:8080/healthz"], interval: "30s", timeout: "5s", retries: 3 },
    });

    // host metrics, with the textfile collector reading what the ops jobs and Debian's collectors write
    make("node-exporter", {
      image: SERVICE_IMAGES.nodeExporter,
      pidMode: "host",
      command: ["--path.rootfs=/host", `--collector.textfile.directory=${TEXTFILE_DIR}`, "--collector.filesystem.mount-points-exclude=^/(dev|proc|sys|run|var/lib/docker/.+)($|/)"],
      volumes: [
        { hostPath: "/", containerPath: "/host", readOnly: true },
        { hostPath: TEXTFILE_DIR, containerPath: TEXTFILE_DIR, readOnly: true },
      ],
      healthcheck: { tests: ["CMD", "wget", "-q", "--spider", "http://localhost:9100/metrics"], interval: "60s", timeout: "10s", retries: 3 },
    });

    // alerts to Telegram; alertmanager.yml (with the bot token, 0640 root:nobody) is installed by Operations
    make("alertmanager", {
      image: SERVICE_IMAGES.alertmanager,
      command: ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"],
      volumes: [
        { hostPath: HOST_ALERTMANAGER_DIR, containerPath: "/etc/alertmanager", readOnly: true },
        { hostPath: dataDir("alertmanager"), containerPath: "/alertmanager" },
      ],
      healthcheck: { tests: ["CMD", "wget", "-q", "--spider", "http://localhost:9093/-/healthy"], interval: "30s", timeout: "5s", retries: 3 },
    });

    const gpu = config.host.gpu.count > 0;
    if (gpu) {
      make("dcgm-exporter", {
        image: SERVICE_IMAGES.dcgmExporter,
        capabilities: { adds: ["SYS_ADMIN"] },
        deviceRequests: [{ driver: "nvidia", count: -1, capabilities: ["gpu"] }],
        healthcheck: { tests: ["CMD-SHELL", "curl -sf http://localhost:9400/metrics >/dev/null"], interval: "60s", timeout: "10s", retries: 3 },
      });
    }

    make("prometheus", {
      image: SERVICE_IMAGES.prometheus,
      command: ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--storage.tsdb.retention.time=90d", "--web.enable-lifecycle"],
      volumes: [
        { hostPath: dataDir("prometheus"), containerPath: "/prometheus" },
        { hostPath: HOST_RULES_DIR, containerPath: "/etc/prometheus/rules", readOnly: true },
      ],
      uploads: [
        {
          file: "/etc/prometheus/prometheus.yml",
          content: renderPrometheusConfig({
            nodeExporter: "node-exporter:9100",
            alertmanager: "alertmanager:9093",
            ...(gpu ? { gpuExporter: "dcgm-exporter:9400" } : {}),
          }),
        },
      ],
      healthcheck: { tests: ["CMD", "wget", "-q", "--spider", "http://localhost:9090/-/healthy"], interval: "30s", timeout: "5s", retries: 3 },
    });

    const grafanaPassword = new random.RandomPassword(`${name}-grafana-admin`, { length: 32, special: false }, { parent: this });
    this.grafanaPassword = grafanaPassword.result;
    const dashboards = renderGrafanaDashboards({ mountpoint: config.storage.mountpoint, gpu });
    make("grafana", {
      image: SERVICE_IMAGES.grafana,
      envs: ["GF_SECURITY_ADMIN_PASSWORD__FILE=/run/secrets/grafana-admin", "GF_USERS_ALLOW_SIGN_UP=false", "GF_ANALYTICS_REPORTING_ENABLED=false"],
      volumes: [{ hostPath: dataDir("grafana"), containerPath: "/var/lib/grafana" }],
      uploads: [
        { file: "/run/secrets/grafana-admin", content: grafanaPassword.result, permissions: "0400", owner: "472" },
        { file: "/etc/grafana/provisioning/datasources/prometheus.yml", content: renderGrafanaDatasources() },
        { file: "/etc/grafana/provisioning/dashboards/train-server.yml", content: renderGrafanaDashboardProvider() },
        ...Object.entries(dashboards).map(([f, content]) => ({ file: `/var/lib/grafana/dashboards/${f}`, content })),
      ],
      healthcheck: { tests: ["CMD", "wget", "-q", "--spider", "http://localhost:3000/api/health"], interval: "30s", timeout: "5s", retries: 3 },
    });

    const shared = `${config.storage.mountpoint}/shared`;
    make("tensorboard", {
      image: SERVICE_IMAGES.tensorboard,
      command: ["tensorboard", "--logdir=/shared/tensorboard", "--bind_all", "--port=6006", "--reload_multifile=true"],
      mounts: [{ type: "bind", source: shared, target: "/shared", readOnly: true, bindOptions: { propagation: "rslave" } }],
      healthcheck: { tests: ["CMD-SHELL", "python3 -c \"import urllib.request;urllib.request.urlopen('http://localhost:6006')\""], interval: "60s", timeout: "10s", retries: 3 },
    });

    make("filebrowser", {
      image: SERVICE_IMAGES.filebrowser,
      command: ["--root=/srv", "--database=/data/filebrowser.db", "--address=0.0.0.0", "--port=80"],
      mounts: [{ type: "bind", source: shared, target: "/srv", bindOptions: { propagation: "rslave" } }],
      volumes: [{ hostPath: dataDir("filebrowser"), containerPath: "/data" }],
      healthcheck: { tests: ["CMD", "wget", "-q", "--spider", "http://localhost:80/health"], interval: "30s", timeout: "5s", retries: 3 },
    });

    make("dozzle", {
      image: SERVICE_IMAGES.dozzle,
      volumes: [sock],
      healthcheck: { tests: ["CMD", "/dozzle", "healthcheck"], interval: "30s", timeout: "5s", retries: 3 },
    });

    make("portainer", {
      image: SERVICE_IMAGES.portainer,
      command: ["-H", "unix:///var/run/docker.sock"],
      volumes: [{ hostPath: "/var/run/docker.sock", containerPath: "/var/run/docker.sock" }, { hostPath: dataDir("portainer"), containerPath: "/data" }],
    });

    if (args.tunnelToken) {
      // host network: the tunnel reaches Traefik's tunnel entrypoint on 127.0.0.1:81 and (for an SSH route) sshd on
      // localhost, which UFW allows without opening anything to the services network. Not in Traefik's network
      // namespace: when Traefik restarts, a container sharing its namespace keeps the old one with only `lo` and never
      // reconnects (checked on Docker 20.10; cloudflare/cloudflared#826), which would leave the tunnel down.
      make("cloudflared", {
        image: SERVICE_IMAGES.cloudflared,
        networkMode: "host",
        networksAdvanced: [],
        labels: [],
        // on SIGTERM cloudflared drains for --grace-period, then closes its connections: inside the stop grace (35 s)
        command: ["tunnel", "--no-autoupdate", "--grace-period", "30s", "--metrics", "127.0.0.1:2000", "run"],
        envs: [pulumi.interpolate`TUNNEL_TOKEN=${args.tunnelToken}`],
        healthcheck: { tests: ["CMD", "cloudflared", "tunnel", "--metrics", "localhost:2000", "ready"], interval: "30s", timeout: "5s", retries: 3 },
      }, args.tunnelCleanup ? [args.tunnelCleanup] : []);
    }

    this.registerOutputs({ network: this.network.name, containers: Object.keys(this.containers) });
  }
}
