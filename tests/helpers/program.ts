/** Helpers for unit tests: the example stacks as raw objects, and running the program under mocks. */
import { parse as parseYaml } from "yaml";
import * as fs from "fs";
import * as path from "path";
import { CONFIG_NAMESPACE, SECRET_KEYS } from "../../components/config";
import { buildProgram } from "../../components/program";
import { PLACEHOLDER_SECRETS, REPO_ROOT, runUnderMocks, toRuntimeConfig } from "../../tools/harness";

/** Pulumi.<stack>.yaml's config as a plain object keyed without the namespace (`host`, `users`, …). */
export function stackRaw(stack: string): Record<string, any> {
  const doc = parseYaml(fs.readFileSync(path.join(REPO_ROOT, `Pulumi.${stack}.yaml`), "utf8"));
  const out: Record<string, any> = {};
  for (const [k, v] of Object.entries(doc.config ?? {})) out[k.replace(`${CONFIG_NAMESPACE}:`, "")] = v;
  return out;
}

/** Deep copy, so a test can edit a stack without touching another test's copy. */
export function clone<T>(v: T): T {
  return JSON.parse(JSON.stringify(v));
}

/** Placeholder values for every secret key. */
export const TEST_SECRETS: Record<string, string> = Object.fromEntries(SECRET_KEYS.map((k) => [k, PLACEHOLDER_SECRETS[k]]));

/** Run the whole program under mocks with `raw` config (keys without namespace) plus test secrets. */
export async function runProgram(raw: Record<string, any>, opts: { preview?: boolean; stack?: string } = {}) {
  const { config } = toRuntimeConfig(raw);
  const secretKeys: string[] = [];
  for (const [k, v] of Object.entries(TEST_SECRETS)) {
    config[`${CONFIG_NAMESPACE}:${k}`] = v;
    secretKeys.push(`${CONFIG_NAMESPACE}:${k}`);
  }
  return runUnderMocks(() => buildProgram().outputs, config, secretKeys, opts);
}
