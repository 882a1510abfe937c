/**
 * Helpers for the Edge tests: run `new Edge(...)` under the mocks harness, a seeded generator of valid
 * configs, and the checker of THE invariant (no hostname through the tunnel without an Access application
 * covering exactly it, whose allow policy names who may enter, through the Google IdP only).
 */
import * as pulumi from "@pulumi/pulumi";
import { parseConfig, RESERVED_USERNAMES, ServerConfig, SERVICE_NAMES } from "../../components/config";
import { AccessEntry, Edge, EdgeArgs } from "../../components/edge";
import { Registered, RunResult, runUnderMocks } from "../../tools/harness";
import { clone, stackRaw } from "./program";

export const T = {
  tunnel: "cloudflare:index/zeroTrustTunnelCloudflared:ZeroTrustTunnelCloudflared",
  tunnelConfig: "cloudflare:index/zeroTrustTunnelCloudflaredConfig:ZeroTrustTunnelCloudflaredConfig",
  dns: "cloudflare:index/dnsRecord:DnsRecord",
  app: "cloudflare:index/zeroTrustAccessApplication:ZeroTrustAccessApplication",
  policy: "cloudflare:index/zeroTrustAccessPolicy:ZeroTrustAccessPolicy",
  idp: "cloudflare:index/zeroTrustAccessIdentityProvider:ZeroTrustAccessIdentityProvider",
  password: "random:index/randomPassword:RandomPassword",
  serviceToken: "cloudflare:index/zeroTrustAccessServiceToken:ZeroTrustAccessServiceToken",
} as const;

export const GOOGLE_SECRET = "test-google-client-secret-value";

/** The Edge's outputs, resolved. */
export interface EdgeOutputs {
  tunnelId: string;
  tunnelToken: string;
  tokenIsSecret: boolean;
  hostnames: string[];
  localDns: { hosts: string; dnsmasq: string };
  accessTable: Record<string, AccessEntry>;
}

/** Run one Edge under mocks; returns the registered resources and its resolved outputs. */
export async function runEdge(config: ServerConfig, extra: Partial<EdgeArgs> = {}): Promise<RunResult<EdgeOutputs>> {
  const run = await runUnderMocks(() => {
    const edge = new Edge("edge", { config, googleClientSecret: pulumi.secret(GOOGLE_SECRET), ...extra });
    return {
      tunnelId: edge.tunnelId,
      tunnelToken: edge.tunnelToken,
      tokenIsSecret: pulumi.isSecret(edge.tunnelToken),
      hostnames: edge.hostnames,
      localDns: edge.localDns,
      accessTable: edge.accessTable,
    };
  }, {});
  return run as unknown as RunResult<EdgeOutputs>;
}

/** Who an application admits, as read back from the registered resources. */
export interface Admission {
  emails: string[];
  domains: string[];
}

/**
 * Check the invariant over what one Edge registered. Returns every violation found (empty = holds) and, per
 * published hostname, who its application admits. Under the harness mocks a resource's id is its `name` input,
 * which is how application → policy and → IdP references are resolved here.
 */
