/**
 * snapshot.sh + the rendered btrbk.conf on a real btrfs loop device under a simulated clock (libfaketime):
 * a month of backdated hourly snapshots, then 30 hourly runs across a day and a week boundary. After every run the
 * snapshots left are exactly the newest 24 hourly + 7 daily (02:00) + 4 weekly (Sunday), the newest of each class
 * is kept, and subvolumes btrbk did not create (an admin's manual snapshot, another user's old snapshots) are
 * untouched. The history starts in the old shared layout (.snapshots/homes/alice.<stamp>): the first run moves it into
 * alice's own directory (.snapshots/homes/alice/), and bob, listed but without a home yet, is skipped, not an error.
 */
import * as fs from "fs";
import * as path from "path";
import { renderBtrbkConf } from "../../components/render/ops";
import { exampleOpsParams } from "../helpers/ops";
import { bash, runScript, Scratch, sh } from "../helpers/host";

const LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const HOUR = 3600_000;
const stamp = (t: number) => new Date(t).toISOString().replace(/[-:]/g, "").slice(0, 13); // 20261205T2000

/**
 * The retention model, written independently of btrbk: from all snapshot times ever made, the first of each of the
 * last 24 hours, of each of the last 7 days (a day starts at 02:00) and of each of the last 4 weeks (a week
 * starts on Sunday 02:00), plus the newest.
 */
function expectedKept(made: number[], now: number): string[] {
  const keep = new Set<number>();
  const firstIn = (from: number, to: number) => made.filter((t) => t >= from && t < to).sort((a, b) => a - b)[0];
  const hourStart = Math.floor(now / HOUR) * HOUR;
  let dayStart = Date.UTC(new Date(now).getUTCFullYear(), new Date(now).getUTCMonth(), new Date(now).getUTCDate(), 2);
  if (dayStart > now) dayStart -= 24 * HOUR;
  const weekStart = dayStart - new Date(dayStart).getUTCDay() * 24 * HOUR; // Sunday 02:00
  for (let k = 0; k < 24; k++) keep.add(firstIn(hourStart - k * HOUR, hourStart - (k - 1) * HOUR));
  for (let k = 0; k < 7; k++) keep.add(firstIn(dayStart - k * 24 * HOUR, dayStart - (k - 1) * 24 * HOUR));
  for (let k = 0; k < 4; k++) keep.add(firstIn(weekStart - k * 168 * HOUR, weekStart - (k - 1) * 168 * HOUR));
  keep.add(Math.max(...made));
  return [...keep].filter((t) => t !== undefined).sort((a, b) => a - b).map(stamp);
}

let scratch: Scratch;
let mnt: string;
let env: Record<string, string>;
beforeAll(() => {
  scratch = new Scratch("ts-ops-snapshot-");
  mnt = scratch.btrfsArray({ sizeMb: 512, subvolumes: ["homes/alice", "docker-volumes/alice"] });
  for (const sv of ["homes/alice", "docker-volumes/alice"]) fs.writeFileSync(path.join(mnt, sv, "notes.txt"), `data of ${sv}\n`);
  const conf = path.join(scratch.dir, "btrbk.conf");
  fs.writeFileSync(conf, renderBtrbkConf(exampleOpsParams({ mountpoint: mnt })));
  env = { TS_BTRBK_CONF: conf, TS_MOUNTPOINT: mnt, TS_TEXTFILE_DIR: path.join(scratch.dir, "textfile"), TZ: "UTC" };
});
afterAll(() => scratch.cleanup());

const listSnaps = (group: string, prefix: string) =>
  fs.readdirSync(path.join(mnt, ".snapshots", group, group === "homes" ? prefix : "")).filter((n) => n.startsWith(`${prefix}.`)).map((n) => n.slice(prefix.length + 1)).filter((s) => /^\d{8}T\d{4}$/.test(s)).sort();

