/**
 * The one mocks harness: runs the train-server program (or any program function) under
 * `pulumi.runtime.setMocks` with a given stack config and returns every registered resource with its type,
 * name, inputs (secrets marked), parent, dependencies and resource options. Used by the unit tests, the
 * offline plan (`npm run plan`) and the benchmarks.
 *
 * Parent and dependency edges are not passed to `Mocks.newResource`, so this file wraps the mock monitor's
 * `registerResource` (an internal hook of the SDK) — keep that knowledge here and nowhere else.
 */
import * as crypto from "crypto";
import * as pulumi from "@pulumi/pulumi";
import * as fs from "fs";
import * as path from "path";
import { isMap, isScalar, isSeq, LineCounter, parseDocument } from "yaml";
import { ConfigError, ConfigIssue, CONFIG_NAMESPACE, SECRET_KEYS } from "../components/config";

export const PROJECT = "train-server";
export const REPO_ROOT = path.resolve(__dirname, "..");

const SECRET_SIG_KEY = "4dabf18193072939515e22adb298388d";
const SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270";
const UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9";
/** How an output unknown at preview time appears in resolved program outputs. */
export const COMPUTED = "(computed)";

/** What the program registered for one resource. */
export interface Registered {
  urn: string;
  type: string;
  name: string;
  custom: boolean;
  /** Inputs with secrets unwrapped to their values (placeholders in the plan). */
  inputs: Record<string, any>;
  /** Top-level input keys whose value is, or contains, a secret. */
  secretInputs: string[];
  /** Top-level input keys unknown at preview time. */
  unknownInputs: string[];
  parent?: string;
  dependencies: string[];
  protect: boolean;
  retainOnDelete: boolean;
  deleteBeforeReplace: boolean;
  ignoreChanges: string[];
  provider?: string;
}

export interface RunResult<T> {
  resources: Registered[];
  /** The value the program function returned, with outputs resolved. */
  outputs: T;
  /** Look up resources by type (exact) and optional name. */
  byType(type: string): Registered[];
  one(type: string, name: string): Registered;
}

/** Stack config as it appears in Pulumi.<stack>.yaml: `train-server:key` (or `key`) → value. */
export type StackConfig = Record<string, unknown>;

/** Read `Pulumi.<stack>.yaml` and return its config with `secure:` values replaced by placeholders. */
export function readStackFile(stack: string, root: string = REPO_ROOT): { config: Record<string, string>; secretKeys: string[] } {
  const file = path.join(root, `Pulumi.${stack}.yaml`);
  if (!fs.existsSync(file)) throw new Error(`no stack file ${file} (stacks: ${listStacks(root).join(", ")})`);
  return toRuntimeConfig(parseStackText(fs.readFileSync(file, "utf8"), path.basename(file)));
}

/** A config path for messages: `train-server:host` → `host`, nested keys and indexes appended. */
function configPath(parts: Array<string | number>): string {
  let out = "";
  parts.forEach((p, i) => {
    if (typeof p === "number") out += `[${p}]`;
    else if (i === 0) out = p.startsWith(`${PROJECT}:`) ? p.slice(PROJECT.length + 1) : p;
    else out += `.${p}`;
  });
  return out;
}

/**
 * The `config:` mapping of a stack file's text. Everything a stack file cannot be is a ConfigError naming where:
 * a YAML syntax error (file:line:column), a duplicated key (its config path: other YAML readers keep one of the
 * two silently), a document that is not a mapping, a `config:` that is not one, an unknown tag, an alias bomb, a
 * number that is not finite, and a secret written in plain text.
 */
