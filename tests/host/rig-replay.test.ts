/**
 * RIG REPLAY: the program's exact remote commands (from Pulumi.rig.yaml, under mocks) executed over real SSH
 * against a booted systemd container with blank loop disks (tests/helpers/rig.ts), as the engine would run them
 * (tests/helpers/replay.ts): up, a second up, the prod protections, destroy. Asserts what an admin would check
 * on the server after each. Docker/Cloudflare/random resources cannot run here and are listed as skipped.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import { Scratch } from "../helpers/host";
import { clone } from "../helpers/program";
import { CommandRun, Plan, planOf, Replayer, RIG_OPS_JOBS, rigRemotes, rigStack } from "../helpers/replay";
import { Rig } from "../helpers/rig";
import { REMAPPED_ROOT_UID } from "../../components/render/workspace-security";

jest.setTimeout(900_000);

const MP = "/mnt/storage";
const TEXTFILES = "/var/lib/prometheus/node-exporter";

describe("RIG REPLAY: the rig stack's remote commands against a booted systemd container", () => {
  const scratch = new Scratch("ts-rig-replay-");
  const replayer = new Replayer();
  const t0 = Date.now();
  const timing: Array<[string, number]> = [];
  const firstRun = new Map<string, number>();
  const secondRun = new Map<string, number>();
  let rig: Rig;
  let raw: Record<string, any>;
  let secrets: Record<string, string>;
  let plan: Plan;
  let uuid = "";
  /** The add-user blast radius measured on the rig (for `npm run bench`). */
  const blast: Record<string, { steps: string[]; unitsRestarted: number; mountsMoved: number }> = {};

  /** As the admin over SSH (sudo for root); throws on failure. */
  const ssh = (line: string): string => {
    const r = rig.ssh(line);
    if (r.status !== 0) throw new Error(`ssh \`${line}\` exited ${r.status}: ${r.stderr}`);
    return r.stdout;
  };
  const sudo = (line: string): string => {
    const r = rig.ssh("sudo -n bash -s", line);
    if (r.status !== 0) throw new Error(`sudo \`${line}\` exited ${r.status}: ${r.stderr}`);
    return r.stdout;
  };
  const phase = <T>(name: string, fn: () => T): T => {
    const s = Date.now();
    try {
      return fn();
    } finally {
      timing.push([name, Date.now() - s]);
    }
  };
  const names = (runs: CommandRun[]) => runs.map((r) => r.name);

  beforeAll(async () => {
    rig = phase("boot rig", () => Rig.start(scratch, { disks: 2, diskMb: 512 }));
    ({ raw, secrets } = rigStack(rig));
    expect(raw.rig).toBe(true);
    plan = await planOf(raw, secrets);
    // the fake Drive and bucket (outside the program, like Google's side)
    rigRemotes(rig);
  });

  afterAll(() => {
    replayer.cleanup();
    scratch.cleanup();
    // `npm run bench` runs this suite and reads its measurements from here
    if (process.env.BENCH_RIG_OUT) {
      fs.writeFileSync(process.env.BENCH_RIG_OUT, JSON.stringify({ totalMs: Date.now() - t0, timing, firstRun: Object.fromEntries(firstRun), secondRun: Object.fromEntries(secondRun), blast }));
    }
    const rows = [...firstRun.keys()].map((k) => `  ${k.padEnd(28)} ${String(firstRun.get(k)).padStart(7)} ms ${String(secondRun.get(k) ?? "-").padStart(7)} ms`);
    console.log(
      [
        `RIG REPLAY timings (total ${Date.now() - t0} ms)`,
        ...timing.map(([k, ms]) => `  ${k.padEnd(36)} ${String(ms).padStart(7)} ms`),
        `  ${"step".padEnd(28)} ${"1st up".padStart(10)} ${"forced re-run".padStart(10)}`,
        ...rows,
      ].join("\n"),
    );
  });

  test("the plan: remote commands in dependency order; other providers' resources listed as skipped", () => {
    const order = names(plan.commands as unknown as CommandRun[]);
    const idx = (n: string) => order.indexOf(n);
    expect(order).toEqual(expect.arrayContaining(["server-storage-apply", "server-users-apply", "server-baseline-apply", "server-ops-apply", "server-services-data-dirs-apply"]));
    expect(idx("server-storage-teardown")).toBeLessThan(idx("server-storage-apply"));
    // the Drive is mounted (ops) before the accounts are made, so each user's tensorboard dir lands on the Drive
    expect(idx("server-storage-apply")).toBeLessThan(idx("server-ops-apply"));
    expect(idx("server-ops-apply")).toBeLessThan(idx("server-users-apply"));
    expect(idx("server-users-apply")).toBeLessThan(idx("server-baseline-apply"));
    expect(idx("server-baseline-apply")).toBeLessThan(idx("server-services-data-dirs-apply"));
    // a rig: nothing protected, nothing retained
    expect(plan.commands.filter((c) => c.protect || c.retainOnDelete)).toEqual([]);
    for (const c of plan.commands) expect(c.connection).toMatchObject({ host: rig.address, user: "ops", port: 22, hostKey: rig.hostKey });
    // a wrong pinned key: ssh refuses the server before authenticating, so the command (a bundle) never runs
    const wrong = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJRAcMic7Wp3udoA0YKjn7/xiMki5Lh2CCKv2qzc0RxU";
    const probe = { ...plan.commands[0], connection: { ...plan.commands[0].connection, hostKey: wrong }, create: "touch /tmp/wrong-key-ran" };
    const refused = replayer.run(probe, "create");
    expect(refused.status).toBe(255);
    expect(refused.stderr).toMatch(/Host key verification failed|HOST IDENTIFICATION HAS CHANGED/);
    expect(fs.existsSync(`${rig.root}/tmp/wrong-key-ran`)).toBe(false);
    const skipped = plan.skipped.map((s) => `${s.type} ${s.name}`);
    expect(skipped.some((s) => s.startsWith("docker:"))).toBe(true);
    expect(skipped.some((s) => s.startsWith("cloudflare:"))).toBe(true);
    console.log(`replayed: ${plan.commands.length} remote commands; NOT run (other providers, no fakes): ${skipped.length}\n  ${skipped.join("\n  ")}`);
  });

  test("up: every command runs once, in order, and succeeds", () => {
    const runs = phase("up", () => replayer.up(plan));
    expect(names(runs)).toEqual(plan.commands.map((c) => c.name));
    for (const r of runs) {
      expect({ name: r.name, status: r.status }).toEqual({ name: r.name, status: 0 });
      if (r.name.endsWith("-apply")) {
        firstRun.set(r.name.replace(/-apply$/, ""), r.ms);
        // a rollout guard only looks (no workspace yet: it lets the first create go); every other step builds something
        if (r.name.endsWith("-guard-apply")) expect({ name: r.name, changes: r.results.changes, decision: r.results["rollout.decision"] }).toEqual({ name: r.name, changes: "0", decision: "go" });
        else expect({ name: r.name, changes: Number(r.results.changes) > 0 }).toEqual({ name: r.name, changes: true });
      }
    }
    uuid = runs.find((r) => r.name === "server-storage-apply")!.results.uuid;
    expect(uuid).toMatch(/^[0-9a-f-]{36}$/);
  });

  test("after up: the array, the accounts, sshd, the firewall and Docker are what the config says", () => {
    // array: both disks, raid1 data and metadata, mounted by UUID from fstab, subvolumes
    const df = sudo(`btrfs filesystem df ${MP}`);
    expect(df).toMatch(/^Data, RAID1:/m);
    expect(df).toMatch(/^Metadata, RAID1:/m);
    const show = sudo(`btrfs filesystem show ${MP}`);
    for (const d of rig.devices) expect(show).toContain(d);
    expect(show).toContain(uuid);
    expect(sudo("cat /etc/fstab")).toMatch(new RegExp(`^UUID=${uuid}\\s+${MP}\\s+btrfs\\s+noatime,compress=zstd:3,space_cache=v2`, "m"));
    // users traverse into their own home/workspace (sshd reads ~/.ssh as the user) but cannot list the others
    expect(sudo(`stat -c '%n %a %U' ${MP}/homes ${MP}/workspaces ${MP}/docker-volumes ${MP}/snapshots`)).toBe(
      `${MP}/homes 711 root\n${MP}/workspaces 711 root\n${MP}/docker-volumes 711 root\n${MP}/snapshots 700 root\n`,
    );
    const subvols = sudo(`btrfs subvolume list ${MP}`);
    for (const sv of ["homes", "workspaces", "shared", "docker-volumes", "docker-data", "cache", "snapshots", "homes/alice", "homes/bob", "workspaces/alice", "docker-volumes/bob"]) {
      expect(subvols).toMatch(new RegExp(` path ${sv}$`, "m"));
    }
    // users: uid, home on the array, key-only, groups, authorized_keys exactly the configured keys
    for (const u of raw.users as Array<{ name: string; uid: number; sshKeys: string[]; admin?: boolean }>) {
      expect(ssh(`getent passwd ${u.name}`).trim()).toBe(`${u.name}:x:${u.uid}:${u.uid}::${MP}/homes/${u.name}:/bin/bash`);
      const groups = ssh(`id -nG ${u.name}`).trim().split(" ");
      expect(groups).toEqual(expect.arrayContaining(["docker", "mlusers"]));
      expect(groups.includes("sudo")).toBe(!!u.admin);
      expect(sudo(`cat ${MP}/homes/${u.name}/.ssh/authorized_keys`)).toBe(u.sshKeys.join("\n") + "\n");
      expect(sudo(`stat -c '%a %U' ${MP}/homes/${u.name} ${MP}/homes/${u.name}/.ssh/authorized_keys`)).toBe(`750 ${u.name}\n600 ${u.name}\n`);
      expect(sudo(`btrfs qgroup show -p ${MP}`)).toMatch(new RegExp(`^1/${u.uid}\\s`, "m"));
    }
    // sshd: the drop-in is in force (and the admin still gets in: we are using it)
    const sshdT = sudo("sshd -T").split("\n");
    for (const want of ["passwordauthentication no", "permitrootlogin no", "kbdinteractiveauthentication no", "authenticationmethods publickey", "port 22"]) {
      expect(sshdT).toContain(want);
    }
    // firewall: active, deny by default, SSH from the LAN only; DOCKER-USER filters the users' ports
    const ufw = sudo("ufw status verbose");
    expect(ufw).toMatch(/^Status: active$/m);
    expect(ufw).toMatch(/Default: deny \(incoming\), allow \(outgoing\)/);
    expect(ufw.split("\n").filter((l) => /ALLOW|DENY/.test(l)).map((l) => l.trim().split(/\s{2,}/))).toEqual([["22/tcp", "ALLOW IN", rig.lanCidr]]);
    expect(sudo("iptables -S DOCKER-USER")).toContain(`! -s ${rig.lanCidr} -p tcp -m conntrack --ctstate DNAT --ctorigdstport 2222:62999`);
    // docker: btrfs driver, data root on the array; fail2ban running its sshd jail
    expect(sudo("docker info --format '{{.Driver}} {{.DockerRootDir}}'").trim()).toBe(`btrfs ${MP}/docker-data/${REMAPPED_ROOT_UID}.${REMAPPED_ROOT_UID}`);
    for (const svc of ["ssh", "docker", "fail2ban", "ufw"]) expect(ssh(`systemctl is-active ${svc}`).trim()).toBe("active");
    // the Docker provider (ssh://ops@host) works as the admin, without sudo
    expect(ssh("docker info --format '{{.Driver}}'").trim()).toBe("btrfs");
    // shared caches and the services' data directories
    expect(sudo(`stat -c '%a %U:%G' ${MP}/cache/pip`).trim()).toBe("2775 root:mlusers");
    expect(sudo(`stat -c '%a %u:%g' ${MP}/docker-volumes/grafana ${MP}/docker-volumes/prometheus`)).toBe("750 472:0\n750 65534:65534\n");
  });

  test("after up: the ops timers are listed, the Drive is mounted, and every job runs once successfully", () => {
    const timers = ssh("systemctl list-timers --all --no-legend");
    for (const t of ["ts-snapshot", "ts-backup", "ts-verify-restore", "ts-scrub", "ts-usage-collector", "ts-data-sync"]) expect(timers).toContain(`${t}.timer`);
    expect(ssh("systemctl is-active ts-drive-mount.service").trim()).toBe("active");
    expect(sudo(`findmnt -n -o FSTYPE ${MP}/shared`).trim()).toMatch(/^fuse/);
    sudo(`echo 'some work' > ${MP}/homes/alice/notes.txt && chown alice: ${MP}/homes/alice/notes.txt`);
    phase("ops jobs (all six, once)", () => {
      for (const job of RIG_OPS_JOBS) {
        const r = rig.ssh(`sudo -n systemctl start ts-${job}.service`);
        const log = r.status === 0 ? "" : sudo(`journalctl -u ts-${job}.service --no-pager | tail -30`);
        expect({ job, status: r.status, log }).toEqual({ job, status: 0, log: "" });
        expect(sudo(`cat ${TEXTFILES}/train_server_${job}.prom`)).toContain(`train_server_task_success{task="${job}"} 1`);
      }
    });
    expect(sudo(`cat ${TEXTFILES}/train_server_usage-collector.prom`)).toContain(`train_server_mount_up{mountpoint="${MP}/shared"} 1`);
    expect(sudo(`cat ${TEXTFILES}/train_server_verify-restore.prom`)).toContain("train_server_verify_mismatches{} 0");
    expect(sudo("ls /srv/rig-drive/train-server/restic")).toContain("config");
    expect(sudo("cat /srv/rig-drive/gcs-mirror/train.csv")).toBe("dataset\n");
    // users.sh ran after the Drive was mounted: the TensorBoard log dirs are on the Drive itself
    expect(sudo("ls /srv/rig-drive/tensorboard").split("\n").filter(Boolean).sort()).toEqual(["alice", "bob"]);
    // each user's snapshots in a directory of their own (what their workspace mounts at /snapshots)
    expect(sudo(`ls ${MP}/.snapshots/homes/alice`)).toMatch(/^alice\.\d{8}T\d{4}/m);
    expect(sudo(`stat -c '%a %U:%G' ${MP}/.snapshots/homes ${MP}/.snapshots/homes/alice`)).toBe("711 root:root\n750 root:alice\n");
    // self-service restore through the installed broker (ts-restore.service under the rig's systemd): alice asks as
    // herself through her spool bind-mounted as in her workspace (on the host /var/lib/train-server is root's), the
    // host answers from restic into her home
    expect(rig.ssh("sudo -n runuser -u alice -- ls /var/lib/train-server/restore/alice").stderr).toMatch(/Permission denied/);
    sudo(`rm ${MP}/homes/alice/notes.txt && mkdir -p /run/ws-alice && unshare -m sh -c "mount --bind /var/lib/train-server/restore/alice /run/ws-alice && runuser -u alice -- sh -c \\"printf 'action=restore\\\\npath=notes.txt\\\\nfrom=latest\\\\n' >/run/ws-alice/requests/rig1.req\\""`);
    expect(rig.ssh("sudo -n systemctl start ts-restore.service").status).toBe(0);
    expect(sudo("cat /var/lib/train-server/restore/alice/results/rig1.result")).toMatch(/^status=ok\nmessage=restored notes.txt from the backup of .* into ~\/restored\/\d{8}T\d{4}\/notes.txt\n/);
    expect(sudo(`cat ${MP}/homes/alice/restored/*/notes.txt`)).toBe("some work\n");
  });

  test("second up: nothing changed, so nothing re-runs; every apply forced once more reports changes=0", async () => {
    const again = await planOf(raw, secrets);
    expect(phase("second up (engine diff)", () => names(replayer.up(again)))).toEqual([]);
    const applies = again.commands.filter((x) => x.name.endsWith("-apply"));
    const forced = phase("second up (forced re-run of every apply)", () =>
      applies.map((c) => {
        const r = replayer.run(c, "update", c.stdin);
        secondRun.set(c.name.replace(/-apply$/, ""), r.ms);
        // stderr shown only for a step that changed something or failed
        return { name: c.name, status: r.status, changes: r.results.changes, stderr: r.status || r.results.changes !== "0" ? r.stderr : "" };
      }),
    );
    expect(forced).toEqual(applies.map((c) => ({ name: c.name, status: 0, changes: "0", stderr: "" })));
  });

  test("a user added and removed: only the users and ops steps (and the user's own guard) run, no unit restarts, no mount moves; the new user logs in; removal archives", async () => {
    // what another user's work depends on: every unit's invocation, every mount (its id changes on a remount)
    // (ts-restore.service is the restore broker's oneshot, started by its timer every minute: not a restart)
    const invocations = () => sudo("systemctl list-units --all --plain --no-legend --type=service,mount,socket,timer | awk '{print $1}' | grep -vx ts-restore.service | sort | xargs systemctl show -p Id -p InvocationID -p NRestarts --");
    const mounts = () => sudo("awk '{print $1, $5, $9}' /proc/self/mountinfo | sort");
    const before = { units: invocations(), mounts: mounts() };
    const keyFile = `${scratch.dir}/frank`;
    spawnSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "frank@laptop", "-f", keyFile]);
    const frankKey = fs.readFileSync(`${keyFile}.pub`, "utf8").trim();
    // as the README says: pulumi config set --path 'users[2].name' frank ... (the same structured value)
    const withFrank = clone(raw);
    withFrank.users.push({ name: "frank", uid: 1002, email: "frank@example.com", sshKeys: [frankKey] });
    // the rig's pool (Pulumi.rig.yaml: ramGb 5 - reservedRamGb 2) has room for frank's 1 GB guarantee: no host change
    const planFrank = await planOf(withFrank, secrets);
    const added = phase("add a user (up)", () => replayer.up(planFrank));
    // the users and ops steps, and frank's own rollout guard (its apply and the registration of its teardown)
    expect(names(added).sort()).toEqual(["server-ops-apply", "server-users-apply", "server-ws-frank-guard-apply", "server-ws-frank-guard-teardown"]);
    for (const r of added) expect({ name: r.name, status: r.status }).toEqual({ name: r.name, status: 0 });
    const changedLines = (a: string, b: string) => b.split("\n").filter((l) => !a.split("\n").includes(l)).length;
    blast.add = { steps: names(added), unitsRestarted: changedLines(before.units, invocations()), mountsMoved: changedLines(before.mounts, mounts()) };
    expect(invocations()).toBe(before.units);
    expect(mounts()).toBe(before.mounts);
    const login = spawnSync("ssh", ["-T", "-i", keyFile, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=/dev/null", "-o", `KnownHostsCommand=/bin/echo * ${rig.hostKey}`, `frank@${rig.address}`, "id -un; pwd"], { encoding: "utf8", timeout: 30_000 });
    expect({ stdout: login.stdout, stderr: login.stderr }).toEqual({ stdout: `frank\n${MP}/homes/frank\n`, stderr: "" });
    sudo(`echo 'frank was here' > ${MP}/homes/frank/work.txt`);

    const planWithout = await planOf(raw, secrets);
    const removed = phase("remove the user (up)", () => replayer.up(planWithout));
    expect(names(removed).sort()).toEqual(["server-ops-apply", "server-users-apply", "server-ws-frank-guard-teardown"]);
    blast.remove = { steps: names(removed), unitsRestarted: changedLines(before.units, invocations()), mountsMoved: changedLines(before.mounts, mounts()) };
    const archive = removed.find((r) => r.name === "server-users-apply")!.results["archive.frank"];
    expect(archive).toMatch(new RegExp(`^${MP}/snapshots/archive/frank-\\d{8}T\\d{6}Z$`));
    expect(sudo(`cat ${archive}/work.txt`)).toBe("frank was here\n");
    expect(sudo(`btrfs property get -ts ${archive} ro`).trim()).toBe("ro=true");
    expect(spawnSync("ssh", ["-T", "-i", keyFile, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", `frank@${rig.address}`, "true"], { timeout: 30_000 }).status).not.toBe(0);
    expect(invocations()).toBe(before.units);
    expect(mounts()).toBe(before.mounts);
  });

  test("prod config (rig: false): teardowns protected and retained; forced, they refuse and the data stays", async () => {
    const prod = await planOf({ ...raw, rig: false }, secrets);
    const kept = ["server-storage-teardown", "server-users-teardown", "server-baseline-teardown"];
    for (const n of kept) expect(prod.commands.find((c) => c.name === n)).toMatchObject({ protect: true, retainOnDelete: true });
    expect(() => replayer.destroy(prod)).toThrow(/protected resources server-storage-teardown/);
    // switching the stack to prod re-runs exactly the steps whose bundle changed (TS_ALLOW_WIPE=0) — no change on the host
    const switched = phase("up with rig: false", () => replayer.up(prod));
    expect(names(switched).sort()).toEqual(["server-baseline-apply", "server-storage-apply", "server-users-apply"]);
    for (const r of switched) expect({ name: r.name, changes: r.results.changes }).toEqual({ name: r.name, changes: "0" });

    const file = `${MP}/homes/bob/model.bin`;
    sudo(`head -c 4M /dev/urandom > ${file}`);
    const before = sudo(`sha256sum ${file}; btrfs filesystem show ${MP} | head -1; grep ' ${MP} ' /etc/fstab; getent passwd alice bob`);
    for (const n of kept) {
      const r = replayer.run(prod.commands.find((c) => c.name === n)!, "delete");
      expect({ n, status: r.status }).toEqual({ n, status: 3 });
      expect(r.stderr).toMatch(/REFUSED/);
    }
    expect(sudo(`sha256sum ${file}; btrfs filesystem show ${MP} | head -1; grep ' ${MP} ' /etc/fstab; getent passwd alice bob`)).toBe(before);
    expect(ssh(`mountpoint ${MP}`)).toContain("is a mountpoint");
    // back to the rig stack
    expect(names(replayer.up(plan)).sort()).toEqual(["server-baseline-apply", "server-storage-apply", "server-users-apply"]);
  });

  test("destroy: teardowns in reverse order leave the rig bare", () => {
    const runs = phase("destroy", () => replayer.destroy(plan));
    // the reverse of up's storage → ops → users → baseline / the users' rollout guards → services' data dirs
    expect(names(runs)).toEqual([
      "server-services-data-dirs-teardown", "server-ws-bob-guard-teardown", "server-ws-alice-guard-teardown",
      "server-baseline-teardown", "server-users-teardown", "server-ops-teardown", "server-storage-teardown",
    ]);
    for (const r of runs) expect({ name: r.name, status: r.status }).toEqual({ name: r.name, status: 0 });
    expect(rig.ssh(`mountpoint -q ${MP}`).status).not.toBe(0);
    for (const d of rig.devices) expect(rig.ssh(`sudo -n blkid -p ${d}`).status).toBe(2);
    expect(sudo("cat /etc/fstab")).not.toContain(MP);
    expect(sudo(`cat /etc/fstab`)).not.toContain(uuid);
    for (const u of ["alice", "bob"]) expect(rig.ssh(`getent passwd ${u}`).status).toBe(2);
    expect(ssh("systemctl list-timers --all --no-legend")).not.toMatch(/ts-/);
    expect(sudo("ls /etc/systemd/system")).not.toMatch(/^ts-/m);
    expect(sudo("ls /etc/ssh/sshd_config.d /etc/docker")).not.toMatch(/10-train-server|daemon\.json/);
    expect(ssh("systemctl is-active docker ssh").trim()).toBe("active\nactive");
    // the steps' copies (env and files may hold secrets) are gone with them
    expect(sudo("ls -A /var/lib/train-server/steps 2>/dev/null || true").trim()).toBe("");
    // what stays: the installed step copies (root-only) — harmless to a rebuild
    expect(sudo(`stat -c '%a %U' /var/lib/train-server/steps`).trim()).toBe("700 root");
    // the admin can still log in
    expect(ssh("echo still-here").trim()).toBe("still-here");
  });
});
