/**
 * The per-user workspace image (images/workspace): its content hash and the contract between the image and the
 * container that runs it (environment, mounts, files, ports, privileges). components/workspace.ts builds the
 * image and runs one container per user from these constants; images/workspace/entrypoint.sh reads the same
 * names (tests/unit/workspace-image.test.ts checks that both sides agree).
 *
 * Pure: no Pulumi, no I/O except reading the build context in `workspaceImageHash`.
 */
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";

/** The build context, relative to the repository root. */
export const WORKSPACE_IMAGE_DIR = "images/workspace";

/**
 * Build targets of images/workspace/Dockerfile, in stage order (each builds on the one before): `core` (system, sshd,
 * supervisord, rootless Docker, user handling), `ml` (Python venvs, JupyterLab), `desktop` (KDE/XFCE, X2Go, Xvnc, GUI
 * apps), `dev` (languages, IDEs, DB clients) and `workspace` (the default, last stage: the full image's programs).
 */
export const WORKSPACE_TARGETS = { core: "core", ml: "ml", desktop: "desktop", dev: "dev", full: "workspace" } as const;
/** The Dockerfile's base-image build argument (Debian bookworm in production). */
export const WORKSPACE_BASE_IMAGE_ARG = "BASE_IMAGE";

/**
 * sha256 over the sorted relative paths and contents of every regular file in the build context, so that any
 * Dockerfile/config change changes it and nothing else does (not mtimes, not modes, not the checkout path).
 * Use it in the image tag and in the container's replace trigger. Symlinks and special files are refused:
 * the Docker build context would follow or drop them, and the hash must describe exactly what is built.
 */
export function workspaceImageHash(dir: string = WORKSPACE_IMAGE_DIR): string {
  const root = path.resolve(dir);
  const files: string[] = [];
  const walk = (d: string): void => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile()) files.push(path.relative(root, p).split(path.sep).join("/"));
      else throw new Error(`workspaceImageHash: ${p} is not a regular file or directory; the build context must hold only files`);
    }
  };
  walk(root);
  files.sort();
  const h = crypto.createHash("sha256");
  for (const f of files) {
    const content = fs.readFileSync(path.join(root, f));
    // length-prefixed, so that no two different trees can produce the same byte stream
    h.update(`${Buffer.byteLength(f)}:${f}\0${content.length}:`);
    h.update(content);
    h.update("\0");
  }
  return h.digest("hex");
}

/** Environment variables the entrypoint reads (the container's env; none of them is secret). */
export const WORKSPACE_ENV = {
  /** The user's login name (^[a-z_][a-z0-9_-]{0,31}$, not root). Required. */
  user: "WORKSPACE_USER",
  /** The user's stable host uid (1000..59999): files in the bind-mounted home keep their owner. Required. */
  uid: "WORKSPACE_UID",
  /** The user's primary gid; default = uid (users.sh gives every user a group with gid = uid). */
  gid: "WORKSPACE_GID",
  /** Group owning the shared caches on the host (users.sh/baseline.sh: mlusers); default "mlusers". */
  sharedGroup: "WORKSPACE_SHARED_GROUP",
  /** Its gid; default 2000. The user joins it inside the container so the /cache/* mounts are writable. */
  sharedGid: "WORKSPACE_SHARED_GID",
  /** The browser desktop's session (full image): `kde` (default) or `xfce`. Stack config workspace.desktop. */
  desktop: "WORKSPACE_DESKTOP",
} as const;

/** The desktop sessions the image has: KDE Plasma (the default) and the lighter XFCE. */
export const WORKSPACE_DESKTOPS = ["kde", "xfce"] as const;
export type WorkspaceDesktop = (typeof WORKSPACE_DESKTOPS)[number];

/** Defaults the entrypoint applies when the optional variables are absent. */
export const WORKSPACE_DEFAULTS = { sharedGroup: "mlusers", sharedGid: 2000 } as const;

/**
 * The user's password (sudo, code-server, JupyterLab) is read from this file only: never from an environment
 * variable, never logged. Bind-mount it read-only from a host file owned by root with mode 0400 (0600 works);
 * the entrypoint refuses a file readable by group or others, an empty one, or one with more than one line.
 */
export const WORKSPACE_PASSWORD_FILE = "/run/secrets/workspace-password";

/**
 * The VNC password (8 characters: VncAuth reads no more) of the desktop that guacd connects to, read from this file
 * only (the image turns it into Xvnc's -rfbauth file with `vncpasswd -f`). Delivered like WORKSPACE_PASSWORD_FILE:
 * root-only 0400, never an environment variable.
 */
export const WORKSPACE_VNC_PASSWORD_FILE = "/run/secrets/vnc-password";

/** Where the user's home is mounted: `${WORKSPACE_HOME_PARENT}/<user>`. */
export const WORKSPACE_HOME_PARENT = "/home";

