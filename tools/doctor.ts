/**
 * `npm run doctor -- --stack NAME [--identity FILE] [--json] [--send-test-alert] [--outside|--no-outside] [--root DIR]`
 *
 * The health check of the live server of a stack: reads Pulumi.<stack>.yaml the way the program does (the
 * harness's reader + parseConfig: the same validation), connects with the system `ssh` as `host.sshUser` using the
 * SAME host-key options as the program's Docker provider (dockerSshOpts: with `host.hostKey` that key and no other;
 * without one, strict known_hosts), sends ONE read-only probe (host-scripts/doctor-probe.sh) on stdin, and prints
 * what components/doctor.ts makes of its facts: one ok / warn / fail / skip line per check, with the evidence and
 * the fix. From this machine it also asks every public hostname, unauthenticated, through public DNS, whether
 * Cloudflare Access stands in front of it (default on, off for a rig: true stack).
 *
 * Exit: 0 nothing failed, 1 something failed (or the server could not be reached), 2 the doctor could not run
 * (usage, an unknown stack, a config error: a message, never a stack trace).
 */
import { spawn } from "child_process";
import * as crypto from "crypto";
import * as dns from "dns";
import * as fs from "fs";
import * as https from "https";
import * as os from "os";
import { ConfigError, ConfigIssue, parseConfig, ServerConfig, splitStackConfig } from "../components/config";
import { accessCheck, Check, connectionCheck, doctorTargets, evaluate, EvaluateContext, exitCodeOf, Facts, formatReport, OutsideResult, probeEnv, renderProbe, summarize } from "../components/doctor";
import { parseResults } from "../components/host";
import type { Route } from "../components/routes";
import { dockerSshOpts } from "../components/services";
import { listStacks, readStackFile } from "./harness";

const USAGE = `usage: npm run doctor -- --stack NAME [options]
  --stack NAME        the stack (Pulumi.NAME.yaml) whose server to check
  --identity FILE     the admin's SSH private key (default: ssh-agent and ~/.ssh)
  --json              print one JSON document (checks, summary, the probe's facts)
  --send-test-alert   also send one test alert through Alertmanager to Telegram and watch it being delivered (~40 s)
  --alert-wait S      how long to watch that delivery (default 60)
  --outside           ask every public hostname from here whether Access guards it (default, except rig: true)
  --no-outside        do not
  --timeout S         give the ssh session at most S seconds (default 300)
  --root DIR          where Pulumi.NAME.yaml lives (default: this repository)`;

/** A bad command line: the message and the usage. */
class UsageError extends Error {}
/** A stack that cannot be read: the message only. */
class StackError extends Error {}

interface Options {
  stack: string;
  root?: string;
  identity?: string;
  json: boolean;
  sendTestAlert: boolean;
  alertWaitS: number;
  outside?: boolean;
  timeoutS: number;
}

function parseArgs(args: string[]): Options {
  const o: Partial<Options> = { json: false, sendTestAlert: false, alertWaitS: 60, timeoutS: 300 };
  const value = (i: number, name: string): string => {
    const v = args[i + 1];
    if (v === undefined || v.startsWith("--")) throw new UsageError(`${name} needs a value`);
    return v;
  };
  const seconds = (v: string, name: string): number => {
    if (!/^\d+$/.test(v) || Number(v) < 1) throw new UsageError(`${name} takes a number of seconds (got "${v}")`);
    return Number(v);
  };
  for (let i = 0; i < args.length; i++) {
    const [a, inline] = args[i].includes("=") ? [args[i].slice(0, args[i].indexOf("=")), args[i].slice(args[i].indexOf("=") + 1)] : [args[i], undefined];
    const take = () => (inline !== undefined ? inline : value(i++, a));
    switch (a) {
      case "--stack": o.stack = take(); break;
      case "--root": o.root = take(); break;
      case "--identity": o.identity = take(); break;
      case "--alert-wait": o.alertWaitS = seconds(take(), a); break;
      case "--timeout": o.timeoutS = seconds(take(), a); break;
      case "--json": o.json = true; break;
      case "--send-test-alert": o.sendTestAlert = true; break;
      case "--outside": o.outside = true; break;
      case "--no-outside": o.outside = false; break;
      default: throw new UsageError(`unknown option "${args[i]}"`);
    }
  }
  if (!o.stack) throw new UsageError("--stack is required");
  if (!/^[A-Za-z0-9._-]+$/.test(o.stack)) throw new UsageError(`"${o.stack}" is not a stack name`);
  if (o.identity !== undefined && !fs.existsSync(o.identity)) throw new UsageError(`--identity ${o.identity}: no such file`);
  return o as Options;
}

