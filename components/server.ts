/**
 * TrainServer: the root component. Composes everything one server needs, in dependency order, from one
 * validated ServerConfig. Nothing here is a module-level singleton, so a fleet later is a list of these.
 */
import * as pulumi from "@pulumi/pulumi";
import type { ServerConfig, ServerSecrets } from "./config";
import { Host } from "./host";
import { StorageArray } from "./storage";
import { UserAccounts } from "./users";

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
}

export class TrainServer extends pulumi.ComponentResource {
  readonly host: Host;
  readonly storage: StorageArray;
  readonly users: UserAccounts;
  readonly userOutputs: Record<string, UserOutputs>;

  constructor(name: string, args: TrainServerArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:index:TrainServer", name, {}, opts);
    const { config, secrets } = args;
    this.host = new Host(`${name}-host`, { config, privateKey: secrets.sshPrivateKey }, { parent: this });
    this.storage = new StorageArray(`${name}-storage`, { config, host: this.host }, { parent: this });
    this.users = new UserAccounts(`${name}-users`, { config, host: this.host }, { parent: this, dependsOn: [this.storage.ready] });
    this.userOutputs = Object.fromEntries(
      config.users.map((u) => [
        u.name,
        {
          uid: u.uid,
          sshPort: u.sshPort,
          desktopPort: u.desktopPort,
          codeUrl: `https://${u.name}-code.${config.domain}`,
          jupyterUrl: `https://${u.name}-jupyter.${config.domain}`,
        },
      ]),
    );
    this.registerOutputs({ mountpoint: this.storage.mountpoint, uuid: this.storage.uuid, users: this.userOutputs });
  }
}
