/** Pure renderers of the shared services: Traefik labels from routes, prometheus.yml scrape jobs with and without GPU. */
import YAML from "yaml";
import type { Route } from "../../components/routes";
import { renderPrometheusConfig, SERVICES_NETWORK, TRAEFIK_ENTRYPOINT, traefikLabels } from "../../components/render/services";

const route = (id: string, container: string, port: number): Route => ({
  id,
  hostname: `${id}.example.com`,
  container,
  port,
  audience: { kind: "user", user: "alice" },
});

describe("traefikLabels", () => {
  it("one router and one service per route, all on the services network and the web entrypoint", () => {
    expect([SERVICES_NETWORK, TRAEFIK_ENTRYPOINT]).toEqual(["train-server", "web"]);
    expect(traefikLabels([route("alice-code", "workspace-alice", 8080), route("alice-jupyter", "workspace-alice", 8888)])).toEqual({
      "traefik.enable": "true",
      "traefik.docker.network": "train-server",
      "traefik.http.routers.alice-code.rule": "Host(`alice-code.example.com`)",
      "traefik.http.routers.alice-code.entrypoints": "web",
      "traefik.http.routers.alice-code.service": "alice-code",
      "traefik.http.services.alice-code.loadbalancer.server.port": "8080",
      "traefik.http.routers.alice-jupyter.rule": "Host(`alice-jupyter.example.com`)",
      "traefik.http.routers.alice-jupyter.entrypoints": "web",
      "traefik.http.routers.alice-jupyter.service": "alice-jupyter",
      "traefik.http.services.alice-jupyter.loadbalancer.server.port": "8888",
    });
  });

  it("no routes: no labels at all (the container is not exposed)", () => {
    expect(traefikLabels([])).toEqual({});
  });

  it("throws for routes of two containers, naming both", () => {
    expect(() => traefikLabels([route("grafana", "grafana", 3000), route("alice-code", "workspace-alice", 8080)])).toThrow(/several containers \(grafana, workspace-alice\)/);
  });
});

describe("renderPrometheusConfig", () => {
  const base = { nodeExporter: "node-exporter:9100", alertmanager: "alertmanager:9093" };
  const jobs = (yml: string) =>
    Object.fromEntries((YAML.parse(yml).scrape_configs as Array<{ job_name: string; static_configs: Array<{ targets: string[] }> }>).map((j) => [j.job_name, j.static_configs[0].targets]));

  it("a host without GPU: prometheus, node, cadvisor, traefik and netdata, no GPU job", () => {
    expect(jobs(renderPrometheusConfig(base))).toEqual({
      prometheus: ["localhost:9090"],
      node: ["node-exporter:9100"],
      cadvisor: ["cadvisor:8080"],
      traefik: ["traefik:8080"],
      netdata: ["netdata:19999"],
    });
  });

  it("a GPU host also scrapes the DCGM exporter", () => {
    const j = jobs(renderPrometheusConfig({ ...base, gpuExporter: "dcgm-exporter:9400" }));
    expect(Object.keys(j)).toEqual(["prometheus", "node", "cadvisor", "traefik", "netdata", "gpu"]);
    expect(j.gpu).toEqual(["dcgm-exporter:9400"]);
  });

  it("netdata through its Prometheus endpoint; rules from /etc/prometheus/rules; alerts to alertmanager", () => {
    const c = YAML.parse(renderPrometheusConfig(base));
    expect(c.scrape_configs.find((j: { job_name: string }) => j.job_name === "netdata")).toMatchObject({
      metrics_path: "/api/v1/allmetrics",
      params: { format: ["prometheus"] },
      honor_labels: true,
    });
    expect(c.rule_files).toEqual(["/etc/prometheus/rules/*.yml"]);
    expect(c.alerting.alertmanagers).toEqual([{ static_configs: [{ targets: ["alertmanager:9093"] }] }]);
    expect(c.global).toEqual({ scrape_interval: "30s", evaluation_interval: "30s" });
    expect(YAML.parse(renderPrometheusConfig({ ...base, rulesDir: "/tmp/x/rules" })).rule_files).toEqual(["/tmp/x/rules/*.yml"]);
  });
});
