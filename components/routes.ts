/**
 * The route table: every public hostname → its backend (container and port) → who may enter.
 * Traefik labels, the tunnel's ingress, DNS records, Access applications/policies and the local-DNS output
 * are all derived from this one table, so no route can be public without an Access policy.
 */
import type { ServerConfig, ServiceName, UserConfig } from "./config";
import { GUACAMOLE_CONTAINERS, GUACAMOLE_IDENTITY_HEADER, GUACAMOLE_PORTS } from "./render/guacamole";
import { WORKSPACE_PORTS } from "./render/workspace-image";

/** Who may reach a route through Cloudflare Access. */
export type Audience =
  /** admins only (infrastructure: dashboards, metrics, container control) */
  | { kind: "admins" }
  /** the whole team: allowed Workspace domains and addresses */
  | { kind: "team" }
  /** one user (and the admins) */
  | { kind: "user"; user: string };

export interface Route {
  /** Stable id, used in resource names: `grafana`, `alice-code`. */
  id: string;
  /** Fully qualified hostname, e.g. `grafana.example.com`. */
  hostname: string;
  /** Docker container name of the backend on the services network. */
  container: string;
  /** Port the backend listens on inside its container. */
  port: number;
  audience: Audience;
  /**
   * Where a request for the bare hostname (`/`) is sent: Traefik answers `/` with a relative redirect here. The
   * per-user TensorBoard lives at code-server's authenticated `/absproxy/6006/`, so the hostname opens it directly.
   */
  entryPath?: string;
  /**
   * Request headers the backend trusts as the signed-in identity, set by Cloudflare Access on the tunnel path:
   * the LAN routers (no Access there) remove them, so no LAN client can claim to be someone.
   */
  identityHeaders?: string[];
}

/** The backends of the shared services: container name and internal port. */
export const SERVICE_BACKENDS: Record<ServiceName, { container: string; port: number; audience: Audience["kind"] }> = {
  traefik: { container: "traefik", port: 8080, audience: "admins" },
  netdata: { container: "netdata", port: 19999, audience: "admins" },
  prometheus: { container: "prometheus", port: 9090, audience: "admins" },
  grafana: { container: "grafana", port: 3000, audience: "admins" },
  portainer: { container: "portainer", port: 9000, audience: "admins" },
  dozzle: { container: "dozzle", port: 8080, audience: "admins" },
  tensorboard: { container: "tensorboard", port: 6006, audience: "team" },
  filebrowser: { container: "filebrowser", port: 80, audience: "team" },
  // the browser desktop: who sees which desktop is Guacamole's own permissions (each user their own, admins all)
  guacamole: { container: GUACAMOLE_CONTAINERS.web, port: GUACAMOLE_PORTS.web, audience: "team" },
};

/** Identity headers per service backend (see Route.identityHeaders). */
const SERVICE_IDENTITY_HEADERS: Partial<Record<ServiceName, string[]>> = { guacamole: [GUACAMOLE_IDENTITY_HEADER] };

/**
 * Per-user web routes of a workspace container: suffix → the port Traefik sends to, and the entry path of `/`.
 * The user's TensorBoard has no login of its own, so it listens on the workspace's loopback only and is reached
 * through code-server's authenticated port proxy (`/absproxy/<port>/`: the path is passed on whole, and TensorBoard
 * runs with that path prefix): other workspaces on the services network cannot open it without the password.
 */
export const WORKSPACE_ROUTES: Record<string, { port: number; entryPath?: string }> = {
  code: { port: WORKSPACE_PORTS.codeServer },
  jupyter: { port: WORKSPACE_PORTS.jupyter },
  tensorboard: { port: WORKSPACE_PORTS.codeServer, entryPath: `/absproxy/${WORKSPACE_PORTS.tensorboard}/` },
};

/** The route suffixes of a user (`<user>-<suffix>.<domain>`). */
export const WORKSPACE_ROUTE_SUFFIXES = Object.keys(WORKSPACE_ROUTES);

/** Container name of a user's workspace. */
export function workspaceContainer(user: Pick<UserConfig, "name">): string {
  return `workspace-${user.name}`;
}

/** The whole route table of a server, services first, then users by uid. */
export function buildRoutes(config: ServerConfig): Route[] {
  const routes: Route[] = [];
  for (const [svc, b] of Object.entries(SERVICE_BACKENDS) as Array<[ServiceName, (typeof SERVICE_BACKENDS)[ServiceName]]>) {
    if (svc === "guacamole" && !config.workspace.guacamole) continue;
    const label = config.hostnames[svc];
    routes.push({
      id: svc,
      hostname: `${label}.${config.domain}`,
      container: b.container,
      port: b.port,
      audience: b.audience === "team" ? { kind: "team" } : { kind: "admins" },
      ...(SERVICE_IDENTITY_HEADERS[svc] ? { identityHeaders: SERVICE_IDENTITY_HEADERS[svc] } : {}),
    });
  }
  for (const u of [...config.users].sort((a, b) => a.uid - b.uid)) {
    for (const [suffix, { port, entryPath }] of Object.entries(WORKSPACE_ROUTES)) {
      routes.push({
        id: `${u.name}-${suffix}`,
        hostname: `${u.name}-${suffix}.${config.domain}`,
        container: workspaceContainer(u),
        port,
        audience: { kind: "user", user: u.name },
        ...(entryPath ? { entryPath } : {}),
      });
    }
  }
  return routes;
}

/** The e-mail addresses an audience admits (domains are separate: see `audienceDomains`). */
export function audienceEmails(config: ServerConfig, audience: Audience): string[] {
  const admins = config.users.filter((u) => u.admin).map((u) => u.email);
  switch (audience.kind) {
    case "admins":
      return [...new Set(admins)].sort();
    case "team":
      return [...new Set([...config.cloudflare.allowedEmails.map((e) => e.toLowerCase()), ...config.users.map((u) => u.email)])].sort();
    case "user": {
      const u = config.users.find((x) => x.name === audience.user);
      if (!u) throw new Error(`route audience names unknown user ${audience.user}`);
      return [...new Set([u.email, ...admins])].sort();
    }
  }
}

/** Workspace domains an audience admits (only the team audience admits whole domains). */
export function audienceDomains(config: ServerConfig, audience: Audience): string[] {
  return audience.kind === "team" ? [...config.cloudflare.allowedDomains].sort() : [];
}

/** A readable description of who may enter, for notes and the plan. */
export function describeAudience(config: ServerConfig, audience: Audience): string {
  const emails = audienceEmails(config, audience);
  const domains = audienceDomains(config, audience).map((d) => `*@${d}`);
  return [...domains, ...emails].join(", ");
}
