/**
 * Pure renderers for the shared services' configuration: Traefik labels from the route table,
 * prometheus.yml, and Grafana provisioning (datasource, dashboard provider, dashboards).
 */
import { stringify } from "yaml";
import type { Route } from "../routes";

/** The Docker network every service and workspace joins (Traefik routes over it). */
export const SERVICES_NETWORK = "train-server";

/** Traefik's entrypoint for plain HTTP from cloudflared and the LAN. */
export const TRAEFIK_ENTRYPOINT = "web";

/** Traefik docker-provider labels routing `routes` (all served by one container) to that container. */
export function traefikLabels(routes: Route[]): Record<string, string> {
  if (routes.length === 0) return {};
  const containers = new Set(routes.map((r) => r.container));
  if (containers.size !== 1) throw new Error(`traefikLabels: routes of several containers (${[...containers].join(", ")})`);
  const labels: Record<string, string> = {
    "traefik.enable": "true",
    "traefik.docker.network": SERVICES_NETWORK,
  };
  for (const r of routes) {
    labels[`traefik.http.routers.${r.id}.rule`] = `Host(\`${r.hostname}\`)`;
    labels[`traefik.http.routers.${r.id}.entrypoints`] = TRAEFIK_ENTRYPOINT;
    labels[`traefik.http.routers.${r.id}.service`] = r.id;
    labels[`traefik.http.services.${r.id}.loadbalancer.server.port`] = String(r.port);
  }
  return labels;
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
