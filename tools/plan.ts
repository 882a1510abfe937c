/**
 * Offline plan: `npm run plan [-- --stack NAME]` (default stack: prod).
 * Runs the program under mocks with Pulumi.<stack>.yaml (secrets get placeholder values, unknowns print as
 * computed), then prints the resource tree — component, type, name, key inputs — and a count per type.
 * Needs no credentials and no server. Bad config prints every problem with its path and exits 1.
 */
import { ConfigError, CONFIG_NAMESPACE, SECRET_KEYS } from "../components/config";
import { buildProgram } from "../components/program";
import * as path from "path";
import { listStacks, PLACEHOLDER_SECRETS, readStackFile, Registered, REPO_ROOT, RunResult, runUnderMocks } from "./harness";

const SHOWN_WIDTH = 100;

function show(value: unknown): string {
  let text = typeof value === "string" && value.length > 60 ? `${JSON.stringify(value.slice(0, 40) + "…")} (${value.length} bytes)` : JSON.stringify(value);
  if (text.length > SHOWN_WIDTH) text = text.slice(0, SHOWN_WIDTH) + "…";
  return text;
}

/** Key inputs of a resource as display lines: scalars on one line, maps (e.g. a step's env) one entry per line. */
function summarize(r: Registered): string[] {
  const inline: string[] = [];
  const blocks: string[] = [];
  for (const [k, v] of Object.entries(r.inputs)) {
    if (k === "connection") continue;
    if (r.unknownInputs.includes(k)) inline.push(`${k}=(computed)`);
    else if (r.secretInputs.includes(k)) inline.push(typeof v === "string" && v.length > 40 ? `${k}=[secret, ${v.length} bytes]` : `${k}=[secret]`);
    else if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length > 2) {
      blocks.push(`${k}:`, ...Object.entries(v).map(([sk, sv]) => `  ${sk}=${show(sv)}`));
    } else inline.push(`${k}=${show(v)}`);
  }
  const flags = [r.protect && "protect", r.retainOnDelete && "retainOnDelete", r.deleteBeforeReplace && "deleteBeforeReplace"].filter(Boolean);
  if (flags.length) inline.push(`[${flags.join(", ")}]`);
  return [...(inline.length ? [inline.join("  ")] : []), ...blocks];
}

export function renderTree(resources: Registered[]): string {
  const children = new Map<string, Registered[]>();
  const roots: Registered[] = [];
  for (const r of resources) {
    if (r.parent && resources.some((p) => p.urn === r.parent)) {
      const list = children.get(r.parent) ?? [];
      list.push(r);
      children.set(r.parent, list);
    } else if (r.type !== "pulumi:pulumi:Stack") roots.push(r);
  }
  const lines: string[] = [];
  const walk = (r: Registered, depth: number) => {
    const pad = "  ".repeat(depth);
    lines.push(`${pad}${r.custom ? "+" : "□"} ${r.type}  ${r.name}`);
    for (const line of summarize(r)) lines.push(`${pad}    ${line}`);
    for (const c of children.get(r.urn) ?? []) walk(c, depth + 1);
  };
  roots.forEach((r) => walk(r, 0));
  return lines.join("\n");
}

export function countByType(resources: Registered[]): string {
  const counts = new Map<string, number>();
  for (const r of resources) counts.set(r.type, (counts.get(r.type) ?? 0) + 1);
  const width = Math.max(...[...counts.keys()].map((k) => k.length));
  return [...counts.entries()]
    .sort((a, b) => a[0].localeCompare(b[0]))
    .map(([t, n]) => `  ${t.padEnd(width)}  ${n}`)
    .join("\n");
}

/** The value of `--name VALUE` or `--name=VALUE`. */
function option(args: string[], name: string): string | undefined {
  const i = args.indexOf(name);
  if (i >= 0) return args[i + 1];
  return args.find((a) => a.startsWith(`${name}=`))?.slice(name.length + 1);
}

/**
 * The program under mocks with `DIR/Pulumi.NAME.yaml`, read as the offline plan reads it (secrets the file does not
 * set get placeholders). Bad config, also at the YAML level (syntax, duplicated keys, a `config:` that is not a
 * mapping), throws a ConfigError. `preview: false` resolves every output (as `pulumi up` would).
 */
export async function planStack(stack: string, root?: string, preview = true): Promise<RunResult<unknown>> {
  const { config, secretKeys } = readStackFile(stack, root);
  for (const key of SECRET_KEYS) {
    const full = `${CONFIG_NAMESPACE}:${key}`;
    if (!(full in config)) {
      config[full] = PLACEHOLDER_SECRETS[key];
      secretKeys.push(full);
    }
  }
  return runUnderMocks(() => buildProgram().outputs, config, secretKeys, { stack, preview });
}

/**
 * `plan [--stack NAME] [--root DIR]`: prints the plan of `DIR/Pulumi.NAME.yaml` (default: prod, this repository)
 * and returns the exit code: 0 planned, 1 bad config (also a stack file that is not valid YAML), 2 usage or no such stack.
 */
export async function main(args: string[]): Promise<number> {
  const stack = option(args, "--stack") ?? "prod";
  const root = option(args, "--root");
  if (!/^[A-Za-z0-9._-]+$/.test(stack)) {
    console.error(`usage: npm run plan -- --stack NAME   (stacks: ${listStacks(root).join(", ")})`);
    return 2;
  }
  if (!listStacks(root).includes(stack)) {
    console.error(`no stack file ${path.join(root ?? REPO_ROOT, `Pulumi.${stack}.yaml`)} (stacks: ${listStacks(root).join(", ")})`);
    return 2;
  }
  const started = process.hrtime.bigint();
  try {
    const result = await planStack(stack, root);
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    console.log(`Offline plan of stack "${stack}" (under mocks: no server, no credentials; secrets are placeholders)\n`);
    console.log(renderTree(result.resources));
    console.log(`\nResources by type:\n${countByType(result.resources)}`);
    console.log(`\n${result.resources.length} resources, planned in ${ms.toFixed(0)} ms`);
    return 0;
  } catch (e) {
    if (e instanceof ConfigError) {
      console.error(`Stack "${stack}": ${e.message}`);
      return 1;
    }
    throw e;
  }
}

if (require.main === module) {
  // a program that never settles must not look like success
  process.exitCode = 1;
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (e) => {
      console.error(e);
      process.exit(1);
    },
  );
}
