/**
 * Pure renderers for the shared services' configuration: Traefik labels from the route table,
 * prometheus.yml, and Grafana provisioning (datasource, dashboard provider, dashboards).
 */
import { stringify } from "yaml";
import type { Route } from "../routes";

/** The Docker network every service and workspace joins (Traefik routes over it). */
export const SERVICES_NETWORK = "train-server";

/**
 * Traefik's two HTTP entrypoints.
 *   - `tunnel` (:81 in the container, published on the host's 127.0.0.1:81 only) serves every route; cloudflared
 *     (host network) sends every tunnel request there, so each one has passed Cloudflare Access. Its routers
 *     carry an ipAllowList of the services network's gateway: a published port bound to 127.0.0.1 is reached
 *     through docker-proxy, which connects from that gateway, while a workspace on the services network (or a LAN
 *     machine routing to the container's address, which Docker before 28.0 forwards: moby/moby#45610) connects from its
 *     own address: 403.
 *   - `lan` (:80, published on host.lanAddress:80) is the office's local-DNS bypass, without Access: team and user
 *     routes, and admin routes only for host.adminSources (see `lanAccess`). Docker's DNAT keeps the LAN client's
 *     address, which is what ipAllowList matches (the TCP peer, never X-Forwarded-For).
 */
export const TRAEFIK_ENTRYPOINTS = {
  tunnel: { name: "tunnel", address: ":81", port: 81, hostIp: "127.0.0.1" },
  lan: { name: "lan", address: ":80", port: 80 },
} as const;

/** Where cloudflared (host network) sends every tunnel request: the tunnel entrypoint's published port. */
export const TRAEFIK_TUNNEL_URL = `http://${TRAEFIK_ENTRYPOINTS.tunnel.hostIp}:${TRAEFIK_ENTRYPOINTS.tunnel.port}`;

/** Traefik's static configuration as command-line flags (the traefik container's command). */
export function traefikCommand(): string[] {
  const { tunnel, lan } = TRAEFIK_ENTRYPOINTS;
  return [
    "--providers.docker=true",
    "--providers.docker.exposedbydefault=false",
    `--providers.docker.network=${SERVICES_NETWORK}`,
    `--entrypoints.${tunnel.name}.address=${tunnel.address}`,
    `--entrypoints.${lan.name}.address=${lan.address}`,
    // dashboard, API, metrics and ping on Traefik's own entrypoint (:8080, unpublished; routed as an admin route)
    "--api.dashboard=true",
    "--api.insecure=true",
    "--metrics.prometheus=true",
    "--ping=true",
    "--accesslog=true",
  ];
}

const IPV4 = /^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$/;
const IPV4_CIDR = /^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\/(3[0-2]|[12]?\d)$/;

/**
 * The sources the tunnel entrypoint admits: the IPv4 gateway(s) of the services network as /32, from the
 * network's IPAM configuration as Docker reports it (`docker network inspect`, or the Network resource's
 * `ipamConfigs`). Throws if there is none: the tunnel routers would otherwise admit nobody, or everybody.
 */
export function tunnelSources(ipamConfigs: ReadonlyArray<{ gateway?: string; Gateway?: string; subnet?: string; Subnet?: string }> | undefined): string[] {
  const gateways = (ipamConfigs ?? []).map((c) => c.gateway ?? c.Gateway ?? "").filter((g) => IPV4.test(g));
  if (gateways.length === 0) throw new Error(`tunnelSources: the services network reports no IPv4 gateway (${JSON.stringify(ipamConfigs)})`);
  return [...new Set(gateways)].map((g) => `${g}/32`);
}

/** Who may use Traefik's entrypoints, as far as labels decide it. */
export interface TraefikPolicy {
  /** host.adminSources: IPv4 CIDRs that may open admin routes on the LAN; [] = admin routes are tunnel-only. */
  adminSources: readonly string[];
  /** Where tunnel requests come from (`tunnelSources`): every tunnel router admits exactly these. */
  tunnelSources: readonly string[];
}

/**
 * Who may open a route on the LAN entrypoint: `everyone` on the LAN (team and user routes), `adminSources`
 * only (admin routes, when host.adminSources is set; anyone else gets 403), or `nobody` (admin routes by
 * default: they exist only on the tunnel entrypoint, so the LAN gets 404).
 */
