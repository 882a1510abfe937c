/**
 * The browser desktop (Guacamole) under mocks and its pure renderers: the password hash, the provisioning SQL
 * (each user's connection opens only their own workspace; readers are the owner and the admins), the route behind
 * Access with the identity header removed on the LAN, the networks no workspace joins, and the secrets.
 */
import { parseConfig } from "../../components/config";
import {
  CONNECTION_PREFIX,
  GUACAMOLE_IDENTITY_HEADER,
  GUACAMOLE_NETWORK,
  GUACD_NETWORK,
  guacamoleConnectionParams,
  guacamolePasswordHash,
  GuacamoleUser,
  renderGuacamoleProperties,
  renderGuacamoleSql,
  VNC_PASSWORD_LENGTH,
} from "../../components/render/guacamole";
import { SERVICES_NETWORK } from "../../components/render/services";
import { WORKSPACE_PORTS, WORKSPACE_VNC_PASSWORD_FILE, workspaceMounts } from "../../components/render/workspace-image";
import { audienceEmails, buildRoutes } from "../../components/routes";
import { Registered } from "../../tools/harness";
import { clone, runProgram, stackRaw } from "../helpers/program";

const CONTAINER = "docker:index/container:Container";
const SALT = "ab".repeat(32);
const user = (name: string, admin = false): GuacamoleUser => ({
  name,
  email: `${name}@example.com`,
  admin,
  container: `workspace-${name}`,
  password: `pw-${name}-0123456789abcdef`,
  saltHex: SALT,
  vncPassword: `v${name}1234`.slice(0, VNC_PASSWORD_LENGTH),
});

describe("guacamolePasswordHash", () => {
  test("SHA-256 of the password followed by the salt in uppercase hex: the schema's documented guacadmin row", () => {
    // Guacamole's 002-create-admin-user.sql: password "guacadmin", salt FE24…2264, hash CA45…1960
    const salt = "fe24adc5e11e2b25288d1704abe67a79e342ecc26064ce69c5b3177795a82264";
    expect(guacamolePasswordHash("guacadmin", salt)).toBe("ca458a7d494e3be824f5e1e175a1556c0f8eef2c2d7df3633bec4a29c4411960");
    // the salt's case in the input does not matter: it is hashed uppercase
    expect(guacamolePasswordHash("guacadmin", salt.toUpperCase())).toBe(guacamolePasswordHash("guacadmin", salt));
    expect(() => guacamolePasswordHash("x", "xyz")).toThrow(/hex/);
  });
});

