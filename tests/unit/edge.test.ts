/**
 * Edge under mocks: THE invariant (no hostname reachable through the tunnel without an Access application
 * covering exactly that hostname, whose allow policy names who may enter) over prod and 200 generated configs;
 * who each route admits; what adding a user adds; secrets; DNS; ingress order; MFA and IdP settings.
 */
import * as pulumi from "@pulumi/pulumi";
import { parseConfig, ServerConfig } from "../../components/config";
import { Edge, accessTable, audienceKey, localDnsParams, MFA_AUTHENTICATORS, publishedRoutes, tunnelToken, workspaceDomain } from "../../components/edge";
import { lanAccess, TRAEFIK_TUNNEL_URL } from "../../components/render/services";
import { audienceDomains, audienceEmails, buildRoutes, WORKSPACE_ROUTE_SUFFIXES } from "../../components/routes";
import { dependsOn, Registered, runUnderMocks } from "../../tools/harness";
import { checkInvariant, GOOGLE_SECRET, randomConfig, runEdge, T } from "../helpers/edge";
import { clone, stackRaw } from "../helpers/program";

type Run = Awaited<ReturnType<typeof runEdge>>;
const prod = parseConfig(stackRaw("prod"));
const emailsOf = (c: ServerConfig, pred: (u: ServerConfig["users"][number]) => boolean) => c.users.filter(pred).map((u) => u.email);

