/**
 * Apache Guacamole, the browser desktop at `remote.<domain>`: pure renderers for components/guacamole.ts.
 *
 *   - who is who: a Guacamole user per train-server user, named by the user's e-mail (what Cloudflare Access puts
 *     in GUACAMOLE_IDENTITY_HEADER), with a generated database password for the LAN path (no Access there);
 *   - one VNC connection per user (`desktop-<user>`) to that user's own workspace container only, READ for its
 *     owner and the admins; admins also get the system ADMINISTER permission;
 *   - the SQL that provisions all of it into Guacamole's PostgreSQL schema (the guacamole image's
 *     `initdb.sh --postgresql`), idempotent: a second apply changes no row; a removed user's account is disabled
 *     and their connection deleted (Guacamole holds no user data: homes and workspaces are untouched);
 *   - guacamole.properties (the database password is in it, never in the container's environment).
 *
 * Pure: no Pulumi, no I/O.
 */
import * as crypto from "crypto";
import { WORKSPACE_PORTS } from "./workspace-image";

/** VncAuth uses at most 8 characters of a password: the generated VNC passwords are exactly this long. */
export const VNC_PASSWORD_LENGTH = 8;

/** Containers and ports. */
export const GUACAMOLE_CONTAINERS = { guacd: "guacd", web: "guacamole", db: "guacamole-db" } as const;
export const GUACAMOLE_PORTS = { guacd: 4822, web: 8080, db: 5432 } as const;

/**
 * Networks. The web app and its database are on GUACAMOLE_NETWORK (internal: no way out), which Traefik joins and
 * no workspace does; guacd is on GUACD_NETWORK with the web app (internal too) and on the services network, where it
 * reaches the workspaces' VNC port. So a workspace reaches guacd (an unauthenticated proxy that can only open
 * what its peer names, i.e. what the workspace could already open itself on the services network) but never the
 * web app's port or the database; guacd cannot reach the database either.
 */
export const GUACAMOLE_NETWORK = "train-server-guacamole";
export const GUACD_NETWORK = "train-server-guacd";

/** The header Cloudflare Access sets to the signed-in user's e-mail; Traefik's LAN routers remove it. */
export const GUACAMOLE_IDENTITY_HEADER = "Cf-Access-Authenticated-User-Email";

/** Database name and role (the role's password is generated: GuacamoleSecrets). */
export const GUACAMOLE_DB = { name: "guacamole", user: "guacamole" } as const;

/** Where the guacamole.properties template is uploaded in the web container (GUACAMOLE_HOME). */
export const GUACAMOLE_HOME = "/etc/guacamole";

/** Marks the accounts this program manages (guacamole_user.organization): others (made in the UI) are left alone. */
export const GUACAMOLE_ORGANIZATION = "train-server";

/** Prefix of the managed connections' names. */
export const CONNECTION_PREFIX = "desktop-";

/** The parameters of one user's VNC connection: their own workspace container, its VNC port, its password. */
export function guacamoleConnectionParams(p: { container: string; password: string }): Record<string, string> {
  return { hostname: p.container, port: String(WORKSPACE_PORTS.vnc), password: p.password };
}

/**
 * Guacamole's JDBC password hash (SHA256PasswordEncryptionService): SHA-256 of the UTF-8 bytes of the password
 * followed by the salt written as UPPERCASE hex. Returns the hash as lowercase hex (for decode(…, 'hex')).
 */
export function guacamolePasswordHash(password: string, saltHex: string): string {
  if (!/^[0-9a-fA-F]{2,}$/.test(saltHex) || saltHex.length % 2 !== 0) throw new Error("guacamolePasswordHash: the salt must be hex bytes");
  return crypto.createHash("sha256").update(password + saltHex.toUpperCase(), "utf8").digest("hex");
}

/** One managed Guacamole user. */
export interface GuacamoleUser {
  /** The train-server login (the connection is `desktop-<name>`, to `workspace-<name>`). */
  name: string;
  /** The Guacamole username: the e-mail Access signs in (lowercase). */
  email: string;
  admin: boolean;
  /** The workspace container this user's connection opens. */
  container: string;
  /** Database login for the LAN path. */
  password: string;
  /** 32 random bytes as hex (generated once: a constant salt keeps the apply idempotent). */
  saltHex: string;
  /** The workspace's VNC password. */
  vncPassword: string;
}

const NAME = /^[a-z_][a-z0-9_-]{0,31}$/;
const EMAIL = /^[a-z0-9._%+-]+@[a-z0-9.-]+$/;

/** A SQL string literal (standard_conforming_strings, PostgreSQL's default since 9.1). */
export function sqlString(v: string): string {
  if (v.includes("\0")) throw new Error("sqlString: NUL in a value");
  return `'${v.replace(/'/g, "''")}'`;
}