it("keeps exactly 24 hourly / 7 daily / 4 weekly under a simulated clock, and nothing it did not create is touched", () => {
  const start = Date.UTC(2026, 11, 5, 20); // Saturday 2026-12-05 20:00 UTC; 30 runs cross Sunday 02:00
  // A month of hourly history for alice's home, as btrbk would have named it (read-only snapshots).
  const history: number[] = [];
  for (let t = start - 30 * 24 * HOUR; t < start; t += HOUR) history.push(t);
  const homesDir = path.join(mnt, ".snapshots", "homes");
  fs.mkdirSync(homesDir, { recursive: true });
  fs.mkdirSync(path.join(mnt, ".snapshots", "docker-volumes"), { recursive: true });
  const r = bash(`set -e; cd ${homesDir}; for s in ${history.map(stamp).join(" ")}; do btrfs subvolume snapshot -r ${mnt}/homes/alice alice.$s >/dev/null; done
    btrfs subvolume snapshot -r ${mnt}/homes/alice alice.before-migration >/dev/null
    btrfs subvolume create bob.20261101T0000 >/dev/null`);
  expect(r.stderr).toBe("");
  expect(fs.readdirSync(homesDir).filter((n) => /^alice\.\d{8}T\d{4}$/.test(n))).toHaveLength(720); // the old layout

  const madeDocker: number[] = [];
  for (let i = 0; i < 30; i++) {
    const now = start + i * HOUR;
    const run = runScript("snapshot", "apply", { ...env, LD_PRELOAD: LIBFAKETIME, FAKETIME: `@${new Date(now).toISOString().slice(0, 19).replace("T", " ")}` });
    expect([i, run.status, run.stderr.includes("ERROR")]).toEqual([i, 0, false]);
    if (i === 0) {
      expect(run.stderr).toMatch(/moved alice\.\d{8}T\d{4} into \.snapshots\/homes\/alice\//);
      expect(run.stderr).toMatch(/skipped homes\/bob/); // listed, no home yet
      expect(fs.readdirSync(homesDir).sort()).toEqual(["alice", "alice.before-migration", "bob", "bob.20261101T0000"]);
    }
    history.push(now);
    madeDocker.push(now);
    // exactly the model's set, after every run
    expect([i, listSnaps("homes", "alice")]).toEqual([i, expectedKept(history, now)]);
    expect([i, listSnaps("docker-volumes", "alice")]).toEqual([i, expectedKept(madeDocker, now)]);
    expect(run.results["snapshots.homes"]).toBe(String(listSnaps("homes", "alice").length + 2));
  }
  const final = listSnaps("homes", "alice");
  const now = start + 29 * HOUR; // Monday 2026-12-07 01:00 (still Sunday's "day": days start at 02:00)
  // class by class: 24 hourly, 7 daily (02:00), 4 weekly (Sunday 02:00), the newest of each present
  const hourly = final.filter((s) => Date.parse(`${s.slice(0, 4)}-${s.slice(4, 6)}-${s.slice(6, 8)}T${s.slice(9, 11)}:00Z`) > now - 24 * HOUR);
  expect(hourly).toHaveLength(24);
  expect(hourly[hourly.length - 1]).toBe(stamp(now));
  const daily = final.filter((s) => s.endsWith("T0200") && s >= "20261130T0200"); // 7 days back from Mon 07 Dec 01:00
  expect(daily).toEqual(["20261130T0200", "20261201T0200", "20261202T0200", "20261203T0200", "20261204T0200", "20261205T0200", "20261206T0200"]);
  const weekly = final.filter((s) => s.endsWith("T0200") && new Date(Date.UTC(+s.slice(0, 4), +s.slice(4, 6) - 1, +s.slice(6, 8))).getUTCDay() === 0);
  expect(weekly).toEqual(["20261115T0200", "20261122T0200", "20261129T0200", "20261206T0200"]); // Sundays
  // 24 hourly (06 Dec 02:00 .. 07 Dec 01:00) + 6 more dailies + 3 more weeklies (06 Dec 02:00 is in all three)
  expect(final).toHaveLength(24 + 6 + 3);
  expect(final[0]).toBe("20261115T0200"); // nothing older survived
  // Read-only, and the foreign subvolumes survived.
  expect(sh("btrfs", ["property", "get", "-ts", path.join(homesDir, "alice", `alice.${stamp(now)}`), "ro"]).trim()).toBe("ro=true");
  expect(fs.existsSync(path.join(homesDir, "alice.before-migration"))).toBe(true);
  expect(fs.existsSync(path.join(homesDir, "bob.20261101T0000"))).toBe(true);
  // the migrated history is read-only again (btrbk's retention deleted the old ones among it, as above)
  expect(sh("btrfs", ["property", "get", "-ts", path.join(homesDir, "alice", `alice.${final[0]}`), "ro"]).trim()).toBe("ro=true");
  // outcome metric
  const prom = fs.readFileSync(path.join(env.TS_TEXTFILE_DIR, "train_server_snapshot.prom"), "utf8");
  expect(prom).toMatch(/^train_server_task_success\{task="snapshot"\} 1$/m);
  expect(prom).toMatch(new RegExp(`^train_server_snapshots\\{group="homes"\\} ${final.length + 2}$`, "m"));
  expect(sh("promtool", ["check", "metrics"], prom)).toBe("");
});

it("reports failure in its metric when the array is not mounted, keeping the last success time", () => {
  const before = fs.readFileSync(path.join(env.TS_TEXTFILE_DIR, "train_server_snapshot.prom"), "utf8");
  const lastOk = /train_server_task_last_success_timestamp_seconds\{task="snapshot"\} (\d+)/.exec(before)![1];
  const run = runScript("snapshot", "apply", { ...env, TS_MOUNTPOINT: path.join(scratch.dir, "not-mounted") });
  expect(run.status).not.toBe(0);
  const prom = fs.readFileSync(path.join(env.TS_TEXTFILE_DIR, "train_server_snapshot.prom"), "utf8");
  expect(prom).toMatch(/^train_server_task_success\{task="snapshot"\} 0$/m);
  expect(prom).toContain(`train_server_task_last_success_timestamp_seconds{task="snapshot"} ${lastOk}`);
});
