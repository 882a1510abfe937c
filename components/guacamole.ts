/**
 * Guacamole: the browser desktop at `remote.<domain>` (README, "Browser desktop"). Three containers with pinned
 * images: guacd (the protocol proxy; on the services network, where it reaches each workspace's VNC port, and on
 * GUACD_NETWORK with the web app), the web app (on GUACAMOLE_NETWORK with Traefik and the database, and on
 * GUACD_NETWORK) and PostgreSQL (GUACAMOLE_NETWORK only; data under the array's docker-volumes/guacamole-db).
 * No workspace joins either Guacamole network. Then one host step (host-scripts/guacamole.sh) loads the schema
 * once and applies renderGuacamoleSql: one account per user (e-mail, generated password), one connection per
 * user to their own workspace, admins see all.
 *
 * Secrets (random provider, secret outputs): the database password (in an uploaded guacamole.properties and the
 * database's password file, never in an environment), each user's Guacamole password and salt, each workspace's
 * VNC password (Workspace.vncPassword). The provisioning SQL carries them: the step runs quiet (no output logged).
 */
import * as docker from "@pulumi/docker";
import * as pulumi from "@pulumi/pulumi";
import * as random from "@pulumi/random";
import type { ServerConfig } from "./config";
import { Host, HostScript } from "./host";
import {
  GUACAMOLE_CONTAINERS,
  GUACAMOLE_DB,
  GUACAMOLE_HOME,
  GUACAMOLE_NETWORK,
  GUACD_NETWORK,
  guacamoleWebEnv,
  GuacamoleUser,
  renderGuacamoleProperties,
  renderGuacamoleSql,
} from "./render/guacamole";
import { labelList, traefikLabels } from "./render/services";
import type { Route } from "./routes";
import { workspaceContainer } from "./routes";
import { containerLifecycle, SERVICE_IMAGES, SERVICE_STOP_GRACE_S } from "./services";

/** The uid the guacamole/guacamole image runs Tomcat as (the owner of the uploaded properties). */
export const GUACAMOLE_WEB_UID = "1001";
/** The uid of postgres in the official image (its data directory and password file). */
export const GUACAMOLE_DB_UID = "999";

export interface GuacamoleArgs {
  config: ServerConfig;
  host: Host;
  provider: docker.Provider;
  /** The services network (guacd reaches the workspaces there) and Guacamole's own network (SharedServices). */
  servicesNetwork: pulumi.Input<string>;
  guacamoleNetwork: pulumi.Input<string>;
  /** The guacamole route(s) of the route table. */
  routes: Route[];
  tunnelSources: pulumi.Input<string[]>;
  /** Each user's workspace VNC password (Workspace.vncPassword), by user name. */
  vncPasswords: Record<string, pulumi.Output<string>>;
  /** Steps that must finish first (the data directories, the workspaces). */
  after?: pulumi.Resource[];
}

export class Guacamole extends pulumi.ComponentResource {
  readonly containers: Record<string, docker.Container> = {};
  /** Each user's Guacamole password (the LAN path's login; through Access the e-mail header signs in). */
  readonly passwords: Record<string, pulumi.Output<string>> = {};
  readonly provision: HostScript;

