/**
 * storage.sh against host states it meets on real servers (issue 16), for real on loop devices: the mountpoint
 * mounted every other way it can be (another filesystem, a subvolume or a bind-mounted directory of the array, the
 * array read-only, a default subvolume that is not the top level, a symlink), fstab lines for the mountpoint spelled
 * differently, devices given by /dev/disk/by-id links, and disks that moved names between runs. Each is a refusal
 * (exit 3, nothing written) or a correct adoption whose second run changes nothing.
 */
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { Scratch, runScript, sh, writeRandomFile, ScriptRun, bash } from "../helpers/host";
import { attachFile, attachLoop, blkidRc, blkidValue, fstabLinesFor, isMountpoint, makeExt4WithData, storageEnv, subvolumes, treeDigest, withMount, Loop } from "../helpers/storage";

jest.setTimeout(300_000);

const storage = (action: string, env: Record<string, string>): ScriptRun => runScript("storage", action, env);
function expectStatus(run: ScriptRun, status: number): void {
  if (run.status !== status) throw new Error(`expected exit ${status}, got ${run.status}\n${run.stdout}\n${run.stderr}`);
}
const SUBVOLS = "homes workspaces shared docker-volumes cache snapshots";

let scratch: Scratch;
beforeEach(() => {
  scratch = new Scratch("ts-storage-hostile-");
});
afterEach(() => scratch.cleanup());

/** by-id style links to `loops` in a test-owned directory under /dev (no udev here, so no /dev/disk). */
function byIdLinks(loops: Loop[]): string[] {
  const dir = path.join("/dev", `ts-test-${crypto.randomBytes(3).toString("hex")}`, "disk", "by-id");
  fs.mkdirSync(dir, { recursive: true });
  scratch.onCleanup(() => fs.rmSync(path.dirname(path.dirname(dir)), { recursive: true, force: true }));
  return loops.map((l, i) => {
    // udev's spellings: ata-<model>_<serial>, and by-path names with ':'
    const link = path.join(dir, i % 2 ? `pci-0000:00:17.0-ata-${i}.0` : `ata-TS_TEST_DISK_SN${i}`);
    fs.symlinkSync(l.dev, link);
    return link;
  });
}

/** A built and adopted raid1 array with a file in homes/, its env and its fstab line. */
function built(over: Record<string, string> = {}) {
  const loops = [attachLoop(scratch), attachLoop(scratch)];
  const env = storageEnv(scratch, loops.map((l) => l.dev), { TS_SUBVOLUMES: SUBVOLS, ...over });
  const first = storage("apply", env);
  expectStatus(first, 0);
  writeRandomFile(path.join(env.TS_MOUNTPOINT, "homes", "alice", "model.bin"), 2);
  sh("sync");
  return { loops, env, mp: env.TS_MOUNTPOINT, uuid: first.results.uuid, line: `UUID=${first.results.uuid} ${env.TS_MOUNTPOINT} btrfs ${env.TS_MOUNT_OPTIONS} 0 0` };
}

/** What a refusal must leave as it was. */
function snapshot(env: Record<string, string>, devs: string[]) {
  return {
    fstab: fs.readFileSync(env.TS_FSTAB, "utf8"),
    mounts: sh("findmnt", ["-rn", "-o", "TARGET,SOURCE,FSROOT,OPTIONS"]).split("\n").filter((l) => l.startsWith(scratch.dir)).sort(),
    signatures: devs.map((d) => `${blkidValue(d, "TYPE")}:${blkidValue(d, "UUID")}`),
  };
}

