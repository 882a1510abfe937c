/**
 * The memory guarantee, for real, on a cgroup v2 kernel: the qemu VM of tests/helpers/vm.ts (this machine's
 * memory controller is cgroup v1). tests/helpers/cgroup-pressure.sh builds the hierarchy the host has —
 * trainws.slice with the rendered MemoryLow, workspace A with memory.low = its guarantee and memory.max = its
 * limit, workspace B beside it — gives A a working set of exactly its guarantee, and lets B allocate past the
 * VM's free RAM (swap on a virtio disk, so anonymous memory is reclaimable and protection is what decides).
 *
 * Every value comes from the program's own functions: the slice's MemoryLow is parsed out of the unit file
 * renderWorkspaceSlice writes, the workspaces' files from memorySettings (what the Docker provider gets) through
 * cgroupMemoryFiles (runc's mapping). The sizes are fractions of a GB, which the config schema refuses, so that
 * they fit a 512 MB VM.
 *
 * Phases (one boot): guarded (the slice, memory_recursiveprot as Ubuntu mounts it) keeps A at its guarantee;
 * control (today: the scope's memory.low under an unprotected system.slice) loses it; nested-guarded (A's
 * working set in a child cgroup, as under the workspace's own init / nested containers) keeps it;
 * nested-unguarded (the same without memory_recursiveprot) loses it. Then the cpuset of a nested cgroup.
 */
import type { UserConfig } from "../../components/config";
import { memorySettings } from "../../components/workspace";
import { cgroupMemoryFiles, renderWorkspaceSlice } from "../../components/render/workspace-slice";
import { parseResults } from "../../components/host";
import * as path from "path";
import { Scratch } from "../helpers/host";
import { runInVm } from "../helpers/vm";

jest.setTimeout(20 * 60 * 1000);

const user = (memoryGuaranteeGb: number, memoryLimitGb: number, swapGb: number): UserConfig =>
  ({ memoryGuaranteeGb, memoryLimitGb, swapGb, shmSizeGb: 0 }) as UserConfig;
// A: 96 MiB guaranteed, 160 MiB limit; B: 32 MiB guaranteed, 1 GiB limit + 1 GiB swap (never its own limit)
const A = cgroupMemoryFiles(memorySettings(user(0.09375, 0.15625, 0.25)));
const B = cgroupMemoryFiles(memorySettings(user(0.03125, 1, 1)));
// the "host": 448 MiB of RAM (about the VM's MemTotal), 256 MiB reserved (kernel, the initramfs root, the script)
const slice = renderWorkspaceSlice({ ramGb: 0.4375, reservedRamGb: 0.25 });
const SLICE_LOW = /^MemoryLow=(\d+)$/m.exec(slice)![1];
const B_ALLOC_MB = 448;
const MIB = 1024 * 1024;