  constructor(name: string, args: GuacamoleArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:guacamole:Guacamole", name, {}, opts);
    const { config } = args;
    const child = { parent: this, provider: args.provider };
    const guacdNet = new docker.Network(`${name}-guacd-network`, { name: GUACD_NETWORK, driver: "bridge", internal: true }, child);
    const dbPassword = new random.RandomPassword(`${name}-db-password`, { length: 32, special: false }, { parent: this });
    const data = `${config.storage.mountpoint}/docker-volumes/${GUACAMOLE_CONTAINERS.db}`;
    const make = (svc: string, a: docker.ContainerArgs) => {
      const grace = SERVICE_STOP_GRACE_S[svc];
      if (grace === undefined) throw new Error(`service ${svc} has no stop grace in SERVICE_STOP_GRACE_S`);
      this.containers[svc] = new docker.Container(
        `${name}-${svc}`,
        { name: svc, restart: "unless-stopped", usernsMode: "host", ...containerLifecycle(grace, a.healthcheck !== undefined), ...a },
        { ...child, deleteBeforeReplace: true, dependsOn: args.after ?? [] },
      );
      return this.containers[svc];
    };

    const db = make(GUACAMOLE_CONTAINERS.db, {
      image: SERVICE_IMAGES.guacamoleDb,
      networksAdvanced: [{ name: args.guacamoleNetwork, aliases: [GUACAMOLE_CONTAINERS.db] }],
      envs: [`POSTGRES_USER=${GUACAMOLE_DB.user}`, `POSTGRES_DB=${GUACAMOLE_DB.name}`, "POSTGRES_PASSWORD_FILE=/run/secrets/db-password"],
      uploads: [{ file: "/run/secrets/db-password", content: pulumi.secret(dbPassword.result), permissions: "0400", owner: GUACAMOLE_DB_UID }],
      volumes: [{ hostPath: data, containerPath: "/var/lib/postgresql/data" }],
      healthcheck: { tests: ["CMD", "pg_isready", "-q", "-U", GUACAMOLE_DB.user, "-d", GUACAMOLE_DB.name], interval: "30s", timeout: "5s", retries: 3 },
    });

    make(GUACAMOLE_CONTAINERS.guacd, {
      image: SERVICE_IMAGES.guacd,
      networksAdvanced: [
        { name: args.servicesNetwork, aliases: [GUACAMOLE_CONTAINERS.guacd] },
        { name: guacdNet.name, aliases: [GUACAMOLE_CONTAINERS.guacd] },
      ],
    });

    // no health check of ours for guacd and the web app: what their images ship is not verifiable here
    const web = make(GUACAMOLE_CONTAINERS.web, {
      image: SERVICE_IMAGES.guacamole,
      networksAdvanced: [
        { name: args.guacamoleNetwork, aliases: [GUACAMOLE_CONTAINERS.web] },
        { name: guacdNet.name, aliases: [GUACAMOLE_CONTAINERS.web] },
      ],
      envs: Object.entries(guacamoleWebEnv()).map(([k, v]) => `${k}=${v}`),
      uploads: [
        {
          file: `${GUACAMOLE_HOME}/guacamole.properties`,
          content: pulumi.secret(dbPassword.result.apply((p) => renderGuacamoleProperties({ dbPassword: p }))),
          permissions: "0400",
          owner: GUACAMOLE_WEB_UID,
        },
      ],
      // Traefik reaches it on Guacamole's network (the workspaces' network does not have it)
      labels: pulumi
        .output(args.tunnelSources)
        .apply((ts) => labelList({ ...traefikLabels(args.routes, { adminSources: config.host.adminSources, tunnelSources: ts }), "traefik.docker.network": GUACAMOLE_NETWORK })),
    });

    const users: pulumi.Output<GuacamoleUser>[] = [...config.users]
      .sort((a, b) => a.uid - b.uid)
      .map((u) => {
        const password = new random.RandomPassword(`${name}-${u.name}-password`, { length: 24, special: false }, { parent: this });
        const salt = new random.RandomId(`${name}-${u.name}-salt`, { byteLength: 32 }, { parent: this });
        this.passwords[u.name] = pulumi.secret(password.result);
        const vnc = args.vncPasswords[u.name];
        if (!vnc) throw new Error(`Guacamole: no VNC password for ${u.name}'s workspace`);
        return pulumi.all([password.result, salt.hex, vnc]).apply(([pw, saltHex, vncPassword]) => ({
          name: u.name,
          email: u.email.toLowerCase(),
          admin: u.admin,
          container: workspaceContainer(u),
          password: pw,
          saltHex,
          vncPassword,
        }));
      });
    const sql = pulumi.secret(pulumi.all(users).apply((list) => renderGuacamoleSql(list)));
    this.provision = new HostScript(
      `${name}-provision`,
      {
        host: args.host,
        script: "guacamole",
        env: { TS_DB_CONTAINER: GUACAMOLE_CONTAINERS.db, TS_DB_NAME: GUACAMOLE_DB.name, TS_DB_USER: GUACAMOLE_DB.user, TS_WEB_IMAGE: SERVICE_IMAGES.guacamole },
        files: { "provision.sql": sql },
        // the web image must be on the host: the schema is printed by its initdb.sh
        after: [db, web],
      },
      { parent: this },
    );
    this.registerOutputs({ containers: Object.keys(this.containers) });
  }
}