describe("the mountpoint mounted another way", () => {
  it("another filesystem on it (a tmpfs) is refused, with the array and fstab untouched; once it is gone the array is adopted", () => {
    const { env, mp, loops } = built();
    sh("umount", [mp]);
    sh("mount", ["-t", "tmpfs", "-o", "size=1m", "ts-hostile", mp]);
    const before = snapshot(env, loops.map((l) => l.dev));
    for (const action of ["check", "apply"]) {
      const r = storage(action, env);
      expectStatus(r, 3);
      expect(r.stderr).toContain(`${mp} already has another filesystem mounted (ts-hostile tmpfs)`);
    }
    expect(snapshot(env, loops.map((l) => l.dev))).toEqual(before);
    sh("umount", [mp]);
    const again = storage("apply", env);
    expectStatus(again, 0);
    expect(again.changes).toBe(1); // the mount
    expect(fs.statSync(path.join(mp, "homes", "alice", "model.bin")).size).toBe(2 * 1024 * 1024);
  });

  it("another filesystem on it before the array exists is refused, and no disk is formatted", () => {
    const loops = [attachLoop(scratch), attachLoop(scratch)];
    const env = storageEnv(scratch, loops.map((l) => l.dev));
    const other = attachLoop(scratch);
    makeExt4WithData(scratch, other.dev);
    fs.mkdirSync(env.TS_MOUNTPOINT);
    sh("mount", [other.dev, env.TS_MOUNTPOINT]);
    const r = storage("apply", env);
    expectStatus(r, 3);
    expect(r.stderr).toContain(`${env.TS_MOUNTPOINT} already has another filesystem mounted (${other.dev} ext4)`);
    for (const l of loops) expect(blkidRc(l.dev)).toBe(2);
  });

  it("a subvolume of the array mounted there instead of its top level is refused (nothing is made inside it)", () => {
    const { env, mp, uuid, loops } = built();
    sh("umount", [mp]);
    sh("mount", ["-o", "subvol=homes", `UUID=${uuid}`, mp]);
    const inside = fs.readdirSync(mp).sort();
    const before = snapshot(env, loops.map((l) => l.dev));
    for (const action of ["check", "apply"]) {
      const r = storage(action, env);
      expectStatus(r, 3);
      expect(r.stderr).toContain(`${mp} has /homes of the array '${env.TS_LABEL}' mounted (a subvolume or a bind mount of a directory), not its top level`);
    }
    expect(fs.readdirSync(mp).sort()).toEqual(inside); // no workspaces/, shared/, ... inside homes
    expect(snapshot(env, loops.map((l) => l.dev))).toEqual(before);
  });

  it("a bind mount of a directory of the array is refused; a bind mount of its top level is the array itself, adopted", () => {
    const { env, mp, loops } = built();
    const elsewhere = fs.mkdtempSync(path.join(scratch.dir, "elsewhere-"));
    sh("mount", ["--bind", mp, elsewhere]);
    scratch.mountedAt(elsewhere);
    sh("umount", [mp]);
    sh("mount", ["--bind", path.join(elsewhere, "homes"), mp]);
    const before = snapshot(env, loops.map((l) => l.dev));
    const r = storage("apply", env);
    expectStatus(r, 3);
    expect(r.stderr).toContain(`${mp} has /homes of the array`);
    expect(snapshot(env, loops.map((l) => l.dev))).toEqual(before);

    sh("umount", [mp]);
    sh("mount", ["--bind", elsewhere, mp]);
    const adopted = storage("apply", env);
    expectStatus(adopted, 0);
    expect(adopted.changes).toBe(0);
    expect(adopted.results.uuid).toBe(blkidValue(loops[0].dev, "UUID"));
  });

  it("the array mounted read-only (as btrfs does after an error) is refused, not written to", () => {
    const { env, mp, loops } = built();
    sh("mount", ["-o", "remount,ro", mp]);
    const before = snapshot(env, loops.map((l) => l.dev));
    const r = storage("apply", { ...env, TS_SUBVOLUMES: `${SUBVOLS} cache/pip` });
    expectStatus(r, 3);
    expect(r.stderr).toContain(`the array '${env.TS_LABEL}' is mounted read-only at ${mp}`);
    expect(snapshot(env, loops.map((l) => l.dev))).toEqual(before);
    sh("mount", ["-o", "remount,rw", mp]);
    expectStatus(storage("apply", env), 0);
  });

  it("a default subvolume other than the top level is refused (mounted or not), and left unmounted", () => {
    const { env, mp, loops } = built();
    const homes = subvolumes(mp).get("homes")!;
    sh("btrfs", ["subvolume", "set-default", homes, mp]);
    const mounted = storage("apply", env);
    expectStatus(mounted, 3);
    expect(mounted.stderr).toContain(`has subvolume ID ${homes} as its default`);
    expect(mounted.stderr).toContain(`btrfs subvolume set-default 5 ${mp}`);
    sh("umount", [mp]);
    const before = snapshot(env, loops.map((l) => l.dev));
    const unmounted = storage("apply", env);
    expectStatus(unmounted, 3);
    expect(unmounted.stderr).toContain(`has subvolume ID ${homes} as its default`);
    expect(isMountpoint(mp)).toBe(false);
    expect(snapshot(env, loops.map((l) => l.dev))).toEqual(before);
    // reset it: adopted, top level mounted
    sh("mount", ["-o", "subvolid=5", `UUID=${blkidValue(loops[0].dev, "UUID")}`, mp]);
    sh("btrfs", ["subvolume", "set-default", "5", mp]);
    expectStatus(storage("apply", env), 0);
    expect(fs.existsSync(path.join(mp, "homes", "alice", "model.bin"))).toBe(true);
  });

  it("a mountpoint that is a symlink is refused (mount would follow it, the fstab line would not)", () => {
    const loops = [attachLoop(scratch), attachLoop(scratch)];
    const env = storageEnv(scratch, loops.map((l) => l.dev));
    const real = path.join(scratch.dir, "real-dir");
    fs.mkdirSync(real);
    fs.symlinkSync(real, env.TS_MOUNTPOINT);
    const before = snapshot(env, loops.map((l) => l.dev));
    const r = storage("apply", env);
    expectStatus(r, 3);
    expect(r.stderr).toContain(`${env.TS_MOUNTPOINT} is (or goes through) a symlink to ${real}`);
    expect(snapshot(env, loops.map((l) => l.dev))).toEqual(before);
    for (const l of loops) expect(blkidRc(l.dev)).toBe(2);
  });
});

