/**
 * How a workspace container is confined: not privileged, Docker's default capability set, and the narrowest
 * relaxations that let the user's own rootless Docker daemon run inside it (images/workspace/supervisor/dockerd.conf):
 *
 *   - a seccomp profile (rendered here, passed inline as `seccomp=<json>`): Docker's default shape (deny by default,
 *     an allowlist of syscalls) that also allows the namespace and mount syscalls a user namespace needs
 *     (unshare/setns/clone with namespace flags, mount/umount2/pivot_root and the new mount API). Docker's default
 *     allows those only with CAP_SYS_ADMIN, which a workspace does not get. Kernel modules, kexec, reboot, swap,
 *     the clock, keyrings, bpf, perf, io_uring, open_by_handle_at stay denied (EPERM);
 *   - an AppArmor profile (train-server-workspace, loaded by host-scripts/baseline.sh where AppArmor runs): Docker's
 *     docker-default rules plus `userns,` (Ubuntu 24.04's kernel.apparmor_restrict_unprivileged_userns=1 refuses user
 *     namespaces to unconfined and docker-default processes) and the mounts the inner daemon makes;
 *   - systempaths=unconfined: Docker masks /proc/kcore, /proc/keys... and mounts /proc/sys read-only; the kernel
 *     refuses a new procfs in a user namespace while any part of the outer one is covered ("mount_too_revealing"),
 *     and the rootless daemon writes its own network namespace's /proc/sys/net. Masked paths stay unreadable for
 *     the user: /proc/kcore and the like are root-only and the container's root has no CAP_SYS_RAWIO/SYS_ADMIN;
 *   - /dev/net/tun (slirp4netns: the inner daemon's network), and the user's GPUs (below), nothing else.
 *
 * Every GPU device node is given explicitly (`devices`), so the device cgroup allows exactly the pinned GPUs plus
 * NVIDIA's control nodes, and the rules are in the container's own config: they survive `systemctl daemon-reload`
 * (devices injected only by the NVIDIA runtime hook are not, NVIDIA/nvidia-container-toolkit#48).
 *
 * Pure: no Pulumi, no I/O. components/workspace.ts and tests/host/workspace-image.test.ts both use
 * `workspaceSecurity`, so the test runs the options production renders.
 */

/**
 * Docker's user-namespace remapping (daemon.json "userns-remap", host-scripts/baseline.sh): every container's root
 * (ids 0..999) is an unprivileged host id from 4200000000 on; ids 1000..4199999999 stay themselves, so a home owned
 * by the user's uid, the shared caches' group and the users' nested-Docker ranges (uid*65536, below 3932160000) keep
 * their owners. Why: systempaths=unconfined (needed for the nested procfs) leaves /proc/sys writable, and a real
 * root (uid 0 on the host) could write host sysctls there (kernel.core_pattern = code execution on the host:
 * measured here without the remap, refused with it). Service containers opt out (`userns_mode: host`).
 */
export const DOCKER_USERNS_REMAP = { user: "dockremap", rootHostStart: 4_200_000_000, rootCount: 1000, identityStart: 1000 } as const;

/** /etc/subuid and /etc/subgid lines of the remap user (the order is the mapping: container 0.. first). */
export function renderDockerRemapSubIds(user: string = DOCKER_USERNS_REMAP.user): string {
  const r = DOCKER_USERNS_REMAP;
  return `${user}:${r.rootHostStart}:${r.rootCount}\n${user}:${r.identityStart}:${r.rootHostStart - r.identityStart}\n`;
}

/** The host uid of a remapped container's root (owner of what its root writes on a bind mount). */
export const REMAPPED_ROOT_UID = DOCKER_USERNS_REMAP.rootHostStart;

/** The container's AppArmor profile (host-scripts/baseline.sh loads it from `renderWorkspaceAppArmor`). */
export const WORKSPACE_APPARMOR_PROFILE = "train-server-workspace";

/**
 * Syscalls the profile denies with EPERM, with the reason. Everything not in WORKSPACE_SECCOMP_ALLOW is refused
 * too (ENOSYS: a syscall newer than this list makes glibc fall back to an older one, as under Docker's default).
 */