export function checkInvariant(res: Registered[]): { violations: string[]; admits: Map<string, Admission> } {
  const v: string[] = [];
  const admits = new Map<string, Admission>();
  const of = (t: string) => res.filter((r) => r.type === t);
  const [tunnel] = of(T.tunnel);
  const configs = of(T.tunnelConfig);
  const idps = of(T.idp);
  if (!tunnel || of(T.tunnel).length !== 1) v.push(`expected one tunnel, got ${of(T.tunnel).length}`);
  if (configs.length !== 1) v.push(`expected one tunnel config, got ${configs.length}`);
  if (idps.length !== 1 || idps[0].inputs.type !== "google-apps") v.push("expected one google-apps identity provider");
  const idpId = idps[0]?.inputs.name;
  const policyById = new Map(of(T.policy).map((p) => [p.inputs.name, p]));
  // a non_identity policy is CI's alone: exactly one include, one service token this program created
  const tokenIds = new Set(of(T.serviceToken).map((t) => t.inputs.name));
  const isTokenPolicy = (p: Registered) =>
    p.inputs.decision === "non_identity" &&
    JSON.stringify(Object.keys(p.inputs.includes?.[0] ?? {})) === JSON.stringify(["serviceToken"]) &&
    p.inputs.includes.length === 1 &&
    tokenIds.has(p.inputs.includes[0].serviceToken.tokenId);
  for (const p of of(T.policy)) if (p.inputs.decision !== "allow" && !isTokenPolicy(p)) v.push(`policy ${p.name} decides ${p.inputs.decision}, not allow`);

  const ingresses: Array<{ hostname?: string; service: string }> = configs[0]?.inputs.config?.ingresses ?? [];
  if (configs[0] && configs[0].inputs.tunnelId !== tunnel?.inputs.name) v.push("the tunnel config is not the tunnel's");
  const last = ingresses[ingresses.length - 1];
  if (!last || last.hostname !== undefined || last.service !== "http_status:404") v.push("the last ingress rule is not the catch-all http_status:404");
  const rules = ingresses.slice(0, -1);
  const hostnames = rules.map((r) => r.hostname);
  for (const r of rules) {
    if (!r.hostname) v.push(`an ingress rule before the catch-all has no hostname (service ${r.service}): it would catch everything`);
    if (r.service === "http_status:404") v.push("a second catch-all before the end");
  }
  if (new Set(hostnames).size !== hostnames.length) v.push("an ingress hostname appears twice");

  const apps = of(T.app);
  for (const h of hostnames) {
    if (!h) continue;
    if (h.includes("*")) v.push(`ingress hostname ${h} is a wildcard`);
    const covering = apps.filter((a) => a.inputs.domain === h || (a.inputs.destinations ?? []).some((d: any) => d.uri === h));
    if (covering.length !== 1) {
      v.push(`${h}: ${covering.length} Access applications cover it (want exactly 1)`);
      continue;
    }
    const a = covering[0].inputs;
    const service = rules.find((r) => r.hostname === h)!.service;
    if (service.startsWith("ssh://")) {
      // CI's SSH route: the host's own sshd, opened only by the service token (no person, no IdP)
      if (!/^ssh:\/\/localhost:\d+$/.test(service)) v.push(`${h}: ssh ingress ${service} is not the host's own sshd`);
      const pols = (a.policies ?? []) as Array<{ id: string }>;
      const p = pols.length === 1 ? policyById.get(pols[0].id) : undefined;
      if (!p || !isTokenPolicy(p)) v.push(`${h}: an ssh route must admit exactly one service token of this program`);
      if (a.type !== "self_hosted" || a.domain !== h) v.push(`${h}: ssh application is not self_hosted on exactly ${h}`);
      admits.set(h, { emails: [], domains: [] });
      continue;
    }
    if (!service.startsWith("http://")) v.push(`${h}: ingress service ${service} is neither the HTTP path to Traefik nor CI's ssh`);
    if (a.type !== "self_hosted") v.push(`${h}: application type ${a.type}`);
    if (a.domain !== h) v.push(`${h}: application domain is ${a.domain}`);
    if (JSON.stringify(a.destinations) !== JSON.stringify([{ type: "public", uri: h }])) v.push(`${h}: application destinations are not exactly [public ${h}]`);
    if (JSON.stringify(a.allowedIdps) !== JSON.stringify([idpId])) v.push(`${h}: allowedIdps is not exactly the Google IdP`);
    if (a.autoRedirectToIdentity !== true) v.push(`${h}: no autoRedirectToIdentity`);
    const pols = (a.policies ?? []) as Array<{ id: string; precedence: number }>;
    if (pols.length === 0) v.push(`${h}: application has no policy`);
    const who: Admission = { emails: [], domains: [] };
    for (const ref of pols) {
      const p = policyById.get(ref.id);
      if (!p) {
        v.push(`${h}: application references unknown policy ${ref.id}`);
        continue;
      }
      const includes = (p.inputs.includes ?? []) as any[];
      if (includes.length === 0) v.push(`${h}: policy ${p.name} has no include rule`);
      for (const inc of includes) {
        const keys = Object.keys(inc);
        if (keys.length === 1 && keys[0] === "email" && inc.email.email) who.emails.push(inc.email.email);
        else if (keys.length === 1 && keys[0] === "emailDomain" && inc.emailDomain.domain) who.domains.push(inc.emailDomain.domain);
        else v.push(`${h}: policy ${p.name} includes something other than a named address or domain: ${JSON.stringify(inc)}`);
      }
      if (JSON.stringify(p.inputs.requires) !== JSON.stringify([{ loginMethod: { id: idpId } }]))
        v.push(`${h}: policy ${p.name} does not require the Google login method`);
    }
    admits.set(h, { emails: [...new Set(who.emails)].sort(), domains: [...new Set(who.domains)].sort() });
  }

  const target = `${tunnel?.inputs.name}.cfargotunnel.com`;
  const dns = of(T.dns);
  for (const d of dns) {
    const i = d.inputs;
    if (i.type !== "CNAME" || i.proxied !== true || i.content !== target) v.push(`DNS ${i.name} is not a proxied CNAME to the tunnel`);
    if (!hostnames.includes(i.name)) v.push(`DNS ${i.name} has no ingress rule`);
  }
  for (const h of hostnames) if (dns.filter((d) => d.inputs.name === h).length !== 1) v.push(`${h}: not exactly one DNS record`);
  return { violations: v, admits };
}

/** A small deterministic PRNG (mulberry32). */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDm+MDWku3UWnMtuEXlaaEnTgoPOudIW7KRhtgJVKB1k gen@test";