export function parseStackText(text: string, name = "Pulumi.<stack>.yaml"): StackConfig {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { uniqueKeys: false, lineCounter });
  const at = (offset: number | undefined) => {
    const pos = offset === undefined ? undefined : lineCounter.linePos(offset);
    return pos ? `${name}:${pos.line}:${pos.col}` : name;
  };
  const issues: ConfigIssue[] = [...doc.errors, ...doc.warnings].map((e) => ({
    path: e.linePos ? `${name}:${e.linePos[0].line}:${e.linePos[0].col}` : name,
    message: `YAML: ${e.message.split("\n")[0].replace(/ at line \d+, column \d+:?$/, "")}`,
  }));
  if (issues.length) throw new ConfigError(issues);
  const root = doc.contents;
  if (root !== null && !isMap(root)) throw new ConfigError([{ path: name, message: "is not a mapping; a stack file is `config:` with one `train-server:<key>: value` per line" }]);
  // duplicated keys, at any depth of config (and at the top level)
  const walk = (node: unknown, parts: Array<string | number>): void => {
    if (isMap(node)) {
      const seen = new Map<string, number | undefined>();
      for (const item of node.items) {
        const key = isScalar(item.key) ? String(item.key.value) : undefined;
        if (key === undefined) {
          issues.push({ path: at(item.key && (item.key as any).range?.[0]), message: "a key must be a plain name, not a list or mapping" });
          continue;
        }
        const offset = (item.key as any).range?.[0] as number | undefined;
        if (seen.has(key)) {
          const first = seen.get(key);
          issues.push({
            path: configPath([...parts, key]) || at(offset),
            message: `is given twice (${at(first)} and ${at(offset)}); YAML readers differ on which one wins: keep one`,
          });
        } else seen.set(key, offset);
        walk(item.value, [...parts, key]);
      }
    } else if (isSeq(node)) node.items.forEach((v, i) => walk(v, [...parts, i]));
  };
  if (isMap(root)) {
    const top = root.items.filter((i) => isScalar(i.key) && i.key.value === "config");
    const configNode = top[0]?.value;
    const topKeys = root.items.map((i) => (isScalar(i.key) ? String(i.key.value) : ""));
    topKeys.forEach((k, i) => {
      if (k && topKeys.indexOf(k) !== i) issues.push({ path: k, message: `is given twice (${at((root.items[topKeys.indexOf(k)].key as any)?.range?.[0])} and ${at((root.items[i].key as any)?.range?.[0])}); keep one` });
    });
    walk(configNode, []);
    if (issues.length) throw new ConfigError(issues);
    if (configNode !== undefined && configNode !== null && !isMap(configNode) && !(isScalar(configNode) && configNode.value === null))
      throw new ConfigError([{ path: "config", message: `must be a mapping of ${PROJECT}:<key> to values (found ${isSeq(configNode) ? "a list" : `the value ${JSON.stringify(String((configNode as any).value ?? configNode)).slice(0, 40)}`})` }]);
  }
  let js: any;
  try {
    js = doc.toJS({ maxAliasCount: 100 });
  } catch (e) {
    throw new ConfigError([{ path: name, message: `YAML: ${(e as Error).message.split("\n")[0]}` }]);
  }
  const cfg: StackConfig = (js?.config ?? {}) as StackConfig;
  for (const k of Object.keys(cfg)) {
    if (!k.includes(":")) issues.push({ path: k, message: `has no namespace; the Pulumi CLI only reads keys of the form <namespace>:<name>: write ${PROJECT}:${k}` });
  }
  // values JSON cannot carry: .nan/.inf would arrive as null, !!binary as a byte array
  const strange = (v: unknown, parts: Array<string | number>): void => {
    if (typeof v === "number" && !Number.isFinite(v)) issues.push({ path: configPath(parts), message: `is ${String(v)} (YAML .nan/.inf), not a number; give a number` });
    else if (ArrayBuffer.isView(v)) issues.push({ path: configPath(parts), message: "is a YAML !!binary value; give plain text" });
    else if (Array.isArray(v)) v.forEach((x, i) => strange(x, [...parts, i]));
    else if (v && typeof v === "object" && !("secure" in v && parts.length === 1)) Object.entries(v).forEach(([k, x]) => strange(x, [...parts, k]));
  };
  for (const [k, v] of Object.entries(cfg)) strange(v, [k]);
  for (const key of SECRET_KEYS) {
    for (const k of [key, `${CONFIG_NAMESPACE}:${key}`]) {
      const v = cfg[k];
      if (v !== undefined && !(v && typeof v === "object" && "secure" in v))
        issues.push({ path: key, message: `is in plain text in the stack file, but it is a secret: delete the line and set it with: pulumi config set --secret ${key} <value>` });
    }
  }
  if (issues.length) throw new ConfigError(issues);
  return cfg;
}

export function listStacks(root: string = REPO_ROOT): string[] {
  return fs
    .readdirSync(root)
    .map((f) => /^Pulumi\.(.+)\.yaml$/.exec(f)?.[1])
    .filter((s): s is string => !!s)
    .sort();
}

/** Convert stack config values to the runtime's string map; `{secure: …}` values get a placeholder. */
export function toRuntimeConfig(cfg: StackConfig): { config: Record<string, string>; secretKeys: string[] } {
  const config: Record<string, string> = {};
  const secretKeys: string[] = [];
  const spelled = new Map<string, string>();
  const issues: ConfigIssue[] = [];
  for (const [k, v] of Object.entries(cfg)) {
    const key = k.includes(":") ? k : `${PROJECT}:${k}`;
    const other = spelled.get(key);
    if (other !== undefined) issues.push({ path: configPath([key]), message: `is given twice (as "${other}" and as "${k}"); keep one` });
    spelled.set(key, k);
    if (v && typeof v === "object" && !Array.isArray(v) && "secure" in (v as object)) {
      // shaped like the real value where the program knows the key, so the renderers validate it as they would
      const name = key.slice(key.indexOf(":") + 1);
      config[key] = key.startsWith(`${PROJECT}:`) && name in PLACEHOLDER_SECRETS ? PLACEHOLDER_SECRETS[name] : `<secret ${name}>`;
      secretKeys.push(key);
    } else {
      config[key] = typeof v === "string" ? v : JSON.stringify(v);
    }
  }
  if (issues.length) throw new ConfigError(issues);
  return { config, secretKeys };
}

