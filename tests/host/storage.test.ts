/**
 * host-scripts/storage.sh for real, on loop devices: array layouts, adoption and idempotency, refusals
 * (foreign signatures, partition tables, missing/mounted/too small devices, half-ours arrays), profile
 * conversion and destroy. The bcache path needs the bcache module (absent here): it is covered by the VM test.
 */
import * as fs from "fs";
import * as path from "path";
import { Scratch, runScript, writeRandomFile, sh, ScriptRun } from "../helpers/host";
import {
  attachLoop,
  blkidRc,
  blkidValue,
  fstabLinesFor,
  isMountpoint,
  makeExt4WithData,
  mountOptions,
  profiles,
  qgroups,
  storageEnv,
  subvolumes,
  treeDigest,
  withMount,
} from "../helpers/storage";

jest.setTimeout(300_000);

const storage = (action: string, env: Record<string, string>): ScriptRun => runScript("storage", action, env);

function timed(action: string, env: Record<string, string>): { run: ScriptRun; seconds: number } {
  const t0 = process.hrtime.bigint();
  const run = storage(action, env);
  return { run, seconds: Number(process.hrtime.bigint() - t0) / 1e9 };
}

/** Fail with the script's own words when it did not exit as expected. */
function expectStatus(run: ScriptRun, status: number): void {
  if (run.status !== status) throw new Error(`expected exit ${status}, got ${run.status}\n${run.stdout}\n${run.stderr}`);
}

let scratch: Scratch;
beforeEach(() => {
  scratch = new Scratch("ts-storage-");
});
afterEach(() => scratch.cleanup());

interface Row {
  layout: string;
  firstApply: number;
  secondApply: number;
  check: number;
  before: string;
  after: string;
}
const table: Row[] = [];
afterAll(() => {
  if (!table.length) return;
  const lines = table.map(
    (r) =>
      `${r.layout.padEnd(18)} ${r.firstApply.toFixed(2).padStart(7)} ${r.secondApply.toFixed(2).padStart(8)} ` +
      `${r.check.toFixed(2).padStart(6)}  ${r.before}  ${r.after}`,
  );
  console.log(
    ["storage.sh timings (s) and homes/ checksums (digest of the sha256 tree)",
      "layout             apply#1  apply#2  check  before        after (changed config)", ...lines].join("\n"),
  );
});

const SUBVOLS = "homes workspaces shared docker-volumes cache cache/pip cache/conda cache/huggingface cache/torch cache/apt cache/go cache/npm cache/docker cache/gdrive snapshots";