/** The stack's validated config, read as the program reads it (every problem listed, as `npm run plan` does). */
export function loadStack(stack: string, root?: string): ServerConfig {
  let file: Record<string, string>;
  try {
    file = readStackFile(stack, root).config;
  } catch (e) {
    throw new StackError(/^no stack file/.test((e as Error).message) ? (e as Error).message : `Pulumi.${stack}.yaml: ${(e as Error).message.split("\n")[0]} (stacks: ${listStacks(root).join(", ")})`);
  }
  const { raw, unknownKeys } = splitStackConfig(file);
  const issues: ConfigIssue[] = unknownKeys.map((k) => ({ path: k, message: `unknown stack config key "train-server:${k}"` }));
  try {
    const config = parseConfig(raw);
    if (issues.length) throw new ConfigError(issues);
    return config;
  } catch (e) {
    if (e instanceof ConfigError) throw new ConfigError([...issues, ...e.issues]);
    throw e;
  }
}

/** SHA256 fingerprint of an OpenSSH public key line, as `ssh-keygen -l` prints it. */
export function fingerprint(key: string): string {
  const blob = Buffer.from(key.trim().split(/\s+/)[1] ?? "", "base64");
  return `SHA256:${crypto.createHash("sha256").update(blob).digest("base64").replace(/=+$/, "")}`;
}

/** The ssh command line of the probe session: the program's host-key options, the admin, `bash -s`. */
export function sshArgs(config: ServerConfig, identity?: string): string[] {
  const h = config.host;
  return [
    "-T",
    ...dockerSshOpts(config),
    "-o", "ConnectTimeout=15",
    "-p", String(h.sshPort),
    ...(identity ? ["-i", identity, "-o", "IdentitiesOnly=yes"] : []),
    `${h.sshUser}@${h.address}`,
    "bash -s",
  ];
}

interface SshRun {
  status: number | null;
  stdout: string;
  stderr: string;
}