describe("prod", () => {
  let run: Run;
  let res: Registered[];
  beforeAll(async () => {
    run = await runEdge(prod);
    res = run.resources;
  });

  test("the invariant holds: every ingress hostname has exactly one Access app with a named allow policy", () => {
    const { violations, admits } = checkInvariant(res);
    expect(violations).toEqual([]);
    expect([...admits.keys()].sort()).toEqual(buildRoutes(prod).map((r) => r.hostname).sort());
  });

  test("who may enter each hostname is exactly what the route table says", () => {
    const { admits } = checkInvariant(res);
    for (const r of buildRoutes(prod)) {
      expect({ h: r.hostname, ...admits.get(r.hostname) }).toEqual({
        h: r.hostname,
        emails: audienceEmails(prod, r.audience),
        domains: audienceDomains(prod, r.audience),
      });
    }
    // spelled out for prod: admin routes admit alice only; team routes the whole domain
    expect(admits.get("grafana.example.com")).toEqual({ emails: ["alice@example.com"], domains: [] });
    expect(admits.get("files.example.com")?.domains).toEqual(["example.com"]);
  });

  test("a user's routes admit that user and the admins, and no other user", () => {
    const { admits } = checkInvariant(res);
    const admins = emailsOf(prod, (u) => u.admin);
    for (const u of prod.users) {
      for (const suffix of ["code", "jupyter"]) {
        const who = admits.get(`${u.name}-${suffix}.example.com`)!;
        expect(who.domains).toEqual([]);
        expect(who.emails).toEqual([...new Set([u.email, ...admins])].sort());
        for (const other of prod.users.filter((o) => o !== u && !o.admin)) expect(who.emails).not.toContain(other.email);
      }
    }
  });

  test("policies are reusable: one per audience (admins, team, one per user), shared by routes", () => {
    const names = res.filter((r) => r.type === T.policy).map((r) => r.name).sort();
    expect(names).toEqual(["edge-policy-admins", "edge-policy-team", ...prod.users.map((u) => `edge-policy-user-${u.name}`)].sort());
    const ids = (route: string) => res.find((r) => r.type === T.app && r.name === `edge-app-${route}`)!.inputs.policies;
    expect(ids("grafana")).toEqual(ids("prometheus"));
    expect(ids("bob-code")).toEqual(ids("bob-jupyter"));
    expect(ids("bob-code")).toEqual([{ id: "train-server user-bob", precedence: 1 }]);
  });

  test("every DNS record is a proxied CNAME to <tunnel id>.cfargotunnel.com, one per route, named by route id", () => {
    const dns = res.filter((r) => r.type === T.dns);
    expect(dns.map((d) => d.name).sort()).toEqual(buildRoutes(prod).map((r) => `edge-dns-${r.id}`).sort());
    for (const d of dns) {
      expect(d.inputs).toMatchObject({ type: "CNAME", proxied: true, ttl: 1, zoneId: prod.cloudflare.zoneId, content: `${run.outputs.tunnelId}.cfargotunnel.com` });
      expect(d.inputs.name).not.toContain("*");
    }
  });

  test("ingress: one rule per route hostname → Traefik's tunnel entrypoint with its Host header, then the catch-all 404 last", () => {
    const cfg = res.find((r) => r.type === T.tunnelConfig)!;
    expect(cfg.inputs.source).toBe("cloudflare");
    const ing = cfg.inputs.config.ingresses;
    expect(ing[ing.length - 1]).toEqual({ service: "http_status:404" });
    expect(ing.slice(0, -1)).toEqual(
      buildRoutes(prod).map((r) => ({ hostname: r.hostname, service: "http://127.0.0.1:81", originRequest: { httpHostHeader: r.hostname } })),
    );
  });

  test("the tunnel is remotely managed and its secret (48 random bytes, base64) is a secret input", () => {
    const tunnel = res.find((r) => r.type === T.tunnel)!;
    expect(tunnel.inputs).toMatchObject({ accountId: prod.cloudflare.accountId, name: "train-server", configSrc: "cloudflare" });
    expect(tunnel.secretInputs).toContain("tunnelSecret");
    const pw = res.find((r) => r.type === T.password)!;
    expect(pw.inputs).toMatchObject({ length: 48, special: false });
    // the tunnel secret is the generated value's bytes in base64 (48 bytes >= the 32 the API requires)
    expect(Buffer.from(tunnel.inputs.tunnelSecret, "base64").toString("utf8")).toBe(`mock-password-${pw.name}`);
  });

  test("the tunnel token is a secret output in cloudflared's format: base64 JSON {a, t, s}", () => {
    expect(run.outputs.tokenIsSecret).toBe(true);
    const tunnel = res.find((r) => r.type === T.tunnel)!;
    const decoded = JSON.parse(Buffer.from(run.outputs.tunnelToken, "base64").toString("utf8"));
    expect(decoded).toEqual({ a: prod.cloudflare.accountId, t: run.outputs.tunnelId, s: tunnel.inputs.tunnelSecret });
    expect(tunnelToken("acc", "id", "c2VjcmV0")).toBe(Buffer.from('{"a":"acc","t":"id","s":"c2VjcmV0"}').toString("base64"));
  });

  test("secret values appear only in inputs marked secret", () => {
    const tunnelSecret = res.find((r) => r.type === T.tunnel)!.inputs.tunnelSecret as string;
    for (const r of res) {
      for (const [k, v] of Object.entries(r.inputs)) {
        const text = JSON.stringify(v) ?? "";
        if (text.includes(GOOGLE_SECRET) || text.includes(tunnelSecret)) expect({ r: r.name, k, secret: r.secretInputs.includes(k) }).toEqual({ r: r.name, k, secret: true });
      }
    }
    const idp = res.find((r) => r.type === T.idp)!;
    expect(idp.inputs.config.clientSecret).toBe(GOOGLE_SECRET);
    expect(idp.secretInputs).toContain("config");
  });

  test("the Google Workspace IdP: google-apps, client id from config, apps domain = first allowed domain", () => {
    const idp = res.find((r) => r.type === T.idp)!;
    expect(idp.inputs).toMatchObject({
      accountId: prod.cloudflare.accountId,
      type: "google-apps",
      config: { clientId: prod.cloudflare.googleClientId, appsDomain: "example.com" },
    });
  });

  test("applications: self_hosted, Google only with auto-redirect, session duration from config", () => {
    const apps = res.filter((r) => r.type === T.app);
    expect(apps).toHaveLength(buildRoutes(prod).length);
    for (const a of apps) {
      expect(a.inputs).toMatchObject({ type: "self_hosted", allowedIdps: ["train-server Google Workspace"], autoRedirectToIdentity: true, sessionDuration: "24h" });
    }
  });

  test("MFA (requireMfa: true): every policy requires Access independent MFA; no amr rule Google cannot satisfy", () => {
    for (const p of res.filter((r) => r.type === T.policy)) {
      expect(p.inputs.mfaConfig).toEqual({ mfaDisabled: false, allowedAuthenticators: MFA_AUTHENTICATORS, sessionDuration: "24h" });
      expect(JSON.stringify(p.inputs)).not.toContain("authMethod");
    }
  });

  test("each DNS record and the ingress depend on the Access application they expose", () => {
    const app = (id: string) => res.find((r) => r.type === T.app && r.name === `edge-app-${id}`)!;
    const cfg = res.find((r) => r.type === T.tunnelConfig)!;
    for (const route of buildRoutes(prod)) {
      const dns = res.find((r) => r.type === T.dns && r.name === `edge-dns-${route.id}`)!;
      expect(dns.dependencies).toContain(app(route.id).urn);
      expect(dependsOn(res, cfg.urn, app(route.id).urn)).toBe(true);
    }
  });

  test("outputs: hostnames, local DNS at the LAN address, and the access table", () => {
    expect(run.outputs.hostnames).toEqual(buildRoutes(prod).map((r) => r.hostname));
    expect(run.outputs.localDns.hosts).toContain("192.168.1.50    alice-code.example.com\n");
    expect(run.outputs.localDns.dnsmasq).toContain("host-record=files.example.com,192.168.1.50\n");
    // no host.adminSources in prod: admin hostnames are tunnel-only, so local DNS leaves them to public DNS
    expect(run.outputs.localDns.dnsmasq).not.toContain("grafana.example.com,");
    expect(run.outputs.localDns.hosts).toContain("# admin hostnames (traefik.example.com health.example.com prometheus.example.com grafana.example.com portainer.example.com logs.example.com) are not listed: they are served only through the tunnel (Cloudflare Access)\n");
    expect(run.outputs.accessTable["bob-code"]).toEqual({
      hostname: "bob-code.example.com",
      backend: "workspace-bob:8080",
      audience: "user",
      admits: "alice@example.com, bob@example.com",
    });
    expect(run.outputs.accessTable.grafana).toEqual({ hostname: "grafana.example.com", backend: "grafana:3000", audience: "admins", admits: "alice@example.com" });
  });

  test("the tunnel's service URL defaults to Traefik's tunnel entrypoint", () => {
    const ing = res.find((r) => r.type === T.tunnelConfig)!.inputs.config.ingresses;
    expect(new Set(ing.slice(0, -1).map((i: any) => i.service))).toEqual(new Set([TRAEFIK_TUNNEL_URL]));
  });

  test("local DNS with host.adminSources: admin hostnames listed too, with a note on who gets them", () => {
    const raw = clone(stackRaw("prod"));
    raw.host.adminSources = ["192.168.1.10/32", "192.168.1.64/26"];
    const p = localDnsParams(parseConfig(raw));
    expect(p.hostnames.sort()).toEqual(buildRoutes(prod).map((r) => r.hostname).sort());
    expect(p.notes).toEqual([
      "admin hostnames (traefik.example.com health.example.com prometheus.example.com grafana.example.com portainer.example.com logs.example.com) answer on the LAN only to host.adminSources 192.168.1.10/32 192.168.1.64/26;",
      "any other LAN address gets 403 (use the public names, through Cloudflare Access, from there)",
    ]);
    const d = localDnsParams(prod);
    expect(d.hostnames.sort()).toEqual(buildRoutes(prod).filter((r) => r.audience.kind !== "admins").map((r) => r.hostname).sort());
    expect(d.hostnames).toHaveLength(3 + WORKSPACE_ROUTE_SUFFIXES.length * 5);
  });

  test("traefikUrl is honoured", async () => {
    const r = await runEdge(prod, { traefikUrl: "http://traefik-x:8000" });
    const ing = r.resources.find((x) => x.type === T.tunnelConfig)!.inputs.config.ingresses;
    expect(ing.slice(0, -1).every((i: any) => i.service === "http://traefik-x:8000")).toBe(true);
  });
});

