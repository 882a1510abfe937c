/**
 * users.sh against accounts and groups that already exist on a real server (issue 16), for real: a group with the
 * user's name or gid (with or without members, with another gid), accounts with the user's name or uid, an account
 * whose primary group is the user's gid, members added to a managed user's private group, and a home left by
 * someone else. Each is a refusal (exit 3, nothing changed, nobody gains access) or a correct adoption whose second
 * run changes nothing. Names tsh-*, uids 62001+ (users.test.ts uses tsu-*, 61001+); all removed in afterAll.
 */
import * as fs from "fs";
import * as path from "path";
import { bash, checksumTree, runScript, Scratch, sh, ScriptRun, usersEnv } from "../helpers/host";

const ALICE = { name: "tsh-alice", uid: 62001 };
const BOB = { name: "tsh-bob", uid: 62002 };
const MALLORY = { name: "tsh-mallory", uid: 62050 }; // an account the admin made by hand
const SHARED = { group: "tsh-ml", gid: 62999 };
const KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOo0Lw6bWi1BQ2ZrWSRnAqdl2m1N9c3uEo2Szj4xq8Za alice@laptop";
const rec = (u: { name: string; uid: number }, admin: 0 | 1 = 0): string => `${u.name}|${u.uid}|${admin}|1000|${Buffer.from(`${KEY}\n`).toString("base64")}`;
const NAMES = [ALICE.name, BOB.name, MALLORY.name, "tsh-group", "tsh-other"];

const scratch = new Scratch("ts-users-hostile-");
const mp = path.join(scratch.dir, "array");
const stateDir = path.join(scratch.dir, "state");
const env = (users: string[]): Record<string, string> => usersEnv({ mp, stateDir, shared: SHARED }, users);
const users = (list: string[]): ScriptRun => runScript("users", "apply", env(list));
function expectStatus(run: ScriptRun, status: number): void {
  if (run.status !== status) throw new Error(`expected exit ${status}, got ${run.status}\n${run.stdout}\n${run.stderr}`);
}
/** The account databases' lines of the test's names, the homes and the state: what a refusal must leave alone. */
const world = () => ({
  accounts: bash(`grep -h '^tsh-' /etc/passwd /etc/group /etc/shadow /etc/gshadow | sort`).stdout,
  homes: fs.readdirSync(path.join(mp, "homes")).sort(),
  state: fs.existsSync(path.join(stateDir, "users")) ? fs.readFileSync(path.join(stateDir, "users"), "utf8") : "",
});
const gone = (names: string[]) => {
  for (const n of names) bash(`getent passwd ${n} >/dev/null && userdel ${n}; getent group ${n} >/dev/null && groupdel ${n}`);
};

beforeAll(() => {
  for (const n of NAMES) if (bash(`getent passwd ${n} || getent group ${n}`).stdout) throw new Error(`${n} already exists on this machine`);
  for (const id of [ALICE.uid, BOB.uid, MALLORY.uid, SHARED.gid]) if (bash(`getent passwd ${id} || getent group ${id}`).stdout) throw new Error(`id ${id} is taken on this machine`);
  scratch.onCleanup(() => gone([...NAMES, SHARED.group]));
  scratch.btrfsArray({ sizeMb: 1024, name: "array", subvolumes: ["homes", "workspaces", "shared", "docker-volumes", "cache", "snapshots"] });
  sh("useradd", ["-u", String(MALLORY.uid), "-M", "-s", "/bin/bash", MALLORY.name]);
});
afterAll(() => scratch.cleanup());

