/**
 * Pure renderers of the shared services: Traefik's static flags and its labels from routes (the tunnel and LAN
 * entrypoints, admin routes on the LAN only for host.adminSources, tunnel routers only for the services network's
 * gateway), prometheus.yml scrape jobs with and without GPU.
 */
import YAML from "yaml";
import { parseConfig } from "../../components/config";
import type { Audience, Route } from "../../components/routes";
import { buildRoutes } from "../../components/routes";
import {
  labelList,
  lanAccess,
  renderPrometheusConfig,
  SERVICES_NETWORK,
  TRAEFIK_ENTRYPOINTS,
  TRAEFIK_TUNNEL_URL,
  traefikCommand,
  traefikLabels,
  tunnelSources,
} from "../../components/render/services";
import { clone, stackRaw } from "../helpers/program";

const route = (id: string, container: string, port: number, audience: Audience = { kind: "user", user: "alice" }): Route => ({
  id,
  hostname: `${id}.example.com`,
  container,
  port,
  audience,
});
const ADMINS: Audience = { kind: "admins" };
const TEAM: Audience = { kind: "team" };
const GW = ["172.18.0.1/32"];
const DEFAULT = { adminSources: [], tunnelSources: GW };
const SOURCES = { adminSources: ["192.168.1.10/32", "192.168.1.128/25"], tunnelSources: GW };

/** Router name → { rule, entrypoints, service, middlewares } from a label map. */
function routers(labels: Record<string, string>): Record<string, Record<string, string>> {
  const out: Record<string, Record<string, string>> = {};
  for (const [k, v] of Object.entries(labels)) {
    const m = /^traefik\.http\.routers\.([^.]+)\.(\w+)$/.exec(k);
    if (m) (out[m[1]] ??= {})[m[2]] = v;
  }
  return out;
}

describe("traefikCommand", () => {
  it("two entrypoints, tunnel :81 and lan :80; no catch-all web entrypoint", () => {
    const cmd = traefikCommand();
    expect(cmd.filter((f) => f.startsWith("--entrypoints."))).toEqual(["--entrypoints.tunnel.address=:81", "--entrypoints.lan.address=:80"]);
    expect(cmd).toEqual(expect.arrayContaining(["--providers.docker=true", "--providers.docker.exposedbydefault=false", "--providers.docker.network=train-server", "--ping=true"]));
    expect(cmd.join(" ")).not.toContain("entrypoints.web");
  });

  it("the tunnel's service URL is the tunnel entrypoint's port, published on the host's loopback", () => {
    const flag = traefikCommand().find((f) => f.startsWith("--entrypoints.tunnel.address="))!;
    expect(flag.split("=")[1]).toBe(`:${TRAEFIK_ENTRYPOINTS.tunnel.port}`);
    expect(TRAEFIK_TUNNEL_URL).toBe(`http://${TRAEFIK_ENTRYPOINTS.tunnel.hostIp}:${TRAEFIK_ENTRYPOINTS.tunnel.port}`);
    expect(TRAEFIK_TUNNEL_URL).toBe("http://127.0.0.1:81");
  });
});

describe("tunnelSources", () => {
  it("the services network's IPv4 gateway(s) as /32, from the provider's or docker inspect's IPAM config", () => {
    expect(tunnelSources([{ subnet: "172.18.0.0/16", gateway: "172.18.0.1" }])).toEqual(["172.18.0.1/32"]);
    expect(tunnelSources([{ Subnet: "10.1.0.0/24", Gateway: "10.1.0.1" }, { subnet: "fd00::/64", gateway: "fd00::1" }])).toEqual(["10.1.0.1/32"]);
  });
  it("throws when Docker reports no IPv4 gateway (fail closed)", () => {
    expect(() => tunnelSources([])).toThrow(/no IPv4 gateway/);
    expect(() => tunnelSources(undefined)).toThrow(/no IPv4 gateway/);
    expect(() => tunnelSources([{ subnet: "172.18.0.0/16" }])).toThrow(/no IPv4 gateway/);
  });
});

