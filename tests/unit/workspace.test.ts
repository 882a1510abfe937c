/**
 * Shared services and per-user workspaces under mocks: limits, ports, GPU, mounts, routes, secrets, and the
 * add/remove-user diffs.
 */
import { parseCpuset } from "../../components/config";
import { diffRuns, Registered } from "../../tools/harness";
import { clone, runProgram, stackRaw } from "../helpers/program";

const CONTAINER = "docker:index/container:Container";
const FRANK_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDm+MDWku3UWnMtuEXlaaEnTgoPOudIW7KRhtgJVKB1f frank@laptop";

function workspaces(res: Registered[]): Registered[] {
  return res.filter((r) => r.type === CONTAINER && String(r.inputs.name).startsWith("workspace-"));
}
function byName(res: Registered[], name: string): Registered {
  const r = res.find((x) => x.type === CONTAINER && x.inputs.name === name);
  if (!r) throw new Error(`no container ${name}`);
  return r;
}
function labels(r: Registered): Record<string, string> {
  return Object.fromEntries((r.inputs.labels ?? []).map((l: any) => [l.label, l.value]));
}
function withFrank(raw: Record<string, any>) {
  const c = clone(raw);
  // 5 x 32 GB are guaranteed of the 184 GB available: frank joins with a 24 GB guarantee (32 would be refused)
  c.users.push({ name: "frank", uid: 1005, email: "frank@example.com", sshKeys: [FRANK_KEY], memoryGuaranteeGb: 24, cpuset: "0-1" });
  return c;
}

describe("workspaces of the prod stack", () => {
  let res: Registered[];
  let outputs: any;
  beforeAll(async () => {
    const run = await runProgram(stackRaw("prod"));
    res = run.resources;
    outputs = run.outputs;
  });

  test("five workspaces, one per user", () => {
    expect(workspaces(res).map((r) => r.inputs.name).sort()).toEqual(["workspace-alice", "workspace-bob", "workspace-charlie", "workspace-dave", "workspace-eve"]);
  });

  test("disjoint cpusets", () => {
    const seen = new Set<number>();
    for (const w of workspaces(res)) {
      for (const cpu of parseCpuset(w.inputs.cpuSet)) {
        expect(seen.has(cpu)).toBe(false);
        seen.add(cpu);
      }
    }
    expect(seen.size).toBe(30);
  });

  test("ports from the stable slot, bound to the LAN address, all unique", () => {
    const all: number[] = [];
    for (const w of workspaces(res)) {
      const user = String(w.inputs.name).replace("workspace-", "");
      const slot = ["alice", "bob", "charlie", "dave", "eve"].indexOf(user);
      expect(w.inputs.ports).toEqual(
        expect.arrayContaining([
          expect.objectContaining({ internal: 22, external: 2222 + slot, ip: "192.168.1.50" }),
          // the desktop is X2Go, which runs over SSH: 4000+slot reaches the container's sshd too
          expect.objectContaining({ internal: 22, external: 4000 + slot, ip: "192.168.1.50" }),
        ]),
      );
      all.push(...w.inputs.ports.map((p: any) => p.external));
    }
    expect(new Set(all).size).toBe(all.length);
  });

  test("memory: 32 GB guarantee (reservation), 100 GB limit, 50 GB swap, shm; GPU shared by all", () => {
    for (const w of workspaces(res)) {
      expect(w.inputs).toMatchObject({ memory: 102400, memoryReservation: 32768, memorySwap: 153600, shmSize: 16384 });
      // the reservation is memory.low: it protects only under the baseline's slice (tests/host/workspace-memory.test.ts)
      expect(w.inputs.cgroupParent).toBe("trainws.slice");
      expect(w.inputs.deviceRequests).toEqual([expect.objectContaining({ driver: "nvidia", count: -1, capabilities: ["gpu"] })]);
      expect(w.inputs.gpus).toBeUndefined();
    }
  });

  test("mounts: home, /workspace, /shared, the caches and the state dir (inner Docker, host keys), all from the array", () => {
    const alice = byName(res, "workspace-alice");
    const targets = Object.fromEntries(alice.inputs.mounts.map((m: any) => [m.target, m.source]));
    expect(targets).toMatchObject({
      "/home/alice": "/mnt/storage/homes/alice",
      "/workspace": "/mnt/storage/workspaces/alice",
      "/shared": "/mnt/storage/shared",
      "/cache/pip": "/mnt/storage/cache/pip",
      "/cache/huggingface": "/mnt/storage/cache/huggingface",
      "/var/lib/workspace": "/mnt/storage/docker-volumes/alice",
    });
    expect(alice.inputs.mounts.find((m: any) => m.target === "/shared").bindOptions).toEqual({ propagation: "rslave" });
  });

  test("each workspace mounts only its own user's snapshots (read-only) and restore spool; no other user's path", () => {
    const users = res.filter((r) => r.type === "docker:index/container:Container" && /workspace-[a-z]+$/.test(r.inputs.name ?? ""));
    expect(users.length).toBeGreaterThan(1);
    for (const w of users) {
      const me = w.inputs.name.replace("workspace-", "");
      const snap = w.inputs.mounts.find((m: any) => m.target === "/snapshots");
      expect(snap).toEqual({ type: "bind", source: `/mnt/storage/.snapshots/homes/${me}`, target: "/snapshots", readOnly: true });
      expect(w.inputs.mounts.find((m: any) => m.target === "/run/train-server-restore")).toEqual({ type: "bind", source: `/var/lib/train-server/restore/${me}`, target: "/run/train-server-restore" });
      const others = users.map((u) => u.inputs.name.replace("workspace-", "")).filter((n) => n !== me);
      for (const m of w.inputs.mounts) for (const o of others) expect(m.source.split("/")).not.toContain(o);
    }
  });

  test("routes <user>-code and <user>-jupyter point Traefik at the user's container", () => {
    const l = labels(byName(res, "workspace-bob"));
    expect(l["traefik.http.routers.bob-code.rule"]).toBe("Host(`bob-code.example.com`)");
    expect(l["traefik.http.services.bob-code.loadbalancer.server.port"]).toBe("8080");
    expect(l["traefik.http.routers.bob-jupyter.rule"]).toBe("Host(`bob-jupyter.example.com`)");
    expect(l["traefik.http.services.bob-jupyter.loadbalancer.server.port"]).toBe("8888");
  });

  test("each workspace's password is a secret, uploaded as a file, never in the environment", () => {
    for (const w of workspaces(res)) {
      expect(w.secretInputs).toContain("uploads");
      expect(JSON.stringify(w.inputs.envs)).not.toMatch(/mock-password/);
      expect(w.deleteBeforeReplace).toBe(true);
    }
  });

  test("per-user outputs: URLs and ports; the password output is a secret", async () => {
    expect(outputs.users.alice).toMatchObject({ sshPort: 2222, desktopPort: 4000, codeUrl: "https://alice-code.example.com" });
  });
});

