/**
 * The program's graph under mocks: component tree, ordering, triggers, secrets, and protection flags.
 */
import { WORKSPACE_STOP_TIMEOUT_S } from "../../components/render/workspace-image";
import { SERVICE_STOP_GRACE_S } from "../../components/services";
import { dependsOn, isAncestor, Registered } from "../../tools/harness";
import { clone, runProgram, stackRaw, TEST_SECRETS } from "../helpers/program";

const CMD = "command:remote:Command";

function step(res: Registered[], name: string): Registered {
  const r = res.find((x) => x.type === CMD && x.name === name);
  if (!r) throw new Error(`no command ${name}; have ${res.filter((x) => x.type === CMD).map((x) => x.name).join(", ")}`);
  return r;
}

describe("graph of the prod stack", () => {
  let res: Registered[];
  beforeAll(async () => {
    res = (await runProgram(stackRaw("prod"))).resources;
  });

  test("one train-server root component, and every other resource is under it", () => {
    const roots = res.filter((r) => r.type === "train-server:index:TrainServer");
    expect(roots).toHaveLength(1);
    for (const r of res) {
      if (r === roots[0] || r.type === "pulumi:pulumi:Stack") continue;
      expect({ name: r.name, under: isAncestor(res, roots[0].urn, r.urn) }).toEqual({ name: r.name, under: true });
    }
  });

  test("component type tokens read train-server:<area>:<Name>", () => {
    for (const r of res.filter((x) => !x.custom && x.type !== "pulumi:pulumi:Stack")) {
      expect(r.type).toMatch(/^train-server:[a-z]+:[A-Z][A-Za-z]+$/);
    }
  });

  test("resource names are unique per type and prefixed by their component's name", () => {
    const byUrn = new Map(res.map((r) => [r.urn, r]));
    const seen = new Set<string>();
    for (const r of res) {
      const key = `${r.type}::${r.name}`;
      expect(seen.has(key)).toBe(false);
      seen.add(key);
      const parent = r.parent ? byUrn.get(r.parent) : undefined;
      if (parent && parent.type !== "pulumi:pulumi:Stack") expect(r.name.startsWith(parent.name)).toBe(true);
    }
  });

  test("host steps run storage → ops (Drive mount) → users → baseline → services, never the other way", () => {
    const order = ["server-storage-apply", "server-ops-apply", "server-users-apply", "server-baseline-apply", "server-services-data-dirs-apply"].map((n) => step(res, n));
    for (let i = 1; i < order.length; i++) {
      expect({ step: order[i].name, after: order[i - 1].name, ok: dependsOn(res, order[i].urn, order[i - 1].urn) }).toEqual({ step: order[i].name, after: order[i - 1].name, ok: true });
      expect(dependsOn(res, order[i - 1].urn, order[i].urn)).toBe(false);
    }
  });

  test("workspaces wait for the accounts, and every container for the baseline (Docker) through the provider", () => {
    const users = step(res, "server-users-apply");
    const ws = res.find((r) => r.type === "docker:index/container:Container" && r.name === "server-ws-alice-container")!;
    expect(dependsOn(res, ws.urn, users.urn)).toBe(true);
    const provider = res.find((r) => r.type === "pulumi:providers:docker")!;
    expect(dependsOn(res, provider.urn, step(res, "server-baseline-apply").urn)).toBe(true);
  });

  test("every remote command uses the same connection, whose private key is a secret", () => {
    const cmds = res.filter((r) => r.type === CMD);
    expect(cmds.length).toBeGreaterThan(0);
    for (const c of cmds) {
      expect(c.secretInputs).toContain("connection");
      expect(c.inputs.connection).toEqual(cmds[0].inputs.connection);
      expect(c.inputs.connection.privateKey).toBe(TEST_SECRETS.sshPrivateKey);
    }
  });

  test("destroy order for a live tunnel: cloudflared stops (gracefully) first, then the connection cleanup, then the tunnel", () => {
    const cloudflared = res.find((r) => r.type === "docker:index/container:Container" && r.inputs.name === "cloudflared")!;
    const cleanup = res.find((r) => r.type === "command:local:Command" && r.name === "server-edge-tunnel-cleanup")!;
    const tunnel = res.find((r) => r.type === "cloudflare:index/zeroTrustTunnelCloudflared:ZeroTrustTunnelCloudflared")!;
    // dependents are deleted before what they depend on
    expect(dependsOn(res, cloudflared.urn, cleanup.urn)).toBe(true);
    expect(dependsOn(res, cleanup.urn, tunnel.urn)).toBe(true);
    expect(cleanup.inputs.create).toBe("true");
    expect(cleanup.inputs.delete).toContain("/cfd_tunnel/$TS_TUNNEL_ID/connections");
    expect(cloudflared.inputs.command).toEqual(expect.arrayContaining(["--grace-period", "30s"]));
    expect(cloudflared.inputs.destroyGraceSeconds).toBeGreaterThan(30);
  });

  test("every connection pins the server's host key from config: the command provider's and the Docker provider's ssh", () => {
    const key = stackRaw("prod").host.hostKey;
    for (const c of res.filter((r) => r.type === CMD)) expect(c.inputs.connection.hostKey).toBe(key);
    const provider = res.find((r) => r.type === "pulumi:providers:docker")!;
    const opts: string[] = JSON.parse(provider.inputs.sshOpts);
    expect(opts).toEqual(expect.arrayContaining(["StrictHostKeyChecking=yes", "UserKnownHostsFile=/dev/null", "GlobalKnownHostsFile=/dev/null", `KnownHostsCommand=/bin/echo * ${key}`, "HostKeyAlgorithms=ssh-ed25519"]));
  });

  test("no container is stopped without a grace: stop timeout and destroy grace on every one, workspaces the image's stop timeout", () => {
    const containers = res.filter((r) => r.type === "docker:index/container:Container");
    expect(containers.length).toBeGreaterThan(10);
    for (const c of containers) {
      const ws = c.name.startsWith("server-ws-");
      const want = ws ? WORKSPACE_STOP_TIMEOUT_S : SERVICE_STOP_GRACE_S[c.inputs.name];
      expect({ c: c.name, stop: c.inputs.stopTimeout, grace: c.inputs.destroyGraceSeconds }).toEqual({ c: c.name, stop: want, grace: want });
      expect(want).toBeGreaterThanOrEqual(10);
    }
  });

  test("up waits for every container with a health check to become healthy (a broken workspace fails the up)", () => {
    for (const c of res.filter((r) => r.type === "docker:index/container:Container")) {
      const hasCheck = c.inputs.healthcheck !== undefined || c.name.startsWith("server-ws-"); // workspaces: the image's HEALTHCHECK
      expect({ c: c.name, wait: c.inputs.wait === true }).toEqual({ c: c.name, wait: hasCheck });
      if (hasCheck) expect(c.inputs.waitTimeout).toBeGreaterThanOrEqual(300);
    }
  });

  test("no secret value appears in any command line or in any non-secret input", () => {
    const secrets = Object.values(TEST_SECRETS);
    for (const r of res) {
      for (const [k, v] of Object.entries(r.inputs)) {
        if (r.secretInputs.includes(k)) continue;
        const text = JSON.stringify(v);
        for (const s of secrets) expect({ resource: r.name, input: k, leaks: text.includes(s) }).toEqual({ resource: r.name, input: k, leaks: false });
      }
    }
  });

  test("no input holds the checkout's absolute path (it would differ between machines and show a perpetual diff)", () => {
    const repo = require("path").resolve(__dirname, "..", "..");
    for (const r of res) expect({ resource: r.name, leaks: JSON.stringify(r.inputs).includes(repo) }).toEqual({ resource: r.name, leaks: false });
    const image = res.find((r) => r.type === "docker:index/image:Image")!;
    expect(image.inputs.build.context).toBe("images/workspace");
    expect(image.inputs.imageName).toMatch(/^train-server\/workspace:[0-9a-f]{16}$/);
  });

  test("apply commands re-run on their bundle hash and ship the script on stdin", () => {
    for (const name of ["server-storage-apply", "server-users-apply"]) {
      const c = step(res, name);
      expect(c.inputs.create).toBe("sudo -n bash -s");
      expect(c.inputs.triggers).toHaveLength(1);
      expect(c.inputs.triggers[0]).toMatch(/^[0-9a-f]{64}$/);
      expect(c.inputs.stdin).toContain('bash "$d/script.sh" apply </dev/null');
      expect(c.inputs.delete).toBeUndefined();
    }
  });

  test("production keeps its data: teardowns are protected and retained, apply commands are not", () => {
    for (const name of ["server-storage-teardown", "server-users-teardown"]) {
      const t = step(res, name);
      expect([t.protect, t.retainOnDelete]).toEqual([true, true]);
      expect(t.inputs.delete).toContain("script.sh\" destroy");
    }
    for (const name of ["server-storage-apply", "server-users-apply"]) expect(step(res, name).protect).toBe(false);
  });

  test("storage inputs carry the array's layout from config", () => {
    const s = res.find((r) => r.type === "train-server:host:Script" && r.name === "server-storage")!;
    expect(s.inputs.env).toMatchObject({
      TS_DEVICES: "/dev/sda /dev/sdb /dev/sdc /dev/sdd",
      TS_DATA_PROFILE: "raid10",
      TS_METADATA_PROFILE: "raid10",
      TS_CACHE_DEVICE: "/dev/nvme0n1p4",
      TS_CACHE_MODE: "writeback",
      TS_ALLOW_WIPE: "0",
    });
    expect(s.inputs.env.TS_SUBVOLUMES.split(" ")).toEqual(
      expect.arrayContaining(["homes", "workspaces", "shared", "docker-volumes", "cache/pip", "cache/huggingface", "cache/gdrive", "snapshots"]),
    );
  });
});