/**
 * Placeholder secrets for offline runs (plan, tests, bench): shaped like the real values, so every renderer's
 * validation runs as it would on real secrets, but useless outside this repository.
 */
export const PLACEHOLDER_SECRETS: Record<string, string> = {
  sshPrivateKey: "-----BEGIN OPENSSH PRIVATE KEY-----\nplaceholder-ssh-private-key\n-----END OPENSSH PRIVATE KEY-----\n",
  telegramBotToken: "123456789:placeholder-telegram-bot-token",
  googleClientSecret: "placeholder-google-client-secret",
  rcloneConfig: "[gdrive]\ntype = drive\nscope = drive\nteam_drive = placeholder\n# placeholder-rclone-config\n",
};

/** Default mock values for resources whose outputs the program reads. */
function mockState(type: string, name: string, inputs: Record<string, any>, preview: boolean): Record<string, any> {
  switch (type) {
    case "command:remote:Command":
      // in a preview a command has not run: its output is unknown, as `pulumi preview` shows it
      return { ...inputs, stdout: preview ? UNKNOWN : "", stderr: preview ? UNKNOWN : "" };
    case "docker:index/network:Network":
      // Docker assigns a subnet and gateway when none is configured, and the provider reads them back
      return { ...inputs, ipamConfigs: inputs.ipamConfigs ?? (preview ? UNKNOWN : [{ subnet: "172.18.0.0/16", gateway: "172.18.0.1" }]) };
    case "random:index/randomPassword:RandomPassword":
      // the real provider marks these secret (additionalSecretOutputs); so do the mocks
      return { ...inputs, result: pulumi.secret(`mock-password-${name}`), bcryptHash: pulumi.secret(`mock-bcrypt-${name}`) };
    case "random:index/randomId:RandomId": {
      // byteLength random bytes, deterministic per name; hex is not secret in the real provider either
      const hex = crypto.createHash("sha256").update(name).digest("hex").repeat(8).slice(0, 2 * (inputs.byteLength ?? 8));
      return { ...inputs, hex, b64Std: Buffer.from(hex, "hex").toString("base64"), dec: BigInt(`0x${hex}`).toString(), id: hex };
    }
    default:
      return inputs;
  }
}

function unwrap(value: any, found: { secret: boolean; unknown: boolean }): any {
  if (value === UNKNOWN) {
    found.unknown = true;
    return value;
  }
  if (Array.isArray(value)) return value.map((v) => unwrap(v, found));
  if (value && typeof value === "object") {
    if (value[SECRET_SIG_KEY] === SECRET_SIG) {
      found.secret = true;
      return unwrap(value.value, found);
    }
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, unwrap(v, found)]));
  }
  return value;
}

async function resolveDeep(v: any): Promise<any> {
  if (pulumi.Output.isInstance(v)) {
    // an unknown output (preview) never runs apply callbacks: read it through the Output's own promises
    const o = v as any;
    if (!(await o.isKnown)) return COMPUTED;
    return resolveDeep(await o.promise());
  }
  if (v instanceof Promise) return resolveDeep(await v);
  if (pulumi.Resource.isInstance(v)) return v;
  if (Array.isArray(v)) return Promise.all(v.map(resolveDeep));
  if (v && typeof v === "object" && Object.getPrototypeOf(v) === Object.prototype) {
    const out: Record<string, any> = {};
    for (const [k, x] of Object.entries(v)) out[k] = await resolveDeep(x);
    return out;
  }
  return v;
}

export interface RunOptions {
  stack?: string;
  /** Run as a preview (unknowns stay unknown), as `pulumi preview` would. */
  preview?: boolean;
}

/**
 * Run `program` under mocks with the given runtime config (`train-server:key` → string) and secret keys.
 * Waits for every registration and returns what was registered.
 */
