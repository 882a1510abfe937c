/**
 * Issue 12 point 7 under mocks, over the whole program: admin routes are not open to the whole office LAN.
 * Traefik has two entrypoints, `tunnel` (published on 127.0.0.1 only, cloudflared's target, every route, each
 * router only for the services network's gateway) and `lan` (published on host.lanAddress:80): team and user routes,
 * and admin routes only with host.adminSources, behind an ipAllowList of exactly those ranges.
 * (The real Traefik answering real requests is tests/host/traefik-lan.test.ts.)
 */
import { TRAEFIK_TUNNEL_URL, traefikCommand } from "../../components/render/services";
import { buildRoutes, WORKSPACE_ROUTE_SUFFIXES } from "../../components/routes";
import { parseConfig } from "../../components/config";
import type { Registered } from "../../tools/harness";
import { T } from "../helpers/edge";
import { clone, runProgram, stackRaw } from "../helpers/program";

const CONTAINER = "docker:index/container:Container";
/** The gateway the harness mocks give the services network (what Docker would report). */
const MOCK_GATEWAY = "172.18.0.1/32";
const SOURCES = ["192.168.1.10/32", "192.168.1.64/26"];

const byName = (res: Registered[], name: string) => res.find((x) => x.type === CONTAINER && x.inputs.name === name)!;
const labelsOf = (r: Registered): Record<string, string> => Object.fromEntries((r.inputs.labels ?? []).map((l: any) => [l.label, l.value]));

/** Every router of every container: name → its settings, plus the middlewares' source ranges. */
function routing(res: Registered[]) {
  const routers: Record<string, Record<string, string>> = {};
  const ranges: Record<string, string> = {};
  for (const c of res.filter((r) => r.type === CONTAINER)) {
    for (const [k, v] of Object.entries(labelsOf(c))) {
      const m = /^traefik\.http\.routers\.([^.]+)\.(\w+)$/.exec(k);
      if (m) (routers[m[1]] ??= { container: c.inputs.name })[m[2]] = v;
      const mw = /^traefik\.http\.middlewares\.([^.]+)\.ipallowlist\.sourcerange$/.exec(k);
      if (mw) ranges[mw[1]] = v;
    }
  }
  const host = (r: Record<string, string>) => /^Host\(`(.+)`\)$/.exec(r.rule)![1];
  const on = (ep: string) => Object.values(routers).filter((r) => r.entrypoints === ep);
  return { routers, ranges, host, on };
}

describe.each([
  ["prod as it is (no host.adminSources)", [] as string[]],
  ["prod with host.adminSources", SOURCES],
])("%s", (_what, adminSources) => {
  const raw = clone(stackRaw("prod"));
  if (adminSources.length) raw.host.adminSources = adminSources;
  const config = parseConfig(raw);
  const routes = buildRoutes(config);
  const admin = routes.filter((r) => r.audience.kind === "admins");
  let res: Registered[];
  beforeAll(async () => {
    res = (await runProgram(raw)).resources;
  });

  test("Traefik runs the rendered flags; LAN entrypoint on the LAN address, tunnel entrypoint on loopback only", () => {
    const t = byName(res, "traefik");
    expect(t.inputs.command).toEqual(traefikCommand());
    expect(t.inputs.ports).toEqual([
      { internal: 80, external: 80, ip: "192.168.1.50" },
      { internal: 81, external: 81, ip: "127.0.0.1" },
    ]);
  });

  test("cloudflared stays in the host network and the tunnel's ingress goes to the tunnel entrypoint", () => {
    expect(byName(res, "cloudflared").inputs.networkMode).toBe("host");
    const ing = res.find((r) => r.type === T.tunnelConfig)!.inputs.config.ingresses;
    expect(ing.length).toBeGreaterThan(1);
    for (const i of ing.slice(0, -1)) expect(i.service).toBe(TRAEFIK_TUNNEL_URL);
  });

  test("every hostname is on the tunnel entrypoint, each router only for the services network's gateway", () => {
    const { on, host, ranges } = routing(res);
    expect(on("tunnel").map(host).sort()).toEqual(routes.map((r) => r.hostname).sort());
    // the source check is the first middleware of every tunnel router (a user's TensorBoard has its entry redirect after it)
    for (const r of on("tunnel")) expect(ranges[r.middlewares.split(",")[0]]).toBe(MOCK_GATEWAY);
  });

  test("user and team routes are on the LAN entrypoint too, without a source check (only a TensorBoard's entry redirect, Guacamole's identity header removed)", () => {
    const { on, host } = routing(res);
    const lan = on("lan");
    for (const r of routes.filter((x) => x.audience.kind !== "admins")) {
      const router = lan.find((x) => host(x) === r.hostname);
      // a backend that trusts an Access identity header has it removed first (no LAN client can claim to be someone)
      const mw = [...(r.identityHeaders ? [`${r.id}-strip-identity`] : []), ...(r.entryPath ? [`${r.id}-entry`] : [])].join(",") || undefined;
      expect({ h: r.hostname, container: router?.container, mw: router?.middlewares }).toEqual({ h: r.hostname, container: r.container, mw });
    }
    expect(lan.filter((x) => x.container.startsWith("workspace-")).length).toBe(WORKSPACE_ROUTE_SUFFIXES.length * config.users.length);
  });

  if (adminSources.length === 0) {
    test("no admin route is on the LAN entrypoint (the LAN gets 404 for them)", () => {
      const { on, host } = routing(res);
      expect(admin.length).toBe(6);
      expect(on("lan").map(host).filter((h) => admin.some((r) => r.hostname === h))).toEqual([]);
    });
  } else {
    test("each admin route's LAN router carries an ipAllowList of exactly host.adminSources", () => {
      const { on, host, ranges } = routing(res);
      const lanAdmin = on("lan").filter((x) => admin.some((r) => r.hostname === host(x)));
      expect(lanAdmin.map(host).sort()).toEqual(admin.map((r) => r.hostname).sort());
      for (const r of lanAdmin) expect({ h: host(r), range: ranges[r.middlewares] }).toEqual({ h: host(r), range: SOURCES.join(",") });
    });
  }
});

test("the harness's mock gateway is what the labels carry (so the tests above read the program's own value)", async () => {
  const res = (await runProgram(stackRaw("prod"))).resources;
  const nets = res.filter((r) => r.type === "docker:index/network:Network");
  expect(nets.map((n) => n.inputs.name).sort()).toEqual(["train-server", "train-server-guacamole", "train-server-guacd"]);
  expect(labelsOf(byName(res, "grafana"))["traefik.http.middlewares.grafana-tunnel-sources.ipallowlist.sourcerange"]).toBe(MOCK_GATEWAY);
});