describe("shared services of the prod stack", () => {
  let res: Registered[];
  beforeAll(async () => {
    res = (await runProgram(stackRaw("prod"))).resources;
  });

  test("the eight web services run from pinned images with restart policies", () => {
    for (const svc of ["traefik", "netdata", "prometheus", "grafana", "tensorboard", "filebrowser", "dozzle", "portainer"]) {
      const c = byName(res, svc);
      expect(c.inputs.image).toMatch(/:[0-9v][^:]*$/);
      expect(c.inputs.image).not.toMatch(/:latest$/);
      expect(c.inputs.restart).toBe("unless-stopped");
      expect(c.deleteBeforeReplace).toBe(true);
    }
  });

  test("every route has a backend container on the services network", () => {
    const names = new Set(res.filter((r) => r.type === CONTAINER).map((r) => r.inputs.name));
    const routed = res.filter((r) => r.type === CONTAINER).flatMap((c) => Object.keys(labels(c)).filter((k) => k.endsWith(".rule")).map(() => c.inputs.name));
    expect(routed.length).toBeGreaterThanOrEqual(18);
    for (const n of routed) expect(names.has(n)).toBe(true);
  });

  test("the containers that Operations signals on a config change exist under those names and mount those dirs", () => {
    const { RELOAD_ON_CHANGE } = require("../../components/operations");
    for (const { prefix, container } of RELOAD_ON_CHANGE) {
      const c = byName(res, container);
      expect(c.inputs.volumes.some((v: any) => `${v.hostPath}/` === prefix)).toBe(true);
    }
  });

  test("the Grafana admin password is a generated secret, given as a file", () => {
    const g = byName(res, "grafana");
    expect(g.secretInputs).toContain("uploads");
    expect(g.inputs.envs).toContain("GF_SECURITY_ADMIN_PASSWORD__FILE=/run/secrets/grafana-admin");
    expect(res.some((r) => r.type === "random:index/randomPassword:RandomPassword" && r.name.endsWith("grafana-admin"))).toBe(true);
  });

  test("all containers go through the SSH Docker provider", () => {
    const providers = res.filter((r) => r.type === "pulumi:providers:docker");
    expect(providers).toHaveLength(1);
    expect(providers[0].inputs.host).toBe("ssh://ops@192.168.1.50:22");
    for (const c of res.filter((r) => r.type === CONTAINER)) expect(c.provider?.startsWith(`${providers[0].urn}::`)).toBe(true);
  });
});