export function lanAccess(route: Pick<Route, "audience">, policy: Pick<TraefikPolicy, "adminSources">): "everyone" | "adminSources" | "nobody" {
  if (route.audience.kind !== "admins") return "everyone";
  return policy.adminSources.length > 0 ? "adminSources" : "nobody";
}

/** An entry path: absolute, of URL path characters, ending in '/'. */
const ENTRY_PATH = /^\/(?:[A-Za-z0-9._~-]+\/)*$/;

/**
 * Traefik docker-provider labels routing `routes` (all served by one container) to that container. Per route:
 *   - router `<id>` on the tunnel entrypoint, behind the ipAllowList middleware `<id>-tunnel-sources`;
 *   - unless `lanAccess` says nobody, router `<id>-lan` on the LAN entrypoint; for an admin route it carries the
 *     ipAllowList middleware `<id>-admin-sources` with exactly host.adminSources;
 *   - a route with an `entryPath` has the redirectRegex middleware `<id>-entry` on both routers, after the source
 *     check: `/` answers with a relative redirect to the entry path, every other path passes untouched.
 *   - a route with `identityHeaders` has the headers middleware `<id>-strip-identity` first on its LAN router: the
 *     headers are removed (Traefik deletes a custom request header set to ""), so only Access sets them.
 * Middlewares are per route (no two containers define the same middleware name).
 */
export function traefikLabels(routes: Route[], policy: TraefikPolicy): Record<string, string> {
  if (routes.length === 0) return {};
  const containers = new Set(routes.map((r) => r.container));
  if (containers.size !== 1) throw new Error(`traefikLabels: routes of several containers (${[...containers].join(", ")})`);
  for (const [what, list] of [["adminSources", policy.adminSources], ["tunnelSources", policy.tunnelSources]] as const) {
    const bad = list.filter((s) => !IPV4_CIDR.test(s));
    if (bad.length) throw new Error(`traefikLabels: ${what} must be IPv4 CIDRs, got ${bad.map((s) => JSON.stringify(s)).join(", ")}`);
  }
  if (policy.tunnelSources.length === 0) throw new Error("traefikLabels: tunnelSources is empty (the tunnel routers would admit nobody)");
  const labels: Record<string, string> = {
    "traefik.enable": "true",
    "traefik.docker.network": SERVICES_NETWORK,
  };
  const { tunnel, lan } = TRAEFIK_ENTRYPOINTS;
  for (const r of routes) {
    const rule = `Host(\`${r.hostname}\`)`;
    labels[`traefik.http.routers.${r.id}.rule`] = rule;
    labels[`traefik.http.routers.${r.id}.entrypoints`] = tunnel.name;
    labels[`traefik.http.routers.${r.id}.service`] = r.id;
    // the entry redirect comes after the source check: a refused source never learns where the route leads
    const entry = r.entryPath === undefined ? [] : [`${r.id}-entry`];
    if (r.entryPath !== undefined) {
      if (!ENTRY_PATH.test(r.entryPath)) throw new Error(`traefikLabels: route ${r.id}: entryPath "${r.entryPath}" must be an absolute path like /absproxy/6006/`);
      // only the bare hostname is redirected; the Location is relative, so the browser keeps https and the host
      labels[`traefik.http.middlewares.${r.id}-entry.redirectregex.regex`] = "^[a-z]+://[^/]+/?$";
      labels[`traefik.http.middlewares.${r.id}-entry.redirectregex.replacement`] = r.entryPath;
    }
    labels[`traefik.http.routers.${r.id}.middlewares`] = [`${r.id}-tunnel-sources`, ...entry].join(",");
    labels[`traefik.http.middlewares.${r.id}-tunnel-sources.ipallowlist.sourcerange`] = policy.tunnelSources.join(",");
    const access = lanAccess(r, policy);
    if (access !== "nobody") {
      labels[`traefik.http.routers.${r.id}-lan.rule`] = rule;
      labels[`traefik.http.routers.${r.id}-lan.entrypoints`] = lan.name;
      labels[`traefik.http.routers.${r.id}-lan.service`] = r.id;
    }
    const strip = r.identityHeaders?.length && access !== "nobody" ? [`${r.id}-strip-identity`] : [];
    for (const h of strip.length ? r.identityHeaders ?? [] : []) {
      if (!/^[A-Za-z0-9-]+$/.test(h)) throw new Error(`traefikLabels: route ${r.id}: identity header "${h}" is not a header name`);
      labels[`traefik.http.middlewares.${r.id}-strip-identity.headers.customrequestheaders.${h}`] = "";
    }
    const lanMiddlewares = [...strip, ...(access === "adminSources" ? [`${r.id}-admin-sources`] : []), ...(access !== "nobody" ? entry : [])];
    if (lanMiddlewares.length) labels[`traefik.http.routers.${r.id}-lan.middlewares`] = lanMiddlewares.join(",");
    if (access === "adminSources") {
      labels[`traefik.http.middlewares.${r.id}-admin-sources.ipallowlist.sourcerange`] = policy.adminSources.join(",");
    }
    labels[`traefik.http.services.${r.id}.loadbalancer.server.port`] = String(r.port);
  }
  return labels;
}

