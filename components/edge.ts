/**
 * Edge: everything Cloudflare does for one server, derived from the route table (components/routes.ts):
 *   - a remotely managed tunnel (ZeroTrustTunnelCloudflared, configSrc "cloudflare") with a generated secret,
 *     and its ingress: one rule per route hostname → Traefik, then the catch-all `http_status:404`;
 *   - a proxied CNAME per route hostname → `<tunnel id>.cfargotunnel.com` (no wildcard);
 *   - Cloudflare Access: the Google Workspace identity provider, one reusable allow policy per audience
 *     (admins, team, one per user) and one self-hosted application per route hostname;
 *   - the local-DNS bypass for office users (hosts block and dnsmasq snippet, see render/localdns.ts);
 *   - optionally (`cloudflare.ciSsh`) CI's way in: `<hostname>.<domain>` → the host's sshd (`ssh://localhost:<port>`,
 *     cloudflared runs in the host network), behind an application whose only policy admits one service token
 *     created here (non_identity: no person, no IdP); its id and secret are stack outputs for the CI secrets.
 *     Managed here because the tunnel configuration replaces the whole ingress list on every change: a route
 *     added by hand in the dashboard would be deleted by the next user added.
 *
 * The invariant (tests/unit/edge.test.ts proves it over prod and hundreds of generated configs): no hostname
 * is reachable through the tunnel without an Access application covering exactly that hostname, whose
 * policy admits a non-empty, named set of people, through the Google IdP only. A route whose audience admits
 * nobody (the admin routes of a server without users) is not published at all.
 *
 * Ordering: each DNS record and the tunnel ingress depend on the Access applications they expose, so on create
 * the application exists before the name resolves, and on removal the name goes before the application.
 *
 * Prerequisites in the Cloudflare account (one-time, outside this program): a Zero Trust organisation; with
 * `requireMfa`, Access independent MFA allowed in Access settings (the policies' mfaConfig needs it); the API
 * token may edit Tunnels, DNS of the zone, and Access apps/policies/IdPs.
 */
import * as cloudflare from "@pulumi/cloudflare";
import * as command from "@pulumi/command";
import * as pulumi from "@pulumi/pulumi";
import * as random from "@pulumi/random";
import type { ServerConfig } from "./config";
import { LocalDnsParams, renderDnsmasq, renderHostsBlock } from "./render/localdns";
import { lanAccess, TRAEFIK_TUNNEL_URL } from "./render/services";
import { Audience, audienceDomains, audienceEmails, buildRoutes, describeAudience, Route } from "./routes";

/** CI's SSH route (stack output `ciSsh`): where it is and the service token that opens it (a secret). */
export interface CiSshAccess {
  hostname: string;
  service: string;
  clientId: pulumi.Output<string>;
  clientSecret: pulumi.Output<string>;
}

/** The ingress service of CI's SSH route: the host's own sshd, as cloudflared (host network) reaches it. */
export function ciSshService(config: ServerConfig): string {
  return `ssh://localhost:${config.host.sshPort}`;
}

/**
 * The delete command of the tunnel's connection cleanup: Cloudflare refuses to delete a tunnel that still has
 * connections (cloudflare/terraform-provider-cloudflare#5255) and the provider does not clean them up. Runs on the
 * admin's machine (or CI) after the cloudflared container is gone and before the tunnel is deleted: DELETE
 * .../cfd_tunnel/<id>/connections, with the Cloudflare provider's token (`cloudflare:apiToken`, else
 * CLOUDFLARE_API_TOKEN). 200 (cleaned) and 404 (tunnel or connections already gone) pass; anything else fails the
 * destroy with the API's answer, before the tunnel delete would fail less clearly.
 */
export const TUNNEL_CLEANUP_DELETE = [
  'tok=${TS_CF_TOKEN:-${CLOUDFLARE_API_TOKEN:-}}',
  '[ -n "$tok" ] || { echo "tunnel cleanup: no Cloudflare API token (cloudflare:apiToken or CLOUDFLARE_API_TOKEN)" >&2; exit 1; }',
  'base=${TS_CF_BASE_URL:-https://api.cloudflare.com/client/v4}',
  'out=$(mktemp); trap \'rm -f "$out"\' EXIT',
  'code=$(curl -sS -o "$out" -w "%{http_code}" -X DELETE -H "Authorization: Bearer $tok" "$base/accounts/$TS_ACCOUNT_ID/cfd_tunnel/$TS_TUNNEL_ID/connections") || exit 1',
  'case $code in 200|404) echo "tunnel $TS_TUNNEL_ID: connections cleaned up ($code)" ;; *) echo "tunnel cleanup: HTTP $code: $(head -c 500 "$out")" >&2; exit 1 ;; esac',
].join("\n");

