/**
 * StorageArray: the BTRFS array (optionally behind bcache) built, adopted and reconciled by
 * host-scripts/storage.sh over SSH. Exports the filesystem UUID and the mountpoint.
 *
 * Production storage is `protect`ed and retained on delete: removing it from the program never wipes a
 * disk. A rig stack (`rig: true`) is neither, and its teardown wipes the array it made.
 */
import * as pulumi from "@pulumi/pulumi";
import type { ServerConfig } from "./config";
import { Host, HostScript } from "./host";

/** The subvolume layout under the mountpoint, in creation order (parents first). */
export const CACHE_DIRS = ["pip", "conda", "huggingface", "torch", "apt", "go", "npm", "docker", "gdrive"] as const;
export const SUBVOLUMES = [
  "homes",
  "workspaces",
  "shared",
  "docker-volumes",
  "docker-data",
  "cache",
  ...CACHE_DIRS.map((c) => `cache/${c}`),
  "snapshots",
] as const;

export interface StorageArrayArgs {
  config: ServerConfig;
  host: Host;
  /** Steps that must finish first. */
  after?: pulumi.Resource[];
}

/** TS_* inputs of storage.sh for a config (pure; tested). */
export function storageEnv(config: ServerConfig): Record<string, string> {
  const s = config.storage;
  return {
    TS_DEVICES: s.devices.join(" "),
    TS_DATA_PROFILE: s.dataProfile,
    TS_METADATA_PROFILE: s.metadataProfile,
    TS_CACHE_DEVICE: s.cache && s.cache.mode !== "none" ? s.cache.device : "",
    TS_CACHE_MODE: s.cache?.mode ?? "none",
    TS_MOUNTPOINT: s.mountpoint,
    TS_LABEL: s.label,
    TS_MOUNT_OPTIONS: s.mountOptions,
    TS_SUBVOLUMES: SUBVOLUMES.join(" "),
    TS_ALLOW_WIPE: config.rig ? "1" : "0",
    TS_CONVERT_PROFILE: s.convertProfile ? "1" : "0",
    TS_FSTAB: "/etc/fstab",
  };
}

export class StorageArray extends pulumi.ComponentResource {
  readonly mountpoint: string;
  /** UUID of the BTRFS filesystem, as reported by storage.sh. */
  readonly uuid: pulumi.Output<string>;
  /** Sizes of the array's devices in bytes, space-separated, as reported by storage.sh. */
  readonly deviceBytes: pulumi.Output<string>;
  /** The step later components depend on. */
  readonly ready: pulumi.Resource;

  constructor(name: string, args: StorageArrayArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:storage:StorageArray", name, {}, opts);
    const prod = !args.config.rig;
    const step = new HostScript(
      name,
      { host: args.host, script: "storage", env: storageEnv(args.config), keep: prod, after: args.after ?? [] },
      { parent: this },
    );
    this.mountpoint = args.config.storage.mountpoint;
    this.uuid = step.results.apply((r) => r.uuid ?? "");
    this.deviceBytes = step.results.apply((r) => r.device_bytes ?? "");
    this.ready = step.apply;
    this.registerOutputs({ mountpoint: this.mountpoint, uuid: this.uuid });
  }
}