describe("the rollout guard (issue 15: rollouts never kill a job)", () => {
  const COMMAND = "command:remote:Command";
  const guardOf = (res: Registered[], user: string) => {
    const g = res.find((r) => r.type === COMMAND && r.name.endsWith(`-ws-${user}-guard-apply`));
    if (!g) throw new Error(`no guard for ${user}`);
    return g;
  };
  const envOf = (g: Registered) => Object.fromEntries([...String(g.inputs.stdin).matchAll(/^(TS_[A-Z_]+)='([^']*)'$/gm)].map((m) => [m[1], m[2]]));
  const edit = async (f: (raw: any) => void) => {
    const raw = clone(stackRaw("prod"));
    f(raw);
    return (await runProgram(raw)).resources;
  };
  let res: Registered[];
  beforeAll(async () => {
    res = (await runProgram(stackRaw("prod"))).resources;
  });

  test("every workspace waits for its own guard, which checks the spec the container is labelled with", () => {
    for (const w of workspaces(res)) {
      const user = String(w.inputs.name).replace("workspace-", "");
      const g = guardOf(res, user);
      expect(w.dependencies).toContain(g.urn);
      const env = envOf(g);
      expect(env.TS_SPEC).toMatch(/^[0-9a-f]{64}$/);
      expect(labels(w)["train-server.spec"]).toBe(env.TS_SPEC);
      expect(env).toMatchObject({ TS_USER: user, TS_CONTAINER: w.inputs.name, TS_HOME: `/mnt/storage/homes/${user}`, TS_FORCE: "0", TS_WINDOW: "", TS_BUSY_CPU_PERCENT: "50", TS_CPU_SAMPLE_S: "5", TS_READY_MAX_AGE_S: "86400" });
    }
    expect(new Set(workspaces(res).map((w) => labels(w)["train-server.spec"])).size).toBe(5);
  });

  test("its refusal reaches the up's output: the step carries no secret, so its output is not withheld", () => {
    const g = guardOf(res, "alice");
    expect(g.inputs.logging).toBe("stdoutAndStderr");
    expect(g.secretInputs).not.toContain("stdin");
  });

  test("a change that replaces alice's workspace changes her spec (the guard runs first), nobody else's", async () => {
    const after = await edit((raw) => (raw.users.find((u: any) => u.name === "alice").memoryLimitGb = 90));
    expect(envOf(guardOf(after, "alice")).TS_SPEC).not.toBe(envOf(guardOf(res, "alice")).TS_SPEC);
    expect(labels(byName(after, "workspace-alice"))["train-server.spec"]).toBe(envOf(guardOf(after, "alice")).TS_SPEC);
    for (const u of ["bob", "charlie", "dave", "eve"]) expect(guardOf(after, u).inputs).toEqual(guardOf(res, u).inputs);
  });

  test("a change that does not touch the container (her SSH keys, quota) changes neither the guard nor the container", async () => {
    const after = await edit((raw) => {
      const a = raw.users.find((u: any) => u.name === "alice");
      a.quotaGb = 1200;
      a.sshKeys = [FRANK_KEY];
    });
    expect(guardOf(after, "alice").inputs).toEqual(guardOf(res, "alice").inputs);
    expect(byName(after, "workspace-alice").inputs).toEqual(byName(res, "workspace-alice").inputs);
  });

  test("rolloutNow and the maintenance window reach only the guard, never the container", async () => {
    const after = await edit((raw) => {
      raw.users.find((u: any) => u.name === "alice").rolloutNow = true;
      raw.workspace = { rollout: { window: { days: ["sunday", "saturday"] } } };
    });
    expect(envOf(guardOf(after, "alice"))).toMatchObject({ TS_FORCE: "1", TS_WINDOW: "6,7 02:00-06:00", TS_WINDOW_TEXT: "workspace.rollout.window: sunday, saturday 02:00-06:00 server time" });
    expect(envOf(guardOf(after, "bob")).TS_FORCE).toBe("0");
    for (const w of workspaces(res)) expect(byName(after, w.inputs.name).inputs).toEqual(w.inputs);
  });
});

describe("adding and removing users", () => {
  test("frank joining changes no input of any existing user's container", async () => {
    const before = (await runProgram(stackRaw("prod"))).resources;
    const after = (await runProgram(withFrank(stackRaw("prod")))).resources;
    for (const w of workspaces(before)) expect(byName(after, w.inputs.name).inputs).toEqual(w.inputs);
    const d = diffRuns(before, after);
    expect(d.removed).toEqual([]);
    expect(d.added.every((k) => k.includes("frank"))).toBe(true);
    expect(d.added.some((k) => k.startsWith(`${CONTAINER}::`))).toBe(true);
    // what else changes: only the shared steps every user is in (accounts), never another user's resources
    for (const k of d.changed) expect(k).not.toMatch(/alice|bob|charlie|dave|eve/);
  });

  test("removing charlie leaves the other users' containers untouched", async () => {
    const before = (await runProgram(stackRaw("prod"))).resources;
    const raw = clone(stackRaw("prod"));
    raw.users = raw.users.filter((u: any) => u.name !== "charlie");
    const after = (await runProgram(raw)).resources;
    for (const name of ["workspace-alice", "workspace-bob", "workspace-dave", "workspace-eve"]) expect(byName(after, name).inputs).toEqual(byName(before, name).inputs);
    const d = diffRuns(before, after);
    expect(d.removed.length).toBeGreaterThan(0);
    expect(d.removed.every((k) => k.includes("charlie"))).toBe(true);
  });
});
