/**
 * scrub.sh for real on a btrfs raid1 of two loop devices: a clean scrub succeeds with zero error counters; after
 * one mirror copy of a data extent is overwritten on ONE device, the scrub repairs it (the device holds the right
 * bytes again, the file reads back intact) but the job fails and its metric carries the errors (btrfs scrub itself
 * exits 0), which is what the BtrfsScrubErrors alert evaluates; the next clean scrub keeps failing on the
 * cumulative device stats until they are reset (as the script documents); an unmounted path fails clearly.
 */
import { spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import YAML from "yaml";
import { alertRules } from "../../components/render/alerts";
import { exampleOpsParams } from "../helpers/ops";
import { runScript, Scratch, sh, writeRandomFile } from "../helpers/host";

jest.setTimeout(300_000);

const ERROR_TYPES = ["read", "csum", "verify", "super", "uncorrectable", "corrected"];
const CORRUPT_BYTES = 8192; // two 4 KiB sectors -> two csum errors

let scratch: Scratch;
let devA: string;
let devB: string;
let mnt: string;
let env: Record<string, string>;
let sums: Record<string, string>;

const sha = (b: Buffer) => crypto.createHash("sha256").update(b).digest("hex");
const promFile = () => fs.readFileSync(path.join(env.TS_TEXTFILE_DIR, "train_server_scrub.prom"), "utf8");
const sample = (text: string, series: string) => {
  const m = new RegExp(`^${series.replace(/[{}]/g, "\\$&")} (\\S+)$`, "m").exec(text);
  return m ? Number(m[1]) : NaN;
};
const scrubErrors = (text: string) => Object.fromEntries(ERROR_TYPES.map((t) => [t, sample(text, `train_server_btrfs_scrub_errors{type="${t}"}`)]));
const zeroErrors = Object.fromEntries(ERROR_TYPES.map((t) => [t, 0]));

/** Bytes on the device itself: the block device's page cache is dropped first (btrfs writes around it). */
function readDevice(dev: string, offset: number, length: number): Buffer {
  sh("blockdev", ["--flushbufs", dev]);
  const fd = fs.openSync(dev, "r");
  try {
    const b = Buffer.alloc(length);
    expect(fs.readSync(fd, b, 0, length, offset)).toBe(length);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

function mount(): void {
  sh("mount", [devA, mnt]);
}

beforeAll(() => {
  scratch = new Scratch("ts-ops-scrub-");
  devA = scratch.loopDevice(512);
  devB = scratch.loopDevice(512);
  sh("mkfs.btrfs", ["-q", "-d", "raid1", "-m", "raid1", devA, devB]);
  mnt = path.join(scratch.dir, "mnt");
  fs.mkdirSync(mnt);
  mount();
  scratch.mountedAt(mnt);
  for (const [name, mb] of [["data/a.bin", 8], ["data/b.bin", 8], ["c.bin", 4]] as const) writeRandomFile(path.join(mnt, name), mb);
  sh("sync");
  sums = Object.fromEntries(["data/a.bin", "data/b.bin", "c.bin"].map((f) => [f, sha(fs.readFileSync(path.join(mnt, f)))]));
  env = { TS_MOUNTPOINT: mnt, TS_TEXTFILE_DIR: path.join(scratch.dir, "textfile") };
});
afterAll(() => scratch.cleanup());

it("a clean array: success, every scrub error counter 0, device stats clean", () => {
  const r = runScript("scrub", "apply", env);
  expect(r.stderr).not.toMatch(/ERROR/);
  expect(r.status).toBe(0);
  for (const t of ERROR_TYPES) expect([t, r.results[`scrub_${t}_errors`]]).toEqual([t, "0"]);
  expect(r.results.device_stats_rc).toBe("0");
  expect(r.stderr).toMatch(/data_bytes_scrubbed: 4194\d{4}/); // 20 MiB of files x 2 copies = 41943040 bytes
  const prom = promFile();
  expect(spawnSync("promtool", ["check", "metrics"], { input: prom, encoding: "utf8" }).status).toBe(0);
  expect(sample(prom, 'train_server_task_success{task="scrub"}')).toBe(1);
  expect(scrubErrors(prom)).toEqual(zeroErrors);
});

describe("one mirror copy corrupted on one device", () => {
  let physB: number;
  let original: Buffer;
  let run: ReturnType<typeof runScript>;

  beforeAll(() => {
    // logical address of a.bin's first extent (filefrag reports btrfs logical addresses in fs blocks)
    const file = path.join(mnt, "data/a.bin");
    const head = fs.readFileSync(file).subarray(0, CORRUPT_BYTES);
    const frag = sh("filefrag", ["-v", file]);
    const blockSize = Number(/blocks of (\d+) bytes/.exec(frag)![1]);
    const logical = Number(/^\s*0:\s+0\.\.\s*\d+:\s+(\d+)\.\./m.exec(frag)![1]) * blockSize;
    sh("umount", [mnt]); // nothing cached; btrfs-map-logical reads the unmounted fs
    const map = sh("btrfs-map-logical", ["-l", String(logical), devA]);
    const mirrors = [...map.matchAll(/^mirror (\d+) logical (\d+) physical (\d+) device (\S+)$/gm)].map((m) => ({ physical: Number(m[3]), device: m[4] }));
    expect(mirrors.map((m) => m.device).sort()).toEqual([devA, devB].sort());
    // the map is right: both copies hold the file's first bytes
    for (const m of mirrors) expect(readDevice(m.device, m.physical, CORRUPT_BYTES).equals(head)).toBe(true);
    physB = mirrors.find((m) => m.device === devB)!.physical;
    original = readDevice(devB, physB, CORRUPT_BYTES);
    // overwrite 8 KiB of the copy on device B only
    const fd = fs.openSync(devB, "r+");
    try {
      fs.writeSync(fd, crypto.randomBytes(CORRUPT_BYTES), 0, CORRUPT_BYTES, physB);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    expect(readDevice(devB, physB, CORRUPT_BYTES).equals(original)).toBe(false);
    mount();
    run = runScript("scrub", "apply", env);
  });

  it("the scrub repairs it: device B holds the original bytes again and every file reads back intact", () => {
    expect(readDevice(devB, physB, CORRUPT_BYTES).equals(original)).toBe(true);
    sh("umount", [mnt]); // read from disk, not from a cache
    mount();
    for (const [f, sum] of Object.entries(sums)) expect([f, sha(fs.readFileSync(path.join(mnt, f)))]).toEqual([f, sum]);
  });

  it("the job still fails and reports the corrected errors (btrfs scrub exits 0)", () => {
    expect(run.stderr).toMatch(/csum_errors: 2\b/);
    expect(run.stderr).toMatch(/ERROR: scrub found 4 error\(s\)/); // 2 csum + 2 corrected
    expect(run.status).toBe(1);
    expect(run.results).toMatchObject({ scrub_csum_errors: "2", scrub_corrected_errors: "2", scrub_uncorrectable_errors: "0", device_stats_rc: "64" });
    const prom = promFile();
    expect(sample(prom, 'train_server_task_success{task="scrub"}')).toBe(0);
    expect(scrubErrors(prom)).toEqual({ ...zeroErrors, csum: 2, corrected: 2 });
  });

  it("the BtrfsScrubErrors expression fires on exactly those counters (promtool, fed the job's textfile)", () => {
    const expr = alertRules({ ...exampleOpsParams().alerts, mountpoint: mnt, driveMountpoint: "/d", quotaWarnPercent: 80 }).find((a) => a.alert === "BtrfsScrubErrors")!.expr;
    const input = promFile()
      .split("\n")
      .filter((l) => l.startsWith("train_server_btrfs_scrub_errors{"))
      .map((l) => ({ series: l.split(" ")[0], values: `${l.split(" ")[1]}x10` }));
    expect(input).toHaveLength(ERROR_TYPES.length);
    const testFile = path.join(scratch.dir, "scrub-alert.test.yml");
    fs.writeFileSync(
      testFile,
      YAML.stringify({
        rule_files: [],
        tests: [{ interval: "1m", input_series: input, promql_expr_test: [{ expr, eval_time: "5m", exp_samples: [
          { labels: 'train_server_btrfs_scrub_errors{type="corrected"}', value: 2 },
          { labels: 'train_server_btrfs_scrub_errors{type="csum"}', value: 2 },
        ] }] }],
      }),
    );
    const t = spawnSync("promtool", ["test", "rules", testFile], { encoding: "utf8" });
    expect(t.stdout + t.stderr).toMatch(/SUCCESS/);
    expect(t.status).toBe(0);
  });

  it("the next clean scrub finds nothing new but keeps failing on the cumulative device stats, until they are reset", () => {
    const again = runScript("scrub", "apply", env);
    expect(again.results).toMatchObject({ scrub_csum_errors: "0", scrub_corrected_errors: "0", device_stats_rc: "64" });
    expect(again.status).toBe(1);
    expect(again.stderr).toContain(`btrfs device stats -z ${mnt}`);
    let prom = promFile();
    expect(scrubErrors(prom)).toEqual(zeroErrors); // BtrfsScrubErrors resolves ...
    expect(sample(prom, 'train_server_task_success{task="scrub"}')).toBe(0); // ... ScrubFailed stays
    expect(sh("btrfs", ["device", "stats", devB])).toMatch(/corruption_errs\s+2$/m); // the job did not reset them

    sh("btrfs", ["device", "stats", "-z", mnt]); // the admin, after checking the disk
    const ok = runScript("scrub", "apply", env);
    expect(ok.stderr).not.toMatch(/ERROR/);
    expect(ok.status).toBe(0);
    expect(ok.results.device_stats_rc).toBe("0");
    prom = promFile();
    expect(sample(prom, 'train_server_task_success{task="scrub"}')).toBe(1);
    expect(scrubErrors(prom)).toEqual(zeroErrors);
  });
});

it("a path that is not mounted: fails with a clear message and success 0", () => {
  const dir = path.join(scratch.dir, "not-mounted");
  fs.mkdirSync(dir);
  const textfile = path.join(scratch.dir, "textfile-unmounted");
  const r = runScript("scrub", "apply", { TS_MOUNTPOINT: dir, TS_TEXTFILE_DIR: textfile });
  expect(r.status).toBe(1);
  expect(r.stderr).toContain(`ERROR: ${dir} is not mounted`);
  const prom = fs.readFileSync(path.join(textfile, "train_server_scrub.prom"), "utf8");
  expect(sample(prom, 'train_server_task_success{task="scrub"}')).toBe(0);
  expect(sample(prom, 'train_server_task_last_success_timestamp_seconds{task="scrub"}')).toBe(0);
});