describe("fstab lines for the mountpoint spelled differently", () => {
  type Spelling = (a: { uuid: string; mp: string; label: string; opts: string; dev: string; link: string }) => string;
  const ours: Array<[string, Spelling]> = [
    ["a trailing slash", (a) => `UUID=${a.uuid} ${a.mp}/ btrfs ${a.opts} 0 0`],
    ["a doubled slash", (a) => `UUID=${a.uuid} ${a.mp.replace("/", "//")} btrfs ${a.opts} 0 0`],
    ["tabs and extra spaces", (a) => `UUID=${a.uuid}\t${a.mp}   btrfs\t${a.opts}  0 0`],
    ["LABEL= instead of UUID=", (a) => `LABEL=${a.label} ${a.mp} btrfs defaults 0 0`],
    ['a quoted UUID="..."', (a) => `UUID="${a.uuid}" ${a.mp} btrfs ${a.opts} 0 0`],
    ["/dev/disk/by-uuid/...", (a) => `/dev/disk/by-uuid/${a.uuid} ${a.mp} btrfs ${a.opts} 0 0`],
    ["a member's /dev path", (a) => `${a.dev} ${a.mp} btrfs ${a.opts} 0 0`],
    ["a by-id link to a member", (a) => `${a.link} ${a.mp} btrfs ${a.opts} 0 0`],
    ["a subvol= option", (a) => `UUID=${a.uuid} ${a.mp} btrfs ${a.opts},subvol=homes 0 0`],
  ];
  it.each(ours)("our line with %s is rewritten in place as UUID=..., once", (_what, spell) => {
    const { env, mp, uuid, line, loops } = built();
    const link = byIdLinks([loops[1]])[0];
    const other = "UUID=0000-not-ours /mnt/elsewhere ext4 defaults 0 2";
    fs.writeFileSync(env.TS_FSTAB, `# test fstab\n${spell({ uuid, mp, label: env.TS_LABEL, opts: env.TS_MOUNT_OPTIONS, dev: loops[0].dev, link })}\n${other}\n`);
    const r = storage("apply", env);
    expectStatus(r, 0);
    expect(fs.readFileSync(env.TS_FSTAB, "utf8")).toBe(`# test fstab\n${line}\n${other}\n`);
    const again = storage("apply", env);
    expectStatus(again, 0);
    expect(again.changes).toBe(0);
  });

  const foreign: Array<[string, (mp: string) => string]> = [
    ["a trailing slash", (mp) => `UUID=1111-2222 ${mp}/ ext4 defaults 0 2`],
    ["a doubled slash", (mp) => `UUID=1111-2222 ${mp.replace("/", "//")} ext4 defaults 0 2`],
    ["tabs", (mp) => `/dev/ts-other-disk\t${mp}\text4\tdefaults\t0\t2`],
    ["another LABEL=", (mp) => `LABEL=someone-else ${mp} btrfs defaults 0 0`],
  ];
  it.each(foreign)("a foreign line with %s is refused, fstab unchanged", (_what, spell) => {
    const { env, mp, loops } = built();
    fs.writeFileSync(env.TS_FSTAB, `# test fstab\n${spell(mp)}\n`);
    const before = snapshot(env, loops.map((l) => l.dev));
    const r = storage("apply", env);
    expectStatus(r, 3);
    expect(r.stderr).toMatch(new RegExp(`already mounts \\S+ at ${mp}: remove that line`));
    expect(snapshot(env, loops.map((l) => l.dev))).toEqual(before);
  });

  it("commented lines for the mountpoint are not lines: kept verbatim, our line added once", () => {
    const { env, mp, line } = built();
    const comments = `# test fstab\n#UUID=1111-2222 ${mp} ext4 defaults 0 2\n  # LABEL=old ${mp} btrfs defaults 0 0\n`;
    fs.writeFileSync(env.TS_FSTAB, comments);
    const r = storage("apply", env);
    expectStatus(r, 0);
    expect(fs.readFileSync(env.TS_FSTAB, "utf8")).toBe(`${comments}${line}\n`);
    expect(storage("apply", env).changes).toBe(0);
  });

  it("destroy (rig) removes our line in any spelling and keeps a foreign one for another mountpoint", () => {
    const { env, mp, uuid } = built({ TS_ALLOW_WIPE: "1" });
    fs.writeFileSync(env.TS_FSTAB, `# test fstab\nUUID="${uuid}"\t${mp}/ btrfs defaults 0 0\nUUID=0000-not-ours /mnt/elsewhere ext4 defaults 0 2\n`);
    const r = storage("destroy", env);
    expectStatus(r, 0);
    expect(fs.readFileSync(env.TS_FSTAB, "utf8")).toBe("# test fstab\nUUID=0000-not-ours /mnt/elsewhere ext4 defaults 0 2\n");
  });
});