describe("the invariant checker fails on broken graphs (so the invariant tests can fail)", () => {
  let res: Registered[];
  beforeAll(async () => {
    res = (await runEdge(prod)).resources;
  });
  const mutate = (f: (r: Registered[]) => Registered[]) => checkInvariant(f(JSON.parse(JSON.stringify(res)))).violations.join("\n");

  test.each<[string, (r: Registered[]) => Registered[], RegExp]>([
    ["an app removed", (r) => r.filter((x) => x.name !== "edge-app-bob-code"), /bob-code.example.com: 0 Access applications/],
    ["empty includes", (r) => (r.find((x) => x.name === "edge-policy-user-bob")!.inputs.includes = [], r), /no include rule/],
    ["an everyone include", (r) => (r.find((x) => x.name === "edge-policy-team")!.inputs.includes.push({ everyone: {} }), r), /other than a named address/],
    ["a bypass policy", (r) => (r.find((x) => x.name === "edge-policy-admins")!.inputs.decision = "bypass", r), /decides bypass/],
    ["a wildcard app destination", (r) => (r.find((x) => x.name === "edge-app-grafana")!.inputs.destinations = [{ type: "public", uri: "*.example.com" }], r), /grafana.example.com: .*destinations|0 Access/],
    ["catch-all missing", (r) => (r.find((x) => x.type === T.tunnelConfig)!.inputs.config.ingresses.pop(), r), /catch-all/],
    ["a hostless rule first", (r) => (r.find((x) => x.type === T.tunnelConfig)!.inputs.config.ingresses.unshift({ service: "http://traefik:80" }), r), /no hostname/],
    ["an unproxied record", (r) => (r.find((x) => x.type === T.dns)!.inputs.proxied = false, r), /not a proxied CNAME/],
    ["a record without ingress", (r) => (r.find((x) => x.type === T.dns)!.inputs.name = "extra.example.com", r), /has no ingress rule/],
    ["another IdP allowed", (r) => (r.find((x) => x.name === "edge-app-bob-code")!.inputs.allowedIdps.push("otp"), r), /allowedIdps/],
    ["no login method required", (r) => (r.find((x) => x.name === "edge-policy-team")!.inputs.requires = [], r), /Google login method/],
  ])("%s", (_what, f, msg) => {
    expect(mutate(f)).toMatch(msg);
  });
});