export interface EdgeArgs {
  config: ServerConfig;
  /** OAuth client secret of the Google Workspace identity provider (stack secret `googleClientSecret`). */
  googleClientSecret: pulumi.Output<string>;
  /**
   * Where the cloudflared connector sends every request. Default TRAEFIK_TUNNEL_URL (http://127.0.0.1:81):
   * Traefik's tunnel entrypoint, published on the host's loopback only (cloudflared runs in the host network);
   * Traefik routes by Host header.
   */
  traefikUrl?: string;
}

/** One row of the access table: a published route and who may enter it through Cloudflare. */
export interface AccessEntry {
  hostname: string;
  /** `container:port` behind Traefik. */
  backend: string;
  audience: Audience["kind"];
  /** `*@domain` entries and addresses admitted (admins included on user routes). */
  admits: string;
}

export const DEFAULT_TRAEFIK_URL = TRAEFIK_TUNNEL_URL;
/** Authenticators offered for Access independent MFA (Cloudflare API values). */
export const MFA_AUTHENTICATORS = ["totp", "biometrics", "security_key"];

/** The routes published through the tunnel: every route whose audience admits at least one person. */
export function publishedRoutes(config: ServerConfig): Route[] {
  return buildRoutes(config).filter(
    (r) => audienceEmails(config, r.audience).length + audienceDomains(config, r.audience).length > 0,
  );
}

/** Stable key of an audience: the suffix of its policy's resource name (`admins`, `team`, `user-alice`). */
export function audienceKey(a: Audience): string {
  return a.kind === "user" ? `user-${a.user}` : a.kind;
}

/** Route id → hostname → backend → who may enter (for the operator's note). */
export function accessTable(config: ServerConfig): Record<string, AccessEntry> {
  return Object.fromEntries(
    publishedRoutes(config).map((r) => [
      r.id,
      { hostname: r.hostname, backend: `${r.container}:${r.port}`, audience: r.audience.kind, admits: describeAudience(config, r.audience) },
    ]),
  );
}

/**
 * What the local-DNS outputs list: the published hostnames the LAN entrypoint serves (team and user routes, and
 * admin routes only when host.adminSources is set), with a note on the admin hostnames either way. Admin
 * hostnames are left out by default so that office admins resolve them publicly and go through the tunnel
 * (listed, they would reach the LAN entrypoint, which does not serve them: 404).
 */
export function localDnsParams(config: ServerConfig): LocalDnsParams {
  const policy = { adminSources: config.host.adminSources };
  const routes = publishedRoutes(config);
  const admin = routes.filter((r) => r.audience.kind === "admins").map((r) => r.hostname);
  const lan = routes.filter((r) => lanAccess(r, policy) !== "nobody").map((r) => r.hostname);
  const notes = admin.length === 0
    ? []
    : policy.adminSources.length > 0
      ? [
          `admin hostnames (${admin.join(" ")}) answer on the LAN only to host.adminSources ${policy.adminSources.join(" ")};`,
          "any other LAN address gets 403 (use the public names, through Cloudflare Access, from there)",
        ]
      : [`admin hostnames (${admin.join(" ")}) are not listed: they are served only through the tunnel (Cloudflare Access)`];
  return { address: config.host.lanAddress, hostnames: lan, label: config.domain, notes };
}

/**
 * The Google Workspace domain of the identity provider (`appsDomain`): the first allowed domain, else the
 * domain of the first admin's address, else of the first allowed address. Workspace secondary domains sign in
 * through the primary one; addresses outside the Workspace cannot sign in through this IdP.
 */
export function workspaceDomain(config: ServerConfig): string {
  const first = config.cloudflare.allowedDomains[0];
  if (first) return first;
  const email = config.users.find((u) => u.admin)?.email ?? config.cloudflare.allowedEmails[0];
  if (!email) throw new Error("cloudflare: no Google Workspace domain: set cloudflare.allowedDomains");
  return email.split("@")[1].toLowerCase();
}

/**
 * The token `cloudflared tunnel run --token` takes: base64 of the JSON {a: account id, t: tunnel id,
 * s: tunnel secret (base64)} — cloudflared's `connection.TunnelToken`, whose `s` is a []byte and so travels as
 * base64 in JSON. Computed here rather than read with the token invoke: the secret is ours (generated below),
 * so the token is a pure function of values we already hold; no extra API call on every preview and update.
 */
export function tunnelToken(accountId: string, tunnelId: string, tunnelSecretB64: string): string {
  return Buffer.from(JSON.stringify({ a: accountId, t: tunnelId, s: tunnelSecretB64 }), "utf8").toString("base64");
}

/** Include rules of an audience: each admitted address, and each admitted Workspace domain. */
function includesFor(config: ServerConfig, a: Audience): cloudflare.types.input.ZeroTrustAccessPolicyInclude[] {
  return [
    ...audienceDomains(config, a).map((domain) => ({ emailDomain: { domain } })),
    ...audienceEmails(config, a).map((email) => ({ email: { email } })),
  ];
}

