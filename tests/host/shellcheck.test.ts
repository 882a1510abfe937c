/** Every shell script the program ships (host scripts, image scripts) and the test rigs' scripts is shellcheck-clean. */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { REPO } from "../helpers/host";

function scripts(dir: string): string[] {
  const abs = path.join(REPO, dir);
  if (!fs.existsSync(abs)) return [];
  return fs
    .readdirSync(abs, { recursive: true, encoding: "utf8" })
    .filter((f) => f.endsWith(".sh"))
    .map((f) => path.join(dir, f))
    .sort();
}

const all = [...scripts("host-scripts"), ...scripts("images"), ...scripts("tests/helpers"), ...scripts("tests/gpu"), ...scripts(".github"), ".ci/run", "tests/run.sh"];

test("there are scripts to check", () => {
  expect(all).toEqual(expect.arrayContaining(["host-scripts/lib.sh", "host-scripts/storage.sh", "host-scripts/users.sh", "host-scripts/baseline.sh"]));
});

test.each(all)("%s is shellcheck-clean", (file) => {
  const r = spawnSync("shellcheck", ["-x", "-s", "bash", path.basename(file)], { cwd: path.join(REPO, path.dirname(file)), encoding: "utf8" });
  expect(r.error).toBeUndefined();
  expect(r.stdout + r.stderr).toBe("");
  expect(r.status).toBe(0);
});
