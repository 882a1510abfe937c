/**
 * TrainServer: the root component. Composes everything one server needs, in dependency order, from one
 * validated ServerConfig:
 *
 *   Host → StorageArray → Operations → UserAccounts → HostBaseline → SharedServices → WorkspaceImage → Workspace × N
 *                                                               Edge (Cloudflare) ──tunnel token──┘
 *
 * Operations comes before the accounts because it mounts the Drive on <mountpoint>/shared: users.sh then makes
 * each user's /shared/tensorboard/<user> on the Drive itself, not in the directory the mount would hide.
 *
 * Nothing here is a module-level singleton, so a fleet later is a list of these.
 */
import * as pulumi from "@pulumi/pulumi";
import { HostBaseline } from "./baseline";
import type { ServerConfig, ServerSecrets } from "./config";
import { AccessEntry, Edge } from "./edge";
import { Guacamole } from "./guacamole";
import { Host } from "./host";
import { Operations } from "./operations";
import { TRAEFIK_TUNNEL_URL } from "./render/services";
import { buildRoutes, Route } from "./routes";
import { SharedServices } from "./services";
import { StorageArray } from "./storage";
import { UserAccounts } from "./users";
import { Workspace, WorkspaceImage, workspaceImageTag } from "./workspace";

export interface TrainServerArgs {
  config: ServerConfig;
  secrets: ServerSecrets;
}

/** Per-user facts exported by the stack. */
export interface UserOutputs {
  uid: number;
  sshPort: number;
  desktopPort: number;
  codeUrl: string;
  jupyterUrl: string;
  /** The user's own TensorBoard (their /shared/tensorboard/<user>), behind code-server's login. */
  tensorboardUrl: string;
  /** Password of the user's desktop, code-server (and so their TensorBoard) and Jupyter (a secret). */
  password: pulumi.Output<string>;
  /** The browser desktop (Guacamole): its URL, the user's login there (their e-mail), and its password for the LAN
   * path (through Cloudflare Access the e-mail signs in without it; a secret). */
  remoteUrl?: string;
  remoteLogin?: string;
  remotePassword?: pulumi.Output<string>;
}

export class TrainServer extends pulumi.ComponentResource {
  readonly host: Host;
  readonly storage: StorageArray;
  readonly users: UserAccounts;
  readonly baseline: HostBaseline;
  readonly operations: Operations;
  readonly routes: Route[];
  readonly edge: Edge;
  readonly services: SharedServices;
  readonly image: WorkspaceImage;
  readonly workspaces: Record<string, Workspace> = {};
  readonly guacamole?: Guacamole;
  readonly userOutputs: Record<string, UserOutputs>;

  constructor(name: string, args: TrainServerArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:index:TrainServer", name, {}, opts);
    const { config, secrets } = args;
    const parent = { parent: this };
    this.host = new Host(`${name}-host`, { config, privateKey: secrets.sshPrivateKey }, parent);
    this.storage = new StorageArray(`${name}-storage`, { config, host: this.host }, parent);
    this.operations = new Operations(
      `${name}-ops`,
      { config, host: this.host, secrets, deviceBytes: this.storage.deviceBytes, after: [this.storage.ready] },
      parent,
    );
    this.users = new UserAccounts(`${name}-users`, { config, host: this.host, after: [this.operations.ready] }, parent);
    this.baseline = new HostBaseline(`${name}-baseline`, { config, host: this.host, after: [this.users.ready] }, parent);

    this.routes = buildRoutes(config);
    // cloudflared runs in the host network and sends everything to Traefik's tunnel entrypoint on 127.0.0.1
    const traefikUrl = TRAEFIK_TUNNEL_URL;
    this.edge = new Edge(`${name}-edge`, { config, googleClientSecret: secrets.googleClientSecret, traefikUrl }, parent);
    this.services = new SharedServices(
      `${name}-services`,
      { config, host: this.host, routes: this.routes, tunnelToken: this.edge.tunnelToken, tunnelCleanup: this.edge.tunnelCleanup, after: [this.baseline.ready] },
      parent,
    );
    this.image = new WorkspaceImage(`${name}-workspace`, { config, provider: this.services.provider }, parent);
    for (const u of config.users) {
      this.workspaces[u.name] = new Workspace(
        `${name}-ws-${u.name}`,
        {
          config,
          user: u,
          image: this.image.imageName,
          imageTag: workspaceImageTag(this.image.contentHash),
          host: this.host,
          network: this.services.network.name,
          routes: this.routes.filter((r) => r.audience.kind === "user" && r.audience.user === u.name),
          tunnelSources: this.services.tunnelSources,
          provider: this.services.provider,
          after: [this.users.ready],
        },
        parent,
      );
    }
    if (config.workspace.guacamole) this.guacamole = new Guacamole(
      `${name}-guacamole`,
      {
        config,
        host: this.host,
        provider: this.services.provider,
        servicesNetwork: this.services.network.name,
        guacamoleNetwork: this.services.guacamoleNetwork!.name,
        routes: this.routes.filter((r) => r.id === "guacamole"),
        tunnelSources: this.services.tunnelSources,
        vncPasswords: Object.fromEntries(config.users.map((u) => [u.name, this.workspaces[u.name].vncPassword])),
        after: [this.baseline.ready, this.services.dataDirs],
      },
      parent,
    );
    this.userOutputs = Object.fromEntries(
      config.users.map((u) => [
        u.name,
        {
          uid: u.uid,
          sshPort: u.sshPort,
          desktopPort: u.desktopPort,
          codeUrl: `https://${u.name}-code.${config.domain}`,
          jupyterUrl: `https://${u.name}-jupyter.${config.domain}`,
          tensorboardUrl: `https://${u.name}-tensorboard.${config.domain}`,
          password: this.workspaces[u.name].password,
          ...(this.guacamole
            ? {
                remoteUrl: `https://${config.hostnames.guacamole}.${config.domain}`,
                remoteLogin: u.email.toLowerCase(),
                remotePassword: this.guacamole.passwords[u.name],
              }
            : {}),
        },
      ]),
    );
    this.registerOutputs({ mountpoint: this.storage.mountpoint, uuid: this.storage.uuid, users: this.userOutputs, tunnelId: this.edge.tunnelId });
  }

  /** hostname → backend → who may enter, as derived from the route table. */
  get accessTable(): Record<string, AccessEntry> {
    return this.edge.accessTable;
  }
}
