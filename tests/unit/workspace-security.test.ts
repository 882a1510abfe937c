/**
 * The workspace's confinement (components/render/workspace-security.ts) and how the prod plan applies it: no
 * privileged container, Docker's default capabilities, the seccomp profile's shape, the AppArmor profile's rules,
 * the GPU device nodes per user, the user-namespace remapping and the services that opt out of it.
 */
import {
  DOCKER_USERNS_REMAP,
  NVIDIA_CONTROL_NODES,
  renderDockerRemapSubIds,
  renderWorkspaceAppArmor,
  WORKSPACE_APPARMOR_PROFILE,
  WORKSPACE_SECCOMP_ALLOW,
  WORKSPACE_SECCOMP_DENY,
  WORKSPACE_SECCOMP_ENOSYS,
  workspaceDevices,
  workspaceSeccompJson,
  workspaceSeccompProfile,
  workspaceSecurity,
  workspaceSecurityOpts,
  workspaceSecurityRunArgs,
} from "../../components/render/workspace-security";
import { workspaceSubIds } from "../../components/render/workspace-image";
import { confinementLabel } from "../../components/workspace";
import { Registered } from "../../tools/harness";
import { clone, runProgram, stackRaw } from "../helpers/program";

const CONTAINER = "docker:index/container:Container";
const control = NVIDIA_CONTROL_NODES.map((n) => `/dev/${n}`);

