/**
 * gpu-watchdog.sh against a REAL Docker: a private dockerd (tests/helpers/docker.ts) runs one container per
 * workspace, named as the program names them; inside each, /usr/local/bin (bind-mounted from the test) holds a fake
 * `nvidia-smi` that prints what the real one prints — `GPU <n>: <name> (UUID: GPU-…)` lines for `-L`, or, for a
 * container that lost its GPUs on a `systemctl daemon-reload` (NVIDIA/nvidia-container-toolkit#48), "Failed to
 * initialize NVML: Unknown Error" with exit 255. No GPU on this machine: the fake decides what a GPU would.
 * Asserts the metrics per workspace (reachable / visible / expected / running), the lost-GPUs case, a workspace
 * that sees fewer GPUs than configured, one without nvidia-smi, a stopped one, the daemon down; promtool accepts
 * the textfile. Then the alert rules through `promtool test rules`.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import YAML from "yaml";
import { gpuWatchdogRules } from "../../components/render/alerts";
import { loadOpsScripts, renderOperations, renderOpsEnv } from "../../components/render/ops";
import { BOOKWORM_MINBASE, ensureDebootstrapRootfs, PrivateDockerd } from "../helpers/docker";
import { runScript, Scratch } from "../helpers/host";
import { exampleGpuOpsParams, writeFiles } from "../helpers/ops";

jest.setTimeout(300_000);

const WATCHDOG = {
  workspaces: [
    { user: "alice", container: "workspace-alice", gpus: 1 },
    { user: "bob", container: "workspace-bob", gpus: 4 },
    { user: "carol", container: "workspace-carol", gpus: 2 },
    { user: "dave", container: "workspace-dave", gpus: 1 },
    { user: "erin", container: "workspace-erin", gpus: 2 },
  ],
};
const params = exampleGpuOpsParams({ gpuWatchdog: WATCHDOG });
const NVML_ERROR = "Failed to initialize NVML: Unknown Error";

let scratch: Scratch;
let d: PrivateDockerd;
let env: Record<string, string>;
let prom: string;
const binOf = (user: string) => path.join(scratch.dir, "bin", user);

/** What the fake nvidia-smi of a workspace answers: N GPUs, or the NVML error of a container that lost them. */
function setGpus(user: string, state: number | "nvml-error"): void {
  fs.writeFileSync(path.join(binOf(user), "state"), `${state}\n`);
}

const samples = () =>
  Object.fromEntries(
    fs.readFileSync(prom, "utf8").split("\n").filter((l) => l && !l.startsWith("#")).map((l) => {
      const m = /^(\S+) (\S+)$/.exec(l)!;
      return [m[1], Number(m[2])];
    }),
  );
const of = (s: Record<string, number>, metric: string, user: string) => s[`train_server_workspace_${metric}{user="${user}"}`];
const watchdog = (over: Record<string, string> = {}) => runScript("gpu-watchdog", "apply", { ...env, ...over });

beforeAll(() => {
  scratch = new Scratch("ts-gpu-watchdog-");
  d = PrivateDockerd.start(scratch, { dataRootMb: 4096 });
  d.importRootfs(ensureDebootstrapRootfs(BOOKWORM_MINBASE), "local/base");
  for (const { user, container } of WATCHDOG.workspaces) {
    fs.mkdirSync(binOf(user), { recursive: true });
    if (user !== "dave") {
      // nvidia-smi -L as the real one prints it; the NVML error (exit 255) when the container lost its devices
      fs.writeFileSync(path.join(binOf(user), "nvidia-smi"), `#!/bin/sh
[ "$*" = "-L" ] || { echo "fake nvidia-smi: unexpected arguments: $*" >&2; exit 2; }
state=$(cat /usr/local/bin/state)
if [ "$state" = nvml-error ]; then echo "${NVML_ERROR}"; exit 255; fi
i=0
while [ "$i" -lt "$state" ]; do
  echo "GPU $i: NVIDIA RTX A6000 (UUID: GPU-0000000$i-1111-2222-3333-444444444444)"
  i=$((i + 1))
done
`, { mode: 0o755 });
    }
    d.dockerOk(["run", "-d", "--name", container, "-v", `${binOf(user)}:/usr/local/bin:ro`, "local/base", "sleep", "infinity"]);
  }
  setGpus("alice", 1);
  setGpus("bob", 4);
  setGpus("carol", 2);
  setGpus("erin", 1); // configured for 2: one device node missing
  d.dockerOk(["stop", "-t", "0", "workspace-carol"]);
  // the rendered ops.env's TS_GPU_WORKSPACES, as the timer's service reads it
  const gpuWorkspaces = /^TS_GPU_WORKSPACES="(.*)"$/m.exec(renderOpsEnv(params))![1];
  prom = path.join(scratch.dir, "textfile", "train_server_gpu-watchdog.prom");
  env = { DOCKER_HOST: `unix://${d.sock}`, DOCKER_CONFIG: path.join(scratch.dir, "docker-client"), TS_GPU_WORKSPACES: gpuWorkspaces, TS_TEXTFILE_DIR: path.join(scratch.dir, "textfile") };
});
afterAll(() => scratch.cleanup());

