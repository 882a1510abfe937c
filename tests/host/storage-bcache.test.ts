/**
 * storage.sh's bcache path, for real, in a qemu VM (this machine's kernel cannot load bcache; see
 * tests/helpers/vm.ts). Four virtio "HDDs" and one NVMe disk whose single partition is the cache, all files
 * that outlive each boot, so the boots below are the same machine rebooting:
 *   boot 1  apply: bcache0..3 over the HDDs, all attached to one cache set on nvme0n1p1 in writeback mode, btrfs
 *           raid10 over /dev/bcache*, subvolumes, fstab line by UUID; data written; a second apply changes nothing;
 *   boot 2  udev registers the bcache devices as a real boot does, fstab mounts the array; apply adopts it with
 *           changes=0, same UUID, data intact, still writeback;
 *   boot 3  destroy (TS_ALLOW_WIPE=1): unmounted, fstab line gone, bcache stopped, every disk blank;
 *   boot 4  nothing comes back after a reboot (no stale superblock for udev to register).
 * And on fresh disks: writethrough mode.
 */
import { parseResults } from "../../components/host";
import * as fs from "fs";
import { HOST_SCRIPTS, Scratch } from "../helpers/host";
import { runInVm, vmImage, VmDisk, VmRun } from "../helpers/vm";

jest.setTimeout(30 * 60 * 1000);

const HDDS = ["/dev/vda", "/dev/vdb", "/dev/vdc", "/dev/vdd"];
const CACHE = "/dev/nvme0n1p1";
const MNT = "/mnt/storage";
const SUBVOLUMES = ["homes", "workspaces", "shared", "cache", "cache/pip", "snapshots"];
const disks: VmDisk[] = [
  ...["hdd0", "hdd1", "hdd2", "hdd3"].map((name) => ({ name, sizeMb: 384, kind: "virtio" as const })),
  { name: "nvme0", sizeMb: 512, kind: "nvme" }, // storage.sh refuses devices under 256 MiB
];

function storageEnv(over: Record<string, string> = {}): Record<string, string> {
  return {
    TS_DEVICES: HDDS.join(" "),
    TS_DATA_PROFILE: "raid10",
    TS_METADATA_PROFILE: "raid10",
    TS_CACHE_DEVICE: CACHE,
    TS_CACHE_MODE: "writeback",
    TS_MOUNTPOINT: MNT,
    TS_LABEL: "train-storage",
    TS_MOUNT_OPTIONS: "noatime,compress=zstd:3,space_cache=v2",
    TS_SUBVOLUMES: SUBVOLUMES.join(" "),
    TS_ALLOW_WIPE: "0",
    TS_CONVERT_PROFILE: "0",
    TS_FSTAB: "/etc/fstab",
    ...over,
  };
}

/**
 * Shell prelude of every boot: `step NAME CMD...` runs CMD and prints its exit code and stdout as a section
 * (`>>> NAME rc=N` then the output); stderr goes to the run's stderr. /ts/fstab, when given, is the fstab the
 * previous boot left (the VM's root is a fresh initramfs each boot; a real host keeps /etc/fstab and the
 * mountpoint directory).
 */
const PRELUDE = `
set -uo pipefail
step() { local name=$1 out rc; shift; out=$("$@"); rc=$?; printf '>>> %s rc=%d\\n%s\\n' "$name" "$rc" "$out"; return "$rc"; }
storage() { bash /ts/host-scripts/storage.sh "$@"; }
if [[ -f /ts/fstab ]]; then cp /ts/fstab /etc/fstab && mkdir -p ${MNT}; fi
# state of the bcache devices, one line per /dev/bcacheN:
#   name backing-disk cache-set-uuid|none slaves(sorted, comma-separated) cache_mode(words) state
bcache_state() {
  local b
  for b in /sys/block/bcache*; do
    [[ -e $b ]] || continue
    printf '%s %s %s %s %s %s\\n' "\${b##*/}" "$(basename "$(dirname "$(readlink -f "$b/bcache")")")" \\
      "$(basename "$(readlink -f "$b/bcache/cache" 2>/dev/null || echo none)")" "$(ls "$b/slaves" | sort | paste -sd, -)" \\
      "$(cat "$b/bcache/cache_mode")" "$(cat "$b/bcache/state")"
  done
}
# blank DEV: prints "blank", or what is on DEV (a partition's own GPT entry does not count)
blank() {
  local sigs
  sigs="$(wipefs --noheadings "$1")$(blkid -p -o export "$1" | grep -E '^(TYPE|PTTYPE)=')"
  echo "\${sigs:-blank}"
}
cset_uuid() { bcache-super-show "$1" | awk '$1 == "cset.uuid" { print $2 }'; }
# sha256 of every file under the data subvolumes, sorted
sums() { (cd ${MNT} && find homes shared -type f -print0 | sort -z | xargs -0 -r sha256sum); }
`;

