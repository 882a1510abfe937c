/**
 * UserAccounts: Linux accounts with stable UIDs, key-only SSH, home/workspace/docker-volumes subvolumes and
 * per-user qgroups, by host-scripts/users.sh. Removing a user from config archives their home (read-only
 * snapshot) and locks the account; nothing is deleted.
 */
import * as path from "path";
import * as pulumi from "@pulumi/pulumi";
import type { ServerConfig, UserConfig } from "./config";
import { SHARED_GID, SHARED_GROUP } from "./baseline";
import { Host, HostScript } from "./host";
import { homeSnapshotDir, RESTORE_SPOOL } from "./render/ops";

export interface UserAccountsArgs {
  config: ServerConfig;
  host: Host;
  /** Steps that must finish first. */
  after?: pulumi.Resource[];
}

/** One TS_USERS record: `name|uid|admin|quota_gb|authorized_keys_base64`. */
export function userRecord(u: UserConfig): string {
  const keys = Buffer.from(u.sshKeys.join("\n") + "\n", "utf8").toString("base64");
  return [u.name, String(u.uid), u.admin ? "1" : "0", String(u.quotaGb), keys].join("|");
}

/** TS_* inputs of users.sh (pure; tested). Users are sorted by uid so list order never matters. */
export function usersEnv(config: ServerConfig): Record<string, string> {
  const users = [...config.users].sort((a, b) => a.uid - b.uid);
  return {
    TS_MOUNTPOINT: config.storage.mountpoint,
    TS_USERS: users.map(userRecord).join("\n"),
    TS_STATE_DIR: "/var/lib/train-server/state",
    TS_SHARED_GROUP: SHARED_GROUP,
    TS_SHARED_GID: String(SHARED_GID),
    TS_ALLOW_WIPE: config.rig ? "1" : "0",
    // each user's own snapshot directory and restore spool (bind-mounted into their workspace only)
    TS_HOME_SNAPSHOTS_DIR: path.posix.dirname(homeSnapshotDir(config.storage.mountpoint, "-")),
    TS_RESTORE_SPOOL: RESTORE_SPOOL,
  };
}

export class UserAccounts extends pulumi.ComponentResource {
  readonly ready: pulumi.Resource;
  readonly results: pulumi.Output<Record<string, string>>;

  constructor(name: string, args: UserAccountsArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:users:UserAccounts", name, {}, opts);
    const step = new HostScript(
      name,
      { host: args.host, script: "users", env: usersEnv(args.config), keep: !args.config.rig, after: args.after ?? [] },
      { parent: this },
    );
    this.ready = step.apply;
    this.results = step.results;
    this.registerOutputs({ users: args.config.users.map((u) => u.name) });
  }
}