describe("triggers change exactly when a script's inputs change", () => {
  async function triggers(raw: Record<string, any>) {
    const { resources } = await runProgram(raw);
    return Object.fromEntries(resources.filter((r) => r.type === CMD && r.name.endsWith("-apply")).map((r) => [r.name, r.inputs.triggers[0]]));
  }

  test("the same config twice gives identical inputs for every resource", async () => {
    const a = await runProgram(stackRaw("prod"));
    const b = await runProgram(stackRaw("prod"));
    expect(a.resources.map((r) => [r.name, r.inputs])).toEqual(b.resources.map((r) => [r.name, r.inputs]));
  });

  /** The apply commands whose trigger differs after `edit` of the prod stack. */
  async function changedBy(edit: (c: Record<string, any>) => void): Promise<string[]> {
    const base = await triggers(stackRaw("prod"));
    const c = clone(stackRaw("prod"));
    edit(c);
    const after = await triggers(c);
    expect(Object.keys(after).sort()).toEqual(Object.keys(base).sort());
    return Object.keys(base).filter((k) => after[k] !== base[k]);
  }

  test("a storage option changes only the storage trigger", async () => {
    expect(await changedBy((c) => (c.storage.mountOptions = "noatime,compress=zstd:1,space_cache=v2"))).toEqual(["server-storage-apply"]);
  });

  test("a new ssh key changes only the users trigger", async () => {
    const key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9yZXdvcmtzZm9yYm9ib25hbmV3bGFwdG9wMTIzNDU2 bob@new";
    expect(await changedBy((c) => c.users[1].sshKeys.push(key))).toEqual(["server-users-apply"]);
  });

  test("reordering the users list changes nothing", async () => {
    const base = await triggers(stackRaw("prod"));
    const c = clone(stackRaw("prod"));
    c.users.reverse();
    expect(await triggers(c)).toEqual(base);
  });
});