/**
 * Per-user container state that must survive an image update (container replacement): the user's rootless
 * dockerd's data root (`docker-rootless/`, the user's) and the container's SSH host keys (`ssh/`, so users never see a
 * host-key change). Mount the user's docker-volumes subvolume here, read-write. (`docker/`, the data root of the
 * privileged Docker-in-Docker of earlier versions, is left untouched: its files belong to real root.)
 */
export const WORKSPACE_STATE_DIR = "/var/lib/workspace";
/** The user's rootless Docker data root, inside the state mount. */
export const WORKSPACE_DIND_DATA_ROOT = `${WORKSPACE_STATE_DIR}/docker-rootless`;
/** The user's rootless Docker socket (DOCKER_HOST in the workspace). */
export function workspaceDockerHost(uid: number): string {
  return `unix:///run/user/${uid}/docker.sock`;
}
/** The user's subordinate ids inside the workspace (/etc/subuid, /etc/subgid): 65536 from uid*65536. */
export function workspaceSubIds(uid: number): { start: number; count: number } {
  return { start: uid * 65536, count: 65536 };
}

/** The user's fast scratch space (host: workspaces/<user>), read-write. */
export const WORKSPACE_SCRATCH_DIR = "/workspace";
/** The team's shared drive (host: the rclone mount / shared subvolume), read-write. */
export const WORKSPACE_SHARED_DIR = "/shared";

/**
 * The user's own home snapshots (host: <array>/.snapshots/homes/<user>, btrbk's hourly/daily/weekly read-only
 * snapshots `<user>.<YYYYMMDDThhmm>`), read-only. A bind mount of that one directory: new snapshots are new entries in
 * it (subvolumes are not mounts), so they appear without a restart, and no other user's snapshots are in it.
 */
export const WORKSPACE_SNAPSHOTS_DIR = "/snapshots";
/**
 * The user's own restore spool (host: RESTORE_SPOOL/<user>): `requests/` (the `restore` command writes a request),
 * `results/` (the host's broker answers). Read-write; the restic secrets never enter the workspace.
 */
export const WORKSPACE_RESTORE_SPOOL = "/run/train-server-restore";

/** Shared download caches: host `<array>/cache/<name>` (group mlusers, setgid + default ACL) → `/cache/<name>`. */
export const WORKSPACE_CACHE_MOUNTS = ["pip", "conda", "huggingface", "torch", "go", "npm"] as const;
export type WorkspaceCache = (typeof WORKSPACE_CACHE_MOUNTS)[number];

/**
 * Cache environment, exactly as in images/workspace/cache.env (baked into the image: /etc/environment for SSH
 * and X2Go sessions, /etc/profile.d for login shells, the supervisord environment for code-server, JupyterLab
 * and dockerd). Hugging Face: only the hub and datasets caches are shared (HF_HUB_CACHE, HF_DATASETS_CACHE);
 * HF_HOME stays in the user's home, because it also holds the user's access token, which must not land in a
 * directory every user can read.
 */
export const WORKSPACE_CACHE_ENV: Readonly<Record<string, string>> = Object.freeze({
  PIP_CACHE_DIR: "/cache/pip",
  CONDA_PKGS_DIRS: "/cache/conda",
  HF_HUB_CACHE: "/cache/huggingface/hub",
  HF_DATASETS_CACHE: "/cache/huggingface/datasets",
  TORCH_HOME: "/cache/torch",
  GOMODCACHE: "/cache/go",
  npm_config_cache: "/cache/npm",
});

/** Ports inside the container. The host publishes SSH as 2222+slot; code-server and JupyterLab go through
 * Traefik on the docker network (not published). X2Go runs over SSH: no desktop port of its own. */
/** Listening ports inside the workspace; tensorboard (the user's own) on loopback only, behind code-server's proxy. */
/** vnc: TigerVNC's `Xvnc :1` (VncAuth, password from WORKSPACE_VNC_PASSWORD_FILE) for guacd on the services network only. */
export const WORKSPACE_PORTS = { ssh: 22, codeServer: 8080, jupyter: 8888, tensorboard: 6006, vnc: 5901 } as const;

/** supervisord programs of each target (all must be RUNNING for the healthcheck to pass). */
export const WORKSPACE_PROGRAMS = {
  core: ["dockerd", "graceful-stop", "sshd"],
  full: ["code-server", "desktop", "dockerd", "graceful-stop", "jupyter", "sshd", "tensorboard", "x2go-cleansessions"],
} as const;

/** One bind mount of the workspace container. */
export interface WorkspaceMount {
  /** Path on the host. */
  source: string;
  /** Path in the container. */
  target: string;
  readOnly: boolean;
}

/** Host paths of one user's container (all must exist before the container starts: the entrypoint refuses to
 * start when the home or the state dir is not a mount, so nothing is ever written into the image layer). */