/** Labels as the Docker provider's `labels` input takes them. */
export function labelList(labels: Record<string, string>): Array<{ label: string; value: string }> {
  return Object.entries(labels).map(([label, value]) => ({ label, value }));
}

export interface PrometheusParams {
  /** Where the host's node-exporter listens, as seen from the prometheus container. */
  nodeExporter: string;
  /** Scrape the GPU exporter (only with GPUs). */
  gpuExporter?: string;
  /** Alertmanager address (container:port). */
  alertmanager: string;
  scrapeInterval?: string;
  /** Directory of the rule files as the prometheus container sees it (tests point it at a scratch dir). */
  rulesDir?: string;
}

/** prometheus.yml: node-exporter, cAdvisor, GPU exporter, Traefik, Netdata, Prometheus itself; rules and Alertmanager. */
export function renderPrometheusConfig(p: PrometheusParams): string {
  const job = (name: string, target: string, extra: Record<string, unknown> = {}) => ({
    job_name: name,
    static_configs: [{ targets: [target] }],
    ...extra,
  });
  const scrape = [
    job("prometheus", "localhost:9090"),
    job("node", p.nodeExporter),
    job("cadvisor", "cadvisor:8080"),
    job("traefik", "traefik:8080"),
    job("netdata", "netdata:19999", { metrics_path: "/api/v1/allmetrics", params: { format: ["prometheus"] }, honor_labels: true }),
    ...(p.gpuExporter ? [job("gpu", p.gpuExporter)] : []),
  ];
  return stringify({
    global: { scrape_interval: p.scrapeInterval ?? "30s", evaluation_interval: "30s" },
    rule_files: [`${p.rulesDir ?? "/etc/prometheus/rules"}/*.yml`],
    alerting: { alertmanagers: [{ static_configs: [{ targets: [p.alertmanager] }] }] },
    scrape_configs: scrape,
  });
}

/** Grafana datasource provisioning: the Prometheus container. */
export function renderGrafanaDatasources(): string {
  return stringify({
    apiVersion: 1,
    datasources: [{ name: "Prometheus", uid: "prometheus", type: "prometheus", access: "proxy", url: "http://prometheus:9090", isDefault: true, editable: false }],
  });
}

/** Grafana dashboard provider: files under /var/lib/grafana/dashboards. */
export function renderGrafanaDashboardProvider(): string {
  return stringify({
    apiVersion: 1,
    providers: [{ name: "train-server", orgId: 1, folder: "train-server", type: "file", disableDeletion: true, options: { path: "/var/lib/grafana/dashboards" } }],
  });
}

interface Panel {
  title: string;
  expr: string;
  unit: string;
  legend: string;
}

function dashboard(uid: string, title: string, panels: Panel[]): string {
  return JSON.stringify(
    {
      uid,
      title,
      schemaVersion: 39,
      time: { from: "now-6h", to: "now" },
      refresh: "30s",
      panels: panels.map((p, i) => ({
        id: i + 1,
        type: "timeseries",
        title: p.title,
        datasource: { type: "prometheus", uid: "prometheus" },
        gridPos: { h: 8, w: 12, x: (i % 2) * 12, y: Math.floor(i / 2) * 8 },
        fieldConfig: { defaults: { unit: p.unit }, overrides: [] },
        targets: [{ refId: "A", expr: p.expr, legendFormat: p.legend }],
      })),
    },
    null,
    2,
  );
}

