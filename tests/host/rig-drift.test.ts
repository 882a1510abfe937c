/**
 * RIG DRIFT: the daily drift check on a converged rig (the rig stack's remote commands replayed as in
 * rig-replay.test.ts). ts-drift-check runs every installed step's own `check`: nothing differs and nothing changes;
 * after hand edits (the sshd drop-in, the fstab line's options, a UFW rule, an ops timer, a user's authorized_keys)
 * the metric names each step and item, still changing nothing; the rendered rules, evaluated by promtool on exactly
 * those metric lines, fire HostDrift with the step and item in labels and annotations (DriftCheckFailing stays
 * quiet); re-applying the steps restores the declared state, and the drift is gone.
 */
import * as fs from "fs";
import * as path from "path";
import { spawnSync } from "child_process";
import YAML from "yaml";
import { Scratch } from "../helpers/host";
import { expand } from "../helpers/ops";
import { Plan, planOf, Replayer, rigRemotes, rigStack } from "../helpers/replay";
import { Rig } from "../helpers/rig";

jest.setTimeout(900_000);

const MP = "/mnt/storage";
const PROM = "/var/lib/prometheus/node-exporter/train_server_drift-check.prom";
const RULES = "/etc/train-server/prometheus/rules/train-server-ops.rules.yml";
// the users' rollout guards are steps too: they only look, so their checks name no item
const STEPS = ["server-storage", "server-ops", "server-users", "server-baseline", "server-services-data-dirs", "server-ws-alice-guard", "server-ws-bob-guard"];

