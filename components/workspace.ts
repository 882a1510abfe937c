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
import { WEEKDAYS } from "./config";
import { Host, HostScript, sha256 } from "./host";
import { SHARED_GID, SHARED_GROUP } from "./baseline";
import { homeSnapshotDir, RESTORE_SPOOL } from "./render/ops";
import { labelList, traefikLabels } from "./render/services";
import { containerLifecycle } from "./services";
import {
  WORKSPACE_PASSWORD_FILE,
  WORKSPACE_PORTS,
  WORKSPACE_SHARED_DIR,
  WORKSPACE_STOP_TIMEOUT_S,
  WORKSPACE_VNC_PASSWORD_FILE,
  workspaceEnv,
  workspaceImageHash,
  workspaceMounts as imageMounts,
} from "./render/workspace-image";
import { WORKSPACE_SLICE } from "./render/workspace-slice";
import { VNC_PASSWORD_LENGTH } from "./render/guacamole";
import * as crypto from "crypto";
import { workspaceSecurity } from "./render/workspace-security";
import type { Route } from "./routes";
import { workspaceContainer } from "./routes";

export const WORKSPACE_IMAGE_DIR = path.resolve(__dirname, "..", "images", "workspace");

const GB = 1024; // the Docker provider takes memory sizes in MB

/** A workspace's first health check may take its start period (60 s) plus retries; a slow first start gets 10 min. */
export const WORKSPACE_WAIT_TIMEOUT_S = 600;