describe("generated configs", () => {
  const SEEDS = Array.from({ length: 200 }, (_, i) => i + 1);

  test("the generator makes varied, valid configs", () => {
    const cs = SEEDS.map(randomConfig);
    const sizes = cs.map((c) => c.users.length);
    expect(Math.min(...sizes)).toBe(1);
    expect(Math.max(...sizes)).toBe(30);
    expect(cs.some((c) => c.cloudflare.allowedDomains.length === 0)).toBe(true);
    expect(cs.some((c) => c.cloudflare.allowedDomains.length > 1)).toBe(true);
    expect(cs.some((c) => c.hostnames.grafana !== "grafana")).toBe(true);
    expect(cs.some((c) => !c.cloudflare.requireMfa)).toBe(true);
    expect(cs.some((c) => c.users.filter((u) => u.admin).length > 1)).toBe(true);
  });

  test(
    "the invariant holds, and every hostname admits exactly its audience, for 200 configs",
    async () => {
      // The SDK records `new Error().stack` for every resource and promise, and source-map-support rewrites each
      // one; that is 2/3 of the time of a run. Stack traces are not needed here (failures name the seed).
      const limit = Error.stackTraceLimit;
      Error.stackTraceLimit = 0;
      try {
        await checkSeeds();
      } finally {
        Error.stackTraceLimit = limit;
      }
    },
    300_000,
  );

  async function checkSeeds() {
    for (const seed of SEEDS) {
      const config = randomConfig(seed);
      const { resources, outputs } = await runEdge(config);
      const { violations, admits } = checkInvariant(resources);
      expect({ seed, violations }).toEqual({ seed, violations: [] });
      const routes = buildRoutes(config);
      expect({ seed, hosts: [...admits.keys()].sort() }).toEqual({ seed, hosts: routes.map((r) => r.hostname).sort() });
      const admins = emailsOf(config, (u) => u.admin);
      for (const r of routes) {
        const who = admits.get(r.hostname)!;
        expect({ seed, h: r.hostname, ...who }).toEqual({ seed, h: r.hostname, emails: audienceEmails(config, r.audience), domains: audienceDomains(config, r.audience) });
        if (r.audience.kind !== "user") continue;
        // spelled out independently of routes.ts: the owner and the admins, nobody else, no domain
        const owner = config.users.find((u) => u.name === (r.audience as { user: string }).user)!;
        expect({ seed, h: r.hostname, ...who }).toEqual({ seed, h: r.hostname, emails: [...new Set([owner.email, ...admins])].sort(), domains: [] });
      }
      for (const p of resources.filter((x) => x.type === T.policy)) expect({ seed, mfa: !!p.inputs.mfaConfig }).toEqual({ seed, mfa: config.cloudflare.requireMfa });
      const lan = routes.filter((r) => lanAccess(r, config.host) !== "nobody").map((r) => r.hostname).sort();
      expect(lan.length).toBe(routes.filter((r) => r.audience.kind !== "admins" || config.host.adminSources.length > 0).length);
      expect({ seed, hosts: outputs.localDns.hosts.split("\n").filter((l) => l && !l.startsWith("#")).map((l) => l.split(/ +/)[1]) }).toEqual({ seed, hosts: lan });
      expect(resources.find((x) => x.type === T.idp)!.inputs.config.appsDomain).toBe(workspaceDomain(config));
    }
  }
});

