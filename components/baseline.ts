/**
 * HostBaseline: sshd hardening, UFW + the DOCKER-USER LAN filter, fail2ban, Docker with its data root on the
 * array (btrfs driver), the NVIDIA container toolkit on GPU hosts, and the shared cache directories — by
 * host-scripts/baseline.sh with files rendered by components/render/baseline.ts.
 */
import * as pulumi from "@pulumi/pulumi";
import { DESKTOP_PORT_BASE, SSH_PORT_BASE, UID_MAX, UID_MIN } from "./config";
import type { ServerConfig } from "./config";
import { Host, HostScript } from "./host";
import { BaselineParams, renderBaselineFiles } from "./render/baseline";

/** The group that owns the shared caches (same gid on the host and inside every workspace). */
export const SHARED_GROUP = "mlusers";
export const SHARED_GID = 2000;

export interface HostBaselineArgs {
  config: ServerConfig;
  host: Host;
  /** Steps that must finish first. */
  after?: pulumi.Resource[];
}

/** Renderer parameters for a config (pure). */
export function baselineParams(config: ServerConfig): BaselineParams {
  return {
    sshPort: config.host.sshPort,
    lanCidr: config.host.lanCidr,
    // every slot's SSH (2222+slot) and desktop (4000+slot) port: the two ranges overlap, so one range covers both
    userPortRange: { from: Math.min(SSH_PORT_BASE, DESKTOP_PORT_BASE), to: Math.max(SSH_PORT_BASE, DESKTOP_PORT_BASE) + (UID_MAX - UID_MIN) },
    adminUser: config.host.sshUser,
    dataRoot: `${config.storage.mountpoint}/docker-data`,
    mountpoint: config.storage.mountpoint,
    ramGb: config.host.ramGb,
    reservedRamGb: config.host.reservedRamGb,
    gpuCount: config.host.gpu.count,
  };
}

/** TS_* inputs of baseline.sh (pure). */
export function baselineEnv(config: ServerConfig): Record<string, string> {
  return {
    TS_MOUNTPOINT: config.storage.mountpoint,
    TS_SSH_PORT: String(config.host.sshPort),
    TS_SSH_ADMIN_USER: config.host.sshUser,
    TS_GPU_COUNT: String(config.host.gpu.count),
    TS_SHARED_GROUP: SHARED_GROUP,
    TS_SHARED_GID: String(SHARED_GID),
    TS_ALLOW_WIPE: config.rig ? "1" : "0",
  };
}

export class HostBaseline extends pulumi.ComponentResource {
  readonly ready: pulumi.Resource;

  constructor(name: string, args: HostBaselineArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:baseline:HostBaseline", name, {}, opts);
    const step = new HostScript(
      name,
      { host: args.host, script: "baseline", env: baselineEnv(args.config), files: renderBaselineFiles(baselineParams(args.config)), keep: !args.config.rig, after: args.after ?? [] },
      { parent: this },
    );
    this.ready = step.apply;
    this.registerOutputs({});
  }
}