describe.each([
  { data: "raid10", metadata: "raid10", n: 4 },
  { data: "raid1", metadata: "raid1", n: 2 },
  { data: "single", metadata: "dup", n: 1 },
  { data: "raid1c3", metadata: "raid1c3", n: 3 },
  { data: "raid10", metadata: "raid1c3", n: 6 },
])("layout $data/$metadata over $n devices", ({ data, metadata, n }) => {
  it("checks without writing, builds, adopts with no change, and applies only a changed option or subvolume", () => {
    const devs = Array.from({ length: n }, () => attachLoop(scratch).dev);
    const env = storageEnv(scratch, devs, { TS_DATA_PROFILE: data, TS_METADATA_PROFILE: metadata, TS_SUBVOLUMES: SUBVOLS });
    const mp = env.TS_MOUNTPOINT;
    const fstabBefore = fs.readFileSync(env.TS_FSTAB, "utf8");

    // check on blank devices: reports the plan, formats nothing
    const check0 = storage("check", env);
    expectStatus(check0, 0);
    expect(check0.changes).toBe(0);
    expect(Number(check0.results.pending)).toBeGreaterThan(0);
    expect(check0.stderr).toContain("would: mkfs.btrfs");
    for (const d of devs) expect(blkidRc(d)).toBe(2);
    expect(isMountpoint(mp)).toBe(false);
    expect(fs.readFileSync(env.TS_FSTAB, "utf8")).toBe(fstabBefore);

    // first apply builds it
    const first = timed("apply", env);
    expectStatus(first.run, 0);
    const uuid = first.run.results.uuid;
    expect(uuid).toMatch(/^[0-9a-f-]{36}$/);
    for (const d of devs) {
      expect(blkidValue(d, "UUID")).toBe(uuid);
      expect(blkidValue(d, "LABEL")).toBe(env.TS_LABEL);
    }
    expect(first.run.results).toMatchObject({ mountpoint: mp, data_profile: data, metadata_profile: metadata, devices: devs.join(" ") });
    expect(isMountpoint(mp)).toBe(true);
    expect(profiles(mp)).toEqual({ data, metadata, system: metadata });
    const subs = subvolumes(mp);
    expect([...subs.keys()].sort()).toEqual(SUBVOLS.split(" ").sort());
    const qg = qgroups(mp);
    for (const id of subs.values()) expect(qg.has(`0/${id}`)).toBe(true);
    expect(fstabLinesFor(env.TS_FSTAB, mp)).toEqual([`UUID=${uuid} ${mp} btrfs ${env.TS_MOUNT_OPTIONS} 0 0`]);
    expect(fs.readFileSync(env.TS_FSTAB, "utf8")).toContain("UUID=0000-not-ours /mnt/elsewhere ext4 defaults 0 2");
    expect(first.run.changes).toBe(1 + 1 + 1 + 1 + SUBVOLS.split(" ").length + 1); // mkfs, mkdir, mount, fstab, subvols, quota

    writeRandomFile(path.join(mp, "homes", "alice", "model.bin"), 8);
    writeRandomFile(path.join(mp, "homes", "bob", "data.bin"), 3);
    sh("sync");
    const before = treeDigest(path.join(mp, "homes"));

    // second apply with the same inputs: adopted, nothing changes
    const second = timed("apply", env);
    expectStatus(second.run, 0);
    expect(second.run.changes).toBe(0);
    expect(second.run.results.uuid).toBe(uuid);
    expect(treeDigest(path.join(mp, "homes")).tree).toEqual(before.tree);
    const check1 = timed("check", env);
    expectStatus(check1.run, 0);
    expect(check1.run.results.pending).toBe("0");
    expect(Object.entries(check1.run.results).filter(([k, v]) => k.startsWith("drift.") && v !== "no")).toEqual([]);

    // a changed mount option: check reports it and changes nothing; apply remounts and rewrites the line only
    const env2 = { ...env, TS_MOUNT_OPTIONS: "noatime,compress=zstd:1,space_cache=v2" };
    const fstabAdopted = fs.readFileSync(env.TS_FSTAB, "utf8");
    const check2 = storage("check", env2);
    expectStatus(check2, 0);
    expect(check2.results.pending).toBe("2");
    // both pending changes (remount, the line) are the fstab line's: the drift check's item
    expect(Object.entries(check2.results).filter(([k]) => k.startsWith("drift."))).toEqual(
      ["array", "mount", "fstab", "subvolumes", "quotas", "profile"].map((i) => [`drift.${i}`, i === "fstab" ? "yes" : "no"]),
    );
    expect(fs.readFileSync(env.TS_FSTAB, "utf8")).toBe(fstabAdopted);
    expect(mountOptions(mp)).toContain("compress=zstd:3");
    const opt = storage("apply", env2);
    expectStatus(opt, 0);
    expect(opt.changes).toBe(2);
    expect(opt.stderr).toMatch(/changed: remount/);
    expect(mountOptions(mp)).toContain("compress=zstd:1");
    expect(fstabLinesFor(env.TS_FSTAB, mp)).toEqual([`UUID=${uuid} ${mp} btrfs ${env2.TS_MOUNT_OPTIONS} 0 0`]);
    expect([...subvolumes(mp).keys()].sort()).toEqual(SUBVOLS.split(" ").sort());

    // a changed subvolume list: one new subvolume, an unlisted one is kept (never deleted)
    const env3 = { ...env2, TS_SUBVOLUMES: SUBVOLS.replace("cache/gdrive ", "") + " cache/extra" };
    const sub = storage("apply", env3);
    expectStatus(sub, 0);
    expect(sub.changes).toBe(1);
    expect(subvolumes(mp).has("cache/extra")).toBe(true);
    expect(subvolumes(mp).has("cache/gdrive")).toBe(true);
    expect(qgroups(mp).has(`0/${subvolumes(mp).get("cache/extra")}`)).toBe(true);
    expect(storage("apply", env3).changes).toBe(0);

    const after = treeDigest(path.join(mp, "homes"));
    expect(after.tree).toEqual(before.tree);
    table.push({
      layout: `${data}/${metadata}×${n}`,
      firstApply: first.seconds,
      secondApply: second.seconds,
      check: check1.seconds,
      before: before.digest,
      after: after.digest,
    });
  });
});