describe("adding and removing a user", () => {
  const key = (r: Registered) => `${r.type}::${r.name}`;
  const withFrank = () => {
    const raw = clone(stackRaw("prod"));
    raw.users.push({ name: "frank", uid: 1005, email: "frank@example.com", sshKeys: raw.users[1].sshKeys, memoryGuaranteeGb: 8 });
    return parseConfig(raw);
  };

  test("adding frank adds exactly his records, applications and policy; only the ingress and team policy change", async () => {
    const before = (await runEdge(prod)).resources;
    const after = (await runEdge(withFrank())).resources;
    const b = new Map(before.map((r) => [key(r), r]));
    const a = new Map(after.map((r) => [key(r), r]));
    const added = [...a.keys()].filter((k) => !b.has(k)).sort();
    const removed = [...b.keys()].filter((k) => !a.has(k));
    expect(added).toEqual(
      [...WORKSPACE_ROUTE_SUFFIXES.flatMap((s) => [`${T.app}::edge-app-frank-${s}`, `${T.dns}::edge-dns-frank-${s}`]), `${T.policy}::edge-policy-user-frank`].sort(),
    );
    expect(removed).toEqual([]);
    const changed = [...b.keys()].filter((k) => JSON.stringify(b.get(k)!.inputs) !== JSON.stringify(a.get(k)!.inputs)).sort();
    // the team audience lists every user's address, and the ingress lists every hostname
    expect(changed).toEqual([`${T.policy}::edge-policy-team`, `${T.tunnelConfig}::edge-tunnel-config`].sort());
    const frank = a.get(`${T.policy}::edge-policy-user-frank`)!;
    expect(frank.inputs.includes).toEqual([{ email: { email: "alice@example.com" } }, { email: { email: "frank@example.com" } }]);
  });

  test("removing a user removes exactly their records, applications and policy", async () => {
    const raw = clone(stackRaw("prod"));
    raw.users = raw.users.filter((u: any) => u.name !== "dave");
    const after = (await runEdge(parseConfig(raw))).resources;
    const before = (await runEdge(prod)).resources;
    const a = new Set(after.map(key));
    expect(before.map(key).filter((k) => !a.has(k)).sort()).toEqual(
      [...WORKSPACE_ROUTE_SUFFIXES.flatMap((s) => [`${T.app}::edge-app-dave-${s}`, `${T.dns}::edge-dns-dave-${s}`]), `${T.policy}::edge-policy-user-dave`].sort(),
    );
  });
});