describe("RIG DRIFT: hand edits on a converged rig are found by the steps' own checks and alerted on", () => {
  const scratch = new Scratch("ts-rig-drift-");
  const replayer = new Replayer();
  let rig: Rig;
  let plan: Plan;
  let lanCidr = "";

  const sudo = (line: string): string => {
    const r = rig.ssh("sudo -n bash -s", line);
    if (r.status !== 0) throw new Error(`sudo \`${line}\` exited ${r.status}: ${r.stderr}`);
    return r.stdout;
  };
  /** Everything a check could change: files (content, mode, owner) the steps own, accounts, firewall, mounts, units. */
  const hostState = () =>
    sudo(
      [
        "{",
        "find /etc /var/lib/train-server /usr/local/lib/train-server -xdev -printf '%p %m %u:%g %s\\n'",
        "find /etc /var/lib/train-server /usr/local/lib/train-server -xdev -type f -exec sha256sum {} +",
        `find ${MP} -maxdepth 4 -not -path '${MP}/shared/*' -printf '%p %m %u:%g\\n'`,
        `sha256sum ${MP}/homes/*/.ssh/authorized_keys`,
        "getent passwd; getent group; getent shadow",
        "ufw show added; iptables -S",
        "findmnt -rn -o TARGET,SOURCE,FSTYPE,OPTIONS",
        `btrfs subvolume list ${MP}; btrfs qgroup show ${MP} | awk '{print $1}'`,
        "systemctl list-unit-files 'ts-*' --no-legend",
        "} | sort",
      ].join("\n"),
    );
  /** Run the job as its timer would; returns its textfile's sample lines. */
  const runDriftJob = (): string[] => {
    const r = rig.ssh("sudo -n systemctl start ts-drift-check.service");
    const log = r.status === 0 ? "" : sudo("journalctl -u ts-drift-check.service --no-pager | tail -40");
    expect({ status: r.status, log }).toEqual({ status: 0, log: "" });
    return sudo(`cat ${PROM}`).split("\n").filter((l) => l && !l.startsWith("#"));
  };
  const drifting = (lines: string[]) => lines.filter((l) => /^train_server_drift\{.*\} 1$/.test(l)).sort();
  const items = (lines: string[]) => Object.fromEntries(lines.map((l) => /^train_server_drift_items\{step="([^"]+)"\} (\d+)$/.exec(l)).filter((m) => m).map((m) => [m![1], Number(m![2])]));
  const successes = (lines: string[]) => Object.fromEntries(lines.map((l) => /^train_server_drift_check_success\{step="([^"]+)"\} (\d)$/.exec(l)).filter((m) => m).map((m) => [m![1], Number(m![2])]));

  beforeAll(async () => {
    rig = Rig.start(scratch, { disks: 2, diskMb: 512 });
    lanCidr = rig.lanCidr;
    const { raw, secrets } = rigStack(rig);
    plan = await planOf(raw, secrets);
    rigRemotes(rig);
    for (const r of replayer.up(plan)) expect({ name: r.name, status: r.status }).toEqual({ name: r.name, status: 0 });
  });

  afterAll(() => {
    replayer.cleanup();
    scratch.cleanup();
  });

  test("converged: the daily timer is there; the job checks every step, finds nothing and changes nothing", () => {
    expect(rig.ssh("systemctl list-timers --all --no-legend ts-drift-check.timer").stdout).toContain("ts-drift-check.timer");
    expect(sudo("ls /var/lib/train-server/steps").trim().split("\n").sort()).toEqual([...STEPS].sort());
    const before = hostState();
    const lines = runDriftJob();
    expect(hostState()).toBe(before);
    expect(successes(lines)).toEqual(Object.fromEntries(STEPS.map((s) => [s, 1])));
    expect(items(lines)).toEqual(Object.fromEntries(STEPS.map((s) => [s, 0])));
    expect(drifting(lines)).toEqual([]);
    // the checks' verdicts on what they compare are there, as 0: "checked and equal", not "not checked"
    for (const want of [
      'train_server_drift{step="server-baseline",item="sshd.conf"} 0',
      'train_server_drift{step="server-storage",item="fstab"} 0',
      'train_server_drift{step="server-users",item="user.bob.authorized_keys"} 0',
      'train_server_drift{step="server-services-data-dirs",item="grafana"} 0',
    ])
      expect(lines).toContain(want);
    expect(lines).toContain('train_server_task_success{task="drift-check"} 1');
  });

  test("hand edits: each is named by its step and item, nothing is changed by looking, and HostDrift fires on those lines", () => {
    sudo(
      [
        "echo 'X11Forwarding yes' >> /etc/ssh/sshd_config.d/10-train-server.conf",
        `sed -i 's#^\\(UUID=[^ ]* ${MP} btrfs .*\\)compress=zstd:3#\\1compress=zstd:1#' /etc/fstab`,
        `grep -q ' ${MP} btrfs .*compress=zstd:1' /etc/fstab`,
        `ufw allow from ${lanCidr} to any port 8080 proto tcp >/dev/null`,
        "echo '# tuned by hand' >> /etc/systemd/system/ts-backup.timer",
        `echo 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJRAcMic7Wp3udoA0YKjn7/xiMki5Lh2CCKv2qzc0RxU intruder' >> ${MP}/homes/bob/.ssh/authorized_keys`,
      ].join("\n"),
    );
    const before = hostState();
    const lines = runDriftJob();
    expect(hostState()).toBe(before); // the hand edits are still there: a check only looks
    console.log(`drift metric lines after the hand edits:\n  ${lines.filter((l) => l.startsWith("train_server_drift")).join("\n  ")}`);
    expect(drifting(lines)).toEqual(
      [
        'train_server_drift{step="server-baseline",item="sshd.conf"} 1',
        'train_server_drift{step="server-baseline",item="ufw-rules"} 1',
        'train_server_drift{step="server-storage",item="fstab"} 1',
        'train_server_drift{step="server-ops",item="ts-backup.timer"} 1',
        'train_server_drift{step="server-users",item="user.bob.authorized_keys"} 1',
      ].sort(),
    );
    expect(items(lines)).toEqual({ "server-storage": 1, "server-ops": 1, "server-users": 1, "server-baseline": 2, "server-services-data-dirs": 0, "server-ws-alice-guard": 0, "server-ws-bob-guard": 0 });
    expect(successes(lines)).toEqual(Object.fromEntries(STEPS.map((s) => [s, 1])));

    // the rules installed on the rig, evaluated by promtool on exactly these lines (held for 10 minutes)
    const rulesFile = path.join(scratch.dir, "rules.yml");
    fs.writeFileSync(rulesFile, sudo(`cat ${RULES}`));
    const rules = (YAML.parse(fs.readFileSync(rulesFile, "utf8")).groups as Array<{ rules: any[] }>).flatMap((g) => g.rules);
    const hostDrift = rules.find((r) => r.alert === "HostDrift");
    const expAlerts = drifting(lines).map((l) => {
      const [, step, item] = /step="([^"]+)",item="([^"]+)"/.exec(l)!;
      return {
        exp_labels: { step, item, ...hostDrift.labels },
        exp_annotations: { summary: expand(hostDrift.annotations.summary, { step, item }, 1), description: expand(hostDrift.annotations.description, { step, item }, 1) },
      };
    });
    const test = {
      rule_files: [rulesFile],
      evaluation_interval: "1m",
      tests: [
        {
          interval: "1m",
          input_series: lines.map((l) => {
            const m = /^(\S+\}) (\S+)$/.exec(l)!;
            return { series: m[1], values: `${m[2]}x10` };
          }),
          alert_rule_test: [
            { eval_time: "5m", alertname: "HostDrift", exp_alerts: expAlerts },
            // every check succeeded just now: nothing to say about the checks themselves
            { eval_time: "5m", alertname: "DriftCheckFailing", exp_alerts: [] },
          ],
        },
      ],
    };
    const testFile = path.join(scratch.dir, "drift.test.yml");
    fs.writeFileSync(testFile, YAML.stringify(test));
    const r = spawnSync("promtool", ["test", "rules", testFile], { encoding: "utf8" });
    expect(r.stdout + r.stderr).toMatch(/SUCCESS/);
    expect(r.status).toBe(0);
    console.log(`HostDrift fired (promtool):\n  ${expAlerts.map((a) => `${JSON.stringify(a.exp_labels)} summary: ${a.exp_annotations.summary}`).join("\n  ")}`);
    expect(expAlerts.find((a) => a.exp_labels.step === "server-baseline" && a.exp_labels.item === "sshd.conf")!.exp_annotations.summary).toBe(
      "server-baseline: sshd.conf differs from the declared state",
    );
  });

  test("restore: re-applying the steps puts the declared state back, and the drift is gone", () => {
    const applies = plan.commands.filter((c) => c.name.endsWith("-apply"));
    const runs = applies.map((c) => replayer.run(c, "update", c.stdin));
    expect(runs.map((r) => ({ name: r.name, status: r.status }))).toEqual(applies.map((c) => ({ name: c.name, status: 0 })));
    const changed = runs.filter((r) => r.results.changes !== "0").map((r) => r.name).sort();
    expect(changed).toEqual(["server-baseline-apply", "server-ops-apply", "server-storage-apply", "server-users-apply"]);
    expect(sudo("cat /etc/ssh/sshd_config.d/10-train-server.conf")).not.toContain("X11Forwarding yes");
    expect(sudo("ufw show added")).not.toContain("8080");
    const lines = runDriftJob();
    expect(drifting(lines)).toEqual([]);
    expect(items(lines)).toEqual(Object.fromEntries(STEPS.map((s) => [s, 0])));
  });
});