describe("traefikLabels", () => {
  it("user routes: a router on the tunnel (gateway only) and one on the LAN per route, same rule and service", () => {
    expect([SERVICES_NETWORK, TRAEFIK_ENTRYPOINTS.tunnel.name, TRAEFIK_ENTRYPOINTS.lan.name]).toEqual(["train-server", "tunnel", "lan"]);
    expect(traefikLabels([route("alice-code", "workspace-alice", 8080), route("alice-jupyter", "workspace-alice", 8888)], SOURCES)).toEqual({
      "traefik.enable": "true",
      "traefik.docker.network": "train-server",
      "traefik.http.routers.alice-code.rule": "Host(`alice-code.example.com`)",
      "traefik.http.routers.alice-code.entrypoints": "tunnel",
      "traefik.http.routers.alice-code.service": "alice-code",
      "traefik.http.routers.alice-code.middlewares": "alice-code-tunnel-sources",
      "traefik.http.middlewares.alice-code-tunnel-sources.ipallowlist.sourcerange": "172.18.0.1/32",
      "traefik.http.routers.alice-code-lan.rule": "Host(`alice-code.example.com`)",
      "traefik.http.routers.alice-code-lan.entrypoints": "lan",
      "traefik.http.routers.alice-code-lan.service": "alice-code",
      "traefik.http.services.alice-code.loadbalancer.server.port": "8080",
      "traefik.http.routers.alice-jupyter.rule": "Host(`alice-jupyter.example.com`)",
      "traefik.http.routers.alice-jupyter.entrypoints": "tunnel",
      "traefik.http.routers.alice-jupyter.service": "alice-jupyter",
      "traefik.http.routers.alice-jupyter.middlewares": "alice-jupyter-tunnel-sources",
      "traefik.http.middlewares.alice-jupyter-tunnel-sources.ipallowlist.sourcerange": "172.18.0.1/32",
      "traefik.http.routers.alice-jupyter-lan.rule": "Host(`alice-jupyter.example.com`)",
      "traefik.http.routers.alice-jupyter-lan.entrypoints": "lan",
      "traefik.http.routers.alice-jupyter-lan.service": "alice-jupyter",
      "traefik.http.services.alice-jupyter.loadbalancer.server.port": "8888",
    });
  });

  it("team routes: on both entrypoints, the LAN one without middleware, with or without admin sources", () => {
    for (const policy of [DEFAULT, SOURCES]) {
      expect(routers(traefikLabels([route("files", "filebrowser", 80, TEAM)], policy))).toEqual({
        files: { rule: "Host(`files.example.com`)", entrypoints: "tunnel", service: "files", middlewares: "files-tunnel-sources" },
        "files-lan": { rule: "Host(`files.example.com`)", entrypoints: "lan", service: "files" },
      });
    }
  });

  it("admin routes by default (no admin sources): the tunnel entrypoint only, no LAN router", () => {
    expect(traefikLabels([route("portainer", "portainer", 9000, ADMINS)], DEFAULT)).toEqual({
      "traefik.enable": "true",
      "traefik.docker.network": "train-server",
      "traefik.http.routers.portainer.rule": "Host(`portainer.example.com`)",
      "traefik.http.routers.portainer.entrypoints": "tunnel",
      "traefik.http.routers.portainer.service": "portainer",
      "traefik.http.routers.portainer.middlewares": "portainer-tunnel-sources",
      "traefik.http.middlewares.portainer-tunnel-sources.ipallowlist.sourcerange": "172.18.0.1/32",
      "traefik.http.services.portainer.loadbalancer.server.port": "9000",
    });
  });

  it("admin routes with admin sources: the LAN router carries an ipAllowList with exactly those ranges", () => {
    expect(traefikLabels([route("portainer", "portainer", 9000, ADMINS)], SOURCES)).toEqual({
      "traefik.enable": "true",
      "traefik.docker.network": "train-server",
      "traefik.http.routers.portainer.rule": "Host(`portainer.example.com`)",
      "traefik.http.routers.portainer.entrypoints": "tunnel",
      "traefik.http.routers.portainer.service": "portainer",
      "traefik.http.routers.portainer.middlewares": "portainer-tunnel-sources",
      "traefik.http.middlewares.portainer-tunnel-sources.ipallowlist.sourcerange": "172.18.0.1/32",
      "traefik.http.routers.portainer-lan.rule": "Host(`portainer.example.com`)",
      "traefik.http.routers.portainer-lan.entrypoints": "lan",
      "traefik.http.routers.portainer-lan.service": "portainer",
      "traefik.http.routers.portainer-lan.middlewares": "portainer-admin-sources",
      "traefik.http.middlewares.portainer-admin-sources.ipallowlist.sourcerange": "192.168.1.10/32,192.168.1.128/25",
      "traefik.http.services.portainer.loadbalancer.server.port": "9000",
    });
  });

  it("lanAccess: everyone for team and user routes, admin sources or nobody for admin routes", () => {
    expect(lanAccess({ audience: TEAM }, DEFAULT)).toBe("everyone");
    expect(lanAccess({ audience: { kind: "user", user: "bob" } }, DEFAULT)).toBe("everyone");
    expect(lanAccess({ audience: ADMINS }, DEFAULT)).toBe("nobody");
    expect(lanAccess({ audience: ADMINS }, SOURCES)).toBe("adminSources");
  });

  it("no routes: no labels at all (the container is not exposed)", () => {
    expect(traefikLabels([], SOURCES)).toEqual({});
  });

  it("labelList: the Docker provider's label list, in order", () => {
    expect(labelList({ a: "1", b: "2" })).toEqual([{ label: "a", value: "1" }, { label: "b", value: "2" }]);
  });

  it("throws for routes of two containers, naming both", () => {
    expect(() => traefikLabels([route("grafana", "grafana", 3000), route("alice-code", "workspace-alice", 8080)], DEFAULT)).toThrow(/several containers \(grafana, workspace-alice\)/);
  });

  it("refuses sources that are not IPv4 CIDRs, and an empty tunnel source list (nothing unvalidated reaches a label)", () => {
    const r = [route("portainer", "portainer", 9000, ADMINS)];
    for (const bad of ["192.168.1.10", "10.0.0.0/8,0.0.0.0/0", "", "::1/128"]) {
      expect(() => traefikLabels(r, { ...DEFAULT, adminSources: [bad] })).toThrow(/adminSources must be IPv4 CIDRs/);
      expect(() => traefikLabels(r, { ...DEFAULT, tunnelSources: [bad] })).toThrow(/tunnelSources must be IPv4 CIDRs/);
    }
    expect(() => traefikLabels(r, { ...DEFAULT, tunnelSources: [] })).toThrow(/tunnelSources is empty/);
  });

  it("an entry path redirects only the bare hostname, after the source check, and must be an absolute path", () => {
    const r: Route = { id: "x-tensorboard", hostname: "x-tensorboard.example.com", container: "workspace-x", port: 8080, audience: { kind: "user", user: "x" }, entryPath: "/absproxy/6006/" };
    const labels = traefikLabels([r], { adminSources: [], tunnelSources: GW });
    expect(labels["traefik.http.middlewares.x-tensorboard-entry.redirectregex.regex"]).toBe("^[a-z]+://[^/]+/?$");
    expect(labels["traefik.http.middlewares.x-tensorboard-entry.redirectregex.replacement"]).toBe("/absproxy/6006/");
    const re = new RegExp(labels["traefik.http.middlewares.x-tensorboard-entry.redirectregex.regex"]);
    expect(["http://x-tensorboard.example.com", "http://x-tensorboard.example.com/"].every((u) => re.test(u))).toBe(true);
    expect(["http://x-tensorboard.example.com/absproxy/6006/", "http://x-tensorboard.example.com/login?to=/"].some((u) => re.test(u))).toBe(false);
    expect(labels["traefik.http.routers.x-tensorboard.middlewares"]).toBe("x-tensorboard-tunnel-sources,x-tensorboard-entry");
    expect(labels["traefik.http.routers.x-tensorboard-lan.middlewares"]).toBe("x-tensorboard-entry");
    for (const bad of ["absproxy/6006/", "/absproxy/6006", "//evil.example/", "/a b/", "https://evil.example/"])
      expect(() => traefikLabels([{ ...r, entryPath: bad }], { adminSources: [], tunnelSources: GW })).toThrow(/entryPath .* must be an absolute path/);
  });

  describe.each([
    ["default (no admin sources)", [] as string[]],
    ["admin sources", ["192.168.1.10/32", "192.168.1.64/26"]],
  ])("every route of the prod stack, %s", (_what, adminSources) => {
    const raw = clone(stackRaw("prod"));
    raw.host.adminSources = adminSources;
    const config = parseConfig(raw);
    const routes = buildRoutes(config);
    const all: Record<string, Record<string, string>> = {};
    const middlewares: Record<string, string> = {};
    for (const c of new Set(routes.map((r) => r.container))) {
      const labels = traefikLabels(routes.filter((r) => r.container === c), { adminSources: config.host.adminSources, tunnelSources: GW });
      Object.assign(all, routers(labels));
      for (const [k, v] of Object.entries(labels)) if (k.startsWith("traefik.http.middlewares.")) middlewares[k] = v;
    }
    const on = (ep: string) => Object.values(all).filter((r) => r.entrypoints === ep).map((r) => /`(.+)`/.exec(r.rule)![1]).sort();
    const range = (mw: string) => middlewares[`traefik.http.middlewares.${mw}.ipallowlist.sourcerange`];

    it("every router is on exactly one of the two entrypoints", () => {
      expect(Object.values(all).every((r) => r.entrypoints === "tunnel" || r.entrypoints === "lan")).toBe(true);
    });

    it("the tunnel entrypoint serves every hostname, each router only to the services network's gateway", () => {
      expect(on("tunnel")).toEqual(routes.map((r) => r.hostname).sort());
      for (const r of routes) {
        // the source check first; a route with an entry path then has its redirect, and no other route has one
        expect(all[r.id].middlewares).toBe(r.entryPath ? `${r.id}-tunnel-sources,${r.id}-entry` : `${r.id}-tunnel-sources`);
        expect(range(`${r.id}-tunnel-sources`)).toBe("172.18.0.1/32");
      }
      expect(routes.filter((r) => r.entryPath).map((r) => r.id)).toEqual(config.users.map((u) => `${u.name}-tensorboard`).sort());
    });

    it("the LAN entrypoint serves team and user hostnames, and admin hostnames only behind exactly the admin sources", () => {
      const admin = routes.filter((r) => r.audience.kind === "admins");
      expect(admin.map((r) => r.id).sort()).toEqual(["dozzle", "grafana", "netdata", "portainer", "prometheus", "traefik"]);
      const others = routes.filter((r) => r.audience.kind !== "admins").map((r) => r.hostname);
      expect(on("lan")).toEqual([...others, ...(adminSources.length ? admin.map((r) => r.hostname) : [])].sort());
      for (const r of routes) {
        const lan = all[`${r.id}-lan`];
        if (r.audience.kind !== "admins") {
          const mw = [...(r.identityHeaders ? [`${r.id}-strip-identity`] : []), ...(r.entryPath ? [`${r.id}-entry`] : [])];
          expect(lan.middlewares).toBe(mw.join(",") || undefined);
        }
        else if (adminSources.length === 0) expect(lan).toBeUndefined();
        else {
          expect(lan.middlewares).toBe(`${r.id}-admin-sources`);
          expect(range(lan.middlewares)).toBe(adminSources.join(","));
        }
      }
      expect(Object.keys(middlewares).filter((k) => k.includes("-admin-sources.")).length).toBe(adminSources.length ? admin.length : 0);
    });
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