describe("blast radius of a user change", () => {
  /** Resources (type::name) whose inputs differ between two runs, and those only in the second. */
  async function diff(edit: (c: Record<string, any>) => void) {
    const a = (await runProgram(stackRaw("prod"))).resources;
    const raw = clone(stackRaw("prod"));
    edit(raw);
    const b = (await runProgram(raw)).resources;
    const key = (r: Registered) => `${r.type}::${r.name}`;
    const before = new Map(a.map((r) => [key(r), r]));
    const after = new Map(b.map((r) => [key(r), r]));
    return {
      changed: b.filter((r) => before.has(key(r)) && JSON.stringify(before.get(key(r))!.inputs) !== JSON.stringify(r.inputs)).map(key).sort(),
      added: b.filter((r) => !before.has(key(r))).map(key).sort(),
      removed: a.filter((r) => !after.has(key(r))).map(key).sort(),
    };
  }
  const frank = (c: Record<string, any>) =>
    c.users.push({ name: "frank", uid: 1005, email: "frank@example.com", sshKeys: c.users[1].sshKeys, memoryGuaranteeGb: 4 });

  test("adding a user: their own resources, the users step, ops' usage list and the shared routing/Access objects; nothing else", async () => {
    const d = await diff(frank);
    expect(d.removed).toEqual([]);
    expect(d.changed).toEqual(
      [
        "train-server:host:Script::server-users",
        "command:remote:Command::server-users-apply",
        "train-server:host:Script::server-ops",
        "command:remote:Command::server-ops-apply",
        "cloudflare:index/zeroTrustAccessPolicy:ZeroTrustAccessPolicy::server-edge-policy-team",
        "cloudflare:index/zeroTrustTunnelCloudflaredConfig:ZeroTrustTunnelCloudflaredConfig::server-edge-tunnel-config",
        // the browser desktop's provisioning: frank's account and connection (the other users' rows stay as they are)
        "train-server:host:Script::server-guacamole-provision",
        "command:remote:Command::server-guacamole-provision-apply",
      ].sort(),
    );
    // every added resource is frank's
    for (const r of d.added) expect(r).toMatch(/frank/);
    expect(d.added).toEqual(expect.arrayContaining(["docker:index/container:Container::server-ws-frank-container"]));
  });

  test("what the ops step rewrites on a user change is only ops.env (the users lists) and btrbk.conf (their own snapshot dir): no unit, no mount, no rules", () => {
    const { parseConfig } = require("../../components/config");
    const { opsParams } = require("../../components/operations");
    const { loadOpsScripts, renderOperations } = require("../../components/render/ops");
    const secrets = { resticPassword: "r", rcloneConfig: "c", telegramBotToken: "1:t" };
    const raw = clone(stackRaw("prod"));
    frank(raw);
    const files = (c: any) => renderOperations(opsParams(parseConfig(c), 2000, secrets), loadOpsScripts());
    const a = files(stackRaw("prod"));
    const b = files(raw);
    expect(Object.keys(b).sort()).toEqual(Object.keys(a).sort());
    expect(Object.keys(a).filter((k) => JSON.stringify(a[k]) !== JSON.stringify(b[k])).sort()).toEqual(["/etc/train-server/ops/btrbk.conf", "/etc/train-server/ops/ops.env"]);
    // btrbk.conf only gains frank's pair; the other users' lines stay as they were
    const conf = (f: any) => f["/etc/train-server/ops/btrbk.conf"].content.split("\n");
    expect(conf(b).filter((l: string) => !conf(a).includes(l))).toEqual(["  subvolume homes/frank", "    snapshot_dir .snapshots/homes/frank"]);
    expect(conf(a).filter((l: string) => !conf(b).includes(l))).toEqual([]);
  });

  test("offboarding in one up: the removed user's routes, Access entries, DNS records, container and SSH keys all go", async () => {
    const before = (await runProgram(stackRaw("prod"))).resources;
    const raw = clone(stackRaw("prod"));
    const charlie = raw.users.splice(2, 1)[0];
    const after = (await runProgram(raw)).resources;
    const keyBody = charlie.sshKeys[0].split(" ")[1];
    const keysB64 = Buffer.from(charlie.sshKeys.join("\n") + "\n").toString("base64");
    // what mentions charlie (name, address, key, or the users step's base64 key record) before and after
    const mentions = (rs: Registered[]) =>
      rs.filter((r) => [r.name, JSON.stringify(r.inputs)].some((t) => /charlie/.test(t) || t.includes(keyBody) || t.includes(keysB64))).map((r) => `${r.type}::${r.name}`);
    expect(mentions(before)).toEqual(
      expect.arrayContaining([
        "cloudflare:index/zeroTrustAccessApplication:ZeroTrustAccessApplication::server-edge-app-charlie-code",
        "cloudflare:index/zeroTrustAccessPolicy:ZeroTrustAccessPolicy::server-edge-policy-user-charlie",
        "cloudflare:index/dnsRecord:DnsRecord::server-edge-dns-charlie-jupyter",
        "cloudflare:index/zeroTrustTunnelCloudflaredConfig:ZeroTrustTunnelCloudflaredConfig::server-edge-tunnel-config",
        "docker:index/container:Container::server-ws-charlie-container",
        "command:remote:Command::server-users-apply",
      ]),
    );
    expect(mentions(after)).toEqual([]);
  });

  test("removing a user touches no other user's container and no shared service", async () => {
    const d = await diff((c) => c.users.splice(2, 1));
    expect(d.added).toEqual([]);
    for (const r of d.removed) expect(r).toMatch(/charlie/);
    for (const r of d.changed) expect(r).not.toMatch(/docker:index\/container|pulumi:providers|baseline|storage/);
  });
});

