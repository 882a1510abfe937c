/**
 * `npm run doctor` against the RIG, for real: the rig stack's remote commands replayed over SSH (as the rig replay
 * does: tests/helpers/replay.ts), every ops job run once, stand-ins for the program's containers in the rig's Docker
 * (tests/helpers/doctor-stubs.ts: no registry here; Prometheus, Alertmanager and the node exporter are real), then
 * the doctor CLI as a child process, with the rig's admin key and its pinned host key:
 *   - a healthy rig exits 0; its only non-ok lines are the documented ones (no tunnel on a rig, no GPU, no bcache,
 *     Access not asked from outside);
 *   - the probe changes nothing (a digest of the rig's state before and after);
 *   - --send-test-alert goes through the real Alertmanager to a fake Telegram;
 *   - a wrong host key makes it refuse before logging in (no login in sshd's journal);
 *   - each injected fault is a `fail` of the right check: a stopped container, a stale backup, a missing device.
 * Every run's report is printed. `DOCTOR_RECORD_FACTS=<file>` saves the healthy run's facts (the unit tests' fixture).
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { stringify } from "yaml";
import { parseConfig, ServerConfig } from "../../components/config";
import { doctorTargets, TEST_ALERT_NAME } from "../../components/doctor";
import { workspaceImageTag } from "../../components/workspace";
import { startContainerRig, startStubs, stateDigest, Stubs, TELEGRAM_RECORD } from "../helpers/doctor-stubs";
import { REPO, Scratch } from "../helpers/host";
import { planOf, Replayer, RIG_OPS_JOBS, rigRemotes, rigStack } from "../helpers/replay";
import { Rig } from "../helpers/rig";

jest.setTimeout(900_000);

const MP = "/mnt/storage";
const TEXTFILES = "/var/lib/prometheus/node-exporter";
/** A valid ed25519 key that is not the rig's. */
const OTHER_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDm+MDWku3UWnMtuEXlaaEnTgoPOudIW7KRhtgJVKB1k";

interface DoctorRun {
  status: number;
  stdout: string;
  stderr: string;
  ms: number;
  /** check name → status, from the report's lines */
  lines: Map<string, string>;
}