/** The workspace image's tag for a content hash (what every workspace container runs). */
export function workspaceImageTag(contentHash: string = workspaceImageHash(WORKSPACE_IMAGE_DIR)): string {
  return `train-server/workspace:${contentHash.slice(0, 16)}`;
}

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
    const tag = workspaceImageTag(this.contentHash);
    const image = new docker.Image(
      `${name}-image`,
      {
        imageName: tag,
        skipPush: true,
        buildOnPreview: false,
        build: {
          // relative to the project directory (pulumi's working directory): an absolute path would differ
          // between the admin's checkout and CI's and show every preview as a rebuild; Dockerfile is the default
          context: path.relative(process.cwd(), WORKSPACE_IMAGE_DIR) || ".",
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
  /** The image resource's name (orders the container after the build)... */
  image: pulumi.Input<string>;
  /** ...and its tag, known when the program runs (workspaceImageTag): part of the spec the rollout guard compares. */
  imageTag: string;
  /** The server, for the rollout guard step. */
  host: Host;
  network: pulumi.Input<string>;
  /** This user's routes (code, jupyter) from the route table. */
  routes: Route[];
  /** Where tunnel requests reach Traefik from (SharedServices.tunnelSources): the tunnel routers admit only these. */
  tunnelSources: pulumi.Input<string[]>;
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

/** Bind mounts of a user's workspace (the image's contract): home, /workspace, the state dir (inner Docker data,
 * SSH host keys), the shared caches, /shared (the Drive mount, propagated so a remount shows through), the user's own
 * home snapshots at /snapshots (read-only) and restore spool (the `restore` command; users.sh makes both). */
export function workspaceMounts(config: ServerConfig, user: UserConfig): docker.types.input.ContainerMount[] {
  const root = config.storage.mountpoint;
  return imageMounts({
    user: user.name,
    home: `${root}/homes/${user.name}`,
    scratch: `${root}/workspaces/${user.name}`,
    state: `${root}/docker-volumes/${user.name}`,
    cacheRoot: `${root}/cache`,
    shared: `${root}/shared`,
    snapshots: homeSnapshotDir(root, user.name),
    restoreSpool: `${RESTORE_SPOOL}/${user.name}`,
  }).map((m) => ({
    type: "bind",
    source: m.source,
    target: m.target,
    ...(m.readOnly ? { readOnly: true } : {}),
    ...(m.target === WORKSPACE_SHARED_DIR ? { bindOptions: { propagation: "rslave" } } : {}),
  }));
}

/** A workspace's confinement as Docker provider arguments (the host test runs the same workspaceSecurity). */
export function containerSecurity(config: ServerConfig, user: UserConfig): Pick<docker.ContainerArgs, "privileged" | "devices" | "capabilities"> & { securityOpts: string[] } {
  const s = workspaceSecurity({ gpus: user.gpus, gpuCount: config.host.gpu.count });
  return {
    privileged: s.privileged,
    securityOpts: s.securityOpts,
    devices: s.devices.map((d) => ({ hostPath: d.hostPath, containerPath: d.containerPath, permissions: d.permissions })),
    ...(s.capAdd.length ? { capabilities: { adds: s.capAdd } } : {}),
  };
}

/** The label that carries a hash of the security options (a change of them replaces the container). */
export const CONFINEMENT_LABEL = "train-server.confinement";
export function confinementLabel(securityOpts: readonly string[]): { label: string; value: string } {
  return { label: CONFINEMENT_LABEL, value: crypto.createHash("sha256").update(securityOpts.join("\0")).digest("hex").slice(0, 16) };
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

/** The label a workspace carries with the hash of the spec it was created from (the rollout guard compares it). */
export const WORKSPACE_SPEC_LABEL = "train-server.spec";

/**
 * The hash of everything a workspace container is created from that the program knows when it runs: the image tag,
 * every plain container argument, the user's routes and the admin sources of their labels. A change of any of them
 * replaces the container (the Docker provider replaces a container on nearly every argument), so the rollout guard
 * runs exactly then. Not in it: the services network's name and the tunnel's source address (read from Docker;
 * they change only when the network itself is recreated, which replaces every container anyway).
 */
export function workspaceSpecHash(p: { imageTag: string; container: Record<string, unknown>; routes: Route[]; adminSources: readonly string[] }): string {
  return sha256(JSON.stringify({ image: p.imageTag, container: p.container, routes: p.routes, adminSources: p.adminSources }));
}

/** The rollout guard's inputs (host-scripts/rollout-guard.sh) for one user's workspace of this spec. */
export function rolloutGuardEnv(config: ServerConfig, user: UserConfig, specHash: string): Record<string, string> {
  const r = config.workspace.rollout;
  const w = r.window;
  return {
    TS_USER: user.name,
    TS_UID: String(user.uid),
    TS_HOME: `${config.storage.mountpoint}/homes/${user.name}`,
    TS_CONTAINER: workspaceContainer(user),
    TS_SPEC: specHash,
    TS_SPEC_LABEL: WORKSPACE_SPEC_LABEL,
    TS_FORCE: user.rolloutNow ? "1" : "0",
    TS_WINDOW: w ? `${w.days.map((d) => WEEKDAYS.indexOf(d) + 1).sort().join(",")} ${w.start}-${w.end}` : "",
    TS_WINDOW_TEXT: w ? `workspace.rollout.window: ${w.days.join(", ")} ${w.start}-${w.end} server time` : "",
    TS_READY_MAX_AGE_S: String(r.readyMaxAgeHours * 3600),
    TS_BUSY_CPU_PERCENT: String(Math.round(r.busyCpuCores * 100)),
    TS_CPU_SAMPLE_S: String(r.cpuSampleSeconds),
  };
}

/** One user's workspace container and its password. */
export class Workspace extends pulumi.ComponentResource {
  readonly container: docker.Container;
  /** The step that keeps a busy workspace from being replaced (runs first whenever the spec changes). */
  readonly guard: HostScript;
  /** Password of the desktop, code-server and Jupyter (a secret). */
  readonly password: pulumi.Output<string>;
  /** Password of the workspace's VNC desktop (8 characters, VncAuth's limit), which only guacd uses (a secret). */
  readonly vncPassword: pulumi.Output<string>;

  constructor(name: string, args: WorkspaceArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:workspace:Workspace", name, {}, opts);
    const { config, user } = args;
    const password = new random.RandomPassword(`${name}-password`, { length: 24, special: false }, { parent: this });
    this.password = pulumi.secret(password.result);
    const vncPassword = new random.RandomPassword(`${name}-vnc-password`, { length: VNC_PASSWORD_LENGTH, special: false }, { parent: this });
    this.vncPassword = pulumi.secret(vncPassword.result);
    const lan = config.host.lanAddress;
    const security = containerSecurity(config, user);
    // every plain argument of the container (what the rollout guard's spec hash covers)
    const spec = {
      name: workspaceContainer(user),
      hostname: `${user.name}-workspace`,
      restart: "unless-stopped",
      // not privileged: Docker's default capabilities, a seccomp/AppArmor profile that lets the user's rootless
      // Docker make its user namespace, and exactly the user's GPU device nodes (render/workspace-security.ts)
      ...security,
      envs: Object.entries(workspaceEnv({ user: user.name, uid: user.uid, sharedGroup: SHARED_GROUP, sharedGid: SHARED_GID, desktop: args.config.workspace.desktop })).map(([k, v]) => `${k}=${v}`),
      // SSH on 2222+slot; the desktop (X2Go, which runs over SSH) on 4000+slot; both on the LAN address only
      ports: [
        { internal: WORKSPACE_PORTS.ssh, external: user.sshPort, ip: lan },
        { internal: WORKSPACE_PORTS.ssh, external: user.desktopPort, ip: lan },
      ],
      ...(user.cpuset !== undefined ? { cpuSet: user.cpuset } : {}),
      ...(user.cpus !== undefined ? { cpus: String(user.cpus) } : {}),
      ...memorySettings(user),
      // under the baseline's slice, whose MemoryLow makes the guarantee (memory.low) hold (render/workspace-slice.ts)
      cgroupParent: WORKSPACE_SLICE,
      deviceRequests: gpuRequests(user),
      mounts: workspaceMounts(config, user),
      // health: the image's HEALTHCHECK (every supervisord program RUNNING); `up` waits for it and fails with
      // the reason when the workspace never becomes healthy. Stops (replace, image roll, destroy) give its
      // processes the image's stop timeout between SIGTERM and SIGKILL, never the provider's default 0 s.
      ...containerLifecycle(WORKSPACE_STOP_TIMEOUT_S, true, WORKSPACE_WAIT_TIMEOUT_S),
    };
    // the uploaded files' paths count too (their contents are secrets, generated once): adding one replaces the container
    const uploadPaths = [WORKSPACE_PASSWORD_FILE, WORKSPACE_VNC_PASSWORD_FILE];
    const specHash = workspaceSpecHash({ imageTag: args.imageTag, container: { ...spec, uploads: uploadPaths }, routes: args.routes, adminSources: config.host.adminSources });
    // runs before any replacement of this container: a busy workspace refuses it (README: "Rollouts never kill a job")
    this.guard = new HostScript(
      `${name}-guard`,
      { host: args.host, script: "rollout-guard", env: rolloutGuardEnv(config, user, specHash), after: args.after ?? [] },
      { parent: this },
    );
    this.container = new docker.Container(
      `${name}-container`,
      {
        ...spec,
        image: args.image,
        // the passwords reach the container as root-only files at create, never as environment variables
        uploads: [
          { file: WORKSPACE_PASSWORD_FILE, content: this.password, permissions: "0400" },
          { file: WORKSPACE_VNC_PASSWORD_FILE, content: this.vncPassword, permissions: "0400" },
        ],
        networksAdvanced: [{ name: args.network, aliases: [workspaceContainer(user)] }],
        labels: pulumi
          .output(args.tunnelSources)
          .apply((ts) => [
            ...labelList({ ...traefikLabels(args.routes, { adminSources: config.host.adminSources, tunnelSources: ts }), [WORKSPACE_SPEC_LABEL]: specHash }),
            confinementLabel(security.securityOpts),
          ]),
      },
      // Docker does not read `systempaths=unconfined` back into SecurityOpt (it becomes empty masked/read-only
      // path lists), so the provider would see a diff on every run: the options are compared through the labels
      // instead (the spec and the confinement hash), which replace the container when they change
      {
        parent: this,
        provider: args.provider,
        deleteBeforeReplace: true,
        dependsOn: [...(args.after ?? []), this.guard.apply],
        ignoreChanges: ["securityOpts"],
      },
    );
    this.registerOutputs({ container: this.container.name, password: this.password });
  }
}
