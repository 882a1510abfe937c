/**
 * The REPLAYER: runs the train-server program under mocks with a stack config, takes the exact
 * `command:remote:Command` resources it registers (create / update / delete / stdin / triggers / connection) and
 * executes them over real SSH the way the Pulumi engine would:
 *   up       every command in dependency order (a dependency on a component = on all its children): `create`
 *            with `stdin`; later ups re-run a command only when its inputs differ from the recorded state;
 *   destroy  `delete` of every command in reverse order, except retainOnDelete ones; a protected resource stops
 *            the destroy before anything runs (as `pulumi destroy` refuses).
 * The SSH target, user and key come from each command's own `connection` input. Resources of other providers
 * (Docker, Cloudflare, random) cannot run here; they are reported as skipped, never faked.
 */
import { parseResults } from "../../components/host";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { CONFIG_NAMESPACE } from "../../components/config";
import { buildProgram } from "../../components/program";
import { Registered, runUnderMocks, toRuntimeConfig } from "../../tools/harness";
import { ExecResult } from "./nspawn";
import { clone, stackRaw, TEST_SECRETS } from "./program";
import { Rig, sshRun } from "./rig";

export const CMD = "command:remote:Command";

/** The Drive and the GCS bucket of a rig: local directories behind rclone alias remotes. */
export const RIG_RCLONE_CONFIG = "[gdrive]\ntype = alias\nremote = /srv/rig-drive\n\n[gcs]\ntype = alias\nremote = /srv/rig-bucket\n";
/** The ops jobs (all of them can run on a rig: its remotes are local). */
export const RIG_OPS_JOBS = ["snapshot", "usage-collector", "scrub", "backup", "verify-restore", "data-sync"];

/**
 * The rig stack (Pulumi.rig.yaml) aimed at a booted rig: its address, LAN and loop disks, its own SSH host key pinned
 * (as a production stack must: host.hostKey is required unless rig), its admin's key and the local remotes. Returns
 * the raw config (keys without namespace) and the secrets.
 */
export function rigStack(rig: Rig): { raw: Record<string, any>; secrets: Record<string, string> } {
  const raw = clone(stackRaw("rig"));
  // the rig's own host key pinned, as the README tells admins to: every replayed command verifies it
  raw.host = { ...raw.host, address: rig.address, lanAddress: rig.address, lanCidr: rig.lanCidr, hostKey: rig.hostKey };
  raw.storage = { ...raw.storage, devices: rig.devices };
  return { raw, secrets: { ...TEST_SECRETS, sshPrivateKey: rig.privateKey, rcloneConfig: RIG_RCLONE_CONFIG } };
}

/** Google's side of a rig: the fake Drive and bucket the alias remotes point to (outside the program). */
export function rigRemotes(rig: Rig): void {
  rig.run("mkdir -p /srv/rig-drive /srv/rig-bucket/rig-bucket && echo dataset > /srv/rig-bucket/rig-bucket/train.csv");
}

/** One remote command as the program registered it. */
export interface RemoteCommand {
  urn: string;
  name: string;
  create: string;
  update?: string;
  delete?: string;
  stdin?: string;
  triggers?: unknown[];
  connection: { host: string; port?: number; user?: string; privateKey?: string; hostKey?: string };
  protect: boolean;
  retainOnDelete: boolean;
  /** URNs of the commands it waits for. */
  after: string[];
  /** Every input, as recorded in the state (for "did anything change"). */
  inputs: Record<string, unknown>;
}

export interface Plan {
  /** Remote commands in an order the engine could run them (dependencies first). */
  commands: RemoteCommand[];
  /** Every other custom resource: type and name (cannot run against the rig). */
  skipped: Array<{ type: string; name: string }>;
}

/** Run the program under mocks with `raw` stack config (keys without namespace) and `secrets`; return the plan. */
export async function planOf(raw: Record<string, unknown>, secrets: Record<string, string>): Promise<Plan> {
  const { config } = toRuntimeConfig(raw);
  const secretKeys: string[] = [];
  for (const [k, v] of Object.entries(secrets)) {
    config[`${CONFIG_NAMESPACE}:${k}`] = v;
    secretKeys.push(`${CONFIG_NAMESPACE}:${k}`);
  }
  const { resources } = await runUnderMocks(() => buildProgram().outputs, config, secretKeys);
  return planFromResources(resources);
}

/** Order the remote commands topologically by their dependency edges (registration order breaks ties). */
export function planFromResources(resources: Registered[]): Plan {
  const children = new Map<string, Registered[]>();
  for (const r of resources) if (r.parent) children.set(r.parent, [...(children.get(r.parent) ?? []), r]);
  const byUrn = new Map(resources.map((r) => [r.urn, r]));
  /** The commands a dependency on `urn` stands for: the command itself, or every command under a component. */
  const commandsOf = (urn: string): string[] => {
    const r = byUrn.get(urn);
    if (!r) return [];
    if (r.type === CMD) return [urn];
    if (r.custom) return [];
    return (children.get(urn) ?? []).flatMap((c) => commandsOf(c.urn));
  };
  const cmds = resources.filter((r) => r.type === CMD);
  const commands: RemoteCommand[] = cmds.map((r) => {
    const i = r.inputs;
    if (typeof i.create !== "string") throw new Error(`${r.name}: no create command`);
    if (!i.connection?.host) throw new Error(`${r.name}: no connection host`);
    return {
      urn: r.urn,
      name: r.name,
      create: i.create,
      ...(typeof i.update === "string" ? { update: i.update } : {}),
      ...(typeof i.delete === "string" ? { delete: i.delete } : {}),
      ...(typeof i.stdin === "string" ? { stdin: i.stdin } : {}),
      ...(Array.isArray(i.triggers) ? { triggers: i.triggers } : {}),
      connection: i.connection,
      protect: r.protect,
      retainOnDelete: r.retainOnDelete,
      after: [...new Set(r.dependencies.flatMap(commandsOf))].filter((u) => u !== r.urn),
      inputs: i,
    };
  });
  // Kahn's algorithm, stable by registration order
  const done = new Set<string>();
  const ordered: RemoteCommand[] = [];
  while (ordered.length < commands.length) {
    const next = commands.find((c) => !done.has(c.urn) && c.after.every((u) => done.has(u)));
    if (!next) throw new Error(`dependency cycle among ${commands.filter((c) => !done.has(c.urn)).map((c) => c.name).join(", ")}`);
    done.add(next.urn);
    ordered.push(next);
  }
  const skipped = resources.filter((r) => r.custom && r.type !== CMD).map((r) => ({ type: r.type, name: r.name }));
  return { commands: ordered, skipped };
}