describe("edge cases", () => {
  test("a server without users publishes only the team routes (admin routes would admit nobody)", async () => {
    const raw = clone(stackRaw("prod"));
    raw.users = [];
    const config = parseConfig(raw);
    expect(publishedRoutes(config).map((r) => r.id)).toEqual(["tensorboard", "filebrowser", "guacamole"]);
    const { resources } = await runEdge(config);
    expect(checkInvariant(resources).violations).toEqual([]);
    expect(resources.filter((r) => r.type === T.policy).map((r) => r.name)).toEqual(["edge-policy-team"]);
  });

  test("requireMfa: false sets no MFA config (the organisation's default applies)", async () => {
    const raw = clone(stackRaw("prod"));
    raw.cloudflare.requireMfa = false;
    const { resources } = await runEdge(parseConfig(raw));
    for (const p of resources.filter((r) => r.type === T.policy)) expect(p.inputs.mfaConfig).toBeUndefined();
  });

  test("without allowed domains the IdP's Workspace domain is the first admin's", () => {
    const raw = clone(stackRaw("prod"));
    raw.cloudflare.allowedDomains = [];
    raw.cloudflare.allowedEmails = raw.users.map((u: any) => u.email);
    expect(workspaceDomain(parseConfig(raw))).toBe("example.com");
  });

  test("a route hostname that is not a DNS name is refused by the config, before Edge sees it", () => {
    const raw = clone(stackRaw("prod"));
    raw.users[1].name = "bob_x";
    expect(() => parseConfig(raw)).toThrow(/users\[1\]\.name: .*bob_x-code\.example\.com/);
  });

  test("audience keys never collide between a user and the shared audiences", () => {
    expect(audienceKey({ kind: "user", user: "admins" })).not.toBe(audienceKey({ kind: "admins" }));
    expect(audienceKey({ kind: "user", user: "team" })).not.toBe(audienceKey({ kind: "team" }));
  });

  test("Edge is a train-server component and every child is named after it", async () => {
    const { resources } = await runEdge(prod);
    const root = resources.find((r) => r.type === "train-server:edge:Edge")!;
    expect(root.name).toBe("edge");
    for (const r of resources.filter((x) => x.parent === root.urn)) expect(r.name.startsWith("edge-")).toBe(true);
    expect(Object.keys(accessTable(prod))).toHaveLength(9 + WORKSPACE_ROUTE_SUFFIXES.length * 5);
  });
});