export const WORKSPACE_SECCOMP_DENY: Readonly<Record<string, string>> = Object.freeze({
  init_module: "kernel modules",
  finit_module: "kernel modules",
  delete_module: "kernel modules",
  kexec_load: "replacing the running kernel",
  kexec_file_load: "replacing the running kernel",
  reboot: "rebooting the host",
  swapon: "the host's swap",
  swapoff: "the host's swap",
  acct: "process accounting of the host",
  settimeofday: "the host's clock",
  clock_settime: "the host's clock",
  clock_adjtime: "the host's clock",
  quotactl: "filesystem quotas of the host",
  quotactl_fd: "filesystem quotas of the host",
  bpf: "eBPF programs (kernel attack surface, not namespaced)",
  perf_event_open: "perf events (kernel attack surface, reads other processes)",
  fanotify_init: "filesystem-wide event monitoring",
  open_by_handle_at: "opens any file of a mounted filesystem by handle (the 'shocker' escape)",
  name_to_handle_at: "the other half of open_by_handle_at",
  ioperm: "raw I/O ports",
  iopl: "raw I/O ports",
  modify_ldt: "segment descriptors (old kernel exploits)",
  userfaultfd: "stalls kernel page faults (race exploits)",
  io_uring_setup: "io_uring (kernel attack surface, bypasses seccomp filtering of its operations)",
  io_uring_enter: "io_uring",
  io_uring_register: "io_uring",
  syslog: "the kernel log",
  vhangup: "hangs up the terminal",
  lookup_dcookie: "kernel profiling",
  uselib: "obsolete",
  ustat: "obsolete",
  sysfs: "obsolete",
  _sysctl: "obsolete",
  nfsservctl: "obsolete",
  create_module: "obsolete",
  get_kernel_syms: "obsolete",
  query_module: "obsolete",
});

/**
 * Syscalls refused with ENOSYS instead: kernel keyrings are not namespaced, and runc (the inner daemon's runtime)
 * treats only ENOSYS as "no keyrings here" (EPERM makes every nested container fail to start: measured).
 */
export const WORKSPACE_SECCOMP_ENOSYS: readonly string[] = Object.freeze(["add_key", "keyctl", "request_key"]);

/**
 * Every x86_64 syscall a workspace may make: the kernel's syscall table (Linux 6.1 headers plus the newer
 * cachestat, fchmodat2, map_shadow_stack, futex_wait/wake/requeue, statmount, listmount, mseal) minus the denied ones
 * and the unimplemented entries (afs_syscall, tuxcall, security, vserver, getpmsg, putpmsg, epoll_*_old).
 * Including, unlike Docker's default without CAP_SYS_ADMIN: clone/clone3/unshare/setns (namespaces),
 * mount/umount2/pivot_root and fsopen/fsconfig/fsmount/fspick/move_mount/open_tree/mount_setattr (mounts in the
 * user's own user namespace; the kernel still refuses them in the host's namespaces: no CAP_SYS_ADMIN there).
 */
export const WORKSPACE_SECCOMP_ALLOW: readonly string[] = Object.freeze(
  `accept accept4 access adjtimex alarm arch_prctl bind brk cachestat capget capset chdir chmod chown chroot
  clock_getres clock_gettime clock_nanosleep clone clone3 close close_range connect copy_file_range creat dup dup2 dup3
  epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd eventfd2 execve execveat exit
  exit_group faccessat faccessat2 fadvise64 fallocate fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchownat
  fcntl fdatasync fgetxattr flistxattr flock fork fremovexattr fsconfig fsetxattr fsmount fsopen fspick fstat fstatfs
  fsync ftruncate futex futex_requeue futex_wait futex_waitv futex_wake futimesat get_mempolicy get_robust_list
  get_thread_area getcpu getcwd getdents getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid
  getpgrp getpid getppid getpriority getrandom getresgid getresuid getrlimit getrusage getsid getsockname getsockopt
  gettid gettimeofday getuid getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel
  io_destroy io_getevents io_pgetevents io_setup io_submit ioctl ioprio_get ioprio_set kcmp kill landlock_add_rule
  landlock_create_ruleset landlock_restrict_self lchown lgetxattr link linkat listen listmount listxattr llistxattr
  lremovexattr lseek lsetxattr lstat madvise map_shadow_stack mbind membarrier memfd_create memfd_secret
  migrate_pages mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mount mount_setattr move_mount
  move_pages mprotect mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend mq_unlink mremap mseal msgctl
  msgget msgrcv msgsnd msync munlock munlockall munmap nanosleep newfstatat open open_tree openat openat2 pause
  personality pidfd_getfd pidfd_open pidfd_send_signal pipe pipe2 pivot_root pkey_alloc pkey_free pkey_mprotect poll
  ppoll prctl pread64 preadv preadv2 prlimit64 process_madvise process_mrelease process_vm_readv process_vm_writev
  pselect6 ptrace pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv recvfrom recvmmsg recvmsg
  remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending
  rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo sched_get_priority_max
  sched_get_priority_min sched_getaffinity sched_getattr sched_getparam sched_getscheduler sched_rr_get_interval
  sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl semget semop
  semtimedop sendfile sendmmsg sendmsg sendto set_mempolicy set_mempolicy_home_node set_robust_list set_thread_area
  set_tid_address setdomainname setfsgid setfsuid setgid setgroups sethostname setitimer setns setpgid setpriority
  setregid setresgid setresuid setreuid setrlimit setsid setsockopt setuid setxattr shmat shmctl shmdt shmget shutdown
  sigaltstack signalfd signalfd4 socket socketpair splice stat statfs statmount statx symlink symlinkat sync
  sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete timer_getoverrun timer_gettime
  timer_settime timerfd_create timerfd_gettime timerfd_settime times tkill truncate umask umount2 uname unlink unlinkat
  unshare utime utimensat utimes vfork vmsplice wait4 waitid write writev`
    .split(/\s+/)
    .filter(Boolean),
);