/** What running one command did. */
export interface CommandRun extends ExecResult {
  name: string;
  /** create | update | delete */
  op: string;
  ms: number;
  /** `key=value` lines of stdout (host-script results). */
  results: Record<string, string>;
}

/** The state the replayer keeps between runs: each command's inputs when it last ran, by name. */
export type ReplayState = Map<string, RemoteCommand>;

export class Replayer {
  readonly state: ReplayState = new Map();
  private readonly keyDir = fs.mkdtempSync(path.join(os.tmpdir(), "ts-replay-"));
  private keyN = 0;
  private readonly keys = new Map<string, string>();

  /** Remove the key files this replayer wrote. */
  cleanup(): void {
    fs.rmSync(this.keyDir, { recursive: true, force: true });
  }

  /** Run one command string of `c` over SSH with the connection's own key. */
  run(c: RemoteCommand, op: "create" | "update" | "delete", input?: string): CommandRun {
    const line = op === "delete" ? c.delete : op === "update" ? (c.update ?? c.create) : c.create;
    if (line === undefined) throw new Error(`${c.name} has no ${op} command`);
    const key = c.connection.privateKey;
    if (!key) throw new Error(`${c.name}: the connection has no privateKey`);
    let keyFile = this.keys.get(key);
    if (!keyFile) {
      keyFile = path.join(this.keyDir, `key${this.keyN++}`);
      fs.writeFileSync(keyFile, key.endsWith("\n") ? key : key + "\n", { mode: 0o600 });
      this.keys.set(key, keyFile);
    }
    const t0 = Date.now();
    const r = sshRun({ host: c.connection.host, port: c.connection.port ?? 22, user: c.connection.user ?? "root", keyFile, hostKey: c.connection.hostKey }, line, input);
    return { ...r, name: c.name, op, ms: Date.now() - t0, results: parseResults(r.stdout) };
  }

  /**
   * `pulumi up`: each command whose inputs differ from the state (or that is new) runs — `create` when new,
   * `update` (or `create`) when changed — in dependency order; the first failure stops the run (as the engine
   * stops that branch). Commands gone from the plan are deleted (reverse order). Returns what ran.
   */
  up(plan: Plan): CommandRun[] {
    const runs: CommandRun[] = [];
    const wanted = new Set(plan.commands.map((c) => c.name));
    const gone = [...this.state.values()].filter((c) => !wanted.has(c.name)).reverse();
    for (const c of plan.commands) {
      const prev = this.state.get(c.name);
      if (prev && sameInputs(prev, c)) {
        this.state.set(c.name, c); // options (protect, retainOnDelete) change in the state only
        continue;
      }
      const r = this.run(c, prev ? "update" : "create", c.stdin);
      runs.push(r);
      if (r.status !== 0) throw new RunFailed(r, runs);
      this.state.set(c.name, c);
    }
    runs.push(...this.deleteAll(gone));
    return runs;
  }

  /** `pulumi destroy`: refuse when anything is protected, else delete in reverse order (retainOnDelete: dropped). */
  destroy(plan: Plan): CommandRun[] {
    const protectedOnes = plan.commands.filter((c) => c.protect).map((c) => c.name);
    if (protectedOnes.length) throw new Error(`pulumi destroy refuses: protected resources ${protectedOnes.join(", ")}`);
    const runs = this.deleteAll([...plan.commands].reverse());
    return runs;
  }

  private deleteAll(cmds: RemoteCommand[]): CommandRun[] {
    const runs: CommandRun[] = [];
    for (const c of cmds) {
      if (c.delete !== undefined && !c.retainOnDelete) {
        const r = this.run(c, "delete");
        runs.push(r);
        if (r.status !== 0) throw new RunFailed(r, runs);
      }
      this.state.delete(c.name);
    }
    return runs;
  }
}

/** Whether two registrations of a command have identical inputs (what the engine diffs; options do not count). */
export function sameInputs(a: RemoteCommand, b: RemoteCommand): boolean {
  return JSON.stringify(a.inputs) === JSON.stringify(b.inputs);
}

export class RunFailed extends Error {
  constructor(
    readonly run: CommandRun,
    readonly runs: CommandRun[],
  ) {
    super(`${run.name} (${run.op}) exited ${run.status}:\n${run.stderr.slice(-4000)}\n${run.stdout.slice(-1000)}`);
    this.name = "RunFailed";
  }
}

