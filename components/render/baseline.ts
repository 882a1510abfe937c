/**
 * Pure renderers of the host baseline files installed by host-scripts/baseline.sh:
 * the sshd drop-in, the fail2ban jail, Docker's daemon.json and its systemd drop-in, the UFW rule set,
 * the DOCKER-USER block for UFW's after.rules, NVIDIA's apt source and the workspaces' slice (render/workspace-slice.ts).
 *
 * Every function takes the same validated {@link BaselineParams} and returns the file's exact content.
 * `renderBaselineFiles` returns them keyed by the name baseline.sh expects in $TS_FILES_DIR.
 */

import { renderWorkspaceSlice, WORKSPACE_SLICE, workspaceSliceMemoryLow } from "./workspace-slice";
import { DOCKER_USERNS_REMAP, renderDockerRemapSubIds, renderWorkspaceAppArmor, WORKSPACE_APPARMOR_PROFILE } from "./workspace-security";

/** Inputs of the host baseline. */
export interface BaselineParams {
  /** Port the host's own sshd listens on (UFW allows it from `lanCidr` only). */
  sshPort: number;
  /** The LAN, as an IPv4 CIDR (e.g. "192.168.1.0/24"): the only source allowed to reach SSH and user ports. */
  lanCidr: string;
  /**
   * Every port a workspace can publish on the host (any user's SSH 2222+slot or desktop 4000+slot), as one
   * inclusive range. LAN only. A range of every possible slot, not the current users' ports: adding or removing a
   * user never changes (and never re-runs) the baseline.
   */
  userPortRange: { from: number; to: number };
  /** The admin's login on the host; baseline.sh refuses to lock down sshd unless it has an authorized key. */
  adminUser: string;
  /** Docker's data-root: a btrfs subvolume on the array (baseline.sh creates it), e.g. "/mnt/storage/docker-data". */
  dataRoot: string;
  /** host.ramGb and host.reservedRamGb: the workspace slice's MemoryLow is the difference (the users' pool). */
  ramGb: number;
  reservedRamGb: number;
  /** Number of NVIDIA GPUs; > 0 adds the nvidia runtime to daemon.json and installs the container toolkit. */
  gpuCount: number;
  /** Mountpoint of the array; docker.service waits for it (RequiresMountsFor). Default: parent of dataRoot. */
  mountpoint?: string;
  /** Per-container log rotation: size of one json-file log. Default "50m". */
  logMaxSize?: string;
  /** Per-container log rotation: files kept. Default 5. */
  logMaxFiles?: number;
  /** fail2ban: failures within `findTime` before a ban. Default 5. */
  maxRetry?: number;
  /** fail2ban: ban length. Default "1h". */
  banTime?: string;
  /** fail2ban: window in which failures are counted. Default "10m". */
  findTime?: string;
}

/** sshd's MaxStartups: no connection is dropped below 64 unauthenticated at once, all beyond 128. */
export const SSHD_MAX_STARTUPS = "64:30:128";

const HEADER = "Managed by train-server (components/render/baseline.ts). Local edits are overwritten.";
const USER_NAME = /^[a-z_][a-z0-9_-]{0,31}$/;
const DURATION = /^[0-9]+[smhdw]?$/;
const SIZE = /^[0-9]+[kmg]$/;

function checkPort(what: string, port: number): void {
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`${what}: ${port} is not a TCP port (1-65535)`);
}