/** The workspace's seccomp profile (Docker's profile format). */
export function workspaceSeccompProfile(): object {
  const overlap = WORKSPACE_SECCOMP_ALLOW.filter((s) => s in WORKSPACE_SECCOMP_DENY || WORKSPACE_SECCOMP_ENOSYS.includes(s));
  if (overlap.length) throw new Error(`workspaceSeccompProfile: ${overlap.join(", ")} both allowed and denied`);
  return {
    defaultAction: "SCMP_ACT_ERRNO",
    defaultErrnoRet: 38, // ENOSYS
    architectures: ["SCMP_ARCH_X86_64"],
    syscalls: [
      { names: [...WORKSPACE_SECCOMP_ALLOW].sort(), action: "SCMP_ACT_ALLOW" },
      { names: Object.keys(WORKSPACE_SECCOMP_DENY).sort(), action: "SCMP_ACT_ERRNO", errnoRet: 1 }, // EPERM
      { names: [...WORKSPACE_SECCOMP_ENOSYS], action: "SCMP_ACT_ERRNO", errnoRet: 38 },
    ],
  };
}

/** The profile as Docker's API takes it in `seccomp=<json>` (compact, as the docker CLI sends a profile file). */
export function workspaceSeccompJson(): string {
  return JSON.stringify(workspaceSeccompProfile());
}

/**
 * The AppArmor profile (apparmor_parser syntax): docker-default's rules, plus what the rootless daemon inside needs:
 * `userns,` (create user namespaces), mount/umount/pivot_root (only take effect inside the user's own namespaces,
 * where the kernel grants them; the host's mounts stay out of reach without CAP_SYS_ADMIN on the host).
 */
export function renderWorkspaceAppArmor(): string {
  return `# Managed by train-server (components/render/workspace-security.ts). Local edits are overwritten.
# Workspace containers: Docker's docker-default profile plus user namespaces and mounts for the user's rootless
# Docker daemon (see README, "Workspace isolation").
#include <tunables/global>

profile ${WORKSPACE_APPARMOR_PROFILE} flags=(attach_disconnected,mediate_deleted) {
  #include <abstractions/base>

  network,
  capability,
  file,
  umount,
  userns,
  mount,
  pivot_root,
  signal (receive) peer=unconfined,
  signal (send,receive) peer=${WORKSPACE_APPARMOR_PROFILE},
  ptrace (trace,read,tracedby,readby) peer=${WORKSPACE_APPARMOR_PROFILE},

  deny @{PROC}/* w,   # deny write for all files directly in /proc (not in a subdir)
  # deny write to files not in /proc/<number>/** or /proc/sys/**
  deny @{PROC}/{[^1-9],[^1-9][^0-9],[^1-9s][^0-9y][^0-9s],[^1-9][^0-9][^0-9][^0-9/]*}/** w,
  deny @{PROC}/sys/[^kn]** w,          # deny /proc/sys except /proc/sys/k* and /proc/sys/n* (net: the inner netns)
  deny @{PROC}/sys/kernel/{?,??,[^s][^h][^m]**} w,  # deny everything except shm* in /proc/sys/kernel/
  deny @{PROC}/sysrq-trigger rwklx,
  deny @{PROC}/kcore rwklx,
  deny /sys/[^f]*/** wklx,
  deny /sys/f[^s]*/** wklx,
  deny /sys/fs/[^c]*/** wklx,
  deny /sys/fs/c[^g]*/** wklx,
  deny /sys/fs/cg[^r]*/** wklx,
  deny /sys/firmware/** rwklx,
  deny /sys/devices/virtual/powercap/** rwklx,
  deny /sys/kernel/security/** rwklx,
}
`;
}