/**
 * The provisioning SQL, one transaction (run with psql -1 -v ON_ERROR_STOP=1). Every statement changes rows only
 * when they differ from what config says, so a second apply updates nothing (the test counts it). Order: remove
 * the schema's default guacadmin/guacadmin account; per user the entity, the account (enabled, hash, organization),
 * the connection, its exact parameters, its exact permissions; admins' system permissions; then managed accounts
 * no longer in config are disabled and lose every permission, and their connections are deleted.
 */
export function renderGuacamoleSql(users: GuacamoleUser[]): string {
  const seen = new Set<string>();
  for (const u of users) {
    if (!NAME.test(u.name)) throw new Error(`renderGuacamoleSql: "${u.name}" is not a valid login`);
    if (!EMAIL.test(u.email)) throw new Error(`renderGuacamoleSql: ${u.name}: e-mail "${u.email}" must be lowercase ASCII`);
    if (seen.has(u.email)) throw new Error(`renderGuacamoleSql: two users sign in as ${u.email}`);
    seen.add(u.email);
    if (u.container !== `workspace-${u.name}`) throw new Error(`renderGuacamoleSql: ${u.name}'s connection must open their own workspace, not ${u.container}`);
    // VncAuth uses the first VNC_PASSWORD_LENGTH characters on both sides; the generated ones are exactly that long
    if (!/^[\x21-\x7e]+$/.test(u.vncPassword)) throw new Error(`renderGuacamoleSql: ${u.name}'s VNC password must be printable ASCII without spaces`);
    if (!/^[0-9a-f]{64}$/.test(u.saltHex)) throw new Error(`renderGuacamoleSql: ${u.name}'s salt must be 32 bytes of lowercase hex`);
    if (u.password.length < 16) throw new Error(`renderGuacamoleSql: ${u.name}'s password must be at least 16 characters`);
  }
  const sorted = [...users].sort((a, b) => a.name.localeCompare(b.name));
  const q = sqlString;
  const entity = (email: string) => `(SELECT entity_id FROM guacamole_entity WHERE type = 'USER' AND name = ${q(email)})`;
  const conn = (name: string) => `(SELECT connection_id FROM guacamole_connection WHERE connection_name = ${q(CONNECTION_PREFIX + name)} AND parent_id IS NULL)`;
  const out: string[] = [
    "-- generated by train-server (components/render/guacamole.ts): do not edit, every apply rewrites the managed rows",
    "SET client_min_messages = warning;",
    // the schema's default administrator has a published password: it must never exist here
    "DELETE FROM guacamole_entity WHERE type = 'USER' AND name = 'guacadmin';",
  ];
  for (const u of sorted) {
    const hash = guacamolePasswordHash(u.password, u.saltHex);
    out.push(
      `-- ${u.name}`,
      `INSERT INTO guacamole_entity (name, type) VALUES (${q(u.email)}, 'USER') ON CONFLICT (type, name) DO NOTHING;`,
      `INSERT INTO guacamole_user (entity_id, password_hash, password_salt, password_date, disabled, full_name, organization)` +
        ` SELECT ${entity(u.email)}, decode(${q(hash)}, 'hex'), decode(${q(u.saltHex)}, 'hex'), now(), false, ${q(u.name)}, ${q(GUACAMOLE_ORGANIZATION)}` +
        ` ON CONFLICT (entity_id) DO UPDATE SET password_hash = EXCLUDED.password_hash, password_salt = EXCLUDED.password_salt, password_date = EXCLUDED.password_date,` +
        ` disabled = false, full_name = EXCLUDED.full_name, organization = EXCLUDED.organization` +
        ` WHERE (guacamole_user.password_hash, guacamole_user.password_salt, guacamole_user.disabled, guacamole_user.full_name, guacamole_user.organization)` +
        ` IS DISTINCT FROM (EXCLUDED.password_hash, EXCLUDED.password_salt, false, EXCLUDED.full_name, EXCLUDED.organization);`,
      `INSERT INTO guacamole_connection (connection_name, parent_id, protocol) SELECT ${q(CONNECTION_PREFIX + u.name)}, NULL, 'vnc'` +
        ` WHERE NOT EXISTS (SELECT 1 FROM guacamole_connection WHERE connection_name = ${q(CONNECTION_PREFIX + u.name)} AND parent_id IS NULL);`,
      `UPDATE guacamole_connection SET protocol = 'vnc' WHERE connection_id = ${conn(u.name)} AND protocol <> 'vnc';`,
    );
    const params = guacamoleConnectionParams({ container: u.container, password: u.vncPassword });
    const names = Object.keys(params).sort();
    for (const k of names) {
      out.push(
        `INSERT INTO guacamole_connection_parameter (connection_id, parameter_name, parameter_value) VALUES (${conn(u.name)}, ${q(k)}, ${q(params[k])})` +
          ` ON CONFLICT (connection_id, parameter_name) DO UPDATE SET parameter_value = EXCLUDED.parameter_value` +
          ` WHERE guacamole_connection_parameter.parameter_value IS DISTINCT FROM EXCLUDED.parameter_value;`,
      );
    }
    out.push(`DELETE FROM guacamole_connection_parameter WHERE connection_id = ${conn(u.name)} AND parameter_name NOT IN (${names.map(q).join(", ")});`);
    // exactly READ, for the owner and the admins: nobody else, no other permission (whatever the UI did)
    const readers = [...new Set([u.email, ...sorted.filter((x) => x.admin).map((x) => x.email)])].sort();
    for (const r of readers) {
      out.push(
        `INSERT INTO guacamole_connection_permission (entity_id, connection_id, permission) VALUES (${entity(r)}, ${conn(u.name)}, 'READ') ON CONFLICT DO NOTHING;`,
      );
    }
    out.push(
      `DELETE FROM guacamole_connection_permission WHERE connection_id = ${conn(u.name)}` +
        ` AND (permission <> 'READ' OR entity_id NOT IN (SELECT entity_id FROM guacamole_entity WHERE type = 'USER' AND name IN (${readers.map(q).join(", ")})));`,
    );
  }
  const managed = sorted.map((u) => q(u.email));
  const managedList = managed.length ? managed.join(", ") : "NULL";
  const adminEmails = sorted.filter((u) => u.admin).map((u) => u.email);
  const admins = adminEmails.map(q);
  out.push("-- admins: the system ADMINISTER permission; managed non-admins have no system permission");
  for (const a of adminEmails) {
    out.push(`INSERT INTO guacamole_system_permission (entity_id, permission) VALUES (${entity(a)}, 'ADMINISTER') ON CONFLICT DO NOTHING;`);
  }
  const managedEntities = `SELECT u.entity_id FROM guacamole_user u WHERE u.organization = ${q(GUACAMOLE_ORGANIZATION)}`;
  out.push(
    `DELETE FROM guacamole_system_permission WHERE entity_id IN (${managedEntities})` +
      ` AND entity_id NOT IN (SELECT entity_id FROM guacamole_entity WHERE type = 'USER' AND name IN (${admins.length ? admins.join(", ") : "NULL"}));`,
    "-- users removed from config: account disabled, no permission left, their connection deleted",
    `CREATE TEMP TABLE ts_removed ON COMMIT DROP AS SELECT u.entity_id, u.full_name FROM guacamole_user u JOIN guacamole_entity e USING (entity_id)` +
      ` WHERE u.organization = ${q(GUACAMOLE_ORGANIZATION)} AND e.name NOT IN (${managedList});`,
    "UPDATE guacamole_user SET disabled = true WHERE entity_id IN (SELECT entity_id FROM ts_removed) AND NOT disabled;",
    "DELETE FROM guacamole_system_permission WHERE entity_id IN (SELECT entity_id FROM ts_removed);",
    "DELETE FROM guacamole_connection_permission WHERE entity_id IN (SELECT entity_id FROM ts_removed);",
    `DELETE FROM guacamole_connection WHERE parent_id IS NULL AND connection_name IN (SELECT ${q(CONNECTION_PREFIX)} || full_name FROM ts_removed)` +
      ` AND connection_name NOT IN (${sorted.length ? sorted.map((u) => q(CONNECTION_PREFIX + u.name)).join(", ") : "NULL"});`,
  );
  return out.join("\n") + "\n";
}