describe("refusals: nothing is written", () => {
  it("a foreign ext4 on one device is refused, its data intact; with TS_ALLOW_WIPE=1 it is wiped", () => {
    const devs = Array.from({ length: 4 }, () => attachLoop(scratch).dev);
    const ext4 = makeExt4WithData(scratch, devs[2]);
    const env = storageEnv(scratch, devs, { TS_DATA_PROFILE: "raid10", TS_METADATA_PROFILE: "raid10" });
    const fstabBefore = fs.readFileSync(env.TS_FSTAB, "utf8");

    for (const action of ["check", "apply"]) {
      const r = storage(action, env);
      expectStatus(r, 3);
      expect(r.stderr).toMatch(new RegExp(`REFUSED[\\s\\S]*${devs[2]}: ext4 signature`));
    }
    expect(withMount(scratch, devs[2], (dir) => treeDigest(dir).tree)).toEqual(ext4);
    for (const d of [devs[0], devs[1], devs[3]]) expect(blkidRc(d)).toBe(2);
    expect(isMountpoint(env.TS_MOUNTPOINT)).toBe(false);
    expect(fs.readFileSync(env.TS_FSTAB, "utf8")).toBe(fstabBefore);

    const wiped = storage("apply", { ...env, TS_ALLOW_WIPE: "1" });
    expectStatus(wiped, 0);
    expect(wiped.stderr).toContain(`changed: wipe ${devs[2]} (ext4 signature`);
    for (const d of devs) expect(blkidValue(d, "TYPE")).toBe("btrfs");
    expect(profiles(env.TS_MOUNTPOINT).data).toBe("raid10");
  });

  it("a partition table is refused", () => {
    const devs = Array.from({ length: 2 }, () => attachLoop(scratch).dev);
    sh("sfdisk", ["-q", "--no-reread", "--no-tell-kernel", devs[1]], "label: gpt\n,,L\n");
    const env = storageEnv(scratch, devs);
    const r = storage("apply", env);
    expectStatus(r, 3);
    expect(r.stderr).toContain(`${devs[1]}: gpt partition table found, not ours`);
    expect(blkidRc(devs[0])).toBe(2);
    expect(blkidValue(devs[1], "PTTYPE")).toBe("gpt");
  });

  it("a missing device path, a too small device and a duplicate are refused, all named in one message", () => {
    const devs = Array.from({ length: 2 }, () => attachLoop(scratch).dev);
    const small = attachLoop(scratch, 64).dev;
    const env = storageEnv(scratch, [...devs, "/dev/ts-no-such-disk", small, devs[0]], { TS_DATA_PROFILE: "raid10" });
    const r = storage("apply", env);
    expectStatus(r, 3);
    expect(r.stderr).toContain("/dev/ts-no-such-disk does not exist");
    expect(r.stderr).toContain(`${small} has 64MB, less than 256MB`);
    expect(r.stderr).toMatch(new RegExp(`${devs[0]} and ${devs[0]} are the same device`));
    for (const d of [...devs, small]) expect(blkidRc(d)).toBe(2);
  });

  it("a mounted device is refused, even with TS_ALLOW_WIPE=1", () => {
    const devs = Array.from({ length: 2 }, () => attachLoop(scratch).dev);
    const ext4 = makeExt4WithData(scratch, devs[0]);
    const dir = fs.mkdtempSync(path.join(scratch.dir, "busy-"));
    sh("mount", [devs[0], dir]);
    scratch.mountedAt(dir);
    const env = storageEnv(scratch, devs);
    for (const wipe of ["0", "1"]) {
      const r = storage("apply", { ...env, TS_ALLOW_WIPE: wipe });
      expectStatus(r, 3);
      expect(r.stderr).toContain(`${devs[0]} is in use: /dev/${path.basename(devs[0])} is mounted at ${dir}`);
    }
    expect(treeDigest(dir).tree).toEqual(ext4);
    expect(blkidRc(devs[1])).toBe(2);
  });

  it("a mountpoint that is not empty, or taken in fstab by something else, is refused", () => {
    const devs = Array.from({ length: 2 }, () => attachLoop(scratch).dev);
    const env = storageEnv(scratch, devs);
    const mp = env.TS_MOUNTPOINT;
    fs.mkdirSync(mp);
    fs.writeFileSync(path.join(mp, "stray.txt"), "written while the array was not mounted\n");
    fs.appendFileSync(env.TS_FSTAB, `UUID=1111-2222 ${mp} ext4 defaults 0 2\n`);
    const fstabBefore = fs.readFileSync(env.TS_FSTAB, "utf8");
    const r = storage("apply", env);
    expectStatus(r, 3);
    expect(r.stderr).toContain(`${mp} is not empty and not mounted`);
    expect(r.stderr).toContain(`already mounts UUID=1111-2222 at ${mp}`);
    for (const d of devs) expect(blkidRc(d)).toBe(2);
    expect(fs.readFileSync(env.TS_FSTAB, "utf8")).toBe(fstabBefore);
    expect(fs.readdirSync(mp)).toEqual(["stray.txt"]);
  });

  it("a btrfs with another label is refused", () => {
    const devs = Array.from({ length: 2 }, () => attachLoop(scratch).dev);
    sh("mkfs.btrfs", ["-q", "-L", "someone-else", "-d", "raid1", "-m", "raid1", ...devs]);
    const env = storageEnv(scratch, devs);
    const r = storage("apply", env);
    expectStatus(r, 3);
    expect(r.stderr).toContain(`${devs[0]}: btrfs filesystem (label 'someone-else'`);
    for (const d of devs) expect(blkidValue(d, "LABEL")).toBe("someone-else");
  });
});

