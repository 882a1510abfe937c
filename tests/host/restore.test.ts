/**
 * Self-service restore for real: users.sh makes two real accounts (tsr-alice, tsr-bob) on a btrfs loop array with
 * their own snapshot directories and restore spools; snapshot.sh (btrbk, under a simulated clock) takes hourly
 * snapshots into .snapshots/homes/<user>/; backup.sh backs up to a real restic repository (rclone: backend on
 * local disk), plus one backdated backup. Then, as the user (setpriv, no root): `restore` (images/workspace/
 * restore.sh) lists and restores from the snapshots; asks the host broker (restore-broker.sh, as root) for older
 * dates; the broker's refusals (traversal, absolute and glob paths, symlinks on the way, a request that is a
 * symlink or not the user's, oversize, unknown fields); and what bob can reach of alice's (nothing), on the host and
 * through the workspace's read-only bind mount, where a new hourly snapshot shows up without a remount.
 */
import { spawn, spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { renderBtrbkConf } from "../../components/render/ops";
import { WORKSPACE_RESTORE_SPOOL, WORKSPACE_SNAPSHOTS_DIR } from "../../components/render/workspace-image";
import { backupTestEnv, exampleOpsParams } from "../helpers/ops";
import { bash, checksumTree, HOST_SCRIPTS, REPO, runScript, Scratch, sh, usersEnv, writeRandomFile } from "../helpers/host";

const A = { name: "tsr-alice", uid: 61201 };
const B = { name: "tsr-bob", uid: 61202 };
const SHARED = { group: "tsr-ml", gid: 61299 };
const LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const CLI = path.join(REPO, "images/workspace/restore.sh");

const scratch = new Scratch("ts-restore-");
const mp = path.join(scratch.dir, "array");
const stateDir = path.join(scratch.dir, "state");
const spool = path.join(scratch.dir, "restore");
const home = (u: { name: string }) => path.join(mp, "homes", u.name);
const snapDir = (u: { name: string }) => path.join(mp, ".snapshots/homes", u.name);
let snapEnv: Record<string, string>;
let opsEnv: Record<string, string>;

/** Run a command as a user (no root: setpriv to their uid/gid, no supplementary groups). */
function asUser(u: { uid: number }, cmd: string[], env: Record<string, string> = {}) {
  const r = spawnSync("setpriv", [`--reuid=${u.uid}`, `--regid=${u.uid}`, "--clear-groups", "--", ...cmd], {
    encoding: "utf8",
    env: { PATH: process.env.PATH!, LANG: "C.UTF-8", ...env },
  });
  return { status: r.status ?? -1, stdout: r.stdout ?? "", stderr: r.stderr ?? "" };
}
/** The `restore` command as alice, with her workspace's view (her snapshot dir, her spool). */
const cliEnv = (u = A) => ({ HOME: home(u), USER: u.name, RESTORE_SNAPSHOTS: snapDir(u), RESTORE_SPOOL: path.join(spool, u.name) });
const restore = (args: string[], u = A) => asUser(u, ["bash", CLI, ...args], cliEnv(u));
const broker = () => runScript("restore-broker", "apply", opsEnv);
const at = (iso: string) => ({ LD_PRELOAD: LIBFAKETIME, FAKETIME: `@${iso}` });
const stamps = (u = A) => fs.readdirSync(snapDir(u)).map((n) => n.slice(u.name.length + 1)).sort();

/** Write a request as the user, run the broker, return the result's fields. */
function request(name: string, lines: string[], u = A): Record<string, string> {
  const f = path.join(spool, u.name, "requests", `${name}.req`);
  expect(asUser(u, ["bash", "-c", 'printf "%s\\n" "${@:2}" >"$1"', "-", f, ...lines]).status).toBe(0);
  const r = broker();
  expect(r.status).toBe(0);
  return result(name, u);
}
function result(name: string, u = A): Record<string, string> {
  const text = fs.readFileSync(path.join(spool, u.name, "results", `${name}.result`), "utf8");
  return Object.fromEntries(text.trim().split("\n").map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
}

beforeAll(() => {
  for (const u of [A, B]) if (bash(`getent passwd ${u.name} || getent passwd ${u.uid}`).stdout) throw new Error(`${u.name}/${u.uid} exists on this machine`);
  scratch.onCleanup(() => {
    for (const u of [A, B]) {
      bash(`getent passwd ${u.name} >/dev/null && userdel ${u.name}`);
      bash(`getent group ${u.name} >/dev/null && groupdel ${u.name}`);
    }
    bash(`getent group ${SHARED.group} >/dev/null && groupdel ${SHARED.group}`);
  });
  fs.chmodSync(scratch.dir, 0o711); // the users traverse to the array and the spool, as on a host
  scratch.btrfsArray({ sizeMb: 1024, name: "array", subvolumes: ["homes", "workspaces", "shared", "docker-volumes", "cache", "snapshots"] });
  fs.chmodSync(mp, 0o755);
  for (const sv of ["homes", "workspaces", "docker-volumes"]) fs.chmodSync(path.join(mp, sv), 0o711);
  const rec = (u: { name: string; uid: number }) => `${u.name}|${u.uid}|0|1000|${Buffer.from("\n").toString("base64")}`;
  const r = runScript("users", "apply", usersEnv({ mp, stateDir, shared: SHARED }, [rec(A), rec(B)]));
  expect(r.stderr).not.toMatch(/ERROR|REFUSED/);
  expect(r.status).toBe(0);

  // alice's work, written as alice
  const w = (rel: string, text: string, u = A) => expect(asUser(u, ["bash", "-c", 'mkdir -p "$(dirname "$1")" && printf %s "$2" >"$1"', "-", path.join(home(u), rel), text]).status).toBe(0);
  w("project/train.py", "print('v1')\n");
  w("project/data/config.yaml", "lr: 0.1\n");
  w("old/report.txt", "report A\n");
  w("secret.txt", "bob's own\n", B);

  const conf = path.join(scratch.dir, "btrbk.conf");
  fs.writeFileSync(conf, renderBtrbkConf(exampleOpsParams({ mountpoint: mp, users: [{ name: A.name, uid: A.uid, quotaGb: 1 }, { name: B.name, uid: B.uid, quotaGb: 1 }] })));
  snapEnv = { TS_BTRBK_CONF: conf, TS_MOUNTPOINT: mp, TS_TEXTFILE_DIR: path.join(scratch.dir, "textfile"), TZ: "UTC" };

  opsEnv = backupTestEnv(scratch.dir, mp, "restore test password", {
    TS_RESTORE_SPOOL: spool,
    TS_RESTORE_USERS: `${A.name}:${A.uid} ${B.name}:${B.uid}`,
    TS_RESTORE_MAX_MB: "4",
    TS_RESTORE_TIMEOUT_S: "300",
    TS_TEXTFILE_DIR: snapEnv.TS_TEXTFILE_DIR,
    TZ: "UTC",
  });
});
afterAll(() => scratch.cleanup());

describe("layout", () => {
  test("users.sh gives each user their own snapshot directory and spool; the parents are traversable, never listable", () => {
    const st = (p: string) => sh("stat", ["-c", "%a %U:%G", p]).trim();
    expect(st(path.join(mp, ".snapshots"))).toBe("711 root:root");
    expect(st(path.join(mp, ".snapshots/homes"))).toBe("711 root:root");
    expect(st(snapDir(A))).toBe(`750 root:${A.name}`);
    expect(st(spool)).toBe("711 root:root");
    expect(st(path.join(spool, A.name))).toBe(`750 root:${A.name}`);
    expect(st(path.join(spool, A.name, "requests"))).toBe(`770 root:${A.name}`);
    expect(st(path.join(spool, A.name, "results"))).toBe(`750 root:${A.name}`);
    expect(WORKSPACE_SNAPSHOTS_DIR).toBe("/snapshots");
    expect(WORKSPACE_RESTORE_SPOOL).toBe("/run/train-server-restore");
  });
});

describe("snapshots", () => {
  beforeAll(() => {
    for (const t of ["2026-11-30T10:00:00", "2026-11-30T11:00:00"]) {
      if (t.endsWith("11:00:00")) expect(asUser(A, ["bash", "-c", `printf "print('v2')\\n" >${home(A)}/project/train.py`]).status).toBe(0);
      const r = runScript("snapshot", "apply", { ...snapEnv, ...at(t.replace("T", " ")) });
      expect(r.stderr).not.toMatch(/ERROR/);
      expect(r.status).toBe(0);
    }
    expect(stamps()).toEqual(["20261130T1000", "20261130T1100"]);
  });

  test("restore --list shows the user's snapshots newest first; with a path only those that hold it", () => {
    const r = restore(["--list"]);
    expect(r.status).toBe(0);
    expect(r.stdout).toBe("20261130T1100  2026-11-30 11:00\n20261130T1000  2026-11-30 10:00\n");
    expect(restore(["--list", `${home(A)}/project/train.py`]).stdout.split("\n").filter(Boolean)).toHaveLength(2);
    const none = restore(["--list", `${home(A)}/never-there.txt`]);
    expect([none.status, none.stdout, none.stderr]).toEqual([0, "", expect.stringMatching(/no snapshot holds never-there.txt/)]);
    expect(restore(["--help"]).stdout).toMatch(/^Usage:\n  restore --list \[PATH\]/);
    expect(restore(["--bogus"]).status).toBe(2);
  });

  test("restores a file from a snapshot into ~/restored/<time>/, as the user, never over anything", () => {
    const r = restore([`${home(A)}/project/train.py`, "--from", "20261130T1000"]);
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    const out = path.join(home(A), "restored/20261130T1000/project/train.py");
    expect(fs.readFileSync(out, "utf8")).toBe("print('v1')\n");
    expect(sh("stat", ["-c", "%U", out]).trim()).toBe(A.name);
    expect(fs.readFileSync(path.join(home(A), "project/train.py"), "utf8")).toBe("print('v2')\n"); // untouched
    const again = restore([`${home(A)}/project/train.py`, "--from", "20261130T1000"]);
    expect([again.status, again.stderr]).toEqual([3, expect.stringMatching(/exists already/)]);
    // a path inside the snapshot means the same path in the home; a directory restores whole
    const dir = restore([`${snapDir(A)}/${A.name}.20261130T1100/project`, "--from", "20261130T1100"]);
    expect(dir.status).toBe(0);
    expect(checksumTree(path.join(home(A), "restored/20261130T1100/project"))).toEqual(checksumTree(path.join(home(A), "project")));
  });

  test("--in-place puts it back at its path and keeps what was there aside", () => {
    const r = restore([`${home(A)}/project/train.py`, "--from", "20261130T1000", "--in-place"]);
    expect(r.status).toBe(0);
    expect(fs.readFileSync(path.join(home(A), "project/train.py"), "utf8")).toBe("print('v1')\n");
    const aside = fs.readdirSync(path.join(home(A), "project")).filter((n) => n.startsWith("train.py.before-restore-"));
    expect(aside).toHaveLength(1);
    expect(fs.readFileSync(path.join(home(A), "project", aside[0]), "utf8")).toBe("print('v2')\n");
  });

  test("paths outside the home are refused", () => {
    for (const p of ["/etc/passwd", `${home(B)}/secret.txt`, `${home(A)}/../${B.name}/secret.txt`, home(A)]) {
      const r = restore([p, "--from", "20261130T1000"]);
      expect([p, r.status, r.stderr]).toEqual([p, 2, expect.stringMatching(/not inside your home/)]);
    }
  });

  test("bob can neither list nor open alice's snapshots or spool on the host (SSH), and can his own", () => {
    const snap = path.join(snapDir(A), `${A.name}.20261130T1000`);
    for (const cmd of [
      ["ls", path.join(mp, ".snapshots/homes")],
      ["ls", snapDir(A)],
      ["cat", path.join(snap, "old/report.txt")],
      ["ls", path.join(mp, ".snapshots")],
      ["ls", spool],
      ["ls", path.join(spool, A.name, "results")],
      ["touch", path.join(spool, A.name, "requests/x.req")],
    ]) {
      const r = asUser(B, cmd);
      expect([cmd.join(" "), r.status, r.stderr]).toEqual([cmd.join(" "), expect.not.stringMatching(/^0$/), expect.stringMatching(/Permission denied/)]);
    }
    expect(asUser(B, ["ls", snapDir(B)]).stdout).toMatch(/^tsr-bob\.20261130T1000\ntsr-bob\.20261130T1100\n$/);
    // bob's restore command, with alice's paths, finds nothing of hers
    const r = restore(["--list"], B);
    expect(r.stdout).not.toContain("alice");
  });

  test("through the workspace's read-only bind mount: only alice's snapshots, read-only, and a new one appears without a remount", () => {
    const target = path.join(scratch.dir, "container-snapshots");
    fs.mkdirSync(target);
    const script = [
      "set -e",
      `mount --bind ${snapDir(A)} ${target}`,
      `mount -o remount,bind,ro ${target}`,
      `setpriv --reuid=${A.uid} --regid=${A.uid} --clear-groups ls ${target}`,
      "echo ---",
      `FAKETIME='@2026-11-30 12:00:00' LD_PRELOAD=${LIBFAKETIME} TS_BTRBK_CONF=${snapEnv.TS_BTRBK_CONF} TS_MOUNTPOINT=${mp} TS_TEXTFILE_DIR=${snapEnv.TS_TEXTFILE_DIR} TZ=UTC bash ${HOST_SCRIPTS}/snapshot.sh apply >/dev/null 2>&1`,
      `setpriv --reuid=${A.uid} --regid=${A.uid} --clear-groups ls ${target}`,
      "echo ---",
      `setpriv --reuid=${A.uid} --regid=${A.uid} --clear-groups cat ${target}/${A.name}.20261130T1000/old/report.txt`,
      `if touch ${target}/x 2>/dev/null; then echo writable; else echo read-only; fi`,
      `setpriv --reuid=${B.uid} --regid=${B.uid} --clear-groups ls ${target} 2>&1 || true`,
    ].join("\n");
    const r = spawnSync("unshare", ["-m", "--propagation", "private", "bash", "-c", script], { encoding: "utf8" });
    expect(r.stderr).toBe("");
    const [before, after, rest] = r.stdout.split("---\n");
    expect(before).toBe(`${A.name}.20261130T1000\n${A.name}.20261130T1100\n`);
    expect(after).toBe(`${A.name}.20261130T1000\n${A.name}.20261130T1100\n${A.name}.20261130T1200\n`);
    expect(rest).toMatch(/^report A\nread-only\nls: cannot open directory .*: Permission denied\n$/);
  });
});

describe("backups (restic, through the host's broker)", () => {
  beforeAll(() => {
    // setuid bit on a file of alice's: a restore must never bring one back
    fs.writeFileSync(path.join(home(A), "old/tool"), "#!/bin/sh\n");
    fs.chownSync(path.join(home(A), "old/tool"), A.uid, A.uid);
    fs.chmodSync(path.join(home(A), "old/tool"), 0o4755);
    writeRandomFile(path.join(home(A), "big/blob.bin"), 6); // over the test's 4 MB restore limit
    sh("chown", ["-R", `${A.uid}:${A.uid}`, path.join(home(A), "big")]);
    const first = runScript("backup", "apply", opsEnv);
    expect(first.stderr).not.toMatch(/ERROR/);
    expect(first.status).toBe(0);
    // the same state once more, dated 3 November (as if kept as a weekly backup), then report B today
    const staging = path.join(mp, ".snapshots/.backup");
    const env = { ...process.env, RESTIC_REPOSITORY: opsEnv.TS_RESTIC_REPOSITORY, RESTIC_PASSWORD_FILE: opsEnv.TS_RESTIC_PASSWORD_FILE, RCLONE_CONFIG: opsEnv.TS_RCLONE_CONFIG, TZ: "UTC" };
    const old = spawnSync("restic", ["backup", "-q", "--tag", "train-server", "--time", "2026-11-03 06:00:00", staging], { cwd: staging, env, encoding: "utf8" });
    expect(old.status).toBe(0);
    expect(asUser(A, ["bash", "-c", `printf 'report B\\n' >${home(A)}/old/report.txt`]).status).toBe(0);
    expect(runScript("backup", "apply", opsEnv).status).toBe(0);
    fs.rmSync(path.join(home(A), "old"), { recursive: true }); // lost, and not in any local snapshot either
  });

  test("restore --backups lists the host's backups, newest first", async () => {
    const r = await cliWithBroker(["--backups"]);
    expect(r.status).toBe(0);
    const lines = r.stdout.trim().split("\n");
    expect(lines[0]).toBe("2 backup(s), newest first");
    expect(lines[2]).toMatch(/^ {2}2026-11-03T06:00:00Z [0-9a-f]{8}$/);
  });

  test("restores a directory from the newest backup at or before a date into ~/restored/<backup time>/, owned by the user, no setuid", async () => {
    const r = await cliWithBroker([`${home(A)}/old`, "--from", "2026-11-10"]);
    expect(r.stderr).toMatch(/asked the host/);
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^restored old from the backup of 2026-11-03T06:00:00Z into ~\/restored\/20261103T0600\/old\n$/);
    const out = path.join(home(A), "restored/20261103T0600/old");
    expect(fs.readFileSync(path.join(out, "report.txt"), "utf8")).toBe("report A\n");
    expect(sh("find", [out, "-printf", "%u:%g %m %P\n"]).trim().split("\n").sort()).toEqual(
      [`${A.name}:${A.name} 755 `, `${A.name}:${A.name} 644 report.txt`, `${A.name}:${A.name} 755 tool`].sort(),
    );
    const latest = request("latest", ["action=restore", "path=old/report.txt", "from=latest"]);
    expect(latest.status).toBe("ok");
    expect(fs.readFileSync(path.join(home(A), latest.restored), "utf8")).toBe("report B\n");
    // result files are the user's group's only; scratch directories are gone
    expect(sh("stat", ["-c", "%a %U:%G", path.join(spool, A.name, "results/latest.result")]).trim()).toBe(`640 root:${A.name}`);
    expect(fs.readdirSync(path.join(mp, ".snapshots")).filter((n) => n.startsWith(".restore"))).toEqual([]);
    expect(fs.readdirSync(path.join(spool, A.name, "requests"))).toEqual([]);
  });

  test.each([
    ["traversal into another home", ["action=restore", `path=../${B.name}/secret.txt`], /path must be a file or directory inside your home/],
    ["an absolute path", ["action=restore", "path=/etc/shadow"], /path must be/],
    ["a glob", ["action=restore", "path=old/*"], /path must be/],
    ["a dot component", ["action=restore", "path=./old"], /path must be/],
    ["an unknown field", ["action=restore", "path=old", "user=tsr-bob"], /unknown field/],
    ["a repeated field", ["action=restore", "path=old", "path=../x"], /bad or repeated line/],
    ["a bad date", ["action=restore", "path=old", "from=$(reboot)"], /from '\$\(reboot\)' is not latest/],
    ["a date before every backup", ["action=restore", "path=old", "from=2020-01-01"], /no backup at or before 2020-01-01/],
    ["a path that is not in the backup", ["action=restore", "path=nothing-here"], /nothing-here is not in the backup/],
    ["more than the size limit", ["action=restore", "path=big"], /more than the 4 MB a self-service restore may bring back/],
    ["an unknown action", ["action=delete", "path=old"], /action must be list or restore/],
  ])("refuses %s", (_what, lines, message) => {
    const before = checksumTree(home(A));
    const r = request(`refuse-${Math.abs(hash(lines.join()))}`, lines);
    expect(r).toMatchObject({ status: "refused", message: expect.stringMatching(message) });
    expect(checksumTree(home(A))).toEqual(before);
  });

  test("refuses to write through a symlink in the home (into bob's home)", () => {
    fs.symlinkSync(home(B), path.join(home(A), "old"));
    const r = request("symlink-in-place", ["action=restore", "path=old/report.txt", "in_place=1"]);
    expect(r).toMatchObject({ status: "refused", message: "old is a symlink; restore refuses to write through it" });
    fs.unlinkSync(path.join(home(A), "old"));
    const top = path.join(home(A), "restored");
    fs.renameSync(top, `${top}.real`);
    fs.symlinkSync(home(B), top);
    const r2 = request("symlink-restored", ["action=restore", "path=project/train.py", "from=latest"]);
    expect(r2).toMatchObject({ status: "refused", message: "restored is a symlink; restore refuses to write through it" });
    fs.unlinkSync(top);
    fs.renameSync(`${top}.real`, top);
    expect(fs.readdirSync(home(B)).sort()).toEqual([".ssh", "secret.txt"]);
  });

  test("a request that is a symlink (to /etc/shadow) or not the user's own file is refused, and nothing of it is echoed", () => {
    const req = path.join(spool, A.name, "requests");
    expect(asUser(A, ["ln", "-s", "/etc/shadow", path.join(req, "link.req")]).status).toBe(0);
    fs.writeFileSync(path.join(req, "root.req"), "action=list\n"); // made by root, not by alice
    expect(broker().status).toBe(0);
    for (const id of ["link", "root"]) {
      expect(result(id)).toEqual({ status: "refused", message: "a request must be a regular file of yours, at most 4 KiB" });
    }
    expect(fs.readFileSync(path.join(spool, A.name, "results/link.result"), "utf8")).not.toMatch(/root:/);
    expect(fs.readdirSync(req)).toEqual([]);
  });
});

/** Run `restore ARGS` as alice while the broker answers (as the timer would, once a request is there). */
async function cliWithBroker(args: string[]): Promise<{ status: number; stdout: string; stderr: string }> {
  const child = spawn("setpriv", [`--reuid=${A.uid}`, `--regid=${A.uid}`, "--clear-groups", "--", "bash", CLI, ...args, "--wait", "120"], {
    env: { PATH: process.env.PATH!, LANG: "C.UTF-8", TZ: "UTC", ...cliEnv() },
  });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d) => (stdout += d));
  child.stderr.on("data", (d) => (stderr += d));
  const done = new Promise<number>((resolve) => child.on("close", (code) => resolve(code ?? -1)));
  const req = path.join(spool, A.name, "requests");
  for (let i = 0; i < 100 && !fs.readdirSync(req).some((n) => n.endsWith(".req")); i++) await new Promise((r) => setTimeout(r, 100));
  const b = broker();
  expect(b.status).toBe(0);
  return { status: await done, stdout, stderr };
}

function hash(s: string): number {
  let h = 0;
  for (const c of s) h = (h * 31 + c.charCodeAt(0)) | 0;
  return h;
}