describe("workspace memory guarantee under pressure (cgroup v2, qemu VM)", () => {
  const scratch = new Scratch("ts-memguard-vm-");
  afterAll(() => scratch.cleanup());
  let r: Record<string, string>;

  beforeAll(() => {
    const run = runInVm({
      disks: [{ name: "swap0", sizeMb: 768, kind: "virtio" }],
      diskDir: path.join(scratch.dir, "disks"),
      memoryMb: 512,
      cpus: 2,
      udev: false,
      timeoutSec: 900,
      script: "exec bash /ts/cgroup-pressure.sh\n",
      files: { "cgroup-pressure.sh": path.join(__dirname, "..", "helpers", "cgroup-pressure.sh") },
      env: {
        SWAP_DEV: "/dev/vda",
        SLICE_LOW,
        A_LOW: String(A["memory.low"]),
        A_MAX: String(A["memory.max"]),
        A_SWAP: String(A["memory.swap.max"]),
        B_LOW: String(B["memory.low"]),
        B_MAX: String(B["memory.max"]),
        B_SWAP: String(B["memory.swap.max"]),
        B_ALLOC_MB: String(B_ALLOC_MB),
        A_CPUSET: "1",
      },
    });
    if (run.exitCode !== 0) throw new Error(`VM run failed (exit ${run.exitCode})\n${run.stdout}\n${run.stderr}\n${run.serialLog.slice(-4000)}`);
    r = parseResults(run.stdout);
    const mib = (k: string): string => (Number(r[k]) / MIB).toFixed(1);
    const rows = ["guarded", "control", "nested-guarded", "nested-unguarded"].map(
      (p) =>
        `${p.padEnd(17)} slice=${r[`${p}.slice`]} low=${mib(`${p}.slice_low`)} recursiveprot=${r[`${p}.recursiveprot`]} | ` +
        `A low=${mib(`${p}.a_low`)} max=${mib(`${p}.a_max`)} before=${mib(`${p}.a_before`)} min=${mib(`${p}.a_min`)} (${r[`${p}.a_min`]} B) after=${mib(`${p}.a_after`)} ` +
        `anon=${mib(`${p}.a_anon`)} swap=${mib(`${p}.a_swap`)} | B current=${mib(`${p}.b_current`)} swap=${mib(`${p}.b_swap`)} ` +
        `done=${r[`${p}.b_done`]} (${r[`${p}.seconds`]} s)`,
    );
    console.log(`VM ${run.durationMs} ms, MemTotal ${r["vm.mem_total_kb"]} kB, swap ${r["vm.swap_total_kb"]} kB, zswap ${r["vm.zswap"]} (MiB below)\n${rows.join("\n")}\n${run.stderr}`);
  });

  test("the inputs are the program's: slice low = pool, A/B files = Docker's settings", () => {
    expect(Number(SLICE_LOW)).toBe(192 * MIB);
    expect(A).toEqual({ "memory.low": 96 * MIB, "memory.max": 160 * MIB, "memory.swap.max": 256 * MIB });
    // B really allocates past what the VM has free: RAM alone cannot hold A's set and B's
    expect(B_ALLOC_MB * 1024 + A["memory.low"] / 1024).toBeGreaterThan(Number(r["vm.mem_total_kb"]));
    for (const p of ["guarded", "control", "nested-guarded", "nested-unguarded"]) {
      expect({ p, low: Number(r[`${p}.a_low`]), max: Number(r[`${p}.a_max`]), bLow: Number(r[`${p}.b_low`]) }).toEqual({
        p,
        low: A["memory.low"],
        max: A["memory.max"],
        bLow: B["memory.low"],
      });
      // B finished its allocation without being OOM-killed, and the pressure was real: B went to swap
      expect({ p, done: r[`${p}.b_done`], oom: r[`${p}.b_oom_kill`], bSwapped: Number(r[`${p}.b_swap`]) > 64 * MIB }).toEqual({ p, done: "1", oom: "0", bSwapped: true });
      // A held its whole working set before B started
      expect(Number(r[`${p}.a_before`])).toBeGreaterThanOrEqual(A["memory.low"]);
    }
  });

  test("with the slice's protection A never drops below its guarantee", () => {
    expect(r["guarded.slice_low"]).toBe(SLICE_LOW);
    expect(Number(r["guarded.a_min"])).toBeGreaterThanOrEqual(A["memory.low"]);
  });

  test("control: protection on the scope only (today's system.slice) does not hold: A is reclaimed below it", () => {
    expect(r["control.slice_low"]).toBe("0");
    expect(Number(r["control.a_min"])).toBeLessThan(A["memory.low"] * 0.8);
    expect(Number(r["control.a_swap"])).toBeGreaterThan(16 * MIB);
  });

  test("nested cgroups under the workspace keep the guarantee with memory_recursiveprot, lose it without", () => {
    expect(Number(r["nested-guarded.a_min"])).toBeGreaterThanOrEqual(A["memory.low"]);
    expect(Number(r["nested-unguarded.a_min"])).toBeLessThan(A["memory.low"] * 0.8);
  });

  test("a nested cgroup cannot use CPUs outside its workspace's cpuset", () => {
    expect(r["cpuset.host"]).toBe("0-1");
    expect(r["cpuset.workspace"]).toBe("1");
    expect(r["cpuset.nested_asked"]).toBe("0-1");
    expect(r["cpuset.nested_effective"]).toBe("1");
    expect(r["cpuset.nested_affinity"]).toBe("1");
    expect(r["cpuset.nested_move_to_0"]).toBe("refused");
  });
});