describe("adopted array whose devices differ from the config", () => {
  function buildArray(n: number, over: Record<string, string> = {}) {
    const loops = Array.from({ length: n }, () => attachLoop(scratch));
    const env = storageEnv(scratch, loops.map((l) => l.dev), { TS_DATA_PROFILE: "raid10", TS_METADATA_PROFILE: "raid10", ...over });
    expectStatus(storage("apply", env), 0);
    writeRandomFile(path.join(env.TS_MOUNTPOINT, "homes", "alice", "x.bin"), 4);
    sh("umount", [env.TS_MOUNTPOINT]);
    return { loops, env };
  }

  it("a missing disk is named and the array is not mounted degraded", () => {
    const { loops, env } = buildArray(4);
    loops[3].detach();
    const r = storage("apply", env);
    expectStatus(r, 3);
    expect(r.stderr).toContain(`${loops[3].dev} listed in the devices is not part of it`);
    expect(r.stderr).toContain("MISSING device id(s): 4");
    expect(r.stderr).toContain("not mounted degraded");
    expect(isMountpoint(env.TS_MOUNTPOINT)).toBe(false);
  });

  it("a config listing only part of the array, or an extra blank disk, is refused", () => {
    const { loops, env } = buildArray(4);
    const part = storage("apply", { ...env, TS_DEVICES: loops.slice(0, 3).map((l) => l.dev).join(" ") });
    expectStatus(part, 3);
    expect(part.stderr).toContain("has 4 devices");
    expect(part.stderr).toContain("MISSING device id(s): 4");

    const extra = attachLoop(scratch).dev;
    const more = storage("apply", { ...env, TS_DEVICES: [...loops.map((l) => l.dev), extra].join(" "), TS_ALLOW_WIPE: "1" });
    expectStatus(more, 3);
    expect(more.stderr).toContain(`${extra} listed in the devices is not part of it (blank)`);
    expect(blkidRc(extra)).toBe(2);
    expect(isMountpoint(env.TS_MOUNTPOINT)).toBe(false);

    // the unchanged config still adopts it, data intact
    const again = storage("apply", env);
    expectStatus(again, 0);
    expect(again.changes).toBe(1); // the mount
    expect(fs.statSync(path.join(env.TS_MOUNTPOINT, "homes", "alice", "x.bin")).size).toBe(4 * 1024 * 1024);
  });
});

