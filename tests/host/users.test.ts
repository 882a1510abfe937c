/**
 * users.sh for real on this machine: real accounts (names tsu-*, uids 61001+) on a btrfs array made on a loop
 * device. Everything the test makes (accounts, groups, the array) is removed in afterAll; homes are only on the
 * scratch array.
 */
import * as fs from "fs";
import * as path from "path";
import { bash, checksumTree, runScript, Scratch, sh, usersEnv } from "../helpers/host";

const A = { name: "tsu-alice", uid: 61001 };
const B = { name: "tsu-bob", uid: 61002 };
const C = { name: "tsu-carol", uid: 61010 }; // pre-existing account NOT made by users.sh
const SHARED = { group: "tsu-ml", gid: 61999 };
const KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOo0Lw6bWi1BQ2ZrWSRnAqdl2m1N9c3uEo2Szj4xq8Za alice@laptop";
const KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB5c2Ht8lhm4lS8yTq8mCVXJvN0Zp7kV5DqXq1kWJ0vS alice@desktop";
const KEY3 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFqkq1qvO8Ww2m7d0A8l0yB9H4yFz3xq1o6zWq9dN3aB bob@laptop";
const b64 = (s: string): string => Buffer.from(s).toString("base64");
const rec = (u: { name: string; uid: number }, admin: 0 | 1, keys: string): string =>
  `${u.name}|${u.uid}|${admin}|1000|${b64(keys)}`;

const scratch = new Scratch("ts-users-");
const mp = path.join(scratch.dir, "array");
const stateDir = path.join(scratch.dir, "state");
const env = (users: string[]): Record<string, string> => usersEnv({ mp, stateDir, shared: SHARED }, users);
/** The account databases' lines for our test names (what "nothing changed" compares). */
const accountLines = (): string =>
  bash(`grep -h '^tsu-' /etc/passwd /etc/group /etc/shadow /etc/gshadow | sort`).stdout +
  bash(`grep -hE '^(docker|sudo):' /etc/group`).stdout;
const groupsOf = (name: string): string[] => sh("id", ["-nG", name]).trim().split(/\s+/).sort();
const shadow = (name: string): string[] => sh("getent", ["shadow", name]).trim().split(":");
const passwd = (name: string): string[] => sh("getent", ["passwd", name]).trim().split(":");
const statOf = (p: string): string => sh("stat", ["-c", "%a %U:%G", p]).trim();
const subvolId = (p: string): string => sh("btrfs", ["inspect-internal", "rootid", p]).trim();
/** qgroup id -> its child qgroups, from `btrfs qgroup show -pc` (columns: id, rfer, excl, parents, children, path). */
function qgroupChildren(qg: string): string[] {
  const line = sh("btrfs", ["qgroup", "show", "-pc", "--raw", mp]).split("\n").find((l) => l.split(/\s+/)[0] === qg);
  if (!line) return [];
  const cols = line.trim().split(/\s+/);
  return cols[4] === "-" ? [] : cols[4].split(",").sort();
}
const archives = (name: string): string[] =>
  fs.existsSync(path.join(mp, "snapshots/archive"))
    ? fs.readdirSync(path.join(mp, "snapshots/archive")).filter((f) => f.startsWith(`${name}-`))
    : [];

beforeAll(() => {
  for (const u of [A, B, C]) {
    if (bash(`getent passwd ${u.name} || getent passwd ${u.uid}`).stdout) throw new Error(`${u.name}/${u.uid} already exists on this machine`);
  }
  scratch.onCleanup(() => {
    for (const u of [A, B, C]) {
      bash(`getent passwd ${u.name} >/dev/null && userdel ${u.name}`);
      bash(`getent group ${u.name} >/dev/null && groupdel ${u.name}`);
    }
    bash(`getent group ${SHARED.group} >/dev/null && groupdel ${SHARED.group}`);
  });
  scratch.btrfsArray({ sizeMb: 1024, name: "array", subvolumes: ["homes", "workspaces", "shared", "docker-volumes", "cache", "snapshots"] }); // at mp
  // C: an account the admin made by hand (not train-server's)
  sh("useradd", ["-u", String(C.uid), "-M", "-s", "/bin/bash", C.name]);
});
afterAll(() => scratch.cleanup());