/** Throws a clear error when a parameter could produce a broken or unsafe file. */
export function validateBaselineParams(p: BaselineParams): void {
  checkPort("sshPort", p.sshPort);
  const r = p.userPortRange;
  checkPort("userPortRange.from", r.from);
  checkPort("userPortRange.to", r.to);
  if (r.from > r.to) throw new Error(`userPortRange: ${r.from}:${r.to} is reversed`);
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/.exec(p.lanCidr);
  if (!m || m.slice(1, 5).some((o) => Number(o) > 255) || Number(m[5]) > 32 || Number(m[5]) < 8) {
    throw new Error(`lanCidr: "${p.lanCidr}" is not an IPv4 network like 192.168.1.0/24 (prefix 8-32)`);
  }
  const addr = m.slice(1, 5).reduce((acc, o) => acc * 256 + Number(o), 0);
  const hostBits = 32 - Number(m[5]);
  if (hostBits > 0 && addr % 2 ** hostBits !== 0) throw new Error(`lanCidr: "${p.lanCidr}" has host bits set`);
  if (!USER_NAME.test(p.adminUser) || p.adminUser === "root") throw new Error(`adminUser: "${p.adminUser}" is not a valid non-root login`);
  for (const [what, dir] of [["dataRoot", p.dataRoot], ["mountpoint", p.mountpoint ?? "/x"]] as const) {
    if (!/^(\/[A-Za-z0-9._-]+)+$/.test(dir) || dir.split("/").includes("..")) throw new Error(`${what}: "${dir}" is not a plain absolute path`);
  }
  workspaceSliceMemoryLow({ ramGb: p.ramGb, reservedRamGb: p.reservedRamGb });
  if (!Number.isInteger(p.gpuCount) || p.gpuCount < 0) throw new Error(`gpuCount: ${p.gpuCount} is not a count`);
  if (p.logMaxSize !== undefined && !SIZE.test(p.logMaxSize)) throw new Error(`logMaxSize: "${p.logMaxSize}" (want e.g. 50m)`);
  if (p.logMaxFiles !== undefined && (!Number.isInteger(p.logMaxFiles) || p.logMaxFiles < 1)) throw new Error(`logMaxFiles: ${p.logMaxFiles}`);
  if (p.maxRetry !== undefined && (!Number.isInteger(p.maxRetry) || p.maxRetry < 1)) throw new Error(`maxRetry: ${p.maxRetry}`);
  for (const [what, v] of [["banTime", p.banTime], ["findTime", p.findTime]] as const) {
    if (v !== undefined && !DURATION.test(v)) throw new Error(`${what}: "${v}" (want e.g. 10m, 1h)`);
  }
}

/**
 * /etc/ssh/sshd_config.d/10-train-server.conf. sshd keeps the FIRST value it reads for a keyword and Debian/Ubuntu
 * include sshd_config.d/*.conf at the top of sshd_config, so "10-" wins over e.g. cloud-init's 50-cloud-init.conf.
 */
export function renderSshdConfig(p: BaselineParams): string {
  validateBaselineParams(p);
  return [
    `# ${HEADER}`,
    `Port ${p.sshPort}`,
    "PermitRootLogin no",
    "PubkeyAuthentication yes",
    "AuthenticationMethods publickey",
    "PasswordAuthentication no",
    "KbdInteractiveAuthentication no",
    "PermitEmptyPasswords no",
    "# PAM runs account/session checks (expired = archived users are refused); it never asks for a password here.",
    "UsePAM yes",
    "X11Forwarding no",
    "MaxAuthTries 3",
    "LoginGraceTime 30",
    "# The Docker provider opens one ssh connection per container operation (`docker system dial-stdio`), ~25 at",
    "# once on a first `up`: OpenSSH's default 10:30:100 starts dropping new connections past 10 unauthenticated.",
    `MaxStartups ${SSHD_MAX_STARTUPS}`,
    "ClientAliveInterval 300",
    "ClientAliveCountMax 3",
    "",
  ].join("\n");
}

/** /etc/fail2ban/jail.d/train-server.conf: the sshd jail, reading the journal (Debian 12 has no auth.log). */
export function renderFail2banJail(p: BaselineParams): string {
  validateBaselineParams(p);
  return [
    `# ${HEADER}`,
    "[DEFAULT]",
    "ignoreip = 127.0.0.1/8 ::1",
    "# iptables, not ufw: bans must not show up as (and be converged away with) UFW rules.",
    "banaction = iptables-multiport",
    "banaction_allports = iptables-allports",
    "",
    "[sshd]",
    "enabled = true",
    "backend = systemd",
    "mode = normal",
    `port = ${p.sshPort}`,
    `maxretry = ${p.maxRetry ?? 5}`,
    `findtime = ${p.findTime ?? "10m"}`,
    `bantime = ${p.banTime ?? "1h"}`,
    "",
  ].join("\n");
}

