/**
 * The shared services' rendered configuration through the real validators: prometheus.yml (GPU and no-GPU host)
 * with the Operations alert rules file laid out as the prometheus container sees it passes `promtool check config`
 * (which also loads and checks every rule file the rule_files glob matches); Grafana provisioning YAML parses and
 * points at the datasource the dashboards use; every dashboard panel's PromQL parses (`promtool check rules` on
 * the exprs written as recording rules). Each validator is shown to reject a broken input.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import YAML from "yaml";
import { loadOpsScripts, renderOperations } from "../../components/render/ops";
import { renderGrafanaDashboardProvider, renderGrafanaDashboards, renderGrafanaDatasources, renderPrometheusConfig } from "../../components/render/services";
import { exampleOpsParams } from "../helpers/ops";
import { Scratch } from "../helpers/host";

jest.setTimeout(60_000);

const promtool = (...args: string[]) => {
  const r = spawnSync("promtool", args, { encoding: "utf8" });
  return { status: r.status ?? -1, out: (r.stdout ?? "") + (r.stderr ?? "") };
};

/** Where ops installs its rule file on the host; components/services.ts mounts this dir at /etc/prometheus/rules. */
const HOST_RULES_DIR = "/etc/train-server/prometheus/rules";
const CONTAINER_RULES_DIR = "/etc/prometheus/rules";

let scratch: Scratch;
let rulesFile: { name: string; content: string };
beforeAll(() => {
  scratch = new Scratch("ts-services-config-");
  const files = renderOperations(exampleOpsParams(), loadOpsScripts());
  const rules = Object.entries(files).filter(([p]) => path.dirname(p) === HOST_RULES_DIR);
  expect(rules.map(([p]) => path.extname(p))).toEqual([".yml"]); // exactly one file, and the *.yml glob matches it
  rulesFile = { name: path.basename(rules[0][0]), content: rules[0][1].content };
});
afterAll(() => scratch.cleanup());

/** <dir>/etc/prometheus/{prometheus.yml, rules/<ops rules>} rendered for the scratch dir; returns the config path. */
function layout(name: string, gpu: boolean, rulesContent = rulesFile.content): string {
  const etc = path.join(scratch.dir, name, "etc", "prometheus");
  fs.mkdirSync(path.join(etc, "rules"), { recursive: true });
  fs.writeFileSync(path.join(etc, "rules", rulesFile.name), rulesContent);
  const params = { nodeExporter: "node-exporter:9100", alertmanager: "alertmanager:9093", ...(gpu ? { gpuExporter: "dcgm-exporter:9400" } : {}) };
  const rendered = renderPrometheusConfig({ ...params, rulesDir: path.join(etc, "rules") });
  // only the rules dir differs from what the container gets
  expect(rendered.replace(path.join(etc, "rules"), CONTAINER_RULES_DIR)).toBe(renderPrometheusConfig(params));
  fs.writeFileSync(path.join(etc, "prometheus.yml"), rendered);
  return path.join(etc, "prometheus.yml");
}

describe("prometheus.yml + the ops alert rules", () => {
  const alerts = () => (YAML.parse(rulesFile.content).groups as Array<{ rules: Array<{ alert: string }> }>).flatMap((g) => g.rules);

  it.each([["gpu", true], ["no-gpu", false]] as const)("%s host: promtool check config loads the config and every alert rule", (name, gpu) => {
    const config = layout(name, gpu);
    const r = promtool("check", "config", config);
    expect(r.out).toContain(`SUCCESS: ${config} is valid prometheus config file syntax`);
    expect(r.out).toContain("SUCCESS: 1 rule files found");
    expect(r.out).toContain(`Checking ${path.join(path.dirname(config), "rules", rulesFile.name)}`);
    expect(alerts().length).toBeGreaterThanOrEqual(16);
    expect(r.out).toContain(`SUCCESS: ${alerts().length} rules found`);
    expect(r.out).not.toMatch(/FAILED/);
    expect(r.status).toBe(0);
    const jobs = (YAML.parse(fs.readFileSync(config, "utf8")).scrape_configs as Array<{ job_name: string }>).map((j) => j.job_name);
    expect(jobs.includes("gpu")).toBe(gpu);
  });

  it("control: a rule with a broken expression in the rules dir fails the config check", () => {
    const broken = rulesFile.content.replace("expr: train_server_btrfs_scrub_errors > 0", "expr: train_server_btrfs_scrub_errors >");
    expect(broken).not.toBe(rulesFile.content);
    const r = promtool("check", "config", layout("broken", false, broken));
    expect(r.out).toMatch(/FAILED/);
    expect(r.status).not.toBe(0);
  });
});

describe("Grafana provisioning", () => {
  const dashboards = Object.entries(renderGrafanaDashboards({ mountpoint: "/mnt/storage", gpu: true })).map(([file, json]) => ({ file, d: JSON.parse(json) }));
  const panels = dashboards.flatMap(({ file, d }) =>
    (d.panels as Array<{ id: number; title: string; datasource: { uid: string }; targets: Array<{ expr: string }> }>).map((p) => ({ file, ...p })),
  );

  it("datasource and dashboard provider YAML parse; every panel queries the provisioned datasource", () => {
    const ds = YAML.parse(renderGrafanaDatasources());
    expect(ds.apiVersion).toBe(1);
    expect(ds.datasources).toEqual([expect.objectContaining({ type: "prometheus", uid: "prometheus", url: "http://prometheus:9090", isDefault: true })]);
    const prov = YAML.parse(renderGrafanaDashboardProvider());
    expect(prov.providers).toEqual([expect.objectContaining({ type: "file", options: { path: "/var/lib/grafana/dashboards" } })]);
    expect(dashboards.map((x) => x.file).sort()).toEqual(["containers.json", "gpu-users.json", "gpu.json", "node.json"]);
    expect(new Set(dashboards.map((x) => x.d.uid)).size).toBe(dashboards.length);
    expect(panels.length).toBe(18);
    for (const p of panels) expect([p.file, p.title, p.datasource.uid]).toEqual([p.file, p.title, ds.datasources[0].uid]);
  });

  it("every panel has a non-empty expr and promtool parses each one", () => {
    for (const p of panels) {
      expect([p.file, p.title, p.targets.length]).toEqual([p.file, p.title, 1]);
      expect([p.file, p.title, p.targets[0].expr.trim().length > 0]).toEqual([p.file, p.title, true]);
    }
    const file = writeRecordingRules("dashboards.rules.yml", panels.map((p) => p.targets[0].expr));
    const r = promtool("check", "rules", file);
    expect(r.out).toContain(`SUCCESS: ${panels.length} rules found`);
    expect(r.status).toBe(0);
  });

  it("control: promtool rejects an unparsable expr written the same way", () => {
    const r = promtool("check", "rules", writeRecordingRules("bad.rules.yml", ['sum by (name) (rate(container_cpu_usage_seconds_total{name!=""}[5m])']));
    expect(r.out).toMatch(/FAILED/);
    expect(r.status).not.toBe(0);
  });
});

function writeRecordingRules(name: string, exprs: string[]): string {
  const file = path.join(scratch.dir, name);
  fs.writeFileSync(file, YAML.stringify({ groups: [{ name: "dashboard-exprs", rules: exprs.map((expr, i) => ({ record: `ts_dashboard:panel_${i + 1}`, expr })) }] }));
  return file;
}
