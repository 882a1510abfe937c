/**
 * renderGuacamoleSql against a real PostgreSQL (Debian's, a private cluster on a unix socket in a scratch dir).
 *
 * NOT the real Guacamole schema: it is printed by the guacamole image's initdb.sh, which cannot be pulled here, and no
 * artifact on the package registries this machine reaches carries it (Maven Central has guacamole-common and
 * guacamole-ext only, not the JDBC modules). STAND_IN_SCHEMA below has the tables, columns, types, keys and
 * cascades the provisioning SQL touches, as Guacamole's manual (the JDBC schema reference) describes them; the
 * rest of the real schema is not exercised. What this proves: the SQL runs in one transaction with ON_ERROR_STOP,
 * a second apply changes no row, the stored hash is SHA-256(password || UPPER(hex(salt))) as PostgreSQL itself
 * computes it, each user reads only their own workspace's connection (admins all, with ADMINISTER), the default
 * guacadmin is gone, a stray permission is removed, and a removed user is disabled with their connection deleted.
 */
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { GuacamoleUser, renderGuacamoleSql } from "../../components/render/guacamole";
import { runScript, Scratch } from "../helpers/host";

jest.setTimeout(5 * 60_000);

const STAND_IN_SCHEMA = `
CREATE TYPE guacamole_entity_type AS ENUM ('USER', 'USER_GROUP');
CREATE TYPE guacamole_object_permission_type AS ENUM ('READ', 'UPDATE', 'DELETE', 'ADMINISTER');
CREATE TYPE guacamole_system_permission_type AS ENUM ('CREATE_CONNECTION', 'CREATE_CONNECTION_GROUP', 'CREATE_SHARING_PROFILE', 'CREATE_USER', 'CREATE_USER_GROUP', 'AUDIT', 'ADMINISTER');
CREATE TABLE guacamole_entity (entity_id serial PRIMARY KEY, name varchar(128) NOT NULL, type guacamole_entity_type NOT NULL, UNIQUE (type, name));
CREATE TABLE guacamole_user (
  user_id serial PRIMARY KEY, entity_id integer NOT NULL UNIQUE REFERENCES guacamole_entity ON DELETE CASCADE,
  password_hash bytea NOT NULL, password_salt bytea, password_date timestamptz NOT NULL,
  disabled boolean NOT NULL DEFAULT false, expired boolean NOT NULL DEFAULT false,
  full_name varchar(256), email_address varchar(256), organization varchar(256), organizational_role varchar(256));
CREATE TABLE guacamole_connection (connection_id serial PRIMARY KEY, connection_name varchar(128) NOT NULL, parent_id integer, protocol varchar(32) NOT NULL, UNIQUE (connection_name, parent_id));
CREATE TABLE guacamole_connection_parameter (connection_id integer NOT NULL REFERENCES guacamole_connection ON DELETE CASCADE, parameter_name varchar(128) NOT NULL, parameter_value varchar(4096) NOT NULL, PRIMARY KEY (connection_id, parameter_name));
CREATE TABLE guacamole_connection_permission (entity_id integer NOT NULL REFERENCES guacamole_entity ON DELETE CASCADE, connection_id integer NOT NULL REFERENCES guacamole_connection ON DELETE CASCADE, permission guacamole_object_permission_type NOT NULL, PRIMARY KEY (entity_id, connection_id, permission));
CREATE TABLE guacamole_system_permission (entity_id integer NOT NULL REFERENCES guacamole_entity ON DELETE CASCADE, permission guacamole_system_permission_type NOT NULL, PRIMARY KEY (entity_id, permission));
-- the default administrator every fresh schema has (its published password)
INSERT INTO guacamole_entity (name, type) VALUES ('guacadmin', 'USER');
INSERT INTO guacamole_user (entity_id, password_hash, password_salt, password_date) SELECT entity_id, '\\x00', '\\x00', now() FROM guacamole_entity WHERE name = 'guacadmin';
INSERT INTO guacamole_system_permission SELECT entity_id, 'ADMINISTER' FROM guacamole_entity WHERE name = 'guacadmin';
`;