describe("users.sh refuses to hand a user an identity someone else already has", () => {
  afterEach(() => gone([ALICE.name, "tsh-group", "tsh-other"]));

  test.each<[string, () => void, RegExp]>([
    ["a group with the user's name and gid, made by hand", () => sh("groupadd", ["-g", String(ALICE.uid), ALICE.name]), /group tsh-alice \(gid 62001\) exists but was not created by train-server; .*groupdel tsh-alice/],
    [
      "that group, with a member",
      () => {
        sh("groupadd", ["-g", String(ALICE.uid), ALICE.name]);
        sh("gpasswd", ["-a", MALLORY.name, ALICE.name]);
      },
      /group tsh-alice \(gid 62001\) exists but was not created by train-server \(members: tsh-mallory\)/,
    ],
    ["a group with the user's name and another gid", () => sh("groupadd", ["-g", "62077", ALICE.name]), /group tsh-alice exists with gid 62077, not 62001/],
    ["a group with the user's gid and another name", () => sh("groupadd", ["-g", String(ALICE.uid), "tsh-group"]), /gid 62001 \(primary group of tsh-alice\) already belongs to group tsh-group/],
    ["an account with the user's uid and another name", () => sh("useradd", ["-u", String(ALICE.uid), "-M", "-N", "-g", MALLORY.name, "tsh-other"]), /uid 62001 of tsh-alice already belongs to account tsh-other/],
    ["an account with the user's name and another uid", () => sh("useradd", ["-u", "62078", "-M", "-N", "-g", MALLORY.name, ALICE.name]), /account tsh-alice exists with uid 62078, not 62001/],
    ["an account with the user's name and uid, made by hand", () => sh("useradd", ["-u", String(ALICE.uid), "-M", "-N", "-g", MALLORY.name, ALICE.name]), /account tsh-alice \(uid 62001\) exists but was not created by train-server/],
    [
      "an account whose primary group is the user's gid (no such group yet)",
      () => {
        // useradd refuses a gid without a group: give the account another group, then edit its gid field
        sh("useradd", ["-u", "62079", "-M", "-N", "-g", MALLORY.name, "tsh-other"]);
        const gid = sh("getent", ["group", MALLORY.name]).split(":")[2];
        sh("sed", ["-i", `s/^tsh-other:x:62079:${gid}:/tsh-other:x:62079:${ALICE.uid}:/`, "/etc/passwd"]);
      },
      /account\(s\) tsh-other have gid 62001 \(the private group of tsh-alice, which owns the home\) as primary group/,
    ],
  ])("%s", (_what, make, message) => {
    make();
    const before = world();
    const r = users([rec(ALICE, 1)]);
    expectStatus(r, 3);
    expect(r.stderr).toMatch(message);
    expect(world()).toEqual(before); // no account, group, home or state line made
  });
});

describe("a managed user's private group and home", () => {
  afterAll(() => gone([ALICE.name, BOB.name]));

  test("someone added to a managed user's private group later is refused, until removed", () => {
    expectStatus(users([rec(ALICE, 1), rec(BOB)]), 0);
    expect(users([rec(ALICE, 1), rec(BOB)]).changes).toBe(0);
    sh("gpasswd", ["-a", MALLORY.name, ALICE.name]);
    const before = world();
    const r = users([rec(ALICE, 1), rec(BOB)]);
    expectStatus(r, 3);
    expect(r.stderr).toContain(`group ${ALICE.name} (gid ${ALICE.uid}, the private group that owns ${ALICE.name}'s home) has other members: ${MALLORY.name}`);
    expect(r.stderr).toContain(`gpasswd -d <member> ${ALICE.name}`);
    expect(world()).toEqual(before);
    sh("gpasswd", ["-d", MALLORY.name, ALICE.name]);
    const again = users([rec(ALICE, 1), rec(BOB)]);
    expectStatus(again, 0);
    expect(again.changes).toBe(0);
  });

  test("a home left by another uid is not adopted by a new account; a home of the same uid (state lost) is", () => {
    // bob's account and state go (a reinstalled OS keeps the array); his home stays, owned by his uid
    const home = path.join(mp, "homes", BOB.name);
    fs.writeFileSync(path.join(home, "notes.txt"), "bob's\n");
    sh("chown", [`${BOB.uid}:${BOB.uid}`, path.join(home, "notes.txt")]);
    const sums = checksumTree(home);
    gone([BOB.name]);
    const state = path.join(stateDir, "users");
    fs.writeFileSync(state, fs.readFileSync(state, "utf8").split("\n").filter((l) => l && !l.startsWith(`${BOB.name}|`)).join("\n") + "\n");

    // someone else under bob's name (another uid): refused, bob's files untouched
    const other = { name: BOB.name, uid: 62003 };
    const before = world();
    const r = users([rec(ALICE, 1), rec(other)]);
    expectStatus(r, 3);
    expect(r.stderr).toContain(`${home} exists, owned by uid ${BOB.uid}, but ${BOB.name} (uid 62003) is not a train-server account yet`);
    expect(world()).toEqual(before);
    expect(checksumTree(home)).toEqual(sums);
    expect(sh("stat", ["-c", "%u", home]).trim()).toBe(String(BOB.uid));

    // bob again with his own uid: the home is adopted as it is
    const back = users([rec(ALICE, 1), rec(BOB)]);
    expectStatus(back, 0);
    expect(sh("getent", ["passwd", BOB.name]).split(":")[2]).toBe(String(BOB.uid));
    expect(checksumTree(home)).toEqual({ ...sums, ".ssh/authorized_keys": expect.any(String) });
    expect(users([rec(ALICE, 1), rec(BOB)]).changes).toBe(0);
  });

  test("a state file whose last line has no newline (the adoption line, added by hand) is read whole", () => {
    const state = path.join(stateDir, "users");
    fs.writeFileSync(state, fs.readFileSync(state, "utf8").replace(/\n$/, ""));
    const r = users([rec(ALICE, 1), rec(BOB)]);
    expectStatus(r, 0);
    expect(r.changes).toBe(0);
  });
});
