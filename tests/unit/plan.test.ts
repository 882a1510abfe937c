/** The offline plan (`npm run plan`): prints the tree of a stack, fails on bad config with the field's path. */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { stringify } from "yaml";
import { main } from "../../tools/plan";
import { clone, stackRaw } from "../helpers/program";

function capture() {
  const out: string[] = [];
  const err: string[] = [];
  const log = jest.spyOn(console, "log").mockImplementation((...a: unknown[]) => void out.push(a.join(" ")));
  const error = jest.spyOn(console, "error").mockImplementation((...a: unknown[]) => void err.push(a.join(" ")));
  return {
    out,
    err,
    restore: () => {
      log.mockRestore();
      error.mockRestore();
    },
  };
}

function writeStack(dir: string, name: string, raw: Record<string, unknown>): void {
  const config = Object.fromEntries(Object.entries(raw).map(([k, v]) => [`train-server:${k}`, v]));
  fs.writeFileSync(path.join(dir, `Pulumi.${name}.yaml`), stringify({ config }));
}

test.each(["prod", "minimal", "large"])("plan of %s prints a tree under the train-server root and the counts", async (stack) => {
  const c = capture();
  try {
    expect(await main(["--stack", stack])).toBe(0);
  } finally {
    c.restore();
  }
  const text = c.out.join("\n");
  expect(text).toMatch(/^□ train-server:index:TrainServer {2}server$/m);
  expect(text).toContain("Resources by type:");
  expect(text).toMatch(/docker:index\/container:Container +\d+/);
  expect(text).toMatch(/\d+ resources, planned in \d+ ms/);
  expect(c.err).toEqual([]);
});

test("prod's plan lists the eight shared services and five workspaces with their limits", async () => {
  const c = capture();
  try {
    await main(["--stack", "prod"]);
  } finally {
    c.restore();
  }
  const text = c.out.join("\n");
  for (const svc of ["traefik", "netdata", "prometheus", "grafana", "tensorboard", "filebrowser", "dozzle", "portainer"]) expect(text).toContain(`server-services-${svc}`);
  for (const u of ["alice", "bob", "charlie", "dave", "eve"]) expect(text).toMatch(new RegExp(`server-ws-${u}-container\\n.*memory=102400.*memoryReservation=32768.*memorySwap=153600`));
});

test("a stack with a bad value fails with the field's path and changes exit code", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ts-plan-"));
  try {
    const raw = clone(stackRaw("prod"));
    raw.users[2].name = "Charlie";
    raw.storage.devices = ["/dev/sda", "/dev/sdb", "/dev/sdc"];
    writeStack(dir, "bad", raw);
    const c = capture();
    let code: number;
    try {
      code = await main(["--stack", "bad", "--root", dir]);
    } finally {
      c.restore();
    }
    expect(code).toBe(1);
    expect(c.out).toEqual([]);
    const err = c.err.join("\n");
    expect(err).toContain("users[2].name");
    expect(err).toContain("storage.dataProfile: raid10 needs at least 4 devices");
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("an unknown stack is a clear error naming the stacks there are (exit 2)", async () => {
  const c = capture();
  let code: number;
  try {
    code = await main(["--stack", "nosuch"]);
  } finally {
    c.restore();
  }
  expect(code).toBe(2);
  expect(c.err.join("\n")).toMatch(/no stack file .*Pulumi\.nosuch\.yaml \(stacks: .*prod/);
});

test("a stack whose secrets are set (secure: values) plans: the placeholders are shaped like the real secrets", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ts-plan-"));
  try {
    const text = fs.readFileSync(path.join(__dirname, "..", "..", "Pulumi.prod.yaml"), "utf8");
    const secrets = ["sshPrivateKey", "telegramBotToken", "googleClientSecret", "rcloneConfig"].map((k) => `  train-server:${k}:\n    secure: v1:AAAAAAAAAAAAAAAA:BBBBBBBB\n`);
    fs.writeFileSync(path.join(dir, "Pulumi.secured.yaml"), text + secrets.join(""));
    const c = capture();
    let code: number;
    try {
      code = await main(["--stack", "secured", "--root", dir]);
    } finally {
      c.restore();
    }
    expect(c.err).toEqual([]);
    expect(code).toBe(0);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

describe("the plan CLI prints a stack file's YAML-level problem cleanly (no stack trace) and exits 1", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ts-plan-cli-"));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
  const prod = fs.readFileSync(path.join(__dirname, "..", "..", "Pulumi.prod.yaml"), "utf8");
  test.each([
    ["a duplicated key", prod.replace("    sshUser: ops\n", "    sshUser: ops\n    sshUser: root\n"), /host\.sshUser: is given twice \(Pulumi\.\w+\.yaml:\d+:5 and Pulumi\.\w+\.yaml:\d+:5\)/],
    ["a YAML syntax error", prod.replace("- /dev/sda\n", "- [/dev/sda\n"), /Pulumi\.\w+\.yaml:\d+:\d+: YAML: Flow sequence/],
    ["a config: that is a list", "config:\n  - train-server:host\n", /config: must be a mapping of train-server:<key> to values \(found a list\)/],
  ])("%s", (_what, text, message) => {
    const stack = `cli${Math.random().toString(36).slice(2, 8)}`;
    fs.writeFileSync(path.join(dir, `Pulumi.${stack}.yaml`), text);
    const r = spawnSync(process.execPath, ["-r", "ts-node/register/transpile-only", "tools/plan.ts", "--stack", stack, "--root", dir], {
      cwd: path.join(__dirname, "..", ".."),
      encoding: "utf8",
      timeout: 60_000,
    });
    expect({ status: r.status, stdout: r.stdout }).toEqual({ status: 1, stdout: "" });
    expect(r.stderr).toMatch(new RegExp(`^Stack "${stack}": train-server configuration has \\d+ problems?:\\n`));
    expect(r.stderr).toMatch(message);
    expect(r.stderr).not.toMatch(/^\s+at /m); // no stack trace
  });
});