const user = (name: string, admin = false): GuacamoleUser => ({
  name,
  email: `${name}@example.com`,
  admin,
  container: `workspace-${name}`,
  password: `pw-${name}-${"x".repeat(16)}`,
  saltHex: Buffer.from(name.padEnd(32, "#")).toString("hex"),
  vncPassword: `${name}9999`.slice(0, 8),
});

describe("renderGuacamoleSql in a real PostgreSQL (stand-in schema)", () => {
  const scratch = new Scratch("ts-guac-sql-");
  let bin: string;
  let sock: string;
  const psql = (sql: string, args: string[] = []) => {
    const r = spawnSync("runuser", ["-u", "postgres", "--", path.join(bin, "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", sock, "-p", "5432", "-d", "postgres", ...args], {
      input: sql,
      encoding: "utf8",
    });
    if (r.status !== 0) throw new Error(`psql failed (${r.status}): ${r.stderr}`);
    return r.stdout;
  };
  /** Apply the SQL in one transaction as host-scripts/guacamole.sh does; the number of rows it changed. */
  const apply = (users: GuacamoleUser[]): number =>
    psql(renderGuacamoleSql(users), ["-1"])
      .split("\n")
      .map((l) => /^(?:INSERT \d+ |UPDATE |DELETE )(\d+)$/.exec(l)?.[1])
      .filter((n): n is string => n !== undefined)
      .reduce((s, n) => s + Number(n), 0);
  const q = (sql: string): string[] => psql(sql, ["-tA"]).split("\n").filter(Boolean);
  /** user e-mail → connection names it may READ. */
  const reads = (): Record<string, string[]> => {
    const out: Record<string, string[]> = {};
    for (const l of q(`SELECT e.name, c.connection_name FROM guacamole_connection_permission p JOIN guacamole_entity e USING (entity_id) JOIN guacamole_connection c USING (connection_id) WHERE p.permission = 'READ' ORDER BY 1, 2`)) {
      const [who, conn] = l.split("|");
      (out[who] ??= []).push(conn);
    }
    return out;
  };

  beforeAll(() => {
    const versions = fs.existsSync("/usr/lib/postgresql") ? fs.readdirSync("/usr/lib/postgresql").filter((v) => fs.existsSync(`/usr/lib/postgresql/${v}/bin/initdb`)) : [];
    if (versions.length === 0) throw new Error("no PostgreSQL server here: install Debian's postgresql (tests/run.sh does)");
    bin = `/usr/lib/postgresql/${versions.sort((a, b) => Number(b) - Number(a))[0]}/bin`;
    fs.chmodSync(scratch.dir, 0o711);
    const data = path.join(scratch.dir, "pgdata");
    sock = path.join(scratch.dir, "sock");
    for (const d of [data, sock]) {
      fs.mkdirSync(d);
      fs.chownSync(d, Number(q0("id", ["-u", "postgres"])), Number(q0("id", ["-g", "postgres"])));
    }
    run("runuser", ["-u", "postgres", "--", path.join(bin, "initdb"), "-A", "trust", "-U", "postgres", "-D", data]);
    run("runuser", ["-u", "postgres", "--", path.join(bin, "pg_ctl"), "-D", data, "-w", "-l", path.join(sock, "log"), "-o", `-c listen_addresses='' -c unix_socket_directories='${sock}' -p 5432`, "start"]);
    scratch.onCleanup(() => void spawnSync("runuser", ["-u", "postgres", "--", path.join(bin, "pg_ctl"), "-D", data, "-w", "-m", "fast", "stop"]));
    psql(STAND_IN_SCHEMA);
  });
  afterAll(() => scratch.cleanup());

  describe("host-scripts/guacamole.sh (its docker calls answered by a stand-in on PATH: exec → this cluster)", () => {
    let env: Record<string, string>;
    const files = () => path.join(scratch.dir, "files");
    const write = (users: GuacamoleUser[]) => fs.writeFileSync(path.join(files(), "provision.sql"), renderGuacamoleSql(users));
    beforeAll(() => {
      psql("CREATE ROLE guacamole LOGIN; CREATE DATABASE guacamole OWNER guacamole;");
      const binDir = path.join(scratch.dir, "bin");
      fs.mkdirSync(binDir);
      fs.mkdirSync(files());
      fs.writeFileSync(path.join(scratch.dir, "schema.sql"), STAND_IN_SCHEMA);
      // `docker exec [-i] <container> pg_isready|psql ARGS` runs against the scratch cluster as the server's would;
      // `docker run ... initdb.sh --postgresql` prints the stand-in schema (the real one comes from the image)
      fs.writeFileSync(
        path.join(binDir, "docker"),
        `#!/bin/bash
set -euo pipefail
echo "docker $*" >>"${scratch.dir}/docker.calls"
case "$1" in
  exec) shift; [[ $1 == -i ]] && shift; shift; cmd=$1; shift
    exec runuser -u postgres -- "${bin}/$cmd" -h "${sock}" -p 5432 "$@" ;;
  run) [[ " $* " == *" --entrypoint /opt/guacamole/bin/initdb.sh "*" --postgresql "* ]] || exit 99; cat "${scratch.dir}/schema.sql" ;;
  *) exit 98 ;;
esac
`,
        { mode: 0o755 },
      );
      env = {
        PATH: `${binDir}:${process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin"}`,
        TS_SCRIPT_NAME: "guacamole",
        TS_FILES_DIR: files(),
        TS_DB_CONTAINER: "guacamole-db",
        TS_DB_NAME: "guacamole",
        TS_DB_USER: "guacamole",
        TS_WEB_IMAGE: "guacamole/guacamole:1.6.0",
      };
    });

    test("apply: loads the schema into the empty database once, provisions; the second apply changes nothing", () => {
      write([alice, bob, carol]);
      const first = runScript("guacamole", "apply", env);
      expect({ status: first.status, schema: first.results.schema, stderr: first.status ? first.stderr : "" }).toEqual({ status: 0, schema: "created", stderr: "" });
      expect(Number(first.results.rows)).toBeGreaterThan(0);
      expect(first.changes).toBe(2);
      const second = runScript("guacamole", "apply", env);
      expect({ status: second.status, schema: second.results.schema, rows: second.results.rows, changes: second.changes }).toEqual({ status: 0, schema: "present", rows: "0", changes: 0 });
      expect(fs.readFileSync(path.join(scratch.dir, "docker.calls"), "utf8").match(/^docker run /gm)).toHaveLength(1);
    });

    test("check: no drift when the rows are as config says; drift (and nothing written) when they are not", () => {
      expect(runScript("guacamole", "check", env).results).toMatchObject({ "drift.schema": "no", "drift.provision": "no" });
      write([alice, carol]);
      expect(runScript("guacamole", "check", env).results).toMatchObject({ "drift.schema": "no", "drift.provision": "yes" });
      // the check rolled back: bob is still enabled
      expect(psql("SELECT u.disabled FROM guacamole_user u JOIN guacamole_entity e USING (entity_id) WHERE e.name = 'bob@example.com'", ["-tA", "-d", "guacamole"]).trim()).toBe("f");
    });

    test("a failing statement fails the step and changes nothing (one transaction)", () => {
      fs.writeFileSync(path.join(files(), "provision.sql"), renderGuacamoleSql([alice, carol]) + "SELECT no_such_function();\n");
      const r = runScript("guacamole", "apply", env);
      expect(r.status).not.toBe(0);
      expect(psql("SELECT u.disabled FROM guacamole_user u JOIN guacamole_entity e USING (entity_id) WHERE e.name = 'bob@example.com'", ["-tA", "-d", "guacamole"]).trim()).toBe("f");
    });

    test("destroy keeps the database", () => {
      const r = runScript("guacamole", "destroy", env);
      expect(r.status).toBe(0);
      expect(psql("SELECT count(*) FROM guacamole_user", ["-tA", "-d", "guacamole"]).trim()).toBe("3");
    });
  });

  const alice = user("alice", true), bob = user("bob"), carol = user("carol");

  test("first apply provisions; a second apply changes no row", () => {
    expect(apply([alice, bob, carol])).toBeGreaterThan(0);
    expect(apply([alice, bob, carol])).toBe(0);
    expect(apply([carol, alice, bob])).toBe(0);
  });

  test("the default guacadmin is gone; the hash is SHA-256(password || UPPER(hex(salt))) as PostgreSQL computes it", () => {
    expect(q("SELECT count(*) FROM guacamole_entity WHERE name = 'guacadmin'")).toEqual(["0"]);
    for (const u of [alice, bob, carol]) {
      expect(
        q(`SELECT password_hash = sha256(convert_to(${"'" + u.password + "'"} || upper(encode(password_salt, 'hex')), 'UTF8')) FROM guacamole_user JOIN guacamole_entity USING (entity_id) WHERE name = '${u.email}'`),
      ).toEqual(["t"]);
    }
  });

  test("each user reads only their own workspace's connection; admins read all and hold ADMINISTER", () => {
    expect(reads()).toEqual({
      "alice@example.com": ["desktop-alice", "desktop-bob", "desktop-carol"],
      "bob@example.com": ["desktop-bob"],
      "carol@example.com": ["desktop-carol"],
    });
    expect(q("SELECT c.connection_name, p.parameter_value FROM guacamole_connection_parameter p JOIN guacamole_connection c USING (connection_id) WHERE parameter_name = 'hostname' ORDER BY 1")).toEqual([
      "desktop-alice|workspace-alice",
      "desktop-bob|workspace-bob",
      "desktop-carol|workspace-carol",
    ]);
    expect(q("SELECT e.name FROM guacamole_system_permission JOIN guacamole_entity e USING (entity_id) WHERE permission = 'ADMINISTER'")).toEqual(["alice@example.com"]);
  });

  test("a permission granted by hand on a managed connection, and a changed parameter, are put back", () => {
    psql(`INSERT INTO guacamole_connection_permission SELECT e.entity_id, c.connection_id, 'READ' FROM guacamole_entity e, guacamole_connection c WHERE e.name = 'bob@example.com' AND c.connection_name = 'desktop-carol';
          UPDATE guacamole_connection_parameter SET parameter_value = 'workspace-bob' WHERE parameter_name = 'hostname' AND connection_id = (SELECT connection_id FROM guacamole_connection WHERE connection_name = 'desktop-carol');`);
    expect(apply([alice, bob, carol])).toBe(2);
    expect(reads()["bob@example.com"]).toEqual(["desktop-bob"]);
    expect(q("SELECT parameter_value FROM guacamole_connection_parameter JOIN guacamole_connection USING (connection_id) WHERE connection_name = 'desktop-carol' AND parameter_name = 'hostname'")).toEqual(["workspace-carol"]);
  });

  test("removing a user disables the account and deletes their connection; an account made in the UI is left alone", () => {
    psql(`INSERT INTO guacamole_entity (name, type) VALUES ('visitor@example.com', 'USER');
          INSERT INTO guacamole_user (entity_id, password_hash, password_date) SELECT entity_id, '\\x01', now() FROM guacamole_entity WHERE name = 'visitor@example.com';`);
    expect(apply([alice, carol])).toBeGreaterThan(0);
    expect(q("SELECT e.name, u.disabled FROM guacamole_user u JOIN guacamole_entity e USING (entity_id) ORDER BY 1")).toEqual([
      "alice@example.com|f",
      "bob@example.com|t",
      "carol@example.com|f",
      "visitor@example.com|f",
    ]);
    expect(q("SELECT connection_name FROM guacamole_connection ORDER BY 1")).toEqual(["desktop-alice", "desktop-carol"]);
    expect(reads()["bob@example.com"]).toBeUndefined();
    expect(apply([alice, carol])).toBe(0);
    // and back: bob's account is enabled again with a new connection
    expect(apply([alice, bob, carol])).toBeGreaterThan(0);
    expect(reads()["bob@example.com"]).toEqual(["desktop-bob"]);
    expect(apply([alice, bob, carol])).toBe(0);
  });
});

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed: ${r.stderr}${r.stdout}`);
  return r.stdout;
}
function q0(cmd: string, args: string[]): string {
  return run(cmd, args).trim();
}