describe("seccomp profile", () => {
  const p = workspaceSeccompProfile() as any;
  test("deny by default (ENOSYS), x86_64 only, one allow rule, EPERM for the denied, ENOSYS for keyrings", () => {
    expect(p.defaultAction).toBe("SCMP_ACT_ERRNO");
    expect(p.defaultErrnoRet).toBe(38);
    expect(p.architectures).toEqual(["SCMP_ARCH_X86_64"]);
    expect(p.syscalls.map((r: any) => [r.action, r.errnoRet])).toEqual([["SCMP_ACT_ALLOW", undefined], ["SCMP_ACT_ERRNO", 1], ["SCMP_ACT_ERRNO", 38]]);
    expect(p.syscalls[2].names).toEqual(["add_key", "keyctl", "request_key"]);
  });
  test("user namespaces and their mounts are allowed; modules, kexec, reboot, bpf, perf, io_uring, open_by_handle_at are not", () => {
    const allow = new Set(p.syscalls[0].names);
    for (const s of ["unshare", "setns", "clone", "clone3", "mount", "umount2", "pivot_root", "fsopen", "fsmount", "move_mount", "open_tree"]) expect(allow.has(s)).toBe(true);
    for (const s of ["init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "bpf", "perf_event_open", "io_uring_setup", "open_by_handle_at", "swapon", "settimeofday"]) {
      expect(allow.has(s)).toBe(false);
      expect(p.syscalls[1].names).toContain(s);
    }
  });
  test("allowed, denied and ENOSYS sets are disjoint and every denial has a reason", () => {
    const all = [...WORKSPACE_SECCOMP_ALLOW, ...Object.keys(WORKSPACE_SECCOMP_DENY), ...WORKSPACE_SECCOMP_ENOSYS];
    expect(new Set(all).size).toBe(all.length);
    for (const r of Object.values(WORKSPACE_SECCOMP_DENY)) expect(r.length).toBeGreaterThan(3);
    expect(WORKSPACE_SECCOMP_ALLOW.length).toBeGreaterThan(300);
  });
  test("the inline option is the compact JSON the docker CLI would send for the same file", () => {
    expect(workspaceSeccompJson()).toBe(JSON.stringify(JSON.parse(workspaceSeccompJson())));
    expect(workspaceSecurityOpts()[0]).toBe(`seccomp=${workspaceSeccompJson()}`);
    expect(workspaceSecurityOpts().slice(1)).toEqual([`apparmor=${WORKSPACE_APPARMOR_PROFILE}`, "systempaths=unconfined"]);
    expect(workspaceSecurityRunArgs(workspaceSecurity({ gpus: [], gpuCount: 0 }), "/tmp/p.json")).toEqual([
      "--security-opt", "seccomp=/tmp/p.json", "--security-opt", `apparmor=${WORKSPACE_APPARMOR_PROFILE}`, "--security-opt", "systempaths=unconfined",
      "--device", "/dev/net/tun:/dev/net/tun:rwm",
    ]);
  });
});

describe("AppArmor profile", () => {
  const aa = renderWorkspaceAppArmor();
  test("named, allows user namespaces and mounts, keeps docker-default's denials for /proc and /sys", () => {
    expect(aa).toMatch(new RegExp(`^profile ${WORKSPACE_APPARMOR_PROFILE} flags=\\(attach_disconnected,mediate_deleted\\) \\{$`, "m"));
    for (const rule of ["userns,", "mount,", "umount,", "pivot_root,"]) expect(aa).toMatch(new RegExp(`^  ${rule}$`, "m"));
    expect(aa).toContain("deny @{PROC}/sysrq-trigger rwklx,");
    expect(aa).toContain("deny @{PROC}/kcore rwklx,");
    expect(aa).toContain("deny @{PROC}/sys/[^kn]** w,");
    expect(aa).not.toMatch(/^\s*deny mount/m);
  });
});

describe("device nodes", () => {
  test("a pinned user: tun, the pinned GPUs' nodes and the control nodes, nothing else", () => {
    expect(workspaceDevices([1], 2).map((d) => d.containerPath)).toEqual(["/dev/net/tun", "/dev/nvidia1", ...control]);
    expect(workspaceDevices([2, 0], 4).map((d) => d.hostPath)).toEqual(["/dev/net/tun", "/dev/nvidia0", "/dev/nvidia2", ...control]);
    expect(workspaceDevices([1], 2).every((d) => d.hostPath === d.containerPath && d.permissions === "rwm")).toBe(true);
  });
  test('"all": every GPU of host.gpu.count; no GPU: tun only', () => {
    expect(workspaceDevices("all", 3).map((d) => d.containerPath)).toEqual(["/dev/net/tun", "/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", ...control]);
    expect(workspaceDevices("all", 0).map((d) => d.containerPath)).toEqual(["/dev/net/tun"]);
    expect(workspaceDevices([], 2).map((d) => d.containerPath)).toEqual(["/dev/net/tun"]);
  });
  test("a GPU the host does not have is refused", () => {
    expect(() => workspaceDevices([2], 2)).toThrow(/GPU 2 does not exist \(host.gpu.count is 2\)/);
  });
});

test("the confinement label changes with the options", () => {
  expect(confinementLabel(["a"]).value).not.toBe(confinementLabel(["a", "b"]).value);
  expect(confinementLabel(workspaceSecurityOpts())).toEqual({ label: "train-server.confinement", value: expect.stringMatching(/^[0-9a-f]{16}$/) });
});

describe("user-namespace remapping", () => {
  test("container root 0..999 lands above every other id; 1000.. stays itself and covers every user's nested range", () => {
    expect(renderDockerRemapSubIds()).toBe("dockremap:4200000000:1000\ndockremap:1000:4199999000\n");
    const top = workspaceSubIds(59999);
    expect(top.start + top.count).toBeLessThanOrEqual(DOCKER_USERNS_REMAP.rootHostStart);
    expect(workspaceSubIds(1000).start).toBeGreaterThan(59999);
  });
});

describe("the prod plan", () => {
  let res: Registered[];
  const run = async (raw: Record<string, any>) => (await runProgram(raw)).resources.filter((r) => r.type === CONTAINER);
  beforeAll(async () => {
    res = await run(stackRaw("prod"));
  });

  test("no container is privileged", () => {
    expect(res.length).toBeGreaterThan(5);
    expect(res.filter((r) => r.inputs.privileged === true).map((r) => r.inputs.name)).toEqual([]);
  });

  test("workspaces: not privileged, no added capability, the security options, their GPU nodes; remapped (no usernsMode)", () => {
    const ws = res.filter((r) => String(r.inputs.name).startsWith("workspace-"));
    expect(ws.length).toBe(5);
    for (const w of ws) {
      expect(w.inputs.privileged).toBe(false);
      expect(w.inputs.capabilities).toBeUndefined();
      expect(w.inputs.securityOpts).toEqual(workspaceSecurityOpts());
      expect(w.inputs.usernsMode).toBeUndefined();
      // Docker reads systempaths=unconfined back as path lists: the options are compared through the label
      expect(w.ignoreChanges).toEqual(["securityOpts"]);
      expect(w.inputs.labels).toContainEqual(confinementLabel(workspaceSecurityOpts()));
      // prod: one GPU, everyone "all"
      expect(w.inputs.devices.map((d: any) => d.containerPath)).toEqual(["/dev/net/tun", "/dev/nvidia0", ...control]);
    }
  });

  test("a user pinned to GPU 1 of 2 gets only /dev/nvidia1 (plus the control nodes); the NVIDIA request names the same GPU", async () => {
    const raw = clone(stackRaw("prod"));
    raw.host.gpu.count = 2;
    raw.users[0].gpus = [1];
    const all = await run(raw);
    const alice = all.find((r) => r.inputs.name === "workspace-alice")!;
    expect(alice.inputs.devices.map((d: any) => d.containerPath)).toEqual(["/dev/net/tun", "/dev/nvidia1", ...control]);
    expect(alice.inputs.deviceRequests).toEqual([expect.objectContaining({ driver: "nvidia", deviceIds: ["1"] })]);
    const bob = all.find((r) => r.inputs.name === "workspace-bob")!;
    expect(bob.inputs.devices.map((d: any) => d.containerPath)).toEqual(["/dev/net/tun", "/dev/nvidia0", "/dev/nvidia1", ...control]);
  });

  test("services keep the host's user namespace; cAdvisor: CAP_SYSLOG and /dev/kmsg read-only instead of privileged", () => {
    const services = res.filter((r) => !String(r.inputs.name).startsWith("workspace-"));
    for (const s of services) expect(`${s.inputs.name}: ${s.inputs.usernsMode}`).toBe(`${s.inputs.name}: host`);
    const cadvisor = services.find((r) => r.inputs.name === "cadvisor")!;
    expect(cadvisor.inputs.capabilities).toEqual({ adds: ["SYSLOG"] });
    expect(cadvisor.inputs.devices).toEqual([{ hostPath: "/dev/kmsg", permissions: "r" }]);
    expect(cadvisor.inputs.securityOpts).toEqual(["no-new-privileges:true"]);
  });
});