describe("profile change on an adopted array", () => {
  it("raid1 -> raid10 over 4 devices: refused without convert, converted with TS_CONVERT_PROFILE=1, data intact", () => {
    const devs = Array.from({ length: 4 }, () => attachLoop(scratch).dev);
    const env = storageEnv(scratch, devs, { TS_DATA_PROFILE: "raid1", TS_METADATA_PROFILE: "raid1" });
    const mp = env.TS_MOUNTPOINT;
    expectStatus(storage("apply", env), 0);
    writeRandomFile(path.join(mp, "homes", "alice", "ckpt.bin"), 20);
    writeRandomFile(path.join(mp, "workspaces", "alice", "data.bin"), 20);
    sh("sync");
    const before = treeDigest(mp);

    const want = { ...env, TS_DATA_PROFILE: "raid10", TS_METADATA_PROFILE: "raid10" };
    const fstabBefore = fs.readFileSync(env.TS_FSTAB, "utf8");
    for (const action of ["check", "apply"]) {
      const r = storage(action, want);
      expectStatus(r, 3);
      expect(r.stderr).toContain("has data profile raid1 and metadata profile raid1, the config wants raid10 and raid10");
      expect(r.stderr).toContain("storage.convertProfile: true");
    }
    expect(profiles(mp)).toEqual({ data: "raid1", metadata: "raid1", system: "raid1" });
    expect(fs.readFileSync(env.TS_FSTAB, "utf8")).toBe(fstabBefore);

    const conv = storage("apply", { ...want, TS_CONVERT_PROFILE: "1" });
    expectStatus(conv, 0);
    expect(conv.changes).toBe(1);
    expect(conv.results).toMatchObject({ data_profile: "raid10", metadata_profile: "raid10" });
    expect(profiles(mp)).toEqual({ data: "raid10", metadata: "raid10", system: "raid10" });
    expect(treeDigest(mp).tree).toEqual(before.tree);

    const again = storage("apply", { ...want, TS_CONVERT_PROFILE: "1" });
    expectStatus(again, 0);
    expect(again.changes).toBe(0);
    expect(again.stderr).not.toContain("balance");
  });
});

describe("destroy", () => {
  it("keeps everything without TS_ALLOW_WIPE; with it unmounts, removes the fstab line, wipes; twice is fine", () => {
    const devs = Array.from({ length: 2 }, () => attachLoop(scratch).dev);
    const env = storageEnv(scratch, devs);
    const mp = env.TS_MOUNTPOINT;
    const built = storage("apply", env);
    expectStatus(built, 0);
    writeRandomFile(path.join(mp, "homes", "alice", "x.bin"), 4);
    sh("sync");
    const before = treeDigest(mp).tree;

    const kept = storage("destroy", env);
    expectStatus(kept, 3);
    expect(kept.stderr).toContain("storage is kept");
    expect(kept.stderr).toContain(`data on devices ${devs.join(" ")} are untouched`);
    expect(isMountpoint(mp)).toBe(true);
    expect(treeDigest(mp).tree).toEqual(before);
    expect(fstabLinesFor(env.TS_FSTAB, mp)).toHaveLength(1);

    const wipe = { ...env, TS_ALLOW_WIPE: "1" };
    const gone = storage("destroy", wipe);
    expectStatus(gone, 0);
    expect(gone.changes).toBe(2 + devs.length); // unmount, fstab, one wipe per device
    expect(isMountpoint(mp)).toBe(false);
    for (const d of devs) expect(blkidRc(d)).toBe(2);
    expect(fstabLinesFor(env.TS_FSTAB, mp)).toEqual([]);
    expect(fs.readFileSync(env.TS_FSTAB, "utf8")).toBe("# test fstab\nUUID=0000-not-ours /mnt/elsewhere ext4 defaults 0 2\n");

    const twice = storage("destroy", wipe);
    expectStatus(twice, 0);
    expect(twice.changes).toBe(0);

    // the rig is bare again: a fresh apply builds a new array
    const rebuilt = storage("apply", env);
    expectStatus(rebuilt, 0);
    expect(rebuilt.results.uuid).not.toBe(built.results.uuid);
  });

  it("wipes only devices carrying our filesystem", () => {
    const devs = Array.from({ length: 2 }, () => attachLoop(scratch).dev);
    const other = attachLoop(scratch).dev;
    const ext4 = makeExt4WithData(scratch, other);
    const env = storageEnv(scratch, devs, { TS_ALLOW_WIPE: "1" });
    expectStatus(storage("apply", env), 0);
    const r = storage("destroy", { ...env, TS_DEVICES: [...devs, other].join(" ") });
    expectStatus(r, 0);
    for (const d of devs) expect(blkidRc(d)).toBe(2);
    expect(withMount(scratch, other, (dir) => treeDigest(dir).tree)).toEqual(ext4);
  });
});