/** One device node given to the container. */
export interface WorkspaceDevice {
  hostPath: string;
  containerPath: string;
  permissions: "rwm";
}

/** NVIDIA's control nodes every GPU user needs (driver control, unified memory, its tools, modesetting). */
export const NVIDIA_CONTROL_NODES = ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"] as const;

/**
 * The device nodes of a workspace: /dev/net/tun, and for a user with GPUs /dev/nvidia<i> of each pinned index (all
 * 0..gpuCount-1 for "all") plus the control nodes, at the same path inside. `devDir` is /dev; a test points it at a
 * directory of nodes it made (under a remapping daemon runc bind-mounts each node from the host at its path inside,
 * so the two paths must be equal).
 */
export function workspaceDevices(gpus: "all" | readonly number[], gpuCount: number, devDir = "/dev"): WorkspaceDevice[] {
  if (!Number.isInteger(gpuCount) || gpuCount < 0) throw new Error(`workspaceDevices: host.gpu.count ${gpuCount} is not a count`);
  const indexes = gpus === "all" ? [...Array(gpuCount).keys()] : [...gpus];
  for (const i of indexes) {
    if (!Number.isInteger(i) || i < 0 || i >= gpuCount) throw new Error(`workspaceDevices: GPU ${i} does not exist (host.gpu.count is ${gpuCount})`);
  }
  const node = (name: string): WorkspaceDevice => ({ hostPath: `${devDir}/${name}`, containerPath: `${devDir}/${name}`, permissions: "rwm" });
  const gpuNodes = indexes.length ? [...[...new Set(indexes)].sort((a, b) => a - b).map((i) => node(`nvidia${i}`)), ...NVIDIA_CONTROL_NODES.map((n) => node(n))] : [];
  return [{ hostPath: "/dev/net/tun", containerPath: "/dev/net/tun", permissions: "rwm" }, ...gpuNodes];
}

/** The security options of a workspace container (Docker's HostConfig.SecurityOpt, exactly as sent). */
export function workspaceSecurityOpts(): string[] {
  return [`seccomp=${workspaceSeccompJson()}`, `apparmor=${WORKSPACE_APPARMOR_PROFILE}`, "systempaths=unconfined"];
}

/** Everything about a workspace's confinement, in one place. */
export interface WorkspaceSecurity {
  privileged: false;
  /** Capabilities added to Docker's default set: none. */
  capAdd: string[];
  securityOpts: string[];
  devices: WorkspaceDevice[];
}

export function workspaceSecurity(p: { gpus: "all" | readonly number[]; gpuCount: number; devDir?: string }): WorkspaceSecurity {
  return { privileged: false, capAdd: [], securityOpts: workspaceSecurityOpts(), devices: workspaceDevices(p.gpus, p.gpuCount, p.devDir) };
}

/**
 * The same options as `docker run` flags (the host tests). The CLI reads a seccomp profile from a file and sends
 * its compact JSON, so `seccompFile` must hold `workspaceSeccompJson()`; the daemon then gets exactly `securityOpts`.
 */
export function workspaceSecurityRunArgs(s: WorkspaceSecurity, seccompFile: string): string[] {
  return [
    ...s.securityOpts.flatMap((o) => ["--security-opt", o.startsWith("seccomp=") ? `seccomp=${seccompFile}` : o]),
    ...s.capAdd.flatMap((c) => ["--cap-add", c]),
    ...s.devices.flatMap((d) => ["--device", `${d.hostPath}:${d.containerPath}:${d.permissions}`]),
  ];
}