/** /etc/docker/daemon.json: data on the array with the btrfs driver, rotated logs, the systemd cgroup driver,
 * nvidia runtime when GPUs exist. */
export function renderDockerDaemonJson(p: BaselineParams): string {
  validateBaselineParams(p);
  const config: Record<string, unknown> = {
    "data-root": p.dataRoot,
    "storage-driver": "btrfs",
    "log-driver": "json-file",
    "log-opts": { "max-size": p.logMaxSize ?? "50m", "max-file": String(p.logMaxFiles ?? 5) },
    // containers (the users' workspaces) keep running while dockerd restarts for a config change
    "live-restore": true,
    // containers are systemd scopes: a workspace's cgroupParent is the systemd slice that carries its memory
    // protection (cgroupfs would put it in a plain directory systemd knows nothing of); Docker's default on a
    // cgroup v2 systemd host, written down so it cannot change under the workspaces
    "exec-opts": ["native.cgroupdriver=systemd"],
    // every container's root is an unprivileged host id unless it opts out (the services do): a workspace's root
    // (sudo) is not root on the host (components/render/workspace-security.ts, /etc/subuid from subuid-dockremap)
    "userns-remap": DOCKER_USERNS_REMAP.user,
  };
  if (p.gpuCount > 0) {
    // what `nvidia-ctk runtime configure --runtime=docker` would add; rendered here so the file has one owner
    config.runtimes = { nvidia: { path: "nvidia-container-runtime", args: [] } };
  }
  return JSON.stringify(config, null, 2) + "\n";
}

/** /etc/systemd/system/docker.service.d/10-train-server.conf: dockerd starts only once the array is mounted. */
export function renderDockerServiceDropIn(p: BaselineParams): string {
  validateBaselineParams(p);
  const mountpoint = p.mountpoint ?? p.dataRoot.replace(/\/[^/]+$/, "");
  return [`# ${HEADER}`, "[Unit]", `RequiresMountsFor=${mountpoint}`, ""].join("\n");
}

/**
 * The complete UFW rule set, one rule per line, in the form `ufw show added` prints it (without the leading
 * "ufw "). baseline.sh adds missing lines and deletes any other rule: UFW is owned by train-server.
 * Only the host's sshd is opened here; Docker-published ports bypass UFW's INPUT chain and are filtered by
 * {@link renderUfwDockerUserRules}. No port for the Cloudflare tunnel: it only connects out.
 */
export function renderUfwRules(p: BaselineParams): string {
  validateBaselineParams(p);
  return `allow from ${p.lanCidr} to any port ${p.sshPort} proto tcp\n`;
}

/**
 * A block appended to /etc/ufw/after.rules (between markers) that filters traffic to the workspaces' published
 * ports in Docker's DOCKER-USER chain: a connection whose original destination port is in the user port range is dropped
 * unless it comes from the LAN. (DNAT-ed traffic never reaches UFW's INPUT rules; `--ctorigdstport` matches
 * the port before Docker's DNAT.) ufw loads it on enable/reload/boot; dockerd keeps DOCKER-USER's rules.
 */
export function renderUfwDockerUserRules(p: BaselineParams): string {
  validateBaselineParams(p);
  const lines = [
    "# BEGIN train-server DOCKER-USER",
    `# ${HEADER}`,
    "*filter",
    ":DOCKER-USER - [0:0]",
  ];
  lines.push(
    // --ctstate DNAT: only connections to a port published on the host; traffic between containers (Prometheus
    // scraping :9100, Traefik reaching :3000/:8080, ...) also crosses DOCKER-USER and must never match
    `-A DOCKER-USER -p tcp -m conntrack --ctstate DNAT --ctorigdstport ${p.userPortRange.from}:${p.userPortRange.to} --ctdir ORIGINAL ! -s ${p.lanCidr} -j DROP`,
  );
  lines.push("-A DOCKER-USER -j RETURN", "COMMIT", "# END train-server DOCKER-USER", "");
  return lines.join("\n");
}