/**
 * guacamole.properties for the web container (uploaded to GUACAMOLE_HOME, 0400, owned by the image's guacamole
 * user): the database connection with its password, header authentication by GUACAMOLE_IDENTITY_HEADER, and
 * `postgresql-user-required` so that a header-authenticated name with no account here gets nothing.
 */
export function renderGuacamoleProperties(p: { dbPassword: string }): string {
  if (/[\r\n]/.test(p.dbPassword)) throw new Error("renderGuacamoleProperties: the database password must be one line");
  return [
    "# generated by train-server (components/render/guacamole.ts)",
    `guacd-hostname: ${GUACAMOLE_CONTAINERS.guacd}`,
    `guacd-port: ${GUACAMOLE_PORTS.guacd}`,
    `postgresql-hostname: ${GUACAMOLE_CONTAINERS.db}`,
    `postgresql-port: ${GUACAMOLE_PORTS.db}`,
    `postgresql-database: ${GUACAMOLE_DB.name}`,
    `postgresql-username: ${GUACAMOLE_DB.user}`,
    `postgresql-password: ${p.dbPassword}`,
    "postgresql-user-required: true",
    "postgresql-auto-create-accounts: false",
    `http-auth-header: ${GUACAMOLE_IDENTITY_HEADER}`,
    "",
  ].join("\n");
}

/** The web container's environment (no secret: the password is in the uploaded properties). */
export function guacamoleWebEnv(): Record<string, string> {
  return {
    GUACAMOLE_HOME,
    // the image turns on the extensions it has for these prefixes; their settings come from guacamole.properties
    POSTGRESQL_ENABLED: "true",
    HEADER_ENABLED: "true",
    // served at / of remote.<domain>, not /guacamole/
    WEBAPP_CONTEXT: "ROOT",
  };
}