describe("reviewable previews: only secret values are secret in a step's inputs", () => {
  const { parseConfig } = require("../../components/config");
  const { opsFileSecrecy } = require("../../components/operations");
  const { loadOpsScripts, opsEnabledUnits } = require("../../components/render/ops");
  /** host path → how its content depends on secrets and the cache size, for a config. */
  function kinds(raw: Record<string, any>): Record<string, string> {
    const config = parseConfig(raw);
    const { kind, plain } = opsFileSecrecy(config, loadOpsScripts(), opsEnabledUnits({ dataSync: config.dataSync }));
    const byName: Record<string, string> = {};
    for (const line of plain.manifest.trim().split("\n")) {
      const [name, , , dest] = line.split(" ");
      byName[dest] = kind[name];
    }
    return byName;
  }

  test("timers, units, rules and job scripts are plain; only the files embedding a secret are secret; the mount follows the cache size", () => {
    const k = kinds(stackRaw("prod"));
    const secret = Object.keys(k).filter((f) => k[f] === "secret").sort();
    expect(secret.length).toBeGreaterThan(0);
    for (const f of secret) expect(f).toMatch(/rclone|restic|alertmanager|telegram/);
    expect(Object.keys(k).filter((f) => k[f] === "cache")).toEqual([expect.stringMatching(/drive.*\.service$|mount/)]);
    for (const f of Object.keys(k).filter((x) => /\.(timer|yml|rules|sh)$/.test(x) && !/alertmanager/.test(x))) expect({ f, kind: k[f] }).toEqual({ f, kind: "plain" });
  });

  test("a PR that changes an alert threshold shows the changed rule text in the ops step's (non-secret) inputs", async () => {
    const a = (await runProgram(stackRaw("prod"))).resources.find((r) => r.type === "train-server:host:Script" && r.name === "server-ops")!;
    const raw = clone(stackRaw("prod"));
    raw.alerts.fsUsedPercent = 85;
    const b = (await runProgram(raw)).resources.find((r) => r.type === "train-server:host:Script" && r.name === "server-ops")!;
    const changed = Object.keys(b.inputs.files).filter((f) => b.inputs.files[f] !== a.inputs.files[f]);
    expect(changed).toHaveLength(1);
    expect(b.inputs.files[changed[0]]).toContain("85");
    expect(b.inputs.files.manifest).toContain(`${changed[0]} `);
    const dest = b.inputs.files.manifest.split("\n").find((l: string) => l.startsWith(`${changed[0]} `)).split(" ")[3];
    expect(kinds(raw)[dest]).toBe("plain");
    // and the script itself is in the step's inputs as text: a changed line of a host script is reviewable too
    expect(b.inputs.source).toContain("Installs the Operations area's host files");
  });
});

describe("rig stacks", () => {
  test("a rig's teardowns are neither protected nor retained, and storage may be wiped", async () => {
    const raw = clone(stackRaw("minimal"));
    raw.rig = true;
    const { resources } = await runProgram(raw);
    const t = step(resources, "server-storage-teardown");
    expect([t.protect, t.retainOnDelete]).toEqual([false, false]);
    const s = resources.find((r) => r.type === "train-server:host:Script" && r.name === "server-storage")!;
    expect(s.inputs.env.TS_ALLOW_WIPE).toBe("1");
  });
});