/** /etc/apt/sources.list.d/nvidia-container-toolkit.list ($(ARCH) is expanded by apt itself). */
export function renderNvidiaAptSource(): string {
  return (
    `# ${HEADER}\n` +
    "deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] " +
    "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /\n"
  );
}

/** Where the NVIDIA container toolkit's CLI lives (Debian/Ubuntu package nvidia-container-toolkit). */
export const NVIDIA_CTK = "/usr/bin/nvidia-ctk";
const DEV_CHAR_LINKS = `${NVIDIA_CTK} system create-dev-char-symlinks --create-all`;

/**
 * /etc/udev/rules.d/71-nvidia-dev-char.rules: the /dev/char/<major>:<minor> links of the NVIDIA device nodes,
 * made whenever the driver binds (boot, driver update). runc's systemd cgroup driver describes a container's
 * allowed devices to systemd by those paths; without them a `systemctl daemon-reload` (any package install does
 * one) rewrites the container's device rules without the GPUs: "Failed to initialize NVML: Unknown Error"
 * (NVIDIA/nvidia-container-toolkit#48, NVIDIA's recommended workaround).
 */
export function renderNvidiaDevCharRule(): string {
  return [`# ${HEADER}`, `ACTION=="add", DEVPATH=="/bus/pci/drivers/nvidia", RUN+="${DEV_CHAR_LINKS}"`, ""].join("\n");
}

/** /etc/systemd/system/ts-nvidia-dev-char.service: the same links at every boot, before Docker starts the workspaces. */
export function renderNvidiaDevCharUnit(): string {
  return [
    `# ${HEADER}`,
    "[Unit]",
    "Description=train-server: /dev/char links of the NVIDIA device nodes (GPUs survive systemctl daemon-reload)",
    "After=systemd-modules-load.service systemd-udevd.service",
    "Before=docker.service",
    "",
    "[Service]",
    "Type=oneshot",
    "RemainAfterExit=yes",
    `ExecStart=${DEV_CHAR_LINKS}`,
    "",
    "[Install]",
    "WantedBy=multi-user.target",
    "",
  ].join("\n");
}

/** Every baseline file, keyed by its name in $TS_FILES_DIR (the names baseline.sh reads). */
export function renderBaselineFiles(p: BaselineParams): Record<string, string> {
  validateBaselineParams(p);
  const files: Record<string, string> = {
    "sshd.conf": renderSshdConfig(p),
    "fail2ban-jail.conf": renderFail2banJail(p),
    "daemon.json": renderDockerDaemonJson(p),
    "docker-service.conf": renderDockerServiceDropIn(p),
    "ufw-rules": renderUfwRules(p),
    "ufw-docker-user.rules": renderUfwDockerUserRules(p),
    [WORKSPACE_SLICE]: renderWorkspaceSlice({ ramGb: p.ramGb, reservedRamGb: p.reservedRamGb }),
    // Docker's userns-remap: the lines of /etc/subuid and /etc/subgid for the remap user
    [`subid-${DOCKER_USERNS_REMAP.user}`]: renderDockerRemapSubIds(),
    // the workspaces' AppArmor profile (loaded where AppArmor runs)
    [`apparmor-${WORKSPACE_APPARMOR_PROFILE}`]: renderWorkspaceAppArmor(),
  };
  if (p.gpuCount > 0) {
    files["nvidia-container-toolkit.list"] = renderNvidiaAptSource();
    files["nvidia-dev-char.rules"] = renderNvidiaDevCharRule();
    files["ts-nvidia-dev-char.service"] = renderNvidiaDevCharUnit();
  }
  return files;
}
