/**
 * data-sync.sh for real with rclone remotes defined in the rclone.conf the script is given (TS_RCLONE_CONFIG):
 * copy is byte for byte, a second run transfers and touches nothing, copy mode never deletes at the destination
 * (sync mode mirrors), the bandwidth limit reaches rclone and slows it down, and a failing source or a missing
 * config fails with success 0 while the last-success timestamp is kept.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { checksumTree, runScript, Scratch, writeRandomFile } from "../helpers/host";

jest.setTimeout(120_000);

let scratch: Scratch;
let src: string;
let dst: string;
let env: Record<string, string>;

const promFile = () => fs.readFileSync(path.join(env.TS_TEXTFILE_DIR, "train_server_data-sync.prom"), "utf8");
const sample = (series: string) => {
  const m = new RegExp(`^${series.replace(/[{}]/g, "\\$&")} (\\S+)$`, "m").exec(promFile());
  return m ? Number(m[1]) : NaN;
};
const success = () => sample('train_server_task_success{task="data-sync"}');
const lastSuccess = () => sample('train_server_task_last_success_timestamp_seconds{task="data-sync"}');
const lastRun = () => sample('train_server_task_last_run_timestamp_seconds{task="data-sync"}');
/** Identity of every file under dst (inode, mtime, ctime): a rewrite or touch changes it. */
const identity = (root: string) =>
  Object.fromEntries(Object.keys(checksumTree(root)).map((f) => {
    const s = fs.statSync(path.join(root, f), { bigint: true });
    return [f, `${s.ino}:${s.mtimeNs}:${s.ctimeNs}`];
  }));
const without = (tree: Record<string, string>, ...names: string[]) => Object.fromEntries(Object.entries(tree).filter(([k]) => !names.includes(k)));
const timed = (fn: () => ReturnType<typeof runScript>) => {
  const t0 = process.hrtime.bigint();
  const r = fn();
  return { r, seconds: Number(process.hrtime.bigint() - t0) / 1e9 };
};

beforeAll(() => {
  scratch = new Scratch("ts-ops-datasync-");
  src = path.join(scratch.dir, "bucket");
  dst = path.join(scratch.dir, "drive");
  writeRandomFile(path.join(src, "datasets/imagenet-shard-000.tar"), 6);
  writeRandomFile(path.join(src, "datasets/deep/er/labels.bin"), 1);
  fs.writeFileSync(path.join(src, "README with spaces.md"), "# bucket\n");
  fs.writeFileSync(path.join(src, "empty"), "");
  fs.mkdirSync(dst, { recursive: true });
  fs.writeFileSync(path.join(dst, "only-in-drive.txt"), "a colleague put this here\n");
  const conf = path.join(scratch.dir, "secrets", "rclone.conf");
  fs.mkdirSync(path.dirname(conf), { mode: 0o700 });
  fs.writeFileSync(conf, `[src]\ntype = alias\nremote = ${src}\n\n[dst]\ntype = alias\nremote = ${dst}\n\n[mirror]\ntype = alias\nremote = ${path.join(scratch.dir, "mirror")}\n`, { mode: 0o600 });
  env = {
    TS_SYNC_SOURCE: "src:",
    TS_SYNC_DESTINATION: "dst:",
    TS_SYNC_BWLIMIT: "20M",
    TS_SYNC_MODE: "copy",
    TS_RCLONE_CONFIG: conf,
    TS_TEXTFILE_DIR: path.join(scratch.dir, "textfile"),
  };
});
afterAll(() => scratch.cleanup());