describe("CI's SSH route (cloudflare.ciSsh)", () => {
  const withCi = (raw: Record<string, any>) => {
    const c = clone(raw);
    c.cloudflare.ciSsh = { hostname: "ssh" };
    return c;
  };
  let res: Registered[];
  let outputs: any;
  beforeAll(async () => {
    const run = await runUnderMocks(() => {
      const edge = new Edge("edge", { config: parseConfig(withCi(stackRaw("prod"))), googleClientSecret: pulumi.secret(GOOGLE_SECRET) });
      return { ciSsh: edge.ciSsh, secretIsSecret: pulumi.isSecret(edge.ciSsh!.clientSecret), hostnames: edge.hostnames };
    }, {});
    res = run.resources;
    outputs = run.outputs;
  });
  const ingresses = (r: Registered[]) => r.find((x) => x.type === T.tunnelConfig)!.inputs.config.ingresses as Array<{ hostname?: string; service: string }>;

  test("the invariant holds with the route: ssh.<domain> → the host's sshd, opened only by the program's own service token", () => {
    const { violations, admits } = checkInvariant(res);
    expect(violations).toEqual([]);
    expect(admits.get("ssh.example.com")).toEqual({ emails: [], domains: [] });
    const rules = ingresses(res);
    expect(rules[rules.length - 2]).toEqual({ hostname: "ssh.example.com", service: "ssh://localhost:22" });
    expect(rules[rules.length - 1]).toEqual({ service: "http_status:404" });
    const tokens = res.filter((x) => x.type === T.serviceToken);
    expect(tokens.map((t) => t.inputs.duration)).toEqual(["8760h"]);
    const app = res.find((x) => x.name === "edge-app-ci-ssh")!;
    const policy = res.find((x) => x.name === "edge-policy-ci")!;
    expect(app.inputs.policies).toEqual([{ id: policy.inputs.name, precedence: 1 }]);
    expect(policy.inputs).toMatchObject({ decision: "non_identity", includes: [{ serviceToken: { tokenId: tokens[0].inputs.name } }] });
    expect(res.filter((x) => x.type === T.dns && x.inputs.name === "ssh.example.com")).toHaveLength(1);
  });

  test("the token's secret is a secret output, and the SSH route is not in the HTTP hostnames (local DNS, access table)", () => {
    expect(outputs.secretIsSecret).toBe(true);
    expect(outputs.ciSsh.hostname).toBe("ssh.example.com");
    expect(outputs.hostnames).not.toContain("ssh.example.com");
  });

  test("adding a user keeps the CI route: the ingress list the program replaces always contains it", async () => {
    const raw = withCi(stackRaw("prod"));
    raw.users.push({ name: "frank", uid: 1005, email: "frank@example.com", sshKeys: raw.users[1].sshKeys, memoryGuaranteeGb: 4 });
    const after = (await runEdge(parseConfig(raw))).resources;
    expect(ingresses(after).map((r) => r.hostname)).toEqual(expect.arrayContaining(["ssh.example.com", "frank-code.example.com"]));
    expect(checkInvariant(after).violations).toEqual([]);
  });

  test.each<[string, (r: Registered[]) => Registered[], RegExp]>([
    ["the CI policy also admits an address", (r) => (r.find((x) => x.name === "edge-policy-ci")!.inputs.includes.push({ email: { email: "x@example.com" } }), r), /decides non_identity|exactly one service token/],
    ["the CI policy on an HTTP route", (r) => (r.find((x) => x.name === "edge-app-grafana")!.inputs.policies = [{ id: r.find((x) => x.name === "edge-policy-ci")!.inputs.name, precedence: 1 }], r), /grafana.example.com: policy edge-policy-ci (includes something other|does not require)/],
    ["an ssh route to another machine", (r) => (ingresses(r).find((x) => x.hostname === "ssh.example.com")!.service = "ssh://10.0.0.9:22", r), /not the host's own sshd/],
  ])("the checker catches %s", (_what, f, msg) => {
    expect(checkInvariant(f(JSON.parse(JSON.stringify(res)))).violations.join("\n")).toMatch(msg);
  });

  test("a CI hostname colliding with a service or a bad label is refused by the config", () => {
    const c = withCi(stackRaw("prod"));
    c.cloudflare.ciSsh.hostname = "grafana";
    expect(() => parseConfig(c)).toThrow(/cloudflare.ciSsh.hostname: "grafana" is also used by hostnames.grafana/);
    c.cloudflare.ciSsh.hostname = "SSH_";
    expect(() => parseConfig(c)).toThrow(/cloudflare.ciSsh.hostname: "SSH_" is not a DNS label/);
  });
});