export interface WorkspaceMountParams {
  user: string;
  /** The user's home subvolume, e.g. /mnt/storage/homes/alice (owned by the user's uid). */
  home: string;
  /** The user's scratch subvolume, e.g. /mnt/storage/workspaces/alice. */
  scratch: string;
  /** The user's state subvolume, e.g. /mnt/storage/docker-volumes/alice. */
  state: string;
  /** Parent of the shared caches, e.g. /mnt/storage/cache (holding pip, conda, huggingface, ...). */
  cacheRoot: string;
  /** Host file holding the password (root:root 0400); omitted: the password file is put into the container
   * another way (the program uploads it at create, mode 0400). */
  passwordFile?: string;
  /** Host file holding the VNC password (root:root 0400); omitted: uploaded at create like the password file. */
  vncPasswordFile?: string;
  /** The shared drive, e.g. /shared; omitted: not mounted. */
  shared?: string;
  /** The user's home snapshot directory, e.g. /mnt/storage/.snapshots/homes/alice; omitted: not mounted. */
  snapshots?: string;
  /** The user's restore spool, e.g. /var/lib/train-server/restore/alice; omitted: not mounted. */
  restoreSpool?: string;
}

const USER_NAME = /^[a-z_][a-z0-9_-]{0,31}$/;

/** The exact bind mounts of one user's workspace container. */
export function workspaceMounts(p: WorkspaceMountParams): WorkspaceMount[] {
  if (!USER_NAME.test(p.user) || p.user === "root") throw new Error(`workspaceMounts: "${p.user}" is not a valid non-root login`);
  for (const [k, v] of Object.entries(p)) {
    if (k !== "user" && v !== undefined && !path.isAbsolute(v)) throw new Error(`workspaceMounts: ${k} "${v}" is not an absolute path`);
  }
  const mounts: WorkspaceMount[] = [
    { source: p.home, target: `${WORKSPACE_HOME_PARENT}/${p.user}`, readOnly: false },
    { source: p.scratch, target: WORKSPACE_SCRATCH_DIR, readOnly: false },
    { source: p.state, target: WORKSPACE_STATE_DIR, readOnly: false },
    ...(p.passwordFile !== undefined ? [{ source: p.passwordFile, target: WORKSPACE_PASSWORD_FILE, readOnly: true }] : []),
    ...(p.vncPasswordFile !== undefined ? [{ source: p.vncPasswordFile, target: WORKSPACE_VNC_PASSWORD_FILE, readOnly: true }] : []),
    ...WORKSPACE_CACHE_MOUNTS.map((c) => ({ source: path.posix.join(p.cacheRoot, c), target: `/cache/${c}`, readOnly: false })),
  ];
  if (p.shared !== undefined) mounts.push({ source: p.shared, target: WORKSPACE_SHARED_DIR, readOnly: false });
  for (const [k, v] of [["snapshots", p.snapshots], ["restoreSpool", p.restoreSpool]] as const) {
    // the last path component must be this user's: a mapping to another user's directory would show their data
    if (v !== undefined && path.posix.basename(v) !== p.user) throw new Error(`workspaceMounts: ${k} "${v}" is not ${p.user}'s own directory`);
  }
  if (p.snapshots !== undefined) mounts.push({ source: p.snapshots, target: WORKSPACE_SNAPSHOTS_DIR, readOnly: true });
  if (p.restoreSpool !== undefined) mounts.push({ source: p.restoreSpool, target: WORKSPACE_RESTORE_SPOOL, readOnly: false });
  return mounts;
}

/** The container's environment (no secrets). */
export function workspaceEnv(p: { user: string; uid: number; gid?: number; sharedGroup?: string; sharedGid?: number; desktop?: WorkspaceDesktop }): Record<string, string> {
  if (!USER_NAME.test(p.user) || p.user === "root") throw new Error(`workspaceEnv: "${p.user}" is not a valid non-root login`);
  if (!Number.isInteger(p.uid) || p.uid < 1000 || p.uid > 59999) throw new Error(`workspaceEnv: uid ${p.uid} is outside 1000..59999`);
  return {
    [WORKSPACE_ENV.user]: p.user,
    [WORKSPACE_ENV.uid]: String(p.uid),
    [WORKSPACE_ENV.gid]: String(p.gid ?? p.uid),
    [WORKSPACE_ENV.sharedGroup]: p.sharedGroup ?? WORKSPACE_DEFAULTS.sharedGroup,
    [WORKSPACE_ENV.sharedGid]: String(p.sharedGid ?? WORKSPACE_DEFAULTS.sharedGid),
    ...(p.desktop !== undefined ? { [WORKSPACE_ENV.desktop]: p.desktop } : {}),
  };
}

// Privileges: not privileged, none beyond Docker's default capabilities; components/render/workspace-security.ts
// has the confinement (seccomp, AppArmor, devices) that components/workspace.ts and the host test share.
/**
 * What `docker stop` (every replace, image roll and destroy: the provider's destroyGraceSeconds) gives a workspace
 * between SIGTERM and SIGKILL: the user's processes get SIGTERM first and up to WORKSPACE_USER_STOP_GRACE_S to save
 * (images/workspace/graceful-stop.sh; the user's rootless dockerd stops the nested containers in that time).
 */
export const WORKSPACE_STOP_TIMEOUT_S = 120;
/** The user's processes' share of it (the image's graceful-stop default). */
export const WORKSPACE_USER_STOP_GRACE_S = 50;
