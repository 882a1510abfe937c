/**
 * Workspaces: the workspace image, built on the server and tagged by its content hash (a change under
 * images/workspace rebuilds it and rolls every workspace; nothing else does), and one container per user.
 *
 * A user's container takes everything from the user's stable slot and config — never from list order — so
 * adding or removing a user changes no other user's container. Persistent data (home, workspace, docker
 * volumes) lives on the array, outside the container's lifecycle: replacing a container never touches a home.
 */
import * as docker from "@pulumi/docker";
import * as pulumi from "@pulumi/pulumi";
import * as random from "@pulumi/random";
import * as path from "path";
import type { ServerConfig, UserConfig } from "./config";
import { traefikLabels } from "./render/services";
import { workspaceImageHash } from "./render/workspace-image";
import type { Route } from "./routes";
import { workspaceContainer } from "./routes";
import { CACHE_DIRS } from "./storage";

export const WORKSPACE_IMAGE_DIR = path.resolve(__dirname, "..", "images", "workspace");

/** Ports inside a workspace container. */
export const WORKSPACE_PORTS = { ssh: 22, desktop: 4000, code: 8080, jupyter: 8888 } as const;
/** Where the user's password (desktop, code-server, Jupyter) is uploaded; read by the entrypoint only. */
export const PASSWORD_FILE = "/run/secrets/workspace-password";

const GB = 1024; // the Docker provider takes memory sizes in MB

export interface WorkspaceImageArgs {
  config: ServerConfig;
  provider: docker.Provider;
}

/** The workspace image, built on the server through the SSH Docker provider; never pushed. */
export class WorkspaceImage extends pulumi.ComponentResource {
  readonly imageName: pulumi.Output<string>;
  readonly contentHash: string;

  constructor(name: string, args: WorkspaceImageArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:workspace:Image", name, {}, opts);
    this.contentHash = workspaceImageHash(WORKSPACE_IMAGE_DIR);
    const tag = `train-server/workspace:${this.contentHash.slice(0, 16)}`;
    const image = new docker.Image(
      `${name}-image`,
      {
        imageName: tag,
        skipPush: true,
        buildOnPreview: false,
        build: {
          context: WORKSPACE_IMAGE_DIR,
          dockerfile: path.join(WORKSPACE_IMAGE_DIR, "Dockerfile"),
          platform: "linux/amd64",
          args: { BASE_IMAGE: args.config.workspace.baseImage },
        },
      },
      { parent: this, provider: args.provider },
    );
    this.imageName = image.imageName;
    this.registerOutputs({ imageName: this.imageName, contentHash: this.contentHash });
  }
}

export interface WorkspaceArgs {
  config: ServerConfig;
  user: UserConfig;
  image: pulumi.Input<string>;
  network: pulumi.Input<string>;
  /** This user's routes (code, jupyter) from the route table. */
  routes: Route[];
  provider: docker.Provider;
  /** Steps that must finish first (the user's account and home on the array). */
  after?: pulumi.Resource[];
}

/** GPU access of a user as Docker device requests (`gpus` reads back poorly; device requests do not). */
export function gpuRequests(user: UserConfig): docker.types.input.ContainerDeviceRequest[] {
  if (user.gpus === "all") return [{ driver: "nvidia", count: -1, capabilities: ["gpu"] }];
  if (user.gpus.length === 0) return [];
  return [{ driver: "nvidia", deviceIds: user.gpus.map(String), capabilities: ["gpu"] }];
}

/** Bind mounts of a user's workspace: home, /workspace, /shared, the shared caches, the inner Docker's data. */
export function workspaceMounts(config: ServerConfig, user: UserConfig): docker.types.input.ContainerMount[] {
  const root = config.storage.mountpoint;
  return [
    { type: "bind", source: `${root}/homes/${user.name}`, target: `/home/${user.name}` },
    { type: "bind", source: `${root}/workspaces/${user.name}`, target: "/workspace" },
    { type: "bind", source: `${root}/shared`, target: "/shared", bindOptions: { propagation: "rslave" } },
    ...CACHE_DIRS.filter((c) => c !== "gdrive").map((c) => ({ type: "bind", source: `${root}/cache/${c}`, target: `/cache/${c}` })),
    { type: "bind", source: `${root}/docker-volumes/${user.name}`, target: "/var/lib/docker" },
  ];
}

/** Memory settings in MB: limit, reservation (the guarantee), and memory+swap. */
export function memorySettings(user: UserConfig): { memory: number; memoryReservation: number; memorySwap: number; shmSize: number } {
  return {
    memory: user.memoryLimitGb * GB,
    memoryReservation: user.memoryGuaranteeGb * GB,
    memorySwap: (user.memoryLimitGb + user.swapGb) * GB,
    shmSize: user.shmSizeGb * GB,
  };
}

/** One user's workspace container and its password. */
export class Workspace extends pulumi.ComponentResource {
  readonly container: docker.Container;
  /** Password of the desktop, code-server and Jupyter (a secret). */
  readonly password: pulumi.Output<string>;

  constructor(name: string, args: WorkspaceArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:workspace:Workspace", name, {}, opts);
    const { config, user } = args;
    const password = new random.RandomPassword(`${name}-password`, { length: 24, special: false }, { parent: this });
    this.password = password.result;
    const lan = config.host.lanAddress;
    this.container = new docker.Container(
      `${name}-container`,
      {
        name: workspaceContainer(user),
        image: args.image,
        hostname: `${user.name}-workspace`,
        restart: "unless-stopped",
        // Docker-in-Docker: the inner dockerd needs a privileged container (trusted team; see README)
        privileged: true,
        init: false,
        envs: [`WORKSPACE_USER=${user.name}`, `WORKSPACE_UID=${user.uid}`, `WORKSPACE_GID=${user.uid}`, `WORKSPACE_ADMIN=${user.admin ? 1 : 0}`],
        uploads: [{ file: PASSWORD_FILE, content: password.result, permissions: "0400" }],
        ports: [
          { internal: WORKSPACE_PORTS.ssh, external: user.sshPort, ip: lan },
          { internal: WORKSPACE_PORTS.desktop, external: user.desktopPort, ip: lan },
        ],
        networksAdvanced: [{ name: args.network, aliases: [workspaceContainer(user)] }],
        labels: Object.entries(traefikLabels(args.routes)).map(([label, value]) => ({ label, value })),
        ...(user.cpuset !== undefined ? { cpuSet: user.cpuset } : {}),
        ...(user.cpus !== undefined ? { cpus: String(user.cpus) } : {}),
        ...memorySettings(user),
        deviceRequests: gpuRequests(user),
        mounts: workspaceMounts(config, user),
        healthcheck: { tests: ["CMD", "supervisorctl", "status"], interval: "60s", timeout: "10s", retries: 3, startPeriod: "120s" },
        stopTimeout: 60,
      },
      { parent: this, provider: args.provider, deleteBeforeReplace: true, dependsOn: args.after ?? [] },
    );
    this.registerOutputs({ container: this.container.name, password: this.password });
  }
}
