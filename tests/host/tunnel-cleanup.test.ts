/**
 * The tunnel's connection cleanup (Edge.tunnelCleanup's delete command), run for real with bash and curl against
 * a local double of the Cloudflare API on 127.0.0.1 that behaves like the real one for this case: DELETE of a
 * tunnel with active connections is refused (error 1022), DELETE .../connections clears them, after which the
 * tunnel delete succeeds. Proves the command sends the right request with the provider's token, passes on 200
 * and 404, and fails the destroy with the API's answer otherwise.
 */
import { execFile } from "child_process";
import * as http from "http";
import { AddressInfo } from "net";
import { TUNNEL_CLEANUP_DELETE } from "../../components/edge";

const ACCOUNT = "0123456789abcdef0123456789abcdef";
const TUNNEL = "a1b2c3d4-0000-4000-8000-000000000001";

interface Seen {
  method: string;
  url: string;
  auth: string | undefined;
}

/** A Cloudflare API double: one tunnel with `connections` live connections; `force` answers every call with it. */
function api(state: { connections: number; force?: number }) {
  const seen: Seen[] = [];
  const server = http.createServer((req, res) => {
    seen.push({ method: req.method!, url: req.url!, auth: req.headers.authorization });
    const reply = (code: number, body: unknown) => {
      res.writeHead(code, { "content-type": "application/json" });
      res.end(JSON.stringify(body));
    };
    if (state.force) return reply(state.force, { success: false, errors: [{ code: 10000, message: "Authentication error" }] });
    if (req.method === "DELETE" && req.url === `/client/v4/accounts/${ACCOUNT}/cfd_tunnel/${TUNNEL}/connections`) {
      state.connections = 0;
      return reply(200, { success: true, errors: [], result: null });
    }
    if (req.method === "DELETE" && req.url === `/client/v4/accounts/${ACCOUNT}/cfd_tunnel/${TUNNEL}`) {
      if (state.connections > 0) return reply(400, { success: false, errors: [{ code: 1022, message: "Cannot delete tunnel because it has active connections" }] });
      return reply(200, { success: true, result: { id: TUNNEL } });
    }
    return reply(404, { success: false, errors: [{ code: 1003, message: "Not found" }] });
  });
  return new Promise<{ base: string; seen: Seen[]; close: () => void }>((resolve) =>
    server.listen(0, "127.0.0.1", () => resolve({ base: `http://127.0.0.1:${(server.address() as AddressInfo).port}/client/v4`, seen, close: () => server.close() })),
  );
}

function cleanup(env: Record<string, string>): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) =>
    execFile("/bin/bash", ["-c", TUNNEL_CLEANUP_DELETE], { env: { PATH: process.env.PATH, TS_ACCOUNT_ID: ACCOUNT, TS_TUNNEL_ID: TUNNEL, ...env } }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    ),
  );
}

test("with live connections the tunnel delete is refused; after the cleanup it succeeds", async () => {
  const state = { connections: 2 };
  const a = await api(state);
  try {
    const refused = await fetch(`${a.base}/accounts/${ACCOUNT}/cfd_tunnel/${TUNNEL}`, { method: "DELETE" });
    expect(refused.status).toBe(400);
    const r = await cleanup({ TS_CF_TOKEN: "tok-123", TS_CF_BASE_URL: a.base });
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`tunnel ${TUNNEL}: connections cleaned up (200)`);
    expect(a.seen[1]).toEqual({ method: "DELETE", url: `/client/v4/accounts/${ACCOUNT}/cfd_tunnel/${TUNNEL}/connections`, auth: "Bearer tok-123" });
    expect(state.connections).toBe(0);
    const deleted = await fetch(`${a.base}/accounts/${ACCOUNT}/cfd_tunnel/${TUNNEL}`, { method: "DELETE" });
    expect(deleted.status).toBe(200);
  } finally {
    a.close();
  }
});

test("the token falls back to CLOUDFLARE_API_TOKEN (the provider's own environment variable)", async () => {
  const a = await api({ connections: 1 });
  try {
    const r = await cleanup({ CLOUDFLARE_API_TOKEN: "env-token", TS_CF_BASE_URL: a.base });
    expect(r.code).toBe(0);
    expect(a.seen[0].auth).toBe("Bearer env-token");
  } finally {
    a.close();
  }
});

test("a tunnel already gone (404) passes; an API error fails the destroy with the API's answer", async () => {
  const gone = await api({ connections: 0, force: 404 });
  try {
    expect((await cleanup({ TS_CF_TOKEN: "t", TS_CF_BASE_URL: gone.base })).code).toBe(0);
  } finally {
    gone.close();
  }
  const denied = await api({ connections: 1, force: 403 });
  try {
    const r = await cleanup({ TS_CF_TOKEN: "bad", TS_CF_BASE_URL: denied.base });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("tunnel cleanup: HTTP 403");
    expect(r.stderr).toContain("Authentication error");
  } finally {
    denied.close();
  }
});

test("without any token it fails at once, saying where the token comes from", async () => {
  const r = await cleanup({});
  expect(r.code).toBe(1);
  expect(r.stderr).toContain("cloudflare:apiToken or CLOUDFLARE_API_TOKEN");
});