describe("devices given by /dev/disk/by-id links", () => {

  it("builds on the links, adopts the same disks by their kernel names and by the links, twice with no change", () => {
    const loops = [attachLoop(scratch), attachLoop(scratch)];
    const links = byIdLinks(loops);
    const env = storageEnv(scratch, links, { TS_SUBVOLUMES: SUBVOLS });
    const first = storage("apply", env);
    expectStatus(first, 0);
    expect(first.results.devices).toBe(links.join(" "));
    for (const l of loops) expect(blkidValue(l.dev, "UUID")).toBe(first.results.uuid);
    expect(fstabLinesFor(env.TS_FSTAB, env.TS_MOUNTPOINT)).toEqual([`UUID=${first.results.uuid} ${env.TS_MOUNTPOINT} btrfs ${env.TS_MOUNT_OPTIONS} 0 0`]);
    for (const devices of [links, loops.map((l) => l.dev), [links[1], loops[0].dev]]) {
      const r = storage("apply", { ...env, TS_DEVICES: devices.join(" ") });
      expectStatus(r, 0);
      expect(r.changes).toBe(0);
      expect(r.results.uuid).toBe(first.results.uuid);
    }
  });

  it("a link and its target listed together, and a dangling link, are refused", () => {
    const loops = [attachLoop(scratch), attachLoop(scratch)];
    const links = byIdLinks(loops);
    const env = storageEnv(scratch, [links[0], loops[0].dev]);
    const same = storage("apply", env);
    expectStatus(same, 3);
    expect(same.stderr).toContain(`${loops[0].dev} and ${links[0]} are the same device (${path.basename(loops[0].dev)})`);
    const dangling = path.join(path.dirname(links[0]), "ata-TS_TEST_GONE");
    fs.symlinkSync("/dev/ts-no-such-disk", dangling);
    const gone = storage("apply", { ...env, TS_DEVICES: `${links[1]} ${dangling}` });
    expectStatus(gone, 3);
    expect(gone.stderr).toContain(`${dangling} does not exist`);
    for (const l of loops) expect(blkidRc(l.dev)).toBe(2);
  });
});