type Steps = Record<string, { rc: number; out: string }>;

function steps(run: VmRun): Steps {
  const out: Steps = {};
  const re = /^>>> (\S+) rc=(\d+)\n([\s\S]*?)(?=^>>> |$(?![\s\S]))/gm;
  for (const m of run.stdout.matchAll(re)) out[m[1]] = { rc: Number(m[2]), out: m[3].replace(/\n$/, "") };
  return out;
}

/** key=value results of a storage.sh run printed by `step`. */
const results = parseResults;

function boot(scratch: Scratch, script: string, env: Record<string, string>, fstab?: string): { run: VmRun; s: Steps } {
  const files: Record<string, string> = { "host-scripts": HOST_SCRIPTS };
  if (fstab !== undefined) {
    const f = `${scratch.dir}/fstab`;
    fs.writeFileSync(f, fstab);
    files.fstab = f;
  }
  const run = runInVm({ disks, diskDir: `${scratch.dir}/disks`, script: `${PRELUDE}${script}\nexit 0\n`, env, files });
  if (run.exitCode !== 0) {
    throw new Error(`VM run failed (exit ${run.exitCode})\n--- stdout\n${run.stdout}\n--- stderr\n${run.stderr}\n--- serial\n${run.serialLog}`);
  }
  return { run, s: steps(run) };
}

/** bcache_state lines without the clean/dirty state (the writeback thread changes it at any time). */
const withoutState = (out: string): string => out.split("\n").map((l) => l.replace(/ \S+$/, "")).join("\n");

/** storage.sh's stdout is only `key=value` result lines (lib.sh contract): nothing a tool printed. */
function onlyResults(out: string): void {
  expect(out.split("\n").filter((l) => !/^[a-z_.]+=/.test(l))).toEqual([]);
}

/** Fail with the VM's stderr in the message when a step did not exit 0. */
function ok(s: Steps, name: string, run: VmRun): string {
  expect({ step: name, rc: s[name]?.rc, stderr: s[name]?.rc === 0 ? "" : run.stderr }).toEqual({ step: name, rc: 0, stderr: "" });
  return s[name].out;
}