describe("renderGuacamoleSql", () => {
  const users = [user("bob"), user("alice", true), user("carol")];
  const sql = renderGuacamoleSql(users);

  test("each user's connection opens their own workspace's VNC port, and nothing else", () => {
    for (const u of users) {
      const p = guacamoleConnectionParams({ container: u.container, password: u.vncPassword });
      expect(p).toEqual({ hostname: `workspace-${u.name}`, port: String(WORKSPACE_PORTS.vnc), password: u.vncPassword });
      expect(sql).toContain(`'hostname', 'workspace-${u.name}'`);
    }
    expect(sql.match(/'hostname', 'workspace-[a-z]+'/g)).toHaveLength(users.length);
    expect(() => renderGuacamoleSql([{ ...user("bob"), container: "workspace-alice" }])).toThrow(/own workspace/);
  });

  test("READ on a connection for its owner and the admins only; ADMINISTER for admins; stray permissions removed", () => {
    const readers = (name: string) =>
      [...sql.matchAll(new RegExp(`entity_id FROM guacamole_entity WHERE type = 'USER' AND name = '([^']+)'\\), \\(SELECT connection_id FROM guacamole_connection WHERE connection_name = '${CONNECTION_PREFIX}${name}'`, "g"))].map((m) => m[1]).sort();
    expect(readers("bob")).toEqual(["alice@example.com", "bob@example.com"]);
    expect(readers("carol")).toEqual(["alice@example.com", "carol@example.com"]);
    expect(readers("alice")).toEqual(["alice@example.com"]);
    expect(sql.match(/'ADMINISTER'\) ON CONFLICT/g)).toHaveLength(1);
    expect(sql).toContain(`name = 'alice@example.com'), 'ADMINISTER'`);
    expect(sql).toMatch(/DELETE FROM guacamole_connection_permission WHERE connection_id = .*desktop-bob.*permission <> 'READ' OR entity_id NOT IN .*'alice@example.com', 'bob@example.com'/);
  });

  test("the schema's default guacadmin account is deleted; the password is stored as its hash only", () => {
    expect(sql).toContain("DELETE FROM guacamole_entity WHERE type = 'USER' AND name = 'guacadmin';");
    for (const u of users) {
      expect(sql).not.toContain(u.password);
      expect(sql).toContain(guacamolePasswordHash(u.password, u.saltHex));
    }
  });

  test("removed users: managed accounts not in config are disabled, lose every permission and their connection", () => {
    expect(sql).toMatch(/CREATE TEMP TABLE ts_removed .* WHERE u\.organization = 'train-server' AND e\.name NOT IN \('alice@example.com', 'bob@example.com', 'carol@example.com'\)/);
    expect(sql).toContain("UPDATE guacamole_user SET disabled = true WHERE entity_id IN (SELECT entity_id FROM ts_removed) AND NOT disabled;");
    expect(sql).not.toMatch(/DELETE FROM guacamole_entity WHERE .*ts_removed/);
    // with no user left, every managed account is disabled (NOT IN (NULL) would match nothing: the list is never empty SQL)
    expect(renderGuacamoleSql([])).toContain("e.name NOT IN (NULL)");
  });

  test("deterministic and independent of list order; updates only rows that differ", () => {
    expect(renderGuacamoleSql([...users].reverse())).toBe(sql);
    expect(sql).toMatch(/ON CONFLICT \(entity_id\) DO UPDATE SET .* WHERE \(guacamole_user\.password_hash.*\) IS DISTINCT FROM/);
    expect(sql).toMatch(/ON CONFLICT \(connection_id, parameter_name\) DO UPDATE SET parameter_value = EXCLUDED\.parameter_value WHERE .* IS DISTINCT FROM/);
  });

  test("refuses what it cannot write safely, naming the user", () => {
    expect(() => renderGuacamoleSql([user("bob"), { ...user("bob2"), email: "bob@example.com" }])).toThrow(/two users sign in as bob@example.com/);
    expect(() => renderGuacamoleSql([{ ...user("bob"), email: "Bob@Example.com" }])).toThrow(/bob: e-mail/);
    expect(() => renderGuacamoleSql([{ ...user("bob"), vncPassword: "a b" }])).toThrow(/bob's VNC password/);
    expect(() => renderGuacamoleSql([{ ...user("bob"), saltHex: "00" }])).toThrow(/bob's salt/);
    expect(() => renderGuacamoleSql([{ ...user("bob"), password: "short" }])).toThrow(/bob's password/);
  });

  test("values are SQL-quoted", () => {
    const s = renderGuacamoleSql([{ ...user("bob"), vncPassword: "a'b;--x" }]);
    expect(s).toContain("'password', 'a''b;--x'");
  });
});

describe("guacamole.properties", () => {
  test("database, header authentication by the Access e-mail header, accounts required", () => {
    const p = renderGuacamoleProperties({ dbPassword: "s3cret" });
    expect(p).toContain("postgresql-password: s3cret\n");
    expect(p).toContain(`http-auth-header: ${GUACAMOLE_IDENTITY_HEADER}\n`);
    expect(p).toContain("postgresql-user-required: true\n");
    expect(() => renderGuacamoleProperties({ dbPassword: "a\nb" })).toThrow(/one line/);
  });
});

describe("the workspace side of the contract", () => {
  test("the VNC password file is mounted read-only when given as a host file", () => {
    const m = workspaceMounts({ user: "alice", home: "/h", scratch: "/s", state: "/st", cacheRoot: "/c", vncPasswordFile: "/etc/vnc-alice" });
    expect(m).toContainEqual({ source: "/etc/vnc-alice", target: WORKSPACE_VNC_PASSWORD_FILE, readOnly: true });
    expect(WORKSPACE_PORTS.vnc).toBe(5901);
  });
});

describe("Guacamole in the prod stack", () => {
  let res: Registered[];
  let outputs: any;
  const byName = (name: string): Registered => {
    const r = res.find((x) => x.type === CONTAINER && x.inputs.name === name);
    if (!r) throw new Error(`no container ${name}`);
    return r;
  };
  const networks = (r: Registered): string[] => (r.inputs.networksAdvanced ?? []).map((n: any) => n.name).sort();
  beforeAll(async () => {
    const run = await runProgram(stackRaw("prod"));
    res = run.resources;
    outputs = run.outputs;
  });

  test("the route remote.<domain> is behind Access for the team, on the tunnel and the LAN; the LAN removes the identity header", () => {
    const config = parseConfig(stackRaw("prod"));
    const route = buildRoutes(config).find((r) => r.id === "guacamole")!;
    expect(route).toMatchObject({ hostname: "remote.example.com", container: "guacamole", port: 8080, audience: { kind: "team" } });
    expect(outputs.accessTable.guacamole).toMatchObject({ hostname: "remote.example.com", backend: "guacamole:8080", audience: "team" });
    expect(audienceEmails(config, route.audience)).toEqual(expect.arrayContaining(config.users.map((u) => u.email)));
    const l = Object.fromEntries(byName("guacamole").inputs.labels.map((x: any) => [x.label, x.value]));
    expect(l["traefik.http.routers.guacamole.entrypoints"]).toBe("tunnel");
    expect(l["traefik.http.routers.guacamole.middlewares"]).toBe("guacamole-tunnel-sources");
    expect(l["traefik.http.routers.guacamole-lan.middlewares"]).toBe("guacamole-strip-identity");
    expect(l[`traefik.http.middlewares.guacamole-strip-identity.headers.customrequestheaders.${GUACAMOLE_IDENTITY_HEADER}`]).toBe("");
    expect(l["traefik.docker.network"]).toBe(GUACAMOLE_NETWORK);
  });

  test("no workspace joins Guacamole's networks; the web app and database are not on the services network; guacd is", () => {
    for (const w of res.filter((r) => r.type === CONTAINER && String(r.inputs.name).startsWith("workspace-"))) {
      expect(networks(w)).toEqual([SERVICES_NETWORK]);
    }
    expect(networks(byName("guacamole"))).toEqual([GUACAMOLE_NETWORK, GUACD_NETWORK].sort());
    expect(networks(byName("guacamole-db"))).toEqual([GUACAMOLE_NETWORK]);
    expect(networks(byName("guacd"))).toEqual([SERVICES_NETWORK, GUACD_NETWORK].sort());
    expect(networks(byName("traefik"))).toEqual([SERVICES_NETWORK, GUACAMOLE_NETWORK].sort());
    const nets = res.filter((r) => r.type === "docker:index/network:Network");
    for (const n of [GUACAMOLE_NETWORK, GUACD_NETWORK]) expect(nets.find((x) => x.inputs.name === n)?.inputs.internal).toBe(true);
  });

  test("secrets: the database password and the SQL are secret inputs, in no environment; VNC passwords are 8 generated characters", () => {
    for (const c of ["guacamole", "guacamole-db", "guacd"]) expect(JSON.stringify(byName(c).inputs.envs ?? [])).not.toMatch(/mock-password/);
    expect(byName("guacamole").secretInputs).toContain("uploads");
    expect(byName("guacamole-db").secretInputs).toContain("uploads");
    const step = res.find((r) => r.type === "command:remote:Command" && r.name === "server-guacamole-provision-apply")!;
    expect(step.secretInputs).toContain("stdin");
    expect(step.inputs.logging).toBe("none");
    const vnc = res.filter((r) => r.type === "random:index/randomPassword:RandomPassword" && r.name.endsWith("-vnc-password"));
    expect(vnc.map((r) => r.name).sort()).toEqual(["alice", "bob", "charlie", "dave", "eve"].map((u) => `server-ws-${u}-vnc-password`));
    for (const r of vnc) expect(r.inputs).toMatchObject({ length: VNC_PASSWORD_LENGTH, special: false });
    for (const w of res.filter((r) => r.type === CONTAINER && String(r.inputs.name).startsWith("workspace-"))) {
      expect(w.inputs.uploads.map((u: any) => [u.file, u.permissions])).toContainEqual([WORKSPACE_VNC_PASSWORD_FILE, "0400"]);
    }
    expect(outputs.users.alice).toMatchObject({ remoteUrl: "https://remote.example.com", remoteLogin: "alice@example.com" });
  });

  test("the provisioning SQL gives every user exactly their own workspace's connection", () => {
    const step = res.find((r) => r.type === "command:remote:Command" && r.name === "server-guacamole-provision-apply")!;
    const stdin = String(step.inputs.stdin);
    for (const u of ["alice", "bob", "charlie", "dave", "eve"]) {
      expect(stdin).toContain(`'${CONNECTION_PREFIX}${u}'`);
      expect(stdin).toContain(`'hostname', 'workspace-${u}'`);
    }
    expect(stdin.match(/'hostname', 'workspace-[a-z]+'/g)).toHaveLength(5);
  });

  test("workspace.guacamole: false makes none of it", async () => {
    const raw = clone(stackRaw("prod"));
    raw.workspace = { ...(raw.workspace ?? {}), guacamole: false };
    const off = (await runProgram(raw)).resources;
    expect(off.filter((r) => r.type === CONTAINER && /^guac/.test(String(r.inputs.name)))).toEqual([]);
    expect(buildRoutes(parseConfig(raw)).some((r) => r.id === "guacamole")).toBe(false);
  });
});
