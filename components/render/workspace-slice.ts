/**
 * The memory guarantee of the workspaces, made real on a cgroup v2 host.
 *
 * A workspace's guarantee is Docker's `memory-reservation`, which runc writes as `memory.low` on the container's
 * scope. cgroup v2 protection is hierarchical: a cgroup's effective protection is bounded by its parent's, so a
 * scope under system.slice (no MemoryLow) is protected by nothing (moby/moby#49599). Every workspace therefore
 * runs under its own top-level slice, {@link WORKSPACE_SLICE}, whose MemoryLow is the users' pool:
 * host.ramGb - host.reservedRamGb. The config refuses guarantees that sum past that pool, so the slice's
 * protection always covers every guarantee; and the pool depends on the host only, so adding or removing a user
 * never changes (and never re-runs) the baseline.
 *
 * memory_recursiveprot (the cgroup2 mount option systemd >= 248 sets, Ubuntu 24.04 included) is required: a
 * workspace's processes live in child cgroups of its scope (its init moves there when nested containers enable
 * controllers), which set no memory.low of their own; only with it does the scope's protection reach them.
 * baseline.sh checks it.
 */

/** The slice every workspace container runs in (Docker's cgroupParent). No "-" in the name: systemd reads
 * "a-b.slice" as a child of "a.slice", which would put one more unprotected ancestor above the workspaces. */
export const WORKSPACE_SLICE = "trainws.slice";

const GIB = 1024 * 1024 * 1024;
const MIB = 1024 * 1024;
const HEADER = "Managed by train-server (components/render/workspace-slice.ts). Local edits are overwritten.";

export interface WorkspaceSliceParams {
  /** host.ramGb */
  ramGb: number;
  /** host.reservedRamGb: RAM left to the host OS and the shared services, unprotected. */
  reservedRamGb: number;
}

/** MemoryLow of the workspace slice in bytes: the users' pool, host.ramGb - host.reservedRamGb. */
export function workspaceSliceMemoryLow(p: WorkspaceSliceParams): number {
  if (!(p.ramGb > 0) || !(p.reservedRamGb >= 0) || p.reservedRamGb >= p.ramGb) {
    throw new Error(`host.reservedRamGb ${p.reservedRamGb} GB must be below host.ramGb ${p.ramGb} GB (the workspace slice protects the rest)`);
  }
  return Math.round((p.ramGb - p.reservedRamGb) * GIB);
}

/** /etc/systemd/system/trainws.slice */
export function renderWorkspaceSlice(p: WorkspaceSliceParams): string {
  return [
    `# ${HEADER}`,
    "[Unit]",
    "Description=train-server workspaces (memory protection of the users' guarantees)",
    "Before=slices.target",
    "",
    "[Slice]",
    "MemoryAccounting=yes",
    `# host.ramGb ${p.ramGb} GB - host.reservedRamGb ${p.reservedRamGb} GB: covers every user's memoryGuaranteeGb`,
    `MemoryLow=${workspaceSliceMemoryLow(p)}`,
    "",
  ].join("\n");
}

/** Docker's memory settings of a container, in MB (what components/workspace.ts `memorySettings` returns). */
export interface DockerMemoryMb {
  memory: number;
  memoryReservation: number;
  memorySwap: number;
}

/** The cgroup v2 files runc writes for Docker's memory settings, in bytes: memory.low = reservation,
 * memory.max = memory, memory.swap.max = memory-swap - memory. */
export function cgroupMemoryFiles(m: DockerMemoryMb): { "memory.low": number; "memory.max": number; "memory.swap.max": number } {
  return { "memory.low": m.memoryReservation * MIB, "memory.max": m.memory * MIB, "memory.swap.max": (m.memorySwap - m.memory) * MIB };
}
