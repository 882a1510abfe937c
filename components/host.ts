/**
 * Host: the one place that knows how to reach the server and run a host script on it.
 *
 * A `HostScript` ships `host-scripts/<script>.sh` (+ `lib.sh`), its inputs (TS_* environment) and its rendered
 * files to `/var/lib/train-server/steps/<step>/` in ONE ssh session (the bundle travels on stdin, so no secret
 * is ever part of a command line), then runs `script.sh apply`. It re-runs exactly when the bundle changes:
 * the bundle's sha256 is the command's only trigger (the command provider does not re-run on a changed
 * `create`/`environment` alone). Steps whose inputs hold a secret run with output logging off.
 *
 * Destroy is a separate, never-replaced child (`<step>-teardown`) whose delete runs `script.sh destroy` from the
 * copy installed on the host. Keeping it apart means a trigger change (a replacement of the apply command) can
 * never run a destroy; only removing the step from the program (or `pulumi destroy`) does — and the scripts
 * themselves refuse to destroy data unless the stack is a rig.
 */
import * as command from "@pulumi/command";
import * as pulumi from "@pulumi/pulumi";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import type { ServerConfig } from "./config";

export const HOST_SCRIPTS_DIR = path.resolve(__dirname, "..", "host-scripts");
export const STEPS_DIR = "/var/lib/train-server/steps";
export const LOG_DIR = "/var/log/train-server";

export interface HostArgs {
  /** Validated server config (address, ssh user/port). */
  config: ServerConfig;
  /** The admin's SSH private key (a Pulumi secret). */
  privateKey: pulumi.Input<string>;
}

/** The server as an SSH target. Holds the one connection object every remote command uses. */
export class Host extends pulumi.ComponentResource {
  /** SSH connection for `command.remote.*`; built once, so it is identical (and equally secret) for every step. */
  readonly connection: command.types.input.remote.ConnectionArgs;
  /** Prefix that runs a command as root (`sudo -n` unless the ssh user is root). */
  readonly asRoot: string;
  readonly address: string;

  constructor(name: string, args: HostArgs, opts?: pulumi.ComponentResourceOptions) {
    super("train-server:host:Host", name, {}, opts);
    const h = args.config.host;
    this.address = h.address;
    this.asRoot = h.sshUser === "root" ? "" : "sudo -n ";
    this.connection = {
      host: h.address,
      port: h.sshPort,
      user: h.sshUser,
      privateKey: pulumi.secret(args.privateKey),
      // pinned server key: the Go SSH client refuses any other before authenticating or sending the bundle
      ...(h.hostKey !== undefined ? { hostKey: h.hostKey } : {}),
      dialErrorLimit: 10,
      perDialTimeout: 30,
    };
    this.registerOutputs({ address: h.address, sshUser: h.sshUser, sshPort: h.sshPort });
  }
}

/** A value put into a step's environment or files: plain (shown in diffs) or a secret output. */
export type StepValue = string | pulumi.Output<string>;

export interface HostScriptArgs {
  host: Host;
  /** Script name under host-scripts/ without `.sh`. */
  script: string;
  /** TS_* variables the script reads. Any Output value is treated as secret-bearing. */
  env: Record<string, StepValue>;
  /** Rendered files, by name, placed in $TS_FILES_DIR on the host. */
  files?: Record<string, StepValue>;
  /** Register a teardown child whose delete runs `script.sh destroy` (default true). */
  teardown?: boolean;
  /**
   * Keep what the step made when it is removed from the program: the teardown child is `protect`ed (so
   * `pulumi destroy` stops with a clear message) and retained on delete (its destroy never runs).
   * The apply command itself is never protected: it is replaced whenever its bundle changes.
   */
  keep?: boolean;
  /** Steps that must finish first (explicit edges: a component's dependsOn is not inherited by children). */
  after?: pulumi.Resource[];
}

/** The parts of a step bundle, all plain strings (secrets resolved inside an apply). */
export interface BundleParts {
  step: string;
  script: string;
  lib: string;
  env: Record<string, string>;
  files: Record<string, string>;
  /**
   * The step carries secrets: whatever the script prints could be one, and the command provider puts a failed
   * command's output into its error message (and its stdout/stderr into state) whatever `logging` says. So the
   * script's stderr goes only to the root-only log on the host, stdout only as `key=value` result lines, and a
   * failure prints just the step, the exit code and where the log is.
   */
  quiet?: boolean;
}