describe("disks that moved names between runs", () => {
  function detachBoth(loops: Loop[], mp: string): void {
    sh("umount", [mp]);
    for (const l of loops) l.detach();
  }

  it("the same disks attached in the other order are the same array: adopted by label and UUID, data intact", () => {
    const { env, mp, uuid, loops } = built();
    const data = treeDigest(path.join(mp, "homes")).tree;
    detachBoth(loops, mp);
    const moved = [attachFile(scratch, loops[1].file), attachFile(scratch, loops[0].file)];
    console.log(`moved: ${loops[0].dev}->${moved[1].dev}, ${loops[1].dev}->${moved[0].dev}`);
    const devices = moved.map((l) => l.dev);
    const r = storage("apply", { ...env, TS_DEVICES: devices.join(" ") });
    expectStatus(r, 0);
    expect(r.changes).toBe(1); // the mount
    expect(r.results.uuid).toBe(uuid);
    expect(treeDigest(path.join(mp, "homes")).tree).toEqual(data);
    expect(storage("apply", { ...env, TS_DEVICES: devices.join(" ") }).changes).toBe(0);
  });

  it("an old name that now holds another disk is refused (half the array, a foreign disk untouched), nothing mounted", () => {
    const { env, mp, loops } = built();
    detachBoth(loops, mp);
    // a foreign disk is attached first and takes a name the config lists; the array's disks come back after it
    const foreign = attachLoop(scratch);
    const ext4 = makeExt4WithData(scratch, foreign.dev);
    const back = [attachFile(scratch, loops[0].file), attachFile(scratch, loops[1].file)];
    const listed = [back[0].dev, foreign.dev];
    const fstab = fs.readFileSync(env.TS_FSTAB, "utf8");
    for (const wipe of ["0", "1"]) {
      const r = storage("apply", { ...env, TS_DEVICES: listed.join(" "), TS_ALLOW_WIPE: wipe });
      expectStatus(r, 3);
      expect(r.stderr).toContain("MISSING device id(s)");
      expect(r.stderr).toContain(`${foreign.dev} listed in the devices is not part of it`);
    }
    expect(isMountpoint(mp)).toBe(false);
    expect(fs.readFileSync(env.TS_FSTAB, "utf8")).toBe(fstab);
    expect(withMount(scratch, foreign.dev, (dir) => treeDigest(dir).tree)).toEqual(ext4);
    expect(blkidValue(back[1].dev, "LABEL")).toBe(env.TS_LABEL);
    expect(bash(`blkid -p -s TYPE -o value ${foreign.dev}`).stdout.trim()).toBe("ext4");
  });
});