describe("users.sh", () => {
  const first = [rec(A, 1, `${KEY1}\n${KEY2}\n`), rec(B, 0, `${KEY3}\n`)];

  test("creates accounts, homes, keys, subvolumes and per-user qgroups", () => {
    const r = runScript("users", "apply", env(first));
    expect(r.stderr).not.toMatch(/ERROR|REFUSED/);
    expect(r.status).toBe(0);
    expect(r.changes).toBeGreaterThan(10);
    expect(r.results[`user.${A.name}.qgroup`]).toBe(`1/${A.uid}`);
    expect(r.results[`user.${B.name}.qgroup`]).toBe(`1/${B.uid}`);
    expect(r.results[`user.${A.name}.quota_gb`]).toBe("1000");

    for (const u of [A, B]) {
      const home = path.join(mp, "homes", u.name);
      expect(passwd(u.name)).toEqual([u.name, "x", String(u.uid), String(u.uid), "", home, "/bin/bash"]);
      expect(sh("getent", ["group", String(u.uid)]).split(":")[0]).toBe(u.name);
      expect(shadow(u.name)[1]).toBe("*"); // no password can match: key-only
      expect(shadow(u.name)[7]).toBe(""); // not expired
      for (const sub of ["homes", "workspaces", "docker-volumes"]) {
        const p = path.join(mp, sub, u.name);
        expect(sh("btrfs", ["subvolume", "show", p])).toContain("Subvolume ID");
        expect(statOf(p)).toBe(`750 ${u.name}:${u.name}`);
      }
      expect(statOf(path.join(home, ".ssh"))).toBe(`700 ${u.name}:${u.name}`);
      expect(statOf(path.join(home, ".ssh/authorized_keys"))).toBe(`600 ${u.name}:${u.name}`);
      expect(statOf(path.join(mp, "shared/tensorboard", u.name))).toBe(`755 ${u.name}:${u.name}`);
      // per-user qgroup holds exactly the three subvolumes
      const ids = ["homes", "workspaces", "docker-volumes"].map((s) => `0/${subvolId(path.join(mp, s, u.name))}`).sort();
      expect(qgroupChildren(`1/${u.uid}`)).toEqual(ids);
    }
    expect(fs.readFileSync(path.join(mp, "homes", A.name, ".ssh/authorized_keys"), "utf8")).toBe(`${KEY1}\n${KEY2}\n`);
    expect(fs.readFileSync(path.join(mp, "homes", B.name, ".ssh/authorized_keys"), "utf8")).toBe(`${KEY3}\n`);
    expect(groupsOf(A.name)).toEqual([A.name, "docker", SHARED.group, "sudo"].sort());
    expect(groupsOf(B.name)).toEqual([B.name, "docker", SHARED.group].sort());
    expect(sh("getent", ["group", SHARED.group]).split(":")[2]).toBe(String(SHARED.gid));
  });

  test("a second run changes nothing (same account lines, same files)", () => {
    const before = { accounts: accountLines(), homes: checksumTree(path.join(mp, "homes")), stat: bash(`find ${mp}/homes ${mp}/workspaces ${mp}/shared -printf '%p %m %u %g %T@\\n' | sort`).stdout };
    const t0 = Date.now();
    const r = runScript("users", "apply", env(first));
    const ms = Date.now() - t0;
    expect(r.status).toBe(0);
    expect(r.changes).toBe(0);
    expect(accountLines()).toBe(before.accounts);
    expect(checksumTree(path.join(mp, "homes"))).toEqual(before.homes);
    expect(bash(`find ${mp}/homes ${mp}/workspaces ${mp}/shared -printf '%p %m %u %g %T@\\n' | sort`).stdout).toBe(before.stat);
    console.log(`users.sh second run (2 users): ${ms} ms, changes=0`);
  });

  test("keys are replaced exactly and admin=0 removes host sudo", () => {
    const r = runScript("users", "apply", env([rec(A, 0, `${KEY2}\n`), rec(B, 0, `${KEY3}\n`)]));
    expect(r.status).toBe(0);
    expect(r.changes).toBe(2); // authorized_keys of A, A out of sudo
    expect(fs.readFileSync(path.join(mp, "homes", A.name, ".ssh/authorized_keys"), "utf8")).toBe(`${KEY2}\n`);
    expect(groupsOf(A.name)).not.toContain("sudo");
  });

  test("a removed user is archived: read-only snapshot once, account locked, home untouched", () => {
    const home = path.join(mp, "homes", B.name);
    fs.mkdirSync(path.join(home, "project"), { recursive: true });
    fs.writeFileSync(path.join(home, "project/train.py"), "print('hello')\n");
    sh("chown", ["-R", `${B.name}:${B.name}`, path.join(home, "project")]);
    const sums = checksumTree(home);

    const r = runScript("users", "apply", env([rec(A, 0, `${KEY2}\n`)]));
    expect(r.status).toBe(0);
    expect(r.results[`user.${B.name}.status`]).toBe("archived");
    const snaps = archives(B.name);
    expect(snaps).toHaveLength(1);
    expect(snaps[0]).toMatch(new RegExp(`^${B.name}-\\d{8}T\\d{6}Z$`));
    const snap = path.join(mp, "snapshots/archive", snaps[0]);
    expect(r.results[`archive.${B.name}`]).toBe(snap);
    expect(sh("btrfs", ["property", "get", snap, "ro"]).trim()).toBe("ro=true");
    expect(checksumTree(snap)).toEqual(sums);
    // the account is locked, expired, cannot log in, and has lost docker/shared/sudo
    expect(sh("passwd", ["-S", B.name]).split(" ")[1]).toBe("L");
    expect(shadow(B.name)[7]).toBe("1");
    expect(passwd(B.name)[6]).toMatch(/nologin$/);
    expect(groupsOf(B.name)).toEqual([B.name]);
    // the SSH keys are gone from the live home (the archive keeps them); nothing else is deleted
    expect(fs.existsSync(path.join(home, ".ssh/authorized_keys"))).toBe(false);
    expect(fs.readFileSync(path.join(snap, ".ssh/authorized_keys"), "utf8")).toBe(`${KEY3}\n`);
    const { [".ssh/authorized_keys"]: _keys, ...rest } = sums;
    expect(checksumTree(home)).toEqual(rest);
    expect(fs.existsSync(path.join(mp, "workspaces", B.name))).toBe(true);

    const again = runScript("users", "apply", env([rec(A, 0, `${KEY2}\n`)]));
    expect(again.status).toBe(0);
    expect(again.changes).toBe(0);
    expect(archives(B.name)).toHaveLength(1);
  });

  test("re-adding an archived user unlocks it, without a new snapshot", () => {
    const r = runScript("users", "apply", env([rec(A, 0, `${KEY2}\n`), rec(B, 0, `${KEY3}\n`)]));
    expect(r.status).toBe(0);
    expect(shadow(B.name)[1]).toBe("*");
    expect(shadow(B.name)[7]).toBe("");
    expect(passwd(B.name)[6]).toBe("/bin/bash");
    expect(groupsOf(B.name)).toEqual([B.name, "docker", SHARED.group].sort());
    expect(archives(B.name)).toHaveLength(1);
    expect(fs.readFileSync(path.join(mp, "homes", B.name, "project/train.py"), "utf8")).toBe("print('hello')\n");
    expect(fs.readFileSync(path.join(mp, "homes", B.name, ".ssh/authorized_keys"), "utf8")).toBe(`${KEY3}\n`);
  });

  test.each([
    ["a name that exists with another uid", rec({ name: C.name, uid: 61011 }, 0, ""), new RegExp(`account ${C.name} exists with uid ${C.uid}, not 61011`)],
    ["a uid that belongs to another name", rec({ name: "tsu-dave", uid: C.uid }, 0, ""), new RegExp(`uid ${C.uid} of tsu-dave already belongs to account ${C.name}`)],
    ["an account users.sh did not create", rec(C, 0, ""), new RegExp(`account ${C.name} \\(uid ${C.uid}\\) exists but was not created by train-server`)],
  ])("refuses %s and changes nothing", (_what, record, message) => {
    const before = { accounts: accountLines(), homes: fs.readdirSync(path.join(mp, "homes")).sort(), state: fs.readFileSync(path.join(stateDir, "users"), "utf8") };
    const r = runScript("users", "apply", env([rec(A, 0, `${KEY2}\n`), rec(B, 0, `${KEY3}\n`), record]));
    expect(r.status).toBe(3);
    expect(r.stderr).toMatch(message);
    expect(accountLines()).toBe(before.accounts);
    expect(fs.readdirSync(path.join(mp, "homes")).sort()).toEqual(before.homes);
    expect(fs.readFileSync(path.join(stateDir, "users"), "utf8")).toBe(before.state);
  });

  test("destroy refuses without TS_ALLOW_WIPE; with it removes only its accounts and keeps the homes", () => {
    const sums = checksumTree(path.join(mp, "homes"));
    const refused = runScript("users", "destroy", env([]));
    expect(refused.status).toBe(3);
    expect(refused.stderr).toMatch(/never deleted.*test-rig stack \(rig: true\)/);
    expect(bash(`getent passwd ${A.name}`).status).toBe(0);

    const r = runScript("users", "destroy", { ...env([]), TS_ALLOW_WIPE: "1" });
    expect(r.status).toBe(0);
    for (const u of [A, B]) {
      expect(bash(`getent passwd ${u.name}`).status).toBe(2);
      expect(bash(`getent group ${u.name}`).status).toBe(2);
    }
    expect(bash(`getent passwd ${C.name}`).status).toBe(0); // not ours: untouched
    expect(checksumTree(path.join(mp, "homes"))).toEqual(sums);
  });
});