/**
 * A random valid raw config (keys without namespace), built on the prod stack: 1–30 users with random names,
 * uids, admin flags and addresses; random hostname overrides, domains, allowed domains/addresses, MFA and
 * session settings. Valid by construction; `parseConfig` of it must succeed.
 */
export function randomRaw(seed: number): Record<string, any> {
  const r = rng(seed);
  const int = (lo: number, hi: number) => lo + Math.floor(r() * (hi - lo + 1));
  const pick = <X>(xs: readonly X[]): X => xs[int(0, xs.length - 1)];
  const letters = "abcdefghijklmnopqrstuvwxyz".split("");
  const alnum = [...letters, ..."0123456789".split("")];
  const word = (min: number, max: number) => Array.from({ length: int(min, max) }, (_, i) => pick(i === 0 ? letters : alnum)).join("");
  const raw = clone(stackRaw("prod"));
  const domain = `${word(2, 10)}.${pick(["com", "org", "io", "dev", "co.uk", "ai"])}`;
  const extraDomains = Array.from({ length: int(0, 2) }, () => `${word(2, 8)}.${pick(["com", "net", "de"])}`).filter((d) => d !== domain);
  const useDomains = r() < 0.8;
  const allowedDomains = useDomains ? [...new Set([domain, ...extraDomains])] : [];
  const allowedEmails: string[] = Array.from({ length: int(0, 3) }, () => `${word(2, 8)}@${word(3, 8)}.org`);

  // service hostnames: about half overridden, unique, never ending like a user route
  const labels = new Set<string>();
  const hostnames: Record<string, string> = {};
  const defaults: Record<string, string> = { traefik: "traefik", netdata: "health", prometheus: "prometheus", grafana: "grafana", tensorboard: "tensorboard", filebrowser: "files", dozzle: "logs", portainer: "portainer" };
  for (const svc of SERVICE_NAMES) {
    let label = defaults[svc];
    if (r() < 0.5) label = `${word(1, 6)}${pick(["", "-", ""])}${word(1, 5)}`;
    while (labels.has(label) || /-(code|jupyter)$/.test(label)) label = `${word(3, 8)}`;
    labels.add(label);
    if (label !== defaults[svc]) hostnames[svc] = label;
  }

  const n = int(1, 30);
  const names = new Set<string>();
  const uids = new Set<number>();
  const emails = new Set<string>();
  const users: any[] = [];
  while (users.length < n) {
    const name = `${word(1, 5)}${pick(["", "", "-"])}${word(1, 4)}`;
    if (names.has(name) || RESERVED_USERNAMES.has(name) || name === raw.host.sshUser) continue;
    if (labels.has(`${name}-code`) || labels.has(`${name}-jupyter`)) continue;
    const uid = int(1000, 59999);
    // SSH port 2222+slot and desktop port 4000+slot of two users must not meet: uids 1778 apart collide
    if (uids.has(uid) || uids.has(uid - 1778) || uids.has(uid + 1778)) continue;
    const outside = !useDomains || r() < 0.15;
    const email = outside ? `${name}@${word(3, 8)}.net` : `${name}@${pick(allowedDomains)}`;
    if (emails.has(email)) continue;
    if (outside) allowedEmails.push(email);
    names.add(name);
    uids.add(uid);
    emails.add(email);
    users.push({ name, uid, email, admin: r() < 0.25, sshKeys: [KEY] });
  }
  if (!users.some((u) => u.admin)) users[int(0, users.length - 1)].admin = true;

  const o1 = int(1, 254), o2 = int(0, 255), o3 = int(1, 254);
  raw.host = { ...raw.host, lanCidr: "10.0.0.0/8", lanAddress: `10.${o1}.${o2}.${o3}` };
  raw.resources = { ...raw.resources, memoryGuaranteeGb: 4 };
  raw.users = users;
  raw.domain = domain;
  raw.hostnames = hostnames;
  raw.cloudflare = {
    ...raw.cloudflare,
    allowedDomains,
    allowedEmails: [...new Set(allowedEmails)],
    requireMfa: r() < 0.7,
    sessionDuration: r() < 0.5 ? `${int(1, 72)}h` : `${int(5, 600)}m`,
    tunnelName: `ts-${word(1, 10)}`,
  };
  // drawn last, so the rest of a seed's config is what it was before the key existed
  if (r() < 0.4) raw.host.adminSources = [`10.${o1}.${o2}.${int(1, 254)}/32`, ...(r() < 0.5 ? [`10.${o1}.${int(0, 255)}.0/24`] : [])];
  return raw;
}

/** The parsed config of `randomRaw(seed)`; throws (with the seed) if the generator made an invalid one. */
export function randomConfig(seed: number): ServerConfig {
  try {
    return parseConfig(randomRaw(seed));
  } catch (e) {
    throw new Error(`generated config for seed ${seed} is invalid: ${(e as Error).message}`);
  }
}
