/**
 * backup.sh and verify-restore.sh for real: btrfs loop array -> read-only snapshot -> restic through an rclone
 * remote on local disk (the same `rclone:` backend the Drive uses) at the rendered upload limit; restore is
 * byte-for-byte; a second backup of unchanged data adds ~nothing; the restore verification passes, then fails
 * (and says so in its metric) once a pack file of the repository is corrupted.
 */
import * as fs from "fs";
import * as path from "path";
import { mbitToKiBps } from "../../components/render/ops";
import { checksumTree, runScript, Scratch, sh, writeRandomFile } from "../helpers/host";

let scratch: Scratch;
let mnt: string;
let env: Record<string, string>;
let repo: string;
const LIMIT_KIB = mbitToKiBps(100); // what the stack renders: 12207 KiB/s

const prom = (task: string) => fs.readFileSync(path.join(env.TS_TEXTFILE_DIR, `train_server_${task}.prom`), "utf8");
const sample = (text: string, metric: string) => {
  const m = new RegExp(`^${metric.replace(/[{}]/g, "\\$&")} (\\S+)$`, "m").exec(text);
  return m ? Number(m[1]) : NaN;
};

beforeAll(() => {
  scratch = new Scratch("ts-ops-backup-");
  mnt = scratch.btrfsArray({ sizeMb: 1024, subvolumes: ["homes/alice", "homes/bob", "docker-volumes/alice"] });
  writeRandomFile(path.join(mnt, "homes/alice/checkpoints/model.pt"), 24);
  writeRandomFile(path.join(mnt, "homes/bob/data.bin"), 12);
  writeRandomFile(path.join(mnt, "docker-volumes/alice/db/pg.dat"), 4);
  for (let i = 0; i < 300; i++) {
    const f = path.join(mnt, "homes/alice/src", `d${i % 10}`, `file ${i}.py`);
    fs.mkdirSync(path.dirname(f), { recursive: true });
    fs.writeFileSync(f, `print(${i})\n`.repeat(i + 1));
  }
  fs.symlinkSync("checkpoints/model.pt", path.join(mnt, "homes/alice/latest.pt"));

  const secrets = path.join(scratch.dir, "secrets");
  fs.mkdirSync(secrets, { mode: 0o700 });
  fs.writeFileSync(path.join(secrets, "restic-password"), "correct horse battery staple\n", { mode: 0o600 });
  fs.writeFileSync(path.join(secrets, "rclone.conf"), "[backupdisk]\ntype = local\n", { mode: 0o600 });
  repo = path.join(scratch.dir, "drive", "train-server", "restic");
  env = {
    TS_MOUNTPOINT: mnt,
    TS_SNAPSHOT_SOURCES: "homes/* docker-volumes/*",
    TS_RESTIC_REPOSITORY: `rclone:backupdisk:${repo}`,
    TS_RESTIC_PASSWORD_FILE: path.join(secrets, "restic-password"),
    TS_RCLONE_CONFIG: path.join(secrets, "rclone.conf"),
    TS_BACKUP_LIMIT_UPLOAD_KIB: String(LIMIT_KIB),
    TS_BACKUP_KEEP_DAILY: "7",
    TS_BACKUP_KEEP_WEEKLY: "52",
    TS_BACKUP_ARCHIVE_KEEP_YEARS: "0",
    TS_STATE_DIR: path.join(scratch.dir, "state"),
    TS_TEXTFILE_DIR: path.join(scratch.dir, "textfile"),
    TS_VERIFY_SAMPLE_FILES: "25",
    TS_VERIFY_READ_DATA_SUBSET: "100%",
  };
});
afterAll(() => scratch.cleanup());

import { execFileSync } from "child_process";
const restic = (args: string[]) => execFileSync("restic", args, { encoding: "utf8", env: resticEnv(), maxBuffer: 64 << 20 });
const resticEnv = () => ({ ...process.env, RESTIC_REPOSITORY: env.TS_RESTIC_REPOSITORY, RESTIC_PASSWORD_FILE: env.TS_RESTIC_PASSWORD_FILE, RCLONE_CONFIG: env.TS_RCLONE_CONFIG, RESTIC_CACHE_DIR: path.join(scratch.dir, "cache") });

const figures: Record<string, number> = {};
const stagingIds = () => sh("btrfs", ["subvolume", "list", mnt]).trim().split("\n").filter((l) => l.includes(" path .snapshots/.backup/")).map((l) => Number(/^ID (\d+)/.exec(l)![1]));
let firstIds: number[] = [];
afterAll(() => console.log(`restic round trip figures: ${JSON.stringify(figures)}`));

it("refuses to run with a secret file readable by others, before touching anything", () => {
  fs.chmodSync(env.TS_RESTIC_PASSWORD_FILE, 0o644);
  const r = runScript("backup", "apply", env);
  fs.chmodSync(env.TS_RESTIC_PASSWORD_FILE, 0o600);
  expect(r.status).not.toBe(0);
  expect(r.stderr).toMatch(/readable by group\/other/);
  expect(fs.existsSync(repo)).toBe(false);
  expect(r.stdout + r.stderr).not.toContain("correct horse");
});