export class Edge extends pulumi.ComponentResource {
  readonly tunnelId: pulumi.Output<string>;
  /** What the cloudflared connector runs with (`TUNNEL_TOKEN`). A secret. */
  readonly tunnelToken: pulumi.Output<string>;
  /** Every published hostname, in route-table order. */
  readonly hostnames: string[];
  readonly localDns: { hosts: string; dnsmasq: string };
  readonly accessTable: Record<string, AccessEntry>;
  /** CI's SSH route, when `cloudflare.ciSsh` is set. */
  readonly ciSsh?: CiSshAccess;
  /**
   * The tunnel's connection cleanup (a local command whose delete clears the tunnel's connections). The cloudflared
   * container depends on it, so a destroy stops the connector (gracefully) first, then cleans up, then deletes
   * the tunnel.
   */
  readonly tunnelCleanup: command.local.Command;

  constructor(name: string, args: EdgeArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:edge:Edge", name, {}, opts);
    const { config } = args;
    const cf = config.cloudflare;
    const accountId = cf.accountId;
    const child = { parent: this };
    const routes = publishedRoutes(config);
    this.hostnames = routes.map((r) => r.hostname);
    this.accessTable = accessTable(config);
    // local-DNS bypass for the office LAN (see the trade-off in render/localdns.ts); rendered first, as its
    // checks (IPv4 address, lowercase FQDNs) refuse a bad hostname before any Cloudflare resource is declared
    const local = localDnsParams(config);
    this.localDns = { hosts: renderHostsBlock(local), dnsmasq: renderDnsmasq(local) };

    // --- tunnel: remotely managed, with a secret we generate (48 alphanumerics ≈ 285 bits, sent as 48 bytes) ---
    const secretSeed = new random.RandomPassword(`${name}-tunnel-secret`, { length: 48, special: false }, child);
    const tunnelSecret = pulumi.secret(secretSeed.result.apply((s) => Buffer.from(s, "utf8").toString("base64")));
    const tunnel = new cloudflare.ZeroTrustTunnelCloudflared(
      `${name}-tunnel`,
      { accountId, name: cf.tunnelName, configSrc: "cloudflare", tunnelSecret },
      child,
    );
    this.tunnelId = tunnel.id;
    const cfConfig = new pulumi.Config("cloudflare");
    const apiToken = cfConfig.getSecret("apiToken");
    const baseUrl = cfConfig.get("baseUrl");
    this.tunnelCleanup = new command.local.Command(
      `${name}-tunnel-cleanup`,
      {
        create: "true",
        delete: TUNNEL_CLEANUP_DELETE,
        interpreter: ["/bin/bash", "-c"],
        environment: {
          TS_ACCOUNT_ID: accountId,
          TS_TUNNEL_ID: tunnel.id,
          ...(apiToken ? { TS_CF_TOKEN: apiToken } : {}),
          ...(baseUrl ? { TS_CF_BASE_URL: baseUrl } : {}),
        },
      },
      { parent: this, dependsOn: [tunnel] },
    );
    this.tunnelToken = pulumi.secret(pulumi.all([tunnel.id, tunnelSecret]).apply(([id, s]) => tunnelToken(accountId, id, s)));

    // --- Access: Google Workspace IdP, one policy per audience, one application per hostname ---
    const idp = new cloudflare.ZeroTrustAccessIdentityProvider(
      `${name}-google`,
      {
        accountId,
        name: `${cf.tunnelName} Google Workspace`,
        type: "google-apps",
        config: { clientId: cf.googleClientId, clientSecret: pulumi.secret(args.googleClientSecret), appsDomain: workspaceDomain(config) },
      },
      child,
    );
    // MFA: Cloudflare honours IdP-reported MFA (the `amr` claim, `require auth_method: mfa`) only for Okta,
    // Entra ID, generic OIDC and SAML — not for this Google Workspace IdP, where that rule would deny everyone.
    // Access independent MFA (the policy's mfaConfig) asks for a second factor in Access itself instead.
    const mfaConfig = cf.requireMfa
      ? { mfaDisabled: false, allowedAuthenticators: MFA_AUTHENTICATORS, sessionDuration: cf.sessionDuration }
      : undefined;
    const policies = new Map<string, cloudflare.ZeroTrustAccessPolicy>();
    for (const r of routes) {
      const key = audienceKey(r.audience);
      if (policies.has(key)) continue;
      policies.set(
        key,
        new cloudflare.ZeroTrustAccessPolicy(
          `${name}-policy-${key}`,
          {
            accountId,
            name: `${cf.tunnelName} ${key}`,
            decision: "allow",
            includes: includesFor(config, r.audience),
            // only identities asserted by the Google IdP count (no one-time PIN, no other IdP)
            requires: [{ loginMethod: { id: idp.id } }],
            ...(mfaConfig ? { mfaConfig } : {}),
          },
          child,
        ),
      );
    }
    const apps = new Map<string, cloudflare.ZeroTrustAccessApplication>();
    for (const r of routes) {
      const policy = policies.get(audienceKey(r.audience))!;
      apps.set(
        r.id,
        new cloudflare.ZeroTrustAccessApplication(
          `${name}-app-${r.id}`,
          {
            accountId,
            name: `${cf.tunnelName} ${r.id}`,
            type: "self_hosted",
            domain: r.hostname,
            destinations: [{ type: "public", uri: r.hostname }],
            policies: [{ id: policy.id, precedence: 1 }],
            allowedIdps: [idp.id],
            autoRedirectToIdentity: true,
            sessionDuration: cf.sessionDuration,
            httpOnlyCookieAttribute: true,
          },
          // a renamed hostname gets a new application first; the old one goes only after the ingress and the
          // DNS record (which depend on it) stopped naming the old hostname
          { parent: this, replaceOnChanges: ["domain", "destinations"] },
        ),
      );
    }

    // --- CI's SSH route (optional): one application, admitting only the program's own service token ---
    const ciRules: Array<{ hostname: string; service: string }> = [];
    const ciDeps: pulumi.Resource[] = [];
    if (cf.ciSsh) {
      const hostname = `${cf.ciSsh.hostname}.${config.domain}`;
      const token = new cloudflare.ZeroTrustAccessServiceToken(
        `${name}-ci-token`,
        { accountId, name: `${cf.tunnelName} CI`, duration: cf.ciSsh.tokenDuration },
        { parent: this, additionalSecretOutputs: ["clientSecret"] },
      );
      const policy = new cloudflare.ZeroTrustAccessPolicy(
        `${name}-policy-ci`,
        { accountId, name: `${cf.tunnelName} ci`, decision: "non_identity", includes: [{ serviceToken: { tokenId: token.id } }] },
        child,
      );
      const app = new cloudflare.ZeroTrustAccessApplication(
        `${name}-app-ci-ssh`,
        {
          accountId,
          name: `${cf.tunnelName} ci-ssh`,
          type: "self_hosted",
          domain: hostname,
          destinations: [{ type: "public", uri: hostname }],
          policies: [{ id: policy.id, precedence: 1 }],
          sessionDuration: cf.sessionDuration,
          httpOnlyCookieAttribute: true,
        },
        { parent: this, replaceOnChanges: ["domain", "destinations"] },
      );
      ciRules.push({ hostname, service: ciSshService(config) });
      ciDeps.push(app);
      new cloudflare.DnsRecord(
        `${name}-dns-ci-ssh`,
        { zoneId: cf.zoneId, name: hostname, type: "CNAME", content: pulumi.interpolate`${tunnel.id}.cfargotunnel.com`, proxied: true, ttl: 1, comment: "train-server CI ssh route" },
        { parent: this, dependsOn: [app] },
      );
      this.ciSsh = { hostname, service: ciSshService(config), clientId: token.clientId, clientSecret: pulumi.secret(token.clientSecret) };
    }

    // --- the tunnel's ingress: exactly the published hostnames, then 404 for anything else ---
    const traefik = args.traefikUrl ?? DEFAULT_TRAEFIK_URL;
    new cloudflare.ZeroTrustTunnelCloudflaredConfig(
      `${name}-tunnel-config`,
      {
        accountId,
        tunnelId: tunnel.id,
        source: "cloudflare",
        config: {
          ingresses: [
            // the Host header Traefik routes on is pinned to the hostname whose Access application admitted the request
            ...routes.map((r) => ({ hostname: r.hostname, service: traefik, originRequest: { httpHostHeader: r.hostname } })),
            ...ciRules,
            { service: "http_status:404" },
          ],
        },
      },
      { parent: this, dependsOn: [...apps.values(), ...ciDeps] },
    );

    // --- DNS: one proxied CNAME per hostname, created after (and removed before) its Access application ---
    for (const r of routes) {
      new cloudflare.DnsRecord(
        `${name}-dns-${r.id}`,
        {
          zoneId: cf.zoneId,
          name: r.hostname,
          type: "CNAME",
          content: pulumi.interpolate`${tunnel.id}.cfargotunnel.com`,
          proxied: true,
          ttl: 1,
          comment: `train-server route ${r.id}`,
        },
        { parent: this, dependsOn: [apps.get(r.id)!] },
      );
    }

    this.registerOutputs({
      tunnelId: this.tunnelId,
      tunnelToken: this.tunnelToken,
      hostnames: this.hostnames,
      localDns: this.localDns,
      accessTable: this.accessTable,
      ciSsh: this.ciSsh,
    });
  }
}
