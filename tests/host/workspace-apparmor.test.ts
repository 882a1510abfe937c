/**
 * The workspaces' AppArmor profile (renderWorkspaceAppArmor) compiled by the real apparmor_parser (Debian's
 * apparmor package, tests/run.sh installs it), offline: -Q (no kernel load; this machine runs no AppArmor) -K (no
 * cache). `userns,` is AppArmor 4 syntax (Ubuntu 24.04's parser, where it is needed); an AppArmor 3 parser (Debian
 * 12) does not know it, so there the profile is compiled without that one line, and the test says so.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { renderWorkspaceAppArmor, WORKSPACE_APPARMOR_PROFILE } from "../../components/render/workspace-security";
import { Scratch } from "../helpers/host";

const scratch = new Scratch("ts-apparmor-");
afterAll(() => scratch.cleanup());

function parserMajor(): number {
  const r = spawnSync("apparmor_parser", ["--version"], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`apparmor_parser is missing (apt-get install apparmor): ${r.stderr}`);
  return Number(/version (\d+)\./i.exec(r.stdout)?.[1]);
}

test("apparmor_parser compiles the profile (and rejects a broken one)", () => {
  const major = parserMajor();
  let text = renderWorkspaceAppArmor();
  if (major < 4) {
    expect(text).toMatch(/^ {2}userns,$/m);
    text = text.replace(/^ {2}userns,\n/m, "");
    console.log(`apparmor_parser ${major}.x: compiled without the AppArmor 4 rule "userns," (Ubuntu 24.04's parser has it)`);
  }
  const file = path.join(scratch.dir, WORKSPACE_APPARMOR_PROFILE);
  fs.writeFileSync(file, text);
  const ok = spawnSync("apparmor_parser", ["-Q", "-K", "-T", file], { encoding: "utf8" });
  expect(ok.stderr.split("\n").filter((l) => l && !/Cache read\/write disabled/.test(l))).toEqual([]);
  expect(ok.status).toBe(0);
  // the parser really checks: one broken rule fails
  fs.writeFileSync(file, text.replace("  network,\n", "  network bogus-family,\n"));
  const bad = spawnSync("apparmor_parser", ["-Q", "-K", "-T", file], { encoding: "utf8" });
  expect(bad.status).not.toBe(0);
  expect(bad.stderr).toMatch(/error/i);
});