test("the rendered job: its units pass systemd-analyze verify, every minute, the workspaces with their GPU counts in ops.env", () => {
  const base = path.join(scratch.dir, "units-root");
  const files = renderOperations({ ...params, scriptDir: path.join(base, "lib"), unitDir: path.join(base, "units"), configDir: path.join(base, "etc") }, loadOpsScripts());
  writeFiles("/", Object.fromEntries(Object.entries(files).filter(([p]) => p.startsWith(base))));
  const units = ["ts-gpu-watchdog.service", "ts-gpu-watchdog.timer"].map((u) => path.join(base, "units", u));
  const r = spawnSync("systemd-analyze", ["verify", ...units], { encoding: "utf8" });
  expect(r.stdout + r.stderr).toBe("");
  expect(r.status).toBe(0);
  const cal = /^OnCalendar=(.*)$/m.exec(files[units[1]].content)![1];
  expect(/Normalized form: (.*)/.exec(spawnSync("systemd-analyze", ["calendar", cal], { encoding: "utf8" }).stdout)![1].trim()).toBe("*-*-* *:*:00");
  expect(env.TS_GPU_WORKSPACES).toBe("alice:workspace-alice:1 bob:workspace-bob:4 carol:workspace-carol:2 dave:workspace-dave:1 erin:workspace-erin:2");
});