/**
 * The provisioned dashboards (file name → JSON): host, containers (per user), and on GPU hosts the GPUs and "who uses
 * which GPU" (the GPU ledger's series and recording rules, components/render/gpu.ts).
 */
export function renderGrafanaDashboards(p: { mountpoint: string; gpu: boolean }): Record<string, string> {
  const mp = p.mountpoint;
  const boards: Record<string, string> = {
    "node.json": dashboard("ts-node", "Host", [
      { title: "CPU busy", expr: '1 - avg(rate(node_cpu_seconds_total{mode="idle"}[5m]))', unit: "percentunit", legend: "cpu" },
      { title: "Memory used", expr: "node_memory_MemTotal_bytes - node_memory_MemAvailable_bytes", unit: "bytes", legend: "used" },
      { title: "Array used", expr: `1 - node_filesystem_avail_bytes{mountpoint="${mp}"} / node_filesystem_size_bytes{mountpoint="${mp}"}`, unit: "percentunit", legend: mp },
      { title: "Disk I/O", expr: "rate(node_disk_io_time_seconds_total[5m])", unit: "percentunit", legend: "{{device}}" },
    ]),
    "containers.json": dashboard("ts-containers", "Workspaces and services", [
      { title: "CPU by container", expr: 'sum by (name) (rate(container_cpu_usage_seconds_total{name!=""}[5m]))', unit: "short", legend: "{{name}}" },
      { title: "Memory by container", expr: 'sum by (name) (container_memory_working_set_bytes{name!=""})', unit: "bytes", legend: "{{name}}" },
      { title: "OOM events", expr: 'sum by (name) (increase(container_oom_events_total{name!=""}[1h]))', unit: "short", legend: "{{name}}" },
      { title: "Network in", expr: 'sum by (name) (rate(container_network_receive_bytes_total{name!=""}[5m]))', unit: "Bps", legend: "{{name}}" },
    ]),
  };
  if (!p.gpu) return boards;
  boards["gpu.json"] = dashboard("ts-gpu", "GPU", [
      { title: "GPU utilisation", expr: "DCGM_FI_DEV_GPU_UTIL", unit: "percent", legend: "GPU {{gpu}}" },
      { title: "GPU temperature", expr: "DCGM_FI_DEV_GPU_TEMP", unit: "celsius", legend: "GPU {{gpu}}" },
      { title: "GPU memory used", expr: "DCGM_FI_DEV_FB_USED * 1024 * 1024", unit: "bytes", legend: "GPU {{gpu}}" },
      { title: "GPU power", expr: "DCGM_FI_DEV_POWER_USAGE", unit: "watt", legend: "GPU {{gpu}}" },
  ]);
  boards["gpu-users.json"] = dashboard("ts-gpu-users", "Who uses which GPU", [
    { title: "GPU busy by user", expr: "train_server:gpu_user_busy_ratio:rate5m", unit: "percentunit", legend: "{{user}} on GPU {{gpu}}" },
    { title: "GPU memory held by user", expr: "sum by (user, gpu) (train_server_gpu_user_memory_bytes)", unit: "bytes", legend: "{{user}} on GPU {{gpu}}" },
    { title: "GPU hours per user (last 7 days)", expr: "sum by (user) (increase(train_server_gpu_user_busy_seconds_total[7d])) / 3600", unit: "h", legend: "{{user}}" },
    { title: "Peak GPU memory by user (1 h)", expr: "train_server:gpu_user_memory_peak_bytes:max1h", unit: "bytes", legend: "{{user}} on GPU {{gpu}}" },
    { title: "Pinned GPUs idle in working hours", expr: "train_server:gpu_reservation_idle_working", unit: "short", legend: "{{user}}: GPU {{gpu}}" },
    { title: "Working hours", expr: "train_server:working_hours", unit: "short", legend: "working hours" },
  ]);
  return boards;
}