/** Single-quote a value for bash. */
export function shellQuote(value: string): string {
  return `'${value.replace(/'/g, `'\\''`)}'`;
}

const ENV_NAME = /^TS_[A-Z0-9_]+$/;
const FILE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;
const STEP_NAME = /^[a-z0-9][a-z0-9-]*$/;
/** A `key=value` result line of a host script's stdout (lib.sh's `result`). */
const RESULT_LINE = /^([A-Za-z0-9_.-]+)=(.*)$/;

/** Write `content` to `dest` on the host exactly (heredoc when it ends in a newline, else base64). */
function emitFile(dest: string, content: string): string {
  const delim = `TS_EOF_${crypto.createHash("sha256").update(content).digest("hex").slice(0, 16)}`;
  if (content.endsWith("\n") && !content.includes(delim)) return `cat >${dest} <<'${delim}'\n${content}${delim}\n`;
  const b64 = Buffer.from(content, "utf8").toString("base64").replace(/(.{76})/g, "$1\n");
  return `base64 -d >${dest} <<'${delim}'\n${b64}\n${delim}\n`;
}

/**
 * The bash program sent on stdin: installs the step (script, lib, env, files) into its directory, then runs
 * `script.sh apply` with stdin from /dev/null, logging stderr to /var/log/train-server/<step>.log too.
 * Wrapped in `{ }` so bash reads all of it before running any of it (a cut connection runs nothing).
 */
export function renderBundle(p: BundleParts): string {
  if (!STEP_NAME.test(p.step)) throw new Error(`step name "${p.step}" must match ${STEP_NAME}`);
  const dir = `${STEPS_DIR}/${p.step}`;
  const envNames = Object.keys(p.env).sort();
  for (const k of envNames) if (!ENV_NAME.test(k)) throw new Error(`step ${p.step}: environment name "${k}" must match ${ENV_NAME}`);
  const fileNames = Object.keys(p.files).sort();
  for (const f of fileNames) if (!FILE_NAME.test(f)) throw new Error(`step ${p.step}: file name "${f}" must match ${FILE_NAME}`);
  const envFile =
    [
      `TS_STEP_DIR=${shellQuote(dir)}`,
      `TS_FILES_DIR=${shellQuote(`${dir}/files`)}`,
      `TS_SCRIPT_NAME=${shellQuote(p.step)}`,
      ...envNames.map((k) => `${k}=${shellQuote(p.env[k])}`),
    ].join("\n") + "\n";
  const parts = [
    "{",
    "set -euo pipefail",
    "umask 077",
    `d=${dir}`,
    `mkdir -p ${LOG_DIR} "$d"`,
    `rm -rf "$d/files.new" && mkdir "$d/files.new"`,
    emitFile(`"$d/lib.sh.new"`, p.lib),
    emitFile(`"$d/script.sh.new"`, p.script),
    emitFile(`"$d/env.new"`, envFile),
    ...fileNames.map((f) => emitFile(`"$d/files.new/${f}"`, p.files[f])),
    `mv -f "$d/lib.sh.new" "$d/lib.sh"; mv -f "$d/script.sh.new" "$d/script.sh"; mv -f "$d/env.new" "$d/env"`,
    `rm -rf "$d/files" && mv "$d/files.new" "$d/files"`,
    `set -a; . "$d/env"; set +a`,
    ...(p.quiet
      ? [
          `touch ${LOG_DIR}/${p.step}.log && chmod 600 ${LOG_DIR}/${p.step}.log`,
          `rc=0; out=$(bash "$d/script.sh" apply </dev/null 2>>${LOG_DIR}/${p.step}.log) || rc=$?`,
          `printf '%s\n' "$out" | grep -E '${RESULT_LINE.source}' || true`,
          `if [ "$rc" != 0 ]; then echo "step ${p.step} failed (exit $rc); its output may hold secrets, so it is only in ${LOG_DIR}/${p.step}.log on the host (root only): sudo tail -n 50 ${LOG_DIR}/${p.step}.log" >&2; exit "$rc"; fi`,
        ]
      : [`bash "$d/script.sh" apply </dev/null 2> >(tee -a ${LOG_DIR}/${p.step}.log >&2)`]),
    "}",
  ];
  return parts.join("\n") + "\n";
}

/** The delete command of a step's teardown child: runs the installed copy's `destroy`, if installed. */
export function teardownCommand(step: string, asRoot: string): string {
  const dir = `${STEPS_DIR}/${step}`;
  // after a successful destroy the step's copy goes too (its env and files may hold secrets)
  const body = `d=${dir}; if [ -f "$d/script.sh" ]; then set -a; . "$d/env"; set +a; bash "$d/script.sh" destroy </dev/null && rm -rf "$d"; else echo "step ${step}: nothing installed"; fi`;
  return `${asRoot}bash -c ${shellQuote(body)}`;
}

/** Parse the `key=value` result lines a host script prints on stdout. */
export function parseResults(stdout: string | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of (stdout ?? "").split("\n")) {
    const m = RESULT_LINE.exec(line);
    if (m) out[m[1]] = m[2];
  }
  return out;
}

const scriptCache = new Map<string, string>();
/** The text of host-scripts/<name>.sh (read once). */
export function readHostScript(name: string): string {
  let text = scriptCache.get(name);
  if (text === undefined) {
    const file = path.join(HOST_SCRIPTS_DIR, `${name}.sh`);
    if (!fs.existsSync(file)) throw new Error(`host script ${file} does not exist`);
    text = fs.readFileSync(file, "utf8");
    scriptCache.set(name, text);
  }
  return text;
}

export function sha256(text: string): string {
  return crypto.createHash("sha256").update(text).digest("hex");
}

/**
 * One host script run as a step of the graph: `train-server:host:Script`.
 * Children: `<name>-apply` (remote.Command) and, unless `teardown: false`, `<name>-teardown`.
 */
export class HostScript extends pulumi.ComponentResource {
  /** The apply command (depend on this to order later steps after it). */
  readonly apply: command.remote.Command;
  /** `key=value` results the script printed on stdout. */
  readonly results: pulumi.Output<Record<string, string>>;
  /** sha256 of the bundle: the apply command's trigger. */
  readonly bundleHash: pulumi.Output<string>;

  constructor(name: string, args: HostScriptArgs, opts?: pulumi.ComponentResourceOptions) {
    // the step's inputs as `pulumi preview --diff` shows them: the script and every plain env value and file as
    // text (a changed timer, rule or script line is reviewable), secret values as [secret] (the engine keeps each
    // secret Output encrypted in the state, value by value)
    super(
      "train-server:host:Script",
      name,
      { script: args.script, source: readHostScript(args.script), env: args.env, files: args.files ?? {} },
      opts,
    );
    const files = args.files ?? {};
    const values = [...Object.values(args.env), ...Object.values(files)];
    const secretBearing = values.some((v) => typeof v !== "string");
    const scriptText = readHostScript(args.script);
    const libText = readHostScript("lib");
    const envKeys = Object.keys(args.env);
    const fileKeys = Object.keys(files);
    const bundle = pulumi
      .all([pulumi.all(envKeys.map((k) => args.env[k])), pulumi.all(fileKeys.map((k) => files[k]))])
      .apply(([envValues, fileValues]) =>
        renderBundle({
          step: name,
          script: scriptText,
          lib: libText,
          env: Object.fromEntries(envKeys.map((k, i) => [k, envValues[i]])),
          files: Object.fromEntries(fileKeys.map((k, i) => [k, fileValues[i]])),
          quiet: secretBearing,
        }),
      );
    const stdin = secretBearing ? pulumi.secret(bundle) : bundle;
    this.bundleHash = stdin.apply(sha256);

    let teardown: command.remote.Command | undefined;
    if (args.teardown !== false) {
      teardown = new command.remote.Command(
        `${name}-teardown`,
        {
          connection: args.host.connection,
          create: `echo "step ${name}: teardown registered"`,
          delete: teardownCommand(name, args.host.asRoot),
          logging: "stdoutAndStderr",
        },
        { parent: this, protect: !!args.keep, retainOnDelete: !!args.keep, dependsOn: args.after ?? [] },
      );
    }
    this.apply = new command.remote.Command(
      `${name}-apply`,
      {
        connection: args.host.connection,
        create: `${args.host.asRoot}bash -s`,
        update: `${args.host.asRoot}bash -s`,
        stdin,
        triggers: [this.bundleHash],
        logging: secretBearing ? "none" : "stdoutAndStderr",
      },
      {
        parent: this,
        dependsOn: [...(args.after ?? []), ...(teardown ? [teardown] : [])],
        // a secret-bearing step's outputs stay encrypted in state, whatever the script printed
        ...(secretBearing ? { additionalSecretOutputs: ["stdout", "stderr"] } : {}),
      },
    );
    this.results = this.apply.stdout.apply(parseResults);
    this.registerOutputs({ results: this.results, bundleHash: this.bundleHash });
  }
}