describe("npm run doctor against the rig", () => {
  const scratch = new Scratch("ts-doctor-");
  const replayer = new Replayer();
  const t0 = Date.now();
  let rig: Rig;
  let raw: Record<string, any>;
  let config: ServerConfig;
  let stubs: Stubs;
  const keyFile = path.join(scratch.dir, "admin_ed25519");
  const home = path.join(scratch.dir, "home");

  /** The stack file the doctor reads (the rig stack aimed at this rig), as Pulumi.<name>.yaml in the scratch dir. */
  const writeStack = (name: string, cfg: Record<string, unknown>): void => {
    const doc = { config: Object.fromEntries(Object.entries(cfg).map(([k, v]) => [`train-server:${k}`, v])) };
    fs.writeFileSync(path.join(scratch.dir, `Pulumi.${name}.yaml`), stringify(doc));
  };
  /** The doctor CLI as the admin runs it (npm run doctor), with only the rig's key: no agent, an empty HOME. */
  const doctor = (args: string[]): DoctorRun => {
    const s = Date.now();
    const r = spawnSync("npm", ["run", "-s", "doctor", "--", "--root", scratch.dir, "--identity", keyFile, ...args], {
      cwd: REPO,
      encoding: "utf8",
      timeout: 600_000,
      env: { PATH: process.env.PATH, HOME: home, LANG: "C.UTF-8" },
    });
    const stdout = r.stdout ?? "";
    const lines = new Map([...stdout.matchAll(/^ {2}(ok|warn|fail|skip) +(\S+) /gm)].map((m) => [m[2], m[1]]));
    return { status: r.status ?? -1, stdout, stderr: r.stderr ?? "", ms: Date.now() - s, lines };
  };
  const show = (title: string, r: DoctorRun) => console.log(`${title} (exit ${r.status}, ${r.ms} ms):\n${r.stdout}${r.stderr ? `\n[stderr] ${r.stderr}` : ""}`);
  const notOk = (r: DoctorRun) => [...r.lines].filter(([, s]) => s !== "ok").map(([n, s]) => `${s} ${n}`).sort();
  const lineOf = (r: DoctorRun, name: string) => r.stdout.split("\n").find((l) => new RegExp(`^ {2}\\S+ +${name.replace(/\./g, "\\.")} `).test(l)) ?? "";
  /** sshd's successful logins of the admin so far. */
  const logins = () => Number(rig.exec(["bash", "-c", "journalctl -u ssh --no-pager -o cat | grep -c 'Accepted publickey for ops' || true"]).stdout.trim());

  beforeAll(async () => {
    rig = startContainerRig(scratch, { disks: 2, diskMb: 512 });
    let secrets: Record<string, string>;
    ({ raw, secrets } = rigStack(rig)); // with the rig's own host key pinned, as a production stack pins its server's
    rigRemotes(rig);
    replayer.up(await planOf(raw, secrets));
    for (const job of RIG_OPS_JOBS) rig.run(`systemctl start ts-${job}.service`);
    config = parseConfig(raw);
    stubs = startStubs(rig, config, secrets.telegramBotToken);
    writeStack("rig", raw);
    writeStack("rig-wrongkey", { ...raw, host: { ...raw.host, hostKey: OTHER_HOST_KEY } });
    fs.writeFileSync(keyFile, rig.privateKey, { mode: 0o600 });
    fs.mkdirSync(home);
    // the firewall exactly as the program leaves it: its DOCKER-USER rule matches only DNAT'd (published-port)
    // connections, so the containers reach each other (Prometheus its exporters, Traefik its backends); the
    // healthy-rig test below is the regression test of the rule that dropped them
    stubs.waitReady();
    console.log(`doctor rig ready in ${Date.now() - t0} ms: ${stubs.names.length} containers`);
  });

  afterAll(() => {
    replayer.cleanup();
    scratch.cleanup();
    console.log(`doctor host test: ${Date.now() - t0} ms in all`);
  });

  test("a healthy rig: exit 0; the only non-ok lines are the documented ones; --json is one document", () => {
    const r = doctor(["--stack", "rig"]);
    show("healthy rig", r);
    expect(r.status).toBe(0);
    expect(notOk(r)).toEqual(["skip gpu", "skip network.access", "skip storage.bcache", "warn network.tunnel"]);
    expect(r.stdout).toMatch(/^  ok +ssh\.connect +ops@[\d.]+:22, host key pinned \(ssh-ed25519 SHA256:/m);
    // every configured container and route has its line
    for (const c of doctorTargets(config).containers) expect(r.lines.get(`docker.${c.name}`)).toBe("ok");
    expect(r.stdout).toMatch(/^\d+ ok, 1 warn, 0 fail, 3 skip: healthy \(exit 0\)$/m);

    const j = doctor(["--stack", "rig", "--json"]);
    expect(j.status).toBe(0);
    const doc = JSON.parse(j.stdout);
    expect(doc).toMatchObject({ stack: "rig", exitCode: 0, summary: { fail: 0, warn: 1, skip: 3 } });
    expect(doc.checks.map((c: { name: string }) => c.name)).toEqual([...r.lines.keys()]);
    expect(doc.facts["probe.end"]).toBe("1");
    if (process.env.DOCTOR_RECORD_FACTS) {
      const overrides = { host: { address: raw.host.address, lanAddress: raw.host.lanAddress, lanCidr: raw.host.lanCidr, hostKey: raw.host.hostKey }, storage: { devices: raw.storage.devices } };
      fs.writeFileSync(process.env.DOCTOR_RECORD_FACTS, JSON.stringify({ overrides, workspaceImage: workspaceImageTag(), facts: doc.facts }, null, 2) + "\n");
    }
  });

  test("the probe changes nothing on the server (a digest of its state before and after)", () => {
    const timers = doctorTargets(config).units.filter((u) => u.endsWith(".timer"));
    // the ops timers would write (metrics, snapshots) in the window: only the doctor may run in it
    rig.run(`systemctl stop ${timers.join(" ")}`);
    try {
      const before = stateDigest(rig, MP);
      const r = doctor(["--stack", "rig"]);
      const after = stateDigest(rig, MP);
      expect(r.lines.get("backup.restic")).toBe("ok"); // it did read the restic repository (and left no lock in it)
      expect(before.length).toBeGreaterThan(1000);
      expect(after).toEqual(before);
    } finally {
      rig.run(`systemctl start ${timers.join(" ")}`);
    }
  });

  test("--send-test-alert: one test alert through the real Alertmanager to (a fake) Telegram", () => {
    const r = doctor(["--stack", "rig", "--send-test-alert", "--alert-wait", "90"]);
    show("--send-test-alert", r);
    expect(r.status).toBe(0);
    expect(lineOf(r, "monitoring.test-alert")).toMatch(/^ {2}ok .*delivered to Telegram by Alertmanager/);
    const sent = fs.readFileSync(path.join(rig.root, TELEGRAM_RECORD), "utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l));
    expect(sent.some((m) => /\/sendMessage$/.test(m.path) && m.body.includes(TEST_ALERT_NAME))).toBe(true);
  });

  test("a wrong host key: the doctor refuses before logging in, and sends nothing", () => {
    const before = logins();
    const r = doctor(["--stack", "rig-wrongkey"]);
    show("wrong host key", r);
    expect(r.status).toBe(1);
    expect([...r.lines]).toEqual([["ssh.hostkey", "fail"]]);
    expect(r.stderr).toMatch(/Host key verification failed/);
    spawnSync("sleep", ["1"]);
    expect(logins()).toBe(before);
    // control: the right key logs in, and the journal shows it
    expect(doctor(["--stack", "rig"]).status).toBe(0);
    let after = before;
    for (let i = 0; i < 20 && after === before; i++, spawnSync("sleep", ["0.25"])) after = logins();
    expect(after).toBe(before + 1);
  });

  test("fault: a stopped container is a fail of docker.<name>", () => {
    stubs.docker(["stop", "grafana"]);
    try {
      const r = doctor(["--stack", "rig"]);
      show("fault: grafana stopped", r);
      expect(r.status).toBe(1);
      expect(r.lines.get("docker.grafana")).toBe("fail");
      expect(lineOf(r, "docker.grafana")).toMatch(/exited \(exit code \d+\)/);
    } finally {
      stubs.docker(["start", "grafana"]);
      stubs.waitReady();
    }
  });

  test("fault: a stale backup (the backup job's last success 30 h ago) is a fail of backup.job", () => {
    const file = `${TEXTFILES}/train_server_backup.prom`;
    const original = rig.run(`cat ${file}`);
    const ts = Math.floor(Date.now() / 1000) - 30 * 3600;
    rig.run(`sed -i -E 's/^(train_server_task_last_(success|run)_timestamp_seconds\\{task="backup"\\}) .*/\\1 ${ts}/' ${file}`);
    try {
      const r = doctor(["--stack", "rig"]);
      show("fault: stale backup", r);
      expect(r.status).toBe(1);
      expect(r.lines.get("backup.job")).toBe("fail");
      expect(lineOf(r, "backup.job")).toMatch(/last successful backup is 30\.0 h old \(alerts\.backupMaxAgeHours 26\)/);
    } finally {
      const w = rig.exec(["bash", "-c", `cat > ${file}`], original);
      expect(w.status).toBe(0);
    }
  });

  test("fault: a missing device (the raid1 array mounted degraded without its second disk) is a fail of storage.devices", () => {
    const [a, b] = rig.devices;
    // free the array (the Drive, Docker), unmount it, make the kernel forget disk b, mount degraded and read-only
    rig.run(
      [
        "systemctl stop ts-drive-mount.service",
        "docker ps -q | xargs -r docker stop -t 2 >/dev/null",
        "systemctl stop docker.socket docker.service containerd.service",
        `umount ${MP}`,
        `btrfs device scan --forget ${b}`,
        `mount -o degraded,ro ${a} ${MP}`,
      ].join(" && "),
    );
    try {
      const r = doctor(["--stack", "rig"]);
      show("fault: missing device", r);
      expect(r.status).toBe(1);
      expect(r.lines.get("storage.devices")).toBe("fail");
      expect(lineOf(r, "storage.devices")).toMatch(/DEGRADED: 1 of 2 device\(s\) missing \(devid 2\)/);
    } finally {
      // nothing was written (read-only): the whole array mounts again as it was
      rig.run(`umount ${MP} && btrfs device scan ${a} ${b} >/dev/null && mount ${MP}`);
      expect(rig.run(`btrfs filesystem show ${MP}`)).not.toMatch(/missing/);
    }
  });
});