export async function runUnderMocks<T>(
  program: () => T,
  config: Record<string, string>,
  secretKeys: string[] = [],
  opts: RunOptions = {},
): Promise<RunResult<Awaited<T>>> {
  const resources: Registered[] = [];
  await pulumi.runtime.setMocks(
    {
      newResource: (args) => ({ id: args.inputs.name ?? `${args.name}-id`, state: mockState(args.type, args.name, args.inputs, opts.preview ?? false) }),
      call: (args) => args.inputs,
    },
    PROJECT,
    opts.stack ?? "test",
    opts.preview ?? false,
  );
  const monitor = pulumi.runtime.getMonitor() as any;
  const original = monitor.registerResource.bind(monitor);
  monitor.registerResource = (req: any, callback: any) => {
    const raw = req.getObject()?.toJavaScript() ?? {};
    const inputs: Record<string, any> = {};
    const secretInputs: string[] = [];
    const unknownInputs: string[] = [];
    for (const [k, v] of Object.entries(raw)) {
      const found = { secret: false, unknown: false };
      inputs[k] = unwrap(v, found);
      if (found.secret) secretInputs.push(k);
      if (found.unknown) unknownInputs.push(k);
    }
    const type: string = req.getType();
    const name: string = req.getName();
    const parent: string = req.getParent();
    const entry: Registered = {
      urn: "",
      type,
      name,
      custom: req.getCustom(),
      inputs,
      secretInputs,
      unknownInputs,
      ...(parent ? { parent } : {}),
      dependencies: req.getDependenciesList(),
      protect: !!req.getProtect(),
      retainOnDelete: !!req.getRetainondelete(),
      deleteBeforeReplace: !!req.getDeletebeforereplace(),
      ignoreChanges: req.getIgnorechangesList(),
      ...(req.getProvider() ? { provider: req.getProvider() } : {}),
    };
    resources.push(entry);
    return original(req, (err: any, resp: any) => {
      if (resp) entry.urn = resp.getUrn();
      callback(err, resp);
    });
  };
  pulumi.runtime.setAllConfig(config, secretKeys);
  let value: T;
  try {
    value = program();
  } finally {
    // wait for every registration, even when the program threw half way
    await pulumi.runtime.disconnect();
  }
  const outputs = (await resolveDeep(value)) as Awaited<T>;
  return {
    resources,
    outputs,
    byType: (t) => resources.filter((r) => r.type === t),
    one: (t, n) => {
      const r = resources.find((x) => x.type === t && x.name === n);
      if (!r) throw new Error(`no ${t} named ${n}; have: ${resources.filter((x) => x.type === t).map((x) => x.name).join(", ")}`);
      return r;
    },
  };
}

/**
 * Whether `urn` depends on `target`, directly or transitively, through explicit dependency edges. A dependency
 * on a component counts as a dependency on all of its children (the engine waits for them). A parent's
 * dependencies are NOT inherited by its children, so they are not followed.
 */
export function dependsOn(res: Registered[], urn: string, target: string): boolean {
  const byUrn = new Map(res.map((r) => [r.urn, r]));
  const seen = new Set<string>();
  const walk = (u: string): boolean => {
    if (seen.has(u)) return false;
    seen.add(u);
    for (const d of byUrn.get(u)?.dependencies ?? []) {
      if (d === target || isAncestor(res, d, target)) return true;
      if (walk(d)) return true;
    }
    return false;
  };
  return walk(urn);
}

/** Whether `ancestor` is `urn`'s parent, grandparent, … */
export function isAncestor(res: Registered[], ancestor: string, urn: string): boolean {
  const byUrn = new Map(res.map((r) => [r.urn, r]));
  let cur = byUrn.get(urn)?.parent;
  while (cur) {
    if (cur === ancestor) return true;
    cur = byUrn.get(cur)?.parent;
  }
  return false;
}

/** What changes between two runs of the program: resources added, removed, and changed (inputs or options). */
export interface GraphDiff {
  added: string[];
  removed: string[];
  changed: string[];
}

/** Key of a resource across runs: type and name (URNs are type chain + name, so this is what the engine keys on). */
function keyOf(r: Registered): string {
  return `${r.type}::${r.name}`;
}

export function diffRuns(before: Registered[], after: Registered[]): GraphDiff {
  const a = new Map(before.map((r) => [keyOf(r), r]));
  const b = new Map(after.map((r) => [keyOf(r), r]));
  const snapshot = (r: Registered) => JSON.stringify([r.inputs, r.protect, r.retainOnDelete, r.deleteBeforeReplace, r.parent ? true : false]);
  return {
    added: [...b.keys()].filter((k) => !a.has(k)).sort(),
    removed: [...a.keys()].filter((k) => !b.has(k)).sort(),
    changed: [...b.keys()].filter((k) => a.has(k) && snapshot(a.get(k)!) !== snapshot(b.get(k)!)).sort(),
  };
}