it("first backup initialises the repository, uploads at the limit, and restores byte-for-byte", () => {
  const t0 = Date.now();
  const r = runScript("backup", "apply", env);
  const seconds = (Date.now() - t0) / 1000;
  expect(r.stderr).not.toMatch(/ERROR/);
  expect(r.status).toBe(0);
  expect(r.stderr).toMatch(/initialised restic repository/);
  expect(r.stdout + r.stderr).not.toContain("correct horse");
  const added = Number(r.results.data_added);
  Object.assign(figures, { files: Number(r.results.total_files_processed), bytes: Number(r.results.total_bytes_processed), first_data_added: added, first_seconds: seconds });
  expect(figures.files).toBe(303);
  expect(figures.bytes).toBeGreaterThan(40 * 1024 * 1024);
  // 40 MiB of random data at 12207 KiB/s cannot take less than ~3.3 s: the limit is really applied
  expect(seconds).toBeGreaterThan((0.8 * added) / (LIMIT_KIB * 1024));
  expect(fs.existsSync(path.join(repo, "config"))).toBe(true);

  const target = path.join(scratch.dir, "restore1");
  restic(["restore", r.results.snapshot_id, "--target", target]);
  const restored = path.join(target, mnt, ".snapshots/.backup");
  for (const sv of ["homes/alice", "homes/bob", "docker-volumes/alice"]) {
    const live = checksumTree(path.join(mnt, sv));
    expect(Object.keys(live).length).toBeGreaterThan(0);
    expect(checksumTree(path.join(restored, sv))).toEqual(live);
  }
  expect(fs.readlinkSync(path.join(restored, "homes/alice/latest.pt"))).toBe("checkpoints/model.pt");
  // the snapshot it backed up is read-only
  expect(sh("btrfs", ["property", "get", "-ts", path.join(mnt, ".snapshots/.backup/homes/alice"), "ro"]).trim()).toBe("ro=true");
  firstIds = stagingIds();
  expect(firstIds).toHaveLength(3);
  const p = prom("backup");
  expect(sample(p, 'train_server_task_success{task="backup"}')).toBe(1);
  expect(sample(p, "train_server_backup_total_files_processed{}")).toBe(303);
  expect(sh("promtool", ["check", "metrics"], p)).toBe("");
});

it("a second backup of the same data adds almost nothing and replaces the staging snapshot", () => {
  const t0 = Date.now();
  const r = runScript("backup", "apply", env);
  figures.second_seconds = (Date.now() - t0) / 1000;
  expect(r.status).toBe(0);
  figures.second_data_added = Number(r.results.data_added);
  figures.second_files_new = Number(r.results.files_new);
  expect(figures.second_files_new).toBe(0);
  expect(Number(r.results.files_unmodified)).toBe(303); // restic found its parent: same paths, files not re-read
  expect(figures.second_data_added).toBeLessThan(64 * 1024);
  expect(JSON.parse(restic(["snapshots", "--json"])).length).toBe(1); // forget --keep-daily 7: same day -> one kept
  // the previous staging snapshots were deleted, new ones taken: exactly three, all newer than the first three
  const staging = sh("btrfs", ["subvolume", "list", mnt]).trim().split("\n").filter((l) => l.includes(" path .snapshots/.backup/"));
  expect(staging.map((l) => l.replace(/^ID \d+ gen \d+ top level \d+ path /, "")).sort()).toEqual(
    [".snapshots/.backup/docker-volumes/alice", ".snapshots/.backup/homes/alice", ".snapshots/.backup/homes/bob"]);
  expect(stagingIds().filter((id) => firstIds.includes(id))).toEqual([]);
});

it("restore verification passes on a healthy repository", () => {
  const r = runScript("verify-restore", "apply", env);
  expect(r.stderr).not.toMatch(/ERROR/);
  expect(r.status).toBe(0);
  expect(r.results).toMatchObject({ compared: "25", mismatches: "0", repository_ok: "1" });
  expect(sample(prom("verify-restore"), 'train_server_task_success{task="verify-restore"}')).toBe(1);
  expect(fs.readdirSync(path.join(mnt, ".snapshots")).filter((n) => n.startsWith(".verify"))).toEqual([]); // scratch removed
});

it("restore verification fails, and its metric says so, when a pack file is corrupted", () => {
  const packs = sh("find", [path.join(repo, "data"), "-type", "f"]).trim().split("\n");
  const biggest = packs.sort((a, b) => fs.statSync(b).size - fs.statSync(a).size)[0];
  const fd = fs.openSync(biggest, "r+");
  fs.writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, 1024);
  fs.closeSync(fd);
  const r = runScript("verify-restore", "apply", env);
  expect(r.status).not.toBe(0);
  const p = prom("verify-restore");
  expect(sample(p, 'train_server_task_success{task="verify-restore"}')).toBe(0);
  expect(sample(p, 'train_server_task_last_success_timestamp_seconds{task="verify-restore"}')).toBeGreaterThan(0); // kept from the good run
  expect(fs.readdirSync(path.join(mnt, ".snapshots")).filter((n) => n.startsWith(".verify"))).toEqual([]);
});