function runSsh(args: string[], input: string, timeoutS: number): Promise<SshRun> {
  return new Promise((resolve) => {
    const p = spawn("ssh", args, { stdio: ["pipe", "pipe", "pipe"] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const timer = setTimeout(() => {
      err.push(Buffer.from(`\n(the doctor stopped the ssh session after ${timeoutS} s)`));
      p.kill("SIGKILL");
    }, timeoutS * 1000);
    p.stdout.on("data", (d) => out.push(d));
    p.stderr.on("data", (d) => err.push(d));
    p.stdin.on("error", () => undefined); // ssh may exit (host key refused) before reading its stdin
    p.on("error", (e) => err.push(Buffer.from(String(e))));
    p.on("close", (status) => {
      clearTimeout(timer);
      resolve({ status, stdout: Buffer.concat(out).toString("utf8"), stderr: Buffer.concat(err).toString("utf8") });
    });
    p.stdin.end(input);
  });
}

/**
 * One unauthenticated GET per public hostname, from this machine, resolved through public DNS (1.1.1.1, 8.8.8.8:
 * an office's local-DNS bypass would send it straight to Traefik, which is not what the internet sees).
 */
export async function outsideProbe(routes: Route[], timeoutMs = 10_000): Promise<Record<string, OutsideResult>> {
  const resolver = new dns.promises.Resolver({ timeout: 3000, tries: 2 });
  resolver.setServers(["1.1.1.1", "8.8.8.8"]);
  const one = async (host: string): Promise<OutsideResult> => {
    let address: string;
    try {
      address = (await resolver.resolve4(host))[0];
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      return { error: `DNS ${err.code ?? "ERROR"}: ${err.message}` };
    }
    return new Promise((resolve) => {
      const req = https.request(
        { host: address, servername: host, port: 443, path: "/", method: "GET", headers: { host, "user-agent": "train-server-doctor", accept: "text/html" }, timeout: timeoutMs },
        (res) => {
          resolve({ address, status: res.statusCode, ...(res.headers.location ? { location: res.headers.location } : {}), ...(res.headers.server ? { server: String(res.headers.server) } : {}) });
          res.destroy();
        },
      );
      req.on("timeout", () => req.destroy(Object.assign(new Error(`no answer in ${timeoutMs} ms`), { code: "ETIMEDOUT" })));
      req.on("error", (e: NodeJS.ErrnoException) => resolve({ address, error: `HTTPS ${e.code ?? "ERROR"}: ${e.message}` }));
      req.end();
    });
  };
  const results = await Promise.all(routes.map(async (r) => [r.id, await one(r.hostname)] as const));
  return Object.fromEntries(results);
}

export interface Io {
  out(text: string): void;
  err(text: string): void;
}

const consoleIo: Io = { out: (t) => process.stdout.write(t + "\n"), err: (t) => process.stderr.write(t + "\n") };

/** The doctor. Returns the exit code (0 healthy, 1 something failed, 2 could not run). */
export async function main(args: string[], io: Io = consoleIo): Promise<number> {
  let opts: Options;
  let config: ServerConfig;
  try {
    opts = parseArgs(args);
  } catch (e) {
    io.err(`doctor: ${(e as Error).message}\n${USAGE}`);
    return 2;
  }
  try {
    config = loadStack(opts.stack, opts.root);
  } catch (e) {
    if (e instanceof ConfigError) {
      io.err(`doctor: stack "${opts.stack}": ${e.message}`);
      return 2;
    }
    if (e instanceof StackError) {
      io.err(`doctor: ${e.message}`);
      return 2;
    }
    io.err(`doctor: ${(e as Error).message}`);
    return 2;
  }
  const started = Date.now();
  const h = config.host;
  const target = `${h.sshUser}@${h.address}:${h.sshPort}`;
  const pinned = h.hostKey ? `${h.hostKey.split(" ")[0]} ${fingerprint(h.hostKey)}` : undefined;
  const targets = doctorTargets(config);
  const env = probeEnv(config, targets, { sendTestAlert: opts.sendTestAlert, alertWaitS: opts.alertWaitS, sender: `${os.userInfo().username}@${os.hostname()}`, now: started });
  const outside = opts.outside ?? !config.rig;
  const [ssh, outsideResults] = await Promise.all([
    runSsh(sshArgs(config, opts.identity), renderProbe(env), opts.timeoutS + (opts.sendTestAlert ? opts.alertWaitS : 0)),
    outside ? outsideProbe(targets.published) : Promise.resolve(undefined),
  ]);
  const facts: Facts = parseResults(ssh.stdout);
  const conn = connectionCheck({ status: ssh.status, stderr: ssh.stderr, complete: facts["probe.end"] === "1", target, ...(pinned ? { pinned } : {}) });
  const ctx: EvaluateContext = {
    now: started,
    sendTestAlert: opts.sendTestAlert,
    outside: outsideResults ? { results: outsideResults } : { skipped: config.rig ? "rig: true: a test rig's hostnames are not public (--outside asks them anyway)" : "--no-outside: Access was not asked from outside" },
  };
  // the requests from outside do not need the ssh session: a server that cannot be reached still gets them
  const checks: Check[] = conn.status === "ok" ? [conn, ...evaluate(config, facts, ctx)] : [conn, ...(outsideResults ? targets.published.map((r) => accessCheck(r, outsideResults[r.id])) : [])];
  const code = exitCodeOf(checks);
  if (opts.json) {
    io.out(
      JSON.stringify(
        { stack: opts.stack, target, hostKey: pinned ?? "known_hosts", server: facts["probe.host"] ?? null, startedAt: new Date(started).toISOString(), durationMs: Date.now() - started, exitCode: code, summary: summarize(checks), checks, facts },
        null,
        2,
      ),
    );
  } else {
    const header = `train-server doctor: stack "${opts.stack}", ${target}${facts["probe.host"] ? ` (${facts["probe.host"]})` : ""}, ${new Date(started).toISOString().replace(/\.\d+Z$/, "Z")}`;
    io.out(formatReport(header, checks));
    if (conn.status !== "ok" && ssh.stderr.trim()) io.err(`ssh said:\n${ssh.stderr.trim()}`);
  }
  return code;
}

if (require.main === module) {
  // a doctor that never settles must not look like a healthy server
  process.exitCode = 2;
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (e) => {
      process.stderr.write(`doctor: ${(e as Error).message}\n`);
      process.exit(2);
    },
  );
}