describe("storage.sh with a bcache cache (qemu VM)", () => {
  const scratch = new Scratch("ts-bcache-");
  let uuid = "";
  let fstab = "";
  let sums = "";
  let csetUuid = "";

  beforeAll(() => {
    const img = vmImage();
    console.log(`VM image ${img.dir} (kernel ${img.kver}) ready in ${img.buildSeconds.toFixed(1)} s`);
  });
  afterAll(() => scratch.cleanup());

  it("boot 1: apply builds bcache (writeback) → btrfs raid10 → subvolumes → fstab; a second apply changes nothing", () => {
    const { run, s } = boot(
      scratch,
      `
step partition sfdisk --quiet /dev/nvme0n1 <<<$'label: gpt\\n,,L'
udevadm settle
step apply1 storage apply || exit 0 # the test shows why
step bcache bcache_state
step cset cset_uuid ${CACHE}
step show btrfs filesystem show ${MNT}
step df btrfs filesystem df ${MNT}
step subvols btrfs subvolume list ${MNT}
step findmnt findmnt -n -o SOURCE,FSTYPE,OPTIONS ${MNT}
step fstab cat /etc/fstab
# data: small random files (below bcache's sequential cutoff, so they land in the cache as dirty data)
for i in $(seq 1 24); do head -c $((100000 + i * 37000)) /dev/urandom >${MNT}/homes/f$i; done
mkdir -p ${MNT}/shared/deep/dir && head -c 3000000 /dev/urandom >${MNT}/shared/deep/dir/blob
sync
step sums sums
step dirty cat /sys/block/bcache0/bcache/dirty_data /sys/block/bcache1/bcache/dirty_data /sys/block/bcache2/bcache/dirty_data /sys/block/bcache3/bcache/dirty_data
step apply2 storage apply
step check storage check
step bcache_after bcache_state
`,
      storageEnv(),
    );
    onlyResults(ok(s, "apply1", run));
    const r1 = results(s.apply1.out);
    console.log(`boot 1: ${(run.durationMs / 1000).toFixed(1)} s; apply1 ${JSON.stringify(r1)}; dirty data after writes: ${s.dirty?.out.replace(/\n/g, " ")}`);
    expect(r1.uuid).toMatch(/^[0-9a-f-]{36}$/);
    expect(Number(r1.changes)).toBeGreaterThan(0);
    uuid = r1.uuid;

    // bcache: one device per HDD, all attached to the cache set made on the NVMe partition, writeback.
    csetUuid = ok(s, "cset", run);
    expect(csetUuid).toMatch(/^[0-9a-f-]{36}$/);
    const rows = ok(s, "bcache", run).split("\n").map((l) => l.split(" "));
    expect(rows.map((r) => r[0]).sort()).toEqual(["bcache0", "bcache1", "bcache2", "bcache3"]);
    expect(rows.map((r) => r[1]).sort()).toEqual(["vda", "vdb", "vdc", "vdd"]);
    for (const r of rows) {
      expect(r[2]).toBe(csetUuid); // attached to our cache set
      expect(r[3]).toBe(`nvme0n1p1,${r[1]}`); // I/O goes through the cache partition
      expect(r.slice(4).join(" ")).toMatch(/\[writeback\]/);
      expect(r[r.length - 1]).toMatch(/^(clean|dirty)$/); // "no cache" would mean detached
    }

    // btrfs raid10 over exactly the four bcache devices, data and metadata.
    const show = ok(s, "show", run);
    expect(show).toContain(uuid);
    expect([...show.matchAll(/path (\S+)/g)].map((m) => m[1]).sort()).toEqual(["/dev/bcache0", "/dev/bcache1", "/dev/bcache2", "/dev/bcache3"]);
    expect(ok(s, "df", run)).toMatch(/^Data, RAID10/m);
    expect(s.df.out).toMatch(/^Metadata, RAID10/m);
    const subvols = ok(s, "subvols", run).split("\n").map((l) => l.split(" path ")[1]);
    for (const sv of SUBVOLUMES) expect(subvols).toContain(sv);
    expect(ok(s, "findmnt", run)).toMatch(/^\/dev\/bcache\d btrfs .*noatime.*compress=zstd:3/);
    fstab = ok(s, "fstab", run);
    expect(fstab).toMatch(new RegExp(`^UUID=${uuid}\\s+${MNT}\\s+btrfs\\s+\\S*noatime`, "m"));

    sums = ok(s, "sums", run);
    expect(sums.split("\n")).toHaveLength(25);

    onlyResults(ok(s, "apply2", run));
    expect(results(s.apply2.out)).toMatchObject({ uuid, changes: "0" });
    expect(results(ok(s, "check", run))).toMatchObject({ uuid, pending: "0", changes: "0" });
    expect(withoutState(ok(s, "bcache_after", run))).toBe(withoutState(s.bcache.out));
  });

  it("boot 2: after a reboot udev registers bcache, fstab mounts the array, apply adopts it with changes=0", () => {
    expect(uuid).not.toBe(""); // boot 1 ran
    const { run, s } = boot(
      scratch,
      `
step bcache_boot bcache_state
step mount mount ${MNT} || exit 0
step apply storage apply
step bcache bcache_state
step sums sums
step show btrfs filesystem show ${MNT}
step fstab cat /etc/fstab
`,
      storageEnv(),
      fstab,
    );
    console.log(`boot 2: ${(run.durationMs / 1000).toFixed(1)} s`);
    // what udev's bcache rule registered at boot, before anything of ours ran
    const rows = ok(s, "bcache_boot", run).split("\n").map((l) => l.split(" "));
    expect(rows.map((r) => r[1]).sort()).toEqual(["vda", "vdb", "vdc", "vdd"]);
    for (const r of rows) {
      expect(r[2]).toBe(csetUuid);
      expect(r[3]).toBe(`nvme0n1p1,${r[1]}`);
      expect(r.slice(4).join(" ")).toMatch(/\[writeback\]/);
    }
    ok(s, "mount", run);
    expect(results(ok(s, "apply", run))).toMatchObject({ uuid, changes: "0" });
    expect(withoutState(ok(s, "bcache", run))).toBe(withoutState(s.bcache_boot.out));
    expect(ok(s, "sums", run)).toBe(sums);
    expect(ok(s, "fstab", run)).toBe(fstab);
  });

  it("boot 3: destroy with TS_ALLOW_WIPE=1 unmounts, drops the fstab line, stops bcache and blanks every disk", () => {
    expect(uuid).not.toBe("");
    const { run, s } = boot(
      scratch,
      `
mount ${MNT}
step destroy storage destroy
step mounted findmnt -n ${MNT}
step fstab cat /etc/fstab
step bcache bcache_state
for d in ${HDDS.join(" ")} ${CACHE}; do step "blank_\${d##*/}" blank "$d"; done
step again storage destroy
`,
      storageEnv({ TS_ALLOW_WIPE: "1" }),
      fstab,
    );
    console.log(`boot 3: ${(run.durationMs / 1000).toFixed(1)} s; destroy ${JSON.stringify(results(ok(s, "destroy", run)))}`);
    expect(s.mounted.rc).toBe(1);
    expect(ok(s, "fstab", run)).not.toContain(uuid);
    expect(ok(s, "bcache", run)).toBe("");
    for (const d of [...HDDS, CACHE]) expect({ d, ...s[`blank_${d.slice(5)}`] }).toEqual({ d, rc: 0, out: "blank" });
    expect(results(ok(s, "again", run))).toMatchObject({ changes: "0" });
  });

  it("boot 4: after destroy a reboot finds no bcache device and blank disks", () => {
    expect(uuid).not.toBe("");
    const { s, run } = boot(
      scratch,
      `
step bcache bcache_state
step sets ls /sys/fs/bcache
for d in ${HDDS.join(" ")} ${CACHE}; do step "blank_\${d##*/}" blank "$d"; done
`,
      storageEnv(),
    );
    expect(ok(s, "bcache", run)).toBe("");
    expect(ok(s, "sets", run).split("\n").filter((l) => /^[0-9a-f-]{36}$/.test(l))).toEqual([]);
    for (const d of [...HDDS, CACHE]) expect({ d, ...s[`blank_${d.slice(5)}`] }).toEqual({ d, rc: 0, out: "blank" });
  });

  it("fresh disks: writethrough mode", () => {
    const wt = new Scratch("ts-bcache-wt-");
    try {
      const run = runInVm({
        disks,
        diskDir: `${wt.dir}/disks`,
        files: { "host-scripts": HOST_SCRIPTS },
        env: storageEnv({ TS_CACHE_MODE: "writethrough" }),
        script: `${PRELUDE}
step partition sfdisk --quiet /dev/nvme0n1 <<<$'label: gpt\\n,,L'
udevadm settle
step apply1 storage apply || exit 0 # the test shows why
step bcache bcache_state
step cset cset_uuid ${CACHE}
step apply2 storage apply
exit 0
`,
      });
      expect(run.exitCode).toBe(0);
      const s = steps(run);
      expect(Number(results(ok(s, "apply1", run)).changes)).toBeGreaterThan(0);
      const rows = ok(s, "bcache", run).split("\n").map((l) => l.split(" "));
      expect(rows).toHaveLength(4);
      for (const r of rows) {
        expect(r[2]).toBe(ok(s, "cset", run));
        expect(r[3]).toBe(`nvme0n1p1,${r[1]}`);
        expect(r.slice(4).join(" ")).toMatch(/\[writethrough\]/);
      }
      expect(results(ok(s, "apply2", run))).toMatchObject({ changes: "0" });
    } finally {
      wt.cleanup();
    }
  });
});
