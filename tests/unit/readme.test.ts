/** The README's configuration reference is checked against the schema, both ways. */
import * as fs from "fs";
import * as path from "path";
import { rawConfigSchema } from "../../components/config";

/** Leaf key paths of a zod schema: `host.sshPort`, `users[i].name`, … */
function leafPaths(schema: any, prefix = ""): string[] {
  const def = schema._zod.def;
  switch (def.type) {
    case "optional":
    case "default":
    case "prefault":
    case "nullable":
      return leafPaths(def.innerType, prefix);
    case "object":
      return Object.entries(def.shape).flatMap(([k, v]) => {
        const p = prefix ? `${prefix}.${k}` : k;
        const sub = leafPaths(v, p);
        return sub.length ? sub : [p];
      });
    case "array": {
      const sub = leafPaths(def.element, `${prefix}[i]`);
      return sub.length ? sub : [];
    }
    default:
      return [];
  }
}

const readme = fs.readFileSync(path.join(__dirname, "..", "..", "README.md"), "utf8");
const section = readme.split("<!-- config-reference:start -->")[1]?.split("<!-- config-reference:end -->")[0] ?? "";
const documented = [...section.matchAll(/^\| `([^`]+)` \|/gm)].map((m) => m[1]);

test("every schema key is in the README's configuration reference", () => {
  const keys = leafPaths(rawConfigSchema);
  expect(keys.length).toBeGreaterThan(60);
  expect(keys.filter((k) => !documented.includes(k))).toEqual([]);
});

test("the README documents no key the schema does not have", () => {
  const keys = new Set(leafPaths(rawConfigSchema));
  expect(documented.filter((k) => !keys.has(k))).toEqual([]);
});

test("the README's two set-up commands are the plan and the full test run", () => {
  expect(readme).toContain("npm ci && npm run plan");
  expect(readme).toContain("npm ci && npm test");
  expect(fs.readFileSync(path.join(__dirname, "..", "..", ".ci", "run"), "utf8")).toMatch(/^npm ci && npm test$/m);
});

test("the pull-request workflow runs the offline plan (no secrets) and the README's test command", () => {
  const wf = fs.readFileSync(path.join(__dirname, "..", "..", ".github", "workflows", "pull-request.yml"), "utf8");
  expect(wf).toContain("npm ci && npm run plan");
  expect(wf).toContain("npm ci && npm test");
  expect(wf).toMatch(/command: preview\s+stack-name: prod\s+comment-on-pr: true/);
});