test("healthy, partial, no nvidia-smi, stopped: one metric set per workspace", () => {
  const r = watchdog();
  expect({ status: r.status, changes: r.changes }).toEqual({ status: 0, changes: 0 });
  expect(r.results).toMatchObject({ "gpu.alice": "1/1", "gpu.bob": "4/4", "gpu.carol": "not-running", "gpu.dave": "0/1", "gpu.erin": "1/2", unreachable: "2" });
  const s = samples();
  expect([of(s, "gpu_reachable", "alice"), of(s, "gpus_visible", "alice"), of(s, "gpus_expected", "alice"), of(s, "running", "alice")]).toEqual([1, 1, 1, 1]);
  expect([of(s, "gpu_reachable", "bob"), of(s, "gpus_visible", "bob"), of(s, "gpus_expected", "bob")]).toEqual([1, 4, 4]);
  // a stopped workspace is not probed: no reachability sample, so no alert
  expect([of(s, "running", "carol"), of(s, "gpus_expected", "carol"), of(s, "gpu_reachable", "carol"), of(s, "gpus_visible", "carol")]).toEqual([0, 2, undefined, undefined]);
  expect([of(s, "gpu_reachable", "dave"), of(s, "gpus_visible", "dave")]).toEqual([0, 0]);
  expect([of(s, "gpu_reachable", "erin"), of(s, "gpus_visible", "erin"), of(s, "gpus_expected", "erin")]).toEqual([0, 1, 2]);
  expect(s['train_server_task_success{task="gpu-watchdog"}']).toBe(1);
  expect(r.stderr).toMatch(/dave: workspace-dave sees 0 of 1 GPUs \(nvidia-smi exit 12[67]: /);
  // node-exporter's textfile format
  const check = spawnSync("promtool", ["check", "metrics"], { input: fs.readFileSync(prom, "utf8"), encoding: "utf8" });
  expect(check.stdout + check.stderr).toBe("");
  expect(check.status).toBe(0);
});

test("lost GPUs after a daemon-reload: nvidia-smi fails with the NVML error, the workspace reads unreachable; back when fixed", () => {
  setGpus("alice", "nvml-error");
  const r = watchdog();
  expect(r.status).toBe(0);
  expect(r.results["gpu.alice"]).toBe("0/1");
  expect(r.stderr).toContain(`alice: workspace-alice sees 0 of 1 GPUs (nvidia-smi exit 255: ${NVML_ERROR})`);
  let s = samples();
  expect([of(s, "gpu_reachable", "alice"), of(s, "gpus_visible", "alice"), of(s, "running", "alice")]).toEqual([0, 0, 1]);
  expect(of(s, "gpu_reachable", "bob")).toBe(1);
  // the admin restarts the workspace (device nodes given explicitly come back with it): reachable again
  setGpus("alice", 1);
  expect(watchdog().results["gpu.alice"]).toBe("1/1");
  s = samples();
  expect(of(s, "gpu_reachable", "alice")).toBe(1);
});

test("the Docker daemon not answering fails the task (GpuWatchdogFailing), keeping the last success time", () => {
  const before = samples()['train_server_task_last_success_timestamp_seconds{task="gpu-watchdog"}'];
  const r = watchdog({ DOCKER_HOST: `unix://${scratch.dir}/no-such.sock` });
  expect(r.status).toBe(1);
  expect(r.stderr).toMatch(/the Docker daemon does not answer/);
  const s = samples();
  expect(s['train_server_task_success{task="gpu-watchdog"}']).toBe(0);
  expect(s['train_server_task_last_success_timestamp_seconds{task="gpu-watchdog"}']).toBe(before);
});

test("a bad TS_GPU_WORKSPACES entry is refused with the entry named", () => {
  const r = watchdog({ TS_GPU_WORKSPACES: "alice:workspace-alice:one" });
  expect(r.status).toBe(1);
  expect(r.stderr).toMatch(/TS_GPU_WORKSPACES entry 'alice:workspace-alice:one' is not user:container:count/);
});

describe("the alert rules (promtool)", () => {
  const [unreachable, failing] = gpuWatchdogRules();
  const run = (args: string[]) => {
    const r = spawnSync("promtool", args, { encoding: "utf8" });
    return { status: r.status ?? -1, out: (r.stdout ?? "") + (r.stderr ?? "") };
  };
  let rulesFile: string;
  beforeAll(() => {
    rulesFile = path.join(scratch.dir, "rules.yml");
    fs.writeFileSync(rulesFile, renderOperations(params, loadOpsScripts())["/etc/train-server/prometheus/rules/train-server-ops.rules.yml"].content);
  });
  const promtoolTest = (name: string, tests: object[]) => {
    const file = path.join(scratch.dir, `${name}.test.yml`);
    fs.writeFileSync(file, YAML.stringify({ rule_files: [rulesFile], evaluation_interval: "1m", tests }, { lineWidth: 0 }));
    return run(["test", "rules", file]);
  };
  const expandUser = (t: string, user: string) => t.replace(/\{\{ \$labels\.user \}\}/g, user);
  const fires = (user: string) => ({
    exp_labels: { user, ...unreachable.labels },
    exp_annotations: { summary: expandUser(unreachable.annotations.summary, user), description: expandUser(unreachable.annotations.description, user) },
  });

  test("promtool check rules accepts the file with the watchdog's alerts", () => {
    const r = run(["check", "rules", rulesFile]);
    expect(r.out).toMatch(/SUCCESS: \d+ rules found/);
    expect(r.status).toBe(0);
    const names = (YAML.parse(fs.readFileSync(rulesFile, "utf8")).groups as Array<{ rules: Array<{ alert?: string }> }>).flatMap((g) => g.rules.map((x) => x.alert));
    expect(names).toEqual(expect.arrayContaining(["WorkspaceGpuUnreachable", "GpuWatchdogFailing"]));
  });

  test("unreachable for 2 minutes fires for that user only; a reachable or stopped workspace never does; recovery resolves", () => {
    const r = promtoolTest("unreachable", [
      {
        interval: "1m",
        input_series: [
          // alice loses her GPUs at minute 5 (daemon-reload) and gets them back at minute 15 (workspace restarted)
          { series: 'train_server_workspace_gpu_reachable{user="alice"}', values: "1x4 0x10 1x10" },
          { series: 'train_server_workspace_gpu_reachable{user="bob"}', values: "1x25" },
          // carol's workspace is stopped: the watchdog writes no reachability sample for it
          { series: 'train_server_workspace_running{user="carol"}', values: "0x25" },
          // a single failed probe (one minute) is not an alert
          { series: 'train_server_workspace_gpu_reachable{user="erin"}', values: "1x9 0 1x15" },
        ],
        alert_rule_test: [
          { eval_time: "4m", alertname: "WorkspaceGpuUnreachable", exp_alerts: [] },
          { eval_time: "6m", alertname: "WorkspaceGpuUnreachable", exp_alerts: [] },
          { eval_time: "7m", alertname: "WorkspaceGpuUnreachable", exp_alerts: [fires("alice")] },
          { eval_time: "14m", alertname: "WorkspaceGpuUnreachable", exp_alerts: [fires("alice")] },
          { eval_time: "16m", alertname: "WorkspaceGpuUnreachable", exp_alerts: [] },
        ],
      },
    ]);
    expect(r.out).toMatch(/SUCCESS/);
    expect(r.status).toBe(0);
  });

  test("the watchdog failing or stale for 10 minutes warns", () => {
    const exp = [{ exp_labels: { task: "gpu-watchdog", ...failing.labels }, exp_annotations: failing.annotations }];
    const r = promtoolTest("failing", [
      {
        interval: "1m",
        input_series: [
          { series: 'train_server_task_success{task="gpu-watchdog"}', values: "1x10 0x30" },
          { series: 'train_server_task_last_run_timestamp_seconds{task="gpu-watchdog"}', values: "0+60x40" },
        ],
        alert_rule_test: [
          { eval_time: "9m", alertname: "GpuWatchdogFailing", exp_alerts: [] },
          { eval_time: "15m", alertname: "GpuWatchdogFailing", exp_alerts: [] },
          { eval_time: "25m", alertname: "GpuWatchdogFailing", exp_alerts: exp },
        ],
      },
    ]);
    expect(r.out).toMatch(/SUCCESS/);
    expect(r.status).toBe(0);
  });

  test("control: promtool fails an alert expected for a reachable workspace", () => {
    const r = promtoolTest("control", [
      { interval: "1m", input_series: [{ series: 'train_server_workspace_gpu_reachable{user="bob"}', values: "1x20" }], alert_rule_test: [{ eval_time: "10m", alertname: "WorkspaceGpuUnreachable", exp_alerts: [fires("bob")] }] },
    ]);
    expect(r.status).not.toBe(0);
  });
});
