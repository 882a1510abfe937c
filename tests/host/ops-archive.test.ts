/**
 * Offboarding keeps the data: backup.sh uploads every archived home (users.sh's read-only snapshot
 * snapshots/archive/<name>-<UTC>) to a real restic repository (rclone: backend on local disk) once, tagged
 * train-server-archive + user=<name> at the archive's own time; the daily/weekly `forget` (here keep 3 daily / 1
 * weekly over three weeks of backdated daily backups) deletes daily backups but never an archive, however old;
 * backup.archiveKeepYears forgets only archives older than that; and the README's one command restores an
 * archived user's home from restic byte for byte.
 */
import { execFileSync, spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { checksumTree, runScript, Scratch, sh, writeRandomFile, HOST_SCRIPTS } from "../helpers/host";
import { backupTestEnv } from "../helpers/ops";

let scratch: Scratch;
let mnt: string;
let env: Record<string, string>;
let opsEnv: string;

const resticEnv = () => ({ ...process.env, RESTIC_REPOSITORY: env.TS_RESTIC_REPOSITORY, RESTIC_PASSWORD_FILE: env.TS_RESTIC_PASSWORD_FILE, RCLONE_CONFIG: env.TS_RCLONE_CONFIG, RESTIC_CACHE_DIR: path.join(scratch.dir, "cache") });
const restic = (args: string[]) => execFileSync("restic", args, { encoding: "utf8", env: resticEnv(), maxBuffer: 64 << 20 });
type Snap = { id: string; time: string; tags?: string[]; paths: string[] };
const snaps = (tag: string): Snap[] => JSON.parse(restic(["snapshots", "--json", "--tag", tag]));
const DAY = 86_400_000;

beforeAll(() => {
  scratch = new Scratch("ts-ops-archive-");
  mnt = scratch.btrfsArray({ sizeMb: 1024, subvolumes: ["homes/alice", "homes/bob", "homes/carol", "docker-volumes/alice", "snapshots"] });
  writeRandomFile(path.join(mnt, "homes/alice/ckpt/model.pt"), 6);
  fs.writeFileSync(path.join(mnt, "homes/alice/notes.md"), "alice's notes\n");
  fs.symlinkSync("ckpt/model.pt", path.join(mnt, "homes/alice/latest.pt"));
  writeRandomFile(path.join(mnt, "homes/bob/data.bin"), 2);
  fs.writeFileSync(path.join(mnt, "homes/carol/old.txt"), "carol left long ago\n");
  sh("chown", ["-R", "41001:41001", path.join(mnt, "homes/alice")]);
  fs.chmodSync(path.join(mnt, "homes/alice/notes.md"), 0o600);
  // archives exactly as users.sh makes them: carol's in 2019 (old), alice's and bob's recently
  fs.mkdirSync(path.join(mnt, "snapshots/archive"), { mode: 0o700 });
  for (const a of ["carol-20190301T101500Z", "alice-20261120T093000Z", "bob-20261125T170000Z"]) {
    sh("btrfs", ["-q", "subvolume", "snapshot", "-r", path.join(mnt, "homes", a.split("-")[0]), path.join(mnt, "snapshots/archive", a)]);
  }
  // not archives: a writable subvolume and a badly named snapshot are left alone
  sh("btrfs", ["-q", "subvolume", "create", path.join(mnt, "snapshots/archive/dave-20261101T000000Z")]);
  sh("btrfs", ["-q", "subvolume", "snapshot", "-r", path.join(mnt, "homes/bob"), path.join(mnt, "snapshots/archive/bob-copy")]);

  env = backupTestEnv(scratch.dir, mnt, "archive test password", { TS_BACKUP_KEEP_DAILY: "3", TS_BACKUP_KEEP_WEEKLY: "1" });
  // the ops.env restic-admin.sh reads (the rendered file's syntax: KEY="value")
  opsEnv = path.join(scratch.dir, "ops.env");
  fs.writeFileSync(opsEnv, Object.entries(env).map(([k, v]) => `${k}="${v}"`).join("\n") + "\n");
});
afterAll(() => scratch.cleanup());

it("uploads each archive once with its own tags and time; the daily forget drops old daily backups, never an archive", () => {
  const first = runScript("backup", "apply", env);
  expect(first.stderr).not.toMatch(/ERROR/);
  expect(first.status).toBe(0);
  expect(first.results.archives_uploaded).toBe("3");
  let archives = snaps("train-server-archive");
  expect(archives.map((s) => [s.tags!.sort().join(","), s.time.slice(0, 19)]).sort()).toEqual([
    ["train-server-archive,user=alice", "2026-11-20T09:30:00"],
    ["train-server-archive,user=bob", "2026-11-25T17:00:00"],
    ["train-server-archive,user=carol", "2019-03-01T10:15:00"],
  ]);
  expect(archives.every((s) => !s.tags!.includes("train-server"))).toBe(true);

  // three weeks of daily backups before today, backdated, exactly as backup.sh tags and paths them
  const staging = path.join(mnt, ".snapshots/.backup");
  const now = Date.now();
  for (let d = 21; d >= 1; d--) {
    const t = new Date(now - d * DAY).toISOString().slice(0, 19).replace("T", " ");
    spawnSync("restic", ["backup", "-q", "--tag", "train-server", "--time", t, staging], { cwd: staging, env: resticEnv(), encoding: "utf8" });
  }
  expect(snaps("train-server")).toHaveLength(22);

  const second = runScript("backup", "apply", env);
  expect(second.status).toBe(0);
  expect(second.results.archives_uploaded).toBe("0"); // each archive once
  // keep 3 daily + 1 weekly (the newest, also a daily): 3 of the 23 daily backups are left, the last 3 days'
  const daily = snaps("train-server");
  expect(daily).toHaveLength(3);
  expect(Math.min(...daily.map((s) => Date.parse(s.time)))).toBeGreaterThan(now - 3 * DAY);
  // every archive survived the forget, the 7-year-old one too
  archives = snaps("train-server-archive");
  expect(archives).toHaveLength(3);
  const prom = fs.readFileSync(path.join(env.TS_TEXTFILE_DIR, "train_server_backup.prom"), "utf8");
  expect(prom).toMatch(/^train_server_backup_archives\{\} 3$/m);
  expect(prom).toMatch(/^train_server_backup_snapshots\{\} 3$/m);
  expect(runScript("backup", "check", env).results.archives).toBe("3");
});

it("backup.archiveKeepYears forgets only the archives older than that, by their own time", () => {
  const r = runScript("backup", "apply", { ...env, TS_BACKUP_ARCHIVE_KEEP_YEARS: "5" });
  expect(r.status).toBe(0);
  expect(r.stderr).toMatch(/forgot 1 archive snapshot\(s\) older than 5 years/);
  expect(snaps("train-server-archive").map((s) => s.tags!.find((t) => t.startsWith("user="))).sort()).toEqual(["user=alice", "user=bob"]);
  // the btrfs archive itself is never deleted
  expect(fs.existsSync(path.join(mnt, "snapshots/archive/carol-20190301T101500Z/old.txt"))).toBe(true);
  // a bad value is refused before anything runs
  const bad = runScript("backup", "apply", { ...env, TS_BACKUP_ARCHIVE_KEEP_YEARS: "five" });
  expect(bad.status).not.toBe(0);
  expect(bad.stderr).toMatch(/TS_BACKUP_ARCHIVE_KEEP_YEARS must be a whole number of years/);
});

it("the README's one command restores an archived user's home from restic (the array lost), byte for byte", () => {
  const home = path.join(mnt, "homes-restored/alice");
  fs.mkdirSync(path.dirname(home));
  const r = spawnSync(
    "bash",
    ["-c", `btrfs subvolume create ${home} && ${HOST_SCRIPTS}/restic-admin.sh restore latest --tag train-server-archive,user=alice --target ${home}`],
    { env: { PATH: process.env.PATH!, TS_OPS_ENV: opsEnv }, encoding: "utf8" },
  );
  expect(r.stderr).not.toMatch(/ERROR|Fatal/);
  expect(r.status).toBe(0);
  expect(checksumTree(home)).toEqual(checksumTree(path.join(mnt, "snapshots/archive/alice-20261120T093000Z")));
  expect(Object.keys(checksumTree(home)).sort()).toEqual(["ckpt/model.pt", "notes.md"]);
  expect(fs.readlinkSync(path.join(home, "latest.pt"))).toBe("ckpt/model.pt");
  expect(sh("stat", ["-c", "%u:%g %a", path.join(home, "notes.md")]).trim()).toBe("41001:41001 600");
  expect(sh("stat", ["-c", "%i", home]).trim()).toBe("256"); // a subvolume, as users.sh wants a home
  // the wrapper refuses to run without its ops.env
  const none = spawnSync("bash", [`${HOST_SCRIPTS}/restic-admin.sh`, "snapshots"], { env: { PATH: process.env.PATH!, TS_OPS_ENV: "/nonexistent" }, encoding: "utf8" });
  expect(none.status).toBe(1);
  expect(none.stderr).toMatch(/ops.env is missing|nonexistent is missing/);
});