describe("copy mode", () => {
  let afterFirst: Record<string, string>;

  it("copies every file byte for byte, keeps what only the destination has, success 1", () => {
    const before = Math.floor(Date.now() / 1000);
    const r = runScript("data-sync", "apply", env);
    expect(r.stderr).not.toMatch(/ERROR/);
    expect(r.status).toBe(0);
    expect(r.changes).toBe(1);
    expect(r.stderr).toMatch(/Starting bandwidth limiter at 20Mi Byte\/s/); // TS_SYNC_BWLIMIT reached rclone
    expect(Object.keys(checksumTree(src))).toHaveLength(4);
    expect(without(checksumTree(dst), "only-in-drive.txt")).toEqual(checksumTree(src));
    expect(fs.readFileSync(path.join(dst, "only-in-drive.txt"), "utf8")).toBe("a colleague put this here\n");
    expect(success()).toBe(1);
    expect(lastSuccess()).toBeGreaterThanOrEqual(before);
    afterFirst = identity(dst);
  });

  it("a second run transfers nothing and touches no file", () => {
    const r = runScript("data-sync", "apply", env);
    expect(r.status).toBe(0);
    expect(r.stderr).toMatch(/There was nothing to transfer/);
    expect(r.stderr).not.toMatch(/Copied/);
    expect(identity(dst)).toEqual(afterFirst);
    expect(success()).toBe(1);
  });

  it("never deletes at the destination, even what the source no longer has", () => {
    fs.rmSync(path.join(src, "datasets/deep"), { recursive: true });
    const r = runScript("data-sync", "apply", env);
    expect(r.status).toBe(0);
    expect(r.stderr).not.toMatch(/Deleted/);
    expect(identity(dst)).toEqual(afterFirst);
    expect(fs.existsSync(path.join(dst, "datasets/deep/er/labels.bin"))).toBe(true);
  });
});

it("the bandwidth limit slows rclone down: 4 MiB at 1M (1 MiB/s) take >= 3.5 s, unlimited well under that", () => {
  writeRandomFile(path.join(src, "limited/4mib.bin"), 4);
  const limited = timed(() => runScript("data-sync", "apply", { ...env, TS_SYNC_BWLIMIT: "1M" }));
  expect(limited.r.status).toBe(0);
  expect(limited.r.stderr).toMatch(/Starting bandwidth limiter at 1Mi Byte\/s/);
  expect(limited.seconds).toBeGreaterThanOrEqual(3.5);
  expect(limited.seconds).toBeLessThan(15);
  writeRandomFile(path.join(src, "unlimited/4mib.bin"), 4);
  const unlimited = timed(() => runScript("data-sync", "apply", { ...env, TS_SYNC_BWLIMIT: "off" }));
  expect(unlimited.r.status).toBe(0);
  expect(unlimited.r.stderr).not.toMatch(/bandwidth limiter/);
  expect(unlimited.seconds).toBeLessThan(2);
  expect(without(checksumTree(dst), "only-in-drive.txt", "datasets/deep/er/labels.bin")).toEqual(checksumTree(src));
});

it("sync mode mirrors: the destination loses what the source does not have", () => {
  const mirror = path.join(scratch.dir, "mirror");
  fs.mkdirSync(mirror);
  fs.writeFileSync(path.join(mirror, "stray.txt"), "x");
  const r = runScript("data-sync", "apply", { ...env, TS_SYNC_MODE: "sync", TS_SYNC_DESTINATION: "mirror:" });
  expect(r.status).toBe(0);
  expect(checksumTree(mirror)).toEqual(checksumTree(src));
});

describe("failures", () => {
  let okAt: number;
  beforeAll(() => {
    expect(runScript("data-sync", "apply", env).status).toBe(0);
    okAt = lastSuccess();
    spawnSync("sleep", ["1.1"]); // so that a failed run's timestamp differs from the last success
  });

  it("a source remote missing from rclone.conf: exit 1, success 0, last success kept", () => {
    const r = runScript("data-sync", "apply", { ...env, TS_SYNC_SOURCE: "nosuch:bucket/path" });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/didn't find section in config file/);
    expect(r.stderr).toMatch(/ERROR: rclone copy failed \(exit 1\)/);
    expect(success()).toBe(0);
    expect(lastSuccess()).toBe(okAt);
    expect(lastRun()).toBeGreaterThan(okAt);
  });

  it("a missing or group-readable rclone.conf: exit 1 and success 0 too (not a silent stale success)", () => {
    expect(runScript("data-sync", "apply", env).status).toBe(0);
    expect(success()).toBe(1);
    const ok = lastSuccess();
    const missing = runScript("data-sync", "apply", { ...env, TS_RCLONE_CONFIG: path.join(scratch.dir, "secrets", "nope.conf") });
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/secret file .*nope\.conf is missing/);
    expect(success()).toBe(0);
    expect(lastSuccess()).toBe(ok);

    expect(runScript("data-sync", "apply", env).status).toBe(0);
    fs.chmodSync(env.TS_RCLONE_CONFIG, 0o640);
    try {
      const open = runScript("data-sync", "apply", env);
      expect(open.status).toBe(1);
      expect(open.stderr).toMatch(/readable by group\/other/);
      expect(success()).toBe(0);
    } finally {
      fs.chmodSync(env.TS_RCLONE_CONFIG, 0o600);
    }
  });
});
